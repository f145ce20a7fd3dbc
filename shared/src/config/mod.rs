//! The proxy's configuration: listeners, routes, clusters, endpoints, timeouts and limits.
//!
//! This is the typed model a `tern-proxy` runs from, whether it was read from a local YAML
//! file (the mode that needs no control plane) or, later, pushed by `tern-control`. Every
//! value is checked once, here, by [`Config::validate`]; a `Config` that passed validation is
//! safe to compile into the data plane's routing tables without further checks.
//!
//! This module owns parsing and validation only; it does no IO besides
//! [`Config::from_file`], and knows nothing about sockets or runtimes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

/// A whole proxy configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the proxy accepts connections, and what it does with them.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Named groups of upstream endpoints.
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// HTTP/1.1 limits and downstream timeouts, shared by every HTTP listener.
    #[serde(default)]
    pub http: HttpSettings,
    /// This proxy's workload identity, needed by any listener or cluster that uses mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySource>,
    /// Get listeners and clusters from `tern-control` too (it needs `identity.ca`: the same
    /// server, root and token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Discovery>,
    /// Transparent mode: take the connections `tern-proxy init` redirects (outbound and
    /// inbound), and serve each as the listener whose `intercept` address is its original
    /// destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interception: Option<Interception>,
    /// How long `detect` listeners wait for a plaintext client's first bytes before treating
    /// the connection as opaque TCP (a server-speaks-first protocol on a port not declared
    /// opaque waits this long once per connection).
    #[serde(default = "default_detect_timeout", with = "humantime_serde")]
    pub detect_timeout: Duration,
}

/// The proxy's side of traffic interception: where redirected connections arrive and what
/// happens to those no listener claims.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interception {
    /// Where `tern-proxy init` sends the pod's outbound TCP (bound on `0.0.0.0`, and `[::]`
    /// when `ipv6`).
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    /// Where `tern-proxy init` sends the pod's inbound TCP.
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    /// Also take IPv6 connections.
    #[serde(default = "default_true")]
    pub ipv6: bool,
    /// What happens to outbound connections to a destination no listener claims (outside
    /// the mesh): `allow_any` passes them through, `registry_only` refuses them.
    #[serde(default)]
    pub outbound_policy: OutboundPolicy,
    /// mTLS on inbound ports no listener claims; they are passed to the application as
    /// opaque TCP. Permissive by default, as Istio's default PeerAuthentication.
    #[serde(default = "default_inbound_tls")]
    pub inbound_tls: ListenerTls,
    /// Intercepted destinations known to be outside the mesh (tern-control says so when asked
    /// about them): the outbound policy applies to them at once, without asking again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outside_mesh: Vec<SocketAddr>,
    /// A socket mark set on every connection the proxy opens, so the interception rules
    /// leave them alone (`tern-proxy init --proxy-mark`); needs `CAP_NET_ADMIN`. Without it
    /// the proxy must run as the excluded UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<u32>,
}

/// Outbound traffic to destinations outside the mesh (Istio's `outboundTrafficPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundPolicy {
    /// Passed through to the original destination, as opaque TCP.
    #[default]
    AllowAny,
    /// Refused (closed).
    RegistryOnly,
}

/// Which intercepted connections a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Intercept {
    /// The application's outbound connections to `address` (a Service's address).
    Outbound,
    /// Peers' connections to `address` (this Pod's address and an application port; an
    /// unspecified IP matches any of the Pod's addresses on that port).
    Inbound,
}

impl Default for Interception {
    fn default() -> Self {
        Interception {
            outbound_port: default_outbound_port(),
            inbound_port: default_inbound_port(),
            ipv6: true,
            outbound_policy: OutboundPolicy::default(),
            inbound_tls: default_inbound_tls(),
            outside_mesh: Vec::new(),
            mark: None,
        }
    }
}

/// What this proxy asks `tern-control` for: the config of the workload it runs beside, and
/// listeners for the destinations it talks to. What `tern-control` sends is added to the
/// file's own listeners and clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// The workload (a Pod, `<namespace>/<name>`) this proxy runs beside; its inbound
    /// listeners come from the Services that select it.
    pub workload: WorkloadRef,
    /// Destinations to listen for (explicit mode; with interception, listeners follow the
    /// traffic instead).
    #[serde(default)]
    pub outbound: Vec<Outbound>,
}

/// A Pod, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRef {
    /// The Pod's namespace.
    pub namespace: String,
    /// The Pod's name.
    pub name: String,
}

/// A destination Service port and where this proxy listens for traffic to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// `<name>.<namespace>`.
    pub service: String,
    /// The Service's port.
    pub port: u16,
    /// Where the application connects to reach it.
    pub listen: SocketAddr,
}

/// Where this proxy's workload identity comes from: `identity: { files: {...} }` or
/// `identity: { ca: {...} }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "IdentityFields", into = "IdentityFields")]
pub enum IdentitySource {
    /// PEM files the operator provides and rotates (SIGHUP reloads them).
    Files(IdentityFiles),
    /// Certificates from `tern-control`'s CA, for a key generated in the proxy and never
    /// sent anywhere; renewed automatically before they expire.
    Ca(CaClient),
}

/// The YAML shape of [`IdentitySource`]: exactly one of the two keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    files: Option<IdentityFiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca: Option<CaClient>,
}

impl TryFrom<IdentityFields> for IdentitySource {
    type Error = &'static str;

    fn try_from(fields: IdentityFields) -> Result<Self, Self::Error> {
        match (fields.files, fields.ca) {
            (Some(files), None) => Ok(IdentitySource::Files(files)),
            (None, Some(ca)) => Ok(IdentitySource::Ca(ca)),
            _ => Err("identity takes exactly one of `files` or `ca`"),
        }
    }
}

impl From<IdentitySource> for IdentityFields {
    fn from(source: IdentitySource) -> Self {
        match source {
            IdentitySource::Files(files) => IdentityFields {
                files: Some(files),
                ca: None,
            },
            IdentitySource::Ca(ca) => IdentityFields {
                files: None,
                ca: Some(ca),
            },
        }
    }
}

/// A host (a DNS name or an IP address) and a port, as `host:port` (`[v6]:port` for an IPv6
/// address): how a proxy names `tern-control`, which in a cluster is a Service's DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    /// The DNS name or IP address (without brackets).
    pub host: String,
    /// The port.
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<HostPort, String> {
        let bad = || format!("`{text}` is not host:port");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').ok_or_else(bad)?,
            None if host.contains(':') => {
                return Err(format!(
                    "`{text}`: an IPv6 address goes in brackets, `[addr]:port`"
                ));
            }
            None => host,
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0
            || host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
        {
            return Err(bad());
        }
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;

    fn try_from(text: String) -> Result<HostPort, String> {
        text.parse()
    }
}

impl From<HostPort> for String {
    fn from(address: HostPort) -> String {
        address.to_string()
    }
}

/// How to get certificates from `tern-control`'s CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaClient {
    /// The CA's gRPC address, e.g. `127.0.0.1:15012` or, in a cluster,
    /// `tern-control.tern-system.svc:15012` (resolved at each connection); always spoken to
    /// over TLS.
    pub address: HostPort,
    /// The name the CA's serving certificate carries (`tern-control` unless changed).
    #[serde(default = "default_ca_server_name")]
    pub server_name: String,
    /// PEM roots that the CA's serving certificate must lead to (the mesh root, e.g. from
    /// `tern-control`'s state directory).
    pub root: PathBuf,
    /// The identity to ask for.
    pub spiffe_id: SpiffeId,
    /// A file holding the credential that proves `spiffe_id` (a bootstrap token from
    /// `tern-control token`); read at every request, so it can be replaced.
    pub token_file: PathBuf,
}

