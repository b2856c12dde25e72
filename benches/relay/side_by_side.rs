//! The side-by-side comparison: the relay, Debezium and the `pg_recvlogical` script on the same
//! WAL and broker, in the same terms (first and last record, CPU, memory, commit-to-append).

use std::fmt::Write as _;

use crate::observe::Appended;
use crate::report::{Drain, Extras, Shape};
use crate::Opts;

/// A peer's drain of a backlog (Debezium, or the `pg_recvlogical` peer), seen in the broker.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerDrain {
    pub events: u64,
    /// Spawn to the last record appended.
    pub secs: f64,
    /// Spawn to the first record appended (seen in the topic's end offsets, or the relay's
    /// `/metrics`, every 25 ms).
    pub first_record_secs: f64,
    /// Records appended when the first was seen.
    pub first_records: u64,
    /// The peer's processes' user + system CPU time.
    pub cpu_secs: f64,
    /// The peer's peak resident set (`VmHWM`; for the script, both processes' added).
    pub peak_rss_kb: u64,
    /// CPU seconds spent from the first record seen to the last (start-up left out), where
    /// measured.
    pub steady_cpu_secs: Option<f64>,
}

impl PeerDrain {
    /// From spawn to the last record, like the relay's `relay/s`.
    pub fn eps(&self) -> f64 {
        self.events as f64 / self.secs
    }
    /// From the first record seen to the last: the steady rate, start-up left out.
    pub fn steady_eps(&self) -> f64 {
        (self.events - self.first_records) as f64 / (self.secs - self.first_record_secs)
    }
    pub fn cpu_us_per_event(&self) -> f64 {
        self.cpu_secs * 1e6 / self.events as f64
    }
    /// CPU per event from the first record seen to the last.
    pub fn steady_cpu_us_per_event(&self) -> Option<f64> {
        self.steady_cpu_secs
            .map(|cpu| cpu * 1e6 / (self.events - self.first_records) as f64)
    }
}

/// A peer following the paced writer.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerLatency {
    pub events: u64,
    pub achieved_rate: f64,
    pub appended: Appended,
    pub cpu_us_per_event: f64,
    pub peak_rss_kb: u64,
}

/// What one peer measured: why it did not run at all, or its drains (by events per
/// transaction) and its latency run, each of which can fail on its own.
#[derive(Debug, Clone, Default)]
pub struct PeerRuns {
    pub skipped: Option<String>,
    pub drains: Vec<(u64, std::result::Result<PeerDrain, String>)>,
    pub latency: Option<std::result::Result<PeerLatency, String>>,
}

impl PeerRuns {
    pub fn skipped(why: String) -> PeerRuns {
        PeerRuns {
            skipped: Some(why),
            ..PeerRuns::default()
        }
    }

    pub fn drain(&self, per_tx: u64) -> Option<&PeerDrain> {
        self.drains
            .iter()
            .find(|(p, _)| *p == per_tx)
            .and_then(|(_, d)| d.as_ref().ok())
    }

    pub fn latency(&self) -> Option<&PeerLatency> {
        self.latency.as_ref().and_then(|l| l.as_ref().ok())
    }

    pub fn failures(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .drains
            .iter()
            .filter_map(|(p, d)| {
                d.as_ref()
                    .err()
                    .map(|e| format!("{name} {p} / tx: {}", first_line(e)))
            })
            .collect();
        if let Some(Err(e)) = &self.latency {
            out.push(format!("{name} latency: {}", first_line(e)));
        }
        out
    }
}

