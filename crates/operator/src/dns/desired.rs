//! The records a SendingDomain needs (pure): DKIM TXT per published selector, SPF for the
//! domain and its return-path subdomain, DMARC, MX of the return-path subdomain.
//!
//! Input is parsed values (spec, addresses, public keys); output is [`Desired`]: records plus
//! the problems that keep some of them from being valid. SPF's lookup limit needs DNS (the
//! included records count too): [`super::spf`] checks the SPF record this returns.

use std::net::IpAddr;

use mailfleet_api::sendingdomain::{Alignment, DmarcPolicy, SendingDomainSpec, SpfQualifier};

use super::Record;

/// Key algorithm of a DKIM public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

/// A DKIM public key to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkimPublicKey {
    /// Full selector (with `-ed` for the Ed25519 key of a dual pair).
    pub selector: String,
    pub algorithm: KeyAlgorithm,
    /// Base64 of the `p=` tag: SubjectPublicKeyInfo DER for RSA, the raw 32 bytes for Ed25519
    /// (RFC 8463).
    pub public_key_b64: String,
}

impl DkimPublicKey {
    /// The DKIM TXT value.
    pub fn txt(&self) -> String {
        let k = match self.algorithm {
            KeyAlgorithm::Rsa => "rsa",
            KeyAlgorithm::Ed25519 => "ed25519",
        };
        format!("v=DKIM1; k={k}; p={}", self.public_key_b64)
    }
}

/// Desired records and what is wrong with them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub records: Vec<Record>,
    pub problems: Vec<String>,
    /// The SPF record (at the domain and at its return-path subdomain), when managed.
    pub spf: Option<String>,
}

/// The return-path (bounce) domain of a SendingDomain.
pub fn return_path_domain(spec: &SendingDomainSpec) -> String {
    format!("{}.{}", spec.spf.return_path_label, spec.domain)
}

/// Owner name of a selector's DKIM record.
pub fn dkim_name(selector: &str, domain: &str) -> String {
    format!("{selector}._domainkey.{domain}")
}

/// Every record of the domain. `addresses` are the egress addresses the domain sends from
/// (the pinned ones, or all of the pool's); `keys` every selector that must be published
/// (active, next and retiring).
pub fn desired(spec: &SendingDomainSpec, addresses: &[IpAddr], keys: &[DkimPublicKey]) -> Desired {
    let mut out = Desired::default();
    let domain = super::normalize(&spec.domain);
    for key in keys {
        out.records
            .push(Record::txt(&dkim_name(&key.selector, &domain), &key.txt()));
    }
    if spec.spf.managed {
        let text = spf_record(addresses, &spec.spf.includes, spec.spf.qualifier);
        if addresses.is_empty() {
            out.problems
                .push("the relay pool has no egress addresses yet: SPF lists none".to_string());
        }
        out.records.push(Record::txt(&domain, &text));
        out.records
            .push(Record::txt(&return_path_domain(spec), &text));
        out.spf = Some(text);
    }
    for mx in &spec.spf.return_path_mx {
        out.records.push(Record::mx(
            &return_path_domain(spec),
            u16::try_from(mx.preference).unwrap_or(u16::MAX),
            &mx.host,
        ));
    }
    if spec.dmarc.managed {
        out.records.push(Record::txt(
            &format!("_dmarc.{domain}"),
            &dmarc_record(&spec.dmarc),
        ));
    }
    out
}

/// `v=spf1 ip4:... ip6:... include:... -all`, addresses sorted.
pub fn spf_record(addresses: &[IpAddr], includes: &[String], qualifier: SpfQualifier) -> String {
    let mut addrs = addresses.to_vec();
    addrs.sort();
    addrs.dedup();
    let mut text = "v=spf1".to_string();
    for a in addrs {
        match a {
            IpAddr::V4(v4) => text.push_str(&format!(" ip4:{v4}")),
            IpAddr::V6(v6) => text.push_str(&format!(" ip6:{v6}")),
        }
    }
    for i in includes {
        text.push_str(&format!(" include:{i}"));
    }
    text.push_str(match qualifier {
        SpfQualifier::Fail => " -all",
        SpfQualifier::SoftFail => " ~all",
        SpfQualifier::Neutral => " ?all",
    });
    text
}

/// DNS-querying terms of one SPF record (`include`, `a`, `mx`, `ptr`, `exists`, `redirect`),
/// not following includes (each costs at least one lookup); [`super::spf::count`] follows them.
pub fn spf_lookups(record: &str) -> usize {
    super::spf::terms(record).lookups
}

fn policy(p: DmarcPolicy) -> &'static str {
    match p {
        DmarcPolicy::None => "none",
        DmarcPolicy::Quarantine => "quarantine",
        DmarcPolicy::Reject => "reject",
    }
}

