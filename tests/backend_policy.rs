//! A cluster's retry policy, outlier detection, balancing and connection limit (a
//! BackendPolicy's) through one proxy hop, on both IO backends and both HTTP versions: a
//! failure the policy names goes to the next endpoint and the client sees the answer, a gRPC
//! call's body is sent again whole, as is an HTTP/1.1 body of known length (a chunked one
//! goes once), a per-try timeout gives a hanging endpoint up in time, an empty budget lets
//! the failure through and counts it, an endpoint whose requests fail in a row is ejected,
//! least-request balancing keeps new requests off an endpoint busy with one, and a
//! connection limit holds the upstream connections of every protocol to its cap, requests
//! waiting for room or overflowing (503 `UO`) past its queue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tests::client::Conn;
use tests::h2::H2;
use tests::upstream::{self, Http};
use tests::{
    BackendChoice, Proxy, both_backends, eventually, metric, start_one_worker, wait_for_metric,
};

/// One worker (its round robin alternates between the two endpoints, so a failing one gets
/// every other first attempt), routing by host to clusters of the endpoints `a` and `b`:
/// `retry.local` retries gateway errors, resets and gRPC UNAVAILABLE; `plain.local` does not
/// retry; `stingy.local` retries with an empty budget; `resets.local` reaches an endpoint
/// that resets every connection, and `b`.
fn proxy(a: SocketAddr, b: SocketAddr, resets: SocketAddr, backend: BackendChoice) -> Proxy {
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - {{ host: retry.local, cluster: retry, timeout: 5s }}
      - {{ host: plain.local, cluster: plain }}
      - {{ host: stingy.local, cluster: stingy }}
      - {{ host: resets.local, cluster: resets }}
clusters:
  - name: retry
    endpoints: [{a}, {b}]
    retries: {{ attempts: 2, on: [gateway_error, reset, unavailable], per_try_timeout: 1s }}
  - {{ name: plain, endpoints: [{a}, {b}] }}
  - name: stingy
    endpoints: [{a}, {b}]
    retries: {{ attempts: 2, on: [gateway_error], budget_percent: 0, min_per_second: 0 }}
  - name: resets
    endpoints: [{resets}, {b}]
    retries: {{ attempts: 1, on: [reset] }}
"#
    );
    start_one_worker(&yaml, backend)
}

fn statuses(conn: &mut Conn, request: &str, times: usize) -> Vec<u16> {
    (0..times)
        .map(|_| {
            conn.send(request.as_bytes());
            conn.response(false).status
        })
        .collect()
}

/// Checks that half the requests to `stingy.local` (`stingy`, their statuses) met `a`'s 503
/// and each had its retry refused, and that `retry.local`'s retries were as many as its
/// requests `a` received (`met_a`); returns the metrics.
fn assert_counted(proxy: &Proxy, stingy: &[u16], met_a: usize) -> String {
    assert_eq!(
        stingy.iter().filter(|&&s| s == 503).count(),
        stingy.len() / 2,
        "{stingy:?}"
    );
    let metrics = wait_for_metric(
        proxy,
        "tern_upstream_retries_refused_total{cluster=\"stingy\"}",
        (stingy.len() / 2) as f64,
    );
    assert_eq!(
        metric(&metrics, "tern_upstream_retries_total{cluster=\"retry\"}"),
        met_a as f64,
        "{metrics}"
    );
    metrics
}

