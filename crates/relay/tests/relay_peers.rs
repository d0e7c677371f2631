//! End-to-end tests of the relay against real peers: swaks as the submitting client, Knot
//! serving MX records, the aiosmtpd sink (hack/relay-sink.py) as MX recording the source
//! address and EHLO name it saw, and dkimpy verifying the DKIM signatures independently.
//! The kill -9 test runs the relay in a child process (this test binary re-executed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mailfleet_relay::Relay;
use mailfleet_relay::client::Outcome;
use mailfleet_relay::config::OverflowPolicy;

fn swaks(relay: SocketAddr, from: &str, to: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new(require("swaks"))
        .args([
            "--server",
            &relay.ip().to_string(),
            "--port",
            &relay.port().to_string(),
        ])
        .args(["--from", from, "--to", to, "--h-Subject", "relay test"])
        .args(["--ehlo", "client.example.test"])
        .args(extra)
        .output()
        .unwrap();
    outcome(&out)
}

async fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_via_knot_mx_from_bound_address_with_valid_dkim() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let sink = Sink::start(dir.path(), &[]);
    let knot = Knot::start(
        dir.path(),
        &[
            "dest.example.test. 60 MX 10 mx1.example.test.",
            "mx1.example.test. 60 A 127.0.0.1",
        ],
    );
    let mut cfg = config(dir.path(), &[("127.0.0.2", "out2.example.test")]);
    cfg.delivery.nameservers = vec![knot.addr()];
    cfg.delivery.port = sink.port;
    cfg.sending_domains[0].dkim = keys.dkim_configs();
    let relay = Relay::start(cfg).await.unwrap();
    let addr = relay.smtp_addr;
    let (ok, out) = tokio::task::spawn_blocking(move || {
        swaks(
            addr,
            "sender@example.test",
            "user@dest.example.test",
            &[
                "--h-From",
                "Sender <sender@example.test>",
                "--body",
                "Hello.\n.leading dot\n",
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "swaks failed:\n{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");

    let msgs = sink.wait_for(1, 20);
    assert_eq!(msgs.len(), 1, "the sink got no message");
    let m = &msgs[0].1;
    // The connection left from the configured egress address with its EHLO name.
    assert_eq!(header(m, "X-Sink-Peer"), Some("127.0.0.2"));
    assert_eq!(header(m, "X-Sink-Helo"), Some("out2.example.test"));
    assert_eq!(header(m, "X-Sink-From"), Some("sender@example.test"));
    assert_eq!(header(m, "X-Sink-To"), Some("user@dest.example.test"));
    assert!(
        m.contains("\r\n.leading dot\r\n"),
        "dot-stuffing broke the body: {m}"
    );
    let (verified, report) = dkim_verify(dir.path(), &keys, m);
    assert!(verified, "dkimpy rejected the signatures:\n{report}\n{m}");
    assert!(report.contains("ok a=rsa-sha256 s=rsa"), "{report}");
    assert!(report.contains("ok a=ed25519-sha256 s=ed"), "{report}");
    let h = report.to_ascii_lowercase();
    assert!(
        h.matches("from").count() >= 4,
        "From must be over-signed in both: {report}"
    );

    assert!(
        wait_until(5, || relay.metrics.deliveries().get(&(
            Some("127.0.0.2".parse().unwrap()),
            mailfleet_relay::ProviderGroup::Other,
            Outcome::Delivered
        )) == Some(&1))
        .await,
        "{:?}",
        relay.metrics.deliveries()
    );
    relay.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_mx_bounces_with_dsn_and_mx_name_decides_provider_group() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(dir.path(), &[]);
    let knot = Knot::start(
        dir.path(),
        &[
            "nullmx.example.test. 60 MX 0 .",
            "example.test. 60 MX 10 mx1.example.test.",
            "gdest.example.test. 60 MX 5 gmx.example.test.",
            "gmx.example.test. 60 A 127.0.0.1",
            "mx1.example.test. 60 A 127.0.0.1",
        ],
    );
    let mut cfg = config(dir.path(), &[("127.0.0.3", "out3.example.test")]);
    cfg.delivery.nameservers = vec![knot.addr()];
    cfg.delivery.port = sink.port;
    cfg.shaping.mx_suffixes.insert(
        "gmx.example.test".into(),
        mailfleet_relay::ProviderGroup::Gmail,
    );
    let relay = Relay::start(cfg).await.unwrap();

    let mut c = Client::connect_from("127.0.0.1", relay.smtp_addr).await;
    assert!(c.cmd("EHLO client.example.test").await.starts_with("250"));
    assert!(
        c.cmd("MAIL FROM:<sender@example.test>")
            .await
            .starts_with("250")
    );
    assert!(
        c.cmd("RCPT TO:<a@nullmx.example.test>")
            .await
            .starts_with("250")
    );
    assert!(
        c.cmd("RCPT TO:<b@gdest.example.test>")
            .await
            .starts_with("250")
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    let r = c
        .cmd("From: sender@example.test\r\nSubject: x\r\n\r\nbody\r\n.")
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    c.cmd("QUIT").await;

    // One message to gdest, one DSN to the sender about the null MX.
    let msgs = sink.wait_for(2, 20);
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let dsn = msgs
        .iter()
        .map(|m| &m.1)
        .find(|m| header(m, "X-Sink-To") == Some("sender@example.test"))
        .expect("no DSN reached the sender");
    assert_eq!(
        header(dsn, "X-Sink-From"),
        Some("<>"),
        "DSNs use the null return path"
    );
    assert!(
        dsn.contains("Final-Recipient: rfc822; a@nullmx.example.test"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.1.10"), "{dsn}");
    let d = relay.metrics.deliveries();
    let ip3: IpAddr = "127.0.0.3".parse().unwrap();
    assert_eq!(
        d.get(&(
            Some(ip3),
            mailfleet_relay::ProviderGroup::Gmail,
            Outcome::Delivered
        )),
        Some(&1),
        "{d:?}"
    );
    assert_eq!(
        d.get(&(
            None,
            mailfleet_relay::ProviderGroup::Other,
            Outcome::Bounced
        )),
        Some(&1),
        "{d:?}"
    );
    relay.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_replies_are_classified_retried_and_bounced() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(
        dir.path(),
        &[
            "--reject-rcpt",
            "gone",
            "--tempfail-rcpt",
            "later",
            "--block-rcpt",
            "blocked",
        ],
    );
    let mut cfg = config(dir.path(), &[("127.0.0.4", "out4.example.test")]);
    cfg.delivery
        .routes
        .insert("*".into(), SocketAddr::from(([127, 0, 0, 1], sink.port)));
    cfg.delivery.max_lifetime = Duration::from_secs(2);
    let relay = Relay::start(cfg).await.unwrap();
    let mut c = Client::connect_from("127.0.0.1", relay.smtp_addr).await;
    c.cmd("EHLO client.example.test").await;
    // Pipelined: one write for the whole transaction.
    c.send(
        "MAIL FROM:<sender@example.test>\r\nRCPT TO:<ok@dest.test>\r\nRCPT TO:<gone@dest.test>\r\n\
         RCPT TO:<blocked@dest.test>\r\nRCPT TO:<later@dest.test>\r\nDATA\r\n",
    )
    .await;
    for _ in 0..6 {
        let r = c.reply().await;
        assert!(r.starts_with("250") || r.starts_with("354"), "{r}");
    }
    let r = c.cmd("Subject: classify\r\n\r\nbody\r\n.").await;
    assert!(r.starts_with("250"), "{r}");

    // ok delivered; DSNs for gone (5.1.1), blocked (5.7.1) and later (expired after 2 s).
    let msgs = sink.wait_for(4, 20);
    assert_eq!(msgs.len(), 4, "{msgs:#?}");
    let dsns: Vec<&String> = msgs
        .iter()
        .map(|m| &m.1)
        .filter(|m| header(m, "X-Sink-From") == Some("<>"))
        .collect();
    assert_eq!(dsns.len(), 3);
    let all = dsns
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains("Status: 5.1.1"), "{all}");
    assert!(all.contains("Status: 5.7.1"), "{all}");
    assert!(all.contains("Status: 5.4.7"), "{all}");
    let ip: IpAddr = "127.0.0.4".parse().unwrap();
    let g = mailfleet_relay::ProviderGroup::Other;
    let d = relay.metrics.deliveries();
    assert_eq!(d.get(&(Some(ip), g, Outcome::Blocked)), Some(&1), "{d:?}");
    // 4 = the message to ok@ and the three DSNs.
    assert_eq!(d.get(&(Some(ip), g, Outcome::Delivered)), Some(&4), "{d:?}");
    assert!(
        d.get(&(Some(ip), g, Outcome::Deferred))
            .copied()
            .unwrap_or(0)
            >= 2,
        "{d:?}"
    );
    assert_eq!(relay.metrics.total(Outcome::Bounced), 2, "{d:?}");
    assert!(wait_until(5, || relay.delivery.queued_messages() == 0).await);
    relay.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_smtp_replies() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &[("127.0.0.2", "out2.example.test")]);
    cfg.delivery
        .routes
        .insert("*".into(), SocketAddr::from(([127, 0, 0, 1], 9)));
    cfg.listener.max_bad_commands = 5;
    let relay = Relay::start(cfg).await.unwrap();
    let addr = relay.smtp_addr;

    // Never an open relay: a client outside the allowed networks may not send.
    let mut c = Client::connect_from("127.0.0.5", addr).await;
    let ehlo = c.cmd("EHLO outsider.test").await;
    for ext in [
        "PIPELINING",
        "SIZE 200000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing in {ehlo}");
    }
    assert!(
        !ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    let r = c.cmd("MAIL FROM:<sender@example.test>").await;
    assert!(r.starts_with("550 5.7.1") && r.contains("127.0.0.5"), "{r}");

    let mut c = Client::connect_from("127.0.0.1", addr).await;
    assert!(
        c.cmd("MAIL FROM:<sender@example.test>")
            .await
            .starts_with("503 5.5.1")
    );
    c.cmd("EHLO client.test").await;
    let r = c.cmd("MAIL FROM:<someone@other.test>").await;
    assert!(r.starts_with("550 5.7.1 Sender domain other.test"), "{r}");
    let r = c.cmd("MAIL FROM:<x@example.test> SIZE=999999").await;
    assert!(r.starts_with("552 5.3.4"), "{r}");
    assert!(
        c.cmd("RCPT TO:<a@dest.test>")
            .await
            .starts_with("503 5.5.1")
    );
    // Subdomains of a sending domain (bounce domains) are fine.
    assert!(
        c.cmd("MAIL FROM:<b@bounce.example.test>")
            .await
            .starts_with("250")
    );
    for i in 0..5 {
        assert!(
            c.cmd(&format!("RCPT TO:<r{i}@dest.test>"))
                .await
                .starts_with("250")
        );
    }
    assert!(
        c.cmd("RCPT TO:<r6@dest.test>")
            .await
            .starts_with("452 4.5.3")
    );
    let long = format!("NOOP {}", "x".repeat(5000));
    assert!(c.cmd(&long).await.starts_with("500 5.5.2"));
    assert!(c.cmd("RSET").await.starts_with("250"));
    // Oversized DATA is read to its end and refused.
    c.cmd("MAIL FROM:<b@example.test>").await;
    c.cmd("RCPT TO:<r@dest.test>").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    let big = "y".repeat(999) + "\r\n";
    let mut body = String::new();
    for _ in 0..250 {
        body.push_str(&big);
    }
    c.send(&body).await;
    assert!(c.cmd(".").await.starts_with("552 5.3.4"));
    // Bad commands end the session after maxBadCommands (5: two out-of-sequence commands,
    // the long line, and these two).
    assert!(c.cmd("BOGUS").await.starts_with("500 5.5.1"));
    assert!(c.cmd("BOGUS").await.starts_with("500 5.5.1"));
    let r = c.reply().await;
    assert!(r.starts_with("421 4.7.0"), "{r}");
    assert_eq!(c.reply().await, "", "the session must be closed");
    assert!(relay.metrics.render().contains("reason=\"not_allowed\"} 1"));
    relay.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_move_mail_to_addresses_with_quota_left() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(dir.path(), &[]);
    let mut cfg = config(
        dir.path(),
        &[
            ("127.0.0.2", "out2.example.test"),
            ("127.0.0.3", "out3.example.test"),
        ],
    );
    cfg.egress[0].daily_quota = Some(3);
    cfg.egress[1].daily_quota = Some(2);
    cfg.shaping.overflow = OverflowPolicy::OtherAddress;
    cfg.delivery
        .routes
        .insert("*".into(), SocketAddr::from(([127, 0, 0, 1], sink.port)));
    let relay = Relay::start(cfg).await.unwrap();
    let mut c = Client::connect_from("127.0.0.1", relay.smtp_addr).await;
    c.cmd("EHLO client.test").await;
    for i in 0..7 {
        c.cmd("MAIL FROM:<s@example.test>").await;
        c.cmd(&format!("RCPT TO:<r{i}@dest.test>")).await;
        c.cmd("DATA").await;
        assert!(c.cmd("Subject: q\r\n\r\nx\r\n.").await.starts_with("250"));
    }
    let msgs = sink.wait_for(5, 20);
    // The two over the total quota wait in the queue.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let msgs = if msgs.len() < 5 {
        msgs
    } else {
        sink.messages()
    };
    let mut by_peer: BTreeMap<String, usize> = BTreeMap::new();
    for (_, m) in &msgs {
        *by_peer
            .entry(header(m, "X-Sink-Peer").unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        by_peer,
        BTreeMap::from([("127.0.0.2".to_string(), 3), ("127.0.0.3".to_string(), 2)])
    );
    assert_eq!(relay.delivery.queued_messages(), 2);
    let usage = relay
        .delivery
        .shaper
        .usage(mailfleet_relay::shaping::unix_now());
    assert!(
        usage.iter().all(|u| Some(u.sent_today) == u.daily_quota),
        "{usage:?}"
    );
    relay.shutdown(Duration::from_secs(5)).await;
}

/// Not a test on its own: the relay process of `kill_9_under_load_loses_nothing`, started by
/// re-executing this test binary with MAILFLEET_RELAY_CHILD set to a config file.
#[test]
#[ignore = "helper process of kill_9_under_load_loses_nothing"]
fn relay_child_process() {
    let Some(path) = std::env::var_os("MAILFLEET_RELAY_CHILD") else {
        return;
    };
    let cfg = mailfleet_relay::RelayConfig::from_file(std::path::Path::new(&path)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let relay = Relay::start(cfg).await.unwrap();
        println!("ready {}", relay.smtp_addr);
        std::future::pending::<()>().await;
    });
}

fn spawn_child_relay(cfg_path: &std::path::Path) -> Proc {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args(["--exact", "relay_child_process", "--ignored", "--nocapture"])
        .env("MAILFLEET_RELAY_CHILD", cfg_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(cfg_path.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    Proc(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(dir.path(), &[]);
    let port = free_port();
    let mut cfg = config(dir.path(), &[("127.0.0.2", "out2.example.test")]);
    cfg.listener.listen = SocketAddr::from(([127, 0, 0, 1], port));
    cfg.delivery
        .routes
        .insert("*".into(), SocketAddr::from(([127, 0, 0, 1], sink.port)));
    // Slow delivery down so that the spool holds plenty when the relay dies.
    cfg.egress[0].messages_per_second = Some(100.0);
    let cfg_path = dir.path().join("relay.yaml");
    std::fs::write(&cfg_path, serde_yaml::to_string(&cfg).unwrap()).unwrap();

    let mut relay = spawn_child_relay(&cfg_path);
    wait_port(port);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for session in 0..8 {
        let accepted = accepted.clone();
        clients.push(tokio::spawn(async move {
            let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
                return;
            };
            let Ok(stream) = sock.connect(addr).await else {
                return;
            };
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            let mut r = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            let _ = r.read_line(&mut line).await;
            for i in 0.. {
                let id = format!("s{session}-m{i}");
                let tx = format!(
                    "{}MAIL FROM:<s@example.test>\r\nRCPT TO:<r@dest.test>\r\nDATA\r\n",
                    if i == 0 { "EHLO load.test\r\n" } else { "" }
                );
                if r.get_mut().write_all(tx.as_bytes()).await.is_err() {
                    return;
                }
                let replies = if i == 0 { 4 } else { 3 };
                for _ in 0..replies {
                    // Multi-line EHLO: read until a line with a space after the code.
                    loop {
                        line.clear();
                        match r.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            _ => {}
                        }
                        if line.as_bytes().get(3) != Some(&b'-') {
                            break;
                        }
                    }
                }
                let body = format!(
                    "X-Test-Id: {id}\r\nSubject: load\r\n\r\n{}.\r\n",
                    format!("{}\r\n", "z".repeat(98)).repeat(10)
                );
                if r.get_mut().write_all(body.as_bytes()).await.is_err() {
                    return;
                }
                line.clear();
                match r.read_line(&mut line).await {
                    Ok(n) if n > 0 && line.starts_with("250") => accepted.lock().unwrap().push(id),
                    _ => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // kill -9: no drain, no flush, no goodbye.
    relay.0.kill().unwrap();
    relay.0.wait().unwrap();
    for c in clients {
        let _ = c.await;
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 100, "too little load: {}", accepted.len());
    let delivered_before = sink.messages().len();
    assert!(
        delivered_before < accepted.len(),
        "the spool should still hold mail at the kill ({delivered_before} of {})",
        accepted.len()
    );

    let _relay = spawn_child_relay(&cfg_path);
    wait_port(port);
    let secs = 30 + accepted.len() as u64 / 50;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let missing = loop {
        let seen: std::collections::HashSet<String> = sink
            .messages()
            .iter()
            .filter_map(|(_, m)| header(m, "X-Test-Id").map(str::to_string))
            .collect();
        let missing: Vec<&String> = accepted.iter().filter(|id| !seen.contains(*id)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.len();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if missing > 0 {
        let some = sink.messages().into_iter().take(2).collect::<Vec<_>>();
        let log = std::fs::read_to_string(cfg_path.with_extension("log")).unwrap_or_default();
        let spool: Vec<_> = std::fs::read_dir(dir.path().join("spool"))
            .unwrap()
            .flatten()
            .map(|e| (e.file_name(), e.metadata().unwrap().len()))
            .collect();
        eprintln!("sink sample: {some:?}\nrelay log: {log}\nspool: {spool:?}");
    }
    assert_eq!(
        missing,
        0,
        "accepted messages lost after kill -9 (of {})",
        accepted.len()
    );
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_auth_with_swaks_and_http_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = Command::new(require("openssl"))
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        ])
        .arg("/CN=relay.example.test")
        .args(["-keyout", "tls.key", "-out", "tls.crt"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sink = Sink::start(d, &[]);
    let mut cfg = config(d, &[("127.0.0.2", "out2.example.test")]);
    // Nobody is trusted by address: every client must authenticate.
    cfg.listener.allowed_networks = vec!["10.0.0.0/8".parse().unwrap()];
    cfg.listener.tls = Some(mailfleet_relay::config::TlsFiles {
        cert: d.join("tls.crt"),
        key: d.join("tls.key"),
    });
    cfg.listener.users = vec![mailfleet_relay::config::UserConfig {
        name: "app".into(),
        password: "s3cret".into(),
    }];
    cfg.delivery
        .routes
        .insert("*".into(), SocketAddr::from(([127, 0, 0, 1], sink.port)));
    cfg.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let relay = Relay::start(cfg).await.unwrap();
    let addr = relay.smtp_addr;

    // In clear text: STARTTLS offered, AUTH not, and no mail without authentication.
    let mut c = Client::connect_from("127.0.0.1", addr).await;
    let ehlo = c.cmd("EHLO c.test").await;
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    assert!(
        c.cmd("AUTH PLAIN AGFwcABzM2NyZXQ=")
            .await
            .starts_with("538 5.7.11")
    );
    assert!(
        c.cmd("MAIL FROM:<s@example.test>")
            .await
            .starts_with("530 5.7.0")
    );

    let (ok, log) = tokio::task::spawn_blocking(move || {
        swaks(
            addr,
            "s@example.test",
            "u@dest.test",
            &[
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                "app",
                "--auth-password",
                "s3cret",
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{log}");
    assert!(log.contains("235 2.7.0"), "{log}");
    let (ok, log) = tokio::task::spawn_blocking(move || {
        swaks(
            addr,
            "s@example.test",
            "u@dest.test",
            &[
                "--tls",
                "--auth",
                "LOGIN",
                "--auth-user",
                "app",
                "--auth-password",
                "wrong",
            ],
        )
    })
    .await
    .unwrap();
    assert!(!ok && log.contains("535 5.7.8"), "{log}");
    let msgs = sink.wait_for(1, 20);
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].1.contains("with ESMTPSA"), "{}", msgs[0].1);

    let http = relay.http_addr.unwrap();
    let (h, r, m) = tokio::task::spawn_blocking(move || {
        (
            http_get(http, "/healthz"),
            http_get(http, "/readyz"),
            http_get(http, "/metrics"),
        )
    })
    .await
    .unwrap();
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(m.contains("mailfleet_relay_accepted_total 1"), "{m}");
    assert!(m.contains("reason=\"auth_failed\"} 1"), "{m}");
    relay.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_tells_idle_sessions_and_stops_listening() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &[("127.0.0.2", "out2.example.test")]);
    cfg.delivery
        .routes
        .insert("*".into(), SocketAddr::from(([127, 0, 0, 1], 9)));
    let relay = Relay::start(cfg).await.unwrap();
    let addr = relay.smtp_addr;
    let mut c = Client::connect_from("127.0.0.1", addr).await;
    assert!(c.cmd("EHLO c.test").await.starts_with("250"));
    let drain = tokio::spawn(relay.shutdown(Duration::from_secs(30)));
    let r = c.reply().await;
    assert!(r.starts_with("421 4.3.2"), "{r}");
    drain.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
}
