//! The application's probes, made by the sidecar: under STRICT mTLS the kubelet's plaintext
//! HTTP, TCP and gRPC probes could not reach the application through the inbound proxy, so
//! `ternctl inject` rewrites them to `GET /app-health/<container>/<probe>` on this server's
//! port (which the interception rules leave alone), and the original probe is made here, from
//! inside the Pod, against the application on loopback: as Istio's agent does. A probe
//! succeeds as the kubelet's would (HTTP 200–399 after following redirects to the
//! application itself, over TLS for `scheme: HTTPS` without checking the certificate, a TCP
//! connection, or a gRPC health check answering `SERVING`) and answers 200; else 503, saying
//! why.
//!
//! The probes come as JSON (`TERN_APP_PROBES`, written by `ternctl inject`): paths mapped to
//! the Kubernetes probe each stands for, with its `httpGet`, `tcpSocket` or `grpc` (numeric
//! port) and `timeoutSeconds`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// The path prefix of rewritten probes.
pub const PREFIX: &str = "/app-health/";

/// One Kubernetes probe, as the Pod spec states it (the fields Tern makes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// An HTTP GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    /// A TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    /// A gRPC health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
    /// How long the probe may take (Kubernetes' default: 1 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// A probe's HTTP GET.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    /// The application's port.
    pub port: u16,
    /// The path (with its query).
    #[serde(default = "root")]
    pub path: String,
    /// Headers to send.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<Header>,
    /// `HTTP` or `HTTPS`.
    #[serde(default, skip_serializing_if = "Scheme::is_http")]
    pub scheme: Scheme,
}

/// How a probe's GET reaches the application.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Scheme {
    /// Plaintext.
    #[default]
    Http,
    /// TLS, with the certificate not checked: the kubelet does not check it either.
    Https,
}

impl Scheme {
    fn is_http(&self) -> bool {
        *self == Scheme::Http
    }
}

/// A header of a probe's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Its name.
    pub name: String,
    /// Its value (Kubernetes allows none: empty).
    #[serde(default)]
    pub value: String,
}

/// A probe's TCP connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSocket {
    /// The application's port.
    pub port: u16,
}

/// A probe's gRPC health check (`grpc.health.v1.Health/Check`), as the kubelet makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grpc {
    /// The application's port.
    pub port: u16,
    /// The service asked about (empty: the server as a whole).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
}

fn root() -> String {
    "/".to_owned()
}

/// The probes, by path.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// Why the probes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbesError {
    /// Not JSON of the expected shape.
    #[error("the application probes (TERN_APP_PROBES) are not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// A probe with none or more than one of `httpGet`, `tcpSocket` and `grpc`.
    #[error("application probe {0}: exactly one of httpGet, tcpSocket and grpc is needed")]
    Kind(String),
    /// A path outside [`PREFIX`].
    #[error("application probe {0}: its path must start with {PREFIX}")]
    Path(String),
}

/// Reads the probes from their JSON.
pub fn parse(json: &str) -> Result<AppProbes, ProbesError> {
    let probes: AppProbes = serde_json::from_str(json)?;
    for (path, probe) in &probes {
        if !path.starts_with(PREFIX) {
            return Err(ProbesError::Path(path.clone()));
        }
        let kinds = [
            probe.http_get.is_some(),
            probe.tcp_socket.is_some(),
            probe.grpc.is_some(),
        ];
        if kinds.iter().filter(|kind| **kind).count() != 1 {
            return Err(ProbesError::Kind(path.clone()));
        }
    }
    Ok(probes)
}

/// Most probe connections served at once: the port is outside interception, open to the
/// Pod's network, so what it takes is bounded.
const MAX_CONNECTIONS: usize = 64;
/// Longest a probe connection is kept (a kubelet sends one request and closes).
const CONNECTION_LIMIT: Duration = Duration::from_secs(60);

/// Binds the probe server's socket at `address`; `[::]` falls back to `0.0.0.0` where the
/// kernel has no IPv6.
pub fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    match std::net::TcpListener::bind(address) {
        Err(error)
            if address.ip().is_ipv6()
                && address.ip().is_unspecified()
                && error.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, address.port()))
        }
        bound => bound,
    }
}

/// Serves the probes on `listener` from a thread of its own, for the life of the process.
pub fn spawn(
    listener: std::net::TcpListener,
    probes: AppProbes,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("tern-probes".into())
        .spawn(move || {
            let probes = Arc::new(probes);
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
            let served: std::io::Result<()> = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let accept_failures = crate::metrics::Pace::default();
                loop {
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        return Ok(());
                    };
                    let (stream, _) = match listener.accept().await {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            if let Some(held_back) = accept_failures.admit() {
                                tracing::warn!(%error, held_back, "probe server accept failed");
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let probes = probes.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        let service = hyper::service::service_fn(move |request: Request<_>| {
                            let probes = probes.clone();
                            async move {
                                Ok::<_, Infallible>(answer(&probes, request.uri().path()).await)
                            }
                        });
                        let connection = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(5))
                            .keep_alive(false)
                            .serve_connection(TokioIo::new(stream), service);
                        let _ = tokio::time::timeout(CONNECTION_LIMIT, connection).await;
                    });
                }
            });
            if let Err(error) = served {
                tracing::error!(%error, "probe server failed");
            }
        })
}

