//! Per-worker statistics and their Prometheus text exposition.
//!
//! Each worker owns its counters and HDR latency histograms outright (`Cell`s and a
//! `RefCell`, no atomics, no locks): nothing is shared across cores on the data path. The
//! admin thread asks every worker for a [`WorkerReport`] at scrape time, merges them by
//! name, and renders the text format; latency quantiles come from the merged histogram, so
//! p99.9 is exact to the histogram's three significant digits, not a bucket guess.
//!
//! Warnings a peer can cause once per connection or request are paced here too ([`Pace`]):
//! the counters count every one, the log gets a line a second.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Histogram range: 1 µs to 60 s, three significant digits.
const LATENCY_MAX_MICROS: u64 = 60_000_000;
const LATENCY_SIGFIG: u8 = 3;

/// Quantiles exposed for every latency histogram.
const QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];

/// Why a request or connection did not get a normal upstream response. The short code is
/// both the `flag` metric label and the `x-tern-response-flag` header of generated replies
/// (after Envoy's response flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flag {
    /// No route matched the request: 404.
    NoRoute,
    /// No connection to any upstream endpoint could be made: 503.
    UpstreamConnectFailure,
    /// No upstream connection was free under the cluster's connection limit, and no more
    /// requests could wait for one (or none came free in time): 503.
    UpstreamOverflow,
    /// The upstream did not answer within the route timeout: 504.
    UpstreamTimeout,
    /// The upstream closed or reset the connection mid-exchange: 502.
    UpstreamReset,
    /// The upstream sent a malformed response: 502.
    UpstreamProtocolError,
    /// The client sent a malformed request: 400.
    DownstreamProtocolError,
    /// The client exceeded a header, line or count limit: 414 or 431.
    DownstreamLimit,
    /// The client took too long to send its request head: 408.
    DownstreamTimeout,
    /// The client closed or reset the connection mid-exchange.
    DownstreamReset,
    /// An opaque TCP connection was closed for inactivity.
    IdleTimeout,
    /// A peer failed the mTLS handshake: plaintext on an mTLS port, an untrusted or expired
    /// certificate, the wrong identity, or no handshake in time.
    TlsHandshake,
    /// The listener's authorization does not let the peer's identity (or its lack of one)
    /// in: an HTTP request is answered 403, any other connection closed.
    Unauthorized,
    /// The listener's rate limit had no room for the request: 429.
    RateLimited,
}

impl Flag {
    /// Every flag, in label order.
    pub const ALL: [Flag; 14] = [
        Flag::NoRoute,
        Flag::UpstreamConnectFailure,
        Flag::UpstreamOverflow,
        Flag::UpstreamTimeout,
        Flag::UpstreamReset,
        Flag::UpstreamProtocolError,
        Flag::DownstreamProtocolError,
        Flag::DownstreamLimit,
        Flag::DownstreamTimeout,
        Flag::DownstreamReset,
        Flag::IdleTimeout,
        Flag::TlsHandshake,
        Flag::Unauthorized,
        Flag::RateLimited,
    ];

    /// The short code.
    pub fn code(self) -> &'static str {
        match self {
            Flag::NoRoute => "NR",
            Flag::UpstreamConnectFailure => "UF",
            Flag::UpstreamOverflow => "UO",
            Flag::UpstreamTimeout => "UT",
            Flag::UpstreamReset => "UC",
            Flag::UpstreamProtocolError => "UPE",
            Flag::DownstreamProtocolError => "DPE",
            Flag::DownstreamLimit => "DLE",
            Flag::DownstreamTimeout => "DT",
            Flag::DownstreamReset => "DC",
            Flag::IdleTimeout => "IT",
            Flag::TlsHandshake => "TLS",
            Flag::Unauthorized => "RBAC",
            Flag::RateLimited => "RL",
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; the fallback is never taken.
    Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, LATENCY_SIGFIG)
        .unwrap_or_else(|_| Histogram::new(LATENCY_SIGFIG).unwrap_or_else(|_| unreachable!()))
}

/// How often one kind of warning that a peer can cause once per connection (a refused
/// peer, a failed handshake) is logged for one listener or cluster on one worker; the
/// metrics count every one.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Paces one kind of warning to a line per [`WARN_EVERY`], so that a client retrying in a
/// loop, or a scanner, cannot flood the log.
#[derive(Debug, Default)]
pub struct Pace {
    last: Cell<Option<Instant>>,
    held_back: Cell<u64>,
}

impl Pace {
    /// Whether to log a line now: `Some(lines held back since the last one)`, or `None`
    /// (this one is held back).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        if self
            .last
            .get()
            .is_some_and(|last| now.saturating_duration_since(last) < WARN_EVERY)
        {
            bump(&self.held_back, 1);
            return None;
        }
        self.last.set(Some(now));
        Some(self.held_back.replace(0))
    }
}

