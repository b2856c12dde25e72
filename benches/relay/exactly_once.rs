//! Exactly once in the benchmark (SPEC §9: at least 0.8 of at-least-once throughput): the
//! relay with `kafka.delivery = "exactly-once"` drains the same 100- and 1-per-transaction
//! backlogs as the at-least-once relay (on its own slot, created with the others before the
//! backlog was written, with a fresh broker; `backlog::drain_relay` with [`Delivery`]
//! switched), and follows the paced writer at the first latency rate
//! (`latency::latency_run`, switched the same way).
//!
//! Latency in this mode: the relay's histogram stops at the record's acknowledgement, which
//! comes before the Kafka transaction commits, and a `read_committed` consumer sees nothing
//! before the commit. So the latency reported for exactly once is what such a consumer sees:
//! the writer's commit to the record's arrival at a `read_committed` consumer following the
//! topic ([`VisibleFollower`]), both on this machine's clock.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::observe::{order_id, Appended};
use crate::procfs::unix_micros;
use crate::report::{Drain, Latency, Shape};
use crate::side_by_side::{first_line, relay_as_peer};
use crate::{PARTITIONS, TOPIC};

/// The relay's `kafka.delivery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    AtLeastOnce,
    ExactlyOnce,
}

impl Delivery {
    /// The relay's environment for this mode (the default needs nothing).
    pub fn env(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Delivery::AtLeastOnce => Vec::new(),
            Delivery::ExactlyOnce => vec![("OUTBOX_RELAY_KAFKA_DELIVERY", "exactly-once")],
        }
    }
}

/// Makes a fresh broker ready for transactions before a drain is timed: the first
/// `init_transactions` on a broker creates its transaction state log (50 partitions), a
/// once-per-cluster cost that is not the relay's.
pub fn warm_transactions(brokers: &str) -> Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("transactional.id", "relay-bench-warm-up")
        .create()
        .context("creating a transactional producer")?;
    producer
        .init_transactions(Duration::from_secs(60))
        .context("init_transactions on the fresh broker")?;
    Ok(())
}

/// What the exactly-once runs measured, or why they failed.
#[derive(Debug, Default)]
pub struct EosRuns {
    /// Backlog drains by events per transaction.
    pub drains: Vec<(u64, std::result::Result<Drain, String>)>,
    /// The paced run at the first latency rate.
    pub latency: Option<std::result::Result<Latency, String>>,
}

impl EosRuns {
    pub fn drain(&self, per_tx: u64) -> Option<&Drain> {
        self.drains
            .iter()
            .find(|(p, _)| *p == per_tx)
            .and_then(|(_, d)| d.as_ref().ok())
    }

    fn latency(&self) -> Option<&Latency> {
        self.latency.as_ref().and_then(|l| l.as_ref().ok())
    }

    pub fn failures(&self) -> Vec<String> {
        let drains = self.drains.iter().filter_map(|(per_tx, d)| {
            d.as_ref()
                .err()
                .map(|e| format!("exactly once, {per_tx} / tx: {}", first_line(e)))
        });
        let latency = self
            .latency
            .iter()
            .filter_map(|l| l.as_ref().err())
            .map(|e| format!("exactly once, latency: {}", first_line(e)));
        drains.chain(latency).collect()
    }
}

/// Prints one drain's line as the run goes.
pub fn report_drain(per_tx: u64, drain: &std::result::Result<Drain, String>) {
    match drain {
        Ok(d) => eprintln!(
            "[bench]   relay, exactly once: {:.0} events/s ({:.2} s; last ack at {:.2} s), {:.2} us CPU/event, peak RSS {:.1} MB",
            d.eps(),
            d.secs,
            d.acked_secs,
            d.cpu_us_per_event(),
            d.peak_rss_kb as f64 / 1024.0
        ),
        Err(e) => eprintln!("[bench]   relay, exactly once, {per_tx} / tx, FAILED: {e}"),
    }
}

/// Prints the exactly-once latency run as it ends.
pub fn report_latency(run: &std::result::Result<Latency, String>) {
    match run {
        Ok(l) => eprintln!(
            "[bench]   relay, exactly once: commit -> visible to read_committed p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; commit -> ack (histogram) p99 {:.2} ms",
            l.visible.map_or(f64::NAN, |v| v.p50_ms),
            l.visible.map_or(f64::NAN, |v| v.p99_ms),
            l.visible.map_or(f64::NAN, |v| v.max_ms),
            l.p99_ms
        ),
        Err(e) => eprintln!("[bench]   relay, exactly once, FAILED: {e}"),
    }
}

