//! The real `tollgate` binary: the quickstart (the README's run command), SIGTERM handling, and
//! a data-plane process streaming 100 MB each way with flat memory.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Backend, CLUSTER_TOKEN, TestApp, TestUpstream, wait_until};
use futures_util::StreamExt;
use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_tollgate");

/// Kills the child when dropped, so a failing test leaves no process behind.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Peak and current resident memory of a process, in KiB, from /proc.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_serves_the_demo_and_stops_on_sigterm() {
    let mut child = Command::new(BINARY)
        .args([
            "quickstart",
            "--admin-listen",
            "127.0.0.1:0",
            "--proxy-listen",
            "127.0.0.1:0",
            "--status-listen",
            "127.0.0.1:0",
            "--cluster-listen",
            "127.0.0.1:0",
        ])
        .env("TOLLGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("quickstart starts");
    let stdout = child.stdout.take().expect("stdout");
    let process = Process(child);
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("utf-8 output");
            let done = line.contains("QUICKSTART READY");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    let lines = tokio::time::timeout(Duration::from_secs(30), lines)
        .await
        .expect("quickstart prints its banner in time")
        .expect("reader");
    let value_of = |label: &str| {
        lines
            .iter()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(label)
                    .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_else(|| panic!("no {label} line in {lines:#?}"))
    };
    let (proxy, admin, key, token) = (
        value_of("proxy"),
        value_of("admin API"),
        value_of("demo API key"),
        value_of("admin token"),
    );
    let client = reqwest::Client::new();

    // The curl lines the banner prints work.
    let public = client
        .get(format!("{proxy}/public/hello"))
        .send()
        .await
        .expect("public");
    assert_eq!(public.status(), 200);
    let denied = client
        .get(format!("{proxy}/echo/hello"))
        .send()
        .await
        .expect("no key");
    assert_eq!(denied.status(), 401);
    let echoed: Value = client
        .get(format!("{proxy}/echo/hello"))
        .header("X-API-Key", &key)
        .send()
        .await
        .expect("with key")
        .json()
        .await
        .expect("echo json");
    assert_eq!(echoed["path"], "/hello");
    assert_eq!(echoed["headers"]["x-consumer-username"], "demo");
    assert!(echoed["headers"].get("x-api-key").is_none());
    let routes = client
        .get(format!("{admin}/routes"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("admin");
    assert_eq!(routes.status(), 200);

    // SIGTERM: a clean exit.
    let mut process = process;
    sigterm(&process.0);
    let status = tokio::task::spawn_blocking(move || {
        let status = process.0.wait();
        (status, process)
    });
    let (status, _process) = tokio::time::timeout(Duration::from_secs(15), status)
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(
        status.expect("status").success(),
        "graceful shutdown exits 0"
    );
}

/// Spawns `command` with its log on a pipe and returns the process and the `name=value` fields
/// `names` of the first log line containing `marker` (the rest of the log is drained).
async fn spawn_logged(
    mut command: Command,
    marker: &'static str,
    names: &'static [&'static str],
) -> (Process, Vec<String>) {
    let mut child = command
        .env("TOLLGATE_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the process starts");
    let stderr = child.stderr.take().expect("stderr");
    let process = Process(child);
    let fields = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let line = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.contains(marker))
            .expect("startup line");
        // Keep draining so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        names
            .iter()
            .map(|name| {
                let start = line.find(&format!("{name}=")).expect("field") + name.len() + 1;
                line[start..]
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    })
    .await
    .expect("reader");
    (process, fields)
}

