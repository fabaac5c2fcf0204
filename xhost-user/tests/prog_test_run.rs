//! Datapath unit tests with BPF_PROG_TEST_RUN: crafted frame in, verdict,
//! exact frame out, and the one counter it must move.
//!
//! Each test runs on a thread of its own that unshares a fresh network
//! namespace, so `bpf_fib_lookup` sees a small host made for it and nothing
//! outlives the thread:
//!
//! ```text
//!   br0  192.168.110.1/24 (bridge; neighbour 192.168.110.12 permanent)
//!   ul0  172.16.91.131/24 (veth;   neighbour 172.16.91.132 permanent,
//!                                   172.16.91.133 unresolved)
//! ```

mod support;

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Type,
    Icmpv6Type, IpDscp, IpEcn, IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv4HeaderSlice,
    Ipv6Header, LinkHeader, NetHeaders, NetSlice, PacketBuilder, PacketBuilderStep, PacketHeaders,
    SlicedPacket, TcpHeader, TcpOptionElement, TransportHeader, TransportSlice, UdpHeader,
    checksum::Sum16BitWords, icmpv4, icmpv6,
};
use support::*;
use xhost_common::{Counter, stat};
use xhost_user::{datapath::RouteTable, net::Ipv4Net};

/// `f`'s Ethernet and IPv4 headers as etherparse reads them, and the bytes
/// after the IPv4 header.
fn eth_ip(f: &[u8]) -> (Ethernet2Header, Ipv4Header, &[u8]) {
    let (eth, rest) = Ethernet2Header::from_slice(f).expect("Ethernet II frame");
    let (ip, rest) = Ipv4Header::from_slice(rest).expect("IPv4 header");
    (eth, ip, rest)
}

/// `f` with its Ethernet and IPv4 headers changed by `edit` and written
/// again by etherparse, with the IPv4 checksum `edit` leaves, right or not;
/// the bytes after the IPv4 header as they were.
fn rewrite_ipv4(f: &[u8], edit: impl FnOnce(&mut Ethernet2Header, &mut Ipv4Header)) -> Vec<u8> {
    let (mut eth, mut ip, rest) = eth_ip(f);
    edit(&mut eth, &mut ip);
    let mut o = eth.to_bytes().to_vec();
    o.extend_from_slice(&ip.to_bytes());
    o.extend_from_slice(rest);
    o
}

/// [`rewrite_ipv4`] with the IPv4 checksum recomputed from scratch.
fn with_ipv4(f: &[u8], edit: impl FnOnce(&mut Ethernet2Header, &mut Ipv4Header)) -> Vec<u8> {
    rewrite_ipv4(f, |eth, ip| {
        edit(eth, ip);
        ip.header_checksum = ip.calc_header_checksum();
    })
}

/// What a router makes of `f`: new MACs, TTL - 1, checksum recomputed from
/// scratch (the datapath patches it incrementally; both must agree).
fn routed(f: &[u8], smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    with_ipv4(f, |eth, ip| {
        eth.source = smac;
        eth.destination = dmac;
        ip.time_to_live -= 1;
    })
}

/// UDP frame `f` (as [`ipv4`] builds them) grown with a zero payload to
/// `l3_len` bytes of IPv4, lengths and checksums to match.
fn with_l3_len(f: &[u8], l3_len: u16) -> Vec<u8> {
    let h = PacketHeaders::from_ethernet_slice(f).expect("frame");
    let (
        Some(LinkHeader::Ethernet2(eth)),
        Some(NetHeaders::Ipv4(ip, exts)),
        Some(TransportHeader::Udp(udp)),
    ) = (h.link, h.net, h.transport)
    else {
        panic!("not Ethernet, IPv4, UDP: {f:?}");
    };
    let payload = vec![0; usize::from(l3_len) - ip.header_len() - UdpHeader::LEN];
    let mut o = Vec::new();
    PacketBuilder::ethernet2(eth.source, eth.destination)
        .ip(IpHeaders::Ipv4(ip, exts))
        .udp(udp.source_port, udp.destination_port)
        .write(&mut o, &payload)
        .expect("frame");
    o
}

/// `f` with TTL - 1 and its checksum recomputed: what `bpf_redirect_neigh`
/// is handed (the kernel writes the MACs once the neighbour resolves).
fn ttl_decremented(f: &[u8]) -> Vec<u8> {
    with_ipv4(f, |_, ip| ip.time_to_live -= 1)
}

const ECHO_REQUEST: Icmpv4Type = Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 1, seq: 1 });
const TIME_EXCEEDED: Icmpv4Type =
    Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
const FRAG_NEEDED: Icmpv4Type =
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1400,
    });
const HOST_UNREACHABLE: Icmpv4Type =
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Host);

/// An ICMP message `icmp` from `src` to `dst`, TTL 63, with no payload.
fn icmp(src: [u8; 4], dst: [u8; 4], icmp: Icmpv4Type) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, ANY_MAC)
        .ip(IpHeaders::Ipv4(
            ipv4_header(src, dst, 63),
            Default::default(),
        ))
        .icmpv4(icmp)
        .write(&mut f, &[])
        .expect("ICMP frame");
    f
}

/// A broadcast ARP request from 192.168.110.11 for the gateway.
fn arp() -> Vec<u8> {
    let request = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &ANY_MAC,
        &[192, 168, 110, 11],
        &[0; 6],
        &[192, 168, 110, 1],
    )
    .expect("ARP request");
    let mut f = Vec::new();
    PacketBuilder::ethernet2(ANY_MAC, [0xff; 6])
        .arp(request)
        .write(&mut f)
        .expect("ARP frame");
    f
}

/// An empty UDP datagram over IPv6.
fn ipv6() -> Vec<u8> {
    let addr = |a: &str| a.parse::<std::net::Ipv6Addr>().expect("address").octets();
    let mut f = Vec::new();
    PacketBuilder::ethernet2(ANY_MAC, ANY_MAC)
        .ipv6(addr("2001:db8::1"), addr("2001:db8::2"), 64)
        .udp(40000, 5201)
        .write(&mut f, &[])
        .expect("IPv6 frame");
    f
}

fn counters(ebpf: &Ebpf) -> Vec<Counter> {
    let stats: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(ebpf.map("STATS").expect("STATS")).expect("percpu");
    (0..stat::COUNT)
        .map(|i| {
            stats
                .get(&i, 0)
                .expect("get")
                .iter()
                .fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                })
        })
        .collect()
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    /// Expected output frame; `None`: unchanged.
    out: Option<Vec<u8>>,
    /// The counter that must move by one packet of the frame's length.
    counter: u32,
}

/// Runs `prog` once on `frame` as if it arrived on `iface`: (verdict, frame out).
fn tc_test_run(
    ebpf: &mut Ebpf,
    prog: &str,
    iface: &str,
    frame: &[u8],
    name: &str,
) -> (u32, Vec<u8>) {
    let r = run_tc_prog(ebpf, prog, ifindex(iface), frame, 1)
        .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
    (r.verdict, r.out)
}

fn run_tc(ebpf: &mut Ebpf, prog: &str, iface: &str, cases: Vec<Case>) {
    for c in cases {
        let before = counters(ebpf);
        let (verdict, out) = tc_test_run(ebpf, prog, iface, &c.frame, c.name);
        assert_eq!(verdict, c.verdict, "{}: verdict", c.name);
        assert_eq!(
            &out,
            c.out.as_ref().unwrap_or(&c.frame),
            "{}: output frame",
            c.name
        );
        if c.counter == UNCOUNTED {
            assert_eq!(counters(ebpf), before, "{}: no counter may move", c.name);
        } else {
            assert_counter_moved(ebpf, &before, c.counter, c.frame.len(), c.name);
        }
    }
}

/// The counter of a case that no counter may follow (what `xhost_veth_in`
/// passes goes on to the bridge, which counts it).
const UNCOUNTED: u32 = u32::MAX;

fn assert_counter_moved(ebpf: &Ebpf, before: &[Counter], idx: u32, len: usize, name: &str) {
    let after = counters(ebpf);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let (dp, db) = (a.packets - b.packets, a.bytes - b.bytes);
        if i as u32 == idx {
            assert_eq!(
                (dp, db),
                (1, len as u64),
                "{name}: counter {} must count the frame",
                stat::NAMES[i]
            );
        } else {
            assert_eq!(
                (dp, db),
                (0, 0),
                "{name}: counter {} must not move",
                stat::NAMES[i]
            );
        }
    }
}

/// `f` with IHL 4 (a 16-byte header) and the checksum over those 16 bytes.
/// No header builder writes an IHL below 5, so the byte is set here.
fn with_ihl_4(f: &[u8]) -> Vec<u8> {
    const VERSION_IHL: usize = Ethernet2Header::LEN;
    const CHECKSUM: usize = Ethernet2Header::LEN + 10;
    let mut o = f.to_vec();
    o[VERSION_IHL] = 0x44;
    o[CHECKSUM..CHECKSUM + 2].fill(0);
    let sum = Sum16BitWords::new()
        .add_slice(&o[VERSION_IHL..VERSION_IHL + 16])
        .ones_complement();
    o[CHECKSUM..CHECKSUM + 2].copy_from_slice(&sum.to_be_bytes());
    o
}

const C1: [u8; 4] = [192, 168, 110, 11];
const C2: [u8; 4] = [192, 168, 110, 12];
const R1: [u8; 4] = [192, 168, 220, 11];

impl Case {
    /// A frame the program redirects as `out`, counted under `counter`.
    fn redirect(name: &'static str, frame: Vec<u8>, out: Vec<u8>, counter: u32) -> Case {
        Case {
            name,
            frame,
            verdict: TC_ACT_REDIRECT,
            out: Some(out),
            counter,
        }
    }

    /// A frame the program leaves to the kernel unchanged, counted under `counter`.
    fn pass(name: &'static str, frame: Vec<u8>, counter: u32) -> Case {
        Case {
            name,
            frame,
            verdict: TC_ACT_UNSPEC,
            out: None,
            counter,
        }
    }

    /// A frame the program drops, counted under `counter`.
    fn shot(name: &'static str, frame: Vec<u8>, counter: u32) -> Case {
        Case {
            name,
            frame,
            verdict: TC_ACT_SHOT,
            out: None,
            counter,
        }
    }
}

/// Runs the cases `cases` makes (inside the test host, where the interfaces
/// have their MACs) through `prog` as arriving on `iface`.
fn run_in_test_host(
    prog: &'static str,
    iface: &'static str,
    cases: impl FnOnce() -> Vec<Case> + Send + 'static,
) {
    in_test_host(move |ebpf| run_tc(ebpf, prog, iface, cases()));
}

/// [`run_in_test_host`] on the bridge ingress program: sent by a local container.
fn bridge_in(cases: impl FnOnce() -> Vec<Case> + Send + 'static) {
    run_in_test_host(xhost_common::PROG_BRIDGE_IN, "br0", cases);
}

/// [`run_in_test_host`] on the underlay ingress program: from the peer host.
fn nic_in(cases: impl FnOnce() -> Vec<Case> + Send + 'static) {
    run_in_test_host(xhost_common::PROG_NIC_IN, "ul0", cases);
}

/// C1 -> R1 forwarded: run first, it leaves the flow in the cache, so that
/// the cases after it show that a cached flow does not skip their checks.
fn forwarded_c1_r1() -> Case {
    let fwd = ipv4(C1, R1, 64, &[]);
    let out = routed(&fwd, mac("ul0"), PEER_MAC);
    Case::redirect("forward (the flow cached)", fwd, out, stat::FWD_EGRESS)
}

#[test]
fn egress_forwards_peer_traffic_up_to_the_underlay_mtu() {
    bridge_in(|| {
        let ul0 = mac("ul0");
        let fwd = ipv4(C1, R1, 64, &[]);
        let opts = ipv4(C1, R1, 64, &[1, 1, 1, 0]); // NOP NOP NOP EOL: IHL 6
        let unresolved = ipv4(C1, [192, 168, 230, 5], 64, &[]);
        // ul0's MTU is 1500: a packet of exactly that fits, one byte more is the
        // kernel's (ICMP frag-needed), also towards a neighbour not yet resolved.
        let at_mtu = with_l3_len(&fwd, 1500);
        let over_mtu = with_l3_len(&fwd, 1501);
        let over_mtu_unresolved = with_l3_len(&unresolved, 1501);
        vec![
            forwarded_c1_r1(),
            Case::redirect(
                "forward with IP options",
                opts.clone(),
                routed(&opts, ul0, PEER_MAC),
                stat::FWD_EGRESS,
            ),
            Case::redirect(
                "neighbour unresolved: redirect_neigh",
                unresolved.clone(),
                ttl_decremented(&unresolved),
                stat::FWD_EGRESS,
            ),
            Case::redirect(
                "exactly the underlay's MTU",
                at_mtu.clone(),
                routed(&at_mtu, ul0, PEER_MAC),
                stat::FWD_EGRESS,
            ),
            Case::pass("one byte over the underlay's MTU", over_mtu, stat::PASS_FIB),
            Case::pass(
                "over the MTU, neighbour unresolved",
                over_mtu_unresolved,
                stat::PASS_FIB,
            ),
        ]
    });
}

#[test]
fn egress_leaves_what_is_not_for_a_peer_container_to_the_kernel() {
    bridge_in(|| {
        vec![
            forwarded_c1_r1(),
            Case::pass("ARP", arp(), stat::PASS_NOT_IPV4),
            Case::pass("IPv6 for no peer", ipv6(), stat::PASS_NOT_OURS6),
            Case::pass(
                "to the peer host itself",
                ipv4(C1, [172, 16, 91, 132], 64, &[]),
                stat::PASS_NOT_OURS,
            ),
            Case::pass(
                "non-peer destination (MASQUERADE's)",
                ipv4(C1, [8, 8, 8, 8], 64, &[]),
                stat::PASS_NOT_OURS,
            ),
            Case::pass(
                "to the gateway",
                ipv4(C1, [192, 168, 110, 1], 64, &[]),
                stat::PASS_NOT_OURS,
            ),
            Case::pass(
                "source not a local container",
                ipv4([10, 9, 9, 9], R1, 64, &[]),
                stat::PASS_NOT_OURS,
            ),
            Case::pass("TTL 1", ipv4(C1, R1, 1, &[]), stat::PASS_TTL),
            Case::pass("TTL 0", ipv4(C1, R1, 0, &[]), stat::PASS_TTL),
        ]
    });
}

#[test]
fn egress_leaves_malformed_ipv4_to_the_kernel() {
    bridge_in(|| {
        let fwd = ipv4(C1, R1, 64, &[]);
        // IHL 15 claims a 60-byte header (40 bytes of NOP options); the frame
        // ends after 28 bytes of IP. (test_run itself refuses frames shorter
        // than a 20-byte IP header.)
        let mut truncated = ipv4(C1, R1, 64, &[1; 40]);
        truncated.truncate(Ethernet2Header::LEN + 28);
        vec![
            forwarded_c1_r1(),
            Case::pass(
                "bad header checksum",
                rewrite_ipv4(&fwd, |_, ip| ip.header_checksum ^= 0xff),
                stat::PASS_MALFORMED,
            ),
            Case::pass("truncated IPv4 header", truncated, stat::PASS_MALFORMED),
            Case::pass("IHL < 5", with_ihl_4(&fwd), stat::PASS_MALFORMED),
            // The total length claims one byte more than the frame holds.
            Case::pass(
                "total length beyond the frame",
                with_ipv4(&fwd, |_, ip| ip.total_len += 1),
                stat::PASS_MALFORMED,
            ),
            // Total length 0 is BIG TCP's, and only for GSO bursts beyond 64 KB.
            Case::pass(
                "total length 0, not a GSO burst",
                with_ipv4(&fwd, |_, ip| ip.total_len = 0),
                stat::PASS_MALFORMED,
            ),
        ]
    });
}

/// R1 -> C1 delivered to the known endpoint: run first, it leaves the flow in
/// the cache, so that the cases after it show that a cached flow does not skip
/// their checks.
fn delivered_r1_c1() -> Case {
    let to_ep = ipv4(R1, C1, 63, &[]);
    let out = routed(&to_ep, GW_MAC, CTR_MAC);
    Case::redirect(
        "known endpoint: redirect_peer",
        to_ep,
        out,
        stat::FWD_INGRESS,
    )
}

#[test]
fn ingress_delivers_peer_traffic_and_the_peer_hosts_icmp_errors() {
    nic_in(|| {
        let to_neigh = ipv4(R1, C2, 63, &[]);
        let time_exceeded = icmp([172, 16, 91, 132], C1, TIME_EXCEEDED);
        let frag_needed = icmp([172, 16, 91, 132], C1, FRAG_NEEDED);
        vec![
            delivered_r1_c1(),
            Case::redirect(
                "via the bridge (FIB)",
                to_neigh.clone(),
                routed(&to_neigh, mac("br0"), LOCAL_NEIGH_MAC),
                stat::FWD_INGRESS,
            ),
            Case::redirect(
                "peer host, ICMP time exceeded",
                time_exceeded.clone(),
                routed(&time_exceeded, GW_MAC, CTR_MAC),
                stat::FWD_INGRESS,
            ),
            Case::redirect(
                "peer host, ICMP frag needed",
                frag_needed.clone(),
                routed(&frag_needed, GW_MAC, CTR_MAC),
                stat::FWD_INGRESS,
            ),
        ]
    });
}

