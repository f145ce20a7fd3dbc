//! `tern-load compare`: one scenario against several targets — direct, Tern, HAProxy, nginx —
//! in interleaved rounds (A B C A B C …) so machine drift hits all alike, reported as added
//! latency over direct and as ratios between proxies measured in the same run.
//!
//! It starts the built-in upstream and every proxy itself, from configs kept in
//! `loadtest/peers/`, samples each proxy's CPU time and RSS from `/proc`, and writes the
//! `.hgrm` files, JSON and a combined chart. The Tern mTLS pair gets its certificates from a
//! `tern-control` started for the run, as a mesh would; the HAProxy and nginx pairs from PEM
//! files made by [`crate::pki`]. Either way it runs the Tern binaries, never links Tern.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::generator::{self, Outcome, Plan, Progress};
use crate::protocol::{Protocol, Workload};
use crate::report::{self, PERCENTILES, Summary};
use crate::serve;

/// A scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// `http` or `tcp`.
    pub protocol: Protocol,
    /// Requests per second.
    pub rate: f64,
    /// Connection counts to measure, each a separate point.
    pub connections: Vec<usize>,
    /// Measured time per target, per round.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Warm-up per target, per round.
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Request bytes (TCP) or request body bytes (HTTP).
    #[serde(default)]
    pub request_size: usize,
    /// Response bytes.
    pub response_size: usize,
    /// Which targets, in order: `direct`, `tern`, `tern-uring`, `haproxy`, `nginx`.
    pub targets: Vec<TargetKind>,
    /// Generator threads.
    #[serde(default = "one")]
    pub generator_threads: usize,
    /// Also find each target's saturation point.
    #[serde(default)]
    pub saturation: Option<Saturation>,
    /// A new connection for every request (connection set-up cost: TCP, and mTLS handshakes
    /// through a sidecar pair).
    #[serde(default)]
    pub reconnect: bool,
}

/// A saturation sweep: raise the rate step by step (all targets interleaved at each step)
/// until a target's p99 exceeds the limit or it cannot keep the rate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Saturation {
    /// First rate.
    pub from: f64,
    /// Added at each step.
    pub step: f64,
    /// Last rate tried.
    pub up_to: f64,
    /// The p99 a rate must stay under to pass.
    #[serde(with = "humantime_serde")]
    pub p99_under: Duration,
    /// Connections during the sweep.
    pub connections: usize,
    /// Measured time per step.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

fn one() -> usize {
    1
}

/// A kind of target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// The upstream itself, no proxy.
    Direct,
    /// `tern-proxy`, one worker, its default (epoll) backend.
    Tern,
    /// `tern-proxy`, one worker, io_uring backend.
    TernUring,
    /// A sidecar pair: an outbound `tern-proxy` originating mTLS to an inbound one, one
    /// worker each, with certificates from a CA generated for the run.
    TernMtls,
    /// The same pair built from two HAProxy processes (one thread each).
    HaproxyMtls,
    /// The same pair built from two nginx processes (one worker each).
    NginxMtls,
    /// HAProxy, one thread.
    Haproxy,
    /// nginx, one worker.
    Nginx,
}

impl TargetKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::Tern => "tern",
            TargetKind::TernUring => "tern-uring",
            TargetKind::TernMtls => "tern-mtls",
            TargetKind::HaproxyMtls => "haproxy-mtls",
            TargetKind::NginxMtls => "nginx-mtls",
            TargetKind::Haproxy => "haproxy",
            TargetKind::Nginx => "nginx",
        }
    }
}

/// Where to find the programs.
#[derive(Debug, Clone)]
pub struct Programs {
    /// `tern-proxy`.
    pub tern_proxy: PathBuf,
    /// `tern-control`: its CA certifies the Tern mTLS pair, as in a real mesh.
    pub tern_control: PathBuf,
    /// `haproxy`.
    pub haproxy: PathBuf,
    /// `nginx`.
    pub nginx: PathBuf,
}

/// Responses at least this large make a scenario a bulk-throughput one.
const BULK_BYTES: usize = 1 << 20;

/// Throughput of one bulk response at the median transfer time, MB/s.
fn bulk_mbps(scenario: &Scenario, latency: &Summary) -> f64 {
    let seconds = latency.get("p50") as f64 / 1e6;
    if seconds > 0.0 {
        scenario.response_size as f64 / 1e6 / seconds
    } else {
        0.0
    }
}

/// `target`'s latency less `direct`'s at each percentile, µs.
fn added_over(target: &Summary, direct: &Summary) -> BTreeMap<String, i64> {
    PERCENTILES
        .iter()
        .map(|(_, name)| {
            let added = target.get(name) as i64 - direct.get(name) as i64;
            ((*name).to_owned(), added)
        })
        .collect()
}

