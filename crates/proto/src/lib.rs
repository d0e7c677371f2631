//! The coordinator protocol between the operator and the relays (proto/mailfleet/v1).
//!
//! The Rust code is generated from the .proto files by `examples/protogen.rs` and checked in
//! (src/gen/); a test fails when it differs from what the .proto files generate. Conversions
//! between these wire types and the domain types live in the crates that own the domain
//! types, each in one module.

/// Generated types, client and server of package `mailfleet.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    include!("gen/mailfleet.v1.rs");
}
