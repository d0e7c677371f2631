//! The RelayPool controller: the relays' StatefulSet and Services, their identity, the egress
//! address table in status, and each relay's configuration published to the coordinator.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mailfleet_api::common::{ConditionStatus, parse_duration, set_condition, set_reconciling};
use mailfleet_api::relaypool::{
    AddressState, AddressStatus, CONDITION_EGRESS_ASSIGNED, CONDITION_PROGRESSING, CONDITION_READY,
    RelayPool, RelayPoolStatus,
};
use mailfleet_api::sendingdomain::{DkimAlgorithm, SendingDomain};
use mailfleet_api::warmupplan::WarmupPlan;
use mailfleet_proto::v1 as pb;
use serde_json::{Value, json};

use crate::children::{self, POOL_LABEL, Settings};
use crate::coordinator::{Fleet, PoolKey};
use crate::egress::{self, EgressAddr, Placement, PodFacts};
use crate::metrics::Metrics;
use crate::pki::{self, CertificateAuthority};
use crate::warmup;

/// Field manager of everything the controller applies.
pub const MANAGER: &str = "mailfleet-operator";
/// Finalizer: removes what ownerReferences cannot (cluster-scoped Cilium policies) and the
/// pool's coordinator state.
pub const FINALIZER: &str = "mailfleet.dev/relaypool";
const CONTROLLER: &str = "relaypool";

/// Errors of one reconcile, by category (the category labels the error metric).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("invalid egress configuration: {0}")]
    Egress(#[from] egress::EgressError),
    #[error("cannot issue the relay identity: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("the system random generator failed")]
    Random,
}

impl ReconcileError {
    fn category(&self) -> &'static str {
        match self {
            ReconcileError::Api(_) => "api",
            ReconcileError::Egress(_) => "spec",
            ReconcileError::Pki(_) => "pki",
            ReconcileError::Finalizer(_) => "finalizer",
            ReconcileError::Random => "internal",
        }
    }
}

/// What every reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub settings: Settings,
    pub ca: Arc<CertificateAuthority>,
    pub fleet: Arc<Fleet>,
    pub metrics: Arc<Metrics>,
    /// Publishes Events on the custom resources (`kubectl describe` shows them).
    pub recorder: Recorder,
}

impl Context {
    /// Publishes an Event about `obj`; failures are logged, never fatal.
    pub async fn event<K>(&self, obj: &K, type_: EventType, reason: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::debug!(error = %e, reason, "cannot publish an event");
        }
    }
}

fn key_of(pool: &RelayPool) -> PoolKey {
    PoolKey {
        namespace: pool.namespace().unwrap_or_default(),
        name: pool.name_any(),
    }
}

fn cilium_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cilium.io", "v2", "CiliumEgressGatewayPolicy"),
        "ciliumegressgatewaypolicies",
    )
}

async fn apply<K>(api: &Api<K>, name: &str, doc: &Value) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(doc),
    )
    .await
    .map(|_| ())
}

/// Makes sure the pool's identity Secret holds a certificate of the current CA, and lets the
/// coordinator know its fingerprint.
async fn ensure_identity(pool: &RelayPool, ctx: &Context) -> Result<(), ReconcileError> {
    let ns = pool.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = children::identity_secret_name(pool);
    let text = |s: &Secret, k: &str| -> Option<String> {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let existing = secrets.get_opt(&name).await?;
    let current = existing.as_ref().and_then(|s| {
        let ca = text(s, mailfleet_proto::identity::CA_KEY)?;
        let cert = text(s, mailfleet_proto::identity::CERT_KEY)?;
        (ca == ctx.ca.cert_pem()).then_some(cert)
    });
    let cert = match current {
        Some(cert) => cert,
        None => {
            let issued = ctx.ca.issue_pool_client(&ns, &pool.name_any())?;
            let doc = children::identity_secret(
                pool,
                ctx.ca.cert_pem(),
                &issued.cert_pem,
                &issued.key_pem,
            );
            apply(&secrets, &name, &doc).await?;
            tracing::info!(pool = %key_of(pool), "issued the relays' coordinator certificate");
            ctx.event(
                pool,
                EventType::Normal,
                "IdentityIssued",
                format!("issued the relays' coordinator certificate into Secret {name}"),
            )
            .await;
            issued.cert_pem
        }
    };
    ctx.fleet
        .set_identity(pki::fingerprint_pem(&cert)?, key_of(pool));
    Ok(())
}

/// The pool's feedback token (created once, kept across reconciles and operator restarts);
/// returns its SHA-256 in hex, which is all the relays get.
async fn ensure_feedback_token(pool: &RelayPool, ctx: &Context) -> Result<String, ReconcileError> {
    let ns = pool.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = children::feedback_secret_name(pool);
    let existing = secrets
        .get_opt(&name)
        .await?
        .and_then(|s| secret_text(&s, children::FEEDBACK_TOKEN_KEY))
        .filter(|t| !t.is_empty());
    let token = match existing {
        Some(t) => t,
        None => {
            let mut raw = [0u8; 32];
            aws_lc_rs::rand::fill(&mut raw).map_err(|_| ReconcileError::Random)?;
            let token =
                base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw);
            apply(&secrets, &name, &children::feedback_secret(pool, &token)).await?;
            ctx.event(
                pool,
                EventType::Normal,
                "FeedbackTokenIssued",
                format!("issued the feedback endpoint's bearer token into Secret {name}"),
            )
            .await;
            token
        }
    };
    Ok(token_hash(&token))
}

