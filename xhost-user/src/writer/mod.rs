//! The single writer's hands: the plan's operations carried out on the
//! datapath's maps and attachments, the kernel's routes and the bridges'
//! neighbour tables ([`KernelWriter`]), or, for the kernel datapath, on
//! routes and iptables rules ([`recipe::RecipeWriter`]).

pub mod neighbours;
pub mod recipe;
pub mod routes;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use xhost_common::Endpoint;

use crate::{
    datapath::{Datapath, DatapathError},
    net::{Ipv4Net, Ipv6Net},
    plan::{Neighbour, Writer},
};
pub use routes::{KernelRoute, KernelRoute6, KernelRouteError, KernelRoutes};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Route(#[from] KernelRouteError),
    #[error(transparent)]
    Recipe(#[from] recipe::RecipeError),
}

/// The datapath and the kernel routes, as one [`Writer`].
pub struct KernelWriter<'a> {
    pub dp: &'a mut Datapath,
    pub routes: &'a mut KernelRoutes,
}

impl Writer for KernelWriter<'_> {
    type Error = WriteError;

    fn add_peer_host(&mut self, host: IpAddr) -> Result<(), WriteError> {
        Ok(self.dp.add_peer_host(host)?)
    }

    fn remove_peer_host(&mut self, host: IpAddr) -> Result<(), WriteError> {
        Ok(self.dp.remove_peer_host(host)?)
    }

    fn set_route(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), WriteError> {
        Ok(self.dp.set_route(net, peer)?)
    }

    fn remove_route(&mut self, net: &Ipv4Net) -> Result<(), WriteError> {
        Ok(self.dp.remove_route(net)?)
    }

    fn add_kernel_route(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), WriteError> {
        Ok(self.routes.add(net, peer)?)
    }

    fn remove_kernel_route(&mut self, net: &Ipv4Net) {
        self.routes.remove(net);
    }

    fn attach_bridge(&mut self, bridge: &str) -> Result<(), WriteError> {
        Ok(self.dp.attach_bridge(bridge)?)
    }

    fn detach_bridge(&mut self, bridge: &str) {
        self.dp.detach_bridge(bridge);
    }

    fn set_local(&mut self, net: &Ipv4Net, bridge_ifindex: u32) -> Result<(), WriteError> {
        Ok(self.dp.set_local(net, bridge_ifindex)?)
    }

    fn remove_local(&mut self, net: &Ipv4Net) -> Result<(), WriteError> {
        Ok(self.dp.remove_local(net)?)
    }

    fn attach_port(&mut self, port: &str) -> Result<(), WriteError> {
        Ok(self.dp.attach_port(port)?)
    }

    fn detach_port(&mut self, port: &str) {
        self.dp.detach_port(port);
    }

    fn set_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), WriteError> {
        Ok(self.dp.set_endpoint(ip, ep)?)
    }

    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), WriteError> {
        Ok(self.dp.remove_endpoint(ip)?)
    }

    fn set_neighbours(&mut self, neighbours: &[Neighbour]) {
        neighbours::settle(self.routes.netlink(), neighbours);
    }

    fn set_route6(&mut self, net: &Ipv6Net, peer: IpAddr) -> Result<(), WriteError> {
        Ok(self.dp.set_route6(net, peer)?)
    }

    fn remove_route6(&mut self, net: &Ipv6Net) -> Result<(), WriteError> {
        Ok(self.dp.remove_route6(net)?)
    }

    fn add_kernel_route6(&mut self, net: &Ipv6Net, peer: IpAddr) -> Result<(), WriteError> {
        Ok(self.routes.add6(net, peer)?)
    }

    fn remove_kernel_route6(&mut self, net: &Ipv6Net) {
        self.routes.remove6(net);
    }

    fn set_local6(&mut self, net: &Ipv6Net, bridge_ifindex: u32) -> Result<(), WriteError> {
        Ok(self.dp.set_local6(net, bridge_ifindex)?)
    }

    fn remove_local6(&mut self, net: &Ipv6Net) -> Result<(), WriteError> {
        Ok(self.dp.remove_local6(net)?)
    }

    fn set_endpoint6(&mut self, ip: Ipv6Addr, ep: Endpoint) -> Result<(), WriteError> {
        Ok(self.dp.set_endpoint6(ip, ep)?)
    }

    fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<(), WriteError> {
        Ok(self.dp.remove_endpoint6(ip)?)
    }
}
