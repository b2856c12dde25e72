//! The logical replication source: tails the outbox table's `pgoutput` stream.
//!
//! A session prepares the publication and slot, reads the slot's confirmed position, and
//! streams from there. pgoutput (protocol 1) delivers each committed transaction whole and in
//! commit order, so every transaction becomes one watermark unit ending at its commit's end
//! LSN; a position is confirmed to the server only once Kafka has acknowledged every record
//! at or before it. When nothing is in flight and no transaction is open, the keepalive's WAL
//! end is confirmed too: an idle outbox on a busy database must not pin WAL.
//!
//! Shutdown finishes the transaction being read (it is committed and arrives whole), waits
//! for every ack, confirms the final position in a status update and ends the stream, so a
//! restart resends nothing.
//!
//! # Liveness
//!
//! A replication connection can die without its socket noticing: a NAT or firewall that drops
//! its state, a proxy that keeps both ends open. Reads then wait forever and status updates
//! vanish into buffers. The replication client owns its socket and offers no TCP options
//! (keepalive, `tcp_user_timeout`), and TCP would not see a proxy's black hole anyway, so the
//! relay judges the stream by what it receives from the walsender. Never by
//! `pg_stat_replication`: a role without `pg_read_all_stats` (the one `sql/roles.sql` creates)
//! sees its columns as NULL.
//!
//! - The connection sets its own `wal_sender_timeout`: the server's, at most
//!   `STREAM_TIMEOUT_MAX` (15 s), also when the server's is 0 (disabled). The walsender pings a
//!   client it has not heard from for half of it, and ends a client silent for all of it, so
//!   the slot of a relay that vanished frees within that time.
//! - The relay keeps quiet so that the pings come: it sends a status update when it has a new
//!   position to confirm, answers every ping at once, and otherwise only after twice the
//!   timeout as a backstop (the server's pings always come first).
//! - A healthy server is therefore never silent for long: it pings within half the timeout of
//!   last hearing from the relay when idle, and within the whole timeout while it decodes a
//!   large transaction it sends nothing of (it then reads replies only every half timeout).
//!   `watch_stream` counts as silence only time in which nothing arrived, nothing new was
//!   confirmed and no event waited unread in the channel (a slow pipeline is not a dead
//!   stream); past the timeout and a half (`silence_limit`) the session ends with
//!   `StreamLost` and restarts from the confirmed position. The server has ended the old
//!   walsender by then, so the slot is free.
//!
//! A standby that finds the slot busy evicts the holder only when it can see that the holder
//! has been silent well past `wal_sender_timeout` (`setup::release_stale_slot`); with the
//! columns hidden it never does, and the holder's own timeout frees the slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_util::sync::CancellationToken;

use super::coverage::Gate;
use super::pgoutput::{self, Message, Relation, Value};
use super::values;
use super::{Publish, Session, Source, SourceError};
use crate::checkpoint::Watermark;
use crate::config::{Column, Config};
use crate::error::{error_chain, Definite};
use crate::metrics::Metrics;
use crate::route::{DeadLetterReason, Envelope, OutboxEvent};
use crate::status::RelayState;

/// Most events buffered between the replication connection and the pipeline.
const STREAM_BUFFER_EVENTS: usize = 8192;
/// Fewest, for a `message.max.bytes` over 1 MiB (the budget then grows with it).
const STREAM_BUFFER_MIN_EVENTS: usize = 64;
/// Bytes that buffer may hold. pgwire-replication bounds its channel by a count only, so the
/// count is derived from this and the largest event that can still be published with its
/// value, the producer's `message.max.bytes` (67 events at its default of 1 MB): 100 kB
/// payloads take 7 MB, where 8,192 of them took 800 MB. A row over `message.max.bytes` is
/// dead-lettered without its value; a run of such rows is bounded by the count alone.
const STREAM_BUFFER_BYTES: usize = 64 << 20;

/// The replication buffer's capacity in events for events of up to `max_event_bytes`.
fn stream_buffer_events(max_event_bytes: usize) -> usize {
    (STREAM_BUFFER_BYTES / max_event_bytes.max(1))
        .clamp(STREAM_BUFFER_MIN_EVENTS, STREAM_BUFFER_EVENTS)
}

const TYPE_BYTEA: u32 = 17;

/// Where each configured column sits in the outbox relation.
#[derive(Debug, Default, Clone)]
struct OutboxColumns {
    id: Option<usize>,
    aggregate_type: Option<usize>,
    aggregate_id: Option<usize>,
    event_type: Option<usize>,
    payload: Option<usize>,
    payload_is_bytea: bool,
    headers: Option<usize>,
    created_at: Option<usize>,
}

