//! HTTP/2 (prior knowledge, cleartext) and gRPC unary for the generator: the frames and
//! HPACK of one client connection that has one stream in flight at a time, as HTTP/1.1
//! keep-alive has one request, so the open-loop schedule and its coordinated-omission
//! correction are the same for every protocol.
//!
//! Requests are built once per run as a frame template (HPACK without the dynamic table or
//! Huffman, so every request's header block is the same bytes) and copied with the stream ID
//! patched in. Responses are scanned frame by frame: the connection's HPACK decoder keeps
//! the server's dynamic table; SETTINGS and PING are acknowledged; the connection's receive
//! window is topped up as data arrives (stream windows start at the maximum).

use std::borrow::Cow;

use crate::protocol::{ProtocolError, Step};

/// The method `tern-load serve --protocol grpc` answers, and `run` calls by default.
pub const GRPC_ECHO_PATH: &str = "/tern.load.v1.Echo/Echo";

/// What a client sends first on a connection.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The largest frame payload a peer may send us (we keep the default).
const MAX_FRAME: usize = 16_384;
/// The largest window HTTP/2 allows.
const MAX_WINDOW: u32 = 0x7fff_ffff;
/// Top the connection window up once this much of it is used.
const WINDOW_REFILL: u64 = 1 << 30;

/// gRPC status names for error counts (codes 1–16).
const GRPC_ERRORS: [&str; 17] = [
    "grpc OK",
    "grpc CANCELLED",
    "grpc UNKNOWN",
    "grpc INVALID_ARGUMENT",
    "grpc DEADLINE_EXCEEDED",
    "grpc NOT_FOUND",
    "grpc ALREADY_EXISTS",
    "grpc PERMISSION_DENIED",
    "grpc RESOURCE_EXHAUSTED",
    "grpc FAILED_PRECONDITION",
    "grpc ABORTED",
    "grpc OUT_OF_RANGE",
    "grpc UNIMPLEMENTED",
    "grpc INTERNAL",
    "grpc UNAVAILABLE",
    "grpc DATA_LOSS",
    "grpc UNAUTHENTICATED",
];

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).min(0xff_ffff);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & MAX_WINDOW).to_be_bytes());
}

/// The bytes that open a connection: the preface, our SETTINGS (no server push, maximal
/// stream windows) and a WINDOW_UPDATE opening the connection window fully.
pub fn connection_start() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame_header(&mut out, 12, SETTINGS, 0, 0);
    out.extend_from_slice(&[0x00, 0x02, 0, 0, 0, 0]); // ENABLE_PUSH = 0
    out.extend_from_slice(&[0x00, 0x04]); // INITIAL_WINDOW_SIZE
    out.extend_from_slice(&MAX_WINDOW.to_be_bytes());
    frame_header(&mut out, 4, WINDOW_UPDATE, 0, 0);
    out.extend_from_slice(&(MAX_WINDOW - 65_535).to_be_bytes());
    out
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header "literal without indexing" with a static-table name (`name_index`) or a literal
/// name (`None`), never Huffman-coded.
fn hpack_literal(out: &mut Vec<u8>, name_index: Option<usize>, name: &str, value: &str) {
    match name_index {
        Some(index) => hpack_int(out, 0x00, 4, index),
        None => {
            out.push(0x00);
            hpack_int(out, 0x00, 7, name.len());
            out.extend_from_slice(name.as_bytes());
        }
    }
    hpack_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// What a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plain HTTP/2: GET, or POST with a body.
    Http,
    /// gRPC unary: POST of one length-prefixed message, `application/grpc`.
    Grpc,
}

