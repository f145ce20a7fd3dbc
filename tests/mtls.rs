//! Mutual TLS between two sidecars: an outbound proxy originates mTLS to an inbound proxy,
//! which checks the client's certificate and terminates it; the outbound side checks the
//! inbound side's SPIFFE ID. Byte-exact both ways; every bad peer is refused and counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tests::client::{self, Conn};
use tests::h2::H2;
use tests::otlp::attribute;
use tests::pki::{IdentityPaths, TempDir, TestCa};
use tests::upstream::{Echo, Http};
use tests::{BackendChoice, Proxy, both_backends, metric, start_proxy, wait_for_metric};

const A: &str = "spiffe://tern.test/ns/shop/sa/frontend";
const B: &str = "spiffe://tern.test/ns/shop/sa/backend";

/// The inbound sidecar: `in-tcp` and `in-http` require mTLS and deliver to the apps.
fn inbound(
    backend: BackendChoice,
    identity: &IdentityPaths,
    tcp_app: SocketAddr,
    http_app: SocketAddr,
) -> Proxy {
    inbound_with(backend, identity, (tcp_app, http_app), "")
}

/// [`inbound`], with `more` (`, field: value`) in both listeners.
fn inbound_with(
    backend: BackendChoice,
    identity: &IdentityPaths,
    apps: (SocketAddr, SocketAddr),
    more: &str,
) -> Proxy {
    start_proxy(&inbound_yaml(identity, apps, more), backend)
}

/// [`inbound_with`]'s config.
fn inbound_yaml(
    identity: &IdentityPaths,
    (tcp_app, http_app): (SocketAddr, SocketAddr),
    more: &str,
) -> String {
    format!(
        "{}listeners:\n\
         \x20 - {{ name: in-tcp, address: 127.0.0.1:0, protocol: tcp, cluster: tcp-app, tls: {{ mode: strict, handshake_timeout: 400ms }}{more} }}\n\
         \x20 - {{ name: in-http, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: http-app }}], tls: {{ mode: strict }}{more} }}\n\
         clusters:\n\
         \x20 - {{ name: tcp-app, endpoints: [{tcp_app}] }}\n\
         \x20 - {{ name: http-app, endpoints: [{http_app}] }}\n",
        identity.yaml()
    )
}

/// The outbound sidecar: plaintext from the app, mTLS to the inbound sidecar expecting `peer`.
fn outbound(
    backend: BackendChoice,
    identity: &IdentityPaths,
    inbound: &Proxy,
    peer: &str,
) -> Proxy {
    let yaml = format!(
        "{}listeners:\n\
         \x20 - {{ name: out-tcp, address: 127.0.0.1:0, protocol: tcp, cluster: b-tcp }}\n\
         \x20 - {{ name: out-http, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: b-http }}] }}\n\
         clusters:\n\
         \x20 - {{ name: b-tcp, endpoints: [{}], tls: {{ identity: \"{peer}\" }}, connect_timeout: 2s }}\n\
         \x20 - {{ name: b-http, endpoints: [{}], tls: {{ identity: \"{peer}\" }}, connect_timeout: 2s }}\n",
        identity.yaml(),
        inbound.listener_addr("in-tcp").unwrap(),
        inbound.listener_addr("in-http").unwrap(),
    );
    start_proxy(&yaml, backend)
}

struct Mesh {
    _dir: TempDir,
    _echo: Echo,
    _http: Http,
    a: Proxy,
    b: Proxy,
}

fn mesh(backend: BackendChoice) -> Mesh {
    let dir = TempDir::new("mtls");
    let ca = TestCa::new("tern test root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let echo = Echo::start();
    let http = Http::start("app");
    let b = inbound(backend, &b_id, echo.addr, http.addr);
    let a = outbound(backend, &a_id, &b, B);
    Mesh {
        _dir: dir,
        _echo: echo,
        _http: http,
        a,
        b,
    }
}

fn tcp_is_byte_exact_both_ways_with_half_close(backend: BackendChoice) {
    let m = mesh(backend);
    let sent =
        client::assert_bulk_echo(m.a.listener_addr("out-tcp").unwrap(), 10 * 1024 * 1024 + 7);
    // The inbound side's listener saw it all, decrypted.
    let metrics = wait_for_metric(
        &m.b,
        "tern_listener_active_connections{listener=\"in-tcp\"}",
        0.0,
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_listener_received_bytes_total{listener=\"in-tcp\"}"
        ),
        sent as f64
    );
    // The inbound side knows who connected.
    let peer = format!(
        "tern_listener_peer_connections_total{{listener=\"in-tcp\",peer_identity=\"{A}\"}}"
    );
    assert_eq!(metric(&metrics, &peer), 1.0);
}

fn many_small_messages(backend: BackendChoice) {
    let m = mesh(backend);
    let mut stream = client::connect(m.a.listener_addr("out-tcp").unwrap());
    for i in 0..2000 {
        let message = format!("message {i:06}");
        stream.write_all(message.as_bytes()).unwrap();
        let mut reply = vec![0u8; message.len()];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply, message.as_bytes());
    }
}

