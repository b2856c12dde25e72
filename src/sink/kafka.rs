//! The Kafka side: an idempotent librdkafka producer whose delivery reports feed the
//! watermark.
//!
//! Records are handed to librdkafka with their watermark unit's number as the delivery
//! opaque; the delivery callback (on librdkafka's polling thread) acknowledges the unit, so
//! the source can confirm positions as soon as a contiguous run of units is acknowledged. A
//! full local queue is backpressure: `send` waits for room instead of failing, but not past
//! a lost leadership or a shutdown's deadline. A record Kafka refuses for its own content
//! (too large, illegal topic) comes back to the pipeline as a [`Refused`] to be dead-lettered
//! in the same unit; any other delivery failure is a transient fault that restarts the
//! pipeline from the confirmed position.
//!
//! Two refusals need more than that:
//! - The broker refuses a whole *batch* as too large when the topic's `max.message.bytes` is
//!   below the batch. Only a record that was alone in its batch (bigger than `batch.size`) is
//!   too large itself and dead-lettered; otherwise the relay learns the topic's limit (or, if
//!   it can't read it, halves `batch.size`), caps `batch.size` below it for the rest of the
//!   process, and restarts from the confirmed position: records are resent in order, in
//!   batches that fit, with their values.
//! - A dead-letter record the broker refuses is sent once more without its value; refused
//!   again, the relay halts with a definite error instead of restarting forever.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;

use crate::checkpoint::{Checkpoint, UnitId};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::route::{DeadLetterReason, Record, Routed, Router};
use crate::status::RelayState;
use tokio_util::sync::CancellationToken;

/// librdkafka's default `message.max.bytes`, used when the config does not set it.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Records librdkafka may hold before `send` waits: bounds memory (librdkafka keeps about
/// 800 bytes per queued record of a typical outbox event, headers included) while leaving
/// room for several requests of full batches to the broker. In the benchmark 20,000 drains
/// as fast as 100,000 did, with 25 MB less peak RSS than 50,000.
const DEFAULT_QUEUE_MESSAGES: &str = "20000";

/// How long topic creation may take before the session is retried.
const TOPIC_CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The byte bound on the same queue (librdkafka's default is 1 GiB): large payloads must not
/// push the relay past its memory budget.
const DEFAULT_QUEUE_KBYTES: &str = "65536";

/// Upper bound between checks for a missing topic.
const MISSING_TOPIC_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the log repeats that a topic is missing.
const MISSING_TOPIC_LOG_EVERY: Duration = Duration::from_secs(60);

/// How long `send` sleeps when librdkafka's queue is full before trying again.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(1);
/// After shutdown, how long one wait for room in a full queue may last. Kafka taking records
/// at all empties the queue within milliseconds, so the open transaction still finishes
/// cleanly; Kafka down would hold the queue full forever. Below the sources' drain deadline.
const QUEUE_WAIT_ON_SHUTDOWN: Duration = Duration::from_secs(5);
/// A wait for room this long is logged: Kafka takes no records.
const QUEUE_WAIT_LOG_AFTER: Duration = Duration::from_secs(5);

/// librdkafka's default `batch.size`.
const DEFAULT_BATCH_BYTES: usize = 1_000_000;
/// The smallest `batch.size` the relay caps the producer to.
const MIN_BATCH_BYTES: usize = 1_024;
/// How long reading a topic's `max.message.bytes` may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `batch.size` cap learned from topics that refused a batch as too large (0: none). It
/// outlives the session that learned it, so the restarted producer is built with it; a new
/// process learns it again on the first refusal.
static BATCH_CAP: AtomicUsize = AtomicUsize::new(0);

/// Bits of the delivery opaque that say what kind of record it was (0 = an event, else a
/// dead-letter reason + 1, plus [`WITHOUT_VALUE`] on a dead-letter record's second try); the
/// rest is the unit id.
const KIND_BITS: u32 = 4;
/// The kind bit of a dead-letter record resent without its value after a refusal.
const WITHOUT_VALUE: usize = 1 << (KIND_BITS - 1);

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
    #[error("leadership was lost while waiting for room in the producer queue")]
    LeadershipLost,
    #[error("topic {topic} refused a batch of records as too large; producer batches are now capped at {cap} bytes and the records are resent")]
    BatchTooLarge { topic: String, cap: usize },
    #[error("the dead-letter topic {topic} refused a record even without its value ({error}); to fix: let the topic take it (its max.message.bytes, policy or ACLs), then restart the relay")]
    DeadLetterRefused { topic: String, error: String },
}

