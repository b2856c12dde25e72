//! Prometheus metrics: every name and label key in one place (SPEC §6, `docs/METRICS.md`).
//!
//! The pipeline holds one [`Metrics`] and updates it directly; `/metrics` encodes its
//! registry. Label values are bounded: topics come from the outbox's aggregate types, reasons
//! and kinds from fixed enums.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub const EVENTS_PUBLISHED_TOTAL: &str = "outbox_relay_events_published_total";
pub const EVENTS_DEAD_LETTERED_TOTAL: &str = "outbox_relay_events_dead_lettered_total";
pub const PUBLISH_ERRORS_TOTAL: &str = "outbox_relay_publish_errors_total";
pub const INFLIGHT_EVENTS: &str = "outbox_relay_inflight_events";
pub const END_TO_END_LATENCY_SECONDS: &str = "outbox_relay_end_to_end_latency_seconds";
pub const REPLICATION_LAG_BYTES: &str = "outbox_relay_replication_lag_bytes";
pub const SLOT_RETAINED_WAL_BYTES: &str = "outbox_relay_slot_retained_wal_bytes";
pub const PENDING_EVENTS: &str = "outbox_relay_pending_events";
pub const OLDEST_PENDING_EVENT_AGE_SECONDS: &str = "outbox_relay_oldest_pending_event_age_seconds";
pub const IS_LEADER: &str = "outbox_relay_is_leader";
pub const SOURCE_RECONNECTS_TOTAL: &str = "outbox_relay_source_reconnects_total";
pub const BUILD_INFO: &str = "outbox_relay_build_info";
pub const IGNORED_CHANGES_TOTAL: &str = "outbox_relay_ignored_changes_total";
pub const CONFIRMED_LSN: &str = "outbox_relay_confirmed_lsn";
pub const REPLICATION_LAG_SECONDS: &str = "outbox_relay_replication_lag_seconds";
pub const SLOT_WAL_STATUS: &str = "outbox_relay_slot_wal_status";
pub const PRODUCER_QUEUE_DEPTH: &str = "outbox_relay_producer_queue_depth";
pub const HALTED: &str = "outbox_relay_halted";
pub const RETENTION_DELETED_EVENTS_TOTAL: &str = "outbox_relay_retention_deleted_events_total";
pub const RESERVED_HEADERS_DROPPED_TOTAL: &str = "outbox_relay_reserved_headers_dropped_total";
pub const KAFKA_TRANSACTIONS_TOTAL: &str = "outbox_relay_kafka_transactions_total";
pub const KAFKA_TRANSACTION_DURATION_SECONDS: &str =
    "outbox_relay_kafka_transaction_duration_seconds";
pub const KAFKA_TRANSACTION_RECORDS: &str = "outbox_relay_kafka_transaction_records";

pub const LABEL_TOPIC: &str = "topic";
pub const LABEL_REASON: &str = "reason";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_VERSION: &str = "version";
pub const LABEL_OPERATION: &str = "operation";
pub const LABEL_STATUS: &str = "status";
pub const LABEL_OUTCOME: &str = "outcome";

/// The `kind` values of `outbox_relay_publish_errors_total` (see `sink::kafka::error_kind`).
pub const PUBLISH_ERROR_KINDS: [&str; 6] = [
    "message_too_large",
    "invalid_topic",
    "unknown_topic",
    "timeout",
    "fatal",
    "other",
];

