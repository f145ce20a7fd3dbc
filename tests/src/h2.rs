//! A blocking HTTP/2 client for tests (hyper, prior knowledge, on its own runtime): one
//! connection, many concurrent streams.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One HTTP/2 connection.
pub struct H2 {
    runtime: tokio::runtime::Runtime,
    sender: SendRequest<Full<Bytes>>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Trailers, if any.
    pub trailers: Option<hyper::HeaderMap>,
    /// The stream ended with the head (one HEADERS frame with END_STREAM: gRPC's
    /// trailers-only answer).
    pub head_only: bool,
}

impl Answer {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl H2 {
    /// Connects (h2c, prior knowledge) over `stream`, already connected (in any namespace).
    pub fn over(stream: std::net::TcpStream) -> H2 {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        stream.set_nonblocking(true).unwrap();
        let sender = runtime.block_on(async {
            let stream = tokio::net::TcpStream::from_std(stream).unwrap();
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .expect("HTTP/2 handshake");
            tokio::spawn(connection);
            sender
        });
        H2 { runtime, sender }
    }

    /// Whether the connection has ended (the server sent GOAWAY, or closed it).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> H2 {
        H2::over(crate::client::connect(addr))
    }

    /// Sends one request and reads the whole answer.
    pub fn send(&self, method: &str, authority: &str, path: &str, body: Bytes) -> Answer {
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{authority}{path}"))
            .body(Full::new(body))
            .unwrap();
        self.request(request)
    }

    /// Sends a request as it is and reads the whole answer.
    pub fn request(&self, request: hyper::Request<Full<Bytes>>) -> Answer {
        let mut sender = self.sender.clone();
        let exchange = async move {
            let response = sender.send_request(request).await.expect("a response");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let head_only = hyper::body::Body::is_end_stream(response.body());
            let collected = response.into_body().collect().await.expect("a body");
            let trailers = collected.trailers().cloned();
            Answer {
                status,
                headers,
                body: collected.to_bytes(),
                trailers,
                head_only,
            }
        };
        self.runtime.block_on(async move {
            tokio::time::timeout(std::time::Duration::from_secs(20), exchange)
                .await
                .expect("the whole answer in time")
        })
    }

    /// Sends a GET and returns its response with the body unread: the stream stays open, its
    /// window filling, while the response is held.
    pub fn get_unread(
        &self,
        authority: &str,
        path: &str,
    ) -> hyper::Response<hyper::body::Incoming> {
        let mut sender = self.sender.clone();
        let request = hyper::Request::builder()
            .uri(format!("http://{authority}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.runtime
            .block_on(sender.send_request(request))
            .expect("a response")
    }

    /// Starts a GET and leaves it running: its stream stays open until it is answered or
    /// this connection is dropped.
    pub fn start_get(&self, authority: &str, path: &str) {
        let mut sender = self.sender.clone();
        let request = hyper::Request::builder()
            .uri(format!("http://{authority}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.runtime.spawn(async move {
            let _ = sender.send_request(request).await;
        });
    }

    /// A GET, and how reading its body ended: the status, and the body or why it failed.
    pub fn get_outcome(&self, authority: &str, path: &str) -> (u16, Result<Bytes, String>) {
        let mut sender = self.sender.clone();
        let request = hyper::Request::builder()
            .uri(format!("http://{authority}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let exchange = async move {
            let response = sender.send_request(request).await.expect("a response");
            let status = response.status().as_u16();
            let body = response.into_body().collect().await;
            (
                status,
                body.map(|b| b.to_bytes()).map_err(|e| e.to_string()),
            )
        };
        self.runtime.block_on(async move {
            tokio::time::timeout(std::time::Duration::from_secs(20), exchange)
                .await
                .expect("the exchange to end in time")
        })
    }

    /// A GET.
    pub fn get(&self, authority: &str, path: &str) -> Answer {
        self.send("GET", authority, path, Bytes::new())
    }

    /// Sends `count` GETs at once on this connection (concurrent streams); the answers, in
    /// order.
    pub fn get_many(&self, authority: &str, paths: &[String]) -> Vec<Answer> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = paths
                .iter()
                .map(|path| scope.spawn(move || self.get(authority, path)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }
}
