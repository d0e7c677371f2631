//! DKIM keys of a SendingDomain: generation and the key Secret's format (pure apart from the
//! random source).
//!
//! The Secret (`<sendingdomain>-dkim`, or `spec.dkim.keySecretRef`) holds the active key set
//! the relays sign with, in the format the RelayPool controller reads: `selector`, `rsa.pem`,
//! `ed25519.pem` (PKCS#8 PEM; with `dual` the Ed25519 selector is `<selector>-ed`). During a
//! rotation it also holds the next set (`next-selector`, `next-rsa.pem`, `next-ed25519.pem`),
//! published but not yet signing, and the retiring sets (`retiring.<selector>.rsa.pem`,
//! `retiring.<selector>.ed25519.pem`), still published so that queued mail signed with them
//! verifies.

use std::collections::BTreeMap;

use base64::Engine;
use mailfleet_api::sendingdomain::DkimAlgorithm;
use rcgen::{KeyPair, PKCS_ED25519, PKCS_RSA_SHA256, PublicKeyData};

use crate::dns::desired::{DkimPublicKey, KeyAlgorithm};

pub const SELECTOR: &str = "selector";
pub const RSA_PEM: &str = "rsa.pem";
pub const ED25519_PEM: &str = "ed25519.pem";
pub const NEXT: &str = "next-";
pub const RETIRING: &str = "retiring.";
/// Suffix of the Ed25519 selector of a dual pair.
pub const ED_SUFFIX: &str = "-ed";

/// Errors of DKIM keys.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("failed to generate a DKIM {algorithm} key: {reason}")]
    Generate {
        algorithm: &'static str,
        reason: String,
    },
    #[error("the DKIM key {key} of selector {selector} is not a valid PKCS#8 PEM key: {reason}")]
    Parse {
        selector: String,
        key: &'static str,
        reason: String,
    },
    #[error("the key Secret has no {key} for algorithm {algorithm:?}")]
    Missing {
        key: &'static str,
        algorithm: DkimAlgorithm,
    },
}

/// The keys behind one selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySet {
    pub selector: String,
    pub rsa_pem: Option<String>,
    pub ed25519_pem: Option<String>,
}

fn generate(
    alg: &'static rcgen::SignatureAlgorithm,
    name: &'static str,
) -> Result<String, DkimError> {
    KeyPair::generate_for(alg)
        .map(|k| k.serialize_pem())
        .map_err(|e| DkimError::Generate {
            algorithm: name,
            reason: e.to_string(),
        })
}

impl KeySet {
    /// [`KeySet::generate`] on the blocking pool: an RSA-2048 key takes a noticeable moment of
    /// CPU, which must not hold up the reconcilers sharing the runtime's workers.
    pub async fn generate_blocking(
        selector: &str,
        algorithm: DkimAlgorithm,
    ) -> Result<KeySet, DkimError> {
        let selector = selector.to_string();
        tokio::task::spawn_blocking(move || KeySet::generate(&selector, algorithm))
            .await
            .map_err(|e| DkimError::Generate {
                algorithm: match algorithm {
                    DkimAlgorithm::Rsa2048 => "rsa2048",
                    DkimAlgorithm::Ed25519 => "ed25519",
                    DkimAlgorithm::Dual => "rsa2048 + ed25519",
                },
                reason: format!("the key generation task failed: {e}"),
            })?
    }

    /// New keys for `selector`: RSA-2048 and/or Ed25519 as the algorithm asks.
    pub fn generate(selector: &str, algorithm: DkimAlgorithm) -> Result<KeySet, DkimError> {
        let rsa = matches!(algorithm, DkimAlgorithm::Rsa2048 | DkimAlgorithm::Dual);
        let ed = matches!(algorithm, DkimAlgorithm::Ed25519 | DkimAlgorithm::Dual);
        Ok(KeySet {
            selector: selector.to_string(),
            rsa_pem: rsa
                .then(|| generate(&PKCS_RSA_SHA256, "rsa2048"))
                .transpose()?,
            ed25519_pem: ed.then(|| generate(&PKCS_ED25519, "ed25519")).transpose()?,
        })
    }

