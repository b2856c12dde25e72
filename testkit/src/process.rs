//! Child processes and their logs: [`Proc`] kills its child when dropped, and a detached
//! watchdog kills it when the test or benchmark dies without dropping it (SIGKILL, a timeout),
//! so no broker or relay outlives the run that started it.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process, SIGKILLed and reaped on drop (or [`Proc::kill`]), with a watchdog that
/// kills it if this process dies first.
pub struct Proc {
    /// The child itself, for its piped stdin, stdout or stderr.
    pub child: Child,
    watchdog: Option<Child>,
}

impl Proc {
    /// Spawns `cmd`; `name` is for the error message.
    pub fn spawn(name: &str, cmd: &mut Command) -> io::Result<Proc> {
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {name}: {e}")))?;
        // Best effort: without `setsid` or `sh` there is no watchdog, and only `Drop` kills.
        let watchdog = Command::new("setsid")
            .args([
                "sh",
                "-c",
                r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; kill -9 "$2" 2>/dev/null"#,
                "testkit-watchdog",
            ])
            .arg(std::process::id().to_string())
            .arg(child.id().to_string())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Ok(Proc { child, watchdog })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit until `deadline` (checking every 5 ms); None if still running then.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` (`TERM`, `STOP`, `CONT`, ...) with `kill`.
    pub fn signal(&self, sig: &str) -> io::Result<()> {
        signal(self.id(), sig)
    }

    /// SIGTERM and up to `grace` to exit; SIGKILL after that.
    pub fn terminate(&mut self, grace: Duration) {
        if self.try_wait().is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.id().to_string())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + grace;
            while self.try_wait().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// SIGKILL, then reaps the child and stops its watchdog (whose pid could be reused).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A log file's contents so far (lossy UTF-8; empty if it cannot be read).
pub(crate) fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

/// One log file for a child's stdout and stderr (appended to, so restarts keep the history).
pub(crate) fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log file");
    let err = file.try_clone().expect("clone log file");
    (Stdio::from(file), Stdio::from(err))
}

pub(crate) fn signal(pid: u32, sig: &str) -> io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("kill -{sig} {pid}: {status}")))
    }
}
