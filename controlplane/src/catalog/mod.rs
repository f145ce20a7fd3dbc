//! The catalog: every object the user declared that passed validation, indexed for
//! translation into proxy configs.
//!
//! A [`Source`](source::Source) yields what is declared ([`Declared`]); [`Catalog::build`]
//! checks each object on its own and against the others (an unknown Service, a bad
//! duration, weights adding up to zero, two routes claiming the same path) and keeps only
//! what passes. An object that fails keeps its previous accepted version, and so does every
//! object of a file that no longer parses, so a bad edit never takes working config away; the
//! problem is recorded with the file, the object and the field, and is never pushed.

pub mod gateway;
pub mod kubernetes;
pub mod source;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use shared::crd::{
    AuthorizationPolicy, BackendPolicy, MTLSPolicy, Mesh, MtlsMode, RateLimitPolicy, TargetRef,
};

pub use gateway::HttpRoute;

/// The Pod annotation that maps application ports to the sidecar's inbound ports on the
/// Pod's IP in explicit mode: `"8080=15080,9090=15090"`.
pub const INBOUND_PORTS: &str = "tern.dev/inbound-ports";
/// Pod annotation: `enabled` when `tern-proxy init` intercepts the Pod's traffic, so its
/// sidecar takes peers' connections on the application's own ports and the application's
/// connections to Service addresses.
pub const INTERCEPTION: &str = "tern.dev/interception";
/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One declared object.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// `tern.dev/v1alpha1 Mesh`.
    Mesh(Box<Mesh>),
    /// `v1 Service`.
    Service(Box<Service>),
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice(Box<EndpointSlice>),
    /// `v1 Pod`.
    Pod(Box<Pod>),
    /// `gateway.networking.k8s.io/v1 HTTPRoute`.
    HttpRoute(Box<HttpRoute>),
    /// `tern.dev/v1alpha1 MTLSPolicy`.
    MtlsPolicy(Box<MTLSPolicy>),
    /// `tern.dev/v1alpha1 AuthorizationPolicy`.
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    /// `tern.dev/v1alpha1 BackendPolicy`.
    BackendPolicy(Box<BackendPolicy>),
    /// `tern.dev/v1alpha1 RateLimitPolicy`.
    RateLimitPolicy(Box<RateLimitPolicy>),
}

/// Kinds in the order they are checked: each may refer only to kinds before it.
const KIND_ORDER: [&str; 10] = [
    "Mesh",
    "Service",
    "Pod",
    "EndpointSlice",
    "MTLSPolicy",
    "BackendPolicy",
    "AuthorizationPolicy",
    "RateLimitPolicy",
    "HTTPRoute",
    "GRPCRoute",
];

impl Object {
    /// The object's kind, as written in manifests.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Mesh(_) => "Mesh",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Pod(_) => "Pod",
            // A GRPCRoute is carried as the HTTPRoute it is equivalent to.
            Object::HttpRoute(o) if o.kind == "GRPCRoute" => "GRPCRoute",
            Object::HttpRoute(_) => "HTTPRoute",
            Object::MtlsPolicy(_) => "MTLSPolicy",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::BackendPolicy(_) => "BackendPolicy",
            Object::RateLimitPolicy(_) => "RateLimitPolicy",
        }
    }

    fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Mesh(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::MtlsPolicy(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::BackendPolicy(o) => &o.metadata,
            Object::RateLimitPolicy(o) => &o.metadata,
        }
    }

    /// Its identity in the catalog. Namespaced kinds default to `default`, as kubectl does.
    pub fn key(&self) -> Key {
        let meta = self.metadata();
        let namespace = match self {
            Object::Mesh(_) => String::new(),
            _ => meta
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
        };
        Key {
            kind: self.kind(),
            namespace,
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// Kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Key {
    /// The kind.
    pub kind: &'static str,
    /// The namespace (empty for cluster-scoped kinds).
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Where an object came from: a file and the document's index in it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Origin {
    /// The file (or, for Kubernetes, the API).
    pub file: String,
    /// The YAML document within the file, from 0.
    pub document: usize,
}

/// How the origins of objects read from the Kubernetes API begin.
const API_ORIGIN: &str = "kubernetes/";

impl Origin {
    /// Where an object read from the Kubernetes API came from:
    /// `kubernetes/<kind>/<namespace>/<name>` (no namespace for a cluster-scoped kind).
    pub fn api(kind: &str, namespace: Option<&str>, name: &str) -> Origin {
        let file = match namespace {
            Some(namespace) => format!("{API_ORIGIN}{kind}/{namespace}/{name}"),
            None => format!("{API_ORIGIN}{kind}/{name}"),
        };
        Origin { file, document: 0 }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.starts_with(API_ORIGIN) {
            return f.write_str(&self.file);
        }
        write!(f, "{} (document {})", self.file, self.document + 1)
    }
}

/// Something declared that was refused, and exactly where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file and document.
    pub origin: Origin,
    /// `HTTPRoute shop/cart`, when the object got that far.
    pub object: Option<String>,
    /// The field, e.g. `spec.rules[0].backendRefs[1].name`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// Whether the object's previous version is still in use.
    pub kept_previous: bool,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.origin)?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        write!(f, "{}: {}", self.field, self.message)?;
        if self.kept_previous {
            write!(f, " (its previous version stays in use)")?;
        }
        Ok(())
    }
}

