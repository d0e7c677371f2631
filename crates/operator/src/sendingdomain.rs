//! The SendingDomain controller: DKIM keys in a Secret, the domain's records published through
//! its DNS provider and verified at the authoritative servers, DKIM rotation, and cleanup of
//! records and keys when the domain is deleted.
//!
//! One reconcile is a pipeline: read the pool and the key Secret (async) → keys (generate or
//! rotate, then apply the Secret) → desired records ([`dns::desired`], pure) → plan against
//! the provider ([`dns::plan`], pure) and apply it → verify ([`dns::verify`]) → SPF lookups
//! with includes followed ([`dns::spf`]) → status → Events for what changed. DNS trouble
//! never fails the reconcile: it is told in conditions and Events and retried with backoff,
//! and nothing else (the relays' signing, other domains) stops.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mailfleet_api::common::{ConditionStatus, parse_duration, set_condition, set_reconciling};
use mailfleet_api::relaypool::RelayPool;
use mailfleet_api::sendingdomain::{
    CONDITION_DKIM_READY, CONDITION_DNS_PUBLISHED, CONDITION_DNS_VERIFIED, CONDITION_READY,
    DnsProvider, DnsRecordStatus, RetiringSelector, SendingDomain, SendingDomainStatus,
};
use serde_json::json;

use crate::dkim::{self, KeySet, SecretKeys};
use crate::dns::rfc2136::{Rfc2136, Rfc2136Error, resolve_server};
use crate::dns::{self, Record, desired::DkimPublicKey, plan};
use crate::metrics::Metrics;

/// Field manager of everything this controller applies.
pub const MANAGER: &str = "mailfleet-operator";
/// Finalizer: removes the domain's records from DNS and its generated keys.
pub const FINALIZER: &str = "mailfleet.dev/sendingdomain";
/// Label on generated key Secrets: the SendingDomain's name.
pub const DOMAIN_LABEL: &str = "mailfleet.dev/sendingdomain";
/// Annotation on the key Secret: when the next selector was first seen verified.
pub const NEXT_VERIFIED_AT: &str = "mailfleet.dev/next-verified-at";
/// Condition type: the SPF record stays within SPF's 10 DNS lookups, includes followed, and
/// every included domain has one SPF record.
pub const CONDITION_SPF_VALID: &str = "SPFValid";
const CONTROLLER: &str = "sendingdomain";
/// Retirement delay of an old selector when the pool does not say (its max queue lifetime).
const DEFAULT_RETENTION: Duration = Duration::from_secs(5 * 86_400);
const MIN_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
const RESYNC: Duration = Duration::from_secs(600);

/// Errors of one reconcile, by category. DNS failures are not among them: they end up in
/// conditions.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("cannot generate DKIM keys: {0}")]
    Dkim(#[from] dkim::DkimError),
    #[error("cannot remove the records of {domain}: {source}")]
    Cleanup {
        domain: String,
        source: Rfc2136Error,
    },
    #[error("cannot remove the records of {domain}: {reason}")]
    CleanupConfig { domain: String, reason: String },
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl ReconcileError {
    fn category(&self) -> &'static str {
        match self {
            ReconcileError::Api(_) => "api",
            ReconcileError::Dkim(_) => "dkim",
            ReconcileError::Cleanup { .. } | ReconcileError::CleanupConfig { .. } => "dns",
            ReconcileError::Finalizer(_) => "finalizer",
        }
    }
}

/// The controller's notion of now; tests inject one to rotate keys in seconds.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// What every reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// Who Events on SendingDomains say reported them (`kubectl describe` shows them).
    pub reporter: Reporter,
    /// Since when each failing domain (`namespace/name`) fails, for backoff.
    failures: Mutex<HashMap<String, Instant>>,
}

impl Context {
    pub fn new(client: kube::Client, metrics: Arc<Metrics>) -> Context {
        Context {
            reporter: Reporter::from("mailfleet-operator"),
            client,
            metrics,
            clock: Arc::new(Timestamp::now),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Replaces who Events say reported them (by default `mailfleet-operator` on this host).
    pub fn with_reporter(mut self, reporter: Reporter) -> Context {
        self.reporter = reporter;
        self
    }

    /// Publishes an Event about a domain; failures are logged, never fatal. Events are only
    /// published when something changed, and each says what: a fresh Recorder per Event, since
    /// a shared one folds a second Event of the same reason into the first as a series and
    /// keeps the first one's note.
    async fn event(&self, d: &SendingDomain, note: &Note) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let ev = Event {
            type_: note.type_,
            reason: note.reason.to_string(),
            note: Some(note.text.clone()),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &d.object_ref(&())).await {
            tracing::debug!(domain = %key_of(d), error = %e, reason = note.reason, "cannot publish an event");
        }
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Context {
        self.clock = clock;
        self
    }

    /// The delay before the next try: as long as the domain has been failing (2 s at least,
    /// 5 min at most), so retries double over time however many events also wake it.
    fn backoff(&self, key: &str, failed: bool) -> Option<Duration> {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if !failed {
            map.remove(key);
            return None;
        }
        let since = *map.entry(key.to_string()).or_insert_with(Instant::now);
        Some(since.elapsed().clamp(MIN_BACKOFF, MAX_BACKOFF))
    }
}

fn key_of(d: &SendingDomain) -> String {
    format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any())
}

/// Name of the key Secret: the referenced one, or `<name>-dkim`.
pub fn key_secret_name(d: &SendingDomain) -> String {
    d.spec
        .dkim
        .key_secret_ref
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_else(|| format!("{}-dkim", d.name_any()))
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, ByteString(v))| (k, v))
        .collect()
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(t)
}