/// The rows to compare, like for like, as (Tern, peer): single hops with single hops, mTLS
/// pairs with mTLS pairs.
fn like_for_like(rows: &[TargetResult]) -> Vec<(&TargetResult, &TargetResult)> {
    const PAIRS: [(&str, &[&str]); 3] = [
        ("tern", &["haproxy", "nginx"]),
        ("tern-uring", &["haproxy", "nginx"]),
        ("tern-mtls", &["haproxy-mtls", "nginx-mtls"]),
    ];
    let mut pairs = Vec::new();
    for (ours, theirs) in PAIRS {
        for tern in rows.iter().filter(|r| r.target == ours) {
            for peer in rows.iter().filter(|r| theirs.contains(&r.target.as_str())) {
                pairs.push((tern, peer));
            }
        }
    }
    pairs
}

/// Tern's added latency over the peer's; none when the peer added nothing (the noise floor
/// was above it), where a ratio says nothing.
fn ratio(tern: i64, peer: i64) -> Option<f64> {
    (peer > 0).then(|| tern as f64 / peer as f64)
}

fn ratio_text(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
}

/// The ratio of Tern's added latency to the peer's at `percentile`, round by round, each
/// round against the direct traffic measured next to it.
fn ratios_by_round(tern: &TargetResult, peer: &TargetResult, percentile: &str) -> Vec<Option<f64>> {
    tern.added_us_by_round
        .iter()
        .zip(&peer.added_us_by_round)
        .map(|(t, p)| {
            ratio(
                t.get(percentile).copied().unwrap_or(0),
                p.get(percentile).copied().unwrap_or(0),
            )
        })
        .collect()
}

/// The median of the ratios there are (the mean of the middle two for an even count).
fn median(ratios: &[Option<f64>]) -> Option<f64> {
    let mut known: Vec<f64> = ratios.iter().flatten().copied().collect();
    known.sort_by(f64::total_cmp);
    let mid = known.len() / 2;
    match known.len() {
        0 => None,
        n if n % 2 == 1 => Some(known[mid]),
        _ => Some((known[mid - 1] + known[mid]) / 2.0),
    }
}

/// A started target.
struct Target {
    kind: TargetKind,
    addr: SocketAddr,
    /// The proxy processes (none for direct).
    processes: Vec<Child>,
    /// Processes the target needs but whose CPU and memory are not the proxy's (the Tern
    /// pair's control plane, idle once it has issued the certificates).
    helpers: Vec<Child>,
    _dir: Option<ScratchDir>,
}

