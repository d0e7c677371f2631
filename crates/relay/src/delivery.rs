//! Delivery: per-destination queues, MX routing and the connection workers.
//!
//! Accepted messages are split by recipient domain into jobs. Each queue (destination
//! domain, plus the assigned egress address when the overflow policy is `wait`, plus the
//! sending domain when it has dedicated addresses) has up to `maxConnectionsPerDestination`
//! workers; a worker holds one connection from an egress address the shaper granted (among
//! the sending domain's dedicated addresses, if any), sends job after job over it (connection
//! reuse), and closes it when the queue stays empty for `connectionIdle`. Each recipient ends
//! delivered, bounced or blocked (spool record + counter + DSN; a hard bounce also suppresses
//! the recipient), or deferred: retried after the backoff schedule until the max lifetime,
//! then bounced.
//!
//! Quotas: with the overflow policy `wait` a job keeps its assigned address and waits for that
//! address's next window, unless the address overflows to warm addresses and one of them has
//! quota left; otherwise any address with quota left takes it. A message held back by a
//! quota is counted once per quota window as `deferred_by_warmup` (not an attempt).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::client::{Connection, Outcome, Reply, classify};
use crate::config::{DeliveryConfig, SendingDomainConfig, ShapingConfig};
use crate::metrics::Metrics;
use crate::shaping::{MessageSlot, ProviderGroup, Shaper, Unavailable, provider_group, unix_now};
use crate::spool::{Message, Spool};
use crate::suppression::{Reason, Suppression, Suppressions};

/// Errors of building the delivery side.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("failed to build the dns resolver: {0}")]
    Resolver(String),
}

/// Where mail for a domain goes.
#[derive(Debug, Clone)]
pub struct Route {
    /// (MX host name, address) in preference order.
    pub targets: Vec<(String, SocketAddr)>,
    pub group: ProviderGroup,
}

/// Why a domain has no route.
#[derive(Debug, Clone)]
pub enum RouteError {
    /// Permanent: null MX or a domain that does not exist.
    Permanent(Reply),
    /// Temporary: DNS trouble.
    Temporary(Reply),
}

/// One delivery attempt's unit: a message and its recipients in one domain.
#[derive(Debug, Clone)]
struct Job {
    msg: Arc<Message>,
    rcpts: Vec<usize>,
    domain: String,
    attempts: u32,
    /// The egress address the job must leave from (overflow policy `wait`).
    address: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct QueueKey {
    domain: String,
    address: Option<IpAddr>,
    /// The sending domain, when it has dedicated addresses (its mail has queues of its own).
    tenant: Option<String>,
}

/// The sending domains in force and their dedicated addresses.
#[derive(Debug, Default)]
struct DomainPolicy {
    /// Lowercased sending domains.
    domains: Vec<String>,
    /// Dedicated addresses of the sending domains that have some.
    dedicated: HashMap<String, Arc<[IpAddr]>>,
}

impl DomainPolicy {
    /// The configured sending domain of an envelope sender.
    fn sending_domain(&self, mail_from: &str) -> Option<String> {
        let d = crate::smtp::address_domain(mail_from)?;
        crate::smtp::matching_sending_domain(&self.domains, &d).map(str::to_string)
    }

    /// The sending domain of `mail_from` and its dedicated addresses, if it has some.
    fn dedicated(&self, mail_from: &str) -> Option<(String, Arc<[IpAddr]>)> {
        let d = self.sending_domain(mail_from)?;
        let a = self.dedicated.get(&d)?;
        Some((d, Arc::clone(a)))
    }
}

/// Why a queue is held back by a quota: the address whose quota holds it, toward which
/// group, in which window.
#[derive(Debug, Clone, Copy)]
struct Held {
    address: IpAddr,
    group: ProviderGroup,
    window: i64,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Job>,
    workers: usize,
    notify: Arc<Notify>,
}

/// Recipients of a message that are still open, so the message leaves the gauge once done.
struct Progress {
    left: usize,
    /// The quota window in which the message was last counted as held back by warm-up.
    held_window: Option<i64>,
}

/// The delivery side of the relay.
pub struct Delivery {
    config: RwLock<Arc<DeliveryConfig>>,
    shaping: ShapingConfig,
    hostname: String,
    resolver: RwLock<TokioResolver>,
    /// Bumped by a reconfiguration: mail parked for quota or for want of an address is
    /// looked at again at once.
    wake: watch::Sender<u64>,
    pub shaper: Arc<Shaper>,
    /// Recipients suppressed by this relay (hard bounces, complaints).
    pub suppressions: Arc<Suppressions>,
    domains: RwLock<Arc<DomainPolicy>>,
    spool: Arc<dyn Spool>,
    metrics: Arc<Metrics>,
    queues: Mutex<HashMap<QueueKey, Queue>>,
    progress: Mutex<HashMap<u64, Progress>>,
    shutdown: watch::Receiver<bool>,
    /// Weak self for spawning workers from `&self` methods.
    me: std::sync::Weak<Delivery>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").finish_non_exhaustive()
    }
}