/// A condition's (status, reason, message).
type Cond = (ConditionStatus, &'static str, String);

/// An Event to publish once the reconcile's writes succeeded.
#[derive(Clone, Debug)]
struct Note {
    type_: EventType,
    reason: &'static str,
    text: String,
}

impl Note {
    fn normal(reason: &'static str, text: String) -> Note {
        Note {
            type_: EventType::Normal,
            reason,
            text,
        }
    }

    fn warning(reason: &'static str, text: String) -> Note {
        Note {
            type_: EventType::Warning,
            reason,
            text,
        }
    }
}

/// Whether a condition changed from what the last status said (status, reason or message).
fn changed(old: &[Condition], ty: &str, new: &Cond) -> bool {
    old.iter()
        .find(|c| c.type_ == ty)
        .is_none_or(|c| c.status != new.0.as_str() || c.reason != new.1 || c.message != new.2)
}

/// Whether a condition turned True (it was absent or not True).
fn became_true(old: &[Condition], ty: &str, new: &Cond) -> bool {
    new.0 == ConditionStatus::True
        && old
            .iter()
            .find(|c| c.type_ == ty)
            .is_none_or(|c| c.status != ConditionStatus::True.as_str())
}

/// The keys to publish and what status says about them.
struct Keys {
    secret: SecretKeys,
    retiring: Vec<RetiringSelector>,
    last_rotation: Option<Time>,
    condition: Cond,
    /// When the next rotation step is due (to requeue in time).
    next_step: Option<Timestamp>,
    /// What changed (generated, rotated, retired), for Events.
    events: Vec<Note>,
}

/// Generated keys: create, rotate, retire; write the Secret when it changes.
async fn ensure_keys(
    d: &SendingDomain,
    ctx: &Context,
    retention: Duration,
) -> Result<Keys, ReconcileError> {
    let ns = d.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = key_secret_name(d);
    let existing = secrets.get_opt(&name).await?;
    let status = d.status.clone().unwrap_or_default();
    let algorithm = d.spec.dkim.algorithm;
    let now = (ctx.clock)();

    if d.spec.dkim.key_secret_ref.is_some() {
        let Some(secret) = existing else {
            return Ok(Keys {
                secret: SecretKeys::default(),
                retiring: Vec::new(),
                last_rotation: None,
                condition: (
                    ConditionStatus::False,
                    "KeySecretNotFound",
                    format!("the DKIM key Secret {name} (dkim.keySecretRef) does not exist"),
                ),
                next_step: None,
                events: Vec::new(),
            });
        };
        let keys = SecretKeys::from_data(&secret_data(&secret), Some(&d.spec.dkim.selector_prefix));
        let condition = match keys.active.as_ref().map(|a| a.check(algorithm)) {
            Some(Ok(())) => (
                ConditionStatus::True,
                "KeysReady",
                format!("keys from Secret {name}"),
            ),
            Some(Err(e)) => (ConditionStatus::False, "KeySecretInvalid", e.to_string()),
            None => (
                ConditionStatus::False,
                "KeySecretInvalid",
                format!("the DKIM key Secret {name} holds neither rsa.pem nor ed25519.pem"),
            ),
        };
        return Ok(Keys {
            secret: SecretKeys {
                next: None,
                retiring: Vec::new(),
                ..keys
            },
            retiring: Vec::new(),
            last_rotation: status.last_rotation,
            condition,
            next_step: None,
            events: Vec::new(),
        });
    }

    let before = existing
        .as_ref()
        .map(|s| SecretKeys::from_data(&secret_data(s), None))
        .unwrap_or_default();
    let mut annotation: Option<Timestamp> = existing
        .as_ref()
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(NEXT_VERIFIED_AT))
        .and_then(|v| v.parse().ok());
    let mut keys = before.clone();
    let mut last_rotation = status.last_rotation.clone();
    let mut next_step = None;
    let mut events = Vec::new();
    let taken =
        |k: &SecretKeys| -> Vec<String> { k.published().map(|s| s.selector.clone()).collect() };
    let prefix = &d.spec.dkim.selector_prefix;

    if keys
        .active
        .as_ref()
        .is_none_or(|a| a.check(algorithm).is_err())
    {
        let t = taken(&keys);
        let refs: Vec<&str> = t.iter().map(String::as_str).collect();
        let selector = dkim::selector(prefix, now, &refs);
        keys.active = Some(KeySet::generate_blocking(&selector, algorithm).await?);
        keys.next = None;
        annotation = None;
        last_rotation = Some(Time(now));
        events.push(Note::normal(
            "KeyGenerated",
            format!(
                "generated the DKIM key(s) of selector {selector} in Secret {name}; the relays \
                 sign with it"
            ),
        ));
    }
    let ttl = Duration::from_secs(u64::try_from(d.spec.dns.ttl).unwrap_or(300));
    let mut retiring: Vec<RetiringSelector> = Vec::new();
    if let Some(period) = d
        .spec
        .dkim
        .rotation_period
        .as_deref()
        .and_then(|p| parse_duration(p).ok())
    {
        let since = last_rotation.as_ref().map(|t| t.0).unwrap_or(now);
        last_rotation = Some(Time(since));
        let due = add(since, period);
        if keys.next.is_none() {
            if now >= due {
                let t = taken(&keys);
                let refs: Vec<&str> = t.iter().map(String::as_str).collect();
                let selector = dkim::selector(prefix, now, &refs);
                keys.next = Some(KeySet::generate_blocking(&selector, algorithm).await?);
                annotation = None;
                events.push(Note::normal(
                    "RotationStarted",
                    format!(
                        "rotation due: publishing the new selector {selector}; the relays \
                         switch to it once its record is verified"
                    ),
                ));
            } else {
                next_step = Some(due);
            }
        }
        if let Some(next) = keys.next.clone() {
            // Published and verified (as the last status saw it), then one TTL more so that
            // no resolver still caches the absence of the new record.
            let names: Vec<String> = next
                .public_keys(algorithm)?
                .iter()
                .map(|k| dns::desired::dkim_name(&k.selector, &d.spec.domain))
                .collect();
            let verified = !names.is_empty()
                && names
                    .iter()
                    .all(|n| status.records.iter().any(|r| r.name == *n && r.verified));
            match (verified, annotation) {
                (false, _) => annotation = None,
                (true, None) => {
                    annotation = Some(now);
                    next_step = Some(add(now, ttl));
                }
                (true, Some(at)) if now >= add(at, ttl) => {
                    // The switch: one write of the Secret; the relays' configuration follows
                    // it in one step.
                    let new_selector = next.selector.clone();
                    if let Some(old) = keys.active.replace(next) {
                        keys.retiring.push(old.clone());
                        let remove_after = add(now, retention);
                        events.push(Note::normal(
                            "KeyRotated",
                            format!(
                                "the relays now sign with selector {new_selector}; {} stays \
                                 published until {remove_after} for mail still queued",
                                old.selector
                            ),
                        ));
                        retiring.push(RetiringSelector {
                            selector: old.selector,
                            remove_after: Time(remove_after),
                        });
                    }
                    keys.next = None;
                    annotation = None;
                    last_rotation = Some(Time(now));
                }
                (true, Some(at)) => next_step = Some(add(at, ttl)),
            }
        }
    }
    // Retiring selectors stay published until their time is up.
    let mut kept = Vec::new();
    for set in std::mem::take(&mut keys.retiring) {
        let remove_after = retiring
            .iter()
            .chain(status.retiring_selectors.iter())
            .find(|r| r.selector == set.selector)
            .map(|r| r.remove_after.clone())
            .unwrap_or_else(|| Time(add(now, retention)));
        if now >= remove_after.0 {
            events.push(Note::normal(
                "SelectorRetired",
                format!(
                    "selector {} retired: its keys and records are removed (kept until {})",
                    set.selector, remove_after.0
                ),
            ));
            continue;
        }
        next_step = Some(next_step.map_or(remove_after.0, |n: Timestamp| n.min(remove_after.0)));
        if !retiring.iter().any(|r| r.selector == set.selector) {
            retiring.push(RetiringSelector {
                selector: set.selector.clone(),
                remove_after,
            });
        }
        kept.push(set);
    }
    keys.retiring = kept;

    let old_annotation = existing
        .as_ref()
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(NEXT_VERIFIED_AT))
        .cloned();
    if keys != before || existing.is_none() || annotation.map(|a| a.to_string()) != old_annotation {
        let data: BTreeMap<String, ByteString> = keys
            .to_data()
            .into_iter()
            .map(|(k, v)| (k, ByteString(v.into_bytes())))
            .collect();
        let mut annotations = serde_json::Map::new();
        if let Some(at) = annotation {
            annotations.insert(NEXT_VERIFIED_AT.to_string(), json!(at.to_string()));
        }
        let owner = d
            .controller_owner_ref(&())
            .map(|o| vec![o])
            .unwrap_or_default();
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {
                    DOMAIN_LABEL: d.name_any(),
                    "app.kubernetes.io/managed-by": "mailfleet",
                },
                "annotations": annotations,
                "ownerReferences": owner,
            },
            "type": "Opaque",
            "data": data,
        });
        secrets
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&doc),
            )
            .await?;
        tracing::info!(domain = %key_of(d), secret = %name,
            active = ?keys.active.as_ref().map(|a| &a.selector),
            next = ?keys.next.as_ref().map(|a| &a.selector), "wrote the DKIM key Secret");
    }
    let active = keys
        .active
        .as_ref()
        .map(|a| a.selector.clone())
        .unwrap_or_default();
    Ok(Keys {
        secret: keys,
        retiring,
        last_rotation,
        condition: (
            ConditionStatus::True,
            "KeysReady",
            format!("relays sign with selector {active} (keys in Secret {name})"),
        ),
        next_step,
        events,
    })
}

