//! The two-host topology: two simulated Docker hosts joined by one underlay link, each
//! with containers on its own `docker0`, and nothing routing between container subnets.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    net::Ipv4Addr,
};

use crate::{Error, Ipv4Net, Ipv4NetExt, NetNs, Result, docker};

/// Settings of one simulated host.
#[derive(Clone, Debug)]
pub struct HostOpts {
    /// The host's container subnet: `.1` goes on the bridge, containers get `.11`, `.12`, ...
    pub subnet: Ipv4Net,
    /// The host's underlay address with its prefix, put on the underlay interface.
    pub underlay: Ipv4Net,
}

/// Settings of [`Topology::two_hosts`]; the defaults are the documented topology.
#[derive(Clone, Debug)]
pub struct TopologyOpts {
    pub host_a: HostOpts,
    pub host_b: HostOpts,
    /// Containers per host (at least 1).
    pub containers_per_host: u32,
    /// Install Docker 20.10's iptables rules (FORWARD policy DROP, DOCKER-* chains, NAT).
    /// IPv4 forwarding is on either way, as on any Docker host.
    pub docker_iptables: bool,
    /// MTU of every link (underlay, bridge, container veths).
    pub mtu: u32,
    /// Name of the bridge on each host.
    pub bridge: String,
    /// Name of each host's underlay interface.
    pub underlay_iface: String,
    /// Build only the underlay: each host namespace gets its underlay interface, but no
    /// bridge, containers, iptables rules or IPv4 forwarding, for a real engine
    /// ([`crate::docker_engine::Engine`]) to create `docker0` (with `--bip` set to
    /// [`Host::bip`]), its rules and its containers itself. `containers_per_host`,
    /// `docker_iptables` and `mtu` of the bridge side are then unused, and
    /// [`Topology::ctr_a`] / [`Topology::ctr_b`] must not be called.
    pub underlay_only: bool,
    /// Join the hosts' underlays through a switch (a bridge in a third
    /// namespace) instead of one veth pair, so a host can go away and come
    /// back ([`Topology::replace_host_b`]) while the other keeps its
    /// underlay interface.
    pub underlay_switch: bool,
}

/// Host number of the first container in its subnet (Docker would start at .2; .11 keeps
/// addresses recognisable in captures).
const FIRST_CONTAINER: u32 = 11;

/// Name of the container side of each container veth, as Docker names it.
const CONTAINER_IFACE: &str = "eth0";

impl Default for TopologyOpts {
    fn default() -> Self {
        Self {
            host_a: HostOpts {
                subnet: Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 110, 0), 24),
                underlay: Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 91, 131), 24),
            },
            host_b: HostOpts {
                subnet: Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 220, 0), 24),
                underlay: Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 91, 132), 24),
            },
            containers_per_host: 1,
            docker_iptables: true,
            mtu: 1500,
            bridge: "docker0".into(),
            underlay_iface: "ens33".into(),
            underlay_only: false,
            underlay_switch: false,
        }
    }
}

impl TopologyOpts {
    /// Rejects settings the kernel would refuse halfway through the build.
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for name in [&self.bridge, &self.underlay_iface] {
            // IFNAMSIZ is 16 including the NUL.
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return bad(format!("bad interface name {name:?}"));
            }
        }
        if self.containers_per_host == 0 {
            return bad("containers_per_host must be at least 1".into());
        }
        if !(68..=65535).contains(&self.mtu) {
            return bad(format!("MTU {} outside 68..=65535", self.mtu));
        }
        let (a, b) = (&self.host_a, &self.host_b);
        if a.subnet.trunc().contains(&b.subnet.addr())
            || b.subnet.trunc().contains(&a.subnet.addr())
        {
            return bad(format!(
                "container subnets {} and {} overlap",
                a.subnet, b.subnet
            ));
        }
        if !a.underlay.contains(&b.underlay.addr()) || a.underlay.addr() == b.underlay.addr() {
            return bad(format!(
                "underlay addresses {} and {} must be distinct and on one subnet",
                a.underlay, b.underlay
            ));
        }
        for h in [a, b] {
            let last = FIRST_CONTAINER + self.containers_per_host - 1;
            if h.subnet.host(last).is_none() {
                return bad(format!("{} has no room for host number {last}", h.subnet));
            }
        }
        Ok(())
    }
}

