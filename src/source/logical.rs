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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_util::sync::CancellationToken;

use super::coverage::Gate;
use super::pgoutput::{self, Message, Relation, Value};
use super::values;
use super::{Session, SourceError};
use crate::config::Config;
use crate::route::{DeadLetterReason, Envelope, OutboxEvent, Router};
use crate::sink::kafka::{KafkaSink, Shared};

/// How often the session publishes confirmable positions and gauges.
const TICK: Duration = Duration::from_millis(50);

/// How long shutdown waits for Kafka to acknowledge what is in flight.
const DRAIN_DEADLINE: Duration = Duration::from_secs(7);

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
                let table = super::setup::table_sql(cfg);
                return Err(SourceError::Definite {
                    problem: format!(
                        "the replication stream describes {table} without column {name:?} \
                         (source.columns.{key}) in the transaction committed at {commit_lsn} \
                         (renamed, dropped, or left out by the publication's column list); \
                         nothing from there on was published"
                    ),
                    fix: format!(
                        "point source.columns.{key} at the column's new name, or restore the \
                         column (ALTER TABLE {table} RENAME COLUMN ... TO {}), then restart the \
                         relay; see README \"Coverage\"",
                        super::setup::quote_ident(name)
                    ),
                });
            }
        }
        let cols = &cfg.source.columns;
        let find = |name: &str| relation.column_index(name);
        let payload = find(&cols.payload);
        Ok(Self {
            id: find(&cols.id),
            aggregate_type: find(&cols.aggregate_type),
            aggregate_id: find(&cols.aggregate_id),
            event_type: find(&cols.event_type),
            payload,
            payload_is_bytea: payload
                .and_then(|i| relation.columns.get(i))
                .is_some_and(|c| c.type_oid == TYPE_BYTEA),
            headers: cols.headers.as_deref().and_then(find),
            created_at: cols.created_at.as_deref().and_then(find),
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
    let pg = cfg.postgres_config().map_err(|e| SourceError::Definite {
        problem: e.to_string(),
        fix: "set postgres.url to a valid libpq URL".into(),
    })?;
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
            crate::tls::replication_tls(&tls, &host).map_err(|e| crate::relay::error_chain(&e))
        })
        .map_err(|problem| SourceError::Definite {
            problem,
            fix: "fix the TLS settings (sslmode, sslrootcert, sslcert, sslkey) of postgres.url"
                .into(),
        })?;
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
    // Timestamps arrive as text; pin their format so they parse the same everywhere.
    .with_options("-c datestyle=ISO -c timezone=UTC")
    .with_buffer_size(stream_buffer_events(crate::sink::kafka::max_message_bytes(
        &cfg.kafka,
    ))))
}

/// One leader session of the logical source: runs until shutdown (Ok) or a fault (Err).
pub async fn run_session(
    session: &Session,
    shutdown: &CancellationToken,
) -> Result<(), SourceError> {
    let cfg = &session.config;
    let prepared = tokio::time::timeout(SETUP_TIMEOUT, async {
        let client = session.pool.get().await.map_err(SourceError::pool)?;
        super::setup::prepare_logical(&**client, cfg).await
    })
    .await
    .map_err(|_| SourceError::Timeout("preparing the slot"))??;

    let status_interval = feedback_interval(prepared.wal_sender_timeout);
    let start = Lsn::from_u64(prepared.confirmed_flush);
    // A name of its own, so the watchdog can find this session's walsender.
    let application_name = format!(
        "outbox-relay-{}-{}",
        std::process::id(),
        SESSION_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let repl_cfg = replication_config(cfg)?
        .with_application_name(application_name.clone())
        .with_start_lsn(start)
        .with_ack_lsn(start)
        .with_status_interval(status_interval)
        .with_wakeup_interval(idle_wakeup_interval(prepared.wal_sender_timeout));
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
                super::setup::release_stale_slot(&**client, &cfg.source.slot, STALE_HOLDER).await;
            }
        }
        return Err(error);
    }

    let shared: Arc<Shared<u64>> = Shared::new(session.metrics.clone());
    let mut sink = KafkaSink::new(
        &cfg.kafka,
        Arc::clone(&shared),
        Arc::clone(&session.state),
        shutdown.clone(),
    )?;
    session.state.set_leader(true);
    session.metrics.is_leader.set(1);
    tracing::info!(
        slot = %cfg.source.slot,
        from = %start,
        feedback_ms = status_interval.as_millis() as u64,
        "streaming the outbox"
    );
    let coverage = Gate::new(
        session.pool.clone(),
        Arc::clone(&session.config),
        prepared.coverage,
    );
    let coverage_watch = tokio::spawn(Arc::clone(&coverage).watch());
    let mut pipeline = Pipeline {
        cfg,
        router: session.router.clone(),
        relations: HashMap::new(),
        open: None,
        confirmed: prepared.confirmed_flush,
        wanted: prepared.confirmed_flush,
        coverage,
        stream_metrics: stream.metrics(),
    };
    let stream_lost = CancellationToken::new();
    let watchdog = tokio::spawn(watch_stream(
        session.pool.clone(),
        application_name,
        stream.metrics(),
        stream_lost.clone(),
    ));
    let result = pipeline
        .stream(
            &mut stream,
            &mut sink,
            &shared,
            session,
            shutdown,
            &stream_lost,
        )
        .await;
    watchdog.abort();
    coverage_watch.abort();
    match &result {
        // Halting (or any definite error) still delivers what was produced before it (those
        // events precede the cause) and confirms everything acknowledged, so that fixing the
        // cause and restarting resends nothing. The transaction holding the cause is never
        // sealed, so the watermark stops before it.
        Err(e) if e.is_definite() => {
            if let Err(error) = sink
                .drain_for_shutdown(&session.router, Instant::now() + DRAIN_DEADLINE)
                .await
            {
                tracing::warn!(error = %crate::relay::error_chain(&error), "cannot drain before halting");
            }
            pipeline.confirm_acknowledged(&stream, &shared).await;
            tracing::info!(confirmed = %Lsn::from_u64(pipeline.confirmed), "acknowledged events confirmed before halting");
            stream.abort();
        }
        Err(_) => {
            sink.purge();
            stream.abort();
        }
        Ok(()) => {}
    }
    session.state.set_leader(false);
    session.metrics.is_leader.set(0);
    result
}