/// Where this proxy's identity lives, as PEM files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    /// Certificate chain, leaf first; the leaf carries the SPIFFE ID as its one URI SAN.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
    /// CA certificates peers' chains must lead to.
    pub trust_bundle: PathBuf,
}

/// mTLS on a listener (like Istio's PeerAuthentication): whether peers must, may or may not
/// use mTLS with a certificate from the trust bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// `strict`, `permissive` or `disable`.
    pub mode: TlsMode,
    /// Time allowed for a client to finish its handshake.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

/// How a listener treats plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// mTLS only; plaintext and TLS without a client certificate are refused.
    Strict,
    /// mTLS or plaintext, told apart by the first byte (a TLS handshake record starts with
    /// 0x16), for migrating workloads onto the mesh. The client must speak first.
    Permissive,
    /// Plaintext only, as if `tls` were absent.
    Disable,
}

/// mTLS to a cluster: the endpoints are sidecars that must prove this identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// The SPIFFE ID the endpoints' certificates must carry.
    pub identity: SpiffeId,
    /// The TLS 1.3 cipher suites to offer, most preferred first; all three by default
    /// (AES-256-GCM, AES-128-GCM, ChaCha20-Poly1305, in rustls' order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher_suites: Option<Vec<CipherSuite>>,
}

/// A TLS 1.3 cipher suite; each also has a kernel-TLS implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CipherSuite {
    /// AES-128 in GCM mode.
    #[serde(rename = "TLS13_AES_128_GCM_SHA256")]
    Aes128GcmSha256,
    /// AES-256 in GCM mode.
    #[serde(rename = "TLS13_AES_256_GCM_SHA384")]
    Aes256GcmSha384,
    /// ChaCha20-Poly1305 (fast without AES instructions).
    #[serde(rename = "TLS13_CHACHA20_POLY1305_SHA256")]
    Chacha20Poly1305Sha256,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: bytes are forwarded to one cluster, unparsed.
    Tcp,
    /// HTTP/1.1 and HTTP/2: requests are parsed and routed ([`Route`]).
    Http,
    /// Told by the client's first bytes: HTTP/1.1 is routed by `routes` (every request to
    /// `cluster` when there are none); anything else (the HTTP/2 preface, a TLS
    /// ClientHello, other bytes, or nothing within `detect_timeout`) goes to
    /// `cluster` as opaque TCP. Server-speaks-first protocols must be `tcp`.
    Detect,
}

/// A listening socket: one per worker, bound with `SO_REUSEPORT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique name; metrics are labelled with it.
    pub name: String,
    /// Address to bind. Port 0 picks a free port once, shared by all workers.
    pub address: SocketAddr,
    /// What the listener speaks.
    pub protocol: Protocol,
    /// For `tcp` listeners: the cluster every connection goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// For `http` listeners: routes, the most specific host's most specific matching route
    /// taking a request ([`Route`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Terminate mTLS from peer sidecars on this listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// Not bound: takes the intercepted connections (see [`Interception`]) whose original
    /// destination is `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercept: Option<Intercept>,
    /// Who is served (an AuthorizationPolicy's sources); anyone when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    /// How many HTTP requests a second it serves (a RateLimitPolicy); no cap when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// The peers a listener lets in, by the identity their mTLS certificate proves: one of
/// `identities` (an identity pattern: a SPIFFE ID, or `spiffe://<td>/ns/<ns>/sa/*` for every
/// service account of a namespace), or any workload of one of `namespaces`, for everything;
/// one a rule names, for the HTTP requests the rule describes. A connection with no identity
/// (plaintext on a permissive port) is let in by none; with every list empty, nobody is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// Identity patterns let in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Namespaces whose every workload is let in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Peers let in for some HTTP requests only (an AuthorizationPolicy with `to`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthorizationRule>,
}

/// Peers let in for some HTTP requests only: one of `identities` or of a workload of one of
/// `namespaces`, for a request whose method is one of `methods` and whose path matches one
/// of `paths` (an empty list: any). Opaque TCP is let in by no rule (a request it allows may
/// upgrade to a WebSocket, as under Istio). A path a server might read as another
/// ([`plain_path`]) matches no pattern but `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    /// Identity patterns it names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Namespaces whose every workload it names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Request methods, as sent (`GET`, `POST`…; `*`: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Request paths, without the query: exact (`/healthz`), or a prefix ending in `*`
    /// (`/api/*`; `*` alone: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// A cap on the HTTP requests a listener serves a second, for the whole proxy (its workers
/// share it), as Linkerd's HTTPLocalRateLimitPolicy: in all (`total`), and for each caller
/// (`per_identity`, by the SPIFFE ID its mTLS certificate proves; callers with none, over
/// plaintext, count as one), except callers an override gives a rate of their own. A
/// request over a cap is answered 429 (a gRPC call `RESOURCE_EXHAUSTED`) without reaching
/// the application. Each cap allows a burst of one second's requests. Opaque TCP is not
/// limited (a `tcp` listener takes no `rate_limit`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests a second from all callers together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u32>,
    /// Requests a second from each caller identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_identity: Option<u32>,
    /// Callers with a rate of their own, in place of `per_identity`: the first override whose
    /// identity patterns match a caller applies, and its callers share it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverride>,
}

/// Callers, by identity pattern, that share a rate of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitOverride {
    /// Identity patterns: SPIFFE IDs, or `spiffe://<td>/ns/<ns>/sa/*`.
    pub identities: Vec<String>,
    /// Requests a second from them together.
    pub requests_per_second: u32,
}

/// The highest rate a rate limit may name (requests a second).
pub const MAX_REQUESTS_PER_SECOND: u32 = 1_000_000;

/// Why a listener's `rate_limit` cannot be used, if it cannot: the field (under
/// `rate_limit`) and the reason. Every rate is 1 to [`MAX_REQUESTS_PER_SECOND`], none above
/// `total`, and some cap is set.
pub fn rate_limit_problem(limit: &RateLimit) -> Option<(String, String)> {
    let problem = |field: String, message: String| Some((format!("rate_limit.{field}"), message));
    let rates = [
        ("total".to_owned(), limit.total),
        ("per_identity".to_owned(), limit.per_identity),
    ]
    .into_iter()
    .chain(limit.overrides.iter().enumerate().map(|(k, o)| {
        (
            format!("overrides[{k}].requests_per_second"),
            Some(o.requests_per_second),
        )
    }));
    for (field, rate) in rates {
        match rate {
            Some(0) => return problem(field, "must be at least 1 (a request a second)".into()),
            Some(rate) if rate > MAX_REQUESTS_PER_SECOND => {
                return problem(field, format!("must be at most {MAX_REQUESTS_PER_SECOND}"));
            }
            Some(rate) if limit.total.is_some_and(|total| rate > total) => {
                return problem(field, "must not be above `total`".into());
            }
            _ => {}
        }
    }
    for (k, o) in limit.overrides.iter().enumerate() {
        if o.identities.is_empty() {
            return problem(
                format!("overrides[{k}].identities"),
                "must name a caller".into(),
            );
        }
        for (j, pattern) in o.identities.iter().enumerate() {
            if let Err(error) = pattern.parse::<crate::identity::IdentityPattern>() {
                return problem(format!("overrides[{k}].identities[{j}]"), error.to_string());
            }
        }
    }
    if limit.total.is_none() && limit.per_identity.is_none() && limit.overrides.is_empty() {
        return Some((
            "rate_limit".into(),
            "sets no cap: give `total`, `per_identity` or `overrides`".into(),
        ));
    }
    None
}

