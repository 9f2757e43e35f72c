//! The request pipeline, in fixed phases:
//!
//! ```text
//! load snapshot → host + path normalization → route match → guards (body size)
//! → authenticate → request transforms → pick upstream target → forward (timeout, retries)
//! → response transforms → X-Request-Id
//! ```
//!
//! A request loads the snapshot once; every phase sees that same version. Bodies stream both
//! ways; nothing is buffered.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use tollgate_shared::{LoadBalancing, RateLimitBy, limits};

use crate::auth::ConsumerRt;
use crate::config::{CappedBody, Compiled, CompiledRoute};
use crate::error::ProxyError;
use crate::limiter::{Check, Decision, Span, Usage};
use crate::router::{normalize_host, normalize_path};
use crate::state::Shared;
use crate::upstream::{self, HOP_BY_HOP, RequestHead, SendError, UpstreamResponseBody};
use crate::values;
use crate::watchdog::{InFlight as Tracking, Tracked};

/// `X-Request-Id`: passed through when the client sent a sane one, generated otherwise.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
static X_CONSUMER_USERNAME: HeaderName = HeaderName::from_static("x-consumer-username");
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
/// The headers the gateway sets on an upstream's answer (any of the upstream's own by these
/// names are replaced): without limits, and with them.
static ANSWER_HEADERS: [&HeaderName; 1] = [&X_REQUEST_ID];
static ANSWER_HEADERS_LIMITED: [&HeaderName; 4] = [
    &X_REQUEST_ID,
    &RATELIMIT_LIMIT,
    &RATELIMIT_REMAINING,
    &RATELIMIT_RESET,
];

/// The response body: the upstream's, streamed, or one the gateway wrote; with the request's
/// place among those in flight on its connection, when the [`crate::watchdog`] tracks them.
pub type ResponseBody = Tracked<Either<UpstreamResponseBody, Full<Bytes>>>;

/// Serves one request. Never fails: errors become JSON answers with a stable `code`.
/// `in_flight` is held until the response body is dropped.
///
/// The future is an `async` block, not an `async fn`: an `async fn` keeps a second copy of
/// its arguments (the request's parts) beside the copy it works on, and hyper moves this
/// future, so its size is paid on every request.
pub fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    peer_value: HeaderValue,
    request: Request<Incoming>,
    in_flight: Tracking,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send {
    let (parts, body) = request.into_parts();
    handle_parts(
        shared,
        peer,
        peer_value,
        parts,
        Some(body),
        in_flight,
        false,
    )
}

/// Longest exchange with an upstream for a request with a body, whose upstream part is
/// bounded inside the exchange: a day, a backstop only.
const BODY_BACKSTOP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The hyper service of a client connection: each request counted in flight on `activity`
/// and served by [`handle`]. (Used by hyper-util's auto builder, and by hyper's HTTP/1 server
/// for the connections the fast lane hands off.)
pub fn service(
    shared: Arc<Shared>,
    peer: SocketAddr,
    peer_value: HeaderValue,
    activity: Arc<crate::watchdog::Activity>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ResponseBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
> + Send
+ 'static {
    hyper::service::service_fn(move |request: Request<Incoming>| {
        let in_flight = activity.request();
        handle(shared.clone(), peer, peer_value.clone(), request, in_flight)
    })
}

