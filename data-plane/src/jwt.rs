//! JWT verification against configured issuers (jsonwebtoken, pure-Rust crypto), with JWKS
//! documents fetched, cached by URL across snapshots, refreshed every five minutes and on an
//! unknown `kid` (at most every ten seconds per URL), and kept when the JWKS endpoint fails.
//!
//! The algorithm allow-list comes from the issuer, never from the token: `alg: none` cannot
//! even be parsed, and HS/RS confusion is impossible because an issuer holds either an HMAC
//! secret or public keys, never both (the control plane refuses mixed lists). `exp` is
//! required; `nbf`, `iss` and `aud` are checked with the issuer's leeway.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderName;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tollgate_shared::JwtIssuer;

/// The client JWKS documents are fetched with: http, or https verified against the Mozilla
/// roots plus an optional extra CA file.
pub type JwksClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<bytes::Bytes>,
>;

/// Builds the JWKS client; `extra_ca` is a PEM file of more trusted roots (an internal CA).
pub fn jwks_client(extra_ca: Option<&std::path::Path>) -> anyhow::Result<JwksClient> {
    let tls = tls_client_config(extra_ca)?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

/// A TLS client configuration trusting the Mozilla roots and, when given, the certificates of
/// the PEM file `extra_ca` (an internal CA).
pub fn tls_client_config(
    extra_ca: Option<&std::path::Path>,
) -> anyhow::Result<rustls::ClientConfig> {
    use anyhow::Context;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
            let cert = cert.with_context(|| format!("reading {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("a certificate in {}", path.display()))?;
        }
        anyhow::ensure!(
            roots.len() > webpki_roots::TLS_SERVER_ROOTS.len(),
            "no certificate in {}",
            path.display()
        );
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// JWKS documents are refreshed this often in the background.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The keys of one JWKS URL, by `kid`.
pub struct JwksCache {
    url: String,
    client: JwksClient,
    keys: ArcSwap<HashMap<String, Arc<DecodingKey>>>,
    last_attempt_ms: AtomicI64,
    min_refresh_ms: i64,
    refreshing: tokio::sync::Mutex<()>,
}

impl JwksCache {
    /// Fetches the document and replaces the keys; on failure the last good keys stay.
    pub async fn refresh(&self, now_ms: i64) -> Result<usize, String> {
        let _single_flight = self.refreshing.lock().await;
        self.last_attempt_ms.store(now_ms, Ordering::Relaxed);
        let uri: http::Uri = self.url.parse().map_err(|e| format!("bad JWKS URL: {e}"))?;
        let request = http::Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(2), self.client.request(request))
            .await
            .map_err(|_| "JWKS endpoint timed out".to_string())?
            .map_err(|e| format!("JWKS endpoint unreachable: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("JWKS endpoint answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the JWKS document: {e}"))?
            .to_bytes();
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("JWKS document: {e}"))?;
        let keys: HashMap<String, Arc<DecodingKey>> = set
            .keys
            .iter()
            .filter_map(|jwk| {
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some((jwk.common.key_id.clone().unwrap_or_default(), Arc::new(key)))
            })
            .collect();
        if keys.is_empty() {
            return Err("JWKS document holds no usable key".into());
        }
        let count = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(count)
    }

    /// The key for `kid`, refreshing once (rate limited) when it is unknown.
    async fn key(&self, kid: &str, now_ms: i64) -> Option<Arc<DecodingKey>> {
        if let Some(key) = self.keys.load().get(kid) {
            return Some(key.clone());
        }
        if now_ms - self.last_attempt_ms.load(Ordering::Relaxed) < self.min_refresh_ms {
            return None;
        }
        if let Err(error) = self.refresh(now_ms).await {
            tracing::warn!(url = %self.url, %error, "JWKS refresh failed; keeping the last good keys");
        }
        self.keys.load().get(kid).cloned()
    }
}

/// JWKS caches by URL, kept across snapshots.
pub struct JwksRegistry {
    caches: std::sync::Mutex<HashMap<String, Arc<JwksCache>>>,
    min_refresh_ms: i64,
    client: JwksClient,
}

impl JwksRegistry {
    /// A registry whose caches refresh on unknown `kid`s at most every `min_refresh_ms`.
    pub fn new(min_refresh_ms: u64, client: JwksClient) -> Self {
        Self {
            caches: std::sync::Mutex::default(),
            min_refresh_ms: i64::try_from(min_refresh_ms).unwrap_or(i64::MAX),
            client,
        }
    }

    /// The cache for `url` (created empty; the first token or the refresher fills it).
    pub fn get(&self, url: &str) -> Arc<JwksCache> {
        let mut caches = self
            .caches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        caches
            .entry(url.to_string())
            .or_insert_with(|| {
                Arc::new(JwksCache {
                    url: url.to_string(),
                    client: self.client.clone(),
                    keys: ArcSwap::from_pointee(HashMap::new()),
                    last_attempt_ms: AtomicI64::new(i64::MIN / 2),
                    min_refresh_ms: self.min_refresh_ms,
                    refreshing: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Refreshes every cache (the background refresher calls this).
    pub async fn refresh_all(&self, now_ms: i64) {
        let caches: Vec<Arc<JwksCache>> = self
            .caches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for cache in caches {
            match cache.refresh(now_ms).await {
                Ok(count) => tracing::debug!(url = %cache.url, count, "JWKS refreshed"),
                Err(error) => {
                    tracing::warn!(url = %cache.url, %error, "JWKS refresh failed; keeping the last good keys")
                }
            }
        }
    }
}

/// An issuer compiled for verification.
pub struct IssuerKeys {
    /// Issuer name (for logs).
    pub name: String,
    keys: Vec<DecodingKey>,
    jwks: Option<Arc<JwksCache>>,
    validation: Validation,
    /// Claim naming the consumer.
    pub consumer_claim: String,
    /// Claims forwarded upstream as headers.
    pub forward_claims: Vec<(String, HeaderName)>,
    /// Accept tokens whose consumer claim names no consumer.
    pub allow_anonymous: bool,
}

impl IssuerKeys {
    /// Parses the issuer's keys; a key that does not parse refuses the whole snapshot.
    pub fn compile(issuer: &JwtIssuer, registry: &JwksRegistry) -> Result<Self, String> {
        let algorithms = issuer
            .algorithms
            .iter()
            .map(|a| {
                a.parse::<Algorithm>()
                    .map_err(|_| format!("unsupported algorithm '{a}'"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let first = *algorithms.first().ok_or("no algorithms")?;
        let mut keys = Vec::new();
        if let Some(secret) = &issuer.secret {
            keys.push(DecodingKey::from_secret(secret.as_bytes()));
        }
        if let Some(pem) = &issuer.public_key_pem {
            let key = match first {
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem.as_bytes()),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(pem.as_bytes()),
                _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
            }
            .map_err(|e| format!("public_key_pem does not parse: {e}"))?;
            keys.push(key);
        }
        let jwks = issuer.jwks_url.as_ref().map(|url| registry.get(url));
        let mut validation = Validation::new(first);
        validation.algorithms = algorithms;
        validation.set_issuer(&[issuer.issuer.as_str()]);
        if issuer.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&issuer.audiences);
        }
        validation.leeway = u64::try_from(issuer.leeway_seconds).unwrap_or(0);
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        let forward_claims = issuer
            .forward_claims
            .iter()
            .map(|(claim, header)| {
                HeaderName::try_from(header.as_str())
                    .map(|h| (claim.clone(), h))
                    .map_err(|e| format!("forward_claims header '{header}': {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: issuer.name.clone(),
            keys,
            jwks,
            validation,
            consumer_claim: issuer.consumer_claim.clone(),
            forward_claims,
            allow_anonymous: issuer.allow_anonymous,
        })
    }

    /// The token's claims when it verifies against one of the issuer's keys.
    pub async fn verify(&self, token: &str, now_ms: i64) -> Option<Map<String, Value>> {
        let decode = |key: &DecodingKey| {
            jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
                .ok()
                .map(|data| data.claims)
        };
        if let Some(claims) = self.keys.iter().find_map(decode) {
            return Some(claims);
        }
        let jwks = self.jwks.as_ref()?;
        let kid = jsonwebtoken::decode_header(token)
            .ok()?
            .kid
            .unwrap_or_default();
        let key = jwks.key(&kid, now_ms).await?;
        decode(&key)
    }
}
