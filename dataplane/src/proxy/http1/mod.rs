//! HTTP/1.1: one downstream connection, its requests in order, each routed
//! ([`crate::proxy::route`]) to a cluster and carried over a pooled upstream connection.
//!
//! Heads are forwarded as received, unless a route rewrites the URL or edits headers, a
//! traced request's `traceparent` carries this proxy's span ([`crate::trace`]), the proxy
//! closes a connection the upstream would keep, or an offer to upgrade to h2c is declined by
//! dropping its fields; bodies stream through a bounded buffer, but for
//! a request its cluster may retry, one of known length up to 64 KiB is read whole first and
//! kept for another attempt; pipelined requests are answered strictly one after another;
//! `Upgrade` (WebSocket) turns the connection into an opaque byte pump after the `101` it
//! asked for. A request the listener's authorization does not let its client make is
//! answered 403. Failures the proxy answers itself carry an `x-tern-response-flag` header and
//! count under that flag; a response that breaks off after its head went out ends the
//! client's connection in a reset. With an access log, each exchange writes one line.

pub mod body;
pub mod head;

use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::time::Instant;

use shared::config::HttpSettings;

use self::body::BodyError;
use self::head::{Framing, HeadError, Limits, RequestHead, ResponseHead};
use super::Caller;
use super::limit::Slot;
use super::retry::{Attempts, Failure, REPLAY_LIMIT};
use super::tcp::pump_counted;
use crate::access_log::{Entry, write_request_fields};
use crate::io::{Backend, Stream};
use crate::metrics::{Flag, ListenerStats};
use crate::proxy::route::{Chosen, RawHead};
use crate::snapshot::Access;
use crate::tls::MaybeTls;
use crate::trace::{self, Ended, Span};
use crate::worker::{Room, Sharing, View, Worker};

/// How long a closing connection may take to send its TLS close_notify.
const CLOSE_NOTIFY_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// Initial capacity of a connection's head buffers.
const HEAD_BUFFER: usize = 4096;

/// What happens to the downstream connection after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    /// The response broke off where the client cannot tell (a body delimited by the close):
    /// end the connection in a reset, with no `close_notify`, so the client does not take
    /// what it got for the whole.
    Reset,
}

/// Why no request head could be read.
enum NoRequest {
    /// The client closed, went idle, or the worker is draining: close quietly.
    Closed,
    /// The client broke a rule: answer with this status and close.
    Reject(u16, Flag),
}

/// One downstream connection's state.
struct Conn<'a, B: Backend> {
    worker: &'a Rc<Worker<B>>,
    /// The config the next request runs under ([`Conn::follow_config`]).
    view: Rc<View>,
    /// The listener's index in `view`.
    listener: usize,
    stats: Rc<ListenerStats>,
    /// Who the client is, and what the listener's authorization lets it do under `view`.
    caller: Rc<Caller>,
    access: Access,
    settings: HttpSettings,
    limits: Limits,
    down: MaybeTls<B::Stream>,
    /// Bytes read from the client not yet forwarded: the current head, then the body's start
    /// or pipelined requests.
    inbuf: Vec<u8>,
    /// Bytes read from the upstream: the response head and the start of its body.
    upbuf: Vec<u8>,
    /// Body bytes in transit.
    scratch: Vec<u8>,
    /// With an access log: the current request's fields, the cluster (and endpoint) it
    /// went to, whether its line is written, and the flag of an error that ended it.
    request_fields: Vec<u8>,
    upstream: Option<(usize, Option<SocketAddr>)>,
    written: bool,
    failure: Option<Flag>,
    /// The request's span, when it came with a sampled trace context and spans are
    /// exported.
    span: Option<Span>,
    /// Where its version-00 `traceparent`'s value starts in `inbuf`, if it has one.
    span_at: Option<usize>,
}

/// Serves HTTP/1.1 on one accepted connection (on an `http` or `detect` listener) until it
/// closes. Each request runs under the worker's current config, so a keep-alive client
/// follows route and endpoint changes (a rollout's new Pods) as an HTTP/2 one does.
pub async fn serve<B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &Rc<View>,
    listener: usize,
    down: MaybeTls<B::Stream>,
    caller: Rc<Caller>,
) {
    let settings = view.snapshot.config.http.clone();
    let peer = caller.addr;
    let mut conn = Conn {
        worker,
        view: view.clone(),
        listener,
        stats: view.listeners[listener].clone(),
        access: caller.access(&view.snapshot.listeners[listener]),
        caller,
        limits: Limits::from(&settings),
        settings,
        down,
        inbuf: Vec::with_capacity(HEAD_BUFFER),
        upbuf: Vec::new(),
        scratch: Vec::new(),
        request_fields: Vec::new(),
        upstream: None,
        written: false,
        failure: None,
        span: None,
        span_at: None,
    };
    let ended = loop {
        conn.request_fields.clear();
        conn.upstream = None;
        conn.written = false;
        conn.failure = None;
        conn.span = None;
        conn.span_at = None;
        let head = match conn.read_request_head().await {
            Ok(head) => head,
            Err(NoRequest::Closed) => break Next::Close,
            Err(NoRequest::Reject(status, flag)) => {
                tracing::debug!(%peer, status, flag = flag.code(), "request refused");
                conn.stats.request();
                conn.reply(status, flag, true, Instant::now()).await;
                break Next::Close;
            }
        };
        let started = Instant::now();
        conn.follow_config();
        conn.stats.request();
        if conn.worker.access_log().is_some() {
            let field = |range: &std::ops::Range<usize>| &conn.inbuf[range.clone()];
            let (method, host, path) = (
                field(&head.method_name),
                field(&head.host),
                field(&head.path),
            );
            write_request_fields(&mut conn.request_fields, method, host, path);
        }
        let head = if head.h2c_upgrade {
            match conn.decline_h2c_upgrade(&head) {
                Some(plain) => plain,
                None => break Next::Close,
            }
        } else {
            head
        };
        conn.begin_span(&head);
        let next = if !conn.admits(&head) {
            conn.forbidden(&head, started).await
        } else if !conn.spend_rate_limit() {
            conn.rate_limited(&head, started).await
        } else {
            conn.route(&head, started).await
        };
        if !conn.written {
            // Broken off before an answer was counted (the client or the upstream went away
            // mid-exchange): logged with what ended it.
            conn.log(
                None,
                Some(conn.failure.unwrap_or(Flag::DownstreamReset)),
                started,
            );
        }
        if next != Next::KeepAlive {
            break next;
        }
    };
    if ended == Next::Reset {
        conn.down.abort();
        return;
    }
    // Over TLS, say goodbye properly (close_notify) so the peer can tell a close from a
    // truncation; best effort.
    let _ = tokio::time::timeout(CLOSE_NOTIFY_GRACE, conn.down.close_write()).await;
    let _ = conn.down.shutdown(Shutdown::Both);
}

