//! The rtnetlink requests the agent makes: links (veth peers, bridge ports,
//! kinds), neighbours and bridge FDB entries (local endpoints), the VXLAN
//! device, the routes xhost installs, and classic tc's clsact qdiscs and
//! filters (what aya's tc API does not read back or remove). Messages are
//! `netlink-packet-route`'s, sockets `netlink-sys`'s; what is left here is
//! the request/reply exchange and the translation into the few facts the
//! agent reads.
//!
//! A socket belongs to the network namespace of the thread that opened it.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, RawFd},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{
        InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo,
        LinkMessage,
    },
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol,
        RouteScope, RouteType,
    },
    tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::net::{Ipv4Net, Ipv6Net};

/// Routing protocol id xhost marks its routes with (`ip route ... proto 177`).
pub const XHOST_RTPROT: u8 = 177;

/// Parents of clsact's ingress and egress filters (`TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_*)`).
pub const TC_PARENT_INGRESS: u32 = 0xffff_fff2;
pub const TC_PARENT_EGRESS: u32 = 0xffff_fff3;
/// Dumps restarted because the table changed under them, before giving up.
const DUMP_TRIES: usize = 3;
/// Dump replies fill datagrams up to 32 KiB; a larger buffer never truncates.
const RECV_BUF: usize = 64 * 1024;

/// Neighbour state `REACHABLE`: confirmed now, aged by the kernel as usual.
pub const NUD_REACHABLE: u16 = libc::NUD_REACHABLE;
/// Neighbour states an administrator set (`PERMANENT`, `NOARP`).
pub const NUD_ADMIN: u16 = libc::NUD_PERMANENT | libc::NUD_NOARP;
/// Neighbour states that carry a usable link-layer address.
pub const NUD_USABLE: u16 =
    libc::NUD_REACHABLE | libc::NUD_STALE | libc::NUD_DELAY | libc::NUD_PROBE | libc::NUD_PERMANENT;

/// One interface as `RTM_NEWLINK` describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// `IFLA_LINK`: for a veth, the peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
    pub master: Option<u32>,
    /// `IFLA_INFO_KIND`: "bridge", "veth", "vxlan", ...; none for devices
    /// without rtnetlink link ops (`lo`, most physical NICs).
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

