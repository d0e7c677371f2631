//! SMTP out: one connection to a receiving MX, opened from a chosen egress address (bound
//! before connect) with that address's EHLO name, upgraded with opportunistic STARTTLS, and
//! reused for several transactions. Also the classification of replies into outcomes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;

/// Errors of one connection; all of them mean "try later" for the mail concerned.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to connect from {source_ip} to {target}: {source}")]
    Connect {
        source_ip: IpAddr,
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error("timed out talking to {target} during {stage}")]
    Timeout {
        target: SocketAddr,
        stage: &'static str,
    },
    #[error("connection to {target} failed during {stage}: {source}")]
    Io {
        target: SocketAddr,
        stage: &'static str,
        source: std::io::Error,
    },
    #[error("{target} answered {stage} with {reply}")]
    Refused {
        target: SocketAddr,
        stage: &'static str,
        reply: Reply,
    },
    #[error("malformed reply from {target}")]
    Protocol { target: SocketAddr },
}

impl ClientError {
    /// The reply to report for the mail concerned: the server's own when there is one.
    pub fn as_reply(&self) -> Reply {
        match self {
            ClientError::Refused { reply, .. } => reply.clone(),
            other => Reply {
                code: 451,
                text: format!("4.4.1 {other}"),
            },
        }
    }
}

/// A complete SMTP reply (multi-line text joined with spaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

impl Reply {
    /// The enhanced status code (RFC 3463) at the start of the text, if any.
    pub fn enhanced(&self) -> Option<(u8, u16, u16)> {
        let first = self.text.split_whitespace().next()?;
        let mut parts = first.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some((class, subject, detail))
    }
}

/// What happened to one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Delivered,
    /// Temporary failure: retried later.
    Deferred,
    /// Permanent failure about the recipient or the message: DSN to the sender.
    Bounced,
    /// Permanent refusal for policy or reputation reasons (5.7.x, blocklists): DSN too, and a
    /// signal for the warm-up engine.
    Blocked,
    /// Held back by a warm-up quota (not an attempt): counted once per message and quota
    /// window, never returned by [`classify`].
    DeferredByWarmup,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Bounced => "bounced",
            Outcome::Blocked => "blocked",
            Outcome::DeferredByWarmup => "deferred_by_warmup",
        }
    }
    pub const ALL: [Outcome; 5] = [
        Outcome::Delivered,
        Outcome::Deferred,
        Outcome::Bounced,
        Outcome::Blocked,
        Outcome::DeferredByWarmup,
    ];
}

const POLICY_WORDS: &[&str] = &[
    "blocked",
    "blocklist",
    "blacklist",
    "spamhaus",
    "spam",
    "reputation",
    "policy",
    "rate limit",
    "listed",
];

/// Classifies a reply: the basic code decides permanence, the enhanced code and well-known
/// words decide whether a permanent failure is a policy block.
pub fn classify(reply: &Reply) -> Outcome {
    match reply.code {
        200..=299 => Outcome::Delivered,
        500..=599 => {
            let lower = reply.text.to_ascii_lowercase();
            let policy = matches!(reply.enhanced(), Some((5, 7, _)))
                || POLICY_WORDS.iter().any(|w| lower.contains(w));
            if policy {
                Outcome::Blocked
            } else {
                Outcome::Bounced
            }
        }
        _ => Outcome::Deferred,
    }
}

/// Whether a permanent failure says the recipient address itself is bad (user unknown,
/// mailbox disabled, bad domain): the recipient is then suppressed. Policy blocks, full
/// mailboxes, size or content refusals and expired mail are not hard bounces in this sense.
pub fn is_hard_bounce(reply: &Reply) -> bool {
    if classify(reply) != Outcome::Bounced {
        return false;
    }
    match reply.enhanced() {
        // 5.1.x: addressing (bad mailbox, bad domain, bad syntax, moved, null MX);
        // 5.2.1: mailbox disabled.
        Some((5, 1, _)) | Some((5, 2, 1)) => true,
        Some(_) => false,
        None => {
            let lower = reply.text.to_ascii_lowercase();
            matches!(reply.code, 550 | 551 | 553)
                && USER_UNKNOWN_WORDS.iter().any(|w| lower.contains(w))
        }
    }
}

