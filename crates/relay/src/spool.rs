//! The durable spool: a message is on stable storage before the relay answers `250`.
//!
//! `JournalSpool` appends records to segment files from one writer thread. Sessions hand it
//! their message and wait; the writer takes every record queued meanwhile, writes them with
//! one `write` and makes them durable with one `fdatasync` (group commit), then wakes all
//! waiters. So the fsync rate of the disk caps batches per second, not messages per second.
//!
//! Record: `len u32 | kind u8 | payload | fnv64 of kind+payload`. A torn tail after a crash
//! fails its checksum and ends the replay of that segment. `Accept` holds the whole message;
//! `RcptDone` marks one recipient finished (delivered or bounced). On open, every segment is
//! replayed and the messages with unfinished recipients come back. Segments are deleted
//! oldest-first once no live message starts in them, so a `RcptDone` record can never
//! outlive the segment of the message it refers to being needed.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

/// Errors of the spool, with the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("failed to {op} spool file {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the spool writer has stopped")]
    Stopped,
}

/// An accepted message: envelope plus the exact bytes to deliver (DKIM signed already).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    /// Unix seconds of acceptance; the max lifetime counts from here.
    pub received_at: u64,
    /// Return path; empty for bounces (null sender).
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub data: Vec<u8>,
}

/// A message found on the spool at start, with the recipients still to do.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub message: Message,
    pub pending: Vec<usize>,
}

/// Completion of a durable store.
pub type Stored = oneshot::Receiver<Result<(), SpoolError>>;

/// Where accepted mail lives until every recipient is finished.
pub trait Spool: Send + Sync + 'static {
    /// A fresh message id.
    fn next_id(&self) -> u64;
    /// Makes `msg` durable; the receiver resolves once it is on stable storage.
    fn store(&self, msg: &Message) -> Stored;
    /// Marks recipient `rcpt` of message `id` finished. Not awaited: losing this record in a
    /// crash means one extra delivery attempt, never a lost message.
    fn rcpt_done(&self, id: u64, rcpt: usize);
    /// Messages with unfinished recipients, as found when the spool was opened.
    fn take_recovered(&self) -> Vec<Recovered>;
}

const KIND_ACCEPT: u8 = 1;
const KIND_RCPT_DONE: u8 = 2;

fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 13);
    out.extend_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out.extend_from_slice(&fnv64(&[&[kind], payload]).to_le_bytes());
    out
}

/// Encodes an `Accept` record (public for the fuzz target and tests).
pub fn encode_accept(m: &Message) -> Vec<u8> {
    let mut p = Vec::with_capacity(m.data.len() + 64);
    p.extend_from_slice(&m.id.to_le_bytes());
    p.extend_from_slice(&m.received_at.to_le_bytes());
    put_bytes(&mut p, m.mail_from.as_bytes());
    p.extend_from_slice(&(m.rcpts.len() as u32).to_le_bytes());
    for r in &m.rcpts {
        put_bytes(&mut p, r.as_bytes());
    }
    put_bytes(&mut p, &m.data);
    frame(KIND_ACCEPT, &p)
}

fn encode_rcpt_done(id: u64, rcpt: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&id.to_le_bytes());
    p.extend_from_slice(&(rcpt as u32).to_le_bytes());
    frame(KIND_RCPT_DONE, &p)
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

#[derive(Debug)]
enum Record {
    Accept(Message),
    RcptDone(u64, usize),
}

/// Decodes the records of one segment; stops at the first torn or corrupt record.
fn decode_segment(buf: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut c = Cursor { b: buf };
    while let Some(len) = c.u32() {
        let len = len as usize;
        let Some(body) = c.take(len) else { break };
        let Some(sum) = c.u64() else { break };
        let Some((&kind, payload)) = body.split_first() else {
            break;
        };
        if fnv64(&[&[kind], payload]) != sum {
            break;
        }
        let mut p = Cursor { b: payload };
        let rec = match kind {
            KIND_ACCEPT => (|| {
                let id = p.u64()?;
                let received_at = p.u64()?;
                let mail_from = p.string()?;
                let n = p.u32()? as usize;
                let mut rcpts = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    rcpts.push(p.string()?);
                }
                let data = p.bytes()?.to_vec();
                Some(Record::Accept(Message {
                    id,
                    received_at,
                    mail_from,
                    rcpts,
                    data,
                }))
            })(),
            KIND_RCPT_DONE => (|| Some(Record::RcptDone(p.u64()?, p.u32()? as usize)))(),
            _ => None,
        };
        match rec {
            Some(r) => out.push(r),
            None => break,
        }
    }
    out
}

struct Job {
    bytes: Vec<u8>,
    /// Segment accounting: a new live message (Accept) or a finished one.
    event: JobEvent,
    done: Option<oneshot::Sender<Result<(), SpoolError>>>,
}

enum JobEvent {
    Accept { id: u64, rcpts: usize },
    RcptDone { id: u64 },
}

