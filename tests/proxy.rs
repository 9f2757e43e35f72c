//! The proxy's behaviour towards clients and upstreams: refusals, forwarding semantics,
//! authentication, load balancing and error answers.

mod common;

use std::time::Duration;

use common::{
    Backend, TestApp, TestDp, TestUpstream, raw_request, raw_request_to_close, wait_until,
};
use serde_json::{Value, json};

/// A control plane, one data plane and one upstream, with `routes` created and applied.
struct Setup {
    cp: TestApp,
    dp: TestDp,
    upstream: TestUpstream,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn setup(routes: &[Value]) -> Setup {
    setup_configured(routes, |_| {}).await
}

/// Like [`setup`], with the data plane's settings adjusted by `configure`.
async fn setup_configured(
    routes: &[Value],
    configure: impl FnOnce(&mut tollgate_data_plane::Settings),
) -> Setup {
    let cp = TestApp::spawn(Backend::Postgres).await;
    let upstream = TestUpstream::start("u").await;
    cp.upstream_at("u", &upstream.url()).await;
    for route in routes {
        cp.create("/routes", route.clone()).await;
    }
    let dir = tempfile::tempdir().expect("dir");
    let dp = TestDp::start_configured(cp.cluster, dir.path(), "dp-1", configure).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let setup = Setup {
        cp,
        dp,
        upstream,
        client,
        _dir: dir,
    };
    setup.sync().await;
    setup
}

impl Setup {
    /// Starts [`raw_upstream`] and routes `/raw` to it; returns its accept and drop counters.
    async fn add_raw_upstream(
        &self,
    ) -> (
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (url, accepted, dropped) = raw_upstream().await;
        self.cp.upstream_at("raw", &url).await;
        self.cp
            .create(
                "/routes",
                json!({"name": "raw", "paths": ["/raw"], "upstream": "raw"}),
            )
            .await;
        self.sync().await;
        (accepted, dropped)
    }

    /// Waits until the data plane serves the control plane's current revision.
    async fn sync(&self) {
        self.dp.synced_with(&self.cp).await;
    }

    async fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut request = self.client.get(self.dp.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body, headers)
    }
}

