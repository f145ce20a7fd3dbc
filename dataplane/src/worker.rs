//! One worker: a thread pinned to a core, running one IO backend's runtime, owning its
//! listener sockets, connections, upstream pools, statistics, and its share of each
//! cluster's connection limit (what a request at the limit does: [`Worker::upstream_room`]).
//!
//! A worker talks to the rest of the process only through [`Command`]s on its channel: a
//! new config snapshot (with the sockets of new listeners), a scrape, or a drain. A
//! connection never leaves the worker that accepted it, and nothing here is shared with
//! another worker (but the access log's descriptor, which each writes from its own buffer).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::io::{Backend, Listener, Stream};
use crate::metrics::{ClusterStats, Flag, ListenerStats, Registry, WorkerReport};
use crate::proxy;
use crate::proxy::pool::Pool;
use crate::snapshot::{AuthorizationPlan, ListenerKind, ListenerPlan, Snapshot};
use crate::tls::{Handshake, MaybeTls};
use shared::config::Balancing;
use shared::config::Intercept;

/// What the control side asks of a worker.
#[derive(Debug)]
pub enum Command {
    /// Run this snapshot from now on; adopt these sockets (by listener index).
    Apply {
        /// The new config.
        snapshot: Arc<Snapshot>,
        /// One bound socket per listener that is new or moved.
        sockets: Vec<(usize, std::net::TcpListener)>,
        /// Told when the snapshot is live on this worker.
        applied: std::sync::mpsc::Sender<Result<usize, String>>,
    },
    /// Send back a copy of the statistics.
    Scrape(oneshot::Sender<WorkerReport>),
    /// Stop accepting, let open connections finish for up to `deadline`, then end.
    Drain {
        /// How long in-flight work may take.
        deadline: Duration,
    },
}

/// The worker's view of one snapshot: the snapshot plus this worker's handles on its
/// statistics and round-robin positions, index-aligned with the snapshot's tables.
pub struct View {
    /// The config snapshot.
    pub snapshot: Arc<Snapshot>,
    /// Stats per listener index.
    pub listeners: Vec<Rc<ListenerStats>>,
    /// Stats per cluster index.
    pub clusters: Vec<Rc<ClusterStats>>,
    round_robin: Vec<Cell<usize>>,
    /// Endpoints being passed over after failed attempts (the worker's: each view hands it
    /// to the next).
    pub failing: Rc<proxy::balance::Failing>,
    /// Requests under way per endpoint, for least-request clusters (the worker's: each view
    /// hands it to the next).
    load: Rc<proxy::balance::Load>,
    /// xorshift64 state for weighted route splits (per worker; no cryptographic need).
    random: Cell<u64>,
    /// The worker's copies of the snapshot's route regular expressions.
    pub regexes: crate::proxy::route::Regexes,
}

impl View {
    /// A uniformly random `u32` (xorshift64, seeded per view from the process's random
    /// hasher keys).
    pub fn roll(&self) -> u32 {
        let mut x = self.random.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random.set(x);
        (x >> 32) as u32
    }

    /// An HTTP request of `cluster` to `addr`, begun at `started`, ended: answered (`ok`: not
    /// a 5xx) or not (a reset, a timeout). Counted toward ejecting the endpoint where the
    /// cluster has outlier detection ([`proxy::balance::Failing::answered`]).
    pub fn answered(
        &self,
        cluster: usize,
        addr: SocketAddr,
        started: tokio::time::Instant,
        ok: bool,
    ) {
        let Some(plan) = self.snapshot.clusters.get(cluster) else {
            return;
        };
        let Some(policy) = &plan.outlier_detection else {
            return;
        };
        let outliers = (&plan.name, policy, &plan.endpoints[..]);
        if self.failing.answered(outliers, addr, started, ok) {
            self.clusters[cluster].ejected();
        }
    }

    /// The next endpoint of a cluster, round robin, passing over failing ones
    /// ([`proxy::balance`]).
    pub fn next_endpoint(&self, cluster: usize) -> Option<SocketAddr> {
        let plan = self.snapshot.clusters.get(cluster)?;
        let position = self.round_robin.get(cluster)?;
        match plan.balancing {
            Balancing::RoundRobin => self.failing.next(&plan.name, &plan.endpoints, position),
            Balancing::LeastRequest => self.failing.least_of_two(
                (&plan.name, &plan.endpoints),
                &self.load,
                || self.roll(),
                position,
            ),
        }
    }

    /// Counts a request (or connection) of `cluster` under way to `addr` while the guard
    /// lives, where the cluster picks the least loaded endpoint.
    pub fn in_flight(&self, cluster: usize, addr: SocketAddr) -> Option<proxy::balance::InFlight> {
        let plan = self.snapshot.clusters.get(cluster)?;
        (plan.balancing == Balancing::LeastRequest).then(|| self.load.start(addr))
    }
}

