//! The replication connection's settings: where it connects, its name, its timeouts and
//! feedback intervals, the size of its buffer.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::Duration;

use pgwire_replication::ReplicationConfig;

use crate::config::Config;
use crate::error::{error_chain, Definite};
use crate::source::SourceError;

/// Most events buffered between the replication connection and the pipeline.
pub(super) const STREAM_BUFFER_EVENTS: usize = 8192;
/// Fewest, for a `message.max.bytes` over 1 MiB (the budget then grows with it).
pub(super) const STREAM_BUFFER_MIN_EVENTS: usize = 64;
/// Bytes that buffer may hold. pgwire-replication bounds its channel by a count only, so the
/// count is derived from this and the largest event that can still be published with its
/// value, the producer's `message.max.bytes` (67 events at its default of 1 MB): 100 kB
/// payloads take 7 MB, where 8,192 of them took 800 MB. A row over `message.max.bytes` is
/// dead-lettered without its value; a run of such rows is bounded by the count alone.
pub(super) const STREAM_BUFFER_BYTES: usize = 64 << 20;

/// The replication buffer's capacity in events for events of up to `max_event_bytes`.
pub(super) fn stream_buffer_events(max_event_bytes: usize) -> usize {
    (STREAM_BUFFER_BYTES / max_event_bytes.max(1))
        .clamp(STREAM_BUFFER_MIN_EVENTS, STREAM_BUFFER_EVENTS)
}

/// Connection details for the replication protocol, from the libpq-style URL.
pub fn replication_config(cfg: &Config) -> Result<ReplicationConfig, SourceError> {
    let pg = cfg.postgres_config().map_err(|e| Definite::PostgresUrl {
        problem: e.to_string(),
    })?;
    single_server(&pg)?;
    let (host, port) = match (pg.get_hosts().first(), pg.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(h)), port) => (h.clone(), *port.unwrap_or(&5432)),
        #[cfg(unix)]
        (Some(tokio_postgres::config::Host::Unix(path)), port) => {
            (path.to_string_lossy().into_owned(), *port.unwrap_or(&5432))
        }
        _ => (
            "localhost".to_owned(),
            *pg.get_ports().first().unwrap_or(&5432),
        ),
    };
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = pg.get_dbname().unwrap_or(&user).to_owned();
    let tls = cfg
        .postgres_tls()
        .map_err(|e| e.to_string())
        .and_then(|tls| {
            crate::postgres::tls::replication_tls(&tls, &host).map_err(|e| error_chain(&e))
        })
        .map_err(|problem| Definite::PostgresTls { problem })?;
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        cfg.source.slot.clone(),
        cfg.source.publication.clone(),
    )
    .with_port(port)
    .with_tls(tls)
    .with_application_name("outbox-relay")
    .with_options(STREAM_OPTIONS)
    .with_buffer_size(stream_buffer_events(cfg.kafka.message_max_bytes())))
}

/// Session settings of the replication connection. Timestamps arrive as text; pin their
/// format so they parse the same everywhere.
pub(super) const STREAM_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC";

/// Refuses a `postgres.url` that names several servers (`host=a,b`, several ports or
/// `hostaddr`s). The pool picks one of them as libpq would (`target_session_attrs`), but the
/// replication connection can only name one: it would stream from the first while the slot
/// was prepared on another.
pub fn single_server(pg: &tokio_postgres::Config) -> Result<(), SourceError> {
    let servers = pg
        .get_hosts()
        .len()
        .max(pg.get_ports().len())
        .max(pg.get_hostaddrs().len());
    if servers <= 1 {
        return Ok(());
    }
    Err(Definite::SeveralServers { servers }.into())
}

/// Numbers the sessions of this process, for their `application_name`.
pub(super) static SESSION_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The `application_name` of this process's `n`th session, `outbox-relay-<host>-<random>-<n>`:
/// unique across hosts and containers (where every relay may be PID 1), and short enough that
/// Postgres keeps all of it (63 bytes). Shown in `pg_stat_replication`; nothing looks it up
/// (the slot's `active_pid` names its walsender).
pub(super) fn session_application_name(n: u64) -> String {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    let instance = INSTANCE.get_or_init(|| {
        use std::hash::BuildHasher;
        // Randomly keyed per process: relays started at the same instant still differ.
        let random = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), std::time::SystemTime::now()))
            as u32;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        format!("{}{random:08x}", host_label(&host))
    });
    format!("outbox-relay-{instance}-{n}")
}

