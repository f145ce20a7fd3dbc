//! Opaque TCP through one proxy hop: byte-exact both ways, half-close, failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use tests::upstream::{self, Echo, black_hole, dead_address};
use tests::{BackendChoice, both_backends, client, metric, start_proxy, wait_for_metric};

fn tcp_config(endpoint: std::net::SocketAddr, idle: &str) -> String {
    format!(
        "listeners:\n  - {{ name: raw, address: 127.0.0.1:0, protocol: tcp, cluster: up }}\n\
         clusters:\n  - {{ name: up, endpoints: [{endpoint}], idle_timeout: {idle}, connect_timeout: 500ms }}\n"
    )
}

fn ten_megabytes_echo_exactly_with_half_close(backend: BackendChoice) {
    let echo = Echo::start();
    let proxy = start_proxy(&tcp_config(echo.addr, "30s"), backend);
    let sent = client::assert_bulk_echo(proxy.listener_addr("raw").unwrap(), 10 * 1024 * 1024);

    let metrics = wait_for_metric(
        &proxy,
        "tern_listener_active_connections{listener=\"raw\"}",
        0.0,
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_listener_received_bytes_total{listener=\"raw\"}"
        ),
        sent as f64
    );
    assert_eq!(
        metric(&metrics, "tern_listener_sent_bytes_total{listener=\"raw\"}"),
        sent as f64
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_listener_connections_total{listener=\"raw\"}"
        ),
        1.0
    );
    // A bulk direction moves to splice on epoll (plain sockets both sides); tokio-uring
    // offers no splice, so io_uring copies.
    let spliced = metric(
        &metrics,
        "tern_listener_spliced_directions_total{listener=\"raw\"}",
    );
    if backend == BackendChoice::Epoll {
        assert!(spliced >= 1.0, "no direction was spliced");
    } else {
        assert_eq!(spliced, 0.0);
    }
}

fn half_close_keeps_the_other_direction_open(backend: BackendChoice) {
    let echo = Echo::start();
    let proxy = start_proxy(&tcp_config(echo.addr, "30s"), backend);
    let mut stream = client::connect(proxy.listener_addr("raw").unwrap());
    stream.write_all(b"ping").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    // The echo answers after seeing our end of stream; our read side still works.
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"ping");
}

fn many_small_exchanges_on_many_connections(backend: BackendChoice) {
    let echo = Echo::start();
    let proxy = start_proxy(&tcp_config(echo.addr, "30s"), backend);
    let addr = proxy.listener_addr("raw").unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut stream = client::connect(addr);
                for i in 0..200 {
                    let message = format!("{t}:{i:05}");
                    stream.write_all(message.as_bytes()).unwrap();
                    let mut reply = vec![0u8; message.len()];
                    stream.read_exact(&mut reply).unwrap();
                    assert_eq!(reply, message.as_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Small messages never look bulk: they stay on the copy path.
    let metrics = tests::admin_get(&proxy, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "tern_listener_spliced_directions_total{listener=\"raw\"}"
        ),
        0.0
    );
}

fn upstream_down_closes_the_connection(backend: BackendChoice) {
    let proxy = start_proxy(&tcp_config(dead_address(), "30s"), backend);
    let mut stream = client::connect(proxy.listener_addr("raw").unwrap());
    let mut buf = [0u8; 16];
    let n = client::read_some(&mut stream, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the proxy closes when no upstream answers");
    let metrics = wait_for_metric(
        &proxy,
        "tern_errors_total{listener=\"raw\",flag=\"UF\"}",
        1.0,
    );
    assert!(
        metric(
            &metrics,
            "tern_upstream_connect_failures_total{cluster=\"up\"}"
        ) >= 1.0
    );
}

fn a_dead_endpoint_is_passed_over_after_it_failed(backend: BackendChoice) {
    let echo = Echo::start();
    // One endpoint is down (its SYNs go unanswered), one is up; one worker, so one memory
    // of which is failing.
    let yaml = format!(
        "listeners:\n  - {{ name: raw, address: 127.0.0.1:0, protocol: tcp, cluster: up }}\n\
         clusters:\n  - {{ name: up, endpoints: [{}, {}], connect_timeout: 300ms }}\n",
        upstream::unresponsive(),
        echo.addr
    );
    let config = shared::Config::from_yaml(&yaml, "test.yaml").unwrap();
    let options = dataplane::Options {
        workers: Some(1),
        ..tests::options(backend)
    };
    let proxy = dataplane::Proxy::start(config, "test.yaml", options).unwrap();
    let addr = proxy.listener_addr("raw").unwrap();
    // Every connection reaches the live endpoint; only the first pays for the dead one, which
    // is passed over after (for a second, longer if it keeps failing).
    for i in 0..10 {
        client::assert_echo(addr, format!("connection {i}").as_bytes());
    }
    let metrics = tests::admin_get(&proxy, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "tern_upstream_connect_failures_total{cluster=\"up\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "tern_upstream_endpoint_backoffs_total{cluster=\"up\"}"
        ),
        1.0,
        "{metrics}"
    );
}

fn a_reset_on_one_side_reaches_the_other_as_a_reset(backend: BackendChoice) {
    // An upstream that answers part of a response, then resets the connection.
    let upstream_addr = upstream::scripted(b"partial", true);
    let proxy = start_proxy(&tcp_config(upstream_addr, "30s"), backend);
    let mut stream = client::connect(proxy.listener_addr("raw").unwrap());
    // A protocol that sends its request, then reads the answer to the end.
    stream.write_all(b"request").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let ended = stream.read_to_end(&mut got);
    assert_eq!(
        ended.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "a clean end would pass {:?} off as the whole answer",
        String::from_utf8_lossy(&got)
    );
}

fn idle_connections_are_closed(backend: BackendChoice) {
    let proxy = start_proxy(&tcp_config(black_hole(), "300ms"), backend);
    let mut stream = client::connect(proxy.listener_addr("raw").unwrap());
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = client::read_some(&mut stream, &mut buf).expect("an orderly close");
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}, before the idle timeout"
    );
    wait_for_metric(
        &proxy,
        "tern_errors_total{listener=\"raw\",flag=\"IT\"}",
        1.0,
    );
}

both_backends!(
    a_dead_endpoint_is_passed_over_after_it_failed,
    ten_megabytes_echo_exactly_with_half_close,
    half_close_keeps_the_other_direction_open,
    many_small_exchanges_on_many_connections,
    upstream_down_closes_the_connection,
    a_reset_on_one_side_reaches_the_other_as_a_reset,
    idle_connections_are_closed,
);
