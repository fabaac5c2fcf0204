//! Random map contents and random, mutated frames for the differential
//! fuzz test: addresses in, next to and outside each map's prefixes, the
//! MACs the maps and the host know, every header boundary to truncate at.
//! Everything comes from a [`Rng`] seeded by the caller, so a printed seed
//! replays a run.

use etherparse::{
    EtherType, Ethernet2Header, IpDscp, IpEcn, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options,
    SingleVlanHeader, TcpHeader, UdpHeader, VlanId, VlanPcp,
};
use rand::{Rng as _, SeedableRng as _, seq::IndexedRandom as _};
use xhost_common::Endpoint;

use crate::{Input, Maps, Model, Prefix, Prefix6};

/// The generator's RNG: ChaCha8, whose stream for a seed is the same on
/// every platform and version of `rand_chacha`.
pub type Rng = rand_chacha::ChaCha8Rng;

/// The RNG of batch `batch` of the run seeded `seed`: each batch replays on
/// its own.
pub fn batch_rng(seed: u64, batch: u64) -> Rng {
    let mut rng = Rng::seed_from_u64(seed);
    rng.set_stream(batch);
    rng
}

/// The port and VNI VXLAN frames are built with when the object has none.
const DEFAULT_PORT: u16 = 8472;
const DEFAULT_VNI: u32 = 1;

/// Prefixes that maps are made of: the test host's subnets among them, so
/// that maps and FIB overlap in every way.
const BASES: [[u8; 4]; 7] = [
    [192, 168, 220, 0],
    [192, 168, 230, 0],
    [192, 168, 110, 0],
    [192, 168, 0, 0],
    [10, 0, 0, 0],
    [172, 16, 91, 0],
    [0, 0, 0, 0],
];
const LENS: [u8; 12] = [0, 8, 16, 20, 23, 24, 24, 24, 25, 28, 31, 32];

fn random_prefix(rng: &mut Rng) -> Prefix {
    let base = *BASES.choose(rng).expect("bases");
    let mut a = u32::from_be_bytes(base);
    if rng.random_bool(0.3) {
        a |= rng.random::<u32>() & 0xff;
    }
    Prefix::new(a.to_be_bytes(), *LENS.choose(rng).expect("lens"))
}

/// IPv6 prefixes maps are made of: the test host's subnet and the peers'
/// among them, link-local and multicast ones (which the programs never
/// route), and the whole space.
const BASES6: [(&str, u8); 9] = [
    ("fd00:220::", 64),
    ("fd00:230::", 64),
    ("fd00:110::", 64),
    ("fd00::", 16),
    ("2001:db8::", 32),
    ("fe80::", 10),
    ("ff00::", 8),
    ("::", 0),
    ("fd00:110::10", 124),
];

fn v6(a: &str) -> [u8; 16] {
    a.parse::<std::net::Ipv6Addr>().expect("address").octets()
}

fn random_prefix6(rng: &mut Rng) -> Prefix6 {
    let (base, len) = *BASES6.choose(rng).expect("bases");
    let mut a = u128::from_be_bytes(v6(base));
    if rng.random_bool(0.3) {
        a |= u128::from(rng.random::<u8>());
    }
    let len = if rng.random_bool(0.8) {
        len
    } else {
        *[0u8, 48, 64, 96, 120, 127, 128].choose(rng).expect("lens")
    };
    Prefix6::new(a.to_be_bytes(), len)
}

fn random_in6(rng: &mut Rng, nets: &[Prefix6]) -> [u8; 16] {
    let Some(p) = nets.choose(rng) else {
        return rng.random();
    };
    let host_bits = if p.len == 0 {
        u128::MAX
    } else if p.len == 128 {
        0
    } else {
        !(u128::MAX << (128 - u32::from(p.len)))
    };
    (u128::from_be_bytes(p.addr) | (u128::from(rng.random::<u16>()) & host_bits)).to_be_bytes()
}

/// Addresses a peer host may have: on the host's underlay subnet (resolved
/// neighbour, unresolved, the host's own address), on the bridge's, and
/// off every subnet.
fn peer_pool(model_host: &crate::Host) -> Vec<[u8; 4]> {
    let mut v = vec![[10, 99, 0, 1], [192, 168, 220, 1]];
    for d in &model_host.devices {
        if let Some((a, _)) = d.addr {
            v.push(a);
            // Mostly a resolved (.132 on the test host) or unresolved one.
            for last in [0u8, 2, 130, 132, 132, 132, 132, 133, 133, 133, 134, 255] {
                v.push([a[0], a[1], a[2], last]);
            }
        }
    }
    for (_, a, _) in &model_host.neighbours {
        v.push(*a);
    }
    v
}