/// Why `method` cannot be a request method to match, if it cannot: it must be an HTTP token
/// (RFC 9110 §9.1).
pub fn method_problem(method: &str) -> Option<&'static str> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if method.is_empty() || !method.bytes().all(token) {
        return Some("is not an HTTP method");
    }
    None
}

/// Why `path` cannot be a path pattern, if it cannot: an exact path or a prefix ending in
/// `*`, starting with `/` (or `*` alone), without a query, and plain ([`plain_path`]).
pub fn path_pattern_problem(path: &str) -> Option<&'static str> {
    let exact = path.strip_suffix('*').unwrap_or(path);
    if path != "*" && !exact.starts_with('/') {
        return Some("must start with `/`");
    }
    if exact.contains('*') {
        return Some("must have `*` only at its end");
    }
    if exact.contains(['?', '#']) {
        return Some("must hold no query or fragment (patterns match the path alone)");
    }
    if exact.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Some("must hold no spaces or control characters");
    }
    if plain_path(exact.as_bytes()).is_none() {
        return Some(
            "would match nothing: requests whose path a server could read as another path are matched by no pattern",
        );
    }
    None
}

/// A request target's path without its query, when a server cannot read it as another path:
/// none with a `..` (a segment, or as in `..;`, which some servers read as one) or a `.`
/// segment, a backslash, or an escape that decodes to a dot, slash, backslash or another
/// escape (`%2e`, `%2f`, `%5c`, `%25`, `%u…`, overlong `%c0`/`%c1`). Authorization matches
/// only such paths against path patterns.
pub fn plain_path(target: &[u8]) -> Option<&[u8]> {
    let path = target
        .iter()
        .position(|&b| b == b'?')
        .map_or(target, |end| &target[..end]);
    let escape = |w: &[u8]| {
        w[0] == b'%'
            && matches!(
                [w[1].to_ascii_lowercase(), w[2].to_ascii_lowercase()],
                [b'2', b'e' | b'f' | b'5'] | [b'5', b'c'] | [b'c', b'0' | b'1'] | [b'u', _]
            )
    };
    let unplain = path.windows(2).any(|w| w == b"..")
        || path.windows(3).any(|w| w == b"/./" || escape(w))
        || path.ends_with(b"/.")
        || path.ends_with(b"%u")
        || path.contains(&b'\\');
    (!unplain).then_some(path)
}

/// An HTTP route: what a request must look like (host, path, method, headers, query) to
/// go to a cluster, be split between clusters by weight, or be answered with a redirect, and
/// how its URL, its headers and its response's are changed on the way. In YAML, `cluster: x`
/// is short for `backends: [{cluster: x}]`, and the path is `path_prefix`, `path_exact` or
/// `path_regex`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RouteFields", into = "RouteFields")]
pub struct Route {
    /// `example.com` (exact, case-insensitive, port ignored), `*.example.com` (any subdomain)
    /// or `*` (any host, the default).
    pub host: String,
    /// The path the request must have; every path by default.
    pub path: PathMatch,
    /// The method the request must have (case-sensitive, as HTTP methods are); any if none.
    pub method: Option<String>,
    /// Headers the request must carry, each with a value that matches (names are
    /// case-insensitive; the first field of a name counts); all of them must match.
    pub headers: Vec<ValueMatch>,
    /// Query parameters the request must carry, each with a value that matches once
    /// percent-decoded (names are case-sensitive; the first of a repeated name counts); all
    /// of them must match.
    pub query: Vec<ValueMatch>,
    /// Where requests go: each request picks one backend, with probability weight / total.
    /// Empty for a route that answers with a `redirect`.
    pub backends: Vec<Backend>,
    /// How long to wait for the upstream's response head; past it the proxy answers 504.
    pub timeout: Duration,
    /// Changes to the request's headers before it goes upstream.
    pub request_headers: HeaderModifier,
    /// Changes to the response's headers before it goes back to the client.
    pub response_headers: HeaderModifier,
    /// Changes to the request's host and path before it goes upstream.
    pub rewrite: Option<Rewrite>,
    /// Answer every request with this redirect instead of passing it on.
    pub redirect: Option<Redirect>,
}

/// A redirect a route answers with, as Gateway API's `RequestRedirect` makes it: the
/// request's own URL with the parts named here replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// `http` or `https`; the request's (`http`) by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The host name; the request's by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The port; by default the scheme's own when the scheme is set, else the request's.
    /// Left out of the URL when it is the scheme's own (80, 443).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The path; the request's by default. The query is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// 301, 302 (the default), 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

/// Changes a route makes to a request's host and path, as Gateway API's `URLRewrite`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// The host the upstream sees (`Host`, `:authority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The path the upstream sees. The query is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
}

/// How a redirect or rewrite changes a request's path (Gateway API's `HTTPPathModifier`).
/// In YAML, `{ replace_full_path: /x }` or `{ replace_prefix_match: /x }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PathRewriteFields", into = "PathRewriteFields")]
pub enum PathRewrite {
    /// The whole path becomes this one.
    ReplaceFullPath(String),
    /// The part the route's `path_prefix` matched becomes this prefix: `/old` to `/new`
    /// takes `/old/x` to `/new/x` and `/old` to `/new`; to `/`, `/old/x` becomes `/x`.
    ReplacePrefixMatch(String),
}

/// The YAML shape of [`PathRewrite`]: one of its two fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathRewriteFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replace_prefix_match: Option<String>,
}

impl TryFrom<PathRewriteFields> for PathRewrite {
    type Error = &'static str;

    fn try_from(fields: PathRewriteFields) -> Result<Self, Self::Error> {
        match (fields.replace_full_path, fields.replace_prefix_match) {
            (Some(path), None) => Ok(PathRewrite::ReplaceFullPath(path)),
            (None, Some(prefix)) => Ok(PathRewrite::ReplacePrefixMatch(prefix)),
            _ => Err("a path takes exactly one of `replace_full_path` or `replace_prefix_match`"),
        }
    }
}

impl From<PathRewrite> for PathRewriteFields {
    fn from(rewrite: PathRewrite) -> Self {
        match rewrite {
            PathRewrite::ReplaceFullPath(path) => PathRewriteFields {
                replace_full_path: Some(path),
                replace_prefix_match: None,
            },
            PathRewrite::ReplacePrefixMatch(prefix) => PathRewriteFields {
                replace_full_path: None,
                replace_prefix_match: Some(prefix),
            },
        }
    }
}

impl PathRewrite {
    /// The path a request's `path` (without its query) becomes, `matched` being the prefix
    /// the route matched it by (for [`PathRewrite::ReplacePrefixMatch`]).
    pub fn apply(&self, path: &[u8], matched: &str) -> Vec<u8> {
        match self {
            PathRewrite::ReplaceFullPath(full) => full.as_bytes().to_vec(),
            PathRewrite::ReplacePrefixMatch(prefix) => {
                // The prefix matched whole segments: what is left is empty or starts a new
                // segment (a `/`).
                let matched = matched.trim_end_matches('/');
                let rest = path.get(matched.len()..).unwrap_or_default();
                let mut joined = prefix.trim_end_matches('/').as_bytes().to_vec();
                joined.extend_from_slice(rest);
                if joined.is_empty() {
                    joined.push(b'/');
                }
                joined
            }
        }
    }

