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
//! The loader works in two steps: the TOML text is parsed into a generic table, checked against
//! a small schema (which gives precise errors and tells the environment overrides each key's
//! type), merged with the environment, and only then deserialised into [`Config`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::{Table, Value};

/// Prefix of every environment variable the relay reads.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";
/// The config file path (like `--config`); not an override.
pub const CONFIG_PATH_ENV: &str = "OUTBOX_RELAY_CONFIG";
/// Reserved for a tracing env-filter read elsewhere; not an override.
pub const LOG_FILTER_ENV: &str = "OUTBOX_RELAY_LOG";

/// A local database as the role from `sql/roles.sql`; deliberately without a password so that no
/// credential is ever baked into a default.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://outbox_relay@127.0.0.1:5432/app";
/// Logical decoding is the default: it sees `outbox.emit()` messages and rows deleted in the same
/// transaction, and costs the database nothing when idle.
pub const DEFAULT_SOURCE_MODE: SourceMode = SourceMode::Logical;
/// The table `sql/outbox.sql` creates.
pub const DEFAULT_TABLE: &str = "outbox.events";
/// Named after the program so a DBA can tell who owns it in `pg_replication_slots`.
pub const DEFAULT_SLOT: &str = "outbox_relay";
/// Same name as the slot: the pair belongs together.
pub const DEFAULT_PUBLICATION: &str = "outbox_relay";
/// The first start works without a manual DBA step; turn off where the role may not create.
pub const DEFAULT_CREATE: bool = true;
/// The prefix `outbox.emit()` passes to `pg_logical_emit_message`.
pub const DEFAULT_MESSAGE_PREFIX: &str = "outbox";
/// LISTEN/NOTIFY normally wakes the poller sooner; this only bounds latency when a notification
/// is missed, at five cheap index scans a second on an idle outbox.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Amortises round trips and producer calls at ~100k events/s while keeping one batch's memory
/// small.
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// Largest accepted batch: beyond this a single batch's memory dominates the relay's footprint.
pub const MAX_BATCH_SIZE: usize = 1_000_000;
/// A bad row goes to the dead-letter topic so it never stops the stream (SPEC §7).
pub const DEFAULT_ON_INVALID: OnInvalid = OnInvalid::DeadLetter;
/// The local broker used by the demo and in development.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
/// The topic naming of Debezium's outbox event router, so existing consumers find their topics.
pub const DEFAULT_TOPIC: &str = "outbox.event.{aggregate_type}";
/// Next to the event topics and obviously not one of them.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "outbox.dead-letter";
/// Topics per aggregate type appear without an admin step, like Kafka Connect's topic creation.
pub const DEFAULT_CREATE_TOPICS: bool = true;
/// Some consumer parallelism without spreading a small outbox thinly; per-aggregate order holds
/// for any partition count because the key picks the partition.
pub const DEFAULT_TOPIC_PARTITIONS: i32 = 3;
/// All interfaces so kubelet probes and Prometheus can reach it; the port is fixed by the SPEC so
/// the Helm chart and dashboards agree on it.
pub const DEFAULT_HTTP_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9187));
/// Text is readable at a terminal; log shippers should set `json`.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// Lifecycle events and errors without per-event noise.
pub const DEFAULT_LOG_LEVEL: &str = "info";

// Column defaults: the names `sql/outbox.sql` uses.
/// Default `source.columns.id`.
pub const DEFAULT_COLUMN_ID: &str = "id";
/// Default `source.columns.aggregate_type`.
pub const DEFAULT_COLUMN_AGGREGATE_TYPE: &str = "aggregate_type";
/// Default `source.columns.aggregate_id`.
pub const DEFAULT_COLUMN_AGGREGATE_ID: &str = "aggregate_id";
/// Default `source.columns.event_type`.
pub const DEFAULT_COLUMN_EVENT_TYPE: &str = "event_type";
/// Default `source.columns.payload`.
pub const DEFAULT_COLUMN_PAYLOAD: &str = "payload";
/// Default `source.columns.headers`.
pub const DEFAULT_COLUMN_HEADERS: &str = "headers";
/// Default `source.columns.created_at`.
pub const DEFAULT_COLUMN_CREATED_AT: &str = "created_at";
/// Default `source.columns.seq`.
pub const DEFAULT_COLUMN_SEQ: &str = "seq";
/// Default `source.columns.txid`.
pub const DEFAULT_COLUMN_TXID: &str = "txid";

/// Longest Kafka topic name the brokers accept.
const MAX_TOPIC_LEN: usize = 249;
/// Postgres truncates identifiers longer than `NAMEDATALEN - 1` bytes.
const MAX_IDENTIFIER_LEN: usize = 63;
/// The placeholders a `kafka.topic` template may use.
const TOPIC_PLACEHOLDERS: [&str; 2] = ["aggregate_type", "event_type"];

/// A full, commented config file with every default spelled out (the SPEC §5 block). The one
/// difference from [`Config::default`] is `"compression.type" = "lz4"`, which the producer uses
/// anyway when the property is absent.
pub const EXAMPLE: &str = r#"[postgres]
url = "postgres://outbox_relay@127.0.0.1:5432/app"   # libpq-style URL; sslmode honoured

[source]
mode = "logical"             # "logical" (default) | "polling"
table = "outbox.events"
slot = "outbox_relay"        # logical
publication = "outbox_relay" # logical
create = true                # create publication/slot if missing
message_prefix = "outbox"    # logical: pg_logical_emit_message prefix to relay
poll_interval = "200ms"      # polling: upper bound between polls (LISTEN/NOTIFY wakes earlier)
batch_size = 1000
on_invalid = "dead-letter"   # "dead-letter" | "halt"
[source.columns]             # optional renames, e.g. aggregate_type = "aggregatetype"

[kafka]
brokers = "127.0.0.1:9092"
topic = "outbox.event.{aggregate_type}"
dead_letter_topic = "outbox.dead-letter"
create_topics = true         # create missing topics through the admin API
topic_partitions = 3         # for topics it creates
[kafka.properties]           # verbatim librdkafka settings
"compression.type" = "lz4"

[http]
listen = "0.0.0.0:9187"

[log]
format = "text"              # "text" | "json"
level = "info"
"#;

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
    /// A file named by the TLS settings of `postgres.url` is unusable.
    #[error("postgres.url has TLS settings that cannot be used")]
    Tls(#[source] crate::tls::TlsError),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A secret string. `Debug` and `Display` print `***`; [`Secret::expose`] is the one way to read
/// it, so every use is greppable.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself: pass it on, never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The whole relay configuration.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[postgres]`
    pub postgres: PostgresConfig,
    /// `[source]`: where and how outbox rows are read.
    pub source: SourceConfig,
    /// `[kafka]`: where records go.
    pub kafka: KafkaConfig,
    /// `[http]`: health, status and metrics endpoints.
    pub http: HttpConfig,
    /// `[log]`
    pub log: LogConfig,
}

/// `[postgres]`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// A `postgres://` URL or a libpq `key=value` string; usually carries the password.
    pub url: Secret,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: Secret::new(DEFAULT_POSTGRES_URL),
        }
    }
}

impl PostgresConfig {
    /// The URL with any password replaced by `***`, fit for logs and `/status`.
    pub fn redacted_url(&self) -> String {
        redact_connection_string(self.url.expose()).unwrap_or_else(|| "***".to_owned())
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.redacted_url())
            .finish()
    }
}

/// libpq's `sslmode`, applied to both Postgres connections (see [`crate::tls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// `disable`: plain TCP only.
    Disable,
    /// `prefer`, libpq's default (and `allow`): TLS without verification when the server offers
    /// it, plain TCP when it does not.
    #[default]
    Prefer,
    /// `require`: TLS or no connection; the certificate is not verified.
    Require,
    /// `verify-ca`: TLS, and a trusted CA signed the server's certificate.
    VerifyCa,
    /// `verify-full`: `verify-ca`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS settings of `postgres.url`: libpq's `sslmode`, `sslrootcert`, `sslcert` and
/// `sslkey`, which the relay reads itself because tokio-postgres knows only the first, and only
/// three of its values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PostgresTls {
    /// The mode in force. As in libpq, `require` with an `sslrootcert` file verifies the CA
    /// (`verify-ca`), `sslrootcert=system` without a mode means `verify-full`, and every mode
    /// is `disable` when all hosts are Unix sockets (Postgres has no TLS there).
    pub mode: SslMode,
    /// The PEM file of the CAs trusted to sign the server's certificate; `None` (no
    /// `sslrootcert`, or `sslrootcert=system`) trusts the system's CA bundle.
    pub root_cert: Option<PathBuf>,
    /// A client certificate chain and its private key (PEM files), from `sslcert` and `sslkey`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// How outbox rows are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// Tail the logical replication stream (`pgoutput`).
    #[default]
    Logical,
    /// Poll the table, ordered by transaction id and `seq`.
    Polling,
}

/// What to do with a row that cannot be published as it is (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnInvalid {
    /// Publish it to `kafka.dead_letter_topic` and carry on.
    #[default]
    DeadLetter,
    /// Stop advancing, report not-ready and say why.
    Halt,
}

/// `[source]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Logical replication or polling.
    pub mode: SourceMode,
    /// The outbox table as `"schema.name"`; see [`SourceConfig::table_parts`].
    pub table: String,
    /// Replication slot name (logical mode).
    pub slot: String,
    /// Publication name (logical mode).
    pub publication: String,
    /// Create the publication and slot if they are missing (first start only; a slot that
    /// vanished later is never recreated silently).
    pub create: bool,
    /// `pg_logical_emit_message` prefix to relay (logical mode).
    pub message_prefix: String,
    /// Upper bound between polls (polling mode).
    #[serde(deserialize_with = "deserialize_duration")]
    pub poll_interval: Duration,
    /// Most events read or published as one batch.
    pub batch_size: usize,
    /// Dead-letter or halt on a bad row.
    pub on_invalid: OnInvalid,
    /// Polling mode: delete published rows older than this (by `created_at`), in small
    /// batches. `None` (the default) deletes nothing.
    #[serde(deserialize_with = "deserialize_optional_duration")]
    pub retention: Option<Duration>,
    /// `[source.columns]`: column names of the outbox table.
    pub columns: Columns,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            mode: DEFAULT_SOURCE_MODE,
            table: DEFAULT_TABLE.to_owned(),
            slot: DEFAULT_SLOT.to_owned(),
            publication: DEFAULT_PUBLICATION.to_owned(),
            create: DEFAULT_CREATE,
            message_prefix: DEFAULT_MESSAGE_PREFIX.to_owned(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            batch_size: DEFAULT_BATCH_SIZE,
            on_invalid: DEFAULT_ON_INVALID,
            retention: None,
            columns: Columns::default(),
        }
    }
}

impl SourceConfig {
    /// `(schema, name)` of the outbox table. After [`Config::validate`] the table always has
    /// both parts; before it, a name without a dot is taken to be in `public`.
    pub fn table_parts(&self) -> (&str, &str) {
        self.table
            .split_once('.')
            .unwrap_or(("public", self.table.as_str()))
    }
}

