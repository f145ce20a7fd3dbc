//! A proxy's life: readiness, config reloads, `/config_dump`, and graceful drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tests::client::{self, Conn};
use tests::upstream::Http;
use tests::{BackendChoice, admin_get, both_backends, start_proxy};

fn config(routes: &str, clusters: &[(&str, std::net::SocketAddr)], extra_listener: &str) -> String {
    let clusters: String = clusters
        .iter()
        .map(|(name, addr)| format!("  - {{ name: {name}, endpoints: [{addr}] }}\n"))
        .collect();
    format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n{routes}{extra_listener}clusters:\n{clusters}"
    )
}

fn get(addr: std::net::SocketAddr, path: &str) -> client::Response {
    client::request(addr, &format!("GET {path} HTTP/1.1\r\nHost: any\r\n\r\n"))
}

fn reload_applies_to_new_requests_and_keeps_listeners(backend: BackendChoice) {
    let a = Http::start("a");
    let b = Http::start("b");
    let clusters = [("a", a.addr), ("b", b.addr)];
    let proxy = start_proxy(&config("      - { cluster: a }\n", &clusters, ""), backend);
    let addr = proxy.listener_addr("web").unwrap();
    assert_eq!(get(addr, "/x").text(), "a /x");
    // A keep-alive connection opened before the reload.
    let mut old = Conn::open(addr);
    old.send(b"GET /old HTTP/1.1\r\nHost: any\r\n\r\n");
    assert_eq!(old.response(false).text(), "a /old");

    let extra = "  - { name: raw, address: 127.0.0.1:0, protocol: tcp, cluster: b }\n";
    let new =
        shared::Config::from_yaml(&config("      - { cluster: b }\n", &clusters, extra), "v2")
            .unwrap();
    assert_eq!(proxy.reload(new, "v2").unwrap(), 2);
    // Same listener, same port, new routes for new connections.
    assert_eq!(proxy.listener_addr("web"), Some(addr));
    assert_eq!(get(addr, "/x").text(), "b /x");
    // The open keep-alive connection's next request follows the new routes too.
    old.send(b"GET /old2 HTTP/1.1\r\nHost: any\r\n\r\n");
    assert_eq!(old.response(false).text(), "b /old2");
    // The new listener works.
    assert!(proxy.listener_addr("raw").is_some());

    let dump: String = admin_get(&proxy, "/config_dump");
    assert!(dump.contains("\"version\": 2"), "{dump}");
    assert!(dump.contains("\"source\": \"v2\""), "{dump}");
    assert!(dump.contains("\"name\": \"raw\""), "{dump}");
}

fn a_bad_config_is_refused_and_the_old_one_stays(backend: BackendChoice) {
    let a = Http::start("a");
    let proxy = start_proxy(
        &config("      - { cluster: a }\n", &[("a", a.addr)], ""),
        backend,
    );
    let addr = proxy.listener_addr("web").unwrap();

    let unknown_cluster = config("      - { cluster: nope }\n", &[("a", a.addr)], "");
    let error = shared::Config::from_yaml(&unknown_cluster, "bad.yaml").unwrap_err();
    assert!(
        error
            .to_string()
            .contains("listeners[0].routes[0].backends[0].cluster"),
        "{error}"
    );

    // Valid, but its new listener cannot bind: the whole change is refused.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "  - {{ name: clash, address: {}, protocol: tcp, cluster: a }}\n",
        taken.local_addr().unwrap()
    );
    let clash = shared::Config::from_yaml(
        &config("      - { cluster: a }\n", &[("a", a.addr)], &extra),
        "clash",
    )
    .unwrap();
    let error = proxy.reload(clash, "clash").unwrap_err();
    assert!(error.to_string().contains("clash"), "{error}");

    assert_eq!(get(addr, "/still").text(), "a /still");
    assert!(admin_get(&proxy, "/config_dump").contains("\"version\": 1"));
}

