//! `mailfleet relay`: wiring of the relay MTA (crates/relay) run from a config file. Starts
//! the relay, logs to stderr, and drains gracefully on SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

/// Arguments of `mailfleet relay`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The relay configuration (YAML; see crates/relay/README.md).
    #[arg(long, env = "MAILFLEET_RELAY_CONFIG")]
    config: PathBuf,
    /// How long a drain may take before the relay exits anyway (seconds).
    #[arg(long, default_value_t = 30)]
    drain_seconds: u64,
}

/// Runs the relay until SIGTERM/SIGINT.
pub fn run(args: Args) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let config = mailfleet_relay::RelayConfig::from_file(&args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(async move {
        let relay = mailfleet_relay::Relay::start(config)
            .await
            .context("failed to start the relay")?;
        eprintln!("relay listening on {}", relay.smtp_addr);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("failed to install the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("draining");
        relay
            .shutdown(Duration::from_secs(args.drain_seconds))
            .await;
        Ok(())
    })
}
