//! The agent's pure step: what the datapath should hold ([`State`]), the
//! operations that take it there from what it holds ([`plan`]), and their
//! execution through a [`Writer`]. Nothing in here touches the kernel: the
//! sources gather the facts before, the writer carries the operations out
//! after, so the ordering rules are unit-tested without root.

mod desired;
mod exec;
mod ops;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub use desired::{BridgeFacts, EndpointSpec, KernelFacts, admit, local};
pub use exec::{Writer, execute};
pub use ops::{Limits, Neighbour, Op, plan};
use xhost_common::Endpoint;

use crate::{
    config::{ConfigError, LocalSubnet, PeerConfig},
    net::{Ipv4Net, Ipv6Net},
};

/// Everything the agent writes: the peer side and this host's own side.
/// The desired state and the applied one are both a `State`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub peers: Peers,
    pub local: Local,
}

/// This host's own side of the datapath.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// Bridges to attach, by name.
    pub bridges: BTreeSet<String>,
    /// Local container subnets -> serving bridge (name, ifindex).
    pub locals: BTreeMap<Ipv4Net, (String, u32)>,
    /// Local container IP -> endpoint.
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// Local IPv6 container subnets -> serving bridge (`LOCAL_NETS6`).
    pub locals6: BTreeMap<Ipv6Net, (String, u32)>,
    /// Local container IPv6 address -> endpoint (`ENDPOINTS6`): the same
    /// veth and MACs as the container's IPv4 endpoint.
    pub endpoints6: BTreeMap<Ipv6Addr, Endpoint>,
    /// Host-side veths of the endpoints (ifindex -> name), where
    /// `xhost_veth_in` attaches.
    pub ports: BTreeMap<u32, String>,
}

impl Local {
    /// `self`, plus whatever of `held` it says nothing about: after an
    /// adoption, what the datapath holds of this host's side stays until
    /// the source that knows it (Docker) has spoken.
    pub fn keeping(mut self, held: &Local) -> Local {
        self.bridges.extend(held.bridges.iter().cloned());
        for (net, bridge) in &held.locals {
            self.locals.entry(*net).or_insert_with(|| bridge.clone());
        }
        for (ip, ep) in &held.endpoints {
            self.endpoints.entry(*ip).or_insert(*ep);
        }
        for (net, bridge) in &held.locals6 {
            self.locals6.entry(*net).or_insert_with(|| bridge.clone());
        }
        for (ip, ep) in &held.endpoints6 {
            self.endpoints6.entry(*ip).or_insert(*ep);
        }
        for (ifindex, name) in &held.ports {
            self.ports.entry(*ifindex).or_insert_with(|| name.clone());
        }
        self
    }
}

/// The peer side of the datapath: peer hosts (`PEER_HOSTS`,
/// `PEER_HOSTS6`) and their subnets (`ROUTES` and `ROUTES6`, and a kernel
/// route each). A peer host is its underlay address: an IPv4 one carries
/// subnets of either family, an IPv6 one (native routing) IPv6 subnets
/// only, as the peers' checks hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peers {
    pub hosts: BTreeSet<IpAddr>,
    pub routes: BTreeMap<Ipv4Net, Ipv4Addr>,
    pub routes6: BTreeMap<Ipv6Net, IpAddr>,
}

impl Peers {
    /// From checked peer settings (disjoint subnets, unique hosts).
    pub fn of(peers: &[PeerConfig]) -> Self {
        Self {
            hosts: peers.iter().map(|p| p.host).collect(),
            // Only an IPv4 host has IPv4 subnets (config::check_peers).
            routes: peers
                .iter()
                .filter_map(|p| Some((p.host_v4()?, &p.subnets)))
                .flat_map(|(host, nets)| nets.iter().map(move |n| (*n, host)))
                .collect(),
            routes6: peers
                .iter()
                .flat_map(|p| p.subnets6.iter().map(|n| (*n, p.host)))
                .collect(),
        }
    }