impl SinkError {
    /// True when retrying cannot help: the relay halts and says why.
    pub fn is_definite(&self) -> bool {
        matches!(self, Self::DeadLetterRefused { .. })
    }
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
    /// Refused by the broker (for a whole batch, maybe), not by librdkafka before sending.
    pub by_broker: bool,
}

impl Refused {
    /// Key, value and header bytes: at most what the record takes in a batch.
    fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// State shared between the pipeline and the delivery callback.
pub struct Shared<P> {
    checkpoint: Mutex<Checkpoint<P>>,
    pub metrics: Metrics,
    /// The first delivery failure that must restart the pipeline.
    failure: Mutex<Option<String>>,
}

impl<P: Copy + Ord> Shared<P> {
    pub fn new(metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            checkpoint: Mutex::new(Checkpoint::new()),
            metrics,
            failure: Mutex::new(None),
        })
    }

    pub fn checkpoint(&self) -> MutexGuard<'_, Checkpoint<P>> {
        // A panic while holding the lock can't leave the counters half-updated in a way that
        // matters more than stopping would; keep going with the data.
        self.checkpoint
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A delivery failure that requires a restart, if one happened.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fail(&self, message: String) {
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(message);
        }
    }
}

/// The librdkafka context: logs client errors, turns delivery reports into acks.
pub struct DeliveryContext<P> {
    shared: Arc<Shared<P>>,
    refused: mpsc::UnboundedSender<Refused>,
    /// The published counter of the topic acknowledged last: acks come in runs of one topic,
    /// and looking the labelled counter up costs more than the rest of an ack.
    last_topic: Mutex<Option<(String, IntCounter)>>,
}

impl<P> DeliveryContext<P> {
    fn count_published(&self, topic: &str) {
        let mut last = self.last_topic.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((name, counter)) if name == topic => counter.inc(),
            _ => {
                let counter = self
                    .shared
                    .metrics
                    .events_published
                    .with_label_values(&[topic]);
                counter.inc();
                *last = Some((topic.to_owned(), counter));
            }
        }
    }
}

