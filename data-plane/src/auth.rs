//! Authentication of a request against its route's policy: API keys (looked up by digest in
//! the snapshot's index, O(1)) and JWTs; then the route's consumer and tag restrictions.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use http::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use tollgate_shared::{ApiKeyEntry, AuthPolicy, Consumer, Stored};

use crate::error::ProxyError;
use crate::jwt::IssuerKeys;

/// A consumer as requests see it, headers pre-built.
#[derive(Debug)]
pub struct ConsumerRt {
    /// Id.
    pub id: String,
    /// Username.
    pub username: String,
    /// `X-Consumer-Id` value.
    pub id_header: HeaderValue,
    /// `X-Consumer-Username` value.
    pub username_header: HeaderValue,
    /// Tags.
    pub tags: Vec<String>,
    /// `c:<id>`: the scope of a route limit counted per consumer (built once, not per request).
    pub limit_scope: String,
    /// The consumer's plan, compiled.
    pub plan: Option<Arc<PlanRt>>,
}

/// A plan's limits, compiled.
#[derive(Debug)]
pub struct PlanRt {
    /// Requests per sliding window (limit, window ms).
    pub rate_limit: Option<(u64, i64)>,
    /// Requests per calendar period.
    pub quota: Option<(u64, tollgate_shared::QuotaPeriod)>,
    /// Behaviour when Redis is unavailable.
    pub failure_policy: tollgate_shared::FailurePolicy,
}

impl PlanRt {
    /// Compiles a plan.
    pub fn compile(plan: &tollgate_shared::Plan) -> Self {
        Self {
            rate_limit: plan.rate_limit.as_ref().map(|r| {
                (
                    u64::try_from(r.requests).unwrap_or(0),
                    r.window_seconds.saturating_mul(1000),
                )
            }),
            quota: plan
                .quota
                .as_ref()
                .map(|q| (u64::try_from(q.requests).unwrap_or(0), q.period)),
            failure_policy: plan.failure_policy,
        }
    }
}

impl ConsumerRt {
    /// Pre-builds the consumer's headers and attaches its plan.
    pub fn compile(
        consumer: &Stored<Consumer>,
        plans: &HashMap<String, Arc<PlanRt>>,
    ) -> Result<Self, String> {
        let header = |v: &str| {
            HeaderValue::from_str(v)
                .map_err(|e| format!("consumer '{}': {e}", consumer.spec.username))
        };
        Ok(Self {
            id: consumer.id.clone(),
            username: consumer.spec.username.clone(),
            id_header: header(&consumer.id)?,
            username_header: header(&consumer.spec.username)?,
            tags: consumer.spec.tags.clone(),
            limit_scope: format!("c:{}", consumer.id),
            plan: consumer
                .spec
                .plan
                .as_ref()
                .and_then(|name| plans.get(name).cloned()),
        })
    }
}

struct KeyRt {
    id: String,
    consumer: Arc<ConsumerRt>,
    expires_at: Option<i64>,
    /// Last use (Unix ms), 0 when unused; reported to the control plane with heartbeats.
    last_used_ms: std::sync::atomic::AtomicI64,
    reported_ms: std::sync::atomic::AtomicI64,
}

/// Active API keys by SHA-256 digest.
#[derive(Default)]
pub struct KeyIndex {
    keys: HashMap<[u8; 32], KeyRt, BuildHasherDefault<DigestHasher>>,
}

/// Hashes a SHA-256 digest by taking 8 of its bytes: a digest is uniformly distributed
/// already, and nobody can choose one (that takes a preimage), so SipHash over all 32 bytes
/// (the default, against chosen keys) would only cost time on every request.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // The array's bytes come in one call (after its length, a usize, below).
        let mut word = [0u8; 8];
        let take = bytes.len().min(8);
        word[..take].copy_from_slice(&bytes[..take]);
        self.0 ^= u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

