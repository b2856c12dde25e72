//! End-to-end tests of coverage: the publication must deliver every insert into the outbox
//! table, with every configured column, or the relay stops with the fix before it confirms
//! anything it could not see. Real Postgres, the relay binary, Apache Kafka.

use std::collections::HashSet;
use std::time::Duration;

use testkit::*;

/// The outbox schema, for recreating the table.
const OUTBOX_SQL: &str = include_str!("../sql/outbox.sql");

/// `outbox-relay check` with `config`: (exit code, stdout and stderr).
fn check(config: &str) -> (Option<i32>, String) {
    let out = relay_cli(&["check"], config, &[]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// Waits until the relay on `port` halts with an error containing `needle`; returns it.
fn wait_halted(relay: &Relay, port: u16, needle: &str) -> String {
    wait_until(
        Duration::from_secs(60),
        &format!("the relay halts naming {needle:?}"),
        || {
            status(port)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(needle))
                && !ready(port)
        },
    );
    let error = status(port)["last_error"].as_str().unwrap().to_owned();
    assert!(
        relay.log().contains("halted"),
        "the log says so:\n{}",
        relay.log_tail()
    );
    error
}

/// Events `from..to` with payload `{"n": g}`, created at `at + g seconds` (which picks the
/// partition of a partitioned outbox), keys `agg-0`..`agg-4`.
fn insert_events(world: &World, from: i64, to: i64, at: &str) {
    world.psql(&format!(
        "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload, created_at) \
         SELECT 'order', 'agg-' || (g % 5), 'Happened', jsonb_build_object('n', g), \
                timestamptz '{at}' + g * interval '1 second' \
         FROM generate_series({from}, {to}) AS g"
    ));
}

/// The `n` of every record's payload.
fn numbers(records: &[Record]) -> HashSet<i64> {
    records
        .iter()
        .filter_map(|r| r.value.as_deref())
        .filter_map(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
        .filter_map(|v| v["n"].as_i64())
        .collect()
}

#[test]
fn a_partitioned_outbox_is_relayed_while_partitions_are_attached_and_detached() {
    let world = World::new();
    world.psql(
        "DROP TABLE outbox.events;
         CREATE TABLE outbox.events (
             id             uuid        NOT NULL DEFAULT gen_random_uuid(),
             aggregate_type text        NOT NULL,
             aggregate_id   text        NOT NULL,
             event_type     text        NOT NULL,
             payload        jsonb,
             headers        jsonb       NOT NULL DEFAULT '{}',
             created_at     timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (id, created_at)
         ) PARTITION BY RANGE (created_at);
         CREATE TABLE outbox.events_2024 PARTITION OF outbox.events
             FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE outbox.events_2025 PARTITION OF outbox.events
             FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');",
    );
    let (mut relay, port) = world.relay_with(&[]);
    world.wait_streaming();
    relay.wait_ready(port, Duration::from_secs(30));
    let via_root =
        world.psql("SELECT pubviaroot FROM pg_publication WHERE pubname = 'outbox_relay'");
    assert_eq!(via_root.trim(), "t", "created via the partition root");

    // Both partitions.
    insert_events(&world, 0, 99, "2024-06-01");
    insert_events(&world, 100, 199, "2025-06-01");
    // A partition attached while running.
    world.psql(
        "CREATE TABLE outbox.events_2026 (LIKE outbox.events INCLUDING DEFAULTS);
         ALTER TABLE outbox.events ATTACH PARTITION outbox.events_2026
             FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');",
    );
    insert_events(&world, 200, 299, "2026-03-01");
    // A partition detached while running: its later rows are no longer the outbox's.
    world.psql("ALTER TABLE outbox.events DETACH PARTITION outbox.events_2024");
    insert_events(&world, 300, 399, "2025-09-01");
    world.psql(
        "INSERT INTO outbox.events_2024 (aggregate_type, aggregate_id, event_type, payload, created_at) \
         VALUES ('order', 'detached', 'Happened', '{\"n\": 1000}', '2024-07-01')",
    );
    insert_events(&world, 400, 499, "2026-09-01");

    let records = consume_n(&world, &topics(&["order"]), 500, Duration::from_secs(90));
    let (distinct, _) = check_records(&records);
    assert_eq!(distinct, 500, "every event, log:\n{}", relay.log_tail());
    assert_eq!(numbers(&records), (0..500).collect::<HashSet<_>>());
    assert!(ready(port), "still streaming: {}", status(port));
    assert!(relay.is_running());
}

#[test]
fn a_table_dropped_and_recreated_while_running_halts_with_the_slot_held() {
    let world = World::new();
    let (relay, port) = world.relay_with(&[]);
    world.wait_streaming();
    insert_events(&world, 0, 9, "2024-06-01");
    let records = consume_n(&world, &topics(&["order"]), 10, Duration::from_secs(60));
    assert_eq!(numbers(&records).len(), 10);

    // A migration that drops and recreates the outbox: the new table is in no publication.
    world.psql(&format!(
        "BEGIN; DROP TABLE outbox.events; {OUTBOX_SQL}; COMMIT;"
    ));
    let recreated_at = world.psql("SELECT pg_current_wal_lsn()");
    let recreated_at = recreated_at.trim();
    insert_events(&world, 10, 14, "2024-06-01");
    // Keep the database busy, so keepalives would carry the slot on.
    world.psql("CREATE TABLE busy AS SELECT g FROM generate_series(1, 10000) g");

    let error = wait_halted(&relay, port, "dropped and created again");
    assert!(
        error.contains("ALTER PUBLICATION \"outbox_relay\" ADD TABLE"),
        "names the fix: {error}"
    );
    let held = world.psql(&format!(
        "SELECT confirmed_flush_lsn <= '{recreated_at}'::pg_lsn, confirmed_flush_lsn \
         FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
    ));
    assert!(
        held.trim().starts_with("t|"),
        "the slot ({held}) stays before the first event after the recreation ({recreated_at})"
    );
    assert_eq!(metric(port, "outbox_relay_halted"), Some(1.0));
    drop(relay);

    // The way out: put the table back into the publication and restart.
    world.psql("ALTER PUBLICATION outbox_relay ADD TABLE outbox.events");
    let (mut relay, port) = world.relay_with(&[]);
    relay.wait_ready(port, Duration::from_secs(30));
    insert_events(&world, 15, 19, "2024-06-01");
    let records = consume(
        &world.kafka.brokers(),
        &["outbox.event.order"],
        |r| {
            let seen = numbers(r);
            (15..20).all(|n| seen.contains(&n))
        },
        Duration::from_secs(60),
    );
    assert!(
        (15..20).all(|n| numbers(&records).contains(&n)),
        "events after the fix are relayed, log:\n{}",
        relay.log_tail()
    );
}

#[test]
fn a_publication_without_the_table_fails_check_and_start_until_init_adds_it() {
    let world = World::new();
    world.psql(
        "CREATE TABLE public.other (a int);
         CREATE PUBLICATION outbox_relay FOR TABLE public.other;",
    );
    let port = free_port().unwrap();
    let config = world.config(port);
    let (code, text) = check(&config);
    assert_eq!(code, Some(1), "check fails: {text}");
    assert!(
        text.contains("ALTER PUBLICATION \"outbox_relay\" ADD TABLE \"outbox\".\"events\""),
        "check names the fix: {text}"
    );

    let relay = Relay::start(&config, &[]);
    let error = wait_halted(&relay, port, "does not publish the outbox table");
    assert!(
        error.contains("ALTER PUBLICATION"),
        "names the fix: {error}"
    );
    let slots = world.psql("SELECT count(*) FROM pg_replication_slots");
    assert_eq!(
        slots.trim(),
        "0",
        "no slot before the publication covers the table"
    );
    drop(relay);

    let init = relay_cli(&["init"], &config, &[]);
    let init_text =
        String::from_utf8_lossy(&init.stdout).into_owned() + &String::from_utf8_lossy(&init.stderr);
    assert!(init.status.success(), "init succeeds: {init_text}");
    assert!(
        init_text.contains("ADD TABLE"),
        "init says what it did: {init_text}"
    );
    let (code, text) = check(&config);
    assert_eq!(code, Some(0), "check passes after init: {text}");

    let mut relay = Relay::start(&config, &[]);
    relay.wait_ready(port, Duration::from_secs(30));
    insert_events(&world, 0, 9, "2024-06-01");
    let records = consume_n(&world, &topics(&["order"]), 10, Duration::from_secs(60));
    assert_eq!(numbers(&records).len(), 10, "log:\n{}", relay.log_tail());
}

#[test]
fn a_publication_without_inserts_fails_check_and_start() {
    let world = World::new();
    world.psql(
        "CREATE PUBLICATION outbox_relay FOR TABLE outbox.events \
         WITH (publish = 'update, delete')",
    );
    let port = free_port().unwrap();
    let config = world.config(port);
    let (code, text) = check(&config);
    assert_eq!(code, Some(1), "check fails: {text}");
    assert!(
        text.contains(
            "ALTER PUBLICATION \"outbox_relay\" SET (publish = 'insert, update, delete')"
        ),
        "check names the fix: {text}"
    );
    let relay = Relay::start(&config, &[]);
    let error = wait_halted(&relay, port, "does not publish inserts");
    assert!(error.contains("SET (publish = "), "names the fix: {error}");
}

#[test]
fn a_column_mapping_typo_fails_check_and_start_and_publishes_nothing() {
    let world = World::new();
    let port = free_port().unwrap();
    let config = world.config(port) + "\n[source.columns]\npayload = \"paylod\"\n";
    let (code, text) = check(&config);
    assert_eq!(code, Some(1), "check fails: {text}");
    assert!(
        text.contains("\"paylod\""),
        "check names the column: {text}"
    );

    let relay = Relay::start(&config, &[]);
    let error = wait_halted(&relay, port, "\"paylod\"");
    assert!(
        error.contains("source.columns.payload"),
        "names the setting: {error}"
    );
    insert_events(&world, 0, 4, "2024-06-01");
    let records = consume(
        &world.kafka.brokers(),
        &["outbox.event.order", "outbox.dead-letter"],
        |r| !r.is_empty(),
        Duration::from_secs(5),
    );
    assert!(records.is_empty(), "nothing published: {records:?}");
}

#[test]
fn renaming_a_column_while_running_halts_without_a_tombstone() {
    let world = World::new();
    let (relay, port) = world.relay_with(&[]);
    world.wait_streaming();
    insert_events(&world, 0, 4, "2024-06-01");
    let _ = consume_n(&world, &topics(&["order"]), 5, Duration::from_secs(60));

    world.psql("ALTER TABLE outbox.events RENAME COLUMN payload TO body");
    world.psql(
        "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, body) \
         VALUES ('order', 'renamed', 'Happened', '{\"n\": 5}')",
    );
    let error = wait_halted(&relay, port, "\"payload\"");
    assert!(
        error.contains("source.columns.payload"),
        "names the setting: {error}"
    );
    let records = consume(
        &world.kafka.brokers(),
        &["outbox.event.order", "outbox.dead-letter"],
        |r| r.len() > 5,
        Duration::from_secs(5),
    );
    assert!(
        records.iter().all(|r| r.value.is_some()),
        "no tombstone: {records:?}"
    );
    assert!(
        !records
            .iter()
            .any(|r| r.key_str().as_deref() == Some("renamed")),
        "the event written after the rename is not published: {records:?}"
    );
    assert_eq!(numbers(&records), (0..5).collect::<HashSet<_>>());
}

#[test]
fn a_table_removed_from_the_publication_and_added_back_while_running_halts_with_the_slot_held() {
    let world = World::new();
    let (relay, port) = world.relay_with(&[]);
    world.wait_streaming();
    insert_events(&world, 0, 9, "2024-06-01");
    let _ = consume_n(&world, &topics(&["order"]), 10, Duration::from_secs(60));

    // Out of the publication for one insert, then back in: that insert is not in the stream.
    let removed_at = world.psql(
        "ALTER PUBLICATION outbox_relay DROP TABLE outbox.events;
         SELECT pg_current_wal_lsn();
         INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', 'unseen', 'Happened', '{\"n\": 10}');
         ALTER PUBLICATION outbox_relay ADD TABLE outbox.events;",
    );
    let removed_at = removed_at.trim();
    insert_events(&world, 11, 14, "2024-06-01");
    world.psql("CREATE TABLE busy AS SELECT g FROM generate_series(1, 10000) g");

    // Caught either while out of the publication or, once back, by its new membership.
    let error = wait_halted(&relay, port, "publication outbox_relay");
    assert!(
        error.contains("added again") || error.contains("does not publish"),
        "says what happened: {error}"
    );
    println!("halted: {error}");
    let held = world.psql(&format!(
        "SELECT confirmed_flush_lsn <= '{removed_at}'::pg_lsn, confirmed_flush_lsn \
         FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
    ));
    assert!(
        held.trim().starts_with("t|"),
        "the slot ({held}) stays before the unseen insert (after {removed_at})"
    );
}
