//! Admin API v1 end to end, against real Postgres (a schema per test) and real SQLite files.

mod common;

use common::{Backend, TestApp, TestDb};
use serde_json::{Value, json};

on_both_backends!(
    crud_of_every_resource,
    validation_errors_are_problem_json_with_detail,
    references_are_enforced,
    key_secret_is_shown_once_and_never_stored,
    key_expiry_and_revocation,
    revision_bumps_once_per_successful_write_only,
    concurrent_writers_lose_nothing,
    admin_token_is_required,
    generated_admin_token_is_printed_once_and_works,
    jwt_issuer_secret_is_write_only,
    declarative_config_exports_and_applies_whole,
);

fn upstream(name: &str) -> Value {
    json!({"name": name, "targets": [{"url": "http://10.0.0.5:9001", "weight": 100}]})
}

fn route(name: &str, upstream: &str) -> Value {
    json!({"name": name, "paths": [format!("/{name}")], "methods": ["GET", "POST"],
           "upstream": upstream, "strip_prefix": true, "auth": {"api_key": {}},
           "rate_limit": {"requests": 1000, "window_seconds": 1, "by": "ip"}})
}

/// Whether every field of `expected` is in `actual` (objects compared recursively, so
/// defaults the server fills in do not matter).
fn is_subset(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Object(want), Value::Object(got)) => want
            .iter()
            .all(|(key, value)| got.get(key).is_some_and(|g| is_subset(value, g))),
        _ => expected == actual,
    }
}

fn problem(status: u16, body: &Value, want_status: u16, detail_contains: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["status"], want_status, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(detail_contains),
        "detail {detail:?} should mention {detail_contains:?}"
    );
    assert!(body["code"].is_string(), "{body}");
}

/// Create, list, get by id and by name, replace, patch and delete each kind of resource.
async fn crud_of_every_resource(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let cases = [
        (
            "/upstreams",
            upstream("users"),
            "name",
            json!({"retries": 2}),
            "retries",
            json!(2),
        ),
        (
            "/plans",
            json!({"name": "gold", "rate_limit": {"requests": 100, "window_seconds": 60},
                   "quota": {"requests": 100000, "period": "month"}}),
            "name",
            json!({"failure_policy": "fail_closed"}),
            "failure_policy",
            json!("fail_closed"),
        ),
        (
            "/jwt-issuers",
            json!({"name": "corp", "issuer": "https://id.example", "audiences": ["api"],
                   "algorithms": ["RS256"], "jwks_url": "https://id.example/jwks.json"}),
            "name",
            json!({"leeway_seconds": 5}),
            "leeway_seconds",
            json!(5),
        ),
        (
            "/consumers",
            json!({"username": "alice", "plan": "gold", "tags": ["mobile"]}),
            "username",
            json!({"tags": ["mobile", "beta"]}),
            "tags",
            json!(["mobile", "beta"]),
        ),
        (
            "/routes",
            route("users", "users"),
            "name",
            json!({"priority": 7}),
            "priority",
            json!(7),
        ),
    ];
    for (collection, body, name_field, patch, patched_field, patched_value) in cases {
        let name = body[name_field].as_str().expect("name").to_string();
        let created = app.create(collection, body.clone()).await;
        let id = created["id"].as_str().expect("id").to_string();
        assert!(
            is_subset(&body, &created),
            "{collection}: {created} should hold every field of {body}"
        );

        let (status, list) = app.get(collection).await;
        assert_eq!(status, 200);
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
        assert_eq!(list[0]["id"], id);

        for key in [&id, &name] {
            let (status, got) = app.get(&format!("{collection}/{key}")).await;
            assert_eq!(status, 200, "{collection}/{key}: {got}");
            assert_eq!(got, created);
        }

        let (status, patched) = app.patch(&format!("{collection}/{name}"), patch).await;
        assert_eq!(status, 200, "{patched}");
        assert_eq!(patched[patched_field], patched_value);
        assert_eq!(patched["id"], id);
        assert_eq!(patched["created_at"], created["created_at"]);
        // Fields the patch did not name are kept.
        assert_eq!(patched[name_field], name);

        let (status, replaced) = app.put(&format!("{collection}/{id}"), body.clone()).await;
        assert_eq!(status, 200, "{replaced}");
        assert_eq!(
            replaced[patched_field], created[patched_field],
            "PUT restores the field"
        );
        assert!(replaced["revision"].as_i64() > patched["revision"].as_i64());

        let (status, _) = app.get(&format!("{collection}/does-not-exist")).await;
        assert_eq!(status, 404);
    }

    // Deletion in dependency order; each is gone afterwards.
    for (collection, name) in [
        ("/routes", "users"),
        ("/consumers", "alice"),
        ("/upstreams", "users"),
        ("/plans", "gold"),
        ("/jwt-issuers", "corp"),
    ] {
        let (status, body) = app.delete(&format!("{collection}/{name}")).await;
        assert_eq!(status, 204, "{collection}/{name}: {body}");
        let (status, body) = app.get(&format!("{collection}/{name}")).await;
        problem(status, &body, 404, "not found");
        let (status, _) = app.delete(&format!("{collection}/{name}")).await;
        assert_eq!(status, 404);
    }
}

