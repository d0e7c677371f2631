//! The real `helm` against devcluster: install (CRDs first, then templates, with the release
//! stored in a Secret), upgrade, list, uninstall. Also installs the repo's charts/mailfleet
//! once it exists.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::{Cluster, repo_root};
use mailfleet_devcluster::RunnerConfig;

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn demo_chart(root: &Path) {
    write(
        root,
        "Chart.yaml",
        "apiVersion: v2\nname: demo\nversion: 0.1.0\nappVersion: \"1.0\"\n",
    );
    write(root, "values.yaml", "replicas: 1\ngreeting: hello\n");
    write(
        root,
        "crds/widgets.yaml",
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1, default: 3}
"#,
    );
    write(
        root,
        "templates/config.yaml",
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-config
  labels:
    app.kubernetes.io/managed-by: {{ .Release.Service }}
data:
  greeting: {{ .Values.greeting | quote }}
"#,
    );
    write(
        root,
        "templates/rbac.yaml",
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .Release.Name }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ .Release.Name }}
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ .Release.Name }}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: {{ .Release.Name }}}
subjects:
- kind: ServiceAccount
  name: {{ .Release.Name }}
  namespace: {{ .Release.Namespace }}
"#,
    );
    write(
        root,
        "templates/workload.yaml",
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}
spec:
  replicas: {{ .Values.replicas }}
  selector:
    matchLabels: {app: {{ .Release.Name }}}
  template:
    metadata:
      labels: {app: {{ .Release.Name }}}
    spec:
      serviceAccountName: {{ .Release.Name }}
      containers:
      - name: app
        image: example/app:1
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata:
  name: {{ .Release.Name }}
spec:
  selector: {app: {{ .Release.Name }}}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .Release.Name }}
spec:
  maxUnavailable: 1
  selector:
    matchLabels: {app: {{ .Release.Name }}}
---
apiVersion: example.com/v1
kind: Widget
metadata:
  name: {{ .Release.Name }}
spec: {}
"#,
    );
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn helm_install_upgrade_uninstall_a_chart_with_crds() {
    // The runner gives Deployments and PDBs the status `helm --wait` waits for.
    let c = Cluster::with_runner(RunnerConfig::default());
    let chart = c.dir.path().join("demo");
    demo_chart(&chart);
    let chart = chart.display().to_string();
    ok(
        c.helm(&[
            "install",
            "demo",
            &chart,
            "-n",
            "apps",
            "--create-namespace",
            "--wait",
            "--timeout",
            "60s",
        ]),
        "helm install",
    );
    assert_eq!(
        c.kubectl_ok(&[
            "get",
            "cm",
            "demo-config",
            "-n",
            "apps",
            "-o",
            "jsonpath={.data.greeting}"
        ])
        .trim(),
        "hello"
    );
    // The CRD from crds/ was registered, and the schema default applied to the Widget.
    assert_eq!(
        c.kubectl_ok(&[
            "get",
            "widget",
            "demo",
            "-n",
            "apps",
            "-o",
            "jsonpath={.spec.size}"
        ])
        .trim(),
        "3"
    );
    let list = ok(c.helm(&["list", "-n", "apps"]), "helm list");
    assert!(list.contains("demo") && list.contains("deployed"), "{list}");

    ok(
        c.helm(&[
            "upgrade",
            "demo",
            &chart,
            "-n",
            "apps",
            "--set",
            "greeting=bonjour",
            "--set",
            "replicas=2",
        ]),
        "helm upgrade",
    );
    assert_eq!(
        c.kubectl_ok(&[
            "get",
            "cm",
            "demo-config",
            "-n",
            "apps",
            "-o",
            "jsonpath={.data.greeting}"
        ])
        .trim(),
        "bonjour"
    );
    assert_eq!(
        c.kubectl_ok(&[
            "get",
            "deploy",
            "demo",
            "-n",
            "apps",
            "-o",
            "jsonpath={.spec.replicas}"
        ])
        .trim(),
        "2"
    );
    let history = ok(c.helm(&["history", "demo", "-n", "apps"]), "helm history");
    assert!(history.lines().count() >= 3, "{history}");

    ok(
        c.helm(&["uninstall", "demo", "-n", "apps", "--wait"]),
        "helm uninstall",
    );
    let err = c.kubectl_err(&["get", "cm", "demo-config", "-n", "apps"]);
    assert!(err.contains("not found"), "{err}");
    // CRDs from crds/ stay, as on a real cluster.
    c.kubectl_ok(&["get", "crd", "widgets.example.com"]);
}

#[test]
fn helm_installs_the_mailfleet_chart() {
    let chart = repo_root().join("charts/mailfleet");
    assert!(
        chart.join("Chart.yaml").is_file(),
        "charts/mailfleet/Chart.yaml is missing"
    );
    let c = Cluster::start();
    let chart = chart.display().to_string();
    ok(
        c.helm(&[
            "install",
            "mailfleet",
            &chart,
            "-n",
            "mailfleet-system",
            "--create-namespace",
        ]),
        "helm install charts/mailfleet",
    );
    let list = ok(c.helm(&["list", "-n", "mailfleet-system"]), "helm list");
    assert!(list.contains("deployed"), "{list}");
    c.kubectl_ok(&["get", "crd", "relaypools.mailfleet.dev"]);
    ok(
        c.helm(&["uninstall", "mailfleet", "-n", "mailfleet-system"]),
        "helm uninstall",
    );
}
