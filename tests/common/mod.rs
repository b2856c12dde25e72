//! The integration-test harness: real Postgres, a real Kafka-protocol broker, the real binary.
//!
//! Every test binary does `mod common;` and gets:
//! - [`ThrowawayPostgres`]: a fresh cluster with `wal_level = logical` (from the crate itself);
//! - [`Tansu`]: the `tansu` broker (Kafka protocol, in-memory storage) as a child process;
//! - [`Relay`]: `outbox-relay run` as a child process, killable with SIGKILL or SIGTERM;
//! - [`consume`]: read records back with a fresh consumer, until a condition or a timeout;
//! - [`java_partition`]: the partition a Java client's default partitioner picks for a key;
//! - [`wait_until`]: the only way tests wait (poll a condition, never a bare sleep).
//!
//! Helpers panic with a useful message (including the child's log tail) instead of returning
//! errors: a harness failure is a test failure.

// Each test binary uses a different subset of the harness.
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[allow(unused_imports)]
pub use outbox_relay::throwaway::{free_port, PostgresOptions, ThrowawayPostgres};

mod proxy;
mod world;
pub use proxy::Proxy;
#[allow(unused_imports)]
pub use world::{check_records, consume_n, topics, World};

/// How long a child process may take to become ready.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval of every wait in the harness.
const POLL: Duration = Duration::from_millis(50);
/// Lines of a child's log quoted in a failure message.
const LOG_TAIL_LINES: usize = 40;
/// Tries at starting a child on a fresh port when the picked one was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// The tansu release CI installs (`.ci/run`); any recent one works.
pub const TANSU_VERSION: &str = "0.6.0";

/// Polls `f` every 50 ms until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// A name no other test (or earlier run) uses: for group ids, slots, topics.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos & 0xffff_ffff
    )
}

/// A free TCP port for the relay's HTTP listener.
pub fn http_port() -> u16 {
    free_port().expect("no free port")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

/// One log file for a child's stdout and stderr (appended to, so restarts keep the history).
fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log file");
    let err = file.try_clone().expect("clone log file");
    (Stdio::from(file), Stdio::from(err))
}

fn signal(pid: u32, sig: &str) -> io::Result<()> {
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

/// Runs `f` on a fresh thread with its own tokio runtime, so that it works from sync tests and
/// from inside `#[tokio::test]` alike.
fn block_on<T: Send>(f: impl std::future::Future<Output = T> + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f)
        })
        .join()
        .expect("harness thread panicked")
    })
}

// ---------------------------------------------------------------------------------------------
// Tansu
// ---------------------------------------------------------------------------------------------

/// A `tansu` broker with in-memory storage, listening on 127.0.0.1 at a free port; killed on
/// drop. Its data lives only as long as the process.
pub struct Tansu {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log_path: PathBuf,
    bin: PathBuf,
}