/// Lowercase hex SHA-256 of a bearer token.
pub fn token_hash(token: &str) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn ordinal_of(pod: &str, pool: &str) -> Option<u32> {
    pod.strip_prefix(pool)?.strip_prefix('-')?.parse().ok()
}

/// The placement recorded in status (what survives operator restarts).
fn previous_placement(pool: &RelayPool) -> BTreeMap<IpAddr, Placement> {
    let name = pool.name_any();
    let mut out = BTreeMap::new();
    for a in pool.status.iter().flat_map(|s| s.addresses.iter()) {
        let Ok(ip) = a.address.parse::<IpAddr>() else {
            continue;
        };
        let ordinal = a.pod.as_deref().and_then(|p| ordinal_of(p, &name));
        let placement = match (ordinal, a.state) {
            (Some(o), AddressState::Draining) => Placement::Draining { from: o, to: None },
            (Some(o), _) => Placement::Assigned(o),
            (None, _) => Placement::Unassigned,
        };
        out.insert(ip, placement);
    }
    out
}

fn proto_state(s: AddressState) -> i32 {
    (match s {
        AddressState::Warming => pb::AddressState::Warming,
        AddressState::Warm => pb::AddressState::Warm,
        AddressState::Held => pb::AddressState::Held,
        AddressState::Paused => pb::AddressState::Paused,
        AddressState::Quarantined => pb::AddressState::Quarantined,
        AddressState::Draining => pb::AddressState::Draining,
        AddressState::Unassigned => pb::AddressState::Unspecified,
    }) as i32
}

fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|ByteString(b)| String::from_utf8_lossy(b).trim().to_string())
}

fn pem_to_pkcs8_der(pem: &str) -> Option<Vec<u8>> {
    match rustls_pemfile::private_key(&mut pem.as_bytes()) {
        Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(k))) => Some(k.secret_pkcs8_der().to_vec()),
        _ => None,
    }
}

/// The sending domains of the pool as the relays need them: domain, dedicated addresses and
/// the DKIM keys to sign with (from the domain's key Secret: `selector`, `rsa.pem`,
/// `ed25519.pem`).
async fn sending_domains(
    pool: &RelayPool,
    client: &kube::Client,
) -> Result<Vec<pb::SendingDomain>, kube::Error> {
    let ns = pool.namespace().unwrap_or_default();
    let domains: Api<SendingDomain> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut out = Vec::new();
    let mut list = domains.list(&ListParams::default()).await?.items;
    list.sort_by_key(|d| d.spec.domain.clone());
    for d in list {
        if d.spec.relay_pool_ref.name != pool.name_any() || d.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let secret_name = d
            .spec
            .dkim
            .key_secret_ref
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_else(|| format!("{}-dkim", d.name_any()));
        let mut keys = Vec::new();
        if let Some(secret) = secrets.get_opt(&secret_name).await? {
            let selector = secret_text(&secret, "selector")
                .or_else(|| d.status.as_ref().and_then(|s| s.active_selector.clone()));
            if let Some(selector) = selector {
                let wanted: &[(&str, pb::DkimAlgorithm, &str)] = match d.spec.dkim.algorithm {
                    DkimAlgorithm::Rsa2048 => &[("rsa.pem", pb::DkimAlgorithm::RsaSha256, "")],
                    DkimAlgorithm::Ed25519 => {
                        &[("ed25519.pem", pb::DkimAlgorithm::Ed25519Sha256, "")]
                    }
                    DkimAlgorithm::Dual => &[
                        ("rsa.pem", pb::DkimAlgorithm::RsaSha256, ""),
                        ("ed25519.pem", pb::DkimAlgorithm::Ed25519Sha256, "-ed"),
                    ],
                };
                for (key, algorithm, suffix) in wanted {
                    if let Some(der) = secret_text(&secret, key).and_then(|p| pem_to_pkcs8_der(&p))
                    {
                        keys.push(pb::DkimKey {
                            selector: format!("{selector}{suffix}"),
                            algorithm: *algorithm as i32,
                            private_key: der,
                        });
                    }
                }
            }
        }
        out.push(pb::SendingDomain {
            domain: d.spec.domain.clone(),
            addresses: d.spec.addresses.clone().unwrap_or_default(),
            signing_keys: keys,
            return_path_domain: format!("{}.{}", d.spec.spf.return_path_label, d.spec.domain),
            suppressed_recipients: crate::suppression::recipients(client, &ns, &d.name_any())
                .await?,
        });
    }
    Ok(out)
}

