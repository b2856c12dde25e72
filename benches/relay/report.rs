//! What the measurements found, printed as a table and then one JSON line.

use std::fmt::Write as _;

use crate::exactly_once::{eos_json, report_eos, EosRuns};
use crate::observe::Appended;
use crate::side_by_side::{first_line, relay_as_peer, side_by_side, PeerRuns};
use crate::Opts;

/// What one relay drain measured.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub events: u64,
    /// Spawn to the slot confirmed past the backlog.
    pub secs: f64,
    /// Spawn to the last acknowledgement counted in `/metrics`.
    pub acked_secs: f64,
    /// Spawn to the first acknowledgement seen in `/metrics` (start-up: connections, slot,
    /// topic metadata).
    pub first_ack_secs: f64,
    /// Events acknowledged by that first scrape.
    pub first_ack_published: u64,
    pub cpu_secs: f64,
    pub peak_rss_kb: u64,
    /// Cores busy machine-wide during the drain (Postgres, tansu, the relay and anything
    /// else running): near the core count, the machine was the limit.
    pub host_cores: f64,
    /// Of those, cores busy with processes that are not the bench's (not the bench, the
    /// relay, tansu or the Postgres cluster): other work on a shared machine.
    pub other_cores: f64,
}

impl Drain {
    pub fn eps(&self) -> f64 {
        self.events as f64 / self.secs
    }
    pub fn cpu_us_per_event(&self) -> f64 {
        self.cpu_secs * 1e6 / self.events as f64
    }
}

/// One backlog shape: its null consumer and its relay drain.
#[derive(Debug, Clone)]
pub struct Shape {
    pub label: String,
    pub per_tx: u64,
    pub write_secs: f64,
    /// The decode ceiling: the fastest of the runs below.
    pub decode: f64,
    /// The faster null-consumer run, whose CPU per event is the client side of decoding.
    pub null: Rate,
    /// Every null consumer's rate: ours before and after the relay's drain, and
    /// `pg_recvlogical` into `/dev/null` (None when it could not run).
    pub decode_runs: [Option<f64>; 3],
    /// The drain, or why it failed (the other measurements still run).
    pub relay: std::result::Result<Drain, String>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Rate {
    pub events: u64,
    pub secs: f64,
    /// CPU seconds of the bench process meanwhile (the null consumer's or the producer's
    /// own cost; the peer's is not measured).
    pub cpu_secs: f64,
}

impl Rate {
    pub fn eps(&self) -> f64 {
        self.events as f64 / self.secs
    }
    pub fn cpu_us_per_event(&self) -> f64 {
        self.cpu_secs * 1e6 / self.events as f64
    }
}

#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub events: u64,
    pub achieved_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_bucket_ms: f64,
    pub writer_p99_ms: f64,
    pub writer_max_late_ms: f64,
    pub cpu_us_per_event: f64,
    pub peak_rss_kb: u64,
    /// The null consumer's commit-to-decoded latency at the same rate (exact, not bucketed).
    pub floor: Option<Floor>,
    /// A plain producer's produce-to-ack latency at the same rate on the same broker, one
    /// record per produce call, no Postgres (exact, not bucketed).
    pub broker_floor: Option<Floor>,
    /// The same plain producer with `linger.ms = 0`: the broker's round trip alone on this
    /// machine, what no linger setting can take off.
    pub round_trip_floor: Option<Floor>,
    /// Cores of the machine busy on average while the measured events were written (all
    /// processes: writer, Postgres, broker, relay, anything else).
    pub host_cores: f64,
    /// CPU per measured event of the broker's JVM, of the Postgres cluster (the writer's
    /// backends, the walsender, the rest) and of the bench process (the paced writer's client)
    /// over the same time.
    pub broker_cpu_us_per_event: f64,
    pub postgres_cpu_us_per_event: f64,
    pub writer_cpu_us_per_event: f64,
    /// Commit (as the writer saw it return) to the broker's append, per event: measured the
    /// same way for the peers.
    pub appended: Option<Appended>,
    /// Exactly once: commit (as the writer saw it return) to the record seen by a
    /// `read_committed` consumer following the topic (the histogram stops at the ack, before
    /// the Kafka transaction commits).
    pub visible: Option<Appended>,
}

