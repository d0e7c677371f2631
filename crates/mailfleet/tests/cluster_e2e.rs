//! The cluster suite: what must hold on any cluster mailfleet runs in, checked through nothing
//! but a kubeconfig, real `kubectl` and a real SMTP client (swaks).
//!
//! - `MAILFLEET_E2E_KUBECONFIG=PATH`: the cluster of that kubeconfig, where the chart is
//!   already installed (hack/e2e-kind.sh installs it on kind, then runs this suite). Relays
//!   are reached through `kubectl port-forward`, or at their pod IPs with
//!   `MAILFLEET_E2E_REACH=pod-ip` (when this machine routes to them, e.g. a `mailfleet dev`
//!   cluster).
//! - unset (CI): devcluster, with the CRDs applied from crds/ and `mailfleet operator` as a
//!   process, which is what the chart would run; relays are reached at their pod IPs.
//!
//! (tests/e2e/target.rs sets up either, as for the other end-to-end tests.)
//!
//! In a namespace of its own (deleted at the end, whatever happened) it checks: every file of
//! examples/ passes the API server's validation (server-side dry run), an open relay is
//! refused with the CRD's message, a pool of two relays with three egress addresses and a
//! SendingDomain converge (addresses assigned, relays registered with the coordinator, DKIM
//! keys made), `kubectl get` shows them, a relay takes a message from the sending domain and
//! refuses one from elsewhere, scaling to one relay moves every address to it, and deleting
//! the namespace removes everything (finalizers included).
//!
//! `MAILFLEET_E2E_TIMEOUT` (seconds per wait; 120 on devcluster, 300 otherwise) bounds each
//! wait; `MAILFLEET_E2E_KEEP=1` keeps the namespace of a failed run to look into. The suite sends no mail out of the cluster: the egress addresses are TEST-NET.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../relay/tests/common/mod.rs"]
mod common;
mod e2e;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{Proc, free_port, repo_root, require};
use e2e::{Target, assignment, condition, eventually, example_plan};
use serde_json::Value;

/// Every document of examples/*.yaml, without its namespace (the test's is used).
fn examples_without_namespace() -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = String::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut value: Value = serde::Deserialize::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            if let Some(meta) = value["metadata"].as_object_mut() {
                meta.remove("namespace");
            }
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&value).unwrap());
        }
    }
    out
}

