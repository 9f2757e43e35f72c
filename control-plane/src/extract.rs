//! Request extractors whose rejections are problem+json, never axum's plain-text defaults.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;
use tollgate_shared::{FieldError, ValidationErrors};

use crate::error::ApiError;

/// Largest admin request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A JSON body: `Content-Type: application/json` (or any `+json` type) required, malformed
/// JSON is 400, JSON of the wrong shape is 422 naming the field, too large is 413.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_body(request, state, false).await?;
        parse(&bytes).map(ApiJson)
    }
}

/// Like [`ApiJson`], but an empty body (with or without a content type) reads as `{}`.
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_body(request, state, true).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return parse(b"{}").map(OptionalJson);
        }
        parse(&bytes).map(OptionalJson)
    }
}

async fn json_body<S: Send + Sync>(
    request: Request,
    state: &S,
    empty_ok: bool,
) -> Result<Bytes, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let is_json = content_type.as_deref().is_some_and(|ct| {
        ct == "application/json" || (ct.starts_with("application/") && ct.ends_with("+json"))
    });
    let bytes = Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(MAX_BODY_BYTES)
            } else {
                ApiError::BadRequest(format!("could not read the request body: {rejection}"))
            }
        })?;
    let empty_allowed = empty_ok && bytes.is_empty();
    if !(is_json || empty_allowed) {
        return Err(ApiError::UnsupportedMediaType(format!(
            "expected 'Content-Type: application/json', got {}",
            content_type.map_or("none".to_string(), |ct| format!("'{ct}'"))
        )));
    }
    Ok(bytes)
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        if error.inner().classify() == serde_json::error::Category::Data {
            let errors = data_error(error);
            ApiError::Unprocessable {
                detail: errors.to_string(),
                errors: errors.0,
            }
        } else {
            ApiError::BadRequest(format!("malformed JSON: {}", error.into_inner()))
        }
    })
}

/// Decodes an already parsed JSON value (e.g. a merged patch), naming the offending field.
pub fn decode_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ValidationErrors> {
    serde_path_to_error::deserialize(value).map_err(data_error)
}

fn data_error(error: serde_path_to_error::Error<serde_json::Error>) -> ValidationErrors {
    let path = error.path().to_string();
    let field = if path == "." { String::new() } else { path };
    ValidationErrors(vec![FieldError {
        field,
        message: error.into_inner().to_string(),
    }])
}
