//! Warm-up end to end, on devcluster or a real control plane (tests/e2e/target.rs): the
//! operator runs the warm-up engine, real `mailfleet relay` processes enforce the quotas it
//! pushes, and a scriptable sink MX (hack/relay-sink.py, found through Knot) answers 250, or
//! 550 to recipients named `bounce-*`. Windows (set in each WarmupPlan) are seconds long, so a
//! plan's days pass while the test watches (helpers in tests/warmup/mod.rs):
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
mod warmup;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Knot, Sink, free_port};
use e2e::{Target, eventually, pod_ip};
use warmup::*;

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
    let t = Target::start(root, "warmup-e2e");
    t.require_pods_on_this_machine();
    let (k, ns, rt) = (&t.k, t.ns.as_str(), &t.rt);

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
    t.apply("warmup.yaml", &manifests);
    let log = || t.operator_log();

    // Every pool's relay is ready and every address is in its plan.
    let relay = |pool: &str| -> SocketAddr {
        let ip = pod_ip(k, ns, &format!("{pool}-0"));
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
            t.secs(120),
            &format!("{pool} ready with {n} address(es) in its plan"),
            || {
                let p = t.get(&["relaypool", pool]);
                let ready = p["status"]["readyReplicas"].as_i64() == Some(1);
                let counted = plan(&t, pool)["status"]["addressCount"].as_i64() == Some(n);
                (ready && counted).then_some(())
            },
        );
    }
    let ramp_start = parse_time(&address(&plan(&t, "ramp"), "127.0.4.1").unwrap()["windowStart"]);
    let table = k.ok(&["-n", ns, "get", "warmupplans"]);
    assert!(
        table.contains("WARMING") && table.contains("PROGRESS") && table.contains("stage 1 of 2"),
        "{table}"
    );

    // Quarantine: 127.0.7.1 is listed, so it is out of rotation; mail leaves from 127.0.7.2.
    eventually(t.secs(30), "127.0.7.1 quarantined", || {
        let p = plan(&t, "listed");
        (state_of(&p, "127.0.7.1").1 == "quarantined" && state_of(&p, "127.0.7.2").1 == "warming")
            .then_some(())
    });
    let p = plan(&t, "listed");
    assert_eq!(
        address(&p, "127.0.7.1").unwrap()["listedOn"][0],
        "bl.example.test"
    );
    eventually(t.secs(30), "the pool shows the quarantine", || {
        let pool = t.get(&["relaypool", "listed"]);
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
    send(rt, ramp_relay, "ramp.example.test", &recipients("ramp", 40));
    send(
        rt,
        spike_relay,
        "spike.example.test",
        &recipients("spike", 6),
    );
    send(
        rt,
        listed_relay,
        "listed.example.test",
        &recipients("listed", 4),
    );

    let listed = all_arrived(&t, &sink, "listed-", 4, "the quarantine pool's 4 messages");
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        ["127.0.7.2"],
        "mail left from a quarantined address: {listed:?}"
    );
    assert!(events(&t, "listed").contains("AddressQuarantined"));

    // Delisting brings the address back.
    knot.update(&["update delete 1.7.0.127.bl.example.test. A".to_string()]);
    eventually(t.secs(30), "127.0.7.1 delisted", || {
        (state_of(&plan(&t, "listed"), "127.0.7.1").1 == "warming").then_some(())
    });
    assert!(events(&t, "listed").contains("AddressDelisted"));

    // The clean ramp reaches warm.
    eventually(t.secs(60), "both ramp addresses warm", || {
        let p = plan(&t, "ramp");
        (state_of(&p, "127.0.4.1").1 == "warm" && state_of(&p, "127.0.4.2").1 == "warm")
            .then_some(())
    });
    let ramp_events = events(&t, "ramp");
    assert!(
        ramp_events.contains("WarmupAdvanced") && ramp_events.contains("WarmupCompleted"),
        "{ramp_events}"
    );
    let sent = all_arrived(&t, &sink, "ramp-", 40, "all 40 ramp messages");
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
    let held: i64 = t.get(&["relaypool", "ramp"])["status"]["counters"]
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
    eventually(t.secs(60), "spike at stage 3", || {
        (state_of(&plan(&t, "spike"), "127.0.5.1").0 == 3).then_some(())
    });
    let replies = send(
        rt,
        spike_relay,
        "spike.example.test",
        &recipients("bounce", 6),
    );
    assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");
    let p = eventually(t.secs(60), "spike stepped back to stage 2 and held", || {
        let p = plan(&t, "spike");
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
    assert!(events(&t, "spike").contains("WarmupSteppedBack"));
    // The relays enforce the stepped-back limit: the pool's address is Held there too.
    eventually(t.secs(30), "the spike pool shows Held", || {
        let pool = t.get(&["relaypool", "spike"]);
        (pool["status"]["addresses"][0]["state"] == "held").then_some(())
    });

    // Overflow: the first address warms on one message, then a new address joins the pool
    // and starts at stage one while the first stays warm; mail over the new address's limit
    // leaves from the warm one.
    let overflow_relay = relay("overflow");
    send(
        rt,
        overflow_relay,
        "overflow.example.test",
        &recipients("first", 1),
    );
    eventually(t.secs(60), "127.0.6.1 warm", || {
        (state_of(&plan(&t, "overflow"), "127.0.6.1").1 == "warm").then_some(())
    });
    k.ok(&[
        "-n",
        ns,
        "patch",
        "relaypool",
        "overflow",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/egress/addresses/-","value":{"address":"127.0.6.2","heloName":"overflow.relay.example.test"}}]"#,
    ]);
    eventually(
        t.secs(60),
        "127.0.6.2 in the plan at stage 1, 127.0.6.1 still warm",
        || {
            let p = plan(&t, "overflow");
            (state_of(&p, "127.0.6.2") == (1, "warming".to_string())
                && state_of(&p, "127.0.6.1").1 == "warm")
                .then_some(())
        },
    );
    let overflow_start =
        parse_time(&address(&plan(&t, "overflow"), "127.0.6.2").unwrap()["windowStart"]);
    eventually(t.secs(30), "the relay uses both overflow addresses", || {
        let pool = t.get(&["relaypool", "overflow"]);
        let states: Vec<&str> = pool["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a["state"].as_str())
            .collect();
        (states == ["warm", "warming"]).then_some(())
    });
    send(
        rt,
        overflow_relay,
        "overflow.example.test",
        &recipients("over", 10),
    );
    let over = all_arrived(&t, &sink, "over-", 10, "all 10 overflow messages");
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
    send(rt, fbl_relay, "fbl.example.test", &fbl_rcpts);
    all_arrived(&t, &sink, "fbl-", 5, "the 5 fbl messages");
    let feedback = SocketAddr::new(fbl_relay.ip(), 9091);
    let report = arf("127.0.8.1", "fbl.example.test", &fbl_rcpts[2]);
    let refused = post(feedback, "/v1/feedback", None, &report);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let secret = t.get(&["secret", "fbl-feedback"]);
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
    let p = eventually(t.secs(60), "127.0.8.1 paused by the complaint", || {
        let p = plan(&t, "fbl");
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
    assert!(events(&t, "fbl").contains("WarmupPaused"));
    // The recipient is on the domain's suppression list, and the relays refuse it.
    eventually(
        t.secs(30),
        "the suppression list names the complainer",
        || {
            let cm = t.get(&["configmap", "fbl-suppressions"]);
            cm["data"]["recipients"]
                .as_str()
                .is_some_and(|t| t.contains(&format!("{} complaint", fbl_rcpts[2])))
                .then_some(())
        },
    );
    let replies = send(rt, fbl_relay, "fbl.example.test", &fbl_rcpts[2..3]);
    assert!(replies[0].starts_with("550"), "{replies:?}");
    // A paused address sends nothing: new mail leaves from the other one.
    eventually(t.secs(30), "the fbl pool shows the pause", || {
        let pool = t.get(&["relaypool", "fbl"]);
        pool["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["address"] == "127.0.8.1" && a["state"] == "paused")
            .then_some(())
    });
    send(rt, fbl_relay, "fbl.example.test", &recipients("fblwait", 4));
    let after = all_arrived(
        &t,
        &sink,
        "fblwait-",
        4,
        "the 4 messages sent after the pause",
    );
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["127.0.8.2"],
        "mail left from a paused address: {after:?}"
    );
    // The resume annotation brings it back, and the engine removes the annotation.
    k.ok(&[
        "-n",
        ns,
        "annotate",
        "warmupplan",
        "fbl",
        "mailfleet.dev/resume=127.0.8.1",
    ]);
    eventually(t.secs(60), "127.0.8.1 resumed", || {
        let p = plan(&t, "fbl");
        (state_of(&p, "127.0.8.1").1 == "warming"
            && p["metadata"]["annotations"]["mailfleet.dev/resume"].is_null())
        .then_some(())
    });
    assert!(events(&t, "fbl").contains("WarmupResumed"));

    // A restarted operator carries on from the plans' status: nothing starts over.
    t.kill_operator();
    let before = plan(&t, "ramp");
    t.start_operator();
    std::thread::sleep(Duration::from_secs_f64(WINDOW_SECS * 1.5));
    let after = plan(&t, "ramp");
    for ip in ["127.0.4.1", "127.0.4.2"] {
        assert_eq!(state_of(&after, ip), state_of(&before, ip), "{}", log());
        assert_eq!(state_of(&after, ip).1, "warm");
    }
    assert_eq!(state_of(&plan(&t, "spike"), "127.0.5.1").0, 2);
}
