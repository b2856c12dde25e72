//! The config's types, section by section, and their defaults: each default a named constant
//! saying why that value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use serde::Deserialize;

use super::de::{deserialize_duration, deserialize_optional_duration, deserialize_properties};
use super::error::invalid;
use super::load::Kind;
use super::postgres::redact_connection_string;
use super::{Columns, ConfigError};
use crate::route::TopicTemplate;

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
/// At least once plus the `id` header works with every broker and every consumer; exactly once
/// needs transactions and `read_committed` consumers, so it is asked for.
pub const DEFAULT_DELIVERY: Delivery = Delivery::AtLeastOnce;
/// Named after the program, next to the event topics; compacted, one record per relay identity.
pub const DEFAULT_PROGRESS_TOPIC: &str = "outbox-relay.progress";
/// All interfaces so kubelet probes and Prometheus can reach it; the port is fixed by the SPEC so
/// the Helm chart and dashboards agree on it.
pub const DEFAULT_HTTP_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9187));
/// Text is readable at a terminal; log shippers should set `json`.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// Lifecycle events and errors without per-event noise.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// Declares a config section once: the struct with its fields (serde reads it, rejecting
/// unknown keys), its `Default` from each field's default, and `KEYS`, each key's [`Kind`],
/// from which the loader derives the file check and the environment overrides.
macro_rules! section {
    (
        $(#[$meta:meta])*
        $name:ident in $section:literal {
            $(
                $(#[$field_meta:meta])*
                $field:ident: $ty:ty = $default:expr, $kind:expr;
            )*
        }
    ) => {
        $(#[$meta])*
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    $($field: $default,)*
                }
            }
        }

        impl $name {
            /// The section's name in the file.
            pub(super) const SECTION: &'static str = $section;
            /// The section's keys and their types.
            pub(super) const KEYS: &'static [(&'static str, Kind)] =
                &[$((stringify!($field), $kind),)*];
        }
    };
}

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
delivery = "at-least-once"   # "at-least-once" | "exactly-once" (Kafka transactions)
progress_topic = "outbox-relay.progress" # exactly-once: compacted, the relay's progress
[kafka.properties]           # verbatim librdkafka settings
"compression.type" = "lz4"

[http]
listen = "0.0.0.0:9187"

[log]
format = "text"              # "text" | "json"
level = "info"
"#;

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

