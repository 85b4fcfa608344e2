//! The HTTP operating surface on `agent.health_addr`:
//! - `/health`: 200 while the process runs (liveness);
//! - `/ready`: 200 when the source is connected, every sink applies and none lags more than
//!   `agent.ready_max_lag`; 503 with the reasons as JSON otherwise (readiness);
//! - `/status`: JSON of where the source and each sink stand, and the log's size;
//! - `/metrics`: Prometheus text.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::log::OffsetLog;
use crate::pipeline::PipelineError;
use crate::telemetry::{SinkStatus, SourceStatus, Telemetry};

/// What the endpoints read.
#[derive(Clone)]
pub struct Surface {
    pub telemetry: Arc<Telemetry>,
    pub log: Arc<OffsetLog>,
    /// The configured sinks, each of which must apply for the agent to be ready.
    pub sinks: Vec<String>,
    pub ready_max_lag: Duration,
}

pub async fn serve(
    listener: TcpListener,
    surface: Surface,
    stop: CancellationToken,
) -> Result<(), PipelineError> {
    let addr = listener.local_addr().ok();
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(surface);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|source| PipelineError::Health {
            addr: addr.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()),
            source,
        })
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    reasons: Vec<String>,
}

async fn ready(State(surface): State<Surface>) -> impl IntoResponse {
    let reasons = surface
        .telemetry
        .not_ready(&surface.sinks, surface.ready_max_lag);
    let code = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Readiness {
            ready: reasons.is_empty(),
            reasons,
        }),
    )
}

#[derive(Serialize)]
struct Status {
    source: SourceStatus,
    sinks: std::collections::BTreeMap<String, SinkStatus>,
    log: LogStatus,
}

#[derive(Serialize)]
struct LogStatus {
    bytes: u64,
    /// Position of the last durable record.
    durable_position: u64,
    durable_lsn: String,
}

async fn status(State(surface): State<Surface>) -> impl IntoResponse {
    let durable = surface.log.durable();
    Json(Status {
        source: surface.telemetry.source(),
        sinks: surface.telemetry.sinks(),
        log: LogStatus {
            bytes: surface.log.size_on_disk(),
            durable_position: durable.seq,
            durable_lsn: durable.end_position.to_string(),
        },
    })
}

async fn metrics(State(surface): State<Surface>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        surface.telemetry.render_metrics(surface.log.size_on_disk()),
    )
}
