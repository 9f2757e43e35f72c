//! The upstream HTTP/1.1 client: pooled keep-alive connections, driven inline by the request's
//! own task.
//!
//! A request checks out an idle connection of its target (or dials one), writes its head (and
//! streams its body), reads the response head, and hands back a response whose body reads the
//! rest straight from the socket. The connection goes back to the pool the moment the body's
//! last byte is read, when both sides allow keep-alive. No connection task, no channel between
//! the request and the socket: a proxied request costs the same two reads and two writes as in
//! nginx, without the extra task wake-ups of a general-purpose client.
//!
//! Framing follows RFC 9112 §6: `Transfer-Encoding: chunked` wins over `Content-Length`,
//! conflicting lengths are refused (502), bodies of HEAD, 1xx, 204 and 304 are empty, and a
//! response with neither is read until the upstream closes. Interim 1xx responses are skipped.
//! `Expect` is never forwarded (the client-side server already answered `100 Continue`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{BodyOverLimit, BodyStalled, CappedBody};

/// Pooled connections idle longer than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per target.
const MAX_IDLE: usize = 1024;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 128;
/// Read buffer for a response head (and a small body that comes with it).
const HEAD_CHUNK: usize = 4 * 1024;
/// Read buffer growth step for bodies.
const READ_CHUNK: usize = 16 * 1024;
/// Longest chunk-size line (with extensions) and total trailer section accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// Bytes reserved after an answer's header lines for the gateway's own (X-Request-Id up to
/// its 128-byte limit and the three RateLimit-* lines), so adding them does not reallocate.
const ANSWER_ROOM: usize = 320;

/// Pools by target address, kept across snapshots so pooled connections survive reloads.
#[derive(Default)]
pub struct Connections {
    hosts: Mutex<HashMap<String, Arc<HostConns>>>,
}

impl Connections {
    /// The pool of `authority` (`host:port`), created on first use.
    pub fn host(&self, authority: &str) -> Arc<HostConns> {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        hosts
            .entry(authority.to_string())
            .or_insert_with(|| {
                Arc::new(HostConns {
                    authority: authority.to_string(),
                    idle: Mutex::new(VecDeque::new()),
                })
            })
            .clone()
    }
}

/// Idle keep-alive connections to one target, newest last.
pub struct HostConns {
    authority: String,
    idle: Mutex<VecDeque<(TcpStream, Instant)>>,
}

impl Connections {
    /// Closes idle connections that expired or that their upstream closed (called now and
    /// then, off the request path), so none lingers half-closed.
    pub fn sweep(&self) {
        let hosts: Vec<Arc<HostConns>> = self
            .hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for host in hosts {
            let mut idle = host.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|(stream, since)| since.elapsed() <= IDLE_TIMEOUT && still_open(stream));
        }
    }
}

impl std::fmt::Debug for HostConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConns")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl HostConns {
    /// The newest idle connection still open, if any.
    fn checkout(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((stream, since)) = idle.pop_back() {
            if since.elapsed() > IDLE_TIMEOUT {
                // The newest is expired, so are all the others.
                idle.clear();
                return None;
            }
            if still_open(&stream) {
                return Some(stream);
            }
        }
        None
    }

    fn checkin(&self, stream: TcpStream) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((stream, now));
        }
    }

    async fn dial(&self, connect_timeout: Duration) -> Result<TcpStream, SendError> {
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| {
                SendError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
            })?
            .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Whether an idle connection is still usable: nothing arrived on it since its last response
/// (neither the upstream's close nor stray bytes). Costs no system call when nothing did.
fn still_open(stream: &TcpStream) -> bool {
    // `try_read` consults the reactor's cached readiness first: no system call while nothing
    // arrived, and unlike `poll_read_ready` it is not subject to the task's cooperative budget
    // (which would report "pending", i.e. "open", for dead connections once spent).
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Why a request could not be sent or its response head not read.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (safe to try another target).
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// The client's body went over the route's `max_body_bytes`.
    #[error("request body larger than the route allows")]
    BodyOverLimit,
    /// The client's (HTTP/2) body waited longer than the body timeout for more.
    #[error("the client sent none of its request body within the body timeout")]
    BodyTimeout,
    /// The connection failed while writing or reading.
    #[error("upstream connection failed: {0}")]
    Io(#[from] io::Error),
    /// The client's body failed while streaming.
    #[error("request body failed: {0}")]
    Body(String),
    /// The upstream's answer is not valid HTTP/1.x.
    #[error("invalid response from upstream: {0}")]
    BadResponse(String),
    /// The request target has bytes that cannot go on a request line (the client's fault).
    #[error("the request target cannot be forwarded")]
    Target,
    /// A reused connection was closed by the upstream before any response byte (the request
    /// can be sent again on a fresh connection when it had no body).
    #[error("pooled connection closed by the upstream")]
    Stale,
    /// The upstream took longer than its request timeout: for the answer's head after the
    /// request body went whole, or to take more of the body.
    #[error("the upstream did not answer or read within its request timeout")]
    Timeout,
}

/// Headers meaningful only for one hop (RFC 9110 §7.6.1), never forwarded either way (those
/// a `Connection` header names are hop-by-hop too).
pub const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    http::header::TRANSFER_ENCODING,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::UPGRADE,
];

/// What a header of an answer is to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Connection,
    TransferEncoding,
    ContentLength,
    /// Another hop-by-hop header ([`HOP_BY_HOP`]).
    HopByHop,
    Other,
}

/// The role of a header named `name` (any case), from its bytes: the length picks the one or
/// two names it can be (most names match none), then one comparison. Agrees with
/// [`HOP_BY_HOP`] (a test holds them together).
fn role(name: &[u8]) -> Role {
    let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
    match name.len() {
        10 if is(b"connection") => Role::Connection,
        17 if is(b"transfer-encoding") => Role::TransferEncoding,
        14 if is(b"content-length") => Role::ContentLength,
        10 if is(b"keep-alive") => Role::HopByHop,
        16 if is(b"proxy-connection") => Role::HopByHop,
        18 if is(b"proxy-authenticate") => Role::HopByHop,
        19 if is(b"proxy-authorization") => Role::HopByHop,
        2 if is(b"te") => Role::HopByHop,
        7 if is(b"trailer") || is(b"upgrade") => Role::HopByHop,
        _ => Role::Other,
    }
}

