//! VXLAN mode: container traffic crosses the underlay encapsulated, for
//! underlays that do not carry container addresses (clouds, routed L3).
//!
//! The datapath encapsulates and decapsulates in place what it forwards
//! itself, and leaves the rest to the kernel's vxlan device in external
//! (collect_md) mode, as Cilium's tunnel mode leaves all of it. The
//! device's ifindex, the VNI and the UDP port are constants of the loaded
//! object, set by the loader; ifindex 0 is native routing, and the verifier
//! prunes every tunnel branch then.
//!
//! * `xhost_veth_in` / `xhost_bridge_in` encapsulate a routed packet in
//!   place ([`encapsulate`]) and send it out the underlay to the peer host,
//!   along the FIB's answer for the outer packet, which must fit the
//!   route's MTU. So the sending host's stack sees no inner packet and no
//!   outer one: no vxlan transmit, no output route lookup, no netfilter. A
//!   packet the program cannot grow in place (a GSO burst other than TCP,
//!   or one beyond 64 KB once encapsulated) goes to the device instead,
//!   once it fits the device's MTU (the underlay's less the 50-byte VXLAN
//!   overhead); a bigger one is the kernel's, whose route through the
//!   device answers ICMP fragmentation-needed.
//! * `xhost_vxlan_out` (TC egress of the device) sets the tunnel key of
//!   every packet the device sends: the peer host that owns the destination
//!   and the VNI. Packets the kernel itself routes there (ICMP errors) are
//!   encapsulated the same way; what no peer owns is dropped.
//! * `xhost_nic_in` (TC ingress of the underlay) decapsulates a single
//!   VXLAN packet ([`inbound`], [`decapsulate`]) for a local container's
//!   endpoint and delivers it with `bpf_redirect_peer`, once the VNI is
//!   ours, the outer destination one of this host's underlay addresses and
//!   the inner source in the subnets of the peer host that is the outer
//!   source; the receiving host's stack sees neither packet. GSO
//!   packets and GRO aggregates are the device's: this kernel's
//!   `bpf_skb_adjust_room` cannot clear their tunnel GSO state (bpf-next
//!   later gained `BPF_F_ADJ_ROOM_DECAP_L4_UDP` for that).
//! * `xhost_vxlan_in` (TC ingress of the device) delivers what the device
//!   decapsulated like `xhost_nic_in` does, after checking that the VNI is
//!   ours, the outer source is a peer host and the inner source belongs to
//!   that peer (one of its container subnets, or the host itself).
//!
//! What the program writes is what the device would: outer IPv4 without DF,
//! TTL 64, the inner packet's ECN; UDP from a port hashed from the inner
//! flow (the kernel's default range) with a zero checksum; the VXLAN header
//! with the I flag and the VNI; the inner frame's own Ethernet header.

use core::{
    mem::{MaybeUninit, size_of},
    ptr::read_volatile,
};

use aya_ebpf::{
    bindings::{
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_TUNINFO_IPV6, BPF_F_ZERO_CSUM_TX, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_tunnel_key,
    },
    helpers::{
        bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_skb_adjust_room, bpf_skb_get_tunnel_key,
        bpf_skb_set_tunnel_key,
    },
    programs::TcContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};
use xhost_common::{MAX_VNI, VXLAN_OVERHEAD};

use crate::{
    fib::{WireLen, bytes, words, zeroed_in},
    maps::{PEER_HOSTS, PEER_HOSTS6, UNDERLAY_ADDRS, route_of},
    parse::{
        Frame, Frame6, IPPROTO_UDP, Ipv4Frame, Ipv6Frame, PACKET_HOST, Packet, parse_at, parse6_at,
        ptr_at,
    },
};

/// ifindex of the vxlan device; 0: native routing. Set by the loader
/// (`xhost_common::GLOBAL_TUNNEL_IFINDEX`).
#[unsafe(no_mangle)]
static TUNNEL_IFINDEX: u32 = 0;

/// The VXLAN network identifier of this cluster (24 bits). Set by the
/// loader (`xhost_common::GLOBAL_TUNNEL_VNI`).
#[unsafe(no_mangle)]
static TUNNEL_VNI: u32 = 0;

/// The UDP port VXLAN is sent to. Set by the loader
/// (`xhost_common::GLOBAL_TUNNEL_PORT`).
#[unsafe(no_mangle)]
static TUNNEL_PORT: u32 = 0;

