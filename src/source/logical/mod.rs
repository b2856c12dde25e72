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
//!
//! Here: `mod.rs` the [`Logical`] source (the pipeline drives it through [`Source`]),
//! `connection.rs` the replication connection's settings and timeouts, `liveness.rs` the
//! watchdog, `rows.rs` the outbox columns and the event a row carries.

mod connection;
mod liveness;
mod rows;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio_util::sync::CancellationToken;

use super::pgoutput::{self, Message};
use super::values;
use super::{Publish, Report, Session, Source, SourceError};
use crate::checkpoint::Watermark;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::postgres::coverage::Gate;
use crate::route::{DeadLetterReason, Envelope, OutboxEvent};
use connection::*;
use liveness::watch_stream;
use rows::{row_event, OpenTransaction, OutboxColumns};

pub use connection::{replication_config, single_server};

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
    report: Arc<dyn Report>,
    /// Exactly once: the progress recorded in Kafka. A transaction whose commit lies before it
    /// (so it ends at or before it), and a message at or before it, is in Kafka already.
    skip_through: u64,
    /// Events read and not published because they are in Kafka already.
    skipped: u64,
    /// Exactly once: the transaction (by commit LSN) whose first events are in Kafka already,
    /// and how many.
    skip_partial: Option<(u64, u64)>,
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
    ) -> Result<(), W::Error> {
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
                    skip: final_lsn.as_u64() < self.skip_through,
                    events: 0,
                    skip_events: match self.skip_partial {
                        Some((commit, n)) if commit == final_lsn.as_u64() => n,
                        _ => 0,
                    },
                });
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some(tx) = self.open.take() {
                    out.seal(tx.unit, end_lsn.as_u64());
                    // The last transaction in Kafka already, wholly or in part.
                    let last =
                        (tx.skip && end_lsn.as_u64() >= self.skip_through) || tx.skip_events > 0;
                    if last && self.skipped > 0 {
                        tracing::info!(events = self.skipped, through = %Lsn::from_u64(self.skip_through), "skipped events already published exactly once");
                    }
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
                    if let Some(tx) = &mut self.open {
                        if !tx.next_event() {
                            self.skipped += 1;
                            return Ok(());
                        }
                        let (unit, commit_lsn, commit_ms) =
                            (tx.unit, tx.commit_lsn.clone(), tx.commit_ms);
                        let (commit, events) = (tx.commit, tx.events);
                        self.emitted(&content, unit, &commit_lsn, commit_ms, out)
                            .await?;
                        out.within(commit, events);
                    }
                } else if lsn.as_u64() <= self.skip_through {
                    self.skipped += 1;
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
    ) -> Result<(), W::Error> {
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
                let Some(tx) = &mut self.open else {
                    return Ok(());
                };
                if !tx.next_event() {
                    self.skipped += 1;
                    return Ok(());
                }
                let event = row_event(columns, &new, &tx.commit_lsn, tx.commit_ms);
                let (unit, commit, events) = (tx.unit, tx.commit, tx.events);
                out.publish(unit, event).await?;
                out.within(commit, events);
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
        Err(crate::postgres::coverage::recreated(
            &self.cfg,
            start.relid,
            format_args!("{id}, in the transaction committed at {commit_lsn}"),
        )
        .into())
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
    ) -> Result<(), W::Error> {
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
            Ok::<_, SourceError>(crate::postgres::setup::prepare_logical(&**client, cfg).await?)
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
                        crate::postgres::setup::release_stale_slot(
                            &**client,
                            &cfg.source.slot,
                            stale_after,
                        )
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
            report: Arc::clone(&session.report),
            skip_through: 0,
            skipped: 0,
            skip_partial: None,
        })
    }

    fn start_position(&self) -> u64 {
        self.confirmed
    }

    fn skip_through(&mut self, recorded: u64, partial: Option<(u64, u64)>) {
        self.skip_through = recorded;
        self.skip_partial = partial;
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
    ) -> Result<(), W::Error> {
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
            return Err(lost.into());
        }
        // Also when nothing new was acknowledged: the verified position may have moved on.
        self.advance(acked.unwrap_or(0));
        self.metrics.confirmed_lsn.set(self.confirmed as i64);
        self.report
            .set_position(Lsn::from_u64(self.confirmed).to_string());
        Ok(())
    }

    /// Confirms the final position and ends the stream.
    async fn finish(&mut self, watermark: &Watermark<u64>) -> Result<(), SourceError> {
        // Coverage is verified once more inside, so the final position may be confirmed: a
        // restart then resends nothing.
        self.confirm_acknowledged(watermark).await;
        if let Some(lost) = self.coverage.lost() {
            return Err(lost.into());
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

#[cfg(test)]
mod tests {
    use super::liveness::Silence;
    use super::pgoutput::Relation;
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
    fn a_resumed_transaction_skips_its_first_events() {
        let tx = |skip, skip_events| OpenTransaction {
            unit: 0,
            commit_lsn: "0/1".into(),
            commit: 1,
            commit_ms: 0,
            skip,
            events: 0,
            skip_events,
        };
        let mut partial = tx(false, 2);
        let published: Vec<bool> = (0..4).map(|_| partial.next_event()).collect();
        assert_eq!(published, [false, false, true, true]);
        assert_eq!(partial.events, 4);
        let mut whole = tx(true, 0);
        assert!(!whole.next_event());
        let mut fresh = tx(false, 0);
        assert!(fresh.next_event());
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