impl<B: Backend> Conn<'_, B> {
    /// Moves to the worker's current config, where it still has this listener (by name,
    /// with routes); else the connection goes on under the config it has.
    fn follow_config(&mut self) {
        let current = self.worker.view();
        if Rc::ptr_eq(&current, &self.view) {
            return;
        }
        let name = &self.view.snapshot.listeners[self.listener].name;
        let Some(index) = current.snapshot.listener_index(name) else {
            return;
        };
        if current.snapshot.listeners[index].kind.routes().is_none() {
            return;
        }
        self.stats = current.listeners[index].clone();
        self.access = self.caller.access(&current.snapshot.listeners[index]);
        if self.settings != current.snapshot.config.http {
            self.settings = current.snapshot.config.http.clone();
            self.limits = Limits::from(&self.settings);
        }
        self.listener = index;
        self.view = current;
    }

    /// Reads until `inbuf` starts with a whole request head.
    async fn read_request_head(&mut self) -> Result<RequestHead, NoRequest> {
        // A head already begun (it came with the previous request) has the header timeout
        // running from now, not the keep-alive timeout; empty lines (a CRLF some clients send
        // after a body, RFC 9112 §2.2) begin none.
        let begun = self.inbuf.iter().any(|&b| b != b'\r' && b != b'\n');
        let mut deadline =
            begun.then(|| tokio::time::Instant::now() + self.settings.header_timeout);
        loop {
            if !self.inbuf.is_empty() {
                match head::parse_request(&self.inbuf, &self.limits) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(error) => return Err(NoRequest::Reject(error.status(), error.flag())),
                }
            } else if self.worker.draining() {
                return Err(NoRequest::Closed);
            }
            let buf = std::mem::take(&mut self.inbuf);
            let (read, buf) = match deadline {
                // Between requests: wait for the first byte, the keep-alive timeout, or a drain.
                None => {
                    tokio::select! {
                        read = self.down.read(buf) => read,
                        () = tokio::time::sleep(self.settings.keepalive_timeout) => return Err(NoRequest::Closed),
                        () = self.worker.drain_started() => return Err(NoRequest::Closed),
                    }
                }
                // Inside a head: the whole head must arrive by the deadline (slowloris).
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, self.down.read(buf)).await {
                        Ok(read) => read,
                        Err(_) => return Err(NoRequest::Reject(408, Flag::DownstreamTimeout)),
                    }
                }
            };
            self.inbuf = buf;
            match read {
                Ok(0) if self.inbuf.is_empty() => return Err(NoRequest::Closed),
                Ok(0) => {
                    self.error(Flag::DownstreamReset);
                    return Err(NoRequest::Closed);
                }
                Ok(n) => {
                    self.stats.received(n as u64);
                    if deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + self.settings.header_timeout);
                    }
                }
                Err(_) => {
                    self.error(Flag::DownstreamReset);
                    return Err(NoRequest::Closed);
                }
            }
        }
    }

    /// Begins the request's span, when spans are exported and it came with one sampled
    /// `traceparent`, noting where a version-00 one's parent id is, to be written over.
    fn begin_span(&mut self, head: &RequestHead) {
        let Some(tracer) = self.worker.tracer() else {
            return;
        };
        let field = |range: &std::ops::Range<usize>| &self.inbuf[range.clone()];
        let traceparent = RawHead(&self.inbuf[..head.len]).only("traceparent");
        let (method, host, path) = (
            field(&head.method_name),
            field(&head.host),
            field(&head.path),
        );
        let value = traceparent.map(|(_, value)| value);
        self.span = tracer.begin(value, method, host, path);
        self.span_at = traceparent
            .filter(|(_, value)| value.len() == 55 && value.starts_with(b"00-"))
            .map(|(at, _)| at);
    }

    /// Turns a request offering an upgrade to h2c into the plain HTTP/1.1 request it also is,
    /// in place at the front of `inbuf`: the switch would carry every later request to where
    /// this one went, past the routes. None: the rewritten head no longer parses (cannot
    /// happen for a head that parsed; the connection closes).
    fn decline_h2c_upgrade(&mut self, head: &RequestHead) -> Option<RequestHead> {
        let plain = head::without_h2c_upgrade(&self.inbuf[..head.len], head.keep_alive);
        match self.replace_head(head, plain) {
            Ok(plain) if !plain.upgrade => Some(plain),
            _ => {
                tracing::debug!("a request declining h2c no longer parses");
                None
            }
        }
    }

    /// Puts `rewritten` in the place of the request head at the front of `inbuf`, if it
    /// parses under the listener's limits; else leaves `inbuf` as it was and says why.
    fn replace_head(
        &mut self,
        head: &RequestHead,
        rewritten: Vec<u8>,
    ) -> Result<RequestHead, HeadError> {
        let parsed = match head::parse_request(&rewritten, &self.limits)? {
            Some(parsed) if parsed.len == rewritten.len() => parsed,
            _ => {
                return Err(HeadError::Malformed(
                    "a rewritten head that is not one head",
                ));
            }
        };
        self.inbuf.splice(..head.len, rewritten);
        Ok(parsed)
    }

    /// Whether the listener's authorization lets the client make this request.
    fn admits(&self, head: &RequestHead) -> bool {
        self.caller.may_request(
            &self.view.snapshot.listeners[self.listener],
            self.access,
            &self.inbuf[head.method_name.clone()],
            &self.inbuf[head.path.clone()],
        )
    }

    /// Routes a request and carries it (its URL and headers changed as its route says), or
    /// answers it: no route matched (404), the route redirects (or would, but the request's
    /// host is no plain host: 400), or the head the route's changes made breaks the limits
    /// (431).
    async fn route(&mut self, head: &RequestHead, started: Instant) -> Next {
        let view = self.view.clone();
        let route = view.snapshot.listeners[self.listener]
            .kind
            .routes()
            .and_then(|routes| {
                routes.route(
                    &self.inbuf[head.host.clone()],
                    (
                        &self.inbuf[head.method_name.clone()],
                        &self.inbuf[head.path.clone()],
                    ),
                    &RawHead(&self.inbuf[..head.len]),
                    &view.regexes,
                )
            });
        let Some(route) = route else {
            return self.refuse(head, 404, Flag::NoRoute, started).await;
        };
        if let Some(redirect) = &route.redirect {
            let answer = match route.location(
                redirect,
                &self.inbuf[head.host.clone()],
                &self.inbuf[head.path.clone()],
            ) {
                Some(location) => Answer::Redirect(redirect.status, location),
                None => Answer::Refusal(400, Flag::DownstreamProtocolError),
            };
            return self.answer(head, answer, started).await;
        }
        let chosen = route.choose(view.roll());
        if route.rewrite.is_none() && route.request_headers.is_none() {
            match (&self.span, self.span_at) {
                (None, _) => return self.exchange(head, chosen, started).await,
                // A traced request's parent id and flags written over in place.
                (Some(span), Some(at)) => {
                    span.write_parent(&mut self.inbuf[at + 36..at + 55]);
                    return self.exchange(head, chosen, started).await;
                }
                (Some(_), None) => {}
            }
        }
        // The route's rewrite, then its header edits (which cannot touch `Host`), then the
        // trace context with this proxy's span as the parent.
        let mut rewritten = self.inbuf[..head.len].to_vec();
        if let Some(rewrite) = &route.rewrite {
            let target = match &rewrite.path {
                Some(path) => route.rewritten_target(path, &self.inbuf[head.path.clone()]),
                None => self.inbuf[head.path.clone()].to_vec(),
            };
            let host = rewrite.hostname.as_deref().map(str::as_bytes);
            rewritten = head::retargeted(&rewritten, head, &target, host);
        }
        if let Some(edits) = &route.request_headers {
            rewritten = head::edited(&rewritten, edits);
        }
        if let Some(span) = &self.span {
            rewritten = head::with_traceparent(&rewritten, &span.traceparent());
        }
        match self.replace_head(head, rewritten) {
            Ok(rewritten) => self.exchange(&rewritten, chosen, started).await,
            Err(error) => {
                // The route's changes took the head past the listener's limits.
                tracing::debug!(%error, "a request head with its route's changes");
                self.refuse(head, error.status(), error.flag(), started)
                    .await
            }
        }
    }

    /// Spends a request of the client's from the listener's rate limit: false when it has
    /// no room for it.
    fn spend_rate_limit(&self) -> bool {
        self.caller
            .spend_rate_limit(&self.view.snapshot.listeners[self.listener])
    }

    /// Answers a request the listener's rate limit has no room for.
    async fn rate_limited(&mut self, head: &RequestHead, started: Instant) -> Next {
        let listener = &self.view.snapshot.listeners[self.listener];
        self.caller.log_rate_limited(listener, &self.stats);
        self.refuse(head, 429, Flag::RateLimited, started).await
    }

    /// Answers a request from a client the listener's authorization does not let in.
    async fn forbidden(&mut self, head: &RequestHead, started: Instant) -> Next {
        let listener = &self.view.snapshot.listeners[self.listener];
        self.caller.log_refused_request(listener, &self.stats);
        self.refuse(head, 403, Flag::Unauthorized, started).await
    }

    /// Answers a request with an error, without passing it on (see [`Conn::answer`]).
    async fn refuse(
        &mut self,
        head: &RequestHead,
        status: u16,
        flag: Flag,
        started: Instant,
    ) -> Next {
        self.answer(head, Answer::Refusal(status, flag), started)
            .await
    }

    /// Answers a request without passing it on. A body of known length up to
    /// [`REPLAY_LIMIT`] (not held back by `Expect: 100-continue`) is read and dropped, so the
    /// connection goes on; after any other body it closes.
    async fn answer(&mut self, head: &RequestHead, answer: Answer, started: Instant) -> Next {
        let len = match head.framing {
            Framing::Empty => head.len,
            Framing::Length(body) if !head.expect_continue && body <= REPLAY_LIMIT as u64 => {
                let len = head.len + body as usize;
                if let Err(next) = self.read_whole(len, started).await {
                    return next;
                }
                len
            }
            _ => {
                self.inbuf.drain(..head.len);
                return self.send_answer(answer, true, started).await;
            }
        };
        self.release(len, head.len);
        self.send_answer(answer, !head.keep_alive, started).await
    }

    /// Sends the proxy's own answer: an error, counted under its flag, or a redirect.
    async fn send_answer(&mut self, answer: Answer, close: bool, started: Instant) -> Next {
        match answer {
            Answer::Refusal(status, flag) => self.reply(status, flag, close, started).await,
            Answer::Redirect(status, location) => {
                let close = close || self.worker.draining();
                let message = redirect_bytes(status, &location, close);
                let len = message.len();
                self.stats.sent(len as u64);
                self.answered(status, None, started);
                let (written, _) = self.down.write_all(message, 0..len).await;
                if written.is_err() || close {
                    Next::Close
                } else {
                    Next::KeepAlive
                }
            }
        }
    }

    /// Carries one request to `route`'s cluster and its response back.
    ///
    /// A request is kept whole at the front of `inbuf` until its response head arrives, so
    /// that it can go again, when it has no body, or when its cluster may retry it and its
    /// body's length is known and at most [`REPLAY_LIMIT`] (the body is then read whole
    /// before the request goes). Any other body streams upstream as it arrives, and its
    /// request goes once: its head is drained as soon as it is out. A request kept whole goes
    /// again when its pooled connection turns out stale (idempotent methods only, once, on a
    /// new connection) and when its cluster's retry policy names the failure (each time to
    /// the next endpoint, within the route's timeout and the budget).
    async fn exchange(&mut self, head: &RequestHead, route: Chosen<'_>, started: Instant) -> Next {
        let cluster = route.cluster;
        let view = self.view.clone();
        let upstream_stats = &*view.clusters[cluster];
        let policy = view.snapshot.clusters[cluster].retries.as_ref();
        // How many bytes of `inbuf` the request is, when it is kept whole.
        let whole = match head.framing {
            Framing::Empty => Some(head.len),
            Framing::Length(body)
                if policy.is_some() && !head.expect_continue && body <= REPLAY_LIMIT as u64 =>
            {
                let whole = head.len + body as usize;
                if let Err(next) = self.read_whole(whole, started).await {
                    return next;
                }
                Some(whole)
            }
            _ => None,
        };
        // Whether the client's connection still holds body bytes the proxy has not read.
        let streams_body = whole.is_none();
        // Whether an answer of the proxy's own ends the client's connection.
        let must_close = streams_body || !head.keep_alive;
        let mut body_done = !streams_body;
        let retries = policy.filter(|_| !streams_body);
        let mut attempts = Attempts::start(retries, route.timeout, upstream_stats);
        let mut stale_retried = false;
        // The current attempt's place under the cluster's connection limit, kept for the
        // next attempt when one fails.
        let mut slot = None;
        let (up, addr, response, _in_flight) = loop {
            // A retry after a stale connection connects afresh: connections parked as long as
            // the stale one probably went stale with it.
            let attempt_started = tokio::time::Instant::now();
            let checked_out = self.checkout(cluster, !stale_retried, &mut slot).await;
            let (up, addr, reused) = match checked_out {
                Ok(checked_out) => checked_out,
                Err(flag) => {
                    self.upstream = Some((cluster, None));
                    self.release(whole.unwrap_or(head.len), head.len);
                    return self.reply(503, flag, must_close, started).await;
                }
            };
            self.upstream = Some((cluster, Some(addr)));
            upstream_stats.request();
            let in_flight = view.in_flight(cluster, addr);
            // A pooled connection the upstream already closed fails here; an idempotent
            // request kept whole is safe to send again on a fresh connection, once (the
            // upstream may have acted on it before closing: RFC 9110 §9.2.2).
            let stale_resend =
                reused && !stale_retried && !streams_body && head.method.idempotent();
            if streams_body && !head.expect_continue {
                // The head and the start of the body go out in one write.
                if let Err(next) = self.request_body(head, &up, cluster, started).await {
                    return next;
                }
                body_done = true;
            } else {
                // The whole request, or the head of one that expects `100 Continue`.
                let len = whole.unwrap_or(head.len);
                let inbuf = std::mem::take(&mut self.inbuf);
                let (written, inbuf) = up.write_all(inbuf, 0..len).await;
                self.inbuf = inbuf;
                if written.is_err() {
                    let _ = up.shutdown(Shutdown::Both);
                    if stale_resend {
                        stale_retried = true;
                        continue;
                    }
                    // A pooled connection that fails a write went stale: not the endpoint's
                    // failure.
                    if !reused {
                        view.answered(cluster, addr, attempt_started, false);
                    }
                    if attempts.again(Failure::Reset) {
                        continue;
                    }
                    self.release(len, head.len);
                    return self
                        .reply(502, Flag::UpstreamReset, must_close, started)
                        .await;
                }
                upstream_stats.sent(len as u64);
                if streams_body {
                    // Expect: 100-continue; the body follows the upstream's 100.
                    self.inbuf.drain(..head.len);
                }
            }
            // A request that may go again has the route's timeout over every attempt; one that
            // cannot (a body, its upload paced by `body_timeout`) has it from when it is out.
            let deadline = if attempts.retryable() {
                attempts.deadline()
            } else {
                tokio::time::Instant::now() + route.timeout
            };
            match self
                .read_response_head(&up, head, route, deadline, &mut body_done)
                .await
            {
                Ok(response) => {
                    view.answered(cluster, addr, attempt_started, response.status < 500);
                    if attempts.again(Failure::Status(response.status)) {
                        // The failed answer goes no further; its connection closes rather than
                        // wait for a body nobody reads.
                        upstream_stats.response(response.status);
                        let _ = up.shutdown(Shutdown::Both);
                        continue;
                    }
                    break (up, addr, response, in_flight);
                }
                Err(UpstreamFailure::Closed) if stale_resend => {
                    let _ = up.shutdown(Shutdown::Both);
                    stale_retried = true;
                }
                Err(failure) => {
                    let _ = up.shutdown(Shutdown::Both);
                    if failure == UpstreamFailure::Timeout {
                        upstream_stats.timeout();
                    }
                    if failure.blames_endpoint(reused) {
                        view.answered(cluster, addr, attempt_started, false);
                    }
                    if failure
                        .retry_as()
                        .is_some_and(|failure| attempts.again(failure))
                    {
                        continue;
                    }
                    if let Some(len) = whole {
                        self.release(len, head.len);
                    }
                    let (status, flag) = failure.reply();
                    let close = !body_done || !head.keep_alive;
                    return self.reply(status, flag, close, started).await;
                }
            }
        };
        if let Some(len) = whole {
            self.release(len, head.len);
        }
        self.respond(head, route, (up, addr, slot), response, !body_done, started)
            .await
    }

    /// Lets go of the first `len` bytes of `inbuf`, a request done with (its head of
    /// `head_len` bytes, and what of its body was kept), giving back the room a body read
    /// whole took.
    fn release(&mut self, len: usize, head_len: usize) {
        self.inbuf.drain(..len);
        if len > head_len {
            self.inbuf.shrink_to(HEAD_BUFFER);
        }
    }

    /// Reads until the first `len` bytes of `inbuf` hold the request head and its whole
    /// body, each read within `body_timeout`; on failure answers or closes and says what
    /// comes next.
    async fn read_whole(&mut self, len: usize, started: Instant) -> Result<(), Next> {
        self.inbuf.reserve(len.saturating_sub(self.inbuf.len()));
        while self.inbuf.len() < len {
            let buf = std::mem::take(&mut self.inbuf);
            let read = tokio::time::timeout(self.settings.body_timeout, self.down.read(buf));
            let Ok((read, buf)) = read.await else {
                // The abandoned read took the buffer; the connection closes.
                return Err(self
                    .reply(408, Flag::DownstreamTimeout, true, started)
                    .await);
            };
            self.inbuf = buf;
            match read {
                Ok(n) if n > 0 => self.stats.received(n as u64),
                _ => {
                    self.error(Flag::DownstreamReset);
                    return Err(Next::Close);
                }
            }
        }
        Ok(())
    }

    /// Streams the request body upstream, after the first `head_len` bytes of `inbuf` (the
    /// head, when it has not been sent yet), counting what moved.
    async fn send_body(
        &mut self,
        head: &RequestHead,
        head_len: usize,
        up: &MaybeTls<B::Stream>,
        cluster: usize,
    ) -> Result<(), BodyError> {
        let timeout = self.settings.body_timeout;
        let moved = body::forward(
            &self.down,
            up,
            head.framing,
            false,
            head_len,
            &mut self.inbuf,
            &mut self.scratch,
            timeout,
        )
        .await?;
        self.stats.received(moved.read);
        self.view.clusters[cluster].sent(head_len as u64 + moved.body);
        Ok(())
    }

    /// Forwards the request head and body (the head is at the front of `inbuf`); on failure
    /// answers or closes and says what comes next.
    async fn request_body(
        &mut self,
        head: &RequestHead,
        up: &MaybeTls<B::Stream>,
        cluster: usize,
        started: Instant,
    ) -> Result<(), Next> {
        match self.send_body(head, head.len, up, cluster).await {
            Ok(()) => Ok(()),
            Err(BodyError::Idle) => {
                let _ = up.shutdown(Shutdown::Both);
                Err(self
                    .reply(408, Flag::DownstreamTimeout, true, started)
                    .await)
            }
            Err(BodyError::Write(_)) => {
                let _ = up.shutdown(Shutdown::Both);
                Err(self.reply(502, Flag::UpstreamReset, true, started).await)
            }
            Err(BodyError::Chunked(why)) => {
                tracing::debug!(why, "malformed request body");
                let _ = up.shutdown(Shutdown::Both);
                Err(self
                    .reply(400, Flag::DownstreamProtocolError, true, started)
                    .await)
            }
            Err(BodyError::Read(_) | BodyError::Truncated) => {
                let _ = up.shutdown(Shutdown::Both);
                self.error(Flag::DownstreamReset);
                Err(Next::Close)
            }
        }
    }

    /// Reads the final response head into `upbuf` by `deadline`, passing interim (1xx)
    /// responses on, and sending an expect-continue body once the upstream asks for it.
    async fn read_response_head(
        &mut self,
        up: &MaybeTls<B::Stream>,
        head: &RequestHead,
        route: Chosen<'_>,
        mut deadline: tokio::time::Instant,
        body_done: &mut bool,
    ) -> Result<ResponseHead, UpstreamFailure> {
        self.upbuf.clear();
        if self.upbuf.capacity() < HEAD_BUFFER {
            self.upbuf.reserve(HEAD_BUFFER);
        }
        loop {
            let parsed = if self.upbuf.is_empty() {
                Ok(None)
            } else {
                head::parse_response(&self.upbuf, &self.limits, head.method)
            };
            match parsed {
                Err(error) => {
                    tracing::debug!(%error, "malformed upstream response");
                    return Err(UpstreamFailure::Protocol);
                }
                Ok(Some(response)) if response.status == 101 && !head.upgrade => {
                    // The connection switched protocols for a request that did not ask to: it
                    // must not serve another request, nor reach the client.
                    tracing::debug!("upstream switched protocols unasked");
                    return Err(UpstreamFailure::Protocol);
                }
                Ok(Some(response))
                    if (100..200).contains(&response.status) && response.status != 101 =>
                {
                    if head.http10 {
                        // An HTTP/1.0 client cannot take one (RFC 9110 §15.2): drop it.
                        self.upbuf.drain(..response.len);
                        continue;
                    }
                    // Interim response: pass it on, then wait for the next.
                    let upbuf = std::mem::take(&mut self.upbuf);
                    let (written, mut upbuf) = self.down.write_all(upbuf, 0..response.len).await;
                    upbuf.drain(..response.len);
                    self.upbuf = upbuf;
                    if written.is_err() {
                        return Err(UpstreamFailure::DownstreamGone);
                    }
                    if response.status == 100 && !*body_done {
                        match self.send_body(head, 0, up, route.cluster).await {
                            Ok(()) => {}
                            // The upstream stopped taking it, or failed.
                            Err(BodyError::Write(_)) => return Err(UpstreamFailure::Reset),
                            Err(BodyError::Idle) => return Err(UpstreamFailure::DownstreamIdle),
                            Err(BodyError::Chunked(_)) => {
                                return Err(UpstreamFailure::DownstreamMalformed);
                            }
                            Err(BodyError::Read(_) | BodyError::Truncated) => {
                                return Err(UpstreamFailure::DownstreamGone);
                            }
                        }
                        *body_done = true;
                        // The route timeout bounds the wait for the response, not the
                        // upload (its pace is `body_timeout`'s): it starts again once the
                        // body is out, as it does for a body sent without `Expect`.
                        deadline = tokio::time::Instant::now() + route.timeout;
                    }
                    continue;
                }
                Ok(Some(response)) => return Ok(response),
                Ok(None) => {}
            }
            let upbuf = std::mem::take(&mut self.upbuf);
            let (read, upbuf) = match tokio::time::timeout_at(deadline, up.read(upbuf)).await {
                Ok(read) => read,
                Err(_) => return Err(UpstreamFailure::Timeout),
            };
            self.upbuf = upbuf;
            match read {
                // Nothing came back: a connection the upstream had closed while it sat in the
                // pool (over TLS the close shows as an error, not an end of stream).
                Ok(0) | Err(_) if self.upbuf.is_empty() => return Err(UpstreamFailure::Closed),
                Ok(0) | Err(_) => return Err(UpstreamFailure::Reset),
                Ok(n) => self.view.clusters[route.cluster].received(n as u64),
            }
        }
    }

    /// Sends the response head and body to the client, then parks or drops the upstream.
    async fn respond(
        &mut self,
        head: &RequestHead,
        route: Chosen<'_>,
        (up, addr, slot): (MaybeTls<B::Stream>, SocketAddr, Option<Slot>),
        response: ResponseHead,
        body_unsent: bool,
        started: Instant,
    ) -> Next {
        let cluster = route.cluster;
        let upstream_stats = &self.view.clusters[cluster];
        upstream_stats.response(response.status);

        if response.status == 101 && head.upgrade {
            return self.upgrade(up, response, cluster, started).await;
        }
        // An HTTP/1.0 client cannot read chunked (RFC 9112 §7.1): it gets the data alone,
        // delimited by the close.
        let dechunk = head.http10 && response.framing == Framing::Chunked;
        let close = !head.keep_alive
            || self.worker.draining()
            || response.framing == Framing::UntilClose
            || body_unsent
            || dechunk;
        let mut pending = std::mem::take(&mut self.upbuf);
        // Normally the head goes out as received, in one write with the body's start; a
        // route's header edits are made; when the proxy closes a connection the client
        // wanted kept, the head says so, and a head for an HTTP/1.0 client loses `chunked`.
        let edited = route
            .response_headers
            .map(|edits| head::edited(&pending[..response.len], edits));
        let received = edited.as_deref().unwrap_or(&pending[..response.len]);
        let rewritten = if dechunk {
            Some(head::dechunked(received))
        } else if close && !response.says_close && head.keep_alive {
            Some(head::with_connection_close(received))
        } else {
            edited
        };
        // A rewritten head takes the received one's place, to go out with the body's start.
        let head_len = match rewritten {
            Some(rewritten) => {
                let len = rewritten.len();
                pending.splice(..response.len, rewritten);
                len
            }
            None => response.len,
        };
        let forwarded = body::forward(
            &up,
            &self.down,
            response.framing,
            dechunk,
            head_len,
            &mut pending,
            &mut self.scratch,
            self.view.snapshot.clusters[cluster].idle_timeout,
        )
        .await;
        let leftover = !pending.is_empty();
        pending.clear();
        self.upbuf = pending;
        match forwarded {
            Ok(moved) => {
                self.stats.sent(head_len as u64 + moved.body);
                upstream_stats.received(moved.read);
            }
            Err(BodyError::Write(_)) => {
                // The client went away or stopped reading (its connection aborted): nothing
                // more can reach it, a `close_notify` included.
                let _ = up.shutdown(Shutdown::Both);
                self.error(Flag::DownstreamReset);
                return Next::Reset;
            }
            Err(error) => {
                // The head is already out: the client can only learn by how the connection
                // ends.
                tracing::debug!(%error, "upstream response body failed");
                let _ = up.shutdown(Shutdown::Both);
                self.error(Flag::UpstreamReset);
                return Next::Reset;
            }
        }
        self.answered(response.status, None, started);
        // The request went upstream as it came: one that asked to close (`Connection:
        // close`, HTTP/1.0 without keep-alive) leaves the upstream bound to close, whether or
        // not its response says so (RFC 9112 §9.6), so its connection is not parked.
        if response.keep_alive
            && head.keep_alive
            && !leftover
            && !body_unsent
            && !self.worker.draining()
            && self.worker.pools(&self.view, cluster, addr)
        {
            self.worker
                .pool
                .put(&self.view.snapshot.clusters[cluster], addr, up, slot);
        } else {
            let _ = up.shutdown(Shutdown::Both);
        }
        if close { Next::Close } else { Next::KeepAlive }
    }

    /// Passes a `101 Switching Protocols` on and pumps bytes both ways until both end.
    async fn upgrade(
        &mut self,
        up: MaybeTls<B::Stream>,
        response: ResponseHead,
        cluster: usize,
        started: Instant,
    ) -> Next {
        let upbuf = std::mem::take(&mut self.upbuf);
        let (written, mut upbuf) = self.down.write_all(upbuf, 0..response.len).await;
        if written.is_err() {
            let _ = up.shutdown(Shutdown::Both);
            return Next::Close;
        }
        self.stats.sent(response.len as u64);
        self.answered(101, None, started);
        upbuf.drain(..response.len);
        let to_up = std::mem::take(&mut self.inbuf);
        let idle = self.view.snapshot.clusters[cluster].idle_timeout;
        let stats = &*self.stats;
        let upstream = &self.view.clusters[cluster];
        pump_counted(&self.down, &up, to_up, upbuf, idle, stats, upstream).await;
        Next::Close
    }

    /// A pooled connection to the cluster's next endpoint (when `pooled`), or a new one
    /// within the cluster's connection limit (at the limit, a pooled one to any of its
    /// endpoints may serve instead: [`Worker::upstream_room`]), with whether it was pooled;
    /// or the flag of why there is none. `slot` ends holding the connection's place under
    /// the limit; one it already holds (a failed attempt's) serves a new connection.
    async fn checkout(
        &self,
        cluster: usize,
        pooled: bool,
        slot: &mut Option<Slot>,
    ) -> Result<(MaybeTls<B::Stream>, SocketAddr, bool), Flag> {
        let failed = Flag::UpstreamConnectFailure;
        let plan = self.view.snapshot.clusters.get(cluster).ok_or(failed)?;
        // Round robin picks the endpoint; the pool only saves the handshake.
        let addr = self.view.next_endpoint(cluster).ok_or(failed)?;
        // A pooled connection goes first to those waiting for room, if any.
        let mut parked = (pooled && !self.worker.waiting_for_room(&self.view, cluster))
            .then(|| self.worker.pool.take(plan, addr))
            .flatten()
            .map(|(stream, parked_slot)| (stream, parked_slot, addr));
        if parked.is_none() && slot.is_none() {
            let usable = |addr| !self.view.failing.passed_over(&plan.name, addr);
            let reuse = || {
                pooled
                    .then(|| self.worker.pool.take_any(plan, usable))
                    .flatten()
            };
            let room = self
                .worker
                .upstream_room(&self.view, cluster, reuse, Sharing::Exclusive);
            match room.await {
                Ok(Room::Slot(room)) => *slot = room,
                Ok(Room::Reuse(any)) => parked = Some(any),
                Err(_) => return Err(Flag::UpstreamOverflow),
            }
        }
        if let Some((stream, parked_slot, addr)) = parked {
            self.view.clusters[cluster].reused();
            *slot = parked_slot;
            return Ok((stream, addr, true));
        }
        let (stream, addr) =
            super::connect_from::<B>(&self.view, cluster, addr, super::Inner::Http1)
                .await
                .ok_or(failed)?;
        Ok((stream, addr, false))
    }

    /// Counts an error under `flag`, which the access log names if it ends the exchange.
    fn error(&mut self, flag: Flag) {
        self.stats.error(flag);
        self.failure = Some(flag);
    }

    /// Counts a response (and logs the exchange, with an access log).
    fn answered(&mut self, status: u16, flag: Option<Flag>, started: Instant) {
        self.stats.response(status, started.elapsed());
        self.log(Some(status), flag, started);
    }

    /// Writes the exchange's access log line, with an access log, once.
    fn log(&mut self, status: Option<u16>, flag: Option<Flag>, started: Instant) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        if let Some(log) = self.worker.access_log() {
            let duration = started.elapsed();
            let snapshot = &self.view.snapshot;
            log.record(&Entry {
                listener: &snapshot.listeners[self.listener].name,
                caller: &self.caller,
                protocol: "HTTP/1.1",
                request_fields: &self.request_fields,
                status,
                flag,
                upstream: self
                    .upstream
                    .map(|(c, addr)| (&*snapshot.clusters[c].name, addr)),
                bytes: None,
                duration,
            });
        }
        if let (Some(tracer), Some(span)) = (self.worker.tracer(), self.span.take()) {
            let snapshot = &self.view.snapshot;
            let listener = &snapshot.listeners[self.listener];
            tracer.end(
                span,
                &Ended {
                    kind: trace::Kind::of(listener),
                    protocol: "1.1",
                    status,
                    flag,
                    listener: &listener.name,
                    cluster: self.upstream.map(|(c, _)| &*snapshot.clusters[c].name),
                    peer: self.caller.identity.as_ref(),
                },
            );
        }
    }

    /// Sends a response the proxy makes itself, counts it, and says what comes next.
    async fn reply(&mut self, status: u16, flag: Flag, close: bool, started: Instant) -> Next {
        self.stats.error(flag);
        let close = close || self.worker.draining();
        let message = reply_bytes(status, flag, close);
        let len = message.len();
        self.stats.sent(len as u64);
        self.answered(status, Some(flag), started);
        let (written, _) = self.down.write_all(message, 0..len).await;
        if written.is_err() || close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }
}

