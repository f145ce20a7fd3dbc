//! A validated [`Config`] compiled into what workers read on the data path: listener plans,
//! cluster plans and per-listener route tables ([`crate::proxy::route`]), addressed by
//! index, immutable and versioned.
//!
//! A `Snapshot` is built once per config change on the control thread and shared read-only
//! by every worker (`Arc`); an opaque TCP connection keeps the snapshot it was accepted under
//! until it ends, an HTTP one moves to the live snapshot between requests.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use shared::config::{self, Config, Intercept, OutboundPolicy, Protocol};

use crate::proxy::rate_limit::RateLimiter;
use crate::proxy::route::{Regexes, RouteTable};

/// An immutable, versioned view of the config, ready for the data path.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one with every applied config.
    pub version: u64,
    /// Where the config came from (a file path, for now).
    pub source: String,
    /// The config as given, for `/config_dump`.
    pub config: Config,
    /// Listeners, in config order.
    pub listeners: Vec<ListenerPlan>,
    /// Listener name → index in `listeners`.
    listener_names: HashMap<Arc<str>, usize>,
    /// Clusters, in config order; plans refer to them by index.
    pub clusters: Vec<ClusterPlan>,
    /// Cluster name → index in `clusters`.
    cluster_names: HashMap<Arc<str>, usize>,
    /// This proxy's workload identity and its certificate's validity, when the config uses
    /// mTLS.
    pub identity: Option<(shared::SpiffeId, crate::tls::Validity)>,
    /// Transparent mode: which listener takes an intercepted connection.
    pub intercept: Option<InterceptPlan>,
    /// The regular expressions its routes match with (each worker copies them).
    pub regexes: Regexes,
}

/// How intercepted connections find their listener.
#[derive(Debug)]
pub struct InterceptPlan {
    /// Original destination → listener index, for each direction.
    outbound: HashMap<SocketAddr, usize>,
    inbound: HashMap<SocketAddr, usize>,
    /// What happens to outbound connections no listener claims.
    pub policy: OutboundPolicy,
    /// Mark on every connection the proxy opens.
    pub mark: Option<u32>,
    /// The cluster (no endpoints of its own) that unclaimed connections pass through to
    /// their original destination on.
    pub passthrough: usize,
    /// Destinations known to be outside the mesh.
    outside: std::collections::HashSet<SocketAddr>,
}

impl InterceptPlan {
    /// The listener that takes a connection intercepted in `direction` on its way to
    /// `original`: the one naming that address, else one naming the port on the unspecified
    /// address of either family (a Pod's port, whichever of its addresses was dialed).
    pub fn claim(&self, direction: Intercept, original: SocketAddr) -> Option<usize> {
        let table = match direction {
            Intercept::Outbound => &self.outbound,
            Intercept::Inbound => &self.inbound,
        };
        let port = original.port();
        table
            .get(&original)
            .or_else(|| table.get(&SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)))
            .or_else(|| table.get(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)))
            .copied()
    }

    /// Whether `tern-control` said `destination` is outside the mesh.
    pub fn is_outside(&self, destination: SocketAddr) -> bool {
        self.outside.contains(&destination)
    }
}

/// One listener as the workers run it.
#[derive(Debug)]
pub struct ListenerPlan {
    /// The listener's name (a metric label).
    pub name: Arc<str>,
    /// The address from the config (port 0 allowed).
    pub configured: SocketAddr,
    /// What it does with connections.
    pub kind: ListenerKind,
    /// mTLS termination, if configured.
    pub tls: Option<ListenerTls>,
    /// Who is served; anyone when `None`.
    pub authorization: Option<AuthorizationPlan>,
    /// Caps on the HTTP requests a second it serves, shared by the workers.
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// Whether it has sockets of its own; an intercepted destination has none.
    pub bound: bool,
}

/// Who a listener serves ([`config::Authorization`], parsed once): peers whose mTLS
/// identity matches a pattern, or is a workload of a listed namespace in this proxy's trust
/// domain, for everything; those a rule names, for the HTTP requests it describes.
#[derive(Debug, PartialEq, Eq)]
pub struct AuthorizationPlan {
    everything: Callers,
    rules: Vec<RequestRule>,
    trust_domain: Option<String>,
}

/// What a listener's authorization lets a peer do, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Nothing.
    Nothing,
    /// The HTTP requests a rule describes, each to be checked.
    SomeRequests,
    /// Anything: opaque TCP, any request.
    Everything,
}

/// Peers by identity pattern or namespace.
#[derive(Debug, PartialEq, Eq)]
struct Callers {
    identities: Vec<shared::identity::IdentityPattern>,
    namespaces: Vec<String>,
}