/// The frames of one request, stream ID 0 (patched per request by [`Connection::request`]).
pub fn request_template(kind: Kind, authority: &str, path: &str, body_size: usize) -> Vec<u8> {
    let mut block = Vec::new();
    let post = kind == Kind::Grpc || body_size > 0;
    block.push(if post { 0x83 } else { 0x82 }); // :method POST / GET (static 3 / 2)
    block.push(0x86); // :scheme http (static 6)
    hpack_literal(&mut block, Some(4), ":path", path);
    hpack_literal(&mut block, Some(1), ":authority", authority);
    hpack_literal(&mut block, Some(58), "user-agent", "tern-load");
    let mut body: Vec<u8> = Vec::new();
    match kind {
        Kind::Grpc => {
            hpack_literal(&mut block, Some(31), "content-type", "application/grpc");
            hpack_literal(&mut block, None, "te", "trailers");
            body.push(0); // not compressed
            body.extend_from_slice(&u32::try_from(body_size).unwrap_or(u32::MAX).to_be_bytes());
            body.extend((0..body_size).map(|i| b'a' + (i % 26) as u8));
        }
        Kind::Http => {
            if post {
                hpack_literal(
                    &mut block,
                    Some(28),
                    "content-length",
                    &body_size.to_string(),
                );
            }
            body.extend((0..body_size).map(|i| b'a' + (i % 26) as u8));
        }
    }
    let mut out = Vec::with_capacity(block.len() + body.len() + 64);
    let flags = END_HEADERS | if body.is_empty() { END_STREAM } else { 0 };
    frame_header(&mut out, block.len(), HEADERS, flags, 0);
    out.extend_from_slice(&block);
    let mut chunks = body.chunks(MAX_FRAME).peekable();
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        frame_header(
            &mut out,
            chunk.len(),
            DATA,
            if last { END_STREAM } else { 0 },
            0,
        );
        out.extend_from_slice(chunk);
    }
    out
}

/// One HTTP/2 client connection's state.
pub struct Connection {
    kind: Kind,
    decoder: loona_hpack::Decoder<'static>,
    /// The stream in flight (0 before the first request).
    stream: u32,
    /// A header block being assembled from HEADERS and CONTINUATION frames.
    block: Vec<u8>,
    /// Whether that block's HEADERS frame ended the stream.
    block_ends_stream: bool,
    /// Frames to send: acknowledgements and window updates.
    pending: Vec<u8>,
    /// Connection window used since the last update.
    used: u64,
    status: u16,
    grpc_status: Option<u32>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("kind", &self.kind)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A new connection (nothing sent yet).
    pub fn new(kind: Kind) -> Connection {
        Connection {
            kind,
            decoder: loona_hpack::Decoder::new(),
            stream: 0,
            block: Vec::with_capacity(1024),
            block_ends_stream: false,
            pending: Vec::with_capacity(64),
            used: 0,
            status: 0,
            grpc_status: None,
        }
    }

    /// Appends the next request to `out`: the connection start first, if this is the first,
    /// then `template` on a new stream.
    pub fn request(&mut self, template: &[u8], out: &mut Vec<u8>) {
        if self.stream == 0 {
            out.extend_from_slice(&connection_start());
            self.stream = 1;
        } else {
            self.stream += 2;
        }
        self.status = 0;
        self.grpc_status = None;
        self.block.clear();
        let mut at = 0;
        while at + 9 <= template.len() {
            let len = usize::from(template[at]) << 16
                | usize::from(template[at + 1]) << 8
                | usize::from(template[at + 2]);
            out.extend_from_slice(&template[at..at + 5]);
            out.extend_from_slice(&self.stream.to_be_bytes());
            out.extend_from_slice(&template[at + 9..at + 9 + len]);
            at += 9 + len;
        }
    }

