//! IPv6 in native routing mode: the twins of `try_egress`, `deliver` and
//! the XDP check, for `ROUTES6`, `LOCAL_NETS6` and `ENDPOINTS6`.
//!
//! * Left to the kernel untouched: what `parse6` refuses
//!   (`pass_malformed`), link-local and multicast addresses and neighbour
//!   discovery (`pass_control6`), a next header other than TCP, UDP or
//!   ICMPv6 (`pass_ext6`: extension headers are not parsed), hop limit <= 1
//!   (`pass_hop_limit6`).
//! * The source policy runs before the next header and the hop limit are
//!   looked at, as for IPv4: no IPv6 packet for a peer leaves with an
//!   address that is not its sender's, none from outside the peers'
//!   subnets reaches a local container. Refusals are answered as IPv4's
//!   are with `--deny reject` (`reject::refuse6`).
//! * The next hop is the FIB's answer towards the peer host's underlay
//!   address (`ROUTES6`'s value), which also checks the packet's length
//!   against that route's MTU; too big is the kernel's (`pass_fib6`),
//!   whose own route answers Packet Too Big. A peer host on an IPv6
//!   underlay is looked up `AF_INET6`, and a neighbour not resolved yet is
//!   resolved by `bpf_redirect_neigh`. One on an IPv4 underlay (a mapped
//!   address) is looked up `AF_INET`, and a neighbour not resolved yet is
//!   the kernel's: `bpf_redirect_neigh` takes an IPv6 packet's next hop as
//!   IPv6. In VXLAN mode a peer host on an IPv6 underlay is reached
//!   through the vxlan device, with IPv6 outer headers ([`over_ipv6`]).
//! * Neither the `ROUTES` cache nor the flow cache holds IPv6 answers (both
//!   are keyed by IPv4 addresses): every IPv6 packet takes the full path.

use aya_ebpf::{
    helpers::bpf_redirect_peer,
    programs::{TcContext, XdpContext},
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv6Hdr,
};
use xhost_common::{Endpoint, HELPER_FIB_LOOKUP_SRC, VXLAN6_EXTRA, map_v4, mapped_v4, stat};

use crate::{
    NO_ENDPOINT, NO_SLOT, Verdict, fib,
    fib::{Answer, Source, WireLen},
    forwarded, hand_on, kernel,
    maps::{ENDPOINT_PORTS, ENDPOINTS6, LOCAL_NETS6, host_key6, route6_of, route6_slot_of},
    parse::{Frame, Frame6, Ipv6Frame, parse, parse6, ptr_at},
    redirect, reject, tunnel,
};

/// Container -> remote container over IPv6, on the container's veth
/// (`from_port`) or at the bridge: `try_egress`'s rules.
///
/// Verifier: inlined into the entry point, which then calls BPF functions
/// one after the other: [`checked`] and, for a peer host on an IPv6
/// underlay, [`over_ipv6`], or, in VXLAN mode for a destination no peer
/// owns, [`unrouted_in_vxlan_mode`]. `checked` takes about 470 bytes of
/// stack, and one more frame under it would take the call chain past 512.
#[inline(always)]
pub fn egress(ctx: &TcContext, from_port: bool) -> Verdict {
    let v = checked(ctx, from_port);
    match v.action {
        OVER_IPV6 => {
            // SAFETY: reading the ingress ifindex of the skb context.
            let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
            let mark = if from_port { iif } else { 0 };
            let routed = over_ipv6(ctx, iif);
            let v = Verdict {
                action: (routed >> 32) as i32,
                reason: routed as u32,
                peer: v.peer,
            };
            hand_on(ctx, mark, v)
        }
        UNROUTED_IN_VXLAN_MODE => unrouted_in_vxlan_mode(ctx),
        _ => v,
    }
}

/// [`checked`]'s answer for a frame that passed every check and goes to a
/// peer host on an IPv6 underlay: [`egress`] routes it with [`over_ipv6`].
/// Not a TC action.
const OVER_IPV6: i32 = i32::MIN;

/// [`checked`]'s answer in VXLAN mode for a destination no peer owns:
/// [`egress`] hands it to [`unrouted_in_vxlan_mode`]. Not a TC action.
const UNROUTED_IN_VXLAN_MODE: i32 = i32::MIN + 1;

