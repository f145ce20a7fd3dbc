//! A fake Kubernetes API server on loopback, enough for kube-rs' watcher: `list` and `watch`
//! of the collections it is told to serve, JSON over plain HTTP/1.1, no authentication of
//! its own; and `TokenReview`s of the ServiceAccount tokens the test grants.
//! Every other path answers 404 with a `Status`, as the real one does for a kind whose CRD
//! is not installed. Objects are applied and deleted by the test, and each change reaches
//! the open watches as an `ADDED`, `MODIFIED` or `DELETED` event with a new
//! `resourceVersion`. List and watch honour `labelSelector` (`key=value`, comma-separated)
//! and `fieldSelector` (`metadata.name=…`, `metadata.namespace=…`). `PATCH` of an object
//! takes a server-side apply (which here replaces the object, as it does for a sole field
//! manager; `fieldManager` and `force` are not checked) or a JSON Patch. A watch with a
//! selector is not told when an object stops matching it (a real one gets `DELETED`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

/// One served collection: its path (`/api/v1/services`) and what it holds.
#[derive(Default)]
struct Collection {
    /// By namespace and name.
    objects: BTreeMap<(String, String), Value>,
    /// Every change, in order: its resourceVersion and the watch event.
    log: Vec<(u64, Value)>,
    /// History before this resourceVersion is gone: a watch from before it gets 410.
    compacted: u64,
    /// Open watches, each with its selector.
    watches: Vec<(Selector, mpsc::UnboundedSender<Bytes>)>,
}

/// What a list or watch asked for: `key=value` labels and `metadata.*=value` fields.
#[derive(Default, Clone)]
struct Selector {
    labels: Vec<(String, String)>,
    fields: Vec<(String, String)>,
}