/// Everything a source declares at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Declared {
    /// Objects that parsed, with where they came from.
    pub objects: Vec<(Origin, Object)>,
    /// Documents that did not parse.
    pub problems: Vec<Problem>,
    /// Files that could not be read or parsed as a whole: their objects keep their previous
    /// versions.
    pub broken_files: BTreeSet<String>,
}

impl Declared {
    /// Records that what `origin` holds did not parse: the problem, and its origin broken,
    /// so the objects it held before keep their previous versions.
    pub fn refuse(
        &mut self,
        origin: Origin,
        object: Option<String>,
        field: String,
        message: String,
    ) {
        self.broken_files.insert(origin.file.clone());
        self.problems.push(Problem {
            origin,
            object,
            field,
            message,
            kept_previous: true,
        });
    }

    /// Adds everything `other` declares.
    pub fn extend(&mut self, other: &Declared) {
        self.objects.extend(other.objects.iter().cloned());
        self.problems.extend(other.problems.iter().cloned());
        self.broken_files.extend(other.broken_files.iter().cloned());
    }
}

/// What the catalog knows of a Pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The service account its identity is derived from.
    pub service_account: String,
    /// `status.podIP`.
    pub ip: Option<IpAddr>,
    /// Application port → sidecar inbound port (explicit mode).
    pub inbound: BTreeMap<u16, u16>,
    /// Its traffic is intercepted (annotation `tern.dev/interception: enabled`): its sidecar
    /// takes peers' connections on the application ports themselves.
    pub intercepted: bool,
    /// Named container ports.
    pub named_ports: BTreeMap<String, u16>,
}

impl Workload {
    /// The port peers' sidecars dial, over mTLS, to reach application port `app`: the
    /// sidecar port it is mapped to (explicit mode) or, intercepted, `app` itself.
    pub fn sidecar_port(&self, app: u16) -> Option<u16> {
        match self.inbound.get(&app) {
            Some(&sidecar) => Some(sidecar),
            None => self.intercepted.then_some(app),
        }
    }
}

/// Accepted objects, indexed.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Bumped whenever the accepted objects change.
    pub generation: u64,
    /// What was refused.
    pub problems: Vec<Problem>,
    trust_domain: String,
    accepted: BTreeMap<Key, (Origin, Object)>,
    pub(crate) mesh: Option<shared::crd::MeshSpec>,
    pub(crate) services: BTreeMap<(String, String), Service>,
    pub(crate) workloads: BTreeMap<(String, String), Workload>,
    /// Pod names by namespace and IP, for endpoints without a `targetRef`.
    workloads_by_ip: BTreeMap<(String, IpAddr), String>,
    /// Services by cluster IP (namespace, name), for intercepted destinations.
    services_by_ip: BTreeMap<IpAddr, (String, String)>,
    pub(crate) slices: BTreeMap<(String, String), Vec<EndpointSlice>>,
    pub(crate) routes: Vec<HttpRoute>,
    /// What the accepted routes claim, with the route (`namespace/name`) that claims it.
    claims: Vec<(Claim, String)>,
    pub(crate) mtls: Vec<MTLSPolicy>,
    pub(crate) backend_policies: Vec<BackendPolicy>,
    pub(crate) authorization: Vec<AuthorizationPolicy>,
    pub(crate) rate_limits: Vec<RateLimitPolicy>,
}

type Check = Result<(), (String, String)>;

fn fail<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, (String, String)> {
    Err((field.into(), message.into()))
}

/// A RateLimitPolicy's caps as a proxy's listener holds them.
pub(crate) fn rate_limit_of(spec: &shared::crd::RateLimitPolicySpec) -> shared::config::RateLimit {
    shared::config::RateLimit {
        total: spec.total.as_ref().map(|l| l.requests_per_second),
        per_identity: spec.identity.as_ref().map(|l| l.requests_per_second),
        overrides: spec
            .overrides
            .iter()
            .map(|o| shared::config::RateLimitOverride {
                identities: o.identities.clone(),
                requests_per_second: o.requests_per_second,
            })
            .collect(),
    }
}

impl Catalog {
    /// An empty catalog for `trust_domain` (the CA's).
    pub fn empty(trust_domain: &str) -> Catalog {
        Catalog {
            trust_domain: trust_domain.to_owned(),
            ..Catalog::default()
        }
    }

    /// The trust domain identities are minted in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// How many objects are in use.
    pub fn len(&self) -> usize {
        self.accepted.len()
    }

