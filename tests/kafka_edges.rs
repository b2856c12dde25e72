//! Kafka-side edges: batches a topic refuses as too large, a dead-letter topic that refuses
//! records, row headers with the relay's reserved names, and shutdown or lost leadership while
//! the producer queue is full. Real Postgres and the relay binary; librdkafka's mock cluster
//! where produce requests must fail on cue, Apache Kafka behind a cuttable proxy for outages.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use testkit::*;

const EVENTS: &str = "outbox.event.order";
const DEAD_LETTERS: &str = "outbox.dead-letter";

/// A relay on its own Postgres, producing to a librdkafka mock cluster whose produce
/// requests a test can make fail.
/// Fields drop in order: the relay stops first.
struct Mocked {
    relay: Relay,
    mock: MockCluster<'static, DefaultProducerContext>,
    pg: ThrowawayPostgres,
    http: u16,
}

impl Mocked {
    /// Starts everything and waits until the relay streams; `env` adds config overrides.
    fn start(env: &[(&str, &str)]) -> Mocked {
        let pg = ThrowawayPostgres::start().expect("postgres starts");
        pg.psql("postgres", include_str!("../sql/outbox.sql"))
            .expect("schema applies");
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic(EVENTS, 3, 1).unwrap();
        mock.create_topic(DEAD_LETTERS, 1, 1).unwrap();
        let http = free_port().unwrap();
        let config = relay_config(
            &pg.url("postgres"),
            &mock.bootstrap_servers(),
            "outbox_relay",
            "outbox_relay",
            http,
        );
        let mut all_env = vec![("OUTBOX_RELAY_KAFKA_CREATE_TOPICS", "false")];
        all_env.extend_from_slice(env);
        let relay = Relay::start(&config, &all_env);
        let mocked = Mocked {
            pg,
            mock,
            relay,
            http,
        };
        mocked.wait_streaming();
        mocked
    }

    fn wait_streaming(&self) {
        wait_until(Duration::from_secs(60), "the relay streams", || {
            self.psql("SELECT count(*) FROM pg_replication_slots WHERE active") == "1"
        });
    }

    fn psql(&self, sql: &str) -> String {
        self.pg
            .psql("postgres", sql)
            .expect("sql runs")
            .trim()
            .to_owned()
    }

    /// Inserts events `from..=to` of aggregates `agg-0..agg-9` in one transaction.
    fn publish(&self, from: u32, to: u32) {
        self.psql(&format!(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'agg-' || (g % 10), 'E', jsonb_build_object('n', g) \
             FROM generate_series({from}, {to}) g ORDER BY g"
        ));
    }

    /// Makes the next `n` produce requests fail with `error`.
    fn fail_produce(&self, error: RDKafkaRespErr, n: usize) {
        self.mock
            .request_errors(RDKafkaApiKey::Produce, &vec![error; n]);
    }

    /// Reads `topic` until `done` holds or `timeout` passes.
    fn read(
        &self,
        topic: &str,
        done: impl FnMut(&[Record]) -> bool,
        timeout: Duration,
    ) -> Vec<Record> {
        consume(&self.mock.bootstrap_servers(), &[topic], done, timeout)
    }

    fn metric(&self, line_prefix: &str) -> Option<f64> {
        metric(self.http, line_prefix)
    }

    /// The server's WAL position now: whatever commits next ends past it.
    fn wal_position(&self) -> String {
        self.psql("SELECT pg_current_wal_lsn()")
    }

    /// Waits until the slot is confirmed past `lsn`, so a restart resends nothing before.
    fn wait_confirmed_past(&self, lsn: &str) {
        wait_until(Duration::from_secs(30), "the slot confirmed", || {
            self.psql(&format!(
                "SELECT confirmed_flush_lsn > '{lsn}'::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = 'outbox_relay'"
            )) == "t"
        });
    }
}

fn distinct_ids(records: &[Record]) -> HashSet<String> {
    records.iter().filter_map(|r| r.header("id")).collect()
}

