//! Exactly once: the transactional producer's start, and the progress topic (created
//! compacted, read back `read_committed` at the start of every session).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::delivery::Shared;
use super::error::SinkError;
use super::lessons::TOPIC_CREATE_TIMEOUT;
use super::producer::{admin_config, client_config, KafkaSink};
use super::transaction::Transactions;
use crate::checkpoint::Progress;
use crate::config::KafkaConfig;
use crate::error::Definite;
use crate::status::RelayState;

/// How long reading the progress topic to its end may take.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// librdkafka's default `transaction.timeout.ms`; records may wait in the queue as long.
const TRANSACTION_TIMEOUT_MS: &str = "60000";

/// The progress reader's prefetch bound (`queued.max.messages.kbytes`).
const PROGRESS_QUEUE_KBYTES: &str = "1024";

/// The `transactional.id` of a relay with `identity`: the same for every relay that serves
/// that source, so the one that takes over fences the one before.
pub fn transactional_id(identity: &str) -> String {
    format!("outbox-relay:{identity}")
}

/// The producer settings of an exactly-once relay with `identity`: [`client_config`]'s, with
/// the `transactional.id`, records waiting no longer than a transaction may, and without the
/// gapless guarantee (a failed record fails the whole transaction instead).
pub fn transactional_config(cfg: &KafkaConfig, identity: &str) -> ClientConfig {
    let mut client = client_config(cfg);
    client
        .set("transactional.id", transactional_id(identity))
        .set("message.timeout.ms", TRANSACTION_TIMEOUT_MS)
        .remove("enable.gapless.guarantee");
    client
}

impl<P: Copy + Ord + Send + Sync + 'static + Progress> KafkaSink<P> {
    /// An exactly-once sink for the relay `identity`: creates the progress topic if needed,
    /// starts the transactional producer (which fences any older producer of this identity
    /// and aborts its open transaction), then reads the progress recorded last. Returns the
    /// sink and that position.
    pub async fn transactional(
        cfg: &KafkaConfig,
        shared: Arc<Shared<P>>,
        state: Arc<RelayState>,
        shutdown: CancellationToken,
        identity: &str,
    ) -> Result<(Self, Option<Recorded<P>>), SinkError> {
        let client = transactional_config(cfg, identity);
        shared.checkpoint().hold();
        let mut sink = Self::with_client(cfg, client, shared, state, shutdown)?;
        sink.ensure_progress_topic(&cfg.progress_topic).await?;
        let producer = sink.producer.clone();
        tokio::task::spawn_blocking(move || producer.init_transactions(Duration::from_secs(60)))
            .await
            .map_err(|e| SinkError::Transaction {
                context: "initialising transactions",
                error: e.to_string(),
            })?
            .map_err(|e| SinkError::Transaction {
                context: "initialising transactions",
                error: e.to_string(),
            })?;
        let text = read_progress(cfg, identity).await?;
        let recorded = match text {
            None => None,
            Some(value) => Some(parse_progress(&value).ok_or_else(|| {
                SinkError::Definite(Definite::ProgressUnreadable {
                    identity: identity.to_owned(),
                    topic: cfg.progress_topic.clone(),
                    value,
                })
            })?),
        };
        let position = recorded.map(|r| r.position);
        sink.txn = Some(Transactions::new(
            identity.to_owned(),
            cfg.progress_topic.clone(),
            position,
        ));
        if let Some(position) = position {
            sink.state.set_progress(Some(position.to_progress()));
        }
        Ok((sink, recorded))
    }

    /// Creates the progress topic (one partition, compacted) unless it exists.
    async fn ensure_progress_topic(&mut self, topic: &str) -> Result<(), SinkError> {
        if self.create_topics {
            let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
                .set("cleanup.policy", "compact");
            let options = AdminOptions::new()
                .operation_timeout(Some(TOPIC_CREATE_TIMEOUT))
                .request_timeout(Some(TOPIC_CREATE_TIMEOUT));
            let results = self
                .admin
                .create_topics([&new], &options)
                .await
                .map_err(|e| SinkError::CreateTopic {
                    topic: topic.to_owned(),
                    reason: e.to_string(),
                })?;
            for result in results {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        return Err(SinkError::CreateTopic {
                            topic: topic.to_owned(),
                            reason: code.to_string(),
                        })
                    }
                }
            }
        }
        self.topic_exists(topic)
            .await
            .map_err(|reason| SinkError::CreateTopic {
                topic: topic.to_owned(),
                reason,
            })?;
        self.known_topics.insert(topic.to_owned());
        Ok(())
    }
}

/// What the last committed progress record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded<P> {
    /// Everything at or before it is in Kafka; the source may be confirmed up to it.
    pub position: P,
    /// A source transaction split across Kafka transactions: its key and how many of its
    /// events are in Kafka.
    pub partial: Option<(P, u64)>,
}

/// A progress record's value, read.
fn parse_progress<P: Progress>(value: &str) -> Option<Recorded<P>> {
    let json: serde_json::Value = serde_json::from_str(value).ok()?;
    let position = P::from_progress(json.get("position")?.as_str()?)?;
    let partial = match json.get("partial") {
        None | Some(serde_json::Value::Null) => None,
        Some(partial) => Some((
            P::from_progress(partial.get("transaction")?.as_str()?)?,
            partial.get("events")?.as_u64()?,
        )),
    };
    Some(Recorded { position, partial })
}

