//! The incumbent (measurement 6): Debezium as users deploy it, Kafka Connect standalone
//! (`org.apache.kafka.connect.cli.ConnectStandalone`) with Debezium's PostgreSQL connector
//! (`pgoutput`) and its Outbox Event Router, producing the relay's record contract (topic
//! `outbox.event.<aggregate_type>`, key = aggregate id, value = payload as stored, header `id`).
//!
//! Its jars come from Maven Central through `benches/debezium/pom.xml` into
//! `target/debezium-<version>/libs`, fetched by the bench when missing. It reads the same WAL on
//! its own slot (created before the backlog, like every other reader's) and its own
//! publication, and produces to the same broker. What it costs is read from `/proc` (the JVM's
//! CPU time and `VmHWM`), how far it got from the topic's end offsets.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use testkit::{free_port, java_bin, maven_fetch, Proc};

use crate::backlog::drop_slot;
use crate::broker::Broker;
use crate::latency::{paced_write, WriterStats};
use crate::observe::{append_latencies, first_record, EndOffsets};
use crate::procfs::{proc_cpu_ticks, proc_status_kb};
use crate::side_by_side::{PeerDrain, PeerLatency};
use crate::{Env, DB, SCRAPE_EVERY, STALL, WARM_UP_SECS};

/// Every Debezium artifact's version.
pub const DEBEZIUM_VERSION: &str = "3.6.1.Final";

/// The Kafka Connect runtime: the Kafka release Debezium 3.6.1 is built against
/// (`version.kafka` in `io.debezium:debezium-build-parent:3.6.1.Final`).
pub const CONNECT_VERSION: &str = "4.3.0";

/// Debezium's own publication (on `outbox.events`, created once before any slot).
pub const DEBEZIUM_PUBLICATION: &str = "bench_debezium";

/// The JVM flags of Kafka's `connect-standalone` launcher: its default heap
/// (`KAFKA_HEAP_OPTS`) and G1 settings (`KAFKA_JVM_PERFORMANCE_OPTS`).
pub const JVM_FLAGS: &[&str] = &[
    "-Xms256M",
    "-Xmx2G",
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
];

/// How long Connect may take to fetch, start and produce its first record.
const START_DEADLINE: Duration = Duration::from_secs(120);

/// The worker's producer settings: the relay's (SPEC §3 and `sink::kafka::client_config`) as far
/// as the Java producer has them. librdkafka's `batch.size` default is 1,000,000 bytes; the
/// Java producer's `max.in.flight.requests.per.connection` of 5 is librdkafka's idempotent
/// maximum too.
pub const PRODUCER_SETTINGS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("compression.type", "lz4"),
    ("linger.ms", "5"),
    ("batch.size", "1000000"),
    ("max.in.flight.requests.per.connection", "5"),
];

