//! Routing: normalizes the request's path and host, then picks the route the request goes to.
//!
//! # Path normalization ([`normalize_path`])
//!
//! The normalized path is used both to match routes and to forward the request, so the upstream
//! sees exactly the path the gateway matched. These rules are security rules: a path that could
//! mean something else to an upstream than to the gateway is refused with 400, never "fixed".
//!
//! - The path must start with `/`.
//! - Percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`, hex in either case, e.g.
//!   `%7E`, `%2e`, `%41`) are decoded. Every other escape is kept, with upper-case hex
//!   (`%3f` becomes `%3F`).
//! - Refused: an encoded slash (`%2F`), a backslash raw or encoded (`\`, `%5C`), `%00` and every
//!   other control character raw or encoded, spaces, non-ASCII bytes, `?` and `#`, and invalid
//!   escapes (`%G1`, a trailing `%`).
//! - Duplicate slashes are collapsed: `//a///b` becomes `/a/b`.
//! - After decoding, a `.` or `..` segment is refused, not resolved: `/a/./b`, `/a/..` and
//!   `/public/%2e%2e/admin` are all errors. So is one followed by `;` parameters
//!   (`/public/..;/admin`, `/a/.;x/b`): servlet containers (Tomcat, Jetty, Spring) drop a
//!   segment's parameters and then resolve its dots. Other `;` stay as they are (`/a;v=1/b`).
//! - A trailing slash is kept: `/users/` stays `/users/`.
//!
//! # Host normalization ([`normalize_host`])
//!
//! A `Host` header or `:authority` becomes a lower-case host name without port: `name`,
//! `name:port`, an IPv4 address, `[ipv6]` or `[ipv6]:port` (returned as `[ipv6]`, lower case).
//! One trailing dot is removed. Refused: an empty value, userinfo (`@`), whitespace, `/`, a port
//! outside 1–65535 or not all digits, labels with characters other than letters, digits, `-`
//! and `_`, empty labels or labels over 63 characters, and names over 253 characters.
//!
//! # Route selection ([`RouteTable::find`])
//!
//! Routes are grouped by host: routes naming the exact host, then `*.example.com` wildcards
//! (matching any name below `example.com`, not `example.com` itself; the longest suffix first),
//! then routes without hosts. The first group holding a route that accepts the request wins; a
//! group whose routes all refuse it falls back to the next one.
//!
//! Within a group, an exact path beats any prefix and a longer prefix beats a shorter one.
//! Prefixes match on segment boundaries: `/users` matches `/users`, `/users/` and `/users/42`,
//! not `/usersx`; `/users/` matches `/users/` and `/users/42`, not `/users`; `/` matches every
//! path. Among routes with the same path, the higher `priority` wins, then a route with method
//! or header conditions, then the route name (alphabetical). A route whose `methods` or
//! `headers` refuse the request is skipped and the next candidate is tried. Methods are compared
//! exactly (`GET` does not imply `HEAD`), header names case-insensitively, header values exactly.
//!
//! Everything is compiled in [`RouteTable::build`]: a lookup hashes the host (and its wildcard
//! suffixes), hashes the path once for exact routes, and walks a segment trie once for prefixes,
//! so its cost grows with the length of the request, not with the number of routes, and it
//! allocates nothing.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::str::Split;

use http::{HeaderMap, HeaderName, Method};
use tollgate_shared::{PathMatch, Route, Stored};
use tracing::warn;

/// Why a request's path or host was refused; the proxy answers 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// The request path breaks a rule of [`normalize_path`].
    #[error("invalid request path: {0}")]
    Path(&'static str),
    /// The `Host` header or `:authority` breaks a rule of [`normalize_host`].
    #[error("invalid host: {0}")]
    Host(&'static str),
}

/// Longest host name accepted, without a trailing dot.
const MAX_HOST_LEN: usize = 253;
/// Longest label of a host name.
const MAX_LABEL_LEN: usize = 63;

/// Normalizes a raw, percent-encoded request path (without query) per the module's rules.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, BadRequest> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(BadRequest::Path("must start with '/'"));
    }
    // Most paths are already normal: visible ASCII without escapes or doubled slashes. The loop
    // below would copy them unchanged. One pass also notes whether a segment starts with '.'
    // (only then can there be a dot segment to refuse).
    let (mut plain, mut dotted, mut previous) = (true, false, 0u8);
    for &byte in bytes {
        if !byte.is_ascii_graphic()
            || matches!(byte, b'%' | b'\\' | b'?' | b'#')
            || (previous == b'/' && byte == b'/')
        {
            plain = false;
            break;
        }
        dotted |= previous == b'/' && byte == b'.';
        previous = byte;
    }
    if plain {
        if dotted {
            without_dot_segments(raw)?;
        }
        return Ok(Cow::Borrowed(raw));
    }
    let mut normalized = String::with_capacity(raw.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        match byte {
            b'/' => {
                if !normalized.ends_with('/') {
                    normalized.push('/');
                }
                index += 1;
            }
            b'%' => {
                let decoded = bytes
                    .get(index + 1..index + 3)
                    .and_then(|hex| match *hex {
                        [high, low] => Some((hex_value(high)? << 4) | hex_value(low)?),
                        _ => None,
                    })
                    .ok_or(BadRequest::Path("invalid percent-escape"))?;
                match decoded {
                    b'/' => return Err(BadRequest::Path("must not contain an encoded '/'")),
                    b'\\' => return Err(BadRequest::Path("must not contain '\\'")),
                    _ if decoded.is_ascii_control() => {
                        return Err(BadRequest::Path("must not contain control characters"));
                    }
                    _ if is_unreserved(decoded) => normalized.push(char::from(decoded)),
                    _ => {
                        normalized.push('%');
                        normalized.push(char::from(UPPER_HEX[usize::from(decoded >> 4)]));
                        normalized.push(char::from(UPPER_HEX[usize::from(decoded & 0x0f)]));
                    }
                }
                index += 3;
            }
            b'\\' => return Err(BadRequest::Path("must not contain '\\'")),
            b'?' | b'#' => return Err(BadRequest::Path("must not contain '?' or '#'")),
            _ if byte.is_ascii_control() => {
                return Err(BadRequest::Path("must not contain control characters"));
            }
            _ if byte.is_ascii_graphic() => {
                normalized.push(char::from(byte));
                index += 1;
            }
            _ => return Err(BadRequest::Path("must be ASCII without spaces")),
        }
    }
    without_dot_segments(&normalized)?;
    Ok(Cow::Owned(normalized))
}

