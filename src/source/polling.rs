//! The polling source: reads committed outbox rows in `(txid, seq)` order.
//!
//! Sequence numbers are handed out at insert, but transactions commit in another order, so a
//! reader of `seq > last` skips a transaction that inserted early and commits late. This one
//! reads only rows whose writing transaction is below the commit horizon,
//! `pg_snapshot_xmin(pg_current_snapshot())`: every transaction with a smaller id has ended,
//! so no row can appear behind the cursor later. Within that, `(txid, seq)` is a total order
//! and the cursor a position in it.
//!
//! Each transaction's rows in a batch become one watermark unit that ends at its last row's
//! `(txid, seq)`; the cursor is confirmed (written to `outbox.relay_state`, on the connection
//! that holds the leader lock) only past contiguous Kafka acknowledgements, like the slot in
//! logical mode. An insert trigger's `NOTIFY outbox_relay` wakes the reader at once;
//! `source.poll_interval` bounds the wait without one, and a full batch polls again at once.
//!
//! Shutdown stops polling between batches, waits for every ack, persists the final cursor and
//! only then releases the lock, so a restart publishes nothing twice.
//!
//! Alongside, [`super::backlog`] keeps the pending-row gauges, warns when a long transaction
//! holds the horizon back, and (with `source.retention`) deletes old rows the cursor passed.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use super::backlog::{self, Backlog};
use super::leader::Leadership;
use super::{Session, SourceError};
use crate::checkpoint::UnitId;
use crate::config::Config;
use crate::error::{error_chain, Definite};
use crate::postgres::setup::{self, pg, quote_ident, PollingSetup, PollingTable};
use crate::route::{OutboxEvent, Router};
use crate::sink::kafka::{KafkaSink, Shared, SinkError};

/// How often acknowledged positions are confirmed and gauges refreshed.
const TICK: Duration = Duration::from_millis(50);
/// How long shutdown waits for Kafka to acknowledge what is in flight.
const DRAIN_DEADLINE: Duration = Duration::from_secs(7);
/// How long taking the lock and preparing may take before the session is retried.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A cursor write that takes longer means the leader connection is in trouble.
const PERSIST_TIMEOUT: Duration = Duration::from_secs(5);

/// A position in the outbox's `(txid, seq)` order: everything at or before it is published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub txid: i64,
    pub seq: i64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.txid, self.seq)
    }
}

impl Cursor {
    /// Parses `txid/seq`, as stored in `outbox.relay_state.position`.
    pub fn parse(text: &str) -> Option<Self> {
        let (txid, seq) = text.split_once('/')?;
        Some(Self {
            txid: txid.trim().parse().ok()?,
            seq: seq.trim().parse().ok()?,
        })
    }
}

/// The `outbox.relay_state` row of the cursor for `cfg`'s table.
pub fn state_name(cfg: &Config) -> String {
    format!("polling:{}", cfg.source.table)
}

/// The statements of one session, built from the configured column names.
struct Queries {
    /// `$1` cursor txid, `$2` cursor seq, `$3` limit.
    read: String,
    /// For the backlog watcher.
    backlog: backlog::Statements,
}

// Column positions in `Queries::read`.
const COL_ID: usize = 0;
const COL_AGGREGATE_TYPE: usize = 1;
const COL_AGGREGATE_ID: usize = 2;
const COL_EVENT_TYPE: usize = 3;
const COL_PAYLOAD: usize = 4;
const COL_HEADERS: usize = 5;
const COL_CREATED_MS: usize = 6;
const COL_TXID: usize = 7;
const COL_SEQ: usize = 8;

