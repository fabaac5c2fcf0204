//! What `status`, `unload` and `export` read: the agent's state file plus
//! the pinned maps, so they work for a foreground agent and a detached
//! datapath alike.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap, LpmTrie, MapData, PerCpuArray};
use serde::{Deserialize, Serialize};
use xhost_common::{
    Counter, Endpoint, LocalNet, MAP_ENDPOINTS, MAP_ENDPOINTS6, MAP_LOCAL_NETS, MAP_LOCAL_NETS6,
    MAP_PEER_HOSTS, MAP_PEER_HOSTS6, MAP_PEER_STATS, MAP_ROUTES, MAP_ROUTES6, MAP_STATS,
    MAP_UNDERLAY_ADDRS, Peer, Peer6, PeerCounters, PeerHost, stat,
};

use crate::{
    attach::{KernelFeatures, TC_PRIORITY, TcMethod},
    config::{PeerConfig, Settings, SettingsLayer},
    datapath::{XdpAttached, open_pinned},
    layout::{Hook, Layout, remove_file_if_exists},
    net::{Ipv4Net, Ipv6Net, fmt_mac},
    writer::{KernelRoute, KernelRoute6, recipe::RecipeState},
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attachment {
    pub iface: String,
    pub hook: Hook,
    pub program: String,
    /// How it is attached, as its pin says (status only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
}

/// What a pin under `<pin-dir>/links` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// A bpf_link: tcx, or XDP.
    Link,
    /// The program of a classic tc filter that is in place.
    TcFilter,
    /// The program of a classic tc filter that is gone (deleted by hand,
    /// or its device with it).
    TcFilterMissing,
}