    /// The new path or prefix.
    pub fn value(&self) -> &str {
        match self {
            PathRewrite::ReplaceFullPath(path) | PathRewrite::ReplacePrefixMatch(path) => path,
        }
    }
}

/// The redirect statuses Gateway API allows.
const REDIRECT_STATUSES: [u16; 5] = [301, 302, 303, 307, 308];

/// How a route matches a request's path (without its query).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathMatch {
    /// Whole path segments, as Gateway API's `PathPrefix`: `/api` matches `/api` and
    /// `/api/v1`, not `/apix`; `/` matches everything.
    Prefix(String),
    /// Exactly this path.
    Exact(String),
    /// A regular expression the whole path must match ([`full_match`]).
    Regex(String),
}

/// A header: its name and a value, to match or to write.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The header's name (case-insensitive).
    pub name: String,
    /// Its value.
    pub value: String,
}

/// A header or query parameter a route matches: its name, and the value it must have
/// exactly, or with `regex` a regular expression its whole value must match
/// ([`full_match`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// A header's name (case-insensitive) or a query parameter's (case-sensitive).
    pub name: String,
    /// The value, or the regular expression.
    pub value: String,
    /// Whether `value` is a regular expression.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub regex: bool,
}

impl ValueMatch {
    /// An exact match.
    pub fn exact(name: impl Into<String>, value: impl Into<String>) -> ValueMatch {
        ValueMatch {
            name: name.into(),
            value: value.into(),
            regex: false,
        }
    }
}

/// The longest regular expression a route may hold, and the most memory one may compile to:
/// a config cannot make the proxy build a huge matcher.
pub const MAX_REGEX_LEN: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Compiles a route's regular expression to match a whole value (it is anchored at both
/// ends; `.` matches any character, a line break too), on the value's bytes read as UTF-8
/// (a byte that is not never matches `.`); linear in the value's length whatever the
/// pattern.
pub fn full_match(pattern: &str) -> Result<regex::bytes::Regex, String> {
    if pattern.len() > MAX_REGEX_LEN {
        return Err(format!(
            "must be a regular expression of at most {MAX_REGEX_LEN} bytes"
        ));
    }
    let build = |pattern: &str| {
        regex::bytes::RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .dot_matches_new_line(true)
            .build()
            .map_err(|error| format!("`{pattern}` is not a regular expression: {error}"))
    };
    // The pattern must stand on its own, so that it cannot close the anchoring group (as
    // `a)|(?:b` would) and match less than the whole value.
    build(pattern)?;
    build(&format!("^(?:{pattern})$"))
}

/// Changes to a message's headers, as Gateway API's `RequestHeaderModifier` and
/// `ResponseHeaderModifier` make them: `remove` first, then `set` (replacing every field of
/// the name), then `add` (another field beside any the message has). A name appears at most
/// once in each list. Headers that frame the message or the connection (and `host`)
/// cannot be changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    /// Headers to set, replacing any of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<Header>,
    /// Headers to add beside any of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Header>,
    /// Names of headers to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderModifier {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A cluster and its share of a route's requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// The cluster.
    pub cluster: String,
    /// Relative share; 0 takes no requests.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// The YAML shape of [`Route`]: one of `cluster`, `backends` and `redirect`; at most one of
/// `path_prefix`, `path_exact` and `path_regex`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFields {
    #[serde(default = "default_host")]
    host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    query: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    backends: Vec<Backend>,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    request_headers: HeaderModifier,
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    response_headers: HeaderModifier,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rewrite: Option<Rewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    redirect: Option<Redirect>,
}

impl TryFrom<RouteFields> for Route {
    type Error = &'static str;

    fn try_from(fields: RouteFields) -> Result<Self, Self::Error> {
        let backends = match (fields.cluster, fields.backends, &fields.redirect) {
            (Some(cluster), backends, None) if backends.is_empty() => {
                vec![Backend { cluster, weight: 1 }]
            }
            (None, backends, None) if !backends.is_empty() => backends,
            (None, backends, Some(_)) if backends.is_empty() => backends,
            _ => return Err("a route takes exactly one of `cluster`, `backends` or `redirect`"),
        };
        if fields.redirect.is_some() && fields.rewrite.is_some() {
            return Err("a route that redirects rewrites nothing: `rewrite` or `redirect`");
        }
        let path = match (fields.path_prefix, fields.path_exact, fields.path_regex) {
            (prefix, None, None) => PathMatch::Prefix(prefix.unwrap_or_else(default_path_prefix)),
            (None, Some(exact), None) => PathMatch::Exact(exact),
            (None, None, Some(regex)) => PathMatch::Regex(regex),
            _ => {
                return Err(
                    "a route takes at most one of `path_prefix`, `path_exact` or `path_regex`",
                );
            }
        };
        Ok(Route {
            host: fields.host,
            path,
            method: fields.method,
            headers: fields.headers,
            query: fields.query,
            backends,
            timeout: fields.timeout,
            request_headers: fields.request_headers,
            response_headers: fields.response_headers,
            rewrite: fields.rewrite,
            redirect: fields.redirect,
        })
    }
}

impl From<Route> for RouteFields {
    fn from(route: Route) -> Self {
        let single = route.backends.len() == 1 && route.backends[0].weight == 1;
        let (rewrite, redirect) = (route.rewrite, route.redirect);
        let (cluster, backends) = if single {
            (
                route.backends.into_iter().next().map(|b| b.cluster),
                Vec::new(),
            )
        } else {
            (None, route.backends)
        };
        let (path_prefix, path_exact, path_regex) = match route.path {
            PathMatch::Prefix(prefix) => (Some(prefix), None, None),
            PathMatch::Exact(exact) => (None, Some(exact), None),
            PathMatch::Regex(regex) => (None, None, Some(regex)),
        };
        RouteFields {
            host: route.host,
            path_prefix,
            path_exact,
            path_regex,
            method: route.method,
            headers: route.headers,
            query: route.query,
            cluster,
            backends,
            timeout: route.timeout,
            request_headers: route.request_headers,
            response_headers: route.response_headers,
            rewrite,
            redirect,
        }
    }
}

impl Cluster {
    /// A plaintext cluster with the default timeouts and pool size.
    pub fn new(name: impl Into<String>, endpoints: Vec<SocketAddr>) -> Cluster {
        Cluster {
            name: name.into(),
            endpoints,
            connect_timeout: default_connect_timeout(),
            idle_timeout: default_idle_timeout(),
            max_idle_per_endpoint: default_max_idle_per_endpoint(),
            tls: None,
            retries: None,
            outlier_detection: None,
            balancing: Balancing::RoundRobin,
            connection_limit: None,
        }
    }
}

impl ListenerTls {
    /// `mode` with the default handshake timeout.
    pub fn new(mode: TlsMode) -> ListenerTls {
        ListenerTls {
            mode,
            handshake_timeout: default_handshake_timeout(),
        }
    }
}

impl Route {
    /// A route of every path of every host to one cluster, with the default timeout.
    pub fn to_cluster(cluster: &str) -> Route {
        Route {
            host: default_host(),
            path: PathMatch::Prefix(default_path_prefix()),
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
            backends: vec![Backend {
                cluster: cluster.to_owned(),
                weight: 1,
            }],
            timeout: default_request_timeout(),
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
            rewrite: None,
            redirect: None,
        }
    }
}

