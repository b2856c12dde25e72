//! Latency (measurement 4): commit to Kafka ack at a steady paced rate, one event per
//! transaction, from the relay's own histogram; and its floor, a null consumer following the
//! same writer.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use outbox_relay::config::Config;
use outbox_relay::source::logical::replication_config;
use outbox_relay::source::pgoutput::{self, Message};
use pgwire_replication::{ReplicationClient, ReplicationEvent};

use crate::backlog::{connect, drop_slot};
use crate::broker::Broker;
use crate::exactly_once::{Delivery, VisibleFollower};
use crate::metrics::{bucket_quantile, gauge, histogram, histogram_sum_count, published};
use crate::observe::append_latencies;
use crate::procfs::{own_cpu_secs, proc_cpu_ticks, unix_micros, CpuSnapshot, HostCpu};
use crate::relay::{relay_toml, RelayProc};
use crate::report::{Floor, Latency};
use crate::{
    event_fields, Env, Opts, CONFIRM_EVERY, DB, SCRAPE_EVERY, WARM_UP_SECS, WRITER_CONNECTIONS,
};

/// One paced event, one transaction (autocommit); the values are formatted client side, as
/// an application would, by [`event_fields`].
pub const INSERT_ONE: &str = "INSERT INTO outbox.events \
    (aggregate_type, aggregate_id, event_type, payload, headers) \
    VALUES ('order', $1::text, 'OrderPlaced', $2::text::jsonb, $3::text::jsonb)";

/// The latency floor: a null consumer following the paced writer on its own slot, the time
/// from each transaction's commit timestamp to its `Commit` decoded here.
pub fn latency_floor(env: &Env<'_>, opts: &Opts) -> Result<Floor> {
    let slot = "bench_null_latency";
    env.pg.psql(
        DB,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    )?;
    let rate = opts.latency_rate;
    let warm = rate * WARM_UP_SECS;
    let count = rate * opts.latency_secs;
    let mut latencies = env.rt.block_on(async {
        let follower = tokio::spawn(null_follow(
            env.url.to_owned(),
            slot.to_owned(),
            warm + count,
        ));
        paced_write(env.url.to_owned(), rate, warm + count, 0)
            .await
            .context("paced writer")?;
        follower.await.context("null consumer panicked")?
    })?;
    drop_slot(env, slot)?;
    env.pg.psql(DB, "TRUNCATE outbox.events")?;
    let measured = latencies.split_off((warm as usize).min(latencies.len()));
    Ok(Floor::from_samples(measured))
}

/// Follows `slot` like [`null_consume`] until `n` inserts, returning each transaction's
/// commit-to-decoded latency in ms (one entry per insert).
pub async fn null_follow(url: String, slot: String, n: u64) -> Result<Vec<f64>> {
    /// Seconds from the Unix epoch to the PostgreSQL epoch (2000-01-01).
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    let toml = relay_toml(&url, &slot, "127.0.0.1:9", 9);
    let cfg = Config::from_parts(Some(&toml), Vec::<(String, String)>::new())
        .map_err(|e| anyhow!("bench config: {e}"))?;
    let repl = replication_config(&cfg)
        .map_err(|e| anyhow!("replication config: {e}"))?
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1));
    let mut stream = ReplicationClient::connect(repl).await?;
    stream.wait_started().await?;
    let mut latencies = Vec::with_capacity(n as usize);
    let mut inserts_in_tx = 0usize;
    let mut last_confirm = Instant::now();
    while (latencies.len() as u64) < n {
        let event = stream
            .recv()
            .await?
            .ok_or_else(|| anyhow!("the replication stream ended"))?;
        match event {
            ReplicationEvent::XLogData { data, .. } => {
                let message =
                    pgoutput::decode(&data).map_err(|e| anyhow!("pgoutput decode: {e:?}"))?;
                if let Message::Insert { new, .. } = message {
                    std::hint::black_box(new.iter().count());
                    inserts_in_tx += 1;
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                let now = unix_micros();
                let ms = (now - (commit_time_micros + PG_EPOCH_UNIX_MICROS)) as f64 / 1e3;
                latencies.extend(std::iter::repeat_n(ms, inserts_in_tx));
                inserts_in_tx = 0;
                if last_confirm.elapsed() >= CONFIRM_EVERY {
                    stream.update_applied_lsn(end_lsn);
                    last_confirm = Instant::now();
                }
            }
            _ => {}
        }
    }
    let _ = stream.shutdown().await;
    Ok(latencies)
}

