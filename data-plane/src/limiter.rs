//! Rate limits and quotas: every limit of a request checked, and consumed only if all admit it,
//! in **one** round trip — a Lua script on shared Redis, or the same semantics in memory.
//!
//! - **Rate limits** use an exact sliding window: a request is admitted while fewer than `limit`
//!   requests were admitted in the last `window` (admissions counted per millisecond: a sorted
//!   set of the milliseconds and a hash of their counts and total, see `limiter.lua`), so no
//!   window of that length ever holds more than `limit`. Fixed windows admit up to twice the
//!   limit across a boundary; GCRA admits a burst of `limit` and then the steady rate, so over
//!   one window of sustained load up to about twice the limit. The price is memory
//!   proportional to the distinct milliseconds with admissions per key, fine for per-second
//!   and per-minute limits; long periods are quotas.
//! - **Quotas** are calendar counters (UTC day or month) that expire at the period's end.
//! - **A refused request consumes nothing.**
//! - Keys share one hash tag (`{prefix}`), so the script's keys sit in one Redis Cluster slot.
//! - **When Redis fails** (error, timeout, or the circuit breaker is open) each limit follows its
//!   policy: `fail_open` admits, `fail_closed` refuses with 503 `limiter_unavailable`, `local`
//!   enforces `limit ÷ live data planes` in this node's memory. The timeout is short and the
//!   breaker skips Redis for a second after a failure, so a down Redis costs a few
//!   milliseconds at most, and recovery needs no restart.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::pacing::{self, Admitted};
use tollgate_shared::limits::{self, period_end};
use tollgate_shared::{FailurePolicy, QuotaPeriod};

/// What one limit counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Sliding window of this many milliseconds.
    Window(i64),
    /// Calendar period.
    Quota(QuotaPeriod),
}

/// One limit a request is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Full key (prefix and hash tag included).
    pub key: String,
    /// Requests allowed per window or period.
    pub limit: u64,
    /// Window or period.
    pub span: Span,
    /// Behaviour when the shared store is unreachable.
    pub policy: FailurePolicy,
    /// True for quotas (the 429 code differs).
    pub is_quota: bool,
}

/// The state of one limit after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// The limit.
    pub limit: u64,
    /// Requests counted, this one included when admitted.
    pub count: u64,
    /// Milliseconds until: a slot frees (a window that refused), everything counted has left
    /// the window (a window that admitted: its length), the period ends (quota).
    pub reset_ms: i64,
    /// Whether this is a quota.
    pub is_quota: bool,
}

/// The outcome of checking a request's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; the usage of each limit.
    Admitted(Vec<Usage>),
    /// Refused by the limit at this index.
    Limited(Vec<Usage>, usize),
    /// The shared store failed and a `fail_closed` limit applies.
    Unavailable,
}

/// In-memory limiter with the same semantics, for single-node use and the `local` policy.
#[derive(Default)]
pub struct MemoryLimiter {
    shards: [Mutex<HashMap<String, Counter>>; 16],
}

enum Counter {
    Window(VecDeque<i64>),
    Quota { count: u64, ends: i64 },
}

impl MemoryLimiter {
    /// Checks all limits (each scaled by `divisor`) and consumes them only if all admit.
    pub fn decide(&self, checks: &[Check], now_ms: i64, divisor: u64) -> Decision {
        let divisor = divisor.max(1);
        let mut usages = Vec::with_capacity(checks.len());
        let mut refused = None;
        for (i, check) in checks.iter().enumerate() {
            let limit = (check.limit / divisor).max(1);
            let mut shard = self.shard(&check.key);
            let (count, reset_ms) = match (check.span, shard.get_mut(&check.key)) {
                (Span::Window(window), Some(Counter::Window(times))) => {
                    while times.front().is_some_and(|t| *t <= now_ms - window) {
                        times.pop_front();
                    }
                    // Refused: until the oldest admission leaves the window (a slot frees).
                    // Admitted: the window's length, after which everything counted now,
                    // this request included, has left it (as the Redis script reports).
                    let count = times.len() as u64;
                    let reset = match times.front() {
                        Some(oldest) if count >= limit => oldest + window - now_ms,
                        _ => window,
                    };
                    (count, reset)
                }
                (Span::Quota(period), Some(Counter::Quota { count, ends })) if *ends > now_ms => {
                    let _ = period;
                    (*count, *ends - now_ms)
                }
                (Span::Window(window), _) => (0, window),
                (Span::Quota(period), _) => (0, period_end(period, now_ms).0 - now_ms),
            };
            drop(shard);
            if count >= limit && refused.is_none() {
                refused = Some(i);
            }
            usages.push(Usage {
                limit,
                count,
                reset_ms,
                is_quota: check.is_quota,
            });
        }
        if let Some(index) = refused {
            return Decision::Limited(usages, index);
        }
        for (check, usage) in checks.iter().zip(usages.iter_mut()) {
            let mut shard = self.shard(&check.key);
            match check.span {
                Span::Window(_) => {
                    let entry = shard
                        .entry(check.key.clone())
                        .or_insert_with(|| Counter::Window(VecDeque::new()));
                    if let Counter::Window(times) = entry {
                        times.push_back(now_ms);
                    }
                }
                Span::Quota(period) => {
                    let ends = period_end(period, now_ms).0;
                    let entry = shard
                        .entry(check.key.clone())
                        .or_insert(Counter::Quota { count: 0, ends });
                    match entry {
                        Counter::Quota {
                            count,
                            ends: current,
                        } if *current > now_ms => *count += 1,
                        other => *other = Counter::Quota { count: 1, ends },
                    }
                }
            }
            usage.count += 1;
        }
        Decision::Admitted(usages)
    }