/// VXLAN mode, a destination no peer owns: a container's own VXLAN packet
/// with our VNI to our port (`tunnel::is_ours_from_container6`) is refused
/// (`drop_spoofed_local6`), anything else is the kernel's. The frame is
/// parsed again: a BPF function of its own, see [`egress`].
#[inline(never)]
fn unrouted_in_vxlan_mode(ctx: &TcContext) -> Verdict {
    let Frame6::Ipv6(f) = parse6(ctx) else {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    };
    if tunnel::is_ours_from_container6(ctx, &f) {
        return Verdict::refused6(ctx, stat::DROP_SPOOFED_LOCAL6);
    }
    Verdict::pass(stat::PASS_NOT_OURS6)
}

/// [`egress`]'s checks, and the routing of everything but what goes to a
/// peer host on an IPv6 underlay ([`OVER_IPV6`], with the peer's slot).
#[inline(never)]
fn checked(ctx: &TcContext, from_port: bool) -> Verdict {
    let f = match parse6(ctx) {
        Frame6::Ipv6(f) => f,
        Frame6::Control => return Verdict::pass(stat::PASS_CONTROL6),
        Frame6::Malformed => return Verdict::pass(stat::PASS_MALFORMED),
    };
    // SAFETY: `f.ip` and `f.eth` were bounds-checked by `parse6`.
    let (src, dst, hop_limit, to_mac, from_mac) = unsafe {
        (
            (*f.ip).src_addr,
            (*f.ip).dst_addr,
            (*f.ip).hop_limit,
            (*f.eth).dst_addr,
            (*f.eth).src_addr,
        )
    };
    // SAFETY: reading the ingress ifindex of the skb context.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mark = if from_port { iif } else { 0 };
    let Some((peer_host, slot)) = route6_slot_of(dst) else {
        if tunnel::device().is_some() {
            return Verdict {
                action: UNROUTED_IN_VXLAN_MODE,
                reason: stat::PASS_NOT_OURS6,
                peer: NO_SLOT,
            };
        }
        return Verdict::pass(stat::PASS_NOT_OURS6);
    };
    if from_port {
        let ep = endpoint6(src);
        if ep.ifindex != iif || from_mac != ep.mac {
            // SAFETY: lookup of a plain key; the value is not dereferenced.
            if ep.ifindex == 0 && unsafe { ENDPOINT_PORTS.get(iif) }.is_none() {
                // Not armed: the bridge checks it, unmarked.
                return Verdict::pass(stat::PASS_NOT_OURS6);
            }
            return Verdict::refused6(ctx, stat::DROP_SPOOFED_LOCAL6);
        }
        if to_mac != ep.gw_mac {
            return hand_on(ctx, mark, Verdict::pass(stat::PASS_NOT_OURS6));
        }
    } else if let Some(v) = bridge_check(ctx, src, from_mac, iif, dst) {
        return v;
    }
    if !f.parsed_next {
        return hand_on(ctx, mark, Verdict::pass(stat::PASS_EXT6));
    }
    if hop_limit <= 1 {
        return hand_on(ctx, mark, Verdict::pass(stat::PASS_HOP_LIMIT6));
    }
    let Some(len) = fib::wire_len6(ctx, &f) else {
        return hand_on(ctx, mark, Verdict::pass(stat::PASS_FIB6));
    };
    let v = match (mapped_v4(&peer_host), tunnel::device()) {
        (Some(v4), Some(device)) => encapsulated(ctx, &f, iif, device, v4, len),
        (Some(v4), None) => over_ipv4(ctx, &f, iif, v4, len),
        (None, _) => Verdict {
            action: OVER_IPV6,
            reason: stat::FWD_EGRESS6,
            peer: NO_SLOT,
        },
    };
    hand_on(ctx, mark, v.peer(slot))
}