/// Random map contents for `host` (whose devices' ifindexes the endpoints
/// and armed ports use, with one no device has).
pub fn maps(rng: &mut Rng, host: &crate::Host) -> Maps {
    let mut m = Maps::default();
    let peers = peer_pool(host);
    for _ in 0..rng.random_range(0..=6) {
        let host_addr = *peers.choose(rng).expect("peers");
        m.routes.insert(random_prefix(rng), host_addr);
    }
    let bridge = host.devices.first().map_or(0, |d| d.ifindex);
    if rng.random_bool(0.8) {
        m.local_nets
            .insert(Prefix::new([192, 168, 110, 0], 24), bridge);
    }
    for _ in 0..rng.random_range(0..=2) {
        m.local_nets.insert(random_prefix(rng), bridge);
    }
    let ports = ports(host);
    let macs = mac_pool(host, &Maps::default());
    for _ in 0..rng.random_range(0..=5) {
        let addr = match rng.random_range(0..4) {
            0 => random_in(rng, &m.local_nets.keys().copied().collect::<Vec<_>>()),
            1 => random_in(rng, &m.routes.keys().copied().collect::<Vec<_>>()),
            _ => [
                192,
                168,
                110,
                *[10u8, 11, 12, 13, 50].choose(rng).expect("hosts"),
            ],
        };
        let ep = Endpoint {
            ifindex: if rng.random_bool(0.03) {
                0
            } else {
                *ports.choose(rng).expect("ports")
            },
            flags: 0,
            mac: *macs.choose(rng).expect("macs"),
            gw_mac: *macs.choose(rng).expect("macs"),
            _pad: [0; 4],
        };
        m.endpoints.insert(addr, ep);
    }
    for p in &ports {
        if rng.random_bool(0.5) {
            m.endpoint_ports.insert(*p);
        }
    }
    for h in m.routes.values() {
        if rng.random_bool(0.8) {
            m.peer_hosts.insert(*h);
        }
    }
    for _ in 0..rng.random_range(0..=2) {
        m.peer_hosts.insert(*peers.choose(rng).expect("peers"));
    }
    for d in &host.devices {
        if let Some((a, _)) = d.addr
            && rng.random_bool(0.5)
        {
            m.underlay_addrs.insert(a, d.ifindex);
        }
    }
    if rng.random_bool(0.2) {
        m.underlay_addrs
            .insert(*peers.choose(rng).expect("peers"), bridge);
    }
    maps6(rng, &mut m, &peers, &ports, &macs, bridge);
    m
}

/// The IPv6 maps: routes to the same peer hosts, the bridge's subnet and
/// others, endpoints in and out of them on the same ports.
fn maps6(
    rng: &mut Rng,
    m: &mut Maps,
    peers: &[[u8; 4]],
    ports: &[u32],
    macs: &[[u8; 6]],
    bridge: u32,
) {
    for _ in 0..rng.random_range(0..=5) {
        let host_addr = *peers.choose(rng).expect("peers");
        m.routes6.insert(random_prefix6(rng), host_addr);
    }
    if rng.random_bool(0.8) {
        m.local_nets6
            .insert(Prefix6::new(v6("fd00:110::"), 64), bridge);
    }
    for _ in 0..rng.random_range(0..=2) {
        m.local_nets6.insert(random_prefix6(rng), bridge);
    }
    let locals: Vec<Prefix6> = m.local_nets6.keys().copied().collect();
    let routes: Vec<Prefix6> = m.routes6.keys().copied().collect();
    for _ in 0..rng.random_range(0..=4) {
        let addr = match rng.random_range(0..4) {
            0 => random_in6(rng, &locals),
            1 => random_in6(rng, &routes),
            _ => {
                let last = *[0x10u8, 0x11, 0x12, 0x13, 0x50].choose(rng).expect("hosts");
                let mut a = v6("fd00:110::");
                a[15] = last;
                a
            }
        };
        let ep = Endpoint {
            ifindex: if rng.random_bool(0.03) {
                0
            } else {
                *ports.choose(rng).expect("ports")
            },
            flags: 0,
            mac: *macs.choose(rng).expect("macs"),
            gw_mac: *macs.choose(rng).expect("macs"),
            _pad: [0; 4],
        };
        m.endpoints6.insert(addr, ep);
    }
}

/// The ifindexes endpoints and ports are given: the host's devices and one
/// that no device has.
fn ports(host: &crate::Host) -> Vec<u32> {
    let mut v: Vec<u32> = host.devices.iter().map(|d| d.ifindex).collect();
    v.push(4_242);
    v
}