async fn validation_errors_are_problem_json_with_detail(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create("/upstreams", upstream("users")).await;

    // Bad paths: every problem at once, each with its field path.
    let (status, body) = app
        .post(
            "/routes",
            json!({"name": "r", "paths": ["users", "/a/../b"], "upstream": "users"}),
        )
        .await;
    problem(status, &body, 422, "paths[0]: must start with '/'");
    assert_eq!(body["errors"][1]["field"], "paths[1]");

    // Unknown upstream.
    let (status, body) = app.post("/routes", route("r", "nope")).await;
    problem(status, &body, 422, "upstream: unknown upstream 'nope'");

    // Duplicate name.
    let (status, body) = app.post("/upstreams", upstream("users")).await;
    problem(status, &body, 409, "upstream 'users' already exists");

    // Negative limits.
    let (status, body) = app
        .post(
            "/plans",
            json!({"name": "p", "rate_limit": {"requests": -5, "window_seconds": 60},
                               "quota": {"requests": -1, "period": "day"}}),
        )
        .await;
    problem(
        status,
        &body,
        422,
        "rate_limit.requests: must be greater than 0 (got -5)",
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("quota.requests")
    );

    // Wrong type and unknown field name the field.
    let (status, body) = app
        .post(
            "/plans",
            json!({"name": "p", "rate_limit": {"requests": "many", "window_seconds": 60}}),
        )
        .await;
    problem(status, &body, 422, "rate_limit.requests");
    let (status, body) = app
        .post("/consumers", json!({"username": "a", "plann": "x"}))
        .await;
    problem(status, &body, 422, "unknown field `plann`");

    // Malformed JSON.
    let response = app
        .client
        .post(app.url("/upstreams"))
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body("{\"name\": \"x\",")
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("problem json");
    problem(status, &body, 400, "malformed JSON");

    // Wrong content type.
    let response = app
        .client
        .post(app.url("/upstreams"))
        .bearer_auth(&app.token)
        .header("content-type", "text/plain")
        .body(upstream("x").to_string())
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("problem json");
    problem(status, &body, 415, "application/json");

    // Oversized body.
    let big = json!({"name": "big", "targets": [{"url": "http://a:1"}], "pad": "x".repeat(2 * 1024 * 1024)});
    let (status, body) = app.post("/upstreams", big).await;
    problem(status, &body, 413, "larger than the limit");

    // A PATCH producing an invalid resource is refused whole.
    let (status, body) = app
        .patch("/upstreams/users", json!({"targets": [], "retries": 99}))
        .await;
    problem(status, &body, 422, "targets: must list at least one target");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("retries")
    );
    let (_, unchanged) = app.get("/upstreams/users").await;
    assert_eq!(unchanged["retries"], 0);
    assert_eq!(unchanged["targets"].as_array().map(Vec::len), Some(1));

    // Unknown endpoint.
    let (status, body) = app.get("/nothing-here").await;
    problem(status, &body, 404, "no such endpoint");
}

