//! The routing state the agent writes and the datapath reads.

use core::ptr::read_volatile;

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use xhost_common::{
    Endpoint, LocalNet, MAX_ENDPOINTS, MAX_LOCAL_NETS, MAX_LOCAL_NETS6, MAX_PEER_HOSTS, MAX_ROUTES,
    MAX_ROUTES6, MAX_UNDERLAY_ADDRS, Peer, Peer6, PeerCounters, PeerHost, ROUTE_CACHE_SLOTS,
    mapped_v4,
};

/// Remote container prefixes -> the peer host that owns them. Read through
/// [`route_of`].
#[btf_map]
static ROUTES: LpmTrie<[u8; 4], Peer, { MAX_ROUTES as usize }> = LpmTrie::new();

/// Generation of everything the datapath caches (slot 0): the agent bumps
/// it after every write to `ROUTES` or `ENDPOINTS` and after every change
/// the kernel reports to routes, rules, neighbours, addresses or links.
#[btf_map]
pub static DATAPATH_GEN: Array<u64, 1> = Array::new();

/// This host's container subnets (docker0, user bridges).
#[btf_map]
pub static LOCAL_NETS: LpmTrie<[u8; 4], LocalNet, { MAX_LOCAL_NETS as usize }> = LpmTrie::new();

/// Local container IPv4 (network order) -> its veth endpoint.
#[btf_map]
pub static ENDPOINTS: HashMap<[u8; 4], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();

/// Remote container IPv6 prefixes -> the peer host (IPv6 underlay address,
/// or IPv4 mapped) that owns them. Read through [`route6_slot_of`] (not
/// cached: see there).
#[btf_map]
static ROUTES6: LpmTrie<[u8; 16], Peer6, { MAX_ROUTES6 as usize }> = LpmTrie::new();

/// This host's IPv6 container subnets.
#[btf_map]
pub static LOCAL_NETS6: LpmTrie<[u8; 16], LocalNet, { MAX_LOCAL_NETS6 as usize }> = LpmTrie::new();

/// Local container IPv6 (network order) -> its veth endpoint. Sized with
/// `ENDPOINTS` by the loader (`--max-endpoints`).
#[btf_map]
pub static ENDPOINTS6: HashMap<[u8; 16], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();

/// Veths of known endpoints (ifindex) whose endpoints are all written:
/// there any other source for a peer is dropped (see
/// `xhost_common::MAP_ENDPOINT_PORTS`).
#[btf_map]
pub static ENDPOINT_PORTS: HashMap<u32, u32, { MAX_ENDPOINTS as usize }> = HashMap::new();

/// Underlay addresses of the peer hosts (network order).
#[btf_map]
pub static PEER_HOSTS: HashMap<[u8; 4], PeerHost, { MAX_PEER_HOSTS as usize }> = HashMap::new();

/// Underlay addresses of the peer hosts reached over IPv6.
#[btf_map]
pub static PEER_HOSTS6: HashMap<[u8; 16], PeerHost, { MAX_PEER_HOSTS as usize }> = HashMap::new();

/// Packets and bytes to and from each peer host, per CPU, by
/// `PeerHost::slot`.
#[btf_map]
pub static PEER_STATS: PerCpuArray<PeerCounters, { MAX_PEER_HOSTS as usize }> = PerCpuArray::new();

/// No peer slot: traffic not counted per peer.
pub const NO_SLOT: u32 = u32::MAX;

/// The `PEER_STATS` slot of peer host `host`, or [`NO_SLOT`].
#[inline(always)]
pub fn slot_of(host: [u8; 4]) -> u32 {
    // SAFETY: the value is copied out at once.
    unsafe { PEER_HOSTS.get(host) }.map_or(NO_SLOT, |p| p.slot)
}

/// Counts a packet of `len` bytes forwarded to (`tx`) or delivered from
/// the peer host of `slot`.
#[inline(always)]
pub fn count_peer(slot: u32, tx: bool, len: u32) {
    if let Some(c) = PEER_STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently
        // with this program.
        unsafe {
            let c = if tx { &mut (*c).tx } else { &mut (*c).rx };
            c.packets += 1;
            c.bytes += u64::from(len);
        }
    }
}

/// This host's IPv4 addresses on the underlay (network order) -> the
/// underlay's ifindex, as the agent reads them from the kernel.
#[btf_map]
pub static UNDERLAY_ADDRS: HashMap<[u8; 4], u32, { MAX_UNDERLAY_ADDRS as usize }> = HashMap::new();

/// One address's `ROUTES` answer, as read under generation `generation`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CachedRoute {
    addr: [u8; 4],
    /// [`SLOT_EMPTY`], [`SLOT_ROUTED`] (to `host`) or [`SLOT_UNROUTED`].
    state: u32,
    generation: u64,
    host: [u8; 4],
    /// `host`'s `PEER_STATS` slot.
    slot: u32,
}

