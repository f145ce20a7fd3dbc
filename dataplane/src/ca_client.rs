//! The client of `tern-control`'s CA: generates this proxy's key (ECDSA P-256, never sent
//! anywhere), asks the CA to certify it over TLS, and keeps the certificate fresh: it renews
//! at about 60% of the lifetime (with jitter, so a fleet started together does not renew
//! together) and retries failures with capped exponential backoff, also jittered.
//!
//! The first certificate is proven with the workload's bootstrap token; each renewal with the
//! current certificate, presented as the TLS client certificate, so a running proxy outlives
//! a bootstrap token. The token goes along too: in a cluster it is the Pod's ServiceAccount
//! token (which the kubelet keeps fresh), and `tern-control` asks the API server about it
//! again, so a deleted ServiceAccount stops renewals (a bootstrap token beside a certificate
//! is not looked at). Should the CA refuse the renewal (a CA whose trust bundle no longer
//! holds the certificate's root), the token alone is tried, when there is one.
//!
//! It runs on the admin thread, never on a worker. Each certificate goes to
//! [`Control::install_certificate`], which re-applies the running config with it: new
//! connections use the new certificate, open ones keep theirs.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use shared::SpiffeId;
use shared::api::identity::CertifyRequest;
use shared::api::identity::identity_client::IdentityClient;
use shared::config::{CaClient, HostPort};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::control::{ApplyError, Control};
use crate::tls::{Identity, Validity};

