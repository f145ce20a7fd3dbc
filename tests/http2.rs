//! HTTP/2 (and gRPC's shape) through the proxy, on both IO backends: prior-knowledge h2c on
//! an `http` listener, many concurrent streams on one connection each routed on its own,
//! bodies both ways under flow control, trailers passed on, the proxy's own answers for no
//! route and a dead upstream, an mTLS sidecar pair carrying HTTP/2 inside (ALPN `tern-h2`), and a
//! long-lived connection that follows a config change (and whose pooled upstream connections
//! to endpoints a new config drops are closed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tests::h2::H2;
use tests::pki::{TempDir, TestCa};
use tests::upstream::{Http, MAX_CONCURRENT_STREAMS, dead_address, unresponsive};
use tests::{BackendChoice, both_backends, eventually, metric, start_proxy, wait_for_metric};

fn routed_config(a: std::net::SocketAddr, b: std::net::SocketAddr) -> String {
    format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n      - {{ path_prefix: /hang, cluster: a, timeout: 300ms }}\n      - {{ path_prefix: /a, cluster: a }}\n      - {{ path_prefix: /b, cluster: b }}\n      - {{ path_prefix: /echo, cluster: a }}\n      - {{ path_prefix: /dead, cluster: dead }}\n      - {{ host: grpc.example, cluster: a }}\n\
         clusters:\n  - {{ name: a, endpoints: [{a}] }}\n  - {{ name: b, endpoints: [{b}] }}\n  - {{ name: dead, endpoints: [{}], connect_timeout: 300ms }}\n",
        dead_address()
    )
}

fn streams_are_routed_each_on_its_own(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let proxy = start_proxy(&routed_config(a.addr, b.addr), backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());

    // Many streams at once on one connection, alternating routes.
    let paths: Vec<String> = (0..64)
        .map(|i| format!("/{}/{i}", if i % 2 == 0 { "a" } else { "b" }))
        .collect();
    for (path, answer) in paths.iter().zip(client.get_many("svc", &paths)) {
        assert_eq!(answer.status, 200, "{path}");
        let expected = format!("{} {path}", &path[1..2]);
        assert_eq!(answer.text(), expected);
    }
    // The upstream side multiplexes too: one connection per upstream per worker at most.
    assert!(a.connections.load(std::sync::atomic::Ordering::SeqCst) <= 2);

    // A body larger than the default flow-control window, both ways.
    let big = Bytes::from(tests::client::payload(1024 * 1024));
    let echoed = client.send("POST", "svc", "/echo", big.clone());
    assert_eq!(echoed.status, 200);
    assert!(
        echoed.body == big,
        "{} bytes back, not the {} sent",
        echoed.body.len(),
        big.len()
    );

    // gRPC's shape: routed by authority, body echoed, trailers passed on.
    let grpc = client.send(
        "POST",
        "grpc.example",
        "/grpc",
        Bytes::from_static(b"\0\0\0\0\x03abc"),
    );
    assert_eq!(grpc.body.as_ref(), b"\0\0\0\0\x03abc");
    let trailers = grpc.trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-served-by"], "a");

    // The proxy's own answers.
    let none = client.get("other.example", "/nowhere");
    assert_eq!(none.status, 404);
    assert_eq!(none.headers["x-tern-response-flag"], "NR");
    let dead = client.get("svc", "/dead");
    assert_eq!(dead.status, 503);
    assert_eq!(dead.headers["x-tern-response-flag"], "UF");
    // To a gRPC call, in gRPC's terms: a trailers-only answer with the call's status.
    let call = |authority: &str, path: &str| {
        client.request(
            hyper::Request::post(format!("http://{authority}{path}"))
                .header("content-type", "application/grpc+proto")
                .header("te", "trailers")
                .body(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                .unwrap(),
        )
    };
    for (authority, path, status, flag) in [
        ("svc", "/dead", "14", "UF"),
        ("other.example", "/nowhere", "12", "NR"),
        ("svc", "/hang", "4", "UT"),
    ] {
        let answer = call(authority, path);
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.headers["content-type"], "application/grpc");
        assert_eq!(answer.headers["grpc-status"], status, "{path}");
        let message = answer.headers["grpc-message"].to_str().unwrap();
        assert!(message.contains(&format!("({flag})")), "{message}");
        assert_eq!(answer.headers["x-tern-response-flag"], flag);
        assert!(answer.head_only, "{path}: trailers-only");
        assert!(answer.body.is_empty() && answer.trailers.is_none());
    }

    let metrics = wait_for_metric(
        &proxy,
        "tern_protocol_detections_total{listener=\"web\",protocol=\"http2\"}",
        1.0,
    );
    assert!(
        metric(&metrics, "tern_requests_total{listener=\"web\"}") >= 71.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "tern_errors_total{listener=\"web\",flag=\"NR\"}"),
        2.0
    );
    // HTTP/1.1 still works on the same listener.
    let response = tests::client::request(
        proxy.listener_addr("web").unwrap(),
        "GET /b/h1 HTTP/1.1\r\nHost: svc\r\n\r\n",
    );
    assert_eq!(response.text(), "b /b/h1");
}