impl Callers {
    fn parse(identities: &[String], namespaces: &[String]) -> Callers {
        Callers {
            // Validation parsed every pattern.
            identities: identities.iter().filter_map(|p| p.parse().ok()).collect(),
            namespaces: namespaces.to_vec(),
        }
    }

    fn name(&self, peer: &shared::SpiffeId, trust_domain: Option<&str>) -> bool {
        self.identities.iter().any(|p| p.matches(peer))
            || (trust_domain == Some(peer.trust_domain())
                && self.namespaces.iter().any(|n| n == peer.namespace()))
    }
}

/// Callers let in for the requests with one of `methods` (any when empty) and a path one of
/// `paths` matches (any when empty).
#[derive(Debug, PartialEq, Eq)]
struct RequestRule {
    callers: Callers,
    methods: Vec<Box<[u8]>>,
    paths: Vec<PathPattern>,
}

/// A path, or a prefix of paths (a pattern ending in `*`).
#[derive(Debug, PartialEq, Eq)]
enum PathPattern {
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
}

impl PathPattern {
    fn parse(pattern: &str) -> PathPattern {
        match pattern.strip_suffix('*') {
            Some(prefix) => PathPattern::Prefix(prefix.as_bytes().into()),
            None => PathPattern::Exact(pattern.as_bytes().into()),
        }
    }

    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathPattern::Exact(exact) => path == &exact[..],
            PathPattern::Prefix(prefix) => path.starts_with(prefix),
        }
    }

    /// Whether this matches every path `other` matches.
    fn covers(&self, other: &PathPattern) -> bool {
        match (self, other) {
            (PathPattern::Exact(a), PathPattern::Exact(b)) => a == b,
            (PathPattern::Exact(_), PathPattern::Prefix(_)) => false,
            (PathPattern::Prefix(a), PathPattern::Exact(b) | PathPattern::Prefix(b)) => {
                b.starts_with(a)
            }
        }
    }
}

impl RequestRule {
    /// Whether this rule lets through every request with `method` (`None`: any) and a path
    /// `path` matches (`None`: any path).
    fn covers(&self, method: Option<&[u8]>, path: Option<&PathPattern>) -> bool {
        let methods = self.methods.is_empty()
            || method.is_some_and(|method| self.methods.iter().any(|m| **m == *method));
        let paths = self.paths.is_empty()
            || path.is_some_and(|path| self.paths.iter().any(|p| p.covers(path)));
        methods && paths
    }

    /// The (method, path pattern) pairs it lets through, `None` standing for any.
    fn requests(&self) -> impl Iterator<Item = (Option<&[u8]>, Option<&PathPattern>)> {
        let methods: Vec<Option<&[u8]>> = match self.methods.is_empty() {
            true => vec![None],
            false => self.methods.iter().map(|m| Some(&**m)).collect(),
        };
        let paths: Vec<Option<&PathPattern>> = match self.paths.is_empty() {
            true => vec![None],
            false => self.paths.iter().map(Some).collect(),
        };
        methods
            .into_iter()
            .flat_map(move |method| paths.clone().into_iter().map(move |path| (method, path)))
    }
}

impl AuthorizationPlan {
    /// Parses a listener's authorization; namespaces are taken within `trust_domain`.
    pub fn new(authorization: &config::Authorization, trust_domain: Option<&str>) -> Self {
        AuthorizationPlan {
            everything: Callers::parse(&authorization.identities, &authorization.namespaces),
            rules: authorization
                .rules
                .iter()
                .map(|rule| {
                    // `*` stands for any method, or any path; as an empty list does.
                    let any = |list: &[String]| list.iter().any(|item| item == "*");
                    let methods = match any(&rule.methods) {
                        true => Vec::new(),
                        false => rule.methods.iter().map(|m| m.as_bytes().into()).collect(),
                    };
                    let paths = match any(&rule.paths) {
                        true => Vec::new(),
                        false => rule.paths.iter().map(|p| PathPattern::parse(p)).collect(),
                    };
                    RequestRule {
                        callers: Callers::parse(&rule.identities, &rule.namespaces),
                        methods,
                        paths,
                    }
                })
                .collect(),
            trust_domain: trust_domain.map(str::to_owned),
        }
    }

    /// What a peer with `identity` (none: no mTLS) may do.
    pub fn access(&self, identity: Option<&shared::SpiffeId>) -> Access {
        let Some(peer) = identity else {
            return Access::Nothing;
        };
        let trust_domain = self.trust_domain.as_deref();
        if self.everything.name(peer, trust_domain) {
            Access::Everything
        } else if self
            .rules
            .iter()
            .any(|r| r.callers.name(peer, trust_domain))
        {
            Access::SomeRequests
        } else {
            Access::Nothing
        }
    }

