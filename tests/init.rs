//! `tern-proxy init` for real, in a pod the test creates (and removes, pass or fail): the
//! rules install, a second run leaves the same rules, outbound TCP lands on the outbound port
//! with its original destination recoverable (`SO_ORIGINAL_DST`), excluded ports and the
//! proxy's own UID pass untouched, and `--uninstall` removes it all; with nftables and with
//! iptables. Needs root, `ip` and `nft` (CI installs iproute2, nftables and iptables), and
//! `tern-proxy` built (`cargo test --workspace`). `--dry-run` is tested with the binary's
//! other commands (`dataplane/tests/cli.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::binary;
use tests::pods::{Node, Pod};

/// Where packets the rules leave alone go: out of the pod to its node, which has no route
/// there, so they go no further.
const ELSEWHERE: &str = "10.9.9.9";

fn connects(to: &str) -> bool {
    TcpStream::connect_timeout(&to.parse().unwrap(), Duration::from_millis(300)).is_ok()
}

/// `tern-proxy` with `args`, run inside `pod`; panics with its output if it fails.
fn tern_proxy(node: &Node, pod: &Pod, args: &[&str]) -> String {
    node.exec(&pod.netns, &binary("tern-proxy"), args)
}

/// Inside a pod with the rules (port 5432 excluded): any destination lands on the outbound
/// port with its original destination readable; the excluded port and the proxy's own
/// traffic (UID 1337) go out untouched (and, here, nowhere). Returns the outbound port's
/// listener.
fn assert_intercepts_all_but_the_excluded() -> TcpListener {
    let outbound = TcpListener::bind("0.0.0.0:15001").unwrap();
    assert!(connects(&format!("{ELSEWHERE}:80")));
    let (accepted, _) = outbound.accept().unwrap();
    let original = rustix::net::sockopt::ip_original_dst(&accepted).unwrap();
    assert_eq!(
        SocketAddr::V4(original),
        format!("{ELSEWHERE}:80").parse().unwrap()
    );
    assert!(!connects(&format!("{ELSEWHERE}:5432")));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(1337)).unwrap();
            assert!(
                !connects(&format!("{ELSEWHERE}:80")),
                "the proxy's own connection was intercepted"
            );
        });
    });
    outbound
}

/// After `--uninstall`: nothing is redirected any more.
fn assert_no_longer_intercepted() {
    let _outbound = TcpListener::bind("0.0.0.0:15001").unwrap();
    assert!(
        !connects(&format!("{ELSEWHERE}:80")),
        "no longer intercepted"
    );
}

#[test]
fn init_intercepts_outbound_tcp_idempotently_and_uninstall_removes_it() {
    if !tests::pods::supported() {
        return;
    }
    let node = Node::new("init");
    let pod = node.pod("app", 1);
    for _ in 0..2 {
        tern_proxy(&node, &pod, &["init", "--exclude-outbound-ports", "5432"]);
    }
    let nft = Path::new("nft");
    let listed = node.exec(&pod.netns, nft, &["list", "table", "inet", "tern"]);
    assert_eq!(
        listed.matches("redirect to :15001").count(),
        1,
        "run twice, installed once:\n{listed}"
    );

    pod.within(|| {
        let outbound = assert_intercepts_all_but_the_excluded();
        // Loopback is not intercepted.
        let local = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(connects(&local.local_addr().unwrap().to_string()));
        outbound.set_nonblocking(true).unwrap();
        assert!(
            outbound.accept().is_err(),
            "nothing else reached the outbound port"
        );
    });

    tern_proxy(&node, &pod, &["init", "--uninstall"]);
    let tables = node.exec(&pod.netns, nft, &["list", "tables"]);
    assert!(!tables.contains("tern"), "{tables}");
    pod.within(assert_no_longer_intercepted);
    // Uninstalling again is not an error.
    tern_proxy(&node, &pod, &["init", "--uninstall"]);
}

#[test]
fn init_with_iptables_intercepts_the_same_way_and_uninstalls() {
    let iptables = Command::new("iptables-restore")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !tests::pods::supported() || !iptables {
        eprintln!("skipping: needs root and iptables");
        return;
    }
    let node = Node::new("ipt");
    let pod = node.pod("app", 1);
    for _ in 0..2 {
        tern_proxy(
            &node,
            &pod,
            &[
                "init",
                "--firewall",
                "iptables",
                "--exclude-outbound-ports",
                "5432",
            ],
        );
    }
    let listed = node.exec(&pod.netns, Path::new("iptables"), &["-t", "nat", "-S"]);
    assert_eq!(
        listed.matches("-A OUTPUT -p tcp -j TERN_OUTBOUND").count(),
        1,
        "run twice, one jump:\n{listed}"
    );
    assert_eq!(
        listed.matches("--to-ports 15001").count(),
        1,
        "run twice, one redirect:\n{listed}"
    );
    let listed6 = node.exec(&pod.netns, Path::new("ip6tables"), &["-t", "nat", "-S"]);
    assert!(listed6.contains("TERN_INBOUND"), "{listed6}");

    pod.within(|| drop(assert_intercepts_all_but_the_excluded()));

    tern_proxy(
        &node,
        &pod,
        &["init", "--firewall", "iptables", "--uninstall"],
    );
    let listed = node.exec(&pod.netns, Path::new("iptables"), &["-t", "nat", "-S"]);
    assert!(!listed.contains("TERN"), "{listed}");
    pod.within(assert_no_longer_intercepted);
    tern_proxy(
        &node,
        &pod,
        &["init", "--firewall", "iptables", "--uninstall"],
    );
}
