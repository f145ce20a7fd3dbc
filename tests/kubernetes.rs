//! `tern-control` reading the Kubernetes API server (`--kubernetes`), end to end against a
//! fake API server ([`tests::apiserver`]): it lists and watches Services, EndpointSlices,
//! Pods and HTTPRoutes through kube-rs, and proxies it configures carry traffic over mTLS by
//! what the API server holds, and follow its changes. The fake does not serve GRPCRoute or
//! Tern's own kinds, as a cluster without those CRDs does not. Workloads prove who they are
//! with ServiceAccount tokens, which the API server reviews (`TokenReview`), or with
//! bootstrap tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use controlplane::ConfigSource;
use serde_json::Value;
use tests::apiserver::{API_SERVER_AUDIENCE, ApiServer, write_kubeconfig};
use tests::ca::{TestControlPlane, discovery_yaml};
use tests::client;
use tests::manifests::{self, free_port};
use tests::upstream::Http;
use tests::{
    BackendChoice, Proxy, admin_get, admin_status, eventually, metric, start_proxy, wait_ready,
};

const OUTBOUND: &str = "outbound:reviews.default:80";
const ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
const CERTIFY_OK: &str = "tern_identity_certify_total{result=\"ok\"}";
const CERTIFY_ERROR: &str = "tern_identity_certify_total{result=\"error\"}";
/// The ServiceAccount token of `reviews`, minted for tern-control.
const REVIEWS_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.reviews-for-tern-control.sig";

/// What the fake API server serves, as (apiVersion, plural): everything Tern reads but
/// GRPCRoute (Gateway API's CRDs may be missing in part), then what the sidecar injector
/// reads and writes.
const SERVED: [(&str, &str); 12] = [
    ("v1", "services"),
    ("v1", "pods"),
    ("discovery.k8s.io/v1", "endpointslices"),
    ("gateway.networking.k8s.io/v1", "httproutes"),
    ("tern.dev/v1alpha1", "meshes"),
    ("tern.dev/v1alpha1", "mtlspolicies"),
    ("tern.dev/v1alpha1", "backendpolicies"),
    ("tern.dev/v1alpha1", "authorizationpolicies"),
    ("tern.dev/v1alpha1", "ratelimitpolicies"),
    ("v1", "namespaces"),
    ("v1", "configmaps"),
    (
        "admissionregistration.k8s.io/v1",
        "mutatingwebhookconfigurations",
    ),
];
const WEBHOOKS: &str = "admissionregistration.k8s.io/v1";

fn object(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).unwrap()
}

fn kubernetes(url: &str, list_timeout: Duration) -> ConfigSource {
    ConfigSource::Kubernetes {
        config: Some(Box::new(kube::Config::new(url.parse().unwrap()))),
        list_timeout,
    }
}

