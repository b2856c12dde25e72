//! Where committed outbox events come from: the logical replication stream (`logical`,
//! decoded by `pgoutput`) or the polling reader (`polling`, led by whoever holds the `leader`
//! lock). Both implement the [`Source`] contract, which `crate::pipeline` drives;
//! [`crate::postgres`] prepares the database objects they need.
//!
//! Sources know nothing of the sink: they publish into a [`Publish`], whose error type the
//! pipeline chooses (it carries the sink's faults); a source's own faults are
//! [`SourceError`]s, which that error type takes in (`?` works on both).

pub mod backlog;
pub mod leader;
pub mod logical;
pub mod pgoutput;
pub mod polling;
pub mod values;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use pgwire_replication::PgWireError;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Progress, UnitId, Watermark};

use crate::config::Config;
use crate::error::Definite;
use crate::metrics::Metrics;
use crate::postgres::PgError;
use crate::route::{OutboxEvent, Routed, Router};

/// What a source session needs, shared across reconnects.
pub struct Session {
    pub config: Arc<Config>,
    pub pool: deadpool_postgres::Pool,
    pub metrics: Metrics,
    pub router: Router,
    /// Where the source reports its progress (the relay's `/status`).
    pub report: Arc<dyn Report>,
}

/// What a source reports for the status page: how far it has confirmed, and what holds the
/// polling horizon back. The relay implements it for its state.
pub trait Report: Send + Sync {
    /// The confirmed position, as the source writes it.
    fn set_position(&self, position: String);

    /// Why the polling horizon is held back (an old transaction), or `None`.
    fn set_horizon_held_back(&self, problem: Option<String>);
}

/// A source of committed outbox events, as the pipeline drives it.
///
/// # The delivery contract
///
/// A position is confirmed to the source (the slot's confirmed position, the polling cursor)
/// only when every event at or before it has been acknowledged by Kafka. The source never
/// resends what it was told is safe, so confirming further would lose events on a crash;
/// confirming less only duplicates them after a restart (consumers drop those by `id`).
///
/// The source keeps its side of it by handing each transaction to the [`Publish`]er as one
/// watermark unit: [`Publish::open`] it, publish its events into it, and [`Publish::seal`] it
/// at the position that may be confirmed once they are all acknowledged. The pipeline owns
/// the watermark and calls [`Source::confirm`] with what it allows; a source confirms nothing
/// else, except what it has seen while nothing was pending ([`Publish::idle_at`]).
///
/// Shutdown waits for [`Source::at_boundary`] (no transaction open), so the open transaction is
/// finished, not cut: then every ack is awaited and [`Source::finish`] confirms the final
/// position, and a restart resends nothing. A session that halts (a definite error) still
/// drains and [`Source::settle`]s: everything acknowledged is confirmed, nothing past the
/// cause (its transaction is never sealed).
///
/// Futures the pipeline races in its select loop ([`Source::next`]) must be cancel-safe; the
/// others run to completion.
pub trait Source: Send + Sized {
    /// A place in the source's commit order: an LSN, a `(txid, seq)` cursor.
    type Position: Copy + Ord + Send + Sync + 'static + Progress;
    /// What [`Source::next`] waits for and [`Source::pump`] reads.
    type Input: Send;

