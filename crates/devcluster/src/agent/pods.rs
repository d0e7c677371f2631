//! The pods bound to this node: each gets an address of the pod range, its volumes, a
//! process per container whose image maps to a local program, and a status the agent keeps
//! current. A terminating pod's processes get SIGTERM (then SIGKILL after its grace period),
//! and the agent then completes the deletion, as the kubelet does; a pod that is gone from
//! the API stops at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::volumes::{self, PodVolumes, SERVICE_ACCOUNT_MOUNT};
use super::{AgentConfig, AgentError, image_repository};
use crate::process::{self, ContainerRun, ContainerState, NodeInfo, ProcessSpec, expand, strings};

/// How often the agent looks at its pods even without a change.
const RESYNC: Duration = Duration::from_secs(2);
/// How long a pod whose volumes are not ready (a Secret missing, a claim unbound) waits
/// before the next try.
const RETRY: Duration = Duration::from_secs(2);

struct Handle {
    stop: watch::Sender<bool>,
    /// Set when the pod is terminating: after its processes stopped, delete it.
    finalize: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    ip: Option<u32>,
}

struct Agent {
    client: kube::Client,
    config: AgentConfig,
    running: BTreeMap<String, Handle>,
    used_ips: BTreeSet<u32>,
}

/// Watches the pods bound to the node and runs them until shutdown; then stops them all.
pub async fn run(
    client: kube::Client,
    config: AgentConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let api: Api<Pod> = Api::all(client.clone());
    let (reader, writer) = reflector::store::<Pod>();
    let selector = format!("spec.nodeName={}", config.node);
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().fields(&selector)),
    )
    .default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut agent = Agent {
        client,
        config,
        running: BTreeMap::new(),
        used_ips: BTreeSet::new(),
    };
    loop {
        tokio::select! {
            event = stream.next() => match event {
                Some(Ok(_)) => {}
                Some(Err(err)) => tracing::warn!(%err, "pod watch"),
                None => break,
            },
            _ = tokio::time::sleep(RESYNC) => {}
            _ = shutdown.changed() => break,
        }
        agent.reconcile(reader.state());
    }
    for (_, handle) in std::mem::take(&mut agent.running) {
        let _ = handle.stop.send(true);
        let _ = handle.task.await;
    }
    Ok(())
}

impl Agent {
    fn reconcile(&mut self, pods: Vec<Arc<Pod>>) {
        let by_uid: BTreeMap<String, Arc<Pod>> = pods
            .into_iter()
            .map(|p| (p.uid().unwrap_or_default(), p))
            .collect();
        // Finished tasks free their pod IPs.
        let done: Vec<String> = self
            .running
            .iter()
            .filter(|(_, h)| h.task.is_finished())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in done {
            if let Some(h) = self.running.remove(&uid)
                && let Some(ip) = h.ip
            {
                self.used_ips.remove(&ip);
            }
        }
        for (uid, handle) in &self.running {
            match by_uid.get(uid) {
                // Gone from the API: stop at once, nothing to finalize.
                None => {
                    let _ = handle.stop.send(true);
                }
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    handle.finalize.store(true, Ordering::SeqCst);
                    let _ = handle.stop.send(true);
                }
                Some(_) => {}
            }
        }
        for (uid, pod) in by_uid {
            if self.running.contains_key(&uid) {
                continue;
            }
            let value = match serde_json::to_value(pod.as_ref()) {
                Ok(v) => v,
                Err(err) => {
                    tracing::warn!(%err, "pod not representable as JSON");
                    continue;
                }
            };
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let finished = matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            if finished && !terminating {
                continue;
            }
            let ip = if terminating {
                None
            } else {
                Some(self.pod_ip(&value))
            };
            let (stop, stop_rx) = watch::channel(terminating);
            let finalize = Arc::new(AtomicBool::new(terminating));
            let run = PodRun {
                client: self.client.clone(),
                config: self.config.clone(),
                pod: value,
                ip: ip.map_or(Ipv4Addr::LOCALHOST, Ipv4Addr::from),
                finalize: finalize.clone(),
            };
            let task = tokio::spawn(run.run(stop_rx));
            let ip = ip.filter(|ip| *ip != u32::from(Ipv4Addr::LOCALHOST));
            self.running.insert(
                uid,
                Handle {
                    stop,
                    finalize,
                    task,
                    ip,
                },
            );
        }
    }

    /// The pod's IP: the one it already has (the agent restarted), the node's with
    /// `hostNetwork`, else the next free address of the pod range.
    fn pod_ip(&mut self, pod: &Value) -> u32 {
        if pod["spec"]["hostNetwork"] == json!(true) {
            return u32::from(Ipv4Addr::LOCALHOST);
        }
        if let Some(ip) = pod["status"]["podIP"]
            .as_str()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        {
            let ip = u32::from(ip);
            self.used_ips.insert(ip);
            return ip;
        }
        let start = u32::from(self.config.pod_range_start);
        let ip = (1..self.config.pod_range_size.saturating_sub(1))
            .map(|i| start + i)
            .find(|ip| !self.used_ips.contains(ip) && ip % 256 != 0 && ip % 256 != 255)
            .unwrap_or(start + 1);
        self.used_ips.insert(ip);
        ip
    }
}

