//! Coordinated mode: the relay side of the coordinator protocol (proto/mailfleet/v1,
//! docs/coordinator.md).
//!
//! The relay starts without a configuration ([`Relay::start_unconfigured`]), connects to the
//! operator's Coordinator over mutually authenticated TLS, registers, and applies every
//! `RelayConfig` snapshot of `WatchConfig` without restarting. The last snapshot is stored
//! (mode 0600: it holds DKIM keys) under `<spool>/coordinator/`, so that a relay restarted
//! while the coordinator is unreachable carries on with the configuration and quotas it had.
//!
//! Every `report_interval` the counter deltas since the previous report (per egress address ×
//! provider group × outcome × sending domain) and the hard-bounce suppressions recorded since
//! are written to `<spool>/coordinator/` with the next sequence number (fsync'ed, before
//! sending) and deleted once acknowledged. A complaint from the feedback endpoint is written
//! as a report of its own before the endpoint answers. On every (re)connect the reports at or
//! below the `applied_sequence` of `Register` are dropped and the others are sent again in
//! order; the coordinator applies each sequence at most once.
//!
//! Files of `<spool>/coordinator/` (directory mode 0700):
//! - `config.pb`: the last snapshot applied (prost `RelayConfig`, mode 0600);
//! - `sequence`: the last report sequence used (decimal), so numbers survive restarts;
//! - `report-<sequence>.pb`: reports not acknowledged yet (prost `ReportRequest`);
//! - `quota-counters`: messages sent per address (and provider group) in the current hour and
//!   quota window, so a restart does not send a window's quota twice;
//! - `suppressions.pending`: hard-bounce suppressions not in a report yet (fsync'ed before the
//!   recipient is marked done on the spool).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mailfleet_proto::v1;
use mailfleet_proto::v1::coordinator_client::CoordinatorClient;
use prost::Message as _;
use tokio::sync::{Notify, watch};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::client::Outcome;
use crate::config::{
    DkimAlgorithm, DkimKeyConfig, EgressConfig, OverflowPolicy, ProviderLimits, QuotaLimits,
    RelayConfig, SendingDomainConfig, UserConfig,
};
use crate::shaping::{ProviderGroup, SavedCounter, SentCounter, unix_now};
use crate::suppression::{Complaint, DurableEvents, Reason, RecordError, Suppression};
use crate::{Control, Relay, RelayError};

/// Errors of coordinated mode, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("environment variable {name} is not set or empty: {what}")]
    MissingEnv {
        name: &'static str,
        what: &'static str,
    },
    #[error("environment variable {name} does not hold a usable {what}: {reason}")]
    BadEnv {
        name: &'static str,
        what: &'static str,
        reason: String,
    },
    #[error("invalid coordinator address {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stored coordinator state {path} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("failed to connect to the coordinator at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("coordinator call {call} failed: {code:?}: {message}")]
    Rpc {
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("coordinator call {call} timed out")]
    Timeout { call: &'static str },
    #[error("the coordinator closed the config stream")]
    StreamEnded,
    #[error("invalid configuration snapshot {version} from the coordinator: {reason}")]
    Snapshot { version: u64, reason: String },
    #[error("the coordinator acknowledged sequence {acked} for report {sent}")]
    NotApplied { sent: u64, acked: u64 },
    #[error(transparent)]
    Relay(#[from] Box<RelayError>),
}

impl CoordinatorError {
    fn rpc(call: &'static str, status: tonic::Status) -> Self {
        CoordinatorError::Rpc {
            call,
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CoordinatorError {
    let path = path.to_path_buf();
    move |source| CoordinatorError::Io { op, path, source }
}

/// The relay's identity toward the coordinator: the pool's certificate and the pod.
#[derive(Clone)]
pub struct Identity {
    /// PEM of the CA that issued the coordinator's certificate.
    pub ca_pem: String,
    /// PEM certificate chain and PKCS#8 key the relay presents.
    pub cert_pem: String,
    pub key_pem: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("pod_name", &self.pod_name)
            .field("pod_namespace", &self.pod_namespace)
            .field("pod_uid", &self.pod_uid)
            .finish_non_exhaustive()
    }
}

fn env_var(name: &'static str, what: &'static str) -> Result<String, CoordinatorError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(CoordinatorError::MissingEnv { name, what }),
    }
}

impl Identity {
    /// Reads the identity from the environment the operator gives relay pods
    /// (`mailfleet_proto::env`): CA, certificate and key PEM, pod name and namespace
    /// (required) and UID (optional), and checks that the PEM parses.
    pub fn from_env() -> Result<Identity, CoordinatorError> {
        use mailfleet_proto::env;
        let id = Identity {
            ca_pem: env_var(
                env::COORDINATOR_CA,
                "PEM of the CA of the coordinator (from the pool's identity Secret, ca.crt)",
            )?,
            cert_pem: env_var(
                env::RELAY_CERT,
                "PEM client certificate of the relay (from the pool's identity Secret, tls.crt)",
            )?,
            key_pem: env_var(
                env::RELAY_KEY,
                "PEM private key of the relay (from the pool's identity Secret, tls.key)",
            )?,
            pod_name: env_var(env::POD_NAME, "the pod's name (downward API metadata.name)")?,
            pod_namespace: env_var(
                env::POD_NAMESPACE,
                "the pod's namespace (downward API metadata.namespace)",
            )?,
            pod_uid: std::env::var(env::POD_UID).unwrap_or_default(),
        };
        id.check()?;
        Ok(id)
    }

    /// Checks that the PEM texts hold a certificate and a key.
    pub fn check(&self) -> Result<(), CoordinatorError> {
        use mailfleet_proto::env;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |name, what, pem: &str| {
            let n = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CoordinatorError::BadEnv {
                    name,
                    what,
                    reason: e.to_string(),
                })?
                .len();
            if n == 0 {
                return Err(CoordinatorError::BadEnv {
                    name,
                    what,
                    reason: "no PEM CERTIFICATE block".into(),
                });
            }
            Ok(())
        };
        certs(env::COORDINATOR_CA, "CA certificate", &self.ca_pem)?;
        certs(env::RELAY_CERT, "certificate", &self.cert_pem)?;
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| {
            CoordinatorError::BadEnv {
                name: env::RELAY_KEY,
                what: "private key",
                reason: e.to_string(),
            }
        })?;
        Ok(())
    }
}