fn bump(cell: &Cell<u64>, by: u64) {
    cell.set(cell.get().wrapping_add(by));
}

/// One request or connection waiting for room under its cluster's limit
/// ([`ClusterStats::pending`]).
#[derive(Debug)]
pub struct Pending<'a>(&'a ClusterStats);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.set(self.0.pending.get().saturating_sub(1));
    }
}

/// Counters of one listener on one worker.
#[derive(Debug)]
pub struct ListenerStats {
    connections: Cell<u64>,
    active: Cell<u64>,
    requests: Cell<u64>,
    responses: [Cell<u64>; 5],
    errors: [Cell<u64>; Flag::ALL.len()],
    /// The warning lines of each flag's errors.
    warnings: [Pace; Flag::ALL.len()],
    /// The warning lines of open connections closed when a new authorization shut their
    /// peer out (a config change, not a peer, causes them; counted as `Unauthorized`).
    revocations: Pace,
    bytes_received: Cell<u64>,
    bytes_sent: Cell<u64>,
    latency: RefCell<Histogram<u64>>,
    /// mTLS connections by the peer's SPIFFE ID.
    peers: RefCell<BTreeMap<String, u64>>,
    /// mTLS connections by where the record layer runs: `[kernel, userspace]`.
    tls_modes: [Cell<u64>; 2],
    /// Opaque TCP directions that moved to `splice`.
    spliced: Cell<u64>,
    /// Protocol detection outcomes, by [`Detected`].
    detections: [Cell<u64>; Detected::ALL.len()],
}

/// What protocol detection found in a client's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line.
    Http1 = 0,
    /// The HTTP/2 connection preface.
    Http2 = 1,
    /// A TLS ClientHello (the application's own TLS).
    Tls = 2,
    /// Other bytes, or end of stream.
    Opaque = 3,
    /// Nothing decisive within the detection timeout.
    Timeout = 4,
}

impl Detected {
    /// Every outcome, in label order.
    pub const ALL: [Detected; 5] = [
        Detected::Http1,
        Detected::Http2,
        Detected::Tls,
        Detected::Opaque,
        Detected::Timeout,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Detected::Http1 => "http1",
            Detected::Http2 => "http2",
            Detected::Tls => "tls",
            Detected::Opaque => "opaque",
            Detected::Timeout => "timeout",
        }
    }
}

/// Where a TLS connection's record layer runs after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// kTLS: the kernel encrypts and decrypts.
    Kernel = 0,
    /// rustls in the proxy.
    Userspace = 1,
}

impl TlsMode {
    /// Both, in label order.
    pub const ALL: [TlsMode; 2] = [TlsMode::Kernel, TlsMode::Userspace];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            TlsMode::Kernel => "kernel",
            TlsMode::Userspace => "userspace",
        }
    }
}

impl ListenerStats {
    fn new() -> ListenerStats {
        ListenerStats {
            connections: Cell::new(0),
            active: Cell::new(0),
            requests: Cell::new(0),
            responses: Default::default(),
            errors: Default::default(),
            warnings: Default::default(),
            revocations: Pace::default(),
            bytes_received: Cell::new(0),
            bytes_sent: Cell::new(0),
            latency: RefCell::new(new_histogram()),
            peers: RefCell::default(),
            tls_modes: Default::default(),
            spliced: Cell::new(0),
            detections: Default::default(),
        }
    }

    /// Protocol detection on a connection found `outcome`.
    pub fn detected(&self, outcome: Detected) {
        bump(&self.detections[outcome as usize], 1);
    }

    /// A direction of an opaque TCP connection moved to `splice`.
    pub fn spliced(&self) {
        bump(&self.spliced, 1);
    }

    /// An mTLS connection was accepted and runs its record layer in `mode`.
    pub fn tls_mode(&self, mode: TlsMode) {
        bump(&self.tls_modes[mode as usize], 1);
    }

    /// A connection was accepted.
    pub fn connection_opened(&self) {
        bump(&self.connections, 1);
        bump(&self.active, 1);
    }

    /// An mTLS connection from a peer proving `identity` was accepted.
    pub fn peer(&self, identity: &str) {
        let mut peers = self.peers.borrow_mut();
        match peers.get_mut(identity) {
            Some(n) => *n += 1,
            None => {
                peers.insert(identity.to_owned(), 1);
            }
        }
    }

    /// An accepted connection ended.
    pub fn connection_closed(&self) {
        self.active.set(self.active.get().saturating_sub(1));
    }

    /// A request head was read.
    pub fn request(&self) {
        bump(&self.requests, 1);
    }