/// Native routing to a peer host on the IPv4 underlay: the route to its
/// IPv4 address. The packet's own source is IPv6, so the lookup has none
/// (only source-based IPv4 rules could have used it).
#[inline(always)]
fn over_ipv4(ctx: &TcContext, f: &Ipv6Frame, iif: u32, peer: [u8; 4], len: WireLen) -> Verdict {
    let hop = fib::lookup(ctx, iif, [0; 4], peer, len, Source::Packet);
    if hop.answer == Answer::Resolved {
        rewrite6(f, hop.smac, hop.dmac);
        redirect(hop.ifindex, stat::FWD_EGRESS6)
    } else {
        // Unresolved too: `bpf_redirect_neigh` takes an IPv6 packet's next
        // hop as IPv6, and the peer host's is IPv4.
        Verdict::pass(stat::PASS_FIB6)
    }
}

/// To a peer host on an IPv6 underlay. Native routing: the route to its
/// address, from the packet's own source. VXLAN mode: into the vxlan
/// device (which `xhost_vxlan_out` keys with the peer's IPv6 address, and
/// which sends the packet with IPv6 outer headers) if every packet it
/// leaves as fits the device's MTU less the 20 bytes the larger outer
/// headers take (`VXLAN6_EXTRA`); else the kernel's (`pass_fib6`), whose
/// route into the device, with that MTU locked, answers Packet Too Big.
/// [`checked`] has checked the frame; it is parsed and its route looked up
/// again here (a BPF function of its own, see [`egress`]): a route gone
/// meanwhile leaves it to the kernel.
///
/// Verifier: returns the verdict's action and reason packed in a `u64`
/// (the action in the high half): a struct LLVM may return through a
/// pointer into the caller's stack, which the verifier refuses to see
/// returned.
#[inline(never)]
fn over_ipv6(ctx: &TcContext, iif: u32) -> u64 {
    let v = route_over_ipv6(ctx, iif);
    (u64::from(v.action as u32) << 32) | u64::from(v.reason)
}

/// [`over_ipv6`]'s body.
#[inline(always)]
fn route_over_ipv6(ctx: &TcContext, iif: u32) -> Verdict {
    let Frame6::Ipv6(f) = parse6(ctx) else {
        return Verdict::pass(stat::PASS_MALFORMED);
    };
    let Some(len) = fib::wire_len6(ctx, &f) else {
        return Verdict::pass(stat::PASS_FIB6);
    };
    // Verifier: addresses are held as four words, not sixteen bytes, which
    // LLVM keeps in as many registers and spills one stack slot each across
    // the helper calls (the frame would take the call chain past 512).
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let Some(peer) = route6_of(unsafe { (*f.ip).dst_addr }).map(fib::words) else {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    };
    if fib::is_mapped(&peer) {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    }
    if let Some(device) = tunnel::device() {
        // Every packet it leaves as, with IPv6 outer headers, must fit the
        // underlay: the device's MTU less what they take beyond IPv4's.
        let fits = match (len, fib::device_mtu(ctx, device)) {
            (WireLen::Max(len), Some(mtu)) => u32::from(len) + VXLAN6_EXTRA <= mtu,
            _ => false,
        };
        if !fits {
            return Verdict::pass(stat::PASS_FIB6);
        }
        decrement_hop_limit(&f);
        return redirect(device, stat::FWD_EGRESS6);
    }
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let src = unsafe { fib::words((*f.ip).src_addr) };
    let hop = fib::lookup6(ctx, iif, src, peer, len);
    match hop.answer {
        Answer::Resolved => {
            rewrite6(&f, hop.smac, hop.dmac);
            redirect(hop.ifindex, stat::FWD_EGRESS6)
        }
        Answer::Unresolved => {
            decrement_hop_limit(&f);
            forwarded(
                fib::redirect_neigh6(hop.ifindex, hop.nexthop),
                stat::FWD_EGRESS6,
            )
        }
        Answer::Kernel => Verdict::pass(stat::PASS_FIB6),
    }
}

