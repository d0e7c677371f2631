//! The pod runner: the parts of the StatefulSet controller and the kubelet that the operator's
//! end-to-end tests need, on one machine without containers.
//!
//! - StatefulSets get Pods `<name>-0..N-1` from their template, created in ordinal order
//!   (with `OrderedReady`, the next pod only once the previous one is Ready), deleted from the
//!   highest ordinal on scale-down, replaced one at a time when the template changes; their
//!   status counts replicas and ready replicas.
//! - Deployments only get a status that says all replicas are available (no pods).
//! - Every Pod is "scheduled" to the node `devcluster` and gets its own loopback address
//!   (127.0.0.N) as pod IP. Pods that run as processes (see [`RunnerConfig`]) get a supervisor
//!   task that starts the container's command with the pod's env, restarts it with backoff when
//!   it exits (as the kubelet does under `restartPolicy: Always`), probes readiness
//!   (`readinessProbe.httpGet` / `tcpSocket` on the pod IP) and writes the Pod status. Other
//!   pods are marked Running and Ready without a process.
//! - Deleting a Pod stops its process (SIGTERM, then SIGKILL after the grace period).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::process::{
    self, ContainerRun, ContainerState, NodeInfo, ProcessSpec, Timing, expand, now, strings,
};

use crate::resources::{GroupResource, ResourceType};
use crate::selectors::Selectors;
use crate::status::ApiError;
use crate::store::{DeleteOptions, Store, WriteOptions};

/// Pod annotation that chooses how a pod runs: `process` (start its containers' commands as
/// local processes) or `none` (never start a process; mark it Running).
pub const RUN_ANNOTATION: &str = "devcluster.mailfleet.dev/run";

/// How pods are run.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Program started for relay containers (those whose first argument, or second command
    /// word, is `relay`), in place of the image's entrypoint: typically the `mailfleet`
    /// binary. None: relay pods are marked Running without a process, unless annotated.
    pub relay_program: Option<PathBuf>,
    /// First delay before restarting a crashed process; doubles up to `max_backoff`.
    pub restart_backoff: Duration,
    /// Longest restart delay.
    pub max_backoff: Duration,
    /// How often readiness is probed and controllers reconcile.
    pub interval: Duration,
    /// Longest wait between SIGTERM and SIGKILL, whatever the pod's grace period says.
    pub max_grace: Duration,
    /// The first pod IP handed out; later pods get the following addresses of 127.0.0.0/16
    /// (skipping .0 and .255). Two emulators on one machine need distinct ranges, as pods
    /// listen on fixed ports of their IP (a relay's `/metrics` on 9091).
    pub first_pod_ip: Ipv4Addr,
}

/// The node every pod of the emulator runs on.
const NODE: &str = "devcluster";

impl RunnerConfig {
    fn timing(&self) -> Timing {
        Timing {
            restart_backoff: self.restart_backoff,
            max_backoff: self.max_backoff,
            interval: self.interval,
            max_grace: self.max_grace,
        }
    }
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            relay_program: None,
            restart_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            interval: Duration::from_millis(250),
            max_grace: Duration::from_secs(10),
            first_pod_ip: Ipv4Addr::new(127, 0, 0, 2),
        }
    }
}

/// Errors of the runner's own API writes (logged; the next round retries).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The store refused a write.
    #[error("failed to write {what}: {source}")]
    Write {
        /// What was written.
        what: String,
        /// The refusal.
        #[source]
        source: Box<ApiError>,
    },
}

struct PodHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    ip: Ipv4Addr,
}

struct Runner {
    store: Arc<Store>,
    config: RunnerConfig,
    dir: PathBuf,
    kubeconfig: PathBuf,
    pods: BTreeMap<String, PodHandle>,
    used_ips: BTreeSet<u32>,
}

fn rt(store: &Store, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
    store.registry().get(group, version, plural).cloned()
}

fn meta(obj: &Value, field: &str) -> String {
    obj["metadata"][field]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn template_hash(template: &Value) -> String {
    let text = serde_json::to_string(template).unwrap_or_default();
    let mut h: u64 = 1469598103934665603;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(1099511628211);
    }
    format!("{:x}", h & 0xffff_ffff)
}