#[test]
fn ingress_drops_sources_outside_the_peers_subnets() {
    nic_in(|| {
        vec![
            delivered_r1_c1(),
            Case::shot(
                "spoofed source",
                ipv4([10, 1, 1, 1], C1, 63, &[]),
                stat::DROP_SPOOFED,
            ),
            Case::shot(
                "peer host itself as source (UDP)",
                ipv4([172, 16, 91, 132], C1, 63, &[]),
                stat::DROP_SPOOFED,
            ),
            Case::shot(
                "peer host, ICMP echo",
                icmp([172, 16, 91, 132], C1, ECHO_REQUEST),
                stat::DROP_SPOOFED,
            ),
            Case::shot(
                "unknown host, ICMP time exceeded",
                icmp([172, 16, 91, 150], C1, TIME_EXCEEDED),
                stat::DROP_SPOOFED,
            ),
        ]
    });
}

#[test]
fn ingress_leaves_what_is_not_for_a_local_container_to_the_kernel() {
    nic_in(|| {
        vec![
            delivered_r1_c1(),
            Case::pass(
                "host-bound",
                ipv4(R1, [172, 16, 91, 131], 63, &[]),
                stat::PASS_NOT_OURS,
            ),
            Case::pass(
                "to the gateway address",
                ipv4(R1, [192, 168, 110, 1], 63, &[]),
                stat::PASS_FIB,
            ),
            Case::pass("TTL 1", ipv4(R1, C1, 1, &[]), stat::PASS_TTL),
            Case::pass("ARP", arp(), stat::PASS_NOT_IPV4),
            Case::pass("IPv6 for no peer", ipv6(), stat::PASS_NOT_OURS6),
        ]
    });
}

#[test]
fn xdp_drops_spoofed_early_and_passes_the_rest() {
    in_test_host(|ebpf| {
        let cases = [
            (
                "peer container -> local container",
                ipv4(R1, C1, 63, &[]),
                XDP_PASS,
                None,
            ),
            (
                "spoofed source",
                ipv4([10, 1, 1, 1], C1, 63, &[]),
                XDP_DROP,
                Some(stat::DROP_SPOOFED),
            ),
            (
                "peer host, ICMP echo",
                icmp([172, 16, 91, 132], C1, ECHO_REQUEST),
                XDP_DROP,
                Some(stat::DROP_SPOOFED),
            ),
            (
                "peer host, ICMP time exceeded",
                icmp([172, 16, 91, 132], C1, TIME_EXCEEDED),
                XDP_PASS,
                None,
            ),
            (
                "host-bound from anywhere",
                ipv4([10, 1, 1, 1], [172, 16, 91, 131], 63, &[]),
                XDP_PASS,
                None,
            ),
            ("ARP", arp(), XDP_PASS, None),
            ("IPv6", ipv6(), XDP_PASS, None),
        ];
        for (name, frame, verdict, counter) in cases {
            let before = counters(ebpf);
            let p: &mut Xdp = ebpf
                .program_mut(xhost_common::PROG_NIC_XDP)
                .expect("prog")
                .try_into()
                .expect("xdp");
            let mut out = vec![0u8; frame.len() + 64];
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.data_out = Some(&mut out);
            let res = p
                .test_run(opts)
                .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
            assert_eq!(res.return_value, verdict, "{name}: verdict");
            assert_eq!(
                &out[..res.data_size_out as usize],
                &frame[..],
                "{name}: XDP never rewrites"
            );
            match counter {
                Some(idx) => assert_counter_moved(ebpf, &before, idx, frame.len(), name),
                // Passed frames are counted by the TC program, not twice.
                None => assert_eq!(counters(ebpf), before, "{name}: no counter may move"),
            }
        }
    });
}

/// The running kernel's (major, minor).
fn kernel_version() -> (u32, u32) {
    let features = xhost_user::attach::KernelFeatures::probe().expect("probe");
    let mut parts = features
        .release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().expect("release number"));
    (parts.next().expect("major"), parts.next().expect("minor"))
}

/// `BPF_FIB_LOOKUP_SRC` came with Linux 6.7: the probe finds it there;
/// older kernels may have it backported (Debian's 6.1 does), so for them
/// only the agreement with the fallback list is checked.
#[test]
fn the_fib_lookup_src_probe_matches_the_kernel_release() {
    let features = xhost_user::attach::KernelFeatures::probe().expect("probe");
    let version = kernel_version();
    assert!(
        features.fib_lookup_src || version < (6, 7),
        "kernel {}: BPF_FIB_LOOKUP_SRC not found",
        features.release
    );
    assert_eq!(
        features
            .fallbacks
            .iter()
            .any(|f| f.contains("BPF_FIB_LOOKUP_SRC")),
        !features.fib_lookup_src
    );
}

/// Found by the differential fuzz test (tests/fuzz.rs): a known endpoint
/// whose address lies outside `LOCAL_NETS` is a local container to
/// `xhost_nic_in`, which dropped a spoofed packet for it, while
/// `xhost_nic_xdp` asked `LOCAL_NETS` only and passed it. Both programs
/// now take the same destinations as local.
#[test]
fn xdp_drops_what_tc_drops_for_an_endpoint_outside_local_nets() {
    in_test_host(|ebpf| {
        let outside = [10, 77, 0, 5];
        let mut eps: aya::maps::HashMap<_, [u8; 4], xhost_common::Endpoint> = ebpf
            .map_mut("ENDPOINTS")
            .expect("ENDPOINTS")
            .try_into()
            .expect("hash");
        let ep = xhost_common::Endpoint {
            ifindex: ifindex("br0"),
            flags: 0,
            mac: CTR_MAC,
            gw_mac: GW_MAC,
            _pad: [0; 4],
        };
        eps.insert(outside, ep, 0).expect("insert");
        for (name, frame, xdp, tc, counter) in [
            (
                "spoofed source",
                ipv4([10, 1, 1, 1], outside, 63, &[]),
                XDP_DROP,
                TC_ACT_SHOT,
                stat::DROP_SPOOFED,
            ),
            (
                "peer container",
                ipv4(R1, outside, 63, &[]),
                XDP_PASS,
                TC_ACT_REDIRECT,
                stat::FWD_INGRESS,
            ),
        ] {
            let before = counters(ebpf);
            let p: &mut Xdp = ebpf
                .program_mut(xhost_common::PROG_NIC_XDP)
                .expect("prog")
                .try_into()
                .expect("xdp");
            let mut out = vec![0u8; frame.len() + 64];
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.data_out = Some(&mut out);
            let res = p
                .test_run(opts)
                .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
            assert_eq!(res.return_value, xdp, "{name}: XDP verdict");
            if xdp == XDP_DROP {
                assert_counter_moved(ebpf, &before, counter, frame.len(), name);
            }
            let (verdict, _) = tc_test_run(ebpf, xhost_common::PROG_NIC_IN, "ul0", &frame, name);
            assert_eq!(verdict, tc, "{name}: TC verdict");
        }
    });
}

#[test]
fn test_host_netns_is_private() {
    // Guard against a test host leaking into the runner's namespace.
    in_test_host(|_| {});
    assert!(
        nix::net::if_::if_nametoindex("ul0").is_err(),
        "ul0 leaked out of the test netns"
    );
}

/// (name, frame, arrival interface, verdict, expected frame out or
/// unchanged, counter or `UNCOUNTED`).
type CtrCase = (
    &'static str,
    Vec<u8>,
    &'static str,
    u32,
    Option<Vec<u8>>,
    u32,
);

#[test]
fn from_ctr_routes_only_its_own_endpoint_and_counts_only_what_it_decides() {
    in_test_host(|ebpf| {
        let ul0 = mac("ul0");
        // The endpoint 192.168.110.11 sits behind br0 in this test host, so
        // frames "arrive" on br0 as they would on the container's veth.
        let fwd = to_mac(ipv4(C1, R1, 64, &[]), GW_MAC);
        let cases: [CtrCase; 6] = [
            (
                "own endpoint to its gateway",
                fwd.clone(),
                "br0",
                TC_ACT_REDIRECT,
                Some(routed(&fwd, ul0, PEER_MAC)),
                stat::FWD_EGRESS,
            ),
            (
                "not addressed to the gateway MAC",
                ipv4(C1, R1, 64, &[]),
                "br0",
                TC_ACT_UNSPEC,
                None,
                UNCOUNTED,
            ),
            (
                "source is no known endpoint",
                to_mac(ipv4(C2, R1, 64, &[]), GW_MAC),
                "br0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            ),
            (
                "endpoint's address from another port",
                fwd.clone(),
                "ul0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            ),
            (
                "to a non-peer destination",
                to_mac(ipv4(C1, [8, 8, 8, 8], 64, &[]), GW_MAC),
                "br0",
                TC_ACT_UNSPEC,
                None,
                UNCOUNTED,
            ),
            ("ARP", arp(), "br0", TC_ACT_UNSPEC, None, UNCOUNTED),
        ];
        run_ctr_cases(ebpf, cases);
    });
}

/// Runs `xhost_veth_in` on each case. What it passes goes on into the
/// bridge, which counts it: no counter may move then.
fn run_ctr_cases<const N: usize>(ebpf: &mut Ebpf, cases: [CtrCase; N]) {
    for (name, frame, iface, verdict, out_want, counter) in cases {
        let before = counters(ebpf);
        let (got, out) = tc_test_run(ebpf, xhost_common::PROG_VETH_IN, iface, &frame, name);
        assert_eq!(got, verdict, "{name}: verdict");
        assert_eq!(
            &out,
            out_want.as_ref().unwrap_or(&frame),
            "{name}: output frame"
        );
        if counter == UNCOUNTED {
            assert_eq!(counters(ebpf), before, "{name}: no counter may move");
        } else {
            assert_counter_moved(ebpf, &before, counter, frame.len(), name);
        }
    }
}

/// `ROUTES` and `DATAPATH_GEN` taken over, as the agent holds them.
fn route_table(ebpf: &mut Ebpf) -> RouteTable {
    RouteTable::new(
        ebpf.take_map("ROUTES").expect("ROUTES"),
        ebpf.take_map("DATAPATH_GEN").expect("DATAPATH_GEN"),
    )
    .expect("route table")
}

/// `ROUTES` answers are cached per CPU: a route written through
/// `RouteTable` must still decide the very next packet, on the CPU that
/// cached the old answer, for the destination (egress) and the source check
/// (ingress) alike.
#[test]
fn route_changes_retire_cached_answers() {
    in_test_host(|ebpf| {
        // One CPU for every run, so the second packet meets the first one's
        // cache entry instead of another CPU's empty slot.
        pin_to_cpu0();
        let mut routes = route_table(ebpf);
        let r1_net: Ipv4Net = "192.168.220.0/24".parse().expect("net");
        let ul0 = mac("ul0");
        let out = ipv4(C1, R1, 64, &[]);
        let into = ipv4(R1, C1, 63, &[]);
        let routed_out = || Case {
            name: "routed to the first peer",
            out: Some(routed(&out, ul0, PEER_MAC)),
            frame: out.clone(),
            verdict: TC_ACT_REDIRECT,
            counter: stat::FWD_EGRESS,
        };
        let unrouted_out = || Case {
            name: "route removed: no longer ours",
            frame: out.clone(),
            verdict: TC_ACT_UNSPEC,
            out: None,
            counter: stat::PASS_NOT_OURS,
        };
        let allowed_in = || Case {
            name: "from a routed prefix: delivered",
            out: Some(routed(&into, GW_MAC, CTR_MAC)),
            frame: into.clone(),
            verdict: TC_ACT_REDIRECT,
            counter: stat::FWD_INGRESS,
        };
        let refused_in = || Case {
            name: "route removed: source refused",
            frame: into.clone(),
            verdict: TC_ACT_SHOT,
            out: None,
            counter: stat::DROP_SPOOFED,
        };
        // Twice each: the second run is answered from the cache.
        run_tc(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            "br0",
            vec![routed_out(), routed_out()],
        );
        run_tc(
            ebpf,
            xhost_common::PROG_NIC_IN,
            "ul0",
            vec![allowed_in(), allowed_in()],
        );

        routes.remove(&r1_net).expect("remove route");
        run_tc(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            "br0",
            vec![unrouted_out(), unrouted_out()],
        );
        run_tc(
            ebpf,
            xhost_common::PROG_NIC_IN,
            "ul0",
            vec![refused_in(), refused_in()],
        );

        // Back, behind the peer whose MAC the kernel does not know.
        routes
            .set(&r1_net, [172, 16, 91, 133].into())
            .expect("set route");
        let moved = Case {
            name: "route moved to another peer",
            out: Some(ttl_decremented(&out)),
            frame: out.clone(),
            verdict: TC_ACT_REDIRECT,
            counter: stat::FWD_EGRESS,
        };
        run_tc(ebpf, xhost_common::PROG_BRIDGE_IN, "br0", vec![moved]);
        run_tc(ebpf, xhost_common::PROG_NIC_IN, "ul0", vec![allowed_in()]);
    });
}

/// Gives the test host's peer 172.16.91.132 a new MAC, as a neighbour
/// change the kernel would report (here no agent hears of it).
fn set_peer_mac(m: [u8; 6]) {
    let lladdr = m.map(|b| format!("{b:02x}")).join(":");
    sh(&[
        "ip",
        "neigh",
        "replace",
        "172.16.91.132",
        "lladdr",
        &lladdr,
        "nud",
        "permanent",
        "dev",
        "ul0",
    ]);
}

/// `xhost_veth_in` caches whole forwarding answers per CPU, FIB results
/// included. A bump of the generation (the agent's answer to a kernel
/// notification or a map write) must decide the very next packet, an answer
/// must age out by itself within 100 ms (no agent to bump), and a packet
/// longer than the cached answer has seen fit must be checked again.
#[test]
fn cached_forwarding_answers_follow_the_kernel_and_the_maps() {
    in_test_host(|ebpf| {
        pin_to_cpu0();
        let mut generation = route_table(ebpf);
        let ul0 = mac("ul0");
        let new_mac = [0x02, 0, 0, 0, 0, 0x33];
        let fwd = to_mac(ipv4(C1, R1, 64, &[]), GW_MAC);
        let to = |frame: &[u8], name: &'static str, peer_mac: [u8; 6]| Case {
            name,
            out: Some(routed(frame, ul0, peer_mac)),
            frame: frame.to_vec(),
            verdict: TC_ACT_REDIRECT,
            counter: stat::FWD_EGRESS,
        };
        // What from_ctr passes goes on to the bridge, which counts it.
        let passed = |frame: &[u8], name: &'static str| Case {
            name,
            frame: frame.to_vec(),
            verdict: TC_ACT_UNSPEC,
            out: None,
            counter: UNCOUNTED,
        };
        // Frames "arrive" on br0, where the test host's endpoint sits.
        let from_ctr =
            |ebpf: &mut Ebpf, cases| run_tc(ebpf, xhost_common::PROG_VETH_IN, "br0", cases);

        from_ctr(ebpf, vec![to(&fwd, "first packet", PEER_MAC)]);
        set_peer_mac(new_mac);
        // No bump yet: the answer cached before the change is still used.
        // (This is what makes the cache measurable here at all.)
        from_ctr(ebpf, vec![to(&fwd, "cached, not yet retired", PEER_MAC)]);
        generation.retire_cached().expect("bump");
        from_ctr(ebpf, vec![to(&fwd, "retired: the FIB's new MAC", new_mac)]);

        set_peer_mac(PEER_MAC);
        std::thread::sleep(std::time::Duration::from_millis(150));
        from_ctr(ebpf, vec![to(&fwd, "aged out without a bump", PEER_MAC)]);

        // MTU 1300 on the way to the peer: a packet up to what the cached
        // answer has seen fit is forwarded from the cache; a longer one is
        // checked against the FIB again (frag-needed is the kernel's).
        sh(&["ip", "link", "set", "ul0", "mtu", "1300"]);
        generation.retire_cached().expect("bump");
        let fits = with_l3_len(&fwd, 1300);
        let too_big = with_l3_len(&fwd, 1301);
        from_ctr(
            ebpf,
            vec![
                to(&fwd, "short packet fills the cache", PEER_MAC),
                to(&fits, "longest that fits, from the FIB", PEER_MAC),
                to(&fits, "longest that fits, from the cache", PEER_MAC),
                passed(&too_big, "longer than the route MTU"),
            ],
        );
        // Aged out and filled again by a short packet: what was seen to fit
        // before does not carry over, so an MTU drop no notification told of
        // (here: no agent to bump) is seen by the next longer packet.
        std::thread::sleep(std::time::Duration::from_millis(150));
        from_ctr(ebpf, vec![to(&fwd, "aged out, filled again", PEER_MAC)]);
        sh(&["ip", "link", "set", "ul0", "mtu", "1200"]);
        from_ctr(ebpf, vec![passed(&fits, "longer than the refilled answer")]);

        // The endpoint leaves ENDPOINTS (as the agent does: its veth
        // disarmed first, then Datapath::remove_endpoint: write, then bump):
        // its packets are no longer the fast path's, but the bridge's.
        disarm(ebpf, "br0");
        let mut eps: aya::maps::HashMap<_, [u8; 4], xhost_common::Endpoint> = ebpf
            .map_mut("ENDPOINTS")
            .expect("ENDPOINTS")
            .try_into()
            .expect("hash");
        eps.remove(&C1).expect("remove endpoint");
        generation.retire_cached().expect("bump");
        from_ctr(ebpf, vec![passed(&fwd, "endpoint removed")]);
    });
}

