//! Types shared by the xhost eBPF datapath and its user-space agent.
//!
//! Every type here crosses the kernel/user boundary through a BPF map, so
//! each is `#[repr(C)]`, `Copy`, has no implicit padding (explicit `_pad`
//! fields) and has its size asserted at compile time. Addresses are kept in
//! network byte order as `[u8; N]` so that both sides read them the same way
//! and `bpftool map dump` prints them byte by byte.
#![no_std]

use core::mem::size_of;

/// Name of the LPM trie from remote container prefixes to the peer host that
/// owns them (`cilium_ipcache`-like). Pinned under the pin dir by this name.
pub const MAP_ROUTES: &str = "ROUTES";
/// Name of the LPM trie holding this host's own container subnets.
pub const MAP_LOCAL_NETS: &str = "LOCAL_NETS";
/// Name of the hash map from a local container IP to its veth endpoint.
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// Name of the LPM trie from remote container IPv6 prefixes to the peer
/// host that owns them: `ROUTES` for IPv6. The value is a `Peer6`, whose
/// host is the peer's IPv6 underlay address or its IPv4 one (mapped,
/// `::ffff:a.b.c.d`).
pub const MAP_ROUTES6: &str = "ROUTES6";
/// Name of the LPM trie holding this host's own IPv6 container subnets.
pub const MAP_LOCAL_NETS6: &str = "LOCAL_NETS6";
/// Name of the hash map from a local container's IPv6 address to its veth
/// endpoint (`ENDPOINTS` for IPv6, sized with it by `--max-endpoints`).
pub const MAP_ENDPOINTS6: &str = "ENDPOINTS6";
/// Name of the hash set of peer host (underlay) addresses.
pub const MAP_PEER_HOSTS: &str = "PEER_HOSTS";
/// Name of the hash set of the peer hosts reached over an IPv6 underlay
/// (`PEER_HOSTS` for IPv6 addresses; both share the `PEER_STATS` slots).
pub const MAP_PEER_HOSTS6: &str = "PEER_HOSTS6";
/// Name of the per-CPU array of packet/byte counters.
pub const MAP_STATS: &str = "STATS";
/// Name of the one-slot array holding the datapath's generation (a `u64`).
/// The datapath caches answers per CPU (`ROUTES` per address, whole
/// forwarding decisions per flow) and drops those read under an older
/// generation. Whoever writes `ROUTES`, `ENDPOINTS`, `ROUTES6` or
/// `ENDPOINTS6` bumps it afterwards,
/// and the agent bumps it after every route, rule, neighbour, address or
/// link change the kernel reports.
pub const MAP_DATAPATH_GEN: &str = "DATAPATH_GEN";
/// Name of the hash map from this host's IPv4 addresses on the underlay
/// (network order) to the underlay's ifindex: where VXLAN packets from
/// peers may be addressed for the datapath to decapsulate them itself.
pub const MAP_UNDERLAY_ADDRS: &str = "UNDERLAY_ADDRS";
/// Name of the hash map from the ifindex of a known endpoint's veth to
/// `ARMED`: on such a veth `xhost_veth_in` drops every source for a peer
/// that is not its endpoint's. Written after the veth's endpoint, removed
/// before it, so a veth whose endpoint is not (or no longer) written hands
/// what it does not know on to the bridge, which checks it there.
pub const MAP_ENDPOINT_PORTS: &str = "ENDPOINT_PORTS";
/// Value of `ENDPOINT_PORTS`.
pub const ARMED: u32 = 1;
/// Name of the per-CPU array of packet and byte counters per peer host,
/// indexed by the peer's `PeerHost::slot`: what the datapath forwarded to
/// it (`tx`) and delivered from it (`rx`).
pub const MAP_PEER_STATS: &str = "PEER_STATS";
/// Version of what the pinned maps' entries mean. A load adopts pins
/// only when their shapes (type, key/value size, capacity) and this
/// version match its own: bump it when a value's meaning changes at the
/// same size.
pub const MAP_LAYOUT_VERSION: u32 = 1;
/// Every map the agent pins, in a fixed order.
pub const PINNED_MAPS: [&str; 13] = [
    MAP_ROUTES,
    MAP_LOCAL_NETS,
    MAP_ENDPOINTS,
    MAP_PEER_HOSTS,
    MAP_STATS,
    MAP_DATAPATH_GEN,
    MAP_UNDERLAY_ADDRS,
    MAP_ENDPOINT_PORTS,
    MAP_PEER_STATS,
    MAP_ROUTES6,
    MAP_LOCAL_NETS6,
    MAP_ENDPOINTS6,
    MAP_PEER_HOSTS6,
];

