//! Protocol detection: what a plaintext client speaks, told by its first bytes (an HTTP/1.x
//! request line, the HTTP/2 preface, a TLS ClientHello, anything else), within a timeout.
//!
//! Detection waits for readiness rather than a read, so giving up at the timeout loses no
//! bytes on either backend, and a server-speaks-first protocol on a detected port costs the
//! timeout once per connection and still works (as opaque TCP). Such ports are best declared
//! `tcp`, as the control plane does for well-known ones, so they never wait.

use std::rc::Rc;
use std::time::Duration;

use super::{Caller, Inner};
use crate::io::{Backend, Stream};
use crate::metrics::Detected;
use crate::tls::MaybeTls;
use crate::worker::{View, Worker};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest request method taken for HTTP/1.x (`UPDATEREDIRECTREF` is 17).
const MAX_METHOD: usize = 20;

/// Room for the first read; more than any prefix detection needs.
const FIRST_READ: usize = 2048;
/// The most a client's first bytes may hold before they are taken as opaque: past the
/// longest prefix detection needs, and a bound on empty lines before a request line (RFC
/// 9112 §2.2 asks a server to ignore at least one), so a client sending them without end is
/// not buffered for the whole detection timeout.
const MAX_SNIFF: usize = 4096;

/// What `first` (the client's first bytes) are, or `None` while they could still become
/// more than one thing.
pub fn classify(first: &[u8]) -> Option<Detected> {
    match first {
        [] => None,
        [0x16] => None,
        // A TLS handshake record: content type 22, then a 3.x record version.
        [0x16, 0x03, ..] => Some(Detected::Tls),
        _ if first.starts_with(H2_PREFACE) => Some(Detected::Http2),
        _ if H2_PREFACE.starts_with(first) => None,
        // A broken HTTP/2 preface is no HTTP/1.x request either.
        _ if first.starts_with(b"PRI ") => Some(Detected::Opaque),
        _ => match after_empty_lines(first) {
            b"\r" => None,
            line => method_shape(line),
        },
    }
}

/// `first` past the empty lines (CRLF) a server ignores before a request line (RFC 9112
/// §2.2), as the HTTP/1.1 parser does.
fn after_empty_lines(mut first: &[u8]) -> &[u8] {
    while let Some(rest) = first.strip_prefix(b"\r\n") {
        first = rest;
    }
    first
}

/// HTTP/1.x by the shape of a request line's start: a method of upper-case letters (any
/// method, WebDAV's too), then a space.
fn method_shape(first: &[u8]) -> Option<Detected> {
    let letters = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match first.get(letters) {
        _ if letters > MAX_METHOD => Some(Detected::Opaque),
        None => None,
        Some(b' ') if letters > 0 => Some(Detected::Http1),
        Some(_) => Some(Detected::Opaque),
    }
}

/// How reading a client's first bytes ended ([`read_first`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes<T> {
    /// They said what they are.
    Told(T),
    /// The deadline passed first.
    TimedOut,
    /// The connection ended or failed, or the bytes reached the cap, before they said.
    Ended,
}

/// Reads a client's first bytes into `first` until `tell` says what they are (`Some`),
/// `deadline` passes, the connection ends or `first` holds `cap` bytes (a read may take it
/// past `cap`: the bytes are replayed, not parsed, after). It waits on
/// readiness rather than in a read, so giving up at the deadline loses nothing on either
/// backend.
pub async fn read_first<S: Stream, T>(
    down: &S,
    first: &mut Vec<u8>,
    deadline: tokio::time::Instant,
    cap: usize,
    tell: impl Fn(&[u8]) -> Option<T>,
) -> FirstBytes<T> {
    loop {
        if let Some(told) = tell(first) {
            return FirstBytes::Told(told);
        }
        if first.len() >= cap {
            return FirstBytes::Ended;
        }
        match tokio::time::timeout_at(deadline, down.readable()).await {
            Err(_) => return FirstBytes::TimedOut,
            // Whatever comes next meets the error again and reports it.
            Ok(Err(_)) => return FirstBytes::Ended,
            Ok(Ok(())) => {}
        }
        first.reserve(FIRST_READ);
        let (read, back) = down.read(std::mem::take(first)).await;
        *first = back;
        if !matches!(read, Ok(n) if n > 0) {
            return FirstBytes::Ended;
        }
    }
}

