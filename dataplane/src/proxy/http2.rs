//! HTTP/2 (and so gRPC): one downstream connection's streams, each request routed by
//! authority and path like HTTP/1.1, and carried on a multiplexed upstream HTTP/2 connection
//! (h2c prior knowledge, or ALPN `tern-h2` under mTLS).
//!
//! hyper runs both ends, over the owned-buffer streams ([`crate::io::hyper_io`]), so flow
//! control, trailers (gRPC's status), stream resets and keep-alive pings are its; this module
//! routes, picks the upstream connection (per endpoint per worker, shared by up to 100
//! streams, then another; at its cluster's connection limit, the least busy to any usable
//! endpoint), bounds everything up to the response head with the route's
//! timeout, sends a request the upstream refused unseen (GOAWAY) once more on another
//! connection, retries what its cluster's retry policy names ([`super::retry`]), and answers
//! failures, and requests the listener's authorization refuses (403), itself with
//! `x-tern-response-flag`, as HTTP/1.1 does (to a gRPC call in gRPC's terms: `grpc-status`
//! and `grpc-message`). With an access log, each stream writes one line when it ends. A
//! connection with no request under way for `keepalive_timeout` is closed (GOAWAY), as an
//! idle HTTP/1.1 one is.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};

use super::Caller;
use super::balance::InFlight;
use super::limit::Slot;
use super::retry::{Attempts, Failure, Outgoing, Resend};
use crate::access_log::{Entry, write_request_fields};
use crate::io::Backend;
use crate::io::hyper_io::{HyperIo, LocalExec};
use crate::metrics::Flag;
use crate::trace::{self, Ended, Span, Tracer};

use crate::tls::MaybeTls;
use crate::worker::{Room, Sharing, View, Worker};

/// What the proxy answers with: the upstream's body (holding its stream's place on the
/// upstream connection until it ends), or its own short text.
pub type Body = Either<UpstreamBody, Full<Bytes>>;

/// How many streams the proxy opens on one upstream connection before it opens another to
/// the same endpoint. A server caps the streams a client may have open at once
/// (`SETTINGS_MAX_CONCURRENT_STREAMS`), and hyper queues a request past the cap until a
/// stream ends; with long-lived gRPC streams holding every place, the queued request would
/// wait for its route's timeout. hyper does not say what the server's cap is, so the proxy
/// keeps to the lowest value RFC 9113 §6.5.2 recommends servers allow.
const STREAMS_PER_CONNECTION: usize = 100;

/// How long a connection beyond an endpoint's first may sit with no stream before the pool
/// closes it (when the next request to that endpoint looks for a place).
const EXTRA_CONNECTION_IDLE: Duration = Duration::from_secs(60);

/// An upstream connection, or the one being made (streams that arrive while it is being
/// made wait for it rather than each opening their own), and how many streams have a place
/// on it.
#[derive(Debug)]
struct Connection {
    sender: tokio::sync::OnceCell<SendRequest<Outgoing>>,
    /// Making it failed: the streams that were waiting for it go on to the next endpoint
    /// rather than each trying again in turn.
    failed: Cell<bool>,
    streams: Cell<usize>,
    /// When its last stream ended.
    idle_since: Cell<Instant>,
    /// Its place under the cluster's connection limit, if the cluster has one: given back
    /// when the pool and its last stream let it go.
    slot: Option<Slot>,
}

impl Connection {
    fn new(slot: Option<Slot>) -> Connection {
        Connection {
            sender: tokio::sync::OnceCell::new(),
            failed: Cell::new(false),
            streams: Cell::new(0),
            idle_since: Cell::new(Instant::now()),
            slot,
        }
    }
}

type Shared = Rc<Connection>;

/// A stream's place on an upstream connection, given back when dropped: with the response
/// body ([`UpstreamBody`]) when there is one, else when the exchange fails.
#[derive(Debug)]
struct Place(Shared);

