//! The control plane's admin endpoint (HTTP, plain, meant for localhost or the pod
//! network): `/status` (JSON: the catalog's generation and problems, connected proxies with
//! the version each runs, its last NACK and certificate expiry), `/metrics` (Prometheus),
//! `/live` and `/ready`. `ternctl status` reads `/status`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::discovery::{Nack, ProxyStatus, Registry};

/// What `/status` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The catalog's generation (moves when accepted objects change).
    pub generation: u64,
    /// Objects in use.
    pub objects: usize,
    /// Declared objects that were refused, each naming file, object and field.
    pub problems: Vec<String>,
    /// Connected proxies.
    pub proxies: Vec<ProxyStatus>,
    /// The latest NACK from any proxy.
    pub last_nack: Option<Nack>,
}

fn ago(now: u64, then: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(now.saturating_sub(then))).to_string()
}

impl Status {
    /// The table `ternctl status` prints, as of `now` (Unix seconds).
    pub fn render(&self, now: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "config generation {}: {} objects in use, {} refused",
            self.generation,
            self.objects,
            self.problems.len()
        );
        for problem in &self.problems {
            let _ = writeln!(out, "  refused: {problem}");
        }
        let _ = writeln!(
            out,
            "\n{:<28} {:<48} {:>14} {:>24} {:>10} {:>14}",
            "WORKLOAD", "IDENTITY", "SENT", "APPLIED", "CONNECTED", "CERT EXPIRES"
        );
        for proxy in &self.proxies {
            let expiry = proxy.certificate_expiry.map_or("-".to_owned(), |e| {
                let left = e.saturating_sub(i64::try_from(now).unwrap_or(i64::MAX));
                if left <= 0 {
                    "EXPIRED".to_owned()
                } else {
                    format!("in {}", ago(left.unsigned_abs(), 0))
                }
            });
            let applied = if proxy.applied_version == proxy.sent_version {
                proxy.applied_version.to_string()
            } else {
                format!("{} (behind)", proxy.applied_version)
            };
            let _ = writeln!(
                out,
                "{:<28} {:<48} {:>14} {:>24} {:>10} {:>14}",
                proxy.workload,
                proxy.identity,
                proxy.sent_version,
                applied,
                ago(now, proxy.connected_at),
                expiry
            );
            if let Some(nack) = &proxy.last_nack {
                let _ = writeln!(
                    out,
                    "  last NACK, of version {}: {}",
                    nack.version, nack.reason
                );
            }
            for note in &proxy.notes {
                let _ = writeln!(out, "  note: {note}");
            }
        }
        if self.proxies.is_empty() {
            let _ = writeln!(out, "(no proxy connected)");
        }
        if let Some(nack) = &self.last_nack {
            let _ = writeln!(
                out,
                "\nlast NACK: {} ({}) refused version {} {} ago: {}",
                nack.workload,
                nack.identity,
                nack.version,
                ago(now, nack.at),
                nack.reason
            );
        }
        out
    }
}

/// The status of the control plane right now.
pub fn status(catalog: &Catalog, registry: &Registry) -> Status {
    Status {
        generation: catalog.generation,
        objects: catalog.len(),
        problems: catalog.problems.iter().map(ToString::to_string).collect(),
        proxies: registry.connected(),
        last_nack: registry.last_nack(),
    }
}

fn metrics(catalog: &Catalog, registry: &Registry) -> String {
    let mut out = String::new();
    let proxies = registry.connected();
    let behind = proxies
        .iter()
        .filter(|p| p.applied_version != p.sent_version)
        .count();
    let counters = [
        (
            "tern_control_pushes_total",
            "Configs sent to proxies.",
            registry.pushes.load(Ordering::Relaxed),
        ),
        (
            "tern_control_acks_total",
            "Configs proxies acknowledged.",
            registry.acks.load(Ordering::Relaxed),
        ),
        (
            "tern_control_nacks_total",
            "Configs proxies refused.",
            registry.nacks.load(Ordering::Relaxed),
        ),
        (
            "tern_control_streams_refused_total",
            "Discovery streams refused (bad Hello or credential).",
            registry.refused.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let gauges = [
        (
            "tern_control_proxies_connected",
            "Proxies with an open discovery stream.",
            proxies.len() as u64,
        ),
        (
            "tern_control_proxies_behind",
            "Connected proxies that have not acknowledged their latest config.",
            behind as u64,
        ),
        (
            "tern_control_catalog_generation",
            "Generation of the accepted config.",
            catalog.generation,
        ),
        (
            "tern_control_catalog_objects",
            "Declared objects in use.",
            catalog.len() as u64,
        ),
        (
            "tern_control_catalog_problems",
            "Declared objects refused (see /status).",
            catalog.problems.len() as u64,
        ),
        (
            "tern_control_last_nack_version",
            "Version of the latest NACK (0 if none).",
            registry.last_nack().map_or(0, |n| n.version),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    registry.injections.render(&mut out);
    out
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

fn handle(
    catalog: &watch::Receiver<Arc<Catalog>>,
    registry: &Registry,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let catalog = catalog.borrow().clone();
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/live" | "/ready") => reply(StatusCode::OK, PLAIN, "ok\n".into()),
        (&Method::GET, "/status") => {
            match serde_json::to_string_pretty(&status(&catalog, registry)) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
            }
        }
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics(&catalog, registry),
        ),
        (_, "/live" | "/ready" | "/status" | "/metrics") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n".into())
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            "try /status, /metrics, /live or /ready\n".into(),
        ),
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    catalog: watch::Receiver<Arc<Catalog>>,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let catalog = catalog.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = handle(&catalog, &registry, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "admin connection failed");
            }
        });
    }
}
