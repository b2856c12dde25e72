//! Database objects the relay needs: the outbox schema (`init`), the publication and the
//! replication slot (logical mode), the notify trigger and the `(txid, seq)` index (polling
//! mode), and the checks that turn a misconfigured database into one clear error.
//!
//! "Already exists" is success everywhere, so `init` and every start are idempotent. The
//! relay remembers the slot it consumed in `outbox.relay_state`; a slot that existed and then
//! vanished is never silently recreated, because the events committed in between would be
//! skipped.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::GenericClient;

use super::coverage::{self, Coverage};
pub(crate) use super::error::pg;
use super::error::{db_message, PgError};
use crate::config::{Column, Config, SourceMode};
pub(crate) use crate::error::quote_ident;
use crate::error::Definite;

/// The outbox schema, applied by `outbox-relay init`.
pub const OUTBOX_SQL: &str = include_str!("../../sql/outbox.sql");

/// The text in `sql/outbox.sql` that `init` replaces with `source.message_prefix`.
const PREFIX_MARKER: &str = "'outbox' /* message_prefix */";

/// What a logical session starts from.
#[derive(Debug, Clone, Copy)]
pub struct Prepared {
    /// The slot's `confirmed_flush_lsn`: streaming resumes here.
    pub confirmed_flush: u64,
    pub wal_sender_timeout: Duration,
    /// The publication's coverage of the outbox table, verified at start.
    pub coverage: Coverage,
}

/// The outbox table as a quoted SQL name.
pub fn table_sql(cfg: &Config) -> String {
    let (schema, table) = cfg.source.table_parts();
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Applies `sql/outbox.sql` (idempotent) with the configured message prefix.
pub async fn apply_schema(client: &impl GenericClient, cfg: &Config) -> Result<(), PgError> {
    let prefix = cfg.source.message_prefix.replace('\'', "''");
    let sql = OUTBOX_SQL.replace(PREFIX_MARKER, &format!("'{prefix}'"));
    client
        .batch_execute(&sql)
        .await
        .map_err(pg("applying sql/outbox.sql"))
}

/// Checks `wal_level`, makes sure the publication and slot exist (creating them when
/// `source.create` allows), verifies that the publication covers the outbox table, and reads
/// where streaming resumes.
pub async fn prepare_logical(
    client: &impl GenericClient,
    cfg: &Config,
) -> Result<Prepared, PgError> {
    check_wal_level(client).await?;
    ensure_publication(client, cfg).await?;
    let coverage = coverage::verify(client, cfg).await?;
    let confirmed_flush = ensure_slot(client, cfg).await?;
    let timeout_ms: i64 = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(pg("reading wal_sender_timeout"))?
        .get(0);
    Ok(Prepared {
        confirmed_flush,
        wal_sender_timeout: Duration::from_millis(timeout_ms.max(0) as u64),
        coverage,
    })
}

pub async fn check_wal_level(client: &impl GenericClient) -> Result<(), PgError> {
    let level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(pg("reading wal_level"))?
        .get(0);
    if level != "logical" {
        return Err(Definite::WalLevel { level }.into());
    }
    Ok(())
}

/// Creates the publication when it is missing and `source.create` allows. An existing one is
/// never altered here (it may be shared, and is the owner's to change): whether it covers the
/// outbox table is [`coverage::verify`]'s to say, with the statement that fixes it.
async fn ensure_publication(client: &impl GenericClient, cfg: &Config) -> Result<(), PgError> {
    let publication = &cfg.source.publication;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(pg("looking up the publication"))?
        .is_some();
    if exists {
        return Ok(());
    }
    if !cfg.source.create {
        return Err(publication_missing(cfg, true).into());
    }
    // Via the root: inserts into a partitioned outbox's partitions arrive under its name.
    let sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
        quote_ident(publication),
        table_sql(cfg)
    );
    match client.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(publication = %publication, "created publication");
            Ok(())
        }
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Err(Definite::TableMissing {
            table: table_sql(cfg),
        }
        .into()),
        Err(e) => Err(pg("creating the publication")(e)),
    }
}