/// The egress addresses the domain sends from: the pinned ones, or the pool's table (its
/// spec when status has none yet).
fn addresses(d: &SendingDomain, pool: Option<&RelayPool>) -> (Vec<IpAddr>, Option<String>) {
    if let Some(list) = &d.spec.addresses {
        return (list.iter().filter_map(|a| a.parse().ok()).collect(), None);
    }
    let Some(pool) = pool else {
        return (
            Vec::new(),
            Some(format!(
                "the relay pool {} does not exist",
                d.spec.relay_pool_ref.name
            )),
        );
    };
    let from_status: Vec<IpAddr> = pool
        .status
        .iter()
        .flat_map(|s| s.addresses.iter())
        .filter_map(|a| a.address.parse().ok())
        .collect();
    if !from_status.is_empty() {
        return (from_status, None);
    }
    match crate::egress::expand(&pool.spec.egress) {
        Ok(list) => (list.into_iter().map(|a| a.ip).collect(), None),
        Err(e) => (
            Vec::new(),
            Some(format!("the relay pool's egress is invalid: {e}")),
        ),
    }
}

/// The rfc2136 provider of a domain, with its TSIG secret.
async fn rfc2136_provider(
    d: &SendingDomain,
    ctx: &Context,
) -> Result<Rfc2136, (&'static str, String)> {
    let Some(cfg) = &d.spec.dns.rfc2136 else {
        return Err(("InvalidConfiguration", "dns.rfc2136 is missing".to_string()));
    };
    let ns = d.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let key = cfg.tsig_secret_ref.key.as_deref().unwrap_or("secret");
    let secret = secrets
        .get_opt(&cfg.tsig_secret_ref.name)
        .await
        .map_err(|e| {
            (
                "SecretUnreadable",
                format!(
                    "cannot read the TSIG secret {}: {e}",
                    cfg.tsig_secret_ref.name
                ),
            )
        })?
        .ok_or_else(|| {
            (
                "TSIGSecretNotFound",
                format!(
                    "the TSIG secret {} does not exist",
                    cfg.tsig_secret_ref.name
                ),
            )
        })?;
    let value = secret_data(&secret)
        .remove(key)
        .map(|v| String::from_utf8_lossy(&v).trim().to_string())
        .ok_or_else(|| {
            (
                "TSIGSecretNotFound",
                format!(
                    "the TSIG secret {} has no key {key:?}",
                    cfg.tsig_secret_ref.name
                ),
            )
        })?;
    let server = resolve_server(&cfg.server)
        .await
        .map_err(|e| (e.reason(), e.to_string()))?;
    Rfc2136::new(
        server,
        &cfg.zone,
        &cfg.tsig_key_name,
        cfg.tsig_algorithm,
        &value,
        u32::try_from(d.spec.dns.ttl).unwrap_or(300),
    )
    .map_err(|e| (e.reason(), e.to_string()))
}