/// SMTP AUTH users from the listener's users Secret (user name → password).
async fn users(
    pool: &RelayPool,
    client: &kube::Client,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let Some(auth) = &pool.spec.listener.auth else {
        return Ok(BTreeMap::new());
    };
    let ns = pool.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    Ok(secrets
        .get_opt(&auth.users_secret_ref.name)
        .await?
        .and_then(|s| s.data)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, ByteString(v))| (k, String::from_utf8_lossy(&v).trim().to_string()))
        .collect())
}

fn secs(text: &str) -> u64 {
    parse_duration(text).map(|d| d.as_secs()).unwrap_or(0)
}

/// Everything of a relay's configuration except its own addresses.
fn base_config(
    pool: &RelayPool,
    domains: Vec<pb::SendingDomain>,
    users: BTreeMap<String, String>,
    feedback_token_sha256: String,
) -> pb::RelayConfig {
    let d = &pool.spec.delivery;
    let l = &pool.spec.listener;
    pb::RelayConfig {
        version: 0,
        addresses: Vec::new(),
        domains,
        quotas: Vec::new(),
        shaping: Some(pb::Shaping {
            max_connections_per_address: u32::try_from(d.max_connections_per_address).unwrap_or(0),
            providers: d
                .providers
                .iter()
                .map(|p| pb::ProviderShaping {
                    provider_group: p.group.as_str().to_string(),
                    max_connections: p
                        .max_connections
                        .map_or(0, |v| u32::try_from(v).unwrap_or(0)),
                    max_messages_per_minute: p
                        .max_messages_per_minute
                        .map_or(0, |v| u32::try_from(v).unwrap_or(0)),
                    max_messages_per_connection: p
                        .max_messages_per_connection
                        .map_or(0, |v| u32::try_from(v).unwrap_or(0)),
                })
                .collect(),
        }),
        delivery: Some(pb::Delivery {
            retry_schedule_seconds: d.retry_schedule.iter().map(|s| secs(s)).collect(),
            max_queue_lifetime_seconds: secs(&d.max_queue_lifetime),
            dsn: d.dsn,
            destination_port: d
                .destination_port
                .map_or(0, |p| u32::try_from(p).unwrap_or(0)),
            nameservers: d.nameservers.clone(),
        }),
        listener: Some(pb::Listener {
            allowed_networks: l.allowed_networks.clone(),
            max_message_bytes: u64::try_from(l.max_message_bytes).unwrap_or(0),
            max_recipients: u32::try_from(l.max_recipients).unwrap_or(0),
            max_sessions: u32::try_from(l.max_sessions).unwrap_or(0),
            users: users.into_iter().collect(),
            feedback_token_sha256,
        }),
    }
}

