//! Warm-up end to end on devcluster: `mailfleet operator` (a process) runs the warm-up engine,
//! real `mailfleet relay` processes enforce the quotas it pushes, and a scriptable sink MX
//! (hack/relay-sink.py, found through Knot) answers 250, or 550 to recipients named
//! `bounce-*`. Windows are seconds long, so a plan's days pass while the test watches:
//! - a clean ramp reaches warm, and no address ever sends more than its limit (counted at
//!   the sink per source address and window);
//! - a bounce spike holds an address and steps it back;
//! - an address added to a pool starts at stage one while the others keep their stage, and
//!   with `overflow: warmAddresses` mail over its limit leaves from the warm address;
//! - an address listed on a DNSBL zone served by Knot is quarantined (no mail leaves from
//!   it) and returns when delisted;
//! - an ARF complaint posted to a relay's feedback endpoint (with the pool's bearer token)
//!   pauses the address, puts the recipient on the domain's suppression list so the relays
//!   refuse it at RCPT, and the resume annotation brings the address back;
//! - a restarted operator carries on from the plans' status.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../relay/tests/common/mod.rs"]
mod common;
mod e2e;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, Knot, Sink, free_port, header};
use e2e::{Cluster, Kubectl, eventually, operator, pod_ip};
use serde_json::Value;

const WINDOW_SECS: f64 = 4.0;

fn plan_manifest(name: &str, body: &str) -> String {
    format!(
        "apiVersion: mailfleet.dev/v1alpha1\nkind: WarmupPlan\nmetadata:\n  name: {name}\n  namespace: mail\nspec:\n  window: 4s\n  idleResetDays: 0\n{body}---\n"
    )
}

fn pool_manifest(name: &str, addresses: &[&str], smtp_port: u16, sink: u16, knot: u16) -> String {
    let list: Vec<String> = addresses
        .iter()
        .map(|a| format!("      - address: {a}\n        heloName: {name}.relay.example.test\n"))
        .collect();
    format!(
        r#"apiVersion: mailfleet.dev/v1alpha1
kind: RelayPool
metadata:
  name: {name}
  namespace: mail
spec:
  replicas: 1
  warmupPlanRef:
    name: {name}
  egress:
    addresses:
{addresses}  listener:
    port: {smtp_port}
    allowedNetworks: ["127.0.0.0/8"]
  delivery:
    retrySchedule: ["1s"]
    destinationPort: {sink}
    nameservers: ["127.0.0.1:{knot}"]
---
apiVersion: mailfleet.dev/v1alpha1
kind: SendingDomain
metadata:
  name: {name}
  namespace: mail
spec:
  domain: {name}.example.test
  relayPoolRef:
    name: {name}
  dkim:
    algorithm: ed25519
  dns:
    provider: manual
---
"#,
        addresses = list.concat()
    )
}

/// Sends one message per recipient over one SMTP session; returns the RCPT replies.
fn send(
    rt: &tokio::runtime::Runtime,
    relay: SocketAddr,
    domain: &str,
    to: &[String],
) -> Vec<String> {
    rt.block_on(async {
        let mut c = Client::connect_from("127.0.0.1", relay).await;
        let ehlo = c.cmd("EHLO app.example.test").await;
        assert!(ehlo.starts_with("250"), "{ehlo}");
        let mut replies = Vec::new();
        for rcpt in to {
            let r = c.cmd(&format!("MAIL FROM:<app@{domain}>")).await;
            assert!(r.starts_with("250"), "MAIL FROM: {r}");
            let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            if !r.starts_with("250") {
                replies.push(r);
                assert!(c.cmd("RSET").await.starts_with("250"));
                continue;
            }
            replies.push(r);
            let r = c.cmd("DATA").await;
            assert!(r.starts_with("354"), "DATA: {r}");
            let r = c
                .cmd(&format!(
                    "From: App <app@{domain}>\r\nTo: <{rcpt}>\r\nSubject: warm-up\r\n\r\nhello\r\n."
                ))
                .await;
            assert!(r.starts_with("250"), "end of DATA: {r}");
        }
        c.cmd("QUIT").await;
        replies
    })
}

