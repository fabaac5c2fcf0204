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

use std::process::Command;

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use xhost_common::{Counter, Endpoint, LocalNet, Peer, PeerHost, stat};
use xhost_user::{datapath::RouteTable, net::Ipv4Net};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x32];
const LOCAL_NEIGH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const CTR_MAC: [u8; 6] = [0x02, 0x42, 0xc0, 0xa8, 0x6e, 0x0b];
const GW_MAC: [u8; 6] = [0x02, 0x42, 0x00, 0x00, 0x00, 0x01];
const ANY_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).expect("ifindex")
}

fn mac(name: &str) -> [u8; 6] {
    let addrs = nix::ifaddrs::getifaddrs().expect("getifaddrs");
    addrs
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .expect("mac")
}

/// Runs `f` on a thread inside a fresh netns holding the host drawn above.
fn in_test_host(f: impl FnOnce(&mut Ebpf) + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): run as root");
        for cmd in [
            "ip link set lo up",
            "ip link add br0 type bridge",
            "ip addr add 192.168.110.1/24 dev br0",
            "ip link set br0 up",
            "ip link add ul0 type veth peer name ul0p",
            "ip link set ul0p up",
            "ip addr add 172.16.91.131/24 dev ul0",
            "ip link set ul0 up",
            "ip neigh replace 172.16.91.132 lladdr 02:00:00:00:00:32 nud permanent dev ul0",
            "ip neigh replace 192.168.110.12 lladdr 02:00:00:00:00:12 nud permanent dev br0",
            "sysctl -qw net.ipv4.ip_forward=1",
        ] {
            sh(&cmd.split(' ').collect::<Vec<_>>());
        }
        let mut ebpf = Ebpf::load(xhost_user::datapath::object()).expect("load object");
        for name in [
            xhost_common::PROG_EGRESS,
            xhost_common::PROG_FROM_CTR,
            xhost_common::PROG_INGRESS,
        ] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("prog")
                .try_into()
                .expect("tc");
            p.load().expect("verifier accepts");
        }
        let x: &mut Xdp = ebpf
            .program_mut(xhost_common::PROG_XDP)
            .expect("prog")
            .try_into()
            .expect("xdp");
        x.load().expect("verifier accepts");
        fill_maps(&mut ebpf);
        f(&mut ebpf);
    })
    .join()
    .expect("test thread panicked");
}

fn net(a: [u8; 4], len: u32) -> Key<[u8; 4]> {
    Key::new(len, a)
}

fn fill_maps(ebpf: &mut Ebpf) {
    let mut routes: LpmTrie<_, [u8; 4], Peer> = ebpf
        .map_mut("ROUTES")
        .expect("ROUTES")
        .try_into()
        .expect("lpm");
    routes
        .insert(
            &net([192, 168, 220, 0], 24),
            Peer {
                host: [172, 16, 91, 132],
                flags: 0,
            },
            0,
        )
        .expect("insert");
    // A peer whose MAC the kernel does not know yet.
    routes
        .insert(
            &net([192, 168, 230, 0], 24),
            Peer {
                host: [172, 16, 91, 133],
                flags: 0,
            },
            0,
        )
        .expect("insert");
    let mut local: LpmTrie<_, [u8; 4], LocalNet> = ebpf
        .map_mut("LOCAL_NETS")
        .expect("LOCAL_NETS")
        .try_into()
        .expect("lpm");
    local
        .insert(
            &net([192, 168, 110, 0], 24),
            LocalNet {
                bridge_ifindex: ifindex("br0"),
                flags: 0,
            },
            0,
        )
        .expect("insert");
    let mut eps: HashMap<_, [u8; 4], Endpoint> = ebpf
        .map_mut("ENDPOINTS")
        .expect("ENDPOINTS")
        .try_into()
        .expect("hash");
    let ep = Endpoint {
        ifindex: ifindex("br0"),
        flags: 0,
        mac: CTR_MAC,
        gw_mac: GW_MAC,
        _pad: [0; 4],
    };
    eps.insert([192, 168, 110, 11], ep, 0).expect("insert");
    let mut hosts: HashMap<_, [u8; 4], PeerHost> = ebpf
        .map_mut("PEER_HOSTS")
        .expect("PEER_HOSTS")
        .try_into()
        .expect("hash");
    hosts
        .insert([172, 16, 91, 132], PeerHost { flags: 0 }, 0)
        .expect("insert");
}

