//! Kubernetes-shaped manifests for `tern-control`'s manifest directory, as YAML text: the
//! same objects a cluster would hold, in namespace `default`.

use std::net::SocketAddr;
use std::path::Path;

/// A Service with one HTTP port 80 that targets `target_port`.
pub fn http_service(name: &str, target_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  selector: {{ app: {name} }}\n  ports: [{{ name: http, port: 80, targetPort: {target_port} }}]\n"
    )
}

/// A Service with one opaque TCP port 5432 that targets `target_port`.
pub fn tcp_service(name: &str, target_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  ports: [{{ name: db, port: 5432, targetPort: {target_port} }}]\n"
    )
}

/// The EndpointSlice of `service`: each endpoint an address, optionally of a Pod.
pub fn endpoints(
    service: &str,
    port_name: &str,
    endpoints: &[(SocketAddr, Option<&str>)],
) -> String {
    let port = endpoints.first().map_or(0, |(a, _)| a.port());
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{ kubernetes.io/service-name: {service} }}\naddressType: IPv4\nports: [{{ name: {port_name}, port: {port} }}]\nendpoints:\n"
    );
    for (address, pod) in endpoints {
        yaml.push_str(&format!(
            "  - addresses: [\"{}\"]\n    conditions: {{ ready: true }}\n",
            address.ip()
        ));
        if let Some(pod) = pod {
            yaml.push_str(&format!(
                "    targetRef: {{ kind: Pod, name: {pod}, namespace: default }}\n"
            ));
        }
    }
    yaml
}

/// A Pod labelled `app: <app>`, running as `service_account` at `ip`, its sidecar listening
/// on each `(app port, sidecar port)` of `inbound` (`tern.dev/inbound-ports`).
pub fn pod(
    name: &str,
    app: &str,
    service_account: &str,
    ip: &str,
    inbound: &[(u16, u16)],
) -> String {
    let ports: Vec<String> = inbound.iter().map(|(a, s)| format!("{a}={s}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{ app: {app} }}\n  annotations: {{ tern.dev/inbound-ports: \"{}\" }}\nspec: {{ serviceAccountName: {service_account}, containers: [] }}\nstatus: {{ podIP: \"{ip}\" }}\n",
        ports.join(",")
    )
}

/// An HTTPRoute attached to Service `parent` port 80, sending `/` to weighted backends.
pub fn route(name: &str, parent: &str, backends: &[(&str, u32)]) -> String {
    let refs: Vec<String> = backends
        .iter()
        .map(|(b, w)| format!("{{ name: {b}, port: 80, weight: {w} }}"))
        .collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  parentRefs: [{{ kind: Service, group: \"\", name: {parent}, port: 80 }}]\n  rules:\n    - matches: [{{ path: {{ type: PathPrefix, value: / }} }}]\n      backendRefs: [{}]\n",
        refs.join(", ")
    )
}

/// Writes `text` to `dir/name` atomically (a rename), as `kubectl`-style tooling would.
pub fn write(dir: &Path, name: &str, text: &str) {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, text).expect("writing a manifest");
    std::fs::rename(&temporary, dir.join(name)).expect("renaming a manifest");
}

/// A port nothing listens on right now, for sidecar inbound ports named in manifests.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("its address").port()
}
