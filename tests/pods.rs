//! Transparent sidecars in pods on one machine: network namespaces joined through a node
//! bridge, each meshed pod running `tern-proxy init` and a `tern-proxy` sidecar (the real
//! binaries), configured by a `tern-control` in the node namespace from a manifest
//! directory. The applications know nothing of the mesh: they dial Service addresses and
//! listen on their own ports (HTTP/1.1 and HTTP/2 alike).
//!
//! Needs root, `ip` and `nft` (CI installs iproute2 and nftables); elsewhere it says why and
//! passes without running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tests::ca::TestControlPlane;
use tests::pods::{Node, Pod, get, socket, supported};
use tests::upstream::{Echo, Http};
use tests::{binary, eventually, metric};

/// Cluster IPs of Service `b` (one per family) and of Service `c`.
const B_V4: &str = "198.19.0.10";
const B_V6: &str = "fd00:7e57:5::10";
const C_V4: &str = "198.19.0.11";

const CONTROL_PORT: u16 = 15012;
const CONTROL_ADMIN_PORT: u16 = 15014;

/// Pods `a` (a client), `b` (echo on 9000, HTTP on 8080, a server-speaks-first protocol on
/// 3306) and `c` (HTTP on 8080) are meshed and intercepted; `outsider` has no sidecar.
fn manifests(pods: &[&Pod], mesh_outbound: &str) -> String {
    let mut yaml = format!(
        "apiVersion: tern.dev/v1alpha1\nkind: Mesh\nmetadata: {{ name: default }}\nspec: {{ trustDomain: {}, mtls: Strict, outboundTraffic: {mesh_outbound} }}\n",
        tests::ca::TRUST_DOMAIN
    );
    for pod in pods {
        let meshed = pod.name != "outsider";
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{ app: {name} }}\n  annotations: {{ tern.dev/interception: {interception} }}\nspec: {{ serviceAccountName: {name}, containers: [] }}\nstatus: {{ podIP: \"{v4}\", podIPs: [{{ ip: \"{v4}\" }}, {{ ip: \"{v6}\" }}] }}\n",
            name = pod.name,
            interception = if meshed { "enabled" } else { "disabled" },
            v4 = pod.v4,
            v6 = pod.v6,
        ));
    }
    let b = pods.iter().find(|p| p.name == "b").unwrap();
    let c = pods.iter().find(|p| p.name == "c").unwrap();
    yaml.push_str(&format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{ name: b, namespace: default }}
spec:
  selector: {{ app: b }}
  clusterIP: "{B_V4}"
  clusterIPs: ["{B_V4}", "{B_V6}"]
  ports:
    - {{ name: echo, port: 9000 }}
    - {{ name: http, port: 80, targetPort: 8080 }}
    - {{ name: grpc, port: 81, targetPort: 8080 }}
    - {{ name: banner, port: 3306 }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: b-v4, namespace: default, labels: {{ kubernetes.io/service-name: b }} }}
addressType: IPv4
ports: [{{ name: echo, port: 9000 }}, {{ name: http, port: 8080 }}, {{ name: grpc, port: 8080 }}, {{ name: banner, port: 3306 }}]
endpoints:
  - {{ addresses: ["{b4}"], targetRef: {{ kind: Pod, name: b }} }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: b-v6, namespace: default, labels: {{ kubernetes.io/service-name: b }} }}
addressType: IPv6
ports: [{{ name: echo, port: 9000 }}, {{ name: http, port: 8080 }}, {{ name: grpc, port: 8080 }}, {{ name: banner, port: 3306 }}]
endpoints:
  - {{ addresses: ["{b6}"], targetRef: {{ kind: Pod, name: b }} }}
---
apiVersion: v1
kind: Service
metadata: {{ name: c, namespace: default }}
spec:
  selector: {{ app: c }}
  clusterIP: "{C_V4}"
  ports: [{{ name: http, port: 80, targetPort: 8080 }}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: c-1, namespace: default, labels: {{ kubernetes.io/service-name: c }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080 }}]
endpoints:
  - {{ addresses: ["{c4}"], targetRef: {{ kind: Pod, name: c }} }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: b-to-c, namespace: default }}