/// The answer to a probe of `path`.
async fn answer(probes: &AppProbes, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match probes.get(path) {
        None => (StatusCode::NOT_FOUND, format!("no probe at {path}\n")),
        Some(probe) => match run(probe).await {
            Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
            Err(why) => {
                tracing::debug!(path, %why, "application probe failed");
                (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
            }
        },
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Makes one probe against the application on loopback.
async fn run(probe: &AppProbe) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1));
    let attempt = async {
        if let Some(tcp) = &probe.tcp_socket {
            connect(tcp.port).await.map(drop)
        } else if let Some(get) = &probe.http_get {
            http_get(get).await
        } else if let Some(grpc) = &probe.grpc {
            grpc_health(grpc, timeout).await
        } else {
            Err("no httpGet, tcpSocket or grpc".to_owned())
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// A connection to the application's `port` on loopback: IPv4, else IPv6 (an application
/// may listen on either alone).
async fn connect(port: u16) -> Result<tokio::net::TcpStream, String> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match tokio::net::TcpStream::connect(v4).await {
        Ok(stream) => Ok(stream),
        Err(error) => {
            let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
            tokio::net::TcpStream::connect(v6)
                .await
                .map_err(|_| format!("connecting to {v4}: {error}"))
        }
    }
}

/// Most redirects a probe follows, as the kubelet's client.
const MAX_REDIRECTS: usize = 10;

async fn http_get(get: &HttpGet) -> Result<(), String> {
    // The probe's own headers, then the kubelet's defaults for those it does not set.
    let mut headers = hyper::HeaderMap::new();
    for header in &get.http_headers {
        let name = hyper::header::HeaderName::from_bytes(header.name.as_bytes());
        let value = hyper::header::HeaderValue::from_str(&header.value);
        let (Ok(name), Ok(value)) = (name, value) else {
            return Err(format!("probe header {:?} is not valid", header.name));
        };
        headers.append(name, value);
    }
    for (name, value) in [
        (hyper::header::HOST, format!("127.0.0.1:{}", get.port)),
        (hyper::header::USER_AGENT, "kube-probe/tern".to_owned()),
        (hyper::header::ACCEPT, "*/*".to_owned()),
    ] {
        if !headers.contains_key(&name)
            && let Ok(value) = hyper::header::HeaderValue::from_str(&value)
        {
            headers.insert(name, value);
        }
    }
    // Redirects to the application itself are followed and the last answer judged; one to
    // elsewhere passes as it is (the kubelet's rules).
    let mut path = get.path.clone();
    for _ in 0..=MAX_REDIRECTS {
        let mut request = Request::get(&path)
            .body(Empty::<Bytes>::new())
            .map_err(|error| format!("probe request for {path}: {error}"))?;
        *request.headers_mut() = headers.clone();
        let response = get_once(get, request).await?;
        let status = response.status().as_u16();
        if !(200..400).contains(&status) {
            return Err(format!("GET {path} on port {} answered {status}", get.port));
        }
        let location = response
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|l| l.to_str().ok());
        match location.filter(|_| response.status().is_redirection()) {
            Some(location) => match same_application(get, &path, location) {
                Some(next) => path = next,
                None => return Ok(()),
            },
            None => return Ok(()),
        }
    }
    Err(format!(
        "GET {} on port {}: more than {MAX_REDIRECTS} redirects",
        get.path, get.port
    ))
}

/// Where a redirect from `from` to `location` leads on the application the probe is for
/// (its path), or `None` when it leads elsewhere (another host, port or scheme).
fn same_application(get: &HttpGet, from: &str, location: &str) -> Option<String> {
    if location.starts_with("//") {
        return None;
    }
    if location.starts_with('/') {
        return Some(location.to_owned());
    }
    if !location.contains("://") {
        // Relative to the current path's folder.
        let folder = from.split('?').next().unwrap_or("/");
        let folder = &folder[..folder.rfind('/').map_or(0, |i| i + 1)];
        return Some(format!("/{}{location}", folder.trim_start_matches('/')));
    }
    let uri = location.parse::<hyper::Uri>().ok()?;
    let scheme = match get.scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    let local = uri
        .host()
        .is_some_and(|host| ["127.0.0.1", "localhost", "[::1]"].contains(&host));
    (uri.scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
        && local
        && uri.port_u16() == Some(get.port))
    .then(|| uri.path_and_query().map_or("/", |p| p.as_str()).to_owned())
}

/// One GET of the probe's, on a new connection (the kubelet keeps none).
async fn get_once(
    get: &HttpGet,
    request: Request<Empty<Bytes>>,
) -> Result<Response<hyper::body::Incoming>, String> {
    let stream = connect(get.port).await?;
    match get.scheme {
        Scheme::Http => send(stream, request, get).await,
        Scheme::Https => {
            let tls = tokio_rustls::TlsConnector::from(any_certificate()?)
                .connect(
                    rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()),
                    stream,
                )
                .await
                .map_err(|error| format!("TLS to port {}: {error}", get.port))?;
            send(tls, request, get).await
        }
    }
}

