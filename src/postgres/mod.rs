//! Talking to Postgres outside the replication protocol: TLS for every connection (`tls`),
//! the pool for ordinary SQL (`pool`), the database objects the relay needs and the checks
//! that find them misconfigured (`setup`), and the publication's coverage of the outbox table
//! (`coverage`), all failing with a [`PgError`] (`error`). Parsing `postgres.url` into
//! connection and TLS parameters stays with the config (`config::postgres`), which validates
//! it at load without reading any file.

pub mod coverage;
pub mod error;
pub mod pool;
pub mod setup;
pub mod tls;

pub use error::PgError;
pub use pool::{pool, PoolError};