impl Selector {
    fn parse(labels: Option<String>, fields: Option<String>) -> Selector {
        let pairs = |text: Option<String>| -> Vec<(String, String)> {
            let text = percent_decode(&text.unwrap_or_default());
            text.split(',')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (key.to_owned(), value.to_owned())
                })
                .collect()
        };
        Selector {
            labels: pairs(labels),
            fields: pairs(fields),
        }
    }

    fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        self.labels
            .iter()
            .all(|(key, value)| metadata["labels"][key].as_str() == Some(value))
            && self.fields.iter().all(|(field, value)| {
                let field = field.strip_prefix("metadata.").unwrap_or(field);
                metadata[field].as_str().unwrap_or_default() == value
            })
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Default)]
struct State {
    resource_version: u64,
    collections: BTreeMap<String, Collection>,
    /// Paths asked for, in order (with their query).
    requests: Vec<String>,
    /// ServiceAccount tokens: namespace, account and the audience each was minted for.
    tokens: BTreeMap<String, (String, String, String)>,
    /// Tokens reviewed, in order.
    reviewed: Vec<String>,
    /// Answer reviews without saying which audiences were checked, as an authenticator that
    /// ignores audiences does.
    omit_audiences: bool,
    /// Answer reviews 500, as an API server whose storage is down does (not 503, which
    /// kube-rs retries for seconds).
    reviews_unavailable: bool,
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// The audience of a token a Pod gets by default.
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc";

/// The running fake; dropping it stops it.
pub struct ApiServer {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

/// Writes a kubeconfig whose one context reaches the API server at `url` (no credentials)
/// to `path`, as `KUBECONFIG` names it.
pub fn write_kubeconfig(path: &std::path::Path, url: &str) {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{ name: fake, cluster: {{ server: \"{url}\" }} }}]\nusers: [{{ name: nobody, user: {{}} }}]\ncontexts: [{{ name: fake, context: {{ cluster: fake, user: nobody }} }}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
}

/// The path of the collection an object of `api_version` and `plural` lives in.
fn collection_path(api_version: &str, plural: &str) -> String {
    if api_version.contains('/') {
        format!("/apis/{api_version}/{plural}")
    } else {
        format!("/api/{api_version}/{plural}")
    }
}

impl ApiServer {
    /// Serves the collections named by (apiVersion, plural), empty.
    pub fn start(collections: &[(&str, &str)]) -> ApiServer {
        let state = Arc::new(Mutex::new(State::default()));
        {
            let mut state = state.lock().unwrap();
            for (api_version, plural) in collections {
                state
                    .collections
                    .insert(collection_path(api_version, plural), Collection::default());
            }
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address: SocketAddr = listener.local_addr().unwrap();
        let served = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move {
                                let (head, body) = request.into_parts();
                                let body = match body.collect().await {
                                    Ok(body) => body.to_bytes(),
                                    Err(_) => Bytes::new(),
                                };
                                Ok::<_, Infallible>(answer(&state, &head, &body))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ApiServer {
            url: format!("http://{address}"),
            state,
            _runtime: runtime,
        }
    }

    /// Creates or replaces `object` (a manifest: `apiVersion`, `kind`, `metadata`) in the
    /// collection `plural`.
    pub fn apply(&self, plural: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let version = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let key = key_of(&object);
        let path = collection_path(object["apiVersion"].as_str().unwrap_or_default(), plural);
        let collection = state
            .collections
            .get_mut(&path)
            .unwrap_or_else(|| panic!("{path} is not served"));
        let kind = if collection.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        collection.objects.insert(key, object.clone());
        collection.publish(version, json!({"type": kind, "object": object}));
    }

    /// Deletes the object `namespace/name` from collection `plural` of `api_version`.
    pub fn delete(&self, api_version: &str, plural: &str, namespace: &str, name: &str) {
        self.remove(api_version, plural, namespace, name, true);
    }

    /// Makes `token` a ServiceAccount token of `namespace/account`, minted for `audience`.
    pub fn grant_token(&self, token: &str, namespace: &str, account: &str, audience: &str) {
        self.state.lock().unwrap().tokens.insert(
            token.to_owned(),
            (
                namespace.to_owned(),
                account.to_owned(),
                audience.to_owned(),
            ),
        );
    }

    /// Takes `token` back, as deleting its ServiceAccount (or its Pod, for a bound token)
    /// does: reviews of it are no longer authenticated.
    pub fn revoke_token(&self, token: &str) {
        self.state.lock().unwrap().tokens.remove(token);
    }

    /// Answers reviews 500 (`unavailable`) or as the API server does.
    pub fn reviews_unavailable(&self, unavailable: bool) {
        self.state.lock().unwrap().reviews_unavailable = unavailable;
    }

    /// How many times `token` was reviewed.
    pub fn reviews_of(&self, token: &str) -> usize {
        let state = self.state.lock().unwrap();
        state.reviewed.iter().filter(|t| *t == token).count()
    }

    /// Answers reviews as an authenticator that ignores audiences (`omit`) or as the API
    /// server does.
    pub fn omit_audiences(&self, omit: bool) {
        self.state.lock().unwrap().omit_audiences = omit;
    }

    /// Deletes the object `namespace/name` from collection `plural` of `api_version` with no
    /// watch seeing it, and drops the history before it, as an API server's compaction does:
    /// open watches end, and a watch resumed from before the deletion is told 410 Gone, so
    /// the client must list again to learn of it.
    pub fn delete_unseen(&self, api_version: &str, plural: &str, namespace: &str, name: &str) {
        self.remove(api_version, plural, namespace, name, false);
    }

    /// Removes an object: told to open watches (`seen`) or compacted away.
    fn remove(&self, api_version: &str, plural: &str, namespace: &str, name: &str, seen: bool) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let version = state.resource_version;
        let path = collection_path(api_version, plural);
        let collection = state.collections.get_mut(&path).unwrap();
        let mut object = collection
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no {namespace}/{name} in {path}"));
        if seen {
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            collection.publish(version, json!({"type": "DELETED", "object": object}));
        } else {
            collection.log.clear();
            collection.compacted = version;
            collection.watches.clear();
        }
    }

    /// Ends every open watch, as an API server does when its watch timeout passes or it
    /// restarts: clients must watch again from the last version they saw.
    pub fn end_watches(&self) {
        let mut state = self.state.lock().unwrap();
        for collection in state.collections.values_mut() {
            collection.watches.clear();
        }
    }

    /// The object `namespace/name` (`""` for a cluster-scoped one) of collection `plural` of
    /// `api_version`, as it is now.
    pub fn get(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let state = self.state.lock().unwrap();
        let path = collection_path(api_version, plural);
        let collection = state.collections.get(&path)?;
        collection
            .objects
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// How many requests asked for `path` with a query containing `query` (say `watch=`).
    pub fn requests(&self, path: &str, query: &str) -> usize {
        let state = self.state.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|r| {
                r.split_once('?')
                    .is_some_and(|(p, q)| p == path && q.contains(query))
            })
            .count()
    }
}

impl Collection {
    fn publish(&mut self, version: u64, event: Value) {
        let line = Bytes::from(format!("{event}\n"));
        self.watches.retain(|(selector, watch)| {
            !selector.matches(&event["object"]) || watch.send(line.clone()).is_ok()
        });
        self.log.push((version, event));
    }
}

fn key_of(object: &Value) -> (String, String) {
    let text = |field: &str| {
        object["metadata"][field]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    (text("namespace"), text("name"))
}

type Body = BoxBody<Bytes, Infallible>;

fn answer(state: &Mutex<State>, head: &hyper::http::request::Parts, body: &[u8]) -> Response<Body> {
    let mut state = state.lock().unwrap();
    let path = head.uri.path().to_owned();
    let query = head.uri.query().unwrap_or_default().to_owned();
    state.requests.push(format!("{path}?{query}"));
    if head.method == hyper::Method::POST && path == TOKEN_REVIEWS {
        return review(&mut state, body);
    }
    if head.method == hyper::Method::PATCH {
        let content_type = head
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        return patch(&mut state, &path, content_type, body);
    }
    let version = state.resource_version;
    let Some(collection) = state.collections.get_mut(&path) else {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "the server could not find the requested resource",
            "reason": "NotFound", "code": 404,
        });
        return json_response(404, &status);
    };
    let param = |name: &str| {
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| value.to_owned())
        })
    };
    let selector = Selector::parse(param("labelSelector"), param("fieldSelector"));
    if param("watch").is_some_and(|w| w == "true" || w == "1") {
        let since: u64 = param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (sender, receiver) = mpsc::unbounded_channel();
        if since < collection.compacted {
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410,
            }});
            let _ = sender.send(Bytes::from(format!("{gone}\n")));
            return watch_response(receiver);
        }
        for (v, event) in &collection.log {
            if *v > since && selector.matches(&event["object"]) {
                let _ = sender.send(Bytes::from(format!("{event}\n")));
            }
        }
        collection.watches.push((selector, sender));
        return watch_response(receiver);
    }
    let items: Vec<&Value> = collection
        .objects
        .values()
        .filter(|o| selector.matches(o))
        .collect();
    json_response(
        200,
        &json!({
            "kind": "List", "apiVersion": "v1",
            "metadata": {"resourceVersion": version.to_string()},
            "items": items,
        }),
    )
}

