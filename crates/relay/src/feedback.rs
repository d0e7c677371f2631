//! The complaint feedback endpoint (`POST /v1/feedback` on the HTTP listener): receivers'
//! feedback loops post ARF reports (RFC 5965) here. The pure part checks the bearer token
//! ([`check_token`]) and turns a report into a [`Complaint`] attributed to an egress address,
//! a sending domain and a recipient ([`attribute`], parsing with mail-auth); the
//! [`FeedbackService`] classifies the recipient's provider group, makes the complaint durable
//! (coordinated mode: a report of its own, before the answer), suppresses the recipient locally
//! and counts it in the metrics. The HTTP framing lives in [`http`](crate::http).

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mail_auth::AuthenticatedMessage;
use mail_auth::report::{Feedback, FeedbackType};

use crate::delivery::Delivery;
use crate::metrics::Metrics;
use crate::shaping::ProviderGroup;
use crate::suppression::Complaint;

/// Largest report body accepted (the report quotes the original message).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How long classifying the recipient's provider group (an MX lookup) may take.
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses a SHA-256 written as 64 hex digits (any case).
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim().as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// Whether an `Authorization` header value carries a bearer token whose SHA-256 is
/// `expected`. The digests are compared in constant time.
pub fn check_token(authorization: Option<&str>, expected: &[u8; 32]) -> bool {
    let Some(value) = authorization else {
        return false;
    };
    let value = value.trim();
    let Some((scheme, token)) = value.split_once(' ') else {
        return false;
    };
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return false;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    aws_lc_rs::constant_time::verify_slices_are_equal(digest.as_ref(), expected).is_ok()
}

/// Why a report is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    /// Not an ARF report at all (400).
    #[error("not an ARF report: {0}")]
    Unparsable(String),
    /// An ARF report that cannot be attributed (422).
    #[error("{0}")]
    Unattributable(String),
}

/// What [`attribute`] found, before the provider group is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributed {
    pub address: IpAddr,
    /// The configured sending domain (lowercased).
    pub domain: String,
    pub recipient: String,
}

/// The address inside `<...>` or the first address-looking word of a header value.
fn first_address(value: &str) -> Option<String> {
    let value = value.trim();
    let candidate = match (value.find('<'), value.find('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value
            .split([',', ' ', '\t'])
            .find(|w| w.contains('@'))
            .unwrap_or(""),
    };
    let candidate = candidate.trim().trim_start_matches("rfc822;").trim();
    crate::smtp::address_domain(candidate).map(|_| candidate.to_string())
}

fn header_value(raw: &[u8]) -> String {
    // Unfold: continuation lines are joined with a space.
    String::from_utf8_lossy(raw)
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Attributes a complete ARF message (multipart/report; report-type=feedback-report) to an
/// egress address (`Source-IP`), a configured sending domain (`Reported-Domain`, else the
/// original message's DKIM `d=`, else its From domain; subdomains count for their sending
/// domain) and a recipient (`Original-Rcpt-To`, else the original message's To).
/// `sending_domains` are lowercased.
pub fn attribute(body: &[u8], sending_domains: &[String]) -> Result<Attributed, FeedbackError> {
    let feedback = Feedback::parse_rfc5322(body).map_err(|e| {
        FeedbackError::Unparsable(match e {
            mail_auth::report::Error::NoReportsFound => {
                "no message/feedback-report part with a Feedback-Type field".into()
            }
            mail_auth::report::Error::MailParseError => "the message does not parse".into(),
            other => format!("{other:?}"),
        })
    })?;
    let unattributable = |m: String| Err(FeedbackError::Unattributable(m));
    match feedback.feedback_type {
        FeedbackType::Abuse | FeedbackType::Fraud | FeedbackType::Virus => {}
        other => {
            return unattributable(format!(
                "Feedback-Type {other:?} is not a complaint (abuse, fraud or virus)"
            ));
        }
    }
    let Some(address) = feedback.source_ip else {
        return unattributable("Source-IP is missing or is not an IP address".into());
    };
    let original = feedback
        .message
        .as_deref()
        .or(feedback.headers.as_deref())
        .and_then(|m| AuthenticatedMessage::parse(m.as_bytes()));

    // Sending domain: Reported-Domain, then DKIM d=, then the From domain.
    let mut seen: Vec<String> = Vec::new();
    seen.extend(
        feedback
            .reported_domain
            .iter()
            .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase()),
    );
    if let Some(m) = &original {
        seen.extend(
            m.dkim_headers
                .iter()
                .map(|h| h.header.d.trim_end_matches('.').to_ascii_lowercase()),
        );
        seen.extend(m.from.iter().filter_map(|f| crate::smtp::address_domain(f)));
    }
    let mut distinct = std::collections::HashSet::new();
    seen.retain(|d| !d.is_empty() && distinct.insert(d.clone()));
    let Some(domain) = seen
        .iter()
        .find_map(|d| crate::smtp::matching_sending_domain(sending_domains, d))
    else {
        return unattributable(if seen.is_empty() {
            "no sending domain: the report has no Reported-Domain and no original message \
             with a DKIM signature or a From address"
                .into()
        } else {
            format!(
                "none of the reported domains ({}) is a sending domain of this relay",
                seen.join(", ")
            )
        });
    };

    let recipient = feedback
        .original_rcpt_to
        .as_deref()
        .and_then(first_address)
        .or_else(|| {
            original.as_ref().and_then(|m| {
                m.headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(b"to"))
                    .and_then(|(_, v)| first_address(&header_value(v)))
            })
        });
    let Some(recipient) = recipient else {
        return unattributable(
            "no recipient: Original-Rcpt-To is missing and the original message has no To \
             address"
                .into(),
        );
    };
    Ok(Attributed {
        address,
        domain: domain.to_string(),
        recipient,
    })
}