impl Queries {
    fn new(cfg: &Config, table: &PollingTable) -> Self {
        let cols = &cfg.source.columns;
        let q = |name: &str| quote_ident(name);
        let relation = setup::table_sql(cfg);
        let txid = q(cols.txid.as_deref().unwrap_or_default());
        let seq = q(cols.seq.as_deref().unwrap_or_default());
        let (horizon, cursor_txid) = if table.txid_is_xid8 {
            (
                "pg_snapshot_xmin(pg_current_snapshot())",
                "$1::bigint::text::xid8",
            )
        } else {
            ("txid_snapshot_xmin(txid_current_snapshot())", "$1::bigint")
        };
        let payload = if table.payload_is_bytea {
            q(&cols.payload)
        } else {
            format!("{}::text", q(&cols.payload))
        };
        let headers = cols
            .headers
            .as_deref()
            .map_or("NULL::text".to_owned(), |h| format!("{}::text", q(h)));
        let created = cols.created_at.as_deref().map(q);
        let created_ms = created.as_deref().map_or("NULL::bigint".to_owned(), |c| {
            format!("floor(extract(epoch FROM {c}) * 1000)::bigint")
        });
        let read = format!(
            "SELECT {id}::text, {at}::text, {ai}::text, {et}::text, {payload}, {headers}, \
                    {created_ms}, {txid}::text::bigint, {seq}::bigint \
             FROM {relation} \
             WHERE {txid} < {horizon} AND ({txid}, {seq}) > ({cursor_txid}, $2::bigint) \
             ORDER BY {txid}, {seq} LIMIT $3::bigint",
            id = q(&cols.id),
            at = q(&cols.aggregate_type),
            ai = q(&cols.aggregate_id),
            et = q(&cols.event_type),
        );
        let created_or_null = created.clone().unwrap_or("NULL::timestamptz".to_owned());
        let gauges = format!(
            "WITH h AS MATERIALIZED (SELECT {horizon} AS xmin), \
                  p AS MATERIALIZED (SELECT {txid} AS txid, {created_or_null} AS created FROM {relation} \
                       WHERE ({txid}, {seq}) > ({cursor_txid}, $2::bigint) LIMIT {max}) \
             SELECT (SELECT xmin::text::bigint FROM h), \
                    (SELECT count(*) FROM p), \
                    (SELECT count(*) FROM p, h WHERE p.txid >= h.xmin), \
                    (SELECT extract(epoch FROM now() - min(created))::float8 FROM p)",
            max = backlog::MAX_PENDING_COUNT,
        );
        let retention = cfg.source.retention.zip(created).map(|(keep, created)| {
            let sql = format!(
                "DELETE FROM {relation} WHERE ctid = ANY(ARRAY( \
                     SELECT ctid FROM {relation} \
                     WHERE ({txid}, {seq}) <= ({cursor_txid}, $2::bigint) \
                       AND {created} < now() - make_interval(secs => $3::float8) \
                     LIMIT $4::bigint))"
            );
            (sql, keep)
        });
        Self {
            read,
            backlog: backlog::Statements { gauges, retention },
        }
    }
}

/// One leader session of the polling source: runs until shutdown (Ok) or a fault (Err).
pub async fn run_session(
    session: &Session,
    shutdown: &CancellationToken,
) -> Result<(), SourceError> {
    let cfg = &session.config;
    let mut leader = tokio::time::timeout(SETUP_TIMEOUT, Leadership::acquire(cfg))
        .await
        .map_err(|_| SourceError::Timeout("taking the leader lock"))??;
    let (table, start) = tokio::time::timeout(SETUP_TIMEOUT, async {
        let client = session.pool.get().await.map_err(SourceError::pool)?;
        let how = if cfg.source.create {
            PollingSetup::Run
        } else {
            PollingSetup::Inspect
        };
        let table = setup::prepare_polling(&**client, cfg, how).await?;
        let start = load_cursor(leader.client(), cfg).await?;
        Ok::<_, SourceError>((table, start))
    })
    .await
    .map_err(|_| SourceError::Timeout("preparing the polling session"))??;
    let queries = Queries::new(cfg, &table);

    let shared: Arc<Shared<Cursor>> = Shared::new(session.metrics.clone());
    let mut sink = KafkaSink::new(
        &cfg.kafka,
        Arc::clone(&shared),
        Arc::clone(&session.state),
        shutdown.clone(),
    )?;
    // A deposed leader must stop sending even while it waits for room in the queue.
    sink.stop_on(leader.lost());
    // Leading from here on: nothing below returns early.
    session.state.set_leader(true);
    session.metrics.is_leader.set(1);
    session.state.set_position(start.to_string());
    tracing::info!(
        table = %cfg.source.table,
        from = %start,
        notify = table.notify_trigger,
        poll_interval_ms = cfg.source.poll_interval.as_millis() as u64,
        "leading: polling the outbox"
    );

    let (cursor_tx, cursor_rx) = watch::channel(start);
    let backlog_stop = CancellationToken::new();
    let backlog = tokio::spawn(
        Backlog {
            pool: session.pool.clone(),
            statements: queries.backlog,
            cursor: cursor_rx,
            metrics: session.metrics.clone(),
            state: Arc::clone(&session.state),
        }
        .run(backlog_stop.clone()),
    );
    let mut poller = Poller {
        cfg,
        router: session.router.clone(),
        read_sql: queries.read,
        read_from: start,
        confirmed: start,
        persisted: start,
        cursor_tx,
    };
    let wake = leader.take_wake();
    let result = poller
        .run(&leader, wake, &mut sink, &shared, session, shutdown)
        .await;
    backlog_stop.cancel();
    let _ = backlog.await;
    match &result {
        // Halting (or any definite error) still delivers what was produced before it (those
        // rows precede the cause) and persists the cursor past everything acknowledged, so
        // that fixing the cause and restarting resends nothing. The transaction holding the
        // cause is never sealed, so the cursor stops before it.
        Err(e) if e.is_definite() => {
            if let Err(error) = poller.settle(&leader, &mut sink, &shared, session).await {
                tracing::warn!(error = %error_chain(&error), "cannot persist the cursor before halting");
            }
            sink.purge();
        }
        Err(_) => sink.purge(),
        Ok(()) => {}
    }
    session.state.set_leader(false);
    session.state.set_horizon_held_back(None);
    session.metrics.is_leader.set(0);
    // Only now: releasing the lock lets a standby start from the cursor just persisted.
    drop(leader);
    result
}