/// A client speaking HTTP/2 without upgrade (prior knowledge); with `window`, its stream and
/// connection flow-control windows are that small, so a server sends only as it reads.
fn h2_client(window: Option<u32>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().http2_prior_knowledge();
    if let Some(window) = window {
        builder = builder
            .http2_initial_stream_window_size(window)
            .http2_initial_connection_window_size(window);
    }
    builder.build().expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_never_reach_the_upstream() {
    let s = setup(&[json!({"name": "public", "paths": ["/public"], "upstream": "u"})]).await;
    let big = format!(
        "GET /public/a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("encoded traversal", "GET /public/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
        ("raw traversal", "GET /public/../admin HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
        ("dot segment", "GET /public/./a HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
        ("servlet traversal", "GET /public/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
        ("two Host headers", "GET /public/a HTTP/1.1\r\nHost: x\r\nHost: evil.example\r\n\r\n".into(), "400"),
        ("two Host headers, absolute-form", "GET http://x/public/a HTTP/1.1\r\nHost: x\r\nHost: evil.example\r\n\r\n".into(), "400"),
        ("encoded slash", "GET /public%2f..%2fadmin HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
        ("backslash", "GET /public/..\\admin HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
        ("encoded NUL", "GET /public/a%00 HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
        ("oversized headers", big, "431"),
        ("invalid host", "GET /public/a HTTP/1.1\r\nHost: bad host\r\n\r\n".into(), "400"),
        ("userinfo host", "GET /public/a HTTP/1.1\r\nHost: user@evil.example\r\n\r\n".into(), "400"),
        ("missing host", "GET /public/a HTTP/1.1\r\n\r\n".into(), "400"),
        ("CL then TE", "POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), "400"),
        ("TE then CL", "POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n".into(), "400"),
        ("duplicate CL, same", "POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd".into(), "400"),
        ("duplicate CL, different", "POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".into(), "400"),
        ("TE list", "POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n".into(), "400"),
        ("TE not chunked", "POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabcd".into(), "400"),
    ];
    for (name, request, status) in &cases {
        let answer = raw_request(s.dp.proxy, request.as_bytes()).await;
        let status_line = answer.lines().next().unwrap_or_default();
        assert!(
            status_line.starts_with(&format!("HTTP/1.1 {status}")),
            "{name}: expected {status}, got {status_line:?}"
        );
    }
    // Smuggling behind a clean request on the same connection: the first is served, the
    // second refused.
    let answer = raw_request(
        s.dp.proxy,
        b"GET /public/first HTTP/1.1\r\nHost: x\r\n\r\nPOST /public/smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");

    let seen = s.upstream.requests();
    assert_eq!(
        seen.len(),
        1,
        "only the clean request reached the upstream: {seen:?}"
    );
    assert_eq!(seen[0].path, "/public/first");
}

/// A refused head pipelined behind a request whose answer is slow: the client still gets the
/// first request's answer first, then the 400, in order on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_behind_a_slow_pipelined_request_comes_after_its_answer() {
    let s = setup(&[
        json!({"name": "slow", "paths": ["/slow"], "upstream": "u"}),
        json!({"name": "download", "paths": ["/download"], "upstream": "u"}),
    ])
    .await;
    // Each answer is read until the proxy closes the connection (after the 400), not until a
    // quiet spell. A large answer: hyper may still hold part of it when it reads the next head.
    let smuggled = "POST /slow/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    for (first, answer_at_least) in [("/download/4000000", 4_000_000), ("/slow/300", 0)] {
        let request = format!("GET {first} HTTP/1.1\r\nHost: x\r\n\r\n{smuggled}");
        let answer = raw_request_to_close(s.dp.proxy, request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{first}: {}",
            &answer[..200.min(answer.len())]
        );
        let refusal = answer.find("HTTP/1.1 400").expect("a 400 after the answer");
        assert!(
            refusal > answer_at_least,
            "{first}: the 400 came at byte {refusal}, inside the answer"
        );
    }
    let seen: Vec<String> = s.upstream.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        seen,
        ["/download/4000000", "/slow/300"],
        "never the refused one"
    );
}

/// Each of `expected`'s headers is in `headers` exactly once, with that value.
fn headers_once(headers: &http::HeaderMap, expected: &[(&str, &str)]) {
    for (name, value) in expected {
        let values: Vec<_> = headers.get_all(*name).iter().collect();
        assert_eq!(values, [*value], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_semantics() {
    let s = setup(&[
        json!({"name": "strip", "paths": ["/api"], "upstream": "u", "strip_prefix": true,
               "transforms": {"request": {"set": {"X-Added": "in"}, "remove": ["X-Remove-Me"]},
                              "response": {"set": {"X-Gateway": "tollgate"}}}}),
        json!({"name": "keep", "paths": ["/keep"], "upstream": "u", "preserve_host": true}),
    ])
    .await;

    let (status, body, headers) = s
        .get(
            "/api/v1/items?q=1&b=two",
            &[
                ("X-Forwarded-For", "1.2.3.4"),
                ("Connection", "x-hop"),
                ("X-Hop", "secret"),
                ("X-Remove-Me", "1"),
                ("X-Request-Id", "client-chosen-id"),
                ("X-Consumer-Username", "mallory"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/v1/items", "prefix stripped");
    assert_eq!(headers["x-request-id"], "client-chosen-id");
    assert_eq!(headers["x-gateway"], "tollgate");
    let seen = s
        .upstream
        .requests()
        .pop()
        .expect("request reached the upstream");
    assert_eq!(seen.query.as_deref(), Some("q=1&b=two"));
    assert_eq!(
        seen.headers["host"],
        s.upstream.addr.to_string(),
        "Host is the target's"
    );
    assert_eq!(
        seen.headers["x-forwarded-for"], "127.0.0.1",
        "an untrusted peer's XFF is replaced"
    );
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], s.dp.proxy.to_string());
    assert_eq!(seen.headers["x-request-id"], "client-chosen-id");
    assert_eq!(seen.headers["x-added"], "in");
    assert!(
        !seen.headers.contains_key("x-hop"),
        "headers named by Connection are hop-by-hop"
    );
    assert!(!seen.headers.contains_key("x-remove-me"));
    assert!(
        !seen.headers.contains_key("x-consumer-username"),
        "clients cannot claim a consumer"
    );

    // A generated request id when the client sends none, the same on both sides.
    let (_, _, headers) = s.get("/api/x", &[]).await;
    let id = headers["x-request-id"].to_str().expect("ascii").to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(
        s.upstream.requests().pop().expect("seen").headers["x-request-id"],
        id.as_str()
    );

    // preserve_host forwards the client's Host. A route without transforms writes the
    // gateway's headers after the client's while encoding: each still goes exactly once, in
    // place of the client's.
    let (status, _, _) = s
        .get(
            "/keep/x",
            &[
                ("Host", "api.example.com"),
                ("X-Forwarded-For", "1.2.3.4"),
                ("X-Forwarded-Host", "spoofed.example"),
                ("X-Consumer-Id", "mallory"),
                ("X-Request-Id", "keep-id"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    let seen = s.upstream.requests().pop().expect("seen");
    headers_once(
        &seen.headers,
        &[
            ("host", "api.example.com"),
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-host", "api.example.com"),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "keep-id"),
        ],
    );
    assert!(!seen.headers.contains_key("x-consumer-id"));
    let (status, body, _) = s.get("/keep", &[]).await;
    assert_eq!(
        (status, body["path"].as_str()),
        (200, Some("/keep")),
        "no strip_prefix"
    );

    // Unknown path: 404 with a stable code and the request id.
    let (status, body, headers) = s.get("/nope", &[]).await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "no_route");
    assert_eq!(
        body["request_id"],
        headers["x-request-id"].to_str().expect("ascii")
    );
}

/// Behind a trusted proxy the chain is extended, every X-Forwarded-For line of it in order,
/// and the proxy's X-Forwarded-Proto/-Host are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_extend_the_forwarding_chain() {
    let s = setup_configured(
        &[json!({"name": "all", "paths": ["/"], "upstream": "u"})],
        |settings| settings.trusted_proxies = vec!["127.0.0.1".parse().expect("cidr")],
    )
    .await;
    let (status, _, _) = s
        .get(
            "/x",
            &[
                ("X-Forwarded-For", "1.1.1.1, 2.2.2.2"),
                ("X-Forwarded-For", ""),
                ("X-Forwarded-For", "3.3.3.3"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "api.example.com"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    let seen = s.upstream.requests().pop().expect("seen");
    headers_once(
        &seen.headers,
        &[
            ("x-forwarded-for", "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "api.example.com"),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_authenticate_and_restrict() {
    let s = setup(&[
        json!({"name": "open-to-keys", "paths": ["/k"], "upstream": "u", "auth": {"api_key": {}}}),
        json!({"name": "vip", "paths": ["/vip"], "upstream": "u",
               "auth": {"api_key": {"header": "X-Custom-Key"}, "allowed_tags": ["vip"]}}),
    ])
    .await;
    s.cp.create("/consumers", json!({"username": "alice", "tags": ["vip"]}))
        .await;
    s.cp.create("/consumers", json!({"username": "bob"})).await;
    let (_, alice) = s.cp.post("/consumers/alice/keys", json!({})).await;
    let (_, bob) = s.cp.post("/consumers/bob/keys", json!({})).await;
    let (_, short) =
        s.cp.post("/consumers/bob/keys", json!({"ttl_seconds": 1}))
            .await;
    s.sync().await;
    let (alice_key, bob_key) = (
        alice["key"].as_str().expect("key"),
        bob["key"].as_str().expect("key"),
    );

    let (status, body, _) = s.get("/k/x", &[("X-API-Key", alice_key)]).await;
    assert_eq!(status, 200, "{body}");
    let seen = s.upstream.requests().pop().expect("seen");
    assert_eq!(seen.headers["x-consumer-username"], "alice");
    assert_eq!(
        seen.headers["x-consumer-id"],
        alice["consumer_id"].as_str().expect("id")
    );
    assert!(
        !seen.headers.contains_key("x-api-key"),
        "the key is stripped"
    );

    // Data planes report key use with their heartbeats; the listing shows it.
    wait_until(Duration::from_secs(5), "last use reported", || async {
        let (_, keys) = s.cp.get("/consumers/alice/keys").await;
        keys[0]["last_used_at"].is_string()
    })
    .await;
    let (_, keys) = s.cp.get("/consumers/bob/keys").await;
    assert!(
        keys[0]["last_used_at"].is_null(),
        "bob's key is unused so far"
    );

    let (status, _, _) = s
        .get("/k/x", &[("Authorization", &format!("Bearer {bob_key}"))])
        .await;
    assert_eq!(status, 200);
    let seen = s.upstream.requests().pop().expect("seen");
    assert_eq!(seen.headers["x-consumer-username"], "bob");
    assert!(
        !seen.headers.contains_key("authorization"),
        "the bearer key is stripped"
    );

    // A client cannot pose as a consumer.
    let before = s.upstream.requests().len();
    for (headers, status, code) in [
        (vec![], 401, "unauthorized"),
        (
            vec![("X-API-Key", "tg_not-a-real-key")],
            401,
            "unauthorized",
        ),
        (vec![("X-Consumer-Username", "alice")], 401, "unauthorized"),
    ] {
        let (got, body, _) = s.get("/k/x", &headers).await;
        assert_eq!(
            (got, body["code"].as_str()),
            (status, Some(code)),
            "{headers:?}"
        );
    }
    // Tags restrict: alice (vip) passes, bob is known but not allowed.
    let (status, _, _) = s.get("/vip/x", &[("X-Custom-Key", alice_key)]).await;
    assert_eq!(status, 200);
    let (status, body, _) = s.get("/vip/x", &[("X-Custom-Key", bob_key)]).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    assert_eq!(
        s.upstream.requests().len(),
        before + 1,
        "refused requests never reach the upstream"
    );

    // Expired key: refused once its time has passed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, _) = s
        .get(
            "/k/x",
            &[("X-API-Key", short["key"].as_str().expect("key"))],
        )
        .await;
    assert_eq!(status, 401, "expired key");

    // Revoked key: refused as soon as the revocation propagates.
    let (status, _) =
        s.cp.delete(&format!(
            "/consumers/alice/keys/{}",
            alice["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(status, 204);
    let took = wait_until(Duration::from_secs(1), "revocation effective", || async {
        s.get("/k/x", &[("X-API-Key", alice_key)]).await.0 == 401
    })
    .await;
    eprintln!("revocation effective after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_and_upstream_errors() {
    let s = setup(&[]).await;
    let other = TestUpstream::start("other").await;
    let closed = common::closed_addr();
    s.cp.create(
        "/upstreams",
        json!({"name": "pair", "targets": [{"url": s.upstream.url(), "weight": 300}, {"url": other.url(), "weight": 100}]}),
    )
    .await;
    s.cp.create(
        "/upstreams",
        json!({"name": "dead", "targets": [{"url": format!("http://{closed}")}]}),
    )
    .await;
    s.cp.create("/upstreams", json!({"name": "slow", "targets": [{"url": s.upstream.url()}], "timeouts": {"request_ms": 300}})).await;
    for (name, upstream) in [("pair", "pair"), ("dead", "dead"), ("slow", "slow")] {
        s.cp.create(
            "/routes",
            json!({"name": name, "paths": [format!("/{name}")], "upstream": upstream}),
        )
        .await;
    }
    s.sync().await;

    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let (_, body, _) = s.get("/pair", &[]).await;
        *counts
            .entry(body["upstream"].as_str().unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(counts.get("u"), Some(&30), "{counts:?}");
    assert_eq!(counts.get("other"), Some(&10), "{counts:?}");

    let (status, body, _) = s.get("/dead", &[]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (502, Some("upstream_unreachable"))
    );
    let started = std::time::Instant::now();
    let (status, body, _) = s.get("/slow/2000", &[]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (504, Some("upstream_timeout"))
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "timed out at the route's limit"
    );
    // Each request has its own deadline: on a connection whose previous request timed out,
    // or answered fast, the next one is timed afresh.
    for (path, expected) in [("/slow/10", 200), ("/slow/2000", 504), ("/slow/10", 200)] {
        let started = std::time::Instant::now();
        let (status, _, _) = s.get(path, &[]).await;
        assert_eq!(status, expected, "{path}");
        assert!(started.elapsed() < Duration::from_millis(1500), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_config_the_node_is_not_ready() {
    // Nothing listens at this cluster address: the node never gets a config.
    let nowhere = common::closed_addr();
    let dir = tempfile::tempdir().expect("dir");
    let dp = TestDp::start(nowhere, dir.path(), "lonely").await;
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("http://{}/readyz", dp.status))
        .send()
        .await
        .expect("status");
    assert_eq!(ready.status(), 503);
    let healthy = client
        .get(format!("http://{}/healthz", dp.status))
        .send()
        .await
        .expect("status");
    assert_eq!(healthy.status(), 200);
    let response = client.get(dp.url("/anything")).send().await.expect("proxy");
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["code"], "no_config");
    dp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_is_served() {
    let s = setup(&[json!({"name": "h2", "paths": ["/h2"], "upstream": "u"})]).await;
    let client = h2_client(None);
    let response = client
        .get(s.dp.url("/h2/x"))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let seen = s.upstream.requests().pop().expect("seen");
    assert_eq!(seen.path, "/h2/x");
    assert_eq!(seen.headers["x-forwarded-host"], s.dp.proxy.to_string());

    // An HTTP/2 body without Content-Length (DATA frames only) reaches the upstream whole.
    let response = client
        .post(s.dp.url("/h2/upload"))
        .body(common::streamed_body(b'z', 1000, 4))
        .send()
        .await
        .expect("h2 upload");
    assert_eq!(response.status(), 200);
    let seen = s.upstream.requests().pop().expect("seen");
    assert_eq!(seen.body_bytes, 4000);
}

/// `TOLLGATE_MAX_HEADER_BYTES` holds for HTTP/2 as for HTTP/1: headers up to it pass, more
/// is a 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_headers_are_limited_by_the_setting() {
    let s = setup_configured(
        &[json!({"name": "h2", "paths": ["/h2"], "upstream": "u"})],
        |settings| settings.max_header_bytes = 40 * 1024,
    )
    .await;
    let client = h2_client(None);
    let send = |size: usize| {
        client
            .get(s.dp.url("/h2/x"))
            .header("x-big", "a".repeat(size))
            .send()
    };
    let response = send(24 * 1024).await.expect("h2 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        response.status(),
        200,
        "24 KiB of headers under a 40 KiB limit"
    );
    let response = send(48 * 1024).await;
    let status = response.as_ref().map(|r| r.status().as_u16());
    assert!(matches!(status, Ok(431)), "48 KiB: {response:?}");
    assert_eq!(
        s.upstream.requests().len(),
        1,
        "only the first reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancing_choices_and_active_health_checks() {
    let s = setup(&[]).await;
    let other = TestUpstream::start("other").await;
    let closed = common::closed_addr();
    s.cp.create(
        "/upstreams",
        json!({"name": "random", "load_balancing": "random",
               "targets": [{"url": s.upstream.url(), "weight": 300}, {"url": other.url(), "weight": 100}]}),
    )
    .await;
    s.cp.create(
        "/upstreams",
        json!({"name": "least", "load_balancing": "least_connections",
               "targets": [{"url": s.upstream.url()}, {"url": other.url()}]}),
    )
    .await;
    s.cp.create(
        "/upstreams",
        json!({"name": "checked", "targets": [{"url": s.upstream.url()}, {"url": format!("http://{closed}")}],
               "health_check": {"path": "/health", "interval_seconds": 1, "timeout_ms": 200,
                                "unhealthy_threshold": 2, "healthy_threshold": 1}}),
    )
    .await;
    for name in ["random", "least", "checked"] {
        s.cp.create(
            "/routes",
            json!({"name": name, "paths": [format!("/{name}")], "upstream": name, "strip_prefix": true}),
        )
        .await;
    }
    s.sync().await;

    // Random, weighted 3:1.
    let mut to_u = 0;
    for _ in 0..200 {
        let (_, body, _) = s.get("/random", &[]).await;
        if body["upstream"] == "u" {
            to_u += 1;
        }
    }
    assert!(
        (120..=180).contains(&to_u),
        "weighted random sent {to_u} of 200 to the 3x target"
    );

    // Least connections: while one request is held by the first target, the rest go to the
    // other one.
    let held = {
        let (client, url) = (s.client.clone(), s.dp.url("/least/slow/1000"));
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..6 {
        let (status, body, _) = s.get("/least/quick", &[]).await;
        assert_eq!((status, body["upstream"].as_str()), (200, Some("other")));
    }
    assert_eq!(held.await.expect("task").expect("held request"), 200);

    // Health checks take the dead target out of rotation: then every request succeeds.
    wait_until(
        Duration::from_secs(5),
        "dead target out of rotation",
        || async {
            let mut all_ok = true;
            for _ in 0..4 {
                all_ok &= s.get("/checked", &[]).await.0 == 200;
            }
            all_ok
        },
    )
    .await;
    for _ in 0..20 {
        assert_eq!(s.get("/checked", &[]).await.0, 200);
    }
    // A config write that does not touch the upstream keeps the dead target out: its checks'
    // verdict carries over to the new snapshot (re-learning it takes two probes, a second).
    s.cp.create("/consumers", json!({"username": "unrelated"}))
        .await;
    s.sync().await;
    for _ in 0..20 {
        assert_eq!(s.get("/checked", &[]).await.0, 200, "after a config write");
    }
    assert!(
        s.upstream.requests().iter().any(|r| r.path == "/health"),
        "the live target is probed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limits_hold_with_and_without_content_length() {
    let s = setup(&[
        json!({"name": "capped", "paths": ["/capped"], "upstream": "u", "max_body_bytes": 1000}),
    ])
    .await;
    let chunked = |chunks: usize| common::streamed_body(b'c', 400, chunks);
    let post = |body: reqwest::Body| {
        let request = s.client.post(s.dp.url("/capped")).body(body);
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body["code"].as_str().map(str::to_string))
        }
    };
    // Declared too large: refused before anything is forwarded.
    let before = s.upstream.requests().len();
    assert_eq!(
        post(reqwest::Body::from(vec![b'x'; 5000])).await,
        (413, Some("body_too_large".into()))
    );
    assert_eq!(s.upstream.requests().len(), before);
    // Chunked, no length: refused once the limit is crossed.
    assert_eq!(post(chunked(5)).await, (413, Some("body_too_large".into())));
    // Within the limit: forwarded whole.
    assert_eq!(post(chunked(2)).await.0, 200);
    assert_eq!(s.upstream.requests().pop().expect("seen").body_bytes, 800);
}

/// The `Content-Length` of a request head (0 without one).
fn content_length_of(head: &str) -> usize {
    head.lines()
        .find_map(|line| {
            let line = line.to_ascii_lowercase();
            line.strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A hand-written HTTP/1.1 upstream, to answer what well-behaved servers never send: its
/// answer depends on the request path. Counts the connections it accepted.
async fn raw_upstream() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Small socket buffers (inherited by accepted connections): what the kernel holds between
    // the proxy and this upstream stays far below the bodies the tests stream, so a proxy
    // that waited for one direction before the other would stall here.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    socket.set_send_buffer_size(64 * 1024).expect("SO_SNDBUF");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let listener = socket.listen(128).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let drops = dropped.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let drops = drops.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    // A head already read (behind a body) is served before reading more.
                    let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buffer[..end]).to_string();
                    buffer.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    if path == "/raw/early-echo" {
                        // Answers 200 at once and echoes the body as it reads it.
                        let length = content_length_of(&head);
                        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        let mut echoed = 0;
                        while echoed < length {
                            if buffer.is_empty() {
                                let mut chunk = [0u8; 16384];
                                match stream.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                                }
                            }
                            let take = buffer.len().min(length - echoed);
                            if stream.write_all(&buffer[..take]).await.is_err() {
                                return;
                            }
                            buffer.drain(..take);
                            echoed += take;
                        }
                        continue;
                    }
                    // Both answer 200 at once, then read (and drop) the whole body:
                    // early-ok then ends its answer with the body's size (it needs the body
                    // sent whole after its early answer); early-done's answer is whole at once
                    // (keep-alive goes on only if the proxy still sends the body whole).
                    if path == "/raw/early-ok" || path == "/raw/early-done" {
                        let length = content_length_of(&head);
                        let answer: &[u8] = if path == "/raw/early-ok" {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone"
                        };
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                        while buffer.len() < length {
                            let mut chunk = [0u8; 16384];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buffer.drain(..length);
                        if path == "/raw/early-ok"
                            && stream
                                .write_all(format!("{length:010}").as_bytes())
                                .await
                                .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    if path == "/raw/early-close" || path == "/raw/early-open" {
                        // Answers before reading the body; then closes with the body unread
                        // (a reset), or keeps the connection without reading any of it.
                        let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large";
                        if stream.write_all(answer).await.is_err() || path == "/raw/early-close" {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        return;
                    }
                    if path == "/raw/drip" || path == "/raw/late" {
                        // The answer (or, for drip, its second half) comes after a second.
                        let (first, rest): (&[u8], &[u8]) = if path == "/raw/drip" {
                            (
                                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
                                b"world",
                            )
                        } else {
                            (
                                b"",
                                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhelloworld",
                            )
                        };
                        if stream.write_all(first).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if stream.write_all(rest).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if path == "/raw/hold" {
                        // Reads the head, then neither reads nor answers for a minute.
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    if path == "/raw/wait-close" {
                        // Never answers; counts (as a drop) the proxy closing the connection.
                        let mut chunk = [0u8; 1024];
                        while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {}
                        drops.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    if path == "/raw/drop" {
                        // Reads the request, then closes without a word.
                        drops.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let (answer, close): (&[u8], bool) = match path.as_str() {
                        "/raw/chunked" => (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n", false),
                        "/raw/until-close" => (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nread until the upstream closes", true),
                        "/raw/conflict" => (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab", true),
                        "/raw/early-hints" => (b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal", false),
                        // Keep-alive as far as the headers say, then closed anyway.
                        "/raw/then-close" => (b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nonce", true),
                        // A HEAD answer: the length of the body it would have, and no body.
                        "/raw/head" => (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
                        // Hop-by-hop headers, one of them named by Connection.
                        "/raw/hop" => (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: secret\r\nX-Kept: 1\r\ncontent-length: 2\r\n\r\nok", false),
                        "/raw/truncated" => (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", true),
                        // Headers of the names the gateway sets on answers.
                        own if own.starts_with("/raw/own-ids") => (b"HTTP/1.1 200 OK\r\nX-Request-Id: from-upstream\r\nRateLimit-Limit: 999\r\nratelimit-remaining: 998\r\nRATELIMIT-RESET: 77\r\nX-Kept: 1\r\ncontent-length: 2\r\n\r\nok", false),
                        _ => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
                    };
                    if stream.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), accepted, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_framing_and_connection_reuse() {
    use std::sync::atomic::Ordering;
    let s = setup(&[]).await;
    let (accepted, dropped) = s.add_raw_upstream().await;
    let text = |path: &'static str| {
        let request = s.client.get(s.dp.url(path));
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            (status, response.text().await, headers)
        }
    };

    // Chunked: decoded and re-framed; the misleading Content-Length beside it is dropped.
    let (status, body, headers) = text("/raw/chunked").await;
    assert_eq!((status, body.expect("body").as_str()), (200, "hello world"));
    assert!(headers.get("content-length").is_none(), "{headers:?}");
    assert!(headers.get("x-trailer").is_none());
    // Hop-by-hop headers of the answer stay with the upstream's hop.
    let (status, body, headers) = text("/raw/hop").await;
    assert_eq!((status, body.expect("body").as_str()), (200, "ok"));
    assert_eq!(headers.get("x-kept").map(|v| v.as_bytes()), Some(&b"1"[..]));
    for hop in ["x-hop", "keep-alive", "connection"] {
        assert!(headers.get(hop).is_none(), "{hop}: {headers:?}");
    }
    // Interim responses are skipped.
    let (status, body, _) = text("/raw/early-hints").await;
    assert_eq!((status, body.expect("body").as_str()), (200, "final"));
    // Delimited by the close.
    let (status, body, _) = text("/raw/until-close").await;
    assert_eq!(
        (status, body.expect("body").as_str()),
        (200, "read until the upstream closes")
    );
    // Conflicting lengths: refused, not guessed.
    let (status, body, _) = text("/raw/conflict").await;
    assert_eq!(status, 502, "{body:?}");
    // A body cut short reaches the client as an error, never as a complete response.
    let truncated = match s.client.get(s.dp.url("/raw/truncated")).send().await {
        Ok(response) if response.status() == 200 => response.text().await.ok(),
        _ => None,
    };
    assert_eq!(truncated, None, "truncated body passed as complete");

    // HEAD: no body read after the head, whatever Content-Length says, and the connection is
    // reused right after (a body expected here would hang or desynchronise it).
    assert_eq!(text("/raw/keep").await.0, 200); // one pooled connection
    let before = accepted.load(Ordering::SeqCst);
    let head = s
        .client
        .head(s.dp.url("/raw/head"))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "5");
    let (status, body, _) = text("/raw/keep").await;
    assert_eq!((status, body.expect("body").as_str()), (200, "ok"));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "HEAD and the request after it reuse the pooled connection"
    );

    // Keep-alive: sequential requests share one upstream connection.
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..20 {
        let (status, body, _) = text("/raw/keep").await;
        assert_eq!((status, body.expect("body").as_str()), (200, "ok"));
    }
    let opened = accepted.load(Ordering::SeqCst) - before;
    assert!(
        opened <= 1,
        "20 sequential requests opened {opened} connections"
    );

    // A raw UTF-8 query (which clients send and hyper accepts) is forwarded as is.
    let answer = raw_request(
        s.dp.proxy,
        "GET /raw/keep?q=\u{e9}t\u{e9} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // An upstream that takes a request and closes without answering, on a pooled connection:
    // a POST is never sent twice (it may have been acted on); a GET is retried once on a new
    // connection, as nginx does.
    let drop = |method: reqwest::Method| s.client.request(method, s.dp.url("/raw/drop")).send();
    assert_eq!(text("/raw/keep").await.0, 200); // pools a connection
    assert_eq!(
        drop(reqwest::Method::POST).await.expect("answer").status(),
        502
    );
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the POST was replayed");
    assert_eq!(text("/raw/keep").await.0, 200);
    assert_eq!(
        drop(reqwest::Method::GET).await.expect("answer").status(),
        502
    );
    assert_eq!(dropped.load(Ordering::SeqCst), 3, "the GET was tried twice");

    // An upstream that closes a connection the proxy pooled: the next request still succeeds,
    // whether the close arrived before it (seen at checkout) or races with it (sent again).
    for i in 0..20 {
        let (status, body, _) = text("/raw/then-close").await;
        assert_eq!((status, body.expect("body").as_str()), (200, "once"));
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A new raw connection to `addr` that has sent `bytes`.
async fn raw_connection(addr: std::net::SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    stream
}

/// Reads and discards until the server closes; how long that took, or `None` if it was still
/// open after `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    read_until_closed(stream, limit)
        .await
        .map(|(closed, _)| closed)
}

/// Reads everything the server sends until it closes the connection, for at most `limit`;
/// returns when it closed and what it sent.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Option<(Duration, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some((start.elapsed(), received)),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// The HTTP/2 frames in `bytes` (a server's side of a connection, from its start) as (type,
/// flags, payload): each frame is a 9-byte header (24-bit length, type, flags, stream) and its
/// payload. A frame cut short at the end is left out.
fn http2_frames(mut bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let Some(payload) = bytes.get(9..9 + length) else {
            break;
        };
        frames.push((bytes[3], bytes[4], payload.to_vec()));
        bytes = &bytes[9 + length..];
    }
    frames
}

/// The types of the frames [`http2_frames`] finds.
fn http2_frame_types(bytes: &[u8]) -> Vec<u8> {
    http2_frames(bytes)
        .iter()
        .map(|(kind, _, _)| *kind)
        .collect()
}

/// Reads one response with a Content-Length body from a raw connection; returns it whole.
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .expect("content-length");
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buffer[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_cuts_slow_heads_and_idle_connections_but_not_slow_requests() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    const TIMEOUT: Duration = Duration::from_millis(400);
    let s = setup_configured(
        &[json!({"name": "t", "paths": ["/t"], "upstream": "u"})],
        |settings| settings.header_timeout_ms = 400,
    )
    .await;
    s.add_raw_upstream().await;
    let seen_before = s.upstream.requests().len();

    // Closed once the timeout is up, not before.
    let cut_on_time = |closed: Option<Duration>, what: &str| {
        let closed = closed.unwrap_or_else(|| panic!("{what} is not cut"));
        assert!(
            closed >= TIMEOUT - Duration::from_millis(50),
            "{what} is cut early: {closed:?}"
        );
    };
    // Slowloris: a head that never completes is cut after the timeout, and never forwarded.
    let mut slow = raw_connection(
        s.dp.proxy,
        b"GET /t/slowloris HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n",
    )
    .await;
    let closed = closed_within(&mut slow, Duration::from_secs(5)).await;
    cut_on_time(closed, "a head that never completes");
    // The status listener too.
    let mut slow = raw_connection(s.dp.status, b"GET /healthz HTTP/1.1\r\nHost: a\r\n").await;
    let closed = closed_within(&mut slow, Duration::from_secs(5)).await;
    cut_on_time(closed, "a status head that never completes");
    // On a kept-alive connection, a next head that never completes is cut the same way,
    // counted from the answer before it.
    let mut again = TcpStream::connect(s.dp.proxy).await.expect("connect");
    again
        .write_all(b"GET /t/first HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    assert!(read_response(&mut again).await.starts_with("HTTP/1.1 200"));
    again
        .write_all(b"GET /t/slowloris-again HTTP/1.1\r\nHost: a\r\n")
        .await
        .expect("write");
    let closed = closed_within(&mut again, Duration::from_secs(5)).await;
    cut_on_time(closed, "a second head that never completes");
    // A connection that never sends anything is cut too.
    let mut silent = TcpStream::connect(s.dp.proxy).await.expect("connect");
    assert!(
        closed_within(&mut silent, Duration::from_secs(5))
            .await
            .is_some()
    );

    // Keep-alive: requests closer together than the timeout keep the connection for longer
    // than the timeout in all; after the last one, it is closed when the timeout is up.
    let mut kept = TcpStream::connect(s.dp.proxy).await.expect("connect");
    for _ in 0..5 {
        kept.write_all(b"GET /t/keep HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(TIMEOUT / 2).await;
    }
    assert!(
        closed_within(&mut kept, Duration::from_secs(5))
            .await
            .is_some()
    );

    // A request in flight is never cut: not while the upstream thinks (no response yet), not
    // while the response body trickles in, each for longer than the timeout.
    let mut busy = TcpStream::connect(s.dp.proxy).await.expect("connect");
    for path in ["/raw/late", "/raw/drip"] {
        busy.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let answer = read_response(&mut busy).await;
        assert!(answer.ends_with("\r\n\r\nhelloworld"), "{path}: {answer}");
    }

    // HTTP/2 (prior knowledge): a connection with no stream open is closed after the timeout
    // too, whether it stops inside its preface or after a complete one; after a complete one,
    // with a GOAWAY first (frame type 7), so the client knows no request was lost.
    for (opening, goaway) in [
        (&b"PRI * HTTP/2.0\r\n"[..], false),
        (
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"[..],
            true,
        ),
    ] {
        let mut h2 = raw_connection(s.dp.proxy, opening).await;
        let (closed, sent) = read_until_closed(&mut h2, Duration::from_secs(5))
            .await
            .expect("an idle HTTP/2 connection is closed");
        assert!(
            closed >= TIMEOUT - Duration::from_millis(50),
            "cut early: {closed:?}"
        );
        let types = http2_frame_types(&sent);
        assert_eq!(types.contains(&7), goaway, "frames sent: {types:?}");
    }
    // An HTTP/2 stream in flight longer than the timeout is not cut.
    let response = h2_client(None)
        .get(s.dp.url("/raw/drip"))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.text().await.expect("body"), "helloworld");

    let seen: Vec<String> = s.upstream.requests()[seen_before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(!seen.iter().any(|p| p.contains("slowloris")), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_upstream_answers_reach_the_client_while_the_body_is_still_coming() {
    use tokio::io::AsyncWriteExt;
    let s = setup(&[]).await;
    let (accepted, _) = s.add_raw_upstream().await;
    for path in ["/raw/early-close", "/raw/early-open"] {
        // The client announces 1 MiB, sends 64 KiB, and waits: the upstream has answered
        // already, so the answer must come back without the rest of the body.
        let mut client = raw_connection(
            s.dp.proxy,
            format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 1048576\r\n\r\n")
                .as_bytes(),
        )
        .await;
        client.write_all(&[b'x'; 64 * 1024]).await.expect("body");
        let answer = read_response(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.ends_with("\r\n\r\ntoo large"), "{path}: {answer}");
    }
    // The cut connections did not go back to the pool: a request after them opens a new one.
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(s.get("/raw/keep", &[]).await.0, 200);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );
    // An early success from an upstream that still reads: the answer is passed on and the body
    // goes whole while it streams. Its connection stays pooled: this and the requests below all reuse the one that just
    // answered /raw/keep.
    let kept_before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    let body = vec![b'y'; 512 * 1024];
    let response = s
        .client
        .post(s.dp.url("/raw/early-ok"))
        .body(body)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "0000524288");

    // One that echoes the body as it reads it: the body goes whole and the echo comes back
    // intact, both at once: 16 MiB is far more than the sockets between the proxy and the
    // upstream hold, so an echo that waited for the body to be sent whole (or the body for
    // the echo to be read) would stall.
    // Over HTTP/1.1 (hyper's server, after the fast lane's hand-off) and HTTP/2.
    let body: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    for client in [&s.client, &h2_client(None)] {
        let response = client
            .post(s.dp.url("/raw/early-echo"))
            .body(body.clone())
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 200);
        assert!(
            response.bytes().await.expect("body") == body,
            "echo differs"
        );
    }

    // One that answers whole at once and reads the body afterwards: the answer comes back, the
    // body still goes whole (the client's body is read to its end, the connection is kept).
    // (A raw client that sends its whole body whatever comes back; some clients stop sending
    // once they have the whole answer, as they would talking to the upstream itself.)
    let mut client = raw_connection(
        s.dp.proxy,
        b"POST /raw/early-done HTTP/1.1\r\nHost: a\r\nContent-Length: 4194304\r\n\r\n",
    )
    .await;
    client
        .write_all(&vec![b'z'; 4 * 1024 * 1024])
        .await
        .expect("body");
    let answer = read_response(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\ndone"), "{answer}");

    // Those connections were kept: no new one was opened for them or for the next request.
    assert_eq!(s.get("/raw/keep", &[]).await.0, 200);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        kept_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_cut_after_the_send_timeout() {
    use tokio::io::AsyncReadExt;
    const SIZE: usize = 100 * 1024 * 1024;
    let s = setup_configured(
        &[json!({"name": "dl", "paths": ["/download"], "upstream": "u"})],
        |settings| settings.send_timeout_ms = 500,
    )
    .await;
    // Asks for 100 MiB and reads none of it for 3 s: the writes stall once the socket
    // buffers are full, and the connection is closed after the send timeout.
    let mut client = raw_connection(
        s.dp.proxy,
        format!("GET /download/{SIZE} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut total = 0usize;
    let mut buffer = vec![0u8; 256 * 1024];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), client.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => total += n,
            Err(_) => break false,
        }
        if total > SIZE {
            break false;
        }
    };
    assert!(closed, "still open after {total} bytes");
    assert!(total < SIZE / 2, "{total} bytes came: the download went on");

    // A client that reads, however much, is never cut by it.
    let response = s
        .client
        .get(s.dp.url(&format!("/download/{}", 8 * 1024 * 1024)))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.bytes().await.expect("body").len(), 8 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_a_request_body_are_cut_after_the_body_timeout() {
    use tokio::io::AsyncWriteExt;
    let s = setup_configured(
        &[json!({"name": "t", "paths": ["/t"], "upstream": "u"})],
        |settings| settings.body_timeout_ms = 500,
    )
    .await;
    // Announces 100 000 bytes, sends 1000, and stops: closed after the body timeout.
    let mut client = raw_connection(
        s.dp.proxy,
        b"POST /t/upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n",
    )
    .await;
    client.write_all(&[b'x'; 1000]).await.expect("body");
    let closed = closed_within(&mut client, Duration::from_secs(5))
        .await
        .expect("a stalled body is cut");
    assert!(
        closed >= Duration::from_millis(450),
        "cut early: {closed:?}"
    );

    // A body that keeps coming, slower than the timeout in all, is not cut.
    let mut client = raw_connection(
        s.dp.proxy,
        b"POST /t/slow-upload HTTP/1.1\r\nHost: a\r\nContent-Length: 4000\r\n\r\n",
    )
    .await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        client.write_all(&[b'y'; 1000]).await.expect("body");
    }
    let answer = read_response(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_bytes\":4000"), "{answer}");

    // HTTP/2: a stream whose body stops is answered 408 `body_timeout` (the connection, which
    // may carry other streams, stays); one whose body keeps coming slowly is not.
    use futures_util::StreamExt;
    let h2 = h2_client(None);
    let chunk = || Ok::<_, std::io::Error>(bytes::Bytes::from_static(&[b'z'; 1000]));
    let stalled = futures_util::stream::iter([chunk()]).chain(futures_util::stream::pending());
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        h2.post(s.dp.url("/t/h2-stalled"))
            .body(reqwest::Body::wrap_stream(stalled))
            .send(),
    )
    .await
    .expect("answered within 5 s")
    .expect("response");
    assert_eq!(response.status(), 408);
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "cut early: {:?}",
        started.elapsed()
    );
    let problem: Value = response.json().await.expect("json");
    assert_eq!(problem["code"], "body_timeout");
    let steady = futures_util::stream::iter(0..4).then(move |_| async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        chunk()
    });
    let response = h2
        .post(s.dp.url("/t/h2-slow"))
        .body(reqwest::Body::wrap_stream(steady))
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.expect("json");
    assert_eq!(echo["body_bytes"], 4000);
}

/// HTTP/2 flow control: a stream whose upstream stops reading its body holds only its own
/// window, not the connection's: another stream's upload on the same connection goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upload_stuck_at_its_upstream_does_not_stall_the_connections_other_streams() {
    let s = setup_configured(
        &[json!({"name": "t", "paths": ["/t"], "upstream": "u"})],
        |settings| settings.body_timeout_ms = 3000,
    )
    .await;
    s.add_raw_upstream().await;
    let h2 = h2_client(None);
    // 64 MiB offered to an upstream that reads none of it: the kernel's socket buffers take
    // some megabytes, then the stream's window fills and stays full.
    let endless = common::streamed_body(b'a', 64 * 1024, 1024);
    let stuck = tokio::spawn({
        let request = h2.post(s.dp.url("/raw/hold")).body(endless);
        async move { request.send().await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!stuck.is_finished(), "the held upload was answered");
    // Another upload on the same connection, of 1 MiB: with equal 1 MiB windows the stuck
    // stream held all of the connection's, and this one waited into a 408.
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        h2.post(s.dp.url("/t/beside"))
            .body(vec![b'b'; 1024 * 1024])
            .send(),
    )
    .await
    .expect("answered within 10 s")
    .expect("response");
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.expect("json");
    assert_eq!(echo["body_bytes"], 1024 * 1024);
    stuck.abort();
}

/// Shutdown: the listener closes, requests in flight (HTTP/1 and HTTP/2) finish, including
/// ones answered seconds later and an HTTP/2 download whose client stops reading for a while
/// after the proxy handed the last bytes to h2; an idle HTTP/2 connection is told GOAWAY and
/// closes once its client answers the GOAWAY's PING; the data plane stops once all of that is
/// done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_says_goaway_to_idle_http2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const DOWNLOAD: usize = 1024 * 1024;
    let s = setup(&[json!({"name": "all", "paths": ["/"], "upstream": "u"})]).await;
    // Small flow-control windows: h2 sends the body only as the client reads it. Two clients:
    // the download has a connection of its own, with no other stream in flight.
    // Answered 2.5 s after the request: well after the stop.
    let slow = [s.client.clone(), h2_client(Some(65_535))].map(|client| {
        let url = s.dp.url("/slow/2500");
        tokio::spawn(async move {
            let response = client.get(url).send().await.expect("answered");
            (response.version(), response.status().as_u16())
        })
    });
    let download = tokio::spawn({
        let url = s.dp.url(&format!("/download/{DOWNLOAD}"));
        let client = h2_client(Some(65_535));
        async move {
            let mut response = client.get(url).send().await.expect("download");
            // Read at 300 KB/s, and stop for 1.5 s near the end, when the proxy has handed
            // everything to h2 and nothing moves.
            let started = std::time::Instant::now();
            let (mut received, mut paused) = (0, false);
            while let Some(chunk) = response.chunk().await.expect("the whole body") {
                received += chunk.len();
                if !paused && received >= DOWNLOAD - 32 * 1024 {
                    paused = true;
                    tokio::time::sleep(Duration::from_millis(1_500)).await;
                }
                let due = Duration::from_secs_f64(received as f64 / 300_000.0);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            received
        }
    });
    let mut idle = raw_connection(
        s.dp.proxy,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let proxy = s.dp.proxy;
    let stopped = tokio::spawn(s.dp.stop());
    // The idle connection gets a GOAWAY and a PING; answered, the server closes it.
    let mut sent = Vec::new();
    let ping = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buffer = [0u8; 4096];
        loop {
            let n = idle.read(&mut buffer).await.expect("read");
            assert!(
                n > 0,
                "closed before its PING: {:?}",
                http2_frame_types(&sent)
            );
            sent.extend_from_slice(&buffer[..n]);
            let frames = http2_frames(&sent);
            if let Some((_, _, payload)) = frames.iter().find(|(k, f, _)| *k == 6 && f & 1 == 0) {
                return payload.clone();
            }
        }
    })
    .await
    .expect("a PING after the GOAWAY");
    assert!(
        http2_frame_types(&sent).contains(&7),
        "GOAWAY expected, frames: {:?}",
        http2_frame_types(&sent)
    );
    let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
    ack.extend_from_slice(&ping);
    idle.write_all(&ack).await.expect("PING ACK");
    read_until_closed(&mut idle, Duration::from_secs(3))
        .await
        .expect("closed once its client answered");

    let answers = futures_util::future::join_all(slow).await;
    let answers: Vec<_> = answers.into_iter().map(|a| a.expect("task")).collect();
    assert_eq!(
        answers,
        [
            (reqwest::Version::HTTP_11, 200),
            (reqwest::Version::HTTP_2, 200)
        ]
    );
    assert_eq!(download.await.expect("download task"), DOWNLOAD);
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("stops once its requests are done")
        .expect("stop task");
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "the listener is closed"
    );
}

/// HTTP/1.1 bodyless requests are served by the proxy's own loop (`lane.rs`), anything else by
/// hyper, to which the lane hands the connection: on one connection, pipelined requests of
/// both kinds are answered in order, the body after the hand-off reaches the upstream, and the
/// answers are framed alike (Date, Content-Length, keep-alive) on both sides of the hand-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_lane_and_hyper_share_a_connection() {
    let s = setup(&[json!({"name": "public", "paths": ["/public"], "upstream": "u"})]).await;
    let mut stream = raw_connection(
        s.dp.proxy,
        concat!(
            "GET /public/one HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST /public/two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            "GET /public/three HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .as_bytes(),
    )
    .await;
    // Everything received so far, split into complete answers, until there are four.
    let mut received = Vec::new();
    let answers = loop {
        let text = String::from_utf8_lossy(&received).to_string();
        let mut answers = Vec::new();
        let mut rest = text.as_str();
        while let Some((head, after)) = rest.split_once("\r\n\r\n") {
            let length = content_length_of(head);
            let Some(body) = after.get(..length) else {
                break;
            };
            answers.push((head.to_string(), body.to_string()));
            rest = &after[length..];
        }
        if answers.len() == 4 {
            break answers;
        }
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("answers in time")
            .expect("read");
        assert!(n > 0, "closed after {} answers: {text}", answers.len());
        received.extend_from_slice(&chunk[..n]);
    };
    let statuses: Vec<&str> = answers
        .iter()
        .map(|(head, _)| head.lines().next().unwrap_or_default())
        .collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 404 Not Found",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK"
        ]
    );
    for (head, body) in &answers {
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("\r\ndate: "), "{head}");
        assert!(lower.contains("\r\nx-request-id: "), "{head}");
        assert_eq!(content_length_of(head), body.len(), "{head}");
    }
    assert!(
        answers[1].1.contains("\"code\":\"no_route\""),
        "{}",
        answers[1].1
    );
    assert!(
        answers[2].1.contains("\"body_bytes\":5"),
        "{}",
        answers[2].1
    );
    assert!(answers[3].1.contains("/public/three"), "{}", answers[3].1);
    let paths: Vec<String> = s.upstream.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/public/one", "/public/two", "/public/three"]);

    // A head that arrives in pieces is served once complete; HEAD answers carry no body.
    use tokio::io::AsyncWriteExt;
    let mut stream = raw_connection(s.dp.proxy, b"HEAD /public/four HT").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream
        .write_all(b"TP/1.1\r\nHost: x\r\n\r\nGET /public/five HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let text = read_response(&mut stream).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let (head, rest) = text.split_once("\r\n\r\n").expect("a head");
    assert!(content_length_of(head) > 0, "HEAD keeps the length: {head}");
    let rest = if rest.is_empty() {
        read_response(&mut stream).await
    } else {
        rest.to_string()
    };
    assert!(
        rest.starts_with("HTTP/1.1 200 OK\r\n"),
        "no body after HEAD's head: {rest}"
    );
}

/// A client that leaves while its answer is pending ends the request: the proxy drops the
/// upstream exchange (closes that connection) rather than wait for an answer nobody reads;
/// for a request of the fast lane (HTTP/1.1) as for one hyper serves (HTTP/1.0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_ends_its_upstream_exchange() {
    use std::sync::atomic::Ordering;
    let s = setup(&[]).await;
    let (_, dropped) = s.add_raw_upstream().await;
    for (n, request) in [
        "GET /raw/wait-close HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /raw/wait-close HTTP/1.0\r\nHost: x\r\n\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let stream = raw_connection(s.dp.proxy, request.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            n,
            "{request}: still waiting upstream"
        );
        drop(stream);
        wait_until(
            Duration::from_secs(5),
            "the upstream exchange dropped",
            || {
                let dropped = dropped.clone();
                async move { dropped.load(Ordering::SeqCst) == n + 1 }
            },
        )
        .await;
    }
}

/// The headers the gateway sets on answers (X-Request-Id, and RateLimit-* on a limited route)
/// replace an upstream's headers of those names: one line each, the gateway's value, whether
/// the fast lane (HTTP/1.1) or hyper (HTTP/1.0) writes the answer. On a route without a
/// limit the upstream's RateLimit-* pass through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answer_headers_replace_the_upstreams() {
    let s = setup(&[]).await;
    s.add_raw_upstream().await;
    s.cp.create(
        "/routes",
        json!({"name": "own-ids", "paths": ["/raw/own-ids/limited"], "upstream": "raw",
               "rate_limit": {"requests": 100, "window_seconds": 60}}),
    )
    .await;
    s.sync().await;
    let lines = |answer: &str, name: &str| -> Vec<String> {
        let head = answer.split("\r\n\r\n").next().unwrap_or_default();
        head.lines()
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    };
    for (n, version) in ["HTTP/1.1", "HTTP/1.0"].into_iter().enumerate() {
        let answer = raw_request(
            s.dp.proxy,
            format!(
                "GET /raw/own-ids/limited {version}\r\nHost: x\r\nX-Request-Id: client-id\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert!(answer.starts_with(&format!("{version} 200")), "{answer}");
        assert_eq!(lines(&answer, "x-request-id"), ["client-id"], "{answer}");
        assert_eq!(lines(&answer, "ratelimit-limit"), ["100"], "{answer}");
        assert_eq!(
            lines(&answer, "ratelimit-remaining"),
            [format!("{}", 99 - n)],
            "{answer}"
        );
        assert_eq!(lines(&answer, "ratelimit-reset"), ["60"], "{answer}");
        assert_eq!(lines(&answer, "x-kept"), ["1"], "{answer}");
    }
    // Without a limit on the route, only the request id is the gateway's.
    let answer = raw_request(s.dp.proxy, b"GET /raw/own-ids HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let id = lines(&answer, "x-request-id");
    assert_eq!(id.len(), 1, "{answer}");
    assert_ne!(id[0], "from-upstream");
    assert_eq!(lines(&answer, "ratelimit-limit"), ["999"], "{answer}");
    assert_eq!(lines(&answer, "ratelimit-reset"), ["77"], "{answer}");
}

/// An upstream that answers a head and then stalls inside the body: the body is cut once the
/// upstream has been silent for its `timeouts.request_ms` (the client's connection closed, the
/// upstream's dropped), while one that keeps sending slowly, for longer than that in all, is
/// passed whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_inside_a_body_is_cut_after_its_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let path = String::from_utf8_lossy(&head)
                    .split(' ')
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                if path == "/steady" {
                    // A byte every 150 ms: 750 ms in all, each gap under the 300 ms limit.
                    for byte in b"hello" {
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        if stream.write_all(&[*byte]).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                // Two bytes, then silence: does the proxy let go of the connection?
                let _ = stream.write_all(b"he").await;
                let mut rest = [0u8; 64];
                let gone = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut rest));
                if let Ok(Ok(0) | Err(_)) = gone.await {
                    let _ = closed.send(path);
                }
            });
        }
    });
    let s = setup(&[]).await;
    s.cp.create(
        "/upstreams",
        json!({"name": "stalling", "targets": [{"url": format!("http://{addr}")}],
               "timeouts": {"request_ms": 300}}),
    )
    .await;
    s.cp.create(
        "/routes",
        json!({"name": "stalling", "paths": ["/"], "upstream": "stalling"}),
    )
    .await;
    s.sync().await;

    let steady = s
        .client
        .get(s.dp.url("/steady"))
        .send()
        .await
        .expect("request");
    assert_eq!(steady.status(), 200);
    assert_eq!(steady.text().await.expect("whole body"), "hello");

    let started = std::time::Instant::now();
    let answer =
        common::raw_request_to_close(s.dp.proxy, b"GET /stalled HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let cut_after = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nhe"),
        "the bytes that came: {answer:?}"
    );
    assert!(
        cut_after >= Duration::from_millis(300) && cut_after < Duration::from_secs(3),
        "cut after {cut_after:?}"
    );
    let closed = tokio::time::timeout(Duration::from_secs(3), closed_rx.recv()).await;
    assert_eq!(
        closed.ok().flatten().as_deref(),
        Some("/stalled"),
        "the upstream connection is dropped"
    );
}

/// With a request body, the upstream's `timeouts.request_ms` bounds the upstream's part, not
/// the client's: a slow upload that takes longer than it in all passes; an upstream that
/// answers later than it after the body, or that takes none of a body, gets a 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeouts_with_a_body_count_the_upstreams_time_not_the_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(&[]).await;
    // An upstream that reads the head and then nothing more.
    let deaf = {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let listener = socket.listen(16).expect("listen");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = [0u8; 256];
                let _ = stream.read(&mut head).await;
                held.push(stream);
            }
        });
        addr
    };
    s.cp.create(
        "/upstreams",
        json!({"name": "quick", "targets": [{"url": s.upstream.url()}],
               "timeouts": {"request_ms": 300}}),
    )
    .await;
    s.cp.create(
        "/upstreams",
        json!({"name": "deaf", "targets": [{"url": format!("http://{deaf}")}],
               "timeouts": {"request_ms": 300}}),
    )
    .await;
    for (name, upstream) in [("quick", "quick"), ("deaf", "deaf")] {
        s.cp.create(
            "/routes",
            json!({"name": name, "paths": [format!("/{name}")], "upstream": upstream,
                   "strip_prefix": true}),
        )
        .await;
    }
    s.sync().await;

    // 6 x 64 KiB, 150 ms apart: 750 ms of upload against a 300 ms timeout.
    let chunk = bytes::Bytes::from(vec![b'u'; 64 * 1024]);
    let paced = futures_util::stream::unfold(0, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent == 6 {
                return None;
            }
            if sent > 0 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            Some((Ok::<_, std::io::Error>(chunk), sent + 1))
        }
    });
    let response = s
        .client
        .post(s.dp.url("/quick/upload"))
        .body(reqwest::Body::wrap_stream(paced))
        .send()
        .await
        .expect("slow upload");
    assert_eq!(
        response.status(),
        200,
        "a slow client is not the upstream's fault"
    );
    let seen = s.upstream.requests().pop().expect("seen");
    assert_eq!(seen.body_bytes, 6 * 64 * 1024);

    // The body goes at once, the answer comes 600 ms later: 504.
    let response = s
        .client
        .post(s.dp.url("/quick/slow/600"))
        .body("small")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 504);

    // An upstream that takes none of an 8 MiB body: 504 once its socket is full and it has
    // taken nothing for 300 ms.
    let mut stream = tokio::net::TcpStream::connect(s.dp.proxy)
        .await
        .expect("connect");
    let size = 8 * 1024 * 1024;
    let head = format!("POST /deaf HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
    let (mut read, mut write) = stream.split();
    let started = std::time::Instant::now();
    let sending = async {
        let _ = write.write_all(head.as_bytes()).await;
        let _ = write.write_all(&vec![b'd'; size]).await;
        std::future::pending::<()>().await;
    };
    let mut answer = Vec::new();
    let reading = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buffer = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
        }
    });
    tokio::select! {
        () = sending => {}
        timed = reading => assert!(timed.is_ok(), "no answer from the proxy"),
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "504 after {:?}",
        started.elapsed()
    );
}

/// An upstream that echoes a body as it reads it, to a client that stops reading the answer
/// for longer than the upstream's request timeout: the upstream stops reading only because it
/// cannot write, which is not its stall. The echo comes back whole once the client reads.
/// (Whether the body's writer is the one waiting when reading resumes depends on the sockets'
/// timing; this guards the path, it does not force that case.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_to_a_client_that_pauses_reading_is_not_cut_as_a_stall() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(&[]).await;
    s.add_raw_upstream().await;
    s.cp.patch("/upstreams/raw", json!({"timeouts": {"request_ms": 300}}))
        .await;
    s.sync().await;
    const SIZE: usize = 32 * 1024 * 1024;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    let stream = socket.connect(s.dp.proxy).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let sender = tokio::spawn(async move {
        let head =
            format!("POST /raw/early-echo HTTP/1.1\r\nHost: a\r\nContent-Length: {SIZE}\r\n\r\n");
        write.write_all(head.as_bytes()).await.expect("head");
        let chunk = vec![b'e'; 64 * 1024];
        for _ in 0..SIZE / chunk.len() {
            write.write_all(&chunk).await.expect("body");
        }
        write
    });
    // Read the head, then nothing for longer than the upstream's timeout.
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = read.read(&mut buffer).await.expect("read");
        assert!(n > 0, "closed before the head");
        received.extend_from_slice(&buffer[..n]);
    }
    assert!(received.starts_with(b"HTTP/1.1 200"));
    let head_end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head")
        + 4;
    let mut body = received.len() - head_end;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let reading = tokio::time::timeout(Duration::from_secs(60), async {
        while body < SIZE {
            match read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body += n,
            }
        }
    });
    assert!(reading.await.is_ok(), "echo stalled");
    assert_eq!(body, SIZE, "the whole echo came back");
    drop(sender.await.expect("sender"));
}

/// Route selection end to end: exact host, then `*.` wildcard (not the apex), then routes
/// without hosts; exact path before prefix; method and header conditions; priority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_chosen_by_host_path_method_header_and_priority() {
    let route = |name: &str, extra: Value| {
        let mut route = json!({"name": name, "paths": ["/"], "upstream": "u",
            "transforms": {"request": {"set": {"X-Route": name}}}});
        for (key, value) in extra.as_object().expect("object") {
            route[key] = value.clone();
        }
        route
    };
    let s = setup(&[
        route("exact-host", json!({"hosts": ["api.example.com"]})),
        route("wild", json!({"hosts": ["*.example.com"]})),
        route("any", json!({})),
        route("exact", json!({"paths": ["/e"], "path_match": "exact"})),
        route("items", json!({"paths": ["/items"]})),
        route("posts", json!({"paths": ["/items"], "methods": ["POST"]})),
        route(
            "beta",
            json!({"paths": ["/items"], "headers": {"x-beta": ["1"]}}),
        ),
        route("low", json!({"paths": ["/p"], "priority": 1})),
        route("high", json!({"paths": ["/p"], "priority": 5})),
    ])
    .await;
    for (method, path, headers, want) in [
        ("GET", "/x", vec![("Host", "api.example.com")], "exact-host"),
        (
            "GET",
            "/items",
            vec![("Host", "api.example.com")],
            "exact-host",
        ),
        ("GET", "/x", vec![("Host", "v1.example.com")], "wild"),
        ("GET", "/x", vec![("Host", "a.b.example.com")], "wild"),
        ("GET", "/x", vec![("Host", "example.com")], "any"),
        ("GET", "/x", vec![("Host", "other.test")], "any"),
        ("GET", "/e", vec![], "exact"),
        ("GET", "/e/x", vec![], "any"),
        ("GET", "/items/1", vec![], "items"),
        ("POST", "/items", vec![], "posts"),
        ("GET", "/items", vec![("X-Beta", "1")], "beta"),
        ("GET", "/items", vec![("X-Beta", "2")], "items"),
        ("GET", "/p", vec![], "high"),
    ] {
        let mut request = s
            .client
            .request(method.parse().expect("method"), s.dp.url(path));
        for (name, value) in &headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), 200, "{method} {path} {headers:?}");
        let seen = s.upstream.requests().pop().expect("seen");
        assert_eq!(seen.headers["x-route"], want, "{method} {path} {headers:?}");
    }
}

/// Over HTTP/2 too (raw frames: clients normalise paths before sending them), traversal and
/// other bad paths are refused with 400 and never reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_over_http2_are_refused_and_never_reach_the_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(&[json!({"name": "public", "paths": ["/public"], "upstream": "u"})]).await;
    let paths = [
        "/public/%2e%2e/admin",
        "/public/../admin",
        "/public/..;/admin",
        "/public%2f..%2fadmin",
        "/public/a%00",
    ];
    // HPACK literal fields without indexing, no Huffman coding.
    let literal = |block: &mut Vec<u8>, name: &str, value: &str| {
        block.push(0);
        block.push(u8::try_from(name.len()).expect("short"));
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len()).expect("short"));
        block.extend_from_slice(value.as_bytes());
    };
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    for (i, path) in paths.iter().enumerate() {
        let mut block = Vec::new();
        literal(&mut block, ":method", "GET");
        literal(&mut block, ":scheme", "http");
        literal(&mut block, ":path", path);
        literal(&mut block, ":authority", "x");
        let stream = u32::try_from(2 * i + 1).expect("small");
        let length = u32::try_from(block.len()).expect("small");
        wire.extend_from_slice(&length.to_be_bytes()[1..]);
        wire.extend_from_slice(&[1, 0x5]); // HEADERS, END_STREAM | END_HEADERS
        wire.extend_from_slice(&stream.to_be_bytes());
        wire.extend_from_slice(&block);
    }
    let mut connection = raw_connection(s.dp.proxy, &wire).await;
    let mut received = Vec::new();
    let answers = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 4096];
        loop {
            let heads: Vec<Vec<u8>> = http2_frames(&received)
                .into_iter()
                .filter(|(kind, _, _)| *kind == 1)
                .map(|(_, _, payload)| payload)
                .collect();
            if heads.len() == paths.len() {
                return heads;
            }
            let n = connection.read(&mut buffer).await.expect("read");
            assert!(n > 0, "closed: {:?}", http2_frame_types(&received));
            received.extend_from_slice(&buffer[..n]);
        }
    })
    .await
    .expect("an answer on every stream");
    for head in &answers {
        // `:status 400` is entry 12 of HPACK's static table.
        assert!(
            head.first() == Some(&0x8c) || head.windows(3).any(|w| w == b"400"),
            "not a 400: {head:?}"
        );
    }
    connection.shutdown().await.ok();
    assert!(
        s.upstream.requests().is_empty(),
        "nothing reached the upstream: {:?}",
        s.upstream.requests()
    );
}
