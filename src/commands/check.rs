//! `outbox-relay check`: validates Postgres and Kafka for the configured source, one line
//! per check, each failure with its fix. Polling mode needs neither `wal_level = logical` nor
//! REPLICATION, and has no slot.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, Producer};

use crate::config::{Config, Delivery, SourceMode};
use crate::error::{error_chain, Definite};
use crate::postgres::setup::{self, PollingSetup};
use crate::postgres::{coverage, pool};
use crate::sink::kafka;
use crate::source::SourceError;

/// `outbox-relay check`: prints one line per check; false when any failed.
pub async fn check(cfg: &Config) -> bool {
    println!("config: ok ({})", cfg.postgres.redacted_url());
    let mut ok = true;
    let mut fail = |what: &str, problem: String, fix: &str| {
        ok = false;
        println!("{what}: FAILED: {problem}\n  fix: {fix}");
    };

    match check_postgres(cfg).await {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(SourceError::Definite(definite)) => {
            fail("postgres", definite.problem(), &definite.fix())
        }
        Err(e) => fail(
            "postgres",
            format!(
                "cannot reach Postgres at {}: {}",
                cfg.postgres.redacted_url(),
                error_chain(&e)
            ),
            "check postgres.url, that Postgres is running and that pg_hba.conf admits the relay",
        ),
    }

    let brokers = cfg.kafka.brokers.clone();
    let probe = kafka::admin_config(&cfg.kafka);
    let kafka = tokio::task::spawn_blocking(move || -> Result<usize, String> {
        let client: BaseConsumer = probe.create().map_err(|e| e.to_string())?;
        let metadata = client
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        Ok(metadata.brokers().len())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let reachable = kafka.is_ok();
    match kafka {
        Ok(n) => println!("kafka: ok ({n} brokers at {brokers})"),
        Err(e) => fail(
            "kafka",
            format!("cannot reach Kafka at {brokers}: {e}"),
            "check kafka.brokers, the network, and the security settings in [kafka.properties]",
        ),
    }
    if reachable && cfg.kafka.delivery == Delivery::ExactlyOnce {
        match check_transactions(cfg).await {
            Ok(()) => println!("kafka transactions: ok (kafka.delivery = \"exactly-once\")"),
            Err(e) => fail(
                "kafka transactions",
                format!("the brokers at {brokers} do not support transactions for the relay: {e}"),
                "use brokers with transactions (Apache Kafka with its transaction state log \
                 available, and the relay allowed to write transactional ids \
                 \"outbox-relay:*\"), or set kafka.delivery = \"at-least-once\"",
            ),
        }
    }
    ok
}

/// Exactly once: starts a transactional producer under a throwaway transactional id (with
/// the relay's prefix, so the same ACLs apply; never the relay's own, which would fence a
/// running relay).
async fn check_transactions(cfg: &Config) -> Result<(), String> {
    let probe = format!(
        "check-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let client = kafka::transactional_config(&cfg.kafka, &probe);
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let producer: BaseProducer = client.create().map_err(|e| e.to_string())?;
        producer
            .init_transactions(TRANSACTIONS_PROBE_TIMEOUT)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// How long `check` waits for the broker to start a transactional producer.
const TRANSACTIONS_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

async fn check_postgres(cfg: &Config) -> Result<Vec<String>, SourceError> {
    let pool = pool(cfg).map_err(|e| Definite::PostgresUrl {
        problem: error_chain(&e),
    })?;
    let client = pool.get().await.map_err(SourceError::pool)?;
    let mut lines = vec!["postgres: reachable".to_owned()];
    let polling = cfg.source.mode == SourceMode::Polling;
    let table = setup::table_sql(cfg);
    if !polling {
        if let Ok(pg) = cfg.postgres_config() {
            crate::source::logical::single_server(&pg)?;
        }
        setup::check_wal_level(&**client).await?;
        lines.push("postgres: wal_level = logical".into());

        let row = client
            .query_one(
                "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|source| SourceError::Postgres {
                context: "reading the role's attributes",
                source,
            })?;
        if !row.get::<_, bool>(0) {
            return Err(Definite::NoReplicationRole.into());
        }
        lines.push("postgres: role may stream replication".into());
    }

    let (schema, name) = cfg.source.table_parts();
    let qualified = format!("{schema}.{name}");
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
        .await
        .map_err(|source| SourceError::Postgres {
            context: "looking up the outbox table",
            source,
        })?;
    if !row.get::<_, bool>(0) {
        return Err(Definite::TableMissing { table }.into());
    }
    let readable: bool = client
        .query_one("SELECT has_table_privilege($1, 'SELECT')", &[&qualified])
        .await
        .map_err(|source| SourceError::Postgres {
            context: "checking privileges",
            source,
        })?
        .get(0);
    if !readable {
        return Err(Definite::CannotSelect { table }.into());
    }
    lines.push(format!("postgres: outbox table {table} readable"));
    if polling {
        check_polling(&**client, cfg, &mut lines).await?;
        return Ok(lines);
    }

    let (_, finding) = coverage::read(&**client, cfg).await?;
    coverage::judge_table(&finding, cfg)?;
    lines.push(format!(
        "postgres: {table} has every configured column ({})",
        coverage::required_columns(cfg)
            .iter()
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    match (&finding.publication, cfg.source.create) {
        (Some(_), _) => {
            coverage::judge_publication(&finding, cfg)?;
            lines.push(format!(
                "postgres: publication {} publishes the inserts of {table}{}",
                cfg.source.publication,
                if finding.partitioned {
                    " (partitioned: via its root)"
                } else {
                    ""
                }
            ));
        }
        (None, true) => lines.push(format!(
            "postgres: publication {} missing; run will create it (source.create = true)",
            cfg.source.publication
        )),
        (None, false) => return Err(setup::publication_missing(cfg, true).into()),
    }

    let slot = client
        .query_opt(
            "SELECT plugin, active, wal_status, confirmed_flush_lsn::text, \
                    to_jsonb(s) ->> 'failover' \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await
        .map_err(|source| SourceError::Postgres {
            context: "looking up the slot",
            source,
        })?;
    // Whether the slot fails over to standbys (PostgreSQL 17+); None when it does not exist.
    let mut slot_failover = None;
    match slot {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            if plugin.as_deref() != Some("pgoutput") {
                return Err(Definite::SlotPlugin {
                    slot: cfg.source.slot.clone(),
                    plugin,
                }
                .into());
            }
            let active: bool = row.get(1);
            let wal_status: Option<String> = row.get(2);
            if wal_status.as_deref() == Some("lost") {
                return Err(
                    setup::slot_lost(&cfg.source.slot, row.get::<_, Option<&str>>(3)).into(),
                );
            }
            lines.push(format!(
                "postgres: slot {} uses pgoutput ({}, wal_status {}{})",
                cfg.source.slot,
                if active { "in use" } else { "idle" },
                wal_status.as_deref().unwrap_or("unknown"),
                if wal_status.as_deref() == Some("unreserved") {
                    ": beyond max_slot_wal_keep_size, lost at the next checkpoint unless the relay catches up"
                } else {
                    ""
                }
            ));
            slot_failover = Some(row.get::<_, Option<&str>>(4) == Some("true"));
        }
        None if cfg.source.create => lines.push(format!(
            "postgres: slot {} missing; run will create it (source.create = true)",
            cfg.source.slot
        )),
        None => {
            return Err(Definite::SlotMissing {
                slot: cfg.source.slot.clone(),
            }
            .into())
        }
    }
    lines.extend(failover_lines(&**client, cfg, slot_failover).await?);
    Ok(lines)
}

/// What the server tells about keeping the slot across a failover to a standby.
#[derive(Debug, Default)]
struct FailoverFacts {
    server_version_num: i32,
    in_recovery: bool,
    /// The slot's `failover` flag; None when the slot does not exist yet.
    slot_failover: Option<bool>,
    /// `synchronized_standby_slots` (primary, 17+).
    synchronized_standby_slots: String,
    /// `sync_replication_slots` (standby, 17+).
    sync_replication_slots: String,
}

async fn failover_lines(
    client: &impl tokio_postgres::GenericClient,
    cfg: &Config,
    slot_failover: Option<bool>,
) -> Result<Vec<String>, SourceError> {
    let (server_version_num, in_recovery) = setup::server_version(client).await?;
    let mut facts = FailoverFacts {
        server_version_num,
        in_recovery,
        slot_failover,
        ..FailoverFacts::default()
    };
    if server_version_num >= setup::FAILOVER_SLOTS_VERSION {
        let setting = |name: &'static str| async move {
            client
                .query_opt("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
                .await
                .map(|row| row.map(|r| r.get::<_, String>(0)).unwrap_or_default())
                .map_err(setup::pg("reading the failover settings"))
        };
        facts.synchronized_standby_slots = setting("synchronized_standby_slots").await?;
        facts.sync_replication_slots = setting("sync_replication_slots").await?;
    }
    Ok(failover_report(&cfg.source.slot, &facts))
}

/// `check`'s lines on failover: before PostgreSQL 17 a failover loses the slot; from 17 on,
/// whether the slot has `failover = true` and what the settings that make standbys
/// synchronise it say, as far as this server can see.
fn failover_report(slot: &str, facts: &FailoverFacts) -> Vec<String> {
    let major = facts.server_version_num / 10_000;
    if facts.server_version_num < setup::FAILOVER_SLOTS_VERSION {
        return vec![format!(
            "postgres: failover: PostgreSQL {major} keeps logical slots on the primary only: \
             after a failover to a standby, slot {slot} is missing and the relay stops until \
             the operator acts (README \"A vanished slot\"); PostgreSQL 17 can synchronise it"
        )];
    }
    if facts.in_recovery {
        return vec![format!(
            "postgres: failover: this server is a standby (sync_replication_slots = {}); \
             slots created here do not fail over",
            or_unset(&facts.sync_replication_slots)
        )];
    }
    let mut lines = vec![match facts.slot_failover {
        None => format!("postgres: failover: run will create slot {slot} with failover = true"),
        Some(true) => format!("postgres: failover: slot {slot} has failover = true"),
        Some(false) => format!(
            "postgres: failover: slot {slot} has failover = false, so a failover loses it; \
             enable it on a replication connection (psql \"dbname=... replication=database\" \
             -c 'ALTER_REPLICATION_SLOT {slot} (FAILOVER true)') while no relay streams it"
        ),
    }];
    lines.push(if facts.synchronized_standby_slots.is_empty() {
        "postgres: failover: synchronized_standby_slots is empty: the relay may publish \
         changes no standby has yet; list the standbys' physical slots there, and set \
         sync_replication_slots = on and hot_standby_feedback = on on each standby \
         (not visible from the primary)"
            .to_owned()
    } else {
        format!(
            "postgres: failover: synchronized_standby_slots = {}: the relay only receives \
             changes those standbys have; they keep a copy of the slot if \
             sync_replication_slots = on and hot_standby_feedback = on there (not visible \
             from the primary)",
            facts.synchronized_standby_slots
        )
    });
    lines
}

fn or_unset(setting: &str) -> &str {
    if setting.is_empty() {
        "unset"
    } else {
        setting
    }
}

/// Polling mode: the columns, the trigger, the index and the rights on the state table.
async fn check_polling(
    client: &impl tokio_postgres::GenericClient,
    cfg: &Config,
    lines: &mut Vec<String>,
) -> Result<(), SourceError> {
    let table = setup::table_sql(cfg);
    let found = setup::prepare_polling(client, cfg, PollingSetup::Inspect).await?;
    lines.push(format!(
        "postgres: polling columns present (txid is {})",
        if found.txid_is_xid8 { "xid8" } else { "bigint" }
    ));
    lines.push(if found.notify_trigger {
        "postgres: notify trigger present (new rows wake the relay at once)".into()
    } else {
        "postgres: notify trigger missing: the relay polls every source.poll_interval; \
         run `outbox-relay init` in polling mode as the table owner"
            .into()
    });
    lines.push(if found.indexed {
        "postgres: an index leads with txid".into()
    } else {
        format!(
            "postgres: no index leads with txid: every poll scans {table}; \
             run `outbox-relay init` in polling mode"
        )
    });
    let rights = client
        .query_one(
            // Listing several privileges asks for any of them: ask for each.
            "SELECT CASE WHEN to_regclass('outbox.relay_state') IS NULL THEN false ELSE \
                has_table_privilege('outbox.relay_state', 'SELECT') \
                AND has_table_privilege('outbox.relay_state', 'INSERT') \
                AND has_table_privilege('outbox.relay_state', 'UPDATE') END",
            &[],
        )
        .await
        .map_err(setup::pg("checking the state table"))?;
    if !rights.get::<_, bool>(0) {
        return Err(Definite::StateTableRights.into());
    }
    lines.push("postgres: polling cursor table writable".into());
    if cfg.source.retention.is_some() {
        let qualified = cfg.source.table.clone();
        let may_delete: bool = client
            .query_one("SELECT has_table_privilege($1, 'DELETE')", &[&qualified])
            .await
            .map_err(setup::pg("checking privileges"))?
            .get(0);
        if !may_delete {
            return Err(Definite::CannotDelete { table }.into());
        }
        lines.push("postgres: retention may delete published rows".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_report_follows_the_server_version_and_settings() {
        let before_17 = FailoverFacts {
            server_version_num: 150_013,
            slot_failover: Some(false),
            ..FailoverFacts::default()
        };
        let lines = failover_report("s", &before_17);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("PostgreSQL 15 keeps logical slots on the primary only"));
        assert!(lines[0].contains("A vanished slot"));

        let mut facts = FailoverFacts {
            server_version_num: 170_002,
            slot_failover: Some(true),
            ..FailoverFacts::default()
        };
        let lines = failover_report("s", &facts);
        assert!(lines[0].contains("slot s has failover = true"), "{lines:?}");
        assert!(
            lines[1].contains("synchronized_standby_slots is empty"),
            "{lines:?}"
        );

        facts.slot_failover = Some(false);
        facts.synchronized_standby_slots = "standby_1".into();
        let lines = failover_report("s", &facts);
        assert!(
            lines[0].contains("ALTER_REPLICATION_SLOT s (FAILOVER true)"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("synchronized_standby_slots = standby_1"),
            "{lines:?}"
        );

        facts.slot_failover = None;
        let lines = failover_report("s", &facts);
        assert!(lines[0].contains("run will create slot s with failover = true"));

        facts.in_recovery = true;
        facts.sync_replication_slots = "on".into();
        let lines = failover_report("s", &facts);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("this server is a standby (sync_replication_slots = on)"));
    }
}
