//! The host every BPF_PROG_TEST_RUN of the datapath runs in, shared by the
//! tests (`prog_test_run.rs`) and the per-program cost benchmark
//! (`examples/prog_cost.rs`):
//!
//! ```text
//!   br0  192.168.110.1/24 (bridge; neighbour 192.168.110.12 permanent)
//!        fd00:110::1/64          neighbour fd00:110::12 permanent)
//!   ul0  172.16.91.131/24 (veth;   neighbour 172.16.91.132 permanent,
//!                                   172.16.91.133 unresolved)
//! ```
//!
//! with IPv4 and IPv6 forwarding on, the object loaded and its maps holding
//! the routes to 192.168.220.0/24 and fd00:220::/64 (peer .132) and
//! 192.168.230.0/24 and fd00:230::/64 (peer .133), the local subnets
//! 192.168.110.0/24 and fd00:110::/64 on br0, the endpoints 192.168.110.11
//! and fd00:110::11 behind br0 (armed), the peer host .132 and the
//! underlay address .131 on ul0.
#![allow(dead_code, reason = "each includer uses its own part")]

use std::{process::Command, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use etherparse::{Ethernet2Header, IpHeaders, IpNumber, Ipv4Header, PacketBuilder};
use xhost_common::{Endpoint, LocalNet, Peer, Peer6, PeerHost};

/// `TC_ACT_UNSPEC` (-1) as the test run's `u32` return value: what the
/// programs return for a packet they leave to the kernel (and to any later
/// filter on the device).
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x32];
pub const LOCAL_NEIGH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
pub const CTR_MAC: [u8; 6] = [0x02, 0x42, 0xc0, 0xa8, 0x6e, 0x0b];
pub const GW_MAC: [u8; 6] = [0x02, 0x42, 0x00, 0x00, 0x00, 0x01];
pub const ANY_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];

pub fn sh(args: &[&str]) {
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

pub fn ifindex(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).expect("ifindex")
}

pub fn mac(name: &str) -> [u8; 6] {
    let addrs = nix::ifaddrs::getifaddrs().expect("getifaddrs");
    addrs
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .expect("mac")
}

/// Runs `f` on a thread inside a fresh netns holding the host drawn above.
pub fn in_test_host(f: impl FnOnce(&mut Ebpf) + Send + 'static) {
    in_test_host_with(loaded, f);
}

/// [`in_test_host`] with the datapath from `load`, called inside the test
/// host (which it may add to first).
pub fn in_test_host_with(
    load: impl FnOnce() -> Ebpf + Send + 'static,
    f: impl FnOnce(&mut Ebpf) + Send + 'static,
) {
    std::thread::spawn(move || {
        enter_test_host();
        let mut ebpf = load();
        f(&mut ebpf);
    })
    .join()
    .expect("test thread panicked");
}

/// Moves the calling thread into a fresh netns holding the host drawn above
/// (the namespace goes when nothing holds it any more).
pub fn enter_test_host() {
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
        "ip addr add fd00:110::1/64 dev br0 nodad",
        "ip neigh replace fd00:110::12 lladdr 02:00:00:00:00:12 nud permanent dev br0",
        // After the devices: `all` sets every existing one.
        "sysctl -qw net.ipv6.conf.all.forwarding=1",
    ] {
        sh(&cmd.split(' ').collect::<Vec<_>>());
    }
}

/// A fresh instance of the datapath object (maps of its own), every program
/// verified and loaded, maps filled as drawn above. Call inside the test host.
pub fn loaded() -> Ebpf {
    load(&mut EbpfLoader::new())
}

/// [`loaded`] in VXLAN mode: the vxlan device `ifindex`, `vni` and `port`
/// as the loader sets them.
pub fn loaded_vxlan(ifindex: u32, vni: u32, port: u16) -> Ebpf {
    load(
        EbpfLoader::new()
            .override_global(xhost_common::GLOBAL_TUNNEL_IFINDEX, &ifindex, true)
            .override_global(xhost_common::GLOBAL_TUNNEL_VNI, &vni, true)
            .override_global(xhost_common::GLOBAL_TUNNEL_PORT, &u32::from(port), true),
    )
}

/// [`loaded`] with `--deny reject`: refused packets are answered.
pub fn loaded_reject() -> Ebpf {
    load(EbpfLoader::new().override_global(
        xhost_common::GLOBAL_DENY,
        &xhost_common::DENY_REJECT,
        true,
    ))
}