    /// Whether the set has every key `algorithm` needs.
    pub fn check(&self, algorithm: DkimAlgorithm) -> Result<(), DkimError> {
        let rsa = matches!(algorithm, DkimAlgorithm::Rsa2048 | DkimAlgorithm::Dual);
        let ed = matches!(algorithm, DkimAlgorithm::Ed25519 | DkimAlgorithm::Dual);
        if rsa && self.rsa_pem.is_none() {
            return Err(DkimError::Missing {
                key: RSA_PEM,
                algorithm,
            });
        }
        if ed && self.ed25519_pem.is_none() {
            return Err(DkimError::Missing {
                key: ED25519_PEM,
                algorithm,
            });
        }
        Ok(())
    }

    /// The public keys to publish, under the selectors the relays sign with.
    pub fn public_keys(&self, algorithm: DkimAlgorithm) -> Result<Vec<DkimPublicKey>, DkimError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let parse = |pem: &str, key: &'static str| {
            KeyPair::from_pem(pem).map_err(|e| DkimError::Parse {
                selector: self.selector.clone(),
                key,
                reason: e.to_string(),
            })
        };
        let mut out = Vec::new();
        let want_rsa = algorithm != DkimAlgorithm::Ed25519;
        if let (true, Some(pem)) = (want_rsa, &self.rsa_pem) {
            let k = parse(pem, RSA_PEM)?;
            out.push(DkimPublicKey {
                selector: self.selector.clone(),
                algorithm: KeyAlgorithm::Rsa,
                public_key_b64: b64.encode(k.subject_public_key_info()),
            });
        }
        let want_ed = algorithm != DkimAlgorithm::Rsa2048;
        if let (true, Some(pem)) = (want_ed, &self.ed25519_pem) {
            let k = parse(pem, ED25519_PEM)?;
            let selector = if algorithm == DkimAlgorithm::Dual {
                format!("{}{ED_SUFFIX}", self.selector)
            } else {
                self.selector.clone()
            };
            out.push(DkimPublicKey {
                selector,
                algorithm: KeyAlgorithm::Ed25519,
                // RFC 8463: the raw 32-byte key, not the SubjectPublicKeyInfo.
                public_key_b64: b64.encode(k.der_bytes()),
            });
        }
        Ok(out)
    }
}

/// Every key set a key Secret holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretKeys {
    pub active: Option<KeySet>,
    pub next: Option<KeySet>,
    pub retiring: Vec<KeySet>,
}

fn text(data: &BTreeMap<String, Vec<u8>>, key: &str) -> Option<String> {
    data.get(key)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .filter(|s| !s.trim().is_empty())
}

impl SecretKeys {
    /// Reads a key Secret's data. A referenced Secret without `selector` gets `fallback`.
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>, fallback: Option<&str>) -> SecretKeys {
        let set = |prefix: &str, selector: Option<String>| {
            let rsa = text(data, &format!("{prefix}{RSA_PEM}"));
            let ed = text(data, &format!("{prefix}{ED25519_PEM}"));
            let selector = selector?;
            (rsa.is_some() || ed.is_some()).then_some(KeySet {
                selector,
                rsa_pem: rsa,
                ed25519_pem: ed,
            })
        };
        let active = set(
            "",
            text(data, SELECTOR)
                .map(|s| s.trim().to_string())
                .or_else(|| fallback.map(str::to_string)),
        );
        let next = set(
            NEXT,
            text(data, &format!("{NEXT}{SELECTOR}")).map(|s| s.trim().to_string()),
        );
        let mut retiring_selectors: Vec<String> = data
            .keys()
            .filter_map(|k| k.strip_prefix(RETIRING))
            .filter_map(|k| {
                k.strip_suffix(&format!(".{RSA_PEM}"))
                    .or_else(|| k.strip_suffix(&format!(".{ED25519_PEM}")))
            })
            .map(str::to_string)
            .collect();
        retiring_selectors.dedup();
        let retiring = retiring_selectors
            .into_iter()
            .filter_map(|s| set(&format!("{RETIRING}{s}."), Some(s)))
            .collect();
        SecretKeys {
            active,
            next,
            retiring,
        }
    }

    /// The Secret's data (string values).
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut put = |prefix: &str, set: &KeySet, with_selector: bool| {
            if with_selector {
                out.insert(format!("{prefix}{SELECTOR}"), set.selector.clone());
            }
            if let Some(p) = &set.rsa_pem {
                out.insert(format!("{prefix}{RSA_PEM}"), p.clone());
            }
            if let Some(p) = &set.ed25519_pem {
                out.insert(format!("{prefix}{ED25519_PEM}"), p.clone());
            }
        };
        if let Some(a) = &self.active {
            put("", a, true);
        }
        if let Some(n) = &self.next {
            put(NEXT, n, true);
        }
        for r in &self.retiring {
            put(&format!("{RETIRING}{}.", r.selector), r, false);
        }
        out
    }

    /// Every published set: active, next, retiring.
    pub fn published(&self) -> impl Iterator<Item = &KeySet> {
        self.active
            .iter()
            .chain(self.next.iter())
            .chain(self.retiring.iter())
    }
}

