//! Coordinated mode against an in-test Coordinator (the generated tonic server trait, mTLS
//! with rcgen-made certificates), with Knot serving MX records and the aiosmtpd sink as MX:
//! registration, live reconfiguration, quotas, sequenced reports that survive lost acks and
//! restarts, the stored snapshot when the coordinator is gone, and certificate checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use mailfleet_proto::v1;
use mailfleet_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use mailfleet_relay::RelayConfig;
use mailfleet_relay::coordinator::{Coordinated, CoordinatorOptions, Identity};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

// ------------------------------------------------------------------------------------------
// PKI

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

struct Issued {
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, names: &[&str], client: bool) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("x"));
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

// ------------------------------------------------------------------------------------------
// The in-test coordinator

#[derive(Default)]
struct State {
    registrations: Vec<v1::RegisterRequest>,
    applied: u64,
    /// Every report received, duplicates included.
    received: Vec<v1::ReportRequest>,
    /// Counts applied once per sequence: (address, outcome, domain) → count.
    counted: BTreeMap<(String, i32, String), u64>,
    /// Apply the next report but answer with an error, and answer the next Register with the
    /// sequence applied before it (the coordinator lost the ack and its record of it).
    lose_next_ack: bool,
    stale_register: Option<u64>,
    /// Answer reports with an error without applying them.
    refuse_reports: bool,
}

#[derive(Clone)]
struct TestCoordinator {
    state: Arc<Mutex<State>>,
    config: Arc<watch::Sender<Option<v1::RelayConfig>>>,
    stop: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Coordinator for TestCoordinator {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let mut st = self.state.lock().unwrap();
        st.registrations.push(request.into_inner());
        let addresses = self
            .config
            .borrow()
            .as_ref()
            .map(|c| c.addresses.clone())
            .unwrap_or_default();
        Ok(Response::new(v1::RegisterResponse {
            pool: "pool-a".into(),
            addresses,
            applied_sequence: st.stale_register.take().unwrap_or(st.applied),
        }))
    }

    type WatchConfigStream = ReceiverStream<Result<v1::RelayConfig, Status>>;