fn load(loader: &mut EbpfLoader) -> Ebpf {
    // The helpers this kernel has, as the agent sets them (probed once; the
    // loader borrows the value for as long as it lives).
    static HELPERS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let helpers = HELPERS.get_or_init(|| {
        xhost_user::attach::KernelFeatures::probe()
            .expect("probing the kernel")
            .helper_bits()
    });
    let mut ebpf = loader
        .override_global(xhost_common::GLOBAL_HELPERS, helpers, true)
        .load(xhost_user::datapath::object())
        .expect("load object");
    for name in [
        xhost_common::PROG_BRIDGE_IN,
        xhost_common::PROG_VETH_IN,
        xhost_common::PROG_NIC_IN,
    ] {
        let p: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("prog")
            .try_into()
            .expect("tc");
        p.load().expect("verifier accepts");
    }
    let x: &mut Xdp = ebpf
        .program_mut(xhost_common::PROG_NIC_XDP)
        .expect("prog")
        .try_into()
        .expect("xdp");
    x.load().expect("verifier accepts");
    fill_maps(&mut ebpf);
    ebpf
}

pub fn net(a: [u8; 4], len: u32) -> Key<[u8; 4]> {
    Key::new(len, a)
}

pub fn fill_maps(ebpf: &mut Ebpf) {
    let mut routes: LpmTrie<_, [u8; 4], Peer> = ebpf
        .map_mut("ROUTES")
        .expect("ROUTES")
        .try_into()
        .expect("lpm");
    // The second peer's MAC is not known to the kernel yet.
    for (prefix, host) in [
        ([192, 168, 220, 0], [172, 16, 91, 132]),
        ([192, 168, 230, 0], [172, 16, 91, 133]),
    ] {
        routes
            .insert(&net(prefix, 24), Peer { host, flags: 0 }, 0)
            .expect("insert");
    }
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
    fill_maps6(ebpf, ep);
    // Its veth (br0 here) is armed, as the agent arms it once written.
    let mut ports: HashMap<_, u32, u32> = ebpf
        .map_mut("ENDPOINT_PORTS")
        .expect("ENDPOINT_PORTS")
        .try_into()
        .expect("hash");
    ports
        .insert(ifindex("br0"), xhost_common::ARMED, 0)
        .expect("insert");
    let mut hosts: HashMap<_, [u8; 4], PeerHost> = ebpf
        .map_mut("PEER_HOSTS")
        .expect("PEER_HOSTS")
        .try_into()
        .expect("hash");
    hosts
        .insert([172, 16, 91, 132], PeerHost { flags: 0, slot: 0 }, 0)
        .expect("insert");
    let mut addrs: HashMap<_, [u8; 4], u32> = ebpf
        .map_mut("UNDERLAY_ADDRS")
        .expect("UNDERLAY_ADDRS")
        .try_into()
        .expect("hash");
    addrs
        .insert([172, 16, 91, 131], ifindex("ul0"), 0)
        .expect("insert");
}

/// The IPv6 side of [`fill_maps`].
fn fill_maps6(ebpf: &mut Ebpf, ep: Endpoint) {
    let v6 = |a: &str| a.parse::<std::net::Ipv6Addr>().expect("address").octets();
    let mut routes: LpmTrie<_, [u8; 16], Peer6> = ebpf
        .map_mut("ROUTES6")
        .expect("ROUTES6")
        .try_into()
        .expect("lpm");
    for (prefix, host) in [
        ("fd00:220::", [172, 16, 91, 132]),
        ("fd00:230::", [172, 16, 91, 133]),
    ] {
        routes
            .insert(
                &Key::new(64, v6(prefix)),
                Peer6 {
                    host: xhost_common::map_v4(host),
                    flags: 0,
                },
                0,
            )
            .expect("insert");
    }
    let mut local: LpmTrie<_, [u8; 16], LocalNet> = ebpf
        .map_mut("LOCAL_NETS6")
        .expect("LOCAL_NETS6")
        .try_into()
        .expect("lpm");
    local
        .insert(
            &Key::new(64, v6("fd00:110::")),
            LocalNet {
                bridge_ifindex: ifindex("br0"),
                flags: 0,
            },
            0,
        )
        .expect("insert");
    let mut eps: HashMap<_, [u8; 16], Endpoint> = ebpf
        .map_mut("ENDPOINTS6")
        .expect("ENDPOINTS6")
        .try_into()
        .expect("hash");
    eps.insert(v6("fd00:110::11"), ep, 0).expect("insert");
}

/// The IPv4 header of the test frames, `src` to `dst`: ID 0x1234, DF, no
/// options (lengths, protocol and checksum are etherparse's to set when the
/// frame is written).
pub fn ipv4_header(src: [u8; 4], dst: [u8; 4], ttl: u8) -> Ipv4Header {
    let mut ip = Ipv4Header::new(0, ttl, IpNumber::UDP, src, dst).expect("IPv4 header");
    ip.identification = 0x1234;
    ip
}

/// A frame from the endpoint's MAC (`CTR_MAC`) to `ANY_MAC` carrying `ip`
/// and an empty UDP datagram 40000 -> 5201, as etherparse's builder writes
/// it (lengths and checksums its own).
pub fn udp_frame(ip: Ipv4Header) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, ANY_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .udp(40000, 5201)
        .write(&mut f, &[])
        .expect("UDP frame");
    f
}