/// `[source.columns]`: the outbox table's column names, so an existing table (Debezium's
/// `aggregatetype`, `aggregateid`, `type`) works unchanged.
///
/// The optional columns can be switched off by setting them to the empty string in the file
/// (`headers = ""`, `created_at = ""`) or environment: that means "my table has no such column"
/// and gives `None`. Without `headers` records carry only the standard headers; without
/// `created_at` the record timestamp is the commit time; `seq` and `txid` are needed by polling
/// mode only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Columns {
    /// The event id, published as header `id` (the dedup key).
    pub id: String,
    /// Routes to a topic.
    pub aggregate_type: String,
    /// The Kafka key.
    pub aggregate_id: String,
    /// Published as header `event_type`.
    pub event_type: String,
    /// The Kafka value.
    pub payload: String,
    /// A JSON object of extra Kafka headers; `None` if the table has none.
    #[serde(deserialize_with = "deserialize_optional_column")]
    pub headers: Option<String>,
    /// The record timestamp; `None` means use the commit time.
    #[serde(deserialize_with = "deserialize_optional_column")]
    pub created_at: Option<String>,
    /// Order within a transaction (polling mode).
    #[serde(deserialize_with = "deserialize_optional_column")]
    pub seq: Option<String>,
    /// The writing transaction's `xid8` (polling mode).
    #[serde(deserialize_with = "deserialize_optional_column")]
    pub txid: Option<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            id: DEFAULT_COLUMN_ID.to_owned(),
            aggregate_type: DEFAULT_COLUMN_AGGREGATE_TYPE.to_owned(),
            aggregate_id: DEFAULT_COLUMN_AGGREGATE_ID.to_owned(),
            event_type: DEFAULT_COLUMN_EVENT_TYPE.to_owned(),
            payload: DEFAULT_COLUMN_PAYLOAD.to_owned(),
            headers: Some(DEFAULT_COLUMN_HEADERS.to_owned()),
            created_at: Some(DEFAULT_COLUMN_CREATED_AT.to_owned()),
            seq: Some(DEFAULT_COLUMN_SEQ.to_owned()),
            txid: Some(DEFAULT_COLUMN_TXID.to_owned()),
        }
    }
}

/// `[kafka]`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic template; placeholders `{aggregate_type}` and `{event_type}`.
    pub topic: String,
    /// Where bad rows go (SPEC §7).
    pub dead_letter_topic: String,
    /// Create missing topics through the admin API.
    pub create_topics: bool,
    /// Partitions of the topics the relay creates.
    pub topic_partitions: i32,
    /// `[kafka.properties]`: librdkafka settings, passed verbatim. Values may be written as TOML
    /// strings, numbers or booleans and are kept in their string form; dotted keys may be quoted
    /// (`"compression.type" = "lz4"`) or bare (`compression.type = "lz4"`).
    #[serde(deserialize_with = "deserialize_properties")]
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: DEFAULT_BROKERS.to_owned(),
            topic: DEFAULT_TOPIC.to_owned(),
            dead_letter_topic: DEFAULT_DEAD_LETTER_TOPIC.to_owned(),
            create_topics: DEFAULT_CREATE_TOPICS,
            topic_partitions: DEFAULT_TOPIC_PARTITIONS,
            // Empty: the producer's own defaults (idempotence, acks=all, lz4) live in the sink.
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// Whether a librdkafka property holds a secret: its name contains `password`, `secret` or
    /// `token`, ends in `.key` or `key.pem`, or is `sasl.oauthbearer.config` (which may embed a
    /// client secret).
    pub fn is_secret_property(key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        ["password", "secret", "token"]
            .iter()
            .any(|word| key.contains(word))
            || key.ends_with(".key")
            || key.ends_with("key.pem")
            || key == "sasl.oauthbearer.config"
    }

    /// The properties with secret values replaced by `***`, fit for logs and `/status`.
    pub fn redacted_properties(&self) -> BTreeMap<&str, &str> {
        self.properties
            .iter()
            .map(|(key, value)| {
                let shown = if Self::is_secret_property(key) {
                    "***"
                } else {
                    value.as_str()
                };
                (key.as_str(), shown)
            })
            .collect()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("properties", &self.redacted_properties())
            .finish()
    }
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/healthz`, `/readyz`, `/status` and `/metrics`.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: DEFAULT_HTTP_LISTEN,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Text or JSON.
    pub format: LogFormat,
    /// A tracing level (`info`) or env-filter directives (`info,outbox_relay=debug`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: DEFAULT_LOG_FORMAT,
            level: DEFAULT_LOG_LEVEL.to_owned(),
        }
    }
}

impl Config {
    /// Loads the file at `path` (or, when `None`, at `$OUTBOX_RELAY_CONFIG` if set; otherwise no
    /// file, only defaults), applies the process environment's overrides, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = match path {
            Some(_) => None,
            None => std::env::var_os(CONFIG_PATH_ENV)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from),
        };
        let text = match path.or(from_env.as_deref()) {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                        path: path.to_path_buf(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            // A variable whose name is not UTF-8 cannot be one of ours.
            let Ok(name) = name.into_string() else {
                continue;
            };
            if !name.starts_with(ENV_PREFIX) {
                continue;
            }
            let value = value
                .into_string()
                .map_err(|_| invalid(&name, "must be valid UTF-8"))?;
            env.push((name, value));
        }
        Self::from_parts(text.as_deref(), env)
    }

    /// Like [`Config::load`], from explicit file text (`None`: no file) and an explicit list of
    /// environment variables (anything not starting with `OUTBOX_RELAY_` is ignored).
    pub fn from_parts(
        toml_text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match toml_text {
            Some(text) => parse_toml(text)?,
            None => Table::new(),
        };
        check_and_normalize(&mut table)?;
        let origins = apply_env(&mut table, env)?;
        // Checked again because the environment's values are strings that still need their
        // field's type; errors then name the variable too.
        check_and_normalize(&mut table).map_err(|err| blame_env(err, &origins))?;
        let config =
            Config::deserialize(Value::Table(table)).map_err(|err| ConfigError::Parse {
                message: err.message().trim().to_owned(),
            })?;
        config.validate().map_err(|err| blame_env(err, &origins))?;
        Ok(config)
    }

    /// Checks every constraint the types cannot express; the error names the field and the
    /// constraint. Returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (_, tls) = parse_postgres_url(self.postgres.url.expose())?;
        // Reads the CA and client certificate files now, so a wrong path fails at startup.
        crate::tls::make_tls_connect(&tls).map_err(ConfigError::Tls)?;
        self.validate_source()?;
        self.validate_kafka()?;
        validate_log_level(&self.log.level)
    }

    /// The Postgres connection settings, parsed by `tokio_postgres` (which accepts `postgres://`
    /// URLs and libpq `key=value` strings). The TLS parameters it does not know are taken out
    /// first ([`Config::postgres_tls`] has them) and its `ssl_mode` set to match: `disable`,
    /// `prefer`, or `require` for the verifying modes. The error never contains the password.
    pub fn postgres_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        parse_postgres_url(self.postgres.url.expose()).map(|(config, _)| config)
    }

    /// The TLS settings of `postgres.url`, for both connections.
    pub fn postgres_tls(&self) -> Result<PostgresTls, ConfigError> {
        parse_postgres_url(self.postgres.url.expose()).map(|(_, tls)| tls)
    }

    fn validate_source(&self) -> Result<(), ConfigError> {
        let source = &self.source;
        let table_ok = matches!(source.table.split_once('.'), Some((schema, name))
            if is_table_identifier(schema) && is_table_identifier(name));
        if !table_ok {
            return Err(invalid(
                "source.table",
                "must be \"schema.name\" (each part 1 to 63 bytes, without '.', '\"' or control characters)",
            ));
        }
        for (field, name) in [
            ("source.slot", &source.slot),
            ("source.publication", &source.publication),
        ] {
            if !is_slot_name(name) {
                return Err(invalid(
                    field,
                    "must be 1 to 63 characters of lower-case letters, digits and underscores",
                ));
            }
        }
        if !is_message_prefix(&source.message_prefix) {
            return Err(invalid(
                "source.message_prefix",
                "must be 1 to 63 characters of ASCII letters, digits and _ - . : /",
            ));
        }
        if source.poll_interval.is_zero() {
            return Err(invalid("source.poll_interval", "must be greater than zero"));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&source.batch_size) {
            return Err(invalid(
                "source.batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}"),
            ));
        }
        let columns = &source.columns;
        let named = [
            ("id", Some(&columns.id)),
            ("aggregate_type", Some(&columns.aggregate_type)),
            ("aggregate_id", Some(&columns.aggregate_id)),
            ("event_type", Some(&columns.event_type)),
            ("payload", Some(&columns.payload)),
            ("headers", columns.headers.as_ref()),
            ("created_at", columns.created_at.as_ref()),
            ("seq", columns.seq.as_ref()),
            ("txid", columns.txid.as_ref()),
        ];
        for (key, name) in named {
            if name.is_some_and(|name| !is_column_name(name)) {
                return Err(invalid(
                    format!("source.columns.{key}"),
                    "must be 1 to 63 bytes without '\"' or control characters",
                ));
            }
        }
        if let Some(retention) = source.retention {
            if source.mode != SourceMode::Polling {
                return Err(invalid(
                    "source.retention",
                    "applies to source.mode = \"polling\" only (logical mode cannot tell which rows are published)",
                ));
            }
            if retention.is_zero() {
                return Err(invalid("source.retention", "must be greater than zero"));
            }
            if columns.created_at.is_none() {
                return Err(invalid(
                    "source.retention",
                    "needs source.columns.created_at (rows are aged by it)",
                ));
            }
        }
        if source.mode == SourceMode::Polling {
            // Polling orders by (txid, seq) and only reads below the commit horizon.
            for (key, name) in [("seq", &columns.seq), ("txid", &columns.txid)] {
                if name.is_none() {
                    return Err(invalid(
                        format!("source.columns.{key}"),
                        "is required when source.mode = \"polling\"",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        let kafka = &self.kafka;
        if kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty"));
        }
        check_topic_template(&kafka.topic).map_err(|reason| invalid("kafka.topic", reason))?;
        if !is_topic_name(&kafka.dead_letter_topic) {
            return Err(invalid(
                "kafka.dead_letter_topic",
                format!(
                    "must be a Kafka topic name: 1 to {MAX_TOPIC_LEN} characters of [a-zA-Z0-9._-], not \".\" or \"..\""
                ),
            ));
        }
        if kafka.topic_partitions < 1 {
            return Err(invalid("kafka.topic_partitions", "must be at least 1"));
        }
        if let Some(key) = kafka.properties.keys().find(|key| key.trim().is_empty()) {
            return Err(invalid(
                format!("kafka.properties.\"{key}\""),
                "must be a non-empty librdkafka property name",
            ));
        }
        Ok(())
    }
}

fn validate_log_level(level: &str) -> Result<(), ConfigError> {
    // A full env-filter parse belongs to the subscriber; this catches the empty and garbled.
    if level.is_empty() || !level.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            "log.level",
            "must be a tracing level or filter directives like \"info,outbox_relay=debug\" (no spaces)",
        ));
    }
    Ok(())
}