/// VXLAN mode: routes the frame one hop (hop limit - 1) and sends it to
/// peer host `peer` encapsulated, as `try_egress` does IPv4: here along the
/// FIB's answer for the outer packet (`len` + the VXLAN overhead against
/// the route to the peer host), or through the vxlan device for what the
/// program cannot grow (`xhost_vxlan_out` keys it from `ROUTES6`). What
/// does not fit is the kernel's (`pass_fib6`), whose IPv6 route into the
/// device answers Packet Too Big.
#[inline(always)]
fn encapsulated(
    ctx: &TcContext,
    f: &Ipv6Frame,
    iif: u32,
    device: u32,
    peer: [u8; 4],
    len: WireLen,
) -> Verdict {
    let outer = if kernel::has(HELPER_FIB_LOOKUP_SRC) {
        tunnel::outer_len(ctx, len)
    } else {
        None
    };
    let Some(outer) = outer else {
        return to_device(ctx, f, device);
    };
    let hop = fib::lookup(ctx, iif, [0; 4], peer, WireLen::Max(outer), Source::Route);
    if hop.answer == Answer::Kernel {
        return Verdict::pass(stat::PASS_FIB6);
    }
    decrement_hop_limit(f);
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let vcf = unsafe { (*f.ip).vcf };
    // The traffic class spans the first two bytes, after the version.
    let tclass = (vcf[0] << 4) | (vcf[1] >> 4);
    if !tunnel::encapsulate(ctx, f.eth, tclass, hop.source, peer, hop.smac, hop.dmac) {
        return Verdict::drop(stat::DROP_TUNNEL);
    }
    match hop.answer {
        Answer::Unresolved => forwarded(
            fib::redirect_neigh(hop.ifindex, hop.nexthop),
            stat::FWD_EGRESS6,
        ),
        _ => redirect(hop.ifindex, stat::FWD_EGRESS6),
    }
}

/// VXLAN mode: routes the frame one hop into the vxlan device, which
/// encapsulates it; what does not fit the device is the kernel's
/// (`pass_fib6`), whose IPv6 route into the device answers Packet Too Big.
#[inline(always)]
fn to_device(ctx: &TcContext, f: &Ipv6Frame, device: u32) -> Verdict {
    if !fib::fits(ctx, device) {
        return Verdict::pass(stat::PASS_FIB6);
    }
    decrement_hop_limit(f);
    redirect(device, stat::FWD_EGRESS6)
}

/// The bridge path's source check (`bridge_sender`'s rules, with the
/// bridge's NDP entry for an unknown address): `None` if `src` is its
/// sender's own.
#[inline(always)]
fn bridge_check(
    ctx: &TcContext,
    src: [u8; 16],
    from_mac: [u8; 6],
    bridge: u32,
    dst: [u8; 16],
) -> Option<Verdict> {
    // SAFETY: reading the skb's priority from its context.
    let mark = unsafe { (*ctx.skb.skb).priority };
    if mark != 0 {
        // SAFETY: TC programs may write the skb's priority.
        unsafe { (*ctx.skb.skb).priority = 0 };
    }
    let ep = endpoint6(src);
    let owner = if ep.ifindex != 0 {
        mark == ep.ifindex && from_mac == ep.mac
    } else if LOCAL_NETS6.get(&host_key6(src)).is_none() {
        return Some(Verdict::pass(stat::PASS_NOT_OURS6));
    } else {
        mark == 0 && fib::neighbour_mac6(ctx, bridge, src, dst) == Some(from_mac)
    };
    (!owner).then(|| Verdict::refused6(ctx, stat::DROP_SPOOFED_LOCAL6))
}

/// Remote container -> local container over IPv6, on the underlay:
/// `deliver`'s rules. A local address without a known endpoint is the
/// kernel's once the source is checked (it delivers through the bridge).
#[inline(never)]
pub fn ingress(ctx: &TcContext) -> Verdict {
    let f = match parse6(ctx) {
        Frame6::Ipv6(f) => f,
        Frame6::Control => return Verdict::pass(stat::PASS_CONTROL6),
        Frame6::Malformed => return Verdict::pass(stat::PASS_MALFORMED),
    };
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let (src, dst) = unsafe { ((*f.ip).src_addr, (*f.ip).dst_addr) };
    let ep = endpoint6(dst);
    if ep.ifindex == 0 && LOCAL_NETS6.get(&host_key6(dst)).is_none() {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    }
    // In VXLAN mode container traffic arrives encapsulated only.
    if tunnel::device().is_some() {
        return Verdict::refused6(ctx, stat::DROP_SPOOFED6);
    }
    let Some((_, slot)) = route6_slot_of(src) else {
        return Verdict::refused6(ctx, stat::DROP_SPOOFED6);
    };
    deliver(&f, &ep, slot)
}