async fn references_are_enforced(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create("/upstreams", upstream("users")).await;
    app.create("/routes", route("a", "users")).await;
    app.create("/routes", route("b", "users")).await;

    let (status, body) = app.delete("/upstreams/users").await;
    problem(status, &body, 409, "used by route 'a', route 'b'");
    let (status, body) = app
        .patch("/upstreams/users", json!({"name": "renamed"}))
        .await;
    problem(status, &body, 409, "cannot be renamed");

    let (status, body) = app
        .post("/consumers", json!({"username": "bob", "plan": "nope"}))
        .await;
    problem(status, &body, 422, "plan: unknown plan 'nope'");
    app.create(
        "/plans",
        json!({"name": "gold", "rate_limit": {"requests": 1, "window_seconds": 1}}),
    )
    .await;
    app.create("/consumers", json!({"username": "bob", "plan": "gold"}))
        .await;
    let (status, body) = app.delete("/plans/gold").await;
    problem(status, &body, 409, "consumer 'bob'");

    let mut jwt_route = route("c", "users");
    jwt_route["auth"] = json!({"jwt": {"issuers": ["corp"]}, "allowed_consumers": ["bob", "eve"]});
    let (status, body) = app.post("/routes", jwt_route.clone()).await;
    problem(
        status,
        &body,
        422,
        "auth.jwt.issuers[0]: unknown JWT issuer 'corp'",
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("auth.allowed_consumers[1]: unknown consumer 'eve'")
    );

    // Once the routes are gone the upstream can go.
    app.delete("/routes/a").await;
    app.delete("/routes/b").await;
    let (status, _) = app.delete("/upstreams/users").await;
    assert_eq!(status, 204);
}

async fn key_secret_is_shown_once_and_never_stored(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create("/consumers", json!({"username": "alice"})).await;
    let (status, issued) = app
        .send(reqwest::Method::POST, "/consumers/alice/keys", None)
        .await;
    assert_eq!(status, 201, "{issued}");
    let secret = issued["key"].as_str().expect("secret returned").to_string();
    assert!(secret.starts_with("tg_"));
    // 32 random bytes, base64url: 43 characters after the prefix (256 bits).
    assert_eq!(secret.len(), 3 + 43);
    assert_eq!(issued["prefix"], secret[..7]);

    let (_, second) = app.create_key_json("alice", json!({})).await;
    assert_ne!(second["key"], issued["key"]);

    for path in ["/consumers/alice/keys", "/consumers/alice", "/consumers"] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 200);
        assert!(
            !body.to_string().contains(&secret),
            "{path} leaks the secret"
        );
    }
    let (_, keys) = app.get("/consumers/alice/keys").await;
    assert_eq!(keys.as_array().map(Vec::len), Some(2));
    assert_eq!(keys[0]["prefix"], issued["prefix"]);
    assert_eq!(keys[0]["status"], "active");

    let dump = app.db.dump_text().await;
    assert!(
        !dump.contains(&secret),
        "the database holds the plaintext key"
    );
    assert!(
        !dump.contains(&secret[3..]),
        "the database holds the key's random part"
    );
    assert!(
        !dump.contains(&app.token),
        "the database holds the plaintext admin token"
    );
    let digest = tollgate_shared::ApiKeyDigest::of_secret(&secret);
    assert!(
        dump.contains(digest.as_str()),
        "the digest is what is stored"
    );
}

