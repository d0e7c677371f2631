//! SMTP in: the listener and one task per client session. The session parses commands with
//! smtp-proto, enforces the limits and the never-an-open-relay rule (the client is in an
//! allowed network or authenticated, and MAIL FROM belongs to a sending domain), reads the
//! message, signs it (dkim), makes it durable (spool) and only then answers `250` and hands
//! it to delivery. Replies are buffered and flushed when the client has nothing more
//! pipelined, so a PIPELINING client gets one write per batch of commands.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use smtp_proto::Request;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::{ListenerConfig, SendingDomainConfig};
use crate::delivery::Delivery;
use crate::dkim::Signer;
use crate::metrics::Metrics;
use crate::spool::{Message, Spool};

/// Errors of the listener (session errors end the session and are only logged).
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("failed to load tls {what} from {path}: {reason}")]
    Tls {
        what: &'static str,
        path: String,
        reason: String,
    },
}

/// Parses one command line (with its CRLF). This is the parser the fuzz target exercises.
pub fn parse_command(line: &[u8]) -> Result<Request<String>, smtp_proto::Error> {
    let mut it = line.iter();
    Request::<Cow<'_, str>>::parse(&mut it).map(Request::into_owned)
}

/// The domain part of an address, lowercased; `None` without `@` or with an empty side.
pub fn address_domain(addr: &str) -> Option<String> {
    let (local, domain) = addr.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.contains(['<', '>', ' ']) {
        return None;
    }
    Some(domain.trim_end_matches('.').to_ascii_lowercase())
}

/// The configured sending domain that `domain` is, or is a subdomain of.
pub fn matching_sending_domain<'a>(domains: &'a [String], domain: &str) -> Option<&'a str> {
    domains
        .iter()
        .filter(|d| {
            domain == d.as_str()
                || (domain.len() > d.len()
                    && domain.ends_with(d.as_str())
                    && domain.as_bytes()[domain.len() - d.len() - 1] == b'.')
        })
        .max_by_key(|d| d.len())
        .map(String::as_str)
}

/// The part of the listener's setup that a reconfiguration replaces as a whole. A session
/// takes the current one before each command, so a change applies from the next command.
pub struct InboundSettings {
    pub listener: ListenerConfig,
    /// Lowercased sending domains.
    pub domains: Vec<String>,
    /// Lowercased suppressed recipients per sending domain.
    pub suppressed: HashMap<String, HashSet<String>>,
    pub signer: Arc<Signer>,
}

impl InboundSettings {
    /// Settings for `listener` and `domains` with the signer already built from them.
    pub fn new(
        listener: ListenerConfig,
        domains: &[SendingDomainConfig],
        signer: Arc<Signer>,
    ) -> Self {
        let norm = |d: &str| d.trim_end_matches('.').to_ascii_lowercase();
        InboundSettings {
            listener,
            domains: domains.iter().map(|d| norm(&d.domain)).collect(),
            suppressed: domains
                .iter()
                .filter(|d| !d.suppressed_recipients.is_empty())
                .map(|d| {
                    let set = d
                        .suppressed_recipients
                        .iter()
                        .map(|r| r.trim().to_ascii_lowercase())
                        .collect();
                    (norm(&d.domain), set)
                })
                .collect(),
            signer,
        }
    }
}

/// Everything a session needs, shared by all sessions.
pub struct Inbound {
    pub hostname: String,
    settings: RwLock<Arc<InboundSettings>>,
    pub spool: Arc<dyn Spool>,
    pub delivery: Arc<Delivery>,
    pub metrics: Arc<Metrics>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Whether new sessions are served: false until the relay has a configuration and while
    /// it has no usable egress address (they get `421 4.3.0`).
    pub accepting: AtomicBool,
    open_sessions: AtomicUsize,
}

