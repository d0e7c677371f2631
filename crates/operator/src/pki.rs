//! The coordinator's certificates: a CA kept in a Secret, the coordinator's server certificate
//! and one client certificate per RelayPool.
//!
//! Relays prove which pool they belong to with the client certificate of that pool; the
//! coordinator knows a certificate by its SHA-256 fingerprint (it issued them all), so no
//! certificate parsing is needed on the server side and deleting a pool's identity Secret
//! revokes its certificate.

use std::collections::BTreeMap;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Errors of issuing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA Secret is incomplete: key {0} is missing")]
    Incomplete(&'static str),
    #[error("the CA Secret holds an unusable key: {0}")]
    BadKey(rcgen::Error),
    #[error("the certificate PEM does not parse")]
    BadPem,
}

/// Keys of the CA Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";

/// The coordinator's certificate authority.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "mailfleet coordinator CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl CertificateAuthority {
    /// A new CA (the first operator replica that finds no CA Secret creates one).
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let params = ca_params()?;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA stored in a Secret's data.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, PkiError> {
        let cert = data
            .get(CA_CERT_KEY)
            .ok_or(PkiError::Incomplete(CA_CERT_KEY))?;
        let key = data
            .get(CA_KEY_KEY)
            .ok_or(PkiError::Incomplete(CA_KEY_KEY))?;
        let key = KeyPair::from_pem(&String::from_utf8_lossy(key)).map_err(PkiError::BadKey)?;
        Ok(CertificateAuthority {
            cert_pem: String::from_utf8_lossy(cert).into_owned(),
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// The Secret data that stores this CA.
    pub fn to_secret_data(&self) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            (CA_CERT_KEY.to_string(), self.cert_pem.clone().into_bytes()),
            (
                CA_KEY_KEY.to_string(),
                self.issuer.key().serialize_pem().into_bytes(),
            ),
        ])
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The coordinator's serving certificate for [`mailfleet_proto::COORDINATOR_SERVER_NAME`].
    pub fn issue_server(&self) -> Result<Issued, PkiError> {
        let mut params =
            CertificateParams::new(vec![mailfleet_proto::COORDINATOR_SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, mailfleet_proto::COORDINATOR_SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// The client certificate of the relays of one pool.
    pub fn issue_pool_client(&self, namespace: &str, pool: &str) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{namespace}/{pool}"));
        params.subject_alt_names = vec![SanType::URI(
            format!("mailfleet://relaypool/{namespace}/{pool}").try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<Issued, PkiError> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// SHA-256 of the DER of the first certificate in a PEM chain.
pub fn fingerprint_pem(pem: &str) -> Result<[u8; 32], PkiError> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or(PkiError::BadPem)?
        .map_err(|_| PkiError::BadPem)?;
    Ok(fingerprint_der(&der))
}

/// SHA-256 of a DER certificate.
pub fn fingerprint_der(der: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
