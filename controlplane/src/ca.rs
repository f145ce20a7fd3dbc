//! The mesh certificate authority: its signing key and certificate (generated on first start
//! and kept in the state directory, or provided by the operator), the trust bundle it hands
//! out, the credentials it accepts (a per-workload bootstrap token with an expiry, in local
//! mode, for a workload's first certificate; the workload's current certificate for each
//! renewal after it), and the signing of workload certificates from CSRs.
//!
//! Everything here is synchronous and does no network IO; [`crate::identity`] puts it behind
//! gRPC.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::rand::SecureRandom as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use shared::SpiffeId;

/// Slack on `not_before` for peers whose clocks run a little behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Lifetime of a root the CA generates for itself.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The shortest workload certificate lifetime allowed (short lifetimes are for tests; the
/// default is 24 h).
pub const MIN_WORKLOAD_LIFETIME: Duration = Duration::from_secs(5);
/// The longest workload certificate lifetime allowed (Istio's default ceiling too): workload
/// certificates are meant to be short-lived and renewed.
pub const MAX_WORKLOAD_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// The prefix of a bootstrap token, naming its format: `tern2.<id>.<expiry>.<tag>`, the
/// SPIFFE ID in unpadded URL-safe base64, the expiry in Unix seconds, and the tag an
/// HMAC-SHA256 of what precedes it under the CA's token key.
const TOKEN_PREFIX: &str = "tern2";
/// The prefix of the first token format, which had no expiry.
const OLD_TOKEN_PREFIX: &str = "tern1";
/// How long a bootstrap token is valid unless its issuer says otherwise: long enough to
/// start a workload, short enough that a leaked one soon stops minting certificates. A
/// running workload renews with its certificate and no longer needs it.
pub const DEFAULT_TOKEN_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// What proves a certification request's identity.
#[derive(Debug, Clone)]
pub enum Credential<'a> {
    /// A bootstrap token (local mode): how a workload gets its first certificate.
    Token(&'a str),
    /// The leaf certificate the client presented in the TLS handshake, which the server
    /// verified against this CA's trust bundle: how a workload renews. Any root of the bundle
    /// will do (the mesh's proxies trust them all for mTLS anyway), so that during a root
    /// rotation a workload on the old root renews onto the new one.
    Certificate(&'a CertificateDer<'a>),
    /// The identity of a Kubernetes ServiceAccount whose token the API server vouched for
    /// (a TokenReview, [`crate::identity::TokenReviewer`]): how a workload in a cluster gets
    /// its first certificate.
    Reviewed(SpiffeId),
}

impl<'a> Credential<'a> {
    /// What proves the request, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Credential::Token(_) => "token",
            Credential::Certificate(_) => "certificate",
            Credential::Reviewed(_) => "ServiceAccount token",
        }
    }

    /// The certificate the client presented, if it did; else its token.
    pub fn presented_or_token(
        presented: Option<&'a CertificateDer<'a>>,
        token: &'a str,
    ) -> Credential<'a> {
        presented.map_or(Credential::Token(token), Credential::Certificate)
    }
}

/// The subject's organizational unit of a workload certificate a Kubernetes ServiceAccount
/// token earned (`OU=kubernetes-serviceaccount`, which `openssl x509 -subject` shows): such
/// a certificate renews only with a ServiceAccount token beside it
/// ([`crate::identity::renewal_credential`]).
pub const CLUSTER_PROVEN: &str = "kubernetes-serviceaccount";

/// Whether `leaf` is a certificate a ServiceAccount token earned ([`CLUSTER_PROVEN`]).
pub fn cluster_proven(leaf: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(leaf).is_ok_and(|(_, parsed)| {
        parsed
            .subject()
            .iter_organizational_unit()
            .any(|unit| unit.as_str() == Ok(CLUSTER_PROVEN))
    })
}

/// When `leaf` stops being valid (Unix seconds), if it parses.
pub fn not_after(leaf: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(leaf)
        .ok()
        .map(|(_, parsed)| parsed.validity().not_after.timestamp())
}

