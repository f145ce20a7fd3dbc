//! Distributed tracing, as Linkerd's proxy does it: an HTTP request that arrives with one
//! W3C `traceparent` whose sampled flag is set (the application, or the sidecar before this
//! one, decided to trace it) gets a span from this proxy, and the request goes on with this
//! span as the parent (`traceparent` rewritten; `tracestate` passed as it is), so the spans
//! of the client, both sidecars and the server nest. A request without one, unsampled, with
//! two, or with one that does not parse is passed on untouched; the proxy starts no trace of
//! its own. Spans go to an OpenTelemetry collector as OTLP/HTTP JSON (`POST /v1/traces`),
//! when `--trace-collector` names one.
//!
//! Each worker encodes its spans into a buffer of its own and hands it to the exporter
//! thread when it holds [`FLUSH_AT`] bytes, and every [`FLUSH_EVERY`]; the exporter posts
//! what is waiting, merged. A queue that is full (a collector slower than the traffic) drops
//! the batch and counts its spans (`tern_trace_spans_total{result="dropped"}`), and a
//! collector that cannot be reached fails its batches (`result="failed"`): requests never
//! wait for either. A drain ends with the workers' last spans sent
//! ([`Exporter::finish`]).
//!
//! A span ends when the request's access log line would be written (HTTP/1.1: at the end of
//! the response body, or at a `101`; HTTP/2: at the response head), or when the request
//! fails. Its name is the method, its kind `SERVER` on a listener that terminates mTLS (the
//! inbound sidecar) and `CLIENT` elsewhere, and its attributes the request's method, path
//! (without the query), host and port, status, the proxy's flag (`error.type`), listener,
//! cluster and the peer's identity. Its status is an error for a flag, a 5xx, or a 4xx on
//! the client's side (OpenTelemetry's HTTP conventions).

use std::cell::{Cell, RefCell};
use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::metrics::Flag;

/// A worker hands its spans over once they take this much.
pub const FLUSH_AT: usize = 64 * 1024;
/// And at least this often, when it has any.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Batches waiting for the exporter; more are dropped.
const QUEUE: usize = 32;
/// The most the exporter merges into one request.
const POST_AT_MOST: usize = 1024 * 1024;
/// The trace flags passed on: sampled, and W3C Trace Context Level 2's random; the spec has
/// a proxy clear the bits it does not know.
const KNOWN_FLAGS: u8 = 0x03;
/// The most a request field (method, path, authority) takes of a span.
const FIELD_AT_MOST: usize = 256;
/// How long the exporter gives the collector to connect and to answer.
const COLLECTOR_TIMEOUT: Duration = Duration::from_secs(5);

/// A request's W3C trace context (`traceparent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl Context {
    /// Reads a `traceparent` value: `00-<trace id>-<parent id>-<flags>`, lower-case hex. A
    /// later version is read as version 00 is, past its first four fields (the spec's rule
    /// for versions it does not know); version `ff`, zero ids and anything else are `None`.
    pub fn parse(value: &[u8]) -> Option<Context> {
        let value = value.trim_ascii();
        let version = hex::<1>(value.get(0..2)?)?[0];
        let well_formed = value.len() >= 55
            && (value.len() == 55 || (version != 0 && value[55] == b'-'))
            && value[2] == b'-'
            && value[35] == b'-'
            && value[52] == b'-';
        if version == 0xff || !well_formed {
            return None;
        }
        let context = Context {
            trace_id: hex(&value[3..35])?,
            parent_id: hex(&value[36..52])?,
            flags: hex::<1>(&value[53..55])?[0],
        };
        (context.trace_id != [0; 16] && context.parent_id != [0; 8]).then_some(context)
    }

    /// Whether the caller asked for the request to be traced.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

