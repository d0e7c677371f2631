//! The node agent: the kubelet's part of running pods, as a client of any API server.
//!
//! devcluster's own runner reads and writes its store; this agent does the same work through
//! the Kubernetes API, so that a real control plane (kube-apiserver, kube-controller-manager,
//! kube-scheduler) gets a Node whose pods really run, as local processes:
//!
//! - [`node`] registers the Node (Ready, with capacity) and renews its Lease in
//!   `kube-node-lease`, so the node lifecycle controller never marks it unreachable;
//! - [`pods`] watches the pods the scheduler bound to the node, gives each an address of the
//!   pod range (127.x.y.z, one per pod), materialises its volumes ([`volumes`]), runs each
//!   container whose image maps to a local program (devcluster's [`crate::process`]
//!   supervisor: probes, restarts, graceful stop), writes the pod status, and finishes the
//!   deletion of terminating pods once their processes stopped;
//! - [`storage`] provisions PersistentVolumes on local directories for the claims of its
//!   StorageClass (the default class), so StatefulSets with volumeClaimTemplates schedule.
//!
//! What it does not do: containers, images, mount namespaces, networking beyond the pod IP
//! on loopback (Services do not route: Endpoints refuse loopback addresses), exec, logs over
//! the API. See the crate README.

pub mod node;
pub mod pods;
pub mod storage;
pub mod volumes;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use tokio::sync::watch;

use crate::process::Timing;

/// Errors of the node agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// An API call failed.
    #[error("failed to {what}: {source}")]
    Api {
        /// What was attempted.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// A file or directory of a pod could not be written.
    #[error("failed to write {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The pod range is not a usable loopback range.
    #[error("pod range {0} is not inside 127.0.0.0/8 with room for pods")]
    PodRange(String),
    /// An `--image` mapping is not `REPOSITORY=PROGRAM`.
    #[error("image mapping {0:?} is not REPOSITORY=PROGRAM")]
    ImageMapping(String),
    /// The pod refers to something that does not exist (yet).
    #[error("{0}")]
    Missing(String),
}

impl AgentError {
    pub(crate) fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Api { what, source }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> AgentError {
        let path = path.into();
        move |source| AgentError::Io { path, source }
    }
}

/// Which program runs the containers of an image: the image's repository (tag and digest
/// ignored) maps to a local program that stands in for the image's entrypoint.
#[derive(Debug, Clone)]
pub struct ImageProgram {
    /// Image repository, e.g. `ghcr.io/mailfleet/mailfleet`.
    pub repository: String,
    /// The program, e.g. the `mailfleet` binary.
    pub program: PathBuf,
}

impl std::str::FromStr for ImageProgram {
    type Err = AgentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (repository, program) = s
            .split_once('=')
            .filter(|(r, p)| !r.is_empty() && !p.is_empty())
            .ok_or_else(|| AgentError::ImageMapping(s.to_string()))?;
        Ok(ImageProgram {
            repository: repository.to_string(),
            program: PathBuf::from(program),
        })
    }
}

/// The repository of an image reference: without `@digest` and without a `:tag` after the
/// last `/` (a registry's `:port` stays).
pub fn image_repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The Node's name.
    pub node: String,
    /// Where pod directories, logs and provisioned volumes live.
    pub dir: PathBuf,
    /// Images the agent can run, and with which program.
    pub images: Vec<ImageProgram>,
    /// First address of the pod range (inside 127.0.0.0/8).
    pub pod_range_start: Ipv4Addr,
    /// Number of addresses in the pod range.
    pub pod_range_size: u32,
    /// Restarts, probes, grace.
    pub timing: Timing,
    /// Name of the StorageClass whose claims the agent provisions.
    pub storage_class: String,
    /// The API server's URL, for the kubeconfigs of pods with a service-account token.
    pub server_url: String,
}

impl AgentConfig {
    /// The pod range from CIDR notation, e.g. `127.77.0.0/16`.
    pub fn parse_pod_range(cidr: &str) -> Result<(Ipv4Addr, u32), AgentError> {
        let bad = || AgentError::PodRange(cidr.to_string());
        let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let len: u32 = len.parse().map_err(|_| bad())?;
        if addr.octets()[0] != 127 || !(8..=28).contains(&len) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - len);
        Ok((Ipv4Addr::from(u32::from(addr) & mask), 1 << (32 - len)))
    }
}

/// Runs the agent until `shutdown` turns true: registers the node, then keeps its lease,
/// its volumes and its pods until then; stops every pod's processes before it returns.
pub async fn run(
    client: kube::Client,
    config: AgentConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    node::register(&client, &config).await?;
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    let storage = tokio::spawn(storage::run(
        client.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    let result = pods::run(client, config, shutdown).await;
    let _ = heartbeat.await;
    let _ = storage.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_repositories_drop_tag_and_digest_but_keep_registry_ports() {
        assert_eq!(
            image_repository("ghcr.io/mailfleet/mailfleet:0.1.0"),
            "ghcr.io/mailfleet/mailfleet"
        );
        assert_eq!(
            image_repository("localhost:5000/relay"),
            "localhost:5000/relay"
        );
        assert_eq!(
            image_repository("localhost:5000/relay:v1@sha256:ab"),
            "localhost:5000/relay"
        );
        assert_eq!(image_repository("busybox"), "busybox");
    }

    #[test]
    fn pod_ranges_stay_on_loopback() {
        let (start, size) = AgentConfig::parse_pod_range("127.77.3.9/16").unwrap();
        assert_eq!((start, size), (Ipv4Addr::new(127, 77, 0, 0), 65536));
        assert!(AgentConfig::parse_pod_range("10.0.0.0/16").is_err());
        assert!(AgentConfig::parse_pod_range("127.0.0.0/30").is_err());
        assert!("ghcr.io/x".parse::<ImageProgram>().is_err());
        let m: ImageProgram = "ghcr.io/x=/bin/x".parse().unwrap();
        assert_eq!(m.program, PathBuf::from("/bin/x"));
    }
}
