//! IPv6 in native routing mode: the twins of `try_egress`, `deliver` and
//! the XDP check, for `ROUTES6`, `LOCAL_NETS6` and `ENDPOINTS6`.
//!
//! * Left to the kernel untouched: what `parse6` refuses
//!   (`pass_malformed`), link-local and multicast addresses and neighbour
//!   discovery (`pass_control6`), a next header other than TCP, UDP or
//!   ICMPv6 (`pass_ext6`: extension headers are not parsed), hop limit <= 1
//!   (`pass_hop_limit6`), and in VXLAN mode every IPv6 packet
//!   (`pass_not_ours6`: the tunnel carries IPv4 only).
//! * The source policy runs before the next header and the hop limit are
//!   looked at, as for IPv4: no IPv6 packet for a peer leaves with an
//!   address that is not its sender's, none from outside the peers'
//!   subnets reaches a local container. Refusals are answered as IPv4's
//!   are with `--deny reject` (`reject::refuse6`).
//! * Peer hosts are reached over the IPv4 underlay: the next hop is the
//!   `AF_INET` FIB answer towards the peer host's address (`ROUTES6`'s
//!   value), which also checks the packet's length against that route's
//!   MTU. Too big, or a neighbour not resolved yet, is the kernel's
//!   (`pass_fib6`), whose own route answers Packet Too Big or resolves it.
//! * Neither the `ROUTES` cache nor the flow cache holds IPv6 answers (both
//!   are keyed by IPv4 addresses): every IPv6 packet takes the full path.

use aya_ebpf::{
    helpers::bpf_redirect_peer,
    programs::{TcContext, XdpContext},
};
use xhost_common::{Endpoint, stat};

use crate::{
    NO_ENDPOINT, Verdict, fib,
    fib::{Answer, Source},
    forwarded, hand_on,
    maps::{ENDPOINT_PORTS, ENDPOINTS6, LOCAL_NETS6, host_key6, route6_slot_of},
    parse::{Frame6, Ipv6Frame, parse6},
    redirect, reject, tunnel,
};

/// Container -> remote container over IPv6, on the container's veth
/// (`from_port`) or at the bridge: `try_egress`'s rules.
///
/// Verifier: a BPF function of its own, as are `ingress` and `spoofed`
/// (see `is_ipv6` in main.rs).
#[inline(never)]
pub fn egress(ctx: &TcContext, from_port: bool) -> Verdict {
    if tunnel::device().is_some() {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    }
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
    // The route to the peer host's IPv4 address; the packet's own source
    // is IPv6, so the lookup has none (only source-based IPv4 rules could
    // have used it).
    let hop = fib::lookup(ctx, iif, [0; 4], peer_host, len, Source::Packet);
    let v = if hop.answer == Answer::Resolved {
        rewrite6(&f, hop.smac, hop.dmac);
        redirect(hop.ifindex, stat::FWD_EGRESS6)
    } else {
        // Unresolved too: `bpf_redirect_neigh` takes an IPv6 packet's next
        // hop as IPv6, and the peer host's is IPv4.
        Verdict::pass(stat::PASS_FIB6)
    };
    hand_on(ctx, mark, v.peer(slot))
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
    if tunnel::device().is_some() {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    }
    let f = match parse6(ctx) {
        Frame6::Ipv6(f) => f,
        Frame6::Control => return Verdict::pass(stat::PASS_CONTROL6),
        Frame6::Malformed => return Verdict::pass(stat::PASS_MALFORMED),
    };
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let (src, dst, hop_limit) = unsafe { ((*f.ip).src_addr, (*f.ip).dst_addr, (*f.ip).hop_limit) };
    let ep = endpoint6(dst);
    if ep.ifindex == 0 && LOCAL_NETS6.get(&host_key6(dst)).is_none() {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    }
    let Some((_, slot)) = route6_slot_of(src) else {
        return Verdict::refused6(ctx, stat::DROP_SPOOFED6);
    };
    if !f.parsed_next {
        return Verdict::pass(stat::PASS_EXT6);
    }
    if hop_limit <= 1 {
        return Verdict::pass(stat::PASS_HOP_LIMIT6);
    }
    if ep.ifindex == 0 {
        return Verdict::pass(stat::PASS_NOT_OURS6);
    }
    rewrite6(&f, ep.gw_mac, ep.mac);
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32;
    forwarded(action, stat::FWD_INGRESS6).peer(slot)
}

/// `xhost_nic_xdp` for IPv6: whether `ingress` drops the frame as
/// `drop_spoofed6`. In reject mode nothing is: `ingress` refuses and
/// answers it.
#[inline(never)]
pub fn spoofed(ctx: &XdpContext) -> bool {
    if tunnel::device().is_some() || reject::rejecting() {
        return false;
    }
    let Frame6::Ipv6(f) = parse6(ctx) else {
        return false;
    };
    // SAFETY: `f.ip` was bounds-checked by `parse6`.
    let (src, dst) = unsafe { ((*f.ip).src_addr, (*f.ip).dst_addr) };
    let local = endpoint6(dst).ifindex != 0 || LOCAL_NETS6.get(&host_key6(dst)).is_some();
    local && route6_slot_of(src).is_none()
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
    // SAFETY: `f.eth` and `f.ip` were bounds-checked by `parse6` and no
    // helper has moved packet data since.
    unsafe {
        (*f.eth).src_addr = smac;
        (*f.eth).dst_addr = dmac;
        (*f.ip).hop_limit -= 1;
    }
}
