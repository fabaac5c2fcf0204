//! Docker as a source: the watcher's view as bridges, subnets and endpoints.

use crate::{
    docker::DockerView,
    net::{Ipv4Net, Ipv6Net},
    plan::EndpointSpec,
};

/// Bridges with their subnets per network, in one family each.
type Nets<N> = Vec<(String, Vec<N>)>;

/// (bridge, IPv4 subnets) and (bridge, IPv6 subnets) per network, and each
/// endpoint with the bridge of its network.
pub fn specs(v: &DockerView) -> (Nets<Ipv4Net>, Nets<Ipv6Net>, Vec<EndpointSpec>) {
    let nets = v
        .networks
        .values()
        .map(|n| (n.bridge.clone(), n.subnets.clone()))
        .collect();
    let nets6 = v
        .networks
        .values()
        .filter(|n| !n.subnets6.is_empty())
        .map(|n| (n.bridge.clone(), n.subnets6.clone()))
        .collect();
    let eps = v
        .endpoints
        .values()
        .filter_map(|e| {
            let bridge = v.networks.get(&e.network_id)?.bridge.clone();
            Some(EndpointSpec {
                ip: e.ip,
                ip6: e.ip6,
                mac: e.mac,
                host_ifindex: e.host_ifindex,
                bridge,
            })
        })
        .collect();
    (nets, nets6, eps)
}
