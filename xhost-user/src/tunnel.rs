//! VXLAN mode's device: the kernel's vxlan driver in external (collect_md)
//! mode, which the datapath hands packets with a tunnel key (the peer host,
//! the VNI) and which hands back decapsulated ones with theirs. Created at
//! load (or, adopting a pinned datapath, taken over as it is), deleted at
//! unload; owned by the `Datapath`.

use std::net::Ipv4Addr;

use log::{info, warn};
use xhost_common::VXLAN_OVERHEAD;

use crate::{config::Vxlan, netlink::Rtnl};

/// Name of the device (one xhost instance per network namespace uses it).
pub const DEVICE: &str = "xhost_vxlan";

/// Smallest MTU IPv4 allows a link (RFC 791).
const MIN_IPV4_MTU: u32 = 68;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "{DEVICE} exists already (another xhost instance in VXLAN mode here? `xhost-user unload`, or `ip link del {DEVICE}` if it is a leftover)"
    )]
    Exists,
    #[error("underlay {iface} not found")]
    NoUnderlay { iface: String },
    #[error(
        "underlay {iface} has MTU {mtu}: VXLAN needs {VXLAN_OVERHEAD} bytes of it and leaves too little"
    )]
    MtuTooSmall { iface: String, mtu: u32 },
    #[error("creating {DEVICE}")]
    Create(#[source] std::io::Error),
    #[error(
        "the pinned datapath runs in VXLAN mode, but {DEVICE} (ifindex {ifindex}) is gone: nothing was touched (`xhost-user unload` first)"
    )]
    Gone { ifindex: u32 },
    #[error(
        "{DEVICE} is ifindex {found}, not the device the pinned datapath made (ifindex {ifindex}): nothing was touched (`xhost-user unload` first)"
    )]
    Replaced { ifindex: u32, found: u32 },
    #[error(
        "the pinned datapath's {DEVICE} has {what} {pinned}, this load wants {wanted}: nothing was touched (`xhost-user unload` first to change it)"
    )]
    Differs {
        what: &'static str,
        pinned: String,
        wanted: String,
    },
    #[error("reading {DEVICE}")]
    Read(#[source] std::io::Error),
}

/// The vxlan device of this instance; deleted when dropped unless kept.
#[derive(Debug)]
pub struct TunnelDevice {
    pub ifindex: u32,
    pub mtu: u32,
    pub vxlan: Vxlan,
    keep: bool,
}