/// Run the controllers and pod supervisors until shutdown.
pub async fn run(
    store: Arc<Store>,
    config: RunnerConfig,
    dir: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let kubeconfig = dir
        .parent()
        .map(|p| p.join("kubeconfig"))
        .unwrap_or_default();
    if let Err(err) = std::fs::create_dir_all(&dir) {
        tracing::warn!(%err, dir = %dir.display(), "failed to create the pod directory");
    }
    let mut runner = Runner {
        store: store.clone(),
        config,
        dir,
        kubeconfig,
        pods: BTreeMap::new(),
        used_ips: BTreeSet::new(),
    };
    runner.ensure_node();
    let mut events = store.subscribe();
    loop {
        runner.reconcile();
        tokio::select! {
            _ = tokio::time::sleep(runner.config.interval) => {}
            _ = events.recv() => {}
            _ = shutdown.changed() => break,
        }
    }
    for (_, handle) in std::mem::take(&mut runner.pods) {
        let _ = handle.stop.send(true);
        let _ = handle.task.await;
    }
}

impl Runner {
    fn ensure_node(&self) {
        let Some(nodes) = rt(&self.store, "", "v1", "nodes") else {
            return;
        };
        let node = json!({
            "metadata": {"name": "devcluster", "labels": {"kubernetes.io/hostname": "devcluster", "kubernetes.io/os": "linux"}},
            "spec": {},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "devcluster"}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "devcluster pod runner is ready", "lastTransitionTime": now()}],
                "nodeInfo": {"kubeletVersion": "v1.34.0-devcluster", "operatingSystem": "linux", "architecture": "amd64", "containerRuntimeVersion": "devcluster://processes"},
            },
        });
        let _ = self
            .store
            .create(&nodes, "", node, &WriteOptions::system("devcluster-runner"));
    }

    fn reconcile(&mut self) {
        if let Err(err) = self.reconcile_statefulsets() {
            tracing::debug!(%err, "statefulset reconcile");
        }
        self.reconcile_deployments();
        self.reconcile_pdbs();
        self.reconcile_pods();
    }

    fn reconcile_statefulsets(&mut self) -> Result<(), RunnerError> {
        let (Some(sts_rt), Some(pod_rt)) = (
            rt(&self.store, "apps", "v1", "statefulsets"),
            rt(&self.store, "", "v1", "pods"),
        ) else {
            return Ok(());
        };
        let (sets, _) = self.store.list(&sts_rt, None, &Selectors::default());
        for sts in sets {
            if !sts["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let ns = meta(&sts, "namespace");
            let name = meta(&sts, "name");
            let uid = meta(&sts, "uid");
            let replicas = sts["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
            let parallel = sts["spec"]["podManagementPolicy"] == "Parallel";
            let hash = template_hash(&sts["spec"]["template"]);
            let (pods, _) = self.store.list(&pod_rt, Some(&ns), &Selectors::default());
            let owned: BTreeMap<usize, Value> = pods
                .into_iter()
                .filter(|p| {
                    p["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|rs| rs.iter().any(|r| r["uid"] == json!(uid)))
                })
                .filter_map(|p| {
                    let n = meta(&p, "name");
                    let ordinal = n.strip_prefix(&format!("{name}-"))?.parse::<usize>().ok()?;
                    Some((ordinal, p))
                })
                .collect();
            // Scale up in ordinal order.
            for i in 0..replicas {
                if owned.contains_key(&i) {
                    continue;
                }
                let predecessors_ready = (0..i).all(|j| {
                    owned.get(&j).is_some_and(|p| {
                        is_ready(p) && p["metadata"]["deletionTimestamp"].is_null()
                    })
                });
                if !parallel && !predecessors_ready {
                    break;
                }
                let Some(pod) = pod_from_template(&sts, i, &hash) else {
                    break;
                };
                self.store
                    .create(
                        &pod_rt,
                        &ns,
                        pod,
                        &WriteOptions::system("statefulset-controller"),
                    )
                    .map_err(|source| RunnerError::Write {
                        what: format!("pod {ns}/{name}-{i}"),
                        source: Box::new(source),
                    })?;
                if !parallel {
                    break;
                }
            }
            // Scale down from the highest ordinal, one at a time unless Parallel.
            let extra: Vec<usize> = owned
                .keys()
                .rev()
                .filter(|i| **i >= replicas)
                .copied()
                .collect();
            for i in extra.iter().take(if parallel { usize::MAX } else { 1 }) {
                let _ = self.store.delete(
                    &pod_rt,
                    &ns,
                    &format!("{name}-{i}"),
                    &DeleteOptions::default(),
                );
            }
            // Rolling update: replace the highest-ordinal outdated pod once all are ready.
            let all_ready = owned.len() >= replicas && owned.values().all(is_ready);
            if extra.is_empty()
                && all_ready
                && let Some((i, _)) = owned.iter().rev().find(|(_, p)| {
                    p["metadata"]["labels"]["controller-revision-hash"] != json!(hash)
                })
            {
                let _ = self.store.delete(
                    &pod_rt,
                    &ns,
                    &format!("{name}-{i}"),
                    &DeleteOptions::default(),
                );
            }
            let ready = owned.values().filter(|p| is_ready(p)).count();
            let current = owned
                .values()
                .filter(|p| p["metadata"]["labels"]["controller-revision-hash"] == json!(hash))
                .count();
            let status = json!({
                "observedGeneration": sts["metadata"]["generation"],
                "replicas": owned.len(),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "currentReplicas": current,
                "updatedReplicas": current,
                "currentRevision": format!("{name}-{hash}"),
                "updateRevision": format!("{name}-{hash}"),
                "collisionCount": 0,
            });
            self.write_status(&sts_rt, &ns, &name, status)?;
        }
        Ok(())
    }

    fn reconcile_deployments(&mut self) {
        let Some(dep_rt) = rt(&self.store, "apps", "v1", "deployments") else {
            return;
        };
        let (deps, _) = self.store.list(&dep_rt, None, &Selectors::default());
        for d in deps {
            let n = d["spec"]["replicas"].as_i64().unwrap_or(1);
            let status = json!({
                "observedGeneration": d["metadata"]["generation"],
                "replicas": n, "readyReplicas": n, "availableReplicas": n, "updatedReplicas": n,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "message": "devcluster does not run Deployment pods; it reports them available"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable", "message": "devcluster reports the rollout complete"},
                ],
            });
            let _ = self.write_status(&dep_rt, &meta(&d, "namespace"), &meta(&d, "name"), status);
        }
    }

    /// PodDisruptionBudgets: a status that reports the budget met, so `helm --wait` and
    /// kstatus consider them current.
    fn reconcile_pdbs(&mut self) {
        let Some(pdb_rt) = rt(&self.store, "policy", "v1", "poddisruptionbudgets") else {
            return;
        };
        let (pdbs, _) = self.store.list(&pdb_rt, None, &Selectors::default());
        for p in pdbs {
            let status = json!({
                "observedGeneration": p["metadata"]["generation"],
                "currentHealthy": 0, "desiredHealthy": 0, "expectedPods": 0, "disruptionsAllowed": 0,
            });
            let _ = self.write_status(&pdb_rt, &meta(&p, "namespace"), &meta(&p, "name"), status);
        }
    }

    fn write_status(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        status: Value,
    ) -> Result<(), RunnerError> {
        let opts = WriteOptions {
            subresource: Some("status".into()),
            ..WriteOptions::system("devcluster-runner")
        };
        let result = self.store.modify(rt, ns, name, &opts, |cur| {
            let Some(cur) = cur else {
                return Err(ApiError::not_found(&rt.plural, &rt.group, name));
            };
            let mut new = cur.clone();
            // Keep fields the runner does not compute (conditions written by others).
            let mut merged = cur["status"].clone();
            crate::patch::merge_patch(&mut merged, &status);
            new["status"] = merged;
            Ok(new)
        });
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.code == 404 => Ok(()),
            Err(source) => Err(RunnerError::Write {
                what: format!("{} {ns}/{name} status", rt.plural),
                source: Box::new(source),
            }),
        }
    }

    fn allocate_ip(&mut self) -> Ipv4Addr {
        // Never 127.0.0.1 (the API server and most test peers live there).
        let first = (u32::from(self.config.first_pod_ip) & 0xffff).max(2);
        let n = (first..0x1_0000)
            .chain(2..first)
            .find(|n| !self.used_ips.contains(n) && n % 256 != 0 && n % 256 != 255)
            .unwrap_or(2);
        self.used_ips.insert(n);
        Ipv4Addr::new(127, 0, (n >> 8) as u8, (n & 0xff) as u8)
    }

    fn reconcile_pods(&mut self) {
        let Some(pod_rt) = rt(&self.store, "", "v1", "pods") else {
            return;
        };
        let (pods, _) = self.store.list(&pod_rt, None, &Selectors::default());
        let live: BTreeMap<String, Value> = pods
            .into_iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| (meta(&p, "uid"), p))
            .collect();
        // Stop pods that are gone or terminating.
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !live.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(handle) = self.pods.remove(&uid) {
                let _ = handle.stop.send(true);
                let ip = u32::from(handle.ip) & 0xffff;
                self.used_ips.remove(&ip);
                // The supervisor ends by itself after stopping the process.
                drop(handle.task);
            }
        }
        for (uid, pod) in live {
            if self.pods.contains_key(&uid) {
                continue;
            }
            let ip = match pod["status"]["podIP"]
                .as_str()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
            {
                Some(ip) => {
                    self.used_ips.insert(u32::from(ip) & 0xffff);
                    ip
                }
                None => self.allocate_ip(),
            };
            let (stop, stop_rx) = watch::channel(false);
            let supervisor = Supervisor {
                store: self.store.clone(),
                rt: pod_rt.clone(),
                ns: meta(&pod, "namespace"),
                name: meta(&pod, "name"),
                ip,
                config: self.config.clone(),
                dir: self.dir.clone(),
                kubeconfig: self.kubeconfig.clone(),
            };
            let task = tokio::spawn(supervisor.run(pod, stop_rx));
            self.pods.insert(uid, PodHandle { stop, task, ip });
        }
    }
}