const USER_UNKNOWN_WORDS: &[&str] = &[
    "user unknown",
    "unknown user",
    "no such user",
    "no such mailbox",
    "no such recipient",
    "unknown recipient",
    "recipient unknown",
    "invalid recipient",
    "does not exist",
    "mailbox unavailable",
    "mailbox not found",
    "address rejected",
];

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open, greeted connection.
pub struct Connection {
    io: BufReader<Box<dyn Io>>,
    pub target: SocketAddr,
    /// The mail exchanger's host name (as found in MX or the route).
    pub host: String,
    pub pipelining: bool,
    pub tls: bool,
    pub smtputf8: bool,
    timeout: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.target)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Accepts any certificate: MX delivery uses TLS opportunistically, where an unverified
/// encrypted session still beats clear text (RFC 7435); MTA-STS/DANE are future work.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The outcome of one transaction: a reply per recipient, in the order given.
pub type RcptReplies = Vec<Reply>;

impl Connection {
    /// Connects from `source` to `target`, reads the greeting, says EHLO `helo` and, when
    /// offered and `try_tls`, upgrades with STARTTLS.
    pub async fn open(
        source: IpAddr,
        target: SocketAddr,
        helo: &str,
        tls_host: &str,
        try_tls: bool,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        let connect_err = |e| ClientError::Connect {
            source_ip: source,
            target,
            source: e,
        };
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(connect_err)?;
        // Binding the source address per connection is what gives each egress address its
        // own reputation; the kernel picks the port.
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(connect_err)?;
        let stream = tokio::time::timeout(timeout, socket.connect(target))
            .await
            .map_err(|_| ClientError::Timeout {
                target,
                stage: "connect",
            })?
            .map_err(connect_err)?;
        let _ = stream.set_nodelay(true);
        let mut conn = Connection {
            io: BufReader::new(Box::new(stream)),
            target,
            host: tls_host.to_string(),
            pipelining: false,
            tls: false,
            smtputf8: false,
            timeout,
        };
        let greeting = conn.read_reply("greeting").await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused {
                target,
                stage: "greeting",
                reply: greeting,
            });
        }
        let ext = conn.ehlo(helo).await?;
        if try_tls && ext.iter().any(|e| e.eq_ignore_ascii_case("STARTTLS")) {
            conn.write(b"STARTTLS\r\n", "starttls").await?;
            let r = conn.read_reply("starttls").await?;
            if r.code == 220 {
                let connector = tls_connector().map_err(|e| ClientError::Io {
                    target,
                    stage: "starttls",
                    source: std::io::Error::other(e.to_string()),
                })?;
                let name = rustls::pki_types::ServerName::try_from(tls_host.to_string())
                    .or_else(|_| rustls::pki_types::ServerName::try_from(target.ip().to_string()))
                    .map_err(|_| ClientError::Protocol { target })?;
                let plain = std::mem::replace(
                    &mut conn.io,
                    BufReader::new(Box::new(tokio::io::duplex(1).0)),
                )
                .into_inner();
                let tls = tokio::time::timeout(timeout, connector.connect(name, plain))
                    .await
                    .map_err(|_| ClientError::Timeout {
                        target,
                        stage: "tls handshake",
                    })?
                    .map_err(|source| ClientError::Io {
                        target,
                        stage: "tls handshake",
                        source,
                    })?;
                conn.io = BufReader::new(Box::new(tls));
                conn.tls = true;
                conn.ehlo(helo).await?;
            }
        }
        Ok(conn)
    }

    async fn ehlo(&mut self, helo: &str) -> Result<Vec<String>, ClientError> {
        self.write(format!("EHLO {helo}\r\n").as_bytes(), "ehlo")
            .await?;
        let (reply, lines) = self.read_reply_lines("ehlo").await?;
        if reply.code != 250 {
            return Err(ClientError::Refused {
                target: self.target,
                stage: "ehlo",
                reply,
            });
        }
        let ext: Vec<String> = lines.into_iter().skip(1).collect();
        self.pipelining = ext.iter().any(|e| e.eq_ignore_ascii_case("PIPELINING"));
        self.smtputf8 = ext.iter().any(|e| e.eq_ignore_ascii_case("SMTPUTF8"));
        Ok(ext)
    }

    async fn write(&mut self, b: &[u8], stage: &'static str) -> Result<(), ClientError> {
        let target = self.target;
        let io = self.io.get_mut();
        let fut = async {
            io.write_all(b).await?;
            io.flush().await
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout { target, stage })?
            .map_err(|source| ClientError::Io {
                target,
                stage,
                source,
            })
    }

    async fn read_reply(&mut self, stage: &'static str) -> Result<Reply, ClientError> {
        Ok(self.read_reply_lines(stage).await?.0)
    }

    async fn read_reply_lines(
        &mut self,
        stage: &'static str,
    ) -> Result<(Reply, Vec<String>), ClientError> {
        let target = self.target;
        let mut lines = Vec::new();
        let mut buf = String::new();
        loop {
            buf.clear();
            let n = tokio::time::timeout(self.timeout, self.io.read_line(&mut buf))
                .await
                .map_err(|_| ClientError::Timeout { target, stage })?
                .map_err(|source| ClientError::Io {
                    target,
                    stage,
                    source,
                })?;
            if n == 0 {
                return Err(ClientError::Io {
                    target,
                    stage,
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            let line = buf.trim_end_matches(['\r', '\n']);
            if line.len() < 3 || lines.len() > 100 {
                return Err(ClientError::Protocol { target });
            }
            let code: u16 = line[..3]
                .parse()
                .map_err(|_| ClientError::Protocol { target })?;
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push((code, line.get(4..).unwrap_or("").to_string()));
            if !more {
                break;
            }
        }
        let code = lines.last().map_or(0, |l| l.0);
        let texts: Vec<String> = lines.into_iter().map(|l| l.1).collect();
        Ok((
            Reply {
                code,
                text: texts.join(" "),
            },
            texts,
        ))
    }

    /// Sends one message to `rcpts`; returns one reply per recipient. An `Err` means the
    /// connection is unusable and nothing was delivered.
    pub async fn send(
        &mut self,
        mail_from: &str,
        rcpts: &[&str],
        data: &[u8],
    ) -> Result<RcptReplies, ClientError> {
        let utf8 = self.smtputf8 && (!mail_from.is_ascii() || rcpts.iter().any(|r| !r.is_ascii()));
        let mut cmds = format!("MAIL FROM:<{mail_from}> SIZE={}", data.len());
        if utf8 {
            cmds.push_str(" SMTPUTF8");
        }
        cmds.push_str("\r\n");
        let mut rcpt_cmds = Vec::with_capacity(rcpts.len());
        for r in rcpts {
            rcpt_cmds.push(format!("RCPT TO:<{r}>\r\n"));
        }
        let mail_reply;
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        if self.pipelining {
            let mut batch = cmds.into_bytes();
            for c in &rcpt_cmds {
                batch.extend_from_slice(c.as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.write(&batch, "mail").await?;
            mail_reply = self.read_reply("mail").await?;
            for _ in rcpts {
                rcpt_replies.push(self.read_reply("rcpt").await?);
            }
        } else {
            self.write(cmds.as_bytes(), "mail").await?;
            mail_reply = self.read_reply("mail").await?;
            if mail_reply.code / 100 == 2 {
                for c in &rcpt_cmds {
                    self.write(c.as_bytes(), "rcpt").await?;
                    rcpt_replies.push(self.read_reply("rcpt").await?);
                }
            }
        }
        let any_ok = mail_reply.code / 100 == 2 && rcpt_replies.iter().any(|r| r.code / 100 == 2);
        let data_reply = if self.pipelining {
            Some(self.read_reply("data").await?)
        } else if any_ok {
            self.write(b"DATA\r\n", "data").await?;
            Some(self.read_reply("data").await?)
        } else {
            None
        };
        if mail_reply.code / 100 != 2 {
            if data_reply.as_ref().is_some_and(|r| r.code == 354) {
                // Only reachable with a broken pipelining server; end the data phase cleanly.
                self.write(b".\r\n", "data").await?;
                self.read_reply("data").await?;
            }
            self.rset().await?;
            return Ok(vec![mail_reply; rcpts.len()]);
        }
        let Some(data_reply) = data_reply.filter(|_| any_ok) else {
            self.rset().await?;
            return Ok(rcpt_replies);
        };
        if data_reply.code != 354 {
            self.rset().await?;
            return Ok(rcpt_replies
                .into_iter()
                .map(|r| {
                    if r.code / 100 == 2 {
                        data_reply.clone()
                    } else {
                        r
                    }
                })
                .collect());
        }
        let stuffed = dot_stuff(data);
        self.write(&stuffed, "data").await?;
        let final_reply = self.read_reply("end of data").await?;
        Ok(rcpt_replies
            .into_iter()
            .map(|r| {
                if r.code / 100 == 2 {
                    final_reply.clone()
                } else {
                    r
                }
            })
            .collect())
    }

    async fn rset(&mut self) -> Result<(), ClientError> {
        self.write(b"RSET\r\n", "rset").await?;
        let r = self.read_reply("rset").await?;
        if r.code / 100 != 2 {
            return Err(ClientError::Refused {
                target: self.target,
                stage: "rset",
                reply: r,
            });
        }
        Ok(())
    }

    /// Says goodbye; errors do not matter any more at this point.
    pub async fn quit(mut self) {
        if self.write(b"QUIT\r\n", "quit").await.is_ok() {
            let _ = self.read_reply("quit").await;
        }
        let _ = self.io.get_mut().shutdown().await;
    }
}

/// Dot-stuffs `data`, makes it end with CRLF and appends the end-of-data marker.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 8);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        if out.ends_with(b"\n") {
            out.pop();
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, text: &str) -> Reply {
        Reply {
            code,
            text: text.into(),
        }
    }

    #[test]
    fn classification_uses_code_and_enhanced_status() {
        assert_eq!(classify(&r(250, "2.0.0 Ok")), Outcome::Delivered);
        assert_eq!(classify(&r(451, "4.3.0 try again")), Outcome::Deferred);
        assert_eq!(classify(&r(421, "4.7.28 rate limited")), Outcome::Deferred);
        assert_eq!(classify(&r(550, "5.1.1 no such user")), Outcome::Bounced);
        assert_eq!(classify(&r(550, "5.7.1 message refused")), Outcome::Blocked);
        assert_eq!(
            classify(&r(
                554,
                "Service unavailable; client host blocked using Spamhaus"
            )),
            Outcome::Blocked
        );
        assert_eq!(r(550, "5.1.1 x").enhanced(), Some((5, 1, 1)));
        assert_eq!(r(550, "no enhanced").enhanced(), None);
    }

    #[test]
    fn hard_bounces_are_bad_addresses_only() {
        assert!(is_hard_bounce(&r(550, "5.1.1 no such user (test sink)")));
        assert!(is_hard_bounce(&r(550, "5.2.1 mailbox disabled")));
        assert!(is_hard_bounce(&r(
            556,
            "5.1.10 dest.test does not accept mail"
        )));
        assert!(is_hard_bounce(&r(
            550,
            "Requested action not taken: user unknown"
        )));
        // Policy blocks, full mailboxes, size, expiry and temporary failures are not.
        assert!(!is_hard_bounce(&r(554, "5.7.1 blocked by policy")));
        assert!(!is_hard_bounce(&r(552, "5.2.2 mailbox full")));
        assert!(!is_hard_bounce(&r(552, "5.3.4 message too big")));
        assert!(!is_hard_bounce(&r(554, "5.4.7 delivery time expired")));
        assert!(!is_hard_bounce(&r(550, "rejected for no stated reason")));
        assert!(!is_hard_bounce(&r(450, "4.1.1 user unknown, try later")));
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(
            dot_stuff(b".a\r\nb\r\n..c\r\n"),
            b"..a\r\nb\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b"x"), b"x\r\n.\r\n");
    }
}
