//! `ternctl demo`: a whole mesh on this machine, measured, then taken down.
//!
//! It starts `tern-control` (the CA and config from a manifest directory it writes), a
//! server workload (`tern-load serve`) and a client, each with a `tern-proxy` sidecar
//! configured by the control plane, and runs `tern-load` through the mesh and straight to the
//! server, interleaved, in the same run, then prints the latency each path shows and what the
//! mesh adds.
//!
//! Where the machine allows (root, `ip`, `nft`), the workloads are pods: network namespaces
//! on a bridge, with `tern-proxy init` intercepting their traffic, so the client dials the
//! server's Service address and knows nothing of the mesh. Elsewhere they share loopback, and
//! the client dials its sidecar's explicit outbound listener. Everything started is stopped,
//! and every namespace removed, when the demo ends, fails, or is interrupted (Ctrl-C).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// What the demo measures.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Requests per second, over all connections.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Connections (each with one request outstanding).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Measured duration per path and round.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rounds; each measures both paths, one after the other.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Response body bytes.
    #[arg(long, default_value_t = 1024)]
    response_size: usize,
    /// Where reports, logs and the generated manifests go.
    #[arg(long, default_value = "target/tern-demo")]
    out: PathBuf,
    /// Use loopback even where network namespaces are available.
    #[arg(long)]
    loopback: bool,
}

/// The demo stopped on SIGINT or SIGTERM (after taking everything down).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// The mesh's trust domain and the workloads' namespace.
const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "demo";
/// The node's bridge address, where `tern-control` listens in pod mode.
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The server Service's cluster IP in pod mode.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// The application's port, and a second one left out of interception (the direct path).
const APP_PORT: u16 = 8080;
const DIRECT_PORT: u16 = 9080;
/// With `--loopback`, the server workload's address.
const LOOPBACK_SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 20, 1);
/// With `--loopback`, the client workload's address.
const LOOPBACK_CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 20, 2);

/// The binaries the demo runs, found beside `ternctl`.
struct Binaries {
    control: PathBuf,
    proxy: PathBuf,
    load: PathBuf,
}

impl Binaries {
    fn beside_me() -> anyhow::Result<Binaries> {
        let me = std::env::current_exe().context("finding ternctl's own path")?;
        let dir = me.parent().context("ternctl's folder")?;
        let find = |name: &str| {
            let path = dir.join(name);
            if path.exists() {
                Ok(path)
            } else {
                bail!(
                    "{} is missing: build the workspace (`cargo build --release`) so {name} sits beside ternctl",
                    path.display()
                )
            }
        };
        Ok(Binaries {
            control: find("tern-control")?,
            proxy: find("tern-proxy")?,
            load: find("tern-load")?,
        })
    }
}

/// A path load is sent along: from inside `netns` (or here) to `target`.
struct LoadPath {
    name: &'static str,
    netns: Option<String>,
    target: SocketAddr,
}

/// Everything the demo started; dropping it stops and removes it all.
struct Mesh {
    out: PathBuf,
    stop: Arc<AtomicBool>,
    children: Vec<(String, Child)>,
    namespaces: Vec<String>,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let binaries = Binaries::beside_me()?;
    let stop = interrupt_flag()?;
    let out = args.out.clone();
    if out.join("manifests").exists() {
        std::fs::remove_dir_all(out.join("manifests")).context("clearing old manifests")?;
    }
    if out.join("state").exists() {
        std::fs::remove_dir_all(out.join("state")).context("clearing old CA state")?;
    }
    for dir in ["manifests", "state", "logs", "reports"] {
        std::fs::create_dir_all(out.join(dir))
            .with_context(|| format!("creating {}", out.join(dir).display()))?;
    }
    let mut mesh = Mesh {
        out: out.clone(),
        stop,
        children: Vec::new(),
        namespaces: Vec::new(),
    };
    let pods = match (args.loopback, pods_unavailable()) {
        (false, None) => true,
        (true, _) => false,
        (false, Some(why)) => {
            println!("network namespaces unavailable ({why}): the workloads share loopback");
            false
        }
    };
    let paths = if pods {
        mesh.start_pods(&binaries, args)?
    } else {
        mesh.start_loopback(&binaries, args)?
    };

