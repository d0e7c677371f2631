//! `RelayPool`: a fleet of relays sharing egress addresses and delivery settings.
//!
//! The RelayPool controller (crates/operator) turns one RelayPool into a StatefulSet of relay
//! pods, assigns the pool's egress addresses to pod ordinals and records the assignment in
//! status. Relays receive everything else over the coordinator protocol.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{LocalObjectRef, ProviderGroup};

/// Condition type: every replica is ready and every assigned address is served.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: a rollout or scale operation is under way.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: the pool's egress addresses are assigned without conflict.
pub const CONDITION_EGRESS_ASSIGNED: &str = "EgressAssigned";

/// A pool of relay pods that send mail from their own egress IP addresses.
///
/// Applications submit mail to the pool's SMTP Service; each relay signs it with the sending
/// domain's DKIM keys and delivers it from an egress address that has warm-up quota left.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "mailfleet.dev",
    version = "v1alpha1",
    kind = "RelayPool",
    plural = "relaypools",
    shortname = "rp",
    category = "mailfleet",
    namespaced,
    status = "RelayPoolStatus",
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Addresses","type":"integer","jsonPath":".status.addressCount"}"#,
    printcolumn = r#"{"name":"Warming","type":"integer","jsonPath":".status.warming"}"#,
    printcolumn = r#"{"name":"Warm","type":"integer","jsonPath":".status.warm"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.egress.mode != 'ciliumEgressGateway' || size(self.egress.cidrs) > 0 || self.replicas <= size(self.egress.addresses)").message("in ciliumEgressGateway mode each relay pod owns exactly one address: replicas must not exceed the number of listed egress addresses"))]
pub struct RelayPoolSpec {
    /// Number of relay pods. Each pod owns a disjoint share of the egress addresses.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 256))]
    pub replicas: i32,

    /// Container image of the relay. Defaults to the operator's own image (one binary runs
    /// both), which keeps operator and relays on the same protocol version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Compute resources of each relay container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels a relay pod must match (for example nodes that carry the egress
    /// addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Affinity rules of the relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Extra annotations on relay pods, for example a Multus `k8s.v1.cni.cncf.io/networks`
    /// annotation that attaches the interface carrying the egress addresses in `bind` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,

    /// Run relay pods in the node's network namespace, so that they can bind addresses
    /// configured on the node (`bind` mode without Multus).
    #[serde(default)]
    pub host_network: bool,

    /// The persistent queue of each relay. Accepted mail lives here until delivered or
    /// bounced.
    #[serde(default)]
    pub spool: SpoolSpec,

    /// The egress IP addresses this pool sends from, and how they reach the pods.
    pub egress: EgressSpec,

    /// How applications submit mail to the relays.
    pub listener: ListenerSpec,

    /// Retries, queue lifetime and per-destination shaping.
    #[serde(default)]
    pub delivery: DeliverySpec,

    /// The WarmupPlan (same namespace) that limits how much each new address may send.
    /// Without one, every address is treated as warm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_plan_ref: Option<LocalObjectRef>,
}

fn default_replicas() -> i32 {
    2
}

/// The spool volume of each relay pod (a PersistentVolumeClaim per pod).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpoolSpec {
    /// StorageClass of the spool volumes. The cluster default class when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,

    /// Size of each spool volume, as a Kubernetes quantity (for example `10Gi`).
    #[serde(default = "default_spool_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"))]
    #[schemars(length(max = 32))]
    pub size: String,
}

fn default_spool_size() -> String {
    "10Gi".to_owned()
}

impl Default for SpoolSpec {
    fn default() -> Self {
        SpoolSpec {
            storage_class_name: None,
            size: default_spool_size(),
        }
    }
}

/// How egress addresses reach the relay pods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EgressMode {
    /// The relay binds each connection's source address itself. The platform must route the
    /// addresses to the pod (hostNetwork, a Multus interface, or a routed pod network). One pod
    /// may use many addresses and picks one per connection.
    #[default]
    Bind,
    /// The operator writes one CiliumEgressGatewayPolicy per relay pod, so that the pod's
    /// traffic leaves through exactly one egress address.
    CiliumEgressGateway,
}

/// The egress addresses of the pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.addresses) + size(self.cidrs) > 0").message("egress needs at least one address in addresses or cidrs"))]
#[x_kube(validation = Rule::new("self.mode != 'ciliumEgressGateway' || has(self.cilium)").message("egress.mode ciliumEgressGateway needs egress.cilium (the gateway node selector)"))]
#[x_kube(validation = Rule::new("has(self.heloNameTemplate) || (size(self.cidrs) == 0 && self.addresses.all(a, has(a.heloName)))").message("give heloNameTemplate, or a heloName for every address (addresses from cidrs always need the template)"))]
pub struct EgressSpec {
    /// How the addresses reach the pods: `bind` (default) or `ciliumEgressGateway`.
    #[serde(default)]
    pub mode: EgressMode,

    /// Individual egress addresses, each optionally with its own HELO name.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["address"]))]
    pub addresses: Vec<EgressAddress>,