fn http1_failures_the_policy_names_go_to_the_next_endpoint(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let proxy = proxy(a.addr, b.addr, upstream::scripted(b"", true), backend);
    let web = proxy.listener_addr("web").unwrap();
    let mut conn = Conn::open(web);

    // Without retries, every other request meets `a`'s 503.
    let plain = statuses(
        &mut conn,
        "GET /flaky/a/503 HTTP/1.1\r\nHost: plain.local\r\n\r\n",
        6,
    );
    assert_eq!(plain.iter().filter(|&&s| s == 503).count(), 3, "{plain:?}");

    // With them, `b` answers every one. (Each retry draws the next endpoint, so how many
    // first attempts meet `a` depends on where round robin starts: every one is retried.)
    let met_a = a.requests.load(Ordering::SeqCst);
    for _ in 0..6 {
        conn.send(b"GET /flaky/a/503 HTTP/1.1\r\nHost: retry.local\r\n\r\n");
        let response = conn.response(false);
        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-served-by"), Some("b"));
    }
    // An endpoint that never answers is given up after the per-try timeout.
    let hang = statuses(
        &mut conn,
        "GET /flaky/a/hang HTTP/1.1\r\nHost: retry.local\r\n\r\n",
        2,
    );
    assert_eq!(hang, [200; 2]);
    // A body of known length within 64 KiB is read whole first, and goes again with its
    // request.
    for _ in 0..4 {
        conn.send(
            b"POST /flaky/a/503 HTTP/1.1\r\nHost: retry.local\r\ncontent-length: 2\r\n\r\nhi",
        );
        let response = conn.response(false);
        assert_eq!((response.status, response.text()), (200, "hi".to_owned()));
    }
    // Read whole, it leaves a request pipelined behind it intact.
    conn.send(b"POST /flaky/a/503 HTTP/1.1\r\nHost: retry.local\r\ncontent-length: 7\r\n\r\nfirst\r\nPOST /flaky/a/503 HTTP/1.1\r\nHost: retry.local\r\ncontent-length: 6\r\n\r\nsecond");
    for body in ["first\r\n", "second"] {
        let response = conn.response(false);
        assert_eq!((response.status, response.text()), (200, body.to_owned()));
    }
    let met_a = a.requests.load(Ordering::SeqCst) - met_a;
    assert!(met_a >= 8, "{met_a}");
    // A connection reset before any answer.
    let reset = statuses(&mut conn, "GET / HTTP/1.1\r\nHost: resets.local\r\n\r\n", 4);
    assert_eq!(reset, [200; 4]);

    // A chunked body goes upstream as it streams in: its request is not retried.
    let chunked = statuses(
        &mut conn,
        "POST /flaky/a/503 HTTP/1.1\r\nHost: retry.local\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        4,
    );
    assert_eq!(
        chunked.iter().filter(|&&s| s == 503).count(),
        2,
        "{chunked:?}"
    );

    // An empty budget: the failure comes through, and the refused retry is counted.
    let stingy = statuses(
        &mut conn,
        "GET /flaky/a/503 HTTP/1.1\r\nHost: stingy.local\r\n\r\n",
        4,
    );
    let metrics = assert_counted(&proxy, &stingy, met_a);
    // Three or four of the four requests met the resetting endpoint first.
    let resets = metric(&metrics, "tern_upstream_retries_total{cluster=\"resets\"}");
    assert!((3.0..=4.0).contains(&resets), "{metrics}");
    assert_eq!(
        metric(&metrics, "tern_upstream_retries_total{cluster=\"plain\"}"),
        0.0
    );
}

/// A body a retry policy keeps is read whole before its request goes: one that stalls
/// gets 408 within `body_timeout`, one cut short is closed unanswered, and nothing reaches
/// the upstream.
fn a_body_kept_for_retries_that_stalls_goes_nowhere(backend: BackendChoice) {
    let a = Http::start("a");
    let yaml = format!(
        "listeners:\n  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: retry }}] }}\nclusters:\n  - {{ name: retry, endpoints: [{}], retries: {{ attempts: 1, on: [reset] }} }}\nhttp: {{ body_timeout: 300ms }}\n",
        a.addr
    );
    let proxy = start_one_worker(&yaml, backend);
    let mut conn = Conn::open(proxy.listener_addr("web").unwrap());
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 10\r\n\r\nhi");
    let response = conn.response(false);
    assert_eq!(
        (response.status, response.header("x-tern-response-flag")),
        (408, Some("DT"))
    );
    assert!(conn.closed());
    // One that ends short of its length is closed, unanswered.
    let mut conn = Conn::open(proxy.listener_addr("web").unwrap());
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 10\r\n\r\nhi");
    conn.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(conn.closed());
    assert_eq!(a.requests.load(Ordering::SeqCst), 0);
}

fn grpc_call(
    authority: &str,
    path: &str,
    message: &'static [u8],
) -> hyper::Request<http_body_util::Full<Bytes>> {
    hyper::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(message)))
        .unwrap()
}

