//! The relay benchmark (SPEC §9, `docs/PERFORMANCE.md`):
//!
//! ```sh
//! cargo bench --bench relay              # full run: 1,000,000-event backlogs, 30 s latency runs
//! cargo bench --bench relay -- --quick   # 50,000-event backlogs, 10 s latency runs
//! cargo bench --bench relay -- --events 200000   # another backlog size
//! cargo bench --bench relay -- --no-peers        # the relay alone
//! cargo bench --bench relay -- --quick --only eos  # exactly once beside at least once
//! ```
//!
//! One run on one machine, everything local: a throwaway Postgres (`wal_level = logical`), a
//! fresh Apache Kafka broker (the test kit's, KRaft, one node) for every Kafka measurement, and
//! the relay binary (built by `cargo bench` with the bench profile) as a child process. It
//! measures, for the same WAL:
//!
//! 1. the **decode ceiling**: a null consumer of the replication stream (pgwire-replication and
//!    our `pgoutput::decode`, every column walked, nothing sent), on its own slot created
//!    before the backlog was written, until it has seen the backlog's last `Commit`;
//! 2. the **broker ceiling**: a plain rdkafka producer with the relay's producer settings
//!    (`sink::kafka::client_config`) sending records of the same shape, until every delivery
//!    report is in; on Apache Kafka, and on tansu beside it when tansu is installed;
//! 3. **relay throughput** for 1, 10 and 100 events per transaction (and one transaction of
//!    the whole backlog): the relay binary draining the backlog on its own slot, from its spawn
//!    until `outbox_relay_events_published_total` reaches N and the slot's
//!    `confirmed_flush_lsn` reaches the end of the backlog; with the relay's CPU time
//!    (`/proc/PID/stat`) and peak RSS (`VmHWM`);
//! 4. **latency**: commit to Kafka ack at a steady paced rate (5,000 and 20,000 events/s), one
//!    event per transaction, from the relay's own histogram (bucket-interpolated like
//!    Prometheus' `histogram_quantile`) and from the broker's `LogAppendTime` of each record;
//!    beside it two floors: a null consumer's commit-to-decoded time and a plain producer's
//!    produce-to-ack time at the same rate (the broker latency floor);
//! 5. a **peer script**: `pg_recvlogical` with wal2json piped into a minimal Python producer on
//!    PyPI's `confluent-kafka`, what a user would script instead;
//! 6. **Debezium**: Kafka Connect standalone with Debezium's PostgreSQL connector and its
//!    Outbox Event Router, the incumbent, on its own slot of the same WAL and the same broker.
//!
//! 7. **exactly once**: the relay with `kafka.delivery = "exactly-once"` draining the 100- and
//!    1-per-transaction backlogs on a slot of its own, and following the paced writer at the
//!    first latency rate (commit to visible to a `read_committed` consumer), beside at least
//!    once (`exactly_once`).
//! 8. **polling mode**: the relay with `source.mode = "polling"` (its own cursor, no slot)
//!    draining the 100- and 1-per-transaction backlogs after logical mode, and following the
//!    paced writer at 5,000 events/s woken by `NOTIFY` (`polling.rs`).
//!
//! The peers drain the 100- and 1-per-transaction backlogs and follow the paced writer at
//! 5,000 events/s; each is skipped, with the reason, when it cannot be set up.
//!
//! It prints tables and then one JSON line. Progress goes to stderr. With
//! `RELAY_BENCH_KEEP_LOGS=1` the relay's and Connect's config and log directories
//! (`/tmp/relay-bench-*`) are kept; with `RELAY_BENCH_TRACE=1` every scrape of a drain is
//! printed; `RELAY_BENCH_KAFKA_PROPERTIES="k=v,..."` adds producer settings to the relay under
//! test. Run under `cargo test` or `cargo nextest` (no `--bench` argument) it does nothing: it
//! is not a test.
//!
//! One module per measurement (`decode`, `broker`, `backlog`, `latency`, `peer`, `debezium`,
//! `polling`), the relay under test (`relay`), what is read from `/proc`, `/metrics` and the broker
//! (`procfs`, `metrics`, `observe`) and the `report` (with `side_by_side`); Postgres, the brokers and child processes
//! come from the test kit (`testkit/`).