impl KeyIndex {
    /// Indexes the snapshot's keys (keys of unknown consumers are skipped: the snapshot check
    /// already refuses those).
    pub fn compile(entries: &[ApiKeyEntry], consumers: &HashMap<String, Arc<ConsumerRt>>) -> Self {
        let mut keys = HashMap::with_capacity_and_hasher(entries.len(), Default::default());
        for entry in entries {
            let (Ok(bytes), Some(consumer)) = (
                hex::decode(entry.digest.as_str()),
                consumers.get(&entry.consumer_id),
            ) else {
                continue;
            };
            let Ok(digest) = <[u8; 32]>::try_from(bytes.as_slice()) else {
                continue;
            };
            keys.insert(
                digest,
                KeyRt {
                    id: entry.id.clone(),
                    consumer: consumer.clone(),
                    expires_at: entry.expires_at,
                    last_used_ms: std::sync::atomic::AtomicI64::new(0),
                    reported_ms: std::sync::atomic::AtomicI64::new(0),
                },
            );
        }
        Self { keys }
    }

    fn lookup(&self, secret: &str, now_ms: i64) -> Option<&Arc<ConsumerRt>> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let key = self.keys.get(&digest)?;
        if key
            .expires_at
            .is_some_and(|at| at <= now_ms.div_euclid(1000))
        {
            return None;
        }
        // Written at most once a second (last use is reported in seconds): a hot key's
        // cache line is not bounced between worker threads on every request.
        let last = &key.last_used_ms;
        if now_ms - last.load(std::sync::atomic::Ordering::Relaxed) >= 1_000 {
            last.store(now_ms, std::sync::atomic::Ordering::Relaxed);
        }
        Some(&key.consumer)
    }

    /// Keys used since the last call, with their last use (for the heartbeat).
    pub fn take_used(&self) -> Vec<(String, i64)> {
        use std::sync::atomic::Ordering::Relaxed;
        self.keys
            .values()
            .filter_map(|key| {
                let used = key.last_used_ms.load(Relaxed);
                (used > key.reported_ms.swap(used, Relaxed)).then(|| (key.id.clone(), used))
            })
            .collect()
    }
}

/// A route's authentication policy, compiled.
pub struct RouteAuth {
    api_key_header: Option<HeaderName>,
    issuers: Vec<Arc<IssuerKeys>>,
    allowed_consumers: HashSet<String>,
    allowed_tags: Vec<String>,
    consumers: Arc<HashMap<String, Arc<ConsumerRt>>>,
}

/// Who a request is, once authenticated.
pub struct Identity {
    /// The consumer, unless an issuer allowed an anonymous token.
    pub consumer: Option<Arc<ConsumerRt>>,
    /// Headers to add upstream (forwarded claims).
    pub forward: Vec<(HeaderName, HeaderValue)>,
    /// Credential headers to remove before forwarding.
    pub strip: [Option<HeaderName>; 2],
}

