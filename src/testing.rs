//! A kit for testing your own agents (feature `test-util`).
//!
//! | you want to test | use |
//! |---|---|
//! | a turn's text and tool calls, the same on every run | [`LocalBackend`]: a deterministic model that calls tools on keywords |
//! | concurrency, time-outs, streams in flight | [`PacedBackend`]: a model that streams at a set pace, counts the streams it serves at once, and can hold them until enough are in flight |
//! | what your agents do when the journal fails | [`FaultyJournal`] with its [`FaultPlan`] |
//! | crash recovery with a real process killed by SIGKILL | [`Child`]: re-runs one of your tests as a child process and kills it |
//! | side effects counted outside the process that dies | [`Recorder`]: lines appended to a file, synced before the call returns |
//!
//! The book's chapter "Testing your agents" walks through a crash test.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
pub use troupe_agent::LocalBackend;
use troupe_agent::{AgentError, ChatRequest, Chunk, ChunkStream, ModelBackend, Usage};
pub use troupe_journal::{FaultPlan, FaultyJournal};

#[derive(Default)]
struct Pace {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    calls: AtomicUsize,
    released: std::sync::atomic::AtomicBool,
    changed: Notify,
}

/// A model that streams `tokens` chunks, the first after `first`, each
/// next after `between`, and counts the streams it serves at once. With
/// [`PacedBackend::hold_until`], every stream waits before its first chunk
/// until that many are in flight together (or until
/// [`PacedBackend::release`]): concurrency shown by structure, not timing.
#[derive(Clone)]
pub struct PacedBackend {
    name: String,
    tokens: usize,
    first: Duration,
    between: Duration,
    hold: Option<(usize, Duration)>,
    pace: Arc<Pace>,
}

impl PacedBackend {
    /// A backend named `name` with `tokens` chunks per reply.
    pub fn new(name: &str, tokens: usize, first: Duration, between: Duration) -> Self {
        Self {
            name: name.to_owned(),
            tokens: tokens.max(1),
            first,
            between,
            hold: None,
            pace: Arc::new(Pace::default()),
        }
    }

    /// Every stream waits before its first chunk until `n` streams are in
    /// flight at once, or `patience` has passed, or [`PacedBackend::release`].
    pub fn hold_until(mut self, n: usize, patience: Duration) -> Self {
        self.hold = Some((n, patience));
        self
    }

    /// Lets every held stream go.
    pub fn release(&self) {
        self.pace.released.store(true, Ordering::SeqCst);
        self.pace.changed.notify_waiters();
    }

    /// Streams being served now.
    pub fn in_flight(&self) -> usize {
        self.pace.in_flight.load(Ordering::SeqCst)
    }

    /// The most streams served at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.pace.max_in_flight.load(Ordering::SeqCst)
    }

    /// Streams started so far.
    pub fn calls(&self) -> usize {
        self.pace.calls.load(Ordering::SeqCst)
    }
}

