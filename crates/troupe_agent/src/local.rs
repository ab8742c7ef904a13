//! A deterministic local model backend for examples, tests and benchmarks.
//!
//! The reply depends only on the conversation: the same request always
//! streams the same words, so a test can compute what a session must
//! contain, and a turn re-run after a crash produces the same text again.
//! It reads like a support agent's answer: a greeting or what the tools
//! returned ("I checked our records: order A-1042, refund sent, 3
//! days."), a sentence or two on the question's topic (refunds, invoices,
//! connections, orders), and a closing line. Latency is configurable (time
//! to the first chunk, time between chunks; zero for benchmarks that
//! measure the framework). Tool calls are triggered by keywords:
//! [`LocalBackend::call_tool_when`]. Asked for a typed answer (a request
//! with a `response_format`), it answers JSON that fits the schema, its
//! strings filled with the same sentences.

use std::time::Duration;

use futures::StreamExt;

use crate::error::AgentError;
use crate::model::{
    ChatMessage, ChatRequest, Chunk, ChunkStream, ModelBackend, Role, ToolCall, Usage,
};

const OPENERS: &[&str] = &[
    "Thanks for reaching out.",
    "Happy to help with that.",
    "Sure, let me help.",
];

const CLOSERS: &[&str] = &[
    "Is there anything else I can do for you?",
    "Let me know if that helps.",
    "Have a great day!",
];

/// Sentences by topic: the keywords that pick the topic, then what a
/// support agent says about it.
const TOPICS: &[(&[&str], &[&str])] = &[
    (
        &["refund", "money back"],
        &[
            "Your refund is on its way back to the card you paid with.",
            "Refunds usually show up within three to five business days.",
            "You will get an email as soon as the bank confirms it.",
        ],
    ),
    (
        &["invoice", "charge", "bill", "payment", "statement"],
        &[
            "I can see both payments on that invoice.",
            "The duplicate charge will be reversed automatically.",
            "A corrected invoice is on its way to your inbox.",
        ],
    ),
    (
        &[
            "router",
            "error",
            "internet",
            "connection",
            "wifi",
            "modem",
            "blink",
        ],
        &[
            "I ran a check on your line and it looks stable now.",
            "If the light keeps blinking red, unplug the router for thirty seconds.",
            "I have reset the connection profile on our side.",
        ],
    ),
    (
        &["order", "delivery", "shipping", "package", "parcel"],
        &[
            "Your order has left our warehouse.",
            "The tracking link in your confirmation email shows where it is.",
            "Deliveries in your area usually take two days.",
        ],
    ),
    (
        &["weather", "forecast", "coat", "rain", "umbrella"],
        &[
            "Tomorrow looks bright, with a light breeze in the afternoon.",
            "A light jacket will do; no coat needed.",
            "No rain is expected before the weekend.",
        ],
    ),
    (
        &["thank", "great", "works now"],
        &[
            "You are very welcome.",
            "Glad to hear it is sorted.",
            "It was a pleasure to help.",
        ],
    ),
];

/// What each of [`TOPICS`] is called, for typed answers that choose among
/// names (a `desk` enum of `Billing`, `Technical`, `Shipping`...).
const TOPIC_NAMES: &[&[&str]] = &[
    &["billing", "refund", "payment"],
    &["billing", "invoice", "payment"],
    &["technical", "support", "network"],
    &["shipping", "delivery", "order"],
    &["weather"],
    &["thanks", "general"],
];

/// Fills a typed answer from the question and the reply's sentences.
struct LocalFill {
    question: String,
    sentences: Vec<String>,
    next: usize,
    topic: Option<usize>,
}

