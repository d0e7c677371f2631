//! Egress address allocation: which relay pod sends from which address.
//!
//! Pure functions, called by the RelayPool controller on every reconcile with the pool's spec
//! and the assignment recorded in its status (so that allocation survives operator restarts).
//! The invariant that matters to receivers and to the platform's routing: an address is never
//! used by two live pods at once. So an address only moves after its current pod let it go:
//! the pod was scaled away and is gone, or the relay confirmed (over the coordinator) that it
//! stopped using the address. Until then the address stays with its pod, marked draining.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use mailfleet_api::relaypool::{EgressMode, EgressSpec};

/// Errors of turning the egress spec into addresses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EgressError {
    /// An address entry does not parse.
    #[error("egress address {text:?} is not an IP address")]
    Address {
        /// The text.
        text: String,
    },
    /// A CIDR entry does not parse.
    #[error("egress CIDR {text:?} is not a network such as 192.0.2.0/28")]
    Cidr {
        /// The text.
        text: String,
    },
    /// A CIDR is larger than the API allows.
    #[error("egress CIDR {text} holds more than {max} addresses")]
    CidrTooLarge {
        /// The text.
        text: String,
        /// The most addresses a CIDR may hold.
        max: u32,
    },
    /// An address (from a list or a CIDR) has no HELO name.
    #[error("egress address {address} has no heloName and the pool has no heloNameTemplate")]
    NoHeloName {
        /// The address.
        address: IpAddr,
    },
}

/// Largest number of addresses one CIDR may expand to (an IPv4 /20).
pub const MAX_CIDR_ADDRESSES: u32 = 4096;

/// One usable egress address and its HELO name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EgressAddr {
    /// The address.
    pub ip: IpAddr,
    /// The HELO/EHLO name to use from it.
    pub helo_name: String,
}

/// Expands the pool's address list and CIDRs into addresses with HELO names, sorted and
/// without duplicates (an explicit entry wins over a CIDR's, so its HELO name is kept).
pub fn expand(spec: &EgressSpec) -> Result<Vec<EgressAddr>, EgressError> {
    let mut out: BTreeMap<IpAddr, String> = BTreeMap::new();
    for a in &spec.addresses {
        let ip: IpAddr = a.address.parse().map_err(|_| EgressError::Address {
            text: a.address.clone(),
        })?;
        let helo = match (&a.helo_name, &spec.helo_name_template) {
            (Some(name), _) => name.clone(),
            (None, Some(template)) => helo_from_template(template, ip),
            (None, None) => return Err(EgressError::NoHeloName { address: ip }),
        };
        out.insert(ip, helo);
    }
    for text in &spec.cidrs {
        let net: IpNet = text
            .parse()
            .map_err(|_| EgressError::Cidr { text: text.clone() })?;
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        if host_bits > MAX_CIDR_ADDRESSES.trailing_zeros() {
            return Err(EgressError::CidrTooLarge {
                text: text.clone(),
                max: MAX_CIDR_ADDRESSES,
            });
        }
        let hosts: Vec<IpAddr> = match net {
            // hosts() leaves out network and broadcast addresses of IPv4 ranges (not of /31
            // and /32, which have none): those cannot send.
            IpNet::V4(n) => n.hosts().map(IpAddr::V4).collect(),
            IpNet::V6(n) => n.hosts().map(IpAddr::V6).collect(),
        };
        for ip in hosts {
            if out.contains_key(&ip) {
                continue;
            }
            let template = spec
                .helo_name_template
                .as_ref()
                .ok_or(EgressError::NoHeloName { address: ip })?;
            out.insert(ip, helo_from_template(template, ip));
        }
    }
    Ok(out
        .into_iter()
        .map(|(ip, helo_name)| EgressAddr { ip, helo_name })
        .collect())
}

/// Fills `{ip}` of a HELO template with the address written as a DNS label: IPv4 dots become
/// `-` (`192-0-2-10`); IPv6 is written out in its eight groups joined by `-`
/// (`2001-db8-0-0-0-0-0-1`), since the compressed form would give labels like `2001-db8--1`.
pub fn helo_from_template(template: &str, ip: IpAddr) -> String {
    let label = match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join("-"),
    };
    template.replace("{ip}", &label)
}

/// Where an address stands in the allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Used by this pod ordinal.
    Assigned(u32),
    /// Still held by `from` (which must stop using it); goes to `to` once released. `to` is
    /// `None` when no live pod can take it (the pool is scaled to zero).
    Draining {
        /// The pod that still holds the address.
        from: u32,
        /// The pod that gets it next.
        to: Option<u32>,
    },
    /// Nobody uses it (no pod can take it).
    Unassigned,
}

