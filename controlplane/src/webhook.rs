//! The sidecar injector as an admission webhook, as Istio's and Linkerd's are: the API server
//! sends `tern-control` each Pod it is about to create in a namespace labelled
//! `tern.dev/inject=enabled` (`AdmissionReview` v1, `POST /inject` over HTTPS with the
//! control plane's serving certificate), and gets back the JSON Patch that adds Tern's
//! sidecar ([`crate::inject`], as `ternctl inject` adds it).
//!
//! In a cluster it also keeps what injected Pods need there ([`keep_cluster_current`]):
//! ConfigMap `tern-proxy` (the sidecar's config and the mesh root) in every namespace
//! labelled for injection, and the `caBundle` of the webhook configuration
//! `tern-sidecar-injector`, by which the API server checks this server, equal to the mesh's
//! trust bundle.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kube::ResourceExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use shared::config::HostPort;
use tokio_stream::StreamExt as _;

use crate::catalog::kubernetes::Backoff;
use crate::inject::{self, Sidecar};

/// The path the webhook answers on.
pub const PATH: &str = "/inject";
/// The namespace label that asks for injection (value `enabled`); the webhook
/// configuration selects namespaces by it and `tern-control` writes their ConfigMap.
pub const NAMESPACE_LABEL: &str = "tern.dev/inject";
/// The `MutatingWebhookConfiguration` whose `caBundle` `tern-control` keeps current.
pub const CONFIGURATION: &str = "tern-sidecar-injector";
/// The field manager `tern-control`'s writes to the cluster are made as.
const FIELD_MANAGER: &str = "tern-control";
/// The largest review read: a Pod is at most about 1.5 MB in etcd.
const MAX_REVIEW: usize = 4 * 1024 * 1024;
/// How long a client has to finish the TLS handshake, send a request's head, or its body.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait to be accepted (each may hold a review's body).
const MAX_CONNECTIONS: usize = 64;
/// How long after a failed write to the API server it is tried again.
const RETRY: Duration = Duration::from_secs(5);
/// How often every labelled namespace's ConfigMap is written again (in case someone
/// changed or deleted it).
const RESYNC: Duration = Duration::from_secs(300);

/// How `tern-control` serves the webhook.
#[derive(Debug, Clone)]
pub struct Injector {
    /// The HTTPS address the API server calls (port 15017 in `deploy/kubernetes/`).
    pub listen: SocketAddr,
    /// The image holding `tern-proxy`.
    pub image: String,
    /// The gRPC address the injected proxies reach `tern-control` at.
    pub control: HostPort,
    /// The OpenTelemetry collector injected proxies send spans to, if any.
    pub trace_collector: Option<HostPort>,
}

/// What became of the reviews the webhook was sent, for `/metrics`
/// (`tern_control_injections_total{result}`).
#[derive(Debug, Default)]
pub struct Injections {
    /// Pods the sidecar was added to.
    pub injected: AtomicU64,
    /// Pods left as they were (opted out, on the host network, injected) and other kinds.
    pub unchanged: AtomicU64,
    /// Pods refused because the sidecar could not be added.
    pub failed: AtomicU64,
    /// Requests that were not `AdmissionReview` v1 (answered 400).
    pub bad_review: AtomicU64,
}

impl Injections {
    /// The Prometheus text of the counter.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        const NAME: &str = "tern_control_injections_total";
        let _ = writeln!(
            out,
            "# HELP {NAME} Admission reviews the sidecar injector answered, by result.\n# TYPE {NAME} counter"
        );
        for (result, count) in [
            ("injected", &self.injected),
            ("unchanged", &self.unchanged),
            ("failed", &self.failed),
            ("bad_review", &self.bad_review),
        ] {
            let count = count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{NAME}{{result=\"{result}\"}} {count}");
        }
    }
}

