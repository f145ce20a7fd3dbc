use super::*;

const GOOD: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:8080
    protocol: http
    routes:
      - host: api.example.com
        path_prefix: /v1
        cluster: api
        timeout: 250ms
      - cluster: web
  - name: db
    address: 127.0.0.1:5433
    protocol: tcp
    cluster: web
clusters:
  - name: api
    endpoints: [127.0.0.1:9001, 127.0.0.1:9002]
    connect_timeout: 2s
  - name: web
    endpoints: ["[::1]:9003"]
"#;

#[test]
fn parses_a_full_config_with_defaults() {
    let config = Config::from_yaml(GOOD, "good.yaml").unwrap();
    assert_eq!(config.listeners.len(), 2);
    let route = &config.listeners[0].routes[0];
    assert_eq!(route.timeout, Duration::from_millis(250));
    let fallback = &config.listeners[0].routes[1];
    assert_eq!(
        (fallback.host.as_str(), &fallback.path),
        ("*", &PathMatch::Prefix("/".into()))
    );
    assert_eq!(fallback.timeout, default_request_timeout());
    let api = config.cluster("api").unwrap();
    assert_eq!(api.connect_timeout, Duration::from_secs(2));
    assert_eq!(api.endpoints.len(), 2);
    assert_eq!(config.http, HttpSettings::default());
}

#[test]
fn a_route_matches_and_modifies_headers_as_declared() {
    let yaml = GOOD.replace(
        "path_prefix: /v1",
        "path_exact: /v1/items\n        method: PUT\n        query: [{ name: dry-run, value: \"true\" }]\n        \
         request_headers: { set: [{ name: x-env, value: prod }], remove: [x-debug] }\n        \
         response_headers: { add: [{ name: cache-control, value: no-store }] }",
    );
    let config = Config::from_yaml(&yaml, "good.yaml").unwrap();
    let route = &config.listeners[0].routes[0];
    assert_eq!(route.path, PathMatch::Exact("/v1/items".into()));
    assert_eq!(route.method.as_deref(), Some("PUT"));
    assert_eq!(route.query[0].name, "dry-run");
    assert_eq!(route.request_headers.set[0].value, "prod");
    assert_eq!(route.request_headers.remove, ["x-debug"]);
    assert_eq!(route.response_headers.add[0].name, "cache-control");
    let yaml = serde_yaml::to_string(&config).unwrap();
    assert_eq!(Config::from_yaml(&yaml, "again").unwrap(), config);

    let both = GOOD.replace(
        "path_prefix: /v1",
        "path_prefix: /v1\n        path_exact: /v1",
    );
    let error = Config::from_yaml(&both, "both.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("at most one of `path_prefix`, `path_exact` or `path_regex`"),
        "{error}"
    );
}

#[test]
fn a_route_redirects_or_rewrites_with_one_of_its_fields() {
    let yaml = GOOD.replace(
        "cluster: api",
        "redirect: { scheme: https, port: 8443, path: { replace_prefix_match: /v2 }, status: 301 }",
    );
    let config = Config::from_yaml(&yaml, "good.yaml").unwrap();
    let route = &config.listeners[0].routes[0];
    assert!(route.backends.is_empty());
    let redirect = route.redirect.as_ref().unwrap();
    assert_eq!(
        (redirect.scheme.as_deref(), redirect.port, redirect.status),
        (Some("https"), Some(8443), 301)
    );
    let yaml = serde_yaml::to_string(&config).unwrap();
    assert_eq!(Config::from_yaml(&yaml, "again").unwrap(), config);
    let defaulted = Config::from_yaml(&GOOD.replace("cluster: api", "redirect: {}"), "d").unwrap();
    assert_eq!(
        defaulted.listeners[0].routes[0]
            .redirect
            .as_ref()
            .unwrap()
            .status,
        302
    );

    let cases = [
        (
            "redirect: {}\n        cluster: api",
            "exactly one of `cluster`, `backends` or `redirect`",
        ),
        (
            "redirect: {}\n        rewrite: { hostname: x }",
            "a route that redirects rewrites nothing",
        ),
    ];
    for (fields, expected) in cases {
        let yaml = GOOD.replace("cluster: api", fields);
        let error = Config::from_yaml(&yaml, "bad.yaml")
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{error}");
    }
}

