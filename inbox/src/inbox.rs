//! The inbox: `inbox.received` (from `sql/inbox.sql`, the one copy of the schema) used from
//! tokio-postgres. Recording an event's id and applying its effects happen in one transaction,
//! so they commit together or not at all.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient, Transaction};

use crate::event::Event;

/// The inbox schema (`sql/inbox.sql`), idempotent; what [`Inbox::install`] runs. Apply it with
/// your migrations instead if you prefer (it is plain SQL).
pub const SCHEMA: &str = include_str!("../../sql/inbox.sql");

/// Serialises concurrent installs (two consumers starting at once would otherwise race on
/// `CREATE ... IF NOT EXISTS`). Any fixed number works; this one spells "inbox" in ASCII.
const INSTALL_LOCK: i64 = 0x69_6e_62_6f_78;

/// Records the id; true the first time (see `inbox.accept` in `sql/inbox.sql`).
const ACCEPT: &str = "SELECT inbox.accept($1, $2::uuid)";

const PURGE: &str = "DELETE FROM inbox.received \
                     WHERE consumer = $1 AND received_at < now() - make_interval(secs => $2)";

/// The inbox of one consumer (a service, or a consumer group): events it has already applied.
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
}

/// What [`Inbox::process`] did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// First time seen: the handler ran and its transaction committed with the inbox row.
    Applied(T),
    /// Seen (and committed) before: a redelivery. The handler did not run.
    Duplicate,
}

impl Inbox {
    /// `consumer` names who consumes (the service or consumer group); several consumers can
    /// share one inbox table, each deduplicating on its own.
    pub fn new(consumer: impl Into<String>) -> Inbox {
        Inbox {
            consumer: consumer.into(),
        }
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Creates the inbox schema, table and `inbox.accept` function if missing ([`SCHEMA`]).
    /// Idempotent, and safe when several consumers install at the same moment. The role needs
    /// `CREATE` on the database (or run [`SCHEMA`] with your migrations and skip this).
    pub async fn install(client: &Client) -> Result<(), tokio_postgres::Error> {
        // One simple query is one implicit transaction: the lock holds until the schema is in.
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_xact_lock({INSTALL_LOCK});\n{SCHEMA}"
            ))
            .await
    }

    /// Applies `event` at most once: in one transaction, records its id in the inbox and, only
    /// when that id is new, runs `handler` with the transaction, then commits.
    ///
    /// - A redelivery (the id committed before) returns [`Processed::Duplicate`] without running
    ///   the handler.
    /// - A handler error rolls the transaction back, inbox row included, and is returned as it
    ///   is: the same event is accepted again when retried.
    /// - Two consumers processing the same id at once: the second waits on the first's inbox
    ///   row and gets `Duplicate` if the first commits (or applies it if the first rolls back).
    /// - A failed commit is ambiguous (did it land?); retry the event: the inbox answers.
    ///
    /// `client` is a [`Client`] (a new transaction) or a [`Transaction`] (a savepoint inside
    /// it; then nothing is durable before the caller commits the outer transaction). Postgres
    /// errors reach the caller through `E: From<tokio_postgres::Error>`.
    pub async fn process<C, T, E, F>(
        &self,
        client: &mut C,
        event: &Event<'_>,
        handler: F,
    ) -> Result<Processed<T>, E>
    where
        C: GenericClient,
        E: From<tokio_postgres::Error>,
        F: AsyncFnOnce(&mut Transaction<'_>) -> Result<T, E>,
    {
        let mut tx = client.transaction().await?;
        let id = event.id().to_string();
        let first: bool = tx
            .query_typed_one(ACCEPT, &[(&self.consumer, Type::TEXT), (&id, Type::TEXT)])
            .await?
            .try_get(0)?;
        if !first {
            tx.rollback().await?;
            return Ok(Processed::Duplicate);
        }
        match handler(&mut tx).await {
            Ok(value) => {
                tx.commit().await?;
                Ok(Processed::Applied(value))
            }
            Err(err) => {
                // The handler's error is the one that matters. Should the rollback fail too,
                // the connection is gone and the server discards the transaction anyway.
                let _ = tx.rollback().await;
                Err(err)
            }
        }
    }

    /// Deletes this consumer's inbox rows recorded more than `age` ago; returns how many.
    ///
    /// An id must be kept as long as its event can still be delivered again. Redeliveries come
    /// from the consumer re-reading offsets it had not committed (a crash, a rebalance, a reset
    /// to an earlier offset) and from the relay resending after a crash (within minutes); both
    /// are bounded by how long the topic keeps records: its `retention.ms` (7 days by default).
    /// So pass at least the topic's `retention.ms`, plus a margin — and never purge for a
    /// compacted topic read from the beginning, whose records never expire. Run it now and
    /// then (daily), not on every event.
    pub async fn purge_older_than<C: GenericClient>(
        &self,
        client: &C,
        age: Duration,
    ) -> Result<u64, tokio_postgres::Error> {
        client
            .execute(PURGE, &[&self.consumer, &age.as_secs_f64()])
            .await
    }
}

/// Whether a Postgres error is worth retrying the same record for: a lost connection, a
/// serialization failure or deadlock, a server shutting down or out of resources, a read-only
/// server (a failover in progress). Anything else (a constraint violation, bad data, a bug in
/// the handler) will fail again: treat that record as poison.
pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match err.code() {
        Some(code) => {
            let code = code.code();
            // Class 08: connection exception; 53: insufficient resources.
            code.starts_with("08")
                || code.starts_with("53")
                || [
                    SqlState::T_R_SERIALIZATION_FAILURE.code(),
                    SqlState::T_R_DEADLOCK_DETECTED.code(),
                    SqlState::LOCK_NOT_AVAILABLE.code(),
                    SqlState::READ_ONLY_SQL_TRANSACTION.code(),
                    SqlState::ADMIN_SHUTDOWN.code(),
                    SqlState::CRASH_SHUTDOWN.code(),
                    SqlState::CANNOT_CONNECT_NOW.code(),
                    SqlState::IDLE_SESSION_TIMEOUT.code(),
                ]
                .contains(&code)
        }
        // No SQLSTATE: the connection broke (closed, I/O), or a client-side conversion failed.
        None => {
            err.is_closed()
                || std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>())
        }
    }
}