/// What publishing achieved.
struct Published {
    /// Per desired record: written (or already there).
    published: Vec<bool>,
    condition: Cond,
    /// What changed in DNS, when something did (for the RecordsPublished Event).
    changes: Option<String>,
}

/// Plans against the server and applies the plan.
async fn publish_rfc2136(
    d: &SendingDomain,
    provider: &Rfc2136,
    desired: &[Record],
) -> Result<Published, Rfc2136Error> {
    let domain = &d.spec.domain;
    let reg_name = plan::registry_name(domain);
    let registry: Vec<String> = provider
        .read(&[(reg_name, dns::RecordType::Txt)].into_iter().collect())
        .await?
        .iter()
        .map(Record::value)
        .collect();
    let current = provider
        .read(&plan::names_to_read(desired, &registry))
        .await?;
    let p = plan::plan(domain, &key_of(d), desired, &current, &registry);
    provider.apply(&p).await?;
    let mut changes = None;
    if !p.is_empty() {
        tracing::info!(domain = %key_of(d), create = p.create.len(), delete = p.delete.len(),
            server = %provider.server, "applied DNS changes");
        // Registry entries go with their records: name the records only.
        let list = |rs: &[Record]| -> Vec<String> {
            rs.iter()
                .filter(|r| r.name != plan::registry_name(domain))
                .map(|r| format!("{} {}", r.name, r.record_type()))
                .collect()
        };
        let (created, deleted) = (list(&p.create), list(&p.delete));
        let mut text = format!("updated zone at {}:", provider.server);
        if created.is_empty() && deleted.is_empty() {
            text.push_str(" ownership registry entries only");
        }
        if !created.is_empty() {
            text.push_str(&format!(" wrote {}", created.join(", ")));
        }
        if !deleted.is_empty() {
            if !created.is_empty() {
                text.push(';');
            }
            text.push_str(&format!(" removed {}", deleted.join(", ")));
        }
        changes = Some(text);
    }
    let published = desired
        .iter()
        .map(|r| !p.conflicts.iter().any(|c| c.record.same_as(r)))
        .collect();
    let condition = if p.conflicts.is_empty() {
        (
            ConditionStatus::True,
            "Published",
            format!(
                "{} record(s) in zone {} at {}",
                desired.len(),
                d.spec
                    .dns
                    .rfc2136
                    .as_ref()
                    .map(|c| c.zone.as_str())
                    .unwrap_or(""),
                provider.server
            ),
        )
    } else {
        (
            ConditionStatus::False,
            "Conflict",
            p.conflicts
                .iter()
                .map(plan::Conflict::message)
                .collect::<Vec<_>>()
                .join("; "),
        )
    };
    Ok(Published {
        published,
        condition,
        changes,
    })
}