/// A NETLINK_ROUTE request socket, bound to the namespace of the thread
/// that opened it. Long-lived: one serves every request of its owner.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        // Only the kernel (port 0) talks to this socket.
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Every interface of the socket's namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        self.dump(
            || RouteNetlinkMessage::GetLink(getlink(0, None)),
            |m| {
                Ok(match m {
                    RouteNetlinkMessage::NewLink(l) => Some(link_of(l)),
                    _ => None,
                })
            },
        )
    }

    /// The interface with `index`, `None` if there is none.
    pub fn link_by_index(&mut self, index: u32) -> io::Result<Option<Link>> {
        if i32::try_from(index).is_err() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        self.get_link(getlink(index, None))
    }

    /// The interface called `name`, `None` if there is none.
    pub fn link_by_name(&mut self, name: &str) -> io::Result<Option<Link>> {
        self.get_link(getlink(0, Some(name)))
    }

    fn get_link(&mut self, req: LinkMessage) -> io::Result<Option<Link>> {
        let mut found = None;
        match self.request(RouteNetlinkMessage::GetLink(req), 0, |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                found.get_or_insert(link_of(l));
            }
            Ok(())
        }) {
            Ok(_) => Ok(found),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// IPv4 neighbours (the ARP table) of `ifindex`.
    pub fn ipv4_neighbours(&mut self, ifindex: u32) -> io::Result<Vec<Neigh>> {
        let all = self.dump(
            || RouteNetlinkMessage::GetNeighbour(getneigh(AddressFamily::Inet)),
            neigh_of_reply,
        )?;
        Ok(all.into_iter().filter(|n| n.ifindex == ifindex).collect())
    }

    /// Learned FDB entries of the ports of `bridge` (MAC -> port ifindex);
    /// the ports' own addresses and the bridge's are left out.
    pub fn fdb_learned(&mut self, bridge: u32) -> io::Result<Vec<Neigh>> {
        let all = self.dump(
            || RouteNetlinkMessage::GetNeighbour(getneigh(AddressFamily::Bridge)),
            neigh_of_reply,
        )?;
        Ok(all
            .into_iter()
            .filter(|n| is_learned_on(n, bridge))
            .collect())
    }

    /// Creates `name`, a VXLAN device in external (collect_md) mode on UDP
    /// `port`, without learning, ARP or address, with `mtu`, and sets it
    /// up: `ip link add name type vxlan external dstport port nolearning`.
    /// Fails with `AlreadyExists` if `name` exists.
    pub fn create_vxlan(&mut self, name: &str, port: u16, mtu: u32) -> io::Result<()> {
        let req = RouteNetlinkMessage::NewLink(newvxlan(name, port, mtu));
        self.ack(req, NLM_F_CREATE | NLM_F_EXCL)
    }

    /// The UDP port and external (collect_md) mode of the vxlan device
    /// with `index`; `None` if there is no such device or it is no vxlan.
    pub fn vxlan_of(&mut self, index: u32) -> io::Result<Option<VxlanInfo>> {
        if i32::try_from(index).is_err() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut found = None;
        match self.request(RouteNetlinkMessage::GetLink(getlink(index, None)), 0, |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                found = found.or_else(|| vxlan_info(l));
            }
            Ok(())
        }) {
            Ok(_) => Ok(found),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes the interface with `index`.
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        if i32::try_from(index).is_err() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.ack(RouteNetlinkMessage::DelLink(m), 0)
    }

    /// Adds `dst via gw dev oif` (`dst dev oif` without `gw`) to the main
    /// table, marked as xhost's. Fails with `AlreadyExists` if any route for
    /// `dst` is there: an operator's route is never replaced (nor later
    /// deleted) by xhost.
    pub fn add_route(&mut self, dst: &Ipv4Net, gw: Option<Ipv4Addr>, oif: u32) -> io::Result<()> {
        let req = RouteNetlinkMessage::NewRoute(route(dst, gw, oif));
        self.ack(req, NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Deletes the route `add_route` made.
    pub fn delete_route(
        &mut self,
        dst: &Ipv4Net,
        gw: Option<Ipv4Addr>,
        oif: u32,
    ) -> io::Result<()> {
        self.ack(RouteNetlinkMessage::DelRoute(route(dst, gw, oif)), 0)
    }

    /// Adds the IPv6 route `dst dev oif` (on the link), marked as xhost's;
    /// `AlreadyExists` as [`Self::add_route`]. Linux has no IPv6 route
    /// via an IPv4 next hop (`RTA_VIA` is refused for IPv6, an IPv4 nexthop
    /// object too), so a peer's IPv6 subnet is routed onto the device.
    pub fn add_route6(
        &mut self,
        dst: &Ipv6Net,
        gw: Option<Ipv6Addr>,
        mtu: Option<u32>,
        oif: u32,
    ) -> io::Result<()> {
        let mut m = route6(dst, gw, oif);
        if let Some(mtu) = mtu {
            // Locked (`mtu lock`): the kernel's forwarding goes by an
            // unlocked route MTU for its own packets only.
            m.attributes.push(RouteAttribute::Metrics(vec![
                RouteMetric::Lock(1 << RTAX_MTU),
                RouteMetric::Mtu(mtu),
            ]));
        }
        let req = RouteNetlinkMessage::NewRoute(m);
        self.ack(req, NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Deletes the route `add_route6` made.
    pub fn delete_route6(
        &mut self,
        dst: &Ipv6Net,
        gw: Option<Ipv6Addr>,
        oif: u32,
    ) -> io::Result<()> {
        self.ack(RouteNetlinkMessage::DelRoute(route6(dst, gw, oif)), 0)
    }

    /// `ip neigh replace ip lladdr mac dev ifindex nud reachable`: the
    /// kernel sends what waits in the entry's queue at once, and ages the
    /// entry as if the neighbour had answered.
    pub fn set_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> io::Result<()> {
        let req = RouteNetlinkMessage::NewNeighbour(newneigh(ifindex, ip, mac)?);
        self.ack(req, NLM_F_CREATE | NLM_F_REPLACE)
    }

    /// `ip neigh replace ip dev ifindex use`: asks the kernel to resolve
    /// `ip` on `ifindex` as if a packet were sent to it (`NTF_USE`): an
    /// entry missing or stale is (re)probed, a reachable one is left as it
    /// is, and none is written with a state or MAC of the agent's.
    pub fn use_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr) -> io::Result<()> {
        let req = RouteNetlinkMessage::NewNeighbour(useneigh(ifindex, ip)?);
        self.ack(req, NLM_F_CREATE | NLM_F_REPLACE)
    }

    /// The classic tc filters of `ifindex` under `parent`
    /// ([`TC_PARENT_INGRESS`] or [`TC_PARENT_EGRESS`]); none if the
    /// device has no clsact qdisc.
    pub fn tc_filters(&mut self, ifindex: u32, parent: u32) -> io::Result<Vec<TcFilter>> {
        let index =
            i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let all = match self.dump(
            || {
                let mut m = TcMessage::with_index(index);
                m.header.parent = TcHandle::from(parent);
                RouteNetlinkMessage::GetTrafficFilter(m)
            },
            |m| {
                Ok(match m {
                    RouteNetlinkMessage::NewTrafficFilter(f) => Some(tc_filter_of(f)),
                    _ => None,
                })
            },
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
            || RouteNetlinkMessage::GetQueueDiscipline(TcMessage::with_index(index)),
            |m| {
                Ok(match m {
                    RouteNetlinkMessage::NewQueueDiscipline(q) => Some(q),
                    _ => None,
                })
            },
        )?;
        Ok(all.iter().any(|q| is_clsact_of(q, index)))
    }

    /// `tc qdisc del dev ifindex clsact`: removes the qdisc and every
    /// filter under it.
    pub fn delete_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let index =
            i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut m = TcMessage::with_index(index);
        m.header.handle = TcHandle {
            major: u16::MAX,
            minor: 0,
        };
        m.header.parent = TcHandle::CLSACT;
        m.attributes.push(TcAttribute::Kind("clsact".into()));
        self.ack(RouteNetlinkMessage::DelQueueDiscipline(m), 0)
    }

    /// Swaps the program of the cls_bpf filter `f` (which must exist) for
    /// the program behind `prog_fd`, in place: `tc filter replace` without
    /// `NLM_F_CREATE`, see [`replace_bpf_filter`].
    pub fn replace_bpf_filter(&mut self, f: &BpfFilter<'_>, prog_fd: RawFd) -> io::Result<()> {
        let m = bpf_filter(f, prog_fd)?;
        self.ack(RouteNetlinkMessage::NewTrafficFilter(m), REPLACE_FILTER)
    }

    /// A request the kernel acknowledges.
    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(msg, NLM_F_ACK | flags, |_| Ok(())).map(|_| ())
    }

    /// Runs a dump, restarting it if the kernel says it was interrupted;
    /// `pick` keeps the replies it maps to `Some`.
    fn dump<T>(
        &mut self,
        msg: impl Fn() -> RouteNetlinkMessage,
        mut pick: impl FnMut(RouteNetlinkMessage) -> io::Result<Option<T>>,
    ) -> io::Result<Vec<T>> {
        for _ in 0..DUMP_TRIES {
            let mut out = Vec::new();
            let interrupted = self.request(msg(), NLM_F_DUMP, |m| {
                out.extend(pick(m)?);
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
    /// an acknowledgement, or (not a dump) the first reply. Returns whether
    /// a dump was interrupted.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        mut on: impl FnMut(RouteNetlinkMessage) -> io::Result<()>,
    ) -> io::Result<bool> {
        self.seq = self.seq.wrapping_add(1);
        let req = encode(msg, NLM_F_REQUEST | flags, self.seq);
        self.sock.send(&req, 0)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut interrupted = false;
        let mut replies = 0usize;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let datagram = self
                .buf
                .get(..n)
                .ok_or_else(|| malformed("truncated datagram"))?;
            let reply = parse_replies(datagram, self.seq, &mut interrupted, &mut |m| {
                replies += 1;
                on(m)
            })?;
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
    sock: Socket,
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
    /// An IPv4 neighbour entry was deleted or failed to resolve (or may
    /// have): a peer host's may need resolving again.
    pub neighbour_lost: bool,
}

impl KernelEvents {
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.set_non_blocking(true)?;
        // Legacy `RTMGRP_*` masks of the groups the agent follows.
        let groups = libc::RTMGRP_LINK
            | libc::RTMGRP_NEIGH
            | libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV4_RULE;
        sock.bind(&SocketAddr::new(0, groups.cast_unsigned()))?;
        Ok(Self {
            sock,
            buf: vec![0; RECV_BUF],
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
            neighbour_lost: true,
        };
        loop {
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(changes),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    changes = unknown;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let said = self
                .buf
                .get(..n)
                .and_then(|d| kinds(d).ok())
                .unwrap_or(unknown);
            changes.any |= said.any;
            changes.link_deleted |= said.link_deleted;
            changes.addresses |= said.addresses;
            changes.came_up |= said.came_up;
            changes.neighbour_lost |= said.neighbour_lost;
        }
    }
}

impl AsRawFd for KernelEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// What a datagram of notifications says changed. Only the message types
/// matter, read from each `nlmsghdr`: nothing of a notification can fail
/// to decode but its framing.
fn kinds(mut buf: &[u8]) -> io::Result<Changes> {
    let mut said = Changes {
        any: true,
        ..Changes::default()
    };
    // Not filtered by sequence number: a notification caused by a request
    // carries the requester's (`ip addr add` gives its own, not 0).
    while !buf.is_empty() {
        let m = NetlinkBuffer::new_checked(buf).map_err(|e| malformed(&e.to_string()))?;
        let ty = m.message_type();
        said.link_deleted |= ty == libc::RTM_DELLINK;
        said.addresses |= ty == libc::RTM_NEWADDR || ty == libc::RTM_DELADDR;
        said.came_up |=
            ty == libc::RTM_NEWLINK || ty == libc::RTM_NEWADDR || ty == libc::RTM_NEWROUTE;
        if ty == libc::RTM_DELNEIGH || ty == libc::RTM_NEWNEIGH {
            // `struct ndmsg`: family (1 byte), padding (3), ifindex (4),
            // state (2), ...; one too short to tell counts as lost.
            let ndm = m.payload();
            let family = ndm.first().copied();
            let state = ndm.get(8..10).map(|b| u16::from_ne_bytes([b[0], b[1]]));
            said.neighbour_lost |= family.is_none_or(|f| f == libc::AF_INET as u8)
                && (ty == libc::RTM_DELNEIGH || state.is_none_or(|s| s == libc::NUD_FAILED));
        }
        buf = buf.get(align4(m.length() as usize)..).unwrap_or_default();
    }
    Ok(said)
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink message: {what}"),
    )
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The bytes of `msg` as request `seq`.
fn encode(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// NLMSG_DONE or an ack: the request is complete.
    Done,
    /// More datagrams follow (dumps), or a single reply was consumed.
    More,
}

/// Parses one datagram of replies to request `seq`, handing each message of
/// another type than DONE/ERROR to `on`; replies to earlier requests are
/// skipped unread. Errors reported by the kernel become `io::Error`s with
/// its errno.
fn parse_replies(
    mut buf: &[u8],
    seq: u32,
    interrupted: &mut bool,
    on: &mut dyn FnMut(RouteNetlinkMessage) -> io::Result<()>,
) -> io::Result<Reply> {
    while !buf.is_empty() {
        let frame = NetlinkBuffer::new_checked(buf).map_err(|e| malformed(&e.to_string()))?;
        let len = frame.length() as usize;
        let (msg_seq, flags) = (frame.sequence_number(), frame.flags());
        let this = &buf[..len];
        buf = buf.get(align4(len)..).unwrap_or_default();
        if msg_seq != seq {
            continue; // a late reply to an earlier request
        }
        *interrupted |= flags & NLM_F_DUMP_INTR != 0;
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(this)
            .map_err(|e| malformed(&format!("{e:#}")))?;
        match msg.payload {
            NetlinkPayload::Done(_) => return Ok(Reply::Done),
            NetlinkPayload::Error(e) if e.code.is_none() => return Ok(Reply::Done),
            NetlinkPayload::Error(e) => return Err(e.to_io()),
            NetlinkPayload::InnerMessage(m) => on(m)?,
            _ => {}
        }
    }
    Ok(Reply::More)
}

/// An RTM_GETLINK of one interface (by index or name) or, with neither,
/// of all; the 64-bit statistics left out (smaller replies).
fn getlink(index: u32, name: Option<&str>) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes
        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    if let Some(name) = name {
        m.attributes.push(LinkAttribute::IfName(name.into()));
    }
    m
}

/// The RTM_NEWLINK that creates an external-mode VXLAN device, up and
/// without ARP.
fn newvxlan(name: &str, port: u16, mtu: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    // No multicast: the device joins no IPv6 group it would report (MLD).
    m.header.flags = LinkFlags::Up | LinkFlags::Noarp;
    m.header.change_mask = LinkFlags::Up | LinkFlags::Noarp | LinkFlags::Multicast;
    m.attributes.push(LinkAttribute::IfName(name.into()));
    m.attributes.push(LinkAttribute::Mtu(mtu));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(vec![
            InfoVxlan::CollectMetadata(true),
            InfoVxlan::Learning(false),
            InfoVxlan::Port(port),
        ])),
    ]));
    m
}