spec:
  parentRefs: [{{ kind: Service, group: "", name: b, port: 80 }}]
  rules:
    - matches: [{{ path: {{ type: PathPrefix, value: /to-c }} }}, {{ headers: [{{ name: x-canary, value: "yes" }}] }}]
      backendRefs: [{{ name: c, port: 80 }}]
    - backendRefs: [{{ name: b, port: 80 }}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{ name: b-grpc, namespace: default }}
spec:
  parentRefs: [{{ kind: Service, group: "", name: b, port: 81 }}]
  rules:
    - matches: [{{ method: {{ service: tern.Test }} }}]
      backendRefs: [{{ name: c, port: 80 }}]
    - backendRefs: [{{ name: b, port: 81 }}]
"#,
        b4 = b.v4,
        b6 = b.v6,
        c4 = c.v4,
    ));
    yaml
}

/// A meshed pod: interception rules, then its sidecar, configured by the control plane.
fn start_sidecar(node: &Node, control: &TestControlPlane, pod: &Pod) {
    node.exec(&pod.netns, &binary("tern-proxy"), &["init"]);
    let config = format!(
        "{identity}discovery:\n  workload: {{ namespace: default, name: {name} }}\ninterception: {{ mark: 1337 }}\ndetect_timeout: 10s\n",
        identity = control.identity_yaml(&pod.name, &pod.name),
        name = pod.name,
    );
    let path = node.write(&format!("{}.yaml", pod.name), &config);
    let access_log = access_log(node, pod);
    node.spawn(
        &pod.netns,
        &pod.name,
        &binary("tern-proxy"),
        &[
            "--config",
            path.to_str().unwrap(),
            "--workers",
            "1",
            "--no-pin",
            "--drain-deadline",
            "5s",
            "--log",
            "info,dataplane=debug",
            "--access-log",
            access_log.to_str().unwrap(),
        ],
    );
}

/// Where `pod`'s sidecar writes its access log.
fn access_log(node: &Node, pod: &Pod) -> std::path::PathBuf {
    node.dir.0.join(format!("{}-access.log", pod.name))
}

