//! A guard against request smuggling, in front of hyper's HTTP/1 parser.
//!
//! hyper follows RFC 9112 and, given both `Content-Length` and `Transfer-Encoding`, lets the
//! latter win; it also accepts repeated identical `Content-Length` lines. Both are framings two
//! parsers can read differently, so a gateway should refuse them outright. This guard watches
//! the bytes of each connection as hyper reads them (no copy, no buffering), tracks where each
//! request head starts and ends, and refuses a head that has:
//!
//! - more than one `Content-Length` line, or one whose value is not plain digits;
//! - both `Content-Length` and `Transfer-Encoding`;
//! - a `Transfer-Encoding` other than exactly `chunked`.
//!
//! Refusing means hyper never receives the head's final line feed (so it never dispatches the
//! request, let alone forwards it); the guard itself answers `400 Bad Request` with a JSON body
//! (`code: bad_request`) and ends the connection. Bodies are followed (by `Content-Length`, or chunk by chunk) so that body bytes
//! are never mistaken for a head. HTTP/2 connections and anything the guard cannot follow are
//! passed through untouched to hyper, whose parser stays authoritative. The HTTP/1 fast lane
//! (`lane.rs`), which parses heads itself and serves none with a body, has the guard skip its
//! heads and resume at the hand-off to hyper ([`Guarded::skip_scan`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::watchdog::Activity;

/// Longest line prefix kept for inspection; longer CL/TE values are refused anyway.
const LINE_KEEP: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head, line by line.
    Head,
    /// Passing a fixed-length body.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Passing chunk data, then its CRLF.
    ChunkData(u64),
    /// Expecting the CRLF after chunk data.
    ChunkEnd,
    /// Reading trailer lines after the last chunk.
    Trailers,
    /// Not following any more (HTTP/2, a refused head, or something unparseable).
    Passthrough,
}

/// Per-connection framing tracker.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    line: Vec<u8>,
    line_len: usize,
    first_line: bool,
    content_lengths: u32,
    content_length: Option<u64>,
    bad_content_length: bool,
    transfer_encoding: Option<bool>,
    refused: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            state: State::Head,
            line: Vec::with_capacity(LINE_KEEP),
            line_len: 0,
            first_line: true,
            content_lengths: 0,
            content_length: None,
            bad_content_length: false,
            transfer_encoding: None,
            refused: false,
        }
    }
}

impl Tracker {
    /// Whether the bytes expected next belong to a request body.
    pub fn in_body(&self) -> bool {
        matches!(
            self.state,
            State::Body(_)
                | State::ChunkSize
                | State::ChunkData(_)
                | State::ChunkEnd
                | State::Trailers
        )
    }

