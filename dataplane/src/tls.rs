//! Mutual TLS between sidecars: SPIFFE identities on both ends, TLS 1.3 handshakes through
//! rustls, and [`MaybeTls`], the stream the proxy holds where a connection may or may not be
//! TLS. It speaks the same owned-buffer [`Stream`] interface as a plain socket, so the proxy
//! logic runs unchanged over either.
//!
//! This module owns loading this proxy's identity (certificate chain, key, trust bundle),
//! verifying a peer's chain and SPIFFE ID, and the handshake ([`Handshake`]). After the
//! handshake the record layer is the kernel's ([`crate::ktls`]) or Tern's own in userspace
//! ([`crate::usertls`]); rustls is not used for records. It does not decide which connections
//! are TLS; listener and cluster config do.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::unbuffered::{
    ConnectionState, EncodeError, UnbufferedConnectionCommon, UnbufferedStatus,
};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use shared::SpiffeId;
use shared::config::IdentityFiles;

use crate::io::{BufResult, Stream};

/// ALPN for opaque TCP inside the tunnel. Every mesh ALPN starts `tern-`, so a permissive
/// port tells a peer sidecar's ClientHello from an application's own TLS.
pub const ALPN_TCP: &[u8] = b"tern-tcp";
/// ALPN for HTTP/1.1 inside the tunnel.
pub const ALPN_HTTP1: &[u8] = b"tern-http/1.1";
/// ALPN for HTTP/2 (and gRPC) inside the tunnel.
pub const ALPN_HTTP2: &[u8] = b"tern-h2";

/// What the first TLS record of a connection says about who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// Not all of the record has arrived.
    Partial,
    /// A ClientHello offering a mesh ALPN (`tern-…`): a peer sidecar.
    Mesh,
    /// Anything else: the application's own TLS (or not TLS at all).
    Other,
}

/// Reads a TLS ClientHello record (RFC 8446 §4.1.2) far enough to see whether it offers a
/// mesh ALPN. Bounds-checked throughout; a ClientHello split over several records is not a
/// sidecar's (those are small).
pub fn classify_hello(bytes: &[u8]) -> Hello {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (input.get(..n)?, input.get(n..)?);
        *input = rest;
        Some(head)
    }
    fn length(input: &mut &[u8], width: usize) -> Option<usize> {
        Some(
            take(input, width)?
                .iter()
                .fold(0, |n, &b| n << 8 | usize::from(b)),
        )
    }
    match bytes.first() {
        None => return Hello::Partial,
        Some(&crate::usertls::HANDSHAKE) => {}
        Some(_) => return Hello::Other,
    }
    let Some(header) = bytes.get(..5) else {
        return Hello::Partial;
    };
    let record_len = usize::from(header[3]) << 8 | usize::from(header[4]);
    let Some(record) = bytes.get(5..5 + record_len) else {
        return Hello::Partial;
    };
    let offers = (|| -> Option<bool> {
        let mut input = record;
        if take(&mut input, 1)? != [1] {
            return Some(false);
        }
        let hello_len = length(&mut input, 3)?;
        if hello_len > input.len() {
            // Continued in the next record: no sidecar's hello is that large.
            return Some(false);
        }
        let mut hello = take(&mut input, hello_len)?;
        take(&mut hello, 2 + 32)?;
        let session = length(&mut hello, 1)?;
        take(&mut hello, session)?;
        let suites = length(&mut hello, 2)?;
        take(&mut hello, suites)?;
        let compression = length(&mut hello, 1)?;
        take(&mut hello, compression)?;
        let extensions_len = length(&mut hello, 2)?;
        let mut extensions = take(&mut hello, extensions_len)?;
        while !extensions.is_empty() {
            let kind = length(&mut extensions, 2)?;
            let len = length(&mut extensions, 2)?;
            let mut data = take(&mut extensions, len)?;
            if kind != 16 {
                continue;
            }
            let list_len = length(&mut data, 2)?;
            let mut list = take(&mut data, list_len)?;
            while !list.is_empty() {
                let len = length(&mut list, 1)?;
                if take(&mut list, len)?.starts_with(b"tern-") {
                    return Some(true);
                }
            }
        }
        Some(false)
    })();
    match offers {
        Some(true) => Hello::Mesh,
        Some(false) | None => Hello::Other,
    }
}
/// Ciphertext read size during the handshake.
const HANDSHAKE_READ: usize = 18 * 1024;
/// The longest record rustls takes (a TLS 1.2-sized ciphertext record); a longer header is
/// garbage.
const MAX_RECORD: usize = 16 * 1024 + 2048;

