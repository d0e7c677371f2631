//! What only a real control plane shows, run by hack/e2e-kube.sh after the cluster suite,
//! against kube-apiserver with the chart installed (plain `cargo test` skips it: devcluster
//! has neither RBAC nor an audit log):
//!
//! - **GitOps health**: a converged fleet (RelayPool, SendingDomain published by RFC 2136 into
//!   Knot and verified, WarmupPlan), its StatefulSet, Services and PDB, and the chart's own
//!   objects are all `Current` by kstatus (`kubecp kstatus`, cli-utils' computation, as Flux
//!   and kapp judge them); a rollout to an image the node cannot run is reported
//!   `InProgress` for the pool and its StatefulSet, and the pod says why.
//! - **RBAC least privilege**: no request of the operator's ServiceAccount was refused (the
//!   API server's audit log over the whole run), every permission the chart grants it was
//!   used or is listed below with the feature that needs it, what `kubectl auth can-i --list`
//!   shows for it in a tenant namespace is exactly the ClusterRole, and what it only ever did
//!   in its own namespace is granted by a namespaced Role.
//!
//! Environment (set by hack/e2e-kube.sh): `MAILFLEET_E2E_KUBECONFIG` (admin),
//! `MAILFLEET_KUBE_DIR` (hack/kube-up's directory: logs/audit.log),
//! `MAILFLEET_E2E_RELEASE` and `MAILFLEET_E2E_RELEASE_NAMESPACE` (the chart's release).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../relay/tests/common/mod.rs"]
mod common;
mod e2e;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use common::{Knot, free_port, repo_root};
use e2e::{Kubectl, condition, create_tsig_secret, eventually, example_plan};
use serde_json::Value;

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run this test through hack/e2e-kube.sh"))
}

fn kubecp() -> PathBuf {
    let path = std::env::var_os("KUBECP")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("bin/kubecp"));
    assert!(
        path.is_file(),
        "{} missing: hack/kube-build.sh builds it",
        path.display()
    );
    path
}

/// kstatus of every object of `resources` in `ns`: (resource/name, status, message).
fn kstatus(k: &Kubectl, ns: &str, resources: &[&str]) -> Vec<(String, String, String)> {
    let out = Command::new(kubecp())
        .arg("kstatus")
        .arg(format!("--kubeconfig={}", k.kubeconfig.display()))
        .arg(format!("--namespace={ns}"))
        .args(resources)
        .output()
        .unwrap();
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 1)),
        "kubecp kstatus failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                format!(
                    "{}/{}",
                    v["resource"].as_str().unwrap(),
                    v["name"].as_str().unwrap()
                ),
                v["status"].as_str().unwrap().to_string(),
                v["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    // The exit status agrees with the rows: 0 exactly when all are Current.
    assert_eq!(
        code == Some(0),
        rows.iter().all(|r| r.1 == "Current"),
        "{rows:?}"
    );
    rows
}

const MAILFLEET_KINDS: [&str; 3] = [
    "relaypools.v1alpha1.mailfleet.dev",
    "sendingdomains.v1alpha1.mailfleet.dev",
    "warmupplans.v1alpha1.mailfleet.dev",
];
const OWNED_KINDS: [&str; 3] = [
    "statefulsets.v1.apps",
    "services.v1.",
    "poddisruptionbudgets.v1.policy",
];

fn all_current(rows: &[(String, String, String)]) -> bool {
    rows.iter().all(|r| r.1 == "Current")
}

