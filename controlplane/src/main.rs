//! `tern-control`: `serve` runs the control plane (the mesh CA and config distribution over
//! gRPC, from a directory of manifests or the Kubernetes API server, and, asked for, the
//! sidecar injector's admission webhook); `token` prints the
//! bootstrap token a workload presents to prove its identity in local mode; `crds` prints
//! the CustomResourceDefinitions of Tern's resources.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args as ClapArgs, Parser, Subcommand};
use controlplane::{Authority, CaOptions, ConfigSource, ControlPlane, Options};
use tokio::signal::unix::{SignalKind, signal};

/// Tern's control plane.
#[derive(Debug, Parser)]
#[command(name = "tern-control", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "TERN_LOG", default_value = "info", global = true)]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the control plane until SIGTERM or SIGINT.
    Serve {
        /// The gRPC address proxies connect to (TLS).
        #[arg(long, env = "TERN_CONTROL_LISTEN", default_value = "127.0.0.1:15012")]
        listen: SocketAddr,
        /// Names and IPs proxies dial this server by (its certificate carries them).
        #[arg(long = "server-name", default_values_t = ["tern-control".to_owned(), "localhost".to_owned(), "127.0.0.1".to_owned()])]
        server_names: Vec<String>,
        /// A directory of YAML manifests (Service, EndpointSlice, Pod, HTTPRoute and Tern's
        /// kinds), watched for changes; without one, proxies get empty configs.
        #[arg(long, env = "TERN_MANIFESTS", conflicts_with = "kubernetes")]
        manifests: Option<PathBuf>,
        /// Reads the config from the Kubernetes API server instead (the same kinds, across
        /// all namespaces), found as kube-rs finds it: `KUBECONFIG` or `~/.kube/config`, else
        /// in-cluster. Start-up waits until every kind is listed.
        #[arg(long)]
        kubernetes: bool,
        /// How long start-up waits for the API server to list every kind.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        list_timeout: Duration,
        /// The admin HTTP address (`/status` for `ternctl status`, `/metrics`).
        #[arg(long, env = "TERN_CONTROL_ADMIN", default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
        #[command(flatten)]
        injector: InjectorArgs,
        #[command(flatten)]
        ca: CaArgs,
    },
    /// Prints the CustomResourceDefinitions of Tern's resources (`| kubectl apply -f -`).
    Crds,
    /// Prints a bootstrap token that proves SPIFFE_ID to this CA (local mode). Hand it only
    /// to that workload: until it expires, whoever holds it can get certificates for the
    /// identity. A running proxy renews with its certificate and needs it only to start.
    Token {
        /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
        spiffe_id: shared::SpiffeId,
        /// How long the token proves the identity (a proxy must start within it).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        valid_for: Duration,
        #[command(flatten)]
        ca: CaArgs,
    },
}

#[derive(Debug, ClapArgs)]
struct InjectorArgs {
    /// Serves the sidecar injector's admission webhook here (HTTPS, `POST /inject`, with the
    /// gRPC server's certificate). With --kubernetes, also writes ConfigMap `tern-proxy` into
    /// each namespace labelled `tern.dev/inject=enabled` and the mesh root into the `caBundle`
    /// of MutatingWebhookConfiguration `tern-sidecar-injector`.
    #[arg(long, env = "TERN_INJECT_LISTEN")]
    inject_listen: Option<SocketAddr>,
    /// The image holding `tern-proxy`, for injected Pods.
    #[arg(long, default_value = "tern-proxy:dev", requires = "inject_listen")]
    proxy_image: String,
    /// The gRPC address injected proxies reach tern-control at; its host is also the name
    /// they check its certificate for.
    #[arg(
        long,
        default_value = "tern-control.tern-system.svc:15012",
        requires = "inject_listen"
    )]
    inject_control: shared::config::HostPort,
    /// The OpenTelemetry collector (`host:port`, OTLP/HTTP) injected proxies send the spans
    /// of traced requests to [default: none].
    #[arg(long, requires = "inject_listen")]
    inject_trace_collector: Option<shared::config::HostPort>,
}

