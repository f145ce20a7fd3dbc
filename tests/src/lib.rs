//! The harness Tern's end-to-end tests share: upstream servers (TCP echo, HTTP via hyper),
//! blocking raw clients that send exact bytes and read exact responses, and a fixture that
//! starts an in-process proxy on loopback with either IO backend, and an in-process
//! `tern-control` CA, and a fake Kubernetes API server.
//!
//! Everything binds `127.0.0.1:0` and is torn down on drop; every socket read has a timeout,
//! so a broken proxy fails a test instead of hanging it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod apiserver;
pub mod ca;
pub mod client;
pub mod h2;
pub mod manifests;
pub mod otlp;
pub mod pki;
pub mod pods;
pub mod simulated;
pub mod upstream;

use std::net::SocketAddr;
use std::time::Duration;

pub use dataplane::{BackendChoice, Proxy};

/// Two unpinned workers, the admin server on a free port, and a short drain deadline.
pub fn options(backend: BackendChoice) -> dataplane::Options {
    dataplane::Options {
        workers: Some(2),
        backend,
        pin_workers: false,
        worker_slice: None,
        admin: "127.0.0.1:0".parse().unwrap(),
        drain_deadline: Duration::from_secs(5),
        access_log: None,
        trace: None,
    }
}

/// Starts a proxy with [`options`].
pub fn start_proxy(yaml: &str, backend: BackendChoice) -> Proxy {
    let config = shared::Config::from_yaml(yaml, "test.yaml").expect("valid test config");
    Proxy::start(config, "test.yaml", options(backend)).expect("proxy starts")
}

/// Starts a proxy with [`options`] but one worker: every request goes through the same
/// round robin, balancer and pool, so tests can tell which endpoint each one reaches.
pub fn start_one_worker(yaml: &str, backend: BackendChoice) -> Proxy {
    let config = shared::Config::from_yaml(yaml, "test.yaml").expect("valid test config");
    let options = dataplane::Options {
        workers: Some(1),
        ..options(backend)
    };
    Proxy::start(config, "test.yaml", options).expect("proxy starts")
}

/// GETs a path from the proxy's admin server and returns the body.
pub fn admin_get(proxy: &Proxy, path: &str) -> String {
    let response = client::request(
        proxy.admin_addr(),
        &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(response.status, 200, "admin {path}: {}", response.text());
    response.text()
}

/// The status and body of an admin GET.
pub fn admin_status(proxy: &Proxy, path: &str) -> (u16, String) {
    let response = client::request(
        proxy.admin_addr(),
        &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
    );
    (response.status, response.text())
}

/// Polls until `check` holds, for up to `within`; panics with `what` otherwise.
pub fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until the proxy's `/ready` answers 200.
pub fn wait_ready(proxy: &Proxy, within: Duration) {
    eventually(within, "the proxy to be ready", || {
        admin_status(proxy, "/ready").0 == 200
    });
}

/// A binary of the workspace (`tern-proxy`, `tern-control`, `tern-load`): `cargo test
/// --workspace` builds them beside the test binaries' `deps/` folder.
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// The value of one metric series in Prometheus text (`name{labels}` exactly), or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |value| value.trim().parse().expect("numeric metric"))
}

/// Scrapes `/metrics` until `series` has `expected`, for up to two seconds (a worker records
/// a request just after its last byte is written, so a client can be a moment ahead).
/// Returns the last scrape.
pub fn wait_for_metric(proxy: &Proxy, series: &str, expected: f64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let text = admin_get(proxy, "/metrics");
        let value = metric(&text, series);
        if value == expected {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} is {value}, expected {expected}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a test body once per IO backend: `both_backends!(name, body_fn)` defines
/// `name::io_uring` and `name::epoll`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn io_uring() {
                    super::$name($crate::BackendChoice::IoUring);
                }
                #[test]
                fn epoll() {
                    super::$name($crate::BackendChoice::Epoll);
                }
            }
        )*
    };
}

/// The address formatted for YAML.
pub fn yaml_addr(addr: SocketAddr) -> String {
    addr.to_string()
}