/// Counts a stream in flight until dropped.
struct InFlight(Arc<Pace>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

#[async_trait::async_trait]
impl ModelBackend for PacedBackend {
    fn name(&self) -> &str {
        &self.name
    }

    async fn stream(&self, _request: ChatRequest) -> Result<ChunkStream, AgentError> {
        let pace = self.pace.clone();
        pace.calls.fetch_add(1, Ordering::SeqCst);
        let now = pace.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        pace.max_in_flight.fetch_max(now, Ordering::SeqCst);
        pace.changed.notify_waiters();
        let guard = InFlight(pace.clone());
        let (tokens, first, between, hold) = (self.tokens, self.first, self.between, self.hold);
        let stream = async_stream::stream! {
            let _guard = guard;
            if let Some((n, patience)) = hold {
                let wait = async {
                    loop {
                        let changed = pace.changed.notified();
                        if pace.max_in_flight.load(Ordering::SeqCst) >= n
                            || pace.released.load(Ordering::SeqCst)
                        {
                            return;
                        }
                        changed.await;
                    }
                };
                let _ = tokio::time::timeout(patience, wait).await;
            }
            for i in 0..tokens {
                tokio::time::sleep(if i == 0 { first } else { between }).await;
                yield Ok(Chunk::Text(if i == 0 { "token".to_owned() } else { " token".to_owned() }));
            }
            yield Ok(Chunk::Done {
                finish_reason: "stop".into(),
                usage: Some(Usage { prompt_tokens: 1, completion_tokens: tokens as u32 }),
            });
        };
        Ok(stream.boxed())
    }
}

/// Lines appended to a file, each synced to disk before
/// [`Recorder::record`] returns: what a process did, counted outside it, so
/// that a test can read it after the process was killed. It deduplicates
/// nothing.
#[derive(Clone)]
pub struct Recorder {
    path: PathBuf,
    file: Arc<Mutex<std::fs::File>>,
}

impl Recorder {
    /// Opens (or creates) the file at `path` for appending.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.as_ref())?;
        Ok(Self {
            path: path.as_ref().to_owned(),
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Appends `line` and syncs it.
    pub fn record(&self, line: &str) -> std::io::Result<()> {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(format!("{line}\n").as_bytes())?;
        f.sync_data()
    }

    /// Every line recorded so far (by any process).
    pub fn lines(&self) -> std::io::Result<Vec<String>> {
        read_lines(&self.path)
    }
}

/// The lines of the file at `path` (none if it does not exist).
pub fn read_lines(path: impl AsRef<Path>) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// A child process running one test of the current test binary: spawn it,
/// read what it prints line by line, and kill it with SIGKILL.
///
/// Write the child's body as an `#[ignore]`d test that returns at once
/// unless an environment variable of yours is set, and start it from the
/// real test with [`Child::spawn`] and that variable: the body then runs in
/// a process of its own that the test can kill at any moment.
pub struct Child {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
    prefix: String,
}

impl Child {
    /// Runs the ignored test `name` of this binary with `env` set.
    pub fn spawn(name: &str, env: &[(&str, String)]) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args([
            name,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut process = cmd.spawn()?;
        let stdout = process
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("the child has no stdout"))?;
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            process,
            lines,
            reader: Some(reader),
            prefix: format!("{name} ... "),
        })
    }

    fn clean(&self, line: String) -> String {
        // libtest prints `test NAME ... ` before the child's first line.
        match line.split_once(&self.prefix) {
            Some((_, rest)) => rest.to_owned(),
            None => line,
        }
    }

    /// The next line, or `None` once the child has exited; panics if none
    /// comes within `patience` (the child is stuck).
    pub fn next_line(&self, patience: Duration) -> Option<String> {
        match self.lines.recv_timeout(patience) {
            Ok(line) => Some(self.clean(line)),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("child made no progress for {patience:?}")
            }
        }
    }

    /// The lines printed so far and not read yet, without waiting.
    pub fn ready_lines(&self) -> VecDeque<String> {
        self.lines.try_iter().map(|l| self.clean(l)).collect()
    }

    /// SIGKILL. Returns whether the child was still running when it was
    /// killed (a kill that finds it gone has tested nothing).
    pub fn kill(&mut self) -> bool {
        let running = matches!(self.process.try_wait(), Ok(None));
        let _ = self.process.kill();
        running
    }

    /// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`, ...).
    pub fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        let pid = libc::pid_t::try_from(self.process.id()).map_err(std::io::Error::other)?;
        // SAFETY: kill(2) takes plain integers; the child is ours and not
        // reaped yet, so its pid is not reused.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Waits for the child to exit (kill it first to stop it) and returns
    /// the lines not read yet.
    pub fn finish(mut self) -> Vec<String> {
        let _ = self.process.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let rest: Vec<String> = self.lines.try_iter().collect();
        rest.into_iter().map(|l| self.clean(l)).collect()
    }
}

impl Drop for Child {
    /// A child is never left running: it is killed when dropped.
    fn drop(&mut self) {
        if let Ok(None) = self.process.try_wait() {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

/// A fresh temporary directory (removed when dropped).
pub fn temp_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("troupe-test-").tempdir()
}
