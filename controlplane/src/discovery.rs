//! The discovery gRPC service (`tern.discovery.v1.Discovery/Watch`) and the registry of
//! connected proxies.
//!
//! Each stream authenticates its Hello with the same credentials the CA takes (the proxy's
//! certificate, presented in the handshake, or its token), then gets the
//! proxy's whole config at once and again each time the catalog changes what this proxy
//! needs, and only then. Every config carries a version from one counter seeded with the
//! start time, so versions only grow, across restarts too. Acks and Nacks land in the
//! [`Registry`], which the admin endpoint and `ternctl status` read; the last Nack stays
//! visible after its proxy left. A stream lasts as long as what proved it (the certificate's
//! validity; a token, one certificate lifetime at most), then ends `UNAUTHENTICATED`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use shared::api::discovery::discovery_server::Discovery;
use shared::api::discovery::watch_request::Kind;
use shared::api::discovery::{self as pb, ProxyConfig, WatchRequest};
use shared::config::{Outbound, wire};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::Authority;
use crate::catalog::Catalog;
use crate::identity::TokenReviewer;
use crate::translate::{ProxyRequest, translate};

/// Time allowed for a new stream's Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// First delay before a NACKed config is offered again; doubles up to [`MAX_NACK_RETRY`].
const NACK_RETRY: Duration = Duration::from_secs(1);
/// Longest delay between offers of a NACKed config.
const MAX_NACK_RETRY: Duration = Duration::from_secs(60);
/// Most destinations one proxy may subscribe to.
const MAX_SUBSCRIPTIONS: usize = 4096;
/// How long an error that ends a stream may wait behind the configs queued before it.
const ERROR_SEND: Duration = Duration::from_secs(1);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A Nack: the version a proxy refused, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Nack {
    /// Who refused.
    pub identity: String,
    /// `<namespace>/<pod>`.
    pub workload: String,
    /// The refused version.
    pub version: u64,
    /// The proxy's reason.
    pub reason: String,
    /// When (Unix seconds).
    pub at: u64,
}

/// One connected proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// The identity it proved.
    pub identity: String,
    /// `<namespace>/<pod>`.
    pub workload: String,
    /// Its address as the server sees it.
    pub peer: Option<SocketAddr>,
    /// When the stream opened (Unix seconds).
    pub connected_at: u64,
    /// The latest version sent.
    pub sent_version: u64,
    /// The latest version it acknowledged.
    pub applied_version: u64,
    /// Its latest Nack on this stream.
    pub last_nack: Option<Nack>,
    /// Destinations it subscribed to.
    pub subscriptions: usize,
    /// What could not be put in its config.
    pub notes: Vec<String>,
    /// When its latest certificate from this CA expires (Unix seconds).
    pub certificate_expiry: Option<i64>,
}

/// Connected proxies and the counters `/metrics` shows.
#[derive(Debug)]
pub struct Registry {
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
    last_nack: Mutex<Option<Nack>>,
    next_stream: AtomicU64,
    next_version: AtomicU64,
    /// Configs sent.
    pub pushes: AtomicU64,
    /// Acks received.
    pub acks: AtomicU64,
    /// Nacks received.
    pub nacks: AtomicU64,
    /// Streams refused (bad Hello, bad credential).
    pub refused: AtomicU64,
    /// What the sidecar injector's webhook answered.
    pub injections: Arc<crate::webhook::Injections>,
}

impl Default for Registry {
    fn default() -> Self {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(1));
        Registry {
            proxies: Mutex::default(),
            last_nack: Mutex::default(),
            next_stream: AtomicU64::new(0),
            next_version: AtomicU64::new(millis),
            pushes: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            nacks: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            injections: Arc::default(),
        }
    }
}

impl Registry {
    fn proxies(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.proxies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, stream: u64, change: impl FnOnce(&mut ProxyStatus)) {
        if let Some(status) = self.proxies().get_mut(&stream) {
            change(status);
        }
    }

    /// Connected proxies, by connection order.
    pub fn connected(&self) -> Vec<ProxyStatus> {
        self.proxies().values().cloned().collect()
    }

    /// The latest Nack from any proxy, even one that has since gone.
    pub fn last_nack(&self) -> Option<Nack> {
        self.last_nack
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The `tern.discovery.v1.Discovery` service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    authority: Arc<Authority>,
    reviewer: Option<TokenReviewer>,
    catalog: watch::Receiver<Arc<Catalog>>,
    registry: Arc<Registry>,
    stopping: watch::Receiver<bool>,
}

impl DiscoveryService {
    /// Serves configs from `catalog` to proxies that `authority` (or, for ServiceAccount
    /// tokens, `reviewer`) authenticates; every stream ends when `stopping` turns true (so a
    /// graceful shutdown does not wait on streams that never end by themselves).
    pub fn new(
        authority: Arc<Authority>,
        reviewer: Option<TokenReviewer>,
        catalog: watch::Receiver<Arc<Catalog>>,
        registry: Arc<Registry>,
        stopping: watch::Receiver<bool>,
    ) -> DiscoveryService {
        DiscoveryService {
            authority,
            reviewer,
            catalog,
            registry,
            stopping,
        }
    }

