//! The cluster an end-to-end test runs against, in one of two modes:
//!
//! - `MAILFLEET_E2E_KUBECONFIG=PATH`: the cluster of that kubeconfig, where the chart is
//!   installed and runs the operator (release `MAILFLEET_E2E_RELEASE`, default `mailfleet`, in
//!   `MAILFLEET_E2E_RELEASE_NAMESPACE`, default `mailfleet-system`). hack/e2e-kube.sh starts a
//!   real control plane whose node agent runs pods as processes on this machine
//!   (`MAILFLEET_E2E_REACH=pod-ip`; `MAILFLEET_KUBE_DIR` is where their logs are).
//! - unset (CI): devcluster running relay pods as `mailfleet relay` processes, the CRDs
//!   applied from crds/, and `mailfleet operator` as a process of this test, which is what the
//!   chart would run.
//!
//! Either way the test gets a namespace of its own (on an external cluster deleted at the end,
//! passed or not, unless `MAILFLEET_E2E_KEEP=1` keeps a failed one), `kubectl` pointed at the
//! cluster, and a way to restart the operator: SIGKILL and a new process on devcluster, the
//! deletion of the operator's pod on an external cluster (its Deployment makes a new one).
//! `MAILFLEET_E2E_TIMEOUT` (seconds; 120 on devcluster, 300 otherwise) bounds waits for the
//! cluster to converge.
//!
//! What differs on an external cluster: the operator restart is a graceful pod deletion (the
//! old pod releases the leader Lease, so the new one leads at once; on devcluster the SIGKILLed
//! process holds it until it expires, 15 s); the operator's traces are not checked (its OTLP
//! endpoint is the chart's, fixed at install); at the end the test's RelayPools,
//! SendingDomains and WarmupPlans are deleted before its namespace (see [`Target`]'s `Drop`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use mailfleet_devcluster::{Config, DevCluster, RunnerConfig};
use serde_json::Value;

use super::{Kubectl, Traces, eventually};
use crate::common::{Proc, free_port, repo_root};

/// The cluster under test and this test's namespace in it.
pub struct Target {
    pub k: Kubectl,
    /// The test's namespace (created by [`Target::start`]).
    pub ns: String,
    /// Seconds a wait for the cluster to converge may take.
    pub timeout: u64,
    root: PathBuf,
    /// Behind a lock so that restarting the operator takes `&self`, as the test's other
    /// borrows (`&t.k`) live on.
    mode: Mutex<Mode>,
    external: bool,
    /// Dropped last: devcluster runs on it.
    pub rt: tokio::runtime::Runtime,
}

enum Mode {
    Local(Local),
    External(External),
}

/// devcluster and the operator process.
struct Local {
    dc: Option<DevCluster>,
    operator: Option<Proc>,
    /// Stay the same across restarts: the relays keep dialling the same coordinator.
    coordinator: u16,
    health: u16,
    otlp: Option<u16>,
    started: u32,
    log: PathBuf,
}

/// The chart's release on an external cluster.
struct External {
    release: String,
    namespace: String,
    /// Operator pods deleted by [`Target::kill_operator`].
    deleted: Vec<String>,
}

impl External {
    fn selector(&self) -> String {
        format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component=operator",
            self.release
        )
    }
}

fn env_timeout(default: u64) -> u64 {
    std::env::var("MAILFLEET_E2E_TIMEOUT")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(default)
}

/// `prefix-N`, unique enough for tests sharing one cluster.
fn namespace_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}",
        (u64::from(nanos) ^ u64::from(std::process::id())) % 100_000
    )
}

fn operator_process(
    kubeconfig: &Path,
    log: &Path,
    coordinator: u16,
    health: u16,
    id: &str,
    otlp: Option<u16>,
) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailfleet"));
    cmd.args([
        "operator",
        &format!("--coordinator-addr=127.0.0.1:{coordinator}"),
        &format!("--coordinator-url=https://127.0.0.1:{coordinator}"),
        &format!("--metrics-addr=127.0.0.1:{health}"),
        &format!("--health-addr=127.0.0.1:{health}"),
        "--namespace=mailfleet-system",
        &format!("--identity={id}"),
        "--relay-image=example.invalid/mailfleet:test",
    ])
    .env("KUBECONFIG", kubeconfig)
    .env("RUST_LOG", "info,kube=warn")
    .stdout(Stdio::null())
    .stderr(log);
    if let Some(port) = otlp {
        cmd.env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        );
    }
    Proc(cmd.spawn().unwrap())
}

impl Target {
    /// The cluster, with a new namespace `prefix-N` and the operator running.
    pub fn start(root: &Path, prefix: &str) -> Target {
        Target::start_inner(root, prefix, None)
    }

    /// As [`Target::start`], with the operator exporting its traces to `traces` where it can
    /// be told to (see [`Target::exports_traces`]).
    pub fn start_traced(root: &Path, prefix: &str, traces: &Traces) -> Target {
        Target::start_inner(root, prefix, Some(traces))
    }