#![recursion_limit = "256"]

mod backlog;
mod broker;
mod debezium;
mod decode;
mod exactly_once;
mod latency;
mod metrics;
mod observe;
mod peer;
mod polling;
mod procfs;
mod relay;
mod report;
mod side_by_side;

use std::fmt::Write as _;
use std::fs;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use outbox_relay::postgres::setup::OUTBOX_SQL;
use pgwire_replication::Lsn;
use testkit::{try_tansu_bin, PostgresOptions, ThrowawayPostgres};
use tokio::runtime::Runtime;

use backlog::{connect, drain_relay, write_backlog, Slots};
use broker::{broker_ceiling, broker_latency_floor, start_kafka, start_kafka_with, start_tansu};
use debezium::{debezium_latency, drain_debezium, setup_debezium, DEBEZIUM_PUBLICATION};
use decode::{null_consume_on_own_thread, recvlogical_ceiling};
use exactly_once::{Delivery, EosRuns};
use latency::{latency_floor, latency_run};
use peer::{peer_latency, run_peer, setup_peer};
use procfs::clock_ticks;
use report::{report, Extras, Latency, PollingRuns, Shape};
use side_by_side::{report_peer, report_peer_latency, PeerRuns};

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

/// Seconds of paced writing before a latency run measures: the broker is a fresh JVM, and
/// its first seconds (and Debezium's) are spent compiling.
const WARM_UP_SECS: u64 = 5;

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
    /// The relay's second latency point (SPEC §9: p99 under 25 ms at 20,000 events/s).
    latency_rate_high: u64,
    /// `--no-peers`: measure the relay alone (no Debezium, no script).
    peers: bool,
    /// `--only PARTS`: run just these parts (while iterating), a comma-separated list of
    /// `100`, `10`, `1`, `big` (the backlogs), `backlogs` (all four), `latency`, `eos`
    /// (exactly once: the 100 and 1 backlogs with both modes, and its latency run) and `polling`
    /// (polling mode's drains of the 100 and 1 per transaction backlogs and its latency run).
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
            latency_rate_high: 20_000,
            peers: !args.iter().any(|a| a == "--no-peers"),
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
                "--latency-rate-high" => {
                    opts.latency_rate_high = value("--latency-rate-high")?.max(1)
                }
                "--only" => {
                    let parts: Vec<String> = it
                        .next()
                        .ok_or_else(|| anyhow!("--only needs a value"))?
                        .split(',')
                        .map(str::to_owned)
                        .collect();
                    for part in &parts {
                        if ![
                            "100", "10", "1", "big", "backlogs", "latency", "eos", "polling",
                        ]
                        .contains(&part.as_str())
                        {
                            bail!(
                                "--only takes a list of 100, 10, 1, big, backlogs, latency, eos, polling"
                            );
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

fn run(opts: &Opts) -> Result<()> {
    let n = opts.events;
    eprintln!(
        "[bench] {} mode: {n} events per backlog, latency {} and {} events/s for {} s",
        if opts.quick { "quick" } else { "full" },
        opts.latency_rate,
        opts.latency_rate_high,
        opts.latency_secs
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let clk_tck = clock_ticks();
    // The broker of record is Apache Kafka; tansu only adds its ceiling beside Kafka's.
    testkit::kafka_libs().map_err(|e| anyhow!(e))?;
    let tansu = try_tansu_bin().map(|_| ());
    if let Err(why) = &tansu {
        eprintln!("[bench] tansu's broker ceiling skipped: {why}");
    }

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
        &format!(
            "CREATE PUBLICATION {PUBLICATION} FOR TABLE outbox.events;\n\
             CREATE PUBLICATION {DEBEZIUM_PUBLICATION} FOR TABLE outbox.events;"
        ),
    )?;
    let url = pg.url(DB);
    let db = rt.block_on(connect(&url))?;
    let env = Env {
        rt: &rt,
        pg: &pg,
        db: &db,
        url: &url,
        clk_tck,
        postmaster: fs::read_to_string(pg.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok()),
    };

    let runs = |part: &str| {
        opts.only.as_ref().is_none_or(|only| {
            only.iter().any(|o| {
                o == part || (o == "backlogs" && !["latency", "eos", "polling"].contains(&part))
            })
        })
    };
    let peers_wanted = opts.peers && (runs("100") || runs("1") || runs("latency"));
    let why_not = |what: &str| {
        if opts.peers {
            format!("{what} not run (--only)")
        } else {
            format!("{what} not run (--no-peers)")
        }
    };
    let peer_setup = if peers_wanted {
        setup_peer(&pg)
    } else {
        Err(why_not("the script"))
    };
    if let Err(why) = &peer_setup {
        eprintln!("[bench] peer skipped: {why}");
    }
    let debezium_setup = if peers_wanted {
        setup_debezium()
    } else {
        Err(why_not("Debezium"))
    };
    if let Err(why) = &debezium_setup {
        eprintln!("[bench] Debezium skipped: {why}");
    }
    let mut peer = match &peer_setup {
        Ok(_) => PeerRuns::default(),
        Err(why) => PeerRuns::skipped(why.clone()),
    };
    let mut dbz = match &debezium_setup {
        Ok(_) => PeerRuns::default(),
        Err(why) => PeerRuns::skipped(why.clone()),
    };
    let mut eos = EosRuns::default();
    let mut polling = PollingRuns::default();
    if runs("polling") {
        polling::prepare(&env)?;
    }

    // Each shape: decode ceiling, (broker ceiling), relay, (the peers), on one WAL.
    let mut shapes = Vec::new();
    let mut broker = None;
    let mut tansu_broker = Err(match &tansu {
        Ok(()) => "not run (--only)".to_string(),
        Err(why) => why.clone(),
    });
    let backlogs = [
        (100, "100", "100 / tx"),
        (10, "10", "10 / tx"),
        (1, "1", "1 / tx"),
        (n, "big", "1 tx of N"),
    ];
    let eos_shape = |per_tx: u64| runs("eos") && (per_tx == 100 || per_tx == 1);
    for (per_tx, tag, label) in backlogs.into_iter().filter(|b| runs(b.1) || eos_shape(b.0)) {
        // Listed for itself, not only for exactly once.
        let listed = runs(tag);
        let side_by_side = listed && (per_tx == 100 || per_tx == 1);
        let with_peer = side_by_side && peer_setup.is_ok();
        let with_debezium = side_by_side && debezium_setup.is_ok();
        let with_eos = eos_shape(per_tx);
        let slots = Slots::create(&env, tag, with_peer, with_debezium, with_eos)?;
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
        if per_tx == 100 && listed {
            let kafka = start_kafka()?;
            let rate = broker_ceiling(&kafka, n)?;
            drop(kafka);
            eprintln!(
                "[bench]   broker ceiling, Apache Kafka: {:.0} events/s ({:.2} s)",
                rate.eps(),
                rate.secs
            );
            broker = Some(rate);
            if tansu.is_ok() {
                tansu_broker = start_tansu()
                    .and_then(|t| broker_ceiling(&t, n))
                    .map_err(|e| format!("{e:#}"));
                match &tansu_broker {
                    Ok(rate) => eprintln!(
                        "[bench]   broker ceiling, tansu: {:.0} events/s ({:.2} s)",
                        rate.eps(),
                        rate.secs
                    ),
                    Err(e) => eprintln!("[bench]   broker ceiling, tansu, FAILED: {e}"),
                }
            }
        }
        let relay = {
            let kafka = start_kafka()?;
            // The contract check that Debezium's records must pass holds for the relay's.
            drain_relay(&env, &kafka, &slots.relay, n, end, Delivery::AtLeastOnce)
                .and_then(|d| {
                    observe::first_record(&kafka.brokers())?
                        .check(&env)
                        .context("the relay's records fail the contract check")?;
                    Ok(d)
                })
                .map_err(|e| format!("{e:#}"))
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
        if let Some(slot) = &slots.eos {
            let kafka = start_kafka()?;
            let result = exactly_once::warm_transactions(&kafka.brokers())
                .and_then(|()| drain_relay(&env, &kafka, slot, n, end, Delivery::ExactlyOnce))
                .map_err(|e| format!("{e:#}"));
            exactly_once::report_drain(per_tx, &result);
            eos.drains.push((per_tx, result));
        }
        if side_by_side && runs("polling") {
            polling.drains.push((per_tx, polling_drain(&env, n)));
        }
        if with_peer {
            let kafka = start_kafka()?;
            let python = peer_setup.as_ref().expect("peer is set up");
            let result = run_peer(&env, &kafka, python, slots.peer.as_deref(), n, end)
                .and_then(|d| {
                    observe::first_record(&kafka.brokers())?
                        .check(&env)
                        .context("the script's records fail the contract check")?;
                    Ok(d)
                })
                .map_err(|e| format!("{e:#}"));
            report_peer("peer", &result);
            peer.drains.push((per_tx, result));
        }
        if with_debezium {
            let kafka = start_kafka()?;
            let libs = debezium_setup.as_ref().expect("Debezium is set up");
            let slot = slots.debezium.as_deref().expect("a Debezium slot");
            let result = drain_debezium(&env, &kafka, libs, slot, n).map_err(|e| format!("{e:#}"));
            report_peer("Debezium", &result);
            dbz.drains.push((per_tx, result));
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

    // Polling alone (`--only polling`): its own backlogs of the two shapes.
    for (per_tx, tag) in [(100, "100"), (1, "1")] {
        if runs("polling") && !runs(tag) {
            eprintln!("[bench] writing {n} events, {per_tx} per transaction (polling only)");
            let (write_secs, _) = write_backlog(&env, n, per_tx)?;
            eprintln!("[bench]   written in {write_secs:.1} s");
            polling.drains.push((per_tx, polling_drain(&env, n)));
            pg.psql(DB, "TRUNCATE outbox.events")?;
        }
    }

    // Latency: a topic with LogAppendTime, so the broker's append time is in every record.
    let append_time = [("message.timestamp.type", "LogAppendTime")];
    if runs("polling") {
        let rate = opts.latency_rate;
        eprintln!(
            "[bench] polling latency: {rate} events/s, 1 event per transaction, NOTIFY, {} s",
            opts.latency_secs
        );
        let kafka = start_kafka_with(&append_time)?;
        let run = polling::polling_latency(&env, &kafka, rate, opts.latency_secs)
            .map_err(|e| format!("{e:#}"));
        match &run {
            Ok(l) => eprintln!(
                "[bench]   polling relay: p50 {:.2} ms, p99 {:.2} ms, max <= {} ms (histogram); commit -> append p99 {:.2} ms",
                l.p50_ms,
                l.p99_ms,
                l.max_bucket_ms,
                l.appended.map_or(f64::NAN, |a| a.p99_ms)
            ),
            Err(e) => eprintln!("[bench]   polling relay FAILED: {e}"),
        }
        polling.latency = Some(run);
    }
    let mut latency = None;
    let mut latency_high = None;
    if runs("latency") {
        let rate = opts.latency_rate;
        eprintln!(
            "[bench] latency: {rate} events/s, 1 event per transaction, {} s",
            opts.latency_secs
        );
        let floor = latency_floor(&env, opts)?;
        eprintln!(
            "[bench]   null consumer: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            floor.p50_ms, floor.p99_ms, floor.max_ms
        );
        let kafka = start_kafka_with(&append_time)?;
        let broker_floor = broker_latency_floor(&kafka, rate, opts.latency_secs, &[])?;
        eprintln!(
            "[bench]   plain producer: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            broker_floor.p50_ms, broker_floor.p99_ms, broker_floor.max_ms
        );
        let round_trip =
            broker_latency_floor(&kafka, rate, opts.latency_secs, &[("linger.ms", "0")])?;
        eprintln!(
            "[bench]   plain producer, linger.ms=0: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            round_trip.p50_ms, round_trip.p99_ms, round_trip.max_ms
        );
        let run = Latency {
            floor: Some(floor),
            broker_floor: Some(broker_floor),
            round_trip_floor: Some(round_trip),
            ..latency_run(&env, &kafka, rate, opts.latency_secs, Delivery::AtLeastOnce)?
        };
        drop(kafka);
        eprintln!(
            "[bench]   relay: p50 {:.2} ms, p99 {:.2} ms, max <= {} ms (histogram); commit -> append p99 {:.2} ms",
            run.p50_ms,
            run.p99_ms,
            run.max_bucket_ms,
            run.appended.map_or(f64::NAN, |a| a.p99_ms)
        );
        latency = Some(run);
        if let Ok(libs) = &debezium_setup {
            let kafka = start_kafka_with(&append_time)?;
            let result = debezium_latency(&env, &kafka, libs, rate, opts.latency_secs)
                .map_err(|e| format!("{e:#}"));
            report_peer_latency("Debezium", &result);
            dbz.latency = Some(result);
        }
        if let Ok(python) = &peer_setup {
            let kafka = start_kafka_with(&append_time)?;
            let result = peer_latency(&env, &kafka, python, rate, opts.latency_secs)
                .map_err(|e| format!("{e:#}"));
            report_peer_latency("peer", &result);
            peer.latency = Some(result);
        }
        let high = opts.latency_rate_high;
        eprintln!(
            "[bench] latency: {high} events/s, 1 event per transaction, {} s",
            opts.latency_secs
        );
        let kafka = start_kafka_with(&append_time)?;
        // The plain producer at this rate first, as at the lower one: what the broker alone
        // does here, and a broker past its start (its JIT compiling, which costs a fresh JVM
        // several times its steady CPU per record) when the relay's run starts.
        let run = broker_latency_floor(&kafka, high, opts.latency_secs, &[])
            .and_then(|floor| {
                eprintln!(
                    "[bench]   plain producer: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    floor.p50_ms, floor.p99_ms, floor.max_ms
                );
                Ok(Latency {
                    broker_floor: Some(floor),
                    ..latency_run(&env, &kafka, high, opts.latency_secs, Delivery::AtLeastOnce)?
                })
            })
            .map_err(|e| format!("{e:#}"));
        match &run {
            Ok(l) => eprintln!(
                "[bench]   relay: {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms, max <= {} ms (histogram)",
                l.achieved_rate, l.p50_ms, l.p99_ms, l.max_bucket_ms
            ),
            Err(e) => eprintln!("[bench]   relay FAILED: {e}"),
        }
        latency_high = Some(run);
    }
    if runs("eos") {
        let rate = opts.latency_rate;
        eprintln!(
            "[bench] latency, exactly once: {rate} events/s, 1 event per transaction, {} s",
            opts.latency_secs
        );
        let kafka = start_kafka_with(&append_time)?;
        let run = latency_run(&env, &kafka, rate, opts.latency_secs, Delivery::ExactlyOnce)
            .map_err(|e| format!("{e:#}"));
        exactly_once::report_latency(&run);
        eos.latency = Some(run);
    }

    report(
        opts,
        &shapes,
        &Extras {
            broker,
            tansu_broker,
            latency: latency.as_ref(),
            latency_high: latency_high.as_ref(),
            debezium: &dbz,
            peer: &peer,
            eos: &eos,
            polling: &polling,
        },
    );
    Ok(())
}

/// The polling relay's drain of the backlog in the outbox now, on a fresh broker.
fn polling_drain(env: &Env<'_>, n: u64) -> std::result::Result<report::Drain, String> {
    let result = start_kafka()
        .and_then(|kafka| polling::drain_polling(env, &kafka, n))
        .map_err(|e| format!("{e:#}"));
    match &result {
        Ok(d) => eprintln!(
            "[bench]   polling relay: {:.0} events/s ({:.2} s; last ack at {:.2} s), {:.2} us CPU/event, peak RSS {:.1} MB",
            d.eps(),
            d.secs,
            d.acked_secs,
            d.cpu_us_per_event(),
            d.peak_rss_kb as f64 / 1024.0
        ),
        Err(e) => eprintln!("[bench]   polling relay FAILED: {e}"),
    }
    result
}

/// What every phase needs.
struct Env<'a> {
    rt: &'a Runtime,
    pg: &'a ThrowawayPostgres,
    db: &'a tokio_postgres::Client,
    url: &'a str,
    clk_tck: f64,
    /// The Postgres cluster's postmaster, whose children are the cluster's processes.
    postmaster: Option<u32>,
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
