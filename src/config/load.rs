//! Loading: the TOML file and the `OUTBOX_RELAY_*` environment overlay.
//!
//! The TOML text is parsed into a generic table, checked against [`SCHEMA`] (which gives
//! precise errors and tells the environment overrides each key's type), merged with the
//! environment, and only then deserialised into [`Config`] and validated. [`SCHEMA`] collects
//! the keys each section declares (with its fields, in `types.rs`): the unknown-key check of
//! the file, the environment variable names and their types all come from it (the columns from
//! [`OUTBOX_COLUMNS`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Table, Value};

use super::de::parse_duration;
use super::error::invalid;
use super::{
    Config, ConfigError, HttpConfig, KafkaConfig, LogConfig, PostgresConfig, SourceConfig,
    OUTBOX_COLUMNS,
};

/// Prefix of every environment variable the relay reads.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";
/// The config file path (like `--config`); not an override.
pub const CONFIG_PATH_ENV: &str = "OUTBOX_RELAY_CONFIG";
/// Reserved for a tracing env-filter read elsewhere; not an override.
pub const LOG_FILTER_ENV: &str = "OUTBOX_RELAY_LOG";

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
}

/// The type of a config key, as far as the file check and the environment need to know it.
pub(super) enum Kind {
    Str,
    Bool,
    Int { min: i64, max: i64 },
    Duration,
    Choice(&'static [&'static str]),
    Addr,
    Columns,
    Properties,
}

/// The config's keys, section by section, as each section declares them: [`Config`] is the
/// same shape.
const SCHEMA: &[(&str, &[(&str, Kind)])] = &[
    (PostgresConfig::SECTION, PostgresConfig::KEYS),
    (SourceConfig::SECTION, SourceConfig::KEYS),
    (KafkaConfig::SECTION, KafkaConfig::KEYS),
    (HttpConfig::SECTION, HttpConfig::KEYS),
    (LogConfig::SECTION, LogConfig::KEYS),
];

/// The `[source.columns]` keys, from the one list of columns.
fn column_keys() -> impl Iterator<Item = &'static str> {
    OUTBOX_COLUMNS.iter().map(|spec| spec.key)
}

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
                if !column_keys().any(|known| known == key) {
                    return Err(unknown_key(&column_field, column_keys()));
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
        let key = column_keys().find(|key| key.to_ascii_uppercase() == column)?;
        return Some((
            vec!["source".into(), "columns".into(), key.into()],
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{load, load_err};
    use super::super::*;
    use super::*;

    #[test]
    fn every_schema_section_is_a_config_section() {
        // The keys within a section come from the same declaration as its fields; the
        // sections are listed twice ([`Config`] and [`SCHEMA`]), so they are held together here.
        for (section, _) in SCHEMA {
            let text = format!("[{section}]\n");
            assert!(toml::from_str::<Config>(&text).is_ok(), "{section}");
        }
        let sections: std::collections::BTreeSet<_> = SCHEMA.iter().map(|(s, _)| *s).collect();
        assert_eq!(sections.len(), 5);
    }

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
    fn properties_accept_bare_dotted_keys_and_reject_duplicates() {
        let config = load("[kafka.properties]\ncompression.type = \"zstd\"\n", &[]).unwrap();
        assert_eq!(config.kafka.properties["compression.type"], "zstd");
        let text = "[kafka.properties]\n\"a.b\" = 1\na.b = 2\n";
        let err = load_err(text, &[]);
        assert_eq!(err, "kafka.properties.a.b is set twice");
        assert!(toml::from_str::<Config>(text).is_err());
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

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn loader_never_panics(text in "\\PC{0,200}") {
                let _ = Config::from_parts(Some(&text), Vec::new());
            }
        }
    }
}
