//! Protocol detection on a `detect` listener, on both IO backends: HTTP/1.1 and HTTP/2 are
//! routed, other bytes go to the cluster as opaque TCP, and a client that says nothing (a server that
//! speaks first) is served as opaque TCP once the detection timeout passes, with no byte
//! lost. Outcomes are counted by protocol.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};

use tests::upstream::{Echo, Http};
use tests::{BackendChoice, both_backends, client, metric, start_proxy, wait_for_metric};

fn config(echo: std::net::SocketAddr, http: std::net::SocketAddr, timeout: &str) -> String {
    format!(
        "listeners:\n  - name: detect\n    address: 127.0.0.1:0\n    protocol: detect\n    cluster: opaque\n    routes: [{{ path_prefix: /web, cluster: web }}]\n\
         clusters:\n  - {{ name: opaque, endpoints: [{echo}] }}\n  - {{ name: web, endpoints: [{http}] }}\n\
         detect_timeout: {timeout}\n"
    )
}

fn http_is_routed_and_other_bytes_are_opaque(backend: BackendChoice) {
    let echo = Echo::start();
    let web = Http::start("web");
    let proxy = start_proxy(&config(echo.addr, web.addr, "5s"), backend);
    let addr = proxy.listener_addr("detect").unwrap();

    // HTTP/1.1 by its request line: routed by path.
    let response = client::request(addr, "GET /web/a HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.text(), "web /web/a");
    let response = client::request(addr, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.status, 404);
    // After an empty line, which a server ignores before a request line.
    let response = client::request(addr, "\r\nGET /web/b HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.text(), "web /web/b");

    // Anything else goes to the cluster as it is, the first bytes included, and a message
    // that starts like a method but is not one too.
    client::assert_echo(addr, b"\x00\x01binary protocol");
    client::assert_echo(addr, b"GETting warmer");
    // Empty lines without end are not buffered until the detection timeout: past a few
    // KiB they are opaque, and reach the cluster at once.
    let flood = b"\r\n".repeat(32 * 1024);
    let mut stream = client::connect(addr);
    stream.write_all(&flood).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_millis(2500)))
        .unwrap();
    let mut echoed = vec![0; flood.len()];
    stream
        .read_exact(&mut echoed)
        .expect("echoed before the 5 s detection timeout");
    assert!(echoed == flood);
    drop(stream);
    // The HTTP/2 preface: routed as HTTP/2.
    let h2 = tests::h2::H2::connect(addr);
    assert_eq!(h2.get("x", "/web/h2").text(), "web /web/h2");
    // A TLS ClientHello (the application's own TLS) is opaque.
    client::assert_echo(addr, &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]);

    let metrics = wait_for_metric(
        &proxy,
        "tern_protocol_detections_total{listener=\"detect\",protocol=\"opaque\"}",
        3.0,
    );
    for (protocol, count) in [("http1", 3.0), ("http2", 1.0), ("tls", 1.0)] {
        assert_eq!(
            metric(
                &metrics,
                &format!(
                    "tern_protocol_detections_total{{listener=\"detect\",protocol=\"{protocol}\"}}"
                )
            ),
            count,
            "{protocol}: {metrics}"
        );
    }
}

