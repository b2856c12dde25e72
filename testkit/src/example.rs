//! The flashcards example (`examples/flashcards`, Java/Spring Boot): its jar, built with Maven
//! when missing or older than its sources, and an instance of it as a child process with its
//! HTTP API.
//!
//! `.ci/run` builds the jar before the tests; a test that finds neither the jar nor Maven (or no
//! Java to run it) fails saying so: it never skips.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::http::parse_http_response;
use crate::process::{log_stdio, read_log, tail, Proc};
use crate::{free_port, java_bin, ThrowawayPostgres, LOG_TAIL_LINES, POLL};

/// How long an instance may take to answer HTTP: a Spring Boot JVM on a busy 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(120);

/// How long building the jar may take (a cold `~/.m2` fetches Spring Boot: about a minute).
const BUILD_DEADLINE: Duration = Duration::from_secs(900);

/// The example's Maven project.
pub fn flashcards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/flashcards")
}

/// The runnable jar `mvn package` makes (`examples/flashcards/target/flashcards.jar`), built
/// first when it is missing or older than its sources (the pom, `src/`, and the repository's
/// `sql/outbox.sql` and `sql/inbox.sql`, which it bundles). Panics with the reason when it
/// cannot be had.
pub fn flashcards_jar() -> PathBuf {
    static JAR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    JAR.get_or_init(build_if_stale)
        .clone()
        .unwrap_or_else(|why| panic!("the flashcards example's jar: {why}"))
}