#[test]
fn a_path_rewrite_replaces_the_whole_path_or_the_matched_prefix() {
    let prefix = |to: &str| PathRewrite::ReplacePrefixMatch(to.into());
    let cases = [
        (prefix("/xyz"), "/foo", "/foo/bar", "/xyz/bar"),
        (prefix("/xyz/"), "/foo", "/foo/bar", "/xyz/bar"),
        (prefix("/xyz"), "/foo/", "/foo/bar", "/xyz/bar"),
        (prefix("/xyz"), "/foo", "/foo", "/xyz"),
        (prefix("/xyz"), "/foo", "/foo/", "/xyz/"),
        (prefix("/"), "/foo", "/foo/bar", "/bar"),
        (prefix("/"), "/foo", "/foo", "/"),
        (prefix("/xyz"), "/", "/foo", "/xyz/foo"),
        (
            PathRewrite::ReplaceFullPath("/x".into()),
            "/foo",
            "/foo/bar",
            "/x",
        ),
    ];
    for (rewrite, matched, path, expected) in cases {
        assert_eq!(
            String::from_utf8(rewrite.apply(path.as_bytes(), matched)).unwrap(),
            expected,
            "{rewrite:?} of {path} matched by {matched}"
        );
    }
}

#[test]
fn round_trips_through_json_and_yaml() {
    let config = Config::from_yaml(GOOD, "good.yaml").unwrap();
    let yaml = serde_yaml::to_string(&config).unwrap();
    assert_eq!(Config::from_yaml(&yaml, "again").unwrap(), config);
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), config);
}

