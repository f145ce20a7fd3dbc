//! The proxy logic, written once against the [`crate::io`] interface: opaque TCP
//! ([`tcp`]), HTTP/1.1 ([`http1`]) and the per-worker upstream pool ([`pool`]).
//!
//! Rule for every read here: a read that is abandoned (timeout, drain) is never retried on
//! the same socket; the socket is shut down instead. With io_uring an abandoned read stays
//! queued in the kernel and would swallow bytes meant for the next one.

pub mod http1;
pub mod pool;
pub mod tcp;

use std::net::SocketAddr;

use crate::io::Backend;
use crate::worker::View;

/// Most endpoints tried for one connection before giving up.
const CONNECT_ATTEMPTS: usize = 3;

/// Opens a connection to the next endpoints of `cluster`, round robin, trying up to
/// [`CONNECT_ATTEMPTS`] of them within each one's connect timeout.
pub(crate) async fn connect<B: Backend>(
    view: &View,
    cluster: usize,
) -> Option<(B::Stream, SocketAddr)> {
    let plan = view.snapshot.clusters.get(cluster)?;
    let stats = view.clusters.get(cluster)?;
    for _ in 0..plan.endpoints.len().min(CONNECT_ATTEMPTS) {
        let addr = view.next_endpoint(cluster)?;
        match tokio::time::timeout(plan.connect_timeout, B::connect(addr)).await {
            Ok(Ok(stream)) => {
                stats.connected();
                return Some((stream, addr));
            }
            Ok(Err(error)) => {
                stats.connect_failed();
                tracing::debug!(cluster = %plan.name, %addr, %error, "upstream connect failed");
            }
            Err(_) => {
                stats.connect_failed();
                tracing::debug!(cluster = %plan.name, %addr, "upstream connect timed out");
            }
        }
    }
    None
}
