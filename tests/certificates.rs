//! Proxies that get their identity from `tern-control`'s CA: certification over gRPC with a
//! bootstrap token, mTLS between two such proxies, refusal of a token for another identity
//! and of an expired one, renewal by certificate after the token expired (and by token when
//! the CA no longer trusts the certificate),
//! a CA that is down at start-up, rotation that drops no connection, and a CA outage at
//! renewal that leaves traffic flowing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tests::ca::TestControlPlane;
use tests::client::{self, Conn};
use tests::upstream::Echo;
use tests::{
    BackendChoice, Proxy, admin_get, admin_status, eventually, metric, start_proxy, wait_ready,
};

const CERTIFY_OK: &str = "tern_identity_certify_total{result=\"ok\"}";
const CERTIFY_ERROR: &str = "tern_identity_certify_total{result=\"error\"}";

fn metric_of(proxy: &Proxy, series: &str) -> f64 {
    metric(&admin_get(proxy, "/metrics"), series)
}

/// The certificate `not_after` and SPIFFE ID that `/config_dump` shows.
fn certificate(proxy: &Proxy) -> (i64, String) {
    let dump: serde_json::Value = serde_json::from_str(&admin_get(proxy, "/config_dump")).unwrap();
    let identity = &dump["identity"];
    (
        identity["not_after"].as_i64().expect("an identity"),
        identity["spiffe_id"].as_str().unwrap().to_owned(),
    )
}

/// Proxy `b` terminates strict mTLS in front of an echo server.
fn start_server_side(control: &TestControlPlane, echo: &Echo) -> Proxy {
    let yaml = format!(
        "{}listeners:\n  - {{ name: in, address: 127.0.0.1:0, protocol: tcp, cluster: app, tls: {{ mode: strict }} }}\nclusters:\n  - {{ name: app, endpoints: [{}] }}\n",
        control.identity_yaml("b", "b"),
        echo.addr
    );
    start_proxy(&yaml, BackendChoice::Epoll)
}

/// Two operator roots, old and new (each its certificate and key file), for rotations.
struct Roots {
    dir: tests::pki::TempDir,
    old: (PathBuf, PathBuf),
    new: (PathBuf, PathBuf),
}

impl Roots {
    fn new() -> Roots {
        let dir = tests::pki::TempDir::new("roots");
        let old = tests::pki::TestCa::new("old mesh root").write_root(&dir.0, "old");
        let new = tests::pki::TestCa::new("new mesh root").write_root(&dir.0, "new");
        Roots { dir, old, new }
    }
}

/// A proxy with `identity` and a plaintext listener in front of `echo`.
fn in_front_of(echo: &Echo, identity: &str) -> String {
    format!(
        "{identity}listeners:\n  - {{ name: in, address: 127.0.0.1:0, protocol: tcp, cluster: app }}\nclusters:\n  - {{ name: app, endpoints: [{}] }}\n",
        echo.addr
    )
}

/// Proxy `a` (its token proving `proves`) originates mTLS to `b` at `inbound`.
fn start_client_side(control: &TestControlPlane, proves: &str, inbound: SocketAddr) -> Proxy {
    let yaml = format!(
        "{}listeners:\n  - {{ name: out, address: 127.0.0.1:0, protocol: tcp, cluster: b }}\nclusters:\n  - {{ name: b, endpoints: [{inbound}], tls: {{ identity: \"{}\" }} }}\n",
        control.identity_yaml("a", proves),
        TestControlPlane::spiffe_id("b"),
    );
    start_proxy(&yaml, BackendChoice::Epoll)
}

fn ready_pair(control: &TestControlPlane, echo: &Echo) -> (Proxy, Proxy) {
    let b = start_server_side(control, echo);
    wait_ready(&b, Duration::from_secs(10));
    let a = start_client_side(control, "a", b.listener_addr("in").unwrap());
    wait_ready(&a, Duration::from_secs(10));
    (a, b)
}