    /// A response was sent to the client, and the request took `elapsed` end to end.
    pub fn response(&self, status: u16, elapsed: Duration) {
        if let Some(class) = self
            .responses
            .get(usize::from(status / 100).wrapping_sub(1))
        {
            bump(class, 1);
        }
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, LATENCY_MAX_MICROS);
        // Clamped into the histogram's range, so recording cannot fail.
        let _ = self.latency.borrow_mut().record(micros);
    }

    /// Something went wrong, as classified by `flag`.
    pub fn error(&self, flag: Flag) {
        bump(&self.errors[flag as usize], 1);
    }

    /// Counts an error under `flag` that is worth a warning line, and says whether to log
    /// it now ([`Pace::admit`]).
    pub fn error_to_log(&self, flag: Flag) -> Option<u64> {
        self.error(flag);
        self.to_log(flag)
    }

    /// Says whether to log an error under `flag` now, one counted elsewhere.
    pub fn to_log(&self, flag: Flag) -> Option<u64> {
        self.warnings[flag as usize].admit()
    }

    /// Counts an open connection closed because a new authorization shuts its peer out,
    /// and says whether to log it now.
    pub fn revoked_to_log(&self) -> Option<u64> {
        self.error(Flag::Unauthorized);
        self.revocations.admit()
    }

    /// Bytes read from clients.
    pub fn received(&self, bytes: u64) {
        bump(&self.bytes_received, bytes);
    }

    /// Bytes written to clients.
    pub fn sent(&self, bytes: u64) {
        bump(&self.bytes_sent, bytes);
    }
}

/// Counters of one cluster on one worker, and its retry budget there (which, like the
/// counts, outlives a config change).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// What retries of requests to the cluster may spend on this worker.
    pub retry_budget: crate::proxy::retry::Budget,
    retries: Cell<u64>,
    retries_refused: Cell<u64>,
    ejections: Cell<u64>,
    overflows: Cell<u64>,
    pending: Cell<u64>,
    connections: Cell<u64>,
    connect_failures: Cell<u64>,
    backoffs: Cell<u64>,
    requests: Cell<u64>,
    responses: [Cell<u64>; 5],
    timeouts: Cell<u64>,
    bytes_sent: Cell<u64>,
    bytes_received: Cell<u64>,
    pool_reuses: Cell<u64>,
    tls_modes: [Cell<u64>; 2],
    /// The warning lines of failed mTLS handshakes with its endpoints.
    handshake_warnings: Pace,
}

impl ClusterStats {
    /// An mTLS connection to an upstream runs its record layer in `mode`.
    pub fn tls_mode(&self, mode: TlsMode) {
        bump(&self.tls_modes[mode as usize], 1);
    }

    /// A new upstream connection was established.
    pub fn connected(&self) {
        bump(&self.connections, 1);
    }
    /// An upstream connection attempt failed or timed out.
    pub fn connect_failed(&self) {
        bump(&self.connect_failures, 1);
    }
    /// An endpoint started (or, after a failed probe, went on) being passed over.
    pub fn backed_off(&self) {
        bump(&self.backoffs, 1);
    }
    /// A pooled connection was reused.
    pub fn reused(&self) {
        bump(&self.pool_reuses, 1);
    }
    /// A request was sent upstream.
    pub fn request(&self) {
        bump(&self.requests, 1);
    }
    /// The upstream answered with `status`.
    pub fn response(&self, status: u16) {
        if let Some(class) = self
            .responses
            .get(usize::from(status / 100).wrapping_sub(1))
        {
            bump(class, 1);
        }
    }
    /// The upstream did not answer in time.
    pub fn timeout(&self) {
        bump(&self.timeouts, 1);
    }
    /// A failed request was sent again.
    pub fn retried(&self) {
        bump(&self.retries, 1);
    }
    /// A failed request asked for a retry the budget had no room for.
    pub fn retry_refused(&self) {
        bump(&self.retries_refused, 1);
    }
    /// An endpoint was ejected (outlier detection), or ejected again after a failed probe.
    pub fn ejected(&self) {
        bump(&self.ejections, 1);
    }
    /// Whether to log a failed mTLS handshake with one of its endpoints now
    /// ([`Pace::admit`]); the failure counts as a failed connect.
    pub fn handshake_warning(&self) -> Option<u64> {
        self.handshake_warnings.admit()
    }
    /// A request or connection found no upstream connection free under the cluster's limit.
    pub fn overflowed(&self) {
        bump(&self.overflows, 1);
    }
    /// Counts a request or connection waiting for room under the cluster's limit while the
    /// guard lives.
    pub fn pending(&self) -> Pending<'_> {
        bump(&self.pending, 1);
        Pending(self)
    }
    /// Bytes written to the upstream.
    pub fn sent(&self, bytes: u64) {
        bump(&self.bytes_sent, bytes);
    }
    /// Bytes read from the upstream.
    pub fn received(&self, bytes: u64) {
        bump(&self.bytes_received, bytes);
    }
}