fn without_dot_segments(path: &str) -> Result<&str, BadRequest> {
    // A dot segment follows a '/' (paths start with one): most paths have no "/." at all.
    if path.contains("/.")
        && path.split('/').any(|segment| {
            let name = segment.split_once(';').map_or(segment, |(name, _)| name);
            name == "." || name == ".."
        })
    {
        return Err(BadRequest::Path("must not contain '.' or '..' segments"));
    }
    Ok(path)
}

const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

/// RFC 3986 unreserved characters: the only ones whose escapes mean the same decoded.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes a `Host` header or `:authority` value per the module's rules.
pub fn normalize_host(value: &str) -> Result<Cow<'_, str>, BadRequest> {
    plain_host(value).map_or_else(|| checked_host(value), Ok)
}

/// The common case in one pass: a valid lower-case name (or IPv4 address) with an optional
/// valid port; `None` for anything else, which [`checked_host`] then checks (and names what is
/// wrong).
fn plain_host(value: &str) -> Option<Cow<'_, str>> {
    let bytes = value.as_bytes();
    let (name, port) = match memchr::memchr(b':', bytes) {
        Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
        None => (value, None),
    };
    let mut label = 0;
    for &byte in name.as_bytes() {
        match byte {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' if label < MAX_LABEL_LEN => label += 1,
            b'.' if label > 0 => label = 0,
            _ => return None,
        }
    }
    let valid = label > 0 && name.len() <= MAX_HOST_LEN && check_port(port).is_ok();
    valid.then_some(Cow::Borrowed(name))
}

fn checked_host(value: &str) -> Result<Cow<'_, str>, BadRequest> {
    if value.is_empty() {
        return Err(BadRequest::Host("must not be empty"));
    }
    if value.contains('@') {
        return Err(BadRequest::Host("must not contain userinfo ('@')"));
    }
    if value
        .bytes()
        .any(|byte| byte.is_ascii_whitespace() || byte.is_ascii_control())
    {
        return Err(BadRequest::Host(
            "must not contain whitespace or control characters",
        ));
    }
    if value.contains('/') {
        return Err(BadRequest::Host("must not contain '/'"));
    }
    if !value.is_ascii() {
        return Err(BadRequest::Host("must be ASCII"));
    }
    if let Some(bracketed) = value.strip_prefix('[') {
        let (address, rest) = bracketed
            .split_once(']')
            .ok_or(BadRequest::Host("unclosed '[' in IPv6 address"))?;
        if address.parse::<Ipv6Addr>().is_err() {
            return Err(BadRequest::Host("invalid IPv6 address"));
        }
        let port = match rest.strip_prefix(':') {
            Some(port) => Some(port),
            None if rest.is_empty() => None,
            None => return Err(BadRequest::Host("unexpected text after IPv6 address")),
        };
        check_port(port)?;
        return Ok(Cow::Owned(format!("[{}]", address.to_ascii_lowercase())));
    }
    let (name, port) = match value.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (value, None),
    };
    check_port(port)?;
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(BadRequest::Host("must name a host"));
    }
    if name.len() > MAX_HOST_LEN {
        return Err(BadRequest::Host("must be at most 253 characters"));
    }
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_'))
    };
    if !name.split('.').all(valid_label) {
        return Err(BadRequest::Host(
            "labels must be 1-63 letters, digits, '-' or '_'",
        ));
    }
    if name.bytes().any(|byte| byte.is_ascii_uppercase()) {
        Ok(Cow::Owned(name.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(name))
    }
}

fn check_port(port: Option<&str>) -> Result<(), BadRequest> {
    let Some(port) = port else { return Ok(()) };
    let valid = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|byte| byte.is_ascii_digit())
        && port
            .parse::<u32>()
            .is_ok_and(|number| (1..=65_535).contains(&number));
    if valid {
        Ok(())
    } else {
        Err(BadRequest::Host("port must be a number from 1 to 65535"))
    }
}

