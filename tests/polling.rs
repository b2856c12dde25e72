//! End-to-end tests of polling mode (`source.mode = "polling"`): a real Postgres, the relay
//! binary, and Apache Kafka, like `tests/logical.rs`.
//!
//! The relay runs the standard test config with `OUTBOX_RELAY_SOURCE_MODE=polling`. Each test
//! has its own Postgres and broker; waits are "until a condition or a deadline".

use std::collections::HashMap;
use std::time::{Duration, Instant};

use testkit::*;

const POLLING: (&str, &str) = ("OUTBOX_RELAY_SOURCE_MODE", "polling");

fn is_leader(port: u16) -> bool {
    metric(port, "outbox_relay_is_leader") == Some(1.0)
}

/// Starts a polling relay (with `env` on top) without waiting.
fn start(world: &World, env: &[(&str, &str)]) -> (Relay, u16) {
    let mut all = vec![POLLING];
    all.extend_from_slice(env);
    world.relay_with(&all)
}

/// Starts a polling relay and waits until it leads.
fn leader(world: &World, env: &[(&str, &str)]) -> (Relay, u16) {
    let (relay, port) = start(world, env);
    wait_for_leader(&relay, port);
    (relay, port)
}

fn wait_for_leader(relay: &Relay, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !is_leader(port) {
        assert!(
            Instant::now() < deadline,
            "relay did not lead within 60 s:\n{}",
            relay.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(world: &World, sql: &str) -> i64 {
    world.psql(sql).trim().parse().expect("a number")
}

/// The one-line cursor the relay persisted, and the last row's `txid/seq`.
fn cursor_and_last_row(world: &World) -> (String, String) {
    (
        world.psql("SELECT position FROM outbox.relay_state WHERE name = 'polling:outbox.events'"),
        world.psql(
            "SELECT txid || '/' || seq FROM outbox.events ORDER BY txid DESC, seq DESC LIMIT 1",
        ),
    )
}

/// Inserts events `from..=to` of aggregate `agg` (payload `n` for the order check).
fn events_sql(agg: &str, from: i64, to: i64) -> String {
    format!(
        "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', '{agg}', 'Happened', jsonb_build_object('n', g) \
         FROM generate_series({from}, {to}) AS g ORDER BY g"
    )
}

#[test]
fn a_transaction_that_commits_late_is_not_skipped() {
    let world = World::new();
    let (relay, _) = leader(&world, &[]);
    // Warm up: the topic exists and records flow, so "nothing published" below means it.
    world.psql(&events_sql("agg-w", 0, 0));
    let warm = consume_n(&world, &topics(&["order"]), 1, Duration::from_secs(60));
    assert_eq!(warm.len(), 1, "log:\n{}", relay.log());

    std::thread::scope(|scope| {
        // A inserts first (smaller seq and txid) and commits 3 s later.
        let a = scope.spawn(|| {
            world.psql(&format!(
                "BEGIN; {}; SELECT pg_sleep(3); COMMIT;",
                events_sql("agg-a", 0, 4)
            ))
        });
        wait_until(Duration::from_secs(10), "A has inserted and sleeps", || {
            count(
                &world,
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_xid IS NOT NULL AND query LIKE '%pg_sleep(3)%' \
                   AND pid <> pg_backend_pid()",
            ) == 1
        });
        // B inserts after A and commits first.
        world.psql(&events_sql("agg-b", 0, 4));
        let a_open = a.is_finished();
        // B is committed but above the horizon while A runs: it waits, so A cannot be
        // skipped by a cursor that already passed B.
        let early = consume(
            &world.kafka.brokers(),
            &["outbox.event.order"],
            |r| r.len() > 1,
            Duration::from_millis(1500),
        );
        assert!(
            !a_open && !a.is_finished(),
            "A still open while B is checked"
        );
        assert_eq!(
            early.len(),
            1,
            "nothing past the open transaction is published: {:?}",
            early.iter().map(|r| r.key_str()).collect::<Vec<_>>()
        );
        a.join().expect("A commits");
    });
    // More events of both aggregates after both committed.
    world.psql(&events_sql("agg-a", 5, 9));
    world.psql(&events_sql("agg-b", 5, 9));

    let records = consume_n(&world, &topics(&["order"]), 21, Duration::from_secs(60));
    let (distinct, duplicates) = check_records(&records);
    println!("late commit: {distinct} distinct of 21, {duplicates} duplicates");
    assert_eq!(distinct, 21, "none skipped; log:\n{}", relay.log());
    assert_eq!(duplicates, 0);
    for agg in ["agg-a", "agg-b"] {
        let mut ns: Vec<(i32, i64, i64)> = records
            .iter()
            .filter(|r| r.key_str().as_deref() == Some(agg))
            .map(|r| {
                let v: serde_json::Value =
                    serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
                (r.partition, r.offset, v["n"].as_i64().unwrap())
            })
            .collect();
        ns.sort();
        let order: Vec<i64> = ns.iter().map(|t| t.2).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>(), "{agg} in order");
    }
}

#[test]
fn init_then_ten_thousand_events_with_the_spec_record_shape() {
    let world = World::new();
    let port = free_port().unwrap();
    let out = relay_cli(&["init"], &world.config(port), &[POLLING]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "init: {text}");
    assert!(text.contains("no slot needed"), "{text}");
    assert_eq!(
        world.psql("SELECT count(*) FROM pg_replication_slots"),
        "0",
        "polling init creates no slot"
    );
    assert_eq!(
        world.psql(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_relay_notify'; \
             SELECT count(*) FROM pg_indexes WHERE indexname = 'events_relay_poll_idx'"
        ),
        "1\n1",
        "trigger and index"
    );
    let (relay, port) = leader(&world, &[]);

    let types = ["order", "customer", "invoice"];
    world.write(10_000, 100, 50, &types);
    let records = consume_n(&world, &topics(&types), 10_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!("polling 10k: {distinct} distinct, {duplicates} duplicates");
    assert_eq!(distinct, 10_000, "relay log:\n{}", relay.log());
    assert_eq!(duplicates, 0, "no duplicates in steady state");

    let rows = world.psql(
        "SELECT id, aggregate_type, aggregate_id, payload::text, \
                floor(extract(epoch from created_at) * 1000)::bigint FROM outbox.events",
    );
    let rows: HashMap<String, Vec<String>> = rows
        .lines()
        .map(|l| {
            let cols: Vec<String> = l.split('|').map(str::to_owned).collect();
            (cols[0].clone(), cols)
        })
        .collect();
    assert_eq!(rows.len(), 10_000);
    for r in &records {
        let id = r.header("id").unwrap();
        let row = &rows[&id];
        assert_eq!(r.topic, format!("outbox.event.{}", row[1]));
        assert_eq!(r.key.as_deref(), Some(row[2].as_bytes()));
        assert_eq!(
            r.value.as_deref(),
            Some(row[3].as_bytes()),
            "value is the jsonb text"
        );
        assert_eq!(
            r.timestamp_ms,
            Some(row[4].parse().unwrap()),
            "created_at in ms"
        );
        assert_eq!(r.header("aggregate_type").as_deref(), Some(row[1].as_str()));
        assert_eq!(r.header("event_type").as_deref(), Some("Happened"));
        assert_eq!(r.header("pg_lsn"), None, "pg_lsn is a logical-mode header");
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        let n = v["n"].as_i64().unwrap();
        assert_eq!(r.header("traceparent"), Some(format!("00-{n}")));
        assert_eq!(
            r.header("n"),
            Some(n.to_string()),
            "non-string header as JSON text"
        );
        assert_eq!(
            r.partition,
            java_partition(r.key.as_deref().unwrap(), 3),
            "murmur2 partition like the Java client"
        );
    }
    wait_until(Duration::from_secs(20), "pending events gauge at 0", || {
        metric(port, "outbox_relay_pending_events") == Some(0.0)
    });
    let report = status(port);
    assert_eq!(report["role"], "leader", "{report}");
    let (cursor, last) = cursor_and_last_row(&world);
    assert_eq!(report["position"], cursor.as_str(), "{report}");
    assert_eq!(cursor, last, "the cursor reached the last row");
}

#[test]
fn kill_nine_three_times_loses_nothing() {
    let world = World::new();
    let types = ["order"];
    let (mut relay, _) = leader(&world, &[]);
    let total = 20_000;
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| world.write(total, 50, 40, &types));
        for kill in 1..=3 {
            wait_until(Duration::from_secs(120), "the writer progresses", || {
                count(&world, "SELECT count(*) FROM outbox.events") >= (kill * total / 4) as i64
            });
            relay.kill9();
            relay = leader(&world, &[]).0;
        }
        writer.join().expect("writer finishes");
    });
    let records = consume_n(&world, &topics(&types), total, Duration::from_secs(180));
    let (distinct, duplicates) = check_records(&records);
    println!(
        "polling kill -9 x3 while writing: {distinct} distinct of {total}, {duplicates} duplicates"
    );
    assert_eq!(distinct, total, "zero lost; relay log:\n{}", relay.log());
}

