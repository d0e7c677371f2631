//! The coordinator: the gRPC service relays register with, receive their configuration from
//! and report delivery counters to (proto/mailfleet/v1/coordinator.proto, docs/coordinator.md).
//!
//! [`Fleet`] is the state shared with the RelayPool controller: the controller publishes each
//! pod's configuration snapshot into it; the coordinator streams those snapshots, applies reports
//! exactly once (the applied sequence is written to the pool's status together with the totals,
//! before the acknowledgement) and tells the controller which draining addresses were released.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::Stream;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use mailfleet_api::relaypool::{AddressCounters, RelayConnection, RelayPool};
use mailfleet_proto::v1::coordinator_server::Coordinator;
use mailfleet_proto::v1::{
    AddressState, EgressAddress, Outcome, RegisterRequest, RegisterResponse, RelayConfig,
    ReportAck, ReportRequest, WatchConfigRequest,
};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

use crate::children::POOL_LABEL;
use crate::metrics::Metrics;

/// Field manager of the coordinator's part of RelayPool status (`relays`, `counters`).
pub const STATUS_MANAGER: &str = "mailfleet-coordinator";

/// A pool: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Configuration state of one pool, written by the controller.
#[derive(Debug, Default)]
struct ConfigState {
    /// Per pod: the snapshot channel (created by whichever side comes first).
    pods: BTreeMap<String, watch::Sender<Option<Arc<RelayConfig>>>>,
    /// Last version handed out in this pool.
    version: u64,
    /// Per pod and address: the snapshot version from which the pod may no longer use it.
    drain_versions: BTreeMap<(String, IpAddr), u64>,
}

/// Report state of one pool: what is in its status, as far as the coordinator writes it.
#[derive(Debug, Default)]
struct ReportState {
    seeded: bool,
    relays: BTreeMap<String, RelayConnection>,
    counters: BTreeMap<String, AddressCounters>,
    /// Bumped by every applied report; what has been written is in `PoolEntry::flushed`.
    generation: u64,
    /// Per pod: the generation that holds its applied sequence (absent: read from status).
    pod_generation: BTreeMap<String, u64>,
    /// A flush task runs for this pool.
    flushing: bool,
    /// Recipients to add to suppression lists with the next write.
    suppressions: Vec<crate::suppression::Pending>,
}

/// How long reports gather before one status write carries them all.
const FLUSH_DELAY: Duration = Duration::from_millis(300);
/// How long a relay waits for its report to be written before it is told to retry.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct PoolEntry {
    config: Mutex<ConfigState>,
    reports: tokio::sync::Mutex<ReportState>,
    /// The report generation last written to the pool's status.
    flushed: watch::Sender<u64>,
}

impl Default for PoolEntry {
    fn default() -> Self {
        PoolEntry {
            config: Mutex::default(),
            reports: tokio::sync::Mutex::default(),
            flushed: watch::channel(0).0,
        }
    }
}

/// State shared by the controller and the coordinator service.
pub struct Fleet {
    client: kube::Client,
    pools: Mutex<HashMap<PoolKey, Arc<PoolEntry>>>,
    /// Client certificate fingerprints → the pool they were issued for.
    identities: RwLock<HashMap<[u8; 32], PoolKey>>,
    /// Pods already checked against the API (namespace, name, uid).
    known_pods: Mutex<BTreeSet<(String, String, String)>>,
    metrics: Arc<Metrics>,
}

/// A newer version than `previous`, monotonic across operator restarts as long as the clock
/// does not go back: milliseconds since the epoch, or previous + 1.
fn next_version(previous: u64) -> u64 {
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    now.max(previous + 1)
}

