//! Benchmark scenarios for `cargo xtask bench`: the same container A -> container B path
//! built several ways (a bare veth, the by-hand iptables/route recipe, kernel VXLAN as
//! flannel does it, xhost), and the tools that measure a path (iperf3, sockperf,
//! `/proc/stat`) with parsers for what they print.
//!
//! Every scenario is built from scratch in namespaces of its own and torn down by its
//! guards, so nothing (iptables rules, routes, conntrack entries, pins) carries over from
//! one scenario to the next.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    Error, Ipv4Net, NetNs, Process, Result, Topology, TopologyOpts, cmd,
    fake_engine::{self, FakeEngine},
    probe::{ping_args, ping_stats},
    xhost::{self, Agent},
};

/// Container A's address (client side of every measurement).
pub const CTR_A: Ipv4Addr = Ipv4Addr::new(192, 168, 110, 11);
/// Container B's address (server side of every measurement).
pub const CTR_B: Ipv4Addr = Ipv4Addr::new(192, 168, 220, 11);
/// Container A's IPv6 address (the IPv6 scenarios), in host A's [`subnet6`].
pub const CTR_A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, 0x11);
/// Container B's IPv6 address, in host B's [`subnet6`].
pub const CTR_B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, 0x11);
/// MTU of the containers in the VXLAN scenario: 1500 minus VXLAN's 50 bytes, as flannel
/// configures it.
pub const VXLAN_MTU: u32 = 1450;
/// Underlay addresses of the extra peer hosts that own the scale benchmark's extra routes:
/// 172.16.91.140 .. 172.16.91.239, in the underlay /24 but never sent to.
const EXTRA_PEER_BASE: u8 = 140;
const EXTRA_PEERS: u32 = 100;

/// How container A's packets reach container B.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// The two container namespaces joined by one veth: the machine's packet-path limit.
    Wire,
    /// Docker-like hosts with a static route per remote subnet, a NAT exemption and FORWARD
    /// accepts in DOCKER-USER; conntrack stays on.
    IptablesRoutes,
    /// Docker-like hosts joined by a Linux VXLAN device each (static FDB and neighbour
    /// entries, routes `onlink` via the peer's VXLAN address), plus the NAT exemption and
    /// FORWARD accepts; containers at MTU 1450. What flannel's vxlan backend sets up.
    KernelVxlan,
    /// Docker-like hosts with xhost-user on each; no routes or rules added by the bench.
    Xhost(XhostOpts),
}

/// Settings of the xhost scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XhostOpts {
    /// `--xdp-mode`; `None` keeps the agent's default.
    pub xdp_mode: Option<String>,
    /// Routes in each host's ROUTES map, the real peer's subnet included (1 = no extras).
    pub routes: u32,
    /// The `xhost-user` binary; `None`: [`xhost::xhost_bin`].
    pub binary: Option<PathBuf>,
    /// VXLAN mode (`--tunnel vxlan`), with the containers at [`VXLAN_MTU`] as an operator
    /// configures Docker for it (and as the kernel VXLAN scenario has them).
    pub tunnel: bool,
    /// The kernel datapath (`--datapath kernel`): the agent sets up what
    /// [`PathKind::IptablesRoutes`] does by hand.
    pub kernel: bool,
}

impl Default for XhostOpts {
    fn default() -> Self {
        Self {
            xdp_mode: None,
            routes: 1,
            binary: None,
            tunnel: false,
            kernel: false,
        }
    }
}

/// The address family a scenario carries container A -> B traffic in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Ipv4,
    /// The hosts and containers are dual-stack (as Docker's `--ipv6` networks), the
    /// underlay stays IPv4 for xhost (`--peer HOST=V4,V6`), and every test runs over
    /// the containers' IPv6 addresses.
    Ipv6,
}

/// Host `n`'s (1 or 2) IPv6 container subnet: `fd00:a::/64`, `fd00:b::/64`; the bridge
/// is `::1`, the container `::11` ([`CTR_A6`], [`CTR_B6`]).
pub fn subnet6(n: u8) -> ipnet::Ipv6Net {
    let net = Ipv6Addr::new(0xfd00, 0x9 + u16::from(n), 0, 0, 0, 0, 0, 0);
    ipnet::Ipv6Net::new_assert(net, 64)
}

/// Host `n`'s IPv6 underlay address in the by-hand IPv6 recipe (`fd00:ff::n/64`): Linux
/// has no IPv6 route via an IPv4 next hop, so that recipe needs an IPv6 underlay.
fn underlay6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, u16::from(n))
}

/// One built scenario. Fields drop in declaration order: agents first (they detach and
/// remove their kernel routes), then the config file and the Docker engines the agents
/// followed (with the processes standing for the containers), then the namespaces.
pub struct Bed {
    agents: Vec<BedAgent>,
    config: Option<TempFile>,
    engines: Vec<FakeEngine>,
    sleepers: Vec<Process>,
    family: Family,
    net: Net,
}

/// An agent with what the bench reports about it.
pub struct BedAgent {
    pub agent: Agent,
    /// `host-a` / `host-b`.
    pub host: String,
    /// From spawn to `ready`.
    pub load_time: Duration,
}

enum Net {
    Wire { a: NetNs, b: NetNs },
    Hosts(Box<Topology>),
}

impl Bed {
    /// Builds the scenario for `family`'s traffic; on failure everything created so far
    /// is torn down again. IPv6 has no kernel VXLAN scenario, and xhost forwards it in
    /// native routing only (as `config::check_ipv6_mode` holds).
    pub fn build(kind: &PathKind, family: Family) -> Result<Self> {
        let bed = Self::build_family(kind, family)?;
        if family == Family::Ipv6 {
            bed.wait_dad()?;
        }
        Ok(bed)
    }