/// Puts `port` in `ENDPOINT_PORTS`, as `Datapath::arm_port` does.
fn arm(ebpf: &mut Ebpf, port: &str) {
    let mut ports: aya::maps::HashMap<_, u32, u32> = ebpf
        .map_mut("ENDPOINT_PORTS")
        .expect("ENDPOINT_PORTS")
        .try_into()
        .expect("hash");
    ports
        .insert(ifindex(port), xhost_common::ARMED, 0)
        .expect("arm");
}

/// Takes `port` out of `ENDPOINT_PORTS`, as `Datapath::disarm_port` does.
fn disarm(ebpf: &mut Ebpf, port: &str) {
    let mut ports: aya::maps::HashMap<_, u32, u32> = ebpf
        .map_mut("ENDPOINT_PORTS")
        .expect("ENDPOINT_PORTS")
        .try_into()
        .expect("hash");
    ports.remove(&ifindex(port)).expect("disarm");
}

/// A frame from the endpoint's MAC to `to` carrying `ip` and TCP segment
/// `tcp` with `payload` zero bytes, lengths and checksums etherparse's.
fn tcp_frame(ip: Ipv4Header, to: [u8; 6], tcp: TcpHeader, payload: usize) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, to)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp_header(tcp)
        .write(&mut f, &vec![0; payload])
        .expect("TCP frame");
    f
}

/// A TCP packet from `src` to `dst`, ports 40000 -> 80, whose header
/// carries `options`, with `payload` zero bytes, sent to the gateway MAC.
/// With a GSO size below the payload it is a TSO burst.
fn tcp(src: [u8; 4], dst: [u8; 4], options: &[TcpOptionElement], payload: usize) -> Vec<u8> {
    let mut header = TcpHeader::new(40000, 80, 0, 0);
    header.set_options(options).expect("TCP options");
    tcp_frame(ipv4_header(src, dst, 64), GW_MAC, header, payload)
}

/// A container's TSO burst leaves as segments of its IPv4 and TCP headers
/// plus the GSO size: that, not its total length, is what the route's MTU
/// is checked against, and what the flow cache holds it to. A burst whose
/// segments fit is forwarded and then answered from the cache; once the
/// MTU drops below its segments, it goes to the kernel (which segments it
/// and answers frag-needed), while one with smaller segments still passes.
#[test]
fn tso_bursts_are_checked_and_cached_by_their_segments() {
    in_test_host(|ebpf| {
        pin_to_cpu0();
        let mut generation = route_table(ebpf);
        let ul0 = mac("ul0");
        let br0 = ifindex("br0");
        let new_mac = [0x02, 0, 0, 0, 0, 0x33];
        // Two segments of 1448 bytes behind 20 + 32 bytes of headers (TCP
        // with timestamps, as Linux sends it): 1500 each, in a 2 948-byte burst.
        let timestamps = [
            TcpOptionElement::Noop,
            TcpOptionElement::Noop,
            TcpOptionElement::Timestamp(1, 0),
        ];
        let burst = tcp(C1, R1, &timestamps, 2 * 1448);
        let mut run = |name: &str, gso_size: u32, verdict: u32, out: Option<Vec<u8>>| {
            let r = run_tc_prog_ctx(
                ebpf,
                xhost_common::PROG_VETH_IN,
                &skb_ctx(br0, gso_size),
                &burst,
                1,
            )
            .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
            assert_eq!(r.verdict, verdict, "{name}: verdict");
            assert_eq!(&r.out, out.as_ref().unwrap_or(&burst), "{name}: frame");
        };
        let to = |m| Some(routed(&burst, ul0, m));

        run(
            "segments of 1500 fit MTU 1500",
            1448,
            TC_ACT_REDIRECT,
            to(PEER_MAC),
        );
        set_peer_mac(new_mac);
        run(
            "from the cache: the MAC before the change",
            1448,
            TC_ACT_REDIRECT,
            to(PEER_MAC),
        );
        generation.retire_cached().expect("bump");
        run(
            "retired: the FIB's new MAC",
            1448,
            TC_ACT_REDIRECT,
            to(new_mac),
        );

        sh(&["ip", "link", "set", "ul0", "mtu", "1499"]);
        generation.retire_cached().expect("bump");
        run(
            "segments of 1500 under MTU 1499: the kernel's",
            1448,
            TC_ACT_UNSPEC,
            None,
        );
        run(
            "segments of 1499 still fit",
            1447,
            TC_ACT_REDIRECT,
            to(new_mac),
        );
        run(
            "from the cache, 1499 still fit",
            1447,
            TC_ACT_REDIRECT,
            to(new_mac),
        );
        run(
            "segments of 1500 are not served from it",
            1448,
            TC_ACT_UNSPEC,
            None,
        );
        // Not GSO, the same bytes are one 2 948-byte packet: too big.
        run(
            "the burst as one packet: the kernel's",
            0,
            TC_ACT_UNSPEC,
            None,
        );

        // BIG TCP writes total length 0 only on bursts beyond 64 KB (which
        // BPF_PROG_TEST_RUN cannot hold): on this one it is malformed.
        let zero_len = with_ipv4(&burst, |_, ip| ip.total_len = 0);
        let before = counters(ebpf);
        let r = run_tc_prog_ctx(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            &skb_ctx(br0, 1448),
            &zero_len,
            1,
        )
        .expect("test_run");
        assert_eq!(
            (r.verdict, &r.out),
            (TC_ACT_UNSPEC, &zero_len),
            "total length 0 on a 2 948-byte burst: the kernel's"
        );
        assert_counter_moved(
            ebpf,
            &before,
            stat::PASS_MALFORMED,
            zero_len.len(),
            "total length 0 on a 2 948-byte burst",
        );
    });
}

const VNI: u32 = 0x12_3456;
const VXLAN_PORT: u16 = 4789;
/// A peer container behind the unresolved peer host 172.16.91.133.
const R2: [u8; 4] = [192, 168, 230, 11];

/// Runs `f` in the test host with a vxlan device `vx0` (MTU 1450, external)
/// and the datapath loaded in VXLAN mode for it.
fn in_vxlan_test_host(f: impl FnOnce(&mut Ebpf) + Send + 'static) {
    let load = || {
        for cmd in [
            "ip link add vx0 mtu 1450 type vxlan external dstport 4789",
            "ip link set vx0 up",
        ] {
            sh(&cmd.split(' ').collect::<Vec<_>>());
        }
        loaded_vxlan(ifindex("vx0"), VNI, VXLAN_PORT)
    };
    in_test_host_with(load, f);
}

/// The outer headers of a VXLAN packet.
#[derive(Clone, Copy)]
struct Outer {
    src: [u8; 4],
    dst: [u8; 4],
    smac: [u8; 6],
    dmac: [u8; 6],
    tos: u8,
    id: u16,
    more_fragments: bool,
    sport: u16,
    port: u16,
    udp_check: u16,
    vni: u32,
}

impl Outer {
    /// What the kernel's vxlan device sends from 172.16.91.131 to `peer`:
    /// IPv4 without DF, TTL 64, UDP to the configured port with a zero
    /// checksum, the VXLAN header with the I flag and our VNI.
    fn to_peer(peer: [u8; 4], smac: [u8; 6], dmac: [u8; 6]) -> Self {
        Self {
            src: [172, 16, 91, 131],
            dst: peer,
            smac,
            dmac,
            tos: 0,
            id: 0,
            more_fragments: false,
            sport: 40_000,
            port: VXLAN_PORT,
            udp_check: 0,
            vni: VNI,
        }
    }

    /// As `got`, a packet the datapath encapsulated, says for the fields it
    /// chooses per packet (IP ID, UDP source port), checked to be in range.
    fn as_sent(self, got: &[u8]) -> Self {
        let p = SlicedPacket::from_ethernet(got)
            .unwrap_or_else(|e| panic!("output is no VXLAN packet ({e}): {got:?}"));
        let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (&p.net, &p.transport)
        else {
            panic!("output is no IPv4/UDP packet: {got:?}");
        };
        let sport = udp.source_port();
        assert!(
            (32_768..60_999).contains(&sport),
            "outer source port {sport} outside the kernel's vxlan range"
        );
        Self {
            id: ip.header().identification(),
            sport,
            ..self
        }
    }

    /// `inner` (a whole frame) wrapped in these headers.
    fn wrap(&self, inner: &[u8]) -> Vec<u8> {
        // The VXLAN header (RFC 7348), which etherparse does not know: the
        // I flag, 24 bits of VNI.
        let vni = self.vni.to_be_bytes();
        let mut payload = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
        payload.extend_from_slice(inner);
        let udp_len = UdpHeader::LEN + payload.len();
        let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, self.src, self.dst).expect("ip");
        ip.set_payload_len(udp_len).expect("fits");
        ip.dscp = IpDscp::try_new(self.tos >> 2).expect("DSCP");
        ip.ecn = IpEcn::try_new(self.tos & 3).expect("ECN");
        ip.identification = self.id;
        ip.dont_fragment = false;
        ip.more_fragments = self.more_fragments;
        // The UDP checksum as given (the vxlan device sends none), so not
        // through the builder, which computes one.
        let udp = UdpHeader {
            source_port: self.sport,
            destination_port: self.port,
            length: u16::try_from(udp_len).expect("fits"),
            checksum: self.udp_check,
        };
        let eth = Ethernet2Header {
            source: self.smac,
            destination: self.dmac,
            ether_type: EtherType::IPV4,
        };
        let mut f = eth.to_bytes().to_vec();
        ip.write(&mut f).expect("ip");
        f.extend_from_slice(&udp.to_bytes());
        f.extend_from_slice(&payload);
        f
    }
}

/// `f` with TOS byte `tos` (DSCP and ECN), checksum to match.
fn with_tos(f: &[u8], tos: u8) -> Vec<u8> {
    with_ipv4(f, |_, ip| {
        ip.dscp = IpDscp::try_new(tos >> 2).expect("DSCP");
        ip.ecn = IpEcn::try_new(tos & 3).expect("ECN");
    })
}

/// VXLAN mode: a container's packet for a peer's container is encapsulated
/// by the program itself, exactly as the kernel's vxlan device would
/// (headers checked byte by byte, ECN carried out, the flow's source port
/// stable), routed (inner TTL - 1) and sent along the FIB's answer for the
/// peer host, then answered from the flow cache. What would not fit the
/// underlay once encapsulated is the kernel's; a GSO burst the program
/// cannot grow goes to the vxlan device as it is.
#[test]
fn vxlan_mode_encapsulates_in_the_program() {
    in_vxlan_test_host(|ebpf| {
        pin_to_cpu0();
        let ul0 = mac("ul0");
        let br0 = ifindex("br0");
        let fwd = to_mac(ipv4(C1, R1, 64, &[]), GW_MAC);
        let mut sport = None;
        for (name, tos, outer_tos) in [
            ("not ECN-capable", 0x10, 0x00),
            ("from the cache: ECT(1) carried out", 0x11, 0x01),
            ("CE is carried out as ECT(0)", 0x13, 0x02),
        ] {
            let frame = with_tos(&fwd, tos);
            let before = counters(ebpf);
            let (verdict, out) = tc_test_run(ebpf, xhost_common::PROG_VETH_IN, "br0", &frame, name);
            assert_eq!(verdict, TC_ACT_REDIRECT, "{name}: verdict");
            let sent = Outer {
                tos: outer_tos,
                ..Outer::to_peer([172, 16, 91, 132], ul0, PEER_MAC).as_sent(&out)
            };
            assert_eq!(
                out,
                sent.wrap(&ttl_decremented(&frame)),
                "{name}: output frame"
            );
            // Counted as the container sent it.
            assert_counter_moved(ebpf, &before, stat::FWD_EGRESS, frame.len(), name);
            assert_eq!(
                *sport.get_or_insert(sent.sport),
                sent.sport,
                "{name}: one flow, one source port"
            );
        }

        // The bridge's program encapsulates the same way.
        let before = counters(ebpf);
        let (verdict, out) = tc_test_run(ebpf, xhost_common::PROG_BRIDGE_IN, "br0", &fwd, "bridge");
        assert_eq!(verdict, TC_ACT_REDIRECT, "bridge: verdict");
        let want = Outer::to_peer([172, 16, 91, 132], ul0, PEER_MAC)
            .as_sent(&out)
            .wrap(&ttl_decremented(&fwd));
        assert_eq!(out, want, "bridge: output frame");
        assert_counter_moved(ebpf, &before, stat::FWD_EGRESS, fwd.len(), "bridge");

        // The peer host's MAC is not resolved: encapsulated for it all the
        // same, and handed to bpf_redirect_neigh (which writes the MACs).
        let unresolved = to_mac(ipv4(C1, R2, 64, &[]), GW_MAC);
        let (verdict, out) = tc_test_run(
            ebpf,
            xhost_common::PROG_VETH_IN,
            "br0",
            &unresolved,
            "unresolved",
        );
        assert_eq!(verdict, TC_ACT_REDIRECT, "unresolved: verdict");
        // The MACs are the kernel's to write: taken from the output.
        let (eth, _, _) = eth_ip(&out);
        let want = Outer::to_peer([172, 16, 91, 133], eth.source, eth.destination)
            .as_sent(&out)
            .wrap(&ttl_decremented(&unresolved));
        assert_eq!(out, want, "unresolved: output frame past the MACs");

        // 1450 bytes of IPv4 are 1500 on the underlay; one more is the
        // kernel's (its route into the vxlan device answers frag-needed).
        let fits = with_l3_len(&fwd, 1450);
        let (verdict, out) = tc_test_run(ebpf, xhost_common::PROG_VETH_IN, "br0", &fits, "1450");
        assert_eq!(verdict, TC_ACT_REDIRECT, "1450: verdict");
        let want = Outer::to_peer([172, 16, 91, 132], ul0, PEER_MAC)
            .as_sent(&out)
            .wrap(&ttl_decremented(&fits));
        assert_eq!(
            want.len(),
            fits.len() + 50,
            "1450: 50 bytes of outer headers"
        );
        assert_eq!(out, want, "1450: encapsulated");
        let big = with_l3_len(&fwd, 1451);
        let before = counters(ebpf);
        let (verdict, out) = tc_test_run(ebpf, xhost_common::PROG_BRIDGE_IN, "br0", &big, "1451");
        assert_eq!(
            (verdict, &out),
            (TC_ACT_UNSPEC, &big),
            "1451: the kernel's, untouched"
        );
        assert_counter_moved(ebpf, &before, stat::PASS_FIB, big.len(), "1451");

        // TTL 1: the kernel's (time exceeded), untouched.
        let expiring = to_mac(ipv4(C1, R1, 1, &[]), GW_MAC);
        let (verdict, out) = tc_test_run(ebpf, xhost_common::PROG_VETH_IN, "br0", &expiring, "ttl");
        assert_eq!((verdict, &out), (TC_ACT_UNSPEC, &expiring), "TTL 1");

        // A UDP GSO burst (gso_size on a UDP packet): its segments only the
        // kernel measures, so it goes to the vxlan device, routed but not
        // encapsulated here.
        let udp_burst = with_l3_len(&fwd, 1000);
        let r = run_tc_prog_ctx(
            ebpf,
            xhost_common::PROG_VETH_IN,
            &skb_ctx(br0, 400),
            &udp_burst,
            1,
        )
        .expect("test_run");
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "UDP GSO: verdict");
        assert_eq!(
            r.out,
            ttl_decremented(&udp_burst),
            "UDP GSO: routed, as it is"
        );
    });
}

