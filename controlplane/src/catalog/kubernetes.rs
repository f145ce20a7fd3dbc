//! The Kubernetes source: the kinds a manifest directory holds, listed and then watched from
//! the API server through kube-rs, one watcher per kind, each object parsed as a manifest
//! document is ([`super::source::parse_value`]), so both sources refuse and report alike.
//!
//! The first [`Source::next`] resolves once every kind has been listed, so proxies are never
//! served the empty config of a control plane that has not read the cluster yet. A Gateway
//! API kind the API server does not serve at start (its CRDs not installed: 404) counts as
//! listed and empty, and keeps being retried, so installing the CRDs later is picked up;
//! Tern's own kinds and the core ones must be listed (fail closed: a 404 for
//! AuthorizationPolicy must not start a mesh without policies). A watch or list that fails later, a 404 included (a CRD version no longer
//! served during an upgrade), keeps what it last saw, with a warning; objects go only when
//! the API server says they were deleted or a relist no longer holds them. Failures are
//! retried after 0.8 s, doubling to 30 s while they keep coming, back to 0.8 s once a watch
//! lasts 30 s from its retry or its list ([`Backoff`]; kube-rs' own backoff resets on the `Init` that starts every relist
//! attempt, so it never grows for a list that keeps failing, and a list that works does not
//! reset this one, so a watch that fails after every list is not relisted every 0.8 s).
//! Changes that arrive together become one update, as the directory's do.
//!
//! Objects are kept as far as Tern reads them ([`trim`]): no `managedFields`, no status but a
//! Pod's IP, no annotations but Tern's own. An event that changes nothing of that (a Pod's
//! conditions, a resourceVersion, a Gateway controller writing an HTTPRoute's status) makes
//! no update, so a busy cluster's status churn costs the control plane a parse and a
//! comparison, not a new catalog translated for every proxy.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, TypeMeta};
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use super::source::{MAX_DEBOUNCE, QUIET, Source, parse_value};
use super::{Declared, Origin};