    /// Whether the local IPv6 subnet `net` can be served next to these
    /// peers: no peer host inside it, no peer subnet overlapping it (the
    /// IPv6 half of [`Self::check_local`]); else why not.
    pub fn check_local6(&self, net: &Ipv6Net) -> Result<(), String> {
        let (first, last) = (IpAddr::V6(net.addr()), IpAddr::V6(net.last()));
        if let Some(peer) = self.hosts.range(first..=last).next() {
            return Err(format!("peer {peer} lies inside it"));
        }
        match self.routes6.iter().find(|(n, _)| n.overlaps(net)) {
            Some((n, peer)) => Err(format!("subnet {n} of peer {peer} overlaps it")),
            None => Ok(()),
        }
    }

    /// Whether `local` can be served next to these peers: no peer host
    /// inside it, no peer subnet overlapping it (as
    /// [`crate::config::check_local`] says of configured peers).
    pub fn check_local(&self, local: &LocalSubnet) -> Result<(), ConfigError> {
        let net = local.net;
        let (first, last) = (IpAddr::V4(net.addr()), IpAddr::V4(net.last()));
        if let Some(peer) = self.hosts.range(first..=last).next() {
            return Err(ConfigError::PeerInLocal {
                peer: *peer,
                local: net,
                bridge: local.bridge.clone(),
            });
        }
        match self.routes.iter().find(|(n, _)| n.overlaps(&net)) {
            Some((n, peer)) => Err(ConfigError::LocalOverlap {
                peer_net: *n,
                peer: IpAddr::V4(*peer),
                local: net,
                bridge: local.bridge.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl State {
    /// What `op`, once done, changed: the one place that says how each
    /// operation moves the applied state, for [`plan`] (which simulates)
    /// and [`execute`] (which records what the writer did).
    pub fn record(&mut self, op: &Op) {
        let (peers, local) = (&mut self.peers, &mut self.local);
        match op {
            Op::AddPeerHost(h) => {
                peers.hosts.insert(*h);
            }
            Op::RemovePeerHost(h) => {
                peers.hosts.remove(h);
            }
            Op::SetRoute { net, peer } => {
                peers.routes.insert(*net, *peer);
            }
            Op::RemoveRoute(net) => {
                peers.routes.remove(net);
            }
            Op::SetRoute6 { net, peer } => {
                peers.routes6.insert(*net, *peer);
            }
            Op::RemoveRoute6(net) => {
                peers.routes6.remove(net);
            }
            // Kernel routes are the writer's to track: it may leave one
            // out (an operator's route is there already).
            Op::AddKernelRoute { .. }
            | Op::RemoveKernelRoute(_)
            | Op::AddKernelRoute6 { .. }
            | Op::RemoveKernelRoute6(_)
            | Op::SetNeighbours(_) => {}
            Op::AttachBridge(b) => {
                local.bridges.insert(b.clone());
            }
            Op::DetachBridge(b) => {
                local.bridges.remove(b);
            }
            Op::SetLocal {
                net,
                bridge,
                ifindex,
            } => {
                local.locals.insert(*net, (bridge.clone(), *ifindex));
            }
            Op::RemoveLocal(net) => {
                local.locals.remove(net);
            }
            Op::AttachPort { ifindex, name } => {
                local.ports.insert(*ifindex, name.clone());
            }
            Op::DetachPort { ifindex, name } => {
                if local.ports.get(ifindex) == Some(name) {
                    local.ports.remove(ifindex);
                }
            }
            Op::SetEndpoint { ip, ep } => {
                local.endpoints.insert(*ip, *ep);
            }
            Op::RemoveEndpoint(ip) => {
                local.endpoints.remove(ip);
            }
            Op::SetLocal6 {
                net,
                bridge,
                ifindex,
            } => {
                local.locals6.insert(*net, (bridge.clone(), *ifindex));
            }
            Op::RemoveLocal6(net) => {
                local.locals6.remove(net);
            }
            Op::SetEndpoint6 { ip, ep } => {
                local.endpoints6.insert(*ip, *ep);
            }
            Op::RemoveEndpoint6(ip) => {
                local.endpoints6.remove(ip);
            }
        }
    }
}
