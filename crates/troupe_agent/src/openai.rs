//! An OpenAI-compatible chat-completions client that streams.
//!
//! Works with any server that speaks `POST {base_url}/chat/completions`
//! with `"stream": true` and answers with server-sent events (OpenAI, vLLM,
//! llama.cpp's server, TGI, Ollama's OpenAI endpoint...).
//!
//! | situation | what happens |
//! |---|---|
//! | 429 or 5xx before the stream starts | retried up to [`OpenAiConfig::max_retries`] times, waiting what `Retry-After` says (seconds or an HTTP date), else exponential backoff with jitter |
//! | 429 past the retry budget, or a `Retry-After` longer than [`OpenAiConfig::max_retry_after`] | [`AgentError::Overloaded`] with the server's hint |
//! | other 4xx, or 5xx past the budget | [`AgentError::Backend`] with the status and the server's own error message |
//! | no response headers in time, no chunk for [`OpenAiConfig::idle_timeout`] | [`AgentError::Timeout`] |
//! | a chunk that is not valid JSON of the expected shape | [`AgentError::MalformedChunk`] ends the stream |
//! | the connection closes before the model finished | [`AgentError::StreamClosed`] |
//! | a response larger than [`OpenAiConfig::max_response_bytes`] | [`AgentError::TooLarge`] |
//!
//! A request with a [`crate::ResponseFormat`] (a typed answer, see
//! [`crate::structured`]) is sent with `response_format` of type
//! `json_schema`; the lease priority goes in
//! [`OpenAiConfig::priority_field`] when one is set (vLLM's `priority`);
//! attachments of the media types in [`OpenAiConfig::media`] go as content
//! parts with their bytes in data URLs (a fetchable URL would have to be
//! signed and expiring to keep blobs per tenant; data URLs need neither).
//!
//! Nothing is retried once a chunk was delivered: the caller has already
//! journaled it, and a retry would journal the same text twice.

use std::collections::BTreeMap;
use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::error::AgentError;
use crate::model::{ChatRequest, Chunk, ChunkStream, ModelBackend, ToolCall, Usage};

/// Settings of an [`OpenAiBackend`].
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Backend name (in errors and metrics).
    pub name: String,
    /// Base URL, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// Bearer token, if the server wants one.
    pub api_key: Option<String>,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// Bound on waiting for the response headers.
    pub response_timeout: Duration,
    /// Bound on the silence between two chunks.
    pub idle_timeout: Duration,
    /// Retries after a 429 or a 5xx (or a connection failure) before the stream starts.
    pub max_retries: u32,
    /// First backoff when the server gives no `Retry-After`.
    pub initial_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Longest `Retry-After` worth waiting for; a longer one is passed to the caller.
    pub max_retry_after: Duration,
    /// Largest streamed response, in bytes.
    pub max_response_bytes: usize,
    /// The request field that carries the lease priority, for servers that
    /// schedule by one (vLLM's `priority`, with `--scheduling-policy
    /// priority`); `None`: not sent.
    pub priority_field: Option<String>,
    /// Whether the server runs lower values first (vLLM does): Troupe's
    /// priority `p` (0 lowest) is then sent as `PRIORITIES - 1 - p`.
    pub priority_lower_first: bool,
    /// Media types the model takes as content parts, by prefix (`image/`,
    /// `application/pdf`, `audio/wav`): attachments of these types are sent
    /// as data URLs (images as `image_url` parts, WAV and MP3 as
    /// `input_audio`, anything else as a `file` part). Empty (the default):
    /// a text-only model, which reads the line naming each attachment.
    pub media: Vec<String>,
}

impl OpenAiConfig {
    /// Defaults for a server at `base_url`: 10 s to connect, 60 s to the
    /// headers, 60 s between chunks, 3 retries from 250 ms up to 10 s,
    /// `Retry-After` honoured up to 60 s, 8 MiB responses.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            name: "openai".into(),
            base_url: base_url.into(),
            api_key: None,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_retries: 3,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
            max_response_bytes: 8 << 20,
            priority_field: None,
            priority_lower_first: true,
            media: Vec::new(),
        }
    }

    /// Sends attachments of these media types (prefixes such as `image/`)
    /// as content parts.
    pub fn accepts<I, S>(mut self, media: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.media = media.into_iter().map(Into::into).collect();
        self
    }

    /// Sends the lease priority in request field `field`, lower values
    /// first (vLLM's convention).
    pub fn priority_field(mut self, field: impl Into<String>) -> Self {
        self.priority_field = Some(field.into());
        self
    }

    /// Sets the bearer token.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Sets the backend name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// The client. See the [module docs](self).
pub struct OpenAiBackend {
    config: OpenAiConfig,
    client: reqwest::Client,
    url: String,
}

/// Bound on an error body kept for the message.
const MAX_ERROR_BODY: usize = 64 * 1024;

