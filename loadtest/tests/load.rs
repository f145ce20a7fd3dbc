//! tern-load against its own built-in upstreams, on loopback: rate accuracy, stall
//! visibility, output agreement, and how runs end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use loadtest::generator::{self, Plan, Progress};
use loadtest::protocol::{Protocol, Workload};
use loadtest::report::Summary;
use loadtest::serve::{self, Spec};

fn server(protocol: Protocol, stall: Option<(Duration, Duration)>) -> serve::Server {
    serve::start(Spec {
        addr: "127.0.0.1:0".parse().unwrap(),
        protocol,
        request_size: 64,
        response_size: 1024,
        delay: Duration::ZERO,
        stall,
        threads: 1,
    })
    .unwrap()
}

fn plan(target: std::net::SocketAddr, workload: Workload, rate: f64, duration: Duration) -> Plan {
    Plan {
        target,
        workload,
        rate,
        connections: 8,
        threads: 1,
        duration,
        warmup: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
    }
}

#[test]
fn achieves_the_target_rate_within_one_percent() {
    for (protocol, workload) in [
        (Protocol::Http, Workload::http("t", "/", 0)),
        (Protocol::Tcp, Workload::tcp(64, 1024)),
        (Protocol::Http2, Workload::http2("t", "/", 0)),
        (
            Protocol::Grpc,
            Workload::grpc("t", loadtest::h2::GRPC_ECHO_PATH, 100),
        ),
    ] {
        let upstream = server(protocol, None);
        let outcome = generator::run(
            &plan(upstream.addr, workload, 1000.0, Duration::from_secs(3)),
            &Progress::default(),
        )
        .unwrap();
        let achieved = outcome.achieved_rate();
        assert!(
            (achieved - 1000.0).abs() <= 10.0,
            "{protocol:?}: achieved {achieved}/s"
        );
        assert_eq!(outcome.scheduled, 3000, "{protocol:?}");
        assert_eq!(
            outcome.completed, 3000,
            "{protocol:?}: errors {:?}",
            outcome.errors
        );
        assert_eq!(outcome.latency.len(), 3000);
    }
}

#[test]
fn an_injected_stall_shows_in_the_percentiles_as_theory_predicts() {
    // The server answers nothing for 100 ms of every second. Requests keep their schedule,
    // so 10% of them arrive during a pause and wait for its end: their latencies spread
    // evenly over 0..100 ms. Hence p50 stays small, p95 ≈ 50 ms, p99 ≈ 90 ms, max ≈ 100 ms.
    let upstream = server(
        Protocol::Http,
        Some((Duration::from_millis(100), Duration::from_secs(1))),
    );
    let mut plan = plan(
        upstream.addr,
        Workload::http("t", "/", 0),
        1000.0,
        Duration::from_secs(4),
    );
    plan.warmup = Duration::ZERO;
    let outcome = generator::run(&plan, &Progress::default()).unwrap();
    let s = Summary::of(&outcome.latency);
    let ms = |name: &str| s.get(name) as f64 / 1000.0;
    assert!(ms("p50") < 10.0, "p50 {} ms", ms("p50"));
    let p95 = outcome.latency.value_at_percentile(95.0) as f64 / 1000.0;
    assert!((30.0..75.0).contains(&p95), "p95 {p95} ms");
    assert!((75.0..120.0).contains(&ms("p99")), "p99 {} ms", ms("p99"));
    assert!(
        (90.0..150.0).contains(&(s.max as f64 / 1000.0)),
        "max {} ms",
        s.max as f64 / 1000.0
    );
}

fn tern_load() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern-load"))
}

