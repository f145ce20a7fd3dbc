//! Turns the catalog into one proxy's config: the listeners and clusters that proxy needs,
//! and nothing about the rest of the mesh.
//!
//! - Inbound: one listener per port the Pod maps to its sidecar (annotation
//!   `tern.dev/inbound-ports`), on the Pod's IP, terminating mTLS in the mode MTLSPolicy (or
//!   the Mesh) gives that port, and forwarding to the application on the Pod's IP.
//!   An intercepted Pod (annotation `tern.dev/interception: enabled`) gets one per port a
//!   Service targets instead, claiming the connections `tern-proxy init` redirects to that
//!   port (`intercept: inbound`). A port that a Service port an AuthorizationPolicy targets
//!   targets lets in only the callers the policies name (their mTLS identity).
//! - Outbound: one listener per destination the proxy subscribed to, on the address it
//!   asked for; an intercepted Pod's proxy subscribes by the addresses its application dials,
//!   on first use, and gets a listener claiming each that is a Service's (`intercept:
//!   outbound`) and the rest reported outside the mesh: its config follows what it talks
//!   to, not the size of the mesh.
//!   A port's protocol ([`port_protocol`]): `http` (`appProtocol: http`, or a port name
//!   `http` or `http-*`, as Istio reads it) routes by the HTTPRoutes attached to the Service
//!   (GAMMA): with none attached every request goes to the Service, with some attached a
//!   request no rule matches gets 404. Declared opaque ports (an `appProtocol` or a name
//!   prefix like `tcp`, `mysql`) and well-known server-speaks-first ports
//!   ([`OPAQUE_PORTS`]) are opaque TCP, never detected; the rest are `detect`: HTTP/1.1 is
//!   routed as above, anything else is opaque TCP to the Service.
//! - Clusters: the ready endpoints of the Service's EndpointSlices. An endpoint whose Pod
//!   has a sidecar for that port is reached through it, over mTLS, and must prove the Pod's
//!   identity (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`); others are
//!   reached directly, in plaintext.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use shared::SpiffeId;
use shared::config::{
    Authorization, AuthorizationRule, Backend, Cluster, ClusterTls, Config, Intercept,
    Interception, Listener, ListenerTls, OutboundPolicy, Protocol, RateLimit, Retries, RetryOn,
    Route, TlsMode,
};
use shared::crd::{MtlsMode, OutboundTraffic, TargetRef};

use crate::catalog::gateway::HttpRoute;
use crate::catalog::{Catalog, Workload, rate_limit_of, service_port};

/// Who a proxy is and what it wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyRequest {
    /// The identity it proved.
    pub identity: SpiffeId,
    /// The Pod's namespace.
    pub namespace: String,
    /// The Pod's name.
    pub workload: String,
    /// Destinations it listens for.
    pub outbound: Vec<shared::config::Outbound>,
    /// Addresses its intercepted application dialed (in the order it asked).
    pub destinations: Vec<SocketAddr>,
}

impl ProxyRequest {
    /// `<namespace>/<pod>`.
    pub fn workload_name(&self) -> String {
        format!("{}/{}", self.namespace, self.workload)
    }
}

/// A proxy's config and what could not be put in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    /// Listeners and clusters.
    pub config: Config,
    /// Why something the proxy asked for is missing (an unknown Service, say).
    pub notes: Vec<String>,
}

/// The cluster name of a Service port.
pub fn cluster_name(namespace: &str, service: &str, port: u16) -> String {
    format!("outbound:{service}.{namespace}:{port}")
}

/// The identity of a workload.
pub fn workload_identity(trust_domain: &str, workload: &Workload) -> Option<SpiffeId> {
    format!(
        "spiffe://{trust_domain}/ns/{}/sa/{}",
        workload.namespace, workload.service_account
    )
    .parse()
    .ok()
}

