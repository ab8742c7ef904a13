//! Structured output: a turn whose answer is a typed value, not free text.
//!
//! [`OutputSchema::of`] derives the JSON schema of a Rust type with
//! `schemars`, shaped for strict structured output (every object closed
//! with `additionalProperties: false`, every property listed in
//! `required`, optional fields nullable instead of absent), and keeps a
//! check that reads an answer into that type. [`Context::reply_as`]
//! sends the schema with each model call of the turn (as `response_format`
//! with `type: json_schema` and `strict: true` to OpenAI-compatible
//! servers) and checks the answer when it is complete:
//!
//! | the answer | what happens |
//! |---|---|
//! | JSON that reads into the type | the turn completes; [`Typed::value`] is the value |
//! | not JSON, or JSON that does not fit | `answer_rejected` is journaled with the field and the reason, the model is told what was wrong and asked again, at most [`AgentOptions::max_repairs`] times per turn (crashes included) |
//! | still not fitting after the last repair | the turn fails with [`AgentError::InvalidAnswer`], naming the field |
//!
//! The check is the type itself (serde, with the path of the failing
//! field from `serde_path_to_error`), so a value that passes always reads
//! back. A code fence around the JSON (```` ```json ````) is accepted.
//! A type whose schema is not an object (an enum, a number) is wrapped as
//! the `answer` property of an object, as strict mode needs an object at
//! the root; the wrapping is undone before the check.
//!
//! [`Context::reply_as`]: crate::Context::reply_as
//! [`AgentOptions::max_repairs`]: crate::AgentOptions::max_repairs

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::model::ResponseFormat;
use crate::{AgentError, TurnOutcome};

/// How a repair prompt begins (the local backend knows it is not a question).
pub(crate) const REPAIR_PREFIX: &str = "Your answer does not match the JSON schema";

/// Longest schema name servers accept.
const MAX_NAME: usize = 64;

/// Where an answer does not fit its schema, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Path of the field (`items[2].price`; `.` for the answer as a whole).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at `{}`: {}", self.field, self.message)
    }
}

type Check = dyn Fn(Value) -> Result<(), Mismatch> + Send + Sync;

/// The schema of a typed answer and the check that reads an answer into
/// its type. See the [module docs](self).
#[derive(Clone)]
pub struct OutputSchema {
    name: String,
    schema: Value,
    wrapped: bool,
    check: Arc<Check>,
}

impl std::fmt::Debug for OutputSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputSchema")
            .field("name", &self.name)
            .field("wrapped", &self.wrapped)
            .finish_non_exhaustive()
    }
}

