//! The relay's lifecycle: start the endpoints and background checks, then run source
//! sessions until shutdown.
//!
//! Start order: metrics and state, the HTTP endpoints (so probes answer from the first
//! second), the Postgres pool, the health monitor, then the session loop. A session that ends
//! on a transient fault is restarted from the confirmed position with backoff, forever; one
//! that finds the replication slot busy makes this relay a ready standby that retries every
//! second or two; a definite error (something the operator must fix) halts the relay with
//! the fix in the log and `/status`. Which is which is [`crate::policy`]'s to say.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SourceMode};
use crate::error::error_chain;
use crate::metrics::Metrics;
use crate::pipeline;
use crate::policy::{self, Directive};
use crate::postgres::PgError;
use crate::route::Router;
use crate::sink::kafka;
use crate::source::logical::Logical;
use crate::source::polling::Polling;
use crate::source::{Report, Session, SourceError};
use crate::status::RelayState;

/// First retry delay after a transient fault; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a standby tries to take the slot: well inside the 10 s takeover promise.
const STANDBY_RETRY: Duration = Duration::from_millis(1500);
/// How often reachability and slot statistics are refreshed.
const MONITOR_INTERVAL: Duration = Duration::from_secs(2);
/// How often a halted relay's loop wakes while it waits for the operator.
const IDLE_WAKEUP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config")]
    Config(#[source] crate::config::ConfigError),
    #[error(transparent)]
    Pool(#[from] crate::postgres::PoolError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Session(#[from] pipeline::SessionError),
}

/// A setup step of a command failed: the same error a session would end with.
impl From<PgError> for RunError {
    fn from(e: PgError) -> Self {
        Self::Source(e.into())
    }
}

/// Runs the relay until `shutdown` is cancelled (Ok) or a definite error stops it.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    run_with(config, Metrics::new(), shutdown).await
}

/// [`run`] with the caller's metrics, so an embedding (the demo, tests) can watch them.
pub async fn run_with(
    config: Config,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    let state = Arc::new(RelayState::default());

    let http_stop = CancellationToken::new();
    let addr = crate::http::serve(
        config.http.listen,
        Arc::clone(&state),
        metrics.clone(),
        http_stop.clone(),
    )
    .await
    .map_err(|source| RunError::Listen {
        addr: config.http.listen,
        source,
    })?;
    tracing::info!(%addr, "http endpoints listening");

    let pool = crate::postgres::pool(&config)?;
    let monitor_stop = CancellationToken::new();
    let monitor_task = monitor(
        Arc::clone(&config),
        pool.clone(),
        metrics.clone(),
        Arc::clone(&state),
        monitor_stop.clone(),
    );
    let monitor_state = Arc::clone(&state);
    tokio::spawn(async move { monitor_state.monitor.run(monitor_task).await });

    let template = config.kafka.topic_template().map_err(RunError::Config)?;
    let router = Router::new(
        &template,
        &config.kafka.dead_letter_topic,
        kafka::max_message_bytes(&config.kafka),
    )
    .with_reserved_counter(metrics.reserved_headers_dropped.clone());
    let session = Session {
        config: Arc::clone(&config),
        pool,
        metrics: metrics.clone(),
        router,
        report: Arc::clone(&state) as Arc<dyn Report>,
    };
    let result = state
        .pipeline
        .run(sessions(&session, &state, &shutdown))
        .await;
    monitor_stop.cancel();
    http_stop.cancel();
    result
}

/// The sources report their progress into the relay's state, which `/status` shows.
impl Report for RelayState {
    fn set_position(&self, position: String) {
        RelayState::set_position(self, position);
    }

    fn set_horizon_held_back(&self, problem: Option<String>) {
        RelayState::set_horizon_held_back(self, problem);
    }
}