fn hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    // Lower case only, as the spec writes it.
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` as hex.
fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    out.resize(start + 2 * bytes.len(), 0);
    hex_into(&mut out[start..], bytes);
}

/// Writes `bytes` as hex into `out` (twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX_DIGITS[usize::from(b >> 4)];
        pair[1] = HEX_DIGITS[usize::from(b & 15)];
    }
}

/// Whose side of the call a span is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The callee's sidecar (a listener terminating mTLS).
    Server,
    /// The caller's side.
    Client,
}

impl Kind {
    /// The side a listener's requests are on: the server's when it terminates mTLS.
    pub fn of(listener: &crate::snapshot::ListenerPlan) -> Kind {
        if listener.tls.is_some() {
            Kind::Server
        } else {
            Kind::Client
        }
    }
}

/// A span under way: the request's context, this proxy's span id, when it began and the
/// request's fields (encoded, as the request's bytes may be gone by its end).
#[derive(Debug)]
pub struct Span {
    context: Context,
    id: [u8; 8],
    /// When it began: the wall clock for its start, the monotonic one for its length.
    start: SystemTime,
    began: Instant,
    /// The span's name (the method, a JSON string), then the request's attributes, each
    /// after a comma.
    request: Vec<u8>,
    name_len: usize,
}

impl Span {
    /// The `traceparent` the request goes on with: this span as the parent.
    pub fn traceparent(&self) -> [u8; 55] {
        let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&mut value[3..35], &self.context.trace_id);
        self.write_parent(&mut value[36..]);
        value
    }

    /// Writes this span's id and the flags over the last two fields of a version-00
    /// `traceparent` (`out`: the 19 bytes after the trace id's dash), as [`Self::traceparent`]
    /// writes them.
    pub fn write_parent(&self, out: &mut [u8]) {
        if out.len() < 19 {
            return;
        }
        hex_into(&mut out[..16], &self.id);
        out[16] = b'-';
        hex_into(&mut out[17..19], &[self.context.flags & KNOWN_FLAGS]);
    }
}

/// How a traced request ended.
#[derive(Debug)]
pub struct Ended<'a> {
    /// The side of the call.
    pub kind: Kind,
    /// `1.1` or `2`.
    pub protocol: &'static str,
    /// The status answered; none when the client went away first.
    pub status: Option<u16>,
    /// The proxy's flag, when it failed or refused the request.
    pub flag: Option<Flag>,
    /// The listener's name.
    pub listener: &'a str,
    /// The cluster it went to, if routed.
    pub cluster: Option<&'a str>,
    /// The caller's mTLS identity.
    pub peer: Option<&'a shared::SpiffeId>,
}

/// One worker's spans on their way to the exporter.
pub struct Tracer {
    /// The exporter's queue; none once it finished.
    queue: Option<SyncSender<Batch>>,
    buf: RefCell<Vec<u8>>,
    spans: Cell<u64>,
    dropped: Cell<u64>,
    /// The state of the span id generator (splitmix64, seeded from the system's randomness).
    next_id: Cell<u64>,
}

impl Tracer {
    /// A worker's tracer, exporting through `exporter`.
    pub fn new(exporter: &Exporter) -> Tracer {
        let mut seed = [0; 8];
        // No randomness at all (it cannot fail on Linux) would still give distinct ids per
        // worker from the clock.
        if aws_lc_rs::rand::fill(&mut seed).is_err() {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            seed = (nanos as u64).to_le_bytes();
        }
        Tracer {
            queue: exporter.queue(),
            buf: RefCell::new(Vec::new()),
            spans: Cell::new(0),
            dropped: Cell::new(0),
            next_id: Cell::new(u64::from_le_bytes(seed)),
        }
    }

    /// Spans this worker dropped: the exporter's queue was full (or, after a drain, gone).
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Begins a span for a request whose `traceparent` is `traceparent`, if it is sampled;
    /// `method`, `authority` and `path` are the request's.
    pub fn begin(
        &self,
        traceparent: Option<&[u8]>,
        method: &[u8],
        authority: &[u8],
        path: &[u8],
    ) -> Option<Span> {
        let context = Context::parse(traceparent?).filter(Context::sampled)?;
        let path = path.split(|&b| b == b'?').next().unwrap_or_default();
        let mut request = Vec::with_capacity(192);
        crate::access_log::json_string(&mut request, method, FIELD_AT_MOST);
        let name_len = request.len();
        attribute(&mut request, "http.request.method", method);
        attribute(&mut request, "url.path", path);
        let (host, port) = split_authority(authority);
        attribute(&mut request, "server.address", host);
        if let Some(port) = port {
            int_attribute(&mut request, "server.port", port.into());
        }
        Some(Span {
            context,
            id: self.span_id(),
            start: SystemTime::now(),
            began: Instant::now(),
            request,
            name_len,
        })
    }

    fn span_id(&self) -> [u8; 8] {
        loop {
            let state = self.next_id.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            self.next_id.set(state);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            if z != 0 {
                return z.to_le_bytes();
            }
        }
    }

    /// Ends `span` as `ended` says; hands the buffer over once it is full.
    pub fn end(&self, span: Span, ended: &Ended<'_>) {
        let full = {
            let mut out = self.buf.borrow_mut();
            encode(&mut out, &span, ended);
            self.spans.set(self.spans.get() + 1);
            out.len() >= FLUSH_AT
        };
        if full {
            self.flush();
        }
    }

    /// Hands what the buffer holds to the exporter (or drops it, counted, when its queue is
    /// full).
    pub fn flush(&self) {
        let spans = self.spans.replace(0);
        if spans == 0 {
            return;
        }
        let json = std::mem::take(&mut *self.buf.borrow_mut());
        let batch = Batch { spans, json };
        let sent = match &self.queue {
            Some(queue) => queue.try_send(batch),
            None => Err(TrySendError::Disconnected(batch)),
        };
        if let Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) = sent {
            self.dropped.set(self.dropped.get() + batch.spans);
        }
    }
}

/// A worker that stops hands over what it holds (its spans of a drain's last second).
impl Drop for Tracer {
    fn drop(&mut self) {
        self.flush();
    }
}

/// An authority's host and port: `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_authority(authority: &[u8]) -> (&[u8], Option<u16>) {
    let port_of = |text: &[u8]| std::str::from_utf8(text).ok()?.parse().ok();
    if authority.first() == Some(&b'[') {
        return match authority.iter().position(|&b| b == b']') {
            Some(end) => {
                let port = authority
                    .get(end + 1..)
                    .and_then(|rest| rest.strip_prefix(b":"));
                (&authority[1..end], port.and_then(port_of))
            }
            None => (authority, None),
        };
    }
    match authority.iter().rposition(|&b| b == b':') {
        Some(colon) if !authority[..colon].contains(&b':') => {
            match port_of(&authority[colon + 1..]) {
                Some(port) => (&authority[..colon], Some(port)),
                None => (authority, None),
            }
        }
        _ => (authority, None),
    }
}

