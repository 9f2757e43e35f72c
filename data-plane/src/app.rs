//! Startup: node id, the last good snapshot from disk, the listeners; then serving, syncing
//! and graceful shutdown. `DataPlane::build` binds port 0 in tests and exposes the ports.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::state::Shared;
use crate::sync::{SyncClient, sync_url};

/// A built, bound, not yet serving data plane.
pub struct DataPlane {
    proxy: TcpListener,
    status: TcpListener,
    shared: Arc<Shared>,
    sync: SyncClient,
    limits: crate::server::ConnectionLimits,
    redis: Option<(tollgate_shared::Secret, Duration, crate::pacing::Mode)>,
}

impl DataPlane {
    /// Loads the node id and last good snapshot, and binds the proxy and status listeners.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let token = settings
            .cluster_token
            .clone()
            .context("TOLLGATE_CLUSTER_TOKEN is required")?;
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
        let node_id = crate::persist::node_id(&settings.data_dir, settings.node_id.as_deref())?;
        let limiter = crate::limiter::Limiter::new(
            settings.redis_prefix.clone(),
            settings.redis_url.is_some(),
        );
        if settings.redis_url.is_none() {
            tracing::info!(
                "no TOLLGATE_REDIS_URL: rate limits and quotas are counted in this node's memory (single node)"
            );
        }
        let jwks = crate::jwt::JwksRegistry::new(
            settings.jwks_min_refresh_ms,
            crate::jwt::jwks_client(settings.jwks_ca_file.as_deref())
                .context("TOLLGATE_JWKS_CA_FILE")?,
        );
        let shared = Arc::new(Shared::new(
            settings.trusted_proxies.clone(),
            limiter,
            jwks,
            Duration::from_millis(settings.body_timeout_ms),
        ));
        match crate::persist::load_snapshot(&settings.data_dir) {
            Ok(Some(snapshot)) => match crate::sync::apply(&shared, snapshot, None).await {
                Ok((revision, _)) => tracing::info!(
                    revision,
                    "serving the last good snapshot from disk until the control plane answers"
                ),
                Err(reason) => {
                    tracing::warn!(%reason, "snapshot on disk refused; waiting for the control plane")
                }
            },
            Ok(None) => {
                tracing::info!("no snapshot on disk; not ready until the control plane sends one")
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot read the snapshot on disk")
            }
        }
        let proxy = TcpListener::bind(settings.proxy_listen)
            .await
            .with_context(|| format!("binding the proxy to {}", settings.proxy_listen))?;
        let status = TcpListener::bind(settings.status_listen)
            .await
            .with_context(|| {
                format!("binding the status listener to {}", settings.status_listen)
            })?;
        Ok(Self {
            proxy,
            status,
            sync: SyncClient {
                shared: shared.clone(),
                url: sync_url(&settings.control_plane_url),
                tls: Arc::new(
                    crate::jwt::tls_client_config(settings.cluster_ca_file.as_deref())
                        .context("TOLLGATE_CLUSTER_CA_FILE")?,
                ),
                token,
                node_id,
                data_dir: settings.data_dir.clone(),
                heartbeat: Duration::from_secs(settings.heartbeat_seconds),
            },
            shared,
            limits: crate::server::ConnectionLimits {
                max_header_bytes: settings.max_header_bytes,
                header_timeout: Duration::from_millis(settings.header_timeout_ms),
                send_timeout: Duration::from_millis(settings.send_timeout_ms),
                body_timeout: Duration::from_millis(settings.body_timeout_ms),
            },
            redis: settings.redis_url.clone().map(|url| {
                let timeout = Duration::from_millis(settings.redis_timeout_ms);
                (url, timeout, settings.limiter_pacing)
            }),
        })
    }

    /// A handle that tells which revision the node serves (None before any config), usable
    /// after `run_until_stopped` took the data plane.
    pub fn served_revision(&self) -> impl Fn() -> Option<i64> + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.config.load().as_ref().map(|c| c.revision)
    }

    /// The clock limits are computed with (tests move it across quota periods).
    pub fn clock(&self) -> Arc<crate::state::Clock> {
        self.shared.clock.clone()
    }

    /// Address of the proxy listener.
    pub fn proxy_addr(&self) -> SocketAddr {
        local_addr(&self.proxy)
    }

    /// Address of the status listener.
    pub fn status_addr(&self) -> SocketAddr {
        local_addr(&self.status)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.sync.node_id
    }

    /// Serves and syncs until `shutdown` resolves, then drains in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
        tracing::info!(proxy = %self.proxy_addr(), status = %self.status_addr(), node_id = %self.sync.node_id, "data plane serving");
        let sync = tokio::spawn(self.sync.run(cancel.clone()));
        if let Some((url, timeout, pacing)) = self.redis.clone() {
            let (shared, cancel) = (self.shared.clone(), cancel.clone());
            tokio::spawn(async move {
                let url = url.expose();
                shared.limiter.connect(url, timeout, pacing, &cancel).await;
            });
        }
        let sweeper = {
            let (shared, cancel) = (self.shared.clone(), cancel.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(10)) => {}
                        () = cancel.cancelled() => return,
                    }
                    let longest = shared
                        .config
                        .load()
                        .as_ref()
                        .map_or(0, |c| c.longest_window_ms);
                    shared.limiter.memory.sweep(shared.clock.now_ms(), longest);
                    shared.connections.sweep();
                }
            })
        };
        let refresher = {
            let (shared, cancel) = (self.shared.clone(), cancel.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(crate::jwt::REFRESH_EVERY) => {}
                        () = cancel.cancelled() => return,
                    }
                    shared.jwks.refresh_all(shared.clock.now_ms()).await;
                }
            })
        };
        tokio::join!(
            crate::server::serve_proxy(
                self.proxy,
                self.shared.clone(),
                self.limits,
                cancel.clone()
            ),
            crate::server::serve_status(
                self.status,
                self.shared.clone(),
                self.limits.header_timeout,
                cancel.clone()
            ),
        );
        cancel.cancel();
        let _ = sync.await;
        let _ = sweeper.await;
        let _ = refresher.await;
        tracing::info!("data plane stopped");
        Ok(())
    }
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}
