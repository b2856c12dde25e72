//! Polling mode (measurement 7): the relay with `source.mode = "polling"` draining the same
//! backlogs as logical mode (its own cursor, no slot), and following the paced writer at
//! 5,000 events/s with the `NOTIFY` trigger installed; its CPU per event and peak RSS.
//!
//! The table gets what `outbox-relay init` gives a polling outbox: the `(txid, seq)` index
//! (for every drain) and the notify trigger (for the latency run only: a trigger that notifies
//! takes a commit lock that logical mode's writers must not pay).
//!
//! `RELAY_BENCH_POLLING_SOURCE="batch_size=5000,poll_interval=50ms"` adds `[source]` settings
//! to the polling relay, to try one out.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use testkit::{free_port, Relay};

use crate::broker::Broker;
use crate::latency::{from_histograms, paced_write, wait_published, warm_up};
use crate::metrics::{gauge, published};
use crate::observe::append_latencies;
use crate::relay::{extra_kafka_properties, RelayProc};
use crate::report::{Drain, Latency};
use crate::{Env, DB, SCRAPE_EVERY, STALL};

/// The `(txid, seq)` index `outbox-relay init` creates in polling mode.
const INDEX_SQL: &str =
    "CREATE INDEX IF NOT EXISTS events_relay_poll_idx ON outbox.events (txid, seq)";

/// The notify trigger `outbox-relay init` creates in polling mode.
const TRIGGER_SQL: &str =
    "CREATE OR REPLACE TRIGGER outbox_relay_notify AFTER INSERT ON outbox.events \
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_relay()";

const DROP_TRIGGER_SQL: &str = "DROP TRIGGER IF EXISTS outbox_relay_notify ON outbox.events";

/// Forgets the polling cursor, so the next polling relay starts at the outbox's beginning
/// (the backlog of the moment: each is truncated after its runs).
const RESET_CURSOR_SQL: &str =
    "DELETE FROM outbox.relay_state WHERE name = 'polling:outbox.events'";

/// The outbox's last row as a cursor, `txid/seq`.
const LAST_ROW_SQL: &str = "SELECT txid::text || '/' || seq::text FROM outbox.events \
    ORDER BY txid DESC, seq DESC LIMIT 1";

const CURSOR_SQL: &str =
    "SELECT position FROM outbox.relay_state WHERE name = 'polling:outbox.events'";

/// Creates the polling index (once, before the first backlog is written).
pub fn prepare(env: &Env<'_>) -> Result<()> {
    env.pg
        .psql(DB, INDEX_SQL)
        .context("creating the (txid, seq) index")?;
    Ok(())
}

/// The polling relay's config.
fn polling_toml(url: &str, brokers: &str, http_port: u16) -> String {
    let mut source = String::new();
    if let Ok(list) = std::env::var("RELAY_BENCH_POLLING_SOURCE") {
        for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = value.trim();
            if value.parse::<i64>().is_ok() {
                let _ = writeln!(source, "{} = {value}", key.trim());
            } else {
                let _ = writeln!(source, "{} = {value:?}", key.trim());
            }
        }
    }
    format!(
        r#"[postgres]
url = "{url}"

[source]
mode = "polling"
create = true
{source}
[kafka]
brokers = "{brokers}"

[http]
listen = "127.0.0.1:{http_port}"

[log]
level = "info"
"#
    ) + &extra_kafka_properties()
}

fn start_polling_relay(env: &Env<'_>, broker: &dyn Broker) -> Result<RelayProc> {
    env.pg.psql(DB, RESET_CURSOR_SQL)?;
    let dir = tempfile::Builder::new()
        .prefix("relay-bench-polling-")
        .disable_cleanup(std::env::var_os("RELAY_BENCH_KEEP_LOGS").is_some())
        .tempdir()?;
    let http_port = free_port()?;
    let config = polling_toml(env.url, &broker.brokers(), http_port);
    Ok(RelayProc {
        relay: Relay::start_in(dir, &config, &[]),
        http_port,
    })
}

