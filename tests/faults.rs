//! When things go wrong: bad rows, Kafka outages, missing topics, a second relay, a vanished
//! slot, secrets. Real Postgres, the relay binary, and Apache Kafka (behind a cuttable proxy
//! where the network matters).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use testkit::*;

#[test]
fn each_bad_input_is_dead_lettered_and_the_stream_goes_on() {
    let world = World::new();
    let (relay, port) = world.relay_with(&[
        // A small limit makes "too large" cheap to produce.
        ("OUTBOX_RELAY_KAFKA_PROPERTIES_MESSAGE_MAX_BYTES", "20000"),
    ]);
    world.wait_streaming();
    world.psql("SELECT outbox.publish('bad type!', 'a-1', 'E', '{\"n\": 1}')");
    world.psql(
        "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('order', 'a-2', 'E', jsonb_build_object('big', repeat('x', 50000)))",
    );
    world.psql("SELECT outbox.publish('order', 'a-3', 'E', '{\"n\": 3}', '[1, 2]')");
    world.psql("SELECT outbox.publish('order', '', 'E', '{\"n\": 4}')");
    world.psql("SELECT pg_logical_emit_message(true, 'outbox', 'this is not json')");
    world.psql("SELECT outbox.publish('order', 'a-ok', 'E', '{\"n\": 6}')");

    let dead = consume(
        &world.kafka.brokers(),
        &["outbox.dead-letter"],
        |r| r.len() >= 5,
        Duration::from_secs(60),
    );
    let good = consume(
        &world.kafka.brokers(),
        &["outbox.event.order"],
        |r| !r.is_empty(),
        Duration::from_secs(60),
    );
    assert_eq!(dead.len(), 5, "five dead letters; log:\n{}", relay.log());
    let reasons: Vec<(Option<String>, String, String)> = dead
        .iter()
        .map(|r| {
            (
                r.key_str(),
                r.header("dlq_reason").expect("dlq_reason"),
                r.header("dlq_topic").expect("dlq_topic"),
            )
        })
        .collect();
    let find = |key: Option<&str>| {
        dead.iter()
            .find(|r| r.key_str().as_deref() == key)
            .unwrap_or_else(|| panic!("dead letter for {key:?} in {reasons:?}"))
    };
    let r = find(Some("a-1"));
    assert_eq!(r.header("dlq_reason").as_deref(), Some("invalid_topic"));
    assert_eq!(
        r.header("dlq_topic").as_deref(),
        Some("outbox.event.bad type!")
    );
    assert!(r.header("dlq_error").is_some_and(|e| !e.is_empty()));
    assert!(r.header("id").is_some(), "original headers kept");
    assert_eq!(r.value_str().as_deref(), Some("{\"n\": 1}"), "value kept");

    let r = find(Some("a-2"));
    assert_eq!(r.header("dlq_reason").as_deref(), Some("message_too_large"));
    assert_eq!(r.value, None, "value omitted");
    assert_eq!(r.header("dlq_topic").as_deref(), Some("outbox.event.order"));

    let r = find(Some("a-3"));
    assert_eq!(r.header("dlq_reason").as_deref(), Some("invalid_headers"));

    let r = find(Some(""));
    assert_eq!(r.header("dlq_reason").as_deref(), Some("invalid_topic"));

    let r = find(None);
    assert_eq!(r.header("dlq_reason").as_deref(), Some("invalid_message"));
    assert_eq!(r.value_str().as_deref(), Some("this is not json"));

    assert_eq!(good.len(), 1);
    assert_eq!(good[0].key_str().as_deref(), Some("a-ok"));
    wait_until(Duration::from_secs(10), "dead-letter metrics", || {
        [
            ("invalid_topic", 2.0),
            ("message_too_large", 1.0),
            ("invalid_headers", 1.0),
            ("invalid_message", 1.0),
        ]
        .iter()
        .all(|(reason, n)| {
            metric(
                port,
                &format!("outbox_relay_events_dead_lettered_total{{reason=\"{reason}\"}}"),
            ) == Some(*n)
        })
    });
}

