//! Polling mode's view of the backlog, every few seconds while this relay leads: how many
//! committed rows wait past the confirmed cursor and how old the oldest is (the pending
//! gauges), whether a long transaction holds the commit horizon back (`/status` and the log),
//! and, with `source.retention`, deleting old rows the cursor has passed.
//!
//! None of it may stop publishing: failures are logged and tried again next round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::polling::Cursor;
use super::Report;
use crate::error::error_chain;
use crate::metrics::Metrics;

/// How often pending rows are counted and the horizon is watched: a count is a scan.
const INTERVAL: Duration = Duration::from_secs(5);
/// A round that takes longer is abandoned (and tried again).
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);
/// Counting stops here: a backlog this deep is "very large", and counting further costs.
pub const MAX_PENDING_COUNT: i64 = 1_000_000;
/// A horizon that has not moved for this long, with rows waiting behind it, is reported.
const HORIZON_STUCK: Duration = Duration::from_secs(30);
/// How often the log repeats that the horizon is stuck.
const HORIZON_LOG_EVERY: Duration = Duration::from_secs(60);
/// Rows deleted per retention statement: short transactions, short locks.
const RETENTION_BATCH: i64 = 1000;
/// Upper bound on batches per retention pass, so one pass never runs for long.
const RETENTION_MAX_BATCHES: usize = 100;
/// Retention passes run at most this often (and at least once per `retention`).
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// The statements, built by the polling session from the configured columns.
pub struct Statements {
    /// `$1`, `$2` the confirmed cursor → horizon (bigint), pending rows, rows at or above
    /// the horizon, age in seconds of the oldest pending row.
    pub gauges: String,
    /// `$1`, `$2` the confirmed cursor, `$3` the retention in seconds, `$4` the batch size.
    pub retention: Option<(String, Duration)>,
}

/// The oldest transaction that holds an id: the culprit of a stuck horizon.
const OLDEST_XACT: &str = "SELECT pid, datname::text, state, \
        extract(epoch FROM now() - xact_start)::float8 \
    FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
    ORDER BY age(backend_xid) DESC LIMIT 1";

/// The background watcher of one leader session.
pub struct Backlog {
    pub pool: deadpool_postgres::Pool,
    pub statements: Statements,
    /// The confirmed cursor, as the session persists it.
    pub cursor: watch::Receiver<Cursor>,
    pub metrics: Metrics,
    pub report: Arc<dyn Report>,
}

