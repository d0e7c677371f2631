//! What the end-to-end tests share: the cluster under test ([`Target`]: devcluster with the
//! operator as a process, or an external cluster where the chart runs it), `kubectl`, an OTLP
//! trace receiver, and waiting for a condition.
#![allow(dead_code)]

mod target;
mod traces;

// Each test uses what it needs of these.
#[allow(unused_imports)]
pub use target::Target;
#[allow(unused_imports)]
pub use traces::{Span, Traces};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{TSIG, repo_root, require};

pub fn kubectl_bin() -> PathBuf {
    std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| {
            let local = repo_root().join("bin/kubectl");
            if local.is_file() {
                local
            } else {
                require("kubectl")
            }
        })
}

pub struct Kubectl {
    pub kubeconfig: PathBuf,
    pub home: PathBuf,
}

impl Kubectl {
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(kubectl_bin())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .args(args)
            .output()
            .unwrap();
        crate::common::outcome(&out)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.run(args);
        assert!(ok, "kubectl {args:?} failed: {out}");
        out
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
}

pub fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn condition(pool: &Value, type_: &str) -> bool {
    pool["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == type_ && c["status"] == "True")
    })
}

/// address → pod, from the pool's status; asserts each address is listed once.
pub fn assignment(pool: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for a in pool["status"]["addresses"].as_array().unwrap() {
        let address = a["address"].as_str().unwrap().to_string();
        let pod = a["pod"].as_str().unwrap_or_default().to_string();
        assert!(
            out.insert(address.clone(), pod).is_none(),
            "{address} listed twice"
        );
    }
    out
}

pub fn pod_ip(k: &Kubectl, namespace: &str, pod: &str) -> String {
    eventually(30, "a pod IP", || {
        let p = k.json(&["-n", namespace, "get", "pod", pod]);
        p["status"]["podIP"].as_str().map(str::to_string)
    })
}

/// examples/warmupplan.yaml without its namespace, to apply in a test's own namespace.
pub fn example_plan() -> String {
    std::fs::read_to_string(repo_root().join("examples/warmupplan.yaml"))
        .unwrap()
        .replace("  namespace: mail\n", "")
}

/// The Secret `dns-tsig` in `ns` with the TSIG secret Knot accepts updates with
/// (hmac-sha256:update-key:<secret>), for SendingDomains publishing into Knot.
pub fn create_tsig_secret(k: &Kubectl, ns: &str) {
    let secret = TSIG.rsplit(':').next().unwrap();
    k.ok(&[
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "dns-tsig",
        &format!("--from-literal=secret={secret}"),
    ]);
}
