//! What can go wrong talking to Postgres outside the replication protocol: the setup and
//! coverage checks fail with a [`PgError`], which the sources and commands carry on as their
//! own error (`crate::source::SourceError` keeps each kind and its text).

use tokio_postgres::error::SqlState;

use crate::error::Definite;

/// Why a setup step or a coverage check failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Only the operator can fix it.
    #[error(transparent)]
    Definite(#[from] Definite),
    #[error("postgres query failed while {context}")]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot get a postgres connection")]
    Pool(#[source] deadpool_postgres::PoolError),
    /// Postgres is shutting down: coverage can no longer be verified.
    #[error("postgres is shutting down")]
    ServerStopping,
}

impl PgError {
    pub fn is_definite(&self) -> bool {
        matches!(self, Self::Definite(_))
    }

    pub(crate) fn pool(e: deadpool_postgres::PoolError) -> Self {
        Self::Pool(e)
    }

    /// Whether Postgres is shutting down (SQLSTATE 57P03: new sessions refused, or 57P01:
    /// ours ended by the administrator's shutdown).
    pub(crate) fn server_stopping(&self) -> bool {
        let source = match self {
            Self::Postgres { source, .. } => source,
            Self::Pool(deadpool_postgres::PoolError::Backend(source)) => source,
            _ => return false,
        };
        source
            .code()
            .is_some_and(|c| *c == SqlState::CANNOT_CONNECT_NOW || *c == SqlState::ADMIN_SHUTDOWN)
    }
}

/// Classifies a failed statement by its SQLSTATE: a missing privilege (42501) is definite,
/// anything else transient.
pub(crate) fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |source| {
        if source.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            Definite::PermissionDenied {
                context,
                message: db_message(&source),
            }
            .into()
        } else {
            PgError::Postgres { context, source }
        }
    }
}

/// The server's own message, without the SQLSTATE and position tokio-postgres adds.
pub(crate) fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |db| db.message().to_owned())
}
