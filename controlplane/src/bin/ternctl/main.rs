//! `ternctl`: the operator's view of a running mesh. `status` reads `tern-control`'s admin
//! endpoint and prints the config it serves, what it refused, and every connected proxy with
//! the version it runs, its last NACK and its certificate's expiry. `demo` runs a whole mesh
//! on this machine and measures it ([`demo`]). `inject` adds the sidecar to Kubernetes
//! manifests ([`inject`]).

mod demo;
mod inject;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use controlplane::admin::Status;

/// Tern's command-line tool.
#[derive(Debug, Parser)]
#[command(name = "ternctl", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Shows the control plane's config and its connected proxies.
    Status {
        /// `tern-control`'s admin address.
        #[arg(long, env = "TERN_CONTROL_ADMIN", default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Runs a local mesh (tern-control, a server and a client with sidecars, in pods where the
    /// machine allows), sends load through it and straight to the server, and prints both
    /// latency reports; then takes it all down (also on Ctrl-C).
    Demo(demo::DemoArgs),
    /// Adds Tern's sidecar to the Pods of Kubernetes manifests (a Pod, Deployment,
    /// StatefulSet, DaemonSet, ReplicaSet, Job or CronJob) and writes them, with the
    /// sidecars' ConfigMap, for `kubectl apply -f -`.
    Inject(inject::InjectArgs),
}

/// One GET over HTTP/1.1 with `Connection: close`; returns the body of a 200.
fn get(address: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))
        .with_context(|| format!("connecting to tern-control's admin endpoint at {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .context("reading the answer")?;
    let text = String::from_utf8(response).context("the answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the answer is not HTTP")?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        bail!("{path} answered `{status_line}`");
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return dechunk(body);
    }
    Ok(body.to_owned())
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("a bad chunk")?;
        let size = usize::from_str_radix(size.trim(), 16).context("a bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).context("a short chunk")?);
        body = rest.get(size + 2..).context("a short chunk")?;
    }
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Demo(args) => match demo::run(&args) {
            Err(error) if error.is::<demo::Interrupted>() => std::process::exit(130),
            result => result,
        },
        Command::Inject(args) => inject::run(&args),
        Command::Status { admin, json } => {
            let body = get(admin, "/status")?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let status: Status = serde_json::from_str(&body)
                .context("tern-control's /status is not what ternctl reads")?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            print!("{}", status.render(now));
            Ok(())
        }
    }
}