/// `outbox-relay init`: makes an existing publication cover the outbox table — adds the
/// table, turns on inserts, and for a partitioned table `publish_via_partition_root` — and
/// returns the statements it ran. A row filter or a column list is left alone: someone chose
/// it, and [`coverage::verify`] names the fix. A missing publication is created later, by
/// `prepare_logical`.
pub async fn repair_publication(
    client: &impl GenericClient,
    cfg: &Config,
) -> Result<Vec<String>, PgError> {
    let (_, finding) = coverage::read(client, cfg).await?;
    let (Some(_), Some(publication)) = (finding.relid, &finding.publication) else {
        return Ok(Vec::new());
    };
    let name = quote_ident(&cfg.source.publication);
    let mut statements = Vec::new();
    if !publication.insert {
        let mut publish = vec!["insert"];
        for (what, on) in [
            ("update", publication.update),
            ("delete", publication.delete),
            ("truncate", publication.truncate),
        ] {
            if on {
                publish.push(what);
            }
        }
        statements.push(format!(
            "ALTER PUBLICATION {name} SET (publish = '{}')",
            publish.join(", ")
        ));
    }
    if finding.partitioned && !publication.via_root {
        statements.push(format!(
            "ALTER PUBLICATION {name} SET (publish_via_partition_root = true)"
        ));
    }
    let member = publication.all_tables || publication.membership.is_some();
    if !publication.listed && !member {
        statements.push(format!(
            "ALTER PUBLICATION {name} ADD TABLE {}",
            table_sql(cfg)
        ));
    }
    if statements.is_empty() {
        return Ok(statements);
    }
    let sql = format!("BEGIN; {}; COMMIT", statements.join("; "));
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(pg("making the publication cover the outbox table")(e));
    }
    for statement in &statements {
        tracing::info!(statement = %statement, "altered the publication to cover the outbox table");
    }
    Ok(statements)
}

/// Returns the slot's confirmed position, creating the slot on the very first start.
async fn ensure_slot(client: &impl GenericClient, cfg: &Config) -> Result<u64, PgError> {
    let slot = &cfg.source.slot;
    let row = client
        .query_opt(
            "SELECT plugin, confirmed_flush_lsn::text, database = current_database(), \
                    wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(pg("looking up the replication slot"))?;
    let remembered = remembered_slot(client, slot).await;
    let Some(row) = row else {
        if let Some(position) = remembered {
            return Err(Definite::SlotVanished {
                slot: slot.clone(),
                position,
            }
            .into());
        }
        if !cfg.source.create {
            return Err(Definite::SlotMissing { slot: slot.clone() }.into());
        }
        return create_slot(client, cfg).await;
    };
    let plugin: Option<String> = row.get(0);
    let confirmed: Option<String> = row.get(1);
    let same_database: bool = row.get::<_, Option<bool>>(2).unwrap_or(false);
    if plugin.as_deref() != Some("pgoutput") {
        return Err(Definite::SlotPlugin {
            slot: slot.clone(),
            plugin,
        }
        .into());
    }
    if !same_database {
        return Err(Definite::SlotOtherDatabase { slot: slot.clone() }.into());
    }
    let wal_status: Option<String> = row.get(3);
    match wal_status.as_deref() {
        Some("lost") => return Err(slot_lost(slot, confirmed.as_deref()).into()),
        Some("unreserved") => tracing::warn!(
            slot = %slot,
            "the slot holds more WAL than max_slot_wal_keep_size: it is lost at the next checkpoint unless the relay catches up"
        ),
        _ => {}
    }
    let position = parse_lsn(confirmed.as_deref().unwrap_or("0/0"))?;
    remember_slot(client, slot, position).await;
    Ok(position)
}

/// The definite error for a slot whose WAL is gone (`wal_status = lost`, beyond
/// `max_slot_wal_keep_size`): the server can no longer decode from it, and the events
/// committed after its confirmed position would be skipped by any new slot.
pub fn slot_lost(slot: &str, confirmed: Option<&str>) -> Definite {
    Definite::SlotLost {
        slot: slot.to_owned(),
        confirmed: confirmed.map(str::to_owned),
    }
}

/// The definite error for a missing publication; `create_disabled` when the relay would
/// create it but `source.create` is false.
pub fn publication_missing(cfg: &Config, create_disabled: bool) -> Definite {
    Definite::PublicationMissing {
        publication: cfg.source.publication.clone(),
        quoted: quote_ident(&cfg.source.publication),
        table: table_sql(cfg),
        create_disabled,
    }
}

/// The statement that creates the slot. PostgreSQL 17 and later get `failover = true`:
/// standbys with `sync_replication_slots = on` then keep a copy, so a failover keeps the
/// slot. Earlier servers have no such argument, and a standby cannot create a failover slot.
fn create_slot_sql(server_version_num: i32, in_recovery: bool) -> &'static str {
    if server_version_num >= FAILOVER_SLOTS_VERSION && !in_recovery {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    }
}