/// Reads the cursor, creating its row at the very beginning of the outbox on first start.
async fn load_cursor(client: &tokio_postgres::Client, cfg: &Config) -> Result<Cursor, SourceError> {
    let name = state_name(cfg);
    let inserted = client
        .execute(
            "INSERT INTO outbox.relay_state (name, kind, position) VALUES ($1, 'polling-cursor', $2) \
             ON CONFLICT (name) DO NOTHING",
            &[&name, &Cursor::default().to_string()],
        )
        .await;
    match inserted {
        Ok(1) => {
            tracing::info!(name = %name, "first start: polling from the beginning of the outbox")
        }
        Ok(_) => {}
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
            return Err(Definite::StateTableMissing.into())
        }
        Err(e) => return Err(pg("creating the polling cursor")(e)),
    }
    let row = client
        .query_one(
            "SELECT kind, position FROM outbox.relay_state WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(pg("reading the polling cursor"))?;
    let kind: String = row.get(0);
    let position: String = row.get(1);
    if kind != "polling-cursor" {
        return Err(Definite::CursorKind { name, kind }.into());
    }
    match Cursor::parse(&position) {
        Some(cursor) => Ok(cursor),
        None => Err(Definite::CursorUnreadable { name, position }.into()),
    }
}

struct Poller<'a> {
    cfg: &'a Config,
    router: Router,
    read_sql: String,
    /// Where the next poll reads from: past everything handed to the sink.
    read_from: Cursor,
    /// Past everything Kafka acknowledged.
    confirmed: Cursor,
    /// What `outbox.relay_state` holds.
    persisted: Cursor,
    /// The confirmed cursor, for the background gauges and retention.
    cursor_tx: watch::Sender<Cursor>,
}

