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
            let roles: Vec<&Value> = all.iter().filter(|d| d["kind"] == "Role").collect();
            assert!(
                roles.iter().all(|r| !r.to_string().contains("leases")),
                "no lease Role without leader election"
            );
            // The single replica still labels its pod as the leader for the Service.
            assert!(
                roles.iter().any(|r| r["rules"][0]["resources"][0] == "pods"
                    && r["rules"][0]["verbs"].to_string().contains("patch")),
                "the leader-label Role is missing"
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

/// Every `.rs` file under `dir`, recursively.
fn rust_sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {dir:?}: {e}")) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The identifier-like words (`[a-z0-9_]+`) of `text` that start with `prefix`, where the
/// prefix begins a word.
fn words_with_prefix(text: &str, prefix: &str) -> Vec<String> {
    let is_word = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(prefix) {
        let start = from + i;
        from = start + prefix.len();
        if text[..start].chars().next_back().is_some_and(is_word) {
            continue;
        }
        let end = text[from..]
            .find(|c: char| !is_word(c))
            .map_or(text.len(), |n| from + n);
        out.push(text[start..end].to_string());
        from = end;
    }
    out
}

/// The metric names the relay and the operator export, read from their sources (comments
/// left out): every `mailfleet_...` word, and the operator's `PREFIX` joined to the names its
/// `Metrics` is called with (`count("reconciles_total", ...)`, `set_gauges("warmup_stage", ...)`:
/// every method of crates/operator/src/metrics.rs whose first parameter is `name: &str`) or
/// that it renders itself (`{PREFIX}leader`).
fn exported_metric_names() -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let operator_metrics =
        std::fs::read_to_string(repo().join("crates/operator/src/metrics.rs")).unwrap();
    let prefix = operator_metrics
        .split("const PREFIX: &str = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("crates/operator/src/metrics.rs defines const PREFIX")
        .to_string();
    let squeezed: String = operator_metrics
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let methods: Vec<String> = squeezed
        .split("pubfn")
        .skip(1)
        .filter_map(|rest| {
            let (name, params) = rest.split_once('(')?;
            params
                .starts_with("&self,name:&str")
                .then(|| format!(".{name}("))
        })
        .collect();
    assert!(
        methods.iter().any(|m| m == ".count("),
        "no naming method found in crates/operator/src/metrics.rs"
    );
    for crate_dir in ["crates/relay/src", "crates/operator/src"] {
        for file in rust_sources(&repo().join(crate_dir)) {
            let code: String = std::fs::read_to_string(&file)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            names.extend(words_with_prefix(&code, "mailfleet_"));
            if crate_dir != "crates/operator/src" {
                continue;
            }
            for name in words_with_prefix(&code, "{PREFIX}") {
                names.insert(format!("{prefix}{}", &name["{PREFIX}".len()..]));
            }
            for method in &methods {
                for (i, _) in code.match_indices(method.as_str()) {
                    let rest = code[i + method.len()..].trim_start();
                    if let Some(lit) = rest.strip_prefix('"')
                        && let Some(end) = lit.find('"')
                    {
                        names.insert(format!("{prefix}{}", &lit[..end]));
                    }
                }
            }
        }
    }
    names
}

/// Every PromQL expression of a Grafana dashboard (panels, rows' panels, variables).
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains("mailfleet_") => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

#[test]
fn scanning_the_sources_finds_the_metrics() {
    // The scanner itself: the names both components document must come out of it, and a made
    // up one must not, so the dashboard check below can fail.
    let names = exported_metric_names();
    for expected in [
        "mailfleet_relay_deliveries_total",
        "mailfleet_relay_queued_messages",
        "mailfleet_relay_accepted_total",
        "mailfleet_operator_reconciles_total",
        "mailfleet_operator_reconcile_errors_total",
        "mailfleet_operator_reconcile_duration_seconds",
        "mailfleet_operator_coordinator_reports_total",
        "mailfleet_operator_coordinator_registrations_total",
        "mailfleet_operator_coordinator_connected_relays",
        "mailfleet_operator_leader",
        "mailfleet_operator_warmup_stage",
        "mailfleet_operator_warmup_addresses",
        "mailfleet_operator_warmup_decisions_total",
    ] {
        assert!(
            names.contains(expected),
            "{expected} not found in {names:#?}"
        );
    }
    assert!(!names.contains("mailfleet_relay_delivered_total"));
    assert_eq!(
        words_with_prefix(
            "x mailfleet_a_b{c} (mailfleet_d[5m]) notmailfleet_e",
            "mailfleet_"
        ),
        ["mailfleet_a_b", "mailfleet_d"]
    );
    // What the relay really renders is found by the scan.
    let m = mailfleet_relay::metrics::Metrics::default();
    m.refused("not_allowed");
    for line in m.render().lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(
            names.contains(name),
            "the relay renders {name}, the scan missed it"
        );
    }
}

