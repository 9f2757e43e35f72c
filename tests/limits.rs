//! Rate limits and quotas end to end: real Redis (the machine's, with a key prefix per test, or
//! a private redis-server the test kills), real control and data planes, real upstreams.

mod common;

use std::time::{Duration, Instant};

use common::{
    Backend, OwnRedis, REDIS_URL, TestApp, TestDp, TestUpstream, redis_cleanup, redis_prefix,
    wait_until,
};
use serde_json::{Value, json};

struct Cluster {
    cp: TestApp,
    dps: Vec<TestDp>,
    _upstream: TestUpstream,
    client: reqwest::Client,
    _dirs: Vec<tempfile::TempDir>,
}

/// A control plane with `plans`, `routes` (on one upstream `u`) and consumers (username, plan),
/// and `nodes` data planes limiting through `redis` (None: in memory).
async fn cluster(
    plans: &[Value],
    routes: &[Value],
    consumers: &[(&str, Option<&str>)],
    nodes: usize,
    redis: Option<(&str, u64)>,
    prefix: &str,
) -> (Cluster, Vec<String>) {
    let cp = TestApp::spawn_prefixed(Backend::Postgres, prefix).await;
    let upstream = TestUpstream::start("u").await;
    cp.upstream_at("u", &upstream.url()).await;
    for plan in plans {
        cp.create("/plans", plan.clone()).await;
    }
    for route in routes {
        cp.create("/routes", route.clone()).await;
    }
    let mut keys = Vec::new();
    for (username, plan) in consumers {
        cp.create("/consumers", json!({"username": username, "plan": plan}))
            .await;
        let (_, issued) = cp
            .post(&format!("/consumers/{username}/keys"), json!({}))
            .await;
        keys.push(issued["key"].as_str().expect("key").to_string());
    }
    let mut dps = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..nodes {
        let dir = tempfile::tempdir().expect("dir");
        let (url, timeout) = redis.map_or((None, 250), |(url, timeout)| (Some(url), timeout));
        dps.push(
            TestDp::start_with(
                cp.cluster,
                dir.path(),
                &format!("dp-{i}"),
                url,
                prefix,
                timeout,
            )
            .await,
        );
        dirs.push(dir);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    for dp in &dps {
        dp.synced_with(&cp).await;
    }
    (
        Cluster {
            cp,
            dps,
            _upstream: upstream,
            client,
            _dirs: dirs,
        },
        keys,
    )
}

impl Cluster {
    async fn get(&self, node: usize, path: &str, key: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.dps[node].url(path));
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        request.send().await.expect("request")
    }

    async fn status(&self, node: usize, path: &str, key: Option<&str>) -> u16 {
        self.get(node, path, key).await.status().as_u16()
    }
}