/// A worker's statistics, by listener and cluster name. Entries outlive config changes, so
/// counters stay monotonic across reloads.
#[derive(Debug, Default)]
pub struct Registry {
    listeners: RefCell<BTreeMap<Arc<str>, std::rc::Rc<ListenerStats>>>,
    clusters: RefCell<BTreeMap<Arc<str>, std::rc::Rc<ClusterStats>>>,
}

impl Registry {
    /// The stats of a listener, created on first use.
    pub fn listener(&self, name: &Arc<str>) -> std::rc::Rc<ListenerStats> {
        self.listeners
            .borrow_mut()
            .entry(name.clone())
            .or_insert_with(|| ListenerStats::new().into())
            .clone()
    }

    /// The stats of a cluster, created on first use.
    pub fn cluster(&self, name: &Arc<str>) -> std::rc::Rc<ClusterStats> {
        self.clusters
            .borrow_mut()
            .entry(name.clone())
            .or_default()
            .clone()
    }

    /// Copies everything out for the admin thread.
    pub fn report(&self) -> WorkerReport {
        let listeners = self
            .listeners
            .borrow()
            .iter()
            .map(|(name, s)| {
                let report = ListenerReport {
                    connections: s.connections.get(),
                    active: s.active.get(),
                    requests: s.requests.get(),
                    responses: s.responses.each_ref().map(Cell::get),
                    errors: s.errors.each_ref().map(Cell::get),
                    bytes_received: s.bytes_received.get(),
                    bytes_sent: s.bytes_sent.get(),
                    latency: s.latency.borrow().clone(),
                    peers: s.peers.borrow().clone(),
                    tls_modes: s.tls_modes.each_ref().map(Cell::get),
                    spliced: s.spliced.get(),
                    detections: s.detections.each_ref().map(Cell::get),
                };
                (name.clone(), report)
            })
            .collect();
        let clusters = self
            .clusters
            .borrow()
            .iter()
            .map(|(name, s)| {
                let report = ClusterReport {
                    connections: s.connections.get(),
                    connect_failures: s.connect_failures.get(),
                    backoffs: s.backoffs.get(),
                    requests: s.requests.get(),
                    responses: s.responses.each_ref().map(Cell::get),
                    timeouts: s.timeouts.get(),
                    retries: s.retries.get(),
                    retries_refused: s.retries_refused.get(),
                    ejections: s.ejections.get(),
                    overflows: s.overflows.get(),
                    pending: s.pending.get(),
                    bytes_sent: s.bytes_sent.get(),
                    bytes_received: s.bytes_received.get(),
                    pool_reuses: s.pool_reuses.get(),
                    tls_modes: s.tls_modes.each_ref().map(Cell::get),
                };
                (name.clone(), report)
            })
            .collect();
        WorkerReport {
            listeners,
            clusters,
            access_log_dropped: 0,
            trace_dropped: 0,
        }
    }
}

/// One worker's statistics at one instant, sent to the admin thread.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    /// By listener name.
    pub listeners: BTreeMap<Arc<str>, ListenerReport>,
    /// By cluster name.
    pub clusters: BTreeMap<Arc<str>, ClusterReport>,
    /// Access log lines dropped for want of room where they go.
    pub access_log_dropped: u64,
    /// Spans dropped, the exporter's queue being full.
    pub trace_dropped: u64,
}

/// A listener's statistics.
#[derive(Debug, Clone)]
pub struct ListenerReport {
    /// Connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
    /// Request heads read.
    pub requests: u64,
    /// Responses by status class, 1xx to 5xx.
    pub responses: [u64; 5],
    /// Errors by [`Flag`].
    pub errors: [u64; Flag::ALL.len()],
    /// Bytes read from clients.
    pub bytes_received: u64,
    /// Bytes written to clients.
    pub bytes_sent: u64,
    /// Request latency in microseconds.
    pub latency: Histogram<u64>,
    /// mTLS connections by peer SPIFFE ID.
    pub peers: BTreeMap<String, u64>,
    /// mTLS connections by [`TlsMode`].
    pub tls_modes: [u64; 2],
    /// Opaque TCP directions that moved to `splice`.
    pub spliced: u64,
    /// Protocol detection outcomes, by [`Detected`].
    pub detections: [u64; Detected::ALL.len()],
}

