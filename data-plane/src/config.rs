//! Compiling a snapshot into the runtime form requests use: route table, upstream pools,
//! key index, consumers, JWT keys and pre-parsed header edits.
//!
//! **Everything per-snapshot happens here, once, off the hot path.** A snapshot that fails
//! any check (its own validation, hash, a key that does not parse) is refused whole and the
//! previous config stays in place.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::Authority;
use tollgate_shared::{HeaderTransform, HealthCheck, LoadBalancing, Snapshot, Stored, Upstream};

use crate::auth::{ConsumerRt, KeyIndex, PlanRt, RouteAuth};
use crate::jwt::{IssuerKeys, JwksRegistry};
use crate::router::RouteTable;
use crate::upstream::{Connections, HostConns};

/// A request body that fails once more than its limit has streamed through, so a chunked
/// body cannot exceed `max_body_bytes` either (the proxy then answers 413).
pub struct CappedBody {
    inner: hyper::body::Incoming,
    remaining: u64,
    stall: Option<Stall>,
}

/// A body's stall timeout: the timer runs while the body waits for the client.
struct Stall {
    timeout: Duration,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Data came since the timer was last armed.
    moved: bool,
}

/// The error a [`CappedBody`] fails with.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the route allows")]
pub struct BodyOverLimit;

/// The error a [`CappedBody`] with a stall timeout fails with when the client sends nothing
/// for that long.
#[derive(Debug, thiserror::Error)]
#[error("the client sent none of its request body within the body timeout")]
pub struct BodyStalled;

/// Most of a refused request's body read and thrown away, and for how long.
const DISCARD_MAX_BYTES: u64 = 256 * 1024;
const DISCARD_TIME: Duration = Duration::from_secs(1);

/// Reads and throws away what is left of a client's request body (bounded in bytes and
/// time), so that an early refusal such as 413 reaches the client: a socket closed with
/// unread bytes is reset, and the reset can destroy the answer before the client reads it.
pub async fn discard_body(body: &mut hyper::body::Incoming) {
    use http_body_util::BodyExt;
    let mut left = DISCARD_MAX_BYTES;
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            let size = frame.data_ref().map_or(0, |data| data.len() as u64);
            if size >= left {
                return;
            }
            left -= size;
        }
    })
    .await;
}

impl CappedBody {
    /// Throws away the rest of the client's body (see [`discard_body`]).
    pub async fn discard_rest(&mut self) {
        discard_body(&mut self.inner).await;
    }

    /// Caps `inner` at `limit` bytes (`None`: no cap).
    pub fn new(inner: hyper::body::Incoming, limit: Option<u64>) -> Self {
        Self {
            inner,
            remaining: limit.unwrap_or(u64::MAX),
            stall: None,
        }
    }

    /// Fails the body with [`BodyStalled`] when it waits longer than `timeout` for the client
    /// to send more (for HTTP/2 streams, whose reads the connection's watchdog cannot tell
    /// apart). The timer is created at the first wait and moved forward, not re-created.
    pub fn with_stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall = Some(Stall {
            timeout,
            timer: None,
            moved: false,
        });
        self
    }
}