/// Ethernet + IPv4 (+ `options`, a multiple of 4 bytes) + an empty UDP
/// datagram, checksums correct, from the endpoint's MAC (`CTR_MAC`).
pub fn ipv4(src: [u8; 4], dst: [u8; 4], ttl: u8, options: &[u8]) -> Vec<u8> {
    let mut ip = ipv4_header(src, dst, ttl);
    ip.options = options
        .try_into()
        .expect("IPv4 options: a multiple of 4 bytes, at most 40");
    udp_frame(ip)
}

/// `frame` with its Ethernet header changed by `edit` (read and written by
/// etherparse; the rest of the frame as it was).
pub fn with_eth(frame: &[u8], edit: impl FnOnce(&mut Ethernet2Header)) -> Vec<u8> {
    let (mut eth, rest) = Ethernet2Header::from_slice(frame).expect("Ethernet II frame");
    edit(&mut eth);
    let mut o = eth.to_bytes().to_vec();
    o.extend_from_slice(rest);
    o
}

/// `frame` with its destination MAC set to `mac`.
pub fn to_mac(frame: Vec<u8>, mac: [u8; 6]) -> Vec<u8> {
    with_eth(&frame, |e| e.destination = mac)
}

/// `frame` with its source MAC set to `mac`.
pub fn from_mac(frame: Vec<u8>, mac: [u8; 6]) -> Vec<u8> {
    with_eth(&frame, |e| e.source = mac)
}

/// An `__sk_buff` context with `ifindex` and `ingress_ifindex` set: the
/// device the frame "arrived" on, which the FIB lookup starts from; a
/// nonzero `gso_size` makes the frame a GSO packet (a TSO burst).
///
/// Its priority is `ifindex` too: the mark `xhost_veth_in` leaves on what
/// an endpoint's veth hands on to the bridge, which only `xhost_bridge_in`
/// reads. In the test host the endpoint 192.168.110.11 sits behind br0, so
/// a frame "arriving" on br0 comes as if through that endpoint's veth.
pub fn skb_ctx(ifindex: u32, gso_size: u32) -> Vec<u8> {
    skb_ctx_marked(ifindex, gso_size, ifindex)
}

/// Offset of `priority` in `struct __sk_buff`.
pub const SKB_PRIORITY: usize = 32;

/// [`skb_ctx`] with priority `mark` (0: as from a port without
/// `xhost_veth_in`).
pub fn skb_ctx_marked(ifindex: u32, gso_size: u32, mark: u32) -> Vec<u8> {
    // struct __sk_buff is 192 bytes; priority at 32, ifindex at 40,
    // ingress_ifindex at 36, gso_size at 176.
    let mut ctx = vec![0u8; 192];
    ctx[SKB_PRIORITY..SKB_PRIORITY + 4].copy_from_slice(&mark.to_ne_bytes());
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    ctx
}

/// What one `BPF_PROG_TEST_RUN` of a TC program returned.
pub struct TcRun {
    pub verdict: u32,
    /// The frame as the program left it.
    pub out: Vec<u8>,
    /// Mean time per run as the kernel measured it.
    pub per_run: Duration,
    /// The skb's priority as the program left it (the bridge mark).
    pub priority: u32,
}

/// Runs TC program `prog` `repeat` times on `frame`, as if it arrived on
/// `ifindex`.
pub fn run_tc_prog(
    ebpf: &mut Ebpf,
    prog: &str,
    ifindex: u32,
    frame: &[u8],
    repeat: u32,
) -> Result<TcRun, ProgramError> {
    run_tc_prog_ctx(ebpf, prog, &skb_ctx(ifindex, 0), frame, repeat)
}

/// Runs TC program `prog` `repeat` times on `frame` with context `ctx_in`
/// (see [`skb_ctx`]).
pub fn run_tc_prog_ctx(
    ebpf: &mut Ebpf,
    prog: &str,
    ctx_in: &[u8],
    frame: &[u8],
    repeat: u32,
) -> Result<TcRun, ProgramError> {
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
    opts.ctx_in = Some(ctx_in);
    opts.ctx_out = Some(&mut ctx_out);
    opts.repeat = repeat;
    let res = p.test_run(opts)?;
    out.truncate(res.data_size_out as usize);
    Ok(TcRun {
        verdict: res.return_value,
        out,
        per_run: res.duration,
        priority: u32::from_ne_bytes(
            ctx_out[SKB_PRIORITY..SKB_PRIORITY + 4]
                .try_into()
                .expect("4 bytes"),
        ),
    })
}

/// Keeps the calling thread on CPU 0: the route cache is per CPU, so runs
/// meant to share it must not migrate.
pub fn pin_to_cpu0() {
    let mut one = nix::sched::CpuSet::new();
    one.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("pin to cpu 0");
}
