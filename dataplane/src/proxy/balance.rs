//! Picking an upstream endpoint: round robin over a cluster's endpoints, passing over those
//! whose last connection attempt failed until a backoff has passed (per worker, kept across
//! config changes), as Linkerd's balancer leaves an endpoint it cannot connect to, and, for a
//! cluster with outlier detection, those whose HTTP requests failed too many times in a row
//! (ejected), as Linkerd's failure accrual and Envoy's outlier detection do.
//!
//! A dead endpoint (a Pod gone, a node down) would otherwise cost every request that drew
//! it a connect timeout and one of its attempts. When a backoff ends, one attempt probes the
//! endpoint while the others keep passing it over; the probe's failure doubles the backoff,
//! its success forgets the endpoint. When every endpoint is backing off, the next is tried
//! anyway: it may be back, and failing without trying helps nobody.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use shared::config::OutlierDetection;
use tokio::time::Instant;

/// How long an endpoint is passed over after its first failed attempt; each failed probe
/// doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest an endpoint is passed over.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long the other attempts keep passing an endpoint over while one probes it (a probe
/// that never reports, its request cancelled, lets another through after this).
const PROBE_WINDOW: Duration = Duration::from_secs(1);
/// The longest an ejection lasts, in base ejection times.
const MAX_EJECTIONS: u32 = 10;

/// Endpoints being passed over, per worker: those whose last connection attempt failed (an
/// endpoint's, whichever cluster tried it), and, per cluster with outlier detection, those
/// whose requests kept failing (ejected).
#[derive(Debug, Default)]
pub struct Failing {
    connects: Backoffs,
    /// By cluster name.
    outliers: RefCell<HashMap<Arc<str>, Outliers>>,
}

/// One cluster's ejected endpoints, and its endpoints' failed requests in a row.
#[derive(Debug, Default)]
struct Outliers {
    ejected: Backoffs,
    streaks: HashMap<SocketAddr, u32>,
}

/// Endpoints passed over, and until when.
#[derive(Debug, Default)]
struct Backoffs(RefCell<HashMap<SocketAddr, Backoff>>);

#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    /// The backoff after the probe fails.
    next: Duration,
    /// The longest it may grow to.
    max: Duration,
    /// An attempt was let through to probe it since it last failed.
    probing: bool,
    /// When the probe was let through: an answer to an attempt that started before is not
    /// the probe's.
    probe_started: Instant,
}

impl Backoffs {
    /// `addr` failed: passes it over for `first`, or, when this was its probe, twice as long
    /// as last time (up to `max`). How long, when it started a backoff: a failure while it
    /// is already being passed over (an attempt that started before) changes nothing.
    fn fail(&self, addr: SocketAddr, first: Duration, max: Duration) -> Option<Duration> {
        let now = Instant::now();
        let mut backoffs = self.0.borrow_mut();
        let backoff = backoffs.entry(addr).or_insert(Backoff {
            until: now,
            next: first,
            max,
            probing: true,
            probe_started: now,
        });
        if !backoff.probing {
            return None;
        }
        let passed_over = backoff.next;
        backoff.until = now + passed_over;
        backoff.probing = false;
        backoff.next = (passed_over * 2).min(backoff.max);
        Some(passed_over)
    }

    fn contains(&self, addr: &SocketAddr) -> bool {
        let backoffs = self.0.borrow();
        !backoffs.is_empty() && backoffs.contains_key(addr)
    }

    /// Whether `addr` is passed over at `now` (its backoff has not ended, or another
    /// attempt is probing it).
    fn passes_over(&self, addr: SocketAddr, now: Instant) -> bool {
        self.0.borrow().get(&addr).is_some_and(|b| b.until > now)
    }

    /// An attempt goes to `addr`, whose backoff (if any) has ended: it is the probe.
    fn probe(&self, addr: SocketAddr, now: Instant) {
        if let Some(backoff) = self.0.borrow_mut().get_mut(&addr) {
            backoff.probing = true;
            backoff.probe_started = now;
            backoff.until = now + PROBE_WINDOW;
        }
    }
}

impl Failing {
    /// An attempt to connect to `addr`, an endpoint of a cluster, failed: pass it over for a
    /// while ([`Backoffs::fail`], 1 s doubling to 10 s). Whether it (re)started a backoff.
    pub fn failed(&self, addr: SocketAddr) -> bool {
        let Some(passed_over) = self.connects.fail(addr, FIRST_BACKOFF, MAX_BACKOFF) else {
            return false;
        };
        if passed_over == FIRST_BACKOFF {
            tracing::warn!(%addr, "upstream endpoint failed to connect: passing it over, probing it again after backoffs of 1 s up to 10 s");
        } else {
            tracing::debug!(%addr, ?passed_over, "upstream endpoint still failing");
        }
        true
    }

