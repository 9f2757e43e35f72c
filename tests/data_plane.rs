//! Data plane end to end: real control planes on Postgres, real data planes, real upstreams
//! on loopback, all on random ports.

mod common;

use std::time::Duration;

use common::{Backend, TestApp, TestDp, TestUpstream, wait_until};
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn status_of(client: &reqwest::Client, url: &str) -> u16 {
    client
        .get(url)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

async fn upstream_name(client: &reqwest::Client, url: &str) -> Option<String> {
    let response = client.get(url).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    Some(
        response.json::<Value>().await.ok()?["upstream"]
            .as_str()?
            .to_string(),
    )
}

/// A raw sync connection, as a data plane opens it.
type SyncSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the sync WebSocket of the control plane at `cluster`, presenting `bearer`.
async fn sync_socket(
    cluster: std::net::SocketAddr,
    bearer: &str,
) -> Result<SyncSocket, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{cluster}/cluster/v1/sync")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {bearer}").parse().expect("header value"),
    );
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

/// Connects with the cluster token and says hello as `node_id` speaking `protocol`, holding
/// `revision` (with a hash no snapshot has).
async fn hello(
    cluster: std::net::SocketAddr,
    node_id: &str,
    protocol: u32,
    revision: Option<i64>,
) -> SyncSocket {
    use futures_util::SinkExt;
    let mut ws = sync_socket(cluster, common::CLUSTER_TOKEN)
        .await
        .expect("the cluster token is accepted");
    let hello = json!({"type": "hello", "node_id": node_id, "hostname": "h", "version": "0",
        "protocol": protocol, "revision": revision, "hash": revision.map(|_| "elsewhere")});
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        hello.to_string().into(),
    ))
    .await
    .expect("hello sent");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_reach_the_data_plane_within_a_second() {
    let cp = TestApp::spawn(Backend::Postgres).await;
    let (blue, green) = (
        TestUpstream::start("blue").await,
        TestUpstream::start("green").await,
    );
    let dir = tempfile::tempdir().expect("dir");
    let dp = TestDp::start(cp.cluster, dir.path(), "dp-1").await;
    let client = client();
    let limit = Duration::from_secs(1);

    // Before any route: 404 once the (empty) config is loaded.
    wait_until(Duration::from_secs(5), "data plane ready", || async {
        dp.revision(&client).await.is_some()
    })
    .await;
    assert_eq!(status_of(&client, &dp.url("/api/x")).await, 404);

    cp.upstream_at("blue", &blue.url()).await;
    cp.upstream_at("green", &green.url()).await;
    cp.create(
        "/routes",
        json!({"name": "api", "paths": ["/api"], "upstream": "blue"}),
    )
    .await;
    let created = wait_until(limit, "route served", || async {
        upstream_name(&client, &dp.url("/api/x")).await.as_deref() == Some("blue")
    })
    .await;

    cp.patch("/routes/api", json!({"upstream": "green"})).await;
    let updated = wait_until(limit, "route updated", || async {
        upstream_name(&client, &dp.url("/api/x")).await.as_deref() == Some("green")
    })
    .await;

    cp.delete("/routes/api").await;
    let deleted = wait_until(limit, "route deleted", || async {
        status_of(&client, &dp.url("/api/x")).await == 404
    })
    .await;
    eprintln!(
        "propagation (write acknowledged → visible on the DP): create {created:?}, update {updated:?}, delete {deleted:?}"
    );

    // The control plane knows the node and its applied revision.
    let revision = cp.revision().await;
    wait_until(Duration::from_secs(2), "ack recorded", || async {
        let (_, planes) = cp.get("/data-planes").await;
        planes[0]["applied_revision"] == revision && planes[0]["in_sync"] == true
    })
    .await;
    let (_, planes) = cp.get("/data-planes").await;
    assert_eq!(planes[0]["node_id"], "dp-1");
    assert_eq!(planes[0]["state"], "synced");
    assert_eq!(planes[0]["live"], true);
    dp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_planes_on_two_replicas_converge() {
    let cp1 = TestApp::spawn(Backend::Postgres).await;
    let cp2 = TestApp::spawn_on(cp1.db.share(), Some(&cp1.token)).await;
    let upstream = TestUpstream::start("u").await;
    let (dir1, dir2) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let dp1 = TestDp::start(cp1.cluster, dir1.path(), "dp-a").await;
    let dp2 = TestDp::start(cp2.cluster, dir2.path(), "dp-b").await;
    let client = client();

    cp1.upstream_at("u", &upstream.url()).await;
    cp2.create(
        "/routes",
        json!({"name": "one", "paths": ["/one"], "upstream": "u"}),
    )
    .await;
    cp1.create(
        "/routes",
        json!({"name": "two", "paths": ["/two"], "upstream": "u"}),
    )
    .await;
    cp2.patch("/routes/one", json!({"paths": ["/uno"]})).await;
    let revision = cp1.revision().await;
    assert_eq!(cp2.revision().await, revision);

    for dp in [&dp1, &dp2] {
        let took = wait_until(
            Duration::from_secs(2),
            "both data planes at the last revision",
            || async { dp.revision(&client).await == Some(revision) },
        )
        .await;
        eprintln!("{} converged in {took:?}", dp.node_id);
        assert_eq!(status_of(&client, &dp.url("/uno")).await, 200);
        assert_eq!(status_of(&client, &dp.url("/two")).await, 200);
        assert_eq!(status_of(&client, &dp.url("/one")).await, 404);
    }
    // Either replica reports both nodes, in sync.
    wait_until(Duration::from_secs(2), "both acks recorded", || async {
        let (_, planes) = cp2.get("/data-planes").await;
        planes
            .as_array()
            .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["in_sync"] == true))
    })
    .await;
    let (_, planes) = cp1.get("/data-planes").await;
    let replicas: std::collections::BTreeSet<&str> = planes
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|p| p["control_plane"].as_str())
        .collect();
    assert_eq!(
        replicas.len(),
        2,
        "each node is recorded against its own replica: {planes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_survives_control_plane_outage_and_restart() {
    let cp = TestApp::spawn(Backend::Postgres).await;
    let cluster = cp.cluster;
    let upstream = TestUpstream::start("u").await;
    let dir = tempfile::tempdir().expect("dir");
    let dp = TestDp::start(cluster, dir.path(), "dp-1").await;
    let client = client();
    cp.upstream_at("u", &upstream.url()).await;
    cp.create(
        "/routes",
        json!({"name": "r", "paths": ["/r"], "upstream": "u"}),
    )
    .await;
    let revision = dp.synced_with(&cp).await;

    // Control plane gone: every request still succeeds.
    let (token, db) = (cp.token.clone(), cp.stop().await);
    let mut ok = 0;
    for _ in 0..200 {
        if status_of(&client, &dp.url("/r")).await == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 200, "100% success while the control plane is down");

    // Data plane restarted while the control plane is down: serves from its disk snapshot.
    dp.stop().await;
    let dp = TestDp::start(cluster, dir.path(), "dp-1").await;
    assert_eq!(
        dp.revision(&client).await,
        Some(revision),
        "ready from disk at once"
    );
    for _ in 0..50 {
        assert_eq!(status_of(&client, &dp.url("/r")).await, 200);
    }

    // Control plane back (same database, same cluster address): the node catches up.
    let cp = TestApp::spawn_with(db, Some(&token), cluster).await;
    cp.create(
        "/routes",
        json!({"name": "later", "paths": ["/later"], "upstream": "u"}),
    )
    .await;
    let revision = cp.revision().await;
    let took = wait_until(
        Duration::from_secs(10),
        "caught up after reconnect",
        || async { dp.revision(&client).await == Some(revision) },
    )
    .await;
    eprintln!("reconnected and caught up in {took:?}");
    assert_eq!(status_of(&client, &dp.url("/later")).await, 200);
    dp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_snapshot_is_nacked_and_the_previous_one_kept() {
    let cp = TestApp::spawn(Backend::Postgres).await;
    let upstream = TestUpstream::start("u").await;
    let dir = tempfile::tempdir().expect("dir");
    let dp = TestDp::start(cp.cluster, dir.path(), "dp-1").await;
    let client = client();
    cp.upstream_at("u", &upstream.url()).await;
    cp.create(
        "/routes",
        json!({"name": "r", "paths": ["/r"], "upstream": "u"}),
    )
    .await;
    let good = cp.revision().await;
    wait_until(Duration::from_secs(2), "good config applied", || async {
        dp.revision(&client).await == Some(good)
    })
    .await;

    // The control plane only checks the PEM's armour; the data plane parses the key and refuses.
    cp.create(
        "/jwt-issuers",
        json!({"name": "broken", "issuer": "i", "algorithms": ["RS256"],
               "public_key_pem": "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"}),
    )
    .await;
    cp.create(
        "/routes",
        json!({"name": "new", "paths": ["/new"], "upstream": "u"}),
    )
    .await;
    wait_until(Duration::from_secs(2), "nack recorded", || async {
        let (_, planes) = cp.get("/data-planes").await;
        planes[0]["state"] == "nacked"
    })
    .await;
    let (_, planes) = cp.get("/data-planes").await;
    let error = planes[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("public_key_pem"),
        "nack reason shown: {error}"
    );
    assert_eq!(planes[0]["applied_revision"], good);
    assert_eq!(planes[0]["in_sync"], false);
    // Still serving the previous config.
    assert_eq!(dp.revision(&client).await, Some(good));
    assert_eq!(status_of(&client, &dp.url("/r")).await, 200);
    assert_eq!(status_of(&client, &dp.url("/new")).await, 404);

    // Fixing the config is picked up.
    cp.delete("/jwt-issuers/broken").await;
    let fixed = cp.revision().await;
    wait_until(Duration::from_secs(2), "fixed config applied", || async {
        dp.revision(&client).await == Some(fixed)
    })
    .await;
    assert_eq!(status_of(&client, &dp.url("/new")).await, 200);
    wait_until(
        Duration::from_secs(2),
        "the ack clears the nack reason",
        || async {
            let (_, planes) = cp.get("/data-planes").await;
            planes[0]["error"] == Value::Null && planes[0]["state"] == "synced"
        },
    )
    .await;
}

/// The cluster listener refuses a wrong token before any sync, and a node speaking another sync
/// protocol after its hello (recorded `refused`, with why); a node that says hello and then
/// goes silent (a half-open connection: no heartbeat, no frame) is dropped after the idle
/// timeout and recorded as disconnected, while the control plane keeps sending it cluster
/// facts in the meantime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_data_planes_are_dropped_and_wrong_cluster_tokens_refused() {
    use futures_util::StreamExt;

    let db = common::TestDb::new(Backend::Postgres).await;
    let token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
    let mut settings = common::settings_for(&db, Some(&token));
    settings.data_plane_timeout_seconds = 1;
    let cp = TestApp::start(db, &settings, Some(&token)).await;

    match sync_socket(cp.cluster, "not-the-cluster-token").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("a wrong cluster token was not refused with 401: {other:?}"),
    }

    // A node speaking another sync protocol (another version) is refused, and shown so.
    let mut ws = hello(cp.cluster, "future", 99, None).await;
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(message)) = ws.next().await {
            assert!(message.is_close(), "nothing but a close: {message:?}");
        }
    })
    .await;
    assert!(closed.is_ok(), "a node of another protocol is not kept");
    let (_, planes) = cp.get("/data-planes").await;
    assert_eq!(planes[0]["node_id"], "future");
    assert_eq!(planes[0]["state"], "refused");
    assert_eq!(planes[0]["live"], false);
    let error = planes[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("sync protocol 99"), "{error}");

    let mut ws = hello(cp.cluster, "silent", 1, None).await;
    let started = std::time::Instant::now();
    let mut frames = 0;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
            frames += 1;
        }
    })
    .await;
    let silent_for = started.elapsed();
    assert!(ended.is_ok(), "the silent node was never dropped");
    assert!(
        silent_for >= Duration::from_millis(900),
        "dropped before the idle timeout: {silent_for:?}"
    );
    assert!(
        frames >= 2,
        "cluster facts kept coming meanwhile ({frames} frames)"
    );
    wait_until(
        Duration::from_secs(2),
        "recorded as disconnected",
        || async {
            let (_, planes) = cp.get("/data-planes").await;
            planes
                .as_array()
                .into_iter()
                .flatten()
                .any(|plane| plane["node_id"] == "silent" && plane["state"] == "disconnected")
        },
    )
    .await;
}

