//! The listeners: the proxy (HTTP/1.1 and cleartext HTTP/2, keep-alive) and the status
//! endpoints (`/healthz`, `/readyz`, `/metrics`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::framing::Guarded;
use crate::lane::Lane;
use crate::state::Shared;
use crate::watchdog::{Activity, Ended, Timeouts, watch};

/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// HTTP/2 flow control: how much of one stream's body, and of all the connection's bodies
/// together, a client may send ahead of what the proxy has read. Received data counts against
/// both windows until the proxy reads it, so a stream whose upstream stops reading holds its
/// whole stream window of the connection's. With equal windows (hyper's default, 1 MiB each)
/// one such stream stalls every other stream's body on the connection, until the body timeout
/// answers them 408. Here it takes an eighth: seven can stall before the others wait. The
/// cost: one upload moves at most 512 KiB per round trip (1 MiB before), and a connection's
/// request bodies can make the proxy buffer up to 4 MiB (1 MiB before).
const H2_STREAM_WINDOW: u32 = 512 * 1024;
const H2_CONNECTION_WINDOW: u32 = 8 * H2_STREAM_WINDOW;

/// Per-connection limits of the proxy listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Largest request head; larger gets 431.
    pub max_header_bytes: usize,
    /// Longest a connection may go with no request in flight: for a new connection to show
    /// its protocol, an HTTP/1 connection to send its next complete head (idle keep-alive
    /// included), an HTTP/2 connection with no stream open (the [`crate::watchdog`]).
    pub header_timeout: Duration,
    /// Longest a write to the client may wait for it to read (the watchdog).
    pub send_timeout: Duration,
    /// Longest a request body may wait for the client to send more (the watchdog).
    pub body_timeout: Duration,
}

/// Accepts proxy connections until `cancel`, then drains in-flight requests.
pub async fn serve_proxy(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: ConnectionLimits,
    cancel: CancellationToken,
) {
    // HTTP/1 connections go to the fast lane (`lane.rs`), which hands what it does not serve to
    // hyper's HTTP/1 server; a connection whose first bytes may be HTTP/2's preface goes to
    // hyper-util's auto builder (see `opening`).
    let mut http1 = hyper::server::conn::http1::Builder::new();
    // Heads and idle connections are timed by the watchdog, for both protocols: hyper's HTTP/1
    // header timer would make and drop a boxed timer per request (see `watchdog.rs`).
    http1
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes)
        .header_read_timeout(None);
    let http1 = Arc::new(http1);
    let mut auto = auto::Builder::new(TokioExecutor::new());
    auto.http1()
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes)
        .header_read_timeout(None);
    auto.http2()
        .timer(TokioTimer::new())
        // The same limit as HTTP/1's (h2 would keep its own 16 KiB); over it, a 431.
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW);
    let auto = Arc::new(auto);
    let timeouts = Timeouts {
        idle: limits.header_timeout,
        send: limits.send_timeout,
        body: limits.body_timeout,
    };
    // Every connection task holds a clone; shutdown waits for them to be dropped.
    let (live, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off a little.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                // Built once per connection, not per request.
                let peer_value = http::HeaderValue::from_str(&peer.ip().to_canonical().to_string())
                    .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
                let activity = Activity::new();
                let (http1, auto) = (http1.clone(), auto.clone());
                let cancel = cancel.clone();
                let live = live.clone();
                tokio::spawn(async move {
                    let _live = live;
                    // The wait for the first bytes is part of the header timeout (the watchdog
                    // counts from the accept, so the two together never exceed it).
                    let opening = tokio::select! {
                        opening = tokio::time::timeout(limits.header_timeout, opening(&stream)) => opening,
                        () = cancel.cancelled() => return,
                    };
                    let io = Guarded::new(stream, activity.clone());
                    let ended = match opening {
                        Ok(Opening::Http1) => {
                            let closing = Arc::new(AtomicBool::new(false));
                            let lane = Lane {
                                shared,
                                peer,
                                peer_value,
                                activity: activity.clone(),
                                http1,
                                closing: closing.clone(),
                            };
                            let connection = crate::lane::serve(io, lane, limits.max_header_bytes);
                            watch(connection, activity, timeouts, cancel, |_| {
                                closing.store(true, Ordering::Relaxed);
                            })
                            .await
                            .map_err(|error| error.to_string())
                        }
                        Ok(Opening::Undecided) => {
                            let service = crate::proxy::service(shared, peer, peer_value, activity.clone());
                            let connection = auto.serve_connection(TokioIo::new(io), service).into_owned();
                            watch(connection, activity, timeouts, cancel, |connection| {
                                connection.graceful_shutdown();
                            })
                            .await
                            .map_err(|error| error.to_string())
                        }
                        Ok(Opening::Gone) => Ok(Ended::Done),
                        Err(_) => Ok(Ended::HeaderTimeout),
                    };
                    match ended {
                        Ok(Ended::Done) => {}
                        Ok(Ended::HeaderTimeout) => {
                            tracing::debug!(%peer, "closed: no request within the header timeout (HTTP/2: GOAWAY)");
                        }
                        Ok(Ended::SendTimeout) => {
                            tracing::debug!(%peer, "closed: the client read nothing within the send timeout");
                        }
                        Ok(Ended::BodyTimeout) => {
                            tracing::debug!(%peer, "closed: the client sent none of its body within the body timeout");
                        }
                        Err(error) => tracing::debug!(%error, %peer, "connection ended with an error"),
                    }
                });
            }
            () = cancel.cancelled() => break,
        }
    }
    drop(listener);
    // Each connection was told (`cancel`) to finish its requests and close.
    drop(live);
    tokio::select! {
        _ = all_closed.recv() => {}
        () = tokio::time::sleep(DRAIN) => tracing::warn!("shutdown: gave up waiting for in-flight requests"),
    }
}

