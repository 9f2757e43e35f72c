//! The configuration resources operators write through the admin API, and their checks.
//!
//! Every resource is plain data with serde defaults, so the smallest useful JSON is accepted
//! (see DESIGN.md's "Shapes the API accepts"). Unknown fields are refused so a typo never
//! silently turns into a default. Cross-resource references (a route naming an upstream) are
//! by name and are checked where all resources are known: the control plane's store and
//! [`crate::Snapshot::check`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validate::{Collector, Validate, check_name, check_positive, check_unique};

/// Largest `requests` a rate limit or quota may name.
pub const MAX_LIMIT: i64 = 1_000_000_000_000;
/// Longest rate-limit window: one year.
pub const MAX_WINDOW_SECONDS: i64 = 366 * 24 * 3600;

/// A stored resource: the operator's spec plus the identity and timestamps the store assigns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored<T> {
    /// Stable identifier assigned at creation (UUID v7).
    pub id: String,
    /// Creation time, RFC 3339, UTC.
    pub created_at: String,
    /// Last change, RFC 3339, UTC.
    pub updated_at: String,
    /// The config revision that last changed this resource.
    pub revision: i64,
    /// The resource itself.
    #[serde(flatten)]
    pub spec: T,
}

/// The kinds of named resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// [`Upstream`]
    Upstream,
    /// [`Route`]
    Route,
    /// [`Consumer`]
    Consumer,
    /// [`Plan`]
    Plan,
    /// [`JwtIssuer`]
    JwtIssuer,
}

impl ResourceKind {
    /// Singular, as used in messages and stored in the database: `upstream`, `jwt_issuer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upstream => "upstream",
            Self::Route => "route",
            Self::Consumer => "consumer",
            Self::Plan => "plan",
            Self::JwtIssuer => "jwt_issuer",
        }
    }

    /// Human label for messages: `upstream`, `JWT issuer`.
    pub fn label(self) -> &'static str {
        match self {
            Self::JwtIssuer => "JWT issuer",
            other => other.as_str(),
        }
    }
}

/// A by-name reference from one resource to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Field of the referring resource, e.g. `upstream` or `auth.jwt.issuers[0]`.
    pub field: String,
    /// Kind of the resource referred to.
    pub kind: ResourceKind,
    /// Its name.
    pub name: String,
}

impl Reference {
    fn new(field: impl Into<String>, kind: ResourceKind, name: &str) -> Self {
        Self {
            field: field.into(),
            kind,
            name: name.to_string(),
        }
    }
}

// One schema per resource (`StoredRoute`, …): the spec's fields plus the store's. Written by
// hand because the derive names every `Stored<T>` plainly `Stored`.
impl<T: ToSchema> utoipa::PartialSchema for Stored<T> {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Type};
        let text = |description: &str, example: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(description))
                .examples([serde_json::json!(example)])
        };
        let store_fields = ObjectBuilder::new()
            .property(
                "id",
                text(
                    "Stable identifier assigned at creation (UUID v7).",
                    "01936f3a-8d2c-7b7e-9f4e-4c1d2b3a4f5e",
                ),
            )
            .property(
                "created_at",
                text("Creation time, RFC 3339, UTC.", "2026-11-28T10:00:00Z"),
            )
            .property(
                "updated_at",
                text("Last change, RFC 3339, UTC.", "2026-11-28T10:00:00Z"),
            )
            .property(
                "revision",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .description(Some("The config revision that last changed this resource.")),
            )
            .required("id")
            .required("created_at")
            .required("updated_at")
            .required("revision");
        AllOfBuilder::new()
            .item(utoipa::openapi::Ref::from_schema_name(T::name()))
            .item(store_fields)
            .into()
    }
}

impl<T: ToSchema> ToSchema for Stored<T> {
    fn name() -> std::borrow::Cow<'static, str> {
        format!("Stored{}", T::name()).into()
    }

    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        schemas.push((T::name().into_owned(), T::schema()));
        T::schemas(schemas);
    }
}

// ---------------------------------------------------------------- upstreams

