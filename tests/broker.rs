//! What only a real broker shows: Apache Kafka stopped and started again with its data under a
//! steady writer, topic auto-creation off as in production, `acks=all` against a topic whose
//! `min.insync.replicas` one node cannot meet, and a topic whose `max.message.bytes` is below
//! the relay's batch size. Real Postgres, the relay binary, Apache Kafka (KRaft, one node).
//!
//! "Nothing confirmed was lost" is checked two ways: the slot's confirmed position, read while
//! the events were not in Kafka, lies before the commit LSN (header `pg_lsn`) of the first of
//! them; and a relay killed with SIGKILL and started again still delivers everything.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testkit::*;

const ORDERS: &str = "outbox.event.order";
const DEAD_LETTERS: &str = "outbox.dead-letter";

/// The slot's `confirmed_flush_lsn`.
fn confirmed_lsn(pg: &ThrowawayPostgres) -> String {
    pg.psql(
        "postgres",
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
    )
    .expect("sql runs")
    .trim()
    .to_owned()
}

/// Asserts that `confirmed` lies before the commit LSN of the record whose payload `n` is
/// `n`: the relay had not confirmed that record's transaction.
fn assert_confirmed_before(pg: &ThrowawayPostgres, confirmed: &str, records: &[Record], n: i64) {
    let record = records
        .iter()
        .find(|r| payload_n(r) == n)
        .unwrap_or_else(|| panic!("no record with n = {n}"));
    let commit = record.header("pg_lsn").expect("header pg_lsn");
    let before = pg
        .psql(
            "postgres",
            &format!("SELECT '{confirmed}'::pg_lsn < '{commit}'::pg_lsn"),
        )
        .expect("sql runs");
    assert_eq!(
        before.trim(),
        "t",
        "the slot was confirmed at {confirmed} while event {n} (committed at {commit}) was not \
         in Kafka"
    );
}

fn payload_n(record: &Record) -> i64 {
    let value: serde_json::Value =
        serde_json::from_slice(record.value.as_deref().expect("value")).expect("json value");
    value["n"].as_i64().expect("n")
}

