//! `GET /admin/v1/config` exports the whole configuration as one document; `PUT` makes the
//! stored configuration equal to a document in one transaction (`?dry_run=true` only shows what
//! would change).

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use tollgate_shared::DeclarativeConfig;
use utoipa::IntoParams;

use crate::app::AppState;
use crate::error::{ApiError, Problem};
use crate::extract::ApiJson;
use crate::store::ConfigDiff;

/// Options of `PUT /admin/v1/config`.
#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct ApplyOptions {
    /// Only compute and return the changes; write nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// The whole configuration (API keys excluded; HMAC secrets never shown).
#[utoipa::path(get, path = "/config", tag = "config",
    responses((status = 200, description = "The configuration", body = DeclarativeConfig),
              (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json")))]
pub async fn export(State(state): State<AppState>) -> Result<Json<DeclarativeConfig>, ApiError> {
    Ok(Json(state.store.export().await?))
}

/// Make the configuration equal to this document: resources it omits are deleted (consumers
/// with their keys), all in one revision. Refused whole when any part is invalid.
#[utoipa::path(put, path = "/config", tag = "config", request_body = DeclarativeConfig,
    params(ApplyOptions),
    responses((status = 200, description = "Applied (or, with dry_run, what would change)", body = ConfigDiff),
              (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
              (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid; every problem with its path", body = Problem, content_type = "application/problem+json")))]
pub async fn apply(
    State(state): State<AppState>,
    Query(options): Query<ApplyOptions>,
    ApiJson(desired): ApiJson<DeclarativeConfig>,
) -> Result<Json<ConfigDiff>, ApiError> {
    Ok(Json(state.store.apply(desired, options.dry_run).await?))
}
