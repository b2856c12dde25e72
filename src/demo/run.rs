//! `outbox-relay demo`: the whole path on one machine with nothing to set up.
//!
//! Starts a throwaway Postgres from the local PostgreSQL binaries and an in-process Kafka
//! endpoint (librdkafka's mock cluster, whose bootstrap address is printed so any Kafka client
//! can read along), applies the schema, runs a writer of order events and the relay, and shows
//! live counts. With `--events N` it stops once N events are acknowledged, reads them back
//! from Kafka, prints a summary and exits 0.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::postgres::ThrowawayPostgres;
use crate::config::Config;
use crate::metrics::Metrics;

/// Aggregates the sample writer spreads its orders over.
const ORDERS: u64 = 20;
const EVENT_TYPES: [&str; 3] = ["OrderPlaced", "OrderPaid", "OrderShipped"];
/// Where the order events go.
const DEMO_TOPIC: &str = "outbox.event.order";

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Stop after this many events are acknowledged by Kafka, print a summary and exit.
    #[arg(long)]
    pub events: Option<u64>,
    /// Events the sample writer commits per second.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the throwaway Postgres: {0}")]
    Postgres(#[source] std::io::Error),
    #[error("cannot start the embedded Kafka endpoint: {0}")]
    Kafka(#[source] rdkafka::error::KafkaError),
    #[error("demo configuration is invalid: {0}")]
    Config(#[source] crate::config::ConfigError),
    #[error("the sample writer failed: {0}")]
    Writer(String),
    #[error(transparent)]
    Relay(#[from] crate::relay::RunError),
    #[error("{0}")]
    Incomplete(String),
}

pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    println!("starting a throwaway Postgres (wal_level=logical) ...");
    let postgres = tokio::task::spawn_blocking(ThrowawayPostgres::start)
        .await
        .map_err(|e| DemoError::Writer(e.to_string()))?
        .map_err(DemoError::Postgres)?;
    let mock = MockCluster::new(1).map_err(DemoError::Kafka)?;
    // The mock cluster has no admin API for topics: create them here.
    for (topic, partitions) in [(DEMO_TOPIC, 3), ("outbox.dead-letter", 1)] {
        mock.create_topic(topic, partitions, 1)
            .map_err(DemoError::Kafka)?;
    }
    let brokers = mock.bootstrap_servers();
    let url = postgres.url("postgres");
    println!("postgres:  {url}");
    println!("kafka:     {brokers}  (librdkafka mock cluster; read with any Kafka client)");

    let config = Config::from_parts(
        Some(&format!(
            "[postgres]\nurl = \"{url}\"\n\
             [source]\nslot = \"outbox_relay_demo\"\npublication = \"outbox_relay_demo\"\n\
             [kafka]\nbrokers = \"{brokers}\"\ncreate_topics = false\n\
             [http]\nlisten = \"127.0.0.1:0\"\n"
        )),
        std::iter::empty(),
    )
    .map_err(DemoError::Config)?;
    crate::commands::init(&config).await?;
    println!("topic:     {DEMO_TOPIC} (3 partitions), key = order id, header id = event id");

    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(crate::relay::run_with(
        config.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(write_orders(
        config.clone(),
        args.rate.max(1),
        args.events,
        writer_stop.clone(),
    ));

    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let target = args.events;
    let mut shown_how_to_consume = false;
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = ticker.tick() => {}
        }
        let published = published(&metrics);
        let p99 = latency_quantile(&metrics, 0.99);
        println!(
            "{:>5.0}s  published {:>8}  in flight {:>6}  p99 commit-to-ack {}",
            started.elapsed().as_secs_f64(),
            published,
            metrics.inflight_events.get(),
            p99.map_or("-".to_owned(), |s| format!("<= {:.0} ms", s * 1000.0)),
        );
        if published > 0 && !shown_how_to_consume {
            print_how_to_consume(&brokers);
            shown_how_to_consume = true;
        }
        if target.is_some_and(|n| published >= n) {
            break;
        }
        if relay.is_finished() {
            break;
        }
    }
    writer_stop.cancel();
    let written = writer
        .await
        .map_err(|e| DemoError::Writer(e.to_string()))?
        .map_err(DemoError::Writer)?;
    shutdown.cancel();
    relay
        .await
        .map_err(|e| DemoError::Writer(e.to_string()))??;

    let published = published(&metrics);
    println!("\nsummary: {written} events written, {published} acknowledged by Kafka");
    if let Some(n) = target {
        let read = tokio::task::spawn_blocking(move || read_back(&brokers, published))
            .await
            .map_err(|e| DemoError::Writer(e.to_string()))?;
        let (records, distinct, in_order) = read;
        println!(
            "read back: {records} records, {distinct} distinct ids, per-order sequence {}",
            if in_order {
                "in commit order"
            } else {
                "OUT OF ORDER"
            }
        );
        drop(mock);
        if published < n || distinct < n || !in_order {
            return Err(DemoError::Incomplete(format!(
                "expected at least {n} distinct events in order, got {distinct}"
            )));
        }
    }
    drop(postgres);
    Ok(())
}

/// Once events flow: where to read them while the demo runs, and where the consumer's side of
/// the contract is written down.
fn print_how_to_consume(brokers: &str) {
    println!(
        "\nconsume them while the demo runs (topic {DEMO_TOPIC}, broker {brokers}):\n  \
         kcat -b {brokers} -C -t {DEMO_TOPIC} -f 'key=%k headers=%h value=%s\\n'\n  \
         or any Kafka client; dedup on header id with an inbox: see docs/CONSUMING.md"
    );
}

fn published(metrics: &Metrics) -> u64 {
    metrics
        .events_published
        .with_label_values(&[DEMO_TOPIC])
        .get()
}

/// The upper bound of the histogram bucket holding quantile `q`.
fn latency_quantile(metrics: &Metrics, q: f64) -> Option<f64> {
    use prometheus::core::Collector;
    let families = metrics.end_to_end_latency.collect();
    let histogram = families
        .first()?
        .get_metric()
        .first()?
        .get_histogram()
        .clone();
    let total = histogram.get_sample_count();
    if total == 0 {
        return None;
    }
    let wanted = (total as f64 * q).ceil() as u64;
    histogram
        .get_bucket()
        .iter()
        .find(|b| b.cumulative_count() >= wanted)
        .map(|b| b.upper_bound())
}

/// Commits order events through `outbox.publish`, a few per transaction, at `rate` per
/// second; each event's payload carries its order's sequence number so the read-back can
/// check the order. Returns how many it wrote.
async fn write_orders(
    config: Config,
    rate: u64,
    limit: Option<u64>,
    stop: CancellationToken,
) -> Result<u64, String> {
    let pool = crate::postgres::pool(&config).map_err(|e| e.to_string())?;
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let mut written = 0u64;
    let mut sequence: HashMap<u64, u64> = HashMap::new();
    let batch = 5u64;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 * batch / rate));
    while !stop.is_cancelled() && limit.is_none_or(|n| written < n) {
        ticker.tick().await;
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        for _ in 0..batch {
            if limit.is_some_and(|n| written >= n) {
                break;
            }
            let order = written % ORDERS + 1;
            let seq = sequence.entry(order).or_insert(0);
            *seq += 1;
            let event_type = EVENT_TYPES[(*seq as usize - 1) % EVENT_TYPES.len()];
            let payload = serde_json::json!({ "order": order, "seq": *seq, "amount": order * 10 });
            tx.execute(
                "SELECT outbox.publish('order', $1, $2, $3::text::jsonb)",
                &[&format!("order-{order}"), &event_type, &payload.to_string()],
            )
            .await
            .map_err(|e| e.to_string())?;
            written += 1;
        }
        tx.commit().await.map_err(|e| e.to_string())?;
    }
    Ok(written)
}

