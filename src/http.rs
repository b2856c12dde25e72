//! The HTTP endpoints of SPEC §6: `/healthz`, `/readyz`, `/status`, `/metrics`.

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
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { state, metrics });
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