/// Capacity of `ROUTES`: enough for the 100 000-route scale benchmark.
pub const MAX_ROUTES: u32 = 131_072;
/// Slots per CPU of the datapath's `ROUTES` answer cache (a power of two).
pub const ROUTE_CACHE_SLOTS: u32 = 4_096;
const _: () = assert!(ROUTE_CACHE_SLOTS.is_power_of_two());
/// Slots per CPU of the datapath's forwarding answer cache (a power of two).
pub const FLOW_CACHE_SLOTS: u32 = 1_024;
const _: () = assert!(FLOW_CACHE_SLOTS.is_power_of_two());
/// Capacity of `LOCAL_NETS`.
pub const MAX_LOCAL_NETS: u32 = 1_024;
/// Capacity of `ENDPOINTS` (local containers).
pub const MAX_ENDPOINTS: u32 = 65_536;
/// Capacity of `ROUTES6`.
pub const MAX_ROUTES6: u32 = 16_384;
/// Capacity of `LOCAL_NETS6`.
pub const MAX_LOCAL_NETS6: u32 = MAX_LOCAL_NETS;

/// Capacity of `PEER_HOSTS`.
pub const MAX_PEER_HOSTS: u32 = 16_384;
/// Capacity of `UNDERLAY_ADDRS`: addresses beyond it are left out (their
/// VXLAN packets are decapsulated by the kernel's device instead).
pub const MAX_UNDERLAY_ADDRS: u32 = 64;

/// Program names, as the loader looks them up in the object.
pub const PROG_BRIDGE_IN: &str = "xhost_bridge_in";
pub const PROG_VETH_IN: &str = "xhost_veth_in";
pub const PROG_NIC_IN: &str = "xhost_nic_in";
pub const PROG_NIC_XDP: &str = "xhost_nic_xdp";
pub const PROG_VXLAN_OUT: &str = "xhost_vxlan_out";
pub const PROG_VXLAN_IN: &str = "xhost_vxlan_in";

/// Constants of the object the loader sets (VXLAN mode): the vxlan
/// device's ifindex (0: native routing), the VNI and the UDP port the
/// datapath sends its own encapsulated packets to.
pub const GLOBAL_TUNNEL_IFINDEX: &str = "TUNNEL_IFINDEX";
pub const GLOBAL_TUNNEL_VNI: &str = "TUNNEL_VNI";
pub const GLOBAL_TUNNEL_PORT: &str = "TUNNEL_PORT";
/// Which newer helpers the kernel has (`HELPER_*` bits), set by the loader
/// from a probe. The object's default is all of them; where one is missing
/// the programs take the next best path, and the verifier (which never
/// looks at a branch a read-only constant rules out) does not see the call.
pub const GLOBAL_HELPERS: &str = "HELPERS";
/// `bpf_check_mtu` (Linux 5.12). Without it a GSO burst other than TCP's,
/// whose segments only the kernel can measure, is left to the kernel.
pub const HELPER_CHECK_MTU: u32 = 1 << 0;
/// `bpf_ktime_get_coarse_ns` (Linux 5.11). Without it the flow cache reads
/// the precise clock, `bpf_ktime_get_ns`, a little dearer.
pub const HELPER_KTIME_COARSE: u32 = 1 << 1;
/// `bpf_fib_lookup`'s `BPF_FIB_LOOKUP_SRC` flag (Linux 6.7), which gives
/// the source address of the route to the peer host. Without it VXLAN mode
/// hands every packet to the vxlan device to encapsulate, as it does the
/// ones the program cannot grow.
pub const HELPER_FIB_LOOKUP_SRC: u32 = 1 << 2;
/// Every `HELPER_*` bit.
pub const HELPERS_ALL: u32 = HELPER_CHECK_MTU | HELPER_KTIME_COARSE | HELPER_FIB_LOOKUP_SRC;
/// What the datapath does with what it refuses (`DENY_*`), set by the
/// loader from `--deny`. A read-only constant: in drop mode the verifier
/// removes every reply branch, so dropping costs what it did.
pub const GLOBAL_DENY: &str = "DENY";
/// Refused packets are dropped (and counted), nothing is sent.
pub const DENY_DROP: u32 = 0;
/// Refused packets are dropped and answered: a TCP RST, or ICMP destination
/// unreachable, communication administratively prohibited (for IPv6 the
/// ICMPv6 one; docs/security.md).
pub const DENY_REJECT: u32 = 1;
/// Replies to refused packets per second and CPU (a token bucket per CPU);
/// beyond it a refusal is only dropped, counted as `reject_limited`.
pub const REJECT_RATE_PER_SEC: u64 = 100;
/// Replies a CPU may send at once after a quiet spell (the bucket's size).
pub const REJECT_BURST: u64 = 20;
/// Bytes VXLAN adds in front of the inner frame: outer IPv4, UDP, VXLAN
/// headers and the inner Ethernet header.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes VXLAN's outer headers take beyond [`VXLAN_OVERHEAD`] when they are
/// IPv6 (a 40-byte header for IPv4's 20): to a peer host on an IPv6
/// underlay, what fits the vxlan device less these fits the underlay.
pub const VXLAN6_EXTRA: u32 = 20;
/// Largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Value of `ROUTES` and `ROUTES6`: the peer host a remote prefix lives
/// behind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// IPv4 address of the peer host on the underlay, network byte order.
    pub host: [u8; 4],
    /// `PEER_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<Peer>() == 8);

