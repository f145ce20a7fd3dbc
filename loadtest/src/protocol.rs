//! What the generator sends, and how it tells a response is complete, without allocating per
//! request: the request bytes are built once and shared; a response is scanned as it arrives
//! and its body is counted, not kept.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The protocols `tern-load` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Raw TCP: N bytes out, M bytes back.
    Tcp,
    /// HTTP/1.1 with keep-alive.
    Http,
    /// HTTP/2 over cleartext TCP (prior knowledge), one stream at a time per connection.
    Http2,
    /// gRPC unary over HTTP/2 (cleartext), one call at a time per connection.
    Grpc,
}

impl Protocol {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }

    /// What a proxy in front of a target speaks to carry this protocol: each proxy runs as
    /// an L7 proxy of the target's HTTP version (gRPC is carried as HTTP/2), TCP as L4.
    pub fn proxied_as(self) -> Protocol {
        match self {
            Protocol::Tcp => Protocol::Tcp,
            Protocol::Http => Protocol::Http,
            Protocol::Http2 | Protocol::Grpc => Protocol::Http2,
        }
    }

    /// How a proxy carries this protocol: `tcp` (L4) or `http` (L7, HTTP/1.1 or HTTP/2).
    pub fn proxy_mode(self) -> &'static str {
        match self.proxied_as() {
            Protocol::Tcp => "tcp",
            Protocol::Http | Protocol::Http2 | Protocol::Grpc => "http",
        }
    }

    /// The HTTP/2 flavour, for the protocols that run over HTTP/2.
    pub fn h2(self) -> Option<crate::h2::Kind> {
        match self {
            Protocol::Http2 => Some(crate::h2::Kind::Http),
            Protocol::Grpc => Some(crate::h2::Kind::Grpc),
            Protocol::Tcp | Protocol::Http => None,
        }
    }
}

/// One request shape, reused for every request of a run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The protocol.
    pub protocol: Protocol,
    /// The bytes of one request.
    pub request: Arc<[u8]>,
    /// Raw TCP only: bytes expected back per request.
    pub response_size: usize,
    /// Open a new connection for every request (to measure connection set-up: TCP and,
    /// through a mesh, the mTLS handshake).
    pub reconnect: bool,
}

impl Workload {
    /// Raw TCP: `request_size` bytes out (at least one), `response_size` back.
    pub fn tcp(request_size: usize, response_size: usize) -> Workload {
        let request: Vec<u8> = (0..request_size.max(1))
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        Workload {
            protocol: Protocol::Tcp,
            request: request.into(),
            response_size: response_size.max(1),
            reconnect: false,
        }
    }

    /// HTTP/1.1: a GET of `path` (or a POST with a `body_size`-byte body).
    pub fn http(host: &str, path: &str, body_size: usize) -> Workload {
        let mut request = if body_size == 0 {
            format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: tern-load\r\n\r\n")
                .into_bytes()
        } else {
            format!("POST {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: tern-load\r\ncontent-length: {body_size}\r\n\r\n")
                .into_bytes()
        };
        request.extend((0..body_size).map(|i| b'a' + (i % 26) as u8));
        Workload {
            protocol: Protocol::Http,
            request: request.into(),
            response_size: 0,
            reconnect: false,
        }
    }

    /// HTTP/2: a GET of `path` (or a POST with a `body_size`-byte body). `request` holds the
    /// frames, stream ID 0; each connection patches in its own.
    pub fn http2(host: &str, path: &str, body_size: usize) -> Workload {
        Workload {
            protocol: Protocol::Http2,
            request: crate::h2::request_template(crate::h2::Kind::Http, host, path, body_size)
                .into(),
            response_size: 0,
            reconnect: false,
        }
    }

    /// gRPC unary: a call of `path` (`/package.Service/Method`) carrying a
    /// `message_size`-byte message.
    pub fn grpc(host: &str, path: &str, message_size: usize) -> Workload {
        Workload {
            protocol: Protocol::Grpc,
            request: crate::h2::request_template(crate::h2::Kind::Grpc, host, path, message_size)
                .into(),
            response_size: 0,
            reconnect: false,
        }
    }

    /// The same requests, each on a new connection.
    pub fn reconnecting(mut self) -> Workload {
        self.reconnect = true;
        if self.protocol == Protocol::Http {
            let text = String::from_utf8_lossy(&self.request).replacen(
                "\r\n\r\n",
                "\r\nconnection: close\r\n\r\n",
                1,
            );
            self.request = text.into_bytes().into();
        }
        self
    }

    /// A fresh scanner for one response.
    pub fn response(&self) -> Response {
        match self.protocol {
            Protocol::Tcp => Response::Tcp {
                remaining: self.response_size,
            },
            Protocol::Http => Response::HttpHead,
            Protocol::Http2 | Protocol::Grpc => Response::Framed,
        }
    }
}