#[test]
fn proxies_certified_by_the_ca_carry_mtls_traffic() {
    let control = TestControlPlane::start(Duration::from_secs(3600));
    let echo = Echo::start();
    let (a, b) = ready_pair(&control, &echo);
    client::assert_echo(a.listener_addr("out").unwrap(), b"through the mesh");

    for (proxy, name) in [(&a, "a"), (&b, "b")] {
        let (not_after, id) = certificate(proxy);
        assert_eq!(id, TestControlPlane::spiffe_id(name));
        let metrics = admin_get(proxy, "/metrics");
        assert_eq!(metric(&metrics, CERTIFY_OK), 1.0);
        assert_eq!(metric(&metrics, CERTIFY_ERROR), 0.0);
        let expiry = metric(
            &metrics,
            &format!(
                "tern_identity_expiry_seconds{{identity=\"{}\"}}",
                TestControlPlane::spiffe_id(name)
            ),
        );
        assert!((3500.0..=3600.0).contains(&expiry), "{expiry}");
        assert!(not_after > 0);
    }
    // b saw a's identity, which only the CA could have certified.
    let inbound = admin_get(&b, "/metrics");
    assert_eq!(
        metric(
            &inbound,
            &format!(
                "tern_listener_peer_connections_total{{listener=\"in\",peer_identity=\"{}\"}}",
                TestControlPlane::spiffe_id("a")
            )
        ),
        1.0,
        "{inbound}"
    );
}

#[test]
fn a_token_for_another_identity_is_refused_until_the_right_one_arrives() {
    let control = TestControlPlane::start(Duration::from_secs(3600));
    let a = start_client_side(&control, "mallory", "127.0.0.1:9".parse().unwrap());
    eventually(Duration::from_secs(10), "two refusals", || {
        metric_of(&a, CERTIFY_ERROR) >= 2.0
    });
    let (status, body) = admin_status(&a, "/ready");
    assert_eq!(status, 503);
    assert!(body.contains("waiting for a certificate"), "{body}");
    assert_eq!(metric_of(&a, CERTIFY_OK), 0.0);
    assert!(
        a.listener_addr("out").is_none(),
        "no listener may open before the proxy has its identity"
    );

    // The token file is read at every attempt: replacing it is enough.
    control.write_token("a", "a");
    wait_ready(&a, Duration::from_secs(10));
    assert!(a.listener_addr("out").is_some());
    assert_eq!(certificate(&a).1, TestControlPlane::spiffe_id("a"));
}

#[test]
fn a_ca_that_is_down_at_start_up_is_retried_until_it_answers() {
    let mut control = TestControlPlane::start(Duration::from_secs(3600));
    let echo = Echo::start();
    let b = start_server_side(&control, &echo);
    wait_ready(&b, Duration::from_secs(10));
    control.stop();
    let a = start_client_side(&control, "a", b.listener_addr("in").unwrap());
    eventually(Duration::from_secs(10), "a failed attempt", || {
        metric_of(&a, CERTIFY_ERROR) >= 1.0
    });
    assert_eq!(admin_status(&a, "/ready").0, 503);
    // b, already certified, serves on without its CA.
    assert_eq!(admin_status(&b, "/ready").0, 200);

    control.restart();
    wait_ready(&a, Duration::from_secs(15));
    client::assert_echo(a.listener_addr("out").unwrap(), b"after the outage");
}