/// Two simulated Docker hosts, each in its own network namespace, with containers in
/// namespaces of their own:
///
/// ```text
///  ctr-a netns                                  ctr-b netns
///    eth0 192.168.110.11/24                       eth0 192.168.220.11/24
///    default via 192.168.110.1                    default via 192.168.220.1
///      |  veth (host side vethXXXXXXX,              |  veth (host side vethXXXXXXX,
///      |        a port of docker0)                  |        a port of docker0)
///  host-a netns                                 host-b netns
///    docker0 (bridge) 192.168.110.1/24            docker0 (bridge) 192.168.220.1/24
///    ens33 172.16.91.131/24 <==== veth pair ====> ens33 172.16.91.132/24
/// ```
///
/// Each host looks like a fresh Docker 20.10 host: IPv4 forwarding on, Docker's iptables
/// rules (FORWARD policy DROP, DOCKER-* chains, MASQUERADE for its subnet). There are no
/// routes between the container subnets: container A cannot reach container B until
/// something (xhost) provides the path.
///
/// Both underlay ends are created directly inside their host namespaces (`ip link add ...
/// peer ... netns`), so nothing ever appears in the root namespace and both can be named
/// `ens33`. Dropping the topology deletes every namespace, which destroys all its links.
#[derive(Debug)]
pub struct Topology {
    hosts: [Host; 2],
    /// The switch's namespace with [`TopologyOpts::underlay_switch`];
    /// declared after the hosts, so it is deleted after them.
    wire: Option<NetNs>,
    opts: TopologyOpts,
}

/// One simulated Docker host.
#[derive(Debug)]
pub struct Host {
    // Declared before `ns` so containers are deleted first (drop order is field order).
    containers: Vec<Container>,
    ns: NetNs,
    role: String,
    subnet: Ipv4Net,
    bridge: String,
    bridge_ip: Ipv4Addr,
    underlay: Ipv4Net,
    underlay_iface: String,
}

/// One simulated container attached to its host's bridge.
#[derive(Debug)]
pub struct Container {
    ns: NetNs,
    role: String,
    ip: Ipv4Net,
    gateway: Ipv4Addr,
    mac: String,
    host_veth: String,
    host_veth_ifindex: u32,
}

impl Topology {
    /// Builds the topology. On any failure everything created so far is deleted again and
    /// the error names the command that failed.
    pub fn two_hosts(opts: TopologyOpts) -> Result<Self> {
        opts.validate()?;
        if opts.docker_iptables && !opts.underlay_only {
            // Fails early with an install hint rather than after half the setup.
            docker::iptables_backend()?;
        }
        let ns_a = NetNs::new("host-a")?;
        let ns_b = NetNs::new("host-b")?;
        let (iface, mtu) = (opts.underlay_iface.as_str(), opts.mtu.to_string());
        let wire = if opts.underlay_switch {
            let wire = NetNs::new("wire")?;
            wire.ip_batch("link set lo up\nlink add sw type bridge\nlink set sw up\n")?;
            for ns in [&ns_a, &ns_b] {
                let port = plug(&wire, ns, iface, opts.mtu)?;
                wire.ip(&["link", "set", &port, "up"])?;
            }
            Some(wire)
        } else {
            // Both ends born in their namespaces: no temporary names in the root namespace
            // that could collide with a concurrent run or leak if we die before moving them.
            ns_a.ip(&[
                "link",
                "add",
                iface,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                iface,
                "netns",
                ns_b.name(),
                "mtu",
                &mtu,
            ])?;
            None
        };
        let host_a = Host::build("a", ns_a, &opts.host_a, &opts)?;
        let host_b = Host::build("b", ns_b, &opts.host_b, &opts)?;
        Ok(Self {
            hosts: [host_a, host_b],
            wire,
            opts,
        })
    }

    /// Host B goes away and comes back as a new machine on the same
    /// addresses: a new namespace with a new underlay interface (so a new
    /// MAC), bridge and containers is built unplugged, the old host's
    /// namespace is deleted (and its containers and switch port with it),
    /// and `gone_for` later the new host is plugged into the switch. Needs
    /// [`TopologyOpts::underlay_switch`]; whatever ran inside the old host
    /// (an agent) must be stopped first.
    pub fn replace_host_b(&mut self, gone_for: std::time::Duration) -> Result<()> {
        let wire = self.wire.as_ref().ok_or_else(|| {
            Error::Config("replace_host_b needs TopologyOpts::underlay_switch".into())
        })?;
        let ns = NetNs::new("host-b")?;
        let port = plug(wire, &ns, &self.opts.underlay_iface, self.opts.mtu)?;
        let new = Host::build("b", ns, &self.opts.host_b, &self.opts)?;
        drop(std::mem::replace(&mut self.hosts[1], new));
        std::thread::sleep(gone_for);
        wire.ip(&["link", "set", &port, "up"])?;
        Ok(())
    }

