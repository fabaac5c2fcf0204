//! Reading and patching headers by the documented rules.

/// An IPv4 header that passed [`parse`].
#[derive(Clone, Copy, Debug)]
pub struct Ipv4 {
    pub hdr_len: usize,
    pub tot_len: u16,
    pub ttl: u8,
    pub proto: u8,
    pub mf: bool,
    pub frag_offset: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

pub enum Parsed {
    NotIpv4,
    /// EtherType IPv6: read by [`parse6`].
    Ipv6,
    Malformed,
    Ipv4(Ipv4),
}

/// An IPv6 packet that passed [`parse6`].
#[derive(Clone, Copy, Debug)]
pub struct Ipv6 {
    /// The fixed header and the payload length.
    pub tot_len: u32,
    pub hop_limit: u8,
    /// TCP, UDP or ICMPv6: a next header the programs parse.
    pub parsed_next: bool,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

pub enum Parsed6 {
    Malformed,
    /// Link-local or multicast addresses, neighbour discovery.
    Control,
    Ipv6(Ipv6),
}

/// The IPv6 frame `frame` (EtherType IPv6) by the documented rules
/// (docs/datapath.md, "IPv6"): the whole fixed header present, version 6,
/// a payload length that is not 0 and lies within the frame; then
/// link-local (fe80::/10) or multicast (ff00::/8) source or destination,
/// or ICMPv6 of types 133 to 137, are control traffic.
pub fn parse6(frame: &[u8]) -> Parsed6 {
    parse6_at(frame, 0)
}

/// [`parse6`] for the frame that starts `off` bytes into `frame`.
pub fn parse6_at(frame: &[u8], off: usize) -> Parsed6 {
    let Some(h) = frame.get(off + 14..off + 54) else {
        return Parsed6::Malformed;
    };
    let payload_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    if h[0] >> 4 != 6 || payload_len == 0 || 40 + payload_len > frame.len() - off - 14 {
        return Parsed6::Malformed;
    }
    let src: [u8; 16] = h[8..24].try_into().expect("16");
    let dst: [u8; 16] = h[24..40].try_into().expect("16");
    let control = |a: &[u8; 16]| a[0] == 0xff || (a[0] == 0xfe && a[1] & 0xc0 == 0x80);
    if control(&src) || control(&dst) {
        return Parsed6::Control;
    }
    let next = h[6];
    if next == 58 && matches!(frame.get(off + 54), Some(133..=137)) {
        return Parsed6::Control;
    }
    Parsed6::Ipv6(Ipv6 {
        tot_len: 40 + payload_len as u32,
        hop_limit: h[7],
        parsed_next: matches!(next, 6 | 17 | 58),
        src,
        dst,
    })
}

/// The frame that starts `off` bytes into `frame`: Ethernet, then IPv4 as
/// `ip_rcv` would accept it (docs/datapath.md, "Left to the kernel"):
/// version 4, IHL >= 5, the whole header present, a total length that
/// covers the header and lies within the frame (0 only for a BIG TCP
/// burst: TCP, GSO, longer than 64 KB), a correct header checksum.
/// Anything shorter than an Ethernet header is malformed; EtherType IPv6
/// is [`Parsed::Ipv6`]; any other (ARP, a VLAN tag) is not IPv4.
pub fn parse(frame: &[u8], off: usize, gso_size: u32) -> Parsed {
    let Some(eth) = frame.get(off..off + 14) else {
        return Parsed::Malformed;
    };
    if eth[12..14] == [0x86, 0xdd] {
        return Parsed::Ipv6;
    }
    if eth[12..14] != [0x08, 0x00] {
        return Parsed::NotIpv4;
    }
    let Some(h) = frame.get(off + 14..off + 34) else {
        return Parsed::Malformed;
    };
    let hdr_len = usize::from(h[0] & 0x0f) * 4;
    let ip_len = frame.len() - off - 14;
    let tot_len = u16::from_be_bytes([h[2], h[3]]);
    if h[0] >> 4 != 4 || hdr_len < 20 {
        return Parsed::Malformed;
    }
    if tot_len == 0 {
        let big_tcp = h[9] == 6 && ip_len > usize::from(u16::MAX) && gso_size != 0;
        if !big_tcp {
            return Parsed::Malformed;
        }
    } else if usize::from(tot_len) < hdr_len || usize::from(tot_len) > ip_len {
        return Parsed::Malformed;
    }
    let Some(full) = frame.get(off + 14..off + 14 + hdr_len) else {
        return Parsed::Malformed;
    };
    if checksum(full) != 0 {
        return Parsed::Malformed;
    }
    Parsed::Ipv4(Ipv4 {
        hdr_len,
        tot_len,
        ttl: h[8],
        proto: h[9],
        mf: h[6] & 0x20 != 0,
        frag_offset: u16::from_be_bytes([h[6] & 0x1f, h[7]]),
        src: h[12..16].try_into().expect("4"),
        dst: h[16..20].try_into().expect("4"),
    })
}

/// The Internet checksum of `hdr`: 0 for a header whose checksum is right.
pub fn checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 = hdr
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TTL - 1 with the header checksum recomputed over the whole header, as a
/// router's output must read (the datapath patches it incrementally, RFC
/// 1624; both must give the same bytes).
pub fn decrement_ttl(f: &mut [u8], ip: usize) {
    let hdr_len = usize::from(f[ip] & 0x0f) * 4;
    f[ip + 8] -= 1;
    f[ip + 10] = 0;
    f[ip + 11] = 0;
    let c = checksum(&f[ip..ip + hdr_len]);
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
}
