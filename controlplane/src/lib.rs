//! `tern-control`, Tern's control plane, as a library: [`ControlPlane::start`] runs one
//! in-process (which is how the tests run it) and the `tern-control` binary is a thin shell
//! around it.
//!
//! Layout: [`ca`] is the mesh certificate authority (keys, tokens, signing; no IO beyond
//! its state directory); [`identity`] serves it over gRPC (`tern.identity.v1.Identity`).
//! Config distribution joins as its own service next to it.

pub mod ca;
pub mod identity;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context as _;
use tokio::sync::oneshot;

pub use ca::{Authority, CaOptions};

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// The gRPC address (TLS; proxies verify it against the mesh root).
    pub listen: SocketAddr,
    /// Names and addresses proxies dial it by, put in its serving certificate.
    pub server_names: Vec<String>,
    /// The CA.
    pub ca: CaOptions,
}

/// A running control plane; dropping it stops it.
#[derive(Debug)]
pub struct ControlPlane {
    address: SocketAddr,
    authority: Arc<Authority>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Opens the CA, binds the gRPC port and serves on a thread of its own; returns once the
    /// port is bound.
    pub fn start(options: Options) -> anyhow::Result<ControlPlane> {
        let authority = Arc::new(Authority::open(&options.ca).context("opening the CA")?);
        let (cert, key) = authority
            .serving_certificate(&options.server_names)
            .context("issuing the serving certificate")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tern-control")
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(options.listen))
            .with_context(|| format!("binding {}", options.listen))?;
        let address = listener.local_addr().context("reading the bound address")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let service = identity::IdentityService::new(authority.clone());
        let thread = std::thread::Builder::new()
            .name("tern-control".into())
            .spawn(move || {
                let served =
                    runtime.block_on(identity::serve(listener, &cert, &key, service, async {
                        let _ = stopped.await;
                    }));
                if let Err(error) = served {
                    tracing::error!(%error, "the gRPC server failed");
                }
            })
            .context("starting the server thread")?;
        tracing::info!(%address, trust_domain = authority.trust_domain(), "tern-control serving");
        Ok(ControlPlane {
            address,
            authority,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The bound gRPC address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The CA (to mint bootstrap tokens, read the trust bundle).
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// Stops serving and waits for the server thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}