/// One pod on this node, from its start to its end.
struct PodRun {
    client: kube::Client,
    config: AgentConfig,
    pod: Value,
    ip: Ipv4Addr,
    finalize: Arc<AtomicBool>,
}

fn meta(pod: &Value, field: &str) -> String {
    pod["metadata"][field]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

impl PodRun {
    fn node(&self) -> NodeInfo {
        NodeInfo {
            name: self.config.node.clone(),
            host_ip: Ipv4Addr::LOCALHOST,
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &meta(&self.pod, "namespace"))
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        let (ns, name) = (meta(&self.pod, "namespace"), meta(&self.pod, "name"));
        let uid = meta(&self.pod, "uid");
        let pod_dir = self
            .config
            .dir
            .join("pods")
            .join(format!("{ns}_{name}_{}", uid.get(..8).unwrap_or(&uid)));
        // Volumes first: a pod whose Secret or claim is not there yet waits, and says so.
        let volumes = loop {
            if *stop.borrow() {
                break None;
            }
            match volumes::prepare(&self.client, &self.config, &self.pod, &pod_dir).await {
                Ok(v) => break Some(v),
                Err(err) => {
                    let reason = ("CreateContainerConfigError".to_string(), err.to_string());
                    let refused = self.all_refused(&reason);
                    let states = process::initial_states(&self.pod, &[], &refused);
                    self.write_status(&states, &process::now()).await;
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        };
        if let Some(volumes) = volumes {
            self.supervise(&pod_dir, &volumes, stop).await;
        }
        if self.finalize.load(Ordering::SeqCst) {
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            if let Err(err) = self.pods().delete(&name, &dp).await {
                tracing::debug!(%err, pod = name, "final delete");
            }
        }
    }

    fn all_refused(&self, reason: &(String, String)) -> BTreeMap<String, (String, String)> {
        self.pod["spec"]["containers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .filter_map(|c| Some((c["name"].as_str()?.to_string(), reason.clone())))
            .collect()
    }

    async fn supervise(
        &self,
        pod_dir: &std::path::Path,
        volumes: &PodVolumes,
        stop: watch::Receiver<bool>,
    ) {
        let objects = self.referenced_objects().await;
        let lookup = |plural: &str, name: &str| {
            objects
                .get(&(plural.to_string(), name.to_string()))
                .cloned()
        };
        let mut runs = Vec::new();
        let mut refused = BTreeMap::new();
        for container in self.pod["spec"]["containers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let name = container["name"].as_str().unwrap_or_default().to_string();
            let image = container["image"].as_str().unwrap_or_default();
            let Some(program) = self
                .config
                .images
                .iter()
                .find(|m| m.repository == image_repository(image))
            else {
                let known: Vec<&str> = self
                    .config
                    .images
                    .iter()
                    .map(|m| m.repository.as_str())
                    .collect();
                refused.insert(name, ("ErrImageNeverPull".to_string(), format!(
                    "node {} runs containers as local processes and has no program for image {image:?} (it runs: {})",
                    self.config.node,
                    known.join(", ")
                )));
                continue;
            };
            runs.push(self.container_run(container, &program.program, pod_dir, volumes, &lookup));
        }
        let initial = process::initial_states(&self.pod, &runs, &refused);
        let started = process::now();
        let mut processes = process::Supervised::start(runs, initial, stop);
        while let Some(states) = processes.changed().await {
            self.write_status(&states, &started).await;
        }
        processes.finish().await;
    }

    fn container_run(
        &self,
        container: &Value,
        program: &std::path::Path,
        pod_dir: &std::path::Path,
        volumes: &PodVolumes,
        lookup: &dyn Fn(&str, &str) -> Option<Value>,
    ) -> ContainerRun {
        let mounts = volumes::container_mounts(container, volumes);
        // Values from the pod spec name paths inside the container; the agent's own (the
        // kubeconfig) are paths of this machine already.
        let mut env: Vec<(String, String)> = process::container_env(
            &self.pod,
            container,
            &self.node(),
            self.ip,
            Vec::new(),
            lookup,
        )
        .into_iter()
        .map(|(k, v)| {
            let v = volumes::rewrite(&v, &mounts);
            (k, v)
        })
        .collect();
        if let Some(kubeconfig) = &volumes.kubeconfig
            && mounts.iter().any(|(m, _)| m == SERVICE_ACCOUNT_MOUNT)
        {
            env.push(("KUBECONFIG".to_string(), kubeconfig.display().to_string()));
        }
        // The program stands in for the image's entrypoint, or for `command[0]`.
        let mut args: Vec<String> = strings(&container["command"]).into_iter().skip(1).collect();
        args.extend(strings(&container["args"]));
        let args = args
            .iter()
            .map(|a| volumes::rewrite(&expand(a, &env), &mounts))
            .collect();
        let root = pod_dir.join("root");
        let workdir = match container["workingDir"].as_str() {
            Some(dir) => volumes::host_path(dir, &mounts, &root),
            None => root,
        };
        let name = container["name"].as_str().unwrap_or_default().to_string();
        ContainerRun {
            spec: ProcessSpec {
                container: name.clone(),
                program: program.display().to_string(),
                args,
            },
            container: container.clone(),
            env,
            ip: self.ip,
            timing: self.config.timing.clone(),
            log: log_path(
                &self.config,
                &meta(&self.pod, "namespace"),
                &meta(&self.pod, "name"),
                &name,
            ),
            workdir,
            restart_policy: self.pod["spec"]["restartPolicy"]
                .as_str()
                .unwrap_or("Always")
                .to_string(),
            grace: self.pod["metadata"]["deletionGracePeriodSeconds"]
                .as_u64()
                .or(self.pod["spec"]["terminationGracePeriodSeconds"].as_u64())
                .map_or(Duration::from_secs(30), Duration::from_secs),
            user: None,
        }
    }

    /// The Secrets and ConfigMaps the containers' `env` and `envFrom` name, as plural/name.
    async fn referenced_objects(&self) -> BTreeMap<(String, String), Value> {
        let mut names = BTreeSet::new();
        for c in self.pod["spec"]["containers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            for e in c["env"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    names.insert(("secrets", n.to_string()));
                }
                if let Some(n) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
                    names.insert(("configmaps", n.to_string()));
                }
            }
            for f in c["envFrom"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                if let Some(n) = f["secretRef"]["name"].as_str() {
                    names.insert(("secrets", n.to_string()));
                }
                if let Some(n) = f["configMapRef"]["name"].as_str() {
                    names.insert(("configmaps", n.to_string()));
                }
            }
        }
        let ns = meta(&self.pod, "namespace");
        let mut out = BTreeMap::new();
        for (plural, name) in names {
            let value = if plural == "secrets" {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
                api.get_opt(&name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|o| serde_json::to_value(o).ok())
            } else {
                let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
                api.get_opt(&name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|o| serde_json::to_value(o).ok())
            };
            if let Some(v) = value {
                out.insert((plural.to_string(), name), v);
            }
        }
        out
    }

    async fn write_status(&self, states: &[ContainerState], started: &str) {
        let mut status = process::pod_status(&self.pod, states, &self.node(), self.ip, started);
        // The API server computes the QoS class at creation and keeps it.
        if let Some(s) = status.as_object_mut() {
            s.remove("qosClass");
        }
        let name = meta(&self.pod, "name");
        let patch = json!({"status": status});
        if let Err(err) = self
            .pods()
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::debug!(%err, pod = name, "pod status");
        }
    }
}

/// Where a pod's output goes, for people reading logs: `DIR/pods/<ns>_<pod>_<container>.log`.
pub fn log_path(config: &AgentConfig, ns: &str, pod: &str, container: &str) -> PathBuf {
    config
        .dir
        .join("pods")
        .join(format!("{ns}_{pod}_{container}.log"))
}
