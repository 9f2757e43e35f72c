//! The `tollgate` binary: a thin dispatcher over the control-plane and data-plane crates.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Tollgate: an API gateway with a control plane (admin API) and data planes (proxies).
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: the admin API over Postgres or the embedded SQLite store.
    ControlPlane(tollgate_control_plane::Settings),
    /// Apply pending database migrations and exit.
    Migrate(tollgate_control_plane::Settings),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::ControlPlane(settings) => {
            tracing::info!(
                database = %settings.database_url_redacted(),
                admin_listen = %settings.admin_listen,
                admin_token = ?settings.admin_token,
                data_dir = %settings.data_dir.display(),
                "starting control plane"
            );
            let app = tollgate_control_plane::Application::build(&settings).await?;
            if let Some(token) = app.generated_admin_token() {
                // Printed once, on the first start; only its digest is stored.
                println!("\n  Generated admin token (shown once, store it now):\n\n    {token}\n");
            }
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Migrate(settings) => {
            tollgate_control_plane::app::migrate(&settings).await?;
            tracing::info!(database = %settings.database_url_redacted(), "migrations applied");
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