/// HTTP/2's connection preface, which a client speaking HTTP/2 with prior knowledge sends first
/// (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a new connection's first bytes say about its protocol.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    /// They are not the start of HTTP/2's preface: HTTP/1.
    Http1,
    /// They are (the whole preface, or a start of it that may still turn out to be an HTTP/1
    /// request): hyper-util's auto builder reads on until it knows.
    Undecided,
    /// The client closed the connection (or it failed) before sending anything.
    Gone,
}

/// Looks at (without consuming) what the client sent first, once it sent something: one
/// `MSG_PEEK` read per connection.
async fn opening(stream: &tokio::net::TcpStream) -> Opening {
    let mut first = [0u8; H2_PREFACE.len()];
    match stream.peek(&mut first).await {
        Ok(0) | Err(_) => Opening::Gone,
        Ok(n) if first.get(..n) != H2_PREFACE.get(..n) => Opening::Http1,
        Ok(_) => Opening::Undecided,
    }
}

/// Serves `/healthz` (alive), `/readyz` (a config is loaded) and `/metrics` (Prometheus).
/// Heads and idle keep-alive connections are timed like the proxy's (`header_timeout`).
pub async fn serve_status(
    listener: TcpListener,
    shared: Arc<Shared>,
    header_timeout: Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let service = service_fn(move |request| {
                    let shared = shared.clone();
                    async move { Ok::<_, std::convert::Infallible>(status(&shared, &request)) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            () = cancel.cancelled() => return,
        }
    }
}

fn status(shared: &Shared, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let ready = shared.config.load().is_some();
    let (code, content_type, body) = match request.uri().path() {
        "/healthz" => (
            StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.to_string(),
        ),
        "/readyz" if ready => {
            let revision = shared.config.load().as_ref().map_or(0, |c| c.revision);
            (
                StatusCode::OK,
                "application/json",
                format!(r#"{{"status":"ready","revision":{revision}}}"#),
            )
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            r#"{"status":"not_ready","code":"no_config"}"#.to_string(),
        ),
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.render(ready, &shared.limiter),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"code":"not_found"}"#.to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}
