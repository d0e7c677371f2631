//! The embedded authoritative DNS server of `mailfleet dev`: one in-memory zone answered over
//! UDP and TCP on 127.0.0.1, so that relays find the sink MX the way they find real ones
//! (MX, then A), and the SendingDomain controller's `rfc2136` provider publishes SPF, DKIM and
//! DMARC records into it the way it does into a real primary server.
//!
//! A small responder on hickory-proto's message codec rather than hickory-server: the dev
//! fleet needs one zone, and hickory-proto (with its TSIG code) is already in the build.
//!
//! Queries are answered without authentication. Dynamic updates (RFC 2136) must be signed
//! with one of the zone's TSIG keys (RFC 8945): an unsigned update is `REFUSED`, an unknown
//! key or a wrong MAC gets `NOTAUTH` with TSIG error BADKEY or BADSIG, a signature outside its
//! fudge window BADTIME. Prerequisites (RFC 2136 section 3.2) are checked before any change,
//! the update section is applied as a whole, and the SOA serial goes up with every change.
//! Answers to signed requests are signed with the request's key.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::tsig::{TsigAlgorithm, TsigError};
use hickory_proto::rr::rdata::{A, MX, NS, SOA};
use hickory_proto::rr::{
    DNSClass, Name, RData, Record, RecordData, RecordType, TSigResponseContext, TSigner,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

const TTL: u32 = 60;
/// Allowed clock difference of TSIG-signed requests, in seconds (RFC 8945 recommends 300).
const FUDGE: u16 = 300;

type RrKey = (String, RecordType);

fn key(name: &Name, rtype: RecordType) -> RrKey {
    (name.to_lowercase().to_ascii(), rtype)
}

/// The records served, keyed by lowercased owner name and type, and the TSIG keys allowed to
/// change them. Names above the zone are empty, other names outside it do not exist.
#[derive(Debug)]
pub struct Zone {
    origin: Name,
    records: RwLock<BTreeMap<RrKey, Vec<Record>>>,
    keys: Vec<TsigKey>,
}

/// A TSIG key the zone accepts updates from.
#[derive(Clone)]
struct TsigKey(TSigner);

impl std::fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TsigKey")
            .field(&self.0.signer_name().to_ascii())
            .finish_non_exhaustive()
    }
}

/// How a request's TSIG checked out.
enum Auth {
    /// Not signed.
    None,
    /// Signed with a known key: answer signed with it, over the request's MAC.
    Valid { signer: TSigner, mac: Vec<u8> },
    /// Signed, but not acceptably: answer `NOTAUTH` with this TSIG error.
    Failed(TSigResponseContext),
}