pub fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// Prints the side-by-side tables into `out` and returns the relay's standing against Debezium.
pub fn side_by_side(out: &mut String, opts: &Opts, shapes: &[Shape], x: &Extras<'_>) -> VsDebezium {
    let mb = |kb: u64| kb as f64 / 1024.0;
    // Side by side: the relay, Debezium and the script, on the same WAL and broker.
    let _ = writeln!(
        out,
        "\nside by side (same WAL, same Apache Kafka broker, a slot each; 1st/last = first/last record acknowledged, from spawn)"
    );
    let _ = writeln!(
        out,
        "{:<22} {:>6} {:>9} {:>9} {:>9} {:>11} {:>9} {:>10} {:>7}",
        "",
        "per tx",
        "events/s",
        "1st s",
        "last s",
        "1st->last/s",
        "CPU us/ev",
        "after 1st",
        "RSS MB"
    );
    let row = |out: &mut String,
               name: &str,
               per_tx: u64,
               d: Option<PeerDrain>,
               why: Option<&str>| {
        match (d, why) {
            (Some(d), _) => {
                let _ = writeln!(
                    out,
                    "{:<22} {:>6} {:>9.0} {:>9.2} {:>9.2} {:>11.0} {:>9.2} {:>10} {:>7.1}",
                    name,
                    per_tx,
                    d.eps(),
                    d.first_record_secs,
                    d.secs,
                    d.steady_eps(),
                    d.cpu_us_per_event(),
                    d.steady_cpu_us_per_event()
                        .map_or("-".to_string(), |c| format!("{c:.2}")),
                    mb(d.peak_rss_kb)
                );
            }
            (None, Some(why)) => {
                let _ = writeln!(out, "{name:<22} {per_tx:>6}   {why}");
            }
            (None, None) => {}
        }
    };
    for per_tx in [100, 1] {
        if !shapes.iter().any(|s| s.per_tx == per_tx) {
            continue;
        }
        let relay = shapes
            .iter()
            .find(|s| s.per_tx == per_tx)
            .map(|s| s.relay.clone());
        match &relay {
            Some(Ok(d)) => row(out, "relay", per_tx, Some(relay_as_peer(d)), None),
            Some(Err(e)) => row(
                out,
                "relay",
                per_tx,
                None,
                Some(&format!("FAILED: {}", first_line(e))),
            ),
            None => {}
        }
        for (name, runs) in [
            ("debezium (connect)", x.debezium),
            ("pg_recvlogical+python", x.peer),
        ] {
            if let Some(why) = &runs.skipped {
                row(
                    out,
                    name,
                    per_tx,
                    None,
                    Some(&format!("skipped: {}", first_line(why))),
                );
                continue;
            }
            match runs.drains.iter().find(|(p, _)| *p == per_tx) {
                Some((_, Ok(d))) => row(out, name, per_tx, Some(*d), None),
                Some((_, Err(e))) => row(
                    out,
                    name,
                    per_tx,
                    None,
                    Some(&format!("FAILED: {}", first_line(e))),
                ),
                None => {}
            }
        }
    }
    // SPEC §9 against Debezium: throughput (steady rates, 100 / tx), memory, p99 at 5k/s.
    let relay_100 = shapes
        .iter()
        .find(|s| s.per_tx == 100)
        .and_then(|s| s.relay.as_ref().ok())
        .map(relay_as_peer);
    let vs_debezium = VsDebezium {
        eps: relay_100
            .zip(x.debezium.drain(100))
            .map(|(r, d)| r.steady_eps() / d.steady_eps()),
        rss: relay_100
            .zip(x.debezium.drain(100))
            .map(|(r, d)| r.peak_rss_kb as f64 / d.peak_rss_kb as f64),
        p99: x
            .latency
            .and_then(|l| l.appended)
            .zip(x.debezium.latency())
            .map(|(r, d)| (r.p99_ms, d.appended.p99_ms)),
    };
    let lat_row = |out: &mut String,
                   name: &str,
                   l: Option<(f64, u64, Appended, f64, u64)>,
                   why: Option<String>| {
        match (l, why) {
            (Some((rate, events, a, cpu, rss)), _) => {
                let _ = writeln!(
                    out,
                    "  {:<22} at {:>6.0}/s ({events} events): p50 {:>7.2} ms, p99 {:>7.2} ms, max {:>7.2} ms; {:.2} us CPU/event, peak RSS {:.1} MB",
                    name, rate, a.p50_ms, a.p99_ms, a.max_ms, cpu, mb(rss)
                );
            }
            (None, Some(why)) => {
                let _ = writeln!(out, "  {name:<22} {why}");
            }
            (None, None) => {}
        }
    };
    if x.latency.is_some() || x.debezium.latency.is_some() || x.peer.latency.is_some() {
        let _ = writeln!(
            out,
            "commit -> broker append (writer's commit returned -> LogAppendTime, every event, 1 ms clock), 1 / tx:"
        );
        if let Some(l) = x.latency {
            lat_row(
                out,
                "relay",
                l.appended.map(|a| {
                    (
                        l.achieved_rate,
                        l.events,
                        a,
                        l.cpu_us_per_event,
                        l.peak_rss_kb,
                    )
                }),
                None,
            );
        }
        for (name, runs) in [
            ("debezium (connect)", x.debezium),
            ("pg_recvlogical+python", x.peer),
        ] {
            match (&runs.skipped, &runs.latency) {
                (Some(why), _) => lat_row(
                    out,
                    name,
                    None,
                    Some(format!("skipped: {}", first_line(why))),
                ),
                (None, Some(Ok(l))) => lat_row(
                    out,
                    name,
                    Some((
                        l.achieved_rate,
                        l.events,
                        l.appended,
                        l.cpu_us_per_event,
                        l.peak_rss_kb,
                    )),
                    None,
                ),
                (None, Some(Err(e))) => {
                    lat_row(out, name, None, Some(format!("FAILED: {}", first_line(e))))
                }
                (None, None) => {}
            }
        }
    }
    if vs_debezium.eps.is_some() || vs_debezium.p99.is_some() {
        let _ = writeln!(
            out,
            "relay vs Debezium (SPEC: >= 2.5x throughput, <= 1/10 memory, lower p99): throughput {}, RSS {}, p99 at {} events/s {}",
            vs_debezium.eps.map_or("-".into(), |r| format!("{r:.2}x")),
            vs_debezium.rss.map_or("-".into(), |r| format!("{r:.3}x")),
            opts.latency_rate,
            vs_debezium
                .p99
                .map_or("-".into(), |(r, d)| format!("{r:.2} vs {d:.2} ms")),
        );
    }
    vs_debezium
}