#[test]
fn rotation_drops_no_connection_and_a_ca_outage_at_renewal_is_survived() {
    // Certificates live 10 s: renewal comes after 5–7 s.
    let mut control = TestControlPlane::start(Duration::from_secs(10));
    let echo = Echo::start();
    let (a, b) = ready_pair(&control, &echo);
    let out = a.listener_addr("out").unwrap();
    let mut open = Conn::open(out);
    open.echo(b"before rotation");
    let first = (certificate(&a).0, certificate(&b).0);

    eventually(Duration::from_secs(15), "both proxies to renew", || {
        certificate(&a).0 > first.0 && certificate(&b).0 > first.1
    });
    open.echo(b"the connection opened before the rotation is untouched");
    client::assert_echo(out, b"a new connection uses the new certificates");

    // The CA goes away: the next renewal fails and is retried, while traffic flows on with
    // the certificates in hand.
    control.stop();
    let renewed = metric_of(&a, CERTIFY_OK);
    eventually(Duration::from_secs(15), "a failed renewal", || {
        metric_of(&a, CERTIFY_ERROR) >= 1.0
    });
    client::assert_echo(out, b"served while the CA is down");
    open.echo(b"and the old connection too");

    control.restart();
    eventually(
        Duration::from_secs(15),
        "a renewal after the CA returns",
        || metric_of(&a, CERTIFY_OK) > renewed,
    );
    client::assert_echo(out, b"after the CA came back");
}

#[test]
fn a_running_proxy_renews_with_its_certificate_once_its_token_expired() {
    // Certificates live 6 s (renewal after 3–4.2 s); the token proves `b` for 2 s.
    let control = TestControlPlane::start(Duration::from_secs(6));
    let token = control.write_token_valid_for("b", "b", Duration::from_secs(2));
    let echo = Echo::start();
    let yaml = in_front_of(&echo, &control.identity_yaml_with("b", &token));
    let b = start_proxy(&yaml, BackendChoice::Epoll);
    wait_ready(&b, Duration::from_secs(10));
    let first = certificate(&b).0;
    // The token expires, and goes: renewals need only the certificate.
    std::thread::sleep(Duration::from_millis(2100));
    std::fs::remove_file(&token).unwrap();
    eventually(
        Duration::from_secs(20),
        "two renewals after the token expired",
        || metric_of(&b, CERTIFY_OK) >= 3.0 && certificate(&b).0 > first,
    );
    assert_eq!(metric_of(&b, CERTIFY_ERROR), 0.0);

    // A proxy that starts with the expired token is refused.
    let expired = control.write_token_valid_for("late", "b", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(2100));
    let late = start_proxy(
        &yaml.replace(&token.display().to_string(), &expired.display().to_string()),
        BackendChoice::Epoll,
    );
    eventually(Duration::from_secs(10), "a refusal", || {
        metric_of(&late, CERTIFY_ERROR) >= 1.0
    });
    assert_eq!(admin_status(&late, "/ready").0, 503);
    assert_eq!(metric_of(&late, CERTIFY_OK), 0.0);
}

#[test]
fn a_root_rotation_keeps_old_and_new_certificates_talking() {
    let mut control = TestControlPlane::start(Duration::from_secs(3600));
    // The directory lives as long as the test.
    let Roots {
        dir: _roots,
        old,
        new,
    } = Roots::new();
    let echo = Echo::start();

    // Step 1: still signing with the old root, the bundle already carries the new one.
    control.ca.ca_cert = Some(old.0.clone());
    control.ca.ca_key = Some(old.1.clone());
    control.ca.extra_roots = Some(new.0.clone());
    control.restart();
    let b = start_server_side(&control, &echo);
    wait_ready(&b, Duration::from_secs(10));

    // Step 2: signing with the new root; the bundle keeps the old one.
    control.ca.ca_cert = Some(new.0.clone());
    control.ca.ca_key = Some(new.1.clone());
    control.ca.extra_roots = Some(old.0.clone());
    control.restart();
    let a = start_client_side(&control, "a", b.listener_addr("in").unwrap());
    wait_ready(&a, Duration::from_secs(10));
    client::assert_echo(a.listener_addr("out").unwrap(), b"old and new roots");

    // Without the old root in its bundle, a proxy on the new root cannot reach b: the
    // bundle is what made the rotation work.
    control.ca.extra_roots = None;
    control.restart();
    let c = start_client_side(&control, "a", b.listener_addr("in").unwrap());
    wait_ready(&c, Duration::from_secs(10));
    let mut refused = client::connect(c.listener_addr("out").unwrap());
    let _ = std::io::Write::write_all(&mut refused, b"x");
    let mut buf = [0u8; 1];
    let read = std::io::Read::read(&mut refused, &mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a connection was carried to a peer outside the bundle"
    );
    eventually(Duration::from_secs(5), "the refused upstream", || {
        metric_of(&c, "tern_upstream_connect_failures_total{cluster=\"b\"}") >= 1.0
    });
}