/// A peer's packet for local container `f`'s destination (endpoint `ep`,
/// none if its ifindex is 0), its source checked (`slot`: the peer's
/// `PEER_STATS` slot): delivered, or the kernel's.
#[inline(always)]
fn deliver(f: &Ipv6Frame, ep: &Endpoint, slot: u32) -> Verdict {
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let hop_limit = unsafe { (*f.ip).hop_limit };
    if !f.parsed_next {
        return Verdict::pass(stat::PASS_EXT6);
    }
    if hop_limit <= 1 {
        return Verdict::pass(stat::PASS_HOP_LIMIT6);
    }
    if ep.ifindex == 0 {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    }
    rewrite6(f, ep.gw_mac, ep.mac);
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32;
    forwarded(action, stat::FWD_INGRESS6).peer(slot)
}

/// VXLAN mode, on the underlay: a peer's VXLAN packet around an IPv6 frame
/// for a local container's endpoint (the entry point saw the inner
/// EtherType: `tunnel::carries_ipv6`), decapsulated and delivered by the
/// program as `deliver_decapsulated` does IPv4: the outer headers as
/// `tunnel::inbound6` takes them, an inner source in the subnets `ROUTES6`
/// gives the outer source, a parsed next header, a hop limit to route it
/// with and a known endpoint. `None`: the IPv4 path's (`try_ingress`),
/// which leaves it to the kernel's vxlan device.
#[inline(never)]
pub fn decapsulated(ctx: &TcContext) -> Option<Verdict> {
    // Gated on a helper of 6.7. The flag that makes the skb IPv6 again
    // (BPF_F_ADJ_ROOM_DECAP_L3_IPV6, 6.3) may still be missing where that
    // helper is backported (Debian's 6.1): the adjustment then fails and the
    // frame, untouched, is the device's to decapsulate.
    if !kernel::has(HELPER_FIB_LOOKUP_SRC) {
        return None;
    }
    let Frame::Ipv4(outer) = parse(ctx) else {
        return None;
    };
    let t = tunnel::inbound6(ctx, &outer)?;
    // SAFETY: `t.inner.ip` was bounds-checked by `parse6_at`.
    let (src, dst, hop_limit) = unsafe {
        (
            (*t.inner.ip).src_addr,
            (*t.inner.ip).dst_addr,
            (*t.inner.ip).hop_limit,
        )
    };
    let (owner, slot) = route6_slot_of(src)?;
    if owner != map_v4(t.peer) || !t.inner.parsed_next || hop_limit <= 1 {
        return None;
    }
    let ep = endpoint6(dst);
    if ep.ifindex == 0 {
        return None;
    }
    if !tunnel::decapsulate6(ctx) {
        // The frame is as it was, for the kernel's device to decapsulate.
        return Some(Verdict::pass(stat::PASS_NOT_OURS));
    }
    // The outer Ethernet header and the inner packet, parsed where it lay a
    // moment ago.
    let (Some(eth), Some(ip)) = (ptr_at(ctx, 0), ptr_at(ctx, EthHdr::LEN)) else {
        // The helper leaves the headers in the linear part: unreachable.
        return Some(Verdict::drop(stat::DROP_TUNNEL));
    };
    let inner = Ipv6Frame {
        eth,
        ip,
        tot_len: t.inner.tot_len,
        parsed_next: true,
    };
    // The EtherType of the outer header stays IPv4's: the inner frame's.
    // SAFETY: `eth` was bounds-checked by ptr_at.
    unsafe { (*inner.eth).ether_type = EtherType::Ipv6 as u16 };
    Some(deliver(&inner, &ep, slot))
}