impl TunnelDevice {
    /// Creates the device for `vxlan` with the underlay's MTU less the
    /// VXLAN overhead, so that what fits it fits the underlay once
    /// encapsulated.
    pub fn create(underlay: &str, vxlan: Vxlan) -> Result<Self, TunnelError> {
        let mut rtnl = Rtnl::open().map_err(TunnelError::Create)?;
        let link = rtnl
            .link_by_name(underlay)
            .map_err(TunnelError::Create)?
            .ok_or_else(|| TunnelError::NoUnderlay {
                iface: underlay.into(),
            })?;
        let underlay_mtu = link.mtu.unwrap_or(1500);
        let mtu = underlay_mtu.saturating_sub(VXLAN_OVERHEAD);
        if mtu < MIN_IPV4_MTU {
            return Err(TunnelError::MtuTooSmall {
                iface: underlay.into(),
                mtu: underlay_mtu,
            });
        }
        match rtnl.create_vxlan(DEVICE, vxlan.port, mtu) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(TunnelError::Exists);
            }
            r => r.map_err(TunnelError::Create)?,
        }
        let ifindex = match rtnl.link_by_name(DEVICE) {
            Ok(Some(l)) => l.index,
            Ok(None) => {
                return Err(TunnelError::Create(std::io::Error::other(
                    "created, then gone",
                )));
            }
            Err(e) => return Err(TunnelError::Create(e)),
        };
        let dev = Self {
            ifindex,
            mtu,
            vxlan,
            keep: false,
        };
        ipv6_without_addresses();
        info!(
            "created {DEVICE} (ifindex {ifindex}): VXLAN VNI {} on UDP {}, MTU {mtu}",
            vxlan.vni, vxlan.port
        );
        Ok(dev)
    }

    /// Adoption: the device a pinned datapath's agent made (`ifindex`, as
    /// its state file says, carrying `pinned_vni`), checked, without
    /// touching it, against what this load wants: the same device, in
    /// external mode on `vxlan.port`, with the VNI of `vxlan` and the MTU
    /// `underlay` leaves. Kept when dropped until [`TunnelDevice::own`].
    pub fn existing(
        underlay: &str,
        vxlan: Vxlan,
        ifindex: u32,
        pinned_vni: u32,
    ) -> Result<Self, TunnelError> {
        let mut rtnl = Rtnl::open().map_err(TunnelError::Read)?;
        let dev = match rtnl.link_by_name(DEVICE).map_err(TunnelError::Read)? {
            Some(l) if l.index == ifindex => l,
            Some(l) => {
                return Err(TunnelError::Replaced {
                    ifindex,
                    found: l.index,
                });
            }
            None => return Err(TunnelError::Gone { ifindex }),
        };
        let info = rtnl.vxlan_of(ifindex).map_err(TunnelError::Read)?;
        let differs = |what, pinned: String, wanted: String| TunnelError::Differs {
            what,
            pinned,
            wanted,
        };
        let Some(info) = info.filter(|i| i.external) else {
            return Err(differs(
                "kind",
                dev.kind.unwrap_or_else(|| "none".into()),
                "vxlan external".into(),
            ));
        };
        if pinned_vni != vxlan.vni {
            return Err(differs(
                "VNI",
                pinned_vni.to_string(),
                vxlan.vni.to_string(),
            ));
        }
        if info.port != Some(vxlan.port) {
            return Err(differs(
                "UDP port",
                info.port.map_or_else(|| "none".into(), |p| p.to_string()),
                vxlan.port.to_string(),
            ));
        }
        let link = rtnl
            .link_by_name(underlay)
            .map_err(TunnelError::Read)?
            .ok_or_else(|| TunnelError::NoUnderlay {
                iface: underlay.into(),
            })?;
        let want = link.mtu.unwrap_or(1500).saturating_sub(VXLAN_OVERHEAD);
        let mtu = dev.mtu.unwrap_or(0);
        if mtu != want {
            return Err(differs(
                "MTU",
                mtu.to_string(),
                format!("{want} ({underlay}'s less {VXLAN_OVERHEAD})"),
            ));
        }
        info!(
            "adopting {DEVICE} (ifindex {ifindex}): VXLAN VNI {} on UDP {}, MTU {mtu}",
            vxlan.vni, vxlan.port
        );
        Ok(Self {
            ifindex,
            mtu,
            vxlan,
            keep: true,
        })
    }

    /// Leaves the device in place when dropped (`load --detach`).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Ends an adoption: dropped from now on, the device is deleted.
    pub fn own(&mut self) {
        self.keep = false;
    }
}

impl Drop for TunnelDevice {
    fn drop(&mut self) {
        if !self.keep {
            delete(self.ifindex);
        }
    }
}

/// IPv6 on the device without any address of its own: the kernel routes
/// peers' IPv6 subnets into it (and takes what it decapsulates) only with
/// IPv6 on, and the device's own IPv6 chatter (DAD, router solicitations,
/// MLD reports) would have no peer to go to. Off, then no address
/// generation (`addr_gen_mode` none: no link-local address, so no DAD or
/// solicitation), then on again; with multicast off on the device (see
/// `newvxlan`) it joins no group it would report either. Best effort: on a
/// host without IPv6 there is nothing to do.
fn ipv6_without_addresses() {
    for (knob, value) in [
        ("disable_ipv6", "1"),
        ("addr_gen_mode", "1"),
        ("disable_ipv6", "0"),
    ] {
        let sysctl = format!("/proc/sys/net/ipv6/conf/{DEVICE}/{knob}");
        if let Err(e) = std::fs::write(&sysctl, value) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("{sysctl}: {e}");
            }
            return;
        }
    }
}

/// Deletes the device with `ifindex` if it is still xhost's vxlan device.
pub fn delete(ifindex: u32) {
    let Ok(mut rtnl) = Rtnl::open() else { return };
    match rtnl.link_by_index(ifindex) {
        Ok(Some(l)) if l.name == DEVICE && l.kind.as_deref() == Some("vxlan") => {
            if let Err(e) = rtnl.delete_link(ifindex) {
                warn!("deleting {DEVICE}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => warn!("looking up {DEVICE}: {e}"),
    }
}

/// Where the kernel's routes of peer subnets lead: via the peer host on the
/// underlay (native), or into the vxlan device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteDevice {
    pub oif: u32,
    pub via_peer: bool,
    /// Into the vxlan device: the MTU of a route to a peer host on an IPv6
    /// underlay, whose outer headers take 20 bytes more than the IPv4 ones
    /// the device's MTU allows for.
    pub ipv6_outer_mtu: Option<u32>,
}

impl RouteDevice {
    /// The gateway of the route to a subnet of `peer`.
    pub fn gateway(self, peer: Ipv4Addr) -> Option<Ipv4Addr> {
        self.via_peer.then_some(peer)
    }
}