/// Ethernet + IPv4 (+ options) + 8 payload bytes, checksum correct.
fn ipv4(src: [u8; 4], dst: [u8; 4], ttl: u8, options: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&ANY_MAC);
    f.extend_from_slice(&[0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
    f.extend_from_slice(&[0x08, 0x00]);
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + 8) as u16;
    f.push(0x40 | ihl as u8);
    f.push(0);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, ttl, 17, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(options);
    f.extend_from_slice(b"payload!");
    set_checksum(&mut f);
    f
}

fn ip_hdr_len(f: &[u8]) -> usize {
    usize::from(f[14] & 0x0f) * 4
}

fn checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 = hdr
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn set_checksum(f: &mut [u8]) {
    let hl = ip_hdr_len(f);
    f[24] = 0;
    f[25] = 0;
    let c = checksum(&f[14..14 + hl]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// What a router makes of `f`: new MACs, TTL - 1, checksum recomputed from
/// scratch (the datapath patches it incrementally; both must agree).
fn routed(f: &[u8], smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    let mut o = ttl_decremented(f);
    o[0..6].copy_from_slice(&dmac);
    o[6..12].copy_from_slice(&smac);
    o
}

/// `f` with TTL - 1 and its checksum recomputed: what `bpf_redirect_neigh`
/// is handed (the kernel writes the MACs once the neighbour resolves).
fn ttl_decremented(f: &[u8]) -> Vec<u8> {
    let mut o = f.to_vec();
    o[22] -= 1;
    set_checksum(&mut o);
    o
}

/// An ICMP message of `icmp_type` from `src` to `dst` (protocol 1).
fn icmp(src: [u8; 4], dst: [u8; 4], icmp_type: u8) -> Vec<u8> {
    let mut f = ipv4(src, dst, 63, &[]);
    f[23] = 1;
    f[34] = icmp_type;
    set_checksum(&mut f);
    f
}

fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&ANY_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&ANY_MAC);
    f.extend_from_slice(&[192, 168, 110, 11, 0, 0, 0, 0, 0, 0, 192, 168, 110, 1]);
    f
}

fn ipv6() -> Vec<u8> {
    let mut f = ANY_MAC.to_vec();
    f.extend_from_slice(&ANY_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, 17, 64]);
    f.extend_from_slice(&[0; 32]);
    f.extend_from_slice(b"payload!");
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

/// An `__sk_buff` context with `ifindex` and `ingress_ifindex` set: the
/// device the frame "arrived" on, which the FIB lookup starts from.
fn skb_ctx(ifindex: u32) -> Vec<u8> {
    // struct __sk_buff is 192 bytes; ifindex at 40, ingress_ifindex at 36.
    let mut ctx = vec![0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
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
    let ctx_in = skb_ctx(ifindex(iface));
    let p: &mut SchedClassifier = ebpf
        .program_mut(prog)
        .expect("prog")
        .try_into()
        .expect("tc");
    let mut out = vec![0u8; frame.len() + 64];
    let mut ctx_out = vec![0u8; 192];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx_in);
    opts.ctx_out = Some(&mut ctx_out);
    let res = p
        .test_run(opts)
        .unwrap_or_else(|e| panic!("{name}: test_run: {e}"));
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
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
        assert_counter_moved(ebpf, &before, c.counter, c.frame.len(), c.name);
    }
}

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

const C1: [u8; 4] = [192, 168, 110, 11];
const C2: [u8; 4] = [192, 168, 110, 12];
const R1: [u8; 4] = [192, 168, 220, 11];

