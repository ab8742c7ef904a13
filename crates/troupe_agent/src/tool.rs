//! Typed tools: a name, a JSON schema of the arguments, an async handler.
//!
//! ```
//! use schemars::JsonSchema;
//! use serde::Deserialize;
//! use troupe_agent::Tool;
//!
//! #[derive(Deserialize, JsonSchema)]
//! struct Lookup {
//!     /// Invoice number.
//!     invoice: u32,
//! }
//!
//! let tool = Tool::new("lookup_invoice", "Finds an invoice", |a: Lookup| async move {
//!     Ok::<_, String>(format!("invoice {} is paid", a.invoice))
//! });
//! assert_eq!(tool.spec().parameters["required"][0], "invoice");
//! ```
//!
//! The schema is derived from the argument type with `schemars`, the
//! arguments are checked by deserializing into it (an error names the
//! field), and every call is bounded: argument and result sizes, and a
//! time-out. When an agent runs a turn, each call and each result is
//! journaled in the session.
//!
//! ## Tools that run once
//!
//! A tool call is journaled (`tool_called`) before its handler runs, and
//! its result (`tool_result`) as soon as it returns. A turn interrupted by
//! a crash is answered again by a new attempt, which never runs a call
//! whose result was journaled: the model gets the journaled result. A call
//! that started but whose result was not journaled is:
//!
//! | the tool | on the new attempt |
//! |---|---|
//! | repeatable (the default) | run again with the **same** [`ToolCallInfo::idempotency_key`], so the handler (or the service it calls) can recognise the repeat |
//! | [`Tool::at_most_once`] | not run: journaled as failed ("interrupted, not retried"), and the model is told |
//!
//! The key is `session/turn/round/index`, taken from the journal (the
//! round of the turn and the call's place in it), never from the model's
//! own call id. [`Tool::keyed`] gives the handler the key.
//!
//! ## Tools that come and go
//!
//! A [`ToolSource`] is a set of tools whose list changes while the system
//! runs: the tools of an MCP server (crate `troupe_mcp`), which appear when
//! it connects, change when it says so, and are not offered while it is
//! down. [`Tools::with_source`] adds one to an agent's tools; each request
//! to the model lists what the sources offer at that moment, and a call is
//! looked up when it runs ([`Tools::find`]). A tool of the agent's own wins
//! over a source's tool of the same name, and an earlier source over a
//! later one. Calls of a source's tools are bounded, checked and journaled
//! like any other.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::AgentError;
use crate::model::ToolSpec;

/// Largest argument text a tool accepts.
pub const MAX_TOOL_ARGUMENTS: usize = 64 * 1024;
/// Largest result a tool may return (JSON text).
pub const MAX_TOOL_RESULT: usize = 256 * 1024;
/// Default time-out of one call.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(30);

type Handler = Arc<
    dyn Fn(serde_json::Value, ToolCallInfo) -> BoxFuture<'static, Result<String, String>>
        + Send
        + Sync,
>;

/// Where a tool call comes from, given to [`Tool::keyed`] handlers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCallInfo {
    /// The session.
    pub session: String,
    /// The turn.
    pub turn: u32,
    /// The tool round in the turn, from 1.
    pub round: u32,
    /// The call's place in its round, from 0.
    pub index: u32,
    /// The attempt that runs it now (a repeat after a crash has a higher one).
    pub attempt: u32,
}

impl ToolCallInfo {
    /// `session/turn/round/index`: the same for every run of one journaled
    /// call, different for any two calls.
    pub fn idempotency_key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.session, self.turn, self.round, self.index
        )
    }
}

/// One tool. See the [module docs](self).
#[derive(Clone)]
pub struct Tool {
    spec: ToolSpec,
    handler: Handler,
    timeout: Duration,
    repeatable: bool,
    approval: Option<Duration>,
}

/// The longest an approval may be waited for (a deadline past it is cut
/// to it): 30 days.
pub const MAX_APPROVAL_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tool").field("spec", &self.spec).finish()
    }
}

impl Tool {
    /// A tool whose arguments are `A` (schema derived with `schemars`) and
    /// whose result `R` is returned to the model as JSON. The handler's
    /// `Err` is passed to the model as the tool's error.
    pub fn new<A, R, F, Fut>(name: &str, description: &str, handler: F) -> Self
    where
        A: DeserializeOwned + schemars::JsonSchema + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, String>> + Send + 'static,
    {
        Self::keyed(name, description, move |args: A, _call| handler(args))
    }