/// A request `/inject` cannot answer with an `AdmissionReview`.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    /// Not JSON, or not an `AdmissionReview` request.
    #[error("not an AdmissionReview request: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Another version of the API.
    #[error("{0} is not served; the webhook configuration must ask for admission.k8s.io/v1")]
    Version(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: String,
    kind: String,
    request: ReviewRequest,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewRequest {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    object: Value,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    group: String,
    version: String,
    kind: String,
}

/// The answer to `body`, an `AdmissionReview` v1 request: a Pod gets the patch that injects
/// it (none if it is left alone: opted out, on the host network, already injected); any
/// other object is allowed as it is.
pub fn review(body: &[u8], sidecar: &Sidecar) -> Result<Value, BadReview> {
    let review: Review = serde_json::from_slice(body)?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(BadReview::Version(format!(
            "{} {}",
            review.api_version, review.kind
        )));
    }
    let request = review.request;
    let kind = &request.kind;
    let mut response = json!({ "uid": request.uid, "allowed": true });
    let pod = (
        kind.group.as_str(),
        kind.version.as_str(),
        kind.kind.as_str(),
    ) == ("", "v1", "Pod");
    // Only a Pod being created: a patch to a Pod that exists would change fields that
    // cannot change once it does.
    if pod && request.operation == "CREATE" {
        let pod = &request.object;
        let name = pod["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .or_else(|| pod["metadata"]["generateName"].as_str())
            .unwrap_or_default();
        let patch = inject::pod_patch(pod, sidecar).and_then(|patch| {
            patch
                .map(|patch| serde_json::to_vec(&patch))
                .transpose()
                .map_err(anyhow::Error::from)
        });
        match patch {
            Ok(Some(patch)) => {
                response["patchType"] = "JSONPatch".into();
                response["patch"] = base64::engine::general_purpose::STANDARD
                    .encode(patch)
                    .into();
                tracing::info!(
                    namespace = request.namespace,
                    pod = name,
                    "sidecar injected"
                );
            }
            Ok(None) => {
                tracing::debug!(namespace = request.namespace, pod = name, "left as it is");
            }
            Err(error) => {
                tracing::warn!(namespace = request.namespace, pod = name, error = %format!("{error:#}"), "could not inject");
                response["allowed"] = false.into();
                response["status"] = json!({
                    "code": 500,
                    "message": format!("tern-control could not add the sidecar: {error:#}"),
                });
            }
        }
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

fn reply(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

async fn handle(
    request: Request<Incoming>,
    sidecar: &Sidecar,
    injections: &Injections,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if request.uri().path() != PATH {
        return reply(StatusCode::NOT_FOUND, PLAIN, b"try POST /inject\n".to_vec());
    }
    if request.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            b"use POST\n".to_vec(),
        );
    }
    let body = Limited::new(request.into_body(), MAX_REVIEW).collect();
    let body = match tokio::time::timeout(CLIENT_TIMEOUT, body).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            let text = format!("a review is at most {MAX_REVIEW} bytes\n");
            return reply(StatusCode::PAYLOAD_TOO_LARGE, PLAIN, text.into_bytes());
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "reading a review failed");
            return reply(StatusCode::BAD_REQUEST, PLAIN, b"a broken body\n".to_vec());
        }
        Err(_) => {
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                PLAIN,
                b"the body took too long\n".to_vec(),
            );
        }
    };
    match review(&body, sidecar) {
        Ok(answer) => {
            let response = &answer["response"];
            let counter = if response["allowed"] == false {
                &injections.failed
            } else if response["patch"].is_string() {
                &injections.injected
            } else {
                &injections.unchanged
            };
            counter.fetch_add(1, Ordering::Relaxed);
            reply(
                StatusCode::OK,
                "application/json",
                answer.to_string().into(),
            )
        }
        Err(error) => {
            injections.bad_review.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "a review refused");
            reply(StatusCode::BAD_REQUEST, PLAIN, format!("{error}\n").into())
        }
    }
}