fn pod_from_template(sts: &Value, ordinal: usize, hash: &str) -> Option<Value> {
    // Built-in objects are stored unvalidated: skip a template that is not shaped like one.
    if !sts["spec"]["template"]["spec"].is_object() {
        return None;
    }
    let name = meta(sts, "name");
    let pod_name = format!("{name}-{ordinal}");
    let template = &sts["spec"]["template"];
    let mut labels = template["metadata"]["labels"].clone();
    if !labels.is_object() {
        labels = json!({});
    }
    labels["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
    labels["apps.kubernetes.io/pod-index"] = json!(ordinal.to_string());
    labels["controller-revision-hash"] = json!(hash);
    let mut spec = template["spec"].clone();
    spec["hostname"] = json!(pod_name);
    if let Some(svc) = sts["spec"]["serviceName"].as_str() {
        spec["subdomain"] = json!(svc);
    }
    let mut metadata = json!({
        "name": pod_name,
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": meta(sts, "uid"),
            "controller": true, "blockOwnerDeletion": true,
        }],
    });
    if template["metadata"]["annotations"].is_object() {
        metadata["annotations"] = template["metadata"]["annotations"].clone();
    }
    Some(json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}))
}

/// Decide which containers of a pod run as processes.
fn process_specs(pod: &Value, config: &RunnerConfig) -> Vec<ProcessSpec> {
    let mode = pod["metadata"]["annotations"][RUN_ANNOTATION]
        .as_str()
        .unwrap_or_default();
    if mode == "none" {
        return Vec::new();
    }
    let mut out = Vec::new();
    for c in pod["spec"]["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let command = strings(&c["command"]);
        let args = strings(&c["args"]);
        let name = c["name"].as_str().unwrap_or_default().to_string();
        // A relay container: `args: [relay, ...]` or `command: [mailfleet, relay, ...]`.
        let relay = args.first().is_some_and(|a| a == "relay")
            || command.get(1).is_some_and(|a| a == "relay");
        if relay && let Some(program) = &config.relay_program {
            let mut all: Vec<String> = command.iter().skip(1).cloned().collect();
            all.extend(args);
            out.push(ProcessSpec {
                container: name,
                program: program.display().to_string(),
                args: all,
            });
            continue;
        }
        if mode == "process"
            && let Some((program, rest)) = command.split_first()
        {
            let mut all = rest.to_vec();
            all.extend(args);
            out.push(ProcessSpec {
                container: name,
                program: program.clone(),
                args: all,
            });
        }
    }
    out
}