/// Which segment each live message starts in and how many recipients it still has.
#[derive(Default)]
struct Accounting {
    live: HashMap<u64, (u64, usize)>,
    per_segment: BTreeMap<u64, usize>,
}

impl Accounting {
    fn accept(&mut self, id: u64, seg: u64, rcpts: usize) {
        if rcpts == 0 || self.live.contains_key(&id) {
            return;
        }
        self.live.insert(id, (seg, rcpts));
        *self.per_segment.entry(seg).or_insert(0) += 1;
    }
    fn rcpt_done(&mut self, id: u64) {
        let Some((seg, left)) = self.live.get_mut(&id) else {
            return;
        };
        *left = left.saturating_sub(1);
        if *left == 0 {
            let seg = *seg;
            self.live.remove(&id);
            if let Some(n) = self.per_segment.get_mut(&seg) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// The journal spool (see module docs).
pub struct JournalSpool {
    tx: mpsc::UnboundedSender<Job>,
    next_id: Mutex<u64>,
    recovered: Mutex<Vec<Recovered>>,
}

impl std::fmt::Debug for JournalSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalSpool").finish_non_exhaustive()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("segment-{n:016}.log"))
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut segs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_prefix("segment-")
            .and_then(|s| s.strip_suffix(".log"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            segs.push(n);
        }
    }
    segs.sort_unstable();
    Ok(segs)
}

impl JournalSpool {
    /// Opens (or creates) the spool in `dir`, replays it, and starts the writer thread.
    pub fn open(dir: &Path, segment_size: u64) -> Result<Arc<Self>, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let segs = list_segments(dir)?;
        let mut messages: BTreeMap<u64, (u64, Message, Vec<bool>)> = BTreeMap::new();
        let mut max_id = 0u64;
        for &seg in &segs {
            let path = segment_path(dir, seg);
            let mut buf = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .map_err(io_err("read", &path))?;
            for rec in decode_segment(&buf) {
                match rec {
                    Record::Accept(m) => {
                        max_id = max_id.max(m.id);
                        let done = vec![false; m.rcpts.len()];
                        messages.entry(m.id).or_insert((seg, m, done));
                    }
                    Record::RcptDone(id, i) => {
                        if let Some((_, _, done)) = messages.get_mut(&id)
                            && let Some(d) = done.get_mut(i)
                        {
                            *d = true;
                        }
                    }
                }
            }
        }
        let mut acct = Accounting::default();
        let mut recovered = Vec::new();
        for (id, (seg, message, done)) in messages {
            let pending: Vec<usize> = (0..done.len()).filter(|i| !done[*i]).collect();
            if pending.is_empty() {
                continue;
            }
            acct.accept(id, seg, pending.len());
            recovered.push(Recovered { message, pending });
        }
        // Always write into a fresh segment: the tail of the last one may be torn.
        let current = segs.last().map_or(1, |n| n + 1);
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer::new(dir.to_owned(), segs, current, segment_size, acct)?;
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err("start writer for", dir))?;
        Ok(Arc::new(JournalSpool {
            tx,
            next_id: Mutex::new(max_id.max(now_us) + 1),
            recovered: Mutex::new(recovered),
        }))
    }
}

impl Spool for JournalSpool {
    fn next_id(&self) -> u64 {
        let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        *n
    }

