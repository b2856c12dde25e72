//! What the relay knows about itself, for `/status`, `/readyz` and the log.
//!
//! The pipeline and the background checks write here; the HTTP handlers read. Every field
//! is cheap to update from the hot path or is only written on state changes.
//!
//! Liveness (`/healthz`) comes from two [`Heartbeat`]s, one for the session loop (the
//! pipeline) and one for the monitor: each beats whenever its task is polled, so a task that
//! ended, or waits on something that never wakes it, stops beating.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Default)]
pub struct RelayState {
    leader: AtomicBool,
    postgres_ok: AtomicBool,
    kafka_ok: AtomicBool,
    halted: AtomicBool,
    source_ok: AtomicBool,
    inner: Mutex<Inner>,
    /// The session loop: sources, standby and backoff waits, the halted wait.
    pub pipeline: Heartbeat,
    /// The monitor's reachability and slot checks.
    pub monitor: Heartbeat,
}

/// A task older than this since its last poll counts as wedged: well above the longest wait
/// a healthy task makes without being polled (30 s of backoff, 30 s setup timeouts).
pub const HEARTBEAT_STALE_AFTER: Duration = Duration::from_secs(60);

/// When a task was last polled, and whether it ended. Written on every poll of the task (one
/// relaxed store), read by `/healthz`.
#[derive(Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds from `origin` to the last poll; `NOT_STARTED` before the first.
    last_ms: AtomicU64,
    ended: AtomicBool,
}

const NOT_STARTED: u64 = u64::MAX;

impl Default for Heartbeat {
    fn default() -> Self {
        Self::with_origin(Instant::now())
    }
}

/// Marks the heartbeat's task ended when dropped: on return, on cancellation, on a panic.
struct EndOnDrop<'a>(&'a Heartbeat);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Relaxed);
    }
}

impl Heartbeat {
    fn with_origin(origin: Instant) -> Self {
        Self {
            origin,
            last_ms: AtomicU64::new(NOT_STARTED),
            ended: AtomicBool::new(false),
        }
    }

    /// A heartbeat whose task was last polled twice the staleness bound ago.
    #[cfg(test)]
    pub(crate) fn stale() -> Self {
        let now = Instant::now();
        let beat = Self::with_origin(now.checked_sub(HEARTBEAT_STALE_AFTER * 2).unwrap_or(now));
        beat.last_ms.store(0, Ordering::Relaxed);
        beat
    }

    /// Records that the task runs now.
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms
            .store(ms.min(NOT_STARTED - 1), Ordering::Relaxed);
    }

    /// Runs `task`, beating on every poll, and marks the heartbeat ended when the task
    /// returns, panics or is dropped.
    pub async fn run<F: Future>(&self, task: F) -> F::Output {
        let _ended = EndOnDrop(self);
        let mut task = std::pin::pin!(task);
        std::future::poll_fn(|cx| {
            self.beat();
            task.as_mut().poll(cx)
        })
        .await
    }

    /// `Err` with the reason when the task ended or has not been polled for `stale_after`
    /// at `now`; a task that has not started yet counts as alive.
    pub fn check(&self, now: Instant, stale_after: Duration) -> Result<(), String> {
        if self.ended.load(Ordering::Relaxed) {
            return Err("ended".into());
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        if last == NOT_STARTED {
            return Ok(());
        }
        let since = now
            .saturating_duration_since(self.origin)
            .saturating_sub(Duration::from_millis(last));
        if since > stale_after {
            return Err(format!("not polled for {} s", since.as_secs()));
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Serialize)]
struct Inner {
    position: Option<String>,
    last_error: Option<String>,
    slot_retained_wal_bytes: Option<i64>,
    replication_lag_bytes: Option<i64>,
    missing_topic: Option<String>,
    horizon_held_back: Option<String>,
    delivery: Option<&'static str>,
    progress: Option<String>,
}

/// The `/status` document.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub role: &'static str,
    pub ready: bool,
    pub postgres_reachable: bool,
    pub kafka_reachable: bool,
    pub position: Option<String>,
    pub replication_lag_bytes: Option<i64>,
    pub slot_retained_wal_bytes: Option<i64>,
    pub last_error: Option<String>,
    /// A Kafka topic the relay waits for (missing and not created), with the reason.
    pub waiting_for_topic: Option<String>,
    /// Polling mode: a long-running transaction holds the commit horizon back, so committed
    /// events wait; says for how long and, where visible, which session.
    pub horizon_held_back: Option<String>,
    /// `kafka.delivery`: "at-least-once" or "exactly-once".
    pub delivery: &'static str,
    /// Exactly once: the source position the last committed Kafka transaction recorded in
    /// the progress topic.
    pub recorded_progress: Option<String>,
    pub version: &'static str,
}

