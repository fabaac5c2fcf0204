//! Carrying a plan out: the `Writer` interface to the datapath and the
//! kernel, and `execute`, which keeps the applied state exact.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use log::info;
use xhost_common::Endpoint;

use super::{Neighbour, Op, State};
use crate::net::{Ipv4Net, Ipv6Net, fmt_mac};

/// What the single writer can do to the datapath and the kernel. The agent's
/// implementations: the eBPF datapath's writes the maps, attaches programs,
/// adds kernel routes and neighbour entries; the kernel datapath's adds
/// kernel routes and iptables rules. The plan's tests record the calls.
/// Detaching, removing a kernel route and writing neighbours are best
/// effort (already gone is fine, a failure is logged), so they cannot fail.
pub trait Writer {
    type Error: std::error::Error + Send + Sync + 'static;

    fn add_peer_host(&mut self, host: IpAddr) -> Result<(), Self::Error>;
    fn remove_peer_host(&mut self, host: IpAddr) -> Result<(), Self::Error>;
    fn set_route(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), Self::Error>;
    fn remove_route(&mut self, net: &Ipv4Net) -> Result<(), Self::Error>;
    fn add_kernel_route(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), Self::Error>;
    fn remove_kernel_route(&mut self, net: &Ipv4Net);
    fn attach_bridge(&mut self, bridge: &str) -> Result<(), Self::Error>;
    fn detach_bridge(&mut self, bridge: &str);
    fn set_local(&mut self, net: &Ipv4Net, bridge_ifindex: u32) -> Result<(), Self::Error>;
    fn remove_local(&mut self, net: &Ipv4Net) -> Result<(), Self::Error>;
    fn attach_port(&mut self, port: &str) -> Result<(), Self::Error>;
    fn detach_port(&mut self, port: &str);
    fn set_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), Self::Error>;
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), Self::Error>;
    fn set_neighbours(&mut self, neighbours: &[Neighbour]);
    fn set_route6(&mut self, net: &Ipv6Net, peer: IpAddr) -> Result<(), Self::Error>;
    fn remove_route6(&mut self, net: &Ipv6Net) -> Result<(), Self::Error>;
    fn add_kernel_route6(&mut self, net: &Ipv6Net, peer: IpAddr) -> Result<(), Self::Error>;
    fn remove_kernel_route6(&mut self, net: &Ipv6Net);
    fn set_local6(&mut self, net: &Ipv6Net, bridge_ifindex: u32) -> Result<(), Self::Error>;
    fn remove_local6(&mut self, net: &Ipv6Net) -> Result<(), Self::Error>;
    fn set_endpoint6(&mut self, ip: Ipv6Addr, ep: Endpoint) -> Result<(), Self::Error>;
    fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<(), Self::Error>;
}

/// Does `ops` in order through `w`, logging each change. Stops at the first
/// error; `applied` then reflects exactly the operations that were done.
pub fn execute<W: Writer>(w: &mut W, ops: &[Op], applied: &mut State) -> Result<(), W::Error> {
    for op in ops {
        write(w, op)?;
        applied.record(op);
        log(op);
    }
    Ok(())
}

fn write<W: Writer>(w: &mut W, op: &Op) -> Result<(), W::Error> {
    match op {
        Op::AddPeerHost(h) => w.add_peer_host(*h),
        Op::RemovePeerHost(h) => w.remove_peer_host(*h),
        Op::SetRoute { net, peer } => w.set_route(net, *peer),
        Op::RemoveRoute(net) => w.remove_route(net),
        Op::AddKernelRoute { net, peer } => w.add_kernel_route(net, *peer),
        Op::RemoveKernelRoute(net) => {
            w.remove_kernel_route(net);
            Ok(())
        }
        Op::AttachBridge(b) => w.attach_bridge(b),
        Op::DetachBridge(b) => {
            w.detach_bridge(b);
            Ok(())
        }
        Op::SetLocal { net, ifindex, .. } => w.set_local(net, *ifindex),
        Op::RemoveLocal(net) => w.remove_local(net),
        Op::AttachPort { name, .. } => w.attach_port(name),
        Op::DetachPort { name, .. } => {
            w.detach_port(name);
            Ok(())
        }
        Op::SetEndpoint { ip, ep } => w.set_endpoint(*ip, *ep),
        Op::RemoveEndpoint(ip) => w.remove_endpoint(*ip),
        Op::SetNeighbours(n) => {
            w.set_neighbours(n);
            Ok(())
        }
        Op::SetRoute6 { net, peer } => w.set_route6(net, *peer),
        Op::RemoveRoute6(net) => w.remove_route6(net),
        Op::AddKernelRoute6 { net, peer } => w.add_kernel_route6(net, *peer),
        Op::RemoveKernelRoute6(net) => {
            w.remove_kernel_route6(net);
            Ok(())
        }
        Op::SetLocal6 { net, ifindex, .. } => w.set_local6(net, *ifindex),
        Op::RemoveLocal6(net) => w.remove_local6(net),
        Op::SetEndpoint6 { ip, ep } => w.set_endpoint6(*ip, *ep),
        Op::RemoveEndpoint6(ip) => w.remove_endpoint6(*ip),
    }
}

/// The agent's log line of a change (attachments log their own).
fn log(op: &Op) {
    match op {
        Op::RemovePeerHost(h) => info!("peer {h}: removed"),
        Op::SetRoute { net, peer } => info!("route {net} via peer {peer}: set"),
        Op::RemoveRoute(net) => info!("route {net}: removed"),
        Op::AttachBridge(b) => info!("bridge {b}: following"),
        Op::DetachBridge(b) => info!("bridge {b}: no longer followed"),
        Op::SetLocal { net, bridge, .. } => info!("local subnet {net} on {bridge}: added"),
        Op::RemoveLocal(net) => info!("local subnet {net}: removed"),
        Op::SetEndpoint { ip, ep } => info!(
            "endpoint {ip}: mac {} via ifindex {}",
            fmt_mac(&ep.mac),
            ep.ifindex
        ),
        Op::RemoveEndpoint(ip) => info!("endpoint {ip}: removed"),
        Op::SetRoute6 { net, peer } => info!("route {net} via peer {peer}: set"),
        Op::RemoveRoute6(net) => info!("route {net}: removed"),
        Op::SetLocal6 { net, bridge, .. } => info!("local subnet {net} on {bridge}: added"),
        Op::RemoveLocal6(net) => info!("local subnet {net}: removed"),
        Op::SetEndpoint6 { ip, ep } => info!(
            "endpoint {ip}: mac {} via ifindex {}",
            fmt_mac(&ep.mac),
            ep.ifindex
        ),
        Op::RemoveEndpoint6(ip) => info!("endpoint {ip}: removed"),
        Op::AddPeerHost(_)
        | Op::AddKernelRoute { .. }
        | Op::RemoveKernelRoute(_)
        | Op::AddKernelRoute6 { .. }
        | Op::RemoveKernelRoute6(_)
        | Op::AttachPort { .. }
        | Op::DetachPort { .. }
        | Op::SetNeighbours(_) => {}
    }
}