/// A resolver configuration asking exactly these servers (`127.0.0.1:53` when none), over
/// UDP with TCP fallback on each server's own port.
pub fn resolver_config(servers: &[SocketAddr]) -> ResolverConfig {
    let servers: Vec<SocketAddr> = if servers.is_empty() {
        vec![SocketAddr::from(([127, 0, 0, 1], 53))]
    } else {
        servers.to_vec()
    };
    let mut config = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
    for s in servers {
        let mut udp = ConnectionConfig::udp();
        udp.port = s.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = s.port();
        let mut ns = NameServerConfig::udp_and_tcp(s.ip());
        ns.connections = vec![udp, tcp];
        config.add_name_server(ns);
    }
    config
}

fn build_resolver(servers: &[SocketAddr]) -> Result<TokioResolver, DeliveryError> {
    let config = resolver_config(servers);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    builder.options_mut().timeout = Duration::from_secs(5);
    builder.options_mut().attempts = 2;
    // Names are always absolute here: never append a search domain.
    builder.options_mut().ndots = 0;
    builder
        .build()
        .map_err(|e| DeliveryError::Resolver(e.to_string()))
}

impl Delivery {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: DeliveryConfig,
        shaping: ShapingConfig,
        hostname: String,
        shaper: Arc<Shaper>,
        suppressions: Arc<Suppressions>,
        spool: Arc<dyn Spool>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, DeliveryError> {
        let resolver = build_resolver(&config.nameservers)?;
        Ok(Arc::new_cyclic(|me| Delivery {
            config: RwLock::new(Arc::new(config)),
            shaping,
            hostname,
            resolver: RwLock::new(resolver),
            wake: watch::channel(0).0,
            shaper,
            suppressions,
            domains: RwLock::new(Arc::default()),
            spool,
            metrics,
            queues: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            shutdown,
            me: me.clone(),
        }))
    }