#[test]
fn outputs_parse_and_agree_and_the_run_ends_on_time() {
    let upstream = server(Protocol::Http, None);
    let dir = std::env::temp_dir().join(format!("tern-load-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, hgrm, chart) = (dir.join("r.json"), dir.join("r.hgrm"), dir.join("r.svg"));
    let started = Instant::now();
    let output = tern_load()
        .args([
            "run",
            "--target",
            &upstream.addr.to_string(),
            "--rate",
            "500",
            "--connections",
            "4",
        ])
        .args(["--duration", "1s", "--warmup", "200ms", "--threads", "1"])
        .args([
            "--json",
            json.to_str().unwrap(),
            "--hgrm",
            hgrm.to_str().unwrap(),
            "--chart",
            chart.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(took < Duration::from_secs(5), "the run took {took:?}");

    let table = String::from_utf8(output.stdout).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["completed"], 500);
    assert_eq!(report["rate_kept"], true);
    let p99 = report["latency_us"]["percentiles"]["p99"].as_u64().unwrap();
    // The table's latency row carries the same p99 (third column).
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("latency"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row[3].parse::<u64>().unwrap(), p99, "{table}");
    // In the .hgrm, p99 lies between the rows on either side of the 99% quantile.
    let text = std::fs::read_to_string(&hgrm).unwrap();
    let rows: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse::<f64>().ok()? * 1000.0,
                f.get(1)?.parse::<f64>().ok()?,
            ))
        })
        .collect();
    let after = rows.iter().position(|(_, q)| *q >= 0.99).unwrap();
    let (below, above) = (rows[after.saturating_sub(1)].0, rows[after].0);
    assert!(
        below - 1.0 <= p99 as f64 && p99 as f64 <= above + 1.0,
        "{below} <= {p99} <= {above}"
    );
    assert!(text.contains(&format!("Total count    = {:>12}", 500)));
    assert!(std::fs::read_to_string(&chart).unwrap().starts_with("<svg"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreachable_target_exits_non_zero() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = tern_load()
        .args(["run", "--target", &dead.to_string(), "--duration", "1s"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach"));
}

#[test]
fn a_server_that_dies_mid_run_is_counted_not_hidden() {
    let upstream = server(Protocol::Http, None);
    let target = upstream.addr;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(upstream);
    });
    let outcome = generator::run(
        &plan(
            target,
            Workload::http("t", "/", 0),
            500.0,
            Duration::from_secs(1),
        ),
        &Progress::default(),
    )
    .unwrap();
    killer.join().unwrap();
    assert!(outcome.error_count() > 0, "errors were dropped");
    assert_eq!(
        outcome.completed + outcome.error_count(),
        outcome.scheduled,
        "{:?}",
        outcome.errors
    );
}

/// An HTTP/2 server that fails every request: 503 for plain HTTP/2, `grpc-status: 14`
/// (UNAVAILABLE, trailers-only) for gRPC; it pings the client first, as servers may.
fn failing_h2_server(grpc: bool) -> (std::net::SocketAddr, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                let mut ping = connection.ping_pong().unwrap();
                tokio::spawn(async move {
                    let _ = ping.ping(h2::Ping::opaque()).await;
                });
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    let response = if grpc {
                        http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "14")
                            .body(())
                            .unwrap()
                    } else {
                        http::Response::builder().status(503).body(()).unwrap()
                    };
                    let _ = respond.send_response(response, true);
                }
            });
        }
    });
    (addr, runtime)
}

#[test]
fn http2_and_grpc_failures_are_counted_by_kind_and_keep_the_connection() {
    for (grpc, workload, kind) in [
        (false, Workload::http2("t", "/", 0), "http 5xx"),
        (
            true,
            Workload::grpc("t", loadtest::h2::GRPC_ECHO_PATH, 10),
            "grpc UNAVAILABLE",
        ),
    ] {
        let (addr, _runtime) = failing_h2_server(grpc);
        let outcome = generator::run(
            &plan(addr, workload, 400.0, Duration::from_secs(1)),
            &Progress::default(),
        )
        .unwrap();
        assert_eq!(outcome.scheduled, 400, "{kind}");
        assert_eq!(outcome.completed, 0, "{kind}");
        assert_eq!(
            outcome.errors.get(kind).copied(),
            Some(400),
            "{kind}: {:?}",
            outcome.errors
        );
        assert_eq!(outcome.errors.len(), 1, "only {kind}: {:?}", outcome.errors);
    }
}

#[test]
fn every_connection_timing_out_at_once_does_not_stall_the_run() {
    // The server answers nothing for 1.5 s of every 3 s, far past the 300 ms timeout. When
    // every outstanding request times out at once, the sends they reschedule must still wake
    // the generator (they once waited for a timer set to "never"), and a request that needed
    // a new connection is scheduled once, not once more when the connection is up.
    let upstream = server(
        Protocol::Http,
        Some((Duration::from_millis(1500), Duration::from_secs(3))),
    );
    let mut plan = plan(
        upstream.addr,
        Workload::http("t", "/", 0),
        200.0,
        Duration::from_secs(2),
    );
    plan.warmup = Duration::ZERO;
    plan.timeout = Duration::from_millis(300);
    // One connection: when it times out nothing else is pending, the harshest case.
    plan.connections = 1;
    // On a thread of its own, so a run that never ends fails the test instead of hanging it.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(generator::run(&plan, &Progress::default()));
    });
    let outcome = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the run never ended")
        .unwrap();
    assert!(outcome.errors.get("timeout").copied().unwrap_or(0) > 0);
    assert!(outcome.completed > 0);
    assert_eq!(
        outcome.scheduled,
        outcome.completed + outcome.error_count(),
        "{:?}",
        outcome.errors
    );
}
