//! devcluster driven by the real `kubectl`: CRD registration, the repo's crds/ and examples/,
//! get (server-side Table), describe, patch, delete, `get -w`, validation errors, optimistic
//! concurrency, server-side apply conflicts, finalizers and garbage collection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::{Cluster, repo_root};

fn repo_path(p: &str) -> String {
    repo_root().join(p).display().to_string()
}

/// The first RelayPool of examples/ (name, namespace) and every namespace the examples use
/// other than `default`.
fn example_pool() -> (String, String, Vec<String>) {
    let mut pool = None;
    let mut namespaces = std::collections::BTreeSet::new();
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            let ns = v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            if ns != "default" {
                namespaces.insert(ns.clone());
            }
            if v["kind"] == "RelayPool" && pool.is_none() {
                pool = Some((v["metadata"]["name"].as_str().unwrap().to_string(), ns));
            }
        }
    }
    let (name, ns) = pool.expect("examples/ has a RelayPool");
    (name, ns, namespaces.into_iter().collect())
}

#[test]
fn apply_crds_and_examples_then_get_describe_patch_delete() {
    let c = Cluster::start();
    let out = c.kubectl_ok(&["apply", "-f", &repo_path("crds")]);
    assert!(out.contains("relaypools.mailfleet.dev created"), "{out}");
    let crds = c.kubectl_ok(&["get", "crds"]);
    for name in [
        "relaypools.mailfleet.dev",
        "sendingdomains.mailfleet.dev",
        "warmupplans.mailfleet.dev",
    ] {
        assert!(crds.contains(name), "{crds}");
    }
    // Applying again is a no-op that kubectl reports as unchanged.
    let again = c.kubectl_ok(&["apply", "-f", &repo_path("crds")]);
    assert!(again.contains("unchanged"), "{again}");

    // `kubectl create` sends protobuf (typed clientset); the server decodes it.
    // Names come from the examples themselves, so the test follows them when they change.
    let (pool, ns, namespaces) = example_pool();
    let (pool, ns) = (pool.as_str(), ns.as_str());
    for n in &namespaces {
        c.kubectl_ok(&["create", "namespace", n]);
    }
    let out = c.kubectl_ok(&["apply", "-f", &repo_path("examples")]);
    assert!(
        out.contains(&format!("relaypool.mailfleet.dev/{pool} created")),
        "{out}"
    );

    // Table output uses the CRD's printer columns.
    let table = c.kubectl_ok(&["get", "relaypools", "-n", ns]);
    let header = table.lines().next().unwrap_or_default();
    for col in ["NAME", "REPLICAS", "READY", "AGE"] {
        assert!(header.contains(col), "{table}");
    }
    assert!(table.contains(pool), "{table}");
    // Short names and categories resolve through discovery.
    assert!(
        c.kubectl_ok(&["get", "rp", "-n", ns, "-o", "name"])
            .contains(&format!("relaypool.mailfleet.dev/{pool}"))
    );
    let all = c.kubectl_ok(&["get", "mailfleet", "-n", ns, "-o", "name"]);
    assert!(all.contains("sendingdomain.mailfleet.dev/"), "{all}");

    let described = c.kubectl_ok(&["describe", "relaypool", pool, "-n", ns]);
    assert!(
        described.contains("Name:") && described.contains(pool),
        "{described}"
    );

    // A merge patch of the spec bumps generation; the status subresource stays separate.
    let gen1 = c.kubectl_ok(&[
        "get",
        "rp",
        pool,
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    c.kubectl_ok(&[
        "patch",
        "rp",
        pool,
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":5}}"#,
    ]);
    let gen2 = c.kubectl_ok(&[
        "get",
        "rp",
        pool,
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    assert_eq!(gen1.trim(), "1");
    assert_eq!(gen2.trim(), "2");
    c.kubectl_ok(&[
        "patch",
        "rp",
        pool,
        "-n",
        ns,
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"readyReplicas":2}}"#,
    ]);
    let after = c.kubectl_ok(&[
        "get",
        "rp",
        pool,
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.generation} {.status.readyReplicas}",
    ]);
    assert_eq!(after.trim(), "2 2", "status writes do not bump generation");
    // Status in a main-resource patch is ignored.
    c.kubectl_ok(&[
        "patch",
        "rp",
        pool,
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        r#"{"status":{"readyReplicas":9}}"#,
    ]);
    let ready = c.kubectl_ok(&[
        "get",
        "rp",
        pool,
        "-n",
        ns,
        "-o",
        "jsonpath={.status.readyReplicas}",
    ]);
    assert_eq!(ready.trim(), "2");
    // JSON patch.
    c.kubectl_ok(&[
        "patch",
        "rp",
        pool,
        "-n",
        ns,
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
    ]);
    assert_eq!(
        c.kubectl_ok(&[
            "get",
            "rp",
            pool,
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.replicas}"
        ])
        .trim(),
        "4"
    );

    let deleted = c.kubectl_ok(&["delete", "-f", &repo_path("examples")]);
    assert!(deleted.contains("deleted"), "{deleted}");
    let err = c.kubectl_err(&["get", "rp", pool, "-n", ns]);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
}

