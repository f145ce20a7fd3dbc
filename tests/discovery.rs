//! Config distribution end to end: `tern-control` reads a manifest directory (Services,
//! EndpointSlices, Pods, HTTPRoutes) and streams each proxy its config; proxies certified by
//! the same control plane carry the traffic over mTLS.
//!
//! Route changes reach two running proxies within a second; invalid manifests are refused
//! with file, object and field, and nothing is pushed; a proxy NACKs what it cannot apply
//! and keeps its version; the control plane can die and come back, and proxies resync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tests::ca::{TestControlPlane, discovery_yaml};
use tests::client;
use tests::manifests::{self, free_port};
use tests::pki::TempDir;
use tests::simulated::{self, SimulatedProxy};
use tests::upstream::Http;
use tests::{
    BackendChoice, Proxy, admin_get, admin_status, eventually, metric, start_proxy, wait_ready,
};

const OUTBOUND: &str = "outbound:reviews.default:80";
const ACKS: &str = "tern_discovery_updates_total{result=\"ack\"}";
const NACKS: &str = "tern_discovery_updates_total{result=\"nack\"}";

/// The mesh under test: `reviews` routes to `reviews-v1` (a Pod with a sidecar) or
/// `reviews-v2` (no sidecar), by the HTTPRoute in `route.yaml`.
struct Mesh {
    dir: TempDir,
    control: TestControlPlane,
    v1: Http,
    v2: Http,
    sidecar_port: u16,
}

impl Mesh {
    fn start() -> Mesh {
        let dir = TempDir::new("manifests");
        let (v1, v2) = (Http::start("v1"), Http::start("v2"));
        let sidecar_port = free_port();
        let write = |name: &str, text: &str| manifests::write(&dir.0, name, text);
        write(
            "services.yaml",
            &[
                manifests::http_service("reviews", v1.addr.port()),
                manifests::http_service("reviews-v1", v1.addr.port()),
                manifests::http_service("reviews-v2", v2.addr.port()),
            ]
            .join("---\n"),
        );
        write(
            "endpoints.yaml",
            &[
                manifests::endpoints("reviews", "http", &[(v1.addr, Some("reviews-v1-0"))]),
                manifests::endpoints("reviews-v1", "http", &[(v1.addr, Some("reviews-v1-0"))]),
                manifests::endpoints("reviews-v2", "http", &[(v2.addr, None)]),
            ]
            .join("---\n"),
        );
        write(
            "pods.yaml",
            &manifests::pod(
                "reviews-v1-0",
                "reviews-v1",
                "reviews",
                "127.0.0.1",
                &[(v1.addr.port(), sidecar_port)],
            ),
        );
        write(
            "route.yaml",
            &manifests::route("reviews", "reviews", &[("reviews-v1", 1)]),
        );
        let control = TestControlPlane::with_manifests(Duration::from_secs(3600), &dir.0);
        Mesh {
            dir,
            control,
            v1,
            v2,
            sidecar_port,
        }
    }

    fn write(&self, name: &str, text: &str) {
        manifests::write(&self.dir.0, name, text);
    }

    /// A proxy for Pod `pod`, running as `account`, with an outbound listener for `reviews`
    /// if `client`.
    fn proxy(&self, pod: &str, account: &str, client: bool) -> Proxy {
        let identity = self.control.identity_yaml(account, account);
        let yaml = discovery_yaml(&identity, pod, client.then_some("reviews.default"));
        start_proxy(&yaml, BackendChoice::Epoll)
    }

    fn status(&self) -> controlplane::admin::Status {
        self.control.running().status()
    }
}

/// The body of `GET path` through the proxy's outbound listener.
fn get(proxy: &Proxy, path: &str) -> String {
    let address = proxy.listener_addr(OUTBOUND).expect("an outbound listener");
    let response = client::request(
        address,
        &format!("GET {path} HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n"),
    );
    format!("{} {}", response.status, response.text())
}

fn control_plane_version(proxy: &Proxy) -> u64 {
    let dump: serde_json::Value = serde_json::from_str(&admin_get(proxy, "/config_dump")).unwrap();
    dump["control_plane_version"].as_u64().unwrap_or(0)
}

