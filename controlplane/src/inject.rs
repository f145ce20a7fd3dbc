//! Sidecar injection: adds Tern's sidecar to Pod templates, for `ternctl inject` (manifests,
//! as `linkerd inject` and `istioctl kube-inject` do, for `kubectl apply`) and for
//! `tern-control`'s admission webhook ([`crate::webhook`], Pods as the API server creates
//! them). Both make the same Pod.
//!
//! Each Pod template (a Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob,
//! alone or among the items of a `List`) gets two init containers ahead of its own:
//! `tern-init` (`tern-proxy init`: the Pod's interception rules, with `NET_ADMIN`) and
//! `tern-proxy`, a native sidecar (an init container with `restartPolicy: Always`,
//! Kubernetes 1.29+) whose startup probe holds the Pod's other containers until the proxy
//! is ready, and which the kubelet stops once they
//! have ended, so a Job completes. The proxy runs as UID 1337 (which the rules leave alone),
//! proves its identity with the Pod's ServiceAccount token projected for `tern-control`, and
//! reads one config per namespace, ConfigMap `tern-proxy` ([`config_map`]; `ternctl inject`
//! writes it beside the workloads, `tern-control` into each namespace labelled for
//! injection), made per Pod by the downward API's variables. Templates annotated
//! `tern.dev/inject: disabled`, on the host network, or already injected are left as they
//! are; other documents pass through.
//!
//! The kubelet's HTTP and TCP probes of the Pod's containers (its native sidecars among
//! them) are rewritten to the sidecar's probe port, which the interception rules leave
//! alone, and the sidecar makes each original probe against the application on loopback
//! (`dataplane::probes`), as Istio does: the kubelet's plaintext would not pass a STRICT
//! inbound port. HTTPS and gRPC probes are made the same way (`dataplane::probes`); `exec`
//! probes are left as they are.

use std::collections::BTreeSet;

use anyhow::Context as _;
use serde_yaml::{Mapping, Value};
use shared::config::HostPort;

/// The sidecar to inject: what every injected Pod of a mesh shares.
#[derive(Debug, Clone)]
pub struct Sidecar {
    /// The image holding `tern-proxy` (and `nft` or `iptables`, for `tern-init`).
    pub image: String,
    /// `tern-control`'s gRPC address; its host is also the name its certificate must carry.
    pub control: HostPort,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The OpenTelemetry collector the sidecars send spans to (`--trace-collector`), with
    /// `<service account>.<namespace>` as their service name; none for no spans.
    pub trace_collector: Option<HostPort>,
}

/// The ConfigMap injected Pods mount, one per namespace.
pub const CONFIG_MAP: &str = "tern-proxy";
/// The annotation that opts a Pod template out.
const INJECT: &str = "tern.dev/inject";
/// The annotation that marks a Pod template injected (so injecting again changes nothing).
const INJECTED: &str = "tern.dev/injected";
/// The UID the proxy runs as, whose connections `tern-proxy init`'s rules leave alone.
const PROXY_UID: u64 = 1337;
/// Where the sidecar serves the application's probes for the kubelet (Istio's port for the
/// same); `tern-init` leaves it out of interception.
const PROBE_PORT: u16 = 15020;
/// Where the sidecar finds its ConfigMap and its token.
const CONFIG_DIR: &str = "/etc/tern";
const TOKEN_DIR: &str = "/var/run/secrets/tern";

/// `text` (YAML documents) with its Pod templates injected, followed by the ConfigMap of
/// each namespace a template was injected in (after any Namespace the input creates; the
/// kubelet waits for a volume's ConfigMap). Each document is written as JSON, which kubectl
/// reads as it is: written back as YAML, a string such as `"yes"` would come out plain, and
/// kubectl's YAML 1.1 would read it as a boolean.
pub fn manifests(text: &str, sidecar: &Sidecar, root: &str) -> anyhow::Result<String> {
    let mut documents = Vec::new();
    let mut namespaces = BTreeSet::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut value = <Value as serde::Deserialize>::deserialize(document)
            .with_context(|| format!("document {} is not YAML", index + 1))?;
        if value.is_null() {
            continue;
        }
        file_modes_as_yaml_1_1(&mut value, &mut Vec::new());
        inject_object(&mut value, sidecar, &mut namespaces);
        documents.push(value);
    }
    let mut out = String::new();
    let config_maps = namespaces
        .iter()
        .map(|namespace| config_map(namespace.as_deref(), sidecar, root));
    for value in documents.into_iter().chain(config_maps) {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(&value).context("writing JSON")?);
        out.push('\n');
    }
    Ok(out)
}