impl crate::structured::Fill for LocalFill {
    fn string(&mut self, property: &str, nullable: bool) -> serde_json::Value {
        let p = property.to_lowercase();
        let id_like = ["order", "invoice", "ticket", "sku", "number"]
            .iter()
            .any(|k| p.contains(k))
            || p == "id"
            || p.ends_with("_id");
        if id_like {
            // A word of the question with a digit in it: `A-1042`.
            let id = self
                .question
                .split_whitespace()
                .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric()))
                .find(|w| w.chars().any(|c| c.is_ascii_digit()));
            return match id {
                Some(id) => serde_json::Value::String(id.to_owned()),
                None if nullable => serde_json::Value::Null,
                None => serde_json::Value::String("unknown".into()),
            };
        }
        if ["summary", "question", "request", "issue", "problem"]
            .iter()
            .any(|k| p.contains(k))
            && !self.question.is_empty()
        {
            let first = self
                .question
                .split_inclusive(['.', '!', '?'])
                .next()
                .unwrap_or(&self.question);
            return serde_json::Value::String(format!("Customer: {}", first.trim()));
        }
        if self.sentences.is_empty() {
            return serde_json::Value::String("Done.".into());
        }
        let s = self.sentences[self.next % self.sentences.len()].clone();
        self.next += 1;
        serde_json::Value::String(s)
    }

    fn choice(&mut self, values: &[serde_json::Value]) -> serde_json::Value {
        let names = self.topic.map_or(&[][..], |t| TOPIC_NAMES[t]);
        let question = self.question.to_lowercase();
        values
            .iter()
            .find(|v| {
                let v = v.as_str().unwrap_or_default().to_lowercase();
                !v.is_empty()
                    && (names.iter().any(|n| v.starts_with(n) || n.starts_with(&v))
                        || question.contains(&v))
            })
            .or(values.first())
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

const GENERAL: &[&str] = &[
    "I have looked into it for you.",
    "I have added a note to your account.",
    "Our team will follow up if anything changes.",
    "Everything on our side looks in order.",
];

struct ToolRule {
    keyword: String,
    tool: String,
    arguments: String,
}

/// A deterministic streaming backend. See the [module docs](self).
pub struct LocalBackend {
    name: String,
    /// Words after the tool facts (None: the reply's natural length).
    words: Option<usize>,
    words_per_chunk: usize,
    first_chunk: Duration,
    between_chunks: Duration,
    rules: Vec<ToolRule>,
}

impl Default for LocalBackend {
    /// Replies of their natural length in chunks of 2 words, no latency.
    fn default() -> Self {
        Self {
            name: "local".into(),
            words: None,
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

    /// Reply length in words (at least 1; not counting what the tools
    /// returned, which is always said in full) and words per chunk (at
    /// least 1). A reply longer than that is cut, a shorter one goes on.
    pub fn words(mut self, words: usize, per_chunk: usize) -> Self {
        self.words = Some(words.max(1));
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
        let words = self.prose(request, seed);
        if let Some(format) = &request.response_format {
            return Self::typed(request, &format.schema, &words, prompt_tokens);
        }
        let count = words.len();
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
                completion_tokens: count as u32,
            }),
        });
        chunks
    }

    /// A JSON answer that fits `schema`, filled from the question (ids,
    /// the topic for enum choices, the question itself for a summary) and
    /// the reply's sentences, streamed 32 bytes at a time.
    fn typed(
        request: &ChatRequest,
        schema: &serde_json::Value,
        words: &[String],
        prompt_tokens: u32,
    ) -> Vec<Chunk> {
        let prose = words.join(" ");
        let sentences: Vec<String> = prose
            .split_inclusive(['.', '!', '?'])
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let question = request
            .messages
            .iter()
            .rev()
            .find(|m| {
                m.role == Role::User && !m.content.starts_with(crate::structured::REPAIR_PREFIX)
            })
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let lower = question.to_lowercase();
        let topic = TOPICS
            .iter()
            .position(|(keys, _)| keys.iter().any(|k| lower.contains(k)));
        let defs = schema
            .get("$defs")
            .and_then(serde_json::Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut fill = LocalFill {
            question,
            sentences,
            next: 0,
            topic,
        };
        let json = crate::structured::example_value(schema, &defs, &mut fill, "", 0).to_string();
        let mut chunks = Vec::new();
        let mut rest = json.as_str();
        while !rest.is_empty() {
            let mut end = rest.len().min(32);
            while !rest.is_char_boundary(end) {
                end += 1;
            }
            chunks.push(Chunk::Text(rest[..end].to_owned()));
            rest = &rest[end..];
        }
        let completion_tokens = chunks.len() as u32;
        chunks.push(Chunk::Done {
            finish_reason: "stop".into(),
            usage: Some(Usage {
                prompt_tokens,
                completion_tokens,
            }),
        });
        chunks
    }

    /// The reply's words: what the tools returned (if the model is
    /// answering after a tool round), then the topic's sentences.
    fn prose(&self, request: &ChatRequest, seed: u64) -> Vec<String> {
        let pick = |list: &[&'static str], salt: u64| -> &'static str {
            let h = seed.wrapping_add(salt).wrapping_mul(6364136223846793005) >> 33;
            list[h as usize % list.len()]
        };
        // The results of the last tool round, if the model answers after one.
        let tools: Vec<&ChatMessage> = request
            .messages
            .iter()
            .rev()
            .take_while(|m| m.role == Role::Tool)
            .collect();
        let question = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.to_lowercase())
            .unwrap_or_default();
        let mut facts = String::new();
        let mut body: Vec<&'static str> = Vec::new();
        if tools.is_empty() {
            body.push(pick(OPENERS, 1));
        } else {
            let parts: Vec<String> = tools.iter().rev().map(|m| fact(&m.content)).collect();
            facts = format!("I checked our records: {}.", parts.join("; "));
        }
        let topic = TOPICS
            .iter()
            .find(|(keys, _)| keys.iter().any(|k| question.contains(k)))
            .map_or(GENERAL, |(_, lines)| *lines);
        let first = pick(topic, 2);
        body.push(first);
        let second = pick(topic, 3);
        if second != first {
            body.push(second);
        }
        body.push(pick(CLOSERS, 4));
        let mut words: Vec<String> = body
            .iter()
            .flat_map(|s| s.split_whitespace())
            .map(str::to_owned)
            .collect();
        if let Some(n) = self.words {
            let mut salt = 5;
            while words.len() < n {
                words.extend(pick(GENERAL, salt).split_whitespace().map(str::to_owned));
                salt += 1;
            }
            if words.len() > n {
                words.truncate(n);
                if let Some(last) = words.last_mut() {
                    let trimmed = last.trim_end_matches([',', '.', '!', '?']).to_owned();
                    *last = trimmed + ".";
                }
            }
        }
        let mut out: Vec<String> = facts.split_whitespace().map(str::to_owned).collect();
        out.extend(words);
        out
    }
}