fn metric_of(proxy: &Proxy, series: &str) -> f64 {
    metric(&admin_get(proxy, "/metrics"), series)
}

fn ready(mesh: &Mesh) -> (Proxy, Proxy, Proxy) {
    let sidecar = mesh.proxy("reviews-v1-0", "reviews", false);
    let a1 = mesh.proxy("a-1", "a", true);
    let a2 = mesh.proxy("a-2", "a", true);
    for proxy in [&sidecar, &a1, &a2] {
        wait_ready(proxy, Duration::from_secs(10));
    }
    (sidecar, a1, a2)
}

#[test]
fn a_route_change_in_the_manifests_moves_two_proxies_traffic_within_a_second() {
    let mesh = Mesh::start();
    let (sidecar, a1, a2) = ready(&mesh);
    // reviews-v1 is meshed: a proxy reaches it through its sidecar, over mTLS.
    for proxy in [&a1, &a2] {
        assert_eq!(get(proxy, "/x"), "200 v1 /x");
    }
    let inbound = format!("inbound:{}", mesh.v1.addr.port());
    assert_eq!(
        sidecar.listener_addr(&inbound).map(|a| a.port()),
        Some(mesh.sidecar_port)
    );
    let seen = admin_get(&sidecar, "/metrics");
    assert_eq!(
        metric(
            &seen,
            &format!(
                "tern_listener_peer_connections_total{{listener=\"inbound:{}\",peer_identity=\"{}\"}}",
                mesh.v1.addr.port(),
                TestControlPlane::spiffe_id("a")
            )
        ),
        2.0,
        "{seen}"
    );

    let before = (control_plane_version(&a1), control_plane_version(&a2));
    mesh.write(
        "route.yaml",
        &manifests::route("reviews", "reviews", &[("reviews-v2", 1)]),
    );
    let changed = Instant::now();
    eventually(
        Duration::from_secs(5),
        "both proxies to route to v2",
        || get(&a1, "/y") == "200 v2 /y" && get(&a2, "/y") == "200 v2 /y",
    );
    let took = changed.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the change took {took:?} to reach both proxies"
    );
    assert!(control_plane_version(&a1) > before.0 && control_plane_version(&a2) > before.1);
    assert_eq!(
        mesh.v2.requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );

    // A split sends each backend a share.
    mesh.write(
        "route.yaml",
        &manifests::route(
            "reviews",
            "reviews",
            &[("reviews-v1", 1), ("reviews-v2", 1)],
        ),
    );
    let mut seen = std::collections::BTreeSet::new();
    eventually(Duration::from_secs(5), "both backends to answer", || {
        seen.insert(get(&a1, "/z"));
        seen.len() == 2
    });
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["200 v1 /z", "200 v2 /z"]
    );

    // The sidecar's own config did not change with the route: it was not pushed to.
    let status = mesh.status();
    let sidecar_status = status
        .proxies
        .iter()
        .find(|p| p.workload == "default/reviews-v1-0")
        .unwrap();
    assert_eq!(sidecar_status.sent_version, sidecar_status.applied_version);
    assert_eq!(
        metric_of(&sidecar, ACKS),
        1.0,
        "one config, never re-pushed"
    );
    assert_eq!(metric_of(&a1, ACKS), 3.0);
}

