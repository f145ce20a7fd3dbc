//! `tern-proxy init` for real, in a network namespace the test creates (and removes, pass or
//! fail): the rules install, a second run leaves the same rules, outbound TCP lands on the
//! outbound port with its original destination recoverable (`SO_ORIGINAL_DST`), excluded
//! ports and the proxy's own UID pass untouched, and `--uninstall` removes it all.
//! Needs root, `ip` and `nft` (CI installs iproute2 and nftables).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tern-proxy");

/// A network namespace with loopback up and a default route through a veth pair whose
/// other end answers nothing, so packets to anywhere leave (and vanish) unless the rules
/// redirect them.
struct Netns(String);

fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {output:?}");
    output
}

impl Netns {
    fn new(label: &str) -> Netns {
        let name = format!("tern-{label}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns(name);
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            &["addr", "add", "10.9.0.1/16", "dev", "v0"],
            &["link", "set", "v0", "up"],
            &["link", "set", "v1", "up"],
            &["route", "add", "default", "dev", "v0"],
        ] {
            let mut full = vec!["-n", ns.0.as_str()];
            full.extend_from_slice(args);
            run("ip", &full);
        }
        ns
    }

    /// Runs a command inside the namespace.
    fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
                    rustix::thread::move_into_link_name_space(
                        file.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .unwrap();
                    f()
                })
                .join()
                .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn can_run() -> bool {
    let root = rustix::process::geteuid().is_root();
    let nft = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(root && nft) {
        eprintln!("skipping: needs root and nft (root: {root}, nft: {nft})");
    }
    root && nft
}

fn connects(to: &str) -> bool {
    TcpStream::connect_timeout(&to.parse().unwrap(), Duration::from_millis(300)).is_ok()
}

/// Inside a namespace with the rules (port 5432 excluded): any destination lands on the
/// outbound port with its original destination readable; the excluded port and the
/// proxy's own traffic (UID 1337) go out untouched (and, here, nowhere). Returns the
/// outbound port's listener.
fn assert_intercepts_all_but_the_excluded() -> TcpListener {
    let outbound = TcpListener::bind("0.0.0.0:15001").unwrap();
    assert!(connects("10.9.9.9:80"));
    let (accepted, _) = outbound.accept().unwrap();
    let original = rustix::net::sockopt::ip_original_dst(&accepted).unwrap();
    assert_eq!(SocketAddr::V4(original), "10.9.9.9:80".parse().unwrap());
    assert!(!connects("10.9.9.9:5432"));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(1337)).unwrap();
            assert!(
                !connects("10.9.9.9:80"),
                "the proxy's own connection was intercepted"
            );
        });
    });
    outbound
}

#[test]
fn dry_run_prints_the_rules_without_applying_them() {
    let output = Command::new(BIN)
        .args([
            "init",
            "--dry-run",
            "--exclude-outbound-ports",
            "5432,6379",
            "--exclude-outbound-cidrs",
            "10.96.0.0/12",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let rules = String::from_utf8(output.stdout).unwrap();
    assert!(rules.contains("tcp dport { 5432, 6379 } return"), "{rules}");
    assert!(
        rules.contains("ip daddr { 10.96.0.0/12 } return"),
        "{rules}"
    );
    assert!(rules.contains("redirect to :15001"), "{rules}");

    let bad = Command::new(BIN)
        .args([
            "init",
            "--dry-run",
            "--exclude-outbound-cidrs",
            "10.96.0.0/99",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("exclude-outbound-cidrs"),
        "{bad:?}"
    );
}

#[test]
fn init_intercepts_outbound_tcp_idempotently_and_uninstall_removes_it() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    for _ in 0..2 {
        let init = ns.exec(&[BIN, "init", "--exclude-outbound-ports", "5432"]);
        assert!(init.status.success(), "{init:?}");
    }
    let listed =
        String::from_utf8(ns.exec(&["nft", "list", "table", "inet", "tern"]).stdout).unwrap();
    assert_eq!(
        listed.matches("redirect to :15001").count(),
        1,
        "run twice, installed once:\n{listed}"
    );

    ns.within(|| {
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

    let uninstall = ns.exec(&[BIN, "init", "--uninstall"]);
    assert!(uninstall.status.success(), "{uninstall:?}");
    let tables = String::from_utf8(ns.exec(&["nft", "list", "tables"]).stdout).unwrap();
    assert!(!tables.contains("tern"), "{tables}");
    ns.within(|| {
        let _outbound = TcpListener::bind("0.0.0.0:15001").unwrap();
        assert!(!connects("10.9.9.9:80"), "no longer intercepted");
    });
    // Uninstalling again is not an error.
    assert!(ns.exec(&[BIN, "init", "--uninstall"]).status.success());
}

fn iptables_available() -> bool {
    Command::new("iptables-restore")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn init_with_iptables_intercepts_the_same_way_and_uninstalls() {
    if !can_run() || !iptables_available() {
        eprintln!("skipping: needs root and iptables");
        return;
    }
    let ns = Netns::new("ipt");
    for _ in 0..2 {
        let init = ns.exec(&[
            BIN,
            "init",
            "--firewall",
            "iptables",
            "--exclude-outbound-ports",
            "5432",
        ]);
        assert!(init.status.success(), "{init:?}");
    }
    let listed = String::from_utf8(ns.exec(&["iptables", "-t", "nat", "-S"]).stdout).unwrap();
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
    let listed6 = String::from_utf8(ns.exec(&["ip6tables", "-t", "nat", "-S"]).stdout).unwrap();
    assert!(listed6.contains("TERN_INBOUND"), "{listed6}");

    ns.within(|| drop(assert_intercepts_all_but_the_excluded()));

    let uninstall = ns.exec(&[BIN, "init", "--firewall", "iptables", "--uninstall"]);
    assert!(uninstall.status.success(), "{uninstall:?}");
    let listed = String::from_utf8(ns.exec(&["iptables", "-t", "nat", "-S"]).stdout).unwrap();
    assert!(!listed.contains("TERN"), "{listed}");
    ns.within(|| {
        let _outbound = TcpListener::bind("0.0.0.0:15001").unwrap();
        assert!(!connects("10.9.9.9:80"), "no longer intercepted");
    });
    assert!(
        ns.exec(&[BIN, "init", "--firewall", "iptables", "--uninstall"])
            .status
            .success()
    );
}
