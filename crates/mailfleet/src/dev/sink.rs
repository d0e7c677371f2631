//! The sink MX of `mailfleet dev`: an SMTP server on 127.0.0.1 that takes every message and
//! counts it by the client's source address, which is the egress address the relay bound.
//! Optionally it answers a share of recipients with `450` (a deferral the relay retries) or
//! `550` (a hard bounce), so that the pool's counters show more than deliveries.
//!
//! Like a receiving mailbox provider, it checks every message it takes: DKIM, SPF for the
//! envelope sender and the client's address, and DMARC, looked up (with mail-auth) in the
//! embedded DNS server, where the SendingDomain controller published the records.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, DkimResult, DmarcResult, MessageAuthenticator, SpfResult};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Totals per client source address.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SourceCounts {
    /// Messages taken (`250` after DATA).
    pub accepted: u64,
    /// Recipients answered `450`.
    pub deferred: u64,
    /// Recipients answered `550`.
    pub rejected: u64,
}

/// What share of recipients the sink refuses, in percent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Faults {
    pub defer_percent: u8,
    pub bounce_percent: u8,
}

/// What the authentication checks of the accepted messages found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuthCounts {
    /// Messages checked.
    pub checked: u64,
    /// With at least one DKIM signature that verified.
    pub dkim_pass: u64,
    /// Whose envelope sender's SPF record allowed the client's address.
    pub spf_pass: u64,
    /// That passed DMARC (an aligned DKIM or SPF pass).
    pub dmarc_pass: u64,
}

