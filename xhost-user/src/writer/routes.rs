//! The kernel routes of peer subnets that xhost adds: one route type for
//! the agent, its state file and `unload`, and their owner, which deletes
//! them when dropped unless asked to keep them (`load --detach`). The owner
//! holds the writer's netlink socket: every route (and neighbour entry) the
//! writer programs goes over that one socket.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use log::warn;

use crate::{
    net::{Ipv4Net, Ipv6Net},
    netlink::{NUD_ADMIN, NUD_USABLE, Rtnl},
    tunnel::RouteDevice,
};

/// An IPv4 peer host: the ones whose neighbour entry the agent has
/// resolved for the datapath (`bpf_redirect_neigh` cannot resolve an IPv4
/// next hop for an IPv6 packet).
fn v4(peer: IpAddr) -> Option<Ipv4Addr> {
    match peer {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// A kernel route xhost added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelRoute {
    pub prefix: Ipv4Net,
    /// The peer host; none for a route into the vxlan device.
    pub via: Option<Ipv4Addr>,
    pub oif: u32,
}

/// An IPv6 kernel route xhost added: a peer's IPv6 subnet via the peer
/// host's IPv6 address, or on the route device's link (Linux routes no
/// IPv6 prefix via an IPv4 next hop).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelRoute6 {
    pub prefix: Ipv6Net,
    /// The peer host whose subnet it is.
    pub peer: IpAddr,
    /// The gateway: the peer host on an IPv6 underlay (native routing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Ipv6Addr>,
    /// The route's MTU: into the vxlan device towards a peer host on an
    /// IPv6 underlay (`RouteDevice::ipv6_outer_mtu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    pub oif: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("kernel route {net} (peer {peer})")]
pub struct KernelRouteError {
    /// The prefix, of either family.
    pub net: String,
    pub peer: IpAddr,
    #[source]
    pub source: std::io::Error,
}

/// The routes this instance added, and where they lead.
pub struct KernelRoutes {
    dev: RouteDevice,
    /// By prefix: one route per prefix, found at once when it goes.
    added: BTreeMap<Ipv4Net, KernelRoute>,
    added6: BTreeMap<Ipv6Net, KernelRoute6>,
    /// Peers whose neighbour entry the kernel was asked to resolve (see
    /// [`resolve_peers`]), once per peer until a flush.
    resolving: BTreeSet<Ipv4Addr>,
    /// When [`KernelRoutes::resolve_lost`] last asked for each IPv6 peer.
    asked: BTreeMap<Ipv4Addr, Instant>,
    /// IPv6 peers whose entry failed to resolve, asked again every
    /// [`RETRY_FAILED`] ([`KernelRoutes::retry_failed`]).
    failed: BTreeSet<Ipv4Addr>,
    keep: bool,
    /// The writer's request socket, in the namespace `new` was called in.
    rtnl: Rtnl,
}

impl KernelRoutes {
    /// Opens the writer's netlink socket in the calling thread's namespace.
    pub fn new(dev: RouteDevice) -> std::io::Result<Self> {
        Ok(Self {
            dev,
            added: BTreeMap::new(),
            added6: BTreeMap::new(),
            resolving: BTreeSet::new(),
            asked: BTreeMap::new(),
            failed: BTreeSet::new(),
            keep: false,
            rtnl: Rtnl::open()?,
        })
    }

    /// The writer's netlink socket, for its other kernel requests.
    pub fn netlink(&mut self) -> &mut Rtnl {
        &mut self.rtnl
    }

    /// Takes over the routes an adopted datapath's agent added (from its
    /// state file), so that they are deleted with this instance's.
    pub fn adopt(
        dev: RouteDevice,
        added: Vec<KernelRoute>,
        added6: Vec<KernelRoute6>,
    ) -> std::io::Result<Self> {
        let mut routes = Self::new(dev)?;
        routes.added = added.into_iter().map(|r| (r.prefix, r)).collect();
        routes.added6 = added6.into_iter().map(|r| (r.prefix, r)).collect();
        Ok(routes)
    }

    /// Adds the kernel route of `peer`'s subnet `net`: `net via peer dev
    /// underlay` (as flannel's host-gw does), or `net dev xhost_vxlan` in
    /// VXLAN mode (as flannel's vxlan does). The datapath never uses it; it
    /// lets the kernel handle what the datapath hands it (TTL expiry -> ICMP
    /// time exceeded, frag-needed) instead of answering "net unreachable".
    /// An existing route for `net` is the operator's and is left alone; a
    /// peer that is not on-link gets no route (warning), the datapath
    /// forwards all the same.
    pub fn add(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), KernelRouteError> {
        let err = |source| KernelRouteError {
            net: net.to_string(),
            peer: peer.into(),
            source,
        };
        let gw = self.dev.gateway(peer);
        match self.rtnl.add_route(net, gw, self.dev.oif) {
            Ok(()) => {
                let route = KernelRoute {
                    prefix: *net,
                    via: gw,
                    oif: self.dev.oif,
                };
                self.added.insert(*net, route);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                warn!("a route for {net} exists already; leaving it as it is");
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENETUNREACH | libc::EINVAL)) => {
                warn!("no kernel route for {net}: peer {peer} is not on-link ({e})");
                Ok(())
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Deletes the kernel route this instance added for `net`, if it did.
    pub fn remove(&mut self, net: &Ipv4Net) {
        if let Some(gone) = self.added.remove(net) {
            delete_with(&mut self.rtnl, &[gone]);
        }
    }

    /// Adds the IPv6 kernel route of `peer`'s subnet `net`: `net dev
    /// underlay proto 177` (or `dev xhost_vxlan`). Linux has no IPv6 route
    /// via an IPv4 next hop (it refuses `via inet`), so the route is on the
    /// link; the datapath never uses it (it forwards to the peer's IPv4
    /// address itself). It lets the kernel answer what the datapath hands
    /// it, hop limit expiry (time exceeded) and Packet Too Big, instead of
    /// "no route". The first route of a peer also asks the kernel to
    /// resolve the peer host's neighbour entry ([`resolve_peers`]).
    pub fn add6(&mut self, net: &Ipv6Net, peer: IpAddr) -> Result<(), KernelRouteError> {
        let (via, mtu) = match peer {
            IpAddr::V4(v4) => {
                if self.dev.via_peer && self.resolving.insert(v4) {
                    resolve_peers(&mut self.rtnl, self.dev.oif, &[v4]);
                }
                (None, None)
            }
            // The datapath has the kernel resolve it (bpf_redirect_neigh).
            IpAddr::V6(v6) => (self.dev.via_peer.then_some(v6), self.dev.ipv6_outer_mtu),
        };
        match self.rtnl.add_route6(net, via, mtu, self.dev.oif) {
            Ok(()) => {
                let route = KernelRoute6 {
                    prefix: *net,
                    peer,
                    via,
                    mtu,
                    oif: self.dev.oif,
                };
                self.added6.insert(*net, route);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                warn!("a route for {net} exists already; leaving it as it is");
                Ok(())
            }
            // As for IPv4: the datapath forwards all the same.
            Err(e)
                if via.is_some()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL)
                    ) =>
            {
                warn!("no kernel route for {net}: peer {peer} is not on-link ({e})");
                Ok(())
            }
            Err(source) => Err(KernelRouteError {
                net: net.to_string(),
                peer,
                source,
            }),
        }
    }

    /// Deletes the IPv6 kernel route this instance added for `net`, if it did.
    pub fn remove6(&mut self, net: &Ipv6Net) {
        if let Some(gone) = self.added6.remove(net) {
            delete6_with(&mut self.rtnl, &[gone]);
            if let IpAddr::V4(v4) = gone.peer
                && !self.added6.values().any(|r| r.peer == gone.peer)
            {
                self.resolving.remove(&v4);
            }
        }
    }

    /// Puts back the routes the kernel flushed: it deletes every route
    /// through a device that goes down (without a notification), so after
    /// an underlay flap they are gone. All go together, so one probe (adding
    /// the first again) tells; the rest follow only if it was gone. Until
    /// the device is up again the add fails and the next change retries.
    pub fn restore(&mut self) {
        let rtnl = &mut self.rtnl;
        let mut routes = self.added.values();
        let probe = match routes.next() {
            Some(first) => rtnl.add_route(&first.prefix, first.via, first.oif),
            None => match self.added6.values().next() {
                Some(first) => rtnl.add_route6(&first.prefix, first.via, first.mtu, first.oif),
                None => return,
            },
        };
        match probe {
            Ok(()) => {}
            // Still there (or the device is not back yet).
            Err(_) => return,
        }
        let mut back = 1;
        // The flush took the neighbour entries too: the IPv6 peers' again.
        self.resolving = self.added6.values().filter_map(|r| v4(r.peer)).collect();
        if self.dev.via_peer && !self.resolving.is_empty() {
            let peers: Vec<Ipv4Addr> = self.resolving.iter().copied().collect();
            resolve_peers(rtnl, self.dev.oif, &peers);
        }
        for r in self.added6.values() {
            match rtnl.add_route6(&r.prefix, r.via, r.mtu, r.oif) {
                Ok(()) => back += 1,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => warn!("putting back kernel route {}: {e}", r.prefix),
            }
        }
        for r in routes {
            match rtnl.add_route(&r.prefix, r.via, r.oif) {
                Ok(()) => back += 1,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => warn!("putting back kernel route {}: {e}", r.prefix),
            }
        }
        log::info!(
            "kernel routes put back after the kernel flushed them (device down and up): {back}"
        );
    }

    /// Asks the kernel again to resolve the neighbour entry of each peer
    /// with IPv6 routes whose entry it lost: deleted (garbage-collected,
    /// `ip neigh del`, flushed) or failed. Nothing else would: the datapath
    /// forwards IPv6 through a resolved entry without the kernel noticing
    /// the traffic, and hands it to the kernel (`pass_fib6`) while there is
    /// none, whose IPv6 route never solicits the peer host. Called on the
    /// kernel's neighbour notifications (a deletion, a failure). A missing
    /// entry is asked for at once; a failed one (the peer is down) at most
    /// every [`RETRY_FAILED`], and again by [`Self::retry_failed`] while it
    /// stays failed. Static entries are left alone.
    pub fn resolve_lost(&mut self) {
        let peers: BTreeSet<Ipv4Addr> = self.added6.values().filter_map(|r| v4(r.peer)).collect();
        self.asked.retain(|p, _| peers.contains(p));
        self.failed.clear();
        if !self.dev.via_peer || peers.is_empty() {
            return;
        }
        let oif = self.dev.oif;
        let table = match self.rtnl.ipv4_neighbours(oif) {
            Ok(t) => t,
            Err(e) => {
                warn!("reading the neighbours of ifindex {oif}: {e}");
                return;
            }
        };
        let now = Instant::now();
        for peer in peers {
            let ask = match table.iter().find(|n| n.dst == Some(peer)).map(|n| n.state) {
                None => true,
                Some(s) if s & (NUD_USABLE | NUD_ADMIN | libc::NUD_INCOMPLETE) != 0 => false,
                // Failed (or none): the peer may be down; not in a loop.
                Some(_) => {
                    self.failed.insert(peer);
                    self.asked
                        .get(&peer)
                        .is_none_or(|t| now.duration_since(*t) >= RETRY_FAILED)
                }
            };
            if !ask {
                continue;
            }
            self.asked.insert(peer, now);
            if let Err(e) = self.rtnl.use_neighbour(oif, peer) {
                warn!("peer {peer}: asking the kernel to resolve its neighbour entry again: {e}");
            }
        }
    }

    /// [`Self::resolve_lost`] while a peer's entry stays failed; nothing
    /// (no netlink request) otherwise. Called every second.
    pub fn retry_failed(&mut self) {
        if !self.failed.is_empty() {
            self.resolve_lost();
        }
    }

    /// The routes this instance added, by prefix.
    pub fn list(&self) -> Vec<KernelRoute> {
        self.added.values().copied().collect()
    }

    /// The IPv6 routes this instance added, by prefix.
    pub fn list6(&self) -> Vec<KernelRoute6> {
        self.added6.values().copied().collect()
    }

    /// Leaves the routes in place when this value is dropped (`load
    /// --detach`); `xhost-user unload` deletes them from the state file.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for KernelRoutes {
    fn drop(&mut self) {
        if !self.keep {
            let added = self.list();
            delete_with(&mut self.rtnl, &added);
            let added6 = self.list6();
            delete6_with(&mut self.rtnl, &added6);
        }
    }
}

/// How often a peer whose neighbour entry failed to resolve is asked for
/// again: each ask costs the kernel's probes (3 ARP requests a second
/// apart by default) towards a host that may be down.
pub const RETRY_FAILED: Duration = Duration::from_secs(10);

/// Asks the kernel to resolve the IPv4 neighbour entry of each of `peers`
/// on `oif` (`NTF_USE`) that is missing or not usable. The datapath
/// forwards IPv6 to a peer only once it is resolved (`bpf_fib_lookup`);
/// before, it hands the packets to the kernel (`pass_fib6`), whose IPv6
/// route solicits their destination on the link, never the peer host's
/// IPv4 address: with IPv6 traffic alone the entry would never be made.
/// An administrator's static entry (`PERMANENT`, `NOARP`) is left alone
/// (`NTF_USE` would turn a permanent one dynamic). Best effort.
fn resolve_peers(rtnl: &mut Rtnl, oif: u32, peers: &[Ipv4Addr]) {
    let table = rtnl.ipv4_neighbours(oif).unwrap_or_else(|e| {
        warn!("reading the neighbours of ifindex {oif}: {e}");
        Vec::new()
    });
    for peer in peers {
        let settled = table
            .iter()
            .any(|n| n.dst == Some(*peer) && n.state & (NUD_USABLE | NUD_ADMIN) != 0);
        if !settled && let Err(e) = rtnl.use_neighbour(oif, *peer) {
            warn!("peer {peer}: asking the kernel to resolve its neighbour entry: {e}");
        }
    }
}

/// Deletes routes [`KernelRoutes::add`] made; already gone is fine.
pub fn delete(routes: &[KernelRoute]) {
    match Rtnl::open() {
        Ok(mut rtnl) => delete_with(&mut rtnl, routes),
        Err(e) => warn!("deleting {} kernel route(s): {e}", routes.len()),
    }
}

/// Deletes IPv6 routes [`KernelRoutes::add6`] made; already gone is fine.
pub fn delete6(routes: &[KernelRoute6]) {
    if routes.is_empty() {
        return;
    }
    match Rtnl::open() {
        Ok(mut rtnl) => delete6_with(&mut rtnl, routes),
        Err(e) => warn!("deleting {} kernel route(s): {e}", routes.len()),
    }
}

fn delete6_with(rtnl: &mut Rtnl, routes: &[KernelRoute6]) {
    for r in routes {
        match rtnl.delete_route6(&r.prefix, r.via, r.oif) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                warn!("deleting route {}: {e}", r.prefix)
            }
            _ => {}
        }
    }
}

fn delete_with(rtnl: &mut Rtnl, routes: &[KernelRoute]) {
    for r in routes {
        match rtnl.delete_route(&r.prefix, r.via, r.oif) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                warn!("deleting route {}: {e}", r.prefix)
            }
            _ => {}
        }
    }
}
