//! `mailfleet operator`: wiring of the operator (crates/operator). Connects to the API server
//! (in-cluster service account, or `KUBECONFIG`), takes the leader Lease when asked, and runs the
//! controllers and the coordinator until SIGTERM or Ctrl-C.

use std::net::SocketAddr;

use anyhow::{Context, Result};

/// Arguments of `mailfleet operator`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the coordinator (gRPC with mutual TLS) listens.
    #[arg(long, default_value = "0.0.0.0:7443")]
    coordinator_addr: SocketAddr,
    /// URL the relays dial for the coordinator. Default: the chart's coordinator Service,
    /// `https://mailfleet-coordinator.<namespace>.svc:<port of --coordinator-addr>`.
    #[arg(long)]
    coordinator_url: Option<String>,
    /// Where `/metrics` is served.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// Where `/healthz` and `/readyz` are served (may equal --metrics-addr).
    #[arg(long, default_value = "0.0.0.0:8080")]
    health_addr: SocketAddr,
    /// Take the leader Lease before acting, so that several replicas are safe.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Image of relay pods when a RelayPool names none.
    #[arg(long, default_value = "ghcr.io/mailfleet/mailfleet:latest")]
    relay_image: String,
    /// Namespace to watch (repeatable); none watches every namespace.
    #[arg(long = "watch-namespace")]
    watch_namespaces: Vec<String>,
    /// The operator's own namespace: the coordinator CA Secret and the leader Lease live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "mailfleet-system")]
    namespace: String,
    /// This replica's identity in the leader Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

/// Runs the operator until SIGTERM/SIGINT, or until it loses the leader Lease (an error, so
/// that the process restarts as a follower).
pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(async move {
        let _telemetry = crate::telemetry::init("mailfleet-operator")?;
        let client = kube::Client::try_default()
            .await
            .context("cannot reach the Kubernetes API (in-cluster or KUBECONFIG)")?;
        let identity = args
            .identity
            .unwrap_or_else(|| format!("mailfleet-operator-{}", std::process::id()));
        let coordinator_url = args.coordinator_url.unwrap_or_else(|| {
            format!(
                "https://mailfleet-coordinator.{}.svc:{}",
                args.namespace,
                args.coordinator_addr.port()
            )
        });
        let config = mailfleet_operator::OperatorConfig {
            coordinator_addr: args.coordinator_addr,
            metrics_addr: args.metrics_addr,
            health_addr: args.health_addr,
            leader_election: args.leader_election,
            namespace: args.namespace,
            identity,
            watch_namespaces: args.watch_namespaces,
            settings: mailfleet_operator::children::Settings {
                relay_image: args.relay_image,
                coordinator_url,
                // Relays export their traces where the operator does.
                otlp_endpoint: std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .ok()
                    .filter(|v| !v.trim().is_empty()),
            },
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("failed to install the SIGTERM handler")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = tx.send(true);
        });
        mailfleet_operator::run(client, config, rx)
            .await
            .context("the operator stopped")
    })
}