fn usable(state: i32) -> bool {
    matches!(
        AddressState::try_from(state),
        Ok(AddressState::Warming | AddressState::Warm | AddressState::Held)
    )
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl Fleet {
    pub fn new(client: kube::Client, metrics: Arc<Metrics>) -> Arc<Fleet> {
        Arc::new(Fleet {
            client,
            pools: Mutex::new(HashMap::new()),
            identities: RwLock::new(HashMap::new()),
            known_pods: Mutex::new(BTreeSet::new()),
            metrics,
        })
    }

    fn entry(&self, key: &PoolKey) -> Arc<PoolEntry> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(pools.entry(key.clone()).or_default())
    }

    /// Records the client certificate issued for a pool.
    pub fn set_identity(&self, fingerprint: [u8; 32], pool: PoolKey) {
        let mut ids = self.identities.write().unwrap_or_else(|e| e.into_inner());
        ids.retain(|_, p| *p != pool);
        ids.insert(fingerprint, pool);
    }

    /// Learns the pool certificates already issued (in identity Secrets of the current CA), so
    /// that relays are known at once after an operator restart, before any reconcile.
    pub async fn prime(
        &self,
        ca_pem: &str,
        namespaces: &[Option<String>],
    ) -> Result<usize, kube::Error> {
        let mut n = 0;
        for ns in namespaces {
            let api: Api<k8s_openapi::api::core::v1::Secret> = match ns {
                Some(ns) => Api::namespaced(self.client.clone(), ns),
                None => Api::all(self.client.clone()),
            };
            let list = api
                .list(&kube::api::ListParams::default().labels(POOL_LABEL))
                .await?;
            for secret in list.items {
                let get = |k: &str| {
                    secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(k))
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                };
                let pool = secret
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(POOL_LABEL))
                    .cloned();
                let (Some(pool), Some(namespace), Some(ca), Some(cert)) = (
                    pool,
                    secret.metadata.namespace.clone(),
                    get(mailfleet_proto::identity::CA_KEY),
                    get(mailfleet_proto::identity::CERT_KEY),
                ) else {
                    continue;
                };
                let expected = format!("{pool}{}", mailfleet_proto::identity::SECRET_SUFFIX);
                if secret.metadata.name.as_deref() != Some(expected.as_str()) || ca != ca_pem {
                    continue;
                }
                if let Ok(fp) = crate::pki::fingerprint_pem(&cert) {
                    self.set_identity(
                        fp,
                        PoolKey {
                            namespace,
                            name: pool,
                        },
                    );
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Forgets a deleted pool: its certificate is no longer accepted, its streams end.
    pub fn remove_pool(&self, pool: &PoolKey) {
        self.identities
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, p| p != pool);
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pool);
    }

    /// Ends every config stream (operator shutdown).
    pub fn close_all(&self) {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Publishes the configuration of every pod of a pool (pods not listed get an empty
    /// address list). A pod's snapshot gets a new version only when its content changed.
    pub fn publish(&self, pool: &PoolKey, configs: BTreeMap<String, RelayConfig>) {
        let entry = self.entry(pool);
        let mut state = entry.config.lock().unwrap_or_else(|e| e.into_inner());
        let names: BTreeSet<String> = configs.keys().cloned().collect();
        for (pod, mut config) in configs {
            let sender = state
                .pods
                .entry(pod.clone())
                .or_insert_with(|| watch::channel(None).0)
                .clone();
            let current = sender.borrow().clone();
            let unchanged = current.as_ref().is_some_and(|c| {
                let mut c = (**c).clone();
                c.version = 0;
                config.version = 0;
                c == config
            });
            if unchanged {
                continue;
            }
            let version = next_version(state.version);
            state.version = version;
            config.version = version;
            // Addresses this pod used before and may not use any more: remember from which
            // version on, so a report confirming it releases them.
            if let Some(old) = &current {
                for a in old.addresses.iter().filter(|a| usable(a.state)) {
                    let still = config
                        .addresses
                        .iter()
                        .any(|n| n.address == a.address && usable(n.state));
                    if !still && let Ok(ip) = a.address.parse::<IpAddr>() {
                        state
                            .drain_versions
                            .entry((pod.clone(), ip))
                            .or_insert(version);
                    }
                }
            }
            for a in config.addresses.iter().filter(|a| usable(a.state)) {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    state.drain_versions.remove(&(pod.clone(), ip));
                }
            }
            sender.send_replace(Some(Arc::new(config)));
        }
        state.pods.retain(|pod, _| names.contains(pod));
        state
            .drain_versions
            .retain(|(pod, _), _| names.contains(pod));
    }

    /// Addresses of a pool whose holder confirmed (by the applied config version of a report)
    /// that it no longer uses them.
    pub async fn released(&self, pool: &PoolKey) -> BTreeSet<IpAddr> {
        let entry = self.entry(pool);
        let drains: Vec<((String, IpAddr), u64)> = {
            let state = entry.config.lock().unwrap_or_else(|e| e.into_inner());
            state
                .drain_versions
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        };
        let reports = entry.reports.lock().await;
        drains
            .into_iter()
            .filter(|((pod, _), version)| {
                reports
                    .relays
                    .get(pod)
                    .is_some_and(|r| u64::try_from(r.config_version).unwrap_or(0) >= *version)
            })
            .map(|((_, ip), _)| ip)
            .collect()
    }

    /// Number of relays connected to a config stream right now.
    pub fn connected_relays(&self) -> usize {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .values()
            .map(|p| {
                let s = p.config.lock().unwrap_or_else(|e| e.into_inner());
                s.pods.values().map(|t| t.receiver_count()).sum::<usize>()
            })
            .sum()
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<PoolKey, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let first = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let fingerprint = crate::pki::fingerprint_der(first.as_ref());
        self.identities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fingerprint)
            .cloned()
            .ok_or_else(|| {
                Status::unauthenticated(
                    "the client certificate is not one the operator issued to a RelayPool",
                )
            })
    }

    /// Checks that `namespace/pod` is a live relay pod of `pool`.
    async fn authorize(
        &self,
        pool: &PoolKey,
        namespace: &str,
        pod: &str,
        uid: &str,
    ) -> Result<(), Status> {
        if namespace != pool.namespace {
            return Err(Status::permission_denied(format!(
                "the certificate of pool {pool} is not valid for namespace {namespace:?}"
            )));
        }
        let key = (namespace.to_string(), pod.to_string(), uid.to_string());
        if self
            .known_pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
        {
            return Ok(());
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let found = pods
            .get_opt(pod)
            .await
            .map_err(|e| Status::unavailable(format!("cannot check the pod: {e}")))?
            .ok_or_else(|| {
                Status::permission_denied(format!("pod {namespace}/{pod} does not exist"))
            })?;
        let label = found
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(POOL_LABEL))
            .cloned()
            .unwrap_or_default();
        if label != pool.name {
            return Err(Status::permission_denied(format!(
                "pod {namespace}/{pod} is not a relay of pool {pool}"
            )));
        }
        if !uid.is_empty() && found.metadata.uid.as_deref() != Some(uid) {
            return Err(Status::permission_denied(format!(
                "pod {namespace}/{pod} has another UID than the caller claims"
            )));
        }
        self.known_pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
        Ok(())
    }

    /// Loads the pool's report state from its status, once.
    async fn seed(&self, pool: &PoolKey, state: &mut ReportState) -> Result<(), Status> {
        if state.seeded {
            return Ok(());
        }
        let api: Api<RelayPool> = Api::namespaced(self.client.clone(), &pool.namespace);
        let found = api
            .get_opt(&pool.name)
            .await
            .map_err(|e| Status::unavailable(format!("cannot read RelayPool {pool}: {e}")))?
            .ok_or_else(|| Status::not_found(format!("RelayPool {pool} does not exist")))?;
        if let Some(status) = found.status {
            state.relays = status
                .relays
                .into_iter()
                .map(|r| (r.pod.clone(), r))
                .collect();
            state.counters = status
                .counters
                .into_iter()
                .map(|c| (c.address.clone(), c))
                .collect();
        }
        state.seeded = true;
        Ok(())
    }

    /// Waits until the pool's status holds report generation `target`.
    async fn wait_flushed(
        &self,
        pool: &PoolKey,
        entry: &PoolEntry,
        target: u64,
    ) -> Result<(), Status> {
        let mut rx = entry.flushed.subscribe();
        match tokio::time::timeout(FLUSH_WAIT, rx.wait_for(|g| *g >= target)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Status::unavailable(format!(
                "the report is not recorded in RelayPool {pool} yet; send it again"
            ))),
        }
    }

    async fn write_status(&self, pool: &PoolKey, state: &ReportState) -> Result<(), kube::Error> {
        let api: Api<RelayPool> = Api::namespaced(self.client.clone(), &pool.namespace);
        let relays: Vec<&RelayConnection> = state.relays.values().collect();
        let counters: Vec<&AddressCounters> = state.counters.values().collect();
        let patch = json!({
            "apiVersion": "mailfleet.dev/v1alpha1",
            "kind": "RelayPool",
            "status": {"relays": relays, "counters": counters},
        });
        api.patch_status(
            &pool.name,
            &PatchParams::apply(STATUS_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map(|_| ())
    }
}

fn ordinal_of(pod: &str) -> Option<u32> {
    pod.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

/// Adds one delta to an address's totals.
fn count(counters: &mut AddressCounters, outcome: i32, n: u64) {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    let slot = match Outcome::try_from(outcome) {
        Ok(Outcome::Delivered) => &mut counters.delivered,
        Ok(Outcome::Deferred) => &mut counters.deferred,
        Ok(Outcome::HardBounce) => &mut counters.hard_bounces,
        Ok(Outcome::PolicyBlock) => &mut counters.policy_blocks,
        Ok(Outcome::Complaint) => &mut counters.complaints,
        Ok(Outcome::DeferredByWarmup) => &mut counters.deferred_by_warmup,
        Ok(Outcome::Unspecified) | Err(_) => return,
    };
    *slot = slot.saturating_add(n);
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    fleet: Arc<Fleet>,
}

impl CoordinatorService {
    pub fn new(fleet: Arc<Fleet>) -> Self {
        CoordinatorService { fleet }
    }
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<RelayConfig, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    #[tracing::instrument(name = "coordinator.register", skip_all)]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let pool = self.fleet.authenticate(&request)?;
        let r = request.into_inner();
        self.fleet
            .authorize(&pool, &r.pod_namespace, &r.pod_name, &r.pod_uid)
            .await?;
        let entry = self.fleet.entry(&pool);
        let applied = {
            let mut reports = entry.reports.lock().await;
            self.fleet.seed(&pool, &mut reports).await?;
            reports
                .relays
                .get(&r.pod_name)
                .map(|c| u64::try_from(c.applied_sequence).unwrap_or(0))
                .unwrap_or(0)
        };
        let addresses: Vec<EgressAddress> = {
            let state = entry.config.lock().unwrap_or_else(|e| e.into_inner());
            state
                .pods
                .get(&r.pod_name)
                .and_then(|s| s.borrow().as_ref().map(|c| c.addresses.clone()))
                .unwrap_or_default()
        };
        tracing::info!(%pool, pod = %r.pod_name, version = %r.relay_version, addresses = addresses.len(), "relay registered");
        self.fleet
            .metrics
            .count("coordinator_registrations_total", &[]);
        Ok(Response::new(RegisterResponse {
            pool: pool.name,
            addresses,
            applied_sequence: applied,
        }))
    }

    type WatchConfigStream = ConfigStream;

    #[tracing::instrument(name = "coordinator.watch_config", skip_all)]
    async fn watch_config(
        &self,
        request: Request<WatchConfigRequest>,
    ) -> Result<Response<Self::WatchConfigStream>, Status> {
        let pool = self.fleet.authenticate(&request)?;
        let r = request.into_inner();
        self.fleet
            .authorize(&pool, &r.pod_namespace, &r.pod_name, "")
            .await?;
        if ordinal_of(&r.pod_name).is_none() {
            return Err(Status::invalid_argument(format!(
                "pod name {:?} is not a StatefulSet pod name",
                r.pod_name
            )));
        }
        let entry = self.fleet.entry(&pool);
        let mut rx = {
            let mut state = entry.config.lock().unwrap_or_else(|e| e.into_inner());
            state
                .pods
                .entry(r.pod_name.clone())
                .or_insert_with(|| watch::channel(None).0)
                .subscribe()
        };
        let known = r.known_version;
        let stream = async_stream(move |tx| async move {
            let mut last = known;
            loop {
                let current = rx.borrow_and_update().clone();
                if let Some(config) = current
                    && config.version > last
                {
                    last = config.version;
                    if tx.send(Ok((*config).clone())).await.is_err() {
                        return;
                    }
                }
                if rx.changed().await.is_err() {
                    // The pool or pod is gone: end the stream; the relay reconnects.
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    #[tracing::instrument(name = "coordinator.report", skip_all)]
    async fn report(&self, request: Request<ReportRequest>) -> Result<Response<ReportAck>, Status> {
        let pool = self.fleet.authenticate(&request)?;
        let r = request.into_inner();
        self.fleet
            .authorize(&pool, &r.pod_namespace, &r.pod_name, "")
            .await?;
        if r.sequence == 0 {
            return Err(Status::invalid_argument(
                "report sequence numbers start at 1",
            ));
        }
        let entry = self.fleet.entry(&pool);
        let mut reports = entry.reports.lock().await;
        self.fleet.seed(&pool, &mut reports).await?;
        let applied = reports
            .relays
            .get(&r.pod_name)
            .map(|c| u64::try_from(c.applied_sequence).unwrap_or(0))
            .unwrap_or(0);
        if r.sequence <= applied {
            // Already counted: acknowledge once what counted it is written.
            let target = reports
                .pod_generation
                .get(&r.pod_name)
                .copied()
                .unwrap_or(0);
            drop(reports);
            self.fleet.wait_flushed(&pool, &entry, target).await?;
            self.fleet
                .metrics
                .count("coordinator_reports_total", &[("result", "duplicate")]);
            return Ok(Response::new(ReportAck {
                applied_sequence: applied,
            }));
        }
        for d in &r.deltas {
            if d.address.is_empty() || d.count == 0 {
                continue;
            }
            let c = reports
                .counters
                .entry(d.address.clone())
                .or_insert_with(|| AddressCounters {
                    address: d.address.clone(),
                    ..AddressCounters::default()
                });
            count(c, d.outcome, d.count);
        }
        for s in &r.suppressions {
            if s.domain.is_empty() || s.recipient.is_empty() {
                continue;
            }
            reports.suppressions.push(crate::suppression::Pending {
                domain: s.domain.clone(),
                recipient: s.recipient.clone(),
                reason: crate::suppression::reason_name(s.reason),
            });
        }
        reports.relays.insert(
            r.pod_name.clone(),
            RelayConnection {
                pod: r.pod_name.clone(),
                applied_sequence: i64::try_from(r.sequence).unwrap_or(i64::MAX),
                config_version: i64::try_from(r.applied_config_version).unwrap_or(i64::MAX),
                last_report: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            },
        );
        reports.generation += 1;
        let target = reports.generation;
        reports.pod_generation.insert(r.pod_name.clone(), target);
        if !reports.flushing {
            reports.flushing = true;
            tokio::spawn(flush(
                Arc::clone(&self.fleet),
                pool.clone(),
                Arc::clone(&entry),
            ));
        }
        drop(reports);
        // Acknowledged only once it is in the status: an operator restart re-reads it from
        // there, and a relay that got no acknowledgement resends the same sequence.
        self.fleet.wait_flushed(&pool, &entry, target).await?;
        self.fleet
            .metrics
            .count("coordinator_reports_total", &[("result", "applied")]);
        Ok(Response::new(ReportAck {
            applied_sequence: r.sequence,
        }))
    }
}

/// Writes a pool's report state to its status, gathering the reports that arrive meanwhile
/// into one write, until nothing new is left; retries while the API server refuses.
async fn flush(fleet: Arc<Fleet>, pool: PoolKey, entry: Arc<PoolEntry>) {
    loop {
        tokio::time::sleep(FLUSH_DELAY).await;
        let (snapshot, generation, suppressions) = {
            let mut r = entry.reports.lock().await;
            (
                ReportState {
                    seeded: true,
                    relays: r.relays.clone(),
                    counters: r.counters.clone(),
                    ..ReportState::default()
                },
                r.generation,
                std::mem::take(&mut r.suppressions),
            )
        };
        // Suppressions first: once the status records a report's sequence, the relay will not
        // send it again.
        if let Err(e) =
            crate::suppression::record(&fleet.client, &pool.namespace, &pool.name, &suppressions)
                .await
        {
            tracing::warn!(%pool, error = %e, "cannot record suppressed recipients; retrying");
            let mut r = entry.reports.lock().await;
            let newer = std::mem::take(&mut r.suppressions);
            r.suppressions = suppressions;
            r.suppressions.extend(newer);
            drop(r);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        match fleet.write_status(&pool, &snapshot).await {
            Ok(()) => {
                entry.flushed.send_replace(generation);
                let mut r = entry.reports.lock().await;
                if r.generation == generation {
                    r.flushing = false;
                    return;
                }
            }
            Err(e) => {
                fleet
                    .metrics
                    .count("coordinator_reports_total", &[("result", "error")]);
                tracing::warn!(%pool, error = %e, "cannot record reports in the pool's status; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> ConfigStream
where
    F: FnOnce(mpsc::Sender<Result<RelayConfig, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_only_grow() {
        let a = next_version(0);
        assert!(a > 1_600_000_000_000);
        assert_eq!(next_version(u64::MAX - 1), u64::MAX);
        assert!(next_version(a) > a);
    }

    #[test]
    fn outcomes_land_in_their_counter() {
        let mut c = AddressCounters::default();
        count(&mut c, Outcome::Delivered as i32, 3);
        count(&mut c, Outcome::HardBounce as i32, 1);
        count(&mut c, Outcome::DeferredByWarmup as i32, 2);
        count(&mut c, 99, 5);
        assert_eq!(
            (c.delivered, c.hard_bounces, c.deferred_by_warmup),
            (3, 1, 2)
        );
        assert_eq!(c.deferred + c.complaints + c.policy_blocks, 0);
    }

    #[test]
    fn pod_ordinals() {
        assert_eq!(ordinal_of("transactional-12"), Some(12));
        assert_eq!(ordinal_of("transactional"), None);
    }
}