fn gitops_health(k: &Kubectl, root: &std::path::Path, ns: &str, release_ns: &str) {
    let knot = Knot::start(root, &[]);
    create_tsig_secret(k, ns);
    let plan = example_plan();
    let fleet = format!(
        r#"{plan}
---
apiVersion: mailfleet.dev/v1alpha1
kind: RelayPool
metadata:
  name: gitops
spec:
  replicas: 1
  egress:
    addresses: [{{address: 127.0.5.1, heloName: mta-1.gitops.example.test}}]
  listener:
    port: {port}
    allowedNetworks: ["127.0.0.0/8"]
  warmupPlanRef:
    name: standard
---
apiVersion: mailfleet.dev/v1alpha1
kind: SendingDomain
metadata:
  name: gitops
spec:
  domain: gitops.example.test
  relayPoolRef:
    name: gitops
  dns:
    provider: rfc2136
    ttl: 30
    rfc2136:
      server: "127.0.0.1:{knot}"
      zone: example.test
      tsigKeyName: update-key
      tsigSecretRef:
        name: dns-tsig
"#,
        port = free_port(),
        knot = knot.port,
    );
    let file = root.join("gitops.yaml");
    std::fs::write(&file, fleet).unwrap();
    k.ok(&["-n", ns, "apply", "-f", file.to_str().unwrap()]);
    eventually(180, "the pool and the domain Ready", || {
        let pool = k.json(&["-n", ns, "get", "relaypool", "gitops"]);
        let domain = k.json(&["-n", ns, "get", "sendingdomain", "gitops"]);
        (condition(&pool, "Ready") && condition(&domain, "Ready")).then_some(())
    });

    // Converged: every object of the fleet and of the chart is Current.
    let mut resources: Vec<&str> = MAILFLEET_KINDS.to_vec();
    resources.extend(OWNED_KINDS);
    let rows = eventually(60, "every object Current by kstatus", || {
        let rows = kstatus(k, ns, &resources);
        all_current(&rows).then_some(rows)
    });
    for kind in [
        "relaypools",
        "sendingdomains",
        "warmupplans",
        "statefulsets",
    ] {
        assert!(
            rows.iter().any(|r| r.0.starts_with(kind)),
            "{kind} missing from kstatus: {rows:?}"
        );
    }
    let chart = kstatus(
        k,
        release_ns,
        &[
            "deployments.v1.apps",
            "services.v1.",
            "poddisruptionbudgets.v1.policy",
        ],
    );
    assert!(
        all_current(&chart) && chart.iter().any(|r| r.0 == "deployments.v1.apps/mailfleet"),
        "the chart's objects: {chart:?}"
    );

    // A rollout the node cannot run: the pool and its StatefulSet are in progress, never
    // Current, and the pod says why.
    k.ok(&[
        "-n",
        ns,
        "patch",
        "relaypool",
        "gitops",
        "--type=merge",
        "-p",
        r#"{"spec":{"image":"registry.example.invalid/not-runnable:1"}}"#,
    ]);
    let rows = eventually(60, "the pool and its StatefulSet InProgress", || {
        let rows = kstatus(k, ns, &[MAILFLEET_KINDS[0], OWNED_KINDS[0]]);
        (rows.len() == 2 && rows.iter().all(|r| r.1 == "InProgress")).then_some(rows)
    });
    assert!(!all_current(&rows));
    let reason = eventually(60, "the pod refused with a reason", || {
        let pod = k.json(&["-n", ns, "get", "pod", "gitops-0"]);
        let waiting = &pod["status"]["containerStatuses"][0]["state"]["waiting"];
        (pod["spec"]["containers"][0]["image"] == "registry.example.invalid/not-runnable:1"
            && waiting["reason"] == "ErrImageNeverPull")
            .then(|| waiting["message"].as_str().unwrap_or_default().to_string())
    });
    assert!(
        reason.contains("registry.example.invalid/not-runnable:1"),
        "{reason}"
    );
}

/// (group, resource, verb): one permission, `resource` with its subresource (`pods/status`).
type Permission = (String, String, String);

fn rules(role: &Value) -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    let (g, r, v) = (
                        g.as_str().unwrap(),
                        r.as_str().unwrap(),
                        v.as_str().unwrap(),
                    );
                    assert!(
                        g != "*" && r != "*" && v != "*",
                        "wildcard in {}: {rule}",
                        role["metadata"]["name"]
                    );
                    out.insert((g.to_string(), r.to_string(), v.to_string()));
                }
            }
        }
    }
    out
}