    /// Both hosts, A first.
    pub fn hosts(&self) -> &[Host; 2] {
        &self.hosts
    }

    /// Host A (192.168.110.0/24 by default).
    pub fn host_a(&self) -> &Host {
        &self.hosts[0]
    }

    /// Host B (192.168.220.0/24 by default).
    pub fn host_b(&self) -> &Host {
        &self.hosts[1]
    }

    /// Host A's first container.
    pub fn ctr_a(&self) -> &Container {
        self.hosts[0].first_container()
    }

    /// Host B's first container.
    pub fn ctr_b(&self) -> &Container {
        self.hosts[1].first_container()
    }

    /// The settings the topology was built with.
    pub fn opts(&self) -> &TopologyOpts {
        &self.opts
    }

    /// Every namespace of the topology (hosts and containers).
    pub fn netns_names(&self) -> Vec<String> {
        self.hosts
            .iter()
            .flat_map(|h| {
                std::iter::once(h.ns.name().to_owned())
                    .chain(h.containers.iter().map(|c| c.ns.name().to_owned()))
            })
            .collect()
    }

    /// The topology as drawn in the type's documentation, with the actual names, addresses
    /// and interfaces, for demos and failure messages.
    pub fn ascii(&self) -> String {
        let [a, b] = &self.hosts;
        let (left, right) = (a.column(), b.column());
        let link_a = format!("  {} {}", a.underlay_iface, a.underlay);
        let link_b = format!("{} {}", b.underlay_iface, b.underlay);
        // Column width: the widest left line, and room for an arrow after `ens33 ...`.
        let width = left
            .iter()
            .map(String::len)
            .chain([link_a.len() + 14])
            .max()
            .unwrap_or(0)
            + 2;
        let mut out = String::new();
        for i in 0..left.len().max(right.len()) {
            let l = left.get(i).map_or("", String::as_str);
            let r = right.get(i).map_or("", String::as_str);
            out.push_str(format!(" {l:width$}{r}").trim_end());
            out.push('\n');
        }
        let arrow = "=".repeat(width - link_a.len() - 4);
        out.push_str(&format!(" {link_a} <{arrow}> {link_b}\n"));
        out
    }
}

impl Host {
    pub(crate) fn build(
        letter: &str,
        ns: NetNs,
        h: &HostOpts,
        opts: &TopologyOpts,
    ) -> Result<Self> {
        let role = format!("host-{letter}");
        let bridge_ip = h
            .subnet
            .host(1)
            .ok_or_else(|| Error::Config(format!("{} has no .1", h.subnet)))?;
        let (bridge, iface, mtu) = (&opts.bridge, &opts.underlay_iface, opts.mtu);
        let bridge_cidr = h.subnet.with_addr(bridge_ip);
        let containers = if opts.underlay_only {
            ns.ip_batch(&format!(
                "link set lo up\n\
                 addr add {} dev {iface}\n\
                 link set {iface} up\n",
                h.underlay
            ))?;
            // Forwarding stays off, as on a fresh host: dockerd turns it on and, because it
            // did, sets the FORWARD policy to DROP (with forwarding already on it would
            // leave ACCEPT, which is not what a Docker host looks like).
            Vec::new()
        } else {
            // The bridge gets a MAC of its own, as Docker gives docker0 one
            // (libnetwork sets a random one at creation): a bridge without
            // takes its lowest port's MAC, changes it as ports come and go,
            // and each change flushes its ARP table.
            let bridge_mac = docker_mac(bridge_ip);
            ns.ip_batch(&format!(
                "link set lo up\n\
                 addr add {} dev {iface}\n\
                 link set {iface} up\n\
                 link add {bridge} mtu {mtu} address {bridge_mac} type bridge\n\
                 addr add {bridge_cidr} brd + dev {bridge}\n\
                 link set {bridge} up\n",
                h.underlay
            ))?;
            docker::apply_docker_host_state(&ns, bridge, h.subnet, opts.docker_iptables)?;
            let mut containers = Vec::new();
            for i in 0..opts.containers_per_host {
                let ip = h
                    .subnet
                    .host(FIRST_CONTAINER + i)
                    .ok_or_else(|| Error::Config(format!("{} too small", h.subnet)))?;
                let role = format!("ctr-{letter}{}", i + 1);
                containers.push(Container::build(
                    &ns,
                    &role,
                    h.subnet.with_addr(ip),
                    bridge_ip,
                    bridge,
                    mtu,
                )?);
            }
            containers
        };
        Ok(Self {
            containers,
            ns,
            role,
            subnet: h.subnet.trunc(),
            bridge: bridge.clone(),
            bridge_ip,
            underlay: h.underlay,
            underlay_iface: iface.clone(),
        })
    }

