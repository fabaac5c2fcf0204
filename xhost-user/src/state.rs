//! The agent's desired/applied state and the diff that turns one into the
//! other. Only the single writer task calls `apply`, so map writes never
//! race, and they are incremental: each entry is added, changed or removed
//! on its own, never clear-and-refill.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use log::{info, warn};
use xhost_common::Endpoint;

use crate::{
    config::{LocalSubnet, PeerConfig, check_local},
    datapath::{Datapath, DatapathError},
    net::{self, Ipv4Net, fmt_mac},
    netlink::{NUD_ADMIN, NUD_USABLE, Neigh, Rtnl},
    tunnel::RouteDevice,
};

/// What the datapath should hold for this host's own side.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Bridges to attach, by name.
    pub bridges: BTreeSet<String>,
    /// Local container subnets -> serving bridge ifindex.
    pub locals: BTreeMap<Ipv4Net, (String, u32)>,
    /// Local container IP -> endpoint.
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// Host-side veths of the endpoints (ifindex -> name), where
    /// `xhost_from_ctr` attaches.
    pub ports: BTreeMap<u32, String>,
}

/// A container endpoint as a source of truth (Docker, or the bridge's
/// neighbour and FDB tables) reports it.
#[derive(Clone, Debug)]
pub struct EndpointSpec {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub host_ifindex: u32,
    pub bridge: String,
}

/// Builds the desired state from static bridges (flags/config), what
/// Docker reports, and the endpoints found on either. Entries that would break the peer routing (a Docker
/// subnet overlapping a peer's) are left out with a warning: the agent
/// cannot refuse Docker's state, but must not mis-route.
pub fn desired(
    static_locals: &[LocalSubnet],
    docker_networks: &[(String, Vec<Ipv4Net>)],
    endpoints: &[EndpointSpec],
    peers: &[PeerConfig],
) -> Desired {
    let mut d = Desired::default();
    let add_bridge = |d: &mut Desired, bridge: &str, nets: &[Ipv4Net]| {
        let Ok(ifindex) = net::ifindex(bridge) else {
            warn!("bridge {bridge} does not exist (yet); skipping");
            return;
        };
        let mut any = false;
        for n in nets {
            let local = LocalSubnet {
                net: *n,
                bridge: bridge.to_owned(),
            };
            if let Err(e) = check_local(&local, peers) {
                warn!("not serving {n} on {bridge}: {e}");
                continue;
            }
            d.locals.insert(*n, (bridge.to_owned(), ifindex));
            any = true;
        }
        if any {
            d.bridges.insert(bridge.to_owned());
        }
    };
    for l in static_locals {
        add_bridge(&mut d, &l.bridge, std::slice::from_ref(&l.net));
    }
    for (bridge, nets) in docker_networks {
        add_bridge(&mut d, bridge, nets);
    }
    let mut gw_macs = BTreeMap::new();
    for e in endpoints {
        let served = d
            .locals
            .iter()
            .any(|(n, (b, _))| *b == e.bridge && n.contains(e.ip));
        if !served {
            continue;
        }
        let gw_mac = match gw_macs.get(&e.bridge) {
            Some(m) => *m,
            None => match net::mac_of(&e.bridge) {
                Ok(m) => *gw_macs.entry(e.bridge.clone()).or_insert(m),
                Err(err) => {
                    warn!("endpoint {}: {err}", e.ip);
                    continue;
                }
            },
        };
        let Some(port) = ifname(e.host_ifindex) else {
            warn!(
                "endpoint {}: veth ifindex {} does not exist",
                e.ip, e.host_ifindex
            );
            continue;
        };
        d.ports.insert(e.host_ifindex, port);
        d.endpoints.insert(
            e.ip,
            Endpoint {
                ifindex: e.host_ifindex,
                flags: 0,
                mac: e.mac,
                gw_mac,
                _pad: [0; 4],
            },
        );
    }
    d
}