/// Sends a probe's request on `stream` (HTTP/1.1) and returns the response.
async fn send<S>(
    stream: S,
    request: Request<Empty<Bytes>>,
    get: &HttpGet,
) -> Result<Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("HTTP to port {}: {error}", get.port))?;
    tokio::spawn(connection);
    let path = request.uri().to_string();
    sender
        .send_request(request)
        .await
        .map_err(|error| format!("GET {path} on port {}: {error}", get.port))
}

/// A TLS 1.3 or 1.2 client that takes any certificate the application shows, as the
/// kubelet's HTTPS probe does (`InsecureSkipVerify`): the probe asks whether the application
/// answers, not who it is, and it never leaves the Pod. (Unlike Go's, it cannot read an
/// X.509 v1 certificate.)
fn any_certificate() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS client: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Takes any server certificate; still checks the handshake's signatures, so the TLS
/// session itself is sound.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A gRPC health check of the application, over HTTP/2 in cleartext on loopback: it passes
/// when the answer is `SERVING`, as the kubelet's does.
async fn grpc_health(grpc: &Grpc, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let stream = connect(grpc.port).await?;
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .map_err(|error| format!("HTTP/2 to port {}: {error}", grpc.port))?;
    tokio::spawn(connection);
    let origin = hyper::Uri::from_maybe_shared(format!("http://127.0.0.1:{}", grpc.port))
        .map_err(|error| format!("gRPC to port {}: {error}", grpc.port))?;
    let mut client = HealthClient::with_origin(Http2Sender(sender), origin);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: grpc.service.clone(),
    });
    // As the kubelet's client: its deadline, and who is asking.
    request.set_timeout(timeout);
    request.metadata_mut().insert(
        "user-agent",
        tonic::metadata::MetadataValue::from_static("kube-probe/tern"),
    );
    let answer = client.check(request).await.map_err(|status| {
        format!(
            "gRPC health check on port {} answered {:?}: {}",
            grpc.port,
            status.code(),
            status.message()
        )
    })?;
    let status = answer.into_inner().status();
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!(
            "gRPC health check on port {} (service {:?}) answered {}",
            grpc.port,
            grpc.service,
            status.as_str_name()
        ))
    }
}

/// A hyper HTTP/2 connection as the service a tonic client calls.
#[derive(Clone)]
struct Http2Sender(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<hyper::Request<tonic::body::Body>> for Http2Sender {
    type Response = hyper::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: hyper::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_are_followed_only_to_the_application_itself() {
        let get = HttpGet {
            port: 8080,
            path: "/a/b?x=1".into(),
            http_headers: Vec::new(),
            scheme: Scheme::Http,
        };
        let next = |location: &str| same_application(&get, "/a/b?x=1", location);
        assert_eq!(next("/healthz?full"), Some("/healthz?full".into()));
        assert_eq!(next("c"), Some("/a/c".into()));
        assert_eq!(next("http://127.0.0.1:8080/ok"), Some("/ok".into()));
        assert_eq!(next("http://localhost:8080"), Some("/".into()));
        for elsewhere in [
            "http://example.com/",
            "https://127.0.0.1:8080/ok",
            "http://127.0.0.1:9090/ok",
            "//example.com/ok",
        ] {
            assert_eq!(next(elsewhere), None, "{elsewhere}");
        }
    }

    #[test]
    fn probes_are_read_and_checked() {
        let probes = parse(
            r#"{"/app-health/app/readyz": {"httpGet": {"port": 8080, "path": "/healthz"}, "timeoutSeconds": 3},
                "/app-health/app/livez": {"tcpSocket": {"port": 8080}},
                "/app-health/app/startupz": {"grpc": {"port": 9090}}}"#,
        )
        .unwrap();
        assert_eq!(probes.len(), 3);
        assert_eq!(
            probes["/app-health/app/startupz"].grpc,
            Some(Grpc {
                port: 9090,
                service: String::new()
            })
        );
        assert_eq!(
            probes["/app-health/app/readyz"]
                .http_get
                .as_ref()
                .unwrap()
                .path,
            "/healthz"
        );
        for (bad, expected) in [
            (r#"{"/app-health/x": {}}"#, "exactly one"),
            (
                r#"{"/app-health/x": {"tcpSocket": {"port": 1}, "httpGet": {"port": 1}}}"#,
                "exactly one",
            ),
            (
                r#"{"/app-health/x": {"grpc": {"port": 1}, "tcpSocket": {"port": 1}}}"#,
                "exactly one",
            ),
            (r#"{"/x": {"tcpSocket": {"port": 1}}}"#, "must start with"),
            (
                r#"{"/app-health/x": {"tcpSocket": {"port": "http"}}}"#,
                "not valid",
            ),
        ] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }
}
