//! The relay's configuration: one typed struct, loaded from an optional TOML file, then
//! overridden by `OUTBOX_RELAY_<SECTION>_<KEY>` environment variables, then validated, all before
//! the runtime starts (SPEC §5).
//!
//! Loading is strict on purpose: an unknown key in the file or an `OUTBOX_RELAY_*` variable that
//! names no key is an error, because a typo that is silently ignored leaves the relay running
//! with a default the operator thought they had changed. Every error names the field (and the
//! variable, when the value came from the environment) and the constraint it broke.
//!
//! Secrets (the Postgres URL, which usually carries the password, and librdkafka properties such
//! as `sasl.password`) are redacted by `Debug`, so the config can be logged as a whole; no error
//! message repeats a secret value.
//!
//! One file per job:
//! - `types.rs`: the [`Config`] struct and its sections, each default a named constant, and
//!   [`EXAMPLE`], the commented file with every default;
//! - `columns.rs`: the outbox table's columns, the one list of them (config key, default name,
//!   when required) that the loader, validation, coverage and both sources read;
//! - `load.rs`: the TOML file and the environment overlay, checked against the key schema;
//! - `de.rs`: serde helpers (durations, optional columns, `[kafka.properties]`);
//! - `validate.rs`: the constraints the types cannot express;
//! - `postgres.rs`: `postgres.url`, its libpq TLS parameters and its redaction;
//! - `error.rs`: [`ConfigError`].
//!
//! Config reads no certificate file and does not depend on the `tls` module: its
//! `check_files` reads them, and the caller runs it after loading.

mod columns;
mod de;
mod error;
mod load;
mod postgres;
mod types;
mod validate;

#[cfg(test)]
mod testing;

pub use columns::{Column, ColumnSpec, Columns, Required, OUTBOX_COLUMNS};
pub use error::ConfigError;
pub use load::{CONFIG_PATH_ENV, ENV_PREFIX, LOG_FILTER_ENV};
pub use postgres::{PostgresTls, SslMode};
pub use types::*;