/// Serves the webhook over TLS (`tls`: the serving certificate) on `listener` until
/// `shutdown` resolves, counting what it answers in `injections`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    sidecar: Arc<Sidecar>,
    injections: Arc<Injections>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = async {
                let permit = room.clone().acquire_owned().await;
                (permit, listener.accept().await)
            } => accepted,
            () = &mut shutdown => return,
        };
        let (Ok(permit), accepted) = accepted else {
            return;
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "accepting a webhook connection failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (acceptor, sidecar, injections) =
            (acceptor.clone(), sidecar.clone(), injections.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                // Probes and scanners do this all day: not worth a warning each.
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "a webhook client's TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "a webhook client did not finish its TLS handshake");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request| {
                let (sidecar, injections) = (sidecar.clone(), injections.clone());
                async move { Ok::<_, Infallible>(handle(request, &sidecar, &injections).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(CLIENT_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %error, "webhook connection failed");
            }
        });
    }
}

/// The webhook's TLS server config: `cert_pem` (the chain) and `key_pem`, HTTP/1.1.
pub fn server_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading the serving certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("reading its key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("the serving certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Keeps, for as long as it runs, ConfigMap `tern-proxy` of every namespace labelled
/// `tern.dev/inject=enabled` as [`inject::config_map`] makes it for `sidecar` and `root`
/// (the mesh trust bundle, PEM), and the `caBundle` of every webhook of configuration
/// `tern-sidecar-injector` equal to `root`. Writes that fail are tried again.
pub async fn keep_cluster_current(client: kube::Client, sidecar: Sidecar, root: String) {
    tokio::join!(
        keep_config_maps(client.clone(), &sidecar, &root),
        keep_ca_bundle(client, &root),
    );
}

async fn keep_config_maps(client: kube::Client, sidecar: &Sidecar, root: &str) {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::runtime::watcher::{self, Event};
    let namespaces = kube::Api::<Namespace>::all(client.clone());
    let config = watcher::Config::default().labels(&format!("{NAMESPACE_LABEL}=enabled"));
    let mut events = std::pin::pin!(watcher::watcher(namespaces, config));
    let mut backoff = Backoff::default();
    let mut labelled = BTreeSet::new();
    // A relist in progress (after `Init`): what it has listed so far.
    let mut listing = BTreeSet::new();
    // Namespaces whose last write failed, written again at the next retry tick.
    let mut failed = BTreeSet::new();
    let mut resync = interval(RESYNC);
    let mut retry = interval(RETRY);
    loop {
        let write: BTreeSet<String> = tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(Event::Init) => {
                        listing.clear();
                        BTreeSet::new()
                    }
                    Ok(Event::InitApply(namespace)) => {
                        listing.insert(namespace.name_any());
                        BTreeSet::new()
                    }
                    Ok(Event::InitDone) => {
                        backoff.listed(tokio::time::Instant::now());
                        let new = listing.difference(&labelled).cloned().collect();
                        labelled = std::mem::take(&mut listing);
                        failed.retain(|n| labelled.contains(n));
                        new
                    }
                    Ok(Event::Apply(namespace)) => {
                        let name = namespace.name_any();
                        if labelled.insert(name.clone()) {
                            BTreeSet::from([name])
                        } else {
                            BTreeSet::new()
                        }
                    }
                    Ok(Event::Delete(namespace)) => {
                        let name = namespace.name_any();
                        labelled.remove(&name);
                        failed.remove(&name);
                        BTreeSet::new()
                    }
                    Err(error) => {
                        tracing::warn!(%error, "watching the namespaces labelled for injection failed; retrying with backoff");
                        tokio::time::sleep(backoff.after_failure(tokio::time::Instant::now())).await;
                        BTreeSet::new()
                    }
                }
            }
            _ = resync.tick() => labelled.clone(),
            _ = retry.tick() => failed.clone(),
        };
        for namespace in write {
            match write_config_map(&client, &namespace, sidecar, root).await {
                Ok(()) => {
                    failed.remove(&namespace);
                }
                // The namespace went away; its deletion is on its way.
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    failed.remove(&namespace);
                }
                Err(error) => {
                    // Loud once per run of failures, then quiet until it works.
                    if failed.insert(namespace.clone()) {
                        tracing::warn!(namespace, %error, "could not write ConfigMap tern-proxy; trying again every 5 s");
                    }
                }
            }
        }
    }
}

