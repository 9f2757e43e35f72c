//! Test harness: starts the real control plane on port 0 against a fresh Postgres schema or a
//! fresh SQLite file, with typed helpers; everything is removed when the `TestApp` drops.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::time::Duration;

use serde_json::Value;
use sqlx::Connection;
use tollgate_control_plane::{Application, Secret, Settings};

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Base URL of the Postgres the tests use; each test gets its own schema in it.
pub fn postgres_base_url() -> String {
    std::env::var("TOLLGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A fresh, empty database: a Postgres schema or an SQLite file in a temp dir.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    schema: Option<String>,
    pub dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Postgres => {
                let schema = format!("tg_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&postgres_base_url())
                    .await
                    .expect("Postgres is reachable (see README: tests need it)");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut conn)
                    .await
                    .expect("create schema");
                conn.close().await.ok();
                let sep = if postgres_base_url().contains('?') {
                    '&'
                } else {
                    '?'
                };
                let url = format!(
                    "{}{sep}options=-c%20search_path%3D{schema}",
                    postgres_base_url()
                );
                Self {
                    backend,
                    url,
                    schema: Some(schema),
                    dir,
                }
            }
            Backend::Sqlite => {
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("tollgate.db").display()
                );
                Self {
                    backend,
                    url,
                    schema: None,
                    dir,
                }
            }
        }
    }

    /// The same database for another control-plane replica; only `self` cleans it up.
    pub fn share(&self) -> TestDb {
        TestDb {
            backend: self.backend,
            url: self.url.clone(),
            schema: None,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Every text value stored in every table, for "no plaintext secret" checks.
    pub async fn dump_text(&self) -> String {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&self.url)
            .await
            .expect("connect");
        let mut out = String::new();
        for (table, columns) in [
            ("objects", "kind || ' ' || id || ' ' || name || ' ' || body"),
            (
                "api_keys",
                "id || ' ' || consumer_id || ' ' || digest || ' ' || prefix || ' ' || COALESCE(name, '')",
            ),
            ("admin_tokens", "id || ' ' || digest || ' ' || name"),
            (
                "changes",
                "action || ' ' || kind || ' ' || object_id || ' ' || name",
            ),
        ] {
            let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {columns} FROM {table}"
            )))
            .fetch_all(&mut conn)
            .await
            .expect("dump table");
            for (row,) in rows {
                out.push_str(&row);
                out.push('\n');
            }
        }
        conn.close().await.ok();
        if self.backend == Backend::Sqlite {
            // The raw file bytes too, WAL included.
            for entry in std::fs::read_dir(self.dir.path())
                .expect("read dir")
                .flatten()
            {
                let bytes = std::fs::read(entry.path()).unwrap_or_default();
                out.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        out
    }

    /// Runs one query returning a single i64.
    pub async fn scalar(&self, sql: &'static str) -> i64 {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&self.url)
            .await
            .expect("connect");
        let (value,): (i64,) = sqlx::query_as(sql)
            .fetch_one(&mut conn)
            .await
            .expect("query");
        conn.close().await.ok();
        value
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            // Drop runs outside async context: clean up on a thread of its own.
            let url = postgres_base_url();
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(async move {
                        if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await {
                            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                                "DROP SCHEMA IF EXISTS {schema} CASCADE"
                            )))
                            .execute(&mut conn)
                            .await;
                            let _ = conn.close().await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

/// A running control plane and a client holding a valid admin token.
pub struct TestApp {
    pub base: String,
    pub cluster: std::net::SocketAddr,
    pub token: String,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub generated_token: Option<String>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Cluster token of every test control plane.
pub const CLUSTER_TOKEN: &str = "test-cluster-token-0123456789";

pub fn settings_for(db: &TestDb, admin_token: Option<&str>) -> Settings {
    settings_with_cluster(db, admin_token, "127.0.0.1:0".parse().expect("addr"))
}

pub fn settings_with_cluster(
    db: &TestDb,
    admin_token: Option<&str>,
    cluster: std::net::SocketAddr,
) -> Settings {
    Settings {
        database_url: Some(Secret::new(db.url.clone())),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        admin_token: admin_token.map(Secret::new),
        data_dir: db.dir.path().to_path_buf(),
        cluster_listen: cluster,
        cluster_token: Some(Secret::new(CLUSTER_TOKEN)),
        config_poll_seconds: 5,
        // Short, so cluster facts (live data planes) reach test nodes every second.
        data_plane_timeout_seconds: 6,
        cluster_tls_cert_file: None,
        cluster_tls_key_file: None,
        redis_url: Some(Secret::new(REDIS_URL)),
        redis_prefix: "tollgate".into(),
    }
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        let db = TestDb::new(backend).await;
        let token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
        Self::spawn_on(db, Some(&token)).await
    }

    /// Starts a control plane on an existing database; without a token, uses the generated one.
    pub async fn spawn_on(db: TestDb, admin_token: Option<&str>) -> Self {
        Self::spawn_with(db, admin_token, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Starts a control plane on `db` whose cluster listener binds `cluster`.
    pub async fn spawn_with(
        db: TestDb,
        admin_token: Option<&str>,
        cluster: std::net::SocketAddr,
    ) -> Self {
        let settings = settings_with_cluster(&db, admin_token, cluster);
        Self::start(db, &settings, admin_token).await
    }

    /// A control plane reading limiter counters under `prefix` (for the usage endpoint).
    pub async fn spawn_prefixed(backend: Backend, prefix: &str) -> Self {
        let db = TestDb::new(backend).await;
        let token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
        let mut settings = settings_for(&db, Some(&token));
        settings.redis_prefix = prefix.to_string();
        Self::start(db, &settings, Some(&token)).await
    }

    /// Starts a control plane on `db` with `settings` (see [`settings_for`]).
    pub async fn start(db: TestDb, settings: &Settings, admin_token: Option<&str>) -> Self {
        let app = Application::build(settings)
            .await
            .expect("control plane starts");
        let cluster = app.cluster_addr().expect("cluster listener is on");
        let generated_token = app.generated_admin_token().map(str::to_string);
        let token = admin_token
            .map(str::to_string)
            .or_else(|| generated_token.clone())
            .unwrap_or_default();
        let base = format!("http://{}", app.admin_addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            base,
            cluster,
            token,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            db,
            generated_token,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Stops the server gracefully and hands back the database.
    pub async fn stop(mut self) -> TestDb {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server stops cleanly");
        }
        let backend = self.db.backend;

        std::mem::replace(
            &mut self.db,
            TestDb {
                backend,
                url: String::new(),
                schema: None,
                dir: tempfile::tempdir().expect("temp dir"),
            },
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/admin/v1{path}", self.base)
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(&body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, Some(&body)).await
    }
    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PATCH, path, Some(&body)).await
    }
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// Creates a resource, asserting 201, and returns it.
    pub async fn create(&self, path: &str, body: Value) -> Value {
        let (status, created) = self.post(path, body).await;
        assert_eq!(status, 201, "creating at {path}: {created}");
        created
    }

    /// Creates an upstream `name` with the single target `url`.
    pub async fn upstream_at(&self, name: &str, url: &str) -> Value {
        self.create(
            "/upstreams",
            serde_json::json!({"name": name, "targets": [{"url": url}]}),
        )
        .await
    }

    /// The current config revision, from `/status`.
    pub async fn revision(&self) -> i64 {
        let (status, body) = self.get("/status").await;
        assert_eq!(status, 200, "{body}");
        body["revision"].as_i64().expect("revision is a number")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn name(backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::Backend::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::Backend::Sqlite).await;
                }
            )*
        }
    };
}

// ---------------------------------------------------------------- data planes and upstreams

/// A request as an upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub body_bytes: u64,
}

