//! A reference model of the xhost datapath in plain Rust: given the maps'
//! contents, the object's load-time constants, the host's FIB and a frame,
//! what each program must do with it (verdict, redirect target, counter,
//! the exact bytes it leaves). Written from the rules in docs/datapath.md
//! and docs/security.md, not from the eBPF code; the differential fuzz test
//! (`xhost-user/tests/fuzz.rs`) runs every program on the same input with
//! `BPF_PROG_TEST_RUN` and compares. See docs/fuzzing.md.
//!
//! The datapath's caches (routes by address, answers by flow) are not
//! modelled: they must not change any answer, which is what comparing a
//! stateless model with the cached datapath checks.

pub mod generate;
pub mod host;
mod wire;

use std::collections::{BTreeMap, BTreeSet};

use xhost_common::{Endpoint, MAX_VNI, VXLAN_OVERHEAD, stat};

pub use host::{FibAnswer, Host};
use wire::Ipv4;

/// An IPv4 prefix, its address masked to its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: [u8; 4],
    pub len: u8,
}

impl Prefix {
    /// `addr/len` with the host bits cleared (as the LPM trie matches it).
    pub fn new(addr: [u8; 4], len: u8) -> Self {
        let len = len.min(32);
        Self {
            addr: (u32::from_be_bytes(addr) & mask(len)).to_be_bytes(),
            len,
        }
    }

    pub fn contains(&self, a: [u8; 4]) -> bool {
        u32::from_be_bytes(a) & mask(self.len) == u32::from_be_bytes(self.addr)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d] = self.addr;
        write!(f, "{a}.{b}.{c}.{d}/{}", self.len)
    }
}

/// An IPv6 prefix, its address masked to its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix6 {
    pub addr: [u8; 16],
    pub len: u8,
}

impl Prefix6 {
    /// `addr/len` with the host bits cleared (as the LPM trie matches it).
    pub fn new(addr: [u8; 16], len: u8) -> Self {
        let len = len.min(128);
        Self {
            addr: (u128::from_be_bytes(addr) & mask6(len)).to_be_bytes(),
            len,
        }
    }

    pub fn contains(&self, a: [u8; 16]) -> bool {
        u128::from_be_bytes(a) & mask6(self.len) == u128::from_be_bytes(self.addr)
    }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl std::fmt::Display for Prefix6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", std::net::Ipv6Addr::from(self.addr), self.len)
    }
}

/// What the agent writes into the maps (docs/datapath.md, "Maps").
#[derive(Clone, Debug, Default)]
pub struct Maps {
    /// `ROUTES`: peer container prefix -> peer host.
    pub routes: BTreeMap<Prefix, [u8; 4]>,
    /// `LOCAL_NETS`: this host's container subnets -> bridge ifindex.
    pub local_nets: BTreeMap<Prefix, u32>,
    /// `ENDPOINTS`: local container address -> endpoint.
    pub endpoints: BTreeMap<[u8; 4], Endpoint>,
    /// `ENDPOINT_PORTS`: armed veths.
    pub endpoint_ports: BTreeSet<u32>,
    /// `PEER_HOSTS`.
    pub peer_hosts: BTreeSet<[u8; 4]>,
    /// `UNDERLAY_ADDRS`: this host's underlay address -> underlay ifindex.
    pub underlay_addrs: BTreeMap<[u8; 4], u32>,
    /// `ROUTES6`: peer container IPv6 prefix -> peer host (IPv4).
    pub routes6: BTreeMap<Prefix6, [u8; 4]>,
    /// `LOCAL_NETS6`: this host's IPv6 container subnets -> bridge ifindex.
    pub local_nets6: BTreeMap<Prefix6, u32>,
    /// `ENDPOINTS6`: local container IPv6 address -> endpoint.
    pub endpoints6: BTreeMap<[u8; 16], Endpoint>,
}

fn lpm6<V: Copy>(m: &BTreeMap<Prefix6, V>, a: [u8; 16]) -> Option<V> {
    m.iter()
        .filter(|(p, _)| p.contains(a))
        .max_by_key(|(p, _)| p.len)
        .map(|(_, v)| *v)
}

fn lpm<V: Copy>(m: &BTreeMap<Prefix, V>, a: [u8; 4]) -> Option<V> {
    m.iter()
        .filter(|(p, _)| p.contains(a))
        .max_by_key(|(p, _)| p.len)
        .map(|(_, v)| *v)
}

impl Maps {
    /// The peer host whose prefix holds `a` (longest match).
    pub fn route_of(&self, a: [u8; 4]) -> Option<[u8; 4]> {
        lpm(&self.routes, a)
    }

    pub fn is_local(&self, a: [u8; 4]) -> bool {
        lpm(&self.local_nets, a).is_some()
    }

    /// The endpoint of `a`; a missing one reads as ifindex 0.
    pub fn endpoint(&self, a: [u8; 4]) -> Option<Endpoint> {
        self.endpoints.get(&a).copied().filter(|e| e.ifindex != 0)
    }

    /// The peer host whose IPv6 prefix holds `a` (longest match).
    pub fn route6_of(&self, a: [u8; 16]) -> Option<[u8; 4]> {
        lpm6(&self.routes6, a)
    }

    pub fn is_local6(&self, a: [u8; 16]) -> bool {
        lpm6(&self.local_nets6, a).is_some()
    }

