//! `tern-control`, Tern's control plane, as a library: [`ControlPlane::start`] runs one
//! in-process (which is how the tests run it) and the `tern-control` binary is a thin shell
//! around it.
//!
//! Layout: [`ca`] is the mesh certificate authority (keys, tokens, signing; no IO beyond
//! its state directory) and [`identity`] serves it over gRPC; [`catalog`] holds what the
//! user declared, read by a [`catalog::source::Source`] (a directory of manifests, or the
//! Kubernetes API server) and checked once; [`translate`] turns it into each proxy's config and [`discovery`] streams
//! that to the proxies and records their ACKs and NACKs; [`admin`] shows it all over HTTP.
//! [`inject`] adds the sidecar to Pods, for `ternctl inject` and for the admission webhook
//! ([`webhook`]) that injects Pods as the API server creates them.

pub mod admin;
pub mod ca;
pub mod catalog;
pub mod discovery;
pub mod identity;
pub mod inject;
pub mod translate;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use shared::api::discovery::discovery_server::DiscoveryServer;
use shared::api::identity::identity_server::IdentityServer;
use tokio::sync::{oneshot, watch};

pub use ca::{Authority, CaOptions, Credential, DEFAULT_TOKEN_VALIDITY};
use catalog::Catalog;
use catalog::kubernetes::Cluster;
use catalog::source::{Directory, Source};
use discovery::{DiscoveryService, Registry};
use identity::TokenReviewer;

/// Largest gRPC message accepted from a proxy: a CSR, a token, a Hello with its
/// destinations.
const MAX_REQUEST: usize = 1024 * 1024;
/// Largest config sent to a proxy.
const MAX_CONFIG: usize = 64 * 1024 * 1024;

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// The gRPC address (TLS; proxies verify it against the mesh root).
    pub listen: SocketAddr,
    /// Names and addresses proxies dial it by, put in its serving certificate.
    pub server_names: Vec<String>,
    /// The CA.
    pub ca: CaOptions,
    /// Where the config proxies are served comes from.
    pub source: ConfigSource,
    /// The admin HTTP address (`/status`, `/metrics`); none for no admin endpoint.
    pub admin: Option<SocketAddr>,
    /// The sidecar injector's admission webhook; none for none. With the Kubernetes source,
    /// `tern-control` also writes what injected Pods need into the cluster
    /// ([`webhook::keep_cluster_current`]).
    pub injector: Option<webhook::Injector>,
}

/// Where the declared config comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// Nowhere: proxies get empty configs (the CA alone).
    None,
    /// A directory of YAML manifests, watched.
    Directory(PathBuf),
    /// A Kubernetes API server, listed and watched.
    Kubernetes {
        /// How to reach it; none finds it as kube-rs does (`KUBECONFIG` or `~/.kube/config`,
        /// else in-cluster).
        config: Option<Box<kube::Config>>,
        /// How long start-up waits for every kind to be listed before it fails.
        list_timeout: Duration,
    },
}