/// STARTTLS of the listener from PEM in the environment (`MAILFLEET_LISTENER_TLS_CERT` and
/// `MAILFLEET_LISTENER_TLS_KEY`): both or neither.
pub fn listener_tls_from_env() -> Result<Option<crate::smtp::TlsAcceptor>, CoordinatorError> {
    use mailfleet_proto::env::{LISTENER_TLS_CERT, LISTENER_TLS_KEY};
    let get = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
    let bad = |name, reason: String| CoordinatorError::BadEnv {
        name,
        what: "listener TLS certificate and key",
        reason,
    };
    match (get(LISTENER_TLS_CERT), get(LISTENER_TLS_KEY)) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => crate::smtp::tls_acceptor_pem(
            cert.as_bytes(),
            key.as_bytes(),
            LISTENER_TLS_CERT,
            LISTENER_TLS_KEY,
        )
        .map(Some)
        .map_err(|e| bad(LISTENER_TLS_CERT, e.to_string())),
        (Some(_), None) => Err(bad(
            LISTENER_TLS_KEY,
            format!("{LISTENER_TLS_CERT} is set but {LISTENER_TLS_KEY} is not"),
        )),
        (None, Some(_)) => Err(bad(
            LISTENER_TLS_CERT,
            format!("{LISTENER_TLS_KEY} is set but {LISTENER_TLS_CERT} is not"),
        )),
    }
}