/// Reads the topics of `types` until `n` distinct events arrived (or `timeout`), then once
/// more from the start, giving anything republished a few seconds to show up past them:
/// (distinct events, duplicates).
fn read_all_and_count(
    world: &World,
    types: &[&str],
    n: usize,
    timeout: Duration,
) -> (usize, usize) {
    let topics = topics(types);
    let first = consume_n(world, &topics, n, timeout);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let records = consume(
        &world.kafka.brokers(),
        &names,
        |r| r.len() > first.len(),
        Duration::from_secs(3),
    );
    check_records(&records)
}

#[test]
fn sigterm_and_restart_publish_no_duplicates() {
    let world = World::new();
    let types = ["order"];
    let (mut relay, _) = leader(&world, &[]);
    // Published before the stop: enough that the topic exists and records flow.
    world.write(1_000, 100, 20, &types);
    let _ = consume_n(&world, &topics(&types), 1_000, Duration::from_secs(60));
    // Stop while these are being published: the drain must finish them and persist the
    // final cursor, or the restart publishes the tail again.
    world.write(2_000, 100, 20, &types);
    let started = Instant::now();
    relay.sigterm();
    let exit = relay
        .wait_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    let took = started.elapsed();
    println!("polling shutdown took {took:?}");
    assert!(exit.success(), "clean exit; log:\n{}", relay.log());
    assert!(
        took < Duration::from_secs(10),
        "exit within 10 s, took {took:?}"
    );
    // The relay stops at a transaction boundary, not necessarily at the last row written (on
    // a busy machine it may not have read that far): the persisted cursor covers whole
    // transactions of 100, at least the first 1,000 events, and no more than were written.
    // Whether it matches what was published is what the restart below shows: a cursor behind
    // it republishes (duplicates), one ahead of it skips (fewer than 4,000).
    let cursor =
        world.psql("SELECT position FROM outbox.relay_state WHERE name = 'polling:outbox.events'");
    let covered: i64 = world
        .psql(&format!(
            "SELECT count(*) FROM outbox.events \
             WHERE (txid::text::numeric, seq) <= (split_part('{cursor}', '/', 1)::numeric, \
                                                  split_part('{cursor}', '/', 2)::bigint)"
        ))
        .parse()
        .expect("a count");
    println!("polling shutdown persisted {cursor}, covering {covered} of 3000 events");
    assert!(
        (1_000..=3_000).contains(&covered) && covered % 100 == 0,
        "the final cursor {cursor} is persisted at a transaction boundary: covers {covered}"
    );

    let (relay, _) = leader(&world, &[]);
    world.write(1_000, 100, 20, &types);
    let (distinct, duplicates) = read_all_and_count(&world, &types, 4_000, Duration::from_secs(60));
    println!("polling SIGTERM and restart: {distinct} distinct of 4000, {duplicates} duplicates");
    assert_eq!(distinct, 4_000, "log:\n{}", relay.log());
    assert_eq!(duplicates, 0, "no duplicates after SIGTERM and restart");
}

