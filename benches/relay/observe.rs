//! What the broker holds, seen from outside any peer: the bench topic's end offsets (how far a
//! drain has got, whoever produces), its first record (to check a peer's record contract), and
//! commit-to-append latencies from the broker's `LogAppendTime`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{Env, PARTITIONS, TOPIC};

fn consumer(brokers: &str) -> Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("group.id", "relay-bench-observer")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("socket.timeout.ms", "10000")
        .create()
        .context("creating a consumer")
}

/// The bench topic's end offsets: records appended so far, over all partitions.
pub struct EndOffsets {
    consumer: BaseConsumer,
}

impl EndOffsets {
    pub fn new(brokers: &str) -> Result<EndOffsets> {
        Ok(EndOffsets {
            consumer: consumer(brokers)?,
        })
    }

    /// Records in the topic (the sum of its partitions' high watermarks). A fresh broker can
    /// answer a watermark request with a transient error (`NotLeaderForPartition` while its
    /// metadata settles): that is retried for up to 30 s.
    pub fn total(&self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.try_total() {
                Ok(total) => return Ok(total),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn try_total(&self) -> Result<u64> {
        let mut total = 0;
        for p in 0..PARTITIONS {
            let (_, high) = self
                .consumer
                .fetch_watermarks(TOPIC, p, Duration::from_secs(5))
                .with_context(|| format!("watermarks of {TOPIC}/{p}"))?;
            total += high.max(0) as u64;
        }
        Ok(total)
    }
}

/// One record as the contract check sees it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Sample {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether it has the relay's record contract (SPEC §3) for a bench event: the key is the
    /// aggregate id, the value the payload as stored, header `id` the row's id (looked up in
    /// `outbox.events`, which still holds the backlog).
    pub fn check(&self, env: &Env<'_>) -> Result<()> {
        let value = self.value.as_deref().unwrap_or("");
        let g = order_id(value.as_bytes()).ok_or_else(|| anyhow!("value {value:?}"))?;
        let (mut key, mut expected, mut trace) = (String::new(), String::new(), String::new());
        crate::event_fields(g, &mut key, &mut expected, &mut trace);
        if self.key.as_deref() != Some(key.as_str()) {
            bail!("key {:?}, expected {key:?}", self.key);
        }
        if value != expected {
            bail!("value {value:?}, expected {expected:?}");
        }
        let id = self.header("id").unwrap_or("");
        let row = env.rt.block_on(env.db.query_opt(
            "SELECT id::text FROM outbox.events WHERE (payload->>'order_id')::bigint = $1",
            &[&(g as i64)],
        ))?;
        let row_id: Option<String> = row.map(|r| r.get(0));
        if row_id.as_deref() != Some(id) {
            bail!(
                "header id {id:?}, the row's id {row_id:?}; headers {:?}",
                self.headers
            );
        }
        Ok(())
    }
}

/// The first record of partition `p` that has one, within 30 s.
pub fn first_record(brokers: &str) -> Result<Sample> {
    let consumer = consumer(brokers)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) {
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            return Ok(Sample {
                key: msg.key().map(text),
                value: msg.payload().map(text),
                headers: msg
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.map(text).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    bail!("no record in {TOPIC} within 30 s")
}

/// `"order_id": G` in a bench event's payload.
pub fn order_id(value: &[u8]) -> Option<u64> {
    const FIELD: &[u8] = b"\"order_id\": ";
    let at = value.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let digits = value[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&value[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Commit-to-append latency quantiles (exact over events, 1 ms resolution of the broker's
/// clock).
pub type Appended = crate::report::Floor;

/// Reads the topic (created with `message.timestamp.type=LogAppendTime`) from the beginning
/// until it has seen events `first..first + commits_us.len()`, and returns, for each, the
/// broker's append time minus `commits_us[e - first]` (when the writer saw its commit return,
/// Unix µs). A duplicate counts at its first append.
pub fn append_latencies(brokers: &str, first: u64, commits_us: &[i64]) -> Result<Appended> {
    let consumer = consumer(brokers)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let count = commits_us.len() as u64;
    let mut appended: HashMap<u64, i64> = HashMap::with_capacity(count as usize);
    let mut last_new = Instant::now();
    while (appended.len() as u64) < count {
        if last_new.elapsed() > Duration::from_secs(30) {
            bail!(
                "saw {} of {count} events in {TOPIC} (nothing new for 30 s)",
                appended.len()
            );
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.context("consuming")?;
        let Some(g) = msg.payload().and_then(order_id) else {
            continue;
        };
        if !(first..first + count).contains(&g) {
            continue;
        }
        let Some(ts) = msg.timestamp().to_millis() else {
            continue;
        };
        let slot = appended.entry(g).or_insert(i64::MAX);
        if ts < *slot {
            if *slot == i64::MAX {
                last_new = Instant::now();
            }
            *slot = ts;
        }
    }
    let ms: Vec<f64> = appended
        .iter()
        .map(|(&g, &ts)| (ts * 1000 - commits_us[(g - first) as usize]) as f64 / 1e3)
        .collect();
    if let Ok(path) = std::env::var("RELAY_BENCH_DUMP_APPENDED") {
        // Diagnostics: each event's commit time (Unix µs) and commit-to-append (ms), in
        // commit order, to see whether the slow ones come together.
        let mut rows: Vec<(i64, f64)> = appended
            .iter()
            .map(|(&g, &ts)| {
                let commit = commits_us[(g - first) as usize];
                (commit, (ts * 1000 - commit) as f64 / 1e3)
            })
            .collect();
        rows.sort_unstable_by_key(|&(commit, _)| commit);
        let text: String = rows
            .iter()
            .map(|(commit, ms)| format!("{commit} {ms:.3}\n"))
            .collect();
        let path = format!("{path}.{count}");
        std::fs::write(&path, text).with_context(|| format!("writing {path}"))?;
    }
    Ok(Appended::from_samples(ms))
}