    fn start_inner(root: &Path, prefix: &str, traces: Option<&Traces>) -> Target {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ns = namespace_name(prefix);
        let t = match std::env::var_os("MAILFLEET_E2E_KUBECONFIG") {
            Some(path) => {
                let kubeconfig = PathBuf::from(path);
                assert!(
                    kubeconfig.is_file(),
                    "MAILFLEET_E2E_KUBECONFIG={} is not a file",
                    kubeconfig.display()
                );
                let var = |name: &str, default: &str| {
                    std::env::var(name)
                        .ok()
                        .filter(|v| !v.is_empty())
                        .unwrap_or_else(|| default.to_string())
                };
                Target {
                    k: Kubectl {
                        kubeconfig,
                        home: root.to_path_buf(),
                    },
                    ns,
                    timeout: env_timeout(300),
                    root: root.to_path_buf(),
                    mode: Mutex::new(Mode::External(External {
                        release: var("MAILFLEET_E2E_RELEASE", "mailfleet"),
                        namespace: var("MAILFLEET_E2E_RELEASE_NAMESPACE", "mailfleet-system"),
                        deleted: Vec::new(),
                    })),
                    external: true,
                    rt,
                }
            }
            None => {
                let mut config = Config::new(root.join("cluster"));
                config.runner = Some(RunnerConfig {
                    relay_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_mailfleet"))),
                    ..RunnerConfig::default()
                });
                let dc = rt.block_on(DevCluster::start(config)).unwrap();
                let k = Kubectl {
                    kubeconfig: dc.kubeconfig.clone(),
                    home: root.to_path_buf(),
                };
                k.ok(&["apply", "-f", repo_root().join("crds").to_str().unwrap()]);
                k.ok(&["create", "namespace", "mailfleet-system"]);
                let mut local = Local {
                    dc: Some(dc),
                    operator: None,
                    coordinator: free_port(),
                    health: free_port(),
                    otlp: traces.map(|t| t.serve(&rt)),
                    started: 0,
                    log: root.join("operator.log"),
                };
                local.start_operator();
                Target {
                    k,
                    ns,
                    timeout: env_timeout(120),
                    root: root.to_path_buf(),
                    mode: Mutex::new(Mode::Local(local)),
                    external: false,
                    rt,
                }
            }
        };
        t.k.ok(&["create", "namespace", &t.ns]);
        t
    }

    fn mode(&self) -> std::sync::MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this is an external cluster (not devcluster started by the test).
    pub fn external(&self) -> bool {
        self.external
    }

    /// A wait of `secs` on devcluster; on an external cluster at least [`Target::timeout`]
    /// (a real control plane, pods scheduled and started by a node, is slower).
    pub fn secs(&self, secs: u64) -> u64 {
        if self.external() {
            secs.max(self.timeout)
        } else {
            secs
        }
    }

    /// Fails unless the relay pods share this machine's network, as the tests that run
    /// their peers (sink MX, Knot) on 127.0.0.1 and reach the relays at their pod IPs need.
    pub fn require_pods_on_this_machine(&self) {
        if self.external() {
            assert!(
                std::env::var("MAILFLEET_E2E_REACH").is_ok_and(|r| r == "pod-ip"),
                "this test needs pods on this machine's network, reached at their pod IPs \
                 (MAILFLEET_E2E_REACH=pod-ip, as hack/e2e-kube.sh sets): its relays deliver to \
                 a sink and ask Knot on 127.0.0.1"
            );
        }
    }

    /// Whether the operator exports its traces to the receiver given to
    /// [`Target::start_traced`]. Only on devcluster: on an external cluster the chart's
    /// `operator.otlpEndpoint` is fixed when it is installed.
    pub fn exports_traces(&self) -> bool {
        matches!(&*self.mode(), Mode::Local(l) if l.otlp.is_some())
    }

    /// Writes `text` to `name` in the test's directory and `kubectl apply`s it to the
    /// test's namespace, with `extra` arguments.
    pub fn apply_text(&self, name: &str, text: &str, extra: &[&str]) -> (bool, String) {
        let path = self.root.join(name);
        std::fs::write(&path, text).unwrap();
        let mut args = vec!["apply", "-n", &self.ns, "-f", path.to_str().unwrap()];
        args.extend(extra);
        self.k.run(&args)
    }

    /// As [`Target::apply_text`], asserting it succeeds.
    pub fn apply(&self, name: &str, text: &str) -> String {
        let (ok, out) = self.apply_text(name, text, &[]);
        assert!(ok, "kubectl apply {name} failed: {out}");
        out
    }

    /// `kubectl -n NS ARGS -o json`.
    pub fn get(&self, args: &[&str]) -> Value {
        let mut a = vec!["-n", self.ns.as_str(), "get"];
        a.extend(args);
        self.k.json(&a)
    }