/// What `kubectl auth can-i --list` says the account may do in `ns`, as permissions (rows
/// with resource names or non-resource URLs are left out; wildcard verbs fail the test).
fn can_i(k: &Kubectl, user: &str, ns: &str) -> BTreeSet<Permission> {
    let out = k.ok(&["auth", "can-i", "--list", &format!("--as={user}"), "-n", ns]);
    let mut perms = BTreeSet::new();
    for line in out.lines().skip(1) {
        // Resources  Non-Resource URLs  Resource Names  Verbs
        let Some(open) = line.find('[') else { continue };
        let head: Vec<&str> = line[..open].split_whitespace().collect();
        let verbs = &line[line.rfind('[').unwrap() + 1..line.rfind(']').unwrap()];
        if head.is_empty() || line[open..].matches('[').count() > 3 {
            continue;
        }
        // Resource names or non-resource URLs: `[]` twice means neither.
        if !line[open..].starts_with("[]") || line[open..].matches("[]").count() < 2 {
            continue;
        }
        // `relaypools.mailfleet.dev/status`: resource, group, subresource.
        let (name, sub) = match head[0].split_once('/') {
            Some((name, sub)) => (name, format!("/{sub}")),
            None => (head[0], String::new()),
        };
        let (resource, group) = name.split_once('.').unwrap_or((name, ""));
        for verb in verbs.split_whitespace() {
            assert_ne!(verb, "*", "{user} may do anything to {resource}: {line}");
            perms.insert((
                group.to_string(),
                format!("{resource}{sub}"),
                verb.to_string(),
            ));
        }
    }
    perms
}

/// A request of the operator as the audit log has it.
struct Request {
    permission: Permission,
    namespace: String,
    code: u64,
    /// RBAC refused it (an admission refusal, such as a terminating namespace, is not).
    forbidden: bool,
}

/// Every request of `user` in the audit log.
fn audited(log: &std::path::Path, user: &str) -> Vec<Request> {
    let text =
        std::fs::read_to_string(log).unwrap_or_else(|e| panic!("audit log {}: {e}", log.display()));
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        // A watch is audited when its response starts (it completes only when it ends).
        .filter(|e| {
            e["user"]["username"] == user
                && (e["stage"] == "ResponseComplete"
                    || (e["stage"] == "ResponseStarted" && e["verb"] == "watch"))
        })
        .filter_map(|e| {
            let o = &e["objectRef"];
            let resource = o["resource"].as_str()?;
            let resource = match o["subresource"].as_str() {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.to_string(),
            };
            let perm = (
                o["apiGroup"].as_str().unwrap_or_default().to_string(),
                resource,
                e["verb"].as_str()?.to_string(),
            );
            Some(Request {
                permission: perm,
                namespace: o["namespace"].as_str().unwrap_or_default().to_string(),
                code: e["responseStatus"]["code"].as_u64().unwrap_or(0),
                forbidden: e["annotations"]["authorization.k8s.io/decision"] == "forbid",
            })
        })
        .collect()
}

/// Permissions the chart grants that no request of this suite shows, and why they stay:
/// (group, resource, verbs, the feature that needs them).
const NEEDED_ELSEWHERE: &[(&str, &str, &[&str], &str)] = &[
    (
        "authentication.k8s.io",
        "tokenreviews",
        &["create"],
        "relays authenticating with projected service-account tokens",
    ),
    (
        "cilium.io",
        "ciliumegressgatewaypolicies",
        &["list", "create", "patch", "delete"],
        "egress mode ciliumEgressGateway (no Cilium here)",
    ),
    (
        "externaldns.k8s.io",
        "dnsendpoints",
        &["create", "patch", "delete"],
        "DNS provider externalDNS (no external-dns here)",
    ),
    (
        "",
        "configmaps",
        &["update"],
        "a suppression list that grows after its first entries (suppression.rs)",
    ),
    // Not requests of their own: OwnerReferencesPermissionEnforcement (on in hack/kube-up)
    // checks them when the operator sets blockOwnerDeletion on the objects it owns.
    (
        "mailfleet.dev",
        "relaypools/finalizers",
        &["update"],
        "blockOwnerDeletion",
    ),
    (
        "mailfleet.dev",
        "sendingdomains/finalizers",
        &["update"],
        "blockOwnerDeletion",
    ),
];