/// State of one worker, shared by its tasks (never across threads).
pub struct Worker<B: Backend> {
    /// Worker index, for logs.
    pub id: usize,
    view: RefCell<Rc<View>>,
    /// Open upstream connections of capped clusters, and who waits for room (each worker
    /// enforces its share of a cluster's limit).
    limits: proxy::limit::Limits,
    /// Per-worker upstream HTTP connection pool.
    pub pool: Pool<B>,
    /// Per-worker upstream HTTP/2 connections.
    pub h2: proxy::http2::Pool,
    /// Where unclaimed intercepted destinations go, to be asked about.
    destinations: mpsc::Sender<SocketAddr>,
    /// Destinations asked about that got no answer in time.
    unanswered: RefCell<Unanswered>,
    /// Woken whenever a new snapshot goes live.
    applied: Notify,
    /// Woken when a new snapshot changes a listener's authorization: open connections check
    /// their peer again ([`revoked`]).
    reauthorize: Notify,
    stats: Registry,
    accepting: RefCell<HashMap<Arc<str>, AcceptLoop>>,
    active: Cell<usize>,
    draining: Cell<bool>,
    /// Woken when draining starts, so idle keep-alive connections close.
    drain_started: Notify,
    all_closed: Notify,
    /// The worker's access log, if the proxy keeps one.
    access_log: Option<crate::access_log::AccessLog>,
    /// The worker's spans, if the proxy exports them.
    tracer: Option<crate::trace::Tracer>,
}

struct AcceptLoop {
    address: SocketAddr,
    /// A duplicate of the listening socket, kept to shut it down: shutting a listening
    /// socket completes a pending accept on both backends, which dropping an io_uring op
    /// would not.
    socket: std::net::TcpListener,
    task: tokio::task::JoinHandle<()>,
}

impl AcceptLoop {
    fn stop(self) {
        let _ = socket2::SockRef::from(&self.socket).shutdown(Shutdown::Both);
        self.task.abort();
    }
}

/// Whether a connection found for a request at its cluster's connection limit is taken
/// from those waiting for room ([`Worker::upstream_room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// It serves one request at a time (a pooled HTTP/1.1 connection): a newcomer leaves
    /// it to those already waiting.
    Exclusive,
    /// It carries many at once (an HTTP/2 connection): a newcomer takes a place on it even
    /// while others wait, taking nothing from them.
    Shared,
}

/// Room for a new upstream connection ([`Worker::upstream_room`]).
#[derive(Debug)]
pub enum Room<T> {
    /// Make one, holding this slot under the cluster's limit (none: the cluster has none).
    Slot(Option<proxy::limit::Slot>),
    /// Use this connection the caller's `reuse` found instead.
    Reuse(T),
}

/// Counts a connection for the whole of its life.
pub struct ConnectionGuard<B: Backend> {
    worker: Rc<Worker<B>>,
    stats: Rc<ListenerStats>,
}

impl<B: Backend> Drop for ConnectionGuard<B> {
    fn drop(&mut self) {
        self.stats.connection_closed();
        let active = self.worker.active.get().saturating_sub(1);
        self.worker.active.set(active);
        if active == 0 && self.worker.draining.get() {
            self.worker.all_closed.notify_one();
        }
    }
}

impl<B: Backend> Worker<B> {
    fn new(
        (id, workers): (usize, usize),
        snapshot: Arc<Snapshot>,
        destinations: mpsc::Sender<SocketAddr>,
        access_log: Option<Arc<std::fs::File>>,
        trace: Option<Arc<crate::trace::Exporter>>,
    ) -> Rc<Worker<B>> {
        let stats = Registry::default();
        let view = Rc::new(make_view(
            &stats,
            (&Rc::default(), &Rc::default()),
            snapshot,
        ));
        Rc::new(Worker {
            id,
            view: RefCell::new(view),
            limits: proxy::limit::Limits::new(id, workers),
            pool: Pool::default(),
            h2: proxy::http2::Pool::default(),
            destinations,
            unanswered: RefCell::default(),
            applied: Notify::new(),
            reauthorize: Notify::new(),
            stats,
            accepting: RefCell::default(),
            active: Cell::new(0),
            draining: Cell::new(false),
            drain_started: Notify::new(),
            all_closed: Notify::new(),
            access_log: access_log.map(crate::access_log::AccessLog::new),
            tracer: trace.as_deref().map(crate::trace::Tracer::new),
        })
    }

    /// The worker's access log, if the proxy keeps one.
    pub fn access_log(&self) -> Option<&crate::access_log::AccessLog> {
        self.access_log.as_ref()
    }

    /// The worker's tracer, if the proxy exports spans.
    pub fn tracer(&self) -> Option<&crate::trace::Tracer> {
        self.tracer.as_ref()
    }

    /// The worker's current config and statistics handles.
    pub fn view(&self) -> Rc<View> {
        self.view.borrow().clone()
    }