/// An RTM_GETNEIGH dump request for `family` (IPv4 or the bridge FDB).
fn getneigh(family: AddressFamily) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m
}

/// The RTM_NEWNEIGH (create or replace) of a reachable IPv4 neighbour.
fn newneigh(ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> io::Result<NeighbourMessage> {
    if i32::try_from(ifindex).is_err() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Reachable;
    m.header.kind = RouteType::Unicast;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    Ok(m)
}

/// The RTM_NEWNEIGH of `ip neigh replace ip dev ifindex use`.
fn useneigh(ifindex: u32, ip: Ipv4Addr) -> io::Result<NeighbourMessage> {
    if i32::try_from(ifindex).is_err() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::None;
    m.header.flags = NeighbourFlags::Use;
    m.header.kind = RouteType::Unicast;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    Ok(m)
}

/// xhost's route to `dst` in the main table: via `gw` if given, else on
/// the link of `oif`.
fn route(dst: &Ipv4Net, gw: Option<Ipv4Addr>, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::from(XHOST_RTPROT);
    // A route without a gateway reaches its prefix on the link.
    m.header.scope = if gw.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    m.header.kind = RouteType::Unicast;
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(dst.addr())));
    if let Some(gw) = gw {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    m
}

/// `RTAX_MTU` from the kernel's rtnetlink.h: the route metric of the MTU
/// (its bit in `RTAX_LOCK` locks it).
const RTAX_MTU: u32 = 2;