fn http_requests_cross_the_tunnel_on_pooled_connections(backend: BackendChoice) {
    let m = mesh(backend);
    let mut conn = Conn::open(m.a.listener_addr("out-http").unwrap());
    for i in 0..20 {
        conn.send(format!("GET /r/{i} HTTP/1.1\r\nHost: backend\r\n\r\n").as_bytes());
        assert_eq!(conn.response(false).text(), format!("app /r/{i}"));
    }
    conn.send(b"POST /echo HTTP/1.1\r\nHost: backend\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(conn.response(false).text(), "hello");
    // One mTLS connection carried all of them.
    let metrics = wait_for_metric(
        &m.a,
        "tern_upstream_pool_reuses_total{cluster=\"b-http\"}",
        20.0,
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_upstream_connections_total{cluster=\"b-http\"}"
        ),
        1.0
    );
}

/// Through A, a TCP client that sends a byte sees a close and an HTTP client the proxy's own
/// `status` with `flag`.
fn a_cannot_reach_b(a: &Proxy, (status, flag): (u16, &str)) {
    let mut stream = client::connect(a.listener_addr("out-tcp").unwrap());
    let _ = stream.write_all(b"ping");
    let mut buf = [0u8; 8];
    assert_eq!(client::read_some(&mut stream, &mut buf).unwrap_or(0), 0);
    let response = client::request(
        a.listener_addr("out-http").unwrap(),
        "GET / HTTP/1.1\r\nHost: b\r\n\r\n",
    );
    assert_eq!(
        (response.status, response.header("x-tern-response-flag")),
        (status, Some(flag))
    );
}

/// Expects the outbound proxy to refuse B (B's certificate fails A's checks): the TCP client
/// sees a close, an HTTP client a 503, and the failure counts as a failed connect.
fn refused_by_outbound(a: &Proxy) {
    a_cannot_reach_b(a, (503, "UF"));
    assert!(
        metric(
            &tests::admin_get(a, "/metrics"),
            "tern_upstream_connect_failures_total{cluster=\"b-tcp\"}"
        ) >= 1.0
    );
}

/// Expects B to refuse A's client certificate. In TLS 1.3 the server checks the client's
/// certificate after the client has finished its side of the handshake, so A learns of the
/// refusal from B's alert on its first read: a TCP client sees a close, an HTTP client a 502.
fn refused_by_inbound(a: &Proxy, b: &Proxy) {
    a_cannot_reach_b(a, (502, "UC"));
    // B counts each refusal once it has sent its alert, which may be after A has answered.
    for listener in ["in-tcp", "in-http"] {
        wait_for_metric(
            b,
            &format!("tern_errors_total{{listener=\"{listener}\",flag=\"TLS\"}}"),
            1.0,
        );
    }
}

/// Reads until the proxy closes; what came back must not be an answer (at most a TLS alert).
fn refused_without_an_answer(conn: &mut Conn) {
    let mut got = Vec::new();
    // A read timeout (the client's, 10 s) would mean the proxy left the connection open.
    conn.stream
        .read_to_end(&mut got)
        .expect("the proxy closes the connection");
    assert!(
        got.is_empty() || got[0] == 0x15,
        "expected nothing or a TLS alert, got {:?}",
        String::from_utf8_lossy(&got)
    );
}

fn the_wrong_identity_is_refused(backend: BackendChoice) {
    let dir = TempDir::new("mtls-wrong");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(
        &dir.0,
        "b",
        "spiffe://tern.test/ns/shop/sa/impostor",
        &[&ca],
        false,
    );
    let (echo, http) = (Echo::start(), Http::start("app"));
    let b = inbound(backend, &b_id, echo.addr, http.addr);
    let a = outbound(backend, &a_id, &b, B);
    refused_by_outbound(&a);
}

fn an_untrusted_ca_is_refused_both_ways(backend: BackendChoice) {
    let dir = TempDir::new("mtls-untrusted");
    let (ca, rogue) = (TestCa::new("root"), TestCa::new("rogue"));
    // B's certificate comes from a CA A does not trust.
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = rogue.write_identity(&dir.0, "b", B, &[&ca], false);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let b = inbound(backend, &b_id, echo.addr, http.addr);
    let a = outbound(backend, &a_id, &b, B);
    refused_by_outbound(&a);
    // A's certificate comes from a CA B does not trust: B refuses the client.
    let a_rogue = rogue.write_identity(&dir.0, "a2", A, &[&ca, &rogue], false);
    let b_ok = ca.write_identity(&dir.0, "b2", B, &[&ca], false);
    let b2 = inbound(backend, &b_ok, echo.addr, http.addr);
    let a2 = outbound(backend, &a_rogue, &b2, B);
    refused_by_inbound(&a2, &b2);
}

fn a_client_from_another_trust_domain_is_refused(backend: BackendChoice) {
    let dir = TempDir::new("mtls-domain");
    let ca = TestCa::new("root");
    // A's certificate chains to the root B trusts, but names a workload of another mesh.
    let a_id = ca.write_identity(
        &dir.0,
        "a",
        "spiffe://elsewhere.test/ns/shop/sa/frontend",
        &[&ca],
        false,
    );
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let b = inbound(backend, &b_id, echo.addr, http.addr);
    let a = outbound(backend, &a_id, &b, B);
    refused_by_inbound(&a, &b);
}

/// A listener's authorization lets in only the peers it names: A's traffic flows both ways,
/// while another workload of the mesh, with a good certificate, is turned away once its
/// handshake is done: its opaque TCP connection is closed, its HTTP requests are answered 403
/// (a gRPC call PERMISSION_DENIED) on a connection that stays open, each counted under
/// `RBAC`. A new config that lets it in serves it on the connection it has.
fn an_authorization_lets_in_only_the_peers_it_names(backend: BackendChoice) {
    let dir = TempDir::new("mtls-authz");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let intruder = "spiffe://tern.test/ns/shop/sa/intruder";
    let c_id = ca.write_identity(&dir.0, "c", intruder, &[&ca], false);
    let ops = "spiffe://tern.test/ns/ops/sa/debugger";
    let d_id = ca.write_identity(&dir.0, "d", ops, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let apps = (echo.addr, http.addr);
    let allow = |more: &str| {
        format!(", authorization: {{ identities: [\"{A}\"{more}], namespaces: [ops] }}")
    };
    let b = inbound_with(backend, &b_id, apps, &allow(""));
    for (caller, id) in [("frontend", &a_id), ("ops", &d_id)] {
        let a = outbound(backend, id, &b, B);
        client::assert_echo(a.listener_addr("out-tcp").unwrap(), b"let in");
        let response = client::request(
            a.listener_addr("out-http").unwrap(),
            "GET / HTTP/1.1\r\nHost: b\r\n\r\n",
        );
        assert_eq!(response.status, 200, "{caller}");
    }
    let c = outbound(backend, &c_id, &b, B);
    let mut stream = client::connect(c.listener_addr("out-tcp").unwrap());
    let _ = stream.write_all(b"ping");
    assert_eq!(
        client::read_some(&mut stream, &mut [0u8; 8]).unwrap_or(0),
        0
    );
    let connections = "tern_listener_connections_total{listener=\"in-http\"}";
    let before = metric(&tests::admin_get(&b, "/metrics"), connections);
    let mut conn = Conn::open(c.listener_addr("out-http").unwrap());
    for _ in 0..2 {
        conn.send(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n");
        let response = conn.response(false);
        assert_eq!(
            (response.status, response.header("x-tern-response-flag")),
            (403, Some("RBAC"))
        );
    }
    let call = H2::connect(c.listener_addr("out-http").unwrap()).request(
        hyper::Request::post("http://b/shop.Backend/Get")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            )))
            .unwrap(),
    );
    assert_eq!(call.status, 200);
    assert_eq!(call.headers["grpc-status"], "7");
    assert_eq!(call.headers["x-tern-response-flag"], "RBAC");
    wait_for_metric(
        &b,
        "tern_errors_total{listener=\"in-tcp\",flag=\"RBAC\"}",
        1.0,
    );
    let metrics = wait_for_metric(
        &b,
        "tern_errors_total{listener=\"in-http\",flag=\"RBAC\"}",
        3.0,
    );
    // b kept the connection the two HTTP/1.1 requests came on (the gRPC call came on another).
    assert_eq!(metric(&metrics, connections), before + 2.0);
    let widened = inbound_yaml(&b_id, apps, &allow(&format!(", \"{intruder}\"")));
    b.reload(shared::Config::from_yaml(&widened, "v2").unwrap(), "v2")
        .unwrap();
    conn.send(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n");
    assert_eq!(conn.response(false).status, 200);
    let metrics = tests::admin_get(&b, "/metrics");
    assert_eq!(metric(&metrics, connections), before + 2.0);
    // Turned away again: the connections it has been let in on since (the HTTP/1.1 one and
    // the HTTP/2 one c keeps in its pool) are closed, as any other would be.
    let narrowed = inbound_yaml(&b_id, apps, &allow(""));
    b.reload(shared::Config::from_yaml(&narrowed, "v3").unwrap(), "v3")
        .unwrap();
    wait_for_metric(
        &b,
        "tern_errors_total{listener=\"in-http\",flag=\"RBAC\"}",
        5.0,
    );
}

/// A rule lets a caller make some HTTP requests only: the methods and paths it names, over
/// HTTP/1.1 (origin or absolute form) and HTTP/2, and not a path that could be read as
/// another; never opaque TCP. A config that lets a peer do less (a rule where it was let in
/// for everything, or another rule) closes that peer's open connections.
fn an_authorization_rule_lets_a_caller_make_some_requests(backend: BackendChoice) {
    let dir = TempDir::new("mtls-rules");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let ci = "spiffe://tern.test/ns/shop/sa/ci";
    let c_id = ca.write_identity(&dir.0, "c", ci, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let apps = (echo.addr, http.addr);
    let rules = |a: &str, c: &str| {
        format!(", authorization: {{ {a}rules: [{{ identities: [\"{ci}\"], {c} }}] }}")
    };
    let everything_for_a = format!("identities: [\"{A}\"], ");
    let some_for_c = "methods: [GET, HEAD], paths: [\"/public/*\", /health]";
    let b = inbound_with(backend, &b_id, apps, &rules(&everything_for_a, some_for_c));
    let a = outbound(backend, &a_id, &b, B);
    let mut held = client::connect(a.listener_addr("out-tcp").unwrap());
    held.write_all(b"everything").unwrap();
    let mut echoed = [0u8; 10];
    held.read_exact(&mut echoed).unwrap();
    let c = outbound(backend, &c_id, &b, B);
    let mut stream = client::connect(c.listener_addr("out-tcp").unwrap());
    let _ = stream.write_all(b"ping");
    assert_eq!(
        client::read_some(&mut stream, &mut [0u8; 8]).unwrap_or(0),
        0
    );

    let mut conn = Conn::open(c.listener_addr("out-http").unwrap());
    for (request, status) in [
        ("GET /public/a?x=1", 200),
        ("HEAD /health", 200),
        ("GET http://b/public/absolute", 200),
        ("POST /public/a", 403),
        ("GET /private", 403),
        ("GET /health/more", 403),
        ("GET /public/../private", 403),
        ("GET /public/%2e%2e/private", 403),
    ] {
        conn.send(format!("{request} HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n").as_bytes());
        let response = conn.response(request.starts_with("HEAD"));
        assert_eq!(response.status, status, "{request}");
        if status == 403 {
            assert_eq!(response.header("x-tern-response-flag"), Some("RBAC"));
        }
    }
    let h2 = H2::connect(c.listener_addr("out-http").unwrap());
    assert_eq!(h2.get("b", "/public/h2").status, 200);
    assert_eq!(h2.get("b", "/private/h2").status, 403);
    let call = h2.request(
        hyper::Request::post("http://b/shop.Backend/Get")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            )))
            .unwrap(),
    );
    assert_eq!(call.headers["grpc-status"], "7");
    let rbac = |listener: &str, count: f64| {
        let series = format!("tern_errors_total{{listener=\"{listener}\",flag=\"RBAC\"}}");
        wait_for_metric(&b, &series, count);
    };
    rbac("in-tcp", 1.0);
    rbac("in-http", 7.0);

    // c may also POST: a change that only widens closes none of its connections.
    let widened = rules(
        &everything_for_a,
        &some_for_c.replace("HEAD]", "HEAD, POST]"),
    );
    let yaml = inbound_yaml(&b_id, apps, &widened);
    b.reload(shared::Config::from_yaml(&yaml, "wider").unwrap(), "wider")
        .unwrap();
    conn.send(b"POST /public/a HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(conn.response(false).status, 200);
    assert_eq!(h2.get("b", "/public/h2").status, 200);

    // A is let in for GETs only, and c for HEADs only: A's tunnel closes, and so do the two
    // connections c keeps to b (HTTP/1.1 and HTTP/2).
    let narrowed = rules("identities: [], namespaces: [], ", "methods: [HEAD]").replace(
        "rules: [",
        &format!("rules: [{{ identities: [\"{A}\"], methods: [GET] }}, "),
    );
    let yaml = inbound_yaml(&b_id, apps, &narrowed);
    b.reload(shared::Config::from_yaml(&yaml, "v2").unwrap(), "v2")
        .unwrap();
    let mut rest = Vec::new();
    match held.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
    }
    rbac("in-tcp", 2.0);
    rbac("in-http", 9.0);
    let response = client::request(
        a.listener_addr("out-http").unwrap(),
        "GET /anything HTTP/1.1\r\nHost: b\r\n\r\n",
    );
    assert_eq!(response.status, 200);
    conn.send(b"GET /public/a HTTP/1.1\r\nHost: b\r\n\r\n");
    assert_eq!(conn.response(false).status, 403);
    conn.send(b"HEAD /public/a HTTP/1.1\r\nHost: b\r\n\r\n");
    assert_eq!(conn.response(true).status, 200);
    // c may first meet its HTTP/2 connection's close; never a 200.
    tests::eventually(Duration::from_secs(2), "a 403 over HTTP/2", || {
        let status = h2.get("b", "/public/h2").status;
        assert_ne!(status, 200);
        status == 403
    });
}