/// How the upstream failed before a response head arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamFailure {
    /// Closed or failed before sending anything (a stale pooled connection, typically).
    Closed,
    /// Closed or failed mid-head.
    Reset,
    /// No response head within the route timeout.
    Timeout,
    /// Sent something that is not an HTTP response.
    Protocol,
    /// The client went away while an interim response or body was passed on.
    DownstreamGone,
    /// The client's body (sent after `100 Continue`) went idle for `body_timeout`.
    DownstreamIdle,
    /// The client's body (sent after `100 Continue`) had invalid chunked framing.
    DownstreamMalformed,
}

impl UpstreamFailure {
    /// The failure as a retry policy names it, where one can.
    fn retry_as(self) -> Option<Failure> {
        match self {
            UpstreamFailure::Closed | UpstreamFailure::Reset => Some(Failure::Reset),
            UpstreamFailure::Timeout => Some(Failure::PerTryTimeout),
            _ => None,
        }
    }

    /// Whether it counts against the endpoint (outlier detection): not the client's doing,
    /// nor a `reused` pooled connection found closed (it went stale while parked).
    fn blames_endpoint(self, reused: bool) -> bool {
        match self {
            UpstreamFailure::Closed => !reused,
            UpstreamFailure::Reset | UpstreamFailure::Timeout | UpstreamFailure::Protocol => true,
            UpstreamFailure::DownstreamGone
            | UpstreamFailure::DownstreamIdle
            | UpstreamFailure::DownstreamMalformed => false,
        }
    }