/// `reviews` routes to `reviews-v1` (a Pod with a sidecar) or `reviews-v2` (no sidecar),
/// all of it held by the API server.
struct Cluster {
    api: ApiServer,
    /// The Pod `reviews-v1-0`, as applied.
    pod: Value,
    control: TestControlPlane,
    _v1: Http,
    _v2: Http,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::certifying_for(Duration::from_secs(3600))
    }

    /// A cluster whose control plane's certificates last `lifetime`.
    fn certifying_for(lifetime: Duration) -> Cluster {
        let api = ApiServer::start(&SERVED);
        let (v1, v2) = (Http::start("v1"), Http::start("v2"));
        let sidecar_port = free_port();
        for name in ["reviews", "reviews-v1"] {
            api.apply(
                "services",
                object(&manifests::http_service(name, v1.addr.port())),
            );
        }
        api.apply(
            "services",
            object(&manifests::http_service("reviews-v2", v2.addr.port())),
        );
        for name in ["reviews", "reviews-v1"] {
            let slice = manifests::endpoints(name, "http", &[(v1.addr, Some("reviews-v1-0"))]);
            api.apply("endpointslices", object(&slice));
        }
        let slice = manifests::endpoints("reviews-v2", "http", &[(v2.addr, None)]);
        api.apply("endpointslices", object(&slice));
        let pod = manifests::pod(
            "reviews-v1-0",
            "reviews-v1",
            "reviews",
            "127.0.0.1",
            &[(v1.addr.port(), sidecar_port)],
        );
        let pod = object(&pod);
        api.apply("pods", pod.clone());
        api.apply("httproutes", route_to("reviews-v1"));
        api.grant_token(REVIEWS_TOKEN, "default", "reviews", "tern-control");
        let control =
            TestControlPlane::with_source(lifetime, kubernetes(&api.url, Duration::from_secs(20)));
        Cluster {
            api,
            pod,
            control,
            _v1: v1,
            _v2: v2,
        }
    }

    /// A ready proxy for Pod `pod` running as `account` (proven by a bootstrap token), with
    /// an outbound listener for `reviews` if `client`.
    fn proxy(&self, pod: &str, account: &str, client: bool) -> Proxy {
        let token = self.control.write_token(account, account);
        let proxy = self.proxy_with(pod, account, client, &token);
        wait_ready(&proxy, Duration::from_secs(10));
        proxy
    }

    /// The sidecar of `reviews-v1-0`, proven by its ServiceAccount token, ready.
    fn reviews_sidecar(&self) -> Proxy {
        let token = self.token_file("reviews-sa.token", REVIEWS_TOKEN);
        let sidecar = self.proxy_with("reviews-v1-0", "reviews", false, &token);
        wait_ready(&sidecar, Duration::from_secs(10));
        sidecar
    }

    /// A proxy for Pod `pod` that asks to be `account`, with the token in `token`.
    fn proxy_with(&self, pod: &str, account: &str, client: bool, token: &Path) -> Proxy {
        let identity = self.control.identity_yaml_with(account, token);
        let yaml = discovery_yaml(&identity, pod, client.then_some("reviews.default"));
        start_proxy(&yaml, BackendChoice::Epoll)
    }

    fn token_file(&self, name: &str, token: &str) -> PathBuf {
        let path = self.control.dir.0.join(name);
        std::fs::write(&path, token).unwrap();
        path
    }

    fn problems(&self) -> Vec<String> {
        self.control.running().status().problems
    }
}

fn route_to(backend: &str) -> Value {
    object(&manifests::route("reviews", "reviews", &[(backend, 1)]))
}

/// The status and body of `GET /` through the client proxy's outbound listener.
fn get(proxy: &Proxy) -> String {
    let address = proxy.listener_addr(OUTBOUND).expect("an outbound listener");
    let response = client::request(
        address,
        "GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
    );
    format!("{} {}", response.status, response.text())
}

#[test]
fn proxies_carry_traffic_by_what_the_api_server_holds_and_follow_its_changes() {
    let cluster = Cluster::start();
    let catalog = cluster.control.running().catalog();
    assert_eq!(
        catalog.len(),
        8,
        "every object listed: {:?}",
        catalog.objects().collect::<Vec<_>>()
    );
    let origins: Vec<String> = catalog.objects().map(|(_, o)| o.to_string()).collect();
    assert!(
        origins.contains(&"kubernetes/HTTPRoute/default/reviews".to_owned()),
        "{origins:?}"
    );
    assert!(cluster.problems().is_empty(), "{:?}", cluster.problems());
    // The kinds the fake does not serve (no CRD) were asked for, and taken as empty.
    assert!(
        cluster
            .api
            .requests("/apis/gateway.networking.k8s.io/v1/grpcroutes", "")
            >= 1
    );
    assert!(cluster.api.requests("/apis/tern.dev/v1alpha1/meshes", "") >= 1);

    let _sidecar = cluster.reviews_sidecar();
    let client = cluster.proxy("a-0", "a", true);
    assert_eq!(get(&client), "200 v1 /");

    // A change the watch brings: the route moves to v2.
    cluster.api.apply("httproutes", route_to("reviews-v2"));
    eventually(
        Duration::from_secs(5),
        "the route change reaches the proxy",
        || get(&client) == "200 v2 /",
    );

    // The API server ends its watches (its timeout, a restart): the source watches again
    // from the last version it saw, and keeps following.
    let watches = cluster.api.requests(ROUTES, "watch=");
    cluster.api.end_watches();
    eventually(
        Duration::from_secs(10),
        "the route watch is opened again",
        || cluster.api.requests(ROUTES, "watch=") > watches,
    );
    cluster.api.apply("httproutes", route_to("reviews-v1"));
    eventually(
        Duration::from_secs(5),
        "the next change reaches the proxy",
        || get(&client) == "200 v1 /",
    );

    // The route is deleted: the Service's own endpoints (v1 only, the Pod with a sidecar)
    // serve, and the catalog no longer holds it.
    cluster.api.apply("httproutes", route_to("reviews-v2"));
    eventually(Duration::from_secs(5), "v2 again", || {
        get(&client) == "200 v2 /"
    });
    cluster.api.delete(
        "gateway.networking.k8s.io/v1",
        "httproutes",
        "default",
        "reviews",
    );
    eventually(
        Duration::from_secs(5),
        "the deletion reaches the proxy",
        || get(&client) == "200 v1 /",
    );
    assert_eq!(cluster.control.running().catalog().len(), 7);
}

