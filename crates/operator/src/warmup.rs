//! The warm-up engine: advances each egress address of the pools that reference a
//! WarmupPlan stage by stage, from what receivers did with its mail.
//!
//! The relays report cumulative counters per address (RelayPool `status.counters`, counted
//! exactly once by the coordinator). The engine keeps, per address, the counters at the start
//! of the current window (`windowBase`): a window's figures are the difference, so an operator
//! restart or a resent report never counts twice, and all the state lives in the plan's status.
//!
//! When a window ends, [`close_window`] decides: advance (gates held and the address sent its
//! minimum share for at least `minDays` windows), stay, hold, step back or pause on a breach,
//! or fall back after too many idle windows. The RelayPool controller turns the result into
//! address states and quotas ([`address_state`], [`quotas`]) that the coordinator pushes to the
//! relays, which enforce them. Blocklisted addresses are quarantined ([`blocklist`]).
//!
//! Time comes from an injectable clock, so a 30-day plan runs in a test in seconds.

pub mod blocklist;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mailfleet_api::common::{ConditionStatus, parse_duration, set_condition, set_reconciling};
use mailfleet_api::relaypool::{AddressCounters, AddressState, RelayPool};
use mailfleet_api::warmupplan::{
    AddressWarmup, BreachAction, CONDITION_READY, OverflowPolicy, WarmupPlan, WarmupPlanSpec,
    WarmupPlanStatus, WarmupState, WindowCounters,
};
use mailfleet_proto::v1 as pb;
use serde_json::json;

use crate::metrics::Metrics;
use crate::sendingdomain::Clock;

/// Field manager of the plan status the engine writes.
pub const MANAGER: &str = "mailfleet-warmup";
/// Annotation on a WarmupPlan that resumes paused addresses: a comma-separated list of
/// addresses, or `all`. The engine removes it once applied.
pub const RESUME_ANNOTATION: &str = "mailfleet.dev/resume";
/// Condition type: the blocklists could be checked.
pub const CONDITION_BLOCKLISTS: &str = "BlocklistsChecked";
const CONTROLLER: &str = "warmupplan";
/// Most windows closed in one go for an address that was away long (the rest count as idle
/// at once).
const MAX_WINDOWS_PER_PASS: i64 = 400;

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    #[error("Kubernetes API request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("invalid window {window:?}: {reason}")]
    Window { window: String, reason: String },
}

impl WarmupError {
    fn category(&self) -> &'static str {
        match self {
            WarmupError::Api(_) => "api",
            WarmupError::Window { .. } => "spec",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pure decisions

/// The figures of one window of one address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowFigures {
    /// Delivery attempts: delivered, deferred, hard bounces and policy blocks.
    pub attempted: i64,
    pub delivered: i64,
    pub deferred: i64,
    pub hard_bounces: i64,
    pub policy_blocks: i64,
    pub complaints: i64,
    pub deferred_by_warmup: i64,
}

fn ratio(n: i64, d: i64) -> f64 {
    if d <= 0 {
        if n > 0 { 1.0 } else { 0.0 }
    } else {
        n as f64 / d as f64
    }
}

impl WindowFigures {
    /// The difference between two readings of cumulative counters. Counters only grow; if
    /// they went back (the pool was recreated), the window counts from zero.
    pub fn between(base: &WindowCounters, now: &WindowCounters) -> WindowFigures {
        let backwards = now.delivered < base.delivered
            || now.deferred < base.deferred
            || now.hard_bounces < base.hard_bounces
            || now.policy_blocks < base.policy_blocks
            || now.complaints < base.complaints
            || now.deferred_by_warmup < base.deferred_by_warmup;
        let zero = WindowCounters::default();
        let b = if backwards { &zero } else { base };
        let delivered = now.delivered - b.delivered;
        let deferred = now.deferred - b.deferred;
        let hard_bounces = now.hard_bounces - b.hard_bounces;
        let policy_blocks = now.policy_blocks - b.policy_blocks;
        WindowFigures {
            attempted: delivered + deferred + hard_bounces + policy_blocks,
            delivered,
            deferred,
            hard_bounces,
            policy_blocks,
            complaints: now.complaints - b.complaints,
            deferred_by_warmup: now.deferred_by_warmup - b.deferred_by_warmup,
        }
    }

    /// Hard bounces per attempt.
    pub fn bounce_rate(&self) -> f64 {
        ratio(self.hard_bounces, self.attempted)
    }
    /// Complaints per delivered message.
    pub fn complaint_rate(&self) -> f64 {
        ratio(self.complaints, self.delivered)
    }
    /// Temporary failures per attempt.
    pub fn deferral_rate(&self) -> f64 {
        ratio(self.deferred, self.attempted)
    }
}

/// An address's cumulative counters as the pool's status has them.
pub fn counters_of(c: &AddressCounters) -> WindowCounters {
    WindowCounters {
        delivered: c.delivered,
        deferred: c.deferred,
        hard_bounces: c.hard_bounces,
        policy_blocks: c.policy_blocks,
        complaints: c.complaints,
        deferred_by_warmup: c.deferred_by_warmup,
    }
}

/// What closing a window decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Moved up one stage.
    Advanced,
    /// Passed the last stage: warm.
    Completed,
    /// Stays at its stage (too few windows in it, or too little sent), or stays warm.
    Stayed,
    /// A gate breached; kept at its stage.
    Held,
    /// A gate breached; moved back.
    SteppedBack,
    /// A gate breached; stopped until resumed.
    Paused,
    /// Idle too long: back to the idle reset stage.
    IdleReset,
    /// Paused or quarantined: nothing changes.
    Frozen,
}