/// Decapsulated by the vxlan device (`xhost_vxlan_in`): delivered as on the
/// underlay once the tunnel vouches for its sender, as `try_from_tunnel`
/// does IPv4: our VNI from a peer host (over IPv4, or over IPv6 from one in
/// `PEER_HOSTS6`), and an inner source in that peer's `ROUTES6` subnets
/// (checked before anything else, control traffic included); else dropped,
/// `drop_spoofed6`.
#[inline(never)]
pub fn from_tunnel(ctx: &TcContext) -> Verdict {
    let outer = match tunnel::sender(ctx) {
        Some(v4) => map_v4(v4),
        None => match tunnel::sender6(ctx) {
            Some(v6) => v6,
            None => return Verdict::drop(stat::DROP_SPOOFED6),
        },
    };
    let Some(ip) = ptr_at::<Ipv6Hdr, TcContext>(ctx, EthHdr::LEN) else {
        return Verdict::pass(stat::PASS_MALFORMED);
    };
    // SAFETY: bounds-checked by ptr_at.
    let src = unsafe { (*ip).src_addr };
    let slot = match route6_slot_of(src) {
        Some((owner, slot)) if owner == outer => slot,
        _ => return Verdict::drop(stat::DROP_SPOOFED6),
    };
    let f = match parse6(ctx) {
        Frame6::Ipv6(f) => f,
        Frame6::Control => return Verdict::pass(stat::PASS_CONTROL6),
        Frame6::Malformed => return Verdict::pass(stat::PASS_MALFORMED),
    };
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let dst = unsafe { (*f.ip).dst_addr };
    let ep = endpoint6(dst);
    if ep.ifindex == 0 && LOCAL_NETS6.get(&host_key6(dst)).is_none() {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    }
    deliver(&f, &ep, slot)
}

/// `xhost_vxlan_out` for IPv6: the peer host that owns the destination of
/// what the vxlan device sends (IPv6, or IPv4 mapped); `::` (no peer
/// host's address) if no peer does.
///
/// Verifier: a plain array, not an `Option`, whose `None` LLVM returns with
/// bytes undefined, which the verifier refuses to read.
#[inline(never)]
pub fn tunnel_host(ctx: &TcContext) -> [u8; 16] {
    let Frame6::Ipv6(f) = parse6(ctx) else {
        return [0; 16];
    };
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    route6_of(unsafe { (*f.ip).dst_addr }).unwrap_or([0; 16])
}

/// `xhost_nic_xdp` for IPv6: whether `ingress` drops the frame as
/// `drop_spoofed6`: for a local container, from no peer's subnet or, in
/// VXLAN mode, not encapsulated. In reject mode nothing is: `ingress`
/// refuses and answers it.
///
/// Verifier: inlined. As a BPF function of its own LLVM passes it the
/// packet pointers instead of the context, and truncates `data_end`, which
/// the verifier refuses (pointer arithmetic on `pkt_end`).
#[inline(always)]
pub fn spoofed(ctx: &XdpContext) -> bool {
    if reject::rejecting() {
        return false;
    }
    let Frame6::Ipv6(f) = parse6(ctx) else {
        return false;
    };
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let (src, dst) = unsafe { ((*f.ip).src_addr, (*f.ip).dst_addr) };
    let local = endpoint6(dst).ifindex != 0 || LOCAL_NETS6.get(&host_key6(dst)).is_some();
    local && (tunnel::device().is_some() || route6_slot_of(src).is_none())
}

/// The endpoint of local container `addr` (`endpoint`'s twin).
#[inline(always)]
fn endpoint6(addr: [u8; 16]) -> Endpoint {
    // SAFETY: the value is copied out at once.
    unsafe { ENDPOINTS6.get(addr) }.map_or(NO_ENDPOINT, |e| *e)
}

/// Routes the frame one hop: new L2 addresses, hop limit - 1 (IPv6 has no
/// header checksum).
#[inline(always)]
fn rewrite6(f: &Ipv6Frame, smac: [u8; 6], dmac: [u8; 6]) {
    // SAFETY: `f.eth` was bounds-checked by `parse6` and no helper has
    // moved packet data since.
    unsafe {
        (*f.eth).src_addr = smac;
        (*f.eth).dst_addr = dmac;
    }
    decrement_hop_limit(f);
}

#[inline(always)]
fn decrement_hop_limit(f: &Ipv6Frame) {
    // SAFETY: `f.ip` was bounds-checked by `parse6` and no helper has moved
    // packet data since.
    unsafe { (*f.ip).hop_limit -= 1 };
}