/// The relay at `rate` events/s for `secs` s (after [`WARM_UP_SECS`] of warm-up) on a broker whose topic
/// has `LogAppendTime`: its own histogram, and commit-to-append seen in the broker. With exactly
/// once also commit to visible to a `read_committed` consumer ([`VisibleFollower`]).
pub fn latency_run(
    env: &Env<'_>,
    broker: &dyn Broker,
    rate: u64,
    secs: u64,
    delivery: Delivery,
) -> Result<Latency> {
    let slot = format!("bench_relay_latency_{rate}");
    let slot = slot.as_str();
    env.pg.psql(
        DB,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    )?;
    let mut relay = RelayProc::start(env, broker, slot, delivery)?;
    // Streaming once the relay holds its slot.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        relay.check_alive()?;
        let active = env.pg.psql(
            DB,
            &format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"
            ),
        )?;
        if active.trim() == "1" && relay.metrics().is_some() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("the relay did not start streaming:\n{}", relay.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (warm, before) = warm_up(env, &mut relay, rate)?;
    let cpu_before = relay.cpu_secs(env.clk_tck);
    let count = rate * secs;
    let follower = match delivery {
        Delivery::ExactlyOnce => Some(VisibleFollower::start(&broker.brokers(), warm, count)?),
        Delivery::AtLeastOnce => None,
    };
    let host_before = HostCpu::sample();
    let others_before = OthersCpu::take(env, broker);
    let writer = env
        .rt
        .spawn(paced_write(env.url.to_owned(), rate, count, warm));
    // Once a second: what the relay published and the mean latency of that second.
    let mut last = (
        Instant::now(),
        published(&before),
        histogram_sum_count(&before),
    );
    while !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        if last.0.elapsed() < Duration::from_secs(1) {
            continue;
        }
        relay.check_alive()?;
        if let Some(m) = relay.metrics() {
            let now = (Instant::now(), published(&m), histogram_sum_count(&m));
            let (sum, cnt) = (now.2 .0 - last.2 .0, now.2 .1 - last.2 .1);
            eprintln!(
                "[bench]   {:>6.0} published/s, mean latency {:>8.2} ms, lag {} bytes, {} in flight",
                (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64(),
                if cnt > 0.0 { sum / cnt * 1e3 } else { f64::NAN },
                gauge(&m, "outbox_relay_replication_lag_bytes").unwrap_or(f64::NAN),
                gauge(&m, "outbox_relay_inflight_events").unwrap_or(f64::NAN),
            );
            last = now;
        }
    }
    let writer = env
        .rt
        .block_on(writer)
        .context("paced writer panicked")?
        .context("paced writer")?;
    let host_cores = HostCpu::sample().cores_since(&host_before);
    let others = OthersCpu::take(env, broker).since(&others_before);
    wait_published(&mut relay, warm + count)?;
    // Before the relay stops: its last transaction commits on its own, not at the SIGTERM.
    let visible = follower.map(|f| f.finish(&writer.commits_us)).transpose()?;
    let cpu = relay.cpu_secs(env.clk_tck) - cpu_before;
    let after = relay.metrics().ok_or_else(|| anyhow!("no /metrics"))?;
    let peak_rss_kb = relay.peak_rss_kb();
    relay.stop();
    drop_slot(env, slot)?;
    env.pg.psql(DB, "TRUNCATE outbox.events")?;
    let appended = append_latencies(&broker.brokers(), warm, &writer.commits_us)
        .context("reading the relay's records back")?;

    let mut latency = from_histograms(&before, &after, count, &writer)?;
    latency.cpu_us_per_event = cpu * 1e6 / count as f64;
    latency.peak_rss_kb = peak_rss_kb;
    latency.appended = Some(appended);
    latency.host_cores = host_cores;
    latency.broker_cpu_us_per_event = others.broker * 1e6 / count as f64;
    latency.postgres_cpu_us_per_event = others.postgres * 1e6 / count as f64;
    latency.writer_cpu_us_per_event = others.writer * 1e6 / count as f64;
    latency.visible = visible;
    Ok(latency)
}

