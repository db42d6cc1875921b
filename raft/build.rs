//! Generates the Raft gRPC code from proto/raft.proto.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/raft.proto");
    // A compact append's commands travel as `Bytes`, so the sender can keep them for its
    // fallback to the JSON form without copying them.
    tonic_prost_build::configure()
        .bytes(".hydrascale.raft.v1.CompactAppend")
        .compile_protos(&["../proto/raft.proto"], &["../proto"])?;
    Ok(())
}