/// A named set of upstream endpoints, balanced round robin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Unique name; routes refer to it and metrics are labelled with it.
    pub name: String,
    /// Upstream addresses. May be empty (a Service scaled to zero): connections to the
    /// cluster then fail at once.
    pub endpoints: Vec<SocketAddr>,
    /// Time allowed to establish an upstream TCP connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// An opaque TCP connection with no bytes in either direction for this long is closed;
    /// an HTTP/1.1 or HTTP/2 response body the upstream sends nothing of for this long is
    /// cut; an idle pooled HTTP connection older than this is not reused.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Idle HTTP connections kept per endpoint, per worker.
    #[serde(default = "default_max_idle_per_endpoint")]
    pub max_idle_per_endpoint: usize,
    /// Originate mTLS to the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTls>,
    /// Retries of HTTP requests that failed in a way worth another try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Passing over endpoints whose HTTP requests keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// How each worker picks the endpoint of a request or connection.
    #[serde(default, skip_serializing_if = "is_default")]
    pub balancing: Balancing,
    /// A cap on the upstream connections the proxy keeps open to the cluster; none when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limit: Option<ConnectionLimit>,
}

/// A cap on a cluster's upstream connections (a BackendPolicy's `connectionLimits`, as
/// Envoy's circuit breakers and Istio's `connectionPool` do), so that a client cannot open
/// an unbounded number of them to a struggling service. Every connection counts, in use or
/// pooled: opaque TCP, HTTP/1.1, HTTP/2.
///
/// Each worker holds its share of `max_connections` (the proxy's total split evenly, at
/// least one a worker) and of `max_pending` (split the same way, possibly none). A request
/// or connection that needs a new upstream connection while its worker's share is all open
/// goes over one the cluster has to another endpoint (HTTP), or closes an idle pooled one to
/// make room; else it waits in turn, up to the cluster's connect timeout, for one to go idle
/// or close. Beyond `max_pending` waiting, or past that wait, it fails: a 503 flagged `UO`
/// (upstream overflow), or an opaque TCP connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimit {
    /// Upstream connections open at once, for the whole proxy (at least 1; each worker has at
    /// least one, so with fewer than the workers, as many as the workers).
    pub max_connections: u32,
    /// Requests or connections waiting for one, for the whole proxy.
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
}

impl ConnectionLimit {
    /// `max_connections` with the default `max_pending`.
    pub fn new(max_connections: u32) -> ConnectionLimit {
        ConnectionLimit {
            max_connections,
            max_pending: default_max_pending(),
        }
    }
}

/// Envoy's default for its `max_pending_requests`.
fn default_max_pending() -> u32 {
    1024
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// How a cluster's endpoints are picked (a BackendPolicy's `loadBalancing`), by each worker,
/// among those not passed over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancing {
    /// In turn, from a random start.
    #[default]
    RoundRobin,
    /// The one with fewer requests (or opaque TCP connections) under way of two picked at
    /// random, as Envoy's `LEAST_REQUEST` and Linkerd's power of two choices.
    LeastRequest,
}

/// Ejecting an endpoint whose HTTP requests keep failing (a BackendPolicy's
/// `outlierDetection`), as Linkerd's failure accrual and Envoy's consecutive-5xx detection do:
/// after `consecutive_failures` in a row (5xx answers, resets, timeouts), each worker passes
/// the endpoint over for `base_ejection_time`, then lets one request probe it; a failed probe
/// doubles the time (up to ten times the base), a good answer brings it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts.
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// The most of a cluster's endpoints ejected at once, in percent (a cluster of one
    /// endpoint never has it ejected at 50%).
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

fn default_max_ejected_percent() -> u32 {
    50
}

/// Retries of HTTP requests to a cluster (a BackendPolicy's `retries`), each on the next
/// endpoint, whatever the method (naming a failure says the service can take a request
/// twice). Only a request the proxy can send again is retried: over HTTP/1.1 one without a
/// body or with a `Content-Length` one of at most 64 KiB (read whole before it goes), over
/// HTTP/2 one whose body is at most 64 KiB (recorded as it goes). The route's
/// timeout bounds every attempt together. A failed connect is always tried on up to three
/// endpoints, with or without this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Attempts after the first (at most 5).
    pub attempts: u32,
    /// Which failures are retried.
    pub on: Vec<RetryOn>,
    /// Time allowed for each attempt's response head; one that runs out is retried as a
    /// `gateway_error`. The route's timeout alone when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Retries allowed, per worker, as a percentage of the requests of the last 10 s (on
    /// top of `min_per_second`): a budget, so that retries cannot multiply an overload.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
    /// Retries allowed per second, per worker, whatever the traffic.
    #[serde(default = "default_budget_min_per_second")]
    pub min_per_second: u32,
}

/// A failure worth another try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The upstream closed or reset the connection before a response.
    Reset,
    /// A 502, 503 or 504 response, or no response head within the per-try timeout.
    GatewayError,
    /// A gRPC `UNAVAILABLE` answer (`grpc-status: 14` in a trailers-only response).
    Unavailable,
}

fn default_budget_percent() -> u32 {
    20
}

fn default_budget_min_per_second() -> u32 {
    10
}

/// The longest first ejection of an endpoint (outlier detection).
pub const MAX_BASE_EJECTION_TIME: Duration = Duration::from_secs(24 * 3600);

/// Most retries of one request.
pub const MAX_RETRIES: u32 = 5;

/// Limits on what an HTTP client may send, and how long it may take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Largest request or response head (request line and headers); larger gets 431.
    pub max_header_bytes: usize,
    /// Longest request line; longer gets 414.
    pub max_request_line: usize,
    /// Most header fields in one head; more gets 431.
    pub max_headers: usize,
    /// Time allowed for a whole request head to arrive once its first byte has (slowloris
    /// defence); past it the proxy answers 408 and closes.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed (an HTTP/2 one with
    /// a GOAWAY, which lets response bodies still streaming finish).
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A request body that sends nothing for this long gets 408 and a close (slow-body
    /// defence).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            max_header_bytes: 32 * 1024,
            max_request_line: 8 * 1024,
            max_headers: 100,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// The most header fields a head may be configured to allow.
pub const MAX_HEADERS: usize = 256;

fn default_weight() -> u32 {
    1
}
fn default_host() -> String {
    "*".to_owned()
}
fn default_path_prefix() -> String {
    "/".to_owned()
}
/// How long a route waits for a response head unless it says otherwise.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

fn default_redirect_status() -> u16 {
    302
}
fn default_request_timeout() -> Duration {
    DEFAULT_ROUTE_TIMEOUT
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_idle_per_endpoint() -> usize {
    64
}
fn default_ca_server_name() -> String {
    "tern-control".to_owned()
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_outbound_port() -> u16 {
    15001
}
fn default_inbound_port() -> u16 {
    15006
}
fn default_true() -> bool {
    true
}
fn default_inbound_tls() -> ListenerTls {
    ListenerTls::new(TlsMode::Permissive)
}
fn default_detect_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Listener names the proxy gives its interception sockets; configured listeners may not
/// start with it.
pub const INTERCEPT_PREFIX: &str = "intercept-";

/// Why a configuration was refused. Each variant says where the problem is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The text is not valid YAML for this model (syntax, unknown field, wrong type).
    #[error("{origin}: {source}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// The parser's message, with line and column.
        source: serde_yaml::Error,
    },
    /// The file names an environment variable that is not set.
    #[error("{origin}: `${{{name}}}` is not set in the environment")]
    Unset {
        /// Where the text came from.
        origin: String,
        /// The variable.
        name: String,
    },
    /// The model parsed but a field is wrong.
    #[error("{origin}: {field}: {message}")]
    Invalid {
        /// Where the text came from.
        origin: String,
        /// The offending field, e.g. `listeners[1].routes[0].backends[0].cluster`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

/// `text` with each `${NAME}` (letters, digits, `_`) replaced by `lookup(NAME)`, except on
/// comment lines (`#` first); any other `$` is kept as it is. Err: the first name `lookup`
/// does not know.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
        } else {
            expand_line(line, &lookup, &mut out)?;
        }
    }
    Ok(out)
}