    /// The endpoint of IPv6 address `a`; a missing one reads as ifindex 0.
    pub fn endpoint6(&self, a: [u8; 16]) -> Option<Endpoint> {
        self.endpoints6.get(&a).copied().filter(|e| e.ifindex != 0)
    }
}

/// `a.b.c.d`.
pub struct Addr(pub [u8; 4]);

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One line per map, addresses dotted: what a failure report prints.
impl std::fmt::Display for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let routes: Vec<String> = self
            .routes
            .iter()
            .map(|(p, h)| format!("{p} -> {}", Addr(*h)))
            .collect();
        writeln!(f, "ROUTES: {}", routes.join(", "))?;
        let locals: Vec<String> = self
            .local_nets
            .iter()
            .map(|(p, b)| format!("{p} (bridge {b})"))
            .collect();
        writeln!(f, "LOCAL_NETS: {}", locals.join(", "))?;
        let eps: Vec<String> = self
            .endpoints
            .iter()
            .map(|(a, e)| {
                format!(
                    "{} -> ifindex {} mac {} gw {}",
                    Addr(*a),
                    e.ifindex,
                    mac_str(e.mac),
                    mac_str(e.gw_mac)
                )
            })
            .collect();
        writeln!(f, "ENDPOINTS: {}", eps.join(", "))?;
        writeln!(f, "ENDPOINT_PORTS: {:?}", self.endpoint_ports)?;
        let hosts: Vec<String> = self
            .peer_hosts
            .iter()
            .map(|h| Addr(*h).to_string())
            .collect();
        writeln!(f, "PEER_HOSTS: {}", hosts.join(", "))?;
        let unders: Vec<String> = self
            .underlay_addrs
            .iter()
            .map(|(a, i)| format!("{} (ifindex {i})", Addr(*a)))
            .collect();
        writeln!(f, "UNDERLAY_ADDRS: {}", unders.join(", "))?;
        let routes6: Vec<String> = self
            .routes6
            .iter()
            .map(|(p, h)| format!("{p} -> {}", Addr(*h)))
            .collect();
        writeln!(f, "ROUTES6: {}", routes6.join(", "))?;
        let locals6: Vec<String> = self
            .local_nets6
            .iter()
            .map(|(p, b)| format!("{p} (bridge {b})"))
            .collect();
        writeln!(f, "LOCAL_NETS6: {}", locals6.join(", "))?;
        let eps6: Vec<String> = self
            .endpoints6
            .iter()
            .map(|(a, e)| {
                format!(
                    "{} -> ifindex {} mac {} gw {}",
                    std::net::Ipv6Addr::from(*a),
                    e.ifindex,
                    mac_str(e.mac),
                    mac_str(e.gw_mac)
                )
            })
            .collect();
        write!(f, "ENDPOINTS6: {}", eps6.join(", "))
    }
}

/// VXLAN mode's load-time constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// The vxlan device.
    pub ifindex: u32,
    pub vni: u32,
    pub port: u16,
}

/// What a denied packet gets. Only `Drop` exists; another mode (an answer
/// to the sender) is one more variant and one more arm in [`Model::deny`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DenyMode {
    #[default]
    Drop,
}

/// The object's configuration: its load-time constants.
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// `None`: native routing.
    pub tunnel: Option<Tunnel>,
    pub deny: DenyMode,
}

/// The six programs (docs/datapath.md, "Programs and where they run").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    BridgeIn,
    VethIn,
    NicIn,
    NicXdp,
    VxlanIn,
    VxlanOut,
}

impl Prog {
    pub const ALL: [Prog; 6] = [
        Prog::BridgeIn,
        Prog::VethIn,
        Prog::NicIn,
        Prog::NicXdp,
        Prog::VxlanIn,
        Prog::VxlanOut,
    ];

    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            Prog::BridgeIn => xhost_common::PROG_BRIDGE_IN,
            Prog::VethIn => xhost_common::PROG_VETH_IN,
            Prog::NicIn => xhost_common::PROG_NIC_IN,
            Prog::NicXdp => xhost_common::PROG_NIC_XDP,
            Prog::VxlanIn => xhost_common::PROG_VXLAN_IN,
            Prog::VxlanOut => xhost_common::PROG_VXLAN_OUT,
        }
    }
}

/// One frame as a program sees it.
#[derive(Clone, Debug)]
pub struct Input {
    /// From the Ethernet header on (at least 14 bytes).
    pub frame: Vec<u8>,
    /// The device it arrived on (`ifindex` and `ingress_ifindex`).
    pub ifindex: u32,
    /// The skb's priority (the veth's mark, docs/security.md).
    pub priority: u32,
    /// The tunnel key of a packet the vxlan device decapsulated: its VNI
    /// and outer source. `BPF_PROG_TEST_RUN` cannot attach one.
    pub tunnel_key: Option<(u32, [u8; 4])>,
}

/// How a redirected frame leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// `bpf_redirect`: out of the device.
    Out,
    /// `bpf_redirect_peer`: into the veth's peer (the container's netns).
    Peer,
    /// `bpf_redirect_neigh`: out of the device once `nexthop` resolves.
    Neigh { nexthop: [u8; 4] },
}

/// A program's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Left to the kernel (TC: `TC_ACT_UNSPEC`; XDP: `XDP_PASS`).
    Pass,
    /// TC: `TC_ACT_SHOT`; XDP: `XDP_DROP`.
    Drop,
    /// TC: `TC_ACT_REDIRECT` to `ifindex`.
    Redirect { ifindex: u32, how: Redirect },
}

