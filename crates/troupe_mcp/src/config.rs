//! How to reach one MCP server, and the bounds of its connection.

use std::path::PathBuf;
use std::time::Duration;

use troupe_agent::tool::MAX_TOOL_RESULT;

use crate::error::McpError;

/// How the client reaches the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum McpTransport {
    /// A child process that speaks MCP on its standard input and output.
    /// Its standard error is read line by line into the log (`debug`), and
    /// its last lines are kept for the reason given when it exits.
    Stdio {
        /// The program (looked up in `PATH` when it has no slash).
        program: String,
        /// Its arguments.
        args: Vec<String>,
        /// Variables added to the environment it inherits.
        env: Vec<(String, String)>,
        /// Its working directory (the caller's when `None`).
        cwd: Option<PathBuf>,
    },
    /// Streamable HTTP: one endpoint, `POST` for requests and `GET` for the
    /// server's stream. `https://` is verified against the Web PKI roots.
    Http {
        /// The endpoint, `http://` or `https://`.
        url: String,
        /// Sent as `Authorization: Bearer …` when set.
        bearer: Option<String>,
    },
}

/// Delays between the starts of a connection that keeps ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay, doubled at each failure in a row.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// A connection that stayed up this long starts the next delay from
    /// `initial` again.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
        }
    }
}

/// One MCP server: its name, how to reach it, and every bound of its
/// connection. Built with [`McpServerConfig::stdio`] or
/// [`McpServerConfig::http`], then adjusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpServerConfig {
    /// Names the server in errors, logs, metrics and the status.
    pub name: String,
    /// How to reach it.
    pub transport: McpTransport,
    /// Put before each of its tools' names (to keep two servers' tools
    /// apart): `fs_` offers `read_file` as `fs_read_file`.
    pub prefix: String,
    /// Time-out of one call (the request is cancelled when it passes).
    pub call_timeout: Duration,
    /// Time to start, shake hands and list the tools.
    pub connect_timeout: Duration,
    /// Largest result given to the model, in bytes of text.
    pub max_result: usize,
    /// Largest message read from an HTTP server, in bytes.
    pub max_message: usize,
    /// Most tools taken from one listing.
    pub max_tools: usize,
    /// Delays between starts.
    pub backoff: Backoff,
    /// Failed starts in a row after which the server is given up
    /// ([`crate::McpStatus::Failed`]); `None` keeps trying.
    pub max_failures: Option<u32>,
    /// How often the connection is checked with a `ping`.
    pub health_interval: Duration,
}

impl McpServerConfig {
    fn new(name: &str, transport: McpTransport) -> Self {
        Self {
            name: name.to_owned(),
            transport,
            prefix: String::new(),
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(20),
            max_result: MAX_TOOL_RESULT,
            max_message: 4 * 1024 * 1024,
            max_tools: 256,
            backoff: Backoff::default(),
            max_failures: None,
            health_interval: Duration::from_secs(15),
        }
    }

    /// A server run as a child process, spoken to over stdio.
    pub fn stdio<I, S>(name: &str, program: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(
            name,
            McpTransport::Stdio {
                program: program.to_owned(),
                args: args.into_iter().map(Into::into).collect(),
                env: Vec::new(),
                cwd: None,
            },
        )
    }

    /// A server reached over Streamable HTTP at `url`.
    pub fn http(name: &str, url: &str) -> Self {
        Self::new(
            name,
            McpTransport::Http {
                url: url.to_owned(),
                bearer: None,
            },
        )
    }