/// A cluster's statistics.
#[derive(Debug, Clone, Default)]
pub struct ClusterReport {
    /// Upstream connections established.
    pub connections: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Times an endpoint started, or after a failed probe went on, being passed over.
    pub backoffs: u64,
    /// Requests sent.
    pub requests: u64,
    /// Upstream responses by status class.
    pub responses: [u64; 5],
    /// Requests that timed out.
    pub timeouts: u64,
    /// Retries sent.
    pub retries: u64,
    /// Retries the budget refused.
    pub retries_refused: u64,
    /// Endpoint ejections.
    pub ejections: u64,
    /// Requests or connections refused under the connection limit.
    pub overflows: u64,
    /// Requests or connections waiting for room under the connection limit now.
    pub pending: u64,
    /// Bytes written to upstreams.
    pub bytes_sent: u64,
    /// Bytes read from upstreams.
    pub bytes_received: u64,
    /// Requests that reused a pooled connection.
    pub pool_reuses: u64,
    /// mTLS connections by [`TlsMode`].
    pub tls_modes: [u64; 2],
}

impl WorkerReport {
    /// Adds another worker's report into this one.
    pub fn merge(&mut self, other: WorkerReport) {
        self.access_log_dropped += other.access_log_dropped;
        self.trace_dropped += other.trace_dropped;
        for (name, l) in other.listeners {
            match self.listeners.get_mut(&name) {
                None => {
                    self.listeners.insert(name, l);
                }
                Some(m) => {
                    m.connections += l.connections;
                    m.active += l.active;
                    m.requests += l.requests;
                    add(&mut m.responses, &l.responses);
                    add(&mut m.errors, &l.errors);
                    m.bytes_received += l.bytes_received;
                    m.bytes_sent += l.bytes_sent;
                    // Same bounds on every worker, so adding cannot fail.
                    let _ = m.latency.add(&l.latency);
                    for (peer, n) in l.peers {
                        *m.peers.entry(peer).or_default() += n;
                    }
                    add(&mut m.tls_modes, &l.tls_modes);
                    m.spliced += l.spliced;
                    add(&mut m.detections, &l.detections);
                }
            }
        }
        for (name, c) in other.clusters {
            let m = self.clusters.entry(name).or_default();
            m.connections += c.connections;
            m.connect_failures += c.connect_failures;
            m.backoffs += c.backoffs;
            m.requests += c.requests;
            add(&mut m.responses, &c.responses);
            m.timeouts += c.timeouts;
            m.retries += c.retries;
            m.retries_refused += c.retries_refused;
            m.ejections += c.ejections;
            m.overflows += c.overflows;
            m.pending += c.pending;
            m.bytes_sent += c.bytes_sent;
            m.bytes_received += c.bytes_received;
            m.pool_reuses += c.pool_reuses;
            add(&mut m.tls_modes, &c.tls_modes);
        }
    }
}