#[tracing::instrument(name = "reconcile", skip_all, fields(controller = CONTROLLER, pool = %key_of(&pool)))]
async fn reconcile(pool: Arc<RelayPool>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<RelayPool> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            Finalizer::Apply(pool) => apply_pool(&pool, &ctx).await,
            Finalizer::Cleanup(pool) => cleanup(&pool, &ctx).await,
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

async fn cleanup(pool: &RelayPool, ctx: &Context) -> Result<Action, ReconcileError> {
    let policies: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &cilium_resource());
    let selector = format!(
        "{POOL_LABEL}={},mailfleet.dev/namespace={}",
        pool.name_any(),
        pool.namespace().unwrap_or_default()
    );
    match policies
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(list) => {
            for p in list.items {
                let _ = policies
                    .delete(&p.name_any(), &DeleteParams::default())
                    .await;
            }
        }
        // No Cilium on this cluster: nothing to remove.
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.fleet.remove_pool(&key_of(pool));
    tracing::info!(pool = %key_of(pool), "relay pool deleted; its relays stop with their StatefulSet");
    Ok(Action::await_change())
}

async fn apply_pool(pool: &RelayPool, ctx: &Context) -> Result<Action, ReconcileError> {
    let ns = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let client = &ctx.client;
    ensure_identity(pool, ctx).await?;

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    apply(&services, &name, &children::smtp_service(pool)).await?;
    apply(
        &services,
        &children::headless_service_name(pool),
        &children::headless_service(pool),
    )
    .await?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    apply(&pdbs, &name, &children::pod_disruption_budget(pool)).await?;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let sts_doc = children::statefulset(pool, &ctx.settings);
    apply(&sets, &name, &sts_doc).await?;
    let sts = sets.get_opt(&name).await?;

    // Which relay pods exist, and which are ready.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_list = pods
        .list(&ListParams::default().labels(&format!("{POOL_LABEL}={name}")))
        .await?
        .items;
    let mut facts = PodFacts {
        released: ctx.fleet.released(&key_of(pool)).await,
        ..PodFacts::default()
    };
    for p in &pod_list {
        if let Some(o) = ordinal_of(&p.name_any(), &name) {
            facts.live.insert(o);
        }
    }

    // Egress allocation, from what status recorded.
    let addresses = egress::expand(&pool.spec.egress)?;
    let replicas = u32::try_from(pool.spec.replicas).unwrap_or(0);
    let placement = egress::allocate(
        &addresses,
        &previous_placement(pool),
        replicas,
        pool.spec.egress.mode,
        &facts,
    );
    let old_rows: BTreeMap<String, AddressStatus> = pool
        .status
        .iter()
        .flat_map(|s| s.addresses.iter())
        .map(|a| (a.address.clone(), a.clone()))
        .collect();
    let plan = match &pool.spec.warmup_plan_ref {
        Some(r) => {
            Api::<WarmupPlan>::namespaced(client.clone(), &ns)
                .get_opt(&r.name)
                .await?
        }
        None => None,
    };
    let now_ts = k8s_openapi::jiff::Timestamp::now();
    let now = Time(now_ts);
    let mut rows = Vec::new();
    let mut events = Vec::new();
    for EgressAddr { ip, helo_name } in &addresses {
        let key = ip.to_string();
        let old = old_rows.get(&key);
        let p = placement.get(ip).copied().unwrap_or(Placement::Unassigned);
        let (warm_state, warm_reason) = warmup::address_state(pool, plan.as_ref(), &key);
        let (pod, state) = match p {
            Placement::Assigned(o) => (Some(format!("{name}-{o}")), warm_state),
            Placement::Draining { from, .. } => {
                (Some(format!("{name}-{from}")), AddressState::Draining)
            }
            Placement::Unassigned => (None, AddressState::Unassigned),
        };
        let changed = old.is_none_or(|o| o.state != state || o.pod != pod);
        if changed && old.is_none_or(|o| o.pod != pod || state == AddressState::Draining) {
            let (type_, reason, note) = match (&pod, state) {
                (Some(p), AddressState::Draining) => (
                    EventType::Normal,
                    "AddressDraining",
                    format!("{key} drains on {p} before it moves"),
                ),
                (Some(p), _) => (
                    EventType::Normal,
                    "AddressAssigned",
                    format!("{key} now sends from {p} (HELO {helo_name})"),
                ),
                (None, _) => (
                    EventType::Warning,
                    "AddressUnassigned",
                    format!("{key} has no relay pod to send from"),
                ),
            };
            events.push((type_, reason, note));
        }
        rows.push(AddressStatus {
            address: key,
            pod,
            helo_name: helo_name.clone(),
            state,
            reason: match state {
                AddressState::Draining | AddressState::Unassigned => None,
                _ => warm_reason,
            },
            since: if changed {
                Some(now.clone())
            } else {
                old.and_then(|o| o.since.clone())
            },
        });
    }

    for (type_, reason, note) in events {
        ctx.event(pool, type_, reason, note).await;
    }

    // Cilium mode: one policy per pod that holds an address.
    if pool.spec.egress.mode == mailfleet_api::relaypool::EgressMode::CiliumEgressGateway {
        let policies: Api<DynamicObject> = Api::all_with(client.clone(), &cilium_resource());
        let mut wanted = BTreeSet::new();
        for row in &rows {
            let Some(o) = row.pod.as_deref().and_then(|p| ordinal_of(p, &name)) else {
                continue;
            };
            if let Some(doc) = children::cilium_policy(pool, o, &row.address) {
                let pname = children::cilium_policy_name(pool, o);
                policies
                    .patch(
                        &pname,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(&doc),
                    )
                    .await?;
                wanted.insert(pname);
            }
        }
        // Policies of pods that hold no address any more.
        let selector = format!("{POOL_LABEL}={name},mailfleet.dev/namespace={ns}");
        for p in policies
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
        {
            if !wanted.contains(&p.name_any()) {
                policies
                    .delete(&p.name_any(), &DeleteParams::default())
                    .await?;
            }
        }
    }

    // Each pod's configuration, to the coordinator.
    let base = base_config(
        pool,
        sending_domains(pool, client).await?,
        users(pool, client).await?,
        ensure_feedback_token(pool, ctx).await?,
    );
    let mut configs = BTreeMap::new();
    for o in facts
        .live
        .iter()
        .copied()
        .chain(0..replicas)
        .collect::<BTreeSet<u32>>()
    {
        let pod = format!("{name}-{o}");
        let mut c = base.clone();
        let mine: Vec<&AddressStatus> = rows
            .iter()
            .filter(|r| r.pod.as_deref() == Some(pod.as_str()))
            .collect();
        c.addresses = mine
            .iter()
            .map(|r| pb::EgressAddress {
                address: r.address.clone(),
                helo_name: r.helo_name.clone(),
                state: proto_state(r.state),
            })
            .collect();
        c.quotas = mine
            .iter()
            .flat_map(|r| warmup::quotas(pool, plan.as_ref(), &r.address, now_ts))
            .collect();
        configs.insert(pod, c);
    }
    ctx.fleet.publish(&key_of(pool), configs);

    // Status.
    let ready_pods = pod_list
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    let ready = i32::try_from(ready_pods).unwrap_or(0);
    let sts_status = sts.and_then(|s| s.status);
    let updated = sts_status
        .as_ref()
        .and_then(|s| s.updated_replicas)
        .unwrap_or(0);
    let existing = i32::try_from(pod_list.len()).unwrap_or(0);
    let generation = pool.metadata.generation;
    let mut conditions = pool
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let unassigned = rows
        .iter()
        .filter(|r| r.state == AddressState::Unassigned)
        .count();
    let draining = rows
        .iter()
        .filter(|r| r.state == AddressState::Draining)
        .count();
    let (status, reason, message) = if draining > 0 {
        (
            ConditionStatus::False,
            "Draining",
            format!("{draining} address(es) wait for their pod to release them before they move"),
        )
    } else if unassigned > 0 && replicas > 0 {
        (
            ConditionStatus::False,
            "AddressesUnassigned",
            format!("{unassigned} address(es) have no pod to send from"),
        )
    } else if replicas == 0 {
        (
            ConditionStatus::False,
            "ScaledToZero",
            "the pool has no relay pods".to_string(),
        )
    } else {
        (
            ConditionStatus::True,
            "Assigned",
            format!("{} address(es) over {replicas} relay(s)", rows.len()),
        )
    };
    set_condition(
        &mut conditions,
        CONDITION_EGRESS_ASSIGNED,
        status,
        reason,
        &message,
        generation,
        now.clone(),
    );
    let all_ready = ready == pool.spec.replicas && existing == pool.spec.replicas;
    let (status, reason, message) = if pool.spec.replicas == 0 {
        (
            ConditionStatus::False,
            "ScaledToZero",
            "the pool has no relay pods".to_string(),
        )
    } else if all_ready {
        (
            ConditionStatus::True,
            "RelaysReady",
            format!("{ready}/{} relays ready", pool.spec.replicas),
        )
    } else {
        (
            ConditionStatus::False,
            "RelaysNotReady",
            format!("{ready}/{} relays ready", pool.spec.replicas),
        )
    };
    set_condition(
        &mut conditions,
        CONDITION_READY,
        status,
        reason,
        &message,
        generation,
        now.clone(),
    );
    let progressing = !all_ready || updated != pool.spec.replicas || draining > 0;
    set_condition(
        &mut conditions,
        CONDITION_PROGRESSING,
        if progressing {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        if progressing { "RollingOut" } else { "Stable" },
        if progressing {
            "relays or addresses are changing"
        } else {
            "relays and addresses are settled"
        },
        generation,
        now.clone(),
    );
    let (why, what) = if all_ready {
        ("RollingOut", "relays or addresses are changing")
    } else {
        (reason, message.as_str())
    };
    set_reconciling(&mut conditions, !progressing, why, what, generation, now);
    let count = |s: &[AddressState]| {
        i32::try_from(rows.iter().filter(|r| s.contains(&r.state)).count()).unwrap_or(0)
    };
    let status = RelayPoolStatus {
        observed_generation: generation,
        replicas: existing,
        ready_replicas: ready,
        address_count: i32::try_from(rows.len()).unwrap_or(0),
        warming: count(&[AddressState::Warming]),
        warm: count(&[AddressState::Warm]),
        held: count(&[
            AddressState::Held,
            AddressState::Paused,
            AddressState::Quarantined,
        ]),
        conditions,
        addresses: rows,
        relays: Vec::new(),
        counters: Vec::new(),
    };
    let doc = json!({
        "apiVersion": "mailfleet.dev/v1alpha1",
        "kind": "RelayPool",
        "status": status,
    });
    let pools: Api<RelayPool> = Api::namespaced(client.clone(), &ns);
    pools
        .patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&doc),
        )
        .await?;
    // Readiness and draining settle without events on the pool: look again soon while moving.
    Ok(if progressing {
        Action::requeue(Duration::from_secs(2))
    } else {
        Action::requeue(Duration::from_secs(60))
    })
}