fn invalid(yaml: &str) -> (String, String) {
    match Config::from_yaml(yaml, "bad.yaml") {
        Err(ConfigError::Invalid {
            field,
            message,
            origin,
        }) => {
            assert_eq!(origin, "bad.yaml");
            (field, message)
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn names_the_field_of_an_unknown_cluster() {
    let yaml = GOOD.replace("cluster: api", "cluster: nope");
    let (field, message) = invalid(&yaml);
    assert_eq!(field, "listeners[0].routes[0].backends[0].cluster");
    assert!(message.contains("nope"), "{message}");
}

#[test]
fn refuses_inconsistent_listeners_and_clusters() {
    let cases = [
        (GOOD.replace("name: db", "name: web"), "listeners[1].name"),
        (
            GOOD.replace("127.0.0.1:5433", "127.0.0.1:8080"),
            "listeners[1].address",
        ),
        (
            GOOD.replace("protocol: tcp\n    cluster: web", "protocol: tcp"),
            "listeners[1].cluster",
        ),
        (GOOD.replace("name: api", "name: web"), "clusters[1].name"),
        (
            GOOD.replace(
                "cluster: api",
                "backends: [{ cluster: api, weight: 0 }, { cluster: web, weight: 0 }]",
            ),
            "listeners[0].routes[0].backends",
        ),
        (
            GOOD.replace("path_prefix: /v1", "path_prefix: v1"),
            "listeners[0].routes[0].path_prefix",
        ),
        (
            GOOD.replace("path_prefix: /v1", "path_prefix: /v1?x=1"),
            "listeners[0].routes[0].path_prefix",
        ),
        (
            GOOD.replace("path_prefix: /v1", "path_exact: /v1 /v2"),
            "listeners[0].routes[0].path_exact",
        ),
        (
            GOOD.replace("path_prefix: /v1", "method: \"G T\""),
            "listeners[0].routes[0].method",
        ),
        (
            GOOD.replace("path_prefix: /v1", "query: [{ name: \"\", value: x }]"),
            "listeners[0].routes[0].query[0].name",
        ),
        (
            GOOD.replace("path_prefix: /v1", "path_regex: \"/v1/(\""),
            "listeners[0].routes[0].path_regex",
        ),
        (
            // Balanced once anchored, unbalanced alone: it would match more than asked.
            GOOD.replace("path_prefix: /v1", "path_regex: \"/a)|(?:/b\""),
            "listeners[0].routes[0].path_regex",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1",
                "headers: [{ name: x-a, value: \"[\", regex: true }]",
            ),
            "listeners[0].routes[0].headers[0].value",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1",
                &format!("path_regex: \"{}\"", "a".repeat(MAX_REGEX_LEN + 1)),
            ),
            "listeners[0].routes[0].path_regex",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1\n        cluster: api",
                "path_regex: /v1\n        cluster: api\n        rewrite: { path: { replace_prefix_match: /v2 } }",
            ),
            "listeners[0].routes[0].rewrite.path",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1",
                "request_headers: { set: [{ name: x-a, value: \"a\\r\\nx-b: b\" }] }",
            ),
            "listeners[0].routes[0].request_headers.set[0]",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1",
                "request_headers: { add: [{ name: x-a, value: a }], remove: [Content-Length] }",
            ),
            "listeners[0].routes[0].request_headers.remove[0]",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1",
                "response_headers: { set: [{ name: Transfer-Encoding, value: gzip }] }",
            ),
            "listeners[0].routes[0].response_headers.set[0]",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1",
                "response_headers: { add: [{ name: x-a, value: a }, { name: X-A, value: b }] }",
            ),
            "listeners[0].routes[0].response_headers.add[1]",
        ),
        (
            GOOD.replace("path_prefix: /v1", "request_headers: { remove: [Expect] }"),
            "listeners[0].routes[0].request_headers.remove[0]",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1",
                "request_headers: { set: [{ name: x-a, value: \" a\" }] }",
            ),
            "listeners[0].routes[0].request_headers.set[0]",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1",
                "request_headers: { remove: [\":path\"] }",
            ),
            "listeners[0].routes[0].request_headers.remove[0]",
        ),
        (
            GOOD.replace("cluster: api", "redirect: { status: 304 }"),
            "listeners[0].routes[0].redirect.status",
        ),
        (
            GOOD.replace("cluster: api", "redirect: { scheme: ftp }"),
            "listeners[0].routes[0].redirect.scheme",
        ),
        (
            GOOD.replace("cluster: api", "redirect: { hostname: \"a:80\" }"),
            "listeners[0].routes[0].redirect.hostname",
        ),
        (
            GOOD.replace(
                "path_prefix: /v1\n        cluster: api",
                "path_exact: /v1\n        redirect: { path: { replace_prefix_match: /v2 } }",
            ),
            "listeners[0].routes[0].redirect.path",
        ),
        (
            GOOD.replace(
                "cluster: api",
                "cluster: api\n        rewrite: { path: { replace_full_path: v2 } }",
            ),
            "listeners[0].routes[0].rewrite.path",
        ),
        (
            GOOD.replace("host: api.example.com", "host: a*.example.com"),
            "listeners[0].routes[0].host",
        ),
        (
            GOOD.replace("timeout: 250ms", "timeout: 0s"),
            "listeners[0].routes[0].timeout",
        ),
        (
            GOOD.replace("connect_timeout: 2s", "connect_timeout: 0s"),
            "clusters[0].connect_timeout",
        ),
        (
            GOOD.replace(
                "connect_timeout: 2s",
                "connect_timeout: 2s\n    retries: { attempts: 6, on: [reset] }",
            ),
            "clusters[0].retries.attempts",
        ),
        (
            GOOD.replace(
                "connect_timeout: 2s",
                "connect_timeout: 2s\n    retries: { attempts: 1, on: [reset], per_try_timeout: 0s }",
            ),
            "clusters[0].retries.per_try_timeout",
        ),
        (
            GOOD.replace(
                "connect_timeout: 2s",
                "connect_timeout: 2s\n    retries: { attempts: 1, on: [reset], budget_percent: 101 }",
            ),
            "clusters[0].retries.budget_percent",
        ),
        (
            GOOD.replace(
                "connect_timeout: 2s",
                "connect_timeout: 2s\n    outlier_detection: { consecutive_failures: 0, base_ejection_time: 30s }",
            ),
            "clusters[0].outlier_detection.consecutive_failures",
        ),
        (
            GOOD.replace(
                "connect_timeout: 2s",
                "connect_timeout: 2s\n    outlier_detection: { consecutive_failures: 1, base_ejection_time: 0s }",
            ),
            "clusters[0].outlier_detection.base_ejection_time",
        ),
        (
            GOOD.replace(
                "connect_timeout: 2s",
                "connect_timeout: 2s\n    connection_limit: { max_connections: 0 }",
            ),
            "clusters[0].connection_limit.max_connections",
        ),
    ];
    for (yaml, expected) in cases {
        assert_eq!(invalid(&yaml).0, expected);
    }
}

