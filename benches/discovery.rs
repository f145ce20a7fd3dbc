//! Config distribution at scale: how long one change takes to reach 100 and 1000 connected
//! proxy streams, what each connected proxy costs `tern-control` in memory, and how big a
//! proxy's config is in a mesh of 1000 Services.
//!
//! `cargo build --release -p controlplane && cargo bench -p benches --bench discovery`
//!
//! It runs a real `tern-control` (the release binary, or `$TERN_CONTROL`) on a manifest
//! directory of 1000 Services, each with an EndpointSlice of three endpoints, and connects
//! simulated proxies (discovery streams that ACK, no data plane) that each subscribe to
//! five Services, one of them `svc-0`. Each round rewrites the HTTPRoute of `svc-0` and
//! times, per stream, from the file's rename to the new config's arrival: that includes
//! the directory poll (100 ms) and the debounce (50 ms), so a change cannot arrive sooner
//! than ~150 ms; the spread after the first arrival is the fan-out itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tests::manifests::write;
use tests::simulated::{self, SimulatedProxy};
use tokio::sync::Mutex;

const SERVICES: usize = 1000;
const ROUNDS: usize = 5;

fn service(i: usize) -> String {
    let (a, b) = (10 + i / 250, i % 250 + 1);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: svc-{i}, namespace: default }}\nspec:\n  ports: [{{ name: http, port: 80, targetPort: 8080 }}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{ name: svc-{i}-1, namespace: default, labels: {{ kubernetes.io/service-name: svc-{i} }} }}\naddressType: IPv4\nports: [{{ name: http, port: 8080 }}]\nendpoints:\n  - addresses: [\"10.{a}.{b}.1\"]\n  - addresses: [\"10.{a}.{b}.2\"]\n  - addresses: [\"10.{a}.{b}.3\"]\n"
    )
}

fn route(weight: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: svc-0, namespace: default }}\nspec:\n  parentRefs: [{{ kind: Service, name: svc-0, port: 80 }}]\n  rules:\n    - backendRefs: [{{ name: svc-0, port: 80, weight: {weight} }}, {{ name: svc-1, port: 80, weight: 1 }}]\n"
    )
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary() -> PathBuf {
    std::env::var_os("TERN_CONTROL").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/tern-control"),
        PathBuf::from,
    )
}

