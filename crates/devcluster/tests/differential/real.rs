//! The two servers under comparison, and running a client against one of them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::{repo_root, tool};

/// A real control plane from `hack/kube-up`, started in the background; dropping it stops
/// it and removes its directory (`hack/kube-down --purge`), also when the test fails.
pub struct RealCluster {
    dir: PathBuf,
    starting: Option<Child>,
}

impl RealCluster {
    /// Starts `hack/kube-up --dir DIR` without waiting for it; [`RealCluster::ready`] waits.
    pub fn spawn(dir: &Path) -> RealCluster {
        let kubecp = repo_root().join("bin/kubecp");
        assert!(
            kubecp.is_file() || std::env::var_os("KUBECP").is_some(),
            "{} is missing: the differential test compares devcluster with a real \
             kube-apiserver. Build it with `bash hack/kube-build.sh` (needs Go; hack/test.sh \
             does this before the tests).",
            kubecp.display()
        );
        let child = Command::new("bash")
            .arg(repo_root().join("hack/kube-up"))
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run bash hack/kube-up");
        RealCluster {
            dir: dir.to_path_buf(),
            starting: Some(child),
        }
    }

    /// Waits until kube-up has finished; returns the admin kubeconfig.
    pub fn ready(&mut self) -> PathBuf {
        if let Some(child) = self.starting.take() {
            let out = child.wait_with_output().expect("wait for hack/kube-up");
            assert!(
                out.status.success(),
                "hack/kube-up failed:\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.dir.join("kubeconfig")
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.starting.take() {
            let _ = child.wait();
        }
        if self.dir.exists() {
            let _ = Command::new("bash")
                .arg(repo_root().join("hack/kube-down"))
                .arg("--purge")
                .arg(&self.dir)
                .status();
        }
    }
}

/// The clients the script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// `bin/kubectl-1.27` (`$KUBECTL_1_27`): reads `/openapi/v2`.
    Kubectl127,
    /// The current `kubectl` (`$KUBECTL`).
    Kubectl,
    /// `helm` (`$HELM`).
    Helm,
}

impl Client {
    pub fn name(self) -> &'static str {
        match self {
            Client::Kubectl127 => "kubectl-1.27",
            Client::Kubectl => "kubectl",
            Client::Helm => "helm",
        }
    }

    fn program(self) -> PathBuf {
        match self {
            Client::Kubectl127 => tool("kubectl-1.27", "KUBECTL_1_27"),
            Client::Kubectl => tool("kubectl", "KUBECTL"),
            Client::Helm => tool("helm", "HELM"),
        }
    }
}

/// One server the script runs against: its kubeconfig and a home directory for the
/// clients' caches (one per client, so that kubectl versions do not share discovery).
pub struct Target {
    pub name: &'static str,
    pub kubeconfig: PathBuf,
    pub home: PathBuf,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Target {
    pub fn run(&self, client: Client, args: &[String], stdin: Option<&str>) -> Outcome {
        let home = self.home.join(client.name());
        let mut cmd = Command::new(client.program());
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &home)
            .env_remove("KUBECTL_EXPLAIN_OPENAPIV3")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if client == Client::Helm {
            cmd.env("HELM_CACHE_HOME", home.join("cache"))
                .env("HELM_CONFIG_HOME", home.join("config"))
                .env("HELM_DATA_HOME", home.join("data"));
        } else {
            // A hung request fails the step instead of the whole test run.
            cmd.arg("--request-timeout=30s");
        }
        let mut child = cmd.args(args).spawn().expect("start the client");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin is piped")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        let out = child.wait_with_output().expect("wait for the client");
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}
