//! The kernel routes of peer subnets that xhost adds: one route type for
//! the agent, its state file and `unload`, and their owner, which deletes
//! them when dropped unless asked to keep them (`load --detach`).

use std::net::Ipv4Addr;

use log::warn;

use crate::{net::Ipv4Net, netlink::Rtnl, tunnel::RouteDevice};

/// A kernel route xhost added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelRoute {
    pub prefix: Ipv4Net,
    /// The peer host; none for a route into the vxlan device.
    pub via: Option<Ipv4Addr>,
    pub oif: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("kernel route {net} (peer {peer})")]
pub struct KernelRouteError {
    pub net: Ipv4Net,
    pub peer: Ipv4Addr,
    #[source]
    pub source: std::io::Error,
}

/// The routes this instance added, and where they lead.
#[derive(Debug)]
pub struct KernelRoutes {
    dev: RouteDevice,
    added: Vec<KernelRoute>,
    keep: bool,
}

impl KernelRoutes {
    pub fn new(dev: RouteDevice) -> Self {
        Self {
            dev,
            added: Vec::new(),
            keep: false,
        }
    }

    /// Takes over the routes an adopted datapath's agent added (from its
    /// state file), so that they are deleted with this instance's.
    pub fn adopt(dev: RouteDevice, added: Vec<KernelRoute>) -> Self {
        Self {
            dev,
            added,
            keep: false,
        }
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
            net: *net,
            peer,
            source,
        };
        let mut rtnl = Rtnl::open().map_err(err)?;
        let gw = self.dev.gateway(peer);
        match rtnl.add_route(net, gw, self.dev.oif) {
            Ok(()) => {
                self.added.push(KernelRoute {
                    prefix: *net,
                    via: gw,
                    oif: self.dev.oif,
                });
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
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.added)
            .into_iter()
            .partition(|r| r.prefix == *net);
        self.added = kept;
        delete(&gone);
    }

    /// Puts back the routes the kernel flushed: it deletes every route
    /// through a device that goes down (without a notification), so after
    /// an underlay flap they are gone. All go together, so one probe (adding
    /// the first again) tells; the rest follow only if it was gone. Until
    /// the device is up again the add fails and the next change retries.
    pub fn restore(&mut self) {
        let Some(first) = self.added.first().copied() else {
            return;
        };
        let Ok(mut rtnl) = Rtnl::open() else { return };
        match rtnl.add_route(&first.prefix, first.via, first.oif) {
            Ok(()) => {}
            // Still there (or the device is not back yet).
            Err(_) => return,
        }
        let mut back = 1;
        for r in &self.added[1..] {
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

    /// The routes this instance added.
    pub fn list(&self) -> &[KernelRoute] {
        &self.added
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
            delete(&self.added);
        }
    }
}

/// Deletes routes [`KernelRoutes::add`] made; already gone is fine.
pub fn delete(routes: &[KernelRoute]) {
    let Ok(mut rtnl) = Rtnl::open() else { return };
    for r in routes {
        match rtnl.delete_route(&r.prefix, r.via, r.oif) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                warn!("deleting route {}: {e}", r.prefix)
            }
            _ => {}
        }
    }
}