/// A backend service: the targets requests are balanced over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "users", "targets": [{"url": "http://10.0.0.5:9001", "weight": 100}]}))]
pub struct Upstream {
    /// Unique name; routes refer to the upstream by it.
    pub name: String,
    /// Where requests go; at least one.
    pub targets: Vec<Target>,
    /// How a target is picked for each request.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Connect and whole-request timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// How many times an idempotent request is retried on another target after a
    /// connection failure (0..=10).
    #[serde(default)]
    pub retries: i64,
    /// Active health checking; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// One backend address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `http://host:port` (an optional path prefix is prepended to forwarded paths).
    #[schema(example = "http://10.0.0.5:9001")]
    pub url: String,
    /// Relative share of requests (0..=1000; 0 drains the target).
    #[serde(default = "default_weight")]
    pub weight: i64,
}

fn default_weight() -> i64 {
    100
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// The target with the fewest requests in flight.
    LeastConnections,
    /// Weighted random choice.
    Random,
}

/// Upstream timeouts in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Time allowed to open a connection (1..=60000 ms).
    #[serde(default = "default_connect_ms")]
    pub connect_ms: i64,
    /// Time the upstream may take for its part of an exchange (1..=3600000 ms): for the
    /// response headers (counted after the request body, when there is one), for taking any
    /// more of a request body, and for any silence inside the response body.
    #[serde(default = "default_request_ms")]
    pub request_ms: i64,
}

fn default_connect_ms() -> i64 {
    2_000
}
fn default_request_ms() -> i64 {
    30_000
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: default_connect_ms(),
            request_ms: default_request_ms(),
        }
    }
}

/// Active health check settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path probed with `GET`; a 2xx or 3xx answer is healthy.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Seconds between probes (1..=3600).
    #[serde(default = "default_health_interval")]
    pub interval_seconds: i64,
    /// Probe timeout in milliseconds (1..=60000).
    #[serde(default = "default_health_timeout")]
    pub timeout_ms: i64,
    /// Consecutive successes before a target is healthy again (1..=100).
    #[serde(default = "default_threshold")]
    pub healthy_threshold: i64,
    /// Consecutive failures before a target is taken out (1..=100).
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: i64,
}

fn default_health_path() -> String {
    "/".to_string()
}
fn default_health_interval() -> i64 {
    10
}
fn default_health_timeout() -> i64 {
    1_000
}
fn default_threshold() -> i64 {
    3
}

impl Validate for Upstream {
    fn check(&self, errors: &mut Collector) {
        check_name(errors, "name", &self.name);
        if self.targets.is_empty() {
            errors.push("targets", "must list at least one target");
        }
        for (i, target) in self.targets.iter().enumerate() {
            errors.nested(&format!("targets[{i}]"), |errors| target.check(errors));
        }
        check_unique(
            errors,
            "targets",
            self.targets.iter().map(|t| t.url.as_str()),
        );
        if !self.targets.is_empty() && self.targets.iter().all(|t| t.weight == 0) {
            errors.push("targets", "at least one target needs a weight above 0");
        }
        check_range(
            errors,
            "timeouts.connect_ms",
            self.timeouts.connect_ms,
            1,
            60_000,
        );
        check_range(
            errors,
            "timeouts.request_ms",
            self.timeouts.request_ms,
            1,
            3_600_000,
        );
        check_range(errors, "retries", self.retries, 0, 10);
        if let Some(health) = &self.health_check {
            errors.nested("health_check", |errors| health.check(errors));
        }
    }
}

impl Validate for Target {
    fn check(&self, errors: &mut Collector) {
        match url::Url::parse(&self.url) {
            Err(error) => errors.push("url", format!("is not a valid URL: {error}")),
            Ok(url) => {
                if url.scheme() != "http" {
                    errors.push("url", "scheme must be http");
                }
                if url.host_str().is_none_or(str::is_empty) {
                    errors.push("url", "must name a host");
                }
                if !url.username().is_empty() || url.password().is_some() {
                    errors.push("url", "must not carry credentials");
                }
                if url.query().is_some() || url.fragment().is_some() {
                    errors.push("url", "must not have a query or fragment");
                }
            }
        }
        check_range(errors, "weight", self.weight, 0, 1000);
    }
}

impl Validate for HealthCheck {
    fn check(&self, errors: &mut Collector) {
        check_path(errors, "path", &self.path);
        check_range(errors, "interval_seconds", self.interval_seconds, 1, 3600);
        check_range(errors, "timeout_ms", self.timeout_ms, 1, 60_000);
        check_range(errors, "healthy_threshold", self.healthy_threshold, 1, 100);
        check_range(
            errors,
            "unhealthy_threshold",
            self.unhealthy_threshold,
            1,
            100,
        );
    }
}

