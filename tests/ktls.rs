//! Kernel TLS through a sidecar pair: an outbound proxy originates mTLS to an inbound proxy,
//! for each TLS 1.3 cipher suite on epoll (AES-128-GCM on io_uring too), moving bulk data
//! both ways at once and many small messages, byte-exact; and, on both IO backends, what
//! comes after the hand-off: KeyUpdates either way, session tickets, a record that does not
//! decrypt.
//!
//! The same tests run on any kernel. Where the kernel has kTLS, every mTLS connection must be
//! handed to it, and `/proc/net/tls_stat` must show the kernel carrying the records; where it
//! has none (as on Tern's development machines), every connection must fall back to
//! Tern's userspace record layer and still move the bytes exactly. `TERN_EXPECT_KTLS=1` (set by the VM
//! harness, `tests/ktls_vm.rs`, which boots a kernel that has it) makes the absence of kTLS
//! a failure rather than a fallback.
//!
//! One more test needs a kernel this machine does not boot: interception on a kernel without
//! IPv6 (the VM harness boots Debian 12's with `ipv6.disable=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::time::Duration;

use dataplane::io::epoll::Epoll;
use dataplane::io::uring::Uring;
use dataplane::io::{Backend, Listener, Stream};
use dataplane::tls::{Handshake, MaybeTls};
use rustls::pki_types::pem::PemObject;

use tests::client;
use tests::pki::{TempDir, TestCa};
use tests::upstream::Echo;
use tests::{BackendChoice, Proxy, admin_get, both_backends, metric, start_proxy, wait_for_metric};

const A: &str = "spiffe://tern.test/ns/shop/sa/frontend";
const B: &str = "spiffe://tern.test/ns/shop/sa/backend";

/// Bulk size: 100 MB each way for one suite on epoll where the kernel does the crypto (the
/// VM harness, whose emulated CPU is slow) and 16 MB for the others; 8 MiB where this debug
/// build's userspace crypto does, which proves the same fallback path.
fn bulk_bytes(suite: &str, backend: BackendChoice) -> usize {
    match (dataplane::ktls::supported(), suite, backend) {
        (true, "TLS13_AES_128_GCM_SHA256", BackendChoice::Epoll) => 100 * 1000 * 1000,
        (true, _, _) => 16 * 1000 * 1000,
        (false, _, _) => 8 * 1024 * 1024,
    }
}

struct Pair {
    _dir: TempDir,
    _echo: Echo,
    a: Proxy,
    b: Proxy,
}

/// The inbound sidecar: strict mTLS on `in`, delivering to `echo`.
fn inbound(identity: &tests::pki::IdentityPaths, echo: &Echo, backend: BackendChoice) -> Proxy {
    start_proxy(
        &format!(
            "{}listeners:\n  - {{ name: in, address: 127.0.0.1:0, protocol: tcp, cluster: app, tls: {{ mode: strict }} }}\nclusters:\n  - {{ name: app, endpoints: [{}] }}\n",
            identity.yaml(),
            echo.addr
        ),
        backend,
    )
}

fn pair(suite: &str, backend: BackendChoice) -> Pair {
    let dir = TempDir::new("ktls");
    let ca = TestCa::new("tern ktls root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let echo = Echo::start();
    let b = inbound(&b_id, &echo, backend);
    let a = start_proxy(
        &format!(
            "{}listeners:\n  - {{ name: out, address: 127.0.0.1:0, protocol: tcp, cluster: b }}\nclusters:\n  - {{ name: b, endpoints: [{}], tls: {{ identity: \"{B}\", cipher_suites: [{suite}] }} }}\n",
            a_id.yaml(),
            b.listener_addr("in").unwrap()
        ),
        backend,
    );
    Pair {
        _dir: dir,
        _echo: echo,
        a,
        b,
    }
}

/// The kernel's kTLS counters (`TlsTxSw`, `TlsRxSw`, ...), or none without kTLS.
fn tls_stat() -> Vec<(String, u64)> {
    std::fs::read_to_string("/proc/net/tls_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.parse().ok()?))
        })
        .collect()
}

fn stat(stats: &[(String, u64)], name: &str) -> u64 {
    stats.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v)
}