/// One tool result as a support agent would say it: a JSON object's
/// fields (`order A-1042, refund sent, 3 days`), a JSON string as it is.
fn fact(content: &str) -> String {
    if let Some(e) = content.strip_prefix("error: ") {
        return format!("that lookup failed ({e})");
    }
    match serde_json::from_str::<serde_json::Value>(content) {
        Ok(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k} {s}"),
                // "3 days", "2 payments", but "invoice 1042".
                serde_json::Value::Number(n) if k.ends_with('s') => format!("{n} {k}"),
                serde_json::Value::Number(n) => format!("{k} {n}"),
                serde_json::Value::Bool(true) => format!("{k}: yes"),
                serde_json::Value::Bool(false) => format!("{k}: no"),
                other => format!("{k} {other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        Ok(serde_json::Value::String(s)) => s,
        _ => content.to_owned(),
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

    fn text(chunks: &[Chunk]) -> String {
        chunks
            .iter()
            .filter_map(|c| match c {
                Chunk::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn replies_read_like_a_support_agent_and_say_what_the_tools_returned() {
        let b = LocalBackend::default();
        let q = ChatRequest::new(
            "m",
            vec![ChatMessage::user("Where is the refund for A-1042?")],
        );
        let reply = text(&b.reply(&q));
        assert!(reply.contains("refund"), "{reply}");
        assert!(reply.ends_with(['.', '!', '?']), "{reply}");
        let mut after_tool = q.clone();
        after_tool.messages.push(ChatMessage {
            role: Role::Assistant,
            content: String::new(),
            tool_calls: vec![ToolCall {
                id: "c1".into(),
                name: "refund_status".into(),
                arguments: "{}".into(),
            }],
            tool_call_id: None,
            attachments: Vec::new(),
        });
        after_tool.messages.push(ChatMessage {
            role: Role::Tool,
            content: r#"{"order":"A-1042","refund":"sent","days":3}"#.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some("c1".into()),
            attachments: Vec::new(),
        });
        let reply = text(&b.reply(&after_tool));
        assert!(
            reply.starts_with("I checked our records: order A-1042, refund sent, 3 days."),
            "{reply}"
        );
        // Deterministic: the same conversation, the same words.
        assert_eq!(reply, text(&b.reply(&after_tool)));
    }
}
