//! Intercepted connections that no listener claims: outbound ones to destinations outside
//! the mesh (passed through or refused, per the outbound policy) and inbound ones to ports
//! with no listener of their own (passed to the application on the port they were for).
//! Either way the bytes go, opaque, to the connection's original destination.

use std::net::{Shutdown, SocketAddr};

use shared::config::{Intercept, OutboundPolicy};

use super::tcp::pump_counted;
use crate::io::{Backend, Stream};
use crate::metrics::Flag;
use crate::tls::MaybeTls;
use crate::worker::View;

/// Serves an unclaimed intercepted connection that was on its way to `original`.
pub async fn passthrough<B: Backend>(
    view: &View,
    listener: usize,
    direction: Intercept,
    original: SocketAddr,
    down: MaybeTls<B::Stream>,
) {
    let stats = &view.listeners[listener];
    let Some(plan) = &view.snapshot.intercept else {
        let _ = down.shutdown(Shutdown::Both);
        return;
    };
    if direction == Intercept::Outbound && plan.policy == OutboundPolicy::RegistryOnly {
        stats.error(Flag::NoRoute);
        tracing::debug!(%original, "outbound connection outside the mesh refused (registry_only)");
        let _ = down.shutdown(Shutdown::Both);
        return;
    }
    let cluster = plan.passthrough;
    let Some(up) = super::connect_to::<B>(view, cluster, original, super::Inner::Tcp).await else {
        stats.error(Flag::UpstreamConnectFailure);
        let _ = down.shutdown(Shutdown::Both);
        return;
    };
    let idle = view.snapshot.clusters[cluster].idle_timeout;
    let (outcome, _, _) = pump_counted(
        &down,
        &up,
        Vec::new(),
        Vec::new(),
        idle,
        stats,
        &view.clusters[cluster],
    )
    .await;
    if outcome == super::tcp::Pumped::IdleTimeout {
        stats.error(Flag::IdleTimeout);
    }
}