/// A control plane with a TLS identity on its cluster listener: a data plane given an
/// `https://` URL and the CA syncs over TLS and serves; one that does not trust the
/// certificate, and one that speaks in clear, never get a snapshot (nor are they recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_planes_sync_over_tls_when_the_control_plane_has_a_certificate() {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let files = tempfile::tempdir().expect("dir");
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");

    let db = common::TestDb::new(Backend::Postgres).await;
    let token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
    let mut settings = common::settings_for(&db, Some(&token));
    settings.cluster_tls_cert_file = Some(cert.clone());
    settings.cluster_tls_key_file = Some(key);
    let mut broken = settings.clone();
    broken.cluster_tls_key_file = Some(cert.clone());
    let refused = tollgate_control_plane::Application::build(&broken).await;
    let error = refused.err().map(|error| format!("{error:#}"));
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("no private key")),
        "a key file without a key: {error:?}"
    );
    let cp = TestApp::start(db, &settings, Some(&token)).await;
    let upstream = TestUpstream::start("u").await;
    cp.upstream_at("u", &upstream.url()).await;
    cp.create(
        "/routes",
        json!({"name": "r", "paths": ["/r"], "upstream": "u"}),
    )
    .await;
    let url = format!("https://localhost:{}", cp.cluster.port());
    let dirs = [(); 3].map(|()| tempfile::tempdir().expect("dir"));

    let trusting = TestDp::start_configured(cp.cluster, dirs[0].path(), "trusting", |s| {
        s.control_plane_url = url.clone();
        s.cluster_ca_file = Some(cert.clone());
    })
    .await;
    trusting.synced_with(&cp).await;
    let client = client();
    assert_eq!(status_of(&client, &trusting.url("/r/x")).await, 200);

    let doubting = TestDp::start_configured(cp.cluster, dirs[1].path(), "doubting", |s| {
        s.control_plane_url = url.clone();
    })
    .await;
    let clear = TestDp::start_configured(cp.cluster, dirs[2].path(), "clear", |_| {}).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(doubting.revision(&client).await, None, "an unknown CA");
    assert_eq!(clear.revision(&client).await, None, "no TLS");
    let (_, planes) = cp.get("/data-planes").await;
    let names: Vec<_> = planes
        .as_array()
        .expect("list")
        .iter()
        .map(|plane| plane["node_id"].clone())
        .collect();
    assert_eq!(names, [json!("trusting")]);
}