    async fn watch_config(
        &self,
        _request: Request<v1::WatchConfigRequest>,
    ) -> Result<Response<Self::WatchConfigStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut config = self.config.subscribe();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let snap = config.borrow_and_update().clone();
                if let Some(s) = snap
                    && tx.send(Ok(s)).await.is_err()
                {
                    return;
                }
                tokio::select! {
                    r = config.changed() => if r.is_err() { return },
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(
        &self,
        request: Request<v1::ReportRequest>,
    ) -> Result<Response<v1::ReportAck>, Status> {
        let r = request.into_inner();
        let mut st = self.state.lock().unwrap();
        st.received.push(r.clone());
        if st.refuse_reports {
            return Err(Status::unavailable("not now"));
        }
        let before = st.applied;
        // At most once per sequence, in order.
        if r.sequence == st.applied + 1 {
            for d in &r.deltas {
                *st.counted
                    .entry((d.address.clone(), d.outcome, d.domain.clone()))
                    .or_default() += d.count;
            }
            st.applied = r.sequence;
        }
        if std::mem::take(&mut st.lose_next_ack) {
            st.stale_register = Some(before);
            return Err(Status::unavailable("ack lost"));
        }
        Ok(Response::new(v1::ReportAck {
            applied_sequence: st.applied,
        }))
    }
}

/// What a restarted test server keeps: its state and its current configuration.
type Memory = (
    Arc<Mutex<State>>,
    Arc<watch::Sender<Option<v1::RelayConfig>>>,
);

struct TestServer {
    addr: SocketAddr,
    coordinator: TestCoordinator,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Serves on `addr` (port 0 for any) with `server` as certificate and `ca` as the only
    /// client CA; `state` and `config` carry over from a previous server if given.
    async fn start(
        addr: SocketAddr,
        ca: &Ca,
        server: &Issued,
        state: Option<Memory>,
    ) -> TestServer {
        let (state, config) =
            state.unwrap_or_else(|| (Arc::default(), Arc::new(watch::channel(None).0)));
        let (stop, stop_rx) = watch::channel(false);
        let coordinator = TestCoordinator {
            state,
            config,
            stop: stop_rx.clone(),
        };
        let incoming = tonic::transport::server::TcpIncoming::bind(addr).unwrap();
        let addr = incoming.local_addr().unwrap();
        let tls = ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &server.cert_pem,
                &server.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(ca.pem()));
        let svc = CoordinatorServer::new(coordinator.clone());
        let mut shutdown = stop_rx;
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await;
        });
        TestServer {
            addr,
            coordinator,
            stop,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn push(&self, config: v1::RelayConfig) {
        self.coordinator.config.send_replace(Some(config));
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.coordinator.state.lock().unwrap()
    }

    fn carry_over(&self) -> Memory {
        (
            Arc::clone(&self.coordinator.state),
            Arc::clone(&self.coordinator.config),
        )
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

// ------------------------------------------------------------------------------------------
// Helpers

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

async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The first line the relay sends on a new SMTP session.
async fn greeting(addr: SocketAddr) -> String {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    line
}

/// Sends one message; returns the reply to MAIL FROM and (if accepted) to the data.
async fn send_mail(relay: SocketAddr, from: &str, to: &str) -> (String, String) {
    let mut c = Client::connect_from("127.0.0.1", relay).await;
    c.cmd("EHLO client.example.test").await;
    let mail = c.cmd(&format!("MAIL FROM:<{from}>")).await;
    if !mail.starts_with("250") {
        c.cmd("QUIT").await;
        return (mail, String::new());
    }
    assert!(c.cmd(&format!("RCPT TO:<{to}>")).await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    let data = c
        .cmd(&format!(
            "From: {from}\r\nTo: {to}\r\nSubject: coordinated\r\n\r\nHello.\r\n."
        ))
        .await;
    c.cmd("QUIT").await;
    (mail, data)
}

fn base(dir: &Path) -> RelayConfig {
    RelayConfig::coordinated_base(
        "relay.example.test".into(),
        "127.0.0.1:0".parse().unwrap(),
        dir.join("spool"),
        Some("127.0.0.1:0".parse().unwrap()),
    )
}

fn options(url: &str, ca: &Ca, client: &Issued, dir: &Path) -> CoordinatorOptions {
    let identity = Identity {
        ca_pem: ca.pem(),
        cert_pem: client.cert_pem.clone(),
        key_pem: client.key_pem.clone(),
        pod_name: "pool-a-0".into(),
        pod_namespace: "mail".into(),
        pod_uid: "uid-0".into(),
    };
    let mut o = CoordinatorOptions::new(url, identity, &dir.join("spool"));
    o.report_interval = Duration::from_millis(200);
    o.backoff_min = Duration::from_millis(100);
    o.backoff_max = Duration::from_millis(500);
    o.initial_wait = Duration::from_secs(2);
    o.call_timeout = Duration::from_secs(3);
    o
}

fn address(ip: &str, state: v1::AddressState) -> v1::EgressAddress {
    v1::EgressAddress {
        address: ip.into(),
        helo_name: format!("out-{ip}.example.test"),
        state: state as i32,
    }
}

/// A snapshot: sends for `domains` (each with an Ed25519 key) from 127.0.0.2, MX lookups at
/// `knot`, delivery to `sink_port`.
fn snapshot(version: u64, domains: &[&str], knot: SocketAddr, sink_port: u16) -> v1::RelayConfig {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    v1::RelayConfig {
        version,
        addresses: vec![address("127.0.0.2", v1::AddressState::Warming)],
        domains: domains
            .iter()
            .map(|d| v1::SendingDomain {
                domain: d.to_string(),
                addresses: Vec::new(),
                signing_keys: vec![v1::DkimKey {
                    selector: "ed".into(),
                    algorithm: v1::DkimAlgorithm::Ed25519Sha256 as i32,
                    private_key: key.serialize_der(),
                }],
                return_path_domain: String::new(),
                suppressed_recipients: vec!["blocked@dest.example.test".into()],
            })
            .collect(),
        quotas: Vec::new(),
        shaping: Some(v1::Shaping {
            max_connections_per_address: 10,
            providers: vec![v1::ProviderShaping {
                provider_group: "gmail".into(),
                max_connections: 2,
                max_messages_per_minute: 600,
                max_messages_per_connection: 100,
            }],
        }),
        delivery: Some(v1::Delivery {
            retry_schedule_seconds: vec![1],
            max_queue_lifetime_seconds: 600,
            dsn: false,
            destination_port: u32::from(sink_port),
            nameservers: vec![knot.to_string()],
        }),
        listener: Some(v1::Listener {
            allowed_networks: vec!["127.0.0.1/32".into()],
            max_message_bytes: 1_000_000,
            max_recipients: 10,
            max_sessions: 20,
            users: Default::default(),
            feedback_token_sha256: String::new(),
        }),
    }
}

fn knot(dir: &Path) -> Knot {
    Knot::start(
        dir,
        &[
            "dest.example.test. 60 MX 10 mx1.example.test.",
            "mx1.example.test. 60 A 127.0.0.1",
        ],
    )
}

fn delivered(server: &TestServer, addr: &str) -> u64 {
    server
        .state()
        .counted
        .iter()
        .filter(|((a, o, _), _)| a == addr && *o == v1::Outcome::Delivered as i32)
        .map(|(_, n)| n)
        .sum()
}

// ------------------------------------------------------------------------------------------
// Tests

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
