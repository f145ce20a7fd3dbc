//! Compiles the `.proto` APIs with protox (a protobuf compiler in Rust, so no `protoc` needs
//! installing) and generates prost messages and tonic clients and servers from them.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tern/identity/v1/identity.proto",
        "proto/tern/discovery/v1/discovery.proto",
    ];
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