/// The route a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    /// Index of the route in the slice given to [`RouteTable::build`].
    pub route: usize,
    /// Byte length of the matched route path at the start of the request path, for
    /// `strip_prefix`: 6 for the prefix `/users` matching `/users/42`, 7 for the prefix `/users/`
    /// (the rest, `42`, then has no leading `/`), 0 for the root prefix `/`, and the whole path's
    /// length for an exact match.
    pub prefix_len: usize,
}

/// The table's maps hash with foldhash, not SipHash: their keys come from the config, so a
/// client choosing what it looks up cannot make them collide, and every request hashes its
/// host and path (SipHash cost about 100 instructions more per lookup).
type Map<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Every route of one config snapshot, compiled for [`RouteTable::find`].
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Method and header conditions, by route index.
    conditions: Vec<Conditions>,
    /// Routes naming an exact host, by lower-case host.
    exact_hosts: Map<HostRoutes>,
    /// Routes naming `*.suffix`, by lower-case suffix (`example.com` for `*.example.com`).
    wildcard_hosts: Map<HostRoutes>,
    /// Routes without hosts.
    any_host: HostRoutes,
}

/// The routes of one host group.
#[derive(Debug, Default)]
struct HostRoutes {
    /// `path_match: exact` routes by path, each list in preference order.
    exact: Map<Vec<usize>>,
    /// `path_match: prefix` routes.
    prefixes: PrefixNode,
}

/// One node of the prefix trie; the root is the path `/`.
#[derive(Debug, Default)]
struct PrefixNode {
    /// Byte length of the path ending at this node: 0 for the root, 6 for `/users`.
    path_len: usize,
    /// Next segment → node.
    children: Map<PrefixNode>,
    /// Routes whose path ends here (`/users`), in preference order.
    routes: Vec<usize>,
    /// Routes whose path ends here with a trailing slash (`/users/`), in preference order.
    slash_routes: Vec<usize>,
}

/// A route's method and header conditions.
#[derive(Debug)]
struct Conditions {
    /// Accepted methods; empty accepts any.
    methods: Vec<String>,
    /// Headers that must be present, each with one of the accepted values.
    headers: Vec<(HeaderName, Vec<String>)>,
    /// A header name in the config is not a valid header name, so no request can match.
    impossible: bool,
}

impl Conditions {
    fn new(route: &Route) -> Self {
        let mut impossible = false;
        let mut headers = Vec::with_capacity(route.headers.len());
        for (name, values) in &route.headers {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(header) => headers.push((header, values.clone())),
                Err(_) => {
                    warn!(route = %route.name, header = %name, "invalid header name; route never matches");
                    impossible = true;
                }
            }
        }
        Self {
            methods: route.methods.clone(),
            headers,
            impossible,
        }
    }

    fn is_conditional(&self) -> bool {
        !self.methods.is_empty() || !self.headers.is_empty() || self.impossible
    }

    fn accept(&self, request: &Request<'_>) -> bool {
        !self.impossible
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|method| method == request.method.as_str()))
            && self.headers.iter().all(|(name, accepted)| {
                request.headers.get_all(name).iter().any(|value| {
                    accepted
                        .iter()
                        .any(|expected| expected.as_bytes() == value.as_bytes())
                })
            })
    }
}

/// What [`RouteTable::find`] matches against.
struct Request<'a> {
    path: &'a str,
    method: &'a Method,
    headers: &'a HeaderMap,
    conditions: &'a [Conditions],
}

impl Request<'_> {
    /// The first route of `candidates` accepting the request.
    fn first_accepted(&self, candidates: &[usize]) -> Option<usize> {
        candidates.iter().copied().find(|&route| {
            self.conditions
                .get(route)
                .is_some_and(|conditions| conditions.accept(self))
        })
    }
}

impl RouteTable {
    /// Compiles the routes of one snapshot. Route paths go through [`normalize_path`]; a path it
    /// refuses (impossible in a validated snapshot) is skipped with a warning.
    pub fn build(routes: &[Stored<Route>]) -> RouteTable {
        let conditions: Vec<Conditions> = routes
            .iter()
            .map(|stored| Conditions::new(&stored.spec))
            .collect();
        // Preference among routes with the same path: priority, then conditions, then name.
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by_key(|&index| {
            (
                Reverse(routes[index].spec.priority),
                Reverse(conditions[index].is_conditional()),
                routes[index].spec.name.as_str(),
                index,
            )
        });
        let mut rank = vec![0; routes.len()];
        for (position, &index) in order.iter().enumerate() {
            rank[index] = position;
        }

        let mut table = RouteTable {
            conditions,
            ..RouteTable::default()
        };
        for (index, stored) in routes.iter().enumerate() {
            let route = &stored.spec;
            let paths: Vec<String> = route
                .paths
                .iter()
                .filter_map(|path| match normalize_path(path) {
                    Ok(normalized) => Some(normalized.into_owned()),
                    Err(error) => {
                        warn!(route = %route.name, path = %path, %error, "route path skipped");
                        None
                    }
                })
                .collect();
            if route.hosts.is_empty() {
                table.any_host.insert(index, route.path_match, &paths);
            }
            for host in &route.hosts {
                let host = host.to_ascii_lowercase();
                let host = host.strip_suffix('.').unwrap_or(&host);
                let group = match host.strip_prefix("*.") {
                    Some(suffix) => table.wildcard_hosts.entry(suffix.to_string()),
                    None => table.exact_hosts.entry(host.to_string()),
                };
                group.or_default().insert(index, route.path_match, &paths);
            }
        }

        table.any_host.sort(&rank);
        for group in table
            .exact_hosts
            .values_mut()
            .chain(table.wildcard_hosts.values_mut())
        {
            group.sort(&rank);
        }
        table
    }