impl Place {
    fn on(connection: &Shared) -> Place {
        connection.streams.set(connection.streams.get() + 1);
        Place(connection.clone())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let streams = self.0.streams.get().saturating_sub(1);
        self.0.streams.set(streams);
        if streams == 0 {
            self.0.idle_since.set(Instant::now());
            // Whoever waits for room under the cluster's connection limit may reuse or close
            // this one now ([`Pool::evict_idle`]).
            if let Some(slot) = &self.0.slot {
                slot.offer();
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body, as the proxy passes it on. It keeps its stream's place on
    /// the upstream connection (and counts in its endpoint's load, for a least-request
    /// cluster) until it has been read to its end or dropped (the client went
    /// away: hyper resets the stream), and it fails once the upstream has sent nothing for
    /// the cluster's idle timeout, as an HTTP/1.1 response body does (hyper then resets the
    /// client's stream, and dropping the body the upstream's).
    pub struct UpstreamBody {
        body: Incoming,
        // Fires at `last_frame + idle_timeout`, re-armed lazily: a frame only notes the time.
        #[pin]
        idle: tokio::time::Sleep,
        idle_timeout: Duration,
        last_frame: tokio::time::Instant,
        stats: Rc<crate::metrics::ListenerStats>,
        _held: (Place, Option<InFlight>),
    }
}

impl UpstreamBody {
    fn new(
        body: Incoming,
        held: (Place, Option<InFlight>),
        idle_timeout: Duration,
        stats: Rc<crate::metrics::ListenerStats>,
    ) -> UpstreamBody {
        let now = tokio::time::Instant::now();
        UpstreamBody {
            body,
            idle: tokio::time::sleep_until(now + idle_timeout),
            idle_timeout,
            last_frame: now,
            stats,
            _held: held,
        }
    }
}

/// Why the proxy cut an upstream response body.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for the cluster's idle timeout")]
struct IdleUpstream;

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let mut this = self.project();
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut *this.body).poll_frame(cx) {
            *this.last_frame = tokio::time::Instant::now();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        loop {
            if this.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = *this.last_frame + *this.idle_timeout;
            if deadline <= tokio::time::Instant::now() {
                this.stats.error(Flag::IdleTimeout);
                tracing::debug!(
                    "HTTP/2 upstream response idle past the cluster's idle timeout: stream reset"
                );
                return Poll::Ready(Some(Err(IdleUpstream.into())));
            }
            this.idle.as_mut().reset(deadline);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A pool entry's key: the cluster's name and the endpoint.
type Key<'a> = (&'a Arc<str>, SocketAddr);

/// An endpoint's connections, by cluster name.
type ByCluster = HashMap<Arc<str>, Vec<Shared>>;

/// One worker's upstream HTTP/2 connections, by endpoint and cluster: the first carries
/// every stream to that endpoint up to [`STREAMS_PER_CONNECTION`], then the next. Looked up
/// by `&str`, so a request clones no name shared with the other workers (its count is an
/// atomic on a line every core would write).
#[derive(Default)]
pub struct Pool {
    connections: RefCell<HashMap<SocketAddr, ByCluster>>,
}

impl Pool {
    /// Closes the connections `next`, the config replacing `current`, has no use for (as
    /// [`super::pool::Pool::retain_for`]), so they do not linger until their keep-alive fails.
    pub fn retain_for(
        &self,
        current: &crate::snapshot::Snapshot,
        next: &crate::snapshot::Snapshot,
    ) {
        self.connections.borrow_mut().retain(|addr, by_cluster| {
            by_cluster.retain(|name, _| super::pool::carried_over(current, next, name, *addr));
            !by_cluster.is_empty()
        });
    }

    /// Closes every connection (their drivers end when the last sender is dropped).
    pub fn clear(&self) {
        self.connections.borrow_mut().clear();
    }

    /// A place for one stream on `key`'s first connection with room, if it has one.
    /// Connections beyond the first that have been idle for [`EXTRA_CONNECTION_IDLE`] are
    /// closed on the way.
    fn place_with_room(&self, (cluster, addr): Key<'_>) -> Option<Place> {
        let mut connections = self.connections.borrow_mut();
        let list = connections.get_mut(&addr)?.get_mut(&**cluster)?;
        if list.len() > 1 {
            let mut index = 0;
            list.retain(|c| {
                index += 1;
                index == 1
                    || c.streams.get() > 0
                    || c.idle_since.get().elapsed() < EXTRA_CONNECTION_IDLE
            });
        }
        list.iter()
            .find(|c| c.streams.get() < STREAMS_PER_CONNECTION)
            .map(Place::on)
    }

    /// A place for one stream on a new connection to `key` (made by whoever awaits it
    /// first), holding `slot` under the cluster's connection limit.
    fn place_new(&self, (cluster, addr): Key<'_>, slot: Option<Slot>) -> Place {
        let mut connections = self.connections.borrow_mut();
        let by_cluster = connections.entry(addr).or_default();
        let list = match by_cluster.get_mut(&**cluster) {
            Some(list) => list,
            None => by_cluster.entry(cluster.clone()).or_default(),
        };
        let new = Rc::new(Connection::new(slot));
        list.push(new.clone());
        Place::on(&new)
    }

    /// A place on the connection of cluster `name` to any of its `usable` endpoints with the
    /// fewest streams (made or being made, not closed), past [`STREAMS_PER_CONNECTION`] if
    /// need be (the upstream's own cap then queues it), and that connection's endpoint: for
    /// a stream at the cluster's connection limit, which would rather go elsewhere than
    /// wait.
    fn least_busy(
        &self,
        name: &str,
        usable: impl Fn(SocketAddr) -> bool,
    ) -> Option<(Place, SocketAddr)> {
        let connections = self.connections.borrow();
        connections
            .iter()
            .filter(|(addr, _)| usable(**addr))
            .filter_map(|(addr, by_cluster)| Some((addr, by_cluster.get(name)?)))
            .flat_map(|(addr, list)| list.iter().map(move |c| (addr, c)))
            .filter(|(_, c)| !c.failed.get() && !c.sender.get().is_some_and(|s| s.is_closed()))
            .min_by_key(|(_, c)| c.streams.get())
            .map(|(addr, c)| (Place::on(c), *addr))
    }

    /// Closes one of cluster `name`'s connections that carries no stream (to any endpoint),
    /// giving its slot back; false when it has none.
    pub fn evict_idle(&self, name: &str) -> bool {
        let mut connections = self.connections.borrow_mut();
        for by_cluster in connections.values_mut() {
            let Some(list) = by_cluster.get_mut(name) else {
                continue;
            };
            if let Some(idle) = list.iter().position(|c| c.streams.get() == 0) {
                list.remove(idle);
                return true;
            }
        }
        false
    }

    /// Forgets `connection` (it failed or closed): the next stream that needs a place makes
    /// a new one.
    fn forget(&self, (cluster, addr): Key<'_>, connection: &Shared) {
        let mut connections = self.connections.borrow_mut();
        let Some(by_cluster) = connections.get_mut(&addr) else {
            return;
        };
        if let Some(list) = by_cluster.get_mut(&**cluster) {
            list.retain(|c| !Rc::ptr_eq(c, connection));
            if list.is_empty() {
                by_cluster.remove(&**cluster);
            }
        }
        if by_cluster.is_empty() {
            connections.remove(&addr);
        }
    }

    /// A place on `key`'s first connection with room, or on a new one (tests).
    #[cfg(test)]
    fn place(&self, key: Key<'_>) -> Place {
        self.place_with_room(key)
            .unwrap_or_else(|| self.place_new(key, None))
    }

    /// How many connections the pool holds to `key` (tests).
    #[cfg(test)]
    fn count(&self, (cluster, addr): Key<'_>) -> usize {
        self.connections
            .borrow()
            .get(&addr)
            .and_then(|by_cluster| by_cluster.get(&**cluster))
            .map_or(0, Vec::len)
    }
}

/// The W3C trace context a request carries ([`crate::trace`]).
const TRACEPARENT: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("traceparent");

/// How often an idle HTTP/2 connection (either end) is pinged, and how long the answer may
/// take before the connection is dropped as dead.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The flow-control windows the proxy gives an upstream connection, which every stream to
/// that endpoint on this worker shares. A stream whose client stops reading holds at most
/// its own window of the connection's: with hyper's defaults (2 MiB a stream, 5 MiB the
/// connection) three such streams would stall every other stream to the endpoint; with
/// these, 64 would. 256 KiB a stream still moves about a gigabyte a second per stream at
/// the round trips inside a cluster.
const UPSTREAM_STREAM_WINDOW: u32 = 256 * 1024;
const UPSTREAM_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Serves one HTTP/2 connection on `listener` until the client closes it or the worker
/// drains (then in-flight streams finish and the client is told to go away). Each request
/// runs under the worker's current config (found by the listener's name), so a long-lived
/// connection (gRPC's) follows route and endpoint changes.
pub async fn serve<B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &Rc<View>,
    listener: usize,
    down: MaybeTls<B::Stream>,
    caller: Rc<Caller>,
) {
    let peer = caller.addr;
    let activity = Rc::new(Activity::default());
    let service = {
        let (worker, accepted) = (worker.clone(), view.clone());
        let name = view.snapshot.listeners[listener].name.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let busy = activity.begin();
            let worker = worker.clone();
            let caller = caller.clone();
            let current = worker.view();
            let (view, listener) = match current.snapshot.listener_index(&name) {
                Some(index) => (current, index),
                None => (accepted.clone(), listener),
            };
            async move {
                let _busy = busy;
                let span = worker
                    .tracer()
                    .and_then(|tracer| begin_span(tracer, &request));
                if worker.access_log().is_none() && span.is_none() {
                    let outcome = Cell::new(Outcome::default());
                    let response =
                        forward(&worker, &view, listener, &caller, request, &outcome, None);
                    return Ok::<_, Infallible>(response.await);
                }
                let traceparent = span.as_ref().map(Span::traceparent);
                let logged = Logged::new(&worker, &view, listener, &caller, &request, span);
                let outcome = &logged.outcome;
                let response = forward(
                    &worker,
                    &view,
                    listener,
                    &caller,
                    request,
                    outcome,
                    traceparent,
                )
                .await;
                Ok(response)
            }
        })
    };
    let connection = hyper::server::conn::http2::Builder::new(LocalExec)
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_header_list_size(
            u32::try_from(view.snapshot.config.http.max_header_bytes).unwrap_or(u32::MAX),
        )
        .serve_connection(HyperIo::new(down), service);
    let mut connection = std::pin::pin!(connection);
    let idle_for = view.snapshot.config.http.keepalive_timeout;
    let result = loop {
        // While requests are under way, look again a whole timeout later.
        let idle_at = match activity.requests.get() {
            0 => activity.last.get() + idle_for,
            _ => Instant::now() + idle_for,
        };
        tokio::select! {
            result = connection.as_mut() => break result,
            () = worker.drain_started() => {
                connection.as_mut().graceful_shutdown();
                break connection.await;
            }
            () = tokio::time::sleep_until(idle_at.into()) => {
                if activity.idle_for(idle_for) {
                    tracing::debug!(listener = %view.snapshot.listeners[listener].name, %peer, "idle HTTP/2 connection closed");
                    connection.as_mut().graceful_shutdown();
                    break connection.await;
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(listener = %view.snapshot.listeners[listener].name, %peer, %error, "HTTP/2 connection ended with an error");
    }
}

/// What a downstream connection has under way, for its idle timeout (`keepalive_timeout`, as
/// HTTP/1.1's): requests whose answer's head is not yet sent, and when the last was (or the
/// connection began). A response body still streaming (a long gRPC stream) does not count:
/// the GOAWAY that closes an idle connection lets its streams finish, and the client opens
/// another connection for its next request.
struct Activity {
    requests: Cell<usize>,
    last: Cell<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            requests: Cell::new(0),
            last: Cell::new(Instant::now()),
        }
    }
}

impl Activity {
    /// A request begins; it ends when the guard is dropped.
    fn begin(self: &Rc<Self>) -> Busy {
        self.requests.set(self.requests.get() + 1);
        Busy(self.clone())
    }

