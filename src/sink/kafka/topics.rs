//! Topics the sink needs: created or waited for before their first record.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;

use super::error::SinkError;
use super::lessons::*;
use super::producer::KafkaSink;

impl<P: Copy + Ord + Send + Sync + 'static> KafkaSink<P> {
    /// Makes sure `topic` exists before the first record for it: the broker may not create
    /// topics on produce. A topic that is missing (and may not or cannot be created) is not
    /// the event's fault: the stream waits here, in order, and says which topic it needs.
    pub(super) async fn ensure_topic(&mut self, topic: &str) -> Result<(), SinkError> {
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        let mut wait = Duration::from_millis(500);
        let mut logged_at: Option<Instant> = None;
        loop {
            let problem = if self.create_topics {
                self.create_topic(topic).await.err()
            } else {
                self.topic_exists(topic).await.err()
            };
            let Some(problem) = problem else {
                break;
            };
            let message = format!("waiting for Kafka topic {topic}: {problem}");
            if logged_at.is_none_or(|at| at.elapsed() > MISSING_TOPIC_LOG_EVERY) {
                tracing::warn!(topic, problem = %problem, "waiting for a Kafka topic; events for it are held in order");
                logged_at = Some(Instant::now());
            }
            self.state.set_missing_topic(Some(message));
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(SinkError::Stopped(topic.to_owned())),
                _ = self.stop.cancelled() => return Err(SinkError::LeadershipLost),
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(MISSING_TOPIC_RETRY_MAX);
        }
        self.state.set_missing_topic(None);
        self.wait_for_leaders(topic).await;
        tracing::info!(topic, "topic ready");
        self.known_topics.insert(topic.to_owned());
        self.topics_in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(topic.to_owned());
        Ok(())
    }

    /// Creates `topic`; "already exists" is success.
    pub(super) async fn create_topic(&self, topic: &str) -> Result<(), String> {
        let new = NewTopic::new(topic, self.partitions, TopicReplication::Fixed(-1));
        let options = AdminOptions::new()
            .operation_timeout(Some(TOPIC_CREATE_TIMEOUT))
            .request_timeout(Some(TOPIC_CREATE_TIMEOUT));
        let creating = self.admin.create_topics([&new], &options);
        let results = tokio::time::timeout(TOPIC_CREATE_TIMEOUT + Duration::from_secs(5), creating)
            .await
            .map_err(|_| "the broker did not answer the create request".to_owned())?
            .map_err(|e| format!("cannot create it: {e}"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(format!("creating it was refused: {code}")),
            }
        }
        Ok(())
    }

    /// Waits (at most [`LEADERS_WAIT`]) until the leader of every partition of `topic` answers
    /// for it. A topic created a moment ago, or one on a broker just started again, is in the
    /// metadata before its leaders take requests: a first produce request refused "not leader"
    /// while a later one succeeds makes librdkafka report the refused records delivered. The
    /// delivery callback does not count those as acks (the session restarts, resending
    /// them twice), and waiting here keeps a new topic's first events from causing that.
    async fn wait_for_leaders(&self, topic: &str) {
        let producer = self.producer.clone();
        let name = topic.to_owned();
        let waited = tokio::task::spawn_blocking(move || {
            let client = producer.client();
            let deadline = Instant::now() + LEADERS_WAIT;
            loop {
                match leaders_answer(client, &name) {
                    Some(answered) => return answered,
                    None if Instant::now() >= deadline => return false,
                    None => std::thread::sleep(LEADERS_RETRY),
                }
            }
        })
        .await
        .unwrap_or(false);
        if !waited {
            tracing::debug!(
                topic,
                "not every partition leader answered (not yet, or not allowed to be asked); sending anyway"
            );
        }
    }

    /// Whether the broker knows `topic` (with `create_topics = false`).
    pub(super) async fn topic_exists(&self, topic: &str) -> Result<(), String> {
        let producer = self.producer.clone();
        let name = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(10))
                .map_err(|e| format!("cannot read metadata: {e}"))?;
            match metadata.topics().iter().find(|t| t.name() == name) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                _ => Err("it does not exist and kafka.create_topics is false".to_owned()),
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Whether every partition of `topic` has a leader that answers ListOffsets: `Some(true)` yes,
/// `None` not yet (no metadata, a leader not there yet), `Some(false)` not allowed to ask (no
/// Describe on the topic: asking again will not help).
fn leaders_answer<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Option<bool> {
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)?
        .partitions();
    if partitions.is_empty() {
        return None;
    }
    for partition in partitions {
        match client.fetch_watermarks(topic, partition.id(), Duration::from_secs(2)) {
            Ok(_) => {}
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed,
            )) => return Some(false),
            Err(_) => return None,
        }
    }
    Some(true)
}
