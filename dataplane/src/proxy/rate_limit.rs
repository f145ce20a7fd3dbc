//! Caps on the HTTP requests a second a listener serves ([`config::RateLimit`]): in all, for
//! each caller identity, and for the callers of an override together.
//!
//! A cap is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): the
//! theoretical arrival time of the next request, in one atomic word that every worker of the
//! proxy updates with a compare-and-swap, so a cap holds for the whole proxy however
//! `SO_REUSEPORT` spread the connections. These words (a request touches at most two: the
//! caller's cap and the total) are all workers share on a request's path, and only on a
//! rate-limited listener. A caller's own cap is found in a map under a
//! lock once per connection (and again after a config change that gives the listener a new
//! limiter), never per request. Limiters outlive config changes that leave their listener's
//! `rate_limit` as it was ([`RateLimiter::carries_over`]), so a push does not refill them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shared::SpiffeId;
use shared::config::RateLimit;
use shared::identity::IdentityPattern;

/// Nanoseconds in the burst each cap allows: one second's requests.
const BURST_NANOS: u64 = 1_000_000_000;

/// The size of the callers' map (busy callers included) at which the callers no connection
/// uses are forgotten (a caller coming back starts with a full burst).
const IDLE_CALLERS_KEPT: usize = 4096;

/// The per-identity caps, and the size at which to forget idle ones next.
#[derive(Debug, Default)]
struct Callers {
    caps: HashMap<Option<SpiffeId>, Arc<Cap>>,
    forget_at: usize,
}

/// One listener's caps, shared by every worker (and by later snapshots while its config
/// stays the same).
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimit,
    /// The clock's origin: caps count nanoseconds from it.
    epoch: Instant,
    total: Option<Cap>,
    /// Overrides in config order: the first whose patterns match a caller is its cap.
    overrides: Vec<(Vec<IdentityPattern>, Arc<Cap>)>,
    /// Each caller's cap at `per_identity` (callers over plaintext share the `None` one).
    callers: Mutex<Callers>,
}

impl RateLimiter {
    /// The caps `config` (which passed validation) sets.
    pub fn new(config: &RateLimit) -> RateLimiter {
        RateLimiter {
            config: config.clone(),
            epoch: Instant::now(),
            total: config.total.map(Cap::new),
            overrides: config
                .overrides
                .iter()
                .map(|o| {
                    // Validation parsed every pattern.
                    let patterns = o.identities.iter().filter_map(|p| p.parse().ok()).collect();
                    (patterns, Arc::new(Cap::new(o.requests_per_second)))
                })
                .collect(),
            callers: Mutex::new(Callers {
                caps: HashMap::new(),
                forget_at: IDLE_CALLERS_KEPT,
            }),
        }
    }

    /// Whether a listener with `next` as its rate limit can go on with this limiter (and
    /// what it has counted).
    pub fn carries_over(&self, next: &RateLimit) -> bool {
        self.config == *next
    }

    /// The rate limit it enforces.
    pub fn config(&self) -> &RateLimit {
        &self.config
    }

