//! Per-CPU cache of `xhost_veth_in`'s forwarding answers.
//!
//! A container's packet to a peer's container costs three lookups before it
//! can leave: its endpoint (`ENDPOINTS`), the peer owning the destination
//! (`ROUTES`) and the next hop to that peer (`bpf_fib_lookup`). Their answer
//! depends only on the ingress veth, the two addresses and the state of the
//! maps and of the kernel's routes and neighbours, so it is kept per CPU,
//! direct-mapped by (veth, source, destination), for the following packets.
//!
//! An answer is used only while both hold:
//! * the generation it was read under is current. The agent bumps the
//!   generation after every map write, and after every route, rule,
//!   neighbour, address or link change the kernel reports;
//! * it is younger than [`MAX_AGE_NS`], which bounds what an answer could
//!   miss if no bump came (a path MTU learned from ICMP, no agent running).
//!
//! The packet must also still fit: the answer carries the longest IPv4
//! length the FIB accepted for the route's MTU; anything longer takes the
//! full path, which checks the MTU again. A TCP GSO burst (a container's
//! TSO send) counts as its longest segment, which is what leaves; other GSO
//! bursts, whose segments only the kernel measures, always take the full
//! path and are never filed.

use core::ptr::read_volatile;

use aya_ebpf::{
    btf_maps::PerCpuArray,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::btf_map,
};
use xhost_common::{FLOW_CACHE_SLOTS, HELPER_KTIME_COARSE};

use crate::{kernel, maps::DATAPATH_GEN};

/// Longest an answer is used without a fresh lookup.
const MAX_AGE_NS: u64 = 100_000_000;

/// One forwarding answer: frames from `src` on veth `iif` (sent by
/// `ctr_mac`, addressed to `gw_mac`) for `dst` leave on `ifindex` with
/// `smac` -> `dmac`; in VXLAN mode encapsulated from `source` to peer host
/// `peer`. Only frames whose source was checked are filed, so a hit is
/// also that check's verdict.
#[repr(C)]
#[derive(Clone, Copy)]
struct FlowSlot {
    iif: u32,
    src: [u8; 4],
    dst: [u8; 4],
    /// Longest IPv4 total length known to fit; 0: the slot is empty.
    max_len: u32,
    generation: u64,
    expires_ns: u64,
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
    gw_mac: [u8; 6],
    ctr_mac: [u8; 6],
    peer: [u8; 4],
    source: [u8; 4],
    /// The `PEER_STATS` slot of the peer the route leads to.
    slot: u32,
}

impl FlowSlot {
    /// Whether the slot holds an answer for `(iif, src, dst)` read under
    /// `generation`.
    #[inline(always)]
    fn is_for(&self, iif: u32, src: [u8; 4], dst: [u8; 4], generation: u64) -> bool {
        self.max_len != 0
            && self.generation == generation
            && self.iif == iif
            && self.src == src
            && self.dst == dst
    }
}

#[btf_map]
static FLOW_CACHE: PerCpuArray<FlowSlot, { FLOW_CACHE_SLOTS as usize }> = PerCpuArray::new();

/// A cached answer.
pub struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub gw_mac: [u8; 6],
    /// The container's MAC: the source MAC of the frames it answers.
    pub ctr_mac: [u8; 6],
    /// VXLAN mode: the outer destination (the peer host) and source.
    pub peer: [u8; 4],
    pub source: [u8; 4],
    /// The `PEER_STATS` slot of the peer the route leads to.
    pub slot: u32,
}

/// Where a miss files the answer the full path finds.
pub struct Miss {
    slot: *mut FlowSlot,
    generation: u64,
}

pub enum Lookup {
    Hit(Hop),
    Miss(Miss),
    /// No cache (map missing): nothing to file.
    Off,
}

/// Looks `(iif, src, dst)` up for a packet that leaves as IPv4 packets of
/// at most `tot_len` bytes (see `fib::wire_len`).
#[inline(always)]
pub fn lookup(iif: u32, src: [u8; 4], dst: [u8; 4], tot_len: u16) -> Lookup {
    // The generation is read before anything the answer is made of (see the
    // ROUTES cache in maps.rs for why that order is safe).
    // SAFETY: a plain load of the agent's counter (it only ever grows).
    let Some(generation) = DATAPATH_GEN.get_ptr(0).map(|p| unsafe { read_volatile(p) }) else {
        return Lookup::Off;
    };
    let key = u32::from_ne_bytes(src) ^ u32::from_ne_bytes(dst).rotate_left(16) ^ iif;
    let index = key.wrapping_mul(0x9e37_79b1) >> (32 - FLOW_CACHE_SLOTS.trailing_zeros());
    let Some(slot) = FLOW_CACHE.get_ptr_mut(index) else {
        return Lookup::Off;
    };
    // SAFETY: this CPU's slot; networking programs do not nest on a CPU.
    let s = unsafe { &*slot };
    // The clock is read only for a slot that answers this packet: traffic
    // the cache never holds (not for a peer) costs no helper call.
    if u32::from(tot_len) <= s.max_len
        && s.is_for(iif, src, dst, generation)
        && coarse_now() < s.expires_ns
    {
        return Lookup::Hit(Hop {
            ifindex: s.ifindex,
            smac: s.smac,
            dmac: s.dmac,
            gw_mac: s.gw_mac,
            ctr_mac: s.ctr_mac,
            peer: s.peer,
            source: s.source,
            slot: s.slot,
        });
    }
    Lookup::Miss(Miss { slot, generation })
}

#[inline(always)]
pub fn coarse_now() -> u64 {
    // The coarse clock is enough for ages of a second and cheaper; before
    // Linux 5.11 there is only the precise one (same clock, CLOCK_MONOTONIC).
    if kernel::has(HELPER_KTIME_COARSE) {
        // SAFETY: plain helper call.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_ktime_get_ns() }
    }
}

/// Files the full path's answer, found for packets of up to `tot_len`
/// bytes.
#[inline(always)]
pub fn store(miss: &Miss, iif: u32, src: [u8; 4], dst: [u8; 4], tot_len: u16, hop: &Hop) {
    // SAFETY: this CPU's slot (see `lookup`).
    let s = unsafe { &mut *miss.slot };
    let now = coarse_now();
    let same = s.is_for(iif, src, dst, miss.generation)
        && s.ifindex == hop.ifindex
        && s.smac == hop.smac
        && s.dmac == hop.dmac
        && s.gw_mac == hop.gw_mac
        && s.ctr_mac == hop.ctr_mac
        && s.peer == hop.peer
        && s.source == hop.source
        && s.slot == hop.slot;
    // A longer packet that fit raises what is known to fit, until the slot
    // ages out: the age bounds its oldest fact. A new or aged answer starts
    // again from this packet's length (a path MTU may have dropped since,
    // without a notification).
    let (max_len, expires_ns) = if same && now < s.expires_ns {
        (s.max_len.max(u32::from(tot_len)), s.expires_ns)
    } else {
        (u32::from(tot_len), now + MAX_AGE_NS)
    };
    *s = FlowSlot {
        iif,
        src,
        dst,
        max_len,
        generation: miss.generation,
        expires_ns,
        ifindex: hop.ifindex,
        smac: hop.smac,
        dmac: hop.dmac,
        gw_mac: hop.gw_mac,
        ctr_mac: hop.ctr_mac,
        peer: hop.peer,
        source: hop.source,
        slot: hop.slot,
    };
}