/// Appends `,{"key": …, "value": {"intValue": "…"}}` (OTLP JSON writes 64-bit integers as
/// strings).
fn int_attribute(out: &mut Vec<u8>, key: &str, value: u64) {
    let _ = write!(
        out,
        ",{{\"key\":\"{key}\",\"value\":{{\"intValue\":\"{value}\"}}}}"
    );
}

/// Appends `,{"key": …, "value": {"stringValue": …}}`.
fn attribute(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(b",{\"key\":\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\",\"value\":{\"stringValue\":");
    crate::access_log::json_string(out, value, FIELD_AT_MOST);
    out.extend_from_slice(b"}}");
}

fn unix_nanos(time: SystemTime) -> u128 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Appends one OTLP JSON `Span` (after a comma when the buffer holds others).
fn encode(out: &mut Vec<u8>, span: &Span, ended: &Ended<'_>) {
    if !out.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(b"{\"traceId\":\"");
    write_hex(out, &span.context.trace_id);
    out.extend_from_slice(b"\",\"spanId\":\"");
    write_hex(out, &span.id);
    out.extend_from_slice(b"\",\"parentSpanId\":\"");
    write_hex(out, &span.context.parent_id);
    out.extend_from_slice(b"\",\"name\":");
    let (name, attributes) = span.request.split_at(span.name_len);
    out.extend_from_slice(name);
    let kind = match ended.kind {
        Kind::Server => 2,
        Kind::Client => 3,
    };
    let end = span.start + span.began.elapsed();
    let _ = write!(
        out,
        ",\"kind\":{kind},\"startTimeUnixNano\":\"{}\",\"endTimeUnixNano\":\"{}\",\"attributes\":[",
        unix_nanos(span.start),
        unix_nanos(end)
    );
    // The request's attributes, less the comma before the first.
    out.extend_from_slice(attributes.get(1..).unwrap_or_default());
    if let Some(status) = ended.status {
        int_attribute(out, "http.response.status_code", status.into());
    }
    attribute(out, "network.protocol.version", ended.protocol.as_bytes());
    attribute(out, "tern.listener", ended.listener.as_bytes());
    if let Some(cluster) = ended.cluster {
        attribute(out, "tern.cluster", cluster.as_bytes());
    }
    if let Some(peer) = ended.peer {
        attribute(out, "tern.peer.identity", peer.to_string().as_bytes());
    }
    // The proxy's flag, or a client that went away before the answer.
    let flag = match (ended.flag, ended.status) {
        (Some(flag), _) => Some(flag.code()),
        (None, None) => Some(Flag::DownstreamReset.code()),
        (None, Some(_)) => None,
    };
    if let Some(flag) = flag {
        attribute(out, "error.type", flag.as_bytes());
    }
    let failed_at = match ended.kind {
        Kind::Server => 500,
        Kind::Client => 400,
    };
    let error = flag.is_some() || ended.status.is_some_and(|s| s >= failed_at);
    out.extend_from_slice(b"],\"status\":{");
    if error {
        out.extend_from_slice(b"\"code\":2");
    }
    out.extend_from_slice(b"}}");
}

