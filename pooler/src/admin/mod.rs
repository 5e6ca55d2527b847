//! Operating the pooler. Over HTTP (this module): liveness and readiness for
//! Kubernetes, Prometheus metrics, `GET /v1/pools` (the `SHOW POOLS` numbers as JSON)
//! and `POST /v1/reload`. Over the Postgres protocol: the [`console`].
//!
//! The HTTP listener has no authentication of its own: keep it on the cluster's
//! network (probes, scrapes), never exposed to app namespaces.

pub mod console;
pub mod listener;
pub mod tables;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::auth::cache::VerifierCache;
use crate::shared::Shared;

#[derive(Clone)]
pub struct AdminState {
    pub cache: Arc<VerifierCache>,
    /// Set when shutdown starts: a draining pooler is alive but not ready.
    pub draining: Arc<AtomicBool>,
    pub shared: Arc<Shared>,
}

/// The whole admin HTTP surface.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/pools", get(pools))
        .route("/v1/replicas", get(replicas))
        .route("/v1/reload", post(reload))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let shared = &state.shared;
    let replicas = shared.replicas.stats().sample();
    match shared
        .metrics
        .render(&shared.pools.stats(), &shared.roles.samples(), &replicas)
    {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
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

/// One object per role, with `SHOW POOLS`'s columns as keys.
async fn pools(State(state): State<AdminState>) -> Response {
    axum::Json(tables::pools(&state.shared).to_json()).into_response()
}

/// This replica's share of the cluster's budget and every live replica's.
async fn replicas(State(state): State<AdminState>) -> Response {
    axum::Json(tables::replicas_json(&state.shared)).into_response()
}

/// Re-reads the configuration: 200 with what was applied and what takes a restart, or
/// 400 problem+json with the reason (the configuration in force is unchanged).
async fn reload(State(state): State<AdminState>) -> Response {
    match crate::reload::reload(&state.shared).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => {
            let (status, title) = match e {
                crate::reload::ReloadError::NoSource => (StatusCode::CONFLICT, "nothing to reload"),
                _ => (StatusCode::BAD_REQUEST, "invalid configuration"),
            };
            let body = serde_json::json!({
                "type": "about:blank",
                "title": title,
                "status": status.as_u16(),
                "detail": e.to_string(),
            });
            (
                status,
                [(header::CONTENT_TYPE, "application/problem+json")],
                body.to_string(),
            )
                .into_response()
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
    } else if !state.shared.replicas.registered() {
        // No share of the budget yet: it could serve nobody. Stays so when the
        // registry is missing (sql/0002 not applied), which the log says.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not registered as a replica yet\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}
