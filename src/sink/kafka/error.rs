//! What can go wrong in the sink, and a record Kafka refused for its own content.

use rdkafka::error::KafkaError;

use crate::checkpoint::UnitId;
use crate::error::Definite;
use crate::route::{DeadLetterReason, Record};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the Kafka producer")]
    Create(#[source] KafkaError),
    #[error("cannot produce to Kafka")]
    Produce(#[source] KafkaError),
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("delivery to Kafka failed: {0}")]
    Delivery(String),
    #[error("stopped while waiting for topic {0}")]
    Stopped(String),
    #[error("shutdown could not wait any longer for room in the producer queue (Kafka takes no records); what it holds is resent after the restart")]
    QueueFullAtShutdown,
    #[error("the leader lock was lost; stopped producing")]
    LeadershipLost,
    #[error("topic {topic} refused a batch of records as too large; producer batches are now capped at {cap} bytes and the records are resent")]
    BatchTooLarge { topic: String, cap: usize },
    /// Exactly once: a Kafka transaction failed (aborted, or this producer was fenced by a
    /// relay that took over); the session restarts from the recorded progress.
    #[error("kafka transaction failed while {context}: {error}")]
    Transaction {
        context: &'static str,
        error: String,
    },
    /// Only the operator can fix it (the dead-letter topic refused a record for good).
    #[error(transparent)]
    Definite(Definite),
}

/// What a refused record was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedKind {
    /// An event for its topic: it goes to the dead-letter topic.
    Event,
    /// A dead-letter record: it is tried once more without its value.
    DeadLetter,
    /// A dead-letter record already without its value: the relay halts.
    DeadLetterWithoutValue,
}

/// A record Kafka refused for its own content: the pipeline dead-letters it in its unit.
#[derive(Debug)]
pub struct Refused {
    pub unit: UnitId,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub reason: DeadLetterReason,
    pub error: String,
    pub kind: RefusedKind,
}

impl Refused {
    /// `record` of `unit`, refused before it reached the broker.
    pub(super) fn of(
        unit: UnitId,
        record: &Record<'_>,
        reason: DeadLetterReason,
        error: String,
        kind: RefusedKind,
        keep_value: bool,
    ) -> Self {
        Self {
            unit,
            topic: record.topic.to_string(),
            key: record.key.map(<[u8]>::to_vec),
            value: record
                .value
                .as_deref()
                .filter(|_| keep_value)
                .map(<[u8]>::to_vec),
            headers: record
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
            reason,
            error,
            kind,
        }
    }
}
