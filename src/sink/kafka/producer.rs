//! The producer side of one session: sending, waiting for room, dead-lettering refusals.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio::sync::mpsc;

use super::nudge::{Nudge, NUDGE_BELOW};
use super::stall::{watch, StallWatch, Watched};
use super::{delivery::*, error::*, lessons::*, transaction::Transactions};
use crate::checkpoint::UnitId;
use crate::config::KafkaConfig;
use crate::error::Definite;
use crate::route::{DeadLetterReason, Record, Routed, Router};
use crate::status::RelayState;
use tokio_util::sync::CancellationToken;

/// The producer side of one pipeline session.
pub struct KafkaSink<P: Copy + Ord + Send + Sync + 'static> {
    pub(super) producer: ThreadedProducer<DeliveryContext<P>>,
    pub(super) admin: AdminClient<DefaultClientContext>,
    pub(super) known_topics: HashSet<String>,
    /// The topics this session writes to, for the stall watch.
    pub(super) topics_in_use: Arc<Mutex<Vec<String>>>,
    pub(super) create_topics: bool,
    pub(super) partitions: i32,
    pub(super) refused: mpsc::UnboundedReceiver<Refused>,
    pub(super) refused_tx: mpsc::UnboundedSender<Refused>,
    pub(super) shared: Arc<Shared<P>>,
    pub(super) state: Arc<RelayState>,
    pub(super) shutdown: CancellationToken,
    /// Cancelled when this relay no longer leads: stop producing at once.
    pub(super) stop: CancellationToken,
    /// Names partitions short of in-sync replicas while records wait for them; ends with the
    /// sink.
    _stall: Option<StallWatch>,
    /// Exactly once: the open Kafka transaction and the progress it records.
    pub(super) txn: Option<Transactions<P>>,
    /// Sends what waits for linger once the source has nothing more ready; `None` when the
    /// operator set `linger.ms`.
    nudge: Option<Nudge>,
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
pub(super) fn configured_batch_bytes(cfg: &KafkaConfig) -> usize {
    cfg.properties
        .get("batch.size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_BATCH_BYTES)
}

/// The producer's `message.max.bytes`: what the router compares record sizes with.
pub fn max_message_bytes(cfg: &KafkaConfig) -> usize {
    cfg.message_max_bytes()
}

impl<P: Copy + Ord + Send + Sync + 'static> KafkaSink<P> {
    /// `state` hears about topics the sink waits for; `shutdown` ends such a wait.
    pub fn new(
        cfg: &KafkaConfig,
        shared: Arc<Shared<P>>,
        state: Arc<RelayState>,
        shutdown: CancellationToken,
    ) -> Result<Self, SinkError> {
        Self::with_client(cfg, client_config(cfg), shared, state, shutdown)
    }

    /// [`Self::new`] with the producer settings `client`.
    pub(super) fn with_client(
        cfg: &KafkaConfig,
        client: ClientConfig,
        shared: Arc<Shared<P>>,
        state: Arc<RelayState>,
        shutdown: CancellationToken,
    ) -> Result<Self, SinkError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let batch_bytes = client
            .get("batch.size")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_BATCH_BYTES);
        let producer: ThreadedProducer<DeliveryContext<P>> = client
            .create_with_context(DeliveryContext {
                shared: Arc::clone(&shared),
                refused: tx.clone(),
                last_topic: Mutex::new(None),
                batch_bytes,
                offsets_expected: client.get("acks").is_none_or(|acks| acks != "0"),
            })
            .map_err(SinkError::Create)?;
        let admin = admin_config(cfg).create().map_err(SinkError::Create)?;
        let topics_in_use = Arc::new(Mutex::new(Vec::new()));
        let stall = watch(Watched {
            shared: Arc::clone(&shared),
            topics: Arc::clone(&topics_in_use),
            admin: Arc::new(admin_config(cfg).create().map_err(SinkError::Create)?),
            state: Arc::clone(&state),
        });
        Ok(Self {
            admin,
            known_topics: HashSet::new(),
            topics_in_use,
            create_topics: cfg.create_topics,
            partitions: cfg.topic_partitions,
            refused: rx,
            refused_tx: tx,
            shared,
            state,
            shutdown,
            stop: CancellationToken::new(),
            _stall: stall,
            txn: None,
            nudge: (!cfg.properties.contains_key("linger.ms")).then(|| Nudge::start(&producer)),
            producer,
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
    pub(super) async fn produce(
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
        if let Err(error) = self.begin_if_needed() {
            self.shared.checkpoint().ack(unit);
            return Err(error);
        }
        let mut wait = QueueWait::default();
        loop {
            match self.producer.send(base) {
                Ok(()) => {
                    self.count_in_transaction();
                    if let Some(nudge) = &self.nudge {
                        nudge.produced();
                    }
                    return Ok(());
                }
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
}

impl<P: Copy + Ord + Send + Sync + 'static> KafkaSink<P> {
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

    /// The source has nothing more ready: records waiting for linger may go now, unless the
    /// producer holds a backlog (see `nudge.rs`).
    pub fn caught_up(&self) {
        if let Some(nudge) = &self.nudge {
            if self.producer.in_flight_count() < NUDGE_BELOW {
                nudge.request();
            }
        }
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
    pub(super) started: Option<Instant>,
    pub(super) shutdown_seen: Option<Instant>,
    pub(super) logged: bool,
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