/// Value of `ROUTES6`: the peer host a remote IPv6 prefix lives behind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer6 {
    /// The peer host's underlay address, network byte order: IPv6, or
    /// IPv4 mapped into IPv6 (`::ffff:a.b.c.d`, see [`mapped_v4`]).
    pub host: [u8; 16],
    /// Reserved, zero.
    pub flags: u32,
}
const _: () = assert!(size_of::<Peer6>() == 20);

/// The IPv4 address `host` maps (`::ffff:a.b.c.d`), if it is one: how
/// `Peer6` holds a peer host on an IPv4 underlay.
#[inline(always)]
pub fn mapped_v4(host: &[u8; 16]) -> Option<[u8; 4]> {
    let mut prefix = 0u8;
    for b in &host[..10] {
        prefix |= *b;
    }
    (prefix == 0 && host[10] == 0xff && host[11] == 0xff)
        .then_some([host[12], host[13], host[14], host[15]])
}

/// `a.b.c.d` as `::ffff:a.b.c.d` ([`mapped_v4`]'s inverse).
#[inline(always)]
pub fn map_v4(host: [u8; 4]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12] = host[0];
    m[13] = host[1];
    m[14] = host[2];
    m[15] = host[3];
    m
}

/// Value of `LOCAL_NETS` and `LOCAL_NETS6`: a container subnet of this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalNet {
    /// ifindex of the bridge that serves the subnet (informational: delivery
    /// takes its next hop from the FIB or from `ENDPOINTS`).
    pub bridge_ifindex: u32,
    /// Reserved, zero.
    pub flags: u32,
}
const _: () = assert!(size_of::<LocalNet>() == 8);

/// Value of `ENDPOINTS` and `ENDPOINTS6`: how to put a packet straight into
/// a local container.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// ifindex of the host-side veth whose peer is the container's eth0;
    /// `bpf_redirect_peer` to it lands the packet in the container netns.
    pub ifindex: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// The container's MAC (destination of delivered frames).
    pub mac: [u8; 6],
    /// The gateway MAC the container expects frames from (its bridge).
    pub gw_mac: [u8; 6],
    /// Explicit padding to a multiple of 4 bytes.
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<Endpoint>() == 24);

/// Value of `PEER_HOSTS`: a peer host's underlay address is known.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerHost {
    /// Reserved, zero.
    pub flags: u32,
    /// The peer's counters in `PEER_STATS` (below `MAX_PEER_HOSTS`; the
    /// agent zeroes them before it hands the slot to a peer).
    pub slot: u32,
}
const _: () = assert!(size_of::<PeerHost>() == 8);

/// Value of `PEER_STATS`: one peer host's traffic through the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Forwarded to the peer (`fwd_egress` or `fwd_egress6` whose route
    /// leads to it).
    pub tx: Counter,
    /// Delivered from the peer (`fwd_ingress` or `fwd_ingress6` from its
    /// subnets, or its own ICMP errors).
    pub rx: Counter,
}
const _: () = assert!(size_of::<PeerCounters>() == 32);

/// One counter slot in `STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

