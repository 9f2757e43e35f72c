//! The `tollgate` binary: a thin dispatcher over the control-plane and data-plane crates.

mod admin_client;
mod echo;
mod quickstart;

use anyhow::Context;

/// mimalloc: the proxy allocates small, short-lived buffers on every request; glibc's malloc
/// showed up at ~5% of the data plane's CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
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
    /// Run the control plane: the admin API over Postgres or the embedded SQLite store, and
    /// the cluster listener data planes sync from.
    ControlPlane(tollgate_control_plane::Settings),
    /// Run a data plane: the proxy, synced from a control plane.
    DataPlane(tollgate_data_plane::Settings),
    /// Run everything in one process with demo config, and print curl lines to try.
    Quickstart(quickstart::Options),
    /// Apply pending database migrations and exit.
    Migrate(tollgate_control_plane::Settings),
    /// Print the whole configuration as one JSON document (from a running control plane).
    Export(admin_client::AdminApi),
    /// Make the configuration equal to a JSON document (as `export` prints it).
    Apply(admin_client::ApplyArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr (stdout carries what a user asked for: the quickstart's banner, the
    // generated admin token), with colours only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    // One worker thread: a current-thread runtime, so the accept loop, the connections and
    // the timers all run on that one thread with no cross-thread wake-ups (blocking work such
    // as compiling a snapshot still goes to the blocking pool).
    let threads = match &cli.command {
        Command::DataPlane(settings) => settings.worker_threads,
        _ => None,
    };
    let mut runtime = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if let Some(threads) = threads {
        runtime.worker_threads(threads.max(1));
    }
    if matches!(cli.command, Command::DataPlane(_)) {
        // The limiter's calls to Redis wait for the data plane to go idle (see `pacing`).
        tollgate_data_plane::pacing::install(&mut runtime);
    }
    let runtime = runtime
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
                cluster_listen = %settings.cluster_listen,
                cluster_token = ?settings.cluster_token,
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
        Command::DataPlane(settings) => {
            tracing::info!(
                control_plane_url = %settings.control_plane_url,
                cluster_token = ?settings.cluster_token,
                proxy_listen = %settings.proxy_listen,
                status_listen = %settings.status_listen,
                data_dir = %settings.data_dir.display(),
                worker_threads = ?settings.worker_threads,
                trusted_proxies = ?settings.trusted_proxies,
                "starting data plane"
            );
            let app = tollgate_data_plane::DataPlane::build(&settings).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Quickstart(options) => quickstart::run(options, shutdown_signal()).await,
        Command::Export(api) => admin_client::export(&api).await,
        Command::Apply(args) => admin_client::apply(&args).await,
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