fn header(response: &reqwest::Response, name: &str) -> Option<i64> {
    response.headers().get(name)?.to_str().ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_limit_is_exact_across_two_data_planes() {
    let prefix = redis_prefix();
    let (c, keys) = cluster(
        &[
            json!({"name": "ten", "rate_limit": {"requests": 10, "window_seconds": 60}}),
            json!({"name": "three", "rate_limit": {"requests": 3, "window_seconds": 60}}),
        ],
        &[json!({"name": "api", "paths": ["/api"], "upstream": "u", "auth": {"api_key": {}}})],
        &[
            ("burst", Some("ten")),
            ("steady", Some("three")),
            ("sticky", Some("three")),
        ],
        2,
        Some((REDIS_URL, 250)),
        &prefix,
    )
    .await;

    // 60 concurrent requests, interleaved over both nodes: exactly 10 admitted.
    let c = std::sync::Arc::new(c);
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let (c, key) = (c.clone(), keys[0].clone());
            tokio::spawn(async move {
                let response = c.get(i % 2, "/api/x", Some(&key)).await;
                (
                    response.status().as_u16(),
                    header(&response, "retry-after"),
                    header(&response, "ratelimit-remaining"),
                )
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        let (status, retry_after, remaining) = task.await.expect("task");
        match status {
            200 => admitted += 1,
            429 => {
                assert!(
                    retry_after.is_some_and(|s| (1..=60).contains(&s)),
                    "Retry-After on 429"
                );
                assert_eq!(remaining, Some(0));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 10, "exactly the plan's limit across both nodes");
    // The control plane reads the same window.
    let (status, usage) = c.cp.get("/consumers/burst/usage").await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(
        (
            &usage["rate_limit"]["used"],
            &usage["rate_limit"]["remaining"]
        ),
        (&json!(10), &json!(0)),
        "{usage}"
    );

    // Headers count down, across nodes.
    for (i, want_remaining) in [2, 1, 0].into_iter().enumerate() {
        let response = c.get(i % 2, "/api/x", Some(&keys[1])).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "ratelimit-limit"), Some(3));
        assert_eq!(
            header(&response, "ratelimit-remaining"),
            Some(want_remaining)
        );
        // Admitted: everything counted leaves the window one window length from now.
        assert_eq!(header(&response, "ratelimit-reset"), Some(60));
    }
    let refused = c.get(1, "/api/x", Some(&keys[1])).await;
    assert_eq!(refused.status(), 429);
    // Refused: a slot frees when the oldest of the three, admitted moments ago, leaves.
    assert!(
        header(&refused, "retry-after").is_some_and(|s| (55..=60).contains(&s)),
        "Retry-After {:?}",
        header(&refused, "retry-after")
    );

    // A client repeating one X-Request-Id gets no extra admissions.
    let mut admitted = 0;
    for i in 0..6 {
        let response = c
            .client
            .get(c.dps[i % 2].url("/api/x"))
            .header("X-API-Key", &keys[2])
            .header("X-Request-Id", "always-the-same")
            .send()
            .await
            .expect("request");
        if response.status() == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3, "the limit counts requests, not request ids");
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["code"], "rate_limited");
    redis_cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_counts_only_admitted_requests_and_resets_at_the_utc_boundary() {
    let prefix = redis_prefix();
    let (c, keys) = cluster(
        &[
            json!({"name": "metered", "rate_limit": {"requests": 2, "window_seconds": 1},
                 "quota": {"requests": 5, "period": "day"}}),
        ],
        &[json!({"name": "api", "paths": ["/api"], "upstream": "u", "auth": {"api_key": {}}})],
        &[("alice", Some("metered"))],
        1,
        Some((REDIS_URL, 250)),
        &prefix,
    )
    .await;
    let key = keys[0].as_str();
    let burst = || async {
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(c.status(0, "/api/x", Some(key)).await);
        }
        statuses
    };
    // Two windows of 4 requests: 2 admitted, 2 refused by the rate limit each time.
    assert_eq!(burst().await, vec![200, 200, 429, 429]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(burst().await, vec![200, 200, 429, 429]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // 4 of the quota's 5 used (refusals consumed nothing): one more, then the quota refuses.
    assert_eq!(c.status(0, "/api/x", Some(key)).await, 200);
    let refused = c.get(0, "/api/x", Some(key)).await;
    assert_eq!(refused.status(), 429);
    let retry_after = header(&refused, "retry-after").expect("Retry-After");
    assert!(
        retry_after > 0 && retry_after <= 86_400,
        "until the next UTC midnight: {retry_after}"
    );
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["code"], "quota_exceeded");

    // The control plane reads the same counters.
    let (status, usage) = c.cp.get("/consumers/alice/usage").await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["plan"], "metered");
    assert_eq!(usage["quota"]["used"], 5);
    assert_eq!(usage["quota"]["remaining"], 0);
    assert_eq!(usage["rate_limit"]["limit"], 2);
    assert!(
        usage["quota"]["resets_at"]
            .as_str()
            .is_some_and(|t| t.ends_with("T00:00:00Z")),
        "{usage}"
    );

    // Past the next UTC midnight the quota starts again.
    c.dps[0].clock.advance(retry_after * 1000 + 1000);
    assert_eq!(c.status(0, "/api/x", Some(key)).await, 200);
    redis_cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_node_limits_in_memory() {
    let (c, _) = cluster(
        &[],
        &[json!({"name": "limited", "paths": ["/l"], "upstream": "u",
                 "rate_limit": {"requests": 5, "window_seconds": 60, "by": "ip"}})],
        &[],
        1,
        None,
        "unused",
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(c.status(0, "/l", None).await);
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429, 429, 429]);
}

/// p99 of the time `count` sequential GETs of `path` on node 0 take.
async fn p99(c: &Cluster, path: &str, count: usize) -> (Duration, Vec<u16>) {
    let mut times = Vec::with_capacity(count);
    let mut statuses = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        statuses.push(c.status(0, path, None).await);
        times.push(started.elapsed());
    }
    times.sort_unstable();
    (times[count * 99 / 100], statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_follows_each_policy_and_recovers_without_restart() {
    let mut redis = OwnRedis::start();
    let route = |name: &str, requests: u64, policy: &str| {
        json!({"name": name, "paths": [format!("/{name}")], "upstream": "u",
               "rate_limit": {"requests": requests, "window_seconds": 60, "failure_policy": policy}})
    };
    let (c, _) = cluster(
        &[],
        &[
            json!({"name": "free", "paths": ["/free"], "upstream": "u"}),
            route("open", 100_000, "fail_open"),
            route("closed", 5, "fail_closed"),
            route("after", 5, "fail_closed"),
            route("local", 20, "local"),
        ],
        &[],
        2,
        Some((&redis.url(), 5)),
        "outage",
    )
    .await;
    // Redis up: limits work. The first script call also loads the script into a fresh Redis
    // (NOSCRIPT, SCRIPT LOAD, EVALSHA), which can miss this test's 5 ms timeout on a loaded
    // machine (then 503, and the breaker skips Redis for a second): wait for it.
    wait_until(Duration::from_secs(5), "Redis up: limits work", || async {
        c.status(0, "/closed", None).await == 200
    })
    .await;
    // Both nodes learn that two data planes are live.
    for dp in &c.dps {
        wait_until(Duration::from_secs(5), "live data planes = 2", || async {
            let metrics = c
                .client
                .get(format!("http://{}/metrics", dp.status))
                .send()
                .await
                .expect("metrics");
            metrics
                .text()
                .await
                .unwrap_or_default()
                .contains("tollgate_live_data_planes 2")
        })
        .await;
    }
    let (baseline, _) = p99(&c, "/free", 200).await;

    redis.kill();
    // fail_open: every request served; p99 added latency stays small.
    let (degraded, statuses) = p99(&c, "/open", 200).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "fail_open serves everything"
    );
    let added = degraded.saturating_sub(baseline);
    eprintln!("p99 with Redis down: {degraded:?} (baseline {baseline:?}, added {added:?})");
    assert!(
        added < Duration::from_millis(10),
        "p99 added latency {added:?} while Redis is down"
    );
    // fail_closed: 503 limiter_unavailable, never 401/500.
    let refused = c.get(0, "/closed", None).await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["code"], "limiter_unavailable");
    // local: each of the 2 nodes enforces 20 / 2 = 10 in memory.
    let mut admitted = 0;
    for _ in 0..30 {
        if c.status(0, "/local", None).await == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "limit / live nodes on this node");

    // Redis back on the same address: shared counting resumes, no restart.
    redis.restart();
    let took = wait_until(Duration::from_secs(10), "limits shared again", || async {
        c.status(1, "/closed", None).await == 200
    })
    .await;
    eprintln!("limiter recovered {took:?} after Redis came back");
    // Counted on a limit the probes never touched: a probe that timed out on its side (and
    // was answered 503) may still have been counted by Redis a moment later.
    let mut admitted = 0;
    for i in 0..12 {
        if c.status(i % 2, "/after", None).await == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5, "exactly the limit, counted in Redis again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_limits_trust_forwarded_for_only_from_trusted_proxies() {
    let prefix = redis_prefix();
    let (c, _) = cluster(
        &[],
        &[json!({"name": "ip", "paths": ["/ip"], "upstream": "u",
                 "rate_limit": {"requests": 2, "window_seconds": 60, "by": "ip"}})],
        &[],
        1, // this node does not trust the test client (127.0.0.1): X-Forwarded-For is ignored
        Some((REDIS_URL, 250)),
        &prefix,
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let behind_lb = TestDp::start_configured(c.cp.cluster, dir.path(), "behind-lb", |settings| {
        settings.trusted_proxies = vec!["127.0.0.1".parse().expect("cidr")];
        settings.redis_url = Some(tollgate_shared::Secret::new(REDIS_URL));
        settings.redis_prefix = prefix.clone();
    })
    .await;
    behind_lb.synced_with(&c.cp).await;
    let from = |dp: &TestDp, xff: &str| {
        let request = c
            .client
            .get(dp.url("/ip"))
            .header("X-Forwarded-For", xff.to_string());
        async move { request.send().await.expect("request").status().as_u16() }
    };

    // Untrusted peer: a forged X-Forwarded-For does not buy a fresh counter.
    let spoofed = [
        from(&c.dps[0], "1.1.1.1").await,
        from(&c.dps[0], "2.2.2.2").await,
        from(&c.dps[0], "3.3.3.3").await,
    ];
    assert_eq!(spoofed, [200, 200, 429]);

    // Behind a trusted proxy: each client address has its own counter; the nearest untrusted
    // address of the chain is the client.
    assert_eq!(from(&behind_lb, "9.9.9.1").await, 200);
    assert_eq!(from(&behind_lb, "9.9.9.1").await, 200);
    assert_eq!(from(&behind_lb, "9.9.9.1").await, 429);
    assert_eq!(
        from(&behind_lb, "8.8.8.8, 9.9.9.2").await,
        200,
        "9.9.9.2 is the client"
    );
    assert_eq!(from(&behind_lb, "9.9.9.2").await, 200);
    assert_eq!(from(&behind_lb, "7.7.7.7, 9.9.9.2").await, 429);
    redis_cleanup(&prefix).await;
}