fn build_if_stale() -> Result<PathBuf, String> {
    let dir = flashcards_dir();
    let jar = dir.join("target/flashcards.jar");
    if !is_stale(&jar, &dir) {
        return Ok(jar);
    }
    // One build at a time across test processes: Maven writes one target/ directory.
    let lock = target_dir().join("flashcards-build.lock");
    std::fs::create_dir_all(target_dir()).map_err(|e| format!("creating target/: {e}"))?;
    let deadline = Instant::now() + BUILD_DEADLINE;
    while std::fs::create_dir(&lock).is_err() {
        if Instant::now() >= deadline {
            break; // its holder died: go ahead
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let result = if is_stale(&jar, &dir) {
        build(&dir, &jar)
    } else {
        Ok(jar)
    };
    let _ = std::fs::remove_dir(&lock);
    result
}

fn build(dir: &Path, jar: &Path) -> Result<PathBuf, String> {
    let why = if jar.is_file() {
        "is older than its sources"
    } else {
        "is missing"
    };
    eprintln!("{} {why}: building it with Maven", jar.display());
    let output = Command::new("mvn")
        .args(["-q", "-B", "-f"])
        .arg(dir.join("pom.xml"))
        .args(["package", "-DskipTests"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "{} {why} and `mvn` cannot run ({e}): install Maven and a JDK 17 \
                 (.ci/run does), or build it: mvn -q -f examples/flashcards/pom.xml package -DskipTests",
                jar.display()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "mvn package failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    if !jar.is_file() {
        return Err(format!("mvn package made no {}", jar.display()));
    }
    Ok(jar.to_owned())
}

/// Whether `jar` is missing or older than a source of the example.
fn is_stale(jar: &Path, dir: &Path) -> bool {
    let Some(built) = modified(jar) else {
        return true;
    };
    let sql = dir.join("../../sql");
    let mut sources = vec![
        dir.join("pom.xml"),
        sql.join("outbox.sql"),
        sql.join("inbox.sql"),
    ];
    collect_files(&dir.join("src"), &mut sources);
    sources
        .iter()
        .any(|source| modified(source).is_some_and(|m| m > built))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The JDBC URL of `database` on a throwaway cluster (as its superuser, trust authentication).
pub fn jdbc_url(pg: &ThrowawayPostgres, database: &str) -> String {
    format!(
        "jdbc:postgresql://127.0.0.1:{}/{database}?user=postgres",
        pg.port()
    )
}

/// One instance of the flashcards example (`java -jar flashcards.jar`), on a free HTTP port;
/// SIGKILLed on drop. Its settings are Spring properties (`flashcards.instance`, ...), passed
/// as `--key=value` arguments; [`Flashcards::start_again`] restarts it on the same port.
pub struct Flashcards {
    proc: Option<Proc>,
    port: u16,
    properties: BTreeMap<String, String>,
    dir: tempfile::TempDir,
    log_path: PathBuf,
}

impl Flashcards {
    /// Starts an instance with `properties` (`flashcards.http-port` is set here) and returns at
    /// once: see [`Flashcards::wait_ready`].
    pub fn spawn(properties: &[(&str, &str)]) -> Flashcards {
        let dir = tempfile::Builder::new()
            .prefix("flashcards-")
            .tempdir()
            .expect("tempdir");
        let port = free_port().expect("free port");
        let mut app = Flashcards {
            proc: None,
            port,
            properties: BTreeMap::new(),
            log_path: dir.path().join("flashcards.log"),
            dir,
        };
        app.set(properties);
        app.properties
            .insert("flashcards.http-port".into(), port.to_string());
        app.launch();
        app
    }

    /// [`Flashcards::spawn`], then [`Flashcards::wait_ready`].
    pub fn start(properties: &[(&str, &str)]) -> Flashcards {
        let mut app = Self::spawn(properties);
        app.wait_ready();
        app
    }

    fn set(&mut self, properties: &[(&str, &str)]) {
        for (key, value) in properties {
            self.properties.insert((*key).into(), (*value).into());
        }
    }

    fn launch(&mut self) {
        let jar = flashcards_jar();
        let (out, err) = log_stdio(&self.log_path);
        let mut cmd = Command::new(java_bin());
        // Start fast and small: right for tests.
        cmd.args([
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-XX:-UsePerfData",
        ])
        .arg("-jar")
        .arg(&jar)
        .args(self.properties.iter().map(|(k, v)| format!("--{k}={v}")))
        .current_dir(self.dir.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        let proc = Proc::spawn("java -jar flashcards.jar", &mut cmd).unwrap_or_else(|e| {
            panic!(
                "{e}: the flashcards example needs Java 17 (`java` on PATH or $JAVA_HOME; \
                 .ci/run installs it)"
            )
        });
        self.proc = Some(proc);
    }

    /// Waits until the instance answers `GET /inbox/stats` (its schema is applied and its
    /// listener started by then); panics with its log tail if it exits or takes too long.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.proc.as_mut().and_then(Proc::try_wait) {
                panic!(
                    "flashcards exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if matches!(self.request("GET", "/inbox/stats", None), Ok((200, _))) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "flashcards not ready on port {} after {START_DEADLINE:?}:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Crashes the instance: SIGKILL, then reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts a killed instance again on the same port, with `overrides` replacing earlier
    /// properties, and waits until it is ready.
    pub fn start_again(&mut self, overrides: &[(&str, &str)]) {
        assert!(self.proc.is_none(), "flashcards is still running");
        self.set(overrides);
        self.launch();
        self.wait_ready();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&mut self) -> bool {
        self.proc
            .as_mut()
            .is_some_and(|proc| proc.try_wait().is_none())
    }

    /// An HTTP request to the instance: (status code, body), or the connection error.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        json: Option<&str>,
    ) -> io::Result<(u16, String)> {
        http_request(self.port, method, path, json)
    }

    /// `GET /inbox/stats`: what its listener did since it started.
    pub fn stats(&self) -> serde_json::Value {
        match self.request("GET", "/inbox/stats", None) {
            Ok((200, body)) => serde_json::from_str(&body).expect("stats are JSON"),
            other => panic!("GET /inbox/stats: {other:?}\n{}", self.log_tail()),
        }
    }

    /// One counter of [`Flashcards::stats`].
    pub fn stat(&self, name: &str) -> u64 {
        self.stats()[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in /inbox/stats"))
    }

    /// Everything the instance printed so far (all its runs).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    pub fn log_tail(&self) -> String {
        format!(
            "--- last lines of {} ---\n{}",
            self.log_path.display(),
            tail(&self.log(), LOG_TAIL_LINES)
        )
    }
}

/// A plain HTTP/1.1 request with an optional JSON body to 127.0.0.1:`port`.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = json.unwrap_or("");
    let content_type = if json.is_some() {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    // One write: see http_get.
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         {content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}
