//! The control side of a proxy process: turns configs into snapshots, binds listener
//! sockets, hands both to the workers, collects their statistics, and starts the drain.
//!
//! It runs on the admin thread or the caller's thread, never on a worker, and talks to
//! workers only by message. Applying a config is all-or-nothing: if it does not validate or
//! a socket cannot be bound, the workers keep the config they have.
//!
//! It also holds this proxy's identity: loaded from files at every apply, or, when the
//! config names a CA, the latest certificate [`crate::ca_client`] obtained. A config that
//! needs a CA certificate waits for the first one; each renewal re-applies the running
//! config with the new certificate, so new connections use it and open ones are untouched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use shared::config::wire::Pushed;
use shared::config::{CaClient, Config, ConfigError, Discovery, IdentitySource};
use tokio::sync::{mpsc, oneshot, watch};

use crate::io::BackendKind;
use crate::metrics::WorkerReport;
use crate::snapshot::Snapshot;
use crate::sys;
use crate::tls::Identity;
use crate::worker::Command;

/// Logs the state of this proxy's certificate when it is close to expiry or past it.
pub fn log_expiry(id: &shared::SpiffeId, validity: &crate::tls::Validity) {
    let now = std::time::SystemTime::now();
    let remaining = validity.remaining(now);
    if remaining <= 0 {
        tracing::error!(identity = %id, expired_seconds_ago = -remaining, "the workload certificate has EXPIRED: peers will refuse this proxy; renew it (CA reachable? identity files replaced and SIGHUP sent?)");
    } else if validity.expiring(now) {
        tracing::warn!(identity = %id, expires_in_seconds = remaining, "the workload certificate expires soon: renew it (CA reachable? identity files replaced and SIGHUP sent?)");
    }
}

/// How long a worker may take to acknowledge a snapshot or answer a scrape.
const WORKER_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a config was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("listener `{name}`: binding {address}: {source}")]
    Bind {
        /// The listener.
        name: String,
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A worker refused or did not answer.
    #[error("worker {worker}: {message}")]
    Worker {
        /// The worker index.
        worker: usize,
        /// What went wrong.
        message: String,
    },
    /// The proxy is draining and takes no new config.
    #[error("the proxy is draining")]
    Draining,
    /// The config takes its identity from the CA and no certificate has arrived yet; it is
    /// kept and applied as soon as one does.
    #[error("waiting for a certificate from the CA at {0}")]
    AwaitingCertificate(shared::config::HostPort),
    /// The config takes listeners and clusters from `tern-control` and none have arrived
    /// yet; it is kept and applied as soon as they do.
    #[error("waiting for a config from tern-control at {0}")]
    AwaitingConfig(shared::config::HostPort),
}

impl ApplyError {
    /// Whether the config was accepted and only waits for something from `tern-control`.
    pub fn is_awaiting(&self) -> bool {
        matches!(
            self,
            ApplyError::AwaitingCertificate(_) | ApplyError::AwaitingConfig(_)
        )
    }
}

/// A listener's bound address.
#[derive(Debug, Clone, Serialize)]
pub struct BoundListener {
    /// Its name.
    pub name: String,
    /// The address in the config.
    #[serde(skip)]
    pub configured: SocketAddr,
    /// The address actually bound (differs when the config says port 0).
    pub address: SocketAddr,
}

struct State {
    snapshot: Option<Arc<Snapshot>>,
    bound: Vec<BoundListener>,
    /// The config to run, kept so a new certificate can be applied with it.
    desired: Option<(Config, String)>,
    /// The latest certificate from the CA.
    issued: Option<Arc<Identity>>,
    /// The latest listeners and clusters from `tern-control` that went live.
    pushed: Option<Pushed>,
    /// Intercepted IPv6 listeners left unbound because this host has no IPv6: each is
    /// reported once, not at every apply.
    unbound_ipv6: Vec<Arc<str>>,
}

/// Config updates from `tern-control`, by outcome (for `/metrics`).
#[derive(Debug, Default)]
pub struct DiscoveryCounts {
    /// Updates applied (ACKed).
    pub acked: std::sync::atomic::AtomicU64,
    /// Updates refused (NACKed).
    pub nacked: std::sync::atomic::AtomicU64,
    /// Whether the stream is up.
    pub connected: AtomicBool,
}

/// Certificate requests to the CA, by outcome (for `/metrics`).
#[derive(Debug, Default)]
pub struct CertifyCounts {
    /// Requests that returned a certificate.
    pub ok: std::sync::atomic::AtomicU64,
    /// Requests that failed (CA unreachable, refused, bad answer).
    pub failed: std::sync::atomic::AtomicU64,
}

