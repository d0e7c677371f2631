//! `WarmupPlan`: how fast a new egress address may send, and what lets it go faster.
//!
//! The warm-up engine (crates/operator) evaluates each address of the pools that reference a
//! plan once per window, from the delivery reports of the relays, and pushes the resulting
//! quotas back to the relays over the coordinator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::ProviderGroup;

/// Condition type: the plan is valid and being applied.
pub const CONDITION_READY: &str = "Ready";

/// A warm-up schedule for new egress addresses: per-address limits stage by stage, the
/// delivery-quality gates an address must pass to advance, and what happens on a breach.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "mailfleet.dev",
    version = "v1alpha1",
    kind = "WarmupPlan",
    plural = "warmupplans",
    shortname = "wp",
    category = "mailfleet",
    namespaced,
    status = "WarmupPlanStatus",
    printcolumn = r#"{"name":"Stages","type":"integer","jsonPath":".status.stageCount"}"#,
    printcolumn = r#"{"name":"Addresses","type":"integer","jsonPath":".status.addressCount"}"#,
    printcolumn = r#"{"name":"Warming","type":"integer","jsonPath":".status.warming"}"#,
    printcolumn = r#"{"name":"Warm","type":"integer","jsonPath":".status.warm"}"#,
    printcolumn = r#"{"name":"Held","type":"integer","jsonPath":".status.held"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.onBreach.action != 'stepBack' || self.onBreach.stepBackStages < size(self.stages)").message("onBreach.stepBackStages must be smaller than the number of stages"))]
#[x_kube(validation = Rule::new("self.idleResetStage <= size(self.stages)").message("idleResetStage must name an existing stage (1 to the number of stages)"))]
pub struct WarmupPlanSpec {
    /// The stages, from a new address's first day to warm. Daily limits must strictly
    /// increase. An address that passes the gates of its last stage is warm.
    #[schemars(length(min = 1, max = 60))]
    #[x_kube(validation = Rule::new("self.map(s, s.dailyLimit).isSorted() && self.all(s, self.filter(t, t.dailyLimit == s.dailyLimit).size() == 1)").message("stage daily limits must strictly increase from one stage to the next"))]
    pub stages: Vec<WarmupStage>,

    /// Delivery-quality gates an address must pass at the end of a window to advance.
    #[serde(default)]
    pub gates: WarmupGates,

    /// What happens to an address whose window breaches a gate.
    #[serde(default)]
    pub on_breach: BreachPolicy,

    /// What happens to mail above an address's limit: `queue` (wait for the next window) or
    /// `warmAddresses` (send it from warm addresses of the pool, if any).
    #[serde(default)]
    pub overflow: OverflowPolicy,

    /// Length of an evaluation window (a warm-up "day").
    #[serde(default = "default_window")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub window: String,

    /// An address that sent nothing for this many windows falls back to `idleResetStage`
    /// (receivers forget an idle address's reputation after about 30 days). 0 disables.
    #[serde(default = "default_idle_reset_days")]
    #[schemars(range(min = 0, max = 365))]
    pub idle_reset_days: i32,

    /// Stage (1-based) an idle address falls back to.
    #[serde(default = "default_idle_reset_stage")]
    #[schemars(range(min = 1, max = 60))]
    pub idle_reset_stage: i32,

    /// DNS blocklists (DNSBL zones) every address is checked against; a listed address is
    /// quarantined (sends nothing) until it is delisted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocklists: Option<BlocklistSpec>,
}

/// DNSBL checking.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlocklistSpec {
    /// DNSBL zones, e.g. `zen.spamhaus.org`: an address a.b.c.d is listed when
    /// `d.c.b.a.<zone>` has an A record in 127.0.0.0/8.
    #[schemars(length(min = 1, max = 20))]
    pub zones: Vec<String>,

    /// How often each address is checked.
    #[serde(default = "default_blocklist_interval")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub interval: String,

    /// DNS servers to ask (`host` or `host:port`); empty uses the operator's resolver
    /// configuration. Most DNSBLs refuse queries from large public resolvers: point this at
    /// your own recursive resolver.
    #[serde(default)]
    #[schemars(length(max = 4))]
    pub nameservers: Vec<String>,
}

fn default_blocklist_interval() -> String {
    "1h".to_owned()
}

fn default_window() -> String {
    "24h".to_owned()
}
fn default_idle_reset_days() -> i32 {
    30
}
fn default_idle_reset_stage() -> i32 {
    1
}

/// One warm-up stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.hourlyLimit) || self.hourlyLimit <= self.dailyLimit").message("hourlyLimit cannot exceed dailyLimit"))]
pub struct WarmupStage {
    /// Most messages one address may send per window in this stage.
    #[schemars(range(min = 1, max = 100_000_000))]
    pub daily_limit: i64,

    /// Most messages one address may send per hour in this stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub hourly_limit: Option<i64>,

    /// Windows an address stays in this stage at least, even if the gates hold.
    #[serde(default = "default_min_days")]
    #[schemars(range(min = 1, max = 90))]
    pub min_days: i32,

    /// Tighter per-window limits for some provider groups (for example Gmail).
    #[serde(default)]
    #[schemars(length(max = 7))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["group"]))]
    pub provider_limits: Vec<ProviderLimit>,
}

fn default_min_days() -> i32 {
    1
}

/// A per-provider-group limit within a stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderLimit {
    /// The provider group.
    pub group: ProviderGroup,
    /// Most messages one address may send to this group per window.
    #[schemars(range(min = 1, max = 100_000_000))]
    pub daily_limit: i64,
}

