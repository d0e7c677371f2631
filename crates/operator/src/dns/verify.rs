//! What the authoritative servers serve, asked with hickory-resolver, and whether it is what
//! is desired.
//!
//! A fresh resolver per check with caching off: a verification must see the zone as it is
//! now, not as it was when a negative answer was cached.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RecordType as HType;

use super::plan::contradicts;
use super::spf::TxtSource;
use super::{Record, RecordData, RecordType};

/// Errors of verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no nameserver to verify against: set dns.verifyNameservers")]
    NoServers,
    #[error("cannot build a resolver for {servers:?}: {reason}")]
    Resolver {
        servers: Vec<SocketAddr>,
        reason: String,
    },
    #[error("cannot look up {name} {record_type} at {servers:?}: {reason}")]
    Lookup {
        servers: Vec<SocketAddr>,
        name: String,
        record_type: RecordType,
        reason: String,
    },
}

/// A resolver asking `servers` only, caching nothing. `recursion` sets the RD bit (needed
/// when a server is a recursive resolver asked about other zones; authoritative servers
/// ignore it).
fn resolver(servers: &[SocketAddr], recursion: bool) -> Result<TokioResolver, VerifyError> {
    if servers.is_empty() {
        return Err(VerifyError::NoServers);
    }
    let mut config = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
    for s in servers {
        let mut udp = ConnectionConfig::udp();
        udp.port = s.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = s.port();
        let mut ns = NameServerConfig::udp_and_tcp(s.ip());
        ns.connections = vec![udp, tcp];
        config.add_name_server(ns);
    }
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    // Authoritative servers answer at once; a dead one should not hold the reconcile long.
    builder.options_mut().timeout = Duration::from_secs(2);
    builder.options_mut().attempts = 1;
    builder.options_mut().ndots = 0;
    builder.options_mut().cache_size = 0;
    builder.options_mut().recursion_desired = recursion;
    builder.build().map_err(|e| VerifyError::Resolver {
        servers: servers.to_vec(),
        reason: e.to_string(),
    })
}

/// Asks `servers` (authoritative, no recursion needed) for the records at `names`.
pub async fn served(
    servers: &[SocketAddr],
    names: &BTreeSet<(String, RecordType)>,
) -> Result<Vec<Record>, VerifyError> {
    let resolver = resolver(servers, false)?;
    let mut out = Vec::new();
    for (name, t) in names {
        let qtype = match t {
            RecordType::Txt => HType::TXT,
            RecordType::Mx => HType::MX,
        };
        match resolver.lookup(format!("{name}."), qtype).await {
            Ok(lookup) => {
                for r in lookup.answers() {
                    if super::normalize(&r.name.to_ascii()) != *name {
                        continue;
                    }
                    if let Some(data) = super::rfc2136::from_hickory(&r.data) {
                        out.push(Record {
                            name: name.clone(),
                            data,
                        });
                    }
                }
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
            Err(e) => {
                return Err(VerifyError::Lookup {
                    servers: servers.to_vec(),
                    name: name.clone(),
                    record_type: *t,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// TXT lookups for [`super::spf::count`]: the records an SPF include pulls in, asked of
/// `servers` with recursion desired (an included domain is usually in another zone).
pub struct SpfResolver {
    servers: Vec<SocketAddr>,
    resolver: TokioResolver,
}

impl SpfResolver {
    pub fn new(servers: &[SocketAddr]) -> Result<SpfResolver, VerifyError> {
        Ok(SpfResolver {
            servers: servers.to_vec(),
            resolver: resolver(servers, true)?,
        })
    }
}

impl TxtSource for SpfResolver {
    fn txt(&self, name: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send {
        let query = format!("{}.", super::normalize(name));
        let servers = self.servers.clone();
        let resolver = self.resolver.clone();
        async move {
            match resolver.lookup(query.as_str(), HType::TXT).await {
                Ok(lookup) => Ok(lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match super::rfc2136::from_hickory(&r.data) {
                        Some(RecordData::Txt(parts)) => Some(parts.concat()),
                        _ => None,
                    })
                    .collect()),
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
                Err(e) => Err(format!("cannot look up {query} TXT at {servers:?}: {e}")),
            }
        }
    }
}

/// Per desired record: served exactly, with nothing contradicting it at the same name (a
/// second SPF or DMARC record would make receivers fail both).
pub fn verified(desired: &[Record], served: &[Record]) -> Vec<bool> {
    desired
        .iter()
        .map(|d| served.iter().any(|s| s.same_as(d)) && !served.iter().any(|s| contradicts(d, s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_needs_exact_value_and_no_contradiction() {
        let spf = Record::txt("d.test", "v=spf1 ip4:127.0.0.1 -all");
        let other_spf = Record::txt("d.test", "v=spf1 -all");
        let unrelated = Record::txt("d.test", "google-site-verification=x");
        assert_eq!(
            verified(std::slice::from_ref(&spf), &[spf.clone(), unrelated]),
            [true]
        );
        assert_eq!(verified(std::slice::from_ref(&spf), &[]), [false]);
        assert_eq!(
            verified(std::slice::from_ref(&spf), &[spf.clone(), other_spf]),
            [false]
        );
    }
}
