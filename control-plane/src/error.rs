//! The one place where control-plane errors become responses: RFC 9457 problem+json.
//!
//! Unexpected errors are logged with their cause and answered with a 500 that shows no
//! internals; everything a client can cause maps to a 4xx with a useful `detail`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tollgate_shared::FieldError;
use utoipa::ToSchema;

use crate::store::StoreError;

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"type": "about:blank", "title": "Unprocessable Content", "status": 422,
    "code": "validation_failed", "detail": "paths[0]: must start with '/'",
    "errors": [{"field": "paths[0]", "message": "must start with '/'"}]}))]
pub struct Problem {
    /// Always `about:blank`: `code` carries the machine-readable kind.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The HTTP status phrase.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// Stable machine-readable error code.
    pub code: &'static str,
    /// What went wrong, for a human.
    pub detail: String,
    /// Every field problem, for validation failures.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Everything an admin API handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request cannot be understood (malformed JSON, bad parameter).
    #[error("{0}")]
    BadRequest(String),
    /// 401: no valid admin token.
    #[error("a valid admin token is required: send 'Authorization: Bearer <token>'")]
    Unauthorized,
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409: clashes with existing state.
    #[error("{0}")]
    Conflict(String),
    /// 413.
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// 415.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed JSON that is not a valid resource.
    #[error("{detail}")]
    Unprocessable {
        /// summary
        detail: String,
        /// each problem with its field path
        errors: Vec<FieldError>,
    },
    /// 503: the limiter's Redis is not configured or unreachable.
    #[error("{0}")]
    LimiterUnavailable(String),
    /// 503: the store is unreachable.
    #[error("the config store is unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// 500: a bug or an unexpected failure; details are logged, not returned.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::Unprocessable { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            Self::LimiterUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "limiter_unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { .. } => Self::NotFound(error.to_string()),
            StoreError::Conflict(detail) => Self::Conflict(detail),
            StoreError::Invalid(errors) => Self::Unprocessable {
                detail: errors.to_string(),
                errors: errors.0,
            },
            StoreError::Database(
                db @ (sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed),
            ) => Self::Unavailable(db.into()),
            other => Self::Internal(other.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            Self::Internal(source) => tracing::error!(error = ?source, "admin API request failed"),
            Self::Unavailable(source) => {
                tracing::warn!(error = %source, "config store unavailable")
            }
            _ => {}
        }
        let errors = match &self {
            Self::Unprocessable { errors, .. } => errors.clone(),
            _ => Vec::new(),
        };
        let problem = Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            code,
            detail: self.to_string(),
            errors,
        };
        let mut response = (status, axum::Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, Self::PayloadTooLarge(_)) {
            // The rest of the body is never read: the connection cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
            );
        }
        response
    }
}