    println!(
        "load: HTTP/1.1, {} rps over {} connections, {} responses, {:?} per path and round, {} rounds",
        args.rate, args.connections, args.response_size, args.duration, args.rounds
    );
    let mut results: Vec<(&'static str, u32, Measured)> = Vec::new();
    for round in 1..=args.rounds {
        for path in &paths {
            let measured = mesh.load(&binaries, args, path, round)?;
            println!(
                "  round {round} {:<7} p50 {:>7} p99 {:>7} p99.9 {:>7}  ({:.0} rps)",
                path.name,
                micros(measured.p50),
                micros(measured.p99),
                micros(measured.p999),
                measured.rate
            );
            results.push((path.name, round, measured));
        }
    }
    print_report(&results, &out);
    Ok(())
}

/// One `tern-load run`'s figures (µs).
#[derive(Debug, Clone, Copy)]
struct Measured {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    rate: f64,
    errors: u64,
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn print_report(results: &[(&'static str, u32, Measured)], out: &Path) {
    let merged = |name: &str| {
        let runs: Vec<&Measured> = results
            .iter()
            .filter(|(n, _, _)| *n == name)
            .map(|(_, _, m)| m)
            .collect();
        // The median round, per percentile: one noisy round does not decide.
        let median = |f: &dyn Fn(&Measured) -> u64| {
            let mut values: Vec<u64> = runs.iter().map(|m| f(m)).collect();
            values.sort_unstable();
            values.get(values.len() / 2).copied().unwrap_or(0)
        };
        Measured {
            p50: median(&|m| m.p50),
            p90: median(&|m| m.p90),
            p99: median(&|m| m.p99),
            p999: median(&|m| m.p999),
            max: median(&|m| m.max),
            rate: runs.iter().map(|m| m.rate).sum::<f64>() / runs.len().max(1) as f64,
            errors: runs.iter().map(|m| m.errors).sum(),
        }
    };
    let direct = merged("direct");
    let meshed = merged("meshed");
    println!(
        "\nlatency from the intended send time (coordinated omission corrected), median of rounds:"
    );
    println!(
        "{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "path", "p50", "p90", "p99", "p99.9", "max", "rps", "errors"
    );
    for (name, m) in [("direct", direct), ("meshed", meshed)] {
        println!(
            "{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.0} {:>7}",
            name,
            micros(m.p50),
            micros(m.p90),
            micros(m.p99),
            micros(m.p999),
            micros(m.max),
            m.rate,
            m.errors
        );
    }
    let added = |a: u64, b: u64| {
        if a >= b {
            format!("+{}", micros(a - b))
        } else {
            format!("-{}", micros(b - a))
        }
    };
    println!(
        "{:<8} {:>9} {:>9} {:>9} {:>9}",
        "added",
        added(meshed.p50, direct.p50),
        added(meshed.p90, direct.p90),
        added(meshed.p99, direct.p99),
        added(meshed.p999, direct.p999),
    );
    println!(
        "\nmeshed: client → its sidecar → mTLS → the server's sidecar → server; direct: client → server.\nReports (JSON), HDR percentile distributions (.hgrm) and charts (.svg) per path and round: {}\nLogs: {}",
        out.join("reports").display(),
        out.join("logs").display()
    );
}

/// A flag set on SIGINT or SIGTERM, so the demo stops between steps and tears down.
fn interrupt_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal thread")?;
    // Install the handlers before returning, so an early Ctrl-C is caught too.
    let (mut interrupt, mut terminate) = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        });
        set.store(true, Ordering::SeqCst);
        eprintln!("interrupted: stopping the demo and removing what it started");
    });
    Ok(flag)
}

/// Why pods cannot be built here, if they cannot.
fn pods_unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    for (tool, flag, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
        let works = Command::new(tool)
            .arg(flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !works {
            return Some(format!("no `{tool}`; apt-get install {package}"));
        }
    }
    None
}

fn spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{name}")
}

