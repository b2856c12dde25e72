//! `outbox-relay init`: applies the outbox schema, then creates what the configured source
//! needs (the publication and slot, or the notify trigger and the `(txid, seq)` index).

use crate::config::{Config, SourceMode};
use crate::postgres::pool;
use crate::postgres::setup::{self, PollingSetup};
use crate::relay::RunError;
use crate::source::SourceError;

/// `outbox-relay init`: applies `sql/outbox.sql`, then creates the publication and slot
/// (logical mode) or the notify trigger and the `(txid, seq)` index (polling mode).
pub async fn init(cfg: &Config) -> Result<(), RunError> {
    let pool = pool(cfg)?;
    let client = pool.get().await.map_err(SourceError::pool)?;
    setup::apply_schema(&**client, cfg).await?;
    println!("schema: applied sql/outbox.sql");
    if cfg.source.mode == SourceMode::Polling {
        setup::prepare_polling(&**client, cfg, PollingSetup::Init).await?;
        println!(
            "polling: {} has the notify trigger and the (txid, seq) index (no slot needed)",
            setup::table_sql(cfg)
        );
        return Ok(());
    }
    for statement in setup::repair_publication(&**client, cfg).await? {
        println!(
            "logical: ran {statement}; inserts committed while the table was not covered are \
             not in the replication stream: republish them"
        );
    }
    let mut forced = cfg.clone();
    forced.source.create = true;
    let prepared = setup::prepare_logical(&**client, &forced).await?;
    println!(
        "logical: publication {} and slot {} ready at {}",
        cfg.source.publication,
        cfg.source.slot,
        pgwire_replication::Lsn::from_u64(prepared.confirmed_flush)
    );
    Ok(())
}
