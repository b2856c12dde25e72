//! End-to-end tests of logical mode: a real Postgres, the relay binary, and Apache Kafka.
//!
//! Each test starts its own Postgres cluster and broker on free ports, so tests run in
//! parallel without sharing state. Waits are "until a condition or a generous deadline".

use std::collections::HashMap;
use std::time::Duration;

use testkit::*;

#[test]
fn relays_ten_thousand_events_with_the_spec_record_shape() {
    let world = World::new();
    let types = ["order", "customer", "invoice"];
    let relay = world.relay();
    world.write(10_000, 100, 50, &types);
    let records = consume_n(&world, &topics(&types), 10_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    assert_eq!(distinct, 10_000, "relay log:\n{}", relay.log());
    assert_eq!(duplicates, 0, "no duplicates in steady state");

    // Every record matches its row: topic, key, value, timestamp, headers, partition.
    let rows = world.psql(
        "SELECT id, aggregate_type, aggregate_id, payload::text, \
                (extract(epoch from created_at) * 1000)::bigint FROM outbox.events",
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
        let ts: i64 = row[4].parse().unwrap();
        assert!(
            (r.timestamp_ms.unwrap() - ts).abs() <= 1,
            "timestamp {} vs created_at {ts}",
            r.timestamp_ms.unwrap()
        );
        assert_eq!(r.header("aggregate_type").as_deref(), Some(row[1].as_str()));
        assert_eq!(r.header("event_type").as_deref(), Some("Happened"));
        let lsn = r.header("pg_lsn").expect("pg_lsn header");
        assert!(lsn.contains('/'), "pg_lsn looks like an LSN: {lsn}");
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
}

#[test]
fn kill_nine_three_times_loses_nothing() {
    let world = World::new();
    let types = ["order"];
    let mut relay = world.relay();
    let total = 20_000;
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| world.write(total, 50, 40, &types));
        for kill in 1..=3 {
            // Kill it while the writer is a quarter further along each time.
            wait_until(Duration::from_secs(120), "the writer progresses", || {
                let rows: usize = world
                    .psql("SELECT count(*) FROM outbox.events")
                    .trim()
                    .parse()
                    .unwrap();
                rows >= kill * total / 4
            });
            relay.kill9();
            relay = world.relay();
        }
        writer.join().expect("writer finishes");
    });
    let records = consume_n(&world, &topics(&types), total, Duration::from_secs(180));
    let (distinct, duplicates) = check_records(&records);
    println!("kill -9 x3 while writing: {distinct} distinct of {total}, {duplicates} duplicates");
    assert_eq!(distinct, total, "zero lost; relay log:\n{}", relay.log());
}

#[test]
fn sigterm_and_restart_publish_no_duplicates() {
    let world = World::new();
    let types = ["order"];
    let mut relay = world.relay();
    world.write(3_000, 100, 20, &types);
    let _ = consume_n(&world, &topics(&types), 3_000, Duration::from_secs(60));
    let started = std::time::Instant::now();
    relay.sigterm();
    let status = relay
        .wait_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    let took = started.elapsed();
    println!("shutdown took {took:?}");
    assert!(status.success(), "clean exit; log:\n{}", relay.log());
    assert!(
        took < Duration::from_secs(10),
        "exit within 10 s, took {took:?}"
    );

    let relay = world.relay();
    world.write(1_000, 100, 20, &types);
    let records = consume_n(&world, &topics(&types), 4_000, Duration::from_secs(60));
    let (distinct, duplicates) = check_records(&records);
    assert_eq!(distinct, 4_000, "log:\n{}", relay.log());
    assert_eq!(duplicates, 0, "no duplicates after SIGTERM and restart");
}

#[test]
fn idle_outbox_on_a_busy_database_does_not_pin_wal() {
    let world = World::new();
    let relay = world.relay();
    world.write(10, 10, 2, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 10, Duration::from_secs(60));
    world.psql("CREATE TABLE busy (id bigserial primary key, filler text)");
    let wal_before: f64 = world
        .psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        .trim()
        .parse()
        .unwrap();
    // About 64 MiB of WAL that has nothing to do with the outbox.
    for _ in 0..8 {
        world.psql(
            "INSERT INTO busy (filler) SELECT repeat('x', 900) FROM generate_series(1, 8000)",
        );
    }
    let retained = || -> i64 {
        world
            .psql("SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'outbox_relay'")
            .trim()
            .parse()
            .unwrap()
    };
    let wal_after: f64 = world
        .psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        .trim()
        .parse()
        .unwrap();
    let written = (wal_after - wal_before) as i64;
    assert!(written > 60 << 20, "wrote about 64 MiB of WAL: {written}");
    println!("unrelated WAL written: {written} bytes");
    wait_until(Duration::from_secs(30), "retained WAL below 16 MiB", || {
        world.psql("CHECKPOINT");
        retained() < 16 << 20
    });
    println!("retained WAL after idle churn: {} bytes", retained());
    drop(relay);
}