/// Why an identity could not be loaded or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{what} {path}: {message}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The certificate carries no usable SPIFFE ID.
    #[error("certificate: {0}")]
    Identity(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// This proxy's workload identity and the TLS configurations built from it.
#[derive(Debug)]
pub struct Identity {
    /// Who this proxy is.
    pub id: SpiffeId,
    /// The validity of this proxy's certificate.
    pub validity: Validity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    server: Arc<rustls::ServerConfig>,
}

fn read_pem<T>(
    what: &'static str,
    path: &Path,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, TlsError> {
    let fail = |message: String| TlsError::File {
        what,
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    parse(&bytes).map_err(fail)
}

fn certificates(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        Err("no certificate in the file".into())
    } else {
        Ok(certs)
    }
}

/// When a certificate is valid, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Validity {
    /// Not before.
    pub not_before: i64,
    /// Not after.
    pub not_after: i64,
}

impl Validity {
    /// Seconds until expiry (negative once expired).
    pub fn remaining(&self, now: std::time::SystemTime) -> i64 {
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.not_after - now
    }

    /// Whether less than a fifth of the lifetime (or under an hour) is left: time to say so.
    pub fn expiring(&self, now: std::time::SystemTime) -> bool {
        let remaining = self.remaining(now);
        remaining < 3600 || remaining * 5 < (self.not_after - self.not_before)
    }
}

/// The validity period of a certificate.
pub fn validity_of(cert: &CertificateDer<'_>) -> Result<Validity, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let validity = parsed.validity();
    Ok(Validity {
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

impl Identity {
    /// The certificate chain and the key, PEM (to present as a TLS client certificate
    /// through tonic, which takes PEM).
    pub fn to_pem(&self) -> (String, String) {
        let chain = self
            .chain
            .iter()
            .map(|cert| pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec())))
            .collect();
        let label = match &self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        let key = pem::encode(&pem::Pem::new(label, self.key.secret_der().to_vec()));
        (chain, key)
    }

    /// Loads an identity from PEM files and builds its server configuration.
    pub fn load(files: &IdentityFiles) -> Result<Identity, TlsError> {
        let chain = read_pem("certificate", &files.cert, certificates)?;
        let key = read_pem("key", &files.key, |b| {
            PrivateKeyDer::from_pem_slice(b).map_err(|e| e.to_string())
        })?;
        let bundle = read_pem("trust bundle", &files.trust_bundle, certificates)?;
        let mut roots = RootCertStore::empty();
        for cert in bundle {
            roots.add(cert).map_err(|e| TlsError::File {
                what: "trust bundle",
                path: files.trust_bundle.display().to_string(),
                message: e.to_string(),
            })?;
        }
        let id = SpiffeId::of_certificate(&chain[0]).map_err(TlsError::Identity)?;
        Identity::new(id, chain, key, roots)
    }

    /// Builds an identity from parts already in memory.
    pub fn new(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<Identity, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots = Arc::new(roots);
        let chain_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        let client_verifier = Arc::new(MeshClientVerifier {
            chain: chain_verifier,
            trust_domain: id.trust_domain().to_owned(),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN_TCP.to_vec(), ALPN_HTTP1.to_vec(), ALPN_HTTP2.to_vec()];
        // Tickets arrive after the handshake as records a kernel-TLS receiver cannot take;
        // sidecars reconnect rarely, so resumption is not worth them.
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        let validity = validity_of(&chain[0]).map_err(TlsError::Identity)?;
        Ok(Identity {
            id,
            validity,
            chain,
            key,
            roots,
            provider,
            server: Arc::new(server),
        })
    }

    /// The configuration for accepting mTLS from peers.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// A configuration for connecting to a peer that must prove `expected`, speaking `alpn`,
    /// offering `suites` (all of them when `None`).
    pub fn client_config(
        &self,
        expected: SpiffeId,
        alpn: &[u8],
        suites: Option<&[shared::config::CipherSuite]>,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let verifier = Arc::new(SpiffeVerifier {
            roots: self.roots.clone(),
            expected,
            algorithms: self.provider.signature_verification_algorithms,
        });
        let provider = match suites {
            None => self.provider.clone(),
            Some(suites) => {
                use rustls::crypto::aws_lc_rs::cipher_suite as suites;
                use shared::config::CipherSuite as Suite;
                let mut provider = (*self.provider).clone();
                provider.cipher_suites = suites
                    .iter()
                    .map(|suite| match suite {
                        Suite::Aes128GcmSha256 => suites::TLS13_AES_128_GCM_SHA256,
                        Suite::Aes256GcmSha384 => suites::TLS13_AES_256_GCM_SHA384,
                        Suite::Chacha20Poly1305Sha256 => suites::TLS13_CHACHA20_POLY1305_SHA256,
                    })
                    .collect();
                Arc::new(provider)
            }
        };
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        client.alpn_protocols = vec![alpn.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_secret_extraction = true;
        Ok(Arc::new(client))
    }
}

/// Checks a server's chain against the trust bundle and its SPIFFE ID against the one the
/// route expects. DNS names play no part: SPIFFE certificates carry a URI SAN instead.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = SpiffeId::of_certificate(end_entity).map_err(invalid_certificate)?;
        if id != self.expected {
            return Err(invalid_certificate(format!(
                "peer is {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// An invalid-certificate error carrying `message`.
fn invalid_certificate(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(io::Error::other(message)),
    )))
}

/// Checks a client's chain against the trust bundle (webpki, as rustls does), then that the
/// client is a workload of this mesh: its certificate carries exactly one SPIFFE ID, in this
/// proxy's trust domain. A certificate that merely chains to a root in the bundle — one an
/// operator's own root issued for something else, say — is not a peer sidecar's.
#[derive(Debug)]
struct MeshClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = SpiffeId::of_certificate(end_entity)
            .map_err(|e| invalid_certificate(format!("peer has no SPIFFE ID: {e}")))?;
        if id.trust_domain() != self.trust_domain {
            return Err(invalid_certificate(format!(
                "peer {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The rustls side of a TLS 1.3 handshake, with no IO: ciphertext in, records out.
///
/// rustls' unbuffered connection is offered one whole record at a time (the next one too only
/// while a handshake message spans records) and nothing once the handshake is done, so every
/// record after it stays in `incoming`, undecrypted, for the record layer to take.
pub(crate) struct HandshakeState {
    conn: Unbuffered,
    /// Ciphertext read from the peer and not yet taken by rustls.
    pub(crate) incoming: Vec<u8>,
    /// How much of the start of `incoming` rustls has been offered and still holds.
    offered: usize,
    /// Records to send to the peer, in order.
    pub(crate) outgoing: Vec<u8>,
}

enum Unbuffered {
    Client(rustls::client::UnbufferedClientConnection),
    Server(rustls::server::UnbufferedServerConnection),
}

/// What a handshake needs once its `outgoing` records are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// More ciphertext from the peer, appended to `incoming`.
    Read,
    /// Nothing: the handshake is done.
    Done,
}

/// A finished handshake, taken apart for the record layer.
pub(crate) struct Session {
    pub secrets: rustls::ExtractedSecrets,
    pub schedule: KeySchedule,
    /// The confidentiality limit of the negotiated cipher, in records per key.
    pub limit: u64,
    /// Ciphertext that came after the handshake.
    pub incoming: Vec<u8>,
}

fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

impl HandshakeState {
    pub(crate) fn client(
        config: Arc<rustls::ClientConfig>,
        server: ServerName<'static>,
    ) -> io::Result<HandshakeState> {
        let conn =
            rustls::client::UnbufferedClientConnection::new(config, server).map_err(tls_error)?;
        Ok(HandshakeState::new(Unbuffered::Client(conn), Vec::new()))
    }

    /// The server side; `read` holds ciphertext already read from the client.
    pub(crate) fn server(
        config: Arc<rustls::ServerConfig>,
        read: Vec<u8>,
    ) -> io::Result<HandshakeState> {
        let conn = rustls::server::UnbufferedServerConnection::new(config).map_err(tls_error)?;
        Ok(HandshakeState::new(Unbuffered::Server(conn), read))
    }

    fn new(conn: Unbuffered, incoming: Vec<u8>) -> HandshakeState {
        HandshakeState {
            conn,
            incoming,
            offered: 0,
            outgoing: Vec::new(),
        }
    }

    /// Gives rustls the records it can take from `incoming` and appends what it has to send
    /// to `outgoing`. On an error, `outgoing` ends with the alert for the peer, if any.
    pub(crate) fn advance(&mut self) -> io::Result<Progress> {
        let HandshakeState {
            conn,
            incoming,
            offered,
            outgoing,
        } = self;
        let progress = match conn {
            Unbuffered::Client(conn) => advance(conn, incoming, offered, outgoing),
            Unbuffered::Server(conn) => advance(conn, incoming, offered, outgoing),
        };
        if progress.is_err() {
            // rustls queues its alert and hands it out on the next call (which must see the
            // same buffer: rustls may hold part of it).
            let _ = match conn {
                Unbuffered::Client(conn) => advance(conn, incoming, offered, outgoing),
                Unbuffered::Server(conn) => advance(conn, incoming, offered, outgoing),
            };
        }
        progress
    }

    fn common(&self) -> &rustls::CommonState {
        match &self.conn {
            Unbuffered::Client(conn) => conn,
            Unbuffered::Server(conn) => conn,
        }
    }

    /// The peer's SPIFFE ID.
    pub(crate) fn peer_id(&self) -> Option<SpiffeId> {
        let certs = self.common().peer_certificates()?;
        SpiffeId::of_certificate(certs.first()?).ok()
    }

    /// The negotiated ALPN protocol.
    pub(crate) fn alpn(&self) -> Option<Vec<u8>> {
        self.common().alpn_protocol().map(<[u8]>::to_vec)
    }

    /// Takes the finished session out of rustls: its keys, its key schedule, and the
    /// ciphertext that followed the handshake.
    pub(crate) fn finish(self) -> io::Result<Session> {
        let common = self.common();
        if common.is_handshaking() || self.offered != 0 || !self.outgoing.is_empty() {
            return Err(io::Error::other("the TLS handshake has not finished"));
        }
        let limit = common
            .negotiated_cipher_suite()
            .and_then(|suite| suite.tls13())
            .map_or(u64::MAX, |suite| suite.common.confidentiality_limit);
        let (secrets, schedule) = match self.conn {
            Unbuffered::Client(conn) => conn
                .dangerous_into_kernel_connection()
                .map(|(secrets, conn)| (secrets, KeySchedule::Client(conn))),
            Unbuffered::Server(conn) => conn
                .dangerous_into_kernel_connection()
                .map(|(secrets, conn)| (secrets, KeySchedule::Server(conn))),
        }
        .map_err(tls_error)?;
        Ok(Session {
            secrets,
            schedule,
            limit,
            incoming: self.incoming,
        })
    }
}

/// The two sides of rustls' unbuffered API, which differ only in type.
trait UnbufferedSide: std::ops::Deref<Target = UnbufferedConnectionCommon<Self::Data>> {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl UnbufferedSide for rustls::client::UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl UnbufferedSide for rustls::server::UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// What one call into rustls asked for.
enum Step {
    /// Call again.
    Again,
    /// More records.
    Blocked,
    /// It could send application data (the handshake may still wait for the client).
    Traffic,
}

/// Drives `conn` over the records in `incoming` ([`HandshakeState::advance`]).
fn advance<C: UnbufferedSide>(
    conn: &mut C,
    incoming: &mut Vec<u8>,
    offered: &mut usize,
    outgoing: &mut Vec<u8>,
) -> io::Result<Progress> {
    loop {
        let status = conn.process(&mut incoming[..*offered]);
        let discard = status.discard;
        let step = match status.state {
            Err(error) => Err(tls_error(error)),
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                let start = outgoing.len();
                let mut room = 4096;
                loop {
                    outgoing.resize(start + room, 0);
                    match data.encode(&mut outgoing[start..]) {
                        Ok(written) => {
                            outgoing.truncate(start + written);
                            break Ok(Step::Again);
                        }
                        Err(EncodeError::InsufficientSize(size)) if size.required_size > room => {
                            room = size.required_size;
                        }
                        Err(error) => {
                            outgoing.truncate(start);
                            break Err(io::Error::other(error));
                        }
                    }
                }
            }
            // The caller sends `outgoing` before it reads again.
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                Ok(Step::Again)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::Blocked),
            Ok(ConnectionState::WriteTraffic(_)) => Ok(Step::Traffic),
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed during the TLS handshake",
            )),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "application data during the TLS handshake",
            )),
        };
        incoming.drain(..discard);
        *offered -= discard;
        match step? {
            Step::Again => {}
            Step::Traffic if !conn.is_handshaking() => return Ok(Progress::Done),
            // A server may send before the client's Finished; it still waits for it.
            Step::Blocked | Step::Traffic => match next_record_end(incoming, *offered) {
                Some(end) => *offered = end,
                None => return Ok(Progress::Read),
            },
        }
    }
}

/// Where the whole record at `from` in `ciphertext` ends, if it is all there. A header
/// longer than any record is offered whole, for rustls' error.
fn next_record_end(ciphertext: &[u8], from: usize) -> Option<usize> {
    let header = ciphertext.get(from..from + 5)?;
    let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if length > MAX_RECORD {
        Some(ciphertext.len())
    } else {
        Some(from + 5 + length).filter(|&end| end <= ciphertext.len())
    }
}

/// What rustls keeps of a session after its handshake: the traffic secrets' schedule, for
/// KeyUpdates, and (on a client) where a session ticket goes.
pub(crate) enum KeySchedule {
    Client(KernelConnection<rustls::client::ClientConnectionData>),
    Server(KernelConnection<rustls::server::ServerConnectionData>),
}

impl KeySchedule {
    /// The next sending keys, after a KeyUpdate this side sends.
    pub(crate) fn next_tx(&mut self) -> io::Result<rustls::ConnectionTrafficSecrets> {
        let (_, secrets) = match self {
            KeySchedule::Client(conn) => conn.update_tx_secret(),
            KeySchedule::Server(conn) => conn.update_tx_secret(),
        }
        .map_err(tls_error)?;
        Ok(secrets)
    }

    /// The next receiving keys, after a KeyUpdate from the peer.
    pub(crate) fn next_rx(&mut self) -> io::Result<rustls::ConnectionTrafficSecrets> {
        let (_, secrets) = match self {
            KeySchedule::Client(conn) => conn.update_rx_secret(),
            KeySchedule::Server(conn) => conn.update_rx_secret(),
        }
        .map_err(tls_error)?;
        Ok(secrets)
    }

    /// A NewSessionTicket's body, from a server. Tern's clients do not resume, so rustls
    /// checks it and drops it.
    pub(crate) fn ticket(&mut self, body: &[u8]) -> io::Result<()> {
        match self {
            KeySchedule::Client(conn) => conn.handle_new_session_ticket(body).map_err(tls_error),
            KeySchedule::Server(_) => Err(crate::usertls::refused(
                crate::usertls::UNEXPECTED_MESSAGE,
                "a TLS client sent a session ticket",
            )),
        }
    }
}

/// A TLS 1.3 handshake over a [`Stream`] (`HandshakeState` and the IO it needs);
/// [`Handshake::into_record_layer`] then gives the connection its record layer: the
/// kernel's, or Tern's own in userspace.
pub struct Handshake<S> {
    inner: S,
    state: HandshakeState,
}

impl<S: Stream> Handshake<S> {
    /// The client side of a connection to `server` (its IP names it; no SNI is sent).
    pub fn client(
        inner: S,
        config: Arc<rustls::ClientConfig>,
        server: std::net::IpAddr,
    ) -> io::Result<Handshake<S>> {
        let state = HandshakeState::client(config, ServerName::IpAddress(server.into()))?;
        Ok(Handshake { inner, state })
    }

    /// The server side of a connection; `read` holds bytes already read from the client.
    pub fn server(
        inner: S,
        config: Arc<rustls::ServerConfig>,
        read: Vec<u8>,
    ) -> io::Result<Handshake<S>> {
        let state = HandshakeState::server(config, read)?;
        Ok(Handshake { inner, state })
    }

    /// Runs the handshake within `timeout`; on timeout or failure the socket is shut down
    /// (an abandoned io_uring read would otherwise keep it open).
    pub async fn run_within(mut self, timeout: std::time::Duration) -> io::Result<Handshake<S>> {
        match tokio::time::timeout(timeout, self.run()).await {
            Ok(Ok(())) => Ok(self),
            Ok(Err(error)) => {
                let _ = self.inner.shutdown(Shutdown::Both);
                Err(error)
            }
            Err(_) => {
                let _ = self.inner.shutdown(Shutdown::Both);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no TLS handshake within the timeout",
                ))
            }
        }
    }

    /// Completes the handshake.
    async fn run(&mut self) -> io::Result<()> {
        loop {
            let progress = self.state.advance();
            // Records first, an alert included: the peer learns why.
            let sent = self.send().await;
            match progress? {
                Progress::Done => return sent,
                Progress::Read => sent?,
            }
            let mut buf = std::mem::take(&mut self.state.incoming);
            buf.reserve(HANDSHAKE_READ);
            let (read, back) = self.inner.read(buf).await;
            self.state.incoming = back;
            if read? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                ));
            }
        }
    }

    /// Sends the records the handshake has ready.
    async fn send(&mut self) -> io::Result<()> {
        if self.state.outgoing.is_empty() {
            return Ok(());
        }
        crate::io::write_out(&self.inner, &mut self.state.outgoing, HANDSHAKE_READ).await
    }

    /// Shuts the socket down (a peer refused after the handshake).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }

    /// The peer's SPIFFE ID.
    pub fn peer_id(&self) -> Option<SpiffeId> {
        self.state.peer_id()
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.state.alpn()
    }

    /// Takes the session's keys out of rustls and gives the connection its record layer:
    /// the kernel's (kTLS) when this kernel, this backend and the connection allow it, else
    /// Tern's own in userspace. Call it after the handshake and after reading
    /// [`Self::peer_id`] and [`Self::alpn`].
    ///
    /// An error leaves the connection unusable (the kernel refused its keys, or the cipher is
    /// unknown); it must be closed.
    pub fn into_record_layer(self) -> io::Result<MaybeTls<S>> {
        let Handshake { inner, state } = self;
        let Session {
            secrets,
            schedule,
            limit,
            incoming,
        } = state.finish()?;
        let unsupported = || {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "the negotiated TLS cipher has no record layer here",
            )
        };
        let mut after = crate::usertls::AfterHandshake::new(schedule);
        let mut opener =
            crate::usertls::Opener::new(secrets.rx.0, &secrets.rx.1).ok_or_else(unsupported)?;
        // Records that came with the end of the handshake are opened here, so the kernel can
        // take over after them.
        let leftover = crate::usertls::Leftover::open(&mut opener, &mut after, incoming)?;
        if leftover.kernel_may_take_over()
            && crate::ktls::supported()
            && let Some(socket) = inner.kernel_tls_socket()
            && let Some(tx) = crate::ktls::keys(secrets.tx.0, &secrets.tx.1)
            && let Some(rx) = crate::ktls::keys(opener.sequence(), &secrets.rx.1)
        {
            match crate::sys::attach_tls_ulp(socket) {
                // Until the first key is in, the socket is still plain TCP: a kernel that
                // refuses this cipher (ChaCha20 before Linux 5.11, say) leaves the connection
                // to userspace. After it, a refusal is fatal.
                Ok(()) => match crate::sys::install_ktls_keys(socket, libc::TLS_TX, &tx) {
                    Ok(()) => {
                        crate::sys::install_ktls_keys(socket, libc::TLS_RX, &rx)?;
                        let kernel = crate::ktls::KernelTls::new(
                            inner,
                            leftover.pending,
                            after,
                            limit,
                            secrets.tx.0,
                        );
                        return Ok(MaybeTls::Kernel(Box::new(kernel)));
                    }
                    Err(error) => {
                        tracing::debug!(%error, "the kernel refused this cipher's keys; staying in userspace");
                    }
                },
                Err(error) => {
                    tracing::debug!(%error, "kTLS refused for this connection; staying in userspace");
                }
            }
        }
        let sealer = crate::usertls::Sealer::new(secrets.tx.0, &secrets.tx.1, limit)
            .ok_or_else(unsupported)?;
        Ok(MaybeTls::User(Box::new(crate::usertls::UserTls::new(
            inner, opener, sealer, after, leftover,
        ))))
    }
}