#[test]
fn grafana_dashboard_renders_and_queries_only_exported_metrics() {
    assert!(
        !docs(&render(&[])).iter().any(|d| d["kind"] == "ConfigMap"),
        "the dashboard is off by default"
    );
    let rendered = render(&["--set", "grafana.dashboard.enabled=true"]);
    validate_offline(&rendered, &tempdir("dashboard"));
    let all = docs(&rendered);
    let cm = all
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("a ConfigMap labelled grafana_dashboard: \"1\"");
    let json = cm["data"]["mailfleet.json"]
        .as_str()
        .expect("the ConfigMap carries mailfleet.json");
    let dashboard: Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("dashboard JSON: {e}"));
    assert_eq!(dashboard["uid"], "mailfleet");

    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "too few queries: {exprs:#?}");
    let exported = exported_metric_names();
    let known = |name: &str| {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| exported.contains(*b));
        exported.contains(name) || base.is_some()
    };
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        let names = words_with_prefix(expr, "mailfleet_");
        assert!(
            !names.is_empty(),
            "query without a mailfleet metric: {expr}"
        );
        for name in names {
            assert!(
                known(&name),
                "the dashboard queries {name}, which neither the relay nor the operator exports \
                 (crates/relay/src, crates/operator/src): {expr}"
            );
            used.insert(name);
        }
    }
    // The panels the dashboard promises: warm-up, outcomes per provider, queue depth,
    // reconciles and errors, connected relays.
    for needed in [
        "mailfleet_operator_warmup_stage",
        "mailfleet_operator_warmup_addresses",
        "mailfleet_relay_deliveries_total",
        "mailfleet_relay_queued_messages",
        "mailfleet_operator_reconciles_total",
        "mailfleet_operator_reconcile_errors_total",
        "mailfleet_operator_coordinator_connected_relays",
    ] {
        assert!(used.contains(needed), "no panel queries {needed}");
    }
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("mailfleet_relay_deliveries_total") && e.contains("provider")),
        "delivery outcomes are shown per provider group"
    );
}

#[test]
fn monitors_scrape_the_operator_and_the_relay_pods() {
    let all = docs(&render(&["--set", "metrics.serviceMonitor.enabled=true"]));
    let sm = all.iter().find(|d| d["kind"] == "ServiceMonitor").unwrap();
    let svc = all
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "mf-mailfleet-coordinator")
        .unwrap();
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "ServiceMonitor must select the Service"
        );
    }
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    // The PodMonitor selects relay pods by the label the operator gives them.
    let pm = all.iter().find(|d| d["kind"] == "PodMonitor").unwrap();
    let pool: mailfleet_api::relaypool::RelayPool = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("examples/relaypool.yaml")).unwrap(),
    )
    .unwrap();
    let labels = mailfleet_operator::children::selector_labels(&pool);
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            labels.get(k).map(String::as_str),
            v.as_str(),
            "PodMonitor label {k} is not on relay pods: {labels:?}"
        );
    }
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert!(
        !docs(&render(&[]))
            .iter()
            .any(|d| d["kind"] == "ServiceMonitor" || d["kind"] == "PodMonitor"),
        "monitors are off by default"
    );
}

#[test]
fn operator_and_relays_run_the_dockerfile_image() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/mailfleet\"]"));
    assert!(dockerfile.contains("cargo build --release --locked -p mailfleet"));
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image names its user");
    let all = docs(&render(&[]));
    let deploy = all.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(
        user.trim(),
        format!(
            "{}:{}",
            pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
        ),
        "the chart runs the image's own user"
    );
    let c = &pod["containers"][0];
    let image = c["image"].as_str().unwrap();
    assert_eq!(
        image, "ghcr.io/mailfleet/mailfleet:0.1.0",
        "appVersion is the tag"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&format!("--relay-image={image}").as_str()),
        "relays default to the operator's image: {args:?}"
    );
    let all = docs(&render(&[
        "--set",
        "image.repository=mailfleet",
        "--set",
        "image.tag=e2e",
        "--set",
        "relay.image=registry.example/relay:2",
    ]));
    let deploy = all.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "mailfleet:e2e");
    assert!(
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--relay-image=registry.example/relay:2")
    );
}

#[test]
fn metrics_doc_lists_exactly_the_exported_metrics() {
    let exported: std::collections::BTreeSet<String> = exported_metric_names()
        .into_iter()
        .filter(|n| {
            ["mailfleet_relay_", "mailfleet_operator_"]
                .iter()
                .any(|p| n.len() > p.len() && n.starts_with(p))
                && !n.ends_with("_bucket")
        })
        .collect();
    let doc = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = doc
        .split('`')
        .filter(|w| {
            (w.starts_with("mailfleet_relay_") || w.starts_with("mailfleet_operator_"))
                && w.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = exported.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&exported).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/metrics.md is out of step with the code: not documented {missing:?}, \
         documented but not exported {stale:?}"
    );
}
