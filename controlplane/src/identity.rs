//! The identity gRPC service: `Certify` over TLS, backed by the [`Authority`], with each
//! refusal mapped onto the gRPC status a client can act on and logged with its reason.

use std::sync::Arc;

use shared::api::identity::identity_server::Identity;
use shared::api::identity::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use crate::ca::{Authority, CertifyError};

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
        let request = request.into_inner();
        // Signing is a few hundred microseconds of CPU: fine inline at mesh start-up rates.
        match self.authority.certify(&request.csr, &request.credential) {
            Ok(issued) => {
                tracing::info!(?peer, identity = %issued.id, "certified");
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