/// The values of `pg_replication_slots.wal_status`, each a series of
/// `outbox_relay_slot_wal_status` (1 for the current one).
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// Commit-to-ack buckets, in seconds: fine around the 25 ms target, wide enough for outages.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The relay's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub events_published: IntCounterVec,
    pub events_dead_lettered: IntCounterVec,
    pub publish_errors: IntCounterVec,
    pub inflight_events: IntGauge,
    pub end_to_end_latency: Histogram,
    pub replication_lag_bytes: IntGauge,
    pub slot_retained_wal_bytes: IntGauge,
    pub pending_events: IntGauge,
    pub oldest_pending_event_age: IntGauge,
    pub is_leader: IntGauge,
    pub source_reconnects: IntCounter,
    pub ignored_changes: IntCounterVec,
    pub confirmed_lsn: IntGauge,
    pub replication_lag_seconds: IntGauge,
    pub slot_wal_status: IntGaugeVec,
    pub producer_queue_depth: IntGauge,
    pub halted: IntGauge,
    pub retention_deleted: IntCounter,
    pub reserved_headers_dropped: IntCounter,
    /// Exactly once: Kafka transactions by outcome (committed, aborted).
    pub transactions: IntCounterVec,
    pub transaction_duration: Histogram,
    pub transaction_records: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let events_published = counter_vec(
            EVENTS_PUBLISHED_TOTAL,
            "Events acknowledged by Kafka, by topic.",
            LABEL_TOPIC,
        );
        let events_dead_lettered = counter_vec(
            EVENTS_DEAD_LETTERED_TOTAL,
            "Events published to the dead-letter topic, by reason.",
            LABEL_REASON,
        );
        let publish_errors = counter_vec(
            PUBLISH_ERRORS_TOTAL,
            "Errors while publishing to Kafka, by kind.",
            LABEL_KIND,
        );
        let ignored_changes = counter_vec(
            IGNORED_CHANGES_TOTAL,
            "UPDATE, DELETE and TRUNCATE changes to the outbox, which publish nothing.",
            LABEL_OPERATION,
        );
        let end_to_end_latency = Histogram::with_opts(
            HistogramOpts::new(
                END_TO_END_LATENCY_SECONDS,
                "Time from the source transaction's commit to Kafka's acknowledgement.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(end_to_end_latency.clone()))
            .expect("unique metric");
        let source_reconnects = IntCounter::new(
            SOURCE_RECONNECTS_TOTAL,
            "Times the source connection was re-established after a fault.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(source_reconnects.clone()))
            .expect("unique metric");
        let retention_deleted = IntCounter::new(
            RETENTION_DELETED_EVENTS_TOTAL,
            "Polling mode: published outbox rows deleted by source.retention.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(retention_deleted.clone()))
            .expect("unique metric");
        let reserved_headers_dropped = IntCounter::new(
            RESERVED_HEADERS_DROPPED_TOTAL,
            "Row headers dropped because their name is the relay's own (id, event_type, aggregate_type, pg_lsn, dlq_*).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(reserved_headers_dropped.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                BUILD_INFO,
                "Always 1; the version label says which build runs.",
            ),
            &[LABEL_VERSION],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("unique metric");

        for reason in crate::route::DeadLetterReason::ALL {
            events_dead_lettered.with_label_values(&[reason.as_str()]);
        }
        let slot_wal_status = IntGaugeVec::new(
            Opts::new(
                SLOT_WAL_STATUS,
                "The slot's wal_status: 1 for the current value (reserved, extended, unreserved, lost).",
            ),
            &[LABEL_STATUS],
        )
        .expect("valid metric");
        registry
            .register(Box::new(slot_wal_status.clone()))
            .expect("unique metric");
        for status in WAL_STATUSES {
            slot_wal_status.with_label_values(&[status]);
        }
        let transactions = counter_vec(
            KAFKA_TRANSACTIONS_TOTAL,
            "Exactly once: Kafka transactions, by outcome (committed, aborted).",
            LABEL_OUTCOME,
        );
        for outcome in ["committed", "aborted"] {
            transactions.with_label_values(&[outcome]);
        }
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let transaction_duration = histogram(
            KAFKA_TRANSACTION_DURATION_SECONDS,
            "Exactly once: time from a Kafka transaction's first record to its commit.",
            LATENCY_BUCKETS,
        );
        let transaction_records = histogram(
            KAFKA_TRANSACTION_RECORDS,
            "Exactly once: records per committed Kafka transaction (the progress record not counted).",
            &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0],
        );
        for kind in PUBLISH_ERROR_KINDS {
            publish_errors.with_label_values(&[kind]);
        }
        for op in ["update", "delete", "truncate"] {
            ignored_changes.with_label_values(&[op]);
        }

        Self {
            events_published,
            events_dead_lettered,
            publish_errors,
            inflight_events: gauge(INFLIGHT_EVENTS, "Records produced and not yet acknowledged."),
            end_to_end_latency,
            replication_lag_bytes: gauge(
                REPLICATION_LAG_BYTES,
                "Bytes of WAL between the server's current position and the slot's confirmed position.",
            ),
            slot_retained_wal_bytes: gauge(
                SLOT_RETAINED_WAL_BYTES,
                "Bytes of WAL the replication slot keeps on the server's disk.",
            ),
            pending_events: gauge(
                PENDING_EVENTS,
                "Polling mode: outbox rows committed and not yet published.",
            ),
            oldest_pending_event_age: gauge(
                OLDEST_PENDING_EVENT_AGE_SECONDS,
                "Age of the oldest committed event not yet acknowledged by Kafka.",
            ),
            is_leader: gauge(IS_LEADER, "1 while this relay publishes, 0 while it stands by."),
            source_reconnects,
            ignored_changes,
            confirmed_lsn: gauge(
                CONFIRMED_LSN,
                "The source position last confirmed (an LSN as a number in logical mode).",
            ),
            replication_lag_seconds: gauge(
                REPLICATION_LAG_SECONDS,
                "Seconds since the oldest committed event not yet confirmed was committed (0 when caught up).",
            ),
            slot_wal_status,
            producer_queue_depth: gauge(
                PRODUCER_QUEUE_DEPTH,
                "Records and requests waiting in the Kafka producer's local queue.",
            ),
            halted: gauge(
                HALTED,
                "1 when the relay stopped advancing and needs the operator (see /status).",
            ),
            retention_deleted,
            reserved_headers_dropped,
            transactions,
            transaction_duration,
            transaction_records,
            registry,
        }
    }

    /// Marks `status` as the slot's current `wal_status`.
    pub fn set_wal_status(&self, status: &str) {
        for known in WAL_STATUSES {
            self.slot_wal_status
                .with_label_values(&[known])
                .set(i64::from(known == status));
        }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_required_names() {
        let m = Metrics::new();
        m.events_published.with_label_values(&["t"]).inc();
        m.publish_errors.with_label_values(&["delivery"]).inc();
        m.end_to_end_latency.observe(0.01);
        let text = m.encode();
        for name in [
            EVENTS_PUBLISHED_TOTAL,
            EVENTS_DEAD_LETTERED_TOTAL,
            PUBLISH_ERRORS_TOTAL,
            INFLIGHT_EVENTS,
            END_TO_END_LATENCY_SECONDS,
            REPLICATION_LAG_BYTES,
            SLOT_RETAINED_WAL_BYTES,
            PENDING_EVENTS,
            OLDEST_PENDING_EVENT_AGE_SECONDS,
            IS_LEADER,
            SOURCE_RECONNECTS_TOTAL,
            BUILD_INFO,
            REPLICATION_LAG_SECONDS,
            SLOT_WAL_STATUS,
            PRODUCER_QUEUE_DEPTH,
            HALTED,
            RETENTION_DELETED_EVENTS_TOTAL,
            RESERVED_HEADERS_DROPPED_TOTAL,
            KAFKA_TRANSACTIONS_TOTAL,
            KAFKA_TRANSACTION_DURATION_SECONDS,
            KAFKA_TRANSACTION_RECORDS,
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains(&format!(
            "{BUILD_INFO}{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
