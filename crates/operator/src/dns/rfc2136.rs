//! The `rfc2136` provider: dynamic updates (RFC 2136) signed with TSIG (RFC 8945), over TCP to
//! the zone's primary, and plain queries to the same server to read what it holds.
//!
//! Messages and TSIG come from hickory-proto (already in Cargo.lock through hickory-resolver;
//! its aws-lc-rs backend adds no crate and no second TLS or crypto stack). dns-update was not
//! adopted: hickory-proto needed no new dependency at all. One update message carries a
//! whole plan, so a server applies it all or nothing.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as HickoryTsig;
use hickory_proto::rr::rdata::{MX, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record as HRecord, RecordType as HType, TSigner};
use mailfleet_api::sendingdomain::TsigAlgorithm;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::plan::Plan;
use super::{Record, RecordData, RecordType};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Allowed clock difference between us and the server (RFC 8945 recommends 300 s).
const FUDGE: u16 = 300;

/// Errors of the rfc2136 provider.
#[derive(Debug, thiserror::Error)]
pub enum Rfc2136Error {
    #[error("invalid DNS server address {server:?}: expected host or host:port")]
    Server { server: String },
    #[error("the TSIG secret is not valid base64: {0}")]
    SecretEncoding(base64::DecodeError),
    #[error("invalid TSIG key: {0}")]
    TsigKey(String),
    #[error("invalid DNS name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("{name} is outside the zone {zone} of dns.rfc2136.zone")]
    OutsideZone { name: String, zone: String },
    #[error("cannot reach DNS server {server}: {source}")]
    Connect {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("DNS server {server} did not answer within {TIMEOUT:?}")]
    Timeout { server: SocketAddr },
    #[error("cannot encode or decode a DNS message for {server}: {reason}")]
    Message { server: SocketAddr, reason: String },
    #[error(
        "DNS server {server} refused the update signed with TSIG key {key:?}: {rcode}{tsig}; \
         check the TSIG key name, algorithm and secret against the server's"
    )]
    TsigRefused {
        server: SocketAddr,
        key: String,
        rcode: String,
        tsig: String,
    },
    #[error("DNS server {server} refused the update: {rcode}")]
    Refused { server: SocketAddr, rcode: String },
    #[error("the answer of DNS server {server} to our update carries no valid TSIG: {reason}")]
    ResponseTsig { server: SocketAddr, reason: String },
    #[error("DNS server {server} answered the query for {name} with {rcode}")]
    Query {
        server: SocketAddr,
        name: String,
        rcode: String,
    },
}

impl Rfc2136Error {
    /// Static category, for metrics and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Rfc2136Error::Server { .. }
            | Rfc2136Error::Name { .. }
            | Rfc2136Error::OutsideZone { .. } => "InvalidConfiguration",
            Rfc2136Error::SecretEncoding(_) | Rfc2136Error::TsigKey(_) => "InvalidTSIGKey",
            Rfc2136Error::TsigRefused { .. } | Rfc2136Error::ResponseTsig { .. } => "TSIGRejected",
            Rfc2136Error::Connect { .. } | Rfc2136Error::Timeout { .. } => "DNSUnreachable",
            Rfc2136Error::Message { .. }
            | Rfc2136Error::Refused { .. }
            | Rfc2136Error::Query { .. } => "DNSError",
        }
    }
}