fn add<const N: usize>(into: &mut [u64; N], from: &[u64; N]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Process-wide facts shown beside the counters.
#[derive(Debug)]
pub struct Info<'a> {
    /// `io_uring` or `epoll`.
    pub backend: &'a str,
    /// Worker threads.
    pub workers: usize,
    /// Version of the applied config.
    pub config_version: u64,
    /// Workers that answered the scrape.
    pub workers_reporting: usize,
    /// This proxy's SPIFFE ID and the seconds until its certificate expires.
    pub identity_expiry: Option<(String, i64)>,
    /// Certificate requests to the CA that succeeded and that failed, when a CA is used.
    pub certify: Option<(u64, u64)>,
    /// Config updates from `tern-control` (ACKed, NACKed) and whether the stream is up, when
    /// the config asks for them.
    pub discovery: Option<(u64, u64, bool)>,
    /// Spans the collector took and spans it could not be given, when spans are exported.
    pub traces: Option<(u64, u64)>,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Renders the Prometheus text exposition format (version 0.0.4).
pub fn render(info: &Info<'_>, report: &WorkerReport) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        name.to_owned()
    };
    let _ = family(
        "tern_proxy_info",
        "gauge",
        "Constant 1, labelled with the IO backend and worker count.",
    );
    let _ = family(
        "tern_config_version",
        "gauge",
        "Version of the config snapshot the workers run.",
    );
    let _ = family(
        "tern_workers_reporting",
        "gauge",
        "Workers that answered this scrape.",
    );
    let _ = writeln!(
        out,
        "tern_proxy_info{{backend=\"{}\",workers=\"{}\"}} 1",
        info.backend, info.workers
    );
    let _ = writeln!(out, "tern_config_version {}", info.config_version);
    let _ = writeln!(out, "tern_workers_reporting {}", info.workers_reporting);
    let _ = writeln!(
        out,
        "# HELP tern_access_log_dropped_lines_total Access log lines dropped because where they go had no room (a reader behind).\n# TYPE tern_access_log_dropped_lines_total counter\ntern_access_log_dropped_lines_total {}",
        report.access_log_dropped
    );
    if let Some((exported, failed)) = info.traces {
        let _ = writeln!(
            out,
            "# HELP tern_trace_spans_total Spans by fate: taken by the collector, failed to reach it, or dropped with the exporter behind.\n# TYPE tern_trace_spans_total counter\ntern_trace_spans_total{{result=\"exported\"}} {exported}\ntern_trace_spans_total{{result=\"failed\"}} {failed}\ntern_trace_spans_total{{result=\"dropped\"}} {}",
            report.trace_dropped
        );
    }
    if let Some((id, seconds)) = &info.identity_expiry {
        let _ = writeln!(
            out,
            "# HELP tern_identity_expiry_seconds Seconds until this proxy's certificate expires (negative: expired)."
        );
        let _ = writeln!(out, "# TYPE tern_identity_expiry_seconds gauge");
        let _ = writeln!(
            out,
            "tern_identity_expiry_seconds{{identity=\"{}\"}} {seconds}",
            escape(id)
        );
    }
    if let Some((acked, nacked, connected)) = info.discovery {
        let _ = writeln!(
            out,
            "# HELP tern_discovery_updates_total Configs from tern-control, by outcome.\n# TYPE tern_discovery_updates_total counter\ntern_discovery_updates_total{{result=\"ack\"}} {acked}\ntern_discovery_updates_total{{result=\"nack\"}} {nacked}"
        );
        let _ = writeln!(
            out,
            "# HELP tern_discovery_connected Whether the config stream from tern-control is up.\n# TYPE tern_discovery_connected gauge\ntern_discovery_connected {}",
            u8::from(connected)
        );
    }
    if let Some((ok, failed)) = info.certify {
        let _ = writeln!(
            out,
            "# HELP tern_identity_certify_total Certificate requests to the CA, by result.\n# TYPE tern_identity_certify_total counter"
        );
        let _ = writeln!(out, "tern_identity_certify_total{{result=\"ok\"}} {ok}");
        let _ = writeln!(
            out,
            "tern_identity_certify_total{{result=\"error\"}} {failed}"
        );
    }

    let ls = &report.listeners;
    let series = |out: &mut String,
                  name: &str,
                  kind: &str,
                  help: &str,
                  value: &dyn Fn(&ListenerReport) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (l, r) in ls {
            let _ = writeln!(out, "{name}{{listener=\"{}\"}} {}", escape(l), value(r));
        }
    };
    series(
        &mut out,
        "tern_listener_connections_total",
        "counter",
        "Connections accepted.",
        &|r| r.connections,
    );
    series(
        &mut out,
        "tern_listener_active_connections",
        "gauge",
        "Connections open now.",
        &|r| r.active,
    );
    series(
        &mut out,
        "tern_requests_total",
        "counter",
        "HTTP request heads read.",
        &|r| r.requests,
    );
    series(
        &mut out,
        "tern_listener_received_bytes_total",
        "counter",
        "Bytes read from clients.",
        &|r| r.bytes_received,
    );
    series(
        &mut out,
        "tern_listener_spliced_directions_total",
        "counter",
        "Opaque TCP directions that turned out bulk and moved to splice (bytes kept in the kernel).",
        &|r| r.spliced,
    );
    series(
        &mut out,
        "tern_listener_sent_bytes_total",
        "counter",
        "Bytes written to clients.",
        &|r| r.bytes_sent,
    );

    let _ = writeln!(
        out,
        "# HELP tern_responses_total Responses sent to clients, by status class."
    );
    let _ = writeln!(out, "# TYPE tern_responses_total counter");
    for (l, r) in ls {
        for (class, n) in CLASSES.iter().zip(r.responses) {
            let _ = writeln!(
                out,
                "tern_responses_total{{listener=\"{}\",class=\"{class}\"}} {n}",
                escape(l)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP tern_protocol_detections_total What protocol detection found in clients' first bytes (timeout: nothing decisive in time; served as opaque TCP)."
    );
    let _ = writeln!(out, "# TYPE tern_protocol_detections_total counter");
    for (l, r) in ls {
        for (outcome, n) in Detected::ALL.iter().zip(r.detections) {
            if n > 0 {
                let _ = writeln!(
                    out,
                    "tern_protocol_detections_total{{listener=\"{}\",protocol=\"{}\"}} {n}",
                    escape(l),
                    outcome.label()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP tern_errors_total Requests or connections that failed, by response flag."
    );
    let _ = writeln!(out, "# TYPE tern_errors_total counter");
    for (l, r) in ls {
        for (flag, n) in Flag::ALL.iter().zip(r.errors) {
            if n > 0 {
                let _ = writeln!(
                    out,
                    "tern_errors_total{{listener=\"{}\",flag=\"{}\"}} {n}",
                    escape(l),
                    flag.code()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP tern_listener_peer_connections_total mTLS connections accepted, by the peer's SPIFFE ID."
    );
    let _ = writeln!(out, "# TYPE tern_listener_peer_connections_total counter");
    for (l, r) in ls {
        for (peer, n) in &r.peers {
            let _ = writeln!(
                out,
                "tern_listener_peer_connections_total{{listener=\"{}\",peer_identity=\"{}\"}} {n}",
                escape(l),
                escape(peer)
            );
        }
    }
    render_tls_modes(
        &mut out,
        "tern_listener_tls_connections_total",
        "mTLS connections accepted",
        "listener",
        ls.iter().map(|(l, r)| (l.as_ref(), &r.tls_modes)),
    );
    let _ = writeln!(
        out,
        "# HELP tern_request_duration_seconds HTTP request latency, first head byte parsed to last response byte sent; exact quantiles from merged HDR histograms."
    );
    let _ = writeln!(out, "# TYPE tern_request_duration_seconds summary");
    for (l, r) in ls {
        let h = &r.latency;
        for q in QUANTILES {
            let micros = if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            };
            let _ = writeln!(
                out,
                "tern_request_duration_seconds{{listener=\"{}\",quantile=\"{q}\"}} {}",
                escape(l),
                micros as f64 / 1e6
            );
        }
        let sum = h.mean() * h.len() as f64 / 1e6;
        let _ = writeln!(
            out,
            "tern_request_duration_seconds_sum{{listener=\"{}\"}} {sum}",
            escape(l)
        );
        let _ = writeln!(
            out,
            "tern_request_duration_seconds_count{{listener=\"{}\"}} {}",
            escape(l),
            h.len()
        );
    }

    let cs = &report.clusters;
    let cluster_family = |out: &mut String,
                          name: &str,
                          kind: &str,
                          help: &str,
                          value: &dyn Fn(&ClusterReport) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (c, r) in cs {
            let _ = writeln!(out, "{name}{{cluster=\"{}\"}} {}", escape(c), value(r));
        }
    };
    let cluster_series =
        |out: &mut String, name: &str, help: &str, value: &dyn Fn(&ClusterReport) -> u64| {
            cluster_family(out, name, "counter", help, value);
        };
    cluster_series(
        &mut out,
        "tern_upstream_connections_total",
        "Upstream connections established.",
        &|r| r.connections,
    );
    cluster_series(
        &mut out,
        "tern_upstream_connect_failures_total",
        "Upstream connection attempts that failed or timed out.",
        &|r| r.connect_failures,
    );
    cluster_series(
        &mut out,
        "tern_upstream_endpoint_backoffs_total",
        "Times an endpoint that failed to connect started, or after a failed probe went on, being passed over.",
        &|r| r.backoffs,
    );
    cluster_series(
        &mut out,
        "tern_upstream_requests_total",
        "HTTP requests sent upstream.",
        &|r| r.requests,
    );
    cluster_series(
        &mut out,
        "tern_upstream_timeouts_total",
        "HTTP requests whose upstream did not answer in time.",
        &|r| r.timeouts,
    );
    cluster_series(
        &mut out,
        "tern_upstream_retries_total",
        "HTTP requests tried again, on the next endpoint, after a failure their cluster's retry policy names.",
        &|r| r.retries,
    );
    cluster_series(
        &mut out,
        "tern_upstream_retries_refused_total",
        "Retries not sent because the cluster's retry budget had no room.",
        &|r| r.retries_refused,
    );
    cluster_series(
        &mut out,
        "tern_upstream_ejections_total",
        "Times a worker ejected an endpoint whose requests failed in a row (outlier detection), or ejected it again after a failed probe.",
        &|r| r.ejections,
    );
    cluster_series(
        &mut out,
        "tern_upstream_overflows_total",
        "Requests and opaque TCP connections refused because no upstream connection was free under the cluster's connection limit.",
        &|r| r.overflows,
    );
    cluster_family(
        &mut out,
        "tern_upstream_pending",
        "gauge",
        "Requests and opaque TCP connections waiting now for room under the cluster's connection limit.",
        &|r| r.pending,
    );
    cluster_series(
        &mut out,
        "tern_upstream_pool_reuses_total",
        "HTTP requests that reused a pooled connection.",
        &|r| r.pool_reuses,
    );
    cluster_series(
        &mut out,
        "tern_upstream_sent_bytes_total",
        "Bytes written to upstreams.",
        &|r| r.bytes_sent,
    );
    cluster_series(
        &mut out,
        "tern_upstream_received_bytes_total",
        "Bytes read from upstreams.",
        &|r| r.bytes_received,
    );
    render_tls_modes(
        &mut out,
        "tern_upstream_tls_connections_total",
        "mTLS connections to upstreams",
        "cluster",
        cs.iter().map(|(c, r)| (c.as_ref(), &r.tls_modes)),
    );
    let _ = writeln!(
        out,
        "# HELP tern_upstream_responses_total Upstream responses, by status class."
    );
    let _ = writeln!(out, "# TYPE tern_upstream_responses_total counter");
    for (c, r) in cs {
        for (class, n) in CLASSES.iter().zip(r.responses) {
            let _ = writeln!(
                out,
                "tern_upstream_responses_total{{cluster=\"{}\",class=\"{class}\"}} {n}",
                escape(c)
            );
        }
    }
    out
}

/// One counter of mTLS connections by record-layer mode (kernel: kTLS; userspace: Tern's
/// own record layer, `usertls`),
/// a series per `label` value and mode.
fn render_tls_modes<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    rows: impl Iterator<Item = (&'a str, &'a [u64; 2])>,
) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}, by where the record layer runs (kernel: kTLS; userspace: Tern's record layer).\n# TYPE {name} counter"
    );
    for (value, modes) in rows {
        for mode in TlsMode::ALL {
            let _ = writeln!(
                out,
                "{name}{{{label}=\"{}\",mode=\"{}\"}} {}",
                escape(value),
                mode.label(),
                modes[mode as usize]
            );
        }
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        value.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_is_logged_once_a_second_with_the_count_held_back() {
        let pace = Pace::default();
        let start = Instant::now();
        let at = |millis| start + Duration::from_millis(millis);
        assert_eq!(pace.admit_at(at(0)), Some(0));
        assert_eq!(pace.admit_at(at(10)), None);
        assert_eq!(pace.admit_at(at(999)), None);
        assert_eq!(pace.admit_at(at(1000)), Some(2));
        assert_eq!(pace.admit_at(at(1500)), None);
        assert_eq!(pace.admit_at(at(5000)), Some(1));
        assert_eq!(pace.admit_at(at(6000)), Some(0));
    }

    #[test]
    fn every_error_counts_though_its_warning_is_paced() {
        let stats = ListenerStats::new();
        let logged = (0..5)
            .filter_map(|_| stats.error_to_log(Flag::TlsHandshake))
            .count();
        assert_eq!(logged, 1);
        assert_eq!(stats.errors[Flag::TlsHandshake as usize].get(), 5);
        // Each flag is paced on its own.
        assert_eq!(stats.error_to_log(Flag::Unauthorized), Some(0));
    }

    #[test]
    fn merges_workers_and_renders_exact_quantiles() {
        let name: Arc<str> = "web".into();
        let a = Registry::default();
        let b = Registry::default();
        for i in 1..=900u64 {
            a.listener(&name).response(200, Duration::from_micros(i));
        }
        for i in 901..=1000u64 {
            b.listener(&name).response(503, Duration::from_micros(i));
        }
        b.listener(&name).error(Flag::UpstreamConnectFailure);
        a.cluster(&"api".into()).request();
        let mut merged = a.report();
        merged.merge(b.report());
        let l = &merged.listeners[&name];
        assert_eq!(l.responses, [0, 900, 0, 0, 100]);
        assert_eq!(l.latency.len(), 1000);
        assert_eq!(l.latency.value_at_quantile(0.99), 990);

        let info = Info {
            backend: "epoll",
            workers: 2,
            config_version: 3,
            workers_reporting: 2,
            identity_expiry: Some(("spiffe://td/ns/a/sa/b".into(), 42)),
            certify: Some((3, 1)),
            discovery: Some((5, 2, true)),
            traces: Some((7, 1)),
        };
        merged.trace_dropped = 4;
        let text = render(&info, &merged);
        assert!(
            text.contains("tern_trace_spans_total{result=\"exported\"} 7\n")
                && text.contains("tern_trace_spans_total{result=\"failed\"} 1\n")
                && text.contains("tern_trace_spans_total{result=\"dropped\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_identity_expiry_seconds{identity=\"spiffe://td/ns/a/sa/b\"} 42"),
            "{text}"
        );
        assert!(
            text.contains("tern_discovery_updates_total{result=\"nack\"} 2\n")
                && text.contains("\ntern_discovery_connected 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_identity_certify_total{result=\"ok\"} 3\ntern_identity_certify_total{result=\"error\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_proxy_info{backend=\"epoll\",workers=\"2\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tern_responses_total{listener=\"web\",class=\"5xx\"} 100"),
            "{text}"
        );
        assert!(
            text.contains("tern_errors_total{listener=\"web\",flag=\"UF\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "tern_request_duration_seconds{listener=\"web\",quantile=\"0.99\"} 0.00099"
            ),
            "{text}"
        );
        assert!(
            text.contains("tern_request_duration_seconds_count{listener=\"web\"} 1000"),
            "{text}"
        );
        assert!(
            text.contains("tern_upstream_requests_total{cluster=\"api\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape("plain"), "plain");
    }
}