    /// Whether a drain has begun: connections finish what is in flight, then close.
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Whether connections of `view`'s `cluster` to `addr` belong in this worker's pools,
    /// which hold connections for the live config: always under it; under an older one only
    /// where the live config still reaches `addr` for the cluster as it did (a config that
    /// went live meanwhile may have dropped the endpoint or changed what the cluster asks of
    /// it).
    pub fn pools(&self, view: &View, cluster: usize, addr: SocketAddr) -> bool {
        let live = self.view.borrow();
        if std::ptr::eq(&**live, view) {
            return true;
        }
        let Some(plan) = view.snapshot.clusters.get(cluster) else {
            return false;
        };
        proxy::pool::carried_over(&view.snapshot, &live.snapshot, &plan.name, addr)
    }

    /// Whether requests wait for room under `cluster`'s connection limit: a newcomer does
    /// not take a pooled connection (offered to the first of them) ahead of them.
    pub fn waiting_for_room(&self, view: &View, cluster: usize) -> bool {
        self.live_limit(view, cluster)
            .is_some_and(|(name, _)| self.limits.has_waiters(name))
    }

    /// The name and connection limit of `view`'s `cluster` in the live config, if it caps
    /// the cluster there: a request still under an older config counts under the live cap.
    fn live_limit<'v>(
        &self,
        view: &'v View,
        cluster: usize,
    ) -> Option<(&'v Arc<str>, shared::config::ConnectionLimit)> {
        let plan = view.snapshot.clusters.get(cluster)?;
        let live = self.view.borrow();
        if std::ptr::eq(&**live, view) {
            return Some((&plan.name, plan.connection_limit?));
        }
        let limit = live.snapshot.cluster_named(&plan.name)?.connection_limit?;
        Some((&plan.name, limit))
    }

    /// Room for a new upstream connection of `cluster`, where the live config caps the
    /// cluster's connections ([`proxy::limit`]): a free slot; else a connection `reuse`
    /// finds (one of the cluster's, to any endpoint, for the caller to use instead) or a
    /// slot freed by closing one of the cluster's idle pooled connections; else, in turn and
    /// up to the cluster's connect timeout, the first of those to come. While others wait,
    /// a newcomer queues behind them, unless what `reuse` finds is [`Sharing::Shared`]. An
    /// overflow is counted on the cluster.
    pub async fn upstream_room<T>(
        &self,
        view: &View,
        cluster: usize,
        mut reuse: impl FnMut() -> Option<T>,
        sharing: Sharing,
    ) -> Result<Room<T>, proxy::limit::Overflow> {
        let Some((name, limit)) = self.live_limit(view, cluster) else {
            return Ok(Room::Slot(None));
        };
        let connect_timeout = view.snapshot.clusters[cluster].connect_timeout;
        let counts = self.limits.cluster(name, limit);
        if let Some(slot) = counts.free_slot() {
            return Ok(Room::Slot(Some(slot)));
        }
        let evict = || self.pool.evict_idle(name) || self.h2.evict_idle(name);
        if (sharing == Sharing::Shared || !counts.has_waiters())
            && let Some(found) = reuse()
        {
            return Ok(Room::Reuse(found));
        }
        if !counts.has_waiters() {
            evict();
            // Also catches slots that `reuse` freed, closing expired connections.
            if let Some(slot) = counts.free_slot() {
                return Ok(Room::Slot(Some(slot)));
            }
        }
        let stats = &view.clusters[cluster];
        let overflow = || {
            stats.overflowed();
            tracing::debug!(cluster = %name, "no room for an upstream connection under the cluster's limit");
            proxy::limit::Overflow
        };
        let waiting = counts.queue().map_err(|_| overflow())?;
        let pending = stats.pending();
        let turn = async {
            loop {
                waiting.changed().await;
                if let Some(found) = reuse() {
                    return Room::Reuse(found);
                }
                let slot = waiting.slot().or_else(|| {
                    evict();
                    waiting.slot()
                });
                if slot.is_some() {
                    return Room::Slot(slot);
                }
            }
        };
        let room = tokio::time::timeout(connect_timeout, turn).await;
        drop((pending, waiting));
        // The wake-up this waiter had may have been meant for what it did not take.
        counts.pass_on();
        room.map_err(|_| overflow())
    }

    /// Resolves when a drain begins (immediately if one has).
    pub async fn drain_started(&self) {
        if !self.draining.get() {
            self.drain_started.notified().await;
        }
    }

    fn apply(
        self: &Rc<Self>,
        snapshot: Arc<Snapshot>,
        sockets: Vec<(usize, std::net::TcpListener)>,
    ) -> Result<usize, String> {
        // The endpoints being passed over carry over to the new view.
        let current = self.view();
        let failing = current.failing.clone();
        failing.retain(
            |addr| snapshot.clusters.iter().any(|c| c.endpoints.contains(addr)),
            |cluster, addr| {
                snapshot
                    .cluster_named(cluster)
                    .is_some_and(|c| c.outlier_detection.is_some() && c.endpoints.contains(addr))
            },
        );
        let carried = (&failing, &current.load);
        *self.view.borrow_mut() = Rc::new(make_view(&self.stats, carried, snapshot.clone()));
        self.pool.retain_for(&current.snapshot, &snapshot);
        self.h2.retain_for(&current.snapshot, &snapshot);
        self.limits
            .apply(|name| snapshot.cluster_named(name)?.connection_limit);
        let reauthorize = snapshot.listeners.iter().any(|l| {
            current
                .snapshot
                .listener_index(&l.name)
                .is_some_and(|i| current.snapshot.listeners[i].authorization != l.authorization)
        });
        drop(current);
        self.applied.notify_waiters();
        if reauthorize {
            self.reauthorize.notify_waiters();
        }
        let mut accepting = self.accepting.borrow_mut();
        // Stop listeners that are gone, or whose socket is being replaced.
        let replaced: Vec<Arc<str>> = accepting
            .keys()
            .filter(|name| {
                snapshot
                    .listener_index(name)
                    .is_none_or(|i| sockets.iter().any(|(j, _)| *j == i))
            })
            .cloned()
            .collect();
        for name in replaced {
            if let Some(old) = accepting.remove(&name) {
                tracing::debug!(worker = self.id, listener = %name, "listener stopped");
                old.stop();
            }
        }
        for (index, socket) in sockets {
            let Some(plan) = snapshot.listeners.get(index) else {
                continue;
            };
            let address = socket
                .local_addr()
                .map_err(|e| format!("listener {}: {e}", plan.name))?;
            let dup = socket
                .try_clone()
                .map_err(|e| format!("listener {}: {e}", plan.name))?;
            let listener =
                B::listener(socket).map_err(|e| format!("listener {}: {e}", plan.name))?;
            let task =
                tokio::task::spawn_local(accept_loop(self.clone(), plan.name.clone(), listener));
            accepting.insert(
                plan.name.clone(),
                AcceptLoop {
                    address,
                    socket: dup,
                    task,
                },
            );
        }
        Ok(accepting.len())
    }

    async fn drain(&self, deadline: Duration) {
        self.draining.set(true);
        for (_, accept) in self.accepting.borrow_mut().drain() {
            accept.stop();
        }
        self.drain_started.notify_waiters();
        self.pool.clear();
        self.h2.clear();
        if self.active.get() > 0 {
            let finished = tokio::time::timeout(deadline, self.all_closed.notified()).await;
            if finished.is_err() {
                tracing::warn!(
                    worker = self.id,
                    open = self.active.get(),
                    "drain deadline passed; closing open connections"
                );
            }
        }
    }

    /// Addresses this worker accepts on, by listener name.
    fn addresses(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.accepting
            .borrow()
            .iter()
            .map(|(name, a)| (name.clone(), a.address))
            .collect()
    }
}