// ---------------------------------------------------------------- routes

/// Which requests go to which upstream, and the policies applied on the way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "users", "paths": ["/users"], "methods": ["GET", "POST"],
    "upstream": "users", "strip_prefix": true, "auth": {"api_key": {}},
    "rate_limit": {"requests": 1000, "window_seconds": 1, "by": "ip"}}))]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Host names matched exactly or as `*.example.com` wildcards; empty matches any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Paths matched by prefix (on segment boundaries) or exactly, per `path_match`; at least one.
    pub paths: Vec<String>,
    /// How `paths` match.
    #[serde(default)]
    pub path_match: PathMatch,
    /// Allowed methods (upper case); empty allows every method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present: name → any one of the listed values.
    #[serde(default)]
    pub headers: BTreeMap<String, Vec<String>>,
    /// Breaks ties between equally specific routes; higher wins.
    #[serde(default)]
    pub priority: i64,
    /// Remove the matched path prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Forward the client's `Host` header instead of the target's.
    #[serde(default)]
    pub preserve_host: bool,
    /// Name of the upstream requests are forwarded to.
    pub upstream: String,
    /// Who may call the route; public when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthPolicy>,
    /// A rate limit of the route itself, on top of the consumer's plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RouteRateLimit>,
    /// Header changes on the way in and out.
    #[serde(default)]
    pub transforms: Transforms,
    /// Largest request body accepted, in bytes; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<i64>,
}

/// How a route's paths are compared with the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    /// `/users` matches `/users`, `/users/` and `/users/42`, not `/usersx`.
    #[default]
    Prefix,
    /// Only the path itself.
    Exact,
}

/// Authentication of a route. With both methods set, either credential is accepted.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthPolicy {
    /// Accept API keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyAuth>,
    /// Accept JWTs from the listed issuers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtAuth>,
    /// Only these consumers (by username) may call; empty means any authenticated consumer.
    #[serde(default)]
    pub allowed_consumers: Vec<String>,
    /// Only consumers carrying one of these tags may call; empty means no tag restriction.
    #[serde(default)]
    pub allowed_tags: Vec<String>,
}

/// API-key authentication settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyAuth {
    /// Header carrying the key; `Authorization: Bearer` is accepted as well.
    #[serde(default = "default_key_header")]
    pub header: String,
}

fn default_key_header() -> String {
    "X-API-Key".to_string()
}

/// JWT authentication settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtAuth {
    /// Names of the JWT issuers whose tokens are accepted; at least one.
    pub issuers: Vec<String>,
}

/// A rate limit attached to a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRateLimit {
    /// Requests allowed per window.
    pub requests: i64,
    /// Window length in seconds.
    pub window_seconds: i64,
    /// What is counted separately.
    #[serde(default)]
    pub by: RateLimitBy,
    /// What the data plane does when the limiter store is unreachable.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
}

/// The key a route's rate limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitBy {
    /// One counter for the whole route.
    #[default]
    Route,
    /// One counter per client IP (trusted-proxy aware).
    Ip,
    /// One counter per authenticated consumer.
    Consumer,
}

/// Behaviour when the shared limiter store (Redis) cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Serve the request, log and count it.
    #[default]
    FailOpen,
    /// Refuse with 503 `limiter_unavailable`.
    FailClosed,
    /// Each node enforces limit ÷ live node count in memory.
    Local,
}

/// Header changes applied to requests and responses.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Transforms {
    /// Applied to the request before it is forwarded.
    #[serde(default)]
    pub request: HeaderTransform,
    /// Applied to the upstream's response.
    #[serde(default)]
    pub response: HeaderTransform,
}

/// Header edits: remove first, then set (replace), then add (append).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderTransform {
    /// Header names to remove.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Headers to set, replacing any existing value.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Headers to append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
}

/// Methods a route may list.
pub const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
];

