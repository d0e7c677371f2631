//! Shared test harness: start a devcluster in a temp dir and drive it with the real `kubectl`
//! and `helm` binaries (found via $KUBECTL / $HELM, then PATH, then the repo's `bin/` where
//! `hack/install-test-deps.sh` puts them). Missing binaries fail the test with a clear message.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mailfleet_devcluster::{Config, DevCluster, RunnerConfig};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Find a client binary: `$ENV`, then PATH, then `<repo>/bin`.
pub fn tool(name: &str, env: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        let p = PathBuf::from(path);
        assert!(
            p.is_file(),
            "${env} points at {}, which does not exist",
            p.display()
        );
        return p;
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(repo_root().join("bin"));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` not found: these tests drive the real {name} binary. Set ${env} to it, put it on \
         PATH, or run `bash hack/install-test-deps.sh` (installs kubectl and helm into bin/)."
    );
}

pub struct Cluster {
    pub rt: tokio::runtime::Runtime,
    pub dc: Option<DevCluster>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> Cluster {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path().join("cluster"));
        tweak(&mut config);
        let dc = rt.block_on(DevCluster::start(config)).unwrap();
        Cluster {
            rt,
            dc: Some(dc),
            dir,
        }
    }

    pub fn with_runner(runner: RunnerConfig) -> Cluster {
        Self::start_with(|c| c.runner = Some(runner))
    }

    pub fn dc(&self) -> &DevCluster {
        self.dc.as_ref().unwrap()
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.dc().kubeconfig
    }

    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(tool("kubectl", "KUBECTL"));
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .args(args);
        cmd
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args).output().unwrap()
    }

    /// Run kubectl, assert success, return stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run kubectl, assert failure, return stderr.
    pub fn kubectl_err(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            !out.status.success(),
            "kubectl {args:?} should have failed:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Run kubectl with YAML on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .kubectl_cmd(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Run kubectl with YAML on stdin, assert success, return stdout.
    pub fn kubectl_stdin_ok(&self, args: &[&str], input: &str) -> String {
        let out = self.kubectl_stdin(args, input);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn helm(&self, args: &[&str]) -> Output {
        Command::new(tool("helm", "HELM"))
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .env("HELM_CACHE_HOME", self.dir.path().join("helm-cache"))
            .env("HELM_CONFIG_HOME", self.dir.path().join("helm-config"))
            .env("HELM_DATA_HOME", self.dir.path().join("helm-data"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Poll `check` until it returns Some, or fail after `what` did not happen in 60 s.
    pub fn eventually<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for: {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(dc) = self.dc.take() {
            self.rt.block_on(dc.shutdown());
        }
    }
}
