//! The identity gRPC service: `Certify` over TLS, backed by the [`Authority`], with each
//! refusal mapped onto the gRPC status a client can act on and logged with its reason. A
//! client certificate verified in the handshake proves the caller's identity (a renewal);
//! without one, the request's token must: a bootstrap token of this CA, or, when
//! `tern-control` reads a cluster, a Kubernetes ServiceAccount token, which the API server
//! vouches for ([`TokenReviewer`]). In a cluster a renewal's ServiceAccount token is reviewed
//! again, and a certificate a ServiceAccount token earned renews only with one
//! ([`renewal_credential`]).

use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use rustls::pki_types::CertificateDer;
use shared::SpiffeId;
use shared::api::identity::identity_server::Identity;
use shared::api::identity::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use crate::ca::{Authority, CertifyError, Credential};

/// The audience a workload's ServiceAccount token must be minted for (a projected token
/// volume's `audience`), so that a token meant for another service cannot be replayed here.
pub const TOKEN_AUDIENCE: &str = "tern-control";

/// Who a Kubernetes ServiceAccount token belongs to, as the API server says (a
/// `TokenReview`, for [`TOKEN_AUDIENCE`]): `system:serviceaccount:<namespace>:<name>` is
/// `spiffe://<trust domain>/ns/<namespace>/sa/<name>`.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    trust_domain: String,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// How long a TokenReview may take before the request is answered `UNAVAILABLE`.
const REVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Most TokenReviews in flight at once; beyond, requests are answered `UNAVAILABLE` (the
/// proxy retries with backoff).
const MAX_REVIEWS_IN_FLIGHT: usize = 32;

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Reviews tokens with the API server `client` reaches, minting identities in
    /// `trust_domain`.
    pub fn new(client: kube::Client, trust_domain: &str) -> TokenReviewer {
        TokenReviewer {
            client,
            trust_domain: trust_domain.to_owned(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT)),
        }
    }

    /// The identity of the ServiceAccount `token` belongs to.
    pub async fn review(&self, token: &str) -> Result<SpiffeId, CertifyError> {
        self.ask(token).await.map_err(|failure| failure.error)
    }

    /// [`Self::review`], saying too whether a failure is the API server's being out of reach.
    async fn ask(&self, token: &str) -> Result<SpiffeId, ReviewFailure> {
        let refused = |why: String| ReviewFailure {
            error: CertifyError::Unauthenticated(format!("the ServiceAccount token: {why}")),
            unreachable: false,
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.trim().to_owned(),
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let unavailable = |why: String, unreachable: bool| ReviewFailure {
            error: CertifyError::Unavailable(format!(
                "the API server did not review the ServiceAccount token: {why}"
            )),
            unreachable,
        };
        // Anyone who reaches the port may ask: bound what they can make the API server do.
        // (That bound is this side's, not the API server's being down.)
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| unavailable("too many reviews in flight".into(), false))?;
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| unavailable(format!("no answer within {REVIEW_TIMEOUT:?}"), true))?
                .map_err(|e| {
                    // A 4xx (tern-control not allowed to create TokenReviews, say) is an
                    // answer; a 5xx, 429 or no connection is the API server out of reach.
                    let unreachable = match &e {
                        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
                        _ => true,
                    };
                    unavailable(e.to_string(), unreachable)
                })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "no reason given".into());
            return Err(refused(format!(
                "the API server does not accept it ({why})"
            )));
        }
        // The API server says which audiences it checked; none means its own (an
        // authenticator that ignores audiences), which is not ours.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|audiences| audiences.iter().any(|a| a == TOKEN_AUDIENCE))
        {
            return Err(refused(format!("not for audience `{TOKEN_AUDIENCE}`")));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        let Some((namespace, account)) = user
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(refused(format!("`{user}` is not a ServiceAccount")));
        };
        format!("spiffe://{}/ns/{namespace}/sa/{account}", self.trust_domain)
            .parse()
            .map_err(|e| refused(format!("ServiceAccount `{user}`: {e}")))
    }
}

/// Why a review gave no identity, and whether that is the API server's being out of reach.
struct ReviewFailure {
    error: CertifyError,
    unreachable: bool,
}

/// Whether `token` is one for the API server to review: not empty, not a bootstrap token.
fn is_serviceaccount_token(token: &str) -> bool {
    !token.trim().is_empty() && !Authority::is_bootstrap_token(token)
}

