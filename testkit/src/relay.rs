//! The relay binary: finding it, its config, one-shot commands and `outbox-relay run` as a
//! child process.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::http::http_get;
use crate::process::{log_stdio, read_log, tail, Proc};
use crate::{LOG_TAIL_LINES, POLL};

/// The binary's name, as cargo builds it.
const BIN: &str = "outbox-relay";

/// The `outbox-relay` binary cargo built for the running test or benchmark: the path in
/// `CARGO_BIN_EXE_outbox-relay` or `NEXTEST_BIN_EXE_outbox-relay` when the runner sets it at run
/// time, else the binary next to the test's own directory (`target/<profile>/deps/TEST` →
/// `target/<profile>/outbox-relay`), where cargo puts it before it runs any integration test or
/// benchmark of this package.
pub fn relay_bin() -> PathBuf {
    static BIN_PATH: OnceLock<PathBuf> = OnceLock::new();
    BIN_PATH
        .get_or_init(|| {
            let from_env = ["CARGO_BIN_EXE_", "NEXTEST_BIN_EXE_"]
                .iter()
                .filter_map(|prefix| std::env::var_os(format!("{prefix}{BIN}")))
                .map(PathBuf::from)
                .find(|p| p.is_file());
            let exe = std::env::current_exe().expect("the test's own path");
            from_env
                .or_else(|| Some(bin_beside(&exe)).filter(|p| p.is_file()))
                .unwrap_or_else(|| {
                    panic!(
                        "{BIN} binary not found next to {}: run through `cargo test`, \
                         `cargo nextest` or `cargo bench`, which build it",
                        exe.display()
                    )
                })
        })
        .clone()
}

/// Where cargo puts the package's binary for the test or bench executable `exe`.
fn bin_beside(exe: &Path) -> PathBuf {
    let dir = exe.parent().unwrap_or(Path::new("."));
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    profile_dir.join(format!("{BIN}{}", std::env::consts::EXE_SUFFIX))
}

/// A standard relay config: logical mode creating its slot and publication, default topics,
/// HTTP on 127.0.0.1:`http_port`. Tables not defined here (`[kafka.properties]`,
/// `[source.columns]`) can be appended; other keys can be overridden through
/// `OUTBOX_RELAY_<SECTION>_<KEY>` in [`Relay::start`]'s `extra_env`.
pub fn relay_config(
    pg_url: &str,
    brokers: &str,
    slot: &str,
    publication: &str,
    http_port: u16,
) -> String {
    format!(
        r#"[postgres]
url = "{pg_url}"

[source]
mode = "logical"
slot = "{slot}"
publication = "{publication}"
create = true

[kafka]
brokers = "{brokers}"

[http]
listen = "127.0.0.1:{http_port}"

[log]
level = "info"
"#
    )
}

/// A `Command` for the relay binary with `--config FILE`, isolated from the test process's
/// own `OUTBOX_RELAY_*` variables (except the Postgres bin dir).
fn relay_command(args: &[&str], config_path: &Path, extra_env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(relay_bin());
    cmd.args(args).arg("--config").arg(config_path);
    for (name, _) in std::env::vars_os() {
        let name_str = name.to_string_lossy();
        if name_str.starts_with("OUTBOX_RELAY_") && name_str != "OUTBOX_RELAY_PG_BIN" {
            cmd.env_remove(&name);
        }
    }
    // Plain log lines, so tests can search them.
    cmd.env("NO_COLOR", "1");
    cmd.envs(extra_env.iter().copied()).stdin(Stdio::null());
    cmd
}

fn write_config(dir: &Path, config_toml: &str) -> PathBuf {
    let path = dir.join("outbox-relay.toml");
    let mut f = File::create(&path).expect("write config");
    f.write_all(config_toml.as_bytes()).expect("write config");
    path
}

/// Runs a one-shot relay command (`init`, `check`, `status`) to completion.
pub fn relay_cli(args: &[&str], config_toml: &str, extra_env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), config_toml);
    relay_command(args, &config, extra_env)
        .output()
        .expect("run outbox-relay")
}

/// `outbox-relay run` as a child process; killed (SIGKILL) on drop.
pub struct Relay {
    proc: Proc,
    dir: tempfile::TempDir,
    log_path: PathBuf,
}

impl Relay {
    /// Writes `config_toml` to a file and starts `outbox-relay run --config FILE` with
    /// `extra_env`, stdout and stderr going to a log file. Returns at once: wait for readiness
    /// with [`Relay::wait_ready`].
    pub fn start(config_toml: &str, extra_env: &[(&str, &str)]) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("relay-")
            .tempdir()
            .expect("tempdir");
        Self::start_in(dir, config_toml, extra_env)
    }

    /// [`Relay::start`] with its config and log in `dir` (deleted with the relay unless the
    /// caller disabled that).
    pub fn start_in(
        dir: tempfile::TempDir,
        config_toml: &str,
        extra_env: &[(&str, &str)],
    ) -> Relay {
        let config = write_config(dir.path(), config_toml);
        let log_path = dir.path().join("relay.log");
        let (out, err) = log_stdio(&log_path);
        let proc = Proc::spawn(
            BIN,
            relay_command(&["run"], &config, extra_env)
                .stdout(out)
                .stderr(err),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Relay {
            proc,
            dir,
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Crashes the relay: SIGKILL, then reaps it.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    /// Asks for a graceful shutdown (SIGTERM); see [`Relay::wait_exit`].
    pub fn sigterm(&self) {
        self.proc.signal("TERM").expect("SIGTERM relay");
    }

    /// SIGTERM and up to `grace` for a graceful exit; SIGKILL after that.
    pub fn terminate(&mut self, grace: Duration) {
        self.proc.terminate(grace);
    }

    /// The exit status if the relay has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.proc.try_wait()
    }

    /// Waits up to `timeout` for the relay to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.proc.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `GET /readyz` on `http_port` answers 200; panics with the log tail if the
    /// relay exits or `timeout` passes first.
    pub fn wait_ready(&mut self, http_port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.proc.try_wait() {
                panic!("relay exited ({status}) before ready:\n{}", self.log_tail());
            }
            if matches!(http_get(http_port, "/readyz"), Ok((200, _))) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "relay not ready on port {http_port} after {timeout:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.try_wait().is_none()
    }

    /// Everything the relay printed so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// The last lines of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log(), LOG_TAIL_LINES)
    }

    /// The directory holding the config and log files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_is_looked_up_beside_the_deps_directory() {
        assert_eq!(
            bin_beside(Path::new("/t/target/debug/deps/logical-0123abcd")),
            PathBuf::from(format!(
                "/t/target/debug/{BIN}{}",
                std::env::consts::EXE_SUFFIX
            ))
        );
        assert_eq!(
            bin_beside(Path::new("/t/target/release/relay-0123abcd")),
            PathBuf::from(format!(
                "/t/target/release/{BIN}{}",
                std::env::consts::EXE_SUFFIX
            ))
        );
    }
}
