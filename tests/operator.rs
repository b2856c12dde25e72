//! What the operator sees at the edges: a slot that lost its WAL, a halt on a bad event and
//! the restart after fixing it, config the relay refuses, failover reporting in `check`, and
//! `/healthz`. Real Postgres, the relay binary, and Apache Kafka.

use std::collections::HashMap;
use std::time::Duration;

use testkit::*;

const POLLING: (&str, &str) = ("OUTBOX_RELAY_SOURCE_MODE", "polling");
const HALT: (&str, &str) = ("OUTBOX_RELAY_SOURCE_ON_INVALID", "halt");

/// Good events written before the bad one, in transactions of `GOOD_PER_TX`.
const GOOD: usize = 1_000;
const GOOD_PER_TX: usize = 25;

fn healthz(port: u16) -> u16 {
    http_get(port, "/healthz").map_or(0, |(code, _)| code)
}

fn last_error(port: u16) -> String {
    status(port)["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Lets the slot keep at most 1 MB of WAL, then writes WAL, switches segments and checkpoints
/// until the slot's `wal_status` is `lost`.
fn lose_the_slot(world: &World) {
    world.psql("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'");
    world.psql("SELECT pg_reload_conf()");
    world.psql("CREATE TABLE IF NOT EXISTS filler (n int)");
    wait_until(
        Duration::from_secs(120),
        "the slot's wal_status is lost",
        || {
            world.psql(
                "INSERT INTO filler SELECT generate_series(1, 10000);\n\
             SELECT pg_switch_wal();\n\
             CHECKPOINT;",
            );
            world
                .psql(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
                )
                .trim()
                == "lost"
        },
    );
}

/// Waits until the relay halts on a lost slot, and checks what it says.
fn assert_halted_on_lost_slot(relay: &Relay, port: u16) {
    wait_until(
        Duration::from_secs(60),
        "the relay halts, saying the slot lost its WAL",
        || last_error(port).contains("wal_status = lost"),
    );
    let error = last_error(port);
    assert!(
        error.contains("events committed after"),
        "says what was lost: {error}"
    );
    assert!(
        error.contains("pg_drop_replication_slot('outbox_relay')")
            && error.contains("DELETE FROM outbox.relay_state WHERE name = 'outbox_relay'"),
        "says how to recover: {error}"
    );
    assert!(!ready(port), "not ready");
    assert_eq!(metric(port, "outbox_relay_halted"), Some(1.0));
    wait_until(Duration::from_secs(10), "the log says so", || {
        relay.log().contains("relay halted") && relay.log().contains("wal_status = lost")
    });
    assert_eq!(healthz(port), 200, "a halted relay is alive");
}

#[test]
fn a_slot_that_lost_its_wal_halts_the_relay_with_the_way_out() {
    let world = World::new();
    let mut relay = world.relay();
    world.write(20, 10, 5, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 20, Duration::from_secs(60));
    relay.sigterm();
    relay.wait_exit(Duration::from_secs(15)).expect("exits");
    // Committed while no relay runs: the slot's WAL for them goes.
    world.write(5, 5, 5, &["order"]);
    lose_the_slot(&world);

    let (relay, port) = world.relay_with(&[]);
    assert_halted_on_lost_slot(&relay, port);
    let reconnects = metric(port, "outbox_relay_source_reconnects_total");

    let check = relay_cli(&["check"], &world.config(free_port().unwrap()), &[]);
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "check fails:\n{out}");
    assert!(out.contains("wal_status = lost"), "{out}");

    // It does not retry.
    assert_eq!(
        metric(port, "outbox_relay_source_reconnects_total"),
        reconnects,
        "a halted relay does not reconnect"
    );
    drop(relay);

    // The way out it names works: a new slot, and the relay runs again.
    world.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    world.psql("DELETE FROM outbox.relay_state WHERE name = 'outbox_relay'");
    let (mut relay, port) = world.relay_with(&[]);
    relay.wait_ready(port, Duration::from_secs(60));
}

#[test]
fn a_slot_lost_while_running_halts_the_relay() {
    let world = World::new();
    let (relay, port) = world.relay_with(&[]);
    world.wait_streaming();
    world.write(20, 10, 5, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 20, Duration::from_secs(60));
    // Kafka stops answering: an event stays in flight, so the slot cannot advance.
    world.kafka.pause();
    world.write(1, 1, 1, &["order"]);
    lose_the_slot(&world);
    assert_halted_on_lost_slot(&relay, port);
    world.kafka.resume();
}

/// Writes `GOOD` good events (payload `n`, key `agg-*`) in transactions, then one event whose
/// headers are invalid, all committed one after the other.
fn write_good_then_bad(world: &World) {
    let mut script = String::new();
    for from in (0..GOOD).step_by(GOOD_PER_TX) {
        script.push_str(&format!(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'agg-' || (g % 10), 'E', jsonb_build_object('n', g) \
             FROM generate_series({from}, {to}) AS g ORDER BY g;\n",
            to = from + GOOD_PER_TX - 1
        ));
    }
    script.push_str(
        "SELECT outbox.publish('order', 'bad', 'E', '{\"n\": -1}', '\"not an object\"');\n",
    );
    world.psql(&script);
}

/// Consumes the order topic until `sentinel` arrived, then everything there is for a while,
/// and returns how often each payload `n` was published.
fn published_counts(world: &World, sentinel: i64) -> HashMap<i64, usize> {
    let n_of = |r: &Record| -> i64 {
        let v: serde_json::Value =
            serde_json::from_slice(r.value.as_deref().expect("value")).expect("json");
        v["n"].as_i64().expect("n")
    };
    let records = consume(
        &world.kafka.brokers(),
        &["outbox.event.order"],
        |records| records.iter().any(|r| n_of(r) == sentinel),
        Duration::from_secs(60),
    );
    assert!(
        records.iter().any(|r| n_of(r) == sentinel),
        "the event after the fix arrives"
    );
    // Whatever a restart resent was produced before the sentinel; read it all.
    let records = consume(
        &world.kafka.brokers(),
        &["outbox.event.order"],
        |_| false,
        Duration::from_secs(8),
    );
    let mut counts = HashMap::new();
    for r in &records {
        *counts.entry(n_of(r)).or_default() += 1;
    }
    counts
}

/// Halts on the bad event, checks the position covers every good event, restarts with
/// `on_invalid = "dead-letter"` and checks nothing good was published twice.
fn halt_confirms_then_restart_resends_nothing(
    mode: &[(&str, &str)],
    position_covers_good: impl Fn(&World) -> Result<(), String>,
) {
    let world = World::new();
    let mut env = mode.to_vec();
    env.push(HALT);
    let (mut relay, port) = world.relay_with(&env);
    relay.wait_ready(port, Duration::from_secs(60));
    assert_eq!(healthz(port), 200);
    if mode.is_empty() {
        world.wait_streaming();
    }
    write_good_then_bad(&world);
    wait_until(
        Duration::from_secs(60),
        "the relay halts on the bad event",
        || !ready(port) && last_error(port).contains("halt"),
    );
    assert_eq!(healthz(port), 200, "a halted relay is alive");
    if let Err(why) = position_covers_good(&world) {
        panic!("{why}\n{}", relay.log_tail());
    }
    relay.sigterm();
    relay.wait_exit(Duration::from_secs(20)).expect("exits");

    // The fix: let the bad event pass to the dead-letter topic.
    let (mut fixed, port) = world.relay_with(mode);
    fixed.wait_ready(port, Duration::from_secs(60));
    world.psql("SELECT outbox.publish('order', 'after', 'E', '{\"n\": 100000}')");
    let dead = consume(
        &world.kafka.brokers(),
        &["outbox.dead-letter"],
        |r| !r.is_empty(),
        Duration::from_secs(60),
    );
    assert_eq!(dead.len(), 1, "the bad event is dead-lettered");
    assert_eq!(dead[0].key_str().as_deref(), Some("bad"));
    let counts = published_counts(&world, 100_000);
    let missing: Vec<i64> = (0..GOOD as i64)
        .filter(|n| !counts.contains_key(n))
        .collect();
    assert!(missing.is_empty(), "lost good events: {missing:?}");
    let twice: Vec<(i64, usize)> = counts
        .iter()
        .filter(|(_, &c)| c > 1)
        .map(|(&n, &c)| (n, c))
        .collect();
    assert!(
        twice.is_empty(),
        "{} good events were published more than once after the restart: {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
}

#[test]
fn logical_halt_confirms_what_kafka_acknowledged() {
    halt_confirms_then_restart_resends_nothing(&[], |world| {
        // Every good transaction's commit LSN (its `pg_lsn` header) is behind the slot.
        let records = consume(
            &world.kafka.brokers(),
            &["outbox.event.order"],
            |r| r.len() >= GOOD,
            Duration::from_secs(60),
        );
        let lsns: Vec<String> = records
            .iter()
            .filter_map(|r| r.header("pg_lsn"))
            .map(|l| format!("'{l}'"))
            .collect();
        if lsns.len() < GOOD {
            return Err(format!("only {} good events were published", lsns.len()));
        }
        let covered = world.psql(&format!(
            "SELECT confirmed_flush_lsn > ALL (ARRAY[{}]::pg_lsn[]) \
             FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            lsns.join(",")
        ));
        if covered.trim() != "t" {
            let at = world.psql(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            );
            return Err(format!(
                "the slot ({at}) does not cover every good event acknowledged before the halt"
            ));
        }
        Ok(())
    });
}

#[test]
fn polling_halt_persists_the_cursor_past_what_kafka_acknowledged() {
    halt_confirms_then_restart_resends_nothing(&[POLLING], |world| {
        let cursor = world
            .psql("SELECT position FROM outbox.relay_state WHERE name = 'polling:outbox.events'");
        let last_good = world.psql(
            "SELECT txid || '/' || seq FROM outbox.events WHERE aggregate_id <> 'bad' \
             ORDER BY txid DESC, seq DESC LIMIT 1",
        );
        if cursor.trim() != last_good.trim() {
            return Err(format!(
                "the cursor ({cursor}) is not at the last good event ({last_good})"
            ));
        }
        Ok(())
    });
}

#[test]
fn check_refuses_a_message_prefix_that_could_break_the_emit_function() {
    let config = relay_config(
        &format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            free_port().unwrap()
        ),
        &format!("127.0.0.1:{}", free_port().unwrap()),
        "outbox_relay",
        "outbox_relay",
        free_port().unwrap(),
    );
    for prefix in ["a$$b", "it's", "x\\y", ""] {
        let out = relay_cli(
            &["check"],
            &config,
            &[("OUTBOX_RELAY_SOURCE_MESSAGE_PREFIX", prefix)],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{prefix:?}: {stdout}");
        assert!(
            stdout.contains("config: FAILED: source.message_prefix must be 1 to 63 characters"),
            "{prefix:?}: {stdout}"
        );
        let out = relay_cli(
            &["init"],
            &config,
            &[("OUTBOX_RELAY_SOURCE_MESSAGE_PREFIX", prefix)],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "init refuses {prefix:?}");
        assert!(stderr.contains("source.message_prefix"), "{stderr}");
    }
}

#[test]
fn check_reports_whether_the_slot_survives_a_failover() {
    let world = World::new();
    let version: i32 = world
        .psql("SHOW server_version_num")
        .trim()
        .parse()
        .expect("a number");
    let out = relay_cli(&["check"], &world.config(free_port().unwrap()), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    if version < 170_000 {
        assert!(
            stdout.contains(&format!(
                "postgres: failover: PostgreSQL {} keeps logical slots on the primary only",
                version / 10_000
            )) && stdout.contains("A vanished slot"),
            "{stdout}"
        );
    } else {
        assert!(
            stdout.contains(
                "postgres: failover: run will create slot outbox_relay with failover = true"
            ),
            "{stdout}"
        );
        let _relay = world.relay();
        let failover = world
            .psql("SELECT failover FROM pg_replication_slots WHERE slot_name = 'outbox_relay'");
        assert_eq!(failover.trim(), "t", "the slot is created with failover");
    }
}
