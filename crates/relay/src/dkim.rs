//! DKIM signing of accepted mail (mail-auth), before it reaches the spool, so a restart never
//! signs twice and delivery just sends bytes. Each sending domain may have several keys
//! (RSA-2048 for everyone, Ed25519 in addition); all of them sign. The header set is RFC 6376
//! §5.4.1's recommendation; every listed header that is absent is signed as absent by
//! mail-auth, and From is listed twice so a second From cannot be added (over-signing).

use std::collections::HashMap;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use crate::config::{DkimAlgorithm, DkimKeyConfig, SendingDomainConfig};

/// Errors of loading keys or signing, with the key concerned.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("failed to read dkim key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("failed to load dkim key {selector} of {domain}: {reason}")]
    Key {
        domain: String,
        selector: String,
        reason: String,
    },
    #[error("failed to sign for {domain} with selector {selector}: {reason}")]
    Sign {
        domain: String,
        selector: String,
        reason: String,
    },
}

/// Headers signed, in the order of RFC 6376 §5.4.1; `From` twice to over-sign it.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
];

enum Key {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

struct NamedKey {
    selector: String,
    key: Key,
}

/// Signers of every sending domain.
#[derive(Default)]
pub struct Signer {
    domains: HashMap<String, Vec<NamedKey>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("domains", &self.domains.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn load_key(domain: &str, k: &DkimKeyConfig) -> Result<Key, DkimError> {
    let pem = match (&k.private_key_pem, &k.private_key_file) {
        (Some(p), _) => p.clone(),
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|source| DkimError::Read {
            path: path.display().to_string(),
            source,
        })?,
        (None, None) => String::new(),
    };
    let err = |reason: String| DkimError::Key {
        domain: domain.to_string(),
        selector: k.selector.clone(),
        reason,
    };
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| err(e.to_string()))?;
    let headers = SIGNED_HEADERS.iter().copied();
    Ok(match k.algorithm {
        DkimAlgorithm::Rsa => {
            let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| err(e.to_string()))?;
            Key::Rsa(
                DkimSigner::from_key(key)
                    .domain(domain)
                    .selector(&k.selector)
                    .headers(headers)
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed),
            )
        }
        DkimAlgorithm::Ed25519 => {
            let PrivateKeyDer::Pkcs8(p8) = der else {
                return Err(err("ed25519 keys must be PKCS#8".into()));
            };
            let key = Ed25519Key::from_pkcs8_der(p8.secret_pkcs8_der())
                .map_err(|e| err(e.to_string()))?;
            Key::Ed25519(
                DkimSigner::from_key(key)
                    .domain(domain)
                    .selector(&k.selector)
                    .headers(headers)
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed),
            )
        }
    })
}

impl Signer {
    pub fn new(domains: &[SendingDomainConfig]) -> Result<Self, DkimError> {
        let mut out = HashMap::new();
        for d in domains {
            let domain = d.domain.to_ascii_lowercase();
            let keys = d
                .dkim
                .iter()
                .map(|k| {
                    Ok(NamedKey {
                        selector: k.selector.clone(),
                        key: load_key(&domain, k)?,
                    })
                })
                .collect::<Result<Vec<_>, DkimError>>()?;
            out.insert(domain, keys);
        }
        Ok(Signer { domains: out })
    }

    /// The selectors `domain` signs with, comma-separated (empty without keys).
    pub fn selectors(&self, domain: &str) -> String {
        self.domains
            .get(domain)
            .map(|keys| {
                keys.iter()
                    .map(|k| k.selector.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    }

    /// The `DKIM-Signature` header lines (CRLF-terminated) for `message`, signed by `domain`'s
    /// keys; empty when the domain has no keys.
    pub fn sign(&self, domain: &str, message: &[u8]) -> Result<Vec<u8>, DkimError> {
        let Some(keys) = self.domains.get(domain) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for k in keys {
            let sig = match &k.key {
                Key::Rsa(s) => s.sign(message),
                Key::Ed25519(s) => s.sign(message),
            };
            // A message with none of the signed headers (not even From) cannot carry a
            // meaningful signature; deliver it unsigned rather than refuse it forever.
            if let Err(mail_auth::Error::NoHeadersFound) = sig {
                return Ok(Vec::new());
            }
            let sig = sig.map_err(|e| DkimError::Sign {
                domain: domain.to_string(),
                selector: k.selector.clone(),
                reason: e.to_string(),
            })?;
            out.extend_from_slice(sig.to_header().as_bytes());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_with_every_key_and_over_signs_from() {
        let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256);
        // rcgen cannot generate RSA keys with aws-lc on every version; fall back to Ed25519 only.
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut dkim = vec![DkimKeyConfig {
            selector: "ed".into(),
            algorithm: DkimAlgorithm::Ed25519,
            private_key_pem: Some(ed.serialize_pem()),
            private_key_file: None,
        }];
        if let Ok(rsa) = &rsa {
            dkim.push(DkimKeyConfig {
                selector: "rsa".into(),
                algorithm: DkimAlgorithm::Rsa,
                private_key_pem: Some(rsa.serialize_pem()),
                private_key_file: None,
            });
        }
        let signer = Signer::new(&[SendingDomainConfig {
            domain: "example.test".into(),
            dkim,
            suppressed_recipients: Vec::new(),
            addresses: Vec::new(),
        }])
        .unwrap();
        let msg = b"From: a@example.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nbody\r\n";
        let headers = String::from_utf8(signer.sign("example.test", msg).unwrap()).unwrap();
        assert!(headers.contains("s=ed"), "{headers}");
        assert!(headers.contains("a=ed25519-sha256"), "{headers}");
        if rsa.is_ok() {
            assert!(headers.contains("a=rsa-sha256"), "{headers}");
        }
        let unfolded = headers.replace("\r\n\t", "").replace("\r\n ", "");
        let h = unfolded
            .split("h=")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .unwrap()
            .to_ascii_lowercase();
        assert_eq!(h.matches("from").count(), 2, "{h}");
        assert!(signer.sign("other.test", msg).unwrap().is_empty());
        // A message without From is still accepted (signed over absent headers), not refused.
        assert!(
            signer
                .sign("example.test", b"X-Foo: 1\r\n\r\nbody\r\n")
                .is_ok()
        );
    }
}