/// The last committed progress record of `identity` (its value), reading partition 0 of the
/// progress topic from the start to its end with `isolation.level = read_committed`. `None`
/// when there is none, or the last one is a tombstone.
async fn read_progress(cfg: &KafkaConfig, identity: &str) -> Result<Option<String>, SinkError> {
    let (config, probe) = progress_reader_configs(cfg);
    let topic = cfg.progress_topic.clone();
    let identity = identity.to_owned();
    let failed = |error: String| SinkError::Transaction {
        context: "reading the progress topic",
        error,
    };
    tokio::task::spawn_blocking(move || -> Result<Option<String>, String> {
        let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
        let uncommitted: BaseConsumer = probe.create().map_err(|e| e.to_string())?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut found = None;
        let mut waiting = false;
        loop {
            if Instant::now() >= deadline {
                return Err("timed out before reaching the end of the topic".into());
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                // The end for read_committed is the first offset of a transaction still open
                // (another relay's on a shared topic): a record of ours may lie behind it.
                // Only with none open is the end the real end.
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    if none_open(&consumer, &uncommitted, &topic)? {
                        return Ok(found);
                    }
                    if !waiting {
                        waiting = true;
                        tracing::info!(topic, "a transaction is open on the progress topic; waiting for it to end before reading the progress");
                    }
                }
                Some(Err(error)) => tracing::debug!(error = %error, "reading the progress topic"),
                // The last record of the identity wins; a tombstone clears it.
                Some(Ok(message)) if message.key() == Some(identity.as_bytes()) => {
                    found = message
                        .payload()
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                }
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(failed)
}

/// The two clients that read the progress topic: `read_committed` (the reader) and
/// `read_uncommitted` (the probe for transactions still open). Both are dropped once read.
fn progress_reader_configs(cfg: &KafkaConfig) -> (ClientConfig, ClientConfig) {
    let mut config = admin_config(cfg);
    config
        .set("group.id", "outbox-relay-progress")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // The end shows as a fetch that comes back empty, which the broker holds this long
        // (and the watermark requests of the end check queue behind it): at the default,
        // 500 ms, a start waited about 1.3 s more than it does with this.
        .set("fetch.wait.max.ms", "10")
        // The consumer prefetches up to this much (librdkafka's default is 64 MiB, and
        // `fetch.max.bytes` follows it down to `message.max.bytes`): progress records are a
        // few hundred bytes on one partition, so 1 MiB reads them as fast and keeps a long,
        // not yet compacted topic from adding tens of MB to the relay's peak memory.
        .set("queued.max.messages.kbytes", PROGRESS_QUEUE_KBYTES);
    let mut probe = config.clone();
    probe.set("isolation.level", "read_uncommitted");
    config.set("isolation.level", "read_committed");
    (config, probe)
}

/// Whether no transaction is open on partition 0 of `topic`: its last stable offset (what a
/// `read_committed` client is told is the end) is its high watermark (what a
/// `read_uncommitted` one is told).
fn none_open(
    committed: &BaseConsumer,
    uncommitted: &BaseConsumer,
    topic: &str,
) -> Result<bool, String> {
    let timeout = Duration::from_secs(10);
    let (_, stable) = committed
        .fetch_watermarks(topic, 0, timeout)
        .map_err(|e| e.to_string())?;
    let (_, high) = uncommitted
        .fetch_watermarks(topic, 0, timeout)
        .map_err(|e| e.to_string())?;
    Ok(stable >= high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_value_reads_back() {
        let value = r#"{"position":"16/B374D848","identity":"x"}"#;
        let whole = Recorded {
            position: 0x16_B374_D848,
            partial: None,
        };
        assert_eq!(parse_progress::<u64>(value), Some(whole));
        let value = r#"{"position":"0/10","partial":{"transaction":"0/20","events":7}}"#;
        assert_eq!(
            parse_progress::<u64>(value),
            Some(Recorded {
                position: 0x10,
                partial: Some((0x20, 7)),
            })
        );
        assert_eq!(parse_progress::<u64>(r#"{"position":7}"#), None);
        assert_eq!(
            parse_progress::<u64>(r#"{"position":"0/1","partial":{"events":1}}"#),
            None
        );
        assert_eq!(parse_progress::<u64>("not json"), None);
    }

    /// The progress reader prefetches at most 1 MiB (librdkafka's default is 64 MiB), and
    /// librdkafka accepts the bound with the other settings: both clients are created.
    #[test]
    fn the_progress_reader_prefetches_little() {
        let config = crate::config::Config::from_parts(None, Vec::new()).unwrap();
        let (reader, probe) = progress_reader_configs(&config.kafka);
        for client in [&reader, &probe] {
            assert_eq!(client.get("queued.max.messages.kbytes"), Some("1024"));
            let _: BaseConsumer = client.create().expect("librdkafka takes the settings");
        }
        assert_eq!(reader.get("isolation.level"), Some("read_committed"));
        assert_eq!(probe.get("isolation.level"), Some("read_uncommitted"));
    }
}