impl Validate for Route {
    fn check(&self, errors: &mut Collector) {
        check_name(errors, "name", &self.name);
        for (i, host) in self.hosts.iter().enumerate() {
            check_host(errors, &format!("hosts[{i}]"), host);
        }
        check_unique(errors, "hosts", self.hosts.iter().map(String::as_str));
        if self.paths.is_empty() {
            errors.push("paths", "must list at least one path");
        }
        for (i, path) in self.paths.iter().enumerate() {
            check_path(errors, &format!("paths[{i}]"), path);
        }
        check_unique(errors, "paths", self.paths.iter().map(String::as_str));
        for (i, method) in self.methods.iter().enumerate() {
            if !METHODS.contains(&method.as_str()) {
                errors.push(
                    format!("methods[{i}]"),
                    format!(
                        "unknown method '{method}' (use one of {})",
                        METHODS.join(", ")
                    ),
                );
            }
        }
        check_unique(errors, "methods", self.methods.iter().map(String::as_str));
        for (name, values) in &self.headers {
            check_header_name(errors, &format!("headers.{name}"), name);
            if values.is_empty() {
                errors.push(format!("headers.{name}"), "must list at least one value");
            }
            for (i, value) in values.iter().enumerate() {
                check_header_value(errors, &format!("headers.{name}[{i}]"), value);
            }
        }
        check_range(errors, "priority", self.priority, -1_000_000, 1_000_000);
        check_name(errors, "upstream", &self.upstream);
        if let Some(auth) = &self.auth {
            errors.nested("auth", |errors| auth.check(errors));
        }
        if let Some(limit) = &self.rate_limit {
            errors.nested("rate_limit", |errors| {
                check_positive(errors, "requests", limit.requests, MAX_LIMIT);
                check_positive(
                    errors,
                    "window_seconds",
                    limit.window_seconds,
                    MAX_WINDOW_SECONDS,
                );
                if limit.by == RateLimitBy::Consumer && self.auth.is_none() {
                    errors.push("by", "'consumer' needs the route to have auth");
                }
            });
        }
        errors.nested("transforms", |errors| {
            errors.nested("request", |errors| self.transforms.request.check(errors));
            errors.nested("response", |errors| self.transforms.response.check(errors));
        });
        if let Some(max) = self.max_body_bytes {
            check_range(errors, "max_body_bytes", max, 0, i64::MAX);
        }
    }
}

impl Route {
    /// Every resource this route names: its upstream, JWT issuers and allowed consumers.
    pub fn references(&self) -> Vec<Reference> {
        let mut references = vec![Reference::new(
            "upstream",
            ResourceKind::Upstream,
            &self.upstream,
        )];
        if let Some(auth) = &self.auth {
            if let Some(jwt) = &auth.jwt {
                for (i, issuer) in jwt.issuers.iter().enumerate() {
                    references.push(Reference::new(
                        format!("auth.jwt.issuers[{i}]"),
                        ResourceKind::JwtIssuer,
                        issuer,
                    ));
                }
            }
            for (i, consumer) in auth.allowed_consumers.iter().enumerate() {
                references.push(Reference::new(
                    format!("auth.allowed_consumers[{i}]"),
                    ResourceKind::Consumer,
                    consumer,
                ));
            }
        }
        references
    }
}

impl Validate for AuthPolicy {
    fn check(&self, errors: &mut Collector) {
        if self.api_key.is_none() && self.jwt.is_none() {
            errors.push("", "must enable at least one of 'api_key' or 'jwt'");
        }
        if let Some(api_key) = &self.api_key {
            check_header_name(errors, "api_key.header", &api_key.header);
        }
        if let Some(jwt) = &self.jwt {
            if jwt.issuers.is_empty() {
                errors.push("jwt.issuers", "must list at least one issuer");
            }
            for (i, issuer) in jwt.issuers.iter().enumerate() {
                check_name(errors, &format!("jwt.issuers[{i}]"), issuer);
            }
            check_unique(
                errors,
                "jwt.issuers",
                jwt.issuers.iter().map(String::as_str),
            );
        }
        for (i, consumer) in self.allowed_consumers.iter().enumerate() {
            check_name(errors, &format!("allowed_consumers[{i}]"), consumer);
        }
        for (i, tag) in self.allowed_tags.iter().enumerate() {
            check_name(errors, &format!("allowed_tags[{i}]"), tag);
        }
    }
}

impl Validate for HeaderTransform {
    fn check(&self, errors: &mut Collector) {
        for (i, name) in self.remove.iter().enumerate() {
            check_header_name(errors, &format!("remove[{i}]"), name);
        }
        for (field, map) in [("set", &self.set), ("add", &self.add)] {
            for (name, value) in map {
                check_header_name(errors, &format!("{field}.{name}"), name);
                check_header_value(errors, &format!("{field}.{name}"), value);
            }
        }
    }
}

// ---------------------------------------------------------------- consumers and plans

