//! Local volumes for PersistentVolumeClaims: a StorageClass (the cluster's default) whose
//! provisioner is the agent. For each claim of that class the PV controller hands over
//! (`volume.kubernetes.io/storage-provisioner`), the agent makes a directory and a
//! PersistentVolume pre-bound to the claim, which the PV controller then binds; a released
//! volume of the class (reclaim policy Delete) loses its directory and its object. This is
//! how StatefulSets with volumeClaimTemplates get their volumes on this node.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;

use super::node::MANAGER;
use super::{AgentConfig, AgentError};

/// The provisioner name of the agent's StorageClass.
pub const PROVISIONER: &str = "mailfleet.dev/node-agent";
const POLL: Duration = Duration::from_secs(1);

async fn ensure_class(client: &kube::Client, config: &AgentConfig) -> Result<(), AgentError> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let class = json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": config.storage_class,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    });
    classes
        .patch(
            &config.storage_class,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&class),
        )
        .await
        .map_err(AgentError::api(format!(
            "apply storageclass {}",
            config.storage_class
        )))?;
    Ok(())
}

fn ours(annotations: Option<&std::collections::BTreeMap<String, String>>, key: &str) -> bool {
    annotations
        .and_then(|a| a.get(key))
        .is_some_and(|p| p == PROVISIONER)
}

async fn provision(client: &kube::Client, config: &AgentConfig) -> Result<(), AgentError> {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let list = claims
        .list(&ListParams::default())
        .await
        .map_err(AgentError::api("list persistentvolumeclaims"))?;
    for pvc in list {
        let annotations = pvc.metadata.annotations.as_ref();
        let spec = pvc.spec.clone().unwrap_or_default();
        let pending = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
        if !pending
            || spec.volume_name.is_some()
            || pvc.metadata.deletion_timestamp.is_some()
            || !(ours(annotations, "volume.kubernetes.io/storage-provisioner")
                || ours(annotations, "volume.beta.kubernetes.io/storage-provisioner"))
        {
            continue;
        }
        let uid = pvc.metadata.uid.clone().unwrap_or_default();
        let name = format!("pvc-{uid}");
        let dir = config.dir.join("volumes").join(&name);
        std::fs::create_dir_all(&dir).map_err(AgentError::io(&dir))?;
        let size = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map_or_else(|| "1Gi".to_string(), |q| q.0.clone());
        let pv = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": name,
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": spec.storage_class_name.clone().unwrap_or_default(),
                "volumeMode": spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()),
                "hostPath": {"path": dir.display().to_string(), "type": "Directory"},
                "claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": pvc.metadata.namespace, "name": pvc.metadata.name, "uid": uid,
                },
            },
        });
        pvs.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&pv),
        )
        .await
        .map_err(AgentError::api(format!("create persistentvolume {name}")))?;
        tracing::info!(pv = name, claim = ?pvc.metadata.name, "provisioned a local volume");
    }
    // Released volumes of ours go, with their directories.
    for pv in pvs
        .list(&ListParams::default())
        .await
        .map_err(AgentError::api("list persistentvolumes"))?
    {
        let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
        let delete = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            == Some("Delete");
        if !(released
            && delete
            && ours(
                pv.metadata.annotations.as_ref(),
                "pv.kubernetes.io/provisioned-by",
            ))
        {
            continue;
        }
        let name = pv.metadata.name.clone().unwrap_or_default();
        let dir = config.dir.join("volumes").join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(AgentError::io(&dir))?;
        }
        pvs.delete(&name, &DeleteParams::default())
            .await
            .map_err(AgentError::api(format!("delete persistentvolume {name}")))?;
        tracing::info!(pv = name, "deleted a released local volume");
    }
    Ok(())
}

/// Keeps the StorageClass and provisions and reclaims volumes every second until shutdown.
pub async fn run(client: kube::Client, config: AgentConfig, mut shutdown: watch::Receiver<bool>) {
    let mut class_ready = false;
    loop {
        if !class_ready {
            match ensure_class(&client, &config).await {
                Ok(()) => class_ready = true,
                Err(err) => tracing::warn!(%err, "storage class"),
            }
        }
        if class_ready && let Err(err) = provision(&client, &config).await {
            tracing::warn!(%err, "volume provisioning");
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}