impl Decision {
    /// The Event to publish for it, if any.
    pub fn event(self) -> Option<(EventType, &'static str)> {
        match self {
            Decision::Advanced => Some((EventType::Normal, "WarmupAdvanced")),
            Decision::Completed => Some((EventType::Normal, "WarmupCompleted")),
            Decision::Held => Some((EventType::Warning, "WarmupHeld")),
            Decision::SteppedBack => Some((EventType::Warning, "WarmupSteppedBack")),
            Decision::Paused => Some((EventType::Warning, "WarmupPaused")),
            Decision::IdleReset => Some((EventType::Normal, "WarmupIdleReset")),
            Decision::Stayed | Decision::Frozen => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Decision::Advanced => "advanced",
            Decision::Completed => "warm",
            Decision::Stayed => "stayed",
            Decision::Held => "held",
            Decision::SteppedBack => "steppedBack",
            Decision::Paused => "paused",
            Decision::IdleReset => "idleReset",
            Decision::Frozen => "frozen",
        }
    }
}

fn stage_count(plan: &WarmupPlanSpec) -> i32 {
    i32::try_from(plan.stages.len()).unwrap_or(i32::MAX).max(1)
}

/// The stage an address is in, clamped to the plan (stages may have been removed).
fn stage_index(plan: &WarmupPlanSpec, a: &AddressWarmup) -> usize {
    let n = plan.stages.len().max(1);
    usize::try_from(a.stage.max(1)).unwrap_or(1).min(n) - 1
}

/// Messages the address may send in its current window; 0 means no limit (warm).
pub fn limit_of(plan: &WarmupPlanSpec, a: &AddressWarmup) -> i64 {
    if a.state == WarmupState::Warm {
        return 0;
    }
    plan.stages
        .get(stage_index(plan, a))
        .map_or(0, |s| s.daily_limit)
}

fn pct(r: f64) -> String {
    let p = r * 100.0;
    if p == 0.0 || p >= 10.0 {
        format!("{p:.0}%")
    } else {
        format!("{p:.2}%")
    }
}

/// The gates the window breached, for people.
fn breaches(plan: &WarmupPlanSpec, w: &WindowFigures) -> Vec<String> {
    let g = &plan.gates;
    let mut out = Vec::new();
    if w.attempted == 0 && w.complaints == 0 {
        return out;
    }
    if w.bounce_rate() > g.max_hard_bounce_rate {
        out.push(format!(
            "hard-bounce rate {} > {} ({} of {})",
            pct(w.bounce_rate()),
            pct(g.max_hard_bounce_rate),
            w.hard_bounces,
            w.attempted
        ));
    }
    if w.complaint_rate() > g.max_complaint_rate {
        out.push(format!(
            "complaint rate {} > {} ({} of {} delivered)",
            pct(w.complaint_rate()),
            pct(g.max_complaint_rate),
            w.complaints,
            w.delivered
        ));
    }
    if w.deferral_rate() > g.max_deferral_rate {
        out.push(format!(
            "deferral rate {} > {} ({} of {})",
            pct(w.deferral_rate()),
            pct(g.max_deferral_rate),
            w.deferred,
            w.attempted
        ));
    }
    out
}

/// A new address: stage 1 (or `stage`), a window starting now with the current counters as
/// its base.
pub fn new_address(
    pool: &str,
    address: &str,
    now: Timestamp,
    base: WindowCounters,
) -> AddressWarmup {
    AddressWarmup {
        address: address.to_string(),
        pool: pool.to_string(),
        stage: 1,
        day: 0,
        state: WarmupState::Warming,
        limit: 0,
        sent: 0,
        deferred_by_warmup: 0,
        bounce_rate: 0.0,
        complaint_rate: 0.0,
        deferral_rate: 0.0,
        last_decision: Some("started at stage 1".to_string()),
        last_advanced: None,
        window_start: Some(Time(now)),
        window_base: base,
        idle_windows: 0,
        listed_on: Vec::new(),
        state_before_quarantine: None,
    }
}

