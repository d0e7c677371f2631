//! The operator: controllers for the custom resources and the coordinator service.
//!
//! Pure decision logic lives in its own modules ([`egress`] allocation, [`children`] objects)
//! and is unit-tested without a cluster, as are the DNS records and plan ([`dns`]) and DKIM keys
//! ([`dkim`]) and the warm-up decisions ([`warmup`]); [`relaypool`], [`sendingdomain`] and
//! [`warmup`] wire them to the API server, the
//! [`coordinator`] serves the relays, [`leader`] makes two replicas safe. [`run`] starts it all.

pub mod children;
pub mod coordinator;
pub mod dkim;
pub mod dns;
pub mod egress;
pub mod leader;
pub mod metrics;
pub mod pki;
pub mod relaypool;
pub mod sendingdomain;
pub mod suppression;
pub mod warmup;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// Name of the Secret (in the operator's namespace) that holds the coordinator's CA.
pub const CA_SECRET: &str = "mailfleet-coordinator-ca";
/// Name of the leader Lease.
pub const LEASE_NAME: &str = "mailfleet-operator-leader";
/// Label the leading replica puts on its own pod; the coordinator Service selects it.
pub const LEADER_LABEL: &str = "mailfleet.dev/leader";

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot load or create the coordinator CA in Secret {namespace}/{CA_SECRET}: {source}")]
    CaSecret {
        namespace: String,
        source: kube::Error,
    },
    #[error("the coordinator CA Secret {namespace}/{CA_SECRET} keeps appearing and vanishing")]
    CaRace { namespace: String },
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("the coordinator's TLS configuration is invalid: {0}")]
    Tls(#[from] tonic::transport::Error),
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
}

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Where the coordinator (gRPC, mTLS) listens.
    pub coordinator_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    /// Where `/healthz` and `/readyz` are served.
    pub health_addr: SocketAddr,
    /// Take the leader Lease before doing anything (two replicas are then safe).
    pub leader_election: bool,
    /// The operator's own namespace (CA Secret, Lease).
    pub namespace: String,
    /// This replica's identity in the Lease (its pod name).
    pub identity: String,
    /// Namespaces to watch; empty watches all.
    pub watch_namespaces: Vec<String>,
    /// Relay image and the coordinator URL relays dial.
    pub settings: children::Settings,
}

async fn load_or_create_ca(
    client: &kube::Client,
    namespace: &str,
) -> Result<pki::CertificateAuthority, OperatorError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let err = |source| OperatorError::CaSecret {
        namespace: namespace.to_string(),
        source,
    };
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(CA_SECRET).await.map_err(err)? {
            let data = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, ByteString(v))| (k, v))
                .collect();
            return Ok(pki::CertificateAuthority::from_secret_data(&data)?);
        }
        let ca = pki::CertificateAuthority::generate()?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "mailfleet".to_string(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            data: Some(
                ca.to_secret_data()
                    .into_iter()
                    .map(|(k, v)| (k, ByteString(v)))
                    .collect(),
            ),
            type_: Some("Opaque".to_string()),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(namespace, secret = CA_SECRET, "created the coordinator CA");
                return Ok(ca);
            }
            // Another replica created it first: use theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Err(OperatorError::CaRace {
        namespace: namespace.to_string(),
    })
}