/// Runs the polling relay from its spawn until it has published the `n` events of the
/// outbox and persisted its cursor at the last row.
pub fn drain_polling(env: &Env<'_>, broker: &dyn Broker, n: u64) -> Result<Drain> {
    let end = env
        .pg
        .psql(DB, LAST_ROW_SQL)
        .context("reading the backlog's last row")?
        .trim()
        .to_owned();
    let t0 = Instant::now();
    let mut relay = start_polling_relay(env, broker)?;
    let deadline = t0 + Duration::from_secs(120 + n / 1000);
    let mut first_ack = None;
    let mut progress = (0, Instant::now());
    let acked_secs = loop {
        relay.check_alive()?;
        if Instant::now() >= deadline {
            bail!(
                "the polling relay did not drain {n} events in time:\n{}",
                relay.log_tail()
            );
        }
        std::thread::sleep(SCRAPE_EVERY);
        let metrics = relay.metrics().unwrap_or_default();
        let published = published(&metrics);
        if published > 0 && first_ack.is_none() {
            first_ack = Some((t0.elapsed().as_secs_f64(), published));
        }
        if gauge(&metrics, "outbox_relay_source_reconnects_total").unwrap_or(0.0) > 0.0 {
            let warnings = relay.warnings();
            relay.stop();
            bail!("the polling relay reconnected mid-drain ({published} of {n}):\n{warnings}");
        }
        if published > progress.0 {
            progress = (published, Instant::now());
        } else if progress.1.elapsed() > STALL {
            let warnings = relay.warnings();
            relay.stop();
            bail!("the polling relay published nothing for {STALL:?} ({published} of {n}):\n{warnings}");
        }
        if published >= n {
            break t0.elapsed().as_secs_f64();
        }
    };
    loop {
        if env.pg.psql(DB, CURSOR_SQL)?.trim() == end {
            break;
        }
        if t0.elapsed().as_secs_f64() > acked_secs + STALL.as_secs_f64() {
            let warnings = relay.warnings();
            relay.stop();
            bail!("the cursor did not reach {end} within {STALL:?} of the last ack:\n{warnings}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t0.elapsed().as_secs_f64();
    // The relay installed the trigger (`create = true`): logical mode's writers must not pay it.
    env.pg.psql(DB, DROP_TRIGGER_SQL)?;
    let (first_ack_secs, first_ack_published) = first_ack.unwrap_or((acked_secs, n));
    let drain = Drain {
        events: n,
        secs,
        acked_secs,
        first_ack_secs,
        first_ack_published,
        cpu_secs: relay.cpu_secs(env.clk_tck),
        peak_rss_kb: relay.peak_rss_kb(),
        host_cores: f64::NAN,
        other_cores: f64::NAN,
    };
    relay.stop();
    Ok(drain)
}

/// The polling relay following the paced writer at `rate` events/s (one per transaction)
/// for `secs` s after [`WARM_UP_SECS`] of warm-up, woken by the notify trigger: its own
/// commit-to-ack histogram, and commit-to-append seen in the broker.
pub fn polling_latency(
    env: &Env<'_>,
    broker: &dyn Broker,
    rate: u64,
    secs: u64,
) -> Result<Latency> {
    env.pg
        .psql(DB, TRIGGER_SQL)
        .context("creating the notify trigger")?;
    let result = paced_run(env, broker, rate, secs);
    env.pg.psql(DB, DROP_TRIGGER_SQL)?;
    env.pg.psql(DB, "TRUNCATE outbox.events")?;
    result
}

fn paced_run(env: &Env<'_>, broker: &dyn Broker, rate: u64, secs: u64) -> Result<Latency> {
    let mut relay = start_polling_relay(env, broker)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Leading once `/readyz` says so.
    while !testkit::http_get(relay.http_port, "/readyz").is_ok_and(|(status, _)| status == 200) {
        relay.check_alive()?;
        if Instant::now() >= deadline {
            bail!(
                "the polling relay did not start leading:\n{}",
                relay.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (warm, before) = warm_up(env, &mut relay, rate)?;
    let cpu_before = relay.cpu_secs(env.clk_tck);
    let count = rate * secs;
    let writer = env
        .rt
        .block_on(paced_write(env.url.to_owned(), rate, count, warm))
        .context("paced writer")?;
    wait_published(&mut relay, warm + count)?;
    let cpu = relay.cpu_secs(env.clk_tck) - cpu_before;
    let after = relay.metrics().ok_or_else(|| anyhow!("no /metrics"))?;
    let peak_rss_kb = relay.peak_rss_kb();
    relay.stop();
    let appended = append_latencies(&broker.brokers(), warm, &writer.commits_us)
        .context("reading the polling relay's records back")?;
    let mut latency = from_histograms(&before, &after, count, &writer)?;
    latency.cpu_us_per_event = cpu * 1e6 / count as f64;
    latency.peak_rss_kb = peak_rss_kb;
    latency.appended = Some(appended);
    Ok(latency)
}
