//! The operator's Prometheus metrics and its `/metrics`, `/healthz`, `/readyz` endpoints.
//!
//! | Metric | Type | Labels | Meaning |
//! |---|---|---|---|
//! | `mailfleet_operator_reconciles_total` | counter | `controller`, `result` (`ok`, `error`) | reconciles run |
//! | `mailfleet_operator_reconcile_errors_total` | counter | `controller`, `category` | failed reconciles by cause |
//! | `mailfleet_operator_reconcile_duration_seconds` | histogram | `controller` | reconcile time |
//! | `mailfleet_operator_coordinator_reports_total` | counter | `result` (`applied`, `duplicate`, `error`) | relay reports |
//! | `mailfleet_operator_coordinator_registrations_total` | counter | | relay registrations |
//! | `mailfleet_operator_coordinator_connected_relays` | gauge | | open config streams |
//! | `mailfleet_operator_leader` | gauge | | 1 on the replica that holds the Lease |
//! | `mailfleet_operator_warmup_stage` | gauge | `namespace`, `plan`, `pool`, `address` | current warm-up stage (1-based) |
//! | `mailfleet_operator_warmup_limit` | gauge | `namespace`, `plan`, `pool`, `address` | messages the address may send in the current window (0: no limit, warm) |
//! | `mailfleet_operator_warmup_sent` | gauge | `namespace`, `plan`, `pool`, `address` | messages attempted in the current window |
//! | `mailfleet_operator_warmup_addresses` | gauge | `namespace`, `plan`, `state` | addresses per warm-up state |
//! | `mailfleet_operator_warmup_decisions_total` | counter | `decision` | window decisions (`advanced`, `warm`, `stayed`, `held`, `steppedBack`, `paused`, `idleReset`, `frozen`) |

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PREFIX: &str = "mailfleet_operator_";
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

type Labels = Vec<(String, String)>;