struct Supervisor {
    store: Arc<Store>,
    rt: ResourceType,
    ns: String,
    name: String,
    ip: Ipv4Addr,
    config: RunnerConfig,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Supervisor {
    fn node() -> NodeInfo {
        NodeInfo {
            name: NODE.to_string(),
            host_ip: Ipv4Addr::LOCALHOST,
        }
    }

    async fn run(self, pod: Value, stop: watch::Receiver<bool>) {
        let node = Self::node();
        let objects = |plural: &str, name: &str| -> Option<Value> {
            let rt = self.store.registry().get("", "v1", plural).cloned()?;
            self.store.get(&rt, &self.ns, name).ok()
        };
        let runs: Vec<ContainerRun> = process_specs(&pod, &self.config)
            .into_iter()
            .map(|spec| {
                let container = pod["spec"]["containers"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["name"] == json!(spec.container)))
                    .cloned()
                    .unwrap_or(Value::Null);
                let base = vec![
                    ("POD_IP".into(), self.ip.to_string()),
                    ("POD_NAME".into(), self.name.clone()),
                    ("POD_NAMESPACE".into(), self.ns.clone()),
                    ("DEVCLUSTER_POD_IP".into(), self.ip.to_string()),
                    ("KUBECONFIG".into(), self.kubeconfig.display().to_string()),
                ];
                let env = process::container_env(&pod, &container, &node, self.ip, base, &objects);
                // The kubelet expands `$(VAR)` in command and args from the container's env.
                let mut spec = spec;
                spec.args = spec.args.iter().map(|a| expand(a, &env)).collect();
                ContainerRun {
                    spec,
                    container,
                    env,
                    ip: self.ip,
                    timing: self.config.timing(),
                    log: self.dir.join(format!("{}_{}.log", self.ns, self.name)),
                    workdir: self.dir.join(format!("{}_{}", self.ns, self.name)),
                    restart_policy: pod["spec"]["restartPolicy"]
                        .as_str()
                        .unwrap_or("Always")
                        .to_string(),
                    grace: pod["spec"]["terminationGracePeriodSeconds"]
                        .as_u64()
                        .map(Duration::from_secs)
                        .unwrap_or(Duration::from_secs(30)),
                    user: None,
                }
            })
            .collect();
        let initial = process::initial_states(&pod, &runs, &BTreeMap::new());
        let started = process::now();
        // Write the pod's status whenever a container's state changes, until it stops.
        let mut processes = process::Supervised::start(runs, initial, stop);
        while let Some(states) = processes.changed().await {
            if let Ok(current) = self.store.get(&self.rt, &self.ns, &self.name) {
                self.write_pod_status(&current, &states, &node, &started);
            }
        }
        processes.finish().await;
    }

