//! xhost datapath: native routing of container traffic between hosts.
//!
//! * `xhost_veth_in` (TC ingress of each container's host-side veth): a
//!   container's packet for a peer's subnet is routed straight out the
//!   underlay towards the peer host, with the container IPs kept, before the
//!   bridge (and br_netfilter) sees it. Its answers are cached per flow
//!   (`flow.rs`).
//! * `xhost_bridge_in` (TC ingress of each Docker bridge): the same decision for
//!   whatever reaches the bridge device (containers whose veth is not known
//!   yet); it also counts what `xhost_veth_in` passed on.
//! * `xhost_nic_xdp` (XDP on the underlay NIC): early drop of packets aimed at
//!   local containers from sources that belong to no peer.
//! * `xhost_nic_in` (TC ingress of the underlay NIC): a peer's packet for a
//!   local container is delivered into the container's netns with
//!   `bpf_redirect_peer`, or through the bridge when the endpoint is not
//!   known, skipping netfilter either way.
//!
//! * VXLAN mode (`tunnel.rs`): `xhost_veth_in` / `xhost_bridge_in`
//!   encapsulate in place and `xhost_nic_in` decapsulates; `xhost_vxlan_out`
//!   / `xhost_vxlan_in` (TC egress and ingress of the vxlan device) key and
//!   check what the kernel's device carries instead.
//!
//! Everything the programs do not own goes to the kernel untouched.
#![no_std]
#![no_main]

mod fib;
mod flow;
mod kernel;
mod maps;
mod parse;
mod policy;
mod reject;
mod stats;
mod tunnel;
mod v6;

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_skb_change_type},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use network_types::eth::{EthHdr, EtherType};
use xhost_common::{Endpoint, HELPER_FIB_LOOKUP_SRC, stat};

use crate::{
    fib::{Answer, NextHop, Source, WireLen},
    maps::{ENDPOINT_PORTS, ENDPOINTS, LOCAL_NETS, NO_SLOT, count_peer, host_key, route_slot_of},
    parse::{Frame, PACKET_HOST, decrement_ttl, parse, ptr_at},
    stats::count,
};

/// What a TC program returns for a packet it leaves to the kernel:
/// `TC_ACT_UNSPEC` (tcx's `TCX_NEXT`), "not decided here". The next tcx
/// program or classic tc filter on the device still sees the packet (with
/// `TC_ACT_OK` a tcx program would hide it from every classic filter, and a
/// cls_bpf filter from those after it), and without one the kernel carries
/// on as for `TC_ACT_OK`.
const PASS: i32 = TC_ACT_UNSPEC;

/// A TC verdict together with the counter it is accounted under.
struct Verdict {
    action: i32,
    reason: u32,
    /// The `PEER_STATS` slot of the peer host a forwarded packet goes to or
    /// comes from ([`NO_SLOT`]: none).
    peer: u32,
}

impl Verdict {
    const fn pass(reason: u32) -> Self {
        Self {
            action: PASS,
            reason,
            peer: NO_SLOT,
        }
    }

    const fn drop(reason: u32) -> Self {
        Self {
            action: TC_ACT_SHOT,
            reason,
            peer: NO_SLOT,
        }
    }

    /// The verdict, counted for peer `slot` too if it forwards.
    #[inline(always)]
    const fn peer(self, slot: u32) -> Self {
        Self { peer: slot, ..self }
    }

    /// A refused packet, counted under `reason` (a `DROP_*` counter):
    /// dropped, and with `--deny reject` answered (`reject.rs`).
    #[inline(always)]
    fn refused(ctx: &TcContext, reason: u32) -> Self {
        Self {
            action: reject::refuse(ctx),
            reason,
            peer: NO_SLOT,
        }
    }

    /// [`Verdict::refused`] for IPv6.
    #[inline(always)]
    fn refused6(ctx: &TcContext, reason: u32) -> Self {
        Self {
            action: reject::refuse6(ctx),
            reason,
            peer: NO_SLOT,
        }
    }
}

