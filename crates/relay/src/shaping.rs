//! Traffic shaping of outgoing mail: which egress address a connection leaves from, how many
//! connections and messages per second each address may use (overall and toward each
//! mailbox-provider group), and the per-address hourly/daily quotas that the warm-up engine
//! sets. Delivery asks this module before it connects and before each message; the module
//! only counts, it never sleeps itself, so it is tested with an explicit clock.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{EgressConfig, OverflowPolicy, ProviderLimits, QuotaLimits, ShapingConfig};

/// Mailbox-provider groups, decided by the MX host name. Receivers within a group share
/// reputation systems, so limits apply to the group rather than to each domain. (The same
/// enum exists in the api crate; the relay keeps its own to stay free of kube.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderGroup {
    Gmail,
    Yahoo,
    Microsoft,
    Docomo,
    Au,
    Softbank,
    Other,
}

impl ProviderGroup {
    pub const ALL: [ProviderGroup; 7] = [
        ProviderGroup::Gmail,
        ProviderGroup::Yahoo,
        ProviderGroup::Microsoft,
        ProviderGroup::Docomo,
        ProviderGroup::Au,
        ProviderGroup::Softbank,
        ProviderGroup::Other,
    ];

    /// Label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderGroup::Gmail => "gmail",
            ProviderGroup::Yahoo => "yahoo",
            ProviderGroup::Microsoft => "microsoft",
            ProviderGroup::Docomo => "docomo",
            ProviderGroup::Au => "au",
            ProviderGroup::Softbank => "softbank",
            ProviderGroup::Other => "other",
        }
    }
}

impl std::str::FromStr for ProviderGroup {
    type Err = String;

    /// Parses a group name as used in metrics and the coordinator protocol (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        ProviderGroup::ALL
            .into_iter()
            .find(|g| g.as_str() == s)
            .ok_or_else(|| format!("unknown provider group {s:?}"))
    }
}

impl fmt::Display for ProviderGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const BUILTIN_MX_SUFFIXES: &[(&str, ProviderGroup)] = &[
    ("google.com", ProviderGroup::Gmail),
    ("googlemail.com", ProviderGroup::Gmail),
    ("yahoodns.net", ProviderGroup::Yahoo),
    ("outlook.com", ProviderGroup::Microsoft),
    ("hotmail.com", ProviderGroup::Microsoft),
    ("docomo.ne.jp", ProviderGroup::Docomo),
    ("ezweb.ne.jp", ProviderGroup::Au),
    ("au.com", ProviderGroup::Au),
    ("kddi.com", ProviderGroup::Au),
    ("softbank.ne.jp", ProviderGroup::Softbank),
    ("vodafone.ne.jp", ProviderGroup::Softbank),
    ("softbank.jp", ProviderGroup::Softbank),
];

fn has_suffix(host: &str, suffix: &str) -> bool {
    host == suffix
        || (host.len() > suffix.len()
            && host.ends_with(suffix)
            && host.as_bytes()[host.len() - suffix.len() - 1] == b'.')
}

/// The provider group of an MX host; configured suffixes win over the built-in list.
pub fn provider_group(mx_host: &str, extra: &BTreeMap<String, ProviderGroup>) -> ProviderGroup {
    let host = mx_host.trim_end_matches('.').to_ascii_lowercase();
    // Longest configured suffix first, so `a.b.test` can override `b.test`.
    let mut best: Option<(usize, ProviderGroup)> = None;
    for (suffix, group) in extra {
        let s = suffix.trim_end_matches('.').to_ascii_lowercase();
        if has_suffix(&host, &s) && best.is_none_or(|(len, _)| s.len() > len) {
            best = Some((s.len(), *group));
        }
    }
    if let Some((_, g)) = best {
        return g;
    }
    BUILTIN_MX_SUFFIXES
        .iter()
        .find(|(s, _)| has_suffix(&host, s))
        .map_or(ProviderGroup::Other, |(_, g)| *g)
}

/// Seconds since the Unix epoch; the shaper takes time as an argument so tests can move it.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A token bucket that lets callers go into debt: each reservation returns how long to wait,
/// which spaces messages evenly instead of refusing them.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: f64,
}

impl Bucket {
    fn new(rate: f64, now: f64) -> Self {
        Bucket {
            rate,
            tokens: rate.max(1.0),
            at: now,
        }
    }

    fn reserve(&mut self, now: f64) -> f64 {
        let burst = self.rate.max(1.0);
        self.tokens = (self.tokens + (now - self.at).max(0.0) * self.rate).min(burst);
        self.at = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }
}