impl RelayState {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leading means the source works; losing the lead says nothing about that.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
        if leader {
            self.set_source_ok(true);
        }
    }

    /// Whether the last source session works: leading, or standing by behind a leader. A
    /// session that keeps failing (TLS, a dead connection) makes the relay not ready.
    pub fn set_source_ok(&self, ok: bool) {
        self.source_ok.store(ok, Ordering::Relaxed);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    pub fn set_postgres_ok(&self, ok: bool) {
        self.postgres_ok.store(ok, Ordering::Relaxed);
    }

    pub fn set_kafka_ok(&self, ok: bool) {
        self.kafka_ok.store(ok, Ordering::Relaxed);
    }

    /// The relay stopped advancing and needs the operator (a definite error).
    pub fn set_halted(&self, reason: String) {
        self.halted.store(true, Ordering::Relaxed);
        self.set_error(Some(reason));
    }

    pub fn set_position(&self, position: String) {
        self.inner().position = Some(position);
    }

    pub fn set_error(&self, error: Option<String>) {
        self.inner().last_error = error;
    }

    /// Clears the last error if it is still `error` (nothing newer replaced it).
    pub fn clear_error_if(&self, error: &str) {
        let mut inner = self.inner();
        if inner.last_error.as_deref() == Some(error) {
            inner.last_error = None;
        }
    }

    pub fn set_slot_stats(&self, retained: Option<i64>, lag: Option<i64>) {
        let mut inner = self.inner();
        inner.slot_retained_wal_bytes = retained;
        inner.replication_lag_bytes = lag;
    }

    pub fn set_missing_topic(&self, problem: Option<String>) {
        self.inner().missing_topic = problem;
    }

    /// `kafka.delivery`, as configured.
    pub fn set_delivery(&self, delivery: &'static str) {
        self.inner().delivery = Some(delivery);
    }

    /// Exactly once: the position the last committed transaction recorded.
    pub fn set_progress(&self, progress: Option<String>) {
        self.inner().progress = progress;
    }

    pub fn set_horizon_held_back(&self, problem: Option<String>) {
        self.inner().horizon_held_back = problem;
    }

    /// Ready: can reach Postgres and Kafka, leads or stands by, is not halted and waits for
    /// no topic. A healthy standby is ready.
    pub fn is_ready(&self) -> bool {
        self.postgres_ok.load(Ordering::Relaxed)
            && self.kafka_ok.load(Ordering::Relaxed)
            && !self.halted.load(Ordering::Relaxed)
            && self.source_ok.load(Ordering::Relaxed)
            && self.inner().missing_topic.is_none()
    }

    /// A state whose session loop has the given heartbeat.
    #[cfg(test)]
    pub(crate) fn with_pipeline(pipeline: Heartbeat) -> Self {
        Self {
            pipeline,
            ..Self::default()
        }
    }

    /// Liveness for `/healthz`: `Err` naming each loop that ended or is wedged.
    pub fn health(&self, now: Instant) -> Result<(), String> {
        let problems: Vec<String> = [("pipeline", &self.pipeline), ("monitor", &self.monitor)]
            .into_iter()
            .filter_map(|(name, beat)| {
                beat.check(now, HEARTBEAT_STALE_AFTER)
                    .err()
                    .map(|why| format!("{name} loop {why}"))
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    pub fn report(&self) -> StatusReport {
        let inner = self.inner().clone();
        StatusReport {
            role: if self.is_leader() {
                "leader"
            } else {
                "standby"
            },
            ready: self.is_ready(),
            postgres_reachable: self.postgres_ok.load(Ordering::Relaxed),
            kafka_reachable: self.kafka_ok.load(Ordering::Relaxed),
            position: inner.position,
            replication_lag_bytes: inner.replication_lag_bytes,
            slot_retained_wal_bytes: inner.slot_retained_wal_bytes,
            last_error: inner.last_error,
            waiting_for_topic: inner.missing_topic,
            horizon_held_back: inner.horizon_held_back,
            delivery: inner.delivery.unwrap_or("at-least-once"),
            recorded_progress: inner.progress,
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_goes_stale_after_the_bound_and_when_its_task_ends() {
        let origin = Instant::now();
        let beat = Heartbeat::with_origin(origin);
        let bound = Duration::from_secs(60);
        assert_eq!(
            beat.check(origin + Duration::from_secs(600), bound),
            Ok(()),
            "not started"
        );
        beat.last_ms.store(1_000, Ordering::Relaxed);
        assert_eq!(beat.check(origin + Duration::from_secs(61), bound), Ok(()));
        assert_eq!(
            beat.check(origin + Duration::from_secs(62), bound),
            Err("not polled for 61 s".into())
        );
        beat.beat();
        assert_eq!(beat.check(Instant::now(), bound), Ok(()));
        beat.ended.store(true, Ordering::Relaxed);
        assert_eq!(beat.check(Instant::now(), bound), Err("ended".into()));
    }

    #[test]
    fn a_task_beats_while_polled_and_ends_on_return() {
        let beat = Heartbeat::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(beat.run(async {
            assert_ne!(beat.last_ms.load(Ordering::Relaxed), NOT_STARTED);
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(beat.check(Instant::now(), HEARTBEAT_STALE_AFTER).is_ok());
        }));
        assert_eq!(
            beat.check(Instant::now(), HEARTBEAT_STALE_AFTER),
            Err("ended".into())
        );
    }

    #[test]
    fn health_names_the_loop_that_failed() {
        let state = RelayState::default();
        assert_eq!(state.health(Instant::now()), Ok(()));
        state.monitor.ended.store(true, Ordering::Relaxed);
        state.pipeline.beat();
        let later = Instant::now() + HEARTBEAT_STALE_AFTER + Duration::from_secs(5);
        let why = state.health(later).unwrap_err();
        assert!(why.contains("pipeline loop not polled for"), "{why}");
        assert!(why.contains("monitor loop ended"), "{why}");
    }
}