/// Moves the datapath from `applied` to `want`, logging each change.
/// On error `applied` reflects exactly what was done so far.
pub fn apply(
    dp: &mut Datapath,
    applied: &mut Desired,
    want: &Desired,
) -> Result<(), DatapathError> {
    // Attach new bridges before their subnets appear, so the first packet
    // of a new network already takes the fast path.
    for b in want.bridges.difference(&applied.bridges.clone()) {
        dp.attach_bridge(b)?;
        applied.bridges.insert(b.clone());
        info!("bridge {b}: following");
    }
    for (n, v) in &want.locals {
        if applied.locals.get(n) != Some(v) {
            dp.set_local(n, v.1)?;
            applied.locals.insert(*n, v.clone());
            info!("local subnet {n} on {}: added", v.0);
        }
    }
    for (index, name) in &want.ports {
        match applied.ports.get(index) {
            Some(old) if old == name => continue,
            // The ifindex now names another veth: the old attachment is stale.
            Some(old) => dp.detach_port(old),
            None => {}
        }
        dp.attach_port(name)?;
        applied.ports.insert(*index, name.clone());
    }
    let mut written = Vec::new();
    for (ip, ep) in &want.endpoints {
        if applied.endpoints.get(ip) != Some(ep) {
            dp.set_endpoint(*ip, *ep)?;
            applied.endpoints.insert(*ip, *ep);
            info!(
                "endpoint {ip}: mac {} via ifindex {}",
                fmt_mac(&ep.mac),
                ep.ifindex
            );
            written.push((*ip, ep.mac));
        }
    }
    if !written.is_empty() {
        settle_neighbours(&want.locals, &written);
    }
    // Removals last, endpoints before the subnets and bridges they sit on.
    for ip in gone(&applied.endpoints, &want.endpoints) {
        dp.remove_endpoint(ip)?;
        applied.endpoints.remove(&ip);
        info!("endpoint {ip}: removed");
    }
    // Ports of containers that are gone: detach (and unpin) their program.
    for index in gone(&applied.ports, &want.ports) {
        if let Some(name) = applied.ports.remove(&index) {
            dp.detach_port(&name);
        }
    }
    for n in gone(&applied.locals, &want.locals) {
        dp.remove_local(&n)?;
        applied.locals.remove(&n);
        info!("local subnet {n}: removed");
    }
    let bridges: Vec<_> = applied.bridges.difference(&want.bridges).cloned().collect();
    for b in bridges {
        dp.detach_bridge(&b);
        applied.bridges.remove(&b);
        info!("bridge {b}: no longer followed");
    }
    Ok(())
}

/// Keys of `applied` that `want` no longer has (collected: the caller
/// removes them from `applied` as it goes).
fn gone<K: Ord + Copy, A, W>(applied: &BTreeMap<K, A>, want: &BTreeMap<K, W>) -> Vec<K> {
    applied
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect()
}

/// The peer side of the datapath: peer hosts (`PEER_HOSTS`) and their
/// subnets (`ROUTES`, and a kernel route each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peers {
    pub hosts: BTreeSet<Ipv4Addr>,
    pub routes: BTreeMap<Ipv4Net, Ipv4Addr>,
}

impl Peers {
    /// From checked peer settings (disjoint subnets, unique hosts).
    pub fn of(peers: &[PeerConfig]) -> Self {
        Self {
            hosts: peers.iter().map(|p| p.host).collect(),
            routes: peers
                .iter()
                .flat_map(|p| p.subnets.iter().map(|n| (*n, p.host)))
                .collect(),
        }
    }
}

/// Moves the peer side from `applied` to `want`, as [`apply`] does for the
/// local side: new hosts first, then routes added or moved to another peer
/// (a `ROUTES` write replaces the entry in place), then routes and hosts
/// that are gone. Adding first leaves no gap when a prefix is split or
/// merged (a /16 replaced by its /24s is still routed while they are
/// written). When the old and the new entries together would not fit a map
/// (`want` fits by itself: the config was checked), what is gone from it
/// leaves first instead. On error `applied` reflects exactly what was done.
pub fn apply_peers(
    dp: &mut Datapath,
    applied: &mut Peers,
    want: &Peers,
    route_dev: RouteDevice,
) -> Result<(), DatapathError> {
    let new_hosts = want.hosts.difference(&applied.hosts).count();
    if applied.hosts.len() + new_hosts > xhost_common::MAX_PEER_HOSTS as usize {
        remove_gone_routes(dp, applied, want)?;
        remove_gone_hosts(dp, applied, want)?;
    }
    for h in want.hosts.difference(&applied.hosts.clone()) {
        dp.add_peer_host(*h)?;
        applied.hosts.insert(*h);
    }
    let new_routes = want
        .routes
        .keys()
        .filter(|n| !applied.routes.contains_key(n))
        .count();
    if applied.routes.len() + new_routes > xhost_common::MAX_ROUTES as usize {
        remove_gone_routes(dp, applied, want)?;
    }
    for (n, h) in &want.routes {
        match applied.routes.get(n) {
            Some(old) if old == h => continue,
            // The kernel route still goes via the old peer.
            Some(_) => dp.remove_kernel_route(n),
            None => {}
        }
        dp.set_route(n, *h)?;
        applied.routes.insert(*n, *h);
        dp.add_kernel_route(n, *h, route_dev)?;
        info!("route {n} via peer {h}: set");
    }
    remove_gone_routes(dp, applied, want)?;
    remove_gone_hosts(dp, applied, want)
}

