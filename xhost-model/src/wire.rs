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
    Malformed,
    Ipv4(Ipv4),
}

/// The frame that starts `off` bytes into `frame`: Ethernet, then IPv4 as
/// `ip_rcv` would accept it (docs/datapath.md, "Left to the kernel"):
/// version 4, IHL >= 5, the whole header present, a total length that
/// covers the header and lies within the frame (0 only for a BIG TCP
/// burst: TCP, GSO, longer than 64 KB), a correct header checksum.
/// Anything shorter than an Ethernet header is malformed; an EtherType
/// other than IPv4 (ARP, IPv6, a VLAN tag) is not IPv4.
pub fn parse(frame: &[u8], off: usize, gso_size: u32) -> Parsed {
    let Some(eth) = frame.get(off..off + 14) else {
        return Parsed::Malformed;
    };
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
