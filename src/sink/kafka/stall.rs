//! Records Kafka keeps refusing without failing them. A partition with fewer in-sync replicas
//! than its topic's `min.insync.replicas` answers every `acks=all` write with
//! NOT_ENOUGH_REPLICAS, which librdkafka retries without end (`message.timeout.ms = 0`, so
//! nothing is lost) and mentions only at debug level: the relay would look healthy while no
//! event moves. So once records have waited this long for their acknowledgement, the sink
//! looks at the partitions of the topics it writes to and names those short of in-sync
//! replicas, in the log and in `/status`, until they recover.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, OwnedResourceSpecifier, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

use super::delivery::Shared;
use crate::status::RelayState;

/// How long the oldest record may wait for its acknowledgement before the sink looks why.
const STALL_AFTER: Duration = Duration::from_secs(15);
/// How often the sink checks while records wait.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How often the log repeats an unchanged diagnosis.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Partitions named in one message; the rest are counted.
const NAMED_PARTITIONS: usize = 5;

/// The watch's task, ended with the sink.
pub(super) struct StallWatch(tokio::task::JoinHandle<()>);

impl Drop for StallWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the watch reads: the sink's acknowledgements, the topics it writes to, and an admin
/// client of its own to ask Kafka with (never the producer, which must not outlive the sink).
pub(super) struct Watched<P> {
    pub(super) shared: Arc<Shared<P>>,
    pub(super) topics: Arc<Mutex<Vec<String>>>,
    pub(super) admin: Arc<AdminClient<DefaultClientContext>>,
    pub(super) state: Arc<RelayState>,
}

/// Starts the watch on the current tokio runtime (none: no watch).
pub(super) fn watch<P: Copy + Ord + Send + Sync + 'static>(
    watched: Watched<P>,
) -> Option<StallWatch> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    Some(StallWatch(runtime.spawn(run(watched))))
}

async fn run<P: Copy + Ord + Send + Sync + 'static>(watched: Watched<P>) {
    let mut reported: Option<String> = None;
    let mut logged_at: Option<Instant> = None;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let stalled = {
            let checkpoint = watched.shared.checkpoint();
            checkpoint.inflight() > 0
                && checkpoint
                    .oldest_committed_at()
                    .is_some_and(|at| at.elapsed() >= STALL_AFTER)
        };
        let problem = if stalled {
            short_of_replicas(&watched).await
        } else {
            None
        };
        match &problem {
            Some(problem) => {
                if reported.as_ref() != Some(problem)
                    || logged_at.is_none_or(|at| at.elapsed() >= LOG_EVERY)
                {
                    tracing::warn!("{problem}");
                    logged_at = Some(Instant::now());
                }
                watched.state.set_error(Some(problem.clone()));
            }
            None => {
                if let Some(old) = &reported {
                    tracing::info!("Kafka takes writes again: enough replicas are in sync");
                    watched.state.clear_error_if(old);
                }
            }
        }
        reported = problem;
    }
}

/// The partitions of the sink's topics with fewer in-sync replicas than their topic's
/// `min.insync.replicas` (capped at the replica count, as Kafka does), as one message; `None`
/// if there are none or Kafka does not answer (an outage is reported elsewhere).
async fn short_of_replicas<P: Copy + Ord + Send + Sync + 'static>(
    watched: &Watched<P>,
) -> Option<String> {
    let topics = watched
        .topics
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if topics.is_empty() {
        return None;
    }
    let admin = Arc::clone(&watched.admin);
    let names = topics.clone();
    // (topic, partition, in sync, replicas)
    let partitions: Vec<(String, i32, usize, usize)> = tokio::task::spawn_blocking(move || {
        let metadata = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .ok()?;
        Some(
            metadata
                .topics()
                .iter()
                .filter(|t| names.iter().any(|n| n == t.name()))
                .flat_map(|t| {
                    t.partitions().iter().map(|p| {
                        (
                            t.name().to_owned(),
                            p.id(),
                            p.isr().len(),
                            p.replicas().len(),
                        )
                    })
                })
                .collect(),
        )
    })
    .await
    .ok()??;
    let specifiers: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let configs = watched
        .admin
        .describe_configs(&specifiers, &options)
        .await
        .ok()?;
    let min_insync: HashMap<String, usize> = configs
        .into_iter()
        .flatten()
        .filter_map(|resource| {
            let OwnedResourceSpecifier::Topic(name) = &resource.specifier else {
                return None;
            };
            let value = resource
                .get("min.insync.replicas")?
                .value
                .as_deref()?
                .parse()
                .ok()?;
            Some((name.clone(), value))
        })
        .collect();
    let short: Vec<String> = partitions
        .iter()
        .filter_map(|(topic, partition, in_sync, replicas)| {
            let wanted = (*min_insync.get(topic)?).min(*replicas);
            (*in_sync < wanted).then(|| {
                format!(
                    "{topic} partition {partition} has {in_sync} of {replicas} replicas in sync, \
                     min.insync.replicas={wanted}"
                )
            })
        })
        .collect();
    if short.is_empty() {
        return None;
    }
    let more = short.len().saturating_sub(NAMED_PARTITIONS);
    let mut named = short[..short.len().min(NAMED_PARTITIONS)].join("; ");
    if more > 0 {
        named.push_str(&format!("; and {more} more"));
    }
    Some(format!(
        "Kafka refuses acks=all writes (NOT_ENOUGH_REPLICAS): {named}. The events wait, \
         unconfirmed, and are retried until the replicas are back in sync or the topic's \
         min.insync.replicas is lowered"
    ))
}