    /// Whether nothing is in use.
    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty()
    }

    /// The objects in use, with where each came from.
    pub fn objects(&self) -> impl Iterator<Item = (&Key, &Origin)> {
        self.accepted.iter().map(|(k, (o, _))| (k, o))
    }

    /// Checks `declared` and builds the next catalog; refused objects keep their version
    /// from `previous`. The generation moves on only when what is accepted changed.
    pub fn build(declared: Declared, previous: &Catalog) -> Catalog {
        let mut next = Catalog::empty(&previous.trust_domain);
        // A file that no longer parses keeps what it held before, if anything.
        next.problems = declared
            .problems
            .into_iter()
            .map(|mut problem| {
                problem.kept_previous = previous.accepted.values().any(|(origin, _)| {
                    std::path::Path::new(&origin.file).starts_with(&problem.origin.file)
                });
                problem
            })
            .collect();

        let mut by_key: BTreeMap<Key, (Origin, Object)> = BTreeMap::new();
        for (origin, object) in declared.objects {
            let key = object.key();
            if key.name.is_empty() {
                next.problems.push(Problem {
                    origin,
                    object: Some(key.kind.to_owned()),
                    field: "metadata.name".into(),
                    message: "is required".into(),
                    kept_previous: false,
                });
                continue;
            }
            if let Some((first, _)) = by_key.get(&key) {
                next.problems.push(Problem {
                    origin,
                    object: Some(key.to_string()),
                    field: "metadata.name".into(),
                    message: format!("{key} is already declared in {first}"),
                    kept_previous: true,
                });
                continue;
            }
            by_key.insert(key, (origin, object));
        }
        // Objects of files that no longer parse stay as they were.
        for (key, (origin, object)) in &previous.accepted {
            let broken = declared
                .broken_files
                .iter()
                .any(|b| std::path::Path::new(&origin.file).starts_with(b));
            if broken && !by_key.contains_key(key) {
                by_key.insert(key.clone(), (origin.clone(), object.clone()));
            }
        }

        for kind in KIND_ORDER {
            let mut keys: Vec<Key> = by_key.keys().filter(|k| k.kind == kind).cloned().collect();
            // What was accepted before and is unchanged goes first: a newcomer that
            // conflicts with it (a route claiming the same path) is the one refused. Then
            // the oldest (`creationTimestamp`), then by namespace and name, as Gateway API
            // settles conflicts: so a restarted `tern-control`, to which everything is new,
            // settles a contested path by age, not by name. (Objects from files carry no
            // timestamp: name order alone.)
            keys.sort_by_cached_key(|k| {
                let unchanged = previous
                    .accepted
                    .get(k)
                    .zip(by_key.get(k))
                    .is_some_and(|((_, old), (_, new))| old == new);
                let created = by_key
                    .get(k)
                    .and_then(|(_, object)| object.metadata().creation_timestamp.clone());
                (!unchanged, created, k.clone())
            });
            for key in keys {
                let Some((origin, object)) = by_key.remove(&key) else {
                    continue;
                };
                match next.admit(&object) {
                    Ok(()) => {
                        next.accepted.insert(key, (origin, object));
                    }
                    Err((field, message)) => {
                        let fallback = previous
                            .accepted
                            .get(&key)
                            .filter(|(_, old)| *old != object && next.admit(old).is_ok());
                        next.problems.push(Problem {
                            origin: origin.clone(),
                            object: Some(key.to_string()),
                            field,
                            message,
                            kept_previous: fallback.is_some(),
                        });
                        if let Some(old) = fallback {
                            next.accepted.insert(key, old.clone());
                        }
                    }
                }
            }
        }
        let changed = next
            .accepted
            .iter()
            .map(|(k, (_, o))| (k, o))
            .ne(previous.accepted.iter().map(|(k, (_, o))| (k, o)));
        next.generation = previous.generation + u64::from(changed);
        next
    }

    /// Checks one object against what is accepted so far and, if it passes, indexes it.
    fn admit(&mut self, object: &Object) -> Check {
        let key = object.key();
        match object {
            Object::Mesh(mesh) => {
                if key.name != "default" {
                    return fail("metadata.name", "only the Mesh named `default` applies");
                }
                if mesh.spec.trust_domain != self.trust_domain {
                    return fail(
                        "spec.trustDomain",
                        format!(
                            "`{}` is not the CA's trust domain `{}` (tern-control --trust-domain)",
                            mesh.spec.trust_domain, self.trust_domain
                        ),
                    );
                }
                if let Some(lifetime) = &mesh.spec.certificate_lifetime {
                    duration("spec.certificateLifetime", lifetime)?;
                }
                self.mesh = Some(mesh.spec.clone());
            }
            Object::Service(service) => {
                check_service(service)?;
                for ip in cluster_ips(service) {
                    self.services_by_ip
                        .entry(ip)
                        .or_insert_with(|| (key.namespace.clone(), key.name.clone()));
                }
                self.services
                    .insert((key.namespace, key.name), (**service).clone());
            }
            Object::Pod(pod) => {
                let workload = check_pod(&key, pod)?;
                if let Some(ip) = workload.ip {
                    self.workloads_by_ip
                        .insert((key.namespace.clone(), ip), key.name.clone());
                }
                self.workloads.insert((key.namespace, key.name), workload);
            }
            Object::EndpointSlice(slice) => {
                let service = check_slice(slice)?;
                self.slices
                    .entry((key.namespace, service))
                    .or_default()
                    .push((**slice).clone());
            }
            Object::MtlsPolicy(policy) => {
                if let Some(selector) = &policy.spec.selector {
                    check_selector("spec.selector", selector)?;
                }
                let mut ports = BTreeSet::new();
                for (i, port) in policy.spec.ports.iter().enumerate() {
                    if port.port == 0 || !ports.insert(port.port) {
                        return fail(format!("spec.ports[{i}].port"), "must be unique and not 0");
                    }
                }
                self.mtls.push((**policy).clone());
            }
            Object::BackendPolicy(policy) => {
                self.check_target(&key.namespace, &policy.spec.target_ref)?;
                if let Some(retries) = &policy.spec.retries {
                    if retries.attempts > shared::config::MAX_RETRIES {
                        return fail(
                            "spec.retries.attempts",
                            format!("at most {}", shared::config::MAX_RETRIES),
                        );
                    }
                    if let Some(timeout) = &retries.per_try_timeout {
                        duration("spec.retries.perTryTimeout", timeout)?;
                    }
                    if let Some(budget) = &retries.budget
                        && budget.percent > 100
                    {
                        return fail("spec.retries.budget.percent", "must be 0 to 100");
                    }
                }
                if let Some(outliers) = &policy.spec.outlier_detection {
                    if outliers.consecutive_failures == 0 {
                        return fail(
                            "spec.outlierDetection.consecutiveFailures",
                            "must be at least 1",
                        );
                    }
                    let base = duration(
                        "spec.outlierDetection.baseEjectionTime",
                        &outliers.base_ejection_time,
                    )?;
                    if base > shared::config::MAX_BASE_EJECTION_TIME {
                        return fail("spec.outlierDetection.baseEjectionTime", "at most 24h");
                    }
                    if outliers.max_ejected_percent > 100 {
                        return fail(
                            "spec.outlierDetection.maxEjectedPercent",
                            "must be 0 to 100",
                        );
                    }
                }
                if let Some(limits) = &policy.spec.connection_limits {
                    match (limits.max_connections, limits.max_pending_requests) {
                        (Some(0), _) => {
                            return fail(
                                "spec.connectionLimits.maxConnections",
                                "must be at least 1",
                            );
                        }
                        (None, Some(_)) => {
                            return fail(
                                "spec.connectionLimits.maxPendingRequests",
                                "needs maxConnections: requests wait only for connections that are capped",
                            );
                        }
                        _ => {}
                    }
                }
                self.backend_policies.push((**policy).clone());
            }
            Object::AuthorizationPolicy(policy) => {
                self.check_pods_target(&key.namespace, &policy.spec.target_ref)?;
                for (i, source) in policy.spec.from.iter().enumerate() {
                    for (j, namespace) in source.namespaces.iter().enumerate() {
                        if !is_dns_label(namespace) {
                            return fail(
                                format!("spec.from[{i}].namespaces[{j}]"),
                                format!("`{namespace}` is not a namespace name"),
                            );
                        }
                    }
                    for (j, id) in source.identities.iter().enumerate() {
                        if id.parse::<shared::identity::IdentityPattern>().is_err() {
                            return fail(
                                format!("spec.from[{i}].identities[{j}]"),
                                format!(
                                    "`{id}` is not a SPIFFE workload ID (or one ending `/sa/*`)"
                                ),
                            );
                        }
                    }
                }
                for (i, operation) in policy.spec.to.iter().enumerate() {
                    for (j, method) in operation.methods.iter().enumerate() {
                        if let Some(problem) = shared::config::method_problem(method) {
                            return fail(
                                format!("spec.to[{i}].methods[{j}]"),
                                format!("`{method}` {problem}"),
                            );
                        }
                    }
                    for (j, path) in operation.paths.iter().enumerate() {
                        if let Some(problem) = shared::config::path_pattern_problem(path) {
                            return fail(
                                format!("spec.to[{i}].paths[{j}]"),
                                format!("`{path}` {problem}"),
                            );
                        }
                    }
                }
                self.authorization.push((**policy).clone());
            }
            Object::RateLimitPolicy(policy) => {
                self.check_pods_target(&key.namespace, &policy.spec.target_ref)?;
                if let Some((field, message)) =
                    shared::config::rate_limit_problem(&rate_limit_of(&policy.spec))
                {
                    // The proxy's field names, as the policy spells them.
                    let field = field
                        .replace("rate_limit.per_identity", "spec.identity.requestsPerSecond")
                        .replace("rate_limit.total", "spec.total.requestsPerSecond")
                        .replace("rate_limit", "spec")
                        .replace("requests_per_second", "requestsPerSecond");
                    return fail(field, message);
                }
                self.rate_limits.push((**policy).clone());
            }
            Object::HttpRoute(route) => {
                self.check_route(&key, route)?;
                let owner = format!("{}/{}", key.namespace, key.name);
                self.claims.extend(
                    route_claims(route, &key.namespace)
                        .into_iter()
                        .map(|(_, claim)| (claim, owner.clone())),
                );
                self.routes.push((**route).clone());
            }
        }
        Ok(())
    }

    /// [`Catalog::check_target`], for a policy on the Pods the Service selects: without a
    /// selector, there is no telling which Pods' ports it guards.
    fn check_pods_target(&self, namespace: &str, target: &TargetRef) -> Check {
        self.check_target(namespace, target)?;
        let selects = self
            .service(namespace, &target.name)
            .and_then(|s| s.spec.as_ref()?.selector.as_ref())
            .is_some_and(|selector| !selector.is_empty());
        if !selects {
            return fail(
                "spec.targetRef.name",
                format!(
                    "Service {namespace}/{} selects no Pods (no selector), so no Pod port can be guarded",
                    target.name
                ),
            );
        }
        Ok(())
    }

    fn check_target(&self, namespace: &str, target: &TargetRef) -> Check {
        if !gateway::is_service(Some(&target.group), Some(&target.kind)) {
            return fail("spec.targetRef.kind", "only a Service can be targeted");
        }
        let service = self.service(namespace, &target.name).ok_or_else(|| {
            (
                "spec.targetRef.name".to_owned(),
                format!("unknown Service {namespace}/{}", target.name),
            )
        })?;
        if let Some(port) = target.port
            && service_port(service, port).is_none()
        {
            return fail(
                "spec.targetRef.port",
                format!("Service {namespace}/{} has no port {port}", target.name),
            );
        }
        Ok(())
    }

    fn check_route(&self, key: &Key, route: &HttpRoute) -> Check {
        let spec = &route.spec;
        if spec.parent_refs.is_empty() {
            return fail("spec.parentRefs", "needs a Service to attach to");
        }
        for (i, parent) in spec.parent_refs.iter().enumerate() {
            let at = |f: &str| format!("spec.parentRefs[{i}].{f}");
            if !gateway::is_service(parent.group.as_deref(), parent.kind.as_deref()) {
                return fail(
                    at("kind"),
                    "Tern routes Services (GAMMA); Gateways are not supported",
                );
            }
            let namespace = parent.namespace.as_deref().unwrap_or(&key.namespace);
            let Some(service) = self.service(namespace, &parent.name) else {
                return fail(
                    at("name"),
                    format!("unknown Service {namespace}/{}", parent.name),
                );
            };
            if let Some(port) = parent.port
                && service_port(service, port).is_none()
            {
                return fail(
                    at("port"),
                    format!("Service {namespace}/{} has no port {port}", parent.name),
                );
            }
        }
        for (i, host) in spec.hostnames.iter().enumerate() {
            if let Err(why) = shared::config::check_host_pattern(host) {
                return fail(format!("spec.hostnames[{i}]"), why);
            }
        }
        for (i, rule) in spec.rules.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{i}].{f}");
            let paths: Vec<_> = rule.matched().into_iter().map(|m| m.path).collect();
            check_filters(
                rule.filters.as_deref().unwrap_or_default(),
                &at("filters"),
                &paths,
                route.kind == "GRPCRoute",
            )?;
            let redirects = rule.redirect().is_some();
            if rule.retry.is_some() {
                return fail(
                    at("retry"),
                    "not supported yet; use a BackendPolicy's retries",
                );
            }
            if rule.session_persistence.is_some() {
                return fail(at("sessionPersistence"), "not supported yet");
            }
            for (j, m) in rule.matches.iter().enumerate() {
                let at = |f: &str| format!("spec.rules[{i}].matches[{j}].{f}");
                let lists: [(&str, _, CheckMatch); 2] = [
                    ("headers", &m.headers, shared::config::check_header_match),
                    (
                        "queryParams",
                        &m.query_params,
                        shared::config::check_query_match,
                    ),
                ];
                for (list, matches, check) in lists {
                    for (k, item) in matches.iter().flatten().enumerate() {
                        let at = |f: &str| format!("spec.rules[{i}].matches[{j}].{list}[{k}].{f}");
                        if item.kind != "Exact" && item.kind != "RegularExpression" {
                            return fail(at("type"), format!("unknown type `{}`", item.kind));
                        }
                        if let Err((field, why)) = check(&item.to_config()) {
                            return fail(at(field), why);
                        }
                    }
                }
                if let Some(Err(why)) = m.method.as_deref().map(shared::config::check_method) {
                    return fail(at("method"), why);
                }
                if let Some(path) = &m.path {
                    if !matches!(
                        path.kind.as_str(),
                        "PathPrefix" | "Exact" | "RegularExpression"
                    ) {
                        return fail(at("path.type"), format!("unknown type `{}`", path.kind));
                    }
                    if let Err(why) = shared::config::check_path_match(&path.to_config()) {
                        return fail(at("path.value"), why);
                    }
                }
            }
            if redirects && !rule.backend_refs.is_empty() {
                return fail(
                    at("backendRefs"),
                    "a rule that redirects sends nothing to backends: leave them out",
                );
            }
            if rule.backend_refs.is_empty() && !redirects {
                return fail(at("backendRefs"), "needs at least one backend");
            }
            for (j, backend) in rule.backend_refs.iter().enumerate() {
                let at = |f: &str| format!("spec.rules[{i}].backendRefs[{j}].{f}");
                if !gateway::is_service(backend.group.as_deref(), backend.kind.as_deref()) {
                    return fail(at("kind"), "only Services are supported as backends");
                }
                if backend.filters.as_ref().is_some_and(|f| !f.is_empty()) {
                    return fail(
                        at("filters"),
                        "filters on a backend are not supported yet; put them on the rule",
                    );
                }
                let namespace = backend.namespace.as_deref().unwrap_or(&key.namespace);
                let Some(service) = self.service(namespace, &backend.name) else {
                    return fail(
                        at("name"),
                        format!("unknown backend Service {namespace}/{}", backend.name),
                    );
                };
                let Some(port) = backend.port else {
                    return fail(at("port"), "is required for a Service backend");
                };
                if service_port(service, port).is_none() {
                    return fail(
                        at("port"),
                        format!("Service {namespace}/{} has no port {port}", backend.name),
                    );
                }
            }
            let total: u64 = rule.backend_refs.iter().map(|b| u64::from(b.weight)).sum();
            if total == 0 && !redirects {
                return fail(
                    at("backendRefs"),
                    "the weights add up to zero: no request could go anywhere",
                );
            }
            if total > u64::from(u32::MAX) {
                return fail(
                    at("backendRefs"),
                    "the weights add up to more than 2^32 - 1",
                );
            }
            if let Some(timeouts) = &rule.timeouts {
                if let Some(request) = &timeouts.request {
                    duration(&at("timeouts.request"), request)?;
                }
                if let Some(request) = &timeouts.backend_request {
                    duration(&at("timeouts.backendRequest"), request)?;
                }
            }
        }
        // Two rules (here or in an accepted route) that claim the same host and match (path,
        // method, headers, query) of the same Service port conflict; the route accepted first keeps them.
        let mut claimed = BTreeSet::new();
        for (i, claim) in route_claims(route, &key.namespace) {
            if !claimed.insert(claim.clone()) {
                return fail(
                    format!("spec.rules[{i}].matches"),
                    format!("repeats the match {} in this route", claim.describe()),
                );
            }
            if let Some((_, owner)) = self.claims.iter().find(|(c, _)| c.overlaps(&claim)) {
                return fail(
                    format!("spec.rules[{i}].matches"),
                    format!(
                        "conflicts with HTTPRoute {owner}, which already routes {}",
                        claim.describe()
                    ),
                );
            }
        }
        Ok(())
    }

    /// A Service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The Service whose cluster IP is `ip`: its namespace, name and object.
    pub fn service_at(&self, ip: IpAddr) -> Option<(&str, &str, &Service)> {
        let (namespace, name) = self.services_by_ip.get(&ip)?;
        Some((namespace, name, self.service(namespace, name)?))
    }

    /// A Pod by namespace and name.
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The Pod at `ip` in `namespace`.
    pub fn workload_at(&self, namespace: &str, ip: IpAddr) -> Option<&Workload> {
        let name = self.workloads_by_ip.get(&(namespace.to_owned(), ip))?;
        self.workload(namespace, name)
    }

    /// The mTLS mode of a workload's inbound port: the most specific MTLSPolicy (one with a
    /// selector over a namespace-wide one; then by name), its per-port override first; else
    /// the Mesh's default.
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> MtlsMode {
        let mut matching: Vec<&MTLSPolicy> = self
            .mtls
            .iter()
            .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == workload.namespace)
            .filter(|p| {
                p.spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| selects(s, &workload.labels))
            })
            .collect();
        matching.sort_by_key(|p| (p.spec.selector.is_none(), p.metadata.name.clone()));
        match matching.first() {
            Some(policy) => policy
                .spec
                .ports
                .iter()
                .find(|p| p.port == port)
                .map_or(policy.spec.mode, |p| p.mode),
            None => self.mesh.as_ref().map_or(MtlsMode::Strict, |m| m.mtls),
        }
    }
}