impl OutputSchema {
    /// The schema of `T`, named after the type.
    pub fn of<T>() -> Self
    where
        T: DeserializeOwned + schemars::JsonSchema + 'static,
    {
        let mut schema = serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null);
        let name = schema_name(
            schema
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or_else(|| short_type_name::<T>()),
        );
        if let Value::Object(map) = &mut schema {
            map.remove("$schema");
        }
        let wrapped = schema.get("type").and_then(Value::as_str) != Some("object")
            || schema.get("properties").is_none();
        if wrapped {
            let defs = schema
                .as_object_mut()
                .and_then(|m| m.remove("$defs"))
                .unwrap_or(Value::Null);
            let mut root = serde_json::json!({
                "type": "object",
                "properties": { "answer": schema },
            });
            if !defs.is_null() {
                root["$defs"] = defs;
            }
            schema = root;
        }
        strictify(&mut schema);
        let check = move |value: Value| -> Result<(), Mismatch> {
            serde_path_to_error::deserialize::<_, T>(value)
                .map(drop)
                .map_err(|e| {
                    let path = e.path().to_string();
                    let message = e.into_inner().to_string();
                    // A missing field is reported at its parent: name it.
                    let field = match message
                        .strip_prefix("missing field `")
                        .and_then(|r| r.split('`').next())
                    {
                        Some(name) if path == "." => name.to_owned(),
                        Some(name) => format!("{path}.{name}"),
                        None => path,
                    };
                    Mismatch {
                        field,
                        message: bounded(message),
                    }
                })
        };
        Self {
            name,
            schema,
            wrapped,
            check: Arc::new(check),
        }
    }

    /// The schema's name (as sent in `response_format`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JSON schema sent to the model.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// What a [`crate::ChatRequest`] carries for this schema.
    pub fn response_format(&self) -> ResponseFormat {
        ResponseFormat {
            name: self.name.clone(),
            schema: self.schema.clone(),
            strict: true,
        }
    }

    /// Reads an answer: the JSON value of the type (unwrapped), or where it
    /// does not fit.
    pub fn validate(&self, text: &str) -> Result<Value, Mismatch> {
        let body = strip_fence(text);
        let mut value: Value = serde_json::from_str(body).map_err(|e| Mismatch {
            field: ".".into(),
            message: bounded(format!("not JSON: {e}")),
        })?;
        if self.wrapped {
            value = match value {
                Value::Object(mut m) => m.remove("answer"),
                _ => None,
            }
            .ok_or_else(|| Mismatch {
                field: "answer".into(),
                message: "missing field `answer`".into(),
            })?;
        }
        (self.check)(value.clone())?;
        Ok(value)
    }

    /// What the model is told after an answer that does not fit.
    pub fn repair_prompt(&self, mismatch: &Mismatch) -> String {
        format!(
            "{REPAIR_PREFIX} `{}` ({mismatch}). \
             Answer again with only a JSON value that matches the schema.",
            self.name
        )
    }
}

/// A typed answer and the turn it came from, from
/// [`Context::reply_as`](crate::Context::reply_as).
#[derive(Debug, Clone)]
pub struct Typed<T> {
    /// The answer.
    pub value: T,
    /// The turn (its `text` is the answer's JSON).
    pub outcome: TurnOutcome,
}

/// Reads a checked answer's JSON into `T`.
pub(crate) fn read<T: DeserializeOwned>(
    schema: &OutputSchema,
    outcome: &TurnOutcome,
    session: &str,
) -> Result<T, AgentError> {
    let invalid = |m: Mismatch| AgentError::InvalidAnswer {
        session: session.to_owned(),
        turn: outcome.turn.turn,
        schema: schema.name.clone(),
        field: m.field,
        message: m.message,
        attempts: 1,
    };
    let value = schema.validate(&outcome.text).map_err(invalid)?;
    serde_json::from_value(value).map_err(|e| {
        invalid(Mismatch {
            field: ".".into(),
            message: e.to_string(),
        })
    })
}

/// Longest reason kept for a misfit (serde quotes the offending value, which
/// the model may have made as long as its whole answer): it is journaled and
/// sent back to the model.
pub const MAX_MISMATCH_MESSAGE: usize = 512;

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MISMATCH_MESSAGE {
        let mut end = MAX_MISMATCH_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

/// Letters, digits, `_` and `-`, 1 to 64 of them.
fn schema_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME)
        .collect();
    if name.is_empty() {
        name.push_str("answer");
    }
    name
}