#[test]
fn a_certificate_the_ca_no_longer_trusts_falls_back_to_the_token() {
    // Certificates live 6 s (renewal after 3–4.2 s).
    let mut control = TestControlPlane::start(Duration::from_secs(6));
    let Roots {
        dir: roots,
        old,
        new,
    } = Roots::new();
    // The proxy knows the CA's server by either root.
    let both = roots.0.join("both.crt");
    let pems = [&old.0, &new.0].map(|path| std::fs::read_to_string(path).unwrap());
    std::fs::write(&both, pems.concat()).unwrap();
    control.ca.ca_cert = Some(old.0.clone());
    control.ca.ca_key = Some(old.1.clone());
    control.restart();
    let echo = Echo::start();
    let identity = control
        .identity_yaml("b", "b")
        .replace(&old.0.display().to_string(), &both.display().to_string());
    let yaml = in_front_of(&echo, &identity);
    let b = start_proxy(&yaml, BackendChoice::Epoll);
    wait_ready(&b, Duration::from_secs(10));

    // The CA moves to the new root and drops the old one (no rotation window): at renewal it
    // refuses the old certificate, and the proxy proves itself with its token instead.
    control.ca.ca_cert = Some(new.0.clone());
    control.ca.ca_key = Some(new.1.clone());
    control.restart();
    eventually(
        Duration::from_secs(15),
        "a renewal under the new root",
        || metric_of(&b, CERTIFY_OK) >= 2.0,
    );
    assert_eq!(
        metric_of(&b, CERTIFY_ERROR),
        0.0,
        "the fallback is part of the same attempt"
    );
}

#[test]
fn a_config_that_cannot_go_live_with_its_certificate_is_retried_soon() {
    let control = TestControlPlane::start(Duration::from_secs(3600));
    // Another socket holds the listener's port: the first apply fails after certification.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let yaml = format!(
        "{}listeners:\n  - {{ name: out, address: 127.0.0.1:{port}, protocol: tcp, cluster: b }}\nclusters:\n  - {{ name: b, endpoints: [127.0.0.1:9], tls: {{ identity: \"{}\" }} }}\n",
        control.identity_yaml("a", "a"),
        TestControlPlane::spiffe_id("b"),
    );
    let a = start_proxy(&yaml, BackendChoice::Epoll);
    eventually(Duration::from_secs(10), "a certificate", || {
        metric_of(&a, CERTIFY_OK) >= 1.0
    });
    assert_eq!(admin_status(&a, "/ready").0, 503);
    drop(squatter);
    // Retried with backoff (0.25 s, 0.5 s, …), not at the renewal hours away.
    wait_ready(&a, Duration::from_secs(10));
    assert_eq!(a.listener_addr("out").unwrap().port(), port);
}

#[test]
fn a_ca_named_by_dns_is_reached_at_what_the_name_resolves_to() {
    // In a cluster the CA is a Service's name (`tern-control.tern-system.svc:15012`);
    // `localhost` resolves to ::1 and 127.0.0.1, and the CA listens on the second only.
    let control = TestControlPlane::start(Duration::from_secs(3600));
    let echo = Echo::start();
    let identity = control.identity_yaml("a", "a").replace(
        &format!("address: {}", control.address),
        &format!("address: localhost:{}", control.address.port()),
    );
    assert!(identity.contains("address: localhost:"), "{identity}");
    let a = start_proxy(&in_front_of(&echo, &identity), BackendChoice::Epoll);
    wait_ready(&a, Duration::from_secs(10));
    assert_eq!(certificate(&a).1, TestControlPlane::spiffe_id("a"));
    let dump = admin_get(&a, "/config_dump");
    assert!(
        dump.contains("localhost:"),
        "the configured name is shown: {dump}"
    );
}