impl Tansu {
    /// Starts a broker and waits until it answers a metadata request.
    pub fn start() -> Tansu {
        let bin = tansu_bin();
        let dir = tempfile::Builder::new()
            .prefix("tansu-")
            .tempdir()
            .expect("tempdir");
        let log_path = dir.path().join("tansu.log");
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().expect("free port");
            let mut child = spawn_tansu(&bin, port, port, &log_path);
            match wait_tansu_ready(&mut child, port, &log_path) {
                Ok(()) => {
                    return Tansu {
                        child,
                        port,
                        dir,
                        log_path,
                        bin,
                    }
                }
                // It exited: most likely the port was taken meanwhile, so try another.
                Err(why) if why.exited => last_failure = why.message,
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{}", why.message);
                }
            }
        }
        panic!("tansu did not start: {last_failure}");
    }

    /// Starts a broker reachable only through a [`Proxy`] (it advertises the proxy's port),
    /// so a test can cut the network between clients and the broker.
    pub fn start_behind_proxy() -> (Tansu, Proxy) {
        let bin = tansu_bin();
        let dir = tempfile::Builder::new()
            .prefix("tansu-")
            .tempdir()
            .expect("tempdir");
        let log_path = dir.path().join("tansu.log");
        let (listener, proxy_port) = Proxy::bind();
        let port = free_port().expect("free port");
        let proxy = Proxy::forward(listener, port);
        let mut child = spawn_tansu(&bin, port, proxy_port, &log_path);
        if let Err(why) = wait_tansu_ready(&mut child, proxy_port, &log_path) {
            let _ = child.kill();
            panic!("{}", why.message);
        }
        let tansu = Tansu {
            child,
            port: proxy_port,
            dir,
            log_path,
            bin,
        };
        (tansu, proxy)
    }

    /// `bootstrap.servers` for clients and for the relay.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The broker's output so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered, like a
    /// network partition. Nothing is lost; [`Tansu::resume`] continues.
    pub fn pause(&self) {
        signal(self.pid(), "STOP").expect("SIGSTOP tansu");
    }

    /// Continues a broker frozen by [`Tansu::pause`].
    pub fn resume(&self) {
        signal(self.pid(), "CONT").expect("SIGCONT tansu");
    }

    /// Kills the broker (SIGKILL), so clients see refused connections.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills and starts the broker again on the same port. Storage is in memory: all topics
    /// and records are gone afterwards.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_tansu(&self.bin, self.port, self.port, &self.log_path);
        if let Err(why) = wait_tansu_ready(&mut self.child, self.port, &self.log_path) {
            panic!(
                "tansu did not restart on port {}: {}",
                self.port, why.message
            );
        }
    }

    /// Creates a topic (replication factor 1) and waits until its metadata shows every
    /// partition. An existing topic is fine.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = client_config(&self.brokers())
            .create()
            .expect("admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let results = block_on(admin.create_topics([&topic], &AdminOptions::new()))
            .unwrap_or_else(|e| panic!("create topic {name}: {e}\n{}", self.log_tail()));
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => panic!("create topic {topic}: {code}"),
            }
        }
        let consumer: BaseConsumer = client_config(&self.brokers()).create().expect("client");
        wait_until(
            Duration::from_secs(30),
            &format!("topic {name} with {partitions} partitions"),
            || partition_count(&consumer, name) == Some(partitions as usize),
        );
    }

    fn log_tail(&self) -> String {
        format!(
            "--- last lines of {} ---\n{}",
            self.log_path.display(),
            tail(&self.log(), LOG_TAIL_LINES)
        )
    }
}

/// Why tansu did not become ready.
struct NotReady {
    exited: bool,
    message: String,
}

fn wait_tansu_ready(child: &mut Child, port: u16, log_path: &Path) -> Result<(), NotReady> {
    let log_tail = || {
        format!(
            "--- last lines of {} ---\n{}",
            log_path.display(),
            tail(&read_log(log_path), LOG_TAIL_LINES)
        )
    };
    let deadline = Instant::now() + START_DEADLINE;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let brokers = format!("127.0.0.1:{port}");
    let consumer: BaseConsumer = client_config(&brokers).create().map_err(|e| NotReady {
        exited: false,
        message: e.to_string(),
    })?;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotReady {
                exited: true,
                message: format!("tansu exited ({status})\n{}", log_tail()),
            });
        }
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            if let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(2)) {
                if !md.brokers().is_empty() {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(NotReady {
                exited: false,
                message: format!(
                    "tansu not ready on port {port} after {START_DEADLINE:?}\n{}",
                    log_tail()
                ),
            });
        }
        std::thread::sleep(POLL);
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // A paused broker must be continued, or the kill is not delivered until it is.
        let _ = signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_tansu(bin: &Path, port: u16, advertised: u16, log_path: &Path) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    let advertised = format!("tcp://127.0.0.1:{advertised}");
    let (out, err) = log_stdio(log_path);
    Command::new(bin)
        .arg("broker")
        .args(["--listener-url", &url])
        .args(["--advertised-listener-url", &advertised])
        .args(["--storage-engine", "memory://tansu/"])
        .env(
            "RUST_LOG",
            std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()))
}

/// The tansu binary: env `TANSU_BIN`, else `tansu` on PATH, else `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANSU_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("tansu"))
        .find(|p| p.is_file());
    let in_cargo_home = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/tansu"))
        .filter(|p| p.is_file());
    on_path.or(in_cargo_home).unwrap_or_else(|| {
        panic!(
            "tansu not found (TANSU_BIN, PATH, ~/.cargo/bin): install it with \
             `cargo install tansu --locked --features dynostore --version {TANSU_VERSION}`"
        )
    })
}

fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("socket.timeout.ms", "10000")
        .set("broker.address.family", "v4");
    config
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> Option<usize> {
    let md = consumer.fetch_metadata(None, Duration::from_secs(5)).ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() {
        return None;
    }
    Some(t.partitions().len())
}