/// The relay's commit-to-ack quantiles over `count` paced events, from its histogram scraped
/// `before` and `after` them (bucket-interpolated like Prometheus' `histogram_quantile`), with
/// the writer's figures; CPU, memory and the per-record measurements are the caller's to add.
pub fn from_histograms(
    before: &str,
    after: &str,
    count: u64,
    writer: &WriterStats,
) -> Result<Latency> {
    let name = "outbox_relay_end_to_end_latency_seconds";
    let h0 = histogram(before, name);
    let diff: Vec<(f64, f64)> = histogram(after, name)
        .iter()
        .map(|&(le, c1)| {
            let c0 = h0.iter().find(|(l, _)| *l == le).map_or(0.0, |&(_, c)| c);
            (le, c1 - c0)
        })
        .collect();
    let total = diff.last().map_or(0.0, |&(_, c)| c);
    if total < count as f64 {
        bail!("the latency histogram counted {total} of {count} events");
    }
    let max_bucket = diff
        .iter()
        .find(|&&(_, c)| c >= total)
        .map_or(f64::INFINITY, |&(le, _)| le);
    Ok(Latency {
        events: count,
        achieved_rate: count as f64 / writer.secs,
        p50_ms: bucket_quantile(0.5, &diff) * 1e3,
        p99_ms: bucket_quantile(0.99, &diff) * 1e3,
        max_bucket_ms: max_bucket * 1e3,
        writer_p99_ms: writer.commit_p99_ms,
        writer_max_late_ms: writer.max_late_ms,
        cpu_us_per_event: 0.0,
        peak_rss_kb: 0,
        floor: None,
        broker_floor: None,
        round_trip_floor: None,
        host_cores: f64::NAN,
        broker_cpu_us_per_event: f64::NAN,
        postgres_cpu_us_per_event: f64::NAN,
        writer_cpu_us_per_event: f64::NAN,
        appended: None,
        visible: None,
    })
}

/// Paced writing for [`WARM_UP_SECS`] (topic metadata, connections, a fresh broker's JIT), not
/// measured: returns the events written and the relay's `/metrics` after it published them.
pub fn warm_up(env: &Env<'_>, relay: &mut RelayProc, rate: u64) -> Result<(u64, String)> {
    let warm = rate * WARM_UP_SECS;
    env.rt
        .block_on(paced_write(env.url.to_owned(), rate, warm, 0))
        .context("warm-up writer")?;
    wait_published(relay, warm)?;
    let before = relay.metrics().ok_or_else(|| anyhow!("no /metrics"))?;
    Ok((warm, before))
}

pub fn wait_published(relay: &mut RelayProc, n: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        relay.check_alive()?;
        if relay.metrics().is_some_and(|m| published(&m) >= n) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the relay did not publish {n} events:\n{}",
                relay.log_tail()
            );
        }
        std::thread::sleep(SCRAPE_EVERY);
    }
}

/// CPU seconds so far of the broker, the Postgres cluster and the bench process (the writer).
struct OthersCpu {
    broker: f64,
    postgres: f64,
    writer: f64,
}

impl OthersCpu {
    fn take(env: &Env<'_>, broker: &dyn Broker) -> OthersCpu {
        let ticks = |pid| proc_cpu_ticks(pid).map_or(f64::NAN, |t| t as f64 / env.clk_tck);
        let cluster: u64 = CpuSnapshot::take(&[], env.postmaster).own.values().sum();
        OthersCpu {
            broker: ticks(broker.pid()),
            postgres: cluster as f64 / env.clk_tck,
            writer: own_cpu_secs(),
        }
    }