impl OutboxColumns {
    /// Finds every configured column in the outbox's Relation message. One that is missing
    /// (renamed, dropped, left out by a column list) is a definite error: reading on would
    /// publish events without it (a NULL payload is a tombstone).
    fn locate(relation: &Relation, cfg: &Config, commit_lsn: &str) -> Result<Self, SourceError> {
        for (key, name) in super::coverage::required_columns(cfg) {
            if relation.column_index(name).is_none() {
                return Err(Definite::ColumnLeftStream {
                    table: super::setup::table_sql(cfg),
                    column: name.to_owned(),
                    key,
                    commit_lsn: commit_lsn.to_owned(),
                }
                .into());
            }
        }
        let find = |column: Column| {
            let name = cfg.source.columns.name(column)?;
            relation.column_index(name)
        };
        let payload = find(Column::Payload);
        Ok(Self {
            id: find(Column::Id),
            aggregate_type: find(Column::AggregateType),
            aggregate_id: find(Column::AggregateId),
            event_type: find(Column::EventType),
            payload,
            payload_is_bytea: payload
                .and_then(|i| relation.columns.get(i))
                .is_some_and(|c| c.type_oid == TYPE_BYTEA),
            headers: find(Column::Headers),
            created_at: find(Column::CreatedAt),
        })
    }
}

/// The transaction being read.
struct OpenTransaction {
    unit: u64,
    commit_lsn: String,
    /// `commit_lsn` as a number.
    commit: u64,
    commit_ms: i64,
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
        .and_then(|tls| crate::tls::replication_tls(&tls, &host).map_err(|e| error_chain(&e)))
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
    .with_buffer_size(stream_buffer_events(crate::sink::kafka::max_message_bytes(
        &cfg.kafka,
    ))))
}

/// Session settings of the replication connection. Timestamps arrive as text; pin their
/// format so they parse the same everywhere.
const STREAM_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC";

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

impl Source for Logical {
    type Position = u64;
    type Input = ReplicationEvent;

    async fn prepare(
        session: &Session,
        _shutdown: &CancellationToken,
    ) -> Result<Self, SourceError> {
        let cfg = &session.config;
        let prepared = tokio::time::timeout(SETUP_TIMEOUT, async {
            let client = session.pool.get().await.map_err(SourceError::pool)?;
            super::setup::prepare_logical(&**client, cfg).await
        })
        .await
        .map_err(|_| SourceError::Timeout("preparing the slot"))??;

        let timeout = stream_timeout(prepared.wal_sender_timeout);
        let status_interval = feedback_interval(timeout);
        let start = Lsn::from_u64(prepared.confirmed_flush);
        let repl_cfg = replication_config(cfg)?
            .with_application_name(session_application_name(
                SESSION_COUNTER.fetch_add(1, Ordering::Relaxed),
            ))
            .with_options(format!(
                "{STREAM_OPTIONS} -c wal_sender_timeout={}ms",
                timeout.as_millis()
            ))
            .with_start_lsn(start)
            .with_ack_lsn(start)
            .with_status_interval(status_interval)
            .with_wakeup_interval(idle_wakeup_interval(timeout));
        let mut stream = ReplicationClient::connect(repl_cfg)
            .await
            .map_err(|e| SourceError::replication(e, &cfg.source.slot))?;
        let started = tokio::time::timeout(SETUP_TIMEOUT, stream.wait_started())
            .await
            .map_err(|_| SourceError::Timeout("starting replication"))?;
        if let Err(e) = started {
            let error = SourceError::replication(e, &cfg.source.slot);
            if matches!(error, SourceError::SlotBusy { .. }) {
                if let Ok(client) = session.pool.get().await {
                    if let Some(stale_after) = stale_holder_after(prepared.wal_sender_timeout) {
                        super::setup::release_stale_slot(&**client, &cfg.source.slot, stale_after)
                            .await;
                    }
                }
            }
            return Err(error);
        }
        let coverage = Gate::new(
            session.pool.clone(),
            Arc::clone(&session.config),
            prepared.coverage,
        );
        Ok(Self {
            cfg: Arc::clone(cfg),
            relations: HashMap::new(),
            open: None,
            confirmed: prepared.confirmed_flush,
            wanted: prepared.confirmed_flush,
            coverage,
            stream_metrics: stream.metrics(),
            received: Arc::new(AtomicU64::new(0)),
            stream,
            stream_lost: CancellationToken::new(),
            silence_limit: silence_limit(timeout),
            status_interval,
            watchers: Vec::new(),
            metrics: session.metrics.clone(),
            state: Arc::clone(&session.state),
        })
    }

