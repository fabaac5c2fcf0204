//! Docker as a source: the watcher's view as bridges, subnets and endpoints.

use crate::{docker::DockerView, net::Ipv4Net, plan::EndpointSpec};

/// (bridge, subnets) per network, and each endpoint with the bridge of its
/// network.
pub fn specs(v: &DockerView) -> (Vec<(String, Vec<Ipv4Net>)>, Vec<EndpointSpec>) {
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
