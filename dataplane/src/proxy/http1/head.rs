//! Parsing HTTP/1.x request and response heads (with `httparse`) into what the proxy needs:
//! where the host and path are, how the body is framed, and whether the connection lives on.
//!
//! Parsing borrows the connection's buffer and records offsets, so it allocates nothing.
//! Ambiguous framing is refused rather than guessed (both `Content-Length` and
//! `Transfer-Encoding`, conflicting or empty lengths, a request coding that does not end in
//! `chunked`), and so is what a recipient could read differently from the proxy, since heads
//! go on as they came (a line ending in a bare LF, a `Host` other than an absolute-form
//! target's authority): those are the inputs request smuggling is made of. Heads are
//! rewritten (a route's header edits, a close the proxy adds) only where they must be.

use std::mem::MaybeUninit;
use std::ops::Range;

use shared::config::HttpSettings;

use crate::metrics::Flag;
use crate::proxy::route::HeaderEdits;

/// The most header fields any head may have, whatever the config says.
pub const MAX_HEADERS: usize = shared::config::MAX_HEADERS;

/// Limits on a head.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest head in bytes.
    pub max_head: usize,
    /// Longest request line.
    pub max_line: usize,
    /// Most header fields.
    pub max_headers: usize,
}

impl From<&HttpSettings> for Limits {
    fn from(s: &HttpSettings) -> Limits {
        Limits {
            max_head: s.max_header_bytes,
            max_line: s.max_request_line,
            max_headers: s.max_headers.min(MAX_HEADERS),
        }
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head is larger than allowed.
    #[error("head larger than the limit")]
    TooLarge,
    /// The request line is longer than allowed.
    #[error("request line longer than the limit")]
    LineTooLong,
    /// More header fields than allowed.
    #[error("too many header fields")]
    TooManyHeaders,
    /// Not valid HTTP/1.x, or ambiguous.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// `CONNECT`: a tunnel, which the proxy does not carry (a 2xx from the upstream would
    /// turn the connection into one, RFC 9110 §9.3.6).
    #[error("CONNECT: the proxy carries no tunnel")]
    Tunnel,
}

impl HeadError {
    /// The status a proxy answers a client with, for a bad request head.
    pub fn status(self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::LineTooLong => 414,
            HeadError::Malformed(_) => 400,
            HeadError::Tunnel => 501,
        }
    }

    /// The metric flag for a bad request head.
    pub fn flag(self) -> Flag {
        match self {
            HeadError::Malformed(_) | HeadError::Tunnel => Flag::DownstreamProtocolError,
            _ => Flag::DownstreamLimit,
        }
    }
}

/// Request methods the proxy treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `HEAD`: the response has no body whatever its headers say.
    Head,
    /// `CONNECT`.
    Connect,
    /// `GET`, `PUT`, `DELETE`, `OPTIONS`, `TRACE`: idempotent (RFC 9110 §9.2.2), so a request
    /// a stale pooled connection lost may be sent again.
    Idempotent,
    /// Anything else (`POST`, `PATCH`, extensions): never sent twice.
    Other,
}

impl Method {
    /// Whether the request may be sent again when its connection failed before any answer.
    pub fn idempotent(self) -> bool {
        matches!(self, Method::Head | Method::Idempotent)
    }
}

/// A parsed request head; ranges index the buffer it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, through the blank line.
    pub len: usize,
    /// The method, where it matters.
    pub method: Method,
    /// The method as sent.
    pub method_name: Range<usize>,
    /// The authority: `Host`, or the authority of an absolute-form target. May be empty.
    pub host: Range<usize>,
    /// The path (with query) to route on.
    pub path: Range<usize>,
    /// How the request body is delimited.
    pub framing: Framing,
    /// Whether the client keeps the connection open after this exchange.
    pub keep_alive: bool,
    /// `Connection: upgrade` with an `Upgrade` header.
    pub upgrade: bool,
    /// The upgrade offered is to HTTP/2 (`h2c`), which the proxy declines: after the switch
    /// every request would go where this one went, past the routes.
    pub h2c_upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// An HTTP/1.0 request: no interim (1xx) response may reach its client.
    pub http10: bool,
}

/// A parsed response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of the head, through the blank line.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the server keeps the connection open.
    pub keep_alive: bool,
    /// Whether the head says `Connection: close` (or is HTTP/1.0 without keep-alive).
    pub says_close: bool,
}

