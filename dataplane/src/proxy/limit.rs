//! Connection limits (a cluster's [`ConnectionLimit`], from a BackendPolicy's
//! `connectionLimits`): how many upstream connections of a cluster this worker keeps open,
//! and the requests (or opaque TCP connections) waiting for room.
//!
//! Each worker enforces its share of the proxy's caps ([`share`]), so nothing is shared
//! across workers. An upstream connection of a capped cluster holds a [`Slot`] for as long
//! as it is open, in use or parked in a pool. What to do when every slot is taken (reuse a
//! connection, close an idle one, wait in turn) is the worker's
//! ([`crate::worker::Worker::upstream_room`]); this module counts, and wakes waiters in
//! the order they came.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use shared::config::ConnectionLimit;
use tokio::sync::Notify;

/// A worker's counts for each capped cluster, by cluster name. They outlive configs, as the
/// connections they count do.
pub struct Limits {
    worker: usize,
    workers: usize,
    clusters: RefCell<HashMap<Arc<str>, Counts>>,
}

/// One cluster's count on one worker.
#[derive(Debug, Clone)]
pub struct Counts(Rc<State>);

#[derive(Debug)]
struct State {
    open: Cell<usize>,
    waiting: Cell<usize>,
    /// This worker's share of `max_connections`.
    cap: Cell<usize>,
    /// This worker's share of `max_pending`.
    max_waiting: Cell<usize>,
    /// Told once per slot given back or connection gone idle, and when the caps change.
    changed: Notify,
}

/// An open upstream connection's place under its cluster's cap; dropping it gives the place
/// back (to the longest waiter, if any).
#[derive(Debug)]
pub struct Slot(Rc<State>);

impl State {
    /// Wakes the longest waiter, if anyone waits, to look for room again.
    fn wake_first(&self) {
        if self.waiting.get() > 0 {
            self.changed.notify_one();
        }
    }
}

impl Slot {
    /// Tells the longest waiter for room in its cluster on this worker, if any, that the
    /// connection holding this slot has gone idle: it may reuse or close it.
    pub fn offer(&self) {
        self.0.wake_first();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get().saturating_sub(1));
        self.0.changed.notify_one();
    }
}

/// No room for a new connection: too many were waiting already, or none came in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// Worker `worker`'s share, of `workers`, of a proxy-wide `total`: an even split, with the
/// first `total % workers` workers taking one more, so the shares add up to `total`.
pub fn share(total: u32, worker: usize, workers: usize) -> usize {
    let workers = workers.max(1);
    let total = total as usize;
    total / workers + usize::from(worker % workers < total % workers)
}

/// One in the queue for room, counted while it lives.
pub struct Waiting(Rc<State>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.set(self.0.waiting.get().saturating_sub(1));
    }
}

impl Waiting {
    /// Resolves when a slot may have come free, a connection gone idle, or the caps changed
    /// (this waiter's turn, for the first two).
    pub async fn changed(&self) {
        self.0.changed.notified().await;
    }

    /// A slot, if one is free (it is this waiter's turn).
    pub fn slot(&self) -> Option<Slot> {
        take(&self.0)
    }
}

fn take(state: &Rc<State>) -> Option<Slot> {
    (state.open.get() < state.cap.get()).then(|| {
        state.open.set(state.open.get() + 1);
        Slot(state.clone())
    })
}

impl Counts {
    /// A slot, if one is free and nobody waits ahead.
    pub fn free_slot(&self) -> Option<Slot> {
        if self.has_waiters() {
            return None;
        }
        take(&self.0)
    }

    /// Whether anyone waits for room: a newcomer then waits behind them.
    pub fn has_waiters(&self) -> bool {
        self.0.waiting.get() > 0
    }

    /// Wakes the longest waiter, if any: one that got what it needed some other way than a
    /// wake-up meant it (a slot given back, a connection gone idle), passes that wake-up on.
    pub fn pass_on(&self) {
        self.0.wake_first();
    }

    /// Joins the queue, unless this worker's share of `max_pending` already waits.
    pub fn queue(&self) -> Result<Waiting, Overflow> {
        let waiting = self.0.waiting.get();
        if waiting >= self.0.max_waiting.get() {
            return Err(Overflow);
        }
        self.0.waiting.set(waiting + 1);
        Ok(Waiting(self.0.clone()))
    }
}

impl Limits {
    /// The counts of worker `worker` of `workers`.
    pub fn new(worker: usize, workers: usize) -> Limits {
        Limits {
            worker,
            workers,
            clusters: RefCell::default(),
        }
    }

