//! A peer (measurement 5): `pg_recvlogical` with wal2json piped into a minimal Python producer
//! on PyPI's `confluent-kafka`, what a user would script instead.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use outbox_relay::config::KafkaConfig;
use outbox_relay::sink::kafka::client_config;
use pgwire_replication::Lsn;
use testkit::{Proc, ThrowawayPostgres};

use crate::backlog::drop_slot;
use crate::broker::Broker;
use crate::latency::paced_write;
use crate::observe::{append_latencies, EndOffsets};
use crate::procfs::{proc_cpu_ticks, proc_state, proc_status_kb};
use crate::side_by_side::{PeerDrain, PeerLatency};
use crate::{Env, DB, SCRAPE_EVERY, WARM_UP_SECS};

/// The peer's producer: wal2json (format-version 2, one change per line) on stdin, one
/// record per inserted outbox row, the relay's record shape and librdkafka settings.
pub const PEER_PY: &str = r#"
import json, sys
from confluent_kafka import Producer

conf = json.loads(sys.argv[1])
producer = Producer(conf)
state = {"delivered": 0, "failed": 0}

def on_delivery(err, msg):
    if err is None:
        state["delivered"] += 1
    else:
        state["failed"] += 1

def text(v):
    return v if isinstance(v, str) else json.dumps(v)

for line in sys.stdin.buffer:
    change = json.loads(line)
    if change.get("action") != "I":
        continue
    row = {c["name"]: c["value"] for c in change["columns"]}
    headers = [("id", row["id"]), ("event_type", row["event_type"]),
               ("aggregate_type", row["aggregate_type"]), ("pg_lsn", change.get("lsn", ""))]
    extra = row.get("headers")
    if isinstance(extra, str):
        extra = json.loads(extra)
    for k, v in (extra or {}).items():
        headers.append((k, text(v)))
    payload = row.get("payload")
    topic = "outbox.event." + row["aggregate_type"]
    while True:
        try:
            producer.produce(topic, key=row["aggregate_id"],
                             value=None if payload is None else text(payload),
                             headers=headers, on_delivery=on_delivery)
            break
        except BufferError:
            producer.poll(0.005)
    producer.poll(0)
producer.flush()
print(json.dumps(state), flush=True)
"#;