/// What the endpoint answers: status, JSON body, and the metrics label of the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub result: &'static str,
}

impl Answer {
    fn error(status: u16, result: &'static str, message: &str) -> Answer {
        Answer {
            status,
            body: serde_json::json!({ "error": message }).to_string(),
            result,
        }
    }
}

/// The endpoint's state: the token hash in force and what a complaint touches.
pub struct FeedbackService {
    token: RwLock<Option<[u8; 32]>>,
    delivery: Arc<Delivery>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for FeedbackService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedbackService")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

impl FeedbackService {
    pub fn new(token_sha256: Option<&str>, delivery: Arc<Delivery>, metrics: Arc<Metrics>) -> Self {
        let s = FeedbackService {
            token: RwLock::new(None),
            delivery,
            metrics,
        };
        s.set_token(token_sha256);
        s
    }

    /// Sets the SHA-256 (hex) of the accepted token; `None`, empty or malformed disables the
    /// endpoint.
    pub fn set_token(&self, token_sha256: Option<&str>) {
        let parsed = token_sha256
            .filter(|h| !h.trim().is_empty())
            .and_then(|h| {
                let p = parse_sha256_hex(h);
                if p.is_none() {
                    tracing::error!(
                        "the feedback token hash is not a SHA-256 in hex: the feedback endpoint is disabled"
                    );
                }
                p
            });
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = parsed;
    }

    pub fn enabled(&self) -> bool {
        self.token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Checks that the endpoint is enabled and the caller authorized: `None` when it may go
    /// on, else the answer (404 or 401). Called before the body is read.
    pub fn admit(&self, authorization: Option<&str>) -> Option<Answer> {
        let token = *self.token.read().unwrap_or_else(|e| e.into_inner());
        match token {
            None => Some(Answer::error(
                404,
                "disabled",
                "the feedback endpoint is not enabled on this relay",
            )),
            Some(expected) if !check_token(authorization, &expected) => Some(Answer::error(
                401,
                "unauthorized",
                "a valid `Authorization: Bearer <token>` is required",
            )),
            Some(_) => None,
        }
    }

    /// Handles an admitted report: attributes it, makes it durable, suppresses the
    /// recipient, counts it.
    pub async fn handle(&self, body: &[u8]) -> Answer {
        let domains = self.delivery.sending_domains();
        let a = match attribute(body, &domains) {
            Ok(a) => a,
            Err(e @ FeedbackError::Unparsable(_)) => {
                return Answer::error(400, "bad_request", &e.to_string());
            }
            Err(e @ FeedbackError::Unattributable(_)) => {
                return Answer::error(422, "unattributable", &e.to_string());
            }
        };
        let group = self.classify(&a.recipient).await;
        let complaint = Complaint {
            address: a.address,
            group,
            domain: a.domain.clone(),
            recipient: a.recipient.clone(),
        };
        let suppressions = Arc::clone(&self.delivery.suppressions);
        if let Some(sink) = suppressions.durable() {
            let c = complaint.clone();
            let stored = tokio::task::spawn_blocking(move || sink.complaint(&c)).await;
            match stored {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "failed to store a complaint");
                    return Answer::error(
                        503,
                        "failed",
                        "the complaint could not be stored, try again later",
                    );
                }
                Err(_) => {
                    return Answer::error(
                        503,
                        "failed",
                        "the complaint could not be stored, try again later",
                    );
                }
            }
        }
        suppressions.add(&complaint.domain, &complaint.recipient);
        self.metrics.complaint(complaint.address, complaint.group);
        tracing::info!(
            address = %complaint.address,
            domain = %complaint.domain,
            provider = %complaint.group,
            "complaint recorded"
        );
        Answer {
            status: 202,
            body: serde_json::json!({
                "address": complaint.address.to_string(),
                "domain": complaint.domain,
                "recipient": complaint.recipient,
            })
            .to_string(),
            result: "accepted",
        }
    }