/// xhost's IPv6 route to `dst` in the main table, via `gw` or (none) on
/// the link of `oif`.
fn route6(dst: &Ipv6Net, gw: Option<Ipv6Addr>, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet6;
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::from(XHOST_RTPROT);
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet6(dst.addr())));
    if let Some(gw) = gw {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet6(gw)));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    m
}

/// The facts of an `RTM_NEWLINK` the agent reads.
fn link_of(m: LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        ..Link::default()
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(a) => link.mac = a.as_slice().try_into().ok(),
            LinkAttribute::Link(i) => link.link = Some(i).filter(|&i| i != 0),
            LinkAttribute::Controller(i) => link.master = Some(i).filter(|&i| i != 0),
            LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.into_iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    link
}

/// What a vxlan device's `IFLA_INFO_DATA` says of its UDP port and mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanInfo {
    pub port: Option<u16>,
    pub external: bool,
}

fn vxlan_info(m: LinkMessage) -> Option<VxlanInfo> {
    let infos = m.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    let data = infos.into_iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    })?;
    let mut info = VxlanInfo {
        port: None,
        external: false,
    };
    for d in data {
        match d {
            InfoVxlan::Port(p) => info.port = Some(p),
            InfoVxlan::CollectMetadata(on) => info.external = on,
            _ => {}
        }
    }
    Some(info)
}

fn neigh_of_reply(m: RouteNetlinkMessage) -> io::Result<Option<Neigh>> {
    Ok(match m {
        RouteNetlinkMessage::NewNeighbour(n) => Some(neigh_of(n)),
        _ => None,
    })
}

/// The facts of an `RTM_NEWNEIGH` the agent reads.
fn neigh_of(m: NeighbourMessage) -> Neigh {
    let mut n = Neigh {
        ifindex: m.header.ifindex,
        state: u16::from(m.header.state),
        flags: m.header.flags.bits(),
        ..Neigh::default()
    };
    for a in m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => n.dst = Some(ip),
            NeighbourAttribute::LinkLayerAddress(a) => n.lladdr = a.as_slice().try_into().ok(),
            NeighbourAttribute::Controller(i) => n.master = Some(i).filter(|&i| i != 0),
            _ => {}
        }
    }
    n
}

/// Whether FDB entry `n` was learned on a port of `bridge`: not a port's
/// own address (`self`) nor the bridge's (permanent).
fn is_learned_on(n: &Neigh, bridge: u32) -> bool {
    n.master == Some(bridge)
        && n.flags & NeighbourFlags::Own.bits() == 0
        && n.state & libc::NUD_PERMANENT == 0
}

/// The facts of an `RTM_NEWTFILTER` the agent reads.
/// A classic tc cls_bpf filter in direct-action mode, by the key the
/// kernel finds it by: device, parent, priority, protocol (always
/// `ETH_P_ALL`) and handle.
#[derive(Clone, Copy, Debug)]
pub struct BpfFilter<'a> {
    pub ifindex: u32,
    /// [`TC_PARENT_INGRESS`] or [`TC_PARENT_EGRESS`].
    pub parent: u32,
    pub priority: u16,
    pub handle: u32,
    /// The filter's name (`TCA_BPF_NAME`): the program's.
    pub name: &'a str,
}

/// Flags of the in-place program swap: `NLM_F_REPLACE` without
/// `NLM_F_CREATE` or `NLM_F_EXCL`. The kernel (`tc_new_tfilter`) finds the
/// filter by parent, priority, protocol and handle and hands it to
/// cls_bpf's `change`, which builds the new filter and puts it in the old
/// one's place in the classifier's list with `list_replace_rcu`: a packet
/// runs either the old program or the new one, never neither. Without
/// `NLM_F_CREATE`, a filter that is gone is an error (`ENOENT`) rather
/// than added again; with `NLM_F_EXCL` an existing one would be refused.
pub const REPLACE_FILTER: u16 = NLM_F_REPLACE;

/// `tcm_info` of a filter: priority in the upper 16 bits, protocol
/// (`ETH_P_ALL`, network byte order) in the lower, as aya attaches them.
fn filter_info(priority: u16) -> u32 {
    (u32::from(priority) << 16) | u32::from((libc::ETH_P_ALL as u16).to_be())
}