async fn key_expiry_and_revocation(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create("/consumers", json!({"username": "alice"})).await;
    let (status, expiring) = app
        .create_key_json("alice", json!({"ttl_seconds": 3600, "name": "ci"}))
        .await;
    assert_eq!(status, 201, "{expiring}");
    assert!(expiring["expires_at"].is_string());
    let (status, body) = app
        .create_key_json("alice", json!({"expires_at": "2001-01-01T00:00:00Z"}))
        .await;
    problem(status, &body, 422, "expires_at: must be in the future");
    let (status, body) = app
        .create_key_json("alice", json!({"ttl_seconds": 0}))
        .await;
    problem(status, &body, 422, "ttl_seconds");
    let (status, body) = app.create_key_json("nobody", json!({})).await;
    problem(status, &body, 404, "consumer 'nobody' not found");

    let key_id = expiring["id"].as_str().expect("id");
    let before = app.revision().await;
    let (status, _) = app.delete(&format!("/consumers/alice/keys/{key_id}")).await;
    assert_eq!(status, 204);
    assert_eq!(app.revision().await, before + 1);
    let (_, keys) = app.get("/consumers/alice/keys").await;
    assert_eq!(keys[0]["status"], "revoked");
    assert!(keys[0]["revoked_at"].is_string());
    // Revoking again changes nothing, not even the revision.
    let (status, _) = app.delete(&format!("/consumers/alice/keys/{key_id}")).await;
    assert_eq!(status, 204);
    assert_eq!(app.revision().await, before + 1);
    let (status, _) = app.delete("/consumers/alice/keys/no-such-key").await;
    assert_eq!(status, 404);
    // Deleting the consumer removes its keys.
    app.delete("/consumers/alice").await;
    assert_eq!(app.db.scalar("SELECT COUNT(*) FROM api_keys").await, 0);
}

async fn revision_bumps_once_per_successful_write_only(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    assert_eq!(app.revision().await, 0);
    let mut expected = 0;
    let writes: Vec<(reqwest::Method, &str, Option<Value>, bool)> = vec![
        (
            reqwest::Method::POST,
            "/upstreams",
            Some(upstream("u")),
            true,
        ),
        (
            reqwest::Method::POST,
            "/upstreams",
            Some(upstream("u")),
            false,
        ), // duplicate
        (
            reqwest::Method::POST,
            "/routes",
            Some(route("r", "missing")),
            false,
        ),
        (
            reqwest::Method::POST,
            "/routes",
            Some(route("r", "u")),
            true,
        ),
        (
            reqwest::Method::PATCH,
            "/routes/r",
            Some(json!({"priority": 3})),
            true,
        ),
        (
            reqwest::Method::PATCH,
            "/routes/r",
            Some(json!({"paths": ["bad"]})),
            false,
        ),
        (
            reqwest::Method::PUT,
            "/upstreams/u",
            Some(upstream("u")),
            true,
        ),
        (reqwest::Method::DELETE, "/upstreams/u", None, false), // still used
        (reqwest::Method::DELETE, "/routes/r", None, true),
        (reqwest::Method::DELETE, "/routes/r", None, false), // gone
        (
            reqwest::Method::POST,
            "/consumers",
            Some(json!({"username": "c"})),
            true,
        ),
        (
            reqwest::Method::POST,
            "/consumers/c/keys",
            Some(json!({})),
            true,
        ),
    ];
    for (method, path, body, succeeds) in writes {
        let (status, response) = app.send(method.clone(), path, body.as_ref()).await;
        assert_eq!(
            (200..300).contains(&status),
            succeeds,
            "{method} {path}: {status} {response}"
        );
        if succeeds {
            expected += 1;
        }
        assert_eq!(app.revision().await, expected, "after {method} {path}");
    }
    // Reads never bump.
    app.get("/upstreams").await;
    app.get("/consumers/c/keys").await;
    assert_eq!(app.revision().await, expected);
    // Every committed write is in the change log, once.
    assert_eq!(
        app.db.scalar("SELECT COUNT(*) FROM changes").await,
        expected
    );
}

