//! A pod's volumes as directories on this machine: the kubelet mounts them into the
//! container; the agent has no mount namespaces, so it writes each volume into a directory
//! and maps the container's `mountPath`s onto those directories (working directory, and
//! arguments or environment values that name a path under a mount).
//!
//! Kinds: `emptyDir`, `secret`, `configMap`, `downwardAPI`, `projected` (service-account
//! token by TokenRequest bound to the pod, `kube-root-ca.crt`, secrets, config maps,
//! downward API), `persistentVolumeClaim` (the bound PersistentVolume's `hostPath` or
//! `local` path) and `hostPath`. A pod that mounts a service-account token also gets a
//! kubeconfig that uses it, in `KUBECONFIG`: the in-cluster configuration of a process that
//! cannot reach the `kubernetes` Service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret, ServiceAccount,
};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

use super::{AgentConfig, AgentError};

/// Where the kubelet mounts a pod's service-account token.
pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The volumes of one pod, ready to be used by its containers.
#[derive(Debug, Default)]
pub struct PodVolumes {
    /// Volume name → directory.
    pub dirs: BTreeMap<String, PathBuf>,
    /// The kubeconfig for the pod's service-account token, if it has one.
    pub kubeconfig: Option<PathBuf>,
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(AgentError::io(parent))?;
    }
    std::fs::write(path, bytes).map_err(AgentError::io(path))
}

/// Writes `data` (key → bytes) into `dir`, all keys or only `items` (`key` → `path`).
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: &Value,
) -> Result<(), AgentError> {
    match items.as_array() {
        Some(items) => {
            for item in items {
                let key = item["key"].as_str().unwrap_or_default();
                let path = item["path"].as_str().unwrap_or(key);
                if let Some(bytes) = data.get(key) {
                    write(&dir.join(path), bytes)?;
                }
            }
        }
        None => {
            for (key, bytes) in data {
                write(&dir.join(key), bytes)?;
            }
        }
    }
    Ok(())
}

async fn secret_data(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, AgentError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    match api
        .get_opt(name)
        .await
        .map_err(AgentError::api(format!("read secret {ns}/{name}")))?
    {
        Some(s) => Ok(s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()),
        None if optional => Ok(BTreeMap::new()),
        None => Err(AgentError::Missing(format!("secret \"{name}\" not found"))),
    }
}

async fn config_map_data(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, AgentError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match api
        .get_opt(name)
        .await
        .map_err(AgentError::api(format!("read configmap {ns}/{name}")))?
    {
        Some(cm) => {
            let mut out: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            out.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            Ok(out)
        }
        None if optional => Ok(BTreeMap::new()),
        None => Err(AgentError::Missing(format!(
            "configmap \"{name}\" not found"
        ))),
    }
}

/// A token of the pod's ServiceAccount, bound to the pod (it dies with it).
async fn service_account_token(
    client: &kube::Client,
    pod: &Value,
    source: &Value,
) -> Result<String, AgentError> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let sa = pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default");
    let mut spec = json!({
        "expirationSeconds": source["expirationSeconds"].as_i64().unwrap_or(3607),
        "boundObjectRef": {
            "apiVersion": "v1", "kind": "Pod",
            "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"],
        },
    });
    if let Some(aud) = source["audience"].as_str() {
        spec["audiences"] = json!([aud]);
    }
    let request =
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let answer: Value = api
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await
        .map_err(AgentError::api(format!(
            "request a token of serviceaccount {ns}/{sa}"
        )))?;
    answer["status"]["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| {
            AgentError::Missing(format!("no token in the TokenRequest answer for {ns}/{sa}"))
        })
}

fn downward_items(dir: &Path, pod: &Value, items: &Value) -> Result<(), AgentError> {
    for item in items.as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let Some(path) = item["path"].as_str() else {
            continue;
        };
        let field = item["fieldRef"]["fieldPath"].as_str().unwrap_or_default();
        let value = crate::selectors::field_value(pod, field);
        write(&dir.join(path), value.as_bytes())?;
    }
    Ok(())
}

