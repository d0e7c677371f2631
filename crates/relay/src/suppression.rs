//! Recipients not to send to any more, learnt by this relay: hard bounces (from [`delivery`])
//! and complaints (from [`feedback`]). They are refused at RCPT at once (the configured
//! `suppressedRecipients` are refused too, in [`smtp`]), and, in coordinated mode, handed to a
//! [`DurableEvents`] sink ([`coordinator`]) that makes them durable and reports them, so the
//! operator can push them to every relay of the fleet.
//!
//! The local set lives in memory: in coordinated mode an entry is forgotten once a pushed
//! configuration lists it (from then on the configuration refuses it, and an operator who
//! lifts a suppression is obeyed); standalone, it lasts until the relay restarts.
//!
//! [`delivery`]: crate::delivery
//! [`feedback`]: crate::feedback
//! [`smtp`]: crate::smtp
//! [`coordinator`]: crate::coordinator

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use crate::shaping::ProviderGroup;

/// Why a recipient is suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    HardBounce,
    Complaint,
}

/// A recipient to suppress for one sending domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Suppression {
    /// The sending domain (lowercased).
    pub domain: String,
    /// The recipient address, as given in RCPT TO.
    pub recipient: String,
    pub reason: Reason,
}

/// A complaint (an ARF report) attributed to an egress address and a sending domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complaint {
    /// The egress address that sent the mail complained about (`Source-IP`).
    pub address: IpAddr,
    /// The provider group of the recipient's domain.
    pub group: ProviderGroup,
    /// The sending domain (lowercased).
    pub domain: String,
    pub recipient: String,
}

/// A failure of making an event durable; the event must then not be acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("failed to record the {what} durably: {reason}")]
pub struct RecordError {
    pub what: &'static str,
    pub reason: String,
}

/// Where hard bounces and complaints become durable (coordinated mode: the report store).
/// Both calls block (they fsync): run them on the blocking pool.
pub trait DurableEvents: Send + Sync {
    /// Records a suppression for the next report; returns once it is on stable storage.
    fn suppression(&self, s: &Suppression) -> Result<(), RecordError>;
    /// Records a complaint (a `COMPLAINT` counter and its suppression); returns once it is on
    /// stable storage.
    fn complaint(&self, c: &Complaint) -> Result<(), RecordError>;
}

/// The relay's own suppressions and the sink that makes new ones durable.
#[derive(Default)]
pub struct Suppressions {
    /// Lowercased recipients per lowercased sending domain.
    local: RwLock<HashMap<String, HashSet<String>>>,
    durable: RwLock<Option<Arc<dyn DurableEvents>>>,
}

impl std::fmt::Debug for Suppressions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suppressions")
            .field("local", &self.len())
            .finish_non_exhaustive()
    }
}

fn norm(s: &str) -> String {
    s.trim().trim_end_matches('.').to_ascii_lowercase()
}

impl Suppressions {
    /// Refuses `recipient` for `domain` from now on.
    pub fn add(&self, domain: &str, recipient: &str) {
        self.local
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(norm(domain))
            .or_default()
            .insert(norm(recipient));
    }

    /// Whether `recipient` is suppressed locally for `domain` (both compared lowercased).
    pub fn contains(&self, domain: &str, recipient: &str) -> bool {
        self.local
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&norm(domain))
            .is_some_and(|set| set.contains(&norm(recipient)))
    }

    /// Local suppressions in all domains.
    pub fn len(&self) -> usize {
        self.local
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(HashSet::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the local entries that `configured` (suppressed recipients per sending domain,
    /// lowercased, as pushed) already lists.
    pub fn forget_configured(&self, configured: &HashMap<String, HashSet<String>>) {
        let mut local = self.local.write().unwrap_or_else(|e| e.into_inner());
        for (domain, set) in local.iter_mut() {
            if let Some(c) = configured.get(domain) {
                set.retain(|r| !c.contains(r));
            }
        }
        local.retain(|_, set| !set.is_empty());
    }

    /// Installs the sink that makes new events durable (coordinated mode).
    pub fn set_durable(&self, sink: Arc<dyn DurableEvents>) {
        *self.durable.write().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// The durable sink, if any (none when standalone).
    pub fn durable(&self) -> Option<Arc<dyn DurableEvents>> {
        self.durable
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_set_is_case_insensitive_and_forgets_what_the_configuration_lists() {
        let s = Suppressions::default();
        s.add("Example.TEST", "Gone@Dest.example.test");
        s.add("example.test", "other@dest.example.test");
        assert!(s.contains("example.test", "gone@dest.example.test"));
        assert!(!s.contains("news.example.test", "gone@dest.example.test"));
        let configured = HashMap::from([(
            "example.test".to_string(),
            HashSet::from(["gone@dest.example.test".to_string()]),
        )]);
        s.forget_configured(&configured);
        assert!(!s.contains("example.test", "gone@dest.example.test"));
        assert!(s.contains("example.test", "other@dest.example.test"));
        assert_eq!(s.len(), 1);
    }
}
