//! Header, idle, send and body timeouts for client connections, one timer per connection that
//! is only touched when it fires (hyper's HTTP/1 header-read timeout is off on the proxy
//! listener, see below). The header timeout covers:
//!
//! - the start of every connection, while the listener waits for its first bytes (a peek
//!   bounded by the same timeout) and hyper-util's auto builder, for a connection that may be
//!   HTTP/2, waits to learn which (up to 24 bytes: a client that sends a few bytes and stalls
//!   would otherwise hold the connection forever);
//! - HTTP/1 connections between requests: an idle keep-alive connection, or one sending its
//!   next head too slowly (slowloris), is closed once no request was in flight for longer than
//!   the timeout;
//! - HTTP/2 connections, whose requests are streams: one with no stream open for longer than
//!   the timeout is closed (its idle timeout), with a GOAWAY first.
//!
//! It also keeps the body timeout (HTTP/1: a read of a request body that waits longer for
//! the client to send closes the connection) and the send timeout, for both protocols: the
//! framing guard (`framing.rs`) notes when a write to the client has to wait and when one goes
//! through; a connection whose writes waited for longer than the send timeout (the client
//! stopped reading) is closed. The timer fires at least once per send timeout, so a stalled
//! client is cut after 1–2× it.
//!
//! For both protocols:
//!
//! - a request (an HTTP/2 stream) counts as in flight from the moment hyper hands it to the
//!   service until its response body is dropped (fully sent, or the stream is gone);
//! - when the last request in flight ends, the connection notes the time;
//! - when the timer fires it looks: requests in flight → check again one timeout later; idle
//!   for less than the timeout → sleep until the timeout is up; otherwise close.
//!
//! So a connection is closed between `timeout` and `timeout` + a few ms after its last
//! request ended (or after it was accepted). Per request this costs a few atomic updates and a
//! clock read; hyper's HTTP/1 header timer, which the proxy used before, made and dropped a
//! boxed timer per request: about 1 300 instructions per request (callgrind), 6% of a proxied
//! request. (A paired wall-clock A/B of an earlier watchdog for HTTP/1, which polled its timer
//! on every wake-up, had measured it 1–2% slower; instruction counts settle what this
//! machine's timings could not.)

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// What one client connection is doing, as far as the header timeout cares.
#[derive(Debug)]
pub struct Activity {
    accepted: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `accepted` when the last request in flight ended.
    idle_since_ms: AtomicU64,
    /// 0 while writes to the client go through; else 1 + the milliseconds after `accepted`
    /// when a write first had to wait for the client to read.
    write_blocked_ms: AtomicU64,
    /// The same for reads of a request body waiting for the client to send.
    read_blocked_ms: AtomicU64,
    /// Writes to the client that went through (only the connection's task writes).
    writes: AtomicU64,
}

/// What the watchdog does when its timer fires.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Look again at this instant.
    Recheck(Instant),
    /// Close the connection, for this reason.
    Close(Ended),
}