    /// A connection to `addr` was made: it is no longer passed over for failing to connect.
    pub fn succeeded(&self, addr: SocketAddr) {
        let mut connects = self.connects.0.borrow_mut();
        if !connects.is_empty() {
            connects.remove(&addr);
        }
    }

    /// An HTTP request of `cluster` (with outlier detection: `policy`; its endpoints:
    /// `endpoints`) to `addr`, begun at `started`, ended: `ok`, or failed (a 5xx, a reset, a
    /// timeout). A failed request that makes `consecutive_failures` in a row ejects the
    /// endpoint from the cluster, unless more than `max_ejected_percent` of its endpoints
    /// would then be out (counting those whose probe has not answered yet); the probe's
    /// failure ejects it again for twice as long, its success brings it back. Requests that
    /// began before the probe are not the probe. Whether it ejected the endpoint.
    pub fn answered(
        &self,
        (cluster, policy, endpoints): (&Arc<str>, &OutlierDetection, &[SocketAddr]),
        addr: SocketAddr,
        started: Instant,
        ok: bool,
    ) -> bool {
        let mut all = self.outliers.borrow_mut();
        if !all.contains_key(&**cluster) {
            if ok {
                return false;
            }
            all.insert(cluster.clone(), Outliers::default());
        }
        let Some(outliers) = all.get_mut(&**cluster) else {
            return false;
        };
        let base = policy.base_ejection_time;
        let max = base.saturating_mul(MAX_EJECTIONS);
        let ejected = outliers.ejected.0.borrow().get(&addr).copied();
        if let Some(ejection) = ejected {
            if !ejection.probing || started < ejection.probe_started {
                return false;
            }
            if ok {
                outliers.ejected.0.borrow_mut().remove(&addr);
                tracing::info!(%cluster, %addr, "ejected upstream endpoint answered its probe: back in rotation");
                return false;
            }
            let again = outliers.ejected.fail(addr, base, max);
            if let Some(passed_over) = again {
                tracing::debug!(%cluster, %addr, ?passed_over, "ejected upstream endpoint failed its probe");
            }
            return again.is_some();
        }
        if ok {
            outliers.streaks.remove(&addr);
            let idle = outliers.streaks.is_empty() && outliers.ejected.0.borrow().is_empty();
            if idle {
                // Nothing left to remember: picks for every cluster take the fast path again.
                all.remove(&**cluster);
            }
            return false;
        }
        let streak = outliers.streaks.entry(addr).or_insert(0);
        *streak += 1;
        if *streak < policy.consecutive_failures {
            return false;
        }
        let out = endpoints
            .iter()
            .filter(|a| outliers.ejected.contains(a))
            .count();
        if (out + 1) * 100 > policy.max_ejected_percent as usize * endpoints.len() {
            return false;
        }
        outliers.streaks.remove(&addr);
        outliers.ejected.fail(addr, base, max);
        tracing::warn!(%cluster, %addr, failures = policy.consecutive_failures, ejected_for = ?base, "upstream endpoint failed requests in a row: ejected, probed again after the ejection time");
        true
    }

    /// Forgets endpoints for which `keep` is false (those gone from the config), and the
    /// ejections and streaks of clusters for which `keeps_outliers` is false (gone, or no
    /// longer with outlier detection).
    pub fn retain(
        &self,
        keep: impl Fn(&SocketAddr) -> bool,
        keeps_outliers: impl Fn(&str, &SocketAddr) -> bool,
    ) {
        self.connects.0.borrow_mut().retain(|addr, _| keep(addr));
        self.outliers.borrow_mut().retain(|cluster, outliers| {
            outliers
                .ejected
                .0
                .borrow_mut()
                .retain(|addr, _| keeps_outliers(cluster, addr));
            outliers
                .streaks
                .retain(|addr, _| keeps_outliers(cluster, addr));
            !outliers.ejected.0.borrow().is_empty() || !outliers.streaks.is_empty()
        });
    }

    /// Whether `addr` is passed over now for `cluster`: it failed to connect, or the cluster
    /// ejected it.
    pub fn passed_over(&self, cluster: &str, addr: SocketAddr) -> bool {
        let outliers = self.outliers.borrow();
        let ejected = self.ejected_by(&outliers, cluster);
        self.passes_over(ejected, addr, Instant::now())
    }