/// A `PATCH` of one object: its collection's path and its key, from the object's path
/// (`/api/v1/namespaces/<ns>/configmaps/<name>`, `/apis/<group>/<version>/<plural>/<name>`).
fn object_path(path: &str) -> Option<(String, (String, String))> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let prefix = match *segments.first()? {
        "api" => 2,
        "apis" => 3,
        _ => return None,
    };
    let base = segments.get(..prefix)?.join("/");
    match segments.get(prefix..)? {
        ["namespaces", namespace, plural, name] => Some((
            format!("/{base}/{plural}"),
            ((*namespace).to_owned(), (*name).to_owned()),
        )),
        [plural, name] => Some((
            format!("/{base}/{plural}"),
            (String::new(), (*name).to_owned()),
        )),
        _ => None,
    }
}

/// A server-side apply (`application/apply-patch+yaml`, here always JSON) creates or
/// replaces the object; a JSON Patch (`application/json-patch+json`) changes one that
/// exists, or fails as a whole (422) when an operation does.
fn patch(state: &mut State, path: &str, content_type: &str, body: &[u8]) -> Response<Body> {
    let status = |code: u16, message: &str| {
        json_response(
            code,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}),
        )
    };
    let Some((collection_path, key)) = object_path(path) else {
        return status(404, "not an object's path");
    };
    state.resource_version += 1;
    let version = state.resource_version;
    let Some(collection) = state.collections.get_mut(&collection_path) else {
        return status(404, "the server could not find the requested resource");
    };
    let existing = collection.objects.get(&key).cloned();
    let object = match content_type {
        "application/apply-patch+yaml" => {
            let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
                return status(400, "not JSON");
            };
            if !key.0.is_empty() {
                object["metadata"]["namespace"] = key.0.clone().into();
            }
            object["metadata"]["name"] = key.1.clone().into();
            object
        }
        "application/json-patch+json" => {
            let Some(mut object) = existing.clone() else {
                return status(404, "not found");
            };
            let Ok(operations) = serde_json::from_slice::<json_patch::Patch>(body) else {
                return status(400, "not a JSON Patch");
            };
            if let Err(error) = json_patch::patch(&mut object, &operations) {
                return status(422, &error.to_string());
            }
            object
        }
        other => return status(415, &format!("{other} is not served here")),
    };
    let mut object = object;
    object["metadata"]["resourceVersion"] = json!(version.to_string());
    let kind = if existing.is_some() {
        "MODIFIED"
    } else {
        "ADDED"
    };
    collection.objects.insert(key, object.clone());
    collection.publish(version, json!({"type": kind, "object": object}));
    json_response(200, &object)
}