#[test]
fn egress_routes_peer_traffic_and_passes_the_rest() {
    in_test_host(|ebpf| {
        let ul0 = mac("ul0");
        let fwd = ipv4(C1, R1, 64, &[]);
        let opts = ipv4(C1, R1, 64, &[1, 1, 1, 0]); // NOP NOP NOP EOL: IHL 6
        let unresolved = ipv4(C1, [192, 168, 230, 5], 64, &[]);
        let unresolved_out = ttl_decremented(&unresolved);
        let mut bad_sum = ipv4(C1, R1, 64, &[]);
        bad_sum[25] ^= 0xff;
        // IHL 15 claims a 60-byte header; the frame ends after 28 bytes of IP.
        // (test_run itself refuses frames shorter than a 20-byte IP header.)
        let mut truncated = ipv4(C1, R1, 64, &[]);
        truncated[14] = 0x4f;
        let mut short_ihl = ipv4(C1, R1, 64, &[]);
        short_ihl[14] = 0x44;
        set_checksum(&mut short_ihl);
        run_tc(
            ebpf,
            xhost_common::PROG_EGRESS,
            "br0",
            vec![
                Case {
                    name: "forward",
                    out: Some(routed(&fwd, ul0, PEER_MAC)),
                    frame: fwd,
                    verdict: TC_ACT_REDIRECT,
                    counter: stat::FWD_EGRESS,
                },
                Case {
                    name: "forward with IP options",
                    out: Some(routed(&opts, ul0, PEER_MAC)),
                    frame: opts,
                    verdict: TC_ACT_REDIRECT,
                    counter: stat::FWD_EGRESS,
                },
                Case {
                    name: "neighbour unresolved: redirect_neigh",
                    out: Some(unresolved_out),
                    frame: unresolved,
                    verdict: TC_ACT_REDIRECT,
                    counter: stat::FWD_EGRESS,
                },
                Case {
                    name: "ARP",
                    frame: arp(),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_NOT_IPV4,
                },
                Case {
                    name: "IPv6",
                    frame: ipv6(),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_NOT_IPV4,
                },
                Case {
                    name: "to the peer host itself",
                    frame: ipv4(C1, [172, 16, 91, 132], 64, &[]),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_NOT_OURS,
                },
                Case {
                    name: "non-peer destination (MASQUERADE's)",
                    frame: ipv4(C1, [8, 8, 8, 8], 64, &[]),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_NOT_OURS,
                },
                Case {
                    name: "to the gateway",
                    frame: ipv4(C1, [192, 168, 110, 1], 64, &[]),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_NOT_OURS,
                },
                Case {
                    name: "source not a local container",
                    frame: ipv4([10, 9, 9, 9], R1, 64, &[]),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_NOT_OURS,
                },
                Case {
                    name: "TTL 1",
                    frame: ipv4(C1, R1, 1, &[]),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_TTL,
                },
                Case {
                    name: "TTL 0",
                    frame: ipv4(C1, R1, 0, &[]),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_TTL,
                },
                Case {
                    name: "bad header checksum",
                    frame: bad_sum,
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_MALFORMED,
                },
                Case {
                    name: "truncated IPv4 header",
                    frame: truncated,
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_MALFORMED,
                },
                Case {
                    name: "IHL < 5",
                    frame: short_ihl,
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_MALFORMED,
                },
            ],
        );
    });
}