    /// Whether the tracker refused a head on this connection.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Scans bytes just read from the client. When they complete a head that must be refused,
    /// returns how many of them may be passed on (everything before the head's last byte).
    pub fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Passthrough => return None,
                State::Body(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if left == take {
                        State::Head
                    } else {
                        State::Body(left - take)
                    };
                }
                State::ChunkData(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if left == take {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left - take)
                    };
                }
                State::Head | State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    // A line at a time: the bytes up to the next line feed (all that was read
                    // when it has none yet) join the line.
                    let rest = &bytes[i..];
                    let Some(at) = memchr::memchr(b'\n', rest) else {
                        self.extend_line(rest);
                        return None;
                    };
                    self.extend_line(&rest[..at]);
                    if self.end_of_line() {
                        // This line feed completes a refused head: hyper must not see it.
                        self.refused = true;
                        self.state = State::Passthrough;
                        return Some(i + at);
                    }
                    i += at + 1;
                }
            }
        }
        None
    }

    /// Adds bytes of the current line: the first [`LINE_KEEP`] are kept, all are counted.
    fn extend_line(&mut self, part: &[u8]) {
        let room = LINE_KEEP.saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
        self.line_len = self.line_len.saturating_add(part.len());
    }

    /// Handles a complete line; true when it ends a head that must be refused.
    fn end_of_line(&mut self) -> bool {
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        let empty = self.line.is_empty() && self.line_len <= 1;
        let refuse = match self.state {
            State::Head if self.first_line && empty => false, // stray CRLF between requests
            State::Head if self.first_line => {
                self.first_line = false;
                if self.line.starts_with(b"PRI * HTTP/2.0") {
                    self.state = State::Passthrough;
                }
                false
            }
            State::Head if empty => self.end_of_head(),
            State::Head => {
                self.header_line();
                false
            }
            State::ChunkSize => {
                let digits = self.line.split(|b| *b == b';').next().unwrap_or_default();
                match parse_hex(digits) {
                    Some(0) => self.state = State::Trailers,
                    Some(size) => self.state = State::ChunkData(size),
                    None => self.state = State::Passthrough,
                }
                false
            }
            State::ChunkEnd => {
                self.state = if empty {
                    State::ChunkSize
                } else {
                    State::Passthrough
                };
                false
            }
            State::Trailers => {
                if empty {
                    self.reset_head();
                }
                false
            }
            State::Body(_) | State::ChunkData(_) | State::Passthrough => false,
        };
        self.line.clear();
        self.line_len = 0;
        refuse
    }

    fn header_line(&mut self) {
        let Some(colon) = self.line.iter().position(|b| *b == b':') else {
            return;
        };
        let (name, value) = self.line.split_at(colon);
        let value = value[1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            self.content_lengths += 1;
            match std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            {
                Some(v) => self.content_length = v.parse().ok(),
                None => self.bad_content_length = true,
            }
            if self.line_len > LINE_KEEP {
                self.bad_content_length = true;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let chunked = value.eq_ignore_ascii_case(b"chunked") && self.line_len <= LINE_KEEP;
            // A second Transfer-Encoding line is as bad as a list.
            self.transfer_encoding = Some(self.transfer_encoding.is_none() && chunked);
        }
    }

    /// Decides the head's fate and the body framing that follows; true to refuse.
    fn end_of_head(&mut self) -> bool {
        let refuse = self.content_lengths > 1
            || self.bad_content_length
            || (self.content_lengths > 0 && self.transfer_encoding.is_some())
            || self.transfer_encoding == Some(false);
        if refuse {
            return true;
        }
        let next = match (self.transfer_encoding, self.content_length) {
            (Some(true), _) => State::ChunkSize,
            (_, Some(0)) | (_, None) => State::Head,
            (_, Some(length)) => State::Body(length),
        };
        self.reset_head();
        self.state = next;
        false
    }

    fn reset_head(&mut self) {
        self.state = State::Head;
        self.first_line = true;
        self.content_lengths = 0;
        self.content_length = None;
        self.bad_content_length = false;
        self.transfer_encoding = None;
    }
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// The answer to a refused head.
const REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 95\r\n\r\n{\"code\":\"bad_request\",\"message\":\"ambiguous message framing (Content-Length/Transfer-Encoding)\"}";

/// An I/O stream whose reads pass through a [`Tracker`].
pub struct Guarded<S> {
    inner: S,
    tracker: Tracker,
    /// Whether reads go through the tracker (see [`Guarded::skip_scan`]).
    scanning: bool,
    refusal_written: usize,
    /// Told when writes to the client, or reads of a request body, wait and when they move
    /// (the send and body timeouts).
    activity: Arc<Activity>,
}

impl<S> Guarded<S> {
    /// Wraps a client connection whose writes `activity` watches.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            tracker: Tracker::default(),
            scanning: true,
            refusal_written: 0,
            activity,
        }
    }
}

impl<S> Guarded<S> {
    /// Stops following reads, for a reader that parses every head itself and serves only
    /// heads the tracker would pass (no `Content-Length`, no `Transfer-Encoding`: the HTTP/1
    /// fast lane), and calls [`Guarded::resume_scan`] before it hands the connection to a
    /// parser that does not check (hyper). Such heads leave the tracker where it starts, at a
    /// fresh head, so it can pick up at the first head the reader did not serve.
    pub fn skip_scan(&mut self) {
        self.scanning = false;
    }