/// File modes of Pod volumes written in octal, `0644`: kubectl's YAML 1.1 reads them as
/// octal numbers, YAML 1.2 (this parser) as strings; they are made the numbers kubectl would
/// have sent. Only where the Pod API has file modes: `defaultMode` of a `secret`,
/// `configMap`, `projected` or `downwardAPI` volume, and `mode` of its `items`, under
/// `volumes`. Elsewhere a key named `mode` holds whatever its owner put there (a ConfigMap's
/// `data`, a CSI driver's `volumeAttributes`), a string perhaps.
fn file_modes_as_yaml_1_1(value: &mut Value, path: &mut Vec<String>) {
    const SOURCES: [&str; 4] = ["secret", "configMap", "projected", "downwardAPI"];
    match value {
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let Some(key) = key.as_str() else {
                    continue;
                };
                let in_volumes = path.iter().any(|k| k == "volumes");
                let parent = path.last().map(String::as_str);
                let grandparent = path.len().checked_sub(2).map(|i| path[i].as_str());
                let is_mode = match key {
                    "defaultMode" => parent.is_some_and(|p| SOURCES.contains(&p)),
                    "mode" => {
                        parent == Some("items") && grandparent.is_some_and(|g| SOURCES.contains(&g))
                    }
                    _ => false,
                };
                let octal = match item.as_str() {
                    Some(text)
                        if in_volumes
                            && is_mode
                            && text.len() > 1
                            && text.starts_with('0')
                            && text.bytes().all(|b| (b'0'..=b'7').contains(&b)) =>
                    {
                        u64::from_str_radix(text, 8).ok()
                    }
                    _ => None,
                };
                match octal {
                    Some(mode) => *item = mode.into(),
                    None => {
                        path.push(key.to_owned());
                        file_modes_as_yaml_1_1(item, path);
                        path.pop();
                    }
                }
            }
        }
        Value::Sequence(items) => items
            .iter_mut()
            .for_each(|item| file_modes_as_yaml_1_1(item, path)),
        Value::Tagged(tagged) => file_modes_as_yaml_1_1(&mut tagged.value, path),
        _ => {}
    }
}

/// The JSON Patch (RFC 6902) that injects `pod` (a Pod as the API server is about to create
/// it, JSON), or `None` when it is left alone (opted out, on the host network, injected).
pub fn pod_patch(
    pod: &serde_json::Value,
    sidecar: &Sidecar,
) -> anyhow::Result<Option<json_patch::Patch>> {
    let mut template = serde_yaml::to_value(pod).context("reading the Pod")?;
    if !inject_pod(&mut template, sidecar) {
        return Ok(None);
    }
    let injected = serde_json::to_value(&template).context("writing the Pod")?;
    Ok(Some(json_patch::diff(pod, &injected)))
}

/// Injects the Pod template of `value`, or of each item of a `List` (as `kubectl get -o yaml`
/// writes several objects), noting the namespaces injected in.
fn inject_object(value: &mut Value, sidecar: &Sidecar, namespaces: &mut BTreeSet<Option<String>>) {
    if value["kind"].as_str() == Some("List") {
        if let Some(items) = value.get_mut("items").and_then(Value::as_sequence_mut) {
            for item in items {
                inject_object(item, sidecar, namespaces);
            }
        }
        return;
    }
    let namespace = value["metadata"]["namespace"].as_str().map(str::to_owned);
    if let Some(template) = pod_template(value)
        && inject_pod(template, sidecar)
    {
        namespaces.insert(namespace);
    }
}

/// The Pod template of a workload (`metadata` and `spec`), if it has one.
fn pod_template(value: &mut Value) -> Option<&mut Value> {
    let kind = value["kind"].as_str()?.to_owned();
    match kind.as_str() {
        "Pod" => Some(value),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            value.get_mut("spec")?.get_mut("template")
        }
        "CronJob" => value
            .get_mut("spec")?
            .get_mut("jobTemplate")?
            .get_mut("spec")?
            .get_mut("template"),
        _ => None,
    }
}