fn random_in(rng: &mut Rng, nets: &[Prefix]) -> [u8; 4] {
    let Some(p) = nets.choose(rng) else {
        return rng.random();
    };
    let host_bits = if p.len == 0 {
        u32::MAX
    } else {
        !(u32::MAX << (32 - u32::from(p.len)))
    };
    (u32::from_be_bytes(p.addr) | (rng.random::<u32>() & host_bits & 0xffff)).to_be_bytes()
}

fn mac_pool(host: &crate::Host, m: &Maps) -> Vec<[u8; 6]> {
    let mut v = vec![
        [0xff; 6],
        [0x01, 0x00, 0x5e, 0, 0, 1],
        [0x02, 0x42, 0xc0, 0xa8, 0x6e, 0x0b],
        [0x02, 0x42, 0, 0, 0, 1],
        [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
    ];
    v.extend(host.devices.iter().map(|d| d.mac));
    v.extend(host.neighbours.iter().map(|n| n.2));
    for e in m.endpoints.values().chain(m.endpoints6.values()) {
        v.push(e.mac);
        v.push(e.gw_mac);
    }
    v.extend(host.neighbours6.iter().map(|n| n.2));
    v
}

/// IPv6 addresses in, next to and outside every IPv6 prefix and address
/// the maps and the host hold, link-local and multicast ones among them.
fn addr_pool6(model: &Model) -> Vec<[u8; 16]> {
    let mut v = vec![
        v6("::"),
        v6("::1"),
        v6("fe80::1"),
        v6("febf::1"),
        v6("fec0::1"),
        v6("ff02::1"),
        v6("ff02::1:ff00:12"),
        v6("2001:db8::1"),
        v6("::ffff:192.168.110.11"),
    ];
    let m = &model.maps;
    for p in m.routes6.keys().chain(m.local_nets6.keys()) {
        let a = u128::from_be_bytes(p.addr);
        let size = if p.len == 0 {
            u128::MAX
        } else {
            (1u128 << (128 - u32::from(p.len))) - 1
        };
        for x in [
            a.wrapping_sub(1),
            a,
            a.wrapping_add(1),
            a.wrapping_add(size / 2),
            a.wrapping_add(size),
            a.wrapping_add(size).wrapping_add(1),
        ] {
            v.push(x.to_be_bytes());
        }
    }
    v.extend(m.endpoints6.keys());
    v.extend(model.host.neighbours6.iter().map(|n| n.1));
    v.extend(
        model
            .host
            .devices
            .iter()
            .filter_map(|d| d.addr6.map(|a| a.0)),
    );
    v
}

/// Addresses in, next to and outside every prefix and address the maps
/// and the host hold.
fn addr_pool(model: &Model) -> Vec<[u8; 4]> {
    let mut v = vec![
        [0, 0, 0, 0],
        [255, 255, 255, 255],
        [127, 0, 0, 1],
        [224, 0, 0, 1],
    ];
    let m = &model.maps;
    for p in m.routes.keys().chain(m.local_nets.keys()) {
        let a = u32::from_be_bytes(p.addr);
        let size = if p.len == 0 {
            u32::MAX
        } else {
            (1u32 << (32 - u32::from(p.len))) - 1
        };
        for x in [
            a.wrapping_sub(1),
            a,
            a.wrapping_add(1),
            a.wrapping_add(size / 2),
            a.wrapping_add(size),
            a.wrapping_add(size).wrapping_add(1),
        ] {
            v.push(x.to_be_bytes());
        }
    }
    v.extend(m.routes.values());
    v.extend(m.endpoints.keys());
    v.extend(m.peer_hosts.iter());
    v.extend(m.underlay_addrs.keys());
    v.extend(peer_pool(&model.host));
    v
}

/// What a frame is built as, before it is mutated.
#[derive(Clone, Copy)]
enum Kind {
    Ipv4,
    Vxlan,
    Arp,
    Ipv6,
    Vlan,
    Junk,
}

/// One random input for `model`: a frame and the skb fields the programs
/// read.
pub fn input(rng: &mut Rng, model: &Model) -> Input {
    let addrs = addr_pool(model);
    let macs = mac_pool(&model.host, &model.maps);
    let m = &model.maps;
    let devices: Vec<u32> = model.host.devices.iter().map(|d| d.ifindex).collect();
    let routes: Vec<Prefix> = m.routes.keys().copied().collect();
    let locals: Vec<Prefix> = m.local_nets.keys().copied().collect();
    let eps: Vec<([u8; 4], Endpoint)> = m.endpoints.iter().map(|(a, e)| (*a, *e)).collect();
    // A flow that the programs take seriously most of the time: a known
    // endpoint's packet for a peer on its veth, an unknown container's at
    // the bridge, a peer's for a local container on the underlay; else
    // anything from anywhere.
    let mut ifindex = *devices.choose(rng).unwrap_or(&1);
    let (src, dst) = match rng.random_range(0..10) {
        0..3 => {
            let (src, ep) = eps.choose(rng).copied().unwrap_or(([0; 4], NO_ENDPOINT));
            if devices.contains(&ep.ifindex) && rng.random_bool(0.8) {
                ifindex = ep.ifindex;
            }
            (Some(src), Some(random_in(rng, &routes)))
        }
        3..5 => {
            ifindex = devices.first().copied().unwrap_or(1);
            let neigh: Vec<[u8; 4]> = model.host.neighbours.iter().map(|n| n.1).collect();
            let src = if rng.random_bool(0.6) {
                neigh.choose(rng).copied()
            } else {
                Some(random_in(rng, &locals))
            };
            (src, Some(random_in(rng, &routes)))
        }
        5..8 => {
            ifindex = devices.get(1).copied().unwrap_or(1);
            let dst = match eps.choose(rng) {
                Some((a, _)) if rng.random_bool(0.6) => *a,
                _ => random_in(rng, &locals),
            };
            (Some(random_in(rng, &routes)), Some(dst))
        }
        _ => (None, None),
    };
    let mut g = Gen {
        rng,
        model,
        addrs: &addrs,
        macs: &macs,
        ifindex,
        src,
        dst,
    };
    let kind = *[
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Ipv4,
        Kind::Vxlan,
        Kind::Vxlan,
        Kind::Vxlan,
        Kind::Vxlan,
        Kind::Arp,
        Kind::Ipv6,
        Kind::Ipv6,
        Kind::Ipv6,
        Kind::Ipv6,
        Kind::Ipv6,
        Kind::Ipv6,
        Kind::Vlan,
        Kind::Junk,
    ]
    .choose(g.rng)
    .expect("kinds");
    let mut frame = match kind {
        Kind::Ipv4 => g.ipv4(),
        Kind::Vxlan => g.vxlan(),
        Kind::Arp => g.other(0x0806, 28),
        Kind::Ipv6 => g.ipv6(),
        Kind::Vlan => g.vlan(),
        Kind::Junk => {
            let n = g.rng.random_range(14..80);
            (0..n).map(|_| g.rng.random()).collect()
        }
    };
    if g.rng.random_bool(0.3) {
        if matches!(kind, Kind::Ipv6) {
            g.mutate6(&mut frame);
        } else {
            g.mutate(&mut frame);
        }
    }
    let ifindex = g.ifindex;
    let ep_ports: Vec<u32> = model
        .maps
        .endpoints
        .values()
        .chain(model.maps.endpoints6.values())
        .map(|e| e.ifindex)
        .collect();
    let priority = match g.rng.random_range(0..10) {
        0..5 => 0,
        5..7 => ifindex,
        7..9 => ep_ports.choose(g.rng).copied().unwrap_or(ifindex),
        _ => g.rng.random(),
    };
    Input {
        frame,
        ifindex,
        priority,
        tunnel_key: None,
    }
}

const NO_ENDPOINT: Endpoint = Endpoint {
    ifindex: 0,
    flags: 0,
    mac: [0; 6],
    gw_mac: [0; 6],
    _pad: [0; 4],
};

struct Gen<'a> {
    rng: &'a mut Rng,
    model: &'a Model,
    addrs: &'a [[u8; 4]],
    macs: &'a [[u8; 6]],
    ifindex: u32,
    /// The flow's addresses, if it has some.
    src: Option<[u8; 4]>,
    dst: Option<[u8; 4]>,
}