/// Messages sent in the current hour and quota window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentCounter {
    /// Hours since the epoch of `hour_sent`.
    pub hour: u64,
    pub hour_sent: u64,
    /// Unix start of the window of `window_sent`.
    pub window_begin: i64,
    pub window_sent: u64,
}

/// The quota window that contains `now`: its start and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    start: i64,
    secs: u64,
}

impl Window {
    fn begin(self, now: f64) -> i64 {
        let secs = self.secs.max(1) as i64;
        let now = now.floor() as i64;
        self.start + (now - self.start).div_euclid(secs) * secs
    }
}

impl SentCounter {
    fn roll(&mut self, now: f64, w: Window) {
        let hour = now as u64 / 3600;
        if hour != self.hour {
            self.hour = hour;
            self.hour_sent = 0;
        }
        let b = w.begin(now);
        if b != self.window_begin {
            self.window_begin = b;
            self.window_sent = 0;
        }
    }

    /// When the limits let mail out again, or `None` if they do now.
    fn opens_at(&mut self, now: f64, w: Window, limits: QuotaLimits) -> Option<f64> {
        self.roll(now, w);
        let mut at: Option<f64> = None;
        if limits.daily.is_some_and(|q| self.window_sent >= q) {
            at = Some((self.window_begin + w.secs as i64) as f64);
        }
        if limits.hourly.is_some_and(|q| self.hour_sent >= q) {
            let h = ((now as u64 / 3600 + 1) * 3600) as f64;
            at = Some(at.map_or(h, |a| a.max(h)));
        }
        at
    }

    fn count(&mut self) {
        self.hour_sent += 1;
        self.window_sent += 1;
    }
}

#[derive(Debug)]
struct AddrState {
    helo: String,
    paused: bool,
    warm: bool,
    overflow_to_warm: bool,
    limits: QuotaLimits,
    window: Window,
    group_limits: BTreeMap<ProviderGroup, QuotaLimits>,
    max_connections: Option<usize>,
    sent: SentCounter,
    group_sent: HashMap<ProviderGroup, SentCounter>,
    connections: usize,
    group_connections: HashMap<ProviderGroup, usize>,
    rate: Option<f64>,
    bucket: Option<Bucket>,
    group_buckets: HashMap<ProviderGroup, Bucket>,
}

const DAY: u64 = 86_400;

impl AddrState {
    fn new(now: f64) -> Self {
        let window = Window {
            start: 0,
            secs: DAY,
        };
        let mut sent = SentCounter::default();
        sent.roll(now, window);
        AddrState {
            helo: String::new(),
            paused: false,
            warm: false,
            overflow_to_warm: false,
            limits: QuotaLimits::default(),
            window,
            group_limits: BTreeMap::new(),
            max_connections: None,
            sent,
            group_sent: HashMap::new(),
            connections: 0,
            group_connections: HashMap::new(),
            rate: None,
            bucket: None,
            group_buckets: HashMap::new(),
        }
    }

    /// Takes the settings of `e`, keeping counters, connections and a bucket of the same rate.
    fn update(&mut self, e: &EgressConfig, now: f64) {
        self.helo = e.helo.clone();
        self.paused = e.paused;
        self.warm = e.warm;
        self.overflow_to_warm = e.overflow_to_warm;
        self.limits = QuotaLimits {
            daily: e.daily_quota,
            hourly: e.hourly_quota,
        };
        self.window = Window {
            start: e.quota_window_start,
            secs: e.quota_window_seconds.unwrap_or(DAY).max(1),
        };
        self.group_limits = e.provider_quotas.clone();
        self.max_connections = e.max_connections;
        let rate = e.messages_per_second.filter(|r| *r > 0.0);
        if rate != self.rate {
            self.rate = rate;
            self.bucket = rate.map(|r| Bucket::new(r, now));
        }
    }

    /// When this address may send again (toward `group` if given), or `None` if it may now.
    fn quota_opens_at(&mut self, group: Option<ProviderGroup>, now: f64) -> Option<f64> {
        let mut at = self.sent.opens_at(now, self.window, self.limits);
        if let Some(g) = group
            && let Some(limits) = self.group_limits.get(&g).copied()
        {
            let w = self.window;
            let ga = self
                .group_sent
                .entry(g)
                .or_default()
                .opens_at(now, w, limits);
            at = match (at, ga) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
        at
    }

    /// The start of the quota window that contains `now` (identifies the window).
    fn window_begin(&self, now: f64) -> i64 {
        self.window.begin(now)
    }

    fn count(&mut self, group: ProviderGroup, now: f64) {
        let w = self.window;
        self.sent.roll(now, w);
        self.sent.count();
        let g = self.group_sent.entry(group).or_default();
        g.roll(now, w);
        g.count();
    }
}

/// Quota and counters of one address, as shown by the in-process API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressUsage {
    pub address: IpAddr,
    pub sent_this_hour: u64,
    /// Sent in the current quota window (a UTC day unless configured otherwise).
    pub sent_today: u64,
    pub hourly_quota: Option<u64>,
    pub daily_quota: Option<u64>,
    pub connections: usize,
    pub paused: bool,
}

