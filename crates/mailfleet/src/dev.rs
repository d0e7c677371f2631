//! `mailfleet dev`: the whole fleet on this machine, no cluster needed. Wiring only:
//!
//! 1. [`dns`] serves the zone `dev.test` on 127.0.0.1 (`inbox.dev.test MX 10 mx.dev.test`,
//!    `mx.dev.test A 127.0.0.1`), taking RFC 2136 updates signed with a TSIG key made for
//!    this run, and [`sink`] is that MX, counting mail per source address and checking its
//!    DKIM, SPF and DMARC against that zone;
//! 2. devcluster (crates/devcluster) serves the Kubernetes API and runs relay pods as
//!    processes of this very binary (`mailfleet relay --coordinator ...`), each on its own
//!    127.0.0.N pod IP;
//! 3. the CRDs, the namespaces, a DKIM key Secret, the TSIG key Secret and
//!    examples/dev/fleet.yaml (with this run's ports filled in) are applied; the SendingDomain
//!    controller publishes the domain's records into the embedded zone;
//! 4. the operator (crates/operator) runs in this process, its coordinator on a free port;
//! 5. [`traffic`] submits mail to the ready relay pods, and a progress report is printed every
//!    two seconds until Ctrl-C, SIGTERM or `--duration`.

mod dns;
mod sink;
mod traffic;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mailfleet_api::relaypool::{AddressStatus, RelayPool};
use mailfleet_api::{SendingDomain, WarmupPlan};
use tokio::sync::watch;

/// The fleet applied by `mailfleet dev`, with `${...}` placeholders for this run's ports.
const FLEET: &str = include_str!("../../../examples/dev/fleet.yaml");
/// Namespace of the dev fleet (as in examples/dev/fleet.yaml).
const NAMESPACE: &str = "mail";
/// Name of the dev RelayPool.
const POOL: &str = "dev";
/// The domain the generator sends from (the SendingDomain of examples/dev/fleet.yaml).
const SENDING_DOMAIN: &str = "mail.dev.test";
/// Its SendingDomain object.
const SENDING_DOMAIN_OBJECT: &str = "mail-dev-test";
/// The WarmupPlan of examples/dev/fleet.yaml.
const WARMUP_PLAN: &str = "standard";
/// Its DKIM key Secret (the operator reads `<SendingDomain name>-dkim` by default).
const DKIM_SECRET: &str = "mail-dev-test-dkim";
/// The embedded DNS server's zone.
const ZONE: &str = "dev.test.";
/// The TSIG key the SendingDomain's `rfc2136` provider signs its updates with.
const TSIG_KEY: &str = "mailfleet-dev";
/// The Secret holding its base64 secret (examples/dev/fleet.yaml refers to it).
const TSIG_SECRET: &str = "dev-dns-tsig";
/// The domain the generator sends to, whose MX is the sink.
const SINK_DOMAIN: &str = "inbox.dev.test";
/// The egress CIDR of the dev pool (as in examples/dev/fleet.yaml).
const EGRESS_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(127, 0, 10, 0), 29);
const FIELD_MANAGER: &str = "mailfleet-dev";

/// Arguments of `mailfleet dev`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory for the kubeconfig (`DIR/kubeconfig`), the log (`DIR/mailfleet.log`) and the
    /// relay pods' working directories and logs (`DIR/pods/`, cleared at start: every run is
    /// a new cluster).
    #[arg(long, default_value = ".dev")]
    dir: PathBuf,
    /// Messages per second the traffic generator submits to the relays.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Length of a simulated day: the warm-up plan's window (e.g. `30s`, `2m`, `24h`).
    #[arg(long, default_value = "30s")]
    day: String,
    /// Stop after this many seconds; exit non-zero if no mail reached the sink by then.
    #[arg(long)]
    duration: Option<u64>,
    /// Percent of recipients the sink MX answers `450` (deferred, retried by the relays).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    sink_defer_percent: u8,
    /// Percent of recipients the sink MX answers `550` (hard bounces).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    sink_bounce_percent: u8,
}