    /// Moves frames the connection owes the server into `out`; returns whether there were
    /// any.
    pub fn take_pending(&mut self, out: &mut Vec<u8>) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        out.append(&mut self.pending);
        true
    }

    /// Consumes one whole frame from `data` (`More(0)`: not a whole frame yet).
    pub fn step(&mut self, data: &[u8]) -> Result<Step, ProtocolError> {
        let Some(header) = data.get(..9) else {
            return Ok(Step::More(0));
        };
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & MAX_WINDOW;
        if len > MAX_FRAME {
            return Err(ProtocolError::BadFrame);
        }
        let Some(payload) = data.get(9..9 + len) else {
            return Ok(Step::More(0));
        };
        let consumed = 9 + len;
        let ours = stream == self.stream && stream != 0;
        match kind {
            DATA => {
                self.used += len as u64;
                if self.used >= WINDOW_REFILL {
                    frame_header(&mut self.pending, 4, WINDOW_UPDATE, 0, 0);
                    let increment = u32::try_from(self.used).unwrap_or(MAX_WINDOW);
                    self.pending.extend_from_slice(&increment.to_be_bytes());
                    self.used = 0;
                }
                if ours && flags & END_STREAM != 0 {
                    return Ok(self.finish(consumed));
                }
            }
            HEADERS => {
                let mut fragment = payload;
                if flags & PADDED != 0 {
                    let pad = usize::from(*fragment.first().ok_or(ProtocolError::BadFrame)?);
                    fragment = fragment
                        .get(
                            1..fragment
                                .len()
                                .checked_sub(pad)
                                .ok_or(ProtocolError::BadFrame)?,
                        )
                        .ok_or(ProtocolError::BadFrame)?;
                }
                if flags & PRIORITY != 0 {
                    fragment = fragment.get(5..).ok_or(ProtocolError::BadFrame)?;
                }
                self.block.clear();
                self.block.extend_from_slice(fragment);
                self.block_ends_stream = flags & END_STREAM != 0;
                if flags & END_HEADERS != 0 {
                    return self.headers_done(consumed, ours);
                }
            }
            CONTINUATION => {
                self.block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    return self.headers_done(consumed, ours);
                }
            }
            SETTINGS if flags & ACK == 0 => frame_header(&mut self.pending, 0, SETTINGS, ACK, 0),
            PING if flags & ACK == 0 => {
                frame_header(&mut self.pending, 8, PING, ACK, 0);
                self.pending.extend_from_slice(payload);
            }
            GOAWAY => return Err(ProtocolError::GoAway),
            RST_STREAM if ours => return Err(ProtocolError::StreamReset),
            PUSH_PROMISE => return Err(ProtocolError::BadFrame),
            _ => {}
        }
        Ok(Step::More(consumed))
    }

    /// Decodes a complete header block (always: it updates the HPACK table) and finishes the
    /// response if the block ended our stream.
    fn headers_done(&mut self, consumed: usize, ours: bool) -> Result<Step, ProtocolError> {
        let mut status = None;
        let mut grpc_status = None;
        self.decoder
            .decode_with_cb(&self.block, |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
                let number = || std::str::from_utf8(&value).ok()?.parse::<u32>().ok();
                match &*name {
                    b":status" => status = number(),
                    b"grpc-status" => grpc_status = number(),
                    _ => {}
                }
            })
            .map_err(|_| ProtocolError::Hpack)?;
        self.block.clear();
        if !ours {
            return Ok(Step::More(consumed));
        }
        if let Some(status) = status {
            self.status = u16::try_from(status).unwrap_or(0);
        }
        if grpc_status.is_some() {
            self.grpc_status = grpc_status;
        }
        if self.block_ends_stream {
            Ok(self.finish(consumed))
        } else {
            Ok(Step::More(consumed))
        }
    }

    fn finish(&mut self, consumed: usize) -> Step {
        match self.kind {
            Kind::Http => Step::Done(consumed, self.status),
            Kind::Grpc if self.status != 200 => Step::Done(consumed, self.status),
            Kind::Grpc => match self.grpc_status {
                Some(0) => Step::Done(consumed, 200),
                Some(code) => Step::Failed(
                    consumed,
                    GRPC_ERRORS
                        .get(code as usize)
                        .copied()
                        .unwrap_or("grpc status unknown"),
                ),
                None => Step::Failed(consumed, "grpc status missing"),
            },
        }
    }
}

#[cfg(test)]
mod tests;
