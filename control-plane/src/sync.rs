//! Config distribution to data planes.
//!
//! - The **publisher** keeps the current snapshot built and serialized once, behind a `watch`
//!   channel. It rebuilds when this process commits a write, when another replica announces one
//!   through Postgres `NOTIFY`, and on a slow poll as a safety net.
//! - The **cluster listener** serves `GET /cluster/v1/sync` (WebSocket, cluster-token auth):
//!   one task per data plane sends it every newer snapshot and records its acks, nacks and
//!   heartbeats in the store, where every replica's `GET /admin/v1/data-planes` sees them.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tollgate_shared::sync::{CpMessage, DpMessage, PROTOCOL_VERSION, SYNC_PATH};

use crate::settings::Secret;
use crate::store::{CHANGE_CHANNEL, DataPlaneRecord, Store, StoreError, now_ms};

/// The current snapshot, serialized once for every data plane.
#[derive(Debug)]
pub struct Published {
    /// Its revision.
    pub revision: i64,
    /// Its content hash.
    pub hash: String,
    /// The `CpMessage::Snapshot` text frame.
    pub message: Utf8Bytes,
}

/// Receiving end of the publisher: `None` until the first snapshot is built.
pub type Snapshots = watch::Receiver<Option<Arc<Published>>>;

/// Builds and publishes a snapshot when the stored revision is newer than the published one.
pub async fn publish_if_newer(
    store: &Store,
    sender: &watch::Sender<Option<Arc<Published>>>,
) -> Result<(), StoreError> {
    let revision = store.revision().await?;
    let current = sender.borrow().as_ref().map(|p| p.revision);
    if current.is_some_and(|current| current >= revision) {
        return Ok(());
    }
    let snapshot = store.snapshot().await?;
    let hash = snapshot.content_hash();
    let revision = snapshot.revision;
    let message = serde_json::to_string(&CpMessage::Snapshot {
        hash: hash.clone(),
        snapshot,
    })
    .map_err(|error| StoreError::Database(sqlx::Error::Encode(error.into())))?;
    tracing::debug!(revision, %hash, "snapshot published");
    sender.send_replace(Some(Arc::new(Published {
        revision,
        hash,
        message: message.into(),
    })));
    Ok(())
}

/// Keeps the published snapshot current until `cancel` fires.
pub async fn run_publisher(
    store: Store,
    sender: watch::Sender<Option<Arc<Published>>>,
    poll_interval: Duration,
    cancel: CancellationToken,
) {
    let committed = store.committed();
    loop {
        if let Err(error) = publish_if_newer(&store, &sender).await {
            tracing::warn!(%error, "cannot build the config snapshot; retrying");
        }
        tokio::select! {
            () = committed.notified() => {}
            () = tokio::time::sleep(poll_interval) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Wakes the publisher whenever any replica commits (Postgres `LISTEN`), reconnecting on error.
pub async fn run_change_listener(database_url: String, store: Store, cancel: CancellationToken) {
    let committed = store.committed();
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect(&database_url).await?;
            listener.listen(CHANGE_CHANNEL).await?;
            // Anything committed while we were not listening is picked up now.
            committed.notify_one();
            loop {
                listener.recv().await?;
                committed.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            result = listener => {
                if let Err(error) = result {
                    tracing::warn!(%error, "config change listener lost; reconnecting");
                }
            }
            () = cancel.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Longest a connecting node waits for this replica to catch up with the revision it holds.
const CATCH_UP: Duration = Duration::from_secs(2);

/// What the cluster listener's handlers share.
#[derive(Clone)]
pub struct ClusterState {
    /// Where data-plane state is recorded.
    pub store: Store,
    /// The current snapshot.
    pub snapshots: Snapshots,
    /// SHA-256 of the cluster token.
    pub token_digest: [u8; 32],
    /// Id of this control-plane replica.
    pub replica_id: String,
    /// A data plane silent this long is dropped (it heartbeats far more often).
    pub idle_timeout: Duration,
    /// Fires at shutdown: every sync connection closes.
    pub cancel: CancellationToken,
}

impl ClusterState {
    /// Digest of a cluster token, as kept in [`ClusterState::token_digest`].
    pub fn digest(token: &Secret) -> [u8; 32] {
        Sha256::digest(token.expose().as_bytes()).into()
    }
}

/// The cluster listener's router.
pub fn router(state: ClusterState) -> Router {
    Router::new()
        .route(SYNC_PATH, get(sync_handler))
        .with_state(state)
}

async fn sync_handler(
    State(state): State<ClusterState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|token| -> [u8; 32] { Sha256::digest(token.trim().as_bytes()).into() });
    let authorized =
        presented.is_some_and(|digest| bool::from(digest[..].ct_eq(&state.token_digest[..])));
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"code": "unauthorized", "message": "a valid cluster token is required"})),
        )
            .into_response();
    }
    match upgrade {
        Ok(upgrade) => upgrade.on_upgrade(move |socket| serve_data_plane(state, socket)),
        Err(rejection) => rejection.into_response(),
    }
}

