//! The stream's watchdog: see the module's "Liveness".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the watchdog looks at the stream.
pub(super) const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Ends the session (cancels `stream_lost`) when the stream has been silent for `limit`: see
/// the module's "Liveness". `received` counts the events the pipeline took from the channel.
pub(super) async fn watch_stream(
    stream_metrics: Arc<pgwire_replication::ReplicationMetrics>,
    received: Arc<AtomicU64>,
    limit: Duration,
    stream_lost: CancellationToken,
) {
    let mut silence = Silence::new(
        stream_metrics.events_forwarded(),
        stream_metrics.last_applied_lsn().as_u64(),
        Instant::now(),
    );
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let heard = stream_metrics.events_forwarded();
        let silent = silence.observe(
            heard,
            stream_metrics.last_applied_lsn().as_u64(),
            received.load(Ordering::Relaxed) < heard,
            Instant::now(),
        );
        if silent >= limit {
            tracing::warn!(
                silent_secs = silent.as_secs(),
                "nothing heard from the server on the replication stream, not even a keepalive; the connection is dead, reconnecting"
            );
            stream_lost.cancel();
            return;
        }
    }
}

/// Since when a stream has been silent: nothing arrived, no new position went to the server,
/// and nothing waited unread.
#[derive(Debug)]
pub(super) struct Silence {
    /// Events the replication client has handed over.
    heard: u64,
    /// The position in the last status update sent.
    reported: u64,
    since: Instant,
}

impl Silence {
    pub(super) fn new(heard: u64, reported: u64, now: Instant) -> Self {
        Self {
            heard,
            reported,
            since: now,
        }
    }

    /// How long the stream has been silent at `now`. `backlog`: events wait in the channel,
    /// so the pipeline is behind and the client is not reading (backpressure, not silence).
    pub(super) fn observe(
        &mut self,
        heard: u64,
        reported: u64,
        backlog: bool,
        now: Instant,
    ) -> Duration {
        if heard != self.heard || reported != self.reported || backlog {
            *self = Self::new(heard, reported, now);
        }
        now.saturating_duration_since(self.since)
    }
}
