//! The HTTP operating surface on `agent.health_addr`: `/health` answers 200 while the process
//! runs, so an orchestrator's liveness probe can tell a hung or dead agent from a live one.

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pipeline::PipelineError;

pub async fn serve(listener: TcpListener, stop: CancellationToken) -> Result<(), PipelineError> {
    let addr = listener.local_addr().ok();
    let app = Router::new().route("/health", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|source| PipelineError::Health {
            addr: addr.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()),
            source,
        })
}
