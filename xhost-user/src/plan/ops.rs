//! `plan`: the operations, in order, that move the applied state to the
//! desired one, with the ordering rules the datapath needs.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use xhost_common::Endpoint;

use super::{Peers, State};
use crate::net::{Ipv4Net, Ipv6Net};

/// One write to the datapath or the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `PEER_HOSTS` (`PEER_HOSTS6` for an IPv6 address): the host's
    /// traffic is counted, and its ICMP errors may reach containers.
    AddPeerHost(IpAddr),
    RemovePeerHost(IpAddr),
    /// `ROUTES`: a write replaces the entry in place.
    SetRoute {
        net: Ipv4Net,
        peer: Ipv4Addr,
    },
    RemoveRoute(Ipv4Net),
    /// The kernel's route of a peer subnet (for what the datapath hands the
    /// kernel: TTL expiry, fragmentation needed).
    AddKernelRoute {
        net: Ipv4Net,
        peer: Ipv4Addr,
    },
    RemoveKernelRoute(Ipv4Net),
    /// `ROUTES6`: an IPv6 peer subnet, behind the peer's underlay address
    /// (IPv4 or IPv6).
    SetRoute6 {
        net: Ipv6Net,
        peer: IpAddr,
    },
    RemoveRoute6(Ipv6Net),
    /// The kernel's IPv6 route of a peer subnet, towards the peer's
    /// address (for hop limit expiry and Packet Too Big).
    AddKernelRoute6 {
        net: Ipv6Net,
        peer: IpAddr,
    },
    RemoveKernelRoute6(Ipv6Net),
    /// `xhost_bridge_in` on a bridge's ingress.
    AttachBridge(String),
    DetachBridge(String),
    /// `LOCAL_NETS`.
    SetLocal {
        net: Ipv4Net,
        bridge: String,
        ifindex: u32,
    },
    RemoveLocal(Ipv4Net),
    /// `LOCAL_NETS6`.
    SetLocal6 {
        net: Ipv6Net,
        bridge: String,
        ifindex: u32,
    },
    RemoveLocal6(Ipv6Net),
    /// `xhost_veth_in` on a container's host-side veth.
    AttachPort {
        ifindex: u32,
        name: String,
    },
    DetachPort {
        ifindex: u32,
        name: String,
    },
    /// `ENDPOINTS`.
    SetEndpoint {
        ip: Ipv4Addr,
        ep: Endpoint,
    },
    RemoveEndpoint(Ipv4Addr),
    /// `ENDPOINTS6`. Written before the container's IPv4 endpoint (whose
    /// write arms the veth), removed after it (whose removal disarms it);
    /// it neither arms nor disarms.
    SetEndpoint6 {
        ip: Ipv6Addr,
        ep: Endpoint,
    },
    RemoveEndpoint6(Ipv6Addr),
    /// The bridges' ARP entries of endpoints just written (best effort).
    SetNeighbours(Vec<Neighbour>),
}

/// An endpoint whose MAC the bridge's ARP table should know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub bridge: String,
    pub bridge_ifindex: u32,
}

/// Capacities of the maps whose old and new entries may not fit together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub peer_hosts: usize,
    pub routes: usize,
    pub routes6: usize,
    /// `ENDPOINTS` (and `ENDPOINTS6`, `ENDPOINT_PORTS`): sized at load,
    /// `--max-endpoints`.
    pub endpoints: usize,
}

impl Limits {
    /// The datapath's maps at their default sizes.
    pub const DATAPATH: Self = Self {
        peer_hosts: xhost_common::MAX_PEER_HOSTS as usize,
        routes: xhost_common::MAX_ROUTES as usize,
        routes6: xhost_common::MAX_ROUTES6 as usize,
        endpoints: xhost_common::MAX_ENDPOINTS as usize,
    };

    /// The datapath's maps with `ENDPOINTS` holding `max`.
    pub fn with_endpoints(max: u32) -> Self {
        Self {
            endpoints: max as usize,
            ..Self::DATAPATH
        }
    }
}

/// The operations, in order, that take `applied` to `want`.
///
/// Peers first: new hosts, then routes (IPv4, then IPv6) added or moved to
/// another peer, then routes and hosts that are gone: a host is written
/// before any of its routes and removed after all of them. Adding first leaves no gap when a
/// prefix is split or merged (a /16 replaced by its /24s is still routed
/// while they are written). When the old and the new entries together
/// would not fit a map (`want` fits by itself: the sources checked it),
/// what is gone from it leaves first instead. A route moved to another
/// peer replaces its kernel route.
///
/// Then this host's side: new bridges are attached before their subnets
/// appear, so the first packet of a new network already takes the fast
/// path; then subnets, ports and endpoints (a container's IPv6 endpoints
/// before its IPv4 one, whose write arms its veth); the neighbour entries
/// of the endpoints just written; removals last, endpoints (IPv4 first,
/// which disarms the veth) before the subnets and bridges they sit on.
pub fn plan(want: &State, applied: &State, limits: &Limits) -> Vec<Op> {
    let mut p = Planner {
        sim: State {
            peers: Peers::default(),
            local: applied.local.clone(),
        },
        ops: Vec::new(),
    };
    // Most steps change only this host's side: the peers (up to the
    // datapath's MAX_ROUTES) are simulated only when they differ.
    if want.peers != applied.peers {
        p.sim.peers = applied.peers.clone();
        p.peers(&want.peers, limits);
    }
    p.local(want, limits);
    p.ops
}

