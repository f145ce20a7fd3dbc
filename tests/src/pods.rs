//! Pods on one machine: each "pod" is a network namespace with a veth pair into a "node"
//! namespace, where a bridge joins them (198.18.0.0/24 and fd00:7e57::/64, test ranges that
//! lead nowhere else). Programs run inside a pod with `ip netns exec`; test code runs inside
//! one on a thread that has entered it ([`Netns::within`]), and sockets it creates there
//! stay in that namespace.
//!
//! A [`Node`] owns everything it made: on drop (a test passing or panicking) it kills the
//! programs it started and deletes every namespace, which removes the veths and the bridge
//! with them. Names carry the test process's ID, so parallel test binaries do not collide.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::pki::TempDir;

/// The node's address on the bridge (IPv4).
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The node's address on the bridge (IPv6).
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7e57, 0, 0, 0, 0, 0, 1);

/// Whether this machine can build pods: root, `ip` and `nft`. Tests that need pods print
/// why and pass without running when it cannot (a developer's unprivileged machine); CI runs
/// as root with both installed.
pub fn supported() -> bool {
    let root = rustix::process::geteuid().is_root();
    let tools = [("ip", "-V"), ("nft", "--version")]
        .iter()
        .all(|(tool, version)| {
            Command::new(tool)
                .arg(version)
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if !(root && tools) {
        eprintln!("skipping: pods need root, ip and nft (root: {root}, tools: {tools})");
    }
    root && tools
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace, by name.
#[derive(Debug, Clone)]
pub struct Netns(pub String);

impl Netns {
    /// Adds the namespace `name`, loopback up, replacing one a killed run left behind.
    fn create(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let netns = Netns(name);
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.0.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// Runs `f` on a thread that has entered the namespace; sockets made there stay in it.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(format!("/run/netns/{}", self.0))
                        .expect("the namespace exists");
                    rustix::thread::move_into_link_name_space(
                        file.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .expect("entering the namespace");
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// A pod: a namespace with an address of each family on the node's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Its name (also the label of its programs' logs).
    pub name: String,
    /// Its network namespace.
    pub netns: Netns,
    /// Its IPv4 address.
    pub v4: Ipv4Addr,
    /// Its IPv6 address.
    pub v6: Ipv6Addr,
}

impl Pod {
    /// Runs `f` inside the pod's namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.netns.within(f)
    }

    /// A listening socket bound inside the pod.
    pub fn bind(&self, addr: &str) -> std::net::TcpListener {
        let addr: SocketAddr = addr.parse().expect("an ip:port");
        self.within(|| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .unwrap();
            if addr.is_ipv6() {
                // `[::]` takes IPv4 too.
                socket.set_only_v6(false).unwrap();
            }
            socket.set_reuse_address(true).unwrap();
            socket.bind(&addr.into()).unwrap();
            socket.listen(128).unwrap();
            socket.into()
        })
    }

    /// A connection from inside the pod, with read and write timeouts.
    pub fn connect(&self, to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
        self.within(|| {
            let stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.set_write_timeout(Some(Duration::from_secs(10)))?;
            Ok(stream)
        })
    }
}

/// The node: a namespace holding the bridge, the pods joined to it, and the programs they
/// run.
pub struct Node {
    /// The node's own namespace (the bridge; a control plane runs here).
    pub netns: Netns,
    /// Logs of the programs started, and files the test writes.
    pub dir: TempDir,
    pods: RefCell<Vec<Pod>>,
    children: RefCell<Vec<(String, Child)>>,
}

impl Node {
    /// Builds the node namespace and its bridge.
    pub fn new(label: &str) -> Node {
        let node = Node {
            netns: Netns::create(format!("tern-{label}-{}", std::process::id())),
            dir: TempDir::new(label),
            pods: RefCell::default(),
            children: RefCell::default(),
        };
        let v4 = format!("{NODE_V4}/24");
        let v6 = format!("{NODE_V6}/64");
        for args in [
            &["link", "add", "br0", "type", "bridge"][..],
            &["addr", "add", &v4, "dev", "br0"],
            &["addr", "add", &v6, "dev", "br0", "nodad"],
            &["link", "set", "br0", "up"],
        ] {
            node.netns.ip(args);
        }
        node
    }

    /// Adds pod number `n` (1–200): 198.18.0.(10+n) and fd00:7e57::(10+n).
    pub fn pod(&self, name: &str, n: u8) -> Pod {
        let host = 10 + n;
        let pod = Pod {
            name: name.to_owned(),
            netns: Netns::create(format!("{}-{name}", self.netns.0)),
            v4: Ipv4Addr::new(198, 18, 0, host),
            v6: Ipv6Addr::new(0xfd00, 0x7e57, 0, 0, 0, 0, 0, u16::from(host)),
        };
        self.pods.borrow_mut().push(pod.clone());
        let peer = format!("veth{host}");
        let (v4, v6) = (format!("{}/24", pod.v4), format!("{}/64", pod.v6));
        let (gw4, gw6) = (NODE_V4.to_string(), NODE_V6.to_string());
        for args in [
            &[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &self.netns.0,
            ][..],
            &["addr", "add", &v4, "dev", "eth0"],
            &["addr", "add", &v6, "dev", "eth0", "nodad"],
            &["link", "set", "eth0", "up"],
            &["route", "add", "default", "via", &gw4],
            &["-6", "route", "add", "default", "via", &gw6],
        ] {
            pod.netns.ip(args);
        }
        self.netns.ip(&["link", "set", &peer, "master", "br0"]);
        self.netns.ip(&["link", "set", &peer, "up"]);
        pod
    }

    /// Starts `program` inside `netns`, its output logged under `label`.
    pub fn spawn(&self, netns: &Netns, label: &str, program: &Path, args: &[&str]) {
        let log = std::fs::File::create(self.log_path(label)).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.0])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        self.children.borrow_mut().push((label.to_owned(), child));
    }

    /// Runs `program` inside `netns` to completion; panics with its output if it fails.
    pub fn exec(&self, netns: &Netns, program: &Path, args: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &netns.0])
            .arg(program)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{} {}: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Sends SIGTERM to the program logged as `label` and waits for it to exit; returns
    /// whether it exited successfully.
    pub fn terminate(&self, label: &str) -> bool {
        let mut children = self.children.borrow_mut();
        let Some(index) = children.iter().position(|(l, _)| l == label) else {
            panic!("no program {label}");
        };
        let (_, mut child) = children.remove(index);
        // `ip netns exec` execs the program, so the child is the program itself.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self, label: &str) -> PathBuf {
        self.dir.0.join(format!("{label}.log"))
    }

    /// What the program logged as `label` has printed so far.
    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.log_path(label)).unwrap_or_default()
    }

    /// Writes a file under the node's directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.0.join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(text.as_bytes()).unwrap();
        path
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for (label, mut child) in self.children.borrow_mut().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("---- {label} ----\n{}", tail(&self.log(&label), 60));
            }
        }
        for pod in self.pods.borrow().iter() {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns.0])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns.0])
            .output();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An HTTP GET from inside a pod; the response.
pub fn get(pod: &Pod, to: SocketAddr, host: &str, path: &str) -> crate::client::Response {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut conn = crate::client::Conn::new(pod.connect(to).expect("connects"));
    conn.send(raw.as_bytes());
    conn.response(false)
}

/// The IP of either family, for formatting `ip:port` strings.
pub fn socket(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