/// What is watched: group, version, kind and plural. The same kinds a manifest directory
/// may hold (`deploy/kubernetes/tern-control.yaml` grants `list` and `watch` on each; a
/// test keeps the two, and Tern's CRDs, in step).
pub const KINDS: [(&str, &str, &str, &str); 10] = [
    ("tern.dev", "v1alpha1", "Mesh", "meshes"),
    ("", "v1", "Service", "services"),
    ("", "v1", "Pod", "pods"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    ("tern.dev", "v1alpha1", "MTLSPolicy", "mtlspolicies"),
    ("tern.dev", "v1alpha1", "BackendPolicy", "backendpolicies"),
    (
        "tern.dev",
        "v1alpha1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "tern.dev",
        "v1alpha1",
        "RateLimitPolicy",
        "ratelimitpolicies",
    ),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    ("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
];

/// The longest a request to the API server waits for a byte of its answer (unless the
/// `kube::Config` given sets a timeout of its own): a list on a connection that died half-open fails after this
/// and is retried, where it would have left its kind frozen. kube-rs ends a watch that stays
/// quiet this long itself (the server ends one after 290 s).
pub const READ_TIMEOUT: Duration = Duration::from_secs(295);

/// `config` as `tern-control` uses it: with [`READ_TIMEOUT`] where it sets no read timeout,
/// counted from when each request is sent (not from when its pooled connection went idle).
pub fn with_read_timeout(mut config: kube::Config) -> kube::Config {
    if config.read_timeout.is_none() {
        config.read_timeout = Some(READ_TIMEOUT);
        config.reset_reader_on_write = true;
    }
    config
}

/// How many watch events may wait to be applied before the watchers wait in turn.
const EVENT_QUEUE: usize = 1024;
/// The wait after a watch or list fails, doubled on each failure that follows within a
/// minute or so, up to [`MAX_RETRY`] ([`Backoff`]).
const FIRST_RETRY: Duration = Duration::from_millis(800);
const MAX_RETRY: Duration = Duration::from_secs(30);

type WatchItem = Result<Event<DynamicObject>, watcher::Error>;

/// The waits between a watcher's failures: [`FIRST_RETRY`], doubling up to [`MAX_RETRY`]
/// while each failure comes within [`MAX_RETRY`] of the watch's start (the retry, or the end
/// of the list the retry needed, whichever is later), and back to the first once a watch has
/// lasted longer (a load balancer cutting long connections every minute costs 0.8 s each
/// time). A list that succeeds does not reset it: an API server that lists and then fails
/// every watch at once (410 Gone again and again) is asked less and less often, however
/// long its lists take, not relisted every 0.8 s.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    /// The last wait, and when the retry after it began.
    last: Option<(Duration, tokio::time::Instant)>,
    /// When the last list ended.
    listed: Option<tokio::time::Instant>,
}

impl Backoff {
    /// A list ended at `now`: a watch starts.
    pub(crate) fn listed(&mut self, now: tokio::time::Instant) {
        self.listed = Some(now);
    }

    /// How long to wait after a failure at `now`.
    pub(crate) fn after_failure(&mut self, now: tokio::time::Instant) -> Duration {
        let wait = match self.last {
            Some((wait, retried)) => {
                let started = self.listed.map_or(retried, |listed| listed.max(retried));
                if now.duration_since(started) < MAX_RETRY {
                    (wait * 2).min(MAX_RETRY)
                } else {
                    FIRST_RETRY
                }
            }
            None => FIRST_RETRY,
        };
        self.last = Some((wait, now + wait));
        wait
    }
}

/// One watched kind and its objects, each parsed on arrival.
struct Kind {
    resource: ApiResource,
    /// By namespace and name.
    objects: BTreeMap<(String, String), Declared>,
    /// A relist in progress (after `Init`): what it has listed so far, which replaces
    /// `objects` when it is done.
    relisting: Option<BTreeMap<(String, String), Declared>>,
    /// Listed at least once (or found not served).
    listed: bool,
    /// Listing or watching it failed, and that was said: quiet retries until it lists again.
    failing: bool,
}

impl Kind {
    fn new(resource: ApiResource) -> Kind {
        Kind {
            resource,
            objects: BTreeMap::new(),
            relisting: None,
            listed: false,
            failing: false,
        }
    }

    /// The watch made progress: a failure said before is over.
    fn recovered(&mut self) {
        if self.failing {
            tracing::info!(kind = %self.resource.kind, "watching the API server again");
            self.failing = false;
        }
    }
}

/// Declared objects from a Kubernetes API server.
pub struct Cluster {
    events: mpsc::Receiver<(usize, WatchItem)>,
    kinds: Vec<Kind>,
    listed: bool,
    /// Changes applied and not yet returned by [`Source::next`] (which may be dropped
    /// while it gathers them).
    pending: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("listed", &self.listed)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts a watcher per kind on the current tokio runtime, across all namespaces.
    pub fn watch(client: kube::Client) -> Cluster {
        let (sender, events) = mpsc::channel(EVENT_QUEUE);
        let resources = resources();
        for (index, resource) in resources.iter().enumerate() {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
                let mut backoff = Backoff::default();
                while let Some(item) = stream.next().await {
                    let failed = item.is_err();
                    if matches!(item, Ok(Event::InitDone)) {
                        backoff.listed(tokio::time::Instant::now());
                    }
                    if sender.send((index, item)).await.is_err() {
                        return;
                    }
                    if failed {
                        // The watcher tries again when next polled.
                        tokio::time::sleep(backoff.after_failure(tokio::time::Instant::now()))
                            .await;
                    }
                }
            });
        }
        Cluster::fed_by(events, resources)
    }

    /// A source applying the events `events` brings, for `resources` (in [`KINDS`] order).
    fn fed_by(events: mpsc::Receiver<(usize, WatchItem)>, resources: Vec<ApiResource>) -> Cluster {
        Cluster {
            events,
            kinds: resources.into_iter().map(Kind::new).collect(),
            listed: false,
            pending: false,
        }
    }

    /// Applies one watch event; says whether what is declared may have changed.
    fn apply(&mut self, index: usize, item: WatchItem) -> bool {
        let kind = &mut self.kinds[index];
        let resource = &kind.resource;
        match item {
            Ok(Event::Init) => {
                kind.relisting = Some(BTreeMap::new());
                false
            }
            Ok(Event::InitApply(object)) => {
                let key = key(&object);
                let parsed = parse(resource, object);
                kind.relisting.get_or_insert_default().insert(key, parsed);
                false
            }
            Ok(Event::InitDone) => {
                let listed = kind.relisting.take().unwrap_or_default();
                let changed = listed != kind.objects;
                kind.objects = listed;
                kind.recovered();
                kind.listed = true;
                changed
            }
            Ok(Event::Apply(object)) => {
                let key = key(&object);
                let parsed = parse(resource, object);
                kind.recovered();
                kind.objects.insert(key, parsed.clone()) != Some(parsed)
            }
            Ok(Event::Delete(object)) => {
                kind.recovered();
                kind.objects.remove(&key(&object)).is_some()
            }
            Err(error) if not_served(&error) && !kind.listed && optional(resource) => {
                tracing::warn!(kind = %resource.kind, api_version = %resource.api_version, "not served by the API server (is its CRD installed?): taken as empty, and asked again with backoff");
                kind.failing = true;
                kind.listed = true;
                kind.relisting = None;
                false
            }
            Err(error) => {
                if !kind.failing && not_served(&error) && !kind.listed {
                    tracing::warn!(kind = %resource.kind, api_version = %resource.api_version, "not served by the API server: Tern's CRDs must be installed (deploy/crds/tern.dev.yaml); nothing is served until this kind is listed");
                } else if !kind.failing {
                    tracing::warn!(kind = %resource.kind, api_version = %resource.api_version, %error, "watching the API server failed; what was last seen stays in use, retrying with backoff");
                }
                kind.failing = true;
                kind.relisting = None;
                false
            }
        }
    }

    /// Everything declared now, kind by kind.
    fn declared(&self) -> Declared {
        let mut declared = Declared::default();
        for kind in &self.kinds {
            for parsed in kind.objects.values() {
                declared.extend(parsed);
            }
        }
        declared
    }
}