    /// The route for a request, given the host from [`normalize_host`] and the path from
    /// [`normalize_path`]; `None` when no route accepts it (404).
    pub fn find(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<RouteMatch> {
        let request = Request {
            path,
            method,
            headers,
            conditions: &self.conditions,
        };
        if let Some(found) = self
            .exact_hosts
            .get(host)
            .and_then(|group| group.find(&request))
        {
            return Some(found);
        }
        if !self.wildcard_hosts.is_empty() && !host.starts_with('[') {
            // Suffixes after each dot, longest first: `b.example.com`, `example.com`, `com`.
            for (dot, _) in host.match_indices('.') {
                if let Some(found) = self
                    .wildcard_hosts
                    .get(&host[dot + 1..])
                    .and_then(|group| group.find(&request))
                {
                    return Some(found);
                }
            }
        }
        self.any_host.find(&request)
    }
}

impl HostRoutes {
    fn insert(&mut self, route: usize, path_match: PathMatch, paths: &[String]) {
        for path in paths {
            match path_match {
                PathMatch::Exact => self.exact.entry(path.clone()).or_default().push(route),
                PathMatch::Prefix => self.prefixes.insert(route, path),
            }
        }
    }

    fn sort(&mut self, rank: &[usize]) {
        for candidates in self.exact.values_mut() {
            sort_candidates(candidates, rank);
        }
        self.prefixes.sort(rank);
    }

    fn find(&self, request: &Request<'_>) -> Option<RouteMatch> {
        if let Some(route) = self
            .exact
            .get(request.path)
            .and_then(|candidates| request.first_accepted(candidates))
        {
            return Some(RouteMatch {
                route,
                prefix_len: request.path.len(),
            });
        }
        let rest = request.path.strip_prefix('/')?;
        self.prefixes.find(rest.split('/'), request)
    }
}

impl PrefixNode {
    /// Adds a normalized prefix path (`/`, `/users`, `/users/`).
    fn insert(&mut self, route: usize, path: &str) {
        if path == "/" {
            self.routes.push(route);
            return;
        }
        let (body, trailing_slash) = match path.strip_suffix('/') {
            Some(body) => (body, true),
            None => (path, false),
        };
        let mut node = self;
        for segment in body.split('/').skip(1) {
            let path_len = node.path_len + 1 + segment.len();
            node = node.children.entry(segment.to_string()).or_default();
            node.path_len = path_len;
        }
        if trailing_slash {
            node.slash_routes.push(route);
        } else {
            node.routes.push(route);
        }
    }

    fn sort(&mut self, rank: &[usize]) {
        sort_candidates(&mut self.routes, rank);
        sort_candidates(&mut self.slash_routes, rank);
        for child in self.children.values_mut() {
            child.sort(rank);
        }
    }

