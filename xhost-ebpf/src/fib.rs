//! Next-hop resolution through the kernel FIB (`bpf_fib_lookup`).

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_fib_lookup, bpf_redir_neigh},
    helpers::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect_neigh},
    programs::TcContext,
};

/// `AF_INET` from the kernel's socket.h.
const AF_INET: u8 = 2;

/// The FIB's answer for one packet.
pub enum NextHop {
    /// Neighbour resolved: write these MACs and `bpf_redirect` to `ifindex`.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Route known, neighbour not: `bpf_redirect_neigh` lets the kernel
    /// resolve `nexthop` (network order) on `ifindex`.
    Unresolved { ifindex: u32, nexthop: [u8; 4] },
    /// No forwarding answer (no route, local, forwarding disabled, MTU,
    /// ...): the kernel must handle the packet.
    Kernel,
}

/// Looks up how to reach `dst` for a packet from `src` that arrived on
/// `ifindex`. `tot_len` stays 0 so the kernel checks the skb itself against
/// the egress MTU with `is_skb_forwardable`, which understands GSO packets
/// (a GSO super-packet's IPv4 total length exceeds any MTU).
#[inline(always)]
pub fn lookup(ctx: &TcContext, ifindex: u32, src: [u8; 4], dst: [u8; 4]) -> NextHop {
    // SAFETY: bpf_fib_lookup is a plain-old-data C struct; all-zero is valid.
    let mut p: bpf_fib_lookup = unsafe { zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.as_ptr(),
            &raw mut p,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        aya_ebpf::bindings::BPF_FIB_LKUP_RET_SUCCESS => NextHop::Resolved {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        },
        aya_ebpf::bindings::BPF_FIB_LKUP_RET_NO_NEIGH => NextHop::Unresolved {
            ifindex: p.ifindex,
            // SAFETY: for AF_INET the kernel leaves the next hop (gateway
            // or the destination itself) in ipv4_dst.
            nexthop: unsafe { p.__bindgen_anon_4.ipv4_dst }.to_ne_bytes(),
        },
        _ => NextHop::Kernel,
    }
}

/// `bpf_redirect_neigh` towards `nexthop` on `ifindex`; the kernel fills in
/// the L2 header once the neighbour resolves. Returns the TC verdict.
#[inline(always)]
pub fn redirect_neigh(ifindex: u32, nexthop: [u8; 4]) -> i32 {
    let mut nh = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        // SAFETY: zeroed union, then the IPv4 member is set.
        __bindgen_anon_1: unsafe { zeroed() },
    };
    nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(nexthop);
    // SAFETY: `nh` is a valid bpf_redir_neigh of the size passed.
    unsafe {
        bpf_redirect_neigh(ifindex, &raw mut nh, size_of::<bpf_redir_neigh>() as i32, 0) as i32
    }
}
