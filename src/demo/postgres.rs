//! Throwaway Postgres clusters for the `demo` command; the test kit (`testkit/`) re-uses them
//! for the integration tests and the benchmark.
//!
//! Each [`ThrowawayPostgres`] is a fresh `initdb` in its own directory under `/tmp`, listening
//! on 127.0.0.1 at a free port with trust authentication and `wal_level = logical`, tuned for
//! speed over durability (`fsync = off`). It is stopped and deleted on drop.
//!
//! Only the standard library is used: the cluster is driven through the Postgres binaries
//! (`initdb`, `pg_ctl`, `pg_isready`, `psql`), found by [`postgres_bin_dir`]. Those refuse to
//! run as root, so when this process is root (CI containers) the directory is handed to the
//! `postgres` OS user and every server binary runs through `runuser -u postgres`.

use std::fmt;
use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::install::{postgres_bin_dir, running_as_root, POSTGRES_OS_USER};

/// How long a start (or restart) may take before it is reported as failed. Generous because CI
/// machines are slow and shared.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Attempts at starting on a fresh port when the previous one was taken in the meantime (the
/// port is free when picked, but another process may bind it before the server does).
const PORT_ATTEMPTS: usize = 5;

/// Unix socket paths are limited to 107 bytes; the socket file name adds `/.s.PGSQL.65535`.
const MAX_SOCKET_DIR_LEN: usize = 90;

/// Settings every throwaway cluster gets, before the caller's [`PostgresOptions`]. `fsync` and
/// `full_page_writes` are off because a throwaway cluster is never recovered after an OS crash.
/// `synchronous_commit` stays on: logical decoding only sends WAL that is flushed, so with async
/// commit every event would wait up to `wal_writer_delay` (200 ms) before the relay could see
/// it; with `fsync = off` a synchronous commit costs only a `write()`.
const BASE_SETTINGS: [(&str, &str); 11] = [
    ("listen_addresses", "127.0.0.1"),
    ("wal_level", "logical"),
    ("max_wal_senders", "20"),
    ("max_replication_slots", "20"),
    ("fsync", "off"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
    ("shared_buffers", "128MB"),
    ("logging_collector", "off"),
    ("log_line_prefix", "%m [%p] %q%u@%d "),
];

/// Extra `postgresql.conf` settings, applied after (so overriding) the defaults, and an
/// optional replacement for `pg_hba.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostgresOptions {
    /// `(name, value)` pairs, e.g. `("wal_level", "replica")`.
    pub settings: Vec<(String, String)>,
    /// The whole `pg_hba.conf`, instead of the default that trusts local and loopback
    /// connections (e.g. `hostssl` lines only, to refuse unencrypted TCP).
    pub hba: Option<String>,
}

impl PostgresOptions {
    /// Adds one setting; later settings win.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Replaces `pg_hba.conf` with `text`. The harness's own tools (`psql`, `pg_isready`)
    /// connect over TCP to 127.0.0.1 with libpq's default `sslmode=prefer`, so `hostssl`
    /// lines admit them when the server has TLS.
    pub fn hba(mut self, text: impl Into<String>) -> Self {
        self.hba = Some(text.into());
        self
    }
}

/// A running throwaway cluster; stopped (immediately) and deleted on drop.
pub struct ThrowawayPostgres {
    /// Directory created for this cluster: holds the data dir and the Unix socket.
    root: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    /// Run server binaries through `runuser -u postgres` (this process is root).
    as_postgres_user: bool,
    /// Stops and deletes the cluster if this process dies without dropping it.
    watchdog: Option<Child>,
}

