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
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

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
    /// A process could not start.
    #[error("failed to start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
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

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
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

/// What one container runs as a process.
#[derive(Debug, Clone)]
struct ProcessSpec {
    container: String,
    program: String,
    args: Vec<String>,
}

/// Decide which containers of a pod run as processes.
fn process_specs(pod: &Value, config: &RunnerConfig) -> Vec<ProcessSpec> {
    let mode = pod["metadata"]["annotations"][RUN_ANNOTATION]
        .as_str()
        .unwrap_or_default();
    if mode == "none" {
        return Vec::new();
    }
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
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

#[derive(Debug, Clone, PartialEq)]
struct ContainerState {
    name: String,
    image: String,
    ready: bool,
    restarts: u64,
    /// `running`, `waiting` or `terminated` state object.
    state: Value,
    last_state: Value,
}

impl Supervisor {
    async fn run(self, pod: Value, mut stop: watch::Receiver<bool>) {
        let specs = process_specs(&pod, &self.config);
        let started = now();
        let images: BTreeMap<String, String> = pod["spec"]["containers"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        (
                            c["name"].as_str().unwrap_or_default().to_string(),
                            c["image"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut states: Vec<ContainerState> = images
            .iter()
            .map(|(name, image)| ContainerState {
                name: name.clone(),
                image: image.clone(),
                ready: !specs.iter().any(|s| &s.container == name),
                restarts: 0,
                state: if specs.iter().any(|s| &s.container == name) {
                    json!({"waiting": {"reason": "ContainerCreating"}})
                } else {
                    json!({"running": {"startedAt": started}})
                },
                last_state: json!({}),
            })
            .collect();
        self.write_pod_status(&pod, &states, &started);
        if specs.is_empty() {
            let _ = stop.changed().await;
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, ContainerState)>(16);
        let mut tasks = Vec::new();
        for spec in specs {
            let container = pod["spec"]["containers"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == json!(spec.container)))
                .cloned()
                .unwrap_or(Value::Null);
            let env = self.env_for(&pod, &container);
            // The kubelet expands `$(VAR)` in command and args from the container's env.
            let mut spec = spec;
            spec.args = spec.args.iter().map(|a| expand(a, &env)).collect();
            let ctx = ContainerRun {
                spec,
                container,
                env,
                ip: self.ip,
                config: self.config.clone(),
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
            };
            tasks.push(tokio::spawn(ctx.run(tx.clone(), stop.clone())));
        }
        drop(tx);
        loop {
            tokio::select! {
                update = rx.recv() => match update {
                    Some((name, state)) => {
                        if let Some(s) = states.iter_mut().find(|s| s.name == name) {
                            *s = ContainerState { name: s.name.clone(), image: s.image.clone(), ..state };
                        }
                        if !*stop.borrow() {
                            let current = self.store.get(&self.rt, &self.ns, &self.name);
                            if let Ok(current) = current {
                                self.write_pod_status(&current, &states, &started);
                            }
                        }
                    }
                    None => break,
                },
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    fn env_for(&self, pod: &Value, container: &Value) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("POD_IP".into(), self.ip.to_string()),
            ("POD_NAME".into(), self.name.clone()),
            ("POD_NAMESPACE".into(), self.ns.clone()),
            ("DEVCLUSTER_POD_IP".into(), self.ip.to_string()),
            ("KUBECONFIG".into(), self.kubeconfig.display().to_string()),
        ];
        let lookup = |plural: &str, name: &str, key: &str| -> Option<String> {
            let rt = self.store.registry().get("", "v1", plural).cloned()?;
            let obj = self.store.get(&rt, &self.ns, name).ok()?;
            let v = obj["data"][key].as_str()?.to_string();
            if plural == "secrets" {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD.decode(v).ok()?;
                String::from_utf8(bytes).ok()
            } else {
                Some(v)
            }
        };
        for from in container["envFrom"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let prefix = from["prefix"].as_str().unwrap_or_default();
            let (plural, name) = if let Some(n) = from["configMapRef"]["name"].as_str() {
                ("configmaps", n)
            } else if let Some(n) = from["secretRef"]["name"].as_str() {
                ("secrets", n)
            } else {
                continue;
            };
            let Some(rt) = self.store.registry().get("", "v1", plural).cloned() else {
                continue;
            };
            if let Ok(obj) = self.store.get(&rt, &self.ns, name) {
                for key in obj["data"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
                {
                    if let Some(v) = lookup(plural, name, &key) {
                        env.push((format!("{prefix}{key}"), v));
                    }
                }
            }
        }
        for e in container["env"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let Some(name) = e["name"].as_str() else {
                continue;
            };
            let value = if let Some(v) = e["value"].as_str() {
                Some(v.to_string())
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some(match path {
                    "status.hostIP" => "127.0.0.1".to_string(),
                    "status.podIP" => self.ip.to_string(),
                    "status.podIPs" => self.ip.to_string(),
                    "spec.nodeName" => "devcluster".to_string(),
                    "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
                        .as_str()
                        .unwrap_or("default")
                        .to_string(),
                    other => {
                        if let Some(label) = other
                            .strip_prefix("metadata.labels['")
                            .and_then(|l| l.strip_suffix("']"))
                        {
                            pod["metadata"]["labels"][label]
                                .as_str()
                                .unwrap_or_default()
                                .to_string()
                        } else if let Some(ann) = other
                            .strip_prefix("metadata.annotations['")
                            .and_then(|l| l.strip_suffix("']"))
                        {
                            pod["metadata"]["annotations"][ann]
                                .as_str()
                                .unwrap_or_default()
                                .to_string()
                        } else {
                            crate::selectors::field_value(pod, other)
                        }
                    }
                })
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                lookup(
                    "secrets",
                    r.get("name").and_then(Value::as_str).unwrap_or_default(),
                    r.get("key").and_then(Value::as_str).unwrap_or_default(),
                )
            } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
                lookup(
                    "configmaps",
                    r.get("name").and_then(Value::as_str).unwrap_or_default(),
                    r.get("key").and_then(Value::as_str).unwrap_or_default(),
                )
            } else {
                None
            };
            if let Some(v) = value {
                // `$(VAR)` in a value refers to variables defined before it.
                let v = expand(&v, &env);
                env.push((name.to_string(), v));
            }
        }
        env
    }

    fn write_pod_status(&self, pod: &Value, states: &[ContainerState], started: &str) {
        let all_ready = states.iter().all(|s| s.ready);
        let any_running = states.iter().any(|s| s.state.get("running").is_some());
        let phase = if states
            .iter()
            .all(|s| s.state["terminated"]["exitCode"] == json!(0))
            && !states.is_empty()
        {
            "Succeeded"
        } else if any_running || states.iter().any(|s| s.restarts > 0) {
            "Running"
        } else if states.iter().any(|s| s.state.get("terminated").is_some())
            && pod["spec"]["restartPolicy"] == "Never"
        {
            "Failed"
        } else {
            "Pending"
        };
        let b = |v: bool| if v { "True" } else { "False" };
        let prev = |t: &str| -> Option<Value> {
            pod["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == t)
                .cloned()
        };
        let cond = |t: &str, v: bool| {
            let status = b(v);
            let ltt = prev(t)
                .filter(|c| c["status"] == status)
                .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_string))
                .unwrap_or_else(now);
            json!({"type": t, "status": status, "lastTransitionTime": ltt})
        };
        let statuses: Vec<Value> = states
            .iter()
            .map(|s| {
                json!({
                    "name": s.name, "image": s.image, "imageID": "", "ready": s.ready,
                    "restartCount": s.restarts, "started": s.state.get("running").is_some(),
                    "state": s.state, "lastState": s.last_state,
                })
            })
            .collect();
        let status = json!({
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "startTime": pod["status"]["startTime"].as_str().unwrap_or(started),
            "qosClass": "BestEffort",
            "conditions": [
                cond("PodScheduled", true),
                cond("Initialized", true),
                cond("ContainersReady", all_ready),
                cond("Ready", all_ready),
            ],
            "containerStatuses": statuses,
        });
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
                    new["spec"]["nodeName"] = json!("devcluster");
                }
                Ok(new)
            });
    }
}

