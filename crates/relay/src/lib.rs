//! The relay MTA (data plane): SMTP in, durable spool, DKIM signing, shaped delivery.
//!
//! Pipeline: [`smtp`] accepts a message → [`dkim`] signs it → [`spool`] makes it durable
//! (group commit) → `250` → [`delivery`] routes it by MX and sends it from an egress address
//! granted by [`shaping`] over a [`client`] connection → outcomes counted in [`metrics`],
//! bounces reported by [`dsn`], hard-bounced recipients suppressed ([`suppression`]).
//! Complaints arrive as ARF reports at [`feedback`] (served by [`http`] next to `/metrics`).
//! [`config`] is the one input, from a file or from the operator's coordinator
//! ([`coordinator`]). [`Relay::start`] wires it all and returns a handle for tests and the
//! CLI; [`Control::reconfigure`] changes it at run time.

pub mod client;
pub mod config;
pub mod coordinator;
pub mod delivery;
pub mod dkim;
pub mod dsn;
pub mod feedback;
pub mod http;
pub mod metrics;
pub mod shaping;
pub mod smtp;
pub mod spool;
pub mod suppression;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    control: Arc<Control>,
    shutdown: watch::Sender<bool>,
    listener_task: tokio::task::JoinHandle<()>,
}

/// The run-time knobs of a running relay: what a reconfiguration replaces. Cheap to share
/// (the coordinator client holds one).
pub struct Control {
    inbound: Arc<smtp::Inbound>,
    delivery: Arc<delivery::Delivery>,
    metrics: Arc<metrics::Metrics>,
    feedback: Arc<feedback::FeedbackService>,
    /// The static settings of the process (listen addresses, spool, hostname, ...), which a
    /// reconfiguration does not change.
    base: RelayConfig,
    configured: AtomicBool,
    stopping: AtomicBool,
    /// Serializes reconfigurations.
    apply: Mutex<()>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("configured", &self.configured)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Applies the run-time parts of `config` without a restart: sending domains (DKIM keys,
    /// suppressed recipients, dedicated addresses), egress addresses (HELO names, paused and
    /// warm state, quotas and their overflow, connection and rate limits), the overflow
    /// policy, provider limits, delivery settings (retries, lifetime, DSN, port, name servers),
    /// listener limits (allowed networks, users, sizes, sessions) and the feedback token. The
    /// listen addresses, TLS files, spool and hostname stay as the relay started with. On
    /// error nothing changes.
    pub fn reconfigure(&self, config: &RelayConfig) -> Result<(), RelayError> {
        config.validate_pushed()?;
        let _serial = self.apply.lock().unwrap_or_else(|e| e.into_inner());
        let signer = Arc::new(dkim::Signer::new(&config.sending_domains)?);
        let mut listener = config.listener.clone();
        listener.listen = self.base.listener.listen;
        listener.tls = self.base.listener.tls.clone();
        if !listener.users.is_empty() && self.inbound.tls.is_none() {
            tracing::warn!(
                "listener users are configured but the listener has no TLS: AUTH is not offered"
            );
        }
        let mut delivery = config.delivery.clone();
        // Static routes are a process setting (benchmarks, smarthost), not pushed.
        if delivery.routes.is_empty() {
            delivery.routes = self.base.delivery.routes.clone();
        }
        self.delivery.reconfigure(delivery)?;
        self.delivery
            .shaper
            .reconfigure(&config.egress, &config.shaping, shaping::unix_now());
        self.delivery.set_domains(&config.sending_domains);
        let settings = smtp::InboundSettings::new(listener, &config.sending_domains, signer);
        // What the configuration refuses now needs no local entry any more.
        self.delivery
            .suppressions
            .forget_configured(&settings.suppressed);
        self.inbound.set_settings(settings);
        self.feedback
            .set_token(config.feedback.token_sha256.as_deref());
        self.configured.store(true, Ordering::Release);
        self.update_readiness();
        self.delivery.wake_parked();
        Ok(())
    }

    /// Whether a configuration was applied.
    pub fn is_configured(&self) -> bool {
        self.configured.load(Ordering::Acquire)
    }

    /// Ready (and accepting sessions) when configured, with a usable egress address, and not
    /// draining.
    fn update_readiness(&self) {
        let ready = self.is_configured()
            && self.delivery.shaper.usable_addresses() > 0
            && !self.stopping.load(Ordering::Acquire);
        self.metrics.ready.store(ready, Ordering::Release);
        self.inbound.accepting.store(ready, Ordering::Release);
    }

    /// The relay's metrics (the coordinator reports read their counters).
    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    /// The relay's shaper (quota counters are saved next to the reports).
    pub fn shaper(&self) -> &Arc<shaping::Shaper> {
        &self.delivery.shaper
    }

    /// The sending domains in force (lowercased).
    pub fn sending_domains(&self) -> Vec<String> {
        self.inbound.settings().domains.clone()
    }

    /// The recipients this relay suppressed itself, and where new ones become durable.
    pub fn suppressions(&self) -> &Arc<suppression::Suppressions> {
        &self.delivery.suppressions
    }
}

impl Relay {
    /// Opens the spool (resuming what it holds), starts listening and delivering.
    pub async fn start(config: RelayConfig) -> Result<Relay, RelayError> {
        config.validate()?;
        Self::launch(config, None, true).await
    }