fn expand_line(
    line: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), String> {
    let mut rest = line;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if name_len == 0 || !after[name_len..].starts_with('}') {
            out.push_str(&rest[..start + 2]);
            rest = after;
            continue;
        }
        let name = &after[..name_len];
        out.push_str(&rest[..start]);
        out.push_str(&lookup(name).ok_or_else(|| name.to_owned())?);
        rest = &after[name_len + 1..];
    }
    out.push_str(rest);
    Ok(())
}

impl Config {
    /// Reads a YAML file, puts in the environment variables it names (`${POD_NAME}`: so one
    /// file serves every Pod, as a ConfigMap the sidecar injector writes does), then parses
    /// and validates it.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: origin.clone(),
            source,
        })?;
        let text = expand_env(&text, |name| std::env::var(name).ok()).map_err(|name| {
            ConfigError::Unset {
                origin: origin.clone(),
                name,
            }
        })?;
        Config::from_yaml(&text, &origin)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        config
            .validate()
            .map_err(|(field, message)| ConfigError::Invalid {
                origin: origin.to_owned(),
                field,
                message,
            })?;
        Ok(config)
    }

    /// Checks every cross-reference and value; returns the offending field and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |field: String, message: &str| Err((field, message.to_owned()));

        let mut cluster_names = HashSet::new();
        for (i, cluster) in self.clusters.iter().enumerate() {
            let at = |f: &str| format!("clusters[{i}].{f}");
            if cluster.name.is_empty() {
                return fail(at("name"), "must not be empty");
            }
            if cluster.name.starts_with(INTERCEPT_PREFIX) {
                return fail(
                    at("name"),
                    &format!("`{INTERCEPT_PREFIX}` names are the proxy's own"),
                );
            }
            if !cluster_names.insert(cluster.name.as_str()) {
                return fail(at("name"), &format!("duplicate cluster `{}`", cluster.name));
            }
            if cluster.connect_timeout.is_zero() {
                return fail(at("connect_timeout"), "must be greater than zero");
            }
            if cluster.idle_timeout.is_zero() {
                return fail(at("idle_timeout"), "must be greater than zero");
            }
            if let Some(tls) = &cluster.tls
                && tls.cipher_suites.as_ref().is_some_and(Vec::is_empty)
            {
                return fail(at("tls.cipher_suites"), "must name at least one suite");
            }
            if let Some(outliers) = &cluster.outlier_detection {
                if outliers.consecutive_failures == 0 {
                    return fail(
                        at("outlier_detection.consecutive_failures"),
                        "must be at least 1",
                    );
                }
                if outliers.base_ejection_time.is_zero()
                    || outliers.base_ejection_time > MAX_BASE_EJECTION_TIME
                {
                    return fail(
                        at("outlier_detection.base_ejection_time"),
                        "must be greater than zero and at most 24h",
                    );
                }
                if outliers.max_ejected_percent > 100 {
                    return fail(
                        at("outlier_detection.max_ejected_percent"),
                        "must be 0 to 100",
                    );
                }
            }
            if cluster
                .connection_limit
                .is_some_and(|limit| limit.max_connections == 0)
            {
                return fail(at("connection_limit.max_connections"), "must be at least 1");
            }
            if let Some(retries) = &cluster.retries {
                if retries.attempts > MAX_RETRIES {
                    return fail(at("retries.attempts"), &format!("at most {MAX_RETRIES}"));
                }
                if retries.per_try_timeout.is_some_and(|t| t.is_zero()) {
                    return fail(at("retries.per_try_timeout"), "must be greater than zero");
                }
                if retries.budget_percent > 100 {
                    return fail(at("retries.budget_percent"), "must be 0 to 100");
                }
            }
        }

        let mut listener_names = HashSet::new();
        let mut addresses: HashSet<(Option<Intercept>, SocketAddr)> = HashSet::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            let at = |f: &str| format!("listeners[{i}].{f}");
            if listener.name.is_empty() {
                return fail(at("name"), "must not be empty");
            }
            if !listener_names.insert(listener.name.as_str()) {
                return fail(
                    at("name"),
                    &format!("duplicate listener `{}`", listener.name),
                );
            }
            if listener.name.starts_with(INTERCEPT_PREFIX) {
                return fail(
                    at("name"),
                    &format!("`{INTERCEPT_PREFIX}` names are the proxy's own"),
                );
            }
            if let Some(authorization) = &listener.authorization {
                let callers = |field: &str, identities: &[String], namespaces: &[String]| {
                    for (j, pattern) in identities.iter().enumerate() {
                        if let Err(error) = pattern.parse::<crate::identity::IdentityPattern>() {
                            return fail(
                                at(&format!("{field}.identities[{j}]")),
                                &error.to_string(),
                            );
                        }
                    }
                    if let Some(j) = namespaces.iter().position(String::is_empty) {
                        return fail(at(&format!("{field}.namespaces[{j}]")), "must not be empty");
                    }
                    Ok(())
                };
                let (identities, namespaces) =
                    (&authorization.identities, &authorization.namespaces);
                callers("authorization", identities, namespaces)?;
                for (k, rule) in authorization.rules.iter().enumerate() {
                    let field = format!("authorization.rules[{k}]");
                    callers(&field, &rule.identities, &rule.namespaces)?;
                    for (j, method) in rule.methods.iter().enumerate() {
                        if let Some(problem) = method_problem(method) {
                            return fail(at(&format!("{field}.methods[{j}]")), problem);
                        }
                    }
                    for (j, path) in rule.paths.iter().enumerate() {
                        if let Some(problem) = path_pattern_problem(path) {
                            return fail(at(&format!("{field}.paths[{j}]")), problem);
                        }
                    }
                }
            }
            if let Some(limit) = &listener.rate_limit {
                if listener.protocol == Protocol::Tcp {
                    return fail(
                        at("rate_limit"),
                        "limits HTTP requests, and a `tcp` listener carries none",
                    );
                }
                rate_limit_problem(limit).map_or(Ok(()), |(f, m)| fail(at(&f), &m))?;
            }
            if let Some(direction) = listener.intercept {
                if self.interception.is_none() {
                    return fail(at("intercept"), "needs an `interception` block");
                }
                if listener.address.port() == 0 {
                    return fail(at("address"), "an intercepted destination needs a port");
                }
                if direction == Intercept::Outbound
                    && listener
                        .tls
                        .as_ref()
                        .is_some_and(|t| t.mode != TlsMode::Disable)
                {
                    return fail(
                        at("tls"),
                        "outbound connections come from the application, in plaintext",
                    );
                }
                if !addresses.insert((Some(direction), listener.address)) {
                    return fail(
                        at("address"),
                        &format!(
                            "{} is claimed by another {direction:?} listener",
                            listener.address
                        ),
                    );
                }
            } else if listener.address.port() != 0 && !addresses.insert((None, listener.address)) {
                return fail(
                    at("address"),
                    &format!("{} is used by another listener", listener.address),
                );
            }
            match listener.protocol {
                Protocol::Tcp => {
                    if !listener.routes.is_empty() {
                        return fail(at("routes"), "a tcp listener has no routes; use `cluster`");
                    }
                    match &listener.cluster {
                        None => return fail(at("cluster"), "a tcp listener needs a cluster"),
                        Some(name) if !cluster_names.contains(name.as_str()) => {
                            return fail(at("cluster"), &format!("unknown cluster `{name}`"));
                        }
                        Some(_) => {}
                    }
                }
                Protocol::Http | Protocol::Detect => {
                    if listener.protocol == Protocol::Detect {
                        match &listener.cluster {
                            None => {
                                return fail(
                                    at("cluster"),
                                    "a detect listener needs a cluster (for opaque TCP)",
                                );
                            }
                            Some(name) if !cluster_names.contains(name.as_str()) => {
                                return fail(at("cluster"), &format!("unknown cluster `{name}`"));
                            }
                            Some(_) => {}
                        }
                    } else if listener.cluster.is_some() {
                        return fail(
                            at("cluster"),
                            "an http listener routes with `routes`, not `cluster`",
                        );
                    } else if listener.routes.is_empty() {
                        return fail(at("routes"), "an http listener needs at least one route");
                    }
                    for (j, route) in listener.routes.iter().enumerate() {
                        let at = |f: &str| format!("listeners[{i}].routes[{j}].{f}");
                        for (k, backend) in route.backends.iter().enumerate() {
                            if !cluster_names.contains(backend.cluster.as_str()) {
                                return fail(
                                    at(&format!("backends[{k}].cluster")),
                                    &format!("unknown cluster `{}`", backend.cluster),
                                );
                            }
                        }
                        if let Some(redirect) = &route.redirect {
                            if let Err((field, why)) = check_redirect(redirect, &route.path) {
                                return fail(at(&format!("redirect.{field}")), why);
                            }
                            if !route.backends.is_empty()
                                || route.rewrite.is_some()
                                || !route.request_headers.is_empty()
                                || !route.response_headers.is_empty()
                            {
                                return fail(
                                    at("redirect"),
                                    "a route that redirects answers itself: no backends, \
                                     rewrite or header edits beside it",
                                );
                            }
                        }
                        if let Some(Err((field, why))) = route
                            .rewrite
                            .as_ref()
                            .map(|r| check_rewrite(r, &route.path))
                        {
                            return fail(at(&format!("rewrite.{field}")), why);
                        }
                        let total: u64 = route.backends.iter().map(|b| u64::from(b.weight)).sum();
                        if route.redirect.is_none() && (total == 0 || total > u64::from(u32::MAX)) {
                            return fail(
                                at("backends"),
                                "the weights must add up to more than 0 and fit in 32 bits",
                            );
                        }
                        if let Err(why) = check_path_match(&route.path) {
                            let field = match route.path {
                                PathMatch::Prefix(_) => "path_prefix",
                                PathMatch::Exact(_) => "path_exact",
                                PathMatch::Regex(_) => "path_regex",
                            };
                            return fail(at(field), &why);
                        }
                        if let Some(Err(why)) = route.method.as_deref().map(check_method) {
                            return fail(at("method"), why);
                        }
                        for (k, query) in route.query.iter().enumerate() {
                            if let Err((field, why)) = check_query_match(query) {
                                return fail(at(&format!("query[{k}].{field}")), &why);
                            }
                        }
                        for (name, modifier) in [
                            ("request_headers", &route.request_headers),
                            ("response_headers", &route.response_headers),
                        ] {
                            if let Err((field, why)) = check_header_modifier(modifier) {
                                return fail(at(&format!("{name}.{field}")), why);
                            }
                        }
                        if let Err(why) = check_host_pattern(&route.host) {
                            return fail(at("host"), why);
                        }
                        if route.timeout.is_zero() {
                            return fail(at("timeout"), "must be greater than zero");
                        }
                        for (k, header) in route.headers.iter().enumerate() {
                            if let Err((field, why)) = check_header_match(header) {
                                return fail(at(&format!("headers[{k}].{field}")), &why);
                            }
                        }
                    }
                }
            }
        }

        let wants_tls = self
            .listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.mode != TlsMode::Disable))
            || self
                .interception
                .as_ref()
                .is_some_and(|i| i.inbound_tls.mode != TlsMode::Disable)
            || self.clusters.iter().any(|c| c.tls.is_some());
        if wants_tls && self.identity.is_none() {
            return fail(
                "identity".into(),
                "mTLS on a listener or cluster needs this proxy's identity (`files` or `ca`)",
            );
        }
        if let Some(discovery) = &self.discovery {
            if !matches!(self.identity, Some(IdentitySource::Ca(_))) {
                return fail(
                    "discovery".into(),
                    "needs `identity.ca`: the proxy reaches tern-control with its root and token",
                );
            }
            if discovery.workload.namespace.is_empty() || discovery.workload.name.is_empty() {
                return fail("discovery.workload".into(), "needs a namespace and a name");
            }
            let mut destinations = HashSet::new();
            let mut listens = HashSet::new();
            for (i, outbound) in discovery.outbound.iter().enumerate() {
                let at = |f: &str| format!("discovery.outbound[{i}].{f}");
                if !destinations.insert((outbound.service.as_str(), outbound.port)) {
                    return fail(at("service"), "this service and port are listed twice");
                }
                if outbound.listen.port() != 0 && !listens.insert(outbound.listen) {
                    return fail(at("listen"), &format!("{} is used twice", outbound.listen));
                }
                if crate::config::service_name(&outbound.service).is_none() {
                    return fail(at("service"), "must be `<name>.<namespace>`");
                }
                if outbound.port == 0 {
                    return fail(at("port"), "must not be 0");
                }
            }
        }

        if let Some(interception) = &self.interception {
            if interception.outbound_port == 0 || interception.inbound_port == 0 {
                return fail("interception".into(), "the ports must not be 0");
            }
            if interception.outbound_port == interception.inbound_port {
                return fail(
                    "interception.inbound_port".into(),
                    "must differ from outbound_port",
                );
            }
            if interception.mark == Some(0) {
                return fail("interception.mark".into(), "0 marks nothing");
            }
            let ports = [interception.outbound_port, interception.inbound_port];
            if let Some(i) = self
                .listeners
                .iter()
                .position(|l| l.intercept.is_none() && ports.contains(&l.address.port()))
            {
                return fail(
                    format!("listeners[{i}].address"),
                    "the interception ports are the proxy's own",
                );
            }
        }

        if self.detect_timeout.is_zero() {
            return fail("detect_timeout".into(), "must be greater than zero");
        }

        let http = &self.http;
        if http.max_header_bytes < 256 {
            return fail("http.max_header_bytes".into(), "must be at least 256");
        }
        if http.max_request_line < 16 || http.max_request_line > http.max_header_bytes {
            return fail(
                "http.max_request_line".into(),
                "must be at least 16 and at most http.max_header_bytes",
            );
        }
        if http.max_headers == 0 || http.max_headers > MAX_HEADERS {
            return fail(
                "http.max_headers".into(),
                &format!("must be between 1 and {MAX_HEADERS}"),
            );
        }
        if http.header_timeout.is_zero()
            || http.keepalive_timeout.is_zero()
            || http.body_timeout.is_zero()
        {
            return fail(
                "http.header_timeout".into(),
                "timeouts must be greater than zero",
            );
        }
        Ok(())
    }

    /// The default of [`Config::detect_timeout`].
    pub fn default_detect_timeout() -> Duration {
        default_detect_timeout()
    }

    /// Looks a cluster up by name.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