/// The mTLS connections the inbound proxy's `metrics` count on its listener `in` in `mode`
/// (`kernel` or `userspace`).
fn inbound_tls(metrics: &str, mode: &str) -> f64 {
    metric(
        metrics,
        &format!("tern_listener_tls_connections_total{{listener=\"in\",mode=\"{mode}\"}}"),
    )
}

/// The mTLS connections the outbound proxy's `metrics` count to its cluster `b` in `mode`.
fn outbound_tls(metrics: &str, mode: &str) -> f64 {
    metric(
        metrics,
        &format!("tern_upstream_tls_connections_total{{cluster=\"b\",mode=\"{mode}\"}}"),
    )
}

fn moves_bytes_exactly(suite: &str, backend: BackendChoice) {
    let kernel = dataplane::ktls::supported();
    if std::env::var_os("TERN_EXPECT_KTLS").is_some() {
        assert!(
            kernel,
            "TERN_EXPECT_KTLS is set but this kernel has no kTLS"
        );
    }
    let before = tls_stat();
    let p = pair(suite, backend);
    let out = p.a.listener_addr("out").unwrap();

    // Bulk, both directions at once: the echo returns every byte while more are sent.
    client::assert_bulk_echo(out, bulk_bytes(suite, backend));

    // Many small messages on one connection: each is its own record.
    let mut stream = client::connect(out);
    for i in 0..2000 {
        let message = format!("small message {i:06}");
        stream.write_all(message.as_bytes()).unwrap();
        let mut reply = vec![0u8; message.len()];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply, message.as_bytes());
    }
    drop(stream);

    let (used, unused) = if kernel {
        ("kernel", "userspace")
    } else {
        ("userspace", "kernel")
    };
    let inbound = wait_for_metric(
        &p.b,
        "tern_listener_active_connections{listener=\"in\"}",
        0.0,
    );
    assert_eq!(inbound_tls(&inbound, used), 2.0, "{inbound}");
    assert_eq!(inbound_tls(&inbound, unused), 0.0);
    let outbound = admin_get(&p.a, "/metrics");
    assert_eq!(outbound_tls(&outbound, used), 2.0, "{outbound}");
    assert_eq!(outbound_tls(&outbound, unused), 0.0);

    // With kTLS both sockets of each proxy carry plain bytes, so bulk directions splice
    // (on epoll: tokio-uring has no splice); with userspace TLS they cannot.
    let spliced = |proxy: &Proxy, listener: &str| {
        metric(
            &admin_get(proxy, "/metrics"),
            &format!("tern_listener_spliced_directions_total{{listener=\"{listener}\"}}"),
        )
    };
    if kernel && backend == BackendChoice::Epoll {
        assert!(
            spliced(&p.a, "out") >= 1.0,
            "the outbound proxy did not splice"
        );
        assert!(
            spliced(&p.b, "in") >= 1.0,
            "the inbound proxy did not splice"
        );
    } else {
        assert_eq!(spliced(&p.a, "out") + spliced(&p.b, "in"), 0.0);
    }
    if kernel {
        // Both proxies put two connections each into kTLS, both directions, and the kernel's
        // own counters say so.
        let after = tls_stat();
        for counter in ["TlsTxSw", "TlsRxSw"] {
            let grown = stat(&after, counter) - stat(&before, counter);
            assert!(grown >= 4, "{counter} grew by {grown}: {after:?}");
        }
        assert_eq!(
            stat(&after, "TlsDecryptError"),
            stat(&before, "TlsDecryptError")
        );
        println!("KTLS-CHECKED {suite} {backend:?}: kernel");
    } else {
        println!("KTLS-CHECKED {suite} {backend:?}: userspace fallback");
    }
}

#[test]
fn aes_128_gcm() {
    moves_bytes_exactly("TLS13_AES_128_GCM_SHA256", BackendChoice::Epoll);
}

#[test]
fn aes_256_gcm() {
    moves_bytes_exactly("TLS13_AES_256_GCM_SHA384", BackendChoice::Epoll);
}

#[test]
fn chacha20_poly1305() {
    moves_bytes_exactly("TLS13_CHACHA20_POLY1305_SHA256", BackendChoice::Epoll);
}

/// The io_uring backend hands mTLS connections to the kernel too (one suite: the record
/// layer is the kernel's whatever the suite).
#[test]
fn aes_128_gcm_on_io_uring() {
    moves_bytes_exactly("TLS13_AES_128_GCM_SHA256", BackendChoice::IoUring);
}