/// Closes one window of an address with its figures `w`, ending at `end`: updates the
/// address and says what was decided. `last_decision` explains it.
pub fn close_window(
    plan: &WarmupPlanSpec,
    a: &mut AddressWarmup,
    w: &WindowFigures,
    end: Timestamp,
) -> Decision {
    a.stage = a.stage.clamp(1, stage_count(plan));
    a.sent = 0;
    a.deferred_by_warmup = 0;
    if matches!(a.state, WarmupState::Paused | WarmupState::Quarantined) {
        return Decision::Frozen;
    }
    if w.attempted == 0 && w.complaints == 0 {
        a.idle_windows = a.idle_windows.saturating_add(1);
        a.day = a.day.saturating_add(1);
        let reset = plan.idle_reset_stage.clamp(1, stage_count(plan));
        if plan.idle_reset_days > 0
            && a.idle_windows >= plan.idle_reset_days
            && (a.stage > reset || a.state == WarmupState::Warm)
        {
            a.last_decision = Some(format!(
                "idle for {} windows: back to stage {reset}",
                a.idle_windows
            ));
            a.stage = reset;
            a.day = 0;
            a.state = WarmupState::Warming;
            return Decision::IdleReset;
        }
        if a.state != WarmupState::Warm {
            a.last_decision = Some(format!(
                "stays at stage {}: sent nothing (idle {} window(s))",
                a.stage, a.idle_windows
            ));
        }
        return Decision::Stayed;
    }
    a.idle_windows = 0;
    a.bounce_rate = w.bounce_rate();
    a.complaint_rate = w.complaint_rate();
    a.deferral_rate = w.deferral_rate();
    let breached = breaches(plan, w);
    if !breached.is_empty() {
        let why = breached.join(", ");
        return match plan.on_breach.action {
            BreachAction::Hold => {
                a.day = a.day.saturating_add(1);
                a.state = WarmupState::Held;
                a.last_decision = Some(format!("held at stage {}: {why}", a.stage));
                Decision::Held
            }
            BreachAction::StepBack => {
                let to = (a.stage - plan.on_breach.step_back_stages.max(1)).max(1);
                a.last_decision = Some(format!(
                    "stepped back from stage {} to {to}: {why}",
                    a.stage
                ));
                a.stage = to;
                a.day = 0;
                a.state = WarmupState::Held;
                Decision::SteppedBack
            }
            BreachAction::Pause => {
                a.state = WarmupState::Paused;
                a.last_decision = Some(format!(
                    "paused at stage {}: {why}; resume with the {RESUME_ANNOTATION} annotation",
                    a.stage
                ));
                Decision::Paused
            }
        };
    }
    a.day = a.day.saturating_add(1);
    if a.state == WarmupState::Warm {
        a.last_decision = Some("warm: the last window passed every gate".to_string());
        return Decision::Stayed;
    }
    a.state = WarmupState::Warming;
    let stage = &plan.stages[stage_index(plan, a)];
    let minimum = (plan.gates.min_sent_share * stage.daily_limit as f64).ceil() as i64;
    if w.attempted < minimum {
        a.last_decision = Some(format!(
            "stays at stage {}: sent {} of the {minimum} needed to advance",
            a.stage, w.attempted
        ));
        return Decision::Stayed;
    }
    if a.day < stage.min_days {
        a.last_decision = Some(format!(
            "stays at stage {}: window {} of {} required",
            a.stage, a.day, stage.min_days
        ));
        return Decision::Stayed;
    }
    let rates = format!(
        "sent {}, hard bounces {}, complaints {}, deferrals {}",
        w.attempted,
        pct(a.bounce_rate),
        pct(a.complaint_rate),
        pct(a.deferral_rate)
    );
    a.last_advanced = Some(Time(end));
    a.day = 0;
    if a.stage >= stage_count(plan) {
        a.state = WarmupState::Warm;
        a.last_decision = Some(format!("warm: passed the last stage ({rates})"));
        return Decision::Completed;
    }
    a.stage += 1;
    a.last_decision = Some(format!(
        "advanced to stage {} (limit {}): all gates held ({rates})",
        a.stage,
        plan.stages[stage_index(plan, a)].daily_limit
    ));
    Decision::Advanced
}

// ---------------------------------------------------------------------------------------------
// What the relays get

/// The state of an assigned address of `pool` under warm-up: the plan's verdict, stage one
/// for an address the engine has not seen yet, and paused (fail closed) when the referenced
/// plan does not exist. Without a plan reference every address is warm.
pub fn address_state(
    pool: &RelayPool,
    plan: Option<&WarmupPlan>,
    address: &str,
) -> (AddressState, Option<String>) {
    let Some(plan_ref) = &pool.spec.warmup_plan_ref else {
        return (AddressState::Warm, None);
    };
    let Some(plan) = plan else {
        return (
            AddressState::Paused,
            Some(format!(
                "warm-up plan {} not found: the address sends nothing until it exists",
                plan_ref.name
            )),
        );
    };
    match entry(plan, &pool.name_any(), address) {
        Some(a) => (
            match a.state {
                WarmupState::Warming => AddressState::Warming,
                WarmupState::Warm => AddressState::Warm,
                WarmupState::Held => AddressState::Held,
                WarmupState::Paused => AddressState::Paused,
                WarmupState::Quarantined => AddressState::Quarantined,
            },
            a.last_decision.clone(),
        ),
        None => (AddressState::Warming, Some("starts at stage 1".to_string())),
    }
}

fn entry<'a>(plan: &'a WarmupPlan, pool: &str, address: &str) -> Option<&'a AddressWarmup> {
    plan.status
        .as_ref()?
        .addresses
        .iter()
        .find(|a| a.pool == pool && a.address == address)
}

