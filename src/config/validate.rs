//! Validation: every constraint the types cannot express, checked after loading. Each error
//! names the field and the constraint; the first problem found is returned.

use super::error::invalid;
use super::postgres::parse_postgres_url;
use super::{Config, ConfigError, Delivery, Required, SourceMode, MAX_BATCH_SIZE, OUTBOX_COLUMNS};
use crate::route::{topic_name_error, MAX_TOPIC_LEN};

/// Postgres truncates identifiers longer than `NAMEDATALEN - 1` bytes.
const MAX_IDENTIFIER_LEN: usize = 63;

impl Config {
    /// Checks every constraint the types cannot express; the error names the field and the
    /// constraint. Returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // The files the TLS settings name are read by the `tls` module's `check_files`, which the
        // caller runs after loading.
        parse_postgres_url(self.postgres.url.expose())?;
        self.validate_source()?;
        self.validate_kafka()?;
        validate_log_level(&self.log.level)
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
        for spec in &OUTBOX_COLUMNS {
            if columns
                .name(spec.column)
                .is_some_and(|name| !is_column_name(name))
            {
                return Err(invalid(
                    format!("source.columns.{}", spec.key),
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
            let needed = OUTBOX_COLUMNS
                .iter()
                .filter(|spec| spec.required == Required::Polling);
            for spec in needed {
                if columns.name(spec.column).is_none() {
                    return Err(invalid(
                        format!("source.columns.{}", spec.key),
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
        kafka.topic_template()?;
        if topic_name_error(&kafka.dead_letter_topic).is_some() {
            return Err(invalid(
                "kafka.dead_letter_topic",
                format!(
                    "must be a Kafka topic name: 1 to {MAX_TOPIC_LEN} characters of [a-zA-Z0-9._-], not \".\" or \"..\""
                ),
            ));
        }
        if topic_name_error(&kafka.progress_topic).is_some() {
            return Err(invalid(
                "kafka.progress_topic",
                format!(
                    "must be a Kafka topic name: 1 to {MAX_TOPIC_LEN} characters of [a-zA-Z0-9._-], not \".\" or \"..\""
                ),
            ));
        }
        if kafka.delivery == Delivery::ExactlyOnce {
            for key in ["transactional.id", "enable.idempotence"] {
                if kafka.properties.contains_key(key) {
                    return Err(invalid(
                        format!("kafka.properties.\"{key}\""),
                        "must not be set with kafka.delivery = \"exactly-once\": the relay derives it",
                    ));
                }
            }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{load, load_err, validate_err};
    use super::super::*;

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
    fn exactly_once_is_asked_for_and_derives_its_producer_identity() {
        assert_eq!(Config::default().kafka.delivery, Delivery::AtLeastOnce);
        let config = load("", &[("OUTBOX_RELAY_KAFKA_DELIVERY", "exactly-once")]).unwrap();
        assert_eq!(config.kafka.delivery, Delivery::ExactlyOnce);
        assert_eq!(config.kafka.progress_topic, "outbox-relay.progress");
        let err = load_err("", &[("OUTBOX_RELAY_KAFKA_DELIVERY", "twice")]);
        assert!(err.contains("kafka.delivery"), "{err}");
        for key in ["transactional.id", "enable.idempotence"] {
            let err = validate_err(|c| {
                c.kafka.delivery = Delivery::ExactlyOnce;
                c.kafka.properties.insert(key.into(), "x".into());
            });
            assert!(err.contains(key) && err.contains("exactly-once"), "{err}");
        }
        let err = validate_err(|c| c.kafka.progress_topic = "a b".into());
        assert!(
            err.starts_with("kafka.progress_topic must be a Kafka topic name"),
            "{err}"
        );
    }
}