/// VXLAN mode, on the underlay: a peer's VXLAN packet for a local
/// endpoint is decapsulated and delivered by the program (routed: the
/// container's MACs, TTL - 1), counted at its inner length as the vxlan
/// device's path counts it. Every packet the program may not take itself
/// goes to the kernel untouched (its vxlan device decapsulates, and
/// `xhost_vxlan_in` checks and counts).
#[test]
fn vxlan_mode_decapsulates_in_the_program() {
    in_vxlan_test_host(|ebpf| {
        let ul0 = mac("ul0");
        let from_peer = Outer {
            src: [172, 16, 91, 132],
            dst: [172, 16, 91, 131],
            ..Outer::to_peer([0; 4], PEER_MAC, ul0)
        };
        let inner = ipv4(R1, C1, 63, &[]);
        let frame = from_peer.wrap(&inner);
        let before = counters(ebpf);
        let (verdict, out) = tc_test_run(ebpf, xhost_common::PROG_NIC_IN, "ul0", &frame, "valid");
        assert_eq!(verdict, TC_ACT_REDIRECT, "valid: verdict");
        assert_eq!(out, routed(&inner, GW_MAC, CTR_MAC), "valid: output frame");
        assert_counter_moved(ebpf, &before, stat::FWD_INGRESS, inner.len(), "valid");

        let fragment = Outer {
            more_fragments: true,
            ..from_peer
        };
        // (what, frame, GSO size)
        let kernels: [(&str, Vec<u8>, u32); 12] = [
            (
                "not to this host's MAC",
                Outer {
                    dmac: ANY_MAC,
                    ..from_peer
                }
                .wrap(&inner),
                0,
            ),
            (
                "to our MAC but another host's address",
                Outer {
                    dst: [172, 16, 91, 140],
                    ..from_peer
                }
                .wrap(&inner),
                0,
            ),
            (
                "another VNI",
                Outer {
                    vni: 7,
                    ..from_peer
                }
                .wrap(&inner),
                0,
            ),
            (
                "another port",
                Outer {
                    port: 8472,
                    ..from_peer
                }
                .wrap(&inner),
                0,
            ),
            (
                "a UDP checksum (the kernel verifies it)",
                Outer {
                    udp_check: 0x1234,
                    ..from_peer
                }
                .wrap(&inner),
                0,
            ),
            ("a fragment", fragment.wrap(&inner), 0),
            (
                "from no peer host",
                Outer {
                    src: [172, 16, 91, 150],
                    ..from_peer
                }
                .wrap(&inner),
                0,
            ),
            (
                "inner source of another peer",
                from_peer.wrap(&ipv4(R2, C1, 63, &[])),
                0,
            ),
            (
                "inner source the peer host itself",
                from_peer.wrap(&icmp([172, 16, 91, 132], C1, TIME_EXCEEDED)),
                0,
            ),
            ("inner TTL 1", from_peer.wrap(&ipv4(R1, C1, 1, &[])), 0),
            (
                "no endpoint for the inner destination",
                from_peer.wrap(&ipv4(R1, C2, 63, &[])),
                0,
            ),
            ("a GSO packet", frame.clone(), 400),
        ];
        for (name, f, gso_size) in kernels {
            let before = counters(ebpf);
            let r = run_tc_prog_ctx(
                ebpf,
                xhost_common::PROG_NIC_IN,
                &skb_ctx(ifindex("ul0"), gso_size),
                &f,
                1,
            )
            .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
            assert_eq!(
                (r.verdict, &r.out),
                (TC_ACT_UNSPEC, &f),
                "{name}: the kernel's, untouched"
            );
            assert_counter_moved(ebpf, &before, stat::PASS_NOT_OURS, f.len(), name);
        }
    });
}

/// The test host's other local neighbour (192.168.110.12, permanent entry
/// on br0 with `LOCAL_NEIGH_MAC`) has no endpoint: as a container the agent
/// does not know yet. 192.168.110.13 is a known endpoint behind ul0 (another
/// veth than br0, where the endpoint 192.168.110.11 sits).
const C3: [u8; 4] = [192, 168, 110, 13];
const C3_MAC: [u8; 6] = [0x02, 0x42, 0xc0, 0xa8, 0x6e, 0x0d];
/// An address of the local subnet no container holds (no neighbour entry).
const UNUSED: [u8; 4] = [192, 168, 110, 99];
/// An address of the peer's subnet, and one of nobody's.
const PEER_SUBNET: [u8; 4] = [192, 168, 220, 77];
const FOREIGN: [u8; 4] = [10, 1, 2, 3];

fn add_endpoint_behind_ul0(ebpf: &mut Ebpf) {
    let mut eps: aya::maps::HashMap<_, [u8; 4], xhost_common::Endpoint> = ebpf
        .map_mut("ENDPOINTS")
        .expect("ENDPOINTS")
        .try_into()
        .expect("hash");
    let ep = xhost_common::Endpoint {
        ifindex: ifindex("ul0"),
        flags: 0,
        mac: C3_MAC,
        gw_mac: GW_MAC,
        _pad: [0; 4],
    };
    eps.insert(C3, ep, 0).expect("insert");
}