/// Time allowed to connect to the CA.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one `Certify` call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay after a failure; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest delay between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A certificate is presented to the control plane only while it has at least this long to
/// live (one that expired on the way would fail the handshake, and cost a retry).
const PRESENT_MARGIN: Duration = Duration::from_secs(1);

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// A local file (the CA root, the token) could not be read.
    #[error("{what} {path}: {message}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The CA could not be reached.
    #[error("connecting to the CA at {address}: {source}")]
    Connect {
        /// The CA's address.
        address: HostPort,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The CA refused or the call failed.
    #[error("the CA answered {}: {}", .0.code(), .0.message())]
    Refused(#[from] tonic::Status),
    /// The CA's answer is unusable.
    #[error("the CA's certificate is unusable: {0}")]
    Answer(String),
    /// Key or request generation failed.
    #[error("generating the key or request: {0}")]
    Generate(#[from] rcgen::Error),
}

pub(crate) fn read(what: &'static str, path: &std::path::Path) -> Result<String, CertifyError> {
    std::fs::read_to_string(path).map_err(|e| CertifyError::File {
        what,
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The endpoint of `tern-control` at `ca.address`, over TLS verified against `root` (PEM),
/// presenting `certificate` if given, with the connect timeout set.
pub(crate) fn endpoint(
    ca: &CaClient,
    root: String,
    certificate: Option<tonic::transport::Identity>,
) -> Result<Endpoint, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .domain_name(ca.server_name.clone());
    if let Some(certificate) = certificate {
        tls = tls.identity(certificate);
    }
    Ok(Endpoint::from_shared(format!("https://{}", ca.address))?
        .tls_config(tls)?
        .connect_timeout(CONNECT_TIMEOUT))
}

/// Connects to `tern-control` at `address`; with `mark`, the socket carries it, so the
/// interception rules leave the proxy's own connection alone.
pub(crate) async fn connect(
    endpoint: Endpoint,
    address: &HostPort,
    mark: Option<u32>,
) -> Result<Channel, tonic::transport::Error> {
    if mark.is_none() {
        return endpoint.connect().await;
    }
    let address = address.clone();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let address = address.clone();
            async move {
                crate::sys::connect_named(&address, mark)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}

/// The certificate this proxy may present to the control plane in place of its token: its
/// current one from the CA, for the identity `ca` names, while it has [`PRESENT_MARGIN`]
/// left to live.
pub(crate) fn presentable(control: &Control, ca: &CaClient) -> Option<tonic::transport::Identity> {
    let issued = control.issued()?;
    let left = issued.validity.remaining(std::time::SystemTime::now());
    if issued.id != ca.spiffe_id || left < PRESENT_MARGIN.as_secs() as i64 {
        return None;
    }
    let (chain, key) = issued.to_pem();
    Some(tonic::transport::Identity::from_pem(chain, key))
}

/// Generates a key, has the CA certify it, and returns the identity built from the answer.
/// With `certificate` (a renewal), that proves the identity, with the token beside it, and
/// the token alone is tried if the CA refuses them; without, the token must. `mark` is set on the connection (see
/// `connect`).
pub async fn certify(
    ca: &CaClient,
    mark: Option<u32>,
    certificate: Option<tonic::transport::Identity>,
) -> Result<Identity, CertifyError> {
    let root = read("CA root", &ca.root)?;
    let token = read("token", &ca.token_file).map(|token| token.trim().to_owned());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(ca.spiffe_id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    let csr = csr.der().to_vec();

    let by_certificate = match certificate {
        Some(certificate) => Some(
            request(
                ca,
                &root,
                Some(certificate),
                token.as_ref().cloned().unwrap_or_default(),
                mark,
                csr.clone(),
            )
            .await,
        ),
        None => None,
    };
    let answer = match (by_certificate, token) {
        (Some(Ok(answer)), _) => answer,
        (Some(Err(error)), Err(_)) => return Err(error),
        // Whatever failed (a refusal of the certificate may surface as a failed connection,
        // the server's alert racing the client's first bytes), the token gets its turn.
        (Some(Err(error)), Ok(token)) => {
            tracing::info!(%error, "renewal by certificate refused; trying the token alone");
            request(ca, &root, None, token, mark, csr).await?
        }
        (None, token) => request(ca, &root, None, token?, mark, csr).await?,
    };
    let unusable = |why: String| CertifyError::Answer(why);
    let chain: Vec<CertificateDer<'static>> =
        answer.chain.into_iter().map(CertificateDer::from).collect();
    let leaf = chain
        .first()
        .ok_or_else(|| unusable("no certificate".into()))?;
    let id = SpiffeId::of_certificate(leaf).map_err(unusable)?;
    if id != ca.spiffe_id {
        return Err(unusable(format!("it certifies {id}, not {}", ca.spiffe_id)));
    }
    let mut roots = RootCertStore::empty();
    for root in answer.trust_bundle {
        roots
            .add(CertificateDer::from(root))
            .map_err(|e| unusable(format!("trust bundle: {e}")))?;
    }
    if roots.is_empty() {
        return Err(unusable("an empty trust bundle".into()));
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // rustls checks that the certificate is for this key.
    Identity::new(id, chain, key, roots).map_err(|e| unusable(e.to_string()))
}

/// One `Certify` call: proven by `certificate` if given, else by `token`.
async fn request(
    ca: &CaClient,
    root: &str,
    certificate: Option<tonic::transport::Identity>,
    token: String,
    mark: Option<u32>,
    csr: Vec<u8>,
) -> Result<shared::api::identity::CertifyResponse, CertifyError> {
    let connect_error = |source| CertifyError::Connect {
        address: ca.address.clone(),
        source,
    };
    let endpoint = endpoint(ca, root.to_owned(), certificate)
        .map_err(connect_error)?
        .timeout(REQUEST_TIMEOUT);
    let channel = connect(endpoint, &ca.address, mark)
        .await
        .map_err(connect_error)?;
    Ok(IdentityClient::new(channel)
        .certify(CertifyRequest {
            csr,
            credential: token,
        })
        .await?
        .into_inner())
}

/// A random fraction in [0, 1), from the process's randomly keyed hasher (jitter needs no
/// cryptographic quality).
pub(crate) fn random_fraction() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// When to renew a certificate valid for `validity`, received at `now`: after 50–70% (about
/// 60%, jittered) of the lifetime left at `now`. Counting from `now` rather than from
/// `not_before` keeps a CA's backdating for clock skew from eating into short lifetimes.
pub fn renewal_delay(validity: &Validity, now: std::time::SystemTime, jitter: f64) -> Duration {
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let start = validity.not_before.max(now);
    let left = (validity.not_after - start).max(0) as f64;
    Duration::from_secs_f64(left * (0.5 + 0.2 * jitter))
}

/// The delay before retry number `attempt` (0-based): exponential, capped, with full jitter
/// in its upper half.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let ceiling = FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF);
    ceiling.mul_f64(0.5 + 0.5 * jitter)
}

/// Keeps this proxy certified for as long as the config names a CA: certifies at once, then
/// before each certificate ages past its renewal point, retrying failures with backoff. A
/// change of CA settings starts over at once.
pub async fn run(control: Arc<Control>) {
    let mut settings = control.ca();
    let mut failures = 0u32;
    loop {
        let Some(ca) = settings.borrow_and_update().clone() else {
            if settings.changed().await.is_err() {
                return;
            }
            continue;
        };
        let delay = match certify(&ca, control.mark(), presentable(&control, &ca)).await {
            Ok(identity) => {
                control.certify.ok.fetch_add(1, Ordering::Relaxed);
                let validity = identity.validity;
                tracing::info!(identity = %identity.id, not_after = validity.not_after, ca = %ca.address, "certificate issued");
                match control.install_certificate(identity) {
                    Ok(_) | Err(ApplyError::Draining) => {
                        failures = 0;
                        renewal_delay(&validity, std::time::SystemTime::now(), random_fraction())
                    }
                    // The config did not go live with it (a port in use, say): try again
                    // soon rather than at the next renewal.
                    Err(error) => {
                        let delay = backoff(failures, random_fraction());
                        failures = failures.saturating_add(1);
                        tracing::error!(%error, retry_in = ?delay, "the config could not be applied with the new certificate");
                        delay
                    }
                }
            }
            Err(error) => {
                control.certify.failed.fetch_add(1, Ordering::Relaxed);
                let delay = backoff(failures, random_fraction());
                failures = failures.saturating_add(1);
                tracing::warn!(%error, retry_in = ?delay, "could not get a certificate from the CA; serving on with the current one");
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                failures = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_lands_between_half_and_seven_tenths_of_the_lifetime_left() {
        let validity = Validity {
            not_before: 1_000,
            not_after: 1_000 + 100_000,
        };
        let at = |s: u64| std::time::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(
            renewal_delay(&validity, at(1_000), 0.0),
            Duration::from_secs(50_000)
        );
        assert_eq!(
            renewal_delay(&validity, at(1_000), 0.5),
            Duration::from_secs(60_000)
        );
        // Received 60 s after `not_before` (a CA backdating for clock skew): 60% of what is
        // left, not of the whole.
        let short = Validity {
            not_before: 1_000,
            not_after: 1_070,
        };
        assert_eq!(
            renewal_delay(&short, at(1_060), 0.5),
            Duration::from_secs(6)
        );
        assert_eq!(
            renewal_delay(&validity, at(200_000), 0.5),
            Duration::ZERO,
            "already expired: renew now"
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_cap_and_jitters_in_its_upper_half() {
        assert_eq!(backoff(0, 1.0), FIRST_BACKOFF);
        assert_eq!(backoff(0, 0.0), FIRST_BACKOFF / 2);
        assert_eq!(backoff(3, 1.0), FIRST_BACKOFF * 8);
        assert_eq!(backoff(30, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX, 0.0), MAX_BACKOFF / 2);
        let fractions: Vec<f64> = (0..64).map(|_| random_fraction()).collect();
        assert!(fractions.iter().all(|f| (0.0..1.0).contains(f)));
        assert!(
            fractions.windows(2).any(|w| w[0] != w[1]),
            "jitter must vary"
        );
    }
}
