//! HTTP routes as a listener runs them: matching a request (host, path, method, headers,
//! query) to the most specific route, choosing its backend by weight, the changes the route
//! makes to the request's URL ([`RoutePlan::rewritten_target`]) and headers and its
//! response's headers ([`HeaderEdits`]), and the redirect a route answers with
//! ([`RoutePlan::location`]).
//!
//! Matching does not allocate (but for a query parameter with an escape matched by a regular
//! expression, decoded first); each worker matches regular expressions with its own copies
//! ([`Regexes`]). Changing a request allocates only on routes that change it.

use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
use regex::bytes::Regex;
use shared::config::{self, PathMatch};

/// HTTP routes of one listener, most specific host first.
#[derive(Debug, Default)]
pub struct RouteTable {
    hosts: Vec<HostRoutes>,
}

#[derive(Debug)]
struct HostRoutes {
    host: HostMatch,
    /// Most specific first ([`RoutePlan::precedence`]).
    routes: Vec<RoutePlan>,
}

#[derive(Debug, PartialEq, Eq)]
enum HostMatch {
    /// Lower-case host name.
    Exact(Box<str>),
    /// Lower-case suffix including the leading dot: `.example.com`.
    Suffix(Box<str>),
    Any,
}

/// Names and what their values must be: lower-case header names, or query parameter names
/// as written.
type ValueMatches = Box<[(Box<str>, ValuePlan)]>;

/// How a route matches a request's path.
#[derive(Debug)]
enum PathPlan {
    Prefix(Box<str>),
    Exact(Box<str>),
    /// A regular expression in [`Regexes`], and its pattern's length.
    Regex(usize, usize),
}

/// How a route matches a header's or query parameter's value.
#[derive(Debug)]
enum ValuePlan {
    Exact(Box<[u8]>),
    /// A regular expression in [`Regexes`].
    Regex(usize),
}

/// The regular expressions of a snapshot's routes (anchored at both ends,
/// [`config::full_match`]), which its routes name by index. Each worker matches with copies
/// of its own ([`Regexes::for_worker`]): a `Regex` keeps its scratch space in a pool whose
/// fast path belongs to one thread, and sharing one across workers would bounce that pool
/// between cores on every match.
#[derive(Debug, Default)]
pub struct Regexes(Vec<Regex>);

impl Regexes {
    fn add(&mut self, pattern: &str) -> Result<usize, String> {
        self.0.push(config::full_match(pattern)?);
        Ok(self.0.len() - 1)
    }

    /// Copies for one worker: the compiled programs are shared, each copy has its own
    /// scratch space.
    pub fn for_worker(&self) -> Regexes {
        Regexes(self.0.clone())
    }

    fn is_match(&self, index: usize, value: &[u8]) -> bool {
        self.0.get(index).is_some_and(|regex| regex.is_match(value))
    }
}

impl PathPlan {
    /// The prefix a `PathPrefix` route matched by (validation lets only those replace it).
    fn prefix(&self) -> &str {
        match self {
            PathPlan::Prefix(prefix) => prefix,
            PathPlan::Exact(_) | PathPlan::Regex(..) => "",
        }
    }
}

impl ValuePlan {
    fn new(m: &config::ValueMatch, regexes: &mut Regexes) -> Result<ValuePlan, String> {
        Ok(if m.regex {
            ValuePlan::Regex(regexes.add(&m.value)?)
        } else {
            ValuePlan::Exact(m.value.as_bytes().into())
        })
    }

    fn matches(&self, value: &[u8], regexes: &Regexes) -> bool {
        match self {
            ValuePlan::Exact(exact) => **exact == *value,
            ValuePlan::Regex(index) => regexes.is_match(*index, value),
        }
    }
}

/// What a request must look like to take a route, and where it goes.
#[derive(Debug)]
pub struct RoutePlan {
    path: PathPlan,
    /// The method, exactly.
    method: Option<Box<[u8]>>,
    /// Headers that must have these values: lower-case names.
    headers: ValueMatches,
    /// Query parameters that must have these values, percent-decoded.
    query: ValueMatches,
    /// Indexes into [`crate::snapshot::Snapshot::clusters`], each with the running total of
    /// the weights up to and including it; zero-weight backends are left out.
    backends: Box<[(usize, u32)]>,
    /// Time allowed for the upstream's response head.
    pub timeout: Duration,
    /// Changes to the request's headers, if the route makes any.
    pub request_headers: Option<HeaderEdits>,
    /// Changes to the response's headers, if the route makes any.
    pub response_headers: Option<HeaderEdits>,
    /// Changes to the request's host and path, if the route makes any.
    pub rewrite: Option<config::Rewrite>,
    /// The redirect the route answers with, instead of passing requests on.
    pub redirect: Option<config::Redirect>,
}