/// A chunk's size line (`n` in hexadecimal, then CRLF), written into `buffer`.
pub fn chunk_size_line(mut n: usize, buffer: &mut [u8; 18]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    buffer[16..].copy_from_slice(b"\r\n");
    let mut at = 16;
    loop {
        at -= 1;
        buffer[at] = DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &buffer[at..]
}

/// The header a `Connection` list item names, when it is one to remove beyond
/// [`HOP_BY_HOP`] (RFC 9110 §7.6.1); `None` for hop-by-hop names (`keep-alive` among them)
/// and for items that are no header name. Used for requests and answers alike.
pub fn named_by_connection(item: &[u8]) -> Option<HeaderName> {
    let name = HeaderName::from_bytes(item.trim_ascii()).ok()?;
    (!HOP_BY_HOP.contains(&name)).then_some(name)
}

/// The head of a request to send.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// The origin-form target, in parts: the target's base path, the path, the query.
    pub base: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The `Host` header's value, sent first; a `Host` in `headers` is not sent.
    pub host: &'a HeaderValue,
    /// The client's headers, hop-by-hop ones already removed.
    pub headers: &'a HeaderMap,
    /// The gateway's own headers: each name's value from `headers` is not sent, and the
    /// given value (if any) is sent after them. A list, not map inserts: comparing names
    /// while encoding costs less than hashing them into the map and growing it.
    pub added: &'a [(&'a HeaderName, Option<&'a HeaderValue>)],
    /// `Some(names)`: the answer's headers are wanted as [`RawHeaders`] (in the response
    /// body) rather than in the response's map, less `names` (the gateway sets them on the
    /// answer) and the hop-by-hop ones. Bodyless requests only (the HTTP/1 fast lane).
    pub raw_answer: Option<&'a [&'a HeaderName]>,
    /// Longest silence of the upstream inside the answer's body (see [`Stall`]).
    pub read_timeout: Duration,
}

/// An answer's headers as the lines to send (`name: value\r\n` each, names in lower case),
/// for a caller that writes the head itself: building a `HeaderMap` (hashing each name, a
/// reference-counted slice per value) and encoding it again costs more than copying the lines.
#[derive(Debug, Default)]
pub struct RawHeaders {
    pub lines: BytesMut,
    /// Whether the lines hold a `Date` / a `Content-Length`.
    pub has_date: bool,
    pub has_length: bool,
}

impl RawHeaders {
    /// Appends `name: value` (the gateway's own headers on an answer; `value` must be a valid
    /// header value).
    pub fn push(&mut self, name: &HeaderName, value: &[u8]) {
        self.lines.extend_from_slice(name.as_str().as_bytes());
        self.lines.extend_from_slice(b": ");
        self.lines.extend_from_slice(value);
        self.lines.extend_from_slice(b"\r\n");
    }
}

/// Sends a request on a pooled (or new) connection and reads the response head.
pub async fn send(
    host: &Arc<HostConns>,
    connect_timeout: Duration,
    head: &RequestHead<'_>,
    mut body: Option<CappedBody>,
) -> Result<Response<UpstreamResponseBody>, SendError> {
    // A body of unknown length goes chunked.
    let chunked = body.is_some() && !head.headers.contains_key(CONTENT_LENGTH);
    // Encoded once; a retry (rare) encodes again, as the buffer became the first try's read
    // buffer.
    let mut encoded = Some(encode_head(head, chunked)?);
    // A pooled connection first. If the upstream closed it at the same moment, before any
    // byte of an answer, a bodyless idempotent request goes once more, on a new connection (as
    // nginx does); anything else is never replayed. (One call site of `exchange`, so that its
    // future is held once.)
    let replayable = body.is_none() && head.method.is_idempotent();
    let mut pooled = host.checkout();
    loop {
        let reused = pooled.is_some();
        let stream = match pooled.take() {
            Some(stream) => stream,
            // On the heap: dialing is rare next to pooled reuse, and its future is large.
            None => Box::pin(host.dial(connect_timeout)).await?,
        };
        let encoded = match encoded.take() {
            Some(encoded) => encoded,
            None => encode_head(head, chunked)?,
        };
        match exchange(host, stream, encoded, body.take(), chunked, head).await {
            Err(SendError::Stale) if replayable && reused => {}
            other => return other,
        }
    }
}

async fn exchange(
    host: &Arc<HostConns>,
    mut stream: TcpStream,
    head: BytesMut,
    body: Option<CappedBody>,
    chunked: bool,
    request: &RequestHead<'_>,
) -> Result<Response<UpstreamResponseBody>, SendError> {
    let method = request.method;
    // Not timed here: a head (at most the header limit, tens of KiB) goes into the socket's
    // buffers whether or not the upstream reads (a body's writes are timed, see `Stall`), and
    // a bodyless exchange is timed as a whole by the caller. (A second, timed, await here
    // made this future larger for every request.)
    stream.write_all(&head).await.map_err(stale_if_reset)?;
    // The head's buffer, once sent, receives the answer (one allocation for both), unless the
    // head was large: the answer's header values are slices of this buffer and keep it alive.
    let mut buf = head;
    if buf.capacity() > 2 * HEAD_CHUNK {
        buf = BytesMut::with_capacity(HEAD_CHUNK);
    } else {
        buf.clear();
    }
    let ((parts, framing, reusable, raw), sent_whole, sending) = match body {
        None => (
            read_answer(&mut stream, &mut buf, method, request.raw_answer).await?,
            true,
            None,
        ),
        // On the heap: streaming a body makes a large future, which a bodyless request should
        // not carry (and move) along.
        Some(body) => {
            Box::pin(send_body_then_answer(
                &mut stream,
                body,
                chunked,
                &mut buf,
                method,
                request.read_timeout,
            ))
            .await?
        }
    };
    let mut body = UpstreamResponseBody {
        conn: Some((stream, host.clone())),
        buf,
        framing,
        reusable: reusable && sent_whole,
        raw,
        sending,
        stall: Stall::new(request.read_timeout),
    };
    body.finish_if_done();
    Ok(Response::from_parts(parts, body))
}

