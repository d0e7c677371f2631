//! The SendingDomain controller against devcluster and a real Knot DNS server (RFC 2136 with
//! TSIG): records published and verified, the DKIM Secret in the format the relays read, a
//! wrong TSIG key explained in conditions, records removed with the domain (and records we did
//! not create left alone), and DKIM rotation driven by an injected clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mailfleet_api::relaypool::RelayPool;
use mailfleet_api::sendingdomain::SendingDomain;
use mailfleet_devcluster::{Config, DevCluster, RunnerConfig};
use mailfleet_operator::children::Settings;
use mailfleet_operator::{OperatorConfig, run};
use serde_json::json;
use tokio::sync::watch;

const TSIG_SECRET: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ=";
const NS: &str = "mail";

fn free_port() -> u16 {
    // Knot binds UDP and TCP: find a port free for both.
    loop {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A free port outside the ephemeral range: connecting to a closed ephemeral port on loopback
/// can connect a socket to itself and so take the port the server is about to bind.
fn free_low_port() -> u16 {
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    (start..32_000)
        .find(|p| {
            std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok()
        })
        .unwrap()
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn require(bin: &str) -> PathBuf {
    let dirs = std::env::var("PATH").unwrap_or_default();
    for d in dirs.split(':').chain(["/usr/sbin", "/sbin"]) {
        let p = Path::new(d).join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!("this test needs `{bin}` (apt-get install -y knot bind9-dnsutils)");
}

struct Knot {
    port: u16,
    pid: u32,
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
    }
}

impl Knot {
    fn start(dir: &Path, records: &[&str]) -> Knot {
        Knot::start_on(dir, free_port(), records)
    }

    fn start_on(dir: &Path, port: u16, records: &[&str]) -> Knot {
        require("knotd");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/knot-up.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(dir.join("knot"))
            .arg(port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "knot-up.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let knot = Knot { port, pid };
        let adds: Vec<String> = records.iter().map(|r| format!("add {r}")).collect();
        knot.update(&adds.iter().map(String::as_str).collect::<Vec<_>>());
        knot
    }

    /// Sends nsupdate `update` lines (`add ...`, `delete ...`) to the zone, signed with the
    /// test's TSIG key.
    fn update(&self, lines: &[&str]) {
        if lines.is_empty() {
            return;
        }
        let mut cmds = format!("server 127.0.0.1 {}\nzone example.test\n", self.port);
        for l in lines {
            cmds.push_str(&format!("update {l}\n"));
        }
        cmds.push_str("send\n");
        let mut child = Command::new(require("nsupdate"))
            .args(["-y", &format!("hmac-sha256:update-key:{TSIG_SECRET}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(cmds.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nsupdate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The record values at `name` (TXT strings joined), as Knot serves them.
    fn query(&self, name: &str, rtype: &str) -> Vec<String> {
        let out = Command::new(require("dig"))
            .args([
                "@127.0.0.1",
                "-p",
                &self.port.to_string(),
                "+short",
                "+norecurse",
                name,
                rtype,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                if rtype == "TXT" {
                    // "a" "b" -> ab
                    l.split('"')
                        .enumerate()
                        .filter(|(i, _)| i % 2 == 1)
                        .map(|(_, s)| s)
                        .collect::<String>()
                } else {
                    l.to_string()
                }
            })
            .collect()
    }
}

struct Env {
    _dc: DevCluster,
    client: Client,
    dir: tempfile::TempDir,
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
    for ns in ["mailfleet-system", NS] {
        let n: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        nss.create(&PostParams::default(), &n).await.unwrap();
    }
    Env {
        _dc: dc,
        client,
        dir,
    }
}

struct Operator {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), mailfleet_operator::OperatorError>>,
}

fn start_operator(client: &Client) -> Operator {
    let health = free_addr();
    let coordinator = free_addr();
    let config = OperatorConfig {
        coordinator_addr: coordinator,
        metrics_addr: health,
        health_addr: health,
        leader_election: false,
        namespace: "mailfleet-system".into(),
        identity: "op-0".into(),
        watch_namespaces: Vec::new(),
        settings: Settings {
            relay_image: "example.invalid/mailfleet:test".into(),
            coordinator_url: format!("https://{coordinator}"),
            otlp_endpoint: None,
        },
    };
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(run(client.clone(), config, rx));
    Operator { stop, task }
}

impl Operator {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }
}

async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn apply<K>(api: &Api<K>, name: &str, doc: serde_json::Value)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&doc),
    )
    .await
    .unwrap();
}

async fn setup(
    client: &Client,
    knot_port: u16,
    tsig: &str,
    name: &str,
    domain: &str,
    extra: serde_json::Value,
) {
    let pools: Api<RelayPool> = Api::namespaced(client.clone(), NS);
    apply(&pools, "pool", json!({
        "apiVersion": "mailfleet.dev/v1alpha1", "kind": "RelayPool",
        "metadata": {"name": "pool"},
        "spec": {
            "replicas": 1,
            "egress": {"cidrs": ["127.0.9.0/30"], "heloNameTemplate": "mta-{ip}.relay.example.test"},
            "listener": {"allowedNetworks": ["127.0.0.0/8"]},
        },
    })).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    apply(
        &secrets,
        &format!("{name}-tsig"),
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("{name}-tsig")},
            "stringData": {"secret": tsig},
        }),
    )
    .await;
    let mut spec = json!({
        "domain": domain,
        "relayPoolRef": {"name": "pool"},
        "dkim": {"algorithm": "dual"},
        "dmarc": {"policy": "quarantine", "rua": ["mailto:dmarc@example.test"]},
        "spf": {"returnPathMx": [{"preference": 10, "host": "mx.example.test"}]},
        "dns": {
            "provider": "rfc2136",
            "ttl": 30,
            "rfc2136": {
                "server": format!("127.0.0.1:{knot_port}"),
                "zone": "example.test",
                "tsigKeyName": "update-key",
                "tsigSecretRef": {"name": format!("{name}-tsig")},
            },
        },
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let domains: Api<SendingDomain> = Api::namespaced(client.clone(), NS);
    apply(
        &domains,
        name,
        json!({
            "apiVersion": "mailfleet.dev/v1alpha1", "kind": "SendingDomain",
            "metadata": {"name": name}, "spec": spec,
        }),
    )
    .await;
}

/// Notes of the Events about SendingDomain `name` with `reason`, oldest first.
async fn events(client: &Client, name: &str, reason: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), NS);
    let mut evs: Vec<Event> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("SendingDomain")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect();
    evs.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    evs.into_iter().filter_map(|e| e.note).collect()
}

