//! The connection pool for ordinary SQL (setup, monitoring, the operator commands); the
//! replication stream and the polling leader open their own connections.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::tls::{make_tls_connect, UnusableSettings};
use crate::config::{Config, ConfigError};

/// Postgres connections for ordinary SQL; streaming has its own.
const POOL_SIZE: usize = 4;

/// Why the pool could not be built. Nothing here touches the network: the pool connects on
/// first use.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("invalid postgres.url")]
    Url(#[source] ConfigError),
    #[error("invalid postgres.url")]
    Tls(#[source] UnusableSettings),
    #[error("cannot build the postgres pool: {0}")]
    Build(String),
}

/// Builds the pool for ordinary SQL, with `postgres.url`'s TLS settings.
pub fn pool(cfg: &Config) -> Result<Pool, PoolError> {
    let pg = cfg.postgres_config().map_err(PoolError::Url)?;
    let tls = cfg.postgres_tls().map_err(PoolError::Url)?;
    // Verified: a pooled connection that went dead (a half-open network) is found out on
    // reuse, within the recycle timeout, instead of hanging the caller.
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Verified,
    };
    let manager = match make_tls_connect(&tls) {
        Ok(Some(connector)) => Manager::from_config(pg, connector, manager_config),
        Ok(None) => Manager::from_config(pg, NoTls, manager_config),
        Err(e) => return Err(PoolError::Tls(UnusableSettings(e))),
    };
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| PoolError::Build(e.to_string()))
}