/// Where the test reaches a relay pod's SMTP listener: its pod IP on devcluster, a
/// `kubectl port-forward` elsewhere (kept alive by the returned process).
fn smtp_endpoint(t: &Target, ns: &str, pod: &str, port: u16) -> (String, u16, Option<Proc>) {
    let pod_ip = std::env::var("MAILFLEET_E2E_REACH").is_ok_and(|r| r == "pod-ip");
    if !t.external() || pod_ip {
        return (e2e::pod_ip(&t.k, ns, pod), port, None);
    }
    let local = free_port();
    let mut child = Command::new(e2e::kubectl_bin())
        .env("KUBECONFIG", &t.k.kubeconfig)
        .env("HOME", &t.k.home)
        .args([
            "-n",
            ns,
            "port-forward",
            &format!("pod/{pod}"),
            &format!("{local}:{port}"),
            "--address",
            "127.0.0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // It prints `Forwarding from 127.0.0.1:LOCAL -> PORT` once it listens.
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.contains("Forwarding from"), "port-forward: {line}");
    ("127.0.0.1".to_string(), local, Some(Proc(child)))
}

fn swaks(server: &str, port: u16, from: &str) -> (bool, String) {
    let out = Command::new(require("swaks"))
        .args(["--server", server, "--port", &port.to_string()])
        .args(["--from", from, "--to", "someone@mailfleet-e2e.invalid"])
        .args(["--h-Subject", "mailfleet cluster e2e"])
        .args(["--ehlo", "app.e2e.example.test", "--timeout", "30"])
        .output()
        .unwrap();
    common::outcome(&out)
}

#[test]
fn a_fleet_converges_takes_mail_scales_and_is_removed_on_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Creates the namespace, and deletes it at the end whatever happened.
    let t = Target::start(root, "mailfleet-e2e");
    let k = &t.k;
    let n = t.ns.as_str();
    k.ok(&[
        "get",
        "crd",
        "relaypools.mailfleet.dev",
        "sendingdomains.mailfleet.dev",
        "warmupplans.mailfleet.dev",
    ]);

    // examples/ pass the API server's validation: schema and CEL rules of the CRDs.
    let (ok, out) = t.apply_text(
        "examples.yaml",
        &examples_without_namespace(),
        &["--dry-run=server"],
    );
    assert!(ok, "examples/ refused: {out}");
    for kind in ["warmupplan", "relaypool", "sendingdomain"] {
        assert!(
            out.contains(&format!("{kind}.mailfleet.dev/")) && out.contains("(server dry run)"),
            "{kind} missing from the dry run: {out}"
        );
    }

    // An open relay is refused, with the CRD's own message.
    let open_relay = r#"apiVersion: mailfleet.dev/v1alpha1
kind: RelayPool
metadata:
  name: open-relay
spec:
  egress:
    addresses: [{address: 192.0.2.1, heloName: mta.example.com}]
  listener:
    allowedNetworks: ["0.0.0.0/0"]
"#;
    let (ok, out) = t.apply_text("open-relay.yaml", open_relay, &[]);
    assert!(!ok, "the API server accepted an open relay: {out}");
    assert!(out.contains("open relay"), "{out}");
    let (found, _) = k.run(&["-n", n, "get", "relaypool", "open-relay"]);
    assert!(!found);

    // A fleet: the example plan, two relays with three TEST-NET egress addresses, a domain.
    let port = if t.external() { 2525 } else { free_port() };
    let plan = example_plan();
    let fleet = format!(
        r#"{plan}
---
apiVersion: mailfleet.dev/v1alpha1
kind: RelayPool
metadata:
  name: e2e
spec:
  replicas: 2
  egress:
    mode: bind
    heloNameTemplate: "mta-{{ip}}.e2e.example.test"
    addresses:
      - address: 192.0.2.10
      - address: 192.0.2.11
      - address: 192.0.2.12
  listener:
    port: {port}
    # The test's SMTP client: on devcluster from 127.0.0.1, elsewhere through kubectl
    # port-forward, which connects from inside the pod.
    allowedNetworks: ["127.0.0.0/8"]
  delivery:
    retrySchedule: ["1m"]
    maxQueueLifetime: 1h
  warmupPlanRef:
    name: standard
---
apiVersion: mailfleet.dev/v1alpha1
kind: SendingDomain
metadata:
  name: e2e
spec:
  domain: e2e.example.test
  relayPoolRef:
    name: e2e
  dkim:
    algorithm: dual
  dns:
    provider: manual
"#
    );
    let (ok, out) = t.apply_text("fleet.yaml", &fleet, &[]);
    assert!(ok, "{out}");

    let secs = t.timeout;
    let pool = eventually(
        secs,
        "the pool Ready with its addresses assigned and both relays registered",
        || {
            let pool = k.json(&["-n", n, "get", "relaypool", "e2e"]);
            let relays = pool["status"]["relays"].as_array().map_or(0, Vec::len);
            (condition(&pool, "EgressAssigned") && condition(&pool, "Ready") && relays == 2)
                .then_some(pool)
        },
    );
    let assigned = assignment(&pool);
    assert_eq!(assigned.len(), 3, "{pool}");
    let pods: std::collections::BTreeSet<&str> = assigned.values().map(String::as_str).collect();
    assert_eq!(pods, ["e2e-0", "e2e-1"].into(), "{pool}");
    eventually(secs, "the domain's DKIM keys (DKIMReady)", || {
        let d = k.json(&["-n", n, "get", "sendingdomain", "e2e"]);
        condition(&d, "DKIMReady").then_some(())
    });
    // The printer columns show the pool's state.
    let table = k.ok(&["-n", n, "get", "relaypools"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("e2e "))
        .unwrap_or_else(|| panic!("no e2e row in:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[1..4],
        ["2", "2", "3"],
        "replicas, ready, addresses:\n{table}"
    );
    let table = k.ok(&["-n", n, "get", "sendingdomains"]);
    assert!(table.contains("e2e.example.test"), "{table}");

    // A relay takes mail from the sending domain and refuses anyone else's: no open relay.
    let (host, smtp, _forward) = smtp_endpoint(&t, n, "e2e-0", port);
    // The relays learn of the domain over the coordinator a moment after it is DKIMReady.
    let mut last = String::new();
    let out = eventually(
        secs,
        "the relay taking mail from its sending domain",
        || {
            let (ok, out) = swaks(&host, smtp, "app@e2e.example.test");
            if ok {
                return Some(out);
            }
            last = out;
            None
        },
    );
    assert!(
        out.contains("<-  250 2.0.0 Ok: queued as"),
        "{out}\nbefore: {last}"
    );
    let (ok, out) = swaks(&host, smtp, "someone@elsewhere.example");
    assert!(!ok, "the relay took mail from a foreign domain:\n{out}");
    assert!(out.contains("<** 5"), "{out}");

    // Scaling to one relay moves every address to it.
    k.ok(&[
        "-n",
        n,
        "patch",
        "relaypool",
        "e2e",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ]);
    eventually(secs, "all three addresses on e2e-0", || {
        let pool = k.json(&["-n", n, "get", "relaypool", "e2e"]);
        let a = assignment(&pool);
        (a.len() == 3 && a.values().all(|p| p == "e2e-0") && condition(&pool, "Ready"))
            .then_some(())
    });
    eventually(secs, "pod e2e-1 gone", || {
        let (found, _) = k.run(&["-n", n, "get", "pod", "e2e-1"]);
        (!found).then_some(())
    });

    // Deleting the namespace removes the fleet, finalizers included.
    k.ok(&["delete", "namespace", n, "--wait=false"]);
    eventually(secs, "the namespace gone", || {
        let (found, _) = k.run(&["get", "namespace", n]);
        (!found).then_some(())
    });
}
