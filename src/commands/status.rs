//! `outbox-relay status`: where the slot stands (position, lag, retained WAL, holder), or in
//! polling mode the cursor, the pending rows and the leader's session; printed as JSON.

use crate::config::{Config, SourceMode};
use crate::postgres::pool;
use crate::postgres::setup::{self, PollingSetup};
use crate::relay::RunError;
use crate::source::{leader, polling, SourceError};

/// `outbox-relay status`: the slot's position, lag, retained WAL and holder (polling mode:
/// the cursor, pending rows and the leader's session).
pub async fn status(cfg: &Config) -> Result<(), RunError> {
    let pool = pool(cfg)?;
    let client = pool.get().await.map_err(SourceError::pool)?;
    if cfg.source.mode == SourceMode::Polling {
        return polling_status(&**client, cfg).await;
    }
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, active, active_pid, \
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, \
                    (pg_current_wal_lsn() - restart_lsn)::bigint, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await
        .map_err(|source| SourceError::Postgres {
            context: "reading the slot",
            source,
        })?;
    let Some(row) = row else {
        println!(
            "slot {}: does not exist (run `outbox-relay init`)",
            cfg.source.slot
        );
        return Ok(());
    };
    let report = serde_json::json!({
        "slot": cfg.source.slot,
        "confirmed_flush_lsn": row.get::<_, Option<String>>(0),
        "leader_connected": row.get::<_, bool>(1),
        "leader_pid": row.get::<_, Option<i32>>(2),
        "replication_lag_bytes": row.get::<_, Option<i64>>(3),
        "retained_wal_bytes": row.get::<_, Option<i64>>(4),
        "wal_status": row.get::<_, Option<String>>(5),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(())
}

async fn polling_status(
    client: &impl tokio_postgres::GenericClient,
    cfg: &Config,
) -> Result<(), RunError> {
    let name = polling::state_name(cfg);
    let row = client
        .query_opt(
            "SELECT position, updated_at::text FROM outbox.relay_state \
             WHERE name = $1 AND kind = 'polling-cursor'",
            &[&name],
        )
        .await
        .map_err(setup::pg("reading the polling cursor"))?;
    let Some(row) = row else {
        println!("polling cursor {name}: none yet (the first relay starts at the beginning of the outbox)");
        return Ok(());
    };
    let position: String = row.get(0);
    let cursor = polling::Cursor::parse(&position).unwrap_or_default();
    let key = leader::lock_key(&cfg.source.table);
    let leader_pid: Option<i32> = client
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
               AND classid = $1 AND objid = $2 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&((key >> 32) as u32), &(key as u32)],
        )
        .await
        .map_err(setup::pg("looking up the leader"))?
        .map(|r| r.get(0));
    let found = setup::prepare_polling(client, cfg, PollingSetup::Inspect).await?;
    let cursor_txid = if found.txid_is_xid8 {
        "$1::bigint::text::xid8"
    } else {
        "$1::bigint"
    };
    let txid = setup::quote_ident(cfg.source.columns.txid.as_deref().unwrap_or_default());
    let seq = setup::quote_ident(cfg.source.columns.seq.as_deref().unwrap_or_default());
    let pending: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE ({txid}, {seq}) > ({cursor_txid}, $2::bigint)",
                setup::table_sql(cfg)
            ),
            &[&cursor.txid, &cursor.seq],
        )
        .await
        .map_err(setup::pg("counting pending rows"))?
        .get(0);
    let report = serde_json::json!({
        "cursor": position,
        "cursor_updated_at": row.get::<_, Option<String>>(1),
        "pending_events": pending,
        "leader_connected": leader_pid.is_some(),
        "leader_pid": leader_pid,
        "notify_trigger": found.notify_trigger,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(())
}