/// The watched [`KINDS`] as kube-rs names them.
fn resources() -> Vec<ApiResource> {
    KINDS
        .iter()
        .map(|&(group, version, kind, plural)| {
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
        })
        .collect()
}

/// Whether a kind may be missing from the cluster and taken as empty: Gateway API's, whose
/// CRDs a cluster may not have. Tern's own kinds (policies among them) and the core kinds
/// must be listed, so that an API server answering 404 for a moment (a restart, before its
/// CRD handlers are ready) cannot start the mesh with no policies.
fn optional(resource: &ApiResource) -> bool {
    resource.group == "gateway.networking.k8s.io"
}

/// Whether the API server does not serve the kind at all (its CRD is not installed).
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

/// An object's namespace and name.
fn key(object: &DynamicObject) -> (String, String) {
    let metadata = &object.metadata;
    (
        metadata.namespace.clone().unwrap_or_default(),
        metadata.name.clone().unwrap_or_default(),
    )
}

/// An object as its own [`Declared`], [`trim`]med. Objects in a list come without
/// `apiVersion` and `kind`: the watched resource supplies them.
fn parse(resource: &ApiResource, object: DynamicObject) -> Declared {
    let mut object = trim(resource, object);
    let metadata = &object.metadata;
    let name = metadata.name.as_deref().unwrap_or_default();
    let origin = Origin::api(&resource.kind, metadata.namespace.as_deref(), name);
    let mut declared = Declared::default();
    object.types = Some(TypeMeta {
        api_version: resource.api_version.clone(),
        kind: resource.kind.clone(),
    });
    match serde_yaml::to_value(&object) {
        Ok(value) => parse_value(origin, value, &mut declared),
        Err(error) => declared.refuse(origin, None, String::new(), format!("unreadable: {error}")),
    }
    declared
}

