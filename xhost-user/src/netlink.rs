//! A minimal rtnetlink client for what the agent asks the kernel: links
//! (veth peers, bridge ports), neighbours and bridge FDB entries (local
//! endpoints), the routes xhost installs, and classic tc's clsact qdiscs
//! and filters (what aya's tc API does not read back or remove). Values
//! from `<linux/netlink.h>`, `<linux/rtnetlink.h>`, `<linux/if_link.h>`,
//! `<linux/neighbour.h>`, `<linux/pkt_sched.h>`, `<linux/pkt_cls.h>`.
//!
//! A socket belongs to the network namespace of the thread that opened it.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    socket,
};

use crate::net::Ipv4Net;

/// Routing protocol id xhost marks its routes with (`ip route ... proto 177`).
pub const XHOST_RTPROT: u8 = 177;

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NDMSG_LEN: usize = 12;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_GETQDISC: u16 = 38;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
/// `struct tcmsg`: family, pad, pad, ifindex, handle, parent, info.
const TCMSG_LEN: usize = 20;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
/// `TCA_BPF_FLAG_ACT_DIRECT`: the program's return value is the verdict.
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// The clsact qdisc: its handle `ffff:` and parent `TC_H_CLSACT`.
const CLSACT_HANDLE: u32 = 0xffff_0000;
const TC_H_CLSACT: u32 = 0xffff_fff1;
/// Parents of clsact's ingress and egress filters (`TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_*)`).
pub const TC_PARENT_INGRESS: u32 = 0xffff_fff2;
pub const TC_PARENT_EGRESS: u32 = 0xffff_fff3;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_MTU: u16 = 4;
const IFLA_VXLAN_LEARNING: u16 = 7;
const IFLA_VXLAN_PORT: u16 = 15;
const IFLA_VXLAN_COLLECT_METADATA: u16 = 25;
const IFF_UP: u32 = 0x1;
const IFF_NOARP: u32 = 0x80;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NDA_MASTER: u16 = 9;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTN_UNICAST: u8 = 1;
/// Leaves the 64-bit statistics out of link replies: smaller messages.
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
/// Attribute type bits (NLA_F_NESTED, NLA_F_NET_BYTEORDER are the top two).
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Multicast groups (legacy `RTMGRP_*` masks) of the kernel changes the
/// agent follows: links, neighbours, IPv4 addresses, routes and rules.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV4_RULE: u32 = 0x80;
/// Dumps restarted because the table changed under them, before giving up.
const DUMP_TRIES: usize = 3;

/// Neighbour state `REACHABLE`: confirmed now, aged by the kernel as usual.
pub const NUD_REACHABLE: u16 = 0x02;
/// Neighbour states an administrator set (`PERMANENT`, `NOARP`).
pub const NUD_ADMIN: u16 = 0x80 | 0x40;
/// Neighbour states that carry a usable link-layer address.
pub const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x80; // REACHABLE STALE DELAY PROBE PERMANENT
/// FDB flag: the entry is the bridge port's own address (not learned).
const NTF_SELF: u8 = 0x02;
/// Neighbour state of a bridge's own (local) FDB entries.
const NUD_PERMANENT: u16 = 0x80;

/// One interface as `RTM_NEWLINK` describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// `IFLA_LINK`: for a veth, the peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
    pub master: Option<u32>,
    pub kind: Option<String>,
    pub mtu: Option<u32>,
}

/// One `RTM_NEWNEIGH`: an IPv4 neighbour, or (AF_BRIDGE) an FDB entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Neigh {
    pub ifindex: u32,
    pub state: u16,
    pub flags: u8,
    pub dst: Option<Ipv4Addr>,
    pub lladdr: Option<[u8; 6]>,
    pub master: Option<u32>,
}

/// One classic tc filter, as `RTM_NEWTFILTER` describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcFilter {
    /// Its priority (`tc filter ... pref N`).
    pub priority: u16,
    pub handle: u32,
    /// `bpf`, `u32`, `matchall`, ...
    pub kind: String,
    /// cls_bpf: the name given at attach (aya gives the program's name).
    pub bpf_name: Option<String>,
    /// cls_bpf: the id of the attached program.
    pub bpf_id: Option<u32>,
    /// cls_bpf: direct-action mode.
    pub direct_action: bool,
}