/// The relay against Debezium: steady-rate ratio (100 / tx), RSS ratio, p99s at the first
/// latency rate (commit to broker append, both).
pub struct VsDebezium {
    pub eps: Option<f64>,
    pub rss: Option<f64>,
    pub p99: Option<(f64, f64)>,
}

/// The relay's drain in the peers' terms: first and last acknowledgement from spawn.
pub fn relay_as_peer(d: &Drain) -> PeerDrain {
    PeerDrain {
        events: d.events,
        secs: d.acked_secs,
        first_record_secs: d.first_ack_secs,
        first_records: d.first_ack_published,
        cpu_secs: d.cpu_secs,
        peak_rss_kb: d.peak_rss_kb,
        steady_cpu_secs: None,
    }
}

/// A peer's drain, on stderr as it ends.
pub fn report_peer(name: &str, result: &std::result::Result<PeerDrain, String>) {
    match result {
        Ok(d) => eprintln!(
            "[bench]   {name}: {:.0} events/s from spawn ({:.2} s; first record at {:.2} s, {:.0} events/s after it), {:.2} us CPU/event, peak RSS {:.1} MB",
            d.eps(),
            d.secs,
            d.first_record_secs,
            d.steady_eps(),
            d.cpu_us_per_event(),
            d.peak_rss_kb as f64 / 1024.0
        ),
        Err(e) => eprintln!("[bench]   {name} FAILED: {e}"),
    }
}

/// A peer's latency run, on stderr as it ends.
pub fn report_peer_latency(name: &str, result: &std::result::Result<PeerLatency, String>) {
    match result {
        Ok(l) => eprintln!(
            "[bench]   {name}: commit -> append p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms at {:.0} events/s",
            l.appended.p50_ms, l.appended.p99_ms, l.appended.max_ms, l.achieved_rate
        ),
        Err(e) => eprintln!("[bench]   {name} FAILED: {e}"),
    }
}
