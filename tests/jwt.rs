//! JWT authentication end to end: static PEM keys and a JWKS endpoint on loopback (rotation,
//! outage), and every token a gateway must refuse. Also: a revoked API key stops working on
//! every data plane.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Backend, TestApp, TestDp, TestUpstream, wait_until};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const RSA1_KEY: &str = include_str!("fixtures/rsa1.key.pem");
const RSA1_PUB: &str = include_str!("fixtures/rsa1.pub.pem");
const RSA2_KEY: &str = include_str!("fixtures/rsa2.key.pem");
const JWKS: &str = include_str!("fixtures/rsa-jwk.json");

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn token(key_pem: &str, kid: Option<&str>, claims: Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(key_pem.as_bytes()).expect("test key"),
    )
    .expect("sign")
}

fn claims(iss: &str, sub: &str, aud: &str, exp_in: i64) -> Value {
    json!({"iss": iss, "sub": sub, "aud": aud, "exp": now() + exp_in, "iat": now(), "email": format!("{sub}@example.com")})
}

/// A JWKS endpoint whose document can be replaced, and which can be made to fail.
struct JwksServer {
    addr: std::net::SocketAddr,
    document: Arc<std::sync::Mutex<String>>,
    down: Arc<AtomicBool>,
}

impl JwksServer {
    async fn start(kids: &[(&str, &str)]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = Self {
            addr,
            document: Arc::default(),
            down: Arc::default(),
        };
        server.publish(kids);
        let (document, down) = (server.document.clone(), server.down.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (document, down) = (document.clone(), down.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        let (document, down) = (document.clone(), down.clone());
                        async move {
                            let mut response = http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from(document.lock().expect("lock").clone()),
                            ));
                            if down.load(Ordering::Relaxed) {
                                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        server
    }

    /// Publishes the given (kid, fixture key name) pairs.
    fn publish(&self, kids: &[(&str, &str)]) {
        let fixtures: Value = serde_json::from_str(JWKS).expect("fixture");
        let keys: Vec<Value> = kids
            .iter()
            .map(|(kid, name)| {
                let mut jwk = fixtures[*name].clone();
                jwk["kid"] = json!(kid);
                jwk
            })
            .collect();
        *self.document.lock().expect("lock") = json!({"keys": keys}).to_string();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_are_verified_and_bad_ones_refused() {
    let cp = TestApp::spawn(Backend::Postgres).await;
    let upstream = TestUpstream::start("u").await;
    let jwks = JwksServer::start(&[("k1", "rsa1")]).await;
    cp.upstream_at("u", &upstream.url()).await;
    cp.create("/consumers", json!({"username": "alice"})).await;
    cp.create(
        "/jwt-issuers",
        json!({"name": "pem", "issuer": "https://id.test", "audiences": ["api"], "algorithms": ["RS256"],
               "public_key_pem": RSA1_PUB, "forward_claims": {"email": "X-User-Email"}}),
    )
    .await;
    cp.create(
        "/jwt-issuers",
        json!({"name": "jwks", "issuer": "https://jwks.test", "audiences": ["api"], "algorithms": ["RS256"],
               "jwks_url": format!("http://{}/jwks.json", jwks.addr)}),
    )
    .await;
    cp.create(
        "/jwt-issuers",
        json!({"name": "anon", "issuer": "https://anon.test", "algorithms": ["RS256"],
               "public_key_pem": RSA1_PUB, "allow_anonymous": true, "forward_claims": {"sub": "X-Subject"}}),
    )
    .await;
    cp.create(
        "/routes",
        json!({"name": "jwt", "paths": ["/jwt"], "upstream": "u",
                                "auth": {"jwt": {"issuers": ["pem", "jwks"]}}}),
    )
    .await;
    cp.create(
        "/routes",
        json!({"name": "anon", "paths": ["/anon"], "upstream": "u",
                                "auth": {"jwt": {"issuers": ["anon"]}}}),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let dp = TestDp::start(cp.cluster, dir.path(), "dp-1").await;
    let client = reqwest::Client::new();
    dp.synced_with(&cp).await;
    let call = |path: &'static str, token: String| {
        let (client, url) = (client.clone(), dp.url(path));
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };

    // Valid: admitted, consumer and claims forwarded, the token stripped.
    let valid = token(
        RSA1_KEY,
        None,
        claims("https://id.test", "alice", "api", 300),
    );
    assert_eq!(call("/jwt/x", valid.clone()).await, 200);
    let seen = upstream.requests().pop().expect("seen");
    assert_eq!(seen.headers["x-consumer-username"], "alice");
    assert_eq!(seen.headers["x-user-email"], "alice@example.com");
    assert!(!seen.headers.contains_key("authorization"));

    // Everything a gateway must refuse.
    let rsa_public_as_hmac_secret = {
        let header = Header::new(Algorithm::HS256);
        encode(
            &header,
            &claims("https://id.test", "alice", "api", 300),
            &EncodingKey::from_secret(RSA1_PUB.as_bytes()),
        )
        .expect("sign")
    };
    let alg_none = {
        use base64::Engine;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims("https://id.test", "alice", "api", 300))
        )
    };
    let refused = [
        (
            "expired",
            token(
                RSA1_KEY,
                None,
                claims("https://id.test", "alice", "api", -120),
            ),
        ),
        (
            "wrong audience",
            token(
                RSA1_KEY,
                None,
                claims("https://id.test", "alice", "other", 300),
            ),
        ),
        (
            "wrong issuer",
            token(
                RSA1_KEY,
                None,
                claims("https://evil.test", "alice", "api", 300),
            ),
        ),
        (
            "bad signature",
            token(
                RSA2_KEY,
                None,
                claims("https://id.test", "alice", "api", 300),
            ),
        ),
        ("alg none", alg_none),
        (
            "HS256 signed with the RSA public key",
            rsa_public_as_hmac_secret,
        ),
        (
            "unknown kid",
            token(
                RSA1_KEY,
                Some("nope"),
                claims("https://jwks.test", "alice", "api", 300),
            ),
        ),
        (
            "unknown consumer",
            token(
                RSA1_KEY,
                None,
                claims("https://id.test", "mallory", "api", 300),
            ),
        ),
        ("no exp", {
            let mut c = claims("https://id.test", "alice", "api", 300);
            c.as_object_mut().expect("object").remove("exp");
            token(RSA1_KEY, None, c)
        }),
    ];
    let before = upstream.requests().len();
    for (what, token) in refused {
        assert_eq!(call("/jwt/x", token).await, 401, "{what}");
    }
    assert_eq!(
        upstream.requests().len(),
        before,
        "refused tokens never reach the upstream"
    );

    // Anonymous issuers admit unknown subjects, with claims forwarded and no consumer headers.
    assert_eq!(
        call(
            "/anon/x",
            token(
                RSA1_KEY,
                None,
                claims("https://anon.test", "robot-7", "any", 300)
            )
        )
        .await,
        200
    );
    let seen = upstream.requests().pop().expect("seen");
    assert_eq!(seen.headers["x-subject"], "robot-7");
    assert!(!seen.headers.contains_key("x-consumer-id"));

    // JWKS: the published key verifies.
    let k1 = token(
        RSA1_KEY,
        Some("k1"),
        claims("https://jwks.test", "alice", "api", 300),
    );
    assert_eq!(call("/jwt/x", k1.clone()).await, 200);
    // Rotation: a new kid is fetched on first sight.
    jwks.publish(&[("k1", "rsa1"), ("k2", "rsa2")]);
    tokio::time::sleep(Duration::from_millis(150)).await; // past the refresh rate limit of the test node
    let k2 = token(
        RSA2_KEY,
        Some("k2"),
        claims("https://jwks.test", "alice", "api", 300),
    );
    assert_eq!(
        call("/jwt/x", k2.clone()).await,
        200,
        "rotated key picked up"
    );
    // JWKS endpoint down: the last good keys still verify; new kids cannot appear.
    jwks.down.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        call(
            "/jwt/x",
            token(
                RSA2_KEY,
                Some("k3"),
                claims("https://jwks.test", "alice", "api", 300)
            )
        )
        .await,
        401
    );
    assert_eq!(call("/jwt/x", k2).await, 200, "last good keys kept");
    assert_eq!(call("/jwt/x", k1).await, 200, "last good keys kept");
    dp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_on_every_data_plane_within_a_second() {
    let cp = TestApp::spawn(Backend::Postgres).await;
    let upstream = TestUpstream::start("u").await;
    cp.upstream_at("u", &upstream.url()).await;
    cp.create(
        "/routes",
        json!({"name": "k", "paths": ["/k"], "upstream": "u", "auth": {"api_key": {}}}),
    )
    .await;
    cp.create("/consumers", json!({"username": "alice"})).await;
    let (_, issued) = cp.post("/consumers/alice/keys", json!({})).await;
    let key = issued["key"].as_str().expect("key").to_string();
    let (dir1, dir2) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let dps = [
        TestDp::start(cp.cluster, dir1.path(), "dp-1").await,
        TestDp::start(cp.cluster, dir2.path(), "dp-2").await,
    ];
    let client = reqwest::Client::new();
    let status = |dp: &TestDp| {
        let request = client.get(dp.url("/k")).header("X-API-Key", &key);
        async move { request.send().await.expect("request").status().as_u16() }
    };
    for dp in &dps {
        wait_until(Duration::from_secs(3), "key works", || async {
            status(dp).await == 200
        })
        .await;
    }
    let (code, _) = cp
        .delete(&format!(
            "/consumers/alice/keys/{}",
            issued["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(code, 204);
    for dp in &dps {
        let took = wait_until(Duration::from_secs(1), "revocation effective", || async {
            status(dp).await == 401
        })
        .await;
        eprintln!("{}: revoked key refused after {took:?}", dp.node_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_over_https_is_verified_against_the_configured_ca() {
    // A TLS JWKS endpoint with a certificate from a CA only this test knows.
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let ca_dir = tempfile::tempdir().expect("dir");
    let ca_file = ca_dir.path().join("ca.pem");
    std::fs::write(&ca_file, certified.cert.pem()).expect("write CA");
    let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![certified.cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into()),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let fixtures: Value = serde_json::from_str(JWKS).expect("fixture");
    let mut jwk = fixtures["rsa1"].clone();
    jwk["kid"] = json!("tls-1");
    let document = json!({"keys": [jwk]}).to_string();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, document) = (acceptor.clone(), document.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_request| {
                    let body = http_body_util::Full::new(bytes::Bytes::from(document.clone()));
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let cp = TestApp::spawn(Backend::Postgres).await;
    let upstream = TestUpstream::start("u").await;
    cp.upstream_at("u", &upstream.url()).await;
    cp.create("/consumers", json!({"username": "alice"})).await;
    cp.create(
        "/jwt-issuers",
        json!({"name": "tls", "issuer": "https://tls.test", "algorithms": ["RS256"],
               "jwks_url": format!("https://localhost:{port}/jwks.json")}),
    )
    .await;
    cp.create("/routes", json!({"name": "jwt", "paths": ["/jwt"], "upstream": "u", "auth": {"jwt": {"issuers": ["tls"]}}}))
        .await;
    let client = reqwest::Client::new();
    let token = token(
        RSA1_KEY,
        Some("tls-1"),
        claims("https://tls.test", "alice", "api", 300),
    );

    // Trusting the CA: the key is fetched over TLS and the token verifies.
    let (dir1, dir2) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let trusting = TestDp::start_configured(cp.cluster, dir1.path(), "trusting", |settings| {
        settings.jwks_ca_file = Some(ca_file.clone());
    })
    .await;
    trusting.synced_with(&cp).await;
    let status = client
        .get(trusting.url("/jwt/x"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request")
        .status();
    assert_eq!(status, 200, "JWKS fetched over https");

    // Not trusting it: the certificate is refused, so is the token.
    let default = TestDp::start(cp.cluster, dir2.path(), "default").await;
    default.synced_with(&cp).await;
    let status = client
        .get(default.url("/jwt/x"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request")
        .status();
    assert_eq!(status, 401, "an untrusted certificate is refused");
}