/// What the headers of either kind of head say about framing and the connection.
#[derive(Default)]
struct Fields {
    host: Option<Range<usize>>,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked_last: bool,
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
    upgrade_header: bool,
    upgrade_h2c: bool,
    expect_continue: bool,
}

fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    // `part` is a sub-slice of `buf` (httparse returns borrows of its input).
    let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    start..start + part.len()
}

fn trim(value: &[u8]) -> &[u8] {
    value.trim_ascii()
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|t| !t.is_empty())
}

fn read_fields(buf: &[u8], headers: &[httparse::Header<'_>]) -> Result<Fields, HeadError> {
    let mut f = Fields::default();
    for h in headers {
        let name = h.name.as_bytes();
        let value = trim(h.value);
        if name.eq_ignore_ascii_case(b"host") {
            if f.host.is_some() {
                return Err(HeadError::Malformed("more than one Host header"));
            }
            f.host = Some(offset(buf, value));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if tokens(value).next().is_none() {
                return Err(HeadError::Malformed("invalid Content-Length"));
            }
            for token in tokens(value) {
                let length =
                    parse_length(token).ok_or(HeadError::Malformed("invalid Content-Length"))?;
                if f.content_length.is_some_and(|seen| seen != length) {
                    return Err(HeadError::Malformed("conflicting Content-Length values"));
                }
                f.content_length = Some(length);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            f.transfer_encoding = true;
            if let Some(last) = tokens(value).last() {
                f.chunked_last = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in tokens(value) {
                f.close |= token.eq_ignore_ascii_case(b"close");
                f.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                f.upgrade_token |= token.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            f.upgrade_header = true;
            f.upgrade_h2c |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"h2c"));
        } else if name.eq_ignore_ascii_case(b"expect") {
            f.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    if f.transfer_encoding && f.content_length.is_some() {
        return Err(HeadError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    Ok(f)
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Refuses a head with a line that ends in a bare LF. httparse takes one as a line end, as
/// RFC 9112 §2.2 allows, but heads go on as they came, and a recipient that does not (one
/// that reads the LF as part of a field value, say) would frame the message differently:
/// a request smuggling vector. Every line of a head Tern forwards ends in CRLF.
fn check_line_ends(head: &[u8]) -> Result<(), HeadError> {
    let bare =
        head.first() == Some(&b'\n') || head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r');
    if bare {
        return Err(HeadError::Malformed("line ending in a bare LF"));
    }
    Ok(())
}

/// Checks the limits a head still being received has already broken.
fn check_partial(buf: &[u8], limits: &Limits, request: bool) -> Result<(), HeadError> {
    if request && buf.len() > limits.max_line && !buf[..limits.max_line].contains(&b'\n') {
        return Err(HeadError::LineTooLong);
    }
    if buf.len() >= limits.max_head {
        return Err(HeadError::TooLarge);
    }
    Ok(())
}

fn map_error(error: httparse::Error) -> HeadError {
    match error {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::Version => HeadError::Malformed("unsupported HTTP version"),
        httparse::Error::Token => HeadError::Malformed("invalid token"),
        httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
        httparse::Error::Status => HeadError::Malformed("invalid status"),
    }
}

/// Parses a request head from the start of `buf`. `Ok(None)`: not complete yet and no
/// limit broken, read more.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut headers[..limits.max_headers]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return check_partial(buf, limits, true).map(|()| None),
        Err(error) => {
            // A head that broke a limit before it broke the grammar reports the limit.
            check_partial(buf, limits, true)?;
            return Err(map_error(error));
        }
    };
    // The request line, after the empty lines a server ignores before it.
    let line_start = buf[..len]
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(len);
    let line_end = buf[line_start..len]
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(len);
    if line_end > limits.max_line {
        return Err(HeadError::LineTooLong);
    }
    if len > limits.max_head {
        return Err(HeadError::TooLarge);
    }
    check_line_ends(&buf[..len])?;
    let (Some(method), Some(target), Some(minor)) = (request.method, request.path, request.version)
    else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    let fields = read_fields(buf, request.headers)?;
    let method_name = offset(buf, method.as_bytes());
    let method = match method {
        "HEAD" => Method::Head,
        "CONNECT" => Method::Connect,
        "GET" | "PUT" | "DELETE" | "OPTIONS" | "TRACE" => Method::Idempotent,
        _ => Method::Other,
    };
    if method == Method::Connect {
        return Err(HeadError::Tunnel);
    }

    let target_bytes = target.as_bytes();
    // A request target carries no fragment (RFC 9112 §3.2): some servers would end the
    // authority or the path at a `#`, and others not, each routing and authorizing another
    // request than the proxy did.
    if target_bytes.contains(&b'#') {
        return Err(HeadError::Malformed("a fragment in the request target"));
    }
    let (authority, path) = if target_bytes.starts_with(b"/") || target_bytes == b"*" {
        (None, offset(buf, target_bytes))
    } else if let Some(rest) = strip_scheme(target_bytes) {
        let slash = rest
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .unwrap_or(rest.len());
        // A host and port, nothing a server could read otherwise (user info, a backslash
        // some take for a slash, escapes).
        let host_char = |b: &u8| b.is_ascii_alphanumeric() || b"-.:[]".contains(b);
        if !rest[..slash].iter().all(host_char) {
            return Err(HeadError::Malformed(
                "invalid authority in the request target",
            ));
        }
        (
            Some(offset(buf, &rest[..slash])),
            offset(buf, &rest[slash..]),
        )
    } else {
        return Err(HeadError::Malformed("invalid request target"));
    };
    let host = match (authority, fields.host) {
        // RFC 9112 §3.2.2: a client sends the target's authority as Host; the head goes on as
        // it came, so an upstream routing on Host must not see another host than Tern did.
        (Some(authority), Some(host))
            if !buf[authority.clone()].eq_ignore_ascii_case(&buf[host.clone()]) =>
        {
            return Err(HeadError::Malformed(
                "Host differs from the request target's authority",
            ));
        }
        (Some(authority), _) => authority,
        (None, Some(host)) => host,
        (None, None) if minor == 0 => len..len,
        (None, None) => return Err(HeadError::Malformed("missing Host header")),
    };

    let framing = if fields.transfer_encoding {
        if !fields.chunked_last || minor == 0 {
            return Err(HeadError::Malformed(
                "request Transfer-Encoding must end in chunked",
            ));
        }
        Framing::Chunked
    } else {
        match fields.content_length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };
    Ok(Some(RequestHead {
        len,
        method,
        method_name,
        host,
        path,
        framing,
        keep_alive: if minor == 0 {
            fields.keep_alive && !fields.close
        } else {
            !fields.close
        },
        upgrade: fields.upgrade_header && fields.upgrade_token,
        h2c_upgrade: fields.upgrade_h2c,
        expect_continue: fields.expect_continue && minor == 1,
        http10: minor == 0,
    }))
}

fn strip_scheme(target: &[u8]) -> Option<&[u8]> {
    let colon = target.iter().position(|&b| b == b':')?;
    let scheme = &target[..colon];
    let ok = scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https");
    if ok {
        target[colon..].strip_prefix(b"://")
    } else {
        None
    }
}

/// Parses a response head from the start of `buf`, for a request made with `method`.
pub fn parse_response(
    buf: &[u8],
    limits: &Limits,
    method: Method,
) -> Result<Option<ResponseHead>, HeadError> {
    // httparse parses responses only into initialised headers.
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers[..limits.max_headers]);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return check_partial(buf, limits, false).map(|()| None),
        Err(error) => return Err(map_error(error)),
    };
    if len > limits.max_head {
        return Err(HeadError::TooLarge);
    }
    check_line_ends(&buf[..len])?;
    let (Some(status), Some(minor)) = (response.code, response.version) else {
        return Err(HeadError::Malformed("incomplete status line"));
    };
    let fields = read_fields(buf, response.headers)?;
    let no_body =
        method == Method::Head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if no_body {
        Framing::Empty
    } else if fields.transfer_encoding {
        if fields.chunked_last {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match fields.content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let says_close = if minor == 0 {
        !fields.keep_alive || fields.close
    } else {
        fields.close
    };
    // HTTP/1.0 has no Transfer-Encoding: an HTTP/1.0 response with one has faulty framing,
    // and its connection closes after it (RFC 9112 §6.1).
    let faulty = minor == 0 && fields.transfer_encoding;
    Ok(Some(ResponseHead {
        len,
        status,
        framing,
        keep_alive: !says_close && !faulty && framing != Framing::UntilClose,
        says_close,
    }))
}

/// A head (every line ending in CRLF, as parsing made sure) without the fields whose names
/// `dropped` picks, with `added` (whole lines) at the end of its fields.
fn rewritten(head: &[u8], dropped: impl Fn(&[u8]) -> bool, added: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + added.len());
    let fields = head.strip_suffix(b"\r\n\r\n").unwrap_or(head);
    for (i, line) in fields.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if i == 0 || !dropped(name) {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(added);
    out.extend_from_slice(b"\r\n");
    out
}

/// Picks the fields named in `names` (lower case), whatever their case.
fn named<'a>(names: &'a [&'a [u8]]) -> impl Fn(&[u8]) -> bool + 'a {
    move |name| names.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// A head with a route's header edits made: the fields of the names it drops go, and the
/// fields it writes are added at the end.
pub fn edited(head: &[u8], edits: &HeaderEdits) -> Vec<u8> {
    rewritten(head, |name| edits.drops(name), edits.lines())
}

/// A request head with its `traceparent` field made `value` (the only one).
pub fn with_traceparent(head: &[u8], value: &[u8]) -> Vec<u8> {
    let line = [b"traceparent: ", value, b"\r\n"].concat();
    rewritten(head, named(&[b"traceparent"]), &line)
}

/// A request head (`request`, parsed from `head`) with its target made `target`, in origin
/// form (an absolute-form target's authority goes, to `Host`), and with `host` its `Host`
/// field made that.
pub fn retargeted(
    head: &[u8],
    request: &RequestHead,
    target: &[u8],
    host: Option<&[u8]>,
) -> Vec<u8> {
    // The target follows the method and a space; parsing made the path its end.
    let start = request.method_name.end + 1;
    let absolute = request.path.start > start;
    let host = host.or_else(|| absolute.then(|| &head[request.host.clone()]));
    let mut out = Vec::with_capacity(head.len() + target.len());
    out.extend_from_slice(&head[..start]);
    out.extend_from_slice(target);
    out.extend_from_slice(&head[request.path.end..]);
    match host {
        None => out,
        Some(host) => {
            let line = [b"host: ", host, b"\r\n"].concat();
            rewritten(&out, named(&[b"host"]), &line)
        }
    }
}

/// Rewrites a response head to end the connection: drops its `Connection` fields and adds
/// `connection: close`. Used when the proxy closes a connection the upstream would keep.
pub fn with_connection_close(head: &[u8]) -> Vec<u8> {
    rewritten(head, named(&[b"connection"]), b"connection: close\r\n")
}

/// Rewrites a chunked response head for an HTTP/1.0 client, which gets the body's data
/// alone and its end by the close: the final `chunked` leaves `Transfer-Encoding` (and the
/// field goes when nothing is left; other codings stay, as they do in a response delimited
/// by the close), the `Connection` fields go, and `connection: close` is added.
pub fn dechunked(head: &[u8]) -> Vec<u8> {
    let mut codings: Vec<&[u8]> = Vec::new();
    let fields = head.strip_suffix(b"\r\n\r\n").unwrap_or(head);
    for line in fields.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some((name, value)) = split_field(line) else {
            continue;
        };
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings.extend(
                value
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|c| !c.is_empty()),
            );
        }
    }
    // Parsing made the last coding `chunked`, or this would not be a chunked response.
    if codings
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
    {
        codings.pop();
    }
    let mut added = Vec::new();
    if !codings.is_empty() {
        added.extend_from_slice(b"transfer-encoding: ");
        added.extend_from_slice(&codings.join(&b", "[..]));
        added.extend_from_slice(b"\r\n");
    }
    added.extend_from_slice(b"connection: close\r\n");
    rewritten(head, named(&[b"connection", b"transfer-encoding"]), &added)
}

/// A header line's name and value (trimmed).
fn split_field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    Some((&line[..colon], line[colon + 1..].trim_ascii()))
}

/// Rewrites a request head offering an upgrade to `h2c` into the plain HTTP/1.1 request it
/// also is (RFC 9113 left the upgrade out; Envoy drops it too): without its `Upgrade`,
/// `HTTP2-Settings` and `Connection` fields, keeping only a `close`.
pub fn without_h2c_upgrade(head: &[u8], keep_alive: bool) -> Vec<u8> {
    let added: &[u8] = if keep_alive {
        b""
    } else {
        b"connection: close\r\n"
    };
    rewritten(
        head,
        named(&[b"connection", b"upgrade", b"http2-settings"]),
        added,
    )
}

#[cfg(test)]
mod tests;
