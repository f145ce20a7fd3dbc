//! Intercepted connections that no listener claims: outbound ones to destinations outside
//! the mesh (passed through or refused, per the outbound policy) and inbound ones to ports
//! with no listener of their own (passed to the application on the port they were for).
//! Either way the bytes go, opaque, to the connection's original destination, and the
//! access log has a line for each.

use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;

use shared::config::{Intercept, OutboundPolicy};

use super::Caller;
use super::tcp::{Line, pump_counted};
use crate::io::{Backend, Stream};
use crate::metrics::Flag;
use crate::tls::MaybeTls;
use crate::worker::{View, Worker};

/// Serves an unclaimed intercepted connection from `caller` that was on its way to `to`
/// (its direction and original destination); with an access log, writes its line.
pub async fn passthrough<B: Backend>(
    worker: &Rc<Worker<B>>,
    view: &View,
    listener: usize,
    (direction, original): (Intercept, SocketAddr),
    down: MaybeTls<B::Stream>,
    caller: &Caller,
) {
    let stats = &view.listeners[listener];
    let Some(plan) = &view.snapshot.intercept else {
        let _ = down.shutdown(Shutdown::Both);
        return;
    };
    let cluster = plan.passthrough;
    let line = Line::start(worker.access_log(), view, listener, cluster, caller);
    if direction == Intercept::Outbound && plan.policy == OutboundPolicy::RegistryOnly {
        stats.error(Flag::NoRoute);
        line.record(Some(Flag::NoRoute), Some(original), (0, 0));
        tracing::debug!(%original, "outbound connection outside the mesh refused (registry_only)");
        let _ = down.shutdown(Shutdown::Both);
        return;
    }
    let Some(up) = super::connect_to::<B>(view, cluster, original, super::Inner::Tcp).await else {
        stats.error(Flag::UpstreamConnectFailure);
        line.record(Some(Flag::UpstreamConnectFailure), Some(original), (0, 0));
        let _ = down.shutdown(Shutdown::Both);
        return;
    };
    let idle = view.snapshot.clusters[cluster].idle_timeout;
    let (outcome, received, sent) = pump_counted(
        &down,
        &up,
        Vec::new(),
        Vec::new(),
        idle,
        stats,
        &view.clusters[cluster],
    )
    .await;
    let flag = (outcome == super::tcp::Pumped::IdleTimeout).then_some(Flag::IdleTimeout);
    if let Some(flag) = flag {
        stats.error(flag);
    }
    line.record(flag, Some(original), (received, sent));
}
