//! The HTTP API: [`app`] builds the whole surface, so tests drive it with `oneshot`
//! and `serve` binds it to a socket.

mod auth;
mod error;
mod openapi;
mod routes;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use tracing::Instrument;

pub use error::{ApiError, CODES as PROBLEM_CODES};

use crate::config::{ApiToken, PublicEndpoint};
use crate::ddl::Provisioner;
use crate::metrics::Metrics;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub provisioner: Provisioner,
    pub token: Arc<ApiToken>,
    pub public: Arc<PublicEndpoint>,
    pub metrics: Metrics,
}

/// The request id: the caller's `x-request-id` when it is short and plain, else a new
/// UUID. It goes to the audit log, the log lines and the response header.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

const REQUEST_ID: &str = "x-request-id";

/// The whole HTTP surface of the provisioner.
pub fn app(state: AppState) -> Router {
    let app_path = "/v1/apps/{tenant_id}/{slug}/{env}";
    Router::new()
        .route("/v1/apps", get(routes::list))
        .route(
            app_path,
            put(routes::ensure)
                .get(routes::get_app)
                .patch(routes::set_limits)
                .delete(routes::delete),
        )
        .route(&format!("{app_path}/rotate-password"), post(routes::rotate))
        .route(&format!("{app_path}/suspend"), post(routes::suspend))
        .route(&format!("{app_path}/resume"), post(routes::resume))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::spec))
        .route_layer(middleware::from_fn_with_state(state.clone(), observe))
        .fallback(routes::not_found)
        .with_state(state)
}

/// Request id, a span for the request's log lines, and the HTTP metrics.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(request_id.clone()));

    let span =
        tracing::info_span!("request", method = %method, route = %route, request_id = %request_id);
    let started = Instant::now();
    let mut response = error::as_problem(next.run(req).instrument(span.clone()).await).await;
    let elapsed = started.elapsed();

    let status = response.status().as_u16().to_string();
    state
        .metrics
        .http_requests
        .with_label_values(&[method.as_str(), route.as_str(), status.as_str()])
        .inc();
    state
        .metrics
        .http_duration
        .with_label_values(&[method.as_str(), route.as_str()])
        .observe(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(status = %status, elapsed_ms = elapsed.as_millis() as u64, "request done");
    });
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}
