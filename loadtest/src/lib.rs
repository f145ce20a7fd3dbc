//! `tern-load`: open-loop, constant-rate load with coordinated-omission-corrected HDR latency
//! reports, built-in upstreams, and side-by-side comparisons of direct traffic, Tern and peer
//! proxies.
//!
//! It depends on no other Tern crate, so it measures any proxy the same way.
#![forbid(unsafe_code)]

pub mod compare;
pub mod generator;
pub mod h2;
pub mod pki;
pub mod protocol;
pub mod report;
pub mod serve;
