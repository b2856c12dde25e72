//! Smoke tests of the integration-test harness itself (`testkit/`) and of the SQL files:
//! if these fail, every other integration test would fail for reasons unrelated to the relay.

use std::path::Path;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use testkit::*;

const SQL_FILES: [&str; 3] = ["sql/outbox.sql", "sql/inbox.sql", "sql/roles.sql"];

fn apply_sql(pg: &ThrowawayPostgres, db: &str) {
    for file in SQL_FILES {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        pg.psql_file(db, &path)
            .unwrap_or_else(|e| panic!("applying {file}: {e}"));
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[test]
fn sql_files_apply_twice_and_work() {
    let pg = ThrowawayPostgres::start().expect("start postgres");
    pg.create_database("app").unwrap();
    apply_sql(&pg, "app");
    apply_sql(&pg, "app"); // idempotent

    assert_eq!(pg.psql("app", "SHOW wal_level").unwrap(), "logical");

    // publish: one row, its id returned.
    let id = pg
        .psql(
            "app",
            "SELECT outbox.publish('order', '42', 'OrderPlaced', '{\"total\": 10}', \
             '{\"traceparent\": \"00-abc-01\"}')",
        )
        .unwrap();
    assert!(is_uuid(&id), "publish returned {id:?}");
    let row = pg
        .psql(
            "app",
            &format!(
                "SELECT aggregate_type, aggregate_id, event_type, payload::text, headers::text \
                 FROM outbox.events WHERE id = '{id}'"
            ),
        )
        .unwrap();
    assert_eq!(
        row,
        "order|42|OrderPlaced|{\"total\": 10}|{\"traceparent\": \"00-abc-01\"}"
    );
    // headers default to {}, payload may be NULL (a tombstone).
    pg.psql(
        "app",
        "SELECT outbox.publish('order', '43', 'Deleted', NULL)",
    )
    .unwrap();
    assert_eq!(
        pg.psql(
            "app",
            "SELECT payload IS NULL, headers::text FROM outbox.events WHERE aggregate_id = '43'"
        )
        .unwrap(),
        "t|{}"
    );

    // emit: an id, but no row.
    let emitted = pg
        .psql("app", "SELECT outbox.emit('order', '44', 'Shipped', '{}')")
        .unwrap();
    assert!(is_uuid(&emitted), "emit returned {emitted:?}");
    assert_eq!(
        pg.psql("app", "SELECT count(*) FROM outbox.events")
            .unwrap(),
        "2"
    );

    // relay_state exists with the documented columns.
    pg.psql(
        "app",
        "INSERT INTO outbox.relay_state (name, kind, position, system_identifier) \
         VALUES ('s', 'logical', '0/0', '1')",
    )
    .unwrap();

    // inbox: true once, then false.
    let accept = "SELECT inbox.accept('billing', '00000000-0000-0000-0000-000000000001')";
    assert_eq!(pg.psql("app", accept).unwrap(), "t");
    assert_eq!(pg.psql("app", accept).unwrap(), "f");
    assert_eq!(
        pg.psql(
            "app",
            "SELECT inbox.accept('shipping', '00000000-0000-0000-0000-000000000001')"
        )
        .unwrap(),
        "t",
        "another consumer is independent"
    );

    // The relay role can read the outbox and keep its state, but not write events.
    let as_relay = |sql: &str| pg.psql("app", &format!("SET ROLE outbox_relay; {sql}"));
    assert_eq!(as_relay("SELECT count(*) FROM outbox.events").unwrap(), "2");
    as_relay("UPDATE outbox.relay_state SET position = '0/1' WHERE name = 's'").unwrap();
    let denied = as_relay("SELECT outbox.publish('x', '1', 'y', NULL)").unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    assert_eq!(
        pg.psql(
            "app",
            "SELECT rolreplication AND rolcanlogin FROM pg_roles WHERE rolname = 'outbox_relay'"
        )
        .unwrap(),
        "t"
    );
}

#[test]
fn emit_writes_a_logical_message_with_the_envelope() {
    let pg = ThrowawayPostgres::start().expect("start postgres");
    apply_sql(&pg, "postgres");
    pg.psql(
        "postgres",
        "SELECT pg_create_logical_replication_slot('probe', 'test_decoding')",
    )
    .unwrap();
    let id = pg
        .psql(
            "postgres",
            "SELECT outbox.emit('order', '7', 'Paid', '{\"n\": 1}', '{\"h\": \"v\"}')",
        )
        .unwrap();
    let changes = pg
        .psql(
            "postgres",
            "SELECT data FROM pg_logical_slot_get_changes('probe', NULL, NULL) \
             WHERE data LIKE 'message:%'",
        )
        .unwrap();
    assert!(
        changes.contains("transactional: 1 prefix: outbox"),
        "{changes}"
    );
    for field in [
        format!("\"id\": \"{id}\""),
        "\"aggregate_type\": \"order\"".into(),
        "\"aggregate_id\": \"7\"".into(),
        "\"event_type\": \"Paid\"".into(),
        "\"payload\": {\"n\": 1}".into(),
        "\"headers\": {\"h\": \"v\"}".into(),
        "\"created_at\": ".into(),
    ] {
        assert!(changes.contains(&field), "{field} missing in {changes}");
    }
}

#[test]
fn postgres_restarts_on_the_same_port() {
    let pg =
        ThrowawayPostgres::start_with(&PostgresOptions::default().setting("wal_level", "replica"))
            .expect("start postgres");
    let port = pg.port();
    assert_eq!(pg.psql("postgres", "SHOW wal_level").unwrap(), "replica");
    pg.restart().unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("postgres", "SELECT 1").unwrap(), "1");
    pg.stop().unwrap();
    assert!(pg.psql("postgres", "SELECT 1").is_err());
    pg.start_again().unwrap();
    assert_eq!(pg.psql("postgres", "SELECT 2").unwrap(), "2");

    let data_dir = pg.data_dir().to_path_buf();
    assert!(data_dir.join("PG_VERSION").exists());
    drop(pg);
    assert!(!data_dir.exists(), "drop removes the cluster");
}

#[test]
fn java_partitioner_matches_kafka_vectors() {
    // Kafka's own UtilsTest.testMurmur2.
    let cases: [(&str, i32); 6] = [
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
        ),
        ("abc", 479470107),
    ];
    for (key, expected) in cases {
        assert_eq!(murmur2(key.as_bytes()), expected, "murmur2({key:?})");
    }
    assert_eq!(java_partition(b"21", 3), (-973932308i32 & 0x7fffffff) % 3);
}