impl Backlog {
    /// Runs rounds every [`INTERVAL`] until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut horizon = HorizonWatch::default();
        let mut next_retention = Instant::now();
        loop {
            let round =
                tokio::time::timeout(ROUND_TIMEOUT, self.round(&mut horizon, &mut next_retention));
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = round => outcome,
            };
            if let Ok(Err(error)) | Err(error) = outcome.map_err(|_| "timed out".to_owned()) {
                tracing::warn!(error = %error, "counting pending rows or retention failed; trying again");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
        }
    }

    async fn round(
        &self,
        horizon: &mut HorizonWatch,
        next_retention: &mut Instant,
    ) -> Result<(), String> {
        let at = *self.cursor.borrow();
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let row = client
            .query_one(self.statements.gauges.as_str(), &[&at.txid, &at.seq])
            .await
            .map_err(|e| error_chain(&e))?;
        let xmin: i64 = row.get(0);
        let pending: i64 = row.get(1);
        let held_back: i64 = row.get(2);
        let oldest_age: Option<f64> = row.get(3);
        self.metrics.pending_events.set(pending);
        self.metrics
            .oldest_pending_event_age
            .set(oldest_age.map_or(0, |s| s.max(0.0) as i64));

        match horizon.observe(xmin, held_back > 0) {
            Some(stuck_for) => {
                let culprit = client
                    .query_opt(OLDEST_XACT, &[])
                    .await
                    .ok()
                    .flatten()
                    .map(|r| {
                        format!(
                            "; the oldest is pid {} in database {} ({}, open for {} s)",
                            r.get::<_, i32>(0),
                            r.get::<_, Option<String>>(1).unwrap_or_else(|| "?".into()),
                            r.get::<_, Option<String>>(2)
                                .unwrap_or_else(|| "state not visible".into()),
                            r.get::<_, Option<f64>>(3).map_or(0, |s| s as u64),
                        )
                    })
                    .unwrap_or_default();
                let text = format!(
                    "the commit horizon (transaction {xmin}) has not moved for {} s and \
                     {held_back} committed events wait behind it: a long-running transaction \
                     anywhere in the cluster holds polling back{culprit}",
                    stuck_for.as_secs()
                );
                if horizon.should_log() {
                    tracing::warn!(xmin, held_back, stuck_secs = stuck_for.as_secs(), "{text}");
                }
                self.report.set_horizon_held_back(Some(text));
            }
            None => self.report.set_horizon_held_back(None),
        }

        let Some((sql, keep)) = &self.statements.retention else {
            return Ok(());
        };
        if Instant::now() < *next_retention {
            return Ok(());
        }
        *next_retention = Instant::now() + (*keep).min(RETENTION_EVERY);
        let mut deleted = 0u64;
        for _ in 0..RETENTION_MAX_BATCHES {
            let n = client
                .execute(
                    sql.as_str(),
                    &[&at.txid, &at.seq, &keep.as_secs_f64(), &RETENTION_BATCH],
                )
                .await
                .map_err(|e| format!("retention: {}", error_chain(&e)))?;
            deleted += n;
            self.metrics.retention_deleted.inc_by(n);
            if (n as i64) < RETENTION_BATCH {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "retention: deleted published rows");
        }
        Ok(())
    }
}

/// Tracks the commit horizon: stuck when it has not moved for [`HORIZON_STUCK`] while rows
/// wait behind it.
#[derive(Debug, Default)]
struct HorizonWatch {
    xmin: Option<i64>,
    since: Option<Instant>,
    logged_at: Option<Instant>,
}

impl HorizonWatch {
    /// Records one observation; returns how long the horizon has been stuck, if it is.
    fn observe(&mut self, xmin: i64, rows_waiting: bool) -> Option<Duration> {
        self.observe_at(xmin, rows_waiting, Instant::now())
    }

    fn observe_at(&mut self, xmin: i64, rows_waiting: bool, now: Instant) -> Option<Duration> {
        if self.xmin != Some(xmin) {
            self.xmin = Some(xmin);
            self.since = Some(now);
        }
        let stuck_for = now.duration_since(self.since.unwrap_or(now));
        if rows_waiting && stuck_for >= HORIZON_STUCK {
            Some(stuck_for)
        } else {
            self.logged_at = None;
            None
        }
    }

    fn should_log(&mut self) -> bool {
        if self
            .logged_at
            .is_some_and(|at| at.elapsed() < HORIZON_LOG_EVERY)
        {
            return false;
        }
        self.logged_at = Some(Instant::now());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizon_is_stuck_only_when_rows_wait_long_enough() {
        let mut w = HorizonWatch::default();
        let t0 = Instant::now();
        assert_eq!(w.observe_at(10, true, t0), None);
        assert_eq!(w.observe_at(10, true, t0 + Duration::from_secs(29)), None);
        assert_eq!(
            w.observe_at(10, true, t0 + Duration::from_secs(31)),
            Some(Duration::from_secs(31))
        );
        assert_eq!(
            w.observe_at(10, false, t0 + Duration::from_secs(40)),
            None,
            "nothing waits behind it"
        );
        assert_eq!(
            w.observe_at(11, true, t0 + Duration::from_secs(41)),
            None,
            "it moved"
        );
        assert_eq!(
            w.observe_at(11, true, t0 + Duration::from_secs(72)),
            Some(Duration::from_secs(31))
        );
    }
}
