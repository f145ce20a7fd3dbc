//! `tern-proxy`: runs the sidecar from a YAML config file; SIGHUP reloads the file, SIGTERM
//! or SIGINT (or `POST /shutdown` on the admin port) drains and exits 0. `tern-proxy init`
//! installs the pod's traffic interception rules (see [`dataplane::intercept`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args as ClapArgs, Parser, Subcommand};
use dataplane::{BackendChoice, Options, Proxy};
use tokio::signal::unix::{SignalKind, signal};

/// Tern's sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "tern-proxy", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The YAML config file (listeners, routes, clusters).
    #[arg(long, short, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Admin server address (/live, /ready, /metrics, /config_dump, /shutdown).
    #[arg(long, env = "TERN_ADMIN", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Worker threads [default: the CPUs this process may use, capped by its cgroup quota].
    #[arg(long, env = "TERN_WORKERS")]
    workers: Option<usize>,
    /// IO backend. `auto` uses io_uring where the kernel and seccomp allow it, else epoll;
    /// `epoll` is the default because it measured faster per hop (docs/benchmarks.md).
    #[arg(long, env = "TERN_IO_BACKEND", value_enum, default_value_t = BackendChoice::Epoll)]
    io_backend: BackendChoice,
    /// Do not pin workers to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// The scheduler time slice each worker asks for (Linux 6.12+; older kernels ignore it)
    /// [default: the kernel's]. Shorter than the kernel's, a worker woken by traffic may
    /// preempt a busy neighbour sooner; `0` keeps the kernel's.
    #[arg(long, env = "TERN_WORKER_SLICE", value_parser = humantime::parse_duration)]
    worker_slice: Option<Duration>,
    /// How long a drain waits for in-flight requests.
    #[arg(long, env = "TERN_DRAIN_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_deadline: Duration,
    /// Write an access log here, one JSON line per HTTP request and per opaque TCP
    /// connection (`-`: standard output) [default: none].
    #[arg(long, env = "TERN_ACCESS_LOG")]
    access_log: Option<PathBuf>,
    /// Send spans of the HTTP requests that arrive with a sampled W3C `traceparent` to this
    /// OpenTelemetry collector (`host:port`, OTLP/HTTP, e.g. `otel-collector:4318`)
    /// [default: none].
    #[arg(long, env = "TERN_TRACE_COLLECTOR")]
    trace_collector: Option<String>,
    /// The `service.name` of the spans.
    #[arg(long, env = "TERN_TRACE_SERVICE_NAME", default_value = "tern-proxy")]
    trace_service_name: String,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `dataplane=debug`).
    #[arg(long, env = "TERN_LOG", default_value = "info")]
    log: String,
    /// Where to serve the application's probes (`--app-probes`), for the kubelet: a port
    /// `tern-proxy init` leaves alone (`ternctl inject` uses 15020). `[::]` falls back to
    /// `0.0.0.0` where the kernel has no IPv6.
    #[arg(long, env = "TERN_PROBE_ADDRESS")]
    probe_address: Option<SocketAddr>,
    /// The application's probes, rewritten to this proxy by `ternctl inject` (JSON: paths
    /// under /app-health/ mapped to Kubernetes probes).
    #[arg(long, env = "TERN_APP_PROBES")]
    app_probes: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Installs (or with --uninstall removes) the nftables (or iptables) rules that send this
    /// network namespace's TCP through the proxy; run it in the pod's namespace, as istio-init
    /// does.
    Init(InitArgs),
    /// Waits until the proxy at --admin is ready (certificate held, config applied) and
    /// exits 0, or exits 1 after --timeout: as a native sidecar's startup probe (or a plain
    /// sidecar's postStart hook) it holds the application's containers until then, as
    /// Istio's holdApplicationUntilProxyStarts.
    WaitReady {
        /// The proxy's admin server.
        #[arg(long, env = "TERN_ADMIN", default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// How long to wait.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Debug, ClapArgs)]
struct InitArgs {
    /// Where outbound TCP goes.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Where inbound TCP goes.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// The proxy's UID; its own connections are not intercepted.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// A socket mark whose connections are not intercepted.
    #[arg(long, default_value_t = 1337)]
    proxy_mark: u32,
    /// Outbound destinations to intercept (comma-separated CIDRs); all by default.
    #[arg(long, value_delimiter = ',')]
    include_outbound_cidrs: Vec<ipnet::IpNet>,
    /// Outbound destinations to leave alone (comma-separated CIDRs).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<ipnet::IpNet>,
    /// Outbound destination ports to leave alone.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Inbound ports to intercept; all by default.
    #[arg(long, value_delimiter = ',')]
    include_inbound_ports: Vec<u16>,
    /// Inbound ports to leave alone (e.g. a health port).
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// nftables (preferred), iptables, or auto: nftables when `nft` runs here.
    #[arg(long, value_enum, default_value_t = dataplane::intercept::Firewall::Auto)]
    firewall: dataplane::intercept::Firewall,
    /// Print the rules instead of applying them.
    #[arg(long)]
    dry_run: bool,
    /// Remove the rules.
    #[arg(long)]
    uninstall: bool,
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    use dataplane::intercept::{self, Family, Firewall, Interception};
    // `meta mark 0 return` would match every unmarked packet and intercept nothing.
    anyhow::ensure!(args.proxy_mark != 0, "--proxy-mark must not be 0");
    let interception = Interception {
        outbound_port: args.outbound_port,
        inbound_port: args.inbound_port,
        proxy_uid: args.proxy_uid,
        proxy_mark: args.proxy_mark,
        include_outbound_cidrs: args.include_outbound_cidrs,
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
        exclude_outbound_ports: args.exclude_outbound_ports,
        include_inbound_ports: args.include_inbound_ports,
        exclude_inbound_ports: args.exclude_inbound_ports,
    };
    let firewall = args.firewall.resolve();
    match (firewall, args.dry_run, args.uninstall) {
        (Firewall::Iptables, true, _) => {
            for family in [Family::V4, Family::V6] {
                println!("# {family:?}: iptables-restore --noflush");
                print!("{}", interception.iptables_rules(family));
            }
        }
        (Firewall::Iptables, false, false) => intercept::apply_iptables(&interception)?,
        (Firewall::Iptables, false, true) => intercept::uninstall_iptables()?,
        (_, dry_run, uninstall) => {
            let ruleset = if uninstall {
                intercept::uninstall_ruleset()
            } else {
                interception.ruleset()
            };
            if dry_run {
                print!("{ruleset}");
                return Ok(());
            }
            intercept::apply(&ruleset)?;
        }
    }
    if !args.dry_run {
        tracing::info!(
            ?firewall,
            uninstall = args.uninstall,
            "interception rules applied"
        );
    }
    Ok(())
}

/// Polls `GET /ready` on the admin server until it answers 200, for up to `timeout`.
fn wait_ready(admin: std::net::SocketAddr, timeout: std::time::Duration) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let answer = (|| -> std::io::Result<String> {
            let mut stream =
                std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(1))?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            stream.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        })();
        let last = match answer {
            Ok(text) if text.starts_with("HTTP/1.1 200") => {
                tracing::info!(%admin, "the proxy is ready");
                return Ok(());
            }
            Ok(text) => text
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_owned(),
            Err(error) => error.to_string(),
        };
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the proxy at {admin} was not ready within {timeout:?}: {last}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).context("invalid --log filter")?,
        )
        .with_writer(std::io::stderr)
        .init();

    match args.command {
        Some(Command::Init(init_args)) => return init(init_args),
        Some(Command::WaitReady { admin, timeout }) => return wait_ready(admin, timeout),
        None => {}
    }
    let config_path = args
        .config
        .context("--config (or TERN_CONFIG) is required to run the proxy")?;
    let config = shared::Config::from_file(&config_path)?;
    let options = Options {
        workers: args.workers,
        backend: args.io_backend,
        pin_workers: !args.no_pin,
        worker_slice: args.worker_slice.filter(|slice| !slice.is_zero()),
        admin: args.admin,
        drain_deadline: args.drain_deadline,
        access_log: args.access_log,
        trace: args
            .trace_collector
            .map(|collector| dataplane::TraceOptions {
                collector,
                service_name: args.trace_service_name,
            }),
    };
    // Checked here, not by clap: `wait-ready`, run in the same container, sees the same
    // variables and must not be refused for them.
    match (args.probe_address, &args.app_probes) {
        (Some(address), Some(probes)) => {
            let probes = dataplane::probes::parse(probes)?;
            let listener = dataplane::probes::bind(address)
                .with_context(|| format!("binding the probe server to {address}"))?;
            tracing::info!(%address, probes = probes.len(), "serving the application's probes");
            dataplane::probes::spawn(listener, probes).context("starting the probe server")?;
        }
        (None, None) => {}
        _ => anyhow::bail!("--probe-address and --app-probes go together"),
    }
    let proxy = Proxy::start(config, &config_path.display().to_string(), options)?;
    tracing::info!(listeners = ?proxy.control().addresses(), "ready");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut hangup = signal(SignalKind::hangup())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = hangup.recv() => match proxy.reload_file(&config_path) {
                    Ok(version) => tracing::info!(version, "reloaded on SIGHUP"),
                    Err(error) => tracing::error!(%error, "reload refused; keeping the running config"),
                },
                _ = terminate.recv() => proxy.drain(),
                _ = interrupt.recv() => proxy.drain(),
                () = proxy.control().finished() => break,
            }
        }
        anyhow::Ok(())
    })?;
    proxy.join();
    tracing::info!("drained; exiting");
    Ok(())
}
