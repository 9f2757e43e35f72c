//! `GET /admin/v1/data-planes`: the nodes and their sync state, as any replica recorded them.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::error::{ApiError, Problem};
use crate::store::{now_ms, rfc3339};

/// A data plane and its sync state.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"node_id": "dp-1", "hostname": "edge-1", "version": "0.1.0",
    "applied_revision": 42, "in_sync": true, "state": "synced", "live": true, "error": null,
    "last_seen": "2026-11-28T10:00:00Z", "connected_at": "2026-11-28T09:00:00Z",
    "control_plane": "6f1c…"}))]
pub struct DataPlane {
    /// Stable node id.
    pub node_id: String,
    /// Host name the node reported.
    pub hostname: String,
    /// Its Tollgate version.
    pub version: String,
    /// Config revision it last acknowledged.
    pub applied_revision: Option<i64>,
    /// Whether that is the current revision.
    pub in_sync: bool,
    /// `connected`, `synced`, `nacked`, `disconnected`, or `refused` (a sync protocol this
    /// control plane does not speak; `error` says which).
    pub state: String,
    /// Connected and heard from recently.
    pub live: bool,
    /// Why it refused the last snapshot it refused (cleared by the next ack).
    pub error: Option<String>,
    /// RFC 3339.
    pub last_seen: String,
    /// RFC 3339.
    pub connected_at: String,
    /// Id of the control-plane replica it syncs from.
    pub control_plane: String,
}

/// Every data plane seen, with its sync state.
#[utoipa::path(get, path = "/data-planes", tag = "data-planes",
    responses((status = 200, description = "The data planes", body = Vec<DataPlane>),
              (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json")))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<DataPlane>>, ApiError> {
    let revision = state.store.revision().await?;
    let timeout_ms = i64::try_from(state.data_plane_timeout.as_millis()).unwrap_or(i64::MAX);
    let now = now_ms();
    let records = state.store.list_data_planes().await?;
    Ok(Json(
        records
            .into_iter()
            .map(|record| DataPlane {
                in_sync: record.applied_revision == Some(revision),
                live: !matches!(record.state.as_str(), "disconnected" | "refused")
                    && now - record.last_seen < timeout_ms,
                node_id: record.node_id,
                hostname: record.hostname,
                version: record.version,
                applied_revision: record.applied_revision,
                state: record.state,
                error: record.error,
                last_seen: rfc3339(record.last_seen),
                connected_at: rfc3339(record.connected_at),
                control_plane: record.control_plane,
            })
            .collect(),
    ))
}