/// Numbers the sessions of this process, for their `application_name`.
static SESSION_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How long preparing and starting a session may take before it is retried.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the watchdog looks for this session's walsender.
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(5);
/// Failed looks in a row after which the stream counts as lost.
const WATCHDOG_STRIKES: u32 = 3;
/// A slot holder that has not replied for this long is a dead connection (live relays reply
/// at least every second): its walsender is terminated so the slot frees before
/// `wal_sender_timeout`.
const STALE_HOLDER: Duration = Duration::from_secs(10);

/// Detects a replication connection that died without the socket noticing (a half-open
/// connection: the server's walsender is gone, or the network drops everything). An idle
/// stream carries no data to fail on, so a second connection checks that the server still
/// has a walsender for this session and hears its status updates (sent every 100 ms);
/// `WATCHDOG_STRIKES` failures in a row cancel `stream_lost`.
async fn watch_stream(
    pool: deadpool_postgres::Pool,
    application_name: String,
    stream_metrics: Arc<pgwire_replication::ReplicationMetrics>,
    stream_lost: CancellationToken,
) {
    let mut strikes = 0;
    let mut forwarded = stream_metrics.events_forwarded();
    loop {
        tokio::time::sleep(WATCHDOG_INTERVAL).await;
        // Data still arrives: the connection lives, even while a walsender busy replaying a
        // huge transaction leaves our status updates unread.
        let now_forwarded = stream_metrics.events_forwarded();
        if now_forwarded != forwarded {
            forwarded = now_forwarded;
            strikes = 0;
            continue;
        }
        let found = tokio::time::timeout(WATCHDOG_INTERVAL, async {
            let client = pool.get().await.ok()?;
            // Silent for longer than a stale holder: our status updates don't arrive.
            let row = client
                .query_opt(
                    "SELECT extract(epoch FROM now() - coalesce(reply_time, backend_start))::float8 \
                     FROM pg_stat_replication WHERE application_name = $1",
                    &[&application_name],
                )
                .await;
            match row {
                Ok(row) => Some(row.is_some_and(|r| r.get::<_, f64>(0) < STALE_HOLDER.as_secs_f64())),
                Err(_) => {
                    // A broken connection must not go back to the pool.
                    let _ = deadpool_postgres::Object::take(client);
                    None
                }
            }
        })
        .await;
        match found {
            Ok(Some(true)) => strikes = 0,
            _ => strikes += 1,
        }
        if strikes >= WATCHDOG_STRIKES {
            tracing::warn!(
                application_name,
                "no walsender serves this replication stream any more; reconnecting"
            );
            stream_lost.cancel();
            return;
        }
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

/// How long an idle stream waits for data before it sends a status update anyway:
/// `min(1 s, wal_sender_timeout / 2)`.
fn idle_wakeup_interval(wal_sender_timeout: Duration) -> Duration {
    bounded_by_timeout(Duration::from_secs(1), wal_sender_timeout)
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

struct Pipeline<'a> {
    cfg: &'a Config,
    router: Router,
    relations: HashMap<u32, Option<OutboxColumns>>,
    open: Option<OpenTransaction>,
    /// The position last sent to the server.
    confirmed: u64,
    /// The newest position Kafka's acks (or an idle keepalive) allow; confirmed once coverage
    /// is verified up to it.
    wanted: u64,
    coverage: Arc<Gate>,
    stream_metrics: Arc<pgwire_replication::ReplicationMetrics>,
}

impl Pipeline<'_> {
    async fn stream(
        &mut self,
        stream: &mut ReplicationClient,
        sink: &mut KafkaSink<u64>,
        shared: &Arc<Shared<u64>>,
        session: &Session,
        shutdown: &CancellationToken,
        stream_lost: &CancellationToken,
    ) -> Result<(), SourceError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        // Registered once, not once per message.
        let shutdown_signal = shutdown.cancelled();
        tokio::pin!(shutdown_signal);
        let lost = stream_lost.cancelled();
        tokio::pin!(lost);
        loop {
            if stopping && self.open.is_none() {
                return self.finish(stream, sink, shared).await;
            }
            tokio::select! {
                biased;
                // 1. Shutdown: stop taking transactions at the next boundary.
                _ = &mut shutdown_signal, if !stopping => {
                    tracing::info!("shutting down: finishing the open transaction and draining");
                    stopping = true;
                }
                // 2. Records Kafka refused for their content go to the dead-letter topic.
                Some(refused) = sink.refused() => {
                    sink.redirect(refused, &self.router).await?;
                }
                // 3. Confirm what Kafka has acknowledged; surface delivery failures.
                _ = tick.tick() => {
                    self.confirm(stream, sink, shared, session)?;
                    if let Some(failure) = shared.failure() {
                        return Err(SourceError::Sink(crate::sink::kafka::SinkError::Delivery(failure)));
                    }
                }
                // 4. The watchdog found no walsender for this stream: the connection is dead
                // even if the socket looks open.
                _ = &mut lost => return Err(SourceError::StreamLost),
                // 5. New data.
                event = stream.recv() => {
                    match event.map_err(|e| SourceError::replication(e, &self.cfg.source.slot))? {
                        Some(event) => self.handle(event, stream, sink, shared).await?,
                        None => return Err(SourceError::StreamEnded),
                    }
                }
            }
        }
    }

    /// Publishes the newest confirmable position to the server and refreshes gauges; fails
    /// once coverage of the outbox table is lost.
    fn confirm(
        &mut self,
        stream: &ReplicationClient,
        sink: &KafkaSink<u64>,
        shared: &Shared<u64>,
        session: &Session,
    ) -> Result<(), SourceError> {
        if let Some(lost) = self.coverage.lost() {
            return Err(lost);
        }
        let (confirmable, inflight, oldest) = {
            let mut checkpoint = shared.checkpoint();
            (
                checkpoint.take_confirmable(),
                checkpoint.inflight(),
                checkpoint.oldest_committed_at(),
            )
        };
        // Also when nothing new was acknowledged: the verified position may have moved on.
        self.advance(stream, confirmable.unwrap_or(0));
        let metrics = &session.metrics;
        metrics.inflight_events.set(inflight as i64);
        let age = oldest.map_or(0, |at| at.elapsed().as_secs() as i64);
        metrics.oldest_pending_event_age.set(age);
        metrics.replication_lag_seconds.set(age);
        metrics.producer_queue_depth.set(sink.queue_depth() as i64);
        metrics.confirmed_lsn.set(self.confirmed as i64);
        session
            .state
            .set_position(Lsn::from_u64(self.confirmed).to_string());
        Ok(())
    }

    /// Confirms up to `lsn`, but never past the last position at which the publication was
    /// verified to cover the outbox table (see `coverage`): beyond it, events may be missing.
    fn advance(&mut self, stream: &ReplicationClient, lsn: u64) {
        self.wanted = self.wanted.max(lsn);
        let to = self.wanted.min(self.coverage.verified());
        if to > self.confirmed {
            self.confirmed = to;
            stream.update_applied_lsn(Lsn::from_u64(to));
        }
    }

    async fn handle(
        &mut self,
        event: ReplicationEvent,
        stream: &ReplicationClient,
        sink: &mut KafkaSink<u64>,
        shared: &Shared<u64>,
    ) -> Result<(), SourceError> {
        tracing::trace!(?event, "replication event");
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                let commit_ms = values::pg_micros_to_unix_ms(commit_time_micros);
                let unit = shared
                    .checkpoint()
                    .open(Some(values::instant_of(commit_ms)));
                self.open = Some(OpenTransaction {
                    unit,
                    commit_lsn: final_lsn.to_string(),
                    commit: final_lsn.as_u64(),
                    commit_ms,
                });
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some(tx) = self.open.take() {
                    shared.checkpoint().seal(tx.unit, end_lsn.as_u64());
                }
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(&data).map_err(SourceError::Decode)?;
                self.change(message, sink).await?;
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
                        self.emitted(&content, unit, &commit_lsn, commit_ms, sink)
                            .await?;
                    }
                } else {
                    // Outside any transaction: a unit of its own at the message's LSN.
                    let now_ms = values::unix_ms_now();
                    let unit = shared.checkpoint().open(Some(Instant::now()));
                    let lsn_text = lsn.to_string();
                    self.emitted(&content, unit, &lsn_text, now_ms, sink)
                        .await?;
                    shared.checkpoint().seal(unit, lsn.as_u64());
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Everything up to the server's WAL end has been seen; with nothing in
                // flight and no transaction open it is all confirmed.
                if self.open.is_none() {
                    let idle = {
                        let mut checkpoint = shared.checkpoint();
                        if let Some(lsn) = checkpoint.take_confirmable() {
                            self.advance(stream, lsn);
                        }
                        checkpoint.is_idle()
                    };
                    if idle {
                        self.advance(stream, wal_end.as_u64());
                    }
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// A pgoutput change inside the open transaction.
    async fn change(
        &mut self,
        message: Message<'_>,
        sink: &mut KafkaSink<u64>,
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
                    Some(OutboxColumns::locate(&relation, self.cfg, commit_lsn)?)
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
                let routed = self.router.route(event);
                super::halt_if_invalid(self.cfg.source.on_invalid, &routed)?;
                sink.send(unit, routed).await?;
            }
            Message::Update { relation_id, .. } => self.ignored(relation_id, "update", sink),
            Message::Delete { relation_id, .. } => self.ignored(relation_id, "delete", sink),
            Message::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    self.ignored(id, "truncate", sink);
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
            self.cfg,
            start.relid,
            format_args!("{id}, in the transaction committed at {commit_lsn}"),
        ))
    }

    fn ignored(&self, relation_id: u32, operation: &str, sink: &KafkaSink<u64>) {
        if matches!(self.relations.get(&relation_id), Some(Some(_))) {
            sink.shared()
                .metrics
                .ignored_changes
                .with_label_values(&[operation])
                .inc();
        }
    }

    /// An event emitted with `outbox.emit(...)`.
    async fn emitted(
        &self,
        content: &[u8],
        unit: u64,
        commit_lsn: &str,
        commit_ms: i64,
        sink: &mut KafkaSink<u64>,
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
                let routed = self.router.route(event);
                super::halt_if_invalid(self.cfg.source.on_invalid, &routed)?;
                return Ok(sink.send(unit, routed).await?);
            }
            Err(error) => self.router.dead_letter_raw(
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
        super::halt_if_invalid(self.cfg.source.on_invalid, &routed)?;
        Ok(sink.send(unit, routed).await?)
    }

    /// Drains in-flight records, confirms the final position and ends the stream.
    async fn finish(
        &mut self,
        stream: &mut ReplicationClient,
        sink: &mut KafkaSink<u64>,
        shared: &Arc<Shared<u64>>,
    ) -> Result<(), SourceError> {
        sink.drain_for_shutdown(&self.router, Instant::now() + DRAIN_DEADLINE)
            .await?;
        // Coverage is verified once more inside, so the final position may be confirmed: a
        // restart then resends nothing.
        self.confirm_acknowledged(stream, shared).await;
        if let Some(lost) = self.coverage.lost() {
            return Err(lost);
        }
        tracing::info!(confirmed = %Lsn::from_u64(self.confirmed), "final position confirmed");
        stream
            .shutdown()
            .await
            .map_err(|e| SourceError::replication(e, &self.cfg.source.slot))?;
        Ok(())
    }

    /// Confirms everything acknowledged and waits (up to 3 s, while the stream runs) until
    /// that position has gone out in a status update.
    /// Confirmation stops at the last position where coverage was verified; the check runs
    /// once more first (it changes nothing once coverage is lost).
    async fn confirm_acknowledged(&mut self, stream: &ReplicationClient, shared: &Shared<u64>) {
        self.coverage.refresh().await;
        let acked = shared.checkpoint().take_confirmable();
        self.advance(stream, acked.unwrap_or(0));
        let sent_deadline = Instant::now() + Duration::from_secs(3);
        while self.stream_metrics.last_applied_lsn().as_u64() < self.confirmed
            && Instant::now() < sent_deadline
            && stream.is_running()
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
            idle_wakeup_interval(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
        assert_eq!(
            idle_wakeup_interval(Duration::from_millis(800)),
            Duration::from_millis(400)
        );
        assert_eq!(idle_wakeup_interval(Duration::ZERO), Duration::from_secs(1));
    }
}
