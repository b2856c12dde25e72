//! The pipeline: one session's loop from a [`Source`] to a [`Sink`], the same for every
//! source.
//!
//! It owns what the delivery contract rests on (see [`Source`]): the biased select loop, the
//! watermark ([`Watermark`]), the router and the sink handle. Every tick it takes the newest
//! acknowledged position from the watermark and has the source confirm it; on shutdown it
//! lets the source reach a transaction boundary, drains every ack, and only then confirms the
//! final position (drain-then-confirm). `run.rs` is the loop, `sink.rs` the sink contract and
//! its Kafka implementation, `publisher.rs` what a source publishes into, `error.rs` why a
//! session ends ([`SessionError`]: the source's fault or the sink's; sources never see the
//! sink's, they pass the publisher's error on), `exactly_once.rs` the start of an exactly-once
//! session (the relay's identity, resuming after the progress recorded in Kafka; the sink
//! then commits at source boundaries, see `docs/EXACTLY-ONCE.md`).
//!
//! Generic over both sides (no `dyn`): the hot path compiles to the same code as a source
//! that called the Kafka sink itself.

mod error;
mod exactly_once;
mod publisher;
mod run;
mod sink;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::checkpoint::Watermark;
use crate::config::Delivery;
use crate::sink::kafka::{KafkaSink, Shared};
use crate::source::{Session, Source};
use crate::status::RelayState;

pub use error::SessionError;
pub use run::Pipeline;
pub use sink::Sink;

/// One leader session of source `S` into Kafka: runs until shutdown (Ok) or a fault (Err).
pub async fn run_session<S: Source>(
    session: &Session,
    state: &Arc<RelayState>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let mut source = S::prepare(session, shutdown).await?;
    let watermark = Arc::new(Watermark::new());
    let shared = Shared::new(Arc::clone(&watermark), session.metrics.clone());
    let kafka = &session.config.kafka;
    state.set_delivery(kafka.delivery.as_str());
    let mut sink = match kafka.delivery {
        Delivery::AtLeastOnce => {
            KafkaSink::new(kafka, shared, Arc::clone(state), shutdown.clone())?
        }
        Delivery::ExactlyOnce => {
            // Fences every older producer of this identity (a zombie leader's commit fails)
            // and aborts its open transaction before the progress is read.
            let identity = exactly_once::identity(session).await?;
            let (sink, recorded) = KafkaSink::transactional(
                kafka,
                shared,
                Arc::clone(state),
                shutdown.clone(),
                &identity,
            )
            .await?;
            let start = exactly_once::resume(&mut source, recorded, &identity, &session.config)?;
            watermark.lock().start_at(start);
            sink
        }
    };
    if let Some(deposed) = source.deposed() {
        sink.stop_on(deposed);
    }
    // Leading from here on: nothing below returns early.
    state.set_leader(true);
    session.metrics.is_leader.set(1);
    source.start(session);
    let mut pipeline = Pipeline::new(
        source,
        sink,
        watermark,
        session.router.clone(),
        session.config.source.on_invalid,
        session.metrics.clone(),
    );
    let result = pipeline.run(shutdown).await;
    pipeline.end(&result).await;
    state.set_leader(false);
    session.metrics.is_leader.set(0);
    // Only now: releasing the slot or the lock lets a standby start from the position just
    // confirmed.
    drop(pipeline);
    result
}