fn recipients(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}-{i}@dest.example.test"))
        .collect()
}

fn plan(k: &Kubectl, name: &str) -> Value {
    k.json(&["-n", "mail", "get", "warmupplan", name])
}

fn address<'a>(plan: &'a Value, ip: &str) -> Option<&'a Value> {
    plan["status"]["addresses"]
        .as_array()?
        .iter()
        .find(|a| a["address"] == ip)
}

fn state_of(plan: &Value, ip: &str) -> (i64, String) {
    address(plan, ip).map_or((0, String::new()), |a| {
        (
            a["stage"].as_i64().unwrap_or(0),
            a["state"].as_str().unwrap_or_default().to_string(),
        )
    })
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn parse_time(v: &Value) -> f64 {
    let s = v.as_str().unwrap();
    let t: k8s_openapi::jiff::Timestamp = s.parse().unwrap();
    t.as_millisecond() as f64 / 1000.0
}

/// Arrival times at the sink per source address.
fn arrivals(sink: &Sink, to_domain_prefix: &str) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (path, m) in sink.messages() {
        if !header(&m, "X-Sink-To").is_some_and(|t| t.starts_with(to_domain_prefix)) {
            continue;
        }
        let peer = header(&m, "X-Sink-Peer").unwrap().to_string();
        let at = unix(std::fs::metadata(&path).unwrap().modified().unwrap());
        out.entry(peer).or_default().push(at);
    }
    out
}

/// Waits until exactly `n` messages to recipients starting with `prefix` reached the sink;
/// returns their arrivals by source address.
fn all_arrived(sink: &Sink, prefix: &str, n: usize, what: &str) -> BTreeMap<String, Vec<f64>> {
    eventually(60, what, || {
        let a = arrivals(sink, prefix);
        (a.values().map(Vec::len).sum::<usize>() == n).then_some(a)
    })
}

/// Reasons and notes of the Events about WarmupPlan `name`.
fn events(k: &Kubectl, name: &str) -> String {
    let list = k.json(&["-n", "mail", "get", "events.events.k8s.io"]);
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["regarding"]["kind"] == "WarmupPlan" && e["regarding"]["name"] == name)
        .map(|e| format!("{} {}\n", e["reason"], e["note"]))
        .collect()
}

/// An ARF (RFC 5965) complaint about a message from `source` for `domain` to `rcpt`.
fn arf(source: &str, domain: &str, rcpt: &str) -> String {
    format!(
        "From: FBL <fbl@provider.example.net>\r\nTo: abuse@{domain}\r\nSubject: complaint\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; \
         boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n\
         \r\n--b1\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n\
         User-Agent: FBL/1.0\r\nVersion: 1\r\nOriginal-Mail-From: <app@{domain}>\r\n\
         Original-Rcpt-To: <{rcpt}>\r\nSource-IP: {source}\r\nReported-Domain: {domain}\r\n\
         \r\n--b1\r\nContent-Type: message/rfc822\r\n\r\nFrom: App <app@{domain}>\r\n\
         To: <{rcpt}>\r\nSubject: warm-up\r\n\r\nhello\r\n\r\n--b1--\r\n"
    )
}

