//! Tern's own Kubernetes custom resources (group `tern.dev`, version `v1alpha1`): what Gateway
//! API does not cover. Routing, traffic splits, header matching and timeouts stay with
//! Gateway API's `HTTPRoute` and `GRPCRoute` attached to a Service (GAMMA), as in Linkerd and
//! Istio; these five cover the rest, and the set stays small:
//!
//! - [`Mesh`]: mesh-wide settings (cluster-scoped; the one named `default` applies).
//! - [`MTLSPolicy`]: mTLS mode of workloads' inbound ports (like Istio's PeerAuthentication).
//! - [`AuthorizationPolicy`]: which workload identities may reach a Service.
//! - [`BackendPolicy`]: how clients reach a Service's endpoints (balancing, retries and their
//!   budget, outlier detection, connection limits).
//! - [`RateLimitPolicy`]: how many HTTP requests a second a Service's Pods serve.
//!
//! Policies point at their Service with a Gateway API–style `targetRef`; statuses carry
//! `conditions` and `observedGeneration` as Gateway API's do. The CRD manifests under
//! `deploy/crds/` are generated from these types (`tern-control crds`), and a test fails when
//! they differ. Only the model lives here; validating objects against each other (an unknown
//! Service, a bad duration) is the control plane's job at its config source.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of Tern's resources.
pub const GROUP: &str = "tern.dev";

/// Status common to Tern's resources, as Gateway API reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The `metadata.generation` the control plane last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (valid and in force) and, when it is not, why.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// How a workload's inbound port treats plaintext.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MtlsMode {
    /// mTLS only; plaintext is refused.
    #[default]
    Strict,
    /// mTLS or plaintext (for workloads migrating onto the mesh).
    Permissive,
    /// Plaintext only.
    Disable,
}

/// What happens to outbound traffic to destinations the mesh does not know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OutboundTraffic {
    /// Passed through, unencrypted, as if there were no mesh.
    #[default]
    AllowAny,
    /// Refused: only the mesh's own services may be reached.
    RegistryOnly,
}

/// Mesh-wide settings. Cluster-scoped; the object named `default` applies.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tern.dev",
    version = "v1alpha1",
    kind = "Mesh",
    plural = "meshes",
    status = "PolicyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Trust domain","type":"string","jsonPath":".spec.trustDomain"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// The trust domain of every workload identity (`spiffe://<trust-domain>/ns/…/sa/…`).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The mTLS mode of inbound ports that no MTLSPolicy selects.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// Outbound traffic to destinations outside the mesh.
    #[serde(default)]
    pub outbound_traffic: OutboundTraffic,
    /// Lifetime of workload certificates, as a Gateway API duration (`24h`, `90m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_lifetime: Option<String>,
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

/// One port's mTLS mode, overriding the policy's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PortMtls {
    /// The workload's container port.
    pub port: u16,
    /// Its mode.
    pub mode: MtlsMode,
}

/// The mTLS mode of the inbound ports of the workloads it selects, in its namespace.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tern.dev",
    version = "v1alpha1",
    kind = "MTLSPolicy",
    plural = "mtlspolicies",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MTLSPolicySpec {
    /// The pods it applies to; absent, every pod in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// The mode of their inbound ports.
    pub mode: MtlsMode,
    /// Per-port exceptions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMtls>,
}

/// What a policy applies to, Gateway API style: a Service (and optionally one of its ports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// The API group: `""` (core) for a Service.
    #[serde(default)]
    pub group: String,
    /// `Service`.
    pub kind: String,
    /// The Service's name, in the policy's namespace.
    pub name: String,
    /// One port of it; absent, all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Callers an AuthorizationPolicy lets in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// SPIFFE IDs; `*` may stand for the whole service-account part
    /// (`spiffe://cluster.local/ns/shop/sa/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Namespaces whose every workload is let in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// Requests an AuthorizationPolicy lets its callers make: HTTP requests whose method is one of
/// `methods` and whose path matches one of `paths` (absent: any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Request methods, as sent (`GET`, `POST`…; `*`: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Request paths, without the query: exact (`/healthz`), or a prefix ending in `*`
    /// (`/api/*`; `*` alone: any). A path a server might read as another (with `..` or
    /// `/./`, a backslash, or an escaped dot, slash, backslash or `%`) matches no pattern but
    /// `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// Which workload identities may reach a Service, and (with `to`) for which HTTP requests.
/// Once any policy targets a Service (port), callers no policy lets in are refused (HTTP
/// requests answered 403, other connections closed); requests with no mTLS identity never
/// match.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tern.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#
)]
// Unknown fields are refused: a policy written for another mesh (Istio's `action: DENY`, say)
// must not be read as an allow-list.
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The Service it protects.
    pub target_ref: TargetRef,
    /// Who may call it (any one source suffices).
    pub from: Vec<Source>,
    /// What they may ask for: HTTP requests matching any one operation. Absent: everything,
    /// opaque TCP included; present, opaque TCP is not let in by this policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

/// How a client picks an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LoadBalancing {
    /// In turn.
    #[default]
    RoundRobin,
    /// The less loaded of two endpoints picked at random (power of two choices).
    LeastRequest,
}

/// Failures worth a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RetryOn {
    /// The connection could not be established.
    ConnectFailure,
    /// The connection was reset before a response.
    Reset,
    /// A 502, 503 or 504 response (idempotent requests only).
    GatewayError,
    /// gRPC UNAVAILABLE.
    Unavailable,
}

/// A cap on retries, as a share of requests, so retries cannot multiply an overload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries allowed as a percentage of recent requests.
    pub percent: u32,
    /// Retries allowed per second regardless of traffic.
    #[serde(default = "default_min_retries_per_second")]
    pub min_per_second: u32,
}

fn default_min_retries_per_second() -> u32 {
    10
}