/// An API consumer: who a key or token belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"username": "alice", "plan": "gold", "tags": ["mobile"]}))]
pub struct Consumer {
    /// Unique username.
    pub username: String,
    /// Name of the plan whose limits apply; no consumer limits when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Free-form labels routes can allow by.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Consumer {
    /// Every resource this consumer names: its plan.
    pub fn references(&self) -> Vec<Reference> {
        self.plan
            .iter()
            .map(|plan| Reference::new("plan", ResourceKind::Plan, plan))
            .collect()
    }
}

impl Validate for Consumer {
    fn check(&self, errors: &mut Collector) {
        check_name(errors, "username", &self.username);
        if let Some(plan) = &self.plan {
            check_name(errors, "plan", plan);
        }
        for (i, tag) in self.tags.iter().enumerate() {
            check_name(errors, &format!("tags[{i}]"), tag);
        }
        check_unique(errors, "tags", self.tags.iter().map(String::as_str));
    }
}

/// Rate limit and quota a consumer subscribes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "gold", "rate_limit": {"requests": 100, "window_seconds": 60},
    "quota": {"requests": 100000, "period": "month"}}))]
pub struct Plan {
    /// Unique name.
    pub name: String,
    /// Short-window limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Calendar quota (UTC day or month).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// What the data plane does when the limiter store is unreachable.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
}

/// Requests per window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per window.
    #[schema(example = 100)]
    pub requests: i64,
    /// Window length in seconds.
    #[schema(example = 60)]
    pub window_seconds: i64,
}

/// Requests per calendar period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Requests allowed per period.
    #[schema(example = 100000)]
    pub requests: i64,
    /// The calendar period (UTC).
    pub period: QuotaPeriod,
}

/// Calendar periods of a quota, on UTC boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    /// From 00:00 UTC to the next.
    Day,
    /// From the first of the month 00:00 UTC to the next.
    Month,
}

impl Validate for Plan {
    fn check(&self, errors: &mut Collector) {
        check_name(errors, "name", &self.name);
        if let Some(limit) = &self.rate_limit {
            errors.nested("rate_limit", |errors| {
                check_positive(errors, "requests", limit.requests, MAX_LIMIT);
                check_positive(
                    errors,
                    "window_seconds",
                    limit.window_seconds,
                    MAX_WINDOW_SECONDS,
                );
            });
        }
        if let Some(quota) = &self.quota {
            check_positive(errors, "quota.requests", quota.requests, MAX_LIMIT);
        }
    }
}

// ---------------------------------------------------------------- JWT issuers

/// A trusted JWT issuer and how its tokens are verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "corp", "issuer": "https://id.example", "audiences": ["api"],
    "algorithms": ["RS256"], "jwks_url": "https://id.example/jwks.json"}))]
pub struct JwtIssuer {
    /// Unique name; routes refer to the issuer by it.
    pub name: String,
    /// Expected `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values; the token must carry one of them. Empty skips the check.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Allowed signing algorithms; the token's own `alg` is never trusted beyond this list.
    pub algorithms: Vec<String>,
    /// JWKS document URL (https, or http on a trusted network), fetched and cached by data
    /// planes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// PEM public key for RS*/PS*/ES* algorithms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// Shared secret for HS* algorithms. Write-only: the admin API never returns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Claim naming the consumer (its username).
    #[serde(default = "default_consumer_claim")]
    pub consumer_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, seconds (0..=600).
    #[serde(default = "default_leeway")]
    pub leeway_seconds: i64,
    /// Claims forwarded upstream: claim name → header name.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Accept valid tokens whose consumer claim names no known consumer (claims still forwarded).
    #[serde(default)]
    pub allow_anonymous: bool,
}

fn default_consumer_claim() -> String {
    "sub".to_string()
}
fn default_leeway() -> i64 {
    30
}

/// Signing algorithms an issuer may allow.
pub const JWT_ALGORITHMS: [&str; 11] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384",
];

impl JwtIssuer {
    /// The issuer as the admin API shows it: the HMAC secret is never returned.
    pub fn redacted(mut self) -> Self {
        self.secret = None;
        self
    }
}