#[test]
fn schema_validation_refuses_with_kubernetes_status() {
    let c = Cluster::start();
    c.kubectl_ok(&["apply", "-f", &repo_path("crds")]);
    let bad = r#"
apiVersion: mailfleet.dev/v1alpha1
kind: WarmupPlan
metadata:
  name: bad
spec:
  stages:
  - dailyLimit: 100
    hourlyLimit: 500
"#;
    let out = c.kubectl_stdin(&["apply", "-f", "-"], bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an invalid WarmupPlan must be refused"
    );
    assert!(stderr.contains("is invalid"), "{stderr}");
    assert!(
        stderr.contains("hourlyLimit cannot exceed dailyLimit"),
        "the CEL rule's message reaches the user: {stderr}"
    );
    // kubectl asks for strict field validation: an unknown field is refused, not dropped.
    let typo = "apiVersion: mailfleet.dev/v1alpha1\nkind: WarmupPlan\nmetadata:\n  name: typo\nspec:\n  stages:\n  - dailyLimit: 100\n  stagez: []\n";
    let out = c.kubectl_stdin(&["apply", "-f", "-"], typo);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unknown field \"spec.stagez\""),
        "{stderr}"
    );
    let out = c.kubectl_stdin(&["apply", "--validate=false", "-f", "-"], typo);
    assert!(
        out.status.success(),
        "without validation the field is pruned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = c.kubectl_ok(&["get", "warmupplan", "typo", "-o", "jsonpath={.spec}"]);
    assert!(
        !spec.contains("stagez") && spec.contains("dailyLimit"),
        "{spec}"
    );
    let empty = "apiVersion: mailfleet.dev/v1alpha1\nkind: WarmupPlan\nmetadata:\n  name: empty\nspec:\n  stages: []\n";
    let out = c.kubectl_stdin(&["apply", "-f", "-"], empty);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("spec.stages"),
        "{stderr}"
    );
}

#[test]
fn builtin_kinds_strategic_merge_and_stale_update() {
    let c = Cluster::start();
    let deploy = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: a
        image: a:1
      - name: b
        image: b:1
"#;
    assert!(
        c.kubectl_stdin(&["apply", "-f", "-"], deploy)
            .status
            .success()
    );
    // Client-side apply of a changed manifest computes a strategic merge patch.
    let changed = deploy.replace("b:1", "b:2");
    let out = c.kubectl_stdin(&["apply", "-f", "-"], &changed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = c.kubectl_ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[*].image}",
    ]);
    assert_eq!(images.trim(), "a:1 b:2");
    c.kubectl_ok(&[
        "patch",
        "deploy",
        "web",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"a","image":"a:3"}]}}}}"#,
    ]);
    let images = c.kubectl_ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[*].image}",
    ]);
    assert_eq!(
        images.trim(),
        "a:3 b:2",
        "strategic merge keeps the other container"
    );

    // Optimistic concurrency: a replace with an old resourceVersion is a 409.
    let current = c.kubectl_ok(&["get", "deploy", "web", "-o", "json"]);
    c.kubectl_ok(&["scale", "deploy", "web", "--replicas", "3"]);
    let out = c.kubectl_stdin(&["replace", "-f", "-"], &current);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("the object has been modified"), "{stderr}");
}

