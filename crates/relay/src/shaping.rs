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

use crate::config::{EgressConfig, OverflowPolicy, ProviderLimits, ShapingConfig};

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

#[derive(Debug)]
struct AddrState {
    helo: String,
    daily_quota: Option<u64>,
    hourly_quota: Option<u64>,
    max_connections: Option<usize>,
    hour: u64,
    hour_sent: u64,
    day: u64,
    day_sent: u64,
    connections: usize,
    group_connections: HashMap<ProviderGroup, usize>,
    bucket: Option<Bucket>,
    group_buckets: HashMap<ProviderGroup, Bucket>,
}

impl AddrState {
    fn roll(&mut self, now: f64) {
        let secs = now as u64;
        if secs / 3600 != self.hour {
            self.hour = secs / 3600;
            self.hour_sent = 0;
        }
        if secs / 86400 != self.day {
            self.day = secs / 86400;
            self.day_sent = 0;
        }
    }

    /// When this address may send again, or `None` if it may send now.
    fn quota_opens_at(&mut self, now: f64) -> Option<f64> {
        self.roll(now);
        let secs = now as u64;
        let mut at: Option<f64> = None;
        if self.daily_quota.is_some_and(|q| self.day_sent >= q) {
            at = Some(((secs / 86400 + 1) * 86400) as f64);
        }
        if self.hourly_quota.is_some_and(|q| self.hour_sent >= q) {
            let h = ((secs / 3600 + 1) * 3600) as f64;
            at = Some(at.map_or(h, |a| a.max(h)));
        }
        at
    }
}

/// Quota and counters of one address, as shown by the in-process API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressUsage {
    pub address: IpAddr,
    pub sent_this_hour: u64,
    pub sent_today: u64,
    pub hourly_quota: Option<u64>,
    pub daily_quota: Option<u64>,
    pub connections: usize,
}

/// Why no connection may be opened now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unavailable {
    /// Every candidate address is over quota until this Unix time.
    OverQuota { until: f64 },
    /// Every candidate address is at its connection limit; retry when one closes.
    Busy,
}

/// Decision for one message on an open connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MessageSlot {
    /// Send after waiting this long (rate limits); the quota is already counted.
    Go(Duration),
    /// The address is over quota until this Unix time.
    OverQuota { until: f64 },
}

/// The shared shaping state of all egress addresses.
#[derive(Debug)]
pub struct Shaper {
    state: Mutex<ShaperState>,
    pub overflow: OverflowPolicy,
}

#[derive(Debug)]
struct ShaperState {
    order: Vec<IpAddr>,
    addrs: HashMap<IpAddr, AddrState>,
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
        if let Some(a) = st.addrs.get_mut(&self.address) {
            a.connections = a.connections.saturating_sub(1);
            if let Some(c) = a.group_connections.get_mut(&self.group) {
                *c = c.saturating_sub(1);
            }
        }
    }
}

