//! Child processes for the crash tests: each re-runs one ignored test of
//! its own binary as a child (the process to kill) and reads its stdout
//! line by line.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A running child test process.
pub struct Child {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
    prefix: String,
}

impl Child {
    /// Runs the ignored test `name` of this binary with `env` set.
    pub fn spawn(name: &str, env: &[(&str, String)]) -> Self {
        let exe = std::env::current_exe().expect("test binary");
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
        let mut process = cmd.spawn().expect("spawn child");
        let stdout = process.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            process,
            lines,
            reader: Some(reader),
            prefix: format!("{name} ... "),
        }
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

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill().expect("SIGKILL");
    }

    /// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`, ...).
    #[allow(dead_code)] // not every test binary pauses its children
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.process.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) takes plain integers; the child is ours and not
        // reaped yet, so its pid is not reused.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits for the child to exit (kill it first to stop it) and returns
    /// the lines not read yet.
    pub fn finish(mut self) -> Vec<String> {
        self.process.wait().expect("reap");
        if let Some(r) = self.reader.take() {
            r.join().expect("reader");
        }
        let rest: Vec<String> = self.lines.try_iter().collect();
        rest.into_iter().map(|l| self.clean(l)).collect()
    }
}