async fn persistent_volume_dir(
    client: &kube::Client,
    ns: &str,
    claim: &str,
) -> Result<PathBuf, AgentError> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvc = claims.get(claim).await.map_err(AgentError::api(format!(
        "read persistentvolumeclaim {ns}/{claim}"
    )))?;
    let volume = pvc
        .spec
        .and_then(|s| s.volume_name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            AgentError::Missing(format!("persistentvolumeclaim \"{claim}\" is not bound"))
        })?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs
        .get(&volume)
        .await
        .map_err(AgentError::api(format!("read persistentvolume {volume}")))?;
    let spec = pv.spec.unwrap_or_default();
    spec.host_path
        .map(|h| h.path)
        .or(spec.local.map(|l| l.path))
        .map(PathBuf::from)
        .ok_or_else(|| {
            AgentError::Missing(format!(
                "persistentvolume {volume} is neither hostPath nor local"
            ))
        })
}

/// Writes the files of one source into `dir`: a Secret's or a ConfigMap's keys, or downward
/// API items. The Secret's name is `secretName` in a volume and `name` in a projection.
/// False when `source` is none of these.
async fn write_files(
    client: &kube::Client,
    pod: &Value,
    dir: &Path,
    source: &Value,
    secret_name: &str,
) -> Result<bool, AgentError> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let optional = |v: &Value| v["optional"].as_bool().unwrap_or(false);
    if let Some(s) = source.get("secret") {
        let name = s[secret_name].as_str().unwrap_or_default();
        let data = secret_data(client, ns, name, optional(s)).await?;
        write_keys(dir, &data, &s["items"])?;
    } else if let Some(c) = source.get("configMap") {
        let name = c["name"].as_str().unwrap_or_default();
        let data = config_map_data(client, ns, name, optional(c)).await?;
        write_keys(dir, &data, &c["items"])?;
    } else if let Some(d) = source.get("downwardAPI") {
        downward_items(dir, pod, &d["items"])?;
    } else {
        return Ok(false);
    }
    Ok(true)
}

/// Materialises every volume of `pod` under `pod_dir/volumes/`.
pub async fn prepare(
    client: &kube::Client,
    config: &AgentConfig,
    pod: &Value,
    pod_dir: &Path,
) -> Result<PodVolumes, AgentError> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut out = PodVolumes::default();
    for volume in pod["spec"]["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let name = volume["name"].as_str().unwrap_or_default();
        let dir = pod_dir.join("volumes").join(name);
        if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
            out.dirs.insert(
                name.to_string(),
                persistent_volume_dir(client, ns, claim).await?,
            );
            continue;
        }
        if let Some(path) = volume["hostPath"]["path"].as_str() {
            out.dirs.insert(name.to_string(), PathBuf::from(path));
            continue;
        }
        std::fs::create_dir_all(&dir).map_err(AgentError::io(&dir))?;
        if let Some(p) = volume.get("projected") {
            for source in p["sources"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                if let Some(t) = source.get("serviceAccountToken") {
                    let token = service_account_token(client, pod, t).await?;
                    write(
                        &dir.join(t["path"].as_str().unwrap_or("token")),
                        token.as_bytes(),
                    )?;
                    let kubeconfig = pod_dir.join("kubeconfig");
                    write(&kubeconfig, pod_kubeconfig(config, ns, &dir).as_bytes())?;
                    out.kubeconfig = Some(kubeconfig);
                } else {
                    write_files(client, pod, &dir, source, "name").await?;
                }
            }
        } else if !write_files(client, pod, &dir, volume, "secretName").await?
            && volume.get("emptyDir").is_none()
        {
            tracing::warn!(
                volume = name,
                "volume kind not supported by the node agent; an empty directory stands in"
            );
        }
        out.dirs.insert(name.to_string(), dir);
    }
    Ok(out)
}