    /// The host's namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The host's namespace name.
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// `host-a` or `host-b`.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The container subnet (network address), e.g. `192.168.110.0/24`.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The bridge's name (`docker0`).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's address, the containers' default gateway.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        self.bridge_ip
    }

    /// The bridge's address with the subnet's prefix, e.g. `192.168.110.1/24`: dockerd's
    /// `--bip` for this host.
    pub fn bip(&self) -> String {
        format!("{}/{}", self.bridge_ip, self.subnet.prefix_len())
    }

    /// The underlay address, e.g. `172.16.91.131`.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay.addr()
    }

    /// The underlay address with its prefix.
    pub fn underlay(&self) -> Ipv4Net {
        self.underlay
    }

    /// The underlay interface's name (`ens33`).
    pub fn underlay_iface(&self) -> &str {
        &self.underlay_iface
    }

    /// Adds a simulated container with address `ip` on the bridge.
    pub(crate) fn add_container(&mut self, role: &str, ip: Ipv4Addr) -> Result<()> {
        let mtu = self
            .ns
            .ip(&["-o", "link", "show", "dev", &self.bridge])
            .ok()
            .and_then(|o| {
                let t = String::from_utf8_lossy(&o.stdout).into_owned();
                t.split_whitespace()
                    .skip_while(|w| *w != "mtu")
                    .nth(1)
                    .and_then(|m| m.parse().ok())
            });
        let c = Container::build(
            &self.ns,
            role,
            self.subnet.with_addr(ip),
            self.bridge_ip,
            &self.bridge,
            mtu.unwrap_or(1500),
        )?;
        self.containers.push(c);
        Ok(())
    }

    /// The host's containers, in address order.
    pub fn containers(&self) -> &[Container] {
        &self.containers
    }

    fn first_container(&self) -> &Container {
        // validate() guarantees containers_per_host >= 1 and build() created them all,
        // unless the topology is underlay-only.
        self.containers
            .first()
            .expect("an underlay-only topology has no simulated containers")
    }

    /// Lines of this host's half of [`Topology::ascii`].
    fn column(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for c in &self.containers {
            lines.push(format!("{} netns {}", c.role, c.ns.name()));
            lines.push(format!("  {CONTAINER_IFACE} {} via {}", c.ip, c.gateway));
            lines.push(format!(
                "    | {} (ifindex {})",
                c.host_veth, c.host_veth_ifindex
            ));
        }
        lines.push(format!("{} netns {}", self.role, self.ns.name()));
        lines.push(format!(
            "  {} (bridge) {}/{}",
            self.bridge,
            self.bridge_ip,
            self.subnet.prefix_len()
        ));
        lines
    }
}

impl Container {
    pub(crate) fn build(
        host: &NetNs,
        role: &str,
        ip: Ipv4Net,
        gateway: Ipv4Addr,
        bridge: &str,
        mtu: u32,
    ) -> Result<Self> {
        let ns = NetNs::new(role)?;
        let host_veth = host_veth_name(ns.name());
        let mac = docker_mac(ip.addr());
        host.ip_batch(&format!(
            "link add {host_veth} mtu {mtu} type veth peer name {CONTAINER_IFACE} netns {} mtu {mtu}\n\
             link set {host_veth} master {bridge}\n\
             link set {host_veth} up\n",
            ns.name()
        ))?;
        ns.ip_batch(&format!(
            "link set lo up\n\
             link set {CONTAINER_IFACE} address {mac}\n\
             addr add {ip} dev {CONTAINER_IFACE}\n\
             link set {CONTAINER_IFACE} up\n\
             route add default via {gateway}\n"
        ))?;
        let host_veth_ifindex = host.ifindex(&host_veth)?;
        Ok(Self {
            ns,
            role: role.to_owned(),
            ip,
            gateway,
            mac,
            host_veth,
            host_veth_ifindex,
        })
    }

