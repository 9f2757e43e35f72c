//! Header values the proxy makes for each request (the request id, the `RateLimit-*` numbers),
//! carved from a per-thread chunk of memory: one allocation per chunk, a few hundred values,
//! instead of one or two per value (`HeaderValue::from(u64)` and `from_bytes` allocate; so does
//! the first clone of such a value). A value is a reference-counted slice of its chunk, so
//! cloning it (the request id goes upstream and back to the client) only counts a reference.
//!
//! A chunk is freed when its last value is dropped. Values live as long as their request, so
//! a chunk outlives the requests it served by little. They are marked sensitive, which makes
//! HTTP/2's HPACK encoder send them as never-indexed literals: a value stored in a
//! connection's header table would keep its whole chunk alive for as long as the connection
//! (and a value unique to one request gains nothing from the table anyway).

use std::cell::RefCell;

use bytes::BytesMut;
use http::HeaderValue;

/// Bytes per chunk.
const CHUNK: usize = 4096;

thread_local! {
    /// What is left of this thread's current chunk.
    static SPARE: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `bytes` as a header value in this thread's chunk; `None` when they are not a valid value.
pub fn shared(bytes: &[u8]) -> Option<HeaderValue> {
    let slice = SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.capacity() < bytes.len() {
            *spare = BytesMut::with_capacity(CHUNK.max(bytes.len()));
        }
        spare.extend_from_slice(bytes);
        // The bytes just written, as their own handle on the chunk; `spare` keeps the rest.
        spare.split().freeze()
    });
    let mut value = HeaderValue::from_maybe_shared(slice).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A number as a header value.
pub fn number(value: u64) -> HeaderValue {
    let mut digits = itoa::Buffer::new();
    shared(digits.format(value).as_bytes()).unwrap_or_else(|| HeaderValue::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_share_a_chunk_and_stay_intact() {
        let values: Vec<HeaderValue> = (0..2000u64).map(number).collect();
        for (i, value) in values.iter().enumerate() {
            assert_eq!(value.to_str().ok(), Some(i.to_string().as_str()));
        }
        let long = vec![b'a'; CHUNK + 10];
        assert_eq!(shared(&long).map(|v| v.len()), Some(CHUNK + 10));
        assert_eq!(number(7), "7");
        assert!(number(7).is_sensitive(), "never indexed by HPACK");
        assert!(shared(b"bad\nvalue").is_none());
        assert_eq!(
            shared(b"after-a-refusal")
                .as_ref()
                .map(HeaderValue::as_bytes),
            Some(&b"after-a-refusal"[..])
        );
    }
}