/// Splits `<name>.<namespace>` into its parts.
pub fn service_name(service: &str) -> Option<(&str, &str)> {
    let (name, namespace) = service.split_once('.')?;
    (!name.is_empty() && !namespace.is_empty() && !namespace.contains('.'))
        .then_some((name, namespace))
}

/// Whether `b` may appear in an HTTP token (a header name, a method).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks a header to write: a header name (an HTTP token) and a value HTTP/1.1 and HTTP/2
/// can both carry (no control characters but tab, no spaces around it).
pub fn check_header(header: &Header) -> Result<(), &'static str> {
    check_header_name(&header.name)?;
    check_header_value(&header.value)
}

fn check_header_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err("the name must be an HTTP header name");
    }
    Ok(())
}

fn check_header_value(value: &str) -> Result<(), &'static str> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("the value must not hold line breaks or other control characters");
    }
    if value.trim_matches([' ', '\t']) != value {
        // HTTP trims a field's value (and HTTP/2 refuses one that is not trimmed).
        return Err("the value must not begin or end with spaces or tabs");
    }
    Ok(())
}

/// Checks a header to match: a header name, and a value a header can have or a regular
/// expression. The error names the field at fault (`name` or `value`).
pub fn check_header_match(header: &ValueMatch) -> Result<(), (&'static str, String)> {
    check_header_name(&header.name).map_err(|why| ("name", why.to_owned()))?;
    if header.regex {
        full_match(&header.value).map(drop)
    } else {
        check_header_value(&header.value).map_err(str::to_owned)
    }
    .map_err(|why| ("value", why))
}