impl Activity {
    /// A connection accepted just now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(0),
            read_blocked_ms: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        })
    }

    /// Marks the start of a request; it lasts until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// A request starts (an HTTP/1 request or an HTTP/2 stream); the guard keeps it in flight.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.begin()
    }

    /// A write to the client had to wait (its receive window and our send buffer are full).
    pub fn write_pending(&self) {
        self.blocked(&self.write_blocked_ms);
    }

    /// A write to the client went through.
    pub fn write_progress(&self) {
        unblocked(&self.write_blocked_ms);
        // One writer (the connection's task): no read-modify-write needed.
        self.writes
            .store(self.writes.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// A read of a request body had to wait for the client to send.
    pub fn body_read_pending(&self) {
        self.blocked(&self.read_blocked_ms);
    }

    /// Bytes came from the client.
    pub fn read_progress(&self) {
        unblocked(&self.read_blocked_ms);
    }

    fn blocked(&self, since: &AtomicU64) {
        if since.load(Ordering::Relaxed) == 0 {
            let now = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
            since.store(now.saturating_add(1), Ordering::Release);
        }
    }

    /// When a wait noted in `since` runs out after `timeout`, if one is going on.
    fn stall_deadline(&self, since: &AtomicU64, timeout: Duration) -> Option<Instant> {
        match since.load(Ordering::Acquire) {
            0 => None,
            blocked => Some(self.accepted + Duration::from_millis(blocked - 1) + timeout),
        }
    }

    /// Writes to the client so far.
    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// No stream in flight, and no write since the count `writes_before` (an HTTP/2 stream
    /// leaves `in_flight` when its body has been handed to h2, which may still hold some of it
    /// until the client's flow-control window lets it out).
    fn quiet(&self, writes_before: u64) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.writes.load(Ordering::Relaxed) == writes_before
    }

    fn verdict(&self, now: Instant, timeouts: Timeouts) -> Verdict {
        let mut next = now + timeouts.send.min(timeouts.body);
        // Writes stalled (the client does not read what it asked for), or a body stalled (the
        // client does not send what it announced).
        for (since, timeout, why) in [
            (&self.write_blocked_ms, timeouts.send, Ended::SendTimeout),
            (&self.read_blocked_ms, timeouts.body, Ended::BodyTimeout),
        ] {
            if let Some(deadline) = self.stall_deadline(since, timeout) {
                if deadline <= now {
                    return Verdict::Close(why);
                }
                next = next.min(deadline);
            }
        }
        // Idle: before the protocol shows, and with no request (stream) in flight.
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Verdict::Recheck(next.min(now + timeouts.idle));
        }
        let idle_since =
            self.accepted + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        let deadline = idle_since + timeouts.idle;
        if deadline > now {
            Verdict::Recheck(next.min(deadline))
        } else {
            Verdict::Close(Ended::HeaderTimeout)
        }
    }
}

/// The watchdog's limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a new connection to show its protocol, and for an HTTP/2 one with no stream open.
    pub idle: Duration,
    /// For a stalled write to the client to make progress.
    pub send: Duration,
    /// For a stalled request body to make progress.
    pub body: Duration,
}

/// Clears a wait noted in `since`.
fn unblocked(since: &AtomicU64) {
    if since.load(Ordering::Relaxed) != 0 {
        since.store(0, Ordering::Release);
    }
}