/// Adds the sidecar to a Pod template; false if it was left alone.
fn inject_pod(template: &mut Value, sidecar: &Sidecar) -> bool {
    let annotations = &template["metadata"]["annotations"];
    if annotations[INJECT].as_str() == Some("disabled")
        || !annotations[INJECTED].is_null()
        || template["spec"]["hostNetwork"].as_bool() == Some(true)
    {
        return false;
    }
    let Some(pod) = template.as_mapping_mut() else {
        return false;
    };
    let metadata = entry(pod, "metadata");
    let annotations = entry(metadata, "annotations");
    annotations.insert("tern.dev/interception".into(), "enabled".into());
    annotations.insert(INJECTED.into(), "true".into());
    let spec = entry(pod, "spec");
    let mut probes = rewrite_probes(sequence(spec, "containers").iter_mut());
    // The Pod's own native sidecars (init containers that keep running) are probed too.
    let init = sequence(spec, "initContainers");
    probes.extend(rewrite_probes(
        init.iter_mut()
            .filter(|c| c["restartPolicy"].as_str() == Some("Always")),
    ));
    init.splice(
        0..0,
        [
            init_container(&sidecar.image, !probes.is_empty()),
            sidecar_container(sidecar, &probes),
        ],
    );
    sequence(spec, "volumes").extend(volumes());
    true
}

/// Rewrites the containers' HTTP, TCP and gRPC probes to the sidecar's probe port; returns the
/// originals by their new path (container names are unique in a Pod, init containers
/// included), as the sidecar reads them (`TERN_APP_PROBES`).
fn rewrite_probes<'a>(
    containers: impl Iterator<Item = &'a mut Value>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut originals = serde_json::Map::new();
    for container in containers {
        let name = container["name"].as_str().unwrap_or_default().to_owned();
        let ports = container["ports"].clone();
        for (field, short) in [
            ("livenessProbe", "livez"),
            ("readinessProbe", "readyz"),
            ("startupProbe", "startupz"),
        ] {
            let Some(probe) = container.get_mut(field).and_then(Value::as_mapping_mut) else {
                continue;
            };
            let Some(original) = original_probe(probe, &ports) else {
                continue;
            };
            let path = format!("/app-health/{name}/{short}");
            probe.remove("tcpSocket");
            probe.remove("grpc");
            let mut get = Mapping::new();
            get.insert("path".into(), path.clone().into());
            get.insert("port".into(), PROBE_PORT.into());
            probe.insert("httpGet".into(), get.into());
            originals.insert(path, original);
        }
    }
    originals
}

/// What the sidecar makes for `probe` (an HTTP or HTTPS GET, a TCP connection or a gRPC
/// health check to a port the container names or numbers), or `None` to leave it alone
/// (`exec`, another `host`, a port it cannot resolve).
fn original_probe(probe: &Mapping, ports: &Value) -> Option<serde_json::Value> {
    let port_of = |port: &Value| -> Option<u64> {
        match port {
            Value::Number(number) => number.as_u64(),
            Value::String(text) => text.parse().ok().or_else(|| {
                ports.as_sequence()?.iter().find_map(|p| {
                    (p["name"].as_str() == Some(text)).then(|| p["containerPort"].as_u64())?
                })
            }),
            _ => None,
        }
        .filter(|port| (1..=65535).contains(port))
    };
    let mut original = serde_json::Map::new();
    let elsewhere = |action: &Value| action["host"].as_str().is_some_and(|h| !h.is_empty());
    if let Some(get) = probe.get("httpGet") {
        let https = match get["scheme"].as_str() {
            None => false,
            Some(scheme) if scheme.eq_ignore_ascii_case("http") => false,
            Some(scheme) if scheme.eq_ignore_ascii_case("https") => true,
            Some(_) => return None,
        };
        if elsewhere(get) {
            return None;
        }
        // As the kubelet reads a path: `/` when empty, rooted when not.
        let path = get["path"].as_str().unwrap_or_default();
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        let mut http_get = serde_json::json!({ "port": port_of(&get["port"])?, "path": path });
        if let Some(headers) = get["httpHeaders"].as_sequence() {
            http_get["httpHeaders"] = serde_json::to_value(headers).ok()?;
        }
        if https {
            http_get["scheme"] = "HTTPS".into();
        }
        original.insert("httpGet".into(), http_get);
    } else if let Some(tcp) = probe.get("tcpSocket")
        && !elsewhere(tcp)
    {
        original.insert(
            "tcpSocket".into(),
            serde_json::json!({ "port": port_of(&tcp["port"])? }),
        );
    } else if let Some(grpc) = probe.get("grpc") {
        let mut check = serde_json::json!({ "port": port_of(&grpc["port"])? });
        if let Some(service) = grpc["service"].as_str().filter(|s| !s.is_empty()) {
            check["service"] = service.into();
        }
        original.insert("grpc".into(), check);
    } else {
        return None;
    }
    if let Some(timeout) = probe.get("timeoutSeconds").and_then(Value::as_u64) {
        original.insert("timeoutSeconds".into(), timeout.into());
    }
    Some(original.into())
}

