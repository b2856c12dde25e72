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
//!
//! Here: `producer.rs` the [`KafkaSink`] (send, wait for room, dead-letter refusals, drain),
//! `delivery.rs` the delivery callback and the state it shares ([`Shared`]), `lessons.rs` what
//! refusals taught and the delivery opaque's kind bits, `topics.rs` topic creation and
//! waiting, `stall.rs` naming partitions short of in-sync replicas while records wait for
//! them, `nudge.rs` sending what waits for linger once the source has nothing more ready, `error.rs` [`SinkError`] and [`Refused`]; exactly once (`kafka.delivery`):
//! `transaction.rs` the Kafka transactions that carry the relay's progress record,
//! `progress.rs` the transactional start and the progress topic (`docs/EXACTLY-ONCE.md`).

mod delivery;
mod error;
mod lessons;
mod nudge;
mod producer;
mod progress;
mod stall;
mod topics;
mod transaction;

pub use delivery::{DeliveryContext, Shared};
pub use error::{Refused, RefusedKind, SinkError};
pub use producer::{admin_config, client_config, max_message_bytes, KafkaSink};
pub use progress::{transactional_config, transactional_id, Recorded};
pub use transaction::{
    BUSY_RECORDS, FAILPOINT_ENV, IDLE_PROGRESS_EVERY, LINGER, MAX_AGE, MAX_LINGER, MAX_RECORDS,
};
