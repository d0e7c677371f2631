//! The fleet end to end, on devcluster or a real control plane (tests/e2e/target.rs): real
//! `kubectl` applies a RelayPool and a SendingDomain, the operator builds the relays, they run
//! as `mailfleet relay` processes and register with the coordinator over mTLS, mail sent to
//! each relay with swaks leaves from that relay's assigned egress addresses (seen by the sink
//! MX, found through Knot) with a DKIM signature, and the reports land in the pool's status
//! exactly once. Scaling 3 → 5 → 2 keeps every address on one pod; the operator is killed
//! mid-way (SIGKILL on devcluster, its pod deleted on a real cluster) and restarted: no
//! address moves, nothing is counted twice. On devcluster operator and relays export their
//! traces to a test OTLP receiver.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../relay/tests/common/mod.rs"]
mod common;
mod e2e;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::{Knot, Sink, free_port, header, require};
use e2e::{Target, Traces, assignment, condition, eventually, pod_ip};
use serde_json::Value;

fn settled(t: &Target, replicas: usize) -> Option<Value> {
    let p = t.get(&["relaypool", "transactional"]);
    let ready = p["status"]["readyReplicas"].as_u64() == Some(replicas as u64);
    let existing = p["status"]["replicas"].as_u64() == Some(replicas as u64);
    (ready && existing && condition(&p, "Ready") && condition(&p, "EgressAssigned")).then_some(p)
}

fn delivered_total(pool: &Value) -> u64 {
    pool["status"]["counters"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["delivered"].as_u64()).sum())
        .unwrap_or(0)
}

