//! Sources of desired state, gathered before the plan: Docker (bridges,
//! subnets, endpoints), the config (peers, static bridges) and the kernel
//! (endpoints of static bridges, interface facts). Peers may come from more
//! than one source; each names itself, and a subnet claimed by two of them
//! is a conflict naming both.

pub mod docker;
pub mod kernel;

use std::net::IpAddr;

use log::warn;

use crate::{
    config::{LocalSubnet, PeerConfig},
    docker::DockerView,
    net::{self, Ipv4Net, Ipv6Net},
    plan::{self, Local, Peers},
};

/// The name of the config file and flags as a source of peers.
pub const CONFIG: &str = "config";

/// One source's peers: the hosts and the subnets behind them.
#[derive(Clone, Copy, Debug)]
pub struct PeerSource<'a> {
    /// Named in conflicts ("config", "cluster store", ...).
    pub name: &'a str,
    pub peers: &'a [PeerConfig],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error(
        "subnet {a} of peer {peer_a} ({source_a}) overlaps subnet {b} of peer {peer_b} ({source_b})"
    )]
    Overlap {
        a: Ipv4Net,
        peer_a: IpAddr,
        source_a: String,
        b: Ipv4Net,
        peer_b: IpAddr,
        source_b: String,
    },
    #[error(
        "subnet {a} of peer {peer_a} ({source_a}) overlaps subnet {b} of peer {peer_b} ({source_b})"
    )]
    Overlap6 {
        a: Ipv6Net,
        peer_a: IpAddr,
        source_a: String,
        b: Ipv6Net,
        peer_b: IpAddr,
        source_b: String,
    },
    #[error("{count} peer subnets: the datapath's ROUTES map holds at most {max}")]
    TooManyRoutes { count: usize, max: usize },
    #[error("{count} IPv6 peer subnets: the datapath's ROUTES6 map holds at most {max}")]
    TooManyRoutes6 { count: usize, max: usize },
    #[error("{count} peers: the datapath's PEER_HOSTS map holds at most {max}")]
    TooManyPeers { count: usize, max: usize },
}