/// Indices into `STATS`. Forwarded, passed and dropped packets each count
/// once, at the point where the program decides their fate. The slots
/// without a family in their name are IPv4's (and `pass_not_ipv4`,
/// `pass_malformed`, `drop_redirect` and `drop_tunnel` either family's);
/// IPv6 has its own slots, named with a `6`.
pub mod stat {
    /// Container -> remote container, redirected out the underlay.
    pub const FWD_EGRESS: u32 = 0;
    /// Remote container -> local container, delivered by the datapath.
    pub const FWD_INGRESS: u32 = 1;
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, ...): handed to the kernel.
    /// (The name predates IPv6, which has its own `*6` slots.)
    pub const PASS_NOT_IPV4: u32 = 2;
    /// IPv4 not for xhost (host-bound, non-peer destination, ...).
    pub const PASS_NOT_OURS: u32 = 3;
    /// TTL <= 1: the kernel sends ICMP time exceeded.
    pub const PASS_TTL: u32 = 4;
    /// Truncated or malformed IPv4 or IPv6 headers: the kernel decides.
    pub const PASS_MALFORMED: u32 = 5;
    /// The FIB had no usable answer (no route, forwarding off, MTU, ...).
    pub const PASS_FIB: u32 = 6;
    /// Dropped: destination is a local container, source is no peer's. In
    /// VXLAN mode also: container traffic that arrives bare, and tunnel
    /// packets with another VNI, from no peer host, or with an inner source
    /// that is not the sending peer's.
    pub const DROP_SPOOFED: u32 = 7;
    /// Dropped: a redirect helper failed after the packet was rewritten
    /// (either family).
    pub const DROP_REDIRECT: u32 = 8;
    /// Dropped in VXLAN mode: at the vxlan device's egress, not IPv4 or no
    /// peer owns the destination; or the datapath could not encapsulate a
    /// packet it had already rewritten.
    pub const DROP_TUNNEL: u32 = 9;
    /// Dropped on this host before it left: a packet for a peer's subnet
    /// whose source is not the address (and MAC) of the container that sent
    /// it. On a known container's veth: any other source; at the bridge: a
    /// known container's address that did not come through its own veth, or
    /// an unknown address the bridge's neighbour entry does not give the
    /// frame's source MAC. In VXLAN mode also: a container's own VXLAN
    /// packet with our VNI to our port, which the host's NAT would make look
    /// like one of ours (see docs/security.md).
    pub const DROP_SPOOFED_LOCAL: u32 = 10;
    /// `--deny reject`: replies the datapath built to refused packets (TCP
    /// RST or ICMP administratively prohibited), counted with their own
    /// length. The refused packet itself still counts under its drop reason.
    pub const REJECT_SENT: u32 = 11;
    /// `--deny reject`: refused packets left unanswered because this CPU's
    /// reply budget (`REJECT_RATE_PER_SEC`) was spent.
    pub const REJECT_LIMITED: u32 = 12;
    /// IPv6 container -> remote container (`ROUTES6`), redirected out the
    /// underlay.
    pub const FWD_EGRESS6: u32 = 13;
    /// IPv6 remote container -> local container (`ENDPOINTS6`), delivered.
    pub const FWD_INGRESS6: u32 = 14;
    /// IPv6 not for xhost: host-bound, local, non-peer destination, no
    /// known endpoint.
    pub const PASS_NOT_OURS6: u32 = 15;
    /// IPv6 hop limit <= 1: the kernel sends ICMPv6 time exceeded.
    pub const PASS_HOP_LIMIT6: u32 = 16;
    /// IPv6 the FIB had no usable answer for (no route to the peer host,
    /// forwarding off, too big: the kernel sends Packet Too Big).
    pub const PASS_FIB6: u32 = 17;
    /// IPv6 link-local (fe80::/10) or multicast (ff00::/8) source or
    /// destination, or ICMPv6 neighbour discovery (router and neighbour
    /// solicitations and advertisements, redirects): the kernel's.
    pub const PASS_CONTROL6: u32 = 18;
    /// IPv6 whose next header the programs do not parse (hop-by-hop,
    /// routing, fragment, destination options and other extension headers,
    /// ESP, AH, ...): anything but TCP, UDP and ICMPv6.
    pub const PASS_EXT6: u32 = 19;
    /// Dropped: IPv6 for a local container whose source is in no peer's
    /// IPv6 subnet (`ROUTES6`).
    pub const DROP_SPOOFED6: u32 = 20;
    /// Dropped on this host: IPv6 for a peer's subnet whose source is not
    /// the address (and MAC) of the container that sent it, as
    /// `drop_spoofed_local`.
    pub const DROP_SPOOFED_LOCAL6: u32 = 21;
    /// `--deny reject`: replies to refused IPv6 packets (TCP RST or ICMPv6
    /// administratively prohibited), counted with their own length, as
    /// `reject_sent`.
    pub const REJECT_SENT6: u32 = 22;
    /// `--deny reject`: refused IPv6 packets left unanswered because this
    /// CPU's reply budget (shared with IPv4) was spent, as `reject_limited`.
    pub const REJECT_LIMITED6: u32 = 23;
    /// Number of slots.
    pub const COUNT: u32 = 24;

    /// Names as printed by `xhost-user status`, indexed by the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "fwd_egress",
        "fwd_ingress",
        "pass_not_ipv4",
        "pass_not_ours",
        "pass_ttl",
        "pass_malformed",
        "pass_fib",
        "drop_spoofed",
        "drop_redirect",
        "drop_tunnel",
        "drop_spoofed_local",
        "reject_sent",
        "reject_limited",
        "fwd_egress6",
        "fwd_ingress6",
        "pass_not_ours6",
        "pass_hop_limit6",
        "pass_fib6",
        "pass_control6",
        "pass_ext6",
        "drop_spoofed6",
        "drop_spoofed_local6",
        "reject_sent6",
        "reject_limited6",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, and padding-free (asserted above).
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::Peer6 {}
    unsafe impl aya::Pod for super::LocalNet {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::PeerHost {}
    unsafe impl aya::Pod for super::PeerCounters {}
}
