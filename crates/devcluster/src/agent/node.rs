//! The Node and its heartbeat: the agent registers its Node as Ready with this machine's
//! capacity, then renews the node's Lease in `kube-node-lease` every 10 s and refreshes the
//! Ready condition every minute, as the kubelet does, so that the node lifecycle controller
//! neither taints nor evicts it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{AgentConfig, AgentError};
use crate::process::now;

/// Field manager of the agent's writes.
pub const MANAGER: &str = "mailfleet-node-agent";
/// Version the node reports: the agent is not a kubelet, and says so.
pub const AGENT_VERSION: &str = concat!("v1.37.2-mailfleet-node-agent.", env!("CARGO_PKG_VERSION"));
const LEASE_SECONDS: i32 = 40;
const LEASE_RENEW: Duration = Duration::from_secs(10);
const STATUS_EVERY: u32 = 6;

fn memory_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(4 * 1024 * 1024)
}

fn node_status(config: &AgentConfig) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let capacity = json!({
        "cpu": cpus.to_string(),
        "memory": format!("{}Ki", memory_kib()),
        "pods": "110",
        "ephemeral-storage": "100Gi",
    });
    let heartbeat = now();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": heartbeat, "lastTransitionTime": heartbeat})
    };
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure is reported"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure is reported"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure is reported"),
            condition("Ready", "True", "KubeletReady", "mailfleet node agent is running pods as local processes"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": config.node},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": "", "osImage": "local processes",
            "containerRuntimeVersion": "mailfleet-node-agent://processes",
            "kubeletVersion": AGENT_VERSION, "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
        },
    })
}

/// Creates or updates the Node (labels as the kubelet sets them) and reports it Ready.
pub async fn register(client: &kube::Client, config: &AgentConfig) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": config.node,
            "labels": {
                "kubernetes.io/hostname": config.node,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
            },
        },
    });
    let pp = PatchParams::apply(MANAGER).force();
    nodes
        .patch(&config.node, &pp, &Patch::Apply(&node))
        .await
        .map_err(AgentError::api(format!("register node {}", config.node)))?;
    report_status(client, config).await
}

async fn report_status(client: &kube::Client, config: &AgentConfig) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = json!({"status": node_status(config)});
    nodes
        .patch_status(&config.node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(AgentError::api(format!(
            "report the status of node {}",
            config.node
        )))?;
    Ok(())
}

async fn renew_lease(client: &kube::Client, config: &AgentConfig) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .get(&config.node)
        .await
        .map_err(AgentError::api(format!("read node {}", config.node)))?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renew = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": config.node,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": config.node,
                "uid": node.metadata.uid.unwrap_or_default(),
            }],
        },
        "spec": {
            "holderIdentity": config.node,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": renew,
        },
    });
    leases
        .patch(
            &config.node,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .map_err(AgentError::api(format!(
            "renew the lease of node {}",
            config.node
        )))?;
    Ok(())
}

/// Renews the node's Lease every 10 s and its status every minute until shutdown; failures
/// are logged and retried at the next beat.
pub async fn heartbeat(
    client: kube::Client,
    config: AgentConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut beat = 0u32;
    loop {
        if let Err(err) = renew_lease(&client, &config).await {
            tracing::warn!(%err, "node lease");
        }
        beat += 1;
        if beat.is_multiple_of(STATUS_EVERY)
            && let Err(err) = report_status(&client, &config).await
        {
            tracing::warn!(%err, "node status");
        }
        tokio::select! {
            _ = tokio::time::sleep(LEASE_RENEW) => {}
            _ = shutdown.changed() => return,
        }
    }
}