/// Parses `host`, `host:port`, `[v6]:port` or `v6` (port 53 by default), resolving names.
pub async fn resolve_server(server: &str) -> Result<SocketAddr, Rfc2136Error> {
    let bad = || Rfc2136Error::Server {
        server: server.to_string(),
    };
    if let Ok(sa) = server.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = server.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    let with_port = if server.contains(':') {
        server.to_string()
    } else {
        format!("{server}:53")
    };
    tokio::net::lookup_host(with_port)
        .await
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

fn name(text: &str) -> Result<Name, Rfc2136Error> {
    let mut n = Name::from_ascii(format!("{}.", super::normalize(text))).map_err(|e| {
        Rfc2136Error::Name {
            name: text.to_string(),
            reason: e.to_string(),
        }
    })?;
    n.set_fqdn(true);
    Ok(n)
}

fn hickory_algorithm(a: TsigAlgorithm) -> HickoryTsig {
    match a {
        TsigAlgorithm::HmacSha256 => HickoryTsig::HmacSha256,
        TsigAlgorithm::HmacSha384 => HickoryTsig::HmacSha384,
        TsigAlgorithm::HmacSha512 => HickoryTsig::HmacSha512,
    }
}

/// One zone on one primary server, with its TSIG key.
#[derive(Clone)]
pub struct Rfc2136 {
    pub server: SocketAddr,
    zone: Name,
    zone_text: String,
    key_name: String,
    signer: TSigner,
    ttl: u32,
}

impl std::fmt::Debug for Rfc2136 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rfc2136")
            .field("server", &self.server)
            .field("zone", &self.zone_text)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl Rfc2136 {
    /// `secret_b64` is the TSIG secret as servers configure it (base64); `ttl` that of created
    /// records.
    pub fn new(
        server: SocketAddr,
        zone: &str,
        key_name: &str,
        algorithm: TsigAlgorithm,
        secret_b64: &str,
        ttl: u32,
    ) -> Result<Rfc2136, Rfc2136Error> {
        use base64::Engine;
        let secret = base64::engine::general_purpose::STANDARD
            .decode(secret_b64.trim())
            .map_err(Rfc2136Error::SecretEncoding)?;
        let signer = TSigner::new(secret, hickory_algorithm(algorithm), name(key_name)?, FUDGE)
            .map_err(|e| Rfc2136Error::TsigKey(e.to_string()))?;
        Ok(Rfc2136 {
            server,
            zone: name(zone)?,
            zone_text: super::normalize(zone),
            key_name: key_name.to_string(),
            signer,
            ttl,
        })
    }

    fn check_in_zone(&self, n: &str) -> Result<Name, Rfc2136Error> {
        let hn = name(n)?;
        if !self.zone.zone_of(&hn) {
            return Err(Rfc2136Error::OutsideZone {
                name: n.to_string(),
                zone: self.zone_text.clone(),
            });
        }
        Ok(hn)
    }

    async fn exchange(&self, message: &Message) -> Result<Vec<u8>, Rfc2136Error> {
        let server = self.server;
        let msg_err = |reason: String| Rfc2136Error::Message { server, reason };
        let bytes = message.to_vec().map_err(|e| msg_err(e.to_string()))?;
        let len = u16::try_from(bytes.len()).map_err(|_| msg_err("message too long".into()))?;
        let io = async {
            let mut s = tokio::net::TcpStream::connect(server)
                .await
                .map_err(|source| Rfc2136Error::Connect { server, source })?;
            let conn = |source| Rfc2136Error::Connect { server, source };
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            s.write_all(&framed).await.map_err(conn)?;
            let mut lenb = [0u8; 2];
            s.read_exact(&mut lenb).await.map_err(conn)?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(lenb))];
            s.read_exact(&mut buf).await.map_err(conn)?;
            Ok(buf)
        };
        tokio::time::timeout(TIMEOUT, io)
            .await
            .map_err(|_| Rfc2136Error::Timeout { server })?
    }

    /// What the server holds at `names` (TXT and MX only).
    pub async fn read(
        &self,
        names: &BTreeSet<(String, RecordType)>,
    ) -> Result<Vec<Record>, Rfc2136Error> {
        let mut out = Vec::new();
        for (n, t) in names {
            out.extend(self.query(n, *t).await?);
        }
        Ok(out)
    }

    async fn query(&self, n: &str, t: RecordType) -> Result<Vec<Record>, Rfc2136Error> {
        let qtype = match t {
            RecordType::Txt => HType::TXT,
            RecordType::Mx => HType::MX,
        };
        let mut m = Message::query();
        m.metadata.recursion_desired = false;
        m.add_query(Query::query(self.check_in_zone(n)?, qtype));
        let bytes = self.exchange(&m).await?;
        let resp = Message::from_vec(&bytes).map_err(|e| Rfc2136Error::Message {
            server: self.server,
            reason: e.to_string(),
        })?;
        match resp.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            rcode => {
                return Err(Rfc2136Error::Query {
                    server: self.server,
                    name: n.to_string(),
                    rcode: rcode.to_string(),
                });
            }
        }
        Ok(resp
            .answers
            .iter()
            .filter_map(|r| {
                from_hickory(&r.data).map(|data| Record {
                    name: super::normalize(&r.name.to_ascii()),
                    data,
                })
            })
            .filter(|r| r.name == super::normalize(n))
            .collect())
    }

    /// Applies a plan in one update message (deletions first).
    pub async fn apply(&self, plan: &Plan) -> Result<(), Rfc2136Error> {
        if plan.is_empty() {
            return Ok(());
        }
        let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Update);
        m.metadata.recursion_desired = false;
        let mut zone = Query::new();
        zone.set_name(self.zone.clone())
            .set_query_class(DNSClass::IN)
            .set_query_type(HType::SOA);
        m.add_zone(zone);
        for r in &plan.delete {
            let mut rec = HRecord::from_rdata(self.check_in_zone(&r.name)?, 0, to_hickory(r)?);
            rec.dns_class = DNSClass::NONE;
            m.add_update(rec);
        }
        for r in &plan.create {
            m.add_update(HRecord::from_rdata(
                self.check_in_zone(&r.name)?,
                self.ttl,
                to_hickory(r)?,
            ));
        }
        let server = self.server;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut verifier = m
            .finalize(&self.signer, now)
            .map_err(|e| Rfc2136Error::Message {
                server,
                reason: e.to_string(),
            })?;
        let bytes = self.exchange(&m).await?;
        let resp = Message::from_vec(&bytes).map_err(|e| Rfc2136Error::Message {
            server,
            reason: e.to_string(),
        })?;
        let rcode = resp.metadata.response_code;
        if rcode != ResponseCode::NoError {
            let tsig_error = resp
                .signature
                .as_ref()
                .and_then(|s| s.data.error.as_ref())
                .map(|e| format!(" (TSIG error {e:?})"))
                .unwrap_or_default();
            if rcode == ResponseCode::NotAuth || !tsig_error.is_empty() {
                return Err(Rfc2136Error::TsigRefused {
                    server,
                    key: self.key_name.clone(),
                    rcode: rcode.to_string(),
                    tsig: tsig_error,
                });
            }
            return Err(Rfc2136Error::Refused {
                server,
                rcode: rcode.to_string(),
            });
        }
        if let Some(v) = verifier.as_mut() {
            v.verify(&bytes).map_err(|e| Rfc2136Error::ResponseTsig {
                server,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

fn rand_id() -> u16 {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (n ^ (n >> 16)) as u16
}

fn to_hickory(r: &Record) -> Result<RData, Rfc2136Error> {
    Ok(match &r.data {
        RecordData::Txt(parts) => RData::TXT(TXT::new(parts.clone())),
        RecordData::Mx {
            preference,
            exchange,
        } => RData::MX(MX::new(*preference, name(exchange)?)),
    })
}

/// TXT and MX data in our form; other types are not ours to compare.
pub fn from_hickory(data: &RData) -> Option<RecordData> {
    match data {
        RData::TXT(t) => Some(RecordData::Txt(
            t.txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        )),
        RData::MX(mx) => Some(RecordData::Mx {
            preference: mx.preference,
            exchange: super::normalize(&mx.exchange.to_ascii()),
        }),
        _ => None,
    }
}
