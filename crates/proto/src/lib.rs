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

/// The TLS server name a relay verifies on the coordinator's certificate, whatever address it
/// dials (a Service name in a cluster, 127.0.0.1 on devcluster). The operator's CA issues the
/// coordinator's certificate for this name.
pub const COORDINATOR_SERVER_NAME: &str = "coordinator.mailfleet.internal";

/// Environment variables of a relay pod in coordinated mode. The operator fills them from the
/// pool's identity Secret (`<pool>-relay-identity`) and the listener's TLS Secret, so relays need
/// no mounted files.
pub mod env {
    /// PEM of the CA that issued the coordinator's certificate (and the relay's).
    pub const COORDINATOR_CA: &str = "MAILFLEET_COORDINATOR_CA";
    /// PEM certificate chain the relay presents to the coordinator (mTLS).
    pub const RELAY_CERT: &str = "MAILFLEET_RELAY_CERT";
    /// PEM PKCS#8 private key of that certificate.
    pub const RELAY_KEY: &str = "MAILFLEET_RELAY_KEY";
    /// PEM certificate chain and key the SMTP listener offers with STARTTLS (optional).
    pub const LISTENER_TLS_CERT: &str = "MAILFLEET_LISTENER_TLS_CERT";
    pub const LISTENER_TLS_KEY: &str = "MAILFLEET_LISTENER_TLS_KEY";
    /// The pod's identity (downward API).
    pub const POD_NAME: &str = "POD_NAME";
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    pub const POD_UID: &str = "POD_UID";
}

/// Keys of the pool identity Secret `<pool>-relay-identity`.
pub mod identity {
    pub const CA_KEY: &str = "ca.crt";
    pub const CERT_KEY: &str = "tls.crt";
    pub const KEY_KEY: &str = "tls.key";
    /// Suffix of the Secret's name after the pool's name.
    pub const SECRET_SUFFIX: &str = "-relay-identity";
}