/// The quotas of one address of `pool` (none when it is warm or the pool has no plan).
pub fn quotas(
    pool: &RelayPool,
    plan: Option<&WarmupPlan>,
    address: &str,
    now: Timestamp,
) -> Vec<pb::AddressQuota> {
    let Some(plan) = plan else {
        return Vec::new();
    };
    if pool.spec.warmup_plan_ref.is_none() {
        return Vec::new();
    }
    let spec = &plan.spec;
    let Ok(window) = parse_duration(&spec.window) else {
        return Vec::new();
    };
    let fresh;
    let a = match entry(plan, &pool.name_any(), address) {
        Some(a) => a,
        None => {
            fresh = new_address(&pool.name_any(), address, now, WindowCounters::default());
            &fresh
        }
    };
    if a.state == WarmupState::Warm {
        return Vec::new();
    }
    let Some(stage) = spec.stages.get(stage_index(spec, a)) else {
        return Vec::new();
    };
    let start = a.window_start.as_ref().map_or(now, |t| t.0).as_second();
    let q = |group: &str, window_limit: i64, hourly: Option<i64>| pb::AddressQuota {
        address: address.to_string(),
        provider_group: group.to_string(),
        window_limit: u64::try_from(window_limit).unwrap_or(0),
        hourly_limit: hourly.and_then(|h| u64::try_from(h).ok()).unwrap_or(0),
        window_start_unix: start,
        window_seconds: window.as_secs().max(1),
        overflow_to_warm: spec.overflow == OverflowPolicy::WarmAddresses,
    };
    let mut out = vec![q("", stage.daily_limit, stage.hourly_limit)];
    for p in &stage.provider_limits {
        out.push(q(p.group.as_str(), p.daily_limit, None));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The controller

/// What every reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub clock: Clock,
}

impl Context {
    async fn event(&self, plan: &WarmupPlan, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Warmup".to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &plan.object_ref(&())).await {
            tracing::debug!(error = %e, reason, "cannot publish an event");
        }
    }
}

fn key(plan: &WarmupPlan) -> String {
    format!(
        "{}/{}",
        plan.namespace().unwrap_or_default(),
        plan.name_any()
    )
}

fn resume_targets(plan: &WarmupPlan) -> Option<BTreeSet<String>> {
    let v = plan.annotations().get(RESUME_ANNOTATION)?;
    Some(
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    )
}

#[tracing::instrument(name = "reconcile", skip_all, fields(controller = CONTROLLER, plan = %key(&plan)))]
async fn reconcile(plan: Arc<WarmupPlan>, ctx: Arc<Context>) -> Result<Action, WarmupError> {
    let started = Instant::now();
    let result = evaluate(&plan, &ctx).await;
    ctx.metrics
        .reconciled(CONTROLLER, result.is_ok(), started.elapsed());
    result
}