    /// Whether a rule lets a peer with `identity` make a request with `method` and `target`
    /// (the path as sent, query included): the check for a peer with
    /// [`Access::SomeRequests`].
    pub fn rules_allow(
        &self,
        identity: Option<&shared::SpiffeId>,
        method: &[u8],
        target: &[u8],
    ) -> bool {
        let (Some(peer), path) = (identity, config::plain_path(target)) else {
            return false;
        };
        self.rules_naming(peer).any(|rule| {
            (rule.methods.is_empty() || rule.methods.iter().any(|m| **m == *method))
                && (rule.paths.is_empty()
                    || path.is_some_and(|path| rule.paths.iter().any(|p| p.matches(path))))
        })
    }

    fn rules_naming<'a>(
        &'a self,
        peer: &'a shared::SpiffeId,
    ) -> impl Iterator<Item = &'a RequestRule> + 'a {
        let trust_domain = self.trust_domain.as_deref();
        self.rules
            .iter()
            .filter(move |rule| rule.callers.name(peer, trust_domain))
    }

    /// Whether going from `before` to `after` (`None`: everyone for everything) lets a peer
    /// with `identity` do less: less access, or, let in for some requests by both, a method
    /// and path pattern of a rule naming it before that no rule naming it after lets through
    /// whole. A change that only adds (a method, a path, a wider prefix, a rule) is no
    /// narrowing, so it closes nothing.
    pub fn narrows(
        before: Option<&AuthorizationPlan>,
        after: Option<&AuthorizationPlan>,
        identity: Option<&shared::SpiffeId>,
    ) -> bool {
        let access = |plan: Option<&AuthorizationPlan>| {
            plan.map_or(Access::Everything, |p| p.access(identity))
        };
        let (was, is) = (access(before), access(after));
        if is != was || is != Access::SomeRequests {
            return is < was;
        }
        let (Some(before), Some(after), Some(peer)) = (before, after, identity) else {
            return false;
        };
        let after: Vec<&RequestRule> = after.rules_naming(peer).collect();
        before.rules_naming(peer).any(|rule| {
            rule.requests()
                .any(|(method, path)| !after.iter().any(|a| a.covers(method, path)))
        })
    }
}

/// How a listener terminates mTLS.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// The server configuration (this proxy's certificate, client certificates required).
    pub config: Arc<rustls::ServerConfig>,
    /// Time allowed for the handshake (and, when permissive, for the first byte).
    pub handshake_timeout: Duration,
    /// Plaintext is accepted too.
    pub permissive: bool,
}

/// How a cluster originates mTLS.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The identity the endpoints must prove.
    pub identity: shared::SpiffeId,
    /// Client configuration offering ALPN `tern-tcp` (opaque TCP inside).
    pub tcp: Arc<rustls::ClientConfig>,
    /// Client configuration offering ALPN `tern-http/1.1`.
    pub http1: Arc<rustls::ClientConfig>,
    /// Client configuration offering ALPN `tern-h2`.
    pub http2: Arc<rustls::ClientConfig>,
}

impl ClusterTls {
    /// The client configuration for what travels inside.
    pub fn client(&self, inner: crate::proxy::Inner) -> Arc<rustls::ClientConfig> {
        match inner {
            crate::proxy::Inner::Tcp => self.tcp.clone(),
            crate::proxy::Inner::Http1 => self.http1.clone(),
            crate::proxy::Inner::Http2 => self.http2.clone(),
        }
    }
}

/// What a listener does with a connection.
#[derive(Debug)]
pub enum ListenerKind {
    /// Forward bytes to a cluster.
    Tcp {
        /// Index into [`Snapshot::clusters`].
        cluster: usize,
    },
    /// Parse HTTP/1.1, or HTTP/2 (its preface, or ALPN `tern-h2`), and route each request.
    Http(RouteTable),
    /// HTTP/1.1 or HTTP/2 (routed) or opaque TCP (to `cluster`), told by ALPN under mTLS and
    /// by the first bytes otherwise.
    Detect {
        /// Index into [`Snapshot::clusters`], for opaque TCP.
        cluster: usize,
        /// Routes for HTTP/1.1.
        routes: RouteTable,
    },
    /// An interception socket: each connection is served by the listener its original
    /// destination names ([`InterceptPlan::claim`]), or, unclaimed, passed through to it
    /// (inbound always; outbound when the policy allows).
    Intercepted(Intercept),
}