impl Validate for JwtIssuer {
    fn check(&self, errors: &mut Collector) {
        check_name(errors, "name", &self.name);
        if self.issuer.trim().is_empty() {
            errors.push("issuer", "must not be empty");
        }
        if self.algorithms.is_empty() {
            errors.push("algorithms", "must list at least one algorithm");
        }
        for (i, alg) in self.algorithms.iter().enumerate() {
            if !JWT_ALGORITHMS.contains(&alg.as_str()) {
                errors.push(
                    format!("algorithms[{i}]"),
                    format!(
                        "unsupported algorithm '{alg}' (use one of {})",
                        JWT_ALGORITHMS.join(", ")
                    ),
                );
            }
        }
        check_unique(
            errors,
            "algorithms",
            self.algorithms.iter().map(String::as_str),
        );
        let hmac = self.algorithms.iter().any(|a| a.starts_with("HS"));
        let asymmetric = self.algorithms.iter().any(|a| !a.starts_with("HS"));
        if hmac && asymmetric {
            errors.push(
                "algorithms",
                "must not mix HS* with RS*/PS*/ES* (key confusion)",
            );
        }
        let sources = [
            self.jwks_url.is_some(),
            self.public_key_pem.is_some(),
            self.secret.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => errors.push(
                "",
                "one of 'jwks_url', 'public_key_pem' or 'secret' is required",
            ),
            1 => {}
            _ => errors.push(
                "",
                "only one of 'jwks_url', 'public_key_pem' or 'secret' may be given",
            ),
        }
        if let Some(secret) = &self.secret {
            if !hmac {
                errors.push("secret", "is only used with HS* algorithms");
            }
            if secret.len() < 32 {
                errors.push("secret", "must be at least 32 bytes");
            }
        }
        if hmac && self.secret.is_none() {
            errors.push("algorithms", "HS* algorithms need 'secret'");
        }
        if let Some(pem) = &self.public_key_pem
            && !pem.contains("-----BEGIN")
        {
            errors.push("public_key_pem", "must be a PEM-encoded public key");
        }
        if let Some(jwks_url) = &self.jwks_url {
            match url::Url::parse(jwks_url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                Ok(_) => errors.push("jwks_url", "scheme must be https or http"),
                Err(error) => errors.push("jwks_url", format!("is not a valid URL: {error}")),
            }
        }
        if self.consumer_claim.is_empty() {
            errors.push("consumer_claim", "must not be empty");
        }
        check_range(errors, "leeway_seconds", self.leeway_seconds, 0, 600);
        for (claim, header) in &self.forward_claims {
            check_header_name(errors, &format!("forward_claims.{claim}"), header);
        }
    }
}

// ---------------------------------------------------------------- field checks

fn check_range(errors: &mut Collector, field: &str, value: i64, min: i64, max: i64) {
    if value < min || value > max {
        errors.push(
            field,
            format!("must be between {min} and {max} (got {value})"),
        );
    }
}

/// A route path or probe path: absolute, no dot segments, no query, printable ASCII.
fn check_path(errors: &mut Collector, field: &str, path: &str) {
    if !path.starts_with('/') {
        errors.push(field, "must start with '/'");
        return;
    }
    if path.len() > 1024 {
        errors.push(field, "must be at most 1024 characters");
    }
    if path.contains(['?', '#']) {
        errors.push(field, "must not contain '?' or '#'");
    }
    if path.contains("//") {
        errors.push(field, "must not contain empty segments ('//')");
    }
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        errors.push(field, "must not contain '.' or '..' segments");
    }
    if path.contains('%') {
        errors.push(
            field,
            "must not be percent-encoded (write the decoded path)",
        );
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        errors.push(field, "must be printable ASCII without spaces");
    }
}

fn check_host(errors: &mut Collector, field: &str, host: &str) {
    let bare = host.strip_prefix("*.").unwrap_or(host);
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        errors.push(
            field,
            "must be a host name such as 'api.example.com' or '*.example.com'",
        );
    }
}

fn check_header_name(errors: &mut Collector, field: &str, name: &str) {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        errors.push(field, format!("'{name}' is not a valid header name"));
    }
}