fn error_policy(pool: Arc<RelayPool>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.count(
        "reconcile_errors_total",
        &[("controller", CONTROLLER), ("category", error.category())],
    );
    tracing::warn!(pool = %key_of(&pool), error = %error, "reconcile failed; retrying");
    let note = format!("{error}; retrying in 5s");
    tokio::spawn(async move {
        ctx.event(&*pool, EventType::Warning, "ReconcileFailed", note)
            .await;
    });
    Action::requeue(Duration::from_secs(5))
}

fn pool_of_labels(obj: &impl Resource) -> Option<ObjectRef<RelayPool>> {
    let name = obj.meta().labels.as_ref()?.get(POOL_LABEL)?;
    Some(ObjectRef::new(name).within(obj.meta().namespace.as_deref()?))
}

/// Runs the controller in one namespace (or all, with `None`) until `shutdown` fires.
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
    let labelled = watcher::Config::default().labels(POOL_LABEL);
    // Relay reports change the pool's status every few seconds; debouncing folds the
    // triggers they cause (and bursts of child events) into one reconcile.
    Controller::new(api::<RelayPool>(client, ns), watcher::Config::default())
        .with_config(
            kube::runtime::controller::Config::default()
                .debounce(Duration::from_millis(500))
                .concurrency(crate::RECONCILE_CONCURRENCY),
        )
        .owns(api::<StatefulSet>(client, ns), labelled.clone())
        .owns(api::<Secret>(client, ns), labelled.clone())
        .watches(api::<Pod>(client, ns), labelled.clone(), |pod| {
            pool_of_labels(&pod)
        })
        // Suppression lists of the pool's sending domains.
        .watches(api::<ConfigMap>(client, ns), labelled, |cm| {
            pool_of_labels(&cm)
        })
        .watches(
            api::<SendingDomain>(client, ns),
            watcher::Config::default(),
            |d| {
                Some(
                    ObjectRef::new(&d.spec.relay_pool_ref.name)
                        .within(d.metadata.namespace.as_deref()?),
                )
            },
        )
        .watches(
            api::<WarmupPlan>(client, ns),
            watcher::Config::default(),
            |plan| {
                let ns = plan.metadata.namespace.clone().unwrap_or_default();
                plan.status
                    .iter()
                    .flat_map(|s| s.addresses.iter().map(|a| a.pool.clone()))
                    .collect::<BTreeSet<String>>()
                    .into_iter()
                    .map(move |p| ObjectRef::new(&p).within(&ns))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
