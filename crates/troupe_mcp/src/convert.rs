//! MCP's shapes to Troupe's: a listed tool to a [`ToolSpec`], a call's
//! result to the text the model reads.

use rmcp::model::{CallToolResult, ContentBlock, ResourceContents};
use troupe_agent::ToolSpec;

/// Longest tool name a model API accepts (OpenAI's function names).
const MAX_NAME: usize = 64;

/// One listed tool, as offered to the model.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    /// The name the server knows it by.
    pub remote: String,
    /// What the model sees (the name with the prefix).
    pub spec: ToolSpec,
    /// Marked read-only or idempotent: safe to run again.
    pub repeatable: bool,
}

/// Why a listed tool is not offered.
pub(crate) fn unusable_name(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > MAX_NAME {
        Some("a tool name is 1 to 64 characters")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        Some("a tool name given to a model is letters, digits, `_` and `-`")
    } else {
        None
    }
}

/// The tool as the model sees it, or why it cannot be offered.
pub(crate) fn listed(prefix: &str, tool: &rmcp::model::Tool) -> Result<Listed, String> {
    let offered = format!("{prefix}{}", tool.name);
    if let Some(why) = unusable_name(&offered) {
        return Err(format!("`{offered}`: {why}"));
    }
    let description = tool
        .description
        .as_deref()
        .map(str::to_owned)
        .or_else(|| tool.title.clone())
        .unwrap_or_else(|| tool.name.to_string());
    let mut parameters = serde_json::Value::Object((*tool.input_schema).clone());
    if parameters.get("type").is_none() {
        parameters["type"] = "object".into();
    }
    let repeatable = tool
        .annotations
        .as_ref()
        .is_some_and(|a| a.read_only_hint == Some(true) || a.idempotent_hint == Some(true));
    Ok(Listed {
        remote: tool.name.to_string(),
        spec: ToolSpec {
            name: offered,
            description,
            parameters,
        },
        repeatable,
    })
}

/// The text of a result: its structured content as JSON when it has some,
/// else its content blocks one per line (text as it is; images, audio and
/// binary resources as a line naming them, since the model gets text).
/// `Err` when the server marked the result an error, with its text.
pub(crate) fn result_text(result: CallToolResult) -> Result<String, String> {
    let failed = result.is_error == Some(true);
    if !failed && let Some(structured) = &result.structured_content {
        return Ok(structured.to_string());
    }
    let mut lines: Vec<String> = Vec::with_capacity(result.content.len());
    for block in &result.content {
        lines.push(match block {
            ContentBlock::Text(t) => t.text.clone(),
            ContentBlock::Image(i) => {
                format!("[image {}, {} bytes]", i.mime_type, base64_len(&i.data))
            }
            ContentBlock::Audio(a) => {
                format!("[audio {}, {} bytes]", a.mime_type, base64_len(&a.data))
            }
            ContentBlock::Resource(r) => match &r.resource {
                ResourceContents::TextResourceContents { text, .. } => text.clone(),
                ResourceContents::BlobResourceContents {
                    uri,
                    mime_type,
                    blob,
                    ..
                } => format!(
                    "[resource {uri}, {}, {} bytes]",
                    mime_type.as_deref().unwrap_or("application/octet-stream"),
                    base64_len(blob)
                ),
                _ => "[resource of a kind this client does not know]".to_owned(),
            },
            ContentBlock::ResourceLink(link) => match &link.description {
                Some(d) => format!("[resource link {}: {d}]", link.uri),
                None => format!("[resource link {}]", link.uri),
            },
            _ => "[content of a kind this client does not know]".to_owned(),
        });
    }
    let text = lines.join("\n");
    if failed { Err(text) } else { Ok(text) }
}

/// Bytes that base64 text of this length decodes to (about).
fn base64_len(data: &str) -> usize {
    let padding = data.bytes().rev().take_while(|b| *b == b'=').count();
    (data.len() / 4 * 3).saturating_sub(padding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tool(value: serde_json::Value) -> rmcp::model::Tool {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn listed_tools_keep_their_schema_and_say_whether_they_repeat() {
        let t = tool(json!({
            "name": "get-sum",
            "description": "adds",
            "inputSchema": {"type": "object", "properties": {"a": {"type": "number"}}},
            "annotations": {"readOnlyHint": true}
        }));
        let l = listed("ev_", &t).unwrap();
        assert_eq!(l.remote, "get-sum");
        assert_eq!(l.spec.name, "ev_get-sum");
        assert_eq!(l.spec.parameters["properties"]["a"]["type"], "number");
        assert!(l.repeatable);
        let plain = tool(json!({"name": "send", "inputSchema": {"type": "object"}}));
        let l = listed("", &plain).unwrap();
        assert!(!l.repeatable, "no hints: not safe to run twice");
        assert_eq!(l.spec.description, "send");
        let dotted = tool(json!({"name": "fs.read", "inputSchema": {"type": "object"}}));
        assert!(listed("", &dotted).unwrap_err().contains("letters, digits"));
        let long = tool(json!({"name": "x".repeat(65), "inputSchema": {"type": "object"}}));
        assert!(listed("", &long).is_err());
    }

    #[test]
    fn results_become_text_and_errors_stay_errors() {
        let r: CallToolResult = serde_json::from_value(json!({
            "content": [
                {"type": "text", "text": "before"},
                {"type": "image", "data": "aGVsbG8=", "mimeType": "image/png"},
                {"type": "resource_link", "uri": "demo://r/1", "name": "r1"},
                {"type": "resource", "resource": {"uri": "demo://t", "text": "inline"}}
            ]
        }))
        .unwrap();
        assert_eq!(
            result_text(r).unwrap(),
            "before\n[image image/png, 5 bytes]\n[resource link demo://r/1]\ninline"
        );
        let s: CallToolResult = serde_json::from_value(json!({
            "content": [{"type": "text", "text": "{\"t\": 1}"}],
            "structuredContent": {"t": 1}
        }))
        .unwrap();
        assert_eq!(result_text(s).unwrap(), r#"{"t":1}"#);
        let e: CallToolResult = serde_json::from_value(json!({
            "content": [{"type": "text", "text": "no such city"}],
            "isError": true
        }))
        .unwrap();
        assert_eq!(result_text(e).unwrap_err(), "no such city");
    }
}
