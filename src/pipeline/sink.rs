//! The sink contract, and Kafka's implementation of it.

use std::future::Future;
use std::time::Instant;

use crate::checkpoint::UnitId;
use crate::route::{Routed, Router};
use crate::sink::kafka::{KafkaSink, Refused, SinkError};

/// Where the pipeline sends records. Acknowledgements arrive on the watermark the sink was
/// built with, from wherever the sink learns of them (librdkafka's delivery reports).
pub trait Sink<P>: Send {
    /// A record the sink refused for its own content, handed back to be dead-lettered.
    type Refused: Send;

    /// Sends `routed` as part of `unit`; waits while the sink is full.
    fn send(
        &mut self,
        unit: UnitId,
        routed: Routed<'_>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Waits for the next refused record. Cancel-safe.
    fn refused(&mut self) -> impl Future<Output = Option<Self::Refused>> + Send;

    /// Deals with a refused record in its unit (dead-letters it).
    fn redirect(
        &mut self,
        refused: Self::Refused,
        router: &Router,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// A delivery failure that requires a restart, if one happened.
    fn failure(&self) -> Option<String>;

    /// Waits for every acknowledgement until `deadline`, dealing with refusals meanwhile.
    fn drain(
        &mut self,
        router: &Router,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Records waiting in the sink, for the gauge.
    fn queue_depth(&self) -> i32;

    /// Drops whatever the sink still holds (after a fault: it is resent from the confirmed
    /// position).
    fn purge(&self);

    /// The source is at a boundary (no source transaction half sent): a transactional sink
    /// may commit here.
    fn at_boundary(
        &mut self,
        router: &Router,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = router;
        async { Ok(()) }
    }

    /// The source is inside a transaction and said how far ([`crate::source::Publish::within`]):
    /// a transactional sink whose transaction outgrew its bounds may commit here.
    fn within_transaction(
        &mut self,
        router: &Router,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = router;
        async { Ok(()) }
    }

    /// The source has nothing more ready: what waits to be batched may be sent now.
    fn caught_up(&self) {}

    /// After a fault: a transactional sink aborts its open transaction.
    fn abort(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

impl<P: Copy + Ord + Send + Sync + 'static> Sink<P> for KafkaSink<P> {
    type Refused = Refused;

    async fn send(&mut self, unit: UnitId, routed: Routed<'_>) -> Result<(), SinkError> {
        KafkaSink::send(self, unit, routed).await
    }

    async fn refused(&mut self) -> Option<Refused> {
        KafkaSink::refused(self).await
    }

    async fn redirect(&mut self, refused: Refused, router: &Router) -> Result<(), SinkError> {
        KafkaSink::redirect(self, refused, router).await
    }

    fn failure(&self) -> Option<String> {
        self.shared().failure()
    }

    /// Exactly once: commits what drained when the source is at a boundary; otherwise (a
    /// halt inside a source transaction) aborts, so that nothing of that transaction commits,
    /// and so when Kafka did not acknowledge everything by `deadline` (it is all resent).
    async fn drain(&mut self, router: &Router, deadline: Instant) -> Result<(), SinkError> {
        self.drain_for_shutdown(router, deadline).await?;
        if self.is_transactional() {
            let unsettled = {
                let checkpoint = self.shared().checkpoint();
                checkpoint.has_open_unit() || checkpoint.inflight() > 0
            };
            if unsettled {
                KafkaSink::abort(self).await;
            } else {
                self.commit(router).await?;
            }
        }
        Ok(())
    }

    fn queue_depth(&self) -> i32 {
        KafkaSink::queue_depth(self)
    }

    fn purge(&self) {
        KafkaSink::purge(self)
    }

    fn caught_up(&self) {
        KafkaSink::caught_up(self)
    }

    async fn at_boundary(&mut self, router: &Router) -> Result<(), SinkError> {
        KafkaSink::at_boundary(self, router).await
    }

    async fn within_transaction(&mut self, router: &Router) -> Result<(), SinkError> {
        KafkaSink::within_transaction(self, router).await
    }

    async fn abort(&mut self) {
        KafkaSink::abort(self).await
    }
}