/// Ports of protocols where the server speaks first (SMTP, MySQL, …) or that are never
/// HTTP: opaque TCP without detection, so they never wait for a client's first bytes
/// (Linkerd's default opaque ports).
pub const OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Port name prefixes (Istio's `<protocol>[-<suffix>]`) that declare an opaque protocol.
const OPAQUE_NAMES: [&str; 7] = ["tcp", "tls", "mysql", "mongo", "redis", "postgres", "smtp"];

/// Port name prefixes, and `appProtocol`s, of HTTP: HTTP/1.1, HTTP/2 and gRPC are all routed.
const HTTP_NAMES: [&str; 5] = ["http", "http2", "h2c", "grpc", "grpc-web"];

/// What a Service port speaks: `http` (HTTP/1.1, HTTP/2, gRPC) when declared so, `tcp`
/// when declared opaque or a well-known opaque port, else `detect`.
pub fn port_protocol(port: &ServicePort) -> Protocol {
    let name = port.name.as_deref().unwrap_or_default();
    let prefix = name.split('-').next().unwrap_or_default();
    match port.app_protocol.as_deref() {
        Some(app)
            if HTTP_NAMES.iter().any(|h| app.eq_ignore_ascii_case(h))
                || app == "kubernetes.io/h2c" =>
        {
            return Protocol::Http;
        }
        Some(_) => return Protocol::Tcp,
        None => {}
    }
    if HTTP_NAMES.contains(&prefix) {
        Protocol::Http
    } else if OPAQUE_NAMES.contains(&prefix)
        || u16::try_from(port.port).is_ok_and(|p| OPAQUE_PORTS.contains(&p))
    {
        Protocol::Tcp
    } else {
        Protocol::Detect
    }
}

/// Builds the config for `request`.
pub fn translate(catalog: &Catalog, request: &ProxyRequest) -> Translated {
    let mut out = Translated {
        config: Config {
            listeners: Vec::new(),
            clusters: Vec::new(),
            http: shared::config::HttpSettings::default(),
            identity: None,
            discovery: None,
            interception: None,
            detect_timeout: Config::default_detect_timeout(),
        },
        notes: Vec::new(),
    };
    inbound(catalog, request, &mut out);
    let mut clusters = BTreeMap::new();
    for outbound in &request.outbound {
        let Some((name, namespace)) = shared::config::service_name(&outbound.service) else {
            out.notes
                .push(format!("`{}` is not <name>.<namespace>", outbound.service));
            continue;
        };
        let Some(service) = catalog.service(namespace, name) else {
            out.notes
                .push(format!("unknown Service {namespace}/{name}"));
            continue;
        };
        let Some(port) = service_port(service, outbound.port) else {
            out.notes.push(format!(
                "Service {namespace}/{name} has no port {}",
                outbound.port
            ));
            continue;
        };
        let destination = Destination {
            namespace,
            service,
            port,
            caller: &request.namespace,
        };
        let listener = destination.listener(
            catalog,
            format!("outbound:{}:{}", outbound.service, outbound.port),
            outbound.listen,
            None,
            &mut clusters,
            &mut out.notes,
        );
        out.config.listeners.push(listener);
    }
    let intercepted = catalog
        .workload(&request.namespace, &request.workload)
        .is_some_and(|w| w.intercepted);
    // Destinations a proxy asks about get an answer, listener or outside-the-mesh, even
    // when the catalog does not (yet) say its Pod is intercepted: it waits for one.
    if intercepted || !request.destinations.is_empty() {
        let outside_mesh = intercepted_outbound(catalog, request, &mut out, &mut clusters);
        let policy = match catalog.mesh.as_ref().map(|m| m.outbound_traffic) {
            Some(OutboundTraffic::RegistryOnly) => OutboundPolicy::RegistryOnly,
            None | Some(OutboundTraffic::AllowAny) => OutboundPolicy::AllowAny,
        };
        // Ports no Service targets are passed to the application in the workload's mode.
        let inbound_mode = catalog
            .workload(&request.namespace, &request.workload)
            .map_or(MtlsMode::Strict, |w| catalog.mtls_mode(w, 0));
        out.config.interception = Some(Interception {
            outbound_policy: policy,
            inbound_tls: ListenerTls::new(tls_mode(inbound_mode)),
            outside_mesh,
            ..Interception::default()
        });
    }
    out.config.clusters.extend(clusters.into_values());
    out
}

/// One Service port as a destination, for a proxy in namespace `caller`.
struct Destination<'a> {
    namespace: &'a str,
    service: &'a Service,
    port: &'a ServicePort,
    caller: &'a str,
}