impl Inbound {
    pub fn new(
        hostname: String,
        settings: InboundSettings,
        spool: Arc<dyn Spool>,
        delivery: Arc<Delivery>,
        metrics: Arc<Metrics>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        accepting: bool,
    ) -> Self {
        Inbound {
            hostname,
            settings: RwLock::new(Arc::new(settings)),
            spool,
            delivery,
            metrics,
            tls,
            accepting: AtomicBool::new(accepting),
            open_sessions: AtomicUsize::new(0),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<InboundSettings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the settings; open sessions see them from their next command.
    pub fn set_settings(&self, settings: InboundSettings) {
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
    }
}

/// Counts an open session until dropped.
struct SessionSlot<'a>(&'a AtomicUsize);

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The STARTTLS acceptor of the listener.
pub type TlsAcceptor = tokio_rustls::TlsAcceptor;

/// Loads the STARTTLS certificate and key from PEM files.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, SmtpError> {
    let read = |what, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| SmtpError::Tls {
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    };
    let cert_pem = read("certificate", cert)?;
    let key_pem = read("key", key)?;
    tls_acceptor_pem(
        &cert_pem,
        &key_pem,
        &cert.display().to_string(),
        &key.display().to_string(),
    )
}

/// Builds the STARTTLS acceptor from PEM text; `cert_from`/`key_from` name where the PEM came
/// from (a file or an environment variable) in errors.
pub fn tls_acceptor_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_from: &str,
    key_from: &str,
) -> Result<tokio_rustls::TlsAcceptor, SmtpError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |what, path: &str, reason: String| SmtpError::Tls {
        what,
        path: path.to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("certificate", cert_from, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(
            "certificate",
            cert_from,
            "no PEM certificate found".into(),
        ));
    }
    let key_der =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| err("key", key_from, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("config", cert_from, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| err("key", key_from, e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts sessions until `shutdown` turns true; returns after the listener is closed (open
/// sessions keep running and finish their current message).
pub async fn serve(
    listener: TcpListener,
    inbound: Arc<Inbound>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let inbound = Arc::clone(&inbound);
        if !inbound.accepting.load(Ordering::Acquire) {
            inbound.metrics.refused("not_ready");
            tokio::spawn(async move {
                let mut stream = stream;
                let text = format!(
                    "421 4.3.0 {} is not ready: no configuration or no usable egress address \
                     yet, try again later\r\n",
                    inbound.hostname
                );
                let _ = stream.write_all(text.as_bytes()).await;
            });
            continue;
        }
        let max = inbound.settings().listener.max_sessions;
        if inbound.open_sessions.fetch_add(1, Ordering::AcqRel) >= max {
            inbound.open_sessions.fetch_sub(1, Ordering::AcqRel);
            inbound.metrics.refused("too_many_sessions");
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = stream
                    .write_all(b"421 4.3.2 Too many sessions, try again later\r\n")
                    .await;
            });
            continue;
        }
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = SessionSlot(&inbound.open_sessions);
            inbound.metrics.sessions.inc();
            let mut s = Session::new(&inbound, Box::new(stream), peer.ip(), shutdown);
            if let Err(e) = s.run().await {
                tracing::debug!(%peer, error = %e, "session ended with an error");
            }
            inbound.metrics.sessions.dec();
        });
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Line {
    Ok,
    TooLong,
    Eof,
}

async fn read_line(
    r: &mut BufReader<Box<dyn Io>>,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(Line::Eof);
        }
        match avail.iter().position(|b| *b == b'\n') {
            Some(i) => {
                if !too_long && buf.len() + i < max {
                    buf.extend_from_slice(&avail[..=i]);
                } else {
                    too_long = true;
                }
                r.consume(i + 1);
                return Ok(if too_long { Line::TooLong } else { Line::Ok });
            }
            None => {
                let n = avail.len();
                if !too_long && buf.len() + n < max {
                    buf.extend_from_slice(avail);
                } else {
                    too_long = true;
                }
                r.consume(n);
            }
        }
    }
}

struct Session<'a> {
    inb: &'a Inbound,
    /// The settings for the current command.
    cfg: Arc<InboundSettings>,
    io: Option<BufReader<Box<dyn Io>>>,
    out: Vec<u8>,
    peer: IpAddr,
    helo: Option<String>,
    tls: bool,
    user: Option<String>,
    mail_from: Option<String>,
    sender_domain: Option<String>,
    rcpts: Vec<String>,
    bad: usize,
    shutdown: watch::Receiver<bool>,
}

enum Next {
    Continue,
    Quit,
}