impl Target {
    /// CPU and memory of all the target's processes.
    fn usage(&self) -> Option<Usage> {
        if self.processes.is_empty() {
            return None;
        }
        Some(
            self.processes
                .iter()
                .map(|c| process_usage(c.id()))
                .fold(Usage::default(), |a, b| Usage {
                    cpu_seconds: a.cpu_seconds + b.cpu_seconds,
                    rss_bytes: a.rss_bytes + b.rss_bytes,
                }),
        )
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        for child in self.processes.iter_mut().chain(&mut self.helpers) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited during start-up ({status})");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 10s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn fill(template: &str, vars: &[(&str, String)]) -> String {
    vars.iter().fold(template.to_owned(), |text, (key, value)| {
        text.replace(&format!("{{{{{key}}}}}"), value)
    })
}

fn start_target(
    kind: TargetKind,
    scenario: &Scenario,
    upstream: SocketAddr,
    programs: &Programs,
    scratch: &Path,
) -> anyhow::Result<Target> {
    if kind == TargetKind::Direct {
        return Ok(Target {
            kind,
            addr: upstream,
            processes: Vec::new(),
            helpers: Vec::new(),
            _dir: None,
        });
    }
    if kind == TargetKind::TernMtls {
        return start_mtls_pair(scenario, upstream, programs, scratch);
    }
    if matches!(kind, TargetKind::HaproxyMtls | TargetKind::NginxMtls) {
        return start_peer_pair(kind, scenario, upstream, programs, scratch);
    }
    let dir = scratch.join(kind.name());
    std::fs::create_dir_all(&dir)?;
    let listen = free_port()?;
    let child = match kind {
        TargetKind::Tern | TargetKind::TernUring => {
            let listener = tern_listener(scenario.protocol, "hop", listen, "upstream", "");
            let config = dir.join("tern.yaml");
            std::fs::write(
                &config,
                format!(
                    "listeners:\n  - {listener}\nclusters:\n  - {{ name: upstream, endpoints: [{upstream}] }}\n"
                ),
            )?;
            let backend = if kind == TargetKind::TernUring {
                "io-uring"
            } else {
                "epoll"
            };
            let mut child = Command::new(&programs.tern_proxy)
                .args([
                    "--config",
                    &config.display().to_string(),
                    "--admin",
                    "127.0.0.1:0",
                    "--workers",
                    "1",
                ])
                .args(["--io-backend", backend, "--log", "warn"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| {
                    format!(
                        "starting {} ({})",
                        kind.name(),
                        programs.tern_proxy.display()
                    )
                })?;
            wait_listening(listen, &mut child, kind.name())?;
            child
        }
        TargetKind::Haproxy => start_peer(
            Peer::Haproxy,
            scenario,
            listen,
            upstream,
            &dir,
            Tls::None,
            programs,
        )?,
        TargetKind::Nginx => start_peer(
            Peer::Nginx,
            scenario,
            listen,
            upstream,
            &dir,
            Tls::None,
            programs,
        )?,
        TargetKind::Direct
        | TargetKind::TernMtls
        | TargetKind::HaproxyMtls
        | TargetKind::NginxMtls => {
            unreachable!("handled above")
        }
    };
    Ok(Target {
        kind,
        addr: listen,
        processes: vec![child],
        helpers: Vec::new(),
        _dir: Some(ScratchDir(dir)),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Haproxy,
    Nginx,
}

/// A peer proxy's part in an mTLS pair.
#[derive(Debug, Clone, Copy)]
enum Tls<'a> {
    /// Plain in, plain out.
    None,
    /// Terminates mTLS (certificate `server`, client certificates required).
    Terminate(&'a crate::pki::Pki),
    /// Originates mTLS (certificate `client`, verifies `server` by its DNS name).
    Originate(&'a crate::pki::Pki),
}

/// Starts HAProxy or nginx from the configs in `loadtest/peers/`, in its role.
fn start_peer(
    peer: Peer,
    scenario: &Scenario,
    listen: SocketAddr,
    upstream: SocketAddr,
    dir: &Path,
    tls: Tls<'_>,
    programs: &Programs,
) -> anyhow::Result<Child> {
    std::fs::create_dir_all(dir)?;
    let proxied_as = scenario.protocol.proxied_as();
    let mode = proxied_as.proxy_mode();
    // HTTP/2 on both sides: prior knowledge in cleartext, ALPN `h2` under TLS.
    let h2 = proxied_as == Protocol::Http2;
    // HAProxy's cleartext HTTP/2, on both sides (replaced by ALPN where TLS is set).
    let haproxy_h2 = if h2 && peer == Peer::Haproxy {
        " proto h2"
    } else {
        ""
    };
    let d = dir.display().to_string();
    let mut vars: Vec<(&str, String)> = vec![
        ("listen", listen.to_string()),
        ("upstream", upstream.to_string()),
        ("dir", d),
        ("mode", mode.to_owned()),
        (
            "http_only",
            if mode == "http" {
                String::new()
            } else {
                "# ".to_owned()
            },
        ),
        ("bind_tls", haproxy_h2.to_owned()),
        ("server_tls", haproxy_h2.to_owned()),
        ("listen_tls", String::new()),
        ("proxy_tls", String::new()),
        ("scheme", if h2 { "grpc" } else { "http" }.to_owned()),
    ];
    let mut set = |key: &str, value: String| {
        if let Some(slot) = vars.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        }
    };
    match (peer, tls) {
        (_, Tls::None) => {}
        (Peer::Haproxy, Tls::Terminate(pki)) => {
            let p = pki.dir().display();
            set(
                "bind_tls",
                format!(
                    " ssl crt {p}/server.pem ca-file {p}/ca.crt verify required ssl-min-ver TLSv1.3{}",
                    if h2 { " alpn h2" } else { "" }
                ),
            );
        }
        (Peer::Haproxy, Tls::Originate(pki)) => {
            let p = pki.dir().display();
            let name = pki.dns_name("server");
            set(
                "server_tls",
                format!(
                    " ssl crt {p}/client.pem ca-file {p}/ca.crt verify required verifyhost {name} sni str({name}) ssl-min-ver TLSv1.3{}",
                    if h2 { " alpn h2" } else { "" }
                ),
            );
        }
        (Peer::Nginx, Tls::Terminate(pki)) => {
            let p = pki.dir().display();
            set("listen_tls", " ssl".to_owned());
            set(
                "server_tls",
                format!(
                    "ssl_certificate {p}/server.crt; ssl_certificate_key {p}/server.key; ssl_client_certificate {p}/ca.crt; ssl_verify_client on; ssl_protocols TLSv1.3;"
                ),
            );
        }
        (Peer::Nginx, Tls::Originate(pki)) => {
            let p = pki.dir().display();
            let name = pki.dns_name("server");
            let on = if proxied_as == Protocol::Tcp {
                "proxy_ssl on; "
            } else {
                ""
            };
            // HTTP/2 upstreams are nginx's grpc module, whose TLS directives are its own.
            let directive = if h2 { "grpc" } else { "proxy" };
            set("scheme", if h2 { "grpcs" } else { "https" }.to_owned());
            set(
                "proxy_tls",
                format!(
                    "{on}{directive}_ssl_certificate {p}/client.crt; {directive}_ssl_certificate_key {p}/client.key; {directive}_ssl_trusted_certificate {p}/ca.crt; {directive}_ssl_verify on; {directive}_ssl_name {name}; {directive}_ssl_server_name on; {directive}_ssl_protocols TLSv1.3; {directive}_ssl_session_reuse on;"
                ),
            );
        }
    }
    let mut command = match peer {
        Peer::Haproxy => {
            let config = dir.join("haproxy.cfg");
            std::fs::write(&config, fill(include_str!("../peers/haproxy.cfg"), &vars))?;
            let mut c = Command::new(&programs.haproxy);
            c.args(["-f", &config.display().to_string(), "-db"]);
            c
        }
        Peer::Nginx => {
            let template = match proxied_as {
                Protocol::Http => include_str!("../peers/nginx-http.conf"),
                // `proxied_as` carries gRPC as HTTP/2.
                Protocol::Http2 | Protocol::Grpc => include_str!("../peers/nginx-http2.conf"),
                Protocol::Tcp => include_str!("../peers/nginx-tcp.conf"),
            };
            let config = dir.join("nginx.conf");
            std::fs::write(&config, fill(template, &vars))?;
            let mut c = Command::new(&programs.nginx);
            c.args([
                "-p",
                &dir.display().to_string(),
                "-c",
                &config.display().to_string(),
            ])
            .args(["-e", &dir.join("error.log").display().to_string()]);
            c
        }
    };
    let what = format!("{peer:?}").to_lowercase();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what} ({:?})", command.get_program()))?;
    wait_listening(listen, &mut child, &what)?;
    Ok(child)
}

/// An mTLS pair of HAProxy or nginx processes: client → outbound → mTLS → inbound → upstream.
fn start_peer_pair(
    kind: TargetKind,
    scenario: &Scenario,
    upstream: SocketAddr,
    programs: &Programs,
    scratch: &Path,
) -> anyhow::Result<Target> {
    let peer = if kind == TargetKind::HaproxyMtls {
        Peer::Haproxy
    } else {
        Peer::Nginx
    };
    let dir = scratch.join(kind.name());
    let pki =
        crate::pki::Pki::generate(&dir.join("pki"), "tern-load.local", &["client", "server"])?;
    let (listen, inbound) = (free_port()?, free_port()?);
    let inner = start_peer(
        peer,
        scenario,
        inbound,
        upstream,
        &dir.join("inbound"),
        Tls::Terminate(&pki),
        programs,
    )?;
    let mut processes = vec![inner];
    processes.push(start_peer(
        peer,
        scenario,
        listen,
        inbound,
        &dir.join("outbound"),
        Tls::Originate(&pki),
        programs,
    )?);
    Ok(Target {
        kind,
        addr: listen,
        processes,
        helpers: Vec::new(),
        _dir: Some(ScratchDir(dir)),
    })
}

/// Starts a `tern-proxy` with `config` and waits until it listens on `listen`.
fn start_tern(
    programs: &Programs,
    config: &Path,
    listen: SocketAddr,
    what: &str,
) -> anyhow::Result<Child> {
    let mut child = Command::new(&programs.tern_proxy)
        .args([
            "--config",
            &config.display().to_string(),
            "--admin",
            "127.0.0.1:0",
            "--workers",
            "1",
        ])
        .args(["--log", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what} ({})", programs.tern_proxy.display()))?;
    wait_listening(listen, &mut child, what)?;
    Ok(child)
}

/// The sidecar pair: client → outbound tern-proxy → mTLS → inbound tern-proxy → upstream,
/// each proxy certified by a `tern-control` CA started for the run (keys generated in the
/// proxies, bootstrap tokens from `tern-control token`).
fn start_mtls_pair(
    scenario: &Scenario,
    upstream: SocketAddr,
    programs: &Programs,
    scratch: &Path,
) -> anyhow::Result<Target> {
    const TRUST_DOMAIN: &str = "tern-load.local";
    let dir = scratch.join("tern-mtls");
    let state = dir.join("ca");
    std::fs::create_dir_all(&dir)?;
    let ca_address = free_port()?;
    let state_arg = state.display().to_string();
    let ca_args = ["--state-dir", &state_arg, "--trust-domain", TRUST_DOMAIN];
    let mut control = Command::new(&programs.tern_control)
        .args([
            "serve",
            "--listen",
            &ca_address.to_string(),
            "--admin",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .args(ca_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting tern-control ({})",
                programs.tern_control.display()
            )
        })?;
    wait_listening(ca_address, &mut control, "tern-control")?;
    let identity = |name: &str| -> anyhow::Result<String> {
        let id = format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{name}");
        let token = Command::new(&programs.tern_control)
            .args(["token", &id, "--log", "warn"])
            .args(ca_args)
            .output()
            .context("running tern-control token")?;
        if !token.status.success() {
            bail!(
                "tern-control token: {}",
                String::from_utf8_lossy(&token.stderr).trim()
            );
        }
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, &token.stdout)?;
        Ok(format!(
            "identity:\n  ca:\n    address: {ca_address}\n    root: {}\n    spiffe_id: \"{id}\"\n    token_file: {}\n",
            state.join("ca.crt").display(),
            token_file.display()
        ))
    };
    let (listen, inbound) = (free_port()?, free_port()?);
    let protocol = scenario.protocol.proxied_as().name();
    let listener = |name: &str, address: SocketAddr, to: &str, tls: &str| {
        format!(
            "  - {}\n",
            tern_listener(scenario.protocol, name, address, to, tls)
        )
    };
    let inbound_config = dir.join("inbound.yaml");
    std::fs::write(
        &inbound_config,
        format!(
            "{}listeners:\n{}clusters:\n  - {{ name: app, endpoints: [{upstream}] }}\n",
            identity("server")?,
            listener("inbound", inbound, "app", ", tls: { mode: strict }"),
        ),
    )?;
    let outbound_config = dir.join("outbound.yaml");
    std::fs::write(
        &outbound_config,
        format!(
            "{}listeners:\n{}clusters:\n  - {{ name: server, endpoints: [{inbound}], tls: {{ identity: \"spiffe://{TRUST_DOMAIN}/ns/default/sa/server\" }} }}\n",
            identity("client")?,
            listener("outbound", listen, "server", ""),
        ),
    )?;
    // Each proxy binds its listener once its certificate has arrived.
    let inbound_proxy = start_tern(
        programs,
        &inbound_config,
        inbound,
        &format!("inbound sidecar ({protocol})"),
    )?;
    let mut processes = vec![inbound_proxy];
    processes.push(start_tern(
        programs,
        &outbound_config,
        listen,
        "outbound sidecar",
    )?);
    Ok(Target {
        kind: TargetKind::TernMtls,
        addr: listen,
        processes,
        helpers: vec![control],
        _dir: Some(ScratchDir(dir)),
    })
}

/// A Tern listener (YAML flow mapping) named `name` on `address`, sending to cluster `to`,
/// with `tls` appended (`, tls: {…}` or empty): an `http` listener for HTTP (it takes
/// HTTP/1.1 and HTTP/2, told by the preface, and speaks the same version upstream), `tcp`
/// for TCP.
fn tern_listener(
    protocol: Protocol,
    name: &str,
    address: SocketAddr,
    to: &str,
    tls: &str,
) -> String {
    let mode = protocol.proxy_mode();
    // An L4 listener names its cluster; an L7 one routes every request to it.
    let target = if protocol.proxied_as() == Protocol::Tcp {
        format!("cluster: {to}")
    } else {
        format!("routes: [{{ cluster: {to} }}]")
    };
    format!("{{ name: {name}, address: {address}, protocol: {mode}, {target}{tls} }}")
}

/// CPU seconds and resident memory of a process and its children (nginx's worker).
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_seconds: f64,
    rss_bytes: u64,
}

fn process_usage(pid: u32) -> Usage {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(other) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if stat_fields(other).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
                == Some(pid)
            {
                pids.push(other);
            }
        }
    }
    let mut usage = Usage::default();
    for p in pids {
        if let Some(fields) = stat_fields(p) {
            // After the command: state ppid ... utime is field 14, stime 15 (1-based), i.e.
            // indices 11 and 12 here.
            let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            usage.cpu_seconds += (utime + stime) / ticks;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            let kb = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            usage.rss_bytes += kb * 1024;
        }
    }
    usage
}