/// A userspace rustls client that sends its first bytes in the same write as its handshake
/// `Finished`: the inbound proxy reads both at once, so records behind the handshake are
/// opened at the hand-off (then the kernel, where there is kTLS, takes over after them), and
/// their plaintext must reach the app first. Closing with `close_notify` must come back
/// as a clean `close_notify` (the kernel side sends it as an alert record).
#[test]
fn data_that_arrives_with_the_handshake_and_close_notify_survive_the_hand_off() {
    let (_dir, _echo, b, config) = inbound_and_mesh_client("ktls-early", BackendChoice::Epoll);
    let mut socket = client::connect(b.listener_addr("in").unwrap());
    let server = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut tls = rustls::ClientConnection::new(config, server).unwrap();
    let early = client::payload(3000);
    // Queued before the handshake ends, so it leaves in the same write as `Finished`.
    tls.writer().write_all(&early).unwrap();
    while tls.is_handshaking() || tls.wants_write() {
        tls.complete_io(&mut socket).unwrap();
    }
    let mut stream = rustls::Stream::new(&mut tls, &mut socket);
    let mut reply = vec![0u8; early.len()];
    stream.read_exact(&mut reply).unwrap();
    assert!(reply == early, "the first bytes were lost or changed");
    stream.write_all(b"and then some").unwrap();
    let mut reply = [0u8; 13];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"and then some");

    tls.send_close_notify();
    tls.complete_io(&mut socket).unwrap();
    // The echo sees end of stream and closes; the proxy ends its side with close_notify,
    // which rustls reports as a clean end (an abrupt close would be an error here).
    let mut rest = Vec::new();
    rustls::Stream::new(&mut tls, &mut socket)
        .read_to_end(&mut rest)
        .expect("a clean close_notify from the proxy");
    assert!(rest.is_empty());
    let mode = tls_mode();
    let inbound = admin_get(&b, "/metrics");
    assert_eq!(inbound_tls(&inbound, mode), 1.0, "{inbound}");
    println!("KTLS-CHECKED early data and close_notify: {mode}");
}

/// Where this kernel puts an mTLS connection's records: `kernel` or `userspace`.
fn tls_mode() -> &'static str {
    if dataplane::ktls::supported() {
        "kernel"
    } else {
        "userspace"
    }
}

/// The inbound sidecar (`B`, strict mTLS in front of an echo) and a rustls client config for
/// a mesh peer (`A`) that expects it, speaking opaque TCP.
fn inbound_and_mesh_client(
    name: &str,
    backend: BackendChoice,
) -> (TempDir, Echo, Proxy, std::sync::Arc<rustls::ClientConfig>) {
    let dir = TempDir::new(name);
    let ca = TestCa::new("tern ktls root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let echo = Echo::start();
    let b = inbound(&b_id, &echo, backend);
    let config = mesh_client_config(&a_id);
    (dir, echo, b, config)
}

/// A rustls client config for the mesh peer `A` (its identity in `a_id`) that expects `B`,
/// speaking opaque TCP.
fn mesh_client_config(a_id: &tests::pki::IdentityPaths) -> std::sync::Arc<rustls::ClientConfig> {
    dataplane::tls::Identity::load(&shared::config::IdentityFiles {
        cert: a_id.cert.clone(),
        key: a_id.key.clone(),
        trust_bundle: a_id.trust_bundle.clone(),
    })
    .unwrap()
    .client_config(B.parse().unwrap(), dataplane::tls::ALPN_TCP, None)
    .unwrap()
}

/// A TCP connection to the inbound proxy's `in` listener and a rustls client for it.
fn connect_over_mtls(
    b: &Proxy,
    config: &std::sync::Arc<rustls::ClientConfig>,
) -> (std::net::TcpStream, rustls::ClientConnection) {
    let socket = client::connect(b.listener_addr("in").unwrap());
    let server = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = rustls::ClientConnection::new(config.clone(), server).unwrap();
    (socket, tls)
}

/// Sends `message` over `tls` and reads it back from the echo behind the proxy.
fn echo(
    tls: &mut rustls::ClientConnection,
    socket: &mut (impl Read + Write),
    message: &[u8],
) -> std::io::Result<()> {
    let mut stream = rustls::Stream::new(tls, socket);
    stream.write_all(message)?;
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply)?;
    assert_eq!(reply, message);
    Ok(())
}

