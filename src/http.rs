//! The HTTP endpoints of SPEC §6: `/healthz`, `/readyz`, `/status`, `/metrics`.
//!
//! `/healthz` is liveness: 200 while the session loop and the monitor are alive (polled within
//! [`crate::status::HEARTBEAT_STALE_AFTER`]), 503 naming the loop that ended or is wedged. A
//! halted relay is alive (it waits for the operator), so only `/readyz` fails for it.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::status::RelayState;

#[derive(Clone)]
struct AppState {
    state: Arc<RelayState>,
    metrics: Metrics,
}

/// Binds `listen` and serves until `shutdown` is cancelled. Returns the bound address (port 0
/// picks a free one).
pub async fn serve(
    listen: SocketAddr,
    state: Arc<RelayState>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(state, metrics);
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = result {
            tracing::error!(error = %error, "http server failed");
        }
    });
    Ok(addr)
}

fn router(state: Arc<RelayState>, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { state, metrics })
}

async fn healthz(State(app): State<AppState>) -> impl IntoResponse {
    match app.state.health(std::time::Instant::now()) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        ),
    }
}

async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    let report = app.state.report();
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report))
}

async fn status(State(app): State<AppState>) -> impl IntoResponse {
    Json(app.state.report())
}

async fn metrics_text(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    async fn healthz_of(state: RelayState) -> String {
        let stop = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(state),
            Metrics::new(),
            stop.clone(),
        )
        .await
        .unwrap();
        let response = get(addr, "/healthz").await;
        stop.cancel();
        response
    }

    #[tokio::test]
    async fn healthz_fails_when_a_loop_is_wedged_or_ended() {
        let alive = RelayState::default();
        alive.pipeline.beat();
        alive.monitor.beat();
        let response = healthz_of(alive).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");

        let wedged = RelayState::with_pipeline(crate::status::Heartbeat::stale());
        wedged.monitor.beat();
        let response = healthz_of(wedged).await;
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(
            response.contains("pipeline loop not polled for"),
            "{response}"
        );

        let ended = RelayState::default();
        ended.pipeline.beat();
        ended.monitor.run(async {}).await;
        let response = healthz_of(ended).await;
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(response.contains("monitor loop ended"), "{response}");
    }
}