impl ListenerKind {
    /// The HTTP routes of an `http` or `detect` listener.
    pub fn routes(&self) -> Option<&RouteTable> {
        match self {
            ListenerKind::Http(routes) | ListenerKind::Detect { routes, .. } => Some(routes),
            ListenerKind::Tcp { .. } | ListenerKind::Intercepted(_) => None,
        }
    }
}

/// One cluster as the workers run it.
#[derive(Debug)]
pub struct ClusterPlan {
    /// The cluster's name (a metric label).
    pub name: Arc<str>,
    /// Upstream addresses, balanced round robin per worker.
    pub endpoints: Vec<SocketAddr>,
    /// Upstream TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle timeout for opaque TCP and for pooled HTTP connections.
    pub idle_timeout: Duration,
    /// Idle HTTP connections kept per endpoint, per worker.
    pub max_idle_per_endpoint: usize,
    /// mTLS origination, if configured.
    pub tls: Option<ClusterTls>,
    /// Retries of HTTP requests ([`crate::proxy::retry`]), if configured.
    pub retries: Option<config::Retries>,
    /// Ejection of endpoints whose requests keep failing ([`crate::proxy::balance`]).
    pub outlier_detection: Option<config::OutlierDetection>,
    /// How its endpoints are picked.
    pub balancing: config::Balancing,
    /// The cap on its upstream connections ([`crate::proxy::limit`]), if configured.
    pub connection_limit: Option<config::ConnectionLimit>,
}

/// The cluster that intercepted connections no listener claims pass through on.
pub const PASSTHROUGH: &str = "intercept-passthrough";