    /// The delivery settings in force.
    pub fn config(&self) -> Arc<DeliveryConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn resolver(&self) -> TokioResolver {
        self.resolver
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes new delivery settings at run time (retries, lifetime, DSN, port, name servers,
    /// connection limits). Jobs waiting for a retry keep their timer; the new schedule applies
    /// from their next attempt.
    pub fn reconfigure(&self, config: DeliveryConfig) -> Result<(), DeliveryError> {
        let old = self.config();
        if old.nameservers != config.nameservers {
            let resolver = build_resolver(&config.nameservers)?;
            *self.resolver.write().unwrap_or_else(|e| e.into_inner()) = resolver;
        }
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// Takes the sending domains in force and their dedicated addresses. Queued mail of a
    /// domain whose dedicated addresses changed moves to them from its next message on.
    pub fn set_domains(&self, domains: &[SendingDomainConfig]) {
        let norm = |d: &str| d.trim().trim_end_matches('.').to_ascii_lowercase();
        let policy = DomainPolicy {
            domains: domains.iter().map(|d| norm(&d.domain)).collect(),
            dedicated: domains
                .iter()
                .filter(|d| !d.addresses.is_empty())
                .map(|d| (norm(&d.domain), Arc::from(d.addresses.as_slice())))
                .collect(),
        };
        *self.domains.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    fn domains(&self) -> Arc<DomainPolicy> {
        Arc::clone(&self.domains.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The sending domains in force (lowercased).
    pub fn sending_domains(&self) -> Vec<String> {
        self.domains().domains.clone()
    }

    /// The addresses mail of `msg` may leave from; `None` for any.
    fn allowed(&self, msg: &Message) -> Option<Arc<[IpAddr]>> {
        self.domains().dedicated(&msg.mail_from).map(|(_, a)| a)
    }

    fn key_of(&self, job: &Job) -> QueueKey {
        QueueKey {
            domain: job.domain.clone(),
            address: job.address,
            tenant: self.domains().dedicated(&job.msg.mail_from).map(|(d, _)| d),
        }
    }

    /// Looks again at once at mail parked for quota or for want of a usable address (after
    /// quotas were raised or addresses added).
    pub fn wake_parked(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<QueueKey, Queue>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Messages with open recipients (the queue gauge).
    pub fn queued_messages(&self) -> usize {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Workers still running (drain waits for zero).
    pub fn active_workers(&self) -> usize {
        self.queues().values().map(|q| q.workers).sum()
    }

    /// Queues the `pending` recipients of a durable message.
    pub fn submit(&self, msg: Arc<Message>, pending: Vec<usize>) {
        if pending.is_empty() {
            return;
        }
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                msg.id,
                Progress {
                    left: pending.len(),
                    held_window: None,
                },
            );
        self.metrics.queued.set(self.queued_messages() as i64);
        let mut by_domain: Vec<(String, Vec<usize>)> = Vec::new();
        for i in pending {
            let Some(rcpt) = msg.rcpts.get(i) else {
                continue;
            };
            let domain = crate::smtp::address_domain(rcpt).unwrap_or_default();
            match by_domain.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, v)) => v.push(i),
                None => by_domain.push((domain, vec![i])),
            }
        }
        let pinned = self.shaper.pinned();
        let allowed = self.allowed(&msg);
        for (domain, rcpts) in by_domain {
            // Unassigned (no usable address yet) jobs get one when they connect.
            let address = if pinned {
                self.shaper.assign(allowed.as_deref())
            } else {
                None
            };
            self.enqueue(Job {
                msg: Arc::clone(&msg),
                rcpts,
                domain,
                attempts: 0,
                address,
            });
        }
    }

    fn enqueue(&self, job: Job) {
        self.enqueue_at(job, false);
    }

    fn enqueue_at(&self, job: Job, front: bool) {
        let key = self.key_of(&job);
        let mut queues = self.queues();
        let q = queues.entry(key.clone()).or_default();
        if front {
            q.ready.push_front(job);
        } else {
            q.ready.push_back(job);
        }
        q.notify.notify_one();
        let spawn = q.workers < self.config().max_connections_per_destination.max(1)
            && !q.ready.is_empty()
            && !*self.shutdown.borrow();
        if spawn {
            q.workers += 1;
        }
        drop(queues);
        if spawn && let Some(me) = self.me.upgrade() {
            tokio::spawn(async move { me.worker(key).await });
        }
    }

    /// Takes the next job, or retires the worker (under the same lock, so an enqueue either
    /// sees this worker alive or spawns a new one).
    fn pop_or_retire(&self, key: &QueueKey, retire: bool) -> Option<Job> {
        let mut queues = self.queues();
        let q = queues.get_mut(key)?;
        if let Some(j) = q.ready.pop_front() {
            return Some(j);
        }
        if retire {
            q.workers = q.workers.saturating_sub(1);
            if q.workers == 0 && q.ready.is_empty() {
                queues.remove(key);
            }
        }
        None
    }

    fn requeue_front(&self, key: &QueueKey, job: Job) {
        self.queues()
            .entry(key.clone())
            .or_default()
            .ready
            .push_front(job);
    }

    fn retire(&self, key: &QueueKey) {
        let mut queues = self.queues();
        if let Some(q) = queues.get_mut(key) {
            q.workers = q.workers.saturating_sub(1);
        }
    }

    fn notify_of(&self, key: &QueueKey) -> Option<Arc<Notify>> {
        self.queues().get(key).map(|q| Arc::clone(&q.notify))
    }

    /// Moves every waiting job of `key` (and `first`) to `until` (a Unix time); when a quota
    /// holds them, each message is counted as held back (once per quota window).
    fn park_queue(&self, key: &QueueKey, first: Job, until: f64, held: Option<Held>) {
        let mut jobs = vec![first];
        if let Some(q) = self.queues().get_mut(key) {
            jobs.extend(q.ready.drain(..));
        }
        let delay = Duration::from_secs_f64((until - unix_now()).max(1.0));
        for job in jobs {
            if let Some(h) = held {
                self.count_held(&job.msg, h);
            }
            self.later(job, delay, true);
        }
    }

    /// Counts `msg` as held back by a warm-up quota, unless it already was in this window.
    fn count_held(&self, msg: &Message, held: Held) {
        {
            let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            let Some(p) = progress.get_mut(&msg.id) else {
                return;
            };
            if p.held_window == Some(held.window) {
                return;
            }
            p.held_window = Some(held.window);
        }
        tracing::debug!(id = msg.id, address = %held.address, "held back by a warm-up quota");
        self.metrics.delivery_from(
            Some(held.address),
            held.group,
            Outcome::DeferredByWarmup,
            &msg.mail_from,
        );
    }

    /// Enqueues `job` after `delay`, or at once when `wakeable` and a reconfiguration wakes
    /// parked mail.
    fn later(&self, job: Job, delay: Duration, wakeable: bool) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let mut shutdown = self.shutdown.clone();
        let mut wake = self.wake.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => me.enqueue(job),
                Ok(()) = wake.changed(), if wakeable => me.enqueue(job),
                // Parked jobs are still on the spool; the next start picks them up.
                _ = shutdown.wait_for(|s| *s) => {}
            }
        });
    }