/// A worker's spans, encoded, on their way.
struct Batch {
    spans: u64,
    json: Vec<u8>,
}

/// The exporter: a thread posting the workers' batches to the collector. It runs until the
/// last queue (the workers', and its own until [`Exporter::finish`]) is gone and what
/// waited is sent.
pub struct Exporter {
    queue: Mutex<Option<SyncSender<Batch>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
}

/// What the exporter thread shares: its counts, and the socket mark its connections carry.
#[derive(Default)]
struct Shared {
    exported: AtomicU64,
    failed: AtomicU64,
    /// `interception.mark` (0: none), so the interception rules leave the exporter's
    /// connections alone, as every connection the proxy opens.
    mark: AtomicU32,
}

impl Exporter {
    /// Starts the exporter thread, posting to the collector at `collector` (`host:port`,
    /// OTLP/HTTP) as service `service_name`.
    pub fn start(collector: &str, service_name: &str) -> std::io::Result<Arc<Exporter>> {
        check_collector(collector)?;
        let (queue, batches) = std::sync::mpsc::sync_channel(QUEUE);
        let shared = Arc::new(Shared::default());
        let mut resource = Vec::new();
        attribute(&mut resource, "service.name", service_name.as_bytes());
        let envelope = Envelope {
            head: [
                b"{\"resourceSpans\":[{\"resource\":{\"attributes\":[".as_slice(),
                resource.get(1..).unwrap_or_default(),
                b"]},\"scopeSpans\":[{\"scope\":{\"name\":\"tern-proxy\"},\"spans\":[",
            ]
            .concat(),
            tail: b"]}]}]}",
        };
        let (collector, exporting) = (collector.to_owned(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("tern-trace".into())
            .spawn(move || export(&collector, &envelope, &batches, &exporting))?;
        Ok(Arc::new(Exporter {
            queue: Mutex::new(Some(queue)),
            thread: Mutex::new(Some(thread)),
            shared,
        }))
    }

    /// A queue to the exporter, for a worker's tracer; none once it finished.
    fn queue(&self) -> Option<SyncSender<Batch>> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The socket mark of the config to run (`interception.mark`), for the connections to
    /// the collector.
    pub fn set_mark(&self, mark: Option<u32>) {
        self.shared.mark.store(mark.unwrap_or(0), Ordering::Relaxed);
    }

    /// Spans the collector took, and spans it could not be given.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.exported.load(Ordering::Relaxed),
            self.shared.failed.load(Ordering::Relaxed),
        )
    }

