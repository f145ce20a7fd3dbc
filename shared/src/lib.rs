//! The model both planes share.
//!
//! `tern-proxy` (the data plane) and `tern-control` (the control plane) depend on this crate
//! and never on each other. It owns the proxy configuration model and its validation and the
//! workload identity type, and the gRPC APIs between the planes ([`api`], generated from
//! `proto/`), and (feature `crd`) Tern's Kubernetes custom resource types. It does no network
//! IO itself.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
#[cfg(feature = "crd")]
pub mod crd;
pub mod identity;

pub use config::Config;
pub use identity::SpiffeId;