/// A packet for a peer's subnet leaves only with the address (and MAC) of
/// the container that sent it. On an endpoint's veth (`xhost_veth_in`):
/// every other source is dropped and counted as `drop_spoofed_local`, and
/// what the veth hands on to the bridge carries its mark; traffic not for a
/// peer is left alone.
#[test]
fn from_ctr_drops_every_source_but_its_endpoints_own() {
    in_test_host(|ebpf| {
        add_endpoint_behind_ul0(ebpf);
        let spoofed = |name, src: [u8; 4], smac| {
            (
                name,
                from_mac(to_mac(ipv4(src, R1, 64, &[]), GW_MAC), smac),
                "br0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            )
        };
        let cases: [CtrCase; 9] = [
            spoofed("an unused address of its own subnet", UNUSED, CTR_MAC),
            spoofed(
                "the address of a container the agent does not know",
                C2,
                CTR_MAC,
            ),
            spoofed("the address and MAC of another known container", C3, C3_MAC),
            spoofed("an address of the peer's subnet", PEER_SUBNET, CTR_MAC),
            spoofed("a foreign address", FOREIGN, CTR_MAC),
            spoofed("its own address from another MAC", C1, ANY_MAC),
            (
                "an unused address, TTL 1: dropped before the TTL is looked at",
                to_mac(ipv4(UNUSED, R1, 1, &[]), GW_MAC),
                "br0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            ),
            (
                "a foreign address to the internet: not a peer's business",
                to_mac(ipv4(FOREIGN, [8, 8, 8, 8], 64, &[]), GW_MAC),
                "br0",
                TC_ACT_UNSPEC,
                None,
                UNCOUNTED,
            ),
            (
                "an unused address to a local container",
                to_mac(ipv4(UNUSED, C2, 64, &[]), LOCAL_NEIGH_MAC),
                "br0",
                TC_ACT_UNSPEC,
                None,
                UNCOUNTED,
            ),
        ];
        run_ctr_cases(ebpf, cases);

        // A veth whose endpoints are not all written yet (or any more) is not
        // armed: an address it does not know goes on to the bridge, unmarked,
        // for the bridge's check. A known endpoint's address from another
        // veth is still dropped there.
        disarm(ebpf, "br0");
        let unknown = to_mac(ipv4(UNUSED, R1, 64, &[]), GW_MAC);
        let r = run_tc_prog_ctx(
            ebpf,
            xhost_common::PROG_VETH_IN,
            &skb_ctx_marked(ifindex("br0"), 0, 0),
            &unknown,
            1,
        )
        .expect("test_run");
        assert_eq!(
            (r.verdict, r.priority, &r.out),
            (TC_ACT_UNSPEC, 0, &unknown),
            "veth not armed, unknown address: handed on unmarked"
        );
        run_ctr_cases(
            ebpf,
            [(
                "veth not armed: another known container's address",
                from_mac(to_mac(ipv4(C3, R1, 64, &[]), GW_MAC), C3_MAC),
                "br0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            )],
        );
        arm(ebpf, "br0");

        // What the veth hands on to the bridge (here: TTL 1, for the
        // kernel's ICMP) is marked with the veth's ifindex; nothing else is.
        let br0 = ifindex("br0");
        let expiring = to_mac(ipv4(C1, R1, 1, &[]), GW_MAC);
        let r = run_tc_prog_ctx(
            ebpf,
            xhost_common::PROG_VETH_IN,
            &skb_ctx_marked(br0, 0, 0),
            &expiring,
            1,
        )
        .expect("test_run");
        assert_eq!(
            (r.verdict, r.priority),
            (TC_ACT_UNSPEC, br0),
            "own packet handed on to the bridge: marked with its veth"
        );
        let internet = to_mac(ipv4(C1, [8, 8, 8, 8], 64, &[]), GW_MAC);
        let r = run_tc_prog_ctx(
            ebpf,
            xhost_common::PROG_VETH_IN,
            &skb_ctx_marked(br0, 0, 0),
            &internet,
            1,
        )
        .expect("test_run");
        assert_eq!(
            (r.verdict, r.priority),
            (TC_ACT_UNSPEC, 0),
            "traffic not for a peer: unmarked"
        );
    });
}

/// (name, frame, mark, verdict, expected frame out or unchanged, counter).
type BridgeCase = (&'static str, Vec<u8>, u32, u32, Option<Vec<u8>>, u32);

/// Runs `xhost_bridge_in` on br0 for each case, the frame marked as given; the
/// mark must be gone afterwards, whatever the verdict.
fn run_bridge_cases<const N: usize>(ebpf: &mut Ebpf, cases: [BridgeCase; N]) {
    let br0 = ifindex("br0");
    for (name, frame, mark, verdict, out_want, counter) in cases {
        let before = counters(ebpf);
        let r = run_tc_prog_ctx(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            &skb_ctx_marked(br0, 0, mark),
            &frame,
            1,
        )
        .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
        assert_eq!(r.verdict, verdict, "{name}: verdict");
        assert_eq!(
            &r.out,
            out_want.as_ref().unwrap_or(&frame),
            "{name}: output frame"
        );
        assert_counter_moved(ebpf, &before, counter, frame.len(), name);
        if mark != 0 {
            assert_eq!(r.priority, 0, "{name}: the mark is taken off");
        }
    }
}

/// The bridge path (`xhost_bridge_in`), for containers whose veth carries no
/// `xhost_veth_in` (not known yet): a known container's address only as
/// marked by its own veth and from its own MAC; an unknown address only
/// from the MAC the bridge's neighbour entry gives it; everything else from
/// the local subnet for a peer is dropped as `drop_spoofed_local`. Other
/// sources, and traffic for others, are the kernel's as before (a peer
/// drops a source that is not this host's as `drop_spoofed`).
#[test]
fn bridge_forwards_only_what_its_tables_say_the_sender_owns() {
    in_test_host(|ebpf| {
        add_endpoint_behind_ul0(ebpf);
        let ul0 = mac("ul0");
        let (br0, ul0_index) = (ifindex("br0"), ifindex("ul0"));
        let frame = |src, smac| from_mac(to_mac(ipv4(src, R1, 64, &[]), GW_MAC), smac);
        let spoofed = |name, src, smac, mark| {
            (
                name,
                frame(src, smac),
                mark,
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            )
        };
        let own = frame(C1, CTR_MAC);
        let unknown = frame(C2, LOCAL_NEIGH_MAC);
        let cases: [BridgeCase; 13] = [
            (
                "known container, marked by its veth",
                own.clone(),
                br0,
                TC_ACT_REDIRECT,
                Some(routed(&own, ul0, PEER_MAC)),
                stat::FWD_EGRESS,
            ),
            (
                "unknown container, with the MAC of its neighbour entry",
                unknown.clone(),
                0,
                TC_ACT_REDIRECT,
                Some(routed(&unknown, ul0, PEER_MAC)),
                stat::FWD_EGRESS,
            ),
            spoofed(
                "known container's address and MAC, unmarked (another port)",
                C1,
                CTR_MAC,
                0,
            ),
            spoofed(
                "known container's address and MAC, marked by another veth",
                C1,
                CTR_MAC,
                ul0_index,
            ),
            spoofed(
                "known container's address, marked by its veth, another MAC",
                C1,
                ANY_MAC,
                br0,
            ),
            spoofed(
                "another known container's address and MAC (not its veth's mark)",
                C3,
                C3_MAC,
                br0,
            ),
            spoofed(
                "unknown container's address from another MAC",
                C2,
                CTR_MAC,
                0,
            ),
            spoofed(
                "unknown container's address, marked (a known veth's)",
                C2,
                LOCAL_NEIGH_MAC,
                br0,
            ),
            spoofed("an unused address (no neighbour entry)", UNUSED, CTR_MAC, 0),
            (
                "an address of the peer's subnet: the kernel's (the peer drops it)",
                frame(PEER_SUBNET, CTR_MAC),
                0,
                TC_ACT_UNSPEC,
                None,
                stat::PASS_NOT_OURS,
            ),
            (
                "a foreign address: the kernel's (the peer drops it)",
                frame(FOREIGN, CTR_MAC),
                0,
                TC_ACT_UNSPEC,
                None,
                stat::PASS_NOT_OURS,
            ),
            (
                "a foreign address to the internet: the kernel's, as before",
                to_mac(ipv4(FOREIGN, [8, 8, 8, 8], 64, &[]), GW_MAC),
                0,
                TC_ACT_UNSPEC,
                None,
                stat::PASS_NOT_OURS,
            ),
            (
                "an unused address to a local container: the kernel's",
                to_mac(ipv4(UNUSED, C2, 64, &[]), GW_MAC),
                0,
                TC_ACT_UNSPEC,
                None,
                stat::PASS_NOT_OURS,
            ),
        ];
        run_bridge_cases(ebpf, cases);
    });
}

/// VXLAN mode checks the source the same way before it encapsulates, on
/// both paths, and a container may not send VXLAN packets of its own with
/// our VNI to our port (through the host's NAT they would pass for ours).
#[test]
fn vxlan_mode_drops_spoofed_sources_before_encapsulating() {
    in_vxlan_test_host(|ebpf| {
        add_endpoint_behind_ul0(ebpf);
        let frame = |src, smac| from_mac(to_mac(ipv4(src, R1, 64, &[]), GW_MAC), smac);
        let cases: [CtrCase; 3] = [
            (
                "veth: an unused address",
                frame(UNUSED, CTR_MAC),
                "br0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            ),
            (
                "veth: another known container's address",
                frame(C3, C3_MAC),
                "br0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            ),
            (
                "veth: a foreign address",
                frame(FOREIGN, CTR_MAC),
                "br0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            ),
        ];
        run_ctr_cases(ebpf, cases);
        let spoofed = |name, src, smac, mark| {
            (
                name,
                frame(src, smac),
                mark,
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL,
            )
        };
        run_bridge_cases(
            ebpf,
            [
                spoofed("bridge: known address, unmarked", C1, CTR_MAC, 0),
                spoofed("bridge: an unused address", UNUSED, CTR_MAC, 0),
                spoofed("bridge: unknown address, another MAC", C2, CTR_MAC, 0),
            ],
        );
        // A container's own VXLAN packet with our VNI and port, sent from its
        // own address to a peer host (or anyone): once NATed to this host's
        // address a peer would deliver what it carries, from whatever source.
        // Another VNI or port is not ours.
        let inner = frame(UNUSED, CTR_MAC);
        let vxlan_from_c1 = |vni, port| {
            Outer {
                src: C1,
                vni,
                port,
                ..Outer::to_peer([172, 16, 91, 132], CTR_MAC, GW_MAC)
            }
            .wrap(&inner)
        };
        run_ctr_cases(
            ebpf,
            [
                (
                    "veth: a container's VXLAN packet with our VNI",
                    vxlan_from_c1(VNI, VXLAN_PORT),
                    "br0",
                    TC_ACT_SHOT,
                    None,
                    stat::DROP_SPOOFED_LOCAL,
                ),
                (
                    "veth: with another VNI",
                    vxlan_from_c1(VNI + 1, VXLAN_PORT),
                    "br0",
                    TC_ACT_UNSPEC,
                    None,
                    UNCOUNTED,
                ),
                (
                    "veth: to another port",
                    vxlan_from_c1(VNI, VXLAN_PORT + 1),
                    "br0",
                    TC_ACT_UNSPEC,
                    None,
                    UNCOUNTED,
                ),
            ],
        );
        run_bridge_cases(
            ebpf,
            [
                (
                    "bridge: a container's VXLAN packet with our VNI",
                    vxlan_from_c1(VNI, VXLAN_PORT),
                    0,
                    TC_ACT_SHOT,
                    None,
                    stat::DROP_SPOOFED_LOCAL,
                ),
                (
                    "bridge: with another VNI",
                    vxlan_from_c1(VNI + 1, VXLAN_PORT),
                    0,
                    TC_ACT_UNSPEC,
                    None,
                    stat::PASS_NOT_OURS,
                ),
            ],
        );

        // The unknown container's own packet is encapsulated.
        let own = frame(C2, LOCAL_NEIGH_MAC);
        let before = counters(ebpf);
        let r = run_tc_prog_ctx(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            &skb_ctx_marked(ifindex("br0"), 0, 0),
            &own,
            1,
        )
        .expect("test_run");
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "unknown container: verdict");
        let want = Outer::to_peer([172, 16, 91, 132], mac("ul0"), PEER_MAC)
            .as_sent(&r.out)
            .wrap(&ttl_decremented(&own));
        assert_eq!(r.out, want, "unknown container: encapsulated");
        assert_counter_moved(
            ebpf,
            &before,
            stat::FWD_EGRESS,
            own.len(),
            "unknown container",
        );
    });
}

/// IPv6 frame `f` with an extension header of type `code` (`body`: its
/// bytes after the next-header byte) in front of what follows the fixed
/// header.
fn with_ext6(f: &[u8], code: u8, body: &[u8]) -> Vec<u8> {
    let at = Ethernet2Header::LEN + Ipv6Header::LEN;
    let mut o = f[..at].to_vec();
    o.push(f[NEXT_HEADER]);
    o.extend_from_slice(body);
    o.extend_from_slice(&f[at..]);
    o[NEXT_HEADER] = code;
    let len = u16::from_be_bytes([o[18], o[19]]) + 1 + body.len() as u16;
    o[18..20].copy_from_slice(&len.to_be_bytes());
    o
}

/// VXLAN mode: a container's own IPv6 VXLAN packet with our VNI to our
/// port, for a destination no peer owns, is refused before the host's NAT66
/// could make it look like one of ours to a peer that knows this host by
/// its IPv6 address: behind extension headers too (a first fragment's), and
/// behind a chain of them too long to look through. Another VNI, another
/// port or a later fragment is the kernel's.
#[test]
fn ipv6_vxlan_mode_drops_a_containers_own_vxlan_packets() {
    in_vxlan_test_host(|ebpf| {
        let to_host = v6("fd00:91::132");
        let inner = ipv6_udp(c1_6(), r1_6(), 64, 0);
        let vxlan = |vni: u32, port: u16| {
            let mut payload = vec![0x08, 0, 0, 0];
            payload.extend_from_slice(&(vni << 8).to_be_bytes());
            payload.extend_from_slice(&inner);
            let mut f = Vec::new();
            PacketBuilder::ethernet2(CTR_MAC, GW_MAC)
                .ipv6(c1_6(), to_host, 64)
                .udp(40000, port)
                .write(&mut f, &payload)
                .expect("IPv6 VXLAN frame");
            f
        };
        let ours = vxlan(VNI, VXLAN_PORT);
        // Destination options: 8 bytes, a PadN option of 4.
        let dest_opts = |f: &[u8]| with_ext6(f, 60, &[0, 1, 4, 0, 0, 0, 0]);
        // A fragment header at offset `off` (8-byte units), more to come.
        let fragment = |f: &[u8], off: u16| {
            let word = ((off << 3) | 1).to_be_bytes();
            with_ext6(f, 44, &[0, word[0], word[1], 0, 0, 0, 7])
        };
        let refused = |name, frame| (name, frame, 0, TC_ACT_SHOT, None, stat::DROP_SPOOFED_LOCAL6);
        let passed = |name, frame| (name, frame, 0, TC_ACT_UNSPEC, None, stat::PASS_NOT_OURS6);
        run_bridge_cases(
            ebpf,
            [
                refused("v6: a container's VXLAN packet with our VNI", ours.clone()),
                refused("v6: behind destination options", dest_opts(&ours)),
                refused("v6: in a first fragment", fragment(&ours, 0)),
                refused(
                    "v6: behind four extension headers",
                    dest_opts(&dest_opts(&dest_opts(&dest_opts(&ours)))),
                ),
                passed("v6: another VNI", vxlan(VNI + 1, VXLAN_PORT)),
                passed("v6: another port", vxlan(VNI, VXLAN_PORT + 1)),
                passed("v6: a later fragment", fragment(&ours, 185)),
            ],
        );
    });
}

/// The Ethernet header of an answer to `f`: back to its sender.
fn eth_back(f: &[u8]) -> Vec<u8> {
    let (eth, _, _) = eth_ip(f);
    Ethernet2Header {
        source: eth.destination,
        destination: eth.source,
        ether_type: EtherType::IPV4,
    }
    .to_bytes()
    .to_vec()
}

/// The IPv4 header of an answer to `f` (no options, ID 0, TTL 64), as
/// etherparse writes it, checksum included.
fn ip_back(f: &[u8], proto: IpNumber, payload: usize, df: bool) -> Ipv4Header {
    let (_, asked, _) = eth_ip(f);
    let mut ip =
        Ipv4Header::new(payload as u16, 64, proto, asked.destination, asked.source).expect("ip");
    ip.dont_fragment = df;
    ip.header_checksum = ip.calc_header_checksum();
    ip
}

/// The RST an RFC 793 receiver in CLOSED sends for TCP segment `f`: `seq`,
/// and `ack` when the segment had no ACK.
fn rst_for(f: &[u8], seq: u32, ack: Option<u32>) -> Vec<u8> {
    let p = SlicedPacket::from_ethernet(f).expect("frame");
    let Some(TransportSlice::Tcp(asked)) = &p.transport else {
        panic!("not a TCP segment: {f:?}");
    };
    let mut tcp = TcpHeader::new(asked.destination_port(), asked.source_port(), seq, 0);
    tcp.rst = true;
    if let Some(a) = ack {
        tcp.ack = true;
        tcp.acknowledgment_number = a;
    }
    let ip = ip_back(f, IpNumber::TCP, 20, true);
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).expect("checksum");
    let mut o = eth_back(f);
    o.extend_from_slice(&ip.to_bytes());
    o.extend_from_slice(&tcp.to_bytes());
    o
}

/// ICMP destination unreachable, communication administratively
/// prohibited (3/13), for `f`: its IPv4 header and the 8 bytes after it.
fn prohibited_for(f: &[u8]) -> Vec<u8> {
    let ip_and_after = &f[Ethernet2Header::LEN..];
    let header = Ipv4HeaderSlice::from_slice(ip_and_after).expect("IPv4 header");
    let quote = &ip_and_after[..header.slice().len() + 8];
    let icmp = etherparse::Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FilterProhibited),
        quote,
    );
    let mut o = eth_back(f);
    o.extend_from_slice(&ip_back(f, IpNumber::ICMP, 8 + quote.len(), false).to_bytes());
    o.extend_from_slice(&icmp.to_bytes());
    o.extend_from_slice(quote);
    o
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// A TCP segment from `src` to `dst`, TTL 63, ports 40000 -> 80, with
/// `flags` (`SYN | ACK`...), sequence and acknowledgment numbers and
/// `payload` zero bytes, from `CTR_MAC` to `to`.
fn tcp_segment(
    src: [u8; 4],
    dst: [u8; 4],
    flags: u8,
    seq: u32,
    ack: u32,
    payload: usize,
    to: [u8; 6],
) -> Vec<u8> {
    let mut tcp = TcpHeader::new(40000, 80, seq, 0);
    tcp.fin = flags & FIN != 0;
    tcp.syn = flags & SYN != 0;
    tcp.rst = flags & RST != 0;
    tcp.psh = flags & PSH != 0;
    tcp.ack = flags & ACK != 0;
    tcp.acknowledgment_number = ack;
    tcp_frame(ipv4_header(src, dst, 63), to, tcp, payload)
}

/// Checks with etherparse that an answer's IPv4, TCP, ICMP or ICMPv6
/// checksums are right (the expected frames are built by etherparse too,
/// but this reads what the datapath wrote).
fn assert_checksums(out: &[u8], name: &str) {
    let p = etherparse::SlicedPacket::from_ethernet(out).unwrap_or_else(|e| panic!("{name}: {e}"));
    match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "{name}: IPv4 checksum"
            );
            match &p.transport {
                Some(TransportSlice::Tcp(t)) => assert_eq!(
                    t.checksum(),
                    t.to_header()
                        .calc_checksum_ipv4(&h, t.payload())
                        .expect("sum"),
                    "{name}: TCP checksum"
                ),
                Some(TransportSlice::Icmpv4(i)) => assert_eq!(
                    i.checksum(),
                    i.header().icmp_type.calc_checksum(i.payload()),
                    "{name}: ICMP checksum"
                ),
                other => panic!("{name}: unexpected transport {other:?}"),
            }
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            match &p.transport {
                Some(TransportSlice::Tcp(t)) => assert_eq!(
                    t.checksum(),
                    t.to_header()
                        .calc_checksum_ipv6(&h, t.payload())
                        .expect("sum"),
                    "{name}: TCP checksum"
                ),
                Some(TransportSlice::Icmpv6(i)) => assert_eq!(
                    i.checksum(),
                    i.header()
                        .icmp_type
                        .calc_checksum(h.source, h.destination, i.payload())
                        .expect("sum"),
                    "{name}: ICMPv6 checksum"
                ),
                other => panic!("{name}: unexpected transport {other:?}"),
            }
        }
        other => panic!("{name}: unexpected network layer {other:?}"),
    }
}

/// One refused packet in reject mode: what must come out, and which
/// counters move (the refused packet under its drop reason; an answer
/// under `reject_sent` with its own length).
struct RejectCase {
    name: &'static str,
    frame: Vec<u8>,
    /// The answer; `None`: dropped unanswered.
    answer: Option<Vec<u8>>,
    drop: u32,
}

fn run_reject_cases(ebpf: &mut Ebpf, prog: &str, ctx: &[u8], cases: Vec<RejectCase>) {
    for c in cases {
        // Answers to IPv6 count under the IPv6 slot.
        let sent = if c.frame[12..14] == [0x86, 0xdd] {
            stat::REJECT_SENT6
        } else {
            stat::REJECT_SENT
        };
        let before = counters(ebpf);
        let r = run_tc_prog_ctx(ebpf, prog, ctx, &c.frame, 1)
            .unwrap_or_else(|e| panic!("{}: test_run: {e}", c.name));
        let after = counters(ebpf);
        let moved = |i: u32| {
            let (a, b) = (after[i as usize], before[i as usize]);
            (a.packets - b.packets, a.bytes - b.bytes)
        };
        assert_eq!(
            moved(c.drop),
            (1, c.frame.len() as u64),
            "{}: the refused packet counts under {}",
            c.name,
            stat::NAMES[c.drop as usize]
        );
        match &c.answer {
            Some(answer) => {
                assert_eq!(r.verdict, TC_ACT_REDIRECT, "{}: verdict", c.name);
                assert_eq!(&r.out, answer, "{}: the answer", c.name);
                assert_checksums(&r.out, c.name);
                assert_eq!(
                    moved(sent),
                    (1, answer.len() as u64),
                    "{}: {}",
                    c.name,
                    stat::NAMES[sent as usize]
                );
            }
            None => {
                assert_eq!(r.verdict, TC_ACT_SHOT, "{}: verdict", c.name);
                assert_eq!(moved(sent), (0, 0), "{}: no answer", c.name);
            }
        }
        let others = (0..stat::COUNT)
            .filter(|&i| i != c.drop && i != sent)
            .all(|i| moved(i) == (0, 0));
        assert!(others, "{}: no other counter may move", c.name);
    }
}

/// `--deny reject` on the underlay: a refused TCP segment is answered with
/// the RST RFC 793 prescribes for a CLOSED port, anything else with ICMP
/// 3/13 quoting the refused IPv4 header (options included) and the 8 bytes
/// after it, sent back out ul0. ICMP errors, RSTs, broadcasts and
/// non-first fragments are dropped unanswered.
#[test]
fn reject_mode_answers_what_the_underlay_refuses() {
    in_test_host_with(loaded_reject, |ebpf| {
        let ul0 = mac("ul0");
        let spoofed = [10, 1, 1, 1];
        let syn = tcp_segment(spoofed, C1, SYN, 1000, 0, 0, ul0);
        let syn_fin_data = tcp_segment(spoofed, C1, SYN | FIN, 0xffff_fff0, 0, 100, ul0);
        let ack_data = tcp_segment(spoofed, C1, PSH | ACK, 7, 5555, 10, ul0);
        let rst = tcp_segment(spoofed, C1, RST | ACK, 7, 5555, 0, ul0);
        let udp = to_mac(ipv4(spoofed, C1, 63, &[]), ul0);
        let udp_opts = to_mac(ipv4(spoofed, C1, 63, &[1, 1, 1, 0]), ul0);
        let echo = to_mac(icmp([172, 16, 91, 132], C1, ECHO_REQUEST), ul0);
        let time_exceeded = to_mac(icmp([172, 16, 91, 150], C1, TIME_EXCEEDED), ul0);
        let unreachable = to_mac(icmp([172, 16, 91, 150], C1, HOST_UNREACHABLE), ul0);
        let broadcast = to_mac(ipv4(spoofed, C1, 63, &[]), [0xff; 6]);
        let fragment_of = |more_fragments, offset| {
            let ip = Ipv4Header {
                dont_fragment: false,
                more_fragments,
                fragment_offset: IpFragOffset::try_new(offset).expect("offset"),
                ..ipv4_header(spoofed, C1, 63)
            };
            to_mac(udp_frame(ip), ul0)
        };
        let fragment = fragment_of(false, 16); // offset 16 * 8 bytes
        let first_fragment = fragment_of(true, 0);
        run_reject_cases(
            ebpf,
            xhost_common::PROG_NIC_IN,
            &skb_ctx(ifindex("ul0"), 0),
            vec![
                RejectCase {
                    name: "SYN: RST+ACK, seq 0, ack seq+1",
                    answer: Some(rst_for(&syn, 0, Some(1001))),
                    frame: syn,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "SYN+FIN with 100 bytes, no ACK: ack wraps past 2^32",
                    answer: Some(rst_for(
                        &syn_fin_data,
                        0,
                        Some(0xffff_fff0u32.wrapping_add(102)),
                    )),
                    frame: syn_fin_data,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "data with ACK: RST, seq = its ack",
                    answer: Some(rst_for(&ack_data, 5555, None)),
                    frame: ack_data,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "UDP: ICMP 3/13",
                    answer: Some(prohibited_for(&udp)),
                    frame: udp,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "UDP with IP options: quoted whole",
                    answer: Some(prohibited_for(&udp_opts)),
                    frame: udp_opts,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "echo request from the peer host: ICMP 3/13",
                    answer: Some(prohibited_for(&echo)),
                    frame: echo,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "first fragment: answered",
                    answer: Some(prohibited_for(&first_fragment)),
                    frame: first_fragment,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "RST: never answered",
                    answer: None,
                    frame: rst,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "ICMP time exceeded: never answered",
                    answer: None,
                    frame: time_exceeded,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "ICMP unreachable: never answered",
                    answer: None,
                    frame: unreachable,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "Ethernet broadcast: never answered",
                    answer: None,
                    frame: broadcast,
                    drop: stat::DROP_SPOOFED,
                },
                RejectCase {
                    name: "non-first fragment: never answered",
                    answer: None,
                    frame: fragment,
                    drop: stat::DROP_SPOOFED,
                },
            ],
        );
    });
}

/// `--deny reject` at a container's veth: a spoofed source is answered
/// back into the container (the spoofed address gets the RST), and the
/// answers stop at the rate limit: a burst of `REJECT_BURST`, then one per
/// `1 / REJECT_RATE_PER_SEC`, the rest counted as `reject_limited`.
#[test]
fn reject_mode_answers_spoofed_container_sources_within_the_rate() {
    in_test_host_with(loaded_reject, |ebpf| {
        pin_to_cpu0();
        let spoofed = [192, 168, 110, 99];
        let syn = tcp_segment(spoofed, R1, SYN, 1, 0, 0, GW_MAC);
        let udp = to_mac(ipv4(spoofed, R1, 64, &[]), GW_MAC);
        let ctx = skb_ctx(ifindex("br0"), 0);
        run_reject_cases(
            ebpf,
            xhost_common::PROG_VETH_IN,
            &ctx,
            vec![
                RejectCase {
                    name: "spoofed SYN from the container",
                    answer: Some(rst_for(&syn, 0, Some(2))),
                    frame: syn.clone(),
                    drop: stat::DROP_SPOOFED_LOCAL,
                },
                RejectCase {
                    name: "spoofed UDP from the container",
                    answer: Some(prohibited_for(&udp)),
                    frame: udp,
                    drop: stat::DROP_SPOOFED_LOCAL,
                },
            ],
        );
        // Spend the bucket: runs back to back (one each: a repeated run
        // would rewrite one skb again and again). They take well under the
        // 10 ms one answer's credit takes to come back.
        let burst = u32::try_from(xhost_common::REJECT_BURST).expect("small");
        let before = counters(ebpf);
        let mut r = None;
        for _ in 0..4 * burst {
            r = Some(
                run_tc_prog_ctx(ebpf, xhost_common::PROG_VETH_IN, &ctx, &syn, 1).expect("test_run"),
            );
        }
        let r = r.expect("ran");
        let after = counters(ebpf);
        let sent =
            after[stat::REJECT_SENT as usize].packets - before[stat::REJECT_SENT as usize].packets;
        let limited = after[stat::REJECT_LIMITED as usize].packets
            - before[stat::REJECT_LIMITED as usize].packets;
        assert_eq!(
            sent + limited,
            u64::from(4 * burst),
            "each run answered or limited"
        );
        assert!(
            sent <= u64::from(burst) + 1,
            "at most the burst (and what refilled meanwhile) is answered: {sent}"
        );
        assert_eq!(
            r.verdict, TC_ACT_SHOT,
            "the last of the run is not answered"
        );
        assert_eq!(
            after[stat::REJECT_LIMITED as usize].bytes
                - before[stat::REJECT_LIMITED as usize].bytes,
            limited * syn.len() as u64,
            "reject_limited counts the refused packets"
        );
    });
}

/// In drop mode (the default) nothing is answered and nothing is rewritten.
#[test]
fn drop_mode_answers_nothing() {
    in_test_host(|ebpf| {
        let ul0 = mac("ul0");
        let syn = tcp_segment([10, 1, 1, 1], C1, SYN, 1000, 0, 0, ul0);
        run_tc(
            ebpf,
            xhost_common::PROG_NIC_IN,
            "ul0",
            vec![Case {
                name: "spoofed SYN in drop mode",
                frame: syn,
                verdict: TC_ACT_SHOT,
                out: None,
                counter: stat::DROP_SPOOFED,
            }],
        );
    });
}

/// `PEER_STATS` of slot `slot`, summed over CPUs: (tx, rx).
fn peer_counters(ebpf: &Ebpf, slot: u32) -> (Counter, Counter) {
    let stats: PerCpuArray<_, xhost_common::PeerCounters> =
        PerCpuArray::try_from(ebpf.map("PEER_STATS").expect("PEER_STATS")).expect("percpu");
    stats.get(&slot, 0).expect("get").iter().fold(
        (Counter::default(), Counter::default()),
        |(tx, rx), c| {
            (
                Counter {
                    packets: tx.packets + c.tx.packets,
                    bytes: tx.bytes + c.tx.bytes,
                },
                Counter {
                    packets: rx.packets + c.rx.packets,
                    bytes: rx.bytes + c.rx.bytes,
                },
            )
        },
    )
}

/// What is forwarded to a peer host counts under its `PEER_HOSTS` slot as
/// tx, what is delivered from it (its subnets, its own ICMP errors) as rx,
/// on the full path and from the caches alike; what is dropped, passed or
/// routed to a host without a slot counts under none.
#[test]
fn peer_counters_follow_forwarded_packets() {
    in_test_host(|ebpf| {
        pin_to_cpu0();
        let mut hosts: aya::maps::HashMap<_, [u8; 4], xhost_common::PeerHost> = ebpf
            .map_mut("PEER_HOSTS")
            .expect("PEER_HOSTS")
            .try_into()
            .expect("hash");
        hosts
            .insert(
                [172, 16, 91, 132],
                xhost_common::PeerHost { flags: 0, slot: 5 },
                0,
            )
            .expect("insert");
        let out = to_mac(ipv4(C1, R1, 64, &[]), GW_MAC);
        let from_peer = ipv4(R1, C1, 63, &[]);
        let error = icmp([172, 16, 91, 132], C1, TIME_EXCEEDED);
        let spoofed = ipv4([10, 1, 1, 1], C1, 63, &[]);
        let ctx = skb_ctx(ifindex("br0"), 0);
        let len = |f: &[u8]| f.len() as u64;
        // Twice each: the second answered from the caches.
        for _ in 0..2 {
            let r =
                run_tc_prog_ctx(ebpf, xhost_common::PROG_VETH_IN, &ctx, &out, 1).expect("test_run");
            assert_eq!(r.verdict, TC_ACT_REDIRECT, "forwarded to the peer");
            for f in [&from_peer, &error] {
                let (verdict, _) = tc_test_run(ebpf, xhost_common::PROG_NIC_IN, "ul0", f, "in");
                assert_eq!(verdict, TC_ACT_REDIRECT, "delivered from the peer");
            }
        }
        let (verdict, _) = tc_test_run(ebpf, xhost_common::PROG_NIC_IN, "ul0", &spoofed, "spoofed");
        assert_eq!(verdict, TC_ACT_SHOT);
        // To the second peer, which has no PEER_HOSTS entry (no slot).
        let unslotted = to_mac(ipv4(C1, [192, 168, 230, 5], 64, &[]), GW_MAC);
        run_tc_prog_ctx(ebpf, xhost_common::PROG_VETH_IN, &ctx, &unslotted, 1).expect("test_run");
        let (tx, rx) = peer_counters(ebpf, 5);
        assert_eq!((tx.packets, tx.bytes), (2, 2 * len(&out)), "tx of slot 5");
        assert_eq!(
            (rx.packets, rx.bytes),
            (4, 2 * (len(&from_peer) + len(&error))),
            "rx of slot 5"
        );
        let (tx0, rx0) = peer_counters(ebpf, 0);
        assert_eq!((tx0.packets, rx0.packets), (0, 0), "no other slot moves");
    });
}

// IPv6 (native routing). The test host's IPv6 side, drawn in
// support/mod.rs: fd00:110::/64 on br0 (endpoint fd00:110::11, neighbour
// fd00:110::12), peer subnets fd00:220::/64 (behind .132) and
// fd00:230::/64 (behind .133, unresolved) in ROUTES6.

fn v6(a: &str) -> [u8; 16] {
    a.parse::<std::net::Ipv6Addr>().expect("address").octets()
}

/// The endpoint fd00:110::11.
fn c1_6() -> [u8; 16] {
    v6("fd00:110::11")
}

/// A container of the peer .132.
fn r1_6() -> [u8; 16] {
    v6("fd00:220::11")
}

/// Ethernet + IPv6 + an empty UDP datagram 40000 -> 5201, from the
/// endpoint's MAC (`CTR_MAC`) to `ANY_MAC`, with `payload` zero bytes.
fn ipv6_udp(src: [u8; 16], dst: [u8; 16], hop_limit: u8, payload: usize) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, ANY_MAC)
        .ipv6(src, dst, hop_limit)
        .udp(40000, 5201)
        .write(&mut f, &vec![0; payload])
        .expect("IPv6 frame");
    f
}

