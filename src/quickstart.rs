//! `tollgate quickstart`: the whole gateway in one process on a machine with nothing but the
//! Rust toolchain. A control plane on an embedded SQLite store in a fresh temp dir, a data plane
//! synced from it, an echo upstream, a demo route, consumer and API key; then working curl lines.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tollgate_control_plane::api::keys::{NewKey, issue};
use tollgate_shared::{Consumer, Route, Secret, Upstream};

/// Options of `tollgate quickstart`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Admin API address.
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub admin_listen: SocketAddr,
    /// Proxy address.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub proxy_listen: SocketAddr,
    /// Data-plane status address.
    #[arg(long, default_value = "127.0.0.1:8100")]
    pub status_listen: SocketAddr,
    /// Cluster (sync) listener address.
    #[arg(long, default_value = "127.0.0.1:8005")]
    pub cluster_listen: SocketAddr,
    /// Echo upstream address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub echo_listen: SocketAddr,
    /// Keep data here instead of a fresh temp dir (it must be empty or not exist).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Runs the quickstart until `shutdown` resolves.
pub async fn run(
    options: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let temp = tempfile::Builder::new()
        .prefix("tollgate-quickstart-")
        .tempdir()?;
    let data_dir = options
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let echo = crate::echo::spawn(options.echo_listen)
        .await
        .context("starting the echo upstream")?;

    let cluster_token = Secret::new(tollgate_control_plane::auth::generate_secret("tgcl_"));
    let control_plane =
        tollgate_control_plane::Application::build(&tollgate_control_plane::Settings {
            database_url: None,
            admin_listen: options.admin_listen,
            admin_token: None,
            data_dir: data_dir.join("control-plane"),
            cluster_listen: options.cluster_listen,
            cluster_token: Some(cluster_token.clone()),
            config_poll_seconds: 5,
            data_plane_timeout_seconds: 30,
            cluster_tls_cert_file: None,
            cluster_tls_key_file: None,
            redis_url: None,
            redis_prefix: "tollgate".into(),
        })
        .await
        .context("starting the control plane")?;
    let admin_token = control_plane
        .generated_admin_token()
        .context("the quickstart data dir must be new (it already holds an admin token)")?
        .to_string();
    let admin = control_plane.admin_addr();
    let cluster = control_plane
        .cluster_addr()
        .context("cluster listener is off")?;
    let store = control_plane.store().clone();

    // The demo configuration.
    store
        .create(json::<Upstream>(
            serde_json::json!({"name": "echo", "targets": [{"url": format!("http://{echo}")}]}),
        )?)
        .await?;
    store
        .create(json::<Consumer>(
            serde_json::json!({"username": "demo", "tags": ["quickstart"]}),
        )?)
        .await?;
    store
        .create(json::<Route>(
            serde_json::json!({"name": "echo", "paths": ["/echo"], "upstream": "echo",
            "strip_prefix": true, "auth": {"api_key": {}}}),
        )?)
        .await?;
    store
        .create(json::<Route>(
            serde_json::json!({"name": "public", "paths": ["/public"], "upstream": "echo"}),
        )?)
        .await?;
    let key = issue(&store, "demo", &NewKey::default())
        .await
        .map_err(|e| anyhow::anyhow!("issuing the demo key: {e}"))?;

    let data_plane = tollgate_data_plane::DataPlane::build(&tollgate_data_plane::Settings {
        control_plane_url: format!("http://{cluster}"),
        cluster_token: Some(cluster_token),
        proxy_listen: options.proxy_listen,
        status_listen: options.status_listen,
        data_dir: data_dir.join("data-plane"),
        node_id: Some("quickstart".into()),
        worker_threads: None,
        trusted_proxies: Vec::new(),
        heartbeat_seconds: 5,
        max_header_bytes: 32 * 1024,
        header_timeout_ms: 30_000,
        send_timeout_ms: 60_000,
        body_timeout_ms: 60_000,
        redis_url: None,
        redis_prefix: "tollgate".into(),
        redis_timeout_ms: 10,
        limiter_pacing: tollgate_data_plane::pacing::Mode::Auto,
        jwks_ca_file: None,
        cluster_ca_file: None,
        jwks_min_refresh_ms: 10_000,
    })
    .await
    .context("starting the data plane")?;
    let proxy = data_plane.proxy_addr();
    let status = data_plane.status_addr();
    let served = data_plane.served_revision();
    let revision = store.revision().await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let cp_task = tokio::spawn(control_plane.run_until_stopped(stopped(stop_rx.clone())));
    let dp_task = tokio::spawn(data_plane.run_until_stopped(stopped(stop_rx)));
    // The banner's curl lines must work the moment it is printed.
    let waited = std::time::Instant::now();
    while served() != Some(revision) {
        anyhow::ensure!(
            waited.elapsed() < std::time::Duration::from_secs(30),
            "the data plane did not get the demo config in 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    println!(
        r#"
Tollgate quickstart is running (data in {data}; removed at exit unless --data-dir was given).

  proxy           http://{proxy}
  admin API       http://{admin}/admin/v1   (OpenAPI: http://{admin}/openapi.json, docs: http://{admin}/docs)
  status          http://{status}/readyz
  echo upstream   http://{echo}

  admin token     {admin_token}
  demo API key    {api_key}

Try it:

  curl -s http://{proxy}/public/hello                                   # public route
  curl -s http://{proxy}/echo/hello -H 'X-API-Key: {api_key}'   # key-protected route
  curl -s -i http://{proxy}/echo/hello                                  # 401 without the key
  curl -s http://{admin}/admin/v1/routes -H 'Authorization: Bearer {admin_token}'
  curl -s http://{admin}/admin/v1/data-planes -H 'Authorization: Bearer {admin_token}'

QUICKSTART READY
Press Ctrl-C to stop."#,
        data = data_dir.display(),
        api_key = key.key,
    );

    shutdown.await;
    let _ = stop_tx.send(true);
    dp_task.await??;
    cp_task.await??;
    drop(temp);
    Ok(())
}

fn json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(value).context("building the demo config")
}
