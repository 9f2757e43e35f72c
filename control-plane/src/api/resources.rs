//! CRUD handlers of the named resources: upstreams, routes, consumers, plans, JWT issuers.
//!
//! The five resources behave identically, so one macro writes their handlers; each handler
//! still carries its own `#[utoipa::path]` so the OpenAPI document names every operation.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tollgate_shared::{Stored, ValidationErrors};

use crate::app::AppState;
use crate::error::ApiError;
use crate::extract::{ApiJson, decode_value};
use crate::store::{Resource, StoreError};

async fn list<R: Resource>(state: &AppState) -> Result<Json<Vec<Stored<R>>>, ApiError> {
    let items = state.store.list::<R>().await?;
    Ok(Json(items.into_iter().map(present).collect()))
}

async fn create<R: Resource>(
    state: &AppState,
    collection: &str,
    spec: R,
) -> Result<Response, ApiError> {
    let stored = state.store.create(spec).await?;
    let location = format!("/admin/v1/{collection}/{}", stored.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(present(stored)),
    )
        .into_response())
}

async fn get<R: Resource>(state: &AppState, key: &str) -> Result<Json<Stored<R>>, ApiError> {
    Ok(Json(present(state.store.get::<R>(key).await?)))
}

async fn replace<R: Resource>(
    state: &AppState,
    key: &str,
    spec: R,
) -> Result<Json<Stored<R>>, ApiError> {
    let stored = state.store.update::<R>(key, |_| Ok(spec)).await?;
    Ok(Json(present(stored)))
}

async fn patch<R: Resource>(
    state: &AppState,
    key: &str,
    patch: Value,
) -> Result<Json<Stored<R>>, ApiError> {
    if !patch.is_object() {
        return Err(ApiError::BadRequest(
            "a merge patch (RFC 7396) must be a JSON object".into(),
        ));
    }
    let stored = state
        .store
        .update::<R>(key, |current| {
            let mut document = serde_json::to_value(current).map_err(|e| {
                StoreError::Invalid(ValidationErrors(vec![tollgate_shared::FieldError {
                    field: String::new(),
                    message: e.to_string(),
                }]))
            })?;
            merge_patch(&mut document, patch);
            decode_value(document).map_err(StoreError::Invalid)
        })
        .await?;
    Ok(Json(present(stored)))
}