    /// The next of `endpoints` after the round-robin `position`, passing over failing ones
    /// (those that failed to connect, and those `cluster` ejected) while any is not; `None`
    /// when there are none.
    pub fn next(
        &self,
        cluster: &str,
        endpoints: &[SocketAddr],
        position: &Cell<usize>,
    ) -> Option<SocketAddr> {
        let take = || {
            let i = position.get();
            position.set(i.wrapping_add(1));
            endpoints.get(i % endpoints.len().max(1)).copied()
        };
        let outliers = self.outliers.borrow();
        let ejected = self.ejected_by(&outliers, cluster);
        if self.connects.0.borrow().is_empty() && ejected.is_none() {
            return take();
        }
        let now = Instant::now();
        for _ in 0..endpoints.len() {
            let addr = take()?;
            if !self.passes_over(ejected, addr, now) {
                self.chose(ejected, addr, now);
                return Some(addr);
            }
        }
        take()
    }

    /// Of two of `endpoints` drawn at random (`roll`), the one with fewer requests under way
    /// (`load`), passing over failing ones; round robin ([`Failing::next`]) when neither
    /// will do, or there are fewer than two.
    pub fn least_of_two(
        &self,
        (cluster, endpoints): (&str, &[SocketAddr]),
        load: &Load,
        mut roll: impl FnMut() -> u32,
        position: &Cell<usize>,
    ) -> Option<SocketAddr> {
        let n = endpoints.len();
        if n < 2 {
            return self.next(cluster, endpoints, position);
        }
        let first = roll() as usize % n;
        let mut second = roll() as usize % (n - 1);
        if second >= first {
            second += 1;
        }
        let outliers = self.outliers.borrow();
        let ejected = self.ejected_by(&outliers, cluster);
        let quiet = self.connects.0.borrow().is_empty() && ejected.is_none();
        let now = Instant::now();
        let chosen = [endpoints[first], endpoints[second]]
            .into_iter()
            .filter(|addr| quiet || !self.passes_over(ejected, *addr, now))
            .min_by_key(|addr| load.of(*addr));
        match chosen {
            Some(addr) => {
                if !quiet {
                    self.chose(ejected, addr, now);
                }
                Some(addr)
            }
            None => self.next(cluster, endpoints, position),
        }
    }

    /// The endpoints `cluster` has ejected, if any (without hashing its name when no
    /// cluster has).
    fn ejected_by<'a>(
        &self,
        outliers: &'a HashMap<Arc<str>, Outliers>,
        cluster: &str,
    ) -> Option<&'a Backoffs> {
        if outliers.is_empty() {
            return None;
        }
        outliers
            .get(cluster)
            .map(|o| &o.ejected)
            .filter(|e| !e.0.borrow().is_empty())
    }

    /// Whether `addr` is passed over at `now`: it failed to connect, or its cluster ejected
    /// it (`ejected`).
    fn passes_over(&self, ejected: Option<&Backoffs>, addr: SocketAddr, now: Instant) -> bool {
        self.connects.passes_over(addr, now) || ejected.is_some_and(|e| e.passes_over(addr, now))
    }

    /// An attempt goes to `addr`: where it was failing, it is the probe.
    fn chose(&self, ejected: Option<&Backoffs>, addr: SocketAddr, now: Instant) {
        self.connects.probe(addr, now);
        if let Some(ejected) = ejected {
            ejected.probe(addr, now);
        }
    }
}

/// Requests (and opaque TCP connections) under way to each endpoint on one worker, for
/// clusters that pick the least loaded ([`Failing::least_of_two`]); kept across config
/// changes.
#[derive(Debug, Default)]
pub struct Load(RefCell<HashMap<SocketAddr, u32>>);

impl Load {
    /// How many are under way to `addr`.
    pub fn of(&self, addr: SocketAddr) -> u32 {
        self.0.borrow().get(&addr).copied().unwrap_or(0)
    }

    /// One more is under way to `addr`, until the guard is dropped.
    pub fn start(self: &Rc<Self>, addr: SocketAddr) -> InFlight {
        *self.0.borrow_mut().entry(addr).or_insert(0) += 1;
        InFlight {
            load: self.clone(),
            addr,
        }
    }
}

/// A request (or connection) under way, counted in its endpoint's [`Load`] while it lives.
#[derive(Debug)]
pub struct InFlight {
    load: Rc<Load>,
    addr: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut load = self.load.0.borrow_mut();
        if let Some(count) = load.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                load.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "c";

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
            .filter(|_| failing.next(CLUSTER, endpoints, &position) == Some(addr))
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
        assert!((0..4).all(|_| failing.next(CLUSTER, &endpoints, &position).is_some()));
        assert_eq!(failing.next(CLUSTER, &[], &position), None);

