//! DNSBL checks of egress addresses with hickory-resolver.
//!
//! An IPv4 address a.b.c.d is listed on a zone when `d.c.b.a.<zone>` has an A record in
//! 127.0.0.0/8 (RFC 5782); IPv6 addresses use their 32 reversed nibbles. NXDOMAIN and NODATA
//! mean "not listed". Answers outside 127.0.0.0/8 are errors of the list, not listings.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

/// Why the blocklists could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum BlocklistError {
    #[error("invalid blocklist nameserver {0:?} (want host or host:port)")]
    Nameserver(String),
    #[error("cannot build a resolver: {0}")]
    Resolver(String),
    #[error("cannot look up {name}: {reason}")]
    Lookup { name: String, reason: String },
}

/// The DNSBL query name of `ip` on `zone`.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut labels = Vec::with_capacity(33);
            for byte in v6.octets().iter().rev() {
                labels.push(format!("{:x}", byte & 0x0f));
                labels.push(format!("{:x}", byte >> 4));
            }
            labels.push(zone.to_string());
            format!("{}.", labels.join("."))
        }
    }
}

fn parse_server(s: &str) -> Result<SocketAddr, BlocklistError> {
    let s = s.trim();
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| BlocklistError::Nameserver(s.to_string()))
}

/// The `nameserver` lines of a resolv.conf.
fn system_nameservers(resolv_conf: &str) -> Vec<String> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .map(str::to_string)
        .collect()
}

fn resolver(nameservers: &[String]) -> Result<TokioResolver, BlocklistError> {
    let system;
    let nameservers = if nameservers.is_empty() {
        system = system_nameservers(&std::fs::read_to_string("/etc/resolv.conf").map_err(|e| {
            BlocklistError::Resolver(format!(
                "no blocklists.nameservers given and /etc/resolv.conf is unreadable: {e}"
            ))
        })?);
        &system[..]
    } else {
        nameservers
    };
    if nameservers.is_empty() {
        return Err(BlocklistError::Resolver(
            "no blocklists.nameservers given and /etc/resolv.conf lists none".to_string(),
        ));
    }
    let mut builder = {
        let mut config = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
        for s in nameservers {
            let sa = parse_server(s)?;
            let mut udp = ConnectionConfig::udp();
            udp.port = sa.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = sa.port();
            let mut ns = NameServerConfig::udp_and_tcp(sa.ip());
            ns.connections = vec![udp, tcp];
            config.add_name_server(ns);
        }
        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
    };
    builder.options_mut().timeout = Duration::from_secs(3);
    builder.options_mut().attempts = 2;
    builder.options_mut().ndots = 0;
    // A delisting must be seen at the next check, not after a cached answer expires.
    builder.options_mut().cache_size = 0;
    builder
        .build()
        .map_err(|e| BlocklistError::Resolver(e.to_string()))
}

/// Checks every address against every zone: address → zones that list it (addresses that are
/// not valid IPs are skipped). Any lookup failure fails the whole check, so a DNS outage never
/// reads as "delisted".
pub async fn check(
    zones: &[String],
    nameservers: &[String],
    addresses: &[String],
) -> Result<BTreeMap<String, Vec<String>>, BlocklistError> {
    let resolver = resolver(nameservers)?;
    let mut out = BTreeMap::new();
    for address in addresses {
        let Ok(ip) = address.parse::<IpAddr>() else {
            continue;
        };
        let mut listed = Vec::new();
        for zone in zones {
            let name = query_name(ip, zone);
            match resolver.lookup(name.as_str(), RecordType::A).await {
                Ok(lookup) => {
                    let codes: Vec<std::net::Ipv4Addr> = lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::A(a) => Some(a.0),
                            _ => None,
                        })
                        .collect();
                    if codes.iter().any(|c| c.octets()[0] == 127) {
                        listed.push(zone.trim_end_matches('.').to_string());
                    } else if !codes.is_empty() {
                        return Err(BlocklistError::Lookup {
                            name,
                            reason: format!(
                                "answer {codes:?} is outside 127.0.0.0/8 (the list refuses this resolver?)"
                            ),
                        });
                    }
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
                Err(e) => {
                    return Err(BlocklistError::Lookup {
                        name,
                        reason: e.to_string(),
                    });
                }
            }
        }
        if !listed.is_empty() {
            out.insert(address.clone(), listed);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn query_names_reverse_the_address() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "bl.example.test"),
            "99.2.0.192.bl.example.test."
        );
        let v6 = query_name("2001:db8::1".parse().unwrap(), "bl.example.test.");
        assert!(v6.starts_with("1.0.0.0.0.0.0.0."));
        assert!(v6.ends_with(".8.b.d.0.1.0.0.2.bl.example.test."));
        assert_eq!(v6.split('.').count(), 32 + 3 + 1);
    }

    #[test]
    fn nameservers_take_an_optional_port() {
        assert_eq!(parse_server("127.0.0.1").unwrap().port(), 53);
        assert_eq!(parse_server("127.0.0.1:5353").unwrap().port(), 5353);
        assert!(parse_server("dns.example").is_err());
    }

    #[test]
    fn resolv_conf_nameservers() {
        let conf =
            "# comment\nsearch example\nnameserver 10.0.0.10\nnameserver ::1\noptions ndots:5\n";
        assert_eq!(system_nameservers(conf), vec!["10.0.0.10", "::1"]);
    }
}