#[test]
fn a_deletion_missed_while_the_history_was_compacted_is_learnt_by_listing_again() {
    let cluster = Cluster::start();
    let catalog = || cluster.control.running().catalog();
    assert_eq!(catalog().len(), 8);
    let lists = cluster.api.requests(ROUTES, "") - cluster.api.requests(ROUTES, "watch=");
    cluster.api.delete_unseen(
        "gateway.networking.k8s.io/v1",
        "httproutes",
        "default",
        "reviews",
    );
    eventually(Duration::from_secs(10), "the deletion learnt", || {
        catalog().len() == 7
    });
    let relists = cluster.api.requests(ROUTES, "") - cluster.api.requests(ROUTES, "watch=");
    assert!(relists > lists, "learnt by a list: {lists} then {relists}");
    assert!(cluster.problems().is_empty(), "{:?}", cluster.problems());
}

#[test]
fn status_churn_changes_no_config_and_a_label_does() {
    let cluster = Cluster::start();
    let generation = || cluster.control.running().catalog().generation;
    let first = generation();
    let pod = |app: &str, ready: &str| {
        let mut pod = cluster.pod.clone();
        pod["metadata"]["labels"]["app"] = Value::from(app);
        pod["metadata"]["managedFields"] =
            serde_json::json!([{"manager": "kubelet", "operation": "Update"}]);
        pod["status"]["conditions"] = serde_json::json!([{"type": "Ready", "status": ready}]);
        pod
    };
    // The kubelet's status updates, each a new resourceVersion, spaced so that each would be
    // an update of its own.
    for ready in ["False", "True", "False"] {
        cluster.api.apply("pods", pod("reviews-v1", ready));
        std::thread::sleep(Duration::from_millis(700));
    }
    // Then a label, which Tern reads, on the same watch and so applied after them.
    cluster.api.apply("pods", pod("reviews-v1-canary", "False"));
    eventually(
        Duration::from_secs(5),
        "the label makes a new config",
        || generation() > first,
    );
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(generation(), first + 1, "only the label changed the config");
}

#[test]
fn an_object_that_does_not_parse_is_refused_with_its_origin_and_its_previous_version_kept() {
    let cluster = Cluster::start();
    let _sidecar = cluster.reviews_sidecar();
    let client = cluster.proxy("a-0", "a", true);
    assert_eq!(get(&client), "200 v1 /");

    let mut broken = route_to("reviews-v2");
    broken["spec"]["rules"][0]["backendRefs"][0]["weight"] = Value::from("heavy");
    cluster.api.apply("httproutes", broken);
    eventually(Duration::from_secs(5), "the refusal is reported", || {
        !cluster.problems().is_empty()
    });
    let problems = cluster.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("kubernetes/HTTPRoute/default/reviews: HTTPRoute reviews: spec.rules[0].backendRefs[0].weight"),
        "{problems:?}"
    );
    assert!(
        problems[0].ends_with("(its previous version stays in use)"),
        "{problems:?}"
    );
    assert_eq!(
        get(&client),
        "200 v1 /",
        "the previous version still routes"
    );

    // Mended, it is taken.
    cluster.api.apply("httproutes", route_to("reviews-v2"));
    eventually(Duration::from_secs(5), "the mended route routes", || {
        get(&client) == "200 v2 /"
    });
    assert!(cluster.problems().is_empty(), "{:?}", cluster.problems());
}

#[test]
fn tern_control_fails_to_start_with_a_clear_error_when_the_api_server_cannot_be_reached() {
    let mut control = TestControlPlane::start(Duration::from_secs(3600));
    let nothing = format!("http://127.0.0.1:{}", free_port());
    control.source = kubernetes(&nothing, Duration::from_secs(2));
    let error = control.try_restart().expect_err("nothing to list from");
    assert!(
        error
            .to_string()
            .contains("the API server did not list every kind Tern reads within 2s"),
        "{error:#}"
    );
}

