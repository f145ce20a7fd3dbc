//! The admin server: `/live`, `/ready`, `/metrics`, `/config_dump` and `POST /shutdown`, on
//! its own thread with its own small runtime, never on a worker. The same runtime runs the
//! CA client and the certificate-expiry watch.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::Notify;

use crate::control::{BoundListener, Control};
use crate::metrics;

/// Runs the admin server on the current thread until `stop` is notified.
pub fn run(
    control: Arc<Control>,
    listener: std::net::TcpListener,
    stop: Arc<Notify>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::task::spawn_local(watch_certificate(control.clone()));
        tokio::task::spawn_local(crate::ca_client::run(control.clone()));
        tokio::task::spawn_local(crate::discovery_client::run(control.clone()));
        let accept_failures = crate::metrics::Pace::default();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.notified() => return Ok(()),
            };
            let (stream, _) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if let Some(held_back) = accept_failures.admit() {
                        tracing::warn!(%error, held_back, "admin accept failed");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let control = control.clone();
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |request| {
                    let control = control.clone();
                    async move { Ok::<_, Infallible>(handle(&control, request).await) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, "admin connection failed");
                }
            });
        }
    })
}

/// How often the certificate's remaining lifetime is checked.
const CERTIFICATE_CHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// Logs loudly, well before it happens, that this proxy's certificate will expire (a silent
/// expiry is a classic mesh outage), and again once it has.
async fn watch_certificate(control: Arc<Control>) {
    loop {
        if let Some((id, validity)) = control.snapshot().and_then(|s| s.identity.clone()) {
            crate::control::log_expiry(&id, &validity);
        }
        tokio::time::sleep(CERTIFICATE_CHECK).await;
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[derive(Serialize)]
struct IdentityDump {
    spiffe_id: String,
    not_before: i64,
    not_after: i64,
    expires_in_seconds: i64,
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    version: u64,
    identity: Option<IdentityDump>,
    /// Where the config came from: the file, plus `tern-control` and its version.
    source: &'a str,
    /// The version of the listeners and clusters from `tern-control`.
    control_plane_version: Option<u64>,
    backend: &'a str,
    workers: usize,
    draining: bool,
    listeners: Vec<BoundListener>,
    config: &'a shared::Config,
}

async fn handle(control: &Control, request: Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, PLAIN, "live\n"),
        (&Method::GET, "/ready") => {
            if control.ready() {
                text(StatusCode::OK, PLAIN, "ready\n")
            } else if control.draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "draining\n")
            } else if let Some(what) = control.waiting_for() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("waiting for {what}\n"),
                )
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "starting\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let (report, answered) = control.scrape().await;
            let snapshot = control.snapshot();
            let version = snapshot.as_ref().map_or(0, |s| s.version);
            let identity_expiry =
                snapshot
                    .as_ref()
                    .and_then(|s| s.identity.as_ref())
                    .map(|(id, validity)| {
                        (
                            id.to_string(),
                            validity.remaining(std::time::SystemTime::now()),
                        )
                    });
            let info = metrics::Info {
                traces: control.trace.as_ref().map(|exporter| exporter.counts()),
                backend: control.backend.as_str(),
                workers: control.workers(),
                config_version: version,
                workers_reporting: answered,
                identity_expiry,
                discovery: control.discovery().borrow().is_some().then(|| {
                    let updates = &control.updates;
                    (
                        updates.acked.load(std::sync::atomic::Ordering::Relaxed),
                        updates.nacked.load(std::sync::atomic::Ordering::Relaxed),
                        updates.connected.load(std::sync::atomic::Ordering::Relaxed),
                    )
                }),
                certify: control.ca().borrow().is_some().then(|| {
                    (
                        control
                            .certify
                            .ok
                            .load(std::sync::atomic::Ordering::Relaxed),
                        control
                            .certify
                            .failed
                            .load(std::sync::atomic::Ordering::Relaxed),
                    )
                }),
            };
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(&info, &report),
            )
        }
        (&Method::GET, "/config_dump") => {
            let Some(snapshot) = control.snapshot() else {
                return text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "no config yet\n");
            };
            let identity = snapshot
                .identity
                .as_ref()
                .map(|(id, validity)| IdentityDump {
                    spiffe_id: id.to_string(),
                    not_before: validity.not_before,
                    not_after: validity.not_after,
                    expires_in_seconds: validity.remaining(std::time::SystemTime::now()),
                });
            let dump = ConfigDump {
                version: snapshot.version,
                identity,
                source: &snapshot.source,
                control_plane_version: control.pushed_version(),
                backend: control.backend.as_str(),
                workers: control.workers(),
                draining: control.draining(),
                listeners: control.listeners(),
                config: &snapshot.config,
            };
            match serde_json::to_vec_pretty(&dump) {
                Ok(json) => text(StatusCode::OK, "application/json", json),
                Err(error) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    format!("{error}\n"),
                ),
            }
        }
        (&Method::POST, "/shutdown") => {
            control.drain();
            text(StatusCode::OK, PLAIN, "draining\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/config_dump" | "/shutdown") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n",
        ),
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}