/// The first `server_version_num` whose logical slots can fail over (PostgreSQL 17).
pub const FAILOVER_SLOTS_VERSION: i32 = 170_000;

/// `server_version_num` and whether the server is a standby.
pub async fn server_version(client: &impl GenericClient) -> Result<(i32, bool), PgError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(pg("reading the server version"))?;
    Ok((row.get(0), row.get(1)))
}

async fn create_slot(client: &impl GenericClient, cfg: &Config) -> Result<u64, PgError> {
    let slot = &cfg.source.slot;
    let (version, in_recovery) = server_version(client).await?;
    let created = client
        .query_one(create_slot_sql(version, in_recovery), &[slot])
        .await;
    let lsn = match created {
        Ok(row) => parse_lsn(row.get(0))?,
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {
            // Another relay created it between our look-up and now: read its position.
            let row = client
                .query_one(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[slot],
                )
                .await
                .map_err(pg("looking up the replication slot"))?;
            parse_lsn(row.get::<_, Option<&str>>(0).unwrap_or("0/0"))?
        }
        Err(e) => return Err(pg("creating the replication slot")(e)),
    };
    tracing::info!(
        slot = %slot,
        at = %pgwire_replication::Lsn::from_u64(lsn),
        failover = version >= FAILOVER_SLOTS_VERSION && !in_recovery,
        "created replication slot"
    );
    remember_slot(client, slot, lsn).await;
    Ok(lsn)
}

/// The position the relay last recorded for `slot`, if the state table exists and has one.
async fn remembered_slot(client: &impl GenericClient, slot: &str) -> Option<String> {
    client
        .query_opt(
            "SELECT position FROM outbox.relay_state WHERE name = $1 AND kind = 'logical-slot'",
            &[&slot],
        )
        .await
        .ok()
        .flatten()
        .map(|row| row.get(0))
}

/// Records that the relay consumes `slot` (best effort: without the state table, a vanished
/// slot can't be detected, but streaming still works).
async fn remember_slot(client: &impl GenericClient, slot: &str, position: u64) {
    let position = pgwire_replication::Lsn::from_u64(position).to_string();
    let result = client
        .execute(
            "INSERT INTO outbox.relay_state (name, kind, position) VALUES ($1, 'logical-slot', $2) \
             ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
            &[&slot, &position],
        )
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot record the slot in outbox.relay_state");
    }
}

pub(crate) fn parse_lsn(text: &str) -> Result<u64, PgError> {
    pgwire_replication::Lsn::parse(text)
        .map(|l| l.as_u64())
        .map_err(|_| {
            Definite::UnreadableLsn {
                text: text.to_owned(),
            }
            .into()
        })
}