#[test]
fn an_authorization_names_identity_patterns_and_namespaces() {
    let with = |authorization: &str| {
        GOOD.replace(
            "protocol: tcp\n    cluster: web",
            &format!("protocol: tcp\n    cluster: web\n    authorization: {authorization}"),
        )
    };
    let good = with(
        "{ identities: [\"spiffe://td/ns/shop/sa/web\", \"spiffe://td/ns/ops/sa/*\"], namespaces: [shop] }",
    );
    let config = Config::from_yaml(&good, "good.yaml").unwrap();
    let authorization = config.listeners[1].authorization.as_ref().unwrap();
    assert_eq!(authorization.identities.len(), 2);
    assert_eq!(authorization.namespaces, ["shop"]);
    // Rules name callers for some requests: methods, and paths exact or by prefix.
    let rules = with(
        "{ rules: [{ identities: [\"spiffe://td/ns/shop/sa/ci\"], methods: [GET, M-SEARCH], paths: [/healthz, \"/api/*\", \"*\"] }] }",
    );
    let config = Config::from_yaml(&rules, "rules.yaml").unwrap();
    let rule = &config.listeners[1].authorization.as_ref().unwrap().rules[0];
    assert_eq!(rule.methods, ["GET", "M-SEARCH"]);
    assert_eq!(rule.paths, ["/healthz", "/api/*", "*"]);
    for (authorization, field) in [
        (
            "{ identities: [\"spiffe://td/ns/*/sa/web\"] }",
            "listeners[1].authorization.identities[0]",
        ),
        (
            "{ identities: [\"spiffe://td/ns/shop/sa/web\", \"web\"] }",
            "listeners[1].authorization.identities[1]",
        ),
        (
            "{ namespaces: [\"\"] }",
            "listeners[1].authorization.namespaces[0]",
        ),
        (
            "{ rules: [{ namespaces: [a] }, { identities: [\"web\"] }] }",
            "listeners[1].authorization.rules[1].identities[0]",
        ),
        (
            "{ rules: [{ namespaces: [a], methods: [GET, \"GE T\"] }] }",
            "listeners[1].authorization.rules[0].methods[1]",
        ),
        (
            "{ rules: [{ namespaces: [a], paths: [/a, \"/a*b\"] }] }",
            "listeners[1].authorization.rules[0].paths[1]",
        ),
        (
            "{ rules: [{ namespaces: [a], paths: [api] }] }",
            "listeners[1].authorization.rules[0].paths[0]",
        ),
        (
            "{ rules: [{ namespaces: [a], paths: [\"/a?b=1\"] }] }",
            "listeners[1].authorization.rules[0].paths[0]",
        ),
        (
            "{ rules: [{ namespaces: [a], paths: [\"/a/../b\"] }] }",
            "listeners[1].authorization.rules[0].paths[0]",
        ),
    ] {
        assert_eq!(invalid(&with(authorization)).0, field, "{authorization}");
    }
}

