//! Counters and gauges of the relay, and the small HTTP server that exposes them to
//! Prometheus (`/metrics`) next to `/healthz` and `/readyz`. Delivery outcomes are counted per
//! egress address × provider group × outcome: the numbers the warm-up engine will judge by.
//! Refusals are labelled by a static reason, never by error text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

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
            "# HELP mailfleet_relay_deliveries_total Recipient outcomes per egress address and provider group."
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
        s
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`. HTTP/1.0-style: one request
/// per connection, which is all Prometheus and kubelet probes need.
pub async fn serve_http(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let metrics = std::sync::Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read until the end of the request head (or the buffer is full).
            while n < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut buf[n..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => {
                        n += k;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
                    ("200 OK", "text/plain", "ready\n".to_string())
                }
                "/readyz" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready\n".to_string(),
                ),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
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
