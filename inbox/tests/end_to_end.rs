//! End to end: the relay (`outbox-relay run`, built by cargo for the workspace) publishes
//! outbox events to Apache Kafka; one of them reaches the topic a second time, as an
//! at-least-once redelivery does; a Rust consumer built on the inbox applies every event
//! exactly once, tombstone included, committing its offsets only after its database commits.
//!
//! The relay binary must be built: `cargo nextest run --workspace` and `cargo test --workspace`
//! build it; after `cargo build --bin outbox-relay`, `cargo test -p outbox-inbox --test
//! end_to_end` works too.

use std::collections::HashMap;
use std::time::Duration;

use outbox_inbox::{Event, Inbox, Processed};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use testkit::*;

/// Deposits spread over three accounts, then `acc-0` is closed (a NULL payload: a tombstone).
const DEPOSITS: i64 = 30;
const ACCOUNTS: i64 = 3;
const EVENTS: usize = DEPOSITS as usize + 1;

#[test]
fn a_rust_consumer_applies_each_relayed_event_once_despite_a_redelivery() {
    let world = World::new();
    let _relay = world.relay();
    world.psql(&format!(
        "SELECT outbox.publish('account', 'acc-' || (g % {ACCOUNTS}), 'Deposited', \
                jsonb_build_object('amount', g)) \
         FROM generate_series(1, {DEPOSITS}) AS g ORDER BY g; \
         SELECT outbox.publish('account', 'acc-0', 'AccountClosed', NULL);"
    ));
    let topic = "outbox.event.account";
    let relayed = consume_n(
        &world,
        &[topic.to_owned()],
        EVENTS,
        Duration::from_secs(120),
    );
    assert_eq!(
        relayed.len(),
        EVENTS,
        "the relay published every event once"
    );

    // Redeliver one deposit of acc-1: the same record again, in its partition, after the rest.
    let again = relayed
        .iter()
        .find(|r| r.key_str().as_deref() == Some("acc-1"))
        .expect("a deposit of acc-1");
    let duplicate_id = again.header("id").expect("an id");
    produce_again(&world.kafka.brokers(), again);

    world
        .pg
        .create_database("billing")
        .expect("consumer database");
    let (applied, duplicates) = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(consume_into_billing(&world, topic, &duplicate_id));
    assert_eq!(applied, EVENTS, "every event applied once");
    assert_eq!(duplicates, 1, "the redelivered record was skipped");

    let balances: HashMap<String, i64> = world
        .pg
        .psql(
            "billing",
            "SELECT account || '=' || balance FROM balances ORDER BY account",
        )
        .expect("balances")
        .lines()
        .map(|line| {
            let (account, balance) = line.split_once('=').expect("account=balance");
            (account.to_owned(), balance.parse().expect("a number"))
        })
        .collect();
    let expected: HashMap<String, i64> = (1..ACCOUNTS)
        .map(|a| {
            let sum = (1..=DEPOSITS).filter(|g| g % ACCOUNTS == a).sum();
            (format!("acc-{a}"), sum)
        })
        .collect();
    assert_eq!(balances, expected, "acc-0 closed, the others summed once");
    let recorded = world
        .pg
        .psql(
            "billing",
            "SELECT count(*) FROM inbox.received WHERE consumer = 'billing'",
        )
        .expect("inbox rows");
    assert_eq!(recorded.trim(), EVENTS.to_string());
}

/// Produces `record` once more, to its own partition, with its key, value and headers.
fn produce_again(brokers: &str, record: &Record) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .create()
        .expect("producer");
    let headers = record
        .headers
        .iter()
        .fold(OwnedHeaders::new(), |hs, (k, v)| {
            hs.insert(Header {
                key: k,
                value: v.as_deref(),
            })
        });
    let mut copy = BaseRecord::<[u8], [u8]>::to(&record.topic)
        .partition(record.partition)
        .headers(headers);
    if let Some(key) = &record.key {
        copy = copy.key(key);
    }
    if let Some(value) = &record.value {
        copy = copy.payload(value);
    }
    producer.send(copy).map_err(|(e, _)| e).expect("send");
    producer.flush(Duration::from_secs(30)).expect("delivered");
}

/// The consumer under test: reads `topic` from the start and applies each event to the
/// `billing` database through the inbox, until it has seen every record (the duplicate too).
/// Returns (applied, duplicates).
async fn consume_into_billing(world: &World, topic: &str, duplicate_id: &str) -> (usize, usize) {
    let url = world.pg.url("billing");
    let (mut db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    Inbox::install(&db).await.expect("install the inbox");
    db.batch_execute("CREATE TABLE balances (account text PRIMARY KEY, balance bigint NOT NULL)")
        .await
        .expect("balances");

    let inbox = Inbox::new("billing");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", world.kafka.brokers())
        .set("broker.address.family", "v4")
        .set("group.id", unique_name("billing"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");

    let (mut applied, mut duplicates, mut seen_duplicate_id) = (0, 0, 0);
    let read_all = async {
        while applied + duplicates < EVENTS + 1 {
            let message = consumer.recv().await.expect("a record");
            let event = Event::try_from(&message).expect("an outbox event");
            if event.id().to_string() == duplicate_id {
                seen_duplicate_id += 1;
            }
            let account = event.aggregate_id().expect("a key").to_owned();
            let payload = event
                .payload()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            let outcome = inbox
                .process(&mut db, &event, async |tx| match &payload {
                    None => {
                        tx.execute("DELETE FROM balances WHERE account = $1", &[&account])
                            .await
                    }
                    Some(json) => {
                        tx.execute(
                            "INSERT INTO balances VALUES ($1, ($2::text::jsonb->>'amount')::bigint) \
                             ON CONFLICT (account) DO UPDATE \
                             SET balance = balances.balance + EXCLUDED.balance",
                            &[&account, json],
                        )
                        .await
                    }
                })
                .await
                .expect("processed");
            match outcome {
                Processed::Applied(_) => applied += 1,
                Processed::Duplicate => duplicates += 1,
            }
            consumer
                .commit_message(&message, CommitMode::Sync)
                .expect("offset committed");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .unwrap_or_else(|_| {
            panic!("consumer saw {applied} applied and {duplicates} duplicates in 120 s")
        });
    assert_eq!(seen_duplicate_id, 2, "the redelivered id arrived twice");
    (applied, duplicates)
}
