//! The coordinated-mode harness of the integration tests: an in-test Coordinator (the
//! generated tonic server trait, mTLS with rcgen-made certificates) that records what it is
//! told, and helpers to start relays against it. (Not in `common`, which the mailfleet
//! crate's tests include too.)
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use mailfleet_proto::v1;
use mailfleet_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use mailfleet_relay::RelayConfig;
use mailfleet_relay::coordinator::CoordinatorOptions;
use mailfleet_relay::coordinator::Identity;
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

pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
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

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn issue(&self, names: &[&str], client: bool) -> Issued {
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
pub struct State {
    pub registrations: Vec<v1::RegisterRequest>,
    pub applied: u64,
    /// Every report received, duplicates included.
    pub received: Vec<v1::ReportRequest>,
    /// The reports applied, each sequence once.
    pub applied_reports: Vec<v1::ReportRequest>,
    /// Counts applied once per sequence: (address, outcome, domain) → count.
    pub counted: BTreeMap<(String, i32, String), u64>,
    /// Apply the next report but answer with an error, and answer the next Register with the
    /// sequence applied before it (the coordinator lost the ack and its record of it).
    pub lose_next_ack: bool,
    pub stale_register: Option<u64>,
    /// Answer reports with an error without applying them.
    pub refuse_reports: bool,
}

#[derive(Clone)]
pub struct TestCoordinator {
    pub state: Arc<Mutex<State>>,
    pub config: Arc<watch::Sender<Option<v1::RelayConfig>>>,
    pub stop: watch::Receiver<bool>,
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
            st.applied_reports.push(r.clone());
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
pub type Memory = (
    Arc<Mutex<State>>,
    Arc<watch::Sender<Option<v1::RelayConfig>>>,
);

pub struct TestServer {
    pub addr: SocketAddr,
    pub coordinator: TestCoordinator,
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Serves on `addr` (port 0 for any) with `server` as certificate and `ca` as the only
    /// client CA; `state` and `config` carry over from a previous server if given.
    pub async fn start(
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

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn push(&self, config: v1::RelayConfig) {
        self.coordinator.config.send_replace(Some(config));
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.coordinator.state.lock().unwrap()
    }

    pub fn carry_over(&self) -> Memory {
        (
            Arc::clone(&self.coordinator.state),
            Arc::clone(&self.coordinator.config),
        )
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

// ------------------------------------------------------------------------------------------
// Helpers

pub async fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

pub async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The first line the relay sends on a new SMTP session.
pub async fn greeting(addr: SocketAddr) -> String {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    line
}

/// Sends one message; returns the reply to MAIL FROM and (if accepted) to the data.
pub async fn send_mail(relay: SocketAddr, from: &str, to: &str) -> (String, String) {
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

pub fn base(dir: &Path) -> RelayConfig {
    RelayConfig::coordinated_base(
        "relay.example.test".into(),
        "127.0.0.1:0".parse().unwrap(),
        dir.join("spool"),
        Some("127.0.0.1:0".parse().unwrap()),
    )
}

pub fn options(url: &str, ca: &Ca, client: &Issued, dir: &Path) -> CoordinatorOptions {
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

pub fn address(ip: &str, state: v1::AddressState) -> v1::EgressAddress {
    v1::EgressAddress {
        address: ip.into(),
        helo_name: format!("out-{ip}.example.test"),
        state: state as i32,
    }
}

/// A snapshot: sends for `domains` (each with an Ed25519 key) from 127.0.0.2, MX lookups at
/// `knot`, delivery to `sink_port`.
pub fn snapshot(
    version: u64,
    domains: &[&str],
    knot: SocketAddr,
    sink_port: u16,
) -> v1::RelayConfig {
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

pub fn knot(dir: &Path) -> Knot {
    Knot::start(
        dir,
        &[
            "dest.example.test. 60 MX 10 mx1.example.test.",
            "mx1.example.test. 60 A 127.0.0.1",
        ],
    )
}

pub fn delivered(server: &TestServer, addr: &str) -> u64 {
    server
        .state()
        .counted
        .iter()
        .filter(|((a, o, _), _)| a == addr && *o == v1::Outcome::Delivered as i32)
        .map(|(_, n)| n)
        .sum()
}