    /// Walks the request's remaining `segments` down the trie, then tries candidates from the
    /// deepest node up: a child's routes, then this node's `/x/` routes, then its `/x` routes.
    fn find(&self, mut segments: Split<'_, char>, request: &Request<'_>) -> Option<RouteMatch> {
        // No child has an empty name (normalized paths have no `//`): the path `/` (and a
        // trailing slash) looks nothing up.
        if let Some(found) = segments
            .next()
            .filter(|segment| !segment.is_empty())
            .and_then(|segment| self.children.get(segment))
            .and_then(|child| child.find(segments, request))
        {
            return Some(found);
        }
        // The request path goes on past this node with a '/'.
        if request.path.len() > self.path_len
            && let Some(route) = request.first_accepted(&self.slash_routes)
        {
            return Some(RouteMatch {
                route,
                prefix_len: self.path_len + 1,
            });
        }
        request
            .first_accepted(&self.routes)
            .map(|route| RouteMatch {
                route,
                prefix_len: self.path_len,
            })
    }
}

/// Orders routes sharing a path by preference and drops duplicates.
fn sort_candidates(candidates: &mut Vec<usize>, rank: &[usize]) {
    candidates.sort_by_key(|&route| rank[route]);
    candidates.dedup();
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use http::HeaderValue;
    use serde_json::{Value, json};

    use super::*;

    /// Runs `function` on every input and compares with the expected output.
    fn check<Input, Output, Expected>(
        function: impl Fn(Input) -> Output,
        cases: &[(Input, Expected)],
    ) where
        Input: Copy + Debug,
        Output: PartialEq<Expected> + Debug,
        Expected: Debug,
    {
        for (input, expected) in cases {
            assert_eq!(function(*input), *expected, "input: {input:?}");
        }
    }

    /// The normalized value, or the error's message.
    fn outcome(result: Result<Cow<'_, str>, BadRequest>) -> String {
        result.map_or_else(|error| error.to_string(), Cow::into_owned)
    }

    #[test]
    fn normal_paths_and_hosts_are_not_copied() {
        assert!(matches!(
            normalize_path("/api/v1/file.json"),
            Ok(Cow::Borrowed("/api/v1/file.json"))
        ));
        assert!(matches!(normalize_path("/a//b"), Ok(Cow::Owned(p)) if p == "/a/b"));
        assert!(matches!(normalize_path("/a/%7Eb"), Ok(Cow::Owned(p)) if p == "/a/~b"));
        assert!(normalize_path("/a/./b").is_err());
        assert!(matches!(
            normalize_host("api.example.com:8000"),
            Ok(Cow::Borrowed("api.example.com"))
        ));
        assert!(
            matches!(normalize_host("API.example.com"), Ok(Cow::Owned(h)) if h == "api.example.com")
        );
    }

    #[test]
    fn paths() {
        let dots = "invalid request path: must not contain '.' or '..' segments";
        let slash = "invalid request path: must not contain an encoded '/'";
        let backslash = "invalid request path: must not contain '\\'";
        let control = "invalid request path: must not contain control characters";
        let escape = "invalid request path: invalid percent-escape";
        let start = "invalid request path: must start with '/'";
        let ascii = "invalid request path: must be ASCII without spaces";
        let query = "invalid request path: must not contain '?' or '#'";
        check(
            |raw| outcome(normalize_path(raw)),
            &[
                ("/", "/"),
                ("/users", "/users"),
                ("/a/b/", "/a/b/"),
                ("//x//y", "/x/y"),
                ("//a///b", "/a/b"),
                ("///", "/"),
                ("/%7Euser", "/~user"),
                ("/%7euser", "/~user"),
                ("/%41%62c%2D%5f%30", "/Abc-_0"),
                ("/a%3fb", "/a%3Fb"),
                ("/a%3Fb", "/a%3Fb"),
                ("/caf%c3%a9", "/caf%C3%A9"),
                ("/a%20b%25", "/a%20b%25"),
                ("/a/.../b", "/a/.../b"),
                ("/a;v=1/b;c", "/a;v=1/b;c"),
                ("/a/...;x/.b;y", "/a/...;x/.b;y"),
                ("/a/.b/c./", "/a/.b/c./"),
                ("/a%2e%2eb", "/a..b"),
                ("/a:b@c!$&'()*+,;=", "/a:b@c!$&'()*+,;="),
                ("", start),
                ("users", start),
                ("*", start),
                ("/public/%2e%2e/admin", dots),
                ("/public/..;/admin", dots),
                ("/public/%2e%2e;x=1/admin", dots),
                ("/a/.;x/b", dots),
                ("/a/..;", dots),
                ("/a/%2E/b", dots),
                ("/a/./b", dots),
                ("/a/..", dots),
                ("/..", dots),
                ("/.", dots),
                ("/.%2E/x", dots),
                ("//..//", dots),
                ("/a%2fb", slash),
                ("/a%2Fb", slash),
                ("/..%2f", slash),
                ("/a%5cb", backslash),
                ("/a%5Cb", backslash),
                ("/a\\b", backslash),
                ("/%00", control),
                ("/a%0d%0ab", control),
                ("/a%7F", control),
                ("/a\tb", control),
                ("/a\0", control),
                ("/a b", ascii),
                ("/é", ascii),
                ("/%G1", escape),
                ("/a%", escape),
                ("/a%2", escape),
                ("/%%41", escape),
                ("/a?b", query),
                ("/a#b", query),
            ],
        );
    }

    /// The one-pass path accepts only what the full checks accept, as they would answer it.
    #[test]
    fn plain_hosts_agree_with_the_full_checks() {
        let label = format!("{}.com", "a".repeat(63));
        let long_label = format!("{}.com", "a".repeat(64));
        let longest = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "a".repeat(61));
        let too_long = format!("{longest}a");
        let inputs = [
            "example.com",
            "example.com:8080",
            "10.0.0.1:80",
            "my_host-1.internal",
            "a:65535",
            "a",
            label.as_str(),
            longest.as_str(),
            too_long.as_str(),
            long_label.as_str(),
            "Example.com",
            "example.com.",
            "a..b",
            ".a",
            ":80",
            "a:",
            "a:0",
            "a:65536",
            "a:1:2",
            "a:+1",
            "[::1]",
            "a@b",
            "a b",
            "a/b",
            "",
            "é.com",
        ];
        let mut fast = 0;
        for input in inputs {
            if let Some(plain) = plain_host(input) {
                fast += 1;
                assert_eq!(checked_host(input).ok(), Some(plain), "{input:?}");
            }
        }
        assert_eq!(fast, 8, "the plain inputs take the one-pass path");
    }