/// `XHOST_BUILD_SALT` at build time, hashed (FNV-1a): the same source built
/// with another salt has other programs (other instructions, another tag),
/// which is how a program upgrade is tested without a source change.
const BUILD_SALT: u64 = {
    let bytes = match option_env!("XHOST_BUILD_SALT") {
        Some(s) => s.as_bytes(),
        None => b"",
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
};

/// Puts [`BUILD_SALT`] into the program's instructions: one store to the
/// stack, which the compiler must keep (volatile) and the verifier accepts.
#[inline(always)]
fn build_mark() {
    let mut slot = 0u64;
    // SAFETY: a write to a local.
    unsafe { core::ptr::write_volatile(&mut slot, BUILD_SALT) };
}

/// What a missing `ENDPOINTS` entry reads as.
const NO_ENDPOINT: Endpoint = Endpoint {
    ifindex: 0,
    flags: 0,
    mac: [0; 6],
    gw_mac: [0; 6],
    _pad: [0; 4],
};

#[classifier]
pub fn xhost_bridge_in(ctx: TcContext) -> i32 {
    build_mark();
    // Counted as it arrived (VXLAN mode may grow it).
    let len = ctx.len();
    let v = if is_ipv6(&ctx) {
        v6::egress(&ctx, false)
    } else {
        try_egress(&ctx, false)
    };
    finish_len(len, v)
}

#[classifier]
pub fn xhost_veth_in(ctx: TcContext) -> i32 {
    build_mark();
    let len = ctx.len();
    let v = if is_ipv6(&ctx) {
        v6::egress(&ctx, true)
    } else {
        try_egress(&ctx, true)
    };
    // What this program passes goes on into the bridge, where xhost_bridge_in
    // decides (and counts) again if it reaches the bridge device: counting
    // here too would count those packets twice.
    if v.action != PASS {
        count(v.reason, len);
        count_forwarded(&v, len);
    }
    v.action
}

#[classifier]
pub fn xhost_nic_in(ctx: TcContext) -> i32 {
    build_mark();
    let arrived = ctx.len();
    let v = if is_ipv6(&ctx) {
        v6::ingress(&ctx)
    } else if tunnel::device().is_some()
        && tunnel::carries_ipv6(&ctx)
        && let Some(v) = v6::decapsulated(&ctx)
    {
        v
    } else {
        try_ingress(&ctx)
    };
    // Counted as the program leaves it (decapsulated: the inner frame), but
    // a refused packet as it arrived: its skb may hold the answer now.
    let len = if v.reason == stat::DROP_SPOOFED || v.reason == stat::DROP_SPOOFED6 {
        arrived
    } else {
        ctx.len()
    };
    finish_len(len, v)
}

#[classifier]
pub fn xhost_vxlan_in(ctx: TcContext) -> i32 {
    build_mark();
    let v = if is_ipv6(&ctx) {
        v6::from_tunnel(&ctx)
    } else {
        try_from_tunnel(&ctx)
    };
    if v.action == PASS {
        // The inner frame is addressed to the sending host's gateway MAC,
        // so the device marked it for another host, which ip_rcv drops:
        // what the kernel is handed here (TTL expiry, ...) is for this one.
        // SAFETY: plain helper call.
        unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
    }
    finish(&ctx, v)
}

#[classifier]
pub fn xhost_vxlan_out(ctx: TcContext) -> i32 {
    build_mark();
    let keyed = match parse(&ctx) {
        // SAFETY: `f.ip` was bounds-checked by `parse`.
        Frame::Ipv4(f) => maps::route_of(unsafe { (*f.ip).dst_addr })
            .is_some_and(|host| tunnel::set_key(&ctx, host)),
        Frame::Ipv6 => {
            let host = v6::tunnel_host(&ctx);
            match xhost_common::mapped_v4(&host) {
                Some(v4) => tunnel::set_key(&ctx, v4),
                None => host != [0; 16] && tunnel::set_key6(&ctx, host),
            }
        }
        _ => false,
    };
    // What no peer owns (IPv6 control traffic of the device's own among
    // it) has nowhere to go.
    if keyed {
        // Counted where it was decided (xhost_veth_in, xhost_bridge_in), or a
        // packet of the kernel's own.
        PASS
    } else {
        finish(&ctx, Verdict::drop(stat::DROP_TUNNEL))
    }
}

/// Whether the frame's EtherType is IPv6: the entry points hand such a
/// frame to `v6.rs`, anything else to the IPv4 path.
///
/// Verifier: the IPv4 path (`try_egress`, `try_ingress`) and the IPv6 one
/// are BPF functions of their own, each with its own stack frame, called
/// one or the other from the entry point: together in one frame, their
/// locals exceed the 512-byte stack (and one calling the other would add
/// their frames up, which the verifier refuses too).
#[inline(always)]
fn is_ipv6(ctx: &TcContext) -> bool {
    // SAFETY: `eth` is bounds-checked by ptr_at.
    ptr_at::<EthHdr, TcContext>(ctx, 0)
        .is_some_and(|eth| unsafe { (*eth).ether_type } == EtherType::Ipv6 as u16)
}

/// Counts the verdict and returns exactly the action that was computed.
#[inline(always)]
fn finish(ctx: &TcContext, v: Verdict) -> i32 {
    finish_len(ctx.len(), v)
}

/// [`finish`] for a frame of `len` bytes.
#[inline(always)]
fn finish_len(len: u32, v: Verdict) -> i32 {
    count(v.reason, len);
    count_forwarded(&v, len);
    v.action
}

/// Counts a packet forwarded to or delivered from a peer host under that
/// peer (`PEER_STATS`).
#[inline(always)]
fn count_forwarded(v: &Verdict, len: u32) {
    if v.action == TC_ACT_REDIRECT && v.peer != NO_SLOT {
        match v.reason {
            stat::FWD_EGRESS | stat::FWD_EGRESS6 => count_peer(v.peer, true, len),
            stat::FWD_INGRESS | stat::FWD_INGRESS6 => count_peer(v.peer, false, len),
            _ => {}
        }
    }
}

/// Container -> remote container, seen on the container's veth (any frame
/// it sends) or on the bridge's ingress (frames addressed to the gateway
/// MAC, which the bridge hands up to its own device).
///
/// A packet for a peer's subnet leaves only with the address of the
/// container that sent it (docs/security.md); anything else is dropped as
/// `DROP_SPOOFED_LOCAL`, whichever of the two paths it takes:
/// * on a known endpoint's veth (`from_port`): its own address and MAC.
///   Frames to its gateway are routed here; others go on into the bridge,
///   marked as checked on this port ([`hand_on`]).
/// * at the bridge: a known endpoint's address only as marked by its own
///   veth, an unknown one only with the MAC the bridge's neighbour entry
///   gives it ([`bridge_sender`]).
#[inline(never)]
fn try_egress(ctx: &TcContext, from_port: bool) -> Verdict {
    let f = match parse(ctx) {
        Frame::Ipv4(f) => f,
        // The entry points hand IPv6 to `v6::egress` (see `is_ipv6`).
        Frame::Ipv6 => return Verdict::pass(stat::PASS_NOT_OURS6),
        Frame::NotIpv4 => return Verdict::pass(stat::PASS_NOT_IPV4),
        Frame::Malformed => return Verdict::pass(stat::PASS_MALFORMED),
    };
    // SAFETY: `f.ip` was bounds-checked by `parse`.
    let (src, dst, ttl) = unsafe { ((*f.ip).src_addr, (*f.ip).dst_addr, (*f.ip).ttl) };
    // SAFETY: reading the ingress ifindex of the skb context.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: `f.eth` was bounds-checked by `parse`.
    let (to_mac, from_mac) = unsafe { ((*f.eth).dst_addr, (*f.eth).src_addr) };
    // What a veth hands on to the bridge is marked as checked on it.
    let mark = if from_port { iif } else { 0 };
    let tunnel = tunnel::device();
    // What leaves the underlay: the packet itself, or in VXLAN mode the
    // packet encapsulated here (or by the device, for what the program
    // cannot grow).
    let (len, encap) = match (tunnel, fib::wire_len(ctx, &f)) {
        (None, len) => (len, Encap::No),
        // Encapsulating here needs the route's source address.
        (Some(_), len) if !kernel::has(HELPER_FIB_LOOKUP_SRC) => (len, Encap::Device),
        (Some(_), len) => match tunnel::outer_len(ctx, len) {
            Some(outer) => (WireLen::Max(outer), Encap::Here),
            None => (len, Encap::Device),
        },
    };
    let cached = match (from_port, len, encap) {
        (true, WireLen::Max(len), Encap::No | Encap::Here) => flow::lookup(iif, src, dst, len),
        _ => flow::Lookup::Off,
    };
    // Only checked sources are filed: a hit from the same MAC is checked.
    if let flow::Lookup::Hit(hop) = &cached
        && to_mac == hop.gw_mac
        && from_mac == hop.ctr_mac
    {
        if ttl <= 1 {
            return hand_on(ctx, mark, Verdict::pass(stat::PASS_TTL));
        }
        if encap == Encap::Here {
            return send_encapsulated(ctx, &f, hop.peer, &NextHop::resolved(hop)).peer(hop.slot);
        }
        rewrite(&f, hop.smac, hop.dmac);
        return redirect(hop.ifindex, stat::FWD_EGRESS).peer(hop.slot);
    }
    let Some((peer_host, slot)) = route_slot_of(dst) else {
        if tunnel.is_some() && tunnel::is_ours_from_container(ctx, &f) {
            debug!(ctx, "drop: a container's own VXLAN packet with our VNI");
            return Verdict::refused(ctx, stat::DROP_SPOOFED_LOCAL);
        }
        // Host-bound, local, or the internet (Docker's MASQUERADE).
        return Verdict::pass(stat::PASS_NOT_OURS);
    };
    // For a peer: only from the sender's own address, checked before
    // anything else (TTL included) is decided.
    if from_port {
        let ep = endpoint(src);
        if ep.ifindex != iif || from_mac != ep.mac {
            // SAFETY: lookup of a plain key; the value is not dereferenced.
            if ep.ifindex == 0 && unsafe { ENDPOINT_PORTS.get(iif) }.is_none() {
                // The veth's endpoints are not all written (yet, or any
                // more): an address it does not know is the bridge's to
                // check, unmarked.
                return Verdict::pass(stat::PASS_NOT_OURS);
            }
            debug!(ctx, "drop: not the address of this veth's endpoint");
            return Verdict::refused(ctx, stat::DROP_SPOOFED_LOCAL);
        }
        if to_mac != ep.gw_mac {
            // For another host on the bridge, which routes it if it is its
            // own: checked here, so the bridge device accepts it.
            return hand_on(ctx, mark, Verdict::pass(stat::PASS_NOT_OURS));
        }
    } else {
        match bridge_sender(ctx, src, from_mac, iif, dst) {
            Sender::Owner => {}
            // Not this host's containers' business: the kernel's, as
            // before; the peer drops it as `DROP_SPOOFED`.
            Sender::NotLocal => return Verdict::pass(stat::PASS_NOT_OURS),
            Sender::Spoofed => {
                debug!(ctx, "drop: source not the sending container's");
                return Verdict::refused(ctx, stat::DROP_SPOOFED_LOCAL);
            }
        }
    }
    if ttl <= 1 {
        return hand_on(ctx, mark, Verdict::pass(stat::PASS_TTL));
    }
    if let (Some(device), Encap::Device) = (tunnel, encap) {
        // Too big for the tunnel: the kernel's route through the device
        // answers fragmentation-needed.
        if !fib::fits(ctx, device) {
            return hand_on(ctx, mark, Verdict::pass(stat::PASS_FIB));
        }
        // xhost_vxlan_out addresses it to the peer host.
        decrement_ttl(f.ip);
        return redirect(device, stat::FWD_EGRESS).peer(slot);
    }
    // The peer host is the next hop, or the outer destination: resolve the
    // route to it, not to the container prefix, which the kernel has no
    // route for (or one into the vxlan device).
    let source = match encap {
        Encap::Here => Source::Route,
        _ => Source::Packet,
    };
    let hop = fib::lookup(ctx, iif, src, peer_host, len, source);
    // Only an answer the FIB gave for a length is filed (a miss was looked
    // up with one): what fits is known only up to that length.
    if let (flow::Lookup::Miss(miss), Answer::Resolved, WireLen::Max(len)) =
        (&cached, hop.answer, len)
    {
        let answer = flow::Hop {
            ifindex: hop.ifindex,
            smac: hop.smac,
            dmac: hop.dmac,
            gw_mac: to_mac,
            ctr_mac: from_mac,
            peer: peer_host,
            source: hop.source,
            slot,
        };
        flow::store(miss, iif, src, dst, len, &answer);
    }
    let v = if encap == Encap::Here {
        send_encapsulated(ctx, &f, peer_host, &hop)
    } else {
        route(&f, hop, stat::FWD_EGRESS)
    };
    hand_on(ctx, mark, v.peer(slot))
}

/// `v`, and when it passes the frame on (to the bridge, from a veth whose
/// endpoint sent it: `mark` is the veth's ifindex, else 0) the frame marked
/// as checked on that veth, for [`bridge_sender`].
///
/// The mark is the skb's priority: every veth zeroes it as a frame leaves
/// the container's netns (`__dev_forward_skb`), so a container cannot set
/// it, the bridge keeps it, and the bridge's program zeroes it again, so
/// the kernel's path after it sees the priority it would have seen. Only
/// what is handed on to the bridge is marked, never a redirected frame.
#[inline(always)]
fn hand_on(ctx: &TcContext, mark: u32, v: Verdict) -> Verdict {
    if mark != 0 && v.action == PASS {
        // SAFETY: TC programs may write the skb's priority.
        unsafe { (*ctx.skb.skb).priority = mark };
    }
    v
}

/// Who sent a frame that reached the bridge, as far as it can be told.
enum Sender {
    /// The owner of its source address.
    Owner,
    /// Not from this host's container subnets.
    NotLocal,
    /// A container that does not own the source address.
    Spoofed,
}

/// The bridge path: whether a frame for a peer from `src` (source MAC
/// `from_mac`) that reached bridge `bridge` was sent by the owner of `src`.
///
/// The bridge device cannot see which port a frame came in on (the skb's
/// ingress ifindex is the bridge's own by now), but the mark
/// [`hand_on`] leaves says which known endpoint's veth checked it.
/// * A known endpoint's address must carry its own veth's mark and MAC:
///   unmarked, it came from a port that is not its own.
/// * An unknown address of this host's container subnets must come
///   unmarked (a marked port hands on only its endpoint's address), with
///   the source MAC the bridge's own neighbour entry gives it, read live
///   through the FIB: what the container taught the bridge when it asked
///   for its gateway. An address no container announced has no entry.
/// * Any other address is not this host's containers' (`NotLocal`).
#[inline(always)]
fn bridge_sender(
    ctx: &TcContext,
    src: [u8; 4],
    from_mac: [u8; 6],
    bridge: u32,
    dst: [u8; 4],
) -> Sender {
    // SAFETY: reading the skb's priority from its context.
    let mark = unsafe { (*ctx.skb.skb).priority };
    if mark != 0 {
        // SAFETY: TC programs may write the skb's priority.
        unsafe { (*ctx.skb.skb).priority = 0 };
    }
    let ep = endpoint(src);
    let owner = if ep.ifindex != 0 {
        mark == ep.ifindex && from_mac == ep.mac
    } else if LOCAL_NETS.get(&host_key(src)).is_none() {
        return Sender::NotLocal;
    } else {
        mark == 0 && fib::neighbour_mac(ctx, bridge, src, dst) == Some(from_mac)
    };
    if owner {
        Sender::Owner
    } else {
        Sender::Spoofed
    }
}

/// How a routed packet crosses the underlay.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encap {
    /// Native routing: as it is.
    No,
    /// VXLAN mode: encapsulated by the program (`tunnel::encapsulate`).
    Here,
    /// VXLAN mode: by the vxlan device, for what the program cannot grow.
    Device,
}

