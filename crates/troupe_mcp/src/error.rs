//! The crate's one error type.

use std::time::Duration;

/// What went wrong with an MCP server or one of its calls. Each variant
/// names the server.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The configuration cannot work; nothing was started.
    #[error("MCP server `{server}`: bad configuration: {message}")]
    Config {
        /// The server.
        server: String,
        /// What is wrong.
        message: String,
    },
    /// The child process could not be started.
    #[error("MCP server `{server}`: could not start `{program}`: {source}")]
    Spawn {
        /// The server.
        server: String,
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("MCP server `{server}`: HTTP client: {source}")]
    Http {
        /// The server.
        server: String,
        /// Why.
        #[source]
        source: reqwest_013::Error,
    },
    /// The initialization handshake failed.
    #[error("MCP server `{server}`: handshake failed: {source}{last_words}")]
    Handshake {
        /// The server.
        server: String,
        /// rmcp's error.
        #[source]
        source: Box<rmcp::service::ClientInitializeError>,
        /// A child's last lines of standard error (`; its last words: …`),
        /// or nothing.
        last_words: String,
    },
    /// A request to the server failed.
    #[error("MCP server `{server}`: {what} failed: {source}")]
    Request {
        /// The server.
        server: String,
        /// The request (`tools/list`, `tools/call echo`...).
        what: String,
        /// rmcp's error.
        #[source]
        source: Box<rmcp::ServiceError>,
    },
    /// Something did not finish in time.
    #[error("MCP server `{server}`: {what} did not finish within {after:?}")]
    Timeout {
        /// The server.
        server: String,
        /// What was waited for.
        what: String,
        /// The time-out.
        after: Duration,
    },
    /// The server is not connected now.
    #[error("MCP server `{server}` is down: {reason}")]
    Down {
        /// The server.
        server: String,
        /// Why (the last connection's end, or the last failed start).
        reason: String,
    },
    /// The server has no tool of that name (in its last listing).
    #[error("MCP server `{server}` has no tool `{tool}`")]
    UnknownTool {
        /// The server.
        server: String,
        /// The tool asked for.
        tool: String,
    },
    /// The arguments are not a JSON object.
    #[error("MCP server `{server}`: arguments of `{tool}` must be a JSON object, not {found}")]
    Arguments {
        /// The server.
        server: String,
        /// The tool.
        tool: String,
        /// What was given instead.
        found: &'static str,
    },
    /// The tool ran and reported an error (`isError`): the text is the
    /// server's.
    #[error("tool `{tool}` of MCP server `{server}` failed: {message}")]
    ToolFailed {
        /// The server.
        server: String,
        /// The tool.
        tool: String,
        /// The server's text.
        message: String,
    },
    /// A result past [`crate::McpServerConfig::max_result`].
    #[error(
        "MCP server `{server}`: the result of `{tool}` is {size} bytes, past the limit of {limit}"
    )]
    TooLarge {
        /// The server.
        server: String,
        /// The tool.
        tool: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl McpError {
    /// Whether trying again later may work (the server is down or slow, or
    /// its connection broke), as opposed to a call that will fail again.
    pub fn is_transient(&self) -> bool {
        match self {
            McpError::Down { .. } | McpError::Timeout { .. } | McpError::Spawn { .. } => true,
            McpError::Request { source, .. } => {
                !matches!(**source, rmcp::ServiceError::McpError(_))
            }
            McpError::Handshake { .. } => true,
            _ => false,
        }
    }
}