/// A listener's authorization turns away a plaintext client (it proves no identity) by what
/// it speaks: each HTTP request is answered 403 on a connection that stays open (a small
/// body read and dropped, an upgrade not made), opaque bytes have their connection closed;
/// nothing reaches the upstreams, and each refusal counts under `RBAC`. A config without the
/// authorization serves the connections already open.
fn an_authorization_turns_plaintext_away_by_what_it_speaks(backend: BackendChoice) {
    let echo = Echo::start();
    let web = Http::start("web");
    let open = config(echo.addr, web.addr, "5s");
    let guarded = open.replace(
        "routes: [",
        "authorization: { identities: [\"spiffe://tern.test/ns/shop/sa/web\"] }\n    routes: [",
    );
    let proxy = start_proxy(&guarded, backend);
    let addr = proxy.listener_addr("detect").unwrap();
    let mut conn = client::Conn::open(addr);
    for request in [
        "GET /web/a HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /web/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        "GET /web/ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ] {
        conn.send(request.as_bytes());
        let response = conn.response(false);
        assert_eq!(
            (response.status, response.header("x-tern-response-flag")),
            (403, Some("RBAC")),
            "{request}"
        );
    }
    let h2 = tests::h2::H2::connect(addr);
    let answer = h2.get("x", "/web/h2");
    assert_eq!(answer.status, 403);
    assert_eq!(answer.headers["x-tern-response-flag"], "RBAC");
    let mut stream = client::connect(addr);
    stream.write_all(b"\x00\x01binary protocol").unwrap();
    assert_eq!(
        client::read_some(&mut stream, &mut [0u8; 8]).unwrap_or(0),
        0
    );
    wait_for_metric(
        &proxy,
        "tern_errors_total{listener=\"detect\",flag=\"RBAC\"}",
        5.0,
    );
    assert_eq!(web.requests.load(std::sync::atomic::Ordering::SeqCst), 0);

    proxy
        .reload(shared::Config::from_yaml(&open, "open").unwrap(), "open")
        .unwrap();
    conn.send(b"GET /web/a HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(conn.response(false).text(), "web /web/a");
    assert_eq!(h2.get("x", "/web/h2").text(), "web /web/h2");
}

/// A rate limit on a `detect` listener counts HTTP requests (plaintext callers share one
/// cap) and lets opaque connections through uncounted.
fn a_rate_limit_counts_http_requests_not_opaque_connections(backend: BackendChoice) {
    let echo = Echo::start();
    let web = Http::start("web");
    let limited = config(echo.addr, web.addr, "5s").replace(
        "routes: [",
        "rate_limit: { per_identity: 1 }\n    routes: [",
    );
    let proxy = start_proxy(&limited, backend);
    let addr = proxy.listener_addr("detect").unwrap();
    let started = std::time::Instant::now();
    let statuses: Vec<u16> = (0..4)
        .map(|i| {
            let response =
                client::request(addr, &format!("GET /web/{i} HTTP/1.1\r\nHost: x\r\n\r\n"));
            if response.status == 429 {
                assert_eq!(response.header("x-tern-response-flag"), Some("RL"));
            }
            response.status
        })
        .collect();
    // A burst of one, and one more a second.
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let most = 1 + started.elapsed().as_secs() as usize;
    assert!(ok >= 1 && ok <= most, "{statuses:?}");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    for _ in 0..3 {
        client::assert_echo(addr, b"\x00\x01binary protocol");
    }
    wait_for_metric(
        &proxy,
        "tern_errors_total{listener=\"detect\",flag=\"RL\"}",
        (4 - ok) as f64,
    );
}

fn a_silent_client_becomes_opaque_after_the_timeout_without_losing_bytes(backend: BackendChoice) {
    // A server that speaks first: it greets, then echoes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let banner = Echo::on(listener, Some(b"220 ready\r\n"), |_| {});
    let web = Http::start("web");
    let proxy = start_proxy(&config(banner.addr, web.addr, "300ms"), backend);
    let addr = proxy.listener_addr("detect").unwrap();

    let mut stream = client::connect(addr);
    let mut greeting = [0u8; 11];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
    // The connection is opaque from here on: bytes flow both ways unchanged.
    stream.write_all(b"HELO tern\r\n").unwrap();
    let mut reply = [0u8; 11];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"HELO tern\r\n");
    drop(stream);

    // A client that sends part of a method, then pauses past the timeout, then the rest:
    // nothing it sent is lost (detection waited on readiness, not on an abandoned read).
    let mut stream = client::connect(addr);
    stream.write_all(b"GE").unwrap();
    let mut greeting = [0u8; 11];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
    stream.write_all(b"T lost?").unwrap();
    let mut reply = [0u8; 9];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"GET lost?");

    wait_for_metric(
        &proxy,
        "tern_protocol_detections_total{listener=\"detect\",protocol=\"timeout\"}",
        2.0,
    );
}

both_backends!(
    an_authorization_turns_plaintext_away_by_what_it_speaks,
    a_rate_limit_counts_http_requests_not_opaque_connections,
    http_is_routed_and_other_bytes_are_opaque,
    a_silent_client_becomes_opaque_after_the_timeout_without_losing_bytes,
);
