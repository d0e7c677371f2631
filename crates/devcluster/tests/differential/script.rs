//! The script: what kubectl (1.27 and current) and Helm do against each server.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::repo_root;
use crate::real::Client;

/// What the step must do on the real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Success,
    Failure,
}

pub struct Step {
    pub client: Client,
    pub args: Vec<String>,
    pub stdin: Option<String>,
    pub expect: Expect,
    /// Table output: ages and column padding are normalized.
    pub table: bool,
    /// Picks what is compared out of stdout (before normalizing).
    pub filter: Option<fn(&str) -> String>,
}

impl Step {
    /// The command line as a person would type it.
    pub fn command(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                if a.contains(' ') || a.contains('{') {
                    format!("'{a}'")
                } else {
                    a.clone()
                }
            })
            .collect();
        let stdin = if self.stdin.is_some() { " < input" } else { "" };
        format!("{} {}{stdin}", self.client.name(), args.join(" "))
    }
}

struct Script {
    client: Client,
    steps: Vec<Step>,
}

impl Script {
    fn push(&mut self, expect: Expect, table: bool, args: &[&str], stdin: Option<String>) {
        self.steps.push(Step {
            client: self.client,
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin,
            expect,
            table,
            filter: None,
        });
    }
    fn filtered(&mut self, args: &[&str], filter: fn(&str) -> String) {
        self.ok(args);
        if let Some(step) = self.steps.last_mut() {
            step.filter = Some(filter);
        }
    }
    fn ok(&mut self, args: &[&str]) {
        self.push(Expect::Success, false, args, None);
    }
    fn table(&mut self, args: &[&str]) {
        self.push(Expect::Success, true, args, None);
    }
    fn ok_in(&mut self, args: &[&str], input: String) {
        self.push(Expect::Success, false, args, Some(input));
    }
    fn fails(&mut self, args: &[&str]) {
        self.push(Expect::Failure, false, args, None);
    }
    fn fails_in(&mut self, args: &[&str], input: String) {
        self.push(Expect::Failure, false, args, Some(input));
    }
}

/// The documents of examples/*.yaml, moved into `ns`.
fn examples(ns: &str) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v.is_object() {
                v["metadata"]["namespace"] = json!(ns);
                docs.push(v);
            }
        }
    }
    docs
}

fn yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

fn pool(ns: &str) -> Value {
    examples(ns)
        .into_iter()
        .find(|d| d["kind"] == "RelayPool")
        .expect("examples/ has a RelayPool")
}

/// One kubectl's run, in its own namespace.
fn kubectl(client: Client, ns: &str) -> Vec<Step> {
    let mut s = Script {
        client,
        steps: Vec::new(),
    };
    let crds = repo_root().join("crds").display().to_string();
    let all = yaml(&examples(ns));
    let p = pool(ns);
    let name = p["metadata"]["name"].as_str().unwrap().to_string();
    let kinds = "relaypools,sendingdomains,warmupplans";

    s.ok(&["create", "namespace", ns]);
    s.ok(&["apply", "-f", &crds]);
    s.ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/relaypools.mailfleet.dev",
        "crd/sendingdomains.mailfleet.dev",
        "crd/warmupplans.mailfleet.dev",
    ]);
    // Client-side apply (kubectl 1.27 reads /openapi/v2 for it), then the objects as stored.
    s.ok_in(&["apply", "-f", "-"], all.clone());
    s.ok(&["get", kinds, "-n", ns, "-o", "yaml"]);
    s.table(&["get", kinds, "-n", ns]);
    s.ok(&["explain", "relaypool.spec.egress"]);
    s.ok(&["explain", "relaypool"]);
    s.ok(&["explain", "relaypool.metadata.labels"]);
    if client == Client::Kubectl127 {
        s.ok(&[
            "explain",
            "--output=plaintext-openapiv2",
            "relaypool.spec.egress",
        ]);
        // The custom resources' v2 definitions (CRD schemas converted) and v3 schemas.
        s.filtered(&["get", "--raw", "/openapi/v2"], |doc| {
            mailfleet_schemas(doc, "/definitions")
        });
        s.filtered(
            &["get", "--raw", "/openapi/v3/apis/mailfleet.dev/v1alpha1"],
            |doc| mailfleet_schemas(doc, "/components/schemas"),
        );
    }

    // Refusals: CEL rules (several causes), a schema error that blocks the rules, an
    // unknown field (kubectl's default is strict field validation).
    let mut cel = p.clone();
    cel["metadata"]["name"] = json!("diff-cel");
    cel["spec"]["egress"] =
        json!({"mode": "ciliumEgressGateway", "addresses": [{"address": "not-an-ip"}]});
    cel["spec"]["listener"]["allowedNetworks"] = json!(["0.0.0.0/0"]);
    s.fails_in(&["apply", "-f", "-"], yaml(&[cel]));
    let mut one = p.clone();
    one["metadata"]["name"] = json!("diff-one");
    one["spec"]["egress"] = json!({"addresses": []});
    s.fails_in(&["apply", "-f", "-"], yaml(&[one]));
    let mut blocking = p.clone();
    blocking["metadata"]["name"] = json!("diff-blocking");
    blocking["spec"]["replicas"] = json!("three");
    blocking["spec"]["egress"] = json!({"addresses": []});
    s.fails_in(&["apply", "-f", "-"], yaml(&[blocking]));
    let mut unknown = p.clone();
    unknown["metadata"]["name"] = json!("diff-unknown");
    unknown["spec"]["bogus"] = json!(1);
    s.fails_in(&["create", "-f", "-"], yaml(&[unknown]));

    // Server-side dry run changes nothing.
    let mut five = p.clone();
    five["spec"]["replicas"] = json!(5);
    s.ok_in(&["apply", "--dry-run=server", "-f", "-"], yaml(&[five]));
    let jsonpath = "jsonpath={.spec.replicas} {.metadata.generation}";
    s.ok(&["get", "relaypool", &name, "-n", ns, "-o", jsonpath]);

    // Patches of each kind, and of the status subresource.
    s.ok(&[
        "patch",
        "relaypool",
        &name,
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":4}}"#,
    ]);
    s.ok(&[
        "patch",
        "relaypool",
        &name,
        "-n",
        ns,
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":2}]"#,
    ]);
    s.fails(&[
        "patch",
        "relaypool",
        &name,
        "-n",
        ns,
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ]);
    s.ok(&[
        "patch",
        "relaypool",
        &name,
        "-n",
        ns,
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"readyReplicas":1}}"#,
    ]);
    s.ok(&["get", "relaypool", &name, "-n", ns, "-o", jsonpath]);

    // Server-side apply: a conflict with the patch's manager, then forced.
    let mut six = p.clone();
    six["spec"]["replicas"] = json!(6);
    s.fails_in(&["apply", "--server-side", "-f", "-"], yaml(&[six.clone()]));
    s.ok_in(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        yaml(&[six]),
    );
    s.ok(&[
        "get",
        "relaypool",
        &name,
        "-n",
        ns,
        "-o",
        "yaml",
        "--show-managed-fields",
    ]);

    // generateName.
    let generated = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"generateName": "diff-gen-", "namespace": ns}, "data": {"a": "b"}});
    s.ok_in(&["create", "-f", "-"], yaml(&[generated]));

    s.ok_in(&["delete", "-f", "-"], all);
    s.ok(&["get", kinds, "-n", ns]);
    s.steps
}