    /// Address ranges owned by the pool; every address inside (network and broadcast
    /// addresses of IPv4 ranges excluded) is an egress address. At most /20 for IPv4 and /116
    /// for IPv6, so that a typo cannot hand the pool millions of addresses.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[schemars(inner(length(max = 49)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("every entry of cidrs must be a CIDR such as 192.0.2.0/28 or 2001:db8::/124"))]
    #[x_kube(validation = Rule::new("self.all(c, !isCIDR(c) || (cidr(c).ip().family() == 4 ? cidr(c).prefixLength() >= 20 : cidr(c).prefixLength() >= 116))").message("egress cidrs may be at most /20 (IPv4) or /116 (IPv6)"))]
    pub cidrs: Vec<String>,

    /// HELO/EHLO name of addresses that do not name their own. `{ip}` is replaced by the
    /// address as a DNS label: 192.0.2.10 → `192-0-2-10`, 2001:db8::1 → `2001-db8-0-0-0-0-0-1`.
    /// The result must equal the address's PTR record, or receivers distrust the mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 253))]
    #[schemars(regex(pattern = r"^([a-z0-9-]|\{ip\})+(\.([a-z0-9-]|\{ip\})+)+$"))]
    pub helo_name_template: Option<String>,

    /// Settings of the `ciliumEgressGateway` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cilium: Option<CiliumEgressSpec>,
}

/// One egress address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressAddress {
    /// The IPv4 or IPv6 address.
    #[schemars(length(min = 2, max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("address must be an IPv4 or IPv6 address such as 192.0.2.10"))]
    pub address: String,

    /// HELO/EHLO name of this address; must equal its PTR record. Overrides
    /// `heloNameTemplate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 253))]
    #[schemars(regex(
        pattern = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)+[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
    ))]
    pub helo_name: Option<String>,
}

/// Settings of the Cilium egress gateway mode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CiliumEgressSpec {
    /// Labels of the gateway node(s) that carry the egress addresses.
    #[schemars(length(min = 1, max = 16))]
    pub gateway_node_selector: BTreeMap<String, String>,

    /// Network interface on the gateway node that holds the addresses. Cilium picks the
    /// interface of the default route when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    pub interface: Option<String>,
}

/// How applications submit mail. mailfleet never runs an open relay: a client must either
/// authenticate or connect from one of the allowed networks, and MAIL FROM must belong to a
/// SendingDomain of the pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.auth) || size(self.allowedNetworks) > 0").message("listener must authenticate clients (auth) or name the networks allowed to submit (allowedNetworks): mailfleet never runs an open relay"))]
#[x_kube(validation = Rule::new("!has(self.auth) || has(self.tlsSecretRef)").message("listener.auth needs listener.tlsSecretRef: passwords are only accepted over TLS"))]
pub struct ListenerSpec {
    /// TCP port of the SMTP listener (pods run as non-root, so ports below 1024 need the
    /// platform's help).
    #[serde(default = "default_listener_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Secret of type kubernetes.io/tls with the certificate offered by STARTTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<LocalObjectRef>,

    /// SMTP AUTH (PLAIN and LOGIN, only after STARTTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ListenerAuth>,

    /// Client networks that may submit without authenticating, as CIDRs. `0.0.0.0/0` and `::/0`
    /// are refused: they would make an open relay.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[schemars(inner(length(max = 49)))]
    #[x_kube(validation = Rule::new("self.all(n, isCIDR(n))").message("every entry of allowedNetworks must be a CIDR such as 10.0.0.0/8"))]
    #[x_kube(validation = Rule::new("self.all(n, !isCIDR(n) || cidr(n).prefixLength() > 0)").message("allowedNetworks must not contain 0.0.0.0/0 or ::/0: that would make an open relay; authenticate clients outside your networks instead"))]
    pub allowed_networks: Vec<String>,

    /// Largest message accepted, in bytes (advertised with SIZE).
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1024, max = 157_286_400))]
    pub max_message_bytes: i64,

    /// Most recipients accepted in one transaction.
    #[serde(default = "default_max_recipients")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_recipients: i32,

    /// Most concurrent SMTP sessions per relay.
    #[serde(default = "default_max_sessions")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_sessions: i32,
}

fn default_listener_port() -> i32 {
    2525
}
fn default_max_message_bytes() -> i64 {
    26_214_400
}
fn default_max_recipients() -> i32 {
    100
}
fn default_max_sessions() -> i32 {
    1000
}

/// SMTP AUTH of the listener.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerAuth {
    /// Secret whose keys are user names and whose values are their passwords.
    pub users_secret_ref: LocalObjectRef,
}