/// Waits for an Event about `name` with `reason` and returns its notes.
async fn wait_event(client: &Client, name: &str, reason: &str) -> Vec<String> {
    eventually(60, &format!("a {reason} event about {name}"), async || {
        let notes = events(client, name, reason).await;
        (!notes.is_empty()).then_some(notes)
    })
    .await
}

fn condition(d: &SendingDomain, ty: &str) -> Option<(String, String, String)> {
    d.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == ty)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_published_verified_and_removed_with_the_domain() {
    let env = env().await;
    let knot = Knot::start(
        env.dir.path(),
        &[
            r#"mail.example.test. 60 TXT "google-site-verification=keep-me""#,
            r#"other.example.test. 60 TXT "v=spf1 -all""#,
        ],
    );
    let op = start_operator(&env.client);
    setup(
        &env.client,
        knot.port,
        TSIG_SECRET,
        "example",
        "mail.example.test",
        json!({}),
    )
    .await;
    let domains: Api<SendingDomain> = Api::namespaced(env.client.clone(), NS);

    let d = eventually(60, "DNSVerified=True", async || {
        let d = domains.get("example").await.ok()?;
        (condition(&d, "DNSVerified")?.0 == "True").then_some(d)
    })
    .await;
    let status = d.status.clone().unwrap();
    for c in ["DKIMReady", "DNSPublished", "SPFValid", "Ready"] {
        assert_eq!(
            condition(&d, c).unwrap().0,
            "True",
            "{c}: {:?}",
            condition(&d, c)
        );
    }
    let selector = status.active_selector.clone().unwrap();
    assert!(selector.starts_with("mf-"), "{selector}");
    assert_eq!(status.observed_generation, d.metadata.generation);
    let names: Vec<(String, String)> = status
        .records
        .iter()
        .map(|r| (r.name.clone(), r.type_.clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            (
                format!("{selector}._domainkey.mail.example.test"),
                "TXT".into()
            ),
            (
                format!("{selector}-ed._domainkey.mail.example.test"),
                "TXT".into()
            ),
            ("mail.example.test".into(), "TXT".into()),
            ("bounces.mail.example.test".into(), "TXT".into()),
            ("bounces.mail.example.test".into(), "MX".into()),
            ("_dmarc.mail.example.test".into(), "TXT".into()),
        ]
    );
    assert!(
        status.records.iter().all(|r| r.published && r.verified),
        "{:?}",
        status.records
    );
    let (_, reason, message) = condition(&d, "SPFValid").unwrap();
    assert_eq!(reason, "WithinLimit");
    assert!(
        message.contains("needs 0 of the 10 DNS lookups"),
        "{message}"
    );
    // Events tell what happened.
    let generated = wait_event(&env.client, "example", "KeyGenerated").await;
    assert!(generated[0].contains(&selector), "{generated:?}");
    let published = wait_event(&env.client, "example", "RecordsPublished").await;
    assert!(
        published[0].contains(&format!(
            "wrote {selector}._domainkey.mail.example.test TXT"
        )) && published[0].contains("_dmarc.mail.example.test TXT"),
        "{published:?}"
    );
    let verified = wait_event(&env.client, "example", "DNSVerified").await;
    assert!(verified[0].contains("6 record(s) served"), "{verified:?}");
    assert!(
        events(&env.client, "example", "PublishFailed")
            .await
            .is_empty()
    );

    // What Knot serves.
    // The /30 gives its two host addresses.
    let spf = "v=spf1 ip4:127.0.9.1 ip4:127.0.9.2 -all";
    let apex = knot.query("mail.example.test", "TXT");
    assert!(apex.contains(&spf.to_string()), "{apex:?}");
    assert!(apex.contains(&"google-site-verification=keep-me".to_string()));
    assert_eq!(
        knot.query("bounces.mail.example.test", "TXT"),
        vec![spf.to_string()]
    );
    assert_eq!(
        knot.query("bounces.mail.example.test", "MX"),
        vec!["10 mx.example.test.".to_string()]
    );
    assert_eq!(
        knot.query("_dmarc.mail.example.test", "TXT"),
        vec!["v=DMARC1; p=quarantine; rua=mailto:dmarc@example.test".to_string()]
    );
    let rsa = knot.query(&format!("{selector}._domainkey.mail.example.test"), "TXT");
    assert!(rsa[0].starts_with("v=DKIM1; k=rsa; p=MIIBIjAN"), "{rsa:?}");
    let ed = knot.query(
        &format!("{selector}-ed._domainkey.mail.example.test"),
        "TXT",
    );
    assert!(ed[0].starts_with("v=DKIM1; k=ed25519; p="), "{ed:?}");
    assert_eq!(
        knot.query("_mailfleet-owner.mail.example.test", "TXT")
            .len(),
        6
    );

    // The key Secret, in the format the RelayPool controller reads.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
    let s = secrets.get("example-dkim").await.unwrap();
    let data = s.data.unwrap();
    assert_eq!(String::from_utf8_lossy(&data["selector"].0), selector);
    for k in ["rsa.pem", "ed25519.pem"] {
        assert!(
            String::from_utf8_lossy(&data[k].0).starts_with("-----BEGIN PRIVATE KEY-----"),
            "{k}"
        );
    }

    // A new pool address reaches SPF.
    let pools: Api<RelayPool> = Api::namespaced(env.client.clone(), NS);
    pools
        .patch(
            "pool",
            &PatchParams::apply("test").force(),
            &Patch::Apply(json!({
                "apiVersion": "mailfleet.dev/v1alpha1", "kind": "RelayPool",
                "metadata": {"name": "pool"},
                "spec": {
                    "replicas": 1,
                    "egress": {"cidrs": ["127.0.9.0/30"], "addresses": [{"address": "127.0.9.9"}],
                               "heloNameTemplate": "mta-{ip}.relay.example.test"},
                    "listener": {"allowedNetworks": ["127.0.0.0/8"]},
                },
            })),
        )
        .await
        .unwrap();
    eventually(60, "SPF with the new address", async || {
        knot.query("mail.example.test", "TXT")
            .iter()
            .any(|v| v.contains("ip4:127.0.9.9"))
            .then_some(())
    })
    .await;
    // The old SPF value is gone (it was ours), the foreign TXT stays.
    let apex = knot.query("mail.example.test", "TXT");
    assert_eq!(
        apex.iter().filter(|v| v.starts_with("v=spf1")).count(),
        1,
        "{apex:?}"
    );
    let published = eventually(60, "a RecordsPublished event for the change", async || {
        let notes = events(&env.client, "example", "RecordsPublished").await;
        notes.into_iter().find(|n| n.contains("removed"))
    })
    .await;
    // Both SPF records replaced, nothing else touched.
    let (wrote, removed) = published.split_once("; removed ").unwrap();
    for part in [wrote, &format!(" {removed}")] {
        assert!(
            part.contains(" mail.example.test TXT")
                && part.contains("bounces.mail.example.test TXT"),
            "{published}"
        );
        assert!(!part.contains("_domainkey"), "{published}");
    }

    // Deleting the domain removes its records and keys, nothing else.
    domains
        .delete("example", &DeleteParams::default())
        .await
        .unwrap();
    eventually(60, "the domain to be gone", async || {
        domains
            .get_opt("example")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        knot.query("mail.example.test", "TXT"),
        vec!["google-site-verification=keep-me".to_string()]
    );
    for (name, t) in [
        (format!("{selector}._domainkey.mail.example.test"), "TXT"),
        ("bounces.mail.example.test".to_string(), "TXT"),
        ("bounces.mail.example.test".to_string(), "MX"),
        ("_dmarc.mail.example.test".to_string(), "TXT"),
        ("_mailfleet-owner.mail.example.test".to_string(), "TXT"),
    ] {
        assert!(knot.query(&name, t).is_empty(), "{name} {t} still served");
    }
    assert_eq!(
        knot.query("other.example.test", "TXT"),
        vec!["v=spf1 -all".to_string()]
    );
    assert!(secrets.get_opt("example-dkim").await.unwrap().is_none());
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_tsig_key_is_explained_and_the_operator_keeps_running() {
    let env = env().await;
    let knot = Knot::start(env.dir.path(), &[]);
    let op = start_operator(&env.client);
    // A valid base64 secret that is not the server's.
    setup(
        &env.client,
        knot.port,
        "d3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmctd3JvbmctMTI=",
        "bad",
        "bad.example.test",
        json!({}),
    )
    .await;
    let domains: Api<SendingDomain> = Api::namespaced(env.client.clone(), NS);
    let (status, reason, message) = eventually(60, "DNSPublished=False", async || {
        let d = domains.get("bad").await.ok()?;
        condition(&d, "DNSPublished").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(status, "False");
    assert_eq!(reason, "TSIGRejected");
    assert!(message.contains("TSIG"), "{message}");
    assert!(message.contains("update-key"), "{message}");
    let d = domains.get("bad").await.unwrap();
    assert_eq!(condition(&d, "DNSVerified").unwrap().0, "False");
    assert_eq!(condition(&d, "Ready").unwrap().0, "False");
    assert!(d.status.unwrap().records.iter().all(|r| !r.published));
    assert!(knot.query("bad.example.test", "TXT").is_empty());
    assert!(!op.task.is_finished(), "the operator stopped");
    let failed = wait_event(&env.client, "bad", "PublishFailed").await;
    assert!(
        failed[0].starts_with("TSIGRejected: ") && failed[0].contains("update-key"),
        "{failed:?}"
    );
    let unverified = wait_event(&env.client, "bad", "DNSVerificationFailed").await;
    assert!(unverified[0].starts_with("NotServed: "), "{unverified:?}");
    assert!(events(&env.client, "bad", "DNSVerified").await.is_empty());

    // The right secret: watched, so it takes effect at once, not at the next backoff retry.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
    apply(
        &secrets,
        "bad-tsig",
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "bad-tsig"},
            "stringData": {"secret": TSIG_SECRET},
        }),
    )
    .await;
    eventually(20, "DNSVerified=True soon after the fix", async || {
        let d = domains.get("bad").await.ok()?;
        (condition(&d, "DNSVerified")?.0 == "True").then_some(())
    })
    .await;
    assert!(!knot.query("bad.example.test", "TXT").is_empty());
    wait_event(&env.client, "bad", "RecordsPublished").await;
    wait_event(&env.client, "bad", "DNSVerified").await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_rotation_follows_the_injected_clock() {
    let env = env().await;
    let knot = Knot::start(env.dir.path(), &[]);
    let start: Timestamp = "2026-01-01T12:00:00Z".parse().unwrap();
    let offset = Arc::new(AtomicI64::new(0));
    let clock = {
        let offset = Arc::clone(&offset);
        Arc::new(move || {
            start
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(
                    offset.load(Ordering::SeqCst),
                ))
                .unwrap()
        })
    };
    let ctx = Arc::new(
        mailfleet_operator::sendingdomain::Context::new(env.client.clone(), Arc::default())
            .with_clock(clock),
    );
    let (stop, rx) = watch::channel(false);
    let controller = tokio::spawn(mailfleet_operator::sendingdomain::run(
        ctx,
        Some(NS.into()),
        async move {
            let mut rx = rx;
            let _ = rx.wait_for(|s| *s).await;
        },
    ));
    setup(
        &env.client,
        knot.port,
        TSIG_SECRET,
        "rot",
        "rot.example.test",
        json!({"dkim": {"algorithm": "rsa2048", "rotationPeriod": "1d"}}),
    )
    .await;
    let domains: Api<SendingDomain> = Api::namespaced(env.client.clone(), NS);
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
    let selector_in_secret = async || {
        let s = secrets.get("rot-dkim").await.unwrap();
        String::from_utf8_lossy(&s.data.unwrap()["selector"].0).into_owned()
    };
    eventually(60, "first selector verified", async || {
        let d = domains.get("rot").await.ok()?;
        (condition(&d, "DNSVerified")?.0 == "True").then_some(())
    })
    .await;
    assert_eq!(selector_in_secret().await, "mf-20260101");
    assert!(
        !knot
            .query("mf-20260101._domainkey.rot.example.test", "TXT")
            .is_empty()
    );

    // Time passes in steps; each step pokes the controller (an annotation is an event).
    let mut poke = 0;
    let mut step = async |secs: i64| {
        offset.fetch_add(secs, Ordering::SeqCst);
        poke += 1;
        domains
            .patch(
                "rot",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {"test/poke": poke.to_string()}}}),
                ),
            )
            .await
            .unwrap();
    };
    // A day later the next selector is published, but not yet used for signing.
    step(86_400).await;
    let d = eventually(60, "the next selector", async || {
        let d = domains.get("rot").await.ok()?;
        d.status.as_ref()?.next_selector.is_some().then_some(d)
    })
    .await;
    assert_eq!(
        d.status.unwrap().next_selector.as_deref(),
        Some("mf-20260102")
    );
    let started = wait_event(&env.client, "rot", "RotationStarted").await;
    assert!(started[0].contains("mf-20260102"), "{started:?}");
    assert!(events(&env.client, "rot", "KeyRotated").await.is_empty());
    assert_eq!(selector_in_secret().await, "mf-20260101");
    eventually(60, "the next selector in DNS", async || {
        (!knot
            .query("mf-20260102._domainkey.rot.example.test", "TXT")
            .is_empty())
        .then_some(())
    })
    .await;
    // Verified plus one TTL (30 s): the fleet switches in one step, the old selector retires.
    let d = eventually(60, "the switch", async || {
        step(20).await;
        let d = domains.get("rot").await.ok()?;
        (d.status.as_ref()?.active_selector.as_deref() == Some("mf-20260102")).then_some(d)
    })
    .await;
    let status = d.status.unwrap();
    assert_eq!(status.next_selector, None);
    assert_eq!(status.retiring_selectors.len(), 1);
    assert_eq!(status.retiring_selectors[0].selector, "mf-20260101");
    assert_eq!(selector_in_secret().await, "mf-20260102");
    let rotated = wait_event(&env.client, "rot", "KeyRotated").await;
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    assert!(
        rotated[0].contains("now sign with selector mf-20260102; mf-20260101 stays published"),
        "{rotated:?}"
    );
    assert!(
        events(&env.client, "rot", "SelectorRetired")
            .await
            .is_empty()
    );
    // The old selector stays published for the pool's longest queue time.
    assert!(
        !knot
            .query("mf-20260101._domainkey.rot.example.test", "TXT")
            .is_empty()
    );
    step(6 * 86_400).await;
    eventually(60, "the old selector removed", async || {
        knot.query("mf-20260101._domainkey.rot.example.test", "TXT")
            .is_empty()
            .then_some(())
    })
    .await;
    let d = domains.get("rot").await.unwrap();
    assert!(d.status.unwrap().retiring_selectors.is_empty());
    let retired = wait_event(&env.client, "rot", "SelectorRetired").await;
    assert!(
        retired[0].contains("selector mf-20260101 retired"),
        "{retired:?}"
    );
    assert!(
        !knot
            .query("mf-20260102._domainkey.rot.example.test", "TXT")
            .is_empty()
    );
    let s = secrets.get("rot-dkim").await.unwrap();
    assert!(s.data.unwrap().keys().all(|k| !k.starts_with("retiring.")));
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), controller).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_dns_gets_a_dnsendpoint_and_verification_follows_the_zone() {
    let env = env().await;
    let knot = Knot::start(env.dir.path(), &[]);
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "dnsendpoints.externaldns.k8s.io"},
        "spec": {
            "group": "externaldns.k8s.io", "scope": "Namespaced",
            "names": {"kind": "DNSEndpoint", "plural": "dnsendpoints", "singular": "dnsendpoint", "listKind": "DNSEndpointList"},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}],
        },
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let op = start_operator(&env.client);
    setup(
        &env.client,
        knot.port,
        TSIG_SECRET,
        "ext",
        "ext.example.test",
        json!({"dns": {"provider": "externalDNS", "ttl": 30,
                       "verifyNameservers": [format!("127.0.0.1:{}", knot.port)]}}),
    )
    .await;
    let domains: Api<SendingDomain> = Api::namespaced(env.client.clone(), NS);
    let endpoints: Api<kube::api::DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        NS,
        &mailfleet_operator::dns::externaldns::resource(),
    );
    let ep = eventually(60, "the DNSEndpoint", async || {
        endpoints.get_opt("ext").await.unwrap()
    })
    .await;
    let list = ep.data["spec"]["endpoints"].as_array().unwrap().clone();
    assert_eq!(list.len(), 6, "{list:?}");
    assert!(list.iter().any(|e| e["dnsName"] == "ext.example.test"
        && e["targets"][0] == "v=spf1 ip4:127.0.9.1 ip4:127.0.9.2 -all"));
    let d = eventually(60, "DNSVerified=False: nothing published yet", async || {
        let d = domains.get("ext").await.ok()?;
        (condition(&d, "DNSVerified")?.1 == "NotServed").then_some(d)
    })
    .await;
    assert_eq!(condition(&d, "DNSPublished").unwrap().0, "True");
    let written = wait_event(&env.client, "ext", "RecordsPublished").await;
    assert!(
        written[0].contains("DNSEndpoint ext holds 6 record(s)"),
        "{written:?}"
    );
    let why = wait_event(&env.client, "ext", "DNSVerificationFailed").await;
    assert!(
        why[0].starts_with("NotServed: 6 of 6 record(s) not served"),
        "{why:?}"
    );

    // Play external-dns: publish the endpoint's records in the zone.
    let mut cmds = format!("server 127.0.0.1 {}\nzone example.test\n", knot.port);
    for e in &list {
        for t in e["targets"].as_array().unwrap() {
            let t = t.as_str().unwrap();
            let data = if e["recordType"] == "TXT" {
                mailfleet_operator::dns::split_txt(t)
                    .iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                format!("{t}.")
            };
            cmds.push_str(&format!(
                "update add {}. 30 {} {data}\n",
                e["dnsName"].as_str().unwrap(),
                e["recordType"].as_str().unwrap()
            ));
        }
    }
    cmds.push_str("send\n");
    let mut child = Command::new(require("nsupdate"))
        .args(["-y", &format!("hmac-sha256:update-key:{TSIG_SECRET}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(cmds.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nsupdate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    domains
        .patch(
            "ext",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
        )
        .await
        .unwrap();
    let d = eventually(60, "DNSVerified=True", async || {
        let d = domains.get("ext").await.ok()?;
        (condition(&d, "DNSVerified")?.0 == "True").then_some(d)
    })
    .await;
    assert!(
        d.status
            .unwrap()
            .records
            .iter()
            .all(|r| r.published && r.verified)
    );
    wait_event(&env.client, "ext", "DNSVerified").await;

    domains
        .delete("ext", &DeleteParams::default())
        .await
        .unwrap();
    eventually(60, "the DNSEndpoint removed", async || {
        endpoints
            .get_opt("ext")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_down_is_explained_and_retried_until_it_is_back() {
    let env = env().await;
    let port = free_low_port();
    let op = start_operator(&env.client);
    setup(
        &env.client,
        port,
        TSIG_SECRET,
        "down",
        "down.example.test",
        json!({}),
    )
    .await;
    let domains: Api<SendingDomain> = Api::namespaced(env.client.clone(), NS);
    let (_, reason, message) = eventually(60, "DNSPublished=False", async || {
        let d = domains.get("down").await.ok()?;
        condition(&d, "DNSPublished").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "DNSUnreachable");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    let d = domains.get("down").await.unwrap();
    // Keys do not wait for DNS.
    assert_eq!(condition(&d, "DKIMReady").unwrap().0, "True");
    let failed = wait_event(&env.client, "down", "PublishFailed").await;
    assert!(failed[0].starts_with("DNSUnreachable: "), "{failed:?}");
    assert_eq!(condition(&d, "Ready").unwrap().0, "False");
    // The server comes up: a retry publishes and verifies, with nobody touching the domain.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let knot = Knot::start_on(env.dir.path(), port, &[]);
    eventually(60, "DNSVerified=True once DNS is back", async || {
        let d = domains.get("down").await.ok()?;
        (condition(&d, "DNSVerified")?.0 == "True").then_some(())
    })
    .await;
    assert!(!knot.query("down.example.test", "TXT").is_empty());
    op.stop().await;
}

/// SPF include chains served by Knot: what a receiver would look up.
const SPF_CHAIN: [&str; 3] = [
    r#"_spf.a.example.test. 60 TXT "v=spf1 include:_spf.c.example.test a mx -all""#,
    r#"_spf.c.example.test. 60 TXT "v=spf1 ip4:127.0.8.0/24 exists:%{i}.x.example.test ~all""#,
    r#"_spf.b.example.test. 60 TXT "v=spf1 ptr -all""#,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_includes_are_followed_at_the_server() {
    use mailfleet_operator::dns::spf::count;
    use mailfleet_operator::dns::verify::SpfResolver;
    let dir = tempfile::tempdir().unwrap();
    let knot = Knot::start(dir.path(), &SPF_CHAIN);
    let resolver = SpfResolver::new(&[SocketAddr::from(([127, 0, 0, 1], knot.port))]).unwrap();
    let c = count(
        "d.example.test",
        "v=spf1 ip4:127.0.0.1 include:_spf.a.example.test include:_spf.b.example.test -all",
        &resolver,
    )
    .await;
    // Own: 2 includes. _spf.a: include, a, mx; _spf.c under it: exists. _spf.b: ptr.
    assert_eq!(c.lookups, 7, "{c:?}");
    assert_eq!(
        c.per_term,
        [
            ("include:_spf.a.example.test".to_string(), 5),
            ("include:_spf.b.example.test".to_string(), 2)
        ]
    );
    assert!(
        c.problems.is_empty() && c.unresolved.is_empty() && c.complete,
        "{c:?}"
    );

    // A chain that grows past 10, an include with no SPF record, a loop, and a zone the
    // server does not serve (REFUSED: unknown, not a verdict).
    knot.update(&[
        r#"add _spf.big.example.test. 60 TXT "v=spf1 a mx ptr exists:y.example.test include:_spf.a.example.test include:_spf.b.example.test -all""#,
        r#"add _spf.none.example.test. 60 TXT "not spf""#,
        r#"add _spf.loop.example.test. 60 TXT "v=spf1 include:_spf.loop2.example.test -all""#,
        r#"add _spf.loop2.example.test. 60 TXT "v=spf1 include:_spf.loop.example.test -all""#,
    ]);
    let c = count(
        "d.example.test",
        "v=spf1 include:_spf.a.example.test include:_spf.big.example.test -all",
        &resolver,
    )
    .await;
    assert!(c.lookups > 10, "{c:?}");
    assert!(
        c.problems[0].contains("more than the 10 SPF allows"),
        "{c:?}"
    );
    let c = count(
        "d.example.test",
        "v=spf1 include:_spf.none.example.test include:_spf.loop.example.test -all",
        &resolver,
    )
    .await;
    let all = c.problems.join("\n");
    assert!(
        all.contains("_spf.none.example.test (an SPF include of d.example.test) has no SPF record"),
        "{all}"
    );
    assert!(
        all.contains("loop: d.example.test → _spf.loop.example.test → _spf.loop2.example.test → _spf.loop.example.test"),
        "{all}"
    );
    let c = count(
        "d.example.test",
        "v=spf1 include:_spf.elsewhere.test -all",
        &resolver,
    )
    .await;
    assert!(c.problems.is_empty(), "{c:?}");
    assert_eq!(c.unresolved.len(), 1, "{c:?}");
    assert!(c.unresolved[0].contains("_spf.elsewhere.test"), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_lookup_count_with_includes_is_in_status() {
    let env = env().await;
    let knot = Knot::start(env.dir.path(), &SPF_CHAIN);
    let op = start_operator(&env.client);
    setup(
        &env.client,
        knot.port,
        TSIG_SECRET,
        "inc",
        "inc.example.test",
        json!({"spf": {"includes": ["_spf.a.example.test", "_spf.b.example.test"]}}),
    )
    .await;
    let domains: Api<SendingDomain> = Api::namespaced(env.client.clone(), NS);
    let d = eventually(60, "Ready=True", async || {
        let d = domains.get("inc").await.ok()?;
        (condition(&d, "Ready")?.0 == "True").then_some(d)
    })
    .await;
    assert_eq!(
        condition(&d, "SPFValid").unwrap(),
        (
            "True".to_string(),
            "WithinLimit".to_string(),
            "the SPF record of inc.example.test needs 7 of the 10 DNS lookups SPF allows \
             (include:_spf.a.example.test: 5, include:_spf.b.example.test: 2)"
                .to_string()
        )
    );

    // An included record grows: the domain's own record is unchanged, yet it now fails at
    // receivers. A poke stands for the periodic resync.
    knot.update(&[
        "delete _spf.b.example.test. TXT",
        r#"add _spf.b.example.test. 60 TXT "v=spf1 a mx ptr exists:y.example.test include:_spf.c.example.test -all""#,
    ]);
    let poke = async |n: &str| {
        domains
            .patch(
                "inc",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": n}}})),
            )
            .await
            .unwrap();
    };
    poke("1").await;
    let d = eventually(60, "SPFValid=False", async || {
        let d = domains.get("inc").await.ok()?;
        (condition(&d, "SPFValid")?.0 == "False").then_some(d)
    })
    .await;
    let (_, reason, message) = condition(&d, "SPFValid").unwrap();
    assert_eq!(reason, "TooManyLookups");
    assert!(message.contains("more than the 10 SPF allows"), "{message}");
    assert_eq!(condition(&d, "Ready").unwrap().0, "False");
    let (_, reason, _) = condition(&d, "DNSPublished").unwrap();
    assert_eq!(reason, "InvalidRecords");
    let why = wait_event(&env.client, "inc", "SPFInvalid").await;
    assert!(why[0].starts_with("TooManyLookups: "), "{why:?}");

    // An include without an SPF record fails receivers too.
    domains
        .patch(
            "inc",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"spf": {"includes": ["_spf.a.example.test", "_spf.gone.example.test"]}}})),
        )
        .await
        .unwrap();
    let d = eventually(60, "SPFValid=False, InvalidInclude", async || {
        let d = domains.get("inc").await.ok()?;
        (condition(&d, "SPFValid")?.1 == "InvalidInclude").then_some(d)
    })
    .await;
    let (_, _, message) = condition(&d, "SPFValid").unwrap();
    assert!(
        message.contains(
            "_spf.gone.example.test (an SPF include of inc.example.test) has no SPF record"
        ),
        "{message}"
    );

    // An include the server cannot answer for: the count is unknown, the domain stays Ready.
    domains
        .patch(
            "inc",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"spf": {"includes": ["_spf.a.example.test", "_spf.elsewhere.test"]}}})),
        )
        .await
        .unwrap();
    let d = eventually(60, "SPFValid=Unknown", async || {
        let d = domains.get("inc").await.ok()?;
        (condition(&d, "SPFValid")?.0 == "Unknown" && condition(&d, "Ready")?.0 == "True")
            .then_some(d)
    })
    .await;
    let (_, reason, message) = condition(&d, "SPFValid").unwrap();
    assert_eq!(reason, "LookupFailed");
    assert!(message.contains("needs at least 6 of the 10"), "{message}");
    assert!(message.contains("_spf.elsewhere.test"), "{message}");
    op.stop().await;
}