    /// Stops the operator: SIGKILL on devcluster; on an external cluster `kubectl delete`
    /// of the operator's pods, which waits until they are gone (their Deployment is already
    /// making new ones).
    pub fn kill_operator(&self) {
        match &mut *self.mode() {
            Mode::Local(l) => {
                if let Some(mut op) = l.operator.take() {
                    let _ = op.0.kill();
                    let _ = op.0.wait();
                }
            }
            Mode::External(e) => {
                let selector = e.selector();
                let pods = self
                    .k
                    .json(&["-n", &e.namespace, "get", "pods", "-l", &selector]);
                let names: Vec<String> = pods["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
                    .collect();
                assert!(
                    !names.is_empty(),
                    "no operator pod ({selector}) in namespace {}",
                    e.namespace
                );
                self.k.ok(&[
                    "-n",
                    &e.namespace,
                    "delete",
                    "pod",
                    "-l",
                    &selector,
                    &format!("--timeout={}s", self.timeout),
                ]);
                e.deleted.extend(names);
            }
        }
    }

    /// Starts the operator again after [`Target::kill_operator`]: a new process on
    /// devcluster; on an external cluster, waits until a new pod of the Deployment is Ready
    /// and holds the leader Lease.
    pub fn start_operator(&self) {
        match &mut *self.mode() {
            Mode::Local(l) => l.start_operator(),
            Mode::External(e) => {
                let k = &self.k;
                let selector = e.selector();
                let what = format!(
                    "a new operator pod ({selector}) Ready and holding the leader Lease in {}",
                    e.namespace
                );
                eventually(self.timeout, &what, || {
                    let lease = k.run(&[
                        "-n",
                        &e.namespace,
                        "get",
                        "lease",
                        mailfleet_operator::LEASE_NAME,
                        "-o",
                        "jsonpath={.spec.holderIdentity}",
                    ]);
                    let holder = lease.1.trim().to_string();
                    let pods = k.json(&["-n", &e.namespace, "get", "pods", "-l", &selector]);
                    pods["items"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| {
                            let name = p["metadata"]["name"].as_str().unwrap_or_default();
                            lease.0
                                && name == holder
                                && !e.deleted.iter().any(|d| d == name)
                                && p["metadata"]["deletionTimestamp"].is_null()
                                && super::condition(p, "Ready")
                        })
                        .then_some(())
                });
            }
        }
    }

    /// Kills the operator and starts it again.
    pub fn restart_operator(&self) {
        self.kill_operator();
        self.start_operator();
    }

    /// The operator's log so far (for failure messages): its process's on devcluster; on an
    /// external cluster the end of each operator pod's log, when `MAILFLEET_KUBE_DIR` names
    /// the node agent's directory.
    pub fn operator_log(&self) -> String {
        match &*self.mode() {
            Mode::Local(l) => std::fs::read_to_string(&l.log).unwrap_or_default(),
            Mode::External(e) => {
                let Some(dir) = std::env::var_os("MAILFLEET_KUBE_DIR") else {
                    return "(set MAILFLEET_KUBE_DIR to see the operator's log)".to_string();
                };
                let pods = Path::new(&dir).join("node/pods");
                let mut files: Vec<PathBuf> = std::fs::read_dir(&pods)
                    .map(|rd| rd.flatten().map(|e| e.path()).collect())
                    .unwrap_or_default();
                files.retain(|p| {
                    let name = p.file_name().unwrap_or_default().to_string_lossy();
                    name.starts_with(&format!("{}_{}-", e.namespace, e.release))
                        && name.ends_with("_operator.log")
                });
                files.sort();
                let mut out = String::new();
                for f in files {
                    let text = std::fs::read_to_string(&f).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    out.push_str(&format!("== {} (last 200 lines)\n", f.display()));
                    for l in &lines[lines.len().saturating_sub(200)..] {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
                out
            }
        }
    }
}

impl Local {
    fn start_operator(&mut self) {
        self.started += 1;
        let dc = self.dc.as_ref().unwrap();
        self.operator = Some(operator_process(
            &dc.kubeconfig,
            &self.log,
            self.coordinator,
            self.health,
            &format!("op-{}", self.started),
            self.otlp,
        ));
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        match self.mode.get_mut().unwrap_or_else(|e| e.into_inner()) {
            Mode::Local(l) => {
                drop(l.operator.take());
                if let Some(dc) = l.dc.take() {
                    self.rt.block_on(dc.shutdown());
                }
            }
            Mode::External(_) => {
                if std::thread::panicking()
                    && std::env::var("MAILFLEET_E2E_KEEP").is_ok_and(|k| k == "1")
                {
                    eprintln!("kept namespace {} (MAILFLEET_E2E_KEEP=1)", self.ns);
                    return;
                }
                // The test's resources go first, while the namespace still takes writes, so
                // that the operator is done with them (finalizers run) before the namespace
                // terminates. Deleted with the namespace right away, a pool's last reconciles
                // are refused (403 from the NamespaceLifecycle admission plugin: "unable to
                // create new content in namespace ... because it is being terminated"), which
                // the audit-log RBAC check of real_cluster.rs counts against the chart.
                let _ = self.k.run(&[
                    "-n",
                    &self.ns,
                    "delete",
                    "relaypools.mailfleet.dev,sendingdomains.mailfleet.dev,warmupplans.mailfleet.dev",
                    "--all",
                    "--timeout=60s",
                ]);
                let _ = self
                    .k
                    .run(&["delete", "namespace", &self.ns, "--wait=false"]);
            }
        }
    }
}