async fn serve_data_plane(state: ClusterState, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let hello = match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<DpMessage>(&text).ok(),
        _ => None,
    };
    let Some(DpMessage::Hello {
        node_id,
        hostname,
        version,
        protocol,
        revision,
        hash,
    }) = hello
    else {
        tracing::warn!("data plane did not say hello; closing");
        let _ = sink.send(Message::Close(None)).await;
        return;
    };
    let now = now_ms();
    let mut record = DataPlaneRecord {
        node_id,
        hostname,
        version,
        applied_revision: revision,
        applied_hash: hash,
        state: "connected".into(),
        error: None,
        last_seen: now,
        connected_at: now,
        control_plane: state.replica_id.clone(),
    };
    if protocol != PROTOCOL_VERSION {
        // Its snapshots would not read on the other side: say so where operators look, and
        // close (the node retries with its backoff, and is served once one side is upgraded).
        let reason = format!(
            "sync protocol {protocol}, this control plane speaks {PROTOCOL_VERSION}: run the same Tollgate version on both"
        );
        tracing::warn!(node_id = %record.node_id, version = %record.version, %reason, "data plane refused");
        record.state = "refused".into();
        record.error = Some(reason);
        save(&state.store, &record).await;
        let _ = sink.send(Message::Close(None)).await;
        return;
    }
    tracing::info!(node_id = %record.node_id, hostname = %record.hostname, revision = ?record.applied_revision, "data plane connected");
    save(&state.store, &record).await;

    let mut snapshots = state.snapshots.clone();
    let mut sent: Option<i64> = None;
    // A node that holds a newer revision than this replica has published came from a replica
    // ahead of this one (this one's NOTIFY not yet in): read the store before answering, or
    // the node would be sent back to an older config until this replica catches up.
    if let Some(held) = revision
        && snapshots
            .borrow()
            .as_ref()
            .is_none_or(|published| published.revision < held)
    {
        state.store.committed().notify_one();
        let caught_up = snapshots.wait_for(|published| {
            published
                .as_ref()
                .is_some_and(|published| published.revision >= held)
        });
        if tokio::time::timeout(CATCH_UP, caught_up).await.is_err() {
            tracing::warn!(node_id = %record.node_id, held, "data plane holds a revision newer than the store's (a restored database?); sending the store's");
        }
    }
    let initial = snapshots.borrow_and_update().clone();
    if let Some(published) = initial {
        let up_to_date = record.applied_revision == Some(published.revision)
            && record.applied_hash.as_deref() == Some(published.hash.as_str());
        let message = if up_to_date {
            record.state = "synced".into();
            save(&state.store, &record).await;
            let text = serde_json::to_string(&CpMessage::UpToDate {
                revision: published.revision,
            })
            .unwrap_or_default();
            Message::Text(text.into())
        } else {
            Message::Text(published.message.clone())
        };
        sent = Some(published.revision);
        if sink.send(message).await.is_err() {
            return disconnected(&state.store, record).await;
        }
    }

    let mut cluster_info = tokio::time::interval(state.idle_timeout / 6);
    // A node silent for the idle timeout (no heartbeat, no frame at all: a half-open
    // connection) is dropped. One timer for the connection, moved on by each frame: a timeout
    // made inside the loop would start again on every pass (the cluster facts tick every
    // idle_timeout / 6) and never run out.
    let silence = tokio::time::sleep(state.idle_timeout);
    tokio::pin!(silence);
    loop {
        tokio::select! {
            // In this order: frames waiting in the socket count before the silence timer, which
            // a long pass (a large snapshot to a slow link) may have let run out meanwhile.
            biased;
            () = state.cancel.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                break;
            }
            incoming = stream.next() => {
                silence.as_mut().reset(tokio::time::Instant::now() + state.idle_timeout);
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    _ => break,
                };
                match serde_json::from_str::<DpMessage>(&text) {
                    Ok(DpMessage::Ack { revision, hash }) => {
                        tracing::info!(node_id = %record.node_id, revision, "data plane applied snapshot");
                        record.applied_revision = Some(revision);
                        record.applied_hash = Some(hash);
                        record.state = "synced".into();
                        record.error = None;
                    }
                    Ok(DpMessage::Nack { revision, reason }) => {
                        tracing::warn!(node_id = %record.node_id, revision, %reason, "data plane refused snapshot");
                        record.state = "nacked".into();
                        record.error = Some(format!("revision {revision}: {reason}"));
                    }
                    Ok(DpMessage::Heartbeat { keys_used, .. }) => {
                        if let Err(error) = state.store.record_key_use(&keys_used).await {
                            tracing::warn!(%error, "cannot record API key use");
                        }
                    }
                    Ok(DpMessage::Hello { .. }) | Err(_) => {
                        tracing::warn!(node_id = %record.node_id, "unexpected sync message; closing");
                        break;
                    }
                }
                record.last_seen = now_ms();
                save(&state.store, &record).await;
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let latest = snapshots.borrow_and_update().clone();
                if let Some(published) = latest
                    && sent.is_none_or(|sent| sent < published.revision) {
                        sent = Some(published.revision);
                        if sink.send(Message::Text(published.message.clone())).await.is_err() {
                            break;
                        }
                    }
            }
            _ = cluster_info.tick() => {
                let since = now_ms() - i64::try_from(state.idle_timeout.as_millis()).unwrap_or(i64::MAX);
                if let Ok(live) = state.store.count_live_data_planes(since).await {
                    let message = CpMessage::Cluster { live_data_planes: u64::try_from(live).unwrap_or(1).max(1) };
                    let text = serde_json::to_string(&message).unwrap_or_default();
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
            }
            () = &mut silence => {
                tracing::warn!(node_id = %record.node_id, "data plane silent; dropping it");
                break;
            }
        }
    }
    disconnected(&state.store, record).await;
}

async fn disconnected(store: &Store, mut record: DataPlaneRecord) {
    tracing::info!(node_id = %record.node_id, "data plane disconnected");
    record.state = "disconnected".into();
    save(store, &record).await;
}

async fn save(store: &Store, record: &DataPlaneRecord) {
    if let Err(error) = store.upsert_data_plane(record).await {
        tracing::warn!(%error, node_id = %record.node_id, "cannot record data-plane state");
    }
}