/// The mapping at `key` of `map`, made if missing (or not a mapping).
fn entry<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Mapping {
    let value = map
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if !value.is_mapping() {
        *value = Value::Mapping(Mapping::new());
    }
    value.as_mapping_mut().unwrap_or_else(|| unreachable!())
}

/// The sequence at `key` of `map`, made if missing (or not a sequence).
fn sequence<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Vec<Value> {
    let value = map
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if !value.is_sequence() {
        *value = Value::Sequence(Vec::new());
    }
    value.as_sequence_mut().unwrap_or_else(|| unreachable!())
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| unreachable!("fixed YAML: {e}"))
}

/// `tern-init`; with `probes`, the sidecar's probe port is left out of interception.
fn init_container(image: &str, probes: bool) -> Value {
    let args = if probes {
        format!("[init, --exclude-inbound-ports, \"{PROBE_PORT}\"]")
    } else {
        "[init]".to_owned()
    };
    let mut container = yaml(&format!(
        "name: tern-init
image: placeholder
command: [tern-proxy]
args: {args}
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  capabilities: {{ add: [NET_ADMIN, NET_RAW], drop: [ALL] }}
"
    ));
    // Set as a value, not written into the YAML text, whatever the image's name holds.
    container["image"] = image.into();
    container
}

fn sidecar_container(
    sidecar: &Sidecar,
    probes: &serde_json::Map<String, serde_json::Value>,
) -> Value {
    let mut container = yaml(&format!(
        "name: tern-proxy
image: placeholder
restartPolicy: Always
command: [tern-proxy]
args: [--config, {CONFIG_DIR}/proxy.yaml]
env:
  - {{ name: POD_NAME, valueFrom: {{ fieldRef: {{ fieldPath: metadata.name }} }} }}
  - {{ name: POD_NAMESPACE, valueFrom: {{ fieldRef: {{ fieldPath: metadata.namespace }} }} }}
  - {{ name: SERVICE_ACCOUNT, valueFrom: {{ fieldRef: {{ fieldPath: spec.serviceAccountName }} }} }}
startupProbe:
  exec: {{ command: [tern-proxy, wait-ready, --timeout, 1s] }}
  periodSeconds: 1
  failureThreshold: 120
securityContext:
  runAsUser: {PROXY_UID}
  runAsGroup: {PROXY_UID}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{ drop: [ALL] }}
volumeMounts:
  - {{ name: tern-config, mountPath: {CONFIG_DIR}, readOnly: true }}
  - {{ name: tern-token, mountPath: {TOKEN_DIR}, readOnly: true }}
"
    ));
    container["image"] = sidecar.image.clone().into();
    let mut env = Vec::new();
    if let Some(collector) = &sidecar.trace_collector {
        // The kubelet expands `$(VAR)` of a variable set before this one in the container.
        env.push(variable("TERN_TRACE_COLLECTOR", &collector.to_string()));
        env.push(variable(
            "TERN_TRACE_SERVICE_NAME",
            "$(SERVICE_ACCOUNT).$(POD_NAMESPACE)",
        ));
    }
    if !probes.is_empty() {
        // The kubelet expands `$(VAR)` in a variable's value; `$$` is a `$`.
        let probes = serde_json::Value::Object(probes.clone())
            .to_string()
            .replace('$', "$$");
        container["args"]
            .as_sequence_mut()
            .unwrap_or_else(|| unreachable!("fixed YAML"))
            .extend([
                "--probe-address".into(),
                format!("[::]:{PROBE_PORT}").into(),
            ]);
        env.push(variable("TERN_APP_PROBES", &probes));
    }
    container["env"]
        .as_sequence_mut()
        .unwrap_or_else(|| unreachable!("fixed YAML"))
        .extend(env);
    container
}