/// Counts the 200s among `statuses`, each a 200 or an over-the-limit answer, and checks that
/// a cap allowing `burst` at once and `rate` a second let through no fewer than its burst
/// and no more than it allows in the `elapsed` they took.
fn within_cap(statuses: &[u16], refused: u16, burst: usize, rate: usize, elapsed: Duration) {
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let most = burst + (elapsed.as_secs_f64() * rate as f64).ceil() as usize;
    assert!(ok >= burst && ok <= most, "{statuses:?} in {elapsed:?}");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == refused),
        "{statuses:?}"
    );
}

/// A rate limit answers 429 (a gRPC call RESOURCE_EXHAUSTED) to the requests over a caller's
/// own cap (per identity, or its override's) on all its connections, and to those over the
/// listener's total from any caller; a config push that leaves the limit as it was keeps what
/// it counted.
fn a_rate_limit_caps_each_caller_and_all_together(backend: BackendChoice) {
    let dir = TempDir::new("mtls-rate");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let ci = "spiffe://tern.test/ns/shop/sa/ci";
    let c_id = ca.write_identity(&dir.0, "c", ci, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let apps = (echo.addr, http.addr);
    // On in-http (a `tcp` listener takes no rate limit).
    let yaml = |per_identity: u32| {
        inbound_yaml(&b_id, apps, "").replace(
            "tls: { mode: strict } }",
            &format!(
                "tls: {{ mode: strict }}, rate_limit: {{ per_identity: {per_identity}, overrides: [{{ identities: [\"{ci}\"], requests_per_second: 3 }}] }} }}"
            ),
        )
    };
    let b = start_proxy(&yaml(1), backend);
    let a = outbound(backend, &a_id, &b, B);
    let c = outbound(backend, &c_id, &b, B);

    // A: one a second, over HTTP/1.1 on one connection.
    let mut conn = Conn::open(a.listener_addr("out-http").unwrap());
    let a_started = Instant::now();
    let statuses: Vec<u16> = (0..6)
        .map(|_| {
            conn.send(b"GET /x HTTP/1.1\r\nHost: b\r\n\r\n");
            let response = conn.response(false);
            if response.status == 429 {
                assert_eq!(response.header("x-tern-response-flag"), Some("RL"));
            }
            response.status
        })
        .collect();
    within_cap(&statuses, 429, 1, 1, a_started.elapsed());
    let mut refused = statuses.iter().filter(|&&s| s == 429).count();

    // A push that leaves the limit as it was keeps A's count, on a new connection too (the
    // cap has room again a second after A's first request: checked only before).
    b.reload(shared::Config::from_yaml(&yaml(1), "v2").unwrap(), "v2")
        .unwrap();
    let status = client::request(
        a.listener_addr("out-http").unwrap(),
        "GET /y HTTP/1.1\r\nHost: b\r\n\r\n",
    )
    .status;
    if a_started.elapsed() < Duration::from_millis(900) {
        assert_eq!(status, 429);
    }
    refused += usize::from(status == 429);
    // A new limit starts full: ten at once, where the old one had room for one.
    b.reload(shared::Config::from_yaml(&yaml(50), "v3").unwrap(), "v3")
        .unwrap();
    for i in 0..10 {
        conn.send(b"GET /z HTTP/1.1\r\nHost: b\r\n\r\n");
        assert_eq!(conn.response(false).status, 200, "request {i}");
    }

    // c: its override's three a second, for gRPC calls over HTTP/2.
    let h2 = H2::connect(c.listener_addr("out-http").unwrap());
    let started = Instant::now();
    let statuses: Vec<u16> = (0..8)
        .map(|_| {
            let call = h2.request(
                hyper::Request::post("http://b/shop.Backend/Get")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                        b"\0\0\0\0\0",
                    )))
                    .unwrap(),
            );
            assert_eq!(call.status, 200);
            match call.headers.get("grpc-status") {
                None => 200,
                Some(status) => {
                    assert_eq!(status, "8");
                    429
                }
            }
        })
        .collect();
    within_cap(&statuses, 429, 3, 3, started.elapsed());
    refused += statuses.iter().filter(|&&s| s == 429).count();
    let limited = "tern_errors_total{listener=\"in-http\",flag=\"RL\"}";
    wait_for_metric(&b, limited, refused as f64);

    // A total caps every caller together: three a second, whatever the connection.
    let web = start_proxy(
        &format!(
            "listeners:\n\
             \x20 - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: app }}], rate_limit: {{ total: 3 }} }}\n\
             clusters:\n\
             \x20 - {{ name: app, endpoints: [{}] }}\n",
            http.addr
        ),
        backend,
    );
    let started = Instant::now();
    let statuses: Vec<u16> = (0..8)
        .map(|_| {
            client::request(
                web.listener_addr("web").unwrap(),
                "GET / HTTP/1.1\r\nHost: web\r\n\r\n",
            )
            .status
        })
        .collect();
    within_cap(&statuses, 429, 3, 3, started.elapsed());
}