/// An AuthorizationPolicy written beside the manifests reaches the sidecar of the Pod its
/// Service targets: the callers it names keep their traffic, any other meshed caller is
/// answered 403 by the Pod's sidecar, and removing the policy lets everyone in again.
#[test]
fn an_authorization_policy_lets_in_only_the_callers_it_names() {
    let mesh = Mesh::start();
    let sidecar = mesh.proxy("reviews-v1-0", "reviews", false);
    let a = mesh.proxy("a-1", "a", true);
    let b = mesh.proxy("b-1", "b", true);
    for proxy in [&sidecar, &a, &b] {
        wait_ready(proxy, Duration::from_secs(10));
    }
    assert_eq!(get(&b, "/open"), "200 v1 /open");
    let policy = format!(
        "apiVersion: tern.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: only-a, namespace: default }}\nspec:\n  targetRef: {{ kind: Service, name: reviews-v1 }}\n  from: [{{ identities: [\"{}\"] }}]\n",
        TestControlPlane::spiffe_id("a")
    );
    mesh.write("policy.yaml", &policy);
    eventually(Duration::from_secs(5), "b to be refused", || {
        get(&b, "/closed").starts_with("403")
    });
    // Every time, on either of b's workers: no connection opened before the policy still
    // gets through.
    for i in 0..8 {
        let answer = get(&b, &format!("/closed/{i}"));
        assert_eq!(answer, "403 Forbidden\n");
    }
    assert_eq!(get(&a, "/still"), "200 v1 /still");
    assert!(
        metric_of(
            &sidecar,
            &format!(
                "tern_errors_total{{listener=\"inbound:{}\",flag=\"RBAC\"}}",
                mesh.v1.addr.port()
            )
        ) >= 1.0
    );
    std::fs::remove_file(mesh.dir.0.join("policy.yaml")).unwrap();
    eventually(Duration::from_secs(5), "b to be let in again", || {
        get(&b, "/again") == "200 v1 /again"
    });
    // A policy with `to` lets b make the requests it names only.
    let some = format!("{policy}  to: [{{ methods: [GET], paths: [\"/open/*\"] }}]\n").replace(
        &TestControlPlane::spiffe_id("a"),
        &TestControlPlane::spiffe_id("b"),
    );
    mesh.write("policy.yaml", &some);
    eventually(Duration::from_secs(5), "b to be refused elsewhere", || {
        get(&b, "/closed").starts_with("403")
    });
    assert_eq!(get(&b, "/open/door"), "200 v1 /open/door");
    assert_eq!(get(&a, "/open/door"), "403 Forbidden\n");
}

/// A RateLimitPolicy written beside the manifests reaches the sidecar of the Pod its Service
/// targets: a caller over its cap is answered 429 on any of its connections, a caller an
/// override names keeps its own, and removing the policy lifts the cap.
#[test]
fn a_rate_limit_policy_caps_each_callers_requests() {
    let mesh = Mesh::start();
    let sidecar = mesh.proxy("reviews-v1-0", "reviews", false);
    let a = mesh.proxy("a-1", "a", true);
    let b = mesh.proxy("b-1", "b", true);
    for proxy in [&sidecar, &a, &b] {
        wait_ready(proxy, Duration::from_secs(10));
    }
    let policy = format!(
        "apiVersion: tern.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{ name: slow, namespace: default }}\nspec:\n  targetRef: {{ kind: Service, name: reviews-v1 }}\n  identity: {{ requestsPerSecond: 1 }}\n  overrides: [{{ requestsPerSecond: 1000, identities: [\"{}\"] }}]\n",
        TestControlPlane::spiffe_id("a")
    );
    mesh.write("limit.yaml", &policy);
    eventually(Duration::from_secs(5), "b to be limited", || {
        get(&b, "/busy").starts_with("429")
    });
    for i in 0..10 {
        assert_eq!(get(&a, &format!("/a/{i}")), format!("200 v1 /a/{i}"));
    }
    let limited = format!(
        "tern_errors_total{{listener=\"inbound:{}\",flag=\"RL\"}}",
        mesh.v1.addr.port()
    );
    assert!(metric_of(&sidecar, &limited) >= 1.0);
    std::fs::remove_file(mesh.dir.0.join("limit.yaml")).unwrap();
    eventually(
        Duration::from_secs(5),
        "b to be served in full again",
        || (0..5).all(|i| get(&b, &format!("/free/{i}")) == format!("200 v1 /free/{i}")),
    );
}