/// A broker refusing a whole batch as too large (the topic's `max.message.bytes` below the
/// batch) dead-letters only a record that is too large alone; the others are resent in
/// smaller batches and arrive with their values, in order.
#[test]
fn a_refused_batch_is_resent_and_only_a_record_too_large_alone_is_dead_lettered() {
    let world = Mocked::start(&[("OUTBOX_RELAY_KAFKA_PROPERTIES_BATCH_SIZE", "20000")]);

    // Alone in its batch (bigger than batch.size) and refused: too large by itself.
    world.fail_produce(RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, 1);
    let before = world.wal_position();
    world.psql(
        "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('order', 'big', 'E', jsonb_build_object('n', 0, 'pad', repeat('x', 50000)))",
    );
    let dead = world.read(DEAD_LETTERS, |r| !r.is_empty(), Duration::from_secs(60));
    assert_eq!(dead.len(), 1, "log:\n{}", world.relay.log());
    assert_eq!(dead[0].key_str().as_deref(), Some("big"));
    assert_eq!(
        dead[0].header("dlq_reason").as_deref(),
        Some("message_too_large")
    );
    assert_eq!(dead[0].header("dlq_topic").as_deref(), Some(EVENTS));
    assert_eq!(dead[0].value, None, "value omitted");
    world.wait_confirmed_past(&before);

    // A batch of small records refused as a whole: every one arrives, with its value.
    world.fail_produce(RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, 1);
    world.publish(1, 300);
    let records = world.read(
        EVENTS,
        |r| distinct_ids(r).len() >= 300,
        Duration::from_secs(120),
    );
    let (distinct, duplicates) = check_records(&records);
    println!("refused batch: {distinct} distinct of 300, {duplicates} duplicates");
    assert_eq!(distinct, 300, "log:\n{}", world.relay.log());
    assert!(records.iter().all(|r| r.value.is_some()));
    let dead = world.read(DEAD_LETTERS, |r| r.len() > 1, Duration::from_secs(3));
    assert_eq!(
        distinct_ids(&dead).len(),
        1,
        "no small record was dead-lettered"
    );
    assert!(
        world
            .metric("outbox_relay_publish_errors_total{kind=\"message_too_large\"}")
            .is_some_and(|n| n >= 2.0),
        "both refusals happened"
    );
    assert!(
        world.relay.log().contains("batch.size is capped"),
        "log says why it resends:\n{}",
        world.relay.log()
    );
}

/// A dead-letter record the broker refuses is sent again without its value, and the stream
/// goes on.
#[test]
fn a_refused_dead_letter_is_sent_again_without_its_value() {
    let world = Mocked::start(&[]);
    world.fail_produce(RDKafkaRespErr::RD_KAFKA_RESP_ERR_POLICY_VIOLATION, 1);
    // An illegal topic name: this goes straight to the dead-letter topic, value kept.
    world.psql("SELECT outbox.publish('bad type!', 'd-1', 'E', '{\"n\": 1}')");
    let dead = world.read(DEAD_LETTERS, |r| !r.is_empty(), Duration::from_secs(60));
    assert_eq!(dead.len(), 1, "log:\n{}", world.relay.log());
    let record = &dead[0];
    assert_eq!(record.key_str().as_deref(), Some("d-1"));
    assert_eq!(record.value, None, "sent again without the value");
    assert_eq!(
        record.header("dlq_reason").as_deref(),
        Some("invalid_topic")
    );
    let names: Vec<&str> = record.headers.iter().map(|(k, _)| k.as_str()).collect();
    for name in ["id", "dlq_reason", "dlq_error", "dlq_topic"] {
        assert_eq!(
            names.iter().filter(|n| **n == name).count(),
            1,
            "one {name}: {names:?}"
        );
    }
    world.publish(1, 1);
    let good = world.read(EVENTS, |r| !r.is_empty(), Duration::from_secs(60));
    assert_eq!(
        good.len(),
        1,
        "the stream goes on; log:\n{}",
        world.relay.log()
    );
    wait_until(Duration::from_secs(20), "ready", || ready(world.http));
    wait_until(Duration::from_secs(10), "counted as dead-lettered", || {
        world.metric("outbox_relay_events_dead_lettered_total{reason=\"invalid_topic\"}")
            == Some(1.0)
    });
}