/// How long `tern-control` waits at start-up for the API server to list every kind.
pub const DEFAULT_LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// A running control plane; dropping it stops it.
#[derive(Debug)]
pub struct ControlPlane {
    address: SocketAddr,
    admin: Option<SocketAddr>,
    injector: Option<SocketAddr>,
    authority: Arc<Authority>,
    catalog: watch::Receiver<Arc<Catalog>>,
    registry: Arc<Registry>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Opens the CA, reads the declared config once (from the Kubernetes API server: every
    /// kind listed), binds the gRPC, admin and injector ports and serves on a thread of its own;
    /// returns once the ports are bound.
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
        let admin_listener = match options.admin {
            Some(admin) => Some(
                runtime
                    .block_on(tokio::net::TcpListener::bind(admin))
                    .with_context(|| format!("binding the admin address {admin}"))?,
            ),
            None => None,
        };
        let admin = match &admin_listener {
            Some(l) => Some(l.local_addr().context("reading the admin address")?),
            None => None,
        };
        let injector_listener = match &options.injector {
            Some(injector) => Some(
                runtime
                    .block_on(tokio::net::TcpListener::bind(injector.listen))
                    .with_context(|| format!("binding the injector address {}", injector.listen))?,
            ),
            None => None,
        };
        let injector = match &injector_listener {
            Some(l) => Some(l.local_addr().context("reading the injector address")?),
            None => None,
        };

        let empty = Catalog::empty(authority.trust_domain());
        let (catalog_tx, catalog) = watch::channel(Arc::new(empty));
        // In a cluster, workloads prove who they are with ServiceAccount tokens too.
        let cluster = match &options.source {
            ConfigSource::None => None,
            ConfigSource::Directory(dir) => {
                runtime.block_on(follow(catalog_tx, Directory::new(dir)));
                None
            }
            ConfigSource::Kubernetes {
                config,
                list_timeout,
            } => {
                let (client, source) = runtime.block_on(async {
                    let config = match config {
                        Some(config) => (**config).clone(),
                        None => kube::Config::infer().await.context(
                            "finding the Kubernetes API server (KUBECONFIG, ~/.kube/config, or in-cluster)",
                        )?,
                    };
                    let config = catalog::kubernetes::with_read_timeout(config);
                    let url = config.cluster_url.clone();
                    let client = kube::Client::try_from(config)
                        .with_context(|| format!("making a client for the API server at {url}"))?;
                    // The watchers start on this runtime.
                    anyhow::Ok((client.clone(), Cluster::watch(client)))
                })?;
                let listed = runtime.block_on(async {
                    tokio::time::timeout(*list_timeout, follow(catalog_tx, source)).await
                });
                anyhow::ensure!(
                    listed.is_ok(),
                    "the API server did not list every kind Tern reads within {} (see the warnings above)",
                    humantime::format_duration(*list_timeout)
                );
                Some(client)
            }
        };
        let reviewer = cluster
            .clone()
            .map(|client| TokenReviewer::new(client, authority.trust_domain()));
        let registry = Arc::new(Registry::default());
        if let Some(listener) = admin_listener {
            runtime.spawn(admin::serve(
                listener,
                catalog.clone(),
                registry.clone(),
                std::future::pending(),
            ));
        }

        let (stop, stopped) = oneshot::channel::<()>();
        let (stopping_tx, stopping) = watch::channel(false);
        let client_roots: String = authority
            .trust_bundle()
            .iter()
            .map(|root| ca::pem_encode(root))
            .collect();
        if let (Some(listener), Some(options)) = (injector_listener, &options.injector) {
            let tls = webhook::server_config(&cert, &key)?;
            let sidecar = inject::Sidecar {
                image: options.image.clone(),
                control: options.control.clone(),
                trust_domain: authority.trust_domain().to_owned(),
                trace_collector: options.trace_collector.clone(),
            };
            if let Some(client) = cluster {
                runtime.spawn(webhook::keep_cluster_current(
                    client,
                    sidecar.clone(),
                    client_roots.clone(),
                ));
            }
            runtime.spawn(webhook::serve(
                listener,
                tls,
                Arc::new(sidecar),
                registry.injections.clone(),
                std::future::pending(),
            ));
        }
        let identity = identity::IdentityService::new(authority.clone(), reviewer.clone());
        let discovery = DiscoveryService::new(
            authority.clone(),
            reviewer,
            catalog.clone(),
            registry.clone(),
            stopping,
        );
        let thread = std::thread::Builder::new()
            .name("tern-control".into())
            .spawn(move || {
                let served = runtime.block_on(serve(
                    listener,
                    Tls {
                        cert_pem: &cert,
                        key_pem: &key,
                        client_roots_pem: &client_roots,
                    },
                    identity,
                    discovery,
                    async {
                        let _ = stopped.await;
                        // End the streams, or the graceful shutdown would wait for them.
                        stopping_tx.send_replace(true);
                    },
                ));
                if let Err(error) = served {
                    tracing::error!(%error, "the gRPC server failed");
                }
            })
            .context("starting the server thread")?;
        tracing::info!(%address, ?admin, ?injector, trust_domain = authority.trust_domain(), source = ?options.source, "tern-control serving");
        Ok(ControlPlane {
            address,
            admin,
            injector,
            authority,
            catalog,
            registry,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The bound gRPC address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The bound admin address.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The bound address of the injector's webhook.
    pub fn injector_address(&self) -> Option<SocketAddr> {
        self.injector
    }

    /// The CA (to mint bootstrap tokens, read the trust bundle).
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// The catalog in use now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }

    /// What `/status` shows.
    pub fn status(&self) -> admin::Status {
        admin::status(&self.catalog(), &self.registry)
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

/// Publishes what `source` declares first, then follows it in a task of its own.
async fn follow(catalog: watch::Sender<Arc<Catalog>>, mut source: impl Source) {
    publish(&catalog, source.next().await);
    tokio::spawn(async move {
        loop {
            let declared = source.next().await;
            publish(&catalog, declared);
        }
    });
}

/// Checks what a source declared and, when that changes anything, publishes the catalog.
fn publish(catalog: &watch::Sender<Arc<Catalog>>, declared: catalog::Declared) {
    let previous = catalog.borrow().clone();
    let next = Catalog::build(declared, &previous);
    for problem in &next.problems {
        if !previous.problems.contains(problem) {
            tracing::warn!(%problem, "config refused");
        }
    }
    let changed = next.generation != previous.generation;
    if changed {
        tracing::info!(
            generation = next.generation,
            objects = next.len(),
            problems = next.problems.len(),
            "config changed"
        );
    }
    if changed || next.problems != previous.problems {
        catalog.send_replace(Arc::new(next));
    }
}

/// The server's TLS material, PEM.
struct Tls<'a> {
    cert_pem: &'a str,
    key_pem: &'a str,
    /// The roots a client certificate must lead to: the mesh's trust bundle.
    client_roots_pem: &'a str,
}

/// Serves the identity and discovery APIs over TLS on `listener` until `shutdown` resolves.
/// A client may present its workload certificate, which then proves its identity in place
/// of a token (a renewal, or a reconnect after the token expired); one that presents none
/// proves it with a token.
async fn serve(
    listener: tokio::net::TcpListener,
    tls: Tls<'_>,
    identity: identity::IdentityService,
    discovery: DiscoveryService,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            tls.cert_pem,
            tls.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(
            tls.client_roots_pem,
        ))
        .client_auth_optional(true);
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(IdentityServer::new(identity).max_decoding_message_size(MAX_REQUEST))
        .add_service(
            DiscoveryServer::new(discovery)
                .max_decoding_message_size(MAX_REQUEST)
                .max_encoding_message_size(MAX_CONFIG),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}
