//! The relay MTA (data plane): SMTP in, durable spool, DKIM signing, shaped delivery.
//!
//! Pipeline: [`smtp`] accepts a message → [`dkim`] signs it → [`spool`] makes it durable
//! (group commit) → `250` → [`delivery`] routes it by MX and sends it from an egress address
//! granted by [`shaping`] over a [`client`] connection → outcomes counted in [`metrics`],
//! bounces reported by [`dsn`]. [`config`] is the one input, from a file or (later) the
//! operator. [`Relay::start`] wires it all and returns a handle for tests and the CLI.

pub mod client;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod dsn;
pub mod metrics;
pub mod shaping;
pub mod smtp;
pub mod spool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

pub use config::RelayConfig;
pub use shaping::ProviderGroup;

/// Errors of starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error(transparent)]
    Dkim(#[from] dkim::DkimError),
    #[error(transparent)]
    Smtp(#[from] smtp::SmtpError),
    #[error(transparent)]
    Delivery(#[from] delivery::DeliveryError),
    #[error("failed to listen for http on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    /// Where SMTP listens (the real port when the config asked for port 0).
    pub smtp_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub metrics: Arc<metrics::Metrics>,
    pub delivery: Arc<delivery::Delivery>,
    shutdown: watch::Sender<bool>,
    listener_task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Opens the spool (resuming what it holds), starts listening and delivering.
    pub async fn start(config: RelayConfig) -> Result<Relay, RelayError> {
        config.validate()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let metrics = Arc::new(metrics::Metrics::default());
        let spool: Arc<dyn spool::Spool> =
            spool::JournalSpool::open(&config.spool.dir, config.spool.segment_size)?;
        let signer = Arc::new(dkim::Signer::new(&config.sending_domains)?);
        let shaper = shaping::Shaper::new(&config.egress, &config.shaping, shaping::unix_now());
        let delivery = delivery::Delivery::new(
            config.delivery.clone(),
            config.shaping.clone(),
            config.hostname.clone(),
            shaper,
            Arc::clone(&spool),
            Arc::clone(&metrics),
            shutdown_rx.clone(),
        )?;
        let tls = match &config.listener.tls {
            Some(t) => Some(smtp::tls_acceptor(&t.cert, &t.key)?),
            None => None,
        };
        let listener = smtp::bind(config.listener.listen).await?;
        let smtp_addr = listener
            .local_addr()
            .map_err(|source| smtp::SmtpError::Listen {
                addr: config.listener.listen,
                source,
            })?;
        let http_addr = match config.http_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| RelayError::Http { addr, source })?;
                let local = l
                    .local_addr()
                    .map_err(|source| RelayError::Http { addr, source })?;
                tokio::spawn(metrics::serve_http(
                    l,
                    Arc::clone(&metrics),
                    shutdown_rx.clone(),
                ));
                Some(local)
            }
            None => None,
        };
        // Resume the spool before taking new mail, so old mail is not starved.
        let recovered = spool.take_recovered();
        if !recovered.is_empty() {
            tracing::info!(messages = recovered.len(), "resuming spooled messages");
        }
        for r in recovered {
            delivery.submit(Arc::new(r.message), r.pending);
        }
        let inbound = Arc::new(smtp::Inbound {
            hostname: config.hostname.clone(),
            domains: config
                .sending_domains
                .iter()
                .map(|d| d.domain.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            config: config.listener.clone(),
            signer,
            spool,
            delivery: Arc::clone(&delivery),
            metrics: Arc::clone(&metrics),
            tls,
        });
        let listener_task = tokio::spawn(smtp::serve(listener, inbound, shutdown_rx));
        metrics.ready.store(true, Ordering::Relaxed);
        tracing::info!(%smtp_addr, ?http_addr, "relay started");
        Ok(Relay {
            smtp_addr,
            http_addr,
            metrics,
            delivery,
            shutdown,
            listener_task,
        })
    }

    /// Sets the quotas of an egress address (what the warm-up engine will push over gRPC).
    pub fn set_quota(
        &self,
        address: std::net::IpAddr,
        daily: Option<u64>,
        hourly: Option<u64>,
    ) -> bool {
        self.delivery.shaper.set_quota(address, daily, hourly)
    }

    /// Graceful drain: stop accepting, let sessions finish their message and workers finish
    /// their transaction, then return. Whatever is not delivered stays on the spool.
    pub async fn shutdown(self, grace: Duration) {
        self.metrics.ready.store(false, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let _ = self.listener_task.await;
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline
            && (self.metrics.sessions.get() > 0 || self.delivery.active_workers() > 0)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(
            queued = self.delivery.queued_messages(),
            "relay stopped; undelivered mail stays on the spool"
        );
    }
}
