//! Idempotent consumption of the events outbox-relay publishes, for Rust services on Postgres.
//!
//! The relay delivers every outbox event **at least once**: around failures (a relay crash, a
//! lost connection, a failover; a consumer that crashes before committing its offset) the same
//! event can arrive twice. Each record carries its outbox row's id in the header `id`. This
//! crate records that id in the consumer's own database, in the **same transaction** as the
//! consumer's effects (the table `inbox.received` of `sql/inbox.sql`), so a redelivery is a
//! no-op:
//!
//! - [`Event`] reads a record (raw parts, or an rdkafka message with the feature `rdkafka`):
//!   the id, `event_type`, `aggregate_type`, the key (the aggregate id), the payload (`None`:
//!   a tombstone) and the row's own headers. A dead-letter record is reported as
//!   [`EventError::DeadLetter`], never as an event; a record without a valid `id` is an error.
//! - [`Inbox::install`] creates the schema (idempotent); [`Inbox::process`] records the id and
//!   runs your handler in one transaction: [`Processed::Applied`] the first time,
//!   [`Processed::Duplicate`] (handler not run) after; a handler error rolls both back.
//! - [`Inbox::purge_older_than`] keeps the table small (see *Retention*).
//!
//! # A complete consumer
//!
//! ```no_run
//! # #[cfg(feature = "rdkafka")]
//! # mod example {
//! use outbox_inbox::{Event, Inbox};
//! use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
//! async fn consume(mut db: tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//!     Inbox::install(&db).await?;
//!     let inbox = Inbox::new("billing");
//!     let consumer: StreamConsumer = rdkafka::ClientConfig::new()
//!         .set("bootstrap.servers", "127.0.0.1:9092").set("group.id", "billing")
//!         .set("enable.auto.commit", "false").create()?;
//!     consumer.subscribe(&["outbox.event.order"])?;
//!     loop {
//!         let message = consumer.recv().await?;
//!         let event = Event::from_message(&message)?; // not an event: see Retries
//!         inbox.process(&mut db, &event, async |tx| {
//!             tx.execute("INSERT INTO invoices VALUES ($1)", &[&event.aggregate_id()]).await?;
//!             Ok::<_, tokio_postgres::Error>(())
//!         }).await?; // Applied, or Duplicate (handler not run): either way done
//!         consumer.commit_message(&message, CommitMode::Sync)?; // after the DB commit
//!     }
//! }
//! # }
//! ```
//!
//! # Ordering
//!
//! The relay keys every record by its aggregate id, so one aggregate's events sit in one
//! partition, in commit order. Keep that order: process each partition's records one after the
//! other (one task per partition, or one loop as above), never in parallel. Commit the Kafka
//! offset only **after** the database transaction committed: a crash in between redelivers the
//! record, and the inbox turns it into a `Duplicate`. Committing before would lose the event.
//!
//! # Retries and poison records
//!
//! A transient database error (see [`is_transient`]: a lost connection, a serialization
//! failure, a failover) rolls everything back; retry **the same record** (with a backoff) before
//! reading the next, or the partition's order breaks. A record that fails every time (it is not
//! an event: [`EventError`]; or your handler rejects it for good) is a poison record: don't
//! block the partition forever on it — write it to a dead-letter topic or table of your own,
//! commit its offset, and go on. A failed commit is ambiguous; retrying is always safe, the
//! inbox says whether it landed.
//!
//! # Tombstones and dead letters
//!
//! A row whose payload is NULL is published as a tombstone (no value): [`Event::is_tombstone`].
//! It is still an event with an id — typically "this aggregate is gone" — and goes through the
//! inbox like any other (in a compacted topic it also deletes the aggregate's older records).
//! Rows the relay cannot publish go to its dead-letter topic (`outbox.dead-letter` by default)
//! with headers `dlq_reason`, `dlq_error`, `dlq_topic`; a consumer that subscribes by pattern
//! (`^outbox\..*`) sees them too. [`Event::from_parts`] recognises them by their `dlq_*`
//! headers and returns [`EventError::DeadLetter`]: alert a human, never apply them.
//!
//! # Retention
//!
//! An id must stay in the inbox as long as its event can be delivered again: as long as the
//! topic keeps the record (`retention.ms`, 7 days by default), because a consumer can always
//! re-read retained offsets. Call [`Inbox::purge_older_than`] with at least that age, daily.
//!
//! # Exactly-once mode
//!
//! With `kafka.delivery = "exactly-once"` on the relay, read with
//! `isolation.level = read_committed` (librdkafka's default; the Java client's default is
//! `read_uncommitted`, so set it there): the relay's own duplicates are gone. A consumer's own
//! crash between its database commit and its offset commit still redelivers, so the inbox is
//! still what makes the effects happen once. See `docs/CONSUMING.md` and
//! `docs/EXACTLY-ONCE.md`.

mod event;
mod inbox;
#[cfg(feature = "rdkafka")]
mod kafka;

pub use event::{DeadLetter, Event, EventError, EventId};
pub use inbox::{is_transient, Inbox, Processed, SCHEMA};