impl Via {
    /// Whether the filter whose program is pinned at `path` is in place:
    /// xhost's filter at `hook` of `iface`, running that program.
    fn filter(path: &std::path::Path, iface: &str, hook: Hook) -> Self {
        let live = || -> Option<bool> {
            let info = aya::programs::ProgramInfo::from_pin(path).ok()?;
            let ifindex = crate::net::ifindex(iface).ok()?;
            let mut rtnl = crate::netlink::Rtnl::open().ok()?;
            crate::attach::find_filter(&mut rtnl, ifindex, hook, Some(info.id()))
                .ok()
                .map(|f| f.is_some())
        };
        if live() == Some(true) {
            Self::TcFilter
        } else {
            Self::TcFilterMissing
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerStatus {
    pub host: String,
    pub connected: bool,
    pub engine_version: Option<String>,
    pub api_version: Option<String>,
    /// (name, bridge, subnets) of each followed network.
    pub networks: Vec<DockerNetworkStatus>,
    pub endpoints: usize,
    pub last_sync_unix_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerNetworkStatus {
    pub name: String,
    pub bridge: String,
    pub subnets: Vec<Ipv4Net>,
}

impl DockerStatus {
    fn host(s: &Settings) -> String {
        s.docker_host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
    }

    pub fn unreachable(s: &Settings) -> Self {
        Self {
            host: Self::host(s),
            connected: false,
            engine_version: None,
            api_version: None,
            networks: Vec::new(),
            endpoints: 0,
            last_sync_unix_ms: None,
        }
    }

    pub fn from_view(s: &Settings, v: &crate::docker::DockerView) -> Self {
        Self {
            host: Self::host(s),
            connected: true,
            engine_version: Some(v.engine_version.clone()),
            api_version: Some(v.api_version.clone()),
            networks: v
                .networks
                .values()
                .map(|n| DockerNetworkStatus {
                    name: n.name.clone(),
                    bridge: n.bridge.clone(),
                    subnets: n.subnets.clone(),
                })
                .collect(),
            endpoints: v.endpoints.len(),
            last_sync_unix_ms: Some(v.synced_at_unix_ms),
        }
    }
}

/// `<run-dir>/agent.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    pub detached: bool,
    pub iface: String,
    pub underlay_ip: Option<Ipv4Addr>,
    pub xdp: XdpAttached,
    pub attachments: Vec<Attachment>,
    pub bridges: Vec<String>,
    pub peers: Vec<PeerConfig>,
    /// Kernel routes the agent added, for `unload` of a detached datapath.
    pub kernel_routes: Vec<KernelRoute>,
    /// The IPv6 ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_routes6: Vec<KernelRoute6>,
    /// VXLAN mode's device, for status and for `unload` of a detached
    /// datapath.
    #[serde(default)]
    pub tunnel: Option<TunnelState>,
    /// The TC attach method in use.
    #[serde(default)]
    pub attach: Option<TcMethod>,
    /// What the kernel offered at load.
    #[serde(default)]
    pub kernel: Option<KernelFeatures>,
    pub docker: Option<DockerStatus>,
    /// What forwards: the eBPF programs, or the kernel.
    #[serde(default)]
    pub datapath: DatapathKind,
    /// The kernel datapath: what `unload` puts back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<RecipeState>,
    /// The kernel datapath's local subnets (the eBPF datapath's are in
    /// `LOCAL_NETS`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_subnets: Vec<Local>,
    /// Cluster mode: the store, the cluster's hosts, conflicts.
    #[serde(default)]
    pub cluster: Option<crate::store::source::ClusterReport>,
    pub updated_unix_ms: u64,
    /// Pins the agent made that are gone from the bpffs (removed by hand).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_pins: Vec<String>,
    /// Why the last SIGHUP reload was refused (the running config stayed);
    /// none once a reload succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_refused: Option<String>,
    /// Endpoints the sources want that `ENDPOINTS` has no room for (they
    /// wait for a free slot), in address order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints_refused: Vec<Ipv4Addr>,
    /// The Docker status last written to disk (not serialized).
    #[serde(skip)]
    written_docker: Option<DockerStatus>,
}

impl AgentState {
    pub fn new(s: &Settings, xdp: XdpAttached, detached: bool) -> Self {
        Self {
            pid: std::process::id(),
            detached,
            iface: s.iface.clone(),
            underlay_ip: crate::agent::underlay_address(&s.iface),
            xdp,
            attachments: Vec::new(),
            bridges: Vec::new(),
            peers: s.peers.clone(),
            kernel_routes: Vec::new(),
            kernel_routes6: Vec::new(),
            tunnel: None,
            attach: None,
            kernel: None,
            docker: s.docker.then(|| DockerStatus::unreachable(s)),
            datapath: DatapathKind::Ebpf,
            recipe: None,
            local_subnets: Vec::new(),
            cluster: None,
            updated_unix_ms: now_ms(),
            missing_pins: Vec::new(),
            reload_refused: None,
            endpoints_refused: Vec::new(),
            written_docker: None,
        }
    }

    /// Whether the Docker status changed since the last `write`.
    pub fn docker_changed(&self) -> bool {
        self.docker != self.written_docker
    }

    /// Atomic replace, so a reader never sees half a file. The temporary
    /// file is this process's own (instances may share the run dir); should
    /// another instance remove the emptied run dir in between, it is made
    /// again and the write retried.
    pub fn write(&mut self, layout: &Layout) -> anyhow::Result<()> {
        self.updated_unix_ms = now_ms();
        self.written_docker = self.docker.clone();
        let text = serde_json::to_vec_pretty(self)?;
        let path = layout.state_file();
        let tmp = layout
            .run_dir
            .join(format!(".{}.{}.tmp", layout.instance(), std::process::id()));
        let attempt = || -> std::io::Result<()> {
            std::fs::create_dir_all(&layout.run_dir)?;
            std::fs::write(&tmp, &text)?;
            std::fs::rename(&tmp, &path)
        };
        let mut res = attempt();
        for _ in 0..3 {
            match &res {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => res = attempt(),
                _ => break,
            }
        }
        if res.is_err() {
            let _ = remove_file_if_exists(&tmp);
        }
        res.with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(layout: &Layout) -> anyhow::Result<Self> {
        let path = layout.state_file();
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// What forwards container traffic between the hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatapathKind {
    /// The eBPF programs and their pinned maps.
    #[default]
    Ebpf,
    /// The kernel: xhost's routes, iptables chains and `ip_forward`.
    Kernel,
}

/// One of xhost's iptables chains as the kernel has it now: the jump to it
/// and its rules, as `iptables -S` prints them.
#[derive(Debug, Serialize)]
pub struct ChainRules {
    pub table: String,
    pub chain: String,
    pub rules: Vec<String>,
}

/// The vxlan device of VXLAN mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelState {
    pub device: String,
    pub ifindex: u32,
    pub vni: u32,
    pub port: u16,
    pub mtu: u32,
}

#[derive(Debug, Serialize)]
pub struct Route {
    pub prefix: Ipv4Net,
    pub peer: Ipv4Addr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Local {
    pub prefix: Ipv4Net,
    pub bridge_ifindex: u32,
}

/// A row of `ROUTES6`: an IPv6 peer subnet behind the peer's underlay
/// address (IPv4 or IPv6).
#[derive(Debug, Serialize)]
pub struct Route6 {
    pub prefix: Ipv6Net,
    pub peer: IpAddr,
}

#[derive(Debug, Serialize)]
pub struct Local6 {
    pub prefix: Ipv6Net,
    pub bridge_ifindex: u32,
}

#[derive(Debug, Serialize)]
pub struct EndpointRow6 {
    pub ip: Ipv6Addr,
    pub ifindex: u32,
    pub mac: String,
    pub gw_mac: String,
}

#[derive(Debug, Serialize)]
pub struct EndpointRow {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub mac: String,
    pub gw_mac: String,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CounterRow {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub agent: Option<AgentState>,
    pub agent_running: bool,
    /// Links pinned under <pin-dir>/links (what is attached where).
    pub attached: Vec<Attachment>,
    pub routes: Vec<Route>,
    pub local_subnets: Vec<Local>,
    pub endpoints: Vec<EndpointRow>,
    /// `ROUTES6`, `LOCAL_NETS6`, `ENDPOINTS6`: empty for a datapath pinned
    /// by a build without them.
    pub routes6: Vec<Route6>,
    pub local_subnets6: Vec<Local6>,
    pub endpoints6: Vec<EndpointRow6>,
    /// `UNDERLAY_ADDRS`: where VXLAN mode's datapath takes a peer's packets
    /// itself. Empty for a datapath pinned by a build without the map.
    pub underlay_addrs: Vec<Ipv4Addr>,
    pub counters: std::collections::BTreeMap<String, CounterRow>,
    /// Pins of the instance that are gone (removed by hand) while its agent
    /// runs: what the agent reported and the maps `status` could not open.
    /// The lists above are then empty where a map is missing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_pins: Vec<String>,
    /// The kernel datapath's iptables chains (empty for the eBPF one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<ChainRules>,
    /// `PEER_STATS` by peer host (`PEER_HOSTS`), sorted by address. Empty
    /// for a datapath pinned by a build without the map.
    pub peer_counters: Vec<PeerCounterRow>,
}

/// One peer host's traffic through the datapath, summed over CPUs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PeerCounterRow {
    pub peer: IpAddr,
    /// Forwarded to the peer.
    pub tx: CounterRow,
    /// Delivered from the peer.
    pub rx: CounterRow,
}

/// Each peer host's counters, summed over CPUs (none for a datapath
/// pinned by a build without `PEER_STATS`).
pub fn read_peer_counters(layout: &Layout) -> anyhow::Result<Vec<PeerCounterRow>> {
    if !layout.map(MAP_PEER_STATS).exists() || !layout.map(MAP_PEER_HOSTS).exists() {
        return Ok(Vec::new());
    }
    let hosts: HashMap<MapData, [u8; 4], PeerHost> =
        open_pinned(layout, MAP_PEER_HOSTS)?.try_into()?;
    let stats: PerCpuArray<MapData, PeerCounters> =
        open_pinned(layout, MAP_PEER_STATS)?.try_into()?;
    let mut held: Vec<(IpAddr, PeerHost)> = hosts
        .iter()
        .map(|r| r.map(|(k, v)| (IpAddr::from(k), v)))
        .collect::<Result<_, _>>()?;
    // Pinned by a build with IPv6 underlay addresses.
    if layout.map(MAP_PEER_HOSTS6).exists() {
        let hosts6: HashMap<MapData, [u8; 16], PeerHost> =
            open_pinned(layout, MAP_PEER_HOSTS6)?.try_into()?;
        for item in hosts6.iter() {
            let (k, v) = item?;
            held.push((IpAddr::from(k), v));
        }
    }
    let mut out = Vec::new();
    for (k, v) in held {
        let (mut tx, mut rx) = (CounterRow::default(), CounterRow::default());
        for c in stats.get(&v.slot, 0)?.iter() {
            tx.packets += c.tx.packets;
            tx.bytes += c.tx.bytes;
            rx.packets += c.rx.packets;
            rx.bytes += c.rx.bytes;
        }
        out.push(PeerCounterRow { peer: k, tx, rx });
    }
    out.sort_by_key(|r| r.peer);
    Ok(out)
}

fn prefix(k: &aya::maps::lpm_trie::Key<[u8; 4]>) -> Ipv4Net {
    Ipv4Net::containing(Ipv4Addr::from(k.data()), k.prefix_len() as u8)
}

fn prefix6(k: &aya::maps::lpm_trie::Key<[u8; 16]>) -> Ipv6Net {
    Ipv6Net::containing(Ipv6Addr::from(k.data()), k.prefix_len() as u8)
}

/// The IPv6 maps' rows, each map read where it is pinned (a datapath
/// pinned by a build without them has none).
type Ipv6Rows = (Vec<Route6>, Vec<Local6>, Vec<EndpointRow6>);

fn read_ipv6(layout: &Layout) -> anyhow::Result<Ipv6Rows> {
    let (mut routes, mut locals, mut endpoints) = (Vec::new(), Vec::new(), Vec::new());
    if layout.map(MAP_ROUTES6).exists() {
        let map = open_pinned(layout, MAP_ROUTES6)?;
        // A build before IPv6 underlay addresses pinned `Peer` values (an
        // IPv4 host), until a load migrates them.
        let value_size = aya::maps::MapInfo::from_pin(layout.map(MAP_ROUTES6))?.value_size();
        if value_size == std::mem::size_of::<Peer>() as u32 {
            let map: LpmTrie<MapData, [u8; 16], Peer> = map.try_into()?;
            for item in map.iter() {
                let (k, v) = item?;
                routes.push(Route6 {
                    prefix: prefix6(&k),
                    peer: IpAddr::from(v.host),
                });
            }
        } else {
            let map: LpmTrie<MapData, [u8; 16], Peer6> = map.try_into()?;
            for item in map.iter() {
                let (k, v) = item?;
                routes.push(Route6 {
                    prefix: prefix6(&k),
                    peer: crate::datapath::peer6_addr(v.host),
                });
            }
        }
    }
    if layout.map(MAP_LOCAL_NETS6).exists() {
        let map: LpmTrie<MapData, [u8; 16], LocalNet> =
            open_pinned(layout, MAP_LOCAL_NETS6)?.try_into()?;
        for item in map.iter() {
            let (k, v) = item?;
            locals.push(Local6 {
                prefix: prefix6(&k),
                bridge_ifindex: v.bridge_ifindex,
            });
        }
    }
    if layout.map(MAP_ENDPOINTS6).exists() {
        let map: HashMap<MapData, [u8; 16], Endpoint> =
            open_pinned(layout, MAP_ENDPOINTS6)?.try_into()?;
        for item in map.iter() {
            let (k, v) = item?;
            endpoints.push(EndpointRow6 {
                ip: Ipv6Addr::from(k),
                ifindex: v.ifindex,
                mac: fmt_mac(&v.mac),
                gw_mac: fmt_mac(&v.gw_mac),
            });
        }
    }
    endpoints.sort_by_key(|e| e.ip);
    Ok((routes, locals, endpoints))
}

/// The links pinned under `<pin-dir>/links` (what is attached where), sorted.
pub fn pinned_attachments(layout: &Layout) -> Vec<Attachment> {
    let mut attached = Vec::new();
    for (dir, filters) in [(layout.links_dir(), false), (layout.filters_dir(), true)] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((iface, hook)) = Layout::parse_link_name(&name) {
                attached.push(Attachment {
                    via: Some(if filters {
                        Via::filter(&entry.path(), &iface, hook)
                    } else {
                        Via::Link
                    }),
                    iface,
                    hook,
                    program: hook.program().into(),
                });
            }
        }
    }
    attached.sort_by(|a, b| (&a.iface, a.hook).cmp(&(&b.iface, b.hook)));
    attached
}

/// An error unless an instance is pinned under the layout's pin dir.
pub fn ensure_loaded(layout: &Layout) -> anyhow::Result<()> {
    if !layout.in_use() {
        bail!(
            "xhost is not loaded: nothing pinned under {}",
            layout.pin_dir.display()
        );
    }
    Ok(())
}

/// Reads everything an instance has pinned.
pub fn collect(layout: &Layout) -> anyhow::Result<Status> {
    if let Some(a) = AgentState::read(layout)
        .ok()
        .filter(|a| a.datapath == DatapathKind::Kernel)
    {
        return Ok(collect_kernel(layout, a));
    }
    let agent = AgentState::read(layout).ok();
    let agent_running = agent
        .as_ref()
        .is_some_and(|a| !a.detached && pid_alive(a.pid));
    // A running agent whose pins were removed by hand still has a status:
    // what it reported, and which maps cannot be read.
    if !agent_running {
        ensure_loaded(layout)?;
    }
    let mut missing_pins: Vec<String> = agent
        .as_ref()
        .filter(|_| agent_running)
        .map(|a| a.missing_pins.clone())
        .unwrap_or_default();
    let mut pinned = |name: &str| {
        let there = layout.map(name).exists();
        let path = layout.map(name).display().to_string();
        if !there && agent_running && !missing_pins.contains(&path) {
            missing_pins.push(path);
        }
        there || !agent_running
    };
    let (has_routes, has_locals, has_endpoints, has_stats) = (
        pinned(MAP_ROUTES),
        pinned(MAP_LOCAL_NETS),
        pinned(MAP_ENDPOINTS),
        pinned(MAP_STATS),
    );
    let attached = pinned_attachments(layout);

    let mut routes = Vec::new();
    if has_routes {
        let routes_map: LpmTrie<MapData, [u8; 4], Peer> =
            open_pinned(layout, MAP_ROUTES)?.try_into()?;
        for item in routes_map.iter() {
            let (k, v) = item?;
            routes.push(Route {
                prefix: prefix(&k),
                peer: Ipv4Addr::from(v.host),
            });
        }
    }
    let mut local_subnets = Vec::new();
    if has_locals {
        let local_map: LpmTrie<MapData, [u8; 4], LocalNet> =
            open_pinned(layout, MAP_LOCAL_NETS)?.try_into()?;
        for item in local_map.iter() {
            let (k, v) = item?;
            local_subnets.push(Local {
                prefix: prefix(&k),
                bridge_ifindex: v.bridge_ifindex,
            });
        }
    }
    let mut endpoints = Vec::new();
    if has_endpoints {
        let ep_map: HashMap<MapData, [u8; 4], Endpoint> =
            open_pinned(layout, MAP_ENDPOINTS)?.try_into()?;
        for item in ep_map.iter() {
            let (k, v) = item?;
            endpoints.push(EndpointRow {
                ip: Ipv4Addr::from(k),
                ifindex: v.ifindex,
                mac: fmt_mac(&v.mac),
                gw_mac: fmt_mac(&v.gw_mac),
            });
        }
    }
    endpoints.sort_by_key(|e| e.ip);
    let (routes6, local_subnets6, endpoints6) = read_ipv6(layout)?;
    let mut underlay_addrs = Vec::new();
    if layout.map(MAP_UNDERLAY_ADDRS).exists() {
        let addrs: HashMap<MapData, [u8; 4], u32> =
            open_pinned(layout, MAP_UNDERLAY_ADDRS)?.try_into()?;
        for k in addrs.keys() {
            underlay_addrs.push(Ipv4Addr::from(k?));
        }
        underlay_addrs.sort();
    }
    let counters = if has_stats {
        read_counters(layout)?
    } else {
        std::collections::BTreeMap::new()
    };
    let peer_counters = read_peer_counters(layout)?;
    Ok(Status {
        missing_pins,
        pin_dir: layout.pin_dir.display().to_string(),
        agent,
        agent_running,
        attached,
        routes,
        local_subnets,
        endpoints,
        routes6,
        local_subnets6,
        endpoints6,
        underlay_addrs,
        counters,
        peer_counters,
        chains: Vec::new(),
    })
}

/// The kernel datapath's status: its routes and local subnets as the
/// agent last wrote them, its chains as the kernel has them now.
fn collect_kernel(layout: &Layout, a: AgentState) -> Status {
    let chains = crate::writer::recipe::live_rules()
        .into_iter()
        .map(|(table, chain, rules)| ChainRules {
            table,
            chain,
            rules,
        })
        .collect();
    Status {
        pin_dir: layout.pin_dir.display().to_string(),
        agent_running: !a.detached && pid_alive(a.pid),
        attached: Vec::new(),
        routes: a
            .kernel_routes
            .iter()
            .filter_map(|r| {
                Some(Route {
                    prefix: r.prefix,
                    peer: r.via?,
                })
            })
            .collect(),
        local_subnets: a.local_subnets.clone(),
        endpoints: Vec::new(),
        routes6: a
            .kernel_routes6
            .iter()
            .map(|r| Route6 {
                prefix: r.prefix,
                peer: r.peer,
            })
            .collect(),
        local_subnets6: Vec::new(),
        endpoints6: Vec::new(),
        underlay_addrs: Vec::new(),
        counters: std::collections::BTreeMap::new(),
        chains,
        missing_pins: Vec::new(),
        peer_counters: Vec::new(),
        agent: Some(a),
    }
}

/// `status` of the kernel datapath.
fn print_kernel_status(s: &Status, a: &AgentState) {
    println!(
        "xhost on {} ({}), datapath kernel (routes and iptables; no eBPF), {}",
        a.iface,
        if s.agent_running {
            format!("agent pid {}", a.pid)
        } else {
            "detached, no agent".into()
        },
        a.underlay_ip
            .map_or_else(|| "-".into(), |ip| format!("underlay {ip}"))
    );
    if let Some(r) = &a.recipe {
        println!(
            "ip_forward: {} (was {} before load; put back at unload)",
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .map_or_else(|_| "?".into(), |v| v.trim().to_owned()),
            r.ip_forward_before
        );
    }
    println!("routes (kernel, proto 177):");
    for r in &s.routes {
        println!("  {:<20} via {}", r.prefix.to_string(), r.peer);
    }
    for r in &s.routes6 {
        println!(
            "  {:<20} on the link (peer {})",
            r.prefix.to_string(),
            r.peer
        );
    }
    println!("local subnets:");
    for l in &s.local_subnets {
        println!(
            "  {:<20} bridge ifindex {}",
            l.prefix.to_string(),
            l.bridge_ifindex
        );
    }
    for c in &s.chains {
        println!(
            "iptables {} {} ({} rules):",
            c.table,
            c.chain,
            c.rules.len()
        );
        for r in &c.rules {
            println!("  {r}");
        }
    }
}

/// Sums each counter over all CPUs. A datapath pinned by an older build has fewer
/// counters: those it lacks are left out.
pub fn read_counters(
    layout: &Layout,
) -> anyhow::Result<std::collections::BTreeMap<String, CounterRow>> {
    let stats: PerCpuArray<MapData, Counter> = open_pinned(layout, MAP_STATS)?.try_into()?;
    let mut out = std::collections::BTreeMap::new();
    let slots = stats.len() as usize;
    for (i, name) in stat::NAMES.iter().enumerate().take(slots) {
        let per_cpu = stats.get(&(i as u32), 0)?;
        let mut sum = CounterRow::default();
        for c in per_cpu.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
        }
        out.insert((*name).to_owned(), sum);
    }
    Ok(out)
}

pub fn print_status(s: &Status) {
    if let Some(a) = s
        .agent
        .as_ref()
        .filter(|a| a.datapath == DatapathKind::Kernel)
    {
        print_kernel_status(s, a);
        print_docker_and_cluster(s);
        return;
    }
    match &s.agent {
        Some(a) => println!(
            "xhost on {} ({}), xdp {:?}, pins {}",
            a.iface,
            if s.agent_running {
                format!("agent pid {}", a.pid)
            } else {
                "detached, no agent".into()
            },
            a.xdp,
            s.pin_dir
        ),
        None => println!("xhost, pins {} (no agent state)", s.pin_dir),
    }
    if let Some(t) = s.agent.as_ref().and_then(|a| a.tunnel.as_ref()) {
        println!(
            "tunnel: {} (ifindex {}), VXLAN VNI {} on UDP {}, MTU {}",
            t.device, t.ifindex, t.vni, t.port, t.mtu
        );
    }
    if let Some(a) = &s.agent {
        match a.attach {
            Some(TcMethod::Tc) => println!(
                "attach: tc (clsact qdisc, cls_bpf filters in direct-action mode, pref {TC_PRIORITY})"
            ),
            Some(TcMethod::Tcx) => println!("attach: tcx (bpf_links pinned under links/)"),
            None => {}
        }
        if let Some(k) = &a.kernel {
            let have = k.helpers.iter().filter(|(_, ok)| *ok).count();
            println!(
                "kernel {}: tcx {}, helpers the programs call: {have}/{} present",
                k.release,
                if k.tcx { "yes" } else { "no" },
                k.helpers.len()
            );
            for f in &k.fallbacks {
                println!("  {f}");
            }
        }
    }
    if let Some(r) = s.agent.as_ref().and_then(|a| a.reload_refused.as_ref()) {
        println!("last config reload REFUSED (the running config stays): {r}");
    }
    if let Some(a) = s.agent.as_ref().filter(|a| !a.endpoints_refused.is_empty()) {
        let shown: Vec<String> = a
            .endpoints_refused
            .iter()
            .take(16)
            .map(ToString::to_string)
            .collect();
        let more = a.endpoints_refused.len().saturating_sub(shown.len());
        println!(
            "ENDPOINTS FULL: {} endpoint(s) refused, waiting for a free slot (--max-endpoints): {}{}",
            a.endpoints_refused.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    if !s.missing_pins.is_empty() {
        println!(
            "PINS MISSING (removed by hand?): {}; the agent keeps forwarding, but what they held is not shown and unload cannot find it: stop the agent (SIGTERM) and load again",
            s.missing_pins.join(", ")
        );
    }
    let addrs: Vec<String> = s.underlay_addrs.iter().map(Ipv4Addr::to_string).collect();
    println!(
        "underlay addresses ({MAP_UNDERLAY_ADDRS}): {}",
        addrs.join(", ")
    );
    println!("attached:");
    for a in &s.attached {
        let via = match a.via {
            Some(Via::Link) if a.hook == Hook::Xdp => "xdp link",
            Some(Via::Link) => "tcx link",
            Some(Via::TcFilter) => "tc filter",
            Some(Via::TcFilterMissing) => "tc filter MISSING",
            None => "?",
        };
        println!(
            "  {:<16} {:<17} {:<15} {via}",
            a.iface,
            a.hook.as_str(),
            a.program
        );
    }
    println!("routes ({MAP_ROUTES}):");
    for r in &s.routes {
        println!("  {:<20} via {}", r.prefix.to_string(), r.peer);
    }
    println!("local subnets ({MAP_LOCAL_NETS}):");
    for l in &s.local_subnets {
        println!(
            "  {:<20} bridge ifindex {}",
            l.prefix.to_string(),
            l.bridge_ifindex
        );
    }
    println!("endpoints ({MAP_ENDPOINTS}): {}", s.endpoints.len());
    for e in &s.endpoints {
        println!(
            "  {:<16} ifindex {:<5} mac {} gw {}",
            e.ip, e.ifindex, e.mac, e.gw_mac
        );
    }
    println!("routes ({MAP_ROUTES6}):");
    for r in &s.routes6 {
        println!("  {:<28} via {}", r.prefix.to_string(), r.peer);
    }
    println!("local subnets ({MAP_LOCAL_NETS6}):");
    for l in &s.local_subnets6 {
        println!(
            "  {:<28} bridge ifindex {}",
            l.prefix.to_string(),
            l.bridge_ifindex
        );
    }
    println!("endpoints ({MAP_ENDPOINTS6}): {}", s.endpoints6.len());
    for e in &s.endpoints6 {
        println!(
            "  {:<28} ifindex {:<5} mac {} gw {}",
            e.ip.to_string(),
            e.ifindex,
            e.mac,
            e.gw_mac
        );
    }
    println!("counters ({MAP_STATS}):");
    for (name, c) in &s.counters {
        println!(
            "  {name:<16} {:>12} packets {:>16} bytes",
            c.packets, c.bytes
        );
    }
    if !s.peer_counters.is_empty() {
        println!("peer hosts ({MAP_PEER_HOSTS}, {MAP_PEER_STATS}):");
        for p in &s.peer_counters {
            println!(
                "  {:<16} tx {:>12} packets {:>16} bytes   rx {:>12} packets {:>16} bytes",
                p.peer.to_string(),
                p.tx.packets,
                p.tx.bytes,
                p.rx.packets,
                p.rx.bytes
            );
        }
    }
    print_docker_and_cluster(s);
}

/// The cluster's and Docker's parts of `status`.
fn print_docker_and_cluster(s: &Status) {
    if let Some(c) = s.agent.as_ref().and_then(|a| a.cluster.as_ref()) {
        print_cluster(c);
    }
    if let Some(d) = s.agent.as_ref().and_then(|a| a.docker.as_ref()) {
        println!(
            "docker: {} {}{}",
            d.host,
            if d.connected {
                "connected"
            } else {
                "unreachable"
            },
            d.engine_version
                .as_ref()
                .map(|v| format!(", engine {v}"))
                .unwrap_or_default()
        );
        for n in &d.networks {
            let subnets: Vec<_> = n.subnets.iter().map(ToString::to_string).collect();
            println!(
                "  network {:<16} bridge {:<16} {}",
                n.name,
                n.bridge,
                subnets.join(",")
            );
        }
        println!("  endpoints known: {}", d.endpoints);
        if let Some(ms) = d.last_sync_unix_ms {
            let ago = now_ms().saturating_sub(ms);
            println!("  last sync: {:.1} s ago", ago as f64 / 1000.0);
        }
    }
}

/// The store's line and the cluster's hosts, conflicts and skipped keys.
pub fn print_cluster(c: &crate::store::source::ClusterReport) {
    let s = &c.store;
    let lease = match (s.lease, s.lease_expires_unix_ms) {
        (Some(id), Some(exp)) => format!(
            "lease {id:x} TTL {} s, {:.1} s left",
            s.lease_ttl,
            exp.saturating_sub(now_ms()) as f64 / 1000.0
        ),
        _ => format!("no lease (TTL {} s)", s.lease_ttl),
    };
    println!(
        "etcd {} prefix {}: {}, {lease}, revision {}{}",
        s.endpoints.join(","),
        s.prefix,
        if s.connected {
            "connected"
        } else {
            "disconnected"
        },
        s.revision,
        if s.from_snapshot {
            " (from the on-disk snapshot)"
        } else {
            ""
        }
    );
    if let Some(e) = &s.last_error
        && !s.connected
    {
        println!("  last error: {e}");
    }
    println!("hosts ({}):", c.hosts.len());
    for h in &c.hosts {
        let subnets: Vec<String> = h
            .subnets
            .iter()
            .map(|n| {
                if h.this_host || h.routed.contains(n) {
                    n.to_string()
                } else {
                    format!("{n} (not routed)")
                }
            })
            .collect();
        println!(
            "  {:<20} {:<16} {}{} {}",
            h.id,
            h.underlay.to_string(),
            h.mode,
            if h.this_host { " (this host)" } else { "" },
            subnets.join(",")
        );
    }
    for l in &c.conflicts {
        println!("conflict: {l}");
    }
    for l in &c.skipped {
        println!("skipped: {l}");
    }
}

fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Removes an instance: stops a foreground agent (which cleans up after
/// itself), then unpins whatever is left (a detached datapath, or what a
/// killed agent left). With `missing_ok`, nothing loaded is no error.
/// Unless `keep_lease`, a killed cluster agent's lease is revoked first.
pub fn unload(
    layout: &Layout,
    iface: Option<&str>,
    missing_ok: bool,
    keep_lease: bool,
) -> anyhow::Result<()> {
    let agent = AgentState::read(layout).ok();
    if !layout.in_use() && agent.is_none() && !layout.cluster_snapshot().exists() {
        if missing_ok {
            return Ok(());
        }
        bail!(
            "xhost is not loaded: nothing pinned under {}",
            layout.pin_dir.display()
        );
    }
    if let (Some(want), Some(a)) = (iface, agent.as_ref())
        && a.iface != want
    {
        bail!(
            "xhost under {} serves {}, not {want}",
            layout.pin_dir.display(),
            a.iface
        );
    }
    if let Some(a) = agent.as_ref().filter(|a| !a.detached && pid_alive(a.pid)) {
        let pid = nix::unistd::Pid::from_raw(a.pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .context("signalling the agent")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pid_alive(a.pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid_alive(a.pid) {
            bail!("agent pid {} did not exit within 10 s of SIGTERM", a.pid);
        }
    }
    // A killed agent in cluster mode left its lease: revoke it (its
    // snapshot says where), so the other hosts drop this host's routes now.
    // A store that does not answer is one line; the datapath goes anyway.
    if !keep_lease {
        let revoked = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(crate::store::source::revoke_left_lease(layout));
        match revoked {
            Ok(Some(line)) => log::info!("{line}"),
            Ok(None) => {}
            Err(e) => log::warn!("{e:#}"),
        }
    }
    if agent
        .as_ref()
        .is_some_and(|a| a.datapath == DatapathKind::Kernel)
    {
        // Nothing pinned. What a detached or killed kernel datapath left
        // (an agent that stopped cleanly removed its state file with the rest).
        if let Ok(a) = AgentState::read(layout) {
            crate::writer::routes::delete(&a.kernel_routes);
            crate::writer::routes::delete6(&a.kernel_routes6);
            if let Some(r) = &a.recipe {
                crate::writer::recipe::remove(r);
            }
        }
        remove_file_if_exists(&layout.state_file())?;
        let _ = std::fs::remove_dir(&layout.run_dir);
        return Ok(());
    }
    // Whatever remains: unlinking a link pin detaches its program once no
    // process holds it; a classic tc filter is deleted, then its program's
    // pin; unlinking map pins frees the maps.
    if let Ok(dir) = std::fs::read_dir(layout.links_dir()) {
        for entry in dir.flatten() {
            remove_file_if_exists(&entry.path())?;
        }
    }
    let _ = std::fs::remove_dir(layout.links_dir());
    if let Ok(dir) = std::fs::read_dir(layout.filters_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match Layout::parse_link_name(&name) {
                Some((iface, hook)) => crate::attach::remove_filter(&entry.path(), &iface, hook)?,
                None => remove_file_if_exists(&entry.path())?,
            }
        }
    }
    let _ = std::fs::remove_dir(layout.filters_dir());
    for iface in layout.clsact_marked() {
        if let Err(e) = crate::attach::remove_clsact_if_unused(&iface) {
            log::warn!("removing the clsact qdisc of {iface}: {e}");
        }
        let _ = std::fs::remove_dir(layout.clsact_marker(&iface));
    }
    let _ = std::fs::remove_dir(layout.clsact_dir());
    for name in xhost_common::PINNED_MAPS {
        remove_file_if_exists(&layout.map(name))?;
    }
    // Maps an older build pinned that this one no longer has, what an
    // interrupted migration staged, and both of its fingerprints.
    for name in crate::migrate::pinned_shapes(layout).keys() {
        remove_file_if_exists(&layout.map(name))?;
    }
    crate::migrate::discard_staging(layout);
    for fp in crate::migrate::recorded(layout) {
        let _ = std::fs::remove_dir(layout.layout_dir().join(fp));
    }
    layout.remove_layout_record();
    std::fs::remove_dir(&layout.pin_dir)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .with_context(|| {
            format!(
                "removing {} (something else is pinned there)",
                layout.pin_dir.display()
            )
        })?;
    if let Some(a) = agent.as_ref() {
        crate::writer::routes::delete(&a.kernel_routes);
        crate::writer::routes::delete6(&a.kernel_routes6);
        if let Some(t) = &a.tunnel {
            crate::tunnel::delete(t.ifindex);
        }
    }
    remove_file_if_exists(&layout.state_file())?;
    let _ = std::fs::remove_dir(&layout.run_dir);
    Ok(())
}

/// This host's entry for the other hosts' config files.
pub fn export(layout: &Layout) -> anyhow::Result<String> {
    let s = collect(layout)?;
    let a = s
        .agent
        .as_ref()
        .context("no agent state: cannot tell the underlay address")?;
    let host = a
        .underlay_ip
        .with_context(|| format!("{} has no IPv4 address", a.iface))?;
    if s.local_subnets.is_empty() && s.local_subnets6.is_empty() {
        bail!("no local subnets yet (is Docker up, or a --bridge given?): nothing to export");
    }
    let subnets = s.local_subnets.iter().map(|l| l.prefix).collect();
    let subnets6 = s.local_subnets6.iter().map(|l| l.prefix).collect();
    Ok(peer_entry(host, subnets, subnets6)?)
}

/// A config file holding only the peer `host` with `subnets` (IPv4, then
/// IPv6, in one list): a settings layer written as TOML, so it reads back
/// as one.
pub fn peer_entry(
    host: Ipv4Addr,
    subnets: Vec<Ipv4Net>,
    subnets6: Vec<Ipv6Net>,
) -> Result<String, toml::ser::Error> {
    toml::to_string(&SettingsLayer {
        peers: vec![PeerConfig {
            host: host.into(),
            subnets,
            subnets6,
        }],
        ..SettingsLayer::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn exported_entry_reads_back_as_a_config() {
        let host = Ipv4Addr::new(172, 16, 91, 131);
        let subnets: Vec<Ipv4Net> = ["192.168.110.0/24", "192.168.111.0/24"]
            .iter()
            .map(|n| n.parse().expect("valid"))
            .collect();
        let text = peer_entry(host, subnets.clone(), Vec::new()).expect("serializes");
        assert_eq!(
            text,
            "[[peer]]\nhost = \"172.16.91.131\"\nsubnets = [\"192.168.110.0/24\", \"192.168.111.0/24\"]\n"
        );
        let file: SettingsLayer = toml::from_str(&text).expect("parses as a config");
        let flags = SettingsLayer {
            iface: Some("ens33".into()),
            ..SettingsLayer::default()
        };
        let s = config::merge(flags, Some(file)).expect("a valid config");
        assert_eq!(
            s.peers,
            [PeerConfig {
                host: host.into(),
                subnets: subnets.clone(),
                subnets6: Vec::new()
            }]
        );
        config::check_peers(&s.peers).expect("checks");
        // Dual-stack: the IPv6 subnets follow in the same list.
        let subnets6: Vec<Ipv6Net> = vec!["fd00:a::/64".parse().expect("valid")];
        let text = peer_entry(host, subnets.clone(), subnets6.clone()).expect("serializes");
        assert_eq!(
            text,
            "[[peer]]\nhost = \"172.16.91.131\"\nsubnets = [\"192.168.110.0/24\", \"192.168.111.0/24\", \"fd00:a::/64\"]\n"
        );
        let file: SettingsLayer = toml::from_str(&text).expect("parses as a config");
        assert_eq!(file.peers[0].subnets6, subnets6);
        assert_eq!(file.peers[0].subnets, subnets);
    }
}
