//! Compiles `realm/v1/*.proto` with a pure-Rust protobuf compiler (no `protoc` needed) and keeps
//! the descriptor set for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["realm/v1/worker.proto", "realm/v1/realm.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("realm_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // A shard's tensor bytes arrive as slices of the received buffer, not copies of it.
    tonic_prost_build::configure()
        .bytes(".realm.v1.TensorChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