/// A dead-letter topic that refuses a record even without its value halts the relay with a
/// definite error (instead of restarting forever), and nothing past the record is confirmed:
/// a relay started once the topic takes it again dead-letters it.
#[test]
fn a_dead_letter_refused_twice_halts_the_relay() {
    let mut world = Mocked::start(&[]);
    let before = world.wal_position();
    world.publish(1, 1);
    let _ = world.read(EVENTS, |r| !r.is_empty(), Duration::from_secs(60));
    // Only the dead letter below meets the injected errors.
    world.wait_confirmed_past(&before);
    world.fail_produce(RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, 20);
    world.psql("SELECT outbox.publish('bad type!', 'd-1', 'E', '{\"n\": 1}')");
    wait_until(
        Duration::from_secs(60),
        "the relay halts, saying why",
        || {
            !ready(world.http)
                && status(world.http)["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("dead-letter topic"))
        },
    );
    let error = status(world.http)["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains(DEAD_LETTERS), "names the topic: {error}");
    assert!(error.contains("to fix"), "says how to fix it: {error}");
    assert_eq!(world.metric("outbox_relay_halted"), Some(1.0));

    // The dead-letter topic takes records again: a new relay resends the refused one.
    world.relay.kill9();
    world.mock.clear_request_errors(RDKafkaApiKey::Produce);
    let config = relay_config(
        &world.pg.url("postgres"),
        &world.mock.bootstrap_servers(),
        "outbox_relay",
        "outbox_relay",
        world.http,
    );
    world.relay = Relay::start(&config, &[("OUTBOX_RELAY_KAFKA_CREATE_TOPICS", "false")]);
    let dead = world.read(DEAD_LETTERS, |r| !r.is_empty(), Duration::from_secs(60));
    assert_eq!(
        dead.iter().filter_map(Record::key_str).collect::<Vec<_>>(),
        ["d-1"],
        "not confirmed past the refused record; log:\n{}",
        world.relay.log()
    );
}

/// Row headers named like the relay's own never shadow them: the record carries exactly one
/// `id` (the row id), one `pg_lsn`, no `dlq_*`, and the row's other headers.
#[test]
fn reserved_row_headers_are_dropped_and_counted() {
    let world = Mocked::start(&[]);
    let id = world.psql(
        "SELECT outbox.publish('order', 'h-1', 'E', '{\"n\": 1}', \
         '{\"id\": \"x\", \"pg_lsn\": \"y\", \"dlq_reason\": \"z\", \"trace\": \"t\"}')",
    );
    let records = world.read(EVENTS, |r| !r.is_empty(), Duration::from_secs(60));
    assert_eq!(records.len(), 1, "log:\n{}", world.relay.log());
    let record = &records[0];
    let values = |name: &str| -> Vec<String> {
        record
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .filter_map(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    };
    assert_eq!(values("id"), [id]);
    let lsn = values("pg_lsn");
    assert_eq!(lsn.len(), 1);
    assert_ne!(lsn[0], "y");
    assert!(values("dlq_reason").is_empty());
    assert_eq!(values("trace"), ["t"]);
    wait_until(Duration::from_secs(10), "three headers counted", || {
        world.metric("outbox_relay_reserved_headers_dropped_total") == Some(3.0)
    });
}

/// A produce request refused with "not leader for partition" while a later request of the
/// same partition is already in flight and then succeeds: librdkafka reports the refused
/// records delivered ("implicitly acked"), though the broker never wrote them. This is what a
/// partition whose leadership is just arriving at a broker does (a topic created a moment
/// ago, a broker started again). The relay must not count such a report as an ack: every
/// event still arrives, the refused ones resent.
#[test]
fn records_refused_before_a_later_success_are_resent_not_counted_delivered() {
    let world = Mocked::start(&[]);
    let publish = |n: u32| {
        world.psql(&format!(
            "SELECT outbox.publish('order', 'agg-1', 'E', '{{\"n\": {n}}}')"
        ))
    };
    // The producer is connected and has its producer id before the broker turns slow.
    let first = publish(0);
    let warm = world.read(EVENTS, |r| !r.is_empty(), Duration::from_secs(60));
    assert_eq!(distinct_ids(&warm), HashSet::from([first.clone()]));

    // Every answer takes 300 ms, and the next produce request is refused: the request after it
    // (sent 100 ms later, one partition, pipelined) succeeds while the refused one waits to be
    // retried.
    world
        .mock
        .broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();
    world.fail_produce(
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        1,
    );
    let mut ids = vec![first];
    for n in 1..=4 {
        ids.push(publish(n));
        // Pacing, not waiting: each event in its own produce request.
        std::thread::sleep(Duration::from_millis(100));
    }
    world
        .mock
        .broker_round_trip_time(1, Duration::from_millis(0))
        .unwrap();
    let expected: HashSet<String> = ids.into_iter().collect();
    let records = world.read(
        EVENTS,
        |r| distinct_ids(r).is_superset(&expected),
        Duration::from_secs(60),
    );
    let arrived = distinct_ids(&records);
    let missing: Vec<&String> = expected.difference(&arrived).collect();
    assert!(
        missing.is_empty(),
        "events reported delivered but never written: {missing:?}\nlog:\n{}",
        world.relay.log()
    );
}

/// SIGTERM while Kafka is unreachable and the producer queue is full ends the relay within
/// the drain deadline, without confirming what Kafka never acknowledged: a relay started
/// once Kafka is back publishes every event.
#[test]
fn sigterm_with_a_full_queue_during_an_outage_exits_and_loses_nothing() {
    let world = World::behind_proxy();
    let proxy = world.proxy.as_ref().unwrap();
    let (mut relay, _) = world.relay_with(&[(
        "OUTBOX_RELAY_KAFKA_PROPERTIES_QUEUE_BUFFERING_MAX_MESSAGES",
        "50",
    )]);
    world.wait_streaming();
    world.write(100, 50, 10, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 100, Duration::from_secs(60));

    proxy.cut();
    world.write(1_000, 100, 10, &["order"]);
    wait_until(
        Duration::from_secs(60),
        "the relay waits for room in a full queue",
        || relay.log().contains("the producer queue is full"),
    );
    relay.sigterm();
    let asked = Instant::now();
    let exited = relay.wait_exit(Duration::from_secs(30));
    println!(
        "SIGTERM during an outage: exited after {:?}",
        asked.elapsed()
    );
    assert!(
        exited.is_some(),
        "the relay exits; log:\n{}",
        relay.log_tail()
    );

    proxy.restore();
    let (relay, _) = world.relay_with(&[]);
    let records = consume_n(&world, &topics(&["order"]), 1_100, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!("after the restart: {distinct} distinct of 1100, {duplicates} duplicates");
    assert_eq!(distinct, 1_100, "zero lost; log:\n{}", relay.log());
}

/// A polling leader that loses its lock while the producer queue is full (Kafka unreachable)
/// stops sending at once instead of waiting for room forever, then leads again from the
/// persisted cursor: nothing is lost.
#[test]
fn a_polling_leader_losing_its_lock_with_a_full_queue_stops_sending() {
    let world = World::behind_proxy();
    let proxy = world.proxy.as_ref().unwrap();
    let (relay, port) = world.relay_with(&[
        ("OUTBOX_RELAY_SOURCE_MODE", "polling"),
        (
            "OUTBOX_RELAY_KAFKA_PROPERTIES_QUEUE_BUFFERING_MAX_MESSAGES",
            "50",
        ),
    ]);
    wait_until(Duration::from_secs(60), "the relay leads", || {
        metric(port, "outbox_relay_is_leader") == Some(1.0)
    });
    world.write(100, 50, 10, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 100, Duration::from_secs(60));

    proxy.cut();
    world.write(1_000, 100, 10, &["order"]);
    wait_until(
        Duration::from_secs(60),
        "the leader waits for room in a full queue",
        || relay.log().contains("the producer queue is full"),
    );
    let reconnects = metric(port, "outbox_relay_source_reconnects_total").unwrap_or(0.0);
    world.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'outbox-relay-polling'",
    );
    wait_until(
        Duration::from_secs(30),
        "the deposed leader stops sending and starts a new session",
        || {
            relay
                .log()
                .contains("leader lock was lost; stopped producing")
                && metric(port, "outbox_relay_source_reconnects_total")
                    .is_some_and(|n| n > reconnects)
        },
    );

    proxy.restore();
    let records = consume_n(&world, &topics(&["order"]), 1_100, Duration::from_secs(120));
    let (distinct, _) = check_records(&records);
    assert_eq!(distinct, 1_100, "zero lost; log:\n{}", relay.log());
}