/// What strict structured output asks of a schema: every object closed,
/// every property required (optional ones are already nullable), `anyOf`
/// for `oneOf` (which strict mode does not take; schemars' enum variants
/// exclude each other anyway), and no number formats (`uint32`...) that
/// servers do not know.
fn strictify(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if let Some(options) = map.remove("oneOf") {
                map.insert("anyOf".into(), options);
            }
            if let Some(Value::Object(props)) = map.get("properties") {
                let keys: Vec<Value> = props.keys().cloned().map(Value::String).collect();
                map.insert("required".into(), Value::Array(keys));
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            let is_string = match map.get("type") {
                Some(Value::String(t)) => t == "string",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "string"),
                _ => false,
            };
            if !is_string {
                map.remove("format");
            }
            for (key, v) in map.iter_mut() {
                // Property names are not schemas, but their values are.
                if key == "properties" || key == "$defs" {
                    if let Value::Object(inner) = v {
                        inner.values_mut().for_each(strictify);
                    }
                } else {
                    strictify(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strictify),
        _ => {}
    }
}

/// The JSON inside a Markdown code fence, or the text itself.
fn strip_fence(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
    rest.strip_suffix("```").unwrap_or(rest).trim()
}

/// Where [`example_value`] gets the values it cannot derive from the
/// schema alone.
pub(crate) trait Fill {
    /// A string for property `property` (`""` for an array item or the
    /// root); `Value::Null` is allowed when `nullable`.
    fn string(&mut self, property: &str, nullable: bool) -> Value;
    /// One of an enum's `values`.
    fn choice(&mut self, values: &[Value]) -> Value;
}

/// A value that fits `schema` (a strict schema from [`OutputSchema`]):
/// what the deterministic local backend answers.
pub(crate) fn example_value(
    schema: &Value,
    defs: &Map<String, Value>,
    fill: &mut dyn Fill,
    property: &str,
    depth: u32,
) -> Value {
    if depth > 8 {
        return Value::Null;
    }
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or_default();
        return match defs.get(name) {
            Some(d) => example_value(d, defs, fill, property, depth + 1),
            None => Value::Null,
        };
    }
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(Value::Array(values)) = schema.get("enum") {
        return fill.choice(values);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(options)) = schema.get(key) {
            let is_null = |o: &&Value| o.get("type").and_then(Value::as_str) == Some("null");
            let nullable = options.iter().any(|o| is_null(&o));
            // Unit variants first (a choice), else the first that is not null.
            let units: Vec<Value> = options
                .iter()
                .filter_map(|o| o.get("const").cloned())
                .collect();
            if !units.is_empty() && units.len() == options.len() {
                return fill.choice(&units);
            }
            let Some(pick) = options.iter().find(|o| !is_null(o)).or(options.first()) else {
                return Value::Null;
            };
            if nullable && pick.get("type").and_then(Value::as_str) == Some("string") {
                return fill.string(property, true);
            }
            return example_value(pick, defs, fill, property, depth + 1);
        }
    }
    let (ty, nullable) = match schema.get("type") {
        Some(Value::String(t)) => (t.as_str(), false),
        Some(Value::Array(ts)) => (
            ts.iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null")
                .unwrap_or("null"),
            ts.iter().any(|t| t == "null"),
        ),
        _ => ("object", false),
    };
    match ty {
        "object" => {
            let mut out = Map::new();
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (k, v) in props {
                    out.insert(k.clone(), example_value(v, defs, fill, k, depth + 1));
                }
            }
            Value::Object(out)
        }
        "array" => {
            let min = schema
                .get("minItems")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .max(1);
            let item = schema.get("items").cloned().unwrap_or(Value::Null);
            Value::Array(
                (0..min.min(4))
                    .map(|_| example_value(&item, defs, fill, property, depth + 1))
                    .collect(),
            )
        }
        "string" => {
            let v = fill.string(property, nullable);
            let n = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
            match v {
                Value::String(mut s) => {
                    while (s.chars().count() as u64) < n {
                        s.push('.');
                    }
                    Value::String(s)
                }
                other => other,
            }
        }
        "integer" => {
            let min = schema.get("minimum").and_then(Value::as_i64).unwrap_or(1);
            let max = schema
                .get("maximum")
                .and_then(Value::as_i64)
                .unwrap_or(i64::MAX);
            Value::from(min.max(1).min(max))
        }
        "number" => {
            let min = schema.get("minimum").and_then(Value::as_f64).unwrap_or(1.0);
            Value::from(min.max(1.0))
        }
        "boolean" => Value::Bool(true),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, schemars::JsonSchema, PartialEq)]
    struct Line {
        sku: String,
        quantity: u32,
    }

    #[derive(Debug, Deserialize, schemars::JsonSchema, PartialEq)]
    enum Urgency {
        Low,
        High,
    }

    #[derive(Debug, Deserialize, schemars::JsonSchema, PartialEq)]
    struct Order {
        customer: String,
        lines: Vec<Line>,
        urgency: Urgency,
        note: Option<String>,
    }

    #[test]
    fn schema_is_strict_and_checks_name_the_field() {
        let s = OutputSchema::of::<Order>();
        assert_eq!(s.name(), "Order");
        let root = s.schema();
        assert_eq!(root["additionalProperties"], false);
        assert_eq!(
            root["required"],
            serde_json::json!(["customer", "lines", "urgency", "note"])
        );
        assert!(root.get("$schema").is_none());
        let line = &root["$defs"]["Line"];
        assert_eq!(line["additionalProperties"], false);
        assert!(line["properties"]["quantity"].get("format").is_none());

        let ok =
            r#"{"customer":"ada","lines":[{"sku":"a","quantity":2}],"urgency":"High","note":null}"#;
        assert!(s.validate(ok).is_ok());
        let fenced = format!("```json\n{ok}\n```");
        assert!(s.validate(&fenced).is_ok());

        let bad = r#"{"customer":"ada","lines":[{"sku":"a","quantity":-2}],"urgency":"High","note":null}"#;
        let m = s.validate(bad).unwrap_err();
        assert_eq!(m.field, "lines[0].quantity");
        let missing = r#"{"customer":"ada","lines":[],"note":null}"#;
        let m = s.validate(missing).unwrap_err();
        assert_eq!(m.field, "urgency", "{m}");
        let m = s.validate("Sure! Here it is.").unwrap_err();
        assert_eq!(m.field, ".");
        // A huge wrong value is not quoted whole in the journal.
        let huge = format!(
            r#"{{"customer":"ada","lines":[],"urgency":"{}","note":null}}"#,
            "x".repeat(100_000)
        );
        let m = s.validate(&huge).unwrap_err();
        assert_eq!(m.field, "urgency");
        assert!(
            m.message.len() <= MAX_MISMATCH_MESSAGE + 3,
            "{}",
            m.message.len()
        );
    }

    #[derive(Debug, Deserialize, schemars::JsonSchema, PartialEq)]
    enum Action {
        Refund { amount: u32 },
        Escalate(String),
        Close,
    }

    #[derive(Debug, Deserialize, schemars::JsonSchema, PartialEq)]
    struct Plan {
        action: Action,
    }

    #[test]
    fn enums_with_data_use_any_of() {
        let s = OutputSchema::of::<Plan>();
        let text = s.schema().to_string();
        assert!(!text.contains("oneOf"), "{text}");
        assert!(text.contains("anyOf"), "{text}");
        assert!(s.validate(r#"{"action":{"Refund":{"amount":3}}}"#).is_ok());
        assert!(s.validate(r#"{"action":"Close"}"#).is_ok());
        let m = s.validate(r#"{"action":{"Refund":{}}}"#).unwrap_err();
        assert!(m.field.starts_with("action"), "{m}");
    }

    #[test]
    fn non_object_types_are_wrapped() {
        let s = OutputSchema::of::<Urgency>();
        assert_eq!(s.schema()["type"], "object");
        assert_eq!(s.schema()["required"], serde_json::json!(["answer"]));
        assert_eq!(s.validate(r#"{"answer":"Low"}"#).unwrap(), "Low");
        assert_eq!(s.validate(r#""Low""#).unwrap_err().field, "answer");
    }

    #[test]
    fn example_values_fit_their_schema() {
        let s = OutputSchema::of::<Order>();
        struct Words(u32);
        impl Fill for Words {
            fn string(&mut self, property: &str, nullable: bool) -> Value {
                self.0 += 1;
                if nullable && self.0.is_multiple_of(2) {
                    Value::Null
                } else {
                    Value::String(format!("{property} {}", self.0))
                }
            }
            fn choice(&mut self, values: &[Value]) -> Value {
                values.last().cloned().unwrap_or(Value::Null)
            }
        }
        let defs = s.schema()["$defs"].as_object().cloned().unwrap_or_default();
        for n in 0..2 {
            let v = example_value(s.schema(), &defs, &mut Words(n), "", 0);
            assert!(s.validate(&v.to_string()).is_ok(), "{v}");
        }
    }
}