    /// Starts without a configuration (coordinated mode): the spool is opened and resumed,
    /// SMTP and HTTP listen, but `/readyz` answers 503 and sessions get `421 4.3.0` until
    /// [`Control::reconfigure`] applied a configuration with a usable egress address. `base`
    /// gives the static settings (hostname, listen addresses, spool, HTTP); its domains and
    /// addresses are normally empty. `tls` overrides `base.listener.tls` (PEM from the
    /// environment).
    pub async fn start_unconfigured(
        base: RelayConfig,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Relay, RelayError> {
        base.validate_pushed()?;
        Self::launch(base, tls, false).await
    }

    async fn launch(
        config: RelayConfig,
        tls_override: Option<tokio_rustls::TlsAcceptor>,
        configured: bool,
    ) -> Result<Relay, RelayError> {
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
            Arc::new(suppression::Suppressions::default()),
            Arc::clone(&spool),
            Arc::clone(&metrics),
            shutdown_rx.clone(),
        )?;
        delivery.set_domains(&config.sending_domains);
        let feedback = Arc::new(feedback::FeedbackService::new(
            config.feedback.token_sha256.as_deref(),
            Arc::clone(&delivery),
            Arc::clone(&metrics),
        ));
        let tls = match (tls_override, &config.listener.tls) {
            (Some(t), _) => Some(t),
            (None, Some(t)) => Some(smtp::tls_acceptor(&t.cert, &t.key)?),
            (None, None) => None,
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
                let state = Arc::new(http::HttpState {
                    metrics: Arc::clone(&metrics),
                    feedback: Arc::clone(&feedback),
                });
                tokio::spawn(http::serve(l, state, shutdown_rx.clone()));
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
        let inbound = Arc::new(smtp::Inbound::new(
            config.hostname.clone(),
            smtp::InboundSettings::new(config.listener.clone(), &config.sending_domains, signer),
            spool,
            Arc::clone(&delivery),
            Arc::clone(&metrics),
            tls,
            false,
        ));
        let control = Arc::new(Control {
            inbound: Arc::clone(&inbound),
            delivery: Arc::clone(&delivery),
            metrics: Arc::clone(&metrics),
            feedback,
            base: config,
            configured: AtomicBool::new(configured),
            stopping: AtomicBool::new(false),
            apply: Mutex::new(()),
        });
        control.update_readiness();
        let listener_task = tokio::spawn(smtp::serve(listener, inbound, shutdown_rx));
        tracing::info!(%smtp_addr, ?http_addr, configured, "relay started");
        Ok(Relay {
            smtp_addr,
            http_addr,
            metrics,
            delivery,
            control,
            shutdown,
            listener_task,
        })
    }

    /// The run-time knobs of this relay.
    pub fn control(&self) -> Arc<Control> {
        Arc::clone(&self.control)
    }

    /// Applies a new configuration without a restart (see [`Control::reconfigure`]).
    pub fn reconfigure(&self, config: &RelayConfig) -> Result<(), RelayError> {
        self.control.reconfigure(config)
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
        self.control.stopping.store(true, Ordering::Release);
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
