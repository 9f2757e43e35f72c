//! The snapshot: everything a data plane needs, as one immutable value with a revision and a
//! content hash over a canonical encoding.
//!
//! Canonical encoding: the snapshot's JSON (serde_json, struct fields in declaration order,
//! maps as `BTreeMap`) with every list sorted by name (keys by digest) and the revision left out,
//! so two control planes holding the same configuration compute the same hash.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{Consumer, JwtIssuer, Plan, Reference, ResourceKind, Route, Stored, Upstream};
use crate::validate::{Collector, Validate, ValidationErrors};

/// SHA-256 digest of an API key, as 64 lower-case hex characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ApiKeyDigest(String);

impl ApiKeyDigest {
    /// Digest of a presented key secret.
    pub fn of_secret(secret: &str) -> Self {
        Self(hex::encode(Sha256::digest(secret.as_bytes())))
    }

    /// Parses a stored digest: exactly 64 lower-case hex characters.
    pub fn parse(hex_digest: &str) -> Result<Self, String> {
        if hex_digest.len() == 64
            && hex_digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(hex_digest.to_string()))
        } else {
            Err(format!("'{hex_digest}' is not a SHA-256 hex digest"))
        }
    }

    /// The hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ApiKeyDigest {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<ApiKeyDigest> for String {
    fn from(digest: ApiKeyDigest) -> Self {
        digest.0
    }
}

/// An active API key as a data plane sees it: no secret, only its digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyEntry {
    /// Key id.
    pub id: String,
    /// Id of the consumer owning the key.
    pub consumer_id: String,
    /// SHA-256 of the secret.
    pub digest: ApiKeyDigest,
    /// Expiry as Unix seconds; never when absent.
    pub expires_at: Option<i64>,
}

/// The whole configuration a data plane enforces.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Global config revision; grows by one with every committed write.
    pub revision: i64,
    /// Upstreams, sorted by name.
    pub upstreams: Vec<Stored<Upstream>>,
    /// Routes, sorted by name.
    pub routes: Vec<Stored<Route>>,
    /// Consumers, sorted by username.
    pub consumers: Vec<Stored<Consumer>>,
    /// Plans, sorted by name.
    pub plans: Vec<Stored<Plan>>,
    /// JWT issuers, sorted by name (with their secrets: the data plane needs them).
    pub jwt_issuers: Vec<Stored<JwtIssuer>>,
    /// Keys neither revoked nor deleted, sorted by digest.
    pub api_keys: Vec<ApiKeyEntry>,
}

/// The part of a snapshot its hash covers (everything but the revision).
#[derive(Serialize)]
struct Content<'a> {
    upstreams: &'a [Stored<Upstream>],
    routes: &'a [Stored<Route>],
    consumers: &'a [Stored<Consumer>],
    plans: &'a [Stored<Plan>],
    jwt_issuers: &'a [Stored<JwtIssuer>],
    api_keys: &'a [ApiKeyEntry],
}

impl Snapshot {
    /// Sorts every list into canonical order.
    pub fn canonicalize(&mut self) {
        self.upstreams.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        self.routes.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        self.consumers
            .sort_by(|a, b| a.spec.username.cmp(&b.spec.username));
        self.plans.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        self.jwt_issuers
            .sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        self.api_keys.sort_by(|a, b| a.digest.cmp(&b.digest));
    }

    /// Hex SHA-256 over the canonical encoding of the content (not the revision).
    pub fn content_hash(&self) -> String {
        let content = Content {
            upstreams: &self.upstreams,
            routes: &self.routes,
            consumers: &self.consumers,
            plans: &self.plans,
            jwt_issuers: &self.jwt_issuers,
            api_keys: &self.api_keys,
        };
        // Serializing plain data into a Vec cannot fail: no maps with non-string keys.
        let bytes = serde_json::to_vec(&content).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }

    /// Checks every resource and every cross-reference, reporting all problems with paths
    /// such as `routes[3].upstream`.
    pub fn check(&self) -> Result<(), ValidationErrors> {
        let mut errors = Collector::default();
        let upstreams = names(&self.upstreams, |u| &u.name);
        let plans = names(&self.plans, |p| &p.name);
        let issuers = names(&self.jwt_issuers, |j| &j.name);
        let consumers = names(&self.consumers, |c| &c.username);
        let exists = |reference: &Reference| {
            let set = match reference.kind {
                ResourceKind::Upstream => &upstreams,
                ResourceKind::Plan => &plans,
                ResourceKind::JwtIssuer => &issuers,
                ResourceKind::Consumer => &consumers,
                ResourceKind::Route => return false,
            };
            set.contains(reference.name.as_str())
        };
        let check_references = |e: &mut Collector, references: Vec<Reference>| {
            for reference in references.iter().filter(|r| !exists(r)) {
                e.push(
                    &reference.field,
                    format!("unknown {} '{}'", reference.kind.label(), reference.name),
                );
            }
        };
        let consumer_ids: BTreeSet<&str> = self.consumers.iter().map(|c| c.id.as_str()).collect();

        for (i, upstream) in self.upstreams.iter().enumerate() {
            errors.nested(&format!("upstreams[{i}]"), |e| upstream.spec.check(e));
        }
        for (i, plan) in self.plans.iter().enumerate() {
            errors.nested(&format!("plans[{i}]"), |e| plan.spec.check(e));
        }
        for (i, issuer) in self.jwt_issuers.iter().enumerate() {
            errors.nested(&format!("jwt_issuers[{i}]"), |e| issuer.spec.check(e));
        }
        for (i, consumer) in self.consumers.iter().enumerate() {
            errors.nested(&format!("consumers[{i}]"), |e| {
                consumer.spec.check(e);
                check_references(e, consumer.spec.references());
            });
        }
        for (i, route) in self.routes.iter().enumerate() {
            errors.nested(&format!("routes[{i}]"), |e| {
                route.spec.check(e);
                check_references(e, route.spec.references());
            });
        }
        for (i, key) in self.api_keys.iter().enumerate() {
            if !consumer_ids.contains(key.consumer_id.as_str()) {
                errors.push(
                    format!("api_keys[{i}].consumer_id"),
                    format!("unknown consumer id '{}'", key.consumer_id),
                );
            }
        }
        for (kind, list) in [
            (
                "upstreams",
                names(&self.upstreams, |u| &u.name).len() != self.upstreams.len(),
            ),
            (
                "routes",
                names(&self.routes, |r| &r.name).len() != self.routes.len(),
            ),
            ("consumers", consumers.len() != self.consumers.len()),
            ("plans", plans.len() != self.plans.len()),
            ("jwt_issuers", issuers.len() != self.jwt_issuers.len()),
        ] {
            if list {
                errors.push(kind, "names must be unique");
            }
        }
        errors.finish()
    }
}

fn names<T>(items: &[Stored<T>], name: impl Fn(&T) -> &String) -> BTreeSet<&str> {
    items.iter().map(|item| name(&item.spec).as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored<T>(id: &str, spec: T) -> Stored<T> {
        Stored {
            id: id.into(),
            created_at: "2026-11-28T00:00:00Z".into(),
            updated_at: "2026-11-28T00:00:00Z".into(),
            revision: 1,
            spec,
        }
    }

    fn route(name: &str, upstream: &str) -> Route {
        serde_json::from_value(
            serde_json::json!({"name": name, "paths": ["/x"], "upstream": upstream}),
        )
        .expect("valid route json")
    }

    fn upstream(name: &str) -> Upstream {
        serde_json::from_value(
            serde_json::json!({"name": name, "targets": [{"url": "http://127.0.0.1:1"}]}),
        )
        .expect("valid upstream json")
    }

    #[test]
    fn hash_ignores_revision_and_order_after_canonicalize() {
        let mut a = Snapshot {
            revision: 1,
            upstreams: vec![stored("1", upstream("a")), stored("2", upstream("b"))],
            ..Snapshot::default()
        };
        let mut b = Snapshot {
            revision: 9,
            upstreams: vec![stored("2", upstream("b")), stored("1", upstream("a"))],
            ..Snapshot::default()
        };
        a.canonicalize();
        b.canonicalize();
        assert_eq!(a.content_hash(), b.content_hash());
        b.upstreams[0].spec.retries = 2;
        assert_ne!(a.content_hash(), b.content_hash());
    }

    #[test]
    fn check_reports_dangling_references_with_paths() {
        let snapshot = Snapshot {
            revision: 3,
            upstreams: vec![stored("1", upstream("a"))],
            routes: vec![
                stored("2", route("ok", "a")),
                stored("3", route("bad", "missing")),
            ],
            ..Snapshot::default()
        };
        let errors = snapshot.check().expect_err("dangling upstream");
        assert_eq!(
            errors.to_string(),
            "routes[1].upstream: unknown upstream 'missing'"
        );
    }

    #[test]
    fn digest_parse() {
        let digest = ApiKeyDigest::of_secret("tg_secret");
        assert_eq!(ApiKeyDigest::parse(digest.as_str()), Ok(digest));
        assert!(ApiKeyDigest::parse("ABC").is_err());
    }
}