#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// The operator's metrics.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(String, Labels), u64>>,
    histograms: Mutex<BTreeMap<(String, Labels), Histogram>>,
    gauges: Mutex<BTreeMap<(String, Labels), f64>>,
    /// Set while this replica leads.
    pub leader: AtomicBool,
    /// Set once the controllers and the coordinator run.
    pub ready: AtomicBool,
    /// Set while this replica waits for the leader Lease (a healthy follower).
    pub standby: AtomicBool,
    /// Reads the number of connected relays when rendering.
    pub connected_relays: Mutex<Option<Box<dyn Fn() -> usize + Send>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn render_labels(l: &Labels) -> String {
    if l.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    /// Adds one to a counter.
    pub fn count(&self, name: &str, pairs: &[(&str, &str)]) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry((name.to_string(), labels(pairs))).or_default() += 1;
    }

    /// Records a duration into a histogram.
    pub fn observe(&self, name: &str, pairs: &[(&str, &str)], d: Duration) {
        let secs = d.as_secs_f64();
        let mut h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        let entry = h.entry((name.to_string(), labels(pairs))).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                entry.buckets[i] += 1;
            }
        }
        entry.sum += secs;
        entry.count += 1;
    }

    /// Records one reconcile of `controller`: its result and how long it took.
    pub fn reconciled(&self, controller: &str, ok: bool, elapsed: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.count(
            "reconciles_total",
            &[("controller", controller), ("result", result)],
        );
        self.observe(
            "reconcile_duration_seconds",
            &[("controller", controller)],
            elapsed,
        );
    }

    /// Replaces every series of gauge `name` whose labels include all of `owner` by `series`
    /// (a controller publishes all the series of one object at once, so removed ones vanish).
    pub fn set_gauges(
        &self,
        name: &str,
        owner: &[(&str, &str)],
        series: Vec<(Vec<(&str, &str)>, f64)>,
    ) {
        let mut g = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        let owner = labels(owner);
        g.retain(|(n, l), _| n != name || !owner.iter().all(|o| l.contains(o)));
        for (pairs, v) in series {
            g.insert((name.to_string(), labels(&pairs)), v);
        }
    }

    /// A gauge's value (tests).
    pub fn gauge(&self, name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
        let g = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        g.get(&(name.to_string(), labels(pairs))).copied()
    }

    /// A counter's value (tests and status pages).
    pub fn counter(&self, name: &str, pairs: &[(&str, &str)]) -> u64 {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.get(&(name.to_string(), labels(pairs)))
            .copied()
            .unwrap_or(0)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut last = String::new();
        for ((name, l), v) in self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if *name != last {
                out.push_str(&format!("# TYPE {PREFIX}{name} counter\n"));
                last.clone_from(name);
            }
            out.push_str(&format!("{PREFIX}{name}{} {v}\n", render_labels(l)));
        }
        last.clear();
        for ((name, l), h) in self
            .histograms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if *name != last {
                out.push_str(&format!("# TYPE {PREFIX}{name} histogram\n"));
                last.clone_from(name);
            }
            for (i, bound) in BUCKETS.iter().enumerate() {
                let mut with = l.clone();
                with.push(("le".to_string(), bound.to_string()));
                out.push_str(&format!(
                    "{PREFIX}{name}_bucket{} {}\n",
                    render_labels(&with),
                    h.buckets[i]
                ));
            }
            let mut inf = l.clone();
            inf.push(("le".to_string(), "+Inf".to_string()));
            out.push_str(&format!(
                "{PREFIX}{name}_bucket{} {}\n{PREFIX}{name}_sum{} {}\n{PREFIX}{name}_count{} {}\n",
                render_labels(&inf),
                h.count,
                render_labels(l),
                h.sum,
                render_labels(l),
                h.count
            ));
        }
        last.clear();
        for ((name, l), v) in self.gauges.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if *name != last {
                out.push_str(&format!("# TYPE {PREFIX}{name} gauge\n"));
                last.clone_from(name);
            }
            out.push_str(&format!("{PREFIX}{name}{} {v}\n", render_labels(l)));
        }
        let relays = self
            .connected_relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|f| f())
            .unwrap_or(0);
        out.push_str(&format!(
            "# TYPE {PREFIX}coordinator_connected_relays gauge\n{PREFIX}coordinator_connected_relays {relays}\n"
        ));
        out.push_str(&format!(
            "# TYPE {PREFIX}leader gauge\n{PREFIX}leader {}\n",
            u8::from(self.leader.load(Ordering::Relaxed))
        ));
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` (ready while leading and running, or while
/// waiting as a follower, so that rolling updates proceed; the coordinator Service selects
/// the leader by its pod label) until the listener fails.
pub async fn serve(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = std::sync::Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            while n < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[n..])).await
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
            let ready = metrics.ready.load(Ordering::Relaxed);
            let standby = metrics.standby.load(Ordering::Relaxed);
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" | "/livez" => ("200 OK", "ok\n".to_string()),
                "/readyz" if ready => ("200 OK", "ready: leading\n".to_string()),
                "/readyz" if standby => (
                    "200 OK",
                    "ready: standby, waiting for the leader Lease\n".to_string(),
                ),
                "/readyz" => (
                    "503 Service Unavailable",
                    "not ready: starting or stopping\n".to_string(),
                ),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.count(
            "reconciles_total",
            &[("controller", "relaypool"), ("result", "ok")],
        );
        m.count(
            "reconciles_total",
            &[("controller", "relaypool"), ("result", "ok")],
        );
        m.observe(
            "reconcile_duration_seconds",
            &[("controller", "relaypool")],
            Duration::from_millis(20),
        );
        let text = m.render();
        assert!(text.contains(
            "mailfleet_operator_reconciles_total{controller=\"relaypool\",result=\"ok\"} 2"
        ));
        assert!(text.contains(
            "mailfleet_operator_reconcile_duration_seconds_bucket{controller=\"relaypool\",le=\"0.025\"} 1"
        ));
        assert!(text.contains(
            "mailfleet_operator_reconcile_duration_seconds_bucket{controller=\"relaypool\",le=\"0.01\"} 0"
        ));
        assert!(text.contains("mailfleet_operator_leader 0"));
    }
}