fn ready_live_and_shutdown(backend: BackendChoice) {
    let a = Http::start("a");
    let proxy = start_proxy(
        &config("      - { cluster: a }\n", &[("a", a.addr)], ""),
        backend,
    );
    assert_eq!(admin_get(&proxy, "/live"), "live\n");
    assert_eq!(admin_get(&proxy, "/ready"), "ready\n");
    let dump = admin_get(&proxy, "/config_dump");
    let backend_name = if backend == BackendChoice::Epoll {
        "epoll"
    } else {
        "io_uring"
    };
    assert!(
        dump.contains(&format!("\"backend\": \"{backend_name}\"")),
        "{dump}"
    );
    assert!(dump.contains("\"workers\": 2"), "{dump}");

    let wrong = client::request(
        proxy.admin_addr(),
        "GET /shutdown HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(wrong.status, 405);
    let shutdown = client::request(
        proxy.admin_addr(),
        "POST /shutdown HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(shutdown.status, 200);
    let ready = client::request(proxy.admin_addr(), "GET /ready HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((ready.status, ready.text().as_str()), (503, "draining\n"));
    // Workers stop once drained; the listener no longer accepts.
    let addr = proxy.listener_addr("web").unwrap();
    proxy.join();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the listener is closed after the drain"
    );
}

fn drain_finishes_in_flight_requests(backend: BackendChoice) {
    let a = Http::start("a");
    let proxy = start_proxy(
        &config("      - { cluster: a }\n", &[("a", a.addr)], ""),
        backend,
    );
    let addr = proxy.listener_addr("web").unwrap();
    // Idle keep-alive connections are closed by the drain.
    let mut idle = Conn::open(addr);
    idle.send(b"GET /warm HTTP/1.1\r\nHost: any\r\n\r\n");
    assert_eq!(idle.response(false).status, 200);

    // 16 requests in flight, each answered 300 ms after it arrives upstream.
    let clients = 16;
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                conn.send(
                    format!("GET /slow/300 HTTP/1.1\r\nHost: any\r\nX-Client: {i}\r\n\r\n")
                        .as_bytes(),
                );
                barrier.wait();
                let response = conn.response(false);
                (
                    response.status,
                    response.text(),
                    response.header("connection").map(str::to_owned),
                    conn.closed(),
                )
            })
        })
        .collect();
    barrier.wait();
    // Let the requests reach the upstream, then drain while they are in flight.
    let deadline = Instant::now() + Duration::from_secs(2);
    while a.requests.load(std::sync::atomic::Ordering::SeqCst) < clients + 1 {
        assert!(
            Instant::now() < deadline,
            "requests did not reach the upstream"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    proxy.drain();
    for thread in threads {
        let (status, text, connection, closed) = thread.join().unwrap();
        assert_eq!(
            (status, text.as_str()),
            (200, "a slow"),
            "an in-flight request was lost"
        );
        assert_eq!(
            connection.as_deref(),
            Some("close"),
            "the proxy tells the client it is closing"
        );
        assert!(closed);
    }
    assert!(
        idle.closed(),
        "idle keep-alive connections are closed by the drain"
    );
    proxy.join();
}

both_backends!(
    reload_applies_to_new_requests_and_keeps_listeners,
    a_bad_config_is_refused_and_the_old_one_stays,
    ready_live_and_shutdown,
    drain_finishes_in_flight_requests,
);

/// Each worker asks the scheduler for the configured time slice (where the kernel reports
/// slices: Linux 6.12 and later).
#[test]
fn workers_run_with_the_configured_scheduler_slice() {
    let slice_of = |task: &std::path::Path| -> Option<u64> {
        std::fs::read_to_string(task.join("sched"))
            .ok()?
            .lines()
            .find(|line| line.starts_with("se.slice"))?
            .split(':')
            .nth(1)?
            .trim()
            .parse()
            .ok()
    };
    // Where the kernel has custom slices (and reports them), a thread asking for one says.
    let supported = std::thread::spawn(move || {
        dataplane::sys::set_thread_slice(500_000).is_ok_and(|kernels| kernels != 0)
            && slice_of(std::path::Path::new("/proc/thread-self")) == Some(500_000)
    })
    .join()
    .unwrap();
    if !supported {
        println!("this kernel has no custom scheduler slices, or does not report them");
        return;
    }
    let options = dataplane::Options {
        worker_slice: Some(Duration::from_micros(420)),
        ..tests::options(BackendChoice::Epoll)
    };
    let config = shared::Config::from_yaml("{}", "test.yaml").unwrap();
    let proxy = dataplane::Proxy::start(config, "test.yaml", options).unwrap();
    let workers_with_slice = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|task| {
                std::fs::read_to_string(task.join("comm"))
                    .is_ok_and(|name| name.starts_with("tern-worker"))
            })
            .filter(|task| slice_of(task) == Some(420_000))
            .count()
    };
    tests::eventually(
        Duration::from_secs(5),
        "both workers set their slice",
        || workers_with_slice() == 2,
    );
    drop(proxy);
}
