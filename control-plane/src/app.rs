//! Startup: connect and migrate the store, make sure an admin token exists, bind the admin
//! listener. `Application::build` binds port 0 in tests and exposes the bound port.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::settings::Settings;
use crate::store::Store;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The config store.
    pub store: Store,
}

/// A built, bound, not yet serving control plane.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    store: Store,
    generated_admin_token: Option<String>,
}

impl Application {
    /// Connects and migrates the store, bootstraps the admin token and binds the admin listener.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        if settings.database_url.is_none() {
            std::fs::create_dir_all(&settings.data_dir)
                .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
        }
        let store = Store::connect(&settings.database_url())
            .await
            .with_context(|| format!("connecting to {}", settings.database_url_redacted()))?;
        store.migrate().await.context("running migrations")?;
        let generated_admin_token = crate::auth::bootstrap(&store, settings.admin_token.as_ref())
            .await
            .context("bootstrapping the admin token")?;
        let (router, _) = crate::api::router(AppState {
            store: store.clone(),
        });
        let listener = TcpListener::bind(settings.admin_listen)
            .await
            .with_context(|| format!("binding the admin API to {}", settings.admin_listen))?;
        Ok(Self {
            listener,
            router,
            store,
            generated_admin_token,
        })
    }

    /// Address the admin API listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        // A bound listener always has a local address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The admin token generated at this first start, if one was: show it once.
    pub fn generated_admin_token(&self) -> Option<&str> {
        self.generated_admin_token.as_deref()
    }

    /// The store, for callers embedding the control plane.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests and closes the store.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(admin = %self.admin_addr(), backend = ?self.store.backend(), "control plane serving");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving the admin API")?;
        self.store.close().await;
        tracing::info!("control plane stopped");
        Ok(())
    }
}

/// Runs `tollgate migrate`: applies pending migrations and exits.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    settings.validate()?;
    if settings.database_url.is_none() {
        std::fs::create_dir_all(&settings.data_dir)?;
    }
    let store = Store::connect(&settings.database_url())
        .await
        .with_context(|| format!("connecting to {}", settings.database_url_redacted()))?;
    store.migrate().await.context("running migrations")?;
    store.close().await;
    Ok(())
}