/// The `dev.mailfleet.*` schemas of an OpenAPI document (under `at`), pretty-printed.
fn mailfleet_schemas(doc: &str, at: &str) -> String {
    let Ok(doc) = serde_json::from_str::<Value>(doc) else {
        return format!("not JSON: {doc}");
    };
    let picked: serde_json::Map<String, Value> = doc
        .pointer(at)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("dev.mailfleet."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::to_string_pretty(&picked).unwrap()
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Helm: install, upgrade, list, get, history, uninstall of a tiny chart.
fn helm(work: &Path, ns: &str) -> Vec<Step> {
    let chart = work.join("chart");
    write(
        &chart,
        "Chart.yaml",
        "apiVersion: v2\nname: diff\nversion: 0.1.0\nappVersion: \"1.0\"\n",
    );
    write(&chart, "values.yaml", "greeting: hello\n");
    write(
        &chart,
        "templates/config.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\n\
         \x20 labels: {app.kubernetes.io/managed-by: {{ .Release.Service }}}\n\
         data:\n  greeting: {{ .Values.greeting | quote }}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {{ .Release.Name }}\n\
         \x20 labels: {app.kubernetes.io/managed-by: {{ .Release.Service }}}\n",
    );
    let chart = chart.display().to_string();
    let mut s = Script {
        client: Client::Helm,
        steps: Vec::new(),
    };
    s.ok(&["install", "diff", &chart, "-n", ns, "--create-namespace"]);
    s.ok(&["upgrade", "diff", &chart, "-n", ns, "--set", "greeting=bye"]);
    s.table(&["list", "-n", ns]);
    s.ok(&["get", "values", "diff", "-n", ns]);
    s.ok(&["get", "manifest", "diff", "-n", ns]);
    s.table(&["history", "diff", "-n", ns]);
    // What the release made (its own objects and Helm's release Secrets), then after the
    // uninstall. The namespace's kube-root-ca.crt ConfigMap is left out: devcluster has none.
    let mut k = Script {
        client: Client::Kubectl,
        steps: Vec::new(),
    };
    let helm_made = "app.kubernetes.io/managed-by=Helm";
    k.table(&[
        "get",
        "configmaps,serviceaccounts",
        "-n",
        ns,
        "-l",
        helm_made,
    ]);
    k.table(&["get", "secrets", "-n", ns, "-l", "owner=helm"]);
    s.steps.append(&mut k.steps);
    s.ok(&["uninstall", "diff", "-n", ns]);
    s.table(&["list", "-n", ns]);
    k.table(&[
        "get",
        "configmaps,serviceaccounts,secrets",
        "-n",
        ns,
        "-l",
        helm_made,
    ]);
    k.table(&["get", "secrets", "-n", ns, "-l", "owner=helm"]);
    s.steps.append(&mut k.steps);
    s.steps
}

/// The whole script, in the order it runs on each server.
pub fn steps(work: &Path) -> Vec<Step> {
    let mut steps = kubectl(Client::Kubectl127, "diff-kubectl-127");
    steps.extend(kubectl(Client::Kubectl, "diff-kubectl"));
    steps.extend(helm(work, "diff-helm"));
    steps
}