    fn store(&self, msg: &Message) -> Stored {
        let (done, rx) = oneshot::channel();
        let job = Job {
            bytes: encode_accept(msg),
            event: JobEvent::Accept {
                id: msg.id,
                rcpts: msg.rcpts.len(),
            },
            done: Some(done),
        };
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job)
            && let Some(done) = job.done
        {
            let _ = done.send(Err(SpoolError::Stopped));
        }
        rx
    }

    fn rcpt_done(&self, id: u64, rcpt: usize) {
        let _ = self.tx.send(Job {
            bytes: encode_rcpt_done(id, rcpt),
            event: JobEvent::RcptDone { id },
            done: None,
        });
    }

    fn take_recovered(&self) -> Vec<Recovered> {
        std::mem::take(&mut *self.recovered.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

struct Writer {
    dir: PathBuf,
    /// Closed segments, oldest first, that still exist on disk.
    old: Vec<u64>,
    current: u64,
    file: File,
    written: u64,
    segment_size: u64,
    acct: Accounting,
}

/// Upper bound of one batch, so a flood of large messages still gets acknowledged steadily.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

impl Writer {
    fn new(
        dir: PathBuf,
        old: Vec<u64>,
        current: u64,
        segment_size: u64,
        acct: Accounting,
    ) -> Result<Self, SpoolError> {
        let file = Self::create(&dir, current)?;
        Ok(Writer {
            dir,
            old,
            current,
            file,
            written: 0,
            segment_size,
            acct,
        })
    }

    fn create(dir: &Path, n: u64) -> Result<File, SpoolError> {
        let path = segment_path(dir, n);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        // The new directory entry must be durable too, or a crash could lose the whole file.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync directory of", dir))?;
        Ok(file)
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut batch: Vec<Job> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            buf.clear();
            buf.extend_from_slice(&first.bytes);
            batch.push(first);
            while buf.len() < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(job) => {
                        buf.extend_from_slice(&job.bytes);
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            let result = self.write_batch(&buf, &batch);
            for job in batch.drain(..) {
                if let Some(done) = job.done {
                    let _ = done.send(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(SpoolError::Io {
                            op: "write",
                            path: segment_path(&self.dir, self.current),
                            source: std::io::Error::new(e.kind(), e.to_string()),
                        }),
                    });
                }
            }
            if let Err(e) = result {
                tracing::error!(error = %e, "spool write failed; refusing further mail");
                // A failed fsync leaves the file in an unknown state (fsyncgate): stop
                // acknowledging rather than pretend later writes are durable.
                rx.close();
                while let Some(job) = rx.blocking_recv() {
                    if let Some(done) = job.done {
                        let _ = done.send(Err(SpoolError::Stopped));
                    }
                }
                return;
            }
        }
    }

    fn write_batch(&mut self, buf: &[u8], batch: &[Job]) -> std::io::Result<()> {
        let needs_sync = batch.iter().any(|j| j.done.is_some());
        self.file.write_all(buf)?;
        if needs_sync {
            self.file.sync_data()?;
        }
        self.written += buf.len() as u64;
        for job in batch {
            match job.event {
                JobEvent::Accept { id, rcpts } => self.acct.accept(id, self.current, rcpts),
                JobEvent::RcptDone { id } => self.acct.rcpt_done(id),
            }
        }
        if self.written >= self.segment_size {
            self.file.sync_data()?;
            self.old.push(self.current);
            self.current += 1;
            self.file = Self::create(&self.dir, self.current)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.written = 0;
        }
        self.collect_garbage();
        Ok(())
    }

    fn collect_garbage(&mut self) {
        while let Some(&seg) = self.old.first() {
            if self.acct.per_segment.get(&seg).copied().unwrap_or(0) > 0 {
                break;
            }
            let path = segment_path(&self.dir, seg);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "failed to delete spool segment");
                break;
            }
            self.acct.per_segment.remove(&seg);
            self.old.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64, rcpts: usize) -> Message {
        Message {
            id,
            received_at: 1,
            mail_from: "a@example.test".into(),
            rcpts: (0..rcpts).map(|i| format!("r{i}@dest.test")).collect(),
            data: format!("Subject: {id}\r\n\r\nbody\r\n").into_bytes(),
        }
    }

    #[tokio::test]
    async fn replay_returns_unfinished_recipients() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = JournalSpool::open(dir.path(), 1 << 20).unwrap();
            spool.store(&msg(1, 2)).await.unwrap().unwrap();
            spool.store(&msg(2, 1)).await.unwrap().unwrap();
            spool.rcpt_done(1, 0);
            spool.rcpt_done(2, 0);
            // A later durable write proves the RcptDone records reached the file.
            spool.store(&msg(3, 1)).await.unwrap().unwrap();
        }
        let spool = JournalSpool::open(dir.path(), 1 << 20).unwrap();
        let mut rec = spool.take_recovered();
        rec.sort_by_key(|r| r.message.id);
        let got: Vec<(u64, Vec<usize>)> = rec
            .iter()
            .map(|r| (r.message.id, r.pending.clone()))
            .collect();
        assert_eq!(got, vec![(1, vec![1]), (3, vec![0])]);
        assert_eq!(rec[0].message, msg(1, 2));
        assert!(spool.next_id() > 3);
    }

    #[test]
    fn torn_tail_is_ignored() {
        let mut buf = encode_accept(&msg(7, 1));
        let second = encode_accept(&msg(8, 1));
        buf.extend_from_slice(&second[..second.len() - 3]);
        let recs = decode_segment(&buf);
        assert_eq!(recs.len(), 1);
        // A flipped byte fails the checksum.
        let mut bad = encode_accept(&msg(9, 1));
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        assert!(decode_segment(&bad).is_empty());
    }

    #[tokio::test]
    async fn finished_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = JournalSpool::open(dir.path(), 50).unwrap();
        for id in 1..=5 {
            spool.store(&msg(id, 1)).await.unwrap().unwrap();
        }
        assert!(list_segments(dir.path()).unwrap().len() >= 5);
        for id in 1..=5 {
            spool.rcpt_done(id, 0);
        }
        spool.store(&msg(6, 1)).await.unwrap().unwrap();
        let segs = list_segments(dir.path()).unwrap();
        // Only the segment holding message 6 and the current one can remain.
        assert!(segs.len() <= 2, "{segs:?}");
        drop(spool);
        let spool = JournalSpool::open(dir.path(), 50).unwrap();
        let rec = spool.take_recovered();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].message.id, 6);
    }

    #[tokio::test]
    async fn concurrent_stores_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let spool = JournalSpool::open(dir.path(), 1 << 30).unwrap();
        let mut waits = Vec::new();
        for id in 1..=200 {
            waits.push(spool.store(&msg(id, 1)));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        drop(spool);
        let spool = JournalSpool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(spool.take_recovered().len(), 200);
    }
}