struct Shared {
    counts: Mutex<BTreeMap<IpAddr, SourceCounts>>,
    auth: Mutex<AuthCounts>,
    rng: AtomicU64,
    authenticator: MessageAuthenticator,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// One accepted message, as the sink saw it.
struct Received {
    peer: IpAddr,
    helo: String,
    mail_from: String,
    data: Vec<u8>,
}

/// A running sink.
#[derive(Debug)]
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    /// Listens on a free port of 127.0.0.1; checks DKIM, SPF and DMARC with the DNS server
    /// at `nameserver`.
    pub async fn start(faults: Faults, nameserver: SocketAddr) -> Result<Sink> {
        let mut options = hickory_resolver::config::ResolverOpts::default();
        options.ndots = 0;
        options.timeout = std::time::Duration::from_secs(2);
        options.attempts = 2;
        // Answers change as the operator publishes: no caching beyond the records' TTLs.
        options.cache_size = 0;
        let authenticator = MessageAuthenticator::new(
            mailfleet_relay::delivery::resolver_config(&[nameserver]),
            options,
        )
        .context("failed to set up the sink's DKIM/SPF/DMARC checks")?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("failed to listen for the sink MX")?;
        let addr = listener.local_addr().context("no sink address")?;
        let shared = Arc::new(Shared {
            counts: Mutex::default(),
            auth: Mutex::default(),
            rng: AtomicU64::new(super::seed()),
            authenticator,
        });
        let task = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, peer)) = listener.accept().await else {
                        continue;
                    };
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let _ = session(stream, peer.ip(), faults, shared).await;
                    });
                }
            })
        };
        Ok(Sink { addr, shared, task })
    }

    /// Totals per source address so far.
    pub fn counts(&self) -> BTreeMap<IpAddr, SourceCounts> {
        self.shared
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Sink {
    /// What the checks of the accepted messages found so far.
    pub fn auth(&self) -> AuthCounts {
        *self.shared.auth.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// DKIM, SPF and DMARC of one message, counted into `shared.auth`.
async fn check(shared: &Shared, received: Received) {
    let authenticator = &shared.authenticator;
    let mut result = AuthCounts {
        checked: 1,
        ..AuthCounts::default()
    };
    if let Some(message) = AuthenticatedMessage::parse(&received.data) {
        let dkim = authenticator.verify_dkim(&message).await;
        if dkim.iter().any(|d| *d.result() == DkimResult::Pass) {
            result.dkim_pass = 1;
        }
        let sender_domain = received
            .mail_from
            .rsplit_once('@')
            .map_or(received.helo.as_str(), |(_, d)| d);
        let spf = authenticator
            .verify_spf(SpfParameters::verify_mail_from(
                received.peer,
                &received.helo,
                "mx.dev.test",
                &received.mail_from,
            ))
            .await;
        if spf.result() == SpfResult::Pass {
            result.spf_pass = 1;
        }
        let dmarc = authenticator
            .verify_dmarc(DmarcParameters::new(&message, &dkim, sender_domain, &spf))
            .await;
        if *dmarc.dkim_result() == DmarcResult::Pass || *dmarc.spf_result() == DmarcResult::Pass {
            result.dmarc_pass = 1;
        }
    }
    let mut auth = shared.auth.lock().unwrap_or_else(|e| e.into_inner());
    auth.checked += result.checked;
    auth.dkim_pass += result.dkim_pass;
    auth.spf_pass += result.spf_pass;
    auth.dmarc_pass += result.dmarc_pass;
}

/// The address inside `<...>` of `MAIL FROM:<a@b> ...`.
fn mail_from(line: &str) -> String {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(addr, _)| addr.to_string())
        .unwrap_or_default()
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn count(shared: &Shared, peer: IpAddr, f: impl FnOnce(&mut SourceCounts)) {
    f(shared
        .counts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(peer)
        .or_default());
}

/// A number in 0..100 from a shared xorshift generator (no need for a crypto RNG here).
fn roll(shared: &Shared) -> u64 {
    let mut x = shared.rng.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    shared.rng.store(x, Ordering::Relaxed);
    x % 100
}

async fn session(
    stream: TcpStream,
    peer: IpAddr,
    faults: Faults,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    let shared = &shared;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write
        .write_all(b"220 mx.dev.test mailfleet dev sink\r\n")
        .await?;
    let mut line = String::new();
    let mut recipients = 0u32;
    let mut helo = String::new();
    let mut sender = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let upper = line.trim_end().to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            helo = line.trim_end()[4..].trim().to_string();
        }
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-mx.dev.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n"
        } else if upper.starts_with("HELO") {
            b"250 mx.dev.test\r\n"
        } else if upper.starts_with("MAIL") {
            recipients = 0;
            sender = mail_from(&line);
            b"250 2.1.0 ok\r\n"
        } else if upper.starts_with("RCPT") {
            let r = roll(shared);
            if r < u64::from(faults.defer_percent) {
                count(shared, peer, |c| c.deferred += 1);
                b"450 4.2.0 mailbox busy, try again later (dev sink)\r\n"
            } else if r < u64::from(faults.defer_percent) + u64::from(faults.bounce_percent) {
                count(shared, peer, |c| c.rejected += 1);
                b"550 5.1.1 no such user (dev sink)\r\n"
            } else {
                recipients += 1;
                b"250 2.1.5 ok\r\n"
            }
        } else if upper == "DATA" {
            if recipients == 0 {
                b"554 5.5.1 no valid recipients\r\n"
            } else {
                write.write_all(b"354 go ahead\r\n").await?;
                let mut data = Vec::new();
                loop {
                    line.clear();
                    if lines.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line.trim_end_matches(['\r', '\n']) == "." {
                        break;
                    }
                    // Undo dot-stuffing (RFC 5321 section 4.5.2).
                    let text = line.strip_prefix('.').unwrap_or(&line);
                    data.extend_from_slice(text.as_bytes());
                }
                count(shared, peer, |c| c.accepted += 1);
                let received = Received {
                    peer,
                    helo: helo.clone(),
                    mail_from: sender.clone(),
                    data,
                };
                let checker = Arc::clone(shared);
                tokio::spawn(async move { check(&checker, received).await });
                recipients = 0;
                b"250 2.0.0 accepted by the dev sink\r\n"
            }
        } else if upper == "RSET" {
            recipients = 0;
            b"250 2.0.0 ok\r\n"
        } else if upper == "NOOP" {
            b"250 2.0.0 ok\r\n"
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            // STARTTLS included: the relay's TLS is opportunistic, so it carries on in clear.
            b"502 5.5.2 not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}
