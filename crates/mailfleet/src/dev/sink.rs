//! The sink MX of `mailfleet dev`: an SMTP server on 127.0.0.1 that takes every message and
//! counts it by the client's source address, which is the egress address the relay bound.
//! Optionally it answers a share of recipients with `450` (a deferral the relay retries) or
//! `550` (a hard bounce), so that the pool's counters show more than deliveries.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
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

#[derive(Debug, Default)]
struct Shared {
    counts: Mutex<BTreeMap<IpAddr, SourceCounts>>,
    rng: AtomicU64,
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
    /// Listens on a free port of 127.0.0.1.
    pub async fn start(faults: Faults) -> Result<Sink> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("failed to listen for the sink MX")?;
        let addr = listener.local_addr().context("no sink address")?;
        let shared = Arc::new(Shared {
            rng: AtomicU64::new(super::seed()),
            ..Shared::default()
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
                        let _ = session(stream, peer.ip(), faults, &shared).await;
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
    shared: &Shared,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write
        .write_all(b"220 mx.dev.test mailfleet dev sink\r\n")
        .await?;
    let mut line = String::new();
    let mut recipients = 0u32;
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let upper = line.trim_end().to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-mx.dev.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n"
        } else if upper.starts_with("HELO") {
            b"250 mx.dev.test\r\n"
        } else if upper.starts_with("MAIL") {
            recipients = 0;
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
                loop {
                    line.clear();
                    if lines.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line.trim_end_matches(['\r', '\n']) == "." {
                        break;
                    }
                }
                count(shared, peer, |c| c.accepted += 1);
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