/// Makes sure wal2json and a Python with confluent-kafka are there (installing them if
/// missing); returns that Python.
pub fn setup_peer(pg: &ThrowawayPostgres) -> std::result::Result<PathBuf, String> {
    let bin = pg.bin_dir();
    if !bin.join("pg_recvlogical").is_file() {
        return Err(format!("no pg_recvlogical in {}", bin.display()));
    }
    let lib = bin
        .parent()
        .map(|p| p.join("lib").join("wal2json.so"))
        .ok_or("no Postgres lib directory")?;
    if !lib.is_file() {
        let major = postgres_major(bin).ok_or("cannot tell the Postgres major version")?;
        let package = format!("postgresql-{major}-wal2json");
        eprintln!("[bench] installing {package} (apt-get)");
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", &package])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() {
            let _ = Command::new("apt-get")
                .arg("update")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            install();
        }
        if !lib.is_file() {
            return Err(format!(
                "wal2json is not installed ({} missing; `apt-get install {package}` failed)",
                lib.display()
            ));
        }
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("relay-bench-peer-venv");
    let python = venv.join("bin").join("python");
    let has_client = |python: &Path| {
        Command::new(python)
            .args(["-c", "import confluent_kafka"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_client(&python) {
        eprintln!(
            "[bench] installing confluent-kafka (pip) into {}",
            venv.display()
        );
        let venv_ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !venv_ok {
            return Err("`python3 -m venv` failed".into());
        }
        let pip_ok = Command::new(venv.join("bin").join("pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "confluent-kafka",
            ])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !pip_ok || !has_client(&python) {
            return Err("`pip install confluent-kafka` failed".into());
        }
    }
    Ok(python)
}

pub fn postgres_major(bin: &Path) -> Option<u32> {
    let out = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.split('.').next()?.parse().ok())
}

/// The script running: `pg_recvlogical` on `slot` (up to `end`, or until stopped) piped into
/// the Python producer.
struct Script {
    recv: Proc,
    producer: Proc,
    dir: tempfile::TempDir,
}

impl Script {
    fn start(
        env: &Env<'_>,
        broker: &dyn Broker,
        python: &Path,
        slot: &str,
        end: Option<u64>,
    ) -> Result<Script> {
        let dir = tempfile::Builder::new()
            .prefix("relay-bench-peer-")
            .tempdir()?;
        let script = dir.path().join("peer.py");
        fs::write(&script, PEER_PY)?;
        let kafka = KafkaConfig {
            brokers: broker.brokers(),
            ..KafkaConfig::default()
        };
        let conf: BTreeMap<String, String> = client_config(&kafka)
            .config_map()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let conf = serde_json::to_string(&conf)?;
        let log = fs::File::create(dir.path().join("peer.log"))?;
        let mut recv_cmd = Command::new(env.pg.bin_dir().join("pg_recvlogical"));
        recv_cmd
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", DB])
            .arg("-p")
            .arg(env.pg.port().to_string())
            .args(["--slot", slot, "--start", "--no-loop", "-f", "-"]);
        if let Some(end) = end {
            recv_cmd.arg(format!("--endpos={}", Lsn::from_u64(end)));
        }
        recv_cmd
            .args(["-o", "format-version=2", "-o", "include-lsn=true"])
            .args(["-o", "add-tables=outbox.events"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?);
        let mut recv = Proc::spawn("pg_recvlogical", &mut recv_cmd)?;
        let changes = recv
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no pg_recvlogical stdout"))?;
        let mut py_cmd = Command::new(python);
        py_cmd
            .arg(&script)
            .arg(&conf)
            .stdin(Stdio::from(changes))
            .stdout(Stdio::piped())
            .stderr(log);
        let producer = Proc::spawn("peer producer", &mut py_cmd)?;
        Ok(Script {
            recv,
            producer,
            dir,
        })
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("peer.log")).unwrap_or_default()
    }

    /// Both processes' CPU ticks and `VmHWM` (kB) now, folded into `usage` (the highest seen:
    /// an exited process keeps its last figures).
    fn sample(&self, usage: &mut Usage) {
        for (i, pid) in [self.recv.id(), self.producer.id()].into_iter().enumerate() {
            if let Some(ticks) = proc_cpu_ticks(pid) {
                usage.ticks[i] = usage.ticks[i].max(ticks);
            }
            if let Some(kb) = proc_status_kb(pid, "VmHWM") {
                usage.hwm_kb[i] = usage.hwm_kb[i].max(kb);
            }
        }
    }

    /// Waits (sampling) until the producer has exited, and reads its report.
    fn finish(&mut self, usage: &mut Usage, deadline: Instant, n: u64) -> Result<u64> {
        // Sampled until it is a zombie, whose CPU times are final, and only then reaped.
        while proc_state(self.producer.id()).is_some_and(|s| s != 'Z') {
            self.sample(usage);
            if Instant::now() >= deadline {
                bail!("the peer did not finish in time:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.sample(usage);
        let Some(status) = self
            .producer
            .wait_until(Instant::now() + Duration::from_secs(10))
        else {
            bail!("the peer producer did not exit");
        };
        let mut out = String::new();
        if let Some(mut stdout) = self.producer.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        if !status.success() {
            bail!("the peer producer exited ({status}):\n{}", self.log());
        }
        let result: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("peer output {out:?}\n{}", self.log()))?;
        let delivered = result["delivered"].as_u64().unwrap_or(0);
        let failed = result["failed"].as_u64().unwrap_or(0);
        if delivered < n || failed != 0 {
            bail!(
                "the peer delivered {delivered} of {n} records ({failed} failed):\n{}",
                self.log()
            );
        }
        Ok(delivered)
    }
}

/// CPU ticks and peak RSS of `pg_recvlogical` and the producer.
#[derive(Default)]
struct Usage {
    ticks: [u64; 2],
    hwm_kb: [u64; 2],
}

impl Usage {
    fn cpu_secs(&self, clk_tck: f64) -> f64 {
        (self.ticks[0] + self.ticks[1]) as f64 / clk_tck
    }
    fn peak_rss_kb(&self) -> u64 {
        self.hwm_kb[0] + self.hwm_kb[1]
    }
}

/// The script draining a backlog of `n` events on `slot` up to `end`: from its spawn until
/// the topic's end offsets reach `n` (first and last record appended), with both processes'
/// CPU time and peak RSS.
pub fn run_peer(
    env: &Env<'_>,
    broker: &dyn Broker,
    python: &Path,
    slot: Option<&str>,
    n: u64,
    end: u64,
) -> Result<PeerDrain> {
    let slot = slot.ok_or_else(|| anyhow!("no peer slot"))?;
    let offsets = EndOffsets::new(&broker.brokers())?;
    let t0 = Instant::now();
    let mut script = Script::start(env, broker, python, slot, Some(end))?;
    let deadline = t0 + Duration::from_secs(120 + n / 500);
    let mut usage = Usage::default();
    // (when, records) at the first record seen.
    let mut first = None;
    let last = loop {
        script.sample(&mut usage);
        let appended = offsets.total()?;
        let now = t0.elapsed().as_secs_f64();
        if appended > 0 && first.is_none() {
            first = Some((now, appended));
        }
        if appended >= n {
            break now;
        }
        if proc_state(script.producer.id()).is_none_or(|s| s == 'Z') {
            // It exited early: `finish` says why.
            script.finish(&mut usage, deadline, n)?;
            bail!("the peer exited with {appended} of {n} records appended");
        }
        if Instant::now() >= deadline {
            bail!("the peer did not finish in time:\n{}", script.log());
        }
        std::thread::sleep(SCRAPE_EVERY);
    };
    script.finish(&mut usage, deadline, n)?;
    script.recv.terminate(Duration::from_secs(5));
    let (first_record_secs, first_records) = first.unwrap_or((last, 0));
    Ok(PeerDrain {
        events: n,
        secs: last,
        first_record_secs,
        first_records,
        cpu_secs: usage.cpu_secs(env.clk_tck),
        peak_rss_kb: usage.peak_rss_kb(),
        steady_cpu_secs: None,
    })
}

/// The script following the paced writer at `rate` events/s for `secs` s (after 2 s of
/// warm-up) on a broker whose topic has `LogAppendTime`: commit (as the writer saw it return)
/// to the broker's append, per event.
pub fn peer_latency(
    env: &Env<'_>,
    broker: &dyn Broker,
    python: &Path,
    rate: u64,
    secs: u64,
) -> Result<PeerLatency> {
    let slot = "bench_peer_latency";
    env.pg.psql(
        DB,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'wal2json')"),
    )?;
    let result = (|| {
        let offsets = EndOffsets::new(&broker.brokers())?;
        let mut script = Script::start(env, broker, python, slot, None)?;
        let mut usage = Usage::default();
        let warm = rate * WARM_UP_SECS;
        let count = rate * secs;
        env.rt
            .block_on(paced_write(env.url.to_owned(), rate, warm, 0))
            .context("warm-up writer")?;
        wait_appended(&offsets, warm, &script)?;
        script.sample(&mut usage);
        let ticks0 = usage.ticks;
        let writer = env
            .rt
            .block_on(paced_write(env.url.to_owned(), rate, count, warm))
            .context("paced writer")?;
        wait_appended(&offsets, warm + count, &script)?;
        script.sample(&mut usage);
        let cpu = (usage.ticks[0] + usage.ticks[1] - ticks0[0] - ticks0[1]) as f64 / env.clk_tck;
        // Its end of input: the producer flushes and exits.
        script.recv.terminate(Duration::from_secs(5));
        script.finish(
            &mut usage,
            Instant::now() + Duration::from_secs(60),
            warm + count,
        )?;
        let appended = append_latencies(&broker.brokers(), warm, &writer.commits_us)
            .context("reading the peer's records back")?;
        Ok(PeerLatency {
            events: count,
            achieved_rate: count as f64 / writer.secs,
            appended,
            cpu_us_per_event: cpu * 1e6 / count as f64,
            peak_rss_kb: usage.peak_rss_kb(),
        })
    })();
    drop_slot(env, slot)?;
    env.pg.psql(DB, "TRUNCATE outbox.events")?;
    result
}

/// Waits (up to a minute) until the topic holds `n` records.
fn wait_appended(offsets: &EndOffsets, n: u64, script: &Script) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let appended = offsets.total()?;
        if appended >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the peer appended {appended} of {n} records within a minute:\n{}",
                script.log()
            );
        }
        std::thread::sleep(SCRAPE_EVERY);
    }
}
