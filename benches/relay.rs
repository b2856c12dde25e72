//! The relay benchmark (SPEC §9, `docs/PERFORMANCE.md`):
//!
//! ```sh
//! cargo bench --bench relay              # full run: 1,000,000-event backlogs, 30 s latency run
//! cargo bench --bench relay -- --quick   # 50,000-event backlogs, 10 s latency run
//! cargo bench --bench relay -- --events 200000   # another backlog size
//! ```
//!
//! One run on one machine, everything local: a throwaway Postgres (`wal_level = logical`), a
//! fresh in-memory `tansu` broker for every Kafka measurement, and the relay binary (built by
//! `cargo bench` with the bench profile) as a child process. It measures, for the same WAL:
//!
//! 1. the **decode ceiling**: a null consumer of the replication stream (pgwire-replication and
//!    our `pgoutput::decode`, every column walked, nothing sent), on its own slot created
//!    before the backlog was written, until it has seen the backlog's last `Commit`;
//! 2. the **broker ceiling**: a plain rdkafka producer with the relay's producer settings
//!    (`sink::kafka::client_config`) sending records of the same shape, until every delivery
//!    report is in;
//! 3. **relay throughput** for 1, 10 and 100 events per transaction (and one transaction of
//!    the whole backlog): the relay binary draining the backlog on its own slot, from its spawn
//!    until `outbox_relay_events_published_total` reaches N and the slot's
//!    `confirmed_flush_lsn` reaches the end of the backlog; with the relay's CPU time
//!    (`/proc/PID/stat`) and peak RSS (`VmHWM`);
//! 4. **latency**: commit to Kafka ack at a steady paced rate, one event per transaction, from
//!    the relay's own histogram (bucket-interpolated like Prometheus' `histogram_quantile`);
//! 5. a **peer**: `pg_recvlogical` with wal2json piped into a minimal Python producer on
//!    PyPI's `confluent-kafka`, what a user would script instead (skipped, with the reason,
//!    when wal2json or confluent-kafka cannot be installed).
//!
//! It prints a table and then one JSON line. Progress goes to stderr. With
//! `RELAY_BENCH_KEEP_LOGS=1` the relay's config and log directories (`/tmp/relay-bench-*`)
//! are kept; with `RELAY_BENCH_TRACE=1` every scrape of a drain is printed;
//! `RELAY_BENCH_KAFKA_PROPERTIES="k=v,..."` adds producer settings to the relay under test. Run under `cargo test`
//! or `cargo nextest` (no `--bench` argument) it does nothing: it is not a test.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use outbox_relay::config::{Config, KafkaConfig};
use outbox_relay::sink::kafka::client_config;
use outbox_relay::source::logical::replication_config;
use outbox_relay::source::pgoutput::{self, Message};
use outbox_relay::source::setup::OUTBOX_SQL;
use outbox_relay::demo::postgres::{free_port, PostgresOptions, ThrowawayPostgres};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use tokio::runtime::Runtime;

/// The relay's allocator, so the null consumer and the plain producer pay what the relay pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The database the bench writes to.
const DB: &str = "bench";
/// The publication every slot streams (the relay's default name).
const PUBLICATION: &str = "outbox_relay";
/// Every event has aggregate type `order`, so every record goes to this topic.
const TOPIC: &str = "outbox.event.order";
/// The relay's default `kafka.topic_partitions`.
const PARTITIONS: i32 = 3;
/// Distinct aggregate ids (Kafka keys).
const AGGREGATES: u64 = 10_000;
/// How often a drain looks at the relay's `/metrics`.
const SCRAPE_EVERY: Duration = Duration::from_millis(25);
/// A drain that makes no progress for this long has failed.
const STALL: Duration = Duration::from_secs(60);
/// How often the null consumers confirm their position (the relay's tick).
const CONFIRM_EVERY: Duration = Duration::from_millis(50);
/// Connections of the paced writer in the latency run.
const WRITER_CONNECTIONS: u64 = 4;

/// The event shape, server side: a ~110-byte JSON payload and one extra header (`trace_id`),
/// so every record carries 5 headers (`id`, `event_type`, `aggregate_type`, `pg_lsn`,
/// `trace_id`). `bench.fill` writes a backlog of `total` events, `per_tx` per transaction.
/// (The expressions are written out rather than put in SQL functions: an inlined SQL function
/// is parsed again whenever the statement is planned, which made the 1-per-transaction
/// backlog three times slower to write.)
const BENCH_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS bench;
CREATE OR REPLACE PROCEDURE bench.fill(total bigint, per_tx bigint) LANGUAGE plpgsql AS $$
DECLARE
    i bigint := 0;
BEGIN
    WHILE i < total LOOP
        INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload, headers)
        SELECT 'order', (g % 10000)::text, 'OrderPlaced',
            jsonb_build_object('order_id', g, 'customer_id', 'customer-' || (g % 1000),
                'amount', round((g % 100000) / 100.0, 2), 'currency', 'EUR',
                'items', g % 7 + 1, 'status', 'placed'),
            jsonb_build_object('trace_id', md5(g::text))
        FROM generate_series(i, least(i + per_tx, total) - 1) AS g;
        COMMIT;
        i := i + per_tx;
    END LOOP;
END
$$;
"#;

/// One paced event, one transaction (autocommit); the values are formatted client side, as
/// an application would, by [`event_fields`].
const INSERT_ONE: &str = "INSERT INTO outbox.events \
    (aggregate_type, aggregate_id, event_type, payload, headers) \
    VALUES ('order', $1::text, 'OrderPlaced', $2::text::jsonb, $3::text::jsonb)";