/// A container's environment variable `name`, set to `value`.
fn variable(name: &str, value: &str) -> Value {
    let mut variable = Mapping::new();
    variable.insert("name".into(), name.into());
    variable.insert("value".into(), value.into());
    variable.into()
}

fn volumes() -> Vec<Value> {
    vec![
        yaml("name: tern-config\nconfigMap: { name: tern-proxy }\n"),
        yaml(&format!(
            "name: tern-token\nprojected:\n  sources:\n    - serviceAccountToken: {{ audience: {}, expirationSeconds: 3600, path: token }}\n",
            crate::identity::TOKEN_AUDIENCE
        )),
    ]
}

/// The sidecar's config: the same for every Pod of the namespace, made per Pod by the
/// variables the sidecar container sets.
pub fn proxy_config(sidecar: &Sidecar) -> String {
    format!(
        "identity:
  ca:
    address: {control:?}
    server_name: {host:?}
    root: {CONFIG_DIR}/ca.crt
    spiffe_id: {spiffe_id:?}
    token_file: {TOKEN_DIR}/token
discovery:
  workload: {{ namespace: \"${{POD_NAMESPACE}}\", name: \"${{POD_NAME}}\" }}
interception: {{}}
",
        control = sidecar.control.to_string(),
        host = sidecar.control.host,
        spiffe_id = format!(
            "spiffe://{}/ns/${{POD_NAMESPACE}}/sa/${{SERVICE_ACCOUNT}}",
            sidecar.trust_domain
        ),
    )
}

/// ConfigMap `tern-proxy` of `namespace` (none: the namespace `kubectl` applies it to), which
/// every injected Pod of the namespace mounts: the sidecar's config and the mesh root.
pub fn config_map(namespace: Option<&str>, sidecar: &Sidecar, root: &str) -> Value {
    let mut map = yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{ name: {CONFIG_MAP} }}\n"
    ));
    if let Some(namespace) = namespace {
        map["metadata"]["namespace"] = namespace.into();
    }
    map["data"] = yaml("{}");
    map["data"]["proxy.yaml"] = proxy_config(sidecar).into();
    map["data"]["ca.crt"] = root.into();
    map
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sidecar() -> Sidecar {
        Sidecar {
            image: "registry.example/tern-proxy:1".into(),
            control: "tern-control.tern-system.svc:15012".parse().unwrap(),
            trust_domain: "mesh.example".into(),
            trace_collector: None,
        }
    }

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    const MANIFESTS: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: shop }
spec:
  template:
    metadata: { labels: { app: web } }
    spec:
      serviceAccountName: web
      initContainers: [{ name: migrate, image: web:1 }]
      containers: [{ name: web, image: web:1, env: [{ name: VERBOSE, value: 'yes' }] }]
      volumes:
        - { name: data, emptyDir: {} }
        - { name: settings, configMap: { name: web, defaultMode: 0644, items: [{ key: a, path: a, mode: 0600 }] } }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { ports: [{ port: 80 }] }
---
apiVersion: batch/v1
kind: CronJob
metadata: { name: report, namespace: batch }
spec:
  schedule: '@daily'
  jobTemplate:
    spec:
      template:
        spec: { containers: [{ name: report, image: report:1 }], restartPolicy: Never }
---
apiVersion: v1
kind: Pod
metadata: { name: node-agent, namespace: shop }
spec: { hostNetwork: true, containers: [{ name: agent, image: agent:1 }] }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: legacy, namespace: shop }
spec:
  template:
    metadata: { annotations: { tern.dev/inject: disabled } }
    spec: { containers: [{ name: legacy, image: legacy:1 }] }