/// The credential a caller offers: the certificate it presented in the handshake, else its
/// token. A token that is not a bootstrap token goes to `reviewer`, when there is one.
pub async fn credential<'a>(
    presented: Option<&'a CertificateDer<'a>>,
    token: &'a str,
    reviewer: Option<&TokenReviewer>,
) -> Result<Credential<'a>, CertifyError> {
    match reviewer {
        Some(reviewer) if presented.is_none() && is_serviceaccount_token(token) => {
            Ok(Credential::Reviewed(reviewer.review(token).await?))
        }
        _ => Ok(Credential::presented_or_token(presented, token)),
    }
}

/// The credential of a `Certify` request. As [`credential`], but in a cluster a certificate
/// that a ServiceAccount token earned ([`crate::ca::cluster_proven`]) renews only with a
/// ServiceAccount token beside it, which the API server reviews again: its refusal stands,
/// so deleting a ServiceAccount (or a Pod, whose bound token goes with it) stops the renewals
/// of the certificates issued for it, even with the key in other hands, as in Istio, where
/// every request carries the token. Only when the API server is out of reach (no answer, a
/// 5xx or 429) does the certificate prove the identity alone, so renewals outlive its
/// outages. A ServiceAccount token beside any other certificate is reviewed too.
pub async fn renewal_credential<'a>(
    presented: Option<&'a CertificateDer<'a>>,
    token: &'a str,
    reviewer: Option<&TokenReviewer>,
) -> Result<Credential<'a>, CertifyError> {
    let (Some(leaf), Some(reviewer)) = (presented, reviewer) else {
        return credential(presented, token, reviewer).await;
    };
    let proven_by_cluster = crate::ca::cluster_proven(leaf);
    if !is_serviceaccount_token(token) {
        if proven_by_cluster {
            return Err(CertifyError::Unauthenticated(
                "a certificate a ServiceAccount token earned renews only with that token beside it"
                    .into(),
            ));
        }
        return Ok(Credential::Certificate(leaf));
    }
    match reviewer.ask(token).await {
        Ok(id) => Ok(Credential::Reviewed(id)),
        Err(failure) if failure.unreachable => {
            tracing::warn!(why = %failure.error, "renewing by the client certificate alone");
            Ok(Credential::Certificate(leaf))
        }
        Err(failure) => Err(failure.error),
    }
}

/// The `tern.identity.v1.Identity` service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    authority: Arc<Authority>,
    reviewer: Option<TokenReviewer>,
}

impl IdentityService {
    /// Serves `authority`; ServiceAccount tokens go to `reviewer`, if any.
    pub fn new(authority: Arc<Authority>, reviewer: Option<TokenReviewer>) -> IdentityService {
        IdentityService {
            authority,
            reviewer,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let presented = presented_certificate(&request);
        let request = request.into_inner();
        let credential = renewal_credential(
            presented.as_ref(),
            &request.credential,
            self.reviewer.as_ref(),
        )
        .await;
        let by = credential.as_ref().map_or("", Credential::name);
        // Signing is a few hundred microseconds of CPU: fine inline at mesh start-up rates.
        match credential.and_then(|credential| self.authority.certify(&request.csr, credential)) {
            Ok(issued) => {
                tracing::info!(?peer, identity = %issued.id, by, "certified");
                Ok(Response::new(CertifyResponse {
                    chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
                    trust_bundle: issued.trust_bundle.iter().map(|c| c.to_vec()).collect(),
                }))
            }
            Err(error) => {
                tracing::warn!(?peer, %error, "certification refused");
                Err(status(&error))
            }
        }
    }
}

/// The gRPC status a client can act on for a refusal.
pub fn status(error: &CertifyError) -> Status {
    let message = error.to_string();
    match error {
        CertifyError::Invalid(_) => Status::invalid_argument(message),
        CertifyError::Unauthenticated(_) => Status::unauthenticated(message),
        CertifyError::Denied { .. } => Status::permission_denied(message),
        CertifyError::Internal(_) => Status::internal(message),
        CertifyError::Unavailable(_) => Status::unavailable(message),
    }
}

/// The leaf certificate the client presented in the TLS handshake (verified there against
/// the trust bundle), if it presented one.
pub fn presented_certificate<T>(
    request: &Request<T>,
) -> Option<rustls::pki_types::CertificateDer<'static>> {
    request.peer_certs()?.first().cloned()
}