impl<'a> Session<'a> {
    fn new(
        inb: &'a Inbound,
        stream: Box<dyn Io>,
        peer: IpAddr,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Session {
            inb,
            cfg: inb.settings(),
            io: Some(BufReader::with_capacity(64 * 1024, stream)),
            out: Vec::with_capacity(1024),
            peer,
            helo: None,
            tls: false,
            user: None,
            mail_from: None,
            sender_domain: None,
            rcpts: Vec::new(),
            bad: 0,
            shutdown,
        }
    }

    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn io(&mut self) -> std::io::Result<&mut BufReader<Box<dyn Io>>> {
        self.io
            .as_mut()
            .ok_or_else(|| std::io::Error::other("session stream is gone"))
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let io = self.io()?.get_mut();
        io.write_all(&out).await?;
        io.flush().await?;
        self.out = out;
        self.out.clear();
        Ok(())
    }

    /// Flushes unless more pipelined commands already wait in the read buffer.
    async fn flush_if_idle(&mut self) -> std::io::Result<()> {
        if self.io()?.buffer().is_empty() {
            self.flush().await?;
        }
        Ok(())
    }

    async fn run(&mut self) -> std::io::Result<()> {
        let greeting = format!("220 {} ESMTP mailfleet", self.inb.hostname);
        self.reply(&greeting);
        let mut line = Vec::with_capacity(512);
        loop {
            self.flush_if_idle().await?;
            if *self.shutdown.borrow() && self.mail_from.is_none() {
                self.reply("421 4.3.2 Service shutting down, try again later");
                self.flush().await?;
                return Ok(());
            }
            let max = self.cfg.listener.max_line_length;
            let timeout = self.cfg.listener.idle_timeout;
            let idle = self.mail_from.is_none();
            let Some(io) = self.io.as_mut() else {
                return Ok(());
            };
            // An idle session ends at once on shutdown so that a drain does not wait for
            // clients that hold connections open; a transaction in progress may finish.
            let mut shutdown = self.shutdown.clone();
            let read = tokio::select! {
                r = tokio::time::timeout(timeout, read_line(io, &mut line, max)) => Some(r),
                _ = shutdown.wait_for(|s| *s), if idle => None,
            };
            let Some(read) = read else {
                self.reply("421 4.3.2 Service shutting down, try again later");
                self.flush().await?;
                return Ok(());
            };
            let status = match read {
                Ok(r) => r?,
                Err(_) => {
                    self.reply("421 4.4.2 Idle timeout, closing connection");
                    self.flush().await?;
                    return Ok(());
                }
            };
            match status {
                Line::Eof => return Ok(()),
                Line::TooLong => {
                    self.reply("500 5.5.2 Line too long");
                    if self.bad_command() {
                        self.flush().await?;
                        return Ok(());
                    }
                    continue;
                }
                Line::Ok => {}
            }
            // The settings in force when the command arrived (a reconfiguration applies from
            // the next command).
            self.cfg = self.inb.settings();
            let next = match parse_command(&line) {
                Ok(req) => self.command(req).await?,
                Err(e) => {
                    let text = match e {
                        smtp_proto::Error::UnknownCommand => {
                            "500 5.5.1 Command unrecognized".to_string()
                        }
                        smtp_proto::Error::InvalidSenderAddress => {
                            "501 5.1.7 Bad sender address syntax".to_string()
                        }
                        smtp_proto::Error::InvalidRecipientAddress => {
                            "501 5.1.3 Bad recipient address syntax".to_string()
                        }
                        smtp_proto::Error::SyntaxError { syntax } => {
                            format!("501 5.5.4 Syntax: {syntax}")
                        }
                        smtp_proto::Error::InvalidParameter { param } => {
                            format!("501 5.5.4 Invalid parameter {param}")
                        }
                        smtp_proto::Error::UnsupportedParameter { param } => {
                            format!("504 5.5.4 Unsupported parameter {}", param.escape_debug())
                        }
                        smtp_proto::Error::ResponseTooLong => "500 5.5.2 Line too long".to_string(),
                        _ => "500 5.5.2 Syntax error".to_string(),
                    };
                    self.reply(&text);
                    if self.bad_command() {
                        Next::Quit
                    } else {
                        Next::Continue
                    }
                }
            };
            if let Next::Quit = next {
                self.flush().await?;
                return Ok(());
            }
        }
    }

