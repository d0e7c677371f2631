//! `mailfleet node-agent`: wiring of devcluster's node agent (crates/devcluster/src/agent)
//! for a real control plane: registers a Node and runs the pods bound to it as local
//! processes until SIGTERM or Ctrl-C. hack/kube-up starts it for the cluster tests.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use mailfleet_devcluster::agent::{self, AgentConfig, ImageProgram};
use mailfleet_devcluster::process::Timing;

/// Arguments of `mailfleet node-agent`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Kubeconfig of the API server (needs rights to nodes, leases, pods, persistent volumes
    /// and service-account tokens, e.g. the cluster admin's).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Name of the Node.
    #[arg(long, default_value = "mailfleet-node")]
    node: String,
    /// Directory for pod directories, logs and local volumes.
    #[arg(long, default_value = ".kube/node")]
    dir: PathBuf,
    /// `REPOSITORY=PROGRAM`: containers of images from REPOSITORY run PROGRAM in place of
    /// the image's entrypoint (repeatable). Containers of other images are refused with
    /// `ErrImageNeverPull`.
    #[arg(long = "image")]
    images: Vec<ImageProgram>,
    /// Loopback range the pods' IP addresses come from.
    #[arg(long, default_value = "127.77.0.0/16")]
    pod_cidr: String,
    /// Name of the StorageClass (made the default) whose claims get local volumes.
    #[arg(long, default_value = "mailfleet-local")]
    storage_class: String,
}

/// Runs the agent until SIGTERM or Ctrl-C, then stops every pod's processes.
pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(async move {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .init();
        let (pod_range_start, pod_range_size) = AgentConfig::parse_pod_range(&args.pod_cidr)?;
        let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
            .with_context(|| format!("failed to read {}", args.kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .context("failed to load the kubeconfig")?;
        let server_url = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).context("failed to build the API client")?;
        std::fs::create_dir_all(&args.dir)
            .with_context(|| format!("failed to create {}", args.dir.display()))?;
        let dir = args.dir.canonicalize().context("failed to resolve --dir")?;
        let config = AgentConfig {
            node: args.node,
            dir,
            images: args.images,
            pod_range_start,
            pod_range_size,
            timing: Timing {
                restart_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(30),
                interval: Duration::from_millis(500),
                max_grace: Duration::from_secs(30),
            },
            storage_class: args.storage_class,
            server_url,
        };
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let agent = tokio::spawn(agent::run(client, config, shutdown));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("failed to watch SIGTERM")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop.send(true);
        agent.await.context("the node agent panicked")??;
        Ok(())
    })
}
