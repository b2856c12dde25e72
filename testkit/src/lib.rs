//! The test kit: real Postgres, real Kafka, the real binary, for the
//! integration tests (`tests/`) and the benchmark (`benches/relay/`) alike.
//!
//! Every test binary does `use testkit::*;` and gets:
//! - [`ThrowawayPostgres`]: a fresh cluster with `wal_level = logical` (the relay's own, which
//!   its `demo` command runs too);
//! - [`Kafka`]: Apache Kafka (KRaft, one node; [`Kafka::add_broker`] adds brokers) as a child
//!   process, its jars fetched from Maven Central by `testkit/kafka/pom.xml`; its data survives
//!   a restart;
//! - [`Tansu`]: the `tansu` broker (Kafka protocol, in-memory storage) as a child process, for
//!   the benchmark when it is installed (no test uses it);
//! - [`Relay`]: `outbox-relay run` as a child process, killable with SIGKILL or SIGTERM
//!   ([`relay_bin`] finds the binary cargo built for the test or benchmark);
//! - [`status`], [`metric`], [`scrape`], [`http_get`]: the relay's HTTP endpoints;
//! - [`consume`]: read records back with a fresh consumer, until a condition or a timeout;
//! - [`java_partition`]: the partition a Java client's default partitioner picks for a key;
//! - [`Proxy`]: a TCP proxy a test can cut; [`World`]: Postgres with the schema plus a broker;
//! - [`Flashcards`]: an instance of the Java example `examples/flashcards` ([`flashcards_jar`]
//!   builds its jar with Maven when missing or stale);
//! - [`Proc`]: any other child process, killed with the test (or benchmark) even when that dies
//!   without unwinding;
//! - [`wait_until`]: the only way tests wait (poll a condition, never a bare sleep).
//!
//! Helpers panic with a useful message (including the child's log tail) instead of returning
//! errors: a harness failure is a test failure. The few the benchmark needs to fail softly have
//! a `try_` variant.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;

pub use outbox_relay::demo::install::server_os_user;
pub use outbox_relay::demo::postgres::{free_port, PostgresOptions, ThrowawayPostgres};

mod consume;
mod example;
mod http;
mod kafka;
mod process;
mod proxy;
mod relay;
mod tansu;
mod world;

pub use consume::{consume, java_partition, murmur2, partition_report, Record};
pub use example::{flashcards_dir, flashcards_jar, http_request, jdbc_url, Flashcards};
pub use http::{http_get, metric, ready, scrape, status};
pub use kafka::{java_bin, kafka_libs, maven_fetch, Kafka, KafkaOptions, KAFKA_VERSION};
pub use process::Proc;
pub use proxy::Proxy;
pub use relay::{relay_bin, relay_cli, relay_config, Relay};
pub use tansu::{tansu_bin, try_tansu_bin, Tansu, TANSU_VERSION};
pub use world::{check_records, consume_n, topics, World};

/// How long a child process may take to become ready.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval of every wait in the kit.
const POLL: Duration = Duration::from_millis(50);
/// Lines of a child's log quoted in a failure message.
const LOG_TAIL_LINES: usize = 40;
/// Tries at starting a child on a fresh port when the picked one was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

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

/// A librdkafka client for 127.0.0.1 brokers (IPv4 only, generous socket timeout).
fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("socket.timeout.ms", "10000")
        .set("broker.address.family", "v4");
    config
}

/// Waits (up to 30 s) until `topic`'s metadata shows `partitions` partitions.
fn wait_for_partitions(brokers: &str, topic: &str, partitions: i32) -> Result<(), String> {
    let consumer: rdkafka::consumer::BaseConsumer = client_config(brokers)
        .create()
        .map_err(|e| format!("client: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while partition_count(&consumer, topic) != Some(partitions as usize) {
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after 30s waiting for topic {topic} with {partitions} partitions"
            ));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

fn partition_count(consumer: &rdkafka::consumer::BaseConsumer, topic: &str) -> Option<usize> {
    use rdkafka::consumer::Consumer;
    let md = consumer.fetch_metadata(None, Duration::from_secs(5)).ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() {
        return None;
    }
    Some(t.partitions().len())
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