/// VXLAN mode: routes the frame one hop (TTL - 1), encapsulates it for peer
/// host `peer` and sends it along `hop`, the FIB's answer for the outer
/// packet. No answer leaves the frame to the kernel, whose route into the
/// vxlan device answers what the FIB refused (fragmentation-needed).
#[inline(always)]
fn send_encapsulated(
    ctx: &TcContext,
    f: &parse::Ipv4Frame,
    peer: [u8; 4],
    hop: &NextHop,
) -> Verdict {
    if hop.answer == Answer::Kernel {
        return Verdict::pass(stat::PASS_FIB);
    }
    decrement_ttl(f.ip);
    // SAFETY: `f.ip` was bounds-checked by `parse`.
    let tos = unsafe { (*f.ip).tos };
    if !tunnel::encapsulate(ctx, f.eth, tos, hop.source, peer, hop.smac, hop.dmac) {
        return Verdict::drop(stat::DROP_TUNNEL);
    }
    match hop.answer {
        Answer::Unresolved => forwarded(
            fib::redirect_neigh(hop.ifindex, hop.nexthop),
            stat::FWD_EGRESS,
        ),
        _ => redirect(hop.ifindex, stat::FWD_EGRESS),
    }
}

/// Remote container -> local container, seen on the underlay's ingress.
#[inline(never)]
fn try_ingress(ctx: &TcContext) -> Verdict {
    let f = match parse(ctx) {
        Frame::Ipv4(f) => f,
        // The entry point hands IPv6 to `v6::ingress` (see `is_ipv6`).
        Frame::Ipv6 => return Verdict::pass(stat::PASS_NOT_OURS6),
        Frame::NotIpv4 => return Verdict::pass(stat::PASS_NOT_IPV4),
        Frame::Malformed => return Verdict::pass(stat::PASS_MALFORMED),
    };
    if tunnel::device().is_some()
        && let Some(v) = deliver_decapsulated(ctx, &f)
    {
        return v;
    }
    deliver(ctx, &f, tunnel::device().is_some(), true)
}