/// A Service port by number.
pub fn service_port(
    service: &Service,
    port: u16,
) -> Option<&k8s_openapi::api::core::v1::ServicePort> {
    service
        .spec
        .as_ref()?
        .ports
        .as_ref()?
        .iter()
        .find(|p| p.port == i32::from(port))
}

/// A Service's virtual addresses (`spec.clusterIPs`, else `spec.clusterIP`); none when it is
/// headless.
fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Checks a header or query parameter match, as the proxy's config does.
type CheckMatch = fn(&shared::config::ValueMatch) -> Result<(), (&'static str, String)>;

/// Checks a rule's filters (`field` names the list): header modifiers, and for an
/// HTTPRoute a redirect or a rewrite; at most one of each kind, each with its own field set
/// and no other, and changes a proxy can make to requests matched by `paths`.
fn check_filters(
    filters: &[gateway::Filter],
    field: &str,
    paths: &[shared::config::PathMatch],
    grpc: bool,
) -> Check {
    let mut kinds = BTreeSet::new();
    for (k, filter) in filters.iter().enumerate() {
        let at = |f: &str| format!("{field}[{k}].{f}");
        let (name, set) = match filter.kind.as_str() {
            "RequestHeaderModifier" => (
                "requestHeaderModifier",
                filter.request_header_modifier.is_some(),
            ),
            "ResponseHeaderModifier" => (
                "responseHeaderModifier",
                filter.response_header_modifier.is_some(),
            ),
            "RequestRedirect" if !grpc => ("requestRedirect", filter.request_redirect.is_some()),
            "URLRewrite" if !grpc => ("urlRewrite", filter.url_rewrite.is_some()),
            kind @ ("RequestMirror" | "CORS") => {
                return fail(at("type"), format!("`{kind}` is not supported yet"));
            }
            "ExtensionRef" => return fail(at("type"), "extension filters are not supported"),
            other @ ("RequestRedirect" | "URLRewrite") => {
                return fail(at("type"), format!("a GRPCRoute has no `{other}` filter"));
            }
            other => return fail(at("type"), format!("unknown filter type `{other}`")),
        };
        if !set {
            return fail(at(name), format!("is required for type {}", filter.kind));
        }
        let fields_set = [
            filter.request_header_modifier.is_some(),
            filter.response_header_modifier.is_some(),
            filter.request_redirect.is_some(),
            filter.url_rewrite.is_some(),
            filter.request_mirror.is_some(),
            filter.cors.is_some(),
            filter.extension_ref.is_some(),
        ];
        if fields_set.iter().filter(|&&set| set).count() > 1 {
            return fail(
                at("type"),
                format!("a {} filter sets only `{name}`", filter.kind),
            );
        }
        if !kinds.insert(filter.kind.as_str()) {
            return fail(
                at("type"),
                format!("a rule takes one {} filter", filter.kind),
            );
        }
        let modifier = filter
            .request_header_modifier
            .as_ref()
            .or(filter.response_header_modifier.as_ref());
        if let Some(Err((sub, why))) = modifier.map(shared::config::check_header_modifier) {
            return fail(at(&format!("{name}.{sub}")), why);
        }
        if let Some(redirect) = &filter.request_redirect {
            let redirect = redirect
                .to_config()
                .or_else(|(sub, why)| fail(at(&format!("{name}.{sub}")), why))?;
            for path in paths {
                if let Err((sub, why)) = shared::config::check_redirect(&redirect, path) {
                    let sub = if sub == "status" { "statusCode" } else { sub };
                    return fail(at(&format!("{name}.{sub}")), why);
                }
            }
        }
        if let Some(rewrite) = &filter.url_rewrite {
            let rewrite = rewrite
                .to_config()
                .or_else(|(sub, why)| fail(at(&format!("{name}.{sub}")), why))?;
            for path in paths {
                if let Err((sub, why)) = shared::config::check_rewrite(&rewrite, path) {
                    return fail(at(&format!("{name}.{sub}")), why);
                }
            }
        }
    }
    if kinds.contains("RequestRedirect") && kinds.len() > 1 {
        return fail(
            field,
            "a rule that redirects answers itself: RequestRedirect takes no other filter",
        );
    }
    Ok(())
}

/// What a route rule claims: a Service port (0 for all), a host and what one of its matches
/// asks of a request (path, method, headers, query), for the callers the route applies to (GAMMA: every caller for a route in the Service's namespace,
/// only its own namespace's for a route elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    service: (String, String),
    /// The callers' namespace of a consumer route; empty for a producer route (all callers).
    callers: String,
    port: u16,
    host: String,
    /// What the request must look like.
    matched: gateway::Matched,
}

