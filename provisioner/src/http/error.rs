//! `ApiError`: every failure the API reports, as `application/problem+json` (RFC 9457)
//! with a stable `code`. Internals are logged here and never shown to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::ddl::ProvisionError;
use crate::names::NameError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("{0}")]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    InvalidBody(String),
    #[error("{0}")]
    InvalidLimits(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the database is unavailable; retry later")]
    Unavailable,
    #[error("internal error; the request id is in the x-request-id header and the server log")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::InvalidName(_) | ApiError::InvalidBody(_) | ApiError::InvalidLimits(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::InvalidName(_) => "invalid_name",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::InvalidLimits(_) => "invalid_limits",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unavailable => "database_unavailable",
            ApiError::Internal => "internal",
        }
    }
}

impl From<ProvisionError> for ApiError {
    fn from(e: ProvisionError) -> Self {
        match e {
            ProvisionError::NotFound(name) => ApiError::NotFound(format!("no app named {name}")),
            ProvisionError::Conflict(msg) => ApiError::Conflict(msg),
            ProvisionError::InvalidLimits(msg) => ApiError::InvalidLimits(msg),
            ProvisionError::Unavailable(msg) | ProvisionError::Transient(msg) => {
                tracing::warn!(error = %msg, "database unavailable");
                ApiError::Unavailable
            }
            other => {
                tracing::error!(error = %other, "provisioning failed");
                ApiError::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = problem(self.status(), self.code(), &self.to_string());
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// An `application/problem+json` response.
pub fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("urn:dataplane:problem:{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// Every `code` a response can carry: the API's own, then those of [`as_problem`].
/// The OpenAPI document's `Problem.code` enum must list exactly these (a test checks).
pub const CODES: &[&str] = &[
    "unauthorized",
    "invalid_name",
    "invalid_body",
    "invalid_limits",
    "not_found",
    "conflict",
    "database_unavailable",
    "internal",
    "bad_request",
    "method_not_allowed",
    "payload_too_large",
];

/// The code of an error the HTTP layer made before a handler ran. The statuses it can
/// make here: 400 (an undecodable path segment or query string), 405 (a method the path
/// lacks), 413 (a body past `DefaultBodyLimit`'s 2 MiB); handlers read bodies as bytes,
/// so no content type is ever refused. Anything else maps to the nearest code.
fn framework_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::NOT_FOUND => "not_found",
        _ if status.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// Errors axum produces before a handler runs (an undecodable path, a bad query
/// string, a wrong method) arrive as plain text; clients get problem+json for every
/// failure, so those are rewritten here with a code derived from the status.
pub async fn as_problem(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let code = framework_code(status);
    let allow = response.headers().get(header::ALLOW).cloned();
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let detail = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error"),
        t => t,
    };
    let mut out = problem(status, code, detail);
    if let Some(allow) = allow {
        out.headers_mut().insert(header::ALLOW, allow);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_made_is_listed() {
        let errors = [
            ApiError::Unauthorized,
            ApiError::InvalidName(crate::names::NameError::Env(String::new())),
            ApiError::InvalidBody(String::new()),
            ApiError::InvalidLimits(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::Conflict(String::new()),
            ApiError::Unavailable,
            ApiError::Internal,
        ];
        for e in &errors {
            assert!(CODES.contains(&e.code()), "{}", e.code());
        }
        for status in 400..600u16 {
            let status = StatusCode::from_u16(status).unwrap();
            let code = framework_code(status);
            assert!(CODES.contains(&code), "{status}: {code}");
        }
    }
}