#[test]
fn a_rate_limit_caps_in_all_per_caller_and_per_override() {
    let with = |limit: &str| {
        GOOD.replace(
            "protocol: tcp\n    cluster: web",
            &format!("protocol: detect\n    cluster: web\n    rate_limit: {limit}"),
        )
    };
    let good = with(
        "{ total: 100, per_identity: 10, overrides: [{ identities: [\"spiffe://td/ns/ops/sa/*\"], requests_per_second: 100 }] }",
    );
    let config = Config::from_yaml(&good, "good.yaml").unwrap();
    let limit = config.listeners[1].rate_limit.as_ref().unwrap();
    assert_eq!((limit.total, limit.per_identity), (Some(100), Some(10)));
    assert_eq!(limit.overrides[0].requests_per_second, 100);
    Config::from_yaml(&with("{ per_identity: 3 }"), "one.yaml").unwrap();
    for (limit, field, reason) in [
        ("{}", "listeners[1].rate_limit", "sets no cap"),
        (
            "{ total: 0 }",
            "listeners[1].rate_limit.total",
            "at least 1",
        ),
        (
            "{ per_identity: 1000001 }",
            "listeners[1].rate_limit.per_identity",
            "at most",
        ),
        (
            "{ total: 10, per_identity: 11 }",
            "listeners[1].rate_limit.per_identity",
            "above `total`",
        ),
        (
            "{ total: 10, overrides: [{ identities: [\"spiffe://td/ns/a/sa/b\"], requests_per_second: 20 }] }",
            "listeners[1].rate_limit.overrides[0].requests_per_second",
            "above `total`",
        ),
        (
            "{ overrides: [{ identities: [], requests_per_second: 20 }] }",
            "listeners[1].rate_limit.overrides[0].identities",
            "must name",
        ),
        (
            "{ overrides: [{ identities: [\"spiffe://td/ns/a/sa/b\", web], requests_per_second: 2 }] }",
            "listeners[1].rate_limit.overrides[0].identities[1]",
            "",
        ),
    ] {
        let (at, message) = invalid(&with(limit));
        assert_eq!(at, field, "{limit}");
        assert!(message.contains(reason), "{limit}: {message}");
    }
    let tcp = GOOD.replace(
        "protocol: tcp\n    cluster: web",
        "protocol: tcp\n    cluster: web\n    rate_limit: { total: 1 }",
    );
    let (at, message) = invalid(&tcp);
    assert_eq!(at, "listeners[1].rate_limit");
    assert!(message.contains("carries none"), "{message}");
}

#[test]
fn refuses_unknown_fields_and_bad_syntax_with_a_location() {
    let err =
        Config::from_yaml(&GOOD.replace("protocol: tcp", "protocl: tcp"), "typo.yaml").unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("typo.yaml: "), "{text}");
    assert!(text.contains("protocl"), "{text}");
    assert!(text.contains("line"), "{text}");

    let err = Config::from_yaml("listeners: [", "broken.yaml").unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    let err =
        Config::from_yaml(&GOOD.replace("127.0.0.1:9001", "localhost"), "addr.yaml").unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
}

#[test]
fn checks_http_limits() {
    let yaml = format!("{GOOD}http:\n  max_header_bytes: 10\n");
    assert_eq!(invalid(&yaml).0, "http.max_header_bytes");
    let yaml = format!("{GOOD}http:\n  max_request_line: 100000\n");
    assert_eq!(invalid(&yaml).0, "http.max_request_line");
}

#[test]
fn an_empty_document_is_an_empty_config() {
    let config = Config::from_yaml("{}", "empty").unwrap();
    assert!(config.listeners.is_empty() && config.clusters.is_empty());
}

