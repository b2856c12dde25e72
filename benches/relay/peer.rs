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
use testkit::{Proc, Tansu, ThrowawayPostgres};

use crate::report::{Peer, Rate};
use crate::{Env, DB};

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

pub fn run_peer(
    env: &Env<'_>,
    tansu: &Tansu,
    python: &Path,
    slot: Option<&str>,
    n: u64,
    end: u64,
) -> Result<Peer> {
    let slot = slot.ok_or_else(|| anyhow!("no peer slot"))?;
    let dir = tempfile::Builder::new()
        .prefix("relay-bench-peer-")
        .tempdir()?;
    let script = dir.path().join("peer.py");
    fs::write(&script, PEER_PY)?;
    let kafka = KafkaConfig {
        brokers: tansu.brokers(),
        ..KafkaConfig::default()
    };
    let conf: BTreeMap<String, String> = client_config(&kafka)
        .config_map()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let conf = serde_json::to_string(&conf)?;
    let log = fs::File::create(dir.path().join("peer.log"))?;

    let t0 = Instant::now();
    let mut recv_cmd = Command::new(env.pg.bin_dir().join("pg_recvlogical"));
    recv_cmd
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", DB])
        .arg("-p")
        .arg(env.pg.port().to_string())
        .args(["--slot", slot, "--start", "--no-loop", "-f", "-"])
        .arg(format!("--endpos={}", Lsn::from_u64(end)))
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
    let mut producer = Proc::spawn("peer producer", &mut py_cmd)?;
    let Some(status) = producer.wait_until(t0 + Duration::from_secs(120 + n / 500)) else {
        bail!("the peer did not finish in time");
    };
    let secs = t0.elapsed().as_secs_f64();
    let mut out = String::new();
    if let Some(mut stdout) = producer.child.stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    let peer_log = fs::read_to_string(dir.path().join("peer.log")).unwrap_or_default();
    if !status.success() {
        bail!("the peer producer exited ({status}):\n{peer_log}");
    }
    recv.terminate(Duration::from_secs(5));
    let result: serde_json::Value = serde_json::from_str(out.trim())
        .with_context(|| format!("peer output {out:?}\n{peer_log}"))?;
    let delivered = result["delivered"].as_u64().unwrap_or(0);
    let failed = result["failed"].as_u64().unwrap_or(0);
    if delivered != n || failed != 0 {
        bail!("the peer delivered {delivered} of {n} records ({failed} failed):\n{peer_log}");
    }
    Ok(Peer::Ran {
        rate: Rate {
            events: n,
            secs,
            cpu_secs: f64::NAN,
        },
        delivered,
    })
}