/// Slot names: Postgres allows only lower-case letters, digits and underscores.
fn is_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IDENTIFIER_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A `pg_logical_emit_message` prefix `init` can write into `outbox.emit`'s dollar-quoted
/// body as a plain string literal: no quote, backslash or `$` can end the literal or the body.
fn is_message_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= MAX_IDENTIFIER_LEN
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'))
}

/// A part of `schema.name`: any identifier the relay can quote safely.
fn is_table_identifier(part: &str) -> bool {
    is_column_name(part) && !part.contains('.')
}

fn is_column_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IDENTIFIER_LEN
        && !name.chars().any(|c| c == '"' || c.is_control())
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Kafka's own rule for topic names.
fn is_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_LEN
        && name != "."
        && name != ".."
        && name.chars().all(is_topic_char)
}

/// A topic template: legal topic characters outside `{aggregate_type}` / `{event_type}`.
/// Whether a rendered name is legal depends on the row and is checked per event.
fn check_topic_template(template: &str) -> Result<(), String> {
    let rule = "must contain only [a-zA-Z0-9._-] outside placeholders";
    let mut literal = String::new();
    let mut placeholders = 0;
    let mut rest = template;
    while let Some(c) = rest.chars().next() {
        match c {
            '{' => {
                let Some(end) = rest.find('}') else {
                    return Err(format!("{rule}; unclosed '{{'"));
                };
                let name = &rest[1..end];
                if !TOPIC_PLACEHOLDERS.contains(&name) {
                    return Err(format!(
                        "{rule}; unknown placeholder {{{name}}} (known: {{aggregate_type}}, {{event_type}})"
                    ));
                }
                placeholders += 1;
                rest = &rest[end + 1..];
            }
            c if is_topic_char(c) => {
                literal.push(c);
                rest = &rest[c.len_utf8()..];
            }
            c => return Err(format!("{rule}; found {c:?}")),
        }
    }
    if placeholders == 0 && !is_topic_name(&literal) {
        return Err(format!(
            "must be a Kafka topic name (1 to {MAX_TOPIC_LEN} characters, not \".\" or \"..\") or a template"
        ));
    }
    if literal.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "must leave room for the placeholders: its fixed part exceeds {MAX_TOPIC_LEN} characters"
        ));
    }
    Ok(())
}

/// Parses `"200ms"`, `"1s"`, `"1.5s"`, `"2m"`, `"1h"`: a decimal number (at most nine decimal
/// places) and one unit, nothing else. The error is a reason to put after the field name.
fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or("has no unit (use ms, s, m or h)")?;
    let (number, unit) = text.split_at(split);
    let nanos_per_unit: u128 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err("has an unknown unit (use ms, s, m or h)"),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (number.contains('.') && !digits(fraction)) {
        return Err("must start with a number like 200 or 1.5");
    }
    if fraction.len() > 9 {
        return Err("has more than nine decimal places");
    }
    let whole: u128 = whole.parse().map_err(|_| "is too large")?;
    // `fraction` has at most nine digits, so it and 10^len fit easily.
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| "is not a number")?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let nanos = whole
        .checked_mul(nanos_per_unit)
        .and_then(|n| n.checked_add(fraction_value * nanos_per_unit / scale))
        .ok_or("is too large")?;
    let nanos = u64::try_from(nanos).map_err(|_| "is too large")?;
    Ok(Duration::from_nanos(nanos))
}

fn deserialize_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text)
        .map_err(|reason| de::Error::custom(format!("invalid duration {text:?}: {reason}")))
}

fn deserialize_optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(deserializer).map(Some)
}

/// `""` means the table has no such column.
fn deserialize_optional_column<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(deserializer)?;
    Ok(Some(name).filter(|name| !name.is_empty()))
}

/// A `[kafka.properties]` value: a scalar kept in its string form, or a nested table from a bare
/// dotted key.
enum PropertyNode {
    Leaf(String),
    Table(BTreeMap<String, PropertyNode>),
}

impl<'de> Deserialize<'de> for PropertyNode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = PropertyNode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PropertyNode, A::Error> {
                let mut table = BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, PropertyNode>()? {
                    table.insert(key, value);
                }
                Ok(PropertyNode::Table(table))
            }
        }
        deserializer.deserialize_any(NodeVisitor)
    }
}

fn deserialize_properties<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    fn flatten(
        prefix: &str,
        table: BTreeMap<String, PropertyNode>,
        out: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        for (key, node) in table {
            let key = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            match node {
                PropertyNode::Leaf(value) => {
                    if out.insert(key.clone(), value).is_some() {
                        return Err(format!("kafka.properties.{key} is set twice"));
                    }
                }
                PropertyNode::Table(table) => flatten(&key, table, out)?,
            }
        }
        Ok(())
    }
    let tree = BTreeMap::<String, PropertyNode>::deserialize(deserializer)?;
    let mut out = BTreeMap::new();
    flatten("", tree, &mut out).map_err(de::Error::custom)?;
    Ok(out)
}

/// The type of a config key, as far as the file check and the environment need to know it.
enum Kind {
    Str,
    Bool,
    Int { min: i64, max: i64 },
    Duration,
    Choice(&'static [&'static str]),
    Addr,
    Columns,
    Properties,
}

/// The config's keys, section by section; [`Config`] and its parts are the same shape.
const SCHEMA: &[(&str, &[(&str, Kind)])] = &[
    ("postgres", &[("url", Kind::Str)]),
    (
        "source",
        &[
            ("mode", Kind::Choice(&["logical", "polling"])),
            ("table", Kind::Str),
            ("slot", Kind::Str),
            ("publication", Kind::Str),
            ("create", Kind::Bool),
            ("message_prefix", Kind::Str),
            ("poll_interval", Kind::Duration),
            (
                "batch_size",
                Kind::Int {
                    min: 1,
                    max: MAX_BATCH_SIZE as i64,
                },
            ),
            ("on_invalid", Kind::Choice(&["dead-letter", "halt"])),
            ("retention", Kind::Duration),
            ("columns", Kind::Columns),
        ],
    ),
    (
        "kafka",
        &[
            ("brokers", Kind::Str),
            ("topic", Kind::Str),
            ("dead_letter_topic", Kind::Str),
            ("create_topics", Kind::Bool),
            (
                "topic_partitions",
                Kind::Int {
                    min: 1,
                    max: i32::MAX as i64,
                },
            ),
            ("properties", Kind::Properties),
        ],
    ),
    ("http", &[("listen", Kind::Addr)]),
    (
        "log",
        &[
            ("format", Kind::Choice(&["text", "json"])),
            ("level", Kind::Str),
        ],
    ),
];

const COLUMN_KEYS: &[&str] = &[
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "created_at",
    "seq",
    "txid",
];

/// Parses TOML into a table. The message carries a line and column but not the offending line,
/// which could hold a password.
fn parse_toml(text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|err| {
        let message = err.message().trim();
        let message = match err.span() {
            Some(span) => {
                let mut start = span.start.min(text.len());
                while !text.is_char_boundary(start) {
                    start -= 1;
                }
                let before = &text[..start];
                let line = before.matches('\n').count() + 1;
                let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
                format!("line {line}, column {column}: {message}")
            }
            None => message.to_owned(),
        };
        ConfigError::Parse { message }
    })
}

fn unknown_key(field: &str, known: impl Iterator<Item = &'static str>) -> ConfigError {
    let known: Vec<_> = known.collect();
    ConfigError::Parse {
        message: format!(
            "unknown key `{field}` (expected one of: {})",
            known.join(", ")
        ),
    }
}

/// Rejects unknown keys and values of the wrong type, naming the key; flattens
/// `[kafka.properties]` into dotted keys with string values so the environment can override
/// them one by one.
fn check_and_normalize(root: &mut Table) -> Result<(), ConfigError> {
    for (section_name, section) in root.iter_mut() {
        let Some((_, keys)) = SCHEMA.iter().find(|(name, _)| name == section_name) else {
            return Err(unknown_key(
                section_name,
                SCHEMA.iter().map(|(name, _)| *name),
            ));
        };
        let Value::Table(section) = section else {
            return Err(invalid(
                section_name.as_str(),
                format!("must be a table ([{section_name}])"),
            ));
        };
        for (key, value) in section.iter_mut() {
            let field = format!("{section_name}.{key}");
            let Some((_, kind)) = keys.iter().find(|(name, _)| name == key) else {
                return Err(unknown_key(&field, keys.iter().map(|(name, _)| *name)));
            };
            check_value(&field, kind, value)?;
        }
    }
    Ok(())
}

fn check_value(field: &str, kind: &Kind, value: &mut Value) -> Result<(), ConfigError> {
    match (kind, &*value) {
        (Kind::Str, Value::String(_)) | (Kind::Bool, Value::Boolean(_)) => Ok(()),
        (Kind::Str, _) => Err(invalid(field, "must be a string")),
        (Kind::Bool, _) => Err(invalid(field, "must be true or false")),
        (Kind::Int { min, max }, Value::Integer(n)) if (*min..=*max).contains(n) => Ok(()),
        (Kind::Int { min, max }, Value::Integer(_)) => {
            Err(invalid(field, format!("must be between {min} and {max}")))
        }
        (Kind::Int { .. }, _) => Err(invalid(field, "must be an integer")),
        (Kind::Duration, Value::String(text)) => parse_duration(text).map(|_| ()).map_err(|why| {
            invalid(
                field,
                format!(
                    "must be a duration like \"200ms\", \"1.5s\", \"2m\" or \"1h\"; {text:?} {why}"
                ),
            )
        }),
        (Kind::Duration, _) => Err(invalid(
            field,
            "must be a duration string like \"200ms\", \"1.5s\", \"2m\" or \"1h\"",
        )),
        (Kind::Choice(choices), Value::String(text)) if choices.contains(&text.as_str()) => Ok(()),
        (Kind::Choice(choices), _) => Err(invalid(
            field,
            format!("must be one of \"{}\"", choices.join("\", \"")),
        )),
        (Kind::Addr, Value::String(text)) if text.parse::<SocketAddr>().is_ok() => Ok(()),
        (Kind::Addr, _) => Err(invalid(
            field,
            "must be an IP address and port like \"0.0.0.0:9187\"",
        )),
        (Kind::Columns, Value::Table(columns)) => {
            for (key, name) in columns {
                let column_field = format!("{field}.{key}");
                if !COLUMN_KEYS.contains(&key.as_str()) {
                    return Err(unknown_key(&column_field, COLUMN_KEYS.iter().copied()));
                }
                if !name.is_str() {
                    return Err(invalid(column_field, "must be a string (a column name)"));
                }
            }
            Ok(())
        }
        (Kind::Properties, Value::Table(properties)) => {
            let mut flat = Table::new();
            flatten_properties(field, properties, &mut flat)?;
            *value = Value::Table(flat);
            Ok(())
        }
        (Kind::Columns | Kind::Properties, _) => {
            Err(invalid(field, format!("must be a table ([{field}])")))
        }
    }
}