/// Bytes of the frame out that only a property, not a value, is known of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loose {
    /// The outer IPv4 header at this offset: any identification, a correct
    /// checksum.
    Ipv4Id(usize),
    /// A big-endian UDP port at this offset in `[min, max)`.
    Port(usize, u16, u16),
}

/// What a program must do with an [`Input`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: Action,
    /// The `STATS` slot moved by one packet of `bytes` bytes, if any.
    pub counted: Option<(u32, u32)>,
    /// The frame as the program leaves it.
    pub frame: Vec<u8>,
    /// The skb's priority as the program leaves it.
    pub priority: u32,
    pub loose: Vec<Loose>,
}

impl Outcome {
    /// Whether `frame` (what the program left) is what this outcome says,
    /// [`Loose`] bytes by their property.
    pub fn frame_matches(&self, frame: &[u8]) -> bool {
        if frame.len() != self.frame.len() {
            return false;
        }
        let mut want = self.frame.clone();
        let mut got = frame.to_vec();
        for l in &self.loose {
            match *l {
                Loose::Ipv4Id(o) => {
                    if got.len() < o + 20 || wire::checksum(&got[o..o + 20]) != 0 {
                        return false;
                    }
                    for b in [4, 5, 10, 11] {
                        want[o + b] = 0;
                        got[o + b] = 0;
                    }
                }
                Loose::Port(o, min, max) => {
                    let p = u16::from_be_bytes([got[o], got[o + 1]]);
                    if !(min..max).contains(&p) {
                        return false;
                    }
                    want[o..o + 2].fill(0);
                    got[o..o + 2].fill(0);
                }
            }
        }
        want == got
    }
}

/// A TC verdict with the counter it is accounted under.
#[derive(Clone, Copy, Debug)]
struct Verdict {
    action: Action,
    reason: u32,
}

impl Verdict {
    fn pass(reason: u32) -> Self {
        Self {
            action: Action::Pass,
            reason,
        }
    }
}

/// The kernel's vxlan device range of outer UDP source ports.
pub const SPORT_MIN: u16 = 32_768;
pub const SPORT_MAX: u16 = 60_999;
const VXLAN_HDR: usize = 8;
/// Where a VXLAN packet's inner frame starts.
const INNER: usize = 14 + 20 + 8 + VXLAN_HDR;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_UDP: u8 = 17;

/// The whole model: maps, constants and the host's FIB.
#[derive(Clone, Debug)]
pub struct Model {
    pub maps: Maps,
    pub config: Config,
    pub host: Host,
}

/// What the egress path decided, and the frame it leaves.
struct Egress {
    v: Verdict,
    frame: Vec<u8>,
    priority: u32,
    loose: Vec<Loose>,
}

impl Model {
    /// What `prog` does with `input`.
    pub fn run(&self, prog: Prog, input: &Input) -> Outcome {
        let len = input.frame.len() as u32;
        match prog {
            Prog::BridgeIn | Prog::VethIn => {
                let from_port = prog == Prog::VethIn;
                let e = self.egress(input, from_port);
                // A veth counts only what it decides itself: what it passes
                // goes on to the bridge, which counts it (docs/datapath.md).
                let counted =
                    (!from_port || e.v.action != Action::Pass).then_some((e.v.reason, len));
                Outcome {
                    action: e.v.action,
                    counted,
                    frame: e.frame,
                    priority: e.priority,
                    loose: e.loose,
                }
            }
            Prog::NicIn => {
                let (v, frame) = self.nic_in(input);
                Outcome {
                    action: v.action,
                    counted: Some((v.reason, frame.len() as u32)),
                    frame,
                    priority: input.priority,
                    loose: Vec::new(),
                }
            }
            Prog::NicXdp => {
                let (action, counted) = self.nic_xdp(&input.frame);
                Outcome {
                    action,
                    counted,
                    frame: input.frame.clone(),
                    priority: input.priority,
                    loose: Vec::new(),
                }
            }
            Prog::VxlanIn => {
                let (v, frame) = self.vxlan_in(input);
                Outcome {
                    action: v.action,
                    counted: Some((v.reason, frame.len() as u32)),
                    frame,
                    priority: input.priority,
                    loose: Vec::new(),
                }
            }
            Prog::VxlanOut => {
                let v = self.vxlan_out(&input.frame);
                Outcome {
                    action: v.action,
                    // What it keys is counted where it was decided.
                    counted: (v.action != Action::Pass).then_some((v.reason, len)),
                    frame: input.frame.clone(),
                    priority: input.priority,
                    loose: Vec::new(),
                }
            }
        }
    }

    /// A denied packet: the one place a deny mode decides.
    fn deny(&self, reason: u32) -> Verdict {
        match self.config.deny {
            DenyMode::Drop => Verdict {
                action: Action::Drop,
                reason,
            },
        }
    }