/// `/proc/<pid>/stat` fields after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = text.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// The measurements of one target at one point, over all rounds.
#[derive(Debug, Clone)]
struct Measured {
    outcome: Outcome,
    /// Each round's latency alone, in round order.
    rounds: Vec<Summary>,
    cpu_seconds: f64,
    measured_seconds: f64,
    rss_idle: u64,
    rss_peak: u64,
}

/// One target's result at one point, as written to JSON.
#[derive(Debug, Serialize)]
pub struct TargetResult {
    /// Target name.
    pub target: String,
    /// Connections.
    pub connections: usize,
    /// Latency summary, µs.
    pub latency_us: Summary,
    /// Added over direct at each percentile, µs.
    pub added_us: BTreeMap<String, i64>,
    /// Added over the same round's direct, round by round, at each percentile, µs (empty
    /// for direct, or with no direct target).
    pub added_us_by_round: Vec<BTreeMap<String, i64>>,
    /// Achieved rate (mean over rounds).
    pub achieved_rate: f64,
    /// Failed requests by kind.
    pub errors: BTreeMap<String, u64>,
    /// Proxy CPU per 1000 requests per second, in vCPUs.
    pub vcpu_per_1000_rps: Option<f64>,
    /// Proxy RSS before load, MB.
    pub rss_idle_mb: Option<f64>,
    /// Proxy RSS under load (peak of samples), MB.
    pub rss_load_mb: Option<f64>,
}