async fn sessions(
    session: &Session,
    state: &Arc<RelayState>,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let mut backoff = MIN_BACKOFF;
    let mut first = true;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if !first {
            session.metrics.source_reconnects.inc();
        }
        first = false;
        let started = std::time::Instant::now();
        let result = match session.config.source.mode {
            SourceMode::Logical => pipeline::run_session::<Logical>(session, state, shutdown).await,
            SourceMode::Polling => pipeline::run_session::<Polling>(session, state, shutdown).await,
        };
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let wait = match policy::directive(&e) {
            Directive::Halt { .. } => {
                // Stay up, not ready, saying why: the operator reads it in the log,
                // `/status` and `/readyz`, and a restart loop would only hide it.
                let text = e.to_string();
                tracing::error!(error = %text, "relay halted: needs the operator");
                state.set_halted(text);
                session.metrics.halted.set(1);
                // Wake now and then: the heartbeat shows `/healthz` the loop is alive.
                while tokio::time::timeout(IDLE_WAKEUP, shutdown.cancelled())
                    .await
                    .is_err()
                {}
                return Err(e.into());
            }
            Directive::Standby => {
                tracing::debug!(reason = %e, "standing by: another relay leads");
                state.set_source_ok(true);
                first = true;
                STANDBY_RETRY
            }
            Directive::Retry => {
                let text = error_chain(&e);
                tracing::warn!(error = %text, retry_in_ms = backoff.as_millis() as u64, "source session failed; resuming from the confirmed position");
                state.set_error(Some(text));
                state.set_source_ok(false);
                if started.elapsed() > MAX_BACKOFF {
                    backoff = MIN_BACKOFF;
                }
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Refreshes reachability and slot statistics for `/readyz`, `/status` and the gauges.
async fn monitor(
    config: Arc<Config>,
    pool: Pool,
    metrics: Metrics,
    state: Arc<RelayState>,
    stop: CancellationToken,
) {
    // A plain client only for metadata requests: reachability, not producing.
    let kafka_probe: Option<Arc<BaseConsumer>> = kafka::admin_config(&config.kafka)
        .create()
        .ok()
        .map(Arc::new);
    let slot = config.source.slot.clone();
    let mut last_wal_status = String::new();
    let logical = config.source.mode == SourceMode::Logical;
    loop {
        let pg_ok = tokio::time::timeout(MONITOR_INTERVAL * 2, async {
            match pool.get().await {
                Ok(conn) => {
                    let row = conn
                        .query_opt(
                            "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, \
                                (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, wal_status, \
                                confirmed_flush_lsn::text \
                         FROM pg_replication_slots WHERE slot_name = $1",
                            &[&slot],
                        )
                        .await;
                    match row {
                        Ok(row) => {
                            let (retained, lag, wal_status, confirmed) = row
                                .map(|r| {
                                    (
                                        r.get::<_, Option<i64>>(0),
                                        r.get::<_, Option<i64>>(1),
                                        r.get::<_, Option<String>>(2),
                                        r.get::<_, Option<String>>(3),
                                    )
                                })
                                .unwrap_or((None, None, None, None));
                            if let Some(status) = wal_status {
                                metrics.set_wal_status(&status);
                                if logical {
                                    watch_wal_status(
                                        &slot,
                                        &status,
                                        confirmed.as_deref(),
                                        &mut last_wal_status,
                                        &state,
                                        &metrics,
                                    );
                                }
                            }
                            if let Some(bytes) = retained {
                                metrics.slot_retained_wal_bytes.set(bytes);
                            }
                            if let Some(bytes) = lag {
                                metrics.replication_lag_bytes.set(bytes);
                            }
                            state.set_slot_stats(retained, lag);
                            true
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "monitor query failed");
                            false
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "postgres unreachable");
                    false
                }
            }
        })
        .await
        .unwrap_or(false);
        state.set_postgres_ok(pg_ok);
        if let Some(probe) = &kafka_probe {
            let probe = Arc::clone(probe);
            let ok = tokio::task::spawn_blocking(move || {
                probe
                    .fetch_metadata(None, Duration::from_secs(3))
                    .map(|m| !m.brokers().is_empty())
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            state.set_kafka_ok(ok);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(MONITOR_INTERVAL) => {}
        }
    }
}

/// Reacts to the slot's `wal_status` changing. `unreserved` (more WAL held than
/// `max_slot_wal_keep_size`) is a warning: the next checkpoint may remove it. `lost` is a
/// definite error whatever the session is doing (it may be waiting for a topic and not
/// reading the stream): the relay reports it halted with the way out.
fn watch_wal_status(
    slot: &str,
    status: &str,
    confirmed: Option<&str>,
    last: &mut String,
    state: &RelayState,
    metrics: &Metrics,
) {
    if status == last {
        return;
    }
    *last = status.to_owned();
    match status {
        "unreserved" => tracing::warn!(
            slot,
            "the slot holds more WAL than max_slot_wal_keep_size: it is lost at the next checkpoint unless the relay catches up"
        ),
        "lost" => {
            let text = crate::postgres::setup::slot_lost(slot, confirmed).to_string();
            tracing::error!(error = %text, "relay halted: needs the operator");
            state.set_halted(text);
            metrics.halted.set(1);
        }
        _ => {}
    }
}
