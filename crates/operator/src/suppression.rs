//! The suppression list of each sending domain, shared by every relay of the fleet.
//!
//! Relays report hard-bounced and complaining recipients with their delivery reports. The
//! coordinator adds them to a ConfigMap per SendingDomain (`<name>-suppressions`, owned by the
//! SendingDomain, so deleting the domain deletes its list) before it acknowledges the report;
//! the RelayPool controller hands the list to the relays, which refuse those recipients at
//! RCPT. One line per recipient: `recipient reason since`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Resource, ResourceExt};
use mailfleet_api::sendingdomain::SendingDomain;
use mailfleet_proto::v1::SuppressionReason;

use crate::children::POOL_LABEL;

/// Key of the list in the ConfigMap.
pub const DATA_KEY: &str = "recipients";
/// Label naming the SendingDomain a suppression ConfigMap belongs to.
pub const DOMAIN_LABEL: &str = "mailfleet.dev/suppressions-for";
/// Most recipients kept per domain (a ConfigMap holds at most 1 MiB); the oldest go first.
pub const MAX_ENTRIES: usize = 10_000;

/// The ConfigMap of a SendingDomain's list.
pub fn configmap_name(sending_domain: &str) -> String {
    format!("{sending_domain}-suppressions")
}

/// One suppressed recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub reason: String,
    /// RFC 3339 time it was added.
    pub since: String,
}

/// Parses a list (unknown or broken lines are skipped).
pub fn parse(text: &str) -> BTreeMap<String, Entry> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let rcpt = w.next()?.to_ascii_lowercase();
            let reason = w.next().unwrap_or("unknown").to_string();
            let since = w.next().unwrap_or("").to_string();
            Some((rcpt, Entry { reason, since }))
        })
        .collect()
}

/// Renders a list, keeping the newest [`MAX_ENTRIES`].
pub fn render(list: &BTreeMap<String, Entry>) -> String {
    let mut entries: Vec<(&String, &Entry)> = list.iter().collect();
    if entries.len() > MAX_ENTRIES {
        entries.sort_by(|a, b| b.1.since.cmp(&a.1.since));
        entries.truncate(MAX_ENTRIES);
        entries.sort_by(|a, b| a.0.cmp(b.0));
    }
    entries
        .into_iter()
        .map(|(r, e)| format!("{r} {} {}\n", e.reason, e.since))
        .collect()
}

/// The name of a reason in the list.
pub fn reason_name(reason: i32) -> &'static str {
    match SuppressionReason::try_from(reason) {
        Ok(SuppressionReason::HardBounce) => "hard-bounce",
        Ok(SuppressionReason::Complaint) => "complaint",
        _ => "unknown",
    }
}

/// A recipient to add: sending domain (as in MAIL FROM), recipient, reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub domain: String,
    pub recipient: String,
    pub reason: &'static str,
}

/// Adds `pending` to the lists of the pool's sending domains in `namespace`. Recipients of
/// domains the pool does not send for are dropped (logged).
pub async fn record(
    client: &kube::Client,
    namespace: &str,
    pool: &str,
    pending: &[Pending],
) -> Result<(), kube::Error> {
    if pending.is_empty() {
        return Ok(());
    }
    let domains: Api<SendingDomain> = Api::namespaced(client.clone(), namespace);
    let by_domain: BTreeMap<String, SendingDomain> = domains
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|d| d.spec.relay_pool_ref.name == pool)
        .map(|d| (d.spec.domain.to_ascii_lowercase(), d))
        .collect();
    let mut grouped: BTreeMap<String, Vec<&Pending>> = BTreeMap::new();
    for p in pending {
        let d = p.domain.to_ascii_lowercase();
        if by_domain.contains_key(&d) {
            grouped.entry(d).or_default().push(p);
        } else {
            tracing::warn!(domain = %p.domain, pool, "suppression for a domain the pool does not send for; dropped");
        }
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    for (domain, items) in grouped {
        let Some(sd) = by_domain.get(&domain) else {
            continue;
        };
        let name = configmap_name(&sd.name_any());
        // Read, merge, write with the read's resourceVersion; a concurrent writer makes us
        // read again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let current = maps.get_opt(&name).await?;
            let mut list = current
                .as_ref()
                .and_then(|c| c.data.as_ref())
                .and_then(|d| d.get(DATA_KEY))
                .map(|t| parse(t))
                .unwrap_or_default();
            let before = list.len();
            for p in &items {
                list.entry(p.recipient.to_ascii_lowercase())
                    .or_insert_with(|| Entry {
                        reason: p.reason.to_string(),
                        since: now.clone(),
                    });
            }
            if current.is_some() && list.len() == before {
                break;
            }
            let data = BTreeMap::from([(DATA_KEY.to_string(), render(&list))]);
            let result = match current {
                Some(mut cm) => {
                    cm.data = Some(data);
                    maps.replace(&name, &PostParams::default(), &cm).await
                }
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            namespace: Some(namespace.to_string()),
                            labels: Some(BTreeMap::from([
                                (POOL_LABEL.to_string(), pool.to_string()),
                                (DOMAIN_LABEL.to_string(), sd.name_any()),
                            ])),
                            owner_references: sd.controller_owner_ref(&()).map(|o| vec![o]),
                            ..ObjectMeta::default()
                        },
                        data: Some(data),
                        ..ConfigMap::default()
                    };
                    maps.create(&PostParams::default(), &cm).await
                }
            };
            match result {
                Ok(_) => {
                    tracing::info!(domain = %domain, added = list.len() - before.min(list.len()), "suppression list updated");
                    break;
                }
                Err(kube::Error::Api(e)) if (e.code == 409) && attempts < 5 => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The recipients suppressed for a SendingDomain (by object name).
pub async fn recipients(
    client: &kube::Client,
    namespace: &str,
    sending_domain: &str,
) -> Result<Vec<String>, kube::Error> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    Ok(maps
        .get_opt(&configmap_name(sending_domain))
        .await?
        .and_then(|c| c.data)
        .and_then(|d| d.get(DATA_KEY).map(|t| parse(t).into_keys().collect()))
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lists_round_trip_and_keep_the_newest() {
        let text = "Bob@Example.test hard-bounce 2026-01-02T00:00:00Z\nbroken\n\nann@example.test complaint 2026-01-01T00:00:00Z\n";
        let list = parse(text);
        assert_eq!(list.len(), 3);
        assert_eq!(list["bob@example.test"].reason, "hard-bounce");
        let again = parse(&render(&list));
        assert_eq!(again, list);

        let mut big = BTreeMap::new();
        for i in 0..MAX_ENTRIES + 5 {
            big.insert(
                format!("r{i:06}@example.test"),
                Entry {
                    reason: "complaint".into(),
                    since: format!("2026-01-01T00:00:{:02}Z", i % 60),
                },
            );
        }
        big.insert(
            "newest@example.test".into(),
            Entry {
                reason: "complaint".into(),
                since: "2027-01-01T00:00:00Z".into(),
            },
        );
        let kept = parse(&render(&big));
        assert_eq!(kept.len(), MAX_ENTRIES);
        assert!(kept.contains_key("newest@example.test"));
    }

    #[test]
    fn reasons_have_names() {
        assert_eq!(
            reason_name(SuppressionReason::HardBounce as i32),
            "hard-bounce"
        );
        assert_eq!(
            reason_name(SuppressionReason::Complaint as i32),
            "complaint"
        );
        assert_eq!(reason_name(42), "unknown");
    }
}