/// What the planner does alike for the routes of either address family.
trait RouteFamily {
    type Net: Ord + Copy;
    /// How a peer host is named in this family's routes.
    type Host: Eq + Copy;
    fn routes(peers: &Peers) -> &BTreeMap<Self::Net, Self::Host>;
    fn limit(limits: &Limits) -> usize;
    fn set_route(net: Self::Net, peer: Self::Host) -> Op;
    fn remove_route(net: Self::Net) -> Op;
    fn add_kernel_route(net: Self::Net, peer: Self::Host) -> Op;
    fn remove_kernel_route(net: Self::Net) -> Op;
}

/// `ROUTES` and the kernel's IPv4 routes.
struct V4;
/// `ROUTES6` and the kernel's IPv6 routes.
struct V6;

macro_rules! route_family {
    ($f:ty, $net:ty, $host:ty, $routes:ident, $limit:ident, $set:ident, $remove:ident, $add_k:ident, $remove_k:ident) => {
        impl RouteFamily for $f {
            type Net = $net;
            type Host = $host;
            fn routes(peers: &Peers) -> &BTreeMap<$net, $host> {
                &peers.$routes
            }
            fn limit(limits: &Limits) -> usize {
                limits.$limit
            }
            fn set_route(net: $net, peer: $host) -> Op {
                Op::$set { net, peer }
            }
            fn remove_route(net: $net) -> Op {
                Op::$remove(net)
            }
            fn add_kernel_route(net: $net, peer: $host) -> Op {
                Op::$add_k { net, peer }
            }
            fn remove_kernel_route(net: $net) -> Op {
                Op::$remove_k(net)
            }
        }
    };
}

route_family!(
    V4,
    Ipv4Net,
    Ipv4Addr,
    routes,
    routes,
    SetRoute,
    RemoveRoute,
    AddKernelRoute,
    RemoveKernelRoute
);
route_family!(
    V6,
    Ipv6Net,
    IpAddr,
    routes6,
    routes6,
    SetRoute6,
    RemoveRoute6,
    AddKernelRoute6,
    RemoveKernelRoute6
);

/// Builds the list while keeping a simulated applied state, so each rule
/// sees what the operations before it did.
struct Planner {
    sim: State,
    ops: Vec<Op>,
}

impl Planner {
    fn push(&mut self, op: Op) {
        self.sim.record(&op);
        self.ops.push(op);
    }

    fn peers(&mut self, want: &Peers, limits: &Limits) {
        let new_hosts = want.hosts.difference(&self.sim.peers.hosts).count();
        if self.sim.peers.hosts.len() + new_hosts > limits.peer_hosts {
            self.remove_gone_routes::<V4>(want);
            self.remove_gone_routes::<V6>(want);
            self.remove_gone_hosts(want);
        }
        for h in want.hosts.difference(&self.sim.peers.hosts.clone()) {
            self.push(Op::AddPeerHost(*h));
        }
        self.routes::<V4>(want, limits);
        self.routes::<V6>(want, limits);
        self.remove_gone_routes::<V4>(want);
        self.remove_gone_routes::<V6>(want);
        self.remove_gone_hosts(want);
    }

    /// One family's routes added or moved to another peer; when the old
    /// and the new together would not fit its map, what is gone leaves first.
    fn routes<F: RouteFamily>(&mut self, want: &Peers, limits: &Limits) {
        let (applied, wanted) = (F::routes(&self.sim.peers), F::routes(want));
        let new_routes = wanted.keys().filter(|n| !applied.contains_key(n)).count();
        if applied.len() + new_routes > F::limit(limits) {
            self.remove_gone_routes::<F>(want);
        }
        for (net, peer) in F::routes(want) {
            match F::routes(&self.sim.peers).get(net) {
                Some(old) if old == peer => continue,
                // The kernel route still goes via the old peer.
                Some(_) => self.push(F::remove_kernel_route(*net)),
                None => {}
            }
            self.push(F::set_route(*net, *peer));
            self.push(F::add_kernel_route(*net, *peer));
        }
    }

    fn remove_gone_routes<F: RouteFamily>(&mut self, want: &Peers) {
        for net in gone(F::routes(&self.sim.peers), F::routes(want)) {
            self.push(F::remove_route(net));
            // Kernel routes are the writer's to track: it may leave one
            // out (an operator's route is there already).
            self.push(F::remove_kernel_route(net));
        }
    }