/// The SPFValid condition: SPF's lookup limit with includes followed (asked of the
/// verification servers, recursion desired). What makes receivers fail the record goes to
/// `problems` too (the domain is not Ready); lookups that fail only make the count unknown.
async fn spf_check(
    d: &SendingDomain,
    record: Option<&str>,
    servers: &Result<Vec<SocketAddr>, String>,
    problems: &mut Vec<String>,
) -> Cond {
    let Some(record) = record else {
        return (
            ConditionStatus::True,
            "NotManaged",
            "spf.managed is false: mailfleet publishes no SPF record".to_string(),
        );
    };
    let domain = dns::normalize(&d.spec.domain);
    let own = dns::spf::terms(record);
    let count = if own.includes.is_empty() && own.redirect.is_none() {
        dns::spf::count(&domain, record, &BTreeMap::new()).await
    } else {
        let resolver = servers
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|s| dns::verify::SpfResolver::new(s).map_err(|e| e.to_string()));
        match resolver {
            Ok(r) => dns::spf::count(&domain, record, &r).await,
            Err(e) => {
                return (
                    ConditionStatus::Unknown,
                    "NoResolver",
                    format!("cannot follow the SPF includes: {e}"),
                );
            }
        }
    };
    let summary = format!("the SPF record of {domain} {}", count.summary());
    if !count.problems.is_empty() {
        problems.extend(count.problems.iter().cloned());
        let reason = if count.lookups > dns::spf::LOOKUP_LIMIT {
            "TooManyLookups"
        } else {
            "InvalidInclude"
        };
        return (
            ConditionStatus::False,
            reason,
            format!("{summary}; {}", count.problems.join("; ")),
        );
    }
    if !count.unresolved.is_empty() {
        return (
            ConditionStatus::Unknown,
            "LookupFailed",
            format!("{summary}; not followed: {}", count.unresolved.join("; ")),
        );
    }
    (ConditionStatus::True, "WithinLimit", summary)
}

async fn verify_servers(
    d: &SendingDomain,
    provider: Option<&Rfc2136>,
) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for s in &d.spec.dns.verify_nameservers {
        out.push(resolve_server(s).await.map_err(|e| e.to_string())?);
    }
    if out.is_empty() {
        out.extend(provider.map(|p| p.server));
    }
    Ok(out)
}

