//! Built-in upstreams for benchmarks and tests: raw TCP request/response (or echo), an
//! HTTP/1.1 server, an HTTP/2 server (cleartext, prior knowledge) and a gRPC echo (unary, any
//! method), each with a configurable response size and delay and optional injected stalls (a
//! pause of D every T) to check that latency measurement sees them.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::protocol::Protocol;

/// What to serve.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Address to listen on (port 0 for any).
    pub addr: SocketAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// TCP: bytes per request (0 with `response_size` 0 means echo).
    pub request_size: usize,
    /// Bytes per response body (TCP: per request; 0 means echo).
    pub response_size: usize,
    /// Added before every response.
    pub delay: Duration,
    /// `(pause, every)`: the server answers nothing during `pause` at the start of each
    /// `every` period.
    pub stall: Option<(Duration, Duration)>,
    /// Runtime worker threads.
    pub threads: usize,
}

/// A running server; dropping it stops it.
pub struct Server {
    /// The bound address.
    pub addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

struct Shared {
    spec: Spec,
    started: Instant,
    response: Vec<u8>,
}

impl Shared {
    /// Waits out the delay and any stall in progress.
    async fn before_response(&self) {
        if !self.spec.delay.is_zero() {
            tokio::time::sleep(self.spec.delay).await;
        }
        if let Some((pause, every)) = self.spec.stall
            && !every.is_zero()
        {
            let since = self.started.elapsed();
            let into = Duration::from_nanos((since.as_nanos() % every.as_nanos()) as u64);
            if into < pause {
                tokio::time::sleep(pause - into).await;
            }
        }
    }
}

/// Starts a server on its own runtime.
pub fn start(spec: Spec) -> io::Result<Server> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(spec.threads.max(1))
        .enable_all()
        .build()?;
    let listener = runtime.block_on(TcpListener::bind(spec.addr))?;
    let addr = listener.local_addr()?;
    let response = match spec.protocol {
        Protocol::Http => {
            let mut r = format!("HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n", spec.response_size)
                .into_bytes();
            r.extend((0..spec.response_size).map(|i| b'A' + (i % 26) as u8));
            r
        }
        Protocol::Tcp | Protocol::Http2 | Protocol::Grpc => (0..spec.response_size)
            .map(|i| b'A' + (i % 26) as u8)
            .collect(),
    };
    let shared = Arc::new(Shared {
        spec,
        started: Instant::now(),
        response,
    });
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
            tokio::spawn(async move {
                let _ = match shared.spec.protocol {
                    Protocol::Http => serve_http(stream, &shared).await,
                    Protocol::Tcp => serve_tcp(stream, &shared).await,
                    Protocol::Http2 | Protocol::Grpc => serve_h2(stream, shared).await,
                };
            });
        }
    });
    Ok(Server {
        addr,
        _runtime: runtime,
    })
}

async fn serve_tcp(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let echo = shared.spec.response_size == 0;
    let per_request = shared.spec.request_size.max(1);
    let mut pending = 0usize;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        if echo {
            shared.before_response().await;
            stream.write_all(&buf[..n]).await?;
            continue;
        }
        pending += n;
        while pending >= per_request {
            pending -= per_request;
            shared.before_response().await;
            stream.write_all(&shared.response).await?;
        }
    }
}

async fn serve_http(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    // Request body bytes still to skip.
    let mut skip: u64 = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        loop {
            if skip > 0 {
                let k = usize::try_from(skip).unwrap_or(usize::MAX).min(filled);
                buf.copy_within(k..filled, 0);
                filled -= k;
                skip -= k as u64;
                if skip > 0 {
                    break;
                }
            }
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            let len = match request.parse(&buf[..filled]) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if filled < buf.len() => break,
                _ => {
                    stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await?;
                    return Ok(());
                }
            };
            let mut length = 0u64;
            for h in request.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    stream.write_all(b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await?;
                    return Ok(());
                }
            }
            buf.copy_within(len..filled, 0);
            filled -= len;
            skip = length;
            shared.before_response().await;
            stream.write_all(&shared.response).await?;
        }
    }
}

/// HTTP/2 and gRPC: each stream gets the response after the delay; gRPC echoes the request's
/// message (or sends `response_size` bytes when set) with `grpc-status: 0`.
async fn serve_h2(stream: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    let mut connection = h2::server::handshake(stream)
        .await
        .map_err(io::Error::other)?;
    while let Some(accepted) = connection.accept().await {
        let Ok((request, respond)) = accepted else {
            break;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = answer_h2(request, respond, &shared).await;
        });
    }
    Ok(())
}

async fn answer_h2(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    shared: &Shared,
) -> Result<(), h2::Error> {
    let grpc = shared.spec.protocol == Protocol::Grpc;
    let mut body = request.into_body();
    let mut received = bytes::BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        received.extend_from_slice(&chunk);
    }
    shared.before_response().await;
    if !grpc {
        let response = http::Response::builder()
            .status(200)
            .header("content-length", shared.response.len())
            .body(())
            .unwrap_or_default();
        let mut send = respond.send_response(response, shared.response.is_empty())?;
        if !shared.response.is_empty() {
            send.send_data(bytes::Bytes::copy_from_slice(&shared.response), true)?;
        }
        return Ok(());
    }
    // gRPC: one length-prefixed message each way.
    let message = if shared.response.is_empty() {
        received.get(5..).map(<[u8]>::to_vec).unwrap_or_default()
    } else {
        shared.response.clone()
    };
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    framed.extend_from_slice(&message);
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap_or_default();
    let mut send = respond.send_response(response, false)?;
    send.send_data(framed.into(), false)?;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    send.send_trailers(trailers)
}