/// The whole comparison, as written to JSON.
#[derive(Debug, Serialize)]
pub struct Comparison {
    /// The scenario that ran.
    pub scenario: Scenario,
    /// Targets that were skipped, and why.
    pub skipped: BTreeMap<String, String>,
    /// Results, by point then target.
    pub results: Vec<TargetResult>,
    /// Highest passing rate per target, when a sweep ran.
    pub saturation: BTreeMap<String, f64>,
}

/// Raises the rate until each target fails; returns the highest passing rate per target.
fn sweep(
    sweep: &Saturation,
    scenario: &Scenario,
    targets: &[Target],
    workload: &Workload,
    text: &mut String,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut passed: BTreeMap<String, f64> = BTreeMap::new();
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let limit = u64::try_from(sweep.p99_under.as_micros()).unwrap_or(u64::MAX);
    let mut rate = sweep.from;
    while rate <= sweep.up_to && failed.len() < targets.len() {
        let still: Vec<&Target> = targets
            .iter()
            .filter(|t| !failed.contains_key(t.kind.name()))
            .collect();
        for target in still {
            eprintln!("saturation: {} at {rate:.0}/s", target.kind.name());
            let plan = Plan {
                target: target.addr,
                workload: workload.clone(),
                rate,
                connections: sweep.connections,
                threads: scenario.generator_threads,
                duration: sweep.duration,
                warmup: Duration::from_millis(500),
                timeout: Duration::from_secs(5),
            };
            // A step passes if either of two tries passes: one noisy stall on a shared machine
            // should not end a target's sweep.
            let mut verdict = Err(String::new());
            for _ in 0..2 {
                let outcome = generator::run(&plan, &Progress::default())?;
                let p99 = outcome.latency.value_at_percentile(99.0);
                let kept = outcome.achieved_rate() >= rate * (1.0 - report::RATE_TOLERANCE);
                if kept && p99 < limit && outcome.error_count() == 0 {
                    verdict = Ok(());
                    break;
                }
                verdict = Err(format!(
                    "at {rate:.0}/s (twice): p99 {p99} µs, achieved {:.0}/s, {} errors",
                    outcome.achieved_rate(),
                    outcome.error_count()
                ));
            }
            match verdict {
                Ok(()) => {
                    passed.insert(target.kind.name().to_owned(), rate);
                }
                Err(why) => {
                    failed.insert(target.kind.name().to_owned(), why);
                }
            }
        }
        rate += sweep.step;
    }
    let _ = writeln!(
        text,
        "\nsaturation: highest rate with p99 under {:?} ({} connections, {:?} per step, one proxy worker/thread)",
        sweep.p99_under, sweep.connections, sweep.duration
    );
    for target in targets {
        let name = target.kind.name();
        let best = passed.get(name).copied().unwrap_or(0.0);
        let why = failed.get(name).map_or_else(
            || format!("still passing at {:.0}/s", sweep.up_to),
            |w| format!("failed {w}"),
        );
        let _ = writeln!(text, "{name:<12} {best:>9.0}/s   {why}");
    }
    Ok(passed)
}

