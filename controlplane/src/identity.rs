//! The identity gRPC service: `Certify` over TLS, backed by the [`Authority`], with each
//! refusal mapped onto the gRPC status a client can act on and logged with its reason.

use std::future::Future;
use std::sync::Arc;

use shared::api::identity::identity_server::{Identity, IdentityServer};
use shared::api::identity::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use crate::ca::{Authority, CertifyError};

/// Largest request accepted: a CSR is a few hundred bytes, a token under a few KiB.
const MAX_REQUEST: usize = 64 * 1024;

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

/// Serves the identity API over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cert_pem: &str,
    key_pem: &str,
    service: IdentityService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .add_service(IdentityServer::new(service).max_decoding_message_size(MAX_REQUEST))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}