    /// Once the workers are gone (their tracers flushed as they went): lets the exporter
    /// send what waits and end, waiting up to `within` for it.
    pub fn finish(&self, within: Duration) {
        drop(
            self.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(thread) = thread else { return };
        let deadline = Instant::now() + within;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                tracing::warn!(
                    "the trace exporter did not finish in time; its last spans are lost"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = thread.join();
    }
}

/// `--trace-collector` is `host:port`.
fn check_collector(collector: &str) -> std::io::Result<()> {
    let bad = |why: &str| {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("trace collector `{collector}`: {why}"),
        ))
    };
    if collector.contains("://") || collector.contains('/') {
        return bad("give host:port, no scheme or path (the path is /v1/traces)");
    }
    match collector.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => bad("give host:port (OTLP/HTTP's port is 4318)"),
    }
}

/// What wraps a batch's spans into an `ExportTraceServiceRequest`.
struct Envelope {
    head: Vec<u8>,
    tail: &'static [u8],
}

/// Posts what the workers send until their queues are gone: what waits is merged into one
/// request, up to [`POST_AT_MOST`]. A collector that fails is said once per run of failures.
fn export(collector: &str, envelope: &Envelope, batches: &Receiver<Batch>, shared: &Shared) {
    let mut failing = false;
    while let Ok(first) = batches.recv() {
        let (mut spans, mut body) = (first.spans, envelope.head.clone());
        body.extend_from_slice(&first.json);
        while body.len() < POST_AT_MOST {
            let Ok(next) = batches.try_recv() else { break };
            body.push(b',');
            body.extend_from_slice(&next.json);
            spans += next.spans;
        }
        body.extend_from_slice(envelope.tail);
        let mark = Some(shared.mark.load(Ordering::Relaxed)).filter(|&m| m != 0);
        match post(collector, &body, mark) {
            Ok(()) => {
                shared.exported.fetch_add(spans, Ordering::Relaxed);
                if std::mem::take(&mut failing) {
                    tracing::info!(collector, "the trace collector takes spans again");
                }
            }
            Err(error) => {
                shared.failed.fetch_add(spans, Ordering::Relaxed);
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(collector, %error, "spans could not be sent to the trace collector; they are dropped (tern_trace_spans_total{{result=\"failed\"}})");
                }
            }
        }
    }
}

/// One `POST /v1/traces` on a connection of its own (to the first of the collector's
/// addresses that connects, carrying `mark`), in one write.
fn post(collector: &str, body: &[u8], mark: Option<u32>) -> std::io::Result<()> {
    use std::net::ToSocketAddrs as _;
    let connect = |address: std::net::SocketAddr| -> std::io::Result<std::net::TcpStream> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        socket.connect_timeout(&address.into(), COLLECTOR_TIMEOUT)?;
        Ok(socket.into())
    };
    let mut stream = None;
    let mut last_error = None;
    for address in collector.to_socket_addrs()? {
        match connect(address) {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(error) => last_error = Some(error),
        }
    }
    let Some(mut stream) = stream else {
        return Err(last_error.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")
        }));
    };
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(COLLECTOR_TIMEOUT))?;
    stream.set_write_timeout(Some(COLLECTOR_TIMEOUT))?;
    let mut request = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: {collector}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request)?;
    let mut answer = [0; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut answer[read..])? {
            0 => break,
            n => read += n,
        }
    }
    let status = answer.get(9..12).unwrap_or_default();
    if answer.starts_with(b"HTTP/1.") && status.first() == Some(&b'2') {
        Ok(())
    } else {
        let line = String::from_utf8_lossy(&answer[..read]);
        Err(std::io::Error::other(format!(
            "the collector answered `{}`",
            line.lines().next().unwrap_or_default()
        )))
    }
}

#[cfg(test)]
mod tests;