/// VXLAN mode, on the underlay: a peer's VXLAN packet for a local
/// container's endpoint, decapsulated and delivered by the program, so
/// that it skips the host's stack (netfilter and conntrack of the outer
/// UDP, the UDP socket, the vxlan device and its GRO cell). It must be one
/// the program may decapsulate (`tunnel::inbound`), with an inner source
/// in the subnets `ROUTES` gives the outer source (so the sender is a peer
/// host, and `policy` allows the source), a TTL to route it with and a
/// known endpoint. `None`: the kernel's, as before.
#[inline(always)]
fn deliver_decapsulated(ctx: &TcContext, f: &parse::Ipv4Frame) -> Option<Verdict> {
    let t = tunnel::inbound(ctx, f)?;
    // SAFETY: `t.inner.ip` was bounds-checked by `parse_at`.
    let (src, dst, ttl) = unsafe {
        (
            (*t.inner.ip).src_addr,
            (*t.inner.ip).dst_addr,
            (*t.inner.ip).ttl,
        )
    };
    let (owner, slot) = route_slot_of(src)?;
    if ttl <= 1 || owner != t.peer {
        return None;
    }
    let ep = endpoint(dst);
    if ep.ifindex == 0 {
        return None;
    }
    if !tunnel::decapsulate(ctx) {
        // The frame is as it was, for the kernel's device to decapsulate;
        // `f` is stale (the helper may have moved the packet).
        return Some(Verdict::pass(stat::PASS_NOT_OURS));
    }
    // The frame is now the outer Ethernet header and the inner packet,
    // which was parsed where it lay a moment ago.
    let (Some(eth), Some(ip)) = (ptr_at(ctx, 0), ptr_at(ctx, EthHdr::LEN)) else {
        // The helper leaves the headers in the linear part: unreachable.
        return Some(Verdict::drop(stat::DROP_TUNNEL));
    };
    let inner = parse::Ipv4Frame {
        eth,
        ip,
        tot_len: t.inner.tot_len,
    };
    Some(into_endpoint(&inner, &ep).peer(slot))
}