/// [`handle`] for a request already split (no body: `None`), as the HTTP/1 fast lane
/// (`lane.rs`) makes them. With `raw_answer`, the caller writes the answer's head itself: an
/// upstream's headers then come as [`upstream::RawHeaders`] in the response body (when the
/// route has no response transforms), and the response's map holds the gateway's only. An
/// `async` block, not an `async fn`: see [`handle`].
#[allow(clippy::manual_async_fn)]
pub fn handle_parts(
    shared: Arc<Shared>,
    peer: SocketAddr,
    peer_value: HeaderValue,
    mut parts: http::request::Parts,
    body: Option<Incoming>,
    in_flight: Tracking,
    raw_answer: bool,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send {
    async move {
        let request_id = request_id(&parts.headers);
        let forwarded = proxy(
            &shared,
            peer,
            &peer_value,
            &mut parts,
            body,
            &request_id,
            in_flight,
            raw_answer,
        );
        let response = match forwarded.await {
            Ok(response) => response,
            // A gateway-written body is sent at once: the request need not stay tracked.
            Err(error) => error
                .into_response(&request_id)
                .map(|body| Tracked::new(Either::Right(body), None)),
        };
        shared.metrics.record(response.status());
        Ok(response)
    }
}

/// Routes, authenticates, limits and forwards; the request's parts are borrowed from
/// [`handle`] (its headers become the upstream request's). (Its arguments are borrowed from
/// the request's future rather than bundled: a bundle would be one more copy in it.)
#[allow(clippy::too_many_arguments)]
async fn proxy(
    shared: &Shared,
    peer: SocketAddr,
    peer_value: &HeaderValue,
    parts: &mut http::request::Parts,
    mut body: Option<Incoming>,
    request_id: &HeaderValue,
    in_flight: Tracking,
    raw_answer: bool,
) -> Result<Response<ResponseBody>, ProxyError> {
    let config: Arc<Compiled> = shared.config.load_full().ok_or(ProxyError::NoConfig)?;
    let content_length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Whatever the framing (Content-Length, chunked, or HTTP/2 DATA frames without a length),
    // a body is there unless the stream already ended.
    let has_body = body
        .as_ref()
        .is_some_and(|body| !hyper::body::Body::is_end_stream(body));

    // Two Host headers: which one is meant is ambiguous (RFC 9112 3.2: 400).
    let mut hosts = parts.headers.get_all(HOST).iter();
    let first_host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header".into()));
    }
    let host_header: Option<HeaderValue> = match parts.uri.authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => first_host.cloned(),
    };
    let host_value = host_header.as_ref().and_then(|v| v.to_str().ok());
    let host = match host_value {
        Some(value) => normalize_host(value).map_err(|e| ProxyError::BadRequest(e.to_string()))?,
        None if parts.version == Version::HTTP_11 => {
            return Err(ProxyError::BadRequest("missing Host header".into()));
        }
        None => Cow::Borrowed(""),
    };
    let path =
        normalize_path(parts.uri.path()).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    let matched = config
        .router
        .find(&host, &path, &parts.method, &parts.headers)
        .ok_or(ProxyError::NoRoute)?;
    let route = config
        .routes
        .get(matched.route)
        .ok_or(ProxyError::NoRoute)?;

    // Guards.
    if let (Some(max), Some(length)) = (route.max_body_bytes, content_length)
        && length > max
    {
        if let Some(body) = body.as_mut() {
            Box::pin(crate::config::discard_body(body)).await;
        }
        return Err(ProxyError::BodyTooLarge(max));
    }

    // Authenticate. The time matters to keys, tokens and limits only (a route without auth has
    // no consumer, so no plan limits either): other routes skip reading the clock.
    let now_ms = if route.auth.is_some() || route.rate_limit.is_some() {
        shared.clock.now_ms()
    } else {
        0
    };
    let identity = match &route.auth {
        Some(auth) => Some(
            auth.authenticate(&parts.headers, &config.keys, now_ms)
                .await?,
        ),
        None => None,
    };

    // Rate limits and quotas: one round trip for all of them.
    let consumer = identity.as_ref().and_then(|i| i.consumer.as_deref());
    let checks = limit_checks(
        shared,
        route,
        consumer,
        || client_ip(shared, peer.ip(), &parts.headers),
        now_ms,
    );
    // Held until the upstream answers (see `pacing`).
    let mut admitted = None;
    let usage = if checks.is_empty() {
        None
    } else {
        let (decision, guard) = shared.limiter.decide(checks, now_ms).await;
        admitted = guard;
        match decision {
            Decision::Admitted(usages) => closest_to_limit(&usages),
            Decision::Limited(usages, index) => {
                // A refusal always names one of the request's limits.
                if let Some(usage) = usages.get(index).or(usages.last()) {
                    return Err(ProxyError::Limited { usage: *usage });
                }
                None
            }
            Decision::Unavailable => return Err(ProxyError::LimiterUnavailable),
        }
    };

    // The upstream request's headers: the client's, less hop-by-hop ones, with the gateway's
    // (`added`) in place of any of the same name.
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    let consumer = identity.as_ref().and_then(|i| i.consumer.as_deref());
    let (strip, forward) = identity
        .as_ref()
        .map_or((&[None, None], &[][..]), |i| (&i.strip, &i.forward[..]));
    let forwarded = Forwarded::new(
        headers,
        shared.is_trusted(peer.ip()),
        peer_value,
        host_header.as_ref(),
    );
    let mut added: Vec<(&HeaderName, Option<&HeaderValue>)> = Vec::with_capacity(8 + forward.len());
    // Consumer headers come from the gateway only, never from the client.
    added.push((&X_CONSUMER_ID, consumer.map(|c| &c.id_header)));
    added.push((&X_CONSUMER_USERNAME, consumer.map(|c| &c.username_header)));
    added.extend(strip.iter().flatten().map(|name| (name, None)));
    added.extend(forward.iter().map(|(name, value)| (name, Some(value))));
    forwarded.add_to(&mut added);
    added.push((&X_REQUEST_ID, Some(request_id)));
    if !route.request_edits.is_empty() {
        // Transforms see (and may change) the gateway's headers too.
        for (name, value) in added.drain(..) {
            match value {
                Some(value) => headers.insert(name.clone(), value.clone()),
                None => headers.remove(name),
            };
        }
        route.request_edits.apply(headers);
    }

    let forwarded_path = if route.strip_prefix {
        let rest = path.get(matched.prefix_len..).unwrap_or("");
        Cow::Owned(if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        })
    } else {
        path
    };
    let query = parts.uri.query();
    // HTTP/1 bodies that stall close their connection (the watchdog); an HTTP/2 stream's
    // body is timed on its own and answered 408.
    let mut body: Option<CappedBody> = body.filter(|_| has_body).map(|body| {
        let capped = CappedBody::new(body, route.max_body_bytes);
        if parts.version == Version::HTTP_2 {
            capped.with_stall_timeout(shared.body_timeout)
        } else {
            capped
        }
    });
    // The client's Host when the route preserves it and there is one (an HTTP/1.0 client may
    // send none: then the target's, as for other routes).
    let client_host = route
        .preserve_host
        .then_some(host_header.as_ref())
        .flatten();

    // The upstream's headers as lines for a caller that writes the head itself, unless
    // transforms need them in a map.
    let raw_answer =
        (raw_answer && route.response_edits.is_empty()).then_some(if usage.is_some() {
            &ANSWER_HEADERS_LIMITED[..]
        } else {
            &ANSWER_HEADERS[..]
        });

    // Forward, retrying bodyless requests on another target after a connect failure.
    let pool = &route.upstream;
    let attempts = if has_body { 1 } else { 1 + pool.retries };
    let mut last_error = ProxyError::Unreachable;
    for attempt in 0..attempts {
        let target = pool.pick();
        let _in_flight = (pool.algorithm == LoadBalancing::LeastConnections)
            .then(|| InFlight::new(&target.in_flight));
        let head = RequestHead {
            method: &parts.method,
            base: &target.base_path,
            path: &forwarded_path,
            query,
            host: client_host.unwrap_or(&target.host_header),
            headers,
            added: &added,
            raw_answer,
            read_timeout: pool.request_timeout,
        };
        // A bodyless request has its whole exchange bounded by the request timeout; one with a
        // body has the upstream's part of it bounded inside (see `upstream::send`), and this
        // timer only as a backstop. (One await of one `Timeout`: two, one per case, made the
        // pipeline's future larger and every request copy more of it.)
        let sent = upstream::send(&target.conns, pool.connect_timeout, &head, body.take());
        let limit = if has_body {
            BODY_BACKSTOP
        } else {
            pool.request_timeout
        };
        match tokio::time::timeout(limit, sent).await {
            Err(_) | Ok(Err(SendError::Timeout)) => return Err(ProxyError::Timeout),
            Ok(Err(error)) => {
                tracing::debug!(%error, upstream = %pool.name, target = %target.authority, attempt, "upstream request failed");
                match error {
                    SendError::BodyOverLimit => {
                        return Err(ProxyError::BodyTooLarge(route.max_body_bytes.unwrap_or(0)));
                    }
                    SendError::BodyTimeout => return Err(ProxyError::BodyTimeout),
                    SendError::Connect(_) => last_error = ProxyError::Unreachable,
                    SendError::Target => {
                        return Err(ProxyError::BadRequest(error.to_string()));
                    }
                    _ => return Err(ProxyError::Unreachable),
                }
            }
            Ok(Ok(response)) => {
                drop(admitted.take());
                // Hop-by-hop headers are already left out.
                let (mut head, mut body) = response.into_parts();
                if let Some(lines) = body.raw_headers_mut() {
                    // The answer's head is written from lines (no transforms here): the
                    // gateway's headers join them rather than a map.
                    lines.push(&X_REQUEST_ID, request_id.as_bytes());
                    if let Some(usage) = &usage {
                        let mut digits = itoa::Buffer::new();
                        for (name, value) in rate_limit_fields(usage) {
                            lines.push(name, digits.format(value).as_bytes());
                        }
                    }
                } else {
                    if !route.response_edits.is_empty() {
                        route.response_edits.apply(&mut head.headers);
                    }
                    head.headers
                        .insert(X_REQUEST_ID.clone(), request_id.clone());
                    if let Some(usage) = &usage {
                        rate_limit_headers(&mut head.headers, usage);
                    }
                }
                return Ok(Response::from_parts(
                    head,
                    Tracked::new(Either::Left(body), Some(in_flight)),
                ));
            }
        }
    }
    Err(last_error)
}