/// Runs a scenario; prints the report; writes files into `out`.
pub fn run(scenario: &Scenario, programs: &Programs, out: &Path) -> anyhow::Result<Comparison> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let upstream = serve::start(serve::Spec {
        addr: "127.0.0.1:0".parse()?,
        protocol: scenario.protocol,
        request_size: scenario.request_size.max(1),
        response_size: scenario.response_size,
        delay: Duration::ZERO,
        stall: None,
        threads: 1,
    })?;
    let scratch =
        ScratchDir(std::env::temp_dir().join(format!("tern-compare-{}", std::process::id())));
    let mut targets = Vec::new();
    let mut skipped = BTreeMap::new();
    for &kind in &scenario.targets {
        match start_target(kind, scenario, upstream.addr, programs, &scratch.0) {
            Ok(target) => targets.push(target),
            Err(error) => {
                eprintln!("skipping {}: {error:#}", kind.name());
                skipped.insert(kind.name().to_owned(), format!("{error:#}"));
            }
        }
    }
    if targets.is_empty() {
        bail!("no target could be started");
    }
    let mut workload = match scenario.protocol {
        Protocol::Http => Workload::http("tern-load", "/", scenario.request_size),
        Protocol::Tcp => Workload::tcp(scenario.request_size.max(1), scenario.response_size),
        Protocol::Http2 => Workload::http2("tern-load", "/", scenario.request_size),
        Protocol::Grpc => Workload::grpc(
            "tern-load",
            crate::h2::GRPC_ECHO_PATH,
            scenario.request_size,
        ),
    };
    if scenario.reconnect {
        workload = workload.reconnecting();
    }
    let mut measured: BTreeMap<(usize, TargetKind), Measured> = BTreeMap::new();
    for target in &targets {
        let rss_idle = target.usage().map_or(0, |u| u.rss_bytes);
        for &connections in &scenario.connections {
            measured.insert(
                (connections, target.kind),
                Measured {
                    outcome: Outcome::empty(scenario.rate),
                    rounds: Vec::new(),
                    cpu_seconds: 0.0,
                    measured_seconds: 0.0,
                    rss_idle,
                    rss_peak: 0,
                },
            );
        }
    }
    let total = scenario.rounds * scenario.connections.len() * targets.len();
    let mut done = 0;
    for round in 1..=scenario.rounds {
        for &connections in &scenario.connections {
            for target in &targets {
                done += 1;
                eprintln!(
                    "[{done}/{total}] round {round}: {} at {:.0}/s, {connections} connections",
                    target.kind.name(),
                    scenario.rate
                );
                let plan = Plan {
                    target: target.addr,
                    workload: workload.clone(),
                    rate: scenario.rate,
                    connections,
                    threads: scenario.generator_threads,
                    duration: scenario.duration,
                    warmup: scenario.warmup,
                    timeout: Duration::from_secs(5),
                };
                let before = target.usage();
                let started = Instant::now();
                let outcome = generator::run(&plan, &Progress::default())?;
                let wall = started.elapsed().as_secs_f64();
                let after = target.usage();
                let m = measured
                    .get_mut(&(connections, target.kind))
                    .context("measurement slot")?;
                if let (Some(before), Some(after)) = (before, after) {
                    m.cpu_seconds += after.cpu_seconds - before.cpu_seconds;
                    m.rss_peak = m.rss_peak.max(after.rss_bytes);
                }
                m.measured_seconds += wall;
                m.rounds.push(Summary::of(&outcome.latency));
                m.outcome.merge(outcome);
            }
        }
    }

    let mut results = Vec::new();
    let mut text = String::new();
    for &connections in &scenario.connections {
        let direct_measured = measured.get(&(connections, TargetKind::Direct));
        let direct = direct_measured.map(|m| Summary::of(&m.outcome.latency));
        let direct_rounds = direct_measured.map(|m| &m.rounds);
        let _ = writeln!(
            text,
            "\n{} at {:.0}/s, {connections} connections, {} B responses; {} rounds of {:?} per target, interleaved",
            scenario.protocol.name(),
            scenario.rate,
            scenario.response_size,
            scenario.rounds,
            scenario.duration
        );
        let _ = writeln!(text, "{}{:>11}  errors", report::header_row(), "rate/s");
        let mut rows = Vec::new();
        for target in &targets {
            let Some(m) = measured.get(&(connections, target.kind)) else {
                continue;
            };
            let summary = Summary::of(&m.outcome.latency);
            let achieved = m.outcome.achieved_rate();
            let _ = writeln!(
                text,
                "{}{:>11.1}  {}",
                report::summary_row(target.kind.name(), &summary),
                achieved,
                report::errors_text(&m.outcome.errors)
            );
            let (added, added_by_round) = match (&direct, direct_rounds) {
                (Some(d), Some(d_rounds)) if target.kind != TargetKind::Direct => (
                    added_over(&summary, d),
                    m.rounds
                        .iter()
                        .zip(d_rounds)
                        .map(|(round, d_round)| added_over(round, d_round))
                        .collect(),
                ),
                _ => (BTreeMap::new(), Vec::new()),
            };
            let busy_seconds = m.measured_seconds;
            let vcpu = (!target.processes.is_empty() && busy_seconds > 0.0)
                .then(|| m.cpu_seconds / busy_seconds / (scenario.rate / 1000.0));
            let proxy = !target.processes.is_empty();
            rows.push(TargetResult {
                target: target.kind.name().to_owned(),
                connections,
                latency_us: summary,
                added_us: added,
                added_us_by_round: added_by_round,
                achieved_rate: achieved,
                errors: m.outcome.errors.clone(),
                vcpu_per_1000_rps: vcpu,
                rss_idle_mb: proxy.then(|| m.rss_idle as f64 / 1e6),
                rss_load_mb: proxy.then(|| m.rss_peak as f64 / 1e6),
            });
        }
        if direct.is_some() {
            let mut header = format!("\n{:<22}", "added over direct (µs)");
            for (_, name) in PERCENTILES {
                let _ = write!(header, "{name:>9}");
            }
            let _ = writeln!(text, "{header}");
            for row in rows.iter().filter(|r| !r.added_us.is_empty()) {
                let mut line = format!("{:<22}", row.target);
                for (_, name) in PERCENTILES {
                    let _ = write!(line, "{:>9}", row.added_us.get(name).copied().unwrap_or(0));
                }
                let _ = writeln!(text, "{line}");
            }
            let pairs = like_for_like(&rows);
            for (tern, peer) in &pairs {
                let mut line = format!("{:<22}", format!("{} / {}", tern.target, peer.target));
                for (_, name) in PERCENTILES {
                    let ratio = ratio(
                        tern.added_us.get(name).copied().unwrap_or(0),
                        peer.added_us.get(name).copied().unwrap_or(0),
                    );
                    let _ = write!(line, "{:>9}", ratio_text(ratio));
                }
                let _ = writeln!(text, "{line}");
            }
            if scenario.rounds > 1 && !pairs.is_empty() {
                let _ = write!(
                    text,
                    "\nratio by round (added over that round's direct){}",
                    " ".repeat(4)
                );
                for round in 1..=scenario.rounds {
                    let _ = write!(text, "{:>9}", format!("round {round}"));
                }
                let _ = writeln!(text, "{:>9}", "median");
                for (tern, peer) in &pairs {
                    for name in ["p50", "p90", "p99"] {
                        let by_round = ratios_by_round(tern, peer, name);
                        let mut line = format!(
                            "{:<52}",
                            format!("{} / {} {name}", tern.target, peer.target)
                        );
                        for ratio in &by_round {
                            let _ = write!(line, "{:>9}", ratio_text(*ratio));
                        }
                        let _ = writeln!(line, "{:>9}", ratio_text(median(&by_round)));
                        text.push_str(&line);
                    }
                }
            }
        }
        if scenario.response_size >= BULK_BYTES {
            // Bulk: each response is one long transfer; its median time gives the throughput.
            let direct_mbps = rows
                .iter()
                .find(|r| r.target == "direct")
                .map(|r| bulk_mbps(scenario, &r.latency_us));
            let _ = writeln!(
                text,
                "\nbulk ({} MB per response)   MB/s at p50   vs direct",
                scenario.response_size >> 20
            );
            for row in &rows {
                let mbps = bulk_mbps(scenario, &row.latency_us);
                let share = direct_mbps
                    .filter(|d| *d > 0.0)
                    .map_or_else(|| "-".to_owned(), |d| format!("{:.0}%", mbps / d * 100.0));
                let _ = writeln!(text, "{:<28} {mbps:>11.0} {share:>11}", row.target);
            }
        }
        let _ = writeln!(
            text,
            "\nresources          vCPU/1000rps  RSS idle MB  RSS load MB{}",
            if scenario.response_size >= BULK_BYTES {
                "   (vCPU/1000rps: not meaningful for bulk)"
            } else {
                ""
            }
        );
        for row in rows.iter().filter(|r| r.vcpu_per_1000_rps.is_some()) {
            let _ = writeln!(
                text,
                "{:<18} {:>12.3} {:>12.1} {:>12.1}",
                row.target,
                row.vcpu_per_1000_rps.unwrap_or(0.0),
                row.rss_idle_mb.unwrap_or(0.0),
                row.rss_load_mb.unwrap_or(0.0)
            );
        }

        // Files for this point.
        let mut series: Vec<(String, &Histogram<u64>)> = Vec::new();
        for target in &targets {
            if let Some(m) = measured.get(&(connections, target.kind)) {
                let path = out.join(format!("{}-c{connections}.hgrm", target.kind.name()));
                std::fs::write(&path, report::hgrm(&m.outcome.latency))?;
                series.push((target.kind.name().to_owned(), &m.outcome.latency));
            }
        }
        let chart = out.join(format!("latency-c{connections}.svg"));
        report::chart(
            &chart,
            &format!(
                "{} {:.0}/s, {connections} connections",
                scenario.protocol.name(),
                scenario.rate
            ),
            &series,
        )?;
        results.extend(rows);
    }
    let saturation = match &scenario.saturation {
        Some(s) => sweep(s, scenario, &targets, &workload, &mut text)?,
        None => BTreeMap::new(),
    };
    for (name, why) in &skipped {
        let _ = writeln!(text, "skipped {name}: {why}");
    }
    let _ = writeln!(
        text,
        "\nfiles: {}/ (*.hgrm, latency-*.svg, report.json)",
        out.display()
    );
    print!("{text}");
    let comparison = Comparison {
        scenario: scenario.clone(),
        skipped,
        results,
        saturation,
    };
    std::fs::write(
        out.join("report.json"),
        serde_json::to_vec_pretty(&comparison)?,
    )?;
    std::fs::write(out.join("report.txt"), text)?;
    Ok(comparison)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(target: &str, p50_by_round: &[i64]) -> TargetResult {
        TargetResult {
            target: target.to_owned(),
            connections: 1,
            latency_us: Summary::of(&Histogram::new(3).unwrap()),
            added_us: BTreeMap::new(),
            added_us_by_round: p50_by_round
                .iter()
                .map(|&p50| BTreeMap::from([("p50".to_owned(), p50)]))
                .collect(),
            achieved_rate: 0.0,
            errors: BTreeMap::new(),
            vcpu_per_1000_rps: None,
            rss_idle_mb: None,
            rss_load_mb: None,
        }
    }

    #[test]
    fn each_round_is_compared_with_the_same_round_of_the_peer() {
        let tern = result("tern-mtls", &[100, 300, 50]);
        let peer = result("haproxy-mtls", &[200, 0, 100]);
        // A round where the peer added nothing has no ratio, and the median skips it.
        let by_round = ratios_by_round(&tern, &peer, "p50");
        assert_eq!(by_round, [Some(0.5), None, Some(0.5)]);
        assert_eq!(median(&by_round), Some(0.5));
        assert_eq!(ratios_by_round(&tern, &peer, "p99"), [None, None, None]);
    }

    #[test]
    fn the_median_takes_the_middle_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[Some(3.0), Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(
            median(&[Some(4.0), None, Some(1.0), Some(2.0), Some(3.0)]),
            Some(2.5)
        );
        assert_eq!(median(&[None, None]), None);
    }

    #[test]
    fn tern_is_paired_like_for_like() {
        let rows = [
            result("direct", &[]),
            result("tern", &[]),
            result("tern-mtls", &[]),
            result("haproxy", &[]),
            result("haproxy-mtls", &[]),
            result("nginx-mtls", &[]),
        ];
        let pairs: Vec<(&str, &str)> = like_for_like(&rows)
            .into_iter()
            .map(|(t, p)| (t.target.as_str(), p.target.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("tern", "haproxy"),
                ("tern-mtls", "haproxy-mtls"),
                ("tern-mtls", "nginx-mtls")
            ]
        );
    }
}