/// Runs the dev fleet until Ctrl-C, SIGTERM or `--duration`.
pub fn run(args: Args) -> Result<()> {
    if !(args.rate > 0.0 && args.rate <= 1000.0) {
        bail!("--rate must be above 0 and at most 1000 messages per second");
    }
    match mailfleet_api::common::parse_duration(&args.day) {
        Ok(d) if d >= Duration::from_secs(1) => {}
        Ok(_) => bail!("--day must be at least 1s"),
        Err(e) => bail!("--day {:?}: {e} (write e.g. 30s, 2m or 24h)", args.day),
    }
    if u16::from(args.sink_defer_percent) + u16::from(args.sink_bounce_percent) > 100 {
        bail!("--sink-defer-percent and --sink-bounce-percent add up to more than 100");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("failed to create {}", args.dir.display()))?;
    let dir = std::path::absolute(&args.dir)
        .with_context(|| format!("failed to resolve {}", args.dir.display()))?;
    // The API lives in memory, so every run is a new cluster: relay spools and coordinator
    // state of an earlier run's pods would belong to a pool that no longer exists.
    let pods = dir.join("pods");
    if pods.exists() {
        std::fs::remove_dir_all(&pods)
            .with_context(|| format!("failed to clear {} of an earlier run", pods.display()))?;
    }
    let log_path = dir.join("mailfleet.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("failed to open {}", log_path.display()))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
        )
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(fleet(args, dir, log_path))
}

/// `N` bytes from the kernel's random source (for the run's TSIG key).
fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    use std::io::Read;
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .context("failed to read /dev/urandom for the TSIG key")?;
    Ok(out)
}

/// Writes the run's TSIG key (`secret_b64`: base64) in the format of BIND's `nsupdate -k`,
/// readable by the owner only.
fn write_tsig_key_file(path: &Path, secret_b64: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = format!(
        "key \"{TSIG_KEY}\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{secret_b64}\";\n}};\n"
    );
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("failed to write the TSIG key file {}", path.display()))
}

/// A seed for the small xorshift generators of the sink and the traffic (never 0).
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (nanos ^ (u64::from(std::process::id()) << 32)) | 1
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("failed to find a free port")?;
    Ok(l.local_addr().context("no local address")?.port())
}

/// The first pod IP of this run: `127.0.X.2` for a block `X` (20-250, away from the egress
/// addresses in 127.0.10.0/29 and from other emulators' default 127.0.0.N) where no relay
/// `/metrics` port is taken, so that several dev fleets and tests can run side by side.
fn pod_ip_block() -> Ipv4Addr {
    let port = mailfleet_operator::children::RELAY_HTTP_PORT as u16;
    let start = seed() % 231;
    (0..231u64)
        .map(|i| 20 + ((start + i) % 231) as u8)
        .find(|x| {
            (2..10u8).all(|host| {
                std::net::TcpListener::bind((Ipv4Addr::new(127, 0, *x, host), port)).is_ok()
            })
        })
        .map(|x| Ipv4Addr::new(127, 0, x, 2))
        .unwrap_or(Ipv4Addr::new(127, 0, 20, 2))
}

fn in_egress_net(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX << (32 - u32::from(EGRESS_NET.1));
            u32::from(v4) & mask == u32::from(EGRESS_NET.0) & mask
        }
        IpAddr::V6(_) => false,
    }
}

/// Everything this run started, in the order it stops.
struct Running {
    stop_traffic: watch::Sender<bool>,
    traffic: tokio::task::JoinHandle<()>,
    stop_operator: watch::Sender<bool>,
    operator: tokio::task::JoinHandle<Result<(), mailfleet_operator::OperatorError>>,
    cluster: mailfleet_devcluster::DevCluster,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop_traffic.send(true);
        let _ = self.traffic.await;
        let _ = self.stop_operator.send(true);
        match tokio::time::timeout(Duration::from_secs(15), self.operator).await {
            Ok(Ok(Err(e))) => eprintln!("the operator stopped with an error: {e}"),
            Ok(_) => {}
            Err(_) => eprintln!("the operator did not stop within 15 s"),
        }
        // The pod runner's shutdown sends the relay processes SIGTERM and waits for them.
        self.cluster.shutdown().await;
    }
}

