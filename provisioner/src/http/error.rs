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
            ProvisionError::Unavailable(msg) => {
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
        let status = self.status();
        let body = serde_json::json!({
            "type": format!("urn:dataplane:problem:{}", self.code()),
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "code": self.code(),
            "detail": self.to_string(),
        });
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, ApiError::Unauthorized) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