    fn start(&mut self, _session: &Session) {
        tracing::info!(
            slot = %self.cfg.source.slot,
            from = %Lsn::from_u64(self.confirmed),
            feedback_ms = self.status_interval.as_millis() as u64,
            "streaming the outbox"
        );
        self.watchers
            .push(tokio::spawn(Arc::clone(&self.coverage).watch()));
        self.watchers.push(tokio::spawn(watch_stream(
            self.stream.metrics(),
            Arc::clone(&self.received),
            self.silence_limit,
            self.stream_lost.clone(),
        )));
    }

    /// The watchdog heard nothing from the server for too long: the connection is dead even
    /// if the socket looks open.
    fn lost(&self) -> CancellationToken {
        self.stream_lost.clone()
    }

    fn lost_error(&self) -> SourceError {
        SourceError::StreamLost
    }

    async fn next(&mut self) -> Result<ReplicationEvent, SourceError> {
        match self
            .stream
            .recv()
            .await
            .map_err(|e| SourceError::replication(e, &self.cfg.source.slot))?
        {
            Some(event) => Ok(event),
            None => Err(SourceError::StreamEnded),
        }
    }

    async fn pump<W: Publish<u64> + Send>(
        &mut self,
        event: ReplicationEvent,
        out: &mut W,
    ) -> Result<(), SourceError> {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.handle(event, out).await
    }

    /// pgoutput sends each transaction whole: shutdown waits for its `Commit`.
    fn at_boundary(&self) -> bool {
        self.open.is_none()
    }

    /// Publishes the newest confirmable position to the server; fails once coverage of the
    /// outbox table is lost.
    async fn confirm(&mut self, acked: Option<u64>) -> Result<(), SourceError> {
        if let Some(lost) = self.coverage.lost() {
            return Err(lost);
        }
        // Also when nothing new was acknowledged: the verified position may have moved on.
        self.advance(acked.unwrap_or(0));
        self.metrics.confirmed_lsn.set(self.confirmed as i64);
        self.state
            .set_position(Lsn::from_u64(self.confirmed).to_string());
        Ok(())
    }

    /// Confirms the final position and ends the stream.
    async fn finish(&mut self, watermark: &Watermark<u64>) -> Result<(), SourceError> {
        // Coverage is verified once more inside, so the final position may be confirmed: a
        // restart then resends nothing.
        self.confirm_acknowledged(watermark).await;
        if let Some(lost) = self.coverage.lost() {
            return Err(lost);
        }
        tracing::info!(confirmed = %Lsn::from_u64(self.confirmed), "final position confirmed");
        self.stream
            .shutdown()
            .await
            .map_err(|e| SourceError::replication(e, &self.cfg.source.slot))?;
        Ok(())
    }

    async fn settle(&mut self, watermark: &Watermark<u64>) {
        self.confirm_acknowledged(watermark).await;
        tracing::info!(confirmed = %Lsn::from_u64(self.confirmed), "acknowledged events confirmed before halting");
    }

    async fn stop(&mut self) {
        for watcher in self.watchers.drain(..) {
            watcher.abort();
        }
    }

    fn abort(&mut self) {
        self.stream.abort();
    }
}