/// An object with only what Tern reads of it: its name, namespace, creation time and labels, Tern's own
/// annotations (`tern.dev/…`), its spec (of a Pod, the service account and the containers'
/// ports), and no status but a Pod's IP. Whatever else the API server sends (`managedFields`,
/// `resourceVersion`, `kubectl`'s last applied configuration, conditions) would cost memory
/// and make every status change look like a change of config.
fn trim(resource: &ApiResource, object: DynamicObject) -> DynamicObject {
    let DynamicObject {
        types,
        metadata,
        mut data,
    } = object;
    let metadata = ObjectMeta {
        name: metadata.name,
        namespace: metadata.namespace,
        // Settles route conflicts (oldest first); it never changes.
        creation_timestamp: metadata.creation_timestamp,
        labels: metadata.labels,
        annotations: metadata.annotations.and_then(|annotations| {
            let tern: BTreeMap<String, String> = annotations
                .into_iter()
                .filter(|(key, _)| key.starts_with(TERN_ANNOTATIONS))
                .collect();
            (!tern.is_empty()).then_some(tern)
        }),
        ..ObjectMeta::default()
    };
    if let Some(fields) = data.as_object_mut() {
        let status = fields.remove("status");
        if resource.kind == "Pod" {
            let spec = fields.remove("spec").unwrap_or_default();
            let containers: Vec<serde_json::Value> = spec["containers"]
                .as_array()
                .map(|containers| {
                    containers
                        .iter()
                        .map(|c| serde_json::json!({"name": c["name"], "ports": c["ports"]}))
                        .collect()
                })
                .unwrap_or_default();
            let mut kept = serde_json::json!({"containers": containers});
            if let Some(account) = spec.get("serviceAccountName") {
                kept["serviceAccountName"] = account.clone();
            }
            fields.insert("spec".into(), kept);
            if let Some(ip) = status.as_ref().and_then(|s| s.get("podIP")) {
                fields.insert("status".into(), serde_json::json!({"podIP": ip}));
            }
        }
    }
    DynamicObject {
        types,
        metadata,
        data,
    }
}

/// The prefix of the annotations Tern reads (a Pod's `tern.dev/inbound-ports`, say).
const TERN_ANNOTATIONS: &str = "tern.dev/";

