//! A Kubernetes API server emulator and pod runner, for end-to-end tests and `mailfleet dev`.
//!
//! [`DevCluster::start`] serves the Kubernetes API on loopback over HTTPS (and optionally
//! plain HTTP) and writes a kubeconfig that real `kubectl`, `helm` and kube-rs accept. Objects
//! live in memory ([`store`]); the [`runner`] plays the kubelet and the StatefulSet controller,
//! running relay pods as local processes. See the crate README for what is and is not
//! emulated.

pub mod agent;
pub mod discovery;
pub mod openapi;
pub mod patch;
pub mod process;
pub mod protobuf;
pub mod resources;
pub mod runner;
pub mod selectors;
pub mod server;
pub mod ssa;
pub mod status;
pub mod store;
pub mod table;
pub mod tls;
pub mod validation;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use runner::RunnerConfig;
pub use store::Store;

/// Errors of starting the emulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not bind.
    #[error("failed to listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS identity could not be made.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The kubeconfig could not be written.
    #[error("failed to write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// How to run the emulator.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory for the kubeconfig (`DIR/kubeconfig`), the CA and pod logs.
    pub dir: PathBuf,
    /// Address to listen on (loopback).
    pub bind: IpAddr,
    /// HTTPS port; 0 picks a free one.
    pub https_port: u16,
    /// Also serve plain HTTP on this port (0 picks a free one).
    pub http_port: Option<u16>,
    /// How many change events are kept for watches; older resourceVersions get 410 Gone.
    pub history: usize,
    /// Interval of BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
    /// The pod runner; None leaves pods and StatefulSets alone.
    pub runner: Option<RunnerConfig>,
}

impl Config {
    /// Defaults: loopback, any free port, no plain HTTP, 10,000 events of history, no runner.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Config {
            dir: dir.into(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            https_port: 0,
            http_port: None,
            history: 10_000,
            bookmark_interval: Duration::from_secs(30),
            runner: None,
        }
    }
}

/// A running emulator. Dropping it does not stop it; call [`DevCluster::shutdown`].
#[derive(Debug)]
pub struct DevCluster {
    /// The kubeconfig written for clients.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub https_url: String,
    /// `http://127.0.0.1:PORT` when plain HTTP is served.
    pub http_url: Option<String>,
    /// PEM of the CA that signed the serving certificate.
    pub ca_pem: String,
    store: Arc<Store>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The kubeconfig text for a server URL and CA.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: devcluster\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: devcluster\n  user:\n    token: devcluster\n\
         contexts:\n- name: devcluster\n  context:\n    cluster: devcluster\n    user: devcluster\n    \
         namespace: default\ncurrent-context: devcluster\npreferences: {{}}\n"
    )
}

impl DevCluster {
    /// Start serving; returns once the listeners are bound and the kubeconfig is written.
    pub async fn start(config: Config) -> Result<DevCluster, Error> {
        std::fs::create_dir_all(&config.dir).map_err(|source| Error::Write {
            path: config.dir.clone(),
            source,
        })?;
        let identity = tls::generate(Some(config.bind))?;
        let https = bind(SocketAddr::new(config.bind, config.https_port)).await?;
        let https_addr = https.local_addr().map_err(|source| Error::Bind {
            addr: SocketAddr::new(config.bind, config.https_port),
            source,
        })?;
        let https_url = format!("https://{https_addr}");
        let store = Store::new(config.history);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = Arc::new(server::ServerState {
            store: store.clone(),
            server_address: https_addr.to_string(),
            bookmark_interval: config.bookmark_interval,
            shutdown: shutdown_rx.clone(),
            pod_logs: config.dir.join("pods"),
        });
        let mut tasks = vec![tokio::spawn(server::serve_tls(
            https,
            identity.server_config.clone(),
            state.clone(),
        ))];
        let mut http_url = None;
        if let Some(port) = config.http_port {
            let plain = bind(SocketAddr::new(config.bind, port)).await?;
            let addr = plain.local_addr().map_err(|source| Error::Bind {
                addr: SocketAddr::new(config.bind, port),
                source,
            })?;
            http_url = Some(format!("http://{addr}"));
            tasks.push(tokio::spawn(server::serve_plain(plain, state.clone())));
        }
        if let Some(runner) = config.runner.clone() {
            tasks.push(tokio::spawn(runner::run(
                store.clone(),
                runner,
                config.dir.join("pods"),
                shutdown_rx.clone(),
            )));
        }
        let kubeconfig = config.dir.join("kubeconfig");
        write(&kubeconfig, &kubeconfig_yaml(&https_url, &identity.ca_pem))?;
        write(&config.dir.join("ca.crt"), &identity.ca_pem)?;
        Ok(DevCluster {
            kubeconfig,
            https_url,
            http_url,
            ca_pem: identity.ca_pem,
            store,
            shutdown,
            tasks,
        })
    }

    /// The object store (for tests: inspect state, or [`Store::compact`] history).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Stop serving, end watches and stop every pod process.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
