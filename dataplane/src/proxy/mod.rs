//! The proxy logic, written once against the [`crate::io`] interface: opaque TCP
//! ([`tcp`]), HTTP/1.1 ([`http1`]), HTTP/2 ([`http2`]), protocol detection ([`detect`]),
//! intercepted connections ([`intercept`]), the per-worker upstream pool ([`pool`]), the
//! choice of endpoint and ejection of failing ones ([`balance`]), caps on upstream
//! connections ([`limit`]), HTTP routes ([`route`]), HTTP retries ([`retry`]) and caps on
//! the requests a second a listener serves ([`rate_limit`]); and who a downstream
//! connection's peer is to its listener's authorization and rate limit ([`Caller`]).
//!
//! Rule for every read here: a read that is abandoned (timeout, drain) is never retried on
//! the same socket; the socket is shut down instead. With io_uring an abandoned read stays
//! queued in the kernel and would swallow bytes meant for the next one.

pub mod balance;
pub mod detect;
pub mod http1;
pub mod http2;
pub mod intercept;
pub mod limit;
pub mod pool;
pub mod rate_limit;
pub mod retry;
pub mod route;
pub mod tcp;

use std::cell::RefCell;
use std::net::SocketAddr;

use rate_limit::CallerCaps;

use crate::access_log::AccessLog;
use crate::io::Backend;
use crate::metrics::{Flag, ListenerStats};
use crate::snapshot::{Access, ListenerPlan};
use crate::tls::{Handshake, MaybeTls};
use crate::worker::View;

/// What is inside an mTLS connection to an upstream sidecar (its ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// Opaque TCP.
    Tcp,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2.
    Http2,
}

/// Who is at the other end of a downstream connection, as its listener's authorization sees
/// them. Opaque TCP is let in or turned away once, when it connects; HTTP request by request
/// under the live config, so a caller turned away is answered (403, or gRPC's
/// PERMISSION_DENIED) rather than cut off, and one let in later is served on the connection it
/// has.
#[derive(Debug)]
pub struct Caller {
    /// Its address.
    pub addr: SocketAddr,
    /// The SPIFFE ID its mTLS certificate proved; none over plaintext.
    pub identity: Option<shared::SpiffeId>,
    /// The rate-limit caps it answers to under the limiter it last met, found once.
    caps: RefCell<Option<CallerCaps>>,
}

impl Caller {
    /// The caller at `addr`, with the identity its certificate proved.
    pub fn new(addr: SocketAddr, identity: Option<shared::SpiffeId>) -> Caller {
        Caller {
            addr,
            identity,
            caps: RefCell::new(None),
        }
    }

    /// What `listener`'s authorization lets this caller do.
    pub fn access(&self, listener: &ListenerPlan) -> Access {
        listener
            .authorization
            .as_ref()
            .map_or(Access::Everything, |a| a.access(self.identity.as_ref()))
    }

    /// Whether `listener`'s authorization lets this caller in for everything (opaque TCP).
    pub fn admitted(&self, listener: &ListenerPlan) -> bool {
        self.access(listener) == Access::Everything
    }

    /// Whether `listener`'s authorization, which gives this caller `access`
    /// ([`Caller::access`]), lets it make a request with `method` and `target` (its path,
    /// query included).
    pub fn may_request(
        &self,
        listener: &ListenerPlan,
        access: Access,
        method: &[u8],
        target: &[u8],
    ) -> bool {
        match access {
            Access::Everything => true,
            Access::Nothing => false,
            Access::SomeRequests => listener
                .authorization
                .as_ref()
                .is_some_and(|a| a.rules_allow(self.identity.as_ref(), method, target)),
        }
    }

    /// Counts and logs (at most once a second per listener) a connection of this caller's
    /// that `listener`'s authorization turns away, `received` bytes into it; with an access
    /// log, writes its line.
    pub fn refuse_connection(
        &self,
        listener: &ListenerPlan,
        stats: &ListenerStats,
        access_log: Option<&AccessLog>,
        received: u64,
    ) {
        if let Some(held_back) = stats.error_to_log(Flag::Unauthorized) {
            let identity = self.identity_label();
            tracing::warn!(listener = %listener.name, peer = %self.addr, %identity, held_back, "connection refused: the listener's authorization does not let this peer in for everything");
        }
        if let Some(log) = access_log {
            log.record(&crate::access_log::Entry {
                listener: &listener.name,
                caller: self,
                protocol: "TCP",
                request_fields: b"",
                status: None,
                flag: Some(Flag::Unauthorized),
                upstream: None,
                bytes: Some((received, 0)),
                // Turned away as soon as the proxy knew who and what it was.
                duration: std::time::Duration::ZERO,
            });
        }
    }

    /// Logs (at most once a second per listener) a request of this caller's that
    /// `listener`'s authorization turns away; its answer counts it.
    pub fn log_refused_request(&self, listener: &ListenerPlan, stats: &ListenerStats) {
        if let Some(held_back) = stats.to_log(Flag::Unauthorized) {
            let identity = self.identity_label();
            tracing::warn!(listener = %listener.name, peer = %self.addr, %identity, held_back, "request refused: the listener's authorization does not let this peer make it");
        }
    }