impl Claim {
    fn overlaps(&self, other: &Claim) -> bool {
        self.service == other.service
            && self.callers == other.callers
            && (self.port == other.port || self.port == 0 || other.port == 0)
            && self.host == other.host
            && self.matched == other.matched
    }

    fn describe(&self) -> String {
        let port = if self.port == 0 {
            String::new()
        } else {
            format!(":{}", self.port)
        };
        let matched = &self.matched;
        let path = match &matched.path {
            shared::config::PathMatch::Prefix(prefix) => prefix.clone(),
            shared::config::PathMatch::Exact(exact) => format!("{exact} (exactly)"),
            shared::config::PathMatch::Regex(regex) => format!("~{regex}"),
        };
        let method = matched
            .method
            .as_ref()
            .map(|m| format!("{m} "))
            .unwrap_or_default();
        let headers: String = matched
            .headers
            .iter()
            .map(|header| {
                let how = if header.regex { " ~" } else { ":" };
                format!(" with {}{how} {}", header.name, header.value)
            })
            .collect();
        let query: String = matched
            .query
            .iter()
            .map(|q| {
                let how = if q.regex { "~" } else { "=" };
                format!(" with ?{}{how}{}", q.name, q.value)
            })
            .collect();
        let callers = if self.callers.is_empty() {
            String::new()
        } else {
            format!(" (for callers in namespace {})", self.callers)
        };
        format!(
            "{method}{}{path}{headers}{query} for Service {}/{}{port}{callers}",
            self.host, self.service.0, self.service.1
        )
    }
}