section! {
    /// `[postgres]`
    #[derive(Clone, PartialEq, Deserialize)]
    PostgresConfig in "postgres" {
        /// A `postgres://` URL or a libpq `key=value` string; usually carries the password.
        url: Secret = Secret::new(DEFAULT_POSTGRES_URL), Kind::Str;
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

section! {
    /// `[source]`
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    SourceConfig in "source" {
        /// Logical replication or polling.
        mode: SourceMode = DEFAULT_SOURCE_MODE, Kind::Choice(&["logical", "polling"]);
        /// The outbox table as `"schema.name"`; see [`SourceConfig::table_parts`].
        table: String = DEFAULT_TABLE.to_owned(), Kind::Str;
        /// Replication slot name (logical mode).
        slot: String = DEFAULT_SLOT.to_owned(), Kind::Str;
        /// Publication name (logical mode).
        publication: String = DEFAULT_PUBLICATION.to_owned(), Kind::Str;
        /// Create the publication and slot if they are missing (first start only; a slot that
        /// vanished later is never recreated silently).
        create: bool = DEFAULT_CREATE, Kind::Bool;
        /// `pg_logical_emit_message` prefix to relay (logical mode).
        message_prefix: String = DEFAULT_MESSAGE_PREFIX.to_owned(), Kind::Str;
        /// Upper bound between polls (polling mode).
        #[serde(deserialize_with = "deserialize_duration")]
        poll_interval: Duration = DEFAULT_POLL_INTERVAL, Kind::Duration;
        /// Most events read or published as one batch.
        batch_size: usize = DEFAULT_BATCH_SIZE, Kind::Int {
            min: 1,
            max: MAX_BATCH_SIZE as i64,
        };
        /// Dead-letter or halt on a bad row.
        on_invalid: OnInvalid = DEFAULT_ON_INVALID, Kind::Choice(&["dead-letter", "halt"]);
        /// Polling mode: delete published rows older than this (by `created_at`), in small
        /// batches. `None` (the default) deletes nothing.
        #[serde(deserialize_with = "deserialize_optional_duration")]
        retention: Option<Duration> = None, Kind::Duration;
        /// `[source.columns]`: column names of the outbox table.
        columns: Columns = Columns::default(), Kind::Columns;
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

/// What a consumer may see (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Every event at least once; duplicates carry the same `id` header.
    #[default]
    AtLeastOnce,
    /// Kafka transactions: a `read_committed` consumer sees every event exactly once
    /// (`docs/EXACTLY-ONCE.md`).
    ExactlyOnce,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AtLeastOnce => "at-least-once",
            Self::ExactlyOnce => "exactly-once",
        }
    }
}

section! {
    /// `[kafka]`
    #[derive(Clone, PartialEq, Deserialize)]
    KafkaConfig in "kafka" {
        /// `bootstrap.servers`.
        brokers: String = DEFAULT_BROKERS.to_owned(), Kind::Str;
        /// Topic template; placeholders `{aggregate_type}` and `{event_type}`.
        topic: String = DEFAULT_TOPIC.to_owned(), Kind::Str;
        /// Where bad rows go (SPEC §7).
        dead_letter_topic: String = DEFAULT_DEAD_LETTER_TOPIC.to_owned(), Kind::Str;
        /// Create missing topics through the admin API.
        create_topics: bool = DEFAULT_CREATE_TOPICS, Kind::Bool;
        /// Partitions of the topics the relay creates.
        topic_partitions: i32 = DEFAULT_TOPIC_PARTITIONS, Kind::Int {
            min: 1,
            max: i32::MAX as i64,
        };
        /// At least once, or exactly once through Kafka transactions.
        delivery: Delivery = DEFAULT_DELIVERY, Kind::Choice(&["at-least-once", "exactly-once"]);
        /// Exactly once: the compacted topic the relay records its progress in, in the same
        /// transaction as the records that progress covers.
        progress_topic: String = DEFAULT_PROGRESS_TOPIC.to_owned(), Kind::Str;
        /// `[kafka.properties]`: librdkafka settings, passed verbatim. Values may be written as
        /// TOML strings, numbers or booleans and are kept in their string form; dotted keys may
        /// be quoted (`"compression.type" = "lz4"`) or bare (`compression.type = "lz4"`). Empty
        /// by default: the producer's own defaults (idempotence, acks=all, lz4) live in the sink.
        #[serde(deserialize_with = "deserialize_properties")]
        properties: BTreeMap<String, String> = BTreeMap::new(), Kind::Properties;
    }
}

/// librdkafka's default `message.max.bytes`, used when `[kafka.properties]` does not set it.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

impl KafkaConfig {
    /// The producer's `message.max.bytes`: what the router compares record sizes with and
    /// what sizes the replication buffer.
    pub fn message_max_bytes(&self) -> usize {
        self.properties
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
    }

    /// `topic`, parsed. Validation has checked it, so after loading this cannot fail.
    pub fn topic_template(&self) -> Result<TopicTemplate, ConfigError> {
        TopicTemplate::parse(&self.topic).map_err(|reason| invalid("kafka.topic", reason))
    }

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
            .field("delivery", &self.delivery)
            .field("progress_topic", &self.progress_topic)
            .field("properties", &self.redacted_properties())
            .finish()
    }
}

section! {
    /// `[http]`
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    HttpConfig in "http" {
        /// Address of `/healthz`, `/readyz`, `/status` and `/metrics`.
        listen: SocketAddr = DEFAULT_HTTP_LISTEN, Kind::Addr;
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

section! {
    /// `[log]`
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    LogConfig in "log" {
        /// Text or JSON.
        format: LogFormat = DEFAULT_LOG_FORMAT, Kind::Choice(&["text", "json"]);
        /// A tracing level (`info`) or env-filter directives (`info,outbox_relay=debug`).
        level: String = DEFAULT_LOG_LEVEL.to_owned(), Kind::Str;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::load;
    use super::*;

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
    fn table_parts_without_a_schema_default_to_public() {
        let mut source = SourceConfig::default();
        assert_eq!(source.table_parts(), ("outbox", "events"));
        source.table = "events".into();
        assert_eq!(source.table_parts(), ("public", "events"));
    }
}
