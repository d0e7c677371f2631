//! `mailfleet`: the one binary of the project. Each subcommand is thin wiring around a library
//! crate: `crdgen` (crates/api), `operator`, `relay`, `devcluster`, `node-agent` (crates/devcluster)
//! and `dev` (all of them on this machine).

mod dev;
mod devcluster;
mod node_agent;
mod operator;
mod relay;
mod telemetry;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "mailfleet",
    version,
    about = "Outbound SMTP relay fleet operator for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the CustomResourceDefinitions of RelayPool, SendingDomain and WarmupPlan.
    Crdgen {
        /// Directory to write `<name>.yaml` files into (repeatable). By default the
        /// repository's crds/ and the Helm chart's crds/, run from the repository root.
        #[arg(long, default_values = ["crds", "charts/mailfleet/crds"])]
        out: Vec<PathBuf>,
        /// Do not write: exit non-zero if the files in --out differ from the code.
        #[arg(long)]
        check: bool,
    },
    /// Serve a Kubernetes API emulator on loopback; prints the kubeconfig path.
    Devcluster(devcluster::Args),
    /// Run the operator: RelayPool controller and the coordinator the relays connect to.
    Operator(operator::Args),
    /// Run the relay MTA from a config file (SMTP in, spool, DKIM, shaped delivery).
    Relay(relay::Args),
    /// Run the whole fleet on this machine (devcluster, operator, relays, DNS, sink, traffic).
    Dev(dev::Args),
    /// Run a Node of a real API server whose pods are local processes (for cluster tests).
    NodeAgent(node_agent::Args),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Crdgen { out, check } => out.iter().try_for_each(|dir| crdgen(dir, check)),
        Command::Devcluster(args) => devcluster::run(args),
        Command::Operator(args) => operator::run(args),
        Command::Relay(args) => relay::run(args),
        Command::Dev(args) => dev::run(args),
        Command::NodeAgent(args) => node_agent::run(args),
    }
}

fn crdgen(out: &Path, check: bool) -> Result<()> {
    let manifests = mailfleet_api::crd_manifests()?;
    if check {
        let mut stale = Vec::new();
        for (file, text) in &manifests {
            let path = out.join(file);
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current != *text {
                stale.push(path.display().to_string());
            }
        }
        if !stale.is_empty() {
            bail!(
                "CRD manifests differ from the code: {}; run `mailfleet crdgen --out {}`",
                stale.join(", "),
                out.display()
            );
        }
        println!(
            "{} CRD manifests in {} match the code",
            manifests.len(),
            out.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(out).with_context(|| format!("failed to create {}", out.display()))?;
    for (file, text) in &manifests {
        let path = out.join(file);
        std::fs::write(&path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