/// Every subnet of one family (`family` picks it from a peer) of every
/// source, with the peer host and the source that name it.
fn tagged<'a, N: Copy>(
    sources: &[PeerSource<'a>],
    family: fn(&PeerConfig) -> &[N],
) -> Vec<(N, (IpAddr, &'a str))> {
    sources
        .iter()
        .flat_map(|s| {
            s.peers
                .iter()
                .flat_map(move |p| family(p).iter().map(move |n| (*n, (p.host, s.name))))
        })
        .collect()
}

/// The desired peers of every source together: the union of their hosts,
/// each subnet routed to the host that claims it. Subnets must be disjoint
/// across all sources, and the whole must fit the datapath's maps.
pub fn peers(sources: &[PeerSource<'_>], limits: &plan::Limits) -> Result<Peers, PeerError> {
    // Subnets must be disjoint within a family across every source
    // (net::first_overlap, as config::check_peers does within one source).
    let all = tagged(sources, |p| &p.subnets);
    if let Some(((a, (peer_a, source_a)), (b, (peer_b, source_b)))) =
        net::first_overlap(all.clone())
    {
        return Err(PeerError::Overlap {
            a,
            peer_a,
            source_a: source_a.to_owned(),
            b,
            peer_b,
            source_b: source_b.to_owned(),
        });
    }
    let all6 = tagged(sources, |p| &p.subnets6);
    if let Some(((a, (peer_a, source_a)), (b, (peer_b, source_b)))) =
        net::first_overlap(all6.clone())
    {
        return Err(PeerError::Overlap6 {
            a,
            peer_a,
            source_a: source_a.to_owned(),
            b,
            peer_b,
            source_b: source_b.to_owned(),
        });
    }
    let mut out = Peers::default();
    for s in sources {
        out.hosts.extend(s.peers.iter().map(|p| p.host));
    }
    // IPv4 subnets have IPv4 hosts (config::check_peers; the store's
    // hosts are IPv4).
    out.routes = all
        .into_iter()
        .filter_map(|(n, (h, _))| match h {
            IpAddr::V4(h) => Some((n, h)),
            IpAddr::V6(_) => None,
        })
        .collect();
    out.routes6 = all6.into_iter().map(|(n, (h, _))| (n, h)).collect();
    if out.hosts.len() > limits.peer_hosts {
        return Err(PeerError::TooManyPeers {
            count: out.hosts.len(),
            max: limits.peer_hosts,
        });
    }
    if out.routes.len() > limits.routes {
        return Err(PeerError::TooManyRoutes {
            count: out.routes.len(),
            max: limits.routes,
        });
    }
    if out.routes6.len() > limits.routes6 {
        return Err(PeerError::TooManyRoutes6 {
            count: out.routes6.len(),
            max: limits.routes6,
        });
    }
    Ok(out)
}

/// This host's side as the static bridges alone say it (no endpoints yet).
pub fn static_bridges(static_locals: &[LocalSubnet], peers: &Peers) -> Local {
    let facts = kernel::facts(static_locals.iter().map(|l| l.bridge.as_str()), &[]);
    plan::local(static_locals, &[], &[], &[], peers, &facts)
}

/// This host's side from every source: the static bridges, Docker's view
/// (the last one it gave, if any), and the endpoints of the bridges Docker
/// does not manage from the kernel's tables.
pub fn local(static_locals: &[LocalSubnet], view: Option<&DockerView>, peers: &Peers) -> Local {
    let (nets, nets6, mut eps) = view.map(docker::specs).unwrap_or_default();
    let managed: Vec<&str> = nets.iter().map(|(b, _)| b.as_str()).collect();
    let mut statics: Vec<(String, Vec<Ipv4Net>)> = Vec::new();
    for l in static_locals
        .iter()
        .filter(|l| !managed.contains(&l.bridge.as_str()))
    {
        match statics.iter_mut().find(|(b, _)| *b == l.bridge) {
            Some((_, v)) => v.push(l.net),
            None => statics.push((l.bridge.clone(), vec![l.net])),
        }
    }
    match kernel::endpoints(&statics) {
        Ok(found) => eps.extend(found),
        Err(e) => warn!("reading neighbour/FDB tables: {e}"),
    }
    let bridges = static_locals
        .iter()
        .map(|l| l.bridge.as_str())
        .chain(nets.iter().map(|(b, _)| b.as_str()));
    let facts = kernel::facts(bridges, &eps);
    plan::local(static_locals, &nets, &nets6, &eps, peers, &facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> PeerConfig {
        s.parse().expect("valid peer")
    }

    #[test]
    fn peers_of_every_source_join() {
        let config = [peer("10.0.0.2=10.1.0.0/16")];
        let store = [
            peer("10.0.0.3=10.2.0.0/16,10.3.0.0/24"),
            peer("10.0.0.2=10.4.0.0/16"),
        ];
        let p = peers(
            &[
                PeerSource {
                    name: CONFIG,
                    peers: &config,
                },
                PeerSource {
                    name: "cluster store",
                    peers: &store,
                },
            ],
            &plan::Limits::DATAPATH,
        )
        .expect("disjoint");
        let mut all = config.to_vec();
        all.extend(store);
        assert_eq!(p, Peers::of(&all));
    }

    #[test]
    fn a_subnet_claimed_by_two_sources_names_both() {
        let config = [peer("10.0.0.2=10.1.0.0/16")];
        let store = [peer("10.0.0.3=9.0.0.0/8,10.1.2.0/24")];
        let sources = [
            PeerSource {
                name: CONFIG,
                peers: &config,
            },
            PeerSource {
                name: "cluster store",
                peers: &store,
            },
        ];
        let e = peers(&sources, &plan::Limits::DATAPATH).expect_err("overlap");
        assert_eq!(
            e.to_string(),
            "subnet 10.1.0.0/16 of peer 10.0.0.2 (config) overlaps subnet 10.1.2.0/24 of peer 10.0.0.3 (cluster store)"
        );
        // The same subnet from both, even for the same host, is a conflict too.
        let again = [peer("10.0.0.2=10.1.0.0/16")];
        let e = peers(
            &[
                sources[0],
                PeerSource {
                    name: "cluster store",
                    peers: &again,
                },
            ],
            &plan::Limits::DATAPATH,
        )
        .expect_err("same subnet");
        assert!(e.to_string().contains("(config) overlaps"), "{e}");
    }

    #[test]
    fn ipv6_subnets_join_and_conflict_within_their_family() {
        let config = [peer("10.0.0.2=10.1.0.0/16,fd00:1::/48")];
        let store = [peer("10.0.0.3=fd00:2::/48,10.2.0.0/16")];
        let sources = [
            PeerSource {
                name: CONFIG,
                peers: &config,
            },
            PeerSource {
                name: "cluster store",
                peers: &store,
            },
        ];
        let p = peers(&sources, &plan::Limits::DATAPATH).expect("disjoint");
        let routes6: Vec<String> = p.routes6.iter().map(|(n, h)| format!("{n} {h}")).collect();
        assert_eq!(routes6, ["fd00:1::/48 10.0.0.2", "fd00:2::/48 10.0.0.3"]);
        assert_eq!(p.routes.len(), 2);
        let clash = [peer("10.0.0.3=fd00:1:0:5::/64")];
        let e = peers(
            &[
                sources[0],
                PeerSource {
                    name: "cluster store",
                    peers: &clash,
                },
            ],
            &plan::Limits::DATAPATH,
        )
        .expect_err("overlap");
        assert_eq!(
            e.to_string(),
            "subnet fd00:1::/48 of peer 10.0.0.2 (config) overlaps subnet fd00:1:0:5::/64 of peer 10.0.0.3 (cluster store)"
        );
        let limits = plan::Limits {
            routes6: 1,
            ..plan::Limits::DATAPATH
        };
        assert_eq!(
            peers(&sources, &limits).expect_err("routes6"),
            PeerError::TooManyRoutes6 { count: 2, max: 1 }
        );
    }

    #[test]
    fn gathered_peers_must_fit_the_maps() {
        let a = [peer("10.0.0.2=10.1.0.0/16,10.2.0.0/16")];
        let b = [peer("10.0.0.3=10.3.0.0/16")];
        let sources = [
            PeerSource {
                name: CONFIG,
                peers: &a,
            },
            PeerSource {
                name: "cluster store",
                peers: &b,
            },
        ];
        let limits = |peer_hosts, routes| plan::Limits {
            peer_hosts,
            routes,
            routes6: 1,
            endpoints: 1,
        };
        assert!(peers(&sources, &limits(2, 3)).is_ok());
        assert_eq!(
            peers(&sources, &limits(2, 2)).expect_err("routes"),
            PeerError::TooManyRoutes { count: 3, max: 2 }
        );
        assert_eq!(
            peers(&sources, &limits(1, 3)).expect_err("hosts"),
            PeerError::TooManyPeers { count: 2, max: 1 }
        );
    }
}