    /// Whether nothing has been under way for `timeout`.
    fn idle_for(&self, timeout: Duration) -> bool {
        self.requests.get() == 0 && self.last.get().elapsed() >= timeout
    }
}

/// A request under way on a connection ([`Activity::begin`]).
struct Busy(Rc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let requests = self.0.requests.get() - 1;
        self.0.requests.set(requests);
        // Only the last answer's time matters: one clock read when the connection goes idle.
        if requests == 0 {
            self.0.last.set(Instant::now());
        }
    }
}

/// How a request ended, for the access log: the status it counts as (0: none yet), the
/// proxy's flag, and the cluster (and endpoint) it went to.
#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    status: u16,
    flag: Option<Flag>,
    upstream: Option<(usize, Option<SocketAddr>)>,
}

/// A request on its way, with an access log or spans exported: writes its line and ends its
/// span when dropped, once answered or when its client gave up on it first (a stream reset,
/// which drops the request's task).
struct Logged<B: Backend> {
    worker: Rc<Worker<B>>,
    view: Rc<View>,
    listener: usize,
    caller: Rc<Caller>,
    request_fields: Vec<u8>,
    outcome: Cell<Outcome>,
    started: Instant,
    span: Option<Span>,
}

impl<B: Backend> Logged<B> {
    fn new(
        worker: &Rc<Worker<B>>,
        view: &Rc<View>,
        listener: usize,
        caller: &Rc<Caller>,
        request: &Request<Incoming>,
        span: Option<Span>,
    ) -> Self {
        let mut request_fields = Vec::new();
        if worker.access_log().is_some() {
            let (method, authority, path) = request_fields_of(request);
            request_fields.reserve(128);
            write_request_fields(&mut request_fields, method, authority, path);
        }
        Logged {
            worker: worker.clone(),
            view: view.clone(),
            listener,
            caller: caller.clone(),
            request_fields,
            outcome: Cell::new(Outcome::default()),
            started: Instant::now(),
            span,
        }
    }
}