fn remove_gone_routes(
    dp: &mut Datapath,
    applied: &mut Peers,
    want: &Peers,
) -> Result<(), DatapathError> {
    for n in gone(&applied.routes, &want.routes) {
        dp.remove_route(&n)?;
        applied.routes.remove(&n);
        dp.remove_kernel_route(&n);
        info!("route {n}: removed");
    }
    Ok(())
}

fn remove_gone_hosts(
    dp: &mut Datapath,
    applied: &mut Peers,
    want: &Peers,
) -> Result<(), DatapathError> {
    let hosts: Vec<_> = applied.hosts.difference(&want.hosts).copied().collect();
    for h in hosts {
        dp.remove_peer_host(h)?;
        applied.hosts.remove(&h);
        info!("peer {h}: removed");
    }
    Ok(())
}

/// What a bridge's ARP table needs for an endpoint whose MAC is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NeighbourFix {
    /// A usable entry with that MAC is there.
    Keep,
    /// Missing, unresolved (INCOMPLETE, FAILED) or another MAC: write it.
    Write,
    /// An administrator's static entry (PERMANENT, NOARP) says otherwise.
    LeaveAdmin,
}

fn neighbour_fix(existing: Option<&Neigh>, mac: [u8; 6]) -> NeighbourFix {
    match existing {
        Some(n) if n.state & NUD_USABLE != 0 && n.lladdr == Some(mac) => NeighbourFix::Keep,
        Some(n) if n.state & NUD_ADMIN != 0 => NeighbourFix::LeaveAdmin,
        _ => NeighbourFix::Write,
    }
}

/// Tells each bridge's ARP table the MAC of the endpoints just written.
/// Until the agent knows an endpoint, the datapath hands packets for it to
/// the kernel (`bpf_redirect_neigh`), and after a container (re)starts they
/// wait on an unresolved entry until the next ARP probe is answered, up to a
/// second; the written entry sends them at once. Best effort: the datapath
/// itself does not use these entries.
fn settle_neighbours(locals: &BTreeMap<Ipv4Net, (String, u32)>, written: &[(Ipv4Addr, [u8; 6])]) {
    let mut rtnl = match Rtnl::open() {
        Ok(r) => r,
        Err(e) => {
            warn!("neighbour entries of new endpoints: {e}");
            return;
        }
    };
    let mut tables: BTreeMap<u32, Vec<Neigh>> = BTreeMap::new();
    for (ip, mac) in written {
        let Some((bridge, index)) = locals.iter().find(|(n, _)| n.contains(*ip)).map(|(_, v)| v)
        else {
            continue;
        };
        if !tables.contains_key(index) {
            match rtnl.ipv4_neighbours(*index) {
                Ok(t) => tables.insert(*index, t),
                Err(e) => {
                    warn!("endpoint {ip}: reading the neighbours of {bridge}: {e}");
                    continue;
                }
            };
        }
        let existing = tables
            .get(index)
            .and_then(|t| t.iter().find(|n| n.dst == Some(*ip)));
        match neighbour_fix(existing, *mac) {
            NeighbourFix::Keep => {}
            NeighbourFix::LeaveAdmin => warn!(
                "endpoint {ip}: {bridge} has a static neighbour entry with another MAC; left as it is"
            ),
            NeighbourFix::Write => match rtnl.set_neighbour(*index, *ip, *mac) {
                Ok(()) => info!(
                    "endpoint {ip}: neighbour on {bridge} set to {}",
                    fmt_mac(mac)
                ),
                Err(e) => warn!("endpoint {ip}: writing its neighbour entry on {bridge}: {e}"),
            },
        }
    }
}