impl Placement {
    /// The pod that may send from the address right now.
    pub fn holder(self) -> Option<u32> {
        match self {
            Placement::Assigned(o) => Some(o),
            Placement::Draining { from, .. } => Some(from),
            Placement::Unassigned => None,
        }
    }
}

/// What the allocator knows of the pods.
#[derive(Debug, Clone, Default)]
pub struct PodFacts {
    /// Ordinals of pods that exist (running or terminating).
    pub live: BTreeSet<u32>,
    /// Addresses whose holder confirmed it no longer uses them.
    pub released: BTreeSet<IpAddr>,
}

/// Computes the next placement of every address.
///
/// - An address stays with its pod while that pod's ordinal is below `replicas` (stability).
/// - An address of a pod being scaled away drains: it stays with that pod until the pod is
///   gone or released it, then moves to the live pod with the fewest addresses.
/// - New addresses go to the pod with the fewest addresses. In `ciliumEgressGateway` mode a pod
///   holds at most one address; extra addresses stay unassigned.
/// - When pods were added, addresses move from the most loaded pods towards them, through the
///   same draining step, until the spread is even (differs by at most one).
/// - Addresses removed from the spec are dropped.
pub fn allocate(
    addresses: &[EgressAddr],
    previous: &BTreeMap<IpAddr, Placement>,
    replicas: u32,
    mode: EgressMode,
    pods: &PodFacts,
) -> BTreeMap<IpAddr, Placement> {
    let per_pod_cap = match mode {
        EgressMode::CiliumEgressGateway => Some(1usize),
        EgressMode::Bind => None,
    };
    let wanted = |o: u32| o < replicas;
    let mut next: BTreeMap<IpAddr, Placement> = BTreeMap::new();

    // 1. Carry over what is still valid; settle drains whose holder let go.
    for a in addresses {
        let placement = match previous.get(&a.ip).copied() {
            Some(Placement::Assigned(o)) if wanted(o) => Placement::Assigned(o),
            Some(Placement::Assigned(o)) if pods.live.contains(&o) => {
                Placement::Draining { from: o, to: None }
            }
            Some(Placement::Draining { from, to }) => {
                let let_go = !pods.live.contains(&from) || pods.released.contains(&a.ip);
                match (let_go, to) {
                    (true, Some(t)) if wanted(t) => Placement::Assigned(t),
                    (true, _) => Placement::Unassigned,
                    // The holder came back into range (scaled up again): cancel the move.
                    (false, _) if wanted(from) && to.is_none_or(|t| !wanted(t)) => {
                        Placement::Assigned(from)
                    }
                    (false, Some(t)) if wanted(t) => Placement::Draining { from, to: Some(t) },
                    (false, _) => Placement::Draining { from, to: None },
                }
            }
            _ => Placement::Unassigned,
        };
        next.insert(a.ip, placement);
    }

    // Load counts what each pod will hold once moves complete.
    let load = |next: &BTreeMap<IpAddr, Placement>, o: u32| {
        next.values()
            .filter(|p| match p {
                Placement::Assigned(x) => *x == o,
                Placement::Draining { to: Some(t), .. } => *t == o,
                _ => false,
            })
            .count()
    };
    let least_loaded = |next: &BTreeMap<IpAddr, Placement>| {
        (0..replicas)
            .map(|o| (load(next, o), o))
            .filter(|(l, _)| per_pod_cap.is_none_or(|cap| *l < cap))
            .min()
            .map(|(_, o)| o)
    };

    // 2. Give unassigned addresses and drains without a target to the least loaded pod.
    let ips: Vec<IpAddr> = next.keys().copied().collect();
    for ip in &ips {
        let Some(current) = next.get(ip).copied() else {
            continue;
        };
        match current {
            Placement::Unassigned => {
                if let Some(o) = least_loaded(&next) {
                    next.insert(*ip, Placement::Assigned(o));
                }
            }
            Placement::Draining { from, to: None } => {
                let target = least_loaded(&next);
                next.insert(*ip, Placement::Draining { from, to: target });
            }
            _ => {}
        }
    }

    // 3. Rebalance: move addresses from the most to the least loaded pod until even.
    loop {
        let loads: Vec<(usize, u32)> = (0..replicas).map(|o| (load(&next, o), o)).collect();
        let Some(&(max_load, max_o)) = loads
            .iter()
            .max_by_key(|(l, o)| (*l, std::cmp::Reverse(*o)))
        else {
            break;
        };
        let Some(&(min_load, min_o)) = loads.iter().min() else {
            break;
        };
        if max_load <= min_load + 1 {
            break;
        }
        // Move one settled address of the most loaded pod (the highest address, so the choice
        // is deterministic).
        let candidate = next
            .iter()
            .rev()
            .find(|(_, p)| **p == Placement::Assigned(max_o))
            .map(|(ip, _)| *ip);
        match candidate {
            Some(ip) => {
                next.insert(
                    ip,
                    Placement::Draining {
                        from: max_o,
                        to: Some(min_o),
                    },
                );
            }
            None => break,
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailfleet_api::relaypool::EgressAddress;

    fn spec(addresses: &[&str], cidrs: &[&str]) -> EgressSpec {
        EgressSpec {
            mode: EgressMode::Bind,
            addresses: addresses
                .iter()
                .map(|a| EgressAddress {
                    address: (*a).to_owned(),
                    helo_name: None,
                })
                .collect(),
            cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
            helo_name_template: Some("mta-{ip}.example.com".to_owned()),
            cilium: None,
        }
    }

    fn addrs(n: u8) -> Vec<EgressAddr> {
        (1..=n)
            .map(|i| EgressAddr {
                ip: IpAddr::from([192, 0, 2, i]),
                helo_name: format!("h{i}.example.com"),
            })
            .collect()
    }

    fn live(ordinals: std::ops::Range<u32>) -> PodFacts {
        PodFacts {
            live: ordinals.collect(),
            released: BTreeSet::new(),
        }
    }

    /// No address has two holders and no pod below `replicas` is left out needlessly.
    fn check_invariants(p: &BTreeMap<IpAddr, Placement>, replicas: u32) {
        for placement in p.values() {
            if let Placement::Assigned(o) = placement {
                assert!(
                    *o < replicas,
                    "assigned to a pod that should not exist: {p:?}"
                );
            }
        }
    }

    #[test]
    fn expands_lists_and_cidrs_with_helo_names() {
        let s = spec(&["192.0.2.10"], &["198.51.100.8/30", "2001:db8::/127"]);
        let got = expand(&s).unwrap();
        let ips: Vec<String> = got.iter().map(|a| a.ip.to_string()).collect();
        assert_eq!(
            ips,
            [
                "192.0.2.10",
                "198.51.100.9",
                "198.51.100.10",
                "2001:db8::",
                "2001:db8::1"
            ]
        );
        assert_eq!(got[1].helo_name, "mta-198-51-100-9.example.com");
        assert_eq!(got[3].helo_name, "mta-2001-db8-0-0-0-0-0-0.example.com");
        assert_eq!(got[4].helo_name, "mta-2001-db8-0-0-0-0-0-1.example.com");
    }

    #[test]
    fn explicit_helo_name_wins_and_missing_names_are_errors() {
        let mut s = spec(&["192.0.2.10"], &["192.0.2.8/30"]);
        s.addresses[0].helo_name = Some("mta1.example.com".to_owned());
        let got = expand(&s).unwrap();
        assert_eq!(
            got.iter()
                .find(|a| a.ip.to_string() == "192.0.2.10")
                .unwrap()
                .helo_name,
            "mta1.example.com"
        );
        s.helo_name_template = None;
        assert!(matches!(expand(&s), Err(EgressError::NoHeloName { .. })));
        let big = spec(&[], &["10.0.0.0/16"]);
        assert!(matches!(
            expand(&big),
            Err(EgressError::CidrTooLarge { .. })
        ));
    }

    #[test]
    fn spreads_evenly_and_is_stable() {
        let a = addrs(7);
        let first = allocate(&a, &BTreeMap::new(), 3, EgressMode::Bind, &live(0..3));
        check_invariants(&first, 3);
        let mut counts = [0; 3];
        for p in first.values() {
            counts[p.holder().unwrap() as usize] += 1;
        }
        assert_eq!(
            counts.iter().max().unwrap() - counts.iter().min().unwrap(),
            1
        );
        let again = allocate(&a, &first, 3, EgressMode::Bind, &live(0..3));
        assert_eq!(first, again, "a second reconcile moves nothing");
    }

    #[test]
    fn scale_down_drains_before_moving() {
        let a = addrs(6);
        let at3 = allocate(&a, &BTreeMap::new(), 3, EgressMode::Bind, &live(0..3));
        // Scale to 2 while pod 2 still runs: its addresses drain and stay with it.
        let draining = allocate(&a, &at3, 2, EgressMode::Bind, &live(0..3));
        for (ip, p) in &draining {
            if at3[ip] == Placement::Assigned(2) {
                assert!(
                    matches!(p, Placement::Draining { from: 2, to: Some(t) } if *t < 2),
                    "{p:?}"
                );
            } else {
                assert_eq!(*p, at3[ip], "addresses of remaining pods stay put");
            }
        }
        // Pod 2 is gone: its addresses land on the targets chosen while draining.
        let settled = allocate(&a, &draining, 2, EgressMode::Bind, &live(0..2));
        for (ip, p) in &settled {
            if let Placement::Draining { to: Some(t), .. } = draining[ip] {
                assert_eq!(*p, Placement::Assigned(t));
            }
        }
        check_invariants(&settled, 2);
        assert!(
            settled
                .values()
                .all(|p| matches!(p, Placement::Assigned(_)))
        );
    }

    #[test]
    fn scale_up_rebalances_through_release() {
        let a = addrs(6);
        let at2 = allocate(&a, &BTreeMap::new(), 2, EgressMode::Bind, &live(0..2));
        let moving = allocate(&a, &at2, 3, EgressMode::Bind, &live(0..3));
        let moves: Vec<_> = moving
            .iter()
            .filter(|(_, p)| matches!(p, Placement::Draining { .. }))
            .collect();
        assert_eq!(
            moves.len(),
            2,
            "two addresses move towards the new pod: {moving:?}"
        );
        // Nothing moves until the old holders release.
        let still = allocate(&a, &moving, 3, EgressMode::Bind, &live(0..3));
        assert_eq!(still, moving);
        let released = PodFacts {
            live: (0..3).collect(),
            released: moves.iter().map(|(ip, _)| **ip).collect(),
        };
        let done = allocate(&a, &moving, 3, EgressMode::Bind, &released);
        let on_new = done
            .values()
            .filter(|p| **p == Placement::Assigned(2))
            .count();
        assert_eq!(on_new, 2);
    }

    #[test]
    fn cilium_mode_gives_one_address_per_pod() {
        let a = addrs(3);
        let p = allocate(
            &a,
            &BTreeMap::new(),
            2,
            EgressMode::CiliumEgressGateway,
            &live(0..2),
        );
        assert_eq!(
            p.values()
                .filter(|x| matches!(x, Placement::Assigned(_)))
                .count(),
            2
        );
        assert_eq!(
            p.values().filter(|x| **x == Placement::Unassigned).count(),
            1
        );
    }

    #[test]
    fn added_and_removed_addresses() {
        let a = addrs(4);
        let before = allocate(&a, &BTreeMap::new(), 2, EgressMode::Bind, &live(0..2));
        let fewer = &a[..3];
        let after = allocate(fewer, &before, 2, EgressMode::Bind, &live(0..2));
        assert_eq!(after.len(), 3, "removed address released");
        let more = addrs(5);
        let grown = allocate(&more, &after, 2, EgressMode::Bind, &live(0..2));
        for (ip, p) in &after {
            assert_eq!(grown[ip], *p, "existing addresses keep their pod");
        }
        assert!(matches!(grown[&more[4].ip], Placement::Assigned(_)));
    }

    #[test]
    fn never_two_holders_across_a_random_walk() {
        // Scale up and down in a fixed pseudo-random sequence, letting pods disappear one
        // step late, and check that each address always has at most one holder which is a
        // live pod.
        let a = addrs(9);
        let mut state = BTreeMap::new();
        let mut live_now: BTreeSet<u32> = BTreeSet::new();
        let mut seed = 7u32;
        for _ in 0..200 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let replicas = (seed >> 16) % 6;
            // Pods at or above `replicas` linger one step (terminating), then go.
            let facts = PodFacts {
                live: live_now.clone(),
                released: BTreeSet::new(),
            };
            let next = allocate(&a, &state, replicas, EgressMode::Bind, &facts);
            for p in next.values() {
                if let Some(h) = p.holder() {
                    let was_holder = state.values().any(|q: &Placement| q.holder() == Some(h));
                    assert!(
                        h < replicas || live_now.contains(&h) || !was_holder,
                        "{p:?}"
                    );
                }
            }
            // Every previously held address is either still with that holder or its holder died.
            for (ip, prev) in &state {
                if let (Some(old), Some(new)) =
                    (prev.holder(), next.get(ip).and_then(|p| p.holder()))
                {
                    assert!(
                        old == new || !live_now.contains(&old) || facts.released.contains(ip),
                        "{ip} moved from live pod {old} to {new} without release"
                    );
                }
            }
            state = next;
            live_now = (0..replicas).collect();
        }
    }
}