async fn reconcile(d: Arc<SendingDomain>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let ns = d.namespace().unwrap_or_default();
    let api: Api<SendingDomain> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, d, |event| async {
        match event {
            Finalizer::Apply(d) => apply_domain(&d, &ctx).await,
            Finalizer::Cleanup(d) => cleanup(&d, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => ReconcileError::Finalizer(other.to_string()),
    });
    ctx.metrics
        .reconciled(CONTROLLER, result.is_ok(), started.elapsed());
    result
}

async fn cleanup(d: &SendingDomain, ctx: &Context) -> Result<Action, ReconcileError> {
    let domain = d.spec.domain.clone();
    if d.spec.dns.provider == DnsProvider::Rfc2136 {
        let provider = rfc2136_provider(d, ctx).await.map_err(|(_, reason)| {
            ReconcileError::CleanupConfig {
                domain: domain.clone(),
                reason,
            }
        })?;
        let err = |source| ReconcileError::Cleanup {
            domain: domain.clone(),
            source,
        };
        let reg_name = plan::registry_name(&domain);
        let registry: Vec<String> = provider
            .read(&[(reg_name, dns::RecordType::Txt)].into_iter().collect())
            .await
            .map_err(err)?
            .iter()
            .map(Record::value)
            .collect();
        let current = provider
            .read(&plan::names_to_read(&[], &registry))
            .await
            .map_err(err)?;
        let p = plan::plan(&domain, &key_of(d), &[], &current, &registry);
        provider.apply(&p).await.map_err(err)?;
        tracing::info!(domain = %key_of(d), removed = p.delete.len(), "removed the domain's DNS records");
    }
    if d.spec.dns.provider == DnsProvider::ExternalDns {
        // external-dns removes the records when their DNSEndpoint goes.
        let endpoints: Api<DynamicObject> = Api::namespaced_with(
            ctx.client.clone(),
            &d.namespace().unwrap_or_default(),
            &dns::externaldns::resource(),
        );
        match endpoints
            .delete(
                &dns::externaldns::endpoint_name(&d.name_any()),
                &DeleteParams::default(),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Generated keys go with the domain; a Secret someone else made (referenced, or created
    // under the default name before mailfleet generated anything) stays.
    if d.spec.dkim.key_secret_ref.is_none() {
        let secrets: Api<Secret> =
            Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
        let name = key_secret_name(d);
        let ours = secrets
            .get_opt(&name)
            .await?
            .is_some_and(|s| s.labels().get(DOMAIN_LABEL) == Some(&d.name_any()));
        if ours {
            match secrets.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    ctx.backoff(&key_of(d), false);
    Ok(Action::await_change())
}

async fn apply_domain(cached: &SendingDomain, ctx: &Context) -> Result<Action, ReconcileError> {
    let ns = cached.namespace().unwrap_or_default();
    let name = cached.name_any();
    // Rotation decides from status (last rotation, what was verified): read it fresh, since
    // the watch cache may not have our last status write yet.
    let domains: Api<SendingDomain> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(fresh) = domains.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let d = &fresh;
    let now = (ctx.clock)();
    let generation = d.metadata.generation;

    let pools: Api<RelayPool> = Api::namespaced(ctx.client.clone(), &ns);
    let pool = pools.get_opt(&d.spec.relay_pool_ref.name).await?;
    let retention = pool
        .as_ref()
        .and_then(|p| parse_duration(&p.spec.delivery.max_queue_lifetime).ok())
        .unwrap_or(DEFAULT_RETENTION);
    let (addrs, pool_problem) = addresses(d, pool.as_ref());

    let keys = ensure_keys(d, ctx, retention).await?;
    // The Secret is written: its changes happened whatever comes next.
    for note in &keys.events {
        ctx.event(d, note).await;
    }
    let mut dkim_condition = keys.condition.clone();
    let mut pubkeys: Vec<DkimPublicKey> = Vec::new();
    for set in keys.secret.published() {
        match set.public_keys(d.spec.dkim.algorithm) {
            Ok(k) => pubkeys.extend(k),
            Err(e) => dkim_condition = (ConditionStatus::False, "KeyInvalid", e.to_string()),
        }
    }
    let desired = dns::desired::desired(&d.spec, &addrs, &pubkeys);
    let mut problems: Vec<String> = pool_problem.into_iter().collect();
    problems.extend(desired.problems.iter().cloned());

    // Publish.
    let mut provider = None;
    let publish: Published = match d.spec.dns.provider {
        DnsProvider::Rfc2136 => match rfc2136_provider(d, ctx).await {
            Err((reason, message)) => Published {
                published: vec![false; desired.records.len()],
                condition: (ConditionStatus::False, reason, message),
                changes: None,
            },
            Ok(p) => {
                let r = publish_rfc2136(d, &p, &desired.records).await;
                provider = Some(p);
                match r {
                    Ok(p) => p,
                    Err(e) => Published {
                        published: vec![false; desired.records.len()],
                        condition: (ConditionStatus::False, e.reason(), e.to_string()),
                        changes: None,
                    },
                }
            }
        },
        DnsProvider::Manual => Published {
            published: vec![false; desired.records.len()],
            condition: (
                ConditionStatus::Unknown,
                "Manual",
                "records are listed in status.records for a person to publish".to_string(),
            ),
            changes: None,
        },
        DnsProvider::ExternalDns => {
            let doc = dns::externaldns::endpoint(
                &name,
                &ns,
                d.controller_owner_ref(&())
                    .and_then(|o| serde_json::to_value(o).ok()),
                d.spec.dns.ttl,
                &desired.records,
            );
            let endpoints: Api<DynamicObject> =
                Api::namespaced_with(ctx.client.clone(), &ns, &dns::externaldns::resource());
            match endpoints
                .patch(
                    &dns::externaldns::endpoint_name(&name),
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&doc),
                )
                .await
            {
                Ok(_) => Published {
                    published: vec![true; desired.records.len()],
                    condition: (
                        ConditionStatus::True,
                        "EndpointWritten",
                        format!(
                            "DNSEndpoint {name} holds {} record(s) for external-dns",
                            desired.records.len()
                        ),
                    ),
                    changes: None,
                },
                Err(kube::Error::Api(e)) if e.code == 404 => Published {
                    published: vec![false; desired.records.len()],
                    condition: (
                        ConditionStatus::False,
                        "DNSEndpointCRDMissing",
                        "the DNSEndpoint kind (externaldns.k8s.io/v1alpha1) is not installed: \
                         install external-dns with its CRD source"
                            .to_string(),
                    ),
                    changes: None,
                },
                Err(e) => return Err(e.into()),
            }
        }
    };

    // Verify.
    let names: std::collections::BTreeSet<(String, dns::RecordType)> = desired
        .records
        .iter()
        .map(|r| (r.name.clone(), r.record_type()))
        .collect();
    let servers = verify_servers(d, provider.as_ref()).await;
    let (verified, verify_condition): (Vec<bool>, Cond) = match servers.clone() {
        Err(e) => (
            vec![false; desired.records.len()],
            (ConditionStatus::Unknown, "InvalidNameserver", e),
        ),
        Ok(servers) => match dns::verify::served(&servers, &names).await {
            Err(e) => (
                vec![false; desired.records.len()],
                (
                    ConditionStatus::Unknown,
                    "VerificationFailed",
                    e.to_string(),
                ),
            ),
            Ok(served) => {
                let v = dns::verify::verified(&desired.records, &served);
                let bad: Vec<String> = desired
                    .records
                    .iter()
                    .zip(&v)
                    .filter(|(_, ok)| !**ok)
                    .map(|(r, _)| format!("{} {}", r.name, r.record_type()))
                    .collect();
                let cond = if bad.is_empty() {
                    (
                        ConditionStatus::True,
                        "Verified",
                        format!(
                            "{} record(s) served as desired by {servers:?}",
                            desired.records.len()
                        ),
                    )
                } else {
                    (
                        ConditionStatus::False,
                        "NotServed",
                        format!(
                            "{} of {} record(s) not served as desired by {servers:?}: {}",
                            bad.len(),
                            desired.records.len(),
                            bad.join(", ")
                        ),
                    )
                };
                (v, cond)
            }
        },
    };
    let spf_condition = spf_check(d, desired.spf.as_deref(), &servers, &mut problems).await;
    let mut publish_condition = publish.condition;
    let publish_result = publish_condition.clone();
    let mut published = publish.published;
    if d.spec.dns.provider == DnsProvider::Manual {
        // A person published them: what the servers serve is what is published.
        published = verified.clone();
        publish_condition.0 = verify_condition.0;
    }

    // Status.
    let old_conditions = d
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut conditions = old_conditions.clone();
    let t = Time(now);
    let set = |conds: &mut Vec<_>, ty: &str, c: &Cond| {
        set_condition(conds, ty, c.0, c.1, &c.2, generation, t.clone());
    };
    if !problems.is_empty() && publish_condition.0 == ConditionStatus::True {
        publish_condition = (
            ConditionStatus::False,
            "InvalidRecords",
            problems.join("; "),
        );
    }
    set(&mut conditions, CONDITION_DKIM_READY, &dkim_condition);
    set(&mut conditions, CONDITION_DNS_PUBLISHED, &publish_condition);
    set(&mut conditions, CONDITION_DNS_VERIFIED, &verify_condition);
    set(&mut conditions, CONDITION_SPF_VALID, &spf_condition);
    let all = [&dkim_condition, &publish_condition, &verify_condition];
    let ready = all.iter().all(|c| c.0 == ConditionStatus::True) && problems.is_empty();
    let ready_condition: Cond = if ready {
        (
            ConditionStatus::True,
            "Ready",
            format!("{} is ready to send", d.spec.domain),
        )
    } else {
        let why: Vec<String> = [
            (CONDITION_DKIM_READY, &dkim_condition),
            (CONDITION_DNS_PUBLISHED, &publish_condition),
            (CONDITION_DNS_VERIFIED, &verify_condition),
        ]
        .iter()
        .filter(|(_, c)| c.0 != ConditionStatus::True)
        .map(|(ty, c)| format!("{ty}: {}", c.2))
        .chain(problems.iter().cloned())
        .collect();
        (ConditionStatus::False, "NotReady", why.join("; "))
    };
    set(&mut conditions, CONDITION_READY, &ready_condition);
    set_reconciling(
        &mut conditions,
        ready,
        ready_condition.1,
        &ready_condition.2,
        generation,
        t.clone(),
    );

    let records: Vec<DnsRecordStatus> = desired
        .records
        .iter()
        .zip(published.iter().zip(&verified))
        .map(|(r, (p, v))| DnsRecordStatus {
            name: r.name.clone(),
            type_: r.record_type().to_string(),
            value: r.value(),
            published: *p,
            verified: *v,
        })
        .collect();
    let status = SendingDomainStatus {
        observed_generation: generation,
        conditions,
        active_selector: keys.secret.active.as_ref().map(|a| a.selector.clone()),
        next_selector: keys.secret.next.as_ref().map(|a| a.selector.clone()),
        retiring_selectors: keys.retiring.clone(),
        last_rotation: keys.last_rotation.clone(),
        records,
    };
    let doc = json!({
        "apiVersion": "mailfleet.dev/v1alpha1",
        "kind": "SendingDomain",
        "status": status,
    });
    let api: Api<SendingDomain> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&doc),
    )
    .await?;

    // Events for what changed, now that status says it.
    let mut notes = Vec::new();
    if let Some(changes) = publish.changes {
        notes.push(Note::normal("RecordsPublished", changes));
    } else if d.spec.dns.provider == DnsProvider::ExternalDns
        && became_true(&old_conditions, CONDITION_DNS_PUBLISHED, &publish_result)
    {
        notes.push(Note::normal("RecordsPublished", publish_result.2.clone()));
    }
    if publish_result.0 == ConditionStatus::False
        && changed(&old_conditions, CONDITION_DNS_PUBLISHED, &publish_result)
    {
        notes.push(Note::warning(
            "PublishFailed",
            format!("{}: {}", publish_result.1, publish_result.2),
        ));
    }
    if became_true(&old_conditions, CONDITION_DNS_VERIFIED, &verify_condition) {
        notes.push(Note::normal("DNSVerified", verify_condition.2.clone()));
    } else if verify_condition.0 != ConditionStatus::True
        && changed(&old_conditions, CONDITION_DNS_VERIFIED, &verify_condition)
    {
        notes.push(Note::warning(
            "DNSVerificationFailed",
            format!("{}: {}", verify_condition.1, verify_condition.2),
        ));
    }
    if spf_condition.0 == ConditionStatus::False
        && changed(&old_conditions, CONDITION_SPF_VALID, &spf_condition)
    {
        notes.push(Note::warning(
            "SPFInvalid",
            format!("{}: {}", spf_condition.1, spf_condition.2),
        ));
    }
    for note in &notes {
        ctx.event(d, note).await;
    }

    let dns_ok =
        publish_condition.0 == ConditionStatus::True && verify_condition.0 == ConditionStatus::True;
    // A person publishes manual records: look again at the resync, not in a hurry.
    let manual = d.spec.dns.provider == DnsProvider::Manual;
    let mut after = match ctx.backoff(&key_of(d), !dns_ok && !manual) {
        Some(b) => {
            tracing::info!(domain = %key_of(d), retry_in = ?b,
                published = %publish_condition.2, verified = %verify_condition.2, "DNS not in order yet");
            b
        }
        None => RESYNC,
    };
    if let Some(step) = keys.next_step {
        let wait = now.duration_until(step);
        let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
        after = after.min(wait.max(Duration::from_millis(200)));
    }
    Ok(Action::requeue(after))
}

fn error_policy(d: Arc<SendingDomain>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.count(
        "reconcile_errors_total",
        &[("controller", CONTROLLER), ("category", error.category())],
    );
    tracing::warn!(domain = %key_of(&d), error = %error, "reconcile failed; retrying");
    Action::requeue(
        ctx.backoff(&key_of(&d), true)
            .unwrap_or(Duration::from_secs(5)),
    )
}

/// Whether the domain uses the Secret `name` (keys or TSIG).
fn references(d: &SendingDomain, name: &str) -> bool {
    key_secret_name(d) == name
        || d.spec
            .dns
            .rfc2136
            .as_ref()
            .is_some_and(|r| r.tsig_secret_ref.name == name)
}

/// Runs the controller in one namespace (or all, with `None`) until `shutdown` fires. It
/// watches RelayPools too, so that a pool's new addresses reach SPF.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    fn api<K>(client: &kube::Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let client = &ctx.client;
    let ns = namespace.as_deref();
    let controller = Controller::new(api::<SendingDomain>(client, ns), watcher::Config::default())
        .with_config(
            kube::runtime::controller::Config::default().concurrency(crate::RECONCILE_CONCURRENCY),
        );
    let store = controller.store();
    let by_secret = store.clone();
    controller
        // Key Secrets we generate, and Secrets a domain references (a fixed TSIG secret or
        // new keys take effect at once, not at the next retry).
        .watches(
            api::<Secret>(client, ns),
            watcher::Config::default(),
            move |secret| {
                let secret_ns = secret.namespace();
                let name = secret.name_any();
                by_secret
                    .state()
                    .into_iter()
                    .filter(|d| d.namespace() == secret_ns && references(d, &name))
                    .map(|d| ObjectRef::from_obj(&*d))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            api::<RelayPool>(client, ns),
            watcher::Config::default(),
            move |pool| {
                let pool_ns = pool.namespace();
                let name = pool.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|d| d.namespace() == pool_ns && d.spec.relay_pool_ref.name == name)
                    .map(|d| ObjectRef::from_obj(&*d))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