    /// Like [`Tool::new`], with a handler that is also given where the call
    /// comes from, its idempotency key included (see the [module docs](self)).
    pub fn keyed<A, R, F, Fut>(name: &str, description: &str, handler: F) -> Self
    where
        A: DeserializeOwned + schemars::JsonSchema + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(A, ToolCallInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, String>> + Send + 'static,
    {
        let parameters = serde_json::to_value(schemars::schema_for!(A))
            .unwrap_or_else(|_| serde_json::json!({"type": "object"}));
        let tool = name.to_owned();
        let handler = Arc::new(handler);
        let handler: Handler = Arc::new(move |value, call| {
            let args: Result<A, _> = serde_json::from_value(value);
            let (handler, tool) = (handler.clone(), tool.clone());
            async move {
                let args = args.map_err(|e| format!("bad arguments for `{tool}`: {e}"))?;
                let out = handler(args, call).await?;
                serde_json::to_string(&out).map_err(|e| format!("result not serializable: {e}"))
            }
            .boxed()
        });
        Self {
            spec: ToolSpec {
                name: name.to_owned(),
                description: description.to_owned(),
                parameters,
            },
            handler,
            timeout: DEFAULT_TOOL_TIMEOUT,
            repeatable: true,
            approval: None,
        }
    }

    /// A tool described by `spec` (its name, description and JSON schema,
    /// given as they are) whose handler takes the arguments as JSON. This
    /// is how tools that are not Rust types come in: an MCP server's, say
    /// (see [`ToolSource`]). The handler checks the arguments itself; an
    /// `Err` starting with ``bad arguments for `name`: `` is reported as
    /// [`AgentError::ToolArguments`], any other as [`AgentError::Tool`].
    pub fn from_spec<F, Fut>(spec: ToolSpec, handler: F) -> Self
    where
        F: Fn(serde_json::Value, ToolCallInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |value, call| handler(value, call).boxed());
        Self {
            spec,
            handler,
            timeout: DEFAULT_TOOL_TIMEOUT,
            repeatable: true,
            approval: None,
        }
    }

    /// Changes the time-out of one call.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Marks the tool as not safe to repeat (it sends a mail, charges a
    /// card): a call interrupted before its result was journaled is failed
    /// rather than run again (see the [module docs](self)).
    pub fn at_most_once(mut self) -> Self {
        self.repeatable = false;
        self
    }

    /// Whether an interrupted call may run again (with the same key).
    pub fn is_repeatable(&self) -> bool {
        self.repeatable
    }

    /// Makes each call of the tool wait for a person's decision, at most
    /// `deadline` (at most [`MAX_APPROVAL_WAIT`]) after the call was
    /// journaled: see [tool approvals](crate::session#tool-approvals).
    pub fn needs_approval(mut self, deadline: Duration) -> Self {
        self.approval = Some(deadline.min(MAX_APPROVAL_WAIT));
        self
    }

    /// How long a call may wait for its approval, if it needs one.
    pub fn approval(&self) -> Option<Duration> {
        self.approval
    }

    /// What the model sees.
    pub fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    /// Checks `arguments` (JSON text) and runs the tool. Bad arguments give
    /// [`AgentError::ToolArguments`] naming the problem; a handler error,
    /// [`AgentError::Tool`]; a result past [`MAX_TOOL_RESULT`],
    /// [`AgentError::TooLarge`].
    pub async fn call(&self, arguments: &str) -> Result<String, AgentError> {
        self.call_with(arguments, ToolCallInfo::default()).await
    }