    /// `xhost_veth_in` (`from_port`) and `xhost_bridge_in`: a container's
    /// packet for a peer's subnet.
    fn egress(&self, input: &Input, from_port: bool) -> Egress {
        let frame = &input.frame;
        let mut out = Egress {
            v: Verdict::pass(stat::PASS_NOT_OURS),
            frame: frame.clone(),
            priority: input.priority,
            loose: Vec::new(),
        };
        let ip = match wire::parse(frame, 0, 0) {
            wire::Parsed::Ipv6 => return self.egress6(input, from_port),
            wire::Parsed::NotIpv4 => {
                out.v = Verdict::pass(stat::PASS_NOT_IPV4);
                return out;
            }
            wire::Parsed::Malformed => {
                out.v = Verdict::pass(stat::PASS_MALFORMED);
                return out;
            }
            wire::Parsed::Ipv4(ip) => ip,
        };
        let iif = input.ifindex;
        let to_mac: [u8; 6] = frame[0..6].try_into().expect("6");
        let from_mac: [u8; 6] = frame[6..12].try_into().expect("6");
        let mark = if from_port { iif } else { 0 };
        // A passed frame handed on to the bridge carries the veth's mark.
        let hand_on = |mut out: Egress| {
            if mark != 0 && out.v.action == Action::Pass {
                out.priority = mark;
            }
            out
        };
        let Some(peer) = self.maps.route_of(ip.dst) else {
            if self.config.tunnel.is_some() && self.is_ours_from_container(frame, &ip) {
                out.v = self.deny(stat::DROP_SPOOFED_LOCAL);
            }
            return out;
        };
        if from_port {
            let ep = self.maps.endpoint(ip.src);
            match ep {
                Some(ep) if ep.ifindex == iif && ep.mac == from_mac => {
                    if to_mac != ep.gw_mac {
                        return hand_on(out);
                    }
                }
                None if !self.maps.endpoint_ports.contains(&iif) => return out,
                _ => {
                    out.v = self.deny(stat::DROP_SPOOFED_LOCAL);
                    return out;
                }
            }
        } else {
            // The bridge reads the mark and clears it.
            let mark_in = input.priority;
            out.priority = 0;
            let owner = match self.maps.endpoint(ip.src) {
                Some(ep) => mark_in == ep.ifindex && from_mac == ep.mac,
                None if !self.maps.is_local(ip.src) => return out,
                None => mark_in == 0 && self.host.neighbour_mac(iif, ip.src) == Some(from_mac),
            };
            if !owner {
                out.v = self.deny(stat::DROP_SPOOFED_LOCAL);
                return out;
            }
        }
        if ip.ttl <= 1 {
            out.v = Verdict::pass(stat::PASS_TTL);
            return hand_on(out);
        }
        let Some(tunnel) = self.config.tunnel else {
            let hop = self.host.fib(iif, peer, ip.tot_len, false);
            let (v, f) = route(frame, hop, stat::FWD_EGRESS);
            out.v = v;
            out.frame = f;
            return hand_on(out);
        };
        // VXLAN mode: encapsulated here when the outer lengths fit 16 bits.
        let whole = frame.len() - 14 + VXLAN_OVERHEAD as usize;
        let outer = ip.tot_len.checked_add(VXLAN_OVERHEAD as u16);
        let (Some(outer), true) = (outer, whole <= usize::from(u16::MAX)) else {
            // To the vxlan device, if it fits the device's MTU.
            if frame.len() - 14 > self.host.mtu(tunnel.ifindex) as usize {
                out.v = Verdict::pass(stat::PASS_FIB);
                return hand_on(out);
            }
            let mut f = frame.clone();
            wire::decrement_ttl(&mut f, 14);
            out.frame = f;
            out.v = Verdict {
                action: Action::Redirect {
                    ifindex: tunnel.ifindex,
                    how: Redirect::Out,
                },
                reason: stat::FWD_EGRESS,
            };
            return out;
        };
        let hop = self.host.fib(iif, peer, outer, true);
        let (ifindex, how, smac, dmac, source) = match hop {
            FibAnswer::Kernel => {
                out.v = Verdict::pass(stat::PASS_FIB);
                return hand_on(out);
            }
            FibAnswer::Resolved {
                ifindex,
                smac,
                dmac,
                source,
            } => (ifindex, Redirect::Out, smac, dmac, source),
            FibAnswer::Unresolved {
                ifindex,
                nexthop,
                source,
            } => (ifindex, Redirect::Neigh { nexthop }, [0; 6], [0; 6], source),
        };
        let (f, loose) = encapsulate(frame, tunnel, source, peer, smac, dmac);
        out.frame = f;
        out.loose = loose;
        out.v = Verdict {
            action: Action::Redirect { ifindex, how },
            reason: stat::FWD_EGRESS,
        };
        out
    }

    /// VXLAN mode: a container's UDP packet to our port with our VNI
    /// (docs/security.md, "VXLAN mode").
    fn is_ours_from_container(&self, frame: &[u8], ip: &Ipv4) -> bool {
        let Some(t) = self.config.tunnel else {
            return false;
        };
        // A later fragment carries no UDP header.
        if ip.proto != IPPROTO_UDP || ip.frag_offset != 0 {
            return false;
        }
        let o = 14 + ip.hdr_len;
        let Some(h) = frame.get(o..o + 16) else {
            return false;
        };
        u16::from_be_bytes([h[2], h[3]]) == t.port
            && u32::from_be_bytes([0, h[12], h[13], h[14]]) == t.vni & MAX_VNI
    }

