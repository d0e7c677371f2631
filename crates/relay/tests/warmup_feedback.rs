//! Coordinated mode, the warm-up and reputation side: ARF complaints at the feedback endpoint
//! (token checks, the complaint and its suppression in the reports, RCPT refused at once),
//! hard bounces at the sink becoming suppressions, quotas whose overflow goes to warm
//! addresses or waits (counted as DEFERRED_BY_WARMUP once per message), and dedicated
//! addresses. Real peers: Knot serves the MX records, the aiosmtpd sink records the source
//! address of every message; the coordinator is the in-test one of tests/coordinator_harness.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod coordinator_harness;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use coordinator_harness::*;
use mailfleet_proto::v1;
use mailfleet_relay::coordinator::Coordinated;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ARF: &str = include_str!("data/arf-complaint.eml");
const TOKEN: &str = "feedback-token-for-tests";

fn sha256_hex(s: &str) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// POSTs `body` to `/v1/feedback`; returns the status and the body of the answer.
async fn post_feedback(http: SocketAddr, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "POST /v1/feedback HTTP/1.1\r\nHost: relay\r\n{auth}Content-Type: message/rfc822\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

async fn http_get(http: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// RCPT reply for `to` in a fresh transaction from `from`.
async fn rcpt_reply(relay: SocketAddr, from: &str, to: &str) -> String {
    let mut c = Client::connect_from("127.0.0.1", relay).await;
    c.cmd("EHLO client.example.test").await;
    assert!(
        c.cmd(&format!("MAIL FROM:<{from}>"))
            .await
            .starts_with("250")
    );
    let r = c.cmd(&format!("RCPT TO:<{to}>")).await;
    c.cmd("QUIT").await;
    r
}

/// Submits one message per recipient over one session; every one must be accepted.
async fn submit(relay: SocketAddr, from: &str, to: &[String]) {
    let mut c = Client::connect_from("127.0.0.1", relay).await;
    c.cmd("EHLO client.example.test").await;
    for t in to {
        assert!(
            c.cmd(&format!("MAIL FROM:<{from}>"))
                .await
                .starts_with("250")
        );
        let r = c.cmd(&format!("RCPT TO:<{t}>")).await;
        assert!(r.starts_with("250"), "{t}: {r}");
        assert!(c.cmd("DATA").await.starts_with("354"));
        let r = c
            .cmd(&format!(
                "From: {from}\r\nTo: {t}\r\nSubject: warm-up\r\n\r\nHello.\r\n."
            ))
            .await;
        assert!(r.starts_with("250"), "{r}");
    }
    c.cmd("QUIT").await;
}

fn by_peer(msgs: &[(std::path::PathBuf, String)]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (_, m) in msgs {
        *out.entry(header(m, "X-Sink-Peer").unwrap().to_string())
            .or_default() += 1;
    }
    out
}

/// A quota in the hour-long window that started at `start` (the same in every snapshot of a
/// test, as the warm-up engine keeps it: a new start would be a new window).
fn quota(ip: &str, start: i64, limit: u64, overflow_to_warm: bool) -> v1::AddressQuota {
    v1::AddressQuota {
        address: ip.into(),
        provider_group: String::new(),
        window_limit: limit,
        hourly_limit: 0,
        window_start_unix: start,
        window_seconds: 3600,
        overflow_to_warm,
    }
}

/// Applied deltas of one outcome: (address, provider group, domain) → count.
fn counted(server: &TestServer, outcome: v1::Outcome) -> BTreeMap<(String, String, String), u64> {
    let mut out = BTreeMap::new();
    for r in &server.state().applied_reports {
        for d in r.deltas.iter().filter(|d| d.outcome == outcome as i32) {
            *out.entry((
                d.address.clone(),
                d.provider_group.clone(),
                d.domain.clone(),
            ))
            .or_default() += d.count;
        }
    }
    out
}

fn applied_suppressions(server: &TestServer) -> Vec<(String, String, i32)> {
    server
        .state()
        .applied_reports
        .iter()
        .flat_map(|r| r.suppressions.iter())
        .map(|s| (s.domain.clone(), s.recipient.clone(), s.reason))
        .collect()
}

struct Setup {
    dir: tempfile::TempDir,
    sink: Sink,
    knot: Knot,
    ca: Ca,
    client_cert: Issued,
    server: TestServer,
    /// Start of the quota windows of the test.
    window_start: i64,
}

async fn setup(sink_args: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(dir.path(), sink_args);
    let knot = knot(dir.path());
    let ca = Ca::new("mailfleet test ca");
    let server_cert = ca.issue(&[mailfleet_proto::COORDINATOR_SERVER_NAME], false);
    let client_cert = ca.issue(&["pool-a"], true);
    let server = TestServer::start("127.0.0.1:0".parse().unwrap(), &ca, &server_cert, None).await;
    Setup {
        dir,
        sink,
        knot,
        ca,
        client_cert,
        server,
        window_start: mailfleet_relay::shaping::unix_now() as i64 - 10,
    }
}

impl Setup {
    async fn relay(&self, mut base: mailfleet_relay::RelayConfig) -> Coordinated {
        base.spool.dir = self.dir.path().join("spool");
        let opts = options(
            &self.server.url(),
            &self.ca,
            &self.client_cert,
            self.dir.path(),
        );
        Coordinated::start(base, None, opts).await.unwrap()
    }

    fn snapshot(&self, version: u64, domains: &[&str]) -> v1::RelayConfig {
        snapshot(version, domains, self.knot.addr(), self.sink.port)
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arf_complaints_are_authenticated_reported_durably_and_suppress_the_recipient() {
    let s = setup(&[]).await;
    // The relay classifies recipients' domains by their MX like deliveries: mx1 is "gmail".
    let mut base = base(s.dir());
    base.shaping.mx_suffixes.insert(
        "mx1.example.test".into(),
        mailfleet_relay::ProviderGroup::Gmail,
    );
    let relay = s.relay(base).await;
    let http = relay.relay().http_addr.unwrap();
    let smtp = relay.relay().smtp_addr;

    // The endpoint is off until the snapshot carries a token hash.
    s.server.push(s.snapshot(1, &["example.test"]));
    assert!(wait_until(10, || relay.applied_version() == 1).await);
    let (status, body) = post_feedback(http, Some(TOKEN), ARF).await;
    assert_eq!(status, 404, "{body}");

    let mut v2 = s.snapshot(2, &["example.test"]);
    v2.listener.as_mut().unwrap().feedback_token_sha256 = sha256_hex(TOKEN);
    s.server.push(v2);
    assert!(wait_until(10, || relay.applied_version() == 2).await);

    // Without a token, with a wrong one: 401, nothing recorded.
    let (status, body) = post_feedback(http, None, ARF).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = post_feedback(http, Some("not-the-token"), ARF).await;
    assert_eq!(status, 401, "{body}");
    // A large body is not read before the token is checked, and the answer still arrives.
    let padded = format!("{ARF}{}", "x".repeat(2 * 1024 * 1024));
    let (status, body) = post_feedback(http, Some("not-the-token"), &padded).await;
    assert_eq!(status, 401, "{body}");
    // Over the size limit: refused from the announced length.
    let mut c = tokio::net::TcpStream::connect(http).await.unwrap();
    c.write_all(
        format!(
            "POST /v1/feedback HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
            5 * 1024 * 1024
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 413 "), "{out}");
    // With the token: not a report (400), a report that names no sending domain (422).
    let (status, body) = post_feedback(http, Some(TOKEN), "Subject: hi\r\n\r\nhello\r\n").await;
    assert_eq!(status, 400, "{body}");
    let foreign = ARF
        .replace("example.test;", "elsewhere.test;")
        .replace(
            "Reported-Domain: example.test",
            "Reported-Domain: elsewhere.test",
        )
        .replace("news@example.test", "news@elsewhere.test");
    let (status, body) = post_feedback(http, Some(TOKEN), &foreign).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("elsewhere.test"), "{body}");
    relay.report_now().unwrap();
    assert!(wait_until(10, || relay.pending_reports().is_empty()).await);
    assert!(
        applied_suppressions(&s.server).is_empty()
            && counted(&s.server, v1::Outcome::Complaint).is_empty(),
        "a refused report left a trace"
    );

    // The coordinator is not taking reports: the complaint must still be on disk before 202.
    s.server.state().refuse_reports = true;
    let (status, body) = post_feedback(http, Some(TOKEN), ARF).await;
    assert_eq!(status, 202, "{body}");
    let answer: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({
            "address": "127.0.0.2",
            "domain": "example.test",
            "recipient": "complainer@dest.example.test",
        })
    );
    assert!(!relay.pending_reports().is_empty());

    // The same relay refuses the recipient at once (the snapshot does not list it yet), for
    // that sending domain only.
    let r = rcpt_reply(smtp, "s@example.test", "complainer@dest.example.test").await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    assert!(r.contains("suppressed"), "{r}");
    let r = rcpt_reply(smtp, "s@example.test", "someone@dest.example.test").await;
    assert!(r.starts_with("250"), "{r}");

    // Reports flow again: the complaint is counted once for 127.0.0.2 × gmail × example.test,
    // with its suppression.
    s.server.state().refuse_reports = false;
    assert!(wait_until(15, || relay.pending_reports().is_empty()).await);
    assert_eq!(
        counted(&s.server, v1::Outcome::Complaint),
        BTreeMap::from([(
            (
                "127.0.0.2".to_string(),
                "gmail".to_string(),
                "example.test".to_string()
            ),
            1
        )])
    );
    assert_eq!(
        applied_suppressions(&s.server),
        vec![(
            "example.test".to_string(),
            "complainer@dest.example.test".to_string(),
            v1::SuppressionReason::Complaint as i32
        )]
    );

    let metrics = http_get(http, "/metrics").await;
    for line in [
        "mailfleet_relay_feedback_requests_total{result=\"accepted\"} 1",
        "mailfleet_relay_feedback_requests_total{result=\"unauthorized\"} 3",
        "mailfleet_relay_feedback_requests_total{result=\"too_large\"} 1",
        "mailfleet_relay_feedback_requests_total{result=\"disabled\"} 1",
        "mailfleet_relay_feedback_requests_total{result=\"bad_request\"} 1",
        "mailfleet_relay_feedback_requests_total{result=\"unattributable\"} 1",
        "mailfleet_relay_complaints_total{address=\"127.0.0.2\",provider=\"gmail\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    relay.shutdown(Duration::from_secs(2)).await;
    s.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_bounces_become_suppressions_in_the_reports_and_are_refused_next_time() {
    let s = setup(&["--reject-rcpt", "gone", "--block-rcpt", "policy"]).await;
    let relay = s.relay(base(s.dir())).await;
    let smtp = relay.relay().smtp_addr;
    s.server.push(s.snapshot(1, &["example.test"]));
    assert!(wait_until(10, || relay.applied_version() == 1).await);

    submit(
        smtp,
        "s@news.example.test",
        &[
            "gone@dest.example.test".to_string(),
            "policy@dest.example.test".to_string(),
            "fine@dest.example.test".to_string(),
        ],
    )
    .await;
    assert_eq!(s.sink.wait_for(1, 20).len(), 1);
    // Only the user-unknown bounce is a suppression (for the sending domain of the
    // subdomain sender), the policy block is not.
    assert!(
        wait_until(15, || !applied_suppressions(&s.server).is_empty()).await,
        "no suppression reported"
    );
    assert!(wait_until(10, || relay.pending_reports().is_empty()).await);
    assert_eq!(
        applied_suppressions(&s.server),
        vec![(
            "example.test".to_string(),
            "gone@dest.example.test".to_string(),
            v1::SuppressionReason::HardBounce as i32
        )]
    );
    // The bounce's own count may come in the next report.
    assert!(
        wait_until(10, || counted(&s.server, v1::Outcome::HardBounce)
            .values()
            .sum::<u64>()
            == 1)
        .await,
        "{:?}",
        counted(&s.server, v1::Outcome::HardBounce)
    );
    // The recipient is refused by this relay from now on; the policy-blocked one is not.
    let r = rcpt_reply(smtp, "s@example.test", "gone@dest.example.test").await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    let r = rcpt_reply(smtp, "s@example.test", "policy@dest.example.test").await;
    assert!(r.starts_with("250"), "{r}");

    // Once the operator pushes it back, the configuration refuses it (and the local entry is
    // no longer needed); lifting it in a later snapshot lets it through again.
    let mut v2 = s.snapshot(2, &["example.test"]);
    v2.domains[0].suppressed_recipients = vec!["gone@dest.example.test".into()];
    s.server.push(v2);
    assert!(wait_until(10, || relay.applied_version() == 2).await);
    assert_eq!(relay.relay().control().suppressions().len(), 0);
    let r = rcpt_reply(smtp, "s@example.test", "gone@dest.example.test").await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    s.server.push(s.snapshot(3, &["example.test"]));
    assert!(wait_until(10, || relay.applied_version() == 3).await);
    let r = rcpt_reply(smtp, "s@example.test", "gone@dest.example.test").await;
    assert!(r.starts_with("250"), "{r}");
    relay.shutdown(Duration::from_secs(2)).await;
    s.server.stop().await;
}

/// Eight messages over 127.0.0.2 (warming, 2 per window) and 127.0.0.3 (warm, 5 per window):
/// four are assigned to each.
fn warmup_snapshot(s: &Setup, version: u64, overflow_to_warm: bool) -> v1::RelayConfig {
    let mut snap = s.snapshot(version, &["example.test"]);
    snap.addresses = vec![
        address("127.0.0.2", v1::AddressState::Warming),
        address("127.0.0.3", v1::AddressState::Warm),
    ];
    snap.quotas = vec![
        quota("127.0.0.2", s.window_start, 2, overflow_to_warm),
        quota("127.0.0.3", s.window_start, 5, false),
    ];
    snap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_mail_overflows_to_the_warm_address_within_its_quota() {
    let s = setup(&[]).await;
    let relay = s.relay(base(s.dir())).await;
    s.server.push(warmup_snapshot(&s, 1, true));
    assert!(wait_until(10, || relay.applied_version() == 1).await);
    let to: Vec<String> = (0..8).map(|i| format!("o{i}@dest.example.test")).collect();
    submit(relay.relay().smtp_addr, "s@example.test", &to).await;

    // 2 from the warming address, its other 2 from the warm one (4 of its own plus 1 of the
    // overflow fill its 5); the last one waits.
    let msgs = s.sink.wait_for(7, 20);
    assert!(
        wait_until(10, || counted(&s.server, v1::Outcome::DeferredByWarmup)
            .values()
            .sum::<u64>()
            == 1)
        .await
    );
    let msgs = if msgs.len() == 7 {
        s.sink.messages()
    } else {
        msgs
    };
    assert_eq!(
        by_peer(&msgs),
        BTreeMap::from([("127.0.0.2".to_string(), 2), ("127.0.0.3".to_string(), 5)])
    );
    assert_eq!(relay.relay().delivery.queued_messages(), 1);

    // A new snapshot wakes the parked message: it is held again in the same window and not
    // counted twice.
    s.server.push(warmup_snapshot(&s, 2, true));
    assert!(wait_until(10, || relay.applied_version() == 2).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.report_now().unwrap();
    assert!(wait_until(10, || relay.pending_reports().is_empty()).await);
    let held = counted(&s.server, v1::Outcome::DeferredByWarmup);
    assert_eq!(held.values().sum::<u64>(), 1, "{held:?}");
    assert!(
        held.keys()
            .all(|(_, g, d)| g == "other" && d == "example.test"),
        "{held:?}"
    );
    assert_eq!(s.sink.messages().len(), 7);
    relay.shutdown(Duration::from_secs(2)).await;
    s.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_overflow_mail_waits_for_its_own_address_and_is_counted_once() {
    let s = setup(&[]).await;
    let relay = s.relay(base(s.dir())).await;
    s.server.push(warmup_snapshot(&s, 1, false));
    assert!(wait_until(10, || relay.applied_version() == 1).await);
    let to: Vec<String> = (0..8).map(|i| format!("w{i}@dest.example.test")).collect();
    submit(relay.relay().smtp_addr, "s@example.test", &to).await;

    // The warm address has quota left, but the two over the warming address's limit wait.
    let msgs = s.sink.wait_for(6, 20);
    assert!(
        wait_until(10, || counted(&s.server, v1::Outcome::DeferredByWarmup)
            .values()
            .sum::<u64>()
            == 2)
        .await,
        "{:?}",
        counted(&s.server, v1::Outcome::DeferredByWarmup)
    );
    let msgs = if msgs.len() == 6 {
        s.sink.messages()
    } else {
        msgs
    };
    assert_eq!(
        by_peer(&msgs),
        BTreeMap::from([("127.0.0.2".to_string(), 2), ("127.0.0.3".to_string(), 4)])
    );
    assert_eq!(relay.relay().delivery.queued_messages(), 2);
    assert_eq!(
        counted(&s.server, v1::Outcome::DeferredByWarmup),
        BTreeMap::from([(
            (
                "127.0.0.2".to_string(),
                "other".to_string(),
                "example.test".to_string()
            ),
            2
        )])
    );
    // Held again after a wake-up in the same window: still counted once per message, and
    // held back is not an attempt.
    s.server.push(warmup_snapshot(&s, 2, false));
    assert!(wait_until(10, || relay.applied_version() == 2).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.report_now().unwrap();
    assert!(wait_until(10, || relay.pending_reports().is_empty()).await);
    assert_eq!(
        counted(&s.server, v1::Outcome::DeferredByWarmup)
            .values()
            .sum::<u64>(),
        2
    );
    assert!(counted(&s.server, v1::Outcome::Deferred).is_empty());

    // The warm-up advances (a higher limit): the two leave from their own address.
    let mut v3 = warmup_snapshot(&s, 3, false);
    v3.quotas[0].window_limit = 10;
    s.server.push(v3);
    let msgs = s.sink.wait_for(8, 20);
    assert_eq!(
        by_peer(&msgs),
        BTreeMap::from([("127.0.0.2".to_string(), 4), ("127.0.0.3".to_string(), 4)])
    );
    relay.shutdown(Duration::from_secs(2)).await;
    s.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_addresses_carry_all_of_their_domains_mail() {
    let s = setup(&[]).await;
    let relay = s.relay(base(s.dir())).await;
    let mut snap = s.snapshot(1, &["example.test", "shared.test", "waiting.test"]);
    snap.addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| address(ip, v1::AddressState::Warm))
        .collect();
    // example.test leaves only from 127.0.0.3; waiting.test's address is not on this relay.
    snap.domains[0].addresses = vec!["127.0.0.3".into()];
    snap.domains[2].addresses = vec!["127.0.0.9".into()];
    s.server.push(snap);
    assert!(wait_until(10, || relay.applied_version() == 1).await);
    let smtp = relay.relay().smtp_addr;
    let to: Vec<String> = (0..6).map(|i| format!("d{i}@dest.example.test")).collect();
    submit(smtp, "s@example.test", &to).await;
    submit(smtp, "s@shared.test", &to).await;
    submit(smtp, "s@waiting.test", &to[..2]).await;

    let msgs = s.sink.wait_for(12, 20);
    assert_eq!(msgs.len(), 12);
    let dedicated: Vec<_> = msgs
        .iter()
        .filter(|(_, m)| header(m, "X-Sink-From") == Some("s@example.test"))
        .cloned()
        .collect();
    assert_eq!(
        by_peer(&dedicated),
        BTreeMap::from([("127.0.0.3".to_string(), 6)])
    );
    let shared: Vec<_> = msgs
        .iter()
        .filter(|(_, m)| header(m, "X-Sink-From") == Some("s@shared.test"))
        .cloned()
        .collect();
    assert_eq!(
        by_peer(&shared),
        BTreeMap::from([
            ("127.0.0.2".to_string(), 2),
            ("127.0.0.3".to_string(), 2),
            ("127.0.0.4".to_string(), 2)
        ])
    );
    // waiting.test's mail waits for its address.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(s.sink.messages().len(), 12);
    assert_eq!(relay.relay().delivery.queued_messages(), 2);
    relay.shutdown(Duration::from_secs(2)).await;
    s.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_relay_takes_complaints_with_the_token_hash_of_its_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &[("127.0.0.2", "out2.example.test")]);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.delivery
        .routes
        .insert("*".into(), "127.0.0.1:9".parse().unwrap());
    let yaml = format!("tokenSha256: {}\n", sha256_hex(TOKEN));
    cfg.feedback = serde_yaml::from_str(&yaml).unwrap();
    let relay = mailfleet_relay::Relay::start(cfg).await.unwrap();
    let http = relay.http_addr.unwrap();
    let (status, _) = post_feedback(http, Some("guess"), ARF).await;
    assert_eq!(status, 401);
    let (status, body) = post_feedback(http, Some(TOKEN), ARF).await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("complainer@dest.example.test"), "{body}");
    let r = rcpt_reply(
        relay.smtp_addr,
        "s@example.test",
        "complainer@dest.example.test",
    )
    .await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    let metrics = http_get(http, "/metrics").await;
    assert!(
        metrics.contains(
            "mailfleet_relay_complaints_total{address=\"127.0.0.2\",provider=\"other\"} 1"
        ),
        "{metrics}"
    );
    relay.shutdown(Duration::from_secs(2)).await;
}