/// With an access log, the inbound sidecar writes one JSON line per HTTP request (HTTP/1.1
/// and HTTP/2, answered by the app or by the proxy) and per opaque TCP connection (let in or
/// turned away by the authorization), naming the caller's SPIFFE ID, the cluster and
/// endpoint, the status and the proxy's flag.
fn the_access_log_has_a_line_per_request_and_connection(backend: BackendChoice) {
    let dir = TempDir::new("mtls-access-log");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let ci = "spiffe://tern.test/ns/shop/sa/ci";
    let c_id = ca.write_identity(&dir.0, "c", ci, &[&ca], false);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let dead = tests::upstream::dead_address();
    let yaml = inbound_yaml(&b_id, (echo.addr, http.addr), "")
        .replace(
            "handshake_timeout: 400ms }",
            &format!("handshake_timeout: 400ms }}, authorization: {{ identities: [\"{A}\"] }}"),
        )
        .replace(
            "routes: [{ cluster: http-app }]",
            "routes: [{ path_prefix: /dead, cluster: dead }, { cluster: http-app }]",
        )
        .replace(
            "clusters:\n",
            &format!("clusters:\n  - {{ name: dead, endpoints: [{dead}] }}\n"),
        );
    let path = dir.0.join("access.log");
    let options = dataplane::Options {
        access_log: Some(path.clone()),
        ..tests::options(backend)
    };
    let config = shared::Config::from_yaml(&yaml, "b.yaml").unwrap();
    let b = Proxy::start(config, "b.yaml", options).unwrap();
    let a = outbound(backend, &a_id, &b, B);
    client::assert_echo(a.listener_addr("out-tcp").unwrap(), b"logged");
    let mut conn = Conn::open(a.listener_addr("out-http").unwrap());
    conn.send(b"GET /one?x=1 HTTP/1.1\r\nHost: b\r\n\r\n");
    assert_eq!(conn.response(false).status, 200);
    conn.send(b"GET /dead HTTP/1.1\r\nHost: b\r\n\r\n");
    assert_eq!(conn.response(false).status, 503);
    let h2 = H2::connect(a.listener_addr("out-http").unwrap());
    assert_eq!(h2.get("b", "/two").status, 200);
    // c's tunnel is turned away.
    let c = outbound(backend, &c_id, &b, B);
    let mut stream = client::connect(c.listener_addr("out-tcp").unwrap());
    let _ = stream.write_all(b"ping");
    assert_eq!(
        client::read_some(&mut stream, &mut [0u8; 8]).unwrap_or(0),
        0
    );
    wait_for_metric(
        &b,
        "tern_errors_total{listener=\"in-tcp\",flag=\"RBAC\"}",
        1.0,
    );
    // The drain writes what the workers hold.
    b.drain();
    b.join();

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{text}");
    let by = |protocol: &str, path: &str| {
        lines
            .iter()
            .filter(|l| l["peer_identity"] == A)
            .find(|l| l["protocol"] == protocol && l["path"].as_str().unwrap_or("") == path)
            .unwrap_or_else(|| panic!("no {protocol} {path} line: {text}"))
    };
    let (tcp, one, two) = (
        by("TCP", ""),
        by("HTTP/1.1", "/one?x=1"),
        by("HTTP/2", "/two"),
    );
    for line in [tcp, one, two] {
        assert_eq!(line["peer_identity"], A, "{line}");
        assert_eq!(line["response_flag"], "-", "{line}");
        assert!(line["duration_us"].is_u64(), "{line}");
        assert!(
            line["start_time"].as_str().unwrap().ends_with('Z'),
            "{line}"
        );
    }
    assert_eq!(tcp["listener"], "in-tcp");
    assert_eq!(tcp["cluster"], "tcp-app");
    assert_eq!(tcp["upstream"], echo.addr.to_string());
    assert_eq!(
        (tcp["bytes_received"].as_u64(), tcp["bytes_sent"].as_u64()),
        (Some(6), Some(6))
    );
    assert_eq!(one["method"], "GET");
    assert_eq!(one["authority"], "b");
    assert_eq!(one["path"], "/one?x=1");
    assert_eq!(one["status"], 200);
    assert_eq!(one["cluster"], "http-app");
    assert_eq!(one["upstream"], http.addr.to_string());
    assert_eq!(two["authority"], "b");
    assert_eq!(two["status"], 200);
    // An answer of the proxy's own: its flag, the cluster, and no endpoint that answered.
    let dead = by("HTTP/1.1", "/dead");
    assert_eq!(dead["status"], 503);
    assert_eq!(dead["response_flag"], "UF");
    assert_eq!(dead["cluster"], "dead");
    assert_eq!(dead["upstream"], serde_json::Value::Null);
    let refused = lines
        .iter()
        .find(|l| l["peer_identity"] == ci)
        .unwrap_or_else(|| panic!("no line for c: {text}"));
    assert_eq!(refused["protocol"], "TCP", "{refused}");
    assert_eq!(refused["listener"], "in-tcp", "{refused}");
    assert_eq!(refused["response_flag"], "RBAC", "{refused}");
    assert_eq!(refused["cluster"], serde_json::Value::Null, "{refused}");
}