/// Reads `topic` until it holds `n` distinct event ids.
fn consume_distinct(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<Record> {
    let mut ids = HashSet::new();
    let mut counted = 0;
    consume(
        brokers,
        &[topic],
        |records| {
            for r in &records[counted..] {
                ids.extend(r.header("id"));
            }
            counted = records.len();
            ids.len() >= n
        },
        timeout,
    )
}

/// Commits one `order` event per transaction, `per_second` a second over `aggregates`
/// aggregates (payload `n` = 0, 1, 2, …), until `stop` is set; `committed` counts the
/// commits. A failed insert is retried, so `n` stays gapless.
fn steady_writer(
    pg: &ThrowawayPostgres,
    aggregates: usize,
    per_second: u32,
    committed: &AtomicUsize,
    stop: &AtomicBool,
) {
    let interval = Duration::from_secs(1) / per_second;
    let start = Instant::now();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let sql = format!(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('order', 'agg-{}', 'Happened', jsonb_build_object('n', {n}))",
            n % aggregates
        );
        if pg.psql("postgres", &sql).is_err() {
            continue;
        }
        n += 1;
        committed.store(n, Ordering::SeqCst);
        // Pacing, not waiting for a condition: the writer keeps a steady rate.
        let next = start + interval * n as u32;
        if let Some(ahead) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(ahead);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Outage {
    /// SIGTERM: the broker shuts down cleanly.
    Stop,
    /// SIGKILL: the broker crashes and recovers its log on start.
    Kill,
}

/// The broker goes down (`how`) under a steady writer for about 10 s and comes back with its
/// data: the relay is not ready during the outage and ready after, confirms nothing Kafka did
/// not take, and a relay killed right after the broker is back loses nothing either.
fn broker_outage_under_a_steady_writer(how: Outage) {
    let World { pg, mut kafka, .. } = World::new();
    let brokers = kafka.brokers();
    let world_config = |http: u16| {
        relay_config(
            &pg.url("postgres"),
            &brokers,
            "outbox_relay",
            "outbox_relay",
            http,
        )
    };
    let port = free_port().expect("free port");
    let mut relay = Relay::start(&world_config(port), &[]);
    relay.wait_ready(port, Duration::from_secs(60));

    let committed = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (first_in_outage, confirmed_in_outage, total, first, second) =
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| steady_writer(&pg, 8, 20, &committed, &stop));
            let published = format!("outbox_relay_events_published_total{{topic=\"{ORDERS}\"}}");
            wait_until(Duration::from_secs(60), "40 events published", || {
                metric(port, &published).is_some_and(|n| n >= 40.0)
            });

            match how {
                Outage::Stop => kafka.stop(),
                Outage::Kill => kafka.kill(),
            }
            let down = Instant::now();
            // Committed after the broker went down: it cannot be in Kafka before it is back.
            let first_in_outage = committed.load(Ordering::SeqCst);
            wait_until(
                Duration::from_secs(30),
                "not ready while the broker is down",
                || !ready(port),
            );
            let report = status(port);
            assert_eq!(report["kafka_reachable"], false, "{report}");
            wait_until(
                Duration::from_secs(60),
                "a 10 s outage with 100 events written in it",
                || {
                    down.elapsed() >= Duration::from_secs(10)
                        && committed.load(Ordering::SeqCst) >= first_in_outage + 100
                },
            );
            let confirmed_in_outage = confirmed_lsn(&pg);

            kafka.start_again();
            wait_until(
                Duration::from_secs(60),
                "ready once the broker is back",
                || ready(port),
            );
            // Whatever it holds in flight now dies with it: the next relay must resend it.
            relay.kill9();
            let port = free_port().expect("free port");
            let mut second = Relay::start(&world_config(port), &[]);
            second.wait_ready(port, Duration::from_secs(60));
            let resumed = committed.load(Ordering::SeqCst);
            wait_until(Duration::from_secs(60), "40 more events written", || {
                committed.load(Ordering::SeqCst) >= resumed + 40
            });
            stop.store(true, Ordering::Relaxed);
            writer.join().expect("writer");
            (
                first_in_outage,
                confirmed_in_outage,
                committed.load(Ordering::SeqCst),
                relay,
                second,
            )
        });

    let records = consume_distinct(&brokers, ORDERS, total, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!(
        "{how:?}: {distinct} distinct of {total}, {duplicates} duplicates; \
         {first_in_outage} written before the outage"
    );
    if distinct != total {
        let seen: HashSet<i64> = records.iter().map(payload_n).collect();
        let missing: Vec<usize> = (0..total)
            .filter(|n| !seen.contains(&(*n as i64)))
            .collect();
        panic!(
            "{distinct} of {total} events arrived; missing n = {missing:?}\n{}\
             dead letters: {}\nfirst relay log:\n{}\nsecond relay log:\n{}\nbroker log:\n{}",
            partition_report(&brokers, ORDERS, &records),
            consume(&brokers, &[DEAD_LETTERS], |_| false, Duration::from_secs(3)).len(),
            first.log(),
            second.log(),
            kafka.log()
        );
    }
    assert_confirmed_before(&pg, &confirmed_in_outage, &records, first_in_outage as i64);
}

#[test]
fn a_broker_stopped_and_started_again_under_a_steady_writer_loses_nothing() {
    broker_outage_under_a_steady_writer(Outage::Stop);
}

#[test]
fn a_broker_killed_and_started_again_under_a_steady_writer_loses_nothing() {
    broker_outage_under_a_steady_writer(Outage::Kill);
}

