//! The admin HTTP listener: liveness and readiness for Kubernetes, Prometheus metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::auth::cache::VerifierCache;

#[derive(Clone)]
pub struct AdminState {
    pub cache: Arc<VerifierCache>,
    /// Set when shutdown starts: a draining pooler is alive but not ready.
    pub draining: Arc<AtomicBool>,
    pub shared: Arc<crate::shared::Shared>,
}

/// The whole admin HTTP surface.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let shared = &state.shared;
    match shared.metrics.render(&shared.pools.stats(), &shared.roles) {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n").into_response()
        }
    }
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !state.cache.is_listening() {
        // Without the LISTEN connection Postgres is unreachable, or revocations would
        // go unnoticed: either way, send no new clients here.
        (StatusCode::SERVICE_UNAVAILABLE, "postgres unreachable\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