/// Every (rule index, claim) of a route: each parent Service port × host × match.
fn route_claims(route: &HttpRoute, namespace: &str) -> Vec<(usize, Claim)> {
    let hosts = route.spec.hosts();
    let mut claims = Vec::new();
    for parent in &route.spec.parent_refs {
        let service = (
            parent.namespace.as_deref().unwrap_or(namespace).to_owned(),
            parent.name.clone(),
        );
        let callers = if service.0 == namespace {
            String::new()
        } else {
            namespace.to_owned()
        };
        for (i, rule) in route.spec.rules.iter().enumerate() {
            for host in &hosts {
                for matched in rule.matched() {
                    claims.push((
                        i,
                        Claim {
                            service: service.clone(),
                            callers: callers.clone(),
                            port: parent.port.unwrap_or(0),
                            host: host.clone(),
                            matched,
                        },
                    ));
                }
            }
        }
    }
    claims
}

/// Parses a Gateway API / Kubernetes duration (`10s`, `500ms`, `1m30s`).
pub fn duration(field: &str, text: &str) -> Result<Duration, (String, String)> {
    match humantime::parse_duration(text) {
        // Proxies take milliseconds.
        Ok(d) if d >= Duration::from_millis(1) => Ok(d),
        Ok(_) => fail(field, "must be at least 1ms"),
        Err(e) => fail(field, format!("`{text}` is not a duration ({e})")),
    }
}

