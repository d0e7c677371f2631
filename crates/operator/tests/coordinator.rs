//! The operator against devcluster, in process: the RelayPool controller's children and status,
//! the coordinator's mutual TLS and pod authorization, exactly-once reports across operator
//! restarts, and leader election between two replicas.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use mailfleet_api::relaypool::RelayPool;
use mailfleet_devcluster::{Config, DevCluster, RunnerConfig};
use mailfleet_operator::children::Settings;
use mailfleet_operator::{OperatorConfig, run};
use mailfleet_proto::v1::coordinator_client::CoordinatorClient;
use mailfleet_proto::v1::{
    CounterDelta, Outcome, RegisterRequest, ReportRequest, WatchConfigRequest,
};
use serde_json::json;
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct Env {
    dc: DevCluster,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path().join("cluster"));
    // Pods are marked Running and Ready without processes: this test plays the relays.
    config.runner = Some(RunnerConfig::default());
    let dc = DevCluster::start(config).await.unwrap();
    let kc = Kubeconfig::read_from(&dc.kubeconfig).unwrap();
    let cc = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = Client::try_from(cc).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, text) in mailfleet_api::crd_manifests().unwrap() {
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in ["mailfleet-system", "mail", "other"] {
        let n: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        nss.create(&PostParams::default(), &n).await.unwrap();
    }
    Env {
        dc,
        client,
        _dir: dir,
    }
}

struct Operator {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), mailfleet_operator::OperatorError>>,
    health: SocketAddr,
}

fn start_operator(client: &Client, identity: &str, coordinator: SocketAddr) -> Operator {
    let health = free_addr();
    let config = OperatorConfig {
        coordinator_addr: coordinator,
        metrics_addr: health,
        health_addr: health,
        leader_election: true,
        namespace: "mailfleet-system".into(),
        identity: identity.into(),
        watch_namespaces: Vec::new(),
        settings: Settings {
            relay_image: "example.invalid/mailfleet:test".into(),
            coordinator_url: format!("https://{coordinator}"),
            otlp_endpoint: None,
        },
    };
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(run(client.clone(), config, rx));
    Operator { stop, task, health }
}

impl Operator {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pool(name: &str, replicas: i32, cidr: &str) -> RelayPool {
    serde_json::from_value(json!({
        "apiVersion": "mailfleet.dev/v1alpha1",
        "kind": "RelayPool",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "egress": {"cidrs": [cidr], "heloNameTemplate": "mta-{ip}.relay.example.test"},
            "listener": {"allowedNetworks": ["127.0.0.0/8"]},
        },
    }))
    .unwrap()
}

async fn identity_of(client: &Client, ns: &str, pool: &str) -> (String, String, String) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = eventually(30, "the identity Secret", async || {
        secrets
            .get_opt(&format!("{pool}-relay-identity"))
            .await
            .unwrap()
    })
    .await;
    let d = s.data.unwrap();
    let get = |k: &str| String::from_utf8(d[k].0.clone()).unwrap();
    (get("ca.crt"), get("tls.crt"), get("tls.key"))
}

async fn channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<CoordinatorClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(mailfleet_proto::COORDINATOR_SERVER_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let ch = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(CoordinatorClient::new(ch))
}

fn register(pod: &str, ns: &str, uid: &str) -> RegisterRequest {
    RegisterRequest {
        pod_name: pod.into(),
        pod_namespace: ns.into(),
        pod_uid: uid.into(),
        relay_version: "test".into(),
    }
}

fn report(pod: &str, seq: u64, address: &str, delivered: u64) -> ReportRequest {
    ReportRequest {
        pod_name: pod.into(),
        pod_namespace: "mail".into(),
        sequence: seq,
        deltas: vec![CounterDelta {
            address: address.into(),
            provider_group: "other".into(),
            outcome: Outcome::Delivered as i32,
            count: delivered,
            domain: String::new(),
        }],
        observed_unix: 0,
        applied_config_version: 0,
        suppressions: Vec::new(),
    }
}