/// With auto-creation off on the broker and `create_topics = false`, a missing topic holds its
/// events (SPEC §7): named, not ready, nothing confirmed past them; a relay started after a
/// crash with `create_topics = true` creates the topic with `topic_partitions` partitions and
/// delivers every one of them.
#[test]
fn a_missing_topic_holds_its_events_unconfirmed_until_the_relay_may_create_it() {
    let world = World::new();
    let (mut relay, port) = world.relay_with(&[("OUTBOX_RELAY_KAFKA_CREATE_TOPICS", "false")]);
    world.wait_streaming();
    world.write(100, 10, 5, &["order"]);
    wait_until(
        Duration::from_secs(30),
        "not ready, naming the missing topic",
        || {
            !ready(port)
                && status(port)["waiting_for_topic"]
                    .as_str()
                    .is_some_and(|t| t.contains(ORDERS))
        },
    );
    assert!(relay.log().contains(ORDERS), "the log names it");
    assert_eq!(
        world.kafka.partitions(ORDERS),
        None,
        "neither the relay nor the broker created the topic"
    );
    let confirmed = confirmed_lsn(&world.pg);
    relay.kill9();

    let (relay, port) = world.relay_with(&[("OUTBOX_RELAY_KAFKA_TOPIC_PARTITIONS", "5")]);
    let records = consume_n(&world, &topics(&["order"]), 100, Duration::from_secs(60));
    let (distinct, _) = check_records(&records);
    assert_eq!(distinct, 100, "log:\n{}", relay.log());
    assert_eq!(
        world.kafka.partitions(ORDERS),
        Some(5),
        "created with topic_partitions"
    );
    assert_confirmed_before(&world.pg, &confirmed, &records, 0);
    wait_until(Duration::from_secs(30), "ready", || ready(port));
}

/// Commits events `from..=to` (payload `n`) over `aggregates` aggregates of type `order`, in
/// transactions of ten.
fn write_range(pg: &ThrowawayPostgres, from: usize, to: usize, aggregates: usize) {
    for start in (from..=to).step_by(10) {
        pg.psql(
            "postgres",
            &format!(
                "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
                 SELECT 'order', 'agg-' || (g % {aggregates}), 'Happened', \
                        jsonb_build_object('n', g) \
                 FROM generate_series({start}, {end}) AS g ORDER BY g",
                end = (start + 9).min(to)
            ),
        )
        .expect("sql runs");
    }
}

/// `acks=all` on a topic with two replicas and `min.insync.replicas=2`, one of whose brokers
/// stops: Kafka refuses every write (NOT_ENOUGH_REPLICAS), which the producer retries without
/// end. Nothing is confirmed past the refused events, the relay's gauges show them in flight
/// and ageing (what the OutboxRelayLagHigh alert watches), `/status` and the log name the
/// partitions and the setting, and once the topic is altered to `min.insync.replicas=1` every
/// event arrives, in order, and the error clears.
///
/// Two brokers, because since KIP-966 Kafka caps a topic's `min.insync.replicas` at its
/// replica count: on one node the setting changes nothing.
#[test]
fn acks_all_below_min_insync_replicas_confirms_nothing_until_the_topic_is_fixed() {
    let world = World::new();
    let mut second = world.kafka.add_broker(2);
    world
        .kafka
        .create_replicated_topic(ORDERS, 3, 2, &[("min.insync.replicas", "2")]);
    let (relay, port) = world.relay_with(&[]);
    world.wait_streaming();
    write_range(&world.pg, 0, 49, 5);
    let _ = consume_n(&world, &topics(&["order"]), 50, Duration::from_secs(60));

    // A clean shutdown takes the broker out of every in-sync replica set at once.
    second.stop();
    write_range(&world.pg, 50, 149, 5);
    wait_until(
        Duration::from_secs(60),
        "events in flight, unacknowledged for 10 s",
        || {
            metric(port, "outbox_relay_inflight_events").is_some_and(|n| n >= 1.0)
                && metric(port, "outbox_relay_replication_lag_seconds").is_some_and(|s| s >= 10.0)
        },
    );
    // librdkafka retries NOT_ENOUGH_REPLICAS silently: the relay finds and names the cause.
    let names_it = |text: &str| {
        text.contains("NOT_ENOUGH_REPLICAS")
            && text.contains(&format!("{ORDERS} partition"))
            && text.contains("min.insync.replicas=2")
    };
    wait_until(
        Duration::from_secs(60),
        "/status and the log name the partitions short of in-sync replicas",
        || status(port)["last_error"].as_str().is_some_and(&names_it) && names_it(&relay.log()),
    );
    println!("status: {}", status(port)["last_error"]);
    let confirmed = confirmed_lsn(&world.pg);
    let visible = consume(
        &world.kafka.brokers(),
        &[ORDERS],
        |r| r.iter().any(|r| payload_n(r) >= 50),
        Duration::from_secs(5),
    );
    assert!(
        visible.iter().all(|r| payload_n(r) < 50),
        "nothing was written after the broker stopped"
    );

    world
        .kafka
        .alter_topic_config(ORDERS, &[("min.insync.replicas", "1")]);
    let records = consume_n(&world, &topics(&["order"]), 150, Duration::from_secs(120));
    let (distinct, _) = check_records(&records);
    assert_eq!(distinct, 150, "log:\n{}", relay.log());
    assert_confirmed_before(&world.pg, &confirmed, &records, 50);
    wait_until(Duration::from_secs(30), "ready, the error cleared", || {
        ready(port) && status(port)["last_error"].is_null()
    });
}

