//! Pod containers as local processes: their environment as the kubelet builds it, a
//! supervisor per container (start, readiness probe, restart with backoff, graceful stop) and
//! the pod status their states add up to.
//!
//! Shared by devcluster's pod runner, which reads and writes its own store, and the node
//! agent, which is a client of any API server: both decide which containers run and where,
//! then hand this module [`ContainerRun`]s and write the [`pod_status`] it computes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// A process failed to start.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
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

/// What one container runs as a process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The container's name.
    pub container: String,
    /// The program started in place of the image's entrypoint.
    pub program: String,
    /// Its arguments (`$(VAR)` not yet expanded).
    pub args: Vec<String>,
}

/// How containers are supervised.
#[derive(Debug, Clone)]
pub struct Timing {
    /// First delay before restarting a crashed process; doubles up to `max_backoff`.
    pub restart_backoff: Duration,
    /// Longest restart delay.
    pub max_backoff: Duration,
    /// How often readiness is probed.
    pub interval: Duration,
    /// Longest wait between SIGTERM and SIGKILL, whatever the pod's grace period says.
    pub max_grace: Duration,
}

/// The node the pods run on, as their environment and status name it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The Node's name (`spec.nodeName`).
    pub name: String,
    /// The node's address (`status.hostIP`).
    pub host_ip: Ipv4Addr,
}

/// One container's state as the pod status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerState {
    /// The container's name.
    pub name: String,
    /// Its image.
    pub image: String,
    /// Whether its readiness probe passes.
    pub ready: bool,
    /// How often it was restarted.
    pub restarts: u64,
    /// `running`, `waiting` or `terminated` state object.
    pub state: Value,
    /// The state before the last restart.
    pub last_state: Value,
}

/// The time as Kubernetes writes it.
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The initial state of each container of `pod`: `ContainerCreating` for those that will run
/// (`runs`), waiting with the given reason and message for those that cannot (`refused`),
/// running and ready for the rest (the emulator's pods without processes).
pub fn initial_states(
    pod: &Value,
    runs: &[ContainerRun],
    refused: &BTreeMap<String, (String, String)>,
) -> Vec<ContainerState> {
    let started = now();
    pod["spec"]["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let runs = runs.iter().any(|r| r.spec.container == name);
            let (ready, state) = if let Some((reason, message)) = refused.get(&name) {
                (
                    false,
                    json!({"waiting": {"reason": reason, "message": message}}),
                )
            } else if runs {
                (false, json!({"waiting": {"reason": "ContainerCreating"}}))
            } else {
                (true, json!({"running": {"startedAt": started}}))
            };
            ContainerState {
                image: c["image"].as_str().unwrap_or_default().to_string(),
                name,
                ready,
                restarts: 0,
                state,
                last_state: json!({}),
            }
        })
        .collect()
}

/// A pod's container processes under supervision: [`Supervised::changed`] gives the states
/// of all its containers whenever one changes, so that the caller writes the pod's status.
pub struct Supervised {
    task: tokio::task::JoinHandle<()>,
    states: watch::Receiver<Vec<ContainerState>>,
    stop: watch::Receiver<bool>,
}

impl Supervised {
    /// Starts the processes (`initial`: the containers' states before they start); they run
    /// until `stop` turns true.
    pub fn start(
        runs: Vec<ContainerRun>,
        initial: Vec<ContainerState>,
        stop: watch::Receiver<bool>,
    ) -> Supervised {
        let (tx, states) = watch::channel(Vec::new());
        let task = tokio::spawn(supervise(runs, initial, tx, stop.clone()));
        Supervised { task, states, stop }
    }

    /// The containers' states after the next change; None once the pod is stopping.
    pub async fn changed(&mut self) -> Option<Vec<ContainerState>> {
        self.states.changed().await.ok()?;
        if *self.stop.borrow() {
            return None;
        }
        Some(self.states.borrow_and_update().clone())
    }

    /// Waits until every process has stopped.
    pub async fn finish(self) {
        let _ = self.task.await;
    }
}