fn http2_failures_the_policy_names_go_again_with_their_body(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let proxy = proxy(a.addr, b.addr, upstream::dead_address(), backend);
    let client = H2::connect(proxy.listener_addr("web").unwrap());
    const MESSAGE: &[u8] = b"\0\0\0\0\x05hello";

    // Without retries, every other call meets `a`'s UNAVAILABLE.
    let plain: Vec<_> = (0..6)
        .map(|_| client.request(grpc_call("plain.local", "/flaky/a/unavailable", MESSAGE)))
        .collect();
    let unavailable = plain
        .iter()
        .filter(|answer| answer.headers.get("grpc-status").is_some_and(|s| s == "14"))
        .count();
    assert_eq!(unavailable, 3);

    // With them, `b` answers every call, having received its whole message.
    let met_a = a.requests.load(Ordering::SeqCst);
    for _ in 0..6 {
        let answer = client.request(grpc_call("retry.local", "/flaky/a/unavailable", MESSAGE));
        assert_eq!(answer.status, 200);
        assert_eq!(answer.headers["x-served-by"], "b");
        assert_eq!(answer.body.as_ref(), MESSAGE);
    }
    // Gateway errors and an endpoint that never answers.
    for (path, times) in [("/flaky/a/503", 4), ("/flaky/a/hang", 2)] {
        for _ in 0..times {
            let answer = client.send("POST", "retry.local", path, Bytes::from_static(b"body"));
            assert_eq!(answer.status, 200, "{path}");
            assert_eq!(answer.body.as_ref(), b"body");
        }
    }
    // A request without a body (its stream ends with its head, on every attempt).
    for _ in 0..2 {
        let answer = client.get("retry.local", "/flaky/a/503");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.headers["x-served-by"], "b");
    }
    let met_a = a.requests.load(Ordering::SeqCst) - met_a;
    assert!(met_a >= 13, "{met_a}");
    // An empty budget lets the failures through.
    let stingy: Vec<_> = (0..4)
        .map(|_| client.get("stingy.local", "/flaky/a/503").status)
        .collect();
    assert_counted(&proxy, &stingy, met_a);
}

/// A proxy with one worker whose `h1.local` and `h2.local` go to clusters of two endpoints
/// each, ejecting one after two failed requests in a row.
fn ejecting(h1: [SocketAddr; 2], h2: [SocketAddr; 2], backend: BackendChoice) -> Proxy {
    let [a, b] = h1;
    let [c, d] = h2;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - {{ host: h1.local, cluster: h1 }}
      - {{ host: h2.local, cluster: h2 }}
clusters:
  - name: h1
    endpoints: [{a}, {b}]
    outlier_detection: {{ consecutive_failures: 2, base_ejection_time: 1h }}
  - name: h2
    endpoints: [{c}, {d}]
    outlier_detection: {{ consecutive_failures: 2, base_ejection_time: 1h }}
"#
    );
    start_one_worker(&yaml, backend)
}

fn an_endpoint_whose_requests_keep_failing_is_ejected(backend: BackendChoice) {
    let (a, b, c, d) = (
        Http::start("a"),
        Http::start("b"),
        Http::start("c"),
        Http::start("d"),
    );
    let proxy = ejecting([a.addr, b.addr], [c.addr, d.addr], backend);
    let web = proxy.listener_addr("web").unwrap();

    // Round robin alternates: `a` fails twice in a row (its streak not broken by `b`'s
    // answers), then is passed over.
    let mut conn = Conn::open(web);
    let h1 = statuses(
        &mut conn,
        "GET /flaky/a/503 HTTP/1.1\r\nHost: h1.local\r\n\r\n",
        12,
    );
    assert_eq!(h1.iter().filter(|&&s| s == 503).count(), 2, "{h1:?}");
    assert_eq!(a.requests.load(Ordering::SeqCst), 2);

    let client = H2::connect(web);
    let h2: Vec<_> = (0..12)
        .map(|_| client.get("h2.local", "/flaky/c/503").status)
        .collect();
    assert_eq!(h2.iter().filter(|&&s| s == 503).count(), 2, "{h2:?}");
    assert_eq!(c.requests.load(Ordering::SeqCst), 2);

    let metrics = wait_for_metric(&proxy, "tern_upstream_ejections_total{cluster=\"h2\"}", 1.0);
    assert_eq!(
        metric(&metrics, "tern_upstream_ejections_total{cluster=\"h1\"}"),
        1.0
    );
}