impl Destination<'_> {
    /// The outbound listener for this destination, adding the clusters it uses.
    fn listener(
        &self,
        catalog: &Catalog,
        name: String,
        address: SocketAddr,
        intercept: Option<Intercept>,
        clusters: &mut BTreeMap<String, Cluster>,
        notes: &mut Vec<String>,
    ) -> Listener {
        let service_name = self.service.metadata.name.as_deref().unwrap_or_default();
        let number = u16::try_from(self.port.port).unwrap_or_default();
        let own = cluster_name(self.namespace, service_name, number);
        let protocol = port_protocol(self.port);
        let routes = match protocol {
            Protocol::Tcp => Vec::new(),
            Protocol::Http | Protocol::Detect => routes(
                catalog,
                (self.namespace, service_name, number),
                self.caller,
                clusters,
                notes,
            ),
        };
        let listener = Listener {
            name,
            address,
            protocol,
            cluster: (protocol != Protocol::Http).then(|| own.clone()),
            routes: if routes.is_empty() && protocol == Protocol::Http {
                vec![Route::to_cluster(&own)]
            } else {
                routes
            },
            tls: None,
            intercept,
            authorization: None,
            rate_limit: None,
        };
        let uses_own = listener.cluster.is_some()
            || listener
                .routes
                .iter()
                .any(|r| r.backends.iter().any(|b| b.cluster == own));
        if uses_own {
            clusters.entry(own).or_insert_with(|| {
                service_cluster(catalog, self.namespace, self.service, self.port, notes)
            });
        }
        listener
    }
}

/// An intercepted Pod's outbound listeners: one for each address its application dialed
/// that is a Service's (a cluster IP and port), claiming it; the others are reported outside
/// the mesh, so the proxy applies its outbound policy to them without asking again.
fn intercepted_outbound(
    catalog: &Catalog,
    request: &ProxyRequest,
    out: &mut Translated,
    clusters: &mut BTreeMap<String, Cluster>,
) -> Vec<SocketAddr> {
    let mut outside = Vec::new();
    for &address in &request.destinations {
        let found = catalog
            .service_at(address.ip())
            .and_then(|(namespace, name, service)| {
                Some((
                    namespace,
                    name,
                    service,
                    service_port(service, address.port())?,
                ))
            });
        let Some((namespace, name, service, port)) = found else {
            outside.push(address);
            continue;
        };
        let destination = Destination {
            namespace,
            service,
            port,
            caller: &request.namespace,
        };
        let listener = destination.listener(
            catalog,
            format!(
                "outbound:{name}.{namespace}:{}/{}",
                address.port(),
                address.ip()
            ),
            address,
            Some(Intercept::Outbound),
            clusters,
            &mut out.notes,
        );
        out.config.listeners.push(listener);
    }
    outside
}