/// EtherTypes (host order), as read from a frame with `from_be_bytes`.
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// TTL of the outer header.
const OUTER_TTL: u8 = 64;

/// The range outer UDP source ports are hashed into, `SPORT_MIN` up to
/// but not including `SPORT_MAX`: what the kernel's vxlan devices use
/// unless configured (`udp_flow_src_port` over the default local port
/// range).
const SPORT_MIN: u32 = 32_768;
const SPORT_MAX: u32 = 60_999;

/// The VXLAN header's flags byte: I, the VNI is valid (RFC 7348).
const VXLAN_FLAG_VNI: u8 = 0x08;

/// ECN codepoints (RFC 3168): the low two bits of the TOS byte.
const ECN_MASK: u8 = 0x03;
const ECN_ECT_0: u8 = 0x02;
const ECN_CE: u8 = 0x03;

/// The headers [`encapsulate`] puts in front of the inner IPv4 header: the
/// frame's Ethernet header becomes the outer one, and a copy of it the
/// inner one.
#[repr(C)]
struct Encap {
    eth: EthHdr,
    ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: [u8; VXLAN_HDR_LEN],
    inner: EthHdr,
}
const _: () = assert!(size_of::<Encap>() == EthHdr::LEN + VXLAN_OVERHEAD as usize);

/// The vxlan device, or `None` in native mode.
#[inline(always)]
pub fn device() -> Option<u32> {
    // SAFETY: a read of a constant of the loaded object; volatile so the
    // compiler keeps the load the loader's value lands in.
    let ifindex = unsafe { read_volatile(&raw const TUNNEL_IFINDEX) };
    (ifindex != 0).then_some(ifindex)
}

#[inline(always)]
fn vni() -> u32 {
    // SAFETY: as in `device`.
    unsafe { read_volatile(&raw const TUNNEL_VNI) }
}

/// Our VXLAN header: the I flag alone and our VNI (RFC 7348).
#[inline(always)]
fn vxlan_header() -> [u8; VXLAN_HDR_LEN] {
    let vni = vni().to_be_bytes();
    [VXLAN_FLAG_VNI, 0, 0, 0, vni[1], vni[2], vni[3], 0]
}

#[inline(always)]
fn port() -> u16 {
    // SAFETY: as in `device`.
    unsafe { read_volatile(&raw const TUNNEL_PORT) as u16 }
}

/// The longest packet the skb leaves the underlay as once [`encapsulate`]d
/// (see `fib::wire_len`), or `None` if the program cannot encapsulate it:
/// a GSO burst other than TCP (whose segments only the kernel measures,
/// and whose size `bpf_skb_adjust_room` would not keep), or an skb whose
/// outer IPv4 and UDP lengths would not fit 16 bits.
#[inline(always)]
pub fn outer_len(ctx: &TcContext, len: WireLen) -> Option<u16> {
    let WireLen::Max(len) = len else {
        return None;
    };
    let whole = Packet::len(ctx) - EthHdr::LEN + VXLAN_OVERHEAD as usize;
    if whole > usize::from(u16::MAX) {
        return None;
    }
    len.checked_add(VXLAN_OVERHEAD as u16)
}