impl Zone {
    /// A zone for `origin` (e.g. `dev.test.`) holding only its SOA and NS records.
    pub fn new(origin: &str) -> Result<Zone> {
        let origin = Name::from_ascii(origin).context("failed to parse the zone origin")?;
        let ns = Name::from_ascii("ns")
            .and_then(|n| n.append_domain(&origin))
            .context("failed to form the zone's NS name")?;
        let hostmaster = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&origin))
            .context("failed to form the zone's SOA mailbox")?;
        let zone = Zone {
            origin: origin.clone(),
            records: RwLock::new(BTreeMap::new()),
            keys: Vec::new(),
        };
        zone.insert(Record::from_rdata(
            origin.clone(),
            TTL,
            RData::SOA(SOA::new(ns.clone(), hostmaster, 1, 3600, 600, 86400, TTL)),
        ));
        zone.insert(Record::from_rdata(origin, TTL, RData::NS(NS(ns))));
        Ok(zone)
    }

    /// Accepts RFC 2136 updates signed with this key (`secret` is the raw key, not base64).
    pub fn with_tsig_key(
        mut self,
        name: &str,
        algorithm: TsigAlgorithm,
        secret: Vec<u8>,
    ) -> Result<Zone> {
        let name = Name::from_ascii(name).context("failed to parse the TSIG key name")?;
        let signer = TSigner::new(secret, algorithm, name, FUDGE)
            .context("failed to set up the TSIG key")?;
        self.keys.push(TsigKey(signer));
        Ok(self)
    }

    /// Adds a record to its RRset (unless the same data is there already).
    pub fn insert(&self, record: Record) {
        let mut records = self.records.write().unwrap_or_else(|e| e.into_inner());
        add(&mut records, record);
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

    /// The zone's SOA serial (it goes up with every update that changes something).
    #[cfg(test)]
    fn serial(&self) -> u32 {
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        records
            .get(&key(&self.origin, RecordType::SOA))
            .and_then(|set| set.first())
            .and_then(|r| match &r.data {
                RData::SOA(soa) => Some(soa.serial),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Checks the TSIG of a signed request (RFC 8945 section 5.2).
    fn authenticate(&self, bytes: &[u8], request: &Message, now: u64) -> Auth {
        let Some(sig) = request.signature.as_deref() else {
            return Auth::None;
        };
        let id = request.metadata.id;
        let Some(TsigKey(signer)) = self
            .keys
            .iter()
            .find(|k| k.0.signer_name() == &sig.name && *k.0.algorithm() == sig.data.algorithm)
        else {
            return Auth::Failed(TSigResponseContext::unknown_key(id, now, sig.name.clone()));
        };
        match signer.verify_message_byte(bytes, None, true) {
            Err(_) => Auth::Failed(TSigResponseContext::bad_signature(id, now, signer.clone())),
            Ok((mac, _, window)) if now < window.start || now > window.end => Auth::Failed(
                TSigResponseContext::new(id, now, signer.clone(), mac, Some(TsigError::BadTime)),
            ),
            Ok((mac, _, _)) => Auth::Valid {
                signer: signer.clone(),
                mac,
            },
        }
    }

    /// The answer to one request, encoded (`None` for what deserves no answer: undecodable
    /// bytes and responses).
    fn answer_bytes(&self, bytes: &[u8], now: u64) -> Option<Vec<u8>> {
        let request = Message::from_vec(bytes).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let id = request.metadata.id;
        let op_code = request.metadata.op_code;
        let (mut response, context) = match self.authenticate(bytes, &request, now) {
            Auth::Failed(context) => {
                let mut response = Message::error_msg(id, op_code, ResponseCode::NotAuth);
                response.add_queries(request.queries.iter().cloned());
                (response, Some(context))
            }
            auth => {
                let signed = matches!(auth, Auth::Valid { .. });
                let response = match op_code {
                    OpCode::Query => self.query(&request),
                    // Never an unauthenticated change.
                    OpCode::Update if !signed => {
                        Message::error_msg(id, op_code, ResponseCode::Refused)
                    }
                    OpCode::Update => self.update(&request),
                    _ => Message::error_msg(id, op_code, ResponseCode::NotImp),
                };
                let context = match auth {
                    Auth::Valid { signer, mac } => {
                        Some(TSigResponseContext::new(id, now, signer, mac, None))
                    }
                    _ => None,
                };
                (response, context)
            }
        };
        let unsigned = response.to_vec().ok()?;
        match context {
            None => Some(unsigned),
            Some(context) => {
                let tsig = context.sign(&unsigned).ok()?;
                response.set_signature(tsig);
                response.to_vec().ok()
            }
        }
    }

    fn query(&self, request: &Message) -> Message {
        let id = request.metadata.id;
        let op_code = request.metadata.op_code;
        let Some(query) = request.queries.first() else {
            return Message::error_msg(id, op_code, ResponseCode::FormErr);
        };
        let mut response = Message::response(id, op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.add_query(query.clone());
        if query.query_class() != DNSClass::IN {
            response.metadata.response_code = ResponseCode::Refused;
            return response;
        }
        if !self.origin.zone_of(query.name()) {
            // The relays and the sink use this server as their whole DNS, so it answers for
            // the rest of the dev world too: the names above the zone exist (empty, as the
            // path to it) and nothing else does. A DMARC policy lookup, for one, walks up to
            // the top-level domain.
            if !query.name().zone_of(&self.origin) {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
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
            missing => {
                if missing.is_none() && !exists {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
                // NODATA or NXDOMAIN: the SOA lets resolvers cache the negative answer.
                if let Some(soa) = records.get(&key(&self.origin, RecordType::SOA)) {
                    for r in soa {
                        response.add_authority(r.clone());
                    }
                }
            }
        }
        response
    }

    /// An RFC 2136 update (already authenticated): zone section, prerequisites, then the
    /// update section applied as a whole.
    fn update(&self, request: &Message) -> Message {
        let mut response = Message::response(request.metadata.id, OpCode::Update);
        response.add_queries(request.queries.iter().cloned());
        let rcode = self.apply_update(request);
        response.metadata.response_code = rcode;
        response
    }

    fn apply_update(&self, request: &Message) -> ResponseCode {
        // Zone section (3.1): exactly one SOA question for this zone.
        let [zone] = request.queries.as_slice() else {
            return ResponseCode::FormErr;
        };
        if zone.query_type() != RecordType::SOA || zone.query_class() != DNSClass::IN {
            return ResponseCode::FormErr;
        }
        if zone.name() != &self.origin {
            return ResponseCode::NotAuth;
        }
        let mut records = self.records.write().unwrap_or_else(|e| e.into_inner());
        if let Err(rcode) = self.check_prerequisites(&records, &request.answers) {
            return rcode;
        }
        // Prescan (3.4.1) before any change.
        for up in &request.authorities {
            if !self.origin.zone_of(&up.name) {
                return ResponseCode::NotZone;
            }
            let rtype = up.record_type();
            let ok = match up.dns_class {
                DNSClass::IN => !up.data.is_update() && !is_meta(rtype),
                DNSClass::ANY => up.ttl == 0 && up.data.is_update(),
                DNSClass::NONE => up.ttl == 0 && !up.data.is_update() && !is_meta(rtype),
                _ => false,
            };
            if !ok {
                return ResponseCode::FormErr;
            }
        }
        // Apply (3.4.2). The apex's SOA and NS records are the server's own.
        let mut changed = false;
        for up in &request.authorities {
            let rtype = up.record_type();
            let apex = up.name == self.origin;
            if apex && matches!(rtype, RecordType::SOA | RecordType::NS) {
                continue;
            }
            match up.dns_class {
                DNSClass::IN => {
                    let mut record = up.clone();
                    record.name = record.name.to_lowercase();
                    changed |= add(&mut records, record);
                }
                DNSClass::ANY => {
                    let name = up.name.to_lowercase().to_ascii();
                    let before = records.len();
                    records.retain(|(n, t), _| {
                        *n != name
                            || !(rtype == RecordType::ANY || *t == rtype)
                            || (apex && matches!(t, RecordType::SOA | RecordType::NS))
                    });
                    changed |= records.len() != before;
                }
                _ => {
                    let k = key(&up.name, rtype);
                    if let Some(set) = records.get_mut(&k) {
                        let before = set.len();
                        set.retain(|r| r.data != up.data);
                        changed |= set.len() != before;
                        if set.is_empty() {
                            records.remove(&k);
                        }
                    }
                }
            }
        }
        if changed
            && let Some(RData::SOA(soa)) = records
                .get_mut(&key(&self.origin, RecordType::SOA))
                .and_then(|set| set.first_mut())
                .map(|r| &mut r.data)
        {
            soa.serial = soa.serial.wrapping_add(1);
        }
        ResponseCode::NoError
    }

    /// Prerequisites (RFC 2136 section 3.2).
    fn check_prerequisites(
        &self,
        records: &BTreeMap<RrKey, Vec<Record>>,
        prerequisites: &[Record],
    ) -> Result<(), ResponseCode> {
        let in_use = |name: &Name| {
            let name = name.to_lowercase().to_ascii();
            records.keys().any(|(n, _)| *n == name)
        };
        // Value-dependent prerequisites, gathered per RRset and compared whole.
        let mut expected: BTreeMap<RrKey, Vec<&RData>> = BTreeMap::new();
        for pr in prerequisites {
            if pr.ttl != 0 {
                return Err(ResponseCode::FormErr);
            }
            if !self.origin.zone_of(&pr.name) {
                return Err(ResponseCode::NotZone);
            }
            let rtype = pr.record_type();
            match pr.dns_class {
                DNSClass::ANY if pr.data.is_update() => {
                    let found = if rtype == RecordType::ANY {
                        in_use(&pr.name)
                    } else {
                        records.contains_key(&key(&pr.name, rtype))
                    };
                    if !found {
                        return Err(if rtype == RecordType::ANY {
                            ResponseCode::NXDomain
                        } else {
                            ResponseCode::NXRRSet
                        });
                    }
                }
                DNSClass::NONE if pr.data.is_update() => {
                    let found = if rtype == RecordType::ANY {
                        in_use(&pr.name)
                    } else {
                        records.contains_key(&key(&pr.name, rtype))
                    };
                    if found {
                        return Err(if rtype == RecordType::ANY {
                            ResponseCode::YXDomain
                        } else {
                            ResponseCode::YXRRSet
                        });
                    }
                }
                DNSClass::IN if !pr.data.is_update() => {
                    expected
                        .entry(key(&pr.name, rtype))
                        .or_default()
                        .push(&pr.data);
                }
                _ => return Err(ResponseCode::FormErr),
            }
        }
        for (k, mut want) in expected {
            let mut have: Vec<&RData> = records
                .get(&k)
                .map(|set| set.iter().map(|r| &r.data).collect())
                .unwrap_or_default();
            want.dedup();
            let same = want.len() == have.len() && {
                have.retain(|d| !want.contains(d));
                have.is_empty()
            };
            if !same {
                return Err(ResponseCode::NXRRSet);
            }
        }
        Ok(())
    }
}

/// Adds `record` to its RRset; false when the same data was there already.
fn add(records: &mut BTreeMap<RrKey, Vec<Record>>, record: Record) -> bool {
    let set = records
        .entry(key(&record.name, record.record_type()))
        .or_default();
    if set.iter().any(|r| r.data == record.data) {
        return false;
    }
    set.push(record);
    true
}

/// Types that are questions or transport, never data (`ANY`, `AXFR`, `OPT`, `TSIG`, ...).
fn is_meta(rtype: RecordType) -> bool {
    matches!(
        rtype,
        RecordType::ANY
            | RecordType::AXFR
            | RecordType::IXFR
            | RecordType::OPT
            | RecordType::TSIG
            | RecordType::SIG
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
                    if let Some(mut out) = zone.answer_bytes(&buf[..n], unix_now()) {
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
                        let Some(out) = zone.answer_bytes(&buf, unix_now()) else {
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
    use hickory_proto::op::{Query, UpdateMessage};
    use hickory_proto::rr::rdata::TXT;
    use hickory_proto::rr::rdata::tsig::TSIG;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn zone() -> Zone {
        let zone = Zone::new("dev.test.")
            .unwrap()
            .with_tsig_key("dev-key.", TsigAlgorithm::HmacSha256, SECRET.to_vec())
            .unwrap();
        zone.add_mx("inbox.dev.test.", 10, "mx.dev.test.").unwrap();
        zone.add_a("mx.dev.test.", Ipv4Addr::LOCALHOST).unwrap();
        zone
    }

    fn name(n: &str) -> Name {
        Name::from_ascii(n).unwrap()
    }

    fn ask(zone: &Zone, n: &str, rtype: RecordType) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(name(n), rtype));
        let bytes = zone.answer_bytes(&q.to_vec().unwrap(), unix_now()).unwrap();
        Message::from_vec(&bytes).unwrap()
    }

    fn txt(n: &str, text: &str) -> Record {
        Record::from_rdata(name(n), 120, RData::TXT(TXT::new(vec![text.to_string()])))
    }

    fn texts(zone: &Zone, n: &str) -> Vec<String> {
        ask(zone, n, RecordType::TXT)
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(t.to_string()),
                _ => None,
            })
            .collect()
    }

    /// An update message for zone `dev.test.` with these prerequisites and updates.
    fn update(prerequisites: Vec<Record>, updates: Vec<Record>) -> Message {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Update);
        let mut z = Query::new();
        z.set_name(name("dev.test."))
            .set_query_class(DNSClass::IN)
            .set_query_type(RecordType::SOA);
        m.add_zone(z);
        for p in prerequisites {
            m.add_pre_requisite(p);
        }
        for u in updates {
            m.add_update(u);
        }
        m
    }

    fn class(mut r: Record, class: DNSClass) -> Record {
        r.dns_class = class;
        r.ttl = 0;
        r
    }

    fn empty(n: &str, rtype: RecordType, dns_class: DNSClass) -> Record {
        let mut r = Record::from_rdata(name(n), 0, RData::Update0(rtype));
        r.dns_class = dns_class;
        r
    }

    /// Sends `m` signed with `key`/`secret` at time `at`; returns the response, and whether its
    /// own TSIG verified against the request's.
    fn send_signed(
        zone: &Zone,
        mut m: Message,
        key: &str,
        secret: &[u8],
        at: u64,
    ) -> (Message, bool) {
        let signer =
            TSigner::new(secret.to_vec(), TsigAlgorithm::HmacSha256, name(key), FUDGE).unwrap();
        let mut verifier = m.finalize(&signer, at).unwrap().unwrap();
        let bytes = zone.answer_bytes(&m.to_vec().unwrap(), unix_now()).unwrap();
        let verified = verifier.verify(&bytes).is_ok();
        (Message::from_vec(&bytes).unwrap(), verified)
    }

    fn send(zone: &Zone, m: Message) -> Message {
        send_signed(zone, m, "dev-key.", SECRET, unix_now()).0
    }

    fn tsig_error(m: &Message) -> Option<TsigError> {
        m.signature
            .as_deref()
            .and_then(|s: &Record<TSIG>| s.data.error)
    }

    #[test]
    fn answers_mx_with_glue_nodata_and_nxdomain_inside_and_outside_the_zone() {
        let zone = zone();
        let m = ask(&zone, "INBOX.dev.test.", RecordType::MX);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.additionals.len(), 1);

        let m = ask(&zone, "inbox.dev.test.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);

        let m = ask(&zone, "nobody.dev.test.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);

        let m = ask(&zone, "dev.test.", RecordType::SOA);
        assert_eq!(m.answers.len(), 1);

        let m = ask(&zone, "example.com.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(!m.metadata.authoritative);
        let m = ask(&zone, "_dmarc.test.", RecordType::TXT);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask(&zone, "test.", RecordType::TXT);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn signed_update_adds_and_deletes_records_and_signs_the_answer() {
        let zone = zone();
        let serial = zone.serial();
        let (resp, verified) = send_signed(
            &zone,
            update(
                vec![],
                vec![
                    txt("mail.dev.test.", "v=spf1 ip4:127.0.10.0/29 -all"),
                    txt("_dmarc.mail.dev.test.", "v=DMARC1; p=reject"),
                    txt("_dmarc.mail.dev.test.", "second"),
                ],
            ),
            "dev-key.",
            SECRET,
            unix_now(),
        );
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert!(
            verified,
            "the answer's TSIG must verify over the request's MAC"
        );
        assert_eq!(
            texts(&zone, "mail.dev.test."),
            ["v=spf1 ip4:127.0.10.0/29 -all"]
        );
        assert_eq!(texts(&zone, "_dmarc.mail.dev.test.").len(), 2);
        assert_eq!(zone.serial(), serial + 1);

        // Delete one RR (class NONE), then a whole RRset (class ANY).
        let resp = send(
            &zone,
            update(
                vec![],
                vec![class(
                    txt("_dmarc.mail.dev.test.", "second"),
                    DNSClass::NONE,
                )],
            ),
        );
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            texts(&zone, "_dmarc.mail.dev.test."),
            ["v=DMARC1; p=reject"]
        );
        let resp = send(
            &zone,
            update(
                vec![],
                vec![empty("mail.dev.test.", RecordType::TXT, DNSClass::ANY)],
            ),
        );
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            ask(&zone, "mail.dev.test.", RecordType::TXT)
                .metadata
                .response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(zone.serial(), serial + 3);

        // Deleting everything at the apex keeps the zone's own SOA and NS.
        let resp = send(
            &zone,
            update(
                vec![],
                vec![empty("dev.test.", RecordType::ANY, DNSClass::ANY)],
            ),
        );
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert_eq!(ask(&zone, "dev.test.", RecordType::SOA).answers.len(), 1);
        assert_eq!(ask(&zone, "dev.test.", RecordType::NS).answers.len(), 1);
    }

    #[test]
    fn updates_without_a_valid_tsig_change_nothing() {
        let zone = zone();
        let serial = zone.serial();
        let add = || update(vec![], vec![txt("x.dev.test.", "nope")]);

        let bytes = zone
            .answer_bytes(&add().to_vec().unwrap(), unix_now())
            .unwrap();
        let resp = Message::from_vec(&bytes).unwrap();
        assert_eq!(resp.metadata.response_code, ResponseCode::Refused);
        assert!(resp.signature.is_none());

        let (resp, _) = send_signed(&zone, add(), "other-key.", SECRET, unix_now());
        assert_eq!(resp.metadata.response_code, ResponseCode::NotAuth);
        assert_eq!(tsig_error(&resp), Some(TsigError::BadKey));

        let (resp, _) = send_signed(&zone, add(), "dev-key.", b"wrong secret", unix_now());
        assert_eq!(resp.metadata.response_code, ResponseCode::NotAuth);
        assert_eq!(tsig_error(&resp), Some(TsigError::BadSig));

        let (resp, _) = send_signed(&zone, add(), "dev-key.", SECRET, unix_now() - 3600);
        assert_eq!(resp.metadata.response_code, ResponseCode::NotAuth);
        assert_eq!(tsig_error(&resp), Some(TsigError::BadTime));

        assert!(texts(&zone, "x.dev.test.").is_empty());
        assert_eq!(zone.serial(), serial);
    }

    #[test]
    fn prerequisites_and_zone_checks_gate_the_whole_update() {
        let zone = zone();
        send(&zone, update(vec![], vec![txt("a.dev.test.", "one")]));
        let serial = zone.serial();
        let cases = [
            // RRset must exist.
            (
                vec![empty("b.dev.test.", RecordType::TXT, DNSClass::ANY)],
                ResponseCode::NXRRSet,
            ),
            // Name must exist.
            (
                vec![empty("b.dev.test.", RecordType::ANY, DNSClass::ANY)],
                ResponseCode::NXDomain,
            ),
            // Name must not exist.
            (
                vec![empty("a.dev.test.", RecordType::ANY, DNSClass::NONE)],
                ResponseCode::YXDomain,
            ),
            // RRset must not exist.
            (
                vec![empty("a.dev.test.", RecordType::TXT, DNSClass::NONE)],
                ResponseCode::YXRRSet,
            ),
            // RRset must equal exactly.
            (
                vec![class(txt("a.dev.test.", "two"), DNSClass::IN)],
                ResponseCode::NXRRSet,
            ),
            // Outside the zone.
            (
                vec![empty("a.example.com.", RecordType::TXT, DNSClass::ANY)],
                ResponseCode::NotZone,
            ),
        ];
        for (prerequisites, rcode) in cases {
            let resp = send(
                &zone,
                update(prerequisites.clone(), vec![txt("c.dev.test.", "added")]),
            );
            assert_eq!(resp.metadata.response_code, rcode, "{prerequisites:?}");
        }
        assert!(texts(&zone, "c.dev.test.").is_empty());
        assert_eq!(zone.serial(), serial);

        // A valid prerequisite set lets it through.
        let resp = send(
            &zone,
            update(
                vec![
                    class(txt("a.dev.test.", "one"), DNSClass::IN),
                    empty("c.dev.test.", RecordType::ANY, DNSClass::NONE),
                ],
                vec![txt("c.dev.test.", "added")],
            ),
        );
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert_eq!(texts(&zone, "c.dev.test."), ["added"]);

        // An update for another zone, or a record outside this one.
        let mut other = update(vec![], vec![txt("x.dev.test.", "x")]);
        other.queries[0].set_name(name("example.com."));
        assert_eq!(
            send(&zone, other).metadata.response_code,
            ResponseCode::NotAuth
        );
        let resp = send(
            &zone,
            update(
                vec![],
                vec![txt("d.dev.test.", "d"), txt("x.example.com.", "x")],
            ),
        );
        assert_eq!(resp.metadata.response_code, ResponseCode::NotZone);
        assert!(texts(&zone, "d.dev.test.").is_empty());
    }
}
