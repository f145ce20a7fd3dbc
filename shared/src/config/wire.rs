//! The wire form of the listeners and clusters `tern-control` pushes
//! (`tern.discovery.v1.ProxyConfig`), to and from the domain types. Decoding checks what
//! the wire cannot (addresses, enums, identities) and names the field; cross-references are
//! checked once more by [`Config::validate`] when the proxy merges the result into its
//! config.

use std::net::SocketAddr;
use std::time::Duration;

use crate::api::discovery as pb;
use crate::config::{
    Authorization, AuthorizationRule, Backend, Balancing, CipherSuite, Cluster, ClusterTls, Config,
    ConnectionLimit, Header, HeaderModifier, Intercept, Listener, ListenerTls, OutboundPolicy,
    OutlierDetection, PathMatch, PathRewrite, Protocol, RateLimit, RateLimitOverride, Redirect,
    Retries, RetryOn, Rewrite, Route, TlsMode, ValueMatch,
};

/// Listeners and clusters from `tern-control`, at a version.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    /// The control plane's version of this config.
    pub version: u64,
    /// Listeners to add to the proxy's own.
    pub listeners: Vec<Listener>,
    /// Clusters to add to the proxy's own.
    pub clusters: Vec<Cluster>,
    /// The mesh's outbound policy, replacing the file's `interception.outbound_policy`.
    pub outbound_policy: Option<OutboundPolicy>,
    /// The mTLS mode of unclaimed inbound ports, replacing the file's
    /// `interception.inbound_tls.mode`.
    pub inbound_mode: Option<TlsMode>,
    /// Intercepted destinations outside the mesh, replacing `interception.outside_mesh`.
    pub outside_mesh: Vec<SocketAddr>,
}