fn make_view(
    stats: &Registry,
    (failing, load): (&Rc<proxy::balance::Failing>, &Rc<proxy::balance::Load>),
    snapshot: Arc<Snapshot>,
) -> View {
    View {
        failing: failing.clone(),
        load: load.clone(),
        listeners: snapshot
            .listeners
            .iter()
            .map(|l| stats.listener(&l.name))
            .collect(),
        clusters: snapshot
            .clusters
            .iter()
            .map(|c| stats.cluster(&c.name))
            .collect(),
        // Each cluster's rotation starts at a random endpoint, so the workers (and the
        // proxies) do not all start at the first after every config change (a rollout makes
        // many), sending it a burst.
        round_robin: snapshot
            .clusters
            .iter()
            .map(|_| Cell::new(random_seed() as usize))
            .collect(),
        // xorshift must not start at 0.
        random: Cell::new(random_seed() | 1),
        regexes: snapshot.regexes.for_worker(),
        snapshot,
    }
}

/// A seed from the process's randomly keyed hasher.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    hasher.finish()
}

async fn accept_loop<B: Backend>(worker: Rc<Worker<B>>, name: Arc<str>, listener: B::Listener) {
    let failures = crate::metrics::Pace::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                if worker.draining() || !worker.accepting.borrow().contains_key(&name) {
                    return;
                }
                // EMFILE and friends: back off instead of spinning.
                if let Some(held_back) = failures.admit() {
                    tracing::warn!(worker = worker.id, listener = %name, %error, held_back, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let view = worker.view.borrow().clone();
        let Some(index) = view.snapshot.listener_index(&name) else {
            return;
        };
        let stats = view.listeners[index].clone();
        stats.connection_opened();
        worker.active.set(worker.active.get() + 1);
        let guard = ConnectionGuard {
            worker: worker.clone(),
            stats,
        };
        tokio::task::spawn_local(async move {
            let _guard = guard;
            let worker = _guard.worker.clone();
            serve(&worker, &view, index, stream, peer).await;
        });
    }
}

/// The most a permissive port reads to see a whole first TLS record (16 KiB and a header).
const MAX_FIRST_RECORD: usize = crate::usertls::HEADER + crate::usertls::MAX_FRAGMENT;

/// How long a connection to a destination no listener claims waits while `tern-control` is
/// asked about it (the first connection to each new destination).
const DISCOVERY_WAIT: Duration = Duration::from_secs(2);

/// How long a destination that got no answer is not waited for again.
const UNANSWERED_FOR: Duration = Duration::from_secs(30);
/// Most unanswered destinations a worker remembers.
const MAX_UNANSWERED: usize = 4096;

/// Destinations asked about that got no answer in time, each with when it may be waited for
/// again: until then a connection to it gets the outbound policy at once. At most
/// [`MAX_UNANSWERED`]; when full, expired entries go, and if none has, the newest is not kept.
#[derive(Default)]
struct Unanswered(HashMap<SocketAddr, tokio::time::Instant>);

impl Unanswered {
    /// Whether `to` went unanswered within [`UNANSWERED_FOR`] of `now`.
    fn lately(&self, to: SocketAddr, now: tokio::time::Instant) -> bool {
        self.0.get(&to).is_some_and(|until| *until > now)
    }

    /// `to` got no answer by `at`.
    fn remember(&mut self, to: SocketAddr, at: tokio::time::Instant) {
        if self.0.len() >= MAX_UNANSWERED {
            self.0.retain(|_, until| *until > at);
        }
        if self.0.len() < MAX_UNANSWERED {
            self.0.insert(to, at + UNANSWERED_FOR);
        }
    }
}

/// The listener claiming `to` in `view`, if any.
fn claim(view: &View, direction: Intercept, to: SocketAddr) -> Option<usize> {
    view.snapshot
        .intercept
        .as_ref()
        .and_then(|i| i.claim(direction, to))
}

/// Asks `tern-control` about an outbound destination no listener claims (through the
/// discovery client) and waits, up to [`DISCOVERY_WAIT`], for a config that claims it;
/// returns that config and the claiming listener. `None` at once when there is nobody to
/// ask, the destination is known to be outside the mesh, or it went unanswered lately; and
/// when the answer is that it is outside, or none comes in time.
async fn discover<B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &View,
    to: SocketAddr,
) -> Option<(Rc<View>, usize)> {
    let plan = view.snapshot.intercept.as_ref()?;
    // Only `tern-control` supplies listeners, so only with it is a destination worth asking
    // about.
    if view.snapshot.config.discovery.is_none() || plan.is_outside(to) {
        return None;
    }
    let now = tokio::time::Instant::now();
    if worker.unanswered.borrow().lately(to, now) {
        return None;
    }
    // A full queue means the discovery client is behind (or tern-control away): this
    // destination is not asked about, the connection waits as any other, and, unanswered,
    // is not waited for again for a while.
    let _ = worker.destinations.try_send(to);
    let deadline = now + DISCOVERY_WAIT;
    loop {
        let applied = worker.applied.notified();
        let mut applied = std::pin::pin!(applied);
        applied.as_mut().enable();
        let current = worker.view();
        if let Some(claimed) = claim(&current, Intercept::Outbound, to) {
            return Some((current, claimed));
        }
        if current
            .snapshot
            .intercept
            .as_ref()
            .is_some_and(|i| i.is_outside(to))
        {
            return None;
        }
        if tokio::time::timeout_at(deadline, applied).await.is_err() {
            tracing::debug!(%to, "no word from tern-control about this destination in time");
            worker.unanswered.borrow_mut().remember(to, deadline);
            return None;
        }
    }
}