/// With spans exported, a request that arrives with a sampled `traceparent` gets a span from
/// each sidecar, nested: the client's span is the outbound sidecar's parent, which is the
/// inbound sidecar's, which is the server's (the `traceparent` it receives). HTTP/1.1 and
/// HTTP/2 alike; a request unsampled, without a context or with two passes as it came and
/// makes none.
fn spans_of_a_traced_request_nest_from_client_to_server(backend: BackendChoice) {
    let dir = TempDir::new("mtls-trace");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let collector = tests::otlp::Collector::start();
    let traced = |service: &str| dataplane::Options {
        trace: Some(dataplane::TraceOptions {
            collector: collector.address.clone(),
            service_name: service.into(),
        }),
        ..tests::options(backend)
    };
    let yaml = inbound_yaml(&b_id, (echo.addr, http.addr), "");
    let config = shared::Config::from_yaml(&yaml, "b.yaml").unwrap();
    let b = Proxy::start(config, "b.yaml", traced("backend")).unwrap();
    let yaml = format!(
        "{}listeners:\n\
         \x20 - {{ name: out-http, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: b-http }}] }}\n\
         clusters:\n\
         \x20 - {{ name: b-http, endpoints: [{}], tls: {{ identity: \"{B}\" }} }}\n",
        a_id.yaml(),
        b.listener_addr("in-http").unwrap(),
    );
    let config = shared::Config::from_yaml(&yaml, "a.yaml").unwrap();
    let a = Proxy::start(config, "a.yaml", traced("frontend")).unwrap();
    let out = a.listener_addr("out-http").unwrap();
    // What the server saw of `traceparent`.
    let seen = |headers: &str| -> Option<String> {
        headers
            .lines()
            .find_map(|l| l.strip_prefix("traceparent: "))
            .map(str::to_owned)
    };

    // Unsampled, no context at all, or two: passed as they came, no span.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let sampled = |trace_id: &str| format!("00-{trace_id}-b7ad6b7169203331-01");
    let mut conn = Conn::open(out);
    let mut get_headers = |fields: &str| -> String {
        conn.send(format!("GET /headers?q=1 HTTP/1.1\r\nHost: b\r\n{fields}\r\n").as_bytes());
        let answer = conn.response(false);
        assert_eq!(answer.status, 200);
        answer.text()
    };
    let text = get_headers(&format!("traceparent: {unsampled}\r\n"));
    assert_eq!(seen(&text).as_deref(), Some(unsampled));
    assert_eq!(seen(&get_headers("")), None);
    let two = sampled("11111111111111111111111111111111");
    let text = get_headers(&format!("traceparent: {two}\r\ntraceparent: {two}\r\n"));
    assert_eq!(
        text.matches(&format!("traceparent: {two}\n")).count(),
        2,
        "{text}"
    );
    let client = H2::connect(out);
    let h2_get = |traceparent: &str| {
        let request = hyper::Request::get("http://b/headers")
            .header("traceparent", traceparent)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let answer = client.request(request);
        assert_eq!(answer.status, 200);
        String::from_utf8(answer.body.to_vec()).unwrap()
    };
    assert_eq!(seen(&h2_get(unsampled)).as_deref(), Some(unsampled));

    // Sampled: HTTP/1.1 (its parent id written over in place), HTTP/1.1 with a later
    // version (the head rewritten, as version 00), HTTP/2.
    let h1 = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let text = get_headers(&format!(
        "traceparent: {}\r\ntracestate: vendor=1\r\n",
        sampled(h1.0)
    ));
    let h1_server_parent = seen(&text).unwrap();
    assert!(text.contains("tracestate: vendor=1"), "{text}");
    let later = ("5af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let text = get_headers(&format!(
        "traceparent: 01-{}-{}-01-more\r\n",
        later.0, later.1
    ));
    let later_server_parent = seen(&text).unwrap();
    let h2 = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let text = h2_get(&format!("00-{}-{}-01", h2.0, h2.1));
    let h2_server_parent = seen(&text).unwrap();

    for ((trace_id, client_span), server_parent, protocol) in [
        (h1, h1_server_parent, "1.1"),
        (later, later_server_parent, "1.1"),
        (h2, h2_server_parent, "2"),
    ] {
        assert!(
            server_parent.starts_with(&format!("00-{trace_id}-")),
            "{server_parent}"
        );
        assert!(server_parent.ends_with("-01"), "{server_parent}");
        let mut spans = Vec::new();
        tests::eventually(Duration::from_secs(10), "both sidecars' spans", || {
            spans = collector
                .spans()
                .into_iter()
                .filter(|s| s["traceId"] == trace_id)
                .collect();
            spans.len() >= 2
        });
        assert_eq!(spans.len(), 2, "{spans:?}");
        let by = |service: &str| spans.iter().find(|s| s["service"] == service).unwrap();
        let (outbound, inbound) = (by("frontend"), by("backend"));
        // client → outbound sidecar → inbound sidecar → server.
        assert_eq!(outbound["parentSpanId"], client_span);
        assert_eq!(inbound["parentSpanId"], outbound["spanId"]);
        assert_eq!(server_parent[36..52], *inbound["spanId"].as_str().unwrap());
        assert_eq!(outbound["kind"], 3, "client side");
        assert_eq!(inbound["kind"], 2, "server side");
        for span in [outbound, inbound] {
            assert_eq!(span["name"], "GET");
            assert_eq!(attribute(span, "url.path")["stringValue"], "/headers");
            assert_eq!(
                attribute(span, "http.response.status_code")["intValue"],
                "200"
            );
            assert_eq!(
                attribute(span, "network.protocol.version")["stringValue"],
                protocol
            );
            assert!(span["status"]["code"].is_null(), "{span}");
        }
        assert_eq!(attribute(inbound, "tern.peer.identity")["stringValue"], A);
        assert_eq!(
            attribute(inbound, "tern.cluster")["stringValue"],
            "http-app"
        );
        assert_eq!(
            attribute(outbound, "tern.listener")["stringValue"],
            "out-http"
        );
    }
    // The untraced requests made none.
    assert_eq!(collector.spans().len(), 6);
    wait_for_metric(&b, "tern_trace_spans_total{result=\"exported\"}", 3.0);

    // A drain sends what the workers hold before the proxy ends.
    let last = "7af7651916cd43dd8448eb211c80319c";
    get_headers(&format!("traceparent: {}\r\n", sampled(last)));
    b.drain();
    b.join();
    let spans = collector.spans();
    assert!(
        spans
            .iter()
            .any(|s| s["traceId"] == last && s["service"] == "backend"),
        "{spans:?}"
    );
}