/// Routes the frame to local endpoint `ep` (its MACs, TTL - 1) and puts it
/// straight into the container's netns: no bridge, no backlog.
#[inline(always)]
fn into_endpoint(f: &parse::Ipv4Frame, ep: &Endpoint) -> Verdict {
    rewrite(f, ep.gw_mac, ep.mac);
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32;
    forwarded(action, stat::FWD_INGRESS)
}

/// The endpoint of local container `addr`. An absent one reads as
/// [`NO_ENDPOINT`], ifindex 0 (no interface has it): every byte defined,
/// where an `Option` would leave some to LLVM, which then copies them and
/// the verifier refuses.
#[inline(always)]
fn endpoint(addr: [u8; 4]) -> Endpoint {
    // SAFETY: HashMap::get hands out a reference the agent may overwrite
    // concurrently; the value is copied out at once.
    unsafe { ENDPOINTS.get(addr) }.map_or(NO_ENDPOINT, |e| *e)
}

/// Decapsulated by the vxlan device: delivered as on the underlay, once the
/// tunnel vouches for its sender.
#[inline(always)]
fn try_from_tunnel(ctx: &TcContext) -> Verdict {
    let Some(outer) = tunnel::sender(ctx) else {
        debug!(ctx, "drop: tunnel packet not from a peer host with our VNI");
        return Verdict::drop(stat::DROP_SPOOFED);
    };
    let f = match parse(ctx) {
        Frame::Ipv4(f) => f,
        // The entry point hands IPv6 to `v6::from_tunnel` (see `is_ipv6`).
        Frame::Ipv6 => return Verdict::pass(stat::PASS_NOT_OURS6),
        Frame::NotIpv4 => return Verdict::pass(stat::PASS_NOT_IPV4),
        Frame::Malformed => return Verdict::pass(stat::PASS_MALFORMED),
    };
    // SAFETY: `f.ip` was bounds-checked by `parse`.
    let src = unsafe { (*f.ip).src_addr };
    if !tunnel::sent_by(src, outer) {
        debug!(ctx, "drop: inner source not the sending peer's");
        return Verdict::drop(stat::DROP_SPOOFED);
    }
    // Refused here, it is not answered: the answer would have to be
    // encapsulated (docs/security.md).
    deliver(ctx, &f, false, false)
}