/// Unclaimed intercepted destinations queued for the discovery client, at most.
const DESTINATION_QUEUE: usize = 1024;

/// Shared by the admin thread and the process owning the proxy.
pub struct Control {
    /// The workers' IO backend.
    pub backend: BackendKind,
    workers: Vec<mpsc::UnboundedSender<Command>>,
    state: Mutex<State>,
    ready: AtomicBool,
    draining: AtomicBool,
    drain_deadline: Duration,
    finished: watch::Sender<bool>,
    ca: watch::Sender<Option<CaClient>>,
    discovery: watch::Sender<Option<(CaClient, Discovery)>>,
    /// Intercepted destinations no listener claims, from the workers, for the discovery
    /// client to ask `tern-control` about (the receiver is taken once).
    destinations: (
        mpsc::Sender<SocketAddr>,
        Mutex<Option<mpsc::Receiver<SocketAddr>>>,
    ),
    /// Certificate requests by outcome.
    pub certify: CertifyCounts,
    /// Config updates from `tern-control` by outcome.
    pub updates: DiscoveryCounts,
    /// The span exporter, when spans go to a collector.
    pub trace: Option<Arc<crate::trace::Exporter>>,
}

impl Control {
    pub(crate) fn new(
        backend: BackendKind,
        workers: Vec<mpsc::UnboundedSender<Command>>,
        drain_deadline: Duration,
        trace: Option<Arc<crate::trace::Exporter>>,
    ) -> Control {
        Control {
            backend,
            workers,
            state: Mutex::new(State {
                snapshot: None,
                bound: Vec::new(),
                desired: None,
                issued: None,
                pushed: None,
                unbound_ipv6: Vec::new(),
            }),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            drain_deadline,
            finished: watch::Sender::new(false),
            ca: watch::Sender::new(None),
            discovery: watch::Sender::new(None),
            destinations: {
                let (sender, receiver) = mpsc::channel(DESTINATION_QUEUE);
                (sender, Mutex::new(Some(receiver)))
            },
            certify: CertifyCounts::default(),
            updates: DiscoveryCounts::default(),
            trace,
        }
    }

    /// Where workers send intercepted destinations no listener claims.
    pub(crate) fn destination_sender(&self) -> mpsc::Sender<SocketAddr> {
        self.destinations.0.clone()
    }