/// Counters of one address (and provider group, `None` for the address as a whole), saved
/// so that a restarted relay does not send a window's quota twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedCounter {
    pub address: IpAddr,
    pub group: Option<ProviderGroup>,
    pub counter: SentCounter,
}

/// Why no connection may be opened now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unavailable {
    /// Every candidate address is over quota until this Unix time; `address` is the one that
    /// opens first and `window` the start of its current quota window.
    OverQuota {
        until: f64,
        address: IpAddr,
        window: i64,
    },
    /// Every candidate address is at its connection limit; retry when one closes.
    Busy,
    /// No candidate address may send at all (none configured, or all paused).
    NoAddress,
}

/// Decision for one message on an open connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MessageSlot {
    /// Send after waiting this long (rate limits); the quota is already counted.
    Go(Duration),
    /// The address is over quota until this Unix time; `window` is the start of its current
    /// quota window.
    OverQuota { until: f64, window: i64 },
    /// The address was removed or paused since the connection opened: send no more from it.
    Stop,
}

/// The shared shaping state of all egress addresses.
#[derive(Debug)]
pub struct Shaper {
    state: Mutex<ShaperState>,
}

#[derive(Debug)]
struct ShaperState {
    overflow: OverflowPolicy,
    order: Vec<IpAddr>,
    addrs: HashMap<IpAddr, AddrState>,
    /// Addresses removed by a reconfiguration (or counters restored for addresses not
    /// configured yet): kept so that open connections and counters survive a re-add.
    retired: HashMap<IpAddr, AddrState>,
    providers: BTreeMap<ProviderGroup, ProviderLimits>,
    next: usize,
}

/// A connection slot on one address; releases the slot when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    shaper: Arc<Shaper>,
    pub address: IpAddr,
    pub helo: String,
    pub group: ProviderGroup,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut st = self.shaper.lock();
        let st = &mut *st;
        if let Some(a) = st
            .addrs
            .get_mut(&self.address)
            .or_else(|| st.retired.get_mut(&self.address))
        {
            a.connections = a.connections.saturating_sub(1);
            if let Some(c) = a.group_connections.get_mut(&self.group) {
                *c = c.saturating_sub(1);
            }
        }
    }
}

impl Shaper {
    pub fn new(egress: &[EgressConfig], shaping: &ShapingConfig, now: f64) -> Arc<Self> {
        let shaper = Arc::new(Shaper {
            state: Mutex::new(ShaperState {
                overflow: shaping.overflow,
                order: Vec::new(),
                addrs: HashMap::new(),
                retired: HashMap::new(),
                providers: BTreeMap::new(),
                next: 0,
            }),
        });
        shaper.reconfigure(egress, shaping, now);
        shaper
    }

    fn lock(&self) -> MutexGuard<'_, ShaperState> {
        // A panic while holding this lock leaves only counters behind; keep going with them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a new set of addresses and limits at run time. Counters and open connections of
    /// addresses that stay are kept; removed addresses get no new connections (open ones stop
    /// at their next message) and keep their counters in case they come back.
    pub fn reconfigure(&self, egress: &[EgressConfig], shaping: &ShapingConfig, now: f64) {
        let mut st = self.lock();
        let st = &mut *st;
        st.overflow = shaping.overflow;
        let keep: std::collections::HashSet<IpAddr> = egress.iter().map(|e| e.address).collect();
        let gone: Vec<IpAddr> = st
            .addrs
            .keys()
            .filter(|ip| !keep.contains(ip))
            .copied()
            .collect();
        for ip in gone {
            if let Some(a) = st.addrs.remove(&ip) {
                st.retired.insert(ip, a);
            }
        }
        for e in egress {
            let mut a = match st.addrs.remove(&e.address) {
                Some(a) => a,
                None => st
                    .retired
                    .remove(&e.address)
                    .unwrap_or_else(|| AddrState::new(now)),
            };
            a.update(e, now);
            st.addrs.insert(e.address, a);
        }
        st.order = egress.iter().map(|e| e.address).collect();
        let providers_changed = st
            .providers
            .iter()
            .map(|(g, p)| (g, p.messages_per_second_per_address))
            .ne(shaping
                .providers
                .iter()
                .map(|(g, p)| (g, p.messages_per_second_per_address)));
        if providers_changed {
            for a in st.addrs.values_mut() {
                a.group_buckets.clear();
            }
        }
        st.providers = shaping.providers.clone();
    }

