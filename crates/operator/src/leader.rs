//! Leader election with a `coordination.k8s.io/v1` Lease, so that two operator replicas are
//! safe: only the holder runs the controllers and serves the coordinator.
//!
//! The holder renews the Lease every `renew`; another replica takes it over only after
//! `duration` without renewal. Every write carries the Lease's resourceVersion, so two
//! candidates cannot both win a round. A holder that fails to renew within `duration` stops
//! leading (the caller exits) before anybody else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader Lease {name}: {reason}")]
    Lost { name: String, reason: String },
}

/// Settings of the election.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

/// Outcome of one attempt.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Holding,
    HeldBy(String),
}

async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<Attempt, kube::Error> {
    let now = Timestamp::now();
    let secs = i32::try_from(cfg.duration.as_secs()).unwrap_or(i32::MAX);
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Holding),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldBy(String::new())),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(secs));
            let expired = renewed.is_none_or(|r| r.as_second() + duration < now.as_second());
            if holder != cfg.identity && !holder.is_empty() && !expired {
                return Ok(Attempt::HeldBy(holder));
            }
            let mut next = spec;
            if holder != cfg.identity {
                next.acquire_time = Some(MicroTime(now));
                next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
            }
            next.holder_identity = Some(cfg.identity.clone());
            next.lease_duration_seconds = Some(secs);
            next.renew_time = Some(MicroTime(now));
            lease.spec = Some(next);
            // replace carries metadata.resourceVersion: a concurrent writer makes this a 409.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Holding),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldBy(holder)),
                Err(e) => Err(e),
            }
        }
    }
}

/// Held leadership: `leading` turns `false` when it is lost; dropping the value stops renewing.
#[derive(Debug)]
pub struct Leadership {
    pub leading: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Waits until this replica holds the Lease, then keeps renewing it in the background until
/// the returned [`Leadership`] is dropped.
pub async fn acquire(client: kube::Client, cfg: LeaseConfig) -> Leadership {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut logged = String::from("?");
    loop {
        match try_acquire(&api, &cfg).await {
            Ok(Attempt::Holding) => break,
            Ok(Attempt::HeldBy(holder)) => {
                if holder != logged {
                    tracing::info!(lease = %cfg.name, %holder, "another replica leads; waiting");
                    logged = holder;
                }
            }
            Err(e) => tracing::warn!(lease = %cfg.name, error = %e, "cannot read the leader Lease"),
        }
        tokio::time::sleep(cfg.renew).await;
    }
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became the leader");
    let (tx, rx) = watch::channel(true);
    let renewer = tokio::spawn(async move {
        let mut last_renew = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(cfg.renew).await;
            match try_acquire(&api, &cfg).await {
                Ok(Attempt::Holding) => last_renew = tokio::time::Instant::now(),
                Ok(Attempt::HeldBy(holder)) => {
                    tracing::error!(lease = %cfg.name, %holder, "lost the leader Lease");
                    let _ = tx.send(false);
                    return;
                }
                Err(e) => {
                    tracing::warn!(lease = %cfg.name, error = %e, "cannot renew the leader Lease");
                    // Give up before anybody else may take over.
                    if last_renew.elapsed() + cfg.renew >= cfg.duration {
                        let _ = tx.send(false);
                        return;
                    }
                }
            }
        }
    });
    Leadership {
        leading: rx,
        renewer,
    }
}

/// Gives the Lease up on a clean shutdown, so the other replica takes over at once.
pub async fn release(client: kube::Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        let _ = api.replace(&cfg.name, &PostParams::default(), &lease).await;
    }
}

/// Reason text for [`LeaderError::Lost`].
pub fn lost(cfg: &LeaseConfig) -> LeaderError {
    LeaderError::Lost {
        name: cfg.name.clone(),
        reason: "another replica holds it now, or it could not be renewed in time".to_string(),
    }
}
