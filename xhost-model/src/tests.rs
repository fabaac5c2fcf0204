//! The model's rules on hand-made cases, and the generator's replay,
//! without a kernel.

use xhost_common::{Endpoint, stat};

use crate::{
    Action, Config, Input, Maps, Model, Prefix, Prog, Redirect, Tunnel,
    generate::{self, batch_rng},
    host::{Device, Host},
};

const BR: u32 = 3;
const UL: u32 = 4;
const VETH: u32 = 5;
const UL_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x31];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x32];
const CTR_MAC: [u8; 6] = [2, 0x42, 0, 0, 0, 0x0b];
const GW_MAC: [u8; 6] = [2, 0x42, 0, 0, 0, 1];
const C1: [u8; 4] = [192, 168, 110, 11];
const R1: [u8; 4] = [192, 168, 220, 11];
const PEER: [u8; 4] = [172, 16, 91, 132];

fn model(tunnel: Option<Tunnel>) -> Model {
    let mut maps = Maps::default();
    maps.routes
        .insert(Prefix::new([192, 168, 220, 0], 24), PEER);
    maps.local_nets
        .insert(Prefix::new([192, 168, 110, 0], 24), BR);
    maps.endpoints.insert(
        C1,
        Endpoint {
            ifindex: VETH,
            flags: 0,
            mac: CTR_MAC,
            gw_mac: GW_MAC,
            _pad: [0; 4],
        },
    );
    maps.endpoint_ports.insert(VETH);
    maps.peer_hosts.insert(PEER);
    maps.underlay_addrs.insert([172, 16, 91, 131], UL);
    Model {
        maps,
        config: Config {
            tunnel,
            ..Config::default()
        },
        host: Host {
            devices: vec![
                Device {
                    ifindex: BR,
                    mac: GW_MAC,
                    addr: Some(([192, 168, 110, 1], 24)),
                    addr6: None,
                    mtu: 1500,
                },
                Device {
                    ifindex: UL,
                    mac: UL_MAC,
                    addr: Some(([172, 16, 91, 131], 24)),
                    addr6: None,
                    mtu: 1500,
                },
                Device {
                    ifindex: VETH,
                    mac: [2, 0, 0, 0, 0, 5],
                    addr: None,
                    addr6: None,
                    mtu: 1500,
                },
            ],
            neighbours: vec![(UL, PEER, PEER_MAC)],
            neighbours6: Vec::new(),
        },
    }
}