    /// The container's namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The container's namespace name.
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// `ctr-a1`, `ctr-b2`, ...
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The container's address, e.g. `192.168.110.11`.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip.addr()
    }

    /// The container's address with its prefix.
    pub fn cidr(&self) -> Ipv4Net {
        self.ip
    }

    /// The default gateway (the host's bridge address).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The MAC of the container's `eth0` (Docker's `02:42:` + IPv4 scheme).
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// The container's interface name (`eth0`).
    pub fn iface(&self) -> &str {
        CONTAINER_IFACE
    }

    /// Name of the host-side veth (a port of the bridge), in the host namespace.
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// Ifindex of the host-side veth in the host namespace.
    pub fn host_veth_ifindex(&self) -> u32 {
        self.host_veth_ifindex
    }
}

/// Connects `host`'s underlay interface `iface` to the switch in `wire`:
/// a veth pair whose switch end (returned, still down) is a port of `sw`.
fn plug(wire: &NetNs, host: &NetNs, iface: &str, mtu: u32) -> Result<String> {
    static PORTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let port = format!(
        "p{}",
        PORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    wire.ip_batch(&format!(
        "link add {port} mtu {mtu} type veth peer name {iface} netns {} mtu {mtu}\n\
         link set {port} master sw\n",
        host.name()
    ))?;
    Ok(port)
}

/// Docker-style host veth name: `veth` + 7 hex digits. Derived from the (unique) netns name
/// so a rerun of a failed command names the same device.
fn host_veth_name(netns: &str) -> String {
    let mut h = DefaultHasher::new();
    netns.hash(&mut h);
    format!("veth{:07x}", h.finish() & 0x0fff_ffff)
}

/// The MAC Docker gives a container: `02:42:` followed by the IPv4 address.
fn docker_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// The ifindex from `ip -o link show` output (`12: vethabc@if2: <...> ...`).
pub(crate) fn parse_ifindex(line: &str) -> Result<u32> {
    line.split_once(':')
        .and_then(|(n, _)| n.trim().parse().ok())
        .ok_or_else(|| Error::Parse {
            what: "ifindex",
            input: line.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_opts_are_valid() {
        let o = TopologyOpts::default();
        o.validate().expect("defaults valid");
        assert_eq!(o.host_a.subnet.to_string(), "192.168.110.0/24");
        assert_eq!(o.host_b.underlay.to_string(), "172.16.91.132/24");
    }

    #[test]
    fn rejects_inconsistent_opts() {
        let mut o = TopologyOpts::default();
        o.host_b.subnet = "192.168.110.128/25".parse().expect("cidr");
        assert!(o.validate().is_err(), "overlapping subnets");

        let mut o = TopologyOpts::default();
        o.host_b.underlay = "10.0.0.2/24".parse().expect("cidr");
        assert!(o.validate().is_err(), "underlay on different subnets");

        let o = TopologyOpts {
            containers_per_host: 250,
            ..TopologyOpts::default()
        };
        assert!(o.validate().is_err(), "too many containers for a /24");

        let o = TopologyOpts {
            bridge: "a-very-long-bridge-name".into(),
            ..TopologyOpts::default()
        };
        assert!(o.validate().is_err(), "name longer than IFNAMSIZ");
    }

    #[test]
    fn names_and_macs_look_like_docker() {
        let v = host_veth_name("xh-1-2-ctr-a1");
        assert_eq!(v.len(), 11);
        assert!(v.starts_with("veth"));
        assert_ne!(v, host_veth_name("xh-1-3-ctr-a2"));
        assert_eq!(
            docker_mac(Ipv4Addr::new(192, 168, 110, 11)),
            "02:42:c0:a8:6e:0b"
        );
    }

    #[test]
    fn parses_ifindex() {
        let line =
            "12: veth1234567@if2: <BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue master docker0";
        assert_eq!(parse_ifindex(line).ok(), Some(12));
        assert!(parse_ifindex("garbage").is_err());
    }
}