#[test]
fn identity_takes_files_or_a_ca_but_not_both_or_neither() {
    let files = "identity:\n  files: { cert: c.pem, key: k.pem, trust_bundle: b.pem }\n";
    let config = Config::from_yaml(files, "files").unwrap();
    assert!(matches!(config.identity, Some(IdentitySource::Files(_))));

    let ca = "identity:\n  ca:\n    address: 127.0.0.1:15012\n    root: /r.pem\n    spiffe_id: spiffe://td/ns/a/sa/b\n    token_file: /t\n";
    let config = Config::from_yaml(ca, "ca").unwrap();
    let Some(IdentitySource::Ca(client)) = &config.identity else {
        panic!("{config:?}");
    };
    assert_eq!(client.server_name, "tern-control");
    assert_eq!(client.spiffe_id.to_string(), "spiffe://td/ns/a/sa/b");
    // What is dumped (JSON) reads back the same.
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), config);

    for (yaml, why) in [
        ("identity: {}\n", "exactly one"),
        (
            "identity:\n  files: { cert: c, key: k, trust_bundle: b }\n  ca: { address: 127.0.0.1:1, root: r, spiffe_id: spiffe://td/ns/a/sa/b, token_file: t }\n",
            "exactly one",
        ),
        (
            "identity:\n  ca: { address: 127.0.0.1:1, root: r, spiffe_id: https://x, token_file: t }\n",
            "SPIFFE",
        ),
        ("identity:\n  cert: c\n", "unknown field"),
    ] {
        let error = Config::from_yaml(yaml, "bad").unwrap_err().to_string();
        assert!(error.contains(why), "{yaml}: {error}");
    }
}

#[test]
fn a_route_splits_by_weight_and_a_single_cluster_is_shorthand() {
    let yaml = GOOD.replace(
        "cluster: api",
        "backends: [{ cluster: api, weight: 90 }, { cluster: web, weight: 10 }]",
    );
    let config = Config::from_yaml(&yaml, "split.yaml").unwrap();
    let weights: Vec<_> = config.listeners[0].routes[0]
        .backends
        .iter()
        .map(|b| (b.cluster.as_str(), b.weight))
        .collect();
    assert_eq!(weights, [("api", 90), ("web", 10)]);
    let again = serde_yaml::to_string(&config).unwrap();
    assert_eq!(Config::from_yaml(&again, "again.yaml").unwrap(), config);

    let single = Config::from_yaml(GOOD, "good.yaml").unwrap();
    assert_eq!(single.listeners[0].routes[0].backends.len(), 1);
    assert!(
        serde_yaml::to_string(&single)
            .unwrap()
            .contains("cluster: api")
    );

    let both = GOOD.replace(
        "cluster: api",
        "cluster: api\n        backends: [{ cluster: web }]",
    );
    let err = Config::from_yaml(&both, "both.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exactly one of `cluster`, `backends` or `redirect`"),
        "{err}"
    );
}

#[test]
fn an_empty_cluster_is_allowed_and_discovery_needs_the_ca() {
    let empty = GOOD.replace("endpoints: [\"[::1]:9003\"]", "endpoints: []");
    assert!(Config::from_yaml(&empty, "empty.yaml").is_ok());

    let discovery = format!(
        "{GOOD}discovery:\n  workload: {{ namespace: shop, name: web-0 }}\n  outbound: [{{ service: cart.shop, port: 80, listen: 127.0.0.1:18080 }}]\n"
    );
    let (field, message) = invalid(&discovery);
    assert_eq!(field, "discovery");
    assert!(message.contains("identity.ca"), "{message}");
}