/// A request in flight on a connection; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // The time is stored before the count drops, so a watchdog that sees no request in
        // flight also sees when the last one ended.
        let idle = u64::try_from(activity.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        // `fetch_max`: of two streams ending together, the later end counts.
        activity.idle_since_ms.fetch_max(idle, Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight (if tracked) until it is dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _in_flight: Option<InFlight>,
}

impl<B> Tracked<B> {
    /// Ties `body` to the request `in_flight`.
    pub fn new(body: B, in_flight: Option<InFlight>) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }

    /// The body itself.
    pub fn get_mut(&mut self) -> &mut B {
        &mut self.body
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Why a watched connection ended without an error of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The connection finished (closed by the client, or shut down).
    Done,
    /// No protocol shown, or no HTTP/2 stream open, within the timeout; shut down gracefully
    /// (GOAWAY), dropped if that does not finish soon.
    HeaderTimeout,
    /// The client read nothing of what was written to it within the send timeout; dropped.
    SendTimeout,
    /// The client sent nothing of a request body within the body timeout; dropped.
    BodyTimeout,
}

/// How long a connection closed gracefully (idle HTTP/2, server shutdown) gets to say GOAWAY
/// and finish before it is dropped, at most.
const GOODBYE: Duration = Duration::from_secs(1);

/// Drives `connection` until it finishes or the watchdog closes it, and shuts it down
/// gracefully (`shutdown`: GOAWAY for HTTP/2, no more keep-alive for HTTP/1) when `cancel`
/// fires; it then finishes its requests (the send and body timeouts still apply, and the
/// server stops waiting after its drain time). A connection idle past the timeout (no
/// protocol shown, or HTTP/2 with no stream open) is shut down gracefully too, so that an
/// HTTP/2 client learns that no stream was lost and that it may open a new connection; if it
/// has not finished by itself, it is dropped once a whole [`GOODBYE`] passed with no stream in
/// flight and nothing written to it after the GOAWAY (a client that does not answer the
/// GOAWAY's PING), and in any case once it has no stream in flight one more idle timeout
/// later (a client that keeps pinging instead). A stalled write or body drops it at once.
pub async fn watch<F, E>(
    connection: F,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    cancel: tokio_util::sync::CancellationToken,
    mut shutdown: impl FnMut(Pin<&mut F>),
) -> Result<Ended, E>
where
    F: Future<Output = Result<(), E>>,
{
    let mut connection = pin!(connection);
    let mut timer = pin!(tokio::time::sleep(
        timeouts.idle.min(timeouts.send).min(timeouts.body)
    ));
    // Polled once, which registers the task's waker with the token; afterwards a wake-up
    // looks at the token's flag only (polling the future again would take its lock).
    let mut cancelled = pin!(cancel.clone().cancelled_owned());
    let mut cancel_registered = false;
    let goodbye = GOODBYE.min(timeouts.idle);
    // Why the connection is being shut down gracefully, once it is: how it ends.
    let mut closing: Option<Ended> = None;
    // After the idle timeout's GOAWAY: the write count when the timer was last armed.
    let mut goodbye_from: Option<u64> = None;
    // ... and when the connection is dropped with no stream in flight even if written to (a
    // client that keeps pinging but never answers the GOAWAY's PING): one more idle timeout.
    let mut goodbye_until = Instant::now();
    // The timer is polled (which registers this task to be woken) when armed, and after
    // that only once it has fired: not on every wake-up of the connection, which is what
    // `select!` would do.
    let mut registered = false;
    std::future::poll_fn(|cx| {
        let stop = closing.is_none()
            && if cancel_registered {
                cancel.is_cancelled()
            } else {
                cancel_registered = true;
                cancelled.as_mut().poll(cx).is_ready()
            };
        if stop {
            closing = Some(Ended::Done);
            shutdown(connection.as_mut());
        }
        if let Poll::Ready(result) = connection.as_mut().poll(cx) {
            return Poll::Ready(result.map(|()| closing.unwrap_or(Ended::Done)));
        }
        loop {
            if registered && !timer.is_elapsed() {
                return Poll::Pending;
            }
            // Outside the task's cooperative budget: a Sleep polled with the budget spent
            // returns Pending without creating its timer, and would never fire.
            match Pin::new(&mut tokio::task::unconstrained(timer.as_mut())).poll(cx) {
                Poll::Pending => {
                    registered = true;
                    return Poll::Pending;
                }
                Poll::Ready(()) => {
                    let now = Instant::now();
                    if let Some(writes_before) = goodbye_from {
                        if activity.quiet(writes_before)
                            || (now >= goodbye_until && activity.quiet(activity.writes()))
                        {
                            return Poll::Ready(Ok(Ended::HeaderTimeout));
                        }
                        goodbye_from = Some(activity.writes());
                    }
                    match activity.verdict(now, timeouts) {
                        Verdict::Recheck(at) => {
                            let at = if goodbye_from.is_some() {
                                at.min(now + goodbye)
                            } else {
                                at
                            };
                            timer.as_mut().reset(at);
                            registered = false;
                        }
                        Verdict::Close(Ended::HeaderTimeout) if goodbye_from.is_some() => {
                            // Still idle after the GOAWAY, but written to lately: look again.
                            timer.as_mut().reset(now + goodbye);
                            registered = false;
                        }
                        Verdict::Close(Ended::HeaderTimeout) => {
                            if closing.is_none() {
                                shutdown(connection.as_mut());
                            }
                            closing = Some(Ended::HeaderTimeout);
                            goodbye_until = now + timeouts.idle;
                            timer.as_mut().reset(now + goodbye);
                            registered = false;
                            // The shutdown may finish the connection at once; polling it also
                            // writes the GOAWAY, which the write count starts after.
                            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                                return Poll::Ready(result.map(|()| Ended::HeaderTimeout));
                            }
                            goodbye_from = Some(activity.writes());
                        }
                        Verdict::Close(why) => return Poll::Ready(Ok(why)),
                    }
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let timeout = Duration::from_millis(1000);
        // A send timeout longer than the idle one, so that the idle deadlines show.
        let timeouts = Timeouts {
            idle: timeout,
            send: Duration::from_secs(600),
            body: Duration::from_secs(900),
        };
        let activity = Activity::new();
        let t0 = activity.accepted;
        // Fresh connection: waiting for its protocol since it was accepted.
        assert_eq!(
            activity.verdict(t0 + Duration::from_millis(400), timeouts),
            Verdict::Recheck(t0 + timeout)
        );
        assert_eq!(
            activity.verdict(t0 + timeout, timeouts),
            Verdict::Close(Ended::HeaderTimeout)
        );
        // A request in flight is never cut for idleness, however long it takes.
        let request = activity.begin();
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            activity.verdict(later, timeouts),
            Verdict::Recheck(later + timeout)
        );
        // Once it ends, the idle time starts then.
        drop(request);
        let ended = activity.accepted
            + Duration::from_millis(activity.idle_since_ms.load(Ordering::Acquire));
        assert_eq!(
            activity.verdict(ended + Duration::from_millis(10), timeouts),
            Verdict::Recheck(ended + timeout)
        );
        assert_eq!(
            activity.verdict(ended + timeout, timeouts),
            Verdict::Close(Ended::HeaderTimeout)
        );
        // Concurrent requests (HTTP/2 streams): idle only once the last one ends.
        let (a, b) = (activity.begin(), activity.begin());
        drop(a);
        assert_eq!(
            activity.verdict(later, timeouts),
            Verdict::Recheck(later + timeout)
        );
        drop(b);
        assert_eq!(activity.in_flight.load(Ordering::Acquire), 0);
        // HTTP/1 requests are tracked like HTTP/2 streams. With one in flight (and an idle
        // timeout longer than the send timeout, so that it does not show), the watchdog looks
        // at writes and bodies once per send timeout.
        let _request = activity.request();
        let timeouts = Timeouts {
            idle: Duration::from_secs(900),
            ..timeouts
        };
        assert_eq!(
            activity.verdict(later, timeouts),
            Verdict::Recheck(later + timeouts.send)
        );
        // A write that waits: cut once it has waited for the send timeout, unless it moved.
        activity.write_pending();
        let blocked = activity.accepted
            + Duration::from_millis(activity.write_blocked_ms.load(Ordering::Acquire) - 1);
        activity.write_pending(); // a second wait does not restart the clock
        assert_eq!(
            activity.verdict(blocked + Duration::from_secs(1), timeouts),
            Verdict::Recheck(blocked + timeouts.send)
        );
        assert_eq!(
            activity.verdict(blocked + timeouts.send, timeouts),
            Verdict::Close(Ended::SendTimeout)
        );
        activity.write_progress();
        assert_eq!(
            activity.verdict(blocked + timeouts.send, timeouts),
            Verdict::Recheck(blocked + timeouts.send + timeouts.send)
        );
        // A request body that waits: cut after the body timeout, unless bytes came.
        activity.body_read_pending();
        let waiting = activity.accepted
            + Duration::from_millis(activity.read_blocked_ms.load(Ordering::Acquire) - 1);
        assert_eq!(
            activity.verdict(waiting + timeouts.body, timeouts),
            Verdict::Close(Ended::BodyTimeout)
        );
        activity.read_progress();
        assert!(matches!(
            activity.verdict(waiting + timeouts.body, timeouts),
            Verdict::Recheck(_)
        ));
    }
}