const SLOT_EMPTY: u32 = 0;
const SLOT_ROUTED: u32 = 1;
const SLOT_UNROUTED: u32 = 2;

/// Direct-mapped, per CPU: a slot holds the last address hashed to it.
#[btf_map]
static ROUTE_CACHE: PerCpuArray<CachedRoute, { ROUTE_CACHE_SLOTS as usize }> = PerCpuArray::new();

/// Longest-prefix match of a single address.
#[inline(always)]
pub fn host_key(addr: [u8; 4]) -> Key<[u8; 4]> {
    Key::new(32, addr)
}

/// The peer host whose container prefix holds `addr` (`ROUTES`), if any.
///
/// The LPM walk gets longer the more prefixes surround `addr`, and each
/// packet asks for the same few addresses, so answers are cached per CPU.
/// Every entry carries the generation it was read under; the agent bumps
/// the generation after each `ROUTES` write, which retires every entry read
/// before that write. The generation is read before the trie, so an answer
/// filed under generation g was read either after every write before g's
/// bump, or before a write that will bump past g.
#[inline(always)]
pub fn route_of(addr: [u8; 4]) -> Option<[u8; 4]> {
    route_slot_of(addr).map(|(host, _)| host)
}

/// [`route_of`] with the peer's `PEER_STATS` slot ([`NO_SLOT`] if it has
/// none), looked up with the route and cached with it. A peer host is
/// written before its routes and removed after them, and a slot is handed
/// out again only after its host left, which a `ROUTES` write (and the
/// generation bump after it) preceded.
#[inline(always)]
pub fn route_slot_of(addr: [u8; 4]) -> Option<([u8; 4], u32)> {
    // SAFETY: a plain load of the agent's counter (it only ever grows).
    let Some(generation) = DATAPATH_GEN.get_ptr(0).map(|p| unsafe { read_volatile(p) }) else {
        return lpm(addr).map(|h| (h, slot_of(h)));
    };
    let index = u32::from_ne_bytes(addr).wrapping_mul(0x9e37_79b1)
        >> (32 - ROUTE_CACHE_SLOTS.trailing_zeros());
    let Some(slot) = ROUTE_CACHE.get_ptr_mut(index) else {
        return lpm(addr).map(|h| (h, slot_of(h)));
    };
    // SAFETY: this CPU's slot; networking programs do not nest on a CPU
    // (softirq, or process context with BHs off), so nothing else touches it
    // while this program runs.
    let slot = unsafe { &mut *slot };
    if slot.state != SLOT_EMPTY && slot.generation == generation && slot.addr == addr {
        return (slot.state == SLOT_ROUTED).then_some((slot.host, slot.slot));
    }
    let found = lpm(addr).map(|h| (h, slot_of(h)));
    slot.addr = addr;
    slot.generation = generation;
    (slot.host, slot.slot) = found.unwrap_or(([0; 4], NO_SLOT));
    slot.state = if found.is_some() {
        SLOT_ROUTED
    } else {
        SLOT_UNROUTED
    };
    found
}

#[inline(always)]
fn lpm(addr: [u8; 4]) -> Option<[u8; 4]> {
    // The agent may replace the entry concurrently: copy the host out at once.
    ROUTES.get(&host_key(addr)).map(|p| p.host)
}

/// Longest-prefix match of a single IPv6 address.
#[inline(always)]
pub fn host_key6(addr: [u8; 16]) -> Key<[u8; 16]> {
    Key::new(128, addr)
}

/// The underlay address (IPv6, or IPv4 mapped) of the peer host whose IPv6
/// container prefix holds `addr` (`ROUTES6`).
#[inline(always)]
pub fn route6_of(addr: [u8; 16]) -> Option<[u8; 16]> {
    // The agent may replace the entry concurrently: copy the host out at once.
    ROUTES6.get(&host_key6(addr)).map(|p| p.host)
}

/// The peer host whose IPv6 container prefix holds `addr` (`ROUTES6`): its
/// underlay address (IPv6, or IPv4 mapped: `xhost_common::mapped_v4`) and
/// its `PEER_STATS` slot. Not cached: the `ROUTES` cache is keyed by a
/// 32-bit address, and IPv6 takes the full path (one LPM walk) until it
/// proves worth a cache of its own.
#[inline(always)]
pub fn route6_slot_of(addr: [u8; 16]) -> Option<([u8; 16], u32)> {
    // The agent may replace the entry concurrently: copy the host out at once.
    let host = ROUTES6.get(&host_key6(addr)).map(|p| p.host)?;
    let slot = match mapped_v4(&host) {
        Some(v4) => slot_of(v4),
        // SAFETY: the value is copied out at once.
        None => unsafe { PEER_HOSTS6.get(host) }.map_or(NO_SLOT, |p| p.slot),
    };
    Some((host, slot))
}