    /// Counts a bad command; true when the session must end.
    fn bad_command(&mut self) -> bool {
        self.bad += 1;
        if self.bad >= self.cfg.listener.max_bad_commands {
            self.inb.metrics.refused("too_many_errors");
            self.reply("421 4.7.0 Too many errors, closing connection");
            return true;
        }
        false
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.sender_domain = None;
        self.rcpts.clear();
    }

    fn may_submit(&self) -> bool {
        self.user.is_some()
            || self
                .cfg
                .listener
                .allowed_networks
                .iter()
                .any(|n| n.contains(&self.peer))
    }

    fn auth_offered(&self) -> bool {
        self.tls && !self.cfg.listener.users.is_empty()
    }

    async fn command(&mut self, req: Request<String>) -> std::io::Result<Next> {
        match req {
            Request::Ehlo { host } => {
                self.reset();
                self.helo = Some(host);
                let mut lines = vec![
                    self.inb.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.cfg.listener.max_message_size),
                    "8BITMIME".into(),
                    "SMTPUTF8".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ];
                if self.inb.tls.is_some() && !self.tls {
                    lines.push("STARTTLS".into());
                }
                if self.auth_offered() {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
                let n = lines.len();
                for (i, l) in lines.into_iter().enumerate() {
                    let sep = if i + 1 == n { ' ' } else { '-' };
                    self.reply(&format!("250{sep}{l}"));
                }
            }
            Request::Helo { host } | Request::Lhlo { host } => {
                self.reset();
                self.helo = Some(host);
                let t = format!("250 {}", self.inb.hostname);
                self.reply(&t);
            }
            Request::Mail { from } => return Ok(self.mail(from)),
            Request::Rcpt { to } => return Ok(self.rcpt(to.address)),
            Request::Data => return self.data().await,
            Request::Rset => {
                self.reset();
                self.reply("250 2.0.0 Ok");
            }
            Request::Noop { .. } => self.reply("250 2.0.0 Ok"),
            Request::Quit => {
                self.reply("221 2.0.0 Bye");
                return Ok(Next::Quit);
            }
            Request::Vrfy { .. } => self.reply("252 2.5.0 Cannot VRFY user"),
            Request::Help { .. } => self.reply("214 2.0.0 See RFC 5321"),
            Request::StartTls => return self.starttls().await,
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(mechanism, initial_response).await,
            Request::Bdat { .. } => {
                self.reply("502 5.5.1 BDAT not implemented, use DATA");
                return Ok(self.bad_next());
            }
            _ => {
                self.reply("502 5.5.1 Command not implemented");
                return Ok(self.bad_next());
            }
        }
        Ok(Next::Continue)
    }