/// Removes a request's hop-by-hop headers (an upstream's answer leaves them out while it is
/// parsed, in `upstream.rs`).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names notes which hop-by-hop headers are there (most requests carry
    // none, or only `Connection`): each present one then costs one removal, the others none.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(index) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << index;
        }
    }
    if present == 0 {
        return;
    }
    // Headers the Connection header names are hop-by-hop too. Those that are hop-by-hop by
    // name go below anyway; most requests name no other (`Connection: keep-alive`), and then
    // nothing is collected or allocated.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(upstream::named_by_connection)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for (index, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << index) != 0 {
            headers.remove(name);
        }
    }
}

/// `X-Forwarded-*`: kept and extended from trusted peers, replaced for everyone else.
struct Forwarded<'a> {
    /// The peer's address (built once per connection), or a trusted peer's chain extended.
    for_value: Cow<'a, HeaderValue>,
    /// `None`: a trusted peer's value is kept.
    proto: Option<&'a HeaderValue>,
    /// `None` inside: the client's (untrusted) value is dropped and none is sent.
    host: Option<Option<&'a HeaderValue>>,
}

static HTTP: HeaderValue = HeaderValue::from_static("http");

impl<'a> Forwarded<'a> {
    /// `peer` is the peer's address as a header value; `host` the client's `Host`. An
    /// untrusted peer's headers are not looked at.
    fn new(
        headers: &HeaderMap,
        trusted: bool,
        peer: &'a HeaderValue,
        host: Option<&'a HeaderValue>,
    ) -> Self {
        if !trusted {
            return Self {
                for_value: Cow::Borrowed(peer),
                proto: Some(&HTTP),
                host: Some(host),
            };
        }
        // Every X-Forwarded-For line, in order, then the peer: one line upstream.
        let mut chain = String::new();
        for line in headers.get_all(&X_FORWARDED_FOR) {
            let line = line.to_str().map(str::trim).unwrap_or_default();
            if !line.is_empty() {
                chain.push_str(line);
                chain.push_str(", ");
            }
        }
        let for_value = if chain.is_empty() {
            Cow::Borrowed(peer)
        } else {
            chain.push_str(peer.to_str().unwrap_or_default());
            HeaderValue::from_str(&chain).map_or(Cow::Borrowed(peer), Cow::Owned)
        };
        Self {
            for_value,
            proto: (!headers.contains_key(&X_FORWARDED_PROTO)).then_some(&HTTP),
            host: (!headers.contains_key(&X_FORWARDED_HOST)).then_some(host),
        }
    }

