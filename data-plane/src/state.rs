//! What every request and the sync client share: the current compiled snapshot behind one
//! `ArcSwap`, the trusted-proxy list, the upstream client cache and the counters.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use arc_swap::ArcSwapOption;

use crate::config::Compiled;
use crate::jwt::JwksRegistry;
use crate::limiter::Limiter;
use crate::settings::Cidr;
use crate::upstream::Connections;

/// Shared state of one data plane.
pub struct Shared {
    /// Longest an HTTP/2 request body may wait for the client to send more (HTTP/1 bodies:
    /// the connection's watchdog).
    pub body_timeout: std::time::Duration,
    /// The config requests see; `None` until the first snapshot is applied.
    pub config: ArcSwapOption<Compiled>,
    /// Peers whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Idle upstream connections by target, kept across snapshots.
    pub connections: Connections,
    /// JWKS documents, kept across snapshots.
    pub jwks: JwksRegistry,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Rate limits and quotas.
    pub limiter: Limiter,
    /// The clock limits and key expiry are read from.
    pub clock: Arc<Clock>,
}

/// Wall-clock time in Unix milliseconds, with an offset tests can move forward.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    /// Now, Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        now + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Moves this clock forward (tests crossing a quota period).
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Shared {
    /// Fresh state with no config.
    pub fn new(
        trusted_proxies: Vec<Cidr>,
        limiter: Limiter,
        jwks: JwksRegistry,
        body_timeout: std::time::Duration,
    ) -> Self {
        Self {
            body_timeout,
            config: ArcSwapOption::empty(),
            trusted_proxies,
            connections: Connections::default(),
            jwks,
            metrics: Metrics::default(),
            limiter,
            clock: Arc::new(Clock::default()),
        }
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        !self.trusted_proxies.is_empty() && self.trusted_proxies.iter().any(|c| c.contains(ip))
    }

    /// Swaps in a new compiled snapshot atomically.
    pub fn apply(&self, compiled: Arc<Compiled>) {
        self.metrics.revision.store(
            u64::try_from(compiled.revision).unwrap_or(0),
            Ordering::Relaxed,
        );
        self.metrics.applied.fetch_add(1, Ordering::Relaxed);
        self.config.store(Some(compiled));
    }
}

/// Request and sync counters (relaxed atomics: one increment per request).
#[derive(Default)]
pub struct Metrics {
    /// Responses by status class: 1xx..5xx.
    pub responses: [AtomicU64; 5],
    /// Revision being served.
    pub revision: AtomicU64,
    /// Snapshots applied.
    pub applied: AtomicU64,
    /// Snapshots refused.
    pub rejected: AtomicU64,
    /// 1 while the sync stream is up.
    pub connected: AtomicU64,
}

impl Metrics {
    /// Counts one response.
    pub fn record(&self, status: http::StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, ready: bool, limiter: &Limiter) -> String {
        let mut out = String::with_capacity(1024);
        out.push_str("# HELP tollgate_responses_total Responses sent, by status class.\n# TYPE tollgate_responses_total counter\n");
        for (i, counter) in self.responses.iter().enumerate() {
            out.push_str(&format!(
                "tollgate_responses_total{{class=\"{}xx\"}} {}\n",
                i + 1,
                counter.load(Ordering::Relaxed)
            ));
        }
        let (paced, slow) = crate::pacing::wait_counts();
        let gauges = [
            (
                "tollgate_config_revision",
                "Config revision being served.",
                self.revision.load(Ordering::Relaxed),
            ),
            (
                "tollgate_config_applied_total",
                "Snapshots applied.",
                self.applied.load(Ordering::Relaxed),
            ),
            (
                "tollgate_config_rejected_total",
                "Snapshots refused (nacked).",
                self.rejected.load(Ordering::Relaxed),
            ),
            (
                "tollgate_sync_connected",
                "1 while connected to a control plane.",
                self.connected.load(Ordering::Relaxed),
            ),
            (
                "tollgate_ready",
                "1 once a config is loaded.",
                u64::from(ready),
            ),
            (
                "tollgate_limiter_degraded_total",
                "Requests whose limits were decided by a failure policy (Redis unavailable).",
                limiter.degraded.load(Ordering::Relaxed),
            ),
            (
                "tollgate_limiter_paced_calls_total",
                "Limiter calls that waited for the data plane to go idle first (see pacing).",
                paced,
            ),
            (
                "tollgate_limiter_slow_waits_total",
                "Of those, waits longer than 1 ms or cut at the longest wait.",
                slow,
            ),
            (
                "tollgate_live_data_planes",
                "Live data planes, as the control plane last reported.",
                limiter.live_nodes.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
        out
    }
}