/// Delivery behaviour: retries, queue lifetime, per-destination shaping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// Waits between delivery attempts of a deferred message; the last entry repeats until
    /// `maxQueueLifetime` is reached.
    #[serde(default = "default_retry_schedule")]
    #[schemars(length(min = 1, max = 32))]
    #[schemars(inner(length(max = 16), regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$")))]
    pub retry_schedule: Vec<String>,

    /// How long a message may stay queued before it bounces (for example `72h` or `5d`).
    #[serde(default = "default_max_queue_lifetime")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub max_queue_lifetime: String,

    /// Most concurrent outbound connections per egress address (over all destinations).
    #[serde(default = "default_max_connections_per_address")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_connections_per_address: i32,

    /// Limits per mailbox-provider group, per egress address. Groups not listed use the
    /// relay's built-in conservative defaults.
    #[serde(default)]
    #[schemars(length(max = 7))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["group"]))]
    pub providers: Vec<ProviderShaping>,

    /// Send a delivery status notification to the return path when a message bounces.
    #[serde(default = "default_true")]
    pub dsn: bool,

    /// Testing and special routing only: deliver to this TCP port instead of 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub destination_port: Option<i32>,

    /// DNS servers (`address` or `address:port`) used for MX lookups instead of the pod's
    /// resolver.
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[schemars(inner(length(max = 64)))]
    pub nameservers: Vec<String>,
}

fn default_retry_schedule() -> Vec<String> {
    ["5m", "10m", "30m", "1h", "2h", "4h"]
        .map(str::to_owned)
        .to_vec()
}
fn default_max_queue_lifetime() -> String {
    "72h".to_owned()
}
fn default_max_connections_per_address() -> i32 {
    20
}
fn default_true() -> bool {
    true
}

impl Default for DeliverySpec {
    fn default() -> Self {
        DeliverySpec {
            retry_schedule: default_retry_schedule(),
            max_queue_lifetime: default_max_queue_lifetime(),
            max_connections_per_address: default_max_connections_per_address(),
            providers: Vec::new(),
            dsn: true,
            destination_port: None,
            nameservers: Vec::new(),
        }
    }
}

/// Shaping limits for one mailbox-provider group, per egress address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderShaping {
    /// The provider group.
    pub group: ProviderGroup,

    /// Most concurrent connections from one address to this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_connections: Option<i32>,

    /// Most messages per minute from one address to this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_messages_per_minute: Option<i32>,

    /// Most messages sent over one connection before it is closed and reopened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_messages_per_connection: Option<i32>,
}

/// Observed state of a RelayPool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Relay pods that exist.
    #[serde(default)]
    pub replicas: i32,

    /// Relay pods that are ready to accept mail.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Number of egress addresses the pool owns.
    #[serde(default)]
    pub address_count: i32,

    /// Addresses still warming up.
    #[serde(default)]
    pub warming: i32,

    /// Addresses that completed warm-up.
    #[serde(default)]
    pub warm: i32,

    /// Addresses held, paused or quarantined.
    #[serde(default)]
    pub held: i32,

    /// Standard conditions: `Ready`, `Progressing`, `EgressAssigned`, and `Reconciling` (True
    /// while relays or addresses change; read by kstatus, Flux and Argo CD).
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// Every egress address of the pool, the pod it is assigned to and its state.
    #[serde(default)]
    pub addresses: Vec<AddressStatus>,

    /// Relays as the coordinator knows them: registration, applied configuration and the last
    /// report applied (written by the coordinator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["pod"]))]
    pub relays: Vec<RelayConnection>,

    /// Delivery outcomes per egress address since the pool was created, from the relays'
    /// reports (written by the coordinator; each report is counted once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["address"]))]
    pub counters: Vec<AddressCounters>,
}

/// What the coordinator knows of one relay pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayConnection {
    /// The relay pod.
    pub pod: String,
    /// The highest report sequence applied for this pod: a report at or below it is never
    /// counted again.
    #[serde(default)]
    pub applied_sequence: i64,
    /// The newest configuration version the relay confirmed it applied.
    #[serde(default)]
    pub config_version: i64,
    /// When the last report arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report: Option<Time>,
}

/// Totals of delivery outcomes from one egress address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressCounters {
    /// The egress address.
    pub address: String,
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
    /// Messages held back by a warm-up limit (not delivery attempts).
    #[serde(default)]
    pub deferred_by_warmup: i64,
}

/// State of one egress address.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AddressState {
    /// Sending within warm-up limits.
    Warming,
    /// Warm-up complete: only shaping limits apply.
    Warm,
    /// Warm-up stopped at the current stage after a gate breach.
    Held,
    /// Not sending until a person resumes it (warm-up `onBreach: pause`).
    Paused,
    /// Listed on a blocklist: out of rotation until delisted.
    Quarantined,
    /// Its pod is being drained before the address moves.
    Draining,
    /// Not assigned to a pod (more addresses than pods can use, or the pool is scaled to 0).
    Unassigned,
}

/// One row of the address table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressStatus {
    /// The egress address.
    pub address: String,
    /// The relay pod that sends from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// HELO/EHLO name used from this address.
    pub helo_name: String,
    /// Current state.
    pub state: AddressState,
    /// Why the address is in this state, when not obvious (for example the blocklist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the state last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}
