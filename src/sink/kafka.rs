//! The Kafka side: an idempotent librdkafka producer whose delivery reports feed the
//! watermark.
//!
//! Records are handed to librdkafka with their watermark unit's number as the delivery
//! opaque; the delivery callback (on librdkafka's polling thread) acknowledges the unit, so
//! the source can confirm positions as soon as a contiguous run of units is acknowledged. A
//! full local queue is backpressure: `send` waits for room instead of failing, but not past
//! a lost leadership or a shutdown's deadline. A record refused for its own content before
//! it reaches the broker (librdkafka's own `message.max.bytes` check, or a lesson below)
//! comes back to the pipeline as a [`Refused`] to be dead-lettered in the same unit; a
//! delivery failure is a transient fault that restarts the pipeline from the confirmed
//! position.
//!
//! The broker refuses whole batches. The producer runs with
//! `enable.gapless.guarantee`: a batch the broker refuses stops the producer, so no later
//! record of its partition is written ahead of the refused ones, and the pipeline restarts
//! from the confirmed position, resending in order. What the refusal taught ([`Lessons`])
//! makes the next session do better:
//! - A topic's `max.message.bytes` below the batch refuses it as too large. A record bigger
//!   than `batch.size` was alone in its batch: it is too large itself and is dead-lettered
//!   next time. Otherwise `batch.size` is halved for the producers to come, until batches fit
//!   and the records arrive with their values.
//! - A dead-letter record the broker refuses is sent once more without its value; refused
//!   again, the relay halts with a definite error instead of restarting forever.

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;

use crate::checkpoint::{Checkpoint, UnitId, Watermark};
use crate::config::KafkaConfig;
use crate::error::Definite;
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
/// Records remembered as refused; past this many the oldest lessons are forgotten (a record
/// forgotten is refused once more and learned again).
const MAX_RECORD_LESSONS: usize = 100_000;

/// What the broker's refusals taught this process, for the producers of later sessions.
/// Records are known by their [`fingerprint`]: the same event routed again gives the same
/// record. A new process learns it all again, at the price of one refusal each.
#[derive(Default)]
struct Lessons {
    /// `batch.size` for new producers (0: as configured).
    batch_cap: usize,
    /// Per topic, the smallest record it refused while alone in its batch: a record at least
    /// as big is too large for it.
    too_large_from: HashMap<String, usize>,
    /// Records to dead-letter without trying again, and why.
    dead_letter: HashMap<u64, DeadLetterReason>,
    /// Dead-letter records to send without their value.
    without_value: HashSet<u64>,
}

static LESSONS: LazyLock<Mutex<Lessons>> = LazyLock::new(Mutex::default);
/// Set once there is a lesson about records: until then `send` takes no lock for them.
static RECORD_LESSONS: AtomicBool = AtomicBool::new(false);

fn lessons() -> MutexGuard<'static, Lessons> {
    LESSONS.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a lesson says about a record about to be produced.
enum Learned {
    Nothing,
    DeadLetter(DeadLetterReason),
    WithoutValue,
}

impl Lessons {
    fn about(&self, topic: &str, fingerprint: u64, size: usize, kind: usize) -> Learned {
        if kind == 0 {
            if let Some(reason) = self.dead_letter.get(&fingerprint) {
                return Learned::DeadLetter(*reason);
            }
            if self
                .too_large_from
                .get(topic)
                .is_some_and(|from| size >= *from)
            {
                return Learned::DeadLetter(DeadLetterReason::MessageTooLarge);
            }
        } else if kind & WITHOUT_VALUE == 0 && self.without_value.contains(&fingerprint) {
            return Learned::WithoutValue;
        }
        Learned::Nothing
    }

    fn forget_records_if_full(&mut self) {
        if self.dead_letter.len() + self.without_value.len() >= MAX_RECORD_LESSONS {
            self.dead_letter.clear();
            self.without_value.clear();
        }
    }
}

/// Identifies a record across sessions: its topic, key and headers (which hold the event id,
/// or for a dead letter the reason and source position).
fn fingerprint<'a>(
    topic: &str,
    key: Option<&[u8]>,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> u64 {
    let mut hasher = DefaultHasher::new();
    topic.hash(&mut hasher);
    key.hash(&mut hasher);
    for (name, value) in headers {
        name.hash(&mut hasher);
        value.hash(&mut hasher);
    }
    hasher.finish()
}