impl Mesh {
    fn check_stop(&self) -> anyhow::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(Interrupted.into());
        }
        Ok(())
    }

    fn log(&self, label: &str) -> PathBuf {
        self.out.join("logs").join(format!("{label}.log"))
    }

    /// Starts `program` (inside `netns`, if given), logging to `logs/<label>.log`.
    fn spawn(
        &mut self,
        label: &str,
        netns: Option<&str>,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<()> {
        self.check_stop()?;
        let log = std::fs::File::create(self.log(label))
            .with_context(|| format!("creating {}", self.log(label).display()))?;
        let mut command = in_netns(netns, program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        self.children.push((label.to_owned(), child));
        Ok(())
    }

    /// Runs `program` to completion (inside `netns`); returns its standard output.
    fn exec(&self, netns: Option<&str>, program: &Path, args: &[&str]) -> anyhow::Result<String> {
        self.check_stop()?;
        let output = in_netns(netns, program)
            .args(args)
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !output.status.success() {
            bail!(
                "{} {} failed: {}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Waits for `check` to hold, for up to `within`.
    fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        mut check: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.check_stop()?;
            if check() {
                return Ok(());
            }
            for (label, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "{label} exited ({status}) while waiting for {what}; see {}",
                        self.out.join("logs").join(format!("{label}.log")).display()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "gave up waiting for {what}; logs: {}",
                    self.out.join("logs").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ip(&self, netns: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", netns];
        full.extend_from_slice(args);
        self.exec(None, Path::new("ip"), &full).map(drop)
    }

    /// A fresh network namespace, removed when the demo ends.
    fn netns(&mut self, name: &str) -> anyhow::Result<()> {
        // A demo killed outright may have left it behind.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        self.exec(None, Path::new("ip"), &["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        self.ip(name, &["link", "set", "lo", "up"])
    }

    /// A pod namespace joined to the node's bridge at 198.18.0.`host`.
    fn pod(&mut self, node: &str, name: &str, host: u8) -> anyhow::Result<Ipv4Addr> {
        self.netns(name)?;
        let ip = Ipv4Addr::new(198, 18, 0, host);
        let peer = format!("veth{host}");
        let address = format!("{ip}/24");
        let gateway = NODE.to_string();
        for args in [
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", node,
            ][..],
            &["addr", "add", &address, "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["route", "add", "default", "via", &gateway],
        ] {
            self.ip(name, args)?;
        }
        self.ip(node, &["link", "set", &peer, "master", "br0"])?;
        self.ip(node, &["link", "set", &peer, "up"])?;
        Ok(ip)
    }

    fn start_control(
        &mut self,
        binaries: &Binaries,
        netns: Option<&str>,
        listen: SocketAddr,
        admin: SocketAddr,
    ) -> anyhow::Result<()> {
        let manifests = self.out.join("manifests").display().to_string();
        let state = self.out.join("state").display().to_string();
        self.spawn(
            "tern-control",
            netns,
            &binaries.control,
            &[
                "serve".into(),
                "--manifests".into(),
                manifests,
                "--state-dir".into(),
                state,
                "--trust-domain".into(),
                TRUST_DOMAIN.into(),
                "--listen".into(),
                listen.to_string(),
                "--admin".into(),
                admin.to_string(),
            ],
        )?;
        let ca = self.out.join("state/ca.crt");
        self.wait_for("tern-control's CA", Duration::from_secs(20), || ca.exists())
    }

    /// Starts the sidecar of workload `name` and waits until it is ready (certificate held
    /// and config from tern-control applied).
    fn start_sidecar(
        &mut self,
        binaries: &Binaries,
        netns: Option<&str>,
        name: &str,
        control: SocketAddr,
        admin: SocketAddr,
        extra: &str,
    ) -> anyhow::Result<()> {
        let state = self.out.join("state");
        let token = self.exec(
            None,
            &binaries.control,
            &[
                "token",
                &spiffe_id(name),
                "--state-dir",
                &state.display().to_string(),
                "--trust-domain",
                TRUST_DOMAIN,
            ],
        )?;
        let token_file = self.out.join(format!("{name}.token"));
        std::fs::write(&token_file, token.trim()).context("writing a token")?;
        let config = format!(
            "identity:\n  ca:\n    address: {control}\n    root: {root}\n    spiffe_id: {id}\n    token_file: {token}\ndiscovery:\n  workload: {{ namespace: {NAMESPACE}, name: {name} }}\n{extra}",
            root = state.join("ca.crt").display(),
            id = spiffe_id(name),
            token = token_file.display(),
        );
        let path = self.out.join(format!("{name}-proxy.yaml"));
        std::fs::write(&path, config).context("writing a proxy config")?;
        self.spawn(
            &format!("{name}-proxy"),
            netns,
            &binaries.proxy,
            &[
                "--config".into(),
                path.display().to_string(),
                "--admin".into(),
                admin.to_string(),
            ],
        )?;
        let netns = netns.map(str::to_owned);
        self.wait_for(
            &format!("{name}'s sidecar to be ready"),
            Duration::from_secs(30),
            || ready(netns.as_deref(), admin),
        )
    }

    /// Pods: a node bridge, `server` and `client` meshed and intercepted, `direct` not.
    fn start_pods(
        &mut self,
        binaries: &Binaries,
        args: &DemoArgs,
    ) -> anyhow::Result<Vec<LoadPath>> {
        let pid = std::process::id();
        let node = format!("tern-demo-node-{pid}");
        let (client_ns, server_ns, direct_ns) = (
            format!("tern-demo-client-{pid}"),
            format!("tern-demo-server-{pid}"),
            format!("tern-demo-direct-{pid}"),
        );
        self.netns(&node)?;
        let node_address = format!("{NODE}/24");
        for args in [
            &["link", "add", "br0", "type", "bridge"][..],
            &["addr", "add", &node_address, "dev", "br0"],
            &["link", "set", "br0", "up"],
        ] {
            self.ip(&node, args)?;
        }
        let client_ip = self.pod(&node, &client_ns, 11)?;
        let server_ip = self.pod(&node, &server_ns, 12)?;
        self.pod(&node, &direct_ns, 13)?;
        println!(
            "pods (network namespaces on a bridge): client {client_ip} and server {server_ip} meshed; Service `server` at {SERVICE_IP}:80"
        );

        std::fs::write(
            self.out.join("manifests/mesh.yaml"),
            manifests(client_ip, server_ip, true),
        )
        .context("writing the manifests")?;
        let control = SocketAddr::new(NODE.into(), 15012);
        self.start_control(
            binaries,
            Some(&node),
            control,
            SocketAddr::new(NODE.into(), 15014),
        )?;

        self.start_app(binaries, Some(&server_ns), APP_PORT, args, "server-app")?;
        self.start_app(
            binaries,
            Some(&server_ns),
            DIRECT_PORT,
            args,
            "server-direct",
        )?;
        let proxy = binaries.proxy.clone();
        self.exec(
            Some(&server_ns),
            &proxy,
            &["init", "--exclude-inbound-ports", &DIRECT_PORT.to_string()],
        )?;
        self.exec(Some(&client_ns), &proxy, &["init"])?;
        let admin: SocketAddr = "127.0.0.1:15000".parse()?;
        let extra = "interception: { mark: 1337 }\n";
        self.start_sidecar(binaries, Some(&server_ns), "server", control, admin, extra)?;
        self.start_sidecar(binaries, Some(&client_ns), "client", control, admin, extra)?;
        Ok(vec![
            LoadPath {
                name: "direct",
                netns: Some(direct_ns),
                target: SocketAddr::new(server_ip.into(), DIRECT_PORT),
            },
            LoadPath {
                name: "meshed",
                netns: Some(client_ns),
                target: SocketAddr::new(SERVICE_IP.into(), 80),
            },
        ])
    }

    /// Loopback: the workloads at [`LOOPBACK_SERVER`] and [`LOOPBACK_CLIENT`], the client's
    /// sidecar listening for the server's Service explicitly.
    fn start_loopback(
        &mut self,
        binaries: &Binaries,
        args: &DemoArgs,
    ) -> anyhow::Result<Vec<LoadPath>> {
        let server_ip = LOOPBACK_SERVER;
        let client_listen = SocketAddr::new(LOOPBACK_CLIENT.into(), 18080);
        println!(
            "loopback: server at {server_ip}, the client's sidecar listens for Service `server` on {client_listen}"
        );
        std::fs::write(
            self.out.join("manifests/mesh.yaml"),
            manifests(LOOPBACK_CLIENT, server_ip, false),
        )
        .context("writing the manifests")?;
        let control: SocketAddr = "127.0.20.100:15012".parse()?;
        self.start_control(binaries, None, control, "127.0.20.100:15014".parse()?)?;
        self.start_app(binaries, None, APP_PORT, args, "server-app")?;
        let server_admin = SocketAddr::new(LOOPBACK_SERVER.into(), 15000);
        self.start_sidecar(binaries, None, "server", control, server_admin, "")?;
        let outbound = format!(
            "  outbound: [{{ service: server.{NAMESPACE}, port: 80, listen: \"{client_listen}\" }}]\n"
        );
        // The outbound list belongs to the discovery block written last in the config.
        let client_admin = SocketAddr::new(LOOPBACK_CLIENT.into(), 15000);
        self.start_sidecar(binaries, None, "client", control, client_admin, &outbound)?;
        Ok(vec![
            LoadPath {
                name: "direct",
                netns: None,
                target: SocketAddr::new(server_ip.into(), APP_PORT),
            },
            LoadPath {
                name: "meshed",
                netns: None,
                target: client_listen,
            },
        ])
    }

    /// The server application: `tern-load serve`.
    fn start_app(
        &mut self,
        binaries: &Binaries,
        netns: Option<&str>,
        port: u16,
        args: &DemoArgs,
        label: &str,
    ) -> anyhow::Result<()> {
        let ip: IpAddr = if netns.is_some() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            LOOPBACK_SERVER.into()
        };
        let listen = SocketAddr::new(ip, port);
        self.spawn(
            label,
            netns,
            &binaries.load,
            &[
                "serve".into(),
                "--listen".into(),
                listen.to_string(),
                "--protocol".into(),
                "http".into(),
                "--response-size".into(),
                args.response_size.to_string(),
            ],
        )?;
        let netns = netns.map(str::to_owned);
        let probe = SocketAddr::new(
            if listen.ip().is_unspecified() {
                Ipv4Addr::LOCALHOST.into()
            } else {
                listen.ip()
            },
            port,
        );
        self.wait_for(
            &format!("{label} to listen"),
            Duration::from_secs(10),
            || {
                within(netns.as_deref(), || {
                    std::net::TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_ok()
                })
                .unwrap_or(false)
            },
        )
    }

    /// One `tern-load run` along `path`; its reports go under `reports/`.
    fn load(
        &mut self,
        binaries: &Binaries,
        args: &DemoArgs,
        path: &LoadPath,
        round: u32,
    ) -> anyhow::Result<Measured> {
        let base = self
            .out
            .join("reports")
            .join(format!("{}-round{round}", path.name));
        let file = |ext: &str| base.with_extension(ext).display().to_string();
        let label = format!("load-{}-round{round}", path.name);
        self.spawn(
            &label,
            path.netns.as_deref(),
            &binaries.load,
            &[
                "run".into(),
                "--target".into(),
                path.target.to_string(),
                "--protocol".into(),
                "http".into(),
                "--rate".into(),
                args.rate.to_string(),
                "--connections".into(),
                args.connections.to_string(),
                "--duration".into(),
                humantime::format_duration(args.duration).to_string(),
                "--warmup".into(),
                "1s".into(),
                "--host".into(),
                format!("server.{NAMESPACE}"),
                "--json".into(),
                file("json"),
                "--hgrm".into(),
                file("hgrm"),
                "--chart".into(),
                file("svg"),
            ],
        )?;
        let started = Instant::now();
        let limit = args.duration + Duration::from_secs(60);
        let status = loop {
            self.check_stop()?;
            let Some((_, child)) = self.children.iter_mut().find(|(l, _)| *l == label) else {
                bail!("lost track of {label}");
            };
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > limit {
                bail!("{label} did not finish in {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.children.retain(|(l, _)| *l != label);
        let Ok(report) = std::fs::read_to_string(file("json")) else {
            bail!(
                "{label} failed ({status}); see {}",
                self.log(&label).display()
            );
        };
        parse_report(&report).with_context(|| format!("reading {}", file("json")))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Sidecars drain on SIGTERM; give everything a moment, then make sure.
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A command for `program`, run inside `netns` when given (`ip netns exec`, which execs the
/// program, so the child is the program itself).
fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Runs `f` on a thread inside `netns` (or here).
fn within<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let Some(netns) = netns else {
        return Ok(f());
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{netns}"))
                    .with_context(|| format!("opening namespace {netns}"))?;
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .with_context(|| format!("entering namespace {netns}"))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread inside {netns} panicked"))?
    })
}

/// Whether the sidecar whose admin server is at `admin` (inside `netns`) answers `/ready`
/// with 200.
fn ready(netns: Option<&str>, admin: SocketAddr) -> bool {
    within(netns, || super::get(admin, "/ready").is_ok()).unwrap_or(false)
}

/// The figures of a `tern-load run --json` report.
fn parse_report(text: &str) -> anyhow::Result<Measured> {
    let report: serde_json::Value = serde_json::from_str(text)?;
    let latency = &report["latency_us"];
    let percentile = |name: &str| {
        latency["percentiles"][name]
            .as_u64()
            .with_context(|| format!("no {name} in the report"))
    };
    Ok(Measured {
        p50: percentile("p50")?,
        p90: percentile("p90")?,
        p99: percentile("p99")?,
        p999: percentile("p99.9")?,
        max: latency["max"].as_u64().unwrap_or(0),
        rate: report["achieved_rate"].as_f64().unwrap_or(0.0),
        errors: report["errors"].as_object().map_or(0, |e| {
            e.values().filter_map(serde_json::Value::as_u64).sum()
        }),
    })
}

/// The demo's manifests: the server's Service and EndpointSlice, and both Pods. In pods the
/// Service has a cluster IP and the Pods are intercepted; on loopback the server's sidecar
/// takes mTLS on an explicit port.
fn manifests(client: Ipv4Addr, server: Ipv4Addr, pods: bool) -> String {
    let (mode, cluster_ip, server_sidecar, client_sidecar) = if pods {
        (
            "pods",
            format!("  clusterIP: \"{SERVICE_IP}\"\n"),
            "tern.dev/interception: enabled".to_owned(),
            "tern.dev/interception: enabled",
        )
    } else {
        (
            "loopback: explicit sidecar ports",
            String::new(),
            format!("tern.dev/inbound-ports: \"{APP_PORT}=15080\""),
            "tern.dev/interception: disabled",
        )
    };
    format!(
        r#"# Written by `ternctl demo` ({mode}).
apiVersion: tern.dev/v1alpha1
kind: Mesh
metadata: {{ name: default }}
spec: {{ trustDomain: {TRUST_DOMAIN}, mtls: Strict }}
---
apiVersion: v1
kind: Service
metadata: {{ name: server, namespace: {NAMESPACE} }}
spec:
  selector: {{ app: server }}
{cluster_ip}  ports: [{{ name: http, port: 80, targetPort: {APP_PORT} }}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: server-1, namespace: {NAMESPACE}, labels: {{ kubernetes.io/service-name: server }} }}
addressType: IPv4
ports: [{{ name: http, port: {APP_PORT} }}]
endpoints:
  - {{ addresses: ["{server}"], targetRef: {{ kind: Pod, name: server }} }}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: {NAMESPACE}
  labels: {{ app: server }}
  annotations: {{ {server_sidecar} }}
spec: {{ serviceAccountName: server, containers: [] }}
status: {{ podIP: "{server}" }}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: {NAMESPACE}
  annotations: {{ {client_sidecar} }}
spec: {{ serviceAccountName: client, containers: [] }}
status: {{ podIP: "{client}" }}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_report_gives_its_percentiles_rate_and_errors() {
        let report = r#"{"target":"x","latency_us":{"percentiles":{"p50":50,"p90":90,"p99":99,"p99.9":999,"p99.99":1000},"max":1200},"achieved_rate":998.5,"errors":{"timeout":2,"http 5xx":1}}"#;
        let m = parse_report(report).unwrap();
        assert_eq!(
            (m.p50, m.p90, m.p99, m.p999, m.max),
            (50, 90, 99, 999, 1200)
        );
        assert_eq!(m.errors, 3);
        assert!((m.rate - 998.5).abs() < 1e-9);
        assert!(parse_report(r#"{"latency_us":{}}"#).is_err());
    }
}
