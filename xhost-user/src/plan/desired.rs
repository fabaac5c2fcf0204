//! This host's desired side, built from what the sources gathered: the
//! bridges and their subnets (static and Docker's), the endpoints, and the
//! kernel's facts about those interfaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use log::warn;
use xhost_common::Endpoint;

use super::{Local, Peers};
use crate::{
    config::LocalSubnet,
    net::{Ipv4Net, Ipv6Net},
};

/// A container endpoint as a source (Docker, or the bridge's neighbour and
/// FDB tables) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub ip: Ipv4Addr,
    /// The container's IPv6 address on the same interface (Docker's
    /// `GlobalIPv6Address`), if its network has IPv6.
    pub ip6: Option<Ipv6Addr>,
    pub mac: [u8; 6],
    pub host_ifindex: u32,
    pub bridge: String,
}

/// What the kernel said about the interfaces the sources named.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelFacts {
    /// The bridges that exist, by name.
    pub bridges: BTreeMap<String, BridgeFacts>,
    /// Names of the endpoints' host-side veths that exist, by ifindex.
    pub ports: BTreeMap<u32, String>,
}

/// A bridge that exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeFacts {
    pub ifindex: u32,
    /// Its MAC (the endpoints' gateway MAC), or why it could not be read;
    /// `None` when no endpoint needed it.
    pub mac: Option<Result<[u8; 6], String>>,
}

/// The local side the datapath should hold. Static bridges come first, then
/// Docker's; a bridge that does not exist (yet) is skipped, and so is a
/// subnet that would break the peer routing (overlapping a peer's): the
/// agent cannot refuse Docker's state, but must not mis-route. Endpoints
/// count only on a subnet served by their bridge, with a veth that exists.
/// A bridge's IPv6 subnets (`docker_networks6`) are served next to its IPv4
/// ones (a bridge without a served IPv4 subnet serves no IPv6 either), and
/// an endpoint's IPv6 address counts where its IPv4 one does and a served
/// IPv6 subnet of its bridge holds it.
pub fn local(
    static_locals: &[LocalSubnet],
    docker_networks: &[(String, Vec<Ipv4Net>)],
    docker_networks6: &[(String, Vec<Ipv6Net>)],
    endpoints: &[EndpointSpec],
    peers: &Peers,
    facts: &KernelFacts,
) -> Local {
    let mut d = Local::default();
    let mut add_bridge = |bridge: &str, nets: &[Ipv4Net]| {
        let Some(b) = facts.bridges.get(bridge) else {
            warn!("bridge {bridge} does not exist (yet); skipping");
            return;
        };
        let mut any = false;
        for n in nets {
            let local = LocalSubnet {
                net: *n,
                bridge: bridge.to_owned(),
            };
            if let Err(e) = peers.check_local(&local) {
                warn!("not serving {n} on {bridge}: {e}");
                continue;
            }
            d.locals.insert(*n, (bridge.to_owned(), b.ifindex));
            any = true;
        }
        if any {
            d.bridges.insert(bridge.to_owned());
        }
    };
    for l in static_locals {
        add_bridge(&l.bridge, std::slice::from_ref(&l.net));
    }
    for (bridge, nets) in docker_networks {
        add_bridge(bridge, nets);
    }
    for (bridge, nets) in docker_networks6 {
        let Some(b) = facts.bridges.get(bridge) else {
            continue;
        };
        if !d.bridges.contains(bridge) {
            continue;
        }
        for n in nets {
            if let Err(why) = peers.check_local6(n) {
                warn!("not serving {n} on {bridge}: {why}");
                continue;
            }
            d.locals6.insert(*n, (bridge.clone(), b.ifindex));
        }
    }
    for e in endpoints {
        let served = d
            .locals
            .iter()
            .any(|(n, (b, _))| *b == e.bridge && n.contains(e.ip));
        if !served {
            continue;
        }
        let gw_mac = match facts.bridges.get(&e.bridge).and_then(|b| b.mac.as_ref()) {
            Some(Ok(m)) => *m,
            Some(Err(err)) => {
                warn!("endpoint {}: {err}", e.ip);
                continue;
            }
            None => {
                warn!("endpoint {}: the MAC of {} is not known", e.ip, e.bridge);
                continue;
            }
        };
        let Some(port) = facts.ports.get(&e.host_ifindex) else {
            warn!(
                "endpoint {}: veth ifindex {} does not exist",
                e.ip, e.host_ifindex
            );
            continue;
        };
        d.ports.insert(e.host_ifindex, port.clone());
        let ep = Endpoint {
            ifindex: e.host_ifindex,
            flags: 0,
            mac: e.mac,
            gw_mac,
            _pad: [0; 4],
        };
        d.endpoints.insert(e.ip, ep);
        if let Some(ip6) = e.ip6 {
            let served6 = d
                .locals6
                .iter()
                .any(|(n, (b, _))| *b == e.bridge && n.contains(ip6));
            if served6 {
                d.endpoints6.insert(ip6, ep);
            }
        }
    }
    d
}

/// Takes out of `want` the endpoints that would not fit a map of `max`
/// endpoints and returns them, in address order. Those the map holds
/// already stay; new ones get the free slots in address order, so a refused
/// one waits until one leaves. A refused endpoint is refused whole: its
/// veth's program is not attached either (unless an admitted endpoint sits
/// behind the same veth).
pub fn admit(want: &mut Local, applied: &Local, max: usize) -> Vec<Ipv4Addr> {
    if want.endpoints.len() <= max {
        return Vec::new();
    }
    let (held, new): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = want
        .endpoints
        .keys()
        .partition(|ip| applied.endpoints.contains_key(ip));
    let mut refused: Vec<Ipv4Addr> = held.into_iter().chain(new).skip(max).collect();
    refused.sort();
    for ip in &refused {
        if let Some(ep) = want.endpoints.remove(ip) {
            // Its IPv6 addresses go with it (same veth).
            want.endpoints6.retain(|_, e| e.ifindex != ep.ifindex);
        }
    }
    let used: BTreeSet<u32> = want.endpoints.values().map(|e| e.ifindex).collect();
    want.ports.retain(|ifindex, _| used.contains(ifindex));
    refused
}