/// Reads the order topic back: (records, distinct ids, per-order sequence in order).
fn read_back(brokers: &str, expected: u64) -> (u64, u64, bool) {
    let consumer: BaseConsumer = match rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-demo")
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(c) => c,
        Err(_) => return (0, 0, false),
    };
    let topic = DEMO_TOPIC;
    let partitions = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()
        .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
        .unwrap_or(0);
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let _ = assignment.add_partition_offset(topic, p, Offset::Beginning);
    }
    if consumer.assign(&assignment).is_err() {
        return (0, 0, false);
    }
    let mut ids = std::collections::HashSet::new();
    let mut last_seq: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut records = 0u64;
    let mut in_order = true;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (ids.len() as u64) < expected && Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        records += 1;
        if let Some(id) = rdkafka::message::Headers::iter(&match message.headers() {
            Some(h) => h.detach(),
            None => continue,
        })
        .find(|h| h.key == "id")
        .and_then(|h| h.value.map(<[u8]>::to_vec))
        {
            ids.insert(id);
        }
        let seq = message
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64));
        if let (Some(key), Some(seq)) = (message.key(), seq) {
            let last = last_seq.entry(key.to_vec()).or_insert(0);
            // Redeliveries repeat earlier sequence numbers; anything else must be next.
            if seq > *last + 1 {
                in_order = false;
            }
            *last = (*last).max(seq);
        }
    }
    (records, ids.len() as u64, in_order)
}
