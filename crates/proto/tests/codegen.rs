//! The checked-in generated code equals what the .proto files generate, so the two never
//! drift apart. `cargo run -p mailfleet-proto --example protogen` (or `hack/gen.sh`)
//! regenerates it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

#[path = "../examples/protogen.rs"]
#[allow(dead_code)]
mod protogen;

#[test]
fn generated_code_matches_the_proto_files() {
    let out = std::env::temp_dir().join(format!("mailfleet-protogen-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    protogen::generate(&out).unwrap();
    let fresh = std::fs::read_to_string(out.join(protogen::GENERATED_FILE)).unwrap();
    let checked_in = std::fs::read_to_string(protogen::checked_in_path()).unwrap();
    assert!(
        fresh == checked_in,
        "crates/proto/src/gen/{} differs from proto/: run `hack/gen.sh`",
        protogen::GENERATED_FILE
    );
}