/// A request's method, authority (`Host` without one) and path, for the log and spans.
fn request_fields_of(request: &Request<Incoming>) -> (&[u8], &[u8], &[u8]) {
    let uri = request.uri();
    let authority = uri.authority().map(|a| a.as_str()).or_else(|| {
        let host = request.headers().get(hyper::header::HOST)?;
        host.to_str().ok()
    });
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    (
        request.method().as_str().as_bytes(),
        authority.unwrap_or_default().as_bytes(),
        path.as_bytes(),
    )
}

/// The request's span, when it came with one sampled `traceparent` (two are none).
fn begin_span(tracer: &Tracer, request: &Request<Incoming>) -> Option<Span> {
    let mut fields = request.headers().get_all(TRACEPARENT).iter();
    let traceparent = fields.next().filter(|_| fields.next().is_none())?;
    let (method, authority, path) = request_fields_of(request);
    tracer.begin(Some(traceparent.as_bytes()), method, authority, path)
}

impl<B: Backend> Drop for Logged<B> {
    fn drop(&mut self) {
        let Outcome {
            status,
            flag,
            upstream,
        } = self.outcome.get();
        let answered = status != 0;
        let status = answered.then_some(status);
        let flag = if answered {
            flag
        } else {
            Some(Flag::DownstreamReset)
        };
        let snapshot = &self.view.snapshot;
        let listener = &snapshot.listeners[self.listener];
        if let Some(log) = self.worker.access_log() {
            log.record(&Entry {
                listener: &listener.name,
                caller: &self.caller,
                protocol: "HTTP/2",
                request_fields: &self.request_fields,
                status,
                flag,
                upstream: upstream.map(|(c, addr)| (&*snapshot.clusters[c].name, addr)),
                bytes: None,
                duration: self.started.elapsed(),
            });
        }
        if let (Some(tracer), Some(span)) = (self.worker.tracer(), self.span.take()) {
            tracer.end(
                span,
                &Ended {
                    kind: trace::Kind::of(listener),
                    protocol: "2",
                    status,
                    flag,
                    listener: &listener.name,
                    cluster: upstream.map(|(c, _)| &*snapshot.clusters[c].name),
                    peer: self.caller.identity.as_ref(),
                },
            );
        }
    }
}