/// Where the CA keeps its state, and what it was given.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// Directory for the generated root (`ca.crt`, `ca.key`) and the token key (`token.key`).
    pub state_dir: PathBuf,
    /// The trust domain of every identity this CA signs.
    pub trust_domain: String,
    /// Lifetime of workload certificates.
    pub workload_lifetime: Duration,
    /// An operator-provided signing certificate (PEM: the signing certificate first, then
    /// any intermediates up to, optionally, the root) instead of a generated root.
    pub ca_cert: Option<PathBuf>,
    /// The key of `ca_cert`.
    pub ca_key: Option<PathBuf>,
    /// Extra roots to trust besides this CA's own (PEM), e.g. the old root during a root
    /// rotation.
    pub extra_roots: Option<PathBuf>,
}

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A state or input file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The options are inconsistent.
    #[error("{0}")]
    Options(String),
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Why a certification request was refused. Each maps onto a gRPC status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertifyError {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The credential is not a valid token of this CA, or not a certificate of its mesh.
    #[error("invalid credential: {0}")]
    Unauthenticated(String),
    /// The credential is valid but proves another identity.
    #[error("the credential proves {proven}, not {requested}")]
    Denied {
        /// The identity the credential proves.
        proven: String,
        /// The identity asked for.
        requested: String,
    },
    /// Signing failed (a bug or a broken key, not the caller's fault).
    #[error("signing failed: {0}")]
    Internal(String),
    /// What the credential proves could not be learnt now (the API server did not answer a
    /// TokenReview): the caller should try again.
    #[error("{0}")]
    Unavailable(String),
}

/// A signed workload certificate and what the proxy needs with it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Roots peers' chains may lead to.
    pub trust_bundle: Vec<CertificateDer<'static>>,
    /// The identity certified.
    pub id: SpiffeId,
}

/// The mesh CA.
pub struct Authority {
    trust_domain: String,
    workload_lifetime: Duration,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after the leaf: the signing certificate and any intermediates,
    /// without self-signed roots.
    intermediates: Vec<CertificateDer<'static>>,
    trust_bundle: Vec<CertificateDer<'static>>,
    token_key: aws_lc_rs::hmac::Key,
    random: aws_lc_rs::rand::SystemRandom,
    /// When the latest certificate of each identity expires (Unix seconds), for status.
    expiries: std::sync::Mutex<std::collections::HashMap<SpiffeId, i64>>,
    /// When the signing certificate expires: no workload certificate outlives it.
    signer_not_after: time::OffsetDateTime,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("workload_lifetime", &self.workload_lifetime)
            .finish_non_exhaustive()
    }
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> CaError {
    CaError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn read_to_string(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| file_error(path, e))
}

/// Writes a new file only its owner may read: see [`write_new`].
fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_new(path, contents, 0o600)
}

/// Writes a new file with permissions `mode`, whole or not at all: the bytes go to a
/// temporary file, reach the disk, and only then take the name (a process killed half way
/// leaves no short file behind, and an existing file is never overwritten).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = std::path::PathBuf::from(temporary);
    // Left by a process of the same pid killed half way (in a container, pid 1 each time).
    let _ = std::fs::remove_file(&temporary);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::hard_link(&temporary, path));
    let _ = std::fs::remove_file(&temporary);
    written.map_err(|e| file_error(path, e))
}

fn pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = read_to_string(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .is_ok_and(|(_, parsed)| parsed.subject() == parsed.issuer())
}

/// Whether the request's key is an uncompressed ECDSA P-256 point.
fn has_p256_key(csr: &[u8]) -> bool {
    use x509_parser::prelude::FromDer as _;
    let Ok((_, request)) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr)
    else {
        return false;
    };
    let key = &request.certification_request_info.subject_pki;
    let curve = key
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let point = key.subject_public_key.data.as_ref();
    key.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && curve == Some(x509_parser::oid_registry::OID_EC_P256)
        && point.len() == 65
        && point[0] == 4
}

/// An `OffsetDateTime` `offset` from now (negative: in the past).
/// Seconds since the Unix epoch (0 for a clock set before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn from_now(offset: Duration, past: bool) -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    let offset = time::Duration::try_from(offset).unwrap_or(time::Duration::MAX);
    if past { now - offset } else { now + offset }
}

