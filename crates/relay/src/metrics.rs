//! Counters and gauges of the relay, rendered for Prometheus (`/metrics`, served by
//! [`http`](crate::http)). Delivery outcomes are counted per egress address × provider group
//! × outcome: the numbers the warm-up engine judges by; so are complaints and messages held
//! back by warm-up quotas. Refusals and feedback requests are labelled by a static reason,
//! never by error text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use crate::client::Outcome;
use crate::shaping::ProviderGroup;

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Key of the delivery counters; `None` address when no connection was made (DNS failure).
pub type DeliveryKey = (Option<IpAddr>, ProviderGroup, Outcome);

/// Key of the delivery counters by sender: the domain of the envelope sender (lowercased,
/// empty for the null sender of DSNs), for the coordinator reports. Not exported to
/// Prometheus (tenants' domains would multiply the series).
pub type SenderKey = (Option<IpAddr>, ProviderGroup, Outcome, String);

#[derive(Debug, Default)]
pub struct Metrics {
    pub accepted: Gauge,
    pub sessions: Gauge,
    pub queued: Gauge,
    pub ready: AtomicBool,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    feedback: Mutex<BTreeMap<&'static str, u64>>,
    complaints: Mutex<BTreeMap<(IpAddr, ProviderGroup), u64>>,
    deliveries: Mutex<BTreeMap<DeliveryKey, u64>>,
    by_sender: Mutex<BTreeMap<SenderKey, u64>>,
}

impl Metrics {
    pub fn refused(&self, reason: &'static str) {
        *self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_insert(0) += 1;
    }

    /// Counts one request to the feedback endpoint by its result.
    pub fn feedback(&self, result: &'static str) {
        *self
            .feedback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(result)
            .or_insert(0) += 1;
    }

    /// Counts one complaint against the egress address it names. Not part of the delivery
    /// counters of the reports: complaints are reported durably on their own.
    pub fn complaint(&self, address: IpAddr, group: ProviderGroup) {
        *self
            .complaints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((address, group))
            .or_insert(0) += 1;
    }

    /// Complaints counted per address and provider group.
    pub fn complaints(&self) -> BTreeMap<(IpAddr, ProviderGroup), u64> {
        self.complaints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn delivery(&self, address: Option<IpAddr>, group: ProviderGroup, outcome: Outcome) {
        self.delivery_from(address, group, outcome, "");
    }

    /// Counts one recipient outcome of mail from `mail_from` (the envelope sender).
    pub fn delivery_from(
        &self,
        address: Option<IpAddr>,
        group: ProviderGroup,
        outcome: Outcome,
        mail_from: &str,
    ) {
        *self
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((address, group, outcome))
            .or_insert(0) += 1;
        let domain = crate::smtp::address_domain(mail_from).unwrap_or_default();
        *self
            .by_sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((address, group, outcome, domain))
            .or_insert(0) += 1;
    }

    /// A copy of the delivery counters by sender domain (for the coordinator reports).
    pub fn deliveries_by_sender(&self) -> BTreeMap<SenderKey, u64> {
        self.by_sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A copy of the delivery counters (for the coordinator reports and tests).
    pub fn deliveries(&self) -> BTreeMap<DeliveryKey, u64> {
        self.deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sum of one outcome over all addresses and groups.
    pub fn total(&self, outcome: Outcome) -> u64 {
        self.deliveries()
            .iter()
            .filter(|((_, _, o), _)| *o == outcome)
            .map(|(_, n)| n)
            .sum()
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP mailfleet_relay_accepted_total Messages accepted and spooled."
        );
        let _ = writeln!(s, "# TYPE mailfleet_relay_accepted_total counter");
        let _ = writeln!(s, "mailfleet_relay_accepted_total {}", self.accepted.get());
        let _ = writeln!(s, "# HELP mailfleet_relay_sessions Open SMTP sessions.");
        let _ = writeln!(s, "# TYPE mailfleet_relay_sessions gauge");
        let _ = writeln!(s, "mailfleet_relay_sessions {}", self.sessions.get());
        let _ = writeln!(
            s,
            "# HELP mailfleet_relay_queued_messages Messages with recipients still to deliver."
        );
        let _ = writeln!(s, "# TYPE mailfleet_relay_queued_messages gauge");
        let _ = writeln!(s, "mailfleet_relay_queued_messages {}", self.queued.get());
        let _ = writeln!(
            s,
            "# HELP mailfleet_relay_refused_total SMTP commands or sessions refused, by reason."
        );
        let _ = writeln!(s, "# TYPE mailfleet_relay_refused_total counter");
        for (reason, n) in self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "mailfleet_relay_refused_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP mailfleet_relay_deliveries_total Recipient outcomes per egress address and provider group; deferred_by_warmup counts messages held back by a warm-up quota, once per quota window."
        );
        let _ = writeln!(s, "# TYPE mailfleet_relay_deliveries_total counter");
        for ((addr, group, outcome), n) in self.deliveries() {
            let addr = addr.map_or_else(|| "none".to_string(), |a| a.to_string());
            let _ = writeln!(
                s,
                "mailfleet_relay_deliveries_total{{address=\"{addr}\",provider=\"{group}\",outcome=\"{}\"}} {n}",
                outcome.as_str()
            );
        }
        let _ = writeln!(
            s,
            "# HELP mailfleet_relay_complaints_total Complaints (ARF reports) per egress address and provider group."
        );
        let _ = writeln!(s, "# TYPE mailfleet_relay_complaints_total counter");
        for ((addr, group), n) in self.complaints() {
            let _ = writeln!(
                s,
                "mailfleet_relay_complaints_total{{address=\"{addr}\",provider=\"{group}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP mailfleet_relay_feedback_requests_total Requests to the feedback endpoint, by result."
        );
        let _ = writeln!(s, "# TYPE mailfleet_relay_feedback_requests_total counter");
        for (result, n) in self
            .feedback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "mailfleet_relay_feedback_requests_total{{result=\"{result}\"}} {n}"
            );
        }
        s
    }
}

/// Addresses known to the metrics, for callers that want per-address totals.
pub fn per_address(metrics: &Metrics, outcome: Outcome) -> BTreeMap<IpAddr, u64> {
    let mut out = BTreeMap::new();
    for ((addr, _, o), n) in metrics.deliveries() {
        if o == outcome
            && let Some(a) = addr
        {
            *out.entry(a).or_insert(0) += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_counters() {
        let m = Metrics::default();
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        m.delivery(Some(ip), ProviderGroup::Gmail, Outcome::Delivered);
        m.delivery(Some(ip), ProviderGroup::Gmail, Outcome::Delivered);
        m.delivery(None, ProviderGroup::Other, Outcome::Deferred);
        m.refused("not_allowed");
        let text = m.render();
        assert!(text.contains(
            "mailfleet_relay_deliveries_total{address=\"127.0.0.2\",provider=\"gmail\",outcome=\"delivered\"} 2"
        ), "{text}");
        assert!(text.contains("address=\"none\",provider=\"other\",outcome=\"deferred\"} 1"));
        assert!(text.contains("mailfleet_relay_refused_total{reason=\"not_allowed\"} 1"));
        assert_eq!(per_address(&m, Outcome::Delivered).get(&ip), Some(&2));
    }
}