/// Numbers the sessions of this process, for their `application_name`.
static SESSION_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The `application_name` of this process's `n`th session, `outbox-relay-<host>-<random>-<n>`:
/// unique across hosts and containers (where every relay may be PID 1), and short enough that
/// Postgres keeps all of it (63 bytes). Shown in `pg_stat_replication`; nothing looks it up
/// (the slot's `active_pid` names its walsender).
fn session_application_name(n: u64) -> String {
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
fn host_label(host: &str) -> String {
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
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest `wal_sender_timeout` the relay's replication connection asks for: a relay that
/// vanished without closing its connection holds the slot this long at most, and a dead
/// connection is found within [`silence_limit`] of it. The server then pings an idle relay
/// every 7.5 s, so its `reply_time` stays younger than the 10 s after which relays before
/// this version evicted a holder (a rolling update mixes versions).
const STREAM_TIMEOUT_MAX: Duration = Duration::from_secs(15);

/// The `wal_sender_timeout` of the relay's replication connection: the server's setting, at
/// most [`STREAM_TIMEOUT_MAX`]; that too when the server's is 0 (disabled), because the
/// stream's liveness rests on the server's pings.
fn stream_timeout(server: Duration) -> Duration {
    if server.is_zero() {
        STREAM_TIMEOUT_MAX
    } else {
        server.min(STREAM_TIMEOUT_MAX)
    }
}

/// How long a healthy stream can go without a message: the server pings within half the
/// timeout of last hearing from the relay, or within the whole timeout while it decodes a
/// transaction it sends nothing of; half a timeout more (at least 5 s) is the margin.
fn silence_limit(stream_timeout: Duration) -> Duration {
    stream_timeout + (stream_timeout / 2).max(Duration::from_secs(5))
}

/// How long a standby lets the slot's holder stay silent (by `pg_stat_replication.reply_time`)
/// before it terminates the holder's walsender: past `wal_sender_timeout`, by half of it and at
/// least 10 s (`reply_time` is the holder's clock). `None` when the server's timeout is
/// disabled: a silent holder may be alive.
fn stale_holder_after(wal_sender_timeout: Duration) -> Option<Duration> {
    (!wal_sender_timeout.is_zero())
        .then(|| wal_sender_timeout + (wal_sender_timeout / 2).max(Duration::from_secs(10)))
}

/// How often the watchdog looks at the stream.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Ends the session (cancels `stream_lost`) when the stream has been silent for `limit`: see
/// the module's "Liveness". `received` counts the events the pipeline took from the channel.
async fn watch_stream(
    stream_metrics: Arc<pgwire_replication::ReplicationMetrics>,
    received: Arc<AtomicU64>,
    limit: Duration,
    stream_lost: CancellationToken,
) {
    let mut silence = Silence::new(
        stream_metrics.events_forwarded(),
        stream_metrics.last_applied_lsn().as_u64(),
        Instant::now(),
    );
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let heard = stream_metrics.events_forwarded();
        let silent = silence.observe(
            heard,
            stream_metrics.last_applied_lsn().as_u64(),
            received.load(Ordering::Relaxed) < heard,
            Instant::now(),
        );
        if silent >= limit {
            tracing::warn!(
                silent_secs = silent.as_secs(),
                "nothing heard from the server on the replication stream, not even a keepalive; the connection is dead, reconnecting"
            );
            stream_lost.cancel();
            return;
        }
    }
}

/// Since when a stream has been silent: nothing arrived, no new position went to the server,
/// and nothing waited unread.
#[derive(Debug)]
struct Silence {
    /// Events the replication client has handed over.
    heard: u64,
    /// The position in the last status update sent.
    reported: u64,
    since: Instant,
}

impl Silence {
    fn new(heard: u64, reported: u64, now: Instant) -> Self {
        Self {
            heard,
            reported,
            since: now,
        }
    }

    /// How long the stream has been silent at `now`. `backlog`: events wait in the channel,
    /// so the pipeline is behind and the client is not reading (backpressure, not silence).
    fn observe(&mut self, heard: u64, reported: u64, backlog: bool, now: Instant) -> Duration {
        if heard != self.heard || reported != self.reported || backlog {
            *self = Self::new(heard, reported, now);
        }
        now.saturating_duration_since(self.since)
    }
}

/// How often confirmed positions go to the server: `min(100 ms, wal_sender_timeout / 2)`.
/// Far more often than the server needs (`min(1 s, wal_sender_timeout / 2)` keeps it from
/// timing us out), because the slot's position is what a restart resends from: a crash
/// duplicates at most this much, WAL is released this soon, and shutdown waits this long for
/// its final status update. A status update is a few dozen bytes.
fn feedback_interval(wal_sender_timeout: Duration) -> Duration {
    bounded_by_timeout(FEEDBACK_EVERY, wal_sender_timeout)
}

/// How long an idle stream waits for a message before it sends a status update anyway: twice
/// the stream's timeout, a backstop only. The server pings a quiet client after half the
/// timeout, and the client answers; updates sent more often would keep those pings, the
/// stream's proof of life, from coming (see the module's "Liveness").
fn idle_wakeup_interval(stream_timeout: Duration) -> Duration {
    stream_timeout * 2
}

/// `min(interval, wal_sender_timeout / 2)`, at least 10 ms; `wal_sender_timeout = 0`
/// (disabled) leaves `interval`.
fn bounded_by_timeout(interval: Duration, wal_sender_timeout: Duration) -> Duration {
    let half = wal_sender_timeout / 2;
    if half.is_zero() {
        interval
    } else {
        half.min(interval).max(Duration::from_millis(10))
    }
}

/// The feedback interval when `wal_sender_timeout` allows it.
const FEEDBACK_EVERY: Duration = Duration::from_millis(100);

/// The logical source of one leader session.
pub struct Logical {
    cfg: Arc<Config>,
    stream: ReplicationClient,
    relations: HashMap<u32, Option<OutboxColumns>>,
    open: Option<OpenTransaction>,
    /// The position last sent to the server.
    confirmed: u64,
    /// The newest position Kafka's acks (or an idle keepalive) allow; confirmed once coverage
    /// is verified up to it.
    wanted: u64,
    coverage: Arc<Gate>,
    stream_metrics: Arc<pgwire_replication::ReplicationMetrics>,
    /// Events taken from the stream, for the watchdog.
    received: Arc<AtomicU64>,
    /// Cancelled by the watchdog when the stream went silent.
    stream_lost: CancellationToken,
    silence_limit: Duration,
    status_interval: Duration,
    /// The coverage check and the watchdog, once started.
    watchers: Vec<tokio::task::JoinHandle<()>>,
    metrics: Metrics,
    state: Arc<RelayState>,
}

impl Logical {
    /// Confirms up to `lsn`, but never past the last position at which the publication was
    /// verified to cover the outbox table (see `coverage`): beyond it, events may be missing.
    fn advance(&mut self, lsn: u64) {
        self.wanted = self.wanted.max(lsn);
        let to = self.wanted.min(self.coverage.verified());
        if to > self.confirmed {
            self.confirmed = to;
            self.stream.update_applied_lsn(Lsn::from_u64(to));
        }
    }

    async fn handle<W: Publish<u64> + Send>(
        &mut self,
        event: ReplicationEvent,
        out: &mut W,
    ) -> Result<(), SourceError> {
        tracing::trace!(?event, "replication event");
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                let commit_ms = values::pg_micros_to_unix_ms(commit_time_micros);
                let unit = out.open(Some(values::instant_of(commit_ms)));
                self.open = Some(OpenTransaction {
                    unit,
                    commit_lsn: final_lsn.to_string(),
                    commit: final_lsn.as_u64(),
                    commit_ms,
                });
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some(tx) = self.open.take() {
                    out.seal(tx.unit, end_lsn.as_u64());
                }
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(&data).map_err(SourceError::Decode)?;
                self.change(message, out).await?;
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix != self.cfg.source.message_prefix {
                    return Ok(());
                }
                if transactional {
                    if let Some(tx) = &self.open {
                        let (unit, commit_lsn, commit_ms) =
                            (tx.unit, tx.commit_lsn.clone(), tx.commit_ms);
                        self.emitted(&content, unit, &commit_lsn, commit_ms, out)
                            .await?;
                    }
                } else {
                    // Outside any transaction: a unit of its own at the message's LSN.
                    let now_ms = values::unix_ms_now();
                    let unit = out.open(Some(Instant::now()));
                    let lsn_text = lsn.to_string();
                    self.emitted(&content, unit, &lsn_text, now_ms, out).await?;
                    out.seal(unit, lsn.as_u64());
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Everything up to the server's WAL end has been seen; with nothing in
                // flight and no transaction open it is all confirmed.
                if self.open.is_none() {
                    out.idle_at(wal_end.as_u64());
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// A pgoutput change inside the open transaction.
    async fn change<W: Publish<u64> + Send>(
        &mut self,
        message: Message<'_>,
        out: &mut W,
    ) -> Result<(), SourceError> {
        match message {
            Message::Relation(relation) => {
                let (schema, table) = self.cfg.source.table_parts();
                let columns = if relation.namespace == schema && relation.name == table {
                    let (commit, commit_lsn) = self
                        .open
                        .as_ref()
                        .map_or((0, ""), |tx| (tx.commit, tx.commit_lsn.as_str()));
                    self.same_relation(relation.id, commit, commit_lsn)?;
                    Some(OutboxColumns::locate(&relation, &self.cfg, commit_lsn)?)
                } else {
                    None
                };
                self.relations.insert(relation.id, columns);
            }
            Message::Insert { relation_id, new } => {
                let Some(Some(columns)) = self.relations.get(&relation_id) else {
                    return Ok(());
                };
                let Some(tx) = &self.open else {
                    return Ok(());
                };
                let event = row_event(columns, &new, &tx.commit_lsn, tx.commit_ms);
                let unit = tx.unit;
                out.publish(unit, event).await?;
            }
            Message::Update { relation_id, .. } => self.ignored(relation_id, "update"),
            Message::Delete { relation_id, .. } => self.ignored(relation_id, "delete"),
            Message::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    self.ignored(id, "truncate");
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// An outbox relation in a transaction committed after the start's verification must be
    /// the relation verified then; another one means the table was dropped and created again
    /// since (earlier transactions may legitimately show an older table of that name).
    fn same_relation(&self, id: u32, commit: u64, commit_lsn: &str) -> Result<(), SourceError> {
        let start = self.coverage.start();
        if id == start.relid || commit <= start.lsn {
            return Ok(());
        }
        Err(super::coverage::recreated(
            &self.cfg,
            start.relid,
            format_args!("{id}, in the transaction committed at {commit_lsn}"),
        ))
    }

    fn ignored(&self, relation_id: u32, operation: &str) {
        if matches!(self.relations.get(&relation_id), Some(Some(_))) {
            self.metrics
                .ignored_changes
                .with_label_values(&[operation])
                .inc();
        }
    }

    /// An event emitted with `outbox.emit(...)`.
    async fn emitted<W: Publish<u64> + Send>(
        &self,
        content: &[u8],
        unit: u64,
        commit_lsn: &str,
        commit_ms: i64,
        out: &mut W,
    ) -> Result<(), SourceError> {
        let routed = match Envelope::parse(content) {
            Ok(envelope) => {
                let event = OutboxEvent {
                    id: envelope.id.as_deref(),
                    aggregate_type: envelope.aggregate_type.as_deref(),
                    aggregate_id: envelope.aggregate_id.as_deref(),
                    event_type: envelope.event_type.as_deref(),
                    payload: envelope
                        .payload
                        .map(|p| std::borrow::Cow::Borrowed(p.get().as_bytes())),
                    headers: envelope
                        .headers
                        .map(|h| std::borrow::Cow::Borrowed(h.get())),
                    timestamp_ms: Some(
                        envelope
                            .created_at
                            .as_deref()
                            .and_then(values::parse_timestamp_ms)
                            .unwrap_or(commit_ms),
                    ),
                    pg_lsn: Some(commit_lsn),
                };
                // The envelope borrows `content`; route and send before it goes.
                return out.publish(unit, event).await;
            }
            Err(error) => out.router().dead_letter_raw(
                None,
                Some(std::borrow::Cow::Borrowed(content)),
                vec![(
                    "pg_lsn".into(),
                    std::borrow::Cow::Owned(commit_lsn.as_bytes().to_vec()),
                )],
                DeadLetterReason::InvalidMessage,
                error,
                "",
            ),
        };
        out.publish_routed(unit, routed).await
    }

    /// Confirms everything acknowledged and waits (up to 3 s, while the stream runs) until
    /// that position has gone out in a status update.
    /// Confirmation stops at the last position where coverage was verified; the check runs
    /// once more first (it changes nothing once coverage is lost).
    async fn confirm_acknowledged(&mut self, watermark: &Watermark<u64>) {
        self.coverage.refresh().await;
        let acked = watermark.lock().take_confirmable();
        self.advance(acked.unwrap_or(0));
        let sent_deadline = Instant::now() + Duration::from_secs(3);
        while self.stream_metrics.last_applied_lsn().as_u64() < self.confirmed
            && Instant::now() < sent_deadline
            && self.stream.is_running()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The event carried by an outbox row. Walks the tuple once.
fn row_event<'a>(
    columns: &OutboxColumns,
    tuple: &pgoutput::Tuple<'a>,
    commit_lsn: &'a str,
    commit_ms: i64,
) -> OutboxEvent<'a> {
    let fields = [
        columns.id,
        columns.aggregate_type,
        columns.aggregate_id,
        columns.event_type,
        columns.payload,
        columns.headers,
        columns.created_at,
    ];
    let mut values: [Option<Value<'a>>; 7] = [None; 7];
    let last = fields.iter().flatten().max().copied();
    for (index, value) in tuple.iter().enumerate() {
        if last.is_none_or(|last| index > last) {
            break;
        }
        for (field, slot) in fields.iter().zip(values.iter_mut()) {
            if *field == Some(index) {
                *slot = Some(value);
            }
        }
    }
    let [id, aggregate_type, aggregate_id, event_type, payload, headers, created_at] = values;
    let text = |value: Option<Value<'a>>| -> Option<&'a str> {
        match value? {
            Value::Text(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    };
    let payload = match payload {
        Some(Value::Text(bytes)) if columns.payload_is_bytea => {
            values::parse_bytea(bytes).map(std::borrow::Cow::Owned)
        }
        Some(Value::Text(bytes) | Value::Binary(bytes)) => Some(std::borrow::Cow::Borrowed(bytes)),
        _ => None,
    };
    OutboxEvent {
        id: text(id),
        aggregate_type: text(aggregate_type),
        aggregate_id: text(aggregate_id),
        event_type: text(event_type),
        payload,
        headers: text(headers).map(std::borrow::Cow::Borrowed),
        timestamp_ms: Some(
            text(created_at)
                .and_then(values::parse_timestamp_ms)
                .unwrap_or(commit_ms),
        ),
        pg_lsn: Some(commit_lsn),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded_insert(values: &[Option<&[u8]>]) -> Vec<u8> {
        pgoutput::encode::insert(7, values)
    }

    #[test]
    fn row_event_reads_configured_columns_in_any_order() {
        // Columns in an order of their own, an unconfigured one in between and one after.
        let columns = OutboxColumns {
            id: Some(3),
            aggregate_type: Some(0),
            aggregate_id: Some(1),
            event_type: None,
            payload: Some(5),
            payload_is_bytea: true,
            headers: Some(2),
            created_at: Some(6),
        };
        let bytes = decoded_insert(&[
            Some(b"order"),
            Some(b"o-1"),
            None,
            Some(b"6f9619ff-8b86-d011-b42d-00cf4fc964ff"),
            Some(b"unrelated"),
            Some(b"\\x7b7d"),
            Some(b"2024-05-01 12:00:00.5+00"),
            Some(b"trailing"),
        ]);
        let Ok(Message::Insert { new, .. }) = pgoutput::decode(&bytes) else {
            panic!("not an insert");
        };
        let event = row_event(&columns, &new, "0/16B3748", 42);
        assert_eq!(event.id, Some("6f9619ff-8b86-d011-b42d-00cf4fc964ff"));
        assert_eq!(event.aggregate_type, Some("order"));
        assert_eq!(event.aggregate_id, Some("o-1"));
        assert_eq!(event.event_type, None);
        assert_eq!(event.headers, None, "a NULL column is no value");
        assert_eq!(
            event.payload.as_deref(),
            Some(&b"{}"[..]),
            "bytea text is decoded"
        );
        assert_eq!(event.timestamp_ms, Some(1_714_564_800_500));
        assert_eq!(event.pg_lsn, Some("0/16B3748"));
    }

    #[test]
    fn row_event_falls_back_to_the_commit_time_and_tolerates_short_tuples() {
        let columns = OutboxColumns {
            id: Some(0),
            payload: Some(1),
            created_at: Some(9),
            ..OutboxColumns::default()
        };
        let bytes = decoded_insert(&[Some(b"id-1"), Some(b"{\"a\": 1}")]);
        let Ok(Message::Insert { new, .. }) = pgoutput::decode(&bytes) else {
            panic!("not an insert");
        };
        let event = row_event(&columns, &new, "0/1", 42);
        assert_eq!(event.id, Some("id-1"));
        assert_eq!(event.payload.as_deref(), Some(&b"{\"a\": 1}"[..]));
        assert_eq!(event.timestamp_ms, Some(42));
    }

    fn outbox_relation(columns: &[&str]) -> Relation {
        Relation {
            id: 7,
            namespace: "outbox".into(),
            name: "events".into(),
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|name| pgoutput::Column {
                    flags: 0,
                    name: (*name).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn a_relation_without_a_configured_column_is_a_definite_error() {
        let cfg = Config::default();
        let all = [
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
            "created_at",
        ];
        let columns = OutboxColumns::locate(&outbox_relation(&all), &cfg, "0/1").unwrap();
        assert_eq!(columns.payload, Some(4));
        let renamed = outbox_relation(&all.map(|c| if c == "payload" { "body" } else { c }));
        let error = OutboxColumns::locate(&renamed, &cfg, "0/1").unwrap_err();
        assert!(error.is_definite());
        assert!(
            error
                .to_string()
                .contains("\"payload\" (source.columns.payload)"),
            "{error}"
        );
        // An optional column the mapping leaves out may be absent; a configured one may not.
        let without_headers = outbox_relation(&all[..5]);
        assert!(OutboxColumns::locate(&without_headers, &cfg, "0/1").is_err());
        let mut cfg = cfg;
        cfg.source.columns.headers = None;
        cfg.source.columns.created_at = None;
        assert!(OutboxColumns::locate(&without_headers, &cfg, "0/1").is_ok());
    }

    #[test]
    fn the_stream_buffer_fits_its_byte_budget() {
        // librdkafka's default message.max.bytes: 100 kB payloads can't take 800 MB.
        let events = stream_buffer_events(1_000_000);
        assert!(events * 1_000_000 <= STREAM_BUFFER_BYTES, "{events}");
        assert!(events * 100_000 <= 8 << 20, "{events} events of 100 kB");
        // Small events keep a deep buffer; huge limits keep a working one.
        assert_eq!(stream_buffer_events(1_000), STREAM_BUFFER_EVENTS);
        assert_eq!(stream_buffer_events(100 << 20), STREAM_BUFFER_MIN_EVENTS);
        assert_eq!(stream_buffer_events(0), STREAM_BUFFER_EVENTS);
        // Up to a message.max.bytes of 1 MiB the budget holds; above, the minimum count does.
        for max in [4_096, 65_536, 1_000_000, 1 << 20] {
            assert!(stream_buffer_events(max) * max <= STREAM_BUFFER_BYTES);
        }
    }

    #[test]
    fn feedback_interval_follows_wal_sender_timeout() {
        assert_eq!(
            feedback_interval(Duration::from_secs(60)),
            Duration::from_millis(100)
        );
        assert_eq!(
            feedback_interval(Duration::from_millis(150)),
            Duration::from_millis(75)
        );
        assert_eq!(
            feedback_interval(Duration::ZERO),
            Duration::from_millis(100)
        );
        assert_eq!(
            idle_wakeup_interval(Duration::from_secs(15)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn the_stream_timeout_is_the_servers_at_most_fifteen_seconds() {
        let secs = Duration::from_secs;
        assert_eq!(stream_timeout(secs(60)), secs(15));
        assert_eq!(stream_timeout(secs(10)), secs(10));
        assert_eq!(stream_timeout(Duration::ZERO), secs(15), "disabled");
        // Past every healthy silence (a timeout while the server decodes), well under the
        // 60 s default after which the server would free the slot anyway.
        assert_eq!(silence_limit(secs(15)), Duration::from_millis(22_500));
        assert_eq!(silence_limit(secs(4)), secs(9));
        // The idle backstop never preempts the server's ping at half the timeout.
        assert!(idle_wakeup_interval(secs(15)) > silence_limit(secs(15)));
    }

    #[test]
    fn a_holder_is_stale_only_well_past_wal_sender_timeout() {
        let secs = Duration::from_secs;
        assert_eq!(stale_holder_after(secs(60)), Some(secs(90)));
        assert_eq!(stale_holder_after(secs(10)), Some(secs(20)));
        assert_eq!(stale_holder_after(Duration::ZERO), None);
    }

    #[test]
    fn silence_counts_only_time_without_messages_confirmations_or_backlog() {
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut silence = Silence::new(5, 100, t0);
        assert_eq!(
            silence.observe(5, 100, false, at(10)),
            Duration::from_secs(10)
        );
        // A keepalive arrived.
        assert_eq!(silence.observe(6, 100, false, at(12)), Duration::ZERO);
        assert_eq!(
            silence.observe(6, 100, false, at(20)),
            Duration::from_secs(8)
        );
        // A new position went out: the server answers that within a timeout.
        assert_eq!(silence.observe(6, 140, false, at(21)), Duration::ZERO);
        // Events wait unread: the pipeline is behind, the client does not read.
        assert_eq!(silence.observe(6, 140, true, at(50)), Duration::ZERO);
        assert_eq!(
            silence.observe(6, 140, false, at(53)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn application_names_are_unique_and_fit_postgres() {
        let a = session_application_name(0);
        let b = session_application_name(1);
        assert_ne!(a, b);
        assert!(a.starts_with("outbox-relay-"), "{a}");
        assert!(a.len() <= 63, "{a}");
        assert!(session_application_name(u64::MAX).len() <= 63);
        assert_eq!(
            host_label("relay-7d9f8b6c4-x2x9.svc.cluster"),
            "relay-7d9f8b6c4-x2x9-"
        );
        assert_eq!(
            host_label("a-very-long-host-name-with-its-unique-end"),
            "-with-its-unique-end-"
        );
        assert_eq!(host_label("\n"), "");
    }

    #[test]
    fn a_url_naming_several_servers_is_refused() {
        let refused = |url: &str| {
            let toml = format!("[postgres]\nurl = \"{url}\"\n");
            let cfg = Config::from_parts(Some(&toml), Vec::new()).expect("a valid config");
            match replication_config(&cfg) {
                Ok(_) => false,
                Err(SourceError::Definite(definite)) => {
                    let problem = definite.problem();
                    assert!(problem.contains("servers"), "{problem}");
                    true
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(refused(
            "host=a,b target_session_attrs=read-write user=u dbname=d"
        ));
        assert!(refused(
            "postgres://u@a:5432,b:5433/d?target_session_attrs=read-write"
        ));
        assert!(refused("host=a port=5432,5433 user=u"));
        assert!(!refused(
            "postgres://u@a:5432/d?target_session_attrs=read-write"
        ));
        assert!(!refused("host=/var/run/postgresql user=u"));
    }
}