/// A `tollgate data-plane` process syncing from `cluster`: the process, its proxy and status
/// addresses.
async fn spawn_data_plane(
    cluster: std::net::SocketAddr,
    dir: &std::path::Path,
) -> (Process, String, String) {
    let mut command = Command::new(BINARY);
    command
        .arg("data-plane")
        .env("TOLLGATE_CONTROL_PLANE_URL", format!("http://{cluster}"))
        .env("TOLLGATE_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .env("TOLLGATE_PROXY_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_STATUS_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_DATA_DIR", dir)
        .env("TOLLGATE_WORKER_THREADS", "2");
    // The bound ports are in the startup log line: `data plane serving proxy=… status=…`.
    let (process, fields) = spawn_logged(command, "data plane serving", &["proxy", "status"]).await;
    let [proxy, status] = <[String; 2]>::try_from(fields).expect("two fields");
    (process, proxy, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_process_streams_100_mb_each_way_with_flat_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let cp = TestApp::spawn(Backend::Postgres).await;
    let upstream = TestUpstream::start("big").await;
    cp.upstream_at("big", &upstream.url()).await;
    cp.create(
        "/routes",
        json!({"name": "big", "paths": ["/"], "upstream": "big"}),
    )
    .await;

    let dir = tempfile::tempdir().expect("dir");
    let (process, proxy, status) = spawn_data_plane(cp.cluster, dir.path()).await;
    let pid = process.0.id();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let base = format!("http://{proxy}");
    // Ready is not enough: the node must serve the revision that has the route.
    let revision = cp.revision().await;
    wait_until(
        Duration::from_secs(15),
        "data plane at the current revision",
        || async {
            let Ok(response) = client.get(format!("http://{status}/readyz")).send().await else {
                return false;
            };
            response
                .json::<Value>()
                .await
                .is_ok_and(|ready| ready["revision"] == revision)
        },
    )
    .await;
    let (_, baseline) = memory_kib(pid);

    // Upload: generated 64 KiB at a time, never held whole by anyone.
    const CHUNK: usize = 64 * 1024;
    let body = common::streamed_body(b'u', CHUNK, (SIZE / CHUNK as u64) as usize);
    let response = client
        .post(format!("{base}/upload"))
        .body(body)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 200);
    let echoed: Value = response.json().await.expect("json");
    assert_eq!(
        echoed["body_bytes"].as_u64(),
        Some(SIZE),
        "every byte reached the upstream"
    );

    // Download: counted as it streams.
    let response = client
        .get(format!("{base}/download/{SIZE}"))
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    let mut received = 0u64;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        received += chunk.expect("chunk").len() as u64;
    }
    assert_eq!(received, SIZE);

    let (peak, _) = memory_kib(pid);
    eprintln!("data plane RSS: {baseline} KiB after start, peak {peak} KiB after 2 x 100 MiB");
    assert!(
        peak < baseline + 40 * 1024,
        "memory stays flat: peak {peak} KiB vs {baseline} KiB at start"
    );
    drop(process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_apply_commands_round_trip_the_config() {
    let cp = TestApp::spawn(Backend::Sqlite).await;
    cp.create(
        "/upstreams",
        json!({"name": "a", "targets": [{"url": "http://10.0.0.1:80"}]}),
    )
    .await;
    let run = |args: Vec<String>, token: String| {
        let base = cp.base.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(BINARY)
                .args(&args)
                .env("TOLLGATE_ADMIN_URL", base)
                .env("TOLLGATE_ADMIN_TOKEN", token)
                .env("TOLLGATE_LOG", "warn")
                .output()
                .expect("runs")
        })
    };
    let exported = run(vec!["export".into()], cp.token.clone())
        .await
        .expect("task");
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let mut document: Value = serde_json::from_slice(&exported.stdout).expect("export prints JSON");
    assert_eq!(document["upstreams"][0]["name"], "a");

    document["upstreams"][0]["name"] = json!("b");
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("config.json");
    std::fs::write(&file, document.to_string()).expect("write");
    let file = file.display().to_string();
    let before = cp.revision().await;
    let dry = run(
        vec!["apply".into(), file.clone(), "--dry-run".into()],
        cp.token.clone(),
    )
    .await
    .expect("task");
    let diff: Value = serde_json::from_slice(&dry.stdout).expect("diff JSON");
    assert_eq!(diff["created"], json!(["upstream/b"]));
    assert_eq!(diff["deleted"], json!(["upstream/a"]));
    assert_eq!(cp.revision().await, before);

    let applied = run(vec!["apply".into(), file.clone()], cp.token.clone())
        .await
        .expect("task");
    assert!(applied.status.success());
    assert_eq!(cp.revision().await, before + 1);
    assert_eq!(cp.get("/upstreams/b").await.0, 200);

    let refused = run(vec!["apply".into(), file], "wrong-token-0123456789".into())
        .await
        .expect("task");
    assert!(!refused.status.success(), "a wrong token fails the command");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
}

/// The issue's outage, with real processes: a `tollgate control-plane` process killed with
/// SIGKILL (no goodbye on the sync connection) while four clients load the data-plane process:
/// every request before, during and after the kill is answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_control_plane_process_under_load_fails_no_request() {
    let db = common::TestDb::new(Backend::Postgres).await;
    let data = tempfile::tempdir().expect("dir");
    let token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
    let mut command = Command::new(BINARY);
    command
        .arg("control-plane")
        .env("TOLLGATE_DATABASE_URL", &db.url)
        .env("TOLLGATE_ADMIN_TOKEN", &token)
        .env("TOLLGATE_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .env("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_CLUSTER_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_DATA_DIR", data.path());
    let (control_plane, fields) =
        spawn_logged(command, "control plane serving", &["admin", "cluster"]).await;
    let admin = fields[0].clone();
    let cluster: std::net::SocketAddr = fields[1]
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .parse()
        .expect("cluster address");

    let upstream = TestUpstream::start("u").await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    for (path, body) in [
        (
            "upstreams",
            json!({"name": "u", "targets": [{"url": upstream.url()}]}),
        ),
        (
            "routes",
            json!({"name": "r", "paths": ["/r"], "upstream": "u"}),
        ),
    ] {
        let response = client
            .post(format!("http://{admin}/admin/v1/{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .expect("admin API");
        assert_eq!(response.status(), 201, "{path}");
    }

    let dir = tempfile::tempdir().expect("dir");
    let (_data_plane, proxy, _) = spawn_data_plane(cluster, dir.path()).await;
    let url = format!("http://{proxy}/r");
    wait_until(Duration::from_secs(15), "the route served", || async {
        client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match client.get(&url).send().await {
                        Ok(response) if response.status() == 200 => ok += 1,
                        other => failed.push(format!("{other:?}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(control_plane); // SIGKILL
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for task in load {
        let (answered, errors) = task.await.expect("load task");
        ok += answered;
        failed.extend(errors);
    }
    eprintln!("{ok} requests answered 200 across the control plane's SIGKILL");
    assert!(failed.is_empty(), "failed: {failed:?}");
    assert!(ok >= 100, "load ran: {ok} requests");
}
