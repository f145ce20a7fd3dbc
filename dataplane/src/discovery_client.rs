//! The client of `tern-control`'s config stream (`tern.discovery.v1.Discovery/Watch`): says
//! who this proxy is and what it wants, applies each config it gets with
//! [`Control::install_pushed`], and answers ACK or NACK with the reason.
//!
//! It runs on the admin thread, never on a worker. A config that does not decode or cannot
//! go live (an invalid reference, a port in use) is NACKed and the previous one keeps
//! running. When the stream breaks the proxy serves on with its last good config and
//! reconnects with jittered, capped backoff; the server sends the current config on every
//! new stream, so a reconnect resyncs. The proxy proves who it is with its current
//! certificate from the CA when it has one, else with its bootstrap token; a stream that
//! tern-control ends when what proved it expires is reopened at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use shared::api::discovery::discovery_client::DiscoveryClient;
use shared::api::discovery::watch_request::Kind;
use shared::api::discovery::{self as pb, WatchRequest};
use shared::config::wire::Pushed;
use shared::config::{CaClient, Discovery};
use tokio::sync::mpsc;

use crate::ca_client::{CertifyError, backoff, endpoint, random_fraction, read};
use crate::control::{ApplyError, Control};

/// Largest config accepted from `tern-control`.
const MAX_CONFIG: usize = 64 * 1024 * 1024;

/// Why a config stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The root or token file could not be read.
    #[error(transparent)]
    File(#[from] CertifyError),
    /// `tern-control` could not be reached.
    #[error("connecting to tern-control at {address}: {source}")]
    Connect {
        /// Its address.
        address: shared::config::HostPort,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// `tern-control` refused the stream or it failed.
    #[error("tern-control answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// `tern-control` closed the stream.
    #[error("tern-control closed the stream")]
    Ended,
}

/// How long a stream must have lasted, carrying configs, for its end at the expiry of what
/// proved it to be routine (reconnected at once rather than after backoff).
const RENEWED_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps this proxy's config streaming from `tern-control` for as long as its config asks
/// for it; a change of settings starts a new stream at once.
pub async fn run(control: Arc<Control>) {
    let mut settings = control.discovery();
    let mut failures = 0u32;
    let mut destinations = Destinations {
        from_workers: control.take_destinations(),
        asked: std::collections::BTreeSet::new(),
    };
    loop {
        let Some((ca, discovery)) = settings.borrow_and_update().clone() else {
            if settings.changed().await.is_err() {
                return;
            }
            continue;
        };
        let opened = tokio::time::Instant::now();
        let mut carried = false;
        let ended = tokio::select! {
            ended = stream(&control, &ca, &discovery, (&mut failures, &mut carried), &mut destinations) => ended,
            changed = settings.changed() => {
                control.updates.connected.store(false, Ordering::Relaxed);
                if changed.is_err() {
                    return;
                }
                failures = 0;
                continue;
            }
        };
        control.updates.connected.store(false, Ordering::Relaxed);
        // A stream that carried configs for a while and ended because what proved it
        // expired (the certificate it was opened with; tern-control ends it then): routine,
        // so the proxy comes straight back, with its current certificate. Any other end, a
        // refusal at open included, backs off.
        if carried
            && opened.elapsed() >= RENEWED_AFTER
            && matches!(&ended, StreamError::Status(s) if s.code() == tonic::Code::Unauthenticated)
        {
            tracing::info!(reason = %ended, "config stream from tern-control renewed");
            continue;
        }
        let delay = backoff(failures, random_fraction());
        failures = failures.saturating_add(1);
        tracing::warn!(error = %ended, retry_in = ?delay, version = ?control.pushed_version(), "no config stream from tern-control; serving on with the last config");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                failures = 0;
            }
        }
    }
}

fn hello(
    ca: &CaClient,
    discovery: &Discovery,
    token: &str,
    running: u64,
    asked: &std::collections::BTreeSet<std::net::SocketAddr>,
) -> WatchRequest {
    WatchRequest {
        kind: Some(Kind::Hello(pb::Hello {
            spiffe_id: ca.spiffe_id.to_string(),
            credential: token.trim().to_owned(),
            namespace: discovery.workload.namespace.clone(),
            workload: discovery.workload.name.clone(),
            outbound: discovery
                .outbound
                .iter()
                .map(|o| pb::Outbound {
                    service: o.service.clone(),
                    port: u32::from(o.port),
                    listen: o.listen.to_string(),
                    address: String::new(),
                })
                .chain(by_address(asked))
                .collect(),
            running_version: running,
        })),
    }
}

/// Intercepted destinations no listener claimed: the workers' channel, and every address
/// asked about so far (said again in each new stream's Hello).
struct Destinations {
    from_workers: Option<mpsc::Receiver<std::net::SocketAddr>>,
    asked: std::collections::BTreeSet<std::net::SocketAddr>,
}

/// Most destinations one proxy subscribes to, explicit and intercepted together
/// (tern-control refuses more); past it, new intercepted destinations are not asked about
/// (their connections get the outbound policy after one wait, then at once).
const MAX_SUBSCRIPTIONS: usize = 4096;