        // The first leaves the config (and comes back): it is no longer passed over, while
        // the second still is.
        failing.retain(|addr| *addr == endpoints[1], |_, _| true);
        assert_eq!(picked(&failing, &endpoints, endpoints[0], 4), 4);
    }
    fn outliers(consecutive_failures: u32, max_ejected_percent: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_failures,
            base_ejection_time: Duration::from_secs(30),
            max_ejected_percent,
        }
    }

    /// Reports an answer from `addr` to a request of [`CLUSTER`] begun now.
    fn answer(
        failing: &Failing,
        policy: &OutlierDetection,
        endpoints: &[SocketAddr],
        addr: SocketAddr,
        ok: bool,
    ) -> bool {
        let name: Arc<str> = CLUSTER.into();
        failing.answered((&name, policy, endpoints), addr, Instant::now(), ok)
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_eject_an_endpoint_until_its_probe_answers() {
        let endpoints = addrs(3);
        let bad = endpoints[0];
        let policy = outliers(3, 50);
        let failing = Failing::default();
        let answer = |ok| answer(&failing, &policy, &endpoints, bad, ok);
        // Two failures, then a good answer: the streak starts again.
        assert!(!answer(false));
        assert!(!answer(false));
        assert!(!answer(true));
        assert!(!answer(false));
        assert!(!answer(false));
        assert_eq!(picked(&failing, &endpoints, bad, 9), 3);
        // A request under way before the ejection.
        let before = Instant::now();
        tokio::time::advance(Duration::from_millis(1)).await;
        // The third failure in a row ejects it.
        assert!(answer(false));
        assert_eq!(picked(&failing, &endpoints, bad, 9), 0);
        // Another cluster with the same endpoint still takes it.
        let position = Cell::new(0);
        assert!((0..3).any(|_| failing.next("other", &endpoints, &position) == Some(bad)));
        // After the ejection time, one probe. The request under way before answers well:
        // it is not the probe, the endpoint stays out.
        tokio::time::advance(policy.base_ejection_time).await;
        assert_eq!(picked(&failing, &endpoints, bad, 9), 1);
        let name: Arc<str> = CLUSTER.into();
        assert!(!failing.answered((&name, &policy, &endpoints), bad, before, true));
        assert_eq!(picked(&failing, &endpoints, bad, 9), 0);
        // The probe fails: ejected twice as long.
        assert!(answer(false));
        tokio::time::advance(policy.base_ejection_time).await;
        assert_eq!(picked(&failing, &endpoints, bad, 9), 0);
        tokio::time::advance(policy.base_ejection_time).await;
        assert_eq!(picked(&failing, &endpoints, bad, 9), 1);
        // The next probe answers: back in rotation.
        assert!(!answer(true));
        assert_eq!(picked(&failing, &endpoints, bad, 9), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_maximum_share_of_endpoints_is_ejected() {
        let endpoints = addrs(4);
        let policy = outliers(1, 50);
        let failing = Failing::default();
        let fail =
            |addr, endpoints: &[SocketAddr]| answer(&failing, &policy, endpoints, addr, false);
        assert!(fail(endpoints[0], &endpoints));
        assert!(fail(endpoints[1], &endpoints));
        // A third would leave fewer than half.
        assert!(!fail(endpoints[2], &endpoints));
        assert_eq!(picked(&failing, &endpoints, endpoints[2], 8), 4);
        // A cluster of one never has it ejected at 50%.
        let one = [endpoints[3]];
        assert!(!fail(one[0], &one));
        // An endpoint gone from the cluster is forgotten: room for another.
        failing.retain(|_| true, |_, addr| *addr != endpoints[0]);
        assert!(fail(endpoints[2], &endpoints));
        // A cluster that no longer has outlier detection forgets its ejections.
        failing.retain(|_| true, |_, _| false);
        assert_eq!(picked(&failing, &endpoints, endpoints[1], 8), 2);
    }

    #[test]
    fn the_less_loaded_of_two_is_picked_and_a_failing_one_passed_over() {
        let endpoints = addrs(2);
        let failing = Failing::default();
        let load = Rc::new(Load::default());
        let position = Cell::new(0);
        // Draws that put the first endpoint first, then the second, and so on.
        let rolls = [0u32, 0, 1, 0];
        let mut drawn = 0;
        let mut pick = || {
            let roll = || {
                drawn += 1;
                rolls[(drawn - 1) % rolls.len()]
            };
            failing.least_of_two((CLUSTER, &endpoints), &load, roll, &position)
        };
        let busy = load.start(endpoints[0]);
        assert!((0..8).all(|_| pick() == Some(endpoints[1])));
        // The second under way once, the first twice: still the second.
        let other = load.start(endpoints[1]);
        let _second_request = load.start(endpoints[0]);
        assert!((0..8).all(|_| pick() == Some(endpoints[1])));
        drop((busy, other));
        assert_eq!(load.of(endpoints[0]), 1);
        assert_eq!(load.of(endpoints[1]), 0);
        // A failing endpoint is passed over however idle it is.
        failing.failed(endpoints[1]);
        assert!((0..8).all(|_| pick() == Some(endpoints[0])));
    }
}
