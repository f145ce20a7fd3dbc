//! HTTP/2 (and so gRPC): one downstream connection's streams, each request routed by
//! authority and path like HTTP/1.1, and carried on a multiplexed upstream HTTP/2 connection
//! (h2c prior knowledge, or ALPN `tern-h2` under mTLS).
//!
//! hyper runs both ends, over the owned-buffer streams ([`crate::io::hyper_io`]), so flow
//! control, trailers (gRPC's status), stream resets and keep-alive pings are its; this module
//! routes, picks the upstream connection (one per endpoint per worker, shared by all
//! streams), bounds everything up to the response head with the route's timeout, sends a
//! request the upstream refused unseen (GOAWAY) once more on a new connection, and answers
//! failures itself with `x-tern-response-flag`, as HTTP/1.1 does.

use std::cell::RefCell;
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

use crate::io::Backend;
use crate::io::hyper_io::{HyperIo, LocalExec};
use crate::metrics::Flag;
use crate::snapshot::{ListenerKind, RouteTable};
use crate::tls::MaybeTls;
use crate::worker::{View, Worker};

/// What the proxy answers with: the upstream's body, or its own short text.
pub type Body = Either<Incoming, Full<Bytes>>;

/// An upstream connection, or the one being made: streams that arrive while it is being
/// made wait for it rather than each opening their own.
type Shared = Rc<tokio::sync::OnceCell<SendRequest<Incoming>>>;

/// A pool entry's key: the cluster and the endpoint.
type Key = (Arc<str>, SocketAddr);

/// One worker's upstream HTTP/2 connections, by cluster and endpoint; each carries every
/// stream to that endpoint.
#[derive(Default)]
pub struct Pool {
    connections: RefCell<HashMap<Key, Shared>>,
}

impl Pool {
    /// Closes the connections to endpoints `snapshot` no longer has in that cluster (a
    /// scaled-down Service), so they do not linger until their keep-alive fails.
    pub fn retain_endpoints_of(&self, snapshot: &crate::snapshot::Snapshot) {
        self.connections.borrow_mut().retain(|(cluster, addr), _| {
            snapshot
                .clusters
                .iter()
                .any(|c| c.name == *cluster && c.endpoints.contains(addr))
        });
    }

    /// Forgets `key`'s connection if it is still `shared` (a newer one may have replaced it).
    fn forget(&self, key: &Key, shared: &Shared) {
        let mut connections = self.connections.borrow_mut();
        if connections.get(key).is_some_and(|c| Rc::ptr_eq(c, shared)) {
            connections.remove(key);
        }
    }
}

impl Pool {
    /// Closes every connection (their drivers end when the last sender is dropped).
    pub fn clear(&self) {
        self.connections.borrow_mut().clear();
    }
}

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
    peer: SocketAddr,
) {
    let service = {
        let (worker, accepted) = (worker.clone(), view.clone());
        let name = view.snapshot.listeners[listener].name.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let worker = worker.clone();
            let current = worker.view();
            let (view, listener) = match current.snapshot.listener_index(&name) {
                Some(index) => (current, index),
                None => (accepted.clone(), listener),
            };
            async move { Ok::<_, Infallible>(forward(&worker, &view, listener, request).await) }
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
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = worker.drain_started() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(listener = %view.snapshot.listeners[listener].name, %peer, %error, "HTTP/2 connection ended with an error");
    }
}