async fn delivered(client: &Client, address: &str) -> i64 {
    let pools: Api<RelayPool> = Api::namespaced(client.clone(), "mail");
    let p = pools.get("transactional").await.unwrap();
    p.status
        .unwrap()
        .counters
        .iter()
        .find(|c| c.address == address)
        .map(|c| c.delivered)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_coordinator_and_exactly_once_reports() {
    let env = env().await;
    let client = env.client.clone();
    let coordinator = free_addr();
    // The operator replicas' own pods (their identity is their pod name).
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), "mailfleet-system");
    for name in ["op-a", "op-b"] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "mailfleet-system"},
            "spec": {"containers": [{"name": "operator", "image": "example.invalid/mailfleet:test"}]},
        }))
        .unwrap();
        operator_pods
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
    }
    let op = start_operator(&client, "op-a", coordinator);
    let pools: Api<RelayPool> = Api::namespaced(client.clone(), "mail");
    pools
        .create(
            &PostParams::default(),
            &pool("transactional", 3, "127.0.1.0/29"),
        )
        .await
        .unwrap();
    let other: Api<RelayPool> = Api::namespaced(client.clone(), "other");
    other
        .create(&PostParams::default(), &pool("bulk", 1, "127.0.2.0/30"))
        .await
        .unwrap();

    // The controller builds the relays' StatefulSet, Services and identity; the pods (marked
    // ready by devcluster) make the pool Ready with every address assigned to one pod.
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "mail");
    let sts = eventually(30, "the StatefulSet", async || {
        sets.get_opt("transactional").await.unwrap()
    })
    .await;
    let args = sts.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.contains(&format!("--coordinator=https://{coordinator}")),
        "{args:?}"
    );
    let services: Api<Service> = Api::namespaced(client.clone(), "mail");
    assert!(services.get_opt("transactional").await.unwrap().is_some());
    assert!(
        services
            .get_opt("transactional-relays")
            .await
            .unwrap()
            .is_some()
    );
    let status = eventually(60, "the pool to be Ready", async || {
        let p = pools.get("transactional").await.unwrap();
        let s = p.status?;
        let ready = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let assigned = s
            .conditions
            .iter()
            .any(|c| c.type_ == "EgressAssigned" && c.status == "True");
        (ready && assigned).then_some(s)
    })
    .await;
    assert_eq!(status.ready_replicas, 3);
    assert_eq!(status.address_count, 6, "127.0.1.0/29 has 6 usable hosts");
    let mut per_pod = std::collections::BTreeMap::<String, usize>::new();
    for a in &status.addresses {
        *per_pod.entry(a.pod.clone().unwrap()).or_default() += 1;
        assert_eq!(
            a.helo_name,
            format!("mta-{}.relay.example.test", a.address.replace('.', "-"))
        );
    }
    assert_eq!(per_pod.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    assert!(
        http_get(op.health, "/readyz").await.contains("200 OK"),
        "the leader is ready"
    );
    let metrics = http_get(op.health, "/metrics").await;
    assert!(
        metrics.contains(
            "mailfleet_operator_reconciles_total{controller=\"relaypool\",result=\"ok\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("mailfleet_operator_leader 1"), "{metrics}");
    // Events tell what happened to the pool's addresses.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "mail");
    let evs = events.list(&Default::default()).await.unwrap().items;
    // The recorder folds repeats into a series: count the occurrences.
    let assigned: i32 = evs
        .iter()
        .filter(|e| {
            e.reason.as_deref() == Some("AddressAssigned")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("transactional")
        })
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum();
    assert_eq!(
        assigned, 6,
        "one AddressAssigned occurrence per address: {evs:?}"
    );

    // mTLS: without a client certificate, or with one the operator did not issue, nothing.
    let (ca, cert, key) = identity_of(&client, "mail", "transactional").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "mail");
    let pod0 = pods.get("transactional-0").await.unwrap();
    let uid0 = pod0.metadata.uid.clone().unwrap();
    if let Ok(mut c) = channel(coordinator, &ca, None).await {
        let err = c
            .register(register("transactional-0", "mail", &uid0))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.code(),
                tonic::Code::Unavailable | tonic::Code::Unauthenticated | tonic::Code::Unknown
            ),
            "{err:?}"
        );
    }
    let stranger = rcgen::generate_simple_self_signed(vec!["relay".to_string()]).unwrap();
    if let Ok(mut c) = channel(
        coordinator,
        &ca,
        Some((&stranger.cert.pem(), &stranger.signing_key.serialize_pem())),
    )
    .await
    {
        assert!(
            c.register(register("transactional-0", "mail", &uid0))
                .await
                .is_err()
        );
    }

    // The pool's own certificate: register as its pods, but never as another pool's pod.
    let mut c = channel(coordinator, &ca, Some((&cert, &key)))
        .await
        .unwrap();
    let reg = c
        .register(register("transactional-0", "mail", &uid0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.pool, "transactional");
    assert_eq!(reg.addresses.len(), 2);
    assert_eq!(reg.applied_sequence, 0);
    let denied = c
        .register(register("bulk-0", "other", ""))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let denied = c
        .register(register("transactional-0", "mail", "not-the-uid"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let (bulk_ca, bulk_cert, bulk_key) = identity_of(&client, "other", "bulk").await;
    assert_eq!(bulk_ca, ca, "one CA for every pool");
    let mut b = channel(coordinator, &ca, Some((&bulk_cert, &bulk_key)))
        .await
        .unwrap();
    let denied = b
        .register(register("transactional-0", "mail", ""))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // The config stream: a snapshot with this pod's addresses at once.
    let mut stream = c
        .watch_config(WatchConfigRequest {
            pod_name: "transactional-0".into(),
            pod_namespace: "mail".into(),
            known_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.version > 0);
    let mine: Vec<String> = first.addresses.iter().map(|a| a.address.clone()).collect();
    assert_eq!(mine.len(), 2);
    assert_eq!(
        first.listener.as_ref().unwrap().allowed_networks,
        vec!["127.0.0.0/8".to_string()]
    );
    // A change to the pool is pushed as a newer snapshot.
    pools
        .patch(
            "transactional",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"delivery": {"destinationPort": 2526}}})),
        )
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(next.version > first.version);
    assert_eq!(next.delivery.as_ref().unwrap().destination_port, 2526);

    // Reports count once: a retried sequence is acknowledged without counting again.
    let addr = mine[0].clone();
    let ack = c
        .report(report("transactional-0", 1, &addr, 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.applied_sequence, 1);
    let ack = c
        .report(report("transactional-0", 1, &addr, 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.applied_sequence, 1);
    c.report(report("transactional-0", 2, &addr, 3))
        .await
        .unwrap();
    assert_eq!(delivered(&client, &addr).await, 8);
    let zero = c
        .report(report("transactional-0", 0, &addr, 1))
        .await
        .unwrap_err();
    assert_eq!(zero.code(), tonic::Code::InvalidArgument);
    // Another pool cannot report for this pool's pods.
    assert!(
        b.report(report("transactional-0", 3, &addr, 100))
            .await
            .is_err()
    );

    // Reports arriving together are written together, each counted once.
    let calls = [1, 2].map(|i| {
        let mut c = c.clone();
        let pod = format!("transactional-{i}");
        let addr = addr.clone();
        async move {
            for seq in 1..=5 {
                c.report(report(&pod, seq, &addr, 1)).await.unwrap();
            }
        }
    });
    futures_util::future::join_all(calls).await;
    assert_eq!(delivered(&client, &addr).await, 18);

    // A second replica waits as a follower (ready as a standby, so rolling updates proceed)
    // while the first leads; only the leader's pod carries the label the coordinator
    // Service selects.
    let coordinator_b = free_addr();
    let op_b = start_operator(&client, "op-b", coordinator_b);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let standby = http_get(op_b.health, "/readyz").await;
    assert!(
        standby.contains("200 OK") && standby.contains("standby"),
        "{standby}"
    );
    let leader_label = |p: &Pod| {
        p.labels()
            .get(mailfleet_operator::LEADER_LABEL)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        leader_label(&operator_pods.get("op-a").await.unwrap()),
        "true"
    );
    assert_eq!(leader_label(&operator_pods.get("op-b").await.unwrap()), "");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "mailfleet-system");
    let lease = leases.get(mailfleet_operator::LEASE_NAME).await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("op-a"));

    // The leader stops: the follower takes over, keeps the CA (the pool's certificate still
    // works) and the applied sequences (a resent report is not counted twice).
    op.stop().await;
    eventually(40, "the follower to lead", async || {
        http_get(op_b.health, "/readyz")
            .await
            .contains("leading")
            .then_some(())
    })
    .await;
    assert_eq!(
        leader_label(&operator_pods.get("op-b").await.unwrap()),
        "true"
    );
    let mut c = eventually(20, "the new coordinator", async || {
        channel(coordinator_b, &ca, Some((&cert, &key))).await.ok()
    })
    .await;
    let reg = c
        .register(register("transactional-0", "mail", &uid0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.applied_sequence, 2);
    let ack = c
        .report(report("transactional-0", 2, &addr, 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.applied_sequence, 2);
    c.report(report("transactional-0", 3, &addr, 1))
        .await
        .unwrap();
    assert_eq!(delivered(&client, &addr).await, 19);
    // Addresses did not move across the change of leader.
    let after = pools.get("transactional").await.unwrap().status.unwrap();
    for a in &status.addresses {
        let b = after
            .addresses
            .iter()
            .find(|b| b.address == a.address)
            .unwrap();
        assert_eq!(a.pod, b.pod, "address {} moved", a.address);
    }

    // Deleting the pool removes its children (ownerReferences) and its coordinator state.
    pools
        .delete("transactional", &Default::default())
        .await
        .unwrap();
    eventually(30, "the pool to be gone", async || {
        pools
            .get_opt("transactional")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    eventually(30, "the StatefulSet to be gone", async || {
        sets.get_opt("transactional")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        c.register(register("transactional-0", "mail", ""))
            .await
            .is_err(),
        "a deleted pool's certificate is refused"
    );
    op_b.stop().await;
    let _ = pod0.name_any();
    env.dc.shutdown().await;
}

/// The part of Cilium's CiliumEgressGatewayPolicy schema the operator writes (cilium.io/v2,
/// cluster-scoped), so that the policies are checked against it.
const CILIUM_CRD: &str = r#"{
  "apiVersion": "apiextensions.k8s.io/v1",
  "kind": "CustomResourceDefinition",
  "metadata": {"name": "ciliumegressgatewaypolicies.cilium.io"},
  "spec": {
    "group": "cilium.io",
    "names": {"kind": "CiliumEgressGatewayPolicy", "plural": "ciliumegressgatewaypolicies",
              "singular": "ciliumegressgatewaypolicy", "listKind": "CiliumEgressGatewayPolicyList"},
    "scope": "Cluster",
    "versions": [{
      "name": "v2", "served": true, "storage": true,
      "schema": {"openAPIV3Schema": {
        "type": "object", "required": ["spec"],
        "properties": {
          "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
          "spec": {
            "type": "object", "required": ["destinationCIDRs", "egressGateway", "selectors"],
            "properties": {
              "destinationCIDRs": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "cidr"}},
              "selectors": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                "podSelector": {"type": "object", "properties": {
                  "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "properties": {
                  "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}}}}},
              "egressGateway": {"type": "object", "required": ["nodeSelector"], "properties": {
                "nodeSelector": {"type": "object", "properties": {
                  "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "egressIP": {"type": "string", "format": "ipv4"},
                "interface": {"type": "string"}}}
            }
          }
        }
      }}
    }]
  }
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cilium_mode_writes_one_policy_per_pod_and_removes_them_with_the_pool() {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
    let env = env().await;
    let client = env.client.clone();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(
        &PostParams::default(),
        &serde_json::from_str(CILIUM_CRD).unwrap(),
    )
    .await
    .unwrap();
    let op = start_operator(&client, "op-c", free_addr());
    let pools: Api<RelayPool> = Api::namespaced(client.clone(), "mail");
    let p: RelayPool = serde_json::from_value(json!({
        "apiVersion": "mailfleet.dev/v1alpha1",
        "kind": "RelayPool",
        "metadata": {"name": "gw"},
        "spec": {
            "replicas": 2,
            "egress": {
                "mode": "ciliumEgressGateway",
                "addresses": [{"address": "192.0.2.10", "heloName": "a.example.test"},
                              {"address": "192.0.2.11", "heloName": "b.example.test"},
                              {"address": "192.0.2.12", "heloName": "c.example.test"}],
                "cilium": {"gatewayNodeSelector": {"egress-gateway": "true"}},
            },
            "listener": {"allowedNetworks": ["10.0.0.0/8"]},
        },
    }))
    .unwrap();
    pools.create(&PostParams::default(), &p).await.unwrap();
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cilium.io", "v2", "CiliumEgressGatewayPolicy"),
        "ciliumegressgatewaypolicies",
    );
    let policies: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    // The policies are applied before the pool's status is written: wait for both.
    let (list, status) = eventually(
        60,
        "two egress gateway policies and the pool's status",
        async || {
            let l = policies.list(&ListParams::default()).await.unwrap().items;
            let status = pools.get("gw").await.unwrap().status?;
            (l.len() == 2 && status.addresses.iter().filter(|a| a.pod.is_some()).count() == 2)
                .then_some((l, status))
        },
    )
    .await;
    for policy in &list {
        let spec = &policy.data["spec"];
        let pod = spec["selectors"][0]["podSelector"]["matchLabels"]
            ["statefulset.kubernetes.io/pod-name"]
            .as_str()
            .unwrap();
        let ip = spec["egressGateway"]["egressIP"].as_str().unwrap();
        let row = status.addresses.iter().find(|a| a.address == ip).unwrap();
        assert_eq!(
            row.pod.as_deref(),
            Some(pod),
            "the policy's address is its pod's"
        );
        assert_eq!(
            spec["egressGateway"]["nodeSelector"]["matchLabels"]["egress-gateway"],
            "true"
        );
    }
    // One address per pod: the third waits unassigned.
    assert_eq!(
        status
            .addresses
            .iter()
            .filter(|a| a.state == mailfleet_api::relaypool::AddressState::Unassigned)
            .count(),
        1
    );
    // Scaled to one pod: its policy stays, the other goes once its pod is gone.
    pools
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let left = eventually(60, "one policy after scaling to 1", async || {
        let l = policies.list(&ListParams::default()).await.unwrap().items;
        (l.len() == 1).then_some(l)
    })
    .await;
    assert_eq!(left[0].name_any(), "mailfleet-mail-gw-0");
    pools.delete("gw", &Default::default()).await.unwrap();
    eventually(30, "the policies to be removed with the pool", async || {
        policies
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    op.stop().await;
    env.dc.shutdown().await;
}