impl OpenAiBackend {
    /// A client for `config`.
    pub fn new(config: OpenAiConfig) -> Result<Self, AgentError> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| AgentError::Transport {
                backend: config.name.clone(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        Ok(Self {
            config,
            client,
            url,
        })
    }

    fn body(&self, request: &ChatRequest) -> serde_json::Value {
        let messages: Vec<serde_json::Value> = request
            .messages
            .iter()
            .map(|m| {
                let parts: Vec<serde_json::Value> = m
                    .attachments
                    .iter()
                    .filter_map(|a| Some(content_part(&a.blob, a.data.as_deref()?)))
                    .collect();
                let content = if parts.is_empty() {
                    json!(m.content)
                } else {
                    let mut all = vec![json!({ "type": "text", "text": m.content })];
                    all.extend(parts);
                    json!(all)
                };
                let mut v = json!({ "role": m.role, "content": content });
                if !m.tool_calls.is_empty() {
                    v["tool_calls"] = m
                        .tool_calls
                        .iter()
                        .map(|c| {
                            json!({
                                "id": c.id, "type": "function",
                                "function": { "name": c.name, "arguments": c.arguments }
                            })
                        })
                        .collect();
                }
                if let Some(id) = &m.tool_call_id {
                    v["tool_call_id"] = json!(id);
                }
                v
            })
            .collect();
        let mut body = json!({
            "model": request.model,
            "messages": messages,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        if !request.tools.is_empty() {
            body["tools"] = request
                .tools
                .iter()
                .map(|t| {
                    json!({
                        "type": "function",
                        "function": {
                            "name": t.name,
                            "description": t.description,
                            "parameters": t.parameters,
                        }
                    })
                })
                .collect();
        }
        if let Some(n) = request.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(f) = &request.response_format {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": { "name": f.name, "schema": f.schema, "strict": f.strict },
            });
        }
        if let (Some(field), Some(p)) = (&self.config.priority_field, request.priority) {
            let top = troupe_gpu::scheduler::PRIORITIES.saturating_sub(1) as u8;
            let p = p.min(top);
            body[field.as_str()] = json!(if self.config.priority_lower_first {
                top - p
            } else {
                p
            });
        }
        body
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .config
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.config.max_backoff);
        base.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    fn transport(&self, message: impl Into<String>) -> AgentError {
        AgentError::Transport {
            backend: self.config.name.clone(),
            message: message.into(),
        }
    }

    /// Sends the request, retrying 429/5xx and connection failures; returns
    /// the successful response.
    async fn send(&self, body: &serde_json::Value) -> Result<reqwest::Response, AgentError> {
        let name = &self.config.name;
        let mut attempt = 0;
        loop {
            let mut req = self.client.post(&self.url).json(body);
            if let Some(key) = &self.config.api_key {
                req = req.bearer_auth(key);
            }
            let (error, wait) =
                match tokio::time::timeout(self.config.response_timeout, req.send()).await {
                    Err(_) => (
                        AgentError::Timeout {
                            what: format!("model backend `{name}` response"),
                            after: self.config.response_timeout,
                        },
                        None,
                    ),
                    Ok(Err(e)) => (self.transport(e.to_string()), None),
                    Ok(Ok(resp)) if resp.status().is_success() => return Ok(resp),
                    Ok(Ok(resp)) => {
                        let status = resp.status().as_u16();
                        let retry_after = retry_after(resp.headers());
                        let message = error_message(resp).await;
                        let retryable = status == 429 || status >= 500;
                        if !retryable {
                            return Err(AgentError::Backend {
                                backend: name.clone(),
                                status,
                                message,
                            });
                        }
                        if let Some(hint) = retry_after
                            && hint > self.config.max_retry_after
                        {
                            return Err(AgentError::Overloaded {
                                retry_after: hint,
                                reason: format!("`{name}` answered {status}: {message}"),
                            });
                        }
                        let error = if status == 429 {
                            AgentError::Overloaded {
                                retry_after: retry_after.unwrap_or(self.config.initial_backoff),
                                reason: format!("`{name}` answered 429: {message}"),
                            }
                        } else {
                            AgentError::Backend {
                                backend: name.clone(),
                                status,
                                message,
                            }
                        };
                        (error, retry_after)
                    }
                };
            if attempt >= self.config.max_retries {
                return Err(error);
            }
            let wait = wait.unwrap_or_else(|| self.backoff(attempt));
            metrics::counter!("troupe_model_retries_total", "backend" => name.clone()).increment(1);
            tracing::debug!(backend = %name, attempt, ?wait, %error, "retrying model request");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

/// One attachment as an OpenAI content part, its bytes as a data URL.
fn content_part(blob: &troupe_journal::BlobRef, data: &[u8]) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(data);
    let mt = blob.media_type.as_str();
    let audio = match mt {
        "audio/wav" | "audio/x-wav" | "audio/wave" => Some("wav"),
        "audio/mpeg" | "audio/mp3" => Some("mp3"),
        _ => None,
    };
    if mt.starts_with("image/") {
        json!({ "type": "image_url", "image_url": { "url": format!("data:{mt};base64,{b64}") } })
    } else if let Some(format) = audio {
        json!({ "type": "input_audio", "input_audio": { "data": b64, "format": format } })
    } else {
        let ext = mt.rsplit('/').next().unwrap_or("bin");
        json!({ "type": "file", "file": {
            "filename": format!("{}.{ext}", blob.hash.hex()),
            "file_data": format!("data:{mt};base64,{b64}"),
        } })
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The server's error message: `error.message` of a JSON body, else the
/// body's text (bounded).
async fn error_message(resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(b)) = stream.next().await {
        body.extend_from_slice(&b[..b.len().min(MAX_ERROR_BODY - body.len())]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => match &v["error"] {
            serde_json::Value::String(s) => s.clone(),
            e if e["message"].is_string() => e["message"].as_str().unwrap_or_default().to_owned(),
            _ => text,
        },
        Err(_) if text.trim().is_empty() => "(empty body)".into(),
        Err(_) => text,
    }
}

#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Vec<StreamChoice>,
    usage: Option<Usage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCallDelta>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: u32,
    id: Option<String>,
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[async_trait::async_trait]
impl ModelBackend for OpenAiBackend {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn accepts(&self, media_type: &str) -> bool {
        self.config
            .media
            .iter()
            .any(|m| !m.is_empty() && media_type.starts_with(m.as_str()))
    }

    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, AgentError> {
        let resp = self.send(&self.body(&request)).await?;
        let name = self.config.name.clone();
        let idle = self.config.idle_timeout;
        let cap = self.config.max_response_bytes;
        let mut received = 0usize;
        let bytes = resp.bytes_stream().map(move |r| {
            let b = r.map_err(std::io::Error::other)?;
            received += b.len();
            if received > cap {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::FileTooLarge,
                    "response too large",
                ));
            }
            Ok(b)
        });
        let mut events = bytes.eventsource();
        Ok(async_stream::try_stream! {
            let mut calls: BTreeMap<u32, ToolCall> = BTreeMap::new();
            let mut finish: Option<String> = None;
            let mut usage: Option<Usage> = None;
            let mut chunks = 0u32;
            loop {
                let next = tokio::time::timeout(idle, events.next()).await.map_err(|_| {
                    AgentError::Timeout { what: format!("model backend `{name}` stream"), after: idle }
                })?;
                let event = match next {
                    None => break,
                    Some(Ok(e)) => e,
                    Some(Err(EventStreamError::Transport(e)))
                        if e.kind() == std::io::ErrorKind::FileTooLarge =>
                    {
                        Err(AgentError::TooLarge { what: format!("response of `{name}`"), limit: cap })?
                    }
                    Some(Err(EventStreamError::Transport(e))) => {
                        Err(AgentError::Transport { backend: name.clone(), message: e.to_string() })?
                    }
                    Some(Err(e)) => Err(AgentError::MalformedChunk {
                        backend: name.clone(),
                        message: e.to_string(),
                        chunk: String::new(),
                    })?,
                };
                let data = event.data.trim();
                if data.is_empty() {
                    continue;
                }
                if data == "[DONE]" {
                    break;
                }
                let parsed: StreamChunk = serde_json::from_str(data).map_err(|e| {
                    AgentError::MalformedChunk { backend: name.clone(), message: e.to_string(), chunk: cut(data) }
                })?;
                if let Some(err) = parsed.error {
                    let message = err["message"].as_str().map(str::to_owned).unwrap_or_else(|| err.to_string());
                    Err(AgentError::Transport { backend: name.clone(), message: format!("error in stream: {message}") })?;
                }
                if parsed.usage.is_some() {
                    usage = parsed.usage;
                }
                for choice in parsed.choices {
                    for d in choice.delta.tool_calls {
                        let call = calls.entry(d.index).or_insert_with(|| ToolCall {
                            id: String::new(), name: String::new(), arguments: String::new(),
                        });
                        if let Some(id) = d.id { call.id = id; }
                        if let Some(f) = d.function {
                            if let Some(n) = f.name { call.name.push_str(&n); }
                            if let Some(a) = f.arguments { call.arguments.push_str(&a); }
                        }
                    }
                    if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                        chunks += 1;
                        yield Chunk::Text(text);
                    }
                    if choice.finish_reason.is_some() {
                        finish = choice.finish_reason;
                    }
                }
            }
            let Some(finish_reason) = finish else {
                Err(AgentError::StreamClosed { backend: name.clone(), chunks })?;
                unreachable!();
            };
            for (_, call) in std::mem::take(&mut calls) {
                if call.name.is_empty() {
                    Err(AgentError::MalformedChunk {
                        backend: name.clone(),
                        message: "tool call without a function name".into(),
                        chunk: cut(&call.arguments),
                    })?;
                }
                yield Chunk::ToolCall(call);
            }
            yield Chunk::Done { finish_reason, usage };
        }
        .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            "retry-after",
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