/// Why a response could not be understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not an HTTP/1.x response head.
    #[error("malformed response head")]
    MalformedHead,
    /// The head is larger than the read buffer.
    #[error("response head too large")]
    HeadTooLarge,
    /// A response with no length (read-until-close) cannot be load-tested on keep-alive.
    #[error("response without Content-Length or chunked encoding")]
    NoLength,
    /// Invalid chunked encoding.
    #[error("malformed chunked body")]
    MalformedChunk,
    /// An HTTP/2 frame that breaks the protocol (or one this client never allows).
    #[error("malformed HTTP/2 frame")]
    BadFrame,
    /// A header block the HPACK decoder refused.
    #[error("malformed HPACK header block")]
    Hpack,
    /// The server sent GOAWAY.
    #[error("HTTP/2 GOAWAY")]
    GoAway,
    /// The server reset the request's stream.
    #[error("HTTP/2 stream reset")]
    StreamReset,
}

impl ProtocolError {
    /// A short label for error counts.
    pub fn kind(self) -> &'static str {
        match self {
            ProtocolError::MalformedHead => "malformed response",
            ProtocolError::HeadTooLarge => "response head too large",
            ProtocolError::NoLength => "response without length",
            ProtocolError::MalformedChunk => "malformed chunked body",
            ProtocolError::BadFrame => "malformed h2 frame",
            ProtocolError::Hpack => "malformed hpack",
            ProtocolError::GoAway => "h2 goaway",
            ProtocolError::StreamReset => "h2 stream reset",
        }
    }
}

/// Progress of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Consumed this many bytes; the response is not complete.
    More(usize),
    /// Consumed this many bytes; the response is complete, with this HTTP status (0 for TCP).
    Done(usize, u16),
    /// As `Done`, and the server said `Connection: close`: open a new connection for the
    /// next request (not an error; servers limit requests per connection).
    DoneClose(usize, u16),
    /// Consumed this many bytes; the response is complete and is an error of this kind (a
    /// gRPC status other than OK); the connection stays usable.
    Failed(usize, &'static str),
}

/// Scanner state of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// HTTP/2: the connection's [`crate::h2::Connection`] scans frames; this scanner takes
    /// nothing.
    Framed,
    /// Raw TCP: bytes still expected.
    Tcp {
        /// Bytes still expected.
        remaining: usize,
    },
    /// Waiting for a complete HTTP head.
    HttpHead,
    /// Counting a `Content-Length` body.
    Length {
        /// Body bytes still expected.
        remaining: u64,
        /// The status.
        status: u16,
        /// The server will close after this response.
        close: bool,
    },
    /// Scanning a chunked body.
    Chunked {
        /// Where in the chunk grammar.
        state: Chunk,
        /// The status.
        status: u16,
        /// The server will close after this response.
        close: bool,
    },
}

/// Where a chunked scan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// In a size line, with the size read so far and whether the extension started.
    Size(u64, bool),
    /// In data, with bytes left (the CRLF after it included).
    Data(u64),
    /// In the trailer section, with the length of the current line.
    Trailer(usize),
}

impl Response {
    /// Scans `data` (bytes received and not yet consumed).
    pub fn step(&mut self, data: &[u8]) -> Result<Step, ProtocolError> {
        match self {
            Response::Framed => Ok(Step::More(0)),
            Response::Tcp { remaining } => {
                let n = (*remaining).min(data.len());
                *remaining -= n;
                Ok(if *remaining == 0 {
                    Step::Done(n, 0)
                } else {
                    Step::More(n)
                })
            }
            Response::HttpHead => self.head(data),
            Response::Length {
                remaining,
                status,
                close,
            } => {
                let n = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                *remaining -= n as u64;
                Ok(if *remaining == 0 {
                    done(n, *status, *close)
                } else {
                    Step::More(n)
                })
            }
            Response::Chunked {
                state,
                status,
                close,
            } => {
                let (status, close) = (*status, *close);
                let mut i = 0;
                while i < data.len() {
                    match state {
                        Chunk::Data(left) => {
                            let n = usize::try_from(*left)
                                .unwrap_or(usize::MAX)
                                .min(data.len() - i);
                            *left -= n as u64;
                            i += n;
                            if *left == 0 {
                                *state = Chunk::Size(0, false);
                            }
                        }
                        Chunk::Size(size, in_extension) => {
                            let b = data[i];
                            i += 1;
                            match b {
                                b'\n' if *size == 0 => *state = Chunk::Trailer(0),
                                // Data, then its CRLF.
                                b'\n' => *state = Chunk::Data(*size + 2),
                                b'\r' => {}
                                b';' => *in_extension = true,
                                _ if *in_extension => {}
                                _ => {
                                    let digit = (b as char)
                                        .to_digit(16)
                                        .ok_or(ProtocolError::MalformedChunk)?;
                                    *size = size
                                        .checked_mul(16)
                                        .ok_or(ProtocolError::MalformedChunk)?
                                        + u64::from(digit);
                                }
                            }
                        }
                        Chunk::Trailer(line) => {
                            let b = data[i];
                            i += 1;
                            match b {
                                b'\n' if *line == 0 => return Ok(done(i, status, close)),
                                b'\n' => *line = 0,
                                b'\r' => {}
                                _ => *line += 1,
                            }
                        }
                    }
                }
                Ok(Step::More(i))
            }
        }
    }

