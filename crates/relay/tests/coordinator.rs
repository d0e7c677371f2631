//! Coordinated mode against an in-test Coordinator (the generated tonic server trait, mTLS
//! with rcgen-made certificates, in tests/coordinator_harness), with Knot serving MX records
//! and the aiosmtpd sink as MX: registration, live reconfiguration, quotas, sequenced reports
//! that survive lost acks and restarts, the stored snapshot when the coordinator is gone, and
//! certificate checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod coordinator_harness;

use std::time::Duration;

use common::*;
use coordinator_harness::*;
use mailfleet_proto::v1;
use mailfleet_relay::coordinator::Coordinated;
use tonic::transport::Certificate;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_config_applies_live_and_quota_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(dir.path(), &[]);
    let knot = knot(dir.path());
    let ca = Ca::new("mailfleet test ca");
    let server_cert = ca.issue(&[mailfleet_proto::COORDINATOR_SERVER_NAME], false);
    let client_cert = ca.issue(&["pool-a"], true);
    let server = TestServer::start("127.0.0.1:0".parse().unwrap(), &ca, &server_cert, None).await;

    let relay = Coordinated::start(
        base(dir.path()),
        None,
        options(&server.url(), &ca, &client_cert, dir.path()),
    )
    .await
    .unwrap();
    let smtp = relay.relay().smtp_addr;
    let http = relay.relay().http_addr.unwrap();

    // Registered, but no configuration yet: not ready, sessions refused with 421.
    assert!(wait_until(10, || !server.state().registrations.is_empty()).await);
    {
        let st = server.state();
        let reg = &st.registrations[0];
        assert_eq!(
            (
                reg.pod_name.as_str(),
                reg.pod_namespace.as_str(),
                reg.pod_uid.as_str()
            ),
            ("pool-a-0", "mail", "uid-0")
        );
    }
    assert_eq!(http_status(http, "/readyz").await, 503);
    let g = greeting(smtp).await;
    assert!(g.starts_with("421 4.3.0 "), "{g}");
    assert!(g.contains("not ready"), "{g}");

    // Version 1: example.test from 127.0.0.2.
    server.push(snapshot(1, &["example.test"], knot.addr(), sink.port));
    assert!(wait_until(10, || relay.applied_version() == 1).await);
    assert_eq!(http_status(http, "/readyz").await, 200);
    let (mail, data) = send_mail(smtp, "s@example.test", "u@dest.example.test").await;
    assert!(mail.starts_with("250"), "{mail}");
    assert!(data.starts_with("250 2.0.0"), "{data}");
    let msgs = sink.wait_for(1, 20);
    assert_eq!(msgs.len(), 1);
    assert_eq!(header(&msgs[0].1, "X-Sink-Peer"), Some("127.0.0.2"));
    assert_eq!(
        header(&msgs[0].1, "X-Sink-Helo"),
        Some("out-127.0.0.2.example.test")
    );
    assert!(
        msgs[0].1.contains("DKIM-Signature:") && msgs[0].1.contains("s=ed"),
        "{}",
        msgs[0].1
    );
    // Suppressed recipients of the domain are refused at RCPT.
    let mut c = Client::connect_from("127.0.0.1", smtp).await;
    c.cmd("EHLO client.example.test").await;
    assert!(c.cmd("MAIL FROM:<s@example.test>").await.starts_with("250"));
    let r = c.cmd("RCPT TO:<blocked@dest.example.test>").await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    c.cmd("RSET").await;

    // Version 2 removes example.test: the open session sees it at its next MAIL FROM.
    server.push(snapshot(2, &["other.example"], knot.addr(), sink.port));
    assert!(wait_until(10, || relay.applied_version() == 2).await);
    let r = c.cmd("MAIL FROM:<s@example.test>").await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    assert!(r.contains("example.test"), "{r}");
    c.cmd("QUIT").await;

    // Version 3: example.test again, with a quota of one message per window on 127.0.0.2.
    let mut v3 = snapshot(3, &["example.test"], knot.addr(), sink.port);
    let now = mailfleet_relay::shaping::unix_now() as i64;
    v3.quotas = vec![v1::AddressQuota {
        address: "127.0.0.2".into(),
        provider_group: String::new(),
        window_limit: 1,
        hourly_limit: 0,
        window_start_unix: now - 10,
        window_seconds: 3600,
        overflow_to_warm: false,
    }];
    server.push(v3);
    assert!(wait_until(10, || relay.applied_version() == 3).await);
    for i in 0..2 {
        let (mail, data) =
            send_mail(smtp, "s@example.test", &format!("q{i}@dest.example.test")).await;
        assert!(
            mail.starts_with("250") && data.starts_with("250"),
            "{mail} {data}"
        );
    }
    let msgs = sink.wait_for(2, 20);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sink.messages().len(), 2, "{msgs:?}");
    assert_eq!(relay.relay().delivery.queued_messages(), 1);

    // Version 4 pauses the only address: not ready, new sessions refused.
    let mut v4 = snapshot(4, &["example.test"], knot.addr(), sink.port);
    v4.addresses = vec![address("127.0.0.2", v1::AddressState::Paused)];
    server.push(v4);
    assert!(wait_until(10, || relay.applied_version() == 4).await);
    assert_eq!(http_status(http, "/readyz").await, 503);
    assert!(greeting(smtp).await.starts_with("421 4.3.0"));

    // Reports: consecutive sequences, the two deliveries counted for 127.0.0.2 and
    // example.test, and version 4 confirmed as applied completely.
    assert!(
        wait_until(10, || {
            server
                .state()
                .received
                .iter()
                .any(|r| r.applied_config_version == 4)
        })
        .await
    );
    assert!(wait_until(10, || delivered(&server, "127.0.0.2") == 2).await);
    {
        let st = server.state();
        let seqs: Vec<u64> = st.received.iter().map(|r| r.sequence).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert_eq!(seqs.first(), Some(&1));
        assert!(st.received.iter().all(|r| r.pod_name == "pool-a-0"));
        let domains: Vec<&str> = st
            .counted
            .keys()
            .filter(|(a, _, _)| a == "127.0.0.2")
            .map(|(_, _, d)| d.as_str())
            .collect();
        assert!(domains.iter().all(|d| *d == "example.test"), "{domains:?}");
    }

    // The last snapshot is stored, readable by the owner only.
    let stored = dir.path().join("spool/coordinator/config.pb");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        mailfleet_relay::coordinator::load_snapshot(stored.parent().unwrap())
            .unwrap()
            .unwrap()
            .version,
        4
    );
    relay.shutdown(Duration::from_secs(2)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_survive_lost_acks_and_restarts_and_the_stored_snapshot_keeps_the_relay_going() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(dir.path(), &[]);
    let knot = knot(dir.path());
    let ca = Ca::new("mailfleet test ca");
    let server_cert = ca.issue(&[mailfleet_proto::COORDINATOR_SERVER_NAME], false);
    let client_cert = ca.issue(&["pool-a"], true);
    let server = TestServer::start("127.0.0.1:0".parse().unwrap(), &ca, &server_cert, None).await;
    server.push(snapshot(7, &["example.test"], knot.addr(), sink.port));
    let url = server.url();

    let relay = Coordinated::start(
        base(dir.path()),
        None,
        options(&url, &ca, &client_cert, dir.path()),
    )
    .await
    .unwrap();
    assert!(wait_until(10, || relay.applied_version() == 7).await);
    let smtp = relay.relay().smtp_addr;

    // The ack of the report with the first delivery is lost: the relay sends that sequence
    // again and the coordinator recognizes it.
    assert!(wait_until(10, || !server.state().received.is_empty()).await);
    server.state().lose_next_ack = true;
    let (_, data) = send_mail(smtp, "s@example.test", "a@dest.example.test").await;
    assert!(data.starts_with("250"), "{data}");
    assert_eq!(sink.wait_for(1, 20).len(), 1);
    assert!(
        wait_until(10, || {
            let st = server.state();
            let mut seqs: Vec<u64> = st.received.iter().map(|r| r.sequence).collect();
            let n = seqs.len();
            seqs.dedup();
            n > seqs.len() && relay.pending_reports().is_empty()
        })
        .await,
        "no duplicate was sent: {:?}",
        server
            .state()
            .received
            .iter()
            .map(|r| r.sequence)
            .collect::<Vec<_>>()
    );
    assert_eq!(delivered(&server, "127.0.0.2"), 1);

    // The coordinator stops taking reports; a delivery's report waits on disk, and the relay
    // restarts before it is acknowledged.
    server.state().refuse_reports = true;
    let (_, data) = send_mail(smtp, "s@example.test", "b@dest.example.test").await;
    assert!(data.starts_with("250"), "{data}");
    assert_eq!(sink.wait_for(2, 20).len(), 2);
    assert!(wait_until(10, || !relay.pending_reports().is_empty()).await);
    relay.shutdown(Duration::from_secs(2)).await;
    let addr = server.addr;
    let carried = server.carry_over();
    server.stop().await;

    // The coordinator is gone: the restarted relay carries on with the stored snapshot.
    let relay = Coordinated::start(
        base(dir.path()),
        None,
        options(&url, &ca, &client_cert, dir.path()),
    )
    .await
    .unwrap();
    let pending = relay.pending_reports();
    assert!(!pending.is_empty());
    assert!(wait_until(10, || relay.applied_version() == 7).await);
    let smtp = relay.relay().smtp_addr;
    let http = relay.relay().http_addr.unwrap();
    assert_eq!(http_status(http, "/readyz").await, 200);
    let (_, data) = send_mail(smtp, "s@example.test", "c@dest.example.test").await;
    assert!(data.starts_with("250"), "{data}");
    let msgs = sink.wait_for(3, 20);
    assert_eq!(msgs.len(), 3);
    assert!(
        msgs.iter()
            .any(|(_, m)| header(m, "X-Sink-To") == Some("c@dest.example.test"))
    );
    // The third delivery's report is written with the next sequence.
    assert!(
        wait_until(10, || relay.pending_reports().len() > pending.len()).await,
        "{:?}",
        relay.pending_reports()
    );
    assert!(relay.pending_reports().iter().min() == pending.iter().min());

    // The coordinator comes back (same address, same memory): the relay registers again,
    // drops nothing it has not applied, and every delivery is counted exactly once.
    carried.0.lock().unwrap().refuse_reports = false;
    let server = TestServer::start(addr, &ca, &server_cert, Some(carried)).await;
    assert!(
        wait_until(15, || relay.pending_reports().is_empty()).await,
        "{:?}",
        relay.pending_reports()
    );
    assert!(wait_until(10, || delivered(&server, "127.0.0.2") == 3).await);
    {
        let st = server.state();
        let applied: Vec<u64> = {
            let mut v: Vec<u64> = st.received.iter().map(|r| r.sequence).collect();
            v.dedup();
            v
        };
        assert!(applied.windows(2).all(|w| w[1] >= w[0]), "{applied:?}");
        assert_eq!(st.applied, *applied.iter().max().unwrap());
        assert!(st.registrations.len() >= 2);
    }
    relay.shutdown(Duration::from_secs(2)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_refuses_a_coordinator_certificate_not_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mailfleet test ca");
    let rogue = Ca::new("someone else");
    // The coordinator presents a certificate for the right name, from another CA.
    let rogue_cert = rogue.issue(&[mailfleet_proto::COORDINATOR_SERVER_NAME], false);
    let client_cert = ca.issue(&["pool-a"], true);
    let server = TestServer::start("127.0.0.1:0".parse().unwrap(), &ca, &rogue_cert, None).await;
    server.push(v1::RelayConfig {
        version: 1,
        ..Default::default()
    });
    let relay = Coordinated::start(
        base(dir.path()),
        None,
        options(&server.url(), &ca, &client_cert, dir.path()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(server.state().registrations.is_empty());
    assert_eq!(relay.registrations(), 0);
    assert_eq!(relay.applied_version(), 0);
    let http = relay.relay().http_addr.unwrap();
    assert_eq!(http_status(http, "/readyz").await, 503);
    assert!(
        greeting(relay.relay().smtp_addr)
            .await
            .starts_with("421 4.3.0")
    );
    relay.shutdown(Duration::from_secs(1)).await;
    server.stop().await;

    // The right certificate but for another name is refused too.
    let wrong_name = ca.issue(&["elsewhere.example.test"], false);
    let server = TestServer::start("127.0.0.1:0".parse().unwrap(), &ca, &wrong_name, None).await;
    let relay = Coordinated::start(
        base(dir.path()),
        None,
        options(&server.url(), &ca, &client_cert, dir.path()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(server.state().registrations.is_empty());
    relay.shutdown(Duration::from_secs(1)).await;
    server.stop().await;

    // And a client without a certificate of the CA does not get through the server's TLS.
    let good = ca.issue(&[mailfleet_proto::COORDINATOR_SERVER_NAME], false);
    let server = TestServer::start("127.0.0.1:0".parse().unwrap(), &ca, &good, None).await;
    for identity in [None, Some(rogue.issue(&["pool-a"], true))] {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.pem()))
            .domain_name(mailfleet_proto::COORDINATOR_SERVER_NAME);
        if let Some(id) = &identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &id.cert_pem,
                &id.key_pem,
            ));
        }
        let result = async {
            let channel = tonic::transport::Endpoint::from_shared(server.url())?
                .tls_config(tls)?
                .connect()
                .await?;
            let mut client = v1::coordinator_client::CoordinatorClient::new(channel);
            Ok::<_, Box<dyn std::error::Error>>(
                client
                    .register(v1::RegisterRequest::default())
                    .await
                    .map_err(Box::new)?,
            )
        }
        .await;
        assert!(
            result.is_err(),
            "a client without a valid certificate got through"
        );
    }
    assert!(server.state().registrations.is_empty());
    server.stop().await;
}