impl Poller<'_> {
    async fn run(
        &mut self,
        leader: &Leadership,
        mut wake: mpsc::Receiver<()>,
        sink: &mut KafkaSink<Cursor>,
        shared: &Arc<Shared<Cursor>>,
        session: &Session,
        shutdown: &CancellationToken,
    ) -> Result<(), SourceError> {
        let reader = session.pool.get().await.map_err(SourceError::pool)?;
        let read = reader
            .prepare(&self.read_sql)
            .await
            .map_err(pg("preparing the outbox query"))?;
        let lost = leader.lost();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_poll = tokio::time::Instant::now();
        let batch = self.cfg.source.batch_size as i64;
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown: stop polling, drain, persist the final cursor.
                _ = shutdown.cancelled() => {
                    tracing::info!("shutting down: draining and persisting the cursor");
                    return self.finish(leader, sink, shared, session).await;
                }
                // 2. The lock's connection is gone: another relay may lead already.
                _ = lost.cancelled() => return Err(leader.lost_error()),
                // 3. Records Kafka refused for their content go to the dead-letter topic.
                Some(refused) = sink.refused() => {
                    sink.redirect(refused, &self.router).await?;
                }
                // 4. Confirm what Kafka has acknowledged; surface delivery failures.
                _ = tick.tick() => {
                    self.confirm(leader, sink, shared, session).await?;
                    if let Some(failure) = shared.failure() {
                        return Err(SourceError::Sink(SinkError::Delivery(failure)));
                    }
                }
                // 5. A notification, or the poll interval is up.
                _ = poll_due(&mut wake, next_poll) => {
                    let rows = reader
                        .query(&read, &[&self.read_from.txid, &self.read_from.seq, &batch])
                        .await
                        .map_err(pg("reading the outbox"))?;
                    // A full batch means more is waiting: read on at once.
                    let wait = if rows.len() as i64 >= batch {
                        Duration::ZERO
                    } else {
                        self.cfg.source.poll_interval
                    };
                    self.publish(&rows, sink, shared).await?;
                    next_poll = tokio::time::Instant::now() + wait;
                }
            }
        }
    }

    /// Hands a batch to the sink, one watermark unit per transaction.
    async fn publish(
        &mut self,
        rows: &[tokio_postgres::Row],
        sink: &mut KafkaSink<Cursor>,
        shared: &Shared<Cursor>,
    ) -> Result<(), SourceError> {
        let mut open: Option<(UnitId, Cursor)> = None;
        for row in rows {
            let at = Cursor {
                txid: get(row, COL_TXID)?,
                seq: get(row, COL_SEQ)?,
            };
            let created_ms: Option<i64> = get(row, COL_CREATED_MS)?;
            let unit = match open {
                Some((unit, last)) if last.txid == at.txid => unit,
                previous => {
                    let mut checkpoint = shared.checkpoint();
                    if let Some((unit, last)) = previous {
                        checkpoint.seal(unit, last);
                    }
                    // The transaction's start (`now()` in `created_at`) stands in for its
                    // commit time, which a table does not record.
                    checkpoint.open(Some(
                        created_ms.map_or_else(Instant::now, super::values::instant_of),
                    ))
                }
            };
            let payload = payload(row)?;
            let event = OutboxEvent {
                id: get(row, COL_ID)?,
                aggregate_type: get(row, COL_AGGREGATE_TYPE)?,
                aggregate_id: get(row, COL_AGGREGATE_ID)?,
                event_type: get(row, COL_EVENT_TYPE)?,
                payload,
                headers: get::<Option<&str>>(row, COL_HEADERS)?.map(std::borrow::Cow::Borrowed),
                timestamp_ms: Some(created_ms.unwrap_or_else(super::values::unix_ms_now)),
                pg_lsn: None,
            };
            let routed = self.router.route(event);
            super::halt_if_invalid(self.cfg.source.on_invalid, &routed)?;
            sink.send(unit, routed).await?;
            open = Some((unit, at));
        }
        if let Some((unit, last)) = open {
            shared.checkpoint().seal(unit, last);
            self.read_from = last;
        }
        Ok(())
    }

    /// Takes the newest confirmable cursor, persists it when it moved, refreshes gauges.
    async fn confirm(
        &mut self,
        leader: &Leadership,
        sink: &KafkaSink<Cursor>,
        shared: &Shared<Cursor>,
        session: &Session,
    ) -> Result<(), SourceError> {
        let (confirmable, inflight, oldest) = {
            let mut checkpoint = shared.checkpoint();
            (
                checkpoint.take_confirmable(),
                checkpoint.inflight(),
                checkpoint.oldest_committed_at(),
            )
        };
        if let Some(cursor) = confirmable {
            self.confirmed = self.confirmed.max(cursor);
        }
        if self.persist(leader).await? {
            session.state.set_position(self.confirmed.to_string());
        }
        let metrics = &session.metrics;
        metrics.inflight_events.set(inflight as i64);
        let age = oldest.map_or(0, |at| at.elapsed().as_secs() as i64);
        metrics.replication_lag_seconds.set(age);
        metrics.producer_queue_depth.set(sink.queue_depth() as i64);
        Ok(())
    }

    /// Writes the confirmed cursor on the leader's connection, if it moved; true if it did.
    async fn persist(&mut self, leader: &Leadership) -> Result<bool, SourceError> {
        if self.confirmed == self.persisted {
            return Ok(false);
        }
        let name = state_name(self.cfg);
        let position = self.confirmed.to_string();
        let written = tokio::time::timeout(
            PERSIST_TIMEOUT,
            leader.client().execute(
                "UPDATE outbox.relay_state SET position = $2, updated_at = now() \
                 WHERE name = $1 AND kind = 'polling-cursor'",
                &[&name, &position],
            ),
        )
        .await
        .map_err(|_| SourceError::Timeout("persisting the polling cursor"))?
        .map_err(|e| {
            if e.is_closed() {
                // Found before the connection's driver said so: the lock went with it.
                SourceError::LeaderLost(error_chain(&e))
            } else {
                pg("persisting the polling cursor")(e)
            }
        })?;
        if written != 1 {
            return Err(Definite::CursorVanished { name }.into());
        }
        self.persisted = self.confirmed;
        let _ = self.cursor_tx.send(self.confirmed);
        Ok(true)
    }

    /// After a definite error: delivers what is in flight (until the drain deadline) and
    /// persists the cursor past what Kafka acknowledged.
    async fn settle(
        &mut self,
        leader: &Leadership,
        sink: &mut KafkaSink<Cursor>,
        shared: &Arc<Shared<Cursor>>,
        session: &Session,
    ) -> Result<(), SourceError> {
        let drained = sink
            .drain_for_shutdown(&self.router, Instant::now() + DRAIN_DEADLINE)
            .await;
        self.confirm(leader, sink, shared, session).await?;
        tracing::info!(cursor = %self.confirmed, "acknowledged events confirmed before halting");
        Ok(drained?)
    }

    /// Drains in-flight records and persists the final cursor; the caller then releases the
    /// lock.
    async fn finish(
        &mut self,
        leader: &Leadership,
        sink: &mut KafkaSink<Cursor>,
        shared: &Arc<Shared<Cursor>>,
        session: &Session,
    ) -> Result<(), SourceError> {
        sink.drain_for_shutdown(&self.router, Instant::now() + DRAIN_DEADLINE)
            .await?;
        self.confirm(leader, sink, shared, session).await?;
        tracing::info!(cursor = %self.confirmed, "final cursor persisted");
        Ok(())
    }
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
) -> Result<T, SourceError> {
    row.try_get(index).map_err(pg("decoding an outbox row"))
}