    fn head(&mut self, data: &[u8]) -> Result<Step, ProtocolError> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let len = match parsed.parse(data) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(Step::More(0)),
            Err(_) => return Err(ProtocolError::MalformedHead),
        };
        let status = parsed.code.unwrap_or(0);
        let mut length = None;
        let mut chunked = false;
        let mut close = parsed.version == Some(0);
        for h in parsed.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let text =
                    std::str::from_utf8(h.value).map_err(|_| ProtocolError::MalformedHead)?;
                length = Some(
                    text.trim()
                        .parse::<u64>()
                        .map_err(|_| ProtocolError::MalformedHead)?,
                );
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h
                    .value
                    .windows(7)
                    .any(|w| w.eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = h.value.windows(5).any(|w| w.eq_ignore_ascii_case(b"close"));
            }
        }
        *self = if (100..200).contains(&status) {
            // An interim response: the real one follows.
            Response::HttpHead
        } else if status == 204 || status == 304 {
            return Ok(done(len, status, close));
        } else if chunked {
            Response::Chunked {
                state: Chunk::Size(0, false),
                status,
                close,
            }
        } else if let Some(remaining) = length {
            if remaining == 0 {
                return Ok(done(len, status, close));
            }
            Response::Length {
                remaining,
                status,
                close,
            }
        } else {
            return Err(ProtocolError::NoLength);
        };
        Ok(Step::More(len))
    }
}

fn done(consumed: usize, status: u16, close: bool) -> Step {
    if close {
        Step::DoneClose(consumed, status)
    } else {
        Step::Done(consumed, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `piece`, as a connection would, and returns the status and
    /// how many bytes the response took.
    fn scan(
        workload: &Workload,
        bytes: &[u8],
        piece: usize,
    ) -> Result<(u16, usize), ProtocolError> {
        let mut response = workload.response();
        let mut buffered: Vec<u8> = Vec::new();
        let mut consumed = 0;
        for part in bytes.chunks(piece) {
            buffered.extend_from_slice(part);
            loop {
                match response.step(&buffered)? {
                    Step::Done(n, status) | Step::DoneClose(n, status) => {
                        return Ok((status, consumed + n));
                    }
                    Step::Failed(..) => panic!("HTTP/1.1 responses do not fail this way"),
                    Step::More(0) => break,
                    Step::More(n) => {
                        buffered.drain(..n);
                        consumed += n;
                    }
                }
            }
        }
        panic!("incomplete after {consumed} bytes");
    }

    #[test]
    fn http_lengths_chunks_and_interim_responses() {
        let w = Workload::http("h", "/", 0);
        let next = b"HTTP/1.1 200 OK\r\n";
        let cases: [(&[u8], u16); 4] = [
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", 200),
            (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", 503),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nt: 1\r\n\r\n", 200),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok", 201),
        ];
        for (response, status) in cases {
            let mut stream = response.to_vec();
            stream.extend_from_slice(next);
            for piece in [1, 3, 7, stream.len()] {
                assert_eq!(
                    scan(&w, &stream, piece).unwrap(),
                    (status, response.len()),
                    "piece {piece}"
                );
            }
        }
        assert_eq!(
            scan(&w, b"HTTP/1.1 200 OK\r\n\r\n", 100),
            Err(ProtocolError::NoLength)
        );
        let mut closing = w.response();
        let head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(closing.step(head), Ok(Step::DoneClose(head.len(), 200)));
        assert_eq!(
            scan(&w, b"SSH-2.0-OpenSSH\r\n\r\n", 100),
            Err(ProtocolError::MalformedHead)
        );
    }

    #[test]
    fn tcp_counts_bytes() {
        let w = Workload::tcp(10, 1000);
        assert_eq!(w.request.len(), 10);
        assert_eq!(scan(&w, &[7u8; 1500], 64).unwrap(), (0, 1000));
    }

    #[test]
    fn http_requests_carry_their_body() {
        let w = Workload::http("svc", "/p", 3);
        assert!(w.request.starts_with(b"POST /p HTTP/1.1\r\nhost: svc\r\n"));
        assert!(w.request.ends_with(b"content-length: 3\r\n\r\nabc"));
    }
}