    /// [`Tool::call`], telling the handler where the call comes from.
    pub async fn call_with(
        &self,
        arguments: &str,
        call: ToolCallInfo,
    ) -> Result<String, AgentError> {
        let name = &self.spec.name;
        if arguments.len() > MAX_TOOL_ARGUMENTS {
            return Err(AgentError::TooLarge {
                what: format!("arguments of tool `{name}`"),
                limit: MAX_TOOL_ARGUMENTS,
            });
        }
        let text = if arguments.trim().is_empty() {
            "{}"
        } else {
            arguments
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| AgentError::ToolArguments {
                tool: name.clone(),
                message: format!("not JSON: {e}"),
            })?;
        let result = tokio::time::timeout(self.timeout, (self.handler)(value, call))
            .await
            .map_err(|_| AgentError::Timeout {
                what: format!("tool `{name}`"),
                after: self.timeout,
            })?;
        let out = result.map_err(|message| {
            if let Some(m) = message.strip_prefix(&format!("bad arguments for `{name}`: ")) {
                AgentError::ToolArguments {
                    tool: name.clone(),
                    message: m.to_owned(),
                }
            } else {
                AgentError::Tool {
                    tool: name.clone(),
                    message,
                }
            }
        })?;
        if out.len() > MAX_TOOL_RESULT {
            return Err(AgentError::TooLarge {
                what: format!("result of tool `{name}`"),
                limit: MAX_TOOL_RESULT,
            });
        }
        Ok(out)
    }
}

/// Tools whose list changes while the system runs: an MCP server's, say.
/// See the [module docs](self#tools-that-come-and-go).
pub trait ToolSource: Send + Sync + 'static {
    /// What a model may call now, in a stable order (nothing while the
    /// source is down).
    fn list(&self) -> Vec<Tool>;

    /// The tool named `name`, when the source has it. A source that is
    /// down may still give the tools it last listed here, whose calls fail
    /// saying why, so that a call the model made just before it went down
    /// gets a clear error rather than "unknown tool".
    fn find(&self, name: &str) -> Option<Tool> {
        self.list().into_iter().find(|t| t.spec.name == name)
    }
}

/// The tools of one agent, by name, and the [`ToolSource`]s it draws on.
#[derive(Clone, Default)]
pub struct Tools {
    tools: BTreeMap<String, Tool>,
    sources: Vec<Arc<dyn ToolSource>>,
    approvals: BTreeMap<String, Duration>,
}

impl std::fmt::Debug for Tools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tools")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .field("sources", &self.sources.len())
            .finish()
    }
}

impl Tools {
    /// No tools.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tool (replacing one of the same name).
    pub fn with(mut self, tool: Tool) -> Self {
        self.tools.insert(tool.spec.name.clone(), tool);
        self
    }

    /// Adds a source of tools whose list changes while the system runs
    /// (see [`ToolSource`]).
    pub fn with_source(mut self, source: Arc<dyn ToolSource>) -> Self {
        self.sources.push(source);
        self
    }

    /// Makes the calls of the tool named `name` wait for approval (see
    /// [`Tool::needs_approval`]), whichever source offers it: how the tools
    /// of an MCP server are gated.
    pub fn needs_approval(mut self, name: &str, deadline: Duration) -> Self {
        self.approvals
            .insert(name.to_owned(), deadline.min(MAX_APPROVAL_WAIT));
        self
    }

    /// How long a call of `name` may wait for approval, if it needs one:
    /// the tool's own setting, else [`Tools::needs_approval`]'s.
    pub fn approval_for(&self, name: &str) -> Option<Duration> {
        let own = match self.tools.get(name) {
            Some(t) => t.approval(),
            None => self
                .sources
                .iter()
                .find_map(|s| s.find(name))
                .and_then(|t| t.approval()),
        };
        own.or_else(|| self.approvals.get(name).copied())
    }

    /// The agent's own tool named `name` (not a source's: see [`Tools::find`]).
    pub fn get(&self, name: &str) -> Option<&Tool> {
        self.tools.get(name)
    }

    /// The tool named `name`: the agent's own, or else the first source's
    /// that has one.
    pub fn find(&self, name: &str) -> Option<Tool> {
        if let Some(t) = self.tools.get(name) {
            return Some(t.clone());
        }
        self.sources.iter().find_map(|s| s.find(name))
    }

    /// What the model sees: the agent's own tools in name order, then what
    /// each source offers now (a name already listed is left out).
    pub fn specs(&self) -> Vec<ToolSpec> {
        let mut specs: Vec<ToolSpec> = self.tools.values().map(|t| t.spec.clone()).collect();
        if !self.sources.is_empty() {
            let mut seen: std::collections::BTreeSet<String> = self.tools.keys().cloned().collect();
            for source in &self.sources {
                for t in source.list() {
                    if seen.insert(t.spec.name.clone()) {
                        specs.push(t.spec);
                    }
                }
            }
        }
        specs
    }