impl Shaper {
    pub fn new(egress: &[EgressConfig], shaping: &ShapingConfig, now: f64) -> Arc<Self> {
        let mut addrs = HashMap::new();
        for e in egress {
            addrs.insert(
                e.address,
                AddrState {
                    helo: e.helo.clone(),
                    daily_quota: e.daily_quota,
                    hourly_quota: e.hourly_quota,
                    max_connections: e.max_connections,
                    hour: now as u64 / 3600,
                    hour_sent: 0,
                    day: now as u64 / 86400,
                    day_sent: 0,
                    connections: 0,
                    group_connections: HashMap::new(),
                    bucket: e
                        .messages_per_second
                        .filter(|r| *r > 0.0)
                        .map(|r| Bucket::new(r, now)),
                    group_buckets: HashMap::new(),
                },
            );
        }
        Arc::new(Shaper {
            state: Mutex::new(ShaperState {
                order: egress.iter().map(|e| e.address).collect(),
                addrs,
                providers: shaping.providers.clone(),
                next: 0,
            }),
            overflow: shaping.overflow,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ShaperState> {
        // A panic while holding this lock leaves only counters behind; keep going with them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The addresses in configuration order.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.lock().order.clone()
    }

    /// The next address in round-robin order, used to spread mail evenly when each message
    /// is assigned an address up front (overflow policy `wait`).
    pub fn assign(&self) -> Option<IpAddr> {
        let mut st = self.lock();
        if st.order.is_empty() {
            return None;
        }
        let i = st.next % st.order.len();
        st.next = st.next.wrapping_add(1);
        Some(st.order[i])
    }

    /// Sets the quotas of an address (the warm-up engine's knob). Unknown addresses are ignored
    /// and reported as `false`.
    pub fn set_quota(&self, address: IpAddr, daily: Option<u64>, hourly: Option<u64>) -> bool {
        let mut st = self.lock();
        match st.addrs.get_mut(&address) {
            Some(a) => {
                a.daily_quota = daily;
                a.hourly_quota = hourly;
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
                a.roll(now);
                Some(AddressUsage {
                    address: ip,
                    sent_this_hour: a.hour_sent,
                    sent_today: a.day_sent,
                    hourly_quota: a.hourly_quota,
                    daily_quota: a.daily_quota,
                    connections: a.connections,
                })
            })
            .collect()
    }

    /// Opens a connection slot toward `group`, on `only` if given, otherwise on the address
    /// with quota left and the fewest connections (ties: most quota left, then config order).
    pub fn acquire(
        self: &Arc<Self>,
        group: ProviderGroup,
        only: Option<IpAddr>,
        now: f64,
    ) -> Result<ConnectionPermit, Unavailable> {
        let mut st = self.lock();
        let group_limit = st
            .providers
            .get(&group)
            .and_then(|p| p.max_connections_per_address);
        let candidates: Vec<IpAddr> = match only {
            Some(ip) => vec![ip],
            None => st.order.clone(),
        };
        let mut earliest_quota: Option<f64> = None;
        let mut best: Option<(IpAddr, usize, u64)> = None;
        for ip in candidates {
            let Some(a) = st.addrs.get_mut(&ip) else {
                continue;
            };
            if let Some(until) = a.quota_opens_at(now) {
                earliest_quota = Some(earliest_quota.map_or(until, |e| e.min(until)));
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
                .daily_quota
                .map_or(u64::MAX, |q| q.saturating_sub(a.day_sent));
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
                // Only report over quota when no address was merely busy: a busy one frees up
                // sooner than a quota window opens.
                Some(until) if self.all_over_quota(&mut st, only, now) => {
                    Unavailable::OverQuota { until }
                }
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

    fn all_over_quota(&self, st: &mut ShaperState, only: Option<IpAddr>, now: f64) -> bool {
        let ips: Vec<IpAddr> = match only {
            Some(ip) => vec![ip],
            None => st.order.clone(),
        };
        ips.iter().all(|ip| {
            st.addrs
                .get_mut(ip)
                .is_none_or(|a| a.quota_opens_at(now).is_some())
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
            return MessageSlot::Go(Duration::ZERO);
        };
        if let Some(until) = a.quota_opens_at(now) {
            return MessageSlot::OverQuota { until };
        }
        a.hour_sent += 1;
        a.day_sent += 1;
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
            .acquire(ProviderGroup::Other, Some(ip2), now)
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
            MessageSlot::OverQuota { until } if until == 1_036_800.0
        ));
        drop(p);
        shaper.set_quota("127.0.0.3".parse().unwrap(), Some(1), None);
        let p = shaper.acquire(ProviderGroup::Other, None, now).unwrap();
        assert_eq!(p.address.to_string(), "127.0.0.3");
        drop(p);
        // Pinned to the exhausted address, the caller is told when the day ends.
        assert_eq!(
            shaper
                .acquire(ProviderGroup::Other, Some(ip2), now)
                .unwrap_err(),
            Unavailable::OverQuota { until: 1_036_800.0 }
        );
        // The next day the quota is fresh.
        assert!(
            shaper
                .acquire(ProviderGroup::Other, Some(ip2), now + 86_400.0)
                .is_ok()
        );
        // Raising the quota (warm-up advancing) reopens the address at once.
        assert!(shaper.set_quota(ip2, Some(10), None));
        assert!(!shaper.set_quota("10.0.0.1".parse().unwrap(), Some(10), None));
        assert!(shaper.acquire(ProviderGroup::Other, Some(ip2), now).is_ok());
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
            },
        );
        let shaper = Shaper::new(&[egress("127.0.0.2", None)], &cfg, now);
        let ip = "127.0.0.2".parse().unwrap();
        let waits: Vec<_> = (0..4)
            .map(
                |_| match shaper.message_slot(ip, ProviderGroup::Yahoo, now) {
                    MessageSlot::Go(d) => d.as_secs_f64(),
                    MessageSlot::OverQuota { .. } => -1.0,
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
}