    /// Waits until no namespace of the bed has a tentative IPv6 address: until the
    /// link-local addresses' duplicate address detection is over, a forwarding host
    /// drops what it routes (the first packets of a fresh IPv6 bed are lost for ~2 s).
    fn wait_dad(&self) -> Result<()> {
        let mut all = vec![self.client(), self.server()];
        all.extend(self.host_namespaces());
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        loop {
            let mut tentative = String::new();
            for ns in &all {
                let out = ns.ip(&["-6", "-o", "addr", "show", "tentative"])?;
                tentative.push_str(&String::from_utf8_lossy(&out.stdout));
            }
            if tentative.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "IPv6 duplicate address detection".into(),
                    after: timeout,
                    output: tentative,
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn build_family(kind: &PathKind, family: Family) -> Result<Self> {
        let v6 = family == Family::Ipv6;
        let hosts = || -> Result<Topology> {
            let topo = Topology::two_hosts(TopologyOpts::default())?;
            if v6 {
                add_ipv6(&topo)?;
            }
            Ok(topo)
        };
        match kind {
            PathKind::Wire => Ok(Self::new(family, build_wire(v6)?)),
            PathKind::IptablesRoutes => {
                let topo = hosts()?;
                if v6 {
                    apply_ip6_routes(&topo)?;
                } else {
                    apply_iptables_routes(&topo)?;
                }
                Ok(Self::hosts(family, topo))
            }
            PathKind::KernelVxlan if v6 => Err(Error::Config(
                "the kernel VXLAN scenario has no IPv6 twin".into(),
            )),
            PathKind::KernelVxlan => {
                let topo = hosts()?;
                apply_kernel_vxlan(&topo)?;
                Ok(Self::hosts(family, topo))
            }
            PathKind::Xhost(opts) if v6 && (opts.tunnel || opts.kernel || opts.routes > 1) => {
                Err(Error::Config(
                    "xhost's IPv6 scenario runs native routing with one route per family".into(),
                ))
            }
            PathKind::Xhost(opts) => {
                let topo = hosts()?;
                if opts.tunnel {
                    for host in topo.hosts() {
                        set_container_mtu(host, VXLAN_MTU)?;
                    }
                }
                let mut bed = Self::hosts(family, topo);
                if v6 {
                    bed.start_engines()?;
                }
                bed.start_agents(opts)?;
                Ok(bed)
            }
        }
    }

    fn new(family: Family, net: Net) -> Self {
        Self {
            agents: Vec::new(),
            config: None,
            engines: Vec::new(),
            sleepers: Vec::new(),
            family,
            net,
        }
    }

    fn hosts(family: Family, topo: Topology) -> Self {
        Self::new(family, Net::Hosts(Box::new(topo)))
    }

    /// A Docker engine per host (the test's [`FakeEngine`]) with one dual-stack network,
    /// the host's bridge, and its container on it: the agent learns IPv6 endpoints from
    /// Docker only (the kernel source reads IPv4 neighbours), as a real dual-stack host
    /// has them.
    fn start_engines(&mut self) -> Result<()> {
        let Net::Hosts(topo) = &self.net else {
            return Err(Error::Config(
                "Docker engines need the two-host topology".into(),
            ));
        };
        for (n, host) in [(1u8, topo.host_a()), (2, topo.host_b())] {
            let socket = std::env::temp_dir().join(format!(
                "xh-{}-bench-engine-{}.sock",
                std::process::id(),
                host.role()
            ));
            let _ = std::fs::remove_file(&socket);
            let net6 = subnet6(n);
            let engine = FakeEngine::start(
                &socket,
                fake_engine::Network {
                    id: format!("{:0>64}", format!("b6{n}")),
                    name: "bridge".into(),
                    bridge: host.bridge().into(),
                    subnet: host.subnet(),
                    gateway: host.bridge_ip(),
                    ipv6: Some((net6, host6(net6, 1))),
                },
            )?;
            for (i, c) in host.containers().iter().enumerate() {
                let sleeper = c.ns().spawn("sleeper", &["sleep", "infinity"])?;
                engine.start_container(fake_engine::Container {
                    id: format!("{:0>64}", format!("c6{n}{i}")),
                    name: format!("bench-{}", c.role()),
                    pid: sleeper.pid(),
                    sandbox: c.ns().path(),
                    ip: c.ip(),
                    ip6: Some(host6(net6, 0x11 + i as u16)),
                    mac: c.mac().to_owned(),
                });
                self.sleepers.push(sleeper);
            }
            self.engines.push(engine);
        }
        Ok(())
    }

    fn start_agents(&mut self, opts: &XhostOpts) -> Result<()> {
        let Net::Hosts(topo) = &self.net else {
            return Err(Error::Config("xhost needs the two-host topology".into()));
        };
        if opts.routes > 1 {
            let avoid = [topo.host_a().subnet(), topo.host_b().subnet()];
            let text = scale_config(opts.routes - 1, &avoid)?;
            self.config = Some(TempFile::write("bench-routes.toml", &text)?);
        }
        for (i, (host, peer)) in [
            (topo.host_a(), topo.host_b()),
            (topo.host_b(), topo.host_a()),
        ]
        .into_iter()
        .enumerate()
        {
            let mut extra = Vec::new();
            if let Some(mode) = &opts.xdp_mode {
                extra.extend(["--xdp-mode", mode]);
            }
            if opts.tunnel {
                extra.extend(["--tunnel", "vxlan"]);
            }
            if opts.kernel {
                extra.extend(["--datapath", "kernel"]);
            }
            let config = self.config.as_ref().map(|f| f.path.display().to_string());
            if let Some(path) = &config {
                extra.extend(["--config", path]);
            }
            let args = match self.engines.get(i) {
                // Docker names the bridge and its subnets of both families.
                Some(engine) => {
                    let peer6 = subnet6(2 - i as u8);
                    let mut a: Vec<String> = [
                        "--iface",
                        host.underlay_iface(),
                        "--docker-host",
                        &engine.host(),
                        "--peer",
                        &format!("{}={},{peer6}", peer.underlay_ip(), peer.subnet()),
                    ]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
                    a.extend(extra.iter().map(|s| (*s).to_owned()));
                    a
                }
                None => xhost::load_args(host, peer, &extra),
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let started = Instant::now();
            let role = format!("bench-{}", host.role());
            let agent = match &opts.binary {
                Some(bin) => Agent::start_with(bin, host.ns(), &role, &args)?,
                None => Agent::start(host.ns(), &role, &args)?,
            };
            if self.family == Family::Ipv6 {
                // Ready before Docker's view is in: wait for the containers' IPv6
                // endpoints and the peer's IPv6 route.
                let want: Vec<String> = (0..host.containers().len())
                    .map(|c| host6(subnet6(i as u8 + 1), 0x11 + c as u16).to_string())
                    .collect();
                xhost::wait_status(
                    host.ns(),
                    &agent.dirs,
                    "the containers in ENDPOINTS6 and the peer in ROUTES6",
                    Duration::from_secs(10),
                    |s| {
                        let ips = |field: &str| -> Vec<String> {
                            s[field]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|e| e["ip"].as_str().map(str::to_owned))
                                .collect()
                        };
                        let eps = ips("endpoints6");
                        want.iter().all(|w| eps.contains(w))
                            && s["routes6"].as_array().is_some_and(|r| !r.is_empty())
                    },
                )?;
            }
            self.agents.push(BedAgent {
                agent,
                host: host.role().to_owned(),
                load_time: started.elapsed(),
            });
        }
        Ok(())
    }

    /// Container A's namespace, where the clients run.
    pub fn client(&self) -> &NetNs {
        match &self.net {
            Net::Wire { a, .. } => a,
            Net::Hosts(t) => t.ctr_a().ns(),
        }
    }

    /// Container B's namespace, where the servers run.
    pub fn server(&self) -> &NetNs {
        match &self.net {
            Net::Wire { b, .. } => b,
            Net::Hosts(t) => t.ctr_b().ns(),
        }
    }

    /// Container B's address in the scenario's family.
    pub fn server_ip(&self) -> IpAddr {
        match self.family {
            Family::Ipv4 => CTR_B.into(),
            Family::Ipv6 => CTR_B6.into(),
        }
    }

    /// The running agents (xhost scenarios only).
    pub fn agents(&self) -> &[BedAgent] {
        &self.agents
    }

    /// The host namespaces (none for the wire).
    pub fn host_namespaces(&self) -> Vec<&NetNs> {
        match &self.net {
            Net::Wire { .. } => Vec::new(),
            Net::Hosts(t) => t.hosts().iter().map(|h| h.ns()).collect(),
        }
    }

    /// Fails unless container A gets an echo reply from container B (also resolves the
    /// neighbours before anything is timed).
    pub fn check_path(&self) -> Result<()> {
        cmd::require_tool("ping", "iputils-ping")?;
        let out = self.client().exec(&ping_args(self.server_ip(), 2))?;
        let p = ping_stats(&out);
        if p.any_received() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "no path from container A to {}:\n{}",
                self.server_ip(),
                p.output
            )))
        }
    }
}