/// Key, value and header bytes: at most what a record takes in a batch.
fn record_bytes<'a>(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> usize {
    key.map_or(0, <[u8]>::len)
        + value.map_or(0, <[u8]>::len)
        + headers.map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

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
    #[error("the leader lock was lost; stopped producing")]
    LeadershipLost,
    #[error("topic {topic} refused a batch of records as too large; producer batches are now capped at {cap} bytes and the records are resent")]
    BatchTooLarge { topic: String, cap: usize },
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
    fn of(
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

/// State shared between the pipeline and the delivery callback.
pub struct Shared<P> {
    watermark: Arc<Watermark<P>>,
    pub metrics: Metrics,
    /// The first delivery failure that must restart the pipeline.
    failure: Mutex<Option<String>>,
    /// The dead-letter topic refused a record even without its value: the relay halts, and
    /// the failures that follow from the stopped producer must not turn that into a restart.
    halt: Mutex<Option<(String, String)>>,
}

impl<P: Copy + Ord> Shared<P> {
    /// Delivery reports acknowledge on `watermark`, the pipeline's.
    pub fn new(watermark: Arc<Watermark<P>>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            watermark,
            metrics,
            failure: Mutex::new(None),
            halt: Mutex::new(None),
        })
    }

    pub fn checkpoint(&self) -> MutexGuard<'_, Checkpoint<P>> {
        self.watermark.lock()
    }

    /// A delivery failure that requires a restart, if one happened.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fail(&self, message: String) {
        if self.halt_error().is_some() {
            return;
        }
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(message);
        }
    }

    /// The error that halts the relay, once the dead-letter topic refused a record for good.
    fn halt_error(&self) -> Option<SinkError> {
        let halt = self.halt.lock().unwrap_or_else(|p| p.into_inner());
        halt.as_ref().map(|(topic, error)| {
            SinkError::Definite(Definite::DeadLetterRefused {
                topic: topic.clone(),
                error: error.clone(),
            })
        })
    }
}

/// The librdkafka context: logs client errors, turns delivery reports into acks.
pub struct DeliveryContext<P> {
    shared: Arc<Shared<P>>,
    refused: mpsc::UnboundedSender<Refused>,
    /// The published counter of the topic acknowledged last: acks come in runs of one topic,
    /// and looking the labelled counter up costs more than the rest of an ack.
    last_topic: Mutex<Option<(String, IntCounter)>>,
    /// The producer's `batch.size`: a refused record bigger than this was alone in its batch.
    batch_bytes: usize,
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

    /// librdkafka's log, as rdkafka logs it, except its warning that the gapless guarantee
    /// is experimental: the relay asks for it on purpose, at every session start.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            _ if fac == "CONFWARN" && message.contains("enable.gapless.guarantee") => {
                tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
        }
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
                // An event may be refused for its size or topic name; a dead-letter record
                // also for what the topic's policy or ACLs say: another try won't change it.
                let reason = if kind == 0 {
                    event_refusal(code)
                } else if refuses_dead_letter(code) {
                    reason_of_kind(kind)
                } else {
                    None
                };
                match reason {
                    Some(reason) => self.refused(unit, kind, reason, error, message),
                    None => self
                        .shared
                        .fail(format!("delivery to {} failed: {error}", message.topic())),
                }
            }
        }
    }
}

