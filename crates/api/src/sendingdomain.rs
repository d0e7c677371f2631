//! `SendingDomain`: a domain the fleet may send for, and its DNS authentication.
//!
//! The SendingDomain controller (crates/operator) generates DKIM keys, computes the desired
//! SPF/DKIM/DMARC records, publishes them through the configured DNS provider, verifies what
//! resolvers serve and rotates DKIM selectors. Relays accept MAIL FROM only for domains that
//! exist here.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{LocalObjectRef, SecretKeyRef};

/// Condition type: DKIM keys exist and the relays sign with the active selector.
pub const CONDITION_DKIM_READY: &str = "DKIMReady";
/// Condition type: every desired record was written to the DNS provider.
pub const CONDITION_DNS_PUBLISHED: &str = "DNSPublished";
/// Condition type: the authoritative servers serve exactly the desired records.
pub const CONDITION_DNS_VERIFIED: &str = "DNSVerified";
/// Condition type: the domain is ready to send (all of the above).
pub const CONDITION_READY: &str = "Ready";

/// A domain that the relays of one RelayPool may send mail for, with its DKIM keys and its
/// SPF, DKIM and DMARC records.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "mailfleet.dev",
    version = "v1alpha1",
    kind = "SendingDomain",
    plural = "sendingdomains",
    shortname = "sd",
    category = "mailfleet",
    namespaced,
    status = "SendingDomainStatus",
    printcolumn = r#"{"name":"Domain","type":"string","jsonPath":".spec.domain"}"#,
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.relayPoolRef.name"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"DNSVerified","type":"string","jsonPath":".status.conditions[?(@.type==\"DNSVerified\")].status"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".status.activeSelector"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.domain == oldSelf.domain").message("domain is immutable: create a new SendingDomain instead"))]
pub struct SendingDomainSpec {
    /// The domain in MAIL FROM and in the From header (for example `mail.example.com`),
    /// lowercase, without a trailing dot.
    #[schemars(length(min = 3, max = 253))]
    #[schemars(regex(
        pattern = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)+[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
    ))]
    pub domain: String,

    /// The RelayPool (same namespace) whose relays send for this domain.
    pub relay_pool_ref: LocalObjectRef,

    /// Dedicated addresses: send only from these addresses of the pool. When omitted the
    /// domain shares every address of the pool with the other domains (the default, which
    /// blends tenants' volumes evenly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[schemars(inner(length(max = 45)))]
    #[x_kube(validation = Rule::new("self.all(a, isIP(a))").message("every entry of addresses must be an IPv4 or IPv6 address of the pool"))]
    pub addresses: Option<Vec<String>>,

    /// DKIM signing keys and selectors.
    #[serde(default)]
    pub dkim: DkimSpec,

    /// The SPF records of the domain and of its return-path subdomain.
    #[serde(default)]
    pub spf: SpfSpec,

    /// The DMARC record of the domain.
    #[serde(default)]
    pub dmarc: DmarcSpec,

    /// Where the records are published.
    pub dns: DnsSpec,
}

/// DKIM algorithms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DkimAlgorithm {
    /// RSA with a 2048-bit key (verified by every receiver).
    #[default]
    #[serde(rename = "rsa2048")]
    Rsa2048,
    /// Ed25519 only. Gmail does not verify Ed25519 signatures: use `dual` for real traffic.
    #[serde(rename = "ed25519")]
    Ed25519,
    /// Two signatures on every message: RSA-2048 and Ed25519.
    #[serde(rename = "dual")]
    Dual,
}

/// DKIM keys and selectors.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.keySecretRef) || !has(self.rotationPeriod)").message("keys from keySecretRef are managed outside mailfleet: remove rotationPeriod, or remove keySecretRef to let mailfleet generate and rotate keys"))]
pub struct DkimSpec {
    /// `rsa2048` (default), `ed25519`, or `dual` (both signatures on every message).
    #[serde(default)]
    pub algorithm: DkimAlgorithm,

    /// Prefix of generated selectors. A selector is `<prefix>-<yyyymmdd>` (plus `-ed` for the
    /// Ed25519 key), so a rotation always publishes a new, unused selector.
    #[serde(default = "default_selector_prefix")]
    #[schemars(length(min = 1, max = 40))]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub selector_prefix: String,

    /// How often keys are rotated (for example `90d`). The new selector is published and
    /// verified before the fleet signs with it; the old one stays published until every
    /// message signed with it has left the queues. Omit to never rotate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub rotation_period: Option<String>,

