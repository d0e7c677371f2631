//! The Kubernetes objects a RelayPool owns, built as server-side-apply documents.
//!
//! Pure functions of the pool and the operator's settings, so that the exact objects are unit
//! tested and a rollout happens exactly when one of them changes.

use std::collections::BTreeMap;

use mailfleet_api::relaypool::{EgressMode, RelayPool};
use mailfleet_proto::{env, identity};
use serde_json::{Value, json};

/// Label every object of a pool carries; relay pods are selected by it.
pub const POOL_LABEL: &str = "mailfleet.dev/pool";
/// Port of the relay's `/metrics`, `/healthz`, `/readyz`.
pub const RELAY_HTTP_PORT: i32 = 9091;
/// Where the spool volume is mounted; the relay runs there and keeps its spool in `spool/`.
pub const SPOOL_MOUNT: &str = "/var/spool/mailfleet";
/// How long a relay pod may drain on deletion before it is killed.
pub const DRAIN_SECONDS: i64 = 60;

/// What the children depend on besides the pool itself.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Relay image used when the pool names none.
    pub relay_image: String,
    /// URL the relays dial for the coordinator.
    pub coordinator_url: String,
    /// OTLP endpoint the relays export traces to (the operator's own
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`); none exports nothing.
    pub otlp_endpoint: Option<String>,
}

fn name_of(pool: &RelayPool) -> String {
    pool.metadata.name.clone().unwrap_or_default()
}

fn namespace_of(pool: &RelayPool) -> String {
    pool.metadata.namespace.clone().unwrap_or_default()
}

/// Labels of every child (and the pod selector).
pub fn selector_labels(pool: &RelayPool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (POOL_LABEL.to_string(), name_of(pool)),
        (
            "app.kubernetes.io/name".to_string(),
            "mailfleet-relay".to_string(),
        ),
    ])
}

fn labels(pool: &RelayPool) -> Value {
    let mut l = selector_labels(pool);
    l.insert(
        "app.kubernetes.io/managed-by".to_string(),
        "mailfleet".to_string(),
    );
    json!(l)
}

fn owner(pool: &RelayPool) -> Value {
    json!([{
        "apiVersion": "mailfleet.dev/v1alpha1",
        "kind": "RelayPool",
        "name": name_of(pool),
        "uid": pool.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    }])
}

fn meta(pool: &RelayPool, name: &str) -> Value {
    json!({
        "name": name,
        "namespace": namespace_of(pool),
        "labels": labels(pool),
        "ownerReferences": owner(pool),
    })
}

/// Name of the pool's identity Secret.
pub fn identity_secret_name(pool: &RelayPool) -> String {
    format!("{}{}", name_of(pool), identity::SECRET_SUFFIX)
}

/// Name of the headless Service that governs the StatefulSet.
pub fn headless_service_name(pool: &RelayPool) -> String {
    format!("{}-relays", name_of(pool))
}

/// The identity Secret: the pool's client certificate for the coordinator.
pub fn identity_secret(pool: &RelayPool, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(pool, &identity_secret_name(pool)),
        "type": "kubernetes.io/tls",
        "stringData": {
            identity::CA_KEY: ca_pem,
            identity::CERT_KEY: cert_pem,
            identity::KEY_KEY: key_pem,
        },
    })
}

/// Name of the Secret with the bearer token of the relays' feedback endpoint.
pub fn feedback_secret_name(pool: &RelayPool) -> String {
    format!("{}-feedback", name_of(pool))
}

/// Key of the token in the feedback Secret.
pub const FEEDBACK_TOKEN_KEY: &str = "token";

/// The feedback Secret: the bearer token that lets a feedback-loop forwarder post ARF
/// complaint reports to the relays (`POST /v1/feedback` on the `feedback` port of the pool's
/// Service).
pub fn feedback_secret(pool: &RelayPool, token: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(pool, &feedback_secret_name(pool)),
        "type": "Opaque",
        "stringData": {FEEDBACK_TOKEN_KEY: token},
    })
}

/// The SMTP Service applications send to.
pub fn smtp_service(pool: &RelayPool) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(pool, &name_of(pool)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(pool),
            "ports": [{
                "name": "smtp",
                "port": pool.spec.listener.port,
                "targetPort": "smtp",
                "protocol": "TCP",
            }, {
                // ARF complaint reports (bearer token in the pool's feedback Secret).
                "name": "feedback",
                "port": RELAY_HTTP_PORT,
                "targetPort": "metrics",
                "protocol": "TCP",
            }],
        },
    })
}

/// The headless Service of the StatefulSet (stable pod DNS names, metrics scraping).
pub fn headless_service(pool: &RelayPool) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(pool, &headless_service_name(pool)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": selector_labels(pool),
            "ports": [
                {"name": "smtp", "port": pool.spec.listener.port, "targetPort": "smtp", "protocol": "TCP"},
                {"name": "metrics", "port": RELAY_HTTP_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    })
}

/// One relay at a time may be voluntarily disrupted.
pub fn pod_disruption_budget(pool: &RelayPool) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(pool, &name_of(pool)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(pool)},
        },
    })
}

fn secret_env(name: &str, secret: &str, key: &str) -> Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

/// The relays: a StatefulSet whose pods are configured over the coordinator and by the
/// environment (identity, listener TLS), each with its own spool volume.
pub fn statefulset(pool: &RelayPool, settings: &Settings) -> Value {
    let spec = &pool.spec;
    let identity = identity_secret_name(pool);
    let mut env = vec![
        field_env(env::POD_NAME, "metadata.name"),
        field_env(env::POD_NAMESPACE, "metadata.namespace"),
        field_env(env::POD_UID, "metadata.uid"),
        field_env("POD_IP", "status.podIP"),
        secret_env(env::COORDINATOR_CA, &identity, identity::CA_KEY),
        secret_env(env::RELAY_CERT, &identity, identity::CERT_KEY),
        secret_env(env::RELAY_KEY, &identity, identity::KEY_KEY),
    ];
    if let Some(endpoint) = &settings.otlp_endpoint {
        env.push(json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": endpoint}));
    }
    if let Some(tls) = &spec.listener.tls_secret_ref {
        env.push(secret_env(env::LISTENER_TLS_CERT, &tls.name, "tls.crt"));
        env.push(secret_env(env::LISTENER_TLS_KEY, &tls.name, "tls.key"));
    }
    // In bind mode the relay binds its egress addresses, which the platform routes to the
    // pod; listening on the pod IP keeps each relay on its own address on devcluster too.
    let args = vec![
        "relay".to_string(),
        format!("--coordinator={}", settings.coordinator_url),
        format!("--listen=$(POD_IP):{}", spec.listener.port),
        format!("--http-listen=$(POD_IP):{RELAY_HTTP_PORT}"),
        "--spool-dir=spool".to_string(),
        "--hostname=$(POD_NAME)".to_string(),
    ];
    let mut container = json!({
        "name": "relay",
        "image": spec.image.clone().unwrap_or_else(|| settings.relay_image.clone()),
        "args": args,
        "workingDir": SPOOL_MOUNT,
        "env": env,
        "ports": [
            {"name": "smtp", "containerPort": spec.listener.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": RELAY_HTTP_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
        },
        "volumeMounts": [{"name": "spool", "mountPath": SPOOL_MOUNT}],
        "securityContext": {
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    if let Some(resources) = &spec.resources {
        container["resources"] = json!(resources);
    }
    let mut template_meta = json!({"labels": labels(pool)});
    if let Some(a) = &spec.pod_annotations {
        template_meta["annotations"] = json!(a);
    }
    let mut pod_spec = json!({
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "terminationGracePeriodSeconds": DRAIN_SECONDS,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
    });
    if spec.host_network {
        pod_spec["hostNetwork"] = json!(true);
        pod_spec["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    }
    if let Some(n) = &spec.node_selector {
        pod_spec["nodeSelector"] = json!(n);
    }
    if let Some(t) = &spec.tolerations {
        pod_spec["tolerations"] = json!(t);
    }
    if let Some(a) = &spec.affinity {
        pod_spec["affinity"] = json!(a);
    }
    let mut claim_spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": spec.spool.size}},
    });
    if let Some(class) = &spec.spool.storage_class_name {
        claim_spec["storageClassName"] = json!(class);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(pool, &name_of(pool)),
        "spec": {
            "replicas": spec.replicas,
            "serviceName": headless_service_name(pool),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(pool)},
            "updateStrategy": {"type": "RollingUpdate"},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            "template": {"metadata": template_meta, "spec": pod_spec},
            "volumeClaimTemplates": [{
                "metadata": {"name": "spool", "labels": labels(pool)},
                "spec": claim_spec,
            }],
        },
    })
}

/// Name of the CiliumEgressGatewayPolicy of one relay pod (cluster-scoped, so it carries the
/// namespace in its name).
pub fn cilium_policy_name(pool: &RelayPool, ordinal: u32) -> String {
    format!(
        "mailfleet-{}-{}-{ordinal}",
        namespace_of(pool),
        name_of(pool)
    )
}

/// In `ciliumEgressGateway` mode: the policy that sends one relay pod's traffic out of the
/// gateway with its one egress address. Cluster-scoped, so it cannot be owned by the pool:
/// the pool's finalizer removes it.
pub fn cilium_policy(pool: &RelayPool, ordinal: u32, address: &str) -> Option<Value> {
    if pool.spec.egress.mode != EgressMode::CiliumEgressGateway {
        return None;
    }
    let cilium = pool.spec.egress.cilium.as_ref()?;
    let pod = format!("{}-{ordinal}", name_of(pool));
    let v6 = address.contains(':');
    let mut gateway = json!({
        "nodeSelector": {"matchLabels": cilium.gateway_node_selector},
    });
    match &cilium.interface {
        Some(interface) => gateway["interface"] = json!(interface),
        None => gateway["egressIP"] = json!(address),
    }
    let mut labels = selector_labels(pool);
    labels.insert("mailfleet.dev/namespace".to_string(), namespace_of(pool));
    Some(json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumEgressGatewayPolicy",
        "metadata": {"name": cilium_policy_name(pool, ordinal), "labels": labels},
        "spec": {
            "selectors": [{
                "podSelector": {"matchLabels": {
                    "statefulset.kubernetes.io/pod-name": pod,
                    "io.kubernetes.pod.namespace": namespace_of(pool),
                }},
            }],
            "destinationCIDRs": [if v6 { "::/0" } else { "0.0.0.0/0" }],
            "egressGateway": gateway,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;

    fn pool() -> RelayPool {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/relaypool.yaml"
        ))
        .unwrap();
        let mut p: RelayPool = serde_yaml::from_str(&text).unwrap();
        p.metadata.uid = Some("uid-1".into());
        p
    }

    fn settings() -> Settings {
        Settings {
            relay_image: "example.invalid/mailfleet:1".into(),
            coordinator_url: "https://mailfleet-coordinator.mailfleet.svc:7443".into(),
            otlp_endpoint: None,
        }
    }

    #[test]
    fn relays_export_traces_where_the_operator_does() {
        let p = pool();
        let env_of = |s: &Settings| {
            statefulset(&p, s)["spec"]["template"]["spec"]["containers"][0]["env"].clone()
        };
        assert!(
            !env_of(&settings())
                .to_string()
                .contains("OTEL_EXPORTER_OTLP_ENDPOINT")
        );
        let with = Settings {
            otlp_endpoint: Some("http://collector:4317".into()),
            ..settings()
        };
        let env = env_of(&with);
        assert!(
            env.as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT"
                    && e["value"] == "http://collector:4317"),
            "{env}"
        );
    }

    #[test]
    fn statefulset_is_a_valid_hardened_relay_set() {
        let p = pool();
        let v = statefulset(&p, &settings());
        let sts: StatefulSet = serde_json::from_value(v.clone()).unwrap();
        let spec = sts.spec.unwrap();
        assert_eq!(spec.replicas, Some(p.spec.replicas));
        assert_eq!(spec.service_name.as_deref(), Some("transactional-relays"));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        let sc = pod.security_context.unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        let c = &pod.containers[0];
        assert_eq!(c.args.as_ref().unwrap()[0], "relay");
        let csc = c.security_context.as_ref().unwrap();
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        let env: Vec<String> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        for name in [
            env::COORDINATOR_CA,
            env::RELAY_CERT,
            env::RELAY_KEY,
            env::POD_UID,
        ] {
            assert!(
                env.contains(&name.to_string()),
                "{name} missing from {env:?}"
            );
        }
        // The example pool authenticates users over TLS: the listener's certificate is passed.
        assert!(env.contains(&env::LISTENER_TLS_CERT.to_string()));
        assert_eq!(
            spec.volume_claim_templates.unwrap()[0]
                .spec
                .as_ref()
                .unwrap()
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"]
                .0,
            p.spec.spool.size
        );
        // Every child is owned by the pool, so deleting the pool removes them.
        assert_eq!(sts.metadata.owner_references.unwrap()[0].uid, "uid-1");
    }

    #[test]
    fn services_and_budget_select_the_relays() {
        let p = pool();
        for v in [smtp_service(&p), headless_service(&p)] {
            let s: Service = serde_json::from_value(v).unwrap();
            let sel = s.spec.unwrap().selector.unwrap();
            assert_eq!(sel[POOL_LABEL], "transactional");
        }
        let pdb: PodDisruptionBudget = serde_json::from_value(pod_disruption_budget(&p)).unwrap();
        assert!(pdb.spec.unwrap().max_unavailable.is_some());
    }

    #[test]
    fn cilium_policy_pins_one_pod_to_one_address() {
        let mut p = pool();
        assert!(
            cilium_policy(&p, 0, "192.0.2.10").is_none(),
            "bind mode has none"
        );
        p.spec.egress.mode = EgressMode::CiliumEgressGateway;
        p.spec.egress.cilium = Some(mailfleet_api::relaypool::CiliumEgressSpec {
            gateway_node_selector: BTreeMap::from([("egress".into(), "true".into())]),
            interface: None,
        });
        let v = cilium_policy(&p, 1, "192.0.2.11").unwrap();
        assert_eq!(v["spec"]["egressGateway"]["egressIP"], "192.0.2.11");
        assert_eq!(
            v["spec"]["selectors"][0]["podSelector"]["matchLabels"]["statefulset.kubernetes.io/pod-name"],
            "transactional-1"
        );
        assert_eq!(v["metadata"]["name"], "mailfleet-mail-transactional-1");
    }
}