    fn bad_next(&mut self) -> Next {
        if self.bad_command() {
            Next::Quit
        } else {
            Next::Continue
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) -> Next {
        if self.helo.is_none() {
            self.reply("503 5.5.1 Send EHLO or HELO first");
            return self.bad_next();
        }
        if self.mail_from.is_some() {
            self.reply("503 5.5.1 Nested MAIL command");
            return self.bad_next();
        }
        if !self.may_submit() {
            self.inb.metrics.refused("not_allowed");
            if self.inb.tls.is_some() && !self.cfg.listener.users.is_empty() {
                self.reply("530 5.7.0 Authentication required");
            } else {
                let t = format!(
                    "550 5.7.1 Client {} may not submit mail through this relay",
                    self.peer
                );
                self.reply(&t);
            }
            return Next::Continue;
        }
        if from.size > self.cfg.listener.max_message_size {
            self.inb.metrics.refused("too_big");
            self.reply("552 5.3.4 Message size exceeds fixed maximum message size");
            return Next::Continue;
        }
        let Some(domain) = address_domain(&from.address) else {
            self.inb.metrics.refused("bad_sender");
            self.reply("550 5.7.1 Sender must be an address of a sending domain of this relay");
            return Next::Continue;
        };
        let Some(sd) = matching_sending_domain(&self.cfg.domains, &domain) else {
            self.inb.metrics.refused("unknown_sender_domain");
            let t =
                format!("550 5.7.1 Sender domain {domain} is not a sending domain of this relay");
            self.reply(&t);
            return Next::Continue;
        };
        self.sender_domain = Some(sd.to_string());
        self.mail_from = Some(from.address);
        self.reply("250 2.1.0 Sender ok");
        Next::Continue
    }

    fn rcpt(&mut self, to: String) -> Next {
        if self.mail_from.is_none() {
            self.reply("503 5.5.1 Send MAIL first");
            return self.bad_next();
        }
        if self.rcpts.len() >= self.cfg.listener.max_recipients {
            self.inb.metrics.refused("too_many_recipients");
            self.reply("452 4.5.3 Too many recipients");
            return Next::Continue;
        }
        if address_domain(&to).is_none() {
            self.reply("501 5.1.3 Recipient must be a full address with a domain");
            return Next::Continue;
        }
        if let Some(sd) = &self.sender_domain
            && (self
                .cfg
                .suppressed
                .get(sd)
                .is_some_and(|set| set.contains(&to.trim().to_ascii_lowercase()))
                || self.inb.delivery.suppressions.contains(sd, &to))
        {
            self.inb.metrics.refused("suppressed_recipient");
            let t = format!(
                "550 5.7.1 Recipient {to} is suppressed for {sd} (earlier hard bounce or complaint)"
            );
            self.reply(&t);
            return Next::Continue;
        }
        self.rcpts.push(to);
        self.reply("250 2.1.5 Recipient ok");
        Next::Continue
    }

    async fn data(&mut self) -> std::io::Result<Next> {
        if self.mail_from.is_none() {
            self.reply("503 5.5.1 Send MAIL first");
            return Ok(self.bad_next());
        }
        if self.rcpts.is_empty() {
            self.reply("503 5.5.1 No valid recipients");
            return Ok(self.bad_next());
        }
        self.reply("354 Start mail input; end with <CRLF>.<CRLF>");
        self.flush().await?;
        // One span per DATA transaction, until the reply; `accept` records the queue id.
        let span = tracing::info_span!(
            "smtp.accept",
            message_id = tracing::field::Empty,
            mail_from_domain = self.sender_domain.as_deref().unwrap_or_default(),
            recipients = self.rcpts.len(),
            reply_code = tracing::field::Empty,
        );
        self.data_body().instrument(span).await
    }

    /// Reads the message after `354` and answers it (inside the `smtp.accept` span).
    async fn data_body(&mut self) -> std::io::Result<Next> {
        let max = self.cfg.listener.max_message_size;
        let mut body: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut line = Vec::with_capacity(1024);
        let mut too_big = false;
        loop {
            let timeout = self.cfg.listener.idle_timeout;
            let io = self.io()?;
            // Lines inside DATA are bounded only by the message size.
            let status = tokio::time::timeout(timeout, read_line(io, &mut line, max + 3))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "data timeout"))??;
            match status {
                Line::Eof => return Ok(Next::Quit),
                Line::TooLong => {
                    too_big = true;
                    continue;
                }
                Line::Ok => {}
            }
            if line == b".\r\n" || line == b".\n" {
                break;
            }
            let content = if line.first() == Some(&b'.') {
                &line[1..]
            } else {
                &line[..]
            };
            if body.len() + content.len() > max {
                too_big = true;
            }
            if !too_big {
                body.extend_from_slice(content);
            }
        }
        if too_big {
            self.inb.metrics.refused("too_big");
            self.reset();
            self.reply("552 5.3.4 Message size exceeds fixed maximum message size");
            return Ok(Next::Continue);
        }
        let reply = self.accept(body).await;
        tracing::Span::current().record("reply_code", reply.get(..3).unwrap_or_default());
        self.reset();
        self.reply(&reply);
        Ok(Next::Continue)
    }

    /// Signs, spools and queues the message; returns the reply to send.
    async fn accept(&mut self, body: Vec<u8>) -> String {
        let inb = self.inb;
        let id = inb.spool.next_id();
        let message_id = format!("{id:x}");
        tracing::Span::current().record("message_id", message_id.as_str());
        let now = crate::shaping::unix_now() as u64;
        let with = match (self.tls, self.user.is_some()) {
            (true, true) => "ESMTPSA",
            (true, false) => "ESMTPS",
            (false, true) => "ESMTPA",
            (false, false) => "ESMTP",
        };
        let received = format!(
            "Received: from {} ({})\r\n\tby {} (mailfleet) with {with} id {id:x};\r\n\t{}\r\n",
            sanitize(self.helo.as_deref().unwrap_or("unknown")),
            self.peer,
            inb.hostname,
            crate::dsn::rfc2822_date(now),
        );
        let domain = self.sender_domain.clone().unwrap_or_default();
        // The sending domain may have been removed since MAIL FROM.
        if !self.cfg.domains.contains(&domain) {
            inb.metrics.refused("unknown_sender_domain");
            return format!(
                "550 5.7.1 Sender domain {domain} is no longer a sending domain of this relay"
            );
        }
        // RSA signing costs about a millisecond of CPU: do it on the blocking pool so the
        // runtime's workers keep serving the other sessions' I/O meanwhile.
        let signer = Arc::clone(&self.cfg.signer);
        let sign_span = tracing::info_span!(
            "dkim.sign",
            message_id = message_id.as_str(),
            domain = domain.as_str(),
            selectors = %signer.selectors(&domain),
        );
        let signed = tokio::task::spawn_blocking(move || {
            let _span = sign_span.enter();
            let sig = signer.sign(&domain, &body);
            (sig, body)
        })
        .await;
        let Ok((signature, body)) = signed else {
            return "451 4.3.0 Failed to sign message, try again later".into();
        };
        let signature = match signature {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "dkim signing failed");
                return "451 4.3.0 Failed to sign message, try again later".into();
            }
        };
        let mut data = Vec::with_capacity(received.len() + signature.len() + body.len());
        data.extend_from_slice(received.as_bytes());
        data.extend_from_slice(&signature);
        data.extend_from_slice(&body);
        let msg = Message {
            id,
            received_at: now,
            mail_from: self.mail_from.clone().unwrap_or_default(),
            rcpts: std::mem::take(&mut self.rcpts),
            data,
        };
        match inb.spool.store(&msg).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "spool store failed");
                return "451 4.3.0 Failed to store message, try again later".into();
            }
            Err(_) => return "451 4.3.0 Failed to store message, try again later".into(),
        }
        inb.metrics.accepted.inc();
        let pending = (0..msg.rcpts.len()).collect();
        inb.delivery.submit(Arc::new(msg), pending);
        format!("250 2.0.0 Ok: queued as {id:x}")
    }

    async fn starttls(&mut self) -> std::io::Result<Next> {
        let Some(acceptor) = self.inb.tls.clone() else {
            self.reply("502 5.5.1 STARTTLS not available");
            return Ok(self.bad_next());
        };
        if self.tls {
            self.reply("503 5.5.1 TLS already active");
            return Ok(self.bad_next());
        }
        self.reply("220 2.0.0 Ready to start TLS");
        self.flush().await?;
        let Some(reader) = self.io.take() else {
            return Ok(Next::Quit);
        };
        // Commands pipelined after STARTTLS were sent in clear text: RFC 3207 says to
        // discard them, which dropping the read buffer does (into_inner).
        let stream = reader.into_inner();
        let tls = acceptor.accept(stream).await?;
        self.io = Some(BufReader::with_capacity(64 * 1024, Box::new(tls)));
        self.tls = true;
        self.helo = None;
        self.reset();
        Ok(Next::Continue)
    }

    async fn auth(&mut self, mechanism: u64, initial: String) -> std::io::Result<Next> {
        if !self.tls {
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism");
            return Ok(self.bad_next());
        }
        if !self.auth_offered() {
            self.reply("502 5.5.1 AUTH not available");
            return Ok(self.bad_next());
        }
        if self.user.is_some() {
            self.reply("503 5.5.1 Already authenticated");
            return Ok(self.bad_next());
        }
        if self.mail_from.is_some() {
            self.reply("503 5.5.1 AUTH not allowed during a mail transaction");
            return Ok(self.bad_next());
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let creds = if mechanism == smtp_proto::AUTH_PLAIN {
            let resp = if initial.is_empty() {
                self.reply("334 ");
                match self.read_auth_line().await? {
                    Some(l) => l,
                    None => return Ok(Next::Continue),
                }
            } else {
                initial
            };
            b64.decode(resp.trim()).ok().and_then(|raw| {
                let mut parts = raw.split(|b| *b == 0);
                let _authzid = parts.next()?;
                let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
                let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
                Some((user, pass))
            })
        } else if mechanism == smtp_proto::AUTH_LOGIN {
            let user = if initial.is_empty() {
                self.reply("334 VXNlcm5hbWU6");
                match self.read_auth_line().await? {
                    Some(l) => l,
                    None => return Ok(Next::Continue),
                }
            } else {
                initial
            };
            self.reply("334 UGFzc3dvcmQ6");
            let Some(pass) = self.read_auth_line().await? else {
                return Ok(Next::Continue);
            };
            let dec = |s: &str| {
                b64.decode(s.trim())
                    .ok()
                    .and_then(|v| String::from_utf8(v).ok())
            };
            dec(&user).zip(dec(&pass))
        } else {
            self.reply("504 5.5.4 Unrecognized authentication type");
            return Ok(self.bad_next());
        };
        let ok = creds.as_ref().is_some_and(|(u, p)| {
            self.cfg.listener.users.iter().any(|c| {
                constant_eq(c.name.as_bytes(), u.as_bytes())
                    && constant_eq(c.password.as_bytes(), p.as_bytes())
            })
        });
        if ok {
            self.user = creds.map(|(u, _)| u);
            self.reply("235 2.7.0 Authentication successful");
            Ok(Next::Continue)
        } else {
            self.inb.metrics.refused("auth_failed");
            self.reply("535 5.7.8 Authentication credentials invalid");
            Ok(self.bad_next())
        }
    }

    /// One line of an AUTH exchange; `None` if the client cancelled with `*`.
    async fn read_auth_line(&mut self) -> std::io::Result<Option<String>> {
        self.flush().await?;
        let max = self.cfg.listener.max_line_length;
        let mut line = Vec::new();
        let io = self.io()?;
        match read_line(io, &mut line, max).await? {
            Line::Ok => {}
            Line::TooLong => {
                self.reply("500 5.5.2 Line too long");
                return Ok(None);
            }
            Line::Eof => return Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
        let s = String::from_utf8_lossy(&line).trim().to_string();
        if s == "*" {
            self.reply("501 5.0.0 Authentication cancelled");
            return Ok(None);
        }
        Ok(Some(s))
    }
}

/// Compares secrets without an early exit, so timing does not reveal the matching prefix.
fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Keeps client-supplied text from breaking the Received header.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}

