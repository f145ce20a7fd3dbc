//! Simulated proxies: discovery streams that say hello, take configs and ACK them, without
//! a data plane behind them. Many share one TLS connection (HTTP/2 streams), so hundreds fit
//! on a small machine; the convergence test and the propagation benchmark use them.

use std::net::SocketAddr;

use shared::api::discovery::discovery_client::DiscoveryClient;
use shared::api::discovery::watch_request::Kind;
use shared::api::discovery::{self as pb, ProxyConfig, WatchRequest};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A TLS connection to `tern-control` at `address`, verified against `root_pem`.
pub async fn channel(
    address: SocketAddr,
    root_pem: &str,
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name("tern-control");
    Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect()
        .await
}

/// The Hello of a proxy for Pod `default/<workload>` that is `spiffe_id`, proven by `token`,
/// listening for each of `services` (port 80) on an ephemeral port.
pub fn hello(spiffe_id: &str, token: &str, workload: &str, services: &[String]) -> pb::Hello {
    pb::Hello {
        spiffe_id: spiffe_id.to_owned(),
        credential: token.to_owned(),
        namespace: "default".into(),
        workload: workload.to_owned(),
        outbound: services
            .iter()
            .map(|s| pb::Outbound {
                service: format!("{s}.default"),
                port: 80,
                listen: "127.0.0.1:0".into(),
                address: String::new(),
            })
            .collect(),
        running_version: 0,
    }
}

/// One simulated proxy's stream.
pub struct SimulatedProxy {
    configs: tonic::Streaming<ProxyConfig>,
    answers: mpsc::Sender<WatchRequest>,
}

impl SimulatedProxy {
    /// Opens a stream on `channel` and says `hello`.
    pub async fn connect(
        channel: Channel,
        hello: pb::Hello,
    ) -> Result<SimulatedProxy, tonic::Status> {
        let (answers, outgoing) = mpsc::channel(4);
        answers
            .send(WatchRequest {
                kind: Some(Kind::Hello(hello)),
            })
            .await
            .map_err(|_| tonic::Status::internal("the request stream closed"))?;
        let configs = DiscoveryClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .watch(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        Ok(SimulatedProxy { configs, answers })
    }

    /// Waits for the next config and ACKs it; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<ProxyConfig>, tonic::Status> {
        let Some(config) = self.configs.message().await? else {
            return Ok(None);
        };
        let ack = WatchRequest {
            kind: Some(Kind::Ack(pb::Ack {
                version: config.version,
            })),
        };
        // A closed request stream shows as the next read's error.
        let _ = self.answers.send(ack).await;
        Ok(Some(config))
    }
}