fn port_number(field: String, value: i32) -> Result<u16, (String, String)> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => fail(field, format!("{value} is not a port (1-65535)")),
    }
}

fn check_service(service: &Service) -> Check {
    let Some(spec) = &service.spec else {
        return fail("spec", "is required");
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return fail("spec.ports", "needs at least one port");
    }
    let mut numbers = BTreeSet::new();
    for ip in spec
        .cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter().flatten())
    {
        if ip != "None" && !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            return fail("spec.clusterIP", format!("`{ip}` is not an IP address"));
        }
    }
    let mut names = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let number = port_number(format!("spec.ports[{i}].port"), port.port)?;
        if !numbers.insert(number) {
            return fail(
                format!("spec.ports[{i}].port"),
                format!("port {number} is listed twice"),
            );
        }
        if ports.len() > 1 && port.name.as_deref().unwrap_or_default().is_empty() {
            return fail(
                format!("spec.ports[{i}].name"),
                "is required when a Service has several ports",
            );
        }
        if let Some(name) = &port.name
            && !names.insert(name.clone())
        {
            return fail(
                format!("spec.ports[{i}].name"),
                format!("`{name}` is used twice"),
            );
        }
        if let Some(protocol) = &port.protocol
            && protocol != "TCP"
        {
            return fail(
                format!("spec.ports[{i}].protocol"),
                format!("{protocol} is not carried by the mesh; only TCP"),
            );
        }
        if let Some(IntOrString::Int(target)) = &port.target_port {
            port_number(format!("spec.ports[{i}].targetPort"), *target)?;
        }
    }
    if let Some(selector) = &spec.selector
        && selector.is_empty()
    {
        return fail(
            "spec.selector",
            "an empty selector selects nothing; leave it out",
        );
    }
    Ok(())
}