/// Two container namespaces and one veth between them, each end with its container's
/// address and a /32 route to the other (no gateway, no bridge, no netfilter rules); with
/// `v6`, also each one's IPv6 address and a /128 route to the other's.
fn build_wire(v6: bool) -> Result<Net> {
    let a = NetNs::new("wire-a")?;
    let b = NetNs::new("wire-b")?;
    a.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        b.name(),
    ])?;
    for (ns, me, other) in [(&a, CTR_A, CTR_B), (&b, CTR_B, CTR_A)] {
        ns.ip_batch(&format!(
            "link set lo up\n\
             addr add {me}/24 dev eth0\n\
             link set eth0 up\n\
             route add {other}/32 dev eth0\n"
        ))?;
    }
    if v6 {
        for (ns, me, other) in [(&a, CTR_A6, CTR_B6), (&b, CTR_B6, CTR_A6)] {
            ns.ip_batch(&format!(
                "addr add {me}/128 dev eth0 nodad\n\
                 route add {other}/128 dev eth0\n"
            ))?;
        }
    }
    Ok(Net::Wire { a, b })
}

/// `iptables -w args...` inside `ns`.
fn iptables(ns: &NetNs, args: &[&str]) -> Result<()> {
    let mut all = vec!["iptables", "-w"];
    all.extend_from_slice(args);
    ns.try_run(&all).map(drop)
}

/// The by-hand recipe's rules on one host: no MASQUERADE between container subnets, and
/// FORWARD accepts both ways in DOCKER-USER (Docker's FORWARD policy is DROP).
fn exempt_and_accept(ns: &NetNs, local: &str, remote: &str) -> Result<()> {
    iptables(
        ns,
        &[
            "-t",
            "nat",
            "-I",
            "POSTROUTING",
            "-s",
            local,
            "-d",
            remote,
            "-j",
            "RETURN",
        ],
    )?;
    for (s, d) in [(local, remote), (remote, local)] {
        iptables(ns, &["-I", "DOCKER-USER", "-s", s, "-d", d, "-j", "ACCEPT"])?;
    }
    Ok(())
}

/// Static route per remote subnet via the peer host, plus [`exempt_and_accept`].
fn apply_iptables_routes(topo: &Topology) -> Result<()> {
    for (host, peer) in [
        (topo.host_a(), topo.host_b()),
        (topo.host_b(), topo.host_a()),
    ] {
        let (local, remote) = (host.subnet().to_string(), peer.subnet().to_string());
        host.ns().ip(&[
            "route",
            "add",
            &remote,
            "via",
            &peer.underlay_ip().to_string(),
        ])?;
        exempt_and_accept(host.ns(), &local, &remote)?;
    }
    Ok(())
}

/// Address `host` of IPv6 subnet `net`.
fn host6(net: ipnet::Ipv6Net, host: u16) -> Ipv6Addr {
    (u128::from(net.network()) | u128::from(host)).into()
}

/// Dual-stack hosts as Docker's `--ipv6` networks make them: each bridge and container
/// gets its address in the host's [`subnet6`] (without duplicate address detection, so
/// they are usable at once), each container a default route via its bridge, and each
/// host IPv6 forwarding.
fn add_ipv6(topo: &Topology) -> Result<()> {
    for (n, host) in [(1u8, topo.host_a()), (2, topo.host_b())] {
        let net = subnet6(n);
        host.ns().sysctl("net.ipv6.conf.all.forwarding", "1")?;
        host.ns().ip_batch(&format!(
            "addr add {}/64 dev {} nodad\n",
            host6(net, 1),
            host.bridge()
        ))?;
        for (i, c) in host.containers().iter().enumerate() {
            c.ns().ip_batch(&format!(
                "addr add {}/64 dev {} nodad\n\
                 route add default via {}\n",
                host6(net, 0x11 + i as u16),
                c.iface(),
                host6(net, 1)
            ))?;
        }
    }
    Ok(())
}

/// `ip6tables -w args...` inside `ns`.
fn ip6tables(ns: &NetNs, args: &[&str]) -> Result<()> {
    let mut all = vec!["ip6tables", "-w"];
    all.extend_from_slice(args);
    ns.try_run(&all).map(drop)
}

/// The by-hand recipe for IPv6, [`apply_iptables_routes`]'s twin: an IPv6 underlay
/// address per host and a static route per remote subnet via the peer's, and Docker's
/// IPv6 filter as Docker 27 writes it with `ip6tables` on (FORWARD policy DROP, the
/// `DOCKER-USER` jump, established flows accepted by conntrack) with the recipe's accepts
/// in `DOCKER-USER`. No NAT exemption: Docker does not masquerade IPv6 subnets by default.
fn apply_ip6_routes(topo: &Topology) -> Result<()> {
    for (n, host, peer_n) in [(1u8, topo.host_a(), 2u8), (2, topo.host_b(), 1)] {
        let ns = host.ns();
        ns.ip_batch(&format!(
            "addr add {}/64 dev {} nodad\n\
             route add {} via {}\n",
            underlay6(n),
            host.underlay_iface(),
            subnet6(peer_n),
            underlay6(peer_n)
        ))?;
        let (local, remote) = (subnet6(n).to_string(), subnet6(peer_n).to_string());
        let bridge = host.bridge();
        ip6tables(ns, &["-N", "DOCKER-USER"])?;
        ip6tables(ns, &["-P", "FORWARD", "DROP"])?;
        ip6tables(ns, &["-A", "FORWARD", "-j", "DOCKER-USER"])?;
        ip6tables(
            ns,
            &[
                "-A",
                "FORWARD",
                "-o",
                bridge,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
        )?;
        ip6tables(
            ns,
            &[
                "-A", "FORWARD", "-i", bridge, "!", "-o", bridge, "-j", "ACCEPT",
            ],
        )?;
        for (s, d) in [(&local, &remote), (&remote, &local)] {
            ip6tables(ns, &["-I", "DOCKER-USER", "-s", s, "-d", d, "-j", "ACCEPT"])?;
        }
    }
    Ok(())
}

/// Address of host `n` (1 or 2) on the VXLAN overlay.
fn vxlan_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, 0, n)
}

