//! The sync client: dials the control plane, applies every snapshot it sends (validate and
//! compile off the hot path, swap, persist), answers ack or nack, heartbeats, and reconnects
//! with exponential backoff and jitter.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use tollgate_shared::sync::{CpMessage, DpMessage, PROTOCOL_VERSION, SYNC_PATH};
use tollgate_shared::{Secret, Snapshot};

use crate::config::compile;
use crate::state::Shared;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Connection settings of the sync client.
pub struct SyncClient {
    /// Shared state the snapshots are applied to.
    pub shared: Arc<Shared>,
    /// `ws://host:port/cluster/v1/sync`, or `wss://` (TLS).
    pub url: String,
    /// How a `wss://` control plane is verified.
    pub tls: Arc<rustls::ClientConfig>,
    /// Cluster token.
    pub token: Secret,
    /// Node id.
    pub node_id: String,
    /// Where the last good snapshot is written.
    pub data_dir: PathBuf,
    /// Heartbeat interval.
    pub heartbeat: Duration,
}

/// A connection to the control plane, in clear or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Opens the WebSocket of `request` (`ws://` or `wss://`, verified with `tls`).
async fn connect(
    request: http::Request<()>,
    tls: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<(
    tokio_tungstenite::WebSocketStream<Box<dyn Io>>,
    http::Response<Option<Vec<u8>>>,
)> {
    use anyhow::Context;
    let uri = request.uri();
    let secure = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .context("the control plane URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if secure {
        let name = rustls::pki_types::ServerName::try_from(host)
            .context("the control plane URL's host is not a valid TLS name")?;
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        Box::new(connector.connect(name, tcp).await?)
    } else {
        Box::new(tcp)
    };
    // Snapshots come as one message in one frame: tungstenite's defaults (16 MiB a frame) would
    // refuse those of large configs (some 100 000 API keys), and the node would only reconnect.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_SNAPSHOT_BYTES))
        .max_frame_size(Some(MAX_SNAPSHOT_BYTES));
    Ok(tokio_tungstenite::client_async_with_config(request, io, Some(config)).await?)
}

/// Largest sync message (a snapshot) a data plane takes.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// The sync endpoint for a control-plane base URL (`http://cp:8005` → `ws://cp:8005/cluster/v1/sync`).
pub fn sync_url(control_plane_url: &str) -> String {
    let base = control_plane_url.trim_end_matches('/');
    let base = base
        .strip_prefix("https://")
        .map(|rest| format!("wss://{rest}"))
        .or_else(|| {
            base.strip_prefix("http://")
                .map(|rest| format!("ws://{rest}"))
        })
        .unwrap_or_else(|| base.to_string());
    format!("{base}{SYNC_PATH}")
}

/// Validates and compiles `snapshot` off the async threads, then swaps it in.
pub async fn apply(
    shared: &Arc<Shared>,
    snapshot: Snapshot,
    hash: Option<String>,
) -> Result<(i64, String), String> {
    let worker = shared.clone();
    let compiled = tokio::task::spawn_blocking(move || {
        compile(snapshot, hash.as_deref(), &worker.connections, &worker.jwks)
    })
    .await
    .map_err(|e| format!("compiling panicked: {e}"))??;
    let applied = (compiled.revision, compiled.hash.clone());
    if let Some(previous) = shared.config.load_full() {
        crate::config::carry_health(&previous, &compiled);
    }
    crate::health::watch(&compiled);
    shared.apply(Arc::new(compiled));
    Ok(applied)
}

impl SyncClient {
    /// Runs until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.session(&cancel).await {
                Ok(true) => backoff = MIN_BACKOFF,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, url = %self.url, "control plane unreachable; serving the current config")
                }
            }
            self.shared.metrics.connected.store(0, Ordering::Relaxed);
            if cancel.is_cancelled() {
                return;
            }
            // Equal jitter: half the backoff fixed, half random, so nodes do not reconnect in step.
            let millis = u64::try_from(backoff.as_millis()).unwrap_or(5_000);
            let wait =
                Duration::from_millis(millis / 2 + rand::thread_rng().gen_range(0..=millis / 2));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection. `Ok(true)` when the control plane answered at all.
    async fn session(&self, cancel: &CancellationToken) -> anyhow::Result<bool> {
        let mut request = self.url.as_str().into_client_request()?;
        request.headers_mut().insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {}", self.token.expose()))?,
        );
        let (socket, _) =
            tokio::time::timeout(Duration::from_secs(5), connect(request, &self.tls)).await??;
        let (mut sink, mut stream) = socket.split();
        self.shared.metrics.connected.store(1, Ordering::Relaxed);
        let current = self.shared.config.load_full();
        let hello = DpMessage::Hello {
            node_id: self.node_id.clone(),
            hostname: hostname(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            revision: current.as_ref().map(|c| c.revision),
            hash: current.as_ref().map(|c| c.hash.clone()),
        };
        sink.send(Message::Text(serde_json::to_string(&hello)?.into()))
            .await?;
        tracing::info!(url = %self.url, node_id = %self.node_id, "connected to control plane");

        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.tick().await;
        let mut last_heard = Instant::now();
        let mut heard = false;
        loop {
            tokio::select! {
                incoming = stream.next() => {
                    let text = match incoming {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None => return Ok(heard),
                        Some(Ok(_)) => { last_heard = Instant::now(); continue; }
                        Some(Err(error)) => return Err(error.into()),
                    };
                    last_heard = Instant::now();
                    heard = true;
                    let reply = match serde_json::from_str::<CpMessage>(&text) {
                        Ok(CpMessage::UpToDate { revision }) => {
                            tracing::info!(revision, "config up to date");
                            None
                        }
                        Ok(CpMessage::Snapshot { hash, snapshot }) => Some(self.receive(snapshot, hash).await),
                        Ok(CpMessage::Cluster { live_data_planes }) => {
                            self.shared.limiter.live_nodes.store(live_data_planes.max(1), Ordering::Relaxed);
                            None
                        }
                        Err(error) => Some(DpMessage::Nack { revision: -1, reason: format!("unreadable message: {error}") }),
                    };
                    if let Some(reply) = reply {
                        sink.send(Message::Text(serde_json::to_string(&reply)?.into())).await?;
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > self.heartbeat * 3 {
                        anyhow::bail!("control plane silent for {:?}", last_heard.elapsed());
                    }
                    let (revision, keys_used) = match self.shared.config.load_full() {
                        Some(config) => (Some(config.revision), config.keys.take_used()),
                        None => (None, Vec::new()),
                    };
                    let heartbeat = DpMessage::Heartbeat { revision, keys_used };
                    sink.send(Message::Text(serde_json::to_string(&heartbeat)?.into())).await?;
                    sink.send(Message::Ping(Vec::new().into())).await?;
                }
                () = cancel.cancelled() => {
                    let _ = sink.send(Message::Close(None)).await;
                    return Ok(heard);
                }
            }
        }
    }

    async fn receive(&self, snapshot: Snapshot, hash: String) -> DpMessage {
        let revision = snapshot.revision;
        match apply(&self.shared, snapshot, Some(hash)).await {
            Ok((revision, hash)) => {
                tracing::info!(revision, "snapshot applied");
                self.persist().await;
                DpMessage::Ack { revision, hash }
            }
            Err(reason) => {
                self.shared.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(revision, %reason, "snapshot refused; keeping the previous config");
                DpMessage::Nack { revision, reason }
            }
        }
    }

    async fn persist(&self) {
        let Some(compiled) = self.shared.config.load_full() else {
            return;
        };
        let dir = self.data_dir.clone();
        let result = tokio::task::spawn_blocking(move || {
            crate::persist::save_snapshot(&dir, &compiled.snapshot)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot persist the snapshot")
            }
            Err(error) => tracing::warn!(%error, "persisting the snapshot panicked"),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_urls() {
        assert_eq!(
            sync_url("http://127.0.0.1:8005"),
            "ws://127.0.0.1:8005/cluster/v1/sync"
        );
        assert_eq!(sync_url("http://cp:8005/"), "ws://cp:8005/cluster/v1/sync");
        assert_eq!(sync_url("https://cp"), "wss://cp/cluster/v1/sync");
    }
}