/// Routes and forwards one request; answers it itself when that fails. The route's timeout
/// bounds everything up to the response head: finding or making the upstream connection
/// and the upstream's answer.
async fn forward<B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &View,
    listener: usize,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let stats = &view.listeners[listener];
    stats.request();
    let routes: &RouteTable = match &view.snapshot.listeners[listener].kind {
        ListenerKind::Http(routes) | ListenerKind::Detect { routes, .. } => routes,
        ListenerKind::Tcp { .. } | ListenerKind::Intercepted(_) => {
            return local(stats, started, 404, Flag::NoRoute);
        }
    };
    if request.uri().authority().is_none() && !with_host_authority(&mut request) {
        return local(stats, started, 400, Flag::DownstreamProtocolError);
    }
    if request.method() == hyper::Method::CONNECT {
        // A tunnel, which hyper hands to its upgrade API: the proxy does not carry one, and
        // says so rather than passing on the upstream's 200 and then resetting the stream.
        return local(stats, started, 405, Flag::DownstreamProtocolError);
    }
    if !host_agrees(&request) {
        return local(stats, started, 400, Flag::DownstreamProtocolError);
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
    let Some(route) = routes.route(host, path, request.headers()) else {
        return local(stats, started, 404, Flag::NoRoute);
    };
    let chosen = route.choose(view.roll());
    let cluster = &view.clusters[chosen.cluster];
    let deadline = tokio::time::Instant::now() + chosen.timeout;
    // A request the upstream never saw (its connection was closing: GOAWAY) goes once more,
    // on a new connection.
    for _ in 0..2 {
        let upstream =
            tokio::time::timeout_at(deadline, upstream::<B>(worker, view, chosen.cluster));
        let (mut sender, key, shared) = match upstream.await {
            Ok(Some(found)) => found,
            Ok(None) => return local(stats, started, 503, Flag::UpstreamConnectFailure),
            Err(_) => {
                cluster.timeout();
                return local(stats, started, 504, Flag::UpstreamTimeout);
            }
        };
        cluster.request();
        match tokio::time::timeout_at(deadline, sender.try_send_request(request)).await {
            Err(_) => {
                cluster.timeout();
                return local(stats, started, 504, Flag::UpstreamTimeout);
            }
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                cluster.response(status);
                stats.response(status, started.elapsed());
                return response.map(Either::Left);
            }
            Ok(Err(mut failed)) => {
                worker.h2.forget(&key, &shared);
                tracing::debug!(cluster = %view.snapshot.clusters[chosen.cluster].name, error = %failed.error(), "HTTP/2 upstream failed");
                match failed.take_message() {
                    Some(unsent) => request = unsent,
                    None => return local(stats, started, 502, Flag::UpstreamReset),
                }
            }
        }
    }
    local(stats, started, 502, Flag::UpstreamReset)
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

/// A response the proxy makes itself.
fn local(
    stats: &crate::metrics::ListenerStats,
    started: Instant,
    status: u16,
    flag: Flag,
) -> Response<Body> {
    stats.error(flag);
    stats.response(status, started.elapsed());
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "{status} ({})\n",
        flag.code()
    )))));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    response.headers_mut().insert(
        "x-tern-response-flag",
        hyper::header::HeaderValue::from_static(flag.code()),
    );
    response
}

/// A ready connection to the next endpoint of `cluster` (the worker's, or a new one), with
/// its pool key and entry, to forget it by if it fails.
async fn upstream<B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &View,
    cluster: usize,
) -> Option<(SendRequest<Incoming>, Key, Shared)> {
    let plan = view.snapshot.clusters.get(cluster)?;
    for _ in 0..plan.endpoints.len().min(super::CONNECT_ATTEMPTS) {
        let addr = view.next_endpoint(cluster)?;
        let key = (plan.name.clone(), addr);
        let shared = worker
            .h2
            .connections
            .borrow_mut()
            .entry(key.clone())
            .or_default()
            .clone();
        let pooled = shared.initialized();
        let made = shared
            .get_or_try_init(|| connect::<B>(view, cluster, addr))
            .await;
        match made {
            Ok(sender) => {
                let mut sender = sender.clone();
                if sender.ready().await.is_ok() {
                    if pooled {
                        view.clusters[cluster].reused();
                    }
                    return Some((sender, key, shared));
                }
                // It closed (the upstream went away or said GOAWAY): the next request makes
                // a new one.
                worker.h2.forget(&key, &shared);
            }
            Err(()) => worker.h2.forget(&key, &shared),
        }
    }
    None
}

/// A new HTTP/2 connection to `addr` for `cluster`, its driver running on this worker.
async fn connect<B: Backend>(
    view: &View,
    cluster: usize,
    addr: SocketAddr,
) -> Result<SendRequest<Incoming>, ()> {
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
        .handshake::<_, Incoming>(HyperIo::new(stream))
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