/// MAC of host `n`'s `vxlan0` (locally administered, fixed so FDB and neighbour entries can
/// be written before the peer exists, as flannel does from its node annotations).
fn vxlan_mac(n: u8) -> String {
    format!("02:00:0a:2a:00:{n:02x}")
}

/// flannel's vxlan backend by hand: `vxlan0` per host with a static FDB entry and a
/// permanent neighbour for the peer's VTEP, a route `onlink` via the peer's overlay address,
/// MTU 1450 on the overlay and on every container-side link, and the recipe's NAT exemption
/// and FORWARD accepts.
fn apply_kernel_vxlan(topo: &Topology) -> Result<()> {
    let mtu = VXLAN_MTU;
    for (n, host, peer, peer_n) in [
        (1u8, topo.host_a(), topo.host_b(), 2u8),
        (2u8, topo.host_b(), topo.host_a(), 1u8),
    ] {
        let ns = host.ns();
        let (me, peer_vtep, peer_mac) = (vxlan_ip(n), vxlan_ip(peer_n), vxlan_mac(peer_n));
        let script = format!(
            "link add vxlan0 type vxlan id 42 dstport 4789 local {} dev {} nolearning\n\
             link set vxlan0 address {}\n\
             link set vxlan0 mtu {mtu}\n\
             addr add {me}/24 dev vxlan0\n\
             link set vxlan0 up\n\
             neigh replace {peer_vtep} lladdr {peer_mac} dev vxlan0 nud permanent\n\
             route add {} via {peer_vtep} dev vxlan0 onlink\n",
            host.underlay_ip(),
            host.underlay_iface(),
            vxlan_mac(n),
            peer.subnet(),
        );
        ns.ip_batch(&script)?;
        set_container_mtu(host, mtu)?;
        ns.try_run(&[
            "bridge",
            "fdb",
            "append",
            &peer_mac,
            "dst",
            &peer.underlay_ip().to_string(),
            "dev",
            "vxlan0",
        ])?;
        exempt_and_accept(ns, &host.subnet().to_string(), &peer.subnet().to_string())?;
    }
    Ok(())
}

/// `mtu` on every container-side link of `host`: its bridge, the host ends of the container
/// veths and the containers' eth0 (Docker's `mtu` setting).
fn set_container_mtu(host: &crate::Host, mtu: u32) -> Result<()> {
    let mut script = format!("link set {} mtu {mtu}\n", host.bridge());
    for c in host.containers() {
        let _ = writeln!(script, "link set {} mtu {mtu}", c.host_veth());
    }
    host.ns().ip_batch(&script)?;
    for c in host.containers() {
        c.ns()
            .ip(&["link", "set", c.iface(), "mtu", &mtu.to_string()])?;
    }
    Ok(())
}

/// The extra routes of the scale benchmark as an xhost config file: `extra` subnets that
/// overlap none of `avoid`, spread over [`EXTRA_PEERS`] peer hosts in the underlay /24.
///
/// The first ones are the /24 neighbours of the container subnets in 192.168.0.0/16, so the
/// LPM trie is dense around the measured destination rather than far away from it; the rest
/// are /25s carved from 10.0.0.0/8 (131 072 of them, enough for the 100 000-route case).
pub fn scale_config(extra: u32, avoid: &[Ipv4Net]) -> Result<String> {
    let subnets = scale_subnets(extra, avoid)?;
    let per_peer = subnets.len().div_ceil(EXTRA_PEERS as usize).max(1);
    let mut out = String::from("# Extra routes for the xhost scale benchmark.\n");
    for (i, chunk) in subnets.chunks(per_peer).enumerate() {
        let host = Ipv4Addr::new(172, 16, 91, EXTRA_PEER_BASE + i as u8);
        let list: Vec<String> = chunk.iter().map(|n| format!("\"{n}\"")).collect();
        let _ = write!(
            out,
            "\n[[peer]]\nhost = \"{host}\"\nsubnets = [{}]\n",
            list.join(", ")
        );
    }
    Ok(out)
}

/// The subnets of [`scale_config`], in order: also what the per-program cost benchmark
/// fills `ROUTES` with, so both measure the same trie.
pub fn scale_subnets(extra: u32, avoid: &[Ipv4Net]) -> Result<Vec<Ipv4Net>> {
    let overlaps = |n: &Ipv4Net| {
        avoid
            .iter()
            .any(|a| a.contains(&n.addr()) || n.contains(&a.addr()))
    };
    let near = (0..=255u8).map(|x| Ipv4Net::new_assert(Ipv4Addr::new(192, 168, x, 0), 24));
    let far =
        (0..(1u32 << 17)).map(|i| Ipv4Net::new_assert(Ipv4Addr::from((10 << 24) | (i << 7)), 25));
    let out: Vec<Ipv4Net> = near
        .chain(far)
        .filter(|n| !overlaps(n))
        .take(extra as usize)
        .collect();
    if out.len() < extra as usize {
        return Err(Error::Config(format!(
            "only {} extra routes available, {extra} requested",
            out.len()
        )));
    }
    Ok(out)
}

/// A file in the temp directory removed on drop.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn write(name: &str, text: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("xh-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, text).map_err(|source| Error::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
        Ok(Self { path })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

// ---------------------------------------------------------------------------------------
// Measurements

/// iperf3 TCP result (client's JSON, receiver side).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TcpSample {
    pub bits_per_second: f64,
    /// The sender's rate in each of iperf3's [`TCP_INTERVAL_S`] intervals (shorter ones,
    /// such as a tail cut by the timer, left out).
    pub intervals_bps: Vec<f64>,
    /// Median of `intervals_bps`: the rate the stream held, apart from slumps that stall
    /// single-stream TCP for part of a second on any path of this machine.
    pub steady_bits_per_second: Option<f64>,
    pub retransmits: Option<u64>,
    /// iperf3's CPU figures (sender, receiver), % of one CPU.
    pub sender_cpu_pct: Option<f64>,
    pub receiver_cpu_pct: Option<f64>,
}

/// iperf3 UDP result, receiver side: `packets` is what the receiver expected (from sequence
/// numbers), `lost` what never arrived.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UdpSample {
    pub packets: u64,
    pub lost: u64,
    pub seconds: f64,
    /// Delivered packets per second: `(packets - lost) / seconds`.
    pub pps: f64,
    /// iperf3's own CPU figures: sender (`host_total`) and receiver (`remote_total`), in %
    /// of one CPU. A sender near 100 % means the sender, not the path, set the rate.
    pub sender_cpu_pct: Option<f64>,
    pub receiver_cpu_pct: Option<f64>,
}

/// sockperf ping-pong result, in microseconds; sockperf's latency is half the round trip.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LatencySample {
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub observations: u64,
}

/// Port of the iperf3 servers (inside container B's namespace).
const IPERF_PORT: u16 = 5201;
/// Port of the sockperf server.
const SOCKPERF_PORT: u16 = 11111;
/// Slack on top of a test's duration before its client is killed.
const CLIENT_SLACK: Duration = Duration::from_secs(15);

/// CPU placement of the traffic tools: the sender/client on `client`, the receiver/server
/// on `server`. `None` leaves placement to the scheduler (a one-CPU machine).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cpus {
    pub client: Option<usize>,
    pub server: Option<usize>,
}