impl Authority {
    /// Opens the CA: loads the operator's signing certificate, or the root in the state
    /// directory, generating and persisting one on first start.
    pub fn open(options: &CaOptions) -> Result<Authority, CaError> {
        if options.trust_domain.is_empty() || options.trust_domain.contains('/') {
            return Err(CaError::Options(format!(
                "invalid trust domain `{}`",
                options.trust_domain
            )));
        }
        if !(MIN_WORKLOAD_LIFETIME..=MAX_WORKLOAD_LIFETIME).contains(&options.workload_lifetime) {
            return Err(CaError::Options(format!(
                "the workload certificate lifetime must be from {MIN_WORKLOAD_LIFETIME:?} to {} days",
                MAX_WORKLOAD_LIFETIME.as_secs() / 86_400
            )));
        }
        std::fs::create_dir_all(&options.state_dir)
            .map_err(|e| file_error(&options.state_dir, e))?;
        let (cert_path, key_path) = match (&options.ca_cert, &options.ca_key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            (None, None) => {
                let cert = options.state_dir.join("ca.crt");
                let key = options.state_dir.join("ca.key");
                if !cert.exists() {
                    if key.exists() {
                        // The key is written first: a first start killed before the
                        // certificate left a root nothing was ever signed with.
                        tracing::warn!(key = %key.display(), "a root key without its certificate (an interrupted first start): generating a new root");
                        std::fs::remove_file(&key).map_err(|e| file_error(&key, e))?;
                    }
                    generate_root(&cert, &key, &options.trust_domain)?;
                }
                (cert, key)
            }
            _ => {
                return Err(CaError::Options(
                    "--ca-cert and --ca-key go together".into(),
                ));
            }
        };
        let chain = pem_certificates(&cert_path)?;
        let key =
            KeyPair::from_pem(&read_to_string(&key_path)?).map_err(|e| file_error(&key_path, e))?;
        let issuer =
            Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| file_error(&cert_path, e))?;
        let signer_not_after = x509_parser::parse_x509_certificate(&chain[0])
            .map(|(_, signer)| signer.validity().not_after.to_datetime())
            .map_err(|e| file_error(&cert_path, e))?;
        let (roots, intermediates): (Vec<_>, Vec<_>) =
            chain.into_iter().partition(|c| is_self_signed(c));
        let mut trust_bundle = roots;
        if let Some(extra) = &options.extra_roots {
            trust_bundle.extend(pem_certificates(extra)?);
        }
        if trust_bundle.is_empty() {
            return Err(CaError::Options(format!(
                "{} holds no root: add the root to it or pass it with --extra-roots",
                cert_path.display()
            )));
        }
        let token_key = load_token_key(&options.state_dir.join("token.key"))?;
        Ok(Authority {
            trust_domain: options.trust_domain.clone(),
            workload_lifetime: options.workload_lifetime,
            issuer,
            intermediates,
            trust_bundle,
            token_key,
            random: aws_lc_rs::rand::SystemRandom::new(),
            expiries: std::sync::Mutex::default(),
            signer_not_after,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots this CA tells proxies to trust.
    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.trust_bundle
    }

    /// A bootstrap token that proves `id` to this CA (local mode) for `valid_for` from now.
    /// Anyone holding it can obtain certificates for `id` until then, so hand it only to
    /// that workload.
    pub fn token(&self, id: &SpiffeId, valid_for: Duration) -> String {
        let expires = unix_now().saturating_add(valid_for.as_secs());
        let signed = format!(
            "{TOKEN_PREFIX}.{}.{expires}",
            URL_SAFE_NO_PAD.encode(id.to_string())
        );
        let tag = aws_lc_rs::hmac::sign(&self.token_key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// How long the workload certificates this CA signs last.
    pub fn workload_lifetime(&self) -> Duration {
        self.workload_lifetime
    }

    /// When the latest certificate issued for `id` expires (Unix seconds), if this CA issued
    /// one since it started.
    pub fn expiry(&self, id: &SpiffeId) -> Option<i64> {
        self.expiries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .copied()
    }

    /// Whether `token` is (or claims to be) one of this CA's bootstrap tokens, of either
    /// format, rather than, say, a Kubernetes ServiceAccount token.
    pub fn is_bootstrap_token(token: &str) -> bool {
        let token = token.trim();
        [TOKEN_PREFIX, OLD_TOKEN_PREFIX].iter().any(|prefix| {
            token
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('.'))
        })
    }

    /// Checks a bootstrap token and returns the identity it proves.
    pub fn verify_token(&self, token: &str) -> Result<SpiffeId, CertifyError> {
        let bad = |why: &str| CertifyError::Unauthenticated(why.to_owned());
        let token = token.trim();
        if token.starts_with(&format!("{OLD_TOKEN_PREFIX}.")) {
            return Err(bad(
                "a token of the first format, which never expired, is no longer accepted: issue a new one with `tern-control token`",
            ));
        }
        let Some((signed, tag)) = token.rsplit_once('.') else {
            return Err(bad("not a Tern bootstrap token"));
        };
        let mut parts = signed.split('.');
        let (Some(TOKEN_PREFIX), Some(id), Some(expires), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("not a Tern bootstrap token"));
        };
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| bad("not a Tern bootstrap token"))?;
        aws_lc_rs::hmac::verify(&self.token_key, signed.as_bytes(), &tag)
            .map_err(|_| bad("the token was not issued by this CA"))?;
        // Authentic from here on: what it says was said by this CA.
        let expires: u64 = expires
            .parse()
            .map_err(|_| bad("the token's expiry is not a number"))?;
        if unix_now() >= expires {
            return Err(CertifyError::Unauthenticated(format!(
                "the token expired at {expires} (Unix seconds): issue a new one with `tern-control token`"
            )));
        }
        URL_SAFE_NO_PAD
            .decode(id)
            .ok()
            .and_then(|id| String::from_utf8(id).ok())
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| bad("the token names no valid SPIFFE ID"))
    }

    /// The identity `credential` proves: a token's, or that of the certificate presented,
    /// which must be an X.509 SVID of this trust domain.
    pub fn prove(&self, credential: Credential<'_>) -> Result<SpiffeId, CertifyError> {
        match credential {
            Credential::Token(token) => self.verify_token(token),
            Credential::Reviewed(id) if id.trust_domain() == self.trust_domain => Ok(id),
            Credential::Reviewed(id) => Err(CertifyError::Unauthenticated(format!(
                "{id} is not in trust domain `{}`",
                self.trust_domain
            ))),
            Credential::Certificate(leaf) => {
                let bad = |why: String| {
                    CertifyError::Unauthenticated(format!("the client certificate: {why}"))
                };
                // The handshake checked the validity period, but a resumed TLS session
                // carries the chain of the handshake it resumes unchecked: check it again.
                let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
                    .map_err(|e| bad(format!("unparsable: {e}")))?;
                if !parsed.validity().is_valid() {
                    return Err(bad("outside its validity period".into()));
                }
                let id = SpiffeId::of_certificate(leaf).map_err(bad)?;
                if id.trust_domain() != self.trust_domain {
                    return Err(CertifyError::Unauthenticated(format!(
                        "the client certificate's {id} is not in trust domain `{}`",
                        self.trust_domain
                    )));
                }
                Ok(id)
            }
        }
    }

    /// Signs a workload certificate for the key in `csr`, for the identity `credential`
    /// proves. Only the CSR's public key and its URI SAN are used; subject, lifetime, key
    /// usages and every other extension are the CA's choice.
    pub fn certify(&self, csr: &[u8], credential: Credential<'_>) -> Result<Issued, CertifyError> {
        let invalid = |why: String| CertifyError::Invalid(why);
        let request = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr.to_vec()),
        )
        .map_err(|e| invalid(format!("not a valid signed PKCS#10 request: {e}")))?;
        // rcgen names the algorithm after the request's signature (ecdsa-with-SHA256 for
        // any curve), so the key's own curve is checked too.
        if request.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 || !has_p256_key(csr) {
            return Err(invalid("the key must be ECDSA P-256".into()));
        }
        let mut uris = request
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str()),
                _ => None,
            });
        let (Some(uri), None) = (uris.next(), uris.next()) else {
            return Err(invalid(
                "the request must carry exactly one URI SAN, the SPIFFE ID".into(),
            ));
        };
        let requested: SpiffeId = uri
            .parse()
            .map_err(|e| invalid(format!("URI SAN `{uri}`: {e}")))?;
        if requested.trust_domain() != self.trust_domain {
            return Err(invalid(format!(
                "{requested} is not in trust domain `{}`",
                self.trust_domain
            )));
        }
        // What the cluster's word earned carries its mark on, through renewals by the
        // certificate alone (while the API server is out of reach).
        let cluster_proven = match &credential {
            Credential::Reviewed(_) => true,
            Credential::Certificate(leaf) => cluster_proven(leaf),
            Credential::Token(_) => false,
        };
        let proven = self.prove(credential)?;
        if proven != requested {
            return Err(CertifyError::Denied {
                proven: proven.to_string(),
                requested: requested.to_string(),
            });
        }

        let mut serial = [0u8; 16];
        self.random
            .fill(&mut serial)
            .map_err(|_| CertifyError::Internal("no randomness".into()))?;
        serial[0] &= 0x7f; // a positive INTEGER
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if cluster_proven {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, CLUSTER_PROVEN);
        }
        params.subject_alt_names = vec![SanType::URI(
            requested
                .to_string()
                .try_into()
                .map_err(|e| invalid(format!("URI SAN: {e}")))?,
        )];
        params.not_before = from_now(CLOCK_SKEW, true);
        params.not_after = from_now(self.workload_lifetime, false).min(self.signer_not_after);
        if params.not_after <= time::OffsetDateTime::now_utc() {
            return Err(CertifyError::Internal(
                "the CA's signing certificate has expired".into(),
            ));
        }
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let not_after = params.not_after.unix_timestamp();
        let signed = CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| CertifyError::Internal(e.to_string()))?;

        self.expiries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(requested.clone(), not_after);
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(signed.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        Ok(Issued {
            chain,
            trust_bundle: self.trust_bundle.clone(),
            id: requested,
        })
    }

    /// A serving certificate for `tern-control` itself (DNS and IP SANs for the names
    /// proxies dial, and its own SPIFFE ID), with its key, both PEM.
    pub fn serving_certificate(&self, names: &[String]) -> Result<(String, String), CertifyError> {
        let internal = |e: rcgen::Error| CertifyError::Internal(e.to_string());
        let key = KeyPair::generate().map_err(internal)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "tern-control");
        let id = format!(
            "spiffe://{}/ns/tern-system/sa/tern-control",
            self.trust_domain
        );
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(internal)?)];
        for name in names {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(internal)?),
            });
        }
        params.not_before = from_now(CLOCK_SKEW, true);
        params.not_after = from_now(ROOT_LIFETIME / 10, false);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(internal)?;
        let mut chain = cert.pem();
        for intermediate in &self.intermediates {
            chain.push_str(&pem_encode(intermediate));
        }
        Ok((chain, key.serialize_pem()))
    }
}

