//! `mailfleet dev` end to end: the binary starts devcluster, the operator, the embedded DNS
//! server, the sink MX and the traffic generator; within the run the relays become ready and
//! mail reaches the sink from the pool's egress addresses (127.0.10.0/29), counted in the
//! pool's status too, and the warm-up plan advances the addresses on 10-second days. Every
//! port is picked free at run time, so this runs beside other tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;

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

#[test]
fn dev_runs_the_fleet_and_mail_leaves_from_the_pool_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailfleet"))
        .args(["dev", "--dir"])
        .arg(dir.path())
        .args(["--duration", "45", "--rate", "10", "--day", "10s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
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
    for a in &sources {
        assert_eq!(a.octets()[..3], [127, 0, 10], "{a} is not a pool address");
        assert!(
            (1..=6).contains(&a.octets()[3]),
            "{a} is not a pool address"
        );
    }
}