// ---------------------------------------------------------------------------------------------
// Consuming
// ---------------------------------------------------------------------------------------------

/// A consumed record, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    /// The first header called `name`, as (lossy) UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The key as (lossy) UTF-8.
    pub fn key_str(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// The value as (lossy) UTF-8.
    pub fn value_str(&self) -> Option<String> {
        self.value
            .as_deref()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads `topics` from the beginning with a fresh consumer until `until(&records)` holds or
/// `timeout` passes, and returns what it got either way (the caller asserts).
///
/// Plain topic names are assigned directly (every partition, from the earliest offset), and
/// topics that appear later are picked up. Names starting with `^` are regular expressions
/// (e.g. `^outbox\..*`): then the consumer subscribes through a (fresh) consumer group.
pub fn consume(
    brokers: &str,
    topics: &[&str],
    mut until: impl FnMut(&[Record]) -> bool,
    timeout: Duration,
) -> Vec<Record> {
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", unique_name("harness"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()
        .expect("consumer");
    let subscribe = topics.iter().any(|t| t.starts_with('^'));
    if subscribe {
        consumer.subscribe(topics).expect("subscribe");
    }
    let deadline = Instant::now() + timeout;
    let mut assigned: Vec<(String, i32)> = Vec::new();
    let mut next_refresh = Instant::now();
    let mut records = Vec::new();
    while !until(&records) && Instant::now() < deadline {
        if !subscribe && Instant::now() >= next_refresh {
            assign_new_partitions(&consumer, topics, &mut assigned);
            next_refresh = Instant::now() + Duration::from_millis(500);
        }
        // Errors (unknown topics, rebalances) are expected while topics are being created.
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) {
            records.push(to_record(&msg));
        }
    }
    records
}

fn assign_new_partitions(
    consumer: &BaseConsumer,
    topics: &[&str],
    assigned: &mut Vec<(String, i32)>,
) {
    let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(2)) else {
        return;
    };
    let mut new = TopicPartitionList::new();
    for topic in md.topics().iter().filter(|t| topics.contains(&t.name())) {
        for p in topic.partitions() {
            let tp = (topic.name().to_string(), p.id());
            if !assigned.contains(&tp) {
                new.add_partition_offset(topic.name(), p.id(), Offset::Beginning)
                    .expect("offset");
                assigned.push(tp);
            }
        }
    }
    if new.count() > 0 {
        consumer.incremental_assign(&new).expect("assign");
    }
}

fn to_record(msg: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    Record {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().map(<[u8]>::to_vec),
        timestamp_ms: msg.timestamp().to_millis(),
        headers: msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Kafka's `Utils.murmur2`, as used by the Java client's default partitioner.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner (and librdkafka's `murmur2_random`)
/// picks for a non-empty key.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

// ---------------------------------------------------------------------------------------------
// The relay
// ---------------------------------------------------------------------------------------------

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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
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
    child: Child,
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
        let config = write_config(dir.path(), config_toml);
        let log_path = dir.path().join("relay.log");
        let (out, err) = log_stdio(&log_path);
        let child = relay_command(&["run"], &config, extra_env)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn outbox-relay");
        Relay {
            child,
            dir,
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Crashes the relay: SIGKILL, then reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks for a graceful shutdown (SIGTERM); see [`Relay::wait_exit`].
    pub fn sigterm(&self) {
        signal(self.pid(), "TERM").expect("SIGTERM relay");
    }

    /// Waits up to `timeout` for the relay to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
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
            if let Ok(Some(status)) = self.child.try_wait() {
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
        matches!(self.child.try_wait(), Ok(None))
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

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The relay's `/status`, or null while it does not answer yet.
pub fn status(port: u16) -> serde_json::Value {
    match http_get(port, "/status") {
        Ok((200, body)) => serde_json::from_str(&body).expect("status is JSON"),
        _ => serde_json::Value::Null,
    }
}

/// Whether the relay's `/readyz` answers 200.
pub fn ready(port: u16) -> bool {
    matches!(http_get(port, "/readyz"), Ok((200, _)))
}

/// The value of the first `/metrics` line starting with `line_prefix`.
pub fn metric(port: u16, line_prefix: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics").ok()?;
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A plain HTTP/1.1 GET to 127.0.0.1:`port`: (status code, body), or the connection error.
pub fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // One write: a request split over several segments can race a server that answers
    // after the first read and closes.
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}