impl fmt::Debug for ThrowawayPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrowawayPostgres")
            .field("data_dir", &self.data_dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl ThrowawayPostgres {
    /// Starts a cluster ready for logical replication.
    pub fn start() -> io::Result<Self> {
        Self::start_with(&PostgresOptions::default())
    }

    /// Starts a cluster with extra settings (e.g. `wal_level = replica` to test the relay's
    /// misconfiguration error).
    pub fn start_with(opts: &PostgresOptions) -> io::Result<Self> {
        let bin_dir = postgres_bin_dir()?;
        let as_postgres_user = running_as_root();
        let root = create_root_dir(as_postgres_user)?;
        let mut pg = ThrowawayPostgres {
            data_dir: root.join("data"),
            log_file: root.join("data").join("server.log"),
            root,
            bin_dir,
            port: 0,
            as_postgres_user,
            watchdog: None,
        };
        // From here on, dropping `pg` removes the directory (and stops a started server).
        pg.init()?;
        let base_conf = std::fs::read_to_string(pg.data_dir.join("postgresql.conf"))?;
        std::fs::write(
            pg.data_dir.join("pg_hba.conf"),
            opts.hba.as_deref().unwrap_or(PG_HBA),
        )?;

        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            pg.port = free_port()?;
            let conf = format!(
                "{base_conf}\n{}",
                render_settings(&pg.settings(opts.settings.iter()))
            );
            std::fs::write(pg.data_dir.join("postgresql.conf"), conf)?;
            let log_len_before = file_len(&pg.log_file);
            match pg.pg_ctl_start() {
                Ok(()) => {
                    pg.watchdog = pg.spawn_watchdog();
                    return Ok(pg);
                }
                Err(err) => {
                    let new_log = read_from(&pg.log_file, log_len_before);
                    if !port_taken(&new_log) {
                        return Err(err);
                    }
                    last_err = Some(err);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("postgres did not start")))
    }

    /// The TCP port on 127.0.0.1; stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq-style URL for `database` as the superuser `postgres` (trust authentication).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the Postgres binaries in use (for `pg_recvlogical`, `pgbench`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server log so far, for test failure messages.
    pub fn server_log(&self) -> String {
        read_from(&self.log_file, 0)
    }

    /// Runs `sql` with `psql` (stop on the first error, unaligned, tuples only, quiet) and
    /// returns its output without the trailing newline. The script may hold several statements
    /// and psql meta-commands. Fails with psql's stderr.
    pub fn psql(&self, database: &str, sql: &str) -> io::Result<String> {
        let mut child = self
            .psql_command(database)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let script = sql.to_owned();
        // A separate writer so a large script cannot deadlock against a large result.
        let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
        let output = child.wait_with_output()?;
        let written = writer.join().unwrap_or(Ok(()));
        let result = psql_result(output, database);
        if result.is_ok() {
            written?;
        }
        result
    }

    /// Runs an SQL file with `psql -f` (same options and result as [`Self::psql`]).
    pub fn psql_file(&self, database: &str, file: &Path) -> io::Result<String> {
        let output = self
            .psql_command(database)
            .arg("-f")
            .arg(file)
            .stdin(Stdio::null())
            .output()?;
        psql_result(output, database)
    }

    /// Creates a database owned by `postgres`.
    pub fn create_database(&self, name: &str) -> io::Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )
        .map(drop)
    }

    /// Restarts the server (`pg_ctl restart -m fast`) on the same port and waits until it
    /// accepts connections. Open connections are terminated.
    pub fn restart(&self) -> io::Result<()> {
        self.pg_ctl(&["restart", "-m", "fast"])?;
        self.wait_ready()
    }

    /// Stops the server (`pg_ctl stop -m fast`); [`Self::start_again`] brings it back.
    pub fn stop(&self) -> io::Result<()> {
        self.pg_ctl(&["stop", "-m", "fast"]).map(drop)
    }

    /// Starts a server stopped with [`Self::stop`], on the same port.
    pub fn start_again(&self) -> io::Result<()> {
        self.pg_ctl_start()
    }

    fn init(&self) -> io::Result<()> {
        let output = self
            .server_command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync"])
            .output()?;
        if output.status.success() {
            Ok(())
        } else {
            Err(command_error("initdb", &output))
        }
    }

    fn settings<'a>(
        &'a self,
        extra: impl Iterator<Item = &'a (String, String)>,
    ) -> Vec<(String, String)> {
        let mut settings: Vec<(String, String)> = BASE_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        settings.push(("port".into(), self.port.to_string()));
        settings.push((
            "unix_socket_directories".into(),
            self.root.to_string_lossy().into_owned(),
        ));
        settings.extend(extra.cloned());
        settings
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        self.pg_ctl(&["start", "-t", "60"])?;
        self.wait_ready()
    }

    /// Runs `pg_ctl <args> -D data -l log -w`; the error carries the tail of the server log.
    fn pg_ctl(&self, args: &[&str]) -> io::Result<Output> {
        let output = self
            .server_command("pg_ctl")
            .args(args)
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .arg("-w")
            // pg_ctl's server child redirects its output to the log; nothing may inherit ours.
            .stdin(Stdio::null())
            .output()?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(self.with_log_tail(command_error(&format!("pg_ctl {}", args[0]), &output)))
        }
    }

    /// Polls `pg_isready` over TCP until the server accepts connections.
    fn wait_ready(&self) -> io::Result<()> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            let status = Command::new(self.bin_dir.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
                .args(["-t", "2"])
                .arg("-p")
                .arg(self.port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.with_log_tail(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "postgres on port {} not ready after {:?}",
                        self.port, READY_DEADLINE
                    ),
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn psql_command(&self, database: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("psql"));
        clear_libpq_env(&mut cmd);
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// A command for a server binary, as the `postgres` OS user when this process is root.
    fn server_command(&self, program: &str) -> Command {
        let program = self.bin_dir.join(program);
        let mut cmd = if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", POSTGRES_OS_USER, "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        };
        clear_libpq_env(&mut cmd);
        // The caller's working directory may not be readable by the postgres user, and English
        // messages let `port_taken` recognise a bind failure.
        cmd.current_dir(&self.root)
            .env("LC_ALL", "C")
            .env_remove("PGDATA");
        cmd
    }

    /// Starts a detached shell that waits for this process to exit and then stops and deletes
    /// the cluster: a test killed by a timeout or SIGKILL never runs `Drop`, and orphaned
    /// clusters would pile up. `Drop` kills the watchdog. Best effort: `None` if `setsid` or
    /// `sh` is missing.
    fn spawn_watchdog(&self) -> Option<Child> {
        const SCRIPT: &str = r#"
            while kill -0 "$1" 2>/dev/null; do sleep 1; done
            if [ "$4" = runuser ]; then
                runuser -u "$5" -- "$6" stop -m immediate -D "$2" >/dev/null 2>&1
            else
                "$6" stop -m immediate -D "$2" >/dev/null 2>&1
            fi
            rm -rf "$3"
        "#;
        Command::new("setsid")
            .args(["sh", "-c", SCRIPT, "outbox-pg-watchdog"])
            .arg(std::process::id().to_string())
            .arg(&self.data_dir)
            .arg(&self.root)
            .arg(if self.as_postgres_user {
                "runuser"
            } else {
                "direct"
            })
            .arg(POSTGRES_OS_USER)
            .arg(self.bin_dir.join("pg_ctl"))
            // Not in our directory: the root must stay deletable while the watchdog runs.
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    }

    fn with_log_tail(&self, err: io::Error) -> io::Error {
        let log = self.server_log();
        io::Error::new(
            err.kind(),
            format!(
                "{err}\n--- last lines of {} ---\n{}",
                self.log_file.display(),
                tail_lines(&log, 30)
            ),
        )
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if self.data_dir.join("postmaster.pid").exists() {
            let _ = self
                .server_command("pg_ctl")
                .args(["stop", "-m", "immediate", "-w", "-t", "30", "-D"])
                .arg(&self.data_dir)
                .stdin(Stdio::null())
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Access for local connections and for TCP from loopback, including replication.
const PG_HBA: &str = "\
# throwaway cluster: trust from this machine only
local all         all                trust
local replication all                trust
host  all         all  127.0.0.1/32  trust
host  all         all  ::1/128       trust
host  replication all  127.0.0.1/32  trust
host  replication all  ::1/128       trust
";

fn render_settings(settings: &[(String, String)]) -> String {
    let mut out = String::from("# throwaway cluster settings (later lines win)\n");
    for (name, value) in settings {
        out.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
    }
    out
}

/// Whether a server log excerpt says the listen port was in use.
fn port_taken(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("could not create any TCP/IP sockets")
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn psql_result(output: Output, database: &str) -> io::Result<String> {
    if output.status.success() {
        let mut out = String::from_utf8_lossy(&output.stdout).into_owned();
        while out.ends_with('\n') {
            out.pop();
        }
        Ok(out)
    } else {
        Err(command_error(&format!("psql -d {database}"), &output))
    }
}

fn command_error(what: &str, output: &Output) -> io::Error {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let said = [stderr.trim(), stdout.trim()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    io::Error::other(format!("{what} failed ({}): {said}", output.status))
}

/// The caller's libpq settings must not redirect our tools to another server.
fn clear_libpq_env(cmd: &mut Command) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGSSLMODE",
        "PGCLUSTER",
    ] {
        cmd.env_remove(var);
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn read_from(path: &Path, offset: u64) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = (offset as usize).min(bytes.len());
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(_) => String::new(),
    }
}

/// Creates a fresh directory for one cluster. As root it goes under `/tmp` (which the postgres
/// user can traverse, unlike `/root`) and is handed to that user; either way its path stays
/// short enough for the Unix socket inside it.
fn create_root_dir(as_postgres_user: bool) -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let tmp = std::env::temp_dir();
    let base = if as_postgres_user || tmp.as_os_str().len() > MAX_SOCKET_DIR_LEN - 40 {
        PathBuf::from("/tmp")
    } else {
        tmp
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = base.join(format!(
        "outbox-pg-{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if as_postgres_user {
        let output = Command::new("chown")
            .arg("-R")
            .arg(format!("{POSTGRES_OS_USER}:{POSTGRES_OS_USER}"))
            .arg(&dir)
            .output();
        let failure = match output {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failure {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(io::Error::other(format!(
                "running as root, the cluster must belong to the '{POSTGRES_OS_USER}' OS user \
                 (created by installing postgresql), but chown failed: {why}"
            )));
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_quoted() {
        let rendered = render_settings(&[
            ("wal_level".into(), "logical".into()),
            ("application_name".into(), "it's".into()),
        ]);
        assert!(rendered.contains("wal_level = 'logical'\n"));
        assert!(rendered.contains("application_name = 'it''s'\n"));
    }

    #[test]
    fn bind_failures_are_recognised() {
        let log = "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use\n\
                   WARNING:  could not create listen socket for \"127.0.0.1\"\n\
                   FATAL:  could not create any TCP/IP sockets\n";
        assert!(port_taken(log));
        assert!(!port_taken("FATAL:  data directory has wrong ownership"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