    /// Ready: prepares the database objects, takes the slot or the leader lock, reads the
    /// confirmed position. Fails without side effects to undo.
    fn prepare(
        session: &Session,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<Self, SourceError>> + Send;

    /// The position the source starts from: the one confirmed last.
    fn start_position(&self) -> Self::Position;

    /// Exactly once: everything at or before `recorded` is in Kafka already (the progress
    /// the last committed Kafka transaction recorded): the source reads past it without
    /// publishing it, in whole source transactions; with `partial = (key, n)`, also the first
    /// `n` events of the transaction `key` (see [`Publish::within`]).
    fn skip_through(&mut self, recorded: Self::Position, partial: Option<(Self::Position, u64)>);

    /// Leading from here on: starts the source's background watchers.
    fn start(&mut self, session: &Session);

    /// Cancelled when this relay may no longer produce at all (another may lead already): the
    /// sink then stops even a send that waits for room.
    fn deposed(&self) -> Option<CancellationToken> {
        None
    }

    /// Lost: cancelled when the source's connection or leadership is gone; the session then
    /// ends with [`Source::lost_error`].
    fn lost(&self) -> CancellationToken;

    /// Why the session ends once [`Source::lost`] is cancelled.
    fn lost_error(&self) -> SourceError;

    /// Waits until there is something to read. Cancel-safe.
    fn next(&mut self) -> impl Future<Output = Result<Self::Input, SourceError>> + Send;

    /// Reads `input` and publishes its events, in commit order, into `out`. Fails with the
    /// publisher's error: the source's own faults, converted, or what publishing failed with.
    fn pump<W: Publish<Self::Position> + Send>(
        &mut self,
        input: Self::Input,
        out: &mut W,
    ) -> impl Future<Output = Result<(), W::Error>> + Send;

    /// True when no transaction is open: shutdown may stop here.
    fn at_boundary(&self) -> bool;

    /// Confirms `acked`, the newest position every event at or before which is acknowledged
    /// (`None`: nothing new), and publishes the source's position gauges. Called every tick.
    fn confirm(
        &mut self,
        acked: Option<Self::Position>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Shutdown, everything delivered: confirms the final position from `watermark` and ends
    /// the session cleanly.
    fn finish(
        &mut self,
        watermark: &Watermark<Self::Position>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Halting: confirms what `watermark` allows, as far as the source still can.
    fn settle(&mut self, watermark: &Watermark<Self::Position>) -> impl Future<Output = ()> + Send;

    /// Stops the background watchers [`Source::start`] began.
    fn stop(&mut self) -> impl Future<Output = ()> + Send;

    /// Drops the connection after a fault, without a goodbye.
    fn abort(&mut self) {}
}

/// Where a source publishes: the pipeline's watermark, router and sink.
pub trait Publish<P> {
    /// Why publishing failed, or the session otherwise ends inside [`Source::pump`]: the
    /// publisher's own faults (the sink's), and the source's, converted with `?`. A source
    /// passes it on unchanged; only the pipeline looks inside.
    type Error: From<SourceError> + Send;

    /// Opens a watermark unit for a transaction committed at `committed_at` (for latency).
    fn open(&mut self, committed_at: Option<Instant>) -> UnitId;

    /// Closes `unit` at `end`: once its events are acknowledged, `end` may be confirmed.
    fn seal(&mut self, unit: UnitId, end: P);

    /// Routes `event` and sends it as part of `unit`; with `on_invalid = "halt"`, an invalid
    /// event fails instead.
    fn publish(
        &mut self,
        unit: UnitId,
        event: OutboxEvent<'_>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Sends a record already routed (a dead letter the source built) as part of `unit`.
    fn publish_routed(
        &mut self,
        unit: UnitId,
        routed: Routed<'_>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The router, for dead letters the source builds itself.
    fn router(&self) -> &Router;

    /// Inside a transaction: its first `events` events (counted from its start, in stream
    /// order, skipped ones included) are published; `key` names the transaction (logical:
    /// its commit LSN). An exactly-once sink may commit here when its transaction grew too
    /// large, recording both, so a resumed source skips those events by
    /// [`Source::skip_through`]'s `partial`.
    fn within(&mut self, key: P, events: u64);

    /// Everything up to `position` has been read and no transaction is open: when no unit is
    /// pending, `position` is confirmed at once (an idle outbox on a busy database must not
    /// pin WAL); what is acknowledged is confirmed at once either way.
    fn idle_at(&mut self, position: P);
}

/// Why a source failed: its connection, its database, its stream, or something only the
/// operator can fix. A session ends with it (inside `crate::pipeline::SessionError`, beside
/// the sink's faults); what the relay does about it (retry, stand by, halt) is
/// [`crate::policy`]'s to decide.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Only the operator can fix it.
    #[error(transparent)]
    Definite(#[from] Definite),
    #[error("replication slot {slot} is in use by another connection")]
    SlotBusy { slot: String },
    /// Polling mode: another relay holds the advisory lock that elects the leader.
    #[error("another relay leads polling of {table}")]
    LeaderBusy { table: String },
    /// Polling mode: the connection holding the leader lock failed, so the lock may be gone.
    #[error("the connection holding the leader lock was lost ({0})")]
    LeaderLost(String),
    #[error("postgres query failed while {context}")]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot get a postgres connection")]
    Pool(#[source] deadpool_postgres::PoolError),
    #[error("replication stream failed")]
    Replication(#[source] PgWireError),
    #[error("the replication stream ended unexpectedly")]
    StreamEnded,
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("the replication connection is dead (the server has no walsender for it)")]
    StreamLost,
    /// Postgres is shutting down: coverage can no longer be verified, so the stream is left
    /// (the server waits for its clients to confirm everything) and resumed when it is back.
    #[error("postgres is shutting down")]
    ServerStopping,
    #[error("cannot decode a pgoutput message")]
    Decode(#[source] pgoutput::DecodeError),
}

/// The same kind, with the same text: the policy treats a setup or coverage failure as it
/// treats the source's own.
impl From<PgError> for SourceError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Definite(definite) => Self::Definite(definite),
            PgError::Postgres { context, source } => Self::Postgres { context, source },
            PgError::Pool(e) => Self::Pool(e),
            PgError::ServerStopping => Self::ServerStopping,
        }
    }
}

impl SourceError {
    /// True when only the operator can fix it: the session delivers and confirms what
    /// precedes the cause before it ends.
    pub fn is_definite(&self) -> bool {
        matches!(self, Self::Definite(_))
    }

    pub(crate) fn pool(e: deadpool_postgres::PoolError) -> Self {
        Self::Pool(e)
    }

    /// Classifies an error from the replication connection.
    pub(crate) fn replication(e: PgWireError, slot: &str) -> Self {
        let text = e.to_string();
        match replication_fault(&e, &text) {
            ReplicationFault::SlotBusy => Self::SlotBusy {
                slot: slot.to_owned(),
            },
            ReplicationFault::Login => Definite::ReplicationLogin { error: text }.into(),
            ReplicationFault::SlotVanished => Definite::SlotVanishedWhileStreaming {
                slot: slot.to_owned(),
            }
            .into(),
            ReplicationFault::SlotLost => Definite::SlotLost {
                slot: slot.to_owned(),
                confirmed: None,
            }
            .into(),
            ReplicationFault::PublicationMissing => {
                Definite::PublicationMissingInStream { error: text }.into()
            }
            ReplicationFault::Privilege => Definite::ReplicationPrivilege { error: text }.into(),
            ReplicationFault::Transient => Self::Replication(e),
        }
    }
}

/// What an error of the replication connection means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplicationFault {
    SlotBusy,
    Login,
    SlotVanished,
    SlotLost,
    PublicationMissing,
    Privilege,
    Transient,
}

/// The one place that reads the replication connection's error text. pgwire-replication
/// hands the server's error over as text only ("message (SQLSTATE code)"), and the codes
/// that matter are shared by unrelated errors (42704 is a missing slot and a missing
/// publication alike), so the message decides.
fn replication_fault(e: &PgWireError, text: &str) -> ReplicationFault {
    if text.contains("is active for PID") {
        return ReplicationFault::SlotBusy;
    }
    if let PgWireError::Auth(_) = e {
        return ReplicationFault::Login;
    }
    if text.contains("replication slot") && text.contains("does not exist") {
        return ReplicationFault::SlotVanished;
    }
    // The slot was invalidated (`wal_status = lost`), or its WAL went before that was
    // noticed: decoding from it can never resume.
    // (PostgreSQL 15 says "cannot read from", later versions "can no longer get changes".)
    if text.contains("can no longer get changes from replication slot")
        || text.contains("cannot read from logical replication slot")
        || (text.contains("requested WAL segment") && text.contains("already been removed"))
    {
        return ReplicationFault::SlotLost;
    }
    if text.contains("publication") && text.contains("does not exist") {
        return ReplicationFault::PublicationMissing;
    }
    if text.contains("permission denied") || text.contains("must be superuser or replication role")
    {
        return ReplicationFault::Privilege;
    }
    ReplicationFault::Transient
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(text: &str) -> ReplicationFault {
        let e = PgWireError::Server(text.into());
        replication_fault(&e, &e.to_string())
    }

    #[test]
    fn each_replication_error_text_has_its_meaning() {
        use ReplicationFault::*;
        for (text, fault) in [
            (
                "ERROR: replication slot \"s\" is active for PID 4242 (SQLSTATE 55006)",
                SlotBusy,
            ),
            (
                "ERROR: replication slot \"s\" does not exist (SQLSTATE 42704)",
                SlotVanished,
            ),
            // PostgreSQL 15
            (
                "ERROR: cannot read from logical replication slot \"s\" (SQLSTATE 55000)",
                SlotLost,
            ),
            // PostgreSQL 16 and later
            (
                "ERROR: can no longer get changes from replication slot \"s\"",
                SlotLost,
            ),
            (
                "ERROR: requested WAL segment 000000010000000000000003 has already been removed",
                SlotLost,
            ),
            (
                "ERROR: publication \"p\" does not exist (SQLSTATE 42704)",
                PublicationMissing,
            ),
            (
                "ERROR: permission denied to start WAL sender (SQLSTATE 42501)",
                Privilege,
            ),
            (
                "FATAL: must be superuser or replication role to start walsender (SQLSTATE 42501)",
                Privilege,
            ),
            (
                "FATAL: terminating connection due to administrator command (SQLSTATE 57P01)",
                Transient,
            ),
        ] {
            assert_eq!(server(text), fault, "{text}");
        }
        let auth = PgWireError::Auth("password authentication failed".into());
        assert_eq!(replication_fault(&auth, &auth.to_string()), Login);
    }

    #[test]
    fn a_slot_whose_wal_is_gone_is_definite() {
        for text in [
            // PostgreSQL 15
            "ERROR: cannot read from logical replication slot \"s\" (SQLSTATE 55000)",
            // PostgreSQL 16 and later
            "ERROR: can no longer get changes from replication slot \"s\"",
            "ERROR: requested WAL segment 000000010000000000000003 has already been removed",
        ] {
            let error = SourceError::replication(PgWireError::Server(text.into()), "s");
            assert!(error.is_definite(), "{text}");
            assert!(error.to_string().contains("wal_status = lost"), "{error}");
        }
        let transient = SourceError::replication(
            PgWireError::Server(
                "FATAL: terminating connection due to administrator command".into(),
            ),
            "s",
        );
        assert!(!transient.is_definite());
    }

    #[test]
    fn a_postgres_error_keeps_its_kind_and_its_text() {
        let query = || {
            "port=not-a-number"
                .parse::<tokio_postgres::Config>()
                .expect_err("an invalid port")
        };
        let pool = || deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait);
        let definite = || Definite::WalLevel {
            level: "replica".into(),
        };
        let cases = [
            PgError::Definite(definite()),
            PgError::Postgres {
                context: "reading wal_level",
                source: query(),
            },
            PgError::Pool(pool()),
            PgError::ServerStopping,
        ];
        for pg in cases {
            // Same variant name and fields, same text, same policy.
            let (debug, text, definite) = (format!("{pg:?}"), pg.to_string(), pg.is_definite());
            let source = SourceError::from(pg);
            assert_eq!(format!("{source:?}"), debug);
            assert_eq!(source.to_string(), text);
            assert_eq!(source.is_definite(), definite, "{source}");
        }
    }
}
