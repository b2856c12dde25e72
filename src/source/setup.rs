//! Database objects the relay needs: the outbox schema (`init`), the publication and the
//! replication slot, and the checks that turn a misconfigured database into one clear error.
//!
//! "Already exists" is success everywhere, so `init` and every start are idempotent. The
//! relay remembers the slot it consumed in `outbox.relay_state`; a slot that existed and then
//! vanished is never silently recreated, because the events committed in between would be
//! skipped.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::GenericClient;

use super::SourceError;
use crate::config::Config;

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
}

fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |source| {
        if source.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            SourceError::Definite {
                problem: format!("permission denied while {context}: {}", db_message(&source)),
                fix: "grant the relay's role the privileges in sql/roles.sql (or run `outbox-relay init` as the table owner)".into(),
            }
        } else {
            SourceError::Postgres { context, source }
        }
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |db| db.message().to_owned())
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The outbox table as a quoted SQL name.
pub fn table_sql(cfg: &Config) -> String {
    let (schema, table) = cfg.source.table_parts();
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Applies `sql/outbox.sql` (idempotent) with the configured message prefix.
pub async fn apply_schema(client: &impl GenericClient, cfg: &Config) -> Result<(), SourceError> {
    let prefix = cfg.source.message_prefix.replace('\'', "''");
    let sql = OUTBOX_SQL.replace(PREFIX_MARKER, &format!("'{prefix}'"));
    client
        .batch_execute(&sql)
        .await
        .map_err(pg("applying sql/outbox.sql"))
}

/// Checks `wal_level`, makes sure the publication and slot exist (creating them when
/// `source.create` allows), and reads where streaming resumes.
pub async fn prepare_logical(
    client: &impl GenericClient,
    cfg: &Config,
) -> Result<Prepared, SourceError> {
    check_wal_level(client).await?;
    ensure_publication(client, cfg).await?;
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
    })
}

pub async fn check_wal_level(client: &impl GenericClient) -> Result<(), SourceError> {
    let level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(pg("reading wal_level"))?
        .get(0);
    if level != "logical" {
        return Err(SourceError::Definite {
            problem: format!("wal_level is {level:?}, logical replication needs \"logical\""),
            fix: "set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart Postgres, or use source.mode = \"polling\"".into(),
        });
    }
    Ok(())
}

async fn ensure_publication(client: &impl GenericClient, cfg: &Config) -> Result<(), SourceError> {
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
        return Err(SourceError::Definite {
            problem: format!("publication {publication} does not exist and source.create is false"),
            fix: format!(
                "run `outbox-relay init`, or CREATE PUBLICATION {} FOR TABLE {} as the table owner",
                quote_ident(publication),
                table_sql(cfg)
            ),
        });
    }
    let sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {}",
        quote_ident(publication),
        table_sql(cfg)
    );
    match client.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(publication = %publication, "created publication");
            Ok(())
        }
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Err(SourceError::Definite {
            problem: format!("the outbox table {} does not exist", table_sql(cfg)),
            fix: "run `outbox-relay init` (it applies sql/outbox.sql) or set source.table".into(),
        }),
        Err(e) => Err(pg("creating the publication")(e)),
    }
}

/// Returns the slot's confirmed position, creating the slot on the very first start.
async fn ensure_slot(client: &impl GenericClient, cfg: &Config) -> Result<u64, SourceError> {
    let slot = &cfg.source.slot;
    let row = client
        .query_opt(
            "SELECT plugin, confirmed_flush_lsn::text, database = current_database() \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(pg("looking up the replication slot"))?;
    let remembered = remembered_slot(client, slot).await;
    let Some(row) = row else {
        if let Some(position) = remembered {
            return Err(SourceError::Definite {
                problem: format!(
                    "replication slot {slot} was consumed up to {position} and no longer exists \
                     (dropped by hand, or lost in a failover); recreating it would skip every \
                     event committed since"
                ),
                fix: format!(
                    "republish what may be missing (outbox rows committed after {position}), then \
                     DELETE FROM outbox.relay_state WHERE name = '{slot}' so the relay may create a new slot"
                ),
            });
        }
        if !cfg.source.create {
            return Err(SourceError::Definite {
                problem: format!(
                    "replication slot {slot} does not exist and source.create is false"
                ),
                fix: "run `outbox-relay init`, or set source.create = true".into(),
            });
        }
        return create_slot(client, cfg).await;
    };
    let plugin: Option<String> = row.get(0);
    let confirmed: Option<String> = row.get(1);
    let same_database: bool = row.get::<_, Option<bool>>(2).unwrap_or(false);
    if plugin.as_deref() != Some("pgoutput") {
        return Err(SourceError::Definite {
            problem: format!(
                "replication slot {slot} uses plugin {} instead of pgoutput",
                plugin.as_deref().unwrap_or("(none: a physical slot)")
            ),
            fix: "choose another source.slot, or drop that slot if nothing else uses it".into(),
        });
    }
    if !same_database {
        return Err(SourceError::Definite {
            problem: format!("replication slot {slot} belongs to another database"),
            fix: "choose another source.slot for this database".into(),
        });
    }
    let position = parse_lsn(confirmed.as_deref().unwrap_or("0/0"))?;
    remember_slot(client, slot, position).await;
    Ok(position)
}

async fn create_slot(client: &impl GenericClient, cfg: &Config) -> Result<u64, SourceError> {
    let slot = &cfg.source.slot;
    let created = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
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
    tracing::info!(slot = %slot, at = %pgwire_replication::Lsn::from_u64(lsn), "created replication slot");
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

fn parse_lsn(text: &str) -> Result<u64, SourceError> {
    pgwire_replication::Lsn::parse(text)
        .map(|l| l.as_u64())
        .map_err(|_| SourceError::Definite {
            problem: format!("postgres reported an unreadable LSN {text:?}"),
            fix: "report this as a bug".into(),
        })
}

/// Frees `slot` from a holder that stopped replying (a connection that died half-open keeps
/// its walsender, and the slot, until `wal_sender_timeout`). A live relay replies every
/// second, so one silent for `stale_after` is dead; its walsender is terminated.
pub async fn release_stale_slot(client: &impl GenericClient, slot: &str, stale_after: Duration) {
    let row = client
        .query_opt(
            "SELECT r.pid, extract(epoch FROM now() - coalesce(r.reply_time, r.backend_start))::float8 \
             FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await;
    let Ok(Some(row)) = row else {
        return;
    };
    let pid: i32 = row.get(0);
    let silent: f64 = row.get(1);
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
            "terminated a walsender holding the slot without replying (a dead connection)"
        ),
        Err(e) => tracing::warn!(slot, pid, error = %e, "cannot terminate the stale slot holder"),
    }
}