/// A connection that may be TLS: what the proxy holds where config decides.
pub enum MaybeTls<S> {
    /// Plain TCP.
    Plain(S),
    /// Plain TCP whose first bytes were read already (to tell it from TLS); reads return
    /// them first.
    Sniffed(S, RefCell<Vec<u8>>),
    /// mTLS, records in Tern's userspace record layer.
    User(Box<crate::usertls::UserTls<S>>),
    /// mTLS, records in the kernel (kTLS).
    Kernel(Box<crate::ktls::KernelTls<S>>),
}

impl<S> MaybeTls<S> {
    /// A plaintext stream whose reads return `first` before anything else (bytes already
    /// read to tell its protocol).
    pub fn replaying(self, first: Vec<u8>) -> MaybeTls<S> {
        match self {
            MaybeTls::Plain(s) | MaybeTls::Sniffed(s, _) if !first.is_empty() => {
                MaybeTls::Sniffed(s, RefCell::new(first))
            }
            other => other,
        }
    }

    /// A sniffed stream whose replayed bytes are all consumed, as plain again (so opaque TCP
    /// may splice it).
    pub fn unsniffed(self) -> MaybeTls<S> {
        match self {
            MaybeTls::Sniffed(s, first) if first.borrow().is_empty() => MaybeTls::Plain(s),
            other => other,
        }
    }