/// Counts a connection on a listener it was handed to (an intercepted destination) for as
/// long as it lasts.
struct Claimed(Rc<ListenerStats>);

impl Drop for Claimed {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// Serves one accepted connection: finds the listener an intercepted one belongs to,
/// terminates mTLS where that listener asks for it, and runs what the listener speaks.
async fn serve<B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &Rc<View>,
    accepted: usize,
    stream: B::Stream,
    peer: SocketAddr,
) {
    let mut view = view.clone();
    let mut index = accepted;
    let mut original = None;
    if let ListenerKind::Intercepted(direction) = view.snapshot.listeners[accepted].kind {
        let plan = &view.snapshot.listeners[accepted];
        let to = match stream.original_destination() {
            // A connection made straight to the interception port (not redirected) would
            // loop back to it.
            Ok(to) if to.port() != plan.configured.port() => to,
            Ok(_) | Err(_) => {
                if let Some(held_back) = view.listeners[accepted].error_to_log(Flag::NoRoute) {
                    tracing::warn!(listener = %plan.name, %peer, held_back, "connection without an intercepted destination refused");
                }
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        };
        original = Some(to);
        match claim(&view, direction, to) {
            Some(claimed) => index = claimed,
            None if direction == Intercept::Outbound => {
                // Served under the newer config that claims it, as the listener it names;
                // else as it was accepted (its outbound policy).
                if let Some((current, claimed)) = discover(worker, &view, to).await {
                    view = current;
                    index = claimed;
                }
            }
            None => {}
        }
    }
    let view = &view;
    let claimed = original.is_some()
        && !matches!(
            view.snapshot.listeners[index].kind,
            ListenerKind::Intercepted(_)
        );
    let _claimed = claimed.then(|| {
        let stats = view.listeners[index].clone();
        stats.connection_opened();
        Claimed(stats)
    });
    let plan = &view.snapshot.listeners[index];
    let stats = &view.listeners[index];
    let detect_timeout = view.snapshot.config.detect_timeout;
    let access_log = worker.access_log();
    let Some((down, inner, caller)) =
        terminate_tls::<B>(plan, stats, access_log, stream, peer, detect_timeout).await
    else {
        return;
    };
    let caller = Rc::new(caller);
    // A connection to a listener that terminates mTLS is closed when a new config's
    // authorization lets its peer do less than it has been let do, whatever it carries.
    let watch = plan.tls.as_ref().and_then(|_| down.duplicate());
    let serving = async {
        match &plan.kind {
            ListenerKind::Tcp { cluster } => {
                proxy::tcp::serve(worker, view, index, *cluster, down, Vec::new(), &caller).await;
            }
            ListenerKind::Http(_) => {
                proxy::detect::serve(worker, view, index, None, down, caller.clone(), inner).await;
            }
            ListenerKind::Detect { cluster, .. } => {
                let cluster = Some(*cluster);
                proxy::detect::serve(worker, view, index, cluster, down, caller.clone(), inner)
                    .await;
            }
            ListenerKind::Intercepted(direction) => {
                if let Some(original) = original {
                    let to = (*direction, original);
                    proxy::intercept::passthrough(worker, view, index, to, down, &caller).await;
                }
            }
        }
    };
    let Some(socket) = watch else {
        return serving.await;
    };
    let mut serving = std::pin::pin!(serving);
    let identity = caller.identity.as_ref();
    tokio::select! {
        biased;
        () = revoked(worker, view.clone(), index, identity) => {
            if let Some(held_back) = stats.revoked_to_log() {
                let identity = identity.map_or_else(|| "none (plaintext)".to_owned(), ToString::to_string);
                tracing::warn!(listener = %plan.name, %peer, %identity, held_back, "open connection closed: the listener's new authorization lets this peer do less");
            }
            // Its reads and writes fail from now on, and it winds down as after any error.
            let _ = socket2::SockRef::from(&socket).shutdown(Shutdown::Both);
            serving.await;
        }
        () = serving.as_mut() => {}
    }
}

/// Resolves once a new config lets a peer with `identity` do less on listener `index` of
/// `view` (the one its connection was accepted under; found by name in later ones) than the
/// config before it did ([`crate::snapshot::AuthorizationPlan::narrows`]): a policy added or
/// narrowed. Never otherwise, nor while the listener is gone (its connections run on as they
/// were).
async fn revoked<B: Backend>(
    worker: &Worker<B>,
    view: Rc<View>,
    index: usize,
    identity: Option<&shared::SpiffeId>,
) {
    let (mut before, mut index) = (view, index);
    loop {
        let changed = worker.reauthorize.notified();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        let now = worker.view();
        let name = &before.snapshot.listeners[index].name;
        if let Some(i) = now.snapshot.listener_index(name) {
            let was = before.snapshot.listeners[index].authorization.as_ref();
            let is = now.snapshot.listeners[i].authorization.as_ref();
            if AuthorizationPlan::narrows(was, is, identity) {
                return;
            }
            (before, index) = (now, i);
        }
        changed.await;
    }
}

/// Runs the server side of mTLS on a listener that requires it: the peer must present a
/// certificate from the trust bundle and ask for what the listener speaks (ALPN; a `detect`
/// listener or an interception socket takes either). Returns the stream, what the peer said
/// is inside (under mTLS), and who the peer is. HTTP is let in or turned away request by request; a peer not let in for everything
/// whose connection cannot carry HTTP is closed here, before anything more is spent on it (on a `detect`
/// listener, [`proxy::detect`] closes what turns out not to be HTTP).
async fn terminate_tls<B: Backend>(
    plan: &ListenerPlan,
    stats: &ListenerStats,
    access_log: Option<&crate::access_log::AccessLog>,
    stream: B::Stream,
    peer: SocketAddr,
    detect_timeout: Duration,
) -> Option<(MaybeTls<B::Stream>, Option<proxy::Inner>, proxy::Caller)> {
    // Whether the connection goes on: `false` (counted and logged) when the listener's
    // authorization does not let `caller` in for everything and `inner` cannot be HTTP.
    let let_in = |caller: &proxy::Caller, inner: Option<proxy::Inner>| {
        let may_be_http = match plan.kind {
            ListenerKind::Http(_) => true,
            ListenerKind::Detect { .. } => inner != Some(proxy::Inner::Tcp),
            ListenerKind::Tcp { .. } | ListenerKind::Intercepted(_) => false,
        };
        if !may_be_http && !caller.admitted(plan) {
            caller.refuse_connection(plan, stats, access_log, 0);
            return false;
        }
        true
    };
    let plaintext = |down: MaybeTls<B::Stream>, inner: Option<proxy::Inner>| {
        let caller = proxy::Caller::new(peer, None);
        if !let_in(&caller, inner) {
            let _ = down.shutdown(Shutdown::Both);
            return None;
        }
        Some((down, inner, caller))
    };
    let Some(tls) = &plan.tls else {
        return plaintext(MaybeTls::Plain(stream), None);
    };
    let refuse = |why: &dyn std::fmt::Display| {
        if let Some(held_back) = stats.error_to_log(Flag::TlsHandshake) {
            tracing::warn!(listener = %plan.name, %peer, %why, held_back, "mTLS refused");
        }
    };
    let mut first = Vec::new();
    if tls.permissive {
        use proxy::detect::{FirstBytes, read_first};
        // A client silent for the detection timeout is plaintext (a protocol whose server
        // speaks first), passed on as opaque TCP.
        let deadline = tokio::time::Instant::now() + detect_timeout;
        let any = |bytes: &[u8]| (!bytes.is_empty()).then_some(());
        match read_first(&stream, &mut first, deadline, 1, any).await {
            FirstBytes::Told(()) => {}
            FirstBytes::TimedOut => {
                stats.detected(crate::metrics::Detected::Timeout);
                tracing::debug!(listener = %plan.name, %peer, "silent client on a permissive port: plaintext");
                return plaintext(MaybeTls::Plain(stream), Some(proxy::Inner::Tcp));
            }
            FirstBytes::Ended => {
                tracing::debug!(listener = %plan.name, %peer, "connection ended before its first byte");
                return None;
            }
        }
        // A ClientHello offering a mesh ALPN is a peer sidecar; anything else (plaintext,
        // or the application's own TLS) passes as it is. Read the whole first record.
        let deadline = tokio::time::Instant::now() + tls.handshake_timeout;
        let whole = |bytes: &[u8]| match crate::tls::classify_hello(bytes) {
            crate::tls::Hello::Partial => None,
            hello => Some(hello),
        };
        let hello = read_first(&stream, &mut first, deadline, MAX_FIRST_RECORD, whole).await;
        if hello != FirstBytes::Told(crate::tls::Hello::Mesh) {
            tracing::debug!(listener = %plan.name, %peer, "plaintext (or the application's own TLS) on a permissive port");
            let sniffed = MaybeTls::Sniffed(stream, std::cell::RefCell::new(first));
            return plaintext(sniffed, None);
        }
    }
    let accepted = match Handshake::server(stream, tls.config.clone(), first) {
        Ok(handshake) => handshake.run_within(tls.handshake_timeout).await,
        Err(error) => Err(error),
    };
    let stream = match accepted {
        Ok(stream) => stream,
        Err(error) => {
            refuse(&error);
            return None;
        }
    };
    let alpn = stream.alpn();
    let inner = match alpn.as_deref() {
        Some(crate::tls::ALPN_TCP) => Some(proxy::Inner::Tcp),
        Some(crate::tls::ALPN_HTTP1) => Some(proxy::Inner::Http1),
        Some(crate::tls::ALPN_HTTP2) => Some(proxy::Inner::Http2),
        _ => None,
    };
    let accepts = match plan.kind {
        ListenerKind::Tcp { .. } => inner == Some(proxy::Inner::Tcp),
        ListenerKind::Http(_) => {
            matches!(inner, Some(proxy::Inner::Http1 | proxy::Inner::Http2))
        }
        ListenerKind::Detect { .. } | ListenerKind::Intercepted(_) => inner.is_some(),
    };
    if !accepts {
        refuse(&format_args!(
            "peer asked for ALPN {:?}, which the listener does not speak",
            alpn.map(|a| String::from_utf8_lossy(&a).into_owned()),
        ));
        let _ = stream.shutdown(Shutdown::Both);
        return None;
    }
    let caller = proxy::Caller::new(peer, stream.peer_id());
    let identity = caller.identity.as_ref().map(ToString::to_string);
    if let Some(identity) = &identity {
        stats.peer(identity);
    }
    if !let_in(&caller, inner) {
        let _ = stream.shutdown(Shutdown::Both);
        return None;
    }
    let stream = match stream.into_record_layer() {
        Ok(stream) => stream,
        Err(error) => {
            refuse(&format_args!(
                "the TLS record layer could not take over: {error}"
            ));
            return None;
        }
    };
    if let Some(mode) = stream.tls_mode() {
        stats.tls_mode(mode);
    }
    tracing::debug!(listener = %plan.name, %peer, identity = identity.as_deref().unwrap_or("?"), mode = ?stream.tls_mode(), "mTLS accepted");
    Some((stream, inner, caller))
}

/// Everything a worker thread needs to start.
pub struct Spawn {
    /// Worker index.
    pub id: usize,
    /// How many workers the proxy runs.
    pub workers: usize,
    /// CPU to pin to, if any.
    pub cpu: Option<usize>,
    /// The scheduler time slice to ask for ([`crate::Options::worker_slice`]).
    pub slice: Option<Duration>,
    /// The first snapshot.
    pub snapshot: Arc<Snapshot>,
    /// Commands from the control side.
    pub commands: mpsc::UnboundedReceiver<Command>,
    /// Where unclaimed intercepted destinations go ([`crate::control::Control`]).
    pub destinations: mpsc::Sender<SocketAddr>,
    /// Where the access log goes, if the proxy keeps one.
    pub access_log: Option<Arc<std::fs::File>>,
    /// Where spans go, if the proxy exports them.
    pub trace: Option<Arc<crate::trace::Exporter>>,
}

/// Runs `tick` on the worker every `period`, from now on (a tick missed while the worker was
/// busy waits a whole period rather than coming at once).
fn every<B: Backend>(worker: &Rc<Worker<B>>, period: Duration, tick: fn(&Worker<B>)) {
    let worker = worker.clone();
    tokio::task::spawn_local(async move {
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            tick(&worker);
        }
    });
}