/// Name of the interface with `index` in this netns.
fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Endpoints on bridges Docker does not manage, from the kernel: the
/// bridge's IPv4 neighbours (IP -> MAC, learned when a container ARPs for
/// its gateway) joined with its learned FDB (MAC -> port). Only veth ports
/// qualify: `bpf_redirect_peer` delivers into a veth's peer.
pub fn kernel_endpoints(bridges: &[(String, Vec<Ipv4Net>)]) -> std::io::Result<Vec<EndpointSpec>> {
    if bridges.is_empty() {
        return Ok(Vec::new());
    }
    let mut rtnl = Rtnl::open()?;
    let links = rtnl.links()?;
    let mut out = Vec::new();
    for (bridge, nets) in bridges {
        let Some(br) = links.iter().find(|l| l.name == *bridge) else {
            continue;
        };
        let fdb = rtnl.fdb_learned(br.index)?;
        for n in rtnl.ipv4_neighbours(br.index)? {
            let (Some(ip), Some(mac)) = (n.dst, n.lladdr) else {
                continue;
            };
            if n.state & NUD_USABLE == 0 || !nets.iter().any(|net| net.contains(ip)) {
                continue;
            }
            let Some(port) = fdb
                .iter()
                .find(|f| f.lladdr == Some(mac))
                .map(|f| f.ifindex)
            else {
                continue;
            };
            let is_veth = links
                .iter()
                .any(|l| l.index == port && l.kind.as_deref() == Some("veth"));
            if is_veth {
                out.push(EndpointSpec {
                    ip,
                    mac,
                    host_ifindex: port,
                    bridge: bridge.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// Docker's view as the inputs of `desired`: (bridge, subnets) per network,
/// and each endpoint with the bridge of its network.
pub fn docker_specs(
    v: &crate::docker::DockerView,
) -> (Vec<(String, Vec<Ipv4Net>)>, Vec<EndpointSpec>) {
    let nets = v
        .networks
        .values()
        .map(|n| (n.bridge.clone(), n.subnets.clone()))
        .collect();
    let eps = v
        .endpoints
        .values()
        .filter_map(|e| {
            let bridge = v.networks.get(&e.network_id)?.bridge.clone();
            Some(EndpointSpec {
                ip: e.ip,
                mac: e.mac,
                host_ifindex: e.host_ifindex,
                bridge,
            })
        })
        .collect();
    (nets, eps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbour_entries_are_written_unless_usable_or_static() {
        let mac = [2, 0x42, 192, 168, 110, 7];
        let other = [2, 0x42, 192, 168, 110, 8];
        let entry = |state: u16, lladdr: Option<[u8; 6]>| Neigh {
            ifindex: 3,
            state,
            dst: Some(Ipv4Addr::new(192, 168, 110, 7)),
            lladdr,
            ..Neigh::default()
        };
        let fix = |n: Option<Neigh>| neighbour_fix(n.as_ref(), mac);
        assert_eq!(fix(None), NeighbourFix::Write, "missing");
        assert_eq!(
            fix(Some(entry(0x01, None))),
            NeighbourFix::Write,
            "INCOMPLETE"
        );
        assert_eq!(
            fix(Some(entry(0x20, Some(mac)))),
            NeighbourFix::Write,
            "FAILED"
        );
        for usable in [0x02, 0x04, 0x08, 0x10, 0x80] {
            assert_eq!(
                fix(Some(entry(usable, Some(mac)))),
                NeighbourFix::Keep,
                "{usable:#x}"
            );
        }
        assert_eq!(
            fix(Some(entry(0x04, Some(other)))),
            NeighbourFix::Write,
            "a STALE entry of the address's previous owner"
        );
        assert_eq!(
            fix(Some(entry(0x80, Some(other)))),
            NeighbourFix::LeaveAdmin,
            "PERMANENT"
        );
        assert_eq!(
            fix(Some(entry(0x40, None))),
            NeighbourFix::LeaveAdmin,
            "NOARP"
        );
    }
}