/// The backend one request goes to, and what its route does to the response.
#[derive(Debug, Clone, Copy)]
pub struct Chosen<'a> {
    /// Index into [`crate::snapshot::Snapshot::clusters`].
    pub cluster: usize,
    /// Time allowed for the upstream's response head.
    pub timeout: Duration,
    /// Changes to the response's headers.
    pub response_headers: Option<&'a HeaderEdits>,
}

/// A route's [`config::HeaderModifier`], ready to apply to an HTTP/1.1 head or an HTTP/2
/// header map: fields of the removed and set names go, then the set and added ones are
/// written.
#[derive(Debug)]
pub struct HeaderEdits {
    /// Names whose fields go: those removed and those set.
    dropped: Box<[HeaderName]>,
    /// The fields written, each `name: value\r\n` (set, then added), for HTTP/1.1.
    lines: Box<[u8]>,
    /// The same fields for HTTP/2.
    fields: Box<[(HeaderName, HeaderValue)]>,
}

impl HeaderEdits {
    /// None for a modifier that changes nothing. Validation made every name a token and
    /// every value one HTTP can carry; a field hyper still refused would be left out.
    pub(crate) fn new(modifier: &config::HeaderModifier) -> Option<HeaderEdits> {
        if modifier.is_empty() {
            return None;
        }
        let dropped = modifier
            .remove
            .iter()
            .chain(modifier.set.iter().map(|h| &h.name))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        let written = || modifier.set.iter().chain(&modifier.add);
        let lines: Vec<u8> = written()
            .flat_map(|h| {
                [h.name.as_bytes(), b": ", h.value.as_bytes(), b"\r\n"]
                    .concat()
                    .into_iter()
            })
            .collect();
        let fields = written()
            .filter_map(|h| {
                Some((
                    HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                    HeaderValue::from_str(&h.value).ok()?,
                ))
            })
            .collect();
        Some(HeaderEdits {
            dropped,
            lines: lines.into_boxed_slice(),
            fields,
        })
    }

    /// Whether the fields named `name` (any case) go.
    pub fn drops(&self, name: &[u8]) -> bool {
        self.dropped
            .iter()
            .any(|dropped| name.eq_ignore_ascii_case(dropped.as_str().as_bytes()))
    }