fn flatten_properties(prefix: &str, table: &Table, out: &mut Table) -> Result<(), ConfigError> {
    for (key, value) in table {
        let field = format!("{prefix}.{key}");
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Integer(n) => n.to_string(),
            Value::Float(x) => x.to_string(),
            Value::Boolean(b) => b.to_string(),
            Value::Table(nested) => {
                flatten_properties(&field, nested, out)?;
                continue;
            }
            Value::Array(_) | Value::Datetime(_) => {
                return Err(invalid(field, "must be a string, number or boolean"));
            }
        };
        let name = field
            .strip_prefix("kafka.properties.")
            .unwrap_or(&field)
            .to_owned();
        if out.insert(name, Value::String(text)).is_some() {
            return Err(invalid(field, "is set twice"));
        }
    }
    Ok(())
}

/// Where an environment variable goes: the key path in the table, and the key's type.
fn env_target(var: &str) -> Option<(Vec<String>, &'static Kind)> {
    let rest = var.strip_prefix(ENV_PREFIX)?;
    if let Some(property) = rest.strip_prefix("KAFKA_PROPERTIES_") {
        if property.is_empty() {
            return None;
        }
        // Environment names cannot contain '.', and librdkafka names use it where we get '_'.
        let key = property.to_ascii_lowercase().replace('_', ".");
        return Some((vec!["kafka".into(), "properties".into(), key], &Kind::Str));
    }
    if let Some(column) = rest.strip_prefix("SOURCE_COLUMNS_") {
        let key = COLUMN_KEYS
            .iter()
            .find(|key| key.to_ascii_uppercase() == column)?;
        return Some((
            vec!["source".into(), "columns".into(), (*key).into()],
            &Kind::Str,
        ));
    }
    SCHEMA.iter().find_map(|(section, keys)| {
        keys.iter()
            .filter(|(_, kind)| !matches!(kind, Kind::Columns | Kind::Properties))
            .find(|(key, _)| {
                rest.strip_prefix(&section.to_ascii_uppercase())
                    .and_then(|r| r.strip_prefix('_'))
                    .is_some_and(|r| r == key.to_ascii_uppercase())
            })
            .map(|(key, kind)| (vec![(*section).into(), (*key).into()], kind))
    })
}

/// Kubernetes injects `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT_...` for every Service in the
/// namespace; a Service named `outbox-relay` makes them `OUTBOX_RELAY_SERVICE_*` and
/// `OUTBOX_RELAY_PORT*`. No config section is called `service` or `port`, so they are skipped
/// instead of failing the start.
fn is_kubernetes_service_link(name: &str) -> bool {
    let rest = &name[ENV_PREFIX.len().min(name.len())..];
    rest.starts_with("SERVICE_") || rest == "PORT" || rest.starts_with("PORT_")
}

/// Applies the `OUTBOX_RELAY_*` overrides; returns which variable set which field, so later
/// errors can name it.
fn apply_env(
    root: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut vars: Vec<_> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .filter(|(name, _)| name != CONFIG_PATH_ENV && name != LOG_FILTER_ENV)
        .filter(|(name, _)| !is_kubernetes_service_link(name))
        .collect();
    // Sorted so that the outcome never depends on the environment's order.
    vars.sort();
    let mut origins = BTreeMap::new();
    for (var, text) in vars {
        let Some((path, kind)) = env_target(&var) else {
            return Err(ConfigError::UnknownEnv { var });
        };
        let field = path.join(".");
        let value = match kind {
            Kind::Bool => match text.trim().to_ascii_lowercase().as_str() {
                "true" => Value::Boolean(true),
                "false" => Value::Boolean(false),
                _ => {
                    return Err(invalid(
                        field,
                        format!("must be true or false (set by {var})"),
                    ))
                }
            },
            Kind::Int { .. } => match text.trim().parse::<i64>() {
                Ok(n) => Value::Integer(n),
                Err(_) => return Err(invalid(field, format!("must be an integer (set by {var})"))),
            },
            // Everything else is a string in the file too; in particular a password of "1234"
            // stays a string.
            _ => Value::String(text),
        };
        set_path(root, &path, value);
        origins.insert(field, var);
    }
    Ok(origins)
}

fn set_path(table: &mut Table, path: &[String], value: Value) {
    match path {
        [] => {}
        [key] => {
            table.insert(key.clone(), value);
        }
        [head, rest @ ..] => {
            let mut child = match table.remove(head) {
                Some(Value::Table(child)) => child,
                _ => Table::new(),
            };
            set_path(&mut child, rest, value);
            table.insert(head.clone(), Value::Table(child));
        }
    }
}

/// Adds the variable's name to an error about a field the environment set.
fn blame_env(err: ConfigError, origins: &BTreeMap<String, String>) -> ConfigError {
    match err {
        ConfigError::Invalid { field, reason } => match origins.get(&field) {
            Some(var) => ConfigError::Invalid {
                reason: format!("{reason} (set by {var})"),
                field,
            },
            None => ConfigError::Invalid { field, reason },
        },
        other => other,
    }
}

const POSTGRES_URL_FIELD: &str = "postgres.url";

/// The libpq TLS parameters the relay takes out of `postgres.url` before tokio_postgres sees it.
const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Parses `postgres.url` into tokio_postgres settings and the TLS settings.
fn parse_postgres_url(url: &str) -> Result<(tokio_postgres::Config, PostgresTls), ConfigError> {
    let (rest, params) = split_tls_params(url).unwrap_or_else(|| (url.to_owned(), Vec::new()));
    let mut config = rest
        .parse::<tokio_postgres::Config>()
        .map_err(|_| invalid(POSTGRES_URL_FIELD, url_error_reason(url)))?;
    if config.get_hosts().is_empty() {
        return Err(invalid(POSTGRES_URL_FIELD, "must name a host"));
    }
    if config.get_user().is_none() {
        return Err(invalid(POSTGRES_URL_FIELD, "must name a user"));
    }
    let unix_only = config
        .get_hosts()
        .iter()
        .all(|host| !matches!(host, tokio_postgres::config::Host::Tcp(_)));
    let tls = tls_settings(&params, unix_only)?;
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    Ok((config, tls))
}