    /// Drops counters with nothing left to count (called now and then, off the request path).
    pub fn sweep(&self, now_ms: i64, longest_window_ms: i64) {
        for shard in &self.shards {
            let mut shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            shard.retain(|_, counter| match counter {
                Counter::Window(times) => times
                    .back()
                    .is_some_and(|t| *t > now_ms - longest_window_ms),
                Counter::Quota { ends, .. } => *ends > now_ms,
            });
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<String, Counter>> {
        let hash = key
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        self.shards[(hash as usize) % self.shards.len()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The Redis-backed limiter: requests are decided by the Lua script in batches — the requests
/// that arrive while one call is in flight go together in the next `EVALSHA` (group commit),
/// so under load Redis runs one script call per batch rather than per request, while each
/// request is still decided exactly as if alone, at the batch's time (its latest arrival). A
/// short timeout and a circuit breaker bound what a failing Redis costs.
pub struct RedisLimiter {
    queue: tokio::sync::mpsc::UnboundedSender<Pending>,
    failures: AtomicU32,
    open_until_ms: AtomicI64,
    /// Whether its calls are paced (then the requests it admits are counted until their
    /// upstreams answer; otherwise nothing is counted, see [`pacing`]).
    paced: bool,
}

/// One request waiting for its batch.
struct Pending {
    /// When it was queued: a request that waited longer than the timeout for its batch is
    /// answered with an error (its failure policy applies) instead of being sent.
    queued: std::time::Instant,
    /// Its arrival (Unix ms); the batch is decided at its latest arrival.
    now_ms: i64,
    /// Its limits (moved here, not copied: the batching task decides the request).
    checks: Vec<Check>,
    /// The decision, or why there is none, with the checks back (for the failure policies).
    reply: tokio::sync::oneshot::Sender<Result<Decision, (String, Vec<Check>)>>,
}

impl Pending {
    /// Answers that Redis did not decide this request.
    fn fail(self, error: String) {
        let _ = self.reply.send(Err((error, self.checks)));
    }
}

/// One limit as the script takes it: key, kind (1 window, 2 quota), limit, and the window's
/// length or the end of the quota's period (Unix ms).
type LimitArgs<'a> = (&'a str, u8, u64, i64);

/// `check` as the script takes it, for a request that arrived at `now_ms`.
fn limit_args(check: &Check, now_ms: i64) -> LimitArgs<'_> {
    match check.span {
        Span::Window(window) => (&check.key, 1, check.limit, window),
        Span::Quota(period) => (&check.key, 2, check.limit, period_end(period, now_ms).0),
    }
}

/// Shortest timeout with which the batching task may wait for the runtime to go idle before a
/// call (see [`pacing`]): the wait must stay well inside it.
const PACED_TIMEOUT: Duration = Duration::from_millis(4);

/// How long an open breaker skips Redis before letting one request probe it.
const BREAKER_OPEN_MS: i64 = 1_000;
/// Most requests decided by one script call.
const MAX_BATCH: usize = 128;

impl RedisLimiter {
    /// Connects (lazily reconnecting afterwards) to `url` and starts the batching task.
    pub async fn connect(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        Self::connect_paced(url, timeout, false).await
    }

    /// [`RedisLimiter::connect`], its calls paced when `paced` (see [`pacing`]; it also needs
    /// the runtime hook).
    pub async fn connect_paced(url: &str, timeout: Duration, paced: bool) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            // The batching task times each call itself, with one long-lived timer (see
            // `run_batches`): a timer set per call wakes the runtime's I/O driver (a write to
            // its eventfd, and one more epoll_wait) whenever it is the earliest one.
            .set_response_timeout(None)
            .set_number_of_retries(1);
        let connection = redis::aio::ConnectionManager::new_with_config(client, config).await?;
        let (queue, pending) = tokio::sync::mpsc::unbounded_channel();
        let paced = paced && pacing::hooked() && timeout >= PACED_TIMEOUT;
        tokio::spawn(run_batches(connection, timeout, paced, pending));
        Ok(Self {
            queue,
            failures: AtomicU32::new(0),
            open_until_ms: AtomicI64::new(0),
            paced,
        })
    }

    /// Decides one request; when Redis is unavailable (error, timeout, breaker open), gives
    /// its checks back (empty if they were lost with the batching task).
    pub async fn decide(&self, checks: Vec<Check>, now_ms: i64) -> Result<Decision, Vec<Check>> {
        if self.open_until_ms.load(Ordering::Relaxed) > now_ms {
            return Err(checks);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = Pending {
            queued: std::time::Instant::now(),
            now_ms,
            checks,
            reply,
        };
        // No timer here: the batching task answers every request within two timeouts (the
        // wait for its batch, then its call), and an answer that comes is the decision Redis
        // made and counted.
        let stopped = || "the batching task stopped".to_string();
        let result = match self.queue.send(pending) {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err((stopped(), Vec::new()))),
            Err(unsent) => Err((stopped(), unsent.0.checks)),
        };
        match result {
            Ok(decision) => {
                let failed = self.failures.swap(0, Ordering::Relaxed);
                if failed > 0 {
                    tracing::info!(failed, "rate-limit store available again");
                }
                Ok(decision)
            }
            Err((error, checks)) => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                self.open_until_ms
                    .store(now_ms + BREAKER_OPEN_MS, Ordering::Relaxed);
                if failures == 1 {
                    tracing::warn!(%error, "rate-limit store unavailable");
                }
                Err(checks)
            }
        }
    }
}

/// The batching task: takes whatever requests are queued (up to [`MAX_BATCH`]), decides them
/// in one script call, answers each, then, after a busy call, waits for the runtime to go idle
/// (see [`pacing`]) or else yields twice, and repeats. Ends when the limiter is dropped.
async fn run_batches(
    mut connection: redis::aio::ConnectionManager,
    timeout: Duration,
    paced: bool,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Pending>,
) {
    let script = redis::Script::new(include_str!("limiter.lua"));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Rings at or before the deadline of the call in flight. Moved only when it has rung (or
    // would ring after the call's deadline): under load about once per timeout, not per call.
    let alarm = tokio::time::sleep(timeout);
    tokio::pin!(alarm);
    // The same for the waits before calls (see `pacing`).
    let hold_alarm = tokio::time::sleep(pacing::HOLD);
    tokio::pin!(hold_alarm);
    // The wait before the next call: until when, and slow waits in a row (waits stop after
    // a few), or when to try again.
    let mut hold_until = None;
    let mut slow_waits = 0;
    let mut try_again = tokio::time::Instant::now();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // (A request that comes after the longest wait has passed, the data plane having been
        // quiet, goes at once: that is no slow wait.)
        if let Some(until) = hold_until.take()
            && tokio::time::Instant::now() < until
        {
            let started = tokio::time::Instant::now();
            let idle = wait_for_idle(&mut queue, &mut batch, until, hold_alarm.as_mut()).await;
            let fast = idle && started.elapsed() <= pacing::FAST;
            pacing::count_wait(!fast);
            if fast {
                slow_waits = 0;
            } else {
                slow_waits += 1;
                if slow_waits >= pacing::SLOW_WAITS {
                    try_again = tokio::time::Instant::now() + pacing::PROBE;
                }
            }
        }
        // A request whose caller is gone (its client left) is not counted. One that waited
        // longer than the timeout for its batch (Redis slow, or a backlog of several batches)
        // follows its failure policy rather than wait for another call.
        let started = std::time::Instant::now();
        let stale = |pending: &mut Pending| {
            pending.reply.is_closed() || started.saturating_duration_since(pending.queued) > timeout
        };
        for pending in batch.extract_if(.., stale) {
            pending.fail(format!("waited over {timeout:?} for a batch"));
        }
        if batch.is_empty() {
            continue;
        }
        let (invocation, groups) = invocation(&script, &batch);
        let deadline = tokio::time::Instant::now() + timeout;
        if alarm.is_elapsed() || alarm.deadline() > deadline {
            alarm.as_mut().reset(deadline);
        }
        let call = invocation.invoke_async::<Vec<i64>>(&mut connection);
        tokio::pin!(call);
        let result = loop {
            tokio::select! {
                biased;
                answer = &mut call => break answer.map_err(|error| error.to_string()),
                () = &mut alarm => {
                    if tokio::time::Instant::now() >= deadline {
                        break Err(format!("no answer within {timeout:?}"));
                    }
                    // It rang for an earlier call: now for this one.
                    alarm.as_mut().reset(deadline);
                }
            }
        };
        let busy = batch.len() >= pacing::BUSY_BATCH;
        match result {
            Ok(values) => answer_groups(&mut batch, &groups, &values),
            Err(error) => {
                for pending in batch.drain(..) {
                    pending.fail(error.clone());
                }
            }
        }
        let answered = tokio::time::Instant::now();
        if paced && busy && (slow_waits < pacing::SLOW_WAITS || answered >= try_again) {
            if answered >= try_again {
                // Trying again: one more slow wait stops them for another while.
                slow_waits = slow_waits.min(pacing::SLOW_WAITS - 1);
            }
            // The next call waits for the runtime to go idle (see `pacing`).
            hold_until = Some(answered + pacing::HOLD);
            continue;
        }
        // Without that wait: let the requests just answered, and those whose data has arrived,
        // run before the next call: they forward to their upstreams now (rather than each
        // being preempted by Redis waking for the next call), and the ones that reach their
        // limits join the next batch. Two passes of the scheduler (each also polls for I/O): the first runs the
        // answered requests, the second the requests their traffic let in. Idle, this costs
        // two passes; under load, batches grow (bench: 0.056 → 0.036 script calls per request)
        // and the upstream is woken less often. (More passes while the queue kept growing, up
        // to 4 and later up to 6, measured no better.)
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
    }
}

/// Waits until the runtime is about to park with no request admitted by Redis still waiting
/// for its upstream, or until `until`, taking queued requests into `batch` meanwhile (it goes
/// at once when full). Returns whether the runtime went idle (or the batch filled) first.
async fn wait_for_idle(
    queue: &mut tokio::sync::mpsc::UnboundedReceiver<Pending>,
    batch: &mut Vec<Pending>,
    until: tokio::time::Instant,
    mut alarm: std::pin::Pin<&mut tokio::time::Sleep>,
) -> bool {
    let take_queued = |queue: &mut tokio::sync::mpsc::UnboundedReceiver<Pending>,
                       batch: &mut Vec<Pending>| {
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
    };
    let waiting = pacing::Waiting::start();
    loop {
        // Registered before looking at the queue: a signal from now on is not lost.
        let idle = waiting.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        take_queued(queue, batch);
        if batch.len() >= MAX_BATCH {
            return true;
        }
        // Rings at or before `until` (moved only when it has rung, as the call's alarm).
        if alarm.is_elapsed() || alarm.deadline() > until {
            alarm.as_mut().reset(until);
        }
        tokio::select! {
            biased;
            () = &mut idle => {
                take_queued(queue, batch);
                return true;
            }
            () = alarm.as_mut() => {
                if tokio::time::Instant::now() >= until {
                    take_queued(queue, batch);
                    return false;
                }
            }
        }
    }
}

/// The script call for `batch`: its distinct limits once each (with their keys), then its
/// requests as groups (see `limiter.lua`): runs of consecutive requests with the same limits,
/// each sent as its time, size and the indexes of its limits. Also returns the size and number
/// of limits of each group, to split the answer.
///
/// Every group gets the same time: the batch's latest arrival. A request is decided at the
/// time its batch is decided, at most one call cycle after it arrived (one that waited longer
/// than the timeout was answered by its policy instead), and admissions are recorded at that
/// time, so no window ever holds more than its limit. One time per batch is what makes the
/// script's work one read and one write per key per call: with each request's own time, a
/// batch spanning several milliseconds read and wrote each key once per millisecond (bench:
/// 1.5 per call).
fn invocation<'a>(
    script: &'a redis::Script,
    batch: &[Pending],
) -> (redis::ScriptInvocation<'a>, Vec<usize>) {
    let now = batch
        .iter()
        .map(|pending| pending.now_ms)
        .max()
        .unwrap_or(0);
    // foldhash, not SipHash: the map lives for one batch and holds a few hundred entries at
    // most (MAX_BATCH requests times their limits), so even keys chosen to collide cost no
    // more than a linear search over its entries.
    let mut distinct: HashMap<LimitArgs, usize, foldhash::fast::RandomState> = HashMap::default();
    let mut order: Vec<LimitArgs> = Vec::new();
    // Per group: size, and its limits' indexes in `indexes`.
    let mut groups: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    let mut indexes: Vec<usize> = Vec::new();
    for pending in batch {
        let start = indexes.len();
        for check in &pending.checks {
            let limit = limit_args(check, pending.now_ms);
            let index = *distinct.entry(limit).or_insert_with(|| {
                order.push(limit);
                order.len()
            });
            indexes.push(index);
        }
        match groups.last_mut() {
            Some((size, range)) if indexes[range.clone()] == indexes[start..] => {
                *size += 1;
                indexes.truncate(start);
            }
            _ => groups.push((1, start..indexes.len())),
        }
    }
    let mut invocation = script.prepare_invoke();
    invocation.arg(order.len());
    for &(key, kind, limit, span) in &order {
        invocation.arg(kind).arg(limit).arg(span);
        if kind == 1 {
            invocation.key(&limits::window_keys(key)[..]);
        } else {
            invocation.key(key);
        }
    }
    invocation.arg(groups.len());
    for (size, range) in &groups {
        invocation.arg(now).arg(*size).arg(range.len());
        invocation.arg(&indexes[range.clone()]);
    }
    let sizes = groups.iter().map(|(size, _)| *size).collect();
    (invocation, sizes)
}