    fn reply(self) -> (u16, Flag) {
        match self {
            UpstreamFailure::Closed | UpstreamFailure::Reset => (502, Flag::UpstreamReset),
            UpstreamFailure::Timeout => (504, Flag::UpstreamTimeout),
            UpstreamFailure::Protocol => (502, Flag::UpstreamProtocolError),
            UpstreamFailure::DownstreamGone => (400, Flag::DownstreamReset),
            UpstreamFailure::DownstreamIdle => (408, Flag::DownstreamTimeout),
            UpstreamFailure::DownstreamMalformed => (400, Flag::DownstreamProtocolError),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        501 => "Not Implemented",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// What the proxy answers a request with itself.
enum Answer {
    /// An error: its status and flag.
    Refusal(u16, Flag),
    /// A route's redirect: its status and `Location`.
    Redirect(u16, Vec<u8>),
}

/// The bytes of a redirect.
fn redirect_bytes(status: u16, location: &[u8], close: bool) -> Vec<u8> {
    let reason = reason(status);
    let connection: &[u8] = if close { b"connection: close\r\n" } else { b"" };
    [
        format!("HTTP/1.1 {status} {reason}\r\nlocation: ").as_bytes(),
        location,
        b"\r\ncontent-length: 0\r\n",
        connection,
        b"\r\n",
    ]
    .concat()
}

/// The bytes of a response the proxy makes itself.
fn reply_bytes(status: u16, flag: Flag, close: bool) -> Vec<u8> {
    let reason = reason(status);
    let body_len = reason.len() + 1;
    let connection = if close { "connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {body_len}\r\nx-tern-response-flag: {}\r\n{connection}\r\n{reason}\n",
        flag.code()
    )
    .into_bytes()
}