#[test]
fn a_serviceaccount_token_proves_its_own_account_for_tern_control_and_nothing_else() {
    let cluster = Cluster::start();
    // `a`'s token, and `reviews`' token minted for another audience: neither proves
    // `reviews`. The proxy keeps asking (it reads its token file at every attempt).
    cluster
        .api
        .grant_token("a-token", "default", "a", "tern-control");
    cluster.api.grant_token(
        "reviews-for-kubectl",
        "default",
        "reviews",
        API_SERVER_AUDIENCE,
    );
    let token = cluster.token_file("sidecar.token", "a-token");
    let sidecar = cluster.proxy_with("reviews-v1-0", "reviews", false, &token);
    // Each token is reviewed (the proxy reads its file at every attempt) and refused.
    let refused = |text: &str| {
        std::fs::write(&token, text).unwrap();
        eventually(Duration::from_secs(15), "the token reviewed", || {
            cluster.api.reviews_of(text) >= 1
        });
    };
    refused("a-token");
    refused("reviews-for-kubectl");
    refused("not a token at all");
    // Its own token, but from an authenticator that ignores audiences: the API server did
    // not say it is for tern-control. Attempts are one after another, so a refusal counted
    // after the proxy switched to this token is this token's.
    cluster.api.omit_audiences(true);
    refused(REVIEWS_TOKEN);
    let errors = || metric(&admin_get(&sidecar, "/metrics"), CERTIFY_ERROR);
    let switched = errors();
    eventually(Duration::from_secs(15), "this token refused", || {
        errors() > switched
    });
    assert_eq!(admin_status(&sidecar, "/ready").0, 503);
    assert_eq!(metric(&admin_get(&sidecar, "/metrics"), CERTIFY_OK), 0.0);

    // Its own token, reviewed for tern-control: certified as `reviews`.
    cluster.api.omit_audiences(false);
    wait_ready(&sidecar, Duration::from_secs(20));
    let dump: Value = serde_json::from_str(&admin_get(&sidecar, "/config_dump")).unwrap();
    assert_eq!(
        dump["identity"]["spiffe_id"],
        TestControlPlane::spiffe_id("reviews").as_str()
    );
}