    /// The fields written, as HTTP/1.1 header lines.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Applies the changes to an HTTP/2 (or hyper) header map.
    pub fn apply(&self, headers: &mut hyper::HeaderMap) {
        for name in &self.dropped {
            headers.remove(name);
        }
        for (name, value) in &self.fields {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl RoutePlan {
    /// Picks a backend by weight; `roll` is a uniformly random `u32`. Not for a redirect
    /// route, which has none.
    pub fn choose(&self, roll: u32) -> Chosen<'_> {
        debug_assert!(
            !self.backends.is_empty(),
            "a route with no backend to choose"
        );
        let cluster = match &*self.backends {
            [(only, _)] => *only,
            backends => {
                let total = backends.last().map_or(1, |&(_, sum)| sum.max(1));
                // Lemire's multiply-shift maps the roll onto [0, total) without division.
                let point = ((u64::from(roll) * u64::from(total)) >> 32) as u32;
                backends
                    .iter()
                    .find(|&&(_, sum)| point < sum)
                    .or(backends.last())
                    .map_or(0, |&(cluster, _)| cluster)
            }
        };
        Chosen {
            cluster,
            timeout: self.timeout,
            response_headers: self.response_headers.as_ref(),
        }
    }

    /// The target (path and query) a request for `target` goes upstream with under the
    /// route's path rewrite: the path rewritten, the query kept.
    pub fn rewritten_target(&self, rewrite: &config::PathRewrite, target: &[u8]) -> Vec<u8> {
        let (path, query) = split_query(target);
        let mut rewritten = rewrite.apply(path, self.path.prefix());
        rewritten.extend_from_slice(query);
        rewritten
    }

    /// The `Location` the route's `redirect` answers a request for `host` (as the request
    /// named it: it may carry a port) and `target` with: the request's URL with the parts
    /// the redirect names replaced. The port is the redirect's, or with a scheme of its own
    /// that scheme's, or else the request's; it is left out when it is the scheme's own.
    /// None when the request's host is not a plain host name or IP address and port (user
    /// info such as `a.example:1@evil.example` would send the client elsewhere).
    pub fn location(
        &self,
        redirect: &config::Redirect,
        host: &[u8],
        target: &[u8],
    ) -> Option<Vec<u8>> {
        let scheme = redirect.scheme.as_deref().unwrap_or("http");
        let (request_host, request_port) = split_port(host);
        if !plain_host(request_host) || request_port.is_some_and(|port| !plain_port(port)) {
            return None;
        }
        let hostname = redirect
            .hostname
            .as_deref()
            .map_or(request_host, str::as_bytes);
        if hostname.is_empty() {
            // An HTTP/1.0 request without Host: `http:///evil.example/x` would be read as a
            // URL on the host its path names.
            return None;
        }
        let port = match (redirect.port, &redirect.scheme) {
            (Some(port), _) => Some(port.to_string().into_bytes()),
            (None, Some(_)) => None,
            (None, None) => request_port.map(<[u8]>::to_vec),
        };
        let well_known: &[u8] = if scheme == "https" { b"443" } else { b"80" };
        let (path, query) = split_query(target);
        let path = match &redirect.path {
            Some(rewrite) => rewrite.apply(path, self.path.prefix()),
            None if path.is_empty() => b"/".to_vec(),
            None => path.to_vec(),
        };
        let mut location = Vec::with_capacity(scheme.len() + hostname.len() + target.len() + 16);
        location.extend_from_slice(scheme.as_bytes());
        location.extend_from_slice(b"://");
        location.extend_from_slice(hostname);
        if let Some(port) = port.filter(|p| p != well_known) {
            location.push(b':');
            location.extend_from_slice(&port);
        }
        location.extend_from_slice(&path);
        location.extend_from_slice(query);
        Some(location)
    }

    /// Gateway API's precedence among a host's routes, highest first when sorted in
    /// reverse: an exact path, then a regular expression (the longest pattern first), then
    /// the longest prefix, then a method match, then the most header matches, then the most
    /// query matches.
    fn precedence(&self) -> (u8, usize, bool, usize, usize) {
        (
            match &self.path {
                PathPlan::Exact(_) => 2,
                PathPlan::Regex(..) => 1,
                PathPlan::Prefix(_) => 0,
            },
            match &self.path {
                PathPlan::Exact(path) | PathPlan::Prefix(path) => path.len(),
                PathPlan::Regex(_, len) => *len,
            },
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    /// Whether a request matches this route (its host matched already).
    fn matches(
        &self,
        (method, target): (&[u8], &[u8]),
        headers: &impl RequestHeaders,
        regexes: &Regexes,
    ) -> bool {
        let path_matches = match &self.path {
            PathPlan::Prefix(prefix) => prefix_matches(prefix, target),
            PathPlan::Exact(exact) => path_of(target) == exact.as_bytes(),
            PathPlan::Regex(index, _) => regexes.is_match(*index, path_of(target)),
        };
        path_matches
            && self.method.as_deref().is_none_or(|m| m == method)
            && self.headers.iter().all(|(name, value)| {
                headers
                    .header(name)
                    .is_some_and(|v| value.matches(v, regexes))
            })
            && self
                .query
                .iter()
                .all(|(name, value)| query_matches(target, name.as_bytes(), value, regexes))
    }
}

impl RouteTable {
    /// Compiles a listener's routes, each with its backends (cluster index and running
    /// weight total). Fails only on a regular expression that does not compile, which
    /// validation refuses first.
    pub(crate) fn new<'a>(
        routes: impl Iterator<Item = (&'a config::Route, Box<[(usize, u32)]>)>,
        regexes: &mut Regexes,
    ) -> Result<RouteTable, String> {
        let mut hosts: Vec<HostRoutes> = Vec::new();
        for (route, backends) in routes {
            let host = HostMatch::parse(&route.host);
            let mut values = |matches: &[config::ValueMatch], lower: bool| {
                matches
                    .iter()
                    .map(|m| {
                        let name = if lower {
                            m.name.to_ascii_lowercase()
                        } else {
                            m.name.clone()
                        };
                        Ok((name.into_boxed_str(), ValuePlan::new(m, regexes)?))
                    })
                    .collect::<Result<ValueMatches, String>>()
            };
            let headers = values(&route.headers, true)?;
            let query = values(&route.query, false)?;
            let plan = RoutePlan {
                path: match &route.path {
                    PathMatch::Prefix(prefix) => PathPlan::Prefix(prefix.as_str().into()),
                    PathMatch::Exact(exact) => PathPlan::Exact(exact.as_str().into()),
                    PathMatch::Regex(regex) => PathPlan::Regex(regexes.add(regex)?, regex.len()),
                },
                method: route.method.as_ref().map(|m| m.as_bytes().into()),
                headers,
                query,
                backends,
                timeout: route.timeout,
                request_headers: HeaderEdits::new(&route.request_headers),
                response_headers: HeaderEdits::new(&route.response_headers),
                rewrite: route.rewrite.clone(),
                redirect: route.redirect.clone(),
            };
            match hosts.iter_mut().find(|h| h.host == host) {
                Some(h) => h.routes.push(plan),
                None => hosts.push(HostRoutes {
                    host,
                    routes: vec![plan],
                }),
            }
        }
        for h in &mut hosts {
            // Stable, so among equals the first declared wins.
            h.routes.sort_by_key(|r| std::cmp::Reverse(r.precedence()));
        }
        hosts.sort_by_key(|h| match &h.host {
            HostMatch::Exact(_) => (0, 0),
            HostMatch::Suffix(s) => (1, usize::MAX - s.len()),
            HostMatch::Any => (2, 0),
        });
        Ok(RouteTable { hosts })
    }

    /// Picks the route for a request: the most specific matching host (exact, then the
    /// longest wildcard suffix, then `*`) that has a matching route, and within it the most
    /// specific route that matches (Gateway API's precedence: an exact path, a regular
    /// expression, the longest prefix, a method, the most headers, the most query
    /// parameters). `host` may carry a
    /// port; `target` is the path with its query; `headers` is asked only about routes that
    /// match on headers; `regexes` are the worker's copies of the snapshot's.
    pub fn route(
        &self,
        host: &[u8],
        (method, target): (&[u8], &[u8]),
        headers: &impl RequestHeaders,
        regexes: &Regexes,
    ) -> Option<&RoutePlan> {
        let host = strip_port(host);
        self.hosts
            .iter()
            .filter(|h| h.host.matches(host))
            .find_map(|h| {
                h.routes
                    .iter()
                    .find(|r| r.matches((method, target), headers, regexes))
            })
    }
}

/// A request's headers, as routing asks for them.
pub trait RequestHeaders {
    /// The value of the header `name` (lower case), if the request has it.
    fn header(&self, name: &str) -> Option<&[u8]>;
}

/// No headers (a request routed by host and path alone).
impl RequestHeaders for () {
    fn header(&self, _: &str) -> Option<&[u8]> {
        None
    }
}

impl RequestHeaders for hyper::HeaderMap {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }
}

/// The header lines of an HTTP/1.1 request head, as received.
pub struct RawHead<'a>(pub &'a [u8]);

impl<'a> RawHead<'a> {
    /// The fields named `name` (lower case), each as where its value starts in the head and
    /// the value.
    fn fields<'n>(&self, name: &'n str) -> impl Iterator<Item = (usize, &'a [u8])> + 'n
    where
        'a: 'n,
    {
        // The head was parsed already: lines end in \n (\r\n), fields are `name: value`.
        let mut start = 0;
        self.0
            .split(|&b| b == b'\n')
            .map(move |line| {
                let at = start;
                start += line.len() + 1;
                (at, line)
            })
            .skip(1)
            .filter_map(move |(at, line)| {
                let colon = line.iter().position(|&b| b == b':')?;
                if !line[..colon].eq_ignore_ascii_case(name.as_bytes()) {
                    return None;
                }
                let value = &line[colon + 1..];
                let leading = value.len() - value.trim_ascii_start().len();
                Some((at + colon + 1 + leading, value.trim_ascii()))
            })
    }

    /// The field `name` (lower case) when the head has exactly one: where its value starts
    /// in the head, and the value.
    pub fn only(&self, name: &str) -> Option<(usize, &'a [u8])> {
        let mut fields = self.fields(name);
        let first = fields.next()?;
        fields.next().is_none().then_some(first)
    }
}

impl RequestHeaders for RawHead<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields(name).next().map(|(_, value)| value)
    }
}