/// `target/debezium-<version>/libs`, fetched through Maven when missing (staged, then renamed
/// into place, so an interrupted fetch leaves nothing half done). Also checks that there is a
/// `java`.
pub fn setup_debezium() -> std::result::Result<PathBuf, String> {
    let java = Command::new(java_bin())
        .arg("-version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !java.is_ok_and(|s| s.success()) {
        return Err(format!(
            "no java ({} -version failed)",
            java_bin().display()
        ));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let home = target.join(format!(
        "debezium-{}",
        DEBEZIUM_VERSION.trim_end_matches(".Final")
    ));
    let libs = home.join("libs");
    if !libs.is_dir() {
        eprintln!(
            "[bench] fetching Debezium {DEBEZIUM_VERSION} and Kafka Connect {CONNECT_VERSION} (mvn)"
        );
    }
    let pom = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/debezium/pom.xml");
    maven_fetch(
        &pom,
        &libs,
        &format!("Debezium {DEBEZIUM_VERSION} and Kafka Connect {CONNECT_VERSION}"),
    )?;
    Ok(libs)
}

/// The worker's log: warnings, plus the worker's and the producer's effective configs (logged
/// once at start), so a run shows the settings it ran with.
const LOG4J2: &str = "status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = info
";

/// `connect-standalone.properties`: the worker. `offset.flush.interval.ms` is left at its
/// default (60 s), as users run it.
fn worker_properties(brokers: &str, dir: &Path, rest_port: u16) -> String {
    let mut out = format!(
        "bootstrap.servers={brokers}
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
offset.storage.file.filename={}
listeners=http://127.0.0.1:{rest_port}
",
        dir.join("connect.offsets").display()
    );
    for (key, value) in PRODUCER_SETTINGS {
        let _ = writeln!(out, "producer.{key}={value}");
    }
    out
}

/// The connector: PostgreSQL (`pgoutput`) on `slot` and Debezium's publication, streaming
/// only (no snapshot: it reads the backlog from the WAL, like the relay), and the Outbox Event
/// Router shaping each insert into the relay's record.
fn connector_properties(env: &Env<'_>, slot: &str) -> String {
    format!(
        "name=bench-outbox
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
database.hostname=127.0.0.1
database.port={port}
database.user=postgres
database.password=postgres
database.dbname={DB}
topic.prefix=bench
slot.name={slot}
publication.name={DEBEZIUM_PUBLICATION}
publication.autocreate.mode=disabled
snapshot.mode=no_data
table.include.list=outbox.events
tombstones.on.delete=false
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
transforms.outbox.table.field.event.id=id
transforms.outbox.table.field.event.key=aggregate_id
transforms.outbox.table.field.event.payload=payload
transforms.outbox.route.by.field=aggregate_type
transforms.outbox.route.topic.replacement=outbox.event.${{routedByValue}}
transforms.outbox.table.fields.additional.placement=event_type:header:event_type,aggregate_type:header:aggregate_type
",
        port = env.pg.port()
    )
}

/// A Kafka Connect standalone worker running the connector; killed on drop.
pub struct Connect {
    proc: Proc,
    dir: tempfile::TempDir,
}

impl Connect {
    pub fn start(env: &Env<'_>, libs: &Path, brokers: &str, slot: &str) -> Result<Connect> {
        let dir = tempfile::Builder::new()
            .prefix("relay-bench-debezium-")
            .disable_cleanup(std::env::var_os("RELAY_BENCH_KEEP_LOGS").is_some())
            .tempdir()?;
        let worker = dir.path().join("connect-standalone.properties");
        let connector = dir.path().join("outbox-connector.properties");
        let log4j = dir.path().join("connect-log4j2.properties");
        fs::write(
            &worker,
            worker_properties(brokers, dir.path(), free_port()?),
        )?;
        fs::write(&connector, connector_properties(env, slot))?;
        fs::write(&log4j, LOG4J2)?;
        let log = fs::File::create(dir.path().join("connect.log"))?;
        let mut cmd = Command::new(java_bin());
        cmd.args(JVM_FLAGS)
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(&worker)
            .arg(&connector)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let proc = Proc::spawn("kafka connect", &mut cmd)?;
        Ok(Connect { proc, dir })
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    pub fn cpu_secs(&self, clk_tck: f64) -> f64 {
        proc_cpu_ticks(self.pid()).map_or(f64::NAN, |t| t as f64 / clk_tck)
    }

    pub fn peak_rss_kb(&self) -> u64 {
        proc_status_kb(self.pid(), "VmHWM").unwrap_or(0)
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.proc.try_wait() {
            bail!("kafka connect exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    /// The last 40 lines of the worker's log.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("connect.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGTERM (a clean stop commits offsets), then up to 10 s before SIGKILL.
    pub fn stop(mut self) {
        self.proc.terminate(Duration::from_secs(10));
    }
}

/// Debezium draining a backlog of `n` events on `slot`: from the worker's spawn until the
/// topic's end offsets reach `n`, with the JVM's CPU time and peak RSS.
pub fn drain_debezium(
    env: &Env<'_>,
    broker: &dyn Broker,
    libs: &Path,
    slot: &str,
    n: u64,
) -> Result<PeerDrain> {
    let offsets = EndOffsets::new(&broker.brokers())?;
    let t0 = Instant::now();
    let mut connect = Connect::start(env, libs, &broker.brokers(), slot)?;
    // (when, records, CPU seconds) at the first record seen.
    let mut first = None;
    let mut progress = (0, Instant::now());
    loop {
        connect.check_alive()?;
        let appended = offsets.total()?;
        let now = t0.elapsed().as_secs_f64();
        if appended > 0 && first.is_none() {
            first = Some((now, appended, connect.cpu_secs(env.clk_tck)));
        }
        if appended >= n {
            let cpu_secs = connect.cpu_secs(env.clk_tck);
            let (first_secs, first_records, first_cpu) = first.unwrap_or((now, 0, cpu_secs));
            let drain = PeerDrain {
                events: n,
                secs: now,
                first_record_secs: first_secs,
                first_records,
                cpu_secs,
                peak_rss_kb: connect.peak_rss_kb(),
                steady_cpu_secs: Some(cpu_secs - first_cpu),
            };
            connect.stop();
            first_record(&broker.brokers())?
                .check(env)
                .context("Debezium's records do not have the relay's contract")?;
            return Ok(drain);
        }
        if appended > progress.0 {
            progress = (appended, Instant::now());
        } else {
            let limit = if appended == 0 { START_DEADLINE } else { STALL };
            if progress.1.elapsed() > limit {
                let tail = connect.log_tail();
                connect.stop();
                bail!(
                    "Debezium appended nothing for {limit:?} ({appended} of {n}); its log:\n{tail}"
                );
            }
        }
        std::thread::sleep(SCRAPE_EVERY);
    }
}

/// Debezium following the paced writer at `rate` events/s for `secs` s (after [`WARM_UP_SECS`] of warm-up),
/// one event per transaction, on a broker whose topic has `LogAppendTime`: commit (as the
/// writer saw it return) to the broker's append, per event.
pub fn debezium_latency(
    env: &Env<'_>,
    broker: &dyn Broker,
    libs: &Path,
    rate: u64,
    secs: u64,
) -> Result<PeerLatency> {
    let slot = "bench_debezium_latency";
    env.pg.psql(
        DB,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    )?;
    let result = (|| {
        let mut connect = Connect::start(env, libs, &broker.brokers(), slot)?;
        let offsets = EndOffsets::new(&broker.brokers())?;
        let warm = rate * WARM_UP_SECS;
        let count = rate * secs;
        // Its first records show it streams; the rest of the warm-up lets the JIT settle.
        let mut written = 0;
        let started = Instant::now();
        while offsets.total()? == 0 {
            connect.check_alive()?;
            if started.elapsed() > START_DEADLINE {
                bail!("Debezium did not start streaming:\n{}", connect.log_tail());
            }
            env.rt
                .block_on(paced_write(env.url.to_owned(), rate, rate / 10, written))
                .context("warm-up writer")?;
            written += rate / 10;
        }
        env.rt
            .block_on(paced_write(env.url.to_owned(), rate, warm, written))
            .context("warm-up writer")?;
        let first = written + warm;
        wait_appended(&mut connect, &offsets, first)?;
        let cpu0 = connect.cpu_secs(env.clk_tck);
        let writer: WriterStats = env
            .rt
            .block_on(paced_write(env.url.to_owned(), rate, count, first))
            .context("paced writer")?;
        wait_appended(&mut connect, &offsets, first + count)?;
        let cpu = connect.cpu_secs(env.clk_tck) - cpu0;
        let peak_rss_kb = connect.peak_rss_kb();
        connect.stop();
        let appended = append_latencies(&broker.brokers(), first, &writer.commits_us)
            .context("reading Debezium's records back")?;
        Ok(PeerLatency {
            events: count,
            achieved_rate: count as f64 / writer.secs,
            appended,
            cpu_us_per_event: cpu * 1e6 / count as f64,
            peak_rss_kb,
        })
    })();
    drop_slot(env, slot)?;
    env.pg.psql(DB, "TRUNCATE outbox.events")?;
    result
}

/// Waits (up to a minute) until the topic holds `n` records.
fn wait_appended(connect: &mut Connect, offsets: &EndOffsets, n: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        connect.check_alive()?;
        let appended = offsets.total()?;
        if appended >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "Debezium appended {appended} of {n} records within a minute:\n{}",
                connect.log_tail()
            ));
        }
        std::thread::sleep(SCRAPE_EVERY);
    }
}