fn least_privilege(
    k: &Kubectl,
    tenant_ns: &str,
    release: &str,
    release_ns: &str,
    audit: &std::path::Path,
) {
    let user = format!("system:serviceaccount:{release_ns}:{release}");
    let cluster_role = rules(&k.json(&["get", "clusterrole", release]));
    let mut namespaced = BTreeSet::new();
    for role in k.json(&["-n", release_ns, "get", "roles"])["items"]
        .as_array()
        .unwrap()
    {
        if role["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with(release)
        {
            namespaced.extend(rules(role));
        }
    }

    // In a tenant's namespace the account holds the ClusterRole and nothing else beyond
    // what every service account may do (an account without bindings shows that).
    let everyone = |ns: &str| {
        can_i(
            k,
            &format!("system:serviceaccount:{ns}:mailfleet-e2e-nobody"),
            ns,
        )
    };
    let tenant: BTreeSet<Permission> = can_i(k, &user, tenant_ns)
        .difference(&everyone(tenant_ns))
        .cloned()
        .collect();
    assert_eq!(
        tenant, cluster_role,
        "kubectl auth can-i --list in {tenant_ns} differs from the ClusterRole"
    );
    let own: BTreeSet<Permission> = can_i(k, &user, release_ns)
        .difference(&everyone(release_ns))
        .cloned()
        .collect();
    let expected: BTreeSet<Permission> = cluster_role.union(&namespaced).cloned().collect();
    assert_eq!(own, expected, "kubectl auth can-i --list in {release_ns}");

    let requests = audited(audit, &user);
    assert!(
        requests.len() > 100,
        "only {} audited requests of {user}",
        requests.len()
    );
    let refused: BTreeSet<String> = requests
        .iter()
        .filter(|r| r.forbidden)
        .map(|r| {
            let (g, res, v) = &r.permission;
            format!("{v} {res}.{g} in {:?}", r.namespace)
        })
        .collect();
    assert!(
        refused.is_empty(),
        "the API server refused the operator (RBAC lacks them): {refused:#?}"
    );
    // A server-side apply that creates its object (201) is authorized as patch and create.
    let mut used: BTreeMap<Permission, BTreeSet<String>> = BTreeMap::new();
    for r in &requests {
        let (g, res, v) = &r.permission;
        if v == "patch" && r.code == 201 {
            let create = (g.clone(), res.clone(), "create".to_string());
            used.entry(create).or_default().insert(r.namespace.clone());
        }
        used.entry(r.permission.clone())
            .or_default()
            .insert(r.namespace.clone());
    }
    let justified = |p: &Permission| {
        NEEDED_ELSEWHERE
            .iter()
            .any(|(g, r, verbs, _)| p.0 == *g && p.1 == *r && verbs.contains(&p.2.as_str()))
    };
    let unused: Vec<&Permission> = expected
        .iter()
        .filter(|p| !used.contains_key(*p) && !justified(p))
        .collect();
    assert!(
        unused.is_empty(),
        "granted but never used by the operator over the whole suite: {}",
        unused
            .iter()
            .map(|(g, r, v)| format!("{v} {r}.{g}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Cluster-wide grants are used beyond the operator's own namespace.
    let only_own: Vec<&Permission> = cluster_role
        .iter()
        .filter(|p| {
            used.get(*p)
                .is_some_and(|nss| nss.iter().all(|ns| ns == release_ns))
        })
        .collect();
    assert!(
        only_own.is_empty(),
        "granted cluster-wide but only used in {release_ns} (a Role would do): {only_own:#?}"
    );
}

#[test]
#[ignore = "needs a real control plane with the chart installed: hack/e2e-kube.sh runs it"]
fn the_fleet_is_current_by_kstatus_and_the_operator_holds_only_what_it_uses() {
    let kubeconfig = PathBuf::from(env("MAILFLEET_E2E_KUBECONFIG"));
    let kube_dir = PathBuf::from(env("MAILFLEET_KUBE_DIR"));
    let release = env("MAILFLEET_E2E_RELEASE");
    let release_ns = env("MAILFLEET_E2E_RELEASE_NAMESPACE");
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl {
        kubeconfig,
        home: dir.path().to_path_buf(),
    };
    let ns = format!(
        "mailfleet-gitops-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 100_000
    );
    k.ok(&["create", "namespace", &ns]);
    gitops_health(&k, dir.path(), &ns, &release_ns);
    least_privilege(
        &k,
        &ns,
        &release,
        &release_ns,
        &kube_dir.join("logs/audit.log"),
    );
    k.ok(&["delete", "namespace", &ns, "--wait=false"]);
}