/// Sends requests that hang at `a` and are answered at once by `b`, through a proxy whose
/// one cluster of `a` and `b` picks the less loaded of two (`send` makes one request on a
/// connection it keeps open), and checks that once one hangs at `a` every later one goes to
/// `b`: two idle endpoints are equals (either is picked), and round robin would send `a`
/// every other one.
fn assert_least_request(backend: BackendChoice, mut send: impl FnMut(SocketAddr)) {
    let (a, b) = (Http::start("a"), Http::start("b"));
    let yaml = format!(
        "listeners:\n  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: least, timeout: 30s }}] }}\nclusters:\n  - {{ name: least, endpoints: [{}, {}], balancing: least_request }}\n",
        a.addr, b.addr
    );
    let proxy = start_one_worker(&yaml, backend);
    let web = proxy.listener_addr("web").unwrap();
    let reached = || a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst);
    let mut sent = 0;
    let mut send_one = || {
        send(web);
        sent += 1;
        eventually(
            Duration::from_secs(5),
            "the request reaches an upstream",
            || reached() == sent,
        );
        // `b` answers at once; its answer leaves the proxy, and its request stops counting,
        // microseconds later.
        std::thread::sleep(Duration::from_millis(50));
    };
    while a.requests.load(Ordering::SeqCst) == 0 {
        assert!(
            b.requests.load(Ordering::SeqCst) < 40,
            "no request reached `a`"
        );
        send_one();
    }
    for _ in 0..5 {
        send_one();
    }
    assert_eq!(a.requests.load(Ordering::SeqCst), 1);
}

fn least_request_sends_new_requests_to_the_idle_endpoint(backend: BackendChoice) {
    let mut held = Vec::new();
    assert_least_request(backend, |web| {
        let mut conn = Conn::open(web);
        conn.send(b"GET /flaky/a/hang HTTP/1.1\r\nHost: x\r\n\r\n");
        held.push(conn);
    });
    // HTTP/2 streams, each held while it waits for its answer.
    let mut client = None;
    assert_least_request(backend, |web| {
        client
            .get_or_insert_with(|| H2::connect(web))
            .start_get("x", "/flaky/a/hang");
    });
}

/// One worker, whose cluster `capped` of three endpoints (its round robin takes them in
/// turn) may have one upstream connection open and one request waiting for room, and whose
/// cluster `tcp` of an echo server one connection and none waiting.
fn capped(upstreams: [&Http; 3], echo: SocketAddr, backend: BackendChoice) -> Proxy {
    let [a, b, c] = upstreams.map(|u| u.addr);
    let yaml = format!(
        r#"
listeners:
  - {{ name: web, address: 127.0.0.1:0, protocol: http, routes: [{{ cluster: capped, timeout: 30s }}] }}
  - {{ name: tcp, address: 127.0.0.1:0, protocol: tcp, cluster: tcp }}
clusters:
  - name: capped
    endpoints: [{a}, {b}, {c}]
    connect_timeout: 5s
    connection_limit: {{ max_connections: 1, max_pending: 1 }}
  - name: tcp
    endpoints: [{echo}]
    connection_limit: {{ max_connections: 1, max_pending: 0 }}
"#
    );
    start_one_worker(&yaml, backend)
}

/// What the proxy answered, and its flag if it answered itself.
type Answered = (u16, Option<String>);

/// Sends a request that the upstreams answer after 1.5 s (`slow`), and while it holds the
/// one connection, one that must wait for room and then one more, and returns what the
/// last one got; checks that the first two are answered.
fn while_one_is_slow(
    (proxy, upstreams): (&Proxy, [&Http; 3]),
    slow: &(dyn Fn() -> u16 + Sync),
    send: &(dyn Fn() -> Answered + Sync),
) -> Answered {
    let reached = || -> usize {
        upstreams
            .iter()
            .map(|u| u.requests.load(Ordering::SeqCst))
            .sum()
    };
    let before = reached();
    std::thread::scope(|scope| {
        let slow = scope.spawn(slow);
        eventually(
            Duration::from_secs(5),
            "the slow request is upstream",
            || reached() > before,
        );
        let waiting = scope.spawn(send);
        wait_for_metric(proxy, "tern_upstream_pending{cluster=\"capped\"}", 1.0);
        let last = send();
        assert_eq!(slow.join().unwrap(), 200);
        assert_eq!(waiting.join().unwrap(), (200, None));
        last
    })
}