fn an_mtls_pair_carries_http2_inside(backend: BackendChoice) {
    const A: &str = "spiffe://tern.test/ns/shop/sa/frontend";
    const B: &str = "spiffe://tern.test/ns/shop/sa/backend";
    let dir = TempDir::new("h2-mtls");
    let ca = TestCa::new("tern test root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let app = Http::start("app");
    let inbound = start_proxy(
        &format!(
            "{}listeners:\n  - {{ name: in, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: app }}], tls: {{ mode: strict }} }}\nclusters:\n  - {{ name: app, endpoints: [{}] }}\n",
            b_id.yaml(),
            app.addr
        ),
        backend,
    );
    let outbound = start_proxy(
        &format!(
            "{}listeners:\n  - {{ name: out, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: b }}] }}\nclusters:\n  - {{ name: b, endpoints: [{}], tls: {{ identity: \"{B}\" }}, connect_timeout: 2s }}\n",
            a_id.yaml(),
            inbound.listener_addr("in").unwrap()
        ),
        backend,
    );
    let client = H2::connect(outbound.listener_addr("out").unwrap());
    let paths: Vec<String> = (0..16).map(|i| format!("/x/{i}")).collect();
    for (path, answer) in paths.iter().zip(client.get_many("svc", &paths)) {
        assert_eq!(answer.text(), format!("app {path}"));
    }
    let grpc = client.send("POST", "svc", "/grpc", Bytes::from_static(b"payload"));
    assert_eq!(grpc.trailers.expect("trailers")["grpc-status"], "0");
    // The inbound side saw the outbound side's identity, over mTLS.
    // One mTLS connection per worker of the outbound side at most, every stream on it.
    let metrics = tests::admin_get(&inbound, "/metrics");
    let connections = metric(
        &metrics,
        &format!("tern_listener_peer_connections_total{{listener=\"in\",peer_identity=\"{A}\"}}"),
    );
    assert!((1.0..=2.0).contains(&connections), "{metrics}");
    assert!(
        metric(&metrics, "tern_requests_total{listener=\"in\"}") >= 17.0,
        "{metrics}"
    );
}

fn a_long_lived_connection_follows_config_changes(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let yaml = |to: &str| {
        format!(
            "listeners:\n  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: {to} }}] }}\nclusters:\n  - {{ name: a, endpoints: [{}] }}\n  - {{ name: b, endpoints: [{}] }}\n",
            a.addr, b.addr
        )
    };
    let proxy = start_proxy(&yaml("a"), backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());
    assert_eq!(client.get("svc", "/1").text(), "a /1");
    // gRPC clients keep one connection for hours: a route change reaches its next request.
    let config = shared::Config::from_yaml(&yaml("b"), "v2").unwrap();
    proxy.reload(config, "v2").unwrap();
    assert_eq!(client.get("svc", "/2").text(), "b /2");

    // An endpoint a new config no longer has (a scaled-down Service): the proxy's pooled
    // connection to it closes at the apply, not when its keep-alive next fails.
    let open = |upstream: &Http| upstream.open.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(open(&b), 1, "one pooled connection to b");
    let without_b = format!(
        "listeners:\n  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: a }}] }}\nclusters:\n  - {{ name: a, endpoints: [{}] }}\n",
        a.addr
    );
    let config = shared::Config::from_yaml(&without_b, "v3").unwrap();
    proxy.reload(config, "v3").unwrap();
    tests::eventually(
        std::time::Duration::from_secs(5),
        "the connection to b to close",
        || open(&b) == 0,
    );
    assert_eq!(client.get("svc", "/3").text(), "a /3");
    assert_eq!(open(&a), 1, "the connection to a, still configured, stays");
}

fn a_tunnel_or_a_host_other_than_the_authority_is_refused(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let proxy = start_proxy(&routed_config(a.addr, b.addr), backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());
    let connect = hyper::Request::builder()
        .method("CONNECT")
        .uri("grpc.example:443")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let answer = client.request(connect);
    assert_eq!(answer.status, 501);
    assert_eq!(answer.headers["x-tern-response-flag"], "DPE");
    // Routed as `svc`, it would reach an upstream told `grpc.example` by its Host field.
    let mismatched = hyper::Request::builder()
        .uri("http://svc/a/1")
        .header("host", "grpc.example")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client.request(mismatched).status, 400);
    // The same host in both is fine, and the connection still serves.
    let agreeing = hyper::Request::builder()
        .uri("http://svc/a/2")
        .header("host", "SVC")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client.request(agreeing).text(), "a /a/2");
}

