//! `mailfleet devcluster`: wiring of the Kubernetes API server emulator (crates/devcluster)
//! for people and scripts. Prints the kubeconfig path, then serves until Ctrl-C.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Arguments of `mailfleet devcluster`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory for the kubeconfig (`DIR/kubeconfig`), the CA and pod logs.
    #[arg(long, default_value = ".devcluster")]
    dir: PathBuf,
    /// HTTPS port on 127.0.0.1 (0 picks a free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Also serve plain HTTP on this port.
    #[arg(long)]
    http_port: Option<u16>,
    /// Run pods: relay pods start this program (e.g. the mailfleet binary) as a local process.
    #[arg(long)]
    relay_program: Option<PathBuf>,
    /// Run pods without starting relay processes (all pods are marked Running).
    #[arg(long)]
    run_pods: bool,
}

/// Run the emulator until Ctrl-C.
pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(async move {
        let mut config = mailfleet_devcluster::Config::new(&args.dir);
        config.https_port = args.port;
        config.http_port = args.http_port;
        if args.relay_program.is_some() || args.run_pods {
            let mut runner = mailfleet_devcluster::RunnerConfig::default();
            if let Some(program) = args.relay_program {
                runner.relay_program = Some(program);
            }
            config.runner = Some(runner);
        }
        let cluster = mailfleet_devcluster::DevCluster::start(config)
            .await
            .context("failed to start devcluster")?;
        println!("{}", cluster.kubeconfig.display());
        eprintln!(
            "devcluster serving at {}{}; export KUBECONFIG={} ; Ctrl-C stops it",
            cluster.https_url,
            cluster
                .http_url
                .as_deref()
                .map(|u| format!(" and {u}"))
                .unwrap_or_default(),
            cluster.kubeconfig.display()
        );
        tokio::signal::ctrl_c()
            .await
            .context("failed to wait for Ctrl-C")?;
        cluster.shutdown().await;
        Ok(())
    })
}