/// A peer that updates its keys mid-connection (a TLS 1.3 KeyUpdate that asks for the
/// proxy's too) is followed: in userspace the bytes after it still cross both ways. Where
/// the kernel holds the keys, the proxy installs the next ones in it; a kernel that cannot
/// rekey a live socket (Linux 6.1, the VM's) refuses them and that connection is reset, while
/// the bytes before the update have arrived and the proxy serves the next connection.
fn a_peer_that_updates_its_keys_is_followed(backend: BackendChoice) {
    let (_dir, _echo, b, config) = inbound_and_mesh_client("ktls-key-update", backend);
    let connect = || connect_over_mtls(&b, &config);
    let (mut socket, mut tls) = connect();
    echo(&mut tls, &mut socket, b"before").unwrap();

    tls.refresh_traffic_keys().unwrap();
    match echo(&mut tls, &mut socket, b"after") {
        Ok(()) => {}
        Err(error) => {
            assert!(
                dataplane::ktls::supported() && !dataplane::ktls::can_rekey(),
                "TLS in userspace, or in a kernel that rekeys, must follow a KeyUpdate: {error}"
            );
            // The proxy reset that connection (neither hung nor sent garbage, nor a clean
            // end the client could take for the whole stream).
            assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
            println!("KTLS-CHECKED this kernel refused updated keys: {error}");
        }
    }
    // The proxy serves the next connection.
    let (mut socket, mut tls) = connect();
    echo(&mut tls, &mut socket, b"next").unwrap();
    println!("KTLS-CHECKED key update {backend:?}: {}", tls_mode());
}

/// A record that does not decrypt, after the hand-off (forged, or corrupted on the way: bad
/// input on an established mTLS connection), ends that connection promptly; the proxy goes
/// on serving the next one. Where the kernel holds the keys, its own counter saw the bad
/// record.
fn a_record_that_does_not_decrypt_ends_only_its_connection(backend: BackendChoice) {
    let (_dir, _echo, b, config) = inbound_and_mesh_client("ktls-forged", backend);
    let connect = || connect_over_mtls(&b, &config);
    let (mut socket, mut tls) = connect();
    echo(&mut tls, &mut socket, b"before").unwrap();
    let before = tls_stat();

    // A well-formed application-data header over 32 bytes that are nobody's ciphertext.
    let mut forged = vec![0x17, 3, 3, 0, 32];
    forged.extend([0x5a; 32]);
    socket.write_all(&forged).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let mut chunk = [0; 256];
    loop {
        match socket.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
            Err(error) => {
                assert_eq!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionReset,
                    "the connection was not ended: {error}"
                );
                break;
            }
        }
    }
    if dataplane::ktls::supported() {
        let grown = stat(&tls_stat(), "TlsDecryptError") - stat(&before, "TlsDecryptError");
        assert_eq!(grown, 1, "the kernel saw the bad record");
    } else {
        // In userspace the proxy said why before it closed (RFC 8446 §5.2). (A kernel that
        // refuses a record leaves the socket in error, so no alert can follow.)
        tls.read_tls(&mut &rest[..]).unwrap();
        assert_eq!(
            tls.process_new_packets().err(),
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::BadRecordMac
            )),
            "{} bytes before the end",
            rest.len()
        );
    }

    let (mut socket, mut tls) = connect();
    echo(&mut tls, &mut socket, b"next").unwrap();
    println!("KTLS-CHECKED bad record {backend:?}: {}", tls_mode());
}