fn inbound(catalog: &Catalog, request: &ProxyRequest, out: &mut Translated) {
    let Some(workload) = catalog.workload(&request.namespace, &request.workload) else {
        out.notes.push(format!(
            "no Pod {}/{} is declared: no inbound listeners",
            request.namespace, request.workload
        ));
        return;
    };
    if workload_identity(catalog.trust_domain(), workload).as_ref() != Some(&request.identity) {
        out.notes.push(format!(
            "Pod {}/{} runs as service account `{}`, not as {}: no inbound listeners",
            workload.namespace, workload.name, workload.service_account, request.identity
        ));
        return;
    }
    let Some(ip) = workload.ip else {
        return;
    };
    let ports: Vec<(u16, u16, Option<Intercept>)> = if workload.intercepted {
        app_ports(catalog, workload)
            .into_iter()
            .map(|app| (app, app, Some(Intercept::Inbound)))
            .collect()
    } else {
        workload
            .inbound
            .iter()
            .map(|(&app, &sidecar)| (app, sidecar, None))
            .collect()
    };
    for (app, sidecar, intercept) in ports {
        let name = format!("inbound:{app}");
        let mode = tls_mode(catalog.mtls_mode(workload, app));
        // What peers send inside mTLS (their ALPN) follows the Service port they dialed.
        let protocol = app_protocol(catalog, workload, app);
        // An intercepted port is claimed on every address of the Pod (both families).
        let address = match intercept {
            Some(_) => SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), sidecar),
            None => SocketAddr::new(ip, sidecar),
        };
        // Rate limits count HTTP requests: an opaque port has none to count.
        let mut rate_limit = rate_limit(catalog, workload, app);
        if protocol == Protocol::Tcp && rate_limit.take().is_some() {
            out.notes.push(format!(
                "a RateLimitPolicy reaches port {app} of Pod {}/{}, which carries opaque TCP: it limits HTTP requests only, so it does nothing there",
                workload.namespace, workload.name
            ));
        }
        out.config.listeners.push(Listener {
            name: name.clone(),
            address,
            protocol,
            cluster: (protocol != Protocol::Http).then(|| name.clone()),
            routes: if protocol == Protocol::Http {
                vec![Route::to_cluster(&name)]
            } else {
                Vec::new()
            },
            tls: Some(ListenerTls::new(mode)),
            intercept,
            authorization: authorization(catalog, workload, app),
            rate_limit,
        });
        out.config
            .clusters
            .push(Cluster::new(name, vec![SocketAddr::new(ip, app)]));
    }
}

fn tls_mode(mode: MtlsMode) -> TlsMode {
    match mode {
        MtlsMode::Strict => TlsMode::Strict,
        MtlsMode::Permissive => TlsMode::Permissive,
        MtlsMode::Disable => TlsMode::Disable,
    }
}

/// The Service ports that select `workload`, with the application port each targets and the
/// Service's name.
fn targeted_ports<'a>(
    catalog: &'a Catalog,
    workload: &'a Workload,
) -> impl Iterator<Item = (u16, &'a ServicePort, &'a str)> + 'a {
    catalog
        .services
        .iter()
        .filter(|((namespace, _), _)| *namespace == workload.namespace)
        .filter_map(|((_, name), service)| Some((name.as_str(), service.spec.as_ref()?)))
        .filter(|(_, spec)| {
            spec.selector
                .as_ref()
                .is_some_and(|s| s.iter().all(|(k, v)| workload.labels.get(k) == Some(v)))
        })
        .flat_map(|(name, spec)| spec.ports.iter().flatten().map(move |port| (name, port)))
        .filter_map(|(name, port)| {
            let target = match &port.target_port {
                None => u16::try_from(port.port).ok(),
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                Some(IntOrString::String(name)) => workload.named_ports.get(name).copied(),
            }?;
            Some((target, port, name))
        })
}

/// Who is served on application port `app` of `workload`: the sources of every
/// AuthorizationPolicy targeting a Service port that targets it (any one lets a caller in),
/// for everything, or as rules for the requests its `to` names; anyone when none does. A Pod
/// port serves every Service that targets it, and its sidecar cannot tell which one a caller
/// dialed, so a policy on one of them guards the port for all.
fn authorization(catalog: &Catalog, workload: &Workload, app: u16) -> Option<Authorization> {
    let guards = guards(catalog, workload, app);
    let mut allowed: Option<(BTreeSet<String>, BTreeSet<String>)> = None;
    let mut rules = Vec::new();
    for policy in &catalog.authorization {
        if !guards(&policy.metadata, &policy.spec.target_ref) {
            continue;
        }
        let everything = allowed.get_or_insert_default();
        let sources = &policy.spec.from;
        let identities = sources.iter().flat_map(|s| s.identities.iter().cloned());
        let namespaces = sources.iter().flat_map(|s| s.namespaces.iter().cloned());
        if policy.spec.to.is_empty() {
            everything.0.extend(identities);
            everything.1.extend(namespaces);
            continue;
        }
        let identities: Vec<String> = identities.collect::<BTreeSet<_>>().into_iter().collect();
        let namespaces: Vec<String> = namespaces.collect::<BTreeSet<_>>().into_iter().collect();
        rules.extend(policy.spec.to.iter().map(|operation| AuthorizationRule {
            identities: identities.clone(),
            namespaces: namespaces.clone(),
            methods: operation.methods.clone(),
            paths: operation.paths.clone(),
        }));
    }
    // In one order whatever the policies are called, so renaming one changes nothing.
    rules.sort();
    rules.dedup();
    allowed.map(|(identities, namespaces)| Authorization {
        identities: identities.into_iter().collect(),
        namespaces: namespaces.into_iter().collect(),
        rules,
    })
}