    /// The addresses in configuration order.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.lock().order.clone()
    }

    /// How many addresses may send new mail (configured and not paused).
    pub fn usable_addresses(&self) -> usize {
        self.lock().addrs.values().filter(|a| !a.paused).count()
    }

    /// Open connections on addresses that may not send new mail (paused or removed): zero
    /// once a reconfiguration took full effect.
    pub fn connections_on_unusable(&self) -> usize {
        let st = self.lock();
        st.addrs
            .values()
            .filter(|a| a.paused)
            .chain(st.retired.values())
            .map(|a| a.connections)
            .sum()
    }

    /// The most messages one connection toward `group` may carry, if the group limits it.
    pub fn messages_per_connection(&self, group: ProviderGroup) -> Option<usize> {
        self.lock()
            .providers
            .get(&group)
            .and_then(|p| p.max_messages_per_connection)
            .filter(|n| *n > 0)
    }

    /// Whether each message is assigned an address up front (overflow policy `wait`).
    pub fn pinned(&self) -> bool {
        self.lock().overflow == OverflowPolicy::Wait
    }

    /// The next address in round-robin order among those that may send (configured, not
    /// paused) and are in `among` (all when `None`), used to spread mail evenly when each
    /// message is assigned an address up front (overflow policy `wait`).
    pub fn assign(&self, among: Option<&[IpAddr]>) -> Option<IpAddr> {
        let mut st = self.lock();
        let usable: Vec<IpAddr> = st
            .order
            .iter()
            .filter(|ip| among.is_none_or(|a| a.contains(ip)))
            .filter(|ip| st.addrs.get(ip).is_some_and(|a| !a.paused))
            .copied()
            .collect();
        if usable.is_empty() {
            return None;
        }
        let i = st.next % usable.len();
        st.next = st.next.wrapping_add(1);
        Some(usable[i])
    }

    /// Whether `address` is configured and not paused.
    pub fn is_usable(&self, address: IpAddr) -> bool {
        self.lock().addrs.get(&address).is_some_and(|a| !a.paused)
    }

    /// Whether mail over the quota of `address` may leave from warm addresses.
    pub fn overflows_to_warm(&self, address: IpAddr) -> bool {
        self.lock()
            .addrs
            .get(&address)
            .is_some_and(|a| a.overflow_to_warm)
    }

    /// The warm addresses that may take the overflow of `from`: configured, not paused,
    /// `warm`, in `among` (all when `None`), other than `from`, in configuration order.
    pub fn warm_addresses(&self, from: IpAddr, among: Option<&[IpAddr]>) -> Vec<IpAddr> {
        let st = self.lock();
        st.order
            .iter()
            .filter(|ip| **ip != from && among.is_none_or(|a| a.contains(ip)))
            .filter(|ip| st.addrs.get(ip).is_some_and(|a| a.warm && !a.paused))
            .copied()
            .collect()
    }

    /// Whether `address` may send a message toward `group` now as far as its quotas go.
    pub fn has_quota(&self, address: IpAddr, group: ProviderGroup, now: f64) -> bool {
        self.lock()
            .addrs
            .get_mut(&address)
            .is_some_and(|a| a.quota_opens_at(Some(group), now).is_none())
    }

    /// Sets the quotas of an address (the warm-up engine's knob). Unknown addresses are ignored
    /// and reported as `false`.
    pub fn set_quota(&self, address: IpAddr, daily: Option<u64>, hourly: Option<u64>) -> bool {
        let mut st = self.lock();
        match st.addrs.get_mut(&address) {
            Some(a) => {
                a.limits = QuotaLimits { daily, hourly };
                true
            }
            None => false,
        }
    }

    pub fn usage(&self, now: f64) -> Vec<AddressUsage> {
        let mut st = self.lock();
        let order = st.order.clone();
        order
            .into_iter()
            .filter_map(|ip| {
                let a = st.addrs.get_mut(&ip)?;
                let w = a.window;
                a.sent.roll(now, w);
                Some(AddressUsage {
                    address: ip,
                    sent_this_hour: a.sent.hour_sent,
                    sent_today: a.sent.window_sent,
                    hourly_quota: a.limits.hourly,
                    daily_quota: a.limits.daily,
                    connections: a.connections,
                    paused: a.paused,
                })
            })
            .collect()
    }

    /// The counters of every address and group (configured or retired), to save them.
    pub fn counters(&self) -> Vec<SavedCounter> {
        let st = self.lock();
        let mut out = Vec::new();
        for (ip, a) in st.addrs.iter().chain(st.retired.iter()) {
            out.push(SavedCounter {
                address: *ip,
                group: None,
                counter: a.sent,
            });
            for (g, c) in &a.group_sent {
                out.push(SavedCounter {
                    address: *ip,
                    group: Some(*g),
                    counter: *c,
                });
            }
        }
        out.sort_by_key(|c| (c.address, c.group));
        out
    }

    /// Restores saved counters (stale windows roll over on first use). Counters of addresses
    /// not configured yet wait for them.
    pub fn restore_counters(&self, saved: &[SavedCounter], now: f64) {
        let mut st = self.lock();
        let st = &mut *st;
        for s in saved {
            let a = match st.addrs.get_mut(&s.address) {
                Some(a) => a,
                None => st
                    .retired
                    .entry(s.address)
                    .or_insert_with(|| AddrState::new(now)),
            };
            match s.group {
                None => a.sent = s.counter,
                Some(g) => {
                    a.group_sent.insert(g, s.counter);
                }
            }
        }
    }

    /// Opens a connection slot toward `group` on one of `among` (every address when `None`):
    /// the one with quota left and the fewest connections (ties: most quota left, then the
    /// order of `among` or of the configuration).
    pub fn acquire(
        self: &Arc<Self>,
        group: ProviderGroup,
        among: Option<&[IpAddr]>,
        now: f64,
    ) -> Result<ConnectionPermit, Unavailable> {
        let mut st = self.lock();
        let group_limit = st
            .providers
            .get(&group)
            .and_then(|p| p.max_connections_per_address);
        let candidates: Vec<IpAddr> = match among {
            Some(ips) => ips.to_vec(),
            None => st.order.clone(),
        };
        let mut earliest_quota: Option<(f64, IpAddr, i64)> = None;
        let mut best: Option<(IpAddr, usize, u64)> = None;
        let mut usable = 0usize;
        let mut over_quota = 0usize;
        for ip in candidates {
            let Some(a) = st.addrs.get_mut(&ip) else {
                continue;
            };
            if a.paused {
                continue;
            }
            usable += 1;
            if let Some(until) = a.quota_opens_at(Some(group), now) {
                over_quota += 1;
                if earliest_quota.is_none_or(|(e, _, _)| until < e) {
                    earliest_quota = Some((until, ip, a.window_begin(now)));
                }
                continue;
            }
            if a.max_connections.is_some_and(|m| a.connections >= m) {
                continue;
            }
            let gc = a.group_connections.get(&group).copied().unwrap_or(0);
            if group_limit.is_some_and(|m| gc >= m) {
                continue;
            }
            let left = a
                .limits
                .daily
                .map_or(u64::MAX, |q| q.saturating_sub(a.sent.window_sent));
            let better = match best {
                None => true,
                Some((_, conns, bleft)) => {
                    a.connections < conns || (a.connections == conns && left > bleft)
                }
            };
            if better {
                best = Some((ip, a.connections, left));
            }
        }
        let Some((ip, _, _)) = best else {
            return Err(match earliest_quota {
                _ if usable == 0 => Unavailable::NoAddress,
                // Only report over quota when no address was merely busy: a busy one frees up
                // sooner than a quota window opens.
                Some((until, address, window)) if over_quota == usable => Unavailable::OverQuota {
                    until,
                    address,
                    window,
                },
                _ => Unavailable::Busy,
            });
        };
        let Some(a) = st.addrs.get_mut(&ip) else {
            return Err(Unavailable::Busy);
        };
        a.connections += 1;
        *a.group_connections.entry(group).or_insert(0) += 1;
        let helo = a.helo.clone();
        drop(st);
        Ok(ConnectionPermit {
            shaper: Arc::clone(self),
            address: ip,
            helo,
            group,
        })
    }

    /// Counts one message from `address` toward `group` against quotas and rate limits.
    pub fn message_slot(&self, address: IpAddr, group: ProviderGroup, now: f64) -> MessageSlot {
        let mut st = self.lock();
        let group_rate = st
            .providers
            .get(&group)
            .and_then(|p| p.messages_per_second_per_address)
            .filter(|r| *r > 0.0);
        let Some(a) = st.addrs.get_mut(&address) else {
            return MessageSlot::Stop;
        };
        if a.paused {
            return MessageSlot::Stop;
        }
        if let Some(until) = a.quota_opens_at(Some(group), now) {
            return MessageSlot::OverQuota {
                until,
                window: a.window_begin(now),
            };
        }
        a.count(group, now);
        let mut wait = 0.0f64;
        if let Some(b) = a.bucket.as_mut() {
            wait = wait.max(b.reserve(now));
        }
        if let Some(rate) = group_rate {
            let b = a
                .group_buckets
                .entry(group)
                .or_insert_with(|| Bucket::new(rate, now));
            wait = wait.max(b.reserve(now));
        }
        MessageSlot::Go(Duration::from_secs_f64(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(ip: &str, daily: Option<u64>) -> EgressConfig {
        EgressConfig {
            address: ip.parse().unwrap(),
            helo: format!("out-{ip}.example.test"),
            daily_quota: daily,
            hourly_quota: None,
            quota_window_start: 0,
            quota_window_seconds: None,
            provider_quotas: BTreeMap::new(),
            paused: false,
            warm: false,
            overflow_to_warm: false,
            max_connections: None,
            messages_per_second: None,
        }
    }

    #[test]
    fn provider_group_by_mx_suffix() {
        let extra = BTreeMap::from([("gmail-mx.example.test".to_string(), ProviderGroup::Gmail)]);
        assert_eq!(
            provider_group("gmail-smtp-in.l.google.com.", &extra),
            ProviderGroup::Gmail
        );
        assert_eq!(
            provider_group("mx.example.test", &extra),
            ProviderGroup::Other
        );
        assert_eq!(
            provider_group("a.gmail-mx.example.test", &extra),
            ProviderGroup::Gmail
        );
        assert_eq!(
            provider_group("mta7.am0.yahoodns.net", &extra),
            ProviderGroup::Yahoo
        );
        // A suffix match must fall on a label boundary.
        assert_eq!(
            provider_group("notgoogle.com", &extra),
            ProviderGroup::Other
        );
        assert_eq!(
            provider_group("mfsmax.docomo.ne.jp", &extra),
            ProviderGroup::Docomo
        );
    }

    #[test]
    fn quota_moves_mail_to_address_with_quota_left() {
        let now = 1_000_000.0;
        let shaper = Shaper::new(
            &[egress("127.0.0.2", Some(2)), egress("127.0.0.3", None)],
            &ShapingConfig::default(),
            now,
        );
        let ip2: IpAddr = "127.0.0.2".parse().unwrap();
        // Unpinned, the address with the most quota left wins.
        let p = shaper.acquire(ProviderGroup::Other, None, now).unwrap();
        assert_eq!(p.address.to_string(), "127.0.0.3");
        drop(p);
        let p = shaper
            .acquire(ProviderGroup::Other, Some(&[ip2]), now)
            .unwrap();
        assert_eq!(
            shaper.message_slot(p.address, ProviderGroup::Other, now),
            MessageSlot::Go(Duration::ZERO)
        );
        assert_eq!(
            shaper.message_slot(p.address, ProviderGroup::Other, now),
            MessageSlot::Go(Duration::ZERO)
        );
        assert!(matches!(
            shaper.message_slot(p.address, ProviderGroup::Other, now),
            MessageSlot::OverQuota { until, window: 950_400 } if until == 1_036_800.0
        ));
        drop(p);
        shaper.set_quota("127.0.0.3".parse().unwrap(), Some(1), None);
        let p = shaper.acquire(ProviderGroup::Other, None, now).unwrap();
        assert_eq!(p.address.to_string(), "127.0.0.3");
        drop(p);
        // Pinned to the exhausted address, the caller is told when the day ends.
        assert_eq!(
            shaper
                .acquire(ProviderGroup::Other, Some(&[ip2]), now)
                .unwrap_err(),
            Unavailable::OverQuota {
                until: 1_036_800.0,
                address: ip2,
                window: 950_400
            }
        );
        // The next day the quota is fresh.
        assert!(
            shaper
                .acquire(ProviderGroup::Other, Some(&[ip2]), now + 86_400.0)
                .is_ok()
        );
        // Raising the quota (warm-up advancing) reopens the address at once.
        assert!(shaper.set_quota(ip2, Some(10), None));
        assert!(!shaper.set_quota("10.0.0.1".parse().unwrap(), Some(10), None));
        assert!(
            shaper
                .acquire(ProviderGroup::Other, Some(&[ip2]), now)
                .is_ok()
        );
    }

    #[test]
    fn assignment_skips_paused_addresses_and_warm_addresses_take_overflow() {
        let now = 1_000_000.0;
        let mut warming = egress("127.0.0.2", Some(1));
        warming.overflow_to_warm = true;
        let mut warm = egress("127.0.0.3", Some(1));
        warm.warm = true;
        let mut paused = egress("127.0.0.4", None);
        paused.paused = true;
        paused.warm = true;
        let cfg = ShapingConfig {
            overflow: OverflowPolicy::Wait,
            ..Default::default()
        };
        let shaper = Shaper::new(&[warming, warm, paused], &cfg, now);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(shaper.pinned());
        let assigned: Vec<_> = (0..4).filter_map(|_| shaper.assign(None)).collect();
        assert_eq!(
            assigned,
            vec![
                ip("127.0.0.2"),
                ip("127.0.0.3"),
                ip("127.0.0.2"),
                ip("127.0.0.3")
            ]
        );
        assert_eq!(shaper.assign(Some(&[ip("127.0.0.4")])), None);
        assert_eq!(
            shaper.assign(Some(&[ip("127.0.0.3")])),
            Some(ip("127.0.0.3"))
        );
        // Only the usable warm address takes the overflow of 127.0.0.2.
        assert!(shaper.overflows_to_warm(ip("127.0.0.2")));
        assert!(!shaper.overflows_to_warm(ip("127.0.0.3")));
        assert_eq!(
            shaper.warm_addresses(ip("127.0.0.2"), None),
            vec![ip("127.0.0.3")]
        );
        assert!(
            shaper
                .warm_addresses(ip("127.0.0.2"), Some(&[ip("127.0.0.2")]))
                .is_empty()
        );
        // Both spent: the one that opens first is named, with its window.
        assert!(matches!(
            shaper.message_slot(ip("127.0.0.2"), ProviderGroup::Other, now),
            MessageSlot::Go(_)
        ));
        assert!(matches!(
            shaper.message_slot(ip("127.0.0.3"), ProviderGroup::Other, now),
            MessageSlot::Go(_)
        ));
        assert!(!shaper.has_quota(ip("127.0.0.3"), ProviderGroup::Other, now));
        assert_eq!(
            shaper.acquire(ProviderGroup::Other, None, now).unwrap_err(),
            Unavailable::OverQuota {
                until: 1_036_800.0,
                address: ip("127.0.0.2"),
                window: 950_400
            }
        );
        // The policy follows a reconfiguration.
        shaper.reconfigure(&[], &ShapingConfig::default(), now);
        assert!(!shaper.pinned());
    }

    #[test]
    fn provider_connection_limit_per_address() {
        let now = 0.0;
        let mut cfg = ShapingConfig::default();
        cfg.providers.insert(
            ProviderGroup::Gmail,
            ProviderLimits {
                max_connections_per_address: Some(1),
                messages_per_second_per_address: None,
                max_messages_per_connection: None,
            },
        );
        let shaper = Shaper::new(
            &[egress("127.0.0.2", None), egress("127.0.0.3", None)],
            &cfg,
            now,
        );
        let a = shaper.acquire(ProviderGroup::Gmail, None, now).unwrap();
        let b = shaper.acquire(ProviderGroup::Gmail, None, now).unwrap();
        assert_ne!(a.address, b.address);
        assert_eq!(
            shaper.acquire(ProviderGroup::Gmail, None, now).unwrap_err(),
            Unavailable::Busy
        );
        // Other groups are not limited by gmail's limit.
        assert!(shaper.acquire(ProviderGroup::Other, None, now).is_ok());
        drop(a);
        assert!(shaper.acquire(ProviderGroup::Gmail, None, now).is_ok());
    }

    #[test]
    fn message_rate_spaces_messages() {
        let now = 0.0;
        let mut cfg = ShapingConfig::default();
        cfg.providers.insert(
            ProviderGroup::Yahoo,
            ProviderLimits {
                max_connections_per_address: None,
                messages_per_second_per_address: Some(2.0),
                max_messages_per_connection: None,
            },
        );
        let shaper = Shaper::new(&[egress("127.0.0.2", None)], &cfg, now);
        let ip = "127.0.0.2".parse().unwrap();
        let waits: Vec<_> = (0..4)
            .map(
                |_| match shaper.message_slot(ip, ProviderGroup::Yahoo, now) {
                    MessageSlot::Go(d) => d.as_secs_f64(),
                    MessageSlot::OverQuota { .. } | MessageSlot::Stop => -1.0,
                },
            )
            .collect();
        assert_eq!(waits, vec![0.0, 0.0, 0.5, 1.0]);
        // Another group is not slowed by yahoo's limit.
        assert_eq!(
            shaper.message_slot(ip, ProviderGroup::Other, now),
            MessageSlot::Go(Duration::ZERO)
        );
    }

    #[test]
    fn reconfigure_adds_removes_and_pauses_addresses_keeping_counters() {
        let now = 1_000_000.0;
        let shaper = Shaper::new(
            &[egress("127.0.0.2", Some(2))],
            &ShapingConfig::default(),
            now,
        );
        let ip2: IpAddr = "127.0.0.2".parse().unwrap();
        let ip3: IpAddr = "127.0.0.3".parse().unwrap();
        let p = shaper.acquire(ProviderGroup::Other, None, now).unwrap();
        assert!(matches!(
            shaper.message_slot(ip2, ProviderGroup::Other, now),
            MessageSlot::Go(_)
        ));
        // 127.0.0.2 paused, 127.0.0.3 added: new connections leave from .3 only, the open
        // connection on .2 stops at its next message.
        let mut paused = egress("127.0.0.2", Some(2));
        paused.paused = true;
        shaper.reconfigure(
            &[paused, egress("127.0.0.3", None)],
            &ShapingConfig::default(),
            now,
        );
        assert_eq!(shaper.usable_addresses(), 1);
        assert_eq!(
            shaper.message_slot(ip2, ProviderGroup::Other, now),
            MessageSlot::Stop
        );
        let q = shaper.acquire(ProviderGroup::Other, None, now).unwrap();
        assert_eq!(q.address, ip3);
        drop((p, q));
        // Removed entirely: no address left.
        shaper.reconfigure(&[], &ShapingConfig::default(), now);
        assert_eq!(
            shaper.acquire(ProviderGroup::Other, None, now).unwrap_err(),
            Unavailable::NoAddress
        );
        // Back again within the window: the one message already sent still counts.
        shaper.reconfigure(
            &[egress("127.0.0.2", Some(2))],
            &ShapingConfig::default(),
            now,
        );
        assert!(matches!(
            shaper.message_slot(ip2, ProviderGroup::Other, now),
            MessageSlot::Go(_)
        ));
        assert!(matches!(
            shaper.message_slot(ip2, ProviderGroup::Other, now),
            MessageSlot::OverQuota { .. }
        ));
        // Saved counters restore into a fresh shaper (a restarted relay).
        let saved = shaper.counters();
        let fresh = Shaper::new(&[], &ShapingConfig::default(), now);
        fresh.restore_counters(&saved, now);
        fresh.reconfigure(
            &[egress("127.0.0.2", Some(2))],
            &ShapingConfig::default(),
            now,
        );
        assert_eq!(fresh.usage(now)[0].sent_today, 2);
    }

    #[test]
    fn quota_windows_and_provider_group_quotas() {
        // A 100-second window starting at 50; a gmail quota of 1 per window.
        let mut e = egress("127.0.0.2", Some(3));
        e.quota_window_start = 50;
        e.quota_window_seconds = Some(100);
        e.provider_quotas.insert(
            ProviderGroup::Gmail,
            QuotaLimits {
                daily: Some(1),
                hourly: None,
            },
        );
        let shaper = Shaper::new(&[e], &ShapingConfig::default(), 120.0);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(matches!(
            shaper.message_slot(ip, ProviderGroup::Gmail, 120.0),
            MessageSlot::Go(_)
        ));
        assert_eq!(
            shaper.message_slot(ip, ProviderGroup::Gmail, 121.0),
            MessageSlot::OverQuota {
                until: 150.0,
                window: 50
            }
        );
        assert_eq!(
            shaper
                .acquire(ProviderGroup::Gmail, None, 121.0)
                .unwrap_err(),
            Unavailable::OverQuota {
                until: 150.0,
                address: ip,
                window: 50
            }
        );
        // Other groups still have the address's quota (3, one used).
        assert!(matches!(
            shaper.message_slot(ip, ProviderGroup::Other, 122.0),
            MessageSlot::Go(_)
        ));
        assert!(matches!(
            shaper.message_slot(ip, ProviderGroup::Other, 123.0),
            MessageSlot::Go(_)
        ));
        assert_eq!(
            shaper.message_slot(ip, ProviderGroup::Other, 124.0),
            MessageSlot::OverQuota {
                until: 150.0,
                window: 50
            }
        );
        // The next window opens at 150.
        assert!(matches!(
            shaper.message_slot(ip, ProviderGroup::Gmail, 150.0),
            MessageSlot::Go(_)
        ));
    }
}
