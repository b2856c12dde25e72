//! The relay under test: its config and the binary as a child process (the test kit's
//! [`Relay`]), watched through `/metrics` and `/proc`.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Result};
use testkit::{free_port, relay_config, scrape, Relay};

use crate::broker::Broker;
use crate::exactly_once::Delivery;
use crate::procfs::{proc_cpu_ticks, proc_status_kb};
use crate::{Env, PUBLICATION};

/// The relay's config for `slot` (also what the null consumer derives its replication
/// settings from).
pub fn relay_toml(url: &str, slot: &str, brokers: &str, http_port: u16) -> String {
    relay_config(url, brokers, slot, PUBLICATION, http_port) + &extra_kafka_properties()
}

/// `RELAY_BENCH_KAFKA_PROPERTIES="linger.ms=1,batch.size=65536"`: producer settings for the
/// relay under test on top of its defaults, to try one out.
pub fn extra_kafka_properties() -> String {
    let pairs = extra_kafka_pairs();
    if pairs.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n[kafka.properties]\n");
    for (key, value) in pairs {
        let _ = writeln!(out, "{key:?} = {value:?}");
    }
    out
}

/// The pairs of `RELAY_BENCH_KAFKA_PROPERTIES`; the plain producers (broker ceiling and
/// latency floor) take them too, so they keep the relay's settings.
pub fn extra_kafka_pairs() -> Vec<(String, String)> {
    let Ok(list) = std::env::var("RELAY_BENCH_KAFKA_PROPERTIES") else {
        return Vec::new();
    };
    list.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key.trim().to_owned(), value.trim().to_owned())
        })
        .collect()
}

/// The relay binary running `run` on `slot` against a broker; killed on drop.
pub struct RelayProc {
    pub relay: Relay,
    pub http_port: u16,
}

impl RelayProc {
    pub fn start(
        env: &Env<'_>,
        broker: &dyn Broker,
        slot: &str,
        delivery: Delivery,
    ) -> Result<RelayProc> {
        let dir = tempfile::Builder::new()
            .prefix("relay-bench-")
            .disable_cleanup(std::env::var_os("RELAY_BENCH_KEEP_LOGS").is_some())
            .tempdir()?;
        let http_port = free_port()?;
        let config = relay_toml(env.url, slot, &broker.brokers(), http_port);
        Ok(RelayProc {
            relay: Relay::start_in(dir, &config, &delivery.env()),
            http_port,
        })
    }

    pub fn id(&self) -> u32 {
        self.relay.pid()
    }

    pub fn metrics(&self) -> Option<String> {
        scrape(self.http_port)
    }

    /// Fails with the log tail if the relay has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.relay.try_wait() {
            bail!("the relay exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    /// The relay's WARN and ERROR lines (the last ten), or its log tail if it has none.
    pub fn warnings(&self) -> String {
        let log = self.relay.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        if lines.is_empty() {
            return self.log_tail();
        }
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    pub fn log_tail(&self) -> String {
        self.relay.log_tail()
    }

    /// user + system CPU seconds so far.
    pub fn cpu_secs(&self, clk_tck: f64) -> f64 {
        proc_cpu_ticks(self.id()).map_or(f64::NAN, |t| t as f64 / clk_tck)
    }

    pub fn peak_rss_kb(&self) -> u64 {
        proc_status_kb(self.id(), "VmHWM").unwrap_or(0)
    }

    /// SIGTERM, then up to 10 s for a graceful exit (then SIGKILL).
    pub fn stop(mut self) {
        self.relay.terminate(Duration::from_secs(10));
    }
}