impl HostMatch {
    fn parse(pattern: &str) -> HostMatch {
        if pattern == "*" {
            HostMatch::Any
        } else if let Some(rest) = pattern.strip_prefix('*') {
            HostMatch::Suffix(rest.to_ascii_lowercase().into())
        } else {
            HostMatch::Exact(pattern.to_ascii_lowercase().into())
        }
    }

    fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(name) => host.eq_ignore_ascii_case(name.as_bytes()),
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn strip_port(host: &[u8]) -> &[u8] {
    let end = match host.iter().rposition(|&b| b == b':') {
        Some(colon) if !host[colon..].contains(&b']') => colon,
        _ => host.len(),
    };
    &host[..end]
}

/// `example.com:8080` → (`example.com`, `8080`); `[::1]` → (`[::1]`, none).
fn split_port(host: &[u8]) -> (&[u8], Option<&[u8]>) {
    let name = strip_port(host);
    let port = host.get(name.len() + 1..).filter(|port| !port.is_empty());
    (name, port)
}

/// Whether a request's host (its port taken off) is a plain host name or IPv4 address
/// (letters, digits, `-`, `.`, `_`) or a bracketed IPv6 address.
fn plain_host(host: &[u8]) -> bool {
    match host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        Some(ip) => {
            !ip.is_empty()
                && ip
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'),
    }
}

/// Whether a request's port is one: 1 to 5 digits, at most 65535.
fn plain_port(port: &[u8]) -> bool {
    port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(port)
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
            .is_some()
}

/// A request target's path and its query (from the `?`, empty when there is none).
fn split_query(target: &[u8]) -> (&[u8], &[u8]) {
    let end = target
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(target.len());
    target.split_at(end)
}

/// A request target's path: without its query or fragment.
fn path_of(target: &[u8]) -> &[u8] {
    let end = target
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    &target[..end]
}

/// Gateway API `PathPrefix`: whole segments only; the query is not part of the path.
fn prefix_matches(prefix: &str, path: &[u8]) -> bool {
    let prefix = prefix.as_bytes();
    if !path.starts_with(prefix) {
        return false;
    }
    prefix.ends_with(b"/") || matches!(path.get(prefix.len()), None | Some(b'/' | b'?' | b'#'))
}

/// Whether the first parameter named `name` in `target`'s query has a value `value`
/// matches, both percent-decoded (`+` is not a space: that is HTML forms', not URIs').
fn query_matches(target: &[u8], name: &[u8], value: &ValuePlan, regexes: &Regexes) -> bool {
    let Some(start) = target.iter().position(|&b| b == b'?') else {
        return false;
    };
    let query = &target[start + 1..];
    let query = &query[..query.iter().position(|&b| b == b'#').unwrap_or(query.len())];
    let found = query.split(|&b| b == b'&').find_map(|pair| {
        let (key, found) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &b""[..]),
        };
        percent_decoded(key)
            .eq(name.iter().copied())
            .then_some(found)
    });
    match (found, value) {
        (None, _) => false,
        (Some(found), ValuePlan::Exact(exact)) => percent_decoded(found).eq(exact.iter().copied()),
        // Decoded first only where there is an escape to decode.
        (Some(found), ValuePlan::Regex(_)) if !found.contains(&b'%') => {
            value.matches(found, regexes)
        }
        (Some(found), ValuePlan::Regex(_)) => {
            value.matches(&percent_decoded(found).collect::<Vec<u8>>(), regexes)
        }
    }
}