async fn delete<R: Resource>(state: &AppState, key: &str) -> Result<StatusCode, ApiError> {
    state.store.delete::<R>(key).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn present<R: Resource>(mut stored: Stored<R>) -> Stored<R> {
    stored.spec = stored.spec.public_view();
    stored
}

/// RFC 7396 JSON merge patch: objects merge recursively, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(entries) => {
            if !target.is_object() {
                *target = Value::Object(serde_json::Map::new());
            }
            if let Value::Object(map) = target {
                for (key, value) in entries {
                    if value.is_null() {
                        map.remove(&key);
                    } else {
                        merge_patch(map.entry(key).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *target = other,
    }
}

macro_rules! resource_handlers {
    ($module:ident, $ty:ident, $tag:tt, $collection:tt, $item:tt, $segment:tt, $label:tt) => {
        #[doc = concat!("Handlers of `/admin/v1/", $segment, "`.")]
        pub mod $module {
            use super::*;
            use tollgate_shared::$ty;
            use crate::error::Problem;

            /// The stored form of this resource.
            type Item = Stored<$ty>;

            #[doc = concat!("List every ", $label, ", ordered by name.")]
            #[utoipa::path(get, path = $collection, tag = $tag,
                responses((status = 200, description = "Every resource of this kind", body = Vec<Item>),
                          (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json")))]
            pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Stored<$ty>>>, ApiError> {
                super::list::<$ty>(&state).await
            }

            #[doc = concat!("Create a ", $label, ".")]
            #[utoipa::path(post, path = $collection, tag = $tag, request_body = $ty,
                responses((status = 201, description = "Created", body = Item),
                          (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
                          (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
                          (status = 409, description = "Name already taken", body = Problem, content_type = "application/problem+json"),
                          (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
                          (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
                          (status = 422, description = "Invalid, or names a missing resource", body = Problem, content_type = "application/problem+json")))]
            pub async fn create(State(state): State<AppState>, ApiJson(spec): ApiJson<$ty>) -> Result<Response, ApiError> {
                super::create::<$ty>(&state, $segment, spec).await
            }

            #[doc = concat!("Get one ", $label, " by id or name.")]
            #[utoipa::path(get, path = $item, tag = $tag,
                params(("id" = String, Path, description = "Id or name")),
                responses((status = 200, description = "Found", body = Item),
                          (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
                          (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json")))]
            pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Stored<$ty>>, ApiError> {
                super::get::<$ty>(&state, &id).await
            }

            #[doc = concat!("Replace a ", $label, " with a complete new definition.")]
            #[utoipa::path(put, path = $item, tag = $tag, request_body = $ty,
                params(("id" = String, Path, description = "Id or name")),
                responses((status = 200, description = "Replaced", body = Item),
                          (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
                          (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
                          (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
                          (status = 409, description = "New name taken, or renaming a resource others refer to", body = Problem, content_type = "application/problem+json"),
                          (status = 422, description = "Invalid, or names a missing resource", body = Problem, content_type = "application/problem+json")))]
            pub async fn replace(State(state): State<AppState>, Path(id): Path<String>, ApiJson(spec): ApiJson<$ty>) -> Result<Json<Stored<$ty>>, ApiError> {
                super::replace::<$ty>(&state, &id, spec).await
            }

            #[doc = concat!("Change some fields of a ", $label, " (JSON merge patch, RFC 7396).")]
            #[utoipa::path(patch, path = $item, tag = $tag,
                request_body(content = Object, content_type = "application/merge-patch+json", description = "Fields to change; null removes an optional field"),
                params(("id" = String, Path, description = "Id or name")),
                responses((status = 200, description = "Patched", body = Item),
                          (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
                          (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
                          (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
                          (status = 409, description = "New name taken, or renaming a resource others refer to", body = Problem, content_type = "application/problem+json"),
                          (status = 422, description = "The result is invalid", body = Problem, content_type = "application/problem+json")))]
            pub async fn patch(State(state): State<AppState>, Path(id): Path<String>, ApiJson(patch): ApiJson<Value>) -> Result<Json<Stored<$ty>>, ApiError> {
                super::patch::<$ty>(&state, &id, patch).await
            }

            #[doc = concat!("Delete a ", $label, " that nothing refers to.")]
            #[utoipa::path(delete, path = $item, tag = $tag,
                params(("id" = String, Path, description = "Id or name")),
                responses((status = 204, description = "Deleted"),
                          (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
                          (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
                          (status = 409, description = "Still referred to; the detail names the referrers", body = Problem, content_type = "application/problem+json")))]
            pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
                super::delete::<$ty>(&state, &id).await
            }
        }
    };
}

resource_handlers!(
    upstreams,
    Upstream,
    "upstreams",
    "/upstreams",
    "/upstreams/{id}",
    "upstreams",
    "upstream"
);
resource_handlers!(
    routes,
    Route,
    "routes",
    "/routes",
    "/routes/{id}",
    "routes",
    "route"
);
resource_handlers!(
    consumers,
    Consumer,
    "consumers",
    "/consumers",
    "/consumers/{id}",
    "consumers",
    "consumer"
);
resource_handlers!(
    plans,
    Plan,
    "plans",
    "/plans",
    "/plans/{id}",
    "plans",
    "plan"
);
resource_handlers!(
    jwt_issuers,
    JwtIssuer,
    "jwt-issuers",
    "/jwt-issuers",
    "/jwt-issuers/{id}",
    "jwt-issuers",
    "JWT issuer"
);