#[test]
fn wait_until_polls_until_true() {
    let mut calls = 0;
    wait_until(Duration::from_secs(5), "three calls", || {
        calls += 1;
        calls == 3
    });
    assert_eq!(calls, 3);
    let timed_out = std::panic::catch_unwind(|| {
        wait_until(Duration::from_millis(120), "never", || false);
    });
    assert!(timed_out.is_err());
}

#[test]
fn http_get_reads_plain_and_chunked_bodies() {
    use std::io::{Read, Write};
    for (response, body) in [
        ("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", "ok"),
        (
            "HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
             4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n",
            "not ready",
        ),
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // Read the whole request head before answering.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            conn.write_all(response.as_bytes()).unwrap();
            String::from_utf8_lossy(&request).into_owned()
        });
        let (status, got) = http_get(port, "/readyz").unwrap();
        let request = server.join().unwrap();
        assert!(request.starts_with("GET /readyz HTTP/1.1\r\n"), "{request}");
        assert_eq!(got, body);
        assert_eq!(status, if body == "ok" { 200 } else { 503 });
    }
}

#[test]
fn apache_kafka_round_trips_a_keyed_record_with_headers_to_the_java_partition() {
    let kafka = Kafka::start();
    let topic = unique_name("harness");
    kafka.create_topic(&topic, 3);

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let key = "order-42";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let delivery = rt.block_on(
        producer.send(
            FutureRecord::to(&topic)
                .key(key)
                .payload("{\"total\": 10}")
                .timestamp(1_700_000_000_000)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "id",
                    value: Some("0195a3c4-0000-7000-8000-000000000001"),
                })),
            Duration::from_secs(30),
        ),
    );
    let delivered = delivery.unwrap_or_else(|(e, _)| panic!("delivery: {e}\n{}", kafka.log()));
    assert_eq!(delivered.partition, java_partition(key.as_bytes(), 3));

    let records = consume(
        &kafka.brokers(),
        &[&topic],
        |r| !r.is_empty(),
        Duration::from_secs(30),
    );
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record.partition, java_partition(key.as_bytes(), 3));
    assert_eq!(record.key.as_deref(), Some(key.as_bytes()));
    assert_eq!(record.value_str().as_deref(), Some("{\"total\": 10}"));
    assert_eq!(record.timestamp_ms, Some(1_700_000_000_000));
    assert_eq!(
        record.header("id").as_deref(),
        Some("0195a3c4-0000-7000-8000-000000000001")
    );

    // A regex subscription sees the same record.
    let pattern = format!("^{topic}.*");
    let by_pattern = consume(
        &kafka.brokers(),
        &[&pattern],
        |r| !r.is_empty(),
        Duration::from_secs(30),
    );
    assert_eq!(by_pattern.len(), 1, "{by_pattern:?}\n{}", kafka.log());
    assert_eq!(by_pattern[0].offset, record.offset);
}