/// Frees `slot` from a holder that is really gone: its walsender has had no reply for
/// `stale_after` (past `wal_sender_timeout`, after which the server would end it itself; a
/// connection that died half-open can keep it longer when the holder set a longer timeout).
/// A live relay answers its server's pings within `wal_sender_timeout`. Without the right to
/// see `pg_stat_replication.reply_time` (NULL without `pg_read_all_stats`) nothing is
/// terminated: the holder's own timeout frees the slot.
pub async fn release_stale_slot(client: &impl GenericClient, slot: &str, stale_after: Duration) {
    let row = client
        .query_opt(
            "SELECT s.active_pid, extract(epoch FROM now() - r.reply_time)::float8 \
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(slot, error = %e, "cannot look at the slot's holder");
            return;
        }
    };
    let (Some(pid), silent) = (row.get::<_, Option<i32>>(0), row.get::<_, Option<f64>>(1)) else {
        return; // the slot is free again
    };
    let Some(silent) = silent else {
        tracing::debug!(
            slot,
            pid,
            "cannot see when the slot's holder last replied (no pg_read_all_stats); waiting for its wal_sender_timeout"
        );
        return;
    };
    if silent < stale_after.as_secs_f64() {
        return;
    }
    match client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
    {
        Ok(_) => tracing::warn!(
            slot,
            pid,
            silent_secs = silent as u64,
            "terminated a walsender holding the slot without replying past wal_sender_timeout (a dead connection)"
        ),
        Err(e) => tracing::warn!(slot, pid, error = %e, "cannot terminate the stale slot holder"),
    }
}

/// The statement-level trigger that wakes a polling relay after every insert into the outbox.
pub const NOTIFY_TRIGGER: &str = "outbox_relay_notify";

/// What a polling session learned about the outbox table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollingTable {
    /// `txid` is `xid8` (`DEFAULT pg_current_xact_id()`); otherwise it is a `bigint` written by
    /// `txid_current()`, the pre-13 spelling of the same 64-bit id.
    pub txid_is_xid8: bool,
    /// The payload is `bytea`: published as the bytes, not as text.
    pub payload_is_bytea: bool,
    /// The insert trigger that sends `NOTIFY outbox_relay` exists.
    pub notify_trigger: bool,
    /// An index leads with the `txid` column, so a poll reads only new rows.
    pub indexed: bool,
}

/// How `prepare_polling` may change the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollingSetup {
    /// `outbox-relay init`: create the trigger and the index, waiting for locks as needed.
    Init,
    /// A relay start with `source.create = true`: create the trigger if it can do so without
    /// holding up the application's writes for long; never build an index.
    Run,
    /// Only look (`check`, `source.create = false`).
    Inspect,
}

/// How long a starting relay may wait for the lock `CREATE TRIGGER` takes (it conflicts with
/// inserts, so writers queue behind it while it waits).
const TRIGGER_LOCK_TIMEOUT: &str = "2s";

