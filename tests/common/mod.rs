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
    Settings {
        database_url: Some(Secret::new(db.url.clone())),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        admin_token: admin_token.map(Secret::new),
        data_dir: db.dir.path().to_path_buf(),
        cluster_listen: "127.0.0.1:0".parse().expect("addr"),
        cluster_token: Some(Secret::new(CLUSTER_TOKEN)),
        config_poll_seconds: 5,
        data_plane_timeout_seconds: 30,
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
        let app = Application::build(&settings_for(&db, admin_token))
            .await
            .expect("control plane starts");
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