/// A topic whose `max.message.bytes` (16 KiB) is far below the relay's `batch.size` (librdkafka's
/// 1 MB): Kafka refuses the relay's batches, the relay sends smaller ones, and every event that
/// fits arrives in order; the one event too large on its own goes to the dead-letter topic
/// (SPEC §7, `message_too_large`), and the stream goes on.
#[test]
fn a_topic_smaller_than_the_batch_gets_smaller_batches_and_dead_letters_only_what_never_fits() {
    let world = World::new();
    world
        .kafka
        .create_topic_with(ORDERS, 3, &[("max.message.bytes", "16384")]);
    let (relay, port) = world.relay_with(&[]);
    world.wait_streaming();
    // ~300 bytes of hex a payload, which lz4 barely compresses: a full batch is far too large.
    let write = |from: usize, to: usize| {
        world.psql(&format!(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'agg-' || (g % 10), 'Happened', jsonb_build_object('n', g, \
                    'pad', md5(g::text) || md5((g + 1)::text) || md5((g + 2)::text) || \
                           md5((g + 3)::text) || md5((g + 4)::text) || md5((g + 5)::text) || \
                           md5((g + 6)::text) || md5((g + 7)::text) || md5((g + 8)::text)) \
             FROM generate_series({from}, {to}) AS g ORDER BY g"
        ))
    };
    write(0, 999);
    // 40 kB of hex: larger than the topic takes, alone or not.
    world.psql(
        "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', 'big', 'Happened', jsonb_build_object('n', -1, 'pad', \
                string_agg(md5(i::text), '')) FROM generate_series(1, 1250) AS i",
    );
    write(1000, 1999);

    let records = consume_n(&world, &topics(&["order"]), 2000, Duration::from_secs(180));
    let (distinct, _) = check_records(&records);
    assert_eq!(distinct, 2000, "log:\n{}", relay.log());
    assert!(
        relay.log().contains("batch.size is capped"),
        "Kafka refused a batch and the relay sent smaller ones; log:\n{}",
        relay.log()
    );
    let dead = consume(
        &world.kafka.brokers(),
        &[DEAD_LETTERS],
        |r| !r.is_empty(),
        Duration::from_secs(60),
    );
    assert_eq!(dead.len(), 1, "{dead:?}\nlog:\n{}", relay.log());
    assert_eq!(dead[0].key_str().as_deref(), Some("big"));
    assert_eq!(
        dead[0].header("dlq_reason").as_deref(),
        Some("message_too_large")
    );
    assert_eq!(dead[0].header("dlq_topic").as_deref(), Some(ORDERS));
    assert!(
        records
            .iter()
            .all(|r| r.key_str().as_deref() != Some("big")),
        "the large event is not on its topic"
    );
    wait_until(Duration::from_secs(30), "ready", || ready(port));
    assert_eq!(
        metric(
            port,
            "outbox_relay_events_dead_lettered_total{reason=\"message_too_large\"}"
        ),
        Some(1.0)
    );
}
