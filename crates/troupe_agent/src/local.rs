//! A deterministic local model backend for examples, tests and benchmarks.
//!
//! The reply depends only on the conversation: the same request always
//! streams the same words, so a test can compute what a session must
//! contain, and a turn re-run after a crash produces the same text again.
//! Latency is configurable (time to the first chunk, time between chunks;
//! zero for benchmarks that measure the framework). Tool calls are
//! triggered by keywords: [`LocalBackend::call_tool_when`].

use std::time::Duration;

use futures::StreamExt;

use crate::error::AgentError;
use crate::model::{ChatRequest, Chunk, ChunkStream, ModelBackend, Role, ToolCall, Usage};

const VOCABULARY: &[&str] = &[
    "sure", "the", "order", "is", "on", "its", "way", "and", "your", "account", "looks", "fine",
    "we", "checked", "invoice", "refund", "will", "arrive", "within", "days", "please", "restart",
    "device", "then", "try", "again", "thanks", "for", "waiting", "ticket", "updated", "today",
];

struct ToolRule {
    keyword: String,
    tool: String,
    arguments: String,
}

/// A deterministic streaming backend. See the [module docs](self).
pub struct LocalBackend {
    name: String,
    words: usize,
    words_per_chunk: usize,
    first_chunk: Duration,
    between_chunks: Duration,
    rules: Vec<ToolRule>,
}

impl Default for LocalBackend {
    /// 24 words in chunks of 2, no latency.
    fn default() -> Self {
        Self {
            name: "local".into(),
            words: 24,
            words_per_chunk: 2,
            first_chunk: Duration::ZERO,
            between_chunks: Duration::ZERO,
            rules: Vec::new(),
        }
    }
}

impl LocalBackend {
    /// The default backend under another name.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Reply length in words (at least 1) and words per chunk (at least 1).
    pub fn words(mut self, words: usize, per_chunk: usize) -> Self {
        self.words = words.max(1);
        self.words_per_chunk = per_chunk.max(1);
        self
    }

    /// Time to the first chunk and between chunks.
    pub fn latency(mut self, first_chunk: Duration, between_chunks: Duration) -> Self {
        self.first_chunk = first_chunk;
        self.between_chunks = between_chunks;
        self
    }

    /// When the last message is from the user, contains `keyword` and the
    /// request offers `tool`, answer with a call of `tool` with `arguments`
    /// (JSON text) instead of text. Rules are tried in order.
    pub fn call_tool_when(
        mut self,
        keyword: impl Into<String>,
        tool: impl Into<String>,
        arguments: serde_json::Value,
    ) -> Self {
        self.rules.push(ToolRule {
            keyword: keyword.into().to_lowercase(),
            tool: tool.into(),
            arguments: arguments.to_string(),
        });
        self
    }

    /// The chunks this backend streams for `request` (what a test expects).
    pub fn reply(&self, request: &ChatRequest) -> Vec<Chunk> {
        let prompt_tokens = request
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count() as u32)
            .sum();
        let Some(last) = request.messages.last() else {
            return vec![Chunk::Done {
                finish_reason: "stop".into(),
                usage: Some(Usage {
                    prompt_tokens: 0,
                    completion_tokens: 0,
                }),
            }];
        };
        if last.role == Role::User {
            let text = last.content.to_lowercase();
            if let Some(rule) = self.rules.iter().find(|r| {
                text.contains(&r.keyword) && request.tools.iter().any(|t| t.name == r.tool)
            }) {
                let turn = request
                    .messages
                    .iter()
                    .filter(|m| m.role == Role::User)
                    .count();
                return vec![
                    Chunk::ToolCall(ToolCall {
                        id: format!("call-{turn}-{}", rule.tool),
                        name: rule.tool.clone(),
                        arguments: rule.arguments.clone(),
                    }),
                    Chunk::Done {
                        finish_reason: "tool_calls".into(),
                        usage: Some(Usage {
                            prompt_tokens,
                            completion_tokens: 1,
                        }),
                    },
                ];
            }
        }
        let mut seed = fnv1a(request.model.as_bytes());
        for m in &request.messages {
            seed = fnv1a_continue(seed, m.content.as_bytes());
        }
        let mut words: Vec<String> = Vec::with_capacity(self.words);
        if last.role == Role::Tool {
            words.push(format!("({})", last.content));
        }
        while words.len() < self.words {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            words.push(VOCABULARY[(seed >> 33) as usize % VOCABULARY.len()].to_owned());
        }
        let mut chunks: Vec<Chunk> = words
            .chunks(self.words_per_chunk)
            .enumerate()
            .map(|(i, w)| {
                let text = w.join(" ");
                Chunk::Text(if i == 0 { text } else { format!(" {text}") })
            })
            .collect();
        chunks.push(Chunk::Done {
            finish_reason: "stop".into(),
            usage: Some(Usage {
                prompt_tokens,
                completion_tokens: self.words as u32,
            }),
        });
        chunks
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_continue(0xcbf29ce484222325, bytes)
}

fn fnv1a_continue(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[async_trait::async_trait]
impl ModelBackend for LocalBackend {
    fn name(&self) -> &str {
        &self.name
    }

    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, AgentError> {
        let chunks = self.reply(&request);
        let (first, between) = (self.first_chunk, self.between_chunks);
        if first.is_zero() && between.is_zero() {
            return Ok(futures::stream::iter(chunks.into_iter().map(Ok)).boxed());
        }
        Ok(futures::stream::iter(chunks.into_iter().enumerate())
            .then(move |(i, c)| async move {
                let wait = if i == 0 { first } else { between };
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Ok(c)
            })
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChatMessage, ToolSpec};

    #[test]
    fn same_request_same_reply_and_tool_rules_need_the_tool_offered() {
        let b = LocalBackend::default().words(7, 3).call_tool_when(
            "invoice",
            "lookup_invoice",
            serde_json::json!({"id": 7}),
        );
        let mut req = ChatRequest::new("m", vec![ChatMessage::user("where is my INVOICE?")]);
        let a = b.reply(&req);
        assert_eq!(a, b.reply(&req));
        assert_eq!(a.len(), 4, "3 text chunks of up to 3 words, then Done");
        let text: String = a
            .iter()
            .filter_map(|c| match c {
                Chunk::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text.split_whitespace().count(), 7);
        req.tools.push(ToolSpec {
            name: "lookup_invoice".into(),
            description: String::new(),
            parameters: serde_json::json!({}),
        });
        match &b.reply(&req)[0] {
            Chunk::ToolCall(c) => {
                assert_eq!(c.name, "lookup_invoice");
                assert_eq!(c.arguments, r#"{"id":7}"#);
            }
            other => panic!("expected a tool call, got {other:?}"),
        }
    }
}