/// A server that sends TLS 1.3 session tickets after the handshake (Tern's sidecars do not,
/// any other TLS 1.3 server may) does not break the client side: the tickets arrive after
/// the hand-off, as control records where the kernel holds the keys, and go to rustls; the
/// bytes after them still cross both ways.
fn session_tickets_after_the_hand_off_are_taken(backend: BackendChoice) {
    let dir = TempDir::new("ktls-tickets");
    let ca = TestCa::new("tern ktls root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);
    let identity = dataplane::tls::Identity::load(&shared::config::IdentityFiles {
        cert: b_id.cert.clone(),
        key: b_id.key.clone(),
        trust_bundle: b_id.trust_bundle.clone(),
    })
    .unwrap();
    let mut config = (*identity.server_config()).clone();
    config.send_tls13_tickets = 2;
    let config = std::sync::Arc::new(config);
    // The far end: a rustls server that echoes one message.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server_addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut tls = rustls::ServerConnection::new(config).unwrap();
        let mut stream = rustls::Stream::new(&mut tls, &mut socket);
        let mut message = [0u8; 5];
        stream.read_exact(&mut message).unwrap();
        stream.write_all(&message).unwrap();
        stream.flush().unwrap();
        message
    });
    let a = start_proxy(
        &format!(
            "{}listeners:\n  - {{ name: out, address: 127.0.0.1:0, protocol: tcp, cluster: b }}\nclusters:\n  - {{ name: b, endpoints: [{server_addr}], tls: {{ identity: \"{B}\" }} }}\n",
            a_id.yaml(),
        ),
        backend,
    );
    let mut app = client::connect(a.listener_addr("out").unwrap());
    app.write_all(b"hello").unwrap();
    let mut reply = [0u8; 5];
    app.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"hello");
    assert_eq!(&server.join().unwrap(), b"hello");
    let mode = tls_mode();
    let outbound = admin_get(&a, "/metrics");
    assert_eq!(outbound_tls(&outbound, mode), 1.0, "{outbound}");
    println!("KTLS-CHECKED session tickets {backend:?}: {mode}");
}

both_backends!(
    a_peer_that_updates_its_keys_is_followed,
    a_record_that_does_not_decrypt_ends_only_its_connection,
    session_tickets_after_the_hand_off_are_taken,
    the_sender_updates_its_keys_before_their_limit,
);

/// `suite` with a confidentiality limit of `limit` records per key, so a test reaches the
/// limit in a few dozen records rather than 2^24.
fn with_limit(suite: rustls::SupportedCipherSuite, limit: u64) -> rustls::SupportedCipherSuite {
    let rustls::SupportedCipherSuite::Tls13(suite) = suite else {
        unreachable!("a TLS 1.3 suite")
    };
    let worn: &'static rustls::Tls13CipherSuite = Box::leak(Box::new(rustls::Tls13CipherSuite {
        common: rustls::CipherSuiteCommon {
            confidentiality_limit: limit,
            ..suite.common
        },
        hkdf_provider: suite.hkdf_provider,
        aead_alg: suite.aead_alg,
        quic: None,
    }));
    rustls::SupportedCipherSuite::Tls13(worn)
}

/// What came of echoing messages through Tern's record layer with worn-out keys.
struct Worn {
    /// Messages that came back.
    echoed: usize,
    /// Why the peer stopped early, if it did.
    failure: Option<std::io::Error>,
    /// Tern's side: its record layer (`kernel` or `userspace`), or its error.
    tern: std::io::Result<&'static str>,
    /// The lengths of the records Tern's side sent.
    records: Vec<usize>,
}