/// Reads the client's first bytes until they say what they are or `timeout` passes;
/// returns the outcome and the bytes read (to be replayed).
pub async fn sniff<S: Stream>(down: &S, timeout: Duration) -> (Detected, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = Vec::with_capacity(FIRST_READ);
    let outcome = match read_first(down, &mut first, deadline, MAX_SNIFF, classify).await {
        FirstBytes::Told(outcome) => outcome,
        FirstBytes::TimedOut => Detected::Timeout,
        // The copy that follows meets the error again and reports it; bytes past the cap
        // that have said nothing are no protocol detection knows.
        FirstBytes::Ended => Detected::Opaque,
    };
    (outcome, first)
}

/// Serves an HTTP or `detect` listener's connection: HTTP/1.1 and HTTP/2 by its routes;
/// anything else as opaque TCP to `cluster` (a `detect` listener), or to the HTTP/1.1 parser,
/// which refuses it (an `http` listener, `cluster` `None`). Under mTLS the peer's ALPN
/// (`inner`) already says which; plaintext is told by its first bytes. Opaque TCP from a
/// `caller` the listener's authorization turns away is closed; HTTP is answered request by
/// request.
pub async fn serve<B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &Rc<View>,
    listener: usize,
    cluster: Option<usize>,
    down: MaybeTls<B::Stream>,
    caller: Rc<Caller>,
    inner: Option<Inner>,
) {
    let peer = caller.addr;
    let (outcome, first) = match inner {
        Some(Inner::Http1) => (Detected::Http1, Vec::new()),
        Some(Inner::Http2) => (Detected::Http2, Vec::new()),
        Some(Inner::Tcp) => (Detected::Opaque, Vec::new()),
        None => {
            let (outcome, first) = sniff(&down, view.snapshot.config.detect_timeout).await;
            view.listeners[listener].detected(outcome);
            tracing::debug!(listener = %view.snapshot.listeners[listener].name, %peer, protocol = outcome.label(), "protocol detected");
            (outcome, first)
        }
    };
    match (outcome, cluster) {
        (Detected::Http2, _) => {
            super::http2::serve(worker, view, listener, down.replaying(first), caller).await;
        }
        (Detected::Http1, _) | (_, None) => {
            let down = down.replaying(first);
            super::http1::serve(worker, view, listener, down, caller).await;
        }
        (_, Some(_)) if !caller.admitted(&view.snapshot.listeners[listener]) => {
            caller.refuse_connection(
                &view.snapshot.listeners[listener],
                &view.listeners[listener],
                worker.access_log(),
                first.len() as u64,
            );
            let _ = down.shutdown(std::net::Shutdown::Both);
        }
        (_, Some(cluster)) => {
            let down = down.unsniffed();
            super::tcp::serve(worker, view, listener, cluster, down, first, &caller).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_the_protocol() {
        let cases: [(&[u8], Option<Detected>); 22] = [
            (b"", None),
            (b"G", None),
            (b"GET", None),
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"OPTIONS * HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"PR", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (H2_PREFACE, Some(Detected::Http2)),
            (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", Some(Detected::Opaque)),
            (&[0x16], None),
            (&[0x16, 0x03, 0x01, 0x02, 0x00], Some(Detected::Tls)),
            (&[0x16, 0x42], Some(Detected::Opaque)),
            (b"PROPFIND /dav HTTP/1.1", Some(Detected::Http1)),
            (b"GETX / HTTP/1.1", Some(Detected::Http1)),
            (b"GETting", Some(Detected::Opaque)),
            (b" GET", Some(Detected::Opaque)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Some(Detected::Opaque)),
            // Empty lines before a request line are ignored, as a server does.
            (b"\r", None),
            (b"\r\n\r", None),
            (b"\r\nGET / HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"\r\n\r\nPOST /", Some(Detected::Http1)),
            (b"\r\n\x00", Some(Detected::Opaque)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                classify(bytes),
                expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