/// Runs a worker on the current thread until it has drained.
pub fn run<B: Backend>(spawn: Spawn) -> std::io::Result<()> {
    let Spawn {
        id,
        workers,
        cpu,
        slice,
        snapshot,
        mut commands,
        destinations,
        access_log,
        trace,
    } = spawn;
    if let Some(cpu) = cpu
        && let Err(error) = crate::sys::pin_current_thread(cpu)
    {
        tracing::warn!(worker = id, cpu, %error, "could not pin worker");
    }
    if let Some(slice) = slice {
        let nanos = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
        if let Err(error) = crate::sys::set_thread_slice(nanos) {
            tracing::warn!(worker = id, ?slice, %error, "could not set the worker's scheduler slice");
        }
    }
    B::block_on(async move {
        let worker = Worker::<B>::new((id, workers), snapshot, destinations, access_log, trace);
        if worker.access_log().is_some() {
            every(&worker, crate::access_log::FLUSH_EVERY, |worker| {
                if let Some(log) = worker.access_log() {
                    log.flush();
                }
            });
        }
        if worker.tracer().is_some() {
            every(&worker, crate::trace::FLUSH_EVERY, |worker| {
                if let Some(tracer) = worker.tracer() {
                    tracer.flush();
                }
            });
        }
        tracing::debug!(
            worker = id,
            backend = B::KIND.as_str(),
            ?cpu,
            "worker started"
        );
        while let Some(command) = commands.recv().await {
            match command {
                Command::Apply {
                    snapshot,
                    sockets,
                    applied,
                } => {
                    let version = snapshot.version;
                    let result = worker.apply(snapshot, sockets);
                    tracing::debug!(worker = id, version, addresses = ?worker.addresses(), "snapshot applied");
                    let _ = applied.send(result);
                }
                Command::Scrape(reply) => {
                    let mut report = worker.stats.report();
                    report.access_log_dropped = worker.access_log().map_or(0, |log| log.dropped());
                    report.trace_dropped = worker.tracer().map_or(0, |t| t.dropped());
                    let _ = reply.send(report);
                }
                Command::Drain { deadline } => {
                    worker.drain(deadline).await;
                    if let Some(log) = worker.access_log() {
                        log.flush();
                    }
                    if let Some(tracer) = worker.tracer() {
                        tracer.flush();
                    }
                    break;
                }
            }
        }
        tracing::debug!(worker = id, "worker stopped");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn an_unanswered_destination_is_not_waited_for_again_for_30_seconds() {
        let mut unanswered = Unanswered::default();
        let at = tokio::time::Instant::now();
        assert!(!unanswered.lately(destination(80), at));
        unanswered.remember(destination(80), at);
        assert!(unanswered.lately(destination(80), at));
        assert!(unanswered.lately(destination(80), at + Duration::from_secs(29)));
        assert!(!unanswered.lately(destination(80), at + UNANSWERED_FOR));
        assert!(
            !unanswered.lately(destination(81), at),
            "other destinations are still asked about"
        );
    }

    #[test]
    fn the_memory_is_bounded_and_makes_room_from_what_expired() {
        let mut unanswered = Unanswered::default();
        let start = tokio::time::Instant::now();
        for port in 0..MAX_UNANSWERED as u16 {
            unanswered.remember(destination(port), start);
        }
        // Full, and nothing expired yet: the newest is not kept.
        let soon = start + Duration::from_secs(1);
        unanswered.remember(destination(u16::MAX), soon);
        assert!(!unanswered.lately(destination(u16::MAX), soon));
        assert!(unanswered.lately(destination(0), soon));
        // Once the old ones expire, they make room.
        let later = start + UNANSWERED_FOR + Duration::from_secs(1);
        unanswered.remember(destination(u16::MAX), later);
        assert!(unanswered.lately(destination(u16::MAX), later));
        assert_eq!(unanswered.0.len(), 1);
    }
}