fn clients_that_stop_reading_do_not_stall_others_on_the_same_upstream(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    // One worker, so every stream to `a` shares its one upstream connection.
    let proxy = tests::start_one_worker(&routed_config(a.addr, b.addr), backend);
    let addr = proxy.listener_addr("web").unwrap();
    // Six clients ask for 4 MiB each and read none of it: past what each client's own
    // windows take, each stream holds what the proxy lets the upstream send it, on the one
    // upstream connection they share.
    let stalled: Vec<_> = (0..6)
        .map(|_| {
            let client = H2::connect(addr);
            let response = client.get_unread("svc", "/a/bytes/4194304");
            (client, response)
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Another client's stream to the same upstream still gets through.
    let answer = H2::connect(addr).get("svc", "/a/after");
    assert_eq!(answer.text(), "a /a/after");
    assert_eq!(a.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(stalled);
}

fn streams_past_the_upstreams_limit_go_on_another_connection(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    // One worker, so every stream to `a` looks for a place on the same pooled connections.
    // The streams held open get a long route timeout (so none ends while the test runs); the
    // last request a short one, so that queued behind the upstream's stream limit it fails
    // fast rather than waiting out the default.
    let config = routed_config(a.addr, b.addr).replace(
        "{ path_prefix: /a, cluster: a }",
        "{ path_prefix: /a/hang, cluster: a, timeout: 60s }\n      - { path_prefix: /a, cluster: a, timeout: 2s }",
    );
    let proxy = tests::start_one_worker(&config, backend);
    let addr = proxy.listener_addr("web").unwrap();
    // As many streams as the upstream allows on one connection, each left open (long-lived
    // gRPC streams, say).
    let holder = H2::connect(addr);
    for i in 0..MAX_CONCURRENT_STREAMS {
        holder.start_get("svc", &format!("/a/hang/{i}"));
    }
    eventually(Duration::from_secs(10), "the held streams upstream", || {
        a.requests.load(Ordering::SeqCst) == MAX_CONCURRENT_STREAMS as usize
    });
    // One more stream to the same upstream is answered, on a second connection.
    let answer = H2::connect(addr).get("svc", "/a/after");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.text(), "a /a/after");
    assert_eq!(a.connections.load(Ordering::SeqCst), 2);
    drop(holder);
}

fn a_restarted_upstream_is_reached_past_its_dead_pooled_connection(backend: BackendChoice) {
    let a = Http::start("a");
    let address = a.addr;
    let b = Http::start("b");
    let proxy = tests::start_one_worker(&routed_config(a.addr, b.addr), backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());
    assert_eq!(client.get("svc", "/a/first").text(), "a /a/first");
    // The upstream restarts on the same address: the pooled connection is dead.
    drop(a);
    let a = Http::on(std::net::TcpListener::bind(address).unwrap(), "a");
    std::thread::sleep(std::time::Duration::from_millis(100));
    // The one endpoint is not given up for the dead connection: a new one is made.
    let answer = client.get("svc", "/a/again");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.text(), "a /a/again");
    assert_eq!(a.connections.load(Ordering::SeqCst), 1);
}

fn an_upstream_that_goes_quiet_mid_response_is_cut_at_the_idle_timeout(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let quiet = format!(
        "{{ name: a, endpoints: [{}], idle_timeout: 300ms }}",
        a.addr
    );
    let config = routed_config(a.addr, b.addr)
        .replace(&format!("{{ name: a, endpoints: [{}] }}", a.addr), &quiet);
    let proxy = start_proxy(&config, backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());
    // The head and a first chunk arrive; then the upstream sends nothing more, and the
    // stream is reset rather than held open for ever.
    let (status, body) = client.get_outcome("svc", "/a/stall");
    assert_eq!(status, 200);
    assert!(body.is_err(), "{body:?}");
    wait_for_metric(
        &proxy,
        "tern_errors_total{listener=\"web\",flag=\"IT\"}",
        1.0,
    );
    // A body that keeps coming, each chunk within the timeout, is not cut, however long it
    // takes in all.
    let (status, body) = client.get_outcome("svc", "/a/drip");
    assert_eq!(status, 200);
    let expected: String = (0..8).map(|i| format!("drip{i};")).collect();
    assert_eq!(body.unwrap(), expected.as_bytes());
    // The connection carries on.
    assert_eq!(client.get("svc", "/a/next").text(), "a /a/next");
}

/// A connection with no request under way for `keepalive_timeout` is closed with a GOAWAY,
/// as an idle HTTP/1.1 one is: not while a request waits for its answer; and a response body
/// that streams on past the timeout (its head was the answer) is let finish, where an abrupt
/// close would cut it.
fn an_idle_connection_is_closed_after_the_keepalive_timeout(backend: BackendChoice) {
    let a = Http::start("a");
    let config = format!(
        "listeners:\n  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: a }}] }}\n\
         clusters:\n  - {{ name: a, endpoints: [{}] }}\nhttp:\n  keepalive_timeout: 500ms\n",
        a.addr
    );
    let proxy = start_proxy(&config, backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());
    // Under way for 1.5 s, past the timeout: the connection stays.
    assert_eq!(client.get("svc", "/slow/1500").text(), "a slow");
    assert!(!client.is_closed());
    assert_eq!(client.get("svc", "/next").text(), "a /next");
    // Eight chunks 100 ms apart: the head is the answer, the connection idle from then on,
    // and its GOAWAY comes mid-body; the body still arrives whole.
    let (status, body) = client.get_outcome("svc", "/x/drip");
    assert_eq!(status, 200);
    let expected: String = (0..8).map(|i| format!("drip{i};")).collect();
    assert_eq!(body.unwrap(), expected.as_bytes());
    eventually(
        Duration::from_secs(3),
        "the idle connection to close",
        || client.is_closed(),
    );
    // A new one is served.
    let again = H2::connect(proxy.listener_addr("web").unwrap());
    assert_eq!(again.get("svc", "/again").text(), "a /again");
}

fn streams_waiting_on_a_connection_that_cannot_be_made_go_to_the_next_endpoint(
    backend: BackendChoice,
) {
    let live = Http::start("live");
    let b = Http::start("b");
    // One endpoint is down (its SYNs go unanswered) and one is up; the route's timeout is
    // short. Streams that arrive while the connection to the dead one is being made wait for
    // it; when it fails they all go on to the live one, rather than each trying the dead one
    // again in turn (which would leave the last of them past the route's timeout).
    let config = routed_config(live.addr, b.addr)
        .replace(
            &format!("{{ name: a, endpoints: [{}] }}", live.addr),
            &format!(
                "{{ name: a, endpoints: [{}, {}], connect_timeout: 400ms }}",
                unresponsive(),
                live.addr
            ),
        )
        .replace(
            "{ path_prefix: /a, cluster: a }",
            "{ path_prefix: /a, cluster: a, timeout: 2s }",
        );
    let proxy = tests::start_one_worker(&config, backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());
    let paths: Vec<String> = (0..16).map(|i| format!("/a/{i}")).collect();
    for (path, answer) in paths.iter().zip(client.get_many("svc", &paths)) {
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        assert_eq!(answer.text(), format!("live {path}"));
    }
}

/// A route's matches on method, query and an exact path pick streams' routes one by one,
/// and its header edits change each stream's request and response.
fn routes_match_method_query_and_exact_path_and_edit_headers(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n      \
         - {{ path_exact: /headers, method: PUT, cluster: b }}\n      \
         - {{ path_prefix: /headers, query: [{{ name: v, value: \"2\" }}], cluster: b }}\n      \
         - {{ path_prefix: /, cluster: a, \
         request_headers: {{ set: [{{ name: x-env, value: prod }}], add: [{{ name: x-tag, value: mesh }}], remove: [x-debug] }}, \
         response_headers: {{ set: [{{ name: server, value: tern }}], add: [{{ name: cache-control, value: no-store }}], remove: [x-upstream-debug] }} }}\n\
         clusters:\n  - {{ name: a, endpoints: [{}] }}\n  - {{ name: b, endpoints: [{}] }}\n",
        a.addr, b.addr
    );
    let proxy = start_proxy(&yaml, backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());
    let request = hyper::Request::get("http://svc/headers")
        .header("x-env", "dev")
        .header("x-tag", "client")
        .header("x-debug", "1")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let edited = client.request(request);
    assert_eq!(edited.status, 200);
    let seen = edited.text();
    assert!(seen.starts_with("a\n"), "{seen}");
    assert!(
        seen.contains("x-env: prod\n") && !seen.contains("dev"),
        "{seen}"
    );
    assert!(seen.contains("x-tag: client\nx-tag: mesh\n"), "{seen}");
    assert!(!seen.contains("x-debug"), "{seen}");
    let values = |name: &str| -> Vec<&str> {
        edited
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(values("server"), ["tern"]);
    assert_eq!(values("cache-control"), ["private", "no-store"]);
    assert!(values("x-upstream-debug").is_empty());

    let served_by = |method: &str, path: &str| {
        let answer = client.send(method, "svc", path, Bytes::new());
        answer.text().lines().next().unwrap_or_default().to_owned()
    };
    assert_eq!(served_by("PUT", "/headers"), "b");
    assert_eq!(served_by("PUT", "/headers/x"), "a");
    assert_eq!(served_by("GET", "/headers?v=2"), "b");
    assert_eq!(served_by("GET", "/headers?v=3"), "a");
    assert_eq!(served_by("GET", "/headers"), "a");
}

/// A route's redirect answers a stream for the upstream; a route's rewrite sends the
/// upstream another path and authority.
fn a_route_redirects_or_rewrites_the_url(backend: BackendChoice) {
    let app = Http::start("app");
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n      \
         - {{ path_prefix: /old, redirect: {{ hostname: other.example, path: {{ replace_full_path: /moved }}, status: 308 }} }}\n      \
         - {{ path_prefix: /v1, rewrite: {{ hostname: app.internal, path: {{ replace_prefix_match: /headers }} }}, cluster: app }}\n\
         clusters:\n  - {{ name: app, endpoints: [{}] }}\n",
        app.addr
    );
    let proxy = start_proxy(&yaml, backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());
    let moved = client.get("svc:8080", "/old/x?q=1");
    assert_eq!(moved.status, 308);
    assert_eq!(
        moved.headers["location"],
        "http://other.example:8080/moved?q=1"
    );
    assert_eq!(app.requests.load(Ordering::SeqCst), 0);

    let rewritten = client.get("svc", "/v1/sub?k=v");
    assert_eq!(rewritten.status, 200);
    let seen = rewritten.text();
    // The upstream answered `/headers/...` (its path was rewritten), and saw the new host.
    assert!(seen.starts_with("app\n"), "{seen}");
    assert!(seen.contains(":authority: app.internal\n"), "{seen}");
    assert!(!seen.contains("svc"), "{seen}");
    assert_eq!(app.requests.load(Ordering::SeqCst), 1);
}

both_backends!(
    an_idle_connection_is_closed_after_the_keepalive_timeout,
    streams_waiting_on_a_connection_that_cannot_be_made_go_to_the_next_endpoint,
    an_upstream_that_goes_quiet_mid_response_is_cut_at_the_idle_timeout,
    a_restarted_upstream_is_reached_past_its_dead_pooled_connection,
    streams_past_the_upstreams_limit_go_on_another_connection,
    clients_that_stop_reading_do_not_stall_others_on_the_same_upstream,
    a_tunnel_or_a_host_other_than_the_authority_is_refused,
    streams_are_routed_each_on_its_own,
    routes_match_method_query_and_exact_path_and_edit_headers,
    a_route_redirects_or_rewrites_the_url,
    an_mtls_pair_carries_http2_inside,
    a_long_lived_connection_follows_config_changes,
);