fn check_pod(key: &Key, pod: &Pod) -> Result<Workload, (String, String)> {
    let mut inbound = BTreeMap::new();
    if let Some(spec) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INBOUND_PORTS))
    {
        let field = format!("metadata.annotations[\"{INBOUND_PORTS}\"]");
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let parsed = pair.split_once('=').and_then(|(app, sidecar)| {
                Some((
                    app.trim().parse::<u16>().ok()?,
                    sidecar.trim().parse::<u16>().ok()?,
                ))
            });
            match parsed {
                Some((app, sidecar)) if app != 0 && sidecar != 0 => {
                    if inbound.values().any(|&s| s == sidecar) {
                        return fail(field, format!("sidecar port {sidecar} is used twice"));
                    }
                    if inbound.insert(app, sidecar).is_some() {
                        return fail(field, format!("port {app} is mapped twice"));
                    }
                }
                _ => {
                    return fail(
                        field,
                        format!("`{pair}` is not `<app port>=<sidecar port>`"),
                    );
                }
            }
        }
    }
    let intercepted = match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INTERCEPTION))
        .map(String::as_str)
    {
        None | Some("disabled") => false,
        Some("enabled") => true,
        Some(other) => {
            return fail(
                format!("metadata.annotations[\"{INTERCEPTION}\"]"),
                format!("`{other}` is not `enabled` or `disabled`"),
            );
        }
    };
    if intercepted && !inbound.is_empty() {
        return fail(
            format!("metadata.annotations[\"{INBOUND_PORTS}\"]"),
            format!(
                "an intercepted Pod ({INTERCEPTION}) takes peers on its own ports; leave it out"
            ),
        );
    }
    let ip = match pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
        None => None,
        Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
            (
                "status.podIP".to_owned(),
                format!("`{text}` is not an IP address"),
            )
        })?),
    };
    if (intercepted || !inbound.is_empty()) && ip.is_none() {
        return fail(
            "status.podIP",
            "is required when the Pod has a sidecar that takes inbound traffic",
        );
    }
    let spec = pod.spec.as_ref();
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let mut named_ports = BTreeMap::new();
    for (i, container) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        for (j, port) in container
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let number = port_number(
                format!("spec.containers[{i}].ports[{j}].containerPort"),
                port.container_port,
            )?;
            if let Some(name) = &port.name {
                named_ports.insert(name.clone(), number);
            }
        }
    }
    Ok(Workload {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        service_account,
        ip,
        inbound,
        intercepted,
        named_ports,
    })
}

fn check_slice(slice: &EndpointSlice) -> Result<String, (String, String)> {
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
    else {
        return fail(
            format!("metadata.labels[\"{SERVICE_NAME_LABEL}\"]"),
            "names the Service and is required",
        );
    };
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        other => {
            return fail(
                "addressType",
                format!("`{other}` is not supported; IPv4 or IPv6"),
            );
        }
    };
    for (i, endpoint) in slice
        .endpoints
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        for (j, address) in endpoint.addresses.iter().enumerate() {
            match address.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv6() == v6 => {}
                _ => {
                    return fail(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("`{address}` is not an {} address", slice.address_type),
                    );
                }
            }
        }
    }
    for (i, port) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if let Some(number) = port.port {
            port_number(format!("ports[{i}].port"), number)?;
        }
    }
    Ok(service.clone())
}

fn check_selector(field: &str, selector: &LabelSelector) -> Check {
    for (i, expression) in selector.match_expressions.iter().flatten().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        let values = expression.values.as_deref().unwrap_or_default();
        match expression.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => return fail(at, "In and NotIn need values"),
            "In" | "NotIn" => {}
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return fail(at, "Exists and DoesNotExist take no values");
            }
            "Exists" | "DoesNotExist" => {}
            other => return fail(at, format!("unknown operator `{other}`")),
        }
    }
    Ok(())
}

/// Whether a label selector selects these labels (an empty selector selects everything).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_match && expressions_match
}

/// Whether `name` is a DNS label (RFC 1123), as a namespace's name is.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests;