#[test]
fn apache_kafka_can_be_paused_killed_and_started_again() {
    let mut kafka = Kafka::start();
    let topic = unique_name("paused");
    kafka.create_topic(&topic, 1);
    let port = kafka.port();
    let client: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .unwrap();
    let metadata_ok = |timeout_ms: u64| {
        use rdkafka::consumer::Consumer;
        client
            .fetch_metadata(None, Duration::from_millis(timeout_ms))
            .is_ok()
    };

    kafka.pause();
    assert!(!metadata_ok(1_000), "a paused broker answers nothing");
    kafka.resume();
    wait_until(Duration::from_secs(30), "broker answers again", || {
        metadata_ok(1_000)
    });

    kafka.kill();
    kafka.start_again();
    assert_eq!(kafka.port(), port, "a restart keeps the port");
    assert_eq!(
        kafka.partitions(&topic),
        Some(1),
        "the topic survives a crash"
    );
}

#[test]
fn apache_kafka_takes_a_second_broker_for_replicated_topics() {
    let kafka = Kafka::start();
    let second = kafka.add_broker(2);
    let topic = unique_name("replicated");
    kafka.create_replicated_topic(&topic, 2, 2, &[("min.insync.replicas", "2")]);
    assert_eq!(second.partitions(&topic), Some(2), "both brokers know it");
}

#[test]
fn apache_kafka_round_trips_a_keyed_record_to_the_java_partition_and_keeps_it_across_a_restart() {
    let mut kafka = Kafka::start();
    let topic = unique_name("harness");
    kafka.create_topic(&topic, 3);

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let key = "order-42";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let delivery = rt.block_on(producer.send(
        FutureRecord::to(&topic).key(key).payload("{\"total\": 10}"),
        Duration::from_secs(30),
    ));
    let delivered = delivery.unwrap_or_else(|(e, _)| panic!("delivery: {e}\n{}", kafka.log()));
    assert_eq!(delivered.partition, java_partition(key.as_bytes(), 3));
    drop(producer);

    let port = kafka.port();
    kafka.stop();
    kafka.start_again();
    assert_eq!(kafka.port(), port, "a restart keeps the port");
    let records = consume(
        &kafka.brokers(),
        &[&topic],
        |r| !r.is_empty(),
        Duration::from_secs(60),
    );
    assert_eq!(records.len(), 1, "the record survives a restart");
    assert_eq!(records[0].key.as_deref(), Some(key.as_bytes()));
}

#[test]
fn apache_kafka_does_not_create_topics_on_first_use() {
    let kafka = Kafka::start();
    let topic = unique_name("absent");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("message.timeout.ms", "5000")
        .create()
        .expect("producer");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let delivery = rt.block_on(producer.send(
        FutureRecord::<str, str>::to(&topic).payload("x"),
        Duration::from_secs(30),
    ));
    assert!(delivery.is_err(), "a record for a missing topic is refused");
    let client: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("allow.auto.create.topics", "true")
        .create()
        .unwrap();
    let md = {
        use rdkafka::consumer::Consumer;
        client
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata")
    };
    assert!(
        md.topics()
            .iter()
            .all(|t| t.name() != topic || t.error().is_some()),
        "the topic was not created"
    );
}