/// `<prefix>-<yyyymmdd>`, made unique against `taken` with `-2`, `-3`...
pub fn selector(prefix: &str, now: k8s_openapi::jiff::Timestamp, taken: &[&str]) -> String {
    let base = format!("{prefix}-{}", now.strftime("%Y%m%d"));
    let mut candidate = base.clone();
    let mut n = 2;
    while taken
        .iter()
        .any(|t| *t == candidate || t.strip_suffix(ED_SUFFIX) == Some(candidate.as_str()))
    {
        candidate = format!("{base}-{n}");
        n += 1;
    }
    candidate
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dual_keys_round_trip_through_secret_data_and_publish_two_selectors() {
        let set = KeySet::generate("mf-20260101", DkimAlgorithm::Dual).unwrap();
        assert!(
            set.rsa_pem
                .as_deref()
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let keys = SecretKeys {
            active: Some(set.clone()),
            next: None,
            retiring: vec![KeySet {
                selector: "mf-20251001".into(),
                ..set.clone()
            }],
        };
        let data: BTreeMap<String, Vec<u8>> = keys
            .to_data()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        assert_eq!(
            data.keys().cloned().collect::<Vec<_>>(),
            [
                "ed25519.pem",
                "retiring.mf-20251001.ed25519.pem",
                "retiring.mf-20251001.rsa.pem",
                "rsa.pem",
                "selector"
            ]
        );
        assert_eq!(SecretKeys::from_data(&data, None), keys);
        let pubs = set.public_keys(DkimAlgorithm::Dual).unwrap();
        assert_eq!(pubs[0].selector, "mf-20260101");
        assert_eq!(pubs[1].selector, "mf-20260101-ed");
        let b64 = base64::engine::general_purpose::STANDARD;
        // SPKI of RSA-2048 is 294 bytes; an Ed25519 key is 32.
        assert_eq!(b64.decode(&pubs[0].public_key_b64).unwrap().len(), 294);
        assert_eq!(b64.decode(&pubs[1].public_key_b64).unwrap().len(), 32);
    }

    #[test]
    fn ed25519_only_uses_the_plain_selector() {
        let set = KeySet::generate("s", DkimAlgorithm::Ed25519).unwrap();
        assert!(set.rsa_pem.is_none());
        assert!(set.check(DkimAlgorithm::Ed25519).is_ok());
        assert!(set.check(DkimAlgorithm::Dual).is_err());
        let pubs = set.public_keys(DkimAlgorithm::Ed25519).unwrap();
        assert_eq!(pubs.len(), 1);
        assert_eq!(pubs[0].selector, "s");
    }

    #[test]
    fn selectors_are_dated_and_unique() {
        let t: k8s_openapi::jiff::Timestamp = "2026-03-04T10:00:00Z".parse().unwrap();
        assert_eq!(selector("mf", t, &[]), "mf-20260304");
        assert_eq!(selector("mf", t, &["mf-20260304"]), "mf-20260304-2");
        assert_eq!(
            selector("mf", t, &["mf-20260304", "mf-20260304-2-ed"]),
            "mf-20260304-3"
        );
    }
}