/// Retries of failed requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Attempts after the first.
    pub attempts: u32,
    /// What counts as retryable.
    pub on: Vec<RetryOn>,
    /// Time allowed for each attempt (a Gateway API duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// The budget that caps them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

/// Ejecting endpoints that keep failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive failures (connect failures, 5xx) that eject an endpoint.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; each further one lasts longer (a Gateway API
    /// duration).
    pub base_ejection_time: String,
    /// The most of a Service's endpoints that may be ejected at once, in percent.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

fn default_max_ejected_percent() -> u32 {
    50
}

/// Limits on what a client keeps open to a Service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLimits {
    /// Upstream connections per client proxy, in use or pooled, opaque TCP, HTTP/1.1 and
    /// HTTP/2 alike (at least one per proxy worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Requests (or opaque TCP connections) waiting for room per client proxy; more, or any
    /// not served within the connect timeout, get 503 `UO` (an opaque TCP connection is
    /// closed). Needs `maxConnections`; 1024 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Idle connections kept per endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle_per_endpoint: Option<u32>,
}

/// How clients reach a Service's endpoints.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tern.dev",
    version = "v1alpha1",
    kind = "BackendPolicy",
    plural = "backendpolicies",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackendPolicySpec {
    /// The Service it configures.
    pub target_ref: TargetRef,
    /// Endpoint choice.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Outlier detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Connection limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimits>,
}

/// A rate of HTTP requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limit {
    /// Requests a second (a burst of one second's is allowed).
    pub requests_per_second: u32,
}

/// Callers with a rate of their own, which they share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Override {
    /// Requests a second from them together.
    pub requests_per_second: u32,
    /// SPIFFE IDs; `*` may stand for the whole service-account part
    /// (`spiffe://cluster.local/ns/batch/sa/*`).
    pub identities: Vec<String>,
}

/// How many HTTP requests a second a Service's Pods serve, each Pod's sidecar on its own
/// (Linkerd's HTTPLocalRateLimitPolicy): in all, per caller identity, and for the callers of
/// an override together. Requests over a cap are answered 429 (a gRPC call
/// RESOURCE_EXHAUSTED) without reaching the application; opaque TCP is not limited. Where
/// several policies reach one Pod port, `total` and `identity` are each the lowest they set,
/// and their overrides all apply, in the order of the policies' names (the first naming a
/// caller is its cap, which may be above another policy's `identity`), none above the total.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tern.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    plural = "ratelimitpolicies",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    /// The Service whose Pods it protects.
    pub target_ref: TargetRef,
    /// The cap on all callers together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Limit>,
    /// The cap on each caller identity (callers with none, over plaintext, count as one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Limit>,
    /// Callers with a cap of their own in place of `identity`: the first that names a caller
    /// applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
}

/// The CustomResourceDefinitions of every Tern resource, as one multi-document YAML stream
/// (what `deploy/crds/tern.dev.yaml` holds).
pub fn definitions_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    let crds = [
        Mesh::crd(),
        MTLSPolicy::crd(),
        AuthorizationPolicy::crd(),
        BackendPolicy::crd(),
        RateLimitPolicy::crd(),
    ];
    let mut out = String::from(
        "# Generated by `tern-control crds` from shared/src/crd.rs; do not edit by hand.\n",
    );
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_parse_from_the_yaml_users_write() {
        let policy: BackendPolicy = serde_yaml::from_str(
            "apiVersion: tern.dev/v1alpha1\nkind: BackendPolicy\nmetadata: { name: reviews, namespace: shop }\nspec:\n  targetRef: { kind: Service, name: reviews, port: 9080 }\n  loadBalancing: LeastRequest\n  retries: { attempts: 2, on: [ConnectFailure, GatewayError], budget: { percent: 20 } }\n  outlierDetection: { consecutiveFailures: 5, baseEjectionTime: 30s }\n",
        )
        .unwrap();
        assert_eq!(policy.spec.target_ref.port, Some(9080));
        assert_eq!(policy.spec.load_balancing, LoadBalancing::LeastRequest);
        let retries = policy.spec.retries.unwrap();
        assert_eq!(retries.budget.unwrap().min_per_second, 10);
        assert_eq!(
            policy.spec.outlier_detection.unwrap().max_ejected_percent,
            50
        );

        let mesh: Mesh = serde_yaml::from_str(
            "apiVersion: tern.dev/v1alpha1\nkind: Mesh\nmetadata: { name: default }\nspec: {}\n",
        )
        .unwrap();
        assert_eq!(mesh.spec.trust_domain, "cluster.local");
        assert_eq!(mesh.spec.mtls, MtlsMode::Strict);

        let bad = serde_yaml::from_str::<MTLSPolicy>(
            "apiVersion: tern.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: { name: x }\nspec: { mode: Sometimes }\n",
        );
        assert!(bad.unwrap_err().to_string().contains("Sometimes"));
    }

    #[test]
    fn definitions_name_every_kind_with_the_right_scope() {
        let yaml = definitions_yaml().unwrap();
        for (name, scope) in [
            ("meshes.tern.dev", "Cluster"),
            ("mtlspolicies.tern.dev", "Namespaced"),
            ("authorizationpolicies.tern.dev", "Namespaced"),
            ("backendpolicies.tern.dev", "Namespaced"),
            ("ratelimitpolicies.tern.dev", "Namespaced"),
        ] {
            let at = yaml.find(&format!("name: {name}")).expect(name);
            let rest = &yaml[at..];
            let next = rest[1..].find("---").map_or(rest.len(), |n| n + 1);
            assert!(rest[..next].contains(&format!("scope: {scope}")), "{name}");
            assert!(
                rest[..next].contains("subresources:"),
                "{name} has a status"
            );
        }
    }
}