    /// `xhost_nic_in`.
    fn nic_in(&self, input: &Input) -> (Verdict, Vec<u8>) {
        let frame = &input.frame;
        let ip = match wire::parse(frame, 0, 0) {
            wire::Parsed::Ipv6 => return self.nic_in6(frame),
            wire::Parsed::NotIpv4 => return (Verdict::pass(stat::PASS_NOT_IPV4), frame.clone()),
            wire::Parsed::Malformed => {
                return (Verdict::pass(stat::PASS_MALFORMED), frame.clone());
            }
            wire::Parsed::Ipv4(ip) => ip,
        };
        if self.config.tunnel.is_some()
            && let Some(r) = self.decapsulated(input, &ip)
        {
            return r;
        }
        self.deliver(input.ifindex, frame, &ip, self.config.tunnel.is_some())
    }

    /// VXLAN mode on the underlay: a single VXLAN packet from a peer host
    /// for a local endpoint, decapsulated and delivered; `None`: the
    /// kernel's device decapsulates it.
    fn decapsulated(&self, input: &Input, outer: &Ipv4) -> Option<(Verdict, Vec<u8>)> {
        let t = self.config.tunnel?;
        let frame = &input.frame;
        // One packet addressed to this host's MAC (pkt_type PACKET_HOST).
        if !self
            .host
            .is_for_device(input.ifindex, frame[0..6].try_into().expect("6"))
        {
            return None;
        }
        if outer.hdr_len != 20 || outer.proto != IPPROTO_UDP || outer.mf || outer.frag_offset != 0 {
            return None;
        }
        let udp = frame.get(34..42)?;
        let vxlan = frame.get(42..50)?;
        let vni = (t.vni & MAX_VNI).to_be_bytes();
        if u16::from_be_bytes([udp[2], udp[3]]) != t.port
            || udp[6..8] != [0, 0]
            || usize::from(u16::from_be_bytes([udp[4], udp[5]])) + 20 != usize::from(outer.tot_len)
            || vxlan != [0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0]
        {
            return None;
        }
        self.maps.underlay_addrs.get(&outer.dst)?;
        let inner = match wire::parse(frame, INNER, 0) {
            wire::Parsed::Ipv4(inner) => inner,
            wire::Parsed::Ipv6 => return self.decapsulated6(frame, outer),
            _ => return None,
        };
        if usize::from(inner.tot_len) + INNER > 14 + usize::from(outer.tot_len) {
            return None;
        }
        if inner.ttl <= 1 || self.maps.route_of(inner.src) != Some(outer.src) {
            return None;
        }
        let ep = self.maps.endpoint(inner.dst)?;
        // The outer Ethernet header, then the inner packet.
        let mut f = frame[0..14].to_vec();
        f.extend_from_slice(&frame[INNER + 14..]);
        Some(into_endpoint(f, &ep))
    }

    /// A peer's packet for a local container (`xhost_nic_in`, and
    /// `xhost_vxlan_in` once the tunnel vouched for it).
    fn deliver(
        &self,
        iif: u32,
        frame: &[u8],
        ip: &Ipv4,
        encapsulated_only: bool,
    ) -> (Verdict, Vec<u8>) {
        let ep = self.maps.endpoint(ip.dst);
        if ep.is_none() && !self.maps.is_local(ip.dst) {
            return (Verdict::pass(stat::PASS_NOT_OURS), frame.to_vec());
        }
        if encapsulated_only || !self.source_allowed(frame, ip) {
            return (self.deny(stat::DROP_SPOOFED), frame.to_vec());
        }
        if ip.ttl <= 1 {
            return (Verdict::pass(stat::PASS_TTL), frame.to_vec());
        }
        if let Some(ep) = ep {
            return into_endpoint(frame.to_vec(), &ep);
        }
        route(
            frame,
            self.host.fib(iif, ip.dst, ip.tot_len, false),
            stat::FWD_INGRESS,
        )
    }

    /// Who may reach a local container: a peer's container subnets, and
    /// ICMP errors (unreachable, time exceeded, parameter problem) from a
    /// peer host.
    fn source_allowed(&self, frame: &[u8], ip: &Ipv4) -> bool {
        if self.maps.route_of(ip.src).is_some() {
            return true;
        }
        ip.proto == IPPROTO_ICMP
            && self.maps.peer_hosts.contains(&ip.src)
            && matches!(frame.get(14 + ip.hdr_len), Some(3 | 11 | 12))
    }

    /// `xhost_nic_xdp`: drops what `xhost_nic_in` would drop as spoofed
    /// for a local container (in VXLAN mode: any bare packet for one).
    fn nic_xdp(&self, frame: &[u8]) -> (Action, Option<(u32, u32)>) {
        let ip = match wire::parse(frame, 0, 0) {
            wire::Parsed::Ipv4(ip) => ip,
            wire::Parsed::Ipv6 if self.spoofed6(frame) => {
                return (
                    Action::Drop,
                    Some((stat::DROP_SPOOFED6, frame.len() as u32)),
                );
            }
            _ => return (Action::Pass, None),
        };
        if (self.maps.endpoint(ip.dst).is_some() || self.maps.is_local(ip.dst))
            && (self.config.tunnel.is_some() || !self.source_allowed(frame, &ip))
        {
            return (Action::Drop, Some((stat::DROP_SPOOFED, frame.len() as u32)));
        }
        (Action::Pass, None)
    }