impl Source for Cluster {
    async fn next(&mut self) -> Declared {
        while !self.pending {
            let Some((index, item)) = self.events.recv().await else {
                // Every watcher ended (the runtime is shutting down): nothing more comes.
                return std::future::pending().await;
            };
            let changed = self.apply(index, item);
            if !self.listed {
                if self.kinds.iter().all(|k| k.listed) {
                    self.listed = true;
                    self.pending = true;
                    tracing::info!("listed every kind from the API server");
                }
            } else if changed {
                self.pending = true;
            }
        }
        // Changes that come together (a Deployment's rollout, `kubectl apply -f dir/`) make
        // one update.
        let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
        loop {
            let quiet = (tokio::time::Instant::now() + QUIET).min(deadline);
            match tokio::time::timeout_at(quiet, self.events.recv()).await {
                Ok(Some((index, item))) => {
                    self.apply(index, item);
                }
                Ok(None) | Err(_) => break,
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        self.pending = false;
        self.declared()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use kube::api::DynamicObject;
    use kube::runtime::watcher::{self, Event};
    use serde_json::json;
    use tokio::sync::mpsc;

    use super::super::Object;
    use super::{Cluster, KINDS, Source as _, WatchItem, resources};

    const SERVICES: usize = 1;
    const PODS: usize = 2;
    const GRPC_ROUTES: usize = 9;

    fn service(name: &str) -> DynamicObject {
        DynamicObject::new(name, &resources()[SERVICES])
            .within("shop")
            .data(json!({"spec": {"ports": [{"name": "http", "port": 80}]}}))
    }

    /// A cluster and the sender of the events it applies.
    fn fed() -> (mpsc::Sender<(usize, WatchItem)>, Cluster) {
        let (events, receiver) = mpsc::channel(64);
        (events, Cluster::fed_by(receiver, resources()))
    }

    fn not_found() -> WatchItem {
        let status = kube::core::Status::failure("the server could not find it", "NotFound")
            .with_code(404)
            .boxed();
        Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
    }

    fn names(cluster: &Cluster) -> Vec<String> {
        let declared = cluster.declared();
        assert!(declared.problems.is_empty(), "{:?}", declared.problems);
        declared
            .objects
            .iter()
            .map(|(_, object)| object.key().to_string())
            .collect()
    }

    fn relist(cluster: &mut Cluster, kind: usize, objects: &[&str]) -> bool {
        cluster.apply(kind, Ok(Event::Init));
        for name in objects {
            cluster.apply(kind, Ok(Event::InitApply(service(name))));
        }
        cluster.apply(kind, Ok(Event::InitDone))
    }

    #[test]
    fn a_relist_replaces_what_was_listed_and_failures_keep_it() {
        let (_events, mut cluster) = fed();
        assert!(relist(&mut cluster, SERVICES, &["a", "b"]));
        assert_eq!(names(&cluster), ["Service shop/a", "Service shop/b"]);
        // A relist (after 410 Gone, say) that no longer holds `a`: it goes.
        relist(&mut cluster, SERVICES, &["b"]);
        assert_eq!(names(&cluster), ["Service shop/b"]);
        // A relist that fails half way changes nothing.
        cluster.apply(SERVICES, Ok(Event::Init));
        cluster.apply(SERVICES, Ok(Event::InitApply(service("c"))));
        assert!(!cluster.apply(SERVICES, not_found()));
        assert_eq!(names(&cluster), ["Service shop/b"]);
        // Nor does a failure after that, a 404 included (a version no longer served).
        assert!(!cluster.apply(SERVICES, not_found()));
        assert_eq!(names(&cluster), ["Service shop/b"]);
        assert!(cluster.apply(SERVICES, Ok(Event::Apply(service("c")))));
        assert!(cluster.apply(SERVICES, Ok(Event::Delete(service("b")))));
        assert!(!cluster.apply(SERVICES, Ok(Event::Delete(service("b")))));
        assert_eq!(names(&cluster), ["Service shop/c"]);
    }

    /// Pod `shop/p` at resourceVersion `version` with `labels` and `status`, its metadata as
    /// the API server writes it.
    fn pod(version: u32, labels: serde_json::Value, status: serde_json::Value) -> DynamicObject {
        let mut pod: DynamicObject = serde_json::from_value(json!({
            "metadata": {
                "name": "p", "namespace": "shop", "labels": labels,
                "uid": "6f1c", "resourceVersion": version.to_string(),
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": status.to_string(),
                    "tern.dev/inbound-ports": "8080=15080",
                },
                "managedFields": [{"manager": "kubelet", "operation": "Update", "time": "2026-12-07T03:00:00Z"}],
            },
            "spec": {
                "serviceAccountName": "shop", "nodeName": "node-1",
                "containers": [{"name": "app", "image": "shop:1", "ports": [{"name": "http", "containerPort": 8080}]}],
            },
            "status": status,
        }))
        .unwrap();
        pod.types = None;
        pod
    }

    #[test]
    fn only_a_change_of_what_tern_reads_makes_an_update() {
        let (_events, mut cluster) = fed();
        let ready = |ready: &str| json!({"podIP": "10.0.0.2", "phase": "Running", "conditions": [{"type": "Ready", "status": ready}]});
        let labels = json!({"app": "shop"});
        cluster.apply(PODS, Ok(Event::Init));
        cluster.apply(
            PODS,
            Ok(Event::InitApply(pod(1, labels.clone(), ready("False")))),
        );
        assert!(cluster.apply(PODS, Ok(Event::InitDone)));

        // The kubelet's status churn, with a new resourceVersion: nothing Tern reads.
        let churn = pod(2, labels.clone(), ready("True"));
        assert!(!cluster.apply(PODS, Ok(Event::Apply(churn.clone()))));
        // Nor does a relist (after 410 Gone, say) that finds the same.
        cluster.apply(PODS, Ok(Event::Init));
        cluster.apply(PODS, Ok(Event::InitApply(churn)));
        assert!(!cluster.apply(PODS, Ok(Event::InitDone)));

        // A label, the IP and Tern's annotations are read: each change alone is an update.
        let labels = json!({"app": "shop", "version": "2"});
        assert!(cluster.apply(
            PODS,
            Ok(Event::Apply(pod(3, labels.clone(), ready("True"))))
        ));
        let moved = json!({"podIP": "10.0.0.3", "conditions": []});
        assert!(cluster.apply(
            PODS,
            Ok(Event::Apply(pod(4, labels.clone(), moved.clone())))
        ));
        let mut remapped = pod(5, labels, moved);
        remapped
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("tern.dev/inbound-ports".into(), "8080=15081".into());
        assert!(cluster.apply(PODS, Ok(Event::Apply(remapped))));

        // What is kept of the Pod.
        let declared = cluster.declared();
        let [(_, Object::Pod(kept))] = declared.objects.as_slice() else {
            panic!("{:?}", declared.objects);
        };
        let kept = serde_json::to_value(kept).unwrap();
        assert_eq!(
            kept,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "shop", "labels": {"app": "shop", "version": "2"}, "annotations": {"tern.dev/inbound-ports": "8080=15081"}},
                "spec": {"serviceAccountName": "shop", "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"podIP": "10.0.0.3"},
            })
        );
    }

