//! The broker ceiling (measurement 2): a plain rdkafka producer with the relay's producer
//! settings (`sink::kafka::client_config`) sending records of the relay's shape, until every
//! delivery report is in; and the fresh broker every Kafka measurement gets: Apache Kafka
//! (the broker of record), or tansu for its ceiling beside Kafka's.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use outbox_relay::config::KafkaConfig;
use outbox_relay::sink::kafka::client_config;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use testkit::{Kafka, KafkaOptions, Tansu};

use crate::procfs::{own_cpu_secs, unix_ms};
use crate::report::{Floor, Rate};
use crate::{event_fields, PARTITIONS, TOPIC};

/// A broker the bench measures against: where clients connect, and its process (whose CPU
/// counts as the bench's own).
pub trait Broker {
    fn brokers(&self) -> String;
    fn pid(&self) -> u32;
}

impl Broker for Kafka {
    fn brokers(&self) -> String {
        Kafka::brokers(self)
    }
    fn pid(&self) -> u32 {
        Kafka::pid(self)
    }
}

impl Broker for Tansu {
    fn brokers(&self) -> String {
        Tansu::brokers(self)
    }
    fn pid(&self) -> u32 {
        Tansu::pid(self)
    }
}

/// A fresh Apache Kafka broker (KRaft, one node, G1 and a 1 GiB heap, the test kit's
/// throughput options) with the bench topic; killed on drop, its data removed.
pub fn start_kafka() -> Result<Kafka> {
    start_kafka_with(&[])
}

/// [`start_kafka`] with topic configs (`message.timestamp.type`).
pub fn start_kafka_with(topic_configs: &[(&str, &str)]) -> Result<Kafka> {
    let kafka = Kafka::try_start_with(KafkaOptions::for_throughput()).map_err(|e| anyhow!(e))?;
    kafka
        .try_create_topic_with(TOPIC, PARTITIONS, topic_configs)
        .map_err(|e| anyhow!(e))?;
    Ok(kafka)
}

/// A fresh `tansu` broker (in-memory storage) with the bench topic; killed on drop.
pub fn start_tansu() -> Result<Tansu> {
    let tansu = Tansu::try_start().map_err(|e| anyhow!(e))?;
    tansu
        .try_create_topic(TOPIC, PARTITIONS)
        .map_err(|e| anyhow!(e))?;
    Ok(tansu)
}