/// Used by `serve` callers that accept on a plain TCP stream in tests.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, SmtpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SmtpError::Listen { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_with_parameters() {
        match parse_command(b"MAIL FROM:<a@example.test> SIZE=1000 BODY=8BITMIME SMTPUTF8\r\n")
            .unwrap()
        {
            Request::Mail { from } => {
                assert_eq!(from.address, "a@example.test");
                assert_eq!(from.size, 1000);
                assert!(from.flags & smtp_proto::MAIL_SMTPUTF8 != 0);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_command(b"FOO bar\r\n"),
            Err(smtp_proto::Error::UnknownCommand)
        ));
        assert!(matches!(
            parse_command(b"MAIL FROM:<>\r\n"),
            Ok(Request::Mail { .. })
        ));
    }

    #[test]
    fn sending_domain_matches_subdomains_on_label_boundary() {
        let d = vec!["example.test".to_string()];
        assert_eq!(
            matching_sending_domain(&d, "example.test"),
            Some("example.test")
        );
        assert_eq!(
            matching_sending_domain(&d, "bounce.example.test"),
            Some("example.test")
        );
        assert_eq!(matching_sending_domain(&d, "badexample.test"), None);
        assert_eq!(
            address_domain("a@Example.Test"),
            Some("example.test".into())
        );
        assert_eq!(address_domain("nodomain"), None);
        assert_eq!(address_domain(""), None);
    }
}