/// A node that connects holding a newer revision than the replica has published (it came from
/// a replica that is ahead) is answered from the store, not sent back to the older config
/// until the replica's poll (5 s here) catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ahead_of_the_replica_gets_the_stores_revision_not_an_older_one() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let cp = TestApp::spawn(Backend::Postgres).await;
    cp.upstream_at("u", "http://127.0.0.1:9").await;
    let published = cp.revision().await;
    // Another replica's commit whose NOTIFY this replica has not seen: the store moves on
    // behind its back.
    let ahead = cp
        .db
        .scalar(
            "UPDATE config_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision",
        )
        .await;
    assert_eq!(ahead, published + 1);

    let mut ws = hello(cp.cluster, "ahead", 1, Some(ahead)).await;
    let first = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let message: Value = serde_json::from_str(&text).expect("JSON");
                    if message["type"] == "snapshot" {
                        return message["snapshot"]["revision"].clone();
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("connection ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a snapshot within a second (the poll is 5 s)");
    assert_eq!(
        first,
        json!(ahead),
        "the store's revision, not the stale one"
    );
}

/// A node that moved to another replica (its old connection ends after the new one began) is
/// not marked disconnected by the replica it left: a record is only written by the node's
/// latest connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_moved_replicas_is_not_marked_disconnected_by_the_old_one() {
    let cp1 = TestApp::spawn(Backend::Postgres).await;
    let cp2 = TestApp::spawn_on(cp1.db.share(), Some(&cp1.token)).await;
    let mut old = hello(cp1.cluster, "mover", 1, None).await;
    wait_until(
        Duration::from_secs(2),
        "recorded on the first replica",
        || async {
            let (_, planes) = cp2.get("/data-planes").await;
            planes[0]["node_id"] == "mover"
        },
    )
    .await;
    let (_, planes) = cp2.get("/data-planes").await;
    let first_replica = planes[0]["control_plane"].clone();
    // Connected at a later millisecond than the first connection.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let _new = hello(cp2.cluster, "mover", 1, None).await;
    wait_until(
        Duration::from_secs(2),
        "recorded on the second replica",
        || async {
            let (_, planes) = cp2.get("/data-planes").await;
            planes[0]["control_plane"] != first_replica
        },
    )
    .await;
    old.close(None).await.expect("closed");
    drop(old);
    // The first replica has long seen the close when this looks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, planes) = cp2.get("/data-planes").await;
    assert_ne!(planes[0]["state"], "disconnected", "{planes}");
    assert_ne!(planes[0]["control_plane"], first_replica, "{planes}");
    assert_eq!(planes[0]["live"], true, "{planes}");
}