/// PEM for one certificate.
pub fn pem_encode(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()))
}

fn generate_root(cert_path: &Path, key_path: &Path, trust_domain: &str) -> Result<(), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, "Tern mesh root");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = from_now(CLOCK_SKEW, true);
    params.not_after = from_now(ROOT_LIFETIME, false);
    let root = params.self_signed(&key)?;
    // The key first: a certificate never exists without its key.
    write_private(key_path, key.serialize_pem().as_bytes())?;
    write_new(cert_path, root.pem().as_bytes(), 0o644)?;
    tracing::info!(root = %cert_path.display(), "generated a new mesh root");
    Ok(())
}

fn load_token_key(path: &Path) -> Result<aws_lc_rs::hmac::Key, CaError> {
    let secret = match std::fs::read(path) {
        Ok(secret) => secret,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = vec![0u8; 32];
            aws_lc_rs::rand::SystemRandom::new()
                .fill(&mut secret)
                .map_err(|_| file_error(path, "no randomness for a token key"))?;
            write_private(path, &secret)?;
            secret
        }
        Err(e) => return Err(file_error(path, e)),
    };
    if secret.len() < 32 {
        return Err(file_error(path, "a token key needs at least 32 bytes"));
    }
    Ok(aws_lc_rs::hmac::Key::new(
        aws_lc_rs::hmac::HMAC_SHA256,
        &secret,
    ))
}

#[cfg(test)]
mod tests;