/// Runs the operator until `shutdown` turns true (or leadership is lost, which is an error:
/// the process should exit and restart as a follower).
pub async fn run(
    client: kube::Client,
    config: OperatorConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), OperatorError> {
    let metrics = Arc::new(metrics::Metrics::default());
    for addr in dedup([config.metrics_addr, config.health_addr]) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| OperatorError::Listen { addr, source })?;
        tokio::spawn(metrics::serve(listener, Arc::clone(&metrics)));
    }

    let lease = leader::LeaseConfig {
        namespace: config.namespace.clone(),
        name: LEASE_NAME.to_string(),
        identity: config.identity.clone(),
        duration: Duration::from_secs(15),
        renew: Duration::from_secs(3),
    };
    metrics
        .standby
        .store(config.leader_election, Ordering::Relaxed);
    let leadership = if config.leader_election {
        tokio::select! {
            l = leader::acquire(client.clone(), lease.clone()) => Some(l),
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    } else {
        None
    };
    let (_always, not_elected) = watch::channel(true);
    let mut leading = leadership
        .as_ref()
        .map(|l| l.leading.clone())
        .unwrap_or(not_elected);
    metrics.standby.store(false, Ordering::Relaxed);
    metrics.leader.store(true, Ordering::Relaxed);
    label_leader_pod(&client, &config.namespace, &config.identity).await;

    let ca = Arc::new(load_or_create_ca(&client, &config.namespace).await?);
    let server = ca.issue_server()?;
    let fleet = coordinator::Fleet::new(client.clone(), Arc::clone(&metrics));
    {
        let fleet = Arc::clone(&fleet);
        *metrics
            .connected_relays
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(move || fleet.connected_relays()));
    }
    // One controller per watched namespace, or one for all.
    let namespaces: Vec<Option<String>> = if config.watch_namespaces.is_empty() {
        vec![None]
    } else {
        config.watch_namespaces.iter().cloned().map(Some).collect()
    };
    match fleet.prime(ca.cert_pem(), &namespaces).await {
        Ok(n) => tracing::info!(pools = n, "known relay pool certificates loaded"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list relay identities yet; pools are learnt as they reconcile")
        }
    }
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &server.cert_pem,
            &server.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(ca.cert_pem()));
    let listener = tokio::net::TcpListener::bind(config.coordinator_addr)
        .await
        .map_err(|source| OperatorError::Listen {
            addr: config.coordinator_addr,
            source,
        })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let service = mailfleet_proto::v1::coordinator_server::CoordinatorServer::new(
        coordinator::CoordinatorService::new(Arc::clone(&fleet)),
    );
    let grpc = tonic::transport::Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            wait_true(stop_rx.clone()),
        );
    let grpc = tokio::spawn(grpc);
    tracing::info!(addr = %config.coordinator_addr, "coordinator listening (mutual TLS)");

    let ctx = Arc::new(relaypool::Context {
        client: client.clone(),
        settings: config.settings.clone(),
        ca,
        fleet,
        metrics: Arc::clone(&metrics),
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "mailfleet-operator".to_string(),
                instance: Some(config.identity.clone()),
            },
        ),
    });
    let mut controllers = Vec::new();
    for ns in namespaces.iter().cloned() {
        controllers.push(tokio::spawn(relaypool::run(
            Arc::clone(&ctx),
            ns,
            wait_true(stop_rx.clone()),
        )));
    }
    // SendingDomains: keys, DNS records, verification, rotation.
    let domains = Arc::new(
        sendingdomain::Context::new(client.clone(), Arc::clone(&metrics)).with_reporter(
            kube::runtime::events::Reporter {
                controller: "mailfleet-operator".to_string(),
                instance: Some(config.identity.clone()),
            },
        ),
    );
    for ns in namespaces.iter().cloned() {
        controllers.push(tokio::spawn(sendingdomain::run(
            Arc::clone(&domains),
            ns,
            wait_true(stop_rx.clone()),
        )));
    }
    // WarmupPlans: stages, gates and blocklists per address.
    let warmups = Arc::new(warmup::Context {
        client: client.clone(),
        metrics: Arc::clone(&metrics),
        recorder: ctx.recorder.clone(),
        clock: Arc::new(k8s_openapi::jiff::Timestamp::now),
    });
    for ns in namespaces {
        controllers.push(tokio::spawn(warmup::run(
            Arc::clone(&warmups),
            ns,
            wait_true(stop_rx.clone()),
        )));
    }
    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!("operator running");

    let lost = tokio::select! {
        _ = shutdown.wait_for(|s| *s) => false,
        _ = leading.wait_for(|l| !*l) => true,
    };
    metrics.ready.store(false, Ordering::Relaxed);
    metrics.leader.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for c in controllers {
        let _ = c.await;
    }
    // Config streams never end on their own: close them, give the server a moment to say
    // goodbye, then stop it.
    ctx.fleet.close_all();
    let grpc_abort = grpc.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), grpc)
        .await
        .is_err()
    {
        grpc_abort.abort();
    }
    drop(leadership);
    if lost {
        return Err(leader::lost(&lease).into());
    }
    if config.leader_election {
        leader::release(client, &lease).await;
    }
    tracing::info!("operator stopped");
    Ok(())
}

/// Marks this replica's pod as the leader, so that the coordinator Service (which selects
/// [`LEADER_LABEL`]) routes relays to it. Outside a pod (`mailfleet dev`, tests) there is no
/// pod of that name; that is fine.
async fn label_leader_pod(client: &kube::Client, namespace: &str, pod: &str) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: "true"}}});
    match pods
        .patch(
            pod,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => tracing::info!(pod, "labelled this pod as the leader"),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            tracing::debug!(pod, "no pod of this name: not running in a pod")
        }
        Err(e) => tracing::warn!(
            pod,
            error = %e,
            "cannot label this pod as the leader: the coordinator Service will not route relays here"
        ),
    }
}

fn dedup(addrs: [SocketAddr; 2]) -> Vec<SocketAddr> {
    if addrs[0] == addrs[1] {
        vec![addrs[0]]
    } else {
        addrs.to_vec()
    }
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Reconciles each controller runs at once. A RelayPool reconcile reads the namespace's
/// SendingDomains and a SendingDomain reconcile may generate RSA keys: unbounded, a large
/// fleet's first pass held hundreds of those at once. `hack/bench-operator 100 1000` on two
/// cores: unbounded 960 MiB peak and 210 s to converge, 16 at once 235 MiB and 263 s, 8 at
/// once 158 MiB and 290 s.
pub const RECONCILE_CONCURRENCY: u16 = 16;