#[test]
fn renewals_ask_the_api_server_again_and_outlive_only_its_outages() {
    // Certificates of 6 s: the sidecar renews every 3–4 s.
    let cluster = Cluster::certifying_for(Duration::from_secs(6));
    let sidecar = cluster.reviews_sidecar();
    let metrics = || admin_get(&sidecar, "/metrics");
    let renewed_after = |count: f64, why: &str| {
        eventually(Duration::from_secs(15), why, || {
            metric(&metrics(), CERTIFY_OK) > count
        });
    };
    // A renewal proves itself with the certificate and has its token reviewed again.
    renewed_after(1.0, "a renewal");
    assert!(cluster.api.reviews_of(REVIEWS_TOKEN) >= 2);

    // The API server cannot review tokens: the certificate alone proves the renewal.
    cluster.api.reviews_unavailable(true);
    let reviews = cluster.api.reviews_of(REVIEWS_TOKEN);
    let renewed = metric(&metrics(), CERTIFY_OK);
    renewed_after(renewed, "a renewal while the API server is down");
    assert!(
        cluster.api.reviews_of(REVIEWS_TOKEN) > reviews,
        "it was asked"
    );

    // A certificate the token earned renews only with the token beside it (its key in
    // other hands, without the token, renews nothing).
    cluster.api.reviews_unavailable(false);
    let token = cluster.control.dir.0.join("reviews-sa.token");
    std::fs::remove_file(&token).unwrap();
    let errors = metric(&metrics(), CERTIFY_ERROR);
    eventually(
        Duration::from_secs(15),
        "a renewal without the token refused",
        || metric(&metrics(), CERTIFY_ERROR) > errors,
    );
    std::fs::write(&token, REVIEWS_TOKEN).unwrap();
    renewed_after(
        metric(&metrics(), CERTIFY_OK),
        "a renewal with the token back",
    );

    // The ServiceAccount is deleted: the API server no longer vouches for its token, and
    // the certificate it was issued no longer renews.
    cluster.api.revoke_token(REVIEWS_TOKEN);
    let errors = metric(&metrics(), CERTIFY_ERROR);
    eventually(Duration::from_secs(15), "a renewal refused", || {
        metric(&metrics(), CERTIFY_ERROR) > errors
    });
    let renewed = metric(&metrics(), CERTIFY_OK);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(metric(&metrics(), CERTIFY_OK), renewed, "no renewal since");
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tern-control serve --kubernetes` finding the API server at `url` through `KUBECONFIG`,
/// and its log lines.
fn serve_kubernetes(
    dir: &Path,
    url: &str,
    admin: &str,
) -> (KillOnDrop, impl Iterator<Item = String>) {
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, url);
    let mut child = KillOnDrop(
        std::process::Command::new(tests::binary("tern-control"))
            .args([
                "serve",
                "--kubernetes",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                admin,
            ])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("KUBECONFIG", &kubeconfig)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = std::io::BufReader::new(child.0.stderr.take().unwrap());
    let lines = std::io::BufRead::lines(stderr).map_while(Result::ok);
    (child, lines)
}

#[test]
fn the_binary_finds_the_api_server_through_kubeconfig_and_ternctl_reports_from_it() {
    let api = ApiServer::start(&SERVED);
    api.apply("services", object(&manifests::http_service("cart", 8080)));
    let mut broken = route_to("cart");
    broken["metadata"]["name"] = Value::from("cart");
    broken["spec"]["rules"][0]["backendRefs"][0]["name"] = Value::from("nowhere");
    api.apply("httproutes", broken);
    let dir = tests::pki::TempDir::new("kubeconfig");
    let admin = format!("127.0.0.1:{}", free_port());
    let (_child, mut lines) = serve_kubernetes(&dir.0, &api.url, &admin);
    assert!(
        lines.any(|line| line.contains("tern-control serving")),
        "never served"
    );
    let status = std::process::Command::new(tests::binary("ternctl"))
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{status:?}");
    assert!(
        text.contains("config generation 1: 1 objects in use, 1 refused"),
        "{text}"
    );
    assert!(
        text.contains("kubernetes/HTTPRoute/default/cart: HTTPRoute default/cart"),
        "{text}"
    );
}

#[test]
fn sigterm_stops_tern_control_while_it_waits_for_the_api_server() {
    let dir = tests::pki::TempDir::new("list-wait");
    // Nothing answers there: start-up waits to list, up to a minute.
    let nothing = format!("http://127.0.0.1:{}", free_port());
    let (mut child, mut lines) = serve_kubernetes(&dir.0, &nothing, "127.0.0.1:0");
    assert!(
        lines.any(|line| line.contains("watching the API server failed")),
        "never tried the API server"
    );
    let asked = std::time::Instant::now();
    let pid = rustix::process::Pid::from_raw(child.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "it stopped only when start-up gave up"
    );
}

#[test]
fn a_kind_the_api_server_does_not_serve_is_asked_for_again_less_and_less_often() {
    let api = ApiServer::start(&SERVED);
    let started = std::time::Instant::now();
    let _control = TestControlPlane::with_source(
        Duration::from_secs(3600),
        kubernetes(&api.url, Duration::from_secs(20)),
    );
    let routes = "/apis/gateway.networking.k8s.io/v1/grpcroutes";
    eventually(Duration::from_secs(10), "GRPCRoute asked for again", || {
        api.requests(routes, "") >= 3
    });
    std::thread::sleep(Duration::from_secs(7).saturating_sub(started.elapsed()));
    // Retries 0.8 s, 1.6 s, 3.2 s apart: at 0, 0.8, 2.4 and 5.6 s. A fixed 0.8 s would
    // have asked eight times or more by now.
    let asked = api.requests(routes, "");
    assert!((3..=5).contains(&asked), "asked {asked} times in 7 s");
}

/// Tern's own kinds must be listed: an API server that answers 404 for AuthorizationPolicy
/// (its CRD not installed, or not ready yet after a restart) does not get a mesh started
/// without its policies; tern-control says what is missing and does not start.
#[test]
fn tern_control_does_not_start_without_its_own_kinds() {
    let api = ApiServer::start(&SERVED[..7]);
    let mut control = TestControlPlane::start(Duration::from_secs(3600));
    control.source = kubernetes(&api.url, Duration::from_secs(3));
    let error = control
        .try_restart()
        .expect_err("AuthorizationPolicy is not served");
    assert!(
        error
            .to_string()
            .contains("the API server did not list every kind Tern reads within 3s"),
        "{error:#}"
    );
    assert!(api.requests("/apis/tern.dev/v1alpha1/authorizationpolicies", "") >= 2);
}

/// The application `web-0` runs: a readiness probe the injector moves to the sidecar.
fn web_pod(app: &Http) -> Value {
    object(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{ name: web-0, namespace: default, labels: {{ app: web }} }}\nspec: {{ serviceAccountName: web, containers: [{{ name: web, image: web:1, ports: [{{ name: http, containerPort: {} }}], readinessProbe: {{ httpGet: {{ path: /ready, port: http }} }} }}] }}\n",
        app.addr.port()
    ))
}

#[test]
fn a_sidecar_started_as_ternctl_inject_writes_it_is_certified_configured_and_ready() {
    let cluster = Cluster::start();
    let root = cluster.control.dir.0.join("state/ca.crt");
    let app = Http::start("web");
    let pod = serde_yaml::to_string(&web_pod(&app)).unwrap();
    let mut inject = std::process::Command::new(tests::binary("ternctl"))
        .args([
            "inject",
            "--trust-domain",
            tests::ca::TRUST_DOMAIN,
            "--control",
        ])
        .arg(cluster.control.address.to_string())
        .arg("--root")
        .arg(&root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut inject.stdin.take().unwrap(), pod.as_bytes()).unwrap();
    let output = inject.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    // Documents start at `---` lines (a block scalar's lines are indented).
    let text = format!("\n{}", std::str::from_utf8(&output.stdout).unwrap());
    let documents: Vec<Value> = text
        .split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    assert_eq!(documents.len(), 2);
    run_injected(&cluster, &app, (documents[0].clone(), false), &documents[1]);
}

fn namespace(name: &str, labels: &str) -> Value {
    object(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {name}, labels: {labels} }}\n"
    ))
}

/// `deploy/kubernetes/`'s webhook configuration, as `kubectl apply` leaves it: no
/// `caBundle` yet.
fn webhook_configuration() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/tern-control.yaml"
    ))
    .unwrap();
    let configuration = text
        .split("\n---\n")
        .map(|d| serde_yaml::from_str::<Value>(d).unwrap())
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .expect("deploy/kubernetes/tern-control.yaml configures the webhook");
    assert!(configuration["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    configuration
}

/// The `caBundle` of the webhook configuration's first webhook, decoded.
fn ca_bundle(api: &ApiServer) -> Option<String> {
    let configuration = api.get(
        WEBHOOKS,
        "mutatingwebhookconfigurations",
        "",
        "tern-sidecar-injector",
    )?;
    let bundle = configuration["webhooks"][0]["clientConfig"]["caBundle"].as_str()?;
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, bundle).ok()?;
    String::from_utf8(bytes).ok()
}

/// POSTs `body` to the webhook at `address` as the API server does: over TLS, trusting only
/// `bundle` (PEM) for the Service's name. The answer's status and body.
fn post_review(address: std::net::SocketAddr, bundle: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    use std::io::{Read as _, Write as _};
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The test control plane's certificate is for `tern-control` (in a cluster, also
    // `tern-control.tern-system.svc`, the name the API server checks).
    let connection =
        rustls::ClientConnection::new(config.into(), "tern-control".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(address).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    write!(
        stream,
        "POST /inject?timeout=10s HTTP/1.1\r\nHost: tern-control.tern-system.svc:443\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => panic!("reading the webhook's answer: {e}"),
    }
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(length) = parsed.parse(&response).unwrap() else {
        panic!("a partial answer");
    };
    (parsed.code.unwrap(), response[length..].to_vec())
}

fn admission_review(pod: &Value) -> Vec<u8> {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3a1f0c6e-5c1b-4d0e-9a57-d1a2b6f0e001",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "default",
            "operation": "CREATE",
            "object": pod,
            "dryRun": false,
        },
    })
    .to_string()
    .into_bytes()
}

#[test]
fn the_webhook_injects_pods_with_the_config_map_and_ca_bundle_tern_control_keeps() {
    let mut cluster = Cluster::start();
    let api = &cluster.api;
    api.apply(
        "namespaces",
        namespace("default", "{ tern.dev/inject: enabled }"),
    );
    api.apply("namespaces", namespace("kube-system", "{}"));
    api.apply("mutatingwebhookconfigurations", webhook_configuration());
    let collector = tests::otlp::Collector::start();
    cluster.control.injector = Some(controlplane::webhook::Injector {
        listen: "127.0.0.1:0".parse().unwrap(),
        image: "tern-proxy:test".into(),
        control: cluster.control.address.to_string().parse().unwrap(),
        trace_collector: Some(collector.address.parse().unwrap()),
    });
    cluster.control.restart();
    let root = std::fs::read_to_string(cluster.control.dir.0.join("state/ca.crt")).unwrap();
    let api = &cluster.api;

    // tern-control writes the labelled namespace's ConfigMap, and no other, and the mesh
    // root into the webhook configuration.
    let config_map = |namespace: &str| api.get("v1", "configmaps", namespace, "tern-proxy");
    eventually(
        Duration::from_secs(10),
        "ConfigMap tern-proxy in default",
        || config_map("default").is_some(),
    );
    eventually(Duration::from_secs(10), "the webhook's caBundle", || {
        ca_bundle(api).is_some()
    });
    let bundle = ca_bundle(api).unwrap();
    assert_eq!(bundle.replace("\r\n", "\n"), root);
    // A namespace labelled later gets one too, and a configuration re-created without a
    // caBundle gets it back.
    api.apply(
        "namespaces",
        namespace("shop", "{ tern.dev/inject: enabled }"),
    );
    eventually(
        Duration::from_secs(10),
        "ConfigMap tern-proxy in shop",
        || config_map("shop").is_some(),
    );
    assert!(config_map("kube-system").is_none(), "not labelled");
    api.apply("mutatingwebhookconfigurations", webhook_configuration());
    eventually(
        Duration::from_secs(10),
        "the caBundle written again",
        || ca_bundle(api).is_some_and(|written| written == bundle),
    );

    // The API server sends the Pod to the webhook; the answer's patch injects it.
    let app = Http::start("web");
    let pod = web_pod(&app);
    let address = cluster.control.running().injector_address().unwrap();
    let (status, body) = post_review(address, &bundle, &admission_review(&pod));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let response = &answer["response"];
    assert_eq!(response["uid"], "3a1f0c6e-5c1b-4d0e-9a57-d1a2b6f0e001");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        response["patch"].as_str().unwrap(),
    )
    .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut injected = pod.clone();
    json_patch::patch(&mut injected, &patch).unwrap();
    assert_eq!(
        injected["spec"]["initContainers"][1]["image"],
        "tern-proxy:test"
    );

    // What is not a review gets 400, plaintext a failed handshake, and the webhook goes on
    // answering.
    let mut plain = std::net::TcpStream::connect(address).unwrap();
    std::io::Write::write_all(&mut plain, b"POST /inject HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(!answer.starts_with(b"HTTP"), "{answer:?}");
    let (status, body) = post_review(address, &bundle, b"{\"kind\": \"Pod\"}");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("not an AdmissionReview"));
    let (status, body) = post_review(address, &bundle, &admission_review(&injected));
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(
        answer["response"]["patch"].is_null(),
        "injected once: {answer}"
    );
    let metrics = client::request(
        cluster.control.admin,
        "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .text();
    for (result, count) in [("injected", 1.0), ("unchanged", 1.0), ("bad_review", 1.0)] {
        let series = format!("tern_control_injections_total{{result=\"{result}\"}}");
        assert_eq!(metric(&metrics, &series), count, "{series}");
    }

    let config_map = config_map("default").unwrap();
    run_injected(&cluster, &app, (injected, true), &config_map);
}

/// Runs the sidecar of `injected` (the Pod of [`web_pod`], injected) as the kubelet would,
/// with `config_map` mounted, and checks it is certified by its ServiceAccount token,
/// configured, ready, and makes the application's readiness probe, and, if `traced`, that
/// it exports spans.
fn run_injected(
    cluster: &Cluster,
    app: &Http,
    (mut injected, traced): (Value, bool),
    config_map: &Value,
) {
    let dir = tests::pki::TempDir::new("injected");
    // What the API server and the kubelet would do: hold the Pod (running, at an address),
    // mount the ConfigMap and the projected token, set the downward API's variables.
    injected["status"] = serde_json::json!({ "podIP": "127.0.0.1" });
    cluster.api.apply("pods", injected.clone());
    cluster
        .api
        .grant_token("web-token", "default", "web", "tern-control");
    let mounted = dir.0.join("etc-tern");
    std::fs::create_dir_all(&mounted).unwrap();
    let config = config_map["data"]["proxy.yaml"]
        .as_str()
        .unwrap()
        .replace("/etc/tern", &mounted.display().to_string())
        .replace("/var/run/secrets/tern", &mounted.display().to_string())
        // The test CA's serving certificate is for `tern-control`, not for its address.
        .replace(r#"server_name: "127.0.0.1""#, "server_name: tern-control");
    assert!(config.contains("server_name: tern-control"), "{config}");
    std::fs::write(mounted.join("proxy.yaml"), config).unwrap();
    std::fs::write(
        mounted.join("ca.crt"),
        config_map["data"]["ca.crt"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(mounted.join("token"), "web-token").unwrap();
    let sidecar = &injected["spec"]["initContainers"][1];
    assert_eq!(sidecar["name"], "tern-proxy");
    assert_eq!(sidecar["command"], serde_json::json!(["tern-proxy"]));
    // The probe port, 15020 in the Pod, is a free one here.
    let probe_address = format!("127.0.0.1:{}", free_port());
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                a.as_str()
                    .unwrap()
                    .replace("/etc/tern", &mounted.display().to_string())
                    .replace("[::]:15020", &probe_address)
            })
            .collect()
    };
    let admin = format!("127.0.0.1:{}", free_port());
    // The container's environment, as the kubelet sets it.
    let mut environment = vec![("TERN_ADMIN".to_owned(), admin.clone())];
    for variable in sidecar["env"].as_array().unwrap() {
        let name = variable["name"].as_str().unwrap().to_owned();
        if let Some(value) = variable["value"].as_str() {
            let value = kubelet_expand(value, &environment);
            environment.push((name, value));
            continue;
        }
        let field = variable["valueFrom"]["fieldRef"]["fieldPath"]
            .as_str()
            .unwrap();
        let value = match field {
            "metadata.name" => &injected["metadata"]["name"],
            "metadata.namespace" => &injected["metadata"]["namespace"],
            "spec.serviceAccountName" => &injected["spec"]["serviceAccountName"],
            other => panic!("a field the test does not set: {other}"),
        };
        environment.push((name, value.as_str().unwrap().to_owned()));
    }
    let _running = KillOnDrop(
        std::process::Command::new(tests::binary("tern-proxy"))
            .args(strings(&sidecar["args"]))
            .envs(environment.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The startup probe, as the kubelet runs it: in the container, with its environment.
    let probe = strings(&sidecar["startupProbe"]["exec"]["command"]);
    assert_eq!(probe[0], "tern-proxy");
    eventually(Duration::from_secs(20), "the startup probe to pass", || {
        std::process::Command::new(tests::binary("tern-proxy"))
            .args(&probe[1..])
            .envs(environment.iter().map(|(k, v)| (k, v)))
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    });
    assert!(
        cluster.api.reviews_of("web-token") >= 1,
        "certified by its ServiceAccount token"
    );
    let status = cluster.control.running().status();
    let connected: Vec<&str> = status.proxies.iter().map(|p| p.workload.as_str()).collect();
    assert!(connected.contains(&"default/web-0"), "{connected:?}");

    // The readiness probe, as the kubelet makes it now: through the sidecar, to the app.
    let probe = &injected["spec"]["containers"][0]["readinessProbe"]["httpGet"];
    assert_eq!(probe["port"], 15020);
    let path = probe["path"].as_str().unwrap();
    let before = app.requests.load(std::sync::atomic::Ordering::SeqCst);
    let response = client::request(
        probe_address.parse().unwrap(),
        &format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        app.requests.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );

    // Spans, when asked for (`traced`): the proxy exports them, named by account and
    // namespace.
    let variable = |name: &str| {
        environment
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(variable("TERN_TRACE_COLLECTOR").is_some(), traced);
    if traced {
        assert_eq!(variable("TERN_TRACE_SERVICE_NAME"), Some("web.default"));
        let metrics = client::request(
            admin.parse().unwrap(),
            "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
        )
        .text();
        assert!(
            metrics.contains("tern_trace_spans_total{result=\"exported\"}"),
            "{metrics}"
        );
    }
}

/// A container variable's value as the kubelet makes it: `$(NAME)` of a variable set before
/// it is that variable's value, `$$` is a `$`, and anything else stays as it is.
fn kubelet_expand(value: &str, set: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|r| r.split_once(')'))
            .filter(|(name, _)| set.iter().any(|(n, _)| n == name))
        {
            let value = &set.iter().rev().find(|(n, _)| n == name).unwrap().1;
            out.push_str(value);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}