impl<P: Copy + Ord> DeliveryContext<P> {
    /// A record the broker refused. The gapless producer stops on it; learn what the next
    /// session must do differently and restart, or halt if nothing is left to try.
    fn refused(
        &self,
        unit: UnitId,
        kind: usize,
        reason: DeadLetterReason,
        error: &KafkaError,
        message: &rdkafka::message::BorrowedMessage<'_>,
    ) {
        let topic = message.topic();
        let headers: Vec<(&str, &[u8])> = message
            .headers()
            .map(|h| h.iter().map(|h| (h.key, h.value.unwrap_or(&[]))).collect())
            .unwrap_or_default();
        let fingerprint = fingerprint(topic, message.key(), headers.iter().copied());
        let size = record_bytes(message.key(), message.payload(), headers.iter().copied());
        let mut lessons = lessons();
        let news = if kind == 0
            && reason == DeadLetterReason::MessageTooLarge
            && size <= self.batch_bytes
        {
            // Maybe too large only with the rest of its batch: smaller batches next time.
            let cap = (self.batch_bytes / 2).max(MIN_BATCH_BYTES);
            (lessons.batch_cap == 0 || cap < lessons.batch_cap).then(|| {
                lessons.batch_cap = cap;
                format!("topic {topic} refused a batch as too large ({error}); batch.size is capped at {cap} bytes from now on")
            })
        } else if kind == 0 {
            lessons.forget_records_if_full();
            if reason == DeadLetterReason::MessageTooLarge {
                let from = lessons
                    .too_large_from
                    .entry(topic.to_owned())
                    .or_insert(size);
                *from = (*from).min(size);
            }
            RECORD_LESSONS.store(true, Ordering::Relaxed);
            lessons.dead_letter.insert(fingerprint, reason).is_none().then(|| {
                format!("topic {topic} refused a record alone ({error}); it goes to the dead-letter topic")
            })
        } else if kind & WITHOUT_VALUE == 0 && message.payload().is_some() {
            lessons.forget_records_if_full();
            RECORD_LESSONS.store(true, Ordering::Relaxed);
            lessons.without_value.insert(fingerprint).then(|| {
                format!("the dead-letter topic {topic} refused a record ({error}); it is sent again without its value")
            })
        } else {
            drop(lessons);
            tracing::error!(topic, error = %error, "the dead-letter topic refused a record even without its value");
            *self.shared.halt.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((topic.to_owned(), error.to_string()));
            let refused = Refused {
                unit,
                topic: topic.to_owned(),
                key: message.key().map(<[u8]>::to_vec),
                value: None,
                headers: headers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
                    .collect(),
                reason,
                error: error.to_string(),
                kind: RefusedKind::DeadLetterWithoutValue,
            };
            // The pipeline halts on it; gone already, it has stopped anyway.
            let _ = self.refused.send(refused);
            return;
        };
        drop(lessons);
        if let Some(news) = &news {
            tracing::warn!("{news}; resending from the confirmed position");
        }
        self.shared.fail(format!(
            "kafka refused a record for {topic} ({error}); resending from the confirmed position"
        ));
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

/// The `dlq_error` text of a record dead-lettered from a lesson: what the broker said.
fn refusal_text(reason: DeadLetterReason) -> RDKafkaErrorCode {
    match reason {
        DeadLetterReason::InvalidTopic => RDKafkaErrorCode::InvalidTopic,
        _ => RDKafkaErrorCode::MessageSizeTooLarge,
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
    // A batch the broker refuses stops the producer rather than leaving a gap that later
    // records of its partition would pass (see the module comment). It needs idempotence.
    if cfg
        .properties
        .get("enable.idempotence")
        .is_none_or(|v| v != "false")
    {
        config.set("enable.gapless.guarantee", "true");
    }
    for (key, value) in &cfg.properties {
        config.set(key, value);
    }
    let cap = lessons().batch_cap;
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
                batch_bytes,
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
        mut record: Record<'_>,
        mut kind: usize,
    ) -> Result<(), SinkError> {
        // Another relay may lead already: hand librdkafka nothing more.
        if self.stop.is_cancelled() {
            return Err(SinkError::LeadershipLost);
        }
        if RECORD_LESSONS.load(Ordering::Relaxed) {
            let headers = || record.headers.iter().map(|(k, v)| (&**k, &**v));
            let learned = lessons().about(
                &record.topic,
                fingerprint(&record.topic, record.key, headers()),
                record_bytes(record.key, record.value.as_deref(), headers()),
                kind,
            );
            match learned {
                Learned::Nothing => {}
                Learned::DeadLetter(reason) => {
                    // Counted in its unit until its dead letter is acknowledged.
                    self.shared.checkpoint().add(unit);
                    let refused = Refused::of(
                        unit,
                        &record,
                        reason,
                        format!("kafka refused the record: {}", refusal_text(reason)),
                        RefusedKind::Event,
                        reason != DeadLetterReason::MessageTooLarge,
                    );
                    let _ = self.refused_tx.send(refused);
                    return Ok(());
                }
                Learned::WithoutValue => {
                    record.value = None;
                    kind |= WITHOUT_VALUE;
                }
            }
        }
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
                    // librdkafka checks the size itself, before the broker: the producer
                    // goes on. The record stays counted in its unit until its dead letter
                    // (or its second try without value) is acknowledged.
                    drop(back);
                    let refused_kind = match (kind, kind & WITHOUT_VALUE) {
                        (0, _) => RefusedKind::Event,
                        (_, 0) if record.value.is_some() => RefusedKind::DeadLetter,
                        _ => RefusedKind::DeadLetterWithoutValue,
                    };
                    let refused = Refused::of(
                        unit,
                        &record,
                        reason_of_kind(kind).unwrap_or(DeadLetterReason::MessageTooLarge),
                        format!("kafka refused the record: {code}"),
                        refused_kind,
                        refused_kind == RefusedKind::DeadLetter,
                    );
                    let _ = self.refused_tx.send(refused);
                    return Ok(());
                }
                Err((error, _)) => {
                    self.shared.checkpoint().ack(unit);
                    // A producer stopped by a refusal that halts the relay says only "fatal".
                    return Err(self
                        .shared
                        .halt_error()
                        .unwrap_or(SinkError::Produce(error)));
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
    /// released. Fails when the relay must halt: the dead-letter topic refuses even a record
    /// without its value.
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
                return Err(SinkError::Definite(Definite::DeadLetterRefused {
                    topic: refused.topic,
                    error: refused.error,
                }));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_kinds_carry_the_reason_and_the_second_try() {
        for reason in DeadLetterReason::ALL {
            let kind = reason_kind(reason);
            assert_eq!(reason_of_kind(kind), Some(reason));
            assert_eq!(reason_of_kind(kind | WITHOUT_VALUE), Some(reason));
            assert!(kind < WITHOUT_VALUE);
        }
        assert_eq!(reason_of_kind(0), None);
        let unit: UnitId = 123_456;
        let opaque = ((unit as usize) << KIND_BITS) | WITHOUT_VALUE | 2;
        assert_eq!((opaque >> KIND_BITS) as UnitId, unit);
    }

    #[test]
    fn lessons_say_what_to_do_with_a_record() {
        let headers = [("id", &b"e-1"[..]), ("dlq_reason", b"invalid_topic")];
        let print = fingerprint("t", Some(b"k"), headers.iter().copied());
        assert_eq!(
            print,
            fingerprint("t", Some(b"k"), headers.iter().copied()),
            "the same record, the same fingerprint"
        );
        assert_ne!(
            print,
            fingerprint("t", Some(b"k2"), headers.iter().copied())
        );
        assert_ne!(print, fingerprint("u", Some(b"k"), headers.iter().copied()));

        let mut lessons = Lessons::default();
        assert!(matches!(lessons.about("t", print, 10, 0), Learned::Nothing));
        lessons
            .dead_letter
            .insert(print, DeadLetterReason::InvalidTopic);
        assert!(matches!(
            lessons.about("t", print, 10, 0),
            Learned::DeadLetter(DeadLetterReason::InvalidTopic)
        ));
        // A topic that refused a record alone refuses any as big.
        lessons.too_large_from.insert("t".into(), 5_000);
        assert!(matches!(
            lessons.about("t", 1, 5_000, 0),
            Learned::DeadLetter(DeadLetterReason::MessageTooLarge)
        ));
        assert!(matches!(lessons.about("t", 1, 4_999, 0), Learned::Nothing));
        assert!(matches!(lessons.about("u", 1, 9_999, 0), Learned::Nothing));
        // Dead letters go without their value once, and are not dead-lettered again.
        let dead = reason_kind(DeadLetterReason::InvalidTopic);
        lessons.without_value.insert(7);
        assert!(matches!(
            lessons.about("dlq", 7, 10, dead),
            Learned::WithoutValue
        ));
        assert!(matches!(
            lessons.about("dlq", 7, 10, dead | WITHOUT_VALUE),
            Learned::Nothing
        ));
        assert!(matches!(
            lessons.about("dlq", print, 10, dead),
            Learned::Nothing
        ));
    }
}