/// Whether a policy (its metadata and target) guards application port `app` of `workload`:
/// it is in the workload's namespace and targets a Service port that targets `app`.
fn guards<'a>(
    catalog: &'a Catalog,
    workload: &'a Workload,
    app: u16,
) -> impl Fn(&ObjectMeta, &TargetRef) -> bool + 'a {
    let guarded: BTreeSet<(&str, u16)> = targeted_ports(catalog, workload)
        .filter(|(target, _, _)| *target == app)
        .filter_map(|(_, port, service)| Some((service, u16::try_from(port.port).ok()?)))
        .collect();
    move |metadata, target| {
        metadata.namespace.as_deref().unwrap_or("default") == workload.namespace
            && guarded.iter().any(|(service, port)| {
                *service == target.name && target.port.is_none_or(|p| p == *port)
            })
    }
}

/// The caps on the HTTP requests application port `app` of `workload` serves: those of every
/// RateLimitPolicy that guards it (as [`authorization`] finds them): `total` and `identity`
/// each the lowest any sets, the overrides of all in the order of the policies' names (the
/// first naming a caller applies), none above the total; none when no policy does.
fn rate_limit(catalog: &Catalog, workload: &Workload, app: u16) -> Option<RateLimit> {
    let guards = guards(catalog, workload, app);
    let mut policies: Vec<_> = catalog
        .rate_limits
        .iter()
        .filter(|policy| guards(&policy.metadata, &policy.spec.target_ref))
        .collect();
    policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let lowest = |a: Option<u32>, b: Option<u32>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut limit = policies
        .iter()
        .map(|policy| rate_limit_of(&policy.spec))
        .reduce(|mut limit, next| {
            limit.total = lowest(limit.total, next.total);
            limit.per_identity = lowest(limit.per_identity, next.per_identity);
            limit.overrides.extend(next.overrides);
            limit
        })?;
    // One policy's callers may not be let above another's total.
    if let Some(total) = limit.total {
        limit.per_identity = limit.per_identity.map(|rate| rate.min(total));
        for o in &mut limit.overrides {
            o.requests_per_second = o.requests_per_second.min(total);
        }
    }
    Some(limit)
}