/// The peer's producer: wal2json (format-version 2, one change per line) on stdin, one
/// record per inserted outbox row, the relay's record shape and librdkafka settings.
const PEER_PY: &str = r#"
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; `cargo test` and `cargo nextest` (which lists with
    // `--list`) do not: there are no tests here, and a benchmark must not run as one.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let opts = match Opts::parse(&args) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("relay bench: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&opts) {
        eprintln!("relay bench failed: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Options and the run
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    /// Events in each backlog (and rows in the single big transaction).
    events: u64,
    latency_rate: u64,
    latency_secs: u64,
    /// `--only PARTS`: run just these parts (while iterating), a comma-separated list of
    /// `100`, `10`, `1`, `big` (the backlogs), `backlogs` (all four) and `latency`.
    only: Option<Vec<String>>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut opts = Opts {
            quick,
            events: if quick { 50_000 } else { 1_000_000 },
            latency_rate: 5_000,
            latency_secs: if quick { 10 } else { 30 },
            only: None,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| -> Result<u64> {
                it.next()
                    .ok_or_else(|| anyhow!("{name} needs a value"))?
                    .replace('_', "")
                    .parse()
                    .with_context(|| format!("{name} takes a number"))
            };
            match arg.as_str() {
                "--events" => opts.events = value("--events")?.max(1000),
                "--latency-secs" => opts.latency_secs = value("--latency-secs")?.max(1),
                "--latency-rate" => opts.latency_rate = value("--latency-rate")?.max(1),
                "--only" => {
                    let parts: Vec<String> = it
                        .next()
                        .ok_or_else(|| anyhow!("--only needs a value"))?
                        .split(',')
                        .map(str::to_owned)
                        .collect();
                    for part in &parts {
                        if !["100", "10", "1", "big", "backlogs", "latency"]
                            .contains(&part.as_str())
                        {
                            bail!("--only takes a list of 100, 10, 1, big, backlogs, latency");
                        }
                    }
                    opts.only = Some(parts);
                }
                _ => {}
            }
        }
        Ok(opts)
    }
}

/// What one relay drain measured.
#[derive(Debug, Clone, Default)]
struct Drain {
    events: u64,
    /// Spawn to the slot confirmed past the backlog.
    secs: f64,
    /// Spawn to the last acknowledgement counted in `/metrics`.
    acked_secs: f64,
    /// Spawn to the first acknowledgement seen in `/metrics` (start-up: connections, slot,
    /// topic metadata).
    first_ack_secs: f64,
    cpu_secs: f64,
    peak_rss_kb: u64,
    /// Cores busy machine-wide during the drain (Postgres, tansu, the relay and anything
    /// else running): near the core count, the machine was the limit.
    host_cores: f64,
    /// Of those, cores busy with processes that are not the bench's (not the bench, the
    /// relay, tansu or the Postgres cluster): other work on a shared machine.
    other_cores: f64,
}

impl Drain {
    fn eps(&self) -> f64 {
        self.events as f64 / self.secs
    }
    fn cpu_us_per_event(&self) -> f64 {
        self.cpu_secs * 1e6 / self.events as f64
    }
}

/// One backlog shape: its null consumer and its relay drain.
#[derive(Debug, Clone)]
struct Shape {
    label: String,
    per_tx: u64,
    write_secs: f64,
    /// The decode ceiling: the fastest of the runs below.
    decode: f64,
    /// The faster null-consumer run, whose CPU per event is the client side of decoding.
    null: Rate,
    /// Every null consumer's rate: ours before and after the relay's drain, and
    /// `pg_recvlogical` into `/dev/null` (None when it could not run).
    decode_runs: [Option<f64>; 3],
    /// The drain, or why it failed (the other measurements still run).
    relay: std::result::Result<Drain, String>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    events: u64,
    secs: f64,
    /// CPU seconds of the bench process meanwhile (the null consumer's or the producer's
    /// own cost; the peer's is not measured).
    cpu_secs: f64,
}

impl Rate {
    fn eps(&self) -> f64 {
        self.events as f64 / self.secs
    }
    fn cpu_us_per_event(&self) -> f64 {
        self.cpu_secs * 1e6 / self.events as f64
    }
}

/// CPU seconds of this process so far (all threads).
fn own_cpu_secs() -> f64 {
    static CLK_TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let tck = *CLK_TCK.get_or_init(clock_ticks);
    proc_cpu_ticks(std::process::id()).map_or(f64::NAN, |t| t as f64 / tck)
}

#[derive(Debug, Clone, Default)]
struct Latency {
    events: u64,
    achieved_rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_bucket_ms: f64,
    writer_p99_ms: f64,
    writer_max_late_ms: f64,
    cpu_us_per_event: f64,
    peak_rss_kb: u64,
    /// The null consumer's commit-to-decoded latency at the same rate (exact, not bucketed).
    floor: Option<Floor>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Floor {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Clone)]
enum Peer {
    Ran { rate: Rate, delivered: u64 },
    Skipped(String),
}