/// Routes and forwards one request from `caller`; answers it itself when that fails, or when
/// the listener's authorization does not let `caller` in. The route's timeout bounds
/// everything up to the response head: finding or making the upstream connection and the
/// upstream's answer. `outcome` ends saying how it went. With `traceparent` (this proxy's
/// span's), the request goes on with it.
async fn forward<B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &View,
    listener: usize,
    caller: &Caller,
    mut request: Request<Incoming>,
    outcome: &Cell<Outcome>,
    traceparent: Option<[u8; 55]>,
) -> Response<Body> {
    let started = Instant::now();
    let stats = &view.listeners[listener];
    stats.request();
    // gRPC calls are POSTs (a CONNECT answered 200 would open a tunnel).
    let grpc = request.method() == hyper::Method::POST && is_grpc(request.headers());
    let refuse = |status: u16, flag: Flag| {
        let upstream = outcome.get().upstream;
        outcome.set(Outcome {
            status,
            flag: Some(flag),
            upstream,
        });
        local(stats, started, status, flag, grpc)
    };
    let plan = &view.snapshot.listeners[listener];
    let target = request.uri().path_and_query().map_or("", |p| p.as_str());
    let method = request.method().as_str().as_bytes();
    if !caller.may_request(plan, caller.access(plan), method, target.as_bytes()) {
        caller.log_refused_request(plan, stats);
        return refuse(403, Flag::Unauthorized);
    }
    if !caller.spend_rate_limit(plan) {
        caller.log_rate_limited(plan, stats);
        return refuse(429, Flag::RateLimited);
    }
    let Some(routes) = view.snapshot.listeners[listener].kind.routes() else {
        return refuse(404, Flag::NoRoute);
    };
    if request.uri().authority().is_none() && !with_host_authority(&mut request) {
        return refuse(400, Flag::DownstreamProtocolError);
    }
    if request.method() == hyper::Method::CONNECT {
        // A tunnel, which hyper hands to its upgrade API: the proxy does not carry one, and
        // says so rather than passing on the upstream's 200 and then resetting the stream.
        return refuse(501, Flag::DownstreamProtocolError);
    }
    if !host_agrees(&request) {
        return refuse(400, Flag::DownstreamProtocolError);
    }
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().as_bytes())
        .unwrap_or_default();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .as_bytes();
    let method = request.method().as_str().as_bytes();
    let Some(route) = routes.route(host, (method, path), request.headers(), &view.regexes) else {
        return refuse(404, Flag::NoRoute);
    };
    if let Some(redirect) = &route.redirect {
        let location = route
            .location(redirect, host, path)
            .and_then(|l| hyper::header::HeaderValue::from_bytes(&l).ok());
        let Some(location) = location else {
            return refuse(400, Flag::DownstreamProtocolError);
        };
        outcome.set(Outcome {
            status: redirect.status,
            ..outcome.get()
        });
        stats.response(redirect.status, started.elapsed());
        let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
        *response.status_mut() =
            hyper::StatusCode::from_u16(redirect.status).unwrap_or(hyper::StatusCode::FOUND);
        response
            .headers_mut()
            .insert(hyper::header::LOCATION, location);
        return response;
    }
    if let Some(rewrite) = &route.rewrite {
        let target = rewrite
            .path
            .as_ref()
            .map(|rewrite| route.rewritten_target(rewrite, path));
        if !rewritten(&mut request, target, rewrite.hostname.as_deref()) {
            return refuse(400, Flag::DownstreamProtocolError);
        }
    }
    if let Some(edits) = &route.request_headers {
        edits.apply(request.headers_mut());
    }
    // The trace context, with this proxy's span as the parent.
    if let Some(value) = traceparent.and_then(|t| hyper::header::HeaderValue::from_bytes(&t).ok()) {
        request.headers_mut().insert(TRACEPARENT, value);
    }
    let chosen = route.choose(view.roll());
    let cluster = &view.clusters[chosen.cluster];
    let retries = view.snapshot.clusters[chosen.cluster].retries.as_ref();
    let mut attempts = Attempts::start(retries, chosen.timeout, cluster);
    // A request that may go again keeps a copy of its head and records its body.
    let (mut request, resend) = Resend::split(request, attempts.retryable());
    let mut unsent_resent = false;
    loop {
        outcome.set(Outcome {
            upstream: Some((chosen.cluster, None)),
            ..outcome.get()
        });
        let deadline = attempts.deadline();
        let attempt_started = tokio::time::Instant::now();
        let upstream =
            tokio::time::timeout_at(deadline, upstream::<B>(worker, view, chosen.cluster));
        let sent = match upstream.await {
            Ok(Ok((mut sender, key, place))) => {
                outcome.set(Outcome {
                    upstream: Some((chosen.cluster, Some(key.1))),
                    ..outcome.get()
                });
                cluster.request();
                let in_flight = view.in_flight(chosen.cluster, key.1);
                let sent = tokio::time::timeout_at(deadline, sender.try_send_request(request));
                (sent.await, key, (place, in_flight))
            }
            Ok(Err(flag)) => return refuse(503, flag),
            Err(_) => {
                cluster.timeout();
                match Resend::again(resend.as_ref(), &mut attempts, Failure::PerTryTimeout) {
                    Some(next) => {
                        request = next;
                        continue;
                    }
                    None => return refuse(504, Flag::UpstreamTimeout),
                }
            }
        };
        let (failure, status, flag) = match sent {
            (Ok(Ok(response)), key, held) => {
                let status = response.status().as_u16();
                cluster.response(status);
                view.answered(chosen.cluster, key.1, attempt_started, status < 500);
                let failure = match status {
                    502..=504 => Some(Failure::Status(status)),
                    _ if grpc && grpc_unavailable(response.headers()) => Some(Failure::Unavailable),
                    _ => None,
                };
                if let Some(next) =
                    failure.and_then(|f| Resend::again(resend.as_ref(), &mut attempts, f))
                {
                    // The failed answer goes no further: dropping it lets its stream go (a
                    // request body still arriving fails for it, so hyper resets the stream).
                    request = next;
                    continue;
                }
                stats.response(status, started.elapsed());
                outcome.set(Outcome {
                    status,
                    ..outcome.get()
                });
                let idle_timeout = view.snapshot.clusters[chosen.cluster].idle_timeout;
                let stats = view.listeners[listener].clone();
                let mut response = response;
                if let Some(edits) = chosen.response_headers {
                    edits.apply(response.headers_mut());
                }
                return response
                    .map(|body| Either::Left(UpstreamBody::new(body, held, idle_timeout, stats)));
            }
            (Ok(Err(mut failed)), key, (place, _)) => {
                worker.h2.forget(key, &place.0);
                tracing::debug!(cluster = %view.snapshot.clusters[chosen.cluster].name, error = %failed.error(), "HTTP/2 upstream failed");
                // A request the upstream never saw (its connection was closing: GOAWAY) goes
                // once more, on another connection (the closing one is forgotten), retries
                // or not.
                let unsent = failed.take_message();
                if let Some(unsent) = unsent {
                    if !unsent_resent {
                        unsent_resent = true;
                        request = unsent;
                        continue;
                    }
                } else if upstream_failed(failed.error()) {
                    view.answered(chosen.cluster, key.1, attempt_started, false);
                }
                (Failure::Reset, 502, Flag::UpstreamReset)
            }
            (Err(_), key, _) => {
                cluster.timeout();
                view.answered(chosen.cluster, key.1, attempt_started, false);
                (Failure::PerTryTimeout, 504, Flag::UpstreamTimeout)
            }
        };
        match Resend::again(resend.as_ref(), &mut attempts, failure) {
            Some(next) => request = next,
            None => return refuse(status, flag),
        }
    }
}