async fn evaluate(plan: &WarmupPlan, ctx: &Context) -> Result<Action, WarmupError> {
    let ns = plan.namespace().unwrap_or_default();
    let name = plan.name_any();
    let spec = &plan.spec;
    let now = (ctx.clock)();
    let window = parse_duration(&spec.window).map_err(|e| WarmupError::Window {
        window: spec.window.clone(),
        reason: e.to_string(),
    })?;
    let window = SignedDuration::try_from(window.max(Duration::from_millis(100))).map_err(|e| {
        WarmupError::Window {
            window: spec.window.clone(),
            reason: e.to_string(),
        }
    })?;
    // Reports reach the pool's status a moment after the fact: close a window only once the
    // last of its reports had time to arrive.
    let grace = (window / 20).min(SignedDuration::from_secs(5));

    let pools_api: Api<RelayPool> = Api::namespaced(ctx.client.clone(), &ns);
    let mut pools: Vec<RelayPool> = pools_api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.spec
                .warmup_plan_ref
                .as_ref()
                .is_some_and(|r| r.name == name)
                && p.metadata.deletion_timestamp.is_none()
        })
        .collect();
    pools.sort_by_key(|p| p.name_any());

    let old_status = plan.status.clone().unwrap_or_default();
    let mut previous: BTreeMap<(String, String), AddressWarmup> = old_status
        .addresses
        .iter()
        .map(|a| ((a.pool.clone(), a.address.clone()), a.clone()))
        .collect();
    let mut events: Vec<(EventType, &'static str, String)> = Vec::new();
    let mut entries = Vec::new();
    let mut next_due: Option<Timestamp> = None;
    for pool in &pools {
        let pool_name = pool.name_any();
        let Some(status) = &pool.status else { continue };
        let counters: BTreeMap<&str, WindowCounters> = status
            .counters
            .iter()
            .map(|c| (c.address.as_str(), counters_of(c)))
            .collect();
        for row in &status.addresses {
            let current = counters
                .get(row.address.as_str())
                .cloned()
                .unwrap_or_default();
            let mut a = match previous.remove(&(pool_name.clone(), row.address.clone())) {
                Some(a) => a,
                None => {
                    let a = new_address(&pool_name, &row.address, now, current.clone());
                    events.push((
                        EventType::Normal,
                        "WarmupStarted",
                        format!(
                            "{} of pool {pool_name} starts warming at stage 1 (limit {} per {})",
                            row.address,
                            spec.stages.first().map_or(0, |s| s.daily_limit),
                            spec.window
                        ),
                    ));
                    a
                }
            };
            let start = a.window_start.as_ref().map_or(now, |t| t.0);
            let elapsed = now.duration_since(start);
            let windows = if elapsed >= window + grace || elapsed >= window * 2 {
                i64::try_from(elapsed.as_nanos() / window.as_nanos()).unwrap_or(i64::MAX)
            } else {
                0
            };
            if windows > 0 {
                let w = WindowFigures::between(&a.window_base, &current);
                let mut end = start.checked_add(window).unwrap_or(now);
                let mut decisions = vec![close_window(spec, &mut a, &w, end)];
                for _ in 1..windows.min(MAX_WINDOWS_PER_PASS) {
                    end = end.checked_add(window).unwrap_or(now);
                    decisions.push(close_window(spec, &mut a, &WindowFigures::default(), end));
                }
                for d in decisions {
                    ctx.metrics
                        .count("warmup_decisions_total", &[("decision", d.label())]);
                    if let (Some((type_, reason)), Some(why)) = (d.event(), &a.last_decision) {
                        events.push((type_, reason, format!("{}: {why}", row.address)));
                    }
                }
                let advanced = window
                    .checked_mul(i32::try_from(windows).unwrap_or(i32::MAX))
                    .unwrap_or(SignedDuration::MAX);
                a.window_start = Some(Time(start.checked_add(advanced).unwrap_or(now)));
                a.window_base = current.clone();
            }
            let live = WindowFigures::between(&a.window_base, &current);
            a.sent = live.attempted;
            a.deferred_by_warmup = live.deferred_by_warmup;
            a.limit = limit_of(spec, &a);
            if let Some(start) = a.window_start.as_ref().map(|t| t.0)
                && let Ok(due) = start.checked_add(window + grace)
            {
                next_due = Some(next_due.map_or(due, |n| n.min(due)));
            }
            entries.push(a);
        }
    }
    for gone in previous.values() {
        tracing::info!(address = %gone.address, pool = %gone.pool, "address left the plan");
    }

    // Resumes asked for by annotation.
    let resume = resume_targets(plan);
    if let Some(targets) = &resume {
        for a in entries.iter_mut() {
            let wanted = targets.contains("all") || targets.contains(&a.address);
            if wanted && a.state == WarmupState::Paused {
                a.state = WarmupState::Warming;
                a.day = 0;
                a.last_decision = Some(format!("resumed at stage {} by annotation", a.stage));
                events.push((
                    EventType::Normal,
                    "WarmupResumed",
                    format!("{} resumed at stage {}", a.address, a.stage),
                ));
            } else if wanted
                && a.state == WarmupState::Quarantined
                && a.state_before_quarantine == Some(WarmupState::Paused)
            {
                a.state_before_quarantine = Some(WarmupState::Warming);
            }
        }
    }

    // Blocklists.
    let mut conditions = old_status.conditions.clone();
    let mut last_check = old_status.last_blocklist_check.clone();
    let generation = plan.metadata.generation;
    if let Some(bl) = &spec.blocklists {
        let interval = parse_duration(&bl.interval)
            .ok()
            .and_then(|d| SignedDuration::try_from(d.max(Duration::from_secs(1))).ok())
            .unwrap_or(SignedDuration::from_hours(1));
        let due = last_check
            .as_ref()
            .and_then(|t| t.0.checked_add(interval).ok())
            .is_none_or(|t| t <= now);
        if due {
            let addresses: Vec<String> = entries.iter().map(|a| a.address.clone()).collect();
            match blocklist::check(&bl.zones, &bl.nameservers, &addresses).await {
                Ok(listings) => {
                    for a in entries.iter_mut() {
                        let listed: Vec<String> =
                            listings.get(&a.address).cloned().unwrap_or_default();
                        apply_listing(a, listed, &mut events);
                    }
                    set_condition(
                        &mut conditions,
                        CONDITION_BLOCKLISTS,
                        ConditionStatus::True,
                        "Checked",
                        &format!(
                            "{} address(es) checked against {} zone(s)",
                            addresses.len(),
                            bl.zones.len()
                        ),
                        generation,
                        Time(now),
                    );
                    last_check = Some(Time(now));
                }
                Err(e) => {
                    tracing::warn!(plan = %key(plan), error = %e, "blocklist check failed; listings unchanged");
                    set_condition(
                        &mut conditions,
                        CONDITION_BLOCKLISTS,
                        ConditionStatus::False,
                        "LookupFailed",
                        &format!("{e}; listings unchanged, retrying"),
                        generation,
                        Time(now),
                    );
                    last_check = Some(Time(now));
                }
            }
        }
        if let Some(t) = last_check.as_ref()
            && let Ok(due) = t.0.checked_add(interval)
        {
            next_due = Some(next_due.map_or(due, |n| n.min(due)));
        }
    } else {
        conditions.retain(|c| c.type_ != CONDITION_BLOCKLISTS);
        last_check = None;
    }

    // Status.
    let count = |s: &[WarmupState]| {
        i32::try_from(entries.iter().filter(|a| s.contains(&a.state)).count()).unwrap_or(0)
    };
    let warming = count(&[WarmupState::Warming]);
    let warm = count(&[WarmupState::Warm]);
    let held = count(&[
        WarmupState::Held,
        WarmupState::Paused,
        WarmupState::Quarantined,
    ]);
    let summary = summary(spec, &entries, next_due.map(|d| d.duration_since(now)));
    let message = if pools.is_empty() {
        "no RelayPool references this plan".to_string()
    } else {
        format!("{} address(es) of {} pool(s)", entries.len(), pools.len())
    };
    set_condition(
        &mut conditions,
        CONDITION_READY,
        ConditionStatus::True,
        if pools.is_empty() {
            "Unused"
        } else {
            "Applied"
        },
        &message,
        generation,
        Time(now),
    );
    // The plan itself is applied at once; its addresses' progress is in status, not a
    // reason to hold GitOps tools for the weeks a warm-up takes.
    set_reconciling(
        &mut conditions,
        true,
        "Applied",
        &message,
        generation,
        Time(now),
    );
    publish_gauges(&ctx.metrics, &ns, &name, &entries);
    let status = WarmupPlanStatus {
        observed_generation: generation,
        stage_count: stage_count(spec),
        address_count: i32::try_from(entries.len()).unwrap_or(0),
        warming,
        warm,
        held,
        summary: Some(summary),
        last_blocklist_check: last_check,
        conditions,
        addresses: entries,
    };
    if plan.status.as_ref() != Some(&status) {
        let api: Api<WarmupPlan> = Api::namespaced(ctx.client.clone(), &ns);
        let doc = json!({
            "apiVersion": "mailfleet.dev/v1alpha1",
            "kind": "WarmupPlan",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&doc),
        )
        .await?;
    }
    if resume.is_some() {
        let api: Api<WarmupPlan> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"metadata": {"annotations": {RESUME_ANNOTATION: null}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    for (type_, reason, note) in events {
        ctx.event(plan, type_, reason, note).await;
    }
    // Due already (a negative wait) means as soon as allowed.
    let wait = next_due
        .map(|d| Duration::try_from(d.duration_since(now)).unwrap_or(Duration::ZERO))
        .unwrap_or(Duration::from_secs(300))
        .clamp(Duration::from_millis(200), Duration::from_secs(300));
    Ok(Action::requeue(wait))
}

/// Moves an address into or out of quarantine after a blocklist check.
fn apply_listing(
    a: &mut AddressWarmup,
    listed: Vec<String>,
    events: &mut Vec<(EventType, &'static str, String)>,
) {
    let was = a.state == WarmupState::Quarantined;
    if !listed.is_empty() && !was {
        a.state_before_quarantine = Some(a.state);
        a.state = WarmupState::Quarantined;
        a.last_decision = Some(format!(
            "quarantined: listed on {}; out of rotation until delisted",
            listed.join(", ")
        ));
        events.push((
            EventType::Warning,
            "AddressQuarantined",
            format!(
                "{} is listed on {}: out of rotation until delisted",
                a.address,
                listed.join(", ")
            ),
        ));
    } else if listed.is_empty() && was {
        a.state = a
            .state_before_quarantine
            .take()
            .unwrap_or(WarmupState::Warming);
        a.last_decision = Some(format!(
            "delisted from {}: back in rotation at stage {}",
            a.listed_on.join(", "),
            a.stage
        ));
        events.push((
            EventType::Normal,
            "AddressDelisted",
            format!(
                "{} is no longer listed on {}: back in rotation",
                a.address,
                a.listed_on.join(", ")
            ),
        ));
    }
    a.listed_on = listed;
}

/// One line for `kubectl get warmupplans`.
fn summary(
    spec: &WarmupPlanSpec,
    entries: &[AddressWarmup],
    next: Option<SignedDuration>,
) -> String {
    if entries.is_empty() {
        return "no addresses".to_string();
    }
    let n = stage_count(spec);
    let warming: Vec<i32> = entries
        .iter()
        .filter(|a| a.state != WarmupState::Warm)
        .map(|a| a.stage)
        .collect();
    let mut out = match (warming.iter().min(), warming.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => format!("stage {lo} of {n}"),
        (Some(lo), Some(hi)) => format!("stages {lo}-{hi} of {n}"),
        _ => "all warm".to_string(),
    };
    // Between a window's end and its evaluation (a short grace for late reports), the relays
    // already send in the next window: the figures would mix two windows.
    let ended = next.is_some_and(|n| n.as_secs() <= 0) && !warming.is_empty();
    if ended {
        out.push_str("; window ended, evaluating");
        return out;
    }
    let sent: i64 = entries.iter().map(|a| a.sent).sum();
    let limit: i64 = entries.iter().map(|a| a.limit).sum();
    if limit > 0 {
        out.push_str(&format!("; window {sent}/{limit} sent"));
    }
    if let Some(next) = next
        && !warming.is_empty()
    {
        out.push_str(&format!("; next window in {}", human(next)));
    }
    out
}

fn human(d: SignedDuration) -> String {
    let s = d.as_secs().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn state_name(s: WarmupState) -> &'static str {
    match s {
        WarmupState::Warming => "warming",
        WarmupState::Warm => "warm",
        WarmupState::Held => "held",
        WarmupState::Paused => "paused",
        WarmupState::Quarantined => "quarantined",
    }
}

fn publish_gauges(metrics: &Metrics, ns: &str, plan: &str, entries: &[AddressWarmup]) {
    let owner = [("namespace", ns), ("plan", plan)];
    let per = |f: &dyn Fn(&AddressWarmup) -> f64| {
        entries
            .iter()
            .map(|a| {
                (
                    vec![
                        ("namespace", ns),
                        ("plan", plan),
                        ("pool", a.pool.as_str()),
                        ("address", a.address.as_str()),
                    ],
                    f(a),
                )
            })
            .collect::<Vec<_>>()
    };
    metrics.set_gauges("warmup_stage", &owner, per(&|a| f64::from(a.stage)));
    metrics.set_gauges("warmup_limit", &owner, per(&|a| a.limit as f64));
    metrics.set_gauges("warmup_sent", &owner, per(&|a| a.sent as f64));
    let states = [
        WarmupState::Warming,
        WarmupState::Warm,
        WarmupState::Held,
        WarmupState::Paused,
        WarmupState::Quarantined,
    ];
    metrics.set_gauges(
        "warmup_addresses",
        &owner,
        states
            .iter()
            .map(|s| {
                (
                    vec![("namespace", ns), ("plan", plan), ("state", state_name(*s))],
                    entries.iter().filter(|a| a.state == *s).count() as f64,
                )
            })
            .collect(),
    );
}

fn error_policy(plan: Arc<WarmupPlan>, error: &WarmupError, ctx: Arc<Context>) -> Action {
    ctx.metrics.count(
        "reconcile_errors_total",
        &[("controller", CONTROLLER), ("category", error.category())],
    );
    tracing::warn!(plan = %key(&plan), error = %error, "warm-up evaluation failed; retrying");
    let note = format!("{error}; retrying in 5s");
    tokio::spawn(async move {
        ctx.event(&plan, EventType::Warning, "EvaluationFailed", note)
            .await;
    });
    Action::requeue(Duration::from_secs(5))
}

/// Runs the engine in one namespace (or all, with `None`) until `shutdown` fires.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = &ctx.client;
    let (plans, pools): (Api<WarmupPlan>, Api<RelayPool>) = match namespace.as_deref() {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    // Pool status changes with every batch of relay reports: debounce them into one pass.
    Controller::new(plans, watcher::Config::default())
        .with_config(
            kube::runtime::controller::Config::default()
                .debounce(Duration::from_millis(500))
                .concurrency(crate::RECONCILE_CONCURRENCY),
        )
        .watches(pools, watcher::Config::default(), |pool| {
            let plan = pool.spec.warmup_plan_ref.as_ref()?;
            Some(ObjectRef::new(&plan.name).within(pool.metadata.namespace.as_deref()?))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use mailfleet_api::warmupplan::{BreachPolicy, WarmupGates, WarmupStage};

    fn plan(limits: &[i64], action: BreachAction) -> WarmupPlanSpec {
        WarmupPlanSpec {
            stages: limits
                .iter()
                .map(|l| WarmupStage {
                    daily_limit: *l,
                    hourly_limit: None,
                    min_days: 2,
                    provider_limits: Vec::new(),
                })
                .collect(),
            gates: WarmupGates::default(),
            on_breach: BreachPolicy {
                action,
                step_back_stages: 2,
            },
            overflow: OverflowPolicy::Queue,
            window: "24h".into(),
            idle_reset_days: 3,
            idle_reset_stage: 1,
            blocklists: None,
        }
    }

    fn clean(sent: i64) -> WindowFigures {
        WindowFigures {
            attempted: sent,
            delivered: sent,
            ..WindowFigures::default()
        }
    }

    fn day(n: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + n * 86_400).unwrap()
    }

    #[test]
    fn a_thirty_day_clean_ramp_reaches_warm() {
        let limits = [50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600];
        let spec = plan(&limits, BreachAction::Hold);
        let mut a = new_address("p", "192.0.2.1", day(0), WindowCounters::default());
        let mut reached = None;
        for d in 1..=30 {
            // Send exactly the limit each day, as a busy sender would.
            let sent = limit_of(&spec, &a).max(1);
            let decision = close_window(&spec, &mut a, &clean(sent), day(d));
            if decision == Decision::Completed {
                reached = Some(d);
            }
        }
        // Ten stages of two windows each: warm at the end of day 20, and stays warm.
        assert_eq!(reached, Some(20));
        assert_eq!(a.state, WarmupState::Warm);
        assert_eq!(limit_of(&spec, &a), 0);
        assert_eq!(a.stage, 10);
    }

    #[test]
    fn the_summary_never_mixes_two_windows() {
        let spec = plan(&[100, 200], BreachAction::Hold);
        let mut a = new_address("p", "192.0.2.1", day(0), WindowCounters::default());
        a.limit = limit_of(&spec, &a);
        a.sent = 40;
        let entries = vec![a];
        assert_eq!(
            summary(&spec, &entries, Some(SignedDuration::from_secs(3600))),
            "stage 1 of 2; window 40/100 sent; next window in 1h00m"
        );
        // Past the window's end, before its evaluation: relays already count the next one.
        for next in [0, -2] {
            assert_eq!(
                summary(&spec, &entries, Some(SignedDuration::from_secs(next))),
                "stage 1 of 2; window ended, evaluating"
            );
        }
    }

    #[test]
    fn too_little_sent_or_too_few_days_does_not_advance() {
        let spec = plan(&[100, 200], BreachAction::Hold);
        let mut a = new_address("p", "192.0.2.1", day(0), WindowCounters::default());
        assert_eq!(
            close_window(&spec, &mut a, &clean(100), day(1)),
            Decision::Stayed
        );
        assert!(
            a.last_decision
                .as_deref()
                .unwrap()
                .contains("window 1 of 2")
        );
        // Half of 100 is the default minimum share: 49 is not enough.
        assert_eq!(
            close_window(&spec, &mut a, &clean(49), day(2)),
            Decision::Stayed
        );
        assert!(
            a.last_decision
                .as_deref()
                .unwrap()
                .contains("sent 49 of the 50")
        );
        assert_eq!(
            close_window(&spec, &mut a, &clean(50), day(3)),
            Decision::Advanced
        );
        assert_eq!(a.stage, 2);
        assert_eq!(a.day, 0);
    }

    #[test]
    fn a_bounce_spike_holds_and_a_step_back_policy_steps_back() {
        let spike = WindowFigures {
            attempted: 100,
            delivered: 80,
            hard_bounces: 20,
            ..WindowFigures::default()
        };
        let spec = plan(&[10, 20, 40, 80], BreachAction::Hold);
        let mut a = new_address("p", "192.0.2.1", day(0), WindowCounters::default());
        a.stage = 3;
        assert_eq!(close_window(&spec, &mut a, &spike, day(1)), Decision::Held);
        assert_eq!((a.stage, a.state), (3, WarmupState::Held));
        assert!(
            a.last_decision
                .as_deref()
                .unwrap()
                .contains("hard-bounce rate 20% > 2.00%")
        );
        assert!((a.bounce_rate - 0.2).abs() < 1e-9);
        // A clean window ends the hold.
        close_window(&spec, &mut a, &clean(40), day(2));
        assert_eq!(a.state, WarmupState::Warming);

        let spec = plan(&[10, 20, 40, 80], BreachAction::StepBack);
        let mut b = new_address("p", "192.0.2.2", day(0), WindowCounters::default());
        b.stage = 4;
        assert_eq!(
            close_window(&spec, &mut b, &spike, day(1)),
            Decision::SteppedBack
        );
        assert_eq!((b.stage, b.state), (2, WarmupState::Held));
        assert_eq!(limit_of(&spec, &b), 20);
    }

    #[test]
    fn complaints_pause_until_resumed_and_paused_addresses_are_frozen() {
        let spec = plan(&[100, 200], BreachAction::Pause);
        let mut a = new_address("p", "192.0.2.1", day(0), WindowCounters::default());
        let w = WindowFigures {
            complaints: 1,
            ..clean(100)
        };
        assert_eq!(close_window(&spec, &mut a, &w, day(1)), Decision::Paused);
        assert_eq!(a.state, WarmupState::Paused);
        assert!(
            a.last_decision
                .as_deref()
                .unwrap()
                .contains("complaint rate 1.00% > 0.08%")
        );
        for d in 2..10 {
            assert_eq!(
                close_window(&spec, &mut a, &clean(100), day(d)),
                Decision::Frozen
            );
        }
        assert_eq!((a.stage, a.state), (1, WarmupState::Paused));
    }

    #[test]
    fn an_idle_address_falls_back() {
        let spec = plan(&[100, 200, 300], BreachAction::Hold);
        let mut a = new_address("p", "192.0.2.1", day(0), WindowCounters::default());
        a.stage = 3;
        a.state = WarmupState::Warm;
        let idle = WindowFigures::default();
        assert_eq!(close_window(&spec, &mut a, &idle, day(1)), Decision::Stayed);
        assert_eq!(close_window(&spec, &mut a, &idle, day(2)), Decision::Stayed);
        assert_eq!(
            close_window(&spec, &mut a, &idle, day(3)),
            Decision::IdleReset
        );
        assert_eq!((a.stage, a.state), (1, WarmupState::Warming));
        assert_eq!(limit_of(&spec, &a), 100);
    }

    #[test]
    fn window_figures_are_differences_of_cumulative_counters() {
        let base = WindowCounters {
            delivered: 10,
            deferred: 2,
            hard_bounces: 1,
            ..WindowCounters::default()
        };
        let now = WindowCounters {
            delivered: 25,
            deferred: 7,
            hard_bounces: 1,
            complaints: 1,
            ..WindowCounters::default()
        };
        let w = WindowFigures::between(&base, &now);
        assert_eq!(
            (w.attempted, w.delivered, w.deferred, w.complaints),
            (20, 15, 5, 1)
        );
        // Counters that went back (the pool was recreated) count from zero.
        let w = WindowFigures::between(&now, &base);
        assert_eq!(w.attempted, 13);
    }

    #[test]
    fn quarantine_and_delisting_restore_the_state() {
        let mut a = new_address("p", "192.0.2.1", day(0), WindowCounters::default());
        a.state = WarmupState::Held;
        let mut events = Vec::new();
        apply_listing(&mut a, vec!["bl.example.test".into()], &mut events);
        assert_eq!(a.state, WarmupState::Quarantined);
        assert_eq!(events[0].1, "AddressQuarantined");
        apply_listing(&mut a, Vec::new(), &mut events);
        assert_eq!(a.state, WarmupState::Held);
        assert_eq!(events[1].1, "AddressDelisted");
        assert!(a.listed_on.is_empty());
    }
}