/// Answers each request of `batch` from the script's per-group `values`: of a group of `size`
/// requests with n limits, whose answer is `{k, count_1, retry_1, ..., count_n, retry_n}`,
/// the first k are admitted, the j-th (from 0) having seen `count - k + j + 1` for each
/// limit, and the rest are refused at `count`.
fn answer_groups(batch: &mut Vec<Pending>, sizes: &[usize], values: &[i64]) {
    let mut requests = batch.drain(..);
    let mut offset = 0;
    for &size in sizes {
        for j in 0..size {
            let Some(pending) = requests.next() else {
                return;
            };
            // Every request of a group has the same limits.
            let limits = pending.checks.len();
            let decision = values
                .get(offset..offset + 1 + 2 * limits)
                .and_then(|answer| decide_in_group(&pending.checks, answer, j, pending.now_ms));
            match decision {
                Some(decision) => {
                    let _ = pending.reply.send(Ok(decision));
                }
                None => pending.fail("short answer from the script".to_string()),
            }
            if j + 1 == size {
                offset += 1 + 2 * limits;
            }
        }
    }
    for pending in requests {
        pending.fail("short answer from the script".to_string());
    }
}

/// The decision for the `j`-th request (from 0) of a group whose script answer is `answer`
/// (see [`answer_groups`]); `None` when the answer is malformed.
fn decide_in_group(checks: &[Check], answer: &[i64], j: usize, now_ms: i64) -> Option<Decision> {
    let (&admitted, per_limit) = answer.split_first()?;
    let admitted = usize::try_from(admitted).ok()?;
    let is_admitted = j < admitted;
    // Admissions of the group after this request's.
    let after = i64::try_from(admitted.saturating_sub(j + 1)).ok()?;
    let mut usages = Vec::with_capacity(checks.len());
    for (check, pair) in checks.iter().zip(per_limit.chunks_exact(2)) {
        let (count, retry) = if is_admitted {
            (pair[0] - after, -1)
        } else {
            (pair[0], pair[1])
        };
        usages.push(Usage {
            limit: check.limit,
            count: u64::try_from(count).unwrap_or(0),
            // The script names the time only for a window that refused; otherwise it is the
            // window's length or the time left in the period.
            reset_ms: match check.span {
                _ if retry >= 0 => retry,
                Span::Window(window) => window,
                Span::Quota(period) => period_end(period, now_ms).0 - now_ms,
            },
            is_quota: check.is_quota,
        });
    }
    if usages.len() != checks.len() {
        return None;
    }
    if is_admitted {
        return Some(Decision::Admitted(usages));
    }
    let index = usages.iter().position(|u| u.count >= u.limit).unwrap_or(0);
    Some(Decision::Limited(usages, index))
}