/// The kubeconfig of a pod's service-account token: the API server's URL, the cluster CA of
/// the projected `ca.crt`, the token file (re-read by clients as it changes).
fn pod_kubeconfig(config: &AgentConfig, ns: &str, dir: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: cluster\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: serviceaccount\n  user:\n    tokenFile: {}\ncontexts:\n- name: in-cluster\n  context: {{cluster: cluster, user: serviceaccount, namespace: {ns}}}\ncurrent-context: in-cluster\n",
        config.server_url,
        dir.join("ca.crt").display(),
        dir.join("token").display(),
    )
}

/// A container's mounts: `mountPath` → directory on this machine (with `subPath`).
pub fn container_mounts(container: &Value, volumes: &PodVolumes) -> Vec<(String, PathBuf)> {
    let mut mounts: Vec<(String, PathBuf)> = container["volumeMounts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|m| {
            let dir = volumes.dirs.get(m["name"].as_str()?)?;
            let dir = match m["subPath"].as_str().filter(|s| !s.is_empty()) {
                Some(sub) => dir.join(sub),
                None => dir.clone(),
            };
            Some((
                m["mountPath"].as_str()?.trim_end_matches('/').to_string(),
                dir,
            ))
        })
        .collect();
    // Longest mount path first, so nested mounts win.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
    mounts
}

/// `path` under one of the mounts, as a path of this machine.
fn under_mount(path: &str, mounts: &[(String, PathBuf)]) -> Option<PathBuf> {
    mounts.iter().find_map(|(mount, dir)| {
        let rest = path.strip_prefix(mount.as_str())?;
        match rest.trim_start_matches('/') {
            "" if rest.is_empty() || rest == "/" => Some(dir.clone()),
            inner if rest.starts_with('/') => Some(dir.join(inner)),
            _ => None,
        }
    })
}

/// `path` on this machine: under a mount, the mount's directory; elsewhere, under `root`.
pub fn host_path(path: &str, mounts: &[(String, PathBuf)], root: &Path) -> PathBuf {
    under_mount(path, mounts).unwrap_or_else(|| root.join(path.trim_start_matches('/')))
}

/// An argument or environment value with a path under a mount (`/etc/x/y`, `--f=/etc/x/y`)
/// rewritten to the mount's directory; anything else unchanged.
pub fn rewrite(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let (prefix, path) = match value.split_once('=') {
        Some((flag, path)) if flag.starts_with('-') => (format!("{flag}="), path),
        _ => (String::new(), value),
    };
    match under_mount(path, mounts) {
        Some(dir) if path.starts_with('/') => format!("{prefix}{}", dir.display()),
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_map_to_volume_directories() {
        let mut volumes = PodVolumes::default();
        volumes.dirs.insert("spool".into(), PathBuf::from("/d/pv1"));
        volumes
            .dirs
            .insert("tls".into(), PathBuf::from("/d/pod/volumes/tls"));
        let container = json!({"volumeMounts": [
            {"name": "spool", "mountPath": "/var/spool/mailfleet"},
            {"name": "tls", "mountPath": "/var/spool/mailfleet/tls/"},
        ]});
        let mounts = container_mounts(&container, &volumes);
        let root = Path::new("/d/pod/root");
        assert_eq!(
            host_path("/var/spool/mailfleet", &mounts, root),
            PathBuf::from("/d/pv1")
        );
        assert_eq!(
            host_path("/var/spool/mailfleet/tls/a", &mounts, root),
            PathBuf::from("/d/pod/volumes/tls/a")
        );
        assert_eq!(
            host_path("/var/spool/mailfleetx", &mounts, root),
            PathBuf::from("/d/pod/root/var/spool/mailfleetx")
        );
        assert_eq!(
            rewrite("--cert=/var/spool/mailfleet/tls/tls.crt", &mounts),
            "--cert=/d/pod/volumes/tls/tls.crt"
        );
        assert_eq!(rewrite("/var/spool/mailfleet", &mounts), "/d/pv1");
        assert_eq!(
            rewrite("--listen=127.0.0.1:25", &mounts),
            "--listen=127.0.0.1:25"
        );
        assert_eq!(rewrite("relay", &mounts), "relay");
    }
}