/// Checks a route's path or path prefix: it starts with `/` and holds no query, fragment,
/// whitespace or control characters.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must start with `/`");
    }
    if path
        .bytes()
        .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
    {
        return Err("must be a path alone: no query, fragment, whitespace or control characters");
    }
    Ok(())
}

/// Checks a route's path match: a path (prefix or exact), or a regular expression.
pub fn check_path_match(path: &PathMatch) -> Result<(), String> {
    match path {
        PathMatch::Prefix(path) | PathMatch::Exact(path) => check_path(path).map_err(str::to_owned),
        PathMatch::Regex(regex) => full_match(regex).map(drop),
    }
}

/// Checks a method to match: an HTTP token.
pub fn check_method(method: &str) -> Result<(), &'static str> {
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err("must be an HTTP method (a token such as GET)");
    }
    Ok(())
}

/// Checks a query parameter to match: a name and a value (as decoded) without control
/// characters, or a regular expression. The error names the field at fault (`name` or
/// `value`).
pub fn check_query_match(query: &ValueMatch) -> Result<(), (&'static str, String)> {
    let control = |text: &str| text.bytes().any(|b| b < 0x20 || b == 0x7f);
    if query.name.is_empty() || control(&query.name) {
        return Err((
            "name",
            "must be a name without control characters".to_owned(),
        ));
    }
    if query.regex {
        full_match(&query.value).map_err(|why| ("value", why))?;
    } else if control(&query.value) {
        return Err(("value", "must not hold control characters".to_owned()));
    }
    Ok(())
}

/// Checks a redirect: a scheme it knows, a host name, a port, a status Gateway API allows,
/// and a path rewrite `path` (the route's) allows. The error names the field.
pub fn check_redirect(
    redirect: &Redirect,
    path: &PathMatch,
) -> Result<(), (&'static str, &'static str)> {
    if let Some(scheme) = &redirect.scheme
        && scheme != "http"
        && scheme != "https"
    {
        return Err(("scheme", "must be http or https"));
    }
    if let Some(Err(why)) = redirect.hostname.as_deref().map(check_hostname) {
        return Err(("hostname", why));
    }
    if redirect.port == Some(0) {
        return Err(("port", "must be a port (1-65535)"));
    }
    if !REDIRECT_STATUSES.contains(&redirect.status) {
        return Err(("status", "must be 301, 302, 303, 307 or 308"));
    }
    if let Some(Err(why)) = redirect.path.as_ref().map(|p| check_path_rewrite(p, path)) {
        return Err(("path", why));
    }
    Ok(())
}

/// Checks a rewrite: a host name, and a path rewrite `path` (the route's) allows. The error
/// names the field.
pub fn check_rewrite(
    rewrite: &Rewrite,
    path: &PathMatch,
) -> Result<(), (&'static str, &'static str)> {
    if let Some(Err(why)) = rewrite.hostname.as_deref().map(check_hostname) {
        return Err(("hostname", why));
    }
    if let Some(Err(why)) = rewrite.path.as_ref().map(|p| check_path_rewrite(p, path)) {
        return Err(("path", why));
    }
    Ok(())
}

/// Checks a path rewrite: a path (or, to replace a prefix by nothing, an empty one), and a
/// prefix to replace only where the route matches one.
fn check_path_rewrite(rewrite: &PathRewrite, path: &PathMatch) -> Result<(), &'static str> {
    if !matches!(rewrite, PathRewrite::ReplacePrefixMatch(prefix) if prefix.is_empty()) {
        check_path(rewrite.value())?;
    }
    if matches!(rewrite, PathRewrite::ReplacePrefixMatch(_))
        && !matches!(path, PathMatch::Prefix(_))
    {
        return Err("a prefix replacement needs a path prefix match to replace");
    }
    Ok(())
}

/// Checks a host name to write into a request or a redirect: a DNS name (or an IPv4
/// address), no wildcard, no port.
fn check_hostname(name: &str) -> Result<(), &'static str> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err("must be a host name, without a port");
    }
    Ok(())
}

/// Headers a [`HeaderModifier`] may not touch: they frame the message, belong to the
/// connection or say how it goes on (changing them would set the proxy and the peer at odds
/// over where a message ends or what comes next), or are the request's authority, which
/// routing and the upstream must agree on.
pub const UNMODIFIABLE_HEADERS: [&str; 11] = [
    "connection",
    "content-length",
    "expect",
    "host",
    "http2-settings",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Checks a header modifier: valid headers, none that [`UNMODIFIABLE_HEADERS`] lists, no
/// name (case-insensitive) twice in one list (a name may be in several: remove, then set,
/// then add). The error names the field within the modifier.
pub fn check_header_modifier(modifier: &HeaderModifier) -> Result<(), (String, &'static str)> {
    let mut lists: Vec<(&str, Vec<&str>)> = Vec::new();
    for (list, headers) in [("set", &modifier.set), ("add", &modifier.add)] {
        for (i, header) in headers.iter().enumerate() {
            if let Err(why) = check_header(header) {
                return Err((format!("{list}[{i}]"), why));
            }
        }
        lists.push((list, headers.iter().map(|h| h.name.as_str()).collect()));
    }
    lists.push((
        "remove",
        modifier.remove.iter().map(String::as_str).collect(),
    ));
    for (list, names) in lists {
        let mut seen = HashSet::new();
        for (i, name) in names.into_iter().enumerate() {
            let field = || format!("{list}[{i}]");
            check_header_name(name).map_err(|why| (field(), why))?;
            let name = name.to_ascii_lowercase();
            if UNMODIFIABLE_HEADERS.contains(&name.as_str()) {
                return Err((
                    field(),
                    "framing, connection and host headers cannot be changed",
                ));
            }
            if !seen.insert(name) {
                return Err((field(), "names a header this list names already"));
            }
        }
    }
    Ok(())
}

/// Checks a route host pattern: a DNS name, `*.` followed by one, or `*`.
pub fn check_host_pattern(host: &str) -> Result<(), &'static str> {
    if host == "*" {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.contains('*') {
        return Err("a wildcard is only allowed as a leading `*.`");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err("must be a DNS name, `*.` followed by one, or `*`");
    }
    Ok(())
}

pub mod wire;

#[cfg(test)]
mod tests;