/// Gives a request a route's rewritten target (path and query) and host: its URI, and its
/// `Host` field if it has one. False when they do not make a URI (the request is refused).
fn rewritten(request: &mut Request<Incoming>, target: Option<Vec<u8>>, host: Option<&str>) -> bool {
    let mut parts = request.uri().clone().into_parts();
    if let Some(target) = target {
        match hyper::http::uri::PathAndQuery::try_from(target) {
            Ok(target) => parts.path_and_query = Some(target),
            Err(_) => return false,
        }
    }
    if let Some(host) = host {
        match hyper::http::uri::Authority::try_from(host) {
            Ok(authority) => parts.authority = Some(authority),
            Err(_) => return false,
        }
        if let Ok(value) = hyper::header::HeaderValue::from_str(host)
            && request.headers().contains_key(hyper::header::HOST)
        {
            request.headers_mut().insert(hyper::header::HOST, value);
        }
    }
    match hyper::Uri::from_parts(parts) {
        Ok(uri) => {
            *request.uri_mut() = uri;
            true
        }
        Err(_) => false,
    }
}

/// Whether a request failed on the upstream's side (it reset the stream, went away, or the
/// connection failed), not on the client's (its body failed, and the proxy reset the stream).
fn upstream_failed(error: &hyper::Error) -> bool {
    use std::error::Error as _;
    match error.source().and_then(|e| e.downcast_ref::<h2::Error>()) {
        Some(h2) => h2.is_remote() || h2.is_io() || h2.is_go_away(),
        None => !error.is_user() && !error.is_body_write_aborted(),
    }
}

/// Whether a gRPC response says `UNAVAILABLE` in its head (a trailers-only answer).
fn grpc_unavailable(headers: &hyper::HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() == b"14")
}

/// Whether a `Host` field, if the request has one beside its authority, names the same host
/// (RFC 9113 §8.3.1): the upstream sees both, and must not route on another host than the
/// proxy did.
fn host_agrees(request: &Request<Incoming>) -> bool {
    match (
        request.uri().authority(),
        request.headers().get(hyper::header::HOST),
    ) {
        (Some(authority), Some(host)) => host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes()),
        _ => true,
    }
}

