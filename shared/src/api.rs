//! The gRPC APIs between the planes, generated at build time from `shared/proto/` (prost
//! messages, tonic clients and servers). Only wire types live here; each side converts them
//! into its own domain types at the boundary.

/// `tern.identity.v1`: the CA's `Certify` call.
pub mod identity {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("tern.identity.v1");
}

/// `tern.discovery.v1`: config distribution (`Watch`).
pub mod discovery {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("tern.discovery.v1");
}