    /// Adds a variable to a child process's environment (stdio only).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        if let McpTransport::Stdio { env, .. } = &mut self.transport {
            env.push((key.to_owned(), value.to_owned()));
        }
        self
    }

    /// Sets a child process's working directory (stdio only).
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        if let McpTransport::Stdio { cwd, .. } = &mut self.transport {
            *cwd = Some(dir.into());
        }
        self
    }

    /// Sends `Authorization: Bearer {token}` (HTTP only).
    pub fn bearer(mut self, token: &str) -> Self {
        if let McpTransport::Http { bearer, .. } = &mut self.transport {
            *bearer = Some(token.to_owned());
        }
        self
    }

    /// Puts `prefix` before each tool's name.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_owned();
        self
    }

    /// Sets the time-out of one call.
    pub fn call_timeout(mut self, t: Duration) -> Self {
        self.call_timeout = t;
        self
    }

    /// Sets the time to start, shake hands and list the tools.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Sets the largest result given to the model.
    pub fn max_result(mut self, bytes: usize) -> Self {
        self.max_result = bytes;
        self
    }

    /// Sets the largest message read from an HTTP server.
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// Sets the most tools taken from one listing.
    pub fn max_tools(mut self, n: usize) -> Self {
        self.max_tools = n;
        self
    }

    /// Sets the delays between starts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Gives up after `n` failed starts in a row.
    pub fn max_failures(mut self, n: u32) -> Self {
        self.max_failures = Some(n);
        self
    }

    /// Sets how often an idle connection is checked.
    pub fn health_interval(mut self, t: Duration) -> Self {
        self.health_interval = t;
        self
    }

    /// Checks what can be checked before anything starts.
    pub(crate) fn validate(&self) -> Result<(), McpError> {
        let bad = |message: String| McpError::Config {
            server: self.name.clone(),
            message,
        };
        let name_ok = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if self.name.is_empty() || self.name.len() > 64 || !name_ok(&self.name) {
            return Err(bad(
                "a server's name is 1 to 64 letters, digits, `_` or `-`".to_owned(),
            ));
        }
        if !name_ok(&self.prefix) || self.prefix.len() > 32 {
            return Err(bad(format!(
                "prefix `{}`: at most 32 letters, digits, `_` or `-`",
                self.prefix
            )));
        }
        for (what, d) in [
            ("call_timeout", self.call_timeout),
            ("connect_timeout", self.connect_timeout),
            ("health_interval", self.health_interval),
            ("backoff.initial", self.backoff.initial),
        ] {
            if d.is_zero() {
                return Err(bad(format!("{what} must not be zero")));
            }
        }
        if self.backoff.max < self.backoff.initial {
            return Err(bad("backoff.max is shorter than backoff.initial".to_owned()));
        }
        if self.max_result == 0 || self.max_message == 0 || self.max_tools == 0 {
            return Err(bad(
                "max_result, max_message and max_tools must not be zero".to_owned(),
            ));
        }
        match &self.transport {
            McpTransport::Stdio { program, .. } if program.is_empty() => {
                Err(bad("no program to run".to_owned()))
            }
            McpTransport::Http { url, .. }
                if !(url.starts_with("http://") || url.starts_with("https://")) =>
            {
                Err(bad(format!("`{url}` is not an http:// or https:// URL")))
            }
            McpTransport::Http {
                bearer: Some(token),
                ..
            } if token.is_empty() || token.chars().any(|c| c.is_control()) => Err(bad(
                "the bearer token is empty or holds control characters".to_owned(),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configurations_are_refused_with_what_is_wrong() {
        let ok = McpServerConfig::stdio("files", "node", ["server.js"]);
        assert!(ok.validate().is_ok());
        let cases = [
            (McpServerConfig::stdio("", "node", ["x"]), "name"),
            (McpServerConfig::stdio("a b", "node", ["x"]), "name"),
            (
                McpServerConfig::stdio("files", "", Vec::<String>::new()),
                "no program",
            ),
            (McpServerConfig::http("web", "ftp://x"), "not an http"),
            (
                McpServerConfig::http("web", "http://x").bearer(""),
                "bearer",
            ),
            (ok.clone().prefix("fs."), "prefix"),
            (ok.clone().call_timeout(Duration::ZERO), "call_timeout"),
            (ok.clone().max_tools(0), "max_tools"),
            (
                ok.clone().backoff(Backoff {
                    initial: Duration::from_secs(2),
                    max: Duration::from_secs(1),
                    reset_after: Duration::from_secs(1),
                }),
                "backoff.max",
            ),
        ];
        for (config, needle) in cases {
            match config.validate() {
                Err(e @ McpError::Config { .. }) => {
                    assert!(e.to_string().contains(needle), "{e} lacks {needle}")
                }
                other => panic!("{config:?}: {other:?}"),
            }
        }
    }
}