    async fn worker(self: Arc<Self>, key: QueueKey) {
        let mut conn: Option<(Connection, crate::shaping::ConnectionPermit, usize)> = None;
        loop {
            if *self.shutdown.borrow() {
                self.retire(&key);
                break;
            }
            let job = match self.pop_or_retire(&key, conn.is_none()) {
                Some(j) => j,
                None if conn.is_none() => break,
                None => {
                    // Keep the connection a little for reuse, then retire.
                    let Some(notify) = self.notify_of(&key) else {
                        self.retire(&key);
                        break;
                    };
                    let idle = self.config().connection_idle;
                    let _ = tokio::time::timeout(idle, notify.notified()).await;
                    match self.pop_or_retire(&key, true) {
                        Some(j) => j,
                        None => break,
                    }
                }
            };
            let max_per_conn = self.config().max_messages_per_connection;
            if conn.as_ref().is_some_and(|c| {
                c.2 >= self
                    .shaper
                    .messages_per_connection(c.1.group)
                    .map_or(max_per_conn, |n| n.min(max_per_conn))
            }) && let Some((c, _, _)) = conn.take()
            {
                c.quit().await;
            }
            if conn.is_none() {
                match self.connect(&job).await {
                    Ok(c) => {
                        conn = Some((c.0, c.1, 0));
                    }
                    Err(ConnectFailure::OverQuota { until, held }) => {
                        self.park_queue(&key, job, until, Some(held));
                        self.retire(&key);
                        break;
                    }
                    Err(ConnectFailure::Reassign(address)) => {
                        // The job's address may not send it (any more): it moves to the queue
                        // of its new address.
                        let mut job = job;
                        job.address = Some(address);
                        self.enqueue(job);
                        continue;
                    }
                    Err(ConnectFailure::Unavailable(Unavailable::OverQuota { until, .. })) => {
                        self.park_queue(&key, job, until, None);
                        self.retire(&key);
                        break;
                    }
                    Err(ConnectFailure::Unavailable(Unavailable::NoAddress)) => {
                        // No address may send (none configured or all paused): wait for a
                        // reconfiguration, looking again now and then.
                        self.park_queue(&key, job, unix_now() + 30.0, None);
                        self.retire(&key);
                        break;
                    }
                    Err(ConnectFailure::Unavailable(Unavailable::Busy)) => {
                        // Connection slots are taken by other queues: keep our place and
                        // look again shortly (shutdown is checked at the top of the loop).
                        self.requeue_front(&key, job);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(ConnectFailure::Route(RouteError::Permanent(reply))) => {
                        attempt_span(&job, Outcome::Bounced);
                        self.finish_all(&job, None, ProviderGroup::Other, &reply, Outcome::Bounced);
                        continue;
                    }
                    Err(ConnectFailure::Route(RouteError::Temporary(reply)))
                    | Err(ConnectFailure::Connect(reply)) => {
                        attempt_span(&job, Outcome::Deferred);
                        self.defer(job, None, ProviderGroup::Other, &reply);
                        continue;
                    }
                }
            }
            let Some((c, permit, sent)) = conn.as_mut() else {
                continue;
            };
            if self.leaves_elsewhere(&job, permit.address, permit.group) {
                // The connection's address may not (or need not) carry this job any more:
                // dedicated addresses changed, or its own address has quota again.
                let k = self.key_of(&job);
                if k == key {
                    self.requeue_front(&key, job);
                } else {
                    self.enqueue(job);
                }
                if let Some((c, _, _)) = conn.take() {
                    c.quit().await;
                }
                continue;
            }
            match self
                .shaper
                .message_slot(permit.address, permit.group, unix_now())
            {
                MessageSlot::Go(wait) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                MessageSlot::Stop => {
                    // The address was removed or paused: reconnect from another one.
                    self.requeue_front(&key, job);
                    if let Some((c, _, _)) = conn.take() {
                        c.quit().await;
                    }
                    continue;
                }
                MessageSlot::OverQuota { until, window } => {
                    let own = job.address.filter(|_| self.shaper.pinned());
                    let stays = own
                        .is_some_and(|a| a == permit.address && !self.shaper.overflows_to_warm(a));
                    let held = Held {
                        address: permit.address,
                        group: permit.group,
                        window,
                    };
                    if let Some((c, _, _)) = conn.take() {
                        c.quit().await;
                    }
                    if stays {
                        // The job's own address is spent and does not overflow: wait for
                        // its next window.
                        self.park_queue(&key, job, until, Some(held));
                        self.retire(&key);
                        break;
                    }
                    // Another address may have quota left (a warm one, when the job's own
                    // address overflows to warm addresses): reconnect from it.
                    self.requeue_front(&key, job);
                    continue;
                }
            }
            let rcpts: Vec<&str> = job
                .rcpts
                .iter()
                .filter_map(|i| job.msg.rcpts.get(*i).map(String::as_str))
                .collect();
            let address = permit.address;
            let group = permit.group;
            let span = tracing::info_span!(
                "delivery.attempt",
                message_id = %format_args!("{:x}", job.msg.id),
                egress_address = %address,
                mx = c.host.as_str(),
                recipients = rcpts.len(),
                outcome = tracing::field::Empty,
            );
            let sent_result = c
                .send(&job.msg.mail_from, &rcpts, &job.msg.data)
                .instrument(span.clone())
                .await;
            let _span = span.enter();
            match sent_result {
                Ok(replies) => {
                    *sent += 1;
                    span.record("outcome", summary(&replies));
                    self.handle_replies(job, address, group, replies);
                }
                Err(e) => {
                    span.record("outcome", Outcome::Deferred.as_str());
                    tracing::info!(error = %e, "delivery connection failed");
                    conn = None;
                    self.defer(job, Some(address), group, &e.as_reply());
                }
            }
        }
        if let Some((c, _, _)) = conn.take() {
            c.quit().await;
        }
    }

    /// Whether `job` should not leave over a connection from `address`: the address is not
    /// one of the sending domain's dedicated addresses, or (overflow policy `wait`) it is a
    /// warm address carrying overflow while the job's own address can send again.
    fn leaves_elsewhere(&self, job: &Job, address: IpAddr, group: ProviderGroup) -> bool {
        if self
            .allowed(&job.msg)
            .is_some_and(|a| !a.contains(&address))
        {
            return true;
        }
        match job.address {
            Some(own) if own != address && self.shaper.pinned() => {
                !self.shaper.overflows_to_warm(own) || self.shaper.has_quota(own, group, unix_now())
            }
            _ => false,
        }
    }

    /// Grants a connection slot for `job` toward `group`. Unpinned: any address (of the
    /// sending domain's dedicated ones, if any) with quota left. Pinned (overflow policy
    /// `wait`): the job's address; when it is over quota and overflows to warm addresses, a
    /// warm address with quota left; a job whose address may not send it is reassigned.
    fn grant(
        &self,
        job: &Job,
        group: ProviderGroup,
    ) -> Result<crate::shaping::ConnectionPermit, ConnectFailure> {
        let now = unix_now();
        let allowed = self.allowed(&job.msg);
        let allowed = allowed.as_deref();
        let over = |until, address, window| ConnectFailure::OverQuota {
            until,
            held: Held {
                address,
                group,
                window,
            },
        };
        if !self.shaper.pinned() {
            return self
                .shaper
                .acquire(group, allowed, now)
                .map_err(|e| match e {
                    Unavailable::OverQuota {
                        until,
                        address,
                        window,
                    } => over(until, address, window),
                    other => ConnectFailure::Unavailable(other),
                });
        }
        let own = job
            .address
            .filter(|a| self.shaper.is_usable(*a) && allowed.is_none_or(|s| s.contains(a)));
        let Some(own) = own else {
            return Err(match self.shaper.assign(allowed) {
                Some(a) => ConnectFailure::Reassign(a),
                None => ConnectFailure::Unavailable(Unavailable::NoAddress),
            });
        };
        match self.shaper.acquire(group, Some(&[own]), now) {
            Ok(p) => Ok(p),
            Err(Unavailable::OverQuota { until, window, .. })
                if self.shaper.overflows_to_warm(own) =>
            {
                let warm = self.shaper.warm_addresses(own, allowed);
                if warm.is_empty() {
                    return Err(over(until, own, window));
                }
                match self.shaper.acquire(group, Some(&warm), now) {
                    Ok(p) => {
                        tracing::debug!(id = job.msg.id, from = %own, to = %p.address, "over quota: overflow to a warm address");
                        Ok(p)
                    }
                    // Held by its own address's quota until it or a warm address opens.
                    Err(Unavailable::OverQuota { until: u, .. }) => {
                        Err(over(until.min(u), own, window))
                    }
                    Err(Unavailable::Busy) => Err(ConnectFailure::Unavailable(Unavailable::Busy)),
                    Err(Unavailable::NoAddress) => Err(over(until, own, window)),
                }
            }
            Err(Unavailable::OverQuota {
                until,
                address,
                window,
            }) => Err(over(until, address, window)),
            Err(other) => Err(ConnectFailure::Unavailable(other)),
        }
    }

    async fn connect(
        &self,
        job: &Job,
    ) -> Result<(Connection, crate::shaping::ConnectionPermit), ConnectFailure> {
        let route = self
            .route(&job.domain)
            .await
            .map_err(ConnectFailure::Route)?;
        let permit = self.grant(job, route.group)?;
        let config = self.config();
        let mut last = Reply {
            code: 451,
            text: format!("4.4.1 no usable mail exchanger for {}", job.domain),
        };
        for (host, target) in &route.targets {
            if target.is_ipv4() != permit.address.is_ipv4() {
                continue;
            }
            match Connection::open(
                permit.address,
                *target,
                &permit.helo,
                host,
                config.opportunistic_tls,
                config.command_timeout,
            )
            .await
            {
                Ok(c) => return Ok((c, permit)),
                Err(e) => {
                    tracing::info!(error = %e, %host, "mail exchanger failed");
                    last = e.as_reply();
                    // A 5xx greeting is still only about this host: try the next one, and
                    // count it as temporary so the mail waits for a better day.
                    if last.code / 100 == 5 {
                        last.code = 451;
                    }
                }
            }
        }
        Err(ConnectFailure::Connect(last))
    }

    /// Resolves the mail exchangers of `domain` (static route, MX, or implicit MX).
    pub async fn route(&self, domain: &str) -> Result<Route, RouteError> {
        let config = self.config();
        let port = config.port;
        if let Some(addr) = config.routes.get(domain).or_else(|| config.routes.get("*")) {
            return Ok(Route {
                targets: vec![(addr.ip().to_string(), *addr)],
                group: provider_group(domain, &self.shaping.mx_suffixes),
            });
        }
        let temp = |e: &dyn std::fmt::Display| {
            RouteError::Temporary(Reply {
                code: 451,
                text: format!("4.4.3 dns lookup for {domain} failed: {e}"),
            })
        };
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let resolver = self.resolver();
        let hosts: Vec<String> = match resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                mx.sort();
                if mx.len() == 1 && (mx[0].1 == "." || mx[0].1.is_empty()) {
                    return Err(RouteError::Permanent(Reply {
                        code: 556,
                        text: format!("5.1.10 {domain} does not accept mail (null MX)"),
                    }));
                }
                mx.into_iter().map(|(_, h)| h).collect()
            }
            Err(e) if e.is_nx_domain() => {
                return Err(RouteError::Permanent(Reply {
                    code: 550,
                    text: format!("5.1.2 domain {domain} does not exist"),
                }));
            }
            // No MX records: the domain itself is the implicit MX (RFC 5321 §5.1).
            Err(e) if e.is_no_records_found() => vec![fqdn.clone()],
            Err(e) => return Err(temp(&e)),
        };
        let group = hosts.first().map_or(ProviderGroup::Other, |h| {
            provider_group(h, &self.shaping.mx_suffixes)
        });
        let mut targets = Vec::new();
        let mut last_err: Option<String> = None;
        for host in &hosts {
            match resolver.lookup_ip(host.as_str()).await {
                Ok(ips) => {
                    for ip in ips.iter() {
                        targets.push((
                            host.trim_end_matches('.').to_string(),
                            SocketAddr::new(ip, port),
                        ));
                    }
                }
                Err(e) => last_err = Some(e.to_string()),
            }
        }
        if targets.is_empty() {
            return Err(temp(&last_err.unwrap_or_else(|| "no addresses".into())));
        }
        Ok(Route { targets, group })
    }

    fn handle_replies(&self, job: Job, address: IpAddr, group: ProviderGroup, replies: Vec<Reply>) {
        let mut deferred = Vec::new();
        let mut last_deferral = None;
        for (i, reply) in job.rcpts.iter().zip(replies) {
            let outcome = classify(&reply);
            match outcome {
                Outcome::Deferred => {
                    self.metrics
                        .delivery_from(Some(address), group, outcome, &job.msg.mail_from);
                    deferred.push(*i);
                    last_deferral = Some(reply);
                }
                _ => self.finish(&job.msg, *i, Some(address), group, &reply, outcome),
            }
        }
        if let Some(reply) = last_deferral {
            self.retry(
                Job {
                    rcpts: deferred,
                    ..job
                },
                Some(address),
                group,
                &reply,
            );
        }
    }

    /// All recipients of `job` failed the same way before a transaction.
    fn defer(&self, job: Job, address: Option<IpAddr>, group: ProviderGroup, reply: &Reply) {
        for _ in &job.rcpts {
            self.metrics
                .delivery_from(address, group, Outcome::Deferred, &job.msg.mail_from);
        }
        self.retry(job, address, group, reply);
    }

    fn retry(&self, mut job: Job, address: Option<IpAddr>, group: ProviderGroup, reply: &Reply) {
        let config = self.config();
        let age = unix_now() - job.msg.received_at as f64;
        if age >= config.max_lifetime.as_secs_f64() {
            let expired = Reply {
                code: 554,
                text: format!(
                    "5.4.7 delivery time expired after {} attempts; last error: {}",
                    job.attempts + 1,
                    reply
                ),
            };
            self.finish_all(&job, address, group, &expired, Outcome::Bounced);
            return;
        }
        let idx = (job.attempts as usize).min(config.retry_intervals.len().saturating_sub(1));
        let delay = config
            .retry_intervals
            .get(idx)
            .copied()
            .unwrap_or(Duration::from_secs(300));
        job.attempts += 1;
        tracing::debug!(id = job.msg.id, domain = %job.domain, ?delay, %reply, "deferred");
        self.later(job, delay, false);
    }

    fn finish_all(
        &self,
        job: &Job,
        address: Option<IpAddr>,
        group: ProviderGroup,
        reply: &Reply,
        outcome: Outcome,
    ) {
        for i in &job.rcpts {
            self.finish(&job.msg, *i, address, group, reply, outcome);
        }
    }

    /// A recipient is done for good: record it, count it, and tell the sender if it failed.
    fn finish(
        &self,
        msg: &Arc<Message>,
        rcpt: usize,
        address: Option<IpAddr>,
        group: ProviderGroup,
        reply: &Reply,
        outcome: Outcome,
    ) {
        self.metrics
            .delivery_from(address, group, outcome, &msg.mail_from);
        let suppression = (outcome == Outcome::Bounced && crate::client::is_hard_bounce(reply))
            .then(|| {
                let domain = self.domains().sending_domain(&msg.mail_from)?;
                let recipient = msg.rcpts.get(rcpt)?.clone();
                Some(Suppression {
                    domain,
                    recipient,
                    reason: Reason::HardBounce,
                })
            })
            .flatten();
        match suppression {
            Some(s) => self.suppress(msg.id, rcpt, s),
            None => self.spool.rcpt_done(msg.id, rcpt),
        }
        if outcome != Outcome::Delivered
            && self.config().dsn
            && !msg.mail_from.is_empty()
            && let Some(to) = msg.rcpts.get(rcpt)
        {
            self.send_dsn(msg, to, reply);
        }
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = progress.get_mut(&msg.id) {
            p.left = p.left.saturating_sub(1);
            if p.left == 0 {
                progress.remove(&msg.id);
            }
        }
        let n = progress.len();
        drop(progress);
        self.metrics.queued.set(n as i64);
    }

    /// Suppresses a hard-bounced recipient: at once locally, and (coordinated mode) durably
    /// for the next report before the recipient is marked done on the spool, so a crash in
    /// between repeats the attempt rather than losing the suppression.
    fn suppress(&self, id: u64, rcpt: usize, s: Suppression) {
        self.suppressions.add(&s.domain, &s.recipient);
        tracing::info!(id, domain = %s.domain, "hard bounce: recipient suppressed");
        let Some(sink) = self.suppressions.durable() else {
            self.spool.rcpt_done(id, rcpt);
            return;
        };
        let spool = Arc::clone(&self.spool);
        tokio::spawn(async move {
            match tokio::task::spawn_blocking(move || sink.suppression(&s)).await {
                Ok(Ok(())) => spool.rcpt_done(id, rcpt),
                Ok(Err(e)) => tracing::error!(
                    id,
                    error = %e,
                    "the recipient stays open on the spool and is tried again after a restart"
                ),
                Err(e) => tracing::error!(id, error = %e, "recording a suppression failed"),
            }
        });
    }

    fn send_dsn(&self, original: &Message, failed_rcpt: &str, reply: &Reply) {
        let id = self.spool.next_id();
        let data = crate::dsn::build(&self.hostname, original, failed_rcpt, reply, id);
        let dsn = Message {
            id,
            received_at: unix_now() as u64,
            mail_from: String::new(),
            rcpts: vec![original.mail_from.clone()],
            data,
        };
        let stored = self.spool.store(&dsn);
        let Some(me) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            match stored.await {
                Ok(Ok(())) => me.submit(Arc::new(dsn), vec![0]),
                _ => tracing::error!(id, "failed to spool a delivery status notification"),
            }
        });
    }
}

enum ConnectFailure {
    Route(RouteError),
    /// Held back by a warm-up quota until this Unix time.
    OverQuota {
        until: f64,
        held: Held,
    },
    /// The job's address may not send it: this one may.
    Reassign(IpAddr),
    Unavailable(Unavailable),
    Connect(Reply),
}

/// The outcome of one attempt for the trace: the recipients' common outcome, or `mixed`.
fn summary(replies: &[Reply]) -> &'static str {
    let mut outcomes = replies.iter().map(|r| classify(r).as_str());
    let Some(first) = outcomes.next() else {
        return Outcome::Deferred.as_str();
    };
    if outcomes.all(|o| o == first) {
        first
    } else {
        "mixed"
    }
}

/// A `delivery.attempt` span for an attempt that failed before any SMTP transaction (no
/// route, or no mail exchanger answered): no egress address or MX, closed at once.
fn attempt_span(job: &Job, outcome: Outcome) {
    let _span = tracing::info_span!(
        "delivery.attempt",
        message_id = %format_args!("{:x}", job.msg.id),
        recipients = job.rcpts.len(),
        outcome = outcome.as_str(),
    );
}
