//! HTTP/1.1 through one proxy hop: routing, bodies, pipelining, upgrades, failures and limits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tests::client::{self, Conn};
use tests::upstream::{self, Http, black_hole, dead_address};
use tests::{BackendChoice, Proxy, both_backends, metric, start_proxy, wait_for_metric};

/// Two upstream services, one proxy routing to them by host and path.
struct Fixture {
    proxy: Proxy,
    api: Http,
    /// Kept alive for the proxy to route to.
    _web: Http,
}

impl Fixture {
    fn start(backend: BackendChoice) -> Fixture {
        Fixture::with(backend, "")
    }

    fn with(backend: BackendChoice, http_settings: &str) -> Fixture {
        let api = Http::start("api");
        let web = Http::start("web");
        let yaml = format!(
            r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - {{ host: api.local, path_prefix: /, cluster: api }}
      - {{ path_prefix: /api, cluster: api }}
      - {{ path_prefix: /, cluster: web, timeout: 400ms }}
      - {{ host: down.local, cluster: down }}
      - {{ host: hole.local, cluster: hole, timeout: 300ms }}
clusters:
  - {{ name: api, endpoints: [{api}] }}
  - {{ name: web, endpoints: [{web}] }}
  - {{ name: down, endpoints: [{down}], connect_timeout: 300ms }}
  - {{ name: hole, endpoints: [{hole}] }}
{http_settings}"#,
            api = api.addr,
            web = web.addr,
            down = dead_address(),
            hole = black_hole(),
        );
        Fixture {
            proxy: start_proxy(&yaml, backend),
            api,
            _web: web,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.listener_addr("web").unwrap()
    }

    fn get(&self, host: &str, path: &str) -> client::Response {
        client::request(
            self.addr(),
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        )
    }
}

fn routes_by_host_and_path(backend: BackendChoice) {
    let f = Fixture::start(backend);
    let cases = [
        ("api.local", "/anything", "api /anything"),
        ("API.LOCAL:8080", "/x", "api /x"),
        ("other", "/api/users", "api /api/users"),
        ("other", "/apix", "web /apix"),
        ("other", "/", "web /"),
    ];
    for (host, path, expected) in cases {
        let response = f.get(host, path);
        assert_eq!(response.status, 200, "{host}{path}");
        assert_eq!(response.text(), expected, "{host}{path}");
    }
    // The Host header reaches the upstream unchanged.
    assert_eq!(f.get("api.local", "/h").header("x-host"), Some("api.local"));
}

fn keep_alive_reuses_both_connections(backend: BackendChoice) {
    let f = Fixture::start(backend);
    let mut conn = Conn::open(f.addr());
    for i in 0..20 {
        conn.send(format!("GET /n/{i} HTTP/1.1\r\nHost: api.local\r\n\r\n").as_bytes());
        let response = conn.response(false);
        assert_eq!(response.text(), format!("api /n/{i}"));
    }
    assert_eq!(f.api.requests.load(Ordering::SeqCst), 20);
    // One worker served this client connection, so one pooled upstream connection did.
    assert_eq!(f.api.connections.load(Ordering::SeqCst), 1);
    wait_for_metric(
        &f.proxy,
        "tern_upstream_pool_reuses_total{cluster=\"api\"}",
        19.0,
    );
}

fn pipelined_requests_are_answered_in_order(backend: BackendChoice) {
    let f = Fixture::start(backend);
    let mut conn = Conn::open(f.addr());
    let batch: String = (0..5)
        .map(|i| {
            let host = if i % 2 == 0 { "api.local" } else { "other" };
            format!("GET /p/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n")
        })
        .chain([
            "POST /echo HTTP/1.1\r\nHost: api.local\r\nContent-Length: 5\r\n\r\nhello".to_owned(),
        ])
        .chain(["GET /last HTTP/1.1\r\nHost: other\r\n\r\n".to_owned()])
        .collect();
    conn.send(batch.as_bytes());
    for i in 0..5 {
        let name = if i % 2 == 0 { "api" } else { "web" };
        assert_eq!(conn.response(false).text(), format!("{name} /p/{i}"));
    }
    assert_eq!(conn.response(false).text(), "hello");
    assert_eq!(conn.response(false).text(), "web /last");
}

fn streams_chunked_and_large_bodies(backend: BackendChoice) {
    let f = Fixture::start(backend);
    let mut conn = Conn::open(f.addr());
    // A chunked request body in awkward pieces, echoed back.
    conn.send(b"POST /echo HTTP/1.1\r\nHost: api.local\r\nTransfer-Encoding: chunked\r\n\r\n");
    for piece in [
        "4\r\nWiki\r\n",
        "5\r\npedia\r\n",
        "E\r\n in\r\n\r\nchunks.\r\n",
        "0\r\n\r\n",
    ] {
        conn.send(piece.as_bytes());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(conn.response(false).text(), "Wikipedia in\r\n\r\nchunks.");
    // A chunked response from the upstream.
    conn.send(b"GET /chunked HTTP/1.1\r\nHost: api.local\r\n\r\n");
    let response = conn.response(false);
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.text(), "part0;part1;part2;part3;part4;");
    // A 4 MB content-length body both ways on the same connection.
    let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    conn.send(
        format!(
            "POST /echo HTTP/1.1\r\nHost: api.local\r\nContent-Length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    );
    conn.send(&big);
    let response = conn.response(false);
    assert_eq!(response.body.len(), big.len());
    assert!(response.body == big);
    // HEAD: headers only, and the connection stays usable.
    conn.send(b"HEAD /h HTTP/1.1\r\nHost: api.local\r\n\r\nGET /after HTTP/1.1\r\nHost: api.local\r\n\r\n");
    assert_eq!(conn.response(true).status, 200);
    assert_eq!(conn.response(false).text(), "api /after");
}

fn expect_continue_is_passed_through(backend: BackendChoice) {
    let f = Fixture::start(backend);
    let mut conn = Conn::open(f.addr());
    conn.send(b"POST /echo HTTP/1.1\r\nHost: api.local\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
    let interim = conn.response(false);
    assert_eq!(interim.status, 100);
    conn.send(b"abc");
    assert_eq!(conn.response(false).text(), "abc");
    // An upload slower than the route's timeout (400 ms) is not cut by it: the timeout
    // bounds the wait for the response once the body is out.
    conn.send(b"POST /echo HTTP/1.1\r\nHost: web.local\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(conn.response(false).status, 100);
    for byte in [b"a", b"b", b"c"] {
        std::thread::sleep(std::time::Duration::from_millis(250));
        conn.send(byte);
    }
    let response = conn.response(false);
    assert_eq!((response.status, response.text()), (200, "abc".to_owned()));
    // Nor is one without `Expect`.
    conn.send(b"POST /echo HTTP/1.1\r\nHost: web.local\r\nContent-Length: 3\r\n\r\n");
    for byte in [b"a", b"b", b"c"] {
        std::thread::sleep(std::time::Duration::from_millis(250));
        conn.send(byte);
    }
    let response = conn.response(false);
    assert_eq!((response.status, response.text()), (200, "abc".to_owned()));
}

fn websocket_upgrade_becomes_a_byte_pump(backend: BackendChoice) {
    let f = Fixture::start(backend);
    let mut conn = Conn::open(f.addr());
    conn.send(
        b"GET /ws HTTP/1.1\r\nHost: api.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    let response = conn.response(true);
    assert_eq!(response.status, 101);
    for message in ["frame one", "frame two"] {
        conn.send(message.as_bytes());
        let mut got = vec![0u8; message.len()];
        let mut filled = 0;
        while filled < got.len() {
            filled += client::read_some(&mut conn.stream, &mut got[filled..]).unwrap();
        }
        assert_eq!(got, message.as_bytes());
    }
}

fn a_switch_of_protocols_nobody_asked_for_is_502_and_ends_that_connection(backend: BackendChoice) {
    let f = Fixture::start(backend);
    // The upstream answers /ws with 101 whatever the request says; this one asks no upgrade.
    let mut conn = Conn::open(f.addr());
    conn.send(b"GET /ws HTTP/1.1\r\nHost: api.local\r\n\r\n");
    let response = conn.response(false);
    assert_eq!(
        (response.status, response.header("x-tern-response-flag")),
        (502, Some("UPE"))
    );
    // The switched connection was not pooled: the next request gets a connection of its own
    // and an HTTP answer, not a tunnel.
    let opened = f.api.connections.load(Ordering::SeqCst);
    conn.send(b"GET /after HTTP/1.1\r\nHost: api.local\r\n\r\n");
    assert_eq!(conn.response(false).text(), "api /after");
    assert_eq!(f.api.connections.load(Ordering::SeqCst), opened + 1);
}

fn an_h2c_upgrade_is_declined_and_the_request_served_as_http1(backend: BackendChoice) {
    let f = Fixture::start(backend);
    let mut conn = Conn::open(f.addr());
    // As curl --http2 and Java's HttpClient ask on a cleartext URL.
    let offer = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA";
    conn.send(format!("GET /first HTTP/1.1\r\nHost: api.local\r\n{offer}\r\n\r\n").as_bytes());
    let response = conn.response(false);
    assert_eq!(
        (response.status, response.text()),
        (200, "api /first".to_owned())
    );
    assert_eq!(
        response.header("x-upgrade"),
        None,
        "the upstream saw the offer"
    );
    // The connection is still HTTP/1.1, routed request by request.
    conn.send(b"GET /second HTTP/1.1\r\nHost: other\r\n\r\n");
    assert_eq!(conn.response(false).text(), "web /second");
    // Other upgrades still reach the upstream.
    conn.send(b"GET /third HTTP/1.1\r\nHost: api.local\r\nUpgrade: websocket\r\n\r\n");
    assert_eq!(conn.response(false).header("x-upgrade"), Some("websocket"));
}

/// A proxy routing everything to an upstream that answers every request with `reply`, then
/// (with `reset`) resets the connection ([`upstream::scripted`]).
fn scripted_upstream(backend: BackendChoice, reply: &'static [u8], reset: bool) -> Proxy {
    one_worker_to(upstream::scripted(reply, reset), backend)
}

fn a_response_the_upstream_breaks_off_ends_in_a_reset(backend: BackendChoice) {
    // A response delimited by the upstream's close, which resets mid-body.
    let proxy = scripted_upstream(backend, b"HTTP/1.1 200 OK\r\n\r\npartial body", true);
    let mut stream = client::connect(proxy.listener_addr("web").unwrap());
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // A clean end would pass the truncated body off as the whole response.
    let mut got = Vec::new();
    let ended = std::io::Read::read_to_end(&mut stream, &mut got);
    assert_eq!(
        ended.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "after {:?}",
        String::from_utf8_lossy(&got)
    );
    wait_for_metric(
        &proxy,
        "tern_errors_total{listener=\"web\",flag=\"UC\"}",
        1.0,
    );
}

/// A proxy with one worker (so every client connection finds the same pool of upstream
/// connections) routing everything to `upstream`.
fn one_worker_to(upstream: SocketAddr, backend: BackendChoice) -> Proxy {
    one_worker_balancing(&[upstream], backend)
}

/// A proxy with one worker whose one route goes to a cluster of `endpoints`.
fn one_worker_balancing(endpoints: &[SocketAddr], backend: BackendChoice) -> Proxy {
    let endpoints = endpoints
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let yaml = format!(
        "listeners:\n  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: app }}] }}\nclusters:\n  - {{ name: app, endpoints: [{endpoints}] }}\n"
    );
    tests::start_one_worker(&yaml, backend)
}

/// Round robin takes each endpoint in turn and the pool reuses each one's connection: a
/// request that finds no parked connection to the endpoint it drew connects to that one,
/// not to the next (which skipped every other endpoint and, with two, never reused one).
fn round_robin_reaches_every_endpoint_and_reuses_their_connections(backend: BackendChoice) {
    let upstreams = [
        Http::start("a"),
        Http::start("b"),
        Http::start("c"),
        Http::start("d"),
    ];
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let proxy = one_worker_balancing(&addrs, backend);
    let addr = proxy.listener_addr("web").unwrap();
    for _ in 0..12 {
        assert_eq!(
            client::request(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").status,
            200
        );
    }
    for upstream in &upstreams {
        assert_eq!(
            upstream.requests.load(Ordering::SeqCst),
            3,
            "an even share each"
        );
        assert_eq!(
            upstream.connections.load(Ordering::SeqCst),
            1,
            "one connection each, reused"
        );
    }
}

/// A keep-alive client's next request runs under the config that is live then: a route
/// change reaches it, and an endpoint the config no longer has (a rollout's old Pod) gets
/// none of its requests and keeps no parked connection. Before, a connection ran under the
/// config it was accepted with for as long as it lasted.
fn a_keep_alive_connection_follows_config_changes(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let yaml = |to: &str, b_endpoints: &str| {
        format!(
            "listeners:\n  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: {to} }}] }}\nclusters:\n  - {{ name: a, endpoints: [{}] }}\n  - {{ name: b, endpoints: [{b_endpoints}] }}\n",
            a.addr
        )
    };
    let proxy = start_proxy(&yaml("a", &b.addr.to_string()), backend);
    let mut client = Conn::open(proxy.listener_addr("web").unwrap());
    let mut get = |path: &str| {
        client.send(format!("GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n").as_bytes());
        client.response(false).text()
    };
    assert_eq!(get("/1"), "a /1");
    let reload = |yaml: String, version: &str| {
        let config = shared::Config::from_yaml(&yaml, version).unwrap();
        proxy.reload(config, version).unwrap();
    };
    reload(yaml("b", &b.addr.to_string()), "v2");
    assert_eq!(get("/2"), "b /2");
    assert_eq!(get("/2b"), "b /2b");
    assert_eq!(b.connections.load(Ordering::SeqCst), 1, "parked and reused");
    let open = |upstream: &Http| upstream.open.load(Ordering::SeqCst);
    assert_eq!(open(&b), 1, "one parked connection to b");
    // b's Pod replaced by a: its parked connection closes at the apply, and the next
    // request goes to the new endpoint.
    reload(yaml("b", &a.addr.to_string()), "v3");
    tests::eventually(
        Duration::from_secs(5),
        "the connection to b to close",
        || open(&b) == 0,
    );
    assert_eq!(get("/3"), "a /3");
    assert_eq!(b.requests.load(Ordering::SeqCst), 2);
}

/// A request that asked to close (`Connection: close`) binds the upstream to close after
/// its response (RFC 9112 §9.6), even one that does not say so: that connection is not
/// parked, so the next client's POST (never retried) does not meet it closed.
fn a_connection_the_request_asked_to_close_is_not_parked(backend: BackendChoice) {
    // Closes each connection a moment after its one response, without saying so (so the
    // proxy cannot see the close when the next request comes).
    let upstream_addr = upstream::closing_late(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let proxy = one_worker_to(upstream_addr, backend);
    let addr = proxy.listener_addr("web").unwrap();
    let first = client::request(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(first.status, 200);
    let post = client::request(
        addr,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
    );
    assert_eq!(
        (post.status, post.header("x-tern-response-flag")),
        (200, None)
    );
}

/// An upstream that sends more than its response held (a body after a HEAD response, in a
/// later segment) leaves bytes on its parked connection: that connection is closed rather
/// than reused, so the bytes are not read as the next client's response.
fn a_parked_connection_with_bytes_to_read_is_not_reused(backend: BackendChoice) {
    let (upstream, accepted) =
        upstream::piecewise(&[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello"]);
    let proxy = one_worker_to(upstream, backend);
    let mut conn = Conn::open(proxy.listener_addr("web").unwrap());
    conn.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(conn.response(true).status, 200);
    // The body the HEAD response should not have had reaches the parked connection.
    std::thread::sleep(std::time::Duration::from_millis(100));
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let response = conn.response(false);
    assert_eq!(
        (response.status, response.text()),
        (200, "hello".to_owned())
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "a fresh connection");
}

/// A client that stops reading a large response does not hold the proxy (its buffers, the
/// upstream connection) for ever: once it has taken nothing for the cluster's idle timeout,
/// its connection is aborted.
fn a_client_that_stops_reading_is_cut_at_the_idle_timeout(backend: BackendChoice) {
    let api = Http::start("api");
    let yaml = format!(
        "listeners:\n  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: api }}] }}\nclusters:\n  - {{ name: api, endpoints: [{}], idle_timeout: 300ms }}\n",
        api.addr
    );
    let proxy = start_proxy(&yaml, backend);
    let size = 64 * 1024 * 1024;
    let mut stream = client::connect(proxy.listener_addr("web").unwrap());
    stream
        .write_all(
            format!("GET /bytes/{size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    // Read nothing for well past the idle timeout, then everything there is.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut got = Vec::new();
    let ended = std::io::Read::read_to_end(&mut stream, &mut got);
    assert!(
        ended.is_err() && got.len() < size,
        "the whole response came after the client stalled: {ended:?}, {} bytes",
        got.len()
    );
    wait_for_metric(
        &proxy,
        "tern_errors_total{listener=\"web\",flag=\"DC\"}",
        1.0,
    );
}

/// HTTP/1.0 has no chunked encoding (RFC 9112 §7.1), and a server must not send it one; an
/// upstream that does anyway has its response reach the HTTP/1.0 client as the data alone,
/// ended by the close (even for a client that asked to keep the connection), read in pieces
/// split anywhere; an upstream connection whose response ended cleanly, for a request
/// that kept it alive, serves the next request. An HTTP/1.1 client gets the chunks as sent.
fn a_chunked_response_reaches_an_http10_client_as_its_data_alone(backend: BackendChoice) {
    let (upstream, accepted) = upstream::piecewise(&[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: 1\r\n\r\n5\r\nhel",
        b"lo\r\n7;ex",
        b"t=1\r\n, wor",
        b"ld\r\n0\r\nX-Trai",
        b"ler: 1\r\n\r",
        b"\n",
    ]);
    let proxy = one_worker_to(upstream, backend);
    let addr = proxy.listener_addr("web").unwrap();
    let mut delivered = 0;
    for request in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ] {
        let mut stream = client::connect(addr);
        stream.write_all(request).unwrap();
        // Neither a length nor chunked: the body ends with the connection.
        let mut response = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut response).unwrap();
        delivered += response.len();
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(head.contains("\r\nx-kept: 1"), "{head}");
        assert_eq!(body, "hello, world");
    }
    let mut conn = Conn::open(addr);
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let response = conn.response(false);
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.text(), "hello, world");
    // The first request (HTTP/1.0, no keep-alive) left its upstream connection bound to
    // close; the second's, kept alive, served the third.
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "two upstream connections"
    );
    drop(conn);
    // What the clients got, counted: the rewritten heads and the data, then the chunked
    // response as sent.
    let chunked: usize = [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: 1\r\n\r\n"[..],
        b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n",
    ]
    .iter()
    .map(|part| part.len())
    .sum();
    wait_for_metric(
        &proxy,
        "tern_listener_sent_bytes_total{listener=\"web\"}",
        (delivered + chunked) as f64,
    );
}

fn interim_responses_reach_http11_clients_only(backend: BackendChoice) {
    let proxy = scripted_upstream(
        backend,
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        false,
    );
    let mut conn = Conn::open(proxy.listener_addr("web").unwrap());
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(conn.response(false).status, 103);
    assert_eq!(conn.response(false).text(), "ok");
    let mut conn = Conn::open(proxy.listener_addr("web").unwrap());
    conn.send(b"GET / HTTP/1.0\r\n\r\n");
    let response = conn.response(false);
    assert_eq!((response.status, response.text()), (200, "ok".to_owned()));
}

fn upstream_down_is_503(backend: BackendChoice) {
    let f = Fixture::start(backend);
    let response = f.get("down.local", "/");
    assert_eq!(response.status, 503);
    assert_eq!(response.header("x-tern-response-flag"), Some("UF"));
    // A client that asked to close gets the answer, then the close.
    let mut conn = Conn::open(f.addr());
    conn.send(b"GET / HTTP/1.1\r\nHost: down.local\r\nConnection: close\r\n\r\n");
    let response = conn.response(false);
    assert_eq!(response.status, 503);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(conn.closed());
    let metrics = wait_for_metric(
        &f.proxy,
        "tern_responses_total{listener=\"web\",class=\"5xx\"}",
        2.0,
    );
    assert_eq!(
        metric(&metrics, "tern_errors_total{listener=\"web\",flag=\"UF\"}"),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_responses_total{listener=\"web\",class=\"5xx\"}"
        ),
        2.0
    );
}

fn upstream_that_hangs_is_504_after_the_timeout(backend: BackendChoice) {
    let f = Fixture::start(backend);
    // An upstream that accepts and never answers.
    let started = Instant::now();
    let response = f.get("hole.local", "/");
    let waited = started.elapsed();
    assert_eq!(response.status, 504);
    assert_eq!(response.header("x-tern-response-flag"), Some("UT"));
    assert!(
        waited >= Duration::from_millis(280),
        "answered after {waited:?}"
    );
    // An HTTP upstream whose handler never returns, on a keep-alive connection that then
    // goes on working.
    let mut conn = Conn::open(f.addr());
    conn.send(b"GET /hang HTTP/1.1\r\nHost: other\r\n\r\n");
    assert_eq!(conn.response(false).status, 504);
    conn.send(b"GET /fine HTTP/1.1\r\nHost: other\r\n\r\n");
    assert_eq!(conn.response(false).text(), "web /fine");
    wait_for_metric(
        &f.proxy,
        "tern_upstream_timeouts_total{cluster=\"web\"}",
        1.0,
    );
}

fn no_route_is_404(backend: BackendChoice) {
    let api = Http::start("api");
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n      - {{ path_prefix: /only, cluster: api }}\nclusters:\n  - {{ name: api, endpoints: [{}] }}\n",
        api.addr
    );
    let proxy = start_proxy(&yaml, backend);
    let mut conn = Conn::open(proxy.listener_addr("web").unwrap());
    conn.send(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n");
    let response = conn.response(false);
    assert_eq!(
        (response.status, response.header("x-tern-response-flag")),
        (404, Some("NR"))
    );
    // The connection stays open for the next request.
    conn.send(b"GET /only/x HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(conn.response(false).text(), "api /only/x");
}

/// Sends `raw`, expects `status`, then a closed connection; then checks the proxy still
/// serves a well-behaved client.
fn refused(f: &Fixture, raw: &[u8], status: u16) {
    let mut conn = Conn::open(f.addr());
    conn.send(raw);
    let response = conn.response(false);
    assert_eq!(
        response.status,
        status,
        "for {:?}",
        String::from_utf8_lossy(&raw[..raw.len().min(60)])
    );
    assert!(conn.closed(), "the proxy closes after refusing a request");
    assert_eq!(f.get("other", "/still-ok").text(), "web /still-ok");
}

fn bad_requests_get_the_right_status_and_a_close(backend: BackendChoice) {
    let f = Fixture::with(
        backend,
        "http:\n  max_header_bytes: 4096\n  max_request_line: 512\n  max_headers: 20\n",
    );
    refused(&f, b"GARBAGE\r\n\r\n", 400);
    // A tunnel, which the proxy does not carry: a 2xx from the upstream would make the
    // connection one.
    for connect in [
        &b"CONNECT api.local:443 HTTP/1.1\r\nHost: api.local:443\r\n\r\n"[..],
        b"CONNECT /x HTTP/1.1\r\nHost: api.local\r\n\r\n",
        b"CONNECT http://api.local/ HTTP/1.1\r\nHost: api.local\r\n\r\n",
    ] {
        refused(&f, connect, 501);
    }
    refused(
        &f,
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage-tls-hello\r\n\r\n",
        400,
    );
    refused(
        &f,
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    );
    refused(&f, b"GET / HTTP/1.1\r\n\r\n", 400);
    refused(
        &f,
        b"POST /echo HTTP/1.1\r\nHost: api.local\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    );
    // Heads an upstream could frame or route differently from the proxy.
    refused(
        &f,
        b"POST /echo HTTP/1.1\r\nHost: api.local\r\nX: y\nContent-Length: 5\r\n\r\nhello",
        400,
    );
    refused(
        &f,
        b"POST /echo HTTP/1.1\r\nHost: api.local\r\nContent-Length: ,\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    );
    refused(
        &f,
        b"GET http://api.local/admin HTTP/1.1\r\nHost: web.local\r\n\r\n",
        400,
    );
    refused(
        &f,
        format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(600)).as_bytes(),
        414,
    );
    refused(
        &f,
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "b".repeat(5000)
        )
        .as_bytes(),
        431,
    );
    refused(
        &f,
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X-N: v\r\n".repeat(25)
        )
        .as_bytes(),
        431,
    );
    // An endless header block, never finished, is cut off at the limit.
    let mut conn = Conn::open(f.addr());
    conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n");
    for _ in 0..100 {
        if conn
            .stream
            .write_all(b"X-More: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n")
            .is_err()
        {
            break;
        }
    }
    assert_eq!(conn.response(false).status, 431);
    let metrics = wait_for_metric(
        &f.proxy,
        "tern_errors_total{listener=\"web\",flag=\"DPE\"}",
        11.0,
    );
    assert_eq!(
        metric(&metrics, "tern_errors_total{listener=\"web\",flag=\"DLE\"}"),
        4.0
    );
}

fn slowloris_gets_408_while_others_are_served(backend: BackendChoice) {
    let f = Fixture::with(backend, "http:\n  header_timeout: 400ms\n");
    let mut slow = Conn::open(f.addr());
    let started = Instant::now();
    slow.send(b"GET / HTTP/1.1\r\n");
    // Trickle header bytes; meanwhile a normal client is served promptly.
    let mut served = 0;
    while started.elapsed() < Duration::from_millis(300) {
        let _ = slow.stream.write_all(b"X");
        assert_eq!(f.get("other", "/busy").text(), "web /busy");
        served += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    // At least one other client was served while the slow one trickled (how many depends on
    // how busy the machine is).
    assert!(served > 0);
    let response = slow.response(false);
    assert_eq!(response.status, 408);
    assert!(started.elapsed() >= Duration::from_millis(380));
    assert!(slow.closed());

    // The start of a next head, sent with a request: the header timeout runs for it at
    // once, not the keep-alive timeout (60 s) first.
    let mut slow = Conn::open(f.addr());
    slow.send(b"GET /first HTTP/1.1\r\nHost: other\r\n\r\nGET /sec");
    assert_eq!(slow.response(false).text(), "web /first");
    assert_eq!(slow.response(false).status, 408);
    assert!(slow.closed());
}

fn a_body_that_stalls_gets_408(backend: BackendChoice) {
    let f = Fixture::with(backend, "http:\n  body_timeout: 300ms\n");
    let mut slow = Conn::open(f.addr());
    let started = Instant::now();
    slow.send(b"POST /echo HTTP/1.1\r\nHost: api.local\r\nContent-Length: 10\r\n\r\nabc");
    assert_eq!(f.get("other", "/meanwhile").text(), "web /meanwhile");
    let response = slow.response(false);
    assert_eq!(
        (response.status, response.header("x-tern-response-flag")),
        (408, Some("DT"))
    );
    assert!(
        started.elapsed() >= Duration::from_millis(280),
        "after {:?}",
        started.elapsed()
    );
    assert!(slow.closed());

    // The same after `100 Continue`: the client's body stalls, and it is told so.
    let mut slow = Conn::open(f.addr());
    slow.send(b"POST /echo HTTP/1.1\r\nHost: api.local\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(slow.response(false).status, 100);
    slow.send(b"abc");
    let response = slow.response(false);
    assert_eq!(
        (response.status, response.header("x-tern-response-flag")),
        (408, Some("DT"))
    );
    assert!(slow.closed());
}

fn metrics_count_bytes_exactly(backend: BackendChoice) {
    let f = Fixture::start(backend);
    let mut conn = Conn::open(f.addr());
    conn.send(b"POST /echo HTTP/1.1\r\nHost: api.local\r\nContent-Length: 11\r\n\r\nhello world");
    assert_eq!(conn.response(false).text(), "hello world");
    conn.send(b"POST /echo HTTP/1.1\r\nHost: api.local\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(conn.response(false).text(), "abc");
    conn.send(b"GET /chunked HTTP/1.1\r\nHost: api.local\r\n\r\n");
    assert_eq!(
        conn.response(false).text(),
        "part0;part1;part2;part3;part4;"
    );
    let metrics = wait_for_metric(
        &f.proxy,
        "tern_request_duration_seconds_count{listener=\"web\"}",
        3.0,
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_listener_received_bytes_total{listener=\"web\"}"
        ),
        conn.sent as f64
    );
    assert_eq!(
        metric(&metrics, "tern_listener_sent_bytes_total{listener=\"web\"}"),
        conn.received as f64
    );
    // Heads and bodies pass unchanged, so the upstream side moved the same bytes.
    assert_eq!(
        metric(&metrics, "tern_upstream_sent_bytes_total{cluster=\"api\"}"),
        conn.sent as f64
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_upstream_received_bytes_total{cluster=\"api\"}"
        ),
        conn.received as f64
    );
}

fn metrics_count_what_was_sent(backend: BackendChoice) {
    let f = Fixture::start(backend);
    for i in 0..7 {
        assert_eq!(f.get("api.local", &format!("/{i}")).status, 200);
    }
    assert_eq!(f.get("down.local", "/").status, 503);
    let metrics = wait_for_metric(
        &f.proxy,
        "tern_request_duration_seconds_count{listener=\"web\"}",
        8.0,
    );
    assert_eq!(
        metric(&metrics, "tern_requests_total{listener=\"web\"}"),
        8.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_responses_total{listener=\"web\",class=\"2xx\"}"
        ),
        7.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_responses_total{listener=\"web\",class=\"5xx\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "tern_upstream_requests_total{cluster=\"api\"}"),
        7.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_upstream_responses_total{cluster=\"api\",class=\"2xx\"}"
        ),
        7.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_request_duration_seconds_count{listener=\"web\"}"
        ),
        8.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_listener_connections_total{listener=\"web\"}"
        ),
        8.0
    );
    let p99 = metric(
        &metrics,
        "tern_request_duration_seconds{listener=\"web\",quantile=\"0.99\"}",
    );
    assert!(p99 > 0.0 && p99 < 10.0, "p99 {p99}");
    assert_eq!(metric(&metrics, "tern_workers_reporting"), 2.0);
    let backend_label = if backend == BackendChoice::Epoll {
        "epoll"
    } else {
        "io_uring"
    };
    assert_eq!(
        metric(
            &metrics,
            &format!("tern_proxy_info{{backend=\"{backend_label}\",workers=\"2\"}}")
        ),
        1.0
    );
}

/// A route's matches on method, query and an exact path, and its header edits both ways,
/// between pipelined requests whose heads and bodies must come through whole.
fn routes_match_method_query_and_exact_path_and_edit_headers(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - {{ path_exact: /headers, method: POST, cluster: b }}
      - {{ path_prefix: /headers, query: [{{ name: v, value: "2 b" }}], cluster: b }}
      - {{ path_regex: "/headers/[0-9]+", cluster: b }}
      - {{ path_prefix: /headers, headers: [{{ name: x-team, value: "ops|dev", regex: true }}], cluster: b }}
      - path_prefix: /
        cluster: a
        request_headers: {{ set: [{{ name: x-env, value: prod }}], add: [{{ name: x-tag, value: mesh }}], remove: [x-debug] }}
        response_headers: {{ set: [{{ name: server, value: tern }}], add: [{{ name: cache-control, value: no-store }}], remove: [x-upstream-debug] }}
clusters:
  - {{ name: a, endpoints: [{a}] }}
  - {{ name: b, endpoints: [{b}] }}
http: {{ max_header_bytes: 300, max_request_line: 200 }}
"#,
        a = a.addr,
        b = b.addr,
    );
    let proxy = start_proxy(&yaml, backend);
    let mut conn = Conn::open(proxy.listener_addr("web").unwrap());
    let values = |response: &client::Response, name: &str| -> Vec<String> {
        response
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    };

    conn.send(b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Env: dev\r\nX-Env: test\r\nx-tag: client\r\nX-Debug: 1\r\n\r\n");
    let edited = conn.response(false);
    assert_eq!(edited.status, 200);
    let seen = edited.text();
    assert!(seen.starts_with("a\n"), "{seen}");
    assert!(seen.contains("x-env: prod\n"), "{seen}");
    assert!(!seen.contains("dev") && !seen.contains("test"), "{seen}");
    assert!(seen.contains("x-tag: client\nx-tag: mesh\n"), "{seen}");
    assert!(!seen.contains("x-debug"), "{seen}");
    assert!(seen.contains("host: x\n"), "{seen}");
    assert_eq!(values(&edited, "server"), ["tern"]);
    assert_eq!(values(&edited, "cache-control"), ["private", "no-store"]);
    assert!(values(&edited, "x-upstream-debug").is_empty());

    // Pipelined: an edited request with a body, then one routed by its query, unedited.
    conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Debug: 1\r\nContent-Length: 5\r\n\r\nhelloGET /headers?v=2%20b HTTP/1.1\r\nHost: x\r\n\r\n");
    let echoed = conn.response(false);
    assert_eq!(echoed.text(), "hello");
    assert_eq!(values(&echoed, "server"), ["tern"]);
    let by_query = conn.response(false).text();
    assert!(by_query.starts_with("b\n"), "{by_query}");
    assert!(!by_query.contains("x-env"), "{by_query}");

    let served_by = |conn: &mut Conn, request: &str| {
        conn.send(request.as_bytes());
        conn.response(false)
            .text()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let to = |method: &str, target: &str| {
        format!("{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    };
    assert_eq!(served_by(&mut conn, &to("POST", "/headers")), "b");
    assert_eq!(served_by(&mut conn, &to("POST", "/headers?v=1")), "b");
    assert_eq!(served_by(&mut conn, &to("post", "/headers")), "a");
    assert_eq!(served_by(&mut conn, &to("POST", "/headers/x")), "a");
    assert_eq!(served_by(&mut conn, &to("GET", "/headers?v=2")), "a");
    assert_eq!(served_by(&mut conn, &to("GET", "/headers?w=1&v=2+b")), "a");
    // Regular expressions: the whole path, the whole header value.
    assert_eq!(served_by(&mut conn, &to("GET", "/headers/42")), "b");
    assert_eq!(served_by(&mut conn, &to("GET", "/headers/42x")), "a");
    let team = |value: &str| format!("GET /headers HTTP/1.1\r\nHost: x\r\nX-Team: {value}\r\n\r\n");
    assert_eq!(served_by(&mut conn, &team("dev")), "b");
    assert_eq!(served_by(&mut conn, &team("devops")), "a");

    // A head the edits would take past the limit is answered 431, and the connection goes
    // on; the same head unedited (to b) is served.
    let padded = |target: &str| {
        let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n");
        let pad = "p".repeat(290 - head.len());
        head.replace("X-Pad: ", &format!("X-Pad: {pad}"))
    };
    conn.send(padded("/headers").as_bytes());
    let too_large = conn.response(false);
    assert_eq!(too_large.status, 431);
    assert_eq!(too_large.header("x-tern-response-flag"), Some("DLE"));
    assert_eq!(served_by(&mut conn, &padded("/headers?v=2%20b")), "b");
}

/// A route's redirect answers for the upstream, on a connection that goes on; a route's
/// rewrite sends the upstream another path and host.
fn a_route_redirects_or_rewrites_the_url(backend: BackendChoice) {
    let app = Http::start("app");
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - {{ path_prefix: /old, redirect: {{ scheme: https, path: {{ replace_prefix_match: /new }}, status: 301 }} }}
      - {{ path_prefix: /v1, rewrite: {{ hostname: app.internal, path: {{ replace_prefix_match: /headers }} }}, cluster: app }}
      - {{ path_prefix: /, cluster: app }}
clusters:
  - {{ name: app, endpoints: [{app}] }}
"#,
        app = app.addr,
    );
    let proxy = start_proxy(&yaml, backend);
    let mut conn = Conn::open(proxy.listener_addr("web").unwrap());

    // A body comes along and is dropped; the next request on the connection is served.
    conn.send(b"POST /old/cart?id=7 HTTP/1.1\r\nHost: shop.local:8080\r\nContent-Length: 4\r\n\r\nbodyGET /x HTTP/1.1\r\nHost: shop.local\r\n\r\n");
    let moved = conn.response(false);
    assert_eq!(moved.status, 301);
    assert_eq!(
        moved.header("location"),
        Some("https://shop.local/new/cart?id=7")
    );
    assert!(moved.body.is_empty());
    assert_eq!(conn.response(false).text(), "app /x");
    assert_eq!(
        app.requests.load(Ordering::SeqCst),
        1,
        "the redirect reached no upstream"
    );

    conn.send(
        b"GET http://shop.local/v1/sub?k=v HTTP/1.1\r\nHost: shop.local\r\nX-Seen: 1\r\n\r\n",
    );
    let rewritten = conn.response(false);
    let seen = rewritten.text();
    assert!(seen.starts_with("app\n"), "{seen}");
    assert!(
        seen.contains("host: app.internal\n") && !seen.contains("shop.local"),
        "{seen}"
    );
    assert!(seen.contains("x-seen: 1\n"), "{seen}");
    // The upstream's handler answers `/headers/...` paths: the path was rewritten.
    conn.send(b"GET /v1 HTTP/1.1\r\nHost: shop.local\r\n\r\n");
    assert!(conn.response(false).text().starts_with("app\n"));
    // Counted as the answer it is, not as an error.
    let metrics = wait_for_metric(
        &proxy,
        "tern_responses_total{listener=\"web\",class=\"3xx\"}",
        1.0,
    );
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("tern_errors_total{listener=\"web\"") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

both_backends!(
    routes_by_host_and_path,
    a_route_redirects_or_rewrites_the_url,
    routes_match_method_query_and_exact_path_and_edit_headers,
    keep_alive_reuses_both_connections,
    pipelined_requests_are_answered_in_order,
    streams_chunked_and_large_bodies,
    expect_continue_is_passed_through,
    websocket_upgrade_becomes_a_byte_pump,
    a_switch_of_protocols_nobody_asked_for_is_502_and_ends_that_connection,
    an_h2c_upgrade_is_declined_and_the_request_served_as_http1,
    a_response_the_upstream_breaks_off_ends_in_a_reset,
    interim_responses_reach_http11_clients_only,
    a_chunked_response_reaches_an_http10_client_as_its_data_alone,
    a_connection_the_request_asked_to_close_is_not_parked,
    round_robin_reaches_every_endpoint_and_reuses_their_connections,
    a_keep_alive_connection_follows_config_changes,
    a_parked_connection_with_bytes_to_read_is_not_reused,
    a_client_that_stops_reading_is_cut_at_the_idle_timeout,
    upstream_down_is_503,
    upstream_that_hangs_is_504_after_the_timeout,
    no_route_is_404,
    bad_requests_get_the_right_status_and_a_close,
    slowloris_gets_408_while_others_are_served,
    metrics_count_what_was_sent,
    metrics_count_bytes_exactly,
    a_body_that_stalls_gets_408,
);