impl<P: Send + Sync> ClientContext for DeliveryContext<P> {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl<P: Copy + Ord + Send + Sync> ProducerContext for DeliveryContext<P> {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let unit = (opaque >> KIND_BITS) as UnitId;
        let kind = opaque & ((1 << KIND_BITS) - 1);
        let metrics = &self.shared.metrics;
        match result {
            Ok(message) => {
                let committed_at = self.shared.checkpoint().ack(unit);
                if let Some(at) = committed_at {
                    metrics
                        .end_to_end_latency
                        .observe(at.elapsed().as_secs_f64());
                }
                match reason_of_kind(kind) {
                    Some(reason) => metrics
                        .events_dead_lettered
                        .with_label_values(&[reason.as_str()])
                        .inc(),
                    None => self.count_published(message.topic()),
                }
            }
            Err((error, message)) => {
                let code = error.rdkafka_error_code();
                metrics
                    .publish_errors
                    .with_label_values(&[error_kind(code)])
                    .inc();
                let refused_kind = match (kind, kind & WITHOUT_VALUE) {
                    (0, _) => RefusedKind::Event,
                    (_, 0) => RefusedKind::DeadLetter,
                    _ => RefusedKind::DeadLetterWithoutValue,
                };
                // An event may be refused for its size or topic name; a dead-letter record
                // also for what the topic's policy or ACLs say: another try won't change it.
                let reason = match refused_kind {
                    RefusedKind::Event => event_refusal(code),
                    _ if refuses_dead_letter(code) => reason_of_kind(kind),
                    _ => None,
                };
                match reason {
                    Some(reason) => {
                        let refused = Refused {
                            unit,
                            topic: message.topic().to_owned(),
                            key: message.key().map(<[u8]>::to_vec),
                            value: message.payload().map(<[u8]>::to_vec),
                            headers: message
                                .headers()
                                .map(|h| {
                                    h.iter()
                                        .map(|h| {
                                            (h.key.to_owned(), h.value.unwrap_or(&[]).to_vec())
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                            reason,
                            error: error.to_string(),
                            kind: refused_kind,
                            by_broker: true,
                        };
                        if self.refused.send(refused).is_err() {
                            self.shared
                                .fail("pipeline gone while a record was refused".into());
                        }
                    }
                    None => self
                        .shared
                        .fail(format!("delivery to {} failed: {error}", message.topic())),
                }
            }
        }
    }
}

/// Why Kafka refused an event for its own content, if it did.
fn event_refusal(code: Option<RDKafkaErrorCode>) -> Option<DeadLetterReason> {
    match code? {
        RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::MessageBatchTooLarge => Some(DeadLetterReason::MessageTooLarge),
        RDKafkaErrorCode::InvalidTopic => Some(DeadLetterReason::InvalidTopic),
        _ => None,
    }
}

/// Whether `code` says the dead-letter topic will not take a record as it is.
fn refuses_dead_letter(code: Option<RDKafkaErrorCode>) -> bool {
    event_refusal(code).is_some()
        || matches!(
            code,
            Some(
                RDKafkaErrorCode::InvalidRecord
                    | RDKafkaErrorCode::PolicyViolation
                    | RDKafkaErrorCode::TopicAuthorizationFailed
            )
        )
}

/// The dead-letter reason a delivery opaque's kind bits carry.
fn reason_of_kind(kind: usize) -> Option<DeadLetterReason> {
    (kind & !WITHOUT_VALUE)
        .checked_sub(1)
        .and_then(|k| DeadLetterReason::ALL.get(k))
        .copied()
}

/// The `kind` label for a delivery error; one of `metrics::PUBLISH_ERROR_KINDS`.
fn error_kind(code: Option<RDKafkaErrorCode>) -> &'static str {
    match code {
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
        | Some(RDKafkaErrorCode::InvalidMessageSize)
        | Some(RDKafkaErrorCode::MessageBatchTooLarge) => "message_too_large",
        Some(RDKafkaErrorCode::InvalidTopic) => "invalid_topic",
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
            "unknown_topic"
        }
        Some(RDKafkaErrorCode::MessageTimedOut) => "timeout",
        Some(RDKafkaErrorCode::Fatal) => "fatal",
        _ => "other",
    }
}

/// The producer side of one pipeline session.
pub struct KafkaSink<P: Copy + Ord + Send + Sync + 'static> {
    producer: ThreadedProducer<DeliveryContext<P>>,
    admin: AdminClient<DefaultClientContext>,
    known_topics: HashSet<String>,
    create_topics: bool,
    partitions: i32,
    refused: mpsc::UnboundedReceiver<Refused>,
    refused_tx: mpsc::UnboundedSender<Refused>,
    shared: Arc<Shared<P>>,
    state: Arc<RelayState>,
    shutdown: CancellationToken,
    /// Cancelled when this relay no longer leads: stop producing at once.
    stop: CancellationToken,
    /// This producer's `batch.size`: a refused record bigger than this was alone in its batch.
    batch_bytes: usize,
    /// Topics' `max.message.bytes`, as read after a refused batch (`None`: unreadable).
    topic_limits: HashMap<String, Option<usize>>,
}

/// The librdkafka settings for the producer: our defaults, then `[kafka.properties]`
/// verbatim, then the `batch.size` cap learned from topics that refused a batch.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        // Wait for the broker instead of failing records: an outage is backpressure, not
        // data loss, and a failed record would only be resent after a restart.
        .set("message.timeout.ms", "0")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", DEFAULT_QUEUE_MESSAGES)
        .set("queue.buffering.max.kbytes", DEFAULT_QUEUE_KBYTES);
    for (key, value) in &cfg.properties {
        config.set(key, value);
    }
    let cap = BATCH_CAP.load(Ordering::Relaxed);
    if cap > 0 && cap < configured_batch_bytes(cfg) {
        config.set("batch.size", cap.to_string());
    }
    config
}

