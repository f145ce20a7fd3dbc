//! `ternctl inject`: adds Tern's sidecar to the Pods of Kubernetes manifests, for `kubectl
//! apply` ([`controlplane::inject`] does the work, as for `tern-control`'s webhook).

use std::path::PathBuf;

use anyhow::Context as _;
use controlplane::inject::{self, Sidecar};
use shared::config::HostPort;

/// What `ternctl inject` is told.
#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// Manifests to inject (`-`: standard input).
    #[arg(default_value = "-")]
    pub file: PathBuf,
    /// The mesh root (PEM) the proxies check `tern-control` against: the `tls.crt` of
    /// Secret `tern-ca`.
    #[arg(long)]
    pub root: PathBuf,
    /// `tern-control`'s gRPC address; its host is also the name its certificate must carry.
    #[arg(long, default_value = "tern-control.tern-system.svc:15012")]
    pub control: HostPort,
    /// The image holding `tern-proxy`.
    #[arg(long, default_value = "tern-proxy:dev")]
    pub proxy_image: String,
    /// The mesh's trust domain (`tern-control`'s `--trust-domain`).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The OpenTelemetry collector (`host:port`, OTLP/HTTP) the sidecars send the spans of
    /// traced requests to [default: none].
    #[arg(long)]
    pub trace_collector: Option<HostPort>,
}

/// Reads the manifests, injects them, and prints the result.
pub fn run(args: &InjectArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let root = std::fs::read_to_string(&args.root)
        .with_context(|| format!("reading the mesh root {}", args.root.display()))?;
    anyhow::ensure!(
        root.contains("-----BEGIN CERTIFICATE-----"),
        "{} holds no PEM certificate",
        args.root.display()
    );
    let sidecar = Sidecar {
        image: args.proxy_image.clone(),
        control: args.control.clone(),
        trust_domain: args.trust_domain.clone(),
        trace_collector: args.trace_collector.clone(),
    };
    print!("{}", inject::manifests(&text, &sidecar, &root)?);
    Ok(())
}