    /// `xhost_vxlan_in`: what the kernel's device decapsulated, delivered
    /// once the tunnel key shows our VNI from a peer host and the inner
    /// source is that peer's (a subnet of it, or the host itself).
    fn vxlan_in(&self, input: &Input) -> (Verdict, Vec<u8>) {
        let frame = &input.frame;
        let vni = self.config.tunnel.map_or(0, |t| t.vni);
        let ipv6 = frame.get(12..14) == Some(&[0x86, 0xdd]);
        let Some((_, outer)) = input
            .tunnel_key
            .filter(|(v, o)| *v == vni && self.maps.peer_hosts.contains(o))
        else {
            let reason = if ipv6 {
                stat::DROP_SPOOFED6
            } else {
                stat::DROP_SPOOFED
            };
            return (self.deny(reason), frame.clone());
        };
        let ip = match wire::parse(frame, 0, 0) {
            wire::Parsed::Ipv6 => return self.vxlan_in6(frame, outer),
            wire::Parsed::NotIpv4 => return (Verdict::pass(stat::PASS_NOT_IPV4), frame.clone()),
            wire::Parsed::Malformed => {
                return (Verdict::pass(stat::PASS_MALFORMED), frame.clone());
            }
            wire::Parsed::Ipv4(ip) => ip,
        };
        if ip.src != outer && self.maps.route_of(ip.src) != Some(outer) {
            return (self.deny(stat::DROP_SPOOFED), frame.clone());
        }
        self.deliver(input.ifindex, frame, &ip, false)
    }

    /// `xhost_vxlan_out`: keys what the device sends to the peer owning the
    /// destination (IPv4 or IPv6); drops what no peer owns.
    fn vxlan_out(&self, frame: &[u8]) -> Verdict {
        let host = match wire::parse(frame, 0, 0) {
            wire::Parsed::Ipv4(ip) => self.maps.route_of(ip.dst),
            wire::Parsed::Ipv6 => match wire::parse6(frame) {
                wire::Parsed6::Ipv6(ip) => self.maps.route6_of(ip.dst),
                _ => None,
            },
            _ => None,
        };
        if host.is_none() {
            return self.deny(stat::DROP_TUNNEL);
        }
        Verdict::pass(stat::FWD_EGRESS)
    }

    /// `xhost_veth_in` and `xhost_bridge_in` for IPv6 (docs/datapath.md,
    /// "IPv6"): `egress`'s rules with `ROUTES6`, `ENDPOINTS6`,
    /// `LOCAL_NETS6` and the bridge's NDP entries; the next hop is the
    /// IPv4 route to the peer host, used only when its neighbour is
    /// resolved; in VXLAN mode encapsulated as IPv4 is.
    fn egress6(&self, input: &Input, from_port: bool) -> Egress {
        let frame = &input.frame;
        let mut out = Egress {
            v: Verdict::pass(stat::PASS_NOT_OURS6),
            frame: frame.clone(),
            priority: input.priority,
            loose: Vec::new(),
        };
        let ip = match wire::parse6(frame) {
            wire::Parsed6::Malformed => {
                out.v = Verdict::pass(stat::PASS_MALFORMED);
                return out;
            }
            wire::Parsed6::Control => {
                out.v = Verdict::pass(stat::PASS_CONTROL6);
                return out;
            }
            wire::Parsed6::Ipv6(ip) => ip,
        };
        let iif = input.ifindex;
        let to_mac: [u8; 6] = frame[0..6].try_into().expect("6");
        let from_mac: [u8; 6] = frame[6..12].try_into().expect("6");
        let mark = if from_port { iif } else { 0 };
        let hand_on = |mut out: Egress| {
            if mark != 0 && out.v.action == Action::Pass {
                out.priority = mark;
            }
            out
        };
        let Some(peer) = self.maps.route6_of(ip.dst) else {
            return out;
        };
        if from_port {
            match self.maps.endpoint6(ip.src) {
                Some(ep) if ep.ifindex == iif && ep.mac == from_mac => {
                    if to_mac != ep.gw_mac {
                        return hand_on(out);
                    }
                }
                None if !self.maps.endpoint_ports.contains(&iif) => return out,
                _ => {
                    out.v = self.deny(stat::DROP_SPOOFED_LOCAL6);
                    return out;
                }
            }
        } else {
            let mark_in = input.priority;
            out.priority = 0;
            let owner = match self.maps.endpoint6(ip.src) {
                Some(ep) => mark_in == ep.ifindex && from_mac == ep.mac,
                None if !self.maps.is_local6(ip.src) => return out,
                None => {
                    mark_in == 0 && self.host.neighbour_mac6(iif, ip.src, ip.dst) == Some(from_mac)
                }
            };
            if !owner {
                out.v = self.deny(stat::DROP_SPOOFED_LOCAL6);
                return out;
            }
        }
        if !ip.parsed_next {
            out.v = Verdict::pass(stat::PASS_EXT6);
            return hand_on(out);
        }
        if ip.hop_limit <= 1 {
            out.v = Verdict::pass(stat::PASS_HOP_LIMIT6);
            return hand_on(out);
        }
        if let Some(tunnel) = self.config.tunnel {
            return hand_on(self.encapsulated6(frame, out, iif, tunnel, peer, ip.tot_len));
        }
        let hop = match u16::try_from(ip.tot_len) {
            Ok(len) => self.host.fib(iif, peer, len, false),
            Err(_) => FibAnswer::Kernel,
        };
        let FibAnswer::Resolved {
            ifindex,
            smac,
            dmac,
            ..
        } = hop
        else {
            out.v = Verdict::pass(stat::PASS_FIB6);
            return hand_on(out);
        };
        let mut f = frame.clone();
        f[0..6].copy_from_slice(&dmac);
        f[6..12].copy_from_slice(&smac);
        f[14 + 7] -= 1;
        out.frame = f;
        out.v = Verdict {
            action: Action::Redirect {
                ifindex,
                how: Redirect::Out,
            },
            reason: stat::FWD_EGRESS6,
        };
        out
    }

