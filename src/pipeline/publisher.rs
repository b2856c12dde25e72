//! What a source publishes into: the pipeline's watermark, router and sink.

use std::time::Instant;

use super::error::SessionError;
use super::sink::Sink;
use crate::checkpoint::{UnitId, Watermark};
use crate::config::OnInvalid;
use crate::error::Definite;
use crate::route::{OutboxEvent, Routed, Router};
use crate::source::Publish;

/// The pipeline's [`Publish`] for one [`crate::source::Source::pump`].
pub(super) struct Publisher<'a, P, K> {
    sink: &'a mut K,
    watermark: &'a Watermark<P>,
    router: &'a Router,
    on_invalid: OnInvalid,
    /// A position to confirm right after the pump (see [`Publish::idle_at`]).
    confirm_now: Option<P>,
}

impl<'a, P: Copy + Ord, K> Publisher<'a, P, K> {
    pub(super) fn new(
        sink: &'a mut K,
        watermark: &'a Watermark<P>,
        router: &'a Router,
        on_invalid: OnInvalid,
    ) -> Self {
        Self {
            sink,
            watermark,
            router,
            on_invalid,
            confirm_now: None,
        }
    }

    pub(super) fn confirm_now(&self) -> Option<P> {
        self.confirm_now
    }
}

impl<P, K> Publish<P> for Publisher<'_, P, K>
where
    P: Copy + Ord + Send + Sync,
    K: Sink<P>,
{
    /// The sink's faults, and the source's passed through.
    type Error = SessionError;

    fn open(&mut self, committed_at: Option<Instant>) -> UnitId {
        self.watermark.lock().open(committed_at)
    }

    fn seal(&mut self, unit: UnitId, end: P) {
        self.watermark.lock().seal(unit, end);
    }

    async fn publish(&mut self, unit: UnitId, event: OutboxEvent<'_>) -> Result<(), SessionError> {
        let routed = self.router.route(event);
        self.publish_routed(unit, routed).await
    }

    async fn publish_routed(
        &mut self,
        unit: UnitId,
        routed: Routed<'_>,
    ) -> Result<(), SessionError> {
        halt_if_invalid(self.on_invalid, &routed)?;
        Ok(self.sink.send(unit, routed).await?)
    }

    fn router(&self) -> &Router {
        self.router
    }

    fn within(&mut self, key: P, events: u64) {
        self.watermark.lock().within(key, events);
    }

    fn idle_at(&mut self, position: P) {
        let to = self.watermark.lock().idle_at(position);
        self.confirm_now = self.confirm_now.max(to);
    }
}

/// With `on_invalid = "halt"`, an invalid event stops the relay before anything past it is
/// confirmed; otherwise it goes on to the dead-letter topic.
fn halt_if_invalid(on_invalid: OnInvalid, routed: &Routed<'_>) -> Result<(), SessionError> {
    if on_invalid != OnInvalid::Halt {
        return Ok(());
    }
    let Routed::DeadLetter { record, reason } = routed else {
        return Ok(());
    };
    let text = |name| {
        record
            .header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    Err(SessionError::Source(
        Definite::InvalidEvent {
            id: text("id"),
            reason: reason.to_string(),
            error: text("dlq_error"),
        }
        .into(),
    ))
}
