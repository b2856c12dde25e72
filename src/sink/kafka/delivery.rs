//! State shared with librdkafka's delivery callback, which turns reports into acks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::IntCounter;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;

use super::{error::*, lessons::*, transaction::PROGRESS_OPAQUE};
use crate::checkpoint::{Checkpoint, UnitId, Watermark};
use crate::error::Definite;
use crate::metrics::Metrics;
use crate::route::DeadLetterReason;

/// State shared between the pipeline and the delivery callback.
pub struct Shared<P> {
    pub(super) watermark: Arc<Watermark<P>>,
    pub metrics: Metrics,
    /// The first delivery failure that must restart the pipeline.
    pub(super) failure: Mutex<Option<String>>,
    /// The dead-letter topic refused a record even without its value: the relay halts, and
    /// the failures that follow from the stopped producer must not turn that into a restart.
    pub(super) halt: Mutex<Option<(String, String)>>,
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

    pub(super) fn fail(&self, message: String) {
        if self.halt_error().is_some() {
            return;
        }
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(message);
        }
    }

    /// The error that halts the relay, once the dead-letter topic refused a record for good.
    pub(super) fn halt_error(&self) -> Option<SinkError> {
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
    pub(super) shared: Arc<Shared<P>>,
    pub(super) refused: mpsc::UnboundedSender<Refused>,
    /// The published counter of the topic acknowledged last: acks come in runs of one topic,
    /// and looking the labelled counter up costs more than the rest of an ack.
    pub(super) last_topic: Mutex<Option<(String, IntCounter)>>,
    /// The producer's `batch.size`: a refused record bigger than this was alone in its batch.
    pub(super) batch_bytes: usize,
    /// The broker answers with offsets (`acks` is not 0): a success without one was not
    /// confirmed by the broker (see [`unconfirmed`]).
    pub(super) offsets_expected: bool,
}

/// A success report for a record the broker never gave an offset. librdkafka's idempotent
/// producer reports the records of a failed request as delivered when a later request of the
/// same partition succeeds ("implicitly acked"), assuming the failed one was written after
/// all; after a refusal such as "not leader for partition" (a partition whose leadership is
/// just moving to the broker: a new topic, a broker coming back) it was not, and the records
/// are lost although reported delivered. A genuine acknowledgement always carries the
/// record's offset, so one without is treated as a failure: the session resends from the
/// confirmed position (duplicates, never a loss).
fn unconfirmed(offset: i64, offsets_expected: bool) -> bool {
    offsets_expected && offset < 0
}

impl<P> DeliveryContext<P> {
    pub(super) fn count_published(&self, topic: &str) {
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
        if let Ok(message) = result {
            if unconfirmed(message.offset(), self.offsets_expected) {
                self.shared
                    .metrics
                    .publish_errors
                    .with_label_values(&[error_kind(None)])
                    .inc();
                // The rest of the failed request's records follow: say it once.
                if self.shared.failure().is_none() {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        "kafka reported a record delivered without an offset (a request before it had failed); resending from the confirmed position"
                    );
                }
                self.shared.fail(format!(
                    "kafka reported a record of {} [{}] delivered without an offset: it may not have been written",
                    message.topic(),
                    message.partition()
                ));
                return;
            }
        }
        if opaque == PROGRESS_OPAQUE {
            // The progress record acknowledges no unit; its failure fails the transaction.
            if let Err((error, message)) = result {
                self.shared
                    .fail(format!("delivery to {} failed: {error}", message.topic()));
            }
            return;
        }
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
    pub(super) fn refused(
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