/// A new authorization reaches connections already open: one whose peer it no longer lets
/// in is closed (counted under `RBAC`), whatever it carries.
fn an_authorization_closes_open_connections_it_no_longer_allows(backend: BackendChoice) {
    let dir = TempDir::new("mtls-revoke");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let b = inbound(backend, &b_id, echo.addr, http.addr);
    let a = outbound(backend, &a_id, &b, B);
    let mut open = client::connect(a.listener_addr("out-tcp").unwrap());
    open.write_all(b"before").unwrap();
    let mut reply = [0u8; 6];
    open.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"before");
    // Only another workload may connect now: the tunnel closes, and the client behind A
    // sees its connection end.
    let yaml = |more: &str| {
        format!(
            "{}listeners:\n\
             \x20 - {{ name: in-tcp, address: 127.0.0.1:0, protocol: tcp, cluster: tcp-app, tls: {{ mode: strict, handshake_timeout: 400ms }}{more} }}\n\
             \x20 - {{ name: in-http, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: http-app }}], tls: {{ mode: strict }} }}\n\
             clusters:\n\
             \x20 - {{ name: tcp-app, endpoints: [{}] }}\n\
             \x20 - {{ name: http-app, endpoints: [{}] }}\n",
            b_id.yaml(),
            echo.addr,
            http.addr
        )
    };
    let narrowed =
        yaml(", authorization: { identities: [\"spiffe://tern.test/ns/shop/sa/other\"] }");
    b.reload(shared::Config::from_yaml(&narrowed, "v2").unwrap(), "v2")
        .unwrap();
    // It ends (A passes the tunnel's end on as a reset) rather than waiting for the
    // client's 10 s timeout.
    let mut rest = Vec::new();
    match open.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
    }
    wait_for_metric(
        &b,
        "tern_errors_total{listener=\"in-tcp\",flag=\"RBAC\"}",
        1.0,
    );
    // A config that changes no authorization leaves open connections alone.
    let mut kept = client::connect(a.listener_addr("out-http").unwrap());
    kept.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        .unwrap();
    let mut conn = Conn::new(kept);
    assert_eq!(conn.response(false).status, 200);
    b.reload(shared::Config::from_yaml(&narrowed, "v3").unwrap(), "v3")
        .unwrap();
    conn.send(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n");
    assert_eq!(conn.response(false).status, 200);
}