impl RouteAuth {
    /// Compiles a route's policy against the snapshot's issuers and consumers.
    pub fn compile(
        policy: &AuthPolicy,
        issuers: &HashMap<String, Arc<IssuerKeys>>,
        consumers: &Arc<HashMap<String, Arc<ConsumerRt>>>,
    ) -> Result<Self, String> {
        let api_key_header = policy
            .api_key
            .as_ref()
            .map(|a| {
                HeaderName::try_from(a.header.as_str())
                    .map_err(|e| format!("auth.api_key.header: {e}"))
            })
            .transpose()?;
        let issuers = policy
            .jwt
            .iter()
            .flat_map(|jwt| &jwt.issuers)
            .map(|name| {
                issuers
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("unknown JWT issuer '{name}'"))
            })
            .collect::<Result<_, _>>()?;
        for name in &policy.allowed_consumers {
            if !consumers.contains_key(name.as_str()) {
                return Err(format!("unknown consumer '{name}'"));
            }
        }
        Ok(Self {
            api_key_header,
            issuers,
            allowed_consumers: policy.allowed_consumers.iter().cloned().collect(),
            allowed_tags: policy.allowed_tags.clone(),
            consumers: consumers.clone(),
        })
    }

    /// Authenticates and authorizes a request; `now_ms` is Unix milliseconds.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        keys: &KeyIndex,
        now_ms: i64,
    ) -> Result<Identity, ProxyError> {
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        // The API-key header, and `Authorization` when the credential came in it: at most two,
        // kept without an allocation.
        let mut strip = [None, None];
        let mut identity = None;
        if let Some(header) = &self.api_key_header {
            let presented = headers
                .get(header)
                .and_then(|v| v.to_str().ok())
                .map(str::trim);
            let from_bearer = bearer.filter(|b| !looks_like_jwt(b) || self.issuers.is_empty());
            if let Some(secret) = presented.or(from_bearer) {
                strip[0] = Some(header.clone());
                if presented.is_none() {
                    strip[1] = Some(AUTHORIZATION);
                }
                let consumer = keys
                    .lookup(secret, now_ms)
                    .ok_or(ProxyError::Unauthorized("invalid API key"))?;
                identity = Some(Identity {
                    consumer: Some(consumer.clone()),
                    forward: Vec::new(),
                    strip: [None, None],
                });
            }
        }
        if identity.is_none()
            && !self.issuers.is_empty()
            && let Some(token) = bearer.filter(|b| looks_like_jwt(b))
        {
            strip[1] = Some(AUTHORIZATION);
            // On the heap: a JWKS fetch makes this future large, and the API-key path, which
            // never awaits, should not carry (and move) its size.
            identity = Some(Box::pin(self.verify_jwt(token, now_ms)).await?);
        }
        let mut identity = identity.ok_or(ProxyError::Unauthorized("missing credential"))?;
        identity.strip = strip;
        self.authorize(identity.consumer.as_deref())?;
        Ok(identity)
    }

    async fn verify_jwt(&self, token: &str, now_ms: i64) -> Result<Identity, ProxyError> {
        let mut verified = None;
        for issuer in &self.issuers {
            if let Some(claims) = issuer.verify(token, now_ms).await {
                verified = Some((issuer, claims));
                break;
            }
        }
        let (issuer, claims) = verified.ok_or(ProxyError::Unauthorized("invalid token"))?;
        let forward = issuer
            .forward_claims
            .iter()
            .filter_map(|(claim, header)| {
                let value = match claims.get(claim)? {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                HeaderValue::from_str(&value)
                    .ok()
                    .map(|v| (header.clone(), v))
            })
            .collect();
        let consumer = claims
            .get(&issuer.consumer_claim)
            .and_then(|v| v.as_str())
            .and_then(|username| self.consumers.get(username))
            .cloned();
        if consumer.is_none() && !issuer.allow_anonymous {
            return Err(ProxyError::Unauthorized("token names no known consumer"));
        }
        Ok(Identity {
            consumer,
            forward,
            strip: [None, None],
        })
    }

    fn authorize(&self, consumer: Option<&ConsumerRt>) -> Result<(), ProxyError> {
        let restricted = !self.allowed_consumers.is_empty() || !self.allowed_tags.is_empty();
        if !restricted {
            return Ok(());
        }
        let Some(consumer) = consumer else {
            return Err(ProxyError::Forbidden);
        };
        let by_name = self.allowed_consumers.contains(&consumer.username);
        let by_tag = self.allowed_tags.iter().any(|t| consumer.tags.contains(t));
        if by_name || by_tag {
            Ok(())
        } else {
            Err(ProxyError::Forbidden)
        }
    }
}

fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_keys_are_found_and_near_misses_are_not() {
        let mut map: HashMap<[u8; 32], usize, BuildHasherDefault<DigestHasher>> =
            HashMap::default();
        let digests: Vec<[u8; 32]> = (0..1_000u32)
            .map(|i| Sha256::digest(i.to_le_bytes()).into())
            .collect();
        for (i, digest) in digests.iter().enumerate() {
            map.insert(*digest, i);
        }
        // Same first 8 bytes (same hash), different rest: told apart by the key comparison.
        let mut twin = digests[0];
        twin[31] ^= 1;
        map.insert(twin, 1_000);
        for (i, digest) in digests.iter().enumerate() {
            assert_eq!(map.get(digest), Some(&i));
        }
        assert_eq!(map.get(&twin), Some(&1_000));
        let mut miss = digests[1];
        miss[20] ^= 1;
        assert_eq!(map.get(&miss), None);
    }
}