/// An HTTPRoute's method, exact path and query matches, its header modifiers and a redirect
/// reach a caller's proxy: the matching request goes to the rule's backend with its headers
/// changed both ways; a request under the redirect's prefix is answered 302; the rest take
/// the last rule, unchanged.
#[test]
fn a_route_s_matches_and_header_filters_reach_the_callers_proxy() {
    let mesh = Mesh::start();
    let sidecar = mesh.proxy("reviews-v1-0", "reviews", false);
    let a = mesh.proxy("a-1", "a", true);
    for proxy in [&sidecar, &a] {
        wait_ready(proxy, Duration::from_secs(10));
    }
    mesh.write(
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: reviews, namespace: default }\nspec:\n  \
         parentRefs: [{ kind: Service, group: \"\", name: reviews, port: 80 }]\n  rules:\n    \
         - matches: [{ path: { type: Exact, value: /headers }, method: GET, queryParams: [{ name: v, value: \"2\" }] }]\n      \
         filters:\n        \
         - { type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: x-env, value: prod }], remove: [x-debug] } }\n        \
         - { type: ResponseHeaderModifier, responseHeaderModifier: { remove: [x-upstream-debug] } }\n      \
         backendRefs: [{ name: reviews-v2, port: 80 }]\n    \
         - matches: [{ path: { value: /old } }]\n      \
         filters: [{ type: RequestRedirect, requestRedirect: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /new } } }]\n    \
         - backendRefs: [{ name: reviews-v1, port: 80 }]\n",
    );
    let address = a.listener_addr(OUTBOUND).expect("an outbound listener");
    let send = |method: &str, target: &str| {
        client::request(
            address,
            &format!(
                "{method} {target} HTTP/1.1\r\nHost: reviews\r\nX-Debug: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    eventually(
        Duration::from_secs(5),
        "the route to reach the proxy",
        || send("GET", "/headers?v=2").text().starts_with("v2\n"),
    );
    let matched = send("GET", "/headers?v=2");
    let seen = matched.text();
    assert!(
        seen.contains("x-env: prod\n") && !seen.contains("x-debug"),
        "{seen}"
    );
    assert_eq!(matched.header("x-upstream-debug"), None);
    assert_eq!(matched.header("server"), Some("v2"));
    for (method, target) in [
        ("GET", "/headers?v=3"),
        ("POST", "/headers?v=2"),
        ("GET", "/headers/x?v=2"),
    ] {
        let other = send(method, target);
        let seen = other.text();
        assert!(seen.starts_with("v1\n"), "{method} {target}: {seen}");
        assert!(
            seen.contains("x-debug: 1\n") && !seen.contains("x-env"),
            "{seen}"
        );
        assert_eq!(other.header("x-upstream-debug"), Some("1"));
    }
    let moved = send("GET", "/old/x?y=1");
    assert_eq!(moved.status, 302);
    assert_eq!(moved.header("location"), Some("http://reviews/new/x?y=1"));
}

#[test]
fn invalid_manifests_are_refused_with_the_field_named_and_nothing_is_pushed() {
    let mesh = Mesh::start();
    let (_sidecar, a1, _a2) = ready(&mesh);
    assert_eq!(get(&a1, "/"), "200 v1 /");
    let version = control_plane_version(&a1);
    let generation = mesh.status().generation;

    // An unknown backend, then weights adding up to zero, then YAML that does not parse:
    // each is refused, says where, and the route in use stays.
    let cases = [
        (
            manifests::route("reviews", "reviews", &[("nope", 1)]),
            "HTTPRoute default/reviews: spec.rules[0].backendRefs[0].name: unknown backend Service default/nope",
        ),
        (
            manifests::route(
                "reviews",
                "reviews",
                &[("reviews-v2", 0), ("reviews-v1", 0)],
            ),
            "spec.rules[0].backendRefs: the weights add up to zero",
        ),
        (
            "kind: HTTPRoute\nmetadata: [\n".to_owned(),
            "not valid YAML",
        ),
        (
            manifests::route("reviews", "reviews", &[("reviews-v2", 1)])
                .replace("port: 80, weight", "port: eighty, weight"),
            "spec.rules[0].backendRefs[0].port",
        ),
    ];
    for (text, expected) in cases {
        mesh.write("route.yaml", &text);
        eventually(Duration::from_secs(5), expected, || {
            mesh.status()
                .problems
                .iter()
                .any(|p| p.contains(expected) && p.contains("route.yaml"))
        });
        let problems = mesh.status().problems;
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(
            mesh.status().generation,
            generation,
            "nothing accepted changed"
        );
        assert_eq!(get(&a1, "/"), "200 v1 /");
        assert_eq!(control_plane_version(&a1), version, "nothing was pushed");
    }

    // A fix is taken at once and the problem goes away.
    mesh.write(
        "route.yaml",
        &manifests::route("reviews", "reviews", &[("reviews-v2", 1)]),
    );
    eventually(Duration::from_secs(5), "the fixed route", || {
        get(&a1, "/") == "200 v2 /"
    });
    assert!(mesh.status().problems.is_empty());
}

#[test]
fn a_proxy_nacks_a_config_it_cannot_apply_and_keeps_its_version() {
    let mesh = Mesh::start();
    let (sidecar, a1, _a2) = ready(&mesh);
    let version = control_plane_version(&sidecar);

    // Move the sidecar's inbound port onto one that is taken: it cannot bind, so it refuses.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let app = mesh.v1.addr.port();
    mesh.write(
        "pods.yaml",
        &manifests::pod(
            "reviews-v1-0",
            "reviews-v1",
            "reviews",
            "127.0.0.1",
            &[(app, taken_port)],
        ),
    );
    eventually(Duration::from_secs(5), "a NACK", || {
        metric_of(&sidecar, NACKS) == 1.0
    });
    assert_eq!(
        control_plane_version(&sidecar),
        version,
        "the old version runs on"
    );
    let status = mesh.status();
    // `ternctl status` shows it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let table = status.render(now);
    for expected in [
        "default/reviews-v1-0",
        "(behind)",
        "last NACK, of version",
        "default/a-1",
        "spiffe://mesh.test/ns/default/sa/a",
    ] {
        assert!(table.contains(expected), "{expected} missing from\n{table}");
    }
    assert!(
        table.contains(" in 1h") || table.contains(" in 59m"),
        "certificate expiry in\n{table}"
    );
    let nack = status.last_nack.expect("the NACK is visible");
    assert_eq!(nack.workload, "default/reviews-v1-0");
    assert!(
        nack.reason.contains(&format!("127.0.0.1:{taken_port}")),
        "{}",
        nack.reason
    );
    let entry = status
        .proxies
        .iter()
        .find(|p| p.workload == "default/reviews-v1-0")
        .unwrap();
    assert_eq!(entry.applied_version, version);
    assert!(entry.sent_version > version);
    // (The control plane offers it again with backoff, so a retry may be in flight.)
    let nacked = entry.last_nack.as_ref().unwrap().version;
    assert!(nacked > version && nacked <= entry.sent_version);
    // The sidecar still listens where it did.
    assert_eq!(
        sidecar
            .listener_addr(&format!("inbound:{app}"))
            .map(|a| a.port()),
        Some(mesh.sidecar_port)
    );
    // Once the port is free again and the manifest fixed, the next config goes through.
    drop(taken);
    mesh.write(
        "pods.yaml",
        &manifests::pod(
            "reviews-v1-0",
            "reviews-v1",
            "reviews",
            "127.0.0.1",
            &[(app, mesh.sidecar_port)],
        ),
    );
    // Every proxy applies it: a1 too, which took the taken port for the sidecar's.
    eventually(Duration::from_secs(5), "the fixed config", || {
        let proxies = mesh.status().proxies;
        let sidecar = proxies
            .iter()
            .find(|p| p.workload == "default/reviews-v1-0")
            .unwrap();
        sidecar.applied_version > version
            && proxies.iter().all(|p| p.applied_version == p.sent_version)
    });
    assert_eq!(get(&a1, "/again"), "200 v1 /again");
}

#[test]
fn traffic_flows_while_the_control_plane_is_down_and_proxies_resync_when_it_returns() {
    let mut mesh = Mesh::start();
    let (_sidecar, a1, _a2) = ready(&mesh);
    assert_eq!(get(&a1, "/"), "200 v1 /");

    mesh.control.stop();
    eventually(Duration::from_secs(5), "the stream to drop", || {
        metric_of(&a1, "tern_discovery_connected") == 0.0
    });
    for _ in 0..10 {
        assert_eq!(
            get(&a1, "/"),
            "200 v1 /",
            "the last good config keeps serving"
        );
    }
    let (status, _) = admin_status(&a1, "/ready");
    assert_eq!(
        status, 200,
        "a proxy with a config stays ready without its control plane"
    );

    // The proxies' tokens go (as expired ones would): they prove who they are with their
    // certificates when the control plane comes back.
    for entry in std::fs::read_dir(&mesh.control.dir.0).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "token") {
            std::fs::remove_file(path).unwrap();
        }
    }
    // Changed while the control plane was down; it reads it when it comes back.
    mesh.write(
        "route.yaml",
        &manifests::route("reviews", "reviews", &[("reviews-v2", 1)]),
    );
    mesh.control.restart();
    eventually(Duration::from_secs(10), "the resync", || {
        get(&a1, "/") == "200 v2 /"
    });
    assert_eq!(metric_of(&a1, "tern_discovery_connected"), 1.0);
}

#[test]
fn a_proxy_waits_for_its_config_and_cannot_read_another_namespaces() {
    let mesh = Mesh::start();
    // A proxy in namespace `default` asking as a workload of namespace `other` is refused.
    let yaml = format!(
        "{}discovery:\n  workload: {{ namespace: other, name: x-0 }}\n",
        mesh.control.identity_yaml("a", "a")
    );
    let intruder = start_proxy(&yaml, BackendChoice::Epoll);
    eventually(Duration::from_secs(5), "the refusal", || {
        mesh.control.running().status().proxies.is_empty()
            && admin_status(&intruder, "/ready")
                .1
                .contains("waiting for a config from tern-control")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(admin_status(&intruder, "/ready").0, 503);
    assert!(mesh.status().proxies.is_empty());
}

#[test]
fn many_proxies_connecting_at_once_all_converge() {
    const PROXIES: usize = 200;
    let mesh = Mesh::start();
    let token = std::fs::read_to_string(mesh.control.write_token("a", "a")).unwrap();
    let root = std::fs::read_to_string(mesh.control.dir.0.join("state/ca.crt")).unwrap();
    let address = mesh.control.address;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let has = |config: &shared::api::discovery::ProxyConfig, cluster: &str| {
        config.clusters.iter().any(|c| c.name == cluster)
    };
    let first = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    runtime.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(simulated::channel(address, &root).await.unwrap());
        }
        for i in 0..PROXIES {
            let hello = simulated::hello(
                &TestControlPlane::spiffe_id("a"),
                &token,
                &format!("sim-{i}"),
                &["reviews".to_owned()],
            );
            let channel = channels[i % channels.len()].clone();
            let first = first.clone();
            tasks.spawn(async move {
                let mut proxy = SimulatedProxy::connect(channel, hello).await.unwrap();
                let config = proxy.next().await.unwrap().unwrap();
                assert!(has(&config, "outbound:reviews-v1.default:80"));
                first.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                loop {
                    let config = proxy.next().await.unwrap().expect("the stream stays open");
                    if has(&config, "outbound:reviews-v2.default:80") {
                        return config.version;
                    }
                }
            });
        }
    });
    eventually(
        Duration::from_secs(20),
        "every proxy's first config",
        || first.load(std::sync::atomic::Ordering::SeqCst) == PROXIES,
    );
    eventually(Duration::from_secs(5), "every ACK", || {
        let status = mesh.status();
        status.proxies.len() == PROXIES
            && status
                .proxies
                .iter()
                .all(|p| p.applied_version == p.sent_version)
    });

    mesh.write(
        "route.yaml",
        &manifests::route("reviews", "reviews", &[("reviews-v2", 1)]),
    );
    let versions = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), tasks.join_all())
            .await
            .expect("every proxy converges")
    });
    assert_eq!(versions.len(), PROXIES);
    eventually(Duration::from_secs(5), "every ACK of the change", || {
        let status = mesh.status();
        status
            .proxies
            .iter()
            .all(|p| p.applied_version == p.sent_version && versions.contains(&p.applied_version))
    });
}