/// The RTM_NEWTFILTER body for `f` running `prog_fd`.
fn bpf_filter(f: &BpfFilter<'_>, prog_fd: RawFd) -> io::Result<TcMessage> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
    let index = i32::try_from(f.ifindex).map_err(|_| invalid("ifindex out of range"))?;
    let fd = u32::try_from(prog_fd).map_err(|_| invalid("negative program fd"))?;
    let mut m = TcMessage::with_index(index);
    m.header.parent = TcHandle::from(f.parent);
    m.header.handle = TcHandle::from(f.handle);
    m.header.info = filter_info(f.priority);
    m.attributes.push(TcAttribute::Kind("bpf".into()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::ProgFd(fd)),
        TcOption::Bpf(TcFilterBpfOption::ProgName(f.name.to_owned())),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    Ok(m)
}

fn tc_filter_of(m: TcMessage) -> TcFilter {
    // tcm_info: priority in the upper 16 bits, protocol in the lower.
    let mut f = TcFilter {
        priority: (m.header.info >> 16) as u16,
        handle: u32::from(m.header.handle),
        ..TcFilter::default()
    };
    for a in m.attributes {
        match a {
            TcAttribute::Kind(k) => f.kind = k,
            TcAttribute::Options(opts) => {
                for o in opts {
                    match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => f.bpf_name = Some(n),
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => f.bpf_id = Some(id),
                        TcOption::Bpf(TcFilterBpfOption::Flags(fl)) => {
                            f.direct_action = fl.contains(TcBpfFlags::DirectAction);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    f
}

/// Whether qdisc `q` is the clsact qdisc of `index`.
fn is_clsact_of(q: &TcMessage, index: i32) -> bool {
    q.header.index == index
        && q.header.parent == TcHandle::CLSACT
        && q.attributes
            .iter()
            .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nix::sys::socket::{
        AddressFamily as Af, MsgFlags, SockFlag, SockProtocol, SockType, recv, socket,
    };

    use super::*;

    // Messages as the kernel lays them out (<linux/netlink.h>,
    // <linux/rtnetlink.h>), built byte by byte: what the crate decodes and
    // this module translates is checked against the kernel's format, not
    // against the crate's own encoder.

    /// A `struct nlmsghdr` with the length left to `finish`.
    fn header(ty: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m
    }

    fn finish(m: &mut [u8]) {
        let len = u32::try_from(m.len()).expect("small");
        m[..4].copy_from_slice(&len.to_ne_bytes());
    }

    fn push_attr(m: &mut Vec<u8>, ty: u16, data: &[u8]) {
        let len = u16::try_from(4 + data.len()).expect("small");
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(data);
        m.resize(align4(m.len()), 0);
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_ne_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    /// An RTM_NEWLINK of a veth port of bridge 7.
    fn newlink(
        seq: u32,
        flags: u16,
        index: i32,
        name: &str,
        mac: [u8; 6],
        link: Option<u32>,
    ) -> Vec<u8> {
        let mut m = header(libc::RTM_NEWLINK, flags, seq);
        m.extend_from_slice(&[0, 0, 1, 0]); // family, pad, type ARPHRD_ETHER
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&[0; 8]); // flags, change
        let mut ifname = name.as_bytes().to_vec();
        ifname.push(0);
        push_attr(&mut m, 3, &ifname); // IFLA_IFNAME
        push_attr(&mut m, 1, &mac); // IFLA_ADDRESS
        push_attr(&mut m, 4, &1500u32.to_ne_bytes()); // IFLA_MTU
        if let Some(l) = link {
            push_attr(&mut m, 5, &l.to_ne_bytes()); // IFLA_LINK
        }
        push_attr(&mut m, 10, &7u32.to_ne_bytes()); // IFLA_MASTER
        let mut info = Vec::new();
        push_attr(&mut info, 1, b"veth\0"); // IFLA_INFO_KIND
        push_attr(&mut m, 18 | 0x8000, &info); // IFLA_LINKINFO, NLA_F_NESTED
        finish(&mut m);
        m
    }

    /// NLMSG_DONE, or NLMSG_ERROR with `error` (0: an ack).
    fn control(seq: u32, ty: u16, error: i32) -> Vec<u8> {
        let mut m = header(ty, 0, seq);
        m.extend_from_slice(&error.to_ne_bytes());
        if ty == 2 {
            // NLMSG_ERROR: the request's header follows.
            m.extend(header(libc::RTM_NEWROUTE, 0, seq));
        }
        finish(&mut m);
        m
    }

    /// Every message of `buf` (request `seq`), through the reply loop.
    fn replies(buf: &[u8], seq: u32) -> io::Result<(Reply, bool, Vec<RouteNetlinkMessage>)> {
        let (mut intr, mut seen) = (false, Vec::new());
        let r = parse_replies(buf, seq, &mut intr, &mut |m| {
            seen.push(m);
            Ok(())
        })?;
        Ok((r, intr, seen))
    }

    #[test]
    fn parses_a_dump() {
        let mut buf = newlink(7, 0x2, 42, "eth0", [2, 0x42, 192, 168, 110, 2], Some(4));
        buf.extend(newlink(6, 0x2, 43, "stale", [0; 6], None)); // other request: skipped
        buf.extend(newlink(7, 0x2 | 0x10, 1, "lo", [0; 6], None));
        buf.extend(control(7, 3, 0)); // NLMSG_DONE
        let (r, intr, seen) = replies(&buf, 7).expect("parse");
        assert_eq!(r, Reply::Done);
        assert!(intr, "NLM_F_DUMP_INTR seen");
        let links: Vec<Link> = seen
            .into_iter()
            .map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => link_of(l),
                m => panic!("not a link: {m:?}"),
            })
            .collect();
        assert_eq!(links.len(), 2);
        assert_eq!(
            links[0],
            Link {
                index: 42,
                name: "eth0".into(),
                mac: Some([2, 0x42, 192, 168, 110, 2]),
                link: Some(4),
                master: Some(7),
                kind: Some("veth".into()),
                mtu: Some(1500),
            }
        );
        assert_eq!(links[1].link, None);
        // A dump goes on in the next datagram until NLMSG_DONE.
        let (r, _, _) = replies(&newlink(7, 0x2, 42, "eth0", [2; 6], None), 7).expect("parse");
        assert_eq!(r, Reply::More);
    }

    #[test]
    fn kernel_errors_become_errnos() {
        let err = replies(&control(3, 2, -libc::ENODEV), 3).expect_err("ENODEV");
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        assert_eq!(replies(&control(3, 2, 0), 3).expect("ack").0, Reply::Done);
        // An error for an earlier request is not this one's.
        assert_eq!(
            replies(&control(2, 2, -libc::EEXIST), 3)
                .expect("skipped")
                .0,
            Reply::More
        );
        let mut truncated = newlink(3, 0, 1, "x", [0; 6], None);
        truncated.truncate(20);
        let e = replies(&truncated, 3).expect_err("truncated");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut lying = newlink(3, 0, 1, "x", [0; 6], None);
        lying[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(replies(&lying, 3).is_err(), "length past the datagram");
    }

    /// An RTM_NEWNEIGH for an FDB entry or an IPv4 neighbour.
    fn newneigh_msg(
        family: u8,
        ifindex: i32,
        state: u16,
        flags: u8,
        dst: Option<[u8; 4]>,
        mac: [u8; 6],
        master: Option<u32>,
    ) -> Vec<u8> {
        let mut m = header(libc::RTM_NEWNEIGH, 0x2, 5);
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(&ifindex.to_ne_bytes());
        m.extend_from_slice(&state.to_ne_bytes());
        m.extend_from_slice(&[flags, 0]);
        if let Some(d) = dst {
            push_attr(&mut m, 1, &d); // NDA_DST
        }
        push_attr(&mut m, 2, &mac); // NDA_LLADDR
        if let Some(b) = master {
            push_attr(&mut m, 9, &b.to_ne_bytes()); // NDA_MASTER
        }
        finish(&mut m);
        m
    }

    #[test]
    fn parses_neighbours_and_fdb_entries() {
        let mac = [2, 0x42, 0, 0, 0, 0x0b];
        let mut buf = newneigh_msg(2, 3, 0x02, 0, Some([192, 168, 110, 11]), mac, None);
        buf.extend(newneigh_msg(7, 9, 0x02, 0, None, mac, Some(3)));
        buf.extend(newneigh_msg(7, 9, 0x80, 0, None, [2; 6], Some(3))); // permanent
        buf.extend(newneigh_msg(7, 9, 0x02, 0x02, None, [3; 6], Some(3))); // self
        buf.extend(newneigh_msg(7, 10, 0x02, 0, None, [4; 6], Some(4))); // other bridge
        buf.extend(control(5, 3, 0));
        let (_, _, msgs) = replies(&buf, 5).expect("parse");
        let seen: Vec<Neigh> = msgs
            .into_iter()
            .map(|m| neigh_of_reply(m).expect("ok").expect("a neighbour"))
            .collect();
        assert_eq!(seen[0].dst, Some(Ipv4Addr::new(192, 168, 110, 11)));
        assert_eq!((seen[0].ifindex, seen[0].state), (3, 0x02));
        assert_eq!(
            (seen[1].ifindex, seen[1].master, seen[1].dst),
            (9, Some(3), None)
        );
        assert_eq!(seen[1].lladdr, Some(mac));
        let learned: Vec<_> = seen.iter().filter(|n| is_learned_on(n, 3)).collect();
        assert_eq!(learned, [&seen[1]], "only what bridge 3 learned");
    }

    /// An RTM_NEWTFILTER (cls_bpf, or another classifier) or RTM_NEWQDISC.
    fn tcmsg(ty: u16, index: i32, handle: u32, parent: u32, info: u32, kind: &str) -> Vec<u8> {
        let mut m = header(ty, 0x2, 8);
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&handle.to_ne_bytes());
        m.extend_from_slice(&parent.to_ne_bytes());
        m.extend_from_slice(&info.to_ne_bytes());
        let mut k = kind.as_bytes().to_vec();
        k.push(0);
        push_attr(&mut m, 1, &k); // TCA_KIND
        if kind == "bpf" && handle != 0 {
            let mut opts = Vec::new();
            push_attr(&mut opts, 7, b"xhost_bridge_in\0"); // TCA_BPF_NAME
            push_attr(&mut opts, 8, &1u32.to_ne_bytes()); // TCA_BPF_FLAGS: direct action
            push_attr(&mut opts, 11, &77u32.to_ne_bytes()); // TCA_BPF_ID
            push_attr(&mut m, 2 | 0x8000, &opts); // TCA_OPTIONS
        }
        finish(&mut m);
        m
    }

    #[test]
    fn parses_tc_filters_and_qdiscs() {
        // `tc filter add dev X ingress pref 49152 handle 1 bpf da ...`, ETH_P_ALL.
        let info = (49152 << 16) | u32::from(0x0003u16.to_be());
        let mut buf = tcmsg(libc::RTM_NEWTFILTER, 4, 0, TC_PARENT_INGRESS, info, "bpf");
        buf.extend(tcmsg(
            libc::RTM_NEWTFILTER,
            4,
            1,
            TC_PARENT_INGRESS,
            info,
            "bpf",
        ));
        buf.extend(tcmsg(
            libc::RTM_NEWQDISC,
            4,
            0xffff_0000,
            0xffff_fff1,
            0,
            "clsact",
        ));
        buf.extend(tcmsg(libc::RTM_NEWQDISC, 5, 0, 0xffff_ffff, 0, "noqueue"));
        let (_, _, msgs) = replies(&buf, 8).expect("parse");
        let mut it = msgs.into_iter();
        let mut filter = || match it.next() {
            Some(RouteNetlinkMessage::NewTrafficFilter(f)) => tc_filter_of(f),
            m => panic!("not a filter: {m:?}"),
        };
        assert_eq!(filter().handle, 0, "the classifier itself");
        assert_eq!(
            filter(),
            TcFilter {
                priority: 49152,
                handle: 1,
                kind: "bpf".into(),
                bpf_name: Some("xhost_bridge_in".into()),
                bpf_id: Some(77),
                direct_action: true,
            }
        );
        let qdiscs: Vec<TcMessage> = it
            .map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q) => q,
                m => panic!("not a qdisc: {m:?}"),
            })
            .collect();
        assert!(is_clsact_of(&qdiscs[0], 4));
        assert!(!is_clsact_of(&qdiscs[0], 5), "another device's");
        assert!(!is_clsact_of(&qdiscs[1], 5), "not clsact");
    }

    #[test]
    fn request_layout() {
        let m = encode(
            RouteNetlinkMessage::GetLink(getlink(0, Some("docker0"))),
            NLM_F_REQUEST | NLM_F_DUMP,
            9,
        );
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), libc::RTM_GETLINK);
        assert_eq!(u16_at(&m, 6), 0x301);
        assert_eq!(u32_at(&m, 8), 9);
        assert_eq!(m.len() % 4, 0);
        assert!(m.windows(8).any(|w| w == b"docker0\0"));
    }

    #[test]
    fn route_request_layout() {
        let dst: Ipv4Net = "10.1.2.0/24".parse().expect("cidr");
        let gw = Ipv4Addr::new(192, 168, 1, 2);
        let m = encode(
            RouteNetlinkMessage::NewRoute(route(&dst, Some(gw), 5)),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            3,
        );
        assert_eq!(u16_at(&m, 4), libc::RTM_NEWROUTE);
        assert_eq!(u16_at(&m, 6), 0x605);
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type.
        assert_eq!(
            m[16..24],
            [libc::AF_INET as u8, 24, 0, 0, 254, XHOST_RTPROT, 0, 1]
        );
        assert!(
            m.windows(8).any(|w| w == [8, 0, 1, 0, 10, 1, 2, 0]),
            "RTA_DST"
        );
        assert!(
            m.windows(8).any(|w| w == [8, 0, 5, 0, 192, 168, 1, 2]),
            "RTA_GATEWAY"
        );
        let onlink = encode(
            RouteNetlinkMessage::DelRoute(route(&dst, None, 5)),
            NLM_F_REQUEST | NLM_F_ACK,
            4,
        );
        assert_eq!(u16_at(&onlink, 4), libc::RTM_DELROUTE);
        assert_eq!(onlink[22], 253, "scope link");
        assert!(!onlink.windows(4).any(|w| w == [8, 0, 5, 0]), "no gateway");
    }

    #[test]
    fn route6_request_layout() {
        let dst: Ipv6Net = "fd00:b::/64".parse().expect("cidr");
        let m = encode(
            RouteNetlinkMessage::NewRoute(route6(&dst, None, 5)),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            3,
        );
        assert_eq!(u16_at(&m, 4), libc::RTM_NEWROUTE);
        assert_eq!(
            m[16..24],
            [libc::AF_INET6 as u8, 64, 0, 0, 254, XHOST_RTPROT, 0, 1]
        );
        let mut rta_dst = vec![20, 0, 1, 0];
        rta_dst.extend(dst.addr().octets());
        assert!(m.windows(20).any(|w| w == rta_dst), "RTA_DST");
        assert!(
            m.windows(8).any(|w| w == [8, 0, 4, 0, 5, 0, 0, 0]),
            "RTA_OIF"
        );
        assert!(!m.windows(4).any(|w| w == [20, 0, 5, 0]), "no RTA_GATEWAY");
        let del = encode(
            RouteNetlinkMessage::DelRoute(route6(&dst, None, 5)),
            NLM_F_REQUEST | NLM_F_ACK,
            4,
        );
        assert_eq!(u16_at(&del, 4), libc::RTM_DELROUTE);
        // Via a peer host on an IPv6 underlay: RTA_GATEWAY, 16 bytes.
        let gw: Ipv6Addr = "fd00::2".parse().expect("address");
        let via = encode(
            RouteNetlinkMessage::NewRoute(route6(&dst, Some(gw), 5)),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            5,
        );
        let mut rta_gw = vec![20, 0, 5, 0];
        rta_gw.extend(gw.octets());
        assert!(via.windows(20).any(|w| w == rta_gw), "RTA_GATEWAY");
    }

    /// What adoption reads of the device is what its creation wrote (the
    /// kernel answers RTM_GETLINK with the same IFLA_INFO_DATA); another
    /// kind of link has no vxlan facts.
    #[test]
    fn vxlan_facts_read_back() {
        let info = vxlan_info(newvxlan("xhost_vxlan", 4789, 1450));
        assert_eq!(
            info,
            Some(VxlanInfo {
                port: Some(4789),
                external: true
            })
        );
        let mut bridge = LinkMessage::default();
        bridge
            .attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        assert_eq!(vxlan_info(bridge), None);
    }

    #[test]
    fn vxlan_request_layout() {
        let m = encode(
            RouteNetlinkMessage::NewLink(newvxlan("xhost_vxlan", 4789, 1450)),
            NLM_F_REQUEST,
            1,
        );
        assert_eq!(u16_at(&m, 4), libc::RTM_NEWLINK);
        // Up, no ARP, and multicast off (in the change mask, not in the flags).
        let up = (libc::IFF_UP | libc::IFF_NOARP) as u32;
        let change = up | libc::IFF_MULTICAST as u32;
        assert_eq!(
            (u32_at(&m, 24), u32_at(&m, 28)),
            (up, change),
            "flags, change"
        );
        assert!(m.windows(6).any(|w| w == b"vxlan\0"));
        // IFLA_VXLAN_PORT, the one attribute in network byte order.
        let port = 4789u16.to_be_bytes();
        assert!(m.windows(6).any(|w| w == [6, 0, 15, 0, port[0], port[1]]));
        assert!(
            m.windows(5).any(|w| w == [5, 0, 25, 0, 1]),
            "collect metadata"
        );
        assert!(m.windows(5).any(|w| w == [5, 0, 7, 0, 0]), "no learning");
    }

    #[test]
    fn neighbour_request_layout() {
        let ip = Ipv4Addr::new(192, 168, 110, 7);
        let mac = [2, 0x42, 0xc0, 0xa8, 0x6e, 7];
        let req = RouteNetlinkMessage::NewNeighbour(newneigh(12, ip, mac).expect("request"));
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        let m = encode(req, flags, 4);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), libc::RTM_NEWNEIGH);
        assert_eq!(u16_at(&m, 6), flags);
        assert_eq!(m[16], libc::AF_INET as u8);
        // The kernel reads it back as the neighbour it asks for.
        let (_, _, msgs) = replies(&m, 4).expect("parse");
        let n = msgs
            .into_iter()
            .find_map(|m| neigh_of_reply(m).expect("ok"))
            .expect("a neighbour");
        assert_eq!(
            (n.ifindex, n.state, n.dst, n.lladdr),
            (12, NUD_REACHABLE, Some(ip), Some(mac))
        );
        assert!(newneigh(u32::MAX, ip, mac).is_err(), "ifindex out of range");
    }

    #[test]
    fn neighbour_use_request_layout() {
        let ip = Ipv4Addr::new(172, 16, 91, 132);
        let req = RouteNetlinkMessage::NewNeighbour(useneigh(3, ip).expect("request"));
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        let m = encode(req, flags, 9);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), libc::RTM_NEWNEIGH);
        assert_eq!(u16_at(&m, 6), flags);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(u32_at(&m, 20), 3, "ifindex");
        assert_eq!(u16_at(&m, 24), 0, "no state of the agent's (NUD_NONE)");
        assert_eq!(m[26], 1, "NTF_USE");
        // NDA_DST and no NDA_LLADDR: the kernel finds the MAC itself.
        assert!(
            m.windows(8).any(|w| w == [8, 0, 1, 0, 172, 16, 91, 132]),
            "NDA_DST"
        );
        assert!(!m.windows(4).any(|w| w == [10, 0, 2, 0]), "no NDA_LLADDR");
        assert!(useneigh(u32::MAX, ip).is_err(), "ifindex out of range");
    }

    #[test]
    fn filter_replace_request_layout() {
        let f = BpfFilter {
            ifindex: 7,
            parent: TC_PARENT_INGRESS,
            priority: 0x7868,
            handle: 3,
            name: "xhost_veth_in",
        };
        let req = RouteNetlinkMessage::NewTrafficFilter(bpf_filter(&f, 42).expect("request"));
        let m = encode(req, NLM_F_REQUEST | NLM_F_ACK | REPLACE_FILTER, 6);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(m.len() % 4, 0);
        assert_eq!(u16_at(&m, 4), libc::RTM_NEWTFILTER);
        // REQUEST | ACK | REPLACE: no CREATE (a gone filter is not added
        // again) and no EXCL (an existing one is what is asked for).
        assert_eq!(u16_at(&m, 6), 0x105);
        // struct tcmsg: family, pad, ifindex, handle, parent, info.
        assert_eq!(m[16], 0, "AF_UNSPEC");
        assert_eq!(u32_at(&m, 20), 7);
        assert_eq!(u32_at(&m, 24), 3, "handle");
        assert_eq!(u32_at(&m, 28), 0xffff_fff2, "clsact ingress");
        assert_eq!(u32_at(&m, 32), (0x7868 << 16) | 0x0300, "pref, ETH_P_ALL");
        assert!(m.windows(8).any(|w| w == [8, 0, 1, 0, b'b', b'p', b'f', 0]));
        // Inside TCA_OPTIONS: TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS (direct action).
        assert!(m.windows(8).any(|w| w == [8, 0, 6, 0, 42, 0, 0, 0]), "fd");
        assert!(m.windows(4).any(|w| w == [18, 0, 7, 0]), "name");
        assert!(m.windows(14).any(|w| w == b"xhost_veth_in\0"));
        assert!(m.windows(8).any(|w| w == [8, 0, 8, 0, 1, 0, 0, 0]), "da");
        // The kernel's dump of it reads back as the same filter.
        let (_, _, msgs) = replies(&m, 6).expect("parse");
        let Some(RouteNetlinkMessage::NewTrafficFilter(back)) = msgs.into_iter().next() else {
            panic!("not a filter");
        };
        let back = tc_filter_of(back);
        assert_eq!(
            (back.priority, back.handle, back.kind.as_str()),
            (0x7868, 3, "bpf")
        );
        assert_eq!(back.bpf_name.as_deref(), Some("xhost_veth_in"));
        assert!(back.direct_action);
        assert!(bpf_filter(&f, -1).is_err(), "no program");
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
                Af::Packet,
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

    /// Works unprivileged: no socket, only the framing of notifications.
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
        let del = [new.clone(), retyped(libc::RTM_DELLINK)].concat();
        assert_eq!(
            kinds(&del).expect("parse"),
            Changes {
                link_deleted: true,
                ..only_any
            }
        );
        for ty in [libc::RTM_NEWADDR, libc::RTM_DELADDR] {
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

    /// Works unprivileged: an IPv4 neighbour deleted or failed is told
    /// apart from one that resolved, and from IPv6's.
    #[test]
    fn notifications_tell_lost_ipv4_neighbours() {
        // `nlmsghdr` and `ndmsg`: family, ifindex 5, state.
        let neigh = |ty: u16, family: i32, state: u16| {
            let mut m = vec![0u8; 28];
            m[0..4].copy_from_slice(&28u32.to_ne_bytes());
            m[4..6].copy_from_slice(&ty.to_ne_bytes());
            m[16] = family as u8;
            m[20..24].copy_from_slice(&5i32.to_ne_bytes());
            m[24..26].copy_from_slice(&state.to_ne_bytes());
            m
        };
        let lost = |m: Vec<u8>| kinds(&m).expect("parse").neighbour_lost;
        let (new, del, v4, v6) = (
            libc::RTM_NEWNEIGH,
            libc::RTM_DELNEIGH,
            libc::AF_INET,
            libc::AF_INET6,
        );
        assert!(lost(neigh(del, v4, libc::NUD_STALE)), "deleted");
        assert!(lost(neigh(new, v4, libc::NUD_FAILED)), "failed");
        for state in [
            libc::NUD_REACHABLE,
            libc::NUD_STALE,
            libc::NUD_INCOMPLETE,
            libc::NUD_PROBE,
        ] {
            assert!(!lost(neigh(new, v4, state)), "state {state:#x}");
        }
        assert!(!lost(neigh(del, v6, libc::NUD_STALE)), "IPv6's");
        assert!(!lost(neigh(new, v6, libc::NUD_FAILED)), "IPv6's");
        // One too short to tell: lost, to be safe.
        let mut short = neigh(new, v4, libc::NUD_REACHABLE);
        short.truncate(20);
        short[0..4].copy_from_slice(&20u32.to_ne_bytes());
        assert!(lost(short), "too short");
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
                // A peer host's entry may need resolving again.
                (
                    &["neigh", "del", "10.77.0.2", "dev", "xh-ev0"],
                    Changes {
                        neighbour_lost: true,
                        ..changed
                    },
                ),
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