/// Checks that the outbox table has every configured column (with usable types for `txid` and
/// `payload`), and creates the notify trigger and the `(txid, seq)` index as `how` allows.
pub async fn prepare_polling(
    client: &impl GenericClient,
    cfg: &Config,
    how: PollingSetup,
) -> Result<PollingTable, PgError> {
    let table = table_sql(cfg);
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table],
        )
        .await
        .map_err(pg("reading the outbox table's columns"))?;
    if rows.is_empty() {
        return Err(Definite::TableMissing { table }.into());
    }
    let column_type = |name: &str| -> Option<String> {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == name)
            .map(|r| r.get::<_, String>(1))
    };
    let cols = &cfg.source.columns;
    let mut txid_type = None;
    let mut payload_type = None;
    for (spec, name) in cols.configured(SourceMode::Polling) {
        let key = spec.key;
        let Some(kind) = column_type(name) else {
            return Err(Definite::ColumnMissing {
                table,
                column: name.to_owned(),
                key,
            }
            .into());
        };
        match spec.column {
            Column::Txid => txid_type = Some(kind),
            Column::Payload => payload_type = Some(kind),
            _ => {}
        }
    }
    let txid_is_xid8 = match txid_type.as_deref() {
        Some("xid8") => true,
        Some("bigint") => false,
        other => {
            return Err(Definite::TxidType {
                table,
                found: other.unwrap_or("(none)").to_owned(),
            }
            .into())
        }
    };
    let txid = quote_ident(cols.txid.as_deref().unwrap_or_default());
    let seq = quote_ident(cols.seq.as_deref().unwrap_or_default());

    let mut notify_trigger = trigger_exists(client, &table).await?;
    if !notify_trigger && how != PollingSetup::Inspect {
        let create = format!(
            "CREATE TRIGGER {NOTIFY_TRIGGER} AFTER INSERT ON {table} \
             FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_relay()"
        );
        let sql = match how {
            PollingSetup::Run => {
                format!(
                    "BEGIN; SET LOCAL lock_timeout = '{TRIGGER_LOCK_TIMEOUT}'; {create}; COMMIT"
                )
            }
            _ => format!("BEGIN; {create}; COMMIT"),
        };
        match client.batch_execute(&sql).await {
            Ok(()) => {
                tracing::info!(table = %table, "created the trigger that wakes the relay on insert");
                notify_trigger = true;
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                if e.code() == Some(&SqlState::DUPLICATE_OBJECT) {
                    notify_trigger = true;
                } else if how == PollingSetup::Init {
                    return Err(pg("creating the notify trigger")(e));
                } else {
                    tracing::warn!(
                        table = %table,
                        error = %db_message(&e),
                        "cannot create the notify trigger; polling every source.poll_interval instead (run `outbox-relay init` in polling mode as the table owner)"
                    );
                }
            }
        }
    }

    let mut indexed =
        txid_index_exists(client, &table, cols.txid.as_deref().unwrap_or_default()).await?;
    if !indexed && how == PollingSetup::Init {
        let (_, name) = cfg.source.table_parts();
        let index = quote_ident(&format!("{name}_relay_poll_idx"));
        client
            .batch_execute(&format!(
                "CREATE INDEX IF NOT EXISTS {index} ON {table} ({txid}, {seq})"
            ))
            .await
            .map_err(pg("creating the (txid, seq) index"))?;
        indexed = true;
    }
    if !indexed && how == PollingSetup::Run {
        tracing::warn!(
            table = %table,
            "no index leads with the txid column: every poll scans the outbox table (run `outbox-relay init` in polling mode, or CREATE INDEX ON the table ({txid}, {seq}))"
        );
    }
    Ok(PollingTable {
        txid_is_xid8,
        payload_is_bytea: payload_type.as_deref() == Some("bytea"),
        notify_trigger,
        indexed,
    })
}

/// Whether the notify trigger exists on `table` (a catalog look-up: takes no table lock).
async fn trigger_exists(client: &impl GenericClient, table: &str) -> Result<bool, PgError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2)",
            &[&table, &NOTIFY_TRIGGER],
        )
        .await
        .map_err(pg("looking up the notify trigger"))?
        .get(0))
}

/// Whether an index on `table` has `txid` as its first column.
async fn txid_index_exists(
    client: &impl GenericClient,
    table: &str,
    txid: &str,
) -> Result<bool, PgError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = to_regclass($1) AND a.attname = $2)",
            &[&table, &txid],
        )
        .await
        .map_err(pg("looking up the outbox table's indexes"))?
        .get(0))
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[test]
    fn slots_fail_over_from_postgres_17_on_a_primary() {
        let failover = "pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)";
        let plain = "pg_create_logical_replication_slot($1, 'pgoutput')";
        assert!(create_slot_sql(150_013, false).contains(plain));
        assert!(create_slot_sql(160_004, false).contains(plain));
        assert!(create_slot_sql(170_000, false).contains(failover));
        assert!(create_slot_sql(180_001, false).contains(failover));
        assert!(
            create_slot_sql(170_002, true).contains(plain),
            "a standby cannot create a failover slot"
        );
    }

    #[test]
    fn a_lost_slot_says_what_was_lost_and_the_way_out() {
        let lost = slot_lost("outbox_relay", Some("0/3000060"));
        let (problem, fix) = (lost.problem(), lost.fix());
        assert!(problem.contains("wal_status = lost"), "{problem}");
        assert!(problem.contains("after 0/3000060"), "{problem}");
        assert!(
            fix.contains("pg_drop_replication_slot('outbox_relay')"),
            "{fix}"
        );
        assert!(fix.contains("DELETE FROM outbox.relay_state WHERE name = 'outbox_relay'"));
    }
}