";

    fn documents(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect()
    }

    fn names(containers: &Value) -> Vec<&str> {
        containers
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn only_the_file_modes_of_volumes_are_read_as_octal() {
        let input = "
apiVersion: v1
kind: ConfigMap
metadata: { name: settings, namespace: shop }
data: { mode: '0600', defaultMode: '0644' }
---
apiVersion: v1
kind: Pod
metadata: { name: web, namespace: shop }
spec:
  containers: [{ name: web, image: web:1 }]
  volumes:
    - { name: token, projected: { defaultMode: 0440, sources: [{ secret: { name: s, items: [{ key: k, path: k, mode: 0400 }] } }] } }
    - { name: store, csi: { driver: store.example, volumeAttributes: { mode: '0700' } } }
";
        let out = documents(&manifests(input, &sidecar(), ROOT).unwrap());
        assert_eq!(out[0]["data"]["mode"], "0600");
        assert_eq!(out[0]["data"]["defaultMode"], "0644");
        let spec = &out[1]["spec"];
        assert_eq!(
            spec["volumes"][1]["csi"]["volumeAttributes"]["mode"],
            "0700"
        );
        let projected = &spec["volumes"][0]["projected"];
        assert_eq!(projected["defaultMode"], 0o440);
        assert_eq!(projected["sources"][0]["secret"]["items"][0]["mode"], 0o400);
    }

    #[test]
    fn workloads_get_the_sidecar_ahead_of_their_own_init_containers_and_the_rest_passes() {
        let input = documents(MANIFESTS);
        let out = documents(&manifests(MANIFESTS, &sidecar(), ROOT).unwrap());
        // Every document in order, then a ConfigMap for each namespace injected in.
        assert_eq!(out.len(), input.len() + 2);
        let maps: Vec<&str> = out[5..]
            .iter()
            .map(|m| m["metadata"]["namespace"].as_str().unwrap())
            .collect();
        assert_eq!(maps, ["batch", "shop"]);
        assert!(out[5..].iter().all(|m| m["data"]["ca.crt"] == ROOT));

        let web = &out[0]["spec"]["template"];
        assert_eq!(
            web["metadata"]["annotations"]["tern.dev/interception"],
            "enabled"
        );
        assert_eq!(web["metadata"]["labels"]["app"], "web");
        let spec = &web["spec"];
        assert_eq!(
            names(&spec["initContainers"]),
            ["tern-init", "tern-proxy", "migrate"]
        );
        assert_eq!(names(&spec["containers"]), ["web"]);
        assert_eq!(
            spec["containers"],
            input[0]["spec"]["template"]["spec"]["containers"]
        );
        // What kubectl's YAML 1.1 would have read: octal file modes, and "yes" a string.
        assert_eq!(spec["volumes"][1]["configMap"]["defaultMode"], 0o644);
        assert_eq!(spec["volumes"][1]["configMap"]["items"][0]["mode"], 0o600);
        let text = manifests(MANIFESTS, &sidecar(), ROOT).unwrap();
        assert!(text.contains(r#""value": "yes""#), "{text}");
        let (init, sidecar) = (&spec["initContainers"][0], &spec["initContainers"][1]);
        assert_eq!(init["image"], "registry.example/tern-proxy:1");
        assert_eq!(init["args"][0], "init");
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(sidecar["securityContext"]["runAsUser"], PROXY_UID);
        assert_eq!(
            names(&spec["volumes"]),
            ["data", "settings", "tern-config", "tern-token"]
        );
        assert_eq!(
            spec["volumes"][3]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "tern-control"
        );

        // Passed through as they were: a Service, a Pod on the host network, an opt-out.
        assert_eq!(out[1], input[1]);
        assert_eq!(out[3], input[3]);
        assert_eq!(out[4], input[4]);
        let report = &out[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(
            names(&report["initContainers"]),
            ["tern-init", "tern-proxy"]
        );
    }

    #[test]
    fn http_and_tcp_probes_go_through_the_sidecar_and_the_rest_stay() {
        let manifest = "
apiVersion: v1
kind: Pod
metadata: { name: api, namespace: shop }
spec:
  initContainers:
    - { name: setup, image: setup:1 }
    - name: log-shipper
      image: shipper:1
      restartPolicy: Always
      startupProbe: { httpGet: { path: /started, port: 9000 } }
  containers:
    - name: api
      image: api:1
      ports: [{ name: http, containerPort: 8080 }]
      readinessProbe:
        httpGet: { path: /ready, port: http, httpHeaders: [{ name: x-probe, value: '1' }] }
        timeoutSeconds: 3
        periodSeconds: 5
      livenessProbe: { tcpSocket: { port: 8080 } }
      startupProbe: { exec: { command: [true] } }
    - name: tls
      image: tls:1
      readinessProbe: { httpGet: { path: /, port: 8443, scheme: HTTPS } }
      livenessProbe: { grpc: { port: 9090, service: health } }
      startupProbe: { httpGet: { host: 10.0.0.9, port: 80 } }
    - name: plain
      image: plain:1
      readinessProbe: { httpGet: { path: 'ready?$(x)', port: '81' } }
";
        let out = documents(&manifests(manifest, &sidecar(), ROOT).unwrap());
        let spec = &out[0]["spec"];
        let api = &spec["containers"][0];
        assert_eq!(
            api["readinessProbe"],
            yaml(
                "{ httpGet: { path: /app-health/api/readyz, port: 15020 }, timeoutSeconds: 3, periodSeconds: 5 }"
            )
        );
        assert_eq!(
            api["livenessProbe"],
            yaml("{ httpGet: { path: /app-health/api/livez, port: 15020 } }")
        );
        assert_eq!(api["startupProbe"], yaml("{ exec: { command: [true] } }"));
        let tls = &spec["containers"][1];
        assert_eq!(
            tls["readinessProbe"],
            yaml("{ httpGet: { path: /app-health/tls/readyz, port: 15020 } }")
        );
        assert_eq!(
            tls["livenessProbe"],
            yaml("{ httpGet: { path: /app-health/tls/livez, port: 15020 } }")
        );
        // A probe of another host is the kubelet's to make.
        assert_eq!(tls["startupProbe"]["httpGet"]["host"], "10.0.0.9");

        // The sidecar serves them, from what the containers said, on a port init leaves alone.
        let init = &spec["initContainers"];
        assert_eq!(
            names(init),
            ["tern-init", "tern-proxy", "setup", "log-shipper"]
        );
        assert_eq!(
            init[3]["startupProbe"],
            yaml("{ httpGet: { path: /app-health/log-shipper/startupz, port: 15020 } }")
        );
        assert_eq!(
            init[0]["args"],
            yaml("[init, --exclude-inbound-ports, '15020']")
        );
        let proxy = &init[1];
        let sidecar_args = proxy["args"].as_sequence().unwrap();
        assert_eq!(
            sidecar_args[sidecar_args.len() - 2..],
            [yaml("--probe-address"), yaml("'[::]:15020'")]
        );
        let probes = proxy["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "TERN_APP_PROBES")
            .unwrap()["value"]
            .as_str()
            .unwrap();
        // Written as the kubelet reads it: `$$` for each `$`, which it does not expand.
        assert!(probes.contains("?$$(x)"), "{probes}");
        let probes: serde_json::Value = serde_json::from_str(&probes.replace("$$", "$")).unwrap();
        assert_eq!(
            probes,
            serde_json::json!({
                "/app-health/api/readyz": {
                    "httpGet": { "port": 8080, "path": "/ready", "httpHeaders": [{ "name": "x-probe", "value": "1" }] },
                    "timeoutSeconds": 3
                },
                "/app-health/api/livez": { "tcpSocket": { "port": 8080 } },
                "/app-health/tls/livez": { "grpc": { "port": 9090, "service": "health" } },
                "/app-health/tls/readyz": { "httpGet": { "port": 8443, "path": "/", "scheme": "HTTPS" } },
                "/app-health/plain/readyz": { "httpGet": { "port": 81, "path": "/ready?$(x)" } },
                "/app-health/log-shipper/startupz": { "httpGet": { "port": 9000, "path": "/started" } }
            })
        );
        // Without probes to make, the sidecar serves none and its port is intercepted.
        let out = documents(&manifests(MANIFESTS, &sidecar(), ROOT).unwrap());
        assert_eq!(
            out[0]["spec"]["template"]["spec"]["initContainers"][0]["args"],
            yaml("[init]")
        );
        let sidecar = &out[0]["spec"]["template"]["spec"]["initContainers"][1];
        assert!(
            !sidecar["args"]
                .as_sequence()
                .unwrap()
                .contains(&yaml("--probe-address"))
        );
    }

    #[test]
    fn the_items_of_a_list_are_injected_as_documents_are() {
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n{}",
            MANIFESTS
                .split("\n---\n")
                .map(|document| format!(
                    "  - {}\n",
                    serde_json::to_string(&yaml(document)).unwrap()
                ))
                .collect::<String>()
        );
        let listed = documents(&manifests(&list, &sidecar(), ROOT).unwrap());
        let separate = documents(&manifests(MANIFESTS, &sidecar(), ROOT).unwrap());
        // The list, then the same ConfigMaps; its items as the documents came out.
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[0]["items"].as_sequence().unwrap()[..], separate[..5]);
        assert_eq!(listed[1..], separate[5..]);
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let once = manifests(MANIFESTS, &sidecar(), ROOT).unwrap();
        assert_eq!(manifests(&once, &sidecar(), ROOT).unwrap(), once);
    }

    #[test]
    fn a_trace_collector_reaches_the_sidecars_after_the_variables_its_name_uses() {
        let names = |sidecar: &Sidecar| -> Vec<(String, String)> {
            let out = documents(&manifests(MANIFESTS, sidecar, ROOT).unwrap());
            let proxy = &out[0]["spec"]["template"]["spec"]["initContainers"][1];
            proxy["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|e| {
                    let value = e["value"].as_str().unwrap_or_default().to_owned();
                    (e["name"].as_str().unwrap().to_owned(), value)
                })
                .collect()
        };
        let plain = names(&sidecar());
        assert!(
            plain.iter().all(|(n, _)| !n.starts_with("TERN_TRACE")),
            "{plain:?}"
        );
        let traced = Sidecar {
            trace_collector: Some("otel.observability:4318".parse().unwrap()),
            ..sidecar()
        };
        let env = names(&traced);
        let at = |name: &str| env.iter().position(|(n, _)| n == name).unwrap();
        assert_eq!(env[at("TERN_TRACE_COLLECTOR")].1, "otel.observability:4318");
        let service = at("TERN_TRACE_SERVICE_NAME");
        assert_eq!(env[service].1, "$(SERVICE_ACCOUNT).$(POD_NAMESPACE)");
        assert!(at("SERVICE_ACCOUNT") < service && at("POD_NAMESPACE") < service);
    }

    #[test]
    fn the_sidecar_config_is_a_valid_proxy_config_once_the_pod_variables_are_in() {
        let mut sidecar = sidecar();
        sidecar.control = "[fd00::15]:15012".parse().unwrap();
        let out = documents(&manifests(MANIFESTS, &sidecar, ROOT).unwrap());
        let sidecar = &out[0]["spec"]["template"]["spec"]["initContainers"][1];
        let set: Vec<&str> = sidecar["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        let text = out[6]["data"]["proxy.yaml"].as_str().unwrap();
        let values = |name: &str| {
            set.contains(&name).then(|| {
                match name {
                    "POD_NAME" => "web-7d9f",
                    "POD_NAMESPACE" => "shop",
                    _ => "web",
                }
                .to_owned()
            })
        };
        let expanded = shared::config::expand_env(text, values)
            .unwrap_or_else(|name| panic!("the sidecar does not set {name}"));
        let config = shared::Config::from_yaml(&expanded, "proxy.yaml").unwrap();
        let shared::config::IdentitySource::Ca(ca) = config.identity.unwrap() else {
            panic!("not a CA identity");
        };
        assert_eq!(ca.address.to_string(), "[fd00::15]:15012");
        assert_eq!(ca.server_name, "fd00::15");
        assert_eq!(
            ca.spiffe_id.to_string(),
            "spiffe://mesh.example/ns/shop/sa/web"
        );
        assert_eq!(
            ca.token_file,
            std::path::Path::new("/var/run/secrets/tern/token")
        );
        let discovery = config.discovery.unwrap();
        assert_eq!(
            (
                discovery.workload.namespace.as_str(),
                discovery.workload.name.as_str()
            ),
            ("shop", "web-7d9f")
        );
        assert!(config.interception.is_some());
        // The mounts the config names are the ones the sidecar has.
        let mounts: Vec<&str> = sidecar["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(mounts, [CONFIG_DIR, TOKEN_DIR]);
    }
}