/// The payload: text (jsonb, json, text) or bytes (bytea), borrowed from the row.
fn payload(row: &tokio_postgres::Row) -> Result<Option<std::borrow::Cow<'_, [u8]>>, SourceError> {
    // The statement casts every payload but bytea to text; bytea arrives as bytes.
    let bytes: Option<&[u8]> = match row.columns()[COL_PAYLOAD].type_() {
        &tokio_postgres::types::Type::BYTEA => get(row, COL_PAYLOAD)?,
        _ => get::<Option<&str>>(row, COL_PAYLOAD)?.map(str::as_bytes),
    };
    Ok(bytes.map(std::borrow::Cow::Borrowed))
}

/// Waits for a notification or until `at`, whichever is first.
async fn poll_due(wake: &mut mpsc::Receiver<()>, at: tokio::time::Instant) {
    tokio::select! {
        Some(()) = wake.recv() => {}
        _ = tokio::time::sleep_until(at) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_orders_by_txid_then_seq_and_round_trips() {
        let a = Cursor { txid: 7, seq: 100 };
        let b = Cursor { txid: 8, seq: 3 };
        assert!(a < b, "a later transaction sorts after, whatever its seq");
        assert!(Cursor { txid: 8, seq: 4 } > b);
        assert_eq!(a.to_string(), "7/100");
        assert_eq!(Cursor::parse("7/100"), Some(a));
        assert_eq!(Cursor::parse("0/0"), Some(Cursor::default()));
        assert_eq!(Cursor::parse("7"), None);
        assert_eq!(Cursor::parse("x/1"), None);
        assert_eq!(Cursor::parse("0/16B3748"), None, "an LSN is not a cursor");
    }

    #[test]
    fn queries_quote_the_configured_columns() {
        let mut cfg = Config::default();
        cfg.source.columns.aggregate_type = "aggregatetype".into();
        cfg.source.columns.txid = Some("xact".into());
        cfg.source.columns.created_at = None;
        let table = PollingTable {
            txid_is_xid8: true,
            payload_is_bytea: false,
            notify_trigger: true,
            indexed: true,
        };
        let q = Queries::new(&cfg, &table);
        assert!(q.read.contains("\"aggregatetype\"::text"), "{}", q.read);
        assert!(q
            .read
            .contains("\"xact\" < pg_snapshot_xmin(pg_current_snapshot())"));
        assert!(q
            .read
            .contains("(\"xact\", \"seq\") > ($1::bigint::text::xid8, $2::bigint)"));
        assert!(q.read.contains("ORDER BY \"xact\", \"seq\" LIMIT $3"));
        assert!(q.read.contains("NULL::bigint"), "no created_at column");
        assert!(q.read.contains("\"payload\"::text"));
        assert!(q.backlog.retention.is_none());

        cfg.source.columns.created_at = Some("created_at".into());
        cfg.source.retention = Some(Duration::from_secs(3600));
        let bigint = PollingTable {
            txid_is_xid8: false,
            payload_is_bytea: true,
            ..table
        };
        let q = Queries::new(&cfg, &bigint);
        assert!(q
            .read
            .contains("txid_snapshot_xmin(txid_current_snapshot())"));
        assert!(
            q.read.contains(", \"payload\", "),
            "bytea is read as bytes: {}",
            q.read
        );
        let (retention, _) = q.backlog.retention.expect("retention statement");
        assert!(
            retention.contains("<= ($1::bigint, $2::bigint)"),
            "{retention}"
        );
    }
}
