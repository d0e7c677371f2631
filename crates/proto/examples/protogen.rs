//! Regenerates crates/proto/src/gen/ from proto/ with a pure-Rust protobuf compiler (protox),
//! so no system `protoc` is needed. Run from anywhere:
//! `cargo run -p mailfleet-proto --example protogen`.

use std::path::{Path, PathBuf};

/// The file prost writes for package `mailfleet.v1`.
pub const GENERATED_FILE: &str = "mailfleet.v1.rs";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the generated code is checked in.
pub fn checked_in_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/gen")
        .join(GENERATED_FILE)
}

/// Generates the Rust code of every .proto file into `out`.
pub fn generate(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = repo().join("proto");
    let files = protox::compile(["mailfleet/v1/coordinator.proto"], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out)
        .compile_fds(files)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = checked_in_path();
    let dir = target
        .parent()
        .ok_or("generated file has no parent directory")?;
    std::fs::create_dir_all(dir)?;
    generate(dir)?;
    println!("wrote {}", target.display());
    Ok(())
}
