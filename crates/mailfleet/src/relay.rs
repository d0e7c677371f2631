//! `mailfleet relay`: wiring of the relay MTA (crates/relay). Standalone from a config file
//! (`--config`), or coordinated by the operator (`--coordinator`): identity from the
//! environment, configuration streamed over mTLS gRPC. Logs to stderr, exports traces over
//! OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and drains gracefully on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mailfleet_relay::coordinator::{Coordinated, CoordinatorOptions, Identity};

/// Arguments of `mailfleet relay`: exactly one of `--config` and `--coordinator`.
#[derive(clap::Args, Debug)]
#[command(group(
    clap::ArgGroup::new("mode")
        .required(true)
        .args(["config", "coordinator"])
))]
pub struct Args {
    /// Standalone mode: the relay configuration (YAML; see crates/relay/README.md).
    #[arg(
        long,
        env = "MAILFLEET_RELAY_CONFIG",
        conflicts_with_all = ["listen", "http_listen", "spool_dir", "hostname"]
    )]
    config: Option<PathBuf>,
    /// Coordinated mode: the operator's coordinator, `https://HOST:PORT`. The identity comes
    /// from MAILFLEET_COORDINATOR_CA, MAILFLEET_RELAY_CERT, MAILFLEET_RELAY_KEY, POD_NAME,
    /// POD_NAMESPACE and POD_UID; STARTTLS of the listener optionally from
    /// MAILFLEET_LISTENER_TLS_CERT and MAILFLEET_LISTENER_TLS_KEY (PEM).
    #[arg(long)]
    coordinator: Option<String>,
    /// Coordinated mode: SMTP listen address, e.g. 0.0.0.0:2525.
    #[arg(long, requires = "coordinator")]
    listen: Option<SocketAddr>,
    /// Coordinated mode: address of /metrics, /healthz and /readyz.
    #[arg(long, requires = "coordinator")]
    http_listen: Option<SocketAddr>,
    /// Coordinated mode: the spool directory (relative to the working directory); the
    /// coordinator state lives in its `coordinator/` subdirectory.
    #[arg(long, requires = "coordinator")]
    spool_dir: Option<PathBuf>,
    /// Coordinated mode: name in the greeting, Received headers and DSNs (default: the pod
    /// name).
    #[arg(long, requires = "coordinator")]
    hostname: Option<String>,
    /// Coordinated mode: milliseconds between delivery reports.
    #[arg(long, default_value_t = 2000, requires = "coordinator")]
    report_interval_ms: u64,
    /// How long a drain may take before the relay exits anyway (seconds).
    #[arg(long, default_value_t = 30)]
    drain_seconds: u64,
}

/// Runs the relay until SIGTERM/SIGINT.
pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    let grace = Duration::from_secs(args.drain_seconds);
    runtime.block_on(async move {
        // Logs on stderr; traces over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set. The guard
        // lives until the relay has drained, then flushes the last spans.
        let telemetry = crate::telemetry::init("mailfleet-relay")?;
        let mode = match (&args.config, &args.coordinator) {
            (Some(path), None) => {
                Mode::Standalone(Box::new(mailfleet_relay::RelayConfig::from_file(path)?))
            }
            (None, Some(url)) => Mode::Coordinated(Box::new(coordinated(&args, url)?)),
            _ => bail!("give exactly one of --config (standalone) and --coordinator (coordinated)"),
        };
        match mode {
            Mode::Standalone(config) => {
                let relay = mailfleet_relay::Relay::start(*config)
                    .await
                    .context("failed to start the relay")?;
                eprintln!("relay listening on {}", relay.smtp_addr);
                wait_for_signal().await?;
                eprintln!("draining");
                relay.shutdown(grace).await;
            }
            Mode::Coordinated(setup) => {
                let Setup { base, tls, opts } = *setup;
                let coordinator = opts.endpoint.clone();
                let relay = Coordinated::start(base, tls, opts)
                    .await
                    .context("failed to start the relay in coordinated mode")?;
                eprintln!(
                    "relay listening on {} (coordinated by {coordinator})",
                    relay.relay().smtp_addr
                );
                wait_for_signal().await?;
                eprintln!("draining");
                relay.shutdown(grace).await;
            }
        }
        drop(telemetry);
        Ok(())
    })
}

enum Mode {
    Standalone(Box<mailfleet_relay::RelayConfig>),
    Coordinated(Box<Setup>),
}

struct Setup {
    base: mailfleet_relay::RelayConfig,
    tls: Option<mailfleet_relay::smtp::TlsAcceptor>,
    opts: CoordinatorOptions,
}

fn coordinated(args: &Args, url: &str) -> Result<Setup> {
    let Some(listen) = args.listen else {
        bail!("--coordinator needs --listen IP:PORT (the SMTP listener)");
    };
    let Some(spool) = &args.spool_dir else {
        bail!("--coordinator needs --spool-dir DIR (the spool volume)");
    };
    let spool = std::path::absolute(spool)
        .with_context(|| format!("failed to resolve the spool directory {}", spool.display()))?;
    let identity = Identity::from_env().context("coordinated mode needs the relay's identity")?;
    let hostname = args
        .hostname
        .clone()
        .unwrap_or_else(|| identity.pod_name.clone());
    let tls = mailfleet_relay::coordinator::listener_tls_from_env()?;
    let base = mailfleet_relay::RelayConfig::coordinated_base(
        hostname,
        listen,
        spool.clone(),
        args.http_listen,
    );
    let mut opts = CoordinatorOptions::new(url, identity, &spool);
    opts.report_interval = Duration::from_millis(args.report_interval_ms.max(1));
    Ok(Setup { base, tls, opts })
}

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to install the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