/// Gates. Defaults sit below what receivers act on (SES reviews at 5% bounces / 0.1%
/// complaints; Gmail wants spam below 0.1%).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmupGates {
    /// Highest hard-bounce rate (hard bounces / attempted) allowed to advance.
    #[serde(default = "default_max_bounce")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_hard_bounce_rate: f64,

    /// Highest complaint rate (feedback reports / delivered) allowed to advance.
    #[serde(default = "default_max_complaint")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_complaint_rate: f64,

    /// Highest deferral rate (temporary failures / attempted) allowed to advance.
    #[serde(default = "default_max_deferral")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_deferral_rate: f64,

    /// Smallest share of the stage's limit an address must actually send to advance (an idle
    /// address proves nothing).
    #[serde(default = "default_min_sent_share")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_sent_share: f64,
}

fn default_max_bounce() -> f64 {
    0.02
}
fn default_max_complaint() -> f64 {
    0.0008
}
fn default_max_deferral() -> f64 {
    0.15
}
fn default_min_sent_share() -> f64 {
    0.5
}

impl Default for WarmupGates {
    fn default() -> Self {
        WarmupGates {
            max_hard_bounce_rate: default_max_bounce(),
            max_complaint_rate: default_max_complaint(),
            max_deferral_rate: default_max_deferral(),
            min_sent_share: default_min_sent_share(),
        }
    }
}

/// Breach actions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BreachAction {
    /// Stay at the current stage until a clean window.
    #[default]
    Hold,
    /// Go back `stepBackStages` stages.
    StepBack,
    /// Stop sending from the address until a person resumes it.
    Pause,
}

/// What happens on a gate breach.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.action == 'stepBack' || !has(self.stepBackStages) || self.stepBackStages == 1").message("onBreach.stepBackStages is only used with action stepBack"))]
pub struct BreachPolicy {
    /// `hold` (default), `stepBack` or `pause`.
    #[serde(default)]
    pub action: BreachAction,
    /// Stages to go back with `stepBack`.
    #[serde(default = "default_step_back")]
    #[schemars(range(min = 1, max = 59))]
    pub step_back_stages: i32,
}

fn default_step_back() -> i32 {
    1
}

impl Default for BreachPolicy {
    fn default() -> Self {
        BreachPolicy {
            action: BreachAction::Hold,
            step_back_stages: default_step_back(),
        }
    }
}

/// Overflow policies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OverflowPolicy {
    /// Mail over the limit waits in the queue for the next window.
    #[default]
    Queue,
    /// Mail over the limit goes out from warm addresses of the pool; it waits when there are
    /// none.
    WarmAddresses,
}

/// Observed state of a WarmupPlan.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmupPlanStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of stages in the plan.
    #[serde(default)]
    pub stage_count: i32,
    /// Addresses governed by the plan.
    #[serde(default)]
    pub address_count: i32,
    /// Addresses still warming.
    #[serde(default)]
    pub warming: i32,
    /// Addresses that completed the plan.
    #[serde(default)]
    pub warm: i32,
    /// Addresses held, paused or quarantined.
    #[serde(default)]
    pub held: i32,
    /// One line for people, e.g. `stages 2-4 of 8; next advance in 6h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// When the blocklists were last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_blocklist_check: Option<Time>,
    /// Standard conditions: `Ready`, `Reconciling` (False once the plan is applied: address
    /// progress is in status, not a reason for GitOps tools to wait), and `BlocklistsChecked`
    /// when blocklists are configured.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Per-address progress.
    #[serde(default)]
    pub addresses: Vec<AddressWarmup>,
}

/// Warm-up states of an address.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WarmupState {
    /// Advancing through the stages.
    Warming,
    /// Completed the last stage.
    Warm,
    /// Kept at its stage after a breach.
    Held,
    /// Stopped until resumed.
    Paused,
    /// Listed on a blocklist.
    Quarantined,
}

/// Warm-up progress of one address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressWarmup {
    /// The egress address.
    pub address: String,
    /// The RelayPool that owns it.
    pub pool: String,
    /// Current stage, 1-based.
    pub stage: i32,
    /// Windows spent in the current stage.
    pub day: i32,
    /// State of the address.
    pub state: WarmupState,
    /// Limit of the current window.
    pub limit: i64,
    /// Messages sent (attempted) in the current window.
    pub sent: i64,
    /// Messages over the limit that warm-up deferred in the current window.
    #[serde(default)]
    pub deferred_by_warmup: i64,
    /// Hard-bounce rate of the last complete window.
    #[serde(default)]
    pub bounce_rate: f64,
    /// Complaint rate of the last complete window.
    #[serde(default)]
    pub complaint_rate: f64,
    /// Deferral rate of the last complete window.
    #[serde(default)]
    pub deferral_rate: f64,
    /// The last decision and why (for example "advanced to stage 3: all gates held").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<String>,
    /// When the address last advanced a stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_advanced: Option<Time>,
    /// Start of the current window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Time>,
    /// The address's cumulative delivery counters (RelayPool status) at the start of the
    /// current window: the window's figures are the difference, so an operator restart or a
    /// resent report never counts twice.
    #[serde(default)]
    pub window_base: WindowCounters,
    /// Complete windows in a row without a single attempt.
    #[serde(default)]
    pub idle_windows: i32,
    /// Blocklist zones that list the address now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listed_on: Vec<String>,
    /// The state to return to when the address is delisted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_before_quarantine: Option<WarmupState>,
}

/// Cumulative delivery counters of an address.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WindowCounters {
    #[serde(default)]
    pub delivered: i64,
    #[serde(default)]
    pub deferred: i64,
    #[serde(default)]
    pub hard_bounces: i64,
    #[serde(default)]
    pub policy_blocks: i64,
    #[serde(default)]
    pub complaints: i64,
    #[serde(default)]
    pub deferred_by_warmup: i64,
}