/// An ICMPv6 message of `icmp_type` (code 0, no body beyond the first
/// eight bytes) from `src` to `dst`, hop limit 64.
fn icmpv6(src: [u8; 16], dst: [u8; 16], icmp_type: u8) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, ANY_MAC)
        .ipv6(src, dst, 64)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: icmp_type,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut f, &[])
        .expect("ICMPv6 frame");
    f
}

/// Offset of the IPv6 next header and hop limit in a frame.
const NEXT_HEADER: usize = Ethernet2Header::LEN + 6;
const HOP_LIMIT: usize = Ethernet2Header::LEN + 7;

/// `f` (from [`ipv6_udp`]) with an empty destination options header (next
/// header 60) in front of its UDP datagram.
fn with_dest_opts(f: &[u8]) -> Vec<u8> {
    let at = Ethernet2Header::LEN + Ipv6Header::LEN;
    let mut o = f[..at].to_vec();
    // Next header UDP, length 0 (8 bytes), a PadN option of 4 bytes.
    o.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    o.extend_from_slice(&f[at..]);
    o[NEXT_HEADER] = 60;
    let len = u16::from_be_bytes([o[18], o[19]]) + 8;
    o[18..20].copy_from_slice(&len.to_be_bytes());
    o
}

/// IPv6 frame `f` cut after the fixed header (a test run refuses anything
/// shorter than Ethernet and an IPv6 header), its UDP header missing.
fn cut_after_the_fixed_header(f: &[u8]) -> Vec<u8> {
    f[..Ethernet2Header::LEN + Ipv6Header::LEN].to_vec()
}

/// What a router makes of IPv6 frame `f`: new MACs, hop limit - 1.
fn routed6(f: &[u8], smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    let mut o = with_eth(f, |e| {
        e.source = smac;
        e.destination = dmac;
    });
    o[HOP_LIMIT] -= 1;
    o
}

/// Neighbour solicitation, advertisement and the rest of NDP: 133..=137.
const NDP_NEIGHBOUR_SOLICITATION: u8 = 135;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// c1 -> r1 over IPv6 forwarded: run first, it leaves the flow in the cache,
/// so that the cases after it show that a cached flow does not skip their
/// checks.
fn forwarded6_c1_r1() -> Case {
    let fwd = ipv6_udp(c1_6(), r1_6(), 64, 0);
    let out = routed6(&fwd, mac("ul0"), PEER_MAC);
    Case::redirect("v6 forward (the flow cached)", fwd, out, stat::FWD_EGRESS6)
}

#[test]
fn ipv6_egress_forwards_peer_traffic_up_to_the_underlay_mtu() {
    in_test_host(|ebpf| {
        let ul0 = mac("ul0");
        let fwd = forwarded6_c1_r1();
        let echo = icmpv6(c1_6(), r1_6(), ICMPV6_ECHO_REQUEST);
        // ul0's MTU is 1500: 40 + 8 + 1452 bytes fit, one more does not.
        let at_mtu = ipv6_udp(c1_6(), r1_6(), 64, 1452);
        // What is forwarded to the peer .132 (PEER_STATS slot 0).
        let sent = (fwd.frame.len() + echo.len() + at_mtu.len()) as u64;
        run_tc(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            "br0",
            vec![
                fwd,
                Case::redirect(
                    "v6 ICMPv6 echo forwarded",
                    echo.clone(),
                    routed6(&echo, ul0, PEER_MAC),
                    stat::FWD_EGRESS6,
                ),
                Case::redirect(
                    "v6 exactly the underlay's MTU",
                    at_mtu.clone(),
                    routed6(&at_mtu, ul0, PEER_MAC),
                    stat::FWD_EGRESS6,
                ),
                Case::pass(
                    "v6 one byte over the underlay's MTU",
                    ipv6_udp(c1_6(), r1_6(), 64, 1453),
                    stat::PASS_FIB6,
                ),
                Case::pass(
                    "v6 peer's neighbour unresolved",
                    ipv6_udp(c1_6(), v6("fd00:230::5"), 64, 0),
                    stat::PASS_FIB6,
                ),
            ],
        );
        let (tx, _) = peer_counters(ebpf, 0);
        assert_eq!(
            (tx.packets, tx.bytes),
            (3, sent),
            "PEER_STATS tx of .132: the three forwarded"
        );
    });
}

#[test]
fn ipv6_egress_leaves_control_extension_and_foreign_traffic_to_the_kernel() {
    bridge_in(|| {
        let fwd = ipv6_udp(c1_6(), r1_6(), 64, 0);
        vec![
            forwarded6_c1_r1(),
            Case::pass(
                "v6 hop limit 1",
                ipv6_udp(c1_6(), r1_6(), 1, 0),
                stat::PASS_HOP_LIMIT6,
            ),
            Case::pass(
                "v6 hop limit 0",
                ipv6_udp(c1_6(), r1_6(), 0, 0),
                stat::PASS_HOP_LIMIT6,
            ),
            Case::pass(
                "v6 link-local source",
                ipv6_udp(v6("fe80::1"), r1_6(), 64, 0),
                stat::PASS_CONTROL6,
            ),
            Case::pass(
                "v6 link-local destination",
                ipv6_udp(c1_6(), v6("febf::1"), 64, 0),
                stat::PASS_CONTROL6,
            ),
            Case::pass(
                "v6 multicast destination",
                ipv6_udp(c1_6(), v6("ff02::1"), 64, 0),
                stat::PASS_CONTROL6,
            ),
            Case::pass(
                "v6 neighbour solicitation to a peer's address",
                icmpv6(c1_6(), r1_6(), NDP_NEIGHBOUR_SOLICITATION),
                stat::PASS_CONTROL6,
            ),
            Case::pass("v6 extension header", with_dest_opts(&fwd), stat::PASS_EXT6),
            Case::pass(
                "v6 unknown destination",
                ipv6_udp(c1_6(), v6("2001:db8::2"), 64, 0),
                stat::PASS_NOT_OURS6,
            ),
            Case::pass(
                "v6 source not a local container's",
                ipv6_udp(v6("2001:db8::1"), r1_6(), 64, 0),
                stat::PASS_NOT_OURS6,
            ),
        ]
    });
}

#[test]
fn ipv6_egress_leaves_malformed_ipv6_to_the_kernel() {
    bridge_in(|| {
        let fwd = ipv6_udp(c1_6(), r1_6(), 64, 0);
        let truncated = cut_after_the_fixed_header(&fwd);
        let mut beyond = fwd.clone();
        beyond[19] += 1; // payload length one byte beyond the frame
        let mut version4 = fwd.clone();
        version4[Ethernet2Header::LEN] = 0x40;
        let mut jumbo = fwd;
        jumbo[18..20].fill(0); // payload length 0: a jumbogram's
        vec![
            forwarded6_c1_r1(),
            Case::pass(
                "v6 truncated after the fixed header",
                truncated,
                stat::PASS_MALFORMED,
            ),
            Case::pass(
                "v6 payload length beyond the frame",
                beyond,
                stat::PASS_MALFORMED,
            ),
            Case::pass(
                "v6 payload length 0 (jumbogram)",
                jumbo,
                stat::PASS_MALFORMED,
            ),
            Case::pass(
                "v6 version 4 behind the IPv6 EtherType",
                version4,
                stat::PASS_MALFORMED,
            ),
        ]
    });
}

#[test]
fn ipv6_egress_drops_local_sources_no_container_owns() {
    bridge_in(|| {
        let spoofed = ipv6_udp(v6("fd00:110::99"), r1_6(), 64, 0);
        vec![
            forwarded6_c1_r1(),
            Case::shot(
                "v6 endpoint's address from another MAC",
                from_mac(ipv6_udp(c1_6(), r1_6(), 64, 0), ANY_MAC),
                stat::DROP_SPOOFED_LOCAL6,
            ),
            Case::shot(
                "v6 local address no container announced",
                spoofed.clone(),
                stat::DROP_SPOOFED_LOCAL6,
            ),
            Case::shot(
                "v6 spoofed local source with an extension header",
                with_dest_opts(&spoofed),
                stat::DROP_SPOOFED_LOCAL6,
            ),
        ]
    });
}

/// The bridge path for an address `ENDPOINTS6` does not hold: forwarded
/// only unmarked and from the MAC of the bridge's NDP entry.
#[test]
fn ipv6_bridge_takes_an_unknown_address_from_its_ndp_entry() {
    in_test_host(|ebpf| {
        let ul0 = mac("ul0");
        let neigh = from_mac(ipv6_udp(v6("fd00:110::12"), r1_6(), 64, 0), LOCAL_NEIGH_MAC);
        for (name, frame, mark, verdict, out, counter) in [
            (
                "the neighbour entry's MAC, unmarked",
                neigh.clone(),
                0,
                TC_ACT_REDIRECT,
                Some(routed6(&neigh, ul0, PEER_MAC)),
                stat::FWD_EGRESS6,
            ),
            (
                "the neighbour entry's MAC, marked by a veth",
                neigh.clone(),
                ifindex("br0"),
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL6,
            ),
            (
                "another MAC",
                ipv6_udp(v6("fd00:110::12"), r1_6(), 64, 0),
                0,
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL6,
            ),
        ] {
            let before = counters(ebpf);
            let r = run_tc_prog_ctx(
                ebpf,
                xhost_common::PROG_BRIDGE_IN,
                &skb_ctx_marked(ifindex("br0"), 0, mark),
                &frame,
                1,
            )
            .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
            assert_eq!(r.verdict, verdict, "{name}: verdict");
            assert_eq!(&r.out, out.as_ref().unwrap_or(&frame), "{name}: frame");
            assert_eq!(r.priority, 0, "{name}: the bridge clears the mark");
            assert_counter_moved(ebpf, &before, counter, frame.len(), name);
        }
    });
}

#[test]
fn ipv6_from_ctr_routes_only_its_own_endpoint() {
    in_test_host(|ebpf| {
        let ul0 = mac("ul0");
        let fwd = to_mac(ipv6_udp(c1_6(), r1_6(), 64, 0), GW_MAC);
        let cases: [CtrCase; 6] = [
            (
                "v6 own endpoint to its gateway",
                fwd.clone(),
                "br0",
                TC_ACT_REDIRECT,
                Some(routed6(&fwd, ul0, PEER_MAC)),
                stat::FWD_EGRESS6,
            ),
            (
                "v6 not addressed to the gateway MAC",
                ipv6_udp(c1_6(), r1_6(), 64, 0),
                "br0",
                TC_ACT_UNSPEC,
                None,
                UNCOUNTED,
            ),
            (
                "v6 source is no known endpoint",
                to_mac(ipv6_udp(v6("fd00:110::12"), r1_6(), 64, 0), GW_MAC),
                "br0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL6,
            ),
            (
                "v6 endpoint's address from another port",
                fwd.clone(),
                "ul0",
                TC_ACT_SHOT,
                None,
                stat::DROP_SPOOFED_LOCAL6,
            ),
            (
                "v6 hop limit 1 goes on to the bridge",
                to_mac(ipv6_udp(c1_6(), r1_6(), 1, 0), GW_MAC),
                "br0",
                TC_ACT_UNSPEC,
                None,
                UNCOUNTED,
            ),
            (
                "v6 link-local",
                to_mac(ipv6_udp(v6("fe80::11"), r1_6(), 64, 0), GW_MAC),
                "br0",
                TC_ACT_UNSPEC,
                None,
                UNCOUNTED,
            ),
        ];
        run_ctr_cases(ebpf, cases);
    });
}

/// r1 -> c1 over IPv6 delivered to the known endpoint: run first, it leaves
/// the flow in the cache, so that the cases after it show that a cached flow
/// does not skip their checks.
fn delivered6_r1_c1() -> Case {
    let to_ep = ipv6_udp(r1_6(), c1_6(), 63, 0);
    let out = routed6(&to_ep, GW_MAC, CTR_MAC);
    Case::redirect(
        "v6 known endpoint: redirect_peer",
        to_ep,
        out,
        stat::FWD_INGRESS6,
    )
}

#[test]
fn ipv6_ingress_delivers_peer_traffic() {
    in_test_host(|ebpf| {
        let echo = icmpv6(r1_6(), c1_6(), ICMPV6_ECHO_REQUEST);
        run_tc(
            ebpf,
            xhost_common::PROG_NIC_IN,
            "ul0",
            vec![
                delivered6_r1_c1(),
                Case::redirect(
                    "v6 ICMPv6 echo to the endpoint",
                    echo.clone(),
                    routed6(&echo, GW_MAC, CTR_MAC),
                    stat::FWD_INGRESS6,
                ),
            ],
        );
        // Delivered from the peer .132: its per-peer counter moved.
        let (_, rx) = peer_counters(ebpf, 0);
        assert_eq!(rx.packets, 2, "PEER_STATS rx of .132: the two deliveries");
    });
}