#[test]
fn a_nacked_config_is_offered_again_and_lands_once_its_cause_passes() {
    let mesh = Mesh::start();
    let (sidecar, _a1, _a2) = ready(&mesh);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let app = mesh.v1.addr.port();
    mesh.write(
        "pods.yaml",
        &manifests::pod(
            "reviews-v1-0",
            "reviews-v1",
            "reviews",
            "127.0.0.1",
            &[(app, taken_port)],
        ),
    );
    eventually(Duration::from_secs(5), "a NACK", || {
        metric_of(&sidecar, NACKS) >= 1.0
    });
    // The port frees up; nothing in the manifests changes. The control plane's retry lands.
    drop(taken);
    // Retries back off (1 s doubling): allow several.
    eventually(
        Duration::from_secs(40),
        "the retried config to go live",
        || {
            sidecar
                .listener_addr(&format!("inbound:{app}"))
                .map(|a| a.port())
                == Some(taken_port)
        },
    );
    // The proxy applies, then ACKs: the control plane records the ACK a moment later.
    eventually(Duration::from_secs(5), "the retried config ACKed", || {
        let status = mesh.status();
        status
            .proxies
            .iter()
            .find(|p| p.workload == "default/reviews-v1-0")
            .is_some_and(|entry| entry.applied_version == entry.sent_version)
    });
}

