//! The `externalDNS` provider: one `DNSEndpoint` (`externaldns.k8s.io/v1alpha1`) per
//! SendingDomain, which external-dns publishes to Route53, Cloud DNS, Cloudflare...
//!
//! Ownership is external-dns's own (its TXT registry); the object carries an ownerReference to
//! the SendingDomain, so deleting the domain deletes the object and external-dns then removes
//! the records. Building the object is pure; applying it is the controller's.

use std::collections::BTreeMap;

use kube::api::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::Record;

/// The DNSEndpoint kind.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("externaldns.k8s.io", "v1alpha1", "DNSEndpoint"),
        "dnsendpoints",
    )
}

/// Name of a domain's DNSEndpoint: the SendingDomain's name.
pub fn endpoint_name(sendingdomain: &str) -> String {
    sendingdomain.to_string()
}

/// The DNSEndpoint document: one endpoint per (name, type) with every value as a target.
/// TXT targets are the whole value; external-dns's providers split long ones as their APIs
/// need.
pub fn endpoint(
    name: &str,
    namespace: &str,
    owner: Option<Value>,
    ttl: i32,
    records: &[Record],
) -> Value {
    let mut grouped: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in records {
        grouped
            .entry((r.name.clone(), r.record_type().to_string()))
            .or_default()
            .push(r.value());
    }
    let endpoints: Vec<Value> = grouped
        .into_iter()
        .map(|((dns_name, record_type), targets)| {
            json!({
                "dnsName": dns_name,
                "recordType": record_type,
                "recordTTL": ttl,
                "targets": targets,
            })
        })
        .collect();
    json!({
        "apiVersion": "externaldns.k8s.io/v1alpha1",
        "kind": "DNSEndpoint",
        "metadata": {
            "name": endpoint_name(name),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "mailfleet",
                "mailfleet.dev/sendingdomain": name,
            },
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "spec": {"endpoints": endpoints},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_group_values_by_name_and_type() {
        let records = vec![
            Record::txt("d.test", "v=spf1 -all"),
            Record::mx("b.d.test", 10, "mx1.test"),
            Record::mx("b.d.test", 20, "mx2.test"),
        ];
        let doc = endpoint("d", "mail", None, 300, &records);
        assert_eq!(
            doc["spec"]["endpoints"],
            json!([
                {"dnsName": "b.d.test", "recordType": "MX", "recordTTL": 300,
                 "targets": ["10 mx1.test", "20 mx2.test"]},
                {"dnsName": "d.test", "recordType": "TXT", "recordTTL": 300,
                 "targets": ["v=spf1 -all"]},
            ])
        );
        assert_eq!(doc["metadata"]["name"], "d");
    }
}