/// `bytes` with each `%XX` escape decoded; a `%` not followed by two hex digits stays as it
/// is.
fn percent_decoded(bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut i = 0;
    std::iter::from_fn(move || {
        let b = *bytes.get(i)?;
        if b == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            i += 3;
            return Some(hi << 4 | lo);
        }
        i += 1;
        Some(b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{ListenerKind, Snapshot};

    fn snapshot(yaml: &str) -> Snapshot {
        let config = shared::Config::from_yaml(yaml, "test").unwrap();
        Snapshot::compile(config, None, 1, "test".into()).unwrap()
    }

    fn table(s: &Snapshot) -> &RouteTable {
        let ListenerKind::Http(table) = &s.listeners[0].kind else {
            panic!("not http")
        };
        table
    }

    const ROUTES: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - { path_prefix: /, cluster: fallback }
      - { host: "*.example.com", path_prefix: /, cluster: wildcard }
      - { host: api.example.com, path_prefix: /v1, cluster: v1 }
      - { host: api.example.com, path_prefix: /v1/admin, cluster: admin }
      - { host: "*.deep.example.com", cluster: deep }
clusters:
  - { name: fallback, endpoints: [127.0.0.1:1] }
  - { name: wildcard, endpoints: [127.0.0.1:2] }
  - { name: v1, endpoints: [127.0.0.1:3] }
  - { name: admin, endpoints: [127.0.0.1:4] }
  - { name: deep, endpoints: [127.0.0.1:5] }
"#;

    fn route_to(s: &Snapshot, host: &str, path: &str) -> Option<String> {
        let ListenerKind::Http(table) = &s.listeners[0].kind else {
            panic!("not http")
        };
        table
            .route(host.as_bytes(), (b"GET", path.as_bytes()), &(), &s.regexes)
            .map(|r| s.clusters[r.choose(0).cluster].name.to_string())
    }

    #[test]
    fn a_split_sends_each_backend_its_share_and_none_to_weight_zero() {
        let s = snapshot(
            r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - backends: [{ cluster: a, weight: 3 }, { cluster: off, weight: 0 }, { cluster: b, weight: 1 }]
clusters:
  - { name: a, endpoints: [127.0.0.1:1] }
  - { name: off, endpoints: [127.0.0.1:2] }
  - { name: b, endpoints: [127.0.0.1:3] }
"#,
        );
        let ListenerKind::Http(table) = &s.listeners[0].kind else {
            panic!("not http")
        };
        let route = table.route(b"x", (b"GET", b"/"), &(), &s.regexes).unwrap();
        // Evenly spread rolls: exactly the weights' shares.
        let mut counts = [0usize; 3];
        for i in 0..4096u32 {
            counts[route.choose(i << 20).cluster] += 1;
        }
        assert_eq!(counts, [3072, 0, 1024]);
        assert_eq!(route.choose(u32::MAX).cluster, 2);
        assert_eq!(route.choose(0).cluster, 0);
    }

    #[test]
    fn most_specific_host_then_longest_prefix_wins() {
        let s = snapshot(ROUTES);
        let cases = [
            ("api.example.com", "/v1/users", "v1"),
            ("API.Example.com:8080", "/v1?x=1", "v1"),
            ("api.example.com", "/v1/admin/x", "admin"),
            ("api.example.com", "/v1x", "wildcard"),
            ("api.example.com", "/other", "wildcard"),
            ("www.example.com", "/", "wildcard"),
            ("x.deep.example.com", "/", "deep"),
            ("example.com", "/", "fallback"),
            ("[::1]:80", "/", "fallback"),
            ("", "/", "fallback"),
        ];
        for (host, path, cluster) in cases {
            assert_eq!(
                route_to(&s, host, path).as_deref(),
                Some(cluster),
                "{host}{path}"
            );
        }
    }

    #[test]
    fn header_matches_narrow_a_route_and_the_most_specific_wins() {
        let s = snapshot(
            r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - { path_prefix: /api, cluster: stable }
      - { path_prefix: /api, headers: [{ name: X-Canary, value: "yes" }], cluster: canary }
      - path_prefix: /api
        headers: [{ name: x-canary, value: "yes" }, { name: x-user, value: ops }]
        cluster: ops
clusters:
  - { name: stable, endpoints: [127.0.0.1:1] }
  - { name: canary, endpoints: [127.0.0.1:2] }
  - { name: ops, endpoints: [127.0.0.1:3] }
"#,
        );
        let ListenerKind::Http(table) = &s.listeners[0].kind else {
            panic!("not http")
        };
        let to = |head: &str| {
            let head = head.replace('\n', "\r\n");
            table
                .route(
                    b"x",
                    (b"GET", b"/api/v1"),
                    &RawHead(head.as_bytes()),
                    &s.regexes,
                )
                .map(|r| s.clusters[r.choose(0).cluster].name.to_string())
        };
        assert_eq!(
            to("GET /api/v1 HTTP/1.1\nHost: x\n\n").as_deref(),
            Some("stable")
        );
        assert_eq!(
            to("GET /api/v1 HTTP/1.1\nHost: x\nx-canary:  yes \n\n").as_deref(),
            Some("canary")
        );
        assert_eq!(
            to("GET /api/v1 HTTP/1.1\nX-User: ops\nX-CANARY: yes\n\n").as_deref(),
            Some("ops")
        );
        assert_eq!(
            to("GET /api/v1 HTTP/1.1\nx-canary: YES\n\n").as_deref(),
            Some("stable"),
            "values match exactly"
        );
        let mut map = hyper::HeaderMap::new();
        map.insert("x-canary", "yes".parse().unwrap());
        let route = table
            .route(b"x", (b"GET", b"/api"), &map, &s.regexes)
            .unwrap();
        assert_eq!(&*s.clusters[route.choose(0).cluster].name, "canary");
    }

    #[test]
    fn no_route_when_nothing_matches() {
        let s = snapshot(&ROUTES.replace(
            "- { path_prefix: /, cluster: fallback }",
            "- { path_prefix: /only, cluster: fallback }",
        ));
        assert_eq!(route_to(&s, "example.com", "/").as_deref(), None);
        assert_eq!(
            route_to(&s, "example.com", "/only/x").as_deref(),
            Some("fallback")
        );
        assert_eq!(route_to(&s, "example.com", "/onlyx").as_deref(), None);
    }

    #[test]
    fn segment_boundaries() {
        assert!(prefix_matches("/api", b"/api"));
        assert!(prefix_matches("/api", b"/api/"));
        assert!(prefix_matches("/api", b"/api?q"));
        assert!(!prefix_matches("/api", b"/apix"));
        assert!(prefix_matches("/api/", b"/api/x"));
        assert!(!prefix_matches("/api/", b"/api"));
        assert!(prefix_matches("/", b"/anything"));
    }

    #[test]
    fn an_exact_path_beats_any_prefix_and_matches_only_itself() {
        let s = snapshot(
            r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - { path_prefix: /api/items/long/prefix, cluster: long }
      - { path_prefix: /api, cluster: prefix }
      - { path_exact: /api/items, cluster: exact }
clusters:
  - { name: long, endpoints: [127.0.0.1:1] }
  - { name: prefix, endpoints: [127.0.0.1:2] }
  - { name: exact, endpoints: [127.0.0.1:3] }
"#,
        );
        let to = |target: &str| {
            table(&s)
                .route(b"x", (b"GET", target.as_bytes()), &(), &s.regexes)
                .map(|r| s.clusters[r.choose(0).cluster].name.to_string())
        };
        assert_eq!(to("/api/items").as_deref(), Some("exact"));
        assert_eq!(to("/api/items?page=2").as_deref(), Some("exact"));
        assert_eq!(to("/api/items/").as_deref(), Some("prefix"));
        assert_eq!(to("/api/items/7").as_deref(), Some("prefix"));
        assert_eq!(to("/api/items/long/prefix/x").as_deref(), Some("long"));
    }

    #[test]
    fn a_method_match_ranks_above_header_and_query_matches() {
        let s = snapshot(
            r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - { path_prefix: /api, cluster: any }
      - path_prefix: /api
        headers: [{ name: x-a, value: "1" }, { name: x-b, value: "1" }]
        query: [{ name: q, value: "1" }]
        cluster: matched
      - { path_prefix: /api, method: POST, cluster: post }
      - { path_prefix: /api/v1, cluster: longer }
clusters:
  - { name: any, endpoints: [127.0.0.1:1] }
  - { name: matched, endpoints: [127.0.0.1:2] }
  - { name: post, endpoints: [127.0.0.1:3] }
  - { name: longer, endpoints: [127.0.0.1:4] }
"#,
        );
        let mut headers = hyper::HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert("x-b", HeaderValue::from_static("1"));
        let to = |method: &str, target: &str| {
            table(&s)
                .route(
                    b"x",
                    (method.as_bytes(), target.as_bytes()),
                    &headers,
                    &s.regexes,
                )
                .map(|r| s.clusters[r.choose(0).cluster].name.to_string())
        };
        assert_eq!(to("POST", "/api?q=1").as_deref(), Some("post"));
        assert_eq!(
            to("post", "/api?q=1").as_deref(),
            Some("matched"),
            "methods are case-sensitive"
        );
        assert_eq!(to("GET", "/api?q=1").as_deref(), Some("matched"));
        assert_eq!(to("GET", "/api?q=2").as_deref(), Some("any"));
        assert_eq!(
            to("POST", "/api/v1").as_deref(),
            Some("longer"),
            "a longer prefix first"
        );
    }

    #[test]
    fn regular_expressions_match_whole_paths_headers_and_query_values() {
        let s = snapshot(
            r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - { path_prefix: /items, cluster: prefix }
      - { path_regex: "/items/[0-9]+", cluster: regex }
      - { path_exact: /items/0, cluster: exact }
      - path_prefix: /users
        headers: [{ name: X-Team, value: "ops|dev", regex: true }]
        query: [{ name: id, value: "[a-z]+ [0-9]", regex: true }]
        cluster: matched
      - { path_prefix: /users, cluster: prefix }
clusters:
  - { name: prefix, endpoints: [127.0.0.1:1] }
  - { name: regex, endpoints: [127.0.0.1:2] }
  - { name: exact, endpoints: [127.0.0.1:3] }
  - { name: matched, endpoints: [127.0.0.1:4] }
"#,
        );
        let to = |target: &str, team: &str| {
            let mut headers = hyper::HeaderMap::new();
            headers.insert("x-team", HeaderValue::from_str(team).unwrap());
            table(&s)
                .route(b"x", (b"GET", target.as_bytes()), &headers, &s.regexes)
                .map(|r| s.clusters[r.choose(0).cluster].name.to_string())
        };
        // An exact path, then a regular expression, then a prefix.
        assert_eq!(to("/items/0", "").as_deref(), Some("exact"));
        assert_eq!(to("/items/42?x=1", "").as_deref(), Some("regex"));
        // Anchored: the whole path must match.
        assert_eq!(to("/items/42/more", "").as_deref(), Some("prefix"));
        assert_eq!(to("/items/x42", "").as_deref(), Some("prefix"));
        assert_eq!(to("/users?id=abc%209", "dev").as_deref(), Some("matched"));
        assert_eq!(to("/users?id=abc%209", "devops").as_deref(), Some("prefix"));
        assert_eq!(to("/users?id=abc9", "ops").as_deref(), Some("prefix"));
    }

    #[test]
    fn a_query_match_compares_the_first_parameter_of_its_name_decoded() {
        let cases: [(&str, &str, &str, bool); 12] = [
            ("/p?mode=fast", "mode", "fast", true),
            ("/p?a=1&mode=fast&b", "mode", "fast", true),
            ("/p?mode=slow&mode=fast", "mode", "fast", false),
            ("/p?mode=fast%20lane", "mode", "fast lane", true),
            ("/p?mode=fast+lane", "mode", "fast lane", false),
            ("/p?mo%64e=x", "mode", "x", true),
            ("/p?mode=%zz", "mode", "%zz", true),
            ("/p?mode", "mode", "", true),
            ("/p?Mode=fast", "mode", "fast", false),
            ("/p?mode=fast#frag", "mode", "fast", true),
            ("/p", "mode", "fast", false),
            ("/p?modex=fast", "mode", "fast", false),
        ];
        for (target, name, value, expected) in cases {
            assert_eq!(
                query_matches(
                    target.as_bytes(),
                    name.as_bytes(),
                    &ValuePlan::Exact(value.as_bytes().into()),
                    &Regexes::default()
                ),
                expected,
                "{target} {name}={value}"
            );
        }
    }

    #[test]
    fn a_redirect_replaces_the_parts_of_the_url_it_names() {
        let s = snapshot(
            r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - { path_exact: /same, redirect: {} }
      - { path_exact: /secure, redirect: { scheme: https, status: 301 } }
      - { path_exact: /port, redirect: { port: 80 } }
      - { path_prefix: /old, redirect: { scheme: https, hostname: b.example, port: 8443, path: { replace_prefix_match: /new } } }
      - { path_prefix: /full, redirect: { path: { replace_full_path: /z } } }
      - { path_prefix: /, rewrite: { path: { replace_prefix_match: /api } }, cluster: app }
clusters:
  - { name: app, endpoints: [127.0.0.1:1] }
"#,
        );
        let location = |host: &str, target: &str| {
            let route = table(&s)
                .route(
                    host.as_bytes(),
                    (b"GET", target.as_bytes()),
                    &(),
                    &s.regexes,
                )
                .unwrap();
            let redirect = route.redirect.as_ref().unwrap();
            route
                .location(redirect, host.as_bytes(), target.as_bytes())
                .map(|l| String::from_utf8(l).unwrap())
        };
        let cases = [
            (
                "a.example:8080",
                "/same?q=1",
                "http://a.example:8080/same?q=1",
            ),
            ("a.example", "/same", "http://a.example/same"),
            ("a.example:8080", "/secure", "https://a.example/secure"),
            ("a.example:8080", "/port", "http://a.example/port"),
            (
                "a.example",
                "/old/x?y=2",
                "https://b.example:8443/new/x?y=2",
            ),
            ("a.example", "/old", "https://b.example:8443/new"),
            ("[::1]:8080", "/full/deep?k", "http://[::1]:8080/z?k"),
        ];
        for (host, target, expected) in cases {
            assert_eq!(
                location(host, target).as_deref(),
                Some(expected),
                "{host}{target}"
            );
        }
        // A host the client could be sent elsewhere by gets no redirect.
        for host in [
            "a.example:1@evil.example",
            "a.example:99999",
            "a.example:x",
            "a b",
            "[zz]",
            "",
        ] {
            assert_eq!(location(host, "/same"), None, "{host}");
        }
        let rewrite = table(&s)
            .route(b"a", (b"GET", b"/v1?x"), &(), &s.regexes)
            .unwrap();
        let path = rewrite.rewrite.as_ref().unwrap().path.as_ref().unwrap();
        assert_eq!(rewrite.rewritten_target(path, b"/v1?x"), b"/api/v1?x");
    }

    #[test]
    fn header_edits_remove_then_set_then_add() {
        let header = |name: &str, value: &str| config::Header {
            name: name.into(),
            value: value.into(),
        };
        let modifier = config::HeaderModifier {
            set: vec![header("X-Env", "prod")],
            add: vec![header("x-tag", "b")],
            remove: vec!["X-Debug".into()],
        };
        let edits = HeaderEdits::new(&modifier).unwrap();
        let mut headers = hyper::HeaderMap::new();
        headers.append("x-env", HeaderValue::from_static("dev"));
        headers.append("x-env", HeaderValue::from_static("test"));
        headers.append("x-tag", HeaderValue::from_static("a"));
        headers.append("x-debug", HeaderValue::from_static("1"));
        headers.append("x-kept", HeaderValue::from_static("1"));
        edits.apply(&mut headers);
        let values = |name: &str| -> Vec<&str> {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(values("x-env"), ["prod"]);
        assert_eq!(values("x-tag"), ["a", "b"]);
        assert!(values("x-debug").is_empty());
        assert_eq!(values("x-kept"), ["1"]);
        assert_eq!(edits.lines(), b"X-Env: prod\r\nx-tag: b\r\n");
        assert!(HeaderEdits::new(&config::HeaderModifier::default()).is_none());
    }
}