/// Gives a request that names its host only in `Host` (allowed in HTTP/2) the authority the
/// upstream connection needs; false when there is none to give.
fn with_host_authority(request: &mut Request<Incoming>) -> bool {
    let Some(host) = request
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok())
    else {
        return false;
    };
    let mut parts = request.uri().clone().into_parts();
    parts.authority = Some(host);
    if parts.scheme.is_none() {
        parts.scheme = Some(hyper::http::uri::Scheme::HTTP);
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
    }
    match hyper::Uri::from_parts(parts) {
        Ok(uri) => {
            *request.uri_mut() = uri;
            true
        }
        Err(_) => false,
    }
}

/// A response the proxy makes itself: `status`, with its flag in `x-tern-response-flag`; to a
/// gRPC call (`grpc`), HTTP 200 with the call's outcome in `grpc-status` and `grpc-message`,
/// which is where gRPC clients look (a bare HTTP error reaches them only as "unexpected HTTP
/// status"), as Envoy and Linkerd answer.
fn local(
    stats: &crate::metrics::ListenerStats,
    started: Instant,
    status: u16,
    flag: Flag,
    grpc: bool,
) -> Response<Body> {
    stats.error(flag);
    stats.response(status, started.elapsed());
    let text = format!("{status} ({})", flag.code());
    let mut response = if grpc {
        // gRPC's trailers-only answer: the call's status in the head, which ends the stream.
        let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", grpc_status(flag).into());
        if let Ok(message) = hyper::header::HeaderValue::from_str(&format!("tern-proxy: {text}")) {
            headers.insert("grpc-message", message);
        }
        response
    } else {
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(text + "\n"))));
        *response.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
        response
    };
    response.headers_mut().insert(
        "x-tern-response-flag",
        hyper::header::HeaderValue::from_static(flag.code()),
    );
    response
}

/// Whether a request with `headers` is a gRPC call (`application/grpc`, `application/grpc+proto`, …; not
/// gRPC-Web, whose status travels in the body).
fn is_grpc(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

/// The gRPC status code of a call the proxy answers itself: as gRPC maps the HTTP status it
/// stands for (404 UNIMPLEMENTED, 502 and 503 UNAVAILABLE, 400 INTERNAL, 403
/// PERMISSION_DENIED); but a rate limit's 429 is RESOURCE_EXHAUSTED, not UNAVAILABLE (which a
/// client's retries would take for a failing server and send again at once), and the route
/// timeout DEADLINE_EXCEEDED, the code of a call that ran out of time, as a server's own
/// deadline would end it.
fn grpc_status(flag: Flag) -> u16 {
    match flag {
        Flag::NoRoute => 12,
        Flag::Unauthorized => 7,
        Flag::RateLimited => 8,
        Flag::UpstreamTimeout => 4,
        Flag::UpstreamConnectFailure
        | Flag::UpstreamOverflow
        | Flag::UpstreamReset
        | Flag::UpstreamProtocolError => 14,
        _ => 13,
    }
}

/// A ready connection to the next endpoint of `cluster` (one of the worker's, or a new one),
/// with its pool key and the stream's place on it; or why there is none: no connection could
/// be made, or none may be under the cluster's connection limit.
async fn upstream<'v, B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &'v View,
    cluster: usize,
) -> Result<(SendRequest<Outgoing>, Key<'v>, Place), Flag> {
    let Some(plan) = view.snapshot.clusters.get(cluster) else {
        return Err(Flag::UpstreamConnectFailure);
    };
    let mut attempts = 0;
    while attempts < plan.endpoints.len().min(super::CONNECT_ATTEMPTS) {
        let Some(addr) = view.next_endpoint(cluster) else {
            break;
        };
        let (place, key) = place::<B>(worker, view, cluster, (&plan.name, addr)).await?;
        let connection = &place.0;
        let pooled = connection.sender.initialized();
        let made = connection
            .sender
            .get_or_try_init(|| async {
                if connection.failed.get() {
                    return Err(());
                }
                let made = connect::<B>(view, cluster, key.1).await;
                connection.failed.set(made.is_err());
                made
            })
            .await;
        match made {
            Ok(sender) => {
                let mut sender = sender.clone();
                if sender.ready().await.is_ok() {
                    if pooled {
                        view.clusters[cluster].reused();
                    }
                    return Ok((sender, key, place));
                }
                // It closed (the upstream went away or said GOAWAY): the next request makes
                // a new one.
                worker.h2.forget(key, connection);
                if pooled {
                    // One that died while pooled is no attempt at the endpoint; each is
                    // forgotten, so this ends.
                    continue;
                }
            }
            Err(()) => worker.h2.forget(key, connection),
        }
        attempts += 1;
    }
    Err(Flag::UpstreamConnectFailure)
}