/// Streams the request body, then reads the final answer unless one came while it streamed;
/// with whether the body went whole, and the body's writer when an early success came while
/// it streamed (the response body carries on with it).
///
/// `timeout` (the upstream's request timeout) is not a limit on the whole exchange here, as
/// it is for a bodyless request: a large body from a slow client takes what it takes (the
/// client's pauses are the body timeout's). It bounds how long the upstream may take none of
/// the body (see [`Stall`]), then the wait for the answer once the body has gone whole.
async fn send_body_then_answer(
    stream: &mut TcpStream,
    body: CappedBody,
    chunked: bool,
    buf: &mut BytesMut,
    method: &Method,
    timeout: Duration,
) -> Result<(Answer, bool, Option<Box<BodyWriter>>), SendError> {
    let mut writer = Box::new(BodyWriter::new(body, chunked, timeout));
    match send_body_watching(stream, &mut writer, buf, method).await {
        Ok(BodyOutcome::Sent) => Ok((
            read_answer_within(timeout, stream, buf, method).await?,
            true,
            None,
        )),
        Ok(BodyOutcome::Refused(answer)) => {
            // The upstream sees the end of our side instead of waiting for bytes that will
            // not come; the client finishes sending so that it can read the answer.
            let _ = stream.shutdown().await;
            writer.body.discard_rest().await;
            Ok((answer, false, None))
        }
        Ok(BodyOutcome::Duplex(answer)) => {
            writer.stall = None;
            Ok((answer, true, Some(writer)))
        }
        Err(error @ (SendError::BodyOverLimit | SendError::Timeout)) => {
            // The client gets a 413 or a 504: let it finish sending so that it can read it.
            writer.body.discard_rest().await;
            Err(error)
        }
        Err(SendError::Io(error)) => {
            // The upstream may have answered and closed before reading everything: an answer
            // already received is still the answer.
            let answer = read_answer_within(timeout, stream, buf, method)
                .await
                .map_err(|_| SendError::Io(error))?;
            writer.body.discard_rest().await;
            Ok((answer, false, None))
        }
        Err(error) => Err(error),
    }
}

/// A final response head with its framing, whether the connection may be reused, and its
/// headers as lines when they were asked for so (then not in the parts' map).
type Answer = (http::response::Parts, Framing, bool, Option<RawHeaders>);

/// How streaming a request body ended.
enum BodyOutcome {
    /// Sent whole, no answer yet.
    Sent,
    /// An early error answer (4xx/5xx) came while it was streaming: the rest is not sent.
    Refused(Answer),
    /// An early success came while it was streaming: the rest goes on while the answer
    /// streams back.
    Duplex(Answer),
}

/// Streams the request body while watching the connection for an early answer (interim 1xx
/// answers are skipped). An early error (4xx/5xx) means the upstream does not want the rest
/// (RFC 9112 §9.5): sending stops. An early success (an upstream answering as it reads, such
/// as an echo) still gets the whole body, which it may need to finish its answer: the answer
/// is passed on at once and the response body writes the rest of the request body as it
/// reads the answer (both ways at once, so neither side stalls on a full socket).
async fn send_body_watching(
    stream: &mut TcpStream,
    writer: &mut BodyWriter,
    buf: &mut BytesMut,
    method: &Method,
) -> Result<BodyOutcome, SendError> {
    let (mut reader, mut write_half) = stream.split();
    loop {
        tokio::select! {
            biased;
            written = std::future::poll_fn(|cx| writer.poll_write(cx, &mut write_half)) => {
                return written.map(|()| BodyOutcome::Sent);
            }
            read = reader.read_buf(buf) => match read {
                Ok(read) if read > 0 => {
                    if let Some(answer) = final_answer(buf, method, None)? {
                        return Ok(if answer.0.status.as_u16() >= 400 {
                            BodyOutcome::Refused(answer)
                        } else {
                            BodyOutcome::Duplex(answer)
                        });
                    }
                    if buf.len() >= MAX_HEAD {
                        return Err(SendError::BadResponse("response head too large".into()));
                    }
                    buf.reserve(HEAD_CHUNK);
                }
                // Closed or failed for reading: the write finds out how things stand.
                _ => {
                    return std::future::poll_fn(|cx| writer.poll_write(cx, &mut write_half))
                        .await
                        .map(|()| BodyOutcome::Sent);
                }
            },
        }
    }
}

/// The final response head if `buf` holds it whole; interim 1xx heads before it are dropped
/// (a 101 is refused: no upgrade was asked for).
fn final_answer(
    buf: &mut BytesMut,
    method: &Method,
    raw: Option<&[&HeaderName]>,
) -> Result<Option<Answer>, SendError> {
    while let Some(answer) = parse_head(buf, method, raw)? {
        if answer.0.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(SendError::BadResponse("unexpected 101".into()));
        }
        if !answer.0.status.is_informational() {
            return Ok(Some(answer));
        }
    }
    Ok(None)
}

/// Reads the final response head (interim 1xx answers skipped); `buf` may already hold part
/// of it, and keeps whatever of the body came with it.
async fn read_answer(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    method: &Method,
    raw: Option<&[&HeaderName]>,
) -> Result<Answer, SendError> {
    // Whether any byte of an answer arrived (then a failure is never "stale": the upstream
    // got the request).
    let mut answered = !buf.is_empty();
    loop {
        if let Some(answer) = final_answer(buf, method, raw)? {
            return Ok(answer);
        }
        if buf.len() >= MAX_HEAD {
            return Err(SendError::BadResponse("response head too large".into()));
        }
        buf.reserve(HEAD_CHUNK);
        let read = match stream.read_buf(buf).await {
            Ok(read) => read,
            Err(error) if answered => return Err(SendError::Io(error)),
            Err(error) => return Err(stale_if_reset(error)),
        };
        if read == 0 {
            return Err(if answered {
                SendError::BadResponse("connection closed inside the response head".into())
            } else {
                SendError::Stale
            });
        }
        answered = true;
    }
}