/// A real HTTP upstream on loopback that records every request it gets.
///
/// Paths: `/slow/{ms}` waits before answering; `/download/{bytes}` streams that many bytes;
/// anything else consumes the body (streaming, counting bytes) and answers a JSON echo
/// naming this upstream.
pub struct TestUpstream {
    pub addr: std::net::SocketAddr,
    pub name: String,
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl TestUpstream {
    pub async fn start(name: &str) -> Self {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (name_owned, seen_task, stop_task) = (name.to_string(), seen.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                    () = stop_task.cancelled() => return,
                };
                let (name, seen) = (name_owned.clone(), seen_task.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let (name, seen) = (name.clone(), seen.clone());
                            async move {
                                let (parts, mut body) = request.into_parts();
                                let mut body_bytes = 0u64;
                                while let Some(frame) = body.frame().await {
                                    match frame {
                                        Ok(frame) => {
                                            body_bytes +=
                                                frame.data_ref().map_or(0, |d| d.len() as u64)
                                        }
                                        Err(_) => break,
                                    }
                                }
                                let path = parts.uri.path().to_string();
                                seen.lock().expect("lock").push(Seen {
                                    method: parts.method.to_string(),
                                    path: path.clone(),
                                    query: parts.uri.query().map(str::to_string),
                                    headers: parts.headers.clone(),
                                    body_bytes,
                                });
                                if let Some(ms) = path
                                    .strip_prefix("/slow/")
                                    .and_then(|m| m.parse::<u64>().ok())
                                {
                                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                                }
                                let body: http_body_util::combinators::BoxBody<
                                    bytes::Bytes,
                                    std::convert::Infallible,
                                > = if let Some(n) = path
                                    .strip_prefix("/download/")
                                    .and_then(|n| n.parse::<u64>().ok())
                                {
                                    download_body(n)
                                } else {
                                    let text = serde_json::json!({"upstream": name, "path": path, "body_bytes": body_bytes}).to_string();
                                    http_body_util::Full::new(bytes::Bytes::from(text)).boxed()
                                };
                                Ok::<_, std::convert::Infallible>(http::Response::new(body))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            name: name.to_string(),
            seen,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A request body streamed as `chunks` chunks of `len` copies of `byte` (no Content-Length:
/// HTTP/1 sends it chunked, HTTP/2 as DATA frames); never held whole.
pub fn streamed_body(byte: u8, len: usize, chunks: usize) -> reqwest::Body {
    let chunk = bytes::Bytes::from(vec![byte; len]);
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    reqwest::Body::wrap_stream(stream)
}

/// A body of `n` bytes produced 64 KiB at a time, never held in memory whole.
pub fn download_body(
    n: u64,
) -> http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(chunk.len() as u64);
            let frame = hyper::body::Frame::data(chunk.slice(..take as usize));
            Some((Ok::<_, std::convert::Infallible>(frame), left - take))
        }
    });
    http_body_util::StreamBody::new(stream).boxed()
}

/// A data plane running in this process.
pub struct TestDp {
    pub proxy: std::net::SocketAddr,
    /// The node's clock, for tests that cross a quota period.
    pub clock: std::sync::Arc<tollgate_data_plane::state::Clock>,
    pub status: std::net::SocketAddr,
    pub node_id: String,
    pub dir: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestDp {
    /// Starts a data plane syncing from `cluster` with its data in `dir`.
    pub async fn start(
        cluster: std::net::SocketAddr,
        dir: &std::path::Path,
        node_id: &str,
    ) -> Self {
        Self::start_with(cluster, dir, node_id, None, "tollgate", 250).await
    }

    /// Like [`TestDp::start`], limiting through Redis at `redis_url` under `redis_prefix`.
    /// (Debug builds under a parallel test run answer slower than production: 250 ms is a
    /// timeout that only a real outage reaches.)
    pub async fn start_with(
        cluster: std::net::SocketAddr,
        dir: &std::path::Path,
        node_id: &str,
        redis_url: Option<&str>,
        redis_prefix: &str,
        redis_timeout_ms: u64,
    ) -> Self {
        Self::start_configured(cluster, dir, node_id, |settings| {
            settings.redis_url = redis_url.map(Secret::new);
            settings.redis_prefix = redis_prefix.to_string();
            settings.redis_timeout_ms = redis_timeout_ms;
        })
        .await
    }

    /// Like [`TestDp::start`], with the settings adjusted by `configure`.
    pub async fn start_configured(
        cluster: std::net::SocketAddr,
        dir: &std::path::Path,
        node_id: &str,
        configure: impl FnOnce(&mut tollgate_data_plane::Settings),
    ) -> Self {
        let mut settings = tollgate_data_plane::Settings {
            control_plane_url: format!("http://{cluster}"),
            cluster_token: Some(Secret::new(CLUSTER_TOKEN)),
            proxy_listen: "127.0.0.1:0".parse().expect("addr"),
            status_listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.to_path_buf(),
            node_id: Some(node_id.to_string()),
            worker_threads: None,
            trusted_proxies: vec!["10.0.0.0/8".parse().expect("cidr")],
            heartbeat_seconds: 1,
            max_header_bytes: 16 * 1024,
            header_timeout_ms: 30_000,
            send_timeout_ms: 60_000,
            body_timeout_ms: 60_000,
            redis_url: None,
            redis_prefix: "tollgate".into(),
            jwks_ca_file: None,
            cluster_ca_file: None,
            jwks_min_refresh_ms: 100,
            redis_timeout_ms: 250,
            limiter_pacing: tollgate_data_plane::pacing::Mode::Auto,
        };
        configure(&mut settings);
        let dp = tollgate_data_plane::DataPlane::build(&settings)
            .await
            .expect("data plane starts");
        let (proxy, status) = (dp.proxy_addr(), dp.status_addr());
        let clock = dp.clock();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dp.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            proxy,
            status,
            clock,
            node_id: node_id.to_string(),
            dir: dir.to_path_buf(),
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("dp task").expect("dp stops cleanly");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// Waits (up to 3 s) until the node serves `cp`'s current revision, and returns it.
    pub async fn synced_with(&self, cp: &TestApp) -> i64 {
        let revision = cp.revision().await;
        let client = reqwest::Client::new();
        wait_until(
            Duration::from_secs(3),
            "data plane at the control plane's revision",
            || async { self.revision(&client).await == Some(revision) },
        )
        .await;
        revision
    }

    /// The revision the node serves, from `/readyz` (None while not ready).
    pub async fn revision(&self, client: &reqwest::Client) -> Option<i64> {
        let response = client
            .get(format!("http://{}/readyz", self.status))
            .send()
            .await
            .ok()?;
        if response.status() != 200 {
            return None;
        }
        response.json::<Value>().await.ok()?["revision"].as_i64()
    }
}

impl Drop for TestDp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Polls `check` every 5 ms until it holds; returns how long that took, or panics after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends raw bytes on a new connection and returns everything the server answers until it
/// closes, or goes quiet (a second before the first byte, 200 ms after).
pub async fn raw_request(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        let quiet = if out.is_empty() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200)
        };
        match tokio::time::timeout(quiet, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Sends `bytes` on a new connection and reads until the proxy closes it (at most 20 s).
pub async fn raw_request_to_close(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).to_string()
}

// ---------------------------------------------------------------- Redis

/// The machine's Redis, shared by tests that each use their own key prefix.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// A key prefix no other test uses.
pub fn redis_prefix() -> String {
    format!("tgtest-{}", uuid::Uuid::new_v4().simple())
}

/// Deletes every key under `prefix` (its hash tag) from the shared Redis.
pub async fn redis_cleanup(prefix: &str) {
    if let Ok(output) = tokio::process::Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "6379",
            "--scan",
            "--pattern",
            &format!("{{{prefix}}}*"),
        ])
        .output()
        .await
    {
        let keys: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !keys.is_empty() {
            let _ = tokio::process::Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", "6379", "DEL"])
                .args(&keys)
                .output()
                .await;
        }
    }
}

/// A private redis-server on a free port, for tests that kill and restart it.
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut redis = Self { port, child: None };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts (it is on the machine; see README)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback address nothing listens on (bound, then released).
pub fn closed_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}