#[test]
fn interception_and_claiming_listeners_are_checked() {
    let intercepting = format!(
        "{GOOD}  - {{ name: cart, endpoints: [127.0.0.1:9004] }}\ninterception: {{ inbound_tls: {{ mode: disable }} }}\n"
    )
    .replacen(
        "listeners:\n",
        "listeners:\n  - { name: out-cart, address: 198.19.0.10:80, protocol: detect, cluster: cart, intercept: outbound }\n",
        1,
    );
    let config = Config::from_yaml(&intercepting, "good.yaml").unwrap();
    assert_eq!(config.listeners[0].intercept, Some(Intercept::Outbound));
    assert_eq!(config.detect_timeout, Duration::from_secs(1));
    let cases = [
        // Claiming needs the interception block.
        (
            intercepting.replace("interception: { inbound_tls: { mode: disable } }\n", ""),
            "listeners[0].intercept",
        ),
        // A detect listener needs its opaque cluster.
        (
            intercepting.replace("protocol: detect, cluster: cart,", "protocol: detect,"),
            "listeners[0].cluster",
        ),
        // The application's outbound connections are plaintext.
        (
            intercepting.replace("intercept: outbound", "intercept: outbound, tls: { mode: strict }"),
            "listeners[0].tls",
        ),
        // Two listeners claiming one destination.
        (
            intercepting.replacen(
                "listeners:\n",
                "listeners:\n  - { name: again, address: 198.19.0.10:80, protocol: tcp, cluster: cart, intercept: outbound }\n",
                1,
            ),
            "listeners[1].address",
        ),
        // A bound listener on an interception port would steal redirected connections.
        (
            intercepting.replace("127.0.0.1:5433", "127.0.0.1:15001"),
            "listeners[2].address",
        ),
        // The interception sockets' names are the proxy's.
        (
            intercepting.replace("name: db", "name: intercept-db"),
            "listeners[2].name",
        ),
    ];
    for (yaml, field) in cases {
        assert_eq!(invalid(&yaml).0, field, "{yaml}");
    }
}

#[test]
fn environment_variables_named_in_a_file_are_put_in_and_an_unset_one_is_an_error() {
    let env = |name: &str| match name {
        "POD_NAME" => Some("web-0".to_owned()),
        "POD_NAMESPACE" => Some("shop".to_owned()),
        _ => None,
    };
    assert_eq!(
        expand_env(
            "name: ${POD_NAME}.${POD_NAMESPACE} cost: $5 ${} ${a-b} $${POD_NAME}",
            env
        ),
        Ok("name: web-0.shop cost: $5 ${} ${a-b} $web-0".to_owned())
    );
    assert_eq!(
        expand_env("x: ${SERVICE_ACCOUNT}", env),
        Err("SERVICE_ACCOUNT".to_owned())
    );
    assert_eq!(
        expand_env("x: ${POD_NAME", env),
        Ok("x: ${POD_NAME".to_owned())
    );

    let dir = std::env::temp_dir().join(format!("tern-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.yaml");
    std::fs::write(
        &path,
        "listeners: []\nclusters: []\nadmin_note: ${TERN_TEST_SURELY_UNSET}\n",
    )
    .unwrap();
    let error = Config::from_file(&path).unwrap_err().to_string();
    assert!(
        error.ends_with("`${TERN_TEST_SURELY_UNSET}` is not set in the environment"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_ca_address_is_a_host_or_an_address_and_a_port() {
    for (text, host, port, shown) in [
        (
            "tern-control.tern-system.svc:15012",
            "tern-control.tern-system.svc",
            15012,
            None,
        ),
        ("127.0.0.1:15012", "127.0.0.1", 15012, None),
        ("[fd00::1]:15012", "fd00::1", 15012, None),
        ("localhost:1", "localhost", 1, None),
    ] {
        let parsed: HostPort = text.parse().unwrap();
        assert_eq!((parsed.host.as_str(), parsed.port), (host, port));
        assert_eq!(parsed.to_string(), shown.unwrap_or(text));
    }
    for bad in [
        "tern-control",
        "fd00::1:15012",
        "host:port",
        "host:70000",
        "host:0",
        ":15012",
        "a b:1",
        "[fd00::1:1",
    ] {
        assert!(bad.parse::<HostPort>().is_err(), "{bad}");
    }
}
