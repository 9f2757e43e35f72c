//! `GET /admin/v1/status`: config revision and store health.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::error::Problem;
use crate::store::Backend;

/// Control-plane status.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"version": "0.1.0", "revision": 42,
    "store": {"backend": "postgres", "healthy": true, "latency_ms": 0.4, "error": null}}))]
pub struct Status {
    /// Tollgate version.
    pub version: &'static str,
    /// Current global config revision; null when the store is unreachable.
    pub revision: Option<i64>,
    /// Config store health.
    pub store: StoreStatus,
}

/// Config store health.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreStatus {
    /// Which database.
    pub backend: Backend,
    /// Whether a query just succeeded.
    pub healthy: bool,
    /// Round-trip time of that query.
    pub latency_ms: f64,
    /// Why the store is unhealthy.
    pub error: Option<String>,
}

/// Config revision and store health; 503 when the store is unreachable.
#[utoipa::path(get, path = "/status", tag = "status",
    responses((status = 200, description = "Healthy", body = Status),
              (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "Store unreachable", body = Status)))]
pub async fn status(State(state): State<AppState>) -> (StatusCode, Json<Status>) {
    let started = std::time::Instant::now();
    let result = state.store.revision().await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (code, revision, error) = match result {
        Ok(revision) => (StatusCode::OK, Some(revision), None),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            Some(error.to_string()),
        ),
    };
    (
        code,
        Json(Status {
            version: env!("CARGO_PKG_VERSION"),
            revision,
            store: StoreStatus {
                backend: state.store.backend(),
                healthy: error.is_none(),
                latency_ms,
                error,
            },
        }),
    )
}