impl hyper::body::Body for CappedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                let size = frame.data_ref().map_or(0, |data| data.len() as u64);
                if size > self.remaining {
                    return std::task::Poll::Ready(Some(Err(Box::new(BodyOverLimit))));
                }
                self.remaining -= size;
                if let Some(stall) = &mut self.stall {
                    stall.moved = true;
                }
                std::task::Poll::Ready(Some(Ok(frame)))
            }
            std::task::Poll::Ready(Some(Err(error))) => {
                std::task::Poll::Ready(Some(Err(Box::new(error))))
            }
            std::task::Poll::Ready(None) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => {
                let Some(stall) = &mut self.stall else {
                    return std::task::Poll::Pending;
                };
                let deadline = tokio::time::Instant::now() + stall.timeout;
                let timer = match &mut stall.timer {
                    Some(timer) => {
                        if stall.moved {
                            timer.as_mut().reset(deadline);
                        }
                        timer
                    }
                    None => stall
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                stall.moved = false;
                match timer.as_mut().poll(cx) {
                    std::task::Poll::Ready(()) => {
                        std::task::Poll::Ready(Some(Err(Box::new(BodyStalled))))
                    }
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
/// One target of an upstream, ready to address, with its load and health.
#[derive(Debug)]
pub struct TargetRt {
    /// Relative share of requests.
    pub weight: usize,
    /// Requests waiting for this target's response head (least connections).
    pub in_flight: AtomicUsize,
    /// Whether active health checks currently consider it healthy (true without checks).
    pub healthy: AtomicBool,
    /// `host:port`.
    pub authority: Authority,
    /// `Host` header value sent when the route does not preserve the client's.
    pub host_header: HeaderValue,
    /// Path prefix of the target URL without trailing slash (often empty).
    pub base_path: String,
    /// Its idle keep-alive connections (shared with later snapshots).
    pub conns: Arc<HostConns>,
}

/// An upstream: targets, the precomputed weighted round-robin schedule, timeouts, client.
pub struct UpstreamPool {
    /// Name, for logs.
    pub name: String,
    /// Targets.
    pub targets: Vec<TargetRt>,
    schedule: Vec<usize>,
    next: AtomicUsize,
    /// How a target is picked.
    pub algorithm: LoadBalancing,
    /// Active health checking, when configured.
    pub health_check: Option<HealthCheck>,
    /// Time allowed for the response head.
    pub request_timeout: Duration,
    /// Extra attempts on another target after a connect failure (bodyless requests only).
    pub retries: usize,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
}

impl UpstreamPool {
    /// The target for the next request, among healthy targets with a weight (all of them when
    /// none is healthy: better to try than to refuse). Lock-free.
    pub fn pick(&self) -> &TargetRt {
        let usable = |t: &TargetRt| t.weight > 0 && t.healthy.load(Ordering::Relaxed);
        let any_usable = self.targets.iter().any(usable);
        let usable = |t: &TargetRt| !any_usable || usable(t);
        let index = match self.algorithm {
            LoadBalancing::RoundRobin => {
                // The schedule is weighted; skip unusable slots (at most one full turn).
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..self.schedule.len())
                    .map(|offset| self.schedule[(start + offset) % self.schedule.len()])
                    .find(|i| usable(&self.targets[*i]))
            }
            LoadBalancing::Random => {
                let total: usize = self
                    .targets
                    .iter()
                    .filter(|t| usable(t))
                    .map(|t| t.weight.max(1))
                    .sum();
                let mut ticket = rand::random::<u64>() as usize % total.max(1);
                self.targets.iter().position(|t| {
                    if !usable(t) {
                        return false;
                    }
                    let share = t.weight.max(1);
                    if ticket < share {
                        true
                    } else {
                        ticket -= share;
                        false
                    }
                })
            }
            LoadBalancing::LeastConnections => self
                .targets
                .iter()
                .enumerate()
                .filter(|(_, t)| usable(t))
                .min_by(|(_, a), (_, b)| {
                    // in_flight / weight, compared without division.
                    let load = |t: &TargetRt| t.in_flight.load(Ordering::Relaxed) as u128;
                    (load(a) * b.weight.max(1) as u128).cmp(&(load(b) * a.weight.max(1) as u128))
                })
                .map(|(i, _)| i),
        };
        &self.targets[index.unwrap_or(0).min(self.targets.len() - 1)]
    }

    fn compile(upstream: &Upstream, connections: &Connections) -> Result<Self, String> {
        let mut targets = Vec::with_capacity(upstream.targets.len());
        let mut weights = Vec::with_capacity(upstream.targets.len());
        for target in &upstream.targets {
            let uri: http::Uri = target
                .url
                .parse()
                .map_err(|e| format!("target '{}': {e}", target.url))?;
            let written = uri
                .authority()
                .cloned()
                .ok_or_else(|| format!("target '{}' has no host", target.url))?;
            // `Host` as the URL names it: without a port when it has none (some upstreams
            // compare it with their name); the connection goes to port 80 then.
            let host_header = HeaderValue::from_str(written.as_str())
                .map_err(|e| format!("target '{}': {e}", target.url))?;
            let authority = if written.port().is_some() {
                written
            } else {
                format!("{}:80", written.host())
                    .parse()
                    .map_err(|e| format!("target '{}': {e}", target.url))?
            };
            targets.push(TargetRt {
                weight: usize::try_from(target.weight).unwrap_or(0),
                in_flight: AtomicUsize::new(0),
                healthy: AtomicBool::new(true),
                host_header,
                base_path: uri.path().trim_end_matches('/').to_string(),
                conns: connections.host(authority.as_str()),
                authority,
            });
            weights.push(usize::try_from(target.weight).unwrap_or(0));
        }
        Ok(Self {
            name: upstream.name.clone(),
            schedule: smooth_weighted_schedule(&weights),
            targets,
            next: AtomicUsize::new(0),
            algorithm: upstream.load_balancing,
            health_check: upstream.health_check.clone(),
            request_timeout: Duration::from_millis(
                u64::try_from(upstream.timeouts.request_ms).unwrap_or(30_000),
            ),
            retries: usize::try_from(upstream.retries).unwrap_or(0),
            connect_timeout: Duration::from_millis(
                u64::try_from(upstream.timeouts.connect_ms).unwrap_or(2_000),
            ),
        })
    }
}

/// Carries the health-check verdicts of `previous` over to `next`, for each target both have
/// (same upstream, address and path, same checks): a config write (a new key, say) must not
/// put a target that failed its checks back in rotation until it fails them again. A target
/// new to the upstream, or whose checks changed, starts healthy, as without a previous config.
pub fn carry_health(previous: &Compiled, next: &Compiled) {
    for pool in &next.upstreams {
        let Some(check) = &pool.health_check else {
            continue;
        };
        let Some(old) = previous
            .upstreams
            .iter()
            .find(|old| old.name == pool.name && old.health_check.as_ref() == Some(check))
        else {
            continue;
        };
        for target in &pool.targets {
            if let Some(was) = old
                .targets
                .iter()
                .find(|was| was.authority == target.authority && was.base_path == target.base_path)
            {
                let healthy = was.healthy.load(Ordering::Relaxed);
                target.healthy.store(healthy, Ordering::Relaxed);
            }
        }
    }
}

/// Nginx's smooth weighted round robin, unrolled once into a schedule of target indexes so
/// picking needs no lock. Weights are reduced by their gcd; long schedules are scaled down.
pub fn smooth_weighted_schedule(weights: &[usize]) -> Vec<usize> {
    const MAX_LEN: usize = 4096;
    let gcd = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    if gcd == 0 {
        return vec![0];
    }
    let mut weights: Vec<usize> = weights.iter().map(|w| w / gcd).collect();
    let total: usize = weights.iter().sum();
    if total > MAX_LEN {
        weights = weights
            .iter()
            .map(|w| {
                if *w == 0 {
                    0
                } else {
                    (w * MAX_LEN / total).max(1)
                }
            })
            .collect();
    }
    let total: usize = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += i64::try_from(*w).unwrap_or(0);
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by(|(ia, a), (ib, b)| a.cmp(b).then(ib.cmp(ia)))
            .unwrap_or((0, &0));
        current[best] -= i64::try_from(total).unwrap_or(0);
        schedule.push(best);
    }
    schedule
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Pre-parsed header edits.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    /// Removed first.
    pub remove: Vec<HeaderName>,
    /// Then set (replacing).
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Then appended.
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdits {
    fn compile(transform: &HeaderTransform) -> Result<Self, String> {
        let name = |n: &str| HeaderName::try_from(n).map_err(|e| format!("header '{n}': {e}"));
        let pair = |(n, v): (&String, &String)| -> Result<(HeaderName, HeaderValue), String> {
            Ok((
                name(n)?,
                HeaderValue::try_from(v.as_str()).map_err(|e| format!("header '{n}': {e}"))?,
            ))
        };
        Ok(Self {
            remove: transform
                .remove
                .iter()
                .map(|n| name(n))
                .collect::<Result<_, _>>()?,
            set: transform.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: transform.add.iter().map(pair).collect::<Result<_, _>>()?,
        })
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Applies the edits.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// A route ready to serve.
pub struct CompiledRoute {
    /// Route name, for logs.
    pub name: String,
    /// Where it forwards.
    pub upstream: Arc<UpstreamPool>,
    /// Remove the matched prefix before forwarding.
    pub strip_prefix: bool,
    /// Forward the client's `Host`.
    pub preserve_host: bool,
    /// Who may call it.
    pub auth: Option<RouteAuth>,
    /// Largest body accepted.
    pub max_body_bytes: Option<u64>,
    /// The route's own rate limit: (limit, window ms, what it counts by, failure policy).
    pub rate_limit: Option<(
        u64,
        i64,
        tollgate_shared::RateLimitBy,
        tollgate_shared::FailurePolicy,
    )>,
    /// Route id, for limiter keys.
    pub id: String,
    /// Request header edits.
    pub request_edits: HeaderEdits,
    /// Response header edits.
    pub response_edits: HeaderEdits,
}

/// A compiled snapshot: what one request sees from start to end.
pub struct Compiled {
    /// Upstream pools by name (the health checker walks them).
    pub upstreams: Vec<Arc<UpstreamPool>>,
    /// Config revision.
    pub revision: i64,
    /// Content hash.
    pub hash: String,
    /// Route matching.
    pub router: RouteTable,
    /// Routes, indexed like the router's matches.
    pub routes: Vec<CompiledRoute>,
    /// API keys by digest.
    pub keys: KeyIndex,
    /// Consumers by id.
    pub consumers: HashMap<String, Arc<ConsumerRt>>,
    /// Longest rate-limit window (for sweeping in-memory counters).
    pub longest_window_ms: i64,
    /// The snapshot itself, kept for persistence.
    pub snapshot: Arc<Snapshot>,
}

/// Checks and compiles `snapshot`; `expected_hash` is what the control plane said it hashes to.
pub fn compile(
    snapshot: Snapshot,
    expected_hash: Option<&str>,
    connections: &Connections,
    jwks: &JwksRegistry,
) -> Result<Compiled, String> {
    let hash = snapshot.content_hash();
    if let Some(expected) = expected_hash
        && expected != hash
    {
        return Err(format!(
            "content hash mismatch: control plane sent {expected}, computed {hash}"
        ));
    }
    snapshot
        .check()
        .map_err(|errors| format!("invalid snapshot: {errors}"))?;

    let mut upstreams: HashMap<&str, Arc<UpstreamPool>> = HashMap::new();
    for upstream in &snapshot.upstreams {
        let pool = UpstreamPool::compile(&upstream.spec, connections)
            .map_err(|e| format!("upstream '{}': {e}", upstream.spec.name))?;
        upstreams.insert(upstream.spec.name.as_str(), Arc::new(pool));
    }
    let issuers = snapshot
        .jwt_issuers
        .iter()
        .map(|issuer| {
            IssuerKeys::compile(&issuer.spec, jwks)
                .map(|keys| (issuer.spec.name.clone(), Arc::new(keys)))
                .map_err(|e| format!("JWT issuer '{}': {e}", issuer.spec.name))
        })
        .collect::<Result<HashMap<_, _>, _>>()?;
    let plans: HashMap<String, Arc<PlanRt>> = snapshot
        .plans
        .iter()
        .map(|plan| {
            (
                plan.spec.name.clone(),
                Arc::new(PlanRt::compile(&plan.spec)),
            )
        })
        .collect();
    let consumers: HashMap<String, Arc<ConsumerRt>> = snapshot
        .consumers
        .iter()
        .map(|consumer| {
            ConsumerRt::compile(consumer, &plans).map(|c| (consumer.id.clone(), Arc::new(c)))
        })
        .collect::<Result<_, _>>()?;
    let by_username: Arc<HashMap<String, Arc<ConsumerRt>>> = Arc::new(
        consumers
            .values()
            .map(|c| (c.username.clone(), c.clone()))
            .collect(),
    );

    let mut routes = Vec::with_capacity(snapshot.routes.len());
    for route in &snapshot.routes {
        routes.push(compile_route(route, &upstreams, &issuers, &by_username)?);
    }
    let longest_window_ms = routes
        .iter()
        .filter_map(|r| r.rate_limit.map(|(_, window, _, _)| window))
        .chain(
            plans
                .values()
                .filter_map(|p| p.rate_limit.map(|(_, window)| window)),
        )
        .max()
        .unwrap_or(0);
    Ok(Compiled {
        upstreams: upstreams.values().cloned().collect(),
        longest_window_ms,
        revision: snapshot.revision,
        hash,
        router: RouteTable::build(&snapshot.routes),
        routes,
        keys: KeyIndex::compile(&snapshot.api_keys, &consumers),
        consumers,
        snapshot: Arc::new(snapshot),
    })
}

fn compile_route(
    route: &Stored<tollgate_shared::Route>,
    upstreams: &HashMap<&str, Arc<UpstreamPool>>,
    issuers: &HashMap<String, Arc<IssuerKeys>>,
    consumers: &Arc<HashMap<String, Arc<ConsumerRt>>>,
) -> Result<CompiledRoute, String> {
    let spec = &route.spec;
    let context = |e: String| format!("route '{}': {e}", spec.name);
    let upstream = upstreams
        .get(spec.upstream.as_str())
        .cloned()
        .ok_or_else(|| context(format!("unknown upstream '{}'", spec.upstream)))?;
    let auth = spec
        .auth
        .as_ref()
        .map(|auth| RouteAuth::compile(auth, issuers, consumers))
        .transpose()
        .map_err(context)?;
    Ok(CompiledRoute {
        name: spec.name.clone(),
        upstream,
        strip_prefix: spec.strip_prefix,
        preserve_host: spec.preserve_host,
        auth,
        max_body_bytes: spec.max_body_bytes.and_then(|m| u64::try_from(m).ok()),
        rate_limit: spec.rate_limit.as_ref().map(|r| {
            (
                u64::try_from(r.requests).unwrap_or(0),
                r.window_seconds.saturating_mul(1000),
                r.by,
                r.failure_policy,
            )
        }),
        id: route.id.clone(),
        request_edits: HeaderEdits::compile(&spec.transforms.request).map_err(context)?,
        response_edits: HeaderEdits::compile(&spec.transforms.response).map_err(context)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_send_the_host_their_url_names() {
        let upstream: Upstream = serde_json::from_value(serde_json::json!({"name": "u",
            "targets": [{"url": "http://api.internal"}, {"url": "http://api.internal:8080/base/"}]}))
        .expect("upstream");
        let pool = UpstreamPool::compile(&upstream, &Connections::default()).expect("compiles");
        let [plain, ported] = &pool.targets[..] else {
            panic!("two targets");
        };
        assert_eq!(plain.host_header, "api.internal");
        assert_eq!(plain.authority, "api.internal:80");
        assert_eq!(ported.host_header, "api.internal:8080");
        assert_eq!(ported.authority, "api.internal:8080");
        assert_eq!(ported.base_path, "/base");
    }

    #[test]
    fn weighted_schedule_is_smooth_and_proportional() {
        let check = |weights: &[usize], want: &[usize]| {
            assert_eq!(
                smooth_weighted_schedule(weights),
                want,
                "weights {weights:?}"
            );
        };
        check(&[1], &[0]);
        check(&[100, 100], &[0, 1]);
        check(&[5, 1, 1], &[0, 0, 1, 0, 2, 0, 0]);
        check(&[0, 3], &[1]);
        check(&[0, 0], &[0]);
        let long = smooth_weighted_schedule(&[1000, 999, 7]);
        assert!(long.len() <= 4096 + 3);
        let share = long.iter().filter(|i| **i == 2).count();
        assert!(share >= 1);
    }
}