#[test]
fn server_side_apply_conflicts_and_force() {
    let c = Cluster::start();
    let cm = |value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: {value}\n"
        )
    };
    let out = c.kubectl_stdin(
        &["apply", "--server-side", "--field-manager=alice", "-f", "-"],
        &cm("a"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.kubectl_stdin(
        &["apply", "--server-side", "--field-manager=bob", "-f", "-"],
        &cm("b"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bob must conflict with alice");
    assert!(
        stderr.contains("conflict with \"alice\"") && stderr.contains(".data.mode"),
        "{stderr}"
    );
    let out = c.kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=bob",
            "--force-conflicts",
            "-f",
            "-",
        ],
        &cm("b"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let managers = c.kubectl_ok(&[
        "get",
        "cm",
        "settings",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ]);
    assert_eq!(
        managers.trim(),
        "bob",
        "forcing takes ownership away from alice"
    );
    assert_eq!(
        c.kubectl_ok(&["get", "cm", "settings", "-o", "jsonpath={.data.mode}"])
            .trim(),
        "b"
    );
}

#[test]
fn finalizers_hold_deletion_and_gc_collects_dependents() {
    let c = Cluster::start();
    c.kubectl_ok(&["create", "configmap", "owner", "--from-literal=a=b"]);
    c.kubectl_ok(&[
        "patch",
        "cm",
        "owner",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
    ]);
    let uid = c.kubectl_ok(&["get", "cm", "owner", "-o", "jsonpath={.metadata.uid}"]);
    let dependent = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: dependent\n  ownerReferences:\n  - apiVersion: v1\n    kind: ConfigMap\n    name: owner\n    uid: {}\nstringData:\n  k: v\n",
        uid.trim()
    );
    assert!(
        c.kubectl_stdin(&["apply", "-f", "-"], &dependent)
            .status
            .success()
    );
    assert_eq!(
        c.kubectl_ok(&["get", "secret", "dependent", "-o", "jsonpath={.data.k}"])
            .trim(),
        "dg==",
        "stringData is stored as data"
    );

    c.kubectl_ok(&["delete", "cm", "owner", "--wait=false"]);
    let ts = c.kubectl_ok(&[
        "get",
        "cm",
        "owner",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(
        !ts.trim().is_empty(),
        "a finalizer keeps the object, marked for deletion"
    );
    let err = c.kubectl_err(&[
        "patch",
        "cm",
        "owner",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":["example.com/hold","example.com/new"]}}"#,
    ]);
    assert!(err.contains("no new finalizers"), "{err}");
    c.kubectl_ok(&["get", "secret", "dependent"]);

    c.kubectl_ok(&[
        "patch",
        "cm",
        "owner",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    c.kubectl_err(&["get", "cm", "owner"]);
    let err = c.kubectl_err(&["get", "secret", "dependent"]);
    assert!(
        err.contains("not found"),
        "the dependent is garbage-collected: {err}"
    );

    // Orphan propagation keeps dependents and drops their ownerReference.
    c.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: owner2\n",
    );
    let uid = c.kubectl_ok(&["get", "cm", "owner2", "-o", "jsonpath={.metadata.uid}"]);
    let dep = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dep2\n  ownerReferences:\n  - apiVersion: v1\n    kind: ConfigMap\n    name: owner2\n    uid: {}\n",
        uid.trim()
    );
    assert!(
        c.kubectl_stdin(&["apply", "-f", "-"], &dep)
            .status
            .success()
    );
    c.kubectl_ok(&["delete", "cm", "owner2", "--cascade=orphan"]);
    let refs = c.kubectl_ok(&[
        "get",
        "cm",
        "dep2",
        "-o",
        "jsonpath={.metadata.ownerReferences}",
    ]);
    assert!(refs.trim().is_empty(), "{refs}");
}

#[test]
fn get_watch_prints_changes() {
    let c = Cluster::start();
    c.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: first\n",
    );
    let mut watch = c
        .kubectl_cmd(&["get", "configmaps", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let wait_for = |needle: &str, seen: &mut Vec<String>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if seen.iter().any(|l| l.contains(needle)) {
                return;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!("kubectl get -w never printed {needle:?}; saw {seen:?}"),
            }
        }
    };
    wait_for("first", &mut seen);
    c.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: second\n",
    );
    wait_for("second", &mut seen);
    c.kubectl_ok(&["delete", "configmap", "second"]);
    wait_for("DELETED", &mut seen);
    let _ = watch.kill();
    let _ = watch.wait();
    let added = seen
        .iter()
        .position(|l| l.contains("ADDED") && l.contains("second"));
    let deleted = seen
        .iter()
        .position(|l| l.contains("DELETED") && l.contains("second"));
    assert!(added < deleted, "{seen:?}");
}