    /// Whether there are none, and no source that could offer some.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty() && self.sources.is_empty()
    }

    /// Calls the tool named `name`.
    pub async fn call(&self, name: &str, arguments: &str) -> Result<String, AgentError> {
        self.call_with(name, arguments, ToolCallInfo::default())
            .await
    }

    /// Calls the tool named `name`, telling it where the call comes from.
    pub async fn call_with(
        &self,
        name: &str,
        arguments: &str,
        call: ToolCallInfo,
    ) -> Result<String, AgentError> {
        match self.find(name) {
            Some(t) => t.call_with(arguments, call).await,
            None => Err(AgentError::UnknownTool(name.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Args {
        invoice: u32,
    }

    fn tools() -> Tools {
        Tools::new()
            .with(Tool::new(
                "lookup",
                "finds an invoice",
                |a: Args| async move {
                    if a.invoice == 0 {
                        Err("invoice 0 does not exist".to_owned())
                    } else {
                        Ok(serde_json::json!({"invoice": a.invoice, "paid": true}))
                    }
                },
            ))
            .with(
                Tool::new("slow", "never answers in time", |_: Args| async move {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok::<_, String>(())
                })
                .timeout(Duration::from_millis(10)),
            )
    }

    #[tokio::test]
    async fn arguments_results_and_errors_are_typed() {
        let t = tools();
        assert_eq!(
            t.call("lookup", r#"{"invoice": 7}"#).await.unwrap(),
            r#"{"invoice":7,"paid":true}"#
        );
        let spec = &t.get("lookup").unwrap().spec().parameters;
        assert_eq!(spec["properties"]["invoice"]["type"], "integer");
        match t.call("lookup", "{}").await {
            Err(AgentError::ToolArguments { tool, message }) => {
                assert_eq!(tool, "lookup");
                assert!(message.contains("missing field `invoice`"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.call("lookup", "{not json").await,
            Err(AgentError::ToolArguments { .. })
        ));
        assert!(matches!(
            t.call("lookup", r#"{"invoice": 0}"#).await,
            Err(AgentError::Tool { message, .. }) if message.contains("does not exist")
        ));
        assert!(matches!(
            t.call("slow", r#"{"invoice": 1}"#).await,
            Err(AgentError::Timeout { .. })
        ));
        assert!(
            matches!(t.call("nope", "{}").await, Err(AgentError::UnknownTool(n)) if n == "nope")
        );
        let big = format!(
            r#"{{"invoice": 1, "pad": "{}"}}"#,
            "x".repeat(MAX_TOOL_ARGUMENTS)
        );
        assert!(matches!(
            t.call("lookup", &big).await,
            Err(AgentError::TooLarge { .. })
        ));
    }

    /// A source whose list the test changes.
    #[derive(Default)]
    struct Changing(std::sync::Mutex<Vec<Tool>>);

    impl ToolSource for Changing {
        fn list(&self) -> Vec<Tool> {
            self.0.lock().unwrap().clone()
        }
    }

    fn echo(name: &str, reply: &'static str) -> Tool {
        let spec = ToolSpec {
            name: name.to_owned(),
            description: "answers".to_owned(),
            parameters: serde_json::json!({"type": "object"}),
        };
        Tool::from_spec(
            spec,
            move |_args, _call| async move { Ok(reply.to_owned()) },
        )
    }

    #[tokio::test]
    async fn a_sources_tools_are_listed_and_called_as_they_are_now() {
        let source = Arc::new(Changing::default());
        let t = tools().with_source(source.clone());
        assert!(!t.is_empty());
        let names = |t: &Tools| t.specs().into_iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(names(&t), ["lookup", "slow"]);
        assert!(matches!(
            t.call("remote", "{}").await,
            Err(AgentError::UnknownTool(_))
        ));
        // The source comes up with two tools, one of them named like the
        // agent's own: the agent's own wins, the other is listed after.
        *source.0.lock().unwrap() = vec![
            echo("remote", "from the source"),
            echo("lookup", "shadowed"),
        ];
        assert_eq!(names(&t), ["lookup", "slow", "remote"]);
        assert_eq!(t.call("remote", "").await.unwrap(), "from the source");
        assert!(
            t.call("lookup", r#"{"invoice": 7}"#)
                .await
                .unwrap()
                .contains("paid")
        );
        // It goes down: nothing of it is offered any more.
        source.0.lock().unwrap().clear();
        assert_eq!(names(&t), ["lookup", "slow"]);
        assert!(t.find("remote").is_none());
    }
}