    /// Checks that the Hello's identity is proven: by the certificate the proxy presented
    /// in the handshake, else by the Hello's token (bootstrap or ServiceAccount).
    async fn authenticate(
        &self,
        hello: pb::Hello,
        presented: Option<&CertificateDer<'_>>,
    ) -> Result<ProxyRequest, Status> {
        let credential =
            crate::identity::credential(presented, &hello.credential, self.reviewer.as_ref())
                .await
                .map_err(|e| crate::identity::status(&e))?;
        let proven = self
            .authority
            .prove(credential)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        if proven.to_string() != hello.spiffe_id {
            return Err(Status::permission_denied(format!(
                "the credential proves {proven}, not {}",
                hello.spiffe_id
            )));
        }
        if hello.namespace != proven.namespace() {
            return Err(Status::permission_denied(format!(
                "{proven} may not speak for a workload in namespace `{}`",
                hello.namespace
            )));
        }
        if hello.workload.is_empty() {
            return Err(Status::invalid_argument("the Hello names no workload"));
        }
        ProxyRequest {
            identity: proven,
            namespace: hello.namespace,
            workload: hello.workload,
            outbound: Vec::new(),
            destinations: Vec::new(),
        }
        .with(hello.outbound)
    }
}

impl ProxyRequest {
    /// Drops intercepted destinations the proxy asked about before and no longer wants
    /// answered (it keeps its set bounded); refuses a bad address, or more than
    /// [`MAX_SUBSCRIPTIONS`] of them in one message.
    fn without(mut self, forget: Vec<String>) -> Result<ProxyRequest, Status> {
        if forget.is_empty() {
            return Ok(self);
        }
        if forget.len() > MAX_SUBSCRIPTIONS {
            return Err(Status::resource_exhausted(format!(
                "more than {MAX_SUBSCRIPTIONS} destinations to forget"
            )));
        }
        let forget = forget
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.parse::<SocketAddr>().map_err(|_| {
                    Status::invalid_argument(format!("forget[{i}]: `{a}` is not an ip:port"))
                })
            })
            .collect::<Result<HashSet<_>, _>>()?;
        self.destinations.retain(|d| !forget.contains(d));
        Ok(self)
    }

    /// Adds what the proxy asks for: explicit destinations (a Service port and where to
    /// listen) and intercepted ones (an address its application dialed); refuses a bad one,
    /// or more than [`MAX_SUBSCRIPTIONS`] in all (checked as they are added, so an oversized
    /// request is refused before it costs more than the limit).
    fn with(mut self, wire: Vec<pb::Outbound>) -> Result<ProxyRequest, Status> {
        let full =
            || Status::resource_exhausted(format!("more than {MAX_SUBSCRIPTIONS} destinations"));
        // Repeats count too, so one message costs at most the limit's worth of work.
        if wire.len() > MAX_SUBSCRIPTIONS {
            return Err(full());
        }
        let mut destinations: HashSet<SocketAddr> = self.destinations.iter().copied().collect();
        let mut outbound: HashSet<Outbound> = self.outbound.iter().cloned().collect();
        for (i, o) in wire.into_iter().enumerate() {
            let bad = |why: String| Status::invalid_argument(format!("outbound[{i}]: {why}"));
            if !o.address.is_empty() {
                let address = o
                    .address
                    .parse()
                    .map_err(|_| bad(format!("`{}` is not an ip:port", o.address)))?;
                if destinations.insert(address) {
                    self.destinations.push(address);
                }
                if self.outbound.len() + self.destinations.len() > MAX_SUBSCRIPTIONS {
                    return Err(full());
                }
                continue;
            }
            if shared::config::service_name(&o.service).is_none() {
                return Err(bad(format!("`{}` is not <name>.<namespace>", o.service)));
            }
            let explicit = Outbound {
                port: u16::try_from(o.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(format!("{} is not a port", o.port)))?,
                listen: o
                    .listen
                    .parse()
                    .map_err(|_| bad(format!("`{}` is not an ip:port", o.listen)))?,
                service: o.service,
            };
            if outbound.insert(explicit.clone()) {
                self.outbound.push(explicit);
            }
            if self.outbound.len() + self.destinations.len() > MAX_SUBSCRIPTIONS {
                return Err(full());
            }
        }
        Ok(self)
    }
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<ProxyConfig, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = ConfigStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<ConfigStream>, Status> {
        let peer = request.remote_addr();
        let presented = crate::identity::presented_certificate(&request);
        let mut messages = request.into_inner();
        let refuse = |status: Status| {
            self.registry.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(?peer, error = %status.message(), "discovery stream refused");
            status
        };
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, messages.message()).await {
            Ok(Ok(Some(WatchRequest {
                kind: Some(Kind::Hello(hello)),
            }))) => hello,
            Ok(Err(status)) => return Err(refuse(status)),
            Err(_) => return Err(refuse(Status::deadline_exceeded("no Hello in time"))),
            Ok(_) => {
                return Err(refuse(Status::invalid_argument(
                    "the first message must be a Hello",
                )));
            }
        };
        let running = hello.running_version;
        let proxy = self
            .authenticate(hello, presented.as_ref())
            .await
            .map_err(refuse)?;
        let stream = self.registry.next_stream.fetch_add(1, Ordering::Relaxed);
        self.registry.proxies().insert(
            stream,
            ProxyStatus {
                identity: proxy.identity.to_string(),
                workload: proxy.workload_name(),
                peer,
                connected_at: unix_now(),
                sent_version: 0,
                applied_version: running,
                last_nack: None,
                subscriptions: proxy.outbound.len() + proxy.destinations.len(),
                notes: Vec::new(),
                certificate_expiry: self.authority.expiry(&proxy.identity),
            },
        );
        tracing::info!(?peer, identity = %proxy.identity, workload = %proxy.workload_name(), running, "proxy connected");
        // A stream lasts as long as what proved it: the certificate, and at most a
        // certificate's lifetime (a token). Then the proxy proves itself again, with its
        // renewed certificate, or, its renewal refused, cannot.
        let longest = unix_now().saturating_add(self.authority.workload_lifetime().as_secs());
        let proven_until = presented
            .as_ref()
            .and_then(crate::ca::not_after)
            .map_or(longest, |at| u64::try_from(at).unwrap_or(0).min(longest));
        let (configs, stream_out) = mpsc::channel(2);
        tokio::spawn(serve_stream(
            self.clone(),
            (stream, proven_until),
            proxy,
            messages,
            configs,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(stream_out),
        )))
    }
}