    /// Spends a request of this caller's from `listener`'s rate limit: false, spending
    /// nothing, when the limit has no room for it.
    pub fn spend_rate_limit(&self, listener: &ListenerPlan) -> bool {
        let Some(limiter) = &listener.rate_limit else {
            return true;
        };
        let mut caps = self.caps.borrow_mut();
        let caps = match &mut *caps {
            Some(caps) if caps.under(limiter) => caps,
            caps => caps.insert(limiter.caps_for(self.identity.as_ref())),
        };
        caps.admit()
    }

    /// Logs (at most once a second per listener) a request of this caller's that
    /// `listener`'s rate limit turns away; its answer counts it.
    pub fn log_rate_limited(&self, listener: &ListenerPlan, stats: &ListenerStats) {
        // At info, not warn: a cap turning requests away is the policy at work, not a fault.
        if let Some(held_back) = stats.to_log(Flag::RateLimited) {
            let identity = self.identity_label();
            tracing::info!(listener = %listener.name, peer = %self.addr, %identity, held_back, "request refused (429): over the listener's rate limit");
        }
    }

    fn identity_label(&self) -> String {
        self.identity
            .as_ref()
            .map_or_else(|| "none (plaintext)".to_owned(), ToString::to_string)
    }
}

/// Most endpoints tried for one connection before giving up.
pub(crate) const CONNECT_ATTEMPTS: usize = 3;

/// Opens a connection to the next endpoints of `cluster` ([`View::next_endpoint`]), trying up to
/// [`CONNECT_ATTEMPTS`] of them within each one's connect timeout; for an mTLS cluster the
/// handshake, which proves the endpoint's identity, must finish within it too.
pub(crate) async fn connect<B: Backend>(
    view: &View,
    cluster: usize,
    inner: Inner,
) -> Option<(MaybeTls<B::Stream>, SocketAddr)> {
    let first = view.next_endpoint(cluster)?;
    connect_from::<B>(view, cluster, first, inner).await
}

/// As [`connect`], with `first` the endpoint round robin already picked (a caller that
/// looked for a pooled connection to it first): picking again would skip it.
pub(crate) async fn connect_from<B: Backend>(
    view: &View,
    cluster: usize,
    first: SocketAddr,
    inner: Inner,
) -> Option<(MaybeTls<B::Stream>, SocketAddr)> {
    let plan = view.snapshot.clusters.get(cluster)?;
    let mut addr = first;
    for attempt in 0..plan.endpoints.len().min(CONNECT_ATTEMPTS) {
        if attempt > 0 {
            addr = view.next_endpoint(cluster)?;
        }
        if let Some(stream) = connect_to::<B>(view, cluster, addr, inner).await {
            return Some((stream, addr));
        }
    }
    None
}

/// One attempt at `addr` for `cluster` (its timeout, its mTLS), counted on the cluster; a
/// failure passes the endpoint over for a while ([`balance`]) when it is one of the
/// cluster's (not an intercepted destination passed through).
pub(crate) async fn connect_to<B: Backend>(
    view: &View,
    cluster: usize,
    addr: SocketAddr,
    inner: Inner,
) -> Option<MaybeTls<B::Stream>> {
    let plan = view.snapshot.clusters.get(cluster)?;
    let stats = view.clusters.get(cluster)?;
    let mark = view.snapshot.mark();
    let started = tokio::time::Instant::now();
    let attempt = async {
        let stream = match tokio::time::timeout(plan.connect_timeout, B::connect(addr, mark)).await
        {
            Ok(connected) => connected?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ));
            }
        };
        let Some(tls) = &plan.tls else {
            return Ok(MaybeTls::Plain(stream));
        };
        let remaining = plan.connect_timeout.saturating_sub(started.elapsed());
        match Handshake::client(stream, tls.client(inner), addr.ip())?
            .run_within(remaining)
            .await
        {
            Ok(stream) => {
                let stream = stream.into_record_layer()?;
                if let Some(mode) = stream.tls_mode() {
                    stats.tls_mode(mode);
                }
                Ok(stream)
            }
            Err(error) => {
                if let Some(held_back) = stats.handshake_warning() {
                    tracing::warn!(cluster = %plan.name, %addr, expected = %tls.identity, %error, held_back, "mTLS handshake with upstream failed");
                }
                Err(error)
            }
        }
    };
    let error =
        match tokio::time::timeout(plan.connect_timeout + plan.connect_timeout, attempt).await {
            Ok(Ok(stream)) => {
                stats.connected();
                view.failing.succeeded(addr);
                return Some(stream);
            }
            Ok(Err(error)) => error,
            Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        };
    stats.connect_failed();
    if plan.endpoints.contains(&addr) && view.failing.failed(addr) {
        stats.backed_off();
    }
    tracing::debug!(cluster = %plan.name, %addr, %error, "upstream connect failed");
    None
}
