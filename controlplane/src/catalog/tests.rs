use super::source::parse_file;
use super::*;
use crate::translate::{ProxyRequest, translate};
use shared::config::{Outbound, Protocol, RetryOn, TlsMode};

const TRUST_DOMAIN: &str = "mesh.test";

const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: cart, namespace: shop }
spec:
  selector: { app: cart }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: v1
kind: Service
metadata: { name: cart-v2, namespace: shop }
spec:
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: v1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  ports: [{ name: pg, port: 5432 }]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: cart-a, namespace: shop, labels: { kubernetes.io/service-name: cart } }
addressType: IPv4
ports: [{ name: http, port: 8080 }]
endpoints:
  - addresses: ["10.0.0.1"]
    targetRef: { kind: Pod, name: cart-0 }
  - addresses: ["10.0.0.9"]
    conditions: { ready: false }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: db-a, namespace: shop, labels: { kubernetes.io/service-name: db } }
addressType: IPv4
ports: [{ name: pg, port: 5432 }]
endpoints:
  - addresses: ["10.0.0.5"]
---
apiVersion: v1
kind: Pod
metadata:
  name: cart-0
  namespace: shop
  labels: { app: cart }
  annotations: { tern.dev/inbound-ports: "8080=15080" }
spec: { serviceAccountName: cart, containers: [] }
status: { podIP: 10.0.0.1 }
"#;

fn declared(files: &[(&str, &str)]) -> Declared {
    let mut declared = Declared::default();
    for (file, text) in files {
        parse_file(file, text, &mut declared);
    }
    declared
}

fn build(files: &[(&str, &str)]) -> Catalog {
    Catalog::build(declared(files), &Catalog::empty(TRUST_DOMAIN))
}

fn route(name: &str, body: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  parentRefs: [{{ kind: Service, name: cart, port: 80 }}]\n{body}"
    )
}

/// The one problem of a catalog, as text.
fn problem(catalog: &Catalog) -> String {
    assert_eq!(catalog.problems.len(), 1, "{:#?}", catalog.problems);
    catalog.problems[0].to_string()
}

#[test]
fn a_valid_mesh_is_accepted_whole() {
    let catalog = build(&[("base.yaml", BASE)]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    assert_eq!(catalog.len(), 6);
    assert_eq!(catalog.generation, 1);
    let workload = catalog.workload("shop", "cart-0").unwrap();
    assert_eq!(workload.inbound.get(&8080), Some(&15080));
    assert_eq!(workload.service_account, "cart");
}

#[test]
fn parse_errors_name_the_file_document_and_field() {
    let cases = [
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: { name: x }\n",
            "kind: `v1` `ConfigMap` is not a kind Tern reads",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: { name: x }\nspec:\n  ports: [{ port: eighty }]\n",
            "spec.ports[0].port: invalid type",
        ),
        (
            &route(
                "r",
                "  rules: [{ backendRefs: [{ name: cart, port: 80, weight: -1 }] }]\n",
            ),
            "spec.rules[0].backendRefs[0].weight",
        ),
        (&route("r", "  rulez: []\n"), "unknown field `rulez`"),
        ("kind: [\n", "not valid YAML"),
    ];
    for (text, expected) in cases {
        let declared = declared(&[("bad.yaml", text)]);
        assert_eq!(declared.problems.len(), 1, "{text}");
        let shown = declared.problems[0].to_string();
        assert!(shown.starts_with("bad.yaml (document 1): "), "{shown}");
        assert!(
            shown.contains(expected),
            "{shown} should contain {expected}"
        );
        // A kind Tern does not read is reported, but does not freeze the file.
        let other_kind = expected.starts_with("kind:");
        assert_eq!(
            declared.broken_files.contains("bad.yaml"),
            !other_kind,
            "{shown}"
        );
    }
}