/// Encapsulates the frame in place for peer host `peer`, sent from
/// `source`, the outer frame from `smac` to `dmac`: an IPv4 or IPv6 one,
/// whose Ethernet header is `eth` and whose traffic class (TOS) byte is
/// `inner_tos`. A GSO burst keeps its segment size: what it leaves as was
/// measured by [`outer_len`].
///
/// `false` if the kernel could not make room (the frame is as it was, and
/// the caller drops it: it has been routed already). Either way the
/// frame's pointers are stale afterwards.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    eth: *mut EthHdr,
    inner_tos: u8,
    source: [u8; 4],
    peer: [u8; 4],
    smac: [u8; 6],
    dmac: [u8; 6],
) -> bool {
    // SAFETY: `eth` was bounds-checked by the parser, and nothing has
    // moved packet data since.
    let inner = unsafe { *eth };
    // The inner flow's hash, for the outer source port: the underlay's
    // ECMP and RSS spread flows by it, as for the kernel's vxlan.
    // SAFETY: plain helper calls.
    let (hash, id) = unsafe { (bpf_get_hash_recalc(ctx.skb.skb), bpf_get_prandom_u32()) };
    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO
            | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
    ) | ((EthHdr::LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    // SAFETY: plain helper call.
    let rc =
        unsafe { bpf_skb_adjust_room(ctx.skb.skb, VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags) };
    if rc != 0 {
        return false;
    }
    let Some(e) = ptr_at::<Encap, TcContext>(ctx, 0) else {
        // The helper made the room in the linear part: unreachable.
        return false;
    };
    let ip_len = (Packet::len(ctx) - EthHdr::LEN) as u16;
    let tos = match inner_tos & ECN_MASK {
        ECN_CE => ECN_ECT_0,
        ecn => ecn,
    };
    let h = hash ^ (hash << 16);
    let sport =
        (((u64::from(h) * u64::from(SPORT_MAX - SPORT_MIN)) >> 32) as u32 + SPORT_MIN) as u16;
    let id = (id as u16).to_be_bytes();
    // SAFETY: `e` was bounds-checked by ptr_at after the helper ran.
    unsafe {
        (*e).eth.src_addr = smac;
        (*e).eth.dst_addr = dmac;
        // The outer header is IPv4 whatever the inner one is.
        (*e).eth.ether_type = EtherType::Ipv4 as u16;
        (*e).ip = Ipv4Hdr {
            vihl: 0x45,
            tos,
            tot_len: ip_len.to_be_bytes(),
            id,
            frags: [0; 2],
            ttl: OUTER_TTL,
            proto: IPPROTO_UDP,
            check: ipv4_check(tos, ip_len, id, source, peer),
            src_addr: source,
            dst_addr: peer,
        };
        (*e).udp = UdpHdr {
            src: sport.to_be_bytes(),
            dst: port().to_be_bytes(),
            len: (ip_len - Ipv4Hdr::LEN as u16).to_be_bytes(),
            // Zero, as the kernel's vxlan devices send by default: the
            // inner packet carries its own.
            check: [0; 2],
        };
        (*e).vxlan = vxlan_header();
        (*e).inner = inner;
    }
    true
}

/// A VXLAN packet the program may decapsulate itself (see [`inbound`]).
pub struct Inbound<F> {
    /// The outer source. The caller requires the inner source to lie in a
    /// subnet `ROUTES` (`ROUTES6`) gives to exactly this host, which makes
    /// it a peer host: every value there is one.
    pub peer: [u8; 4],
    /// The inner frame, [`INNER_OFFSET`] bytes into the packet.
    pub inner: F,
}

/// Where the inner frame of a VXLAN packet starts: behind the outer
/// Ethernet, IPv4 (no options), UDP and VXLAN headers.
pub const INNER_OFFSET: usize = EthHdr::LEN + Ipv4Hdr::LEN + UdpHdr::LEN + VXLAN_HDR_LEN;
const VXLAN_HDR_LEN: usize = 8;
// The inner IPv4 header sits right behind the outer Ethernet header and the
// overhead: what decapsulation removes is exactly what encapsulation adds.
const _: () = assert!(INNER_OFFSET + EthHdr::LEN == EthHdr::LEN + VXLAN_OVERHEAD as usize);

/// The VXLAN packet in `f` (received on the underlay), if the program may
/// decapsulate it itself: one packet (no GSO burst or GRO aggregate, whose
/// tunnel GSO state this kernel's `bpf_skb_adjust_room` cannot clear),
/// addressed to this host's MAC and to one of its underlay addresses
/// (`UNDERLAY_ADDRS`: the frame is for this host, not one it would route
/// on), plain UDP (no IPv4 options, no fragment, lengths that agree, a zero
/// checksum, as VXLAN senders write it) to our port, a VXLAN header with
/// the I flag alone and our VNI, around an inner IPv4 frame that parses as
/// `parse` demands. The caller checks the sender.
/// Anything else (`None`) is the kernel's: its vxlan device decapsulates,
/// and `xhost_vxlan_in` checks and counts as before.
#[inline(always)]
pub fn inbound(ctx: &TcContext, f: &Ipv4Frame) -> Option<Inbound<Ipv4Frame>> {
    let peer = outer(ctx, f)?;
    let Frame::Ipv4(inner) = parse_at(ctx, INNER_OFFSET) else {
        return None;
    };
    // The inner packet lies within the UDP payload.
    if usize::from(inner.tot_len) + INNER_OFFSET > EthHdr::LEN + usize::from(f.tot_len) {
        return None;
    }
    Some(Inbound { peer, inner })
}

/// [`inbound`] around an inner IPv6 frame that parses as `parse6` demands
/// (no control traffic: that is the kernel's).
#[inline(always)]
pub fn inbound6(ctx: &TcContext, f: &Ipv4Frame) -> Option<Inbound<Ipv6Frame>> {
    let peer = outer(ctx, f)?;
    let Frame6::Ipv6(inner) = parse6_at(ctx, INNER_OFFSET) else {
        return None;
    };
    if inner.tot_len as usize + INNER_OFFSET > EthHdr::LEN + usize::from(f.tot_len) {
        return None;
    }
    Some(Inbound { peer, inner })
}

/// The outer source of VXLAN packet `f` if its outer headers are what
/// [`inbound`] takes.
#[inline(always)]
fn outer(ctx: &TcContext, f: &Ipv4Frame) -> Option<[u8; 4]> {
    // SAFETY: reading fields of the skb context.
    let (gso_size, pkt_type) = unsafe { ((*ctx.skb.skb).gso_size, (*ctx.skb.skb).pkt_type) };
    if gso_size != 0 || pkt_type != PACKET_HOST {
        return None;
    }
    // SAFETY: `f.ip` was bounds-checked by `parse`.
    let (vihl, proto, frags, peer, dst) = unsafe {
        (
            (*f.ip).vihl,
            (*f.ip).proto,
            (*f.ip).frags,
            (*f.ip).src_addr,
            (*f.ip).dst_addr,
        )
    };
    // MF and the fragment offset: a fragment is the kernel's to reassemble.
    if vihl != 0x45 || proto != IPPROTO_UDP || frags[0] & 0x3f != 0 || frags[1] != 0 {
        return None;
    }
    let udp = ptr_at::<UdpHdr, TcContext>(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    let vxlan = ptr_at::<[u8; VXLAN_HDR_LEN], TcContext>(ctx, INNER_OFFSET - VXLAN_HDR_LEN)?;
    // SAFETY: both bounds-checked by ptr_at.
    let (udp, vxlan) = unsafe { (*udp, *vxlan) };
    let udp_len = u16::from_be_bytes(udp.len);
    if u16::from_be_bytes(udp.dst) != port()
        || udp.check != [0; 2]
        || usize::from(udp_len) + Ipv4Hdr::LEN != usize::from(f.tot_len)
        || vxlan != vxlan_header()
    {
        return None;
    }
    // SAFETY: lookup of a plain key; the value is not dereferenced.
    unsafe { UNDERLAY_ADDRS.get(dst) }?;
    Some(peer)
}

/// Whether the frame is, by its headers alone, a VXLAN packet with an
/// inner IPv6 frame (outer IPv4, UDP to our port, inner EtherType IPv6):
/// the entry point hands it to `v6::decapsulated`, which checks the rest.
#[inline(always)]
pub fn carries_ipv6(ctx: &TcContext) -> bool {
    let Some(head) = ptr_at::<[u8; INNER_OFFSET + EthHdr::LEN], TcContext>(ctx, 0) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let head = unsafe { &*head };
    let word = |at: usize| u16::from_be_bytes([head[at], head[at + 1]]);
    word(12) == ETH_P_IP
        && head[EthHdr::LEN + 9] == IPPROTO_UDP
        && word(EthHdr::LEN + Ipv4Hdr::LEN + 2) == port()
        && word(INNER_OFFSET + 12) == ETH_P_IPV6
}

/// Whether `f`, sent by a local container, is a VXLAN packet with our VNI
/// to our port. Through the host's NAT (Docker's MASQUERADE) it leaves with
/// this host's address, and a peer would take it for one this host
/// encapsulated and deliver the packet inside, whatever (local) source that
/// claims: a container's way around the source checks.
#[inline(always)]
pub fn is_ours_from_container(ctx: &TcContext, f: &Ipv4Frame) -> bool {
    // SAFETY: `f.ip` was bounds-checked by `parse`.
    let (vihl, proto, frags) = unsafe { ((*f.ip).vihl, (*f.ip).proto, (*f.ip).frags) };
    // A later fragment carries no UDP header (the first one is checked).
    if proto != IPPROTO_UDP || frags[0] & 0x1f != 0 || frags[1] != 0 {
        return false;
    }
    // Verifier: IHL is 4 bits, so the offset is bounded.
    let ip_len = usize::from(vihl & 0x0f) * 4;
    let Some(head) =
        ptr_at::<[u8; UdpHdr::LEN + VXLAN_HDR_LEN], TcContext>(ctx, EthHdr::LEN + ip_len)
    else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let head = unsafe { *head };
    // The UDP destination port, and the VNI whatever the flags (the
    // kernel's device takes reserved bits it does not know as zero).
    // Compared as integers: a slice comparison compiles to a call into a
    // byte-wise `memcmp` subprogram.
    u16::from_be_bytes([head[2], head[3]]) == port()
        && u32::from_be_bytes([0, head[12], head[13], head[14]]) == vni() & MAX_VNI
}

/// IPv6 next headers that are extension headers a UDP header may follow:
/// hop-by-hop options, routing, fragment, destination options.
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_DEST_OPTS: u8 = 60;
/// Extension headers [`is_ours_from_container6`] walks.
const MAX_EXT_HEADERS: usize = 3;

/// [`is_ours_from_container`] for IPv6: through the host's NAT66 (Docker's
/// IPv6 MASQUERADE) it leaves with this host's IPv6 address, which a peer
/// whose `PEER_HOSTS6` holds it would take for one of ours. The UDP header
/// is looked for behind up to [`MAX_EXT_HEADERS`] extension headers (the
/// first fragment's; a later fragment carries none); a longer chain, which
/// may hide one, counts as ours.
#[inline(always)]
pub fn is_ours_from_container6(ctx: &TcContext, f: &Ipv6Frame) -> bool {
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let mut next = unsafe { (*f.ip).next_hdr };
    let mut off = EthHdr::LEN + Ipv6Hdr::LEN;
    for _ in 0..MAX_EXT_HEADERS {
        if !matches!(
            next,
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_FRAGMENT | EXT_DEST_OPTS
        ) {
            break;
        }
        let Some(ext) = ptr_at::<[u8; 4], TcContext>(ctx, off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ext = unsafe { *ext };
        if next == EXT_FRAGMENT && (u16::from_be_bytes([ext[2], ext[3]]) >> 3) != 0 {
            return false;
        }
        // A fragment header is 8 bytes; the others say their length in
        // 8-byte units beyond the first 8.
        off += if next == EXT_FRAGMENT {
            8
        } else {
            (usize::from(ext[1]) + 1) * 8
        };
        next = ext[0];
    }
    if matches!(
        next,
        EXT_HOP_BY_HOP | EXT_ROUTING | EXT_FRAGMENT | EXT_DEST_OPTS
    ) {
        return true;
    }
    if next != IPPROTO_UDP {
        return false;
    }
    let Some(head) = ptr_at::<[u8; UdpHdr::LEN + VXLAN_HDR_LEN], TcContext>(ctx, off) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let head = unsafe { *head };
    u16::from_be_bytes([head[2], head[3]]) == port()
        && u32::from_be_bytes([0, head[12], head[13], head[14]]) == vni() & MAX_VNI
}

/// Strips the outer IPv4, UDP and VXLAN headers and the inner Ethernet
/// header: the frame keeps its outer Ethernet header in front of the inner
/// IPv4 packet. A checksum the NIC vouched for is no longer taken as
/// verified (`bpf_skb_adjust_room` resets CHECKSUM_UNNECESSARY), so the
/// inner one is checked as the kernel's decapsulation would. `false`: the
/// frame is as it was.
#[inline(always)]
pub fn decapsulate(ctx: &TcContext) -> bool {
    shrink(ctx, 0)
}

/// [`decapsulate`] around an inner IPv6 packet: the skb's protocol becomes
/// IPv6 (`BPF_F_ADJ_ROOM_DECAP_L3_IPV6`, Linux 6.3), which the stack of
/// the container that `bpf_redirect_peer` delivers it to goes by. The
/// caller fixes the EtherType of the Ethernet header left in front.
#[inline(always)]
pub fn decapsulate6(ctx: &TcContext) -> bool {
    shrink(ctx, u64::from(BPF_F_ADJ_ROOM_DECAP_L3_IPV6))
}

#[inline(always)]
fn shrink(ctx: &TcContext, flags: u64) -> bool {
    // SAFETY: plain helper call.
    let rc = unsafe {
        bpf_skb_adjust_room(
            ctx.skb.skb,
            -(VXLAN_OVERHEAD as i32),
            BPF_ADJ_ROOM_MAC,
            flags,
        )
    };
    rc == 0
}

/// The header checksum of the outer IPv4 header [`encapsulate`] writes.
#[inline(always)]
fn ipv4_check(tos: u8, tot_len: u16, id: [u8; 2], src: [u8; 4], dst: [u8; 4]) -> [u8; 2] {
    let word = |b: [u8; 2]| u32::from(u16::from_be_bytes(b));
    let mut sum = word([0x45, tos])
        + u32::from(tot_len)
        + word(id)
        + word([OUTER_TTL, IPPROTO_UDP])
        + word([src[0], src[1]])
        + word([src[2], src[3]])
        + word([dst[0], dst[1]])
        + word([dst[2], dst[3]]);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Sets the tunnel key that sends the packet to peer host `host`.
/// `false`: the kernel refused the key.
#[inline(always)]
pub fn set_key(ctx: &TcContext, host: [u8; 4]) -> bool {
    let mut slot = MaybeUninit::<bpf_tunnel_key>::uninit();
    let key = zeroed_in(&mut slot);
    key.tunnel_id = vni();
    // The helper takes the address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(host);
    key.tunnel_ttl = OUTER_TTL;
    // SAFETY: `key` is a valid bpf_tunnel_key of the size passed.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &raw mut *key,
            size_of::<bpf_tunnel_key>() as u32,
            // A zero UDP checksum, as the kernel's vxlan devices send by
            // default: the inner packet carries its own.
            u64::from(BPF_F_ZERO_CSUM_TX),
        )
    };
    rc == 0
}

/// [`set_key`] for a peer host on an IPv6 underlay: the kernel's device
/// sends the packet with IPv6 outer headers and a UDP checksum (over IPv6
/// a receiving vxlan device refuses the zero one [`set_key`] asks for,
/// unless told otherwise).
#[inline(always)]
pub fn set_key6(ctx: &TcContext, host: [u8; 16]) -> bool {
    let mut slot = MaybeUninit::<bpf_tunnel_key>::uninit();
    let key = zeroed_in(&mut slot);
    key.tunnel_id = vni();
    // In network order, as it stands.
    key.__bindgen_anon_1.remote_ipv6 = words(host);
    key.tunnel_ttl = OUTER_TTL;
    // SAFETY: `key` is a valid bpf_tunnel_key of the size passed.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &raw mut *key,
            size_of::<bpf_tunnel_key>() as u32,
            u64::from(BPF_F_TUNINFO_IPV6),
        )
    };
    rc == 0
}

