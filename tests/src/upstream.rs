//! Upstream servers for tests: a TCP echo server and a hyper HTTP/1.1 server whose
//! behaviour is chosen by path.
//!
//! HTTP paths: `/echo` answers with the request body; `/grpc` too, then trailers
//! (`grpc-status: 0`, `x-served-by: <name>`); `/chunked` streams a chunked body;
//! `/hang` (or a path with `/hang/` in it) never answers; a path ending `/stall` answers a
//! head and a first chunk, then nothing more; one ending `/drip` eight chunks 100 ms apart; `/slow/<ms>` answers after a delay; `/ws` upgrades and then echoes
//! raw bytes; anything else answers `<name> <path>` with the request's Host in `x-host`.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// The most HTTP/2 streams [`Http`] lets a client have open at once on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// A TCP echo server: echoes until end of stream, then half-closes.
pub struct Echo {
    /// Its address.
    pub addr: SocketAddr,
}

impl Echo {
    /// Starts it on a background thread (one thread per connection).
    pub fn start() -> Echo {
        Echo::on(TcpListener::bind("127.0.0.1:0").unwrap(), None, |_| {})
    }

    /// Serves `listener` (bound in any network namespace); `greeting`, if any, is sent first
    /// on every connection (a server-speaks-first protocol); `accepted` is told each peer.
    pub fn on(
        listener: TcpListener,
        greeting: Option<&'static [u8]>,
        accepted: impl Fn(SocketAddr) + Send + 'static,
    ) -> Echo {
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                if let Ok(peer) = stream.peer_addr() {
                    accepted(peer);
                }
                if let Some(greeting) = greeting
                    && stream.write_all(greeting).is_err()
                {
                    continue;
                }
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Echo { addr }
    }
}

/// An HTTP server (hyper: HTTP/1.1, and HTTP/2 with prior knowledge) on its own runtime
/// thread.
pub struct Http {
    /// Its address.
    pub addr: SocketAddr,
    /// Requests it has received.
    pub requests: Arc<AtomicUsize>,
    /// Connections it has accepted.
    pub connections: Arc<AtomicUsize>,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

/// A request's whole body (empty if it broke off).
async fn whole_body(request: Request<Incoming>) -> Bytes {
    request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

async fn handle(
    name: &'static str,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    let host = request
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // What the request offered to upgrade to, told back on ordinary answers.
    let upgrade = request.headers().get("upgrade").cloned();
    let response = if let Some(flaky) = path.strip_prefix("/flaky/") {
        // `/flaky/{server}/{how}`: the server named `server` fails as `how` says (an HTTP
        // status, `unavailable`: gRPC's trailers-only UNAVAILABLE, `hang`: no answer); the
        // others echo the body, naming themselves.
        let (server, how) = flaky.split_once('/').unwrap_or((flaky, "503"));
        if server != name {
            let mut response = Response::new(full(whole_body(request).await));
            response
                .headers_mut()
                .insert("x-served-by", name.parse().unwrap());
            response
        } else if how == "hang" {
            std::future::pending::<()>().await;
            unreachable!()
        } else if how == "unavailable" {
            let mut response = Response::new(full(""));
            let headers = response.headers_mut();
            headers.insert("content-type", "application/grpc".parse().unwrap());
            headers.insert("grpc-status", "14".parse().unwrap());
            response
        } else {
            let mut response = Response::new(full(format!("{name} failed")));
            *response.status_mut() =
                hyper::StatusCode::from_u16(how.parse().unwrap_or(503)).unwrap();
            response
        }
    } else if let Some((_, size)) = path.split_once("/bytes/") {
        Response::new(full(vec![b'x'; size.parse().unwrap_or(0)]))
    } else if path == "/echo" {
        Response::new(full(whole_body(request).await))
    } else if path == "/headers" || path.starts_with("/headers/") {
        // The request's headers as received, one `name: value` line each, in order; the
        // answer carries `server`, `cache-control` and `x-upstream-debug` of its own.
        let mut seen = format!("{name}\n");
        if let Some(authority) = request.uri().authority() {
            // HTTP/2's `:authority` (an HTTP/1.1 request in origin form has none).
            seen.push_str(&format!(":authority: {authority}\n"));
        }
        for (field, value) in request.headers() {
            seen.push_str(&format!("{field}: {}\n", value.to_str().unwrap_or("?")));
        }
        let mut response = Response::new(full(seen));
        let headers = response.headers_mut();
        headers.insert("server", name.parse().unwrap());
        headers.insert("cache-control", "private".parse().unwrap());
        headers.insert("x-upstream-debug", "1".parse().unwrap());
        response
    } else if path == "/grpc" {
        // gRPC's shape: the body echoed, then trailers carrying the status.
        let body = whole_body(request).await;
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("x-served-by", name.parse().unwrap());
        let frames = vec![Frame::data(body), Frame::trailers(trailers)];
        Response::new(FrameList::new(frames).boxed())
    } else if path == "/chunked" {
        let frames = (0..5)
            .map(|i| Frame::data(Bytes::from(format!("part{i};"))))
            .collect();
        Response::new(FrameList::new(frames).boxed())
    } else if path.ends_with("/drip") {
        // Eight chunks, 100 ms apart.
        let (chunks, body) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        tokio::spawn(async move {
            for i in 0..8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let chunk = Frame::data(Bytes::from(format!("drip{i};")));
                if chunks.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(body);
        Response::new(http_body_util::StreamBody::new(stream).boxed())
    } else if path.ends_with("/stall") {
        // The head and a first chunk, then nothing more, ever.
        let frames = FrameList {
            then_stall: true,
            ..FrameList::new(vec![Frame::data(Bytes::from_static(b"started"))])
        };
        Response::new(frames.boxed())
    } else if path == "/hang" || path.contains("/hang/") {
        std::future::pending::<()>().await;
        unreachable!()
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(100))).await;
        Response::new(full(format!("{name} slow")))
    } else if path == "/ws" {
        let upgrade = hyper::upgrade::on(request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut response = Response::new(full(""));
        *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        response
            .headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        response
    } else {
        let mut response = Response::new(full(format!("{name} {path}")));
        response.headers_mut().insert(
            "x-host",
            host.parse().unwrap_or_else(|_| "?".parse().unwrap()),
        );
        if let Some(upgrade) = upgrade {
            response.headers_mut().insert("x-upgrade", upgrade);
        }
        response
    };
    Ok(response)
}

/// A body of ready frames (data, then trailers), with no length, so hyper chunks it; with
/// `then_stall`, it never ends after them.
struct FrameList {
    frames: std::vec::IntoIter<Frame<Bytes>>,
    then_stall: bool,
}

impl FrameList {
    fn new(frames: Vec<Frame<Bytes>>) -> FrameList {
        FrameList {
            frames: frames.into_iter(),
            then_stall: false,
        }
    }
}

impl hyper::body::Body for FrameList {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.frames.next() {
            None if self.then_stall => std::task::Poll::Pending,
            next => std::task::Poll::Ready(next.map(Ok)),
        }
    }
}

impl Http {
    /// Starts a server that names itself `name` in its answers.
    pub fn start(name: &'static str) -> Http {
        Http::on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), name)
    }