    #[test]
    fn failures_in_a_row_wait_longer_and_a_quiet_spell_starts_again() {
        use std::time::Duration;
        let mut backoff = super::Backoff::default();
        let mut now = tokio::time::Instant::now();
        let mut waits = Vec::new();
        // A list that works and a watch that fails at once (410 Gone), again and again.
        for _ in 0..8 {
            let wait = backoff.after_failure(now);
            waits.push(wait.as_millis());
            now += wait + Duration::from_millis(50);
        }
        assert_eq!(waits, [800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
        // A watch that lasted 40 s after its retry (a load balancer's cut): the first wait.
        now += Duration::from_secs(40);
        assert_eq!(backoff.after_failure(now), super::FIRST_RETRY);
        // One that failed 20 s after its retry: the next wait up.
        now += Duration::from_millis(800) + Duration::from_secs(20);
        assert_eq!(backoff.after_failure(now), 2 * super::FIRST_RETRY);
        // A relist that took 45 s, and a watch that failed at once after it: up again.
        now += Duration::from_millis(1600) + Duration::from_secs(45);
        backoff.listed(now);
        now += Duration::from_millis(100);
        assert_eq!(backoff.after_failure(now), 4 * super::FIRST_RETRY);
    }

    #[test]
    fn requests_wait_for_an_answer_for_at_most_the_read_timeout() {
        let api_server = || kube::Config::new("https://10.96.0.1".parse().unwrap());
        let config = super::with_read_timeout(api_server());
        assert_eq!(config.read_timeout, Some(super::READ_TIMEOUT));
        assert!(config.reset_reader_on_write);
        // A timeout of the user's own stays.
        let mut own = api_server();
        own.read_timeout = Some(std::time::Duration::from_secs(20));
        let config = super::with_read_timeout(own);
        assert_eq!(
            config.read_timeout,
            Some(std::time::Duration::from_secs(20))
        );
        assert!(!config.reset_reader_on_write);
    }

    #[tokio::test]
    async fn the_first_update_waits_until_every_kind_is_listed_or_not_served() {
        let (events, mut cluster) = fed();
        for kind in 0..KINDS.len() {
            if kind == GRPC_ROUTES {
                continue;
            }
            events.send((kind, Ok(Event::Init))).await.unwrap();
            if kind == SERVICES {
                let item = Ok(Event::InitApply(service("a")));
                events.send((kind, item)).await.unwrap();
            }
            events.send((kind, Ok(Event::InitDone))).await.unwrap();
        }
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), cluster.next());
        assert!(early.await.is_err(), "resolved before GRPCRoute was listed");
        // GRPCRoute's CRD is not installed: listed, empty. The update is gathered even
        // by a call given up while it waits for more changes to come with it.
        events.send((GRPC_ROUTES, not_found())).await.unwrap();
        let given_up = tokio::time::timeout(std::time::Duration::from_millis(10), cluster.next());
        assert!(given_up.await.is_err());
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), cluster.next());
        assert_eq!(first.await.unwrap().objects.len(), 1);
    }

    #[tokio::test]
    async fn a_tern_kind_not_served_keeps_the_first_update_waiting() {
        let (events, mut cluster) = fed();
        let policies = KINDS
            .iter()
            .position(|k| k.2 == "AuthorizationPolicy")
            .unwrap();
        for kind in 0..KINDS.len() {
            if kind == policies || kind == GRPC_ROUTES {
                events.send((kind, not_found())).await.unwrap();
                continue;
            }
            events.send((kind, Ok(Event::Init))).await.unwrap();
            events.send((kind, Ok(Event::InitDone))).await.unwrap();
        }
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), cluster.next());
        assert!(early.await.is_err(), "resolved without AuthorizationPolicy");
        // Listed once its CRD is served.
        events.send((policies, Ok(Event::Init))).await.unwrap();
        events.send((policies, Ok(Event::InitDone))).await.unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), cluster.next());
        assert!(first.await.is_ok());
    }

    fn documents(path: &str) -> Vec<serde_yaml::Value> {
        let path = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect()
    }

    fn strings(value: &serde_yaml::Value) -> Vec<&str> {
        value
            .as_sequence()
            .map(|s| s.iter().filter_map(serde_yaml::Value::as_str).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_deployed_role_grants_what_is_watched_and_tern_crds_name_it_alike() {
        let manifests = documents("deploy/kubernetes/tern-control.yaml");
        let role = manifests
            .iter()
            .find(|d| d["kind"] == "ClusterRole")
            .unwrap();
        // Whether a rule lets `verb` on `plural`: of any name (`named` none), or of that one.
        let grants_named = |group: &str, plural: &str, verb: &str, named: Option<&str>| {
            role["rules"].as_sequence().unwrap().iter().any(|rule| {
                let names = strings(&rule["resourceNames"]);
                strings(&rule["apiGroups"]).contains(&group)
                    && strings(&rule["resources"]).contains(&plural)
                    && strings(&rule["verbs"]).contains(&verb)
                    && (names.is_empty() || named.is_some_and(|n| names.contains(&n)))
            })
        };
        let grants =
            |group: &str, plural: &str, verb: &str| grants_named(group, plural, verb, None);
        for (group, _, kind, plural) in KINDS {
            for verb in ["list", "watch"] {
                assert!(
                    grants(group, plural, verb),
                    "{verb} {kind} ({group}/{plural})"
                );
            }
        }
        assert!(grants("authentication.k8s.io", "tokenreviews", "create"));
        // The sidecar injector's reads and writes (`crate::webhook::keep_cluster_current`),
        // the writes to its own objects only.
        for verb in ["list", "watch"] {
            assert!(grants("", "namespaces", verb), "{verb} namespaces");
        }
        for verb in ["create", "patch"] {
            let config_map = Some(crate::inject::CONFIG_MAP);
            assert!(grants_named("", "configmaps", verb, config_map));
            assert!(!grants("", "configmaps", verb), "{verb} any ConfigMap");
        }
        let group = "admissionregistration.k8s.io";
        for verb in ["list", "watch", "patch"] {
            let configuration = Some(crate::webhook::CONFIGURATION);
            let plural = "mutatingwebhookconfigurations";
            assert!(grants_named(group, plural, verb, configuration), "{verb}");
            assert!(!grants(group, plural, verb), "{verb} any configuration");
        }

        let crds = documents("deploy/crds/tern.dev.yaml");
        for (group, version, kind, plural) in KINDS.iter().filter(|k| k.0 == "tern.dev") {
            let crd = crds
                .iter()
                .find(|c| c["spec"]["names"]["kind"] == *kind)
                .unwrap_or_else(|| panic!("no CRD for {kind}"));
            assert_eq!(crd["spec"]["group"], *group);
            assert_eq!(crd["spec"]["names"]["plural"], *plural);
            let served: Vec<&str> = crd["spec"]["versions"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|v| v["name"].as_str())
                .collect();
            assert!(served.contains(version), "{kind}: {served:?}");
        }
    }
}
