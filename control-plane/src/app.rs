//! Startup: connect and migrate the store, make sure an admin token exists, bind the admin and
//! cluster listeners. `Application::build` binds port 0 in tests and exposes the bound ports.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::store::{Backend, Store};
use crate::sync::{ClusterState, Published, Snapshots};

/// What every admin handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The config store.
    pub store: Store,
    /// A data plane silent this long is reported as not live.
    pub data_plane_timeout: Duration,
    /// The data planes' Redis, for usage reads.
    pub redis: Option<redis::Client>,
    /// Prefix of the limiter keys.
    pub redis_prefix: String,
}

/// A built, bound, not yet serving control plane.
pub struct Application {
    admin: TcpListener,
    cluster: Option<TcpListener>,
    /// The cluster listener's TLS identity, when it has one.
    cluster_tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    store: Store,
    database_url: String,
    replica_id: String,
    settings: Settings,
    generated_admin_token: Option<String>,
    publisher: watch::Sender<Option<Arc<Published>>>,
}

impl Application {
    /// Connects and migrates the store, bootstraps the admin token and binds the listeners.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let store = open_store(settings).await?;
        let generated_admin_token = crate::auth::bootstrap(&store, settings.admin_token.as_ref())
            .await
            .context("bootstrapping the admin token")?;
        let redis = settings
            .redis_url
            .as_ref()
            .map(|url| redis::Client::open(url.expose()))
            .transpose()
            .context("TOLLGATE_REDIS_URL")?;
        let (router, _) = crate::api::router(AppState {
            store: store.clone(),
            data_plane_timeout: Duration::from_secs(settings.data_plane_timeout_seconds),
            redis,
            redis_prefix: settings.redis_prefix.clone(),
        });
        let cluster_tls = match (
            &settings.cluster_tls_cert_file,
            &settings.cluster_tls_key_file,
        ) {
            (Some(cert), Some(key)) => {
                Some(crate::tls::server_config(cert, key).context("the cluster listener's TLS")?)
            }
            _ => None,
        };
        let admin = TcpListener::bind(settings.admin_listen)
            .await
            .with_context(|| format!("binding the admin API to {}", settings.admin_listen))?;
        let cluster = match &settings.cluster_token {
            Some(_) => Some(
                TcpListener::bind(settings.cluster_listen)
                    .await
                    .with_context(|| {
                        format!(
                            "binding the cluster listener to {}",
                            settings.cluster_listen
                        )
                    })?,
            ),
            None => {
                tracing::warn!(
                    "cluster listener off: set TOLLGATE_CLUSTER_TOKEN to let data planes connect"
                );
                None
            }
        };
        Ok(Self {
            admin,
            cluster,
            cluster_tls,
            router,
            store,
            database_url: settings.database_url(),
            replica_id: uuid::Uuid::new_v4().to_string(),
            settings: settings.clone(),
            generated_admin_token,
            publisher: watch::channel(None).0,
        })
    }

    /// Address the admin API listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        local_addr(&self.admin)
    }

    /// Address the cluster listener listens on, when it is on.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster.as_ref().map(local_addr)
    }

    /// The admin token generated at this first start, if one was: show it once.
    pub fn generated_admin_token(&self) -> Option<&str> {
        self.generated_admin_token.as_deref()
    }

    /// The store, for callers embedding the control plane.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The snapshots this control plane serves to data planes.
    pub fn snapshots(&self) -> Snapshots {
        self.publisher.subscribe()
    }

    /// Serves until `shutdown` resolves; then closes data-plane streams, finishes in-flight
    /// admin requests and closes the store.
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
        tracing::info!(
            admin = %self.admin_addr(),
            cluster = ?self.cluster_addr(),
            backend = ?self.store.backend(),
            replica = %self.replica_id,
            "control plane serving"
        );
        let snapshots = self.publisher.subscribe();
        let publisher = tokio::spawn(crate::sync::run_publisher(
            self.store.clone(),
            self.publisher,
            Duration::from_secs(self.settings.config_poll_seconds),
            cancel.clone(),
        ));
        let listener = (self.store.backend() == Backend::Postgres).then(|| {
            tokio::spawn(crate::sync::run_change_listener(
                self.database_url.clone(),
                self.store.clone(),
                cancel.clone(),
            ))
        });
        let admin = axum::serve(self.admin, self.router)
            .with_graceful_shutdown(cancel.clone().cancelled_owned());
        let cluster = async {
            let (Some(listener), Some(token)) = (self.cluster, &self.settings.cluster_token) else {
                return Ok(());
            };
            let router = crate::sync::router(ClusterState {
                store: self.store.clone(),
                snapshots,
                token_digest: ClusterState::digest(token),
                replica_id: self.replica_id.clone(),
                idle_timeout: Duration::from_secs(self.settings.data_plane_timeout_seconds),
                cancel: cancel.clone(),
            });
            let stop = cancel.clone().cancelled_owned();
            match self.cluster_tls {
                Some(tls) => {
                    axum::serve(crate::tls::TlsListener::new(listener, tls)?, router)
                        .with_graceful_shutdown(stop)
                        .await
                }
                None => {
                    axum::serve(listener, router)
                        .with_graceful_shutdown(stop)
                        .await
                }
            }
        };
        let (admin, cluster) = tokio::join!(admin, cluster);
        cancel.cancel();
        let _ = publisher.await;
        if let Some(listener) = listener {
            let _ = listener.await;
        }
        self.store.close().await;
        admin.context("serving the admin API")?;
        cluster.context("serving the cluster listener")?;
        tracing::info!("control plane stopped");
        Ok(())
    }
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    // A bound listener always has a local address.
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    if settings.database_url.is_none() && !settings.data_dir.exists() {
        // The embedded store holds JWT issuer secrets: a new data dir is the owner's only.
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
        #[cfg(unix)]
        std::fs::set_permissions(
            &settings.data_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .with_context(|| format!("restricting data dir {}", settings.data_dir.display()))?;
    }
    let store = Store::connect(&settings.database_url())
        .await
        .with_context(|| format!("connecting to {}", settings.database_url_redacted()))?;
    store.migrate().await.context("running migrations")?;
    Ok(store)
}

/// Runs `tollgate migrate`: applies pending migrations and exits.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    settings.validate()?;
    let store = open_store(settings).await?;
    store.close().await;
    Ok(())
}