    /// Use keys from this Secret instead of generating them. Keys: `rsa.pem` and/or
    /// `ed25519.pem` (PKCS#8 PEM) and `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_ref: Option<LocalObjectRef>,
}

fn default_selector_prefix() -> String {
    "mf".to_owned()
}

impl Default for DkimSpec {
    fn default() -> Self {
        DkimSpec {
            algorithm: DkimAlgorithm::default(),
            selector_prefix: default_selector_prefix(),
            rotation_period: None,
            key_secret_ref: None,
        }
    }
}

/// The SPF `all` qualifier.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SpfQualifier {
    /// `-all`: mail from other addresses fails SPF.
    #[default]
    #[serde(rename = "fail")]
    Fail,
    /// `~all`: mail from other addresses soft-fails.
    #[serde(rename = "softfail")]
    SoftFail,
    /// `?all`: no statement about other addresses.
    #[serde(rename = "neutral")]
    Neutral,
}

/// SPF records. The operator lists the pool's (or the pinned) egress addresses as `ip4:` and
/// `ip6:` mechanisms, which cost no DNS lookups; each include costs at least one of the ten
/// lookups SPF allows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpfSpec {
    /// Publish and manage SPF records (default true).
    #[serde(default = "default_true")]
    pub managed: bool,

    /// Other senders of the domain to include (for example `_spf.google.com`).
    #[serde(default)]
    #[schemars(length(max = 9))]
    #[schemars(inner(
        length(max = 253),
        regex(
            pattern = r"^([a-z0-9_]([-a-z0-9_]{0,61}[a-z0-9])?\.)+[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
        )
    ))]
    pub includes: Vec<String>,

    /// What SPF says of all other senders: `fail` (default), `softfail` or `neutral`.
    #[serde(default)]
    pub qualifier: SpfQualifier,

    /// Label of the return-path (bounce) subdomain: the envelope sender of relayed mail is
    /// rewritten into `<label>.<domain>`, which gets its own SPF record.
    #[serde(default = "default_return_path")]
    #[schemars(length(min = 1, max = 63))]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub return_path_label: String,

    /// MX hosts of the return-path subdomain, so that bounces reach a mailbox you control.
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub return_path_mx: Vec<MxHost>,
}

fn default_true() -> bool {
    true
}
fn default_return_path() -> String {
    "bounces".to_owned()
}

impl Default for SpfSpec {
    fn default() -> Self {
        SpfSpec {
            managed: true,
            includes: Vec::new(),
            qualifier: SpfQualifier::default(),
            return_path_label: default_return_path(),
            return_path_mx: Vec::new(),
        }
    }
}

/// An MX record target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MxHost {
    /// Preference (lower is tried first).
    #[schemars(range(min = 0, max = 65535))]
    pub preference: i32,
    /// Host name of the mail exchanger.
    #[schemars(length(min = 3, max = 253))]
    #[schemars(regex(
        pattern = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)+[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
    ))]
    pub host: String,
}

/// DMARC policies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    /// Monitor only.
    #[default]
    None,
    /// Failing mail goes to spam.
    Quarantine,
    /// Failing mail is refused.
    Reject,
}

/// DMARC identifier alignment modes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Alignment {
    /// Organizational domains must match.
    #[default]
    Relaxed,
    /// Domains must match exactly.
    Strict,
}

/// The DMARC record (`_dmarc.<domain>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DmarcSpec {
    /// Publish and manage the DMARC record (default true).
    #[serde(default = "default_true")]
    pub managed: bool,
    /// `none` (default), `quarantine` or `reject`.
    #[serde(default)]
    pub policy: DmarcPolicy,
    /// Policy for subdomains; the domain's policy when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdomain_policy: Option<DmarcPolicy>,
    /// Percentage of failing mail the policy applies to.
    #[serde(default = "default_pct")]
    #[schemars(range(min = 0, max = 100))]
    pub pct: i32,
    /// Aggregate report addresses (`mailto:` URIs).
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[schemars(inner(length(max = 320), regex(pattern = r"^mailto:[^\s,;!]+@[^\s,;!]+$")))]
    pub rua: Vec<String>,
    /// Failure report addresses (`mailto:` URIs).
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[schemars(inner(length(max = 320), regex(pattern = r"^mailto:[^\s,;!]+@[^\s,;!]+$")))]
    pub ruf: Vec<String>,
    /// DKIM alignment: `relaxed` (default) or `strict`.
    #[serde(default)]
    pub adkim: Alignment,
    /// SPF alignment: `relaxed` (default) or `strict`.
    #[serde(default)]
    pub aspf: Alignment,
}