struct ContainerRun {
    spec: ProcessSpec,
    container: Value,
    env: Vec<(String, String)>,
    ip: Ipv4Addr,
    config: RunnerConfig,
    log: PathBuf,
    workdir: PathBuf,
    restart_policy: String,
    grace: Duration,
}

impl ContainerRun {
    fn spawn(&self) -> Result<tokio::process::Child, RunnerError> {
        let err = |source| RunnerError::Spawn {
            program: self.spec.program.clone(),
            source,
        };
        std::fs::create_dir_all(&self.workdir).map_err(err)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(err)?;
        let log2 = log.try_clone().map_err(err)?;
        let mut cmd = tokio::process::Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .current_dir(&self.workdir)
            // A pod sees its own env, not the host's; PATH and HOME stay so programs resolve.
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", self.workdir.display().to_string())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        cmd.spawn().map_err(err)
    }

    async fn probe(&self) -> bool {
        let probe = &self.container["readinessProbe"];
        let port_of = |p: &Value| -> Option<u16> {
            match p {
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                Value::String(s) => s.parse().ok().or_else(|| {
                    self.container["ports"]
                        .as_array()?
                        .iter()
                        .find(|cp| cp["name"] == json!(s))?["containerPort"]
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                }),
                _ => None,
            }
        };
        let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1));
        if probe["httpGet"].is_object() {
            let Some(port) = port_of(&probe["httpGet"]["port"]) else {
                return false;
            };
            let path = probe["httpGet"]["path"].as_str().unwrap_or("/");
            return tokio::time::timeout(timeout, http_ok(self.ip, port, path))
                .await
                .unwrap_or(false);
        }
        if probe["tcpSocket"].is_object() {
            let Some(port) = port_of(&probe["tcpSocket"]["port"]) else {
                return false;
            };
            return tokio::time::timeout(timeout, tokio::net::TcpStream::connect((self.ip, port)))
                .await
                .is_ok_and(|r| r.is_ok());
        }
        // No probe (or an exec probe, which is not emulated): ready while running.
        true
    }

    async fn run(
        self,
        tx: tokio::sync::mpsc::Sender<(String, ContainerState)>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut restarts = 0u64;
        let mut backoff = self.config.restart_backoff;
        let mut last_state = json!({});
        let name = self.spec.container.clone();
        let send = |state: ContainerState| {
            let tx = tx.clone();
            let name = name.clone();
            async move {
                let _ = tx.send((name, state)).await;
            }
        };
        let mk = |ready: bool, restarts: u64, state: Value, last: &Value| ContainerState {
            name: String::new(),
            image: String::new(),
            ready,
            restarts,
            state,
            last_state: last.clone(),
        };
        loop {
            if *stop.borrow() {
                return;
            }
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(err) => {
                    tracing::warn!(%err, "pod process did not start");
                    send(mk(false, restarts, json!({"waiting": {"reason": "RunContainerError", "message": err.to_string()}}), &last_state)).await;
                    tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => return }
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    continue;
                }
            };
            let started = now();
            let running = json!({"running": {"startedAt": started}});
            let mut ready = false;
            send(mk(false, restarts, running.clone(), &last_state)).await;
            let exit = loop {
                tokio::select! {
                    status = child.wait() => break status.ok(),
                    _ = tokio::time::sleep(self.config.interval) => {
                        let now_ready = self.probe().await;
                        if now_ready != ready {
                            ready = now_ready;
                            send(mk(ready, restarts, running.clone(), &last_state)).await;
                        }
                    }
                    _ = stop.changed() => {
                        terminate(&mut child, self.grace.min(self.config.max_grace)).await;
                        return;
                    }
                }
            };
            let code = exit.and_then(|s| s.code()).unwrap_or(137);
            last_state = json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }, "startedAt": started, "finishedAt": now()}});
            let restart = match self.restart_policy.as_str() {
                "Never" => false,
                "OnFailure" => code != 0,
                _ => true,
            };
            if !restart {
                send(mk(false, restarts, last_state.clone(), &json!({}))).await;
                let _ = stop.changed().await;
                return;
            }
            restarts += 1;
            send(mk(false, restarts, json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off {}s restarting failed container", backoff.as_secs())}}), &last_state)).await;
            tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => return }
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }
}

/// Kubernetes variable expansion: `$(NAME)` becomes the value of an earlier variable,
/// `$$` an escaped `$`; references to unknown variables stay as written.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

async fn http_ok(ip: Ipv4Addr, port: u16, path: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect((ip, port)).await else {
        return false;
    };
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: devcluster-probe\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut buf[read..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    let line = String::from_utf8_lossy(&buf[..read]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (200..400).contains(&c))
}

/// The GroupResource of pods, for callers that watch them.
pub fn pods_resource() -> GroupResource {
    GroupResource {
        group: String::new(),
        resource: "pods".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_like_the_kubelet() {
        let env = vec![("POD_IP".to_string(), "127.0.0.2".to_string())];
        assert_eq!(
            expand("--listen=$(POD_IP):25", &env),
            "--listen=127.0.0.2:25"
        );
        assert_eq!(
            expand("$$(POD_IP) $(MISSING) $x", &env),
            "$(POD_IP) $(MISSING) $x"
        );
    }
}
