//! `mailfleet dev` end to end: the binary starts devcluster, the operator, the embedded DNS
//! server, the sink MX and the traffic generator; within the run the relays become ready and
//! mail reaches the sink from the pool's egress addresses (127.0.10.0/29), counted in the
//! pool's status too, and the warm-up plan advances the addresses on 10-second days. The
//! SendingDomain's records reach the embedded DNS server by RFC 2136 with TSIG and every
//! message the sink takes passes DKIM, SPF and DMARC against them; BIND's `nsupdate` with the
//! run's key file can change the zone, without it or with another key it cannot. Every port
//! is picked free at run time, so this runs beside other tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../relay/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `key=value` pairs of the final `summary:` line.
fn summary(stdout: &str) -> BTreeMap<String, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("summary: "))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    line.trim_start_matches("summary: ")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn number(s: &BTreeMap<String, String>, key: &str) -> u64 {
    s.get(key)
        .unwrap_or_else(|| panic!("{key} missing from {s:?}"))
        .parse()
        .unwrap()
}

/// `kdig +short` TXT answers of `name` from the server at 127.0.0.1:`port`.
fn txt(port: u16, name: &str) -> String {
    let out = Command::new(common::require("kdig"))
        .args(["@127.0.0.1", "-p", &port.to_string(), "+short", "TXT", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The embedded DNS server takes updates signed with the run's key file, and no others.
fn exercise_dns(dir: &Path, port: u16) {
    let key_file = dir.join("dns-tsig.key");
    let script = |text: &str| {
        format!(
            "server 127.0.0.1 {port}\nzone dev.test\nupdate add probe.dev.test. 60 TXT \"{text}\"\nsend\n"
        )
    };
    let (ok, stderr) =
        common::nsupdate(&["-k", key_file.to_str().unwrap()], &script("with the key"));
    assert!(ok, "nsupdate with the run's key failed: {stderr}");
    assert_eq!(txt(port, "probe.dev.test"), "\"with the key\"\n");

    let (ok, stderr) = common::nsupdate(&[], &script("unsigned"));
    assert!(!ok, "an unsigned update was accepted");
    assert!(stderr.contains("REFUSED"), "{stderr}");
    let (ok, stderr) = common::nsupdate(
        &[
            "-y",
            "hmac-sha256:mailfleet-dev:b3RoZXIgc2VjcmV0IG9mIDMyIGJ5dGVzIGxlbmd0aCEh",
        ],
        &script("other key"),
    );
    assert!(!ok, "an update signed with another secret was accepted");
    assert!(!stderr.is_empty());
    assert_eq!(txt(port, "probe.dev.test"), "\"with the key\"\n");

    // The SendingDomain controller published the domain's SPF record there by RFC 2136.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spf = txt(port, "mail.dev.test");
        if spf.contains("v=spf1") {
            assert!(spf.contains("ip4:127.0.10.1"), "{spf}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SPF record published: {spf:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn dev_runs_the_fleet_and_mail_leaves_from_the_pool_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailfleet"))
        .args(["dev", "--dir"])
        .arg(dir.path())
        .args(["--duration", "45", "--rate", "10", "--day", "10s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let collected = Arc::new(Mutex::new(String::new()));
    let reader = {
        let collected = Arc::clone(&collected);
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut c = collected.lock().unwrap();
                c.push_str(&line);
                c.push('\n');
            }
        })
    };
    // The header names the DNS server's address: `  dns          127.0.0.1:PORT (UDP+TCP)...`.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dns_port: u16 = loop {
        let text = collected.lock().unwrap().clone();
        if let Some(port) = text.lines().find_map(|l| {
            l.trim_start()
                .strip_prefix("dns")?
                .trim_start()
                .strip_prefix("127.0.0.1:")?
                .split_once(' ')?
                .0
                .parse()
                .ok()
        }) {
            break port;
        }
        assert!(Instant::now() < deadline, "no dns line in:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Stops the fleet if a DNS check fails, rather than leaving it running.
    let dns_checks = std::panic::catch_unwind(|| exercise_dns(dir.path(), dns_port));
    if let Err(e) = dns_checks {
        let _ = child.kill();
        let _ = child.wait();
        std::panic::resume_unwind(e);
    }

    let out = child.wait_with_output().unwrap();
    reader.join().unwrap();
    let stdout = collected.lock().unwrap().clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(dir.path().join("mailfleet.log")).unwrap_or_default();
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}\nlog (tail):\n{}", {
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    });
    assert!(out.status.success(), "mailfleet dev failed\n{context}");
    // The header says where the kubeconfig is and how to watch.
    let kubeconfig = dir.path().join("kubeconfig");
    assert!(stdout.contains(&format!(
        "KUBECONFIG={} kubectl get relaypools,sendingdomains,warmupplans -A",
        kubeconfig.display()
    )));
    assert!(kubeconfig.is_file());
    // The live table shows every address of 127.0.10.0/29 with its pod.
    for host in 1..=6 {
        assert!(
            stdout.contains(&format!("127.0.10.{host} ")),
            "address 127.0.10.{host} not shown\n{context}"
        );
    }

    let s = summary(&stdout);
    assert_eq!(s["ready"], "3/3", "{context}");
    let sent = number(&s, "sent");
    let delivered = number(&s, "delivered");
    let from_pool = number(&s, "sink_from_pool");
    assert!(
        sent >= 50,
        "10/s for ~40 s sends far more than {sent}\n{context}"
    );
    assert!(from_pool > 0, "{context}");
    assert_eq!(
        number(&s, "sink_accepted"),
        from_pool,
        "mail reached the sink from outside the pool's addresses\n{context}"
    );
    // Warm-up limits hold part of the mail back (stage 1 allows 10 a day per address), so
    // the sink got some of what was submitted, never more; the reports reached the pool's
    // counters.
    assert!(
        from_pool <= sent,
        "sent {sent}, sink took {from_pool}\n{context}"
    );
    assert!(delivered > 0 && delivered <= from_pool, "{context}");
    // Warm-up advanced while it ran: with 10-second days and mail above every address's
    // minimum share, the addresses left stage one, and the table shows stages and limits.
    assert!(
        number(&s, "warmup_stage_max") >= 2,
        "warm-up did not advance\n{context}"
    );
    assert!(stdout.contains("stage 1/6, 10/day"), "{context}");
    assert!(stdout.contains("stage 2/6, 20/day"), "{context}");
    let sources: Vec<Ipv4Addr> = s["sink_sources"]
        .split(',')
        .map(|a| a.parse().unwrap())
        .collect();
    assert!(!sources.is_empty());
    // The sink checked what it took against the records the operator published: all of
    // it passes, allowing for mail signed in the first moments, before publication.
    let checked = number(&s, "sink_checked");
    assert_eq!(checked, number(&s, "sink_accepted"), "{context}");
    for key in ["sink_dkim_pass", "sink_spf_pass", "sink_dmarc_pass"] {
        let pass = number(&s, key);
        assert!(
            pass > 0 && pass * 10 >= checked * 9,
            "{key}={pass} of {checked}\n{context}"
        );
    }
    assert_eq!(s["dns_records"], "4", "{context}");
    assert_eq!(s["dns_verified"], "4", "{context}");
    for a in &sources {
        assert_eq!(a.octets()[..3], [127, 0, 10], "{a} is not a pool address");
        assert!(
            (1..=6).contains(&a.octets()[3]),
            "{a} is not a pool address"
        );
    }
}