/// How the relay reaches the coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// `https://HOST:PORT` of the Coordinator; the certificate is checked for
    /// `mailfleet_proto::COORDINATOR_SERVER_NAME` whatever the host.
    pub endpoint: String,
    pub identity: Identity,
    /// Where the snapshot, the sequence and the pending reports live (`<spool>/coordinator`).
    pub state_dir: PathBuf,
    pub report_interval: Duration,
    /// How long the first connection may take before the stored snapshot is used.
    pub initial_wait: Duration,
    pub connect_timeout: Duration,
    /// Timeout of the unary calls (Register, Report).
    pub call_timeout: Duration,
    /// Reconnect backoff: first wait and cap (doubling in between).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl CoordinatorOptions {
    /// Defaults: reports every 2 s, state in `<spool_dir>/coordinator`, reconnects after
    /// 0.5 s doubling up to 30 s.
    pub fn new(endpoint: impl Into<String>, identity: Identity, spool_dir: &Path) -> Self {
        CoordinatorOptions {
            endpoint: endpoint.into(),
            identity,
            state_dir: spool_dir.join("coordinator"),
            report_interval: Duration::from_secs(2),
            initial_wait: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The mTLS channel settings for the coordinator.
pub fn endpoint(opts: &CoordinatorOptions) -> Result<Endpoint, CoordinatorError> {
    let bad = |reason: String| CoordinatorError::Endpoint {
        endpoint: opts.endpoint.clone(),
        reason,
    };
    if !opts.endpoint.starts_with("https://") {
        return Err(bad(
            "must start with https:// (the coordinator is only spoken to over mTLS)".into(),
        ));
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&opts.identity.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &opts.identity.cert_pem,
            &opts.identity.key_pem,
        ))
        .domain_name(mailfleet_proto::COORDINATOR_SERVER_NAME);
    Endpoint::from_shared(opts.endpoint.clone())
        .map_err(|e| bad(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| bad(format!("tls setup: {e}")))
        .map(|e| {
            e.connect_timeout(opts.connect_timeout)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        })
}

// ---------------------------------------------------------------------------------------------
// Files

/// Writes `bytes` to `path` atomically and durably (temporary file, fsync, rename, fsync of
/// the directory), created with `mode`.
fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CoordinatorError> {
    let tmp = path.with_extension("tmp");
    // The mode applies on creation only: never reuse a leftover temporary file.
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), CoordinatorError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, CoordinatorError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CoordinatorError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Creates the state directory (mode 0700).
pub fn create_state_dir(dir: &Path) -> Result<(), CoordinatorError> {
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("set permissions of", dir))
}

const SNAPSHOT_FILE: &str = "config.pb";
const SEQUENCE_FILE: &str = "sequence";
const COUNTERS_FILE: &str = "quota-counters";
const SUPPRESSIONS_FILE: &str = "suppressions.pending";

/// The stored snapshot, if any.
pub fn load_snapshot(dir: &Path) -> Result<Option<v1::RelayConfig>, CoordinatorError> {
    let path = dir.join(SNAPSHOT_FILE);
    let Some(bytes) = read_optional(&path)? else {
        return Ok(None);
    };
    v1::RelayConfig::decode(bytes.as_slice())
        .map(Some)
        .map_err(|e| CoordinatorError::Corrupt {
            path,
            reason: e.to_string(),
        })
}

/// Stores `snapshot` as the one to start from (mode 0600).
pub fn store_snapshot(dir: &Path, snapshot: &v1::RelayConfig) -> Result<(), CoordinatorError> {
    write_durable(&dir.join(SNAPSHOT_FILE), &snapshot.encode_to_vec(), 0o600)
}

fn encode_counters(counters: &[SavedCounter]) -> String {
    let mut s = String::new();
    for c in counters {
        let group = c.group.map_or("-", ProviderGroup::as_str);
        let k = c.counter;
        s.push_str(&format!(
            "{} {group} {} {} {} {}\n",
            c.address, k.hour, k.hour_sent, k.window_begin, k.window_sent
        ));
    }
    s
}

fn decode_counters(text: &str) -> Vec<SavedCounter> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [addr, group, hour, hour_sent, begin, sent] = f.as_slice() else {
                return None;
            };
            Some(SavedCounter {
                address: addr.parse().ok()?,
                group: match *group {
                    "-" => None,
                    g => Some(g.parse().ok()?),
                },
                counter: SentCounter {
                    hour: hour.parse().ok()?,
                    hour_sent: hour_sent.parse().ok()?,
                    window_begin: begin.parse().ok()?,
                    window_sent: sent.parse().ok()?,
                },
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Reports

/// Reports written but not acknowledged, and the sequence counter, on disk.
#[derive(Debug)]
pub struct ReportStore {
    dir: PathBuf,
    state: Mutex<ReportState>,
}

#[derive(Debug)]
struct ReportState {
    last_sequence: u64,
    pending: BTreeMap<u64, v1::ReportRequest>,
}

fn report_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("report-{sequence:020}.pb"))
}

impl ReportStore {
    /// Loads the sequence counter and the pending reports of `dir`.
    pub fn open(dir: &Path) -> Result<ReportStore, CoordinatorError> {
        let seq_path = dir.join(SEQUENCE_FILE);
        let mut last_sequence = match read_optional(&seq_path)? {
            None => 0,
            Some(b) => String::from_utf8_lossy(&b).trim().parse().map_err(|e| {
                CoordinatorError::Corrupt {
                    path: seq_path.clone(),
                    reason: format!("{e}"),
                }
            })?,
        };
        let mut pending = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_prefix("report-"))
                .and_then(|n| n.strip_suffix(".pb"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
            match v1::ReportRequest::decode(bytes.as_slice()) {
                Ok(r) if r.sequence == seq => {
                    last_sequence = last_sequence.max(seq);
                    pending.insert(seq, r);
                }
                // Reports are renamed into place complete; anything else is not ours to send.
                _ => {
                    tracing::warn!(path = %path.display(), "ignoring an unreadable stored report");
                }
            }
        }
        Ok(ReportStore {
            dir: dir.to_path_buf(),
            state: Mutex::new(ReportState {
                last_sequence,
                pending,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ReportState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last sequence number used.
    pub fn last_sequence(&self) -> u64 {
        self.lock().last_sequence
    }

    /// Sequences written and not acknowledged yet, in order.
    pub fn pending(&self) -> Vec<u64> {
        self.lock().pending.keys().copied().collect()
    }

    /// Gives `report` the next sequence number and makes it durable; returns the sequence.
    pub fn write(&self, mut report: v1::ReportRequest) -> Result<u64, CoordinatorError> {
        let mut st = self.lock();
        let seq = st.last_sequence + 1;
        report.sequence = seq;
        write_durable(&report_path(&self.dir, seq), &report.encode_to_vec(), 0o600)?;
        write_durable(
            &self.dir.join(SEQUENCE_FILE),
            format!("{seq}\n").as_bytes(),
            0o600,
        )?;
        st.last_sequence = seq;
        st.pending.insert(seq, report);
        Ok(seq)
    }

    /// The oldest report not acknowledged.
    pub fn first(&self) -> Option<v1::ReportRequest> {
        self.lock().pending.values().next().cloned()
    }

    /// Forgets every report at or below `applied` (acknowledged, or applied before a restart)
    /// and moves the counter past it, so that new reports are never taken for old ones.
    pub fn applied(&self, applied: u64) -> Result<(), CoordinatorError> {
        let mut st = self.lock();
        let done: Vec<u64> = st.pending.range(..=applied).map(|(s, _)| *s).collect();
        for seq in done {
            let path = report_path(&self.dir, seq);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(CoordinatorError::Io {
                        op: "delete",
                        path,
                        source: e,
                    });
                }
            }
            st.pending.remove(&seq);
        }
        if applied > st.last_sequence {
            tracing::warn!(
                applied,
                last = st.last_sequence,
                "the coordinator has applied more reports than this relay remembers (spool lost?): continuing after its sequence"
            );
            write_durable(
                &self.dir.join(SEQUENCE_FILE),
                format!("{applied}\n").as_bytes(),
                0o600,
            )?;
            st.last_sequence = applied;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Suppressions waiting for the next report

/// Suppressions (hard bounces) recorded since the last report was written: appended to
/// `suppressions.pending` (length-delimited prost `Suppression`s, fsync'ed before the caller
/// goes on), put into the next report and cleared once that report is on disk. A crash between
/// the two sends a suppression twice, which changes nothing: the coordinator keeps a set.
#[derive(Debug)]
pub struct SuppressionJournal {
    path: PathBuf,
    state: Mutex<JournalState>,
}

#[derive(Debug)]
struct JournalState {
    file: File,
    pending: Vec<v1::Suppression>,
}

impl SuppressionJournal {
    /// Opens (creating) the journal of `dir` and reads what it holds; a record torn by a
    /// crash at the end is dropped (its caller never went on).
    pub fn open(dir: &Path) -> Result<SuppressionJournal, CoordinatorError> {
        let path = dir.join(SUPPRESSIONS_FILE);
        let existing = read_optional(&path)?;
        let exists = existing.is_some();
        let bytes = existing.unwrap_or_default();
        let mut pending = Vec::new();
        let mut buf = bytes.as_slice();
        while !buf.is_empty() {
            match v1::Suppression::decode_length_delimited(&mut buf) {
                Ok(s) => pending.push(s),
                Err(_) => break,
            }
        }
        if !buf.is_empty() || !exists {
            if !buf.is_empty() {
                tracing::warn!(path = %path.display(), "dropping a torn suppression record");
            }
            let good: Vec<u8> = pending
                .iter()
                .flat_map(|s| s.encode_length_delimited_to_vec())
                .collect();
            write_durable(&path, &good, 0o600)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        Ok(SuppressionJournal {
            path,
            state: Mutex::new(JournalState { file, pending }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, JournalState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `s` and fsyncs.
    pub fn append(&self, s: &v1::Suppression) -> Result<(), CoordinatorError> {
        let mut st = self.lock();
        st.file
            .write_all(&s.encode_length_delimited_to_vec())
            .map_err(io_err("write", &self.path))?;
        st.file.sync_data().map_err(io_err("fsync", &self.path))?;
        st.pending.push(s.clone());
        Ok(())
    }

    /// Suppressions not reported yet.
    pub fn pending(&self) -> Vec<v1::Suppression> {
        self.lock().pending.clone()
    }
}

impl JournalState {
    /// The pending suppressions without repetitions, in order.
    fn distinct(&self) -> Vec<v1::Suppression> {
        let mut seen = std::collections::HashSet::new();
        self.pending
            .iter()
            .filter(|s| seen.insert((s.domain.clone(), s.recipient.to_ascii_lowercase(), s.reason)))
            .cloned()
            .collect()
    }

    fn clear(&mut self, path: &Path) -> Result<(), CoordinatorError> {
        self.file.set_len(0).map_err(io_err("truncate", path))?;
        self.file.sync_all().map_err(io_err("fsync", path))?;
        self.pending.clear();
        Ok(())
    }
}

fn reason_to_proto(r: Reason) -> v1::SuppressionReason {
    match r {
        Reason::HardBounce => v1::SuppressionReason::HardBounce,
        Reason::Complaint => v1::SuppressionReason::Complaint,
    }
}

/// Where the relay's hard bounces and complaints become durable: the journal and the report
/// store of a running coordinator client (held weakly: the relay must not keep it alive).
struct DurableReports(std::sync::Weak<Shared>);

impl DurableReports {
    fn shared(&self, what: &'static str) -> Result<Arc<Shared>, RecordError> {
        self.0.upgrade().ok_or(RecordError {
            what,
            reason: "the coordinator client has stopped".into(),
        })
    }
}

impl DurableEvents for DurableReports {
    fn suppression(&self, s: &Suppression) -> Result<(), RecordError> {
        let shared = self.shared("suppression")?;
        shared
            .journal
            .append(&v1::Suppression {
                domain: s.domain.clone(),
                recipient: s.recipient.clone(),
                reason: reason_to_proto(s.reason) as i32,
            })
            .map_err(|e| RecordError {
                what: "suppression",
                reason: e.to_string(),
            })
    }

    /// Writes a report of its own (a `COMPLAINT` count of one and the suppression), so the
    /// complaint is on disk before the endpoint answers and is counted exactly once.
    fn complaint(&self, c: &Complaint) -> Result<(), RecordError> {
        let shared = self.shared("complaint")?;
        let id = &shared.opts.identity;
        shared
            .reports
            .write(v1::ReportRequest {
                pod_name: id.pod_name.clone(),
                pod_namespace: id.pod_namespace.clone(),
                sequence: 0,
                deltas: vec![v1::CounterDelta {
                    address: c.address.to_string(),
                    provider_group: c.group.as_str().to_string(),
                    outcome: v1::Outcome::Complaint as i32,
                    count: 1,
                    domain: c.domain.clone(),
                }],
                observed_unix: unix_now() as i64,
                applied_config_version: shared.complete.load(Ordering::Acquire),
                suppressions: vec![v1::Suppression {
                    domain: c.domain.clone(),
                    recipient: c.recipient.clone(),
                    reason: v1::SuppressionReason::Complaint as i32,
                }],
            })
            .map_err(|e| RecordError {
                what: "complaint",
                reason: e.to_string(),
            })?;
        shared.report_ready.notify_one();
        Ok(())
    }
}

fn outcome_to_proto(o: Outcome) -> v1::Outcome {
    match o {
        Outcome::Delivered => v1::Outcome::Delivered,
        Outcome::Deferred => v1::Outcome::Deferred,
        Outcome::Bounced => v1::Outcome::HardBounce,
        Outcome::Blocked => v1::Outcome::PolicyBlock,
        Outcome::DeferredByWarmup => v1::Outcome::DeferredByWarmup,
    }
}

type DeltaKey = (String, &'static str, i32, String);

/// Counter deltas since the previous call that succeeded, per address × provider group ×
/// outcome × sending domain (the configured domain the sender's domain belongs to; the
/// sender's own domain if none; empty for DSNs). Outcomes without a connection (DNS
/// failures, null MX) have an empty address.
fn deltas(
    current: &BTreeMap<crate::metrics::SenderKey, u64>,
    previous: &BTreeMap<crate::metrics::SenderKey, u64>,
    domains: &[String],
) -> Vec<v1::CounterDelta> {
    let mut agg: BTreeMap<DeltaKey, u64> = BTreeMap::new();
    for (key, n) in current {
        let d = n.saturating_sub(previous.get(key).copied().unwrap_or(0));
        if d == 0 {
            continue;
        }
        let (addr, group, outcome, sender) = key;
        let domain = crate::smtp::matching_sending_domain(domains, sender)
            .unwrap_or(sender)
            .to_string();
        let k = (
            addr.map(|a| a.to_string()).unwrap_or_default(),
            group.as_str(),
            outcome_to_proto(*outcome) as i32,
            domain,
        );
        *agg.entry(k).or_insert(0) += d;
    }
    agg.into_iter()
        .map(
            |((address, group, outcome, domain), count)| v1::CounterDelta {
                address,
                provider_group: group.to_string(),
                outcome,
                count,
                domain,
            },
        )
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Snapshot → relay configuration

/// Translates a snapshot into the relay's configuration, on top of the static settings of
/// `base` (hostname, listen addresses, spool, TLS, static routes, MX suffixes).
pub fn relay_config(
    base: &RelayConfig,
    snap: &v1::RelayConfig,
) -> Result<RelayConfig, CoordinatorError> {
    let bad = |reason: String| CoordinatorError::Snapshot {
        version: snap.version,
        reason,
    };
    let mut c = base.clone();
    c.sending_domains = snap
        .domains
        .iter()
        .map(|d| {
            let dkim = d
                .signing_keys
                .iter()
                .map(|k| {
                    let algorithm = match v1::DkimAlgorithm::try_from(k.algorithm) {
                        Ok(v1::DkimAlgorithm::RsaSha256) => DkimAlgorithm::Rsa,
                        Ok(v1::DkimAlgorithm::Ed25519Sha256) => DkimAlgorithm::Ed25519,
                        _ => {
                            return Err(bad(format!(
                                "dkim key {} of {} has no known algorithm ({})",
                                k.selector, d.domain, k.algorithm
                            )));
                        }
                    };
                    Ok(DkimKeyConfig {
                        selector: k.selector.clone(),
                        algorithm,
                        private_key_pem: Some(der_to_pem("PRIVATE KEY", &k.private_key)),
                        private_key_file: None,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let addresses = d
                .addresses
                .iter()
                .map(|a| {
                    a.trim()
                        .parse::<IpAddr>()
                        .map_err(|e| bad(format!("dedicated address {a:?} of {}: {e}", d.domain)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(SendingDomainConfig {
                domain: d.domain.clone(),
                dkim,
                suppressed_recipients: d.suppressed_recipients.clone(),
                addresses,
            })
        })
        .collect::<Result<Vec<_>, CoordinatorError>>()?;

    let shaping = snap.shaping.clone().unwrap_or_default();
    let nz32 = |n: u32| (n > 0).then_some(n as usize);
    let nz64 = |n: u64| (n > 0).then_some(n);
    c.shaping.providers = BTreeMap::new();
    for p in &shaping.providers {
        let group: ProviderGroup = p.provider_group.parse().map_err(|e: String| bad(e))?;
        c.shaping.providers.insert(
            group,
            ProviderLimits {
                max_connections_per_address: nz32(p.max_connections),
                messages_per_second_per_address: (p.max_messages_per_minute > 0)
                    .then(|| f64::from(p.max_messages_per_minute) / 60.0),
                max_messages_per_connection: nz32(p.max_messages_per_connection),
            },
        );
    }

    // Mail is spread over the addresses up front; each quota's `overflow_to_warm` says
    // whether mail over it leaves from warm addresses or waits for the address's next window.
    c.shaping.overflow = OverflowPolicy::Wait;
    c.egress = Vec::new();
    for a in &snap.addresses {
        let address: IpAddr = a
            .address
            .trim()
            .parse()
            .map_err(|e| bad(format!("egress address {:?}: {e}", a.address)))?;
        let state = v1::AddressState::try_from(a.state).unwrap_or(v1::AddressState::Unspecified);
        // Only these states may take new mail (as the operator counts an address released):
        // DRAINING, PAUSED, QUARANTINED and UNSPECIFIED get none.
        let paused = !matches!(
            state,
            v1::AddressState::Warming | v1::AddressState::Warm | v1::AddressState::Held
        );
        let mut e = EgressConfig {
            address,
            helo: if a.helo_name.is_empty() {
                base.hostname.clone()
            } else {
                a.helo_name.clone()
            },
            daily_quota: None,
            hourly_quota: None,
            quota_window_start: 0,
            quota_window_seconds: None,
            provider_quotas: BTreeMap::new(),
            paused,
            warm: state == v1::AddressState::Warm,
            overflow_to_warm: false,
            max_connections: nz32(shaping.max_connections_per_address),
            messages_per_second: None,
        };
        for q in snap.quotas.iter().filter(|q| {
            q.address
                .trim()
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip == address)
        }) {
            let limits = QuotaLimits {
                daily: nz64(q.window_limit),
                hourly: nz64(q.hourly_limit),
            };
            e.overflow_to_warm |= q.overflow_to_warm;
            if q.window_seconds > 0 {
                e.quota_window_start = q.window_start_unix;
                e.quota_window_seconds = Some(q.window_seconds);
            }
            if q.provider_group.is_empty() {
                e.daily_quota = limits.daily;
                e.hourly_quota = limits.hourly;
            } else {
                let group: ProviderGroup = q.provider_group.parse().map_err(|e: String| bad(e))?;
                e.provider_quotas.insert(group, limits);
            }
        }
        c.egress.push(e);
    }

    if let Some(d) = &snap.delivery {
        if !d.retry_schedule_seconds.is_empty() {
            c.delivery.retry_intervals = d
                .retry_schedule_seconds
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect();
        }
        if d.max_queue_lifetime_seconds > 0 {
            c.delivery.max_lifetime = Duration::from_secs(d.max_queue_lifetime_seconds);
        }
        c.delivery.dsn = d.dsn;
        c.delivery.port = match d.destination_port {
            0 => 25,
            p => u16::try_from(p).map_err(|_| bad(format!("destination port {p}")))?,
        };
        c.delivery.nameservers = d
            .nameservers
            .iter()
            .map(|n| parse_nameserver(n).ok_or_else(|| bad(format!("nameserver {n:?}"))))
            .collect::<Result<_, _>>()?;
    }

    if let Some(l) = &snap.listener {
        c.listener.allowed_networks = l
            .allowed_networks
            .iter()
            .map(|n| {
                let n = n.trim();
                n.parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| bad(format!("allowed network {n:?}")))
            })
            .collect::<Result<_, _>>()?;
        if l.max_message_bytes > 0 {
            c.listener.max_message_size =
                usize::try_from(l.max_message_bytes).unwrap_or(usize::MAX);
        }
        if let Some(n) = nz32(l.max_recipients) {
            c.listener.max_recipients = n;
        }
        if let Some(n) = nz32(l.max_sessions) {
            c.listener.max_sessions = n;
        }
        let token = l.feedback_token_sha256.trim();
        c.feedback.token_sha256 = if token.is_empty() {
            None
        } else if crate::feedback::parse_sha256_hex(token).is_some() {
            Some(token.to_ascii_lowercase())
        } else {
            // Not worth refusing the whole snapshot: only the endpoint stays off.
            tracing::error!(
                version = snap.version,
                "the feedback token hash is not a SHA-256 in hex: the feedback endpoint stays disabled"
            );
            None
        };
        let users: BTreeMap<&String, &String> = l.users.iter().collect();
        c.listener.users = users
            .into_iter()
            .map(|(name, password)| UserConfig {
                name: name.clone(),
                password: password.clone(),
            })
            .collect();
    }
    c.validate_pushed().map_err(|e| bad(e.to_string()))?;
    Ok(c)
}

fn parse_nameserver(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

fn der_to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

// ---------------------------------------------------------------------------------------------
// The running client

struct Shared {
    opts: CoordinatorOptions,
    endpoint: Endpoint,
    control: Arc<Control>,
    reports: ReportStore,
    /// Hard-bounce suppressions waiting for the next report.
    journal: SuppressionJournal,
    report_ready: Notify,
    /// Serializes applying snapshots; holds the version applied (0 for none).
    applied: Mutex<u64>,
    /// The newest version applied completely (no connection left on addresses it does not
    /// allow), as reports confirm it.
    complete: AtomicU64,
    /// Whether a session with the coordinator is up (for tests and logs).
    connected: watch::Sender<bool>,
    /// The counters of the last report written, its complete version, and the quota
    /// counters last saved.
    prev: Mutex<(BTreeMap<crate::metrics::SenderKey, u64>, u64, String)>,
    /// Registrations that succeeded (for tests and logs).
    registrations: AtomicU64,
}

impl Shared {
    fn applied_version(&self) -> u64 {
        *self.applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a snapshot; `stored` says it comes from disk (applied only if nothing newer
    /// came from the coordinator meanwhile, and not written back).
    fn apply(&self, snap: &v1::RelayConfig, stored: bool) -> Result<(), CoordinatorError> {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        if stored && self.control.is_configured() {
            return Ok(());
        }
        let config = relay_config(&self.control.base, snap)?;
        self.control
            .reconfigure(&config)
            .map_err(|e| CoordinatorError::Snapshot {
                version: snap.version,
                reason: e.to_string(),
            })?;
        *applied = snap.version;
        let usable = config.egress.iter().filter(|e| !e.paused).count();
        tracing::info!(
            version = snap.version,
            stored,
            domains = config.sending_domains.len(),
            addresses = config.egress.len(),
            usable,
            "applied the relay configuration"
        );
        if !stored && let Err(e) = store_snapshot(&self.opts.state_dir, snap) {
            tracing::error!(error = %e, "failed to store the configuration snapshot");
        }
        Ok(())
    }
}

/// A relay in coordinated mode: the relay plus its coordinator client.
#[derive(Debug)]
pub struct Coordinated {
    relay: Relay,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("endpoint", &self.opts.endpoint)
            .finish_non_exhaustive()
    }
}

impl Coordinated {
    /// Starts the relay unconfigured and the coordinator client: registers, applies the
    /// snapshots it streams, falls back to the stored snapshot when the coordinator is not
    /// reachable within `initial_wait`, and reports every `report_interval`.
    pub async fn start(
        base: RelayConfig,
        listener_tls: Option<tokio_rustls::TlsAcceptor>,
        opts: CoordinatorOptions,
    ) -> Result<Coordinated, CoordinatorError> {
        opts.identity.check()?;
        let endpoint = endpoint(&opts)?;
        create_state_dir(&opts.state_dir)?;
        let reports = ReportStore::open(&opts.state_dir)?;
        let journal = SuppressionJournal::open(&opts.state_dir)?;
        let stored = match load_snapshot(&opts.state_dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "ignoring the stored configuration snapshot");
                None
            }
        };
        let relay = Relay::start_unconfigured(base, listener_tls)
            .await
            .map_err(|e| CoordinatorError::Relay(Box::new(e)))?;
        let control = relay.control();
        if let Some(text) = read_optional(&opts.state_dir.join(COUNTERS_FILE))? {
            let saved = decode_counters(&String::from_utf8_lossy(&text));
            control.shaper().restore_counters(&saved, unix_now());
        }
        let shared = Arc::new(Shared {
            opts,
            endpoint,
            control,
            reports,
            journal,
            report_ready: Notify::new(),
            applied: Mutex::new(0),
            complete: AtomicU64::new(0),
            connected: watch::channel(false).0,
            prev: Mutex::new((BTreeMap::new(), 0, String::new())),
            registrations: AtomicU64::new(0),
        });
        shared
            .control
            .suppressions()
            .set_durable(Arc::new(DurableReports(Arc::downgrade(&shared))));
        let (stop, stop_rx) = watch::channel(false);
        let first_failure = Arc::new(Notify::new());
        let tasks = vec![
            tokio::spawn(fallback_to_stored(
                Arc::clone(&shared),
                stored,
                Arc::clone(&first_failure),
                stop_rx.clone(),
            )),
            tokio::spawn(connection_loop(
                Arc::clone(&shared),
                first_failure,
                stop_rx.clone(),
            )),
            tokio::spawn(report_loop(Arc::clone(&shared), stop_rx)),
        ];
        Ok(Coordinated {
            relay,
            shared,
            stop,
            tasks,
        })
    }

    /// The running relay.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// The version of the configuration applied (0 for none).
    pub fn applied_version(&self) -> u64 {
        self.shared.applied_version()
    }

    /// Whether a session with the coordinator is up.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.shared.connected.subscribe()
    }

    /// Sequences of reports written and not acknowledged yet.
    pub fn pending_reports(&self) -> Vec<u64> {
        self.shared.reports.pending()
    }

    /// Writes a report of the counters now (as the report loop does each interval) and
    /// returns its sequence, or `None` when there was nothing to report.
    pub fn report_now(&self) -> Result<Option<u64>, CoordinatorError> {
        let seq = self.shared.tick()?;
        if seq.is_some() {
            self.shared.report_ready.notify_one();
        }
        Ok(seq)
    }

    /// Registrations with the coordinator that succeeded so far.
    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(Ordering::Acquire)
    }

    /// Drains the relay (see [`Relay::shutdown`]), writes a last report and tries to send
    /// what is pending for up to two seconds; what is not acknowledged stays on disk.
    pub async fn shutdown(self, grace: Duration) {
        self.relay.shutdown(grace).await;
        match self.shared.tick() {
            Ok(Some(_)) => self.shared.report_ready.notify_one(),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "failed to write the last report"),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.shared.reports.pending().is_empty()
            && *self.shared.connected.borrow()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

impl Shared {
    /// Writes a report of the deltas since the previous one, when there are deltas or the
    /// completely applied configuration version changed; returns its sequence.
    fn tick(&self) -> Result<Option<u64>, CoordinatorError> {
        let mut prev = self.prev.lock().unwrap_or_else(|e| e.into_inner());
        let shaper = self.control.shaper();
        // The applied version is complete once no connection is left on an address that it
        // does not allow.
        let applied = self.applied_version();
        if shaper.connections_on_unusable() == 0 {
            self.complete.fetch_max(applied, Ordering::AcqRel);
        }
        let complete = self.complete.load(Ordering::Acquire);
        let current = self.control.metrics().deliveries_by_sender();
        let deltas = deltas(&current, &prev.0, &self.control.sending_domains());
        let counters = encode_counters(&shaper.counters());
        if counters != prev.2 {
            let path = self.opts.state_dir.join(COUNTERS_FILE);
            match write_durable(&path, counters.as_bytes(), 0o600) {
                Ok(()) => prev.2 = counters,
                Err(e) => tracing::warn!(error = %e, "failed to save the quota counters"),
            }
        }
        // Held until the report is on disk, so no suppression is appended and then cleared
        // unreported.
        let mut journal = self.journal.lock();
        let suppressions = journal.distinct();
        if deltas.is_empty() && complete == prev.1 && suppressions.is_empty() {
            return Ok(None);
        }
        let id = &self.opts.identity;
        let seq = self.reports.write(v1::ReportRequest {
            pod_name: id.pod_name.clone(),
            pod_namespace: id.pod_namespace.clone(),
            sequence: 0,
            deltas,
            observed_unix: unix_now() as i64,
            applied_config_version: complete,
            suppressions,
        })?;
        prev.0 = current;
        prev.1 = complete;
        if let Err(e) = journal.clear(&self.journal.path) {
            // They are reported; at worst they are reported again.
            tracing::warn!(error = %e, "failed to clear the reported suppressions");
        }
        Ok(Some(seq))
    }
}

async fn report_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.opts.report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // Writing a report fsyncs: keep it off the runtime's workers.
        let writer = Arc::clone(&shared);
        let written = tokio::task::spawn_blocking(move || writer.tick())
            .await
            .unwrap_or(Ok(None));
        match written {
            Ok(Some(seq)) => {
                tracing::debug!(seq, "report written");
                shared.report_ready.notify_one();
            }
            Ok(None) => {}
            // The deltas stay in the counters and go into the next report.
            Err(e) => tracing::error!(error = %e, "failed to write a report"),
        }
    }
}

/// Applies the stored snapshot when the first connection fails or takes too long.
async fn fallback_to_stored(
    shared: Arc<Shared>,
    stored: Option<v1::RelayConfig>,
    first_failure: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(snap) = stored else {
        return;
    };
    tokio::select! {
        _ = tokio::time::sleep(shared.opts.initial_wait) => {}
        _ = first_failure.notified() => {}
        _ = stop.wait_for(|s| *s) => return,
    }
    if shared.control.is_configured() {
        return;
    }
    tracing::warn!(
        version = snap.version,
        "the coordinator is not reachable: carrying on with the stored configuration"
    );
    if let Err(e) = shared.apply(&snap, true) {
        tracing::error!(error = %e, "failed to apply the stored configuration");
    }
}

async fn connection_loop(
    shared: Arc<Shared>,
    first_failure: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = shared.opts.backoff_min;
    loop {
        let mut got_config = false;
        let result = tokio::select! {
            r = session(&shared, &mut got_config) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        shared.connected.send_replace(false);
        match result {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "coordinator session ended"),
        }
        if !shared.control.is_configured() {
            first_failure.notify_one();
        }
        if got_config {
            backoff = shared.opts.backoff_min;
        }
        // A little jitter so that a fleet does not reconnect in step.
        let jitter = Duration::from_millis(u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
                % 250,
        ));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(shared.opts.backoff_max);
    }
}

async fn timed<T>(
    call: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CoordinatorError> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(CoordinatorError::rpc(call, status)),
        Err(_) => Err(CoordinatorError::Timeout { call }),
    }
}

/// One session: connect, register, then watch the config and send reports until either
/// fails.
async fn session(shared: &Shared, got_config: &mut bool) -> Result<(), CoordinatorError> {
    let opts = &shared.opts;
    let channel: Channel =
        shared
            .endpoint
            .connect()
            .await
            .map_err(|source| CoordinatorError::Connect {
                endpoint: opts.endpoint.clone(),
                source,
            })?;
    let mut client = CoordinatorClient::new(channel);
    let id = &opts.identity;
    let reg = timed(
        "Register",
        opts.call_timeout,
        client.register(v1::RegisterRequest {
            pod_name: id.pod_name.clone(),
            pod_namespace: id.pod_namespace.clone(),
            pod_uid: id.pod_uid.clone(),
            relay_version: env!("CARGO_PKG_VERSION").to_string(),
        }),
    )
    .await?;
    shared.registrations.fetch_add(1, Ordering::AcqRel);
    tracing::info!(
        pool = %reg.pool,
        addresses = reg.addresses.len(),
        applied_sequence = reg.applied_sequence,
        pending = shared.reports.pending().len(),
        "registered with the coordinator"
    );
    shared.reports.applied(reg.applied_sequence)?;
    let mut stream = client
        .watch_config(v1::WatchConfigRequest {
            pod_name: id.pod_name.clone(),
            pod_namespace: id.pod_namespace.clone(),
            known_version: shared.applied_version(),
        })
        .await
        .map_err(|s| CoordinatorError::rpc("WatchConfig", s))?
        .into_inner();
    shared.connected.send_replace(true);
    let watch = async {
        loop {
            match stream.message().await {
                Ok(Some(snap)) => {
                    *got_config = true;
                    // A snapshot the relay cannot use is logged and skipped: the relay keeps
                    // the configuration it has until a usable one arrives.
                    if let Err(e) = shared.apply(&snap, false) {
                        tracing::error!(error = %e, "refused a configuration snapshot");
                    }
                }
                Ok(None) => return Err(CoordinatorError::StreamEnded),
                Err(status) => return Err(CoordinatorError::rpc("WatchConfig", status)),
            }
        }
    };
    let mut reporter = client.clone();
    let send = async {
        loop {
            while let Some(report) = shared.reports.first() {
                let seq = report.sequence;
                let ack = timed("Report", opts.call_timeout, reporter.report(report)).await?;
                if ack.applied_sequence < seq {
                    return Err(CoordinatorError::NotApplied {
                        sent: seq,
                        acked: ack.applied_sequence,
                    });
                }
                shared.reports.applied(ack.applied_sequence)?;
                tracing::debug!(seq, "report acknowledged");
            }
            shared.report_ready.notified().await;
        }
    };
    tokio::select! {
        r = watch => r,
        r = send => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RelayConfig {
        RelayConfig::coordinated_base(
            "relay.test".into(),
            "127.0.0.1:0".parse().unwrap(),
            "/tmp/spool".into(),
            None,
        )
    }

    #[test]
    fn snapshot_translates_states_quotas_and_limits() {
        let snap = v1::RelayConfig {
            version: 3,
            addresses: vec![
                v1::EgressAddress {
                    address: "127.0.0.2".into(),
                    helo_name: "o2.test".into(),
                    state: v1::AddressState::Warming as i32,
                },
                v1::EgressAddress {
                    address: "127.0.0.3".into(),
                    helo_name: String::new(),
                    state: v1::AddressState::Draining as i32,
                },
            ],
            quotas: vec![
                v1::AddressQuota {
                    address: "127.0.0.2".into(),
                    provider_group: String::new(),
                    window_limit: 200,
                    hourly_limit: 20,
                    window_start_unix: 86_400,
                    window_seconds: 86_400,
                    overflow_to_warm: true,
                },
                v1::AddressQuota {
                    address: "127.0.0.2".into(),
                    provider_group: "Gmail".into(),
                    window_limit: 50,
                    hourly_limit: 0,
                    window_start_unix: 86_400,
                    window_seconds: 86_400,
                    overflow_to_warm: true,
                },
            ],
            shaping: Some(v1::Shaping {
                max_connections_per_address: 7,
                providers: vec![v1::ProviderShaping {
                    provider_group: "yahoo".into(),
                    max_connections: 2,
                    max_messages_per_minute: 120,
                    max_messages_per_connection: 0,
                }],
            }),
            delivery: Some(v1::Delivery {
                retry_schedule_seconds: vec![5, 10],
                max_queue_lifetime_seconds: 100,
                dsn: true,
                destination_port: 2525,
                nameservers: vec!["127.0.0.1".into(), "127.0.0.1:5353".into()],
            }),
            listener: Some(v1::Listener {
                allowed_networks: vec!["10.0.0.0/8".into(), "127.0.0.1".into()],
                max_message_bytes: 0,
                max_recipients: 3,
                max_sessions: 0,
                users: [("app".to_string(), "pw".to_string())].into(),
                feedback_token_sha256: String::new(),
            }),
            domains: Vec::new(),
        };
        let c = relay_config(&base(), &snap).unwrap();
        assert_eq!(c.egress.len(), 2);
        let e2 = &c.egress[0];
        assert_eq!(
            (e2.daily_quota, e2.hourly_quota, e2.paused),
            (Some(200), Some(20), false)
        );
        assert_eq!(e2.quota_window_seconds, Some(86_400));
        assert_eq!(
            e2.provider_quotas.get(&ProviderGroup::Gmail),
            Some(&QuotaLimits {
                daily: Some(50),
                hourly: None
            })
        );
        assert_eq!(e2.max_connections, Some(7));
        let e3 = &c.egress[1];
        assert!(e3.paused);
        assert_eq!(e3.helo, "relay.test");
        let y = &c.shaping.providers[&ProviderGroup::Yahoo];
        assert_eq!(y.max_connections_per_address, Some(2));
        assert_eq!(y.messages_per_second_per_address, Some(2.0));
        assert_eq!(y.max_messages_per_connection, None);
        assert_eq!(c.delivery.port, 2525);
        assert_eq!(
            c.delivery.nameservers,
            vec![
                "127.0.0.1:53".parse().unwrap(),
                "127.0.0.1:5353".parse().unwrap()
            ]
        );
        assert_eq!(c.delivery.retry_intervals.len(), 2);
        assert!(c.delivery.dsn);
        assert_eq!(c.listener.allowed_networks.len(), 2);
        assert_eq!(c.listener.max_recipients, 3);
        assert_eq!(c.listener.max_sessions, 500);
        assert_eq!(c.listener.users[0].name, "app");

        let mut bad = snap.clone();
        bad.addresses[0].address = "not-an-ip".into();
        let err = relay_config(&base(), &bad).unwrap_err().to_string();
        assert!(
            err.contains("snapshot 3") && err.contains("not-an-ip"),
            "{err}"
        );
    }

    #[test]
    fn snapshot_translates_warm_state_overflow_dedicated_addresses_and_feedback_token() {
        let hash = "AB".repeat(32);
        let snap = v1::RelayConfig {
            version: 5,
            addresses: vec![
                v1::EgressAddress {
                    address: "127.0.0.2".into(),
                    helo_name: String::new(),
                    state: v1::AddressState::Warming as i32,
                },
                v1::EgressAddress {
                    address: "127.0.0.3".into(),
                    helo_name: String::new(),
                    state: v1::AddressState::Warm as i32,
                },
            ],
            quotas: vec![
                v1::AddressQuota {
                    address: "127.0.0.2".into(),
                    window_limit: 10,
                    overflow_to_warm: true,
                    ..Default::default()
                },
                v1::AddressQuota {
                    address: "127.0.0.3".into(),
                    window_limit: 10,
                    overflow_to_warm: false,
                    ..Default::default()
                },
            ],
            domains: vec![v1::SendingDomain {
                domain: "example.test".into(),
                addresses: vec!["127.0.0.3".into()],
                ..Default::default()
            }],
            listener: Some(v1::Listener {
                feedback_token_sha256: hash.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = relay_config(&base(), &snap).unwrap();
        assert_eq!(c.shaping.overflow, OverflowPolicy::Wait);
        let view: Vec<(bool, bool)> = c
            .egress
            .iter()
            .map(|e| (e.warm, e.overflow_to_warm))
            .collect();
        assert_eq!(view, vec![(false, true), (true, false)]);
        assert_eq!(
            c.sending_domains[0].addresses,
            vec!["127.0.0.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            c.feedback.token_sha256.as_deref(),
            Some(hash.to_ascii_lowercase().as_str())
        );

        // A malformed token hash only leaves the endpoint off; a malformed dedicated address
        // refuses the snapshot.
        let mut odd = snap.clone();
        odd.listener.as_mut().unwrap().feedback_token_sha256 = "not-hex".into();
        assert_eq!(
            relay_config(&base(), &odd).unwrap().feedback.token_sha256,
            None
        );
        let mut bad = snap.clone();
        bad.domains[0].addresses = vec!["nowhere".into()];
        let err = relay_config(&base(), &bad).unwrap_err().to_string();
        assert!(
            err.contains("dedicated address") && err.contains("nowhere"),
            "{err}"
        );
    }

    #[test]
    fn suppression_journal_survives_reopen_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = |r: &str| v1::Suppression {
            domain: "example.test".into(),
            recipient: r.into(),
            reason: v1::SuppressionReason::HardBounce as i32,
        };
        let j = SuppressionJournal::open(dir.path()).unwrap();
        j.append(&s("a@dest.test")).unwrap();
        j.append(&s("b@dest.test")).unwrap();
        j.append(&s("a@dest.test")).unwrap();
        drop(j);
        // A crash in the middle of the next record leaves part of it behind.
        let path = dir.path().join(SUPPRESSIONS_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let torn = s("c@dest.test").encode_length_delimited_to_vec();
        bytes.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(&path, &bytes).unwrap();
        let j = SuppressionJournal::open(dir.path()).unwrap();
        assert_eq!(j.pending().len(), 3);
        assert_eq!(
            j.lock()
                .distinct()
                .iter()
                .map(|s| s.recipient.as_str())
                .collect::<Vec<_>>(),
            vec!["a@dest.test", "b@dest.test"]
        );
        // New records after the repaired tail read back; clearing empties the file.
        j.append(&s("d@dest.test")).unwrap();
        drop(j);
        let j = SuppressionJournal::open(dir.path()).unwrap();
        assert_eq!(j.pending().len(), 4);
        j.lock().clear(&path).unwrap();
        drop(j);
        assert!(
            SuppressionJournal::open(dir.path())
                .unwrap()
                .pending()
                .is_empty()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn deltas_are_differences_attributed_to_sending_domains() {
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let k = |o, d: &str| (Some(ip), ProviderGroup::Gmail, o, d.to_string());
        let prev = BTreeMap::from([(k(Outcome::Delivered, "example.test"), 3)]);
        let cur = BTreeMap::from([
            (k(Outcome::Delivered, "example.test"), 5),
            (k(Outcome::Delivered, "news.example.test"), 1),
            (k(Outcome::Blocked, "other.test"), 2),
            (
                (None, ProviderGroup::Other, Outcome::Bounced, String::new()),
                1,
            ),
        ]);
        let d = deltas(&cur, &prev, &["example.test".to_string()]);
        let view: Vec<(String, &str, i32, String, u64)> = d
            .iter()
            .map(|d| {
                (
                    d.address.clone(),
                    d.provider_group.as_str(),
                    d.outcome,
                    d.domain.clone(),
                    d.count,
                )
            })
            .collect();
        assert_eq!(
            view,
            vec![
                (
                    String::new(),
                    "other",
                    v1::Outcome::HardBounce as i32,
                    String::new(),
                    1
                ),
                (
                    "127.0.0.2".into(),
                    "gmail",
                    v1::Outcome::Delivered as i32,
                    "example.test".into(),
                    3
                ),
                (
                    "127.0.0.2".into(),
                    "gmail",
                    v1::Outcome::PolicyBlock as i32,
                    "other.test".into(),
                    2
                ),
            ]
        );
    }

    #[test]
    fn report_store_keeps_sequences_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReportStore::open(dir.path()).unwrap();
        for _ in 0..3 {
            store.write(v1::ReportRequest::default()).unwrap();
        }
        assert_eq!(store.pending(), vec![1, 2, 3]);
        store.applied(2).unwrap();
        assert_eq!(store.pending(), vec![3]);
        drop(store);
        let store = ReportStore::open(dir.path()).unwrap();
        assert_eq!(store.pending(), vec![3]);
        store.applied(3).unwrap();
        drop(store);
        // Everything acknowledged: the counter still continues where it was.
        let store = ReportStore::open(dir.path()).unwrap();
        assert_eq!(store.write(v1::ReportRequest::default()).unwrap(), 4);
        // A coordinator that applied more than we remember moves the counter on.
        store.applied(10).unwrap();
        assert!(store.pending().is_empty());
        assert_eq!(store.write(v1::ReportRequest::default()).unwrap(), 11);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(report_path(dir.path(), 11))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn quota_counters_round_trip() {
        let c = vec![
            SavedCounter {
                address: "127.0.0.2".parse().unwrap(),
                group: None,
                counter: SentCounter {
                    hour: 5,
                    hour_sent: 2,
                    window_begin: 86_400,
                    window_sent: 9,
                },
            },
            SavedCounter {
                address: "::1".parse().unwrap(),
                group: Some(ProviderGroup::Docomo),
                counter: SentCounter::default(),
            },
        ];
        assert_eq!(decode_counters(&encode_counters(&c)), c);
    }
}