#[test]
fn objects_are_checked_against_each_other_and_refusals_name_the_field() {
    let cases: Vec<(String, &str)> = vec![
        (
            route("r", "  rules: [{ backendRefs: [{ name: nope, port: 80 }] }]\n"),
            "HTTPRoute shop/r: spec.rules[0].backendRefs[0].name: unknown backend Service shop/nope",
        ),
        (
            route("r", "  rules: [{ backendRefs: [{ name: cart, port: 81 }] }]\n"),
            "spec.rules[0].backendRefs[0].port: Service shop/cart has no port 81",
        ),
        (
            route("r", "  rules: [{ backendRefs: [{ name: cart, port: 80, weight: 0 }, { name: cart-v2, port: 80, weight: 0 }] }]\n"),
            "spec.rules[0].backendRefs: the weights add up to zero",
        ),
        (
            route("r", "  rules: [{ matches: [{ path: { type: RegularExpression, value: \"/a(.*\" } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].matches[0].path.value: `/a(.*` is not a regular expression",
        ),
        (
            route("r", "  rules: [{ matches: [{ headers: [{ type: RegularExpression, name: x, value: \"y[\" }] }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].matches[0].headers[0].value: `y[` is not a regular expression",
        ),
        (
            route("r", "  rules: [{ matches: [{ headers: [{ name: \"bad name\", value: y }] }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].matches[0].headers[0].name: the name must be an HTTP header name",
        ),
        (
            route("r", "  rules: [{ matches: [{ queryParams: [{ type: Prefix, name: x, value: y }] }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].matches[0].queryParams[0].type: unknown type `Prefix`",
        ),
        (
            route("r", "  rules: [{ matches: [{ method: \"G T\" }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].matches[0].method: must be an HTTP method",
        ),
        (
            route("r", "  rules: [{ matches: [{ path: { type: Exact, value: \"/a?b\" } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].matches[0].path.value: must be a path alone",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: cart, port: 80 } } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].filters[0].type: `RequestMirror` is not supported yet",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: RequestRedirect, requestRedirect: { statusCode: 301 } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].backendRefs: a rule that redirects sends nothing to backends",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: RequestRedirect, requestRedirect: { statusCode: 304 } }] }]\n"),
            "spec.rules[0].filters[0].requestRedirect.statusCode: must be 301, 302, 303, 307 or 308",
        ),
        (
            route("r", "  rules: [{ matches: [{ path: { type: Exact, value: /a } }], filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /b } } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].filters[0].urlRewrite.path: a prefix replacement needs a path prefix match",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplaceFullPath, replacePrefixMatch: /b } } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath: is required for type ReplaceFullPath",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: RequestRedirect, requestRedirect: { scheme: https } }, { type: URLRewrite, urlRewrite: { hostname: b } }] }]\n"),
            "spec.rules[0].filters: a rule that redirects answers itself",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: RequestHeaderModifier }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].filters[0].requestHeaderModifier: is required for type RequestHeaderModifier",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { remove: [a] }, responseHeaderModifier: { remove: [b] } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].filters[0].type: a RequestHeaderModifier filter sets only `requestHeaderModifier`",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: ResponseHeaderModifier, responseHeaderModifier: { remove: [a] } }, { type: ResponseHeaderModifier, responseHeaderModifier: { remove: [b] } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].filters[1].type: a rule takes one ResponseHeaderModifier filter",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: Host, value: evil }] } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].filters[0].requestHeaderModifier.set[0]: framing, connection and host headers cannot be changed",
        ),
        (
            route("r", "  rules: [{ filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { add: [{ name: x-a, value: \"a\\nb\" }] } }], backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].filters[0].requestHeaderModifier.add[0]: the value must not hold line breaks",
        ),
        (
            route("r", "  rules: [{ backendRefs: [{ name: cart, port: 80, filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { remove: [a] } }] }] }]\n"),
            "spec.rules[0].backendRefs[0].filters: filters on a backend are not supported yet",
        ),
        (
            route("r", "  rules: [{ timeouts: { request: soon }, backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].timeouts.request: `soon` is not a duration",
        ),
        (
            route("r", "  rules: [{ backendRefs: [{ name: cart, port: 80 }] }]\n").replace("name: cart, port: 80 }]\n  rules", "name: gone, port: 80 }]\n  rules"),
            "spec.parentRefs[0].name: unknown Service shop/gone",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: { name: p, namespace: shop, annotations: { tern.dev/inbound-ports: \"8080:15080\" } }\nspec: { containers: [] }\nstatus: { podIP: 10.0.0.2 }\n".into(),
            "metadata.annotations[\"tern.dev/inbound-ports\"]: `8080:15080` is not `<app port>=<sidecar port>`",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: { name: s, namespace: shop }\naddressType: IPv4\nendpoints: []\n".into(),
            "metadata.labels[\"kubernetes.io/service-name\"]: names the Service and is required",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: { name: s, namespace: shop, labels: { kubernetes.io/service-name: cart } }\naddressType: IPv4\nendpoints: [{ addresses: [\"::1\"] }]\n".into(),
            "endpoints[0].addresses[0]: `::1` is not an IPv4 address",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: { name: two, namespace: shop }\nspec:\n  ports: [{ name: a, port: 80 }, { name: b, port: 80 }]\n".into(),
            "spec.ports[1].port: port 80 is listed twice",
        ),
        (
            "apiVersion: tern.dev/v1alpha1\nkind: Mesh\nmetadata: { name: default }\nspec: { trustDomain: other.test }\n".into(),
            "spec.trustDomain: `other.test` is not the CA's trust domain `mesh.test`",
        ),
        (
            "apiVersion: tern.dev/v1alpha1\nkind: BackendPolicy\nmetadata: { name: b, namespace: shop }\nspec: { targetRef: { kind: Service, name: nope } }\n".into(),
            "spec.targetRef.name: unknown Service shop/nope",
        ),
    ];
    for (text, expected) in cases {
        let catalog = build(&[("base.yaml", BASE), ("new.yaml", &text)]);
        let shown = problem(&catalog);
        assert!(shown.starts_with("new.yaml (document 1): "), "{shown}");
        assert!(
            shown.contains(expected),
            "{shown}\nshould contain\n{expected}"
        );
        assert_eq!(catalog.len(), 6, "nothing else is affected");
    }
}

#[test]
fn the_first_of_two_conflicting_routes_keeps_the_path_and_a_duplicate_is_refused() {
    let a = route(
        "a",
        "  rules: [{ backendRefs: [{ name: cart, port: 80 }] }]\n",
    );
    let b = route(
        "b",
        "  rules: [{ matches: [{ path: { value: / } }], backendRefs: [{ name: cart-v2, port: 80 }] }]\n",
    );
    let catalog = build(&[("base.yaml", BASE), ("a.yaml", &a), ("b.yaml", &b)]);
    let shown = problem(&catalog);
    assert!(
        shown.contains("HTTPRoute shop/b: spec.rules[0].matches: conflicts with HTTPRoute shop/a"),
        "{shown}"
    );

    let catalog = build(&[("base.yaml", BASE), ("a.yaml", &a), ("copy.yaml", &a)]);
    assert!(problem(&catalog).contains("HTTPRoute shop/a is already declared in a.yaml"));
}

#[test]
fn a_refused_edit_keeps_the_previous_version_and_a_broken_file_keeps_its_objects() {
    let good = route(
        "r",
        "  rules: [{ backendRefs: [{ name: cart-v2, port: 80 }] }]\n",
    );
    let first = build(&[("base.yaml", BASE), ("route.yaml", &good)]);
    assert!(first.problems.is_empty());

    let bad = route(
        "r",
        "  rules: [{ backendRefs: [{ name: nope, port: 80 }] }]\n",
    );
    let second = Catalog::build(
        declared(&[("base.yaml", BASE), ("route.yaml", &bad)]),
        &first,
    );
    assert!(second.problems[0].kept_previous);
    assert!(problem(&second).ends_with("(its previous version stays in use)"));
    assert_eq!(second.routes, first.routes);
    assert_eq!(
        second.generation, first.generation,
        "nothing accepted changed"
    );

    let third = Catalog::build(
        declared(&[("base.yaml", "kind: [\n"), ("route.yaml", &good)]),
        &second,
    );
    assert_eq!(third.len(), first.len(), "the broken file's objects stay");
    assert_eq!(third.generation, first.generation);

    // Deleting a file does remove its objects.
    let fourth = Catalog::build(declared(&[("base.yaml", BASE)]), &third);
    assert!(fourth.routes.is_empty());
    assert_eq!(fourth.generation, first.generation + 1);
}

#[test]
fn mtls_mode_comes_from_the_most_specific_policy_then_the_mesh() {
    let policies = r#"
apiVersion: tern.dev/v1alpha1
kind: Mesh
metadata: { name: default }
spec: { trustDomain: mesh.test, mtls: Permissive }
---
apiVersion: tern.dev/v1alpha1
kind: MTLSPolicy
metadata: { name: namespace-wide, namespace: shop }
spec: { mode: Disable }
---
apiVersion: tern.dev/v1alpha1
kind: MTLSPolicy
metadata: { name: cart, namespace: shop }
spec:
  selector: { matchLabels: { app: cart } }
  mode: Strict
  ports: [{ port: 9090, mode: Permissive }]
"#;
    let catalog = build(&[("base.yaml", BASE), ("policies.yaml", policies)]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let cart = catalog.workload("shop", "cart-0").unwrap().clone();
    assert_eq!(catalog.mtls_mode(&cart, 8080), MtlsMode::Strict);
    assert_eq!(catalog.mtls_mode(&cart, 9090), MtlsMode::Permissive);
    let mut other = cart.clone();
    other.labels.clear();
    assert_eq!(catalog.mtls_mode(&other, 8080), MtlsMode::Disable);
    other.namespace = "elsewhere".into();
    assert_eq!(
        catalog.mtls_mode(&other, 8080),
        MtlsMode::Permissive,
        "the Mesh's default"
    );
}

/// A translated config validates as the proxy will check it (given an identity of its own).
fn assert_validates(config: &shared::Config) {
    let mut full = config.clone();
    full.identity = Some(shared::config::IdentitySource::Files(
        shared::config::IdentityFiles {
            cert: "c".into(),
            key: "k".into(),
            trust_bundle: "b".into(),
        },
    ));
    full.validate().expect("a translated config validates");
}

fn request(pod: &str, account: &str, outbound: &[(&str, u16)]) -> ProxyRequest {
    ProxyRequest {
        identity: format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{account}")
            .parse()
            .unwrap(),
        namespace: "shop".into(),
        workload: pod.into(),
        outbound: outbound
            .iter()
            .map(|(service, port)| Outbound {
                service: (*service).into(),
                port: *port,
                listen: "127.0.0.1:0".parse().unwrap(),
            })
            .collect(),
        destinations: Vec::new(),
    }
}

#[test]
fn a_proxy_gets_its_inbound_ports_and_only_the_destinations_it_asked_for() {
    let split = route(
        "split",
        "  rules:\n    - matches: [{ path: { value: /v2 } }]\n      timeouts: { request: 750ms }\n      backendRefs: [{ name: cart-v2, port: 80, weight: 9 }, { name: cart, port: 80, weight: 1 }]\n",
    );
    let catalog = build(&[("base.yaml", BASE), ("route.yaml", &split)]);

    // The cart Pod's own sidecar: one inbound listener, HTTP because the Service port is.
    let cart = translate(&catalog, &request("cart-0", "cart", &[]));
    assert_eq!(cart.config.listeners.len(), 1);
    let inbound = &cart.config.listeners[0];
    assert_eq!(inbound.address, "10.0.0.1:15080".parse().unwrap());
    assert_eq!(inbound.protocol, Protocol::Http);
    assert_eq!(inbound.tls.as_ref().unwrap().mode, TlsMode::Strict);
    assert_eq!(
        cart.config.clusters[0].endpoints,
        ["10.0.0.1:8080".parse().unwrap()]
    );

    // A client of cart and db: HTTP routes for cart (the split), opaque TCP for db.
    let web = translate(
        &catalog,
        &request(
            "web-0",
            "web",
            &[("cart.shop", 80), ("db.shop", 5432), ("nope.shop", 80)],
        ),
    );
    assert!(
        web.notes
            .iter()
            .any(|n| n.contains("unknown Service shop/nope")),
        "{:?}",
        web.notes
    );
    let names: Vec<&str> = web
        .config
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(names, ["outbound:cart.shop:80", "outbound:db.shop:5432"]);
    let routes = &web.config.listeners[0].routes;
    assert_eq!(
        routes.len(),
        1,
        "with a route attached, unmatched paths get 404"
    );
    assert_eq!(
        routes[0].path,
        shared::config::PathMatch::Prefix("/v2".into())
    );
    assert_eq!(routes[0].timeout, std::time::Duration::from_millis(750));
    let weights: Vec<u32> = routes[0].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [9, 1]);
    let cluster = |name: &str| web.config.clusters.iter().find(|c| c.name == name).unwrap();
    // cart's one ready endpoint has a sidecar: reached through it, over mTLS.
    let cart_cluster = cluster("outbound:cart.shop:80");
    assert_eq!(cart_cluster.endpoints, ["10.0.0.1:15080".parse().unwrap()]);
    assert_eq!(
        cart_cluster.tls.as_ref().unwrap().identity.to_string(),
        "spiffe://mesh.test/ns/shop/sa/cart"
    );
    // db has no sidecar: plaintext, straight to it.
    let db = cluster("outbound:db.shop:5432");
    assert_eq!(db.endpoints, ["10.0.0.5:5432".parse().unwrap()]);
    assert!(db.tls.is_none());
    assert_eq!(web.config.listeners[1].protocol, Protocol::Tcp);
    assert_validates(&web.config);

    // A proxy that is not the Pod's service account gets no inbound listeners.
    let impostor = translate(&catalog, &request("cart-0", "web", &[]));
    assert!(impostor.config.listeners.is_empty());
    assert!(
        impostor
            .notes
            .iter()
            .any(|n| n.contains("runs as service account `cart`")),
        "{:?}",
        impostor.notes
    );
}

#[test]
fn a_backend_policy_gives_its_service_port_retries_outlier_detection_balancing_and_limits() {
    let policy = "apiVersion: tern.dev/v1alpha1\nkind: BackendPolicy\nmetadata: { name: cart, namespace: shop }\nspec:\n  targetRef: { kind: Service, name: cart, port: 80 }\n  retries: { attempts: 2, on: [ConnectFailure, GatewayError, Unavailable], perTryTimeout: 250ms, budget: { percent: 30, minPerSecond: 4 } }\n  outlierDetection: { consecutiveFailures: 3, baseEjectionTime: 45s }\n  loadBalancing: LeastRequest\n  connectionLimits: { maxConnections: 40, maxPendingRequests: 0 }\n";
    let catalog = build(&[("base.yaml", BASE), ("policy.yaml", policy)]);
    let web = translate(
        &catalog,
        &request("web-0", "web", &[("cart.shop", 80), ("db.shop", 5432)]),
    );
    let cluster = |name: &str| web.config.clusters.iter().find(|c| c.name == name).unwrap();
    let retries = cluster("outbound:cart.shop:80")
        .retries
        .clone()
        .expect("retries");
    assert_eq!(retries.attempts, 2);
    // A failed connect is always tried elsewhere: nothing to ask of the proxy.
    assert_eq!(retries.on, [RetryOn::GatewayError, RetryOn::Unavailable]);
    assert_eq!(
        retries.per_try_timeout,
        Some(std::time::Duration::from_millis(250))
    );
    assert_eq!((retries.budget_percent, retries.min_per_second), (30, 4));
    let outliers = cluster("outbound:cart.shop:80")
        .outlier_detection
        .clone()
        .expect("outlier detection");
    assert_eq!(
        (
            outliers.consecutive_failures,
            outliers.base_ejection_time,
            outliers.max_ejected_percent
        ),
        (3, std::time::Duration::from_secs(45), 50)
    );
    assert_eq!(
        cluster("outbound:cart.shop:80").connection_limit,
        Some(shared::config::ConnectionLimit {
            max_connections: 40,
            max_pending: 0
        })
    );
    assert!(cluster("outbound:db.shop:5432").connection_limit.is_none());
    assert!(cluster("outbound:db.shop:5432").retries.is_none());
    assert!(cluster("outbound:db.shop:5432").outlier_detection.is_none());
    assert_eq!(
        cluster("outbound:cart.shop:80").balancing,
        shared::config::Balancing::LeastRequest
    );
    assert_eq!(
        cluster("outbound:db.shop:5432").balancing,
        shared::config::Balancing::RoundRobin
    );
    assert_validates(&web.config);

    // Without a budget, the default one.
    let unbudgeted = policy.replace(", budget: { percent: 30, minPerSecond: 4 }", "");
    let catalog = build(&[("base.yaml", BASE), ("policy.yaml", &unbudgeted)]);
    let web = translate(&catalog, &request("web-0", "web", &[("cart.shop", 80)]));
    let cart = web
        .config
        .clusters
        .iter()
        .find(|c| c.name == "outbound:cart.shop:80");
    let retries = cart.and_then(|c| c.retries.clone()).expect("retries");
    assert_eq!((retries.budget_percent, retries.min_per_second), (20, 10));
}

#[test]
fn an_authorization_policy_guards_the_pod_ports_its_service_targets() {
    let policy = |name: &str, target: &str, from: &str| {
        format!(
            "apiVersion: tern.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  targetRef: {target}\n  from: {from}\n"
        )
    };
    let inbound_authorization = |catalog: &Catalog| {
        let cart = translate(catalog, &request("cart-0", "cart", &[]));
        assert_validates(&cart.config);
        cart.config.listeners[0].authorization.clone()
    };
    // No policy: anyone.
    assert_eq!(inbound_authorization(&build(&[("base.yaml", BASE)])), None);
    // Two policies on cart's port 80: either one's sources let a caller in to 8080.
    let web = policy(
        "web",
        "{ kind: Service, name: cart, port: 80 }",
        "[{ identities: [\"spiffe://mesh.test/ns/shop/sa/web\"] }]",
    );
    let ops = policy(
        "ops",
        "{ kind: Service, name: cart }",
        "[{ namespaces: [ops] }, { identities: [\"spiffe://mesh.test/ns/batch/sa/*\"] }]",
    );
    let catalog = build(&[("base.yaml", BASE), ("web.yaml", &web), ("ops.yaml", &ops)]);
    let authorization = inbound_authorization(&catalog).expect("guarded");
    assert_eq!(
        authorization.identities,
        [
            "spiffe://mesh.test/ns/batch/sa/*",
            "spiffe://mesh.test/ns/shop/sa/web"
        ]
    );
    assert_eq!(authorization.namespaces, ["ops"]);
    assert!(authorization.rules.is_empty());
    // A policy with `to` lets its callers make the requests it names: one rule per operation.
    let ci = policy(
        "ci",
        "{ kind: Service, name: cart }",
        "[{ identities: [\"spiffe://mesh.test/ns/shop/sa/ci\"] }, { namespaces: [qa] }]\n  to: [{ methods: [GET], paths: [\"/api/*\"] }, { paths: [/healthz] }]",
    );
    let catalog = build(&[("base.yaml", BASE), ("web.yaml", &web), ("ci.yaml", &ci)]);
    let authorization = inbound_authorization(&catalog).expect("guarded");
    assert_eq!(
        authorization.identities,
        ["spiffe://mesh.test/ns/shop/sa/web"]
    );
    let rule = |methods: &[&str], paths: &[&str]| shared::config::AuthorizationRule {
        identities: vec!["spiffe://mesh.test/ns/shop/sa/ci".into()],
        namespaces: vec!["qa".into()],
        methods: methods.iter().map(|m| (*m).to_owned()).collect(),
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    };
    assert_eq!(
        authorization.rules,
        [rule(&[], &["/healthz"]), rule(&["GET"], &["/api/*"])]
    );
    // A policy on a port of another Service that targets another Pod port, or on a Service
    // that does not select the Pod, guards nothing here.
    let admin = "apiVersion: v1\nkind: Service\nmetadata: { name: admin, namespace: shop }\nspec:\n  selector: { app: cart }\n  ports: [{ name: http, port: 80, targetPort: 8080 }, { name: admin, port: 9090, targetPort: 9091 }]\n";
    let other = "apiVersion: v1\nkind: Service\nmetadata: { name: other, namespace: shop }\nspec:\n  selector: { app: other }\n  ports: [{ name: http, port: 80, targetPort: 8080 }]\n";
    let elsewhere = [
        policy("port", "{ kind: Service, name: admin, port: 9090 }", "[]"),
        policy("other", "{ kind: Service, name: other }", "[]"),
    ];
    let catalog = build(&[
        ("base.yaml", BASE),
        ("admin.yaml", admin),
        ("other.yaml", other),
        ("a.yaml", &elsewhere[0]),
        ("b.yaml", &elsewhere[1]),
    ]);
    assert!(catalog.problems.is_empty(), "{:?}", catalog.problems);
    assert_eq!(inbound_authorization(&catalog), None);
    // The same Service's port that targets 8080 guards it, for every Service's callers:
    // with no source, nobody.
    let port_80 = policy("http", "{ kind: Service, name: admin, port: 80 }", "[]");
    let catalog = build(&[
        ("base.yaml", BASE),
        ("admin.yaml", admin),
        ("c.yaml", &port_80),
    ]);
    assert_eq!(
        inbound_authorization(&catalog),
        Some(shared::config::Authorization::default())
    );

    // Refused: a Service that selects no Pods (its Pods cannot be told), a namespace that
    // is no namespace's name, and a field Tern does not know (another mesh's `action: DENY`
    // must not be read as an allow-list).
    for (text, expected) in [
        (
            policy("no-selector", "{ kind: Service, name: db }", "[]"),
            "spec.targetRef.name: Service shop/db selects no Pods",
        ),
        (
            policy(
                "bad-ns",
                "{ kind: Service, name: cart }",
                "[{ namespaces: [\"\"] }]",
            ),
            "spec.from[0].namespaces[0]",
        ),
        (
            policy(
                "deny",
                "{ kind: Service, name: cart }",
                "[]\n  action: DENY",
            ),
            "unknown field `action`",
        ),
        (
            policy(
                "bad-method",
                "{ kind: Service, name: cart }",
                "[]\n  to: [{ methods: [GET, \"G T\"] }]",
            ),
            "spec.to[0].methods[1]: `G T` is not an HTTP method",
        ),
        (
            policy(
                "bad-path",
                "{ kind: Service, name: cart }",
                "[]\n  to: [{ paths: [/a] }, { paths: [\"/a/*/b\"] }]",
            ),
            "spec.to[1].paths[0]: `/a/*/b` must have `*` only at its end",
        ),
    ] {
        let catalog = build(&[("base.yaml", BASE), ("p.yaml", &text)]);
        let shown = problem(&catalog);
        assert!(shown.contains(expected), "{shown}");
    }
}

#[test]
fn a_rate_limit_policy_caps_the_pod_ports_its_service_targets() {
    let policy = |name: &str, target: &str, caps: &str| {
        format!(
            "apiVersion: tern.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  targetRef: {target}\n{caps}"
        )
    };
    let inbound_rate_limit = |catalog: &Catalog| {
        let cart = translate(catalog, &request("cart-0", "cart", &[]));
        assert_validates(&cart.config);
        cart.config.listeners[0].rate_limit.clone()
    };
    assert_eq!(inbound_rate_limit(&build(&[("base.yaml", BASE)])), None);
    let one = policy(
        "one",
        "{ kind: Service, name: cart, port: 80 }",
        "  total: { requestsPerSecond: 100 }\n  identity: { requestsPerSecond: 20 }\n  overrides: [{ requestsPerSecond: 50, identities: [\"spiffe://mesh.test/ns/ops/sa/*\"] }]\n",
    );
    let catalog = build(&[("base.yaml", BASE), ("one.yaml", &one)]);
    let ops = shared::config::RateLimitOverride {
        identities: vec!["spiffe://mesh.test/ns/ops/sa/*".into()],
        requests_per_second: 50,
    };
    assert_eq!(
        inbound_rate_limit(&catalog),
        Some(shared::config::RateLimit {
            total: Some(100),
            per_identity: Some(20),
            overrides: vec![ops.clone()],
        })
    );
    // Two policies on the port: each cap the lowest, overrides by policy name, none above
    // the total.
    let two = policy(
        "a-two",
        "{ kind: Service, name: cart }",
        "  total: { requestsPerSecond: 30 }\n  overrides: [{ requestsPerSecond: 10, identities: [\"spiffe://mesh.test/ns/shop/sa/web\"] }]\n",
    );
    let catalog = build(&[("base.yaml", BASE), ("one.yaml", &one), ("two.yaml", &two)]);
    let web = shared::config::RateLimitOverride {
        identities: vec!["spiffe://mesh.test/ns/shop/sa/web".into()],
        requests_per_second: 10,
    };
    assert_eq!(
        inbound_rate_limit(&catalog),
        Some(shared::config::RateLimit {
            total: Some(30),
            per_identity: Some(20),
            overrides: vec![
                web,
                shared::config::RateLimitOverride {
                    requests_per_second: 30,
                    ..ops
                }
            ],
        })
    );
    // Refused, each field named as the policy spells it.
    for (text, expected) in [
        (
            policy(
                "no-selector",
                "{ kind: Service, name: db }",
                "  total: { requestsPerSecond: 1 }\n",
            ),
            "spec.targetRef.name: Service shop/db selects no Pods",
        ),
        (
            policy("none", "{ kind: Service, name: cart }", ""),
            "spec: sets no cap",
        ),
        (
            policy(
                "zero",
                "{ kind: Service, name: cart }",
                "  identity: { requestsPerSecond: 0 }\n",
            ),
            "spec.identity.requestsPerSecond: must be at least 1",
        ),
        (
            policy(
                "above",
                "{ kind: Service, name: cart }",
                "  total: { requestsPerSecond: 5 }\n  overrides: [{ requestsPerSecond: 6, identities: [\"spiffe://mesh.test/ns/a/sa/b\"] }]\n",
            ),
            "spec.overrides[0].requestsPerSecond: must not be above `total`",
        ),
        (
            policy(
                "bad-id",
                "{ kind: Service, name: cart }",
                "  overrides: [{ requestsPerSecond: 6, identities: [web] }]\n",
            ),
            "spec.overrides[0].identities[0]",
        ),
        (
            policy(
                "linkerd",
                "{ kind: Service, name: cart }",
                "  total: { requestsPerSecond: 5 }\n  overrides: [{ requestsPerSecond: 1, clientRefs: [{ kind: ServiceAccount, name: web }] }]\n",
            ),
            "unknown field `clientRefs`",
        ),
    ] {
        let catalog = build(&[("base.yaml", BASE), ("p.yaml", &text)]);
        let shown = problem(&catalog);
        assert!(shown.contains(expected), "{shown}");
    }
}

#[test]
fn a_route_from_another_namespace_applies_to_that_namespaces_callers_only() {
    // shop's own route (a producer route) sends cart's callers to cart-v2; a route that
    // namespace `evil` attaches to shop's cart (a consumer route) claims the same path.
    let producer = route(
        "v2",
        "  rules: [{ backendRefs: [{ name: cart-v2, port: 80 }] }]\n",
    );
    let consumer = "apiVersion: v1\nkind: Service\nmetadata: { name: sink, namespace: evil }\nspec: { ports: [{ name: http, port: 80 }] }\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: grab, namespace: evil }\nspec:\n  parentRefs: [{ kind: Service, name: cart, namespace: shop, port: 80 }]\n  rules: [{ backendRefs: [{ name: sink, port: 80 }] }]\n";
    let catalog = build(&[
        ("base.yaml", BASE),
        ("v2.yaml", &producer),
        ("evil.yaml", consumer),
    ]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let backend_for = |namespace: &str| {
        let mut asking = request("client-0", "client", &[("cart.shop", 80)]);
        asking.namespace = namespace.into();
        asking.identity = format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/client")
            .parse()
            .unwrap();
        let translated = translate(&catalog, &asking);
        let routes = &translated.config.listeners[0].routes;
        assert_eq!(routes.len(), 1, "{namespace}: {routes:?}");
        routes[0].backends[0].cluster.clone()
    };
    // Callers in shop and anywhere else follow shop's route; only evil's own follow evil's.
    assert_eq!(backend_for("shop"), "outbound:cart-v2.shop:80");
    assert_eq!(backend_for("other"), "outbound:cart-v2.shop:80");
    assert_eq!(backend_for("evil"), "outbound:sink.evil:80");
}

#[test]
fn the_example_manifests_in_deploy_local_are_accepted() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local");
    let catalog = Catalog::build(source::load(&dir), &Catalog::empty("cluster.local"));
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    assert_eq!(catalog.len(), 11);
    let web = translate(
        &catalog,
        &ProxyRequest {
            identity: "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
            namespace: "shop".into(),
            workload: "web-0".into(),
            outbound: vec![Outbound {
                service: "cart.shop".into(),
                port: 80,
                listen: "127.0.0.1:18080".parse().unwrap(),
            }],
            destinations: Vec::new(),
        },
    );
    let weights: Vec<u32> = web.config.listeners[0].routes[0]
        .backends
        .iter()
        .map(|b| b.weight)
        .collect();
    assert_eq!(weights, [90, 10]);
    assert!(
        web.config.clusters.iter().all(|c| c.tls.is_some()),
        "both cart versions are meshed"
    );
}

#[test]
fn a_new_route_cannot_take_the_path_of_one_already_in_use() {
    let existing = route(
        "zz-existing",
        "  rules: [{ backendRefs: [{ name: cart, port: 80 }] }]\n",
    );
    let first = build(&[("base.yaml", BASE), ("z.yaml", &existing)]);
    assert!(first.problems.is_empty());
    // It sorts first by name, but the route already in use keeps the path.
    let newcomer = route(
        "aa-newcomer",
        "  rules: [{ backendRefs: [{ name: cart-v2, port: 80 }] }]\n",
    );
    let next = Catalog::build(
        declared(&[
            ("base.yaml", BASE),
            ("z.yaml", &existing),
            ("a.yaml", &newcomer),
        ]),
        &first,
    );
    assert!(
        problem(&next).contains("HTTPRoute shop/aa-newcomer: spec.rules[0].matches: conflicts with HTTPRoute shop/zz-existing"),
        "{}",
        problem(&next)
    );
    assert_eq!(next.routes, first.routes);
}

#[test]
fn after_a_restart_the_oldest_route_keeps_a_contested_path() {
    let created = |name: &str, at: &str, to: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: {name}, namespace: shop, creationTimestamp: \"{at}\" }}\nspec:\n  parentRefs: [{{ kind: Service, name: cart, port: 80 }}]\n  rules: [{{ backendRefs: [{{ name: {to}, port: 80 }}] }}]\n"
        )
    };
    // A tern-control that starts anew sees both at once: the older keeps the path, though
    // the newer sorts first by name.
    let older = created("zz-older", "2026-11-01T00:00:00Z", "cart");
    let newer = created("aa-newer", "2026-12-01T00:00:00Z", "cart-v2");
    let catalog = build(&[("base.yaml", BASE), ("z.yaml", &older), ("a.yaml", &newer)]);
    let shown = problem(&catalog);
    assert!(
        shown.contains(
            "HTTPRoute shop/aa-newer: spec.rules[0].matches: conflicts with HTTPRoute shop/zz-older"
        ),
        "{shown}"
    );
}

#[test]
fn other_kinds_in_a_file_are_reported_and_do_not_freeze_it() {
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: cart, namespace: shop }\nspec: {}\n---\n";
    let first = build(&[("app.yaml", &format!("{deployment}{BASE}"))]);
    assert!(
        problem(&first)
            .contains("Deployment cart: kind: `apps/v1` `Deployment` is not a kind Tern reads")
    );
    assert_eq!(first.len(), 6);
    // Removing the Pod from that file removes it: the file is not "broken".
    let without_pod = BASE.split("---\napiVersion: v1\nkind: Pod").next().unwrap();
    let next = Catalog::build(
        declared(&[("app.yaml", &format!("{deployment}{without_pod}"))]),
        &first,
    );
    assert_eq!(next.len(), 5);
    assert!(next.workload("shop", "cart-0").is_none());
}

#[test]
fn values_a_proxy_would_refuse_are_refused_at_the_source() {
    let cases: Vec<(String, &str)> = vec![
        (
            route("r", "  hostnames: [\"*.*.example.com\"]\n  rules: [{ backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.hostnames[0]: a wildcard is only allowed as a leading `*.`",
        ),
        (
            route("r", "  rules: [{ timeouts: { request: 500us }, backendRefs: [{ name: cart, port: 80 }] }]\n"),
            "spec.rules[0].timeouts.request: must be at least 1ms",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: { name: p, namespace: shop, annotations: { tern.dev/inbound-ports: \"8080=15080,9090=15080\" } }\nspec: { containers: [] }\nstatus: { podIP: 10.0.0.2 }\n".into(),
            "sidecar port 15080 is used twice",
        ),
        (
            "apiVersion: tern.dev/v1alpha1\nkind: BackendPolicy\nmetadata: { name: b, namespace: shop }\nspec: { targetRef: { kind: Service, name: cart }, retries: { attempts: 6, on: [Reset] } }\n".into(),
            "spec.retries.attempts: at most 5",
        ),
        (
            "apiVersion: tern.dev/v1alpha1\nkind: BackendPolicy\nmetadata: { name: b, namespace: shop }\nspec: { targetRef: { kind: Service, name: cart }, retries: { attempts: 1, on: [Reset], perTryTimeout: 0s } }\n".into(),
            "spec.retries.perTryTimeout: must be at least 1ms",
        ),
        (
            "apiVersion: tern.dev/v1alpha1\nkind: BackendPolicy\nmetadata: { name: b, namespace: shop }\nspec: { targetRef: { kind: Service, name: cart }, outlierDetection: { consecutiveFailures: 0, baseEjectionTime: 30s } }\n".into(),
            "spec.outlierDetection.consecutiveFailures: must be at least 1",
        ),
        (
            "apiVersion: tern.dev/v1alpha1\nkind: BackendPolicy\nmetadata: { name: b, namespace: shop }\nspec: { targetRef: { kind: Service, name: cart }, outlierDetection: { consecutiveFailures: 5, baseEjectionTime: 25h } }\n".into(),
            "spec.outlierDetection.baseEjectionTime: at most 24h",
        ),
        (
            "apiVersion: tern.dev/v1alpha1\nkind: BackendPolicy\nmetadata: { name: b, namespace: shop }\nspec: { targetRef: { kind: Service, name: cart }, connectionLimits: { maxConnections: 0 } }\n".into(),
            "spec.connectionLimits.maxConnections: must be at least 1",
        ),
        (
            "apiVersion: tern.dev/v1alpha1\nkind: BackendPolicy\nmetadata: { name: b, namespace: shop }\nspec: { targetRef: { kind: Service, name: cart }, connectionLimits: { maxPendingRequests: 10 } }\n".into(),
            "spec.connectionLimits.maxPendingRequests: needs maxConnections",
        ),
    ];
    for (text, expected) in cases {
        let catalog = build(&[("base.yaml", BASE), ("new.yaml", &text)]);
        let shown = problem(&catalog);
        assert!(
            shown.contains(expected),
            "{shown}\nshould contain\n{expected}"
        );
    }
}

#[test]
fn a_port_with_mtls_disabled_is_reached_in_plaintext_at_the_application() {
    let disable = "apiVersion: tern.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: { name: off, namespace: shop }\nspec: { mode: Disable }\n";
    let catalog = build(&[("base.yaml", BASE), ("off.yaml", disable)]);
    let web = translate(&catalog, &request("web-0", "web", &[("cart.shop", 80)]));
    let cart = &web.config.clusters[0];
    assert_eq!(cart.endpoints, ["10.0.0.1:8080".parse().unwrap()]);
    assert!(cart.tls.is_none());
}

#[test]
fn a_port_is_http_opaque_or_detected_by_its_declaration() {
    use crate::translate::port_protocol;
    use k8s_openapi::api::core::v1::ServicePort;
    let port = |name: Option<&str>, number: i32, app: Option<&str>| ServicePort {
        name: name.map(Into::into),
        port: number,
        app_protocol: app.map(Into::into),
        ..ServicePort::default()
    };
    let cases = [
        (port(Some("http"), 80, None), Protocol::Http),
        (port(Some("http-api"), 8080, None), Protocol::Http),
        (port(Some("web"), 80, Some("HTTP")), Protocol::Http),
        (port(Some("web"), 80, Some("tcp")), Protocol::Tcp),
        (port(Some("mysql-main"), 3307, None), Protocol::Tcp),
        (port(Some("grpc"), 9090, None), Protocol::Http),
        (
            port(Some("api"), 9090, Some("kubernetes.io/h2c")),
            Protocol::Http,
        ),
        (port(Some("http2-api"), 9091, None), Protocol::Http),
        (port(Some("db"), 5432, None), Protocol::Tcp),
        (port(None, 6379, None), Protocol::Tcp),
        (port(Some("echo"), 9000, None), Protocol::Detect),
        (port(None, 8080, None), Protocol::Detect),
    ];
    for (port, expected) in cases {
        assert_eq!(port_protocol(&port), expected, "{port:?}");
    }
}

const INTERCEPTED: &str = r#"
apiVersion: tern.dev/v1alpha1
kind: Mesh
metadata: { name: default }
spec: { trustDomain: mesh.test, mtls: Permissive, outboundTraffic: RegistryOnly }
---
apiVersion: v1
kind: Service
metadata: { name: api, namespace: shop }
spec:
  selector: { app: api }
  clusterIPs: ["10.96.0.10", "fd00::10"]
  ports: [{ name: http, port: 80, targetPort: 8080 }, { name: raw, port: 9000 }]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: api-a, namespace: shop, labels: { kubernetes.io/service-name: api } }
addressType: IPv4
ports: [{ name: http, port: 8080 }, { name: raw, port: 9000 }]
endpoints:
  - addresses: ["10.0.1.1"]
    targetRef: { kind: Pod, name: api-0 }
---
apiVersion: v1
kind: Pod
metadata:
  name: api-0
  namespace: shop
  labels: { app: api }
  annotations: { tern.dev/interception: enabled }
spec: { serviceAccountName: api, containers: [] }
status: { podIP: 10.0.1.1 }
---
apiVersion: v1
kind: Pod
metadata:
  name: client-0
  namespace: shop
  annotations: { tern.dev/interception: enabled }
spec: { serviceAccountName: client, containers: [] }
status: { podIP: 10.0.1.2 }
"#;

#[test]
fn an_intercepted_pod_claims_its_app_ports_and_every_service_address() {
    let catalog = build(&[("mesh.yaml", INTERCEPTED)]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);

    // The server: its app ports, claimed on any of its addresses, in the mesh's mode.
    let api = translate(&catalog, &request("api-0", "api", &[]));
    let inbound: Vec<_> = api
        .config
        .listeners
        .iter()
        .filter(|l| l.intercept == Some(shared::config::Intercept::Inbound))
        .map(|l| (l.name.as_str(), l.address, l.protocol))
        .collect();
    assert_eq!(
        inbound,
        [
            (
                "inbound:8080",
                "0.0.0.0:8080".parse().unwrap(),
                Protocol::Http
            ),
            (
                "inbound:9000",
                "0.0.0.0:9000".parse().unwrap(),
                Protocol::Detect
            ),
        ]
    );
    let interception = api.config.interception.as_ref().unwrap();
    assert_eq!(interception.inbound_tls.mode, TlsMode::Permissive);
    assert_eq!(
        interception.outbound_policy,
        shared::config::OutboundPolicy::RegistryOnly
    );

    // The client: a listener for each address it dialed that is a Service's, claiming it;
    // the endpoint is the Pod's own app port, over mTLS (its sidecar takes it there). An
    // address of no Service is reported outside the mesh; nothing of other Services is sent.
    let mut asked = request("client-0", "client", &[]);
    asked.destinations = [
        "10.96.0.10:80",
        "10.96.0.10:9000",
        "[fd00::10]:80",
        "[fd00::10]:9000",
        "192.0.2.1:443",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    let client = translate(&catalog, &asked);
    assert_eq!(
        client.config.interception.as_ref().unwrap().outside_mesh,
        ["192.0.2.1:443".parse().unwrap()]
    );
    let nothing_asked = translate(&catalog, &request("client-0", "client", &[]));
    assert!(nothing_asked.config.listeners.is_empty());
    // A proxy the catalog does not know as intercepted still gets an answer to what it
    // asked (else it would wait for one on every connection).
    asked.workload = "not-declared-0".into();
    let unknown_pod = translate(&catalog, &asked);
    assert_eq!(unknown_pod.config.listeners.len(), 4);
    assert_eq!(
        unknown_pod
            .config
            .interception
            .as_ref()
            .unwrap()
            .outside_mesh,
        ["192.0.2.1:443".parse().unwrap()]
    );
    let outbound: Vec<_> = client
        .config
        .listeners
        .iter()
        .map(|l| (l.address.to_string(), l.protocol, l.intercept))
        .collect();
    let claims = Some(shared::config::Intercept::Outbound);
    assert_eq!(
        outbound,
        [
            ("10.96.0.10:80".to_owned(), Protocol::Http, claims),
            ("10.96.0.10:9000".to_owned(), Protocol::Detect, claims),
            ("[fd00::10]:80".to_owned(), Protocol::Http, claims),
            ("[fd00::10]:9000".to_owned(), Protocol::Detect, claims),
        ]
    );
    let raw = client
        .config
        .clusters
        .iter()
        .find(|c| c.name == "outbound:api.shop:9000")
        .unwrap();
    assert_eq!(raw.endpoints, ["10.0.1.1:9000".parse().unwrap()]);
    assert_eq!(
        raw.tls.as_ref().unwrap().identity.to_string(),
        "spiffe://mesh.test/ns/shop/sa/api"
    );
    // What it gets validates as the proxy will check it (with its own interception block).
    assert_validates(&client.config);
}

#[test]
fn interception_annotations_are_checked() {
    let pod = |annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{ name: p, namespace: shop, annotations: {{ {annotations} }} }}\nspec: {{ containers: [] }}\nstatus: {{ podIP: 10.0.0.2 }}\n"
        )
    };
    let catalog = build(&[("p.yaml", &pod("tern.dev/interception: maybe"))]);
    assert!(
        problem(&catalog).contains("`maybe` is not `enabled` or `disabled`"),
        "{}",
        problem(&catalog)
    );
    let catalog = build(&[(
        "p.yaml",
        &pod("tern.dev/interception: enabled, tern.dev/inbound-ports: \"8080=15080\""),
    )]);
    assert!(
        problem(&catalog).contains("leave it out"),
        "{}",
        problem(&catalog)
    );
    let catalog = build(&[(
        "s.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: { name: s, namespace: shop }\nspec: { clusterIP: 10.96.0.300, ports: [{ port: 80 }] }\n",
    )]);
    assert!(
        problem(&catalog).contains("spec.clusterIP"),
        "{}",
        problem(&catalog)
    );
}

#[test]
fn a_grpc_route_routes_calls_by_service_and_method() {
    let grpc = r#"
apiVersion: v1
kind: Service
metadata: { name: users, namespace: shop }
spec:
  ports: [{ name: grpc, port: 9090 }]
---
apiVersion: v1
kind: Service
metadata: { name: users-v2, namespace: shop }
spec:
  ports: [{ name: grpc, port: 9090 }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: { name: users, namespace: shop }
spec:
  parentRefs: [{ kind: Service, group: "", name: users, port: 9090 }]
  rules:
    - matches: [{ method: { service: shop.Users, method: Create } }]
      backendRefs: [{ name: users-v2, port: 9090 }]
    - matches: [{ method: { service: shop.Users } }]
      backendRefs: [{ name: users, port: 9090 }]
"#;
    let catalog = build(&[("grpc.yaml", grpc)]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let client = translate(&catalog, &request("web-0", "web", &[("users.shop", 9090)]));
    let listener = &client.config.listeners[0];
    assert_eq!(listener.protocol, Protocol::Http);
    let routes: Vec<_> = listener
        .routes
        .iter()
        .map(|r| (&r.path, r.backends[0].cluster.as_str()))
        .collect();
    assert_eq!(
        routes,
        [
            (
                &shared::config::PathMatch::Exact("/shop.Users/Create".into()),
                "outbound:users-v2.shop:9090"
            ),
            (
                &shared::config::PathMatch::Prefix("/shop.Users".into()),
                "outbound:users.shop:9090"
            ),
        ]
    );

    // What a GRPCRoute cannot say in Tern yet is refused with its field.
    let regex = grpc.replace(
        "{ method: { service: shop.Users } }",
        "{ method: { type: Prefix, service: \"shop.*\" } }",
    );
    let catalog = build(&[("grpc.yaml", &regex)]);
    let text = problem(&catalog);
    assert!(
        text.contains("GRPCRoute") && text.contains("spec.rules[1].matches[0].method.type"),
        "{text}"
    );
    // Service and method by regular expression: the path's.
    let regex = grpc.replace(
        "{ method: { service: shop.Users } }",
        "{ method: { type: RegularExpression, service: \"shop\\\\.(Users|Admins)\" } }",
    );
    let catalog = build(&[("grpc.yaml", &regex)]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let client = translate(&catalog, &request("web-0", "web", &[("users.shop", 9090)]));
    assert_eq!(
        client.config.listeners[0].routes[1].path,
        shared::config::PathMatch::Regex("/(?:shop\\.(Users|Admins))/(?:[^/]+)".into())
    );
    let broken = grpc.replace(
        "{ method: { service: shop.Users } }",
        "{ method: { type: RegularExpression, service: \"a)|(?:b\" } }",
    );
    let catalog = build(&[("grpc.yaml", &broken)]);
    assert!(
        problem(&catalog).contains("spec.rules[1].matches[0].method.service"),
        "{}",
        problem(&catalog)
    );
    let method_only = grpc.replace(
        "{ method: { service: shop.Users } }",
        "{ method: { method: Get } }",
    );
    let catalog = build(&[("grpc.yaml", &method_only)]);
    assert!(
        problem(&catalog).contains("needs its service"),
        "{}",
        problem(&catalog)
    );
}

#[test]
fn a_rule_s_matches_and_header_filters_reach_its_routes() {
    let matched = route(
        "matched",
        "  rules:\n    - matches:\n        - { path: { type: Exact, value: /cart/checkout }, method: POST, queryParams: [{ name: mode, value: fast }] }\n        - { path: { value: /cart/v2 } }\n      filters:\n        - { type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: x-env, value: prod }], remove: [x-debug] } }\n        - { type: ResponseHeaderModifier, responseHeaderModifier: { add: [{ name: cache-control, value: no-store }] } }\n      backendRefs: [{ name: cart-v2, port: 80 }]\n    - backendRefs: [{ name: cart, port: 80 }]\n",
    );
    let catalog = build(&[("base.yaml", BASE), ("route.yaml", &matched)]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let web = translate(&catalog, &request("web-0", "web", &[("cart.shop", 80)]));
    let routes = &web.config.listeners[0].routes;
    assert_eq!(routes.len(), 3);
    let checkout = &routes[0];
    assert_eq!(
        checkout.path,
        shared::config::PathMatch::Exact("/cart/checkout".into())
    );
    assert_eq!(checkout.method.as_deref(), Some("POST"));
    assert_eq!(
        checkout.query,
        [shared::config::ValueMatch::exact("mode", "fast")]
    );
    assert_eq!(checkout.request_headers.set[0].name, "x-env");
    assert_eq!(checkout.request_headers.remove, ["x-debug"]);
    assert_eq!(checkout.response_headers.add[0].value, "no-store");
    assert_eq!(checkout.backends[0].cluster, "outbound:cart-v2.shop:80");
    // Every match of the rule gets its filters; the other rule none.
    assert_eq!(routes[1].request_headers, checkout.request_headers);
    assert_eq!(routes[1].method, None);
    assert!(routes[2].request_headers.is_empty() && routes[2].response_headers.is_empty());

    // A route on the same path with another method does not conflict; the same method does.
    let get = route(
        "get",
        "  rules:\n    - matches: [{ path: { type: Exact, value: /cart/checkout }, method: GET, queryParams: [{ name: mode, value: fast }] }]\n      backendRefs: [{ name: cart, port: 80 }]\n",
    );
    let catalog = build(&[
        ("base.yaml", BASE),
        ("route.yaml", &matched),
        ("get.yaml", &get),
    ]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let post = get
        .replace("name: get", "name: post")
        .replace("GET", "POST");
    let catalog = build(&[
        ("base.yaml", BASE),
        ("route.yaml", &matched),
        ("post.yaml", &post),
    ]);
    assert!(
        problem(&catalog).contains("POST *") && problem(&catalog).contains("?mode=fast"),
        "{}",
        problem(&catalog)
    );
}

#[test]
fn regular_expression_matches_reach_the_routes() {
    let matched = route(
        "regex",
        "  rules:\n    - matches: [{ path: { type: RegularExpression, value: \"/items/[0-9]+\" }, headers: [{ type: RegularExpression, name: X-User, value: \"ops|dev\" }], queryParams: [{ type: RegularExpression, name: page, value: \"[0-9]+\" }] }]\n      backendRefs: [{ name: cart-v2, port: 80 }]\n    - backendRefs: [{ name: cart, port: 80 }]\n",
    );
    let catalog = build(&[("base.yaml", BASE), ("route.yaml", &matched)]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let web = translate(&catalog, &request("web-0", "web", &[("cart.shop", 80)]));
    let routes = &web.config.listeners[0].routes;
    assert_eq!(
        routes[0].path,
        shared::config::PathMatch::Regex("/items/[0-9]+".into())
    );
    assert_eq!(
        routes[0].headers,
        [shared::config::ValueMatch {
            name: "x-user".into(),
            value: "ops|dev".into(),
            regex: true
        }]
    );
    assert!(routes[0].query[0].regex);
}

#[test]
fn a_rule_s_redirect_or_rewrite_reaches_its_routes() {
    let moved = route(
        "moved",
        "  rules:\n    - matches: [{ path: { value: /old } }]\n      filters: [{ type: RequestRedirect, requestRedirect: { scheme: https, hostname: shop.example, path: { type: ReplacePrefixMatch, replacePrefixMatch: /new }, statusCode: 301 } }]\n    - matches: [{ path: { value: /v1 } }]\n      filters: [{ type: URLRewrite, urlRewrite: { hostname: cart.internal, path: { type: ReplaceFullPath, replaceFullPath: /api } } }]\n      backendRefs: [{ name: cart, port: 80 }]\n",
    );
    let catalog = build(&[("base.yaml", BASE), ("route.yaml", &moved)]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let web = translate(&catalog, &request("web-0", "web", &[("cart.shop", 80)]));
    let routes = &web.config.listeners[0].routes;
    assert_eq!(routes.len(), 2);
    let redirect = routes[0].redirect.as_ref().unwrap();
    assert!(routes[0].backends.is_empty());
    assert_eq!(
        (
            redirect.scheme.as_deref(),
            redirect.hostname.as_deref(),
            redirect.status
        ),
        (Some("https"), Some("shop.example"), 301)
    );
    assert_eq!(
        redirect.path,
        Some(shared::config::PathRewrite::ReplacePrefixMatch(
            "/new".into()
        ))
    );
    let rewrite = routes[1].rewrite.as_ref().unwrap();
    assert_eq!(rewrite.hostname.as_deref(), Some("cart.internal"));
    assert_eq!(
        rewrite.path,
        Some(shared::config::PathRewrite::ReplaceFullPath("/api".into()))
    );
    assert_eq!(routes[1].backends[0].cluster, "outbound:cart.shop:80");
}

#[test]
fn header_matches_narrow_routes_and_count_in_conflicts() {
    let canary = route(
        "canary",
        "  rules:\n    - matches: [{ path: { value: / }, headers: [{ name: X-Canary, value: \"yes\" }] }]\n      backendRefs: [{ name: cart-v2, port: 80 }]\n    - backendRefs: [{ name: cart, port: 80 }]\n",
    );
    let catalog = build(&[("base.yaml", BASE), ("route.yaml", &canary)]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let web = translate(&catalog, &request("web-0", "web", &[("cart.shop", 80)]));
    let routes = &web.config.listeners[0].routes;
    assert_eq!(routes.len(), 2);
    assert_eq!(
        routes[0].headers,
        [shared::config::ValueMatch::exact("x-canary", "yes")]
    );
    assert_eq!(routes[0].backends[0].cluster, "outbound:cart-v2.shop:80");
    assert!(routes[1].headers.is_empty());

    // Another route on the same path with other headers does not conflict; the same
    // headers do.
    let other = route(
        "other",
        "  rules:\n    - matches: [{ headers: [{ name: x-user, value: ops }] }]\n      backendRefs: [{ name: cart, port: 80 }]\n",
    );
    let catalog = build(&[
        ("base.yaml", BASE),
        ("route.yaml", &canary),
        ("other.yaml", &other),
    ]);
    assert!(catalog.problems.is_empty(), "{:#?}", catalog.problems);
    let same = route(
        "same",
        "  rules:\n    - matches: [{ headers: [{ name: x-canary, value: \"yes\" }] }]\n      backendRefs: [{ name: cart, port: 80 }]\n",
    );
    let catalog = build(&[
        ("base.yaml", BASE),
        ("route.yaml", &canary),
        ("same.yaml", &same),
    ]);
    assert!(
        problem(&catalog).contains("x-canary: yes"),
        "{}",
        problem(&catalog)
    );
}