/// The first label of a host name, printable ASCII only, at most its last 20 characters (a
/// pod's name ends in what tells replicas apart), with a `-` to follow it; empty if none.
pub(super) fn host_label(host: &str) -> String {
    let label: Vec<char> = host
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    if label.is_empty() {
        return String::new();
    }
    let tail: String = label[label.len().saturating_sub(20)..].iter().collect();
    format!("{tail}-")
}

/// How long preparing and starting a session may take before it is retried.
pub(super) const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest `wal_sender_timeout` the relay's replication connection asks for: a relay that
/// vanished without closing its connection holds the slot this long at most, and a dead
/// connection is found within [`silence_limit`] of it. The server then pings an idle relay
/// every 7.5 s, so its `reply_time` stays younger than the 10 s after which relays before
/// this version evicted a holder (a rolling update mixes versions).
pub(super) const STREAM_TIMEOUT_MAX: Duration = Duration::from_secs(15);

/// The `wal_sender_timeout` of the relay's replication connection: the server's setting, at
/// most [`STREAM_TIMEOUT_MAX`]; that too when the server's is 0 (disabled), because the
/// stream's liveness rests on the server's pings.
pub(super) fn stream_timeout(server: Duration) -> Duration {
    if server.is_zero() {
        STREAM_TIMEOUT_MAX
    } else {
        server.min(STREAM_TIMEOUT_MAX)
    }
}

/// How long a healthy stream can go without a message: the server pings within half the
/// timeout of last hearing from the relay, or within the whole timeout while it decodes a
/// transaction it sends nothing of; half a timeout more (at least 5 s) is the margin.
pub(super) fn silence_limit(stream_timeout: Duration) -> Duration {
    stream_timeout + (stream_timeout / 2).max(Duration::from_secs(5))
}

/// How long a standby lets the slot's holder stay silent (by `pg_stat_replication.reply_time`)
/// before it terminates the holder's walsender: past `wal_sender_timeout`, by half of it and at
/// least 10 s (`reply_time` is the holder's clock). `None` when the server's timeout is
/// disabled: a silent holder may be alive.
pub(super) fn stale_holder_after(wal_sender_timeout: Duration) -> Option<Duration> {
    (!wal_sender_timeout.is_zero())
        .then(|| wal_sender_timeout + (wal_sender_timeout / 2).max(Duration::from_secs(10)))
}

/// How often confirmed positions go to the server: `min(100 ms, wal_sender_timeout / 2)`.
/// Far more often than the server needs (`min(1 s, wal_sender_timeout / 2)` keeps it from
/// timing us out), because the slot's position is what a restart resends from: a crash
/// duplicates at most this much, WAL is released this soon, and shutdown waits this long for
/// its final status update. A status update is a few dozen bytes.
pub(super) fn feedback_interval(wal_sender_timeout: Duration) -> Duration {
    bounded_by_timeout(FEEDBACK_EVERY, wal_sender_timeout)
}

/// How long an idle stream waits for a message before it sends a status update anyway: twice
/// the stream's timeout, a backstop only. The server pings a quiet client after half the
/// timeout, and the client answers; updates sent more often would keep those pings, the
/// stream's proof of life, from coming (see the module's "Liveness").
pub(super) fn idle_wakeup_interval(stream_timeout: Duration) -> Duration {
    stream_timeout * 2
}

/// `min(interval, wal_sender_timeout / 2)`, at least 10 ms; `wal_sender_timeout = 0`
/// (disabled) leaves `interval`.
pub(super) fn bounded_by_timeout(interval: Duration, wal_sender_timeout: Duration) -> Duration {
    let half = wal_sender_timeout / 2;
    if half.is_zero() {
        interval
    } else {
        half.min(interval).max(Duration::from_millis(10))
    }
}

/// The feedback interval when `wal_sender_timeout` allows it.
pub(super) const FEEDBACK_EVERY: Duration = Duration::from_millis(100);