    /// VXLAN mode: `egress6`'s packet (`tot_len` long) for peer host
    /// `peer`, hop limit - 1, encapsulated here when the outer lengths fit
    /// 16 bits and the FIB lets the outer packet through, else through the
    /// vxlan device if it fits the device's MTU, else the kernel's.
    fn encapsulated6(
        &self,
        frame: &[u8],
        mut out: Egress,
        iif: u32,
        tunnel: Tunnel,
        peer: [u8; 4],
        tot_len: u32,
    ) -> Egress {
        let Ok(len) = u16::try_from(tot_len) else {
            out.v = Verdict::pass(stat::PASS_FIB6);
            return out;
        };
        let whole = frame.len() - 14 + VXLAN_OVERHEAD as usize;
        let outer = len.checked_add(VXLAN_OVERHEAD as u16);
        let (Some(outer), true) = (outer, whole <= usize::from(u16::MAX)) else {
            if frame.len() - 14 > self.host.mtu(tunnel.ifindex) as usize {
                out.v = Verdict::pass(stat::PASS_FIB6);
                return out;
            }
            let mut f = frame.to_vec();
            f[14 + 7] -= 1;
            out.frame = f;
            out.v = Verdict {
                action: Action::Redirect {
                    ifindex: tunnel.ifindex,
                    how: Redirect::Out,
                },
                reason: stat::FWD_EGRESS6,
            };
            return out;
        };
        let (ifindex, how, smac, dmac, source) = match self.host.fib(iif, peer, outer, true) {
            FibAnswer::Kernel => {
                out.v = Verdict::pass(stat::PASS_FIB6);
                return out;
            }
            FibAnswer::Resolved {
                ifindex,
                smac,
                dmac,
                source,
            } => (ifindex, Redirect::Out, smac, dmac, source),
            FibAnswer::Unresolved {
                ifindex,
                nexthop,
                source,
            } => (ifindex, Redirect::Neigh { nexthop }, [0; 6], [0; 6], source),
        };
        let (f, loose) = encapsulate(frame, tunnel, source, peer, smac, dmac);
        out.frame = f;
        out.loose = loose;
        out.v = Verdict {
            action: Action::Redirect { ifindex, how },
            reason: stat::FWD_EGRESS6,
        };
        out
    }

    /// `xhost_nic_in` for IPv6: a peer's packet (source in `ROUTES6`) for a
    /// local container, delivered when its endpoint is known; in VXLAN mode
    /// none arrives bare.
    fn nic_in6(&self, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let pass = |reason| (Verdict::pass(reason), frame.to_vec());
        let ip = match wire::parse6(frame) {
            wire::Parsed6::Malformed => return pass(stat::PASS_MALFORMED),
            wire::Parsed6::Control => return pass(stat::PASS_CONTROL6),
            wire::Parsed6::Ipv6(ip) => ip,
        };
        let ep = self.maps.endpoint6(ip.dst);
        if ep.is_none() && !self.maps.is_local6(ip.dst) {
            return pass(stat::PASS_NOT_OURS6);
        }
        if self.config.tunnel.is_some() || self.maps.route6_of(ip.src).is_none() {
            return (self.deny(stat::DROP_SPOOFED6), frame.to_vec());
        }
        self.deliver6(frame, &ip, ep)
    }

    /// A peer's IPv6 packet for a local container, its source checked.
    fn deliver6(&self, frame: &[u8], ip: &wire::Ipv6, ep: Option<Endpoint>) -> (Verdict, Vec<u8>) {
        let pass = |reason| (Verdict::pass(reason), frame.to_vec());
        if !ip.parsed_next {
            return pass(stat::PASS_EXT6);
        }
        if ip.hop_limit <= 1 {
            return pass(stat::PASS_HOP_LIMIT6);
        }
        let Some(ep) = ep else {
            return pass(stat::PASS_NOT_OURS6);
        };
        let mut f = frame.to_vec();
        f[0..6].copy_from_slice(&ep.mac);
        f[6..12].copy_from_slice(&ep.gw_mac);
        f[14 + 7] -= 1;
        (
            Verdict {
                action: Action::Redirect {
                    ifindex: ep.ifindex,
                    how: Redirect::Peer,
                },
                reason: stat::FWD_INGRESS6,
            },
            f,
        )
    }

    /// `xhost_nic_xdp` for IPv6: whether `nic_in6` drops it as spoofed.
    fn spoofed6(&self, frame: &[u8]) -> bool {
        let wire::Parsed6::Ipv6(ip) = wire::parse6(frame) else {
            return false;
        };
        (self.maps.endpoint6(ip.dst).is_some() || self.maps.is_local6(ip.dst))
            && (self.config.tunnel.is_some() || self.maps.route6_of(ip.src).is_none())
    }

