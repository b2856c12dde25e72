//! What the relay knows about itself, for `/status`, `/readyz` and the log.
//!
//! The pipeline and the background checks write here; the HTTP handlers read. Every field
//! is cheap to update from the hot path or is only written on state changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Default)]
pub struct RelayState {
    leader: AtomicBool,
    postgres_ok: AtomicBool,
    kafka_ok: AtomicBool,
    halted: AtomicBool,
    source_ok: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Inner {
    position: Option<String>,
    last_error: Option<String>,
    slot_retained_wal_bytes: Option<i64>,
    replication_lag_bytes: Option<i64>,
    missing_topic: Option<String>,
    horizon_held_back: Option<String>,
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

    pub fn set_slot_stats(&self, retained: Option<i64>, lag: Option<i64>) {
        let mut inner = self.inner();
        inner.slot_retained_wal_bytes = retained;
        inner.replication_lag_bytes = lag;
    }

    pub fn set_missing_topic(&self, problem: Option<String>) {
        self.inner().missing_topic = problem;
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
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}
