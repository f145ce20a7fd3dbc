//! Turns the catalog into one proxy's config: the listeners and clusters that proxy needs,
//! and nothing about the rest of the mesh.
//!
//! - Inbound: one listener per port the Pod maps to its sidecar (annotation
//!   `tern.dev/inbound-ports`), on the Pod's IP, terminating mTLS in the mode MTLSPolicy (or
//!   the Mesh) gives that port, and forwarding to the application on the Pod's IP.
//! - Outbound: one listener per destination the proxy subscribed to, on the address it
//!   asked for. An `http` port (`appProtocol: http`, or a port name `http` or `http-*`, as
//!   Istio reads it) routes by the HTTPRoutes attached to the Service (GAMMA): with none
//!   attached every request goes to the Service, with some attached a request no rule
//!   matches gets 404. Other ports are opaque TCP to the Service.
//! - Clusters: the ready endpoints of the Service's EndpointSlices. An endpoint whose Pod
//!   has a sidecar for that port is reached through it, over mTLS, and must prove the Pod's
//!   identity (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`); others are
//!   reached directly, in plaintext.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use shared::SpiffeId;
use shared::config::{
    Backend, Cluster, ClusterTls, Config, Listener, ListenerTls, Outbound, Protocol, Route, TlsMode,
};
use shared::crd::MtlsMode;

use crate::catalog::{Catalog, Workload, service_port};

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
    pub outbound: Vec<Outbound>,
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

fn is_http(port: &ServicePort) -> bool {
    let name = port.name.as_deref().unwrap_or_default();
    matches!(port.app_protocol.as_deref(), Some("http" | "HTTP"))
        || name == "http"
        || name.starts_with("http-")
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
        let listener_name = format!("outbound:{}:{}", outbound.service, outbound.port);
        let own = cluster_name(namespace, name, outbound.port);
        let listener = if is_http(port) {
            let routes = routes(
                catalog,
                namespace,
                name,
                outbound.port,
                &mut clusters,
                &mut out.notes,
            );
            Listener {
                name: listener_name,
                address: outbound.listen,
                protocol: Protocol::Http,
                cluster: None,
                routes: if routes.is_empty() {
                    vec![Route::to_cluster(&own)]
                } else {
                    routes
                },
                tls: None,
            }
        } else {
            Listener {
                name: listener_name,
                address: outbound.listen,
                protocol: Protocol::Tcp,
                cluster: Some(own.clone()),
                routes: Vec::new(),
                tls: None,
            }
        };
        let uses_own = listener.cluster.is_some()
            || listener
                .routes
                .iter()
                .any(|r| r.backends.iter().any(|b| b.cluster == own));
        if uses_own {
            clusters.entry(own).or_insert_with(|| {
                service_cluster(catalog, namespace, service, port, &mut out.notes)
            });
        }
        out.config.listeners.push(listener);
    }
    out.config.clusters.extend(clusters.into_values());
    out
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
    for (&app, &sidecar) in &workload.inbound {
        let name = format!("inbound:{app}");
        let mode = match catalog.mtls_mode(workload, app) {
            MtlsMode::Strict => TlsMode::Strict,
            MtlsMode::Permissive => TlsMode::Permissive,
            MtlsMode::Disable => TlsMode::Disable,
        };
        // What peers send inside mTLS (their ALPN) follows the Service port they dialed.
        let http = serves_http(catalog, workload, app);
        out.config.listeners.push(Listener {
            name: name.clone(),
            address: SocketAddr::new(ip, sidecar),
            protocol: if http { Protocol::Http } else { Protocol::Tcp },
            cluster: (!http).then(|| name.clone()),
            routes: if http {
                vec![Route::to_cluster(&name)]
            } else {
                Vec::new()
            },
            tls: Some(ListenerTls::new(mode)),
        });
        out.config
            .clusters
            .push(Cluster::new(name, vec![SocketAddr::new(ip, app)]));
    }
}

/// Whether a Service selecting `workload` has an `http` port targeting `app`.
fn serves_http(catalog: &Catalog, workload: &Workload, app: u16) -> bool {
    catalog
        .services
        .iter()
        .filter(|((namespace, _), _)| *namespace == workload.namespace)
        .filter_map(|(_, service)| service.spec.as_ref())
        .filter(|spec| {
            spec.selector
                .as_ref()
                .is_some_and(|s| s.iter().all(|(k, v)| workload.labels.get(k) == Some(v)))
        })
        .flat_map(|spec| spec.ports.iter().flatten())
        .any(|port| {
            let target = match &port.target_port {
                None => u16::try_from(port.port).ok(),
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                Some(IntOrString::String(name)) => workload.named_ports.get(name).copied(),
            };
            target == Some(app) && is_http(port)
        })
}

fn routes(
    catalog: &Catalog,
    namespace: &str,
    service: &str,
    port: u16,
    clusters: &mut BTreeMap<String, Cluster>,
    notes: &mut Vec<String>,
) -> Vec<Route> {
    let mut routes = Vec::new();
    for route in &catalog.routes {
        let route_ns = route.metadata.namespace.as_deref().unwrap_or("default");
        let attached = route.spec.parent_refs.iter().any(|p| {
            p.namespace.as_deref().unwrap_or(route_ns) == namespace
                && p.name == service
                && p.port.is_none_or(|p| p == port)
        });
        if !attached {
            continue;
        }
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
            let prefixes = rule.path_prefixes();
            for host in &hosts {
                for prefix in &prefixes {
                    let mut plan = Route::to_cluster("");
                    plan.host = host.clone();
                    plan.path_prefix = prefix.clone();
                    plan.backends = backends.clone();
                    if let Some(timeout) = timeout {
                        plan.timeout = timeout;
                    }
                    routes.push(plan);
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
                    .and_then(|w| Some((w.inbound.get(&target)?, w)));
                match sidecar.and_then(|(port, w)| {
                    Some((*port, workload_identity(catalog.trust_domain(), w)?))
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
    if let Some(limit) = catalog
        .backend_policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == namespace)
        .find(|p| {
            p.spec.target_ref.name == name && p.spec.target_ref.port.is_none_or(|p| p == number)
        })
        .and_then(|p| p.spec.connection_limits.as_ref()?.max_idle_per_endpoint)
    {
        cluster.max_idle_per_endpoint = limit as usize;
    }
    cluster.endpoints.sort();
    cluster.endpoints.dedup();
    cluster
}
