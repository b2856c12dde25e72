//! Relay throughput on a backlog (measurement 3): the slots every backlog gets (created before
//! it is written, so that all see the same WAL), writing the backlog server side, and the
//! relay's drain of it.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::broker::Broker;
use crate::exactly_once::Delivery;
use crate::metrics::{gauge, published};
use crate::procfs::CpuSnapshot;
use crate::relay::RelayProc;
use crate::report::Drain;
use crate::{Env, DB, SCRAPE_EVERY, STALL};

pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// An LSN as a number, from SQL.
pub async fn query_lsn(db: &tokio_postgres::Client, sql: &str, slot: &str) -> Result<Option<u64>> {
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if sql.contains("$1") {
        vec![&slot]
    } else {
        vec![]
    };
    let row = db.query_opt(sql, &params).await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .map(|v| v as u64))
}

pub const SLOT_CONFIRMED: &str = "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint \
    FROM pg_replication_slots WHERE slot_name = $1";

/// The slots of one backlog, created before it is written so that all see the same WAL.
pub struct Slots {
    /// Two null consumers: one before the relay's drain, one after.
    pub null: [String; 2],
    /// `pg_recvlogical` into `/dev/null`.
    pub recvlogical: String,
    pub relay: String,
    /// The `pg_recvlogical` + Python peer's (wal2json).
    pub peer: Option<String>,
    /// Debezium's (pgoutput).
    pub debezium: Option<String>,
    /// The relay in exactly-once mode.
    pub eos: Option<String>,
}

impl Slots {
    pub fn create(
        env: &Env<'_>,
        tag: &str,
        with_peer: bool,
        with_debezium: bool,
        with_eos: bool,
    ) -> Result<Slots> {
        let slots = Slots {
            null: [format!("bench_null_{tag}"), format!("bench_null2_{tag}")],
            recvlogical: format!("bench_recvlogical_{tag}"),
            relay: format!("bench_relay_{tag}"),
            peer: with_peer.then(|| format!("bench_peer_{tag}")),
            debezium: with_debezium.then(|| format!("bench_debezium_{tag}")),
            eos: with_eos.then(|| format!("bench_eos_{tag}")),
        };
        let mut sql = String::new();
        for slot in slots
            .null
            .iter()
            .chain([&slots.recvlogical, &slots.relay])
            .chain(slots.debezium.as_ref())
            .chain(slots.eos.as_ref())
        {
            let _ = writeln!(
                sql,
                "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"
            );
        }
        if let Some(peer) = &slots.peer {
            let _ = writeln!(
                sql,
                "SELECT pg_create_logical_replication_slot('{peer}', 'wal2json');"
            );
        }
        env.pg.psql(DB, &sql).context("creating slots")?;
        Ok(slots)
    }

    pub fn drop_all(&self, env: &Env<'_>) -> Result<()> {
        for slot in self
            .null
            .iter()
            .chain([&self.recvlogical, &self.relay])
            .chain(self.peer.as_ref())
            .chain(self.debezium.as_ref())
            .chain(self.eos.as_ref())
        {
            drop_slot(env, slot)?;
        }
        Ok(())
    }
}