/// Ethernet + IPv4 (UDP, 8 payload bytes) with a correct checksum.
fn frame(src: [u8; 4], dst: [u8; 4], ttl: u8, proto: u8) -> Vec<u8> {
    let mut f = GW_MAC.to_vec();
    f.extend(CTR_MAC);
    f.extend([8, 0, 0x45, 0, 0, 28, 0x12, 0x34, 0, 0, ttl, proto, 0, 0]);
    f.extend(src);
    f.extend(dst);
    f.extend([11, 0, 0, 0, 0, 0, 0, 0]);
    let c = crate::wire::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

fn input(frame: Vec<u8>, ifindex: u32) -> Input {
    Input {
        frame,
        ifindex,
        priority: 0,
        tunnel_key: None,
    }
}

#[test]
fn a_containers_packet_for_a_peer_is_routed_with_ttl_and_checksum() {
    let m = model(None);
    let f = frame(C1, R1, 64, 17);
    let o = m.run(Prog::VethIn, &input(f.clone(), VETH));
    assert_eq!(
        o.action,
        Action::Redirect {
            ifindex: UL,
            how: Redirect::Out
        }
    );
    assert_eq!(o.counted, Some((stat::FWD_EGRESS, f.len() as u32)));
    assert_eq!(&o.frame[0..6], &PEER_MAC);
    assert_eq!(&o.frame[6..12], &UL_MAC);
    assert_eq!(o.frame[22], 63);
    assert_eq!(crate::wire::checksum(&o.frame[14..34]), 0);
}

#[test]
fn spoofed_and_malformed_frames() {
    let m = model(None);
    // Another source from the endpoint's veth: dropped, counted.
    let o = m.run(
        Prog::VethIn,
        &input(frame([192, 168, 110, 12], R1, 64, 17), VETH),
    );
    assert_eq!(o.action, Action::Drop);
    assert_eq!(o.counted.map(|c| c.0), Some(stat::DROP_SPOOFED_LOCAL));
    // A bad checksum is the kernel's, counted at the bridge only.
    let mut bad = frame(C1, R1, 64, 17);
    bad[25] ^= 1;
    let o = m.run(Prog::VethIn, &input(bad.clone(), VETH));
    assert_eq!((o.action, o.counted), (Action::Pass, None));
    let o = m.run(Prog::BridgeIn, &input(bad, BR));
    assert_eq!(o.counted.map(|c| c.0), Some(stat::PASS_MALFORMED));
    // TTL 1: the kernel's, handed on marked.
    let o = m.run(Prog::VethIn, &input(frame(C1, R1, 1, 17), VETH));
    assert_eq!((o.action, o.priority), (Action::Pass, VETH));
}

#[test]
fn only_peers_and_their_hosts_errors_reach_a_container() {
    let m = model(None);
    let o = m.run(Prog::NicIn, &input(frame(R1, C1, 64, 17), UL));
    assert_eq!(
        o.action,
        Action::Redirect {
            ifindex: VETH,
            how: Redirect::Peer
        }
    );
    assert_eq!(
        (&o.frame[0..6], &o.frame[6..12]),
        (&CTR_MAC[..], &GW_MAC[..])
    );
    let mut err = frame(PEER, C1, 64, 1);
    err[34] = 11;
    assert!(matches!(
        m.run(Prog::NicIn, &input(err.clone(), UL)).action,
        Action::Redirect { .. }
    ));
    assert_eq!(
        m.run(Prog::NicXdp, &input(err.clone(), UL)).action,
        Action::Pass
    );
    err[34] = 8;
    let o = m.run(Prog::NicIn, &input(err.clone(), UL));
    assert_eq!(
        (o.action, o.counted.map(|c| c.0)),
        (Action::Drop, Some(stat::DROP_SPOOFED))
    );
    assert_eq!(m.run(Prog::NicXdp, &input(err, UL)).action, Action::Drop);
}

#[test]
fn vxlan_mode_encapsulates_and_drops_bare_container_traffic() {
    let t = Tunnel {
        ifindex: 9,
        vni: 42,
        port: 8472,
    };
    let m = model(Some(t));
    let f = frame(C1, R1, 64, 17);
    let o = m.run(Prog::VethIn, &input(f.clone(), VETH));
    assert_eq!(o.frame.len(), f.len() + 50);
    assert_eq!(&o.frame[26..34], &[172, 16, 91, 131, 172, 16, 91, 132]);
    assert_eq!(&o.frame[42..50], &[8, 0, 0, 0, 0, 0, 42, 0][..]);
    assert_eq!(o.frame[64 + 8], 63);
    let o = m.run(Prog::NicIn, &input(frame(R1, C1, 64, 17), UL));
    assert_eq!(o.action, Action::Drop);
    // Without a tunnel key, the device's packets are no peer's.
    let o = m.run(Prog::VxlanIn, &input(frame(R1, C1, 64, 17), t.ifindex));
    assert_eq!(o.counted.map(|c| c.0), Some(stat::DROP_SPOOFED));
}

#[test]
fn a_seed_replays_the_same_maps_and_frames() {
    let m = model(None);
    let draw = |seed| {
        let mut rng = batch_rng(seed, 3);
        let maps = generate::maps(&mut rng, &m.host);
        let model = Model {
            maps: maps.clone(),
            ..m.clone()
        };
        let frames: Vec<Vec<u8>> = (0..50)
            .map(|_| generate::input(&mut rng, &model).frame)
            .collect();
        (format!("{maps:?}"), frames)
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}

fn v6(a: &str) -> [u8; 16] {
    a.parse::<std::net::Ipv6Addr>().expect("address").octets()
}

/// [`model`] with the IPv6 maps: fd00:220::/64 behind the peer, the
/// bridge's fd00:110::/64 and the endpoint fd00:110::11 on the veth.
fn model6(tunnel: Option<Tunnel>) -> Model {
    let mut m = model(tunnel);
    m.maps
        .routes6
        .insert(crate::Prefix6::new(v6("fd00:220::"), 64), PEER);
    m.maps
        .local_nets6
        .insert(crate::Prefix6::new(v6("fd00:110::"), 64), BR);
    let ep = m.maps.endpoints[&C1];
    m.maps.endpoints6.insert(v6("fd00:110::11"), ep);
    m
}

/// Ethernet + IPv6 with next header `next` and 8 payload bytes (the first
/// `first`), from the endpoint's MAC to its gateway.
fn frame6(src: &str, dst: &str, hop_limit: u8, next: u8, first: u8) -> Vec<u8> {
    let mut f = GW_MAC.to_vec();
    f.extend(CTR_MAC);
    f.extend([0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, next, hop_limit]);
    f.extend(v6(src));
    f.extend(v6(dst));
    f.extend([first, 0, 0, 0, 0, 0, 0, 0]);
    f
}

#[test]
fn ipv6_is_routed_and_checked_as_ipv4() {
    let m = model6(None);
    let f = frame6("fd00:110::11", "fd00:220::5", 64, 17, 0);
    let o = m.run(Prog::VethIn, &input(f.clone(), VETH));
    assert_eq!(
        o.action,
        Action::Redirect {
            ifindex: UL,
            how: Redirect::Out
        }
    );
    assert_eq!(o.counted, Some((stat::FWD_EGRESS6, f.len() as u32)));
    assert_eq!((&o.frame[0..6], o.frame[21]), (&PEER_MAC[..], 63));
    // Another source on the armed veth, even behind an extension header.
    let o = m.run(
        Prog::VethIn,
        &input(frame6("fd00:110::12", "fd00:220::5", 64, 60, 17), VETH),
    );
    assert_eq!(o.counted.map(|c| c.0), Some(stat::DROP_SPOOFED_LOCAL6));
    // The endpoint's own, behind one: the kernel's, handed on marked.
    let o = m.run(
        Prog::VethIn,
        &input(frame6("fd00:110::11", "fd00:220::5", 64, 60, 17), VETH),
    );
    assert_eq!((o.action, o.priority), (Action::Pass, VETH));
    for (name, f, reason) in [
        (
            "hop limit 1",
            frame6("fd00:110::11", "fd00:220::5", 1, 17, 0),
            stat::PASS_HOP_LIMIT6,
        ),
        (
            "link-local",
            frame6("fe80::11", "fd00:220::5", 64, 17, 0),
            stat::PASS_CONTROL6,
        ),
        (
            "neighbour solicitation",
            frame6("fd00:110::11", "fd00:220::5", 255, 58, 135),
            stat::PASS_CONTROL6,
        ),
        (
            "no peer's",
            frame6("fd00:110::11", "2001:db8::1", 64, 17, 0),
            stat::PASS_NOT_OURS6,
        ),
    ] {
        // As handed on by the endpoint's veth: marked.
        let mut i = input(f, BR);
        i.priority = VETH;
        let o = m.run(Prog::BridgeIn, &i);
        assert_eq!(o.counted.map(|c| c.0), Some(reason), "{name}");
    }
}

#[test]
fn only_peers_ipv6_subnets_reach_a_container() {
    let m = model6(None);
    let f = frame6("fd00:220::5", "fd00:110::11", 64, 17, 0);
    let o = m.run(Prog::NicIn, &input(f, UL));
    assert_eq!(
        (o.action, o.counted.map(|c| c.0)),
        (
            Action::Redirect {
                ifindex: VETH,
                how: Redirect::Peer
            },
            Some(stat::FWD_INGRESS6)
        )
    );
    let spoofed = frame6("2001:db8::1", "fd00:110::11", 64, 17, 0);
    let o = m.run(Prog::NicIn, &input(spoofed.clone(), UL));
    assert_eq!(
        (o.action, o.counted.map(|c| c.0)),
        (Action::Drop, Some(stat::DROP_SPOOFED6))
    );
    let o = m.run(Prog::NicXdp, &input(spoofed.clone(), UL));
    assert_eq!(o.action, Action::Drop);
    // VXLAN mode: a container's IPv6 for a peer is encapsulated (outer IPv4
    // EtherType, inner EtherType IPv6, hop limit - 1); bare IPv6 for a local
    // container is dropped, whatever its source.
    let t = Tunnel {
        ifindex: 9,
        vni: 1,
        port: 8472,
    };
    let m = model6(Some(t));
    let f = frame6("fd00:110::11", "fd00:220::5", 64, 17, 0);
    let o = m.run(Prog::VethIn, &input(f.clone(), VETH));
    assert_eq!(o.frame.len(), f.len() + 50);
    assert_eq!(&o.frame[12..14], &[0x08, 0x00]);
    assert_eq!(&o.frame[62..64], &[0x86, 0xdd]);
    assert_eq!(o.frame[64 + 7], 63);
    assert_eq!(o.counted.map(|c| c.0), Some(stat::FWD_EGRESS6));
    for src in ["2001:db8::1", "fd00:220::5"] {
        let bare = frame6(src, "fd00:110::11", 64, 17, 0);
        let o = m.run(Prog::NicIn, &input(bare.clone(), UL));
        assert_eq!(
            (o.action, o.counted.map(|c| c.0)),
            (Action::Drop, Some(stat::DROP_SPOOFED6)),
            "bare from {src}"
        );
        let o = m.run(Prog::NicXdp, &input(bare, UL));
        assert_eq!(o.action, Action::Drop, "XDP: bare from {src}");
    }
}