    fn write_pod_status(
        &self,
        pod: &Value,
        states: &[ContainerState],
        node: &NodeInfo,
        started: &str,
    ) {
        let status = process::pod_status(pod, states, node, self.ip, started);
        let opts = WriteOptions {
            subresource: Some("status".into()),
            ..WriteOptions::system("kubelet")
        };
        let _ = self
            .store
            .modify(&self.rt, &self.ns, &self.name, &opts, |cur| {
                let Some(cur) = cur else {
                    return Err(ApiError::not_found("pods", "", &self.name));
                };
                let mut new = cur.clone();
                new["status"] = status.clone();
                Ok(new)
            });
        // nodeName is spec: set once, through a normal update.
        let opts = WriteOptions::system("kube-scheduler");
        let _ = self
            .store
            .modify(&self.rt, &self.ns, &self.name, &opts, |cur| {
                let Some(cur) = cur else {
                    return Err(ApiError::not_found("pods", "", &self.name));
                };
                let mut new = cur.clone();
                if new["spec"]["nodeName"].is_null() {
                    new["spec"]["nodeName"] = json!(NODE);
                }
                Ok(new)
            });
    }
}

/// The GroupResource of pods, for callers that watch them.
pub fn pods_resource() -> GroupResource {
    GroupResource {
        group: String::new(),
        resource: "pods".into(),
    }
}
