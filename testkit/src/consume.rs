//! Reading records back from the broker, and the partition a Java client would pick.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::{client_config, unique_name};

/// A consumed record, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    /// The first header called `name`, as (lossy) UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The key as (lossy) UTF-8.
    pub fn key_str(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// The value as (lossy) UTF-8.
    pub fn value_str(&self) -> Option<String> {
        self.value
            .as_deref()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads `topics` from the beginning with a fresh consumer until `until(&records)` holds or
/// `timeout` passes, and returns what it got either way (the caller asserts).
///
/// Plain topic names are assigned directly (every partition, from the earliest offset), and
/// topics that appear later are picked up. Names starting with `^` are regular expressions
/// (e.g. `^outbox\..*`): then the consumer subscribes through a (fresh) consumer group.
pub fn consume(
    brokers: &str,
    topics: &[&str],
    mut until: impl FnMut(&[Record]) -> bool,
    timeout: Duration,
) -> Vec<Record> {
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", unique_name("harness"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()
        .expect("consumer");
    let subscribe = topics.iter().any(|t| t.starts_with('^'));
    if subscribe {
        consumer.subscribe(topics).expect("subscribe");
    }
    let deadline = Instant::now() + timeout;
    let mut assigned: Vec<(String, i32)> = Vec::new();
    let mut next_refresh = Instant::now();
    let mut records = Vec::new();
    while !until(&records) && Instant::now() < deadline {
        if !subscribe && Instant::now() >= next_refresh {
            assign_new_partitions(&consumer, topics, &mut assigned);
            next_refresh = Instant::now() + Duration::from_millis(500);
        }
        // Errors (unknown topics, rebalances) are expected while topics are being created.
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) {
            records.push(to_record(&msg));
        }
    }
    records
}

/// What the broker holds in `topic` beside what `records` saw of it, per partition: its low
/// and high offsets, and how many records (and which offsets) were read. Told when records are
/// missing: a high offset above what was read means the reader missed them; equal means they
/// never reached the broker.
pub fn partition_report(brokers: &str, topic: &str, records: &[Record]) -> String {
    let consumer: BaseConsumer = match client_config(brokers).create() {
        Ok(c) => c,
        Err(e) => return format!("no client for the partition report: {e}"),
    };
    let partitions = match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
        Ok(md) => md
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        Err(e) => return format!("no metadata for {topic}: {e}"),
    };
    let mut report = String::new();
    for p in partitions {
        let seen: Vec<i64> = records
            .iter()
            .filter(|r| r.topic == topic && r.partition == p)
            .map(|r| r.offset)
            .collect();
        let watermarks = consumer.fetch_watermarks(topic, p, Duration::from_secs(10));
        report.push_str(&format!(
            "{topic}[{p}]: broker offsets {watermarks:?}, read {} (offsets {:?}..={:?})\n",
            seen.len(),
            seen.iter().min(),
            seen.iter().max()
        ));
    }
    report
}

fn assign_new_partitions(
    consumer: &BaseConsumer,
    topics: &[&str],
    assigned: &mut Vec<(String, i32)>,
) {
    let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(2)) else {
        return;
    };
    let mut new = TopicPartitionList::new();
    for topic in md.topics().iter().filter(|t| topics.contains(&t.name())) {
        for p in topic.partitions() {
            let tp = (topic.name().to_string(), p.id());
            if !assigned.contains(&tp) {
                new.add_partition_offset(topic.name(), p.id(), Offset::Beginning)
                    .expect("offset");
                assigned.push(tp);
            }
        }
    }
    if new.count() > 0 {
        consumer.incremental_assign(&new).expect("assign");
    }
}

fn to_record(msg: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    Record {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().map(<[u8]>::to_vec),
        timestamp_ms: msg.timestamp().to_millis(),
        headers: msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Kafka's `Utils.murmur2`, as used by the Java client's default partitioner.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner (and librdkafka's `murmur2_random`)
/// picks for a non-empty key.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}
