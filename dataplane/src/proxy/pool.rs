//! A worker's pool of idle upstream HTTP/1.1 connections, keyed by endpoint address and the
//! cluster that made them (two clusters may reach one address with different TLS).
//!
//! Most recently used first, so a busy worker keeps a few warm connections and lets the
//! rest age out. Connections idle longer than their cluster's idle timeout, or with bytes to
//! read (closed, or sent more than their last response held), are dropped when found; those
//! to endpoints a new config no longer has, when it goes live. A connection of a capped
//! cluster is parked with its [`Slot`]: at the cap, a request may take one to any endpoint
//! ([`Pool::take_any`]) or close one to make room ([`Pool::evict_idle`]). Never shared
//! across workers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::limit::Slot;
use crate::io::{Backend, Stream as _};
use crate::snapshot::{ClusterPlan, Snapshot};
use crate::tls::MaybeTls;

/// Connections parked for one endpoint, oldest first, with their slots under the cluster's
/// connection limit and when they were parked.
type Parked<S> = Vec<(S, Option<Slot>, Instant)>;

/// An endpoint's parked connections, by the cluster that made them.
type ByCluster<S> = HashMap<Arc<str>, Parked<S>>;

/// Idle upstream connections of one worker: by address, then by cluster name (looked up by
/// `&str`, so a lookup clones no shared name).
pub struct Pool<B: Backend> {
    idle: RefCell<HashMap<SocketAddr, ByCluster<MaybeTls<B::Stream>>>>,
}

impl<B: Backend> Default for Pool<B> {
    fn default() -> Self {
        Pool {
            idle: RefCell::default(),
        }
    }
}

impl<B: Backend> Pool<B> {
    /// Takes the most recently parked connection of `cluster` to `addr` that is younger than
    /// the cluster's idle timeout and has nothing to read: an idle connection with input is
    /// one its upstream closed, or one that sent more than its last response held (a body
    /// after a HEAD response, say), which would be read as the next request's response. Such
    /// connections are closed.
    pub fn take(
        &self,
        cluster: &ClusterPlan,
        addr: SocketAddr,
    ) -> Option<(MaybeTls<B::Stream>, Option<Slot>)> {
        let mut idle = self.idle.borrow_mut();
        let parked = idle.get_mut(&addr)?.get_mut(&*cluster.name)?;
        let now = Instant::now();
        // Everything below the newest expired entry is older still.
        if let Some(last_expired) = parked
            .iter()
            .rposition(|(_, _, since)| now.duration_since(*since) > cluster.idle_timeout)
        {
            parked.drain(..=last_expired);
        }
        while let Some((stream, slot, _)) = parked.pop() {
            if !stream.has_input() {
                return Some((stream, slot));
            }
        }
        None
    }

    /// Parks a connection of `cluster` to `addr` that finished an exchange cleanly, unless
    /// the cluster already has `max_idle_per_endpoint` parked there (then it closes). If
    /// requests wait for room under the cluster's connection limit, the first is told.
    pub fn put(
        &self,
        cluster: &ClusterPlan,
        addr: SocketAddr,
        stream: MaybeTls<B::Stream>,
        slot: Option<Slot>,
    ) {
        let mut idle = self.idle.borrow_mut();
        let by_cluster = idle.entry(addr).or_default();
        let parked = match by_cluster.get_mut(&*cluster.name) {
            Some(parked) => parked,
            None => by_cluster.entry(cluster.name.clone()).or_default(),
        };
        if parked.len() < cluster.max_idle_per_endpoint {
            if let Some(slot) = &slot {
                slot.offer();
            }
            parked.push((stream, slot, Instant::now()));
        }
    }

    /// Closes the parked connections that `next`, the config replacing `current`, no longer
    /// has a use for: to endpoints it no longer gives their cluster (a rollout's old Pods),
    /// or of a cluster that now asks another identity (or none, or one) of its endpoints.
    pub fn retain_for(&self, current: &Snapshot, next: &Snapshot) {
        self.idle.borrow_mut().retain(|addr, by_cluster| {
            by_cluster.retain(|name, _| carried_over(current, next, name, *addr));
            !by_cluster.is_empty()
        });
    }

    /// Takes the most recently parked connection of `cluster` to any of its `usable`
    /// endpoints (as [`Pool::take`] would), with its endpoint: for a request at the
    /// cluster's connection limit, which would rather go elsewhere than wait.
    pub fn take_any(
        &self,
        cluster: &ClusterPlan,
        usable: impl Fn(SocketAddr) -> bool,
    ) -> Option<(MaybeTls<B::Stream>, Option<Slot>, SocketAddr)> {
        let mut parked_at: Vec<(Instant, SocketAddr)> = self
            .idle
            .borrow()
            .iter()
            .filter(|(addr, _)| usable(**addr))
            .filter_map(|(addr, by_cluster)| {
                let newest = by_cluster.get(&*cluster.name)?.last()?.2;
                Some((newest, *addr))
            })
            .collect();
        parked_at.sort_unstable_by_key(|(parked, _)| std::cmp::Reverse(*parked));
        parked_at.into_iter().find_map(|(_, addr)| {
            let (stream, slot) = self.take(cluster, addr)?;
            Some((stream, slot, addr))
        })
    }

    /// Closes the longest parked connection of cluster `name` (to any endpoint), giving its
    /// slot back; false when it has none.
    pub fn evict_idle(&self, name: &str) -> bool {
        let mut idle = self.idle.borrow_mut();
        let oldest = idle
            .iter()
            .filter_map(|(addr, by_cluster)| {
                let parked = by_cluster.get(name)?;
                Some((*addr, parked.first()?.2))
            })
            .min_by_key(|(_, since)| *since);
        let Some((addr, _)) = oldest else {
            return false;
        };
        if let Some(parked) = idle.get_mut(&addr).and_then(|c| c.get_mut(name)) {
            parked.remove(0);
        }
        true
    }

    /// Closes every parked connection.
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
    }
}

/// Whether connections of cluster `name` to `addr` made under `current` serve `next`.
pub(crate) fn carried_over(
    current: &Snapshot,
    next: &Snapshot,
    name: &str,
    addr: SocketAddr,
) -> bool {
    current
        .cluster_named(name)
        .zip(next.cluster_named(name))
        .is_some_and(|(was, is)| was.carries_over(is, addr))
}