fn main() {
    let scratch = std::env::temp_dir().join(format!("tern-discovery-bench-{}", std::process::id()));
    let manifests = scratch.join("manifests");
    let state = scratch.join("state");
    std::fs::create_dir_all(&manifests).expect("scratch directory");
    let mut all = String::new();
    for i in 0..SERVICES {
        all.push_str(&service(i));
        all.push_str("---\n");
    }
    write(&manifests, "services.yaml", &all);
    write(&manifests, "route.yaml", &route(1));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let bin = binary();
    let server = Server(
        Command::new(&bin)
            .args([
                "serve",
                "--listen",
                &port.to_string(),
                "--admin",
                "127.0.0.1:0",
                "--log",
                "warn",
                "--trust-domain",
                "bench.test",
                "--manifests",
            ])
            .arg(&manifests)
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} (cargo build --release -p controlplane): {e}",
                    bin.display()
                )
            }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(port).is_err() {
        assert!(Instant::now() < deadline, "tern-control did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let authority = controlplane::Authority::open(&controlplane::CaOptions {
        state_dir: state.clone(),
        trust_domain: "bench.test".into(),
        workload_lifetime: Duration::from_secs(3600),
        ca_cert: None,
        ca_key: None,
        extra_roots: None,
    })
    .expect("opening the CA's state");
    let id = "spiffe://bench.test/ns/default/sa/client";
    let token = authority.token(
        &id.parse().expect("an ID"),
        controlplane::DEFAULT_TOKEN_VALIDITY,
    );
    let root = std::fs::read_to_string(state.join("ca.crt")).expect("the root");
    let idle_rss = rss_kib(server.0.id());
    let manifest_bytes = all.len() + route(1).len();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let channel = simulated::channel(port, &root).await.expect("connecting");
        // One proxy subscribed to every Service: the whole mesh's config.
        let every: Vec<String> = (0..SERVICES).map(|i| format!("svc-{i}")).collect();
        let mut whole = SimulatedProxy::connect(channel.clone(), simulated::hello(id, &token, "whole-0", &every)).await.expect("a stream");
        let whole_config = whole.next().await.expect("a config").expect("a config");
        let typical: Vec<String> = ["svc-0", "svc-17", "svc-230", "svc-512", "svc-999"].iter().map(|s| (*s).to_owned()).collect();
        let mut one = SimulatedProxy::connect(channel.clone(), simulated::hello(id, &token, "one-0", &typical)).await.expect("a stream");
        let one_config = one.next().await.expect("a config").expect("a config");
        drop((whole, one));
        println!("mesh: {SERVICES} Services x 3 endpoints, {} KiB of manifests", manifest_bytes / 1024);
        println!(
            "config size: a proxy of 5 destinations {} B; a proxy subscribed to all {SERVICES} Services {} KiB ({} clusters)",
            one_config.encoded_len(),
            whole_config.encoded_len() / 1024,
            whole_config.clusters.len()
        );

        let mut proxies: Vec<Arc<Mutex<SimulatedProxy>>> = Vec::new();
        let mut weight = 1;
        for target in [100usize, 1000] {
            let mut channels = Vec::new();
            for _ in 0..target.div_ceil(50) {
                channels.push(simulated::channel(port, &root).await.expect("connecting"));
            }
            let before = proxies.len();
            for i in before..target {
                let services: Vec<String> = std::iter::once("svc-0".to_owned())
                    .chain((1..5).map(|k| format!("svc-{}", (i * 7 + k * 131) % SERVICES)))
                    .collect();
                let mut proxy = SimulatedProxy::connect(channels[i % channels.len()].clone(), simulated::hello(id, &token, &format!("sim-{i}"), &services))
                    .await
                    .expect("a stream");
                proxy.next().await.expect("a first config").expect("a first config");
                proxies.push(Arc::new(Mutex::new(proxy)));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rss = rss_kib(server.0.id());
            let mut from_write = Vec::new();
            let mut fan_out = Vec::new();
            for _ in 0..ROUNDS {
                weight += 1;
                let mut waits = tokio::task::JoinSet::new();
                for proxy in &proxies {
                    let proxy = proxy.clone();
                    waits.spawn(async move {
                        let mut proxy = proxy.lock().await;
                        proxy.next().await.expect("an update").expect("an update");
                        Instant::now()
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                let written = Instant::now();
                write(&manifests, "route.yaml", &route(weight));
                let arrivals = tokio::time::timeout(Duration::from_secs(60), waits.join_all()).await.expect("every proxy got the change");
                let first = arrivals.iter().min().copied().unwrap_or(written);
                from_write.extend(arrivals.iter().map(|a| a.duration_since(written)));
                fan_out.extend(arrivals.iter().map(|a| a.duration_since(first)));
            }
            from_write.sort();
            fan_out.sort();
            println!(
                "{target} streams, {ROUNDS} changes: from the write p50 {:.0} ms p99 {:.0} ms max {:.0} ms; fan-out after the first arrival p50 {:.1} ms p99 {:.1} ms; tern-control RSS {} MiB ({:.1} KiB per connected proxy over the idle {} MiB)",
                quantile(&from_write, 0.5).as_secs_f64() * 1e3,
                quantile(&from_write, 0.99).as_secs_f64() * 1e3,
                quantile(&from_write, 1.0).as_secs_f64() * 1e3,
                quantile(&fan_out, 0.5).as_secs_f64() * 1e3,
                quantile(&fan_out, 0.99).as_secs_f64() * 1e3,
                rss / 1024,
                rss.saturating_sub(idle_rss) as f64 / target as f64,
                idle_rss / 1024
            );
        }
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&scratch);
}