fn run(opts: &Opts) -> Result<()> {
    let n = opts.events;
    eprintln!(
        "[bench] {} mode: {n} events per backlog, latency {} events/s for {} s",
        if opts.quick { "quick" } else { "full" },
        opts.latency_rate,
        opts.latency_secs
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let clk_tck = clock_ticks();
    let tansu_bin = tansu_bin()?;

    let pg = ThrowawayPostgres::start_with(
        &PostgresOptions::default()
            .setting("max_wal_size", "16GB")
            .setting("checkpoint_timeout", "1h")
            .setting("shared_buffers", "512MB")
            // Vacuum of the freshly written backlog would compete with the measurement.
            .setting("autovacuum", "off"),
    )
    .context("starting postgres")?;
    pg.create_database(DB)?;
    pg.psql(DB, OUTBOX_SQL).context("applying sql/outbox.sql")?;
    pg.psql(DB, BENCH_SQL)
        .context("creating the bench functions")?;
    pg.psql(
        DB,
        &format!("CREATE PUBLICATION {PUBLICATION} FOR TABLE outbox.events"),
    )?;
    let url = pg.url(DB);
    let db = rt.block_on(connect(&url))?;
    let env = Env {
        rt: &rt,
        pg: &pg,
        db: &db,
        url: &url,
        tansu_bin: &tansu_bin,
        clk_tck,
        postmaster: fs::read_to_string(pg.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok()),
    };

    let runs = |part: &str| {
        opts.only.as_ref().is_none_or(|only| {
            only.iter()
                .any(|o| o == part || (o == "backlogs" && part != "latency"))
        })
    };
    let peer_setup = if runs("100") {
        setup_peer(&pg)
    } else {
        Err("not run (--only)".to_string())
    };
    if let Err(why) = &peer_setup {
        eprintln!("[bench] peer skipped: {why}");
    }

    // 100 events per transaction: decode ceiling, broker ceiling, relay, peer, on one WAL.
    let mut shapes = Vec::new();
    let mut peer = Peer::Skipped(peer_setup.clone().err().unwrap_or_default());
    let mut broker = None;
    let backlogs = [
        (100, "100", "100 / tx"),
        (10, "10", "10 / tx"),
        (1, "1", "1 / tx"),
        (n, "big", "1 tx of N"),
    ];
    for (per_tx, tag, label) in backlogs.into_iter().filter(|b| runs(b.1)) {
        let with_peer = per_tx == 100 && peer_setup.is_ok();
        let slots = Slots::create(&env, tag, with_peer)?;
        eprintln!("[bench] writing {n} events, {per_tx} per transaction");
        let (write_secs, end) = write_backlog(&env, n, per_tx)?;
        eprintln!(
            "[bench]   written in {write_secs:.1} s ({:.0} events/s), end {}",
            n as f64 / write_secs,
            Lsn::from_u64(end)
        );

        let first = null_consume_on_own_thread(&db, &url, &slots.null[0], n, end)?;
        eprintln!(
            "[bench]   decode ceiling, null consumer: {:.0} events/s ({:.2} s)",
            first.eps(),
            first.secs
        );
        let recvlogical = match recvlogical_ceiling(&env, &slots.recvlogical, n, end) {
            Ok(rate) => {
                eprintln!(
                    "[bench]   decode ceiling, pg_recvlogical > /dev/null: {:.0} events/s ({:.2} s)",
                    rate.eps(),
                    rate.secs
                );
                Some(rate.eps())
            }
            Err(e) => {
                eprintln!("[bench]   pg_recvlogical > /dev/null failed: {e:#}");
                None
            }
        };
        if per_tx == 100 {
            let tansu = Tansu::start(&env)?;
            let rate = broker_ceiling(&tansu, n)?;
            eprintln!(
                "[bench]   broker ceiling: {:.0} events/s ({:.2} s)",
                rate.eps(),
                rate.secs
            );
            broker = Some(rate);
        }
        let relay = {
            let tansu = Tansu::start(&env)?;
            drain_relay(&env, &tansu, &slots.relay, n, end).map_err(|e| format!("{e:#}"))
        };
        match &relay {
            Ok(relay) => eprintln!(
                "[bench]   relay: {:.0} events/s ({:.2} s; last ack at {:.2} s), {:.2} us CPU/event, peak RSS {:.1} MB",
                relay.eps(),
                relay.secs,
                relay.acked_secs,
                relay.cpu_us_per_event(),
                relay.peak_rss_kb as f64 / 1024.0
            ),
            Err(e) => eprintln!("[bench]   relay FAILED: {e}"),
        }
        if with_peer {
            let tansu = Tansu::start(&env)?;
            let python = peer_setup.as_ref().expect("peer is set up");
            peer = match run_peer(&env, &tansu, python, slots.peer.as_deref(), n, end) {
                Ok(p) => p,
                Err(e) => Peer::Skipped(format!("the peer failed: {e:#}")),
            };
            match &peer {
                Peer::Ran { rate, .. } => eprintln!(
                    "[bench]   peer: {:.0} events/s ({:.2} s)",
                    rate.eps(),
                    rate.secs
                ),
                Peer::Skipped(why) => eprintln!("[bench]   peer skipped: {why}"),
            }
        }
        // The first reader of a fresh backlog can find Postgres still busy with it (the
        // checkpointer, the WAL's first read); a second run after the others gives the
        // ceiling its best chance, and the fastest run of all counts.
        let second = null_consume_on_own_thread(&db, &url, &slots.null[1], n, end)?;
        eprintln!(
            "[bench]   decode ceiling, null consumer again: {:.0} events/s ({:.2} s)",
            second.eps(),
            second.secs
        );
        let null = if second.eps() > first.eps() {
            second
        } else {
            first
        };
        let decode = recvlogical.map_or(null.eps(), |r| r.max(null.eps()));
        slots.drop_all(&env)?;
        pg.psql(DB, "TRUNCATE outbox.events")?;
        shapes.push(Shape {
            label: label.to_string(),
            per_tx,
            write_secs,
            decode,
            null,
            decode_runs: [Some(first.eps()), Some(second.eps()), recvlogical],
            relay,
        });
    }

    let latency = if runs("latency") {
        eprintln!(
            "[bench] latency: {} events/s, 1 event per transaction, {} s",
            opts.latency_rate, opts.latency_secs
        );
        let floor = latency_floor(&env, opts)?;
        eprintln!(
            "[bench]   null consumer: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            floor.p50_ms, floor.p99_ms, floor.max_ms
        );
        let tansu = Tansu::start(&env)?;
        let latency = Latency {
            floor: Some(floor),
            ..latency_run(&env, &tansu, opts)?
        };
        eprintln!(
            "[bench]   relay: p50 {:.2} ms, p99 {:.2} ms, max <= {} ms",
            latency.p50_ms, latency.p99_ms, latency.max_bucket_ms
        );
        Some(latency)
    } else {
        None
    };

    report(opts, &shapes, broker, &peer, latency.as_ref());
    Ok(())
}

/// What every phase needs.
struct Env<'a> {
    rt: &'a Runtime,
    pg: &'a ThrowawayPostgres,
    db: &'a tokio_postgres::Client,
    url: &'a str,
    tansu_bin: &'a Path,
    clk_tck: f64,
    /// The Postgres cluster's postmaster, whose children are the cluster's processes.
    postmaster: Option<u32>,
}