    /// The counts of cluster `name`, capped at this worker's share of `limit` (the live
    /// config's: the caps change only with [`Limits::apply`] once counting has begun).
    pub fn cluster(&self, name: &Arc<str>, limit: ConnectionLimit) -> Counts {
        let mut clusters = self.clusters.borrow_mut();
        if let Some(counts) = clusters.get(&**name) {
            return counts.clone();
        }
        let state = Rc::new(State {
            open: Cell::new(0),
            waiting: Cell::new(0),
            cap: Cell::new(0),
            max_waiting: Cell::new(0),
            changed: Notify::new(),
        });
        self.set_caps(&state, limit);
        clusters.insert(name.clone(), Counts(state.clone()));
        Counts(state)
    }

    /// Whether anyone waits for room in cluster `name` on this worker.
    pub fn has_waiters(&self, name: &str) -> bool {
        self.clusters
            .borrow()
            .get(name)
            .is_some_and(Counts::has_waiters)
    }

    fn set_caps(&self, state: &State, limit: ConnectionLimit) {
        // At least one connection a worker, or its share of the traffic could not flow.
        let cap = share(limit.max_connections, self.worker, self.workers).max(1);
        state.cap.set(cap);
        state
            .max_waiting
            .set(share(limit.max_pending, self.worker, self.workers));
    }

    /// Brings the caps up to a new config's (`limit_of` a cluster name: its limit, if it
    /// still has one) and wakes every waiter to look again. A cluster that lost its cap lets
    /// its waiters through and forgets its count; its open connections keep their slots,
    /// and a cap that comes back counts afresh.
    pub fn apply(&self, limit_of: impl Fn(&str) -> Option<ConnectionLimit>) {
        self.clusters
            .borrow_mut()
            .retain(|name, counts| match limit_of(name) {
                Some(limit) => {
                    self.set_caps(&counts.0, limit);
                    counts.0.changed.notify_waiters();
                    true
                }
                None => {
                    counts.0.cap.set(usize::MAX);
                    counts.0.changed.notify_waiters();
                    false
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total_and_differ_by_at_most_one() {
        for workers in 1..=5 {
            for total in 0..=12 {
                let shares: Vec<usize> = (0..workers).map(|w| share(total, w, workers)).collect();
                assert_eq!(shares.iter().sum::<usize>(), total as usize, "{shares:?}");
                let (min, max) = (shares.iter().min(), shares.iter().max());
                assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1));
            }
        }
    }

    fn limit(max_connections: u32, max_pending: u32) -> ConnectionLimit {
        ConnectionLimit {
            max_connections,
            max_pending,
        }
    }

    fn run<F: std::future::Future>(test: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, test)
    }

    /// Waits in `counts`' queue until a slot comes.
    async fn wait_for_slot(counts: Counts) -> Slot {
        let waiting = counts.queue().unwrap();
        loop {
            waiting.changed().await;
            if let Some(slot) = waiting.slot() {
                return slot;
            }
        }
    }

    #[test]
    fn slots_go_to_waiters_in_turn_and_the_queue_is_bounded() {
        run(async {
            let limits = Limits::new(0, 1);
            let name: Arc<str> = "c".into();
            let counts = limits.cluster(&name, limit(1, 2));
            let first = counts.free_slot().unwrap();
            assert!(counts.free_slot().is_none());
            let early = tokio::task::spawn_local(wait_for_slot(counts.clone()));
            tokio::task::yield_now().await;
            let late = tokio::task::spawn_local(wait_for_slot(counts.clone()));
            tokio::task::yield_now().await;
            assert_eq!(counts.queue().err(), Some(Overflow));
            drop(first);
            // A newcomer does not take the slot meant for the waiters.
            assert!(counts.free_slot().is_none());
            let second = early.await.unwrap();
            tokio::task::yield_now().await;
            assert!(!late.is_finished());
            drop(second);
            let third = late.await.unwrap();
            assert!(!counts.has_waiters());
            drop(third);
            assert!(counts.free_slot().is_some());
        });
    }

    #[test]
    fn a_new_config_wakes_waiters_to_a_raised_or_lifted_cap() {
        run(async {
            let limits = Limits::new(1, 2);
            let name: Arc<str> = "c".into();
            // Worker 1 of 2 holds one of three connections, and nobody may wait.
            let counts = limits.cluster(&name, limit(3, 1));
            let _held = counts.free_slot().unwrap();
            assert!(counts.free_slot().is_none());
            assert_eq!(counts.queue().err(), Some(Overflow));
            // Only a new config changes the caps: two connections each, one waiter here.
            limits.cluster(&name, limit(40, 2));
            assert!(counts.free_slot().is_none());
            limits.apply(|_| Some(limit(4, 2)));
            let _held_too = counts.free_slot().unwrap();
            let waiter = tokio::task::spawn_local(wait_for_slot(counts.clone()));
            tokio::task::yield_now().await;
            limits.apply(|_| Some(limit(6, 2)));
            let _third = waiter.await.unwrap();
            let waiter = tokio::task::spawn_local(wait_for_slot(counts.clone()));
            tokio::task::yield_now().await;
            limits.apply(|_| None);
            assert!(waiter.await.is_ok());
        });
    }
}