impl Cpus {
    /// Client on CPU 0, server on CPU 1 when there are two or more; else unpinned.
    pub fn split() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if n >= 2 {
            Self {
                client: Some(0),
                server: Some(1),
            }
        } else {
            Self {
                client: None,
                server: None,
            }
        }
    }

    /// Both on the last CPU.
    pub fn same() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            client: Some(n - 1),
            server: Some(n - 1),
        }
    }
}

/// `taskset -c CPU args...`, or `args` unchanged.
fn pinned(cpu: Option<usize>, args: &[&str]) -> Vec<String> {
    let mut all = Vec::new();
    if let Some(cpu) = cpu {
        all.extend(["taskset".to_owned(), "-c".to_owned(), cpu.to_string()]);
    }
    all.extend(args.iter().map(|s| (*s).to_owned()));
    all
}

/// How the latency test's two ends wait for packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyMode {
    /// Blocking sockets, both ends on one CPU: every exchange runs the whole path on that
    /// CPU with local wakeups. Stable on a small VM: no cross-CPU wakeup IPIs (which cost
    /// ~20 us when the other vCPU is halted) and no busy loop starving ksoftirqd.
    Pinned,
    /// `--nonblocked --timeout 0` on both ends (busy polling), client and server on
    /// different CPUs: the method the latency targets ask for, and the lowest latency. It needs both
    /// CPUs of a 2-vCPU VM: if softirq work is deferred to ksoftirqd, the spinning
    /// process keeps it off the CPU until the next scheduler tick (~4 ms at HZ=250), so
    /// the p50 is kept next to the mean to show such a run.
    BusyPoll,
}

/// Seconds per iperf3 report interval in the TCP test.
pub const TCP_INTERVAL_S: f64 = 0.5;

/// Single-stream TCP throughput from `client` to `ip` (a server in `server`).
pub fn iperf3_tcp(
    client: &NetNs,
    server: &NetNs,
    ip: IpAddr,
    secs: u32,
    cpus: Cpus,
) -> Result<TcpSample> {
    let _srv = iperf3_server(server, ip, cpus.server)?;
    let interval = TCP_INTERVAL_S.to_string();
    let out = run_client(
        client,
        &iperf3_client_args(ip, secs, cpus.client, &["-i", &interval]),
        Duration::from_secs(secs.into()) + CLIENT_SLACK,
    )?;
    parse_iperf3_tcp(&out)
}

/// 64-byte UDP datagrams as fast as one iperf3 sender can (`-b 0`).
pub fn iperf3_udp(
    client: &NetNs,
    server: &NetNs,
    ip: IpAddr,
    secs: u32,
    cpus: Cpus,
) -> Result<UdpSample> {
    let _srv = iperf3_server(server, ip, cpus.server)?;
    let out = run_client(
        client,
        &iperf3_client_args(ip, secs, cpus.client, &["-u", "-l", "64", "-b", "0"]),
        Duration::from_secs(secs.into()) + CLIENT_SLACK,
    )?;
    parse_iperf3_udp(&out)
}

/// UDP ping-pong latency with 64-byte messages (see [`LatencyMode`]).
pub fn sockperf_ping_pong(
    client: &NetNs,
    server: &NetNs,
    ip: IpAddr,
    secs: u32,
    mode: LatencyMode,
) -> Result<LatencySample> {
    cmd::require_tool("sockperf", "sockperf")?;
    cmd::require_tool("taskset", "util-linux")?;
    if ip.is_ipv6() {
        sockperf_ipv6()?;
    }
    let (ip_s, port, secs_s) = (ip.to_string(), SOCKPERF_PORT.to_string(), secs.to_string());
    let (cpus, busy): (Cpus, &[&str]) = match mode {
        LatencyMode::Pinned => (Cpus::same(), &[]),
        LatencyMode::BusyPoll => (Cpus::split(), &["--nonblocked", "--timeout", "0"]),
    };
    let mut srv_args = vec!["sockperf", "server", "-i", &ip_s, "-p", &port];
    srv_args.extend_from_slice(busy);
    let mut srv = server.spawn("sockperf-server", &pinned(cpus.server, &srv_args))?;
    srv.set_grace(Duration::from_secs(2));
    wait_listening(server, &mut srv, "udp", SOCKPERF_PORT)?;
    let mut args = vec![
        "sockperf",
        "ping-pong",
        "-i",
        &ip_s,
        "-p",
        &port,
        "-t",
        &secs_s,
        "-m",
        "64",
    ];
    args.extend_from_slice(busy);
    let out = run_client(
        client,
        &pinned(cpus.client, &args),
        Duration::from_secs(secs.into()) + CLIENT_SLACK,
    )?;
    parse_sockperf(&out)
}

/// Fails unless the installed sockperf takes IPv6 addresses (3.8 and later; 3.7 prints
/// its usage for one).
fn sockperf_ipv6() -> Result<()> {
    let out = cmd::output(Command::new("sockperf").arg("--version"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text
        .split_once("version ")
        .map(|(_, v)| {
            v.split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .next()
                .unwrap_or("")
        })
        .unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= (3, 8) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "sockperf {version} has no IPv6 (3.8 and later have): no IPv6 latency"
        )))
    }
}