/// [`sender`] for a packet that came over IPv6: the peer host
/// (`PEER_HOSTS6`) that sent it with our VNI.
#[inline(always)]
pub fn sender6(ctx: &TcContext) -> Option<[u8; 16]> {
    let mut slot = MaybeUninit::<bpf_tunnel_key>::uninit();
    let key = zeroed_in(&mut slot);
    // SAFETY: `key` is a valid, writable bpf_tunnel_key of the size passed.
    let rc = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &raw mut *key,
            size_of::<bpf_tunnel_key>() as u32,
            u64::from(BPF_F_TUNINFO_IPV6),
        )
    };
    if rc != 0 || key.tunnel_id != vni() {
        return None;
    }
    // SAFETY: an IPv6 key fills remote_ipv6.
    let outer = bytes(unsafe { key.__bindgen_anon_1.remote_ipv6 });
    // SAFETY: lookup of a plain key; the value is not dereferenced.
    unsafe { PEER_HOSTS6.get(outer) }.map(|_| outer)
}

/// The peer host that sent a decapsulated packet, if the packet came with
/// our VNI from a known peer host.
#[inline(always)]
pub fn sender(ctx: &TcContext) -> Option<[u8; 4]> {
    let mut slot = MaybeUninit::<bpf_tunnel_key>::uninit();
    let key = zeroed_in(&mut slot);
    // SAFETY: `key` is a valid, writable bpf_tunnel_key of the size passed.
    let rc = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &raw mut *key,
            size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if rc != 0 || key.tunnel_id != vni() {
        return None;
    }
    // SAFETY: an IPv4 key (no BPF_F_TUNINFO_IPV6) fills remote_ipv4.
    let outer = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    // SAFETY: lookup of a plain key; the value is not dereferenced.
    unsafe { PEER_HOSTS.get(outer) }.map(|_| outer)
}

/// Whether `src` may be the inner source of what peer host `outer` sends:
/// an address of its container subnets, or the host itself (its kernel's
/// ICMP errors, which `policy` then limits to errors).
#[inline(always)]
pub fn sent_by(src: [u8; 4], outer: [u8; 4]) -> bool {
    src == outer || route_of(src) == Some(outer)
}