impl Destinations {
    /// The next addresses not asked about yet (waits for at least one; never, without a
    /// channel).
    async fn next_new(&mut self, explicit: usize) -> Vec<std::net::SocketAddr> {
        let limit = MAX_SUBSCRIPTIONS.saturating_sub(explicit);
        let Some(receiver) = self.from_workers.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            let Some(first) = receiver.recv().await else {
                return std::future::pending().await;
            };
            let mut new = Vec::new();
            for address in
                std::iter::once(first).chain(std::iter::from_fn(|| receiver.try_recv().ok()))
            {
                if self.asked.len() < limit && self.asked.insert(address) {
                    new.push(address);
                }
            }
            if !new.is_empty() {
                return new;
            }
        }
    }
}

fn by_address<'a>(
    addresses: impl IntoIterator<Item = &'a std::net::SocketAddr>,
) -> Vec<pb::Outbound> {
    addresses
        .into_iter()
        .map(|a| pb::Outbound {
            address: a.to_string(),
            ..pb::Outbound::default()
        })
        .collect()
}

/// One stream: connect, say hello, then apply configs until it ends.
/// One config stream, until it ends; `carried` is set once it brings a config.
async fn stream(
    control: &Control,
    ca: &CaClient,
    discovery: &Discovery,
    (failures, carried): (&mut u32, &mut bool),
    destinations: &mut Destinations,
) -> StreamError {
    match stream_inner(control, ca, discovery, (failures, carried), destinations).await {
        Ok(()) => StreamError::Ended,
        Err(error) => error,
    }
}

async fn stream_inner(
    control: &Control,
    ca: &CaClient,
    discovery: &Discovery,
    (failures, carried): (&mut u32, &mut bool),
    destinations: &mut Destinations,
) -> Result<(), StreamError> {
    let root = read("CA root", &ca.root)?;
    // The current certificate proves who this proxy is, so a restarted control plane takes
    // it back after its token expired. After a failed attempt the next goes without it, when
    // there is a token: a control plane whose bundle no longer holds the certificate's root
    // refuses the handshake.
    let token = read("token", &ca.token_file);
    let certificate = crate::ca_client::presentable(control, ca)
        .filter(|_| token.is_err() || failures.is_multiple_of(2));
    let token = match (token, &certificate) {
        (Ok(token), _) => token,
        (Err(_), Some(_)) => String::new(),
        (Err(error), None) => return Err(error.into()),
    };
    let connect_error = |source| StreamError::Connect {
        address: ca.address.clone(),
        source,
    };
    let endpoint = endpoint(ca, root, certificate)
        .map_err(connect_error)?
        .http2_keep_alive_interval(std::time::Duration::from_secs(30));
    let channel = crate::ca_client::connect(endpoint, &ca.address, control.mark())
        .await
        .map_err(connect_error)?;
    let (answers, outgoing) = mpsc::channel(4);
    let running = control.pushed_version().unwrap_or(0);
    // The receiver is alive: it is moved into the call below.
    let _ = answers
        .send(hello(ca, discovery, &token, running, &destinations.asked))
        .await;
    let mut configs = DiscoveryClient::new(channel)
        .max_decoding_message_size(MAX_CONFIG)
        .watch(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    control.updates.connected.store(true, Ordering::Relaxed);
    tracing::info!(address = %ca.address, workload = %format!("{}/{}", discovery.workload.namespace, discovery.workload.name), "config stream from tern-control open");
    loop {
        let config = tokio::select! {
            message = configs.message() => match message? {
                Some(config) => config,
                None => break,
            },
            new = destinations.next_new(discovery.outbound.len()) => {
                tracing::debug!(destinations = ?new, "asking tern-control about intercepted destinations");
                let subscribe = Kind::Subscribe(pb::Subscribe { outbound: by_address(&new) });
                if answers.send(WatchRequest { kind: Some(subscribe) }).await.is_err() {
                    break;
                }
                continue;
            }
        };
        *failures = 0;
        *carried = true;
        let version = config.version;
        let outcome = match Pushed::try_from(config) {
            Ok(pushed) => match control.install_pushed(pushed) {
                Ok(_) => Ok(()),
                Err(ApplyError::Draining) => return Ok(()),
                Err(error) => Err(error.to_string()),
            },
            Err(error) => Err(format!("the config does not decode: {error}")),
        };
        let answer = match outcome {
            Ok(()) => {
                control.updates.acked.fetch_add(1, Ordering::Relaxed);
                tracing::info!(version, "config from tern-control applied");
                Kind::Ack(pb::Ack { version })
            }
            Err(reason) => {
                control.updates.nacked.fetch_add(1, Ordering::Relaxed);
                tracing::error!(version, %reason, "config from tern-control refused (NACK); the previous one keeps running");
                Kind::Nack(pb::Nack { version, reason })
            }
        };
        if answers
            .send(WatchRequest { kind: Some(answer) })
            .await
            .is_err()
        {
            break;
        }
    }
    Ok(())
}