    /// `xhost_vxlan_in` for IPv6: the inner source must lie in a subnet of
    /// the peer host that sent it (checked first, control traffic
    /// included), then delivered as on the underlay.
    fn vxlan_in6(&self, frame: &[u8], outer: [u8; 4]) -> (Verdict, Vec<u8>) {
        let pass = |reason| (Verdict::pass(reason), frame.to_vec());
        // The whole fixed header must be there to read the source from.
        let Some(h) = frame.get(14..54) else {
            return pass(stat::PASS_MALFORMED);
        };
        if self.maps.route6_of(h[8..24].try_into().expect("16")) != Some(outer) {
            return (self.deny(stat::DROP_SPOOFED6), frame.to_vec());
        }
        let ip = match wire::parse6(frame) {
            wire::Parsed6::Malformed => return pass(stat::PASS_MALFORMED),
            wire::Parsed6::Control => return pass(stat::PASS_CONTROL6),
            wire::Parsed6::Ipv6(ip) => ip,
        };
        let ep = self.maps.endpoint6(ip.dst);
        if ep.is_none() && !self.maps.is_local6(ip.dst) {
            return pass(stat::PASS_NOT_OURS6);
        }
        self.deliver6(frame, &ip, ep)
    }

    /// VXLAN mode on the underlay: the inner IPv6 frame at [`INNER`] of a
    /// VXLAN packet whose outer headers `decapsulated` checked, delivered
    /// as the IPv4 one is; `None`: the kernel's device decapsulates it.
    fn decapsulated6(&self, frame: &[u8], outer: &Ipv4) -> Option<(Verdict, Vec<u8>)> {
        let wire::Parsed6::Ipv6(inner) = wire::parse6_at(frame, INNER) else {
            return None;
        };
        if inner.tot_len as usize + INNER > 14 + usize::from(outer.tot_len) {
            return None;
        }
        if self.maps.route6_of(inner.src) != Some(outer.src)
            || !inner.parsed_next
            || inner.hop_limit <= 1
        {
            return None;
        }
        let ep = self.maps.endpoint6(inner.dst)?;
        // The outer Ethernet header (EtherType IPv6), then the inner packet.
        let mut f = frame[0..12].to_vec();
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&frame[INNER + 14..]);
        Some(self.deliver6(&f, &inner, Some(ep)))
    }
}

/// Forwards along the FIB's answer: new MACs and TTL - 1 (resolved), TTL -
/// 1 and the kernel's neighbour (unresolved), or the kernel's (no answer).
fn route(frame: &[u8], hop: FibAnswer, reason: u32) -> (Verdict, Vec<u8>) {
    let mut f = frame.to_vec();
    let action = match hop {
        FibAnswer::Kernel => return (Verdict::pass(stat::PASS_FIB), f),
        FibAnswer::Resolved {
            ifindex,
            smac,
            dmac,
            ..
        } => {
            f[0..6].copy_from_slice(&dmac);
            f[6..12].copy_from_slice(&smac);
            Action::Redirect {
                ifindex,
                how: Redirect::Out,
            }
        }
        FibAnswer::Unresolved {
            ifindex, nexthop, ..
        } => Action::Redirect {
            ifindex,
            how: Redirect::Neigh { nexthop },
        },
    };
    wire::decrement_ttl(&mut f, 14);
    (Verdict { action, reason }, f)
}

/// Into the container: from its gateway MAC to its MAC, TTL - 1,
/// `bpf_redirect_peer` to its veth.
fn into_endpoint(mut f: Vec<u8>, ep: &Endpoint) -> (Verdict, Vec<u8>) {
    f[0..6].copy_from_slice(&ep.mac);
    f[6..12].copy_from_slice(&ep.gw_mac);
    wire::decrement_ttl(&mut f, 14);
    (
        Verdict {
            action: Action::Redirect {
                ifindex: ep.ifindex,
                how: Redirect::Peer,
            },
            reason: stat::FWD_INGRESS,
        },
        f,
    )
}

/// The frame routed (TTL - 1) and encapsulated as the kernel's vxlan
/// device would (docs/datapath.md, "VXLAN mode").
fn encapsulate(
    frame: &[u8],
    t: Tunnel,
    source: [u8; 4],
    peer: [u8; 4],
    smac: [u8; 6],
    dmac: [u8; 6],
) -> (Vec<u8>, Vec<Loose>) {
    let mut inner = frame.to_vec();
    // IPv6: the hop limit, and the traffic class across the first two bytes.
    let inner_tos = if inner[12..14] == [0x86, 0xdd] {
        inner[14 + 7] -= 1;
        (inner[14] << 4) | (inner[15] >> 4)
    } else {
        wire::decrement_ttl(&mut inner, 14);
        inner[15]
    };
    let ip_len = (inner.len() - 14 + VXLAN_OVERHEAD as usize) as u16;
    let tos = match inner_tos & 0x03 {
        0x03 => 0x02,
        ecn => ecn,
    };
    let mut f = Vec::with_capacity(inner.len() + 50);
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = tos;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&source);
    ip[16..20].copy_from_slice(&peer);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&t.port.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    let vni = (t.vni & MAX_VNI).to_be_bytes();
    f.extend_from_slice(&[0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0]);
    f.extend_from_slice(&inner);
    (
        f,
        vec![Loose::Ipv4Id(14), Loose::Port(34, SPORT_MIN, SPORT_MAX)],
    )
}

#[cfg(test)]
mod tests;