/// The node's limiter: Redis when configured (with failure policies), memory otherwise.
pub struct Limiter {
    /// Prefix and hash tag of every key.
    pub prefix: String,
    /// Whether a Redis URL was configured (then memory is only the `local` fallback).
    pub redis_configured: bool,
    /// The Redis limiter, once connected.
    pub redis: arc_swap::ArcSwapOption<RedisLimiter>,
    /// In-memory counters.
    pub memory: MemoryLimiter,
    /// Live data planes, as the control plane last reported (for `local`).
    pub live_nodes: AtomicU64,
    /// Requests decided by a failure policy.
    pub degraded: AtomicU64,
}

impl Limiter {
    /// A limiter; Redis is attached later by [`Limiter::connect`].
    pub fn new(prefix: String, redis_configured: bool) -> Self {
        Self {
            prefix,
            redis_configured,
            redis: arc_swap::ArcSwapOption::empty(),
            memory: MemoryLimiter::default(),
            live_nodes: AtomicU64::new(1),
            degraded: AtomicU64::new(0),
        }
    }

    /// Connects to Redis, retrying every second until it answers (limits follow their failure
    /// policies meanwhile) or `cancel` fires.
    pub async fn connect(
        &self,
        url: &str,
        timeout: Duration,
        pacing: pacing::Mode,
        cancel: &tokio_util::sync::CancellationToken,
    ) {
        let paced = pacing.paces(url);
        loop {
            match RedisLimiter::connect_paced(url, timeout, paced).await {
                Ok(redis) => {
                    tracing::info!(paced, "rate limits and quotas are shared through Redis");
                    self.redis.store(Some(std::sync::Arc::new(redis)));
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot reach Redis yet; limits follow their failure policies")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    /// Decides a request: one Redis round trip, or memory; failure policies when Redis fails.
    /// A request Redis admitted also gets a guard to hold until its upstream answers (see
    /// [`pacing`](crate::pacing)).
    pub async fn decide(&self, checks: Vec<Check>, now_ms: i64) -> (Decision, Option<Admitted>) {
        if !self.redis_configured {
            return (self.memory.decide(&checks, now_ms, 1), None);
        }
        // Known before the checks go to Redis (they come back when Redis fails, unless they
        // were lost with the batching task).
        let fail_closed = checks.iter().any(|c| c.policy == FailurePolicy::FailClosed);
        let redis = self.redis.load_full();
        let checks = match redis {
            Some(redis) => match redis.decide(checks, now_ms).await {
                Ok(decision) => {
                    let admitted = (redis.paced && matches!(decision, Decision::Admitted(_)))
                        .then(Admitted::new);
                    return (decision, admitted);
                }
                Err(checks) => checks,
            },
            None => checks,
        };
        self.degraded.fetch_add(1, Ordering::Relaxed);
        if fail_closed {
            return (Decision::Unavailable, None);
        }
        let local: Vec<Check> = checks
            .into_iter()
            .filter(|c| c.policy == FailurePolicy::Local)
            .collect();
        if local.is_empty() {
            return (Decision::Admitted(Vec::new()), None);
        }
        let decision = self
            .memory
            .decide(&local, now_ms, self.live_nodes.load(Ordering::Relaxed));
        (decision, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A limiter on the machine's Redis and a window key no other test uses.
    async fn window_limiter() -> (RedisLimiter, String) {
        let redis = RedisLimiter::connect("redis://127.0.0.1:6379/0", Duration::from_secs(5))
            .await
            .expect("the machine's Redis on 127.0.0.1:6379");
        (redis, format!("{{tgunit-{:x}}}:w", rand::random::<u64>()))
    }

    /// A plain connection to the machine's Redis, to look at and clean up keys.
    async fn machine_redis() -> redis::aio::MultiplexedConnection {
        redis::Client::open("redis://127.0.0.1:6379/0")
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("the machine's Redis on 127.0.0.1:6379")
    }

    /// Deletes a test's keys from the machine's Redis.
    async fn delete_keys(keys: &[String]) {
        let _: Result<i64, _> = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut machine_redis().await)
            .await;
    }

    fn check(key: &str, limit: u64, span: Span) -> Check {
        Check {
            key: key.into(),
            limit,
            span,
            policy: FailurePolicy::FailOpen,
            is_quota: matches!(span, Span::Quota(_)),
        }
    }

    #[test]
    fn memory_window_is_exact_and_refusals_consume_nothing() {
        let limiter = MemoryLimiter::default();
        let checks = [
            check("w", 3, Span::Window(1000)),
            check("q", 5, Span::Quota(QuotaPeriod::Day)),
        ];
        let admitted = (0..10)
            .filter(|i| {
                matches!(
                    limiter.decide(&checks, 10_000 + i, 1),
                    Decision::Admitted(_)
                )
            })
            .count();
        assert_eq!(admitted, 3);
        // The window slides: one second after the first admission, one slot frees.
        assert!(matches!(
            limiter.decide(&checks, 11_000, 1),
            Decision::Admitted(_)
        ));
        assert!(matches!(
            limiter.decide(&checks, 11_001, 1),
            Decision::Admitted(_)
        ));
        // The quota (5) counted only admitted requests: 5 now, so the next is refused by it.
        match limiter.decide(&checks, 13_000, 1) {
            Decision::Limited(usages, index) => {
                assert_eq!(index, 1);
                assert_eq!(usages[1].count, 5);
            }
            other => panic!("expected the quota to refuse: {other:?}"),
        }
    }

    /// Many requests decided in one script call, on the machine's Redis: the batch decides
    /// exactly as one call per request would (counts 1..=limit, then refusals that consume
    /// nothing), across a change of time within the batch and for quotas.
    #[tokio::test]
    async fn batched_decisions_match_one_call_per_request() {
        let redis = RedisLimiter::connect("redis://127.0.0.1:6379/0", Duration::from_secs(2))
            .await
            .expect("the machine's Redis on 127.0.0.1:6379");
        let prefix = format!("{{tgunit-{:x}}}", rand::random::<u64>());
        let window = check(&format!("{prefix}:w"), 10, Span::Window(1_000));
        let quota = check(&format!("{prefix}:q"), 3, Span::Quota(QuotaPeriod::Day));
        let t0 = 1_900_000_000_000;
        let decide = |checks: Vec<Check>, now: i64, _: usize| {
            let redis = &redis;
            async move { redis.decide(checks, now).await.expect("Redis answers") }
        };

        // 30 requests queued together (one batch), the second half a millisecond later: all
        // decided at the batch's latest arrival, t0 + 1.
        let decisions = futures_util::future::join_all(
            (0..30).map(|i| decide(vec![window.clone()], t0 + (i / 15) as i64, i)),
        )
        .await;
        // Decided in order (one group of identical requests): the first ten admitted, each
        // seeing its own count; the rest refused at 10 until t0 + 1 leaves the window.
        let seen: Vec<(bool, u64, i64)> = decisions
            .iter()
            .map(|d| match d {
                Decision::Admitted(usages) => (true, usages[0].count, usages[0].reset_ms),
                Decision::Limited(usages, _) => (false, usages[0].count, usages[0].reset_ms),
                Decision::Unavailable => panic!("Redis answers"),
            })
            .collect();
        let expected: Vec<(bool, u64, i64)> = (0..30)
            .map(|i| match i {
                0..10 => (true, i + 1, 1_000),
                _ => (false, 10, 1_000),
            })
            .collect();
        assert_eq!(seen, expected);
        // Refused half a window later: a slot frees when the oldest (t0 + 1) leaves.
        match decide(vec![window.clone()], t0 + 500, 100).await {
            Decision::Limited(usages, 0) => {
                assert_eq!((usages[0].count, usages[0].reset_ms), (10, 501));
            }
            other => panic!("expected a refusal: {other:?}"),
        }
        // A window after t0 + 1 the first ten have left; refusals consumed nothing.
        match decide(vec![window.clone()], t0 + 1_001, 101).await {
            Decision::Admitted(usages) => assert_eq!(usages[0].count, 1),
            other => panic!("expected an admission: {other:?}"),
        }

        // Runs of different limits are not merged: window-only, both, window-only again, in
        // order. The quota admits 3 of the 4 that carry it; the window counts every admission.
        let other = check(&format!("{prefix}:w2"), 100, Span::Window(1_000));
        let mixed: Vec<Vec<Check>> = (0..9)
            .map(|i| match i {
                0..3 | 7..9 => vec![other.clone()],
                _ => vec![other.clone(), quota.clone()],
            })
            .collect();
        let decisions = futures_util::future::join_all(
            mixed
                .into_iter()
                .enumerate()
                .map(|(i, checks)| decide(checks, t0 + 1_500, 150 + i)),
        )
        .await;
        let seen: Vec<(bool, u64)> = decisions
            .iter()
            .map(|d| match d {
                Decision::Admitted(usages) => (true, usages[0].count),
                Decision::Limited(usages, index) => (false, usages[*index].count),
                Decision::Unavailable => panic!("Redis answers"),
            })
            .collect();
        assert_eq!(
            seen,
            [
                (true, 1),
                (true, 2),
                (true, 3),
                (true, 4),
                (true, 5),
                (true, 6),
                (false, 3),
                (true, 7),
                (true, 8)
            ]
        );
        let [times, counts] = limits::window_keys(&format!("{prefix}:w2"));
        delete_keys(&[times, counts, format!("{prefix}:q")]).await;

        // Quota and window together: all or nothing, in one batch.
        let both = vec![window.clone(), quota.clone()];
        let decisions = futures_util::future::join_all(
            (0..6).map(|i| decide(both.clone(), t0 + 2_000, 200 + i)),
        )
        .await;
        let admitted = decisions
            .iter()
            .filter(|d| matches!(d, Decision::Admitted(_)))
            .count();
        assert_eq!(admitted, 3, "the quota of 3 decides");
        match decide(vec![window], t0 + 2_001, 300).await {
            // The one of t0 + 1001 has just left; 3 admitted with the quota + this one.
            Decision::Admitted(usages) => assert_eq!(usages[0].count, 4),
            other => panic!("expected an admission: {other:?}"),
        }
        let [times, counts] = limits::window_keys(&format!("{prefix}:w"));
        delete_keys(&[times, counts, format!("{prefix}:q")]).await;
    }

    /// Admissions are counted per millisecond: thousands of distinct milliseconds leave the
    /// window together (removed in chunks), the total stays exact, and the control plane's
    /// read-only count agrees.
    #[tokio::test]
    async fn window_buckets_expire_exactly_in_chunks() {
        let (redis, key) = window_limiter().await;
        let window = check(&key, 5_000, Span::Window(10_000));
        let t0 = 1_900_000_000_000;
        // 2500 admissions on 2500 distinct milliseconds, two per millisecond for the first 10.
        // One at a time: requests queued together are decided at their batch's latest time.
        let times: Vec<i64> = (0..2_500).chain(0..10).map(|i| t0 + i).collect();
        let mut counts = Vec::new();
        for now in times {
            match redis.decide(vec![window.clone()], now).await {
                Ok(Decision::Admitted(usages)) => counts.push(usages[0].count),
                other => panic!("expected an admission: {other:?}"),
            }
        }
        counts.sort_unstable();
        assert_eq!(counts, (1..=2_510).collect::<Vec<_>>());

        // At t0 + 12000 the milliseconds up to t0 + 2000 have left: 2001 of them (1000 per
        // chunk), holding 2011 admissions. 499 remain, and this request makes 500.
        let later = t0 + 12_000;
        match redis.decide(vec![window.clone()], later).await {
            Ok(Decision::Admitted(usages)) => assert_eq!(usages[0].count, 500),
            other => panic!("expected an admission: {other:?}"),
        }
        let mut connection = machine_redis().await;
        let [times_key, counts_key] = limits::window_keys(&key);
        let live: i64 = redis::Script::new(limits::WINDOW_COUNT_SCRIPT)
            .key(&times_key)
            .key(&counts_key)
            .arg(later - 10_000)
            .invoke_async(&mut connection)
            .await
            .expect("count");
        assert_eq!(live, 500);
        let stored: (i64, i64, i64) = redis::pipe()
            .cmd("ZCARD")
            .arg(&times_key)
            .cmd("HLEN")
            .arg(&counts_key)
            .cmd("HGET")
            .arg(&counts_key)
            .arg("t")
            .query_async(&mut connection)
            .await
            .expect("stored");
        // 500 live milliseconds (the last one counts the new request), their counts, `t`, `x`.
        assert_eq!(stored, (500, 502, 500));
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&counts_key)
            .query_async(&mut connection)
            .await
            .expect("ttl");
        // The window (10 s) plus two slacks of 10 s.
        assert!(ttl > 0 && ttl <= 30_000, "{ttl}");
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .expect("exists");
        assert_eq!(exists, 0, "the earlier layout's key is never written");
        delete_keys(&[times_key, counts_key]).await;
    }

    /// A window's keys get its length plus two slacks (slack = the length, at most 10 s) and
    /// the hash notes the time they live until (`x`); the expiry moves only when the latest
    /// admission + length + one slack is past it, at once when the length grows, and a window
    /// whose admissions have all left starts afresh with both keys expiring again.
    #[tokio::test]
    async fn window_expiry_moves_only_past_the_covered_time() {
        let (redis, key) = window_limiter().await;
        let t0 = 1_900_000_000_000;
        let mut connection = machine_redis().await;
        let [times_key, counts_key] = limits::window_keys(&key);
        let mut look = connection.clone();
        let mut state = async |now: i64, window_ms: i64| {
            let window = check(&key, 1_000, Span::Window(window_ms));
            let decision = redis.decide(vec![window.clone()], now).await;
            assert!(
                matches!(decision, Ok(Decision::Admitted(_))),
                "{decision:?}"
            );
            let state: (i64, i64, Option<i64>) = redis::pipe()
                .cmd("PTTL")
                .arg(&times_key)
                .cmd("PTTL")
                .arg(&counts_key)
                .cmd("HGET")
                .arg(&counts_key)
                .arg("x")
                .query_async(&mut connection)
                .await
                .expect("state");
            assert!(state.0 > 0 && state.1 > 0, "both keys expire: {state:?}");
            state
        };
        // A 2 s window: 2 s + 2 x 2 s.
        let (ttl, counts_ttl, covered) = state(t0, 2_000).await;
        assert!(ttl > 5_000 && ttl <= 6_000, "{ttl}");
        assert!(counts_ttl > 5_000 && counts_ttl <= 6_000, "{counts_ttl}");
        assert_eq!(covered, Some(t0 + 6_000));
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Covered (t0 + 1000 + 2000 + 2000 <= x): the expiry stays where it was.
        let (ttl, _, covered) = state(t0 + 1_000, 2_000).await;
        assert!(ttl <= 5_700, "not moved: {ttl}");
        assert_eq!(covered, Some(t0 + 6_000));
        // Past it (t0 + 2001 + 4000 > x): moved again, both keys. t0 has left, t0 + 1000 not.
        let (ttl, counts_ttl, covered) = state(t0 + 2_001, 2_000).await;
        assert!(
            ttl > 5_700 && counts_ttl > 5_700,
            "moved: {ttl} {counts_ttl}"
        );
        assert_eq!(covered, Some(t0 + 8_001));
        // Everything has left: the window starts afresh, both keys with their expiry.
        let (ttl, counts_ttl, covered) = state(t0 + 10_000, 2_000).await;
        assert!(ttl > 5_000 && counts_ttl > 5_000, "{ttl} {counts_ttl}");
        assert_eq!(covered, Some(t0 + 16_000));
        let stored: (i64, i64) = redis::pipe()
            .cmd("ZCARD")
            .arg(&times_key)
            .cmd("HLEN")
            .arg(&counts_key)
            .query_async(&mut look)
            .await
            .expect("stored");
        assert_eq!(stored, (1, 3), "one millisecond, its count, `t` and `x`");
        // The window grows to 4 s (the same key): covered only until t0 + 16 000, so it moves
        // at once, to 4 s + 2 x 4 s.
        let (ttl, counts_ttl, covered) = state(t0 + 10_001, 4_000).await;
        assert!(ttl > 11_000 && counts_ttl > 11_000, "{ttl} {counts_ttl}");
        assert_eq!(covered, Some(t0 + 22_001));
        delete_keys(&[times_key.clone(), counts_key.clone()]).await;
    }

    /// Pruning is bounded per call (8000 milliseconds): what is left still counts (fewer
    /// admitted, never more) until a later call drops it; a window whose every millisecond
    /// expired starts afresh at once.
    #[tokio::test]
    async fn window_pruning_is_bounded_and_conservative() {
        let (redis, key) = window_limiter().await;
        let window = check(&key, 20_000, Span::Window(20_000));
        let t0 = 1_900_000_000_000;
        let one = |now: i64| {
            let (redis, window) = (&redis, &window);
            async move {
                match redis.decide(vec![window.clone()], now).await {
                    Ok(Decision::Admitted(usages)) => usages[0].count,
                    other => panic!("expected an admission: {other:?}"),
                }
            }
        };
        // One admission on each of 10 000 milliseconds, written as the script writes them (one
        // request at a time would take 10 000 calls: requests queued together are decided at
        // their batch's latest time); the first decision below checks the count.
        let mut connection = machine_redis().await;
        let [times_key, counts_key] = limits::window_keys(&key);
        let mut times = redis::cmd("ZADD");
        let mut counts = redis::cmd("HSET");
        times.arg(&times_key);
        counts.arg(&counts_key).arg("t").arg(9_999);
        for now in (0..9_999).map(|i| t0 + i) {
            times.arg(now).arg(now);
            counts.arg(now).arg(1);
        }
        // Expiring, in case the test fails before it cleans up.
        let _: () = redis::pipe()
            .add_command(times)
            .add_command(counts)
            .cmd("PEXPIRE")
            .arg(&times_key)
            .arg(60_000)
            .cmd("PEXPIRE")
            .arg(&counts_key)
            .arg(60_000)
            .query_async(&mut connection)
            .await
            .expect("seed");
        assert_eq!(one(t0 + 9_999).await, 10_000);
        // 9001 milliseconds have left; 8000 are dropped now and the other 1001 still count.
        assert_eq!(one(t0 + 29_000).await, 10_000 - 8_000 + 1);
        // The control plane's read subtracts what is not dropped yet (up to 8000 milliseconds,
        // here all 1001): exact.
        let read = |after: i64| {
            let mut connection = connection.clone();
            let keys = [times_key.clone(), counts_key.clone()];
            async move {
                redis::Script::new(limits::WINDOW_COUNT_SCRIPT)
                    .key(&keys[..])
                    .arg(after)
                    .invoke_async::<i64>(&mut connection)
                    .await
                    .expect("count")
            }
        };
        assert_eq!(read(t0 + 9_000).await, 1_000);
        // The next call drops the rest (9002 by then): 998 left + the two new ones.
        assert_eq!(one(t0 + 29_001).await, 1_000);
        assert_eq!(read(t0 + 200_000).await, 0, "all of it has left");
        // Long after, everything has left: a fresh window.
        assert_eq!(one(t0 + 100_000).await, 1);
        let stored: (i64, i64) = redis::pipe()
            .cmd("ZCARD")
            .arg(&times_key)
            .cmd("HLEN")
            .arg(&counts_key)
            .query_async(&mut connection)
            .await
            .expect("stored");
        assert_eq!(
            stored,
            (1, 3),
            "one millisecond, its count, the total and `x`"
        );
        delete_keys(&[times_key, counts_key]).await;
    }

    /// A redis-server of the test's own (on a free port), stopped with SIGSTOP: the connection
    /// stays open and nothing answers, so only the limiter's own timer ends a call. Each call
    /// to a stalled Redis ends within about the timeout (the first, and one after the breaker
    /// let a probe through, when the timer has rung for an earlier call), and decisions come
    /// from Redis again once it runs.
    #[tokio::test]
    async fn a_stalled_redis_times_out_every_call_and_recovers() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        /// Kills the server however the test ends.
        struct Server(std::process::Child);
        impl Drop for Server {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let server = Server(
            std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (on the machine; see README)"),
        );
        let signal = |name: &str| {
            let sent = std::process::Command::new("kill")
                .args([name, &server.0.id().to_string()])
                .status()
                .expect("kill");
            assert!(sent.success(), "kill {name}");
        };
        let url = format!("redis://127.0.0.1:{port}/0");
        let timeout = Duration::from_millis(100);
        let mut redis = None;
        for _ in 0..100 {
            if let Ok(connected) = RedisLimiter::connect(&url, timeout).await {
                redis = Some(connected);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let redis = redis.expect("the test's redis-server answers");
        let checks = || vec![check("{tgunit}:stall", 100, Span::Window(60_000))];
        let now = || {
            let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            since.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        // Asks until Redis decides (each failure opens the breaker for a second).
        let decided = || async {
            let mut answer = redis.decide(checks(), now()).await;
            for _ in 0..10 {
                if answer.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1_100)).await;
                answer = redis.decide(checks(), now()).await;
            }
            answer
        };
        // Running: decided by Redis (the first call also loads the script).
        let first = decided().await;
        assert!(matches!(first, Ok(Decision::Admitted(_))), "{first:?}");

        signal("-STOP");
        for round in 0..2 {
            let started = std::time::Instant::now();
            let stalled = redis.decide(checks(), now()).await;
            let took = started.elapsed();
            assert!(stalled.is_err(), "round {round}: {stalled:?}");
            assert!(
                took >= timeout && took < Duration::from_secs(1),
                "round {round}: answered after {took:?}"
            );
            // The breaker is open: no call at all.
            let started = std::time::Instant::now();
            assert!(redis.decide(checks(), now()).await.is_err());
            assert!(started.elapsed() < timeout, "the open breaker skips Redis");
            tokio::time::sleep(Duration::from_millis(1_100)).await;
        }

        signal("-CONT");
        let recovered = decided().await;
        // The stalled calls ran when Redis did (counted there, answered here by the policy).
        match recovered {
            Ok(Decision::Admitted(usages)) => assert!(usages[0].count >= 2, "{usages:?}"),
            other => panic!("Redis decides again: {other:?}"),
        }
    }

    /// On a runtime with the pacing hook (as the `tollgate` binary runs the data plane): after
    /// a busy call, the next one waits while requests it admitted are still with their
    /// upstreams (their guards alive), and goes once they have answered and the runtime is
    /// idle; with the guards kept, it goes after the longest wait. Decisions stay Redis's.
    #[test]
    fn after_a_busy_call_the_next_waits_for_admitted_requests_upstreams() {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_all();
        pacing::install(&mut builder);
        let runtime = builder.build().expect("runtime");
        runtime.block_on(async {
            let redis = RedisLimiter::connect_paced(
                "redis://127.0.0.1:6379/0",
                Duration::from_secs(2),
                true,
            )
            .await
            .expect("the machine's Redis on 127.0.0.1:6379");
            let limiter = std::sync::Arc::new(Limiter::new("unused".into(), true));
            limiter.redis.store(Some(std::sync::Arc::new(redis)));
            let key = format!("{{tgunit-{:x}}}:paced", rand::random::<u64>());
            let checks = vec![check(&key, 1_000, Span::Window(60_000))];
            let now = 1_900_000_000_000;
            // A busy call: more requests than `BUSY_BATCH`, queued before the batching task
            // runs. Their guards stand for requests still with their upstreams.
            let busy = |count: usize| {
                let tasks: Vec<_> = (0..count)
                    .map(|_| {
                        let (limiter, checks) = (limiter.clone(), checks.clone());
                        tokio::spawn(async move { limiter.decide(checks, now).await })
                    })
                    .collect();
                async move {
                    let mut guards = Vec::new();
                    for task in tasks {
                        let (decision, guard) = task.await.expect("task");
                        assert!(matches!(decision, Decision::Admitted(_)), "{decision:?}");
                        guards.push(guard.expect("a Redis admission is counted"));
                    }
                    guards
                }
            };
            // The script is loaded by the first call.
            let warm = limiter.decide(checks.clone(), now).await;
            assert!(matches!(warm.0, Decision::Admitted(_)), "{warm:?}");
            drop(warm);

            // Guards kept: the next call waits the longest wait, then goes.
            let guards = busy(2 * pacing::BUSY_BATCH).await;
            let started = std::time::Instant::now();
            let (decision, _) = limiter.decide(checks.clone(), now).await;
            let waited = started.elapsed();
            assert!(matches!(decision, Decision::Admitted(_)), "{decision:?}");
            assert!(
                waited >= pacing::HOLD && waited < Duration::from_secs(1),
                "waited {waited:?}"
            );
            drop(guards);

            // Guards dropped later: the next call goes only after that.
            let guards = busy(2 * pacing::BUSY_BATCH).await;
            let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let next = {
                let (limiter, checks, dropped) = (limiter.clone(), checks.clone(), dropped.clone());
                tokio::spawn(async move {
                    let (decision, _) = limiter.decide(checks, now).await;
                    (decision, dropped.load(Ordering::SeqCst))
                })
            };
            // Yielding never parks the runtime: the waiting call cannot go.
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            dropped.store(true, Ordering::SeqCst);
            drop(guards);
            let (decision, after_drop) = next.await.expect("task");
            match decision {
                Decision::Admitted(usages) => {
                    assert_eq!(usages[0].count, 2 + 4 * pacing::BUSY_BATCH as u64 + 1);
                }
                other => panic!("{other:?}"),
            }
            assert!(
                after_drop,
                "the call went while admitted requests were upstream"
            );
            // Both waits counted (`/metrics`); the one cut at the longest wait as slow.
            let (waits, slow) = pacing::wait_counts();
            assert!(waits >= 2 && slow >= 1, "waits {waits}, slow {slow}");

            // A request after a quiet spell longer than the longest wait goes at once: no
            // wait, so no slow one either.
            drop(busy(2 * pacing::BUSY_BATCH).await);
            let counted = pacing::wait_counts();
            tokio::time::sleep(3 * pacing::HOLD).await;
            let (decision, _) = limiter.decide(checks.clone(), now).await;
            assert!(matches!(decision, Decision::Admitted(_)), "{decision:?}");
            assert_eq!(pacing::wait_counts(), counted);

            // A limiter whose calls are not paced counts nothing per request.
            let unpaced = Limiter::new("unused".into(), true);
            let redis = RedisLimiter::connect("redis://127.0.0.1:6379/0", Duration::from_secs(2))
                .await
                .expect("the machine's Redis on 127.0.0.1:6379");
            unpaced.redis.store(Some(std::sync::Arc::new(redis)));
            let (decision, guard) = unpaced.decide(checks.clone(), now).await;
            assert!(matches!(decision, Decision::Admitted(_)), "{decision:?}");
            assert!(guard.is_none(), "no guard without pacing");
            delete_keys(&limits::window_keys(&key)).await;
        });
    }

    #[test]
    fn memory_local_share_divides_the_limit() {
        let limiter = MemoryLimiter::default();
        let checks = [check("w", 10, Span::Window(1000))];
        let admitted = (0..20)
            .filter(|i| matches!(limiter.decide(&checks, 5_000 + i, 2), Decision::Admitted(_)))
            .count();
        assert_eq!(admitted, 5);
    }
}