    /// Endpoints that are gone, then their ports: detach (and unpin) the
    /// program of each.
    fn remove_gone_endpoints(&mut self, want: &super::Local) {
        for ip in gone(&self.sim.local.endpoints, &want.endpoints) {
            self.push(Op::RemoveEndpoint(ip));
        }
        for ip in gone(&self.sim.local.endpoints6, &want.endpoints6) {
            self.push(Op::RemoveEndpoint6(ip));
        }
        for ifindex in gone(&self.sim.local.ports, &want.ports) {
            let name = self.sim.local.ports[&ifindex].clone();
            self.push(Op::DetachPort { ifindex, name });
        }
    }

    fn remove_gone_hosts(&mut self, want: &Peers) {
        let hosts: Vec<_> = self
            .sim
            .peers
            .hosts
            .difference(&want.hosts)
            .copied()
            .collect();
        for h in hosts {
            self.push(Op::RemovePeerHost(h));
        }
    }

    fn local(&mut self, want: &State, limits: &Limits) {
        let want = &want.local;
        // Containers that left make room for those that came, when both
        // together would not fit ENDPOINTS (or ENDPOINT_PORTS).
        let new_endpoints = want
            .endpoints
            .keys()
            .filter(|ip| !self.sim.local.endpoints.contains_key(ip))
            .count();
        let new_ports = want
            .ports
            .keys()
            .filter(|i| !self.sim.local.ports.contains_key(i))
            .count();
        let new_endpoints6 = want
            .endpoints6
            .keys()
            .filter(|ip| !self.sim.local.endpoints6.contains_key(ip))
            .count();
        if self.sim.local.endpoints.len() + new_endpoints > limits.endpoints
            || self.sim.local.endpoints6.len() + new_endpoints6 > limits.endpoints
            || self.sim.local.ports.len() + new_ports > limits.endpoints
        {
            self.remove_gone_endpoints(want);
        }
        for b in want.bridges.difference(&self.sim.local.bridges.clone()) {
            self.push(Op::AttachBridge(b.clone()));
        }
        for (net, (bridge, ifindex)) in &want.locals {
            if self.sim.local.locals.get(net) != Some(&(bridge.clone(), *ifindex)) {
                self.push(Op::SetLocal {
                    net: *net,
                    bridge: bridge.clone(),
                    ifindex: *ifindex,
                });
            }
        }
        for (net, (bridge, ifindex)) in &want.locals6 {
            if self.sim.local.locals6.get(net) != Some(&(bridge.clone(), *ifindex)) {
                self.push(Op::SetLocal6 {
                    net: *net,
                    bridge: bridge.clone(),
                    ifindex: *ifindex,
                });
            }
        }
        for (ifindex, name) in &want.ports {
            match self.sim.local.ports.get(ifindex) {
                Some(old) if old == name => continue,
                // The ifindex now names another veth: the old attachment is stale.
                Some(old) => {
                    let old = old.clone();
                    self.push(Op::DetachPort {
                        ifindex: *ifindex,
                        name: old,
                    });
                }
                None => {}
            }
            self.push(Op::AttachPort {
                ifindex: *ifindex,
                name: name.clone(),
            });
        }
        for (ip, ep) in &want.endpoints6 {
            if self.sim.local.endpoints6.get(ip) != Some(ep) {
                self.push(Op::SetEndpoint6 { ip: *ip, ep: *ep });
            }
        }
        let mut written = Vec::new();
        for (ip, ep) in &want.endpoints {
            if self.sim.local.endpoints.get(ip) != Some(ep) {
                self.push(Op::SetEndpoint { ip: *ip, ep: *ep });
                // The subnet serving it names the bridge whose ARP table
                // should know it.
                if let Some((bridge, index)) = want
                    .locals
                    .iter()
                    .find(|(n, _)| n.contains(*ip))
                    .map(|(_, v)| v)
                {
                    written.push(super::Neighbour {
                        ip: *ip,
                        mac: ep.mac,
                        bridge: bridge.clone(),
                        bridge_ifindex: *index,
                    });
                }
            }
        }
        if !written.is_empty() {
            self.push(Op::SetNeighbours(written));
        }
        self.remove_gone_endpoints(want);
        for net in gone(&self.sim.local.locals, &want.locals) {
            self.push(Op::RemoveLocal(net));
        }
        for net in gone(&self.sim.local.locals6, &want.locals6) {
            self.push(Op::RemoveLocal6(net));
        }
        let bridges: Vec<_> = self
            .sim
            .local
            .bridges
            .difference(&want.bridges)
            .cloned()
            .collect();
        for b in bridges {
            self.push(Op::DetachBridge(b));
        }
    }
}

/// Keys of `applied` that `want` no longer has (collected: the planner
/// removes them from its simulated state as it goes).
fn gone<K: Ord + Copy, A, W>(applied: &BTreeMap<K, A>, want: &BTreeMap<K, W>) -> Vec<K> {
    applied
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect()
}
