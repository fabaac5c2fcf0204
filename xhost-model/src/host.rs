//! The host's side of a forwarding decision: what `bpf_fib_lookup` answers
//! on a host with connected routes only (the test host of
//! `BPF_PROG_TEST_RUN`), and which frames are addressed to a device.

use crate::Prefix;

/// A device with one IPv4 address.
#[derive(Clone, Debug)]
pub struct Device {
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// Its address and the connected subnet's length; `None`: no address.
    pub addr: Option<([u8; 4], u8)>,
    /// Its IPv6 address and the connected subnet's length.
    pub addr6: Option<([u8; 16], u8)>,
    pub mtu: u32,
}

/// Devices, and the neighbour entries that are valid (resolved).
#[derive(Clone, Debug, Default)]
pub struct Host {
    pub devices: Vec<Device>,
    /// (device, address, MAC).
    pub neighbours: Vec<(u32, [u8; 4], [u8; 6])>,
    /// Valid IPv6 neighbour (NDP) entries: (device, address, MAC).
    pub neighbours6: Vec<(u32, [u8; 16], [u8; 6])>,
}

/// What `bpf_fib_lookup` answers (docs/datapath.md, "Native routing").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FibAnswer {
    /// A route and a valid neighbour: the MACs to write.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
        /// The route's source address (`BPF_FIB_LOOKUP_SRC`).
        source: [u8; 4],
    },
    /// A route, no valid neighbour: `bpf_redirect_neigh` to `nexthop`.
    Unresolved {
        ifindex: u32,
        nexthop: [u8; 4],
        source: [u8; 4],
    },
    /// No unicast route, a local or broadcast address, or too long for the
    /// route's MTU: the kernel's.
    Kernel,
}

impl Host {
    fn device(&self, ifindex: u32) -> Option<&Device> {
        self.devices.iter().find(|d| d.ifindex == ifindex)
    }

    pub fn mtu(&self, ifindex: u32) -> u32 {
        self.device(ifindex).map_or(0, |d| d.mtu)
    }

    /// Whether a frame to `mac` arriving on `ifindex` is addressed to the
    /// device itself (`PACKET_HOST`).
    pub fn is_for_device(&self, ifindex: u32, mac: [u8; 6]) -> bool {
        self.device(ifindex).is_some_and(|d| d.mac == mac)
    }

    /// The route to `dst` for a packet that arrived on `iif` and leaves as
    /// IPv4 packets of `tot_len` bytes (forwarding is on everywhere).
    pub fn fib(&self, iif: u32, dst: [u8; 4], tot_len: u16, _want_source: bool) -> FibAnswer {
        if self.device(iif).is_none() || dst[0] == 127 {
            return FibAnswer::Kernel;
        }
        let route = self.devices.iter().find_map(|d| {
            let (addr, len) = d.addr?;
            let net = Prefix::new(addr, len);
            let bcast = (u32::from_be_bytes(net.addr) | !mask(len)).to_be_bytes();
            // Local and broadcast routes are not unicast: not forwarded.
            if dst == addr || dst == bcast {
                return Some(None);
            }
            net.contains(dst).then_some(Some((d, addr)))
        });
        let Some(Some((dev, source))) = route else {
            return FibAnswer::Kernel;
        };
        if u32::from(tot_len) > dev.mtu {
            return FibAnswer::Kernel;
        }
        match self
            .neighbours
            .iter()
            .find(|(i, a, _)| *i == dev.ifindex && *a == dst)
        {
            Some((_, _, mac)) => FibAnswer::Resolved {
                ifindex: dev.ifindex,
                smac: dev.mac,
                dmac: *mac,
                source,
            },
            None => FibAnswer::Unresolved {
                ifindex: dev.ifindex,
                nexthop: dst,
                source,
            },
        }
    }

    /// The MAC of the neighbour entry for `addr` on bridge `bridge`, if the
    /// route to `addr` leads out of `bridge` and the entry is valid.
    pub fn neighbour_mac(&self, bridge: u32, addr: [u8; 4]) -> Option<[u8; 6]> {
        match self.fib(bridge, addr, 20, false) {
            FibAnswer::Resolved { ifindex, dmac, .. } if ifindex == bridge => Some(dmac),
            _ => None,
        }
    }
}

impl Host {
    /// The MAC of the IPv6 neighbour entry for `addr` on bridge `bridge`,
    /// looked up for a packet from `peer`: if the route to `addr` (a
    /// connected subnet of `bridge`, IPv6 forwarding on everywhere) leads
    /// out of `bridge` and the entry is valid. The kernel's IPv6 lookup
    /// forwards nothing to or from a loopback, link-local or multicast
    /// address (`rt6_need_strict`).
    pub fn neighbour_mac6(&self, bridge: u32, addr: [u8; 16], peer: [u8; 16]) -> Option<[u8; 6]> {
        let strict = |a: [u8; 16]| {
            a == std::net::Ipv6Addr::LOCALHOST.octets()
                || a[0] == 0xff
                || (a[0] == 0xfe && a[1] & 0xc0 == 0x80)
        };
        if strict(addr) || strict(peer) {
            return None;
        }
        let (own, len) = self.device(bridge)?.addr6?;
        if addr == own || !crate::Prefix6::new(own, len).contains(addr) {
            return None;
        }
        self.neighbours6
            .iter()
            .find(|(i, a, _)| *i == bridge && *a == addr)
            .map(|n| n.2)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}