/// The application ports Services target on `workload`, in order.
fn app_ports(catalog: &Catalog, workload: &Workload) -> Vec<u16> {
    let mut ports: Vec<u16> = targeted_ports(catalog, workload)
        .map(|(p, _, _)| p)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// What peers speak to application port `app`, by the Service ports targeting it: what they
/// all say, or `detect` (which takes every kind of peer: ALPN says which) when they differ;
/// opaque `tcp` when no Service targets it.
fn app_protocol(catalog: &Catalog, workload: &Workload, app: u16) -> Protocol {
    let mut protocols = targeted_ports(catalog, workload)
        .filter(|(target, _, _)| *target == app)
        .map(|(_, port, _)| port_protocol(port));
    let Some(first) = protocols.next() else {
        return Protocol::Tcp;
    };
    if protocols.all(|p| p == first) {
        first
    } else {
        Protocol::Detect
    }
}

/// The routes of Service port `namespace/service:port` for a caller in namespace `caller`,
/// as GAMMA scopes them: a route in the Service's own namespace (a producer route) applies to
/// every caller; a route in another namespace (a consumer route) only to callers in its own
/// namespace, where it replaces the producer routes. So no namespace can take or break
/// another's traffic to a Service by attaching a route to it.
fn routes(
    catalog: &Catalog,
    (namespace, service, port): (&str, &str, u16),
    caller: &str,
    clusters: &mut BTreeMap<String, Cluster>,
    notes: &mut Vec<String>,
) -> Vec<Route> {
    let attached_from = |route_ns: &str| -> Vec<&HttpRoute> {
        catalog
            .routes
            .iter()
            .filter(|route| {
                route.metadata.namespace.as_deref().unwrap_or("default") == route_ns
                    && route.spec.parent_refs.iter().any(|p| {
                        p.namespace.as_deref().unwrap_or(route_ns) == namespace
                            && p.name == service
                            && p.port.is_none_or(|p| p == port)
                    })
            })
            .collect()
    };
    let consumer = if caller == namespace {
        Vec::new()
    } else {
        attached_from(caller)
    };
    let (route_ns, attached) = if consumer.is_empty() {
        (namespace, attached_from(namespace))
    } else {
        (caller, consumer)
    };
    let mut routes = Vec::new();
    for route in attached {
        let hosts = route.spec.hosts();
        for rule in &route.spec.rules {
            let mut backends = Vec::new();
            for backend in &rule.backend_refs {
                let backend_ns = backend.namespace.as_deref().unwrap_or(route_ns);
                // Validated: the Service and its port exist.
                let (Some(target), Some(number)) =
                    (catalog.service(backend_ns, &backend.name), backend.port)
                else {
                    continue;
                };
                let Some(target_port) = service_port(target, number) else {
                    continue;
                };
                let name = cluster_name(backend_ns, &backend.name, number);
                clusters.entry(name.clone()).or_insert_with(|| {
                    service_cluster(catalog, backend_ns, target, target_port, notes)
                });
                backends.push(Backend {
                    cluster: name,
                    weight: backend.weight,
                });
            }
            let timeout = rule
                .timeouts
                .as_ref()
                .and_then(|t| t.request.as_deref())
                .and_then(|t| humantime::parse_duration(t).ok());
            let (request_headers, response_headers) = rule.header_modifiers();
            let (rewrite, redirect) = (rule.rewrite(), rule.redirect());
            let matched = rule.matched();
            for host in &hosts {
                for m in &matched {
                    routes.push(Route {
                        host: host.clone(),
                        path: m.path.clone(),
                        method: m.method.clone(),
                        headers: m.headers.clone(),
                        query: m.query.clone(),
                        backends: backends.clone(),
                        timeout: timeout.unwrap_or(shared::config::DEFAULT_ROUTE_TIMEOUT),
                        request_headers: request_headers.clone(),
                        response_headers: response_headers.clone(),
                        rewrite: rewrite.clone(),
                        redirect: redirect.clone(),
                    });
                }
            }
        }
    }
    routes
}

/// The cluster for a Service port: its ready endpoints, through their sidecars where they
/// have one.
fn service_cluster(
    catalog: &Catalog,
    namespace: &str,
    service: &Service,
    port: &ServicePort,
    notes: &mut Vec<String>,
) -> Cluster {
    let name = service.metadata.name.clone().unwrap_or_default();
    let number = u16::try_from(port.port).unwrap_or_default();
    let mut meshed: Vec<(SocketAddr, SpiffeId)> = Vec::new();
    let mut plain: Vec<SocketAddr> = Vec::new();
    let slices = catalog.slices.get(&(namespace.to_owned(), name.clone()));
    for slice in slices.into_iter().flatten() {
        // The slice port with the Service port's name carries the target port.
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or_default() == port.name.as_deref().unwrap_or_default()
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    continue;
                };
                let pod = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        catalog.workload(
                            r.namespace.as_deref().unwrap_or(namespace),
                            r.name.as_deref()?,
                        )
                    })
                    .or_else(|| catalog.workload_at(namespace, ip));
                // A port whose mTLS mode is Disable takes plaintext: dial the application.
                let sidecar = pod
                    .filter(|w| catalog.mtls_mode(w, target) != MtlsMode::Disable)
                    .and_then(|w| Some((w.sidecar_port(target)?, w)));
                match sidecar.and_then(|(port, w)| {
                    Some((port, workload_identity(catalog.trust_domain(), w)?))
                }) {
                    Some((sidecar_port, id)) => {
                        meshed.push((SocketAddr::new(ip, sidecar_port), id))
                    }
                    None => plain.push(SocketAddr::new(ip, target)),
                }
            }
        }
    }
    let cluster_name = cluster_name(namespace, &name, number);
    let mut cluster = Cluster::new(cluster_name.clone(), Vec::new());
    if let Some((_, identity)) = meshed.first().cloned() {
        let (same, other): (Vec<_>, Vec<_>) =
            meshed.into_iter().partition(|(_, id)| *id == identity);
        if !other.is_empty() || !plain.is_empty() {
            notes.push(format!(
                "{cluster_name}: {} endpoints left out: a Service's meshed endpoints must share one identity ({identity}) and every endpoint must be meshed once one is",
                other.len() + plain.len()
            ));
        }
        cluster.endpoints = same.into_iter().map(|(a, _)| a).collect();
        cluster.tls = Some(ClusterTls {
            identity,
            cipher_suites: None,
        });
    } else {
        cluster.endpoints = plain;
    }
    let policy = catalog
        .backend_policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == namespace)
        .find(|p| {
            p.spec.target_ref.name == name && p.spec.target_ref.port.is_none_or(|p| p == number)
        });
    if let Some(limit) =
        policy.and_then(|p| p.spec.connection_limits.as_ref()?.max_idle_per_endpoint)
    {
        cluster.max_idle_per_endpoint = limit as usize;
    }
    if let Some(limits) = policy.and_then(|p| p.spec.connection_limits.as_ref())
        && let Some(max_connections) = limits.max_connections
    {
        let mut limit = shared::config::ConnectionLimit::new(max_connections);
        if let Some(pending) = limits.max_pending_requests {
            limit.max_pending = pending;
        }
        cluster.connection_limit = Some(limit);
    }
    if let Some(retries) = policy.and_then(|p| p.spec.retries.as_ref()) {
        cluster.retries = Some(proxy_retries(retries));
    }
    if policy.is_some_and(|p| p.spec.load_balancing == shared::crd::LoadBalancing::LeastRequest) {
        cluster.balancing = shared::config::Balancing::LeastRequest;
    }
    if let Some(outliers) = policy.and_then(|p| p.spec.outlier_detection.as_ref()) {
        // The catalog checked the duration.
        let base = crate::catalog::duration(
            "spec.outlierDetection.baseEjectionTime",
            &outliers.base_ejection_time,
        );
        if let Ok(base_ejection_time) = base {
            cluster.outlier_detection = Some(shared::config::OutlierDetection {
                consecutive_failures: outliers.consecutive_failures,
                base_ejection_time,
                max_ejected_percent: outliers.max_ejected_percent,
            });
        }
    }
    cluster.endpoints.sort();
    cluster.endpoints.dedup();
    cluster
}

/// A BackendPolicy's retries as the proxy runs them. `ConnectFailure` needs nothing: a
/// failed connect is always tried on up to three endpoints. The catalog checked the
/// per-try timeout.
fn proxy_retries(retries: &shared::crd::Retries) -> Retries {
    let on = retries
        .on
        .iter()
        .filter_map(|on| match on {
            shared::crd::RetryOn::ConnectFailure => None,
            shared::crd::RetryOn::Reset => Some(RetryOn::Reset),
            shared::crd::RetryOn::GatewayError => Some(RetryOn::GatewayError),
            shared::crd::RetryOn::Unavailable => Some(RetryOn::Unavailable),
        })
        .collect();
    let budget = retries.budget.as_ref();
    Retries {
        attempts: retries.attempts.min(shared::config::MAX_RETRIES),
        on,
        per_try_timeout: retries
            .per_try_timeout
            .as_deref()
            .and_then(|t| crate::catalog::duration("spec.retries.perTryTimeout", t).ok()),
        budget_percent: budget.map_or(20, |b| b.percent),
        min_per_second: budget.map_or(10, |b| b.min_per_second),
    }
}