fn iperf3_client_args(ip: IpAddr, secs: u32, cpu: Option<usize>, extra: &[&str]) -> Vec<String> {
    let (ip, port, secs) = (ip.to_string(), IPERF_PORT.to_string(), secs.to_string());
    let mut args = vec![
        "iperf3",
        "-c",
        &ip,
        "-p",
        &port,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    let cpu = cpu.map(|c| c.to_string());
    if let Some(cpu) = &cpu {
        args.extend(["-A", cpu]);
    }
    args.extend_from_slice(extra);
    args.into_iter().map(str::to_owned).collect()
}

/// `iperf3 -s -1` bound to `ip` in `ns`, up and listening; stopped by pid when dropped.
fn iperf3_server(ns: &NetNs, ip: IpAddr, cpu: Option<usize>) -> Result<Process> {
    cmd::require_tool("iperf3", "iperf3")?;
    let (ip, port) = (ip.to_string(), IPERF_PORT.to_string());
    let mut args = vec![
        "iperf3",
        "-s",
        "-1",
        "-p",
        &port,
        "-B",
        &ip,
        "--idle-timeout",
        "60",
    ];
    let cpu = cpu.map(|c| c.to_string());
    if let Some(cpu) = &cpu {
        args.extend(["-A", cpu]);
    }
    let mut p = ns.spawn("iperf3-server", &args)?;
    p.set_grace(Duration::from_secs(2));
    wait_listening(ns, &mut p, "tcp", IPERF_PORT)?;
    Ok(p)
}

/// Polls `ss` in `ns` until something listens on `port` (TCP) or is bound to it (UDP).
fn wait_listening(ns: &NetNs, server: &mut Process, proto: &str, port: u16) -> Result<()> {
    let flags = if proto == "udp" { "-Hlun" } else { "-Hltn" };
    let filter = format!(":{port}");
    let timeout = Duration::from_secs(5);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = server.try_wait()? {
            return Err(Error::Exited {
                label: server.label().to_owned(),
                what: format!("listening on {proto} port {port}"),
                status: Some(status),
                output: server.output(),
            });
        }
        let out = ns.exec(&["ss", flags, "sport", "=", &filter])?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("{} to listen on {proto} port {port}", server.label()),
                after: timeout,
                output: server.output(),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a client to completion inside `ns` under coreutils `timeout` (SIGTERM at `limit`,
/// SIGKILL 2 s later) and returns its stdout; fails with the whole output otherwise.
/// `--foreground` keeps the client in our process group, so a Ctrl-C reaches it too.
fn run_client(ns: &NetNs, args: &[String], limit: Duration) -> Result<String> {
    let mut all = vec![
        "timeout".to_owned(),
        "--foreground".to_owned(),
        "-k".to_owned(),
        "2".to_owned(),
        limit.as_secs().to_string(),
    ];
    all.extend_from_slice(args);
    let mut c = ns.command(&all);
    let out = cmd::output(&mut c)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(Error::Command {
            cmd: cmd::display(&c),
            status: out.status,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(stdout)
}

fn json_f64(v: &serde_json::Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn json_u64(v: &serde_json::Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_u64()
}

fn parse_json(what: &'static str, text: &str) -> Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| Error::Parse {
        what,
        input: text.to_owned(),
    })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(Error::Parse {
            what,
            input: format!("iperf3 error: {e}"),
        });
    }
    Ok(v)
}

/// Median of the values (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// Receiver-side throughput from `iperf3 -c ... -J` (TCP), and the sender's per-interval
/// rates.
pub fn parse_iperf3_tcp(text: &str) -> Result<TcpSample> {
    let v = parse_json("iperf3 TCP JSON", text)?;
    let bits_per_second =
        json_f64(&v, &["end", "sum_received", "bits_per_second"]).ok_or_else(|| Error::Parse {
            what: "end.sum_received.bits_per_second",
            input: text.to_owned(),
        })?;
    let intervals_bps: Vec<f64> = v
        .get("intervals")
        .and_then(|i| i.as_array())
        .into_iter()
        .flatten()
        .filter(|i| json_f64(i, &["sum", "seconds"]).is_some_and(|s| s >= TCP_INTERVAL_S / 2.0))
        .filter_map(|i| json_f64(i, &["sum", "bits_per_second"]))
        .collect();
    Ok(TcpSample {
        bits_per_second,
        steady_bits_per_second: median(&intervals_bps),
        intervals_bps,
        retransmits: json_u64(&v, &["end", "sum_sent", "retransmits"]),
        sender_cpu_pct: json_f64(&v, &["end", "cpu_utilization_percent", "host_total"]),
        receiver_cpu_pct: json_f64(&v, &["end", "cpu_utilization_percent", "remote_total"]),
    })
}

/// Receiver-side packet counts from `iperf3 -c ... -u -J`: `end.sum_received` (iperf3 >=
/// 3.10), else `end.sum`, which older versions fill from the receiver's report.
pub fn parse_iperf3_udp(text: &str) -> Result<UdpSample> {
    let v = parse_json("iperf3 UDP JSON", text)?;
    let end = v.get("end").ok_or_else(|| Error::Parse {
        what: "iperf3 UDP end section",
        input: text.to_owned(),
    })?;
    let sum = end
        .get("sum_received")
        .or_else(|| end.get("sum"))
        .ok_or_else(|| Error::Parse {
            what: "end.sum_received",
            input: text.to_owned(),
        })?;
    let field = |k: &'static str| {
        sum.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| Error::Parse {
                what: k,
                input: text.to_owned(),
            })
    };
    let (packets, lost, seconds) = (field("packets")?, field("lost_packets")?, field("seconds")?);
    if seconds <= 0.0 || lost > packets {
        return Err(Error::Parse {
            what: "consistent UDP counts",
            input: text.to_owned(),
        });
    }
    Ok(UdpSample {
        packets: packets as u64,
        lost: lost as u64,
        seconds,
        pps: (packets - lost) / seconds,
        sender_cpu_pct: json_f64(end, &["cpu_utilization_percent", "host_total"]),
        receiver_cpu_pct: json_f64(end, &["cpu_utilization_percent", "remote_total"]),
    })
}

/// Removes ANSI colour sequences (`ESC [ ... m`), which sockperf prints even into a pipe.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip to the final byte of the CSI sequence (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Mean (`avg-latency=`), 99th percentile and observation count from `sockperf ping-pong`.
pub fn parse_sockperf(text: &str) -> Result<LatencySample> {
    let clean = strip_ansi(text);
    let bad = |what| Error::Parse {
        what,
        input: clean.clone(),
    };
    let number = |s: &str| -> Option<f64> {
        let s = s.trim_start();
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        s[..end].parse().ok()
    };
    let mean_us = clean
        .split_once("avg-latency=")
        .and_then(|(_, rest)| number(rest))
        .ok_or_else(|| bad("sockperf avg-latency"))?;
    let percentile = |p: &str| {
        clean
            .lines()
            .find(|l| l.contains(&format!("percentile {p}")))
            .and_then(|l| l.split_once('='))
            .and_then(|(_, rest)| number(rest))
    };
    let p99_us = percentile("99.000").ok_or_else(|| bad("sockperf percentile 99.000"))?;
    let p50_us = percentile("50.000").ok_or_else(|| bad("sockperf percentile 50.000"))?;
    // `Total 307183 observations; ...` (not `[Total Run] ...`).
    let observations = clean
        .lines()
        .filter_map(|l| {
            l.split_once("Total ")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .next()
        .ok_or_else(|| bad("sockperf observation count"))?;
    Ok(LatencySample {
        mean_us,
        p50_us,
        p99_us,
        observations,
    })
}

/// Machine-wide CPU time from the first line of `/proc/stat`, in USER_HZ ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuTicks {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

/// `/proc/stat` counts in USER_HZ, which the kernel ABI fixes at 100 on every architecture
/// Linux exports it on.
pub const USER_HZ: f64 = 100.0;

impl CpuTicks {
    pub fn read() -> Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").map_err(|source| Error::Io {
            what: "reading /proc/stat".into(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The aggregate and each CPU's ticks (`cpu0`, `cpu1`, ... in order).
    pub fn read_per_cpu() -> Result<(Self, Vec<Self>)> {
        let text = std::fs::read_to_string("/proc/stat").map_err(|source| Error::Io {
            what: "reading /proc/stat".into(),
            source,
        })?;
        let all = Self::parse(&text)?;
        let mut cpus = Vec::new();
        while let Ok(c) = Self::parse_line(&text, &format!("cpu{} ", cpus.len())) {
            cpus.push(c);
        }
        Ok((all, cpus))
    }

    /// Parses the aggregate `cpu ` line.
    pub fn parse(text: &str) -> Result<Self> {
        Self::parse_line(text, "cpu ")
    }

    fn parse_line(text: &str, prefix: &str) -> Result<Self> {
        let bad = || Error::Parse {
            what: "/proc/stat cpu line",
            input: text.lines().next().unwrap_or_default().to_owned(),
        };
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .ok_or_else(bad)?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        if v.len() < 8 {
            return Err(bad());
        }
        Ok(Self {
            user: v[0],
            nice: v[1],
            system: v[2],
            idle: v[3],
            iowait: v[4],
            irq: v[5],
            softirq: v[6],
            steal: v[7],
        })
    }

    /// Ticks spent running something (not idle, iowait or stolen).
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }

    pub fn total(&self) -> u64 {
        self.busy() + self.idle + self.iowait + self.steal
    }

    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    /// Fraction of the machine's CPU time that was busy (for a delta).
    pub fn busy_fraction(&self) -> f64 {
        match self.total() {
            0 => 0.0,
            t => self.busy() as f64 / t as f64,
        }
    }
}

/// Function-call IPIs each CPU has taken (the `CAL` row of `/proc/interrupts`, `CPU0`
/// first). A task woken from another CPU while its own CPU sleeps costs the waker one:
/// on a guest whose idle CPUs halt (this VM's `haltpoll` with no polling), each is an
/// exit to the hypervisor on the waker's CPU, which runs the whole packet path here.
pub fn call_ipis() -> Result<Vec<u64>> {
    let text = std::fs::read_to_string("/proc/interrupts").map_err(|source| Error::Io {
        what: "reading /proc/interrupts".into(),
        source,
    })?;
    parse_call_ipis(&text)
}

fn parse_call_ipis(text: &str) -> Result<Vec<u64>> {
    let bad = || Error::Parse {
        what: "/proc/interrupts CAL row",
        input: text.lines().next().unwrap_or_default().to_owned(),
    };
    let ncpus = text
        .lines()
        .next()
        .ok_or_else(bad)?
        .split_whitespace()
        .count();
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("CAL:"))
        .ok_or_else(bad)?;
    let counts: Vec<u64> = row
        .split_whitespace()
        .skip(1)
        .take(ncpus)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    if ncpus == 0 || counts.len() != ncpus {
        return Err(bad());
    }
    Ok(counts)
}

/// Waits, at most `max`, until the machine is mostly idle (busy below `threshold` over a
/// 300 ms window): background work such as the kernel tearing down the previous scenario's
/// namespaces should not be measured with the next one. Returns the last window's busy
/// fraction.
pub fn wait_quiet(threshold: f64, max: Duration) -> Result<f64> {
    let deadline = Instant::now() + max;
    loop {
        let before = CpuTicks::read()?;
        thread::sleep(Duration::from_millis(300));
        let busy = CpuTicks::read()?.since(&before).busy_fraction();
        if busy < threshold || Instant::now() >= deadline {
            return Ok(busy);
        }
    }
}

/// `VmRSS` and `VmHWM` (peak) of `pid` in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        what: format!("reading {path}"),
        source,
    })?;
    parse_rss(&text).ok_or(Error::Parse {
        what: "VmRSS/VmHWM",
        input: text,
    })
}

