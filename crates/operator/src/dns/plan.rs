//! Desired vs current → changes (pure), touching only records mailfleet created.
//!
//! Ownership, as external-dns's TXT registry does it: every record mailfleet writes gets an
//! entry in a companion TXT RRset at `_mailfleet-owner.<domain>`, one RR per record, one
//! string each: `heritage=mailfleet,owner=<namespace>/<name>,record=<TYPE> <owner name>
//! <hash>`, where hash is the first 16 hex digits of SHA-256 of the record's value (a
//! DKIM key does not fit in one string). A record is ours only if such an entry names it with
//! our owner. Records at the same names without an entry (a `google-site-verification` TXT at
//! the apex, a hand-made SPF) are never changed or removed; one that contradicts a desired
//! record (a second `v=spf1` TXT, a second `v=DMARC1`) is reported as a conflict and the
//! desired record is not written, since two SPF records make SPF fail for every message.

use std::collections::BTreeSet;

use super::{Record, RecordType};

/// Label of the ownership registry under the domain.
pub const REGISTRY_LABEL: &str = "_mailfleet-owner";
const HERITAGE: &str = "heritage=mailfleet";

/// Owner name of the registry RRset of a domain.
pub fn registry_name(domain: &str) -> String {
    format!("{REGISTRY_LABEL}.{}", super::normalize(domain))
}

/// First 16 hex digits of SHA-256 of the record's value.
pub fn fingerprint(record: &Record) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, record.value().as_bytes());
    d.as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The registry entry of `record` for `owner` (`<namespace>/<name>`).
pub fn registry_entry(owner: &str, record: &Record) -> String {
    format!(
        "{HERITAGE},owner={owner},record={} {} {}",
        record.record_type(),
        record.name,
        fingerprint(record)
    )
}

/// A registry entry, parsed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub owner: String,
    pub record_type: String,
    pub name: String,
    pub fingerprint: String,
}

/// Parses one registry string; `None` for anything not written by mailfleet.
pub fn parse_entry(text: &str) -> Option<Entry> {
    let rest = text.strip_prefix(HERITAGE)?.strip_prefix(",owner=")?;
    let (owner, rest) = rest.split_once(",record=")?;
    let mut parts = rest.split(' ');
    let entry = Entry {
        owner: owner.to_string(),
        record_type: parts.next()?.to_string(),
        name: parts.next()?.to_string(),
        fingerprint: parts.next()?.to_string(),
    };
    parts.next().is_none().then_some(entry)
}

fn entry_matches(e: &Entry, r: &Record) -> bool {
    e.name == r.name
        && e.record_type == r.record_type().to_string()
        && e.fingerprint == fingerprint(r)
}

/// A desired record that cannot be written because of a record mailfleet does not own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub record: Record,
    pub existing: Record,
}

impl Conflict {
    pub fn message(&self) -> String {
        format!(
            "{} {} is not written: the zone already has {:?} there, which mailfleet did not create; \
             remove it or let mailfleet manage it",
            self.record.name,
            self.record.record_type(),
            self.existing.value()
        )
    }
}

/// The changes that bring the provider to the desired records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Records to create (registry entries included).
    pub create: Vec<Record>,
    /// Records to delete, each exactly (name, type, value) (registry entries included).
    pub delete: Vec<Record>,
    pub conflicts: Vec<Conflict>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.delete.is_empty()
    }
}

/// Which kind of record a TXT value is, for conflicts: at one name there is one SPF, one DMARC
/// and one DKIM key record.
fn txt_kind(value: &str) -> Option<&'static str> {
    let v = value.trim_start().to_ascii_lowercase();
    if v == "v=spf1" || v.starts_with("v=spf1 ") {
        Some("spf")
    } else if v.starts_with("v=dmarc1") {
        Some("dmarc")
    } else if v.starts_with("v=dkim1") {
        Some("dkim")
    } else {
        None
    }
}