/// Upstream connections: made so far, and open now once the proxy's closes have reached
/// the upstreams (which are then at most one).
fn connections(upstreams: [&Http; 3]) -> usize {
    let open = || -> usize {
        upstreams
            .iter()
            .map(|u| u.open.load(Ordering::SeqCst))
            .sum()
    };
    eventually(
        Duration::from_secs(5),
        "one upstream connection open at most",
        || open() <= 1,
    );
    upstreams
        .iter()
        .map(|u| u.connections.load(Ordering::SeqCst))
        .sum()
}

fn a_capped_cluster_keeps_to_its_connections(backend: BackendChoice) {
    let (a, b, c) = (Http::start("a"), Http::start("b"), Http::start("c"));
    let upstreams = [&a, &b, &c];
    let echo = upstream::Echo::start();
    let proxy = capped(upstreams, echo.addr, backend);
    let web = proxy.listener_addr("web").unwrap();
    let http1 = |path: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let response = tests::client::request(web, &request);
        let flag = response.header("x-tern-response-flag").map(str::to_owned);
        (response.status, flag)
    };
    let h2 = H2::connect(web);
    let http2 = |path: &str| {
        let answer = h2.get("x", path);
        let flag = answer.headers.get("x-tern-response-flag");
        let flag = flag.map(|f| f.to_str().unwrap().to_owned());
        (answer.status, flag)
    };

    // At the cap, a request to another endpoint goes over the connection there is rather
    // than wait or open another.
    let mut conn = Conn::open(web);
    assert_eq!(
        statuses(&mut conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 6),
        [200; 6]
    );
    assert_eq!(connections(upstreams), 1);
    // While a slow request holds it, the next request waits for it (and takes it over once
    // the slow one is answered), and the one after that finds the queue full.
    let last = while_one_is_slow((&proxy, upstreams), &|| http1("/slow/1500").0, &|| {
        http1("/")
    });
    assert_eq!(last, (503, Some("UO".to_owned())));
    assert_eq!(connections(upstreams), 1);

    // HTTP/2: the first request closes the idle HTTP/1.1 connection to make room for its
    // own, which every later stream shares, whatever its endpoint.
    for _ in 0..6 {
        assert_eq!(http2("/"), (200, None));
    }
    assert_eq!(connections(upstreams), 2);
    // A slow HTTP/1.1 request takes the room (closing the idle HTTP/2 connection); HTTP/2
    // streams wait for it then.
    let last = while_one_is_slow((&proxy, upstreams), &|| http1("/slow/1500").0, &|| {
        http2("/")
    });
    assert_eq!(last, (503, Some("UO".to_owned())));
    assert_eq!(connections(upstreams), 4);
    // And the other way round: an HTTP/1.1 request waits for a slow stream's connection,
    // which closes for it once the stream ends.
    let last = while_one_is_slow((&proxy, upstreams), &|| http2("/slow/1500").0, &|| {
        http1("/")
    });
    assert_eq!(last, (503, Some("UO".to_owned())));
    assert_eq!(connections(upstreams), 5);
    wait_for_metric(
        &proxy,
        "tern_upstream_overflows_total{cluster=\"capped\"}",
        3.0,
    );

    // Opaque TCP: the second connection is closed at once, and once the first closes a
    // third goes through.
    let tcp = proxy.listener_addr("tcp").unwrap();
    let mut first = Conn::open(tcp);
    first.echo(b"first");
    let mut second = Conn::open(tcp);
    assert!(second.closed());
    drop(first);
    wait_for_metric(
        &proxy,
        "tern_upstream_overflows_total{cluster=\"tcp\"}",
        1.0,
    );
    eventually(
        Duration::from_secs(5),
        "the first connection's slot comes back",
        || {
            let mut third = Conn::open(tcp);
            third.send(b"third");
            !third.closed()
        },
    );
}

both_backends!(
    a_body_kept_for_retries_that_stalls_goes_nowhere,
    a_capped_cluster_keeps_to_its_connections,
    http1_failures_the_policy_names_go_to_the_next_endpoint,
    http2_failures_the_policy_names_go_again_with_their_body,
    an_endpoint_whose_requests_keep_failing_is_ejected,
    least_request_sends_new_requests_to_the_idle_endpoint,
);