impl Gen<'_> {
    fn addr(&mut self) -> [u8; 4] {
        if self.rng.random_bool(0.1) {
            self.rng.random()
        } else {
            *self.addrs.choose(self.rng).expect("addrs")
        }
    }

    fn mac(&mut self) -> [u8; 6] {
        if self.rng.random_bool(0.05) {
            self.rng.random()
        } else {
            *self.macs.choose(self.rng).expect("macs")
        }
    }

    /// Ethernet header from `src` (an endpoint's MAC or the neighbour
    /// entry's, mostly) to its gateway or the arrival device.
    fn eth(&mut self, src: [u8; 4], ether_type: u16) -> Vec<u8> {
        let ep = self.model.maps.endpoints.get(&src).copied();
        let dev_mac = self
            .model
            .host
            .devices
            .iter()
            .find(|d| d.ifindex == self.ifindex)
            .map(|d| d.mac);
        let dst = match (self.rng.random_range(0..10), ep, dev_mac) {
            (0..6, Some(ep), _) => ep.gw_mac,
            (6..8, _, Some(m)) => m,
            _ => self.mac(),
        };
        let neigh = self
            .model
            .host
            .neighbours
            .iter()
            .find(|n| n.1 == src)
            .map(|n| n.2);
        let from = match (self.rng.random_range(0..10), ep, neigh) {
            (0..7, Some(ep), _) => ep.mac,
            (7..9, _, Some(m)) => m,
            _ => self.mac(),
        };
        Ethernet2Header {
            source: from,
            destination: dst,
            ether_type: EtherType(ether_type),
        }
        .to_bytes()
        .to_vec()
    }

    /// Ethernet + IPv4 (options, fragment bits, any TTL) + UDP, TCP, ICMP
    /// or another protocol.
    fn ipv4(&mut self) -> Vec<u8> {
        let src = match self.src {
            Some(a) if self.rng.random_bool(0.9) => a,
            _ => self.addr(),
        };
        let dst = match self.dst {
            Some(a) if self.rng.random_bool(0.9) => a,
            _ => self.addr(),
        };
        let mut f = self.eth(src, 0x0800);
        f.extend(self.ipv4_packet(src, dst));
        f
    }

    fn ipv4_packet(&mut self, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let r = &mut *self.rng;
        let ttl = *[0u8, 1, 1, 2, 2, 3, 64, 64, 64, 255]
            .choose(r)
            .expect("ttls");
        let payload_len = match r.random_range(0..20) {
            0..16 => r.random_range(0..64),
            16..19 => r.random_range(1_380..1_520),
            _ => r.random_range(1_520..3_200),
        };
        let (proto, l4) = match r.random_range(0..10) {
            0..4 => {
                let udp = UdpHeader {
                    source_port: r.random(),
                    destination_port: *[53u16, 4789, 8472, r.random()].choose(r).expect("ports"),
                    length: (8 + payload_len) as u16,
                    checksum: r.random(),
                };
                (IpNumber::UDP, udp.to_bytes().to_vec())
            }
            4..7 => {
                let tcp = TcpHeader::new(r.random(), r.random(), r.random(), r.random());
                (IpNumber::TCP, tcp.to_bytes().to_vec())
            }
            7..9 => {
                let t = *[0u8, 3, 5, 8, 11, 12].choose(r).expect("types");
                (IpNumber::ICMP, vec![t, 0, 0, 0, 0, 0, 0, 0])
            }
            _ => (IpNumber(r.random()), Vec::new()),
        };
        let options: Vec<u8> = if r.random_bool(0.2) {
            let words = r.random_range(1..=10);
            (0..words * 4)
                .map(|_| if r.random_bool(0.5) { 1 } else { r.random() })
                .collect()
        } else {
            Vec::new()
        };
        let mut h = Ipv4Header {
            dscp: IpDscp::try_new(r.random_range(0..64)).expect("6 bits"),
            ecn: IpEcn::try_new(r.random_range(0..4)).expect("2 bits"),
            total_len: 0,
            identification: r.random(),
            dont_fragment: r.random_bool(0.5),
            more_fragments: r.random_bool(0.1),
            fragment_offset: if r.random_bool(0.1) {
                IpFragOffset::try_new(r.random_range(1..0x2000)).expect("13 bits")
            } else {
                IpFragOffset::ZERO
            },
            time_to_live: ttl,
            protocol: proto,
            header_checksum: 0,
            source: src,
            destination: dst,
            options: Ipv4Options::try_from(&options[..]).expect("at most 40 bytes"),
        };
        h.total_len = (h.header_len() + l4.len() + payload_len) as u16;
        let mut p = Vec::new();
        h.write(&mut p).expect("to a Vec");
        p.extend(l4);
        p.extend((0..payload_len).map(|_| r.random::<u8>()));
        p
    }

    /// A VXLAN packet from a peer host (or anyone) to this host (or
    /// anywhere): our port and VNI or not, a zero UDP checksum or not, an
    /// inner frame from a peer's subnet (or any) to a local endpoint (or
    /// any).
    fn vxlan(&mut self) -> Vec<u8> {
        let (port, vni) = self
            .model
            .config
            .tunnel
            .map_or((DEFAULT_PORT, DEFAULT_VNI), |t| (t.port, t.vni));
        let m = &self.model.maps;
        let hosts: Vec<[u8; 4]> = m.routes.values().copied().collect();
        let unders: Vec<[u8; 4]> = m.underlay_addrs.keys().copied().collect();
        let eps: Vec<[u8; 4]> = m.endpoints.keys().copied().collect();
        let nets: Vec<Prefix> = m.routes.keys().copied().collect();
        let outer_src = match (self.rng.random_bool(0.8), hosts.choose(self.rng)) {
            (true, Some(h)) => *h,
            _ => self.addr(),
        };
        let outer_dst = match (self.rng.random_bool(0.8), unders.choose(self.rng)) {
            (true, Some(u)) => *u,
            _ => self.addr(),
        };
        let inner_src = if self.rng.random_bool(0.7) && !nets.is_empty() {
            // A route whose host is the outer source, if there is one.
            let own: Vec<Prefix> = m
                .routes
                .iter()
                .filter(|(_, h)| **h == outer_src)
                .map(|(p, _)| *p)
                .collect();
            random_in(self.rng, if own.is_empty() { &nets } else { &own })
        } else {
            self.addr()
        };
        let inner_dst = match (self.rng.random_bool(0.7), eps.choose(self.rng)) {
            (true, Some(e)) => *e,
            _ => self.addr(),
        };
        let inner = if self.rng.random_bool(0.35) {
            self.inner6(outer_src)
        } else {
            let mut inner = self.eth(inner_src, 0x0800);
            inner.extend(self.ipv4_packet(inner_src, inner_dst));
            inner
        };
        let r = &mut *self.rng;
        let vni = if r.random_bool(0.85) {
            vni
        } else {
            r.random_range(0..1 << 24)
        };
        let flags = if r.random_bool(0.9) { 0x08 } else { r.random() };
        let v = vni.to_be_bytes();
        let mut payload = vec![flags, 0, 0, 0, v[1], v[2], v[3], 0];
        payload.extend(inner);
        let udp = UdpHeader {
            source_port: r.random_range(32_768..61_000),
            destination_port: if r.random_bool(0.85) {
                port
            } else {
                r.random()
            },
            length: (8 + payload.len()) as u16,
            checksum: if r.random_bool(0.85) { 0 } else { r.random() },
        };
        let mut h = Ipv4Header::new(
            (8 + payload.len()) as u16,
            64,
            IpNumber::UDP,
            outer_src,
            outer_dst,
        )
        .expect("fits");
        h.more_fragments = r.random_bool(0.05);
        let mut f = self.eth(outer_src, 0x0800);
        // Mostly to the arrival device's own MAC.
        if let Some(d) = self
            .model
            .host
            .devices
            .iter()
            .find(|d| d.ifindex == self.ifindex)
            && self.rng.random_bool(0.7)
        {
            f[0..6].copy_from_slice(&d.mac);
        }
        h.write(&mut f).expect("to a Vec");
        f.extend(udp.to_bytes());
        f.extend(payload);
        f
    }

    /// The inner IPv6 frame of a VXLAN packet from `outer_src`: from a
    /// subnet of that peer host (or any peer's, or anyone) to a local
    /// endpoint (or anywhere).
    fn inner6(&mut self, outer_src: [u8; 4]) -> Vec<u8> {
        let m = &self.model.maps;
        let pool = addr_pool6(self.model);
        let nets: Vec<Prefix6> = m.routes6.keys().copied().collect();
        let own: Vec<Prefix6> = m
            .routes6
            .iter()
            .filter(|(_, h)| **h == outer_src)
            .map(|(p, _)| *p)
            .collect();
        let eps: Vec<[u8; 16]> = m.endpoints6.keys().copied().collect();
        let src = match self.rng.random_range(0..10) {
            0..7 if !own.is_empty() => random_in6(self.rng, &own),
            0..8 if !nets.is_empty() => random_in6(self.rng, &nets),
            _ => *pool.choose(self.rng).expect("addrs"),
        };
        let dst = match (self.rng.random_bool(0.7), eps.choose(self.rng)) {
            (true, Some(e)) => *e,
            _ => *pool.choose(self.rng).expect("addrs"),
        };
        let mut f = self.mac().to_vec();
        f.extend(self.mac());
        f.extend([0x86, 0xdd]);
        f.extend(self.ipv6_packet(src, dst));
        f
    }

    /// Ethernet + IPv6 + UDP, TCP, ICMPv6 (NDP among it), an extension
    /// header or another next header, any hop limit. Its flow, like
    /// `input`'s for IPv4: an endpoint's packet for a peer on its veth, an
    /// unknown container's at the bridge, a peer's for a local container
    /// on the underlay, or anything (the arrival device is set to match).
    fn ipv6(&mut self) -> Vec<u8> {
        let model = self.model;
        let m = &model.maps;
        let pool = addr_pool6(model);
        let routes: Vec<Prefix6> = m.routes6.keys().copied().collect();
        let locals: Vec<Prefix6> = m.local_nets6.keys().copied().collect();
        let eps: Vec<([u8; 16], Endpoint)> = m.endpoints6.iter().map(|(a, e)| (*a, *e)).collect();
        let devices: Vec<u32> = model.host.devices.iter().map(|d| d.ifindex).collect();
        let any = |rng: &mut Rng| {
            if rng.random_bool(0.1) {
                rng.random()
            } else {
                *pool.choose(rng).expect("addrs")
            }
        };
        let (src, dst) = match self.rng.random_range(0..10) {
            0..3 => {
                let (src, ep) = eps
                    .choose(self.rng)
                    .copied()
                    .unwrap_or(([0; 16], NO_ENDPOINT));
                if devices.contains(&ep.ifindex) && self.rng.random_bool(0.8) {
                    self.ifindex = ep.ifindex;
                }
                (src, random_in6(self.rng, &routes))
            }
            3..5 => {
                self.ifindex = devices.first().copied().unwrap_or(1);
                let neigh: Vec<[u8; 16]> = model.host.neighbours6.iter().map(|n| n.1).collect();
                let src = match neigh.choose(self.rng) {
                    Some(n) if self.rng.random_bool(0.6) => *n,
                    _ => random_in6(self.rng, &locals),
                };
                (src, random_in6(self.rng, &routes))
            }
            5..8 => {
                self.ifindex = devices.get(1).copied().unwrap_or(1);
                let dst = match eps.choose(self.rng) {
                    Some((a, _)) if self.rng.random_bool(0.6) => *a,
                    _ => random_in6(self.rng, &locals),
                };
                (random_in6(self.rng, &routes), dst)
            }
            _ => (any(self.rng), any(self.rng)),
        };
        let src = if self.rng.random_bool(0.1) {
            any(self.rng)
        } else {
            src
        };
        let dst = if self.rng.random_bool(0.1) {
            any(self.rng)
        } else {
            dst
        };
        // The Ethernet header: mostly the endpoint's or neighbour entry's
        // MAC to its gateway or the arrival device.
        let ep = m.endpoints6.get(&src).copied();
        let dev_mac = model
            .host
            .devices
            .iter()
            .find(|d| d.ifindex == self.ifindex)
            .map(|d| d.mac);
        let to = match (self.rng.random_range(0..10), ep, dev_mac) {
            (0..6, Some(ep), _) => ep.gw_mac,
            (6..8, _, Some(mac)) => mac,
            _ => self.mac(),
        };
        let neigh = model
            .host
            .neighbours6
            .iter()
            .find(|n| n.1 == src)
            .map(|n| n.2);
        let from = match (self.rng.random_range(0..10), ep, neigh) {
            (0..7, Some(ep), _) => ep.mac,
            (7..9, _, Some(mac)) => mac,
            _ => self.mac(),
        };
        let mut f = Vec::with_capacity(54);
        f.extend(to);
        f.extend(from);
        f.extend([0x86, 0xdd]);
        f.extend(self.ipv6_packet(src, dst));
        f
    }

    /// An IPv6 packet from `src` to `dst` (`ipv6`'s, without Ethernet).
    fn ipv6_packet(&mut self, src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
        let r = &mut *self.rng;
        let hop_limit = *[0u8, 1, 1, 2, 64, 64, 64, 255].choose(r).expect("hops");
        let payload_len = match r.random_range(0..20) {
            0..16 => r.random_range(0..64),
            16..19 => r.random_range(1_380..1_520),
            _ => r.random_range(1_520..3_200),
        };
        let (next, l4): (u8, Vec<u8>) = match r.random_range(0..12) {
            0..4 => {
                let udp = UdpHeader {
                    source_port: r.random(),
                    destination_port: r.random(),
                    length: (8 + payload_len) as u16,
                    checksum: r.random(),
                };
                (17, udp.to_bytes().to_vec())
            }
            4..6 => {
                let tcp = TcpHeader::new(r.random(), r.random(), r.random(), r.random());
                (6, tcp.to_bytes().to_vec())
            }
            6..9 => {
                let t = *[1u8, 2, 3, 4, 128, 129, 133, 134, 135, 136, 137, 143]
                    .choose(r)
                    .expect("types");
                (58, vec![t, 0, 0, 0, 0, 0, 0, 0])
            }
            9..11 => {
                // Hop-by-hop, routing, fragment, destination options, ESP.
                let ext = *[0u8, 43, 44, 60, 50].choose(r).expect("extensions");
                (ext, vec![17, 0, 1, 4, 0, 0, 0, 0])
            }
            _ => (r.random(), Vec::new()),
        };
        let payload = l4.len() + payload_len;
        let mut f = Vec::with_capacity(40 + payload);
        f.extend([
            0x60 | r.random_range(0..16),
            r.random(),
            r.random(),
            r.random(),
        ]);
        f.extend((payload as u16).to_be_bytes());
        f.extend([next, hop_limit]);
        f.extend(src);
        f.extend(dst);
        f.extend(l4);
        f.extend((0..payload_len).map(|_| r.random::<u8>()));
        f
    }

    /// One damage to an IPv6 frame: truncated at a header boundary (or
    /// anywhere), another version, payload length or next header, padding,
    /// a flipped byte.
    fn mutate6(&mut self, f: &mut Vec<u8>) {
        let r = &mut *self.rng;
        match r.random_range(0..7) {
            0 => {
                let cuts = [
                    14,
                    15,
                    20,
                    53,
                    54,
                    55,
                    61,
                    62,
                    r.random_range(14..f.len().max(15)),
                ];
                let cut = *cuts.choose(r).expect("cuts");
                f.truncate(cut.max(14));
            }
            1 if f.len() > 14 => f[14] = (r.random_range(0..16) << 4) | (f[14] & 0x0f),
            2 if f.len() > 19 => {
                let have = (f.len() - 54) as u16;
                let len: u16 = *[0, 1, have.wrapping_sub(1), have, have + 1, r.random()]
                    .choose(r)
                    .expect("lengths");
                f[18..20].copy_from_slice(&len.to_be_bytes());
            }
            3 if f.len() > 20 => f[20] = r.random(),
            4 => f.extend((0..r.random_range(1..40)).map(|_| r.random::<u8>())),
            _ => {
                let i = r.random_range(0..f.len());
                f[i] = r.random();
            }
        }
    }

    /// A frame of another EtherType with `len` bytes behind the header.
    fn other(&mut self, ether_type: u16, len: usize) -> Vec<u8> {
        let src = self.addr();
        let mut f = self.eth(src, ether_type);
        f.extend((0..len).map(|_| self.rng.random::<u8>()));
        f
    }

    /// An IPv4 packet behind an 802.1Q tag.
    fn vlan(&mut self) -> Vec<u8> {
        let ip = self.ipv4();
        let mut f = ip[0..12].to_vec();
        f.extend(EtherType::VLAN_TAGGED_FRAME.0.to_be_bytes());
        let tag = SingleVlanHeader {
            pcp: VlanPcp::ZERO,
            drop_eligible_indicator: false,
            vlan_id: VlanId::try_new(self.rng.random_range(1..4095)).expect("12 bits"),
            ether_type: EtherType::IPV4,
        };
        f.extend(tag.to_bytes());
        f.extend(&ip[14..]);
        f
    }

    /// One damage to the frame: truncated at a header boundary (or
    /// anywhere), a bad IHL, version, total length or checksum, padding, a
    /// flipped byte. The IPv4 checksum is made right again half the time,
    /// so that what lies behind it is reached.
    fn mutate(&mut self, f: &mut Vec<u8>) {
        let r = &mut *self.rng;
        // The IPv4 header damaged: the outer one, or a VXLAN packet's inner.
        let ip = if f.len() > 64 && r.random_bool(0.3) {
            64
        } else {
            14
        };
        let ihl = f.get(ip).map_or(20, |b| usize::from(b & 0x0f) * 4);
        match r.random_range(0..8) {
            0 => {
                let cuts = [
                    14,
                    15,
                    20,
                    33,
                    34,
                    ip + 19,
                    ip + 20,
                    ip + ihl - 1,
                    ip + ihl,
                    ip + ihl + 1,
                    41,
                    42,
                    49,
                    50,
                    63,
                    64,
                    83,
                    84,
                    r.random_range(14..f.len().max(15)),
                ];
                let cut = *cuts.choose(r).expect("cuts");
                f.truncate(cut.max(14));
            }
            1 if f.len() > ip => f[ip] = (f[ip] & 0xf0) | r.random_range(0..16),
            2 if f.len() > ip + 11 => {
                f[ip + 10 + r.random_range(0..2)] ^= 1 << r.random_range(0..8)
            }
            3 if f.len() > ip => f[ip] = (r.random_range(0..16) << 4) | (f[ip] & 0x0f),
            4 if f.len() > ip + 3 => {
                let have = f.len() - ip;
                let len: u16 = *[
                    0,
                    19,
                    ihl as u16 - 1,
                    have as u16,
                    have as u16 + 1,
                    r.random(),
                ]
                .choose(r)
                .expect("lengths");
                f[ip + 2..ip + 4].copy_from_slice(&len.to_be_bytes());
            }
            5 => f.extend((0..r.random_range(1..40)).map(|_| r.random::<u8>())),
            _ => {
                let i = r.random_range(0..f.len());
                f[i] = r.random();
            }
        }
        if r.random_bool(0.5) {
            fix_checksum(f, ip);
        }
    }
}

/// Recomputes the IPv4 header checksum at `ip`, if the header is there.
fn fix_checksum(f: &mut [u8], ip: usize) {
    let Some(&b) = f.get(ip) else { return };
    let hl = usize::from(b & 0x0f) * 4;
    if hl < 20 || f.len() < ip + hl {
        return;
    }
    f[ip + 10] = 0;
    f[ip + 11] = 0;
    let c = crate::wire::checksum(&f[ip..ip + hl]);
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
}
