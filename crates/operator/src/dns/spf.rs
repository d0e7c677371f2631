//! SPF's limit of 10 DNS lookups (RFC 7208 §4.6.4), counted as a receiver evaluating the
//! record in the worst case would: the record's own `include`, `a`, `mx`, `ptr`, `exists`
//! mechanisms and `redirect` modifier, plus those of every record an `include` (or an
//! effective `redirect`) pulls in, followed recursively.
//!
//! [`terms`] parses one record (pure); [`count`] walks the include tree, fetching records
//! through a [`TxtSource`] (the controller's resolver, or a map in tests). The walk is bounded:
//! it stops once the limit is exceeded or [`MAX_RECORDS`] records were fetched, and never
//! follows a domain into itself (a loop is reported).

use std::collections::BTreeMap;
use std::future::Future;

/// SPF's limit of DNS-querying terms.
pub const LOOKUP_LIMIT: usize = 10;
/// Most records one count fetches (a receiver stops at 11 lookups; this only bounds our work
/// when lookups fail).
pub const MAX_RECORDS: usize = 32;

/// What a record's evaluation may query, for the count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Terms {
    /// DNS-querying terms of this record alone.
    pub lookups: usize,
    /// Targets of `include:` mechanisms, in order.
    pub includes: Vec<String>,
    /// Target of `redirect=`, if present. A receiver follows it only when the record has no
    /// `all` mechanism.
    pub redirect: Option<String>,
    /// Whether the record has an `all` mechanism.
    pub has_all: bool,
}

/// Whether a TXT value is an SPF record (`v=spf1` alone or followed by a space).
pub fn is_spf(text: &str) -> bool {
    let t = text.trim_start();
    t.len() >= 6
        && t[..6].eq_ignore_ascii_case("v=spf1")
        && t[6..].chars().next().is_none_or(|c| c == ' ')
}

/// The terms of one SPF record that cost DNS lookups. `redirect` is counted whether or not an
/// `all` makes it unused (an upper bound, as the limit is meant).
pub fn terms(record: &str) -> Terms {
    let mut out = Terms::default();
    for term in record.split_ascii_whitespace().skip(1) {
        let t = term.trim_start_matches(['+', '-', '~', '?']);
        let lower = t.to_ascii_lowercase();
        let name = lower.split([':', '/', '=']).next().unwrap_or("");
        match name {
            "include" => {
                out.lookups += 1;
                if let Some((_, target)) = t.split_once(':') {
                    out.includes.push(super::normalize(target));
                }
            }
            "redirect" if lower.starts_with("redirect=") => {
                out.lookups += 1;
                out.redirect = t.split_once('=').map(|(_, v)| super::normalize(v));
            }
            "a" | "mx" | "ptr" | "exists" => out.lookups += 1,
            "all" => out.has_all = true,
            _ => {}
        }
    }
    out
}