async fn fleet(args: Args, dir: PathBuf, log_path: PathBuf) -> Result<()> {
    let started = Instant::now();
    let tsig_secret = random_bytes::<32>()?;
    let zone = Arc::new(dns::Zone::new(ZONE)?.with_tsig_key(
        TSIG_KEY,
        hickory_proto::rr::rdata::tsig::TsigAlgorithm::HmacSha256,
        tsig_secret.to_vec(),
    )?);
    zone.add_mx(&format!("{SINK_DOMAIN}."), 10, "mx.dev.test.")?;
    zone.add_a("mx.dev.test.", Ipv4Addr::LOCALHOST)?;
    let dns = dns::DnsServer::start(Arc::clone(&zone)).await?;
    let key_file = dir.join("dns-tsig.key");
    // As servers configure it: base64, in the key file and in the operator's Secret.
    let tsig_secret_b64 =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, tsig_secret);
    write_tsig_key_file(&key_file, &tsig_secret_b64)?;
    let sink = sink::Sink::start(
        sink::Faults {
            defer_percent: args.sink_defer_percent,
            bounce_percent: args.sink_bounce_percent,
        },
        dns.addr,
    )
    .await?;

    let program = std::env::current_exe().context("failed to find this program's path")?;
    let mut config = mailfleet_devcluster::Config::new(&dir);
    config.runner = Some(mailfleet_devcluster::RunnerConfig {
        relay_program: Some(program),
        first_pod_ip: pod_ip_block(),
        ..mailfleet_devcluster::RunnerConfig::default()
    });
    let cluster = mailfleet_devcluster::DevCluster::start(config)
        .await
        .context("failed to start devcluster")?;
    let kubeconfig = cluster.kubeconfig.clone();
    let shown = shown_path(&args.dir, &kubeconfig);
    println!("mailfleet dev: the whole fleet on this machine");
    println!("  kubeconfig   {shown} (API at {})", cluster.https_url);
    println!(
        "  watch        KUBECONFIG={shown} kubectl get relaypools,sendingdomains,warmupplans -A"
    );
    println!(
        "  logs         {} and {}/pods/*.log",
        shown_path(&args.dir, &log_path),
        args.dir.display()
    );
    println!(
        "  dns          {} (UDP+TCP), zone dev.test: {SINK_DOMAIN} MX 10 mx.dev.test, mx.dev.test A 127.0.0.1",
        dns.addr
    );
    println!(
        "               RFC 2136 updates signed with TSIG key {TSIG_KEY} (hmac-sha256): \
         nsupdate -k {} (query: dig @{} -p {} TXT {SENDING_DOMAIN})",
        shown_path(&args.dir, &key_file),
        dns.addr.ip(),
        dns.addr.port()
    );
    println!(
        "  sink MX      {} (checks DKIM, SPF and DMARC of what it takes)",
        sink.addr
    );

    println!(
        "  warm-up day  {} (the plan's window; --day changes it)",
        args.day
    );

    let (client, listener_port, coordinator) =
        match setup(&kubeconfig, &dns, &sink, &args.day, &tsig_secret_b64).await {
            Ok(c) => c,
            Err(e) => {
                cluster.shutdown().await;
                return Err(e);
            }
        };

    let health = free_port()?;
    let operator_config = mailfleet_operator::OperatorConfig {
        coordinator_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, coordinator)),
        metrics_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, health)),
        health_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, health)),
        leader_election: false,
        namespace: "mailfleet-system".to_string(),
        identity: format!("mailfleet-dev-{}", std::process::id()),
        watch_namespaces: Vec::new(),
        settings: mailfleet_operator::children::Settings {
            // Only shown: devcluster runs relay pods as processes of this binary.
            relay_image: "mailfleet:dev".to_string(),
            coordinator_url: format!("https://127.0.0.1:{coordinator}"),
            otlp_endpoint: None,
        },
    };
    let (stop_operator, operator_stop) = watch::channel(false);
    let operator = tokio::spawn(mailfleet_operator::run(
        client.clone(),
        operator_config,
        operator_stop,
    ));
    println!(
        "  operator     in process: coordinator https://127.0.0.1:{coordinator}, metrics http://127.0.0.1:{health}/metrics"
    );
    println!(
        "  traffic      {} msg/s from app@{SENDING_DOMAIN} to <random>@{SINK_DOMAIN} via the relay pods' port {listener_port}",
        args.rate
    );
    match args.duration {
        Some(d) => println!("  running for {d} s (Ctrl-C stops earlier)"),
        None => println!("  Ctrl-C stops everything"),
    }
    println!();

    let (targets_tx, targets_rx) = watch::channel(Vec::new());
    let (stop_traffic, traffic_stop) = watch::channel(false);
    let stats = Arc::new(traffic::Stats::default());
    let traffic = tokio::spawn(traffic::run(
        traffic::Traffic {
            rate: args.rate,
            from: format!("app@{SENDING_DOMAIN}"),
            to_domain: SINK_DOMAIN.to_string(),
        },
        targets_rx,
        Arc::clone(&stats),
        traffic_stop,
    ));
    let running = Running {
        stop_traffic,
        traffic,
        stop_operator,
        operator,
        cluster,
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to install the SIGTERM handler")?;
    let deadline = args.duration.map(|d| started + Duration::from_secs(d));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_table = String::new();
    let mut n: u64 = 0;
    let mut interrupted = false;
    let mut last = Snapshot::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => { interrupted = true; break; }
            _ = term.recv() => { interrupted = true; break; }
        }
        if running.operator.is_finished() {
            println!(
                "the operator stopped unexpectedly; see {}",
                log_path.display()
            );
            break;
        }
        let snap = Snapshot::read(&client, listener_port).await;
        targets_tx.send_replace(snap.targets.clone());
        n += 1;
        if n.is_multiple_of(2) {
            let table = snap.address_table();
            if table != last_table {
                print!("{table}");
                last_table = table;
            }
            println!(
                "{}",
                snap.progress_line(started, &stats, &sink.counts(), sink.auth())
            );
        }
        last = snap;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    if interrupted {
        println!("\nstopping: traffic, operator, relays...");
    }
    let _ = running.stop_traffic.send(true);
    // Give the relays' last reports a moment to reach the pool's counters.
    let settle = Instant::now() + Duration::from_secs(10);
    let accepted_from_pool = || -> u64 {
        sink.counts()
            .iter()
            .filter(|(ip, _)| in_egress_net(**ip))
            .map(|(_, c)| c.accepted)
            .sum()
    };
    if !interrupted {
        while Instant::now() < settle {
            last = Snapshot::read(&client, listener_port).await;
            if last.delivered >= accepted_from_pool() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // The sink checks each message a moment after taking it: let the last checks finish.
    let checks_due = Instant::now() + Duration::from_secs(5);
    while sink.auth().checked < sink.counts().values().map(|c| c.accepted).sum::<u64>()
        && Instant::now() < checks_due
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = sink.counts();
    let from_pool: BTreeMap<IpAddr, sink::SourceCounts> = counts
        .iter()
        .filter(|(ip, _)| in_egress_net(**ip))
        .map(|(ip, c)| (*ip, *c))
        .collect();
    let sink_accepted: u64 = counts.values().map(|c| c.accepted).sum();
    let pool_accepted: u64 = from_pool.values().map(|c| c.accepted).sum();
    let auth = sink.auth();
    let sources: Vec<String> = from_pool
        .iter()
        .filter(|(_, c)| c.accepted > 0)
        .map(|(ip, _)| ip.to_string())
        .collect();
    running.stop().await;
    drop(dns);
    let (stage_min, stage_max, warm) = last.stage_range();
    println!(
        "summary: ready={}/{} sent={} failed={} delivered={} deferred={} bounced={} \
         sink_accepted={sink_accepted} sink_from_pool={pool_accepted} sink_sources={} \
         sink_checked={} sink_dkim_pass={} sink_spf_pass={} sink_dmarc_pass={} \
         dns_records={} dns_verified={} warmup_stage_min={stage_min} warmup_stage_max={stage_max} warm={warm} elapsed={}s",
        last.ready,
        last.replicas,
        stats.sent.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
        last.delivered,
        last.deferred,
        last.bounced,
        if sources.is_empty() {
            "-".to_string()
        } else {
            sources.join(",")
        },
        auth.checked,
        auth.dkim_pass,
        auth.spf_pass,
        auth.dmarc_pass,
        last.records.0,
        last.records.1,
        started.elapsed().as_secs()
    );
    if args.duration.is_some() && !interrupted && pool_accepted == 0 {
        let why = stats
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(|e| format!("; last submission error: {e}"))
            .unwrap_or_default();
        bail!(
            "no mail reached the sink from the pool's egress addresses in {} s ({} of {} relays \
             ready, {} submitted){why}; see {} and {}/pods/*.log",
            started.elapsed().as_secs(),
            last.ready,
            last.replicas,
            stats.sent.load(Ordering::Relaxed),
            log_path.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The kubeconfig path as the person typed the directory (relative stays relative).
fn shown_path(dir: &Path, file: &Path) -> String {
    match file.file_name() {
        Some(name) => dir.join(name).display().to_string(),
        None => file.display().to_string(),
    }
}

/// Installs the CRDs, the namespaces, the DKIM key and the fleet; returns the client, the
/// relays' listener port and the coordinator port.
async fn setup(
    kubeconfig: &Path,
    dns: &dns::DnsServer,
    sink: &sink::Sink,
    day: &str,
    tsig_secret_b64: &str,
) -> Result<(kube::Client, u16, u16)> {
    let kc = Kubeconfig::read_from(kubeconfig).context("failed to read the kubeconfig")?;
    let cc = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("failed to load the kubeconfig")?;
    let client = kube::Client::try_from(cc).context("failed to build the API client")?;
    let apply = PatchParams::apply(FIELD_MANAGER).force();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in mailfleet_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &apply, &Patch::Apply(&crd))
            .await
            .with_context(|| format!("failed to install the CRD {name}"))?;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["mailfleet-system", NAMESPACE] {
        let doc =
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        namespaces
            .patch(ns, &apply, &Patch::Apply(&doc))
            .await
            .with_context(|| format!("failed to create the namespace {ns}"))?;
    }

    // A DKIM key ready before the SendingDomain controller would make one (RSA key generation
    // takes a moment), as a person who brings their own key would.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
        .context("failed to generate the DKIM key")?;
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": DKIM_SECRET, "namespace": NAMESPACE},
        "stringData": {"selector": "dev", "rsa.pem": key.serialize_pem()},
    });
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    secrets
        .patch(DKIM_SECRET, &apply, &Patch::Apply(&secret))
        .await
        .context("failed to write the DKIM key Secret")?;

    // The TSIG key the SendingDomain controller signs its RFC 2136 updates with.
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": TSIG_SECRET, "namespace": NAMESPACE},
        "stringData": {"secret": tsig_secret_b64},
    });
    secrets
        .patch(TSIG_SECRET, &apply, &Patch::Apply(&secret))
        .await
        .context("failed to write the TSIG key Secret")?;

    let listener_port = free_port()?;
    let coordinator = free_port()?;
    let text = FLEET
        .replace("${LISTENER_PORT}", &listener_port.to_string())
        .replace("${SINK_PORT}", &sink.addr.port().to_string())
        .replace("${NAMESERVER}", &dns.addr.to_string())
        .replace("${DAY}", day);
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)
            .context("examples/dev/fleet.yaml is not valid YAML")?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (group, version) = value["apiVersion"]
            .as_str()
            .and_then(|v| v.split_once('/'))
            .context("a document of examples/dev/fleet.yaml has no group/version")?;
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &kind));
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NAMESPACE, &ar);
        api.patch(&name, &apply, &Patch::Apply(&value))
            .await
            .with_context(|| format!("failed to apply {kind} {NAMESPACE}/{name}"))?;
    }
    Ok((client, listener_port, coordinator))
}