impl InjectorArgs {
    fn into_options(self) -> Option<controlplane::webhook::Injector> {
        Some(controlplane::webhook::Injector {
            listen: self.inject_listen?,
            image: self.proxy_image,
            control: self.inject_control,
            trace_collector: self.inject_trace_collector,
        })
    }
}

#[derive(Debug, ClapArgs)]
struct CaArgs {
    /// Where the generated root and the token key live (created on first start).
    #[arg(long, env = "TERN_STATE_DIR", default_value = "/var/lib/tern-control")]
    state_dir: PathBuf,
    /// The mesh's trust domain.
    #[arg(long, env = "TERN_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of workload certificates (5 s to 90 days; never past the signing certificate's
    /// own expiry).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    workload_lifetime: Duration,
    /// Sign with this certificate (PEM, signing certificate first, then any chain) instead of
    /// a generated root.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// More roots for the trust bundle (PEM), e.g. the old root during a root rotation.
    #[arg(long)]
    extra_roots: Option<PathBuf>,
}

impl From<CaArgs> for CaOptions {
    fn from(args: CaArgs) -> CaOptions {
        CaOptions {
            state_dir: args.state_dir,
            trust_domain: args.trust_domain,
            workload_lifetime: args.workload_lifetime,
            ca_cert: args.ca_cert,
            ca_key: args.ca_key,
            extra_roots: args.extra_roots,
        }
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
        Command::Crds => {
            print!("{}", shared::crd::definitions_yaml()?);
            Ok(())
        }
        Command::Token {
            spiffe_id,
            valid_for,
            ca,
        } => {
            let authority = Authority::open(&ca.into())?;
            anyhow::ensure!(
                spiffe_id.trust_domain() == authority.trust_domain(),
                "{spiffe_id} is not in trust domain `{}`",
                authority.trust_domain()
            );
            anyhow::ensure!(
                valid_for >= Duration::from_secs(1),
                "--valid-for must be at least a second"
            );
            println!("{}", authority.token(&spiffe_id, valid_for));
            Ok(())
        }
        Command::Serve {
            listen,
            server_names,
            manifests,
            kubernetes,
            list_timeout,
            admin,
            injector,
            ca,
        } => {
            let source = match (kubernetes, manifests) {
                (true, _) => ConfigSource::Kubernetes {
                    config: None,
                    list_timeout,
                },
                (false, Some(dir)) => ConfigSource::Directory(dir),
                (false, None) => ConfigSource::None,
            };
            // Signal handlers first, so a SIGTERM right after start-up is a clean stop, and
            // start-up on a thread of its own, so one during it (waiting for the API server
            // to list everything, say) stops at once.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (mut terminate, mut interrupt) = {
                let _entered = runtime.enter();
                (
                    signal(SignalKind::terminate())?,
                    signal(SignalKind::interrupt())?,
                )
            };
            let options = Options {
                listen,
                server_names,
                ca: ca.into(),
                source,
                admin: Some(admin),
                injector: injector.into_options(),
            };
            let (started, starting) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("tern-control-start".into())
                .spawn(move || {
                    let _ = started.send(ControlPlane::start(options));
                })
                .context("starting the start-up thread")?;
            let control = runtime.block_on(async {
                tokio::select! {
                    started = starting => Some(started),
                    _ = terminate.recv() => None,
                    _ = interrupt.recv() => None,
                }
            });
            let control = match control {
                Some(Ok(started)) => started?,
                Some(Err(_)) => anyhow::bail!("start-up ended without a word"),
                None => {
                    tracing::info!("stopped while starting");
                    return Ok(());
                }
            };
            runtime.block_on(async {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            });
            tracing::info!("stopping");
            control.stop();
            Ok(())
        }
    }
}