    /// Where the record layer runs, for TLS connections.
    pub fn tls_mode(&self) -> Option<crate::metrics::TlsMode> {
        match self {
            MaybeTls::Plain(_) | MaybeTls::Sniffed(..) => None,
            MaybeTls::User(_) => Some(crate::metrics::TlsMode::Userspace),
            MaybeTls::Kernel(_) => Some(crate::metrics::TlsMode::Kernel),
        }
    }
}

impl<S: Stream> Stream for MaybeTls<S> {
    async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize> {
        match self {
            MaybeTls::Plain(s) => s.read(buf).await,
            MaybeTls::Sniffed(s, first) => {
                let first = std::mem::take(&mut *first.borrow_mut());
                if first.is_empty() {
                    s.read(buf).await
                } else {
                    buf.extend_from_slice(&first);
                    (Ok(first.len()), buf)
                }
            }
            MaybeTls::User(s) => s.read(buf).await,
            MaybeTls::Kernel(s) => s.read(buf).await,
        }
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<()> {
        match self {
            MaybeTls::Plain(s) | MaybeTls::Sniffed(s, _) => s.write_all(buf, range).await,
            MaybeTls::User(s) => s.write_all(buf, range).await,
            MaybeTls::Kernel(s) => s.write_all(buf, range).await,
        }
    }

    async fn readable(&self) -> io::Result<()> {
        match self {
            MaybeTls::Plain(s) => s.readable().await,
            MaybeTls::Sniffed(s, first) => {
                if first.borrow().is_empty() {
                    s.readable().await
                } else {
                    Ok(())
                }
            }
            MaybeTls::User(_) | MaybeTls::Kernel(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    fn duplicate(&self) -> Option<std::os::fd::OwnedFd> {
        match self {
            MaybeTls::Plain(s) | MaybeTls::Sniffed(s, _) => s.duplicate(),
            MaybeTls::User(s) => s.duplicate(),
            MaybeTls::Kernel(s) => s.duplicate(),
        }
    }

    fn has_input(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.has_input(),
            MaybeTls::Sniffed(s, first) => !first.borrow().is_empty() || s.has_input(),
            MaybeTls::User(s) => s.has_input(),
            MaybeTls::Kernel(s) => s.has_input(),
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            MaybeTls::Plain(s) | MaybeTls::Sniffed(s, _) => s.shutdown(how),
            MaybeTls::User(s) => s.shutdown(how),
            MaybeTls::Kernel(s) => s.shutdown(how),
        }
    }

    fn abort(&self) {
        match self {
            MaybeTls::Plain(s) | MaybeTls::Sniffed(s, _) => s.abort(),
            MaybeTls::User(s) => s.abort(),
            MaybeTls::Kernel(s) => s.abort(),
        }
    }

    async fn close_write(&self) -> io::Result<()> {
        match self {
            MaybeTls::Plain(s) | MaybeTls::Sniffed(s, _) => s.close_write().await,
            MaybeTls::User(s) => s.close_write().await,
            MaybeTls::Kernel(s) => s.close_write().await,
        }
    }

    fn can_splice(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.can_splice(),
            MaybeTls::Kernel(s) => s.can_splice(),
            // Sniffed bytes and userspace TLS must pass through the proxy.
            MaybeTls::Sniffed(..) | MaybeTls::User(_) => false,
        }
    }

    async fn splice_to_pipe(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> io::Result<usize> {
        match self {
            MaybeTls::Plain(s) => s.splice_to_pipe(pipe, len).await,
            MaybeTls::Kernel(s) => s.splice_to_pipe(pipe, len).await,
            MaybeTls::Sniffed(..) | MaybeTls::User(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    async fn splice_from_pipe(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> io::Result<usize> {
        match self {
            MaybeTls::Plain(s) => s.splice_from_pipe(pipe, len).await,
            MaybeTls::Kernel(s) => s.splice_from_pipe(pipe, len).await,
            MaybeTls::Sniffed(..) | MaybeTls::User(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

/// In-memory handshakes between Tern's side ([`HandshakeState`]) and a rustls peer, for tests
/// of the handshake and of the record layers after it.
#[cfg(test)]
pub(crate) mod in_memory {
    use super::*;

    /// A root of its own and a certificate it signs with `sans` (for server and client
    /// use): the roots to trust, the certificate and its key.
    pub(crate) fn signed_by_new_root(
        sans: Vec<rcgen::SanType>,
    ) -> (
        RootCertStore,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    ) {
        let mut root = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root_key = rcgen::KeyPair::generate().unwrap();
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(root, root_key);
        let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = sans;
        leaf.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(root_cert.der().clone()).unwrap();
        let key = PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        (roots, leaf_cert.der().clone(), key)
    }

    /// A client and server configuration for `peer.example` (self-signed, no client
    /// certificate) offering only `suite`.
    pub(crate) fn configs(
        suite: rustls::SupportedCipherSuite,
    ) -> (rustls::ClientConfig, rustls::ServerConfig) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["peer.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites = vec![suite];
        let provider = Arc::new(provider);
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        (client, server)
    }

    /// Tern's client side of a handshake with `client`.
    pub(crate) fn client(client: rustls::ClientConfig) -> HandshakeState {
        let name = ServerName::try_from("peer.example").unwrap();
        HandshakeState::client(Arc::new(client), name).unwrap()
    }

    /// Tern's server side of a handshake with `server`.
    pub(crate) fn server(server: rustls::ServerConfig) -> HandshakeState {
        HandshakeState::server(Arc::new(server), Vec::new()).unwrap()
    }

    /// A rustls client peer.
    pub(crate) fn peer_client(client: rustls::ClientConfig) -> rustls::Connection {
        let name = ServerName::try_from("peer.example").unwrap();
        rustls::ClientConnection::new(Arc::new(client), name)
            .unwrap()
            .into()
    }

    /// A rustls server peer.
    pub(crate) fn peer_server(server: rustls::ServerConfig) -> rustls::Connection {
        rustls::ServerConnection::new(Arc::new(server))
            .unwrap()
            .into()
    }

    /// Hands `ciphertext` to `peer`.
    pub(crate) fn deliver(peer: &mut rustls::Connection, mut ciphertext: &[u8]) {
        while !ciphertext.is_empty() {
            peer.read_tls(&mut ciphertext).unwrap();
            peer.process_new_packets().unwrap();
        }
    }

    /// What `peer` has to send.
    pub(crate) fn sent_by(peer: &mut rustls::Connection) -> Vec<u8> {
        let mut wire = Vec::new();
        while peer.wants_write() {
            peer.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Runs the handshake between Tern's side and `peer` to its end.
    pub(crate) fn handshake(mut tern: HandshakeState, peer: &mut rustls::Connection) -> Session {
        for _ in 0..20 {
            let progress = tern.advance().unwrap();
            deliver(peer, &std::mem::take(&mut tern.outgoing));
            tern.incoming.extend(sent_by(peer));
            if progress == Progress::Done && !peer.is_handshaking() {
                return tern.finish().unwrap();
            }
        }
        panic!("the handshake did not finish");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first flight of a rustls client offering `alpn`.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from("peer.example").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    /// A client verifier for trust domain `tern.test` with its root, and a client certificate
    /// that root signs with `sans`.
    fn client_verifier_and_cert(
        sans: Vec<rcgen::SanType>,
    ) -> (MeshClientVerifier, CertificateDer<'static>) {
        let (roots, leaf_cert, _) = super::in_memory::signed_by_new_root(sans);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let verifier = MeshClientVerifier {
            chain,
            trust_domain: "tern.test".to_owned(),
        };
        (verifier, leaf_cert)
    }

    #[test]
    fn a_client_must_be_a_workload_of_this_trust_domain() {
        let uri = |u: &str| rcgen::SanType::URI(u.try_into().unwrap());
        let verify = |sans| {
            let (verifier, cert) = client_verifier_and_cert(sans);
            verifier
                .verify_client_cert(&cert, &[], UnixTime::now())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            verify(vec![uri("spiffe://tern.test/ns/shop/sa/web")]),
            Ok(())
        );
        // Each of these chains to the trusted root all the same.
        let refused = [
            (
                vec![uri("spiffe://elsewhere.test/ns/shop/sa/web")],
                "not in trust domain tern.test",
            ),
            (
                vec![rcgen::SanType::DnsName("web.example".try_into().unwrap())],
                "no SPIFFE ID",
            ),
            (
                vec![
                    uri("spiffe://tern.test/ns/shop/sa/web"),
                    uri("spiffe://tern.test/ns/shop/sa/admin"),
                ],
                "exactly one URI SAN",
            ),
            (
                vec![uri("https://tern.test/ns/shop/sa/web")],
                "no SPIFFE ID",
            ),
        ];
        for (sans, why) in refused {
            let error = verify(sans).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }

    #[test]
    fn a_mesh_client_hello_is_told_from_an_applications_own_tls() {
        let mesh = client_hello(&[ALPN_HTTP2]);
        assert_eq!(classify_hello(&mesh), Hello::Mesh);
        assert_eq!(
            classify_hello(&client_hello(&[b"h2", ALPN_TCP])),
            Hello::Mesh
        );
        assert_eq!(
            classify_hello(&client_hello(&[b"h2", b"http/1.1"])),
            Hello::Other
        );
        assert_eq!(classify_hello(&client_hello(&[])), Hello::Other);
        // Arriving in pieces: partial until the record is whole.
        for cut in [1, 4, 5, mesh.len() / 2, mesh.len() - 1] {
            assert_eq!(classify_hello(&mesh[..cut]), Hello::Partial, "{cut}");
        }
        // Plaintext, and garbage shaped like a record, are not mesh peers.
        assert_eq!(classify_hello(b"GET / HTTP/1.1\r\n"), Hello::Other);
        let mut garbage = vec![0x16, 3, 1, 0, 8];
        garbage.extend_from_slice(&[1, 0, 0, 200, 9, 9, 9, 9]);
        assert_eq!(
            classify_hello(&garbage),
            Hello::Other,
            "a hello continued in the next record"
        );
        assert_eq!(
            classify_hello(b"\x05"),
            Hello::Other,
            "a short non-TLS first write"
        );
        let mut truncated = vec![0x16, 3, 1, 0, 6];
        truncated.extend_from_slice(&[1, 0, 0, 2, 3, 3]);
        assert_eq!(classify_hello(&truncated), Hello::Other);
    }

    #[test]
    fn a_handshake_whose_messages_span_records_completes() {
        use in_memory::*;
        let (client_config, mut server_config) =
            configs(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256);
        // The server's certificate message spans several records.
        server_config.max_fragment_size = Some(64);
        let mut peer = peer_server(server_config);
        let mut tern = client(client_config);
        let mut records = 0;
        let done = loop {
            let progress = tern.advance().unwrap();
            deliver(&mut peer, &std::mem::take(&mut tern.outgoing));
            let wire = sent_by(&mut peer);
            let mut at = 0;
            while let Some(end) = next_record_end(&wire, at) {
                at = end;
                records += 1;
            }
            tern.incoming.extend(wire);
            if progress == Progress::Done {
                break tern;
            }
        };
        assert!(records > 10, "{records} records");
        assert!(!peer.is_handshaking());
        done.finish().unwrap();
    }

    #[test]
    fn data_behind_the_clients_finished_is_left_for_the_record_layer() {
        use in_memory::*;
        let (client_config, server_config) =
            configs(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256);
        let mut peer = peer_client(client_config);
        let mut tern = server(server_config);
        tern.incoming.extend(sent_by(&mut peer));
        // The server's flight goes out; it waits for the client's Finished.
        assert_eq!(tern.advance().unwrap(), Progress::Read);
        deliver(&mut peer, &std::mem::take(&mut tern.outgoing));
        assert!(!peer.is_handshaking());
        // The client's Finished and its first request arrive in one read.
        std::io::Write::write_all(&mut peer.writer(), b"after").unwrap();
        tern.incoming.extend(sent_by(&mut peer));
        assert_eq!(tern.advance().unwrap(), Progress::Done);
        let mut session = tern.finish().unwrap();
        let held = session.incoming.len();
        let mut opener =
            crate::usertls::Opener::new(session.secrets.rx.0, &session.secrets.rx.1).unwrap();
        let opened = opener
            .open(
                &mut session.incoming,
                &mut crate::usertls::AfterHandshake::new(session.schedule),
            )
            .unwrap();
        assert_eq!(opened.consumed, held, "exactly one record was left");
        assert_eq!(&session.incoming[..opened.plaintext], b"after");
    }

    #[test]
    fn a_failed_handshake_queues_an_alert_for_the_peer() {
        use in_memory::*;
        let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let (_, server_config) = configs(suite);
        // A client that trusts another CA.
        let (client_config, _) = configs(suite);
        let mut peer = peer_server(server_config);
        let mut tern = client(client_config);
        let error = loop {
            match tern.advance() {
                Ok(_) => {
                    deliver(&mut peer, &std::mem::take(&mut tern.outgoing));
                    tern.incoming.extend(sent_by(&mut peer));
                }
                Err(error) => break error,
            }
        };
        assert!(
            error.to_string().contains("invalid peer certificate"),
            "{error}"
        );
        let mut alert = tern.outgoing.as_slice();
        peer.read_tls(&mut alert).unwrap();
        let error = peer.process_new_packets().unwrap_err();
        assert!(
            matches!(error, rustls::Error::AlertReceived(_)),
            "{error:?}"
        );
    }
}