    /// Follows reads again, starting with `read`: bytes already read from the connection that
    /// the next reader gets first. Returns how many of them may be passed on (fewer when they
    /// complete a head that must be refused: the guard then answers 400 at the next read).
    pub fn resume_scan(&mut self, read: &[u8]) -> usize {
        self.scanning = true;
        self.tracker.scan(read).unwrap_or(read.len())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.tracker.refused() {
            // hyper holds an incomplete head and wants more: answer 400 and end the connection.
            while this.refusal_written < REFUSAL.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &REFUSAL[this.refusal_written..]) {
                    Poll::Ready(Ok(0)) => break,
                    Poll::Ready(Ok(n)) => this.refusal_written += n,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let _ = Pin::new(&mut this.inner).poll_flush(cx);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "request refused: ambiguous message framing",
            )));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &result {
            // Waiting for the rest of a body the client announced (the body timeout).
            Poll::Pending if this.tracker.in_body() => this.activity.body_read_pending(),
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.activity.read_progress(),
            _ => {}
        }
        if let Poll::Ready(Ok(())) = result
            && this.scanning
            && let Some(keep) = this.tracker.scan(&buf.filled()[before..])
        {
            buf.set_filled(before + keep);
        }
        result
    }
}

impl<S> Guarded<S> {
    fn note_write(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Pending => self.activity.write_pending(),
            Poll::Ready(Ok(written)) if *written > 0 => self.activity.write_progress(),
            Poll::Ready(_) => {}
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        this.note_write(&result);
        result
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note_write(&result);
        result
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `input` split at every possible point; returns (was refused, bytes hyper sees).
    fn check(input: &str) -> (bool, Vec<u8>) {
        let mut results = Vec::new();
        for split in 0..=input.len() {
            let (a, b) = input.as_bytes().split_at(split);
            let mut tracker = Tracker::default();
            let mut seen = Vec::new();
            for part in [a, b] {
                if tracker.refused() {
                    break;
                }
                let keep = tracker.scan(part).unwrap_or(part.len());
                seen.extend_from_slice(&part[..keep]);
            }
            results.push((tracker.refused(), seen));
        }
        let first = results[0].clone();
        assert!(
            results.iter().all(|r| *r == first),
            "result depends on read boundaries: {input:?}"
        );
        first
    }

    #[test]
    fn refusal_is_well_formed() {
        let text = std::str::from_utf8(REFUSAL).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }

    #[test]
    fn clean_requests_pass_unchanged() {
        for input in [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nanything Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ] {
            let (refused, seen) = check(input);
            assert!(!refused, "{input:?}");
            assert_eq!(seen, input.as_bytes());
        }
    }

    #[test]
    fn long_lines_are_followed_across_reads() {
        // Lines longer than what is kept: a long harmless header passes, and so does the
        // request after it; a Content-Length line too long to be kept whole is refused.
        let long = "x".repeat(3 * LINE_KEEP);
        let input = format!(
            "GET / HTTP/1.1\r\nX-Long: {long}\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET / HTTP/1.1\r\n\r\n"
        );
        let (refused, seen) = check(&input);
        assert!(!refused);
        assert_eq!(seen, input.as_bytes());
        let digits = "0".repeat(LINE_KEEP);
        let input = format!("POST / HTTP/1.1\r\nContent-Length: {digits}1\r\n\r\na");
        assert!(check(&input).0);
    }

    #[test]
    fn body_bytes_are_not_mistaken_for_heads() {
        // The body contains text that would be refused as a head.
        let body = "Content-Length: 1\r\nContent-Length: 2\r\n\r\n";
        let input = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert!(!check(&input).0);
        let input = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        assert!(!check(&input).0);
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for input in [
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
            "POST / HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\nabcd",
            "POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\nabcd",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            // Smuggled behind a clean first request on the same connection.
            "GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\nContent-Length: 2\n\nab",
        ] {
            let (refused, seen) = check(input);
            assert!(refused, "{input:?}");
            assert!(
                !seen.ends_with(b"\r\n\r\n") && !seen.ends_with(b"\n\n"),
                "hyper never sees a complete refused head: {input:?}"
            );
        }
    }
}