/// Drops a slot, waiting for (and then ending) a walsender still holding it.
pub fn drop_slot(env: &Env<'_>, slot: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sql = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = '{slot}' AND NOT active"
        );
        env.pg.psql(DB, &sql)?;
        let left = env.pg.psql(
            DB,
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )?;
        if left.trim() == "0" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            env.pg.psql(
                DB,
                &format!(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE slot_name = '{slot}' AND active"
                ),
            )?;
            if Instant::now() >= deadline + Duration::from_secs(10) {
                bail!("slot {slot} is still in use");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `n` events, `per_tx` per transaction, server side. Returns the time it took and the
/// WAL insert position after the last commit, once that position is flushed (decoding only
/// sends flushed WAL).
pub fn write_backlog(env: &Env<'_>, n: u64, per_tx: u64) -> Result<(f64, u64)> {
    let start = Instant::now();
    // Asynchronous commit: the backlog is written fast and flushed below.
    env.pg
        .psql(
            DB,
            &format!("SET synchronous_commit = off;\nCALL bench.fill({n}, {per_tx});"),
        )
        .context("writing the backlog")?;
    let secs = start.elapsed().as_secs_f64();
    env.rt.block_on(async {
        let end = query_lsn(
            env.db,
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint",
            "",
        )
        .await?
        .ok_or_else(|| anyhow!("no insert LSN"))?;
        loop {
            let flushed = query_lsn(
                env.db,
                "SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0')::bigint",
                "",
            )
            .await?
            .unwrap_or(0);
            if flushed >= end {
                return Ok((secs, end));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Runs the relay on `slot` from its spawn until it has published `n` events and the slot is
/// confirmed at or past `end` (with exactly once: the last transaction committed).
pub fn drain_relay(
    env: &Env<'_>,
    broker: &dyn Broker,
    slot: &str,
    n: u64,
    end: u64,
    delivery: Delivery,
) -> Result<Drain> {
    let t0 = Instant::now();
    let mut relay = RelayProc::start(env, broker, slot, delivery)?;
    let own = [std::process::id(), relay.id(), broker.pid()];
    let cpu0 = CpuSnapshot::take(&own, env.postmaster);
    let deadline = t0 + Duration::from_secs(120 + n / 1000);
    let mut acked_secs = None;
    let mut first_ack_secs = None;
    let mut first_ack_published = 0;
    // Progress: (published, when it last grew).
    let mut progress = (0, Instant::now());
    let trace = std::env::var_os("RELAY_BENCH_TRACE").is_some();
    loop {
        relay.check_alive()?;
        if Instant::now() >= deadline {
            bail!(
                "the relay did not drain {n} events in time:\n{}",
                relay.log_tail()
            );
        }
        match acked_secs {
            None => {
                std::thread::sleep(SCRAPE_EVERY);
                let metrics = relay.metrics();
                let published = metrics.as_deref().map_or(0, published);
                if trace {
                    let m = metrics.as_deref().unwrap_or("");
                    eprintln!(
                        "[bench]     {:>7.3} s: {published} published, {} in flight, {} queued, lag {} bytes",
                        t0.elapsed().as_secs_f64(),
                        gauge(m, "outbox_relay_inflight_events").unwrap_or(f64::NAN),
                        gauge(m, "outbox_relay_producer_queue_depth").unwrap_or(f64::NAN),
                        gauge(m, "outbox_relay_replication_lag_bytes").unwrap_or(f64::NAN),
                    );
                }
                if published > 0 && first_ack_secs.is_none() {
                    first_ack_secs = Some(t0.elapsed().as_secs_f64());
                    first_ack_published = published;
                }
                // A reconnect is a fault: the drain would resend and its numbers mean nothing.
                let reconnects = metrics
                    .as_deref()
                    .and_then(|m| gauge(m, "outbox_relay_source_reconnects_total"))
                    .unwrap_or(0.0);
                if reconnects > 0.0 {
                    let warnings = relay.warnings();
                    relay.stop();
                    bail!(
                        "the relay's source reconnected mid-drain ({published} of {n} published); its warnings:\n{warnings}"
                    );
                }
                if published > progress.0 {
                    progress = (published, Instant::now());
                } else if progress.1.elapsed() > STALL {
                    let warnings = relay.warnings();
                    relay.stop();
                    bail!(
                        "the relay published nothing for {STALL:?} ({published} of {n}); its warnings:\n{warnings}"
                    );
                }
                if published >= n {
                    acked_secs = Some(t0.elapsed().as_secs_f64());
                }
            }
            Some(acked_secs) => {
                let confirmed = env.rt.block_on(query_lsn(env.db, SLOT_CONFIRMED, slot))?;
                if confirmed.unwrap_or(0) >= end {
                    let secs = t0.elapsed().as_secs_f64();
                    let drain = Drain {
                        events: n,
                        secs,
                        acked_secs,
                        first_ack_secs: first_ack_secs.unwrap_or(acked_secs),
                        first_ack_published,
                        cpu_secs: relay.cpu_secs(env.clk_tck),
                        peak_rss_kb: relay.peak_rss_kb(),
                        host_cores: 0.0,
                        other_cores: 0.0,
                    };
                    let (host_cores, other_cores) =
                        CpuSnapshot::take(&own, env.postmaster).since(&cpu0);
                    let drain = Drain {
                        host_cores,
                        other_cores,
                        ..drain
                    };
                    relay.stop();
                    return Ok(drain);
                }
                if t0.elapsed().as_secs_f64() > acked_secs + STALL.as_secs_f64() {
                    let warnings = relay.warnings();
                    relay.stop();
                    bail!(
                        "the slot was not confirmed past the backlog within {STALL:?} of the last ack; the relay's warnings:\n{warnings}"
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