async fn concurrent_writers_lose_nothing(backend: Backend) {
    let app = std::sync::Arc::new(TestApp::spawn(backend).await);
    app.create("/upstreams", upstream("shared")).await;
    let start = app.revision().await;

    // Concurrent creates: all land, each with its own revision.
    let creates = (0..24).map(|i| {
        let app = app.clone();
        tokio::spawn(async move {
            app.post("/consumers", json!({"username": format!("user{i}")}))
                .await
        })
    });
    // Concurrent patches of different fields of one resource: none overwrites another.
    let patches = [
        json!({"retries": 3}),
        json!({"load_balancing": "random"}),
        json!({"timeouts": {"connect_ms": 777}}),
        json!({"health_check": {"path": "/health"}}),
    ]
    .into_iter()
    .map(|patch| {
        let app = app.clone();
        tokio::spawn(async move { app.patch("/upstreams/shared", patch).await })
    });
    let mut revisions = Vec::new();
    for handle in creates.chain(patches) {
        let (status, body) = handle.await.expect("task");
        assert!(status == 200 || status == 201, "{status} {body}");
        revisions.push(body["revision"].as_i64().expect("revision"));
    }
    revisions.sort_unstable();
    let expected: Vec<i64> = (start + 1..=start + 28).collect();
    assert_eq!(revisions, expected, "every write got its own revision");
    assert_eq!(app.revision().await, start + 28);
    let (_, consumers) = app.get("/consumers").await;
    assert_eq!(consumers.as_array().map(Vec::len), Some(24));
    let (_, shared) = app.get("/upstreams/shared").await;
    assert_eq!(shared["retries"], 3);
    assert_eq!(shared["load_balancing"], "random");
    assert_eq!(shared["timeouts"]["connect_ms"], 777);
    assert_eq!(shared["timeouts"]["request_ms"], 30000);
    assert_eq!(shared["health_check"]["path"], "/health");
}

async fn admin_token_is_required(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for auth in [
        None,
        Some("Bearer wrong-token"),
        Some("Basic dXNlcjpwYXNz"),
        Some("Bearer "),
    ] {
        for (method, path) in [
            ("GET", "/upstreams"),
            ("POST", "/upstreams"),
            ("GET", "/status"),
        ] {
            let mut request = app
                .client
                .request(method.parse().expect("method"), app.url(path))
                .json(&upstream("sneaky"));
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let response = request.send().await.expect("request");
            assert_eq!(response.status(), 401, "{method} {path} with {auth:?}");
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            assert!(response.headers().contains_key("www-authenticate"));
        }
    }
    let (_, list) = app.get("/upstreams").await;
    assert_eq!(list, json!([]), "nothing was written without a token");
    // The docs are public.
    let response = app
        .client
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
}

async fn generated_admin_token_is_printed_once_and_works(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_on(db, None).await;
    let generated = app
        .generated_token
        .clone()
        .expect("a token is generated on first start");
    assert!(generated.len() >= 40);
    let (status, _) = app.get("/status").await;
    assert_eq!(status, 200);
    let db = app.stop().await;
    // Second start on the same store: no new token, the old one still works.
    let mut app = TestApp::spawn_on(db, None).await;
    assert_eq!(app.generated_token, None);
    app.token = generated;
    let (status, _) = app.get("/status").await;
    assert_eq!(status, 200);
}

async fn jwt_issuer_secret_is_write_only(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let secret = "s3cret-s3cret-s3cret-s3cret-s3cret!";
    let created = app
        .create(
            "/jwt-issuers",
            json!({"name": "hs", "issuer": "me", "algorithms": ["HS256"], "secret": secret}),
        )
        .await;
    assert!(created.get("secret").is_none(), "{created}");
    let (_, got) = app.get("/jwt-issuers/hs").await;
    assert!(!got.to_string().contains(secret));
    // A patch of another field keeps the secret (the result still validates: HS256 needs it).
    let (status, patched) = app
        .patch("/jwt-issuers/hs", json!({"leeway_seconds": 1}))
        .await;
    assert_eq!(status, 200, "{patched}");
}

impl TestApp {
    async fn create_key_json(&self, consumer: &str, body: Value) -> (u16, Value) {
        self.post(&format!("/consumers/{consumer}/keys"), body)
            .await
    }
}