/// Exact latency quantiles in milliseconds: a floor (the null consumer, the plain producer) or
/// a per-record measurement (`observe::Appended`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Floor {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Where the machine's CPU went during a latency run, per event.
fn others_cpu(l: &Latency) -> String {
    format!(
        "CPU per event meanwhile: relay {:.1}, broker {:.1}, Postgres {:.1}, paced writer {:.1} us",
        l.cpu_us_per_event,
        l.broker_cpu_us_per_event,
        l.postgres_cpu_us_per_event,
        l.writer_cpu_us_per_event
    )
}

/// The machine's cores, as the bench sees them.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |p| p.get())
}

impl Floor {
    /// The exact quantiles of latencies in milliseconds (NaN when there are none).
    pub fn from_samples(mut ms: Vec<f64>) -> Floor {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            ms.get(((ms.len() as f64 * q) as usize).min(ms.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        Floor {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: ms.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Polling mode's runs: its drains by events per transaction, and its latency run.
#[derive(Default)]
pub struct PollingRuns {
    pub drains: Vec<(u64, std::result::Result<Drain, String>)>,
    pub latency: Option<std::result::Result<Latency, String>>,
}

impl PollingRuns {
    pub fn drain(&self, per_tx: u64) -> Option<&Drain> {
        self.drains
            .iter()
            .find(|(p, _)| *p == per_tx)
            .and_then(|(_, d)| d.as_ref().ok())
    }

    pub fn latency(&self) -> Option<&Latency> {
        self.latency.as_ref().and_then(|l| l.as_ref().ok())
    }
}

/// Everything measured besides the relay's backlog shapes.
pub struct Extras<'a> {
    pub broker: Option<Rate>,
    /// The same plain producer on tansu, or why it was not measured.
    pub tansu_broker: std::result::Result<Rate, String>,
    pub latency: Option<&'a Latency>,
    /// The relay at the second, higher rate.
    pub latency_high: Option<&'a std::result::Result<Latency, String>>,
    pub debezium: &'a PeerRuns,
    pub peer: &'a PeerRuns,
    /// The relay in exactly-once mode.
    pub eos: &'a EosRuns,
    pub polling: &'a PollingRuns,
}

pub fn report(opts: &Opts, shapes: &[Shape], x: &Extras<'_>) {
    let n = opts.events;
    let mb = |kb: u64| kb as f64 / 1024.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nrelay benchmark ({} mode, N = {n} events per backlog, {} cores, Apache Kafka {})",
        if opts.quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        testkit::KAFKA_VERSION
    );
    let _ = writeln!(
        out,
        "{:<10} {:>9} {:>8} {:>9} {:>6} {:>8} {:>9} {:>10} {:>9} {:>8} {:>6} {:>7}",
        "backlog",
        "decode/s",
        "dec us/ev",
        "relay/s",
        "ratio",
        "relay s",
        "1st ack s",
        "last ack s",
        "CPU us/ev",
        "host CPU",
        "other",
        "RSS MB"
    );
    for s in shapes {
        match &s.relay {
            Ok(relay) => {
                let _ = writeln!(
                    out,
                    "{:<10} {:>9.0} {:>8.2} {:>9.0} {:>6.3} {:>8.2} {:>9.2} {:>10.2} {:>9.2} {:>8.2} {:>6.2} {:>7.1}",
                    s.label,
                    s.decode,
                    s.null.cpu_us_per_event(),
                    relay.eps(),
                    relay.eps() / s.decode,
                    relay.secs,
                    relay.first_ack_secs,
                    relay.acked_secs,
                    relay.cpu_us_per_event(),
                    relay.host_cores,
                    relay.other_cores,
                    mb(relay.peak_rss_kb)
                );
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "{:<10} {:>9.0} {:>8.2}   relay FAILED: {}",
                    s.label,
                    s.decode,
                    s.null.cpu_us_per_event(),
                    first_line(e)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "(backlogs written in: {})",
        shapes
            .iter()
            .map(|s| format!("{} {:.1} s", s.label, s.write_secs))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(broker) = x.broker {
        let _ = writeln!(
            out,
            "broker ceiling on Apache Kafka (rdkafka, relay settings): {:.0} events/s ({:.2} s), producer {:.2} us CPU/event",
            broker.eps(),
            broker.secs,
            broker.cpu_us_per_event()
        );
    }
    match &x.tansu_broker {
        Ok(t) => {
            let _ = writeln!(
                out,
                "broker ceiling on tansu (the same producer): {:.0} events/s ({:.2} s), producer {:.2} us CPU/event",
                t.eps(),
                t.secs,
                t.cpu_us_per_event()
            );
        }
        Err(why) => {
            let _ = writeln!(out, "broker ceiling on tansu: not measured ({why})");
        }
    }
    if let Some(latency) = x.latency {
        let _ = writeln!(
            out,
            "latency at {:.0} events/s (1 / tx, {} events, commit -> Kafka ack, relay's histogram, bucket-interpolated): p50 {:.2} ms, p99 {:.2} ms, max <= {} ms",
            latency.achieved_rate, latency.events, latency.p50_ms, latency.p99_ms, latency.max_bucket_ms
        );
        if let Some(floor) = &latency.floor {
            let _ = writeln!(
                out,
                "  floor, a null consumer at the same rate (commit -> decoded, exact): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                floor.p50_ms, floor.p99_ms, floor.max_ms
            );
        }
        if let Some(floor) = &latency.broker_floor {
            let _ = writeln!(
                out,
                "  broker latency floor, a plain producer at the same rate (produce -> ack, exact): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                floor.p50_ms, floor.p99_ms, floor.max_ms
            );
        }
        if let Some(floor) = &latency.round_trip_floor {
            let _ = writeln!(
                out,
                "  broker round trip, the same producer with linger.ms=0 (produce -> ack, exact): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                floor.p50_ms, floor.p99_ms, floor.max_ms
            );
        }
        let _ = writeln!(
            out,
            "  writer: commit p99 {:.2} ms, at most {:.1} ms behind schedule; relay {:.2} us CPU/event, peak RSS {:.1} MB; host {:.2} of {} cores busy",
            latency.writer_p99_ms,
            latency.writer_max_late_ms,
            latency.cpu_us_per_event,
            mb(latency.peak_rss_kb),
            latency.host_cores,
            cores()
        );
        let _ = writeln!(out, "  {}", others_cpu(latency));
    }
    match x.latency_high {
        Some(Ok(l)) => {
            let _ = writeln!(
                out,
                "latency at {:.0} events/s (1 / tx, {} events, relay's histogram): p50 {:.2} ms, p99 {:.2} ms, max <= {} ms",
                l.achieved_rate, l.events, l.p50_ms, l.p99_ms, l.max_bucket_ms
            );
            let _ = writeln!(
                out,
                "  commit -> broker append: p50 {:.2} ms, p99 {:.2} ms; writer: commit p99 {:.2} ms, at most {:.1} ms behind schedule; relay {:.2} us CPU/event; host {:.2} of {} cores busy",
                l.appended.map_or(f64::NAN, |a| a.p50_ms),
                l.appended.map_or(f64::NAN, |a| a.p99_ms),
                l.writer_p99_ms,
                l.writer_max_late_ms,
                l.cpu_us_per_event,
                l.host_cores,
                cores()
            );
            if let Some(floor) = &l.broker_floor {
                let _ = writeln!(
                    out,
                    "  broker latency floor, a plain producer at the same rate, just before (produce -> ack, exact): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    floor.p50_ms, floor.p99_ms, floor.max_ms
                );
            }
            let _ = writeln!(out, "  {}", others_cpu(l));
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "latency at the higher rate FAILED: {}", first_line(e));
        }
        None => {}
    }

    polling_section(&mut out, shapes, x.polling);
    let vs_debezium = side_by_side(&mut out, opts, shapes, x);
    report_eos(&mut out, shapes, x.eos, x.latency);
    print!("{out}");

    let find = |per_tx: u64| shapes.iter().find(|s| s.per_tx == per_tx);
    let main = find(100);
    let drain = |s: &Shape| s.relay.as_ref().ok().cloned();
    let throughput = main.and_then(drain).map_or(f64::NAN, |d| d.eps());
    let decode = main.map_or(f64::NAN, |s| s.decode);
    let backlog_rss = shapes
        .iter()
        .filter(|s| s.per_tx <= 100)
        .filter_map(|s| s.relay.as_ref().ok().map(|d| d.peak_rss_kb))
        .max();
    let big = shapes.iter().find(|s| s.per_tx > 100);
    let eps_of = |per_tx: u64| find(per_tx).and_then(drain).map(|d| d.eps());
    let steady_of = |per_tx: u64| {
        find(per_tx)
            .and_then(drain)
            .map(|d| relay_as_peer(&d).steady_eps())
    };
    let dbz = x.debezium;
    let peer = x.peer;
    let high = x.latency_high.and_then(|l| l.as_ref().ok());
    let mut failures: Vec<String> = shapes
        .iter()
        .filter_map(|s| {
            s.relay
                .as_ref()
                .err()
                .map(|e| format!("{}: {}", s.label, first_line(e)))
        })
        .collect();
    if let Some(Err(e)) = x.latency_high {
        failures.push(format!("latency (higher rate): {}", first_line(e)));
    }
    for (per_tx, d) in &x.polling.drains {
        if let Err(e) = d {
            failures.push(format!("polling {per_tx} / tx: {}", first_line(e)));
        }
    }
    if let Some(Err(e)) = &x.polling.latency {
        failures.push(format!("polling latency: {}", first_line(e)));
    }
    failures.extend(dbz.failures("debezium"));
    failures.extend(peer.failures("peer"));
    failures.extend(x.eos.failures());
    let mut json = serde_json::json!({
        "mode": if opts.quick { "quick" } else { "full" },
        "events": n,
        "broker": format!("apache-kafka-{}", testkit::KAFKA_VERSION),
        "throughput_eps": throughput,
        "decode_ceiling_eps": decode,
        "broker_ceiling_eps": x.broker.map(|b| b.eps()),
        "broker_cpu_us_per_event": x.broker.map(|b| b.cpu_us_per_event()),
        "tansu_broker_ceiling_eps": x.tansu_broker.as_ref().ok().map(|b| b.eps()),
        "tansu_broker_cpu_us_per_event": x.tansu_broker.as_ref().ok().map(|b| b.cpu_us_per_event()),
        "decode_cpu_us_per_event": main.map(|s| s.null.cpu_us_per_event()),
        "decode_ceiling_runs_eps": main.map(|s| s.decode_runs),
        "ratio": throughput / decode,
        "latency_p50_ms": x.latency.map(|l| l.p50_ms),
        "latency_p99_ms": x.latency.map(|l| l.p99_ms),
        "latency_max_bucket_ms": x.latency.map(|l| l.max_bucket_ms),
        "latency_rate_eps": x.latency.map(|l| l.achieved_rate),
        "latency_cpu_us_per_event": x.latency.map(|l| l.cpu_us_per_event),
        "latency_append_p50_ms": x.latency.and_then(|l| l.appended).map(|a| a.p50_ms),
        "latency_append_p99_ms": x.latency.and_then(|l| l.appended).map(|a| a.p99_ms),
        "latency_p50_ms_20k": high.map(|l| l.p50_ms),
        "latency_p99_ms_20k": high.map(|l| l.p99_ms),
        "latency_rate_eps_20k": high.map(|l| l.achieved_rate),
        "latency_append_p99_ms_20k": high.and_then(|l| l.appended).map(|a| a.p99_ms),
        "decode_latency_p50_ms": x.latency.and_then(|l| l.floor).map(|f| f.p50_ms),
        "decode_latency_p99_ms": x.latency.and_then(|l| l.floor).map(|f| f.p99_ms),
        "broker_latency_p50_ms": x.latency.and_then(|l| l.broker_floor).map(|f| f.p50_ms),
        "broker_latency_p99_ms": x.latency.and_then(|l| l.broker_floor).map(|f| f.p99_ms),
        "broker_round_trip_p50_ms": x.latency.and_then(|l| l.round_trip_floor).map(|f| f.p50_ms),
        "broker_round_trip_p99_ms": x.latency.and_then(|l| l.round_trip_floor).map(|f| f.p99_ms),
        "latency_host_cores": x.latency.map(|l| l.host_cores),
        "latency_host_cores_20k": high.map(|l| l.host_cores),
        "latency_broker_cpu_us_per_event": x.latency.map(|l| l.broker_cpu_us_per_event),
        "latency_postgres_cpu_us_per_event": x.latency.map(|l| l.postgres_cpu_us_per_event),
        "latency_broker_cpu_us_per_event_20k": high.map(|l| l.broker_cpu_us_per_event),
        "latency_postgres_cpu_us_per_event_20k": high.map(|l| l.postgres_cpu_us_per_event),
        "peak_rss_mb": backlog_rss.map(mb),
        "big_tx_peak_rss_mb": big.and_then(drain).map(|d| mb(d.peak_rss_kb)),
        "big_tx_eps": big.and_then(drain).map(|d| d.eps()),
        "relay_cpu_us_per_event": main.and_then(drain).map(|d| d.cpu_us_per_event()),
        "relay_first_record_s": main.and_then(drain).map(|d| d.first_ack_secs),
        "relay_steady_eps": steady_of(100),
        "relay_steady_eps_1tx": steady_of(1),
        "relay_cpu_us_per_event_1tx": find(1).and_then(drain).map(|d| d.cpu_us_per_event()),
        "throughput_10_per_tx_eps": eps_of(10),
        "throughput_1_per_tx_eps": eps_of(1),
        "decode_ceiling_1_per_tx_eps": find(1).map(|s| s.decode),
        "debezium_eps": dbz.drain(100).map(|d| d.steady_eps()),
        "debezium_eps_1tx": dbz.drain(1).map(|d| d.steady_eps()),
        "debezium_eps_from_spawn": dbz.drain(100).map(|d| d.eps()),
        "debezium_eps_from_spawn_1tx": dbz.drain(1).map(|d| d.eps()),
        "debezium_cpu_us_per_event": dbz.drain(100).map(|d| d.cpu_us_per_event()),
        "debezium_cpu_us_per_event_1tx": dbz.drain(1).map(|d| d.cpu_us_per_event()),
        "debezium_steady_cpu_us_per_event": dbz.drain(100).and_then(|d| d.steady_cpu_us_per_event()),
        "debezium_steady_cpu_us_per_event_1tx": dbz.drain(1).and_then(|d| d.steady_cpu_us_per_event()),
        "debezium_peak_rss_mb": dbz.drains.iter().filter_map(|(_, d)| d.as_ref().ok().map(|d| d.peak_rss_kb)).max().map(mb),
        "debezium_first_record_s": dbz.drain(100).map(|d| d.first_record_secs),
        "debezium_latency_p50_ms": dbz.latency().map(|l| l.appended.p50_ms),
        "debezium_latency_p99_ms": dbz.latency().map(|l| l.appended.p99_ms),
        "debezium_latency_cpu_us_per_event": dbz.latency().map(|l| l.cpu_us_per_event),
        "debezium_skipped": dbz.skipped.as_deref(),
        "relay_vs_debezium_eps": vs_debezium.eps,
        "relay_vs_debezium_rss": vs_debezium.rss,
        "peer_eps": peer.drain(100).map(|d| d.eps()),
        "peer_eps_1tx": peer.drain(1).map(|d| d.eps()),
        "peer_steady_eps": peer.drain(100).map(|d| d.steady_eps()),
        "peer_steady_eps_1tx": peer.drain(1).map(|d| d.steady_eps()),
        "peer_cpu_us_per_event": peer.drain(100).map(|d| d.cpu_us_per_event()),
        "peer_peak_rss_mb": peer.drains.iter().filter_map(|(_, d)| d.as_ref().ok().map(|d| d.peak_rss_kb)).max().map(mb),
        "peer_first_record_s": peer.drain(100).map(|d| d.first_record_secs),
        "peer_latency_p50_ms": peer.latency().map(|l| l.appended.p50_ms),
        "peer_latency_p99_ms": peer.latency().map(|l| l.appended.p99_ms),
        "peer_skipped": peer.skipped.as_deref(),
        "polling_throughput_eps": x.polling.drain(100).map(|d| d.eps()),
        "polling_throughput_1_per_tx_eps": x.polling.drain(1).map(|d| d.eps()),
        "polling_vs_logical_eps": x.polling.drain(100).map(|d| d.eps() / throughput),
        "polling_vs_logical_eps_1tx": x.polling.drain(1).zip(eps_of(1)).map(|(d, l)| d.eps() / l),
        "polling_cpu_us_per_event": x.polling.drain(100).map(|d| d.cpu_us_per_event()),
        "polling_cpu_us_per_event_1tx": x.polling.drain(1).map(|d| d.cpu_us_per_event()),
        "polling_peak_rss_mb": x.polling.drains.iter().filter_map(|(_, d)| d.as_ref().ok().map(|d| d.peak_rss_kb)).max().map(mb),
        "polling_latency_p50_ms": x.polling.latency().map(|l| l.p50_ms),
        "polling_latency_p99_ms": x.polling.latency().map(|l| l.p99_ms),
        "polling_latency_append_p99_ms": x.polling.latency().and_then(|l| l.appended).map(|a| a.p99_ms),
        "polling_latency_cpu_us_per_event": x.polling.latency().map(|l| l.cpu_us_per_event),
        "failures": failures,
    });
    if let Some(fields) = json.as_object_mut() {
        fields.extend(eos_json(shapes, x.eos));
        let high_floor = high.and_then(|l| l.broker_floor);
        fields.insert(
            "broker_latency_p50_ms_20k".into(),
            serde_json::json!(high_floor.map(|f| f.p50_ms)),
        );
        fields.insert(
            "broker_latency_p99_ms_20k".into(),
            serde_json::json!(high_floor.map(|f| f.p99_ms)),
        );
    }
    println!("{json}");
}

/// Polling mode beside logical mode's drain of the same backlog.
fn polling_section(out: &mut String, shapes: &[Shape], polling: &PollingRuns) {
    if polling.drains.is_empty() && polling.latency.is_none() {
        return;
    }
    let _ = writeln!(out, "polling mode (the (txid, seq) index; its own cursor):");
    for (per_tx, drain) in &polling.drains {
        let logical = shapes
            .iter()
            .find(|s| s.per_tx == *per_tx)
            .and_then(|s| s.relay.as_ref().ok())
            .map(Drain::eps);
        match drain {
            Ok(d) => {
                let _ = writeln!(
                    out,
                    "  {per_tx:>3} / tx: {:.0} events/s ({:.2} s), {} of logical mode's rate, {:.2} us CPU/event, peak RSS {:.1} MB",
                    d.eps(),
                    d.secs,
                    logical.map_or("n/a".to_string(), |l| format!("{:.2}", d.eps() / l)),
                    d.cpu_us_per_event(),
                    d.peak_rss_kb as f64 / 1024.0
                );
            }
            Err(e) => {
                let _ = writeln!(out, "  {per_tx:>3} / tx: FAILED: {}", first_line(e));
            }
        }
    }
    match &polling.latency {
        Some(Ok(l)) => {
            let _ = writeln!(
                out,
                "  latency at {:.0} events/s (1 / tx, NOTIFY, relay's histogram): p50 {:.2} ms, p99 {:.2} ms, max <= {} ms; commit -> append p99 {:.2} ms; {:.2} us CPU/event, peak RSS {:.1} MB",
                l.achieved_rate,
                l.p50_ms,
                l.p99_ms,
                l.max_bucket_ms,
                l.appended.map_or(f64::NAN, |a| a.p99_ms),
                l.cpu_us_per_event,
                l.peak_rss_kb as f64 / 1024.0
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "  latency FAILED: {}", first_line(e));
        }
        None => {}
    }
}
