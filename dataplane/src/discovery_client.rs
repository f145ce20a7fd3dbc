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

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
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
    let mut destinations = Destinations::new(control.take_destinations());
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
    asked: &VecDeque<SocketAddr>,
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
/// asked about and still wanted (said again in each new stream's Hello).
struct Destinations {
    from_workers: Option<mpsc::Receiver<SocketAddr>>,
    /// Asked about, oldest first.
    asked: VecDeque<SocketAddr>,
    /// The same addresses, to look up.
    asked_set: HashSet<SocketAddr>,
    /// Those `tern-control` answered are outside the mesh (in the latest config applied):
    /// forgotten first when the set is full.
    outside: HashSet<SocketAddr>,
}

/// Most destinations one proxy subscribes to, explicit and intercepted together
/// (tern-control refuses more). Past it, each new intercepted destination takes the place
/// of the oldest one asked about, the oldest outside the mesh first: an application that
/// dials many addresses over its life (an object store's rotating addresses) keeps getting
/// answers for new ones, and a forgotten one is asked about again when dialed again.
const MAX_SUBSCRIPTIONS: usize = 4096;

/// What to tell `tern-control` about intercepted destinations.
#[derive(Debug, Default, PartialEq, Eq)]
struct Asking {
    /// New ones, to answer.
    new: Vec<SocketAddr>,
    /// Ones asked about before, to drop (making room).
    forget: Vec<SocketAddr>,
}

impl Destinations {
    fn new(from_workers: Option<mpsc::Receiver<SocketAddr>>) -> Destinations {
        Destinations {
            from_workers,
            asked: VecDeque::new(),
            asked_set: HashSet::new(),
            outside: HashSet::new(),
        }
    }

    /// The next addresses not asked about yet, and those they replace (waits for at least
    /// one; never, without a channel).
    async fn next_new(&mut self, explicit: usize) -> Asking {
        let limit = MAX_SUBSCRIPTIONS.saturating_sub(explicit);
        loop {
            let Some(receiver) = self.from_workers.as_mut() else {
                return std::future::pending().await;
            };
            let Some(first) = receiver.recv().await else {
                return std::future::pending().await;
            };
            let mut arrived = vec![first];
            arrived.extend(std::iter::from_fn(|| receiver.try_recv().ok()));
            let asking = self.ask(arrived, limit);
            if !asking.new.is_empty() {
                return asking;
            }
        }
    }

    /// Takes `arrived` into the set, at most `limit` in all, making room as
    /// [`MAX_SUBSCRIPTIONS`] says.
    fn ask(&mut self, arrived: Vec<SocketAddr>, limit: usize) -> Asking {
        let mut asking = Asking::default();
        if limit == 0 {
            return asking;
        }
        for address in arrived {
            if self.asked_set.contains(&address) {
                continue;
            }
            if self.asked.len() >= limit {
                let Some(gone) = self.evict() else {
                    continue;
                };
                // One of this batch's own: never sent, so there is nothing to forget.
                match asking.new.iter().position(|a| *a == gone) {
                    Some(i) => {
                        asking.new.swap_remove(i);
                    }
                    None => asking.forget.push(gone),
                }
            }
            self.asked.push_back(address);
            self.asked_set.insert(address);
            asking.new.push(address);
        }
        if !asking.forget.is_empty() {
            tracing::debug!(
                forgotten = asking.forget.len(),
                "asked about as many intercepted destinations as tern-control keeps: the oldest make room"
            );
        }
        asking
    }

    /// Drops the oldest address asked about, the oldest outside the mesh first.
    fn evict(&mut self) -> Option<SocketAddr> {
        let oldest_outside = self.asked.iter().position(|a| self.outside.contains(a));
        let gone = self.asked.remove(oldest_outside.unwrap_or(0))?;
        self.asked_set.remove(&gone);
        self.outside.remove(&gone);
        Some(gone)
    }

    /// Keeps at most `limit` addresses (a new stream's Hello says them all; with more
    /// explicit destinations than before, fewer fit), as [`Destinations::ask`] makes room.
    fn fit(&mut self, limit: usize) {
        while self.asked.len() > limit && self.evict().is_some() {}
    }

    /// `tern-control`'s latest answer on which addresses are outside the mesh.
    fn answered_outside(&mut self, outside: &[SocketAddr]) {
        self.outside = outside
            .iter()
            .filter(|a| self.asked_set.contains(a))
            .copied()
            .collect();
    }
}

fn by_address<'a>(addresses: impl IntoIterator<Item = &'a SocketAddr>) -> Vec<pb::Outbound> {
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
    destinations.fit(MAX_SUBSCRIPTIONS.saturating_sub(discovery.outbound.len()));
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
            asking = destinations.next_new(discovery.outbound.len()) => {
                tracing::debug!(destinations = ?asking.new, "asking tern-control about intercepted destinations");
                let subscribe = Kind::Subscribe(pb::Subscribe {
                    outbound: by_address(&asking.new),
                    forget: asking.forget.iter().map(SocketAddr::to_string).collect(),
                });
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
            Ok(pushed) => {
                destinations.answered_outside(&pushed.outside_mesh);
                match control.install_pushed(pushed) {
                    Ok(_) => Ok(()),
                    Err(ApplyError::Draining) => return Ok(()),
                    Err(error) => Err(error.to_string()),
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(range: std::ops::Range<u8>) -> Vec<SocketAddr> {
        range
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    #[test]
    fn past_the_limit_new_destinations_replace_the_oldest_outside_the_mesh_first() {
        let mut destinations = Destinations::new(None);
        let first = destinations.ask(addresses(0..4), 4);
        assert_eq!(first.new, addresses(0..4));
        assert!(first.forget.is_empty());
        // Asked again: nothing new.
        assert_eq!(destinations.ask(addresses(1..3), 4), Asking::default());
        // 10.0.0.2 and 10.0.0.3 are outside the mesh: they make room first, oldest first,
        // before the older 10.0.0.0 and 10.0.0.1 (Services).
        destinations.answered_outside(&addresses(2..4));
        let next = destinations.ask(addresses(4..6), 4);
        assert_eq!(next.new, addresses(4..6));
        assert_eq!(next.forget, addresses(2..4));
        // No outside answer left: the oldest goes.
        let last = destinations.ask(addresses(6..7), 4);
        assert_eq!(last.forget, addresses(0..1));
        let kept: Vec<_> = destinations.asked.iter().copied().collect();
        assert_eq!(kept, [addresses(1..2), addresses(4..7)].concat());
        // A forgotten address is asked about again when dialed again.
        assert_eq!(destinations.ask(addresses(0..1), 4).new, addresses(0..1));
        // Less room (more explicit destinations): a new stream's Hello says only what fits,
        // the oldest outside the mesh going first.
        destinations.answered_outside(&addresses(5..6));
        destinations.fit(2);
        let kept: Vec<_> = destinations.asked.iter().copied().collect();
        assert_eq!(kept, [addresses(6..7), addresses(0..1)].concat());
    }

    #[test]
    fn a_batch_larger_than_the_room_forgets_nothing_it_never_sent() {
        let mut destinations = Destinations::new(None);
        let asking = destinations.ask(addresses(0..5), 2);
        assert!(asking.forget.is_empty());
        assert_eq!(asking.new.len(), 2);
        assert_eq!(destinations.asked.len(), 2);
        assert!(
            asking
                .new
                .iter()
                .all(|a| destinations.asked_set.contains(a))
        );
        // With no room at all, nothing is asked.
        assert_eq!(
            Destinations::new(None).ask(addresses(0..1), 0),
            Asking::default()
        );
    }
}