/// `Ready=True DNSPublished=False ...` of a condition list.
fn conditions(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> String {
    if conditions.is_empty() {
        return "no conditions".to_string();
    }
    conditions
        .iter()
        .map(|c| format!("{}={}", c.type_, c.status))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one look at the API shows.
#[derive(Debug, Default)]
struct Snapshot {
    replicas: i32,
    ready: i32,
    addresses: Vec<AddressStatus>,
    delivered: u64,
    deferred: u64,
    bounced: u64,
    /// Messages warm-up limits held back (counted by the relays).
    held_by_warmup: u64,
    /// SMTP addresses of the ready relay pods.
    targets: Vec<SocketAddr>,
    /// The SendingDomain's and the WarmupPlan's state, one line each.
    domain: String,
    /// The SendingDomain's DNS records: (wanted, verified).
    records: (usize, usize),
    warmup: String,
    /// The plan's one-line summary (changes every tick, so it goes in the progress line).
    warmup_summary: Option<String>,
    /// Per address: (stage, stages, state, limit) from the WarmupPlan's status.
    stages: BTreeMap<String, (i32, i32, String, i64)>,
    error: Option<String>,
}

impl Snapshot {
    async fn read(client: &kube::Client, port: u16) -> Snapshot {
        let pools: Api<RelayPool> = Api::namespaced(client.clone(), NAMESPACE);
        let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
        let domains: Api<SendingDomain> = Api::namespaced(client.clone(), NAMESPACE);
        let plans: Api<WarmupPlan> = Api::namespaced(client.clone(), NAMESPACE);
        let mut snap = Snapshot::default();
        match pools.get_opt(POOL).await {
            Ok(Some(pool)) => {
                snap.replicas = pool.spec.replicas;
                if let Some(status) = pool.status {
                    snap.ready = status.ready_replicas;
                    snap.addresses = status.addresses;
                    for c in &status.counters {
                        snap.delivered += c.delivered.max(0) as u64;
                        snap.deferred += c.deferred.max(0) as u64;
                        snap.bounced += (c.hard_bounces + c.policy_blocks).max(0) as u64;
                        snap.held_by_warmup += c.deferred_by_warmup.max(0) as u64;
                    }
                }
            }
            Ok(None) => snap.error = Some(format!("RelayPool {NAMESPACE}/{POOL} is gone")),
            Err(e) => snap.error = Some(format!("cannot read the pool: {e}")),
        }
        let selector = format!("{}={POOL}", mailfleet_operator::children::POOL_LABEL);
        if let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await {
            let mut targets: Vec<SocketAddr> = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| {
                    let status = p.status.as_ref()?;
                    let ready = status
                        .conditions
                        .as_ref()?
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
                    ready.then_some(SocketAddr::new(ip, port))
                })
                .collect();
            targets.sort();
            snap.targets = targets;
        }
        snap.domain = match domains.get_opt(SENDING_DOMAIN_OBJECT).await {
            Ok(Some(d)) => match d.status {
                Some(st) if st.observed_generation.is_some() => {
                    snap.records = (
                        st.records.len(),
                        st.records.iter().filter(|r| r.verified).count(),
                    );
                    format!(
                        "  domain {SENDING_DOMAIN}: {} | DNS records {} (published {}, verified {}) | DKIM selector {}\n",
                        conditions(&st.conditions),
                        st.records.len(),
                        st.records.iter().filter(|r| r.published).count(),
                        st.records.iter().filter(|r| r.verified).count(),
                        st.active_selector.as_deref().unwrap_or("-"),
                    )
                }
                _ => format!(
                    "  domain {SENDING_DOMAIN}: no status yet (the SendingDomain controller has \
                     not reconciled it; the relays sign with the key in Secret {DKIM_SECRET})\n"
                ),
            },
            _ => String::new(),
        };
        snap.warmup = match plans.get_opt(WARMUP_PLAN).await {
            Ok(Some(p)) => match p.status {
                Some(st) if st.observed_generation.is_some() => {
                    for a in &st.addresses {
                        let state = serde_json::to_value(a.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default();
                        snap.stages
                            .insert(a.address.clone(), (a.stage, st.stage_count, state, a.limit));
                    }
                    snap.warmup_summary = st.summary.clone();
                    warmup_line(&st)
                }
                _ => format!(
                    "  warm-up plan {WARMUP_PLAN}: {} stages, no status yet\n",
                    p.spec.stages.len()
                ),
            },
            _ => String::new(),
        };
        snap
    }

    /// Lowest and highest warm-up stage of the pool's addresses (`-` before the first
    /// evaluation), and how many are warm.
    fn stage_range(&self) -> (String, String, usize) {
        let stages: Vec<i32> = self.stages.values().map(|s| s.0).collect();
        let warm = self.stages.values().filter(|s| s.2 == "warm").count();
        match (stages.iter().min(), stages.iter().max()) {
            (Some(lo), Some(hi)) => (lo.to_string(), hi.to_string(), warm),
            _ => ("-".to_string(), "-".to_string(), warm),
        }
    }
}

fn warmup_line(st: &mailfleet_api::warmupplan::WarmupPlanStatus) -> String {
    format!(
        "  warm-up plan {WARMUP_PLAN}: {} addresses, {} warming, {} warm, {} held\n",
        st.address_count, st.warming, st.warm, st.held,
    )
}

impl Snapshot {
    /// The address table, the domain and the warm-up plan (printed when they change).
    fn address_table(&self) -> String {
        let mut out = format!("{}{}", self.domain, self.warmup);
        if self.addresses.is_empty() {
            return out;
        }
        out.push_str("  addresses (address → pod, state, warm-up stage and limit per day):\n");
        for a in &self.addresses {
            let state = serde_json::to_value(a.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let warmup = match self.stages.get(&a.address) {
                Some((_, _, s, _)) if s == "warm" => "warm, no limit".to_string(),
                Some((stage, of, _, limit)) => format!("stage {stage}/{of}, {limit}/day"),
                None => String::new(),
            };
            out.push_str(&format!(
                "    {:<15} → {:<8} {state:<11} {warmup}\n",
                a.address,
                a.pod.as_deref().unwrap_or("-")
            ));
        }
        out
    }

    fn progress_line(
        &self,
        started: Instant,
        stats: &traffic::Stats,
        sink: &BTreeMap<IpAddr, sink::SourceCounts>,
        auth: sink::AuthCounts,
    ) -> String {
        let by_source: Vec<String> = sink
            .iter()
            .map(|(ip, c)| {
                let mut refused = Vec::new();
                if c.deferred > 0 {
                    refused.push(format!("{}×450", c.deferred));
                }
                if c.rejected > 0 {
                    refused.push(format!("{}×550", c.rejected));
                }
                if refused.is_empty() {
                    format!("{ip}={}", c.accepted)
                } else {
                    format!("{ip}={} ({})", c.accepted, refused.join(" "))
                }
            })
            .collect();
        let sources: BTreeSet<&IpAddr> = sink.keys().collect();
        let mut line = format!(
            "[{:>4}s] relays ready {}/{} | generator sent {} failed {} | pool delivered {} \
             deferred {} bounced {} held by warm-up {} | sink {} from {} source(s): {}",
            started.elapsed().as_secs(),
            self.ready,
            self.replicas,
            stats.sent.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
            self.delivered,
            self.deferred,
            self.bounced,
            self.held_by_warmup,
            sink.values().map(|c| c.accepted).sum::<u64>(),
            sources.len(),
            if by_source.is_empty() {
                "-".to_string()
            } else {
                by_source.join(" ")
            },
        );
        if auth.checked > 0 {
            line.push_str(&format!(
                " | checked {}: DKIM pass {}, SPF pass {}, DMARC pass {}",
                auth.checked, auth.dkim_pass, auth.spf_pass, auth.dmarc_pass
            ));
        }
        if let Some(w) = &self.warmup_summary {
            line.push_str(&format!(" | warm-up {w}"));
        }
        if let Some(e) = &self.error {
            line.push_str(&format!(" | {e}"));
        }
        line
    }
}