/// [`read_answer`] (answers as a map), given up after `timeout`.
async fn read_answer_within(
    timeout: Duration,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Answer, SendError> {
    tokio::time::timeout(timeout, read_answer(stream, buf, method, None))
        .await
        .map_err(|_| SendError::Timeout)?
}

/// A reset while writing to or reading from a reused connection means the upstream closed it.
fn stale_if_reset(error: io::Error) -> SendError {
    match error.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => SendError::Stale,
        _ => SendError::Io(error),
    }
}

/// `METHOD target HTTP/1.1`, the headers, and `Transfer-Encoding: chunked` when a body of
/// unknown length follows; in a buffer with room for the answer's head after it is sent.
fn encode_head(head: &RequestHead<'_>, chunked: bool) -> Result<BytesMut, SendError> {
    let unsendable = |part: &str| part.bytes().any(|b| b <= b' ' || b == 0x7f || b >= 0x80);
    // A query may carry raw UTF-8 (clients send it, hyper accepts it); never controls or spaces.
    let bad_query = |query: &str| query.bytes().any(|b| b <= b' ' || b == 0x7f);
    if head.path.is_empty()
        || unsendable(head.base)
        || unsendable(head.path)
        || head.query.is_some_and(bad_query)
    {
        return Err(SendError::Target);
    }
    let mut out = BytesMut::with_capacity(HEAD_CHUNK.max(256 + head.headers.len() * 48));
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(head.base.as_bytes());
    out.extend_from_slice(head.path.as_bytes());
    if let Some(query) = head.query {
        out.extend_from_slice(b"?");
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut field = |name: &HeaderName, value: &HeaderValue| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    field(&HOST, head.host);
    for (name, value) in head.headers {
        if name == HOST || name == EXPECT || head.added.iter().any(|(added, _)| *added == name) {
            continue;
        }
        field(name, value);
    }
    for (name, value) in head.added {
        if let Some(value) = value {
            field(name, value);
        }
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// A request body being written to the upstream: a state, not a future, so that the response
/// body can carry on with it after an early success ([`BodyOutcome::Duplex`]).
struct BodyWriter {
    body: CappedBody,
    chunked: bool,
    /// What is left to write of the current frame, with its chunk framing.
    segments: VecDeque<Bytes>,
    /// The body ended (its last chunk, if chunked, is in `segments`).
    ended: bool,
    /// The answer's last bytes, held back until this body has gone whole (see
    /// `UpstreamResponseBody::poll_frame`).
    held: Option<Bytes>,
    /// An upstream that takes none of the body for its request timeout (writes waiting on it,
    /// not on the client) fails the request. Not after an early answer: the upstream may then
    /// stop reading only because it cannot write its answer to a client that reads slowly, and
    /// the answer's own timer watches it.
    stall: Option<Stall>,
}

impl BodyWriter {
    fn new(body: CappedBody, chunked: bool, write_timeout: Duration) -> Self {
        Self {
            body,
            chunked,
            segments: VecDeque::with_capacity(3),
            ended: false,
            held: None,
            stall: Some(Stall::new(write_timeout)),
        }
    }

    /// Writes what the body has ready, and waits for more, until all of it is written.
    fn poll_write<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut W,
    ) -> Poll<Result<(), SendError>> {
        loop {
            while let Some(front) = self.segments.front_mut() {
                match Pin::new(&mut *stream).poll_write(cx, front) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(SendError::Io(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(written)) => {
                        if let Some(stall) = self.stall.as_mut() {
                            stall.progress();
                        }
                        front.advance(written);
                        if front.is_empty() {
                            self.segments.pop_front();
                        }
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(SendError::Io(error))),
                    Poll::Pending if self.stall.as_mut().is_some_and(|stall| stall.expired(cx)) => {
                        return Poll::Ready(Err(SendError::Timeout));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            match frame {
                None => {
                    self.ended = true;
                    if self.chunked {
                        self.segments.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
                Some(Err(error)) if error.is::<BodyOverLimit>() => {
                    return Poll::Ready(Err(SendError::BodyOverLimit));
                }
                Some(Err(error)) if error.is::<BodyStalled>() => {
                    return Poll::Ready(Err(SendError::BodyTimeout));
                }
                Some(Err(error)) => return Poll::Ready(Err(SendError::Body(error.to_string()))),
                // Trailers are not forwarded.
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        let mut line = [0u8; 18];
                        self.segments
                            .push_back(Bytes::copy_from_slice(chunk_size_line(
                                data.len(),
                                &mut line,
                            )));
                        self.segments.push_back(data);
                        self.segments.push_back(Bytes::from_static(b"\r\n"));
                    } else {
                        self.segments.push_back(data);
                    }
                }
            }
        }
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked, in this decoding state.
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
    /// Complete.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section, this many bytes read so far.
    Trailers(usize),
}

/// Parses a complete response head at the start of `buf` (consuming it), or `None` when more
/// bytes are needed. With `raw`, the headers come as [`RawHeaders`] (less the names in `raw`)
/// and the parts' map stays empty.
fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    raw: Option<&[&HeaderName]>,
) -> Result<Option<Answer>, SendError> {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(SendError::BadResponse(error.to_string())),
    };
    let code = response.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| SendError::BadResponse(format!("status {code}")))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Header positions, so the values can share the head's buffer instead of being copied.
    // The headers that decide framing and reuse are read in the same pass (no lookups after),
    // and hop-by-hop ones are left out there (they are never forwarded).
    let base = buf.as_ptr() as usize;
    let mut fields = Vec::with_capacity(response.headers.len());
    let (mut close, mut keep_alive_token) = (false, false);
    // Other headers `Connection` names: hop-by-hop too (rare: most name only `keep-alive`).
    let mut named: Vec<HeaderName> = Vec::new();
    // Some(whether the last coding is chunked) when Transfer-Encoding is present.
    let mut chunked = None;
    // The Content-Length values, all of which must agree; an invalid one is an error only if
    // the length is used (no Transfer-Encoding).
    let (mut length, mut has_length) = (Ok(None), false);
    for header in response.headers.iter() {
        let name = header.name.as_bytes();
        let role = role(name);
        if role == Role::Connection {
            // Most answers carry one token: no list to split.
            if header.value.eq_ignore_ascii_case(b"keep-alive") {
                keep_alive_token = true;
            } else {
                for token in header.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
                    named.extend(named_by_connection(token));
                }
            }
        } else if role == Role::TransferEncoding {
            let last = header
                .value
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if role == Role::ContentLength {
            has_length = true;
            length = length.and_then(|known| more_length(known, header.value));
        }
        if !matches!(
            role,
            Role::HopByHop | Role::Connection | Role::TransferEncoding
        ) {
            let name_start = name.as_ptr() as usize - base;
            let start = header.value.as_ptr() as usize - base;
            fields.push((
                name_start..name_start + name.len(),
                start..start + header.value.len(),
                role == Role::ContentLength,
            ));
        }
    }
    // No body whatever the headers say.
    let no_body = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // A length beside Transfer-Encoding is dropped (see below).
    let drop_length = !no_body && chunked.is_some() && has_length;
    let (mut headers, raw_headers) = match raw {
        Some(skip) => {
            let mut lines = RawHeaders {
                // With room for the gateway's own lines (see `ANSWER_ROOM`).
                lines: BytesMut::with_capacity(head_len + ANSWER_ROOM),
                ..RawHeaders::default()
            };
            // Names are compared as bytes, in any case, and sent in lower case (as a map
            // would): no `HeaderName` is made (httparse let only token characters through).
            let is = |known: &HeaderName, name: &[u8]| {
                known.as_str().as_bytes().eq_ignore_ascii_case(name)
            };
            for (name, value, is_length) in fields {
                let name = &buf[name];
                // One length is enough: where the length is used, all must agree (see
                // below), and some clients refuse a repeated one.
                if (is_length && (drop_length || lines.has_length))
                    || skip.iter().any(|known| is(known, name))
                    || named.iter().any(|known| is(known, name))
                {
                    continue;
                }
                lines.has_date |= name.eq_ignore_ascii_case(b"date");
                lines.has_length |= is_length;
                let at = lines.lines.len();
                lines.lines.extend_from_slice(name);
                lines.lines[at..].make_ascii_lowercase();
                lines.lines.extend_from_slice(b": ");
                lines.lines.extend_from_slice(&buf[value]);
                lines.lines.extend_from_slice(b"\r\n");
            }
            buf.advance(head_len);
            // The gateway's headers go to the lines too: the map stays empty (unallocated).
            (HeaderMap::new(), Some(lines))
        }
        None => {
            // Room for what the proxy adds (X-Request-Id, the three RateLimit-* headers)
            // without the map growing (re-hashing every entry) on the way out.
            let mut headers = HeaderMap::with_capacity(fields.len() + 4);
            let head = buf.split_to(head_len).freeze();
            for (name, value, _) in fields {
                let name = HeaderName::from_bytes(&head[name]).map_err(|_| {
                    SendError::BadResponse("a header name http refuses".to_string())
                })?;
                let value = HeaderValue::from_maybe_shared(head.slice(value))
                    .map_err(|_| SendError::BadResponse(format!("value of {name}")))?;
                headers.append(name, value);
            }
            for name in named {
                headers.remove(name);
            }
            (headers, None)
        }
    };

    // `close` always wins; HTTP/1.0 keeps the connection only when asked to.
    let mut keep_alive = !close && (version == Version::HTTP_11 || keep_alive_token);
    let framing = if no_body {
        Framing::Done
    } else if let Some(chunked) = chunked {
        // Transfer-Encoding wins; a length next to it is meaningless (and would mislead the
        // client), so it goes. Both at once, or Transfer-Encoding from an HTTP/1.0 server, is
        // how desynchronisation starts (RFC 9112 §6.1): that connection is not reused.
        if has_length || version == Version::HTTP_10 {
            if drop_length {
                headers.remove(CONTENT_LENGTH);
            }
            keep_alive = false;
        }
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else {
        match length? {
            Some(length) => Framing::Length(length),
            None => {
                keep_alive = false;
                Framing::Close
            }
        }
    };
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some((parts, framing, keep_alive, raw_headers)))
}

/// The response's `Content-Length` so far (`known`) with one more header `value`: every value
/// (comma lists included) must be plain digits, and all must agree.
fn more_length(known: Option<u64>, value: &[u8]) -> Result<Option<u64>, SendError> {
    let mut length = known;
    for part in value.split(|b| *b == b',') {
        let part = part.trim_ascii();
        let parsed = std::str::from_utf8(part)
            .ok()
            .filter(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|part| part.parse::<u64>().ok())
            .ok_or_else(|| SendError::BadResponse("invalid Content-Length".into()))?;
        if length.is_some_and(|l| l != parsed) {
            return Err(SendError::BadResponse("conflicting Content-Length".into()));
        }
        length = Some(parsed);
    }
    Ok(length)
}

/// A response body read straight from the upstream connection.
pub struct UpstreamResponseBody {
    conn: Option<(TcpStream, Arc<HostConns>)>,
    buf: BytesMut,
    framing: Framing,
    reusable: bool,
    /// The answer's headers, when asked for as lines ([`RequestHead::raw_answer`]).
    raw: Option<RawHeaders>,
    /// The rest of the request body, still being written after an early success.
    sending: Option<Box<BodyWriter>>,
    stall: Stall,
}

/// How long an answer's body may go without a byte from the upstream once its head came (as
/// nginx's `proxy_read_timeout` between two reads): the upstream's `timeouts.request_ms`.
/// Past it the body ends with an error (the client's connection is closed, as for any body cut
/// short) and the upstream connection is dropped, instead of holding both for as long as the
/// upstream likes. The timer is made only when a read has to wait (an answer that comes whole
/// with its head never has one), and moved only when it rings: a read that brings bytes just
/// notes the time.
struct Stall {
    /// The limit, in milliseconds (`request_ms` fits): this sits in every answer's body, which
    /// is moved with each response, so it is kept small, and its timer is one allocation.
    limit_ms: u32,
    /// When bytes last came, in milliseconds after the timer's start (its deadline less the
    /// limit); [`NO_PROGRESS`] when none came since.
    progress_ms: u32,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

const NO_PROGRESS: u32 = u32::MAX;

impl Stall {
    fn new(limit: Duration) -> Self {
        Self {
            limit_ms: u32::try_from(limit.as_millis()).unwrap_or(u32::MAX - 1),
            progress_ms: NO_PROGRESS,
            sleep: None,
        }
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(u64::from(self.limit_ms))
    }

    /// Bytes came.
    fn progress(&mut self) {
        if let Some(sleep) = &self.sleep {
            let start = sleep.deadline() - self.limit();
            let since = tokio::time::Instant::now().saturating_duration_since(start);
            self.progress_ms = u32::try_from(since.as_millis()).unwrap_or(NO_PROGRESS - 1);
        }
    }

    /// A read or write waits: whether the upstream has now been silent for the limit (else the
    /// task is woken when it would have been).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit();
        let sleep = self.sleep.get_or_insert_with(|| {
            self.progress_ms = NO_PROGRESS;
            Box::pin(tokio::time::sleep(limit))
        });
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.progress_ms == NO_PROGRESS {
                return true;
            }
            let last =
                sleep.deadline() - limit + Duration::from_millis(u64::from(self.progress_ms));
            self.progress_ms = NO_PROGRESS;
            if last + limit <= tokio::time::Instant::now() {
                return true;
            }
            sleep.as_mut().reset(last + limit);
        }
    }
}

impl UpstreamResponseBody {
    /// The answer's headers as lines, when they were asked for so (once).
    pub fn take_raw_headers(&mut self) -> Option<RawHeaders> {
        self.raw.take()
    }

    /// The answer's headers as lines, to add the gateway's own to.
    pub fn raw_headers_mut(&mut self) -> Option<&mut RawHeaders> {
        self.raw.as_mut()
    }

    /// Gives the connection back to its pool once the body is complete (or closes it).
    fn finish_if_done(&mut self) {
        if matches!(self.framing, Framing::Length(0)) {
            self.framing = Framing::Done;
        }
        // After an early answer, the request body is sent whole first (see `poll_frame`).
        if self.framing == Framing::Done
            && self.sending.is_none()
            && let Some((stream, host)) = self.conn.take()
            && self.reusable
            && self.buf.is_empty()
        {
            host.checkin(stream);
        }
    }

    /// The next piece of the body available in the buffer, advancing the framing state.
    fn next_from_buffer(&mut self) -> Result<Option<Bytes>, io::Error> {
        loop {
            match self.framing {
                Framing::Done => return Ok(None),
                Framing::Length(remaining) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(self.buf.len());
                    self.framing = Framing::Length(remaining - take as u64);
                    return Ok(Some(self.buf.split_to(take).freeze()));
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(self.buf.split().freeze()));
                }
                Framing::Chunked(state) => match decode_chunk(state, &mut self.buf)? {
                    (next, Some(data)) => {
                        self.framing = next;
                        return Ok(Some(data));
                    }
                    (next, None) if next == self.framing => return Ok(None),
                    (next, None) => self.framing = next,
                },
            }
        }
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

/// One decoding step of a chunked body: the next state and any data. The same state back and
/// no data means more bytes are needed.
fn decode_chunk(state: Chunk, buf: &mut BytesMut) -> Result<(Framing, Option<Bytes>), io::Error> {
    let line_end = |buf: &BytesMut| buf.windows(2).position(|w| w == b"\r\n");
    match state {
        Chunk::Size => {
            let Some(end) = line_end(buf) else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err(invalid("chunk size line too long"));
                }
                return Ok((Framing::Chunked(state), None));
            };
            let line = &buf[..end];
            let digits_end = line
                .iter()
                .position(|b| !b.is_ascii_hexdigit())
                .unwrap_or(line.len());
            if digits_end == 0 || digits_end > 15 {
                return Err(invalid("invalid chunk size"));
            }
            let rest = &line[digits_end..];
            if !(rest.is_empty() || rest[0] == b';' || rest[0] == b' ' || rest[0] == b'\t') {
                return Err(invalid("invalid chunk size"));
            }
            let size = std::str::from_utf8(&line[..digits_end])
                .ok()
                .and_then(|digits| u64::from_str_radix(digits, 16).ok())
                .ok_or_else(|| invalid("invalid chunk size"))?;
            buf.advance(end + 2);
            let next = if size == 0 {
                Chunk::Trailers(0)
            } else {
                Chunk::Data(size)
            };
            Ok((Framing::Chunked(next), None))
        }
        Chunk::Data(remaining) => {
            if buf.is_empty() {
                return Ok((Framing::Chunked(state), None));
            }
            let take = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let left = remaining - take as u64;
            let next = if left == 0 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left)
            };
            Ok((Framing::Chunked(next), Some(buf.split_to(take).freeze())))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok((Framing::Chunked(state), None));
            }
            if &buf[..2] != b"\r\n" {
                return Err(invalid("missing CRLF after chunk data"));
            }
            buf.advance(2);
            Ok((Framing::Chunked(Chunk::Size), None))
        }
        Chunk::Trailers(seen) => {
            let Some(end) = line_end(buf) else {
                if seen + buf.len() > MAX_TRAILERS {
                    return Err(invalid("trailer section too large"));
                }
                return Ok((Framing::Chunked(state), None));
            };
            buf.advance(end + 2);
            if end == 0 {
                return Ok((Framing::Done, None));
            }
            if seen + end > MAX_TRAILERS {
                return Err(invalid("trailer section too large"));
            }
            // Trailer fields are not forwarded.
            Ok((Framing::Chunked(Chunk::Trailers(seen + end + 2)), None))
        }
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            // The rest of the request body, when the upstream answered early (it reads while
            // it answers): written as far as it goes before each read of the answer.
            if let Some(writer) = this.sending.as_mut()
                && let Some((stream, _)) = this.conn.as_mut()
            {
                match writer.poll_write(cx, stream) {
                    // The answer's last bytes wait for the body (see below).
                    Poll::Pending if writer.held.is_some() => return Poll::Pending,
                    Poll::Pending => {}
                    Poll::Ready(written) => {
                        if let Err(error) = written {
                            // The upstream sees our side end; its answer may still come whole.
                            tracing::debug!(%error, "request body cut after an early answer");
                            this.reusable = false;
                            let _ = tokio::io::AsyncWrite::poll_shutdown(Pin::new(stream), cx);
                        }
                        if let Some(data) = this.sending.take().and_then(|writer| writer.held) {
                            this.finish_if_done();
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                }
            }
            match this.next_from_buffer() {
                // An answer that ends before the request body did (an upstream that answers at
                // once and reads the body afterwards, or discards it): its last bytes wait
                // until the body has gone whole (the writer, polled above, wakes this task).
                // A client that has the whole answer may stop sending (and a server that wrote
                // a whole answer stops reading the body, closing on what is left, which can
                // reset the connection before the client reads the answer); this way the
                // client's body is read to its end and the upstream connection can be reused.
                Ok(Some(data))
                    if this.sending.is_some()
                        && this.conn.is_some()
                        && matches!(this.framing, Framing::Length(0) | Framing::Done) =>
                {
                    if let Some(writer) = this.sending.as_mut() {
                        writer.held = Some(data);
                    }
                    continue;
                }
                Ok(Some(data)) => {
                    this.finish_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.framing == Framing::Done => {
                    if this.sending.is_some() && this.conn.is_some() {
                        return Poll::Pending;
                    }
                    // The connection gone: what was held goes out as it is.
                    let held = this.sending.take().and_then(|writer| writer.held);
                    this.finish_if_done();
                    return Poll::Ready(held.map(|data| Ok(Frame::data(data))));
                }
                Ok(None) => {}
                Err(error) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(error)));
                }
            }
            let Some((stream, _)) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            this.buf.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(stream), cx, &mut this.buf) {
                Poll::Pending if this.stall.expired(cx) => {
                    tracing::warn!(
                        limit = ?this.stall.limit(),
                        "upstream sent nothing more of the answer's body; cut"
                    );
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "upstream stalled inside the answer's body",
                    ))));
                }
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    if this.framing == Framing::Close {
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection before the body ended",
                    ))));
                }
                Poll::Ready(Ok(_)) => this.stall.progress(),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done && self.sending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Bytes held back (see `poll_frame`) are still to come.
        let held = self
            .sending
            .as_ref()
            .and_then(|writer| writer.held.as_ref())
            .map_or(0, |data| data.len() as u64);
        match self.framing {
            Framing::Length(remaining) => SizeHint::with_exact(remaining + held),
            Framing::Done => SizeHint::with_exact(held),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(framing: Framing, wire: &[u8]) -> Result<Vec<u8>, io::Error> {
        let mut body = UpstreamResponseBody {
            conn: None,
            buf: BytesMut::from(wire),
            framing,
            reusable: false,
            raw: None,
            sending: None,
            stall: Stall::new(Duration::from_secs(1)),
        };
        let mut out = Vec::new();
        while let Some(data) = body.next_from_buffer()? {
            out.extend_from_slice(&data);
        }
        assert_eq!(body.framing, Framing::Done, "body incomplete");
        Ok(out)
    }

    #[test]
    fn heads_carry_the_gateway_headers_in_place_of_the_clients() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "client.example"),
            ("x-forwarded-for", "6.6.6.6"),
            ("expect", "100-continue"),
            ("x-consumer-id", "spoofed"),
            ("accept", "*/*"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        let xff = HeaderName::from_static("x-forwarded-for");
        let consumer = HeaderName::from_static("x-consumer-id");
        let peer = HeaderValue::from_static("10.0.0.9");
        let head = RequestHead {
            method: &Method::GET,
            base: "/base",
            path: "/p",
            query: Some("q=1"),
            host: &HeaderValue::from_static("upstream:80"),
            headers: &headers,
            added: &[(&xff, Some(&peer)), (&consumer, None)],
            raw_answer: None,
            read_timeout: Duration::from_secs(1),
        };
        let encoded = encode_head(&head, true).expect("a sendable head");
        assert_eq!(
            std::str::from_utf8(&encoded).expect("ascii"),
            "GET /base/p?q=1 HTTP/1.1\r\nhost: upstream:80\r\naccept: */*\r\n\
             x-forwarded-for: 10.0.0.9\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn answers_leave_hop_by_hop_headers_out() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\nX-Kept: 1\r\nTrailer: x\r\nUpgrade: h2c\r\n\
             Content-Length: 0\r\n\r\n",
        );
        let (parts, framing, keep_alive, _) = parse_head(&mut buf, &Method::GET, None)
            .expect("valid")
            .expect("complete");
        let mut names: Vec<&str> = parts.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
        assert_eq!((framing, keep_alive), (Framing::Length(0), true));
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut line = [0u8; 18];
        assert_eq!(chunk_size_line(0, &mut line), b"0\r\n");
        assert_eq!(chunk_size_line(255, &mut line), b"ff\r\n");
        assert_eq!(chunk_size_line(16 * 1024, &mut line), b"4000\r\n");
        assert_eq!(
            chunk_size_line(usize::MAX, &mut line),
            b"ffffffffffffffff\r\n"
        );
    }

    #[test]
    fn header_roles_agree_with_the_hop_by_hop_list() {
        for name in &HOP_BY_HOP {
            for spelled in [
                name.as_str().to_string(),
                name.as_str().to_ascii_uppercase(),
            ] {
                assert_ne!(role(spelled.as_bytes()), Role::Other, "{spelled}");
            }
        }
        assert_eq!(role(b"Connection"), Role::Connection);
        assert_eq!(role(b"TRANSFER-ENCODING"), Role::TransferEncoding);
        assert_eq!(role(b"Content-Length"), Role::ContentLength);
        for other in [
            "content-type",
            "x-connection",
            "date",
            "tex",
            "",
            "upgrades",
        ] {
            assert_eq!(role(other.as_bytes()), Role::Other, "{other}");
        }
    }

    #[test]
    fn answers_as_lines_leave_out_what_a_map_would() {
        let x_request_id = HeaderName::from_static("x-request-id");
        let skip = [&x_request_id];
        let raw = |wire: &str, method: &Method| {
            let mut buf = BytesMut::from(wire);
            let (parts, framing, _, raw) = parse_head(&mut buf, method, Some(&skip[..]))
                .expect("valid")
                .expect("complete");
            assert!(
                parts.headers.is_empty(),
                "the headers are in the lines only"
            );
            let raw = raw.expect("lines");
            let lines = String::from_utf8(raw.lines.to_vec()).expect("text");
            (lines, raw.has_date, raw.has_length, framing, buf)
        };
        let (lines, date, length, framing, rest) = raw(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\nX-Kept: 1\r\nX-Request-Id: upstream's\r\n\
             Date: Sat, 05 Dec 2026 00:00:00 GMT\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
            &Method::GET,
        );
        assert_eq!(
            lines,
            "x-kept: 1\r\ndate: Sat, 05 Dec 2026 00:00:00 GMT\r\ncontent-length: 2\r\n"
        );
        assert_eq!((date, length, framing), (true, true, Framing::Length(2)));
        assert_eq!(&rest[..], b"ok", "the body stays in the buffer");
        // Transfer-Encoding wins over a length beside it, which goes...
        let (lines, date, length, framing, _) = raw(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            &Method::GET,
        );
        assert_eq!((lines.as_str(), date, length), ("", false, false));
        assert_eq!(framing, Framing::Chunked(Chunk::Size));
        // ...except on an answer without a body, which keeps what it says (as a map would).
        let (lines, _, length, framing, _) = raw(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!((lines.as_str(), length), ("content-length: 3\r\n", true));
        assert_eq!(framing, Framing::Done);
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: 1\r\n\r\n";
        let out = body_of(Framing::Chunked(Chunk::Size), wire).expect("valid chunked body");
        assert_eq!(out, b"hello world");
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"-1\r\n",
        ] {
            assert!(
                body_of(Framing::Chunked(Chunk::Size), wire).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn chunked_decoding_resumes_across_reads() {
        let wire = b"a\r\n0123456789\r\n0\r\n\r\n";
        let mut body = UpstreamResponseBody {
            conn: None,
            buf: BytesMut::new(),
            framing: Framing::Chunked(Chunk::Size),
            reusable: false,
            raw: None,
            sending: None,
            stall: Stall::new(Duration::from_secs(1)),
        };
        let mut out = Vec::new();
        for byte in wire {
            body.buf.extend_from_slice(&[*byte]);
            while let Some(data) = body.next_from_buffer().expect("valid") {
                out.extend_from_slice(&data);
            }
        }
        assert_eq!(out, b"0123456789");
        assert_eq!(body.framing, Framing::Done);
    }

    #[test]
    fn response_heads_set_framing_and_keep_alive() {
        let parse = |wire: &str, method: &Method| {
            let mut buf = BytesMut::from(wire.as_bytes());
            parse_head(&mut buf, method, None)
                .map(|p| p.map(|(parts, f, k, _)| (parts.status, f, k, buf)))
        };
        let get = Method::GET;
        let (status, framing, keep, rest) =
            parse("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", &get)
                .expect("valid")
                .expect("complete");
        assert_eq!(
            (status.as_u16(), framing, keep),
            (200, Framing::Length(2), true)
        );
        assert_eq!(&rest[..], b"ok");
        let (_, framing, keep, _) = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n",
            &get,
        )
        .expect("valid")
        .expect("complete");
        // Chunked wins, and a length beside it makes the connection not worth reusing.
        assert_eq!((framing, keep), (Framing::Chunked(Chunk::Size), false));
        let (_, framing, keep, _) = parse("HTTP/1.1 200 OK\r\n\r\n", &get)
            .expect("valid")
            .expect("complete");
        assert_eq!((framing, keep), (Framing::Close, false));
        let (_, framing, keep, _) = parse("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", &get)
            .expect("valid")
            .expect("complete");
        assert_eq!((framing, keep), (Framing::Length(0), false));
        let (_, framing, _, _) = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            &Method::HEAD,
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(framing, Framing::Done);
        let (_, _, keep, _) = parse(
            "HTTP/1.0 200 OK\r\nconnection: close, keep-alive\r\ncontent-length: 0\r\n\r\n",
            &get,
        )
        .expect("valid")
        .expect("complete");
        assert!(!keep, "close wins");
        let (_, _, keep, _) = parse("HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n", &get)
            .expect("valid")
            .expect("complete");
        assert!(!keep);
        assert!(
            parse("HTTP/1.1 200 OK\r\ncontent-le", &get)
                .expect("valid")
                .is_none()
        );
        assert!(
            parse(
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                &get
            )
            .is_err()
        );
        // Framing read from every header line, lists included.
        for (wire, expected) in [
            (
                "content-length: 3, 3\r\ncontent-length: 3",
                Some((Framing::Length(3), true)),
            ),
            ("content-length: 3, 4", None),
            ("content-length: +3", None),
            ("content-length: ", None),
            (
                "transfer-encoding: gzip, chunked",
                Some((Framing::Chunked(Chunk::Size), true)),
            ),
            (
                "transfer-encoding: chunked, gzip",
                Some((Framing::Close, false)),
            ),
            (
                "transfer-encoding: gzip\r\ntransfer-encoding: chunked",
                Some((Framing::Chunked(Chunk::Size), true)),
            ),
            // The length is not used next to Transfer-Encoding: not an error, not reused.
            (
                "content-length: x\r\ntransfer-encoding: chunked",
                Some((Framing::Chunked(Chunk::Size), false)),
            ),
            (
                "connection: Keep-Alive\r\ncontent-length: 0",
                Some((Framing::Length(0), true)),
            ),
            (
                "connection: upgrade, close\r\ncontent-length: 0",
                Some((Framing::Length(0), false)),
            ),
        ] {
            let found = parse(&format!("HTTP/1.1 200 OK\r\n{wire}\r\n\r\n"), &get)
                .ok()
                .map(|answer| {
                    let (_, framing, keep, _) = answer.expect("complete");
                    (framing, keep)
                });
            assert_eq!(found, expected, "{wire}");
        }
        let (_, _, keep, _) = parse(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            &get,
        )
        .expect("valid")
        .expect("complete");
        assert!(keep, "HTTP/1.0 keeps the connection when asked to");
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", &get).is_err());
        assert!(parse("garbage\r\n\r\n", &get).is_err());
    }
}