#[test]
fn insert_and_delete_publishes_once_and_other_changes_publish_nothing() {
    let world = World::new();
    let relay = world.relay();
    world.psql(
        "BEGIN; \
         WITH e AS (SELECT outbox.publish('order', 'o-1', 'Placed', '{\"n\": 1}')) \
         DELETE FROM outbox.events WHERE id IN (SELECT * FROM e); \
         COMMIT;",
    );
    world.psql("SELECT outbox.publish('order', 'o-2', 'Placed', '{\"n\": 2}')");
    world.psql("UPDATE outbox.events SET event_type = 'Changed'");
    world.psql("DELETE FROM outbox.events");
    world.psql("SELECT outbox.publish('order', 'o-3', 'Placed', '{\"n\": 3}')");
    world.psql("TRUNCATE outbox.events");
    // A marker after all of it: once it is in, everything before it has been relayed.
    world.psql("SELECT outbox.publish('order', 'o-4', 'Placed', '{\"n\": 4}')");
    let records = consume(
        &world.kafka.brokers(),
        &["outbox.event.order"],
        |r| r.len() >= 4,
        Duration::from_secs(60),
    );
    assert_eq!(
        records.len(),
        4,
        "records (partition, offset, key): {:?}\n{}log:\n{}",
        records
            .iter()
            .map(|r| (
                r.partition,
                r.offset,
                String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned()
            ))
            .collect::<Vec<_>>(),
        partition_report(&world.kafka.brokers(), "outbox.event.order", &records),
        relay.log()
    );
    // Partitions are read independently, so the marker alone proves nothing: read everything
    // again, giving anything extra a few seconds to show up.
    let mut records = consume(
        &world.kafka.brokers(),
        &["outbox.event.order"],
        |r| r.len() > 4,
        Duration::from_secs(3),
    );
    records.sort_by_key(|r| r.key.clone());
    let keys: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(r.key.as_deref().unwrap()).into_owned())
        .collect();
    assert_eq!(keys, ["o-1", "o-2", "o-3", "o-4"], "log:\n{}", relay.log());
    assert!(records
        .iter()
        .all(|r| r.header("event_type").as_deref() == Some("Placed")));
}

#[test]
fn emitted_messages_are_published_like_rows() {
    let world = World::new();
    let relay = world.relay();
    let id = world.psql(
        "SELECT outbox.emit('order', 'o-9', 'Emitted', '{\"n\": 9}', '{\"traceparent\": \"t-1\"}')",
    );
    let id = id.trim().to_owned();
    assert_eq!(world.psql("SELECT count(*) FROM outbox.events").trim(), "0");
    let records = consume(
        &world.kafka.brokers(),
        &["outbox.event.order"],
        |r| !r.is_empty(),
        Duration::from_secs(60),
    );
    assert_eq!(records.len(), 1, "log:\n{}", relay.log());
    let r = &records[0];
    assert_eq!(r.header("id"), Some(id));
    assert_eq!(r.key.as_deref(), Some(&b"o-9"[..]));
    assert_eq!(r.header("event_type").as_deref(), Some("Emitted"));
    assert_eq!(r.header("traceparent").as_deref(), Some("t-1"));
    let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
    assert_eq!(v, serde_json::json!({"n": 9}));
    assert!(r.header("pg_lsn").is_some());
}

#[test]
fn postgres_restart_mid_stream_loses_nothing() {
    let world = World::new();
    let types = ["order"];
    let relay = world.relay();
    world.write(3_000, 100, 20, &types);
    world.pg.restart().expect("postgres restarts");
    world.write(3_000, 100, 20, &types);
    let records = consume_n(&world, &topics(&types), 6_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!("postgres restart: {distinct} distinct, {duplicates} duplicates");
    assert_eq!(distinct, 6_000, "log:\n{}", relay.log());
}

#[test]
fn check_names_wal_level_and_the_fix() {
    let pg =
        ThrowawayPostgres::start_with(&PostgresOptions::default().setting("wal_level", "replica"))
            .expect("postgres starts");
    let port = free_port().unwrap();
    let config = relay_config(&pg.url("postgres"), "127.0.0.1:1", "s", "p", port);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit 1: {text}");
    assert!(text.contains("wal_level"), "names wal_level: {text}");
    assert!(
        text.contains("wal_level = logical"),
        "names the fix: {text}"
    );
}

#[test]
fn demo_runs_end_to_end() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["demo", "--events", "300", "--rate", "1000"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo exits 0: {text}");
    assert!(text.contains("300 distinct ids"), "{text}");
    assert!(text.contains("in commit order"), "{text}");
    // After the counts, how to consume: the topic, the broker, a client hint and the docs.
    let hint = text.find("consume them").expect("a how-to-consume block");
    assert!(
        hint > text.find("published").unwrap(),
        "after the counts: {text}"
    );
    let hint = &text[hint..];
    assert!(hint.contains("outbox.event.order"), "{hint}");
    assert!(hint.contains("kcat -b 127.0.0.1:"), "{hint}");
    assert!(hint.contains("docs/CONSUMING.md"), "{hint}");
}