impl Snapshot {
    /// Compiles a config that passed [`Config::validate`], with this proxy's identity (which
    /// the control side resolved from files or got from the CA). Fails if the config does not
    /// validate or rustls refuses a TLS configuration.
    pub fn compile(
        config: Config,
        identity: Option<&crate::tls::Identity>,
        version: u64,
        source: String,
    ) -> Result<Snapshot, config::ConfigError> {
        config
            .validate()
            .map_err(|(field, message)| config::ConfigError::Invalid {
                origin: source.clone(),
                field,
                message,
            })?;
        let invalid = |field: String, message: String| config::ConfigError::Invalid {
            origin: source.clone(),
            field,
            message,
        };
        let mut clusters: Vec<ClusterPlan> = Vec::with_capacity(config.clusters.len());
        for (i, c) in config.clusters.iter().enumerate() {
            let tls = match (&c.tls, identity) {
                (Some(tls), Some(identity)) => {
                    let client = |alpn| {
                        identity
                            .client_config(tls.identity.clone(), alpn, tls.cipher_suites.as_deref())
                            .map_err(|e| invalid(format!("clusters[{i}].tls"), e.to_string()))
                    };
                    Some(ClusterTls {
                        identity: tls.identity.clone(),
                        tcp: client(crate::tls::ALPN_TCP)?,
                        http1: client(crate::tls::ALPN_HTTP1)?,
                        http2: client(crate::tls::ALPN_HTTP2)?,
                    })
                }
                _ => None,
            };
            clusters.push(ClusterPlan {
                name: c.name.as_str().into(),
                endpoints: c.endpoints.clone(),
                connect_timeout: c.connect_timeout,
                idle_timeout: c.idle_timeout,
                max_idle_per_endpoint: c.max_idle_per_endpoint,
                tls,
                retries: c.retries.clone(),
                outlier_detection: c.outlier_detection.clone(),
                balancing: c.balancing,
                connection_limit: c.connection_limit,
            });
        }
        let passthrough = config.interception.as_ref().map(|_| {
            // A cluster's defaults, and no endpoints of its own.
            let defaults = config::Cluster::new(PASSTHROUGH, Vec::new());
            clusters.push(ClusterPlan {
                name: PASSTHROUGH.into(),
                endpoints: Vec::new(),
                connect_timeout: defaults.connect_timeout,
                idle_timeout: defaults.idle_timeout,
                max_idle_per_endpoint: 0,
                tls: None,
                retries: None,
                outlier_detection: None,
                balancing: config::Balancing::RoundRobin,
                connection_limit: None,
            });
            clusters.len() - 1
        });
        let index = |name: &str| clusters.iter().position(|c| &*c.name == name);
        // Validation guarantees every cluster named exists and route weights fit.
        let mut regexes = Regexes::default();
        let mut route_table = |routes: &[config::Route]| {
            RouteTable::new(
                routes.iter().map(|r| {
                    let mut sum = 0u32;
                    let backends = r
                        .backends
                        .iter()
                        .filter(|b| b.weight > 0)
                        .map(|b| {
                            sum = sum.saturating_add(b.weight);
                            (index(&b.cluster).unwrap_or_default(), sum)
                        })
                        .collect();
                    (r, backends)
                }),
                &mut regexes,
            )
        };
        let server_tls = |tls: &config::ListenerTls| match identity {
            Some(identity) if tls.mode != config::TlsMode::Disable => Some(ListenerTls {
                config: identity.server_config(),
                handshake_timeout: tls.handshake_timeout,
                permissive: tls.mode == config::TlsMode::Permissive,
            }),
            _ => None,
        };
        let mut listeners = Vec::with_capacity(config.listeners.len() + 4);
        let mut intercepted: [HashMap<SocketAddr, usize>; 2] = Default::default();
        for (i, l) in config.listeners.iter().enumerate() {
            let cluster = l.cluster.as_deref().and_then(index).unwrap_or_default();
            let mut routes = |routes: &[config::Route]| {
                route_table(routes).map_err(|e| invalid(format!("listeners[{i}].routes"), e))
            };
            let kind = match l.protocol {
                Protocol::Tcp => ListenerKind::Tcp { cluster },
                Protocol::Http => ListenerKind::Http(routes(&l.routes)?),
                Protocol::Detect if l.routes.is_empty() => ListenerKind::Detect {
                    cluster,
                    routes: routes(&[config::Route::to_cluster(
                        l.cluster.as_deref().unwrap_or_default(),
                    )])?,
                },
                Protocol::Detect => ListenerKind::Detect {
                    cluster,
                    routes: routes(&l.routes)?,
                },
            };
            if let Some(direction) = l.intercept {
                intercepted[direction as usize].insert(l.address, listeners.len());
            }
            let trust_domain = identity.map(|i| i.id.trust_domain());
            let authorization = l
                .authorization
                .as_ref()
                .map(|a| AuthorizationPlan::new(a, trust_domain));
            listeners.push(ListenerPlan {
                name: l.name.as_str().into(),
                configured: l.address,
                kind,
                tls: l.tls.as_ref().and_then(server_tls),
                authorization,
                rate_limit: l.rate_limit.as_ref().map(|r| Arc::new(RateLimiter::new(r))),
                bound: l.intercept.is_none(),
            });
        }
        let [outbound, inbound] = intercepted;
        let intercept = match (&config.interception, passthrough) {
            (Some(settings), Some(passthrough)) => {
                let mut sockets = vec![
                    (Intercept::Outbound, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    (Intercept::Inbound, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                ];
                if settings.ipv6 {
                    sockets.push((Intercept::Outbound, IpAddr::V6(Ipv6Addr::UNSPECIFIED)));
                    sockets.push((Intercept::Inbound, IpAddr::V6(Ipv6Addr::UNSPECIFIED)));
                }
                for (direction, ip) in sockets {
                    let (port, tls) = match direction {
                        Intercept::Outbound => (settings.outbound_port, None),
                        Intercept::Inbound => {
                            (settings.inbound_port, server_tls(&settings.inbound_tls))
                        }
                    };
                    let family = if ip.is_ipv6() { "-v6" } else { "" };
                    let direction_name = match direction {
                        Intercept::Outbound => "outbound",
                        Intercept::Inbound => "inbound",
                    };
                    listeners.push(ListenerPlan {
                        name: format!("{}{direction_name}{family}", config::INTERCEPT_PREFIX)
                            .into(),
                        configured: SocketAddr::new(ip, port),
                        kind: ListenerKind::Intercepted(direction),
                        tls,
                        authorization: None,
                        rate_limit: None,
                        bound: true,
                    });
                }
                Some(InterceptPlan {
                    outbound,
                    inbound,
                    policy: settings.outbound_policy,
                    mark: settings.mark,
                    passthrough,
                    outside: settings.outside_mesh.iter().copied().collect(),
                })
            }
            _ => None,
        };
        let identity = identity.map(|i| (i.id.clone(), i.validity));
        let listener_names = listeners
            .iter()
            .enumerate()
            .map(|(index, plan)| (plan.name.clone(), index))
            .collect();
        let cluster_names = clusters
            .iter()
            .enumerate()
            .map(|(index, plan)| (plan.name.clone(), index))
            .collect();
        Ok(Snapshot {
            version,
            source,
            config,
            listeners,
            listener_names,
            clusters,
            cluster_names,
            identity,
            intercept,
            regexes,
        })
    }

    /// Takes over `previous`'s rate limiters where a listener of the same name has the same
    /// `rate_limit`, so that a config change does not refill them.
    pub fn keep_rate_limiters(&mut self, previous: &Snapshot) {
        for plan in &mut self.listeners {
            let Some(limiter) = &plan.rate_limit else {
                continue;
            };
            let kept = previous
                .listener_index(&plan.name)
                .and_then(|index| previous.listeners[index].rate_limit.as_ref())
                .filter(|old| old.carries_over(limiter.config()));
            if let Some(old) = kept {
                plan.rate_limit = Some(old.clone());
            }
        }
    }

    /// The mark to set on the proxy's own connections, in transparent mode.
    pub fn mark(&self) -> Option<u32> {
        self.intercept.as_ref().and_then(|i| i.mark)
    }

    /// Finds a listener by name.
    pub fn listener_index(&self, name: &str) -> Option<usize> {
        self.listener_names.get(name).copied()
    }

    /// Finds a cluster by name.
    pub fn cluster_named(&self, name: &str) -> Option<&ClusterPlan> {
        self.cluster_names.get(name).map(|&i| &self.clusters[i])
    }
}

impl ClusterPlan {
    /// Whether upstream connections made for this cluster to `addr` may carry requests for
    /// `next` (the same cluster in a newer config): it still lists `addr`, asks the same
    /// identity of it (or none), and counted its connections if `next` caps them (those
    /// made uncounted hold no slot).
    pub fn carries_over(&self, next: &ClusterPlan, addr: SocketAddr) -> bool {
        next.endpoints.contains(&addr)
            && self.tls.as_ref().map(|t| &t.identity) == next.tls.as_ref().map(|t| &t.identity)
            && (self.connection_limit.is_some() || next.connection_limit.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(yaml: &str) -> Snapshot {
        let config = Config::from_yaml(yaml, "test").unwrap();
        Snapshot::compile(config, None, 1, "test".into()).unwrap()
    }

    /// A workload identity in trust domain `tern.test`, from a root of its own.
    fn identity() -> crate::tls::Identity {
        let id = "spiffe://tern.test/ns/shop/sa/web";
        let san = rcgen::SanType::URI(id.try_into().unwrap());
        let (roots, cert, key) = crate::tls::in_memory::signed_by_new_root(vec![san]);
        crate::tls::Identity::new(id.parse().unwrap(), vec![cert], key, roots).unwrap()
    }

    #[test]
    fn an_authorization_lets_callers_in_for_everything_or_the_requests_a_rule_names() {
        let strings = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let rule = |identities: &[&str], namespaces: &[&str], methods: &[&str], paths: &[&str]| {
            config::AuthorizationRule {
                identities: strings(identities),
                namespaces: strings(namespaces),
                methods: strings(methods),
                paths: strings(paths),
            }
        };
        let authorization = config::Authorization {
            identities: strings(&["spiffe://tern.test/ns/shop/sa/web"]),
            namespaces: Vec::new(),
            rules: vec![
                rule(
                    &["spiffe://tern.test/ns/shop/sa/ci"],
                    &[],
                    &["GET", "HEAD"],
                    &["/healthz", "/api/*"],
                ),
                rule(&[], &["batch"], &["POST"], &[]),
                rule(&["spiffe://tern.test/ns/shop/sa/docs"], &[], &["*"], &["*"]),
            ],
        };
        let plan = AuthorizationPlan::new(&authorization, Some("tern.test"));
        let id = |s: &str| s.parse::<shared::SpiffeId>().unwrap();
        let (web, ci, job, docs, other) = (
            id("spiffe://tern.test/ns/shop/sa/web"),
            id("spiffe://tern.test/ns/shop/sa/ci"),
            id("spiffe://tern.test/ns/batch/sa/job"),
            id("spiffe://tern.test/ns/shop/sa/docs"),
            id("spiffe://tern.test/ns/shop/sa/other"),
        );
        assert_eq!(plan.access(Some(&web)), Access::Everything);
        assert_eq!(plan.access(Some(&ci)), Access::SomeRequests);
        assert_eq!(plan.access(Some(&job)), Access::SomeRequests);
        assert_eq!(plan.access(Some(&other)), Access::Nothing);
        assert_eq!(plan.access(None), Access::Nothing);
        // Another trust domain's namespace of the same name is not `batch`.
        let foreign = id("spiffe://elsewhere/ns/batch/sa/job");
        assert_eq!(plan.access(Some(&foreign)), Access::Nothing);

        let allowed =
            |peer: &shared::SpiffeId, method: &str, path: &str| match plan.access(Some(peer)) {
                Access::Everything => true,
                Access::Nothing => false,
                Access::SomeRequests => {
                    plan.rules_allow(Some(peer), method.as_bytes(), path.as_bytes())
                }
            };
        let cases: [(&shared::SpiffeId, &str, &str, bool); 22] = [
            (&web, "DELETE", "/anything/../at/all", true),
            (&ci, "GET", "/healthz", true),
            (&ci, "HEAD", "/healthz?verbose=1", true),
            (&ci, "GET", "/healthz/more", false),
            (&ci, "GET", "/api/v1/users", true),
            (&ci, "GET", "/api/", true),
            (&ci, "GET", "/api", false),
            (&ci, "POST", "/api/v1/users", false),
            (&ci, "get", "/healthz", false),
            // Paths a server could read as another path match no pattern.
            (&ci, "GET", "/api/../admin", false),
            (&ci, "GET", "/api/..;/admin", false),
            (&ci, "GET", "/api/%2e%2E/admin", false),
            (&ci, "GET", "/api/x%2Fy", false),
            (&ci, "GET", "/api\\..\\admin", false),
            (&ci, "GET", "/api/./x", false),
            (&ci, "GET", "/api/%252e%252e/admin", false),
            (&ci, "GET", "/api/%c0%ae%c0%ae/admin", false),
            (&ci, "GET", "/api/%u002e%u002e/admin", false),
            // A rule with no paths (or `*`) takes any path, those included.
            (&job, "POST", "/../x", true),
            (&job, "GET", "/x", false),
            (&docs, "PUT", "/any/path", true),
            (&docs, "PATCH", "/any/../path", true),
        ];
        for (peer, method, path, expected) in cases {
            assert_eq!(
                allowed(peer, method, path),
                expected,
                "{peer} {method} {path}"
            );
        }
        assert!(!plan.rules_allow(None, b"GET", b"/healthz"));
    }

    #[test]
    fn a_new_authorization_narrows_what_a_peer_may_do_by_access_or_by_its_rules() {
        let plan = |yaml: &str| {
            let authorization: config::Authorization =
                Config::from_yaml(&format!("listeners:\n  - {{ name: l, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: c }}], authorization: {yaml} }}\nclusters: [{{ name: c, endpoints: [127.0.0.1:1] }}]\n"), "t")
                    .unwrap()
                    .listeners[0]
                    .authorization
                    .clone()
                    .unwrap();
            AuthorizationPlan::new(&authorization, Some("tern.test"))
        };
        let ci: shared::SpiffeId = "spiffe://tern.test/ns/shop/sa/ci".parse().unwrap();
        let everything = plan(r#"{ identities: ["spiffe://tern.test/ns/shop/sa/ci"] }"#);
        let get = plan(
            r#"{ rules: [{ identities: ["spiffe://tern.test/ns/shop/sa/ci"], methods: [GET] }] }"#,
        );
        let get_too = plan(
            r#"{ namespaces: [ops], rules: [{ identities: ["spiffe://tern.test/ns/shop/sa/ci"], methods: [GET] }, { namespaces: [qa] }] }"#,
        );
        let head = plan(
            r#"{ rules: [{ identities: ["spiffe://tern.test/ns/shop/sa/ci"], methods: [HEAD] }] }"#,
        );
        let nothing = plan("{ namespaces: [ops] }");
        let narrows = |before: Option<&AuthorizationPlan>, after: Option<&AuthorizationPlan>| {
            AuthorizationPlan::narrows(before, after, Some(&ci))
        };
        assert!(narrows(None, Some(&get)));
        assert!(narrows(Some(&everything), Some(&get)));
        assert!(narrows(Some(&get), Some(&nothing)));
        assert!(narrows(Some(&get), Some(&head)));
        assert!(
            !narrows(Some(&get), Some(&get_too)),
            "the same rules for this peer"
        );
        assert!(!narrows(Some(&get), Some(&everything)));
        assert!(!narrows(Some(&nothing), Some(&get)));
        // Rules that let through more, or the same split otherwise, narrow nothing; taking
        // away a method, a path or some of a prefix does.
        let ci_rules = |rules: &str| {
            plan(&format!(
                r#"{{ rules: [{}] }}"#,
                rules.replace("CI", r#"identities: ["spiffe://tern.test/ns/shop/sa/ci"]"#)
            ))
        };
        let before = ci_rules("{ CI, methods: [GET, POST], paths: [/a, \"/b/*\"] }");
        for (after, narrowed) in [
            (
                "{ CI, methods: [GET, POST, PUT], paths: [/a, \"/b/*\", /c] }",
                false,
            ),
            ("{ CI, methods: [GET, POST], paths: [/a, \"/*\"] }", false),
            ("{ CI, paths: [/a, \"/b/*\"] }", false),
            (
                "{ CI, methods: [GET], paths: [\"*\"] }, { CI, methods: [POST], paths: [/a, \"/b*\"] }",
                false,
            ),
            ("{ CI, methods: [GET], paths: [/a, \"/b/*\"] }", true),
            ("{ CI, methods: [GET, POST], paths: [/a] }", true),
            (
                "{ CI, methods: [GET, POST], paths: [/a, \"/b/c/*\"] }",
                true,
            ),
            ("{ CI, methods: [GET, POST], paths: [/a, /b/] }", true),
        ] {
            assert_eq!(
                narrows(Some(&before), Some(&ci_rules(after))),
                narrowed,
                "{after}"
            );
        }
        let any_path = ci_rules("{ CI, methods: [GET] }");
        assert!(
            narrows(
                Some(&any_path),
                Some(&ci_rules("{ CI, methods: [GET], paths: [\"/*\"] }"))
            ),
            "`/*` lets no unplain path through"
        );
        assert!(!narrows(
            Some(&ci_rules("{ CI, methods: [GET], paths: [\"/*\"] }")),
            Some(&any_path)
        ));
        assert!(!narrows(Some(&everything), None));
        assert!(!narrows(Some(&nothing), Some(&nothing)));
    }

    #[test]
    fn rate_limiters_carry_over_while_their_listener_and_limit_stay() {
        let with = |name: &str, total: u32| {
            snapshot(&format!(
                "listeners:\n  - {{ name: {name}, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: c }}], rate_limit: {{ total: {total} }} }}\nclusters: [{{ name: c, endpoints: [127.0.0.1:1] }}]\n"
            ))
        };
        let limiter = |snapshot: &Snapshot| snapshot.listeners[0].rate_limit.clone().unwrap();
        let before = with("web", 5);
        for (name, total, kept) in [("web", 5, true), ("web", 6, false), ("api", 5, false)] {
            let mut after = with(name, total);
            after.keep_rate_limiters(&before);
            assert_eq!(
                Arc::ptr_eq(&limiter(&before), &limiter(&after)),
                kept,
                "{name} {total}"
            );
        }
    }

    #[test]
    fn upstream_connections_carry_over_while_the_endpoint_identity_and_counting_stay() {
        let identity = identity();
        let with = |cluster: &str| {
            let yaml = format!(
                "identity: {{ files: {{ cert: c.pem, key: k.pem, trust_bundle: b.pem }} }}\nlisteners:\n  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: c }}] }}\nclusters:\n  - {cluster}\n"
            );
            let config = Config::from_yaml(&yaml, "test").unwrap();
            Snapshot::compile(config, Some(&identity), 1, "test".into()).unwrap()
        };
        let plain = with("{ name: c, endpoints: [127.0.0.1:1, 127.0.0.1:2] }");
        let fewer = with("{ name: c, endpoints: [127.0.0.1:1] }");
        let mtls = |id: &str| {
            with(&format!(
                "{{ name: c, endpoints: [127.0.0.1:1], tls: {{ identity: \"spiffe://tern.test/ns/shop/sa/{id}\" }} }}"
            ))
        };
        let (cart, other) = (mtls("cart"), mtls("other"));
        fn cluster(s: &Snapshot) -> &ClusterPlan {
            s.cluster_named("c").unwrap()
        }
        let (one, two) = (
            SocketAddr::from(([127, 0, 0, 1], 1)),
            SocketAddr::from(([127, 0, 0, 1], 2)),
        );
        assert!(cluster(&plain).carries_over(cluster(&fewer), one));
        assert!(
            !cluster(&plain).carries_over(cluster(&fewer), two),
            "endpoint gone"
        );
        assert!(
            !cluster(&plain).carries_over(cluster(&cart), one),
            "now mTLS"
        );
        assert!(
            !cluster(&cart).carries_over(cluster(&fewer), one),
            "now plaintext"
        );
        assert!(cluster(&cart).carries_over(cluster(&mtls("cart")), one));
        assert!(
            !cluster(&cart).carries_over(cluster(&other), one),
            "another identity"
        );
        let capped =
            with("{ name: c, endpoints: [127.0.0.1:1], connection_limit: { max_connections: 4 } }");
        assert!(
            !cluster(&plain).carries_over(cluster(&capped), one),
            "now capped: connections made uncounted hold no slot"
        );
        assert!(cluster(&capped).carries_over(cluster(&capped), one));
        assert!(cluster(&capped).carries_over(cluster(&fewer), one));
        assert!(plain.cluster_named("nope").is_none());
    }
}