/// A TokenReview as the API server answers one: authenticated when the token is granted and
/// minted for one of the audiences asked about.
fn review(state: &mut State, body: &[u8]) -> Response<Body> {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return json_response(400, &json!({"kind": "Status", "code": 400}));
    };
    let token = request["spec"]["token"].as_str().unwrap_or_default();
    state.reviewed.push(token.to_owned());
    if state.reviews_unavailable {
        return json_response(500, &json!({"kind": "Status", "code": 500}));
    }
    // Asked about no audience, the API server checks its own.
    let asked: Vec<&str> = request["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_else(|| vec![API_SERVER_AUDIENCE]);
    let status = match state.tokens.get(token) {
        Some((namespace, account, _)) if state.omit_audiences => json!({
            "authenticated": true,
            "user": {"username": format!("system:serviceaccount:{namespace}:{account}")},
        }),
        Some((namespace, account, audience)) if asked.contains(&audience.as_str()) => json!({
            "authenticated": true,
            "user": {"username": format!("system:serviceaccount:{namespace}:{account}")},
            "audiences": [audience],
        }),
        Some(_) => {
            json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json_response(
        201,
        &json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {}, "spec": request["spec"], "status": status,
        }),
    )
}

/// A watch: the event lines `receiver` brings, until its senders are gone.
fn watch_response(receiver: mpsc::UnboundedReceiver<Bytes>) -> Response<Body> {
    let frames = tokio_stream::wrappers::UnboundedReceiverStream::new(receiver)
        .map(|line| Ok::<_, Infallible>(Frame::data(line)));
    Response::builder()
        .header("content-type", "application/json")
        .body(StreamBody::new(frames).boxed())
        .unwrap()
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}