    /// The workers' unclaimed destinations, for the discovery client (once).
    pub(crate) fn take_destinations(&self) -> Option<mpsc::Receiver<SocketAddr>> {
        self.destinations
            .1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The socket mark for the proxy's own connections (to `tern-control` too), from the
    /// config to run.
    pub fn mark(&self) -> Option<u32> {
        self.state()
            .desired
            .as_ref()
            .and_then(|(config, _)| config.interception.as_ref()?.mark)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Validates `config`, binds what is new, and hands it to every worker. Blocks until all
    /// workers have it live. Returns the new version.
    ///
    /// A config whose identity comes from the CA before any certificate has arrived is kept
    /// and [`ApplyError::AwaitingCertificate`] returned; it goes live with the certificate.
    pub fn apply(&self, config: Config, source: &str) -> Result<u64, ApplyError> {
        if self.draining() {
            return Err(ApplyError::Draining);
        }
        let mut state = self.state();
        let result = self.apply_locked(&mut state, config.clone(), source);
        if result.as_ref().is_ok() || result.as_ref().is_err_and(ApplyError::is_awaiting) {
            let ca = match &config.identity {
                Some(IdentitySource::Ca(ca)) => Some(ca.clone()),
                _ => None,
            };
            let discovery = ca.clone().zip(config.discovery.clone());
            if let Some(exporter) = &self.trace {
                exporter.set_mark(config.interception.as_ref().and_then(|i| i.mark));
            }
            state.desired = Some((config, source.to_owned()));
            self.ca.send_if_modified(|current| {
                let changed = *current != ca;
                *current = ca;
                changed
            });
            self.discovery.send_if_modified(|current| {
                let changed = *current != discovery;
                *current = discovery;
                changed
            });
        }
        result
    }

    /// Applies listeners and clusters from `tern-control` with the running (or waiting)
    /// config. If they cannot go live (they do not validate, a port is taken), the previous
    /// ones stay and the error says why.
    pub fn install_pushed(&self, pushed: Pushed) -> Result<Option<u64>, ApplyError> {
        if self.draining() {
            return Err(ApplyError::Draining);
        }
        let mut state = self.state();
        let version = pushed.version;
        let previous = state.pushed.replace(pushed);
        let Some((config, source)) = state.desired.clone() else {
            return Ok(None);
        };
        let result = match self.apply_locked(&mut state, config.clone(), &source) {
            Ok(version) => Ok(Some(version)),
            // It cannot go live yet (no certificate), but a push that cannot merge is
            // refused now rather than ACKed and found out later.
            Err(error) if error.is_awaiting() => {
                match state.pushed.as_ref().map(|p| p.merge_into(&config)) {
                    Some(Err((field, message))) => Err(ApplyError::Config(ConfigError::Invalid {
                        origin: format!("{source} + tern-control version {version}"),
                        field,
                        message,
                    })),
                    _ => Ok(None),
                }
            }
            Err(error) => Err(error),
        };
        if result.is_err() {
            state.pushed = previous;
        }
        result
    }

    /// The version of the running config from `tern-control`, if any.
    pub fn pushed_version(&self) -> Option<u64> {
        self.state().pushed.as_ref().map(|p| p.version)
    }

    /// What the proxy waits for before it is ready, if anything.
    pub fn waiting_for(&self) -> Option<String> {
        let state = self.state();
        let (config, _) = state.desired.as_ref()?;
        if let Some(IdentitySource::Ca(ca)) = &config.identity {
            if config.discovery.is_some() && state.pushed.is_none() {
                return Some(format!("a config from tern-control at {}", ca.address));
            }
            if state.issued.as_ref().is_none_or(|i| i.id != ca.spiffe_id) {
                return Some(format!("a certificate from the CA at {}", ca.address));
            }
        }
        None
    }

    /// What to ask `tern-control` for, as the running config says; changes are signalled.
    pub fn discovery(&self) -> watch::Receiver<Option<(CaClient, Discovery)>> {
        self.discovery.subscribe()
    }

    /// The certificate the CA issued last, if any.
    pub fn issued(&self) -> Option<Arc<Identity>> {
        self.state().issued.clone()
    }

    /// Installs a certificate from the CA and re-applies the running (or waiting) config
    /// with it. Returns the new version, or `None` when there is no config to apply yet.
    pub fn install_certificate(&self, identity: Identity) -> Result<Option<u64>, ApplyError> {
        if self.draining() {
            return Err(ApplyError::Draining);
        }
        let mut state = self.state();
        state.issued = Some(Arc::new(identity));
        let Some((config, source)) = state.desired.clone() else {
            return Ok(None);
        };
        match self.apply_locked(&mut state, config, &source) {
            Ok(version) => Ok(Some(version)),
            Err(error) if error.is_awaiting() => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The CA to get certificates from, as the running config says; changes are signalled.
    pub fn ca(&self) -> watch::Receiver<Option<CaClient>> {
        self.ca.subscribe()
    }

    fn apply_locked(
        &self,
        state: &mut State,
        config: Config,
        source: &str,
    ) -> Result<u64, ApplyError> {
        let identity = match &config.identity {
            None => None,
            Some(IdentitySource::Files(files)) => {
                Some(Arc::new(Identity::load(files).map_err(|e| {
                    ConfigError::Invalid {
                        origin: source.to_owned(),
                        field: "identity".into(),
                        message: e.to_string(),
                    }
                })?))
            }
            Some(IdentitySource::Ca(ca)) => match &state.issued {
                Some(issued) if issued.id == ca.spiffe_id => Some(issued.clone()),
                _ => return Err(ApplyError::AwaitingCertificate(ca.address.clone())),
            },
        };
        let (config, source) = match (&config.discovery, &config.identity, &state.pushed) {
            (None, _, _) => (config, source.to_owned()),
            (Some(_), Some(IdentitySource::Ca(ca)), None) => {
                return Err(ApplyError::AwaitingConfig(ca.address.clone()));
            }
            (Some(_), Some(IdentitySource::Ca(ca)), Some(pushed)) => {
                let origin = format!(
                    "{source} + tern-control {} version {}",
                    ca.address, pushed.version
                );
                let merged = pushed.merge_into(&config).map_err(|(field, message)| {
                    ConfigError::Invalid {
                        origin: origin.clone(),
                        field,
                        message,
                    }
                })?;
                (merged, origin)
            }
            // Validation refuses `discovery` without `identity.ca`.
            (Some(_), _, _) => (config, source.to_owned()),
        };
        let source = source.as_str();
        let version = state.snapshot.as_ref().map_or(1, |s| s.version + 1);
        let mut snapshot =
            Snapshot::compile(config, identity.as_deref(), version, source.to_owned())?;
        if let Some(previous) = &state.snapshot {
            snapshot.keep_rate_limiters(previous);
        }
        let snapshot = Arc::new(snapshot);

        // Keep sockets whose name and configured address did not change; bind the rest.
        let mut bound = Vec::with_capacity(snapshot.listeners.len());
        let mut unbound_ipv6 = Vec::new();
        let mut sockets: Vec<Vec<(usize, std::net::TcpListener)>> =
            self.workers.iter().map(|_| Vec::new()).collect();
        for (index, plan) in snapshot.listeners.iter().enumerate() {
            if !plan.bound {
                continue;
            }
            if matches!(plan.kind, crate::snapshot::ListenerKind::Intercepted(_))
                && plan.configured.is_ipv6()
                && !sys::ipv6_available()
            {
                if !state.unbound_ipv6.contains(&plan.name) {
                    tracing::warn!(listener = %plan.name, "IPv6 is disabled here: no IPv6 interception socket");
                }
                unbound_ipv6.push(plan.name.clone());
                continue;
            }
            let kept = state
                .bound
                .iter()
                .find(|b| b.name == *plan.name && b.configured == plan.configured);
            if let Some(kept) = kept {
                bound.push(kept.clone());
                continue;
            }
            let bind_error = |source| ApplyError::Bind {
                name: plan.name.to_string(),
                address: plan.configured,
                source,
            };
            let mut address = plan.configured;
            for per_worker in &mut sockets {
                let socket = sys::bind_reuseport(address).map_err(bind_error)?;
                address = socket.local_addr().map_err(bind_error)?;
                per_worker.push((index, socket));
            }
            bound.push(BoundListener {
                name: plan.name.to_string(),
                configured: plan.configured,
                address,
            });
        }

        let mut acks = Vec::with_capacity(self.workers.len());
        for (worker, (commands, sockets)) in self.workers.iter().zip(sockets).enumerate() {
            let (applied, ack) = std::sync::mpsc::channel();
            let command = Command::Apply {
                snapshot: snapshot.clone(),
                sockets,
                applied,
            };
            if commands.send(command).is_err() {
                return Err(ApplyError::Worker {
                    worker,
                    message: "the worker has stopped".into(),
                });
            }
            acks.push(ack);
        }
        for (worker, ack) in acks.into_iter().enumerate() {
            match ack.recv_timeout(WORKER_REPLY_TIMEOUT) {
                Ok(Ok(_)) => {}
                Ok(Err(message)) => return Err(ApplyError::Worker { worker, message }),
                Err(_) => {
                    return Err(ApplyError::Worker {
                        worker,
                        message: "no acknowledgement (has it stopped?)".into(),
                    });
                }
            }
        }
        tracing::info!(version, source, listeners = ?bound.iter().map(|b| (&b.name, b.address)).collect::<Vec<_>>(), "config applied");
        if let Some((id, validity)) = &snapshot.identity {
            log_expiry(id, validity);
        }
        state.snapshot = Some(snapshot);
        state.bound = bound;
        state.unbound_ipv6 = unbound_ipv6;
        self.ready.store(true, Ordering::Release);
        Ok(version)
    }

    /// The running snapshot.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.state().snapshot.clone()
    }

    /// The bound listeners.
    pub fn listeners(&self) -> Vec<BoundListener> {
        self.state().bound.clone()
    }

    /// Ready: a config is live and no drain has begun.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining()
    }

    /// Whether a drain has begun.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The number of workers.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Starts the drain (once): workers stop accepting, finish in-flight work within the
    /// drain deadline, then stop.
    pub fn drain(&self) {
        self.drain_within(self.drain_deadline);
    }

    pub(crate) fn drain_within(&self, deadline: Duration) {
        if self.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!(?deadline, "draining");
        for commands in &self.workers {
            let _ = commands.send(Command::Drain { deadline });
        }
    }

    /// Collects and merges every worker's statistics; also returns how many answered.
    pub async fn scrape(&self) -> (WorkerReport, usize) {
        let mut replies = Vec::with_capacity(self.workers.len());
        for commands in &self.workers {
            let (reply, report) = oneshot::channel();
            if commands.send(Command::Scrape(reply)).is_ok() {
                replies.push(report);
            }
        }
        let mut merged = WorkerReport::default();
        let mut answered = 0;
        for report in replies {
            if let Ok(Ok(report)) = tokio::time::timeout(WORKER_REPLY_TIMEOUT, report).await {
                merged.merge(report);
                answered += 1;
            }
        }
        (merged, answered)
    }

    pub(crate) fn set_finished(&self) {
        self.finished.send_replace(true);
    }

    /// Resolves once every worker has stopped.
    pub async fn finished(&self) {
        let mut finished = self.finished.subscribe();
        let _ = finished.wait_for(|done| *done).await;
    }

    /// Listener addresses by name, for logs.
    pub fn addresses(&self) -> HashMap<String, SocketAddr> {
        self.listeners()
            .into_iter()
            .map(|b| (b.name, b.address))
            .collect()
    }
}