fn swaks(ip: &str, port: u16, to: &str) -> (bool, String) {
    let out = Command::new(require("swaks"))
        .args(["--server", ip, "--port", &port.to_string()])
        .args(["--from", "app@mail.example.test", "--to", to])
        .args([
            "--h-From",
            "App <app@mail.example.test>",
            "--h-Subject",
            "fleet",
        ])
        .args(["--ehlo", "app.example.test"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn fleet_sends_from_assigned_addresses_and_survives_scaling_and_operator_kill() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sink = Sink::start(root, &[]);
    let knot = Knot::start(
        root,
        &[
            "dest.example.test. 60 MX 10 mx.example.test.",
            "mx.example.test. 60 A 127.0.0.1",
        ],
    );
    // The operator exports its traces to this receiver (on devcluster).
    let traces = Traces::default();
    let t = Target::start_traced(root, "fleet-e2e", &traces);
    t.require_pods_on_this_machine();
    let (k, ns) = (&t.k, t.ns.as_str());

    // The domain's DKIM key, as a Secret the relays get their signing key from.
    let key_pem = String::from_utf8(
        Command::new(require("openssl"))
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::fs::write(root.join("rsa.pem"), &key_pem).unwrap();
    k.ok(&[
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "mail-example-test-dkim",
        "--from-literal=selector=e2e",
        &format!("--from-file=rsa.pem={}", root.join("rsa.pem").display()),
    ]);

    let smtp_port = free_port();
    let manifests = format!(
        r#"apiVersion: mailfleet.dev/v1alpha1
kind: RelayPool
metadata:
  name: transactional
spec:
  replicas: 3
  egress:
    cidrs: ["127.0.3.0/29"]
    heloNameTemplate: "mta-{{ip}}.relay.example.test"
  listener:
    port: {smtp_port}
    allowedNetworks: ["127.0.0.0/8"]
  delivery:
    retrySchedule: ["1s"]
    destinationPort: {sink_port}
    nameservers: ["127.0.0.1:{knot_port}"]
---
apiVersion: mailfleet.dev/v1alpha1
kind: SendingDomain
metadata:
  name: mail-example-test
spec:
  domain: mail.example.test
  relayPoolRef:
    name: transactional
  dkim:
    algorithm: rsa2048
  dns:
    provider: manual
"#,
        sink_port = sink.port,
        knot_port = knot.port,
    );
    t.apply("fleet.yaml", &manifests);
    let log = || t.operator_log();

    // Three relays up and ready, two addresses each.
    let pool = eventually(
        t.secs(120),
        "3 ready relays with every address assigned",
        || settled(&t, 3),
    );
    let before = assignment(&pool);
    assert_eq!(before.len(), 6, "127.0.3.0/29 has 6 usable hosts");
    let mut per_pod: BTreeMap<&str, usize> = BTreeMap::new();
    for pod in before.values() {
        *per_pod.entry(pod.as_str()).or_default() += 1;
    }
    assert_eq!(
        per_pod.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{log}",
        log = log()
    );
    let table = k.ok(&["-n", ns, "get", "relaypools"]);
    assert!(
        table.contains("transactional") && table.contains("RelaysReady"),
        "{table}"
    );

    // Mail through each relay leaves from one of that relay's addresses, signed.
    for i in 0..3 {
        let pod = format!("transactional-{i}");
        let ip = pod_ip(k, ns, &pod);
        let (ok, out) = swaks(&ip, smtp_port, &format!("user{i}@dest.example.test"));
        assert!(ok, "swaks through {pod} at {ip}: {out}");
    }
    let msgs = sink.wait_for(3, t.secs(60));
    assert_eq!(msgs.len(), 3, "operator log:\n{}", log());
    for (_, m) in &msgs {
        let to = header(m, "X-Sink-To").unwrap();
        let i: usize = to
            .trim_start_matches("user")
            .split('@')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let peer = header(m, "X-Sink-Peer").unwrap();
        assert_eq!(
            before.get(peer).map(String::as_str),
            Some(format!("transactional-{i}").as_str()),
            "mail through transactional-{i} left from {peer}, assignment {before:?}"
        );
        assert_eq!(
            header(m, "X-Sink-Helo").unwrap(),
            format!("mta-{}.relay.example.test", peer.replace('.', "-"))
        );
        let sig = header(m, "DKIM-Signature").expect("signed");
        assert!(
            sig.contains("d=mail.example.test") && sig.contains("s=e2e"),
            "{sig}"
        );
    }
    // The relays' reports reach the pool's status.
    eventually(t.secs(60), "3 delivered in the pool's counters", || {
        let p = t.get(&["relaypool", "transactional"]);
        (delivered_total(&p) == 3).then_some(())
    });

    // Scale up: the new pods get addresses, every address stays on exactly one pod, and only
    // as many move as an even spread needs.
    k.ok(&[
        "-n",
        ns,
        "patch",
        "relaypool",
        "transactional",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":5}}"#,
    ]);
    let pool = eventually(
        t.secs(120),
        "5 ready relays with every address assigned",
        || {
            settled(&t, 5).filter(|p| {
                let a = assignment(p);
                let pods: BTreeSet<&String> = a.values().collect();
                pods.len() == 5
            })
        },
    );
    let up = assignment(&pool);
    let moved = before.iter().filter(|(a, p)| up[*a] != **p).count();
    assert_eq!(
        moved, 2,
        "6 addresses over 5 pods: two move ({before:?} -> {up:?})"
    );

    // Scale down to 2 and kill the operator while it works; a new one carries on.
    k.ok(&[
        "-n",
        ns,
        "patch",
        "relaypool",
        "transactional",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":2}}"#,
    ]);
    std::thread::sleep(Duration::from_millis(700));
    t.kill_operator();
    let mid = assignment(&t.get(&["relaypool", "transactional"]));
    t.start_operator();
    let pool = eventually(t.secs(120), "2 ready relays holding all addresses", || {
        settled(&t, 2).filter(|p| {
            assignment(p)
                .values()
                .all(|pod| pod == "transactional-0" || pod == "transactional-1")
        })
    });
    let down = assignment(&pool);
    for (a, pod) in &mid {
        if pod == "transactional-0" || pod == "transactional-1" {
            assert_eq!(
                &down[a], pod,
                "{a} moved off a surviving pod across the restart"
            );
        }
    }
    let counts: BTreeMap<&String, usize> = down.values().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p).or_default() += 1;
        m
    });
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [3, 3],
        "{down:?}"
    );

    // More mail after the restart; the totals count every message once.
    for i in 3..7 {
        let pod = format!("transactional-{}", i % 2);
        let ip = pod_ip(k, ns, &pod);
        let (ok, out) = swaks(&ip, smtp_port, &format!("user{i}@dest.example.test"));
        assert!(ok, "swaks through {pod}: {out}");
    }
    let msgs = sink.wait_for(7, t.secs(60));
    assert_eq!(msgs.len(), 7);
    for (_, m) in &msgs[3..] {
        let peer = header(m, "X-Sink-Peer").unwrap();
        assert!(down.contains_key(peer), "{peer} is not a pool address");
    }
    eventually(t.secs(60), "7 delivered in the pool's counters", || {
        let p = t.get(&["relaypool", "transactional"]);
        (delivered_total(&p) == 7).then_some(())
    });
    // A few more report rounds: still 7.
    std::thread::sleep(Duration::from_secs(5));
    let p = t.get(&["relaypool", "transactional"]);
    assert_eq!(
        delivered_total(&p),
        7,
        "counted twice: {}",
        p["status"]["counters"]
    );

    // Traces: only on devcluster. On a real cluster the chart's operator.otlpEndpoint was
    // fixed when the chart was installed, and this test's receiver listens on a port of this
    // run; pointing the shared release at it would restart the operator every other test uses.
    if !t.exports_traces() {
        return;
    }
    // Traces of reconciles and coordinator calls reached the OTLP receiver.
    eventually(30, "operator traces over OTLP", || {
        let seen = traces.spans();
        let has = |name: &str| {
            seen.iter()
                .any(|s| s.name == name && s.service == "mailfleet-operator")
        };
        (has("reconcile") && has("coordinator.report")).then_some(())
    });
    // The relay pods the operator built export there too: it passes its OTLP endpoint on.
    eventually(30, "relay traces over OTLP", || {
        traces
            .spans()
            .iter()
            .any(|s| s.name == "smtp.accept" && s.service == "mailfleet-relay")
            .then_some(())
    });
}