/// Tern's side, on `backend`, is the server of a connection of `suite` lowered to `limit`
/// records per key, echoing `messages` messages (a record each) from a rustls peer.
fn echo_with_worn_keys(
    backend: BackendChoice,
    suite: rustls::SupportedCipherSuite,
    limit: u64,
    messages: usize,
) -> Worn {
    let dir = TempDir::new("ktls-limit");
    let ca = TestCa::new("tern ktls root");
    let a_id = ca.write_identity(&dir.0, "a", A, &[&ca], false);
    let b_id = ca.write_identity(&dir.0, "b", B, &[&ca], false);

    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![with_limit(suite, limit)];
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(&b_id.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&b_id.key).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = 0;
    let server = std::sync::Arc::new(server);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    // Tern's side: a handshake, the record layer the proxy would give the connection, and
    // an echo of what it reads.
    let tern = std::thread::spawn(move || -> std::io::Result<&'static str> {
        match backend {
            BackendChoice::IoUring => Uring::block_on(echo_once::<Uring>(listener, server))?,
            BackendChoice::Epoll => Epoll::block_on(echo_once::<Epoll>(listener, server))?,
            BackendChoice::Auto => unreachable!("the tests name their backend"),
        }
    });

    let config = mesh_client_config(&a_id);
    let mut socket = Tap {
        socket: client::connect(addr),
        read: Vec::new(),
    };
    let mut tls = rustls::ClientConnection::new(
        config,
        rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    )
    .unwrap();
    let mut echoed = 0;
    let mut failure = None;
    for i in 0..messages {
        match echo(&mut tls, &mut socket, format!("message {i:04}").as_bytes()) {
            Ok(()) => echoed += 1,
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    if failure.is_none() {
        tls.send_close_notify();
        tls.write_tls(&mut socket).unwrap();
    }
    Worn {
        echoed,
        failure,
        tern: tern.join().unwrap(),
        records: record_lengths(&socket.read).collect(),
    }
}

/// Accepts one connection on `listener` as a TLS server with `server`, hands it to the
/// record layer the proxy would give it and echoes what it reads; returns that layer.
async fn echo_once<B: Backend>(
    listener: std::net::TcpListener,
    server: std::sync::Arc<rustls::ServerConfig>,
) -> std::io::Result<&'static str> {
    let listener = B::listener(listener)?;
    let (stream, _) = listener.accept().await?;
    let tls = Handshake::server(stream, server, Vec::new())?
        .run_within(Duration::from_secs(20))
        .await?
        .into_record_layer()?;
    let mode = match &tls {
        MaybeTls::Kernel(_) => "kernel",
        MaybeTls::User(_) => "userspace",
        _ => "plain",
    };
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.clear();
        let (read, back) = tls.read(buf).await;
        buf = back;
        if read? == 0 {
            break;
        }
        let len = buf.len();
        let (written, back) = tls.write_all(buf, 0..len).await;
        buf = back;
        written?;
    }
    tls.close_write().await?;
    Ok(mode)
}

/// The sending side of Tern's record layer updates its own keys before they protect more
/// records than its cipher allows: for each suite, Tern's side of a connection whose keys
/// may protect 64 records echoes 1000 messages (a record each) to a rustls peer, which must
/// follow every KeyUpdate for the bytes to cross. In userspace and in a kernel that rekeys,
/// all of them cross, no key protects more than 64 records (KeyUpdates counted on the
/// wire), and the kernel counts its rekeys; a kernel that cannot rekey ends the connection
/// at the limit, never past it, with an error that says why.
fn the_sender_updates_its_keys_before_their_limit(backend: BackendChoice) {
    use rustls::crypto::aws_lc_rs::cipher_suite as suites;
    const LIMIT: u64 = 64;
    const MESSAGES: usize = 1000;
    // A KeyUpdate (5 bytes, type and tag) is the only 22-byte record Tern's side sends.
    const KEY_UPDATE: usize = 5 + 1 + 16;
    let kernel = dataplane::ktls::supported();
    let mut rekeys = 0;
    for suite in [
        suites::TLS13_AES_128_GCM_SHA256,
        suites::TLS13_AES_256_GCM_SHA384,
        suites::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let before = tls_stat();
        let worn = echo_with_worn_keys(backend, suite, LIMIT, MESSAGES);
        let after = tls_stat();
        let name = format!("{:?} {backend:?}", suite.suite());
        let updates: Vec<usize> = worn
            .records
            .iter()
            .enumerate()
            .filter(|(_, length)| **length == KEY_UPDATE)
            .map(|(at, _)| at)
            .collect();

        if kernel && !dataplane::ktls::can_rekey() {
            // Ended when the next send might have passed the limit (a 12-byte message
            // bounds 12 records): not after, and not long before.
            let error = worn
                .tern
                .expect_err("a kernel that cannot rekey ends the connection");
            assert!(
                error.to_string().contains("cannot update"),
                "{name}: {error}"
            );
            assert!(worn.failure.is_some(), "{name}: the peer saw the end");
            assert!(
                (48..=LIMIT as usize - 13).contains(&worn.echoed),
                "{name}: {} echoed",
                worn.echoed
            );
            assert!(
                updates.is_empty(),
                "{name}: no KeyUpdate the kernel cannot follow"
            );
            println!("KTLS-CHECKED own key update {name}: kernel, refused by this kernel: {error}");
            continue;
        }
        assert!(
            worn.failure.is_none(),
            "{name}: {} echoed: {:?}; {:?}",
            worn.echoed,
            worn.failure,
            worn.tern
        );
        assert_eq!(worn.echoed, MESSAGES, "{name}");
        assert_eq!(worn.tern.unwrap(), tls_mode(), "{name}");
        // Between two KeyUpdates, one key: at most 64 records (the second KeyUpdate among
        // them), and not far fewer (no update sooner than 7/8 of the limit would need).
        assert!(
            updates.len() >= MESSAGES / LIMIT as usize,
            "{name}: {} KeyUpdates",
            updates.len()
        );
        for pair in updates.windows(2) {
            let records = pair[1] - pair[0];
            assert!(
                (LIMIT as usize / 2..=LIMIT as usize).contains(&records),
                "{name}: a key protected {records} records"
            );
        }
        if kernel {
            let counted = stat(&after, "TlsTxRekeyOk") - stat(&before, "TlsTxRekeyOk");
            assert_eq!(counted as usize, updates.len(), "{name}: {after:?}");
            rekeys += counted;
        }
        println!("KTLS-CHECKED own key update {name}: {}", tls_mode());
    }
    if kernel && dataplane::ktls::can_rekey() {
        println!("KTLS-CHECKED own key update {backend:?}: kernel, {rekeys} rekeys");
    }
}

