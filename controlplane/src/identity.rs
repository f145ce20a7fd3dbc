//! The identity gRPC service: `Certify` over TLS, backed by the [`Authority`], with each
//! refusal mapped onto the gRPC status a client can act on and logged with its reason. A
//! client certificate verified in the handshake proves the caller's identity (a renewal);
//! without one, the request's token must.

use std::sync::Arc;

use shared::api::identity::identity_server::Identity;
use shared::api::identity::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use crate::ca::{Authority, CertifyError, Credential};

/// The `tern.identity.v1.Identity` service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    authority: Arc<Authority>,
}

impl IdentityService {
    /// Serves `authority`.
    pub fn new(authority: Arc<Authority>) -> IdentityService {
        IdentityService { authority }
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
        let credential = Credential::presented_or_token(presented.as_ref(), &request.credential);
        // Signing is a few hundred microseconds of CPU: fine inline at mesh start-up rates.
        match self.authority.certify(&request.csr, credential) {
            Ok(issued) => {
                let by = if presented.is_some() {
                    "certificate"
                } else {
                    "token"
                };
                tracing::info!(?peer, identity = %issued.id, by, "certified");
                Ok(Response::new(CertifyResponse {
                    chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
                    trust_bundle: issued.trust_bundle.iter().map(|c| c.to_vec()).collect(),
                }))
            }
            Err(error) => {
                tracing::warn!(?peer, %error, "certification refused");
                Err(match error {
                    CertifyError::Invalid(_) => Status::invalid_argument(error.to_string()),
                    CertifyError::Unauthenticated(_) => Status::unauthenticated(error.to_string()),
                    CertifyError::Denied { .. } => Status::permission_denied(error.to_string()),
                    CertifyError::Internal(_) => Status::internal(error.to_string()),
                })
            }
        }
    }
}

/// The leaf certificate the client presented in the TLS handshake (verified there against
/// the trust bundle), if it presented one.
pub fn presented_certificate<T>(
    request: &Request<T>,
) -> Option<rustls::pki_types::CertificateDer<'static>> {
    request.peer_certs()?.first().cloned()
}