fn parse_rss(status: &str) -> Option<(u64, u64)> {
    let kb = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    };
    Some((kb("VmRSS:")? * 1024, kb("VmHWM:")? * 1024))
}

/// Number of kernel routes with protocol `proto` in `ns`'s main table (xhost marks its own
/// with 177), to check that a scale scenario really has its routes.
pub fn count_routes(ns: &NetNs, proto: u8) -> Result<usize> {
    let out = ns.ip(&["route", "show", "proto", &proto.to_string()])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// Version line of a tool (`iperf3 --version`, `sockperf --version`), for the results file.
pub fn tool_version(tool: &str) -> Option<String> {
    let out = Command::new(tool).arg("--version").output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| strip_ansi(l).trim().to_owned())
        .find(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from a real `iperf3 -c 192.168.220.11 -t 2 -J` (iperf 3.12) over the wire;
    /// the intervals are in `-i 0.5`'s form, their rates made up to hold a slump.
    const IPERF_TCP: &str = r#"{
        "start": {"version": "iperf 3.12"},
        "intervals": [
            {"streams": [], "sum": {"start": 0, "end": 0.5, "seconds": 0.5,
                                    "bytes": 1062500000, "bits_per_second": 17000000000,
                                    "retransmits": 0, "omitted": false, "sender": true}},
            {"streams": [], "sum": {"start": 0.5, "end": 1.0, "seconds": 0.5,
                                    "bytes": 562500000, "bits_per_second": 9000000000,
                                    "retransmits": 0, "omitted": false, "sender": true}},
            {"streams": [], "sum": {"start": 1.0, "end": 1.5, "seconds": 0.5,
                                    "bytes": 1000000000, "bits_per_second": 16000000000,
                                    "retransmits": 0, "omitted": false, "sender": true}},
            {"streams": [], "sum": {"start": 1.5, "end": 2.0, "seconds": 0.5,
                                    "bytes": 1125000000, "bits_per_second": 18000000000,
                                    "retransmits": 0, "omitted": false, "sender": true}},
            {"streams": [], "sum": {"start": 2.0, "end": 2.000094, "seconds": 0.000094,
                                    "bytes": 12000, "bits_per_second": 1021276595,
                                    "retransmits": 0, "omitted": false, "sender": true}}
        ],
        "end": {
            "streams": [],
            "sum_sent": {"start": 0, "end": 2.000094, "seconds": 2.000094,
                         "bytes": 4001366016, "bits_per_second": 16004710236.3, "retransmits": 0,
                         "sender": true},
            "sum_received": {"start": 0, "end": 2.000241, "seconds": 2.000241,
                             "bytes": 4001366016, "bits_per_second": 16004697984.75272,
                             "sender": true},
            "cpu_utilization_percent": {"host_total": 55.1, "remote_total": 61.2}
        }
    }"#;

    /// Trimmed from a real `iperf3 -c ... -u -l 64 -b 0 -t 2 -J` (iperf 3.12).
    const IPERF_UDP: &str = r#"{
        "end": {
            "sum": {"start": 0, "end": 2.00012, "seconds": 2.00012, "bytes": 66392960,
                    "bits_per_second": 265569981.0101329, "jitter_ms": 0.0014,
                    "lost_packets": 41396, "packets": 1037390, "lost_percent": 3.99,
                    "sender": true},
            "sum_sent": {"start": 0, "end": 2.000014, "seconds": 2.000014, "bytes": 66392960,
                         "bits_per_second": 265569981.0101329, "jitter_ms": 0,
                         "lost_packets": 0, "packets": 1037390, "lost_percent": 0,
                         "sender": true},
            "sum_received": {"start": 0, "end": 2.00012, "seconds": 2.00012, "bytes": 63743552,
                             "bits_per_second": 254958910.4653721, "jitter_ms": 0.0014,
                             "lost_packets": 41396, "packets": 1037389, "lost_percent": 3.99,
                             "sender": false},
            "cpu_utilization_percent": {"host_total": 99.6841112824112, "host_user": 14.3,
                                        "host_system": 85.3, "remote_total": 84.27679842330012}
        }
    }"#;

    /// A real `sockperf ping-pong` run (sockperf 3.7), colour codes included.
    const SOCKPERF: &str = "\
sockperf: \x1b[2;35m== version #3.7-no.git == \x1b[0m
sockperf[CLIENT] send on:sockperf: using recvfrom() to block on socket(s)

