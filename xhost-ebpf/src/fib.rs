//! Next-hop resolution through the kernel FIB (`bpf_fib_lookup`).

use core::mem::{MaybeUninit, align_of, size_of};

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
    let mut slot = MaybeUninit::<bpf_fib_lookup>::uninit();
    let p = zeroed_in(&mut slot);
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.as_ptr(),
            &raw mut *p,
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
    let mut slot = MaybeUninit::<bpf_redir_neigh>::uninit();
    let nh = zeroed_in(&mut slot);
    nh.nh_family = u32::from(AF_INET);
    nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(nexthop);
    // SAFETY: `nh` is a valid bpf_redir_neigh of the size passed.
    unsafe {
        bpf_redirect_neigh(
            ifindex,
            &raw mut *nh,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}

/// Zeroes a helper argument struct in place and returns it.
///
/// `mem::zeroed()`, struct literals and even a zeroed value moved into place
/// compile to calls into a BPF `memset` subprogram (about 1 % of a CPU at
/// 400 kpps); volatile word stores in place are neither merged nor turned
/// into one.
#[inline(always)]
fn zeroed_in<T: Copy>(slot: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(size_of::<T>() % 4 == 0 && align_of::<T>() >= 4) };
    let words = slot.as_mut_ptr().cast::<u32>();
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: word `i` lies within `slot`, which is 4-aligned.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was written, and all-zero is a valid `T` for these
    // plain C structs.
    unsafe { slot.assume_init_mut() }
}