/// A place for a stream of `cluster` to `key`'s endpoint, and the key of the connection it
/// is on: a pooled connection's with room, else a new one's within the cluster's connection
/// limit ([`Worker::upstream_room`]; at the limit, the least busy connection the cluster
/// has, to any endpoint, serves instead).
///
/// The pool holds connections for the live config. A request that runs under an older one
/// (a config went live since it arrived) uses the pool only where the cluster still reaches
/// this endpoint as it did; else its connection is its own.
async fn place<'v, B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &'v View,
    cluster: usize,
    key: Key<'v>,
) -> Result<(Place, Key<'v>), Flag> {
    let pooled = worker.pools(view, cluster, key.1);
    if pooled && let Some(place) = worker.h2.place_with_room(key) {
        return Ok((place, key));
    }
    let usable = |addr| !view.failing.passed_over(key.0, addr);
    let reuse = || {
        pooled
            .then(|| worker.h2.least_busy(key.0, usable))
            .flatten()
    };
    match worker
        .upstream_room(view, cluster, reuse, Sharing::Shared)
        .await
    {
        Ok(Room::Reuse((place, addr))) => Ok((place, (key.0, addr))),
        Ok(Room::Slot(slot)) if pooled => {
            // Another stream may have made one while this one waited for room.
            let place = worker.h2.place_with_room(key);
            Ok((place.unwrap_or_else(|| worker.h2.place_new(key, slot)), key))
        }
        Ok(Room::Slot(slot)) => Ok((Place::on(&Rc::new(Connection::new(slot))), key)),
        Err(_) => Err(Flag::UpstreamOverflow),
    }
}

/// A new HTTP/2 connection to `addr` for `cluster`, its driver running on this worker.
async fn connect<B: Backend>(
    view: &View,
    cluster: usize,
    addr: SocketAddr,
) -> Result<SendRequest<Outgoing>, ()> {
    let name = view.snapshot.clusters[cluster].name.clone();
    let stream = super::connect_to::<B>(view, cluster, addr, super::Inner::Http2)
        .await
        .ok_or(())?;
    match hyper::client::conn::http2::Builder::new(LocalExec)
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(UPSTREAM_STREAM_WINDOW)
        .initial_connection_window_size(UPSTREAM_CONNECTION_WINDOW)
        .handshake::<_, Outgoing>(HyperIo::new(stream))
        .await
    {
        Ok((sender, connection)) => {
            tokio::task::spawn_local(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(cluster = %name, %addr, %error, "HTTP/2 upstream connection ended");
                }
            });
            Ok(sender)
        }
        Err(error) => {
            tracing::debug!(cluster = %name, %addr, %error, "HTTP/2 handshake with upstream failed");
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_calls_are_known_by_their_content_type() {
        let with = |content_type: &str| {
            let mut headers = hyper::HeaderMap::new();
            headers.insert(hyper::header::CONTENT_TYPE, content_type.parse().unwrap());
            is_grpc(&headers)
        };
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;v=1",
        ] {
            assert!(with(grpc), "{grpc}");
        }
        for other in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "text/plain",
        ] {
            assert!(!with(other), "{other}");
        }
        assert!(!is_grpc(&hyper::HeaderMap::new()));
    }

    static CLUSTER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("c"));

    fn key() -> Key<'static> {
        (&CLUSTER, SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// A full first connection's worth of places.
    fn fill(pool: &Pool) -> Vec<Place> {
        (0..STREAMS_PER_CONNECTION)
            .map(|_| pool.place(key()))
            .collect()
    }

    #[test]
    fn a_full_connection_sends_the_next_stream_to_another() {
        let pool = Pool::default();
        let places = fill(&pool);
        assert!(places.iter().all(|p| Rc::ptr_eq(&p.0, &places[0].0)));
        assert_eq!(pool.count(key()), 1);

        let overflow = pool.place(key());
        assert!(!Rc::ptr_eq(&overflow.0, &places[0].0));
        assert_eq!(pool.count(key()), 2);

        // A stream that ends gives its place back: the first connection has room again.
        drop(places.into_iter().next());
        let next = pool.place(key());
        assert!(!Rc::ptr_eq(&next.0, &overflow.0));
        assert_eq!(pool.count(key()), 2);
    }

    #[test]
    fn an_extra_connection_left_idle_is_closed_and_the_first_kept() {
        let pool = Pool::default();
        let first = fill(&pool);
        let extra = pool.place(key());
        let extra_connection = extra.0.clone();
        drop(extra);
        drop(first);
        // Idle, but not for long: kept.
        drop(pool.place(key()));
        assert_eq!(pool.count(key()), 2);
        // Idle for longer than the limit, both of them: the extra one goes.
        for connection in &pool.connections.borrow()[&key().1][&**CLUSTER] {
            let long_ago = Instant::now().checked_sub(EXTRA_CONNECTION_IDLE * 2);
            connection
                .idle_since
                .set(long_ago.unwrap_or_else(Instant::now));
        }
        let place = pool.place(key());
        assert_eq!(pool.count(key()), 1);
        assert!(!Rc::ptr_eq(&place.0, &extra_connection));
    }

    #[test]
    fn a_forgotten_connection_leaves_the_others() {
        let pool = Pool::default();
        let first = fill(&pool);
        let second = pool.place(key());
        pool.forget(key(), &first[0].0);
        assert_eq!(pool.count(key()), 1);
        assert!(Rc::ptr_eq(&pool.place(key()).0, &second.0));
        pool.forget(key(), &second.0);
        assert_eq!(pool.count(key()), 0);
        assert!(!pool.connections.borrow().contains_key(&key().1));
    }
}
