//! VXLAN mode: container traffic crosses the underlay encapsulated, for
//! underlays that do not carry container addresses (clouds, routed L3).
//!
//! The encapsulation itself is the kernel's vxlan device in external
//! (collect_md) mode, as in Cilium's tunnel mode: the datapath decides,
//! the device builds and parses the outer headers (with UDP tunnel GSO and
//! GRO). Its ifindex and the VNI are constants of the loaded object, set
//! by the loader; ifindex 0 is native routing, and the verifier prunes
//! every tunnel branch then.
//!
//! * `xhost_from_ctr` / `xhost_egress` redirect a routed packet to the
//!   device once it fits the device's MTU (the underlay's less the 50-byte
//!   VXLAN overhead); a bigger one is the kernel's, whose route through the
//!   device answers ICMP fragmentation-needed.
//! * `xhost_to_tun` (TC egress of the device) sets the tunnel key of
//!   every packet the device sends: the peer host that owns the destination
//!   and the VNI. Packets the kernel itself routes there (ICMP errors) are
//!   encapsulated the same way; what no peer owns is dropped.
//! * `xhost_from_tun` (TC ingress of the device) delivers decapsulated
//!   packets like `xhost_ingress` does, after checking that the VNI is
//!   ours, the outer source is a peer host and the inner source belongs to
//!   that peer (one of its container subnets, or the host itself).

use core::{
    mem::{MaybeUninit, size_of},
    ptr::read_volatile,
};

use aya_ebpf::{
    bindings::{BPF_F_ZERO_CSUM_TX, bpf_tunnel_key},
    helpers::{bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};

use crate::{
    fib::zeroed_in,
    maps::{PEER_HOSTS, route_of},
};

/// ifindex of the vxlan device; 0: native routing. Set by the loader
/// (`xhost_common::GLOBAL_TUNNEL_IFINDEX`).
#[unsafe(no_mangle)]
static TUNNEL_IFINDEX: u32 = 0;

/// The VXLAN network identifier of this cluster (24 bits). Set by the
/// loader (`xhost_common::GLOBAL_TUNNEL_VNI`).
#[unsafe(no_mangle)]
static TUNNEL_VNI: u32 = 0;

/// TTL of the outer header.
const OUTER_TTL: u8 = 64;

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

/// Sets the tunnel key that sends the packet to the peer owning `dst`.
/// `false`: no peer owns it, or the kernel refused the key.
#[inline(always)]
pub fn set_key(ctx: &TcContext, dst: [u8; 4]) -> bool {
    let Some(host) = route_of(dst) else {
        return false;
    };
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
    unsafe { PEER_HOSTS.get(&outer) }.map(|_| outer)
}

/// Whether `src` may be the inner source of what peer host `outer` sends:
/// an address of its container subnets, or the host itself (its kernel's
/// ICMP errors, which `policy` then limits to errors).
#[inline(always)]
pub fn sent_by(src: [u8; 4], outer: [u8; 4]) -> bool {
    src == outer || route_of(src) == Some(outer)
}