/// The sidecar admin server inside `pod` (status and body).
fn admin(pod: &Pod, path: &str) -> (u16, String) {
    pod.within(|| {
        let Ok(stream) = std::net::TcpStream::connect("127.0.0.1:15000") else {
            return (0, String::new());
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut conn = tests::client::Conn::new(stream);
        conn.send(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        let response = conn.response(false);
        (response.status, response.text())
    })
}

fn wait_ready(pod: &Pod) {
    eventually(
        Duration::from_secs(30),
        &format!("{}'s sidecar ready", pod.name),
        || admin(pod, "/ready").0 == 200,
    );
}

fn echo_through(pod: &Pod, to: SocketAddr, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = pod.connect(to)?;
    stream.write_all(message)?;
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply)?;
    Ok(reply)
}

#[test]
fn intercepted_pods_talk_mtls_by_service_address() {
    if !supported() {
        return;
    }
    let node = Node::new("mesh");
    let a = node.pod("a", 1);
    let b = node.pod("b", 2);
    let c = node.pod("c", 3);
    let outsider = node.pod("outsider", 4);

    // The applications: they know nothing of the mesh.
    let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let seen = peers.clone();
    let _b_echo = Echo::on(b.bind("[::]:9000"), None, move |peer| {
        seen.lock().unwrap().push(peer)
    });
    let _b_http = Http::on(b.bind("[::]:8080"), "b");
    let _b_banner = Echo::on(b.bind("[::]:3306"), Some(b"220 banner\r\n"), |_| {});
    let _c_http = Http::on(c.bind("[::]:8080"), "c");
    let _outside = Echo::on(outsider.bind("[::]:7000"), None, |_| {});

    let manifests_dir = node.dir.0.join("manifests");
    std::fs::create_dir_all(&manifests_dir).unwrap();
    let pods = [&a, &b, &c, &outsider];
    tests::manifests::write(&manifests_dir, "mesh.yaml", &manifests(&pods, "AllowAny"));
    let control = node.netns.within(|| {
        let mut control = TestControlPlane::start(Duration::from_secs(3600));
        control.address = socket(tests::pods::NODE_V4, CONTROL_PORT);
        control.admin = socket(tests::pods::NODE_V4, CONTROL_ADMIN_PORT);
        control.source = controlplane::ConfigSource::Directory(manifests_dir.clone());
        control.restart();
        control
    });
    for pod in [&a, &b, &c] {
        start_sidecar(&node, &control, pod);
    }
    for pod in [&a, &b, &c] {
        wait_ready(pod);
    }
    // Before any traffic, each sidecar has said whether the kernel takes its mTLS records.
    for pod in [&a, &b, &c] {
        let log = node.log(&pod.name);
        assert!(
            log.contains("kernel TLS is available") || log.contains("kernel TLS is unavailable"),
            "{}'s sidecar did not probe kTLS at start-up:\n{log}",
            pod.name
        );
    }

    // Opaque TCP (a detected port) to b's Service address: intercepted, carried over mTLS
    // to b's sidecar, which hands it to b's application from b itself.
    let b_echo = socket(B_V4.parse::<std::net::IpAddr>().unwrap(), 9000);
    assert_eq!(echo_through(&a, b_echo, b"hello b").unwrap(), b"hello b");
    let from = peers.lock().unwrap().clone();
    assert!(
        !from.is_empty()
            && from
                .iter()
                .all(|p| p.ip().to_canonical() == b.v4 || p.ip() == b.v6),
        "b's application saw connections from {from:?}, not from its own sidecar"
    );
    let (_, b_metrics) = admin(&b, "/metrics");
    let peer_series = format!(
        "tern_listener_peer_connections_total{{listener=\"inbound:9000\",peer_identity=\"{}\"}}",
        TestControlPlane::spiffe_id("a")
    );
    assert!(metric(&b_metrics, &peer_series) >= 1.0, "{b_metrics}");
    let (_, a_metrics) = admin(&a, "/metrics");
    assert!(
        metric(
            &a_metrics,
            &format!(
                "tern_protocol_detections_total{{listener=\"outbound:b.default:9000/{B_V4}\",protocol=\"opaque\"}}"
            )
        ) >= 1.0,
        "{a_metrics}"
    );

    // IPv6: the Service's IPv6 address is intercepted too, and b's IPv6 endpoint is dialed
    // over IPv6 and taken by b's IPv6 interception socket, in the port's STRICT mode (the
    // sidecar then hands it to the application at the Pod's primary address).
    let b_echo6 = socket(B_V6.parse::<std::net::IpAddr>().unwrap(), 9000);
    for i in 0..4u8 {
        let message = [b'6', i];
        assert_eq!(echo_through(&a, b_echo6, &message).unwrap(), message);
    }
    let (_, a_metrics) = admin(&a, "/metrics");
    assert!(
        metric(
            &a_metrics,
            "tern_listener_connections_total{listener=\"intercept-outbound-v6\"}"
        ) >= 4.0,
        "{a_metrics}"
    );
    let (_, b_metrics) = admin(&b, "/metrics");
    assert!(
        metric(
            &b_metrics,
            "tern_listener_connections_total{listener=\"intercept-inbound-v6\"}"
        ) >= 1.0,
        "{b_metrics}"
    );
    assert_eq!(
        metric(
            &b_metrics,
            "tern_listener_tls_connections_total{listener=\"intercept-inbound-v6\",mode=\"userspace\"}"
        ),
        0.0,
        "IPv6 connections were passed through instead of claimed by the port: {b_metrics}"
    );

    // HTTP/1.1 routes by the control plane's HTTPRoute.
    let b_http = socket(B_V4.parse::<std::net::IpAddr>().unwrap(), 80);
    assert_eq!(get(&a, b_http, "b", "/x").text(), "b /x");
    assert_eq!(get(&a, b_http, "b", "/to-c/y").text(), "c /to-c/y");
    let c_http = socket(C_V4.parse::<std::net::IpAddr>().unwrap(), 80);
    assert_eq!(get(&a, c_http, "c", "/direct").text(), "c /direct");
    // HTTP/2 (prior knowledge) to the same address routes by the same HTTPRoute, stream by
    // stream, and crosses the sidecars as HTTP/2 (ALPN h2) with trailers intact.
    let h2 = tests::h2::H2::over(a.connect(b_http).unwrap());
    assert_eq!(h2.get("b", "/x2").text(), "b /x2");
    assert_eq!(h2.get("b", "/to-c/y2").text(), "c /to-c/y2");
    let call = h2.send("POST", "b", "/grpc", bytes::Bytes::from_static(b"call"));
    assert_eq!(call.trailers.expect("trailers")["x-served-by"], "b");
    // A header match of the same HTTPRoute.
    let mut canary = tests::client::Conn::new(a.connect(b_http).unwrap());
    canary.send(b"GET /x HTTP/1.1\r\nHost: b\r\nX-Canary: yes\r\nConnection: close\r\n\r\n");
    assert_eq!(canary.response(false).text(), "c /x");
    // gRPC calls routed by a GRPCRoute on the gRPC port: by service and method.
    let b_grpc = socket(B_V4.parse::<std::net::IpAddr>().unwrap(), 81);
    let grpc = tests::h2::H2::over(a.connect(b_grpc).unwrap());
    let to_c = grpc.send(
        "POST",
        "b",
        "/tern.Test/Call",
        bytes::Bytes::from_static(b"m"),
    );
    assert_eq!(to_c.text(), "c /tern.Test/Call");
    let to_b = grpc.send(
        "POST",
        "b",
        "/other.Svc/Call",
        bytes::Bytes::from_static(b"m"),
    );
    assert_eq!(to_b.text(), "b /other.Svc/Call");

    // a's sidecar learns destinations as its application dials them: nothing yet of the
    // port it has not used.
    let (_, dump) = admin(&a, "/config_dump");
    assert!(dump.contains("outbound:b.default:9000/"), "{dump}");
    assert!(!dump.contains("outbound:b.default:3306/"), "{dump}");

    // A server-speaks-first protocol (port 3306 is opaque by default): the greeting comes
    // without the client saying anything, long before the 10 s detection timeout.
    let b_banner = socket(B_V4.parse::<std::net::IpAddr>().unwrap(), 3306);
    let mut banner = a.connect(b_banner).unwrap();
    banner
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut greeting = [0u8; 12];
    banner.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 banner\r\n");
    banner.write_all(b"then echo").unwrap();
    let mut reply = [0u8; 9];
    banner.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"then echo");
    drop(banner);

    // A plaintext client outside the mesh is refused by b's STRICT port, on either family
    // (at most a TLS alert comes back, never the application's echo).
    for to in [socket(b.v4, 9000), socket(b.v6, 9000)] {
        let mut plain = outsider.connect(to).unwrap();
        let _ = plain.write_all(b"let me in");
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer);
        assert!(
            !answer.windows(9).any(|w| w == b"let me in"),
            "plaintext reached b's application through a STRICT port ({to})"
        );
    }
    let (_, b_metrics) = admin(&b, "/metrics");
    assert!(
        metric(
            &b_metrics,
            "tern_errors_total{listener=\"inbound:9000\",flag=\"TLS\"}"
        ) >= 2.0,
        "{b_metrics}"
    );

    // Outside the mesh: allow-any passes through; registry-only refuses.
    let outside = socket(outsider.v4, 7000);
    assert_eq!(echo_through(&a, outside, b"out").unwrap(), b"out");
    let (_, dump) = admin(&a, "/config_dump");
    assert!(
        dump.contains(&outside.to_string()),
        "known outside the mesh: {dump}"
    );
    tests::manifests::write(
        &manifests_dir,
        "mesh.yaml",
        &manifests(&pods, "RegistryOnly"),
    );
    eventually(
        Duration::from_secs(10),
        "registry-only refuses destinations outside the mesh",
        || echo_through(&a, outside, b"out").is_err(),
    );
    // The mesh's own services still work.
    assert_eq!(echo_through(&a, b_echo, b"still").unwrap(), b"still");

    // SIGTERM drains the sidecar and it exits cleanly.
    assert!(node.terminate("a"), "a's sidecar did not exit 0 on SIGTERM");
    // Its access log has a line for the connection passed through outside the mesh, and
    // for the one refused, each naming where it was going.
    let text = std::fs::read_to_string(access_log(&node, &a)).unwrap();
    let outside_lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|line| line["upstream"] == outside.to_string())
        .collect();
    let passed = outside_lines
        .iter()
        .find(|line| line["response_flag"] == "-")
        .unwrap_or_else(|| panic!("no passthrough line in {text}"));
    assert_eq!(passed["cluster"], "intercept-passthrough", "{passed}");
    assert_eq!(passed["protocol"], "TCP", "{passed}");
    assert_eq!(passed["bytes_received"], 3, "{passed}");
    assert_eq!(passed["bytes_sent"], 3, "{passed}");
    assert!(
        outside_lines
            .iter()
            .any(|line| line["response_flag"] == "NR"),
        "no registry-only refusal in {text}"
    );
    drop(control);
}