    /// The caps a caller with `identity` answers to under this limiter.
    pub fn caps_for(self: &Arc<Self>, identity: Option<&SpiffeId>) -> CallerCaps {
        let own = match identity.and_then(|id| {
            self.overrides
                .iter()
                .find(|(patterns, _)| patterns.iter().any(|p| p.matches(id)))
        }) {
            Some((_, cap)) => Some(cap.clone()),
            None => self.config.per_identity.map(|rate| {
                // A worker that panicked holding the lock left the map whole (an insert or a
                // retain), so its contents are still good.
                let mut callers = self
                    .callers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Forgetting looks at every caller: done again only once as many more have
                // come, so that many connected callers do not make each new one pay for all.
                if callers.caps.len() >= callers.forget_at {
                    callers.caps.retain(|_, cap| Arc::strong_count(cap) > 1);
                    callers.forget_at = IDLE_CALLERS_KEPT.max(2 * callers.caps.len());
                }
                callers
                    .caps
                    .entry(identity.cloned())
                    .or_insert_with(|| Arc::new(Cap::new(rate)))
                    .clone()
            }),
        };
        CallerCaps {
            limiter: self.clone(),
            own,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The caps one caller answers to under one limiter: its own (per identity, or an
/// override's) and the listener's total.
#[derive(Debug, Clone)]
pub struct CallerCaps {
    limiter: Arc<RateLimiter>,
    own: Option<Arc<Cap>>,
}

impl CallerCaps {
    /// Whether these caps are `limiter`'s.
    pub fn under(&self, limiter: &Arc<RateLimiter>) -> bool {
        Arc::ptr_eq(&self.limiter, limiter)
    }

    /// Takes a request from each cap; false, taking nothing, when one has none left.
    pub fn admit(&self) -> bool {
        self.admit_at(self.limiter.now())
    }

    /// [`CallerCaps::admit`] at `now` (nanoseconds from the limiter's epoch).
    fn admit_at(&self, now: u64) -> bool {
        if let Some(own) = &self.own
            && !own.take(now)
        {
            return false;
        }
        if let Some(total) = &self.limiter.total
            && !total.take(now)
        {
            // Refused in all: the caller's own cap keeps the request it lent.
            if let Some(own) = &self.own {
                own.give_back();
            }
            return false;
        }
        true
    }
}

/// One cap: `rate` requests a second with a burst of a second's, as GCRA.
#[derive(Debug)]
struct Cap {
    /// Nanoseconds one request is worth.
    interval: u64,
    /// When the cap would be back to full, in nanoseconds from the limiter's epoch, if no
    /// request came: each admitted request pushes it `interval` later.
    full_at: AtomicU64,
}

impl Cap {
    fn new(rate: u32) -> Cap {
        Cap {
            interval: (BURST_NANOS / u64::from(rate.max(1))).max(1),
            full_at: AtomicU64::new(0),
        }
    }

    /// Takes a request at `now`, unless that would put the cap more than a burst behind.
    fn take(&self, now: u64) -> bool {
        self.full_at
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |full_at| {
                let next = full_at.max(now) + self.interval;
                (next - now <= BURST_NANOS).then_some(next)
            })
            .is_ok()
    }

    /// Returns a request [`Cap::take`] took.
    fn give_back(&self) {
        let _ = self
            .full_at
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |full_at| {
                Some(full_at.saturating_sub(self.interval))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(
        total: Option<u32>,
        per_identity: Option<u32>,
        overrides: &[(&str, u32)],
    ) -> RateLimit {
        RateLimit {
            total,
            per_identity,
            overrides: overrides
                .iter()
                .map(|&(pattern, rate)| shared::config::RateLimitOverride {
                    identities: vec![pattern.to_owned()],
                    requests_per_second: rate,
                })
                .collect(),
        }
    }

    fn limiter(
        total: Option<u32>,
        per_identity: Option<u32>,
        overrides: &[(&str, u32)],
    ) -> Arc<RateLimiter> {
        Arc::new(RateLimiter::new(&config(total, per_identity, overrides)))
    }

    fn id(text: &str) -> SpiffeId {
        text.parse().unwrap()
    }

    /// How many of `n` requests at `now` a cap admits.
    fn admitted(cap: &Cap, now: u64, n: usize) -> usize {
        (0..n).filter(|_| cap.take(now)).count()
    }

    #[test]
    fn a_cap_allows_a_second_of_burst_then_its_rate() {
        let cap = Cap::new(10);
        assert_eq!(admitted(&cap, 0, 20), 10);
        // 0.35 s later, three requests' worth has come back.
        assert_eq!(admitted(&cap, 350_000_000, 20), 3);
        // Idle for a long time, it is full again, and no fuller.
        assert_eq!(admitted(&cap, 60 * BURST_NANOS, 20), 10);
    }

    #[test]
    fn a_request_given_back_can_be_taken_again() {
        let cap = Cap::new(2);
        assert_eq!(admitted(&cap, 0, 3), 2);
        cap.give_back();
        assert_eq!(admitted(&cap, 0, 3), 1);
    }

    #[test]
    fn each_caller_has_its_own_cap_and_all_share_the_total() {
        let limiter = limiter(Some(5), Some(3), &[]);
        let a = limiter.caps_for(Some(&id("spiffe://td/ns/a/sa/a")));
        let b = limiter.caps_for(Some(&id("spiffe://td/ns/b/sa/b")));
        let count = |caps: &CallerCaps| (0..10).filter(|_| caps.admit_at(0)).count();
        assert_eq!(count(&a), 3);
        // b has its own three, but only two are left in all.
        assert_eq!(count(&b), 2);
        // A second connection of a's is the same caller.
        let again = limiter.caps_for(Some(&id("spiffe://td/ns/a/sa/a")));
        assert_eq!(count(&again), 0);
    }

    #[test]
    fn a_request_the_total_refuses_costs_the_caller_nothing() {
        let limiter = limiter(Some(2), Some(2), &[]);
        let plain = limiter.caps_for(None);
        let other = limiter.caps_for(Some(&id("spiffe://td/ns/a/sa/a")));
        assert!(other.admit_at(0) && other.admit_at(0));
        // The total is spent: plaintext callers are refused without spending their own.
        assert!(!plain.admit_at(0));
        assert_eq!(plain.own.as_ref().map(|cap| admitted(cap, 0, 5)), Some(2));
    }

    #[test]
    fn an_override_gives_its_callers_one_cap_of_their_own() {
        let limiter = limiter(None, Some(1), &[("spiffe://td/ns/ops/sa/*", 4)]);
        let x = limiter.caps_for(Some(&id("spiffe://td/ns/ops/sa/x")));
        let y = limiter.caps_for(Some(&id("spiffe://td/ns/ops/sa/y")));
        let other = limiter.caps_for(Some(&id("spiffe://td/ns/shop/sa/web")));
        let count = |caps: &CallerCaps| (0..10).filter(|_| caps.admit_at(0)).count();
        assert_eq!(count(&x), 4);
        assert_eq!(count(&y), 0);
        assert_eq!(count(&other), 1);
        // Plaintext callers match no override.
        assert_eq!(count(&limiter.caps_for(None)), 1);
    }

    #[test]
    fn only_a_total_leaves_callers_without_caps_of_their_own() {
        let limiter = limiter(Some(1), None, &[]);
        let caps = limiter.caps_for(Some(&id("spiffe://td/ns/a/sa/a")));
        assert!(caps.own.is_none());
        assert!(caps.admit_at(0));
        assert!(!caps.admit_at(0));
        assert!(caps.under(&limiter));
        assert!(limiter.carries_over(&config(Some(1), None, &[])));
        assert!(!limiter.carries_over(&config(Some(2), None, &[])));
    }

    #[test]
    fn idle_callers_are_forgotten_past_a_bound_and_busy_ones_kept() {
        let limiter = limiter(None, Some(1), &[]);
        let busy = limiter.caps_for(Some(&id("spiffe://td/ns/a/sa/busy")));
        assert!(busy.admit_at(0));
        for i in 0..IDLE_CALLERS_KEPT + 10 {
            drop(limiter.caps_for(Some(&id(&format!("spiffe://td/ns/a/sa/c{i}")))));
        }
        let callers = limiter.callers.lock().unwrap().caps.len();
        assert!(callers <= IDLE_CALLERS_KEPT, "{callers}");
        // The caller with a connection kept its count.
        let again = limiter.caps_for(Some(&id("spiffe://td/ns/a/sa/busy")));
        assert!(!again.admit_at(0));
    }
}
