//! Why a config could not be loaded.

use std::path::PathBuf;

/// Why a config could not be loaded. `Display` never includes a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}", .path.display())]
    Io {
        /// The file that was asked for.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has a key the relay does not know.
    #[error("invalid config file: {message}")]
    Parse {
        /// What is wrong and where (line and column, or the key).
        message: String,
    },
    /// An `OUTBOX_RELAY_*` environment variable names no config key.
    #[error("environment variable {var} names no config key (overrides are OUTBOX_RELAY_<SECTION>_<KEY>)")]
    UnknownEnv {
        /// The variable's name.
        var: String,
    },
    /// A value breaks a constraint.
    #[error("{field} {reason}")]
    Invalid {
        /// Dotted key, like `source.batch_size`.
        field: String,
        /// The constraint, phrased to follow the field name.
        reason: String,
    },
}

pub(super) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}
