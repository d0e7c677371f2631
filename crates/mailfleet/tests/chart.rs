//! The Helm chart lints, renders and validates offline, and its defaults keep the security
//! promises: non-root, read-only root filesystem, no privilege escalation, least-privilege
//! RBAC.
//!
//! Uses the real `helm` (env `HELM`, else `bin/helm` of the repository, else PATH) and the
//! PyPI package kubernetes-validate (env `KUBERNETES_VALIDATE`, else `.venv/bin`, else PATH);
//! `hack/install-test-deps.sh` installs both.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tool(env: &str, local: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let candidate = repo().join(local);
    if candidate.exists() {
        return candidate;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!("{name} not found: set {env}, or run hack/install-test-deps.sh to install it")
    })
}

fn helm() -> PathBuf {
    tool("HELM", "bin/helm", "helm")
}

fn chart() -> PathBuf {
    repo().join("charts/mailfleet")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn render(extra: &[&str]) -> String {
    let chart = chart();
    let mut cmd = Command::new(helm());
    cmd.args([
        "template",
        "mf",
        chart.to_str().unwrap(),
        "-n",
        "mail",
        "--include-crds",
    ]);
    cmd.args(extra);
    let (ok, text) = run(&mut cmd);
    assert!(ok, "helm template {extra:?} failed:\n{text}");
    text
}

fn docs(rendered: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(rendered)
        .filter_map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).unwrap();
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn validate_offline(rendered: &str, dir: &Path) {
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, rendered).unwrap();
    let kv = tool(
        "KUBERNETES_VALIDATE",
        ".venv/bin/kubernetes-validate",
        "kubernetes-validate",
    );
    let (ok, text) = run(Command::new(kv)
        .args(["--strict", "-k", "1.34.0"])
        .arg(&file));
    assert!(
        ok,
        "kubernetes-validate refused the rendered chart:\n{text}"
    );
    assert!(!text.contains("ERROR") && !text.contains("FAIL"), "{text}");
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mailfleet-chart-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn chart_lints_strictly() {
    let (ok, text) = run(Command::new(helm()).args(["lint", "--strict"]).arg(chart()));
    assert!(ok, "helm lint --strict failed:\n{text}");
    assert!(text.contains("0 chart(s) failed"), "{text}");
}

#[test]
fn default_render_validates_and_has_every_object() {
    let rendered = render(&[]);
    validate_offline(&rendered, &tempdir("default"));
    let kinds: Vec<String> = docs(&rendered)
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    for expected in [
        "CustomResourceDefinition/relaypools.mailfleet.dev",
        "CustomResourceDefinition/sendingdomains.mailfleet.dev",
        "CustomResourceDefinition/warmupplans.mailfleet.dev",
        "Deployment/mf-mailfleet",
        "ServiceAccount/mf-mailfleet",
        "ClusterRole/mf-mailfleet",
        "ClusterRoleBinding/mf-mailfleet",
        "Role/mf-mailfleet-leader-election",
        "RoleBinding/mf-mailfleet-leader-election",
        "Service/mf-mailfleet-coordinator",
        "PodDisruptionBudget/mf-mailfleet",
    ] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "{expected} missing from {kinds:#?}"
        );
    }
}

#[test]
fn variants_render_and_validate() {
    for (name, args) in [
        (
            "single",
            vec![
                "--set",
                "replicaCount=1",
                "--set",
                "operator.leaderElection.enabled=false",
            ],
        ),
        (
            "namespaces",
            vec!["--set", "operator.watchNamespaces={mail,billing}"],
        ),
        (
            "otlp",
            vec![
                "--set",
                "operator.otlpEndpoint=http://otel:4317",
                "--set",
                "image.tag=v9",
            ],
        ),
    ] {
        let rendered = render(&args);
        validate_offline(&rendered, &tempdir(name));
        if name == "single" {
            let all = docs(&rendered);
            assert!(
                !all.iter().any(|d| d["kind"] == "PodDisruptionBudget"),
                "no PDB for one replica"
            );
            assert!(
                !all.iter().any(|d| d["kind"] == "Role"),
                "no lease Role without leader election"
            );
        }
        if name == "namespaces" {
            assert!(
                rendered.contains("--watch-namespace=mail")
                    && rendered.contains("--watch-namespace=billing")
            );
        }
        if name == "otlp" {
            assert!(rendered.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && rendered.contains(":v9\""));
        }
    }
}

#[test]
fn operator_runs_unprivileged_with_probes() {
    let all = docs(&render(&[]));
    let deploy = all.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(
        deploy["spec"]["replicas"], 2,
        "two replicas with leader election"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["args"][0], "operator");
}

#[test]
fn rbac_is_least_privilege() {
    let all = docs(&render(&[]));
    for role in all
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in role["rules"].as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                for v in rule[field].as_array().unwrap() {
                    assert_ne!(v, "*", "wildcard {field} in {rule}");
                }
            }
            for verb in rule["verbs"].as_array().unwrap() {
                assert!(
                    !["escalate", "bind", "impersonate", "deletecollection"]
                        .contains(&verb.as_str().unwrap()),
                    "dangerous verb {verb} in {rule}"
                );
            }
        }
    }
    let cluster_role = all.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let rules = cluster_role["rules"].as_array().unwrap();
    let pods = rules
        .iter()
        .find(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "pods")
        })
        .unwrap();
    assert_eq!(
        pods["verbs"],
        serde_json::json!(["get", "list", "watch"]),
        "pods are read-only"
    );
    assert!(
        !rules.iter().any(|r| r["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "leases")),
        "leases belong to the namespaced Role only"
    );
}

#[test]
fn values_schema_refuses_bad_values() {
    let chart = chart();
    for (args, expected) in [
        (vec!["--set", "replicaCount=0"], "replicaCount"),
        (
            vec!["--set", "podSecurityContext.runAsNonRoot=false"],
            "runAsNonRoot",
        ),
        (vec!["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (vec!["--set", "coordinator.port=80"], "port"),
        (vec!["--set", "unknownKey=1"], "unknownKey"),
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["template", "mf", chart.to_str().unwrap()])
            .args(&args);
        let (ok, text) = run(&mut cmd);
        assert!(!ok, "helm accepted {args:?}");
        assert!(
            text.contains(expected),
            "error for {args:?} should name {expected}: {text}"
        );
    }
}