/// `v=DMARC1; p=...` with only the tags that differ from DMARC's defaults (plus rua/ruf).
pub fn dmarc_record(d: &mailfleet_api::sendingdomain::DmarcSpec) -> String {
    let mut tags = vec!["v=DMARC1".to_string(), format!("p={}", policy(d.policy))];
    if let Some(sp) = d.subdomain_policy {
        tags.push(format!("sp={}", policy(sp)));
    }
    if d.pct != 100 {
        tags.push(format!("pct={}", d.pct));
    }
    if !d.rua.is_empty() {
        tags.push(format!("rua={}", d.rua.join(",")));
    }
    if !d.ruf.is_empty() {
        tags.push(format!("ruf={}", d.ruf.join(",")));
    }
    if d.adkim == Alignment::Strict {
        tags.push("adkim=s".to_string());
    }
    if d.aspf == Alignment::Strict {
        tags.push("aspf=s".to_string());
    }
    tags.join("; ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::dns::{RecordData, RecordType};

    fn spec(extra: serde_json::Value) -> SendingDomainSpec {
        let mut base = serde_json::json!({
            "domain": "mail.example.test",
            "relayPoolRef": {"name": "pool"},
            "dns": {"provider": "manual"},
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(base).unwrap()
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn default_spec_gives_spf_twice_and_dmarc_and_dkim() {
        let key = DkimPublicKey {
            selector: "mf-20260101".into(),
            algorithm: KeyAlgorithm::Rsa,
            public_key_b64: "A".repeat(392),
        };
        let d = desired(
            &spec(serde_json::json!({})),
            &ips(&["127.0.2.2", "127.0.2.1", "::1"]),
            &[key],
        );
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        let names: Vec<(String, RecordType, String)> = d
            .records
            .iter()
            .map(|r| (r.name.clone(), r.record_type(), r.value()))
            .collect();
        let spf = "v=spf1 ip4:127.0.2.1 ip4:127.0.2.2 ip6:::1 -all".to_string();
        assert_eq!(
            names,
            vec![
                (
                    "mf-20260101._domainkey.mail.example.test".into(),
                    RecordType::Txt,
                    format!("v=DKIM1; k=rsa; p={}", "A".repeat(392))
                ),
                ("mail.example.test".into(), RecordType::Txt, spf.clone()),
                ("bounces.mail.example.test".into(), RecordType::Txt, spf),
                (
                    "_dmarc.mail.example.test".into(),
                    RecordType::Txt,
                    "v=DMARC1; p=none".into()
                ),
            ]
        );
        // The RSA key's record exceeds one string.
        let RecordData::Txt(parts) = &d.records[0].data else {
            panic!("not TXT")
        };
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() <= 255));
    }

    #[test]
    fn spf_includes_qualifier_and_return_path_mx() {
        let d = desired(
            &spec(serde_json::json!({
                "spf": {"includes": ["_spf.google.com"], "qualifier": "softfail",
                        "returnPathLabel": "rp",
                        "returnPathMx": [{"preference": 10, "host": "mx.example.test"}]},
                "dmarc": {"managed": false},
            })),
            &ips(&["127.0.3.1"]),
            &[],
        );
        let values: Vec<String> = d.records.iter().map(|r| format!("{r}")).collect();
        assert_eq!(
            values,
            vec![
                r#"mail.example.test TXT "v=spf1 ip4:127.0.3.1 include:_spf.google.com ~all""#,
                r#"rp.mail.example.test TXT "v=spf1 ip4:127.0.3.1 include:_spf.google.com ~all""#,
                r#"rp.mail.example.test MX "10 mx.example.test""#,
            ]
        );
    }

    #[test]
    fn spf_lookup_counting() {
        assert_eq!(spf_lookups("v=spf1 ip4:1.2.3.4 ip6:::1 -all"), 0);
        assert_eq!(
            spf_lookups(
                "v=spf1 a mx:x.test include:a.test ~include:b.test exists:%{i}.x ptr redirect=c.test -all"
            ),
            7
        );
        let many: Vec<String> = (0..11).map(|i| format!("s{i}.example.test")).collect();
        let d = desired(&spec(serde_json::json!({})), &ips(&["127.0.0.1"]), &[]);
        assert!(d.problems.is_empty());
        let text = spf_record(&ips(&["127.0.0.1"]), &many, SpfQualifier::Fail);
        assert_eq!(spf_lookups(&text), 11);
        let mut s = spec(serde_json::json!({}));
        s.spf.includes = many;
        let d = desired(&s, &ips(&["127.0.0.1"]), &[]);
        assert_eq!(d.spf.as_deref(), Some(text.as_str()));
    }

    #[test]
    fn no_addresses_is_a_problem() {
        let d = desired(&spec(serde_json::json!({})), &[], &[]);
        assert!(d.problems[0].contains("no egress addresses"));
    }

    #[test]
    fn dmarc_lists_only_non_default_tags() {
        let s = spec(serde_json::json!({"dmarc": {
            "policy": "reject", "subdomainPolicy": "quarantine", "pct": 50,
            "rua": ["mailto:a@example.test", "mailto:b@example.test"], "ruf": ["mailto:f@example.test"],
            "adkim": "strict", "aspf": "strict"}}));
        assert_eq!(
            dmarc_record(&s.dmarc),
            "v=DMARC1; p=reject; sp=quarantine; pct=50; rua=mailto:a@example.test,mailto:b@example.test; \
             ruf=mailto:f@example.test; adkim=s; aspf=s"
        );
    }

    #[test]
    fn ed25519_key_record() {
        let k = DkimPublicKey {
            selector: "mf-20260101-ed".into(),
            algorithm: KeyAlgorithm::Ed25519,
            public_key_b64: "abc=".into(),
        };
        assert_eq!(k.txt(), "v=DKIM1; k=ed25519; p=abc=");
    }
}