#[test]
fn a_control_plane_with_no_manifests_serves_one_stream_per_proxy_that_stays() {
    // `tern-control serve` with no --manifests and no --kubernetes: empty configs.
    let control = TestControlPlane::start(Duration::from_secs(3600));
    let yaml = discovery_yaml(&control.identity_yaml("a", "a"), "a-0", None);
    let proxy = start_proxy(&yaml, BackendChoice::Epoll);
    wait_ready(&proxy, Duration::from_secs(10));
    // Its one config, acknowledged once, on a stream that stays up (it was ended after
    // every push, and the proxy came back for the same config again and again).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(metric_of(&proxy, ACKS), 1.0);
    assert_eq!(metric_of(&proxy, "tern_discovery_connected"), 1.0);
    let proxies = control.running().status().proxies;
    assert_eq!(proxies.len(), 1, "{proxies:?}");
}

#[test]
fn a_stream_ends_when_what_proved_it_expires_and_the_proxy_proves_itself_again() {
    // Certificates of 6 s: a stream (first proven by the token, then by a certificate)
    // lasts 6 s at most.
    let control = TestControlPlane::start(Duration::from_secs(6));
    let yaml = discovery_yaml(&control.identity_yaml("a", "a"), "a-0", None);
    let proxy = start_proxy(&yaml, BackendChoice::Epoll);
    wait_ready(&proxy, Duration::from_secs(10));
    let connected_at = || {
        let proxies = control.running().status().proxies;
        proxies.first().map(|p| p.connected_at)
    };
    let first = connected_at().expect("connected");
    eventually(Duration::from_secs(15), "a new stream", || {
        connected_at().is_some_and(|at| at > first + 2)
    });
    // The proxy came back at once and runs on.
    eventually(Duration::from_secs(5), "connected again", || {
        metric_of(&proxy, "tern_discovery_connected") == 1.0
    });
    assert_eq!(admin_status(&proxy, "/ready").0, 200);
}

#[test]
fn a_proxy_whose_streams_are_refused_backs_off() {
    let control = TestControlPlane::start(Duration::from_secs(3600));
    // A token this CA did not issue: each stream is refused (UNAUTHENTICATED) at its open.
    let token = control.dir.0.join("forged.token");
    std::fs::write(&token, "tern2.YQ.9999999999.Zm9yZ2Vk").unwrap();
    let yaml = discovery_yaml(&control.identity_yaml_with("a", &token), "a-0", None);
    let _proxy = start_proxy(&yaml, BackendChoice::Epoll);
    let refused = || {
        let admin = control.running().admin_address().unwrap();
        let metrics = client::request(admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").text();
        metric(&metrics, "tern_control_streams_refused_total")
    };
    eventually(Duration::from_secs(5), "a refusal", || refused() >= 1.0);
    std::thread::sleep(Duration::from_secs(2));
    // With backoff (0.25 s, doubling) a handful in two seconds, not a loop.
    let count = refused();
    assert!(count <= 8.0, "{count} streams refused");
}
