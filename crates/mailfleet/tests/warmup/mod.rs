//! Helpers of warmup_e2e.rs: the manifests of its plans and pools, an SMTP sender, the plans'
//! state per address, arrivals at the sink per source address and window, Events, and ARF
//! complaints posted to a relay's feedback endpoint.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::common::{Client, Sink, header};
use crate::e2e::{Target, eventually};

pub const WINDOW_SECS: f64 = 4.0;

pub fn plan_manifest(name: &str, body: &str) -> String {
    format!(
        "apiVersion: mailfleet.dev/v1alpha1\nkind: WarmupPlan\nmetadata:\n  name: {name}\nspec:\n  window: 4s\n  idleResetDays: 0\n{body}---\n"
    )
}

pub fn pool_manifest(
    name: &str,
    addresses: &[&str],
    smtp_port: u16,
    sink: u16,
    knot: u16,
) -> String {
    let list: Vec<String> = addresses
        .iter()
        .map(|a| format!("      - address: {a}\n        heloName: {name}.relay.example.test\n"))
        .collect();
    format!(
        r#"apiVersion: mailfleet.dev/v1alpha1
kind: RelayPool
metadata:
  name: {name}
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
pub fn send(
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

pub fn recipients(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}-{i}@dest.example.test"))
        .collect()
}

pub fn plan(t: &Target, name: &str) -> Value {
    t.get(&["warmupplan", name])
}

pub fn address<'a>(plan: &'a Value, ip: &str) -> Option<&'a Value> {
    plan["status"]["addresses"]
        .as_array()?
        .iter()
        .find(|a| a["address"] == ip)
}

pub fn state_of(plan: &Value, ip: &str) -> (i64, String) {
    address(plan, ip).map_or((0, String::new()), |a| {
        (
            a["stage"].as_i64().unwrap_or(0),
            a["state"].as_str().unwrap_or_default().to_string(),
        )
    })
}

pub fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

pub fn parse_time(v: &Value) -> f64 {
    let s = v.as_str().unwrap();
    let t: k8s_openapi::jiff::Timestamp = s.parse().unwrap();
    t.as_millisecond() as f64 / 1000.0
}

/// Arrival times at the sink per source address.
pub fn arrivals(sink: &Sink, to_domain_prefix: &str) -> BTreeMap<String, Vec<f64>> {
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
pub fn all_arrived(
    t: &Target,
    sink: &Sink,
    prefix: &str,
    n: usize,
    what: &str,
) -> BTreeMap<String, Vec<f64>> {
    eventually(t.secs(60), what, || {
        let a = arrivals(sink, prefix);
        (a.values().map(Vec::len).sum::<usize>() == n).then_some(a)
    })
}

/// Reasons and notes of the Events about WarmupPlan `name`.
pub fn events(t: &Target, name: &str) -> String {
    let list = t.get(&["events.events.k8s.io"]);
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["regarding"]["kind"] == "WarmupPlan" && e["regarding"]["name"] == name)
        .map(|e| format!("{} {}\n", e["reason"], e["note"]))
        .collect()
}

/// An ARF (RFC 5965) complaint about a message from `source` for `domain` to `rcpt`.
pub fn arf(source: &str, domain: &str, rcpt: &str) -> String {
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
pub fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> String {
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
