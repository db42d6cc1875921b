//! Generates the admin gRPC code from proto/admin.proto.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/admin.proto");
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/admin.proto"], &["proto"])?;
    Ok(())
}