/// The TLS settings from the parameters [`split_tls_params`] took out (later ones win, as in
/// libpq; an empty value is no value).
fn tls_settings(params: &[(&str, String)], unix_only: bool) -> Result<PostgresTls, ConfigError> {
    let value = |key: &str| {
        params
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let mode = match value("sslmode") {
        None => None,
        Some("disable") => Some(SslMode::Disable),
        Some("allow" | "prefer") => Some(SslMode::Prefer),
        Some("require") => Some(SslMode::Require),
        Some("verify-ca") => Some(SslMode::VerifyCa),
        Some("verify-full") => Some(SslMode::VerifyFull),
        Some(other) => {
            return Err(invalid(
                POSTGRES_URL_FIELD,
                format!(
                    "must be a postgres:// URL or a libpq key=value string; sslmode {other:?} \
                     is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            ))
        }
    };
    let system_roots = value("sslrootcert") == Some("system");
    let root_cert = value("sslrootcert")
        .filter(|_| !system_roots)
        .map(PathBuf::from);
    let mut mode = match (mode, system_roots) {
        // libpq: sslrootcert=system asks for verify-full, and refuses weaker modes.
        (None, true) => SslMode::VerifyFull,
        (Some(mode), true) if mode != SslMode::VerifyFull && mode != SslMode::Disable => {
            return Err(invalid(
                POSTGRES_URL_FIELD,
                format!(
                    "must not combine sslrootcert=system with sslmode={} (use verify-full)",
                    mode.as_str()
                ),
            ))
        }
        (mode, _) => mode.unwrap_or_default(),
    };
    // libpq: "if a root CA file exists, sslmode=require behaves like verify-ca".
    if mode == SslMode::Require && root_cert.is_some() {
        mode = SslMode::VerifyCa;
    }
    if unix_only {
        mode = SslMode::Disable;
    }
    let client_cert = match (value("sslcert"), value("sslkey")) {
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                POSTGRES_URL_FIELD,
                "sets sslcert without sslkey: a client certificate needs both",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                POSTGRES_URL_FIELD,
                "sets sslkey without sslcert: a client certificate needs both",
            ))
        }
    };
    Ok(PostgresTls {
        mode,
        root_cert,
        client_cert,
    })
}

/// Takes the [`TLS_PARAMS`] out of a connection string: the rest, and the `(key, value)` pairs
/// taken (decoded), in order. `None` if a `key=value` string cannot be tokenised; tokio_postgres
/// then gets the whole string and says what is wrong.
fn split_tls_params(url: &str) -> Option<(String, Vec<(&'static str, String)>)> {
    let tls_param = |key: &[u8]| TLS_PARAMS.into_iter().find(|p| p.as_bytes() == key);
    let mut taken = Vec::new();
    let Some(query) = url_query_start(url) else {
        let mut rest = String::with_capacity(url.len());
        let mut last = 0;
        for (key, value) in keyword_pairs(url)? {
            if let Some(param) = tls_param(url[key.clone()].as_bytes()) {
                taken.push((param, keyword_value(&url[value.clone()])));
                rest.push_str(&url[last..key.start]);
                last = value.end;
            }
        }
        rest.push_str(&url[last..]);
        return Some((rest, taken));
    };
    let Some(query) = query else {
        return Some((url.to_owned(), taken));
    };
    let mut kept = Vec::new();
    for param in url[query..].split('&') {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match tls_param(&percent_decode(key)) {
            Some(name) => taken.push((
                name,
                String::from_utf8_lossy(&percent_decode(value)).into_owned(),
            )),
            None => kept.push(param),
        }
    }
    let mut rest = url[..query - 1].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Some((rest, taken))
}

/// For a `postgres://` URL, `Some` of where its query starts (after the `?`), if it has one;
/// `None` for a `key=value` string. Found the way [`password_spans`] reads URLs.
fn url_query_start(url: &str) -> Option<Option<usize>> {
    let prefix = ["postgres://", "postgresql://"]
        .iter()
        .find(|prefix| url.starts_with(*prefix))?;
    let start = prefix.len();
    let after_credentials = url[start..].find('@').map_or(start, |at| start + at + 1);
    Some(
        url[after_credentials..]
            .find('?')
            .map(|question| after_credentials + question + 1),
    )
}

/// A `key=value` string's value as tokio_postgres reads it: quotes removed, `\\x` is `x`.
fn keyword_value(raw: &str) -> String {
    let inner = raw
        .strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .unwrap_or(raw);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// Why `url` does not parse, without the password: the parser's complaint about the redacted
/// string, unless even that could echo part of the secret.
fn url_error_reason(url: &str) -> String {
    const BASE: &str = "must be a postgres:// URL or a libpq key=value string";
    let (Some(redacted), Some(secrets)) = (redact_connection_string(url), password_spans(url))
    else {
        return format!("{BASE}; check its quoting (a value with spaces goes in single quotes)");
    };
    // The TLS parameters are the relay's to read: without them the parser sees what it would.
    let redacted = split_tls_params(&redacted).map_or(redacted, |(rest, _)| rest);
    let Err(err) = redacted.parse::<tokio_postgres::Config>() else {
        // The redacted form parses, so the problem is inside the password itself.
        return format!("{BASE}; check the escaping of the password");
    };
    let mut detail = String::new();
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&err);
    while let Some(err) = cause {
        detail = format!("{detail}: {err}");
        cause = err.source();
    }
    let leaks = secrets
        .iter()
        .any(|span| detail.contains(&url[span.clone()]));
    if detail.is_empty() || leaks {
        BASE.to_owned()
    } else {
        format!("{BASE}{detail}")
    }
}

/// `url` with every password replaced by `***`, or `None` if it cannot be tokenised safely.
fn redact_connection_string(url: &str) -> Option<String> {
    let spans = password_spans(url)?;
    let mut out = String::with_capacity(url.len());
    let mut last = 0;
    for span in spans {
        out.push_str(&url[last..span.start]);
        out.push_str("***");
        last = span.end;
    }
    out.push_str(&url[last..]);
    Some(out)
}

/// Byte ranges of password values in a connection string, found the way `tokio_postgres` finds
/// them: the text between the first ':' and the first '@' of a URL, `password=` URL query
/// parameters, and `password` in `key=value` strings. `None` if a `key=value` string cannot be
/// tokenised (an unterminated quote, say), in which case nothing of it is safe to show.
fn password_spans(url: &str) -> Option<Vec<std::ops::Range<usize>>> {
    let prefix = ["postgres://", "postgresql://"]
        .iter()
        .find(|prefix| url.starts_with(*prefix));
    let Some(prefix) = prefix else {
        return keyword_password_spans(url);
    };
    let mut spans = Vec::new();
    let start = prefix.len();
    let rest = &url[start..];
    let after_credentials = match rest.find('@') {
        Some(at) => {
            if let Some(colon) = rest[..at].find(':') {
                spans.push(start + colon + 1..start + at);
            }
            start + at + 1
        }
        None => start,
    };
    if let Some(question) = url[after_credentials..].find('?') {
        let mut position = after_credentials + question + 1;
        for param in url[position..].split('&') {
            if let Some((key, _)) = param.split_once('=') {
                if percent_decode(key) == b"password" {
                    spans.push(position + key.len() + 1..position + param.len());
                }
            }
            position += param.len() + 1;
        }
    }
    Some(spans)
}

/// `password` values of a libpq `key = value` string.
fn keyword_password_spans(text: &str) -> Option<Vec<std::ops::Range<usize>>> {
    Some(
        keyword_pairs(text)?
            .into_iter()
            .filter(|(key, _)| &text[key.clone()] == "password")
            .map(|(_, value)| value)
            .collect(),
    )
}

/// `(key, raw value)` byte ranges.
type KeywordPairs = Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>;

/// The `(key, raw value)` byte ranges of a libpq `key = value` string, following
/// `tokio_postgres`'s tokeniser (Unicode whitespace separates, `\\` escapes the next character,
/// `'...'` quotes). `None` if it cannot be tokenised (an unterminated quote, a missing `=`).
fn keyword_pairs(text: &str) -> Option<KeywordPairs> {
    let mut chars = text.char_indices().peekable();
    let mut pairs = Vec::new();
    loop {
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        let key_start = chars.peek().map_or(text.len(), |&(i, _)| i);
        while chars
            .next_if(|&(_, c)| !c.is_whitespace() && c != '=')
            .is_some()
        {}
        let key_end = chars.peek().map_or(text.len(), |&(i, _)| i);
        if key_start == key_end {
            // tokio_postgres stops at the first empty keyword, too.
            return Some(pairs);
        }
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        chars.next_if(|&(_, c)| c == '=')?;
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        let value_start = chars.peek().map_or(text.len(), |&(i, _)| i);
        if chars.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match chars.next()? {
                    (_, '\\') => {
                        chars.next();
                    }
                    (_, '\'') => break,
                    _ => {}
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|&(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    chars.next();
                }
            }
        }
        let value_end = chars.peek().map_or(text.len(), |&(i, _)| i);
        pairs.push((key_start..key_end, value_start..value_end));
    }
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn kubernetes_service_links_are_not_config() {
        let env = [
            ("OUTBOX_RELAY_SERVICE_HOST", "10.0.0.1"),
            ("OUTBOX_RELAY_SERVICE_PORT_HTTP", "9187"),
            ("OUTBOX_RELAY_PORT", "tcp://10.0.0.1:9187"),
            ("OUTBOX_RELAY_PORT_9187_TCP_ADDR", "10.0.0.1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert!(Config::from_parts(None, env).is_ok());
        let typo = [("OUTBOX_RELAY_KAFKA_BROKER".to_owned(), "x".to_owned())];
        assert!(matches!(
            Config::from_parts(None, typo),
            Err(ConfigError::UnknownEnv { .. })
        ));
    }

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_parts(Some(text), env(vars))
    }

    fn load_err(text: &str, vars: &[(&str, &str)]) -> String {
        match load(text, vars) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(err) => err.to_string(),
        }
    }

    fn validate_err(change: impl FnOnce(&mut Config)) -> String {
        let mut config = Config::default();
        change(&mut config);
        match config.validate() {
            Ok(()) => panic!("expected a validation error for {config:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn empty_file_gives_the_spec_defaults() {
        let config = load("", &[]).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(Config::from_parts(None, Vec::new()).unwrap(), config);
        // Literal SPEC §5 values, so a changed constant fails here.
        assert_eq!(
            config.postgres.url.expose(),
            "postgres://outbox_relay@127.0.0.1:5432/app"
        );
        let s = &config.source;
        assert_eq!(s.mode, SourceMode::Logical);
        assert_eq!(s.table, "outbox.events");
        assert_eq!(s.slot, "outbox_relay");
        assert_eq!(s.publication, "outbox_relay");
        assert!(s.create);
        assert_eq!(s.message_prefix, "outbox");
        assert_eq!(s.poll_interval, Duration::from_millis(200));
        assert_eq!(s.batch_size, 1000);
        assert_eq!(s.on_invalid, OnInvalid::DeadLetter);
        let c = &s.columns;
        assert_eq!(
            [
                &c.id,
                &c.aggregate_type,
                &c.aggregate_id,
                &c.event_type,
                &c.payload
            ],
            [
                "id",
                "aggregate_type",
                "aggregate_id",
                "event_type",
                "payload"
            ]
        );
        assert_eq!(c.headers.as_deref(), Some("headers"));
        assert_eq!(c.created_at.as_deref(), Some("created_at"));
        assert_eq!(c.seq.as_deref(), Some("seq"));
        assert_eq!(c.txid.as_deref(), Some("txid"));
        let k = &config.kafka;
        assert_eq!(k.brokers, "127.0.0.1:9092");
        assert_eq!(k.topic, "outbox.event.{aggregate_type}");
        assert_eq!(k.dead_letter_topic, "outbox.dead-letter");
        assert!(k.create_topics);
        assert_eq!(k.topic_partitions, 3);
        assert!(k.properties.is_empty());
        assert_eq!(config.http.listen.to_string(), "0.0.0.0:9187");
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(config.log.level, "info");
        assert!(config.validate().is_ok());
    }

    #[test]
    fn example_parses_to_the_defaults() {
        let config = load(EXAMPLE, &[]).unwrap();
        let mut expected = Config::default();
        expected
            .kafka
            .properties
            .insert("compression.type".into(), "lz4".into());
        assert_eq!(config, expected);
    }

    const FULL: &str = r#"
[postgres]
url = "host=db.internal port=6432 user=relay password='p@ss word' dbname=shop sslmode=require"

[source]
mode = "polling"
table = "shop.outbox"
slot = "shop_slot"
publication = "shop_pub"
create = false
message_prefix = "shop"
poll_interval = "1.5s"
batch_size = 500
on_invalid = "halt"

[source.columns]
id = "event_id"
aggregate_type = "agg_type"
aggregate_id = "agg_id"
event_type = "kind"
payload = "body"
headers = "meta"
created_at = "ts"
seq = "position"
txid = "xact"

[kafka]
brokers = "k1:9092,k2:9092"
topic = "shop.{aggregate_type}.{event_type}"
dead_letter_topic = "shop.dlq"
create_topics = false
topic_partitions = 12

[kafka.properties]
"security.protocol" = "SASL_SSL"
"linger.ms" = 5
"batch.num.messages" = 10000
"enable.ssl.certificate.verification" = false
"queue.buffering.backpressure.threshold" = 1.5
sasl.username = "relay"

[http]
listen = "127.0.0.1:8080"

[log]
format = "json"
level = "info,outbox_relay=debug"
"#;

    #[test]
    fn a_full_file_sets_every_field() {
        let config = load(FULL, &[]).unwrap();
        assert_eq!(
            config.postgres.url.expose(),
            "host=db.internal port=6432 user=relay password='p@ss word' dbname=shop sslmode=require"
        );
        let pg = config.postgres_config().unwrap();
        assert_eq!(pg.get_password(), Some(&b"p@ss word"[..]));
        assert_eq!(pg.get_user(), Some("relay"));
        let expected_source = SourceConfig {
            mode: SourceMode::Polling,
            table: "shop.outbox".into(),
            slot: "shop_slot".into(),
            publication: "shop_pub".into(),
            create: false,
            message_prefix: "shop".into(),
            poll_interval: Duration::from_millis(1500),
            batch_size: 500,
            on_invalid: OnInvalid::Halt,
            // Polling-only and checked against the mode: see the retention test.
            retention: None,
            columns: Columns {
                id: "event_id".into(),
                aggregate_type: "agg_type".into(),
                aggregate_id: "agg_id".into(),
                event_type: "kind".into(),
                payload: "body".into(),
                headers: Some("meta".into()),
                created_at: Some("ts".into()),
                seq: Some("position".into()),
                txid: Some("xact".into()),
            },
        };
        assert_eq!(config.source, expected_source);
        assert_eq!(config.source.table_parts(), ("shop", "outbox"));
        let k = &config.kafka;
        assert_eq!(k.brokers, "k1:9092,k2:9092");
        assert_eq!(k.topic, "shop.{aggregate_type}.{event_type}");
        assert_eq!(k.dead_letter_topic, "shop.dlq");
        assert!(!k.create_topics);
        assert_eq!(k.topic_partitions, 12);
        let properties: Vec<(&str, &str)> = k
            .properties
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            properties,
            [
                ("batch.num.messages", "10000"),
                ("enable.ssl.certificate.verification", "false"),
                ("linger.ms", "5"),
                ("queue.buffering.backpressure.threshold", "1.5"),
                ("sasl.username", "relay"),
                ("security.protocol", "SASL_SSL"),
            ]
        );
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.log.level, "info,outbox_relay=debug");
    }

    #[test]
    fn serde_alone_agrees_with_the_loader() {
        // Other code (or a future refactor) may deserialise directly; the result must match.
        let direct: Config = toml::from_str(FULL).unwrap();
        assert_eq!(direct, load(FULL, &[]).unwrap());
        let typo = toml::from_str::<Config>("[source]\nbatch_sise = 1");
        assert!(typo.is_err());
    }

    #[test]
    fn unknown_keys_in_the_file_are_rejected_by_name() {
        let err = load_err("[source]\nbatch_sise = 10\n", &[]);
        assert!(err.contains("source.batch_sise"), "{err}");
        assert!(err.contains("batch_size"), "lists the known keys: {err}");
        let err = load_err("[kafak]\nbrokers = \"x\"\n", &[]);
        assert!(err.contains("`kafak`"), "{err}");
        let err = load_err("[source.columns]\naggregatetype = \"x\"\n", &[]);
        assert!(err.contains("source.columns.aggregatetype"), "{err}");
        let err = load_err("url = \"postgres://x\"\n", &[]);
        assert!(err.contains("`url`"), "{err}");
        let err = load_err("postgres = 5\n", &[]);
        assert_eq!(err, "postgres must be a table ([postgres])");
    }

    #[test]
    fn values_of_the_wrong_type_name_the_field() {
        let cases = [
            (
                "[source]\nbatch_size = \"10\"",
                "source.batch_size must be an integer",
            ),
            (
                "[source]\nbatch_size = 0",
                "source.batch_size must be between 1 and 1000000",
            ),
            (
                "[source]\ncreate = \"yes\"",
                "source.create must be true or false",
            ),
            (
                "[source]\nmode = \"logica\"",
                "source.mode must be one of \"logical\", \"polling\"",
            ),
            (
                "[source]\non_invalid = \"dead_letter\"",
                "source.on_invalid must be one of",
            ),
            (
                "[source]\npoll_interval = 200",
                "source.poll_interval must be a duration",
            ),
            (
                "[source]\npoll_interval = \"fast\"",
                "source.poll_interval must be a duration",
            ),
            ("[postgres]\nurl = 5", "postgres.url must be a string"),
            (
                "[http]\nlisten = \"localhost\"",
                "http.listen must be an IP address",
            ),
            (
                "[log]\nformat = \"xml\"",
                "log.format must be one of \"text\", \"json\"",
            ),
            (
                "[kafka]\ntopic_partitions = 3000000000",
                "kafka.topic_partitions must be between",
            ),
            (
                "[kafka.properties]\n\"a.b\" = [1]",
                "kafka.properties.a.b must be a string",
            ),
            (
                "[source.columns]\nseq = 1",
                "source.columns.seq must be a string",
            ),
        ];
        for (text, expected) in cases {
            let err = load_err(text, &[]);
            assert!(err.starts_with(expected), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn toml_syntax_errors_give_the_position_but_not_the_line() {
        let text = "[postgres]\nurl = \"postgres://relay:hunter2@db/app\n";
        let err = load(text, &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        let err = err.to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn unknown_environment_variables_are_rejected_by_name() {
        for var in [
            "OUTBOX_RELAY_KAFKA_BROKER",
            "OUTBOX_RELAY_SOURCE_COLUMNS_AGGREGATETYPE",
            "OUTBOX_RELAY_KAFKA_PROPERTIES_",
            "OUTBOX_RELAY_POSTGRES",
            "OUTBOX_RELAY_SOURCE_COLUMNS",
            "OUTBOX_RELAY_",
        ] {
            let err = load("", &[(var, "x")]).unwrap_err();
            assert!(
                matches!(&err, ConfigError::UnknownEnv { var: v } if v == var),
                "{var}: {err:?}"
            );
            assert!(err.to_string().contains(var));
        }
        // Not overrides, and not ours: ignored.
        let config = load(
            "",
            &[
                ("OUTBOX_RELAY_CONFIG", "/etc/relay.toml"),
                ("OUTBOX_RELAY_LOG", "debug"),
                ("PATH", "/bin"),
                ("outbox_relay_kafka_broker", "x"),
            ],
        )
        .unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn environment_overrides_win_over_the_file() {
        let config = load(
            FULL,
            &[
                ("OUTBOX_RELAY_POSTGRES_URL", "postgres://env@envhost/envdb"),
                ("OUTBOX_RELAY_KAFKA_BROKERS", "env:9092"),
                ("OUTBOX_RELAY_SOURCE_CREATE", "true"),
                ("OUTBOX_RELAY_KAFKA_CREATE_TOPICS", "TRUE"),
                ("OUTBOX_RELAY_SOURCE_BATCH_SIZE", "42"),
                ("OUTBOX_RELAY_KAFKA_TOPIC_PARTITIONS", " 7 "),
                ("OUTBOX_RELAY_SOURCE_POLL_INTERVAL", "2m"),
                ("OUTBOX_RELAY_SOURCE_ON_INVALID", "dead-letter"),
                ("OUTBOX_RELAY_SOURCE_MODE", "logical"),
                ("OUTBOX_RELAY_SOURCE_COLUMNS_PAYLOAD", "data"),
                ("OUTBOX_RELAY_SOURCE_COLUMNS_HEADERS", ""),
                ("OUTBOX_RELAY_KAFKA_PROPERTIES_LINGER_MS", "20"),
                ("OUTBOX_RELAY_KAFKA_PROPERTIES_SASL_USERNAME", "env-user"),
                ("OUTBOX_RELAY_HTTP_LISTEN", "[::1]:9000"),
                ("OUTBOX_RELAY_LOG_FORMAT", "text"),
                ("OUTBOX_RELAY_LOG_LEVEL", "warn"),
            ],
        )
        .unwrap();
        assert_eq!(config.postgres.url.expose(), "postgres://env@envhost/envdb");
        assert_eq!(config.kafka.brokers, "env:9092");
        assert!(config.source.create);
        assert!(config.kafka.create_topics);
        assert_eq!(config.source.batch_size, 42);
        assert_eq!(config.kafka.topic_partitions, 7);
        assert_eq!(config.source.poll_interval, Duration::from_secs(120));
        assert_eq!(config.source.on_invalid, OnInvalid::DeadLetter);
        assert_eq!(config.source.mode, SourceMode::Logical);
        assert_eq!(config.source.columns.payload, "data");
        assert_eq!(config.source.columns.headers, None);
        assert_eq!(config.source.columns.id, "event_id", "file value kept");
        assert_eq!(config.kafka.properties["linger.ms"], "20");
        // A bare dotted key in the file is overridden too, not duplicated.
        assert_eq!(config.kafka.properties["sasl.username"], "env-user");
        assert_eq!(config.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(config.http.listen.to_string(), "[::1]:9000");
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(config.log.level, "warn");
    }

    #[test]
    fn numeric_looking_secrets_from_the_environment_stay_strings() {
        let config = load(
            "",
            &[
                ("OUTBOX_RELAY_KAFKA_PROPERTIES_SASL_PASSWORD", "1234"),
                ("OUTBOX_RELAY_KAFKA_PROPERTIES_SSL_KEY_PASSWORD", "007"),
                ("OUTBOX_RELAY_LOG_LEVEL", "true"),
            ],
        )
        .unwrap();
        assert_eq!(config.kafka.properties["sasl.password"], "1234");
        assert_eq!(config.kafka.properties["ssl.key.password"], "007");
        assert_eq!(config.log.level, "true");
    }

    #[test]
    fn badly_typed_environment_values_name_field_and_variable() {
        let err = load_err("", &[("OUTBOX_RELAY_SOURCE_CREATE", "yes")]);
        assert_eq!(
            err,
            "source.create must be true or false (set by OUTBOX_RELAY_SOURCE_CREATE)"
        );
        let err = load_err("", &[("OUTBOX_RELAY_SOURCE_BATCH_SIZE", "1k")]);
        assert_eq!(
            err,
            "source.batch_size must be an integer (set by OUTBOX_RELAY_SOURCE_BATCH_SIZE)"
        );
        let err = load_err("", &[("OUTBOX_RELAY_SOURCE_POLL_INTERVAL", "200")]);
        assert!(
            err.starts_with("source.poll_interval must be a duration"),
            "{err}"
        );
        assert!(
            err.ends_with("(set by OUTBOX_RELAY_SOURCE_POLL_INTERVAL)"),
            "{err}"
        );
        let err = load_err("", &[("OUTBOX_RELAY_SOURCE_BATCH_SIZE", "0")]);
        assert!(
            err.ends_with("(set by OUTBOX_RELAY_SOURCE_BATCH_SIZE)"),
            "{err}"
        );
        // A validation failure of an environment value names the variable too.
        let err = load_err("", &[("OUTBOX_RELAY_SOURCE_SLOT", "Bad-Slot")]);
        assert!(err.starts_with("source.slot must be"), "{err}");
        assert!(err.ends_with("(set by OUTBOX_RELAY_SOURCE_SLOT)"), "{err}");
    }

    #[test]
    fn debezium_shaped_table() {
        let text = r#"
[source]
table = "public.outbox"
[source.columns]
aggregate_type = "aggregatetype"
aggregate_id = "aggregateid"
event_type = "type"
headers = ""
created_at = ""
"#;
        let config = load(text, &[]).unwrap();
        let columns = &config.source.columns;
        assert_eq!(columns.id, "id");
        assert_eq!(columns.aggregate_type, "aggregatetype");
        assert_eq!(columns.aggregate_id, "aggregateid");
        assert_eq!(columns.event_type, "type");
        assert_eq!(columns.payload, "payload");
        assert_eq!(columns.headers, None);
        assert_eq!(columns.created_at, None);
        assert_eq!(columns.seq.as_deref(), Some("seq"));
        assert_eq!(config.source.table_parts(), ("public", "outbox"));
    }

    #[test]
    fn logical_mode_needs_no_polling_columns_but_polling_does() {
        let text = "[source.columns]\nseq = \"\"\ntxid = \"\"\n";
        let config = load(text, &[]).unwrap();
        assert_eq!(config.source.columns.seq, None);
        let err = load_err(text, &[("OUTBOX_RELAY_SOURCE_MODE", "polling")]);
        assert_eq!(
            err,
            "source.columns.seq is required when source.mode = \"polling\""
        );
        let err = validate_err(|c| {
            c.source.mode = SourceMode::Polling;
            c.source.columns.txid = None;
        });
        assert_eq!(
            err,
            "source.columns.txid is required when source.mode = \"polling\""
        );
        let err = validate_err(|c| c.source.columns.payload.clear());
        assert!(err.starts_with("source.columns.payload must be"), "{err}");
        let err = validate_err(|c| c.source.columns.headers = Some(String::new()));
        assert!(err.starts_with("source.columns.headers must be"), "{err}");
    }

    #[test]
    fn retention_is_off_by_default_and_polling_only() {
        assert_eq!(Config::default().source.retention, None);
        let polling = "[source]\nmode = \"polling\"\nretention = \"24h\"\n";
        let config = load(polling, &[]).unwrap();
        assert_eq!(
            config.source.retention,
            Some(Duration::from_secs(24 * 3600))
        );
        let err = load_err("[source]\nretention = \"24h\"\n", &[]);
        assert!(
            err.starts_with("source.retention applies to source.mode = \"polling\" only"),
            "{err}"
        );
        let err = load_err(polling, &[("OUTBOX_RELAY_SOURCE_COLUMNS_CREATED_AT", "")]);
        assert!(
            err.starts_with("source.retention needs source.columns.created_at"),
            "{err}"
        );
        let err = load_err(polling, &[("OUTBOX_RELAY_SOURCE_RETENTION", "0s")]);
        assert!(
            err.starts_with("source.retention must be greater than zero"),
            "{err}"
        );
    }

    #[test]
    fn validation_rules() {
        let max = validate_err(|c| c.source.batch_size = 1_000_001);
        assert_eq!(max, "source.batch_size must be between 1 and 1000000");
        let min = validate_err(|c| c.source.batch_size = 0);
        assert_eq!(min, "source.batch_size must be between 1 and 1000000");
        let mut edge = Config::default();
        edge.source.batch_size = 1_000_000;
        assert!(edge.validate().is_ok());

        for table in ["events", "a.b.c", ".events", "outbox.", "out\"box.events"] {
            let err = validate_err(|c| c.source.table = table.into());
            assert!(
                err.starts_with("source.table must be \"schema.name\""),
                "{err}"
            );
        }
        for slot in [
            "",
            "Outbox",
            "outbox-relay",
            "outbox relay",
            "a".repeat(64).as_str(),
        ] {
            let err = validate_err(|c| c.source.slot = slot.into());
            assert!(
                err.starts_with("source.slot must be 1 to 63"),
                "{slot}: {err}"
            );
            let err = validate_err(|c| c.source.publication = slot.into());
            assert!(
                err.starts_with("source.publication must be 1 to 63"),
                "{err}"
            );
        }
        let mut long_ok = Config::default();
        long_ok.source.slot = "a_1".repeat(21);
        assert!(long_ok.validate().is_ok());

        for prefix in [
            "",
            "a$$b",
            "$body$",
            "it's",
            "back\\slash",
            "two words",
            "tab\there",
            "é",
            "x".repeat(64).as_str(),
        ] {
            let err = validate_err(|c| c.source.message_prefix = prefix.into());
            assert_eq!(
                err,
                "source.message_prefix must be 1 to 63 characters of ASCII letters, digits and _ - . : /",
                "{prefix:?}"
            );
        }
        for prefix in [
            "outbox",
            "shop.orders",
            "app/v2:events-1_x",
            "x".repeat(63).as_str(),
        ] {
            let mut ok = Config::default();
            ok.source.message_prefix = prefix.into();
            assert!(ok.validate().is_ok(), "{prefix:?}");
        }
        let err = validate_err(|c| c.source.poll_interval = Duration::ZERO);
        assert_eq!(err, "source.poll_interval must be greater than zero");

        let err = validate_err(|c| c.kafka.brokers = " ".into());
        assert_eq!(err, "kafka.brokers must not be empty");
        let err = validate_err(|c| c.kafka.topic_partitions = 0);
        assert_eq!(err, "kafka.topic_partitions must be at least 1");

        let err = validate_err(|c| c.log.level = String::new());
        assert!(err.starts_with("log.level must be"), "{err}");
        let err = validate_err(|c| c.log.level = "info debug".into());
        assert!(err.starts_with("log.level must be"), "{err}");
    }

    #[test]
    fn topic_templates() {
        let err = validate_err(|c| c.kafka.topic = "outbox.{foo}".into());
        assert!(
            err.starts_with(
                "kafka.topic must contain only [a-zA-Z0-9._-] outside placeholders; unknown placeholder {foo}"
            ),
            "{err}"
        );
        let err = validate_err(|c| c.kafka.topic = "outbox events.{aggregate_type}".into());
        assert!(err.contains("found ' '"), "{err}");
        let err = validate_err(|c| c.kafka.topic = "outbox.{aggregate_type".into());
        assert!(err.contains("unclosed '{'"), "{err}");
        let err = validate_err(|c| c.kafka.topic = "outbox.aggregate_type}".into());
        assert!(err.contains("found '}'"), "{err}");
        for bad in ["", ".", "..", "t".repeat(250).as_str()] {
            let err = validate_err(|c| c.kafka.topic = bad.into());
            assert!(
                err.starts_with("kafka.topic must be a Kafka topic name"),
                "{err}"
            );
        }
        let err = validate_err(|c| c.kafka.topic = format!("{}{{event_type}}", "t".repeat(250)));
        assert!(err.contains("exceeds 249"), "{err}");
        for good in [
            "events",
            "{aggregate_type}",
            "app_1.{aggregate_type}-{event_type}",
            "t".repeat(249).as_str(),
        ] {
            let mut config = Config::default();
            config.kafka.topic = good.into();
            assert!(config.validate().is_ok(), "{good}");
        }
    }

    #[test]
    fn dead_letter_topic_must_be_a_topic_name() {
        for bad in [
            "",
            ".",
            "..",
            "dlq topic",
            "dlq.{aggregate_type}",
            "d".repeat(250).as_str(),
        ] {
            let err = validate_err(|c| c.kafka.dead_letter_topic = bad.into());
            assert!(
                err.starts_with("kafka.dead_letter_topic must be a Kafka topic name"),
                "{err}"
            );
        }
        let mut config = Config::default();
        config.kafka.dead_letter_topic = "d".repeat(249);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn postgres_url_errors_never_show_the_password() {
        let cases = [
            "postgres://relay:hunter2@db:notaport/app",
            "postgres://relay:hunter2@[db/app",
            "host=db user=relay password=hunter2 port=x",
            "host=db user=relay password='hunter2",
            "host=db user=relay password=hunter2 bogus",
            "postgres://relay@db/app?password=hunter2&sslmode=sometimes",
        ];
        for url in cases {
            let err = validate_err(|c| c.postgres.url = Secret::new(url));
            assert!(err.starts_with("postgres.url must be"), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
        // The parser's complaint is kept when it is safe: it says which option is wrong.
        let err = validate_err(|c| c.postgres.url = Secret::new(cases[0]));
        assert!(err.contains("port"), "{err}");
        let err = validate_err(|c| c.postgres.url = Secret::new("postgres://relay:pw@/app"));
        assert_eq!(err, "postgres.url must name a host");
        let err = validate_err(|c| c.postgres.url = Secret::new("host=db dbname=app"));
        assert_eq!(err, "postgres.url must name a user");
    }

    #[test]
    fn postgres_config_accepts_urls_and_key_value_strings() {
        let mut config = Config::default();
        config.postgres.url =
            Secret::new("postgresql://relay:s%40cret@db1:5433,db2/app?sslmode=require");
        let pg = config.postgres_config().unwrap();
        assert_eq!(pg.get_user(), Some("relay"));
        assert_eq!(pg.get_password(), Some(&b"s@cret"[..]));
        assert_eq!(pg.get_ports(), [5433, 5432]);
        assert_eq!(pg.get_dbname(), Some("app"));
        config.postgres.url = Secret::new("host=/var/run/postgresql user=relay dbname=app");
        assert_eq!(config.postgres_config().unwrap().get_dbname(), Some("app"));
    }

    fn with_url(url: &str) -> Config {
        let mut config = Config::default();
        config.postgres.url = Secret::new(url);
        config
    }

    fn tls(url: &str) -> PostgresTls {
        with_url(url).postgres_tls().unwrap()
    }

    fn tokio_ssl_mode(url: &str) -> tokio_postgres::config::SslMode {
        with_url(url).postgres_config().unwrap().get_ssl_mode()
    }

    #[test]
    fn tls_parameters_are_read_from_urls() {
        use tokio_postgres::config::SslMode as Tokio;
        let url = "postgres://relay:pw@db/app?application_name=x&sslmode=verify-full\
                   &sslrootcert=%2Ftmp%2Fmy%20ca.pem&sslcert=/c.pem&sslkey=/k.pem";
        assert_eq!(
            tls(url),
            PostgresTls {
                mode: SslMode::VerifyFull,
                root_cert: Some("/tmp/my ca.pem".into()),
                client_cert: Some(("/c.pem".into(), "/k.pem".into())),
            }
        );
        // What tokio_postgres cannot parse is gone; the rest is still there.
        let pg = with_url(url).postgres_config().unwrap();
        assert_eq!(pg.get_ssl_mode(), Tokio::Require);
        assert_eq!(pg.get_application_name(), Some("x"));
        assert_eq!(pg.get_password(), Some(&b"pw"[..]));

        // libpq's default is prefer, and so is ours; allow is served by prefer.
        for url in [
            "postgres://relay@db/app",
            "postgres://relay@db/app?sslmode=prefer",
            "postgres://relay@db/app?sslmode=allow",
            "postgres://relay@db/app?sslmode=",
        ] {
            assert_eq!(tls(url), PostgresTls::default(), "{url}");
            assert_eq!(tokio_ssl_mode(url), Tokio::Prefer, "{url}");
        }
        let url = "postgres://relay@db/app?sslmode=disable&sslrootcert=/ca.pem";
        assert_eq!(tls(url).mode, SslMode::Disable);
        assert_eq!(tokio_ssl_mode(url), Tokio::Disable);
        let url = "postgres://relay@db/app?sslmode=require";
        assert_eq!(tls(url).mode, SslMode::Require);
        assert_eq!(tokio_ssl_mode(url), Tokio::Require);
        // Later parameters win, as in libpq.
        let url = "postgres://relay@db/app?sslmode=disable&sslmode=verify-ca";
        assert_eq!(tls(url).mode, SslMode::VerifyCa);
    }

    #[test]
    fn tls_parameters_are_read_from_key_value_strings() {
        let url = "host=db user=relay password='a b' sslmode = verify-ca \
                   sslrootcert='/my dir/ca.pem' dbname=app sslcert=/c\\ d.pem sslkey=/k.pem";
        assert_eq!(
            tls(url),
            PostgresTls {
                mode: SslMode::VerifyCa,
                root_cert: Some("/my dir/ca.pem".into()),
                client_cert: Some(("/c d.pem".into(), "/k.pem".into())),
            }
        );
        let pg = with_url(url).postgres_config().unwrap();
        assert_eq!(pg.get_dbname(), Some("app"));
        assert_eq!(pg.get_password(), Some(&b"a b"[..]));
    }

    #[test]
    fn tls_modes_follow_libpq() {
        // require with a CA file verifies the CA.
        let url = "postgres://relay@db/app?sslmode=require&sslrootcert=/ca.pem";
        assert_eq!(tls(url).mode, SslMode::VerifyCa);
        // sslrootcert=system means the system's CAs, verify-full unless said otherwise.
        let url = "postgres://relay@db/app?sslrootcert=system";
        assert_eq!(
            tls(url),
            PostgresTls {
                mode: SslMode::VerifyFull,
                root_cert: None,
                client_cert: None,
            }
        );
        let err = validate_err(|c| {
            c.postgres.url =
                Secret::new("postgres://relay@db/app?sslmode=require&sslrootcert=system")
        });
        assert_eq!(
            err,
            "postgres.url must not combine sslrootcert=system with sslmode=require (use verify-full)"
        );
        // Postgres has no TLS on Unix sockets; libpq ignores sslmode there.
        let url = "host=/var/run/postgresql user=relay sslmode=verify-full";
        assert_eq!(tls(url).mode, SslMode::Disable);
    }

    #[test]
    fn tls_parameter_errors() {
        let err = validate_err(|c| {
            c.postgres.url =
                Secret::new("postgres://relay:hunter2@db/app?sslmode=verify-everything")
        });
        assert!(err.starts_with("postgres.url must be"), "{err}");
        assert!(err.contains("\"verify-everything\" is not one of"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = validate_err(|c| {
            c.postgres.url = Secret::new("postgres://relay@db/app?sslcert=/c.pem")
        });
        assert_eq!(
            err,
            "postgres.url sets sslcert without sslkey: a client certificate needs both"
        );
        let err = validate_err(|c| c.postgres.url = Secret::new("host=db user=u sslkey=/k.pem"));
        assert_eq!(
            err,
            "postgres.url sets sslkey without sslcert: a client certificate needs both"
        );
        // The parser's complaint about the rest survives the TLS parameters.
        let err = validate_err(|c| {
            c.postgres.url =
                Secret::new("postgres://relay:hunter2@db:notaport/app?sslmode=verify-full")
        });
        assert!(err.contains("port") && !err.contains("sslmode"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn validation_reads_the_tls_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let config = with_url(&format!(
            "postgres://relay@db/app?sslmode=verify-full&sslrootcert={}",
            missing.display()
        ));
        let err = config.validate().unwrap_err();
        assert!(matches!(err, ConfigError::Tls(_)), "{err:?}");
        let chain = crate::relay::error_chain(&err);
        assert!(chain.contains("cannot read sslrootcert"), "{chain}");
        assert!(chain.contains(&missing.display().to_string()), "{chain}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let config = with_url(&format!(
            "host=db user=u sslmode=verify-ca sslrootcert={}",
            garbage.display()
        ));
        let chain = crate::relay::error_chain(&config.validate().unwrap_err());
        assert!(chain.contains("holds no usable PEM"), "{chain}");

        // Without verification no file is needed.
        assert!(with_url("postgres://relay@db/app?sslmode=require")
            .validate()
            .is_ok());
    }

    #[test]
    fn redacted_urls() {
        let cases = [
            (
                "postgres://relay:hunter2@db:5432/app",
                "postgres://relay:***@db:5432/app",
            ),
            ("postgresql://relay@db/app", "postgresql://relay@db/app"),
            ("postgres://relay:@db/app", "postgres://relay:***@db/app"),
            (
                "postgres://relay:a:b/c?d@db/app?password=x&sslmode=require",
                "postgres://relay:***@db/app?password=***&sslmode=require",
            ),
            (
                "postgres://db/app?pass%77ord=x",
                "postgres://db/app?pass%77ord=***",
            ),
            (
                "postgres://relay:pw@db/app?sslmode=verify-full&sslrootcert=/ca.pem",
                "postgres://relay:***@db/app?sslmode=verify-full&sslrootcert=/ca.pem",
            ),
            (
                "host=db user=relay password=hunter2 dbname=app",
                "host=db user=relay password=*** dbname=app",
            ),
            (
                "password = 'it\\'s secret' host=db",
                "password = *** host=db",
            ),
            ("password='it''s' host=db", "***"),
            ("password=abc\\ def host=db", "password=*** host=db"),
            ("host=db password='unterminated", "***"),
            ("", ""),
        ];
        for (url, expected) in cases {
            let postgres = PostgresConfig {
                url: Secret::new(url),
            };
            assert_eq!(postgres.redacted_url(), expected, "{url}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let text = r#"
[postgres]
url = "postgres://relay:hunter2-pg@db:5432/app"
[kafka.properties]
"sasl.password" = "s3cret-sasl"
"ssl.key.pem" = "PEM-PRIVATE"
"ssl.key.password" = "keypass-9"
"sasl.oauthbearer.client.secret" = "oauth-shh"
"sasl.oauthbearer.config" = "clientSecret=cfg-shh"
"some.api.token" = "tok-123"
"private.key" = "bare-key"
"sasl.username" = "visible-user"
"#;
        let config = load(text, &[]).unwrap();
        let debug = format!("{config:?}");
        let pretty = format!("{config:#?}");
        for output in [&debug, &pretty] {
            for secret in [
                "hunter2-pg",
                "s3cret-sasl",
                "PEM-PRIVATE",
                "keypass-9",
                "oauth-shh",
                "cfg-shh",
                "tok-123",
                "bare-key",
            ] {
                assert!(!output.contains(secret), "{secret} leaked: {output}");
            }
            assert!(output.contains("visible-user"), "{output}");
            assert!(
                output.contains("postgres://relay:***@db:5432/app"),
                "{output}"
            );
            assert!(output.contains("\"ssl.key.pem\": \"***\""), "{output}");
        }
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret} {secret:?}"), "*** \"***\"");
        // The key-value form is redacted too.
        let mut config = Config::default();
        config.postgres.url = Secret::new("host=db user=u password='pw with spaces'");
        assert!(!format!("{config:?}").contains("pw with"));
    }

    #[test]
    fn properties_accept_bare_dotted_keys_and_reject_duplicates() {
        let config = load("[kafka.properties]\ncompression.type = \"zstd\"\n", &[]).unwrap();
        assert_eq!(config.kafka.properties["compression.type"], "zstd");
        let text = "[kafka.properties]\n\"a.b\" = 1\na.b = 2\n";
        let err = load_err(text, &[]);
        assert_eq!(err, "kafka.properties.a.b is set twice");
        assert!(toml::from_str::<Config>(text).is_err());
    }

    #[test]
    fn durations() {
        let ok = [
            ("200ms", Duration::from_millis(200)),
            ("1s", Duration::from_secs(1)),
            ("1.5s", Duration::from_millis(1500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("0.5ms", Duration::from_micros(500)),
            ("0.000000001s", Duration::from_nanos(1)),
            ("0s", Duration::ZERO),
            ("007ms", Duration::from_millis(7)),
            ("5124095h", Duration::from_secs(5_124_095 * 3600)),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        let bad = [
            ("", "has no unit"),
            ("200", "has no unit"),
            ("ms", "must start with a number"),
            ("-1s", "has an unknown unit"),
            ("1.s", "must start with a number"),
            (".5s", "must start with a number"),
            ("1.5.5s", "must start with a number"),
            ("1 s", "has an unknown unit"),
            (" 1s", "has an unknown unit"),
            ("1s ", "has an unknown unit"),
            ("1x", "has an unknown unit"),
            ("1sms", "has an unknown unit"),
            ("1S", "has an unknown unit"),
            ("1e3s", "has an unknown unit"),
            ("1.0000000001s", "more than nine decimal places"),
            ("5124096h", "is too large"),
            ("99999999999999999999999999999999999999999h", "is too large"),
        ];
        for (text, expected) in bad {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn load_reads_the_file_and_reports_io_errors_with_the_path() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, b"[source]\nbatch_size = 7\n").unwrap();
        // The process environment is not controlled here; only check what the file sets.
        if let Ok(config) = Config::load(Some(file.path())) {
            assert_eq!(config.source.batch_size, 7);
        } else {
            assert!(std::env::vars().any(|(k, _)| k.starts_with(ENV_PREFIX)));
        }
        let missing = file.path().with_extension("missing");
        let err = Config::load(Some(&missing)).unwrap_err();
        assert!(matches!(&err, ConfigError::Io { path, .. } if path == &missing));
        assert!(err.to_string().contains(&missing.display().to_string()));
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn table_parts_without_a_schema_default_to_public() {
        let mut source = SourceConfig::default();
        assert_eq!(source.table_parts(), ("outbox", "events"));
        source.table = "events".into();
        assert_eq!(source.table_parts(), ("public", "events"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn duration_parser_never_panics(text in "\\PC{0,24}") {
                let _ = parse_duration(&text);
            }

            #[test]
            fn whole_milliseconds_round_trip(ms in 0u64..=u64::MAX / 1_000_000) {
                prop_assert_eq!(parse_duration(&format!("{ms}ms")), Ok(Duration::from_millis(ms)));
            }

            #[test]
            fn loader_never_panics(text in "\\PC{0,200}") {
                let _ = Config::from_parts(Some(&text), Vec::new());
            }

            #[test]
            fn url_parser_never_panics(text in "(postgres://|host=)?\\PC{0,120}") {
                let _ = parse_postgres_url(&text);
                let _ = url_error_reason(&text);
            }

            #[test]
            fn redaction_hides_url_passwords(
                user in "[a-z]{1,8}",
                password in "PW[A-Za-z0-9:/?=%!$*]{0,16}",
                host in "[a-z]{1,8}",
                query in proptest::bool::ANY,
            ) {
                let (url, expected) = if query {
                    (
                        format!("postgres://{user}@{host}/db?password={password}"),
                        format!("postgres://{user}@{host}/db?password=***"),
                    )
                } else {
                    (
                        format!("postgres://{user}:{password}@{host}/db"),
                        format!("postgres://{user}:***@{host}/db"),
                    )
                };
                let postgres = PostgresConfig { url: Secret::new(url) };
                prop_assert_eq!(postgres.redacted_url(), expected);
                let debug = format!("{postgres:?}");
                prop_assert!(!debug.contains("PW"), "{}", debug);
            }

            #[test]
            fn redaction_hides_key_value_passwords(
                password in "PW[A-Za-z0-9 '\\\\=]{0,16}",
                quoted in proptest::bool::ANY,
            ) {
                let value = if quoted {
                    format!("'{}'", password.replace('\\', "\\\\").replace('\'', "\\'"))
                } else {
                    password.replace('\\', "\\\\").replace(' ', "\\ ").replace('\'', "\\'")
                };
                let url = format!("host=db password={value} user=u");
                let postgres = PostgresConfig { url: Secret::new(url.clone()) };
                prop_assert_eq!(postgres.redacted_url(), "host=db password=*** user=u");
                // The escaping above is what tokio_postgres reads back, so the span redacted is
                // exactly the password it would send.
                let mut config = Config::default();
                config.postgres.url = Secret::new(url);
                let parsed = config.postgres_config();
                prop_assert!(parsed.is_ok());
                if let Ok(parsed) = parsed {
                    prop_assert_eq!(parsed.get_password(), Some(password.as_bytes()));
                }
            }
        }
    }
}