/// The test host as drawn in support/mod.rs, plus an IPv6 underlay: ul0 has
/// fd00:91::131/64, the peer host fd00:91::132 a permanent neighbour entry
/// (`PEER_MAC`) and `PEER_STATS` slot 5 in `PEER_HOSTS6`, and fd00:91::133
/// none; their subnets fd00:240::/64 and fd00:250::/64 are in `ROUTES6`
/// behind those addresses.
fn with_ipv6_underlay(ebpf: &mut Ebpf) {
    for cmd in [
        "ip -6 addr add fd00:91::131/64 dev ul0 nodad",
        "ip -6 neigh replace fd00:91::132 lladdr 02:00:00:00:00:32 nud permanent dev ul0",
    ] {
        sh(&cmd.split(' ').collect::<Vec<_>>());
    }
    let mut hosts: aya::maps::HashMap<_, [u8; 16], xhost_common::PeerHost> = ebpf
        .map_mut("PEER_HOSTS6")
        .expect("PEER_HOSTS6")
        .try_into()
        .expect("hash");
    hosts
        .insert(
            v6("fd00:91::132"),
            xhost_common::PeerHost { flags: 0, slot: 5 },
            0,
        )
        .expect("insert");
    let mut routes: aya::maps::LpmTrie<_, [u8; 16], xhost_common::Peer6> = ebpf
        .map_mut("ROUTES6")
        .expect("ROUTES6")
        .try_into()
        .expect("lpm");
    for (prefix, host) in [
        ("fd00:240::", "fd00:91::132"),
        ("fd00:250::", "fd00:91::133"),
    ] {
        let value = xhost_common::Peer6 {
            host: v6(host),
            flags: 0,
        };
        routes
            .insert(&aya::maps::lpm_trie::Key::new(64, v6(prefix)), value, 0)
            .expect("insert");
    }
}

/// Native routing to a peer host on an IPv6 underlay: the next hop is the
/// `AF_INET6` FIB's answer towards the peer's address (its MAC, the hop
/// limit less one), up to the underlay's MTU; a peer whose neighbour is not
/// resolved yet goes out through `bpf_redirect_neigh` (the frame routed but
/// for its MACs, which the kernel writes); what comes from its subnets is
/// delivered, what comes from no peer's subnet dropped; the peer's own
/// `PEER_STATS` slot (in `PEER_HOSTS6`) counts both ways.
#[test]
fn ipv6_egress_reaches_a_peer_host_over_an_ipv6_underlay() {
    in_test_host(|ebpf| {
        with_ipv6_underlay(ebpf);
        let r2 = v6("fd00:240::11");
        let fwd = ipv6_udp(c1_6(), r2, 64, 0);
        let at_mtu = ipv6_udp(c1_6(), r2, 64, 1452);
        let unresolved = ipv6_udp(c1_6(), v6("fd00:250::5"), 64, 0);
        let mut unresolved_out = unresolved.clone();
        unresolved_out[HOP_LIMIT] -= 1;
        let sent = (fwd.len() + at_mtu.len()) as u64;
        run_tc(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            "br0",
            vec![
                Case::redirect(
                    "v6 underlay: forwarded to the peer's MAC",
                    fwd.clone(),
                    routed6(&fwd, mac("ul0"), PEER_MAC),
                    stat::FWD_EGRESS6,
                ),
                Case::redirect(
                    "v6 underlay: exactly the underlay's MTU",
                    at_mtu.clone(),
                    routed6(&at_mtu, mac("ul0"), PEER_MAC),
                    stat::FWD_EGRESS6,
                ),
                Case::pass(
                    "v6 underlay: one byte over the underlay's MTU",
                    ipv6_udp(c1_6(), r2, 64, 1453),
                    stat::PASS_FIB6,
                ),
                Case::redirect(
                    "v6 underlay: peer's neighbour unresolved, redirect_neigh",
                    unresolved,
                    unresolved_out,
                    stat::FWD_EGRESS6,
                ),
                Case::pass(
                    "v6 underlay: hop limit 1",
                    ipv6_udp(c1_6(), r2, 1, 0),
                    stat::PASS_HOP_LIMIT6,
                ),
            ],
        );
        let delivered = ipv6_udp(r2, c1_6(), 63, 0);
        run_tc(
            ebpf,
            xhost_common::PROG_NIC_IN,
            "ul0",
            vec![
                Case::redirect(
                    "v6 underlay: from the peer's subnet, delivered",
                    delivered.clone(),
                    routed6(&delivered, GW_MAC, CTR_MAC),
                    stat::FWD_INGRESS6,
                ),
                Case::shot(
                    "v6 underlay: from no peer's subnet",
                    ipv6_udp(v6("fd00:260::1"), c1_6(), 63, 0),
                    stat::DROP_SPOOFED6,
                ),
            ],
        );
        let (tx, rx) = peer_counters(ebpf, 5);
        assert_eq!(
            (tx.packets, tx.bytes),
            (2, sent),
            "PEER_STATS tx of fd00:91::132: the two forwarded to it"
        );
        assert_eq!(
            (rx.packets, rx.bytes),
            (1, delivered.len() as u64),
            "PEER_STATS rx of fd00:91::132: the one delivered"
        );
    });
}

#[test]
fn ipv6_ingress_drops_sources_outside_the_peers_subnets() {
    nic_in(|| {
        let spoofed = ipv6_udp(v6("2001:db8::1"), c1_6(), 63, 0);
        vec![
            delivered6_r1_c1(),
            Case::shot("v6 spoofed source", spoofed.clone(), stat::DROP_SPOOFED6),
            Case::shot(
                "v6 spoofed source with an extension header",
                with_dest_opts(&spoofed),
                stat::DROP_SPOOFED6,
            ),
            Case::shot(
                "v6 spoofed source to a local address without endpoint",
                ipv6_udp(v6("2001:db8::1"), v6("fd00:110::12"), 63, 0),
                stat::DROP_SPOOFED6,
            ),
        ]
    });
}

#[test]
fn ipv6_ingress_leaves_what_is_not_for_a_local_container_to_the_kernel() {
    nic_in(|| {
        let to_ep = ipv6_udp(r1_6(), c1_6(), 63, 0);
        let truncated = cut_after_the_fixed_header(&to_ep);
        vec![
            delivered6_r1_c1(),
            Case::pass(
                "v6 local address, no endpoint: the kernel's",
                ipv6_udp(r1_6(), v6("fd00:110::12"), 63, 0),
                stat::PASS_NOT_OURS6,
            ),
            Case::pass(
                "v6 extension header from a peer",
                with_dest_opts(&to_ep),
                stat::PASS_EXT6,
            ),
            Case::pass(
                "v6 hop limit 1",
                ipv6_udp(r1_6(), c1_6(), 1, 0),
                stat::PASS_HOP_LIMIT6,
            ),
            Case::pass(
                "v6 multicast",
                ipv6_udp(v6("fe80::32"), v6("ff02::1"), 1, 0),
                stat::PASS_CONTROL6,
            ),
            Case::pass(
                "v6 neighbour solicitation",
                icmpv6(r1_6(), c1_6(), NDP_NEIGHBOUR_SOLICITATION),
                stat::PASS_CONTROL6,
            ),
            Case::pass(
                "v6 not a local address",
                ipv6_udp(r1_6(), v6("2001:db8::2"), 63, 0),
                stat::PASS_NOT_OURS6,
            ),
            Case::pass(
                "v6 truncated after the fixed header",
                truncated,
                stat::PASS_MALFORMED,
            ),
        ]
    });
}

#[test]
fn ipv6_xdp_drops_what_tc_drops() {
    in_test_host(|ebpf| {
        let cases = [
            (
                "v6 peer container -> local container",
                ipv6_udp(r1_6(), c1_6(), 63, 0),
                XDP_PASS,
                TC_ACT_REDIRECT,
                None,
            ),
            (
                "v6 spoofed source",
                ipv6_udp(v6("2001:db8::1"), c1_6(), 63, 0),
                XDP_DROP,
                TC_ACT_SHOT,
                Some(stat::DROP_SPOOFED6),
            ),
            (
                "v6 link-local source",
                ipv6_udp(v6("fe80::1"), c1_6(), 63, 0),
                XDP_PASS,
                TC_ACT_UNSPEC,
                None,
            ),
            (
                "v6 not local",
                ipv6_udp(v6("2001:db8::1"), v6("2001:db8::2"), 63, 0),
                XDP_PASS,
                TC_ACT_UNSPEC,
                None,
            ),
        ];
        for (name, frame, xdp, tc, counter) in cases {
            let before = counters(ebpf);
            let p: &mut Xdp = ebpf
                .program_mut(xhost_common::PROG_NIC_XDP)
                .expect("prog")
                .try_into()
                .expect("xdp");
            let mut out = vec![0u8; frame.len() + 64];
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.data_out = Some(&mut out);
            let res = p
                .test_run(opts)
                .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
            assert_eq!(res.return_value, xdp, "{name}: XDP verdict");
            match counter {
                Some(idx) => assert_counter_moved(ebpf, &before, idx, frame.len(), name),
                None => assert_eq!(counters(ebpf), before, "{name}: no counter may move"),
            }
            let (verdict, _) = tc_test_run(ebpf, xhost_common::PROG_NIC_IN, "ul0", &frame, name);
            assert_eq!(verdict, tc, "{name}: TC verdict");
        }
    });
}

/// `f` (IPv6) with traffic class `tclass` (DSCP and ECN), the flow label
/// kept.
fn with_tclass6(f: &[u8], tclass: u8) -> Vec<u8> {
    let mut o = f.to_vec();
    let ip = Ethernet2Header::LEN;
    o[ip] = 0x60 | (tclass >> 4);
    o[ip + 1] = (tclass << 4) | (o[ip + 1] & 0x0f);
    o
}

/// `f` (IPv6) with the hop limit one less, as routed: MACs kept.
fn hop_decremented(f: &[u8]) -> Vec<u8> {
    let mut o = f.to_vec();
    o[HOP_LIMIT] -= 1;
    o
}

/// VXLAN mode carries IPv6 over the IPv4 underlay: a container's IPv6
/// packet for a peer's subnet is routed (hop limit - 1) and encapsulated by
/// the program exactly as the kernel's vxlan device would (outer IPv4/UDP/
/// VXLAN byte by byte, the inner frame's own Ethernet header with EtherType
/// 0x86DD, ECN carried out), after the same checks as native routing; what
/// would not fit the underlay once encapsulated is the kernel's (Packet Too
/// Big from its route into the vxlan device).
#[test]
fn ipv6_vxlan_mode_encapsulates_in_the_program() {
    in_vxlan_test_host(|ebpf| {
        let ul0 = mac("ul0");
        let br0 = ifindex("br0");
        let to_peer = || Outer::to_peer([172, 16, 91, 132], ul0, PEER_MAC);
        let fwd = ipv6_udp(c1_6(), r1_6(), 64, 0);
        let mut sport = None;
        for (name, prog, frame, outer_tos) in [
            (
                "v6 bridge, not ECN-capable",
                xhost_common::PROG_BRIDGE_IN,
                with_tclass6(&fwd, 0x10),
                0x00,
            ),
            (
                "v6 bridge, ECT(1) carried out",
                xhost_common::PROG_BRIDGE_IN,
                with_tclass6(&fwd, 0x11),
                0x01,
            ),
            (
                "v6 veth, CE carried out as ECT(0)",
                xhost_common::PROG_VETH_IN,
                to_mac(with_tclass6(&fwd, 0x13), GW_MAC),
                0x02,
            ),
        ] {
            let before = counters(ebpf);
            let (tx0, _) = peer_counters(ebpf, 0);
            let (verdict, out) = tc_test_run(ebpf, prog, "br0", &frame, name);
            assert_eq!(verdict, TC_ACT_REDIRECT, "{name}: verdict");
            let sent = Outer {
                tos: outer_tos,
                ..to_peer().as_sent(&out)
            };
            let inner = hop_decremented(&frame);
            assert_eq!(&inner[12..14], &[0x86, 0xdd], "{name}: inner EtherType");
            assert_eq!(out, sent.wrap(&inner), "{name}: output frame");
            assert_counter_moved(ebpf, &before, stat::FWD_EGRESS6, frame.len(), name);
            let (tx, _) = peer_counters(ebpf, 0);
            assert_eq!(tx.packets, tx0.packets + 1, "{name}: PEER_STATS tx of .132");
            assert_eq!(
                *sport.get_or_insert(sent.sport),
                sent.sport,
                "{name}: one flow, one source port"
            );
        }

        // The peer host .133 is not resolved: encapsulated for it all the
        // same, and handed to bpf_redirect_neigh (which writes the MACs).
        let unresolved = ipv6_udp(c1_6(), v6("fd00:230::5"), 64, 0);
        let (verdict, out) = tc_test_run(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            "br0",
            &unresolved,
            "v6 unresolved",
        );
        assert_eq!(verdict, TC_ACT_REDIRECT, "v6 unresolved: verdict");
        let (eth, _, _) = eth_ip(&out);
        let want = Outer::to_peer([172, 16, 91, 133], eth.source, eth.destination)
            .as_sent(&out)
            .wrap(&hop_decremented(&unresolved));
        assert_eq!(out, want, "v6 unresolved: output frame past the MACs");

        // 1450 bytes of IPv6 are 1500 on the underlay; one more is the
        // kernel's, untouched.
        let fits = ipv6_udp(c1_6(), r1_6(), 64, 1450 - 48);
        let (verdict, out) =
            tc_test_run(ebpf, xhost_common::PROG_BRIDGE_IN, "br0", &fits, "v6 1450");
        assert_eq!(verdict, TC_ACT_REDIRECT, "v6 1450: verdict");
        let want = to_peer().as_sent(&out).wrap(&hop_decremented(&fits));
        assert_eq!(
            want.len(),
            fits.len() + 50,
            "v6 1450: 50 bytes of outer headers"
        );
        assert_eq!(out, want, "v6 1450: encapsulated");

        let cases = vec![
            Case {
                name: "v6 1451 bytes: the kernel's (Packet Too Big)",
                frame: ipv6_udp(c1_6(), r1_6(), 64, 1451 - 48),
                verdict: TC_ACT_UNSPEC,
                out: None,
                counter: stat::PASS_FIB6,
            },
            Case {
                name: "v6 hop limit 1",
                frame: ipv6_udp(c1_6(), r1_6(), 1, 0),
                verdict: TC_ACT_UNSPEC,
                out: None,
                counter: stat::PASS_HOP_LIMIT6,
            },
            Case {
                name: "v6 extension header",
                frame: with_dest_opts(&fwd),
                verdict: TC_ACT_UNSPEC,
                out: None,
                counter: stat::PASS_EXT6,
            },
            Case {
                name: "v6 link-local",
                frame: ipv6_udp(v6("fe80::11"), r1_6(), 64, 0),
                verdict: TC_ACT_UNSPEC,
                out: None,
                counter: stat::PASS_CONTROL6,
            },
            Case {
                name: "v6 neighbour solicitation",
                frame: icmpv6(c1_6(), r1_6(), NDP_NEIGHBOUR_SOLICITATION),
                verdict: TC_ACT_UNSPEC,
                out: None,
                counter: stat::PASS_CONTROL6,
            },
            Case {
                name: "v6 no peer's",
                frame: ipv6_udp(c1_6(), v6("2001:db8::2"), 64, 0),
                verdict: TC_ACT_UNSPEC,
                out: None,
                counter: stat::PASS_NOT_OURS6,
            },
            Case {
                name: "v6 endpoint's address from another MAC",
                frame: from_mac(fwd.clone(), ANY_MAC),
                verdict: TC_ACT_SHOT,
                out: None,
                counter: stat::DROP_SPOOFED_LOCAL6,
            },
            Case {
                name: "v6 local address no container announced",
                frame: ipv6_udp(v6("fd00:110::99"), r1_6(), 64, 0),
                verdict: TC_ACT_SHOT,
                out: None,
                counter: stat::DROP_SPOOFED_LOCAL6,
            },
        ];
        run_tc(ebpf, xhost_common::PROG_BRIDGE_IN, "br0", cases);

        // A UDP GSO burst: its segments only the kernel measures, so it
        // goes to the vxlan device (xhost_vxlan_out keys it from ROUTES6),
        // routed but not encapsulated here.
        let udp_burst = ipv6_udp(c1_6(), r1_6(), 64, 1000);
        let before = counters(ebpf);
        let r = run_tc_prog_ctx(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            &skb_ctx(br0, 400),
            &udp_burst,
            1,
        )
        .expect("test_run");
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "v6 UDP GSO: verdict");
        assert_eq!(
            r.out,
            hop_decremented(&udp_burst),
            "v6 UDP GSO: routed, as it is"
        );
        assert_counter_moved(
            ebpf,
            &before,
            stat::FWD_EGRESS6,
            udp_burst.len(),
            "v6 UDP GSO",
        );
    });
}