/// A field of a pushed config that does not decode, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct WireError {
    /// The field, e.g. `clusters[2].endpoints[0]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn wrong(field: String, message: impl Into<String>) -> WireError {
    WireError {
        field,
        message: message.into(),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Encodes `config`'s listeners and clusters (and, with `interception`, its outbound policy)
/// at `version`.
pub fn encode(config: &Config, version: u64) -> pb::ProxyConfig {
    pb::ProxyConfig {
        version,
        listeners: config.listeners.iter().map(encode_listener).collect(),
        clusters: config.clusters.iter().map(encode_cluster).collect(),
        outbound_policy: match config.interception.as_ref().map(|i| i.outbound_policy) {
            None => pb::OutboundPolicy::Unspecified,
            Some(OutboundPolicy::AllowAny) => pb::OutboundPolicy::AllowAny,
            Some(OutboundPolicy::RegistryOnly) => pb::OutboundPolicy::RegistryOnly,
        } as i32,
        inbound_mode: match config.interception.as_ref().map(|i| i.inbound_tls.mode) {
            None => pb::TlsMode::Unspecified,
            Some(mode) => encode_mode(mode),
        } as i32,
        outside_mesh: config
            .interception
            .iter()
            .flat_map(|i| &i.outside_mesh)
            .map(ToString::to_string)
            .collect(),
    }
}

fn encode_mode(mode: TlsMode) -> pb::TlsMode {
    match mode {
        TlsMode::Strict => pb::TlsMode::Strict,
        TlsMode::Permissive => pb::TlsMode::Permissive,
        TlsMode::Disable => pb::TlsMode::Disable,
    }
}

fn decode_mode(field: String, mode: i32) -> Result<Option<TlsMode>, WireError> {
    match pb::TlsMode::try_from(mode) {
        Ok(pb::TlsMode::Unspecified) => Ok(None),
        Ok(pb::TlsMode::Strict) => Ok(Some(TlsMode::Strict)),
        Ok(pb::TlsMode::Permissive) => Ok(Some(TlsMode::Permissive)),
        Ok(pb::TlsMode::Disable) => Ok(Some(TlsMode::Disable)),
        Err(_) => Err(wrong(field, format!("unknown mode {mode}"))),
    }
}

fn encode_listener(l: &Listener) -> pb::Listener {
    pb::Listener {
        name: l.name.clone(),
        address: l.address.to_string(),
        protocol: match l.protocol {
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Http => pb::Protocol::Http,
            Protocol::Detect => pb::Protocol::Detect,
        } as i32,
        cluster: l.cluster.clone().unwrap_or_default(),
        routes: l
            .routes
            .iter()
            .map(|r| pb::Route {
                host: r.host.clone(),
                path_prefix: match &r.path {
                    PathMatch::Prefix(prefix) if !uses_newer_fields(r) => prefix.clone(),
                    _ => String::new(),
                },
                path: uses_newer_fields(r).then(|| pb::PathMatch {
                    kind: Some(match &r.path {
                        PathMatch::Prefix(prefix) => pb::path_match::Kind::Prefix(prefix.clone()),
                        PathMatch::Exact(exact) => pb::path_match::Kind::Exact(exact.clone()),
                        PathMatch::Regex(regex) => pb::path_match::Kind::Regex(regex.clone()),
                    }),
                }),
                requires: if uses_regex(r) {
                    vec![REGEX.to_owned()]
                } else {
                    Vec::new()
                },
                method: r.method.clone().unwrap_or_default(),
                backends: r
                    .backends
                    .iter()
                    .map(|b| pb::WeightedCluster {
                        cluster: b.cluster.clone(),
                        weight: b.weight,
                    })
                    .collect(),
                timeout_ms: millis(r.timeout),
                headers: r.headers.iter().map(encode_value_match).collect(),
                query: r.query.iter().map(encode_value_match).collect(),
                request_headers: encode_modifier(&r.request_headers),
                response_headers: encode_modifier(&r.response_headers),
                rewrite: r.rewrite.as_ref().map(|w| pb::Rewrite {
                    hostname: w.hostname.clone().unwrap_or_default(),
                    path: w.path.as_ref().map(encode_path_rewrite),
                }),
                redirect: r.redirect.as_ref().map(|d| pb::Redirect {
                    scheme: d.scheme.clone().unwrap_or_default(),
                    hostname: d.hostname.clone().unwrap_or_default(),
                    port: d.port.map_or(0, u32::from),
                    path: d.path.as_ref().map(encode_path_rewrite),
                    status: u32::from(d.status),
                }),
            })
            .collect(),
        tls: l.tls.as_ref().map(|t| pb::ListenerTls {
            mode: encode_mode(t.mode) as i32,
            handshake_timeout_ms: millis(t.handshake_timeout),
        }),
        intercept: match l.intercept {
            None => pb::Intercept::None,
            Some(Intercept::Outbound) => pb::Intercept::Outbound,
            Some(Intercept::Inbound) => pb::Intercept::Inbound,
        } as i32,
        authorization: l.authorization.as_ref().map(|a| pb::Authorization {
            identities: a.identities.clone(),
            namespaces: a.namespaces.clone(),
            rules: a
                .rules
                .iter()
                .map(|r| pb::AuthorizationRule {
                    identities: r.identities.clone(),
                    namespaces: r.namespaces.clone(),
                    methods: r.methods.clone(),
                    paths: r.paths.clone(),
                })
                .collect(),
        }),
        rate_limit: l.rate_limit.as_ref().map(|r| pb::RateLimit {
            total: r.total.unwrap_or(0),
            per_identity: r.per_identity.unwrap_or(0),
            overrides: r
                .overrides
                .iter()
                .map(|o| pb::RateLimitOverride {
                    identities: o.identities.clone(),
                    requests_per_second: o.requests_per_second,
                })
                .collect(),
        }),
    }
}

/// Whether a route uses a field a proxy that predates it would skip (a match, an edit, a
/// rewrite or a redirect).
fn uses_newer_fields(r: &Route) -> bool {
    !matches!(r.path, PathMatch::Prefix(_))
        || r.method.is_some()
        || !r.query.is_empty()
        || !r.request_headers.is_empty()
        || !r.response_headers.is_empty()
        || r.rewrite.is_some()
        || r.redirect.is_some()
        || uses_regex(r)
}

/// What a route may require of a proxy beyond what every proxy since `requires` knows; a
/// proxy refuses a route that requires something it does not know.
const KNOWN_FEATURES: [&str; 1] = [REGEX];
/// Regular-expression matches (`ValueMatch.regex`; a path's `regex`).
const REGEX: &str = "regex";

/// Whether a route matches anything by regular expression.
fn uses_regex(r: &Route) -> bool {
    matches!(r.path, PathMatch::Regex(_)) || r.headers.iter().chain(&r.query).any(|m| m.regex)
}

fn encode_value_match(m: &ValueMatch) -> pb::Header {
    pb::Header {
        name: m.name.clone(),
        value: m.value.clone(),
        regex: m.regex,
    }
}

fn decode_value_match(h: pb::Header) -> ValueMatch {
    ValueMatch {
        name: h.name,
        value: h.value,
        regex: h.regex,
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn encode_path_rewrite(rewrite: &PathRewrite) -> pb::PathRewrite {
    pb::PathRewrite {
        kind: Some(match rewrite {
            PathRewrite::ReplaceFullPath(path) => {
                pb::path_rewrite::Kind::ReplaceFullPath(path.clone())
            }
            PathRewrite::ReplacePrefixMatch(prefix) => {
                pb::path_rewrite::Kind::ReplacePrefixMatch(prefix.clone())
            }
        }),
    }
}

fn decode_path_rewrite(
    rewrite: Option<pb::PathRewrite>,
    field: impl Fn() -> String,
) -> Result<Option<PathRewrite>, WireError> {
    match rewrite.map(|r| r.kind) {
        None => Ok(None),
        Some(Some(pb::path_rewrite::Kind::ReplaceFullPath(path))) => {
            Ok(Some(PathRewrite::ReplaceFullPath(path)))
        }
        Some(Some(pb::path_rewrite::Kind::ReplacePrefixMatch(prefix))) => {
            Ok(Some(PathRewrite::ReplacePrefixMatch(prefix)))
        }
        Some(None) => Err(wrong(field(), "neither a full path nor a prefix")),
    }
}

fn encode_header(h: &Header) -> pb::Header {
    pb::Header {
        name: h.name.clone(),
        value: h.value.clone(),
        regex: false,
    }
}

fn decode_header(h: pb::Header) -> Header {
    Header {
        name: h.name,
        value: h.value,
    }
}

/// None for a modifier that changes nothing, so an older peer sees what it always saw.
fn encode_modifier(m: &HeaderModifier) -> Option<pb::HeaderModifier> {
    (!m.is_empty()).then(|| pb::HeaderModifier {
        set: m.set.iter().map(encode_header).collect(),
        add: m.add.iter().map(encode_header).collect(),
        remove: m.remove.clone(),
    })
}

fn decode_modifier(m: Option<pb::HeaderModifier>) -> HeaderModifier {
    m.map(|m| HeaderModifier {
        set: m.set.into_iter().map(decode_header).collect(),
        add: m.add.into_iter().map(decode_header).collect(),
        remove: m.remove,
    })
    .unwrap_or_default()
}

fn encode_cluster(c: &Cluster) -> pb::Cluster {
    pb::Cluster {
        balancing: match c.balancing {
            Balancing::RoundRobin => pb::Balancing::RoundRobin,
            Balancing::LeastRequest => pb::Balancing::LeastRequest,
        } as i32,
        outlier_detection: c.outlier_detection.as_ref().map(|o| pb::OutlierDetection {
            consecutive_failures: o.consecutive_failures,
            base_ejection_time_ms: millis(o.base_ejection_time),
            max_ejected_percent: o.max_ejected_percent,
        }),
        retries: c.retries.as_ref().map(|r| pb::Retries {
            attempts: r.attempts,
            on: r
                .on
                .iter()
                .map(|on| match on {
                    RetryOn::Reset => pb::RetryOn::Reset,
                    RetryOn::GatewayError => pb::RetryOn::GatewayError,
                    RetryOn::Unavailable => pb::RetryOn::Unavailable,
                } as i32)
                .collect(),
            per_try_timeout_ms: r.per_try_timeout.map_or(0, millis),
            budget_percent: r.budget_percent,
            min_per_second: r.min_per_second,
        }),
        connection_limit: c.connection_limit.map(|l| pb::ConnectionLimit {
            max_connections: l.max_connections,
            max_pending: l.max_pending,
        }),
        name: c.name.clone(),
        endpoints: c.endpoints.iter().map(ToString::to_string).collect(),
        connect_timeout_ms: millis(c.connect_timeout),
        idle_timeout_ms: millis(c.idle_timeout),
        max_idle_per_endpoint: u32::try_from(c.max_idle_per_endpoint).unwrap_or(u32::MAX),
        tls: c.tls.as_ref().map(|t| pb::ClusterTls {
            identity: t.identity.to_string(),
            cipher_suites: t
                .cipher_suites
                .iter()
                .flatten()
                .map(|s| match s {
                    CipherSuite::Aes128GcmSha256 => pb::CipherSuite::Aes128GcmSha256,
                    CipherSuite::Aes256GcmSha384 => pb::CipherSuite::Aes256GcmSha384,
                    CipherSuite::Chacha20Poly1305Sha256 => pb::CipherSuite::Chacha20Poly1305Sha256,
                } as i32)
                .collect(),
        }),
    }
}

fn address(field: String, text: &str) -> Result<SocketAddr, WireError> {
    text.parse()
        .map_err(|_| wrong(field, format!("`{text}` is not an ip:port")))
}

impl TryFrom<pb::ProxyConfig> for Pushed {
    type Error = WireError;

    fn try_from(config: pb::ProxyConfig) -> Result<Pushed, WireError> {
        let listeners = config
            .listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| decode_listener(i, l))
            .collect::<Result<_, _>>()?;
        let clusters = config
            .clusters
            .into_iter()
            .enumerate()
            .map(|(i, c)| decode_cluster(i, c))
            .collect::<Result<_, _>>()?;
        let outbound_policy = match pb::OutboundPolicy::try_from(config.outbound_policy) {
            Ok(pb::OutboundPolicy::Unspecified) => None,
            Ok(pb::OutboundPolicy::AllowAny) => Some(OutboundPolicy::AllowAny),
            Ok(pb::OutboundPolicy::RegistryOnly) => Some(OutboundPolicy::RegistryOnly),
            Err(_) => {
                return Err(wrong(
                    "outbound_policy".into(),
                    format!("unknown policy {}", config.outbound_policy),
                ));
            }
        };
        Ok(Pushed {
            version: config.version,
            listeners,
            clusters,
            outbound_policy,
            inbound_mode: decode_mode("inbound_mode".into(), config.inbound_mode)?,
            outside_mesh: config
                .outside_mesh
                .iter()
                .enumerate()
                .map(|(i, a)| address(format!("outside_mesh[{i}]"), a))
                .collect::<Result<_, _>>()?,
        })
    }
}

fn decode_listener(i: usize, l: pb::Listener) -> Result<Listener, WireError> {
    let at = |f: &str| format!("listeners[{i}].{f}");
    let protocol = match pb::Protocol::try_from(l.protocol) {
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        Ok(pb::Protocol::Http) => Protocol::Http,
        Ok(pb::Protocol::Detect) => Protocol::Detect,
        _ => {
            return Err(wrong(
                at("protocol"),
                format!("unknown protocol {}", l.protocol),
            ));
        }
    };
    let mut routes = Vec::with_capacity(l.routes.len());
    for (j, r) in l.routes.into_iter().enumerate() {
        if let Some(unknown) = r
            .requires
            .iter()
            .find(|f| !KNOWN_FEATURES.contains(&f.as_str()))
        {
            return Err(wrong(
                at(&format!("routes[{j}].requires")),
                format!("this proxy does not know `{unknown}`"),
            ));
        }
        let path = match r.path.map(|p| p.kind) {
            None => PathMatch::Prefix(r.path_prefix),
            Some(Some(pb::path_match::Kind::Prefix(prefix))) => PathMatch::Prefix(prefix),
            Some(Some(pb::path_match::Kind::Exact(exact))) => PathMatch::Exact(exact),
            Some(Some(pb::path_match::Kind::Regex(regex))) => PathMatch::Regex(regex),
            Some(None) => {
                return Err(wrong(
                    at(&format!("routes[{j}].path")),
                    "neither a prefix, an exact path nor a regular expression",
                ));
            }
        };
        routes.push(Route {
            host: r.host,
            path,
            method: non_empty(r.method),
            headers: r.headers.into_iter().map(decode_value_match).collect(),
            query: r.query.into_iter().map(decode_value_match).collect(),
            backends: r
                .backends
                .into_iter()
                .map(|b| Backend {
                    cluster: b.cluster,
                    weight: b.weight,
                })
                .collect(),
            timeout: Duration::from_millis(r.timeout_ms),
            request_headers: decode_modifier(r.request_headers),
            response_headers: decode_modifier(r.response_headers),
            rewrite: match r.rewrite {
                None => None,
                Some(w) => Some(Rewrite {
                    hostname: non_empty(w.hostname),
                    path: decode_path_rewrite(w.path, || at(&format!("routes[{j}].rewrite.path")))?,
                }),
            },
            redirect: match r.redirect {
                None => None,
                Some(d) => Some(Redirect {
                    scheme: non_empty(d.scheme),
                    hostname: non_empty(d.hostname),
                    port: match u16::try_from(d.port) {
                        Ok(0) => None,
                        Ok(port) => Some(port),
                        Err(_) => {
                            return Err(wrong(
                                at(&format!("routes[{j}].redirect.port")),
                                format!("{} is not a port", d.port),
                            ));
                        }
                    },
                    path: decode_path_rewrite(d.path, || {
                        at(&format!("routes[{j}].redirect.path"))
                    })?,
                    status: u16::try_from(d.status).unwrap_or_default(),
                }),
            },
        });
    }
    let tls = match l.tls {
        None => None,
        Some(t) => Some(ListenerTls {
            mode: decode_mode(at("tls.mode"), t.mode)?
                .ok_or_else(|| wrong(at("tls.mode"), "must be set"))?,
            handshake_timeout: Duration::from_millis(t.handshake_timeout_ms),
        }),
    };
    let intercept = match pb::Intercept::try_from(l.intercept) {
        Ok(pb::Intercept::None) => None,
        Ok(pb::Intercept::Outbound) => Some(Intercept::Outbound),
        Ok(pb::Intercept::Inbound) => Some(Intercept::Inbound),
        Err(_) => {
            return Err(wrong(
                at("intercept"),
                format!("unknown direction {}", l.intercept),
            ));
        }
    };
    Ok(Listener {
        address: address(at("address"), &l.address)?,
        name: l.name,
        protocol,
        cluster: (!l.cluster.is_empty()).then_some(l.cluster),
        routes,
        tls,
        intercept,
        authorization: l.authorization.map(|a| Authorization {
            identities: a.identities,
            namespaces: a.namespaces,
            rules: a
                .rules
                .into_iter()
                .map(|r| AuthorizationRule {
                    identities: r.identities,
                    namespaces: r.namespaces,
                    methods: r.methods,
                    paths: r.paths,
                })
                .collect(),
        }),
        rate_limit: l.rate_limit.map(|r| RateLimit {
            total: (r.total > 0).then_some(r.total),
            per_identity: (r.per_identity > 0).then_some(r.per_identity),
            overrides: r
                .overrides
                .into_iter()
                .map(|o| RateLimitOverride {
                    identities: o.identities,
                    requests_per_second: o.requests_per_second,
                })
                .collect(),
        }),
    })
}

fn decode_cluster(i: usize, c: pb::Cluster) -> Result<Cluster, WireError> {
    let at = |f: &str| format!("clusters[{i}].{f}");
    let endpoints = c
        .endpoints
        .iter()
        .enumerate()
        .map(|(j, e)| address(at(&format!("endpoints[{j}]")), e))
        .collect::<Result<_, _>>()?;
    let tls = match c.tls {
        None => None,
        Some(t) => {
            let identity = t
                .identity
                .parse()
                .map_err(|e| wrong(at("tls.identity"), format!("{e}")))?;
            let suites = t
                .cipher_suites
                .iter()
                .map(|&s| match pb::CipherSuite::try_from(s) {
                    Ok(pb::CipherSuite::Aes128GcmSha256) => Ok(CipherSuite::Aes128GcmSha256),
                    Ok(pb::CipherSuite::Aes256GcmSha384) => Ok(CipherSuite::Aes256GcmSha384),
                    Ok(pb::CipherSuite::Chacha20Poly1305Sha256) => {
                        Ok(CipherSuite::Chacha20Poly1305Sha256)
                    }
                    _ => Err(wrong(at("tls.cipher_suites"), format!("unknown suite {s}"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(ClusterTls {
                identity,
                cipher_suites: (!suites.is_empty()).then_some(suites),
            })
        }
    };
    let retries = match c.retries {
        None => None,
        Some(r) => Some(Retries {
            attempts: r.attempts,
            on: r
                .on
                .iter()
                .enumerate()
                .map(|(j, &on)| match pb::RetryOn::try_from(on) {
                    Ok(pb::RetryOn::Reset) => Ok(RetryOn::Reset),
                    Ok(pb::RetryOn::GatewayError) => Ok(RetryOn::GatewayError),
                    Ok(pb::RetryOn::Unavailable) => Ok(RetryOn::Unavailable),
                    Ok(pb::RetryOn::Unspecified) | Err(_) => Err(wrong(
                        at(&format!("retries.on[{j}]")),
                        format!("unknown failure {on}"),
                    )),
                })
                .collect::<Result<_, _>>()?,
            per_try_timeout: (r.per_try_timeout_ms > 0)
                .then(|| Duration::from_millis(r.per_try_timeout_ms)),
            budget_percent: r.budget_percent,
            min_per_second: r.min_per_second,
        }),
    };
    Ok(Cluster {
        name: c.name,
        endpoints,
        connect_timeout: Duration::from_millis(c.connect_timeout_ms),
        idle_timeout: Duration::from_millis(c.idle_timeout_ms),
        max_idle_per_endpoint: c.max_idle_per_endpoint as usize,
        tls,
        retries,
        balancing: match pb::Balancing::try_from(c.balancing) {
            Ok(pb::Balancing::RoundRobin) => Balancing::RoundRobin,
            Ok(pb::Balancing::LeastRequest) => Balancing::LeastRequest,
            Err(_) => {
                return Err(wrong(
                    at("balancing"),
                    format!("unknown balancing {}", c.balancing),
                ));
            }
        },
        outlier_detection: c.outlier_detection.map(|o| OutlierDetection {
            consecutive_failures: o.consecutive_failures,
            base_ejection_time: Duration::from_millis(o.base_ejection_time_ms),
            max_ejected_percent: o.max_ejected_percent,
        }),
        connection_limit: c.connection_limit.map(|l| ConnectionLimit {
            max_connections: l.max_connections,
            max_pending: l.max_pending,
        }),
    })
}

impl Pushed {
    /// `base` (the proxy's own config) with these listeners and clusters added, validated.
    pub fn merge_into(&self, base: &Config) -> Result<Config, (String, String)> {
        let mut config = base.clone();
        config.listeners.extend(self.listeners.iter().cloned());
        config.clusters.extend(self.clusters.iter().cloned());
        if let Some(interception) = &mut config.interception {
            if let Some(policy) = self.outbound_policy {
                interception.outbound_policy = policy;
            }
            if let Some(mode) = self.inbound_mode {
                interception.inbound_tls.mode = mode;
            }
            interception.outside_mesh.clone_from(&self.outside_mesh);
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
listeners:
  - name: outbound-cart
    address: 127.0.0.1:18080
    protocol: http
    routes:
      - path_prefix: /v2
        headers: [{ name: x-canary, value: "yes" }]
        backends: [{ cluster: cart-v2, weight: 9 }, { cluster: cart, weight: 1 }]
        timeout: 750ms
      - path_exact: /v2/checkout
        method: POST
        query: [{ name: mode, value: "fast lane" }]
        request_headers: { set: [{ name: x-env, value: prod }], add: [{ name: x-tag, value: a }], remove: [x-debug] }
        response_headers: { remove: [server] }
        cluster: cart
      - path_prefix: /old
        redirect: { scheme: https, hostname: shop.example, port: 8443, path: { replace_prefix_match: /new }, status: 301 }
      - path_prefix: /v1
        rewrite: { hostname: cart.internal, path: { replace_full_path: /api } }
        cluster: cart
      - path_regex: "/items/[0-9]+"
        headers: [{ name: x-user, value: "ops|dev", regex: true }]
        query: [{ name: page, value: "[0-9]+", regex: true }]
        cluster: cart
      - cluster: cart
  - name: inbound-8080
    address: 127.0.0.1:15080
    protocol: tcp
    cluster: app
    tls: { mode: permissive, handshake_timeout: 2s }
  - name: outbound-db
    address: 198.19.0.5:5432
    protocol: detect
    cluster: cart
    intercept: outbound
  - name: inbound-8080-intercepted
    address: 0.0.0.0:8080
    protocol: http
    routes: [{ cluster: app }]
    tls: { mode: strict }
    intercept: inbound
    authorization: { identities: ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/ops/sa/*"], namespaces: [shop], rules: [{ identities: ["spiffe://cluster.local/ns/shop/sa/ci"], methods: [GET, HEAD], paths: [/healthz, "/api/*"] }, { namespaces: [batch] }] }
    rate_limit: { total: 500, per_identity: 50, overrides: [{ identities: ["spiffe://cluster.local/ns/ops/sa/*"], requests_per_second: 200 }] }
  - name: inbound-9090
    address: 127.0.0.1:15090
    protocol: http
    routes: [{ cluster: app }]
    rate_limit: { per_identity: 7 }
interception: { outbound_policy: registry_only, mark: 1337, outside_mesh: ["192.0.2.7:443"] }
clusters:
  - name: cart
    endpoints: [127.0.0.1:9001, "[::1]:9002"]
    tls: { identity: spiffe://cluster.local/ns/shop/sa/cart, cipher_suites: [TLS13_CHACHA20_POLY1305_SHA256] }
  - name: cart-v2
    endpoints: []
    connect_timeout: 250ms
    retries: { attempts: 2, on: [reset, gateway_error, unavailable], per_try_timeout: 300ms, budget_percent: 25, min_per_second: 3 }
    outlier_detection: { consecutive_failures: 3, base_ejection_time: 15s, max_ejected_percent: 40 }
    balancing: least_request
    connection_limit: { max_connections: 8, max_pending: 0 }
  - name: app
    endpoints: [127.0.0.1:8080]
identity:
  files: { cert: c.pem, key: k.pem, trust_bundle: b.pem }
"#;

    #[test]
    fn a_config_survives_the_wire_unchanged() {
        let config = Config::from_yaml(CONFIG, "wire.yaml").unwrap();
        let wire = encode(&config, 7);
        let pushed = Pushed::try_from(wire).unwrap();
        assert_eq!(pushed.version, 7);
        assert_eq!(pushed.listeners, config.listeners);
        assert_eq!(pushed.clusters, config.clusters);

        let base = Config {
            listeners: Vec::new(),
            clusters: Vec::new(),
            ..config.clone()
        };
        assert_eq!(pushed.merge_into(&base).unwrap(), config);
    }

    #[test]
    fn a_route_requiring_what_the_proxy_does_not_know_is_refused() {
        let config = Config::from_yaml(CONFIG, "wire.yaml").unwrap();
        let mut wire = encode(&config, 7);
        let regex = wire.listeners[0]
            .routes
            .iter()
            .position(|r| !r.requires.is_empty())
            .unwrap();
        assert_eq!(wire.listeners[0].routes[regex].requires, ["regex"]);
        wire.listeners[0].routes[0].requires = vec!["teleport".into()];
        let error = Pushed::try_from(wire).unwrap_err().to_string();
        assert!(
            error.contains("listeners[0].routes[0].requires") && error.contains("teleport"),
            "{error}"
        );
    }

    #[test]
    fn a_route_an_older_proxy_would_widen_carries_no_path_prefix() {
        let config = Config::from_yaml(CONFIG, "wire.yaml").unwrap();
        let wire = encode(&config, 7);
        let routes = &wire.listeners[0].routes;
        // Matched on headers alone: what every proxy has always read.
        assert_eq!(routes[0].path_prefix, "/v2");
        assert!(routes[0].path.is_none());
        // An exact path, a method, a query and header edits: only in `path`, so an older
        // proxy, finding no prefix, refuses the config instead of routing every request.
        assert_eq!(routes[1].path_prefix, "");
        assert_eq!(
            routes[1].path.as_ref().and_then(|p| p.kind.clone()),
            Some(pb::path_match::Kind::Exact("/v2/checkout".into()))
        );
        let plain = config.listeners[0].routes.last().unwrap();
        assert!(!uses_newer_fields(plain));
        let mut with_method = plain.clone();
        with_method.method = Some("GET".into());
        assert!(uses_newer_fields(&with_method));
        assert!(routes[2].redirect.is_some() && routes[2].path_prefix.is_empty());
    }

    #[test]
    fn bad_wire_values_name_their_field() {
        let config = Config::from_yaml(CONFIG, "wire.yaml").unwrap();
        let mut wire = encode(&config, 1);
        wire.clusters[0].endpoints[1] = "cart:80".into();
        let err = Pushed::try_from(wire).unwrap_err();
        assert_eq!(err.field, "clusters[0].endpoints[1]");

        let mut wire = encode(&config, 1);
        wire.listeners[1].protocol = 42;
        assert_eq!(
            Pushed::try_from(wire).unwrap_err().field,
            "listeners[1].protocol"
        );

        let mut wire = encode(&config, 1);
        wire.clusters[0].tls.as_mut().unwrap().identity = "spiffe://nope".into();
        assert_eq!(
            Pushed::try_from(wire).unwrap_err().field,
            "clusters[0].tls.identity"
        );

        // Decodes, but a route names a cluster that is not there: validation says where.
        let mut wire = encode(&config, 1);
        wire.clusters.remove(1);
        let pushed = Pushed::try_from(wire).unwrap();
        let base = Config {
            listeners: Vec::new(),
            clusters: Vec::new(),
            ..config
        };
        let (field, message) = pushed.merge_into(&base).unwrap_err();
        assert_eq!(field, "listeners[0].routes[0].backends[0].cluster");
        assert!(message.contains("cart-v2"), "{message}");
    }
}
