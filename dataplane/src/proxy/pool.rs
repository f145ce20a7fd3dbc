//! A worker's pool of idle upstream HTTP/1.1 connections, keyed by endpoint address.
//!
//! Most recently used first, so a busy worker keeps a few warm connections and lets the
//! rest age out. Connections idle longer than their cluster's idle timeout, or with bytes to
//! read (closed, or sent more than their last response held), are dropped when found. Never
//! shared across workers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::io::{Backend, Stream as _};
use crate::tls::MaybeTls;

/// Connections parked for one endpoint, oldest first, with when they were parked.
type Parked<S> = Vec<(S, Instant)>;

/// Idle upstream connections of one worker.
pub struct Pool<B: Backend> {
    idle: RefCell<HashMap<SocketAddr, Parked<MaybeTls<B::Stream>>>>,
}

impl<B: Backend> Default for Pool<B> {
    fn default() -> Self {
        Pool {
            idle: RefCell::default(),
        }
    }
}

impl<B: Backend> Pool<B> {
    /// Takes the most recently parked connection to `addr` that is younger than `max_idle`
    /// and has nothing to read: an idle connection with input is one its upstream closed, or
    /// one that sent more than its last response held (a body after a HEAD response, say),
    /// which would be read as the next request's response. Such connections are closed.
    pub fn take(&self, addr: SocketAddr, max_idle: Duration) -> Option<MaybeTls<B::Stream>> {
        let mut idle = self.idle.borrow_mut();
        let parked = idle.get_mut(&addr)?;
        let now = Instant::now();
        // Everything below the newest expired entry is older still.
        if let Some(last_expired) = parked
            .iter()
            .rposition(|(_, since)| now.duration_since(*since) > max_idle)
        {
            parked.drain(..=last_expired);
        }
        while let Some((stream, _)) = parked.pop() {
            if !stream.has_input() {
                return Some(stream);
            }
        }
        None
    }

    /// Parks a connection that finished an exchange cleanly, unless `addr` already has
    /// `max_per_endpoint` parked (then it closes).
    pub fn put(&self, addr: SocketAddr, stream: MaybeTls<B::Stream>, max_per_endpoint: usize) {
        let mut idle = self.idle.borrow_mut();
        let parked = idle.entry(addr).or_default();
        if parked.len() < max_per_endpoint {
            parked.push((stream, Instant::now()));
        }
    }

    /// Closes every parked connection.
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
    }
}
