//! The relay's configuration: one plain serde type, read from a YAML file today and pushed by
//! the operator over gRPC later. It knows nothing of Kubernetes; the operator translates its
//! custom resources into this shape. `RelayConfig::validate` turns the raw file into checked
//! values once, so the rest of the relay never re-parses strings.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::shaping::ProviderGroup;

/// Errors of loading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to parse config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Everything a relay needs to run on its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RelayConfig {
    /// Name used in the SMTP greeting, Received headers and DSNs.
    pub hostname: String,
    pub listener: ListenerConfig,
    pub spool: SpoolConfig,
    /// Domains the relay may send for: MAIL FROM must be one of them or a subdomain.
    pub sending_domains: Vec<SendingDomainConfig>,
    /// Source addresses of outgoing connections (bound per connection).
    pub egress: Vec<EgressConfig>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub shaping: ShapingConfig,
    /// HTTP address of `/metrics`, `/healthz`, `/readyz` and `/v1/feedback`; none disables it.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// The complaint feedback endpoint (`POST /v1/feedback` on the HTTP listener).
    #[serde(default)]
    pub feedback: FeedbackConfig,
}

/// The feedback endpoint, where ARF complaint reports (RFC 5965) are posted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FeedbackConfig {
    /// SHA-256 (hex) of the bearer token the endpoint accepts; none disables the endpoint
    /// (404). Create one with `head -c 32 /dev/urandom | base64` and hash it with
    /// `printf %s "$TOKEN" | sha256sum`.
    #[serde(default)]
    pub token_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerConfig {
    /// Address of the SMTP listener, e.g. `0.0.0.0:25`.
    pub listen: SocketAddr,
    /// Networks whose clients may submit without authenticating.
    #[serde(default)]
    pub allowed_networks: Vec<IpNet>,
    /// PEM certificate chain and key for STARTTLS; without them STARTTLS and AUTH are off.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Users for AUTH PLAIN/LOGIN (offered only over TLS).
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    #[serde(default = "default_max_line_length")]
    pub max_line_length: usize,
    /// Unknown or out-of-sequence commands after which the session is closed.
    #[serde(default = "default_max_bad_commands")]
    pub max_bad_commands: usize,
    /// Idle time after which a silent client is disconnected.
    #[serde(default = "default_idle_timeout", with = "secs")]
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UserConfig {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Size after which the journal starts a new segment file.
    #[serde(default = "default_segment_size")]
    pub segment_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SendingDomainConfig {
    pub domain: String,
    /// DKIM keys; several sign at once (e.g. RSA-2048 plus Ed25519).
    #[serde(default)]
    pub dkim: Vec<DkimKeyConfig>,
    /// Recipients refused at RCPT for mail of this domain (hard bounces, complaints).
    #[serde(default)]
    pub suppressed_recipients: Vec<String>,
    /// Dedicated egress addresses: the domain's mail leaves only from these (it waits when
    /// none of them may send). Empty: any address.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DkimAlgorithm {
    Rsa,
    Ed25519,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DkimKeyConfig {
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// PKCS#8 (or PKCS#1 for RSA) PEM private key, inline ...
    #[serde(default)]
    pub private_key_pem: Option<String>,
    /// ... or in a file.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressConfig {
    pub address: IpAddr,
    /// EHLO name; must match the address's PTR record.
    pub helo: String,
    /// Messages per quota window (a UTC day unless `quotaWindowSeconds` says otherwise);
    /// none is unlimited. The warm-up engine sets it at run time.
    #[serde(default)]
    pub daily_quota: Option<u64>,
    #[serde(default)]
    pub hourly_quota: Option<u64>,
    /// Start (Unix seconds) of one quota window and its length; windows repeat from there.
    /// Default: UTC days.
    #[serde(default)]
    pub quota_window_start: i64,
    #[serde(default)]
    pub quota_window_seconds: Option<u64>,
    /// Quotas of this address toward one provider group, in the same windows.
    #[serde(default)]
    pub provider_quotas: BTreeMap<ProviderGroup, QuotaLimits>,
    /// Sends no new mail (the address is draining, paused or quarantined); mail goes out from
    /// the other addresses.
    #[serde(default)]
    pub paused: bool,
    /// A fully warmed address: it takes the mail over the quota of addresses whose
    /// `overflowToWarm` is set.
    #[serde(default)]
    pub warm: bool,
    /// Mail over this address's quotas leaves from a `warm` address with quota left (it waits
    /// when there is none) instead of waiting for this address's next window. Read with the
    /// overflow policy `wait` (mail assigned to addresses up front).
    #[serde(default)]
    pub overflow_to_warm: bool,
    /// Concurrent connections from this address (all destinations).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Messages per second from this address (all destinations).
    #[serde(default)]
    pub messages_per_second: Option<f64>,
}

/// Per-window and per-hour limits; none is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QuotaLimits {
    #[serde(default)]
    pub daily: Option<u64>,
    #[serde(default)]
    pub hourly: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeliveryConfig {
    /// DNS servers for MX lookups (`ip:port`); empty uses 127.0.0.1:53.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Port of every destination MX (25 in production; a sink's port in tests).
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// Static routes bypassing MX lookup: domain (or `*`) → `host:port`.
    #[serde(default)]
    pub routes: BTreeMap<String, SocketAddr>,
    /// Waits between attempts; the last one repeats.
    #[serde(default = "default_retry_intervals", with = "secs_list")]
    pub retry_intervals: Vec<Duration>,
    /// Age after which a deferred message bounces.
    #[serde(default = "default_max_lifetime", with = "secs")]
    pub max_lifetime: Duration,
    /// Concurrent connections per destination domain.
    #[serde(default = "default_dest_connections")]
    pub max_connections_per_destination: usize,
    /// Messages sent over one connection before it is closed.
    #[serde(default = "default_messages_per_connection")]
    pub max_messages_per_connection: usize,
    /// How long an idle outgoing connection is kept for reuse.
    #[serde(default = "default_connection_idle", with = "secs")]
    pub connection_idle: Duration,
    #[serde(default = "default_command_timeout", with = "secs")]
    pub command_timeout: Duration,
    /// Try STARTTLS when the receiver offers it (certificates are not verified, as in
    /// opportunistic TLS for MX delivery).
    #[serde(default = "default_true")]
    pub opportunistic_tls: bool,
    /// Send delivery status notifications to the return path of bounced mail.
    #[serde(default = "default_true")]
    pub dsn: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            nameservers: Vec::new(),
            port: default_smtp_port(),
            routes: BTreeMap::new(),
            retry_intervals: default_retry_intervals(),
            max_lifetime: default_max_lifetime(),
            max_connections_per_destination: default_dest_connections(),
            max_messages_per_connection: default_messages_per_connection(),
            connection_idle: default_connection_idle(),
            command_timeout: default_command_timeout(),
            opportunistic_tls: true,
            dsn: true,
        }
    }
}

/// What happens to mail when the address it would leave from is over quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OverflowPolicy {
    /// Leave from another address that has quota left; wait only when none has.
    #[default]
    OtherAddress,
    /// Each message is assigned an address up front (round robin over the addresses that may
    /// send it) and waits in the queue until that address's window opens again, unless the
    /// address has `overflowToWarm` and a `warm` address has quota left.
    Wait,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ShapingConfig {
    #[serde(default)]
    pub overflow: OverflowPolicy,
    /// Limits per egress address toward one provider group.
    #[serde(default)]
    pub providers: BTreeMap<ProviderGroup, ProviderLimits>,
    /// Extra MX host suffixes mapped to a provider group (checked before the built-in ones).
    #[serde(default)]
    pub mx_suffixes: BTreeMap<String, ProviderGroup>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderLimits {
    /// Concurrent connections from one address to this provider group.
    #[serde(default)]
    pub max_connections_per_address: Option<usize>,
    /// Messages per second from one address to this provider group.
    #[serde(default)]
    pub messages_per_second_per_address: Option<f64>,
    /// Messages over one connection to this provider group (lower of this and
    /// `delivery.maxMessagesPerConnection`).
    #[serde(default)]
    pub max_messages_per_connection: Option<usize>,
}

fn default_max_message_size() -> usize {
    25 * 1024 * 1024
}
fn default_max_recipients() -> usize {
    100
}
fn default_max_sessions() -> usize {
    500
}
fn default_max_line_length() -> usize {
    // RFC 5321 says 512 for command lines; AUTH lines and long addresses need a bit more.
    2048
}
fn default_max_bad_commands() -> usize {
    10
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_segment_size() -> u64 {
    64 * 1024 * 1024
}
fn default_smtp_port() -> u16 {
    25
}
fn default_retry_intervals() -> Vec<Duration> {
    [60, 300, 900, 1800, 3600]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(5 * 24 * 3600)
}
fn default_dest_connections() -> usize {
    20
}
fn default_messages_per_connection() -> usize {
    1000
}
fn default_connection_idle() -> Duration {
    Duration::from_secs(5)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_true() -> bool {
    true
}

/// Durations in YAML are seconds (fractions allowed), which reads well and diffs well.
mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

mod secs_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(d.iter().map(Duration::as_secs_f64))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<f64>::deserialize(d)?
            .into_iter()
            .map(|v| Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom))
            .collect()
    }
}

impl ListenerConfig {
    /// A listener on `listen` with the default limits, no TLS, nobody allowed yet.
    pub fn new(listen: SocketAddr) -> Self {
        ListenerConfig {
            listen,
            allowed_networks: Vec::new(),
            tls: None,
            users: Vec::new(),
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_sessions: default_max_sessions(),
            max_line_length: default_max_line_length(),
            max_bad_commands: default_max_bad_commands(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

impl RelayConfig {
    /// The static part of a coordinated relay (everything else comes from the coordinator):
    /// defaults everywhere, no sending domain, no address.
    pub fn coordinated_base(
        hostname: String,
        listen: SocketAddr,
        spool_dir: PathBuf,
        http_listen: Option<SocketAddr>,
    ) -> Self {
        RelayConfig {
            hostname,
            listener: ListenerConfig::new(listen),
            spool: SpoolConfig {
                dir: spool_dir,
                segment_size: default_segment_size(),
            },
            sending_domains: Vec::new(),
            egress: Vec::new(),
            delivery: DeliveryConfig::default(),
            shaping: ShapingConfig::default(),
            http_listen,
            feedback: FeedbackConfig::default(),
        }
    }

    /// Reads and checks a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: RelayConfig =
            serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses configurations the relay cannot run safely with on its own (file mode: at
    /// least one sending domain and one egress address).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.sending_domains.is_empty() {
            return invalid("at least one sending domain is required".into());
        }
        if self.egress.is_empty() {
            return invalid("at least one egress address is required".into());
        }
        if self.listener.allowed_networks.is_empty() && self.listener.users.is_empty() {
            return invalid(
                "listener needs allowedNetworks or users: nobody could submit mail".into(),
            );
        }
        if !self.listener.users.is_empty() && self.listener.tls.is_none() {
            return invalid(
                "listener.users need listener.tls: AUTH is only offered over TLS".into(),
            );
        }
        self.validate_pushed()
    }

    /// The checks of a configuration pushed at run time (coordinated mode), where a pool may
    /// have no sending domain or no address yet: the relay then refuses mail until it has.
    pub fn validate_pushed(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.hostname.is_empty() {
            return invalid("hostname must not be empty".into());
        }
        if self.delivery.retry_intervals.is_empty() {
            return invalid("delivery.retryIntervals must not be empty".into());
        }
        for d in &self.sending_domains {
            for k in &d.dkim {
                if k.private_key_pem.is_none() == k.private_key_file.is_none() {
                    return invalid(format!(
                        "dkim key {} of {}: set exactly one of privateKeyPem, privateKeyFile",
                        k.selector, d.domain
                    ));
                }
            }
        }
        if let Some(h) = &self.feedback.token_sha256
            && crate::feedback::parse_sha256_hex(h).is_none()
        {
            return invalid("feedback.tokenSha256 must be a SHA-256 in hex (64 hex digits)".into());
        }
        let mut seen = std::collections::HashSet::new();
        for e in &self.egress {
            if !seen.insert(e.address) {
                return invalid(format!("egress address {} listed twice", e.address));
            }
            if e.quota_window_seconds == Some(0) {
                return invalid(format!(
                    "egress address {}: quotaWindowSeconds must be above 0",
                    e.address
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
hostname: relay.example.test
listener:
  listen: 127.0.0.1:2525
  allowedNetworks: [127.0.0.0/8]
spool:
  dir: /tmp/spool
sendingDomains:
  - domain: example.test
egress:
  - address: 127.0.0.2
    helo: out2.example.test
    dailyQuota: 100
delivery:
  retryIntervals: [1, 2.5]
shaping:
  providers:
    gmail: { maxConnectionsPerAddress: 2 }
"#;

    #[test]
    fn minimal_yaml_parses_with_defaults() {
        let c: RelayConfig = serde_yaml::from_str(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.listener.max_recipients, 100);
        assert_eq!(c.delivery.port, 25);
        assert_eq!(
            c.delivery.retry_intervals,
            vec![Duration::from_secs(1), Duration::from_millis(2500)]
        );
        assert_eq!(c.egress[0].daily_quota, Some(100));
        assert_eq!(
            c.shaping.providers[&ProviderGroup::Gmail].max_connections_per_address,
            Some(2)
        );
    }

    #[test]
    fn open_relay_configuration_is_refused() {
        let mut c: RelayConfig = serde_yaml::from_str(MINIMAL).unwrap();
        c.listener.allowed_networks.clear();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("nobody could submit"), "{err}");
    }

    #[test]
    fn feedback_token_hash_must_be_a_sha256() {
        let text = format!("{MINIMAL}feedback:\n  tokenSha256: {}\n", "0f".repeat(32));
        let c: RelayConfig = serde_yaml::from_str(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.feedback.token_sha256, Some("0f".repeat(32)));
        let text = format!("{MINIMAL}feedback:\n  tokenSha256: my-token\n");
        let c: RelayConfig = serde_yaml::from_str(&text).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("feedback.tokenSha256"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = MINIMAL.replace("hostname:", "hostnme: x\nhostname:");
        assert!(serde_yaml::from_str::<RelayConfig>(&text).is_err());
    }
}