/// Whether two records cannot both exist: same name, TXT, same kind.
pub fn contradicts(a: &Record, b: &Record) -> bool {
    a.name == b.name
        && a.record_type() == RecordType::Txt
        && b.record_type() == RecordType::Txt
        && txt_kind(&a.value()).is_some()
        && txt_kind(&a.value()) == txt_kind(&b.value())
        && a.value() != b.value()
}

/// Names whose records [`plan`] needs as `current`: the desired names and those the registry
/// mentions.
pub fn names_to_read(desired: &[Record], registry: &[String]) -> BTreeSet<(String, RecordType)> {
    let mut names: BTreeSet<(String, RecordType)> = desired
        .iter()
        .map(|r| (r.name.clone(), r.record_type()))
        .collect();
    for e in registry.iter().filter_map(|s| parse_entry(s)) {
        let t = if e.record_type == "MX" {
            RecordType::Mx
        } else {
            RecordType::Txt
        };
        names.insert((e.name, t));
    }
    names
}

/// Desired vs current → changes. `current` holds what the provider serves at
/// [`names_to_read`]; `registry` the strings of the registry RRset; `owner` is
/// `<namespace>/<name>`. With an empty `desired` the plan removes everything we own (the
/// finalizer's cleanup).
pub fn plan(
    domain: &str,
    owner: &str,
    desired: &[Record],
    current: &[Record],
    registry: &[String],
) -> Plan {
    let reg_name = registry_name(domain);
    let ours: Vec<Entry> = registry
        .iter()
        .filter_map(|s| parse_entry(s))
        .filter(|e| e.owner == owner)
        .collect();
    let owned = |r: &Record| ours.iter().any(|e| entry_matches(e, r));
    let mut out = Plan::default();
    let mut wanted_entries = BTreeSet::new();

    for d in desired {
        if current.iter().any(|c| c.same_as(d)) {
            // Served already: keep our entry if it is ours; a record someone else made
            // identical to ours stays theirs.
            if owned(d) {
                wanted_entries.insert(registry_entry(owner, d));
            }
            continue;
        }
        if let Some(existing) = current.iter().find(|c| !owned(c) && contradicts(d, c)) {
            out.conflicts.push(Conflict {
                record: d.clone(),
                existing: existing.clone(),
            });
            continue;
        }
        out.create.push(d.clone());
        wanted_entries.insert(registry_entry(owner, d));
    }
    for c in current {
        if owned(c) && !desired.iter().any(|d| d.same_as(c)) {
            out.delete.push(c.clone());
        }
    }
    let have: BTreeSet<&str> = registry.iter().map(String::as_str).collect();
    for e in &wanted_entries {
        if !have.contains(e.as_str()) {
            out.create.push(Record::txt(&reg_name, e));
        }
    }
    for s in registry {
        if parse_entry(s).is_some_and(|e| e.owner == owner) && !wanted_entries.contains(s) {
            out.delete.push(Record::txt(&reg_name, s));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "mail/example";
    const DOMAIN: &str = "mail.example.test";

    fn spf(v: &str) -> Record {
        Record::txt(DOMAIN, &format!("v=spf1 {v} -all"))
    }

    #[test]
    fn entries_round_trip_and_foreign_strings_are_ignored() {
        let r = spf("ip4:127.0.0.1");
        let e = registry_entry(OWNER, &r);
        let parsed = parse_entry(&e).unwrap_or_else(|| unreachable!());
        assert_eq!(parsed.owner, OWNER);
        assert_eq!(parsed.name, DOMAIN);
        assert_eq!(parsed.record_type, "TXT");
        assert_eq!(parsed.fingerprint.len(), 16);
        assert!(entry_matches(&parsed, &r));
        assert_eq!(
            parse_entry("heritage=external-dns,external-dns/owner=x"),
            None
        );
        assert_eq!(parse_entry("google-site-verification=abc"), None);
    }

    #[test]
    fn empty_zone_creates_records_and_entries() {
        let desired = vec![
            spf("ip4:127.0.0.1"),
            Record::txt("_dmarc.mail.example.test", "v=DMARC1; p=none"),
        ];
        let p = plan(DOMAIN, OWNER, &desired, &[], &[]);
        assert_eq!(p.create.len(), 4);
        assert!(p.delete.is_empty() && p.conflicts.is_empty());
        let reg: Vec<&Record> = p
            .create
            .iter()
            .filter(|r| r.name == "_mailfleet-owner.mail.example.test")
            .collect();
        assert_eq!(reg.len(), 2);
    }

    #[test]
    fn in_sync_is_empty() {
        let desired = vec![spf("ip4:127.0.0.1")];
        let registry = vec![registry_entry(OWNER, &desired[0])];
        let p = plan(DOMAIN, OWNER, &desired, &desired, &registry);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn changed_owned_record_is_replaced_foreign_records_untouched() {
        let old = spf("ip4:127.0.0.1");
        let new = spf("ip4:127.0.0.1 ip4:127.0.0.2");
        let foreign = Record::txt(DOMAIN, "google-site-verification=abc");
        let registry = vec![registry_entry(OWNER, &old)];
        let p = plan(
            DOMAIN,
            OWNER,
            std::slice::from_ref(&new),
            &[old.clone(), foreign],
            &registry,
        );
        assert!(p.conflicts.is_empty());
        assert_eq!(
            p.create,
            vec![
                new.clone(),
                Record::txt(&registry_name(DOMAIN), &registry_entry(OWNER, &new))
            ]
        );
        assert_eq!(
            p.delete,
            vec![
                old.clone(),
                Record::txt(&registry_name(DOMAIN), &registry_entry(OWNER, &old))
            ]
        );
    }

    #[test]
    fn foreign_spf_is_a_conflict_not_a_change() {
        let theirs = spf("include:_spf.elsewhere.test");
        let p = plan(
            DOMAIN,
            OWNER,
            &[spf("ip4:127.0.0.1")],
            std::slice::from_ref(&theirs),
            &[],
        );
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].existing, theirs);
        assert!(p.conflicts[0].message().contains("did not create"));
    }

    #[test]
    fn another_owners_records_are_not_ours() {
        let r = spf("ip4:127.0.0.1");
        let registry = vec![registry_entry("other/domain", &r)];
        // Cleanup by us removes nothing of theirs.
        let p = plan(DOMAIN, OWNER, &[], std::slice::from_ref(&r), &registry);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn cleanup_removes_owned_records_and_entries_only() {
        let r = spf("ip4:127.0.0.1");
        let dkim = Record::txt(
            "mf-1._domainkey.mail.example.test",
            "v=DKIM1; k=rsa; p=AAAA",
        );
        let foreign = Record::txt(DOMAIN, "keep=me");
        let registry = vec![registry_entry(OWNER, &r), registry_entry(OWNER, &dkim)];
        let p = plan(
            DOMAIN,
            OWNER,
            &[],
            &[r.clone(), dkim.clone(), foreign],
            &registry,
        );
        assert_eq!(p.delete.len(), 4);
        assert!(p.delete.contains(&r) && p.delete.contains(&dkim));
        assert!(p.create.is_empty());
    }

    #[test]
    fn stale_entries_of_vanished_records_are_removed() {
        let r = spf("ip4:127.0.0.1");
        let registry = vec![registry_entry(OWNER, &r)];
        let p = plan(DOMAIN, OWNER, &[], &[], &registry);
        assert_eq!(
            p.delete,
            vec![Record::txt(&registry_name(DOMAIN), &registry[0])]
        );
    }

    #[test]
    fn names_to_read_include_registry_names() {
        let r = Record::txt("old._domainkey.mail.example.test", "v=DKIM1; p=x");
        let names = names_to_read(&[spf("a")], &[registry_entry(OWNER, &r)]);
        assert!(names.contains(&("old._domainkey.mail.example.test".into(), RecordType::Txt)));
        assert!(names.contains(&(DOMAIN.into(), RecordType::Txt)));
    }
}