    fn since(&self, earlier: &OthersCpu) -> OthersCpu {
        OthersCpu {
            broker: self.broker - earlier.broker,
            postgres: self.postgres - earlier.postgres,
            writer: self.writer - earlier.writer,
        }
    }
}

pub struct WriterStats {
    pub secs: f64,
    pub commit_p99_ms: f64,
    pub max_late_ms: f64,
    /// When each event's commit returned to the writer (Unix µs), by event.
    pub commits_us: Vec<i64>,
}

/// Connections the paced writer uses at `rate`: [`WRITER_CONNECTIONS`], and one more for each
/// 2,500 events/s beyond 10,000 (one connection's round trips cap its rate).
pub fn writer_connections(rate: u64) -> u64 {
    WRITER_CONNECTIONS.max(rate / 2_500)
}

/// Autocommit INSERTs one writer connection may have sent and not yet seen return: it does
/// not wait a round trip (and the commit's WAL write) before sending the next due event, so
/// one connection holds thousands of one-event transactions per second.
const WRITER_PIPELINE: usize = 32;

/// `count` events at `rate` per second, one per transaction, spread round-robin over
/// [`writer_connections`] connections, each pipelining up to [`WRITER_PIPELINE`] INSERTs;
/// event `e` is due at `start + e / rate` (a late connection catches up).
pub async fn paced_write(url: String, rate: u64, count: u64, first: u64) -> Result<WriterStats> {
    let connections = writer_connections(rate);
    let mut clients = Vec::new();
    for _ in 0..connections {
        let client = connect(&url).await?;
        let stmt = client.prepare(INSERT_ONE).await?;
        clients.push((std::sync::Arc::new(client), stmt));
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for (k, (client, stmt)) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut commits = Vec::with_capacity((count / connections + 1) as usize);
            let mut returned = Vec::with_capacity((count / connections + 1) as usize);
            let mut max_late = Duration::ZERO;
            let mut pending = tokio::task::JoinSet::new();
            let mut done = |r: Result<Result<(u64, Duration, i64), tokio_postgres::Error>, _>| {
                let (e, took, at) = r.context("an INSERT task panicked")??;
                commits.push(took);
                returned.push((e, at));
                Ok::<_, anyhow::Error>(())
            };
            let mut e = k as u64;
            while e < count {
                let due = start + Duration::from_nanos(e * 1_000_000_000 / rate);
                tokio::time::sleep_until(due).await;
                while pending.len() >= WRITER_PIPELINE {
                    if let Some(r) = pending.join_next().await {
                        done(r)?;
                    }
                }
                while let Some(r) = pending.try_join_next() {
                    done(r)?;
                }
                let g = first + e;
                let (mut key, mut value, mut trace) = (String::new(), String::new(), String::new());
                event_fields(g, &mut key, &mut value, &mut trace);
                let headers = format!(r#"{{"trace_id": "{trace}"}}"#);
                let sent = tokio::time::Instant::now();
                max_late = max_late.max(sent - due);
                let (client, stmt) = (std::sync::Arc::clone(&client), stmt.clone());
                pending.spawn(async move {
                    client.execute(&stmt, &[&key, &value, &headers]).await?;
                    Ok((e, sent.elapsed(), unix_micros()))
                });
                e += connections;
            }
            while let Some(r) = pending.join_next().await {
                done(r)?;
            }
            Ok::<_, anyhow::Error>((commits, max_late, returned))
        }));
    }
    let mut commits = Vec::new();
    let mut max_late = Duration::ZERO;
    let mut commits_us = vec![0; count as usize];
    for task in tasks {
        let (c, late, returned) = task.await??;
        commits.extend(c);
        max_late = max_late.max(late);
        for (e, us) in returned {
            commits_us[e as usize] = us;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    commits.sort_unstable();
    let p99 = commits
        .get((commits.len() * 99 / 100).min(commits.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    Ok(WriterStats {
        secs,
        commit_p99_ms: p99.as_secs_f64() * 1e3,
        max_late_ms: max_late.as_secs_f64() * 1e3,
        commits_us,
    })
}