#[test]
fn ingress_delivers_validated_traffic_and_drops_spoofed() {
    in_test_host(|ebpf| {
        let br0 = mac("br0");
        let to_ep = ipv4(R1, C1, 63, &[]);
        let to_neigh = ipv4(R1, C2, 63, &[]);
        run_tc(
            ebpf,
            xhost_common::PROG_INGRESS,
            "ul0",
            vec![
                Case {
                    name: "known endpoint: redirect_peer",
                    out: Some(routed(&to_ep, GW_MAC, CTR_MAC)),
                    frame: to_ep,
                    verdict: TC_ACT_REDIRECT,
                    counter: stat::FWD_INGRESS,
                },
                Case {
                    name: "via the bridge (FIB)",
                    out: Some(routed(&to_neigh, br0, LOCAL_NEIGH_MAC)),
                    frame: to_neigh,
                    verdict: TC_ACT_REDIRECT,
                    counter: stat::FWD_INGRESS,
                },
                Case {
                    name: "spoofed source",
                    frame: ipv4([10, 1, 1, 1], C1, 63, &[]),
                    verdict: TC_ACT_SHOT,
                    out: None,
                    counter: stat::DROP_SPOOFED,
                },
                Case {
                    name: "peer host itself as source (UDP)",
                    frame: ipv4([172, 16, 91, 132], C1, 63, &[]),
                    verdict: TC_ACT_SHOT,
                    out: None,
                    counter: stat::DROP_SPOOFED,
                },
                Case {
                    name: "peer host, ICMP echo",
                    frame: icmp([172, 16, 91, 132], C1, 8),
                    verdict: TC_ACT_SHOT,
                    out: None,
                    counter: stat::DROP_SPOOFED,
                },
                Case {
                    name: "unknown host, ICMP time exceeded",
                    frame: icmp([172, 16, 91, 150], C1, 11),
                    verdict: TC_ACT_SHOT,
                    out: None,
                    counter: stat::DROP_SPOOFED,
                },
                Case {
                    name: "peer host, ICMP time exceeded",
                    out: Some(routed(&icmp([172, 16, 91, 132], C1, 11), GW_MAC, CTR_MAC)),
                    frame: icmp([172, 16, 91, 132], C1, 11),
                    verdict: TC_ACT_REDIRECT,
                    counter: stat::FWD_INGRESS,
                },
                Case {
                    name: "peer host, ICMP frag needed",
                    out: Some(routed(&icmp([172, 16, 91, 132], C1, 3), GW_MAC, CTR_MAC)),
                    frame: icmp([172, 16, 91, 132], C1, 3),
                    verdict: TC_ACT_REDIRECT,
                    counter: stat::FWD_INGRESS,
                },
                Case {
                    name: "host-bound",
                    frame: ipv4(R1, [172, 16, 91, 131], 63, &[]),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_NOT_OURS,
                },
                Case {
                    name: "to the gateway address",
                    frame: ipv4(R1, [192, 168, 110, 1], 63, &[]),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_FIB,
                },
                Case {
                    name: "TTL 1",
                    frame: ipv4(R1, C1, 1, &[]),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_TTL,
                },
                Case {
                    name: "ARP",
                    frame: arp(),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_NOT_IPV4,
                },
                Case {
                    name: "IPv6",
                    frame: ipv6(),
                    verdict: TC_ACT_OK,
                    out: None,
                    counter: stat::PASS_NOT_IPV4,
                },
            ],
        );
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
                icmp([172, 16, 91, 132], C1, 8),
                XDP_DROP,
                Some(stat::DROP_SPOOFED),
            ),
            (
                "peer host, ICMP time exceeded",
                icmp([172, 16, 91, 132], C1, 11),
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
                .program_mut(xhost_common::PROG_XDP)
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

#[test]
fn test_host_netns_is_private() {
    // Guard against a test host leaking into the runner's namespace.
    in_test_host(|_| {});
    assert!(
        nix::net::if_::if_nametoindex("ul0").is_err(),
        "ul0 leaked out of the test netns"
    );
}

/// `frame` with its destination MAC set to `mac`.
fn to_mac(mut frame: Vec<u8>, mac: [u8; 6]) -> Vec<u8> {
    frame[0..6].copy_from_slice(&mac);
    frame
}

/// (name, frame, arrival interface, verdict, expected frame out or unchanged).
type CtrCase = (&'static str, Vec<u8>, &'static str, u32, Option<Vec<u8>>);

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
            ),
            (
                "not addressed to the gateway MAC",
                ipv4(C1, R1, 64, &[]),
                "br0",
                TC_ACT_OK,
                None,
            ),
            (
                "source is no known endpoint",
                to_mac(ipv4(C2, R1, 64, &[]), GW_MAC),
                "br0",
                TC_ACT_OK,
                None,
            ),
            (
                "endpoint's address from another port",
                fwd.clone(),
                "ul0",
                TC_ACT_OK,
                None,
            ),
            (
                "to a non-peer destination",
                to_mac(ipv4(C1, [8, 8, 8, 8], 64, &[]), GW_MAC),
                "br0",
                TC_ACT_OK,
                None,
            ),
            ("ARP", arp(), "br0", TC_ACT_OK, None),
        ];
        for (name, frame, iface, verdict, out_want) in cases {
            let before = counters(ebpf);
            let (got, out) = tc_test_run(ebpf, xhost_common::PROG_FROM_CTR, iface, &frame, name);
            assert_eq!(got, verdict, "{name}: verdict");
            assert_eq!(
                &out,
                out_want.as_ref().unwrap_or(&frame),
                "{name}: output frame"
            );
            if verdict == TC_ACT_OK {
                // Passed frames go on into the bridge, which counts them.
                assert_eq!(counters(ebpf), before, "{name}: no counter may move");
            } else {
                assert_counter_moved(ebpf, &before, stat::FWD_EGRESS, frame.len(), name);
            }
        }
    });
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
        let mut one = nix::sched::CpuSet::new();
        one.set(0).expect("cpu 0");
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("pin to cpu 0");
        let mut routes = RouteTable::new(
            ebpf.take_map("ROUTES").expect("ROUTES"),
            ebpf.take_map("ROUTES_GEN").expect("ROUTES_GEN"),
        )
        .expect("route table");
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
            verdict: TC_ACT_OK,
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
            xhost_common::PROG_EGRESS,
            "br0",
            vec![routed_out(), routed_out()],
        );
        run_tc(
            ebpf,
            xhost_common::PROG_INGRESS,
            "ul0",
            vec![allowed_in(), allowed_in()],
        );

        routes.remove(&r1_net).expect("remove route");
        run_tc(
            ebpf,
            xhost_common::PROG_EGRESS,
            "br0",
            vec![unrouted_out(), unrouted_out()],
        );
        run_tc(
            ebpf,
            xhost_common::PROG_INGRESS,
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
        run_tc(ebpf, xhost_common::PROG_EGRESS, "br0", vec![moved]);
        run_tc(ebpf, xhost_common::PROG_INGRESS, "ul0", vec![allowed_in()]);
    });
}