/// Delivers a peer's packet for a local container. With `encapsulated_only`
/// (VXLAN mode, on the underlay) none arrives bare: such a packet is
/// dropped. With `answer`, a refused packet is answered in reject mode.
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    f: &parse::Ipv4Frame,
    encapsulated_only: bool,
    answer: bool,
) -> Verdict {
    let refused = |reason| {
        if answer {
            Verdict::refused(ctx, reason)
        } else {
            Verdict::drop(reason)
        }
    };
    // SAFETY: `f.ip` was bounds-checked by `parse`.
    let (src, dst, ttl) = unsafe { ((*f.ip).src_addr, (*f.ip).dst_addr, (*f.ip).ttl) };
    // A known endpoint is local; only unknown destinations need the LPM.
    let ep = endpoint(dst);
    if ep.ifindex == 0 && LOCAL_NETS.get(&host_key(dst)).is_none() {
        return Verdict::pass(stat::PASS_NOT_OURS);
    }
    if encapsulated_only {
        debug!(ctx, "drop: container traffic not encapsulated");
        return refused(stat::DROP_SPOOFED);
    }
    // Docker's isolation is bypassed here, so enforce it (see policy.rs).
    // The same check runs in XDP when attached; it is repeated because XDP
    // may be off, and costs one (cached) ROUTES lookup.
    let Some(slot) = policy::source_allowed(ctx, f, src) else {
        debug!(ctx, "drop: source not a peer's");
        return refused(stat::DROP_SPOOFED);
    };
    if ttl <= 1 {
        return Verdict::pass(stat::PASS_TTL);
    }
    if ep.ifindex != 0 {
        return into_endpoint(f, &ep).peer(slot);
    }
    // SAFETY: reading the ingress ifindex of the skb context.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    route(
        f,
        fib::lookup(ctx, iif, src, dst, fib::wire_len(ctx, f), Source::Packet),
        stat::FWD_INGRESS,
    )
    .peer(slot)
}

