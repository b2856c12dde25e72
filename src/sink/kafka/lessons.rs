//! What the broker's refusals taught this process, and the delivery opaque's kind bits.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicBool;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;

use crate::route::DeadLetterReason;

/// Records librdkafka may hold before `send` waits: bounds memory (librdkafka keeps about
/// 800 bytes per queued record of a typical outbox event, headers included) while leaving
/// room for several requests of full batches to the broker. In the benchmark 20,000 drains
/// as fast as 100,000 did, with 25 MB less peak RSS than 50,000.
pub(super) const DEFAULT_QUEUE_MESSAGES: &str = "20000";

/// How long topic creation may take before the session is retried.
pub(super) const TOPIC_CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The byte bound on the same queue (librdkafka's default is 1 GiB): large payloads must not
/// push the relay past its memory budget.
pub(super) const DEFAULT_QUEUE_KBYTES: &str = "65536";

/// Upper bound between checks for a missing topic.
pub(super) const MISSING_TOPIC_RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a topic's first record waits for every partition's leader to take requests (see
/// `KafkaSink::wait_for_leaders`); past it records are sent anyway.
pub(super) const LEADERS_WAIT: Duration = Duration::from_secs(10);
/// How often the partitions' leaders are asked again meanwhile.
pub(super) const LEADERS_RETRY: Duration = Duration::from_millis(100);
/// How often the log repeats that a topic is missing.
pub(super) const MISSING_TOPIC_LOG_EVERY: Duration = Duration::from_secs(60);

/// How long `send` sleeps when librdkafka's queue is full before trying again.
pub(super) const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(1);
/// After shutdown, how long one wait for room in a full queue may last. Kafka taking records
/// at all empties the queue within milliseconds, so the open transaction still finishes
/// cleanly; Kafka down would hold the queue full forever. Below the sources' drain deadline.
pub(super) const QUEUE_WAIT_ON_SHUTDOWN: Duration = Duration::from_secs(5);
/// A wait for room this long is logged: Kafka takes no records.
pub(super) const QUEUE_WAIT_LOG_AFTER: Duration = Duration::from_secs(5);

/// librdkafka's default `batch.size`.
pub(super) const DEFAULT_BATCH_BYTES: usize = 1_000_000;
/// The smallest `batch.size` the relay caps the producer to.
pub(super) const MIN_BATCH_BYTES: usize = 1_024;
/// Records remembered as refused; past this many the oldest lessons are forgotten (a record
/// forgotten is refused once more and learned again).
pub(super) const MAX_RECORD_LESSONS: usize = 100_000;

/// What the broker's refusals taught this process, for the producers of later sessions.
/// Records are known by their [`fingerprint`]: the same event routed again gives the same
/// record. A new process learns it all again, at the price of one refusal each.
#[derive(Default)]
pub(super) struct Lessons {
    /// `batch.size` for new producers (0: as configured).
    pub(super) batch_cap: usize,
    /// Per topic, the smallest record it refused while alone in its batch: a record at least
    /// as big is too large for it.
    pub(super) too_large_from: HashMap<String, usize>,
    /// Records to dead-letter without trying again, and why.
    pub(super) dead_letter: HashMap<u64, DeadLetterReason>,
    /// Dead-letter records to send without their value.
    pub(super) without_value: HashSet<u64>,
}

pub(super) static LESSONS: LazyLock<Mutex<Lessons>> = LazyLock::new(Mutex::default);
/// Set once there is a lesson about records: until then `send` takes no lock for them.
pub(super) static RECORD_LESSONS: AtomicBool = AtomicBool::new(false);

pub(super) fn lessons() -> MutexGuard<'static, Lessons> {
    LESSONS.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a lesson says about a record about to be produced.
pub(super) enum Learned {
    Nothing,
    DeadLetter(DeadLetterReason),
    WithoutValue,
}

impl Lessons {
    pub(super) fn about(&self, topic: &str, fingerprint: u64, size: usize, kind: usize) -> Learned {
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

    pub(super) fn forget_records_if_full(&mut self) {
        if self.dead_letter.len() + self.without_value.len() >= MAX_RECORD_LESSONS {
            self.dead_letter.clear();
            self.without_value.clear();
        }
    }
}

/// Identifies a record across sessions: its topic, key and headers (which hold the event id,
/// or for a dead letter the reason and source position).
pub(super) fn fingerprint<'a>(
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
pub(super) fn record_bytes<'a>(
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
pub(super) const KIND_BITS: u32 = 4;
/// The kind bit of a dead-letter record resent without its value after a refusal.
pub(super) const WITHOUT_VALUE: usize = 1 << (KIND_BITS - 1);

/// Why Kafka refused an event for its own content, if it did.
pub(super) fn event_refusal(code: Option<RDKafkaErrorCode>) -> Option<DeadLetterReason> {
    match code? {
        RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::MessageBatchTooLarge => Some(DeadLetterReason::MessageTooLarge),
        RDKafkaErrorCode::InvalidTopic => Some(DeadLetterReason::InvalidTopic),
        _ => None,
    }
}

/// The `dlq_error` text of a record dead-lettered from a lesson: what the broker said.
pub(super) fn refusal_text(reason: DeadLetterReason) -> RDKafkaErrorCode {
    match reason {
        DeadLetterReason::InvalidTopic => RDKafkaErrorCode::InvalidTopic,
        _ => RDKafkaErrorCode::MessageSizeTooLarge,
    }
}

/// Whether `code` says the dead-letter topic will not take a record as it is.
pub(super) fn refuses_dead_letter(code: Option<RDKafkaErrorCode>) -> bool {
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
pub(super) fn reason_of_kind(kind: usize) -> Option<DeadLetterReason> {
    (kind & !WITHOUT_VALUE)
        .checked_sub(1)
        .and_then(|k| DeadLetterReason::ALL.get(k))
        .copied()
}

/// The `kind` label for a delivery error; one of `metrics::PUBLISH_ERROR_KINDS`.
pub(super) fn error_kind(code: Option<RDKafkaErrorCode>) -> &'static str {
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

pub(super) fn reason_kind(reason: DeadLetterReason) -> usize {
    DeadLetterReason::ALL
        .iter()
        .position(|r| *r == reason)
        .map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::UnitId;

    #[test]
    pub(super) fn delivery_kinds_carry_the_reason_and_the_second_try() {
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
    pub(super) fn lessons_say_what_to_do_with_a_record() {
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
