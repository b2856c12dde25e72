//! The select loop and the end of a session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::error::SessionError;
use super::publisher::Publisher;
use super::sink::Sink;
use crate::checkpoint::Watermark;
use crate::config::OnInvalid;
use crate::error::error_chain;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::sink::kafka::SinkError;
use crate::source::Source;

/// How often acknowledged positions are confirmed and gauges refreshed.
const TICK: Duration = Duration::from_millis(50);

/// Inputs the loop takes in a row while the source has them ready, before it looks at
/// shutdown, refusals and the tick again: a backlog skips the select's bookkeeping for most
/// events, and the tick still comes every [`TICK`] or so.
const READY_RUN: usize = 64;

/// The output of `future` if it is ready at once; `None` (the future dropped) otherwise.
/// Only for cancel-safe futures.
fn ready<F: std::future::Future>(future: F) -> Option<F::Output> {
    let future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// How long shutdown (or halting) waits for Kafka to acknowledge what is in flight.
const DRAIN_DEADLINE: Duration = Duration::from_secs(7);

/// One session's pipeline: source `S`, sink `K`, and the watermark between them.
pub struct Pipeline<S: Source, K> {
    source: S,
    sink: K,
    watermark: Arc<Watermark<S::Position>>,
    router: Router,
    on_invalid: OnInvalid,
    metrics: Metrics,
}

impl<S: Source, K: Sink<S::Position>> Pipeline<S, K> {
    /// `watermark` is the one `sink`'s acknowledgements arrive on.
    pub fn new(
        source: S,
        sink: K,
        watermark: Arc<Watermark<S::Position>>,
        router: Router,
        on_invalid: OnInvalid,
        metrics: Metrics,
    ) -> Self {
        Self {
            source,
            sink,
            watermark,
            router,
            on_invalid,
            metrics,
        }
    }

    /// Runs until shutdown (Ok, after [`Source::finish`]) or a fault (Err). The caller then
    /// calls [`Self::end`] with the result.
    pub async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), SessionError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        // Registered once, not once per event.
        let shutdown_signal = shutdown.cancelled();
        tokio::pin!(shutdown_signal);
        let lost_token = self.source.lost();
        let lost = lost_token.cancelled();
        tokio::pin!(lost);
        loop {
            if stopping && self.source.at_boundary() {
                return self.finish().await;
            }
            tokio::select! {
                biased;
                // 1. Shutdown: stop taking transactions at the next boundary.
                _ = &mut shutdown_signal, if !stopping => {
                    tracing::info!("shutting down: finishing the open transaction, draining and confirming");
                    stopping = true;
                }
                // 2. The source's connection or leadership is gone.
                _ = &mut lost => return Err(self.source.lost_error().into()),
                // 3. Records Kafka refused for their content go to the dead-letter topic.
                Some(refused) = self.sink.refused() => {
                    self.sink.redirect(refused, &self.router).await?;
                }
                // 4. Confirm what Kafka has acknowledged; surface delivery failures.
                _ = tick.tick() => {
                    if self.source.at_boundary() {
                        self.sink.at_boundary(&self.router).await?;
                    }
                    self.confirm().await?;
                    if let Some(failure) = self.sink.failure() {
                        return Err(SinkError::Delivery(failure).into());
                    }
                }
                // 5. New data, and what is ready behind it.
                input = self.source.next() => {
                    self.handle(input).await?;
                    for _ in 1..READY_RUN {
                        // A lost source is seen by the select at the latest after the run.
                        if stopping && self.source.at_boundary() {
                            break;
                        }
                        match ready(self.source.next()) {
                            Some(input) => self.handle(input).await?,
                            None => {
                                self.sink.caught_up();
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Publishes one input of the source and what follows from it.
    async fn handle(
        &mut self,
        input: Result<S::Input, crate::source::SourceError>,
    ) -> Result<(), SessionError> {
        let mut out = Publisher::new(
            &mut self.sink,
            &self.watermark,
            &self.router,
            self.on_invalid,
        );
        self.source.pump(input?, &mut out).await?;
        let idle = out.confirm_now();
        if self.source.at_boundary() {
            self.sink.at_boundary(&self.router).await?;
        } else {
            self.sink.within_transaction(&self.router).await?;
        }
        if let Some(idle) = idle {
            self.source.confirm(Some(idle)).await?;
        }
        Ok(())
    }

    /// Has the source confirm what is acknowledged; refreshes the pipeline's gauges.
    async fn confirm(&mut self) -> Result<(), SessionError> {
        let (acked, inflight, oldest) = {
            let mut checkpoint = self.watermark.lock();
            (
                checkpoint.take_confirmable(),
                checkpoint.inflight(),
                checkpoint.oldest_committed_at(),
            )
        };
        // Also when nothing new was acknowledged: the source may confirm more by itself.
        self.source.confirm(acked).await?;
        self.metrics.inflight_events.set(inflight as i64);
        let age = oldest.map_or(0, |at| at.elapsed().as_secs() as i64);
        self.metrics.oldest_pending_event_age.set(age);
        self.metrics.replication_lag_seconds.set(age);
        self.metrics
            .producer_queue_depth
            .set(self.sink.queue_depth() as i64);
        Ok(())
    }

    /// Shutdown at a boundary: drains every ack, then confirms the final position.
    async fn finish(&mut self) -> Result<(), SessionError> {
        self.sink
            .drain(&self.router, Instant::now() + DRAIN_DEADLINE)
            .await?;
        Ok(self.source.finish(&self.watermark).await?)
    }

    /// Ends the session after [`Self::run`] returned `result`: stops the source's watchers;
    /// after a definite error delivers what precedes the cause (those events were produced
    /// before it) and confirms everything acknowledged, so that fixing the cause and
    /// restarting resends nothing (the transaction holding the cause is never sealed, so the
    /// watermark stops before it); after any fault drops what the sink still holds.
    pub async fn end(&mut self, result: &Result<(), SessionError>) {
        self.source.stop().await;
        match result {
            Ok(()) => {}
            Err(e) if e.is_definite() => {
                if let Err(error) = self
                    .sink
                    .drain(&self.router, Instant::now() + DRAIN_DEADLINE)
                    .await
                {
                    tracing::warn!(error = %error_chain(&error), "cannot drain before halting");
                }
                self.source.settle(&self.watermark).await;
                self.sink.purge();
                self.sink.abort().await;
                self.source.abort();
            }
            Err(_) => {
                self.sink.purge();
                self.sink.abort().await;
                self.source.abort();
            }
        }
    }
}