/// POSTs `body` to `http://addr/path` with a bearer token; returns the status line and body.
fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: relay\r\n{auth}Content-Type: message/rfc822\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn warmup_ramps_holds_steps_back_overflows_and_quarantines_with_real_relays() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sink = Sink::start(root, &["--reject-rcpt", "bounce-"]);
    let knot = Knot::start(
        root,
        &[
            "dest.example.test. 60 MX 10 mx.example.test.",
            "mx.example.test. 60 A 127.0.0.1",
            // 127.0.7.1 is listed on the test blocklist.
            "1.7.0.127.bl.example.test. 60 A 127.0.0.2",
        ],
    );
    let Cluster { dc, k, rt } = e2e::cluster(root);

    let smtp_port = free_port();
    let (s, q) = (sink.port, knot.port);
    let mut manifests = String::new();
    // ramp: two stages of 4 and 8 per window, then warm.
    manifests.push_str(&plan_manifest(
        "ramp",
        "  stages:\n    - dailyLimit: 4\n    - dailyLimit: 8\n",
    ));
    manifests.push_str(&pool_manifest(
        "ramp",
        &["127.0.4.1", "127.0.4.2"],
        smtp_port,
        s,
        q,
    ));
    // spike: steps back one stage when more than 20% hard-bounce.
    manifests.push_str(&plan_manifest(
        "spike",
        "  stages:\n    - dailyLimit: 2\n    - dailyLimit: 4\n    - dailyLimit: 8\n    - dailyLimit: 16\n  gates:\n    maxHardBounceRate: 0.2\n  onBreach:\n    action: stepBack\n    stepBackStages: 1\n",
    ));
    manifests.push_str(&pool_manifest("spike", &["127.0.5.1"], smtp_port, s, q));
    // overflow: one stage of 1; mail over the limit leaves from warm addresses.
    manifests.push_str(&plan_manifest(
        "overflow",
        "  stages:\n    - dailyLimit: 1\n  overflow: warmAddresses\n",
    ));
    manifests.push_str(&pool_manifest("overflow", &["127.0.6.1"], smtp_port, s, q));
    // listed: checked against the Knot-served blocklist every second.
    manifests.push_str(&plan_manifest(
        "listed",
        &format!(
            "  stages:\n    - dailyLimit: 1000\n  blocklists:\n    zones: [bl.example.test]\n    interval: 1s\n    nameservers: [\"127.0.0.1:{q}\"]\n"
        ),
    ));
    manifests.push_str(&pool_manifest(
        "listed",
        &["127.0.7.1", "127.0.7.2"],
        smtp_port,
        s,
        q,
    ));
    // fbl: a complaint pauses the address.
    manifests.push_str(&plan_manifest(
        "fbl",
        "  stages:\n    - dailyLimit: 100\n    - dailyLimit: 200\n  onBreach:\n    action: pause\n",
    ));
    manifests.push_str(&pool_manifest(
        "fbl",
        &["127.0.8.1", "127.0.8.2"],
        smtp_port,
        s,
        q,
    ));
    let path = root.join("warmup.yaml");
    std::fs::write(&path, manifests).unwrap();
    k.ok(&["apply", "-f", path.to_str().unwrap()]);

    let coordinator = free_port();
    let health = free_port();
    let op_log = root.join("operator.log");
    let mut op = operator(&dc.kubeconfig, &op_log, coordinator, health, "op-1", None);
    let log = || std::fs::read_to_string(&op_log).unwrap_or_default();

    // Every pool's relay is ready and every address is in its plan.
    let relay = |pool: &str| -> SocketAddr {
        let ip = pod_ip(&k, "mail", &format!("{pool}-0"));
        SocketAddr::new(ip.parse().unwrap(), smtp_port)
    };
    for (pool, n) in [
        ("ramp", 2),
        ("spike", 1),
        ("overflow", 1),
        ("listed", 2),
        ("fbl", 2),
    ] {
        eventually(
            120,
            &format!("{pool} ready with {n} address(es) in its plan"),
            || {
                let p = k.json(&["-n", "mail", "get", "relaypool", pool]);
                let ready = p["status"]["readyReplicas"].as_i64() == Some(1);
                let counted = plan(&k, pool)["status"]["addressCount"].as_i64() == Some(n);
                (ready && counted).then_some(())
            },
        );
    }
    let ramp_start = parse_time(&address(&plan(&k, "ramp"), "127.0.4.1").unwrap()["windowStart"]);
    let table = k.ok(&["-n", "mail", "get", "warmupplans"]);
    assert!(
        table.contains("WARMING") && table.contains("PROGRESS") && table.contains("stage 1 of 2"),
        "{table}"
    );

    // Quarantine: 127.0.7.1 is listed, so it is out of rotation; mail leaves from 127.0.7.2.
    eventually(30, "127.0.7.1 quarantined", || {
        let p = plan(&k, "listed");
        (state_of(&p, "127.0.7.1").1 == "quarantined" && state_of(&p, "127.0.7.2").1 == "warming")
            .then_some(())
    });
    let p = plan(&k, "listed");
    assert_eq!(
        address(&p, "127.0.7.1").unwrap()["listedOn"][0],
        "bl.example.test"
    );
    eventually(30, "the pool shows the quarantine", || {
        let pool = k.json(&["-n", "mail", "get", "relaypool", "listed"]);
        pool["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["address"] == "127.0.7.1" && a["state"] == "quarantined")
            .then_some(())
    });

    // Traffic: a clean burst for ramp (40 > what its stages allow in two windows), six clean
    // messages for spike (2 + 4: exactly stages one and two), the quarantine pool's mail.
    let ramp_relay = relay("ramp");
    let spike_relay = relay("spike");
    let listed_relay = relay("listed");
    send(
        &rt,
        ramp_relay,
        "ramp.example.test",
        &recipients("ramp", 40),
    );
    send(
        &rt,
        spike_relay,
        "spike.example.test",
        &recipients("spike", 6),
    );
    send(
        &rt,
        listed_relay,
        "listed.example.test",
        &recipients("listed", 4),
    );

    let listed = all_arrived(&sink, "listed-", 4, "the quarantine pool's 4 messages");
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        ["127.0.7.2"],
        "mail left from a quarantined address: {listed:?}"
    );
    assert!(events(&k, "listed").contains("AddressQuarantined"));

    // Delisting brings the address back.
    knot.update(&["update delete 1.7.0.127.bl.example.test. A".to_string()]);
    eventually(30, "127.0.7.1 delisted", || {
        (state_of(&plan(&k, "listed"), "127.0.7.1").1 == "warming").then_some(())
    });
    assert!(events(&k, "listed").contains("AddressDelisted"));

    // The clean ramp reaches warm.
    eventually(60, "both ramp addresses warm", || {
        let p = plan(&k, "ramp");
        (state_of(&p, "127.0.4.1").1 == "warm" && state_of(&p, "127.0.4.2").1 == "warm")
            .then_some(())
    });
    let ramp_events = events(&k, "ramp");
    assert!(
        ramp_events.contains("WarmupAdvanced") && ramp_events.contains("WarmupCompleted"),
        "{ramp_events}"
    );
    let sent = all_arrived(&sink, "ramp-", 40, "all 40 ramp messages");
    // Caps: counted at the sink per source address, the messages of windows 0..=w never
    // exceed the sum of those windows' limits (at most 4, then at most 8). A message sent at
    // the very end of a window may arrive in the next one, so cumulative sums are what can
    // be checked without a clock race.
    for (ip, times) in &sent {
        let window = |t: f64| ((t - ramp_start) / WINDOW_SECS).floor() as i64;
        let in_0 = times.iter().filter(|t| window(**t) <= 0).count();
        let in_01 = times.iter().filter(|t| window(**t) <= 1).count();
        assert!(in_0 <= 4, "{ip} sent {in_0} in window 0, limit 4");
        assert!(
            in_01 <= 4 + 8,
            "{ip} sent {in_01} in windows 0-1, limits 4 + 8"
        );
    }
    assert_eq!(sent.len(), 2, "both ramp addresses sent: {sent:?}");
    // The mail held back by the limits is counted, once per message and window.
    let held: i64 = k.json(&["-n", "mail", "get", "relaypool", "ramp"])["status"]["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["deferredByWarmup"].as_i64())
        .sum();
    assert!(
        (1..=2 * 40).contains(&held),
        "40 messages against limits of 4 and 8: {held} held by warm-up"
    );

    // The bounce spike: spike reaches stage 3 on clean mail, then bounces step it back.
    eventually(60, "spike at stage 3", || {
        (state_of(&plan(&k, "spike"), "127.0.5.1").0 == 3).then_some(())
    });
    let replies = send(
        &rt,
        spike_relay,
        "spike.example.test",
        &recipients("bounce", 6),
    );
    assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");
    let p = eventually(60, "spike stepped back to stage 2 and held", || {
        let p = plan(&k, "spike");
        (state_of(&p, "127.0.5.1") == (2, "held".to_string())).then_some(p)
    });
    let a = address(&p, "127.0.5.1").unwrap();
    assert!(
        a["lastDecision"]
            .as_str()
            .unwrap()
            .contains("stepped back from stage 3 to 2: hard-bounce rate"),
        "{a}"
    );
    assert!(a["bounceRate"].as_f64().unwrap() > 0.2, "{a}");
    assert!(events(&k, "spike").contains("WarmupSteppedBack"));
    // The relays enforce the stepped-back limit: the pool's address is Held there too.
    eventually(30, "the spike pool shows Held", || {
        let pool = k.json(&["-n", "mail", "get", "relaypool", "spike"]);
        (pool["status"]["addresses"][0]["state"] == "held").then_some(())
    });

    // Overflow: the first address warms on one message, then a new address joins the pool
    // and starts at stage one while the first stays warm; mail over the new address's limit
    // leaves from the warm one.
    let overflow_relay = relay("overflow");
    send(
        &rt,
        overflow_relay,
        "overflow.example.test",
        &recipients("first", 1),
    );
    eventually(60, "127.0.6.1 warm", || {
        (state_of(&plan(&k, "overflow"), "127.0.6.1").1 == "warm").then_some(())
    });
    k.ok(&[
        "-n",
        "mail",
        "patch",
        "relaypool",
        "overflow",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/egress/addresses/-","value":{"address":"127.0.6.2","heloName":"overflow.relay.example.test"}}]"#,
    ]);
    eventually(
        60,
        "127.0.6.2 in the plan at stage 1, 127.0.6.1 still warm",
        || {
            let p = plan(&k, "overflow");
            (state_of(&p, "127.0.6.2") == (1, "warming".to_string())
                && state_of(&p, "127.0.6.1").1 == "warm")
                .then_some(())
        },
    );
    let overflow_start =
        parse_time(&address(&plan(&k, "overflow"), "127.0.6.2").unwrap()["windowStart"]);
    eventually(30, "the relay uses both overflow addresses", || {
        let pool = k.json(&["-n", "mail", "get", "relaypool", "overflow"]);
        let states: Vec<&str> = pool["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a["state"].as_str())
            .collect();
        (states == ["warm", "warming"]).then_some(())
    });
    send(
        &rt,
        overflow_relay,
        "overflow.example.test",
        &recipients("over", 10),
    );
    let over = all_arrived(&sink, "over-", 10, "all 10 overflow messages");
    // 127.0.6.2 may send one message per window: its n-th message (0-based) cannot arrive
    // before its window n.
    let mut from_new = over.get("127.0.6.2").cloned().unwrap_or_default();
    from_new.sort_by(f64::total_cmp);
    for (n, t) in from_new.iter().enumerate() {
        let window = ((t - overflow_start) / WINDOW_SECS).floor() as i64;
        assert!(
            window >= n as i64,
            "127.0.6.2 (limit 1 per window) sent its message {n} in window {window}: {over:?}"
        );
    }
    let from_new = from_new.len();
    assert!(
        over.get("127.0.6.1").map_or(0, Vec::len) >= 10 - from_new,
        "the rest left from the warm address: {over:?}"
    );

    // Complaints: five messages, then a feedback loop reports one of them as abuse.
    let fbl_relay = relay("fbl");
    let fbl_rcpts = recipients("fbl", 5);
    send(&rt, fbl_relay, "fbl.example.test", &fbl_rcpts);
    all_arrived(&sink, "fbl-", 5, "the 5 fbl messages");
    let feedback = SocketAddr::new(fbl_relay.ip(), 9091);
    let report = arf("127.0.8.1", "fbl.example.test", &fbl_rcpts[2]);
    let refused = post(feedback, "/v1/feedback", None, &report);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let secret = k.json(&["-n", "mail", "get", "secret", "fbl-feedback"]);
    use base64::Engine as _;
    let token = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(secret["data"]["token"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let refused = post(feedback, "/v1/feedback", Some("not-the-token"), &report);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let accepted = post(feedback, "/v1/feedback", Some(&token), &report);
    assert!(accepted.starts_with("HTTP/1.1 202"), "{accepted}");
    assert!(accepted.contains("127.0.8.1"), "{accepted}");
    let p = eventually(60, "127.0.8.1 paused by the complaint", || {
        let p = plan(&k, "fbl");
        (state_of(&p, "127.0.8.1").1 == "paused").then_some(p)
    });
    let a = address(&p, "127.0.8.1").unwrap();
    assert!(
        a["lastDecision"]
            .as_str()
            .unwrap()
            .contains("complaint rate"),
        "{a}"
    );
    assert!(events(&k, "fbl").contains("WarmupPaused"));
    // The recipient is on the domain's suppression list, and the relays refuse it.
    eventually(30, "the suppression list names the complainer", || {
        let cm = k.json(&["-n", "mail", "get", "configmap", "fbl-suppressions"]);
        cm["data"]["recipients"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("{} complaint", fbl_rcpts[2])))
            .then_some(())
    });
    let replies = send(&rt, fbl_relay, "fbl.example.test", &fbl_rcpts[2..3]);
    assert!(replies[0].starts_with("550"), "{replies:?}");
    // A paused address sends nothing: new mail leaves from the other one.
    eventually(30, "the fbl pool shows the pause", || {
        let pool = k.json(&["-n", "mail", "get", "relaypool", "fbl"]);
        pool["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["address"] == "127.0.8.1" && a["state"] == "paused")
            .then_some(())
    });
    send(
        &rt,
        fbl_relay,
        "fbl.example.test",
        &recipients("fblwait", 4),
    );
    let after = all_arrived(&sink, "fblwait-", 4, "the 4 messages sent after the pause");
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["127.0.8.2"],
        "mail left from a paused address: {after:?}"
    );
    // The resume annotation brings it back, and the engine removes the annotation.
    k.ok(&[
        "-n",
        "mail",
        "annotate",
        "warmupplan",
        "fbl",
        "mailfleet.dev/resume=127.0.8.1",
    ]);
    eventually(60, "127.0.8.1 resumed", || {
        let p = plan(&k, "fbl");
        (state_of(&p, "127.0.8.1").1 == "warming"
            && p["metadata"]["annotations"]["mailfleet.dev/resume"].is_null())
        .then_some(())
    });
    assert!(events(&k, "fbl").contains("WarmupResumed"));

    // A restarted operator carries on from the plans' status: nothing starts over.
    let _ = Command::new("kill")
        .args(["-9", &op.0.id().to_string()])
        .status();
    let _ = op.0.wait();
    let before = plan(&k, "ramp");
    op = operator(&dc.kubeconfig, &op_log, coordinator, health, "op-2", None);
    std::thread::sleep(Duration::from_secs_f64(WINDOW_SECS * 1.5));
    let after = plan(&k, "ramp");
    for ip in ["127.0.4.1", "127.0.4.2"] {
        assert_eq!(state_of(&after, ip), state_of(&before, ip), "{}", log());
        assert_eq!(state_of(&after, ip).1, "warm");
    }
    assert_eq!(state_of(&plan(&k, "spike"), "127.0.5.1").0, 2);
    drop(op);
}