/// A timer ticking every `period`, first at once; a tick missed while the loop was busy
/// waits a whole period rather than firing again at once.
fn interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

async fn write_config_map(
    client: &kube::Client,
    namespace: &str,
    sidecar: &Sidecar,
    root: &str,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams};
    let map = serde_json::to_value(inject::config_map(Some(namespace), sidecar, root))
        .map_err(kube::Error::SerdeError)?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    kube::Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(inject::CONFIG_MAP, &params, &Patch::Apply(&map))
        .await?;
    tracing::info!(namespace, "ConfigMap tern-proxy written");
    Ok(())
}

async fn keep_ca_bundle(client: kube::Client, root: &str) {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use kube::api::{Patch, PatchParams};
    use kube::runtime::watcher::{self, Event};
    let configurations = kube::Api::<MutatingWebhookConfiguration>::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={CONFIGURATION}"));
    let mut events = std::pin::pin!(watcher::watcher(configurations.clone(), config));
    let mut backoff = Backoff::default();
    // The configuration as last seen, while its caBundle is still to be written.
    let mut stale: Option<MutatingWebhookConfiguration> = None;
    let mut failing = false;
    let mut retry = interval(RETRY);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(Event::Apply(seen) | Event::InitApply(seen)) => stale = Some(seen),
                    Ok(Event::Delete(_) | Event::Init) => stale = None,
                    Ok(Event::InitDone) => backoff.listed(tokio::time::Instant::now()),
                    Err(error) => {
                        tracing::warn!(%error, "watching the webhook configuration failed; retrying with backoff");
                        tokio::time::sleep(backoff.after_failure(tokio::time::Instant::now())).await;
                    }
                }
            }
            _ = retry.tick() => {}
        }
        let Some(seen) = &stale else { continue };
        let patch = ca_bundle_patch(seen, root);
        if patch.0.is_empty() {
            stale = None;
            continue;
        }
        match configurations
            .patch(CONFIGURATION, &params, &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => {
                tracing::info!(
                    configuration = CONFIGURATION,
                    "webhook caBundle set to the mesh root"
                );
                (stale, failing) = (None, false);
            }
            // Deleted, or its webhooks changed under the patch's tests: the watch brings
            // what it is now.
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 422 => {
                (stale, failing) = (None, false);
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(configuration = CONFIGURATION, %error, "could not set the webhook caBundle; trying again every 5 s");
                }
                failing = true;
            }
        }
    }
}

/// The JSON Patch that makes every webhook's `caBundle` of `configuration` `root`, each
/// change guarded by a test of the webhook's name (the list may have changed since).
fn ca_bundle_patch(
    configuration: &k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
    root: &str,
) -> json_patch::Patch {
    let bundle = base64::engine::general_purpose::STANDARD.encode(root);
    let mut operations = Vec::new();
    for (index, webhook) in configuration.webhooks.iter().flatten().enumerate() {
        let current = webhook.client_config.ca_bundle.as_ref().map(|b| &b.0[..]);
        if current == Some(root.as_bytes()) {
            continue;
        }
        operations.push(json!({
            "op": "test", "path": format!("/webhooks/{index}/name"), "value": webhook.name,
        }));
        operations.push(json!({
            "op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": bundle,
        }));
    }
    serde_json::from_value(Value::Array(operations))
        .unwrap_or_else(|e| unreachable!("a JSON Patch made here: {e}"))
}

#[cfg(test)]
mod tests;