    fn add_to<'b>(&'b self, added: &mut Vec<(&'b HeaderName, Option<&'b HeaderValue>)>) {
        added.push((&X_FORWARDED_FOR, Some(&self.for_value)));
        if let Some(proto) = self.proto {
            added.push((&X_FORWARDED_PROTO, Some(proto)));
        }
        if let Some(host) = self.host {
            added.push((&X_FORWARDED_HOST, host));
        }
    }
}

/// The client's request id when it is 1–128 visible ASCII characters, else a new random one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(value) = headers.get(&X_REQUEST_ID) {
        let bytes = value.as_bytes();
        if !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic()) {
            return value.clone();
        }
    }
    let id: [u8; 16] = rand::random();
    let mut buffer = [0u8; 32];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in buffer.chunks_exact_mut(2).zip(id) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
    values::shared(&buffer).unwrap_or_else(|| HeaderValue::from_static("0"))
}

/// Counts a request against a target until its response head arrives (least connections).
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The limits a request is checked against: the route's own, then its consumer's plan.
fn limit_checks(
    shared: &Shared,
    route: &CompiledRoute,
    consumer: Option<&ConsumerRt>,
    client_ip: impl FnOnce() -> IpAddr,
    now_ms: i64,
) -> Vec<Check> {
    let prefix = shared.limiter.prefix.as_str();
    let mut checks = Vec::new();
    if let Some((limit, window, by, policy)) = route.rate_limit {
        let scope = match by {
            RateLimitBy::Route => Cow::Borrowed(""),
            RateLimitBy::Ip => Cow::Owned(format!("ip:{}", client_ip())),
            RateLimitBy::Consumer => {
                Cow::Borrowed(consumer.map_or("c:anonymous", |c| c.limit_scope.as_str()))
            }
        };
        checks.push(Check {
            key: limits::route_key(prefix, &route.id, &scope),
            limit,
            span: Span::Window(window),
            policy,
            is_quota: false,
        });
    }
    if let Some(consumer) = consumer
        && let Some(plan) = &consumer.plan
    {
        if let Some((limit, window)) = plan.rate_limit {
            checks.push(Check {
                key: limits::plan_key(prefix, &consumer.id),
                limit,
                span: Span::Window(window),
                policy: plan.failure_policy,
                is_quota: false,
            });
        }
        if let Some((limit, period)) = plan.quota {
            let (_, stamp) = limits::period_end(period, now_ms);
            checks.push(Check {
                key: limits::quota_key(prefix, &consumer.id, &stamp),
                limit,
                span: Span::Quota(period),
                policy: plan.failure_policy,
                is_quota: true,
            });
        }
    }
    checks
}

