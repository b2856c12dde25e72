//! Where committed outbox events come from: the logical replication stream (`logical`,
//! decoded by `pgoutput`) or the polling reader (`polling`, led by whoever holds the `leader`
//! lock). Both hand rows to the same router and sink; `setup` prepares the database objects
//! they need.

pub mod backlog;
pub mod coverage;
pub mod leader;
pub mod logical;
pub mod pgoutput;
pub mod polling;
pub mod setup;
pub mod values;

use std::sync::Arc;

use pgwire_replication::PgWireError;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::sink::kafka::SinkError;
use crate::status::RelayState;

/// What a source session needs, shared across reconnects.
pub struct Session {
    pub config: Arc<Config>,
    pub pool: deadpool_postgres::Pool,
    pub metrics: Metrics,
    pub router: Router,
    pub state: Arc<RelayState>,
}

/// Why a session ended. [`SourceError::is_definite`] separates faults the operator must fix
/// (stop and say how) from transient ones (retry with backoff from the confirmed position).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{problem}; to fix: {fix}")]
    Definite { problem: String, fix: String },
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
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl SourceError {
    /// True when retrying cannot help: the relay stops and reports the fix.
    pub fn is_definite(&self) -> bool {
        match self {
            Self::Sink(e) => e.is_definite(),
            _ => matches!(self, Self::Definite { .. }),
        }
    }

    pub(crate) fn pool(e: deadpool_postgres::PoolError) -> Self {
        Self::Pool(e)
    }

    /// Classifies an error from the replication connection.
    pub(crate) fn replication(e: PgWireError, slot: &str) -> Self {
        let text = e.to_string();
        if text.contains("is active for PID") {
            return Self::SlotBusy {
                slot: slot.to_owned(),
            };
        }
        if let PgWireError::Auth(_) = e {
            return Self::Definite {
                problem: format!("postgres refused the replication login ({text})"),
                fix: "check the user and password in postgres.url and that pg_hba.conf allows replication connections for it".into(),
            };
        }
        if text.contains("replication slot") && text.contains("does not exist") {
            return Self::Definite {
                problem: format!("replication slot {slot} vanished while streaming; events committed since the last confirmed position may be lost if it is recreated"),
                fix: "see the README section \"A vanished slot\"".into(),
            };
        }
        // The slot was invalidated (`wal_status = lost`), or its WAL went before that was
        // noticed: decoding from it can never resume.
        // (PostgreSQL 15 says "cannot read from", later versions "can no longer get changes".)
        if text.contains("can no longer get changes from replication slot")
            || text.contains("cannot read from logical replication slot")
            || (text.contains("requested WAL segment") && text.contains("already been removed"))
        {
            return setup::slot_lost(slot, None);
        }
        if text.contains("publication") && text.contains("does not exist") {
            return Self::Definite {
                problem: format!("the publication is missing ({text})"),
                fix: "run `outbox-relay init` or create the publication for the outbox table"
                    .into(),
            };
        }
        if text.contains("permission denied")
            || text.contains("must be superuser or replication role")
        {
            return Self::Definite {
                problem: format!("the relay's role lacks a privilege ({text})"),
                fix: "grant REPLICATION to the relay's role (see sql/roles.sql)".into(),
            };
        }
        Self::Replication(e)
    }
}

/// With `on_invalid = "halt"`, an invalid event stops the relay before anything past it is
/// confirmed; otherwise it goes on to the dead-letter topic.
pub(crate) fn halt_if_invalid(
    on_invalid: crate::config::OnInvalid,
    routed: &crate::route::Routed<'_>,
) -> Result<(), SourceError> {
    if on_invalid != crate::config::OnInvalid::Halt {
        return Ok(());
    }
    let crate::route::Routed::DeadLetter { record, reason } = routed else {
        return Ok(());
    };
    let text = |name| {
        record
            .header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    Err(SourceError::Definite {
        problem: format!(
            "event {} is invalid ({reason}: {}); halted because source.on_invalid = \"halt\"",
            text("id"),
            text("dlq_error")
        ),
        fix: "correct the producer of this event, then set on_invalid = \"dead-letter\" to let it pass to the dead-letter topic".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