/// Serves stream `stream` until the client goes, the control plane stops, or what proved
/// it expires (`proven_until`, Unix seconds).
async fn serve_stream(
    service: DiscoveryService,
    (stream, proven_until): (u64, u64),
    mut proxy: ProxyRequest,
    mut messages: Streaming<WatchRequest>,
    configs: mpsc::Sender<Result<ProxyConfig, Status>>,
) {
    let DiscoveryService {
        authority,
        mut catalog,
        registry,
        mut stopping,
        ..
    } = service;
    let mut last_sent = None;
    let mut dirty = true;
    let mut catalog_open = true;
    // After a NACK the same config is offered again, with backoff: the cause may pass (a
    // port still held by its previous owner).
    let mut retry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut nacks_in_a_row = 0u32;
    let left = Duration::from_secs(proven_until.saturating_sub(unix_now()));
    let mut expiry = std::pin::pin!(tokio::time::sleep(left));
    loop {
        if *stopping.borrow_and_update() {
            break;
        }
        if dirty {
            dirty = false;
            let current = catalog.borrow_and_update().clone();
            let translated = translate(&current, &proxy);
            if last_sent.as_ref() != Some(&translated.config) {
                let version = registry.next_version.fetch_add(1, Ordering::Relaxed);
                // A proxy that stops reading must not hold up a shutdown.
                let sent = tokio::select! {
                    sent = configs.send(Ok(wire::encode(&translated.config, version))) => sent.is_ok(),
                    _ = stopping.changed() => false,
                };
                if !sent {
                    break;
                }
                registry.pushes.fetch_add(1, Ordering::Relaxed);
                registry.update(stream, |s| {
                    s.sent_version = version;
                    s.notes = translated.notes;
                    s.subscriptions = proxy.outbound.len() + proxy.destinations.len();
                });
                last_sent = Some(translated.config);
            }
        }
        tokio::select! {
            () = async {
                match retry.as_mut() {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            } => {
                retry = None;
                dirty = true;
            }
            changed = catalog.changed(), if catalog_open => match changed {
                Ok(()) => dirty = true,
                // No source feeds it (`tern-control` started without one): nothing will
                // change, and the stream goes on with what it has.
                Err(_) => catalog_open = false,
            },
            message = messages.message() => match message {
                Ok(Some(WatchRequest { kind: Some(Kind::Ack(ack)) })) => {
                    registry.acks.fetch_add(1, Ordering::Relaxed);
                    nacks_in_a_row = 0;
                    retry = None;
                    let expiry = authority.expiry(&proxy.identity);
                    registry.update(stream, |s| {
                        s.applied_version = ack.version;
                        s.certificate_expiry = expiry;
                    });
                }
                Ok(Some(WatchRequest { kind: Some(Kind::Nack(nack)) })) => {
                    registry.nacks.fetch_add(1, Ordering::Relaxed);
                    let delay = NACK_RETRY
                        .saturating_mul(1 << nacks_in_a_row.min(6))
                        .min(MAX_NACK_RETRY);
                    nacks_in_a_row = nacks_in_a_row.saturating_add(1);
                    last_sent = None;
                    retry = Some(Box::pin(tokio::time::sleep(delay)));
                    tracing::warn!(identity = %proxy.identity, version = nack.version, reason = %nack.reason, "proxy refused its config (NACK); it runs its previous version");
                    let nack = Nack {
                        identity: proxy.identity.to_string(),
                        workload: proxy.workload_name(),
                        version: nack.version,
                        reason: nack.reason,
                        at: unix_now(),
                    };
                    *registry
                        .last_nack
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(nack.clone());
                    registry.update(stream, |s| s.last_nack = Some(nack));
                }
                Ok(Some(WatchRequest { kind: Some(Kind::Subscribe(subscribe)) })) => {
                    match proxy.clone().without(subscribe.forget).and_then(|fewer| fewer.with(subscribe.outbound)) {
                        Ok(more) => {
                            proxy = more;
                            dirty = true;
                        }
                        Err(status) => {
                            // Bounded: a client that stops reading must not hold the stream
                            // (and a shutdown) up.
                            let _ = tokio::time::timeout(ERROR_SEND, configs.send(Err(status))).await;
                            break;
                        }
                    }
                }
                Ok(Some(_)) => {
                    let error = Err(Status::invalid_argument("a second Hello, or an empty message"));
                    let _ = tokio::time::timeout(ERROR_SEND, configs.send(error)).await;
                    break;
                }
                Ok(None) | Err(_) => break,
            },
            () = configs.closed() => break,
            () = &mut expiry => {
                tracing::info!(identity = %proxy.identity, "what proved the stream expired: the proxy is to prove itself again");
                let expired = Err(Status::unauthenticated(
                    "what proved this stream (a certificate, a token) expired: reconnect with the current one",
                ));
                let _ = tokio::time::timeout(ERROR_SEND, configs.send(expired)).await;
                break;
            }
            // It only ever turns true.
            _ = stopping.changed() => break,
        }
    }
    registry.proxies().remove(&stream);
    tracing::info!(identity = %proxy.identity, "proxy disconnected");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn request() -> ProxyRequest {
        ProxyRequest {
            identity: "spiffe://mesh.test/ns/shop/sa/web".parse().unwrap(),
            namespace: "shop".into(),
            workload: "web-0".into(),
            outbound: Vec::new(),
            destinations: Vec::new(),
        }
    }

    fn address(address: &str) -> pb::Outbound {
        pb::Outbound {
            address: address.into(),
            ..pb::Outbound::default()
        }
    }

    #[test]
    fn subscriptions_are_kept_once_and_counted_as_sent() {
        let twice = vec![
            address("10.0.0.1:80"),
            address("10.0.0.1:80"),
            address("10.0.0.2:80"),
        ];
        let request = request().with(twice).unwrap();
        assert_eq!(request.destinations.len(), 2);
        // A message of repeats past the limit is refused before any of it is looked at.
        let repeats = vec![address("10.0.0.1:80"); MAX_SUBSCRIPTIONS + 1];
        let refused = request.with(repeats).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn a_full_proxy_makes_room_by_forgetting() {
        let all: Vec<_> = (0..MAX_SUBSCRIPTIONS)
            .map(|i| address(&format!("10.1.{}.{}:80", i / 256, i % 256)))
            .collect();
        let full = request().with(all).unwrap();
        let more = || vec![address("10.9.9.9:443")];
        let refused = full.clone().with(more()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let made_room = full
            .clone()
            .without(vec!["10.1.0.0:80".into(), "10.1.0.1:80".into()])
            .unwrap();
        assert_eq!(made_room.destinations.len(), MAX_SUBSCRIPTIONS - 2);
        assert!(
            !made_room
                .destinations
                .contains(&"10.1.0.0:80".parse().unwrap())
        );
        let renewed = made_room.with(more()).unwrap();
        assert!(
            renewed
                .destinations
                .contains(&"10.9.9.9:443".parse().unwrap())
        );
        let bad = full.without(vec!["not-an-address".into()]).unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("forget[0]"), "{}", bad.message());
    }
}
