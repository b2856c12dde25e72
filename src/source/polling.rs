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
//! No poll waits for acknowledgements: the next batch is read as soon as the previous one is
//! handed to the producer, so several batches are in flight, bounded by the producer's queue
//! (where publishing waits for room) as in logical mode.
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
use super::{Publish, Report, Session, Source, SourceError};
use crate::checkpoint::{UnitId, Watermark};
use crate::config::Config;
use crate::error::{error_chain, Definite};
use crate::postgres::setup::{self, pg, quote_ident, PollingSetup, PollingTable};
use crate::route::OutboxEvent;
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

/// The cursor as `txid/seq`, as in `outbox.relay_state.position`.
impl crate::checkpoint::Progress for Cursor {
    fn to_progress(&self) -> String {
        self.to_string()
    }

    fn from_progress(text: &str) -> Option<Self> {
        Self::parse(text)
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
        // The outbox columns are qualified (`o.`) where they must be the table's own: the
        // select list names its casts `txid` and `seq` too, and a bare `ORDER BY txid` would
        // sort by the cast, which no index provides; every poll would then read, convert and
        // sort every row past the cursor instead of the next `LIMIT` rows of the index.
        let read = format!(
            "SELECT {id}::text, {at}::text, {ai}::text, {et}::text, {payload}, {headers}, \
                    {created_ms}, {txid}::text::bigint, {seq}::bigint \
             FROM {relation} AS o \
             WHERE o.{txid} < {horizon} AND (o.{txid}, o.{seq}) > ({cursor_txid}, $2::bigint) \
             ORDER BY o.{txid}, o.{seq} LIMIT $3::bigint",
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

/// The statement one poll runs, for `cfg` and a table shaped like `table` (`$1` cursor txid,
/// `$2` cursor seq, `$3` limit): for tests that look at its plan.
pub fn read_statement(cfg: &Config, table: &PollingTable) -> String {
    Queries::new(cfg, table).read
}

/// The polling source of one leader session.
pub struct Polling {
    cfg: Arc<Config>,
    leader: Leadership,
    reader: deadpool_postgres::Object,
    read: tokio_postgres::Statement,
    wake: mpsc::Receiver<()>,
    next_poll: tokio::time::Instant,
    notify: bool,
    /// Where the next poll reads from: past everything handed to the sink.
    read_from: Cursor,
    /// Past everything Kafka acknowledged.
    confirmed: Cursor,
    /// What `outbox.relay_state` holds.
    persisted: Cursor,
    /// The confirmed cursor, for the background gauges and retention.
    cursor_tx: watch::Sender<Cursor>,
    /// For the backlog watcher, until it starts.
    backlog: Option<(backlog::Statements, watch::Receiver<Cursor>)>,
    backlog_task: Option<(tokio::task::JoinHandle<()>, CancellationToken)>,
    report: Arc<dyn Report>,
}

impl Source for Polling {
    type Position = Cursor;
    type Input = ();

    async fn prepare(
        session: &Session,
        _shutdown: &CancellationToken,
    ) -> Result<Self, SourceError> {
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
        let reader = session.pool.get().await.map_err(SourceError::pool)?;
        let read = reader
            .prepare(&queries.read)
            .await
            .map_err(pg("preparing the outbox query"))?;
        let (cursor_tx, cursor_rx) = watch::channel(start);
        let wake = leader.take_wake();
        Ok(Self {
            cfg: Arc::clone(cfg),
            leader,
            reader,
            read,
            wake,
            next_poll: tokio::time::Instant::now(),
            notify: table.notify_trigger,
            read_from: start,
            confirmed: start,
            persisted: start,
            cursor_tx,
            backlog: Some((queries.backlog, cursor_rx)),
            backlog_task: None,
            report: Arc::clone(&session.report),
        })
    }

    fn start_position(&self) -> Cursor {
        self.confirmed
    }

    /// Reads on from `recorded`: rows at or before it are never read again. (The cursor is
    /// row-precise and polling never reports [`Publish::within`], so there is no `partial`.)
    fn skip_through(&mut self, recorded: Cursor, _partial: Option<(Cursor, u64)>) {
        if recorded > self.read_from {
            tracing::info!(from = %self.read_from, to = %recorded, "skipping rows already published exactly once");
            self.read_from = recorded;
        }
    }

    fn start(&mut self, session: &Session) {
        session.report.set_position(self.confirmed.to_string());
        tracing::info!(
            table = %self.cfg.source.table,
            from = %self.confirmed,
            notify = self.notify,
            poll_interval_ms = self.cfg.source.poll_interval.as_millis() as u64,
            "leading: polling the outbox"
        );
        if let Some((statements, cursor)) = self.backlog.take() {
            let stop = CancellationToken::new();
            let task = tokio::spawn(
                Backlog {
                    pool: session.pool.clone(),
                    statements,
                    cursor,
                    metrics: session.metrics.clone(),
                    report: Arc::clone(&session.report),
                }
                .run(stop.clone()),
            );
            self.backlog_task = Some((task, stop));
        }
    }

    /// A deposed leader must stop sending even while it waits for room in the queue.
    fn deposed(&self) -> Option<CancellationToken> {
        Some(self.leader.lost())
    }

    /// The lock's connection is gone: another relay may lead already.
    fn lost(&self) -> CancellationToken {
        self.leader.lost()
    }

    fn lost_error(&self) -> SourceError {
        self.leader.lost_error()
    }

    /// A notification, or the poll interval is up.
    async fn next(&mut self) -> Result<(), SourceError> {
        poll_due(&mut self.wake, self.next_poll).await;
        Ok(())
    }

    async fn pump<W: Publish<Cursor> + Send>(
        &mut self,
        (): (),
        out: &mut W,
    ) -> Result<(), W::Error> {
        let batch = self.cfg.source.batch_size as i64;
        let rows = self
            .reader
            .query(
                &self.read,
                &[&self.read_from.txid, &self.read_from.seq, &batch],
            )
            .await
            .map_err(|e| SourceError::from(pg("reading the outbox")(e)))?;
        // A full batch means more is waiting: read on at once.
        let wait = if rows.len() as i64 >= batch {
            Duration::ZERO
        } else {
            self.cfg.source.poll_interval
        };
        self.publish(&rows, out).await?;
        self.next_poll = tokio::time::Instant::now() + wait;
        Ok(())
    }

    /// Polling stops between batches: a batch is handed over whole.
    fn at_boundary(&self) -> bool {
        true
    }

    /// Persists the newest confirmable cursor when it moved.
    async fn confirm(&mut self, acked: Option<Cursor>) -> Result<(), SourceError> {
        if let Some(cursor) = acked {
            self.confirmed = self.confirmed.max(cursor);
        }
        if self.persist().await? {
            self.report.set_position(self.confirmed.to_string());
        }
        Ok(())
    }

    /// Persists the final cursor; the session then releases the lock.
    async fn finish(&mut self, watermark: &Watermark<Cursor>) -> Result<(), SourceError> {
        let acked = watermark.lock().take_confirmable();
        self.confirm(acked).await?;
        tracing::info!(cursor = %self.confirmed, "final cursor persisted");
        Ok(())
    }

    /// Persists the cursor past what Kafka acknowledged.
    async fn settle(&mut self, watermark: &Watermark<Cursor>) {
        let acked = watermark.lock().take_confirmable();
        match self.confirm(acked).await {
            Ok(()) => {
                tracing::info!(cursor = %self.confirmed, "acknowledged events confirmed before halting")
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot persist the cursor before halting")
            }
        }
    }

    async fn stop(&mut self) {
        if let Some((task, stop)) = self.backlog_task.take() {
            stop.cancel();
            let _ = task.await;
        }
        self.report.set_horizon_held_back(None);
    }
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
        Err(e) => return Err(pg("creating the polling cursor")(e).into()),
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

impl Polling {
    /// Hands a batch to the sink, one watermark unit per transaction.
    async fn publish<W: Publish<Cursor> + Send>(
        &mut self,
        rows: &[tokio_postgres::Row],
        out: &mut W,
    ) -> Result<(), W::Error> {
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
                    if let Some((unit, last)) = previous {
                        out.seal(unit, last);
                    }
                    // The transaction's start (`now()` in `created_at`) stands in for its
                    // commit time, which a table does not record.
                    out.open(Some(
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
            out.publish(unit, event).await?;
            open = Some((unit, at));
        }
        if let Some((unit, last)) = open {
            out.seal(unit, last);
            self.read_from = last;
        }
        Ok(())
    }

    /// Writes the confirmed cursor on the leader's connection, if it moved; true if it did.
    async fn persist(&mut self) -> Result<bool, SourceError> {
        if self.confirmed == self.persisted {
            return Ok(false);
        }
        let name = state_name(&self.cfg);
        let position = self.confirmed.to_string();
        let written = tokio::time::timeout(
            PERSIST_TIMEOUT,
            self.leader.client().execute(
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
                pg("persisting the polling cursor")(e).into()
            }
        })?;
        if written != 1 {
            return Err(Definite::CursorVanished { name }.into());
        }
        self.persisted = self.confirmed;
        let _ = self.cursor_tx.send(self.confirmed);
        Ok(true)
    }
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
) -> Result<T, SourceError> {
    Ok(row.try_get(index).map_err(pg("decoding an outbox row"))?)
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
            .contains("o.\"xact\" < pg_snapshot_xmin(pg_current_snapshot())"));
        assert!(q
            .read
            .contains("(o.\"xact\", o.\"seq\") > ($1::bigint::text::xid8, $2::bigint)"));
        assert!(
            q.read.contains("ORDER BY o.\"xact\", o.\"seq\" LIMIT $3"),
            "the index's columns, not the select list's casts of the same names: {}",
            q.read
        );
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