[ 0] IP = 192.168.220.11  PORT = 11111 # UDP
sockperf: Warmup stage (sending a few dummy messages)...
sockperf: Starting test...
sockperf: Test end (interrupted by timer)
sockperf: Test ended
sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=398218; ReceivedMessages=398217
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=307183; ReceivedMessages=307183
sockperf: \x1b[2;35m====> avg-latency=2.509 (std-dev=10.900)\x1b[0m
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Latency is 2.509 usec
sockperf: \x1b[2;35mTotal 307183 observations\x1b[0m; each percentile contains 3071.83 observations
sockperf: ---> <MAX> observation = 4059.845
sockperf: ---> percentile 99.999 = 1911.632
sockperf: ---> percentile 99.990 =   42.349
sockperf: ---> percentile 99.900 =   19.900
sockperf: ---> percentile 99.000 =    5.486
sockperf: ---> percentile 90.000 =    2.751
sockperf: ---> percentile 50.000 =    2.336
sockperf: ---> <MIN> observation =    1.714
";

    #[test]
    fn parses_iperf3_tcp() {
        let s = parse_iperf3_tcp(IPERF_TCP).expect("parse");
        assert!((s.bits_per_second - 16_004_697_984.752_72).abs() < 1e-3);
        assert_eq!(s.retransmits, Some(0));
        // The timer's 94 us tail is not an interval; the 9 Gbit/s slump is outvoted.
        assert_eq!(s.intervals_bps, [17e9, 9e9, 16e9, 18e9]);
        assert_eq!(s.steady_bits_per_second, Some(16.5e9));
        assert_eq!(
            (s.sender_cpu_pct, s.receiver_cpu_pct),
            (Some(55.1), Some(61.2))
        );
        let no_intervals = IPERF_TCP.replace("\"intervals\"", "\"x_intervals\"");
        let s = parse_iperf3_tcp(&no_intervals).expect("parse without intervals");
        assert!(s.intervals_bps.is_empty() && s.steady_bits_per_second.is_none());
        let err = parse_iperf3_tcp(r#"{"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}"#)
            .expect_err("iperf3 error");
        assert!(err.to_string().contains("Connection refused"), "{err}");
        assert!(parse_iperf3_tcp("not json").is_err());
    }

    #[test]
    fn parses_iperf3_udp_receiver_side() {
        let s = parse_iperf3_udp(IPERF_UDP).expect("parse");
        assert_eq!((s.packets, s.lost), (1_037_389, 41_396));
        assert!((s.pps - (1_037_389.0 - 41_396.0) / 2.00012).abs() < 1e-6);
        assert_eq!(s.sender_cpu_pct, Some(99.6841112824112));
        assert_eq!(s.receiver_cpu_pct, Some(84.27679842330012));
        // Older iperf3: only `sum`, filled from the receiver's report.
        let old = r#"{"end": {"sum": {"seconds": 2.0, "packets": 1000, "lost_packets": 100}}}"#;
        assert_eq!(parse_iperf3_udp(old).expect("old format").pps, 450.0);
        let bad = r#"{"end": {"sum": {"seconds": 2.0, "packets": 10, "lost_packets": 100}}}"#;
        assert!(parse_iperf3_udp(bad).is_err());
    }

    #[test]
    fn parses_sockperf() {
        let s = parse_sockperf(SOCKPERF).expect("parse");
        assert_eq!(s.mean_us, 2.509);
        assert_eq!(s.p99_us, 5.486);
        assert_eq!(s.p50_us, 2.336);
        assert_eq!(s.observations, 307_183);
        assert!(parse_sockperf("sockperf: ERROR: no reply").is_err());
    }

    #[test]
    fn parses_proc_stat_and_status() {
        let stat = "cpu  141013 0 17538 139153 2864 0 669 330 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        let t = CpuTicks::parse(stat).expect("parse");
        assert_eq!(t.softirq, 669);
        assert_eq!(t.busy(), 141_013 + 17_538 + 669);
        let later = CpuTicks {
            softirq: 700,
            idle: 139_253,
            ..t
        };
        let d = later.since(&t);
        assert_eq!((d.softirq, d.idle, d.total()), (31, 100, 131));
        assert!(CpuTicks::parse("intr 1 2 3").is_err());
        assert_eq!(
            CpuTicks::parse_line(stat, "cpu0 ").map(|c| c.softirq).ok(),
            Some(7)
        );
        assert!(CpuTicks::parse_line(stat, "cpu1 ").is_err());

        let irqs = "           CPU0       CPU1       \n 24:          1          0  IO-APIC   5-edge      ACPI:Ged\n\
                    RES:    2454714    2777286   Rescheduling interrupts\n\
                    CAL:    9569080  175512669   Function call interrupts\n";
        assert_eq!(
            parse_call_ipis(irqs).ok(),
            Some(vec![9_569_080, 175_512_669])
        );
        assert!(parse_call_ipis("           CPU0       CPU1\nRES: 1 2\n").is_err());
        assert!(parse_call_ipis("           CPU0       CPU1\nCAL: 1 Function\n").is_err());

        let status = "Name:\txhost-user\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_rss(status), Some((10_240 * 1024, 20_480 * 1024)));
        assert_eq!(parse_rss("Name: x\n"), None);
    }

    #[test]
    fn scale_config_avoids_local_subnets() {
        let avoid: [Ipv4Net; 2] = [
            "192.168.110.0/24".parse().expect("cidr"),
            "192.168.220.0/24".parse().expect("cidr"),
        ];
        let nets = scale_subnets(99_999, &avoid).expect("enough room");
        assert_eq!(nets.len(), 99_999);
        assert!(
            nets.iter()
                .all(|n| !avoid.iter().any(|a| a.contains(&n.addr())))
        );
        // Neighbours of the measured destination come first.
        assert_eq!(nets[0].to_string(), "192.168.0.0/24");
        assert_eq!(nets[254].to_string(), "10.0.0.0/25");
        let mut sorted: Vec<_> = nets.iter().map(|n| (n.addr(), n.prefix_len())).collect();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), nets.len(), "no duplicates");

        let text = scale_config(999, &avoid).expect("config");
        assert_eq!(text.matches("[[peer]]").count(), 100);
        assert!(text.contains("host = \"172.16.91.140\""));
        assert!(text.contains("host = \"172.16.91.239\""));
        assert_eq!(text.matches('/').count(), 999);
        assert!(scale_subnets(1 << 20, &avoid).is_err());
    }

    #[test]
    fn strips_colour_codes() {
        assert_eq!(strip_ansi("a\x1b[2;35mb\x1b[0mc"), "abc");
    }
}