/// A socket that keeps a copy of what it reads.
struct Tap {
    socket: std::net::TcpStream,
    read: Vec<u8>,
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.socket.read(buf)?;
        self.read.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.socket.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.socket.flush()
    }
}

/// The lengths of the TLS records in `bytes`.
fn record_lengths(mut bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    std::iter::from_fn(move || {
        let [_, _, _, high, low, rest @ ..] = bytes else {
            return None;
        };
        let length = usize::from(u16::from_be_bytes([*high, *low]));
        bytes = rest.get(length..)?;
        Some(length)
    })
}

/// Some clusters boot their nodes without IPv6 (`ipv6.disable=1`), where `[::]` cannot be
/// bound at all: an intercepting proxy must then bind its IPv4 interception sockets, leave
/// the IPv6 ones and serve, not fail to start. Where the kernel has IPv6 it binds both. The
/// VM harness boots Debian 12's kernel without IPv6 and the newer one with it, and checks
/// which of the two this test saw in each.
#[test]
fn interception_binds_ipv6_only_where_the_kernel_has_it() {
    // Interception ports are fixed ones (the rules name them): two free ones, held together
    // so that they differ.
    let held = [(); 2].map(|()| std::net::TcpListener::bind("0.0.0.0:0").unwrap());
    let [outbound, inbound] = held.each_ref().map(|l| l.local_addr().unwrap().port());
    drop(held);
    let proxy = start_proxy(
        &format!(
            "interception: {{ outbound_port: {outbound}, inbound_port: {inbound}, inbound_tls: {{ mode: disable }} }}\n"
        ),
        BackendChoice::Epoll,
    );
    tests::wait_ready(&proxy, Duration::from_secs(10));
    // Without IPv6 in the kernel there are no IPv6 sockets at all.
    let kernel_has_ipv6 =
        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).is_ok();
    for direction in ["outbound", "inbound"] {
        let v4 = proxy
            .listener_addr(&format!("intercept-{direction}"))
            .unwrap_or_else(|| panic!("the IPv4 {direction} interception socket is bound"));
        assert!(v4.is_ipv4(), "{v4}");
        // A worker takes the connection: made straight to the interception port (not
        // redirected), it has no destination of its own and is refused as such.
        let _connection = std::net::TcpStream::connect(v4).unwrap();
        wait_for_metric(
            &proxy,
            &format!("tern_errors_total{{listener=\"intercept-{direction}\",flag=\"NR\"}}"),
            1.0,
        );
        let v6 = proxy.listener_addr(&format!("intercept-{direction}-v6"));
        assert_eq!(
            v6.is_some(),
            kernel_has_ipv6,
            "{direction}: IPv6 interception socket {v6:?}, kernel has IPv6: {kernel_has_ipv6}"
        );
    }
    if kernel_has_ipv6 {
        println!("KTLS-CHECKED interception: IPv4 and IPv6");
    } else {
        println!("KTLS-CHECKED interception: IPv4 only, this kernel has no IPv6");
    }
}
