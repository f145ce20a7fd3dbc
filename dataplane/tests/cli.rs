//! The `tern-proxy` binary: start-up errors, SIGHUP reload, SIGTERM drain and exit code, and
//! `init --dry-run`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A port that refuses connections and stays so for as long as the socket returned lives:
/// bound, so nothing else started meanwhile takes it, but not listening.
fn refusing() -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket
}

/// A minimal upstream answering every request with `name`.
fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream, name));
        }
    });
    addr
}

fn serve(mut stream: TcpStream, name: &str) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                name.len()
            );
            if stream.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One GET on a new connection; the body, or `None` if the proxy could not be reached.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1)?.to_owned();
    Some((status, body))
}

fn write_config(path: &Path, listener: SocketAddr, cluster: &str, a: SocketAddr, b: SocketAddr) {
    let yaml = format!(
        "listeners:\n  - {{ name: web, address: {listener}, protocol: http, routes: [{{ cluster: {cluster} }}] }}\n\
         clusters:\n  - {{ name: a, endpoints: [{a}] }}\n  - {{ name: b, endpoints: [{b}] }}\n"
    );
    std::fs::write(path, yaml).unwrap();
}

struct Running {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &Path, backend: &str) -> Running {
    let admin = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--admin",
            &admin.to_string(),
            "--workers",
            "2",
            "--no-pin",
        ])
        .args([
            "--io-backend",
            backend,
            "--drain-deadline",
            "5s",
            "--log",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let running = Running { child, admin };
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(admin, "/ready").is_none_or(|(status, _)| status != 200) {
        assert!(Instant::now() < deadline, "tern-proxy did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("sh")
        .args(["-c", &format!("kill -{name} {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Sends SIGTERM, expects a clean exit, and returns what the proxy logged.
fn terminate(child: &mut Child) -> String {
    signal(child, "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    stderr
}

/// Runs `tern-proxy` with `args` and `env`, which it must refuse; returns what it said.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "{args:?} was not refused: {output:?}"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sighup_reloads_good_files_and_refuses_bad_ones(backend: &str) {
    let dir = std::env::temp_dir().join(format!("tern-cli-{}-{backend}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.yaml");
    let (a, b) = (upstream("a"), upstream("b"));
    let listener = free_port();
    write_config(&path, listener, "a", a, b);
    let mut proxy = start(&path, backend);
    assert_eq!(get(listener, "/").unwrap(), (200, "a".into()));

    write_config(&path, listener, "b", a, b);
    signal(&proxy.child, "HUP");
    wait_until("the reload routes to b", || {
        get(listener, "/").is_some_and(|(_, body)| body == "b")
    });

    std::fs::write(&path, "listeners: [ {{ this is not yaml").unwrap();
    signal(&proxy.child, "HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        get(listener, "/").unwrap(),
        (200, "b".into()),
        "a bad file leaves the running config"
    );
    let dump = get(proxy.admin, "/config_dump").unwrap().1;
    assert!(dump.contains("\"version\": 2"), "{dump}");

    let stderr = terminate(&mut proxy.child);
    assert!(
        stderr.contains("reload refused"),
        "the refusal is logged: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_reloads_on_io_uring() {
    sighup_reloads_good_files_and_refuses_bad_ones("io-uring");
}

#[test]
fn sighup_reloads_on_epoll() {
    sighup_reloads_good_files_and_refuses_bad_ones("epoll");
}

#[test]
fn a_bad_config_file_stops_start_up_with_the_field_named() {
    let dir = std::env::temp_dir().join(format!("tern-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - { name: web, address: 127.0.0.1:0, protocol: tcp, cluster: ghost }\n",
    )
    .unwrap();
    let stderr = refused(
        &["--config", path.to_str().unwrap(), "--admin", "127.0.0.1:0"],
        &[],
    );
    assert!(
        stderr.contains("listeners[0].cluster") && stderr.contains("ghost"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Spawns `tern-proxy` from a thread whose seccomp filter makes `io_uring_setup` fail with
/// `EPERM`, as the default profiles of containerd 2.x and Docker do; the child inherits it.
fn spawn_without_io_uring(args: &[&str]) -> Child {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    std::thread::spawn(move || {
        let rules = std::collections::BTreeMap::from([(libc::SYS_io_uring_setup, vec![])]);
        let arch = std::env::consts::ARCH
            .try_into()
            .expect("a seccomp-supported architecture");
        let filter = seccompiler::SeccompFilter::new(
            rules,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .unwrap();
        let program: seccompiler::BpfProgram = filter.try_into().unwrap();
        seccompiler::apply_filter(&program).unwrap();
        Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    })
    .join()
    .unwrap()
}

#[test]
fn auto_falls_back_to_epoll_when_seccomp_blocks_io_uring() {
    let dir = std::env::temp_dir().join(format!("tern-cli-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.yaml");
    let (a, b) = (upstream("a"), upstream("b"));
    let listener = free_port();
    write_config(&path, listener, "a", a, b);
    let admin = free_port();
    let config = path.to_str().unwrap();
    let admin_text = admin.to_string();
    let child = spawn_without_io_uring(&[
        "--config",
        config,
        "--admin",
        &admin_text,
        "--io-backend",
        "auto",
        "--workers",
        "1",
    ]);
    let mut running = Running { child, admin };
    wait_until("the proxy is ready", || {
        get(admin, "/ready").is_some_and(|(status, _)| status == 200)
    });
    assert_eq!(get(listener, "/").unwrap(), (200, "a".into()));
    let dump = get(running.admin, "/config_dump").unwrap().1;
    assert!(dump.contains("\"backend\": \"epoll\""), "{dump}");
    let stderr = terminate(&mut running.child);
    assert!(
        stderr.contains("io_uring is unavailable") && stderr.contains("io_uring_setup failed"),
        "{stderr}"
    );

    // Asked for io_uring explicitly, it refuses to start and says why.
    let child = spawn_without_io_uring(&[
        "--config",
        config,
        "--admin",
        "127.0.0.1:0",
        "--io-backend",
        "io-uring",
    ]);
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("io_uring_setup failed"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/local.yaml");
    let config = shared::Config::from_file(&path).unwrap();
    assert_eq!(config.listeners.len(), 2);
}

#[test]
fn wait_ready_holds_until_the_proxy_is_ready_and_gives_up_after_its_timeout() {
    // Nothing listens: it gives up, says why, and exits non-zero.
    let nobody = free_port();
    let stderr = refused(
        &[
            "wait-ready",
            "--admin",
            &nobody.to_string(),
            "--timeout",
            "300ms",
        ],
        &[],
    );
    assert!(stderr.contains("was not ready within"), "{stderr}");

    // Started while the proxy is still coming up, it returns once the proxy is ready.
    let dir = std::env::temp_dir().join(format!("tern-wait-ready-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.yaml");
    let app = upstream("app");
    write_config(&config, free_port(), "a", app, app);
    let admin = free_port();
    let waiter = Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
        .args([
            "wait-ready",
            "--admin",
            &admin.to_string(),
            "--timeout",
            "30s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--admin",
            &admin.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let waited = waiter.wait_with_output().unwrap();
    assert!(waited.status.success(), "{waited:?}");
    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dry_run_prints_the_rules_without_applying_them() {
    let output = Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
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

    let stderr = refused(
        &[
            "init",
            "--dry-run",
            "--exclude-outbound-cidrs",
            "10.96.0.0/99",
        ],
        &[],
    );
    assert!(stderr.contains("exclude-outbound-cidrs"), "{stderr}");
}

/// A server that answers every request with `status` (or, with `None`, accepts and never
/// answers).
fn answering(status: Option<u16>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut stream in listener.incoming().flatten() {
            let Some(status) = status else {
                held.push(stream);
                continue;
            };
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    addr
}

/// An application that redirects: `/start` to `/broken` (which answers 500), `/away` to
/// another host, `/loop` to itself; anything else answers 204.
fn redirecting() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap_or(0);
            let request = String::from_utf8_lossy(&request[..n]);
            let path = request.split(' ').nth(1).unwrap_or("/");
            let head = match path {
                "/start" => "302 Found\r\nLocation: /broken".to_owned(),
                "/broken" => "500 Broken".to_owned(),
                "/away" => "302 Found\r\nLocation: http://example.invalid/".to_owned(),
                "/loop" => "302 Found\r\nLocation: /loop".to_owned(),
                _ => "204 No Content".to_owned(),
            };
            let _ = stream.write_all(
                format!("HTTP/1.1 {head}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    addr
}

/// An HTTPS server, with a self-signed certificate for a name nobody asks for, answering
/// every request with `status`.
fn https_answering(status: u16) -> SocketAddr {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["app.invalid".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let config = std::sync::Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let connection = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(connection, stream);
            let mut request = [0u8; 1024];
            if tls.read(&mut request).is_ok() {
                let _ = tls.write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    addr
}

/// A gRPC server with the standard health service: the server as a whole and `shop.Cart`
/// are `SERVING`, `shop.Down` is `NOT_SERVING`.
fn grpc_health() -> SocketAddr {
    use tonic_health::ServingStatus;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (reporter, service) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("shop.Cart", ServingStatus::Serving)
                .await;
            reporter
                .set_service_status("shop.Down", ServingStatus::NotServing)
                .await;
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
    });
    addr
}

/// The kubelet's probes of the application, rewritten by `ternctl inject` to the sidecar's
/// probe port, are made by the proxy against the application on loopback: 200 when the
/// application's answer is 200–399, its port takes a connection or its gRPC health service
/// says `SERVING`, 503 saying why when not (an error status, nothing listening, no answer
/// within the probe's timeout, a service not serving or unknown, no gRPC at all), 404 for a
/// path no probe has.
#[test]
fn the_applications_probes_are_made_by_the_proxy() {
    let dir = std::env::temp_dir().join(format!("tern-cli-probes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.yaml");
    std::fs::write(&config, "listeners: []\n").unwrap();
    let (ok, failing, silent, dead, grpc) = (
        answering(Some(204)),
        answering(Some(500)),
        answering(None),
        refusing(),
        grpc_health().port(),
    );
    let (tls_ok, tls_failing) = (https_answering(200).port(), https_answering(503).port());
    let redirects = redirecting().port();
    let probes = format!(
        r#"{{"/app-health/app/readyz": {{"httpGet": {{"port": {}, "path": "/healthz", "httpHeaders": [{{"name": "x-probe", "value": "1"}}]}}}},
            "/app-health/app/livez": {{"tcpSocket": {{"port": {}}}}},
            "/app-health/bad/readyz": {{"httpGet": {{"port": {}}}}},
            "/app-health/silent/readyz": {{"httpGet": {{"port": {}}}, "timeoutSeconds": 1}},
            "/app-health/dead/livez": {{"tcpSocket": {{"port": {}}}}},
            "/app-health/grpc/livez": {{"grpc": {{"port": {grpc}}}}},
            "/app-health/grpc/readyz": {{"grpc": {{"port": {grpc}, "service": "shop.Cart"}}}},
            "/app-health/grpc-down/readyz": {{"grpc": {{"port": {grpc}, "service": "shop.Down"}}}},
            "/app-health/grpc-unknown/readyz": {{"grpc": {{"port": {grpc}, "service": "shop.Gone"}}}},
            "/app-health/grpc-http1/readyz": {{"grpc": {{"port": {}}}}},
            "/app-health/tls/readyz": {{"httpGet": {{"port": {tls_ok}, "scheme": "HTTPS"}}}},
            "/app-health/tls-bad/readyz": {{"httpGet": {{"port": {tls_failing}, "scheme": "HTTPS"}}}},
            "/app-health/tls-plain/readyz": {{"httpGet": {{"port": {}, "scheme": "HTTPS"}}}},
            "/app-health/moved/readyz": {{"httpGet": {{"port": {redirects}, "path": "/start"}}}},
            "/app-health/away/readyz": {{"httpGet": {{"port": {redirects}, "path": "/away"}}}},
            "/app-health/loop/readyz": {{"httpGet": {{"port": {redirects}, "path": "/loop"}}}}}}"#,
        ok.port(),
        ok.port(),
        failing.port(),
        silent.port(),
        dead.local_addr().unwrap().as_socket().unwrap().port(),
        ok.port(),
        ok.port(),
    );
    let probe_address = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--probe-address", &probe_address.to_string()])
        .env("TERN_APP_PROBES", &probes)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running {
        child,
        admin: probe_address,
    };
    wait_until("the probe server", || {
        get(probe_address, "/app-health/app/livez").is_some()
    });
    assert_eq!(
        get(probe_address, "/app-health/app/readyz"),
        Some((200, "ok\n".to_owned()))
    );
    assert_eq!(get(probe_address, "/app-health/app/livez").unwrap().0, 200);
    for path in [
        "/app-health/grpc/livez",
        "/app-health/grpc/readyz",
        "/app-health/tls/readyz",
        "/app-health/away/readyz",
    ] {
        assert_eq!(
            get(probe_address, path),
            Some((200, "ok\n".to_owned())),
            "{path}"
        );
    }
    for (path, why) in [
        ("/app-health/bad/readyz", "answered 500"),
        ("/app-health/silent/readyz", "no answer within"),
        ("/app-health/dead/livez", "connecting to"),
        ("/app-health/grpc-down/readyz", "answered NOT_SERVING"),
        ("/app-health/grpc-unknown/readyz", "answered NotFound"),
        ("/app-health/grpc-http1/readyz", "port"),
        ("/app-health/tls-bad/readyz", "answered 503"),
        ("/app-health/tls-plain/readyz", "TLS to port"),
        ("/app-health/moved/readyz", "GET /broken on port"),
        ("/app-health/loop/readyz", "more than 10 redirects"),
    ] {
        let (status, body) = get(probe_address, path).unwrap();
        assert_eq!(status, 503, "{path}: {body}");
        assert!(body.contains(why), "{path}: {body}");
    }
    assert_eq!(
        get(probe_address, "/app-health/other/readyz").unwrap().0,
        404
    );

    // Bad probes stop start-up with the reason, and so do probes without an address (or
    // the other way round).
    let base = [
        "--config",
        config.to_str().unwrap(),
        "--admin",
        "127.0.0.1:0",
    ];
    let with_address = [&base[..], &["--probe-address", "127.0.0.1:0"]].concat();
    let stderr = refused(
        &with_address,
        &[("TERN_APP_PROBES", r#"{"/app-health/x": {}}"#)],
    );
    assert!(
        stderr.contains("exactly one of httpGet, tcpSocket and grpc"),
        "{stderr}"
    );
    let stderr = refused(&with_address, &[]);
    assert!(stderr.contains("go together"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