/// Forwards the frame along the FIB's answer, counted under `reason`; no
/// answer (no route, a local or broadcast address, forwarding off, MTU)
/// leaves it to the kernel.
#[inline(always)]
fn route(f: &parse::Ipv4Frame, hop: NextHop, reason: u32) -> Verdict {
    match hop.answer {
        Answer::Resolved => {
            rewrite(f, hop.smac, hop.dmac);
            redirect(hop.ifindex, reason)
        }
        Answer::Unresolved => {
            decrement_ttl(f.ip);
            forwarded(fib::redirect_neigh(hop.ifindex, hop.nexthop), reason)
        }
        Answer::Kernel => Verdict::pass(stat::PASS_FIB),
    }
}

/// Routes the frame one hop: new L2 addresses, TTL - 1.
#[inline(always)]
fn rewrite(f: &parse::Ipv4Frame, smac: [u8; 6], dmac: [u8; 6]) {
    // SAFETY: `f.eth` was bounds-checked by `parse` and no helper has moved
    // packet data since.
    unsafe {
        (*f.eth).src_addr = smac;
        (*f.eth).dst_addr = dmac;
    }
    decrement_ttl(f.ip);
}

#[inline(always)]
fn redirect(ifindex: u32, reason: u32) -> Verdict {
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    forwarded(action, reason)
}

