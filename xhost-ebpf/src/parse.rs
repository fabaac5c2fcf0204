//! Bounds-checked header access shared by the TC and XDP entry points.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// A packet buffer seen through its `data`/`data_end` pointers.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// Length of the whole packet from its Ethernet header, nonlinear
    /// parts included.
    fn len(&self) -> usize;
    /// The skb's GSO size: non-zero for a GSO burst, 0 for one packet.
    fn gso_size(&self) -> u32;
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        // At TC ingress the skb's data starts at the Ethernet header.
        TcContext::len(self) as usize
    }
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: reading the skb's GSO size from its context.
        unsafe { (*self.skb.skb).gso_size }
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        // The programs are not loaded for multi-buffer XDP (no frags): the
        // linear buffer is the whole packet.
        self.data_end() - self.data()
    }
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // An XDP buffer is one packet off the wire.
        0
    }
}

/// The single place where packet pointers are made: `T` at `off` must lie
/// wholly inside the packet.
#[inline(always)]
pub fn ptr_at<T, P: Packet>(ctx: &P, off: usize) -> Option<*mut T> {
    let start = ctx.start();
    // Verifier: compare against data_end before every access.
    if start + off + size_of::<T>() > ctx.end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// What the parser made of a frame.
pub enum Frame {
    /// Neither IPv4 nor IPv6: ARP, VLAN-tagged, ...
    NotIpv4,
    /// IPv6 (by its EtherType; [`parse6`] reads it).
    Ipv6,
    /// Claims IPv4 but is truncated or inconsistent.
    Malformed,
    /// A well-formed IPv4 packet behind an Ethernet header.
    Ipv4(Ipv4Frame),
}

/// Pointers into a validated Ethernet + IPv4 frame.
pub struct Ipv4Frame {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// The IPv4 total length (host order), at most what the frame holds;
    /// 0 for a BIG TCP burst (see [`parse`]).
    pub tot_len: u16,
}

/// `PACKET_HOST` from the kernel's if_packet.h: `skb->pkt_type` of a frame
/// addressed to this host.
pub const PACKET_HOST: u32 = 0;

/// `IPPROTO_TCP` from the kernel's in.h.
pub const IPPROTO_TCP: u8 = 6;
/// `IPPROTO_UDP` from the kernel's in.h.
pub const IPPROTO_UDP: u8 = 17;

/// Longest IPv4 header: IHL is 4 bits of 32-bit words.
const IPV4_MAX_HDR_WORDS: usize = 30;

/// Parses Ethernet + IPv4. The IPv4 header must be complete (IHL, options
/// included), consistent (version 4, IHL >= 5, total length covers the
/// header and lies within the frame) and carry a correct header checksum:
/// what the datapath forwards past `ip_rcv` must be what `ip_rcv` would
/// have accepted.
///
/// A total length of 0 is BIG TCP's (Linux 6.3+): a TCP GSO burst longer
/// than an IPv4 packet can say, whose length is the skb's. `ip_rcv` takes
/// it from any TCP GSO skb; here it must also be TCP and longer than 64 KB,
/// as the sender's stack only writes 0 then.
#[inline(always)]
pub fn parse<P: Packet>(ctx: &P) -> Frame {
    parse_at(ctx, 0)
}

/// [`parse`] for a frame that starts `off` bytes into the packet (the
/// inner frame of a tunnel packet).
#[inline(always)]
pub fn parse_at<P: Packet>(ctx: &P, off: usize) -> Frame {
    let Some(eth) = ptr_at::<EthHdr, P>(ctx, off) else {
        return Frame::Malformed;
    };
    // SAFETY: `eth` is bounds-checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv6 as u16 {
        return Frame::Ipv6;
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Frame::NotIpv4;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr, P>(ctx, off + EthHdr::LEN) else {
        return Frame::Malformed;
    };
    // SAFETY: `ip` is bounds-checked by ptr_at.
    let (vihl, tot_len, proto) =
        unsafe { ((*ip).vihl, u16::from_be_bytes((*ip).tot_len), (*ip).proto) };
    let words = usize::from(vihl & 0x0f) * 2; // 16-bit words in the header
    let hdr_len = words * 2;
    let ip_len = ctx.len().saturating_sub(off + EthHdr::LEN);
    if vihl >> 4 != 4 || hdr_len < Ipv4Hdr::LEN {
        return Frame::Malformed;
    }
    if tot_len == 0 {
        let big_tcp = proto == IPPROTO_TCP && ip_len > usize::from(u16::MAX) && ctx.gso_size() != 0;
        if !big_tcp {
            return Frame::Malformed;
        }
    } else if usize::from(tot_len) < hdr_len || usize::from(tot_len) > ip_len {
        return Frame::Malformed;
    }
    // One's complement sum over the whole header, options included.
    let mut sum: u32 = 0;
    let mut i = 0;
    // Verifier: a constant trip count with a bounds check per word.
    while i < IPV4_MAX_HDR_WORDS {
        if i >= words {
            break;
        }
        let Some(w) = ptr_at::<[u8; 2], P>(ctx, off + EthHdr::LEN + i * 2) else {
            return Frame::Malformed;
        };
        // SAFETY: bounds-checked by ptr_at.
        sum += u32::from(u16::from_ne_bytes(unsafe { *w }));
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    if sum != 0xffff {
        return Frame::Malformed;
    }
    Frame::Ipv4(Ipv4Frame { eth, ip, tot_len })
}

/// Decrements the TTL and patches the header checksum incrementally, as the
/// kernel's `ip_decrease_ttl` does (RFC 1624: the TTL is the high byte of
/// its 16-bit word, so the sum grows by 0x0100 in network order).
#[inline(always)]
pub fn decrement_ttl(ip: *mut Ipv4Hdr) {
    // SAFETY: callers pass a pointer from `parse`, still valid (no helper
    // that moves packet data ran since).
    unsafe {
        let mut check = u32::from(u16::from_ne_bytes((*ip).check));
        check += u32::from(0x0100u16.to_be());
        let folded = check + u32::from(check >= 0xffff);
        (*ip).check = (folded as u16).to_ne_bytes();
        (*ip).ttl -= 1;
    }
}

/// `IPPROTO_ICMPV6` from the kernel's in6.h.
pub const IPPROTO_ICMPV6: u8 = 58;

/// What [`parse6`] made of an IPv6 frame.
pub enum Frame6 {
    /// Truncated or inconsistent.
    Malformed,
    /// Link-local (fe80::/10) or multicast (ff00::/8) source or
    /// destination, or ICMPv6 neighbour discovery: the kernel's.
    Control,
    /// A well-formed IPv6 packet behind an Ethernet header.
    Ipv6(Ipv6Frame),
}

/// Pointers into a validated Ethernet + IPv6 frame.
pub struct Ipv6Frame {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv6Hdr,
    /// The packet's length: the fixed header and the payload length.
    pub tot_len: u32,
    /// Whether the next header is one the programs parse (TCP, UDP,
    /// ICMPv6); any other (an extension header, ESP, ...) is the kernel's.
    pub parsed_next: bool,
}

/// Parses Ethernet + IPv6 (a frame [`parse`] calls [`Frame::Ipv6`]). The
/// fixed header must be complete, say version 6 and a payload length that
/// is not 0 (a jumbogram or BIG TCP burst, the kernel's) and lies within
/// the frame. Link-local and multicast addresses and neighbour discovery
/// (ICMPv6 types 133 to 137: router and neighbour solicitations and
/// advertisements, redirects) are [`Frame6::Control`].
#[inline(always)]
pub fn parse6<P: Packet>(ctx: &P) -> Frame6 {
    parse6_at(ctx, 0)
}

/// [`parse6`] for a frame that starts `off` bytes into the packet (the
/// inner frame of a tunnel packet, whose EtherType the caller checked).
#[inline(always)]
pub fn parse6_at<P: Packet>(ctx: &P, off: usize) -> Frame6 {
    let (Some(eth), Some(ip)) = (
        ptr_at::<EthHdr, P>(ctx, off),
        ptr_at::<Ipv6Hdr, P>(ctx, off + EthHdr::LEN),
    ) else {
        return Frame6::Malformed;
    };
    // SAFETY: `ip` is bounds-checked by ptr_at.
    let (version, payload_len, next, src, dst) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            u16::from_be_bytes((*ip).payload_len),
            (*ip).next_hdr,
            [(*ip).src_addr[0], (*ip).src_addr[1]],
            [(*ip).dst_addr[0], (*ip).dst_addr[1]],
        )
    };
    let ip_len = ctx.len().saturating_sub(off + EthHdr::LEN);
    let tot_len = usize::from(payload_len) + Ipv6Hdr::LEN;
    if version != 6 || payload_len == 0 || tot_len > ip_len {
        return Frame6::Malformed;
    }
    if is_control(src) || is_control(dst) {
        return Frame6::Control;
    }
    if next == IPPROTO_ICMPV6 {
        let Some(t) = ptr_at::<u8, P>(ctx, off + EthHdr::LEN + Ipv6Hdr::LEN) else {
            return Frame6::Malformed;
        };
        // SAFETY: bounds-checked by ptr_at.
        if (133..=137).contains(&unsafe { *t }) {
            return Frame6::Control;
        }
    }
    Frame6::Ipv6(Ipv6Frame {
        eth,
        ip,
        // At most 40 + 65 535.
        tot_len: tot_len as u32,
        parsed_next: matches!(next, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6),
    })
}

/// Whether an address starting with `first` is link-local (fe80::/10) or
/// multicast (ff00::/8).
#[inline(always)]
fn is_control(first: [u8; 2]) -> bool {
    first[0] == 0xff || (first[0] == 0xfe && first[1] & 0xc0 == 0x80)
}