    #[test]
    fn hosts() {
        let longest = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "a".repeat(61));
        let too_long = format!("{longest}a");
        let long_label = format!("{}.com", "a".repeat(64));
        let label = "invalid host: labels must be 1-63 letters, digits, '-' or '_'";
        let port = "invalid host: port must be a number from 1 to 65535";
        let ipv6 = "invalid host: invalid IPv6 address";
        check(
            |value| outcome(normalize_host(value)),
            &[
                ("example.com", "example.com"),
                ("API.Example.COM", "api.example.com"),
                ("example.com:8080", "example.com"),
                ("example.com.", "example.com"),
                ("Example.com.:443", "example.com"),
                ("localhost:1", "localhost"),
                ("a:65535", "a"),
                ("my_host-1.internal", "my_host-1.internal"),
                ("10.0.0.1:80", "10.0.0.1"),
                ("[::1]", "[::1]"),
                ("[::1]:8080", "[::1]"),
                ("[2001:DB8::A]", "[2001:db8::a]"),
                ("[::ffff:10.0.0.1]", "[::ffff:10.0.0.1]"),
                (longest.as_str(), longest.as_str()),
                ("", "invalid host: must not be empty"),
                (
                    "user@example.com",
                    "invalid host: must not contain userinfo ('@')",
                ),
                (
                    "u:pw@example.com:80",
                    "invalid host: must not contain userinfo ('@')",
                ),
                (
                    "exa mple.com",
                    "invalid host: must not contain whitespace or control characters",
                ),
                (
                    "example.com\t",
                    "invalid host: must not contain whitespace or control characters",
                ),
                ("example.com/x", "invalid host: must not contain '/'"),
                ("é.com", "invalid host: must be ASCII"),
                (".", "invalid host: must name a host"),
                (":80", "invalid host: must name a host"),
                (
                    too_long.as_str(),
                    "invalid host: must be at most 253 characters",
                ),
                ("example.com:0", port),
                ("example.com:65536", port),
                ("example.com:", port),
                ("example.com:80a", port),
                ("example.com:+80", port),
                ("example.com:000080", port),
                ("a:b:c", port),
                ("::1", port),
                ("[::1]:0", port),
                ("[::1", "invalid host: unclosed '[' in IPv6 address"),
                ("[::1]x", "invalid host: unexpected text after IPv6 address"),
                ("[zz::1]", ipv6),
                ("[fe80::1%25eth0]", ipv6),
                ("[example.com]", ipv6),
                ("exa$mple.com", label),
                ("a..b", label),
                (".example.com", label),
                ("example.com..", label),
                ("*.example.com", label),
                (long_label.as_str(), label),
            ],
        );
    }

    /// A stored route from its spec; `upstream` defaults to `backend`.
    fn stored(mut spec: Value) -> Stored<Route> {
        if spec.get("upstream").is_none() {
            spec["upstream"] = json!("backend");
        }
        Stored {
            id: String::new(),
            created_at: String::new(),
            updated_at: String::new(),
            revision: 1,
            spec: serde_json::from_value(spec).expect("a valid route"),
        }
    }

    /// Host, normalized path, method and headers of a request.
    type RequestCase<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);

    /// Checks which route each request goes to, written `"<route name> <prefix_len>"` or `none`.
    fn check_routes(specs: Vec<Value>, cases: &[(RequestCase<'_>, &str)]) {
        let routes: Vec<Stored<Route>> = specs.into_iter().map(stored).collect();
        let table = RouteTable::build(&routes);
        check(
            |(host, path, method, headers): RequestCase<'_>| {
                let method = Method::from_bytes(method.as_bytes()).expect("a method");
                let mut header_map = HeaderMap::new();
                for (name, value) in headers {
                    header_map.append(
                        HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                        HeaderValue::from_str(value).expect("a header value"),
                    );
                }
                match table.find(host, path, &method, &header_map) {
                    Some(found) => {
                        format!("{} {}", routes[found.route].spec.name, found.prefix_len)
                    }
                    None => "none".to_string(),
                }
            },
            cases,
        );
    }

    const ANY: &str = "any.test";

    #[test]
    fn paths_match_on_segments_exactly_and_by_longest_prefix() {
        check_routes(
            vec![
                json!({"name": "users", "paths": ["/users"]}),
                json!({"name": "docs", "paths": ["/docs/"]}),
                json!({"name": "me", "paths": ["/users/me"], "path_match": "exact"}),
                json!({"name": "tools", "paths": ["/users/admin/tools"]}),
                json!({"name": "health", "paths": ["/health", "/healthz/"], "path_match": "exact"}),
                json!({"name": "multi", "paths": ["/a/b", "/c"]}),
                json!({"name": "files", "paths": ["/files"]}),
                json!({"name": "files-slash", "paths": ["/files/"]}),
                json!({"name": "tilde", "paths": ["/~user"]}),
            ],
            &[
                ((ANY, "/users", "GET", &[]), "users 6"),
                ((ANY, "/users/", "GET", &[]), "users 6"),
                ((ANY, "/users/42", "GET", &[]), "users 6"),
                ((ANY, "/usersx", "GET", &[]), "none"),
                ((ANY, "/user", "GET", &[]), "none"),
                ((ANY, "/Users", "GET", &[]), "none"),
                ((ANY, "/users/me", "GET", &[]), "me 9"),
                ((ANY, "/users/me/", "GET", &[]), "users 6"),
                ((ANY, "/users/me/x", "GET", &[]), "users 6"),
                ((ANY, "/users/admin", "GET", &[]), "users 6"),
                ((ANY, "/users/admin/tools", "GET", &[]), "tools 18"),
                ((ANY, "/users/admin/tools/", "GET", &[]), "tools 18"),
                ((ANY, "/users/admin/tools/x/y", "GET", &[]), "tools 18"),
                ((ANY, "/users/admin/toolsx", "GET", &[]), "users 6"),
                ((ANY, "/docs", "GET", &[]), "none"),
                ((ANY, "/docs/", "GET", &[]), "docs 6"),
                ((ANY, "/docs/x/y", "GET", &[]), "docs 6"),
                ((ANY, "/health", "GET", &[]), "health 7"),
                ((ANY, "/health/", "GET", &[]), "none"),
                ((ANY, "/health/x", "GET", &[]), "none"),
                ((ANY, "/healthz", "GET", &[]), "none"),
                ((ANY, "/healthz/", "GET", &[]), "health 9"),
                ((ANY, "/a/b/c", "GET", &[]), "multi 4"),
                ((ANY, "/c", "GET", &[]), "multi 2"),
                ((ANY, "/a", "GET", &[]), "none"),
                ((ANY, "/files", "GET", &[]), "files 6"),
                ((ANY, "/files/", "GET", &[]), "files-slash 7"),
                ((ANY, "/files/a", "GET", &[]), "files-slash 7"),
                ((ANY, "/~user/x", "GET", &[]), "tilde 6"),
                ((ANY, "/", "GET", &[]), "none"),
                ((ANY, "", "GET", &[]), "none"),
            ],
        );
    }

    #[test]
    fn root_prefix_matches_everything_and_exact_root_only_itself() {
        check_routes(
            vec![
                json!({"name": "catch-all", "paths": ["/"]}),
                json!({"name": "api", "paths": ["/api"]}),
                json!({"name": "home", "paths": ["/"], "path_match": "exact"}),
            ],
            &[
                ((ANY, "/", "GET", &[]), "home 1"),
                ((ANY, "/anything/x", "GET", &[]), "catch-all 0"),
                ((ANY, "/api/v1", "GET", &[]), "api 4"),
                ((ANY, "/apix", "GET", &[]), "catch-all 0"),
            ],
        );
    }

    #[test]
    fn exact_hosts_beat_wildcards_beat_any_host_with_fallback() {
        check_routes(
            vec![
                json!({"name": "any", "paths": ["/"]}),
                json!({"name": "exact", "hosts": ["api.example.com"], "paths": ["/"]}),
                json!({"name": "wild", "hosts": ["*.example.com"], "paths": ["/"]}),
                json!({"name": "eu", "hosts": ["*.eu.example.com"], "paths": ["/eu"]}),
                json!({"name": "get-only", "hosts": ["get.example.com"], "paths": ["/"], "methods": ["GET"]}),
                json!({"name": "mixed", "hosts": ["Mixed.Example.org"], "paths": ["/"]}),
                json!({"name": "orders", "hosts": ["shop.example.com"], "paths": ["/orders"]}),
                json!({"name": "multi", "hosts": ["a.test", "b.test"], "paths": ["/m"]}),
            ],
            &[
                (("api.example.com", "/x", "GET", &[]), "exact 0"),
                (("other.example.com", "/x", "GET", &[]), "wild 0"),
                (("a.b.example.com", "/x", "GET", &[]), "wild 0"),
                (("example.com", "/x", "GET", &[]), "any 0"),
                (("notexample.com", "/x", "GET", &[]), "any 0"),
                (("x.eu.example.com", "/eu/1", "GET", &[]), "eu 3"),
                (("x.eu.example.com", "/x", "GET", &[]), "wild 0"),
                (("eu.example.com", "/eu", "GET", &[]), "wild 0"),
                (("get.example.com", "/", "GET", &[]), "get-only 0"),
                (("get.example.com", "/", "POST", &[]), "wild 0"),
                (("mixed.example.org", "/", "GET", &[]), "mixed 0"),
                (("shop.example.com", "/orders/1", "GET", &[]), "orders 7"),
                (("shop.example.com", "/users", "GET", &[]), "wild 0"),
                (("a.test", "/m", "GET", &[]), "multi 2"),
                (("b.test", "/m/x", "GET", &[]), "multi 2"),
                (("b.test", "/x", "GET", &[]), "any 0"),
                (("c.test", "/m", "GET", &[]), "any 0"),
                (("[::1]", "/", "GET", &[]), "any 0"),
            ],
        );
    }

    #[test]
    fn unmatched_hosts_find_nothing_without_a_host_free_route() {
        check_routes(
            vec![
                json!({"name": "exact", "hosts": ["api.example.com"], "paths": ["/"]}),
                json!({"name": "wild", "hosts": ["*.example.com"], "paths": ["/w"]}),
            ],
            &[
                (("api.example.com", "/", "GET", &[]), "exact 0"),
                (("x.example.com", "/w", "GET", &[]), "wild 2"),
                (("x.example.com", "/", "GET", &[]), "none"),
                (("example.com", "/w", "GET", &[]), "none"),
                (("other.test", "/", "GET", &[]), "none"),
            ],
        );
    }

    #[test]
    fn priority_then_conditions_then_name_break_ties() {
        check_routes(
            vec![
                json!({"name": "plain", "paths": ["/p"]}),
                json!({"name": "get", "paths": ["/p"], "methods": ["GET"]}),
                json!({"name": "high-post", "paths": ["/p"], "methods": ["POST"], "priority": 1}),
                json!({"name": "b-tie", "paths": ["/t"]}),
                json!({"name": "a-tie", "paths": ["/t"]}),
                json!({"name": "low", "paths": ["/q"], "priority": -1}),
                json!({"name": "zz-high", "paths": ["/q"], "priority": 3}),
                json!({"name": "deep-post", "paths": ["/s/deep"], "methods": ["POST"]}),
                json!({"name": "shallow", "paths": ["/s"]}),
                json!({"name": "exact-put", "paths": ["/s/deep"], "path_match": "exact", "methods": ["PUT"]}),
            ],
            &[
                ((ANY, "/p", "GET", &[]), "get 2"),
                ((ANY, "/p/x", "POST", &[]), "high-post 2"),
                ((ANY, "/p", "DELETE", &[]), "plain 2"),
                ((ANY, "/p", "HEAD", &[]), "plain 2"),
                ((ANY, "/t", "GET", &[]), "a-tie 2"),
                ((ANY, "/q", "GET", &[]), "zz-high 2"),
                ((ANY, "/s/deep/1", "GET", &[]), "shallow 2"),
                ((ANY, "/s/deep/1", "POST", &[]), "deep-post 7"),
                ((ANY, "/s/deep", "PUT", &[]), "exact-put 7"),
                ((ANY, "/s/deep", "GET", &[]), "shallow 2"),
                ((ANY, "/s/deep", "POST", &[]), "deep-post 7"),
            ],
        );
    }

    #[test]
    fn header_conditions() {
        check_routes(
            vec![
                json!({"name": "beta", "paths": ["/h"], "headers": {"X-Channel": ["beta", "canary"]}}),
                json!({"name": "both", "paths": ["/h"], "priority": 1,
                    "headers": {"x-channel": ["beta"], "x-tenant": ["acme"]}}),
                json!({"name": "default", "paths": ["/h"]}),
                json!({"name": "broken", "paths": ["/b"], "headers": {"bad header": ["x"]}}),
            ],
            &[
                ((ANY, "/h", "GET", &[("x-channel", "beta")]), "beta 2"),
                ((ANY, "/h", "GET", &[("X-CHANNEL", "canary")]), "beta 2"),
                ((ANY, "/h", "GET", &[("x-channel", "Beta")]), "default 2"),
                (
                    (
                        ANY,
                        "/h",
                        "GET",
                        &[("x-channel", "beta"), ("x-tenant", "acme")],
                    ),
                    "both 2",
                ),
                (
                    (
                        ANY,
                        "/h",
                        "GET",
                        &[("x-channel", "canary"), ("x-tenant", "acme")],
                    ),
                    "beta 2",
                ),
                (
                    (
                        ANY,
                        "/h",
                        "GET",
                        &[("x-channel", "stable"), ("x-channel", "beta")],
                    ),
                    "beta 2",
                ),
                ((ANY, "/h", "GET", &[("x-tenant", "acme")]), "default 2"),
                ((ANY, "/h", "GET", &[]), "default 2"),
                ((ANY, "/b", "GET", &[]), "none"),
            ],
        );
    }

    #[test]
    fn ten_thousand_routes() {
        let mut specs: Vec<Value> = (0..10_000)
            .map(|i| {
                let mut spec =
                    json!({"name": format!("r{i:05}"), "paths": [format!("/svc{i}/v1")]});
                if i % 100 == 0 {
                    spec["hosts"] = json!([format!("tenant{i}.example.com")]);
                }
                spec
            })
            .collect();
        specs.push(json!({"name": "fallback", "paths": ["/"]}));
        check_routes(
            specs,
            &[
                ((ANY, "/svc1234/v1/x", "GET", &[]), "r01234 11"),
                ((ANY, "/svc9999/v1", "GET", &[]), "r09999 11"),
                ((ANY, "/svc1/v1", "GET", &[]), "r00001 8"),
                ((ANY, "/svc1234/v2", "GET", &[]), "fallback 0"),
                ((ANY, "/svc10000/v1", "GET", &[]), "fallback 0"),
                ((ANY, "/svc100/v1", "GET", &[]), "fallback 0"),
                (
                    ("tenant100.example.com", "/svc100/v1/a", "GET", &[]),
                    "r00100 10",
                ),
                (
                    ("tenant100.example.com", "/svc101/v1", "GET", &[]),
                    "r00101 10",
                ),
                (
                    ("tenant200.example.com", "/svc100/v1", "GET", &[]),
                    "fallback 0",
                ),
            ],
        );
    }
}
