//! The traffic generator of `mailfleet dev`: an application that submits mail to the relay
//! pods over SMTP at a steady rate, spreading messages over the relays that are ready.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

/// Counters of the generator.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages a relay took (`250` after DATA).
    pub sent: AtomicU64,
    /// Submissions that failed (connection refused, `4xx`/`5xx`, timeout).
    pub failed: AtomicU64,
    /// Ticks with no ready relay to send to.
    pub skipped: AtomicU64,
    /// The last failure, for the progress display.
    pub last_error: Mutex<Option<String>>,
}

/// What to send.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// Messages per second.
    pub rate: f64,
    /// Envelope and header sender.
    pub from: String,
    /// Recipients are `user<N>@<domain>`.
    pub to_domain: String,
}

/// Sends until `stop` turns true. `targets` holds the relays' SMTP addresses (updated by the
/// caller as pods come and go).
pub async fn run(
    traffic: Traffic,
    targets: watch::Receiver<Vec<SocketAddr>>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let period = Duration::from_secs_f64(1.0 / traffic.rate.max(0.01));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let in_flight = Arc::new(Semaphore::new(32));
    let mut n: u64 = 0;
    let mut rng = super::seed();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let relays = targets.borrow().clone();
        if relays.is_empty() {
            stats.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            stats.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        n += 1;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let relay = relays[(n as usize) % relays.len()];
        let to = format!("user{}@{}", rng % 1000, traffic.to_domain);
        let from = traffic.from.clone();
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let result =
                tokio::time::timeout(Duration::from_secs(20), submit(relay, &from, &to, n)).await;
            match result {
                Ok(Ok(())) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => fail(&stats, format!("{relay}: {e:#}")),
                Err(_) => fail(&stats, format!("{relay}: timed out")),
            }
            drop(permit);
        });
    }
}

fn fail(stats: &Stats, why: String) {
    stats.failed.fetch_add(1, Ordering::Relaxed);
    *stats.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
}

/// One SMTP transaction: EHLO, MAIL, RCPT, DATA, QUIT.
async fn submit(relay: SocketAddr, from: &str, to: &str, n: u64) -> Result<()> {
    let stream = TcpStream::connect(relay).await?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    expect(&mut read, 220).await?;
    let domain = from.rsplit('@').next().unwrap_or("dev.test");
    let date = chrono::Utc::now().to_rfc2822();
    let steps: [(String, u16); 4] = [
        ("EHLO app.dev.test\r\n".to_string(), 250),
        (format!("MAIL FROM:<{from}>\r\n"), 250),
        (format!("RCPT TO:<{to}>\r\n"), 250),
        ("DATA\r\n".to_string(), 354),
    ];
    for (command, code) in steps {
        write.write_all(command.as_bytes()).await?;
        expect(&mut read, code).await?;
    }
    let body = format!(
        "From: Dev App <{from}>\r\nTo: <{to}>\r\nSubject: mailfleet dev message {n}\r\n\
         Date: {date}\r\nMessage-ID: <dev-{n}-{nonce}@{domain}>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Hello from the mailfleet dev traffic generator (message {n}).\r\n.\r\n",
        nonce = super::seed()
    );
    write.write_all(body.as_bytes()).await?;
    expect(&mut read, 250).await?;
    write.write_all(b"QUIT\r\n").await?;
    Ok(())
}

/// Reads one (possibly multi-line) reply and checks its code.
async fn expect(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>, code: u16) -> Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        let last = line.as_bytes().get(3) != Some(&b'-');
        if last {
            let got: u16 = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if got != code {
                bail!("{}", line.trim_end());
            }
            return Ok(());
        }
    }
}
