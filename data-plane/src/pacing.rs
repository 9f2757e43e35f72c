//! When the limiter's batching task sends its next call to Redis.
//!
//! A call decides the requests that queued while the previous one was in flight; the requests
//! it admits then go to their upstreams. If the next call goes while they are still there, it
//! competes with them: Redis runs, and the call is answered, while the upstream (on a shared
//! machine, on the same core) still works on the previous batch. So, after a busy call (at
//! least [`BUSY_BATCH`] requests), the next call **waits until the runtime is about to park with
//! no admitted request still waiting for its upstream**: by then every request that could join
//! it has, and nothing else is left to run. It waits [`HOLD`] at most after the previous
//! answer (2-3 ms: the runtime's timers count whole milliseconds). Waiting is worth it only
//! while upstreams answer fast: after [`SLOW_WAITS`] waits in a row longer than [`FAST`] (or
//! cut at [`HOLD`]), the task stops waiting for [`PROBE`] and sends each call after two
//! scheduler passes, as it does below [`BUSY_BATCH`] and without the runtime hook
//! ([`install`]).
//!
//! Bench (one core for the data plane, the upstream and Redis; key auth and a Redis limit):
//! +8-10% requests/s (paired A/B; one build, pacing `auto` against `off`: 0.87x against 0.79x
//! nginx), the upstream's CPU per request -20%, 11-13% more script calls per request (the
//! batches are smaller, but the upstream gets the core whole).
//!
//! `TOLLGATE_LIMITER_PACING` ([`Mode`]): `auto` (the default) paces calls to a Redis on this
//! host only, where the wait pays; with a Redis elsewhere the wait would only delay calls
//! (measured with a 0.5 ms upstream on another core: p99 +0.4-0.7 ms, no gain).
//!
//! The state is the process's: the `tollgate` binary runs one data plane per process and
//! installs the hook; test servers sharing a process share it too, which only changes when
//! their calls go, never what they decide.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Longest wait that keeps the batching task waiting for the next call.
pub const FAST: Duration = Duration::from_millis(1);
/// Longest wait for a call, from the previous call's answer.
pub const HOLD: Duration = Duration::from_millis(2);
/// Waits longer than [`FAST`] in a row after which the batching task stops waiting.
pub const SLOW_WAITS: u32 = 3;
/// How long the batching task does not wait after [`SLOW_WAITS`] slow ones.
pub const PROBE: Duration = Duration::from_secs(1);
/// Fewest requests in a call after which the next call waits: below, the data plane is not
/// busy enough for a wait to gather more, and a request would only wait longer.
pub const BUSY_BATCH: usize = 8;

struct Pacing {
    /// The runtime calls [`before_park`].
    hooked: AtomicBool,
    /// Requests a Redis call admitted whose upstream has not answered yet.
    outstanding: AtomicUsize,
    /// Batching tasks waiting for [`before_park`].
    holders: AtomicUsize,
    signal: tokio::sync::Notify,
    /// Calls that waited, and of those the waits longer than [`FAST`] (or cut at [`HOLD`]).
    waits: AtomicU64,
    slow_waits: AtomicU64,
}

static PACING: Pacing = Pacing {
    hooked: AtomicBool::new(false),
    outstanding: AtomicUsize::new(0),
    holders: AtomicUsize::new(0),
    signal: tokio::sync::Notify::const_new(),
    waits: AtomicU64::new(0),
    slow_waits: AtomicU64::new(0),
};

/// `TOLLGATE_LIMITER_PACING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// On when Redis is on this host (a loopback address, `localhost` or a Unix socket): it
    /// then shares the data plane's cores, which is when waiting pays.
    #[default]
    Auto,
    /// Always (when the runtime hook is installed).
    On,
    /// Never: each call goes after two scheduler passes.
    Off,
}

impl Mode {
    /// Whether calls to the Redis at `url` are paced.
    pub fn paces(self, url: &str) -> bool {
        match self {
            Self::On => true,
            Self::Off => false,
            Self::Auto => redis_on_this_host(url),
        }
    }
}

/// Whether `url` (`redis://[user:pass@]host[:port][/db]`, `rediss://`, `redis+unix://`,
/// `unix://`) names a Redis on this host.
fn redis_on_this_host(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    if scheme.ends_with("unix") {
        return true;
    }
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = match host_port.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
        None => host_port
            .rsplit_once(':')
            .map_or(host_port, |(host, _)| host),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Installs the hook on the runtime that runs the data plane.
pub fn install(builder: &mut tokio::runtime::Builder) {
    PACING.hooked.store(true, Ordering::Relaxed);
    builder.on_thread_park(before_park);
}

/// Called by the runtime before it parks: wakes a waiting batching task when no admitted
/// request waits for its upstream.
fn before_park() {
    if PACING.holders.load(Ordering::Relaxed) > 0 && PACING.outstanding.load(Ordering::Relaxed) == 0
    {
        PACING.signal.notify_waiters();
    }
}

/// Held by a request a Redis call admitted, until its upstream answers (or it ends).
#[must_use]
#[derive(Debug)]
pub struct Admitted(());

impl Admitted {
    /// Counts the request. Made only for the calls of a paced limiter: limiters that never
    /// wait pay no shared counter per request.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        PACING.outstanding.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        PACING.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a call that waited: `slow` when the wait took longer than [`FAST`] or was cut.
pub fn count_wait(slow: bool) {
    PACING.waits.fetch_add(1, Ordering::Relaxed);
    if slow {
        PACING.slow_waits.fetch_add(1, Ordering::Relaxed);
    }
}

/// Calls that waited, and slow waits among them (for `/metrics`).
pub fn wait_counts() -> (u64, u64) {
    (
        PACING.waits.load(Ordering::Relaxed),
        PACING.slow_waits.load(Ordering::Relaxed),
    )
}

/// Whether the runtime calls [`before_park`].
pub fn hooked() -> bool {
    PACING.hooked.load(Ordering::Relaxed)
}

/// A batching task waiting for the runtime to go idle: `notified` completes when it does with
/// no admitted request at its upstream. Register (the guard), enable the `Notified`, then look
/// at the queue: no wake-up is lost.
pub struct Waiting(());

impl Waiting {
    /// Starts waiting.
    pub fn start() -> Self {
        PACING.holders.fetch_add(1, Ordering::Relaxed);
        Self(())
    }

    /// The signal to wait for.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'static> {
        PACING.signal.notified()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        PACING.holders.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_paces_a_redis_on_this_host_only() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://localhost",
            "redis://:secret@127.0.0.2:6380",
            "redis://user:p%40ss@[::1]:6379/1",
            "rediss://LOCALHOST:6380",
            "redis+unix:///run/redis.sock",
            "unix:///run/redis.sock?db=1",
        ] {
            assert!(Mode::Auto.paces(url), "{url}");
        }
        for url in [
            "redis://10.0.0.5:6379/0",
            "redis://redis.internal",
            "redis://127.0.0.1.example.com:6379",
            "redis://user:127.0.0.1@10.1.1.1",
            "redis://[2001:db8::1]:6379",
            "not a url",
        ] {
            assert!(!Mode::Auto.paces(url), "{url}");
        }
        assert!(Mode::On.paces("redis://10.0.0.5"));
        assert!(!Mode::Off.paces("redis://127.0.0.1"));
    }
}
