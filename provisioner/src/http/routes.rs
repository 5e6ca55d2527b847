//! The handlers. Each validates names first (422 before anything touches the
//! database), then calls one provisioning operation and maps its outcome.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::Authorized;
use super::error::ApiError;
use super::{AppState, RequestId};
use crate::ddl::execute::DeleteOutcome;
use crate::ddl::{EnsureOutcome, LimitsPatch, OpContext, ProvisionError};
use crate::names::{AppName, TenantId};
use crate::view::{AppList, AppView};

type AppPath = Path<(String, String, String)>;

fn app_name(Path((tenant, slug, env)): AppPath) -> Result<AppName, ApiError> {
    Ok(AppName::parse(&tenant, &slug, &env)?)
}

fn ctx(request_id: &RequestId) -> OpContext {
    OpContext {
        request_id: Some(request_id.0.clone()),
    }
}

/// An optional JSON body: empty means "no limits given".
fn limits_body(body: &Bytes, required: bool) -> Result<LimitsPatch, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        if required {
            return Err(ApiError::InvalidBody(
                "a JSON object of limits is required".into(),
            ));
        }
        return Ok(LimitsPatch::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidBody(format!("invalid limits JSON: {e}")))
}

/// Counts the operation's outcome and maps its error.
fn counted<T>(
    state: &AppState,
    op: &str,
    result: Result<T, ProvisionError>,
    outcome: impl Fn(&T) -> &'static str,
) -> Result<T, ApiError> {
    let label = match &result {
        Ok(v) => outcome(v),
        Err(ProvisionError::NotFound(_)) => "not_found",
        Err(ProvisionError::Conflict(_)) => "conflict",
        Err(ProvisionError::InvalidLimits(_)) => "invalid",
        Err(ProvisionError::Unavailable(_) | ProvisionError::Transient(_)) => "unavailable",
        Err(_) => "error",
    };
    state
        .metrics
        .operations
        .with_label_values(&[op, label])
        .inc();
    result.map_err(ApiError::from)
}

pub async fn ensure(
    _: Authorized,
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    path: AppPath,
    body: Bytes,
) -> Result<Response, ApiError> {
    let name = app_name(path)?;
    let patch = limits_body(&body, false)?;
    let result = state.provisioner.ensure(&name, &patch, &ctx(&rid)).await;
    let outcome = counted(&state, "ensure", result, |o| match o {
        EnsureOutcome::Created { .. } => "created",
        EnsureOutcome::Existing { .. } => "existing",
    })?;
    Ok(match outcome {
        EnsureOutcome::Created { record, password } => (
            StatusCode::CREATED,
            no_store(),
            Json(AppView::new(record, &state.public, Some(&password))),
        )
            .into_response(),
        EnsureOutcome::Existing { record } => {
            Json(AppView::new(record, &state.public, None)).into_response()
        }
    })
}

pub async fn get_app(
    _: Authorized,
    State(state): State<AppState>,
    path: AppPath,
) -> Result<Json<AppView>, ApiError> {
    let name = app_name(path)?;
    let result = state.provisioner.get(&name).await;
    let record = counted(&state, "get", result, |_| "ok")?;
    Ok(Json(AppView::new(record, &state.public, None)))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    tenant_id: Option<String>,
}

pub async fn list(
    _: Authorized,
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<AppList>, ApiError> {
    let tenant = q.tenant_id.as_deref().map(TenantId::parse).transpose()?;
    let result = state.provisioner.list(tenant).await;
    let records = counted(&state, "list", result, |_| "ok")?;
    Ok(Json(AppList::new(records, &state.public)))
}

pub async fn rotate(
    _: Authorized,
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    path: AppPath,
) -> Result<Response, ApiError> {
    let name = app_name(path)?;
    let result = state.provisioner.rotate(&name, &ctx(&rid)).await;
    let out = counted(&state, "rotate", result, |_| "ok")?;
    Ok((
        no_store(),
        Json(AppView::new(out.record, &state.public, Some(&out.password))),
    )
        .into_response())
}

pub async fn suspend(
    _: Authorized,
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    path: AppPath,
) -> Result<Json<AppView>, ApiError> {
    set_disabled(state, rid, path, true).await
}

pub async fn resume(
    _: Authorized,
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    path: AppPath,
) -> Result<Json<AppView>, ApiError> {
    set_disabled(state, rid, path, false).await
}

async fn set_disabled(
    state: AppState,
    rid: RequestId,
    path: AppPath,
    disabled: bool,
) -> Result<Json<AppView>, ApiError> {
    let name = app_name(path)?;
    let op = if disabled { "suspend" } else { "resume" };
    let result = state
        .provisioner
        .set_disabled(&name, disabled, &ctx(&rid))
        .await;
    let record = counted(&state, op, result, |_| "ok")?;
    Ok(Json(AppView::new(record, &state.public, None)))
}

pub async fn set_limits(
    _: Authorized,
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    path: AppPath,
    body: Bytes,
) -> Result<Json<AppView>, ApiError> {
    let name = app_name(path)?;
    let patch = limits_body(&body, true)?;
    let result = state
        .provisioner
        .set_limits(&name, &patch, &ctx(&rid))
        .await;
    let record = counted(&state, "set_limits", result, |_| "ok")?;
    Ok(Json(AppView::new(record, &state.public, None)))
}

pub async fn delete(
    _: Authorized,
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    path: AppPath,
) -> Result<StatusCode, ApiError> {
    let name = app_name(path)?;
    let result = state.provisioner.delete(&name, &ctx(&rid)).await;
    counted(&state, "delete", result, |o| match o {
        DeleteOutcome::Deleted => "deleted",
        DeleteOutcome::AlreadyGone => "already_gone",
    })?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.provisioner.ping().await.map_err(|e| {
        tracing::warn!(error = %e, "not ready");
        ApiError::Unavailable
    })?;
    Ok("ready\n")
}

pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = state.metrics.render().map_err(|e| {
        tracing::error!(error = %e, "rendering metrics");
        ApiError::Internal
    })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// A response carrying a password must not be cached by anything in between.
fn no_store() -> [(header::HeaderName, &'static str); 1] {
    [(header::CACHE_CONTROL, "no-store")]
}