/// The strings of a JSON array (`command`, `args`); anything else gives none.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs a pod's container processes until `stop` turns true, publishing the states of all its
/// containers on `states` (starting from `initial`) whenever one changes.
async fn supervise(
    runs: Vec<ContainerRun>,
    initial: Vec<ContainerState>,
    states: watch::Sender<Vec<ContainerState>>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = states.send(initial);
    if runs.is_empty() {
        let _ = stop.changed().await;
        return;
    }
    let (tx, mut rx) = mpsc::channel::<(String, ContainerState)>(16);
    let mut tasks = Vec::new();
    for run in runs {
        tasks.push(tokio::spawn(run.run(tx.clone(), stop.clone())));
    }
    drop(tx);
    while let Some((name, state)) = rx.recv().await {
        states.send_modify(|all| {
            if let Some(s) = all.iter_mut().find(|s| s.name == name) {
                *s = ContainerState {
                    name: s.name.clone(),
                    image: s.image.clone(),
                    ..state
                };
            }
        });
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The environment of one container: `base` (what the host adds), then `envFrom` and `env`
/// (`value`, `fieldRef`, `secretKeyRef`, `configMapKeyRef`), with `$(VAR)` expanded as the
/// kubelet does. `objects(plural, name)` gives a Secret or ConfigMap of the pod's namespace.
pub fn container_env(
    pod: &Value,
    container: &Value,
    node: &NodeInfo,
    ip: Ipv4Addr,
    base: Vec<(String, String)>,
    objects: &dyn Fn(&str, &str) -> Option<Value>,
) -> Vec<(String, String)> {
    let mut env = base;
    let lookup = |plural: &str, name: &str, key: &str| -> Option<String> {
        let obj = objects(plural, name)?;
        if plural == "secrets" {
            use base64::Engine;
            let v = obj["data"][key].as_str()?;
            let bytes = base64::engine::general_purpose::STANDARD.decode(v).ok()?;
            String::from_utf8(bytes).ok()
        } else {
            obj["data"][key].as_str().map(str::to_string)
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
        if let Some(obj) = objects(plural, name) {
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
                "status.hostIP" => node.host_ip.to_string(),
                "status.podIP" => ip.to_string(),
                "status.podIPs" => ip.to_string(),
                "spec.nodeName" => node.name.clone(),
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

/// The pod's status from its containers' states: phase, conditions, IPs, container statuses
/// (conditions keep their transition time while they hold).
pub fn pod_status(
    pod: &Value,
    states: &[ContainerState],
    node: &NodeInfo,
    ip: Ipv4Addr,
    started: &str,
) -> Value {
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
        "hostIP": node.host_ip.to_string(),
        "hostIPs": [{"ip": node.host_ip.to_string()}],
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
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
    status
}

/// One container's process, supervised as the kubelet supervises a container: started with
/// the pod's environment in its working directory, probed for readiness, restarted with
/// backoff as `restartPolicy` says, stopped with SIGTERM and then SIGKILL.
pub struct ContainerRun {
    /// What runs.
    pub spec: ProcessSpec,
    /// The container as the pod spec gives it (probes, ports).
    pub container: Value,
    /// The whole environment of the process (nothing of the host's but `PATH`).
    pub env: Vec<(String, String)>,
    /// The pod IP: probes connect there.
    pub ip: Ipv4Addr,
    /// Restart backoff, probe interval, longest grace.
    pub timing: Timing,
    /// Output (stdout and stderr) is appended here.
    pub log: PathBuf,
    /// The process's working directory (created if missing).
    pub workdir: PathBuf,
    /// The pod's `restartPolicy`.
    pub restart_policy: String,
    /// The pod's termination grace period.
    pub grace: Duration,
    /// User and group the process runs as (the pod's `runAsUser`/`runAsGroup`), when the
    /// supervisor may switch users.
    pub user: Option<(u32, u32)>,
}

impl ContainerRun {
    fn spawn(&self) -> Result<tokio::process::Child, ProcessError> {
        let err = |source| ProcessError::Spawn {
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
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
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

    /// Runs the process until `stop` turns true, sending every change of its state.
    pub async fn run(
        self,
        tx: tokio::sync::mpsc::Sender<(String, ContainerState)>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut restarts = 0u64;
        let mut backoff = self.timing.restart_backoff;
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
                    backoff = (backoff * 2).min(self.timing.max_backoff);
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
                    _ = tokio::time::sleep(self.timing.interval) => {
                        let now_ready = self.probe().await;
                        if now_ready != ready {
                            ready = now_ready;
                            send(mk(ready, restarts, running.clone(), &last_state)).await;
                        }
                    }
                    _ = stop.changed() => {
                        terminate(&mut child, self.grace.min(self.timing.max_grace)).await;
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
            backoff = (backoff * 2).min(self.timing.max_backoff);
        }
    }
}

/// Kubernetes variable expansion: `$(NAME)` becomes the value of an earlier variable,
/// `$$` an escaped `$`; references to unknown variables stay as written.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
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
