//! The bearer-token extractor: a handler that takes [`Authorized`] only runs for a
//! request that presented the configured token.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;

/// Proof that the request carried the right `Authorization: Bearer <token>`.
pub struct Authorized;

impl FromRequestParts<AppState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            });
        match presented {
            Some(token) if state.token.matches(token) => Ok(Authorized),
            _ => Err(ApiError::Unauthorized),
        }
    }
}