    /// The provider group of the recipient's domain, by its MX as for deliveries; `other`
    /// when the lookup fails or takes too long.
    async fn classify(&self, recipient: &str) -> ProviderGroup {
        let Some(domain) = crate::smtp::address_domain(recipient) else {
            return ProviderGroup::Other;
        };
        match tokio::time::timeout(CLASSIFY_TIMEOUT, self.delivery.route(&domain)).await {
            Ok(Ok(route)) => route.group,
            _ => ProviderGroup::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../tests/data/arf-complaint.eml");

    fn domains() -> Vec<String> {
        vec!["example.test".into(), "other.test".into()]
    }

    fn sha256_hex(s: &str) -> String {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn sample_report_is_attributed() {
        let a = attribute(SAMPLE.as_bytes(), &domains()).unwrap();
        assert_eq!(
            a,
            Attributed {
                address: "127.0.0.2".parse().unwrap(),
                domain: "example.test".into(),
                recipient: "complainer@dest.example.test".into(),
            }
        );
    }

    #[test]
    fn domain_falls_back_to_dkim_then_from_and_recipient_to_the_to_header() {
        // Without Reported-Domain and Original-Rcpt-To.
        let text = SAMPLE
            .replace("Reported-Domain: example.test\r\n", "")
            .replace("Original-Rcpt-To: <complainer@dest.example.test>\r\n", "");
        let a = attribute(text.as_bytes(), &domains()).unwrap();
        assert_eq!(a.domain, "example.test");
        assert_eq!(a.recipient, "complainer@dest.example.test");
        // The DKIM d= names a subdomain of a sending domain: it counts for that domain.
        let text = text.replace("d=example.test;", "d=news.other.test;");
        let a = attribute(text.as_bytes(), &domains()).unwrap();
        assert_eq!(a.domain, "other.test");
        // Without a DKIM signature, the From domain decides.
        let text = text
            .replace("DKIM-Signature:", "X-Removed:")
            .replace("news@example.test>", "news@mail.other.test>");
        let a = attribute(text.as_bytes(), &domains()).unwrap();
        assert_eq!(a.domain, "other.test");
    }

    #[test]
    fn unattributable_reports_say_why() {
        let err = |text: String| attribute(text.as_bytes(), &domains()).unwrap_err();
        let e = err(SAMPLE.replace("Source-IP: 127.0.0.2", "Source-IP: not-an-ip"));
        assert!(
            matches!(&e, FeedbackError::Unattributable(m) if m.contains("Source-IP")),
            "{e}"
        );
        let e = attribute(SAMPLE.as_bytes(), &["elsewhere.test".to_string()]).unwrap_err();
        assert!(
            matches!(&e, FeedbackError::Unattributable(m) if m.contains("(example.test)") && m.contains("is a sending domain")),
            "{e}"
        );
        let e = err(SAMPLE.replace("Feedback-Type: abuse", "Feedback-Type: not-spam"));
        assert!(
            matches!(&e, FeedbackError::Unattributable(m) if m.contains("not a complaint")),
            "{e}"
        );
        let e = err(SAMPLE
            .replace("Original-Rcpt-To: <complainer@dest.example.test>\r\n", "")
            .replace("To: complainer@dest.example.test\r\n", ""));
        assert!(
            matches!(&e, FeedbackError::Unattributable(m) if m.contains("no recipient")),
            "{e}"
        );
        // Not a report at all.
        let e = attribute(b"Subject: hello\r\n\r\nnot a report\r\n", &domains()).unwrap_err();
        assert!(matches!(e, FeedbackError::Unparsable(_)), "{e}");
        let e = err(SAMPLE.replace("Feedback-Type: abuse\r\n", ""));
        assert!(matches!(e, FeedbackError::Unparsable(_)), "{e}");
    }

    #[test]
    fn bearer_token_is_checked_against_its_hash() {
        let expected = parse_sha256_hex(&sha256_hex("s3cret-token")).unwrap();
        assert!(check_token(Some("Bearer s3cret-token"), &expected));
        assert!(check_token(Some("bearer  s3cret-token "), &expected));
        assert!(!check_token(None, &expected));
        assert!(!check_token(Some("Bearer wrong"), &expected));
        assert!(!check_token(Some("Basic s3cret-token"), &expected));
        assert!(!check_token(Some("s3cret-token"), &expected));
        assert!(!check_token(Some("Bearer "), &expected));
        assert_eq!(
            parse_sha256_hex(&sha256_hex("x").to_ascii_uppercase()),
            parse_sha256_hex(&sha256_hex("x"))
        );
        assert!(parse_sha256_hex("abc").is_none());
        assert!(parse_sha256_hex(&"zz".repeat(32)).is_none());
    }
}
