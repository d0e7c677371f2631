//! The embedded authoritative DNS server of `mailfleet dev`: one in-memory zone answered over
//! UDP and TCP on 127.0.0.1, so that relays find the sink MX the way they find real ones
//! (MX, then A).
//!
//! A small responder on hickory-proto's message codec rather than hickory-server: the dev
//! fleet needs a handful of static records, and hickory-proto is already in the build.
//!
//! RFC 2136: UPDATE messages are answered `NOTIMP` today. The zone is a shared, mutable
//! [`Zone`] on purpose: accepting updates means verifying the TSIG signature of the message
//! (hickory-proto's `TSigVerifier`), checking the prerequisite section, and applying the
//! update section through [`Zone::insert`] / [`Zone::remove`], which is what the SendingDomain
//! controller's `rfc2136` provider will send SPF/DKIM/DMARC records through.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, MX};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

const TTL: u32 = 60;

/// The records served, keyed by lowercased owner name and type. The zone's apex is the
/// common parent of its names (`dev.test` here); names outside it get `REFUSED`.
#[derive(Debug)]
pub struct Zone {
    origin: Name,
    records: RwLock<BTreeMap<(String, RecordType), Vec<Record>>>,
}

fn key(name: &Name, rtype: RecordType) -> (String, RecordType) {
    (name.to_lowercase().to_ascii(), rtype)
}

impl Zone {
    /// An empty zone for `origin` (e.g. `dev.test.`).
    pub fn new(origin: &str) -> Result<Zone> {
        Ok(Zone {
            origin: Name::from_ascii(origin).context("failed to parse the zone origin")?,
            records: RwLock::new(BTreeMap::new()),
        })
    }

    /// Adds a record (an RFC 2136 "add to an RRset" will land here).
    pub fn insert(&self, record: Record) {
        let k = key(&record.name, record.record_type());
        let mut records = self.records.write().unwrap_or_else(|e| e.into_inner());
        let set = records.entry(k).or_default();
        if !set.iter().any(|r| r.data == record.data) {
            set.push(record);
        }
    }

    /// Removes an RRset (an RFC 2136 "delete an RRset" will land here).
    #[allow(dead_code)]
    pub fn remove(&self, name: &Name, rtype: RecordType) {
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key(name, rtype));
    }

    /// `name MX preference exchange`.
    pub fn add_mx(&self, name: &str, preference: u16, exchange: &str) -> Result<()> {
        let name = Name::from_ascii(name).context("failed to parse an MX owner")?;
        let exchange = Name::from_ascii(exchange).context("failed to parse an MX exchange")?;
        self.insert(Record::from_rdata(
            name,
            TTL,
            RData::MX(MX::new(preference, exchange)),
        ));
        Ok(())
    }

    /// `name A address`.
    pub fn add_a(&self, name: &str, address: Ipv4Addr) -> Result<()> {
        let name = Name::from_ascii(name).context("failed to parse an A owner")?;
        self.insert(Record::from_rdata(name, TTL, RData::A(A(address))));
        Ok(())
    }

    /// The answer to one request (already decoded).
    fn answer(&self, request: &Message) -> Message {
        let id = request.metadata.id;
        let op_code = request.metadata.op_code;
        if request.metadata.message_type != MessageType::Query {
            return Message::error_msg(id, op_code, ResponseCode::FormErr);
        }
        if op_code != OpCode::Query {
            // OpCode::Update (RFC 2136) arrives here until updates are implemented.
            return Message::error_msg(id, op_code, ResponseCode::NotImp);
        }
        let Some(query) = request.queries.first() else {
            return Message::error_msg(id, op_code, ResponseCode::FormErr);
        };
        let mut response = Message::response(id, op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.add_query(query.clone());
        if query.query_class() != DNSClass::IN || !self.origin.zone_of(query.name()) {
            response.metadata.response_code = ResponseCode::Refused;
            return response;
        }
        response.metadata.authoritative = true;
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        let name = query.name().to_lowercase().to_ascii();
        let exists = records.keys().any(|(n, _)| *n == name);
        match records.get(&(name, query.query_type())) {
            Some(set) => {
                for r in set {
                    response.add_answer(r.clone());
                }
                // Glue the exchange's address, as real servers do, to save a round trip.
                for r in set {
                    if let RData::MX(mx) = &r.data
                        && let Some(a) = records.get(&key(&mx.exchange, RecordType::A))
                    {
                        for a in a {
                            response.add_additional(a.clone());
                        }
                    }
                }
            }
            None if exists => {} // NODATA
            None => response.metadata.response_code = ResponseCode::NXDomain,
        }
        response
    }

    fn answer_bytes(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(bytes).ok()?;
        self.answer(&request).to_vec().ok()
    }
}

/// A running DNS server.
#[derive(Debug)]
pub struct DnsServer {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DnsServer {
    /// Serves `zone` on a free port of 127.0.0.1, the same for UDP and TCP.
    pub async fn start(zone: Arc<Zone>) -> Result<DnsServer> {
        let (udp, tcp) = bind_pair().await?;
        let addr = udp.local_addr().context("failed to read the DNS address")?;
        let udp = Arc::new(udp);
        let udp_task = {
            let zone = Arc::clone(&zone);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    if let Some(mut out) = zone.answer_bytes(&buf[..n]) {
                        if out.len() > 512 {
                            // Over the classic UDP limit: let the client retry over TCP.
                            if let Ok(m) = Message::from_vec(&out) {
                                out = m.truncate().to_vec().unwrap_or_default();
                            }
                        }
                        let _ = udp.send_to(&out, peer).await;
                    }
                }
            })
        };
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = tcp.accept().await else {
                    continue;
                };
                let zone = Arc::clone(&zone);
                tokio::spawn(async move {
                    loop {
                        let Ok(len) = stream.read_u16().await else {
                            return;
                        };
                        let mut buf = vec![0u8; usize::from(len)];
                        if stream.read_exact(&mut buf).await.is_err() {
                            return;
                        }
                        let Some(out) = zone.answer_bytes(&buf) else {
                            return;
                        };
                        let Ok(len) = u16::try_from(out.len()) else {
                            return;
                        };
                        if stream.write_u16(len).await.is_err()
                            || stream.write_all(&out).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Ok(DnsServer {
            addr,
            tasks: vec![udp_task, tcp_task],
        })
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A UDP socket and a TCP listener on the same free port of 127.0.0.1.
async fn bind_pair() -> Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("failed to bind a UDP socket for DNS")?;
        let port = udp.local_addr().context("no UDP address")?.port();
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow::anyhow!(
        "failed to find a port free for both UDP and TCP: {last:?}"
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use hickory_proto::op::Query;

    fn ask(zone: &Zone, name: &str, rtype: RecordType) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        let bytes = zone.answer_bytes(&q.to_vec().unwrap()).unwrap();
        Message::from_vec(&bytes).unwrap()
    }

    #[test]
    fn answers_mx_with_glue_nodata_nxdomain_and_refuses_other_zones() {
        let zone = Zone::new("dev.test.").unwrap();
        zone.add_mx("inbox.dev.test.", 10, "mx.dev.test.").unwrap();
        zone.add_a("mx.dev.test.", Ipv4Addr::LOCALHOST).unwrap();

        let m = ask(&zone, "INBOX.dev.test.", RecordType::MX);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.additionals.len(), 1);

        let m = ask(&zone, "inbox.dev.test.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());

        let m = ask(&zone, "nobody.dev.test.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

        let m = ask(&zone, "example.com.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }
}