/// A snapshot message larger than the WebSocket library's default limits (16 MiB a frame)
/// reaches the node whole: this one is not a valid snapshot, so the node answers a nack, where
/// with the defaults it would have dropped the connection and reconnected forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_larger_than_16_mib_reach_the_node() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cluster = listener.local_addr().expect("addr");
    let (reply_tx, mut reply_rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("the node connects");
        let mut ws = tokio_tungstenite::accept_async(stream)
            .await
            .expect("handshake");
        let _hello = ws.next().await;
        let big = format!(
            r#"{{"type": "snapshot", "hash": "x", "pad": "{}"}}"#,
            "p".repeat(20 << 20)
        );
        ws.send(Message::Text(big.into())).await.expect("sent");
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Text(text) = message {
                let reply: Value = serde_json::from_str(&text).expect("JSON");
                if reply["type"] != "heartbeat" {
                    let _ = reply_tx.send(reply);
                }
            }
        }
    });
    let dir = tempfile::tempdir().expect("dir");
    let _dp = TestDp::start(cluster, dir.path(), "big").await;
    let reply = tokio::time::timeout(Duration::from_secs(20), reply_rx.recv())
        .await
        .expect("an answer to the 20 MiB message")
        .expect("answer");
    assert_eq!(reply["type"], "nack", "{reply}");
    assert!(
        reply["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("unreadable")),
        "{reply}"
    );
}
