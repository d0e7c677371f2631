//! DNS authentication end to end, checked by implementations independent of mailfleet: on
//! devcluster or a real control plane (tests/e2e/target.rs), the operator publishes a
//! SendingDomain's records in Knot (RFC 2136 with TSIG) and verifies them; a relay (a
//! `mailfleet relay` process) sends mail to the sink; then hack/dnsauth-verify.py, asking only the Knot server this test started,
//! verifies the received message's DKIM signatures with dkimpy (public keys from Knot),
//! evaluates SPF with pyspf for the address the sink saw (pass) and for another one (fail, as
//! `-all` says), parses the DMARC record and computes DMARC with authheaders (pass). Deleting
//! the domain removes its records, and the same message then fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../relay/tests/common/mod.rs"]
mod common;
mod e2e;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{Knot, Sink, free_port, header, repo_root, require};
use e2e::{Target, condition, create_tsig_secret, eventually, pod_ip};
use serde_json::Value;

/// The Python with the independent verifiers (hack/requirements-test.txt).
fn verifier_python() -> PathBuf {
    let p = std::env::var_os("MAILFLEET_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    let ok = Command::new(&p)
        .args([
            "-c",
            "import aiosmtpd, dkim, nacl, spf, authheaders, dns.resolver",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test needs a Python with aiosmtpd, dkimpy, pynacl, pyspf, authheaders and dnspython \
         at {} (or MAILFLEET_PYTHON): run hack/install-test-deps.sh",
        p.display()
    );
    p
}

/// Runs hack/dnsauth-verify.py against the Knot server at `dns`; returns its JSON answer.
fn verify(dns: u16, args: &[&str]) -> Value {
    let out = Command::new(verifier_python())
        .arg(repo_root().join("hack/dnsauth-verify.py"))
        .args(["--dns", &format!("127.0.0.1:{dns}")])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dnsauth-verify.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn mail_passes_dkim_spf_and_dmarc_checked_against_the_published_zone() {
    verifier_python();
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
    let t = Target::start(root, "dnsauth-e2e");
    t.require_pods_on_this_machine();
    let (k, ns) = (&t.k, t.ns.as_str());
    create_tsig_secret(k, ns);

    // The pool starts with no relay: the first relay then starts with the domain's key in its
    // configuration, so the first message is signed without racing the key's arrival.
    let smtp_port = free_port();
    let manifests = format!(
        r#"apiVersion: mailfleet.dev/v1alpha1
kind: RelayPool
metadata:
  name: transactional
spec:
  replicas: 0
  egress:
    cidrs: ["127.0.4.0/30"]
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
    algorithm: dual
  dmarc:
    policy: reject
    rua: ["mailto:dmarc@example.test"]
  dns:
    provider: rfc2136
    ttl: 30
    rfc2136:
      server: "127.0.0.1:{knot_port}"
      zone: example.test
      tsigKeyName: update-key
      tsigSecretRef:
        name: dns-tsig
"#,
        sink_port = sink.port,
        knot_port = knot.port,
    );
    t.apply("dnsauth.yaml", &manifests);
    let log = || t.operator_log();

    let domain = eventually(
        t.secs(120),
        "the SendingDomain Ready and DNSVerified",
        || {
            let d = t.get(&["sendingdomain", "mail-example-test"]);
            (condition(&d, "DNSVerified") && condition(&d, "Ready")).then_some(d)
        },
    );
    let selector = domain["status"]["activeSelector"]
        .as_str()
        .unwrap()
        .to_string();
    let table = k.ok(&["-n", ns, "get", "sendingdomains"]);
    assert!(table.contains(&selector), "{table}");

    k.ok(&[
        "-n",
        ns,
        "patch",
        "relaypool",
        "transactional",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ]);
    eventually(t.secs(120), "one ready relay", || {
        let p = t.get(&["relaypool", "transactional"]);
        (p["status"]["readyReplicas"].as_u64() == Some(1) && condition(&p, "Ready")).then_some(())
    });
    let ip = pod_ip(k, ns, "transactional-0");

    let out = Command::new(require("swaks"))
        .args(["--server", &ip, "--port", &smtp_port.to_string()])
        .args([
            "--from",
            "app@mail.example.test",
            "--to",
            "user@dest.example.test",
        ])
        .args([
            "--h-From",
            "App <app@mail.example.test>",
            "--h-Subject",
            "dns authentication",
        ])
        .args(["--ehlo", "app.example.test"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "swaks: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let msgs = sink.wait_for(1, t.secs(60));
    assert_eq!(msgs.len(), 1, "operator log:\n{}", log());
    let (path, msg) = &msgs[0];
    let path = path.to_str().unwrap();
    let peer = header(msg, "X-Sink-Peer").unwrap().to_string();
    let helo = header(msg, "X-Sink-Helo").unwrap().to_string();
    let mail_from = header(msg, "X-Sink-From").unwrap().to_string();
    assert!(
        ["127.0.4.1", "127.0.4.2"].contains(&peer.as_str()),
        "mail left from {peer}, not a pool address"
    );

    // DKIM: both signatures verify with the keys Knot serves.
    let dkim = verify(knot.port, &["dkim", path]);
    let mut sigs: Vec<(String, String, String, bool)> = dkim["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["a"].as_str().unwrap().to_string(),
                s["s"].as_str().unwrap().to_string(),
                s["d"].as_str().unwrap().to_string(),
                s["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    sigs.sort();
    assert_eq!(
        sigs,
        vec![
            (
                "ed25519-sha256".to_string(),
                format!("{selector}-ed"),
                "mail.example.test".to_string(),
                true
            ),
            (
                "rsa-sha256".to_string(),
                selector.clone(),
                "mail.example.test".to_string(),
                true
            ),
        ],
        "{dkim}"
    );
    // The verifier can say no: a changed Subject (a signed header) fails both.
    let tampered = root.join("tampered.eml");
    std::fs::write(&tampered, msg.replace("dns authentication", "changed")).unwrap();
    let bad = verify(knot.port, &["dkim", tampered.to_str().unwrap()]);
    assert!(
        bad["signatures"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ok"] == false),
        "{bad}"
    );

    // SPF for the envelope sender the sink saw, and for the return-path domain: the source
    // address passes; any other address fails (the record ends in -all).
    let return_path = "bounce@bounces.mail.example.test";
    for sender in [mail_from.as_str(), return_path] {
        let spf = verify(knot.port, &["spf", &peer, sender, &helo]);
        assert_eq!(spf["result"], "pass", "{sender} from {peer}: {spf}");
        let spf = verify(knot.port, &["spf", "127.0.99.9", sender, &helo]);
        assert_eq!(spf["result"], "fail", "{sender} from 127.0.99.9: {spf}");
    }

    // DMARC: the record parses, and the message passes it (aligned DKIM and SPF).
    let dmarc = verify(knot.port, &["dmarc", "mail.example.test"]);
    assert_eq!(dmarc["record"]["v"], "DMARC1", "{dmarc}");
    assert_eq!(dmarc["record"]["p"], "reject", "{dmarc}");
    assert_eq!(
        dmarc["record"]["rua"], "mailto:dmarc@example.test",
        "{dmarc}"
    );
    let auth = verify(knot.port, &["auth", path, &peer, &mail_from, &helo]);
    let ar = auth["header"].as_str().unwrap();
    for want in [
        "spf=pass",
        "dkim=pass header.d=mail.example.test",
        "dmarc=pass",
        "header.from=mail.example.test policy.dmarc=reject",
    ] {
        assert!(ar.contains(want), "{want} missing: {ar}");
    }
    assert!(!ar.contains("dkim=fail"), "{ar}");

    // Without the domain its records are gone: the same message no longer verifies.
    k.ok(&["-n", ns, "delete", "sendingdomain", "mail-example-test"]);
    eventually(t.secs(60), "the SendingDomain gone", || {
        let list = t.get(&["sendingdomains"]);
        list["items"].as_array().unwrap().is_empty().then_some(())
    });
    let gone = verify(knot.port, &["dkim", path]);
    assert!(
        gone["signatures"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ok"] == false),
        "{gone}"
    );
    let spf = verify(knot.port, &["spf", &peer, &mail_from, &helo]);
    assert_eq!(spf["result"], "none", "{spf}");
    let auth = verify(knot.port, &["auth", path, &peer, &mail_from, &helo]);
    let ar = auth["header"].as_str().unwrap();
    assert!(!ar.contains("dmarc=pass"), "{ar}");
}