#[test]
fn halt_mode_stops_advancing_and_says_why() {
    let world = World::new();
    let (relay, port) = world.relay_with(&[("OUTBOX_RELAY_SOURCE_ON_INVALID", "halt")]);
    world.wait_streaming();
    world.psql("SELECT outbox.publish('order', 'h-1', 'E', '{\"n\": 1}')");
    let bad =
        world.psql("SELECT outbox.publish('order', 'h-2', 'E', '{\"n\": 2}', '\"not an object\"')");
    world.psql("SELECT outbox.publish('order', 'h-3', 'E', '{\"n\": 3}')");
    wait_until(
        Duration::from_secs(30),
        "the relay halts and is not ready",
        || {
            !ready(port)
                && status(port)["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("halt"))
        },
    );
    let error = status(port)["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains(bad.trim()), "names the event: {error}");
    assert!(
        error.contains("invalid_headers"),
        "names the reason: {error}"
    );
    assert!(
        relay.log().contains("halted"),
        "log says so:\n{}",
        relay.log()
    );
    assert_eq!(metric(port, "outbox_relay_halted"), Some(1.0));
    // Nothing at or after the bad event is published; the one before it is.
    let records = consume(
        &world.kafka.brokers(),
        &["outbox.event.order", "outbox.dead-letter"],
        |r| r.len() > 1,
        Duration::from_secs(3),
    );
    let keys: Vec<_> = records.iter().filter_map(|r| r.key_str()).collect();
    assert_eq!(keys, ["h-1"]);
}

#[test]
fn kafka_outage_loses_nothing_and_reports_not_ready() {
    let world = World::behind_proxy();
    let proxy = world.proxy.as_ref().unwrap();
    let (relay, port) = world.relay_with(&[]);
    world.wait_streaming();
    world.write(3_000, 100, 20, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 3_000, Duration::from_secs(60));
    wait_until(Duration::from_secs(20), "ready before the cut", || {
        ready(port)
    });

    proxy.cut();
    let cut_at = Instant::now();
    world.write(3_000, 100, 20, &["order"]);
    wait_until(
        Duration::from_secs(20),
        "not ready while Kafka is cut off",
        || !ready(port),
    );
    let report = status(port);
    assert_eq!(report["kafka_reachable"], false, "{report}");
    // Keep the network down for 20 s in all.
    let rest = Duration::from_secs(20).saturating_sub(cut_at.elapsed());
    wait_until(rest + Duration::from_secs(5), "20 s outage", || {
        cut_at.elapsed() >= Duration::from_secs(20)
    });
    proxy.restore();

    let records = consume_n(&world, &topics(&["order"]), 6_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!("20 s Kafka outage: {distinct} distinct of 6000, {duplicates} duplicates");
    assert_eq!(distinct, 6_000, "zero lost; log:\n{}", relay.log());
    wait_until(Duration::from_secs(30), "ready again", || ready(port));
}

#[test]
fn a_missing_topic_holds_its_events_in_order_and_is_named() {
    let world = World::new();
    let (relay, port) = world.relay_with(&[("OUTBOX_RELAY_KAFKA_CREATE_TOPICS", "false")]);
    world.wait_streaming();
    world.write(200, 50, 5, &["order"]);
    wait_until(
        Duration::from_secs(30),
        "the relay names the missing topic",
        || {
            !ready(port)
                && status(port)["waiting_for_topic"]
                    .as_str()
                    .is_some_and(|t| t.contains("outbox.event.order"))
        },
    );
    assert!(relay.log().contains("outbox.event.order"), "log names it");
    world.kafka.create_topic("outbox.event.order", 3);
    let records = consume_n(&world, &topics(&["order"]), 200, Duration::from_secs(60));
    let (distinct, _) = check_records(&records);
    assert_eq!(distinct, 200, "log:\n{}", relay.log());
    wait_until(
        Duration::from_secs(20),
        "ready once the topic exists",
        || ready(port),
    );
}

#[test]
fn a_standby_takes_over_within_ten_seconds_of_the_leaders_death() {
    let world = World::new();
    let (mut leader, leader_port) = world.relay_with(&[]);
    world.wait_streaming();
    let (standby, standby_port) = world.relay_with(&[]);
    wait_until(Duration::from_secs(30), "both ready, one leader", || {
        ready(leader_port)
            && ready(standby_port)
            && metric(leader_port, "outbox_relay_is_leader") == Some(1.0)
            && metric(standby_port, "outbox_relay_is_leader") == Some(0.0)
    });
    assert_eq!(status(standby_port)["role"], "standby");

    std::thread::scope(|scope| {
        let writer = scope.spawn(|| world.write(6_000, 50, 30, &["order"]));
        wait_until(Duration::from_secs(60), "some events written", || {
            world
                .psql("SELECT count(*) FROM outbox.events")
                .trim()
                .parse::<u32>()
                .unwrap()
                > 1_500
        });
        leader.kill9();
        let died = Instant::now();
        wait_until(Duration::from_secs(15), "the standby leads", || {
            metric(standby_port, "outbox_relay_is_leader") == Some(1.0)
        });
        let took = died.elapsed();
        println!("takeover took {took:?}");
        assert!(
            took < Duration::from_secs(10),
            "takeover within 10 s: {took:?}"
        );
        writer.join().unwrap();
    });
    let records = consume_n(&world, &topics(&["order"]), 6_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!("failover: {distinct} distinct of 6000, {duplicates} duplicates");
    assert_eq!(
        distinct,
        6_000,
        "zero lost; standby log:\n{}",
        standby.log()
    );
}

#[test]
fn a_vanished_slot_is_not_recreated() {
    let world = World::new();
    let mut relay = world.relay();
    world.write(100, 50, 5, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 100, Duration::from_secs(60));
    relay.sigterm();
    relay.wait_exit(Duration::from_secs(15)).expect("exits");
    world.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    world.write(10, 10, 5, &["order"]);

    let (relay, port) = world.relay_with(&[]);
    wait_until(Duration::from_secs(30), "halted, naming the risk", || {
        status(port)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no longer exists"))
    });
    assert!(!ready(port));
    let error = status(port)["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("relay_state"), "names the way out: {error}");
    let slots = world.psql("SELECT count(*) FROM pg_replication_slots");
    assert_eq!(slots.trim(), "0", "the slot was not recreated");
    drop(relay);
}

#[test]
fn secrets_never_reach_the_log_or_status() {
    let world = World::new();
    world.psql("CREATE ROLE relay_user LOGIN SUPERUSER PASSWORD 'pg-s3cret-pw'");
    let port = free_port().unwrap();
    let url = format!(
        "postgres://relay_user:pg-s3cret-pw@127.0.0.1:{}/postgres",
        world.pg.port()
    );
    let config = relay_config(
        &url,
        &world.kafka.brokers(),
        "outbox_relay",
        "outbox_relay",
        port,
    ) + "\n[kafka.properties]\n\"sasl.password\" = \"kafka-s3cret-pw\"\n";
    let relay = Relay::start(
        &config,
        &[(
            "OUTBOX_RELAY_LOG",
            "debug,tokio_postgres=info,rdkafka=info,hyper=info",
        )],
    );
    world.wait_streaming();
    world.write(10, 10, 2, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 10, Duration::from_secs(60));
    let (_, status_body) = http_get(port, "/status").unwrap();
    let (_, metrics_body) = http_get(port, "/metrics").unwrap();
    let check = relay_cli(&["check"], &config, &[]);
    let check_out = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "check passes: {check_out}");
    for (what, text) in [
        ("log", relay.log()),
        ("status", status_body),
        ("metrics", metrics_body),
        ("check", check_out),
    ] {
        assert!(!text.is_empty(), "{what} is empty");
        for secret in ["pg-s3cret-pw", "kafka-s3cret-pw"] {
            assert!(!text.contains(secret), "{what} contains {secret}:\n{text}");
        }
    }
}

#[test]
fn the_least_privilege_role_runs_the_relay() {
    let world = World::new();
    world.psql(include_str!("../sql/roles.sql"));
    world.psql("ALTER ROLE outbox_relay PASSWORD 'relay-pw'");
    // The owner creates what needs ownership; the relay role only streams and reads.
    let port = free_port().unwrap();
    let owner = relay_config(
        &world.pg.url("postgres"),
        &world.kafka.brokers(),
        "outbox_relay",
        "outbox_relay",
        port,
    );
    let init = relay_cli(&["init"], &owner, &[]);
    assert!(
        init.status.success(),
        "init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let url = format!(
        "postgres://outbox_relay:relay-pw@127.0.0.1:{}/postgres",
        world.pg.port()
    );
    let config = relay_config(
        &url,
        &world.kafka.brokers(),
        "outbox_relay",
        "outbox_relay",
        port,
    );
    let relay = Relay::start(&config, &[]);
    world.wait_streaming();
    world.write(500, 50, 10, &["order"]);
    let records = consume_n(&world, &topics(&["order"]), 500, Duration::from_secs(60));
    let ids: HashSet<_> = records.iter().filter_map(|r| r.header("id")).collect();
    assert_eq!(ids.len(), 500, "log:\n{}", relay.log());
    assert!(
        world
            .psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'outbox_relay'")
            .trim()
            == "f"
    );
}

#[test]
fn a_half_open_postgres_connection_is_detected_and_the_relay_resumes() {
    let world = World::new();
    // Every relay connection to Postgres goes through a proxy the test can black-hole.
    let (listener, proxy_port) = Proxy::bind();
    let proxy = Proxy::forward(listener, world.pg.port());
    let http = free_port().unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{proxy_port}/postgres");
    let config = relay_config(
        &url,
        &world.kafka.brokers(),
        "outbox_relay",
        "outbox_relay",
        http,
    );
    let relay = Relay::start(&config, &[]);
    world.wait_streaming();
    world.write(1_000, 100, 10, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 1_000, Duration::from_secs(60));

    proxy.blackhole();
    let cut = Instant::now();
    world.write(1_000, 100, 10, &["order"]);
    let records = consume_n(&world, &topics(&["order"]), 2_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!(
        "half-open connection: resumed after {:?}; {distinct} distinct of 2000, {duplicates} duplicates",
        cut.elapsed()
    );
    assert_eq!(distinct, 2_000, "zero lost; log:\n{}", relay.log());
    assert!(
        cut.elapsed() < Duration::from_secs(60),
        "recovered before wal_sender_timeout (60 s) would have freed the slot"
    );
}

/// Kills the relay, restarts Postgres and cuts Kafka off for 20 s, in an order drawn at
/// random (the seed is printed), while a writer commits 30,000 events: every committed event
/// reaches Kafka, in order per aggregate.
#[test]
fn chaos_loses_nothing() {
    let world = World::behind_proxy();
    let proxy = world.proxy.as_ref().unwrap();
    let mut relay = world.relay();
    let total = 30_000;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mut faults = ["kill the relay", "restart postgres", "cut kafka for 20 s"];
    // A small deterministic shuffle from the seed.
    for i in (1..faults.len()).rev() {
        let j = (seed as usize >> (i * 3)) % (i + 1);
        faults.swap(i, j);
    }
    println!("chaos seed {seed}: {faults:?}");
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| world.write_through_restarts(total, 50, 40, &["order"]));
        for (step, fault) in faults.iter().enumerate() {
            wait_until(Duration::from_secs(180), "the writer progresses", || {
                world
                    .pg
                    .psql("postgres", "SELECT count(*) FROM outbox.events")
                    .ok()
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .is_some_and(|n| n >= (step + 1) * total / 4)
            });
            println!("chaos: {fault}");
            match *fault {
                "kill the relay" => {
                    relay.kill9();
                    relay = Relay::start(&world.config(free_port().unwrap()), &[]);
                }
                "restart postgres" => world.pg.restart().expect("postgres restarts"),
                _ => {
                    proxy.cut();
                    let cut = Instant::now();
                    wait_until(Duration::from_secs(30), "a 20 s outage", || {
                        cut.elapsed() >= Duration::from_secs(20)
                    });
                    proxy.restore();
                }
            }
        }
        writer.join().expect("writer finishes");
    });
    // The truth is what Postgres committed (a batch retried across the restart may be there
    // twice, with other ids).
    let committed: std::collections::HashSet<String> = world
        .psql("SELECT id FROM outbox.events")
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(committed.len() >= total);
    let records = consume_n(
        &world,
        &topics(&["order"]),
        committed.len(),
        Duration::from_secs(240),
    );
    let (distinct, duplicates) = check_records(&records);
    let published: std::collections::HashSet<String> =
        records.iter().filter_map(|r| r.header("id")).collect();
    let missing = committed.difference(&published).count();
    println!("chaos: {} committed, {distinct} distinct published, {missing} missing, {duplicates} duplicates", committed.len());
    assert_eq!(missing, 0, "zero lost; log:\n{}", relay.log());
}

/// Produce requests failing on the broker (an out-of-order sequence for the idempotent
/// producer, then dropped connections), injected with librdkafka's mock cluster: whatever
/// the producer does about them (retry, or a fatal error that rebuilds it), nothing is lost.
#[test]
fn injected_produce_errors_lose_nothing() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let pg = ThrowawayPostgres::start().expect("postgres starts");
    pg.psql("postgres", include_str!("../sql/outbox.sql"))
        .unwrap();
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("outbox.event.order", 3, 1).unwrap();
    mock.create_topic("outbox.dead-letter", 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let http = free_port().unwrap();
    let config = relay_config(
        &pg.url("postgres"),
        &brokers,
        "outbox_relay",
        "outbox_relay",
        http,
    );
    let relay = Relay::start(&config, &[("OUTBOX_RELAY_KAFKA_CREATE_TOPICS", "false")]);
    let publish = |from: u32, to: u32| {
        pg.psql(
            "postgres",
            &format!(
                "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
                 SELECT 'order', 'agg-' || (g % 10), 'E', jsonb_build_object('n', g) \
                 FROM generate_series({from}, {to}) g ORDER BY g"
            ),
        )
        .unwrap();
    };
    wait_until(Duration::from_secs(60), "the relay streams", || {
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_replication_slots WHERE active",
        )
        .unwrap()
            == "1"
    });
    publish(0, 499);
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );
    publish(500, 1_999);
    let mut ids = HashSet::new();
    let mut counted = 0;
    let records = consume(
        &brokers,
        &["outbox.event.order"],
        |r| {
            for rec in &r[counted..] {
                ids.extend(rec.header("id"));
            }
            counted = r.len();
            ids.len() >= 2_000
        },
        Duration::from_secs(120),
    );
    let (distinct, duplicates) = check_records(&records);
    println!(
        "injected produce errors: {distinct} distinct of 2000, {duplicates} duplicates, publish errors: {:?}",
        http_get(http, "/metrics").ok().map(|(_, m)| m
            .lines()
            .filter(|l| l.starts_with("outbox_relay_publish_errors_total{") && !l.ends_with(" 0"))
            .map(str::to_owned)
            .collect::<Vec<_>>())
    );
    assert_eq!(distinct, 2_000, "zero lost; log:\n{}", relay.log());
}