fn an_expired_certificate_is_refused(backend: BackendChoice) {
    let dir = TempDir::new("mtls-expired");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], true);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let b = inbound(backend, &b_id, echo.addr, http.addr);
    let a = outbound(backend, &a_id, &b, B);
    refused_by_outbound(&a);
    // Each proxy says how long its own certificate has left: B's is past expiry.
    let series = |id: &str| format!("tern_identity_expiry_seconds{{identity=\"{id}\"}}");
    assert!(metric(&tests::admin_get(&b, "/metrics"), &series(B)) < -86_400.0 * 365.0);
    assert!(metric(&tests::admin_get(&a, "/metrics"), &series(A)) > 86_400.0);
    let dump = tests::admin_get(&b, "/config_dump");
    assert!(dump.contains(&format!("\"spiffe_id\": \"{B}\"")), "{dump}");
    assert!(dump.contains("\"expires_in_seconds\": -"), "{dump}");
}

fn plaintext_garbage_and_stalled_handshakes_are_refused(backend: BackendChoice) {
    let m = mesh(backend);
    let inbound_tcp = m.b.listener_addr("in-tcp").unwrap();
    let inbound_http = m.b.listener_addr("in-http").unwrap();
    // Plaintext HTTP to a strict port.
    let mut conn = Conn::open(inbound_http);
    conn.send(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n");
    refused_without_an_answer(&mut conn);
    // Random bytes.
    let mut conn = Conn::open(inbound_tcp);
    conn.send(&client::payload(3000));
    refused_without_an_answer(&mut conn);
    // A truncated ClientHello, then silence: the handshake timeout (400 ms) closes it.
    let mut conn = Conn::open(inbound_tcp);
    conn.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    let started = Instant::now();
    refused_without_an_answer(&mut conn);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed after {:?}",
        started.elapsed()
    );
    let metrics = wait_for_metric(
        &m.b,
        "tern_errors_total{listener=\"in-tcp\",flag=\"TLS\"}",
        2.0,
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_errors_total{listener=\"in-http\",flag=\"TLS\"}"
        ),
        1.0
    );
    // Everyone else is still served.
    client::assert_echo(m.a.listener_addr("out-tcp").unwrap(), b"still here");
}

