//! `tern-proxy`: runs the sidecar from a YAML config file; SIGHUP reloads the file, SIGTERM
//! or SIGINT (or `POST /shutdown` on the admin port) drains and exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use dataplane::{BackendChoice, Options, Proxy};
use tokio::signal::unix::{SignalKind, signal};

/// Tern's sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "tern-proxy", version)]
struct Args {
    /// The YAML config file (listeners, routes, clusters).
    #[arg(long, short, env = "TERN_CONFIG")]
    config: PathBuf,
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
    /// How long a drain waits for in-flight requests.
    #[arg(long, env = "TERN_DRAIN_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_deadline: Duration,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `dataplane=debug`).
    #[arg(long, env = "TERN_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).context("invalid --log filter")?,
        )
        .with_writer(std::io::stderr)
        .init();

    let config = shared::Config::from_file(&args.config)?;
    let options = Options {
        workers: args.workers,
        backend: args.io_backend,
        pin_workers: !args.no_pin,
        admin: args.admin,
        drain_deadline: args.drain_deadline,
    };
    let proxy = Proxy::start(config, &args.config.display().to_string(), options)?;
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
                _ = hangup.recv() => match proxy.reload_file(&args.config) {
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