    /// Serves `listener` (bound in any network namespace).
    pub fn on(listener: std::net::TcpListener, name: &'static str) -> Http {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener).unwrap()
        };
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (reqs, conns, now_open) = (requests.clone(), connections.clone(), open.clone());
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                now_open.fetch_add(1, Ordering::SeqCst);
                let reqs = reqs.clone();
                let now_open = now_open.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        reqs.fetch_add(1, Ordering::SeqCst);
                        handle(name, request)
                    });
                    // HTTP/1.1 or HTTP/2 (prior knowledge), told by the preface; HTTP/2
                    // allows 100 streams at once, RFC 9113's recommended least.
                    let mut builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    builder
                        .http2()
                        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                    now_open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Http {
            addr,
            requests,
            connections,
            open,
            _runtime: runtime,
        }
    }
}

/// A server that answers each connection's first request (its whole head) with `reply`,
/// reads nothing more, and closes the connection half a second later, without having said
/// it would.
pub fn closing_late(reply: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(reply);
                thread::sleep(Duration::from_millis(500));
            });
        }
    });
    addr
}

/// A server that answers each connection's first read with `reply`, then (with `reset`)
/// resets the connection, a moment later, instead of closing it.
pub fn scripted(reply: &'static [u8], reset: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(reply);
            if reset {
                thread::sleep(Duration::from_millis(100));
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
        }
    });
    addr
}

/// An upstream that answers every request on a connection with `pieces`, written one at a
/// time with a pause between, so the proxy reads the response in several parts; counts the
/// connections it accepted.
pub fn piecewise(pieces: &'static [&'static [u8]]) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    request.clear();
                    for piece in pieces {
                        if stream.write_all(piece).is_err() {
                            return;
                        }
                        thread::sleep(Duration::from_millis(15));
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// An address nothing listens on, which refuses connections: a socket bound there and never
/// listening, kept for the life of the test process so that no server started later (by
/// another test running beside) can take the port.
pub fn dead_address() -> SocketAddr {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    std::mem::forget(socket);
    addr
}

/// An address that never completes a TCP handshake, as a host that is down (its SYNs go
/// unanswered): a listener that never accepts, its one-place accept queue already taken.
/// Kept open for the life of the test process.
pub fn unresponsive() -> SocketAddr {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    std::mem::forget((socket, filler));
    addr
}

/// A server that accepts and then never reads or writes.
pub fn black_hole() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    addr
}