/// VXLAN mode, on the underlay: a peer's VXLAN packet around an IPv6 frame
/// for a local endpoint is decapsulated and delivered by the program
/// (routed: the container's MACs, hop limit - 1), counted at its inner
/// length; every packet the program may not take itself goes to the
/// kernel untouched (its vxlan device decapsulates, and `xhost_vxlan_in`
/// checks). Bare IPv6 for a local container is dropped, by TC and XDP.
#[test]
fn ipv6_vxlan_mode_decapsulates_in_the_program() {
    in_vxlan_test_host(|ebpf| {
        let ul0 = mac("ul0");
        let from_peer = Outer {
            src: [172, 16, 91, 132],
            dst: [172, 16, 91, 131],
            ..Outer::to_peer([0; 4], PEER_MAC, ul0)
        };
        let inner = ipv6_udp(r1_6(), c1_6(), 63, 0);
        let frame = from_peer.wrap(&inner);
        let before = counters(ebpf);
        let (verdict, out) =
            tc_test_run(ebpf, xhost_common::PROG_NIC_IN, "ul0", &frame, "v6 valid");
        if kernel_version() >= (6, 3) {
            assert_eq!(verdict, TC_ACT_REDIRECT, "v6 valid: verdict");
            assert_eq!(
                out,
                routed6(&inner, GW_MAC, CTR_MAC),
                "v6 valid: output frame"
            );
            assert_counter_moved(ebpf, &before, stat::FWD_INGRESS6, inner.len(), "v6 valid");
            let (_, rx) = peer_counters(ebpf, 0);
            assert_eq!(rx.packets, 1, "PEER_STATS rx of .132");
        } else {
            // Before 6.3 `bpf_skb_adjust_room` has no BPF_F_ADJ_ROOM_DECAP_L3_IPV6
            // (a kernel may still have FIB_LOOKUP_SRC backported, as Debian's 6.1
            // does): the frame is the kernel's, untouched, for its vxlan device.
            assert_eq!(
                (verdict, &out),
                (TC_ACT_UNSPEC, &frame),
                "v6 valid before 6.3: the kernel's, untouched"
            );
            assert_counter_moved(ebpf, &before, stat::PASS_NOT_OURS, frame.len(), "v6 valid");
        }

        // (what, frame, GSO size)
        let kernels: [(&str, Vec<u8>, u32); 8] = [
            (
                "v6 inner source of another peer",
                from_peer.wrap(&ipv6_udp(v6("fd00:230::5"), c1_6(), 63, 0)),
                0,
            ),
            (
                "v6 inner source of no peer",
                from_peer.wrap(&ipv6_udp(v6("2001:db8::1"), c1_6(), 63, 0)),
                0,
            ),
            (
                "v6 inner hop limit 1",
                from_peer.wrap(&ipv6_udp(r1_6(), c1_6(), 1, 0)),
                0,
            ),
            (
                "v6 inner extension header",
                from_peer.wrap(&with_dest_opts(&inner)),
                0,
            ),
            (
                "v6 no endpoint for the inner destination",
                from_peer.wrap(&ipv6_udp(r1_6(), v6("fd00:110::12"), 63, 0)),
                0,
            ),
            (
                "v6 inner neighbour solicitation",
                from_peer.wrap(&icmpv6(r1_6(), c1_6(), NDP_NEIGHBOUR_SOLICITATION)),
                0,
            ),
            (
                "v6 another VNI",
                Outer {
                    vni: 7,
                    ..from_peer
                }
                .wrap(&inner),
                0,
            ),
            ("v6 a GSO packet", frame.clone(), 400),
        ];
        for (name, f, gso_size) in kernels {
            let before = counters(ebpf);
            let r = run_tc_prog_ctx(
                ebpf,
                xhost_common::PROG_NIC_IN,
                &skb_ctx(ifindex("ul0"), gso_size),
                &f,
                1,
            )
            .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
            assert_eq!(
                (r.verdict, &r.out),
                (TC_ACT_UNSPEC, &f),
                "{name}: the kernel's, untouched"
            );
            assert_counter_moved(ebpf, &before, stat::PASS_NOT_OURS, f.len(), name);
        }

        // Bare IPv6 for a local container: none arrives unencapsulated in
        // VXLAN mode, whatever its source; XDP drops what TC drops.
        for (name, frame) in [
            (
                "v6 bare from a peer's subnet",
                ipv6_udp(r1_6(), c1_6(), 63, 0),
            ),
            (
                "v6 bare to a local address without endpoint",
                ipv6_udp(r1_6(), v6("fd00:110::12"), 63, 0),
            ),
            (
                "v6 bare from anyone",
                ipv6_udp(v6("2001:db8::1"), c1_6(), 63, 0),
            ),
        ] {
            run_tc(
                ebpf,
                xhost_common::PROG_NIC_IN,
                "ul0",
                vec![Case {
                    name,
                    frame: frame.clone(),
                    verdict: TC_ACT_SHOT,
                    out: None,
                    counter: stat::DROP_SPOOFED6,
                }],
            );
            let before = counters(ebpf);
            let p: &mut Xdp = ebpf
                .program_mut(xhost_common::PROG_NIC_XDP)
                .expect("prog")
                .try_into()
                .expect("xdp");
            let mut out = vec![0u8; frame.len() + 64];
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.data_out = Some(&mut out);
            let res = p
                .test_run(opts)
                .unwrap_or_else(|e| panic!("{name}: XDP test_run: {e}"));
            assert_eq!(res.return_value, XDP_DROP, "{name}: XDP verdict");
            assert_counter_moved(ebpf, &before, stat::DROP_SPOOFED6, frame.len(), name);
        }
        run_tc(
            ebpf,
            xhost_common::PROG_NIC_IN,
            "ul0",
            vec![Case {
                name: "v6 bare, not local",
                frame: ipv6_udp(r1_6(), v6("2001:db8::2"), 63, 0),
                verdict: TC_ACT_UNSPEC,
                out: None,
                counter: stat::PASS_NOT_OURS6,
            }],
        );
    });
}

/// A TCP segment from `src` to `dst` over IPv6, hop limit 63, ports
/// 40000 -> 80 (as [`tcp_segment`]).
#[allow(clippy::too_many_arguments)]
fn tcp6_segment(
    src: [u8; 16],
    dst: [u8; 16],
    flags: u8,
    seq: u32,
    ack: u32,
    payload: usize,
    to: [u8; 6],
) -> Vec<u8> {
    let mut tcp = TcpHeader::new(40000, 80, seq, 64240);
    tcp.fin = flags & FIN != 0;
    tcp.syn = flags & SYN != 0;
    tcp.rst = flags & RST != 0;
    tcp.psh = flags & PSH != 0;
    tcp.ack = flags & ACK != 0;
    tcp.acknowledgment_number = ack;
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, to)
        .ipv6(src, dst, 63)
        .tcp_header(tcp)
        .write(&mut f, &vec![0; payload])
        .expect("TCP/IPv6 frame");
    f
}

/// The Ethernet and IPv6 headers of an answer to IPv6 frame `f`: back to
/// its sender, hop limit 64, traffic class and flow label 0.
fn back6(f: &[u8]) -> PacketBuilderStep<IpHeaders> {
    let mac = |at: usize| -> [u8; 6] { f[at..at + 6].try_into().expect("MAC") };
    let ip = |at: usize| -> [u8; 16] { f[at..at + 16].try_into().expect("address") };
    PacketBuilder::ethernet2(mac(0), mac(6)).ipv6(ip(38), ip(22), 64)
}

/// [`rst_for`] for an IPv6 TCP segment.
fn rst6_for(f: &[u8], seq: u32, ack: Option<u32>) -> Vec<u8> {
    let p = SlicedPacket::from_ethernet(f).expect("frame");
    let Some(TransportSlice::Tcp(asked)) = &p.transport else {
        panic!("not a TCP segment: {f:?}");
    };
    let mut tcp = TcpHeader::new(asked.destination_port(), asked.source_port(), seq, 0);
    tcp.rst = true;
    if let Some(a) = ack {
        tcp.ack = true;
        tcp.acknowledgment_number = a;
    }
    let mut o = Vec::new();
    back6(f).tcp_header(tcp).write(&mut o, &[]).expect("RST");
    o
}

/// ICMPv6 destination unreachable, administratively prohibited (1/1), for
/// IPv6 frame `f`: as much of its IPv6 packet as fits the answer in 1280
/// bytes.
fn prohibited6_for(f: &[u8]) -> Vec<u8> {
    let packet = &f[Ethernet2Header::LEN..];
    let len = Ipv6Header::LEN + usize::from(u16::from_be_bytes([packet[4], packet[5]]));
    let quote = &packet[..len.min(1280 - Ipv6Header::LEN - 8)];
    let mut o = Vec::new();
    back6(f)
        .icmpv6(Icmpv6Type::DestinationUnreachable(
            icmpv6::DestUnreachableCode::Prohibited,
        ))
        .write(&mut o, quote)
        .expect("ICMPv6 answer");
    assert!(o.len() <= Ethernet2Header::LEN + 1280, "at most 1280 bytes");
    o
}

/// A spoofed IPv6 source outside every peer's subnet.
fn spoofed6() -> [u8; 16] {
    v6("fd00:999::1")
}

/// `--deny reject` on the underlay for IPv6: a refused TCP segment gets
/// the RST RFC 793 prescribes, anything else answerable ICMPv6 1/1 quoting
/// the refused packet as far as 1280 bytes allow (an odd length padded in
/// the checksum only), back out ul0. ICMPv6 errors and informational
/// messages but echo, RSTs, what hides behind an extension header,
/// Ethernet group addresses and unspecified or loopback sources are
/// dropped unanswered (RFC 4443 2.4(e)).
#[test]
fn ipv6_reject_mode_answers_what_the_underlay_refuses() {
    in_test_host_with(loaded_reject, |ebpf| {
        let ul0 = mac("ul0");
        let s = spoofed6();
        let udp = |payload| to_mac(ipv6_udp(s, c1_6(), 63, payload), ul0);
        let icmp = |t| to_mac(icmpv6(s, c1_6(), t), ul0);
        let syn = tcp6_segment(s, c1_6(), SYN, 1000, 0, 0, ul0);
        let syn_fin_data = tcp6_segment(s, c1_6(), SYN | FIN, 0xffff_fff0, 0, 100, ul0);
        let ack_data = tcp6_segment(s, c1_6(), PSH | ACK, 7, 5555, 10, ul0);
        let rst = tcp6_segment(s, c1_6(), RST | ACK, 7, 5555, 0, ul0);
        let from = |src| to_mac(ipv6_udp(src, c1_6(), 63, 0), ul0);
        let mut cases = vec![
            RejectCase {
                name: "v6 SYN: RST+ACK, seq 0, ack seq+1",
                answer: Some(rst6_for(&syn, 0, Some(1001))),
                frame: syn,
                drop: stat::DROP_SPOOFED6,
            },
            RejectCase {
                name: "v6 SYN+FIN with 100 bytes: ack wraps past 2^32",
                answer: Some(rst6_for(
                    &syn_fin_data,
                    0,
                    Some(0xffff_fff0u32.wrapping_add(102)),
                )),
                frame: syn_fin_data,
                drop: stat::DROP_SPOOFED6,
            },
            RejectCase {
                name: "v6 data with ACK: RST, seq = its ack",
                answer: Some(rst6_for(&ack_data, 5555, None)),
                frame: ack_data,
                drop: stat::DROP_SPOOFED6,
            },
            RejectCase {
                name: "v6 echo request: ICMPv6 1/1",
                answer: Some(prohibited6_for(&icmp(ICMPV6_ECHO_REQUEST))),
                frame: icmp(ICMPV6_ECHO_REQUEST),
                drop: stat::DROP_SPOOFED6,
            },
            RejectCase {
                name: "v6 echo reply: ICMPv6 1/1",
                answer: Some(prohibited6_for(&icmp(129))),
                frame: icmp(129),
                drop: stat::DROP_SPOOFED6,
            },
            RejectCase {
                name: "v6 TCP RST: never answered",
                answer: None,
                frame: rst,
                drop: stat::DROP_SPOOFED6,
            },
            RejectCase {
                name: "v6 behind a destination options header: never answered",
                answer: None,
                frame: with_dest_opts(&udp(0)),
                drop: stat::DROP_SPOOFED6,
            },
            RejectCase {
                name: "v6 Ethernet multicast: never answered",
                answer: None,
                frame: with_eth(&udp(0), |e| e.destination = [0x33, 0x33, 0, 0, 0, 1]),
                drop: stat::DROP_SPOOFED6,
            },
            RejectCase {
                name: "v6 unspecified source: never answered",
                answer: None,
                frame: from([0; 16]),
                drop: stat::DROP_SPOOFED6,
            },
            RejectCase {
                name: "v6 loopback source: never answered",
                answer: None,
                frame: from(v6("::1")),
                drop: stat::DROP_SPOOFED6,
            },
        ];
        // UDP of every length modulo 4 around the quote's limit: cut at
        // 1232 bytes of packet beyond it.
        for payload in [0, 1, 2, 3, 1183, 1184, 1185, 1400] {
            cases.push(RejectCase {
                name: "v6 UDP: ICMPv6 1/1 quoting it",
                answer: Some(prohibited6_for(&udp(payload))),
                frame: udp(payload),
                drop: stat::DROP_SPOOFED6,
            });
        }
        // ICMPv6 errors (destination unreachable, packet too big, time
        // exceeded, parameter problem) and informational messages but echo.
        for t in [1, 2, 3, 4, 127, 130, 139, 200] {
            cases.push(RejectCase {
                name: "v6 ICMPv6 other than echo: never answered",
                answer: None,
                frame: icmp(t),
                drop: stat::DROP_SPOOFED6,
            });
        }
        run_reject_cases(
            ebpf,
            xhost_common::PROG_NIC_IN,
            &skb_ctx(ifindex("ul0"), 0),
            cases,
        );
    });
}

/// `--deny reject` for a container's spoofed IPv6 source, on its veth and
/// at the bridge: answered back to where the forged address lives, within
/// the rate IPv4 shares (`reject_limited6` beyond it).
#[test]
fn ipv6_reject_mode_answers_spoofed_container_sources_within_the_rate() {
    in_test_host_with(loaded_reject, |ebpf| {
        pin_to_cpu0();
        let spoofed = v6("fd00:110::12");
        let syn = tcp6_segment(spoofed, r1_6(), SYN, 1, 0, 0, GW_MAC);
        let udp = to_mac(ipv6_udp(spoofed, r1_6(), 64, 20), GW_MAC);
        let ctx = skb_ctx(ifindex("br0"), 0);
        run_reject_cases(
            ebpf,
            xhost_common::PROG_VETH_IN,
            &ctx,
            vec![
                RejectCase {
                    name: "v6 spoofed SYN from the container",
                    answer: Some(rst6_for(&syn, 0, Some(2))),
                    frame: syn.clone(),
                    drop: stat::DROP_SPOOFED_LOCAL6,
                },
                RejectCase {
                    name: "v6 spoofed UDP from the container",
                    answer: Some(prohibited6_for(&udp)),
                    frame: udp.clone(),
                    drop: stat::DROP_SPOOFED_LOCAL6,
                },
            ],
        );
        // At the bridge: the neighbour entry's address from another MAC.
        run_reject_cases(
            ebpf,
            xhost_common::PROG_BRIDGE_IN,
            &ctx,
            vec![RejectCase {
                name: "v6 unknown address from another MAC at the bridge",
                answer: Some(prohibited6_for(&udp)),
                frame: udp,
                drop: stat::DROP_SPOOFED_LOCAL6,
            }],
        );
        let burst = u32::try_from(xhost_common::REJECT_BURST).expect("small");
        let before = counters(ebpf);
        for _ in 0..4 * burst {
            run_tc_prog_ctx(ebpf, xhost_common::PROG_VETH_IN, &ctx, &syn, 1).expect("test_run");
        }
        let after = counters(ebpf);
        let moved = |i: u32| after[i as usize].packets - before[i as usize].packets;
        let (sent, limited) = (moved(stat::REJECT_SENT6), moved(stat::REJECT_LIMITED6));
        assert_eq!(sent + limited, u64::from(4 * burst), "answered or limited");
        assert!(sent <= u64::from(burst) + 1, "at most the burst: {sent}");
        assert_eq!(
            after[stat::REJECT_LIMITED6 as usize].bytes
                - before[stat::REJECT_LIMITED6 as usize].bytes,
            limited * syn.len() as u64,
            "reject_limited6 counts the refused packets"
        );
        assert_eq!(
            (moved(stat::REJECT_SENT), moved(stat::REJECT_LIMITED)),
            (0, 0),
            "the IPv4 slots stay"
        );
    });
}

/// In reject mode the XDP program leaves spoofed IPv6 to `xhost_nic_in`,
/// which answers it; in drop mode it drops it itself (see
/// `ipv6_xdp_drops_what_tc_drops`).
#[test]
fn ipv6_xdp_leaves_refusals_to_tc_in_reject_mode() {
    in_test_host_with(loaded_reject, |ebpf| {
        let frame = to_mac(ipv6_udp(spoofed6(), c1_6(), 63, 0), mac("ul0"));
        let before = counters(ebpf);
        let p: &mut Xdp = ebpf
            .program_mut(xhost_common::PROG_NIC_XDP)
            .expect("prog")
            .try_into()
            .expect("xdp");
        let mut out = vec![0u8; frame.len() + 64];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.data_out = Some(&mut out);
        let res = p.test_run(opts).expect("test_run");
        assert_eq!(res.return_value, XDP_PASS, "passed on to TC");
        assert_eq!(counters(ebpf), before, "XDP counts nothing");
    });
}