fn a_pooled_connection_the_peer_closed_is_replaced(backend: BackendChoice) {
    let dir = TempDir::new("mtls-stale");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let http = Http::start("app");
    // The inbound side closes idle keep-alive connections after 200 ms; the outbound pool
    // keeps them for an hour, so the next request finds a dead one.
    let yaml = format!(
        "{}listeners:\n  - {{ name: in-tcp, address: 127.0.0.1:0, protocol: tcp, cluster: app, tls: {{ mode: strict }} }}\n\
         \x20 - {{ name: in-http, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: app }}], tls: {{ mode: strict }} }}\n\
         clusters:\n  - {{ name: app, endpoints: [{}] }}\nhttp:\n  keepalive_timeout: 200ms\n",
        b_id.yaml(),
        http.addr
    );
    let b = start_proxy(&yaml, backend);
    let a = outbound(backend, &a_id, &b, B);
    let mut conn = Conn::open(a.listener_addr("out-http").unwrap());
    for i in 0..3 {
        conn.send(format!("GET /n/{i} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes());
        assert_eq!(
            conn.response(false).text(),
            format!("app /n/{i}"),
            "request {i}"
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    let metrics = tests::admin_get(&a, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "tern_upstream_connections_total{cluster=\"b-http\"}"
        ),
        3.0
    );
}

fn permissive_ports_take_mtls_and_plaintext(backend: BackendChoice) {
    let dir = TempDir::new("mtls-permissive");
    let ca = TestCa::new("root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let (echo, http) = (Echo::start(), Http::start("app"));
    let yaml = format!(
        "{}listeners:\n\
         \x20 - {{ name: in-tcp, address: 127.0.0.1:0, protocol: tcp, cluster: tcp-app, tls: {{ mode: permissive, handshake_timeout: 300ms }} }}\n\
         \x20 - {{ name: in-http, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: http-app }}], tls: {{ mode: permissive }} }}\n\
         clusters:\n  - {{ name: tcp-app, endpoints: [{}] }}\n  - {{ name: http-app, endpoints: [{}] }}\n\
         detect_timeout: 300ms\n",
        b_id.yaml(),
        echo.addr,
        http.addr
    );
    let b = start_proxy(&yaml, backend);
    let a = outbound(backend, &a_id, &b, B);
    // mTLS from the peer sidecar.
    client::assert_echo(a.listener_addr("out-tcp").unwrap(), b"over mtls");
    let response = client::request(
        a.listener_addr("out-http").unwrap(),
        "GET /m HTTP/1.1\r\nHost: b\r\n\r\n",
    );
    assert_eq!(response.text(), "app /m");
    // Plaintext straight from a workload outside the mesh.
    client::assert_echo(b.listener_addr("in-tcp").unwrap(), b"in the clear");
    let response = client::request(
        b.listener_addr("in-http").unwrap(),
        "GET /p HTTP/1.1\r\nHost: b\r\n\r\n",
    );
    assert_eq!(response.text(), "app /p");
    // The application's own TLS (a ClientHello offering no mesh ALPN) passes through to it
    // as it is; only a sidecar's (ALPN `tern-…`) is taken for mTLS.
    let hello = {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("app.example").unwrap();
        let mut client = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut bytes = Vec::new();
        client.write_tls(&mut bytes).unwrap();
        bytes
    };
    client::assert_echo(b.listener_addr("in-tcp").unwrap(), &hello);

    // A client silent past the detection timeout is plaintext (its server may speak first):
    // when it does speak, its bytes reach the application.
    let mut silent = Conn::open(b.listener_addr("in-tcp").unwrap());
    std::thread::sleep(Duration::from_millis(500));
    silent.echo(b"late words");
    wait_for_metric(
        &b,
        "tern_protocol_detections_total{listener=\"in-tcp\",protocol=\"timeout\"}",
        1.0,
    );
}

fn disabled_ports_are_plaintext_only(backend: BackendChoice) {
    // No identity is needed when every listener disables mTLS.
    let echo = Echo::start();
    let yaml = format!(
        "listeners:\n  - {{ name: in-tcp, address: 127.0.0.1:0, protocol: tcp, cluster: app, tls: {{ mode: disable }} }}\nclusters:\n  - {{ name: app, endpoints: [{}] }}\n",
        echo.addr
    );
    let b = start_proxy(&yaml, backend);
    client::assert_echo(b.listener_addr("in-tcp").unwrap(), b"plain");
}

fn config_without_identity_files_is_refused(backend: BackendChoice) {
    let yaml = "listeners:\n  - { name: in, address: 127.0.0.1:0, protocol: tcp, cluster: c, tls: { mode: strict } }\nclusters:\n  - { name: c, endpoints: [127.0.0.1:1] }\n";
    let error = shared::Config::from_yaml(yaml, "no-identity.yaml").unwrap_err();
    assert!(error.to_string().contains("identity"), "{error}");
    let dir = TempDir::new("mtls-missing");
    let missing = format!(
        "identity:\n  files:\n    cert: {0}/nope.crt\n    key: {0}/nope.key\n    trust_bundle: {0}/nope.crt\n{yaml}",
        dir.0.display()
    );
    let config = shared::Config::from_yaml(&missing, "missing.yaml").unwrap();
    let Err(error) = Proxy::start(config, "missing.yaml", tests::options(backend)) else {
        panic!("a proxy started without its identity files");
    };
    assert!(error.to_string().contains("nope.crt"), "{error}");
}

both_backends!(
    tcp_is_byte_exact_both_ways_with_half_close,
    many_small_messages,
    http_requests_cross_the_tunnel_on_pooled_connections,
    the_wrong_identity_is_refused,
    an_untrusted_ca_is_refused_both_ways,
    a_client_from_another_trust_domain_is_refused,
    an_expired_certificate_is_refused,
    an_authorization_lets_in_only_the_peers_it_names,
    an_authorization_rule_lets_a_caller_make_some_requests,
    a_rate_limit_caps_each_caller_and_all_together,
    the_access_log_has_a_line_per_request_and_connection,
    spans_of_a_traced_request_nest_from_client_to_server,
    an_authorization_closes_open_connections_it_no_longer_allows,
    plaintext_garbage_and_stalled_handshakes_are_refused,
    config_without_identity_files_is_refused,
    a_pooled_connection_the_peer_closed_is_replaced,
    permissive_ports_take_mtls_and_plaintext,
    disabled_ports_are_plaintext_only,
);
