//! Who may reach local containers: the check XDP and TC share.
//!
//! Docker's own isolation (FORWARD rules, raw PREROUTING drops) never sees
//! the packets xhost delivers, so this is where it is enforced. A local
//! container may be reached from a peer's container subnets, and by ICMP
//! errors from a peer host itself: time exceeded and fragmentation needed
//! are what a peer's kernel answers when the datapath hands it a packet
//! (TTL expiry, MTU), and what conntrack would have let through as RELATED.

use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    maps::{PEER_HOSTS, route_slot_of},
    parse::{Ipv4Frame, Packet, ptr_at},
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Whether a packet from `src` may be delivered to a local container:
/// `Some` with the `PEER_STATS` slot of the peer host it comes from.
#[inline(always)]
pub fn source_allowed<P: Packet>(ctx: &P, f: &Ipv4Frame, src: [u8; 4]) -> Option<u32> {
    if let Some((_, slot)) = route_slot_of(src) {
        return Some(slot);
    }
    // SAFETY: `f.ip` was bounds-checked by `parse`.
    let (proto, vihl) = unsafe { ((*f.ip).proto, (*f.ip).vihl) };
    if proto != IPPROTO_ICMP {
        return None;
    }
    // SAFETY: the value is copied out at once.
    let slot = unsafe { PEER_HOSTS.get(src) }?.slot;
    // Verifier: the header length is bounded (IHL is 4 bits) before use.
    let hdr_len = usize::from(vihl & 0x0f) * 4;
    if !(Ipv4Hdr::LEN..=60).contains(&hdr_len) {
        return None;
    }
    let icmp_type = ptr_at::<u8, P>(ctx, EthHdr::LEN + hdr_len)?;
    // SAFETY: bounds-checked by ptr_at.
    matches!(
        unsafe { *icmp_type },
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    )
    .then_some(slot)
}
