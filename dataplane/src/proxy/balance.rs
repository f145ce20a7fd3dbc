//! Picking an upstream endpoint: round robin over a cluster's endpoints, passing over those
//! whose last connection attempt failed until a backoff has passed (per worker, kept across
//! config changes), as Linkerd's balancer leaves an endpoint it cannot connect to.
//!
//! A dead endpoint (a Pod gone, a node down) would otherwise cost every request that drew
//! it a connect timeout and one of its attempts. When a backoff ends, one attempt probes the
//! endpoint while the others keep passing it over; the probe's failure doubles the backoff,
//! its success forgets the endpoint. When every endpoint is backing off, the next is tried
//! anyway: it may be back, and failing without trying helps nobody.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// How long an endpoint is passed over after its first failed attempt; each failed probe
/// doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest an endpoint is passed over.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long the other attempts keep passing an endpoint over while one probes it (a probe
/// that never reports, its request cancelled, lets another through after this).
const PROBE_WINDOW: Duration = Duration::from_secs(1);

/// Endpoints whose last connection attempt failed, and until when they are passed over.
#[derive(Debug, Default)]
pub struct Failing(RefCell<HashMap<SocketAddr, Backoff>>);

#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    /// The backoff after the probe fails.
    next: Duration,
    /// An attempt was let through to probe it since it last failed.
    probing: bool,
}

impl Failing {
    /// An attempt at `addr`, an endpoint of a cluster, failed: pass it over for a while. A
    /// failure while it is already being passed over (an attempt that started before) does
    /// not lengthen the backoff; a failed probe doubles it. Whether it (re)started a backoff.
    pub fn failed(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        let mut failing = self.0.borrow_mut();
        let backoff = failing.entry(addr).or_insert(Backoff {
            until: now,
            next: FIRST_BACKOFF,
            probing: true,
        });
        if !backoff.probing {
            return false;
        }
        backoff.until = now + backoff.next;
        backoff.probing = false;
        if backoff.next == FIRST_BACKOFF {
            tracing::warn!(%addr, "upstream endpoint failed to connect: passing it over, probing it again after backoffs of 1 s up to 10 s");
        } else {
            tracing::debug!(%addr, passed_over_for = ?backoff.next, "upstream endpoint still failing");
        }
        backoff.next = (backoff.next * 2).min(MAX_BACKOFF);
        true
    }

    /// An attempt at `addr` succeeded: it is healthy again.
    pub fn succeeded(&self, addr: SocketAddr) {
        let mut failing = self.0.borrow_mut();
        if !failing.is_empty() {
            failing.remove(&addr);
        }
    }

    /// Forgets endpoints for which `keep` is false (those gone from the config).
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.0.borrow_mut().retain(|addr, _| keep(addr));
    }

    /// The next of `endpoints` after the round-robin `position`, passing over failing ones
    /// while any is not; `None` when there are none.
    pub fn next(&self, endpoints: &[SocketAddr], position: &Cell<usize>) -> Option<SocketAddr> {
        let take = || {
            let i = position.get();
            position.set(i.wrapping_add(1));
            endpoints.get(i % endpoints.len().max(1)).copied()
        };
        if self.0.borrow().is_empty() {
            return take();
        }
        let now = Instant::now();
        for _ in 0..endpoints.len() {
            let addr = take()?;
            if self.may_try(addr, now) {
                return Some(addr);
            }
        }
        take()
    }

    /// Whether an attempt may go to `addr` at `now`: it is not failing, or its backoff has
    /// ended and this attempt becomes its probe.
    fn may_try(&self, addr: SocketAddr, now: Instant) -> bool {
        let mut failing = self.0.borrow_mut();
        let Some(backoff) = failing.get_mut(&addr) else {
            return true;
        };
        if backoff.until > now {
            return false;
        }
        backoff.probing = true;
        backoff.until = now + PROBE_WINDOW;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
            .collect()
    }

    /// How many of `picks` picks from `endpoints` land on `addr`.
    fn picked(
        failing: &Failing,
        endpoints: &[SocketAddr],
        addr: SocketAddr,
        picks: usize,
    ) -> usize {
        let position = Cell::new(0);
        (0..picks)
            .filter(|_| failing.next(endpoints, &position) == Some(addr))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_endpoint_is_passed_over_then_probed_once() {
        let endpoints = addrs(3);
        let dead = endpoints[1];
        let failing = Failing::default();
        assert_eq!(picked(&failing, &endpoints, dead, 9), 3);

        failing.failed(dead);
        assert_eq!(picked(&failing, &endpoints, dead, 9), 0);
        // When the backoff ends one attempt probes it; the others still pass it over.
        tokio::time::advance(FIRST_BACKOFF).await;
        assert_eq!(picked(&failing, &endpoints, dead, 9), 1);
        // The probe fails: passed over twice as long.
        failing.failed(dead);
        tokio::time::advance(FIRST_BACKOFF).await;
        assert_eq!(picked(&failing, &endpoints, dead, 9), 0);
        tokio::time::advance(FIRST_BACKOFF).await;
        assert_eq!(picked(&failing, &endpoints, dead, 9), 1);
        // The probe succeeds: it takes its share again.
        failing.succeeded(dead);
        assert_eq!(picked(&failing, &endpoints, dead, 9), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_flight_together_back_off_once_and_backoff_is_capped() {
        let endpoints = addrs(2);
        let dead = endpoints[0];
        let failing = Failing::default();
        // Five attempts that were under way together all fail: one backoff, not five.
        for _ in 0..5 {
            failing.failed(dead);
        }
        tokio::time::advance(FIRST_BACKOFF).await;
        assert_eq!(picked(&failing, &endpoints, dead, 4), 1);
        // Probe after probe fails: the backoff stops growing at its cap.
        for _ in 0..10 {
            failing.failed(dead);
            tokio::time::advance(MAX_BACKOFF).await;
            assert_eq!(picked(&failing, &endpoints, dead, 4), 1);
        }
        // A probe that never reports lets another through after the probe window.
        tokio::time::advance(PROBE_WINDOW).await;
        assert_eq!(picked(&failing, &endpoints, dead, 4), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_endpoint_failing_one_is_tried_anyway_and_gone_ones_are_forgotten() {
        let endpoints = addrs(2);
        let failing = Failing::default();
        failing.failed(endpoints[0]);
        failing.failed(endpoints[1]);
        let position = Cell::new(0);
        assert!((0..4).all(|_| failing.next(&endpoints, &position).is_some()));
        assert_eq!(failing.next(&[], &position), None);

        // The first leaves the config (and comes back): it is no longer passed over, while
        // the second still is.
        failing.retain(|addr| *addr == endpoints[1]);
        assert_eq!(picked(&failing, &endpoints, endpoints[0], 4), 4);
    }
}