// ---------------------------------------------------------------------------------------------
// Postgres: slots and backlogs
// ---------------------------------------------------------------------------------------------

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// An LSN as a number, from SQL.
async fn query_lsn(db: &tokio_postgres::Client, sql: &str, slot: &str) -> Result<Option<u64>> {
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

const SLOT_CONFIRMED: &str = "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint \
    FROM pg_replication_slots WHERE slot_name = $1";

/// The slots of one backlog, created before it is written so that all see the same WAL.
struct Slots {
    /// Two null consumers: one before the relay's drain, one after.
    null: [String; 2],
    /// `pg_recvlogical` into `/dev/null`.
    recvlogical: String,
    relay: String,
    peer: Option<String>,
}

impl Slots {
    fn create(env: &Env<'_>, tag: &str, with_peer: bool) -> Result<Slots> {
        let slots = Slots {
            null: [format!("bench_null_{tag}"), format!("bench_null2_{tag}")],
            recvlogical: format!("bench_recvlogical_{tag}"),
            relay: format!("bench_relay_{tag}"),
            peer: with_peer.then(|| format!("bench_peer_{tag}")),
        };
        let mut sql = String::new();
        for slot in slots.null.iter().chain([&slots.recvlogical, &slots.relay]) {
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

    fn drop_all(&self, env: &Env<'_>) -> Result<()> {
        for slot in self
            .null
            .iter()
            .chain([&self.recvlogical, &self.relay])
            .chain(self.peer.as_ref())
        {
            drop_slot(env, slot)?;
        }
        Ok(())
    }
}

/// Drops a slot, waiting for (and then ending) a walsender still holding it.
fn drop_slot(env: &Env<'_>, slot: &str) -> Result<()> {
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
fn write_backlog(env: &Env<'_>, n: u64, per_tx: u64) -> Result<(f64, u64)> {
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

// ---------------------------------------------------------------------------------------------
// 1. The decode ceiling
// ---------------------------------------------------------------------------------------------

/// The relay's config for `slot` (also what the null consumer derives its replication
/// settings from).
fn relay_toml(url: &str, slot: &str, brokers: &str, http_port: u16) -> String {
    format!(
        r#"[postgres]
url = "{url}"

[source]
mode = "logical"
slot = "{slot}"
publication = "{PUBLICATION}"
create = true

[kafka]
brokers = "{brokers}"

[http]
listen = "127.0.0.1:{http_port}"

[log]
level = "info"
{extra}"#,
        extra = extra_kafka_properties()
    )
}

/// `RELAY_BENCH_KAFKA_PROPERTIES="linger.ms=1,batch.size=65536"`: producer settings for the
/// relay under test on top of its defaults, to try one out.
fn extra_kafka_properties() -> String {
    let Ok(list) = std::env::var("RELAY_BENCH_KAFKA_PROPERTIES") else {
        return String::new();
    };
    let mut out = String::from("\n[kafka.properties]\n");
    for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let _ = writeln!(out, "{:?} = {:?}", key.trim(), value.trim());
    }
    out
}

/// [`null_consume`] on a runtime of its own with one thread, like the relay's: the replication
/// worker and the consumer share it, so handing a message over costs no cross-thread wake-up.
fn null_consume_on_own_thread(
    db: &tokio_postgres::Client,
    url: &str,
    slot: &str,
    n: u64,
    end: u64,
) -> Result<Rate> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(null_consume(db, url, slot, n, end))
}

/// Streams `slot` from its confirmed position, decodes every message (walking every column of
/// every insert) and discards it, confirming each commit; stops at the commit that completes
/// the `n`th insert.
async fn null_consume(
    db: &tokio_postgres::Client,
    url: &str,
    slot: &str,
    n: u64,
    end: u64,
) -> Result<Rate> {
    let toml = relay_toml(url, slot, "127.0.0.1:9", 9);
    let cfg = Config::from_parts(Some(&toml), Vec::<(String, String)>::new())
        .map_err(|e| anyhow!("bench config: {e}"))?;
    let start = query_lsn(db, SLOT_CONFIRMED, slot)
        .await?
        .ok_or_else(|| anyhow!("slot {slot} missing"))?;
    let start = Lsn::from_u64(start);
    let t0 = Instant::now();
    let cpu0 = own_cpu_secs();
    let repl = replication_config(&cfg)
        .map_err(|e| anyhow!("replication config: {e}"))?
        .with_start_lsn(start)
        .with_ack_lsn(start)
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1));
    let mut stream = ReplicationClient::connect(repl).await?;
    stream.wait_started().await?;
    let mut inserts = 0u64;
    let mut checksum = 0usize;
    let mut last_confirm = Instant::now();
    loop {
        let event = stream
            .recv()
            .await?
            .ok_or_else(|| anyhow!("the replication stream ended after {inserts} inserts"))?;
        match event {
            ReplicationEvent::XLogData { data, .. } => {
                let message =
                    pgoutput::decode(&data).map_err(|e| anyhow!("pgoutput decode: {e:?}"))?;
                if let Message::Insert { new, .. } = message {
                    inserts += 1;
                    for value in new.iter() {
                        checksum = checksum.wrapping_add(value.as_bytes().map_or(0, <[u8]>::len));
                    }
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                // Confirm like the relay does, at most every 50 ms: raising the applied LSN
                // wakes the replication worker, which at one event per transaction would
                // cost more than the decoding.
                if last_confirm.elapsed() >= CONFIRM_EVERY {
                    stream.update_applied_lsn(end_lsn);
                    last_confirm = Instant::now();
                }
                if inserts >= n {
                    if end_lsn.as_u64() > end {
                        bail!(
                            "the backlog ended at {end_lsn}, past {}",
                            Lsn::from_u64(end)
                        );
                    }
                    break;
                }
            }
            ReplicationEvent::StoppedAt { .. } => bail!("the stream stopped early"),
            _ => {}
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu_secs = own_cpu_secs() - cpu0;
    std::hint::black_box(checksum);
    let _ = stream.shutdown().await;
    Ok(Rate {
        events: inserts,
        secs,
        cpu_secs,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. The broker ceiling
// ---------------------------------------------------------------------------------------------

struct CountingContext {
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// `n` records shaped like the relay's (key, the same ~110-byte JSON value, 5 headers, a
/// timestamp) through a `ThreadedProducer` with the relay's settings, until all are acked.
fn broker_ceiling(tansu: &Tansu, n: u64) -> Result<Rate> {
    let kafka = KafkaConfig {
        brokers: tansu.brokers(),
        ..KafkaConfig::default()
    };
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let cpu0 = own_cpu_secs();
    let producer: ThreadedProducer<CountingContext> = client_config(&kafka)
        .create_with_context(CountingContext {
            acked: Arc::clone(&acked),
            failed: Arc::clone(&failed),
        })
        .context("creating the producer")?;
    let mut key = String::new();
    let mut value = String::new();
    let mut id = String::new();
    let mut trace = String::new();
    let lsn = "0/1A2B3C48";
    for g in 0..n {
        key.clear();
        value.clear();
        id.clear();
        trace.clear();
        event_fields(g, &mut key, &mut value, &mut trace);
        let _ = write!(
            id,
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            g as u32,
            (g >> 32) as u16,
            g % 0xfff,
            g % 0xfff,
            g.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16
        );
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: "id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "event_type",
                value: Some("OrderPlaced"),
            })
            .insert(Header {
                key: "aggregate_type",
                value: Some("order"),
            })
            .insert(Header {
                key: "pg_lsn",
                value: Some(lsn),
            })
            .insert(Header {
                key: "trace_id",
                value: Some(trace.as_str()),
            });
        let mut record = BaseRecord::to(TOPIC)
            .key(key.as_str())
            .payload(value.as_str())
            .headers(headers)
            .timestamp(unix_ms());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("produce: {e}"),
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120 + n / 2000);
    while acked.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < n {
        let _ = producer.flush(Timeout::After(Duration::from_millis(100)));
        if Instant::now() >= deadline {
            bail!(
                "only {} of {n} records acknowledged",
                acked.load(Ordering::Relaxed)
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {n} records failed");
    }
    Ok(Rate {
        events: n,
        secs,
        cpu_secs: own_cpu_secs() - cpu0,
    })
}

/// Event `g` as `bench.fill` makes it server side: the key, the JSON payload
/// (as jsonb prints it) and a 32-hex-digit trace id.
fn event_fields(g: u64, key: &mut String, value: &mut String, trace: &mut String) {
    let _ = write!(key, "{}", g % AGGREGATES);
    let _ = write!(
        value,
        r#"{{"items": {}, "amount": {}.{:02}, "status": "placed", "currency": "EUR", "order_id": {g}, "customer_id": "customer-{}"}}"#,
        g % 7 + 1,
        (g % 100_000) / 100,
        g % 100,
        g % 1000
    );
    let _ = write!(
        trace,
        "{:016x}{:016x}",
        g.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        g.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. and 5. Relay drains
// ---------------------------------------------------------------------------------------------

/// The relay binary running `run` on `slot` against `tansu`; killed on drop.
struct RelayProc {
    proc: Proc,
    http_port: u16,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl RelayProc {
    fn start(env: &Env<'_>, tansu: &Tansu, slot: &str) -> Result<RelayProc> {
        let dir = tempfile::Builder::new()
            .prefix("relay-bench-")
            .disable_cleanup(std::env::var_os("RELAY_BENCH_KEEP_LOGS").is_some())
            .tempdir()?;
        let http_port = free_port()?;
        let config = dir.path().join("relay.toml");
        fs::write(
            &config,
            relay_toml(env.url, slot, &tansu.brokers(), http_port),
        )?;
        let log_path = dir.path().join("relay.log");
        let log = fs::File::create(&log_path)?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
        cmd.arg("run").arg("--config").arg(&config);
        for (name, _) in std::env::vars_os() {
            let name_str = name.to_string_lossy();
            if name_str.starts_with("OUTBOX_RELAY_") && name_str != "OUTBOX_RELAY_PG_BIN" {
                cmd.env_remove(&name);
            }
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(RelayProc {
            proc: Proc::spawn("outbox-relay", &mut cmd)?,
            http_port,
            log_path,
            _dir: dir,
        })
    }

    fn metrics(&self) -> Option<String> {
        match http_get(self.http_port, "/metrics") {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    }

    /// Fails with the log tail if the relay has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.proc.try_wait() {
            bail!("the relay exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    /// The relay's WARN and ERROR lines (the last ten), or its log tail if it has none.
    fn warnings(&self) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        if lines.is_empty() {
            return self.log_tail();
        }
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// user + system CPU seconds so far.
    fn cpu_secs(&self, clk_tck: f64) -> f64 {
        proc_cpu_ticks(self.proc.id()).map_or(f64::NAN, |t| t as f64 / clk_tck)
    }

    fn peak_rss_kb(&self) -> u64 {
        proc_status_kb(self.proc.id(), "VmHWM").unwrap_or(0)
    }

    /// SIGTERM, then up to 10 s for a graceful exit (then SIGKILL on drop).
    fn stop(mut self) {
        self.proc.terminate(Duration::from_secs(10));
    }
}

/// Runs the relay on `slot` from its spawn until it has published `n` events and the slot is
/// confirmed at or past `end`.
fn drain_relay(env: &Env<'_>, tansu: &Tansu, slot: &str, n: u64, end: u64) -> Result<Drain> {
    let t0 = Instant::now();
    let mut relay = RelayProc::start(env, tansu, slot)?;
    let own = [std::process::id(), relay.proc.id(), tansu._proc.id()];
    let cpu0 = CpuSnapshot::take(&own, env.postmaster);
    let deadline = t0 + Duration::from_secs(120 + n / 1000);
    let mut acked_secs = None;
    let mut first_ack_secs = None;
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

// ---------------------------------------------------------------------------------------------
// 4. Latency
// ---------------------------------------------------------------------------------------------

/// The latency floor: a null consumer following the paced writer on its own slot, the time
/// from each transaction's commit timestamp to its `Commit` decoded here.
fn latency_floor(env: &Env<'_>, opts: &Opts) -> Result<Floor> {
    let slot = "bench_null_latency";
    env.pg.psql(
        DB,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    )?;
    let rate = opts.latency_rate;
    let warm = rate * 2;
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
    let mut measured = latencies.split_off((warm as usize).min(latencies.len()));
    measured.sort_by(f64::total_cmp);
    let at = |q: f64| {
        measured
            .get(((measured.len() as f64 * q) as usize).min(measured.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(Floor {
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: measured.last().copied().unwrap_or(f64::NAN),
    })
}

/// Follows `slot` like [`null_consume`] until `n` inserts, returning each transaction's
/// commit-to-decoded latency in ms (one entry per insert).
async fn null_follow(url: String, slot: String, n: u64) -> Result<Vec<f64>> {
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

fn latency_run(env: &Env<'_>, tansu: &Tansu, opts: &Opts) -> Result<Latency> {
    let slot = "bench_relay_latency";
    let mut relay = RelayProc::start(env, tansu, slot)?;
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
    let rate = opts.latency_rate;
    // Warm-up (topic metadata, connections), not measured.
    let warm = rate * 2;
    env.rt
        .block_on(paced_write(env.url.to_owned(), rate, warm, 0))
        .context("warm-up writer")?;
    wait_published(&mut relay, warm)?;
    let before = relay.metrics().ok_or_else(|| anyhow!("no /metrics"))?;
    let cpu_before = relay.cpu_secs(env.clk_tck);
    let count = rate * opts.latency_secs;
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
    wait_published(&mut relay, warm + count)?;
    let cpu = relay.cpu_secs(env.clk_tck) - cpu_before;
    let after = relay.metrics().ok_or_else(|| anyhow!("no /metrics"))?;
    let peak_rss_kb = relay.peak_rss_kb();
    relay.stop();
    drop_slot(env, slot)?;
    env.pg.psql(DB, "TRUNCATE outbox.events")?;

    let h0 = histogram(&before, "outbox_relay_end_to_end_latency_seconds");
    let h1 = histogram(&after, "outbox_relay_end_to_end_latency_seconds");
    let diff: Vec<(f64, f64)> = h1
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
        cpu_us_per_event: cpu * 1e6 / count as f64,
        peak_rss_kb,
        floor: None,
    })
}

fn wait_published(relay: &mut RelayProc, n: u64) -> Result<()> {
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

struct WriterStats {
    secs: f64,
    commit_p99_ms: f64,
    max_late_ms: f64,
}

/// `count` events at `rate` per second, one per transaction, spread round-robin over
/// [`WRITER_CONNECTIONS`] connections; event `e` is due at `start + e / rate` (a late
/// connection catches up).
async fn paced_write(url: String, rate: u64, count: u64, first: u64) -> Result<WriterStats> {
    let mut clients = Vec::new();
    for _ in 0..WRITER_CONNECTIONS {
        let client = connect(&url).await?;
        let stmt = client.prepare(INSERT_ONE).await?;
        clients.push((client, stmt));
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for (k, (client, stmt)) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut commits = Vec::with_capacity((count / WRITER_CONNECTIONS + 1) as usize);
            let mut max_late = Duration::ZERO;
            let mut e = k as u64;
            while e < count {
                let due = start + Duration::from_nanos(e * 1_000_000_000 / rate);
                tokio::time::sleep_until(due).await;
                let g = first + e;
                let (mut key, mut value, mut trace) = (String::new(), String::new(), String::new());
                event_fields(g, &mut key, &mut value, &mut trace);
                let headers = format!(r#"{{"trace_id": "{trace}"}}"#);
                let sent = tokio::time::Instant::now();
                max_late = max_late.max(sent - due);
                client.execute(&stmt, &[&key, &value, &headers]).await?;
                commits.push(sent.elapsed());
                e += WRITER_CONNECTIONS;
            }
            Ok::<_, anyhow::Error>((commits, max_late))
        }));
    }
    let mut commits = Vec::new();
    let mut max_late = Duration::ZERO;
    for task in tasks {
        let (c, late) = task.await??;
        commits.extend(c);
        max_late = max_late.max(late);
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
    })
}

// ---------------------------------------------------------------------------------------------
// 6. The peer: pg_recvlogical + wal2json | Python confluent-kafka
// ---------------------------------------------------------------------------------------------

/// Makes sure wal2json and a Python with confluent-kafka are there (installing them if
/// missing); returns that Python.
fn setup_peer(pg: &ThrowawayPostgres) -> std::result::Result<PathBuf, String> {
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

fn postgres_major(bin: &Path) -> Option<u32> {
    let out = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.split('.').next()?.parse().ok())
}

/// The decode ceiling as Postgres' own client sees it: `pg_recvlogical` streaming the slot's
/// pgoutput (the relay's options) into `/dev/null` until the end of the backlog.
fn recvlogical_ceiling(env: &Env<'_>, slot: &str, n: u64, end: u64) -> Result<Rate> {
    let t0 = Instant::now();
    let mut cmd = Command::new(env.pg.bin_dir().join("pg_recvlogical"));
    cmd.args(["-h", "127.0.0.1", "-U", "postgres", "-d", DB])
        .arg("-p")
        .arg(env.pg.port().to_string())
        // `-F 0`: no fsync, which /dev/null refuses.
        .args([
            "--slot",
            slot,
            "--start",
            "--no-loop",
            "-F",
            "0",
            "-f",
            "/dev/null",
        ])
        .arg(format!("--endpos={}", Lsn::from_u64(end)))
        .args(["-o", "proto_version=1", "-o", "messages=true"])
        .arg("-o")
        .arg(format!("publication_names={PUBLICATION}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut recv = Proc::spawn("pg_recvlogical", &mut cmd)?;
    let Some(status) = recv.wait_until(t0 + Duration::from_secs(60 + n / 1_000)) else {
        recv.terminate(Duration::from_secs(5));
        bail!("pg_recvlogical did not reach the end of the backlog in time");
    };
    let secs = t0.elapsed().as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut stderr) = recv.child.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        bail!("pg_recvlogical exited ({status}): {}", err.trim());
    }
    Ok(Rate {
        events: n,
        secs,
        cpu_secs: f64::NAN,
    })
}

fn run_peer(
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

// ---------------------------------------------------------------------------------------------
// Tansu
// ---------------------------------------------------------------------------------------------

/// A fresh `tansu` broker (in-memory storage) with the bench topic; killed on drop.
struct Tansu {
    _proc: Proc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Tansu {
    fn start(env: &Env<'_>) -> Result<Tansu> {
        let dir = tempfile::Builder::new().prefix("tansu-bench-").tempdir()?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let url = format!("tcp://127.0.0.1:{port}");
            let log = fs::File::create(dir.path().join("tansu.log"))?;
            let mut cmd = Command::new(env.tansu_bin);
            cmd.arg("broker")
                .args(["--listener-url", &url])
                .args(["--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .env(
                    "RUST_LOG",
                    std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let mut proc = Proc::spawn("tansu", &mut cmd)?;
            match wait_tansu(&mut proc, port) {
                Ok(()) => {
                    let tansu = Tansu {
                        _proc: proc,
                        port,
                        _dir: dir,
                    };
                    tansu.create_topic(env)?;
                    return Ok(tansu);
                }
                Err(e) => {
                    last = format!(
                        "{e:#}\n{}",
                        fs::read_to_string(dir.path().join("tansu.log")).unwrap_or_default()
                    )
                }
            }
        }
        bail!("tansu did not start: {last}")
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn create_topic(&self, env: &Env<'_>) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = plain_client(&self.brokers()).create()?;
        let topic = NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1));
        let results = env
            .rt
            .block_on(admin.create_topics([&topic], &AdminOptions::new()))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => bail!("create topic {topic}: {code}"),
            }
        }
        let consumer: BaseConsumer = plain_client(&self.brokers()).create()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let partitions = consumer
                .fetch_metadata(Some(TOPIC), Duration::from_secs(5))
                .ok()
                .and_then(|md| {
                    md.topics()
                        .iter()
                        .find(|t| t.name() == TOPIC && t.error().is_none())
                        .map(|t| t.partitions().len())
                });
            if partitions == Some(PARTITIONS as usize) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("topic {TOPIC} not ready");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn plain_client(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("socket.timeout.ms", "10000")
        .set("broker.address.family", "v4");
    config
}

fn wait_tansu(proc: &mut Proc, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let consumer: BaseConsumer = plain_client(&format!("127.0.0.1:{port}")).create()?;
    loop {
        if let Some(status) = proc.try_wait() {
            bail!("tansu exited ({status})");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            && consumer
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok_and(|md| !md.brokers().is_empty())
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("tansu not ready on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The tansu binary: env `TANSU_BIN`, else `tansu` on PATH, else `~/.cargo/bin/tansu`.
fn tansu_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TANSU_BIN").filter(|b| !b.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("tansu"))
        .find(|p| p.is_file());
    let in_cargo_home = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/tansu"))
        .filter(|p| p.is_file());
    on_path.or(in_cargo_home).ok_or_else(|| {
        anyhow!("tansu not found (TANSU_BIN, PATH, ~/.cargo/bin): `cargo install tansu --locked --features dynostore`")
    })
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A child process, SIGKILLed and reaped on drop. A detached watchdog kills it too if the
/// bench itself dies without dropping it (SIGKILL, a timeout).
struct Proc {
    child: Child,
    watchdog: Option<Child>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let watchdog = Command::new("setsid")
            .args([
                "sh",
                "-c",
                r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; kill -9 "$2" 2>/dev/null"#,
                "relay-bench-watchdog",
            ])
            .arg(std::process::id().to_string())
            .arg(child.id().to_string())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Ok(Proc { child, watchdog })
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit until `deadline` (checking every 5 ms); None if still running then.
    fn wait_until(&mut self, deadline: Instant) -> Option<std::process::ExitStatus> {
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM and up to `grace` to exit; SIGKILL after that.
    fn terminate(&mut self, grace: Duration) {
        if self.try_wait().is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.id().to_string())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + grace;
            while self.try_wait().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

/// Machine-wide CPU time from `/proc/stat`, in clock ticks.
struct HostCpu {
    busy: u64,
    total: u64,
}

/// CPU time of the machine and of the bench's own processes (the bench, the given children,
/// and the Postgres cluster: the postmaster and its children).
struct CpuSnapshot {
    host: HostCpu,
    own: BTreeMap<u32, u64>,
}

impl CpuSnapshot {
    fn take(pids: &[u32], postmaster: Option<u32>) -> CpuSnapshot {
        let mut own = BTreeMap::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some((ppid, ticks)) = proc_stat(pid) else {
                continue;
            };
            let ours = pids.contains(&pid) || postmaster.is_some_and(|pm| pm == pid || pm == ppid);
            if ours {
                own.insert(pid, ticks);
            }
        }
        CpuSnapshot {
            host: HostCpu::sample(),
            own,
        }
    }

    /// (cores busy machine-wide, cores busy outside the bench's processes) since `earlier`.
    /// A process of ours that exited in between counts as outside.
    fn since(&self, earlier: &CpuSnapshot) -> (f64, f64) {
        let own: u64 = self
            .own
            .iter()
            .map(|(pid, ticks)| ticks.saturating_sub(earlier.own.get(pid).copied().unwrap_or(0)))
            .sum();
        let host = self.host.cores_since(&earlier.host);
        let total = self.host.total.saturating_sub(earlier.host.total);
        let cores = std::thread::available_parallelism().map_or(1, |p| p.get()) as f64;
        let own_cores = if total == 0 {
            f64::NAN
        } else {
            own as f64 / total as f64 * cores
        };
        (host, (host - own_cores).max(0.0))
    }
}

impl HostCpu {
    fn sample() -> HostCpu {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        HostCpu {
            busy: total - idle,
            total,
        }
    }

    /// Cores busy on average since `earlier`.
    fn cores_since(&self, earlier: &HostCpu) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |p| p.get()) as f64;
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return f64::NAN;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64 * cores
    }
}

/// utime + stime of `pid`, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, ticks)| ticks)
}

/// The parent pid and utime + stime (clock ticks) of `pid`.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, from field 3 (state) on.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid: u32 = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// A `kB` line of `/proc/PID/status` (`VmHWM`, `VmRSS`).
fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------------
// The relay's /metrics
// ---------------------------------------------------------------------------------------------

/// A plain HTTP/1.1 GET to 127.0.0.1:`port`: (status code, body).
fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let body = &raw[split + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// `outbox_relay_events_published_total`, summed over topics.
fn published(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix("outbox_relay_events_published_total")
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A histogram's `_sum` and `_count` (for the latency histogram).
fn histogram_sum_count(metrics: &str) -> (f64, f64) {
    let name = "outbox_relay_end_to_end_latency_seconds";
    (
        gauge(metrics, &format!("{name}_sum")).unwrap_or(0.0),
        gauge(metrics, &format!("{name}_count")).unwrap_or(0.0),
    )
}

/// The value of an unlabelled sample.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A histogram's cumulative buckets `(le, count)`, in order, `+Inf` last.
fn histogram(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of cumulative buckets, interpolated linearly within the bucket like
/// Prometheus' `histogram_quantile` (the `+Inf` bucket yields the highest finite bound).
fn bucket_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower;
            }
            if count <= below {
                return le;
            }
            return lower + (le - lower) * (rank - below) / (count - below);
        }
        lower = le;
        below = count;
    }
    lower
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

fn report(
    opts: &Opts,
    shapes: &[Shape],
    broker: Option<Rate>,
    peer: &Peer,
    latency: Option<&Latency>,
) {
    let n = opts.events;
    let mb = |kb: u64| kb as f64 / 1024.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nrelay benchmark ({} mode, N = {n} events per backlog, {} cores)",
        if opts.quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |p| p.get())
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
                    e.lines().next().unwrap_or("")
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
    if let Some(broker) = broker {
        let _ = writeln!(
            out,
            "broker ceiling (rdkafka, relay settings): {:.0} events/s ({:.2} s), producer {:.2} us CPU/event",
            broker.eps(),
            broker.secs,
            broker.cpu_us_per_event()
        );
    }
    match peer {
        Peer::Ran { rate, delivered } => {
            let _ = writeln!(
                out,
                "peer (pg_recvlogical + wal2json | python confluent-kafka), 100 / tx: {:.0} events/s ({:.2} s, {delivered} delivered)",
                rate.eps(),
                rate.secs
            );
        }
        Peer::Skipped(why) => {
            let _ = writeln!(out, "peer: skipped ({why})");
        }
    }
    if let Some(latency) = latency {
        let _ = writeln!(
            out,
            "latency at {:.0} events/s (1 / tx, {} events, commit -> Kafka ack, bucket-interpolated): p50 {:.2} ms, p99 {:.2} ms, max <= {} ms",
            latency.achieved_rate, latency.events, latency.p50_ms, latency.p99_ms, latency.max_bucket_ms
        );
        if let Some(floor) = &latency.floor {
            let _ = writeln!(
                out,
                "  floor, a null consumer at the same rate (commit -> decoded, exact): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                floor.p50_ms, floor.p99_ms, floor.max_ms
            );
        }
        let _ = writeln!(
            out,
            "  writer: commit p99 {:.2} ms, at most {:.1} ms behind schedule; relay {:.2} us CPU/event, peak RSS {:.1} MB",
            latency.writer_p99_ms,
            latency.writer_max_late_ms,
            latency.cpu_us_per_event,
            mb(latency.peak_rss_kb)
        );
    }
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
    let json = serde_json::json!({
        "mode": if opts.quick { "quick" } else { "full" },
        "events": n,
        "throughput_eps": throughput,
        "decode_ceiling_eps": decode,
        "broker_ceiling_eps": broker.map(|b| b.eps()),
        "broker_cpu_us_per_event": broker.map(|b| b.cpu_us_per_event()),
        "decode_cpu_us_per_event": main.map(|s| s.null.cpu_us_per_event()),
        "decode_ceiling_runs_eps": main.map(|s| s.decode_runs),
        "ratio": throughput / decode,
        "latency_p50_ms": latency.map(|l| l.p50_ms),
        "latency_p99_ms": latency.map(|l| l.p99_ms),
        "latency_max_bucket_ms": latency.map(|l| l.max_bucket_ms),
        "latency_rate_eps": latency.map(|l| l.achieved_rate),
        "latency_cpu_us_per_event": latency.map(|l| l.cpu_us_per_event),
        "decode_latency_p50_ms": latency.and_then(|l| l.floor).map(|f| f.p50_ms),
        "decode_latency_p99_ms": latency.and_then(|l| l.floor).map(|f| f.p99_ms),
        "peak_rss_mb": backlog_rss.map(mb),
        "big_tx_peak_rss_mb": big.and_then(drain).map(|d| mb(d.peak_rss_kb)),
        "big_tx_eps": big.and_then(drain).map(|d| d.eps()),
        "peer_eps": match peer { Peer::Ran { rate, .. } => Some(rate.eps()), Peer::Skipped(_) => None },
        "peer_skipped": match peer { Peer::Ran { .. } => None, Peer::Skipped(why) => Some(why.as_str()) },
        "relay_cpu_us_per_event": main.and_then(drain).map(|d| d.cpu_us_per_event()),
        "throughput_10_per_tx_eps": eps_of(10),
        "throughput_1_per_tx_eps": eps_of(1),
        "decode_ceiling_1_per_tx_eps": find(1).map(|s| s.decode),
        "failures": shapes
            .iter()
            .filter_map(|s| s.relay.as_ref().err().map(|e| format!("{}: {}", s.label, e.lines().next().unwrap_or(""))))
            .collect::<Vec<_>>(),
    });
    println!("{json}");
}
