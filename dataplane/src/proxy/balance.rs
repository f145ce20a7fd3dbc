//! Picking an upstream endpoint: round robin over a cluster's endpoints, passing over those
//! whose last connection attempt failed until a backoff has passed (per worker, kept across
//! config changes), as Linkerd's balancer leaves an endpoint it cannot connect to.
//!
//! A dead endpoint (a Pod gone, a node down) would otherwise cost every request that drew
//! it a connect timeout and one of its attempts. When every endpoint is backing off, the
//! next is tried anyway: it may be back, and failing without trying helps nobody.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// How long an endpoint is passed over after its first failed attempt; each further failure
/// doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest an endpoint is passed over.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Endpoints whose last connection attempt failed, and until when they are passed over.
#[derive(Debug, Default)]
pub struct Failing(RefCell<HashMap<SocketAddr, Backoff>>);

#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    /// The backoff after the next failure.
    next: Duration,
}

impl Failing {
    /// Whether `addr` is being passed over at `now`.
    fn passes_over(&self, addr: SocketAddr, now: Instant) -> bool {
        self.0.borrow().get(&addr).is_some_and(|b| b.until > now)
    }

    /// An attempt at `addr` failed: pass it over for a while (longer each time in a row).
    pub fn failed(&self, addr: SocketAddr) {
        let now = Instant::now();
        let mut failing = self.0.borrow_mut();
        let backoff = failing.entry(addr).or_insert(Backoff {
            until: now,
            next: FIRST_BACKOFF,
        });
        backoff.until = now + backoff.next;
        tracing::debug!(%addr, passed_over_for = ?backoff.next, "upstream endpoint failing");
        backoff.next = (backoff.next * 2).min(MAX_BACKOFF);
    }

    /// An attempt at `addr` succeeded: it is healthy again.
    pub fn succeeded(&self, addr: SocketAddr) {
        let mut failing = self.0.borrow_mut();
        if !failing.is_empty() {
            failing.remove(&addr);
        }
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
            if !self.passes_over(addr, now) {
                return Some(addr);
            }
        }
        take()
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

    #[tokio::test(start_paused = true)]
    async fn a_failed_endpoint_is_passed_over_until_its_backoff_passes() {
        let endpoints = addrs(3);
        let failing = Failing::default();
        let position = Cell::new(0);
        let round = |failing: &Failing| -> Vec<SocketAddr> {
            (0..3)
                .map(|_| failing.next(&endpoints, &position).unwrap())
                .collect()
        };
        assert_eq!(round(&failing), endpoints);

        failing.failed(endpoints[1]);
        let picked = round(&failing);
        assert!(!picked.contains(&endpoints[1]), "{picked:?}");

        // After the first backoff it is tried again; a second failure passes it over twice
        // as long.
        tokio::time::advance(FIRST_BACKOFF).await;
        assert!(round(&failing).contains(&endpoints[1]));
        failing.failed(endpoints[1]);
        tokio::time::advance(FIRST_BACKOFF).await;
        assert!(!round(&failing).contains(&endpoints[1]));
        tokio::time::advance(FIRST_BACKOFF).await;
        assert!(round(&failing).contains(&endpoints[1]));

        // A success forgets the failures.
        failing.succeeded(endpoints[1]);
        failing.failed(endpoints[1]);
        tokio::time::advance(FIRST_BACKOFF).await;
        assert!(round(&failing).contains(&endpoints[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped_and_every_endpoint_failing_still_gets_tried() {
        let endpoints = addrs(2);
        let failing = Failing::default();
        let position = Cell::new(0);
        for _ in 0..10 {
            failing.failed(endpoints[0]);
        }
        tokio::time::advance(MAX_BACKOFF).await;
        assert!(!failing.passes_over(endpoints[0], Instant::now()));

        failing.failed(endpoints[0]);
        failing.failed(endpoints[1]);
        let picked: Vec<_> = (0..4)
            .map(|_| failing.next(&endpoints, &position))
            .collect();
        assert!(picked.iter().all(Option::is_some), "{picked:?}");
        assert_eq!(failing.next(&[], &position), None);
    }
}