#[test]
fn a_standby_takes_over_within_ten_seconds_of_the_leaders_death() {
    let world = World::new();
    let (mut first, first_port) = leader(&world, &[]);
    let (standby, standby_port) = start(&world, &[]);
    wait_until(Duration::from_secs(30), "both ready, one leader", || {
        ready(first_port)
            && ready(standby_port)
            && is_leader(first_port)
            && metric(standby_port, "outbox_relay_is_leader") == Some(0.0)
    });
    assert_eq!(status(standby_port)["role"], "standby");
    // A standby keeps trying without counting reconnects or errors.
    assert_eq!(status(standby_port)["last_error"], serde_json::Value::Null);

    std::thread::scope(|scope| {
        let writer = scope.spawn(|| world.write(6_000, 50, 30, &["order"]));
        wait_until(Duration::from_secs(60), "some events written", || {
            count(&world, "SELECT count(*) FROM outbox.events") > 1_500
        });
        first.kill9();
        let died = Instant::now();
        wait_until(Duration::from_secs(15), "the standby leads", || {
            is_leader(standby_port)
        });
        let took = died.elapsed();
        println!("polling takeover took {took:?}");
        assert!(
            took < Duration::from_secs(10),
            "takeover within 10 s: {took:?}"
        );
        writer.join().unwrap();
    });
    let records = consume_n(&world, &topics(&["order"]), 6_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!("polling failover: {distinct} distinct of 6000, {duplicates} duplicates");
    assert_eq!(
        distinct,
        6_000,
        "zero lost; standby log:\n{}",
        standby.log()
    );
}

/// The counts of the latency histogram: `(le, cumulative count)` and the total.
fn latency_histogram(port: u16) -> (Vec<(f64, f64)>, f64, f64) {
    let (_, body) = http_get(port, "/metrics").expect("GET /metrics");
    let mut buckets = Vec::new();
    let (mut count, mut sum) = (0.0, 0.0);
    for line in body.lines() {
        let value = || line.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        if let Some(rest) =
            line.strip_prefix("outbox_relay_end_to_end_latency_seconds_bucket{le=\"")
        {
            let le = rest.split('"').next().unwrap();
            if le != "+Inf" {
                buckets.push((le.parse().unwrap(), value()));
            }
        } else if line.starts_with("outbox_relay_end_to_end_latency_seconds_count") {
            count = value();
        } else if line.starts_with("outbox_relay_end_to_end_latency_seconds_sum") {
            sum = value();
        }
    }
    (buckets, count, sum)
}

#[test]
fn notify_makes_median_latency_far_below_the_poll_interval() {
    let world = World::new();
    // Without NOTIFY, waits would spread evenly over 0..2 s (median about 1 s).
    let (relay, port) = leader(&world, &[("OUTBOX_RELAY_SOURCE_POLL_INTERVAL", "2s")]);
    world.psql("SELECT outbox.publish('order', 'warm', 'E', '{\"n\": 0}')");
    let _ = consume_n(&world, &topics(&["order"]), 1, Duration::from_secs(60));
    wait_until(
        Duration::from_secs(10),
        "the warm-up ack is counted",
        || latency_histogram(port).1 >= 1.0,
    );
    let (before, count_before, sum_before) = latency_histogram(port);

    // One event every 100 ms for 5 s, each its own transaction.
    let events = 50;
    let script: String = (1..=events)
        .map(|i| {
            format!("SELECT outbox.publish('order', 'lat-{i}', 'E', '{{\"n\": {i}}}'); SELECT pg_sleep(0.1);\n")
        })
        .collect();
    world.psql(&script);
    wait_until(Duration::from_secs(30), "every event acknowledged", || {
        latency_histogram(port).1 >= count_before + events as f64
    });
    let (after, count_after, sum_after) = latency_histogram(port);
    let n = count_after - count_before;
    let median_bound = after
        .iter()
        .zip(&before)
        .find(|((_, a), (_, b))| a - b >= n / 2.0)
        .map(|((le, _), _)| *le)
        .expect("a bucket holds the median");
    let mean = (sum_after - sum_before) / n;
    println!("light load, poll_interval 2 s: {n} events, median latency <= {median_bound} s, mean {mean:.3} s");
    assert!(
        median_bound <= 0.25,
        "median commit-to-ack latency <= {median_bound} s, far below the 2 s poll interval only with NOTIFY; log:\n{}",
        relay.log_tail()
    );
}

#[test]
fn a_long_transaction_holds_events_back_and_retention_spares_them() {
    let world = World::new();
    let (relay, port) = leader(&world, &[("OUTBOX_RELAY_SOURCE_RETENTION", "2s")]);
    world.write(50, 50, 5, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 50, Duration::from_secs(60));
    wait_until(
        Duration::from_secs(30),
        "retention deletes published rows",
        || count(&world, "SELECT count(*) FROM outbox.events") == 0,
    );
    assert!(metric(port, "outbox_relay_retention_deleted_events_total").unwrap() >= 50.0);

    std::thread::scope(|scope| {
        // A transaction that took an id and then idles: the commit horizon stops at it.
        let long = scope.spawn(|| {
            world.pg.psql(
                "postgres",
                "BEGIN; SELECT pg_current_xact_id(); SELECT pg_sleep(90); COMMIT;",
            )
        });
        wait_until(Duration::from_secs(10), "the long transaction runs", || {
            count(
                &world,
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_xid IS NOT NULL AND query LIKE '%pg_sleep(90)%' AND pid <> pg_backend_pid()",
            ) == 1
        });
        let pid = world.psql(
            "SELECT pid FROM pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND query LIKE '%pg_sleep(90)%' AND pid <> pg_backend_pid()",
        );
        world.psql("SELECT outbox.publish('order', 'held', 'E', '{\"n\": 1000}')");
        wait_until(
            Duration::from_secs(60),
            "/status names the held-back horizon",
            || status(port)["horizon_held_back"].is_string(),
        );
        let note = status(port)["horizon_held_back"]
            .as_str()
            .unwrap()
            .to_owned();
        println!("status: {note}");
        assert!(note.contains("long-running transaction"), "{note}");
        assert!(
            note.contains(&format!("pid {pid}")),
            "names the session {pid}: {note}"
        );
        assert!(
            relay.log().contains("commit horizon"),
            "the log says so too"
        );
        // Held back: neither published nor deleted by retention (which ran meanwhile).
        assert_eq!(count(&world, "SELECT count(*) FROM outbox.events"), 1);
        let held = consume(
            &world.kafka.brokers(),
            &["outbox.event.order"],
            |r| r.len() > 50,
            Duration::from_secs(2),
        );
        assert_eq!(held.len(), 50, "the held event is not published yet");
        assert!(metric(port, "outbox_relay_pending_events").unwrap() >= 1.0);

        world.psql(&format!("SELECT pg_cancel_backend({pid})"));
        assert!(
            long.join().unwrap().is_err(),
            "the long transaction was cancelled"
        );
    });
    let records = consume_n(&world, &topics(&["order"]), 51, Duration::from_secs(60));
    assert!(records
        .iter()
        .any(|r| r.key_str().as_deref() == Some("held")));
    wait_until(
        Duration::from_secs(30),
        "the note clears and the row goes",
        || {
            status(port)["horizon_held_back"].is_null()
                && count(&world, "SELECT count(*) FROM outbox.events") == 0
        },
    );
}

#[test]
fn polling_needs_neither_logical_wal_nor_replication() {
    let pg =
        ThrowawayPostgres::start_with(&PostgresOptions::default().setting("wal_level", "replica"))
            .expect("postgres starts");
    pg.psql("postgres", include_str!("../sql/outbox.sql"))
        .expect("schema");
    pg.psql(
        "postgres",
        "CREATE ROLE poller LOGIN; \
         GRANT USAGE ON SCHEMA outbox TO poller; \
         GRANT SELECT ON outbox.events TO poller; \
         GRANT SELECT, INSERT, UPDATE ON outbox.relay_state TO poller;",
    )
    .expect("role");
    let kafka = Kafka::start();
    let port = free_port().unwrap();
    let as_owner = relay_config(&pg.url("postgres"), &kafka.brokers(), "s", "p", port);
    let out = relay_cli(&["init"], &as_owner, &[POLLING]);
    assert!(
        out.status.success(),
        "init as the owner: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let url = pg.url("postgres").replace("postgres@", "poller@");
    let config = relay_config(&url, &kafka.brokers(), "s", "p", port);
    let out = relay_cli(&["check"], &config, &[POLLING]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "check passes without REPLICATION: {text}"
    );
    assert!(!text.contains("wal_level"), "{text}");
    assert!(text.contains("notify trigger present"), "{text}");

    // Logical mode on the same server fails check, naming wal_level.
    let out = relay_cli(&["check"], &config, &[]);
    assert_eq!(out.status.code(), Some(1));

    let mut relay = Relay::start(&config, &[POLLING]);
    relay.wait_ready(port, Duration::from_secs(60));
    wait_for_leader(&relay, port);
    pg.psql(
        "postgres",
        "SELECT outbox.publish('order', 'o-' || g, 'E', jsonb_build_object('n', g)) \
         FROM generate_series(1, 100) g",
    )
    .unwrap();
    let records = consume(
        &kafka.brokers(),
        &["outbox.event.order"],
        |r| r.len() >= 100,
        Duration::from_secs(60),
    );
    assert_eq!(records.len(), 100, "log:\n{}", relay.log());
    let out = relay_cli(&["status"], &config, &[POLLING]);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status prints JSON");
    assert_eq!(report["leader_connected"], true, "{report}");
    wait_until(
        Duration::from_secs(10),
        "status shows nothing pending",
        || {
            let out = relay_cli(&["status"], &config, &[POLLING]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|r| r["pending_events"] == 0)
        },
    );
    relay.sigterm();
    relay.wait_exit(Duration::from_secs(15)).expect("exits");
}

#[test]
fn postgres_restart_mid_stream_loses_nothing() {
    let world = World::new();
    let types = ["order"];
    let (relay, port) = leader(&world, &[]);
    world.write(3_000, 100, 20, &types);
    world.pg.restart().expect("postgres restarts");
    world.write(3_000, 100, 20, &types);
    let records = consume_n(&world, &topics(&types), 6_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!("polling, postgres restart: {distinct} distinct, {duplicates} duplicates");
    assert_eq!(distinct, 6_000, "log:\n{}", relay.log());
    wait_until(Duration::from_secs(30), "leading again", || is_leader(port));
}

#[test]
fn a_renamed_table_with_bytea_payloads_and_bad_rows() {
    let world = World::new();
    world.psql(
        "CREATE SCHEMA shop; \
         CREATE TABLE shop.outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
             aggregatetype text, aggregateid text, type text, payload bytea, \
             position bigint GENERATED ALWAYS AS IDENTITY, \
             xact xid8 NOT NULL DEFAULT pg_current_xact_id())",
    );
    let port = free_port().unwrap();
    let config = world.config(port)
        + "\n[source.columns]\naggregate_type = \"aggregatetype\"\naggregate_id = \"aggregateid\"\n\
           event_type = \"type\"\nheaders = \"\"\ncreated_at = \"\"\nseq = \"position\"\ntxid = \"xact\"\n";
    let relay = Relay::start(
        &config,
        &[POLLING, ("OUTBOX_RELAY_SOURCE_TABLE", "shop.outbox")],
    );
    wait_for_leader(&relay, port);
    assert_eq!(
        world.psql("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'shop.outbox'::regclass AND tgname = 'outbox_relay_notify'"),
        "1",
        "the relay installed its notify trigger"
    );
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    world.psql(
        "INSERT INTO shop.outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'o-1', 'Placed', '\\x00ff01'::bytea), \
         ('bad type!', 'o-2', 'Placed', '\\x02'::bytea), \
         ('order', 'o-3', 'Placed', NULL)",
    );
    let good = consume(
        &world.kafka.brokers(),
        &["outbox.event.order"],
        |r| r.len() >= 2,
        Duration::from_secs(60),
    );
    let dead = consume(
        &world.kafka.brokers(),
        &["outbox.dead-letter"],
        |r| !r.is_empty(),
        Duration::from_secs(60),
    );
    assert_eq!(good.len(), 2, "log:\n{}", relay.log());
    let o1 = good
        .iter()
        .find(|r| r.key_str().as_deref() == Some("o-1"))
        .unwrap();
    assert_eq!(
        o1.value.as_deref(),
        Some(&[0u8, 255, 1][..]),
        "bytea as its bytes"
    );
    assert_eq!(o1.header("event_type").as_deref(), Some("Placed"));
    let ts = o1.timestamp_ms.unwrap();
    assert!(
        ts >= before_ms - 1_000 && ts <= before_ms + 60_000,
        "no created_at column: the time it was read, {ts} vs {before_ms}"
    );
    let o3 = good
        .iter()
        .find(|r| r.key_str().as_deref() == Some("o-3"))
        .unwrap();
    assert_eq!(o3.value, None, "NULL payload is a tombstone");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key_str().as_deref(), Some("o-2"));
    assert_eq!(
        dead[0].header("dlq_reason").as_deref(),
        Some("invalid_topic")
    );
    assert_eq!(dead[0].value.as_deref(), Some(&[2u8][..]));
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn a_frozen_leader_is_replaced_and_steps_down_when_it_wakes() {
    let world = World::new();
    let (first, first_port) = leader(&world, &[]);
    let (second, second_port) = start(&world, &[]);
    wait_until(Duration::from_secs(30), "a ready standby", || {
        ready(second_port) && metric(second_port, "outbox_relay_is_leader") == Some(0.0)
    });
    world.write(1_000, 50, 10, &["order"]);
    // Frozen, its connection stays open and its lock held: only the missing heartbeats tell.
    signal(first.pid(), "STOP");
    let frozen = Instant::now();
    world.write(1_000, 50, 10, &["order"]);
    wait_until(Duration::from_secs(30), "the standby leads", || {
        is_leader(second_port)
    });
    let took = frozen.elapsed();
    println!("frozen leader replaced after {took:?}");
    assert!(
        took >= Duration::from_secs(9),
        "a live leader's lock is never taken: {took:?}"
    );
    signal(first.pid(), "CONT");
    wait_until(Duration::from_secs(30), "the old leader stands by", || {
        metric(first_port, "outbox_relay_is_leader") == Some(0.0)
    });
    world.write(1_000, 50, 10, &["order"]);
    let records = consume_n(&world, &topics(&["order"]), 3_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!("frozen leader: {distinct} distinct of 3000, {duplicates} duplicates");
    assert_eq!(
        distinct,
        3_000,
        "zero lost; new leader's log:\n{}",
        second.log()
    );
    assert!(
        is_leader(second_port) && !is_leader(first_port),
        "one leader; old leader's log:\n{}\nnew leader's log:\n{}",
        first.log(),
        second.log()
    );
    assert!(
        // Whichever it noticed first: the lock's connection, or a cursor write that hung or
        // was cut off when the new leader ended the frozen one's connections.
        first.log().contains("leader lock was lost")
            || first.log().contains("persisting the polling cursor"),
        "the old leader says why it stepped down:\n{}",
        first.log_tail()
    );
}

/// A poll reads the next `batch_size` rows of the `(txid, seq)` index in order, whatever plan
/// Postgres caches for the prepared statement: no sort of everything past the cursor (which
/// made each poll cost as much as the whole backlog).
#[test]
fn a_poll_reads_the_index_in_order_without_sorting_the_backlog() {
    use outbox_relay::config::Config;
    use outbox_relay::postgres::setup::PollingTable;
    use outbox_relay::source::polling::read_statement;

    let pg = ThrowawayPostgres::start().expect("postgres starts");
    pg.psql("postgres", include_str!("../sql/outbox.sql"))
        .expect("schema applies");
    let backlog = "CREATE INDEX events_relay_poll_idx ON outbox.events (txid, seq); \
         CREATE PROCEDURE fill() LANGUAGE plpgsql AS $$ BEGIN \
           FOR t IN 1..200 LOOP \
             INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', (g % 50)::text, 'Happened', jsonb_build_object('n', g) \
             FROM generate_series(1, 100) AS g; \
             COMMIT; \
           END LOOP; END $$; \
         CALL fill(); ANALYZE outbox.events;";
    pg.psql("postgres", backlog).expect("backlog written");
    let table = PollingTable {
        txid_is_xid8: true,
        payload_is_bytea: false,
        notify_trigger: false,
        indexed: true,
    };
    let read = read_statement(&Config::default(), &table);
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let plan = pg
            .psql(
                "postgres",
                &format!(
                    "SET plan_cache_mode = {mode}; \
                     PREPARE poll(bigint, bigint, bigint) AS {read}; \
                     EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE poll(0, 0, 1000);"
                ),
            )
            .expect("explain runs");
        println!("{mode}:\n{plan}");
        assert!(
            plan.contains("Index Scan using events_relay_poll_idx"),
            "{mode}: the poll reads the index:\n{plan}"
        );
        assert!(
            !plan.contains("Sort"),
            "{mode}: nothing to sort, the index is in (txid, seq) order:\n{plan}"
        );
        assert!(
            plan.contains("Limit (actual rows=1000"),
            "{mode}: the scan stops after the batch:\n{plan}"
        );
    }
}

const SMALL_BATCHES: (&str, &str) = ("OUTBOX_RELAY_SOURCE_BATCH_SIZE", "100");

fn published(port: u16) -> f64 {
    metric(
        port,
        "outbox_relay_events_published_total{topic=\"outbox.event.order\"}",
    )
    .unwrap_or(0.0)
}

/// The next batch is read as soon as the previous one is handed to the producer, not once
/// Kafka acknowledged it: with Kafka cut off, a backlog of many batches is read and waits in
/// the producer, while the cursor stays where the acknowledgements stopped; once Kafka is
/// back, every event arrives, in order per aggregate, and the cursor reaches the last row.
#[test]
fn several_batches_in_flight_deliver_a_backlog_complete_and_in_order() {
    let world = World::behind_proxy();
    let proxy = world.proxy.as_ref().unwrap();
    let types = ["order"];
    let (relay, port) = leader(&world, &[SMALL_BATCHES]);
    world.write(200, 100, 20, &types);
    let _ = consume_n(&world, &topics(&types), 200, Duration::from_secs(60));
    wait_until(
        Duration::from_secs(20),
        "the cursor covers the first 200",
        || {
            let (cursor, last) = cursor_and_last_row(&world);
            cursor == last
        },
    );
    let (before, _) = cursor_and_last_row(&world);

    proxy.cut();
    let total = 3_000;
    world.write(total, 100, 40, &types);
    // Thirty batches of 100: at least ten of them read and handed over with no ack at all.
    wait_until(
        Duration::from_secs(60),
        "ten batches in flight, none acknowledged",
        || metric(port, "outbox_relay_inflight_events").is_some_and(|n| n >= 1_000.0),
    );
    let (during, _) = cursor_and_last_row(&world);
    assert_eq!(during, before, "nothing acknowledged, nothing confirmed");

    proxy.restore();
    let records = consume_n(
        &world,
        &topics(&types),
        200 + total,
        Duration::from_secs(120),
    );
    let (distinct, duplicates) = check_records(&records);
    println!("polling, Kafka cut with many batches in flight: {distinct} distinct, {duplicates} duplicates");
    assert_eq!(distinct, 200 + total, "relay log:\n{}", relay.log());
    wait_until(
        Duration::from_secs(30),
        "the cursor reaches the last row",
        || {
            let (cursor, last) = cursor_and_last_row(&world);
            cursor == last
        },
    );
}

/// SIGTERM in the middle of a backlog read in many small batches, with several of them in
/// flight: the relay finishes what it handed over, persists the cursor after the last ack
/// and exits; the restart publishes the rest and nothing twice.
#[test]
fn sigterm_mid_backlog_with_batches_in_flight_publishes_no_duplicates() {
    let world = World::new();
    let types = ["order"];
    let total = 20_000;
    world.write(total, 100, 40, &types);
    let (mut relay, port) = leader(&world, &[SMALL_BATCHES]);
    wait_until(Duration::from_secs(120), "the relay is mid-backlog", || {
        published(port) >= 2_000.0
    });
    let at_stop = published(port);
    relay.sigterm();
    let exit = relay
        .wait_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(exit.success(), "clean exit; log:\n{}", relay.log());
    let (cursor, last) = cursor_and_last_row(&world);
    println!("polling SIGTERM after {at_stop} published: cursor {cursor}, last row {last}");

    let (relay, _) = leader(&world, &[SMALL_BATCHES]);
    let (distinct, duplicates) =
        read_all_and_count(&world, &types, total, Duration::from_secs(120));
    println!("polling SIGTERM mid-backlog and restart: {distinct} distinct of {total}, {duplicates} duplicates");
    assert_eq!(distinct, total, "log:\n{}", relay.log());
    assert_eq!(duplicates, 0, "no duplicates after SIGTERM and restart");
}