fn default_pct() -> i32 {
    100
}

impl Default for DmarcSpec {
    fn default() -> Self {
        DmarcSpec {
            managed: true,
            policy: DmarcPolicy::default(),
            subdomain_policy: None,
            pct: default_pct(),
            rua: Vec::new(),
            ruf: Vec::new(),
            adkim: Alignment::default(),
            aspf: Alignment::default(),
        }
    }
}

/// DNS providers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DnsProvider {
    /// Dynamic updates (RFC 2136) signed with TSIG: BIND, Knot, PowerDNS, Windows DNS.
    #[serde(rename = "rfc2136")]
    Rfc2136,
    /// DNSEndpoint objects that external-dns publishes (Route53, Cloud DNS, Cloudflare...).
    #[serde(rename = "externalDNS")]
    ExternalDns,
    /// Nothing is published: the records are listed in status for a person to copy.
    #[serde(rename = "manual")]
    Manual,
}

/// Where and how records are published.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.provider != 'rfc2136' || has(self.rfc2136)").message("dns.provider rfc2136 needs dns.rfc2136 (server, zone and TSIG key)"))]
#[x_kube(validation = Rule::new("self.provider == 'rfc2136' || !has(self.rfc2136)").message("dns.rfc2136 is only used with dns.provider rfc2136"))]
pub struct DnsSpec {
    /// `rfc2136`, `externalDNS` or `manual`.
    pub provider: DnsProvider,

    /// TTL of published records, in seconds. DKIM rotation waits at least this long before
    /// retiring a selector.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 30, max = 86_400))]
    pub ttl: i32,

    /// Settings of the `rfc2136` provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rfc2136: Option<Rfc2136Spec>,

    /// Authoritative servers to verify against (`address` or `address:port`). Defaults to the
    /// rfc2136 server, or to the zone's NS records.
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[schemars(inner(length(max = 64)))]
    pub verify_nameservers: Vec<String>,
}

fn default_ttl() -> i32 {
    300
}

/// TSIG algorithms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum TsigAlgorithm {
    /// HMAC-SHA256 (default).
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    /// HMAC-SHA384.
    #[serde(rename = "hmac-sha384")]
    HmacSha384,
    /// HMAC-SHA512.
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

/// An RFC 2136 dynamic-update server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rfc2136Spec {
    /// The primary server, `host` or `host:port` (port 53 when omitted).
    #[schemars(length(min = 1, max = 260))]
    pub server: String,

    /// The zone to update (for example `example.com`); the domain must be inside it.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
    ))]
    pub zone: String,

    /// Name of the TSIG key, as configured on the server.
    #[schemars(length(min = 1, max = 253))]
    pub tsig_key_name: String,

    /// TSIG algorithm.
    #[serde(default)]
    pub tsig_algorithm: TsigAlgorithm,

    /// Secret key holding the base64 TSIG secret (key `secret` when not given).
    pub tsig_secret_ref: SecretKeyRef,
}

/// Observed state of a SendingDomain.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendingDomainStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions: `DKIMReady`, `DNSPublished`, `DNSVerified`, `Ready`, and
    /// `Reconciling` (True until Ready; read by kstatus, Flux and Argo CD).
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// The selector the relays sign with now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_selector: Option<String>,

    /// A selector published ahead of a rotation, not yet used for signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_selector: Option<String>,

    /// Selectors no longer used for signing, kept published until their retirement time.
    #[serde(default)]
    pub retiring_selectors: Vec<RetiringSelector>,

    /// When the active selector started signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<Time>,

    /// Every desired record and whether it is published and verified.
    #[serde(default)]
    pub records: Vec<DnsRecordStatus>,
}

/// A selector on its way out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiringSelector {
    /// The selector.
    pub selector: String,
    /// When its record will be removed.
    pub remove_after: Time,
}

/// One desired DNS record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecordStatus {
    /// Fully qualified owner name.
    pub name: String,
    /// Record type: `TXT` or `MX`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The record's value (TXT strings joined).
    pub value: String,
    /// Written to the provider.
    #[serde(default)]
    pub published: bool,
    /// Served by the authoritative servers exactly as desired.
    #[serde(default)]
    pub verified: bool,
}