/// Where [`count`] gets records: the TXT values at a name, `Ok(vec![])` when the name has
/// none (NXDOMAIN or no TXT), `Err` when the lookup failed.
pub trait TxtSource {
    fn txt(&self, name: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send;
}

impl TxtSource for BTreeMap<String, Vec<String>> {
    fn txt(&self, name: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send {
        let found = self.get(name).cloned().unwrap_or_default();
        async move { Ok(found) }
    }
}

/// The result of a count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Count {
    /// DNS lookups a receiver may need: exact when `unresolved` is empty and `complete`, a
    /// lower bound otherwise.
    pub lookups: usize,
    /// Per `include:`/`redirect=` of the record: the term and the lookups it costs (itself
    /// and everything under it).
    pub per_term: Vec<(String, usize)>,
    /// What makes receivers fail the record (permerror): over the limit, an included domain
    /// without exactly one SPF record, an include loop.
    pub problems: Vec<String>,
    /// Lookups that failed (timeout, refused): the count does not include what is below them.
    pub unresolved: Vec<String>,
    /// False when the walk stopped early (over the limit, or [`MAX_RECORDS`] fetched).
    pub complete: bool,
}

impl Count {
    /// One line for a condition message: `N of the 10 ...` and where they come from.
    pub fn summary(&self) -> String {
        let at_least = if self.complete && self.unresolved.is_empty() {
            ""
        } else {
            "at least "
        };
        let mut s = format!(
            "needs {at_least}{} of the {LOOKUP_LIMIT} DNS lookups SPF allows",
            self.lookups
        );
        if !self.per_term.is_empty() {
            let parts: Vec<String> = self
                .per_term
                .iter()
                .map(|(t, n)| format!("{t}: {n}"))
                .collect();
            s.push_str(&format!(" ({})", parts.join(", ")));
        }
        s
    }
}

/// A record to follow: its name, the chain that led to it, and which top-level term it
/// counts for.
struct Pending {
    name: String,
    chain: Vec<String>,
    top: usize,
    term: &'static str,
}

/// Queues the records `t` pulls in (depth first, in record order). `top` is the top-level
/// term they count for; `None` for the root record, whose terms each get an entry.
fn push_children(
    pending: &mut Vec<Pending>,
    t: &Terms,
    chain: &[String],
    top: Option<usize>,
    out: &mut Count,
) {
    let redirect = t.redirect.iter().filter(|_| !t.has_all);
    let targets = t
        .includes
        .iter()
        .map(|i| (i, "include"))
        .chain(redirect.map(|r| (r, "redirect")));
    let mut batch = Vec::new();
    for (name, term) in targets {
        let top = top.unwrap_or_else(|| {
            let sep = if term == "include" { ':' } else { '=' };
            out.per_term.push((format!("{term}{sep}{name}"), 1));
            out.per_term.len() - 1
        });
        batch.push(Pending {
            name: name.clone(),
            chain: chain.to_vec(),
            top,
            term,
        });
    }
    pending.extend(batch.into_iter().rev());
}

/// Counts the DNS lookups of `record` (published at `owner`), following includes and an
/// effective redirect through `source`.
pub async fn count(owner: &str, record: &str, source: &impl TxtSource) -> Count {
    let root = terms(record);
    let owner = super::normalize(owner);
    let mut out = Count {
        lookups: root.lookups,
        complete: true,
        ..Count::default()
    };
    let mut pending: Vec<Pending> = Vec::new();
    push_children(
        &mut pending,
        &root,
        std::slice::from_ref(&owner),
        None,
        &mut out,
    );
    let mut cache: BTreeMap<String, Result<Vec<String>, String>> = BTreeMap::new();
    let mut fetched = 0usize;
    while let Some(p) = pending.pop() {
        if out.lookups > LOOKUP_LIMIT || fetched >= MAX_RECORDS {
            out.complete = false;
            break;
        }
        let via = p.chain.join(" → ");
        if p.chain.contains(&p.name) {
            out.problems.push(format!(
                "SPF {} loop: {via} → {} (receivers fail it: permerror)",
                p.term, p.name
            ));
            continue;
        }
        if p.name.contains('%') {
            out.unresolved.push(format!(
                "{}:{} uses a macro, expanded per message: not followed",
                p.term, p.name
            ));
            continue;
        }
        let answer = match cache.get(&p.name) {
            Some(a) => a.clone(),
            None => {
                fetched += 1;
                let a = source.txt(&p.name).await;
                cache.insert(p.name.clone(), a.clone());
                a
            }
        };
        let values = match answer {
            Ok(v) => v,
            Err(e) => {
                out.unresolved.push(format!("{} (from {via}): {e}", p.name));
                continue;
            }
        };
        let spf: Vec<&String> = values.iter().filter(|v| is_spf(v)).collect();
        let text = match spf.as_slice() {
            [one] => *one,
            [] => {
                out.problems.push(format!(
                    "{} (an SPF {} of {via}) has no SPF record: receivers fail the record (permerror)",
                    p.name, p.term
                ));
                continue;
            }
            _ => {
                out.problems.push(format!(
                    "{} (an SPF {} of {via}) has {} SPF records: receivers fail the record (permerror)",
                    p.name,
                    p.term,
                    spf.len()
                ));
                continue;
            }
        };
        let t = terms(text);
        out.lookups += t.lookups;
        if let Some(entry) = out.per_term.get_mut(p.top) {
            entry.1 += t.lookups;
        }
        let mut chain = p.chain.clone();
        chain.push(p.name.clone());
        push_children(&mut pending, &t, &chain, Some(p.top), &mut out);
    }
    if out.lookups > LOOKUP_LIMIT {
        let at_least = if out.complete { "" } else { "at least " };
        out.problems.insert(
            0,
            format!(
                "the SPF record of {owner} needs {at_least}{} DNS lookups, more than the \
                 {LOOKUP_LIMIT} SPF allows: receivers fail it (permerror); remove includes",
                out.lookups
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn zone(records: &[(&str, &str)]) -> BTreeMap<String, Vec<String>> {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (n, v) in records {
            m.entry(n.to_string()).or_default().push(v.to_string());
        }
        m
    }

    #[test]
    fn terms_of_a_record() {
        let t = terms(
            "v=spf1 a mx:x.test include:A.test ~include:b.test exists:%{i}.x ptr ip4:1.2.3.4 \
             redirect=c.test -all",
        );
        assert_eq!(t.lookups, 7);
        assert_eq!(t.includes, ["a.test", "b.test"]);
        assert_eq!(t.redirect.as_deref(), Some("c.test"));
        assert!(t.has_all);
        assert_eq!(terms("v=spf1 ip4:1.2.3.4 ip6:::1 -all").lookups, 0);
        assert!(is_spf("v=spf1 -all") && is_spf("V=SPF1") && !is_spf("v=spf10 -all"));
        assert!(!is_spf("google-site-verification=x"));
    }

    #[tokio::test]
    async fn nested_includes_are_counted() {
        let z = zone(&[
            ("a.test", "v=spf1 include:b.test a mx -all"),
            ("b.test", "v=spf1 ip4:10.0.0.0/8 exists:x.test ~all"),
            ("c.test", "v=spf1 ptr -all"),
        ]);
        let c = count(
            "d.test",
            "v=spf1 ip4:127.0.0.1 include:a.test include:c.test -all",
            &z,
        )
        .await;
        // include:a (1) + include:b, a, mx (3) + exists (1); include:c (1) + ptr (1).
        assert_eq!(c.lookups, 7, "{c:?}");
        assert_eq!(
            c.per_term,
            [
                ("include:a.test".to_string(), 5),
                ("include:c.test".to_string(), 2)
            ]
        );
        assert!(c.problems.is_empty() && c.unresolved.is_empty() && c.complete);
        assert!(
            c.summary().starts_with("needs 7 of the 10"),
            "{}",
            c.summary()
        );
    }

    #[tokio::test]
    async fn over_the_limit_through_includes() {
        let z = zone(&[
            ("a.test", "v=spf1 include:b.test include:c.test a mx -all"),
            ("b.test", "v=spf1 a mx ptr exists:e.test -all"),
            ("c.test", "v=spf1 a mx ptr -all"),
        ]);
        let c = count("d.test", "v=spf1 include:a.test -all", &z).await;
        assert!(c.lookups > LOOKUP_LIMIT, "{c:?}");
        assert!(c.problems[0].contains("more than the 10"), "{c:?}");
    }

    #[tokio::test]
    async fn loops_missing_and_double_records_are_problems() {
        let z = zone(&[
            ("a.test", "v=spf1 include:b.test -all"),
            ("b.test", "v=spf1 include:a.test -all"),
            ("two.test", "v=spf1 -all"),
            ("two.test", "v=spf1 a -all"),
            ("nospf.test", "some-verification=1"),
        ]);
        let c = count(
            "d.test",
            "v=spf1 include:a.test include:two.test include:nospf.test include:gone.test -all",
            &z,
        )
        .await;
        let all = c.problems.join("\n");
        assert!(
            all.contains("loop: d.test → a.test → b.test → a.test"),
            "{all}"
        );
        assert!(
            all.contains("two.test (an SPF include of d.test) has 2 SPF records"),
            "{all}"
        );
        assert!(
            all.contains("nospf.test (an SPF include of d.test) has no SPF record"),
            "{all}"
        );
        assert!(
            all.contains("gone.test (an SPF include of d.test) has no SPF record"),
            "{all}"
        );
    }

    #[tokio::test]
    async fn redirect_is_followed_only_without_all() {
        let z = zone(&[("r.test", "v=spf1 a mx -all")]);
        assert_eq!(
            count("d.test", "v=spf1 redirect=r.test", &z).await.lookups,
            3
        );
        assert_eq!(
            count("d.test", "v=spf1 redirect=r.test -all", &z)
                .await
                .lookups,
            1
        );
    }

    struct Failing;
    impl TxtSource for Failing {
        fn txt(&self, name: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send {
            let e = format!("{name}: timed out");
            async move { Err(e) }
        }
    }

    #[tokio::test]
    async fn failed_lookups_make_a_lower_bound() {
        let c = count("d.test", "v=spf1 include:a.test mx -all", &Failing).await;
        assert_eq!(c.lookups, 2);
        assert!(c.problems.is_empty());
        assert_eq!(c.unresolved.len(), 1, "{c:?}");
        assert!(
            c.summary().starts_with("needs at least 2"),
            "{}",
            c.summary()
        );
    }

    #[tokio::test]
    async fn a_wide_tree_stops_at_the_cap() {
        // Every record includes two more: the walk ends over the limit, not after 2^n fetches.
        struct Tree;
        impl TxtSource for Tree {
            fn txt(&self, name: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send {
                let v = format!("v=spf1 include:l.{name} include:r.{name} -all");
                async move { Ok(vec![v]) }
            }
        }
        let c = count("d.test", "v=spf1 include:t.test -all", &Tree).await;
        assert!(!c.complete);
        assert!(c.lookups > LOOKUP_LIMIT);
        assert!(c.problems[0].contains("at least"), "{:?}", c.problems);
    }
}