/// Counts delivery reports.
pub struct CountingContext {
    pub acked: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
}

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// `n` records shaped like the relay's (key, the same ~110-byte JSON value, 5 headers, a
/// timestamp) through a `ThreadedProducer` with the relay's settings, until all are acked.
pub fn broker_ceiling(broker: &dyn Broker, n: u64) -> Result<Rate> {
    let kafka = KafkaConfig {
        brokers: broker.brokers(),
        properties: crate::relay::extra_kafka_pairs().into_iter().collect(),
        ..KafkaConfig::default()
    };
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let cpu0 = own_cpu_secs();
    let producer: ThreadedProducer<CountingContext> = client_config(&kafka)
        .create_with_context(CountingContext {
            acked: Arc::clone(&acked),
            failed: Arc::clone(&failed),
        })
        .context("creating the producer")?;
    let mut key = String::new();
    let mut value = String::new();
    let mut id = String::new();
    let mut trace = String::new();
    let lsn = "0/1A2B3C48";
    for g in 0..n {
        key.clear();
        value.clear();
        id.clear();
        trace.clear();
        event_fields(g, &mut key, &mut value, &mut trace);
        let _ = write!(
            id,
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            g as u32,
            (g >> 32) as u16,
            g % 0xfff,
            g % 0xfff,
            g.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16
        );
        let headers = record_headers(&id, lsn, &trace);
        let record = BaseRecord::to(TOPIC)
            .key(key.as_str())
            .payload(value.as_str())
            .headers(headers)
            .timestamp(unix_ms());
        send_waiting(&producer, record)?;
    }
    let deadline = Instant::now() + Duration::from_secs(120 + n / 2000);
    while acked.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < n {
        let _ = producer.flush(Timeout::After(Duration::from_millis(100)));
        if Instant::now() >= deadline {
            bail!(
                "only {} of {n} records acknowledged",
                acked.load(Ordering::Relaxed)
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {n} records failed");
    }
    Ok(Rate {
        events: n,
        secs,
        cpu_secs: own_cpu_secs() - cpu0,
    })
}

/// The broker latency floor's topic, beside the relay's on the same broker.
const FLOOR_TOPIC: &str = "bench.latency.floor";

/// Keeps each delivery report's produce-to-ack time (µs; the opaque is the send time).
pub struct TimingContext {
    pub micros: std::sync::Mutex<Vec<u64>>,
    pub failed: AtomicU64,
}

impl ClientContext for TimingContext {}

impl ProducerContext for TimingContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_us: usize) {
        match result {
            Ok(_) => {
                let now = crate::procfs::unix_micros() as u64;
                self.micros
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(now.saturating_sub(sent_us as u64));
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The broker latency floor: a plain producer with the relay's settings sending one record
/// of the relay's shape at a time at `rate` records/s for [`crate::WARM_UP_SECS`] + `secs`,
/// produce call to delivery report of each record after the warm-up (exact, not bucketed).
/// No Postgres: what linger and the broker's round trip alone cost.
/// `overrides` go on top of those settings (the round trip alone: `linger.ms = 0`); each call
/// uses a topic of its own.
pub fn broker_latency_floor(
    kafka: &Kafka,
    rate: u64,
    secs: u64,
    overrides: &[(&str, &str)],
) -> Result<Floor> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let topic = format!("{FLOOR_TOPIC}.{}", RUNS.fetch_add(1, Ordering::Relaxed));
    let topic = topic.as_str();
    kafka
        .try_create_topic_with(topic, PARTITIONS, &[])
        .map_err(|e| anyhow!(e))?;
    let broker: &dyn Broker = kafka;
    let mut properties: std::collections::BTreeMap<String, String> =
        crate::relay::extra_kafka_pairs().into_iter().collect();
    for (key, value) in overrides {
        properties.insert((*key).to_owned(), (*value).to_owned());
    }
    let kafka = KafkaConfig {
        brokers: broker.brokers(),
        properties,
        ..KafkaConfig::default()
    };
    let producer: ThreadedProducer<TimingContext> = client_config(&kafka)
        .create_with_context(TimingContext {
            micros: std::sync::Mutex::new(Vec::with_capacity(
                (rate * (secs + crate::WARM_UP_SECS)) as usize,
            )),
            failed: AtomicU64::new(0),
        })
        .context("creating the producer")?;
    let warm = rate * crate::WARM_UP_SECS;
    let n = warm + rate * secs;
    let (mut key, mut value, mut trace) = (String::new(), String::new(), String::new());
    let start = Instant::now();
    for g in 0..n {
        let due = start + Duration::from_nanos(g * 1_000_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        key.clear();
        value.clear();
        trace.clear();
        event_fields(g, &mut key, &mut value, &mut trace);
        let id = format!("{g:036}");
        let headers = record_headers(&id, "0/1A2B3C48", &trace);
        let sent = crate::procfs::unix_micros() as usize;
        let record = BaseRecord::with_opaque_to(topic, sent)
            .key(key.as_str())
            .payload(value.as_str())
            .headers(headers)
            .timestamp(unix_ms());
        send_waiting(&producer, record)?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = producer.context().micros.lock().map_or(0, |m| m.len()) as u64
            + producer.context().failed.load(Ordering::Relaxed);
        if done >= n {
            break;
        }
        if Instant::now() >= deadline {
            bail!("only {done} of {n} records acknowledged");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if producer.context().failed.load(Ordering::Relaxed) > 0 {
        bail!("records failed");
    }
    let all = std::mem::take(
        &mut *producer
            .context()
            .micros
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    // Reports come in send order per partition, nearly in send order overall: the warm-up's
    // are the first `warm` of them.
    let measured: Vec<f64> = all[(warm as usize).min(all.len())..]
        .iter()
        .map(|&us| us as f64 / 1e3)
        .collect();
    Ok(Floor::from_samples(measured))
}

/// The five headers the relay puts on every bench record (`id`, `event_type`,
/// `aggregate_type`, `pg_lsn`, the row's `trace_id`).
fn record_headers(id: &str, lsn: &str, trace: &str) -> OwnedHeaders {
    [
        ("id", id),
        ("event_type", "OrderPlaced"),
        ("aggregate_type", "order"),
        ("pg_lsn", lsn),
        ("trace_id", trace),
    ]
    .into_iter()
    .fold(
        OwnedHeaders::new_with_capacity(5),
        |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value),
            })
        },
    )
}

/// Sends `record`; a full queue (the broker a second or more behind) waits for room, as the
/// relay does, and the wait counts in the record's latency.
fn send_waiting<C: ProducerContext>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, str, str, C::DeliveryOpaque>,
) -> Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("produce: {e}"),
        }
    }
}