fn check_header_value(errors: &mut Collector, field: &str, value: &str) {
    if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        errors.push(field, "must not contain control characters");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems<T: Validate + serde::de::DeserializeOwned>(json: serde_json::Value) -> Vec<String> {
        let value: T = serde_json::from_value(json).expect("parses");
        match value.validate() {
            Ok(()) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn design_shapes_are_valid() {
        use serde_json::json;
        assert_eq!(
            problems::<Upstream>(
                json!({"name": "users", "targets": [{"url": "http://10.0.0.5:9001", "weight": 100}]})
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            problems::<Plan>(
                json!({"name": "gold", "rate_limit": {"requests": 100, "window_seconds": 60}, "quota": {"requests": 100000, "period": "month"}})
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            problems::<Consumer>(json!({"username": "alice", "plan": "gold", "tags": ["mobile"]})),
            Vec::<String>::new()
        );
        assert_eq!(
            problems::<Route>(
                json!({"name": "users", "paths": ["/users"], "methods": ["GET", "POST"], "upstream": "users", "strip_prefix": true, "auth": {"api_key": {}}, "rate_limit": {"requests": 1000, "window_seconds": 1, "by": "ip"}})
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            problems::<JwtIssuer>(
                json!({"name": "corp", "issuer": "https://id.example", "audiences": ["api"], "algorithms": ["RS256"], "jwks_url": "https://id.example/jwks.json"})
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn route_reports_every_problem_with_its_path() {
        let got = problems::<Route>(serde_json::json!({
            "name": "bad name", "paths": ["users", "/a/../b", "/ok"], "methods": ["GET", "FETCH"],
            "hosts": ["*.example.com", "bad_host"], "upstream": "u",
            "rate_limit": {"requests": -5, "window_seconds": 0}
        }));
        assert_eq!(
            got,
            vec![
                "name: may contain only letters, digits and '.', '_', '~', '-'",
                "hosts[1]: must be a host name such as 'api.example.com' or '*.example.com'",
                "paths[0]: must start with '/'",
                "paths[1]: must not contain '.' or '..' segments",
                "methods[1]: unknown method 'FETCH' (use one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE, CONNECT)",
                "rate_limit.requests: must be greater than 0 (got -5)",
                "rate_limit.window_seconds: must be greater than 0 (got 0)",
            ]
        );
    }

    #[test]
    fn upstream_targets() {
        let got = problems::<Upstream>(serde_json::json!({
            "name": "u", "targets": [{"url": "ftp://x"}, {"url": "not a url"}, {"url": "http://a:1", "weight": -1}],
            "retries": 11
        }));
        assert_eq!(
            got,
            vec![
                "targets[0].url: scheme must be http",
                "targets[1].url: is not a valid URL: relative URL without a base",
                "targets[2].weight: must be between 0 and 1000 (got -1)",
                "retries: must be between 0 and 10 (got 11)",
            ]
        );
        assert_eq!(
            problems::<Upstream>(serde_json::json!({"name": "u", "targets": []})),
            vec!["targets: must list at least one target"]
        );
    }

    #[test]
    fn jwt_issuer_key_sources_and_confusion() {
        let got = problems::<JwtIssuer>(serde_json::json!({
            "name": "c", "issuer": "i", "algorithms": ["HS256", "RS256"], "secret": "short"
        }));
        assert_eq!(
            got,
            vec![
                "algorithms: must not mix HS* with RS*/PS*/ES* (key confusion)",
                "secret: must be at least 32 bytes",
            ]
        );
        let got = problems::<JwtIssuer>(
            serde_json::json!({"name": "c", "issuer": "i", "algorithms": ["none"]}),
        );
        assert_eq!(
            got,
            vec![
                "algorithms[0]: unsupported algorithm 'none' (use one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384)",
                "one of 'jwks_url', 'public_key_pem' or 'secret' is required",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let result: Result<Consumer, _> =
            serde_json::from_value(serde_json::json!({"username": "a", "plann": "x"}));
        assert!(result.is_err());
    }
}

// ---------------------------------------------------------------- declarative config

/// The whole configuration as one document (`GET`/`PUT /admin/v1/config`): every resource by
/// name, without ids or timestamps. API keys are not part of it (their secrets exist once).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"upstreams": [{"name": "users", "targets": [{"url": "http://10.0.0.5:9001"}]}],
    "routes": [{"name": "users", "paths": ["/users"], "upstream": "users"}],
    "consumers": [], "plans": [], "jwt_issuers": []}))]
pub struct DeclarativeConfig {
    /// Upstreams.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Consumers.
    #[serde(default)]
    pub consumers: Vec<Consumer>,
    /// Plans.
    #[serde(default)]
    pub plans: Vec<Plan>,
    /// JWT issuers (HMAC secrets are never exported; an issuer applied without one keeps the
    /// stored secret).
    #[serde(default)]
    pub jwt_issuers: Vec<JwtIssuer>,
}