/// `batch.size` as configured (librdkafka's default unless set).
fn configured_batch_bytes(cfg: &KafkaConfig) -> usize {
    cfg.properties
        .get("batch.size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_BATCH_BYTES)
}

/// The producer's `message.max.bytes`: what the router compares record sizes with.
pub fn max_message_bytes(cfg: &KafkaConfig) -> usize {
    cfg.properties
        .get("message.max.bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
}

impl<P: Copy + Ord + Send + Sync + 'static> KafkaSink<P> {
    /// `state` hears about topics the sink waits for; `shutdown` ends such a wait.
    pub fn new(
        cfg: &KafkaConfig,
        shared: Arc<Shared<P>>,
        state: Arc<RelayState>,
        shutdown: CancellationToken,
    ) -> Result<Self, SinkError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = client_config(cfg);
        let batch_bytes = client
            .get("batch.size")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_BATCH_BYTES);
        let producer = client
            .create_with_context(DeliveryContext {
                shared: Arc::clone(&shared),
                refused: tx.clone(),
                last_topic: Mutex::new(None),
            })
            .map_err(SinkError::Create)?;
        let admin = admin_config(cfg).create().map_err(SinkError::Create)?;
        Ok(Self {
            producer,
            admin,
            known_topics: HashSet::new(),
            create_topics: cfg.create_topics,
            partitions: cfg.topic_partitions,
            refused: rx,
            refused_tx: tx,
            shared,
            state,
            shutdown,
            stop: CancellationToken::new(),
            batch_bytes,
            topic_limits: HashMap::new(),
        })
    }

    /// Stops producing (a send waiting for room fails) once `stop` is cancelled: polling's
    /// lost leadership, after which another relay may already publish.
    pub fn stop_on(&mut self, stop: CancellationToken) {
        self.stop = stop;
    }

    pub fn shared(&self) -> &Arc<Shared<P>> {
        &self.shared
    }

    /// Produces one routed record as part of `unit`; waits while librdkafka's queue is full.
    pub async fn send(&mut self, unit: UnitId, routed: Routed<'_>) -> Result<(), SinkError> {
        let (record, kind) = match routed {
            Routed::Publish(record) => (record, 0),
            Routed::DeadLetter { record, reason } => (record, reason_kind(reason)),
        };
        self.produce(unit, record, kind).await
    }

    /// Produces `record` with the delivery `kind` bits as part of `unit`.
    async fn produce(
        &mut self,
        unit: UnitId,
        record: Record<'_>,
        kind: usize,
    ) -> Result<(), SinkError> {
        self.ensure_topic(&record.topic).await?;
        self.shared.checkpoint().add(unit);
        let opaque = ((unit as usize) << KIND_BITS) | kind;
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_ref()),
            });
        }
        let mut base = BaseRecord::with_opaque_to(&record.topic, opaque).headers(headers);
        if let Some(key) = record.key {
            base = base.key(key);
        }
        if let Some(value) = record.value.as_deref() {
            base = base.payload(value);
        }
        if let Some(ts) = record.timestamp_ms {
            base = base.timestamp(ts);
        }
        let mut wait = QueueWait::default();
        loop {
            match self.producer.send(base) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    base = back;
                    if let Err(error) = self.wait_for_room(&mut wait).await {
                        self.shared.checkpoint().ack(unit);
                        return Err(error);
                    }
                }
                Err((KafkaError::MessageProduction(code), back))
                    if matches!(
                        code,
                        RDKafkaErrorCode::MessageSizeTooLarge
                            | RDKafkaErrorCode::InvalidMessageSize
                    ) =>
                {
                    // librdkafka checks the size itself. The record stays counted in its
                    // unit until its dead letter is acknowledged.
                    drop(back);
                    let kind_bits = kind;
                    let (kind, value) = match (kind, kind & WITHOUT_VALUE) {
                        (0, _) => (RefusedKind::Event, None),
                        (_, 0) => (
                            RefusedKind::DeadLetter,
                            record.value.as_deref().map(<[u8]>::to_vec),
                        ),
                        _ => (RefusedKind::DeadLetterWithoutValue, None),
                    };
                    let refused = Refused {
                        unit,
                        topic: record.topic.to_string(),
                        key: record.key.map(<[u8]>::to_vec),
                        value,
                        headers: record
                            .headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_vec()))
                            .collect(),
                        reason: reason_of_kind(kind_bits).unwrap_or(DeadLetterReason::MessageTooLarge),
                        error: format!("kafka refused the record: {code}"),
                        kind,
                        by_broker: false,
                    };
                    let _ = self.refused_tx.send(refused);
                    return Ok(());
                }
                Err((error, _)) => {
                    self.shared.checkpoint().ack(unit);
                    return Err(SinkError::Produce(error));
                }
            }
        }
    }

    /// A refused record already waiting, if any.
    pub fn try_refused(&mut self) -> Option<Refused> {
        self.refused.try_recv().ok()
    }

    /// Waits for the next record Kafka refused, to be dead-lettered.
    pub async fn refused(&mut self) -> Option<Refused> {
        self.refused.recv().await
    }

    /// One pause while librdkafka's queue is full. Fails at once when leadership is lost
    /// (another relay may publish already), and when shutdown has waited
    /// [`QUEUE_WAIT_ON_SHUTDOWN`] for room: the session then ends without confirming anything
    /// Kafka has not acknowledged.
    async fn wait_for_room(&self, wait: &mut QueueWait) -> Result<(), SinkError> {
        let started = *wait.started.get_or_insert_with(Instant::now);
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Err(SinkError::LeadershipLost),
            _ = self.shutdown.cancelled(), if wait.shutdown_seen.is_none() => {
                wait.shutdown_seen = Some(Instant::now());
            }
            _ = tokio::time::sleep(QUEUE_FULL_BACKOFF) => {}
        }
        if wait
            .shutdown_seen
            .is_some_and(|at| at.elapsed() >= QUEUE_WAIT_ON_SHUTDOWN)
        {
            tracing::warn!("shutting down with the producer queue full: Kafka takes no records; unacknowledged events are resent after the restart");
            return Err(SinkError::QueueFullAtShutdown);
        }
        if !wait.logged && started.elapsed() >= QUEUE_WAIT_LOG_AFTER {
            wait.logged = true;
            tracing::warn!(
                waited_secs = started.elapsed().as_secs(),
                "the producer queue is full and Kafka takes no records; waiting"
            );
        }
        Ok(())
    }

    /// Deals with a record Kafka refused, in its unit: an event is dead-lettered, a
    /// dead-letter record retried without its value; then the refused record's count is
    /// released. Fails when the pipeline must restart (a batch was too large) or halt (the
    /// dead-letter topic refuses even a record without value).
    pub async fn redirect(&mut self, refused: Refused, router: &Router) -> Result<(), SinkError> {
        match refused.kind {
            RefusedKind::Event => {}
            RefusedKind::DeadLetter if refused.value.is_some() => {
                tracing::warn!(topic = %refused.topic, error = %refused.error, "the dead-letter topic refused a record; sending it again without its value");
                let record = Record {
                    topic: Cow::Borrowed(&refused.topic),
                    key: refused.key.as_deref(),
                    value: None,
                    timestamp_ms: None,
                    headers: refused
                        .headers
                        .iter()
                        .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_slice())))
                        .collect(),
                };
                let kind = reason_kind(refused.reason) | WITHOUT_VALUE;
                self.produce(refused.unit, record, kind).await?;
                self.shared.checkpoint().ack(refused.unit);
                return Ok(());
            }
            RefusedKind::DeadLetter | RefusedKind::DeadLetterWithoutValue => {
                return Err(SinkError::DeadLetterRefused {
                    topic: refused.topic,
                    error: refused.error,
                });
            }
        }
        if refused.by_broker
            && refused.reason == DeadLetterReason::MessageTooLarge
            && refused.size() <= self.batch_bytes
        {
            // Maybe refused only for the batch it was in.
            return Err(self.cap_batches(&refused.topic).await);
        }
        let headers = refused
            .headers
            .into_iter()
            .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v)))
            .collect();
        let routed = router.dead_letter_raw(
            refused.key.as_deref(),
            refused.value.map(Cow::Owned),
            headers,
            refused.reason,
            refused.error,
            &refused.topic,
        );
        self.send(refused.unit, routed).await?;
        self.shared.checkpoint().ack(refused.unit);
        Ok(())
    }

    /// Learns the limit of `topic`, which refused a batch as too large, and caps `batch.size`
    /// below it for the producers built from now on (at half the current size when the limit
    /// cannot be read); the error restarts the pipeline with such a producer.
    async fn cap_batches(&mut self, topic: &str) -> SinkError {
        let limit = match self.topic_limits.get(topic) {
            Some(limit) => *limit,
            None => {
                let limit = self.topic_max_message_bytes(topic).await;
                self.topic_limits.insert(topic.to_owned(), limit);
                limit
            }
        };
        // Room for batch framing and for lz4 making incompressible data a little bigger.
        let below_limit = limit.map(|l| l - l / 64 - 512);
        let cap = match below_limit {
            Some(cap) if cap < self.batch_bytes => cap,
            _ => self.batch_bytes / 2,
        }
        .max(MIN_BATCH_BYTES);
        BATCH_CAP
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (old == 0 || cap < old).then_some(cap)
            })
            .ok();
        tracing::warn!(
            topic,
            max_message_bytes = limit,
            batch_size = cap,
            "kafka refused a batch as too large for the topic; capping batch.size and resending from the confirmed position"
        );
        SinkError::BatchTooLarge {
            topic: topic.to_owned(),
            cap,
        }
    }

    /// The topic's `max.message.bytes`, if the broker tells.
    async fn topic_max_message_bytes(&self, topic: &str) -> Option<usize> {
        let resource = ResourceSpecifier::Topic(topic);
        let options = AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT));
        let described = tokio::time::timeout(
            DESCRIBE_TIMEOUT + Duration::from_secs(1),
            self.admin.describe_configs([&resource], &options),
        )
        .await;
        let results = match described {
            Ok(Ok(results)) => results,
            Ok(Err(error)) => {
                tracing::debug!(topic, error = %error, "cannot read the topic's max.message.bytes");
                return None;
            }
            Err(_) => return None,
        };
        results.into_iter().find_map(|result| {
            result
                .ok()?
                .get("max.message.bytes")?
                .value
                .as_deref()?
                .parse()
                .ok()
        })
    }

    /// Makes sure `topic` exists before the first record for it: the broker may not create
    /// topics on produce. A topic that is missing (and may not or cannot be created) is not
    /// the event's fault: the stream waits here, in order, and says which topic it needs.
    async fn ensure_topic(&mut self, topic: &str) -> Result<(), SinkError> {
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        let mut wait = Duration::from_millis(500);
        let mut logged_at: Option<Instant> = None;
        loop {
            let problem = if self.create_topics {
                self.create_topic(topic).await.err()
            } else {
                self.topic_exists(topic).await.err()
            };
            let Some(problem) = problem else {
                break;
            };
            let message = format!("waiting for Kafka topic {topic}: {problem}");
            if logged_at.is_none_or(|at| at.elapsed() > MISSING_TOPIC_LOG_EVERY) {
                tracing::warn!(topic, problem = %problem, "waiting for a Kafka topic; events for it are held in order");
                logged_at = Some(Instant::now());
            }
            self.state.set_missing_topic(Some(message));
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(SinkError::Stopped(topic.to_owned())),
                _ = self.stop.cancelled() => return Err(SinkError::LeadershipLost),
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(MISSING_TOPIC_RETRY_MAX);
        }
        self.state.set_missing_topic(None);
        tracing::info!(topic, "topic ready");
        self.known_topics.insert(topic.to_owned());
        Ok(())
    }

    /// Creates `topic`; "already exists" is success.
    async fn create_topic(&self, topic: &str) -> Result<(), String> {
        let new = NewTopic::new(topic, self.partitions, TopicReplication::Fixed(-1));
        let options = AdminOptions::new()
            .operation_timeout(Some(TOPIC_CREATE_TIMEOUT))
            .request_timeout(Some(TOPIC_CREATE_TIMEOUT));
        let creating = self.admin.create_topics([&new], &options);
        let results = tokio::time::timeout(TOPIC_CREATE_TIMEOUT + Duration::from_secs(5), creating)
            .await
            .map_err(|_| "the broker did not answer the create request".to_owned())?
            .map_err(|e| format!("cannot create it: {e}"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(format!("creating it was refused: {code}")),
            }
        }
        Ok(())
    }

    /// Whether the broker knows `topic` (with `create_topics = false`).
    async fn topic_exists(&self, topic: &str) -> Result<(), String> {
        let producer = self.producer.clone();
        let name = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(10))
                .map_err(|e| format!("cannot read metadata: {e}"))?;
            match metadata.topics().iter().find(|t| t.name() == name) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                _ => Err("it does not exist and kafka.create_topics is false".to_owned()),
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Waits until every produced record is acknowledged or `deadline` passes; true when
    /// nothing is left in flight.
    pub async fn drain(&self, deadline: Instant) -> bool {
        loop {
            if self.shared.checkpoint().inflight() == 0 {
                return true;
            }
            if let Some(failure) = self.shared.failure() {
                tracing::warn!(failure, "delivery failed while draining");
                return false;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Shutdown's drain: waits for every ack until `deadline`, dead-lettering records Kafka
    /// refuses meanwhile (their units can't finish otherwise). Records still in flight at the
    /// deadline are left to be resent after the restart.
    pub async fn drain_for_shutdown(
        &mut self,
        router: &Router,
        deadline: Instant,
    ) -> Result<(), SinkError> {
        loop {
            while let Some(refused) = self.try_refused() {
                self.redirect(refused, router).await?;
            }
            if self.drain(Instant::now() + Duration::from_millis(20)).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    inflight = self.shared.checkpoint().inflight(),
                    "shutdown deadline passed with records in flight; they will be resent"
                );
                return Ok(());
            }
        }
    }

    /// Records and requests in librdkafka's local queue.
    pub fn queue_depth(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Drops whatever librdkafka still holds; used when a session ends on a fault.
    pub fn purge(&self) {
        self.producer
            .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
    }
}

/// Where one `send` stands in waiting for room in librdkafka's queue.
#[derive(Default)]
struct QueueWait {
    started: Option<Instant>,
    shutdown_seen: Option<Instant>,
    logged: bool,
}

fn reason_kind(reason: DeadLetterReason) -> usize {
    DeadLetterReason::ALL
        .iter()
        .position(|r| *r == reason)
        .map_or(0, |i| i + 1)
}

/// Settings for clients that don't produce (admin, metadata probes): the brokers and the
/// security and connection properties.
pub fn admin_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &cfg.brokers);
    // Security and client settings apply to the admin client too; producer-only settings
    // would only draw warnings, so pass just those that every client understands.
    for (key, value) in &cfg.properties {
        if key.starts_with("security.")
            || key.starts_with("sasl.")
            || key.starts_with("ssl.")
            || key.starts_with("client.")
            || key.starts_with("socket.")
            || key.starts_with("broker.")
        {
            config.set(key, value);
        }
    }
    config
}