/// The client's address: the peer, or behind trusted proxies the nearest untrusted address in
/// `X-Forwarded-For`.
fn client_ip(shared: &Shared, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    if !shared.is_trusted(peer) {
        return peer;
    }
    let chain = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .collect::<Vec<_>>();
    chain
        .iter()
        .rev()
        .find(|ip| !shared.is_trusted(**ip))
        .or(chain.first())
        .copied()
        .unwrap_or(peer)
}

/// The limit with the fewest requests left: the one the `RateLimit-*` headers describe.
fn closest_to_limit(usages: &[Usage]) -> Option<Usage> {
    usages
        .iter()
        .min_by_key(|u| u.limit.saturating_sub(u.count))
        .copied()
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds) for `usage`.
pub fn rate_limit_headers(headers: &mut HeaderMap, usage: &Usage) {
    for (name, value) in rate_limit_fields(usage) {
        headers.insert(name.clone(), values::number(value));
    }
}

/// The `RateLimit-*` headers' names and values for `usage`.
fn rate_limit_fields(usage: &Usage) -> [(&'static HeaderName, u64); 3] {
    [
        (&RATELIMIT_LIMIT, usage.limit),
        (
            &RATELIMIT_REMAINING,
            usage.limit.saturating_sub(usage.count),
        ),
        (
            &RATELIMIT_RESET,
            ceil_seconds(usage.reset_ms).unsigned_abs(),
        ),
    ]
}

/// Milliseconds rounded up to whole seconds, at least 1.
pub fn ceil_seconds(ms: i64) -> i64 {
    ((ms.max(1) + 999) / 1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_pass_through_or_are_generated() {
        let mut headers = HeaderMap::new();
        let generated = request_id(&headers);
        assert_eq!(generated.len(), 32);
        assert!(generated.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(request_id(&headers), generated);
        headers.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("has space"));
        assert_ne!(request_id(&headers), "has space");
    }

    #[test]
    fn forwarded_headers_trust_only_trusted_peers() {
        let peer = HeaderValue::from_static("10.0.0.9");
        let host = HeaderValue::from_static("api.example.com");
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_static("1.2.3.4"));
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
        headers.insert(
            X_FORWARDED_HOST.clone(),
            HeaderValue::from_static("front.example"),
        );
        let written = |trusted: bool, host: Option<&HeaderValue>| {
            let forwarded = Forwarded::new(&headers, trusted, &peer, host);
            let mut added = Vec::new();
            forwarded.add_to(&mut added);
            added
                .iter()
                .map(|(name, value)| {
                    let value = value.and_then(|v| v.to_str().ok()).unwrap_or("(none)");
                    format!("{name}: {value}")
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            written(false, Some(&host)),
            [
                "x-forwarded-for: 10.0.0.9",
                "x-forwarded-proto: http",
                "x-forwarded-host: api.example.com"
            ]
        );
        // No Host from an untrusted client: its X-Forwarded-Host is dropped, none is sent.
        assert_eq!(
            written(false, None)[2..],
            ["x-forwarded-host: (none)".to_string()]
        );
        // Trusted: the chain is extended; the client's other two are kept (not replaced).
        assert_eq!(
            written(true, Some(&host)),
            ["x-forwarded-for: 1.2.3.4, 10.0.0.9"]
        );
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        // The names present are noted as bits of a u16.
        assert!(HOP_BY_HOP.len() <= 16);
        let cases: [&[(&str, &str)]; 2] = [
            &[
                ("connection", "close, x-secret-hop"),
                ("x-secret-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
            ],
            // Naming only hop-by-hop headers (as upstreams answer `Connection: keep-alive`).
            &[
                ("connection", "Keep-Alive, upgrade"),
                ("keep-alive", "timeout=5"),
                ("upgrade", "websocket"),
            ],
        ];
        for case in cases {
            let mut headers = HeaderMap::new();
            for (name, value) in case {
                headers.insert(*name, HeaderValue::from_static(value));
            }
            headers.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut headers);
            assert_eq!(headers.len(), 1, "{case:?}");
            assert!(headers.contains_key("x-kept"));
        }
    }

    /// hyper moves each request's future once it is made, and the future's size is copied
    /// then: it was 4.3 KB before the body-streaming, JWT, dial and error paths were boxed and
    /// the request's parts held once (about 2 KB now; the bound leaves room for compiler
    /// versions and debug builds). This keeps it from growing back unnoticed.
    #[test]
    fn the_request_future_stays_small() {
        fn size_of_future<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size_of_future(handle);
        assert!(size <= 3072, "the request future is {size} bytes");
    }
}