/// A NETLINK_ROUTE socket, bound to the namespace of the thread that opened it.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    pub fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        // Dump replies fill datagrams up to 32 KiB; a larger buffer never truncates.
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Every interface of the socket's namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        self.dump(
            |seq| getlink_request(seq, NLM_F_REQUEST | NLM_F_DUMP, 0, None),
            RTM_NEWLINK,
            parse_link,
        )
    }

    /// The interface with `index`, `None` if there is none.
    pub fn link_by_index(&mut self, index: u32) -> io::Result<Option<Link>> {
        let index =
            i32::try_from(index).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.get_link(index, None)
    }

    /// The interface called `name`, `None` if there is none.
    pub fn link_by_name(&mut self, name: &str) -> io::Result<Option<Link>> {
        self.get_link(0, Some(name))
    }

    fn get_link(&mut self, index: i32, name: Option<&str>) -> io::Result<Option<Link>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = getlink_request(self.seq, NLM_F_REQUEST, index, name);
        let mut links = Vec::new();
        match self.transact(&msg, |ty, p| {
            if ty == RTM_NEWLINK {
                links.push(parse_link(p).ok_or_else(malformed)?);
            }
            Ok(())
        }) {
            Ok(_) => Ok(links.into_iter().next()),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// IPv4 neighbours (the ARP table) of `ifindex`.
    pub fn ipv4_neighbours(&mut self, ifindex: u32) -> io::Result<Vec<Neigh>> {
        let all = self.dump(
            |seq| getneigh_request(seq, libc::AF_INET as u8),
            RTM_NEWNEIGH,
            parse_neigh,
        )?;
        Ok(all.into_iter().filter(|n| n.ifindex == ifindex).collect())
    }

    /// Learned FDB entries of the ports of `bridge` (MAC -> port ifindex);
    /// the ports' own addresses and the bridge's are left out.
    pub fn fdb_learned(&mut self, bridge: u32) -> io::Result<Vec<Neigh>> {
        let all = self.dump(
            |seq| getneigh_request(seq, libc::AF_BRIDGE as u8),
            RTM_NEWNEIGH,
            parse_neigh,
        )?;
        Ok(all
            .into_iter()
            .filter(|n| {
                n.master == Some(bridge) && n.flags & NTF_SELF == 0 && n.state & NUD_PERMANENT == 0
            })
            .collect())
    }

    /// Creates `name`, a VXLAN device in external (collect_md) mode on UDP
    /// `port`, without learning, ARP or address, with `mtu`, and sets it
    /// up: `ip link add name type vxlan external dstport port nolearning`.
    /// Fails with `AlreadyExists` if `name` exists.
    pub fn create_vxlan(&mut self, name: &str, port: u16, mtu: u32) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let m = newvxlan_request(self.seq, name, port, mtu);
        self.transact(&m, |_, _| Ok(())).map(|_| ())
    }

    /// Deletes the interface with `index`.
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let index =
            i32::try_from(index).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.seq = self.seq.wrapping_add(1);
        let mut m = header(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, self.seq);
        push_ifinfomsg(&mut m, index, 0, 0);
        finish(&mut m);
        self.transact(&m, |_, _| Ok(())).map(|_| ())
    }

    /// Adds `dst via gw dev oif` (`dst dev oif` without `gw`) to the main
    /// table, marked as xhost's. Fails with `AlreadyExists` if any route for
    /// `dst` is there: an operator's route is never replaced (nor later
    /// deleted) by xhost.
    pub fn add_route(&mut self, dst: &Ipv4Net, gw: Option<Ipv4Addr>, oif: u32) -> io::Result<()> {
        self.route(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, dst, gw, oif)
    }

    /// Deletes the route `add_route` made.
    pub fn delete_route(
        &mut self,
        dst: &Ipv4Net,
        gw: Option<Ipv4Addr>,
        oif: u32,
    ) -> io::Result<()> {
        self.route(RTM_DELROUTE, 0, dst, gw, oif)
    }

    fn route(
        &mut self,
        kind: u16,
        flags: u16,
        dst: &Ipv4Net,
        gw: Option<Ipv4Addr>,
        oif: u32,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut m = header(kind, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq);
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        m.extend_from_slice(&[
            libc::AF_INET as u8,
            dst.prefix_len(),
            0,
            0,
            RT_TABLE_MAIN,
            XHOST_RTPROT,
            // A route without a gateway reaches its prefix on the link.
            if gw.is_some() {
                RT_SCOPE_UNIVERSE
            } else {
                RT_SCOPE_LINK
            },
            RTN_UNICAST,
        ]);
        m.extend_from_slice(&0u32.to_ne_bytes());
        push_attr(&mut m, RTA_DST, &dst.addr().octets());
        if let Some(gw) = gw {
            push_attr(&mut m, RTA_GATEWAY, &gw.octets());
        }
        push_attr(&mut m, RTA_OIF, &oif.to_ne_bytes());
        finish(&mut m);
        self.transact(&m, |_, _| Ok(())).map(|_| ())
    }

    /// `ip neigh replace ip lladdr mac dev ifindex nud reachable`: the
    /// kernel sends what waits in the entry's queue at once, and ages the
    /// entry as if the neighbour had answered.
    pub fn set_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let m = newneigh_request(self.seq, ifindex, ip, mac)?;
        self.transact(&m, |_, _| Ok(())).map(|_| ())
    }

    /// The classic tc filters of `ifindex` under `parent`
    /// ([`TC_PARENT_INGRESS`] or [`TC_PARENT_EGRESS`]); none if the
    /// device has no clsact qdisc.
    pub fn tc_filters(&mut self, ifindex: u32, parent: u32) -> io::Result<Vec<TcFilter>> {
        let index =
            i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let all = match self.dump(
            |seq| {
                tcmsg_request(
                    RTM_GETTFILTER,
                    NLM_F_REQUEST | NLM_F_DUMP,
                    seq,
                    index,
                    0,
                    parent,
                )
            },
            RTM_NEWTFILTER,
            parse_tc_filter,
        ) {
            Ok(all) => all,
            // No clsact (or no such device): no filters.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Vec::new(),
            Err(e) => Err(e)?,
        };
        // A dump also describes each priority's classifier itself (handle 0).
        Ok(all.into_iter().filter(|f| f.handle != 0).collect())
    }

    /// Whether `ifindex` has a clsact qdisc.
    pub fn has_clsact(&mut self, ifindex: u32) -> io::Result<bool> {
        let index =
            i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let all = self.dump(
            |seq| tcmsg_request(RTM_GETQDISC, NLM_F_REQUEST | NLM_F_DUMP, seq, index, 0, 0),
            RTM_NEWQDISC,
            parse_qdisc,
        )?;
        Ok(all
            .iter()
            .any(|(i, parent, kind)| *i == ifindex && *parent == TC_H_CLSACT && kind == "clsact"))
    }

    /// `tc qdisc del dev ifindex clsact`: removes the qdisc and every
    /// filter under it.
    pub fn delete_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let index =
            i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.seq = self.seq.wrapping_add(1);
        let mut m = tcmsg_request(
            RTM_DELQDISC,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
            index,
            CLSACT_HANDLE,
            TC_H_CLSACT,
        );
        push_attr(&mut m, TCA_KIND, b"clsact\0");
        finish(&mut m);
        self.transact(&m, |_, _| Ok(())).map(|_| ())
    }

    /// Runs a dump, restarting it if the kernel says it was interrupted.
    fn dump<T>(
        &mut self,
        request: impl Fn(u32) -> Vec<u8>,
        reply_type: u16,
        parse: impl Fn(&[u8]) -> Option<T>,
    ) -> io::Result<Vec<T>> {
        for _ in 0..DUMP_TRIES {
            self.seq = self.seq.wrapping_add(1);
            let msg = request(self.seq);
            let mut out = Vec::new();
            let interrupted = self.transact(&msg, |ty, p| {
                if ty == reply_type {
                    out.push(parse(p).ok_or_else(malformed)?);
                }
                Ok(())
            })?;
            if !interrupted {
                return Ok(out);
            }
        }
        Err(io::Error::other(
            "netlink dump kept being interrupted by changes",
        ))
    }

    /// Sends one request and feeds each reply to `on`, until NLMSG_DONE,
    /// an acknowledgement, or (non-dump) the first reply. Returns whether a
    /// dump was interrupted.
    fn transact(
        &mut self,
        msg: &[u8],
        mut on: impl FnMut(u16, &[u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        sendto(
            self.fd.as_raw_fd(),
            msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        let dump = u16_at(msg, 6) & NLM_F_DUMP == NLM_F_DUMP;
        let mut interrupted = false;
        let mut replies = 0usize;
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
            let reply = parse_replies(
                &self.buf[..n],
                Some(self.seq),
                &mut interrupted,
                &mut |ty, p| {
                    replies += 1;
                    on(ty, p)
                },
            )?;
            match reply {
                Reply::Done => return Ok(interrupted),
                Reply::More if !dump && replies > 0 => return Ok(interrupted),
                Reply::More => {}
            }
        }
    }
}

/// Notifications of link, neighbour, IPv4 address, route and rule changes
/// in the namespace of the thread that opened it, read without blocking.
pub struct KernelEvents {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// What the notifications read so far said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Something changed (or may have).
    pub any: bool,
    /// A link went away (or may have).
    pub link_deleted: bool,
    /// An IPv4 address was added or removed (or may have been).
    pub addresses: bool,
    /// A link, address or route appeared or changed (or may have): what
    /// lets a flushed route be added again.
    pub came_up: bool,
}

impl KernelEvents {
    pub fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )?;
        let groups =
            RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        Ok(Self {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Reads every queued notification. When the socket overran
    /// (`ENOBUFS`) or a datagram does not parse, what was said is unknown:
    /// anything may have changed, a link may have gone.
    pub fn drain(&mut self) -> io::Result<Changes> {
        let mut changes = Changes::default();
        let unknown = Changes {
            any: true,
            link_deleted: true,
            addresses: true,
            came_up: true,
        };
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => return Ok(changes),
                Err(nix::errno::Errno::ENOBUFS) => {
                    changes = unknown;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let said = kinds(&self.buf[..n]).unwrap_or(unknown);
            changes.any |= said.any;
            changes.link_deleted |= said.link_deleted;
            changes.addresses |= said.addresses;
            changes.came_up |= said.came_up;
        }
    }
}

impl AsRawFd for KernelEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// What a datagram of notifications says changed.
fn kinds(buf: &[u8]) -> io::Result<Changes> {
    let mut said = Changes {
        any: true,
        ..Changes::default()
    };
    let mut interrupted = false;
    // Not filtered by sequence number: a notification caused by a request
    // carries the requester's (`ip addr add` gives its own, not 0).
    parse_replies(buf, None, &mut interrupted, &mut |ty, _| {
        said.link_deleted |= ty == RTM_DELLINK;
        said.addresses |= ty == RTM_NEWADDR || ty == RTM_DELADDR;
        said.came_up |= ty == RTM_NEWLINK || ty == RTM_NEWADDR || ty == RTM_NEWROUTE;
        Ok(())
    })?;
    Ok(said)
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed netlink message")
}

/// A `struct nlmsghdr` with the length left to `finish`.
fn header(ty: u16, flags: u16, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
    m
}

fn finish(m: &mut [u8]) {
    let len = u32::try_from(m.len()).unwrap_or(u32::MAX);
    m[..4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends a `struct ifinfomsg`: family, pad, type, index, flags, change.
fn push_ifinfomsg(m: &mut Vec<u8>, index: i32, flags: u32, change: u32) {
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&index.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&change.to_ne_bytes());
}

/// Builds an RTM_GETLINK request (host byte order, as netlink wants).
fn getlink_request(seq: u32, flags: u16, index: i32, name: Option<&str>) -> Vec<u8> {
    let mut m = header(RTM_GETLINK, flags, seq);
    push_ifinfomsg(&mut m, index, 0, 0);
    push_attr(
        &mut m,
        IFLA_EXT_MASK,
        &RTEXT_FILTER_SKIP_STATS.to_ne_bytes(),
    );
    if let Some(name) = name {
        let mut z = name.as_bytes().to_vec();
        z.push(0);
        push_attr(&mut m, IFLA_IFNAME, &z);
    }
    finish(&mut m);
    m
}

/// Builds the RTM_NEWLINK that creates an external-mode VXLAN device, up
/// and without ARP.
fn newvxlan_request(seq: u32, name: &str, port: u16, mtu: u32) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut m = header(RTM_NEWLINK, flags, seq);
    let up = IFF_UP | IFF_NOARP;
    push_ifinfomsg(&mut m, 0, up, up);
    let mut z = name.as_bytes().to_vec();
    z.push(0);
    push_attr(&mut m, IFLA_IFNAME, &z);
    push_attr(&mut m, IFLA_MTU, &mtu.to_ne_bytes());
    let mut data = Vec::new();
    push_attr(&mut data, IFLA_VXLAN_COLLECT_METADATA, &[1]);
    push_attr(&mut data, IFLA_VXLAN_LEARNING, &[0]);
    // The one attribute netlink wants in network byte order.
    push_attr(&mut data, IFLA_VXLAN_PORT, &port.to_be_bytes());
    let mut info = Vec::new();
    push_attr(&mut info, IFLA_INFO_KIND, b"vxlan\0");
    push_attr(&mut info, IFLA_INFO_DATA, &data);
    push_attr(&mut m, IFLA_LINKINFO, &info);
    finish(&mut m);
    m
}

/// Builds an RTM_GETNEIGH dump request for `family` (AF_INET or AF_BRIDGE).
fn getneigh_request(seq: u32, family: u8) -> Vec<u8> {
    let mut m = header(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq);
    // struct ndmsg: family, pad1, pad2, ifindex, state, flags, type
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(&0i32.to_ne_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    finish(&mut m);
    m
}

/// Builds an RTM_NEWNEIGH (create or replace) of a reachable IPv4 neighbour.
fn newneigh_request(seq: u32, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> io::Result<Vec<u8>> {
    let index = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let mut m = header(RTM_NEWNEIGH, flags, seq);
    // struct ndmsg: family, pad1, pad2, ifindex, state, flags, type
    m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    m.extend_from_slice(&index.to_ne_bytes());
    m.extend_from_slice(&NUD_REACHABLE.to_ne_bytes());
    m.extend_from_slice(&[0, RTN_UNICAST]);
    push_attr(&mut m, NDA_DST, &ip.octets());
    push_attr(&mut m, NDA_LLADDR, &mac);
    finish(&mut m);
    Ok(m)
}

/// A `struct tcmsg` request (qdiscs, filters); attributes may follow
/// before `finish`, which this calls already for attribute-less requests.
fn tcmsg_request(ty: u16, flags: u16, seq: u32, index: i32, handle: u32, parent: u32) -> Vec<u8> {
    let mut m = header(ty, flags, seq);
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    m.extend_from_slice(&index.to_ne_bytes());
    m.extend_from_slice(&handle.to_ne_bytes());
    m.extend_from_slice(&parent.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    finish(&mut m);
    m
}

/// An `RTM_NEWTFILTER` payload: `struct tcmsg` then attributes.
fn parse_tc_filter(payload: &[u8]) -> Option<TcFilter> {
    if payload.len() < TCMSG_LEN {
        return None;
    }
    // tcm_info: priority in the upper 16 bits, protocol in the lower.
    let mut f = TcFilter {
        priority: (u32_at(payload, 16) >> 16) as u16,
        handle: u32_at(payload, 8),
        ..TcFilter::default()
    };
    for (ty, data) in attrs(&payload[TCMSG_LEN..]) {
        match ty {
            TCA_KIND => f.kind = cstr(data),
            TCA_OPTIONS => {
                for (ty, data) in attrs(data) {
                    match ty {
                        TCA_BPF_NAME => f.bpf_name = Some(cstr(data)),
                        TCA_BPF_ID => f.bpf_id = u32_of(data),
                        TCA_BPF_FLAGS => {
                            f.direct_action =
                                u32_of(data).is_some_and(|v| v & TCA_BPF_FLAG_ACT_DIRECT != 0);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(f)
}

/// An `RTM_NEWQDISC` payload: (ifindex, parent, kind).
fn parse_qdisc(payload: &[u8]) -> Option<(u32, u32, String)> {
    if payload.len() < TCMSG_LEN {
        return None;
    }
    let index = u32::try_from(i32::from_ne_bytes(payload[4..8].try_into().ok()?)).ok()?;
    let kind = attrs(&payload[TCMSG_LEN..])
        .find(|(t, _)| *t == TCA_KIND)
        .map(|(_, d)| cstr(d))
        .unwrap_or_default();
    Some((index, u32_at(payload, 12), kind))
}

fn push_attr(m: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(data);
    m.resize(align4(m.len()), 0);
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// NLMSG_DONE or an ack: the request is complete.
    Done,
    /// More datagrams follow (dumps), or a single reply was consumed.
    More,
}

/// Parses one datagram of replies to request `seq`, handing each message of
/// another type than DONE/ERROR to `on`. Errors reported by the kernel
/// become `io::Error`s with its errno.
fn parse_replies(
    mut buf: &[u8],
    seq: Option<u32>,
    interrupted: &mut bool,
    on: &mut dyn FnMut(u16, &[u8]) -> io::Result<()>,
) -> io::Result<Reply> {
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(malformed());
        }
        let ty = u16_at(buf, 4);
        let flags = u16_at(buf, 6);
        let msg_seq = u32_at(buf, 8);
        let payload = &buf[NLMSG_HDRLEN..len];
        buf = &buf[align4(len).min(buf.len())..];
        if seq.is_some_and(|s| s != msg_seq) {
            continue; // a late reply to an earlier request
        }
        *interrupted |= flags & NLM_F_DUMP_INTR != 0;
        match ty {
            NLMSG_DONE => return Ok(Reply::Done),
            NLMSG_ERROR => {
                if payload.len() < 4 {
                    return Err(malformed());
                }
                let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                return if code == 0 {
                    Ok(Reply::Done)
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
            _ => on(ty, payload)?,
        }
    }
    Ok(Reply::More)
}

/// An `RTM_NEWLINK` payload: `struct ifinfomsg` then attributes.
fn parse_link(payload: &[u8]) -> Option<Link> {
    if payload.len() < IFINFOMSG_LEN {
        return None;
    }
    let index = u32::try_from(i32::from_ne_bytes(payload[4..8].try_into().ok()?)).ok()?;
    let mut link = Link {
        index,
        ..Link::default()
    };
    for (ty, data) in attrs(&payload[IFINFOMSG_LEN..]) {
        match ty {
            IFLA_IFNAME => link.name = cstr(data),
            IFLA_ADDRESS => link.mac = data.try_into().ok(),
            IFLA_LINK => link.link = u32_of(data).filter(|&i| i != 0),
            IFLA_MASTER => link.master = u32_of(data).filter(|&i| i != 0),
            IFLA_MTU => link.mtu = u32_of(data),
            IFLA_LINKINFO => {
                link.kind = attrs(data)
                    .find(|(t, _)| *t == IFLA_INFO_KIND)
                    .map(|(_, d)| cstr(d));
            }
            _ => {}
        }
    }
    Some(link)
}

/// An `RTM_NEWNEIGH` payload: `struct ndmsg` then attributes.
fn parse_neigh(payload: &[u8]) -> Option<Neigh> {
    if payload.len() < NDMSG_LEN {
        return None;
    }
    let ifindex = u32::try_from(i32::from_ne_bytes(payload[4..8].try_into().ok()?)).ok()?;
    let mut n = Neigh {
        ifindex,
        state: u16_at(payload, 8),
        flags: payload[10],
        ..Neigh::default()
    };
    for (ty, data) in attrs(&payload[NDMSG_LEN..]) {
        match ty {
            NDA_DST => n.dst = <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from),
            NDA_LLADDR => n.lladdr = data.try_into().ok(),
            NDA_MASTER => n.master = u32_of(data).filter(|&i| i != 0),
            _ => {}
        }
    }
    Some(n)
}

/// Iterates `(type, data)` over a run of netlink attributes, stopping at malformed ones.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16_at(buf, 0));
        let ty = u16_at(buf, 2) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, data))
    })
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u32_of(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(..4)?.try_into().ok()?))
}

fn cstr(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An RTM_NEWLINK message as the kernel sends it.
    fn newlink(
        seq: u32,
        flags: u16,
        index: i32,
        name: &str,
        mac: [u8; 6],
        link: Option<u32>,
    ) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&16u16.to_ne_bytes()); // RTM_NEWLINK
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[0, 0, 1, 0]); // family, pad, type ARPHRD_ETHER
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        let mut ifname = name.as_bytes().to_vec();
        ifname.push(0);
        push_attr(&mut m, 3, &ifname);
        push_attr(&mut m, 1, &mac);
        if let Some(l) = link {
            push_attr(&mut m, 5, &l.to_ne_bytes());
        }
        push_attr(&mut m, 10, &7u32.to_ne_bytes()); // IFLA_MASTER
        let mut info = Vec::new();
        push_attr(&mut info, 1, b"veth\0");
        push_attr(&mut m, 18 | 0x8000, &info); // IFLA_LINKINFO, NLA_F_NESTED
        let len = u32::try_from(m.len()).expect("small");
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    fn control(seq: u32, ty: u16, error: i32) -> Vec<u8> {
        let mut m = Vec::new();
        let len: u32 = if ty == 2 { 36 } else { 20 };
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&error.to_ne_bytes());
        m.resize(len as usize, 0);
        m
    }

    #[test]
    fn parses_a_dump() {
        let mut buf = newlink(7, 0x2, 42, "eth0", [2, 0x42, 192, 168, 110, 2], Some(4));
        buf.extend(newlink(6, 0x2, 43, "stale", [0; 6], None)); // other request: skipped
        buf.extend(newlink(7, 0x2 | 0x10, 1, "lo", [0; 6], None));
        buf.extend(control(7, 3, 0)); // NLMSG_DONE
        let (mut links, mut intr) = (Vec::new(), false);
        let r = parse_replies(&buf, Some(7), &mut intr, &mut |ty, p| {
            assert_eq!(ty, RTM_NEWLINK);
            links.push(parse_link(p).expect("well-formed"));
            Ok(())
        })
        .expect("parse");
        assert_eq!(r, Reply::Done);
        assert!(intr, "NLM_F_DUMP_INTR seen");
        assert_eq!(links.len(), 2);
        let eth0 = &links[0];
        assert_eq!(eth0.index, 42);
        assert_eq!(eth0.name, "eth0");
        assert_eq!(eth0.mac, Some([2, 0x42, 192, 168, 110, 2]));
        assert_eq!(eth0.link, Some(4));
        assert_eq!(eth0.master, Some(7));
        assert_eq!(eth0.kind.as_deref(), Some("veth"));
        assert_eq!(links[1].link, None);
    }

    #[test]
    fn kernel_errors_become_errnos() {
        let mut intr = false;
        let mut ignore = |_: u16, _: &[u8]| Ok(());
        let err = parse_replies(
            &control(3, 2, -libc::ENODEV),
            Some(3),
            &mut intr,
            &mut ignore,
        )
        .expect_err("ENODEV");
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        assert_eq!(
            parse_replies(&control(3, 2, 0), Some(3), &mut intr, &mut ignore).expect("ack"),
            Reply::Done
        );
        let mut truncated = newlink(3, 0, 1, "x", [0; 6], None);
        truncated.truncate(20);
        assert!(parse_replies(&truncated, Some(3), &mut intr, &mut ignore).is_err());
        assert!(parse_link(&[0; 8]).is_none());
        assert!(parse_neigh(&[0; 8]).is_none());
    }

    /// An RTM_NEWNEIGH for an FDB entry or an IPv4 neighbour.
    fn newneigh(
        family: u8,
        ifindex: i32,
        state: u16,
        flags: u8,
        dst: Option<[u8; 4]>,
        mac: [u8; 6],
        master: Option<u32>,
    ) -> Vec<u8> {
        let mut m = header(RTM_NEWNEIGH, 0x2, 5);
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(&ifindex.to_ne_bytes());
        m.extend_from_slice(&state.to_ne_bytes());
        m.extend_from_slice(&[flags, 0]);
        if let Some(d) = dst {
            push_attr(&mut m, NDA_DST, &d);
        }
        push_attr(&mut m, NDA_LLADDR, &mac);
        if let Some(b) = master {
            push_attr(&mut m, NDA_MASTER, &b.to_ne_bytes());
        }
        finish(&mut m);
        m
    }

    #[test]
    fn parses_neighbours_and_fdb_entries() {
        let mut buf = newneigh(
            2,
            3,
            0x02,
            0,
            Some([192, 168, 110, 11]),
            [2, 0x42, 0, 0, 0, 0x0b],
            None,
        );
        buf.extend(newneigh(
            7,
            9,
            0x02,
            0,
            None,
            [2, 0x42, 0, 0, 0, 0x0b],
            Some(3),
        ));
        buf.extend(control(5, 3, 0));
        let mut seen = Vec::new();
        let mut intr = false;
        parse_replies(&buf, Some(5), &mut intr, &mut |ty, p| {
            assert_eq!(ty, RTM_NEWNEIGH);
            seen.push(parse_neigh(p).expect("well-formed"));
            Ok(())
        })
        .expect("parse");
        assert_eq!(seen[0].dst, Some(Ipv4Addr::new(192, 168, 110, 11)));
        assert_eq!((seen[0].ifindex, seen[0].state), (3, 0x02));
        assert_eq!(
            (seen[1].ifindex, seen[1].master, seen[1].dst),
            (9, Some(3), None)
        );
        assert_eq!(seen[1].lladdr, Some([2, 0x42, 0, 0, 0, 0x0b]));
    }

    #[test]
    fn request_layout() {
        let m = getlink_request(9, 0x301, 0, Some("docker0"));
        assert_eq!(
            u32::from_ne_bytes(m[..4].try_into().expect("4")) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 18); // RTM_GETLINK
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x301);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().expect("4")), 9);
        assert_eq!(m.len() % 4, 0);
        assert!(m.windows(8).any(|w| w == b"docker0\0"));
    }

    #[test]
    fn neighbour_request_layout() {
        let ip = Ipv4Addr::new(192, 168, 110, 7);
        let mac = [2, 0x42, 0xc0, 0xa8, 0x6e, 7];
        let m = newneigh_request(4, 12, ip, mac).expect("request");
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWNEIGH);
        assert_eq!(
            u16_at(&m, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(m[NLMSG_HDRLEN], libc::AF_INET as u8);
        // The kernel reads it back as the neighbour it asks for.
        let n = parse_neigh(&m[NLMSG_HDRLEN..]).expect("parse");
        assert_eq!(
            (n.ifindex, n.state, n.dst, n.lladdr),
            (12, NUD_REACHABLE, Some(ip), Some(mac))
        );
        assert!(
            newneigh_request(4, u32::MAX, ip, mac).is_err(),
            "ifindex out of range"
        );
    }

    /// What waits on an unresolved neighbour leaves as soon as the entry is
    /// written, to the MAC written; until then nothing leaves.
    #[test]
    fn writing_a_neighbour_releases_what_waits_on_it() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a private netns (needs root)");
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip").args(args).status();
                assert!(st.expect("run ip").success(), "ip {args:?}");
            };
            ip(&[
                "link", "add", "xh-nb0", "type", "veth", "peer", "name", "xh-nb1",
            ]);
            ip(&["addr", "add", "10.9.0.1/24", "dev", "xh-nb0"]);
            ip(&["link", "set", "xh-nb0", "up"]);
            ip(&["link", "set", "xh-nb1", "up"]);
            // Every IPv4 frame of the namespace, without blocking.
            let tap = socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthIp,
            )
            .expect("packet socket");
            let ours = |f: &[u8]| f.len() >= 42 && f[23] == 17 && f.ends_with(b"xhost-queued");
            let wait_frame = |within: Duration| -> Option<Vec<u8>> {
                let t = std::time::Instant::now();
                let mut buf = [0u8; 2048];
                while t.elapsed() < within {
                    match recv(tap.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        Ok(n) if ours(&buf[..n]) => return Some(buf[..n].to_vec()),
                        Ok(_) => {}
                        Err(nix::errno::Errno::EAGAIN) => {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => panic!("packet socket: {e}"),
                    }
                }
                None
            };
            let dst = Ipv4Addr::new(10, 9, 0, 5);
            let udp = std::net::UdpSocket::bind("10.9.0.1:0").expect("udp socket");
            udp.send_to(b"xhost-queued", (dst, 9)).expect("send");
            let mut rtnl = Rtnl::open().expect("netlink socket");
            let dev = rtnl.link_by_name("xh-nb0").expect("get").expect("xh-nb0");
            let entry = |rtnl: &mut Rtnl| {
                rtnl.ipv4_neighbours(dev.index)
                    .expect("dump")
                    .into_iter()
                    .find(|n| n.dst == Some(dst))
            };
            assert_eq!(entry(&mut rtnl).map(|n| n.state), Some(0x01), "INCOMPLETE");
            assert_eq!(
                wait_frame(Duration::from_millis(200)),
                None,
                "held on the entry"
            );

            let mac = [2, 0x42, 10, 9, 0, 5];
            rtnl.set_neighbour(dev.index, dst, mac).expect("write");
            let frame = wait_frame(Duration::from_millis(200)).expect("released at once");
            assert_eq!(frame[..6], mac, "to the MAC written");
            let n = entry(&mut rtnl).expect("entry");
            assert_eq!((n.state, n.lladdr), (NUD_REACHABLE, Some(mac)));
            assert!(
                rtnl.set_neighbour(0x7fff_fff0, dst, mac).is_err(),
                "no such device"
            );
        })
        .join()
        .expect("test thread");
    }

    /// Works unprivileged: the loopback device of the test's own namespace.
    #[test]
    fn notifications_tell_deletions_and_addresses_apart() {
        // A notification may carry the sequence number of the request
        // that caused it (address changes do).
        let retyped = |ty: u16| {
            let mut m = newlink(9, 0, 42, "veth1", [2; 6], None);
            m[4..6].copy_from_slice(&ty.to_ne_bytes());
            m
        };
        let new = newlink(0, 0, 43, "veth2", [2; 6], None);
        // A new link may let a flushed route back in.
        let only_any = Changes {
            any: true,
            came_up: true,
            ..Changes::default()
        };
        assert_eq!(kinds(&new).expect("parse"), only_any);
        let del = [new.clone(), retyped(RTM_DELLINK)].concat();
        assert_eq!(
            kinds(&del).expect("parse"),
            Changes {
                link_deleted: true,
                ..only_any
            }
        );
        for ty in [RTM_NEWADDR, RTM_DELADDR] {
            assert_eq!(
                kinds(&[retyped(ty), new.clone()].concat()).expect("parse"),
                Changes {
                    addresses: true,
                    ..only_any
                },
                "type {ty}"
            );
        }
        assert!(kinds(&new[..new.len() - 1]).is_err(), "truncated");
    }

    #[test]
    fn kernel_changes_are_noticed() {
        // In a namespace of this thread's own: the link made here goes with it.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a private netns (needs root)");
            let mut events = KernelEvents::open().expect("subscribe");
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip").args(args).status();
                assert!(st.expect("run ip").success(), "ip {args:?}");
            };
            let changed = Changes {
                any: true,
                ..Changes::default()
            };
            let addressed = Changes {
                addresses: true,
                ..changed
            };
            // What appears (a link, an address, a route) may let a flushed
            // route back in.
            let up = Changes {
                came_up: true,
                ..changed
            };
            let addressed_up = Changes {
                came_up: true,
                ..addressed
            };
            ip(&[
                "link", "add", "xh-ev0", "type", "veth", "peer", "name", "xh-ev1",
            ]);
            ip(&["link", "set", "xh-ev0", "up"]);
            assert_eq!(
                events.drain().expect("drain"),
                up,
                "created and up: nothing gone"
            );
            assert_eq!(
                events.drain().expect("drain"),
                Changes::default(),
                "read once"
            );
            // Each kind of change the datapath's cached answers depend on.
            for (change, said) in [
                (
                    &["addr", "add", "10.77.0.1/24", "dev", "xh-ev0"][..],
                    addressed_up,
                ),
                (&["route", "add", "10.78.0.0/24", "via", "10.77.0.2"], up),
                (
                    &[
                        "neigh",
                        "replace",
                        "10.77.0.2",
                        "lladdr",
                        "02:00:00:00:00:02",
                        "dev",
                        "xh-ev0",
                    ],
                    changed,
                ),
                (
                    &["rule", "add", "from", "10.79.0.0/24", "lookup", "100"],
                    changed,
                ),
                (&["route", "del", "10.78.0.0/24"], changed),
                (&["addr", "del", "10.77.0.1/24", "dev", "xh-ev0"], addressed),
            ] {
                ip(change);
                assert_eq!(events.drain().expect("drain"), said, "ip {change:?}");
            }
            ip(&["link", "del", "xh-ev0"]);
            assert!(events.drain().expect("drain").link_deleted, "the deletion");
            assert_eq!(
                events.drain().expect("drain"),
                Changes::default(),
                "read once"
            );
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn queries_the_current_namespace() {
        let mut rtnl = Rtnl::open().expect("netlink socket");
        let links = rtnl.links().expect("dump");
        let lo = links.iter().find(|l| l.name == "lo").expect("lo listed");
        assert_eq!(
            rtnl.link_by_name("lo").expect("get").map(|l| l.index),
            Some(lo.index)
        );
        assert_eq!(
            rtnl.link_by_index(lo.index).expect("get").map(|l| l.name),
            Some("lo".into())
        );
        assert_eq!(rtnl.link_by_name("xh-no-such-if").expect("get"), None);
        assert_eq!(rtnl.link_by_index(0x7fff_fff0).expect("get"), None);
    }
}