/// A redirect helper's result: forwarded, or a counted drop (the frame was
/// already rewritten, so it cannot go back to the kernel).
#[inline(always)]
fn forwarded(action: i32, reason: u32) -> Verdict {
    if action == TC_ACT_REDIRECT {
        Verdict {
            action,
            reason,
            peer: NO_SLOT,
        }
    } else {
        Verdict::drop(stat::DROP_REDIRECT)
    }
}

/// Early validation on the underlay: drops what `xhost_nic_in` would drop,
/// before an skb is built. Passes everything else; the TC program counts it.
#[xdp]
pub fn xhost_nic_xdp(ctx: XdpContext) -> u32 {
    build_mark();
    let f = match parse(&ctx) {
        Frame::Ipv4(f) => f,
        Frame::Ipv6 if v6::spoofed(&ctx) => {
            count(stat::DROP_SPOOFED6, (ctx.data_end() - ctx.data()) as u32);
            return xdp_action::XDP_DROP;
        }
        _ => return xdp_action::XDP_PASS,
    };
    // SAFETY: `f.ip` was bounds-checked by `parse`.
    let (src, dst) = unsafe { ((*f.ip).src_addr, (*f.ip).dst_addr) };
    // A local container, as `deliver` tells it: a known endpoint (whose
    // address may lie outside LOCAL_NETS), else the LPM. In VXLAN mode
    // container traffic arrives encapsulated only. In reject mode what is
    // refused is left to xhost_nic_in, which answers it.
    let local = endpoint(dst).ifindex != 0 || LOCAL_NETS.get(&host_key(dst)).is_some();
    if !reject::rejecting()
        && local
        && (tunnel::device().is_some() || policy::source_allowed(&ctx, &f, src).is_none())
    {
        count(stat::DROP_SPOOFED, (ctx.data_end() - ctx.data()) as u32);
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Verifier: no panics survive into a loaded program; this is unreachable.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