/// The exactly-once lines of the printed table: each drain beside the at-least-once drain of
/// the same backlog (from spawn, and steady: first to last acknowledgement), and the latency
/// beside at least once's.
pub fn report_eos(out: &mut String, shapes: &[Shape], eos: &EosRuns, alo: Option<&Latency>) {
    if eos.drains.is_empty() && eos.latency.is_none() {
        return;
    }
    let _ = writeln!(
        out,
        "exactly once (kafka.delivery = \"exactly-once\", the same backlogs, a fresh broker each):"
    );
    let _ = writeln!(
        out,
        "{:<10} {:>9} {:>9} {:>8} {:>10} {:>8} {:>8} {:>10} {:>9} {:>7}",
        "backlog",
        "EOS/s",
        "ALO/s",
        "EOS/ALO",
        "steady EOS",
        "ALO",
        "ratio",
        "relay s",
        "CPU us/ev",
        "RSS MB"
    );
    for (per_tx, drain) in &eos.drains {
        let shape = shapes.iter().find(|s| s.per_tx == *per_tx);
        let label = shape.map_or_else(|| format!("{per_tx} / tx"), |s| s.label.clone());
        let alo = shape.and_then(|s| s.relay.as_ref().ok());
        let alo_eps = alo.map_or(f64::NAN, Drain::eps);
        let alo_steady = alo.map_or(f64::NAN, |a| relay_as_peer(a).steady_eps());
        match drain {
            Ok(d) => {
                let steady = relay_as_peer(d).steady_eps();
                let _ = writeln!(
                    out,
                    "{label:<10} {:>9.0} {:>9.0} {:>8.3} {:>10.0} {:>8.0} {:>8.3} {:>10.2} {:>9.2} {:>7.1}",
                    d.eps(),
                    alo_eps,
                    d.eps() / alo_eps,
                    steady,
                    alo_steady,
                    steady / alo_steady,
                    d.secs,
                    d.cpu_us_per_event(),
                    d.peak_rss_kb as f64 / 1024.0
                );
            }
            Err(e) => {
                let _ = writeln!(out, "{label:<10}   FAILED: {}", first_line(e));
            }
        }
    }
    match &eos.latency {
        Some(Ok(l)) => {
            let v = l.visible.unwrap_or_default();
            let _ = writeln!(
                out,
                "exactly-once latency at {:.0} events/s (1 / tx, {} events): commit -> visible to read_committed p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; commit -> ack (histogram) p50 {:.2} ms, p99 {:.2} ms{}",
                l.achieved_rate,
                l.events,
                v.p50_ms,
                v.p99_ms,
                v.max_ms,
                l.p50_ms,
                l.p99_ms,
                alo.map_or(String::new(), |a| format!(
                    "; at least once: commit -> ack p99 {:.2} ms",
                    a.p99_ms
                ))
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "exactly-once latency FAILED: {}", first_line(e));
        }
        None => {}
    }
}

/// The exactly-once keys of the JSON line.
pub fn eos_json(shapes: &[Shape], eos: &EosRuns) -> serde_json::Map<String, serde_json::Value> {
    let alo = |per_tx: u64| {
        shapes
            .iter()
            .find(|s| s.per_tx == per_tx)
            .and_then(|s| s.relay.as_ref().ok())
    };
    let ratio = |per_tx: u64| Some(eos.drain(per_tx)?.eps() / alo(per_tx)?.eps());
    let steady = |d: &Drain| relay_as_peer(d).steady_eps();
    let steady_ratio = |per_tx: u64| Some(steady(eos.drain(per_tx)?) / steady(alo(per_tx)?));
    let visible = eos.latency().and_then(|l| l.visible);
    let fields = serde_json::json!({
        "eos_throughput_eps": eos.drain(100).map(Drain::eps),
        "eos_throughput_1_eps": eos.drain(1).map(Drain::eps),
        "eos_ratio": ratio(100),
        "eos_ratio_1": ratio(1),
        "eos_steady_eps": eos.drain(100).map(steady),
        "eos_steady_ratio": steady_ratio(100),
        "eos_steady_ratio_1": steady_ratio(1),
        "eos_cpu_us_per_event": eos.drain(100).map(Drain::cpu_us_per_event),
        "eos_peak_rss_mb": eos.drain(100).map(|d| d.peak_rss_kb as f64 / 1024.0),
        "eos_latency_p50_ms": visible.map(|v| v.p50_ms),
        "eos_latency_p99_ms": visible.map(|v| v.p99_ms),
        "eos_latency_ack_p99_ms": eos.latency().map(|l| l.p99_ms),
        "eos_latency_rate_eps": eos.latency().map(|l| l.achieved_rate),
    });
    match fields {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("a JSON object"),
    }
}

/// A `read_committed` consumer following the bench topic from its start, noting when each
/// event `first..first + count` arrives (Unix µs, first arrival).
pub struct VisibleFollower {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<HashMap<u64, i64>>>,
    count: u64,
    first: u64,
}

impl VisibleFollower {
    /// Starts following; the consumer is assigned before this returns.
    pub fn start(brokers: &str, first: u64, count: u64) -> Result<VisibleFollower> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("broker.address.family", "v4")
            .set("group.id", "relay-bench-read-committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            // A fetch waiting for data returns when a commit makes records visible; this
            // only bounds a wait the broker would not cut short.
            .set("fetch.wait.max.ms", "100")
            .create()
            .context("creating the read_committed consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(TOPIC, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("read-committed".into())
            .spawn(move || {
                let mut seen: HashMap<u64, i64> = HashMap::with_capacity(count as usize);
                while (seen.len() as u64) < count && !stopped.load(Ordering::Relaxed) {
                    let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let now = unix_micros();
                    let msg = msg.context("consuming read_committed")?;
                    let Some(g) = msg.payload().and_then(order_id) else {
                        continue;
                    };
                    if (first..first + count).contains(&g) {
                        seen.entry(g).or_insert(now);
                    }
                }
                Ok(seen)
            })?;
        Ok(VisibleFollower {
            stop,
            thread,
            count,
            first,
        })
    }

    /// Waits (up to 60 s) until every event arrived; returns, per event, its arrival minus
    /// `commits_us[e]` (when the writer saw event `first + e` commit).
    pub fn finish(self, commits_us: &[i64]) -> Result<Appended> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::Relaxed);
        let seen = self
            .thread
            .join()
            .map_err(|_| anyhow!("the read_committed consumer panicked"))??;
        if (seen.len() as u64) < self.count {
            bail!(
                "a read_committed consumer saw {} of {} events within 60 s of the last ack",
                seen.len(),
                self.count
            );
        }
        let ms: Vec<f64> = seen
            .iter()
            .map(|(&g, &at)| (at - commits_us[(g - self.first) as usize]) as f64 / 1e3)
            .collect();
        Ok(Appended::from_samples(ms))
    }
}