async fn declarative_config_exports_and_applies_whole(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create("/upstreams", upstream("old")).await;
    app.create("/upstreams", upstream("kept")).await;
    app.create("/routes", route("old-route", "old")).await;
    app.create("/consumers", json!({"username": "leaving"}))
        .await;
    app.post("/consumers/leaving/keys", json!({})).await;
    let secret = "hs-secret-hs-secret-hs-secret-hs-secret";
    app.create(
        "/jwt-issuers",
        json!({"name": "hs", "issuer": "me", "algorithms": ["HS256"], "secret": secret}),
    )
    .await;

    let (status, exported) = app.get("/config").await;
    assert_eq!(status, 200);
    assert_eq!(exported["upstreams"].as_array().map(Vec::len), Some(2));
    assert!(
        !exported.to_string().contains(secret),
        "secrets are never exported"
    );

    // Applying the export changes nothing and keeps the secret.
    let before = app.revision().await;
    let (status, diff) = app.put("/config", exported.clone()).await;
    assert_eq!(status, 200, "{diff}");
    assert_eq!(
        (
            diff["created"].clone(),
            diff["updated"].clone(),
            diff["deleted"].clone()
        ),
        (json!([]), json!([]), json!([]))
    );
    assert_eq!(app.revision().await, before, "no change, no revision");

    // The desired state: one upstream changed, one gone, one new; the route moves; the
    // consumer is gone (with its key).
    let mut desired = exported.clone();
    desired["upstreams"] = json!([
        {"name": "kept", "targets": [{"url": "http://10.0.0.5:9001"}], "retries": 2},
        {"name": "new", "targets": [{"url": "http://10.0.0.6:9001"}]}
    ]);
    desired["routes"] = json!([{"name": "new-route", "paths": ["/n"], "upstream": "new"}]);
    desired["consumers"] = json!([]);
    let (status, diff) = app
        .send(reqwest::Method::PUT, "/config?dry_run=true", Some(&desired))
        .await;
    assert_eq!(status, 200, "{diff}");
    assert_eq!(diff["created"], json!(["upstream/new", "route/new-route"]));
    assert_eq!(diff["updated"], json!(["upstream/kept"]));
    assert_eq!(
        diff["deleted"],
        json!(["upstream/old", "route/old-route", "consumer/leaving"])
    );
    assert_eq!(app.revision().await, before, "a dry run writes nothing");
    assert_eq!(app.get("/upstreams/old").await.0, 200);

    let (status, diff) = app.put("/config", desired.clone()).await;
    assert_eq!(status, 200, "{diff}");
    assert_eq!(
        diff["revision"],
        before + 1,
        "one revision for the whole apply"
    );
    assert_eq!(app.revision().await, before + 1);
    assert_eq!(app.get("/upstreams/old").await.0, 404);
    assert_eq!(app.get("/upstreams/kept").await.1["retries"], 2);
    assert_eq!(app.get("/routes/new-route").await.1["upstream"], "new");
    assert_eq!(app.get("/consumers/leaving").await.0, 404);
    assert_eq!(app.db.scalar("SELECT COUNT(*) FROM api_keys").await, 0);
    // The HS issuer still validates: its secret was kept.
    let (status, body) = app
        .patch("/jwt-issuers/hs", json!({"leeway_seconds": 3}))
        .await;
    assert_eq!(status, 200, "{body}");
    let after = app.revision().await;

    // An invalid document is refused whole, every problem with its path.
    let mut broken = desired.clone();
    broken["routes"] = json!([{"name": "r", "paths": ["nope"], "upstream": "missing"}]);
    broken["upstreams"][0]["targets"] = json!([]);
    let (status, body) = app.put("/config", broken).await;
    problem(
        status,
        &body,
        422,
        "routes[0].paths[0]: must start with '/'",
    );
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("routes[0].upstream: unknown upstream 'missing'"),
        "{detail}"
    );
    assert!(detail.contains("upstreams[0].targets"), "{detail}");
    assert_eq!(app.revision().await, after, "nothing written");
    assert_eq!(app.get("/routes/new-route").await.0, 200);
}
