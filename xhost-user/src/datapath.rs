//! The one owner of the loaded eBPF object: its programs, their links, and
//! the maps the agent writes.
//!
//! Everything attached or pinned is recorded the moment it exists, so a
//! failure half-way through `load` is undone by `Drop`: no program stays
//! attached and no pin stays behind.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, TcAttachOptions, TcHandle},
    },
    util::nr_cpus,
};
use log::{info, warn};
use xhost_common::{
    ARMED, Endpoint, GLOBAL_DENY, GLOBAL_HELPERS, GLOBAL_TUNNEL_IFINDEX, GLOBAL_TUNNEL_PORT,
    GLOBAL_TUNNEL_VNI, LocalNet, MAP_DATAPATH_GEN, MAP_ENDPOINT_PORTS, MAP_ENDPOINTS,
    MAP_ENDPOINTS6, MAP_LOCAL_NETS, MAP_LOCAL_NETS6, MAP_PEER_HOSTS, MAP_PEER_HOSTS6,
    MAP_PEER_STATS, MAP_ROUTES, MAP_ROUTES6, MAP_UNDERLAY_ADDRS, MAX_PEER_HOSTS,
    MAX_UNDERLAY_ADDRS, PINNED_MAPS, PROG_BRIDGE_IN, PROG_NIC_IN, PROG_NIC_XDP, PROG_VETH_IN,
    PROG_VXLAN_IN, PROG_VXLAN_OUT, Peer, Peer6, PeerCounters, PeerHost,
};

use crate::{
    attach::{self, AttachArg, KernelFeatures, ProbeError, TC_PRIORITY, TcMethod},
    config::DenyArg,
    config::{Vxlan, XdpModeArg},
    layout::{Hook, Layout, remove_file_if_exists},
    net::{Ipv4Net, Ipv6Net},
    tunnel::{self, RouteDevice, TunnelDevice, TunnelError},
};

/// The datapath object, built by xhost-user's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xhost"));

/// The embedded eBPF object (for tests that load it on their own).
pub fn object() -> &'static [u8] {
    OBJECT
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "xhost is already loaded here: {} holds pins (run `xhost-user unload` first, or use another --pin-dir)",
        .0.display()
    )]
    AlreadyLoaded(PathBuf),
    #[error("{} is not on a bpf filesystem", .0.display())]
    NotBpffs(PathBuf),
    #[error("{iface} already has {program} attached at {hook} (another xhost instance?)")]
    AlreadyAttached {
        iface: String,
        hook: &'static str,
        program: String,
    },
    #[error("pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {program} to {iface} ({hook})")]
    Attach {
        program: &'static str,
        iface: String,
        hook: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("XDP native mode is not available on {iface} (use --xdp-mode skb or off)")]
    XdpNative {
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("{iface}: adding a clsact qdisc")]
    Clsact {
        iface: String,
        #[source]
        source: Box<aya::programs::tc::TcError>,
    },
    #[error("{iface}: reading its tc filters")]
    TcFilters {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{iface}: the attachment is not a bpf_link, so it cannot be pinned")]
    Link {
        iface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Layout(Box<crate::adopt::AdoptError>),
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {map}, entry {entry}")]
    Entry {
        map: &'static str,
        entry: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Which XDP mode ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpAttached {
    Native,
    Skb,
    Off,
}

/// A live attachment, pinned so that it survives the process when asked.
enum Attachment {
    /// A tcx or XDP link: detached by unpinning + closing.
    Link {
        link: Option<PinnedLink>,
        path: PathBuf,
    },
    /// A classic tc filter, found by its priority and handle; `path`
    /// (under `<pin-dir>/filters`) pins the program it runs (the record that lets `unload` find it after
    /// this process is gone).
    Filter {
        iface: String,
        hook: Hook,
        path: PathBuf,
    },
}

pub struct Datapath {
    layout: Layout,
    ebpf: Ebpf,
    routes: RouteTable,
    local_nets: LpmTrie<MapData, [u8; 4], LocalNet>,
    endpoints: HashMap<MapData, [u8; 4], Endpoint>,
    endpoint_ports: HashMap<MapData, u32, u32>,
    /// The IPv6 maps: `ROUTES6`, `LOCAL_NETS6`, `ENDPOINTS6`, and the peer
    /// hosts on an IPv6 underlay.
    routes6: LpmTrie<MapData, [u8; 16], Peer6>,
    local_nets6: LpmTrie<MapData, [u8; 16], LocalNet>,
    endpoints6: HashMap<MapData, [u8; 16], Endpoint>,
    peer_hosts: HashMap<MapData, [u8; 4], PeerHost>,
    peer_hosts6: HashMap<MapData, [u8; 16], PeerHost>,
    /// Per-peer counters (`PEER_STATS`), by `PeerHost::slot`.
    peer_stats: PerCpuArray<MapData, PeerCounters>,
    /// The slot each peer host in `PEER_HOSTS` or `PEER_HOSTS6` has, and
    /// the slots free.
    peer_slots: BTreeMap<IpAddr, u32>,
    free_slots: Vec<u32>,
    underlay_addrs: HashMap<MapData, [u8; 4], u32>,
    attachments: BTreeMap<(String, Hook), Attachment>,
    /// What the kernel offers, probed at load, and the TC method chosen.
    features: KernelFeatures,
    method: TcMethod,
    /// Devices whose clsact qdisc this instance added (classic tc).
    clsact_added: Vec<String>,
    pinned_maps: Vec<PathBuf>,
    /// VXLAN mode's device; dropped (deleted) after everything else.
    tunnel: Option<TunnelDevice>,
    /// Set by `keep_running`: leave everything in place on drop.
    keep: bool,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Wraps a failed operation on the map named `map`.
fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// Wraps a failed write or removal of `entry` in the map named `map`.
fn entry_error(
    map: &'static str,
    entry: impl std::fmt::Display,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Entry {
        map,
        entry: entry.to_string(),
        source,
    }
}

fn key(net: &Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.addr().octets())
}

fn key6(net: &Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.addr().octets())
}

/// A peer host as `Peer6` holds it: IPv6, or IPv4 mapped.
pub fn peer6_host(peer: IpAddr) -> [u8; 16] {
    match peer {
        IpAddr::V4(a) => xhost_common::map_v4(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// [`peer6_host`]'s inverse.
pub fn peer6_addr(host: [u8; 16]) -> IpAddr {
    match xhost_common::mapped_v4(&host) {
        Some(a) => IpAddr::from(a),
        None => IpAddr::from(host),
    }
}

/// The map that holds peer host `host`.
fn peer_hosts_map(host: IpAddr) -> &'static str {
    match host {
        IpAddr::V4(_) => MAP_PEER_HOSTS,
        IpAddr::V6(_) => MAP_PEER_HOSTS6,
    }
}

/// `ROUTES` and the datapath generation, written only together: the
/// datapath caches answers per CPU (`ROUTES` per address, whole forwarding
/// decisions per flow) and trusts one only while the generation it was read
/// under is current, so every write is followed by a bump.
pub struct RouteTable {
    trie: LpmTrie<MapData, [u8; 4], Peer>,
    generation: Array<MapData, u64>,
}

impl RouteTable {
    /// Takes the two maps of one loaded object.
    pub fn new(trie: aya::maps::Map, generation: aya::maps::Map) -> Result<Self, DatapathError> {
        Ok(Self {
            trie: trie.try_into().map_err(map_error(MAP_ROUTES))?,
            generation: generation.try_into().map_err(map_error(MAP_DATAPATH_GEN))?,
        })
    }

    /// Routes `net` to the peer host `peer`.
    pub fn set(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), DatapathError> {
        let value = Peer {
            host: peer.octets(),
            flags: 0,
        };
        self.trie
            .insert(&key(net), value, 0)
            .map_err(entry_error(MAP_ROUTES, format_args!("{net} via {peer}")))?;
        self.retire_cached()
    }

    pub fn remove(&mut self, net: &Ipv4Net) -> Result<(), DatapathError> {
        self.trie
            .remove(&key(net))
            .map_err(entry_error(MAP_ROUTES, net))?;
        self.retire_cached()
    }

    /// Bumps the generation: retires every answer the datapath cached
    /// before the change just made (to `ROUTES`, `ENDPOINTS`, or the
    /// kernel's routes and neighbours).
    pub fn retire_cached(&mut self) -> Result<(), DatapathError> {
        let current = self
            .generation
            .get(&0, 0)
            .map_err(map_error(MAP_DATAPATH_GEN))?;
        self.generation
            .set(0, current.wrapping_add(1), 0)
            .map_err(map_error(MAP_DATAPATH_GEN))
    }
}

/// What a load sets in the object besides the kernel's features.
#[derive(Clone, Copy, Debug)]
pub struct LoadOpts {
    /// What is done with refused packets (a constant of the programs).
    pub deny: DenyArg,
    /// Capacity of `ENDPOINTS`, `ENDPOINT_PORTS` and `ENDPOINTS6`.
    pub max_endpoints: u32,
}

impl Datapath {
    /// Probes the kernel and picks the TC attach method (`attach`), loads
    /// and verifies the programs, creates and pins the maps, and in VXLAN
    /// mode (`tunnel`: the underlay and the settings) creates the vxlan
    /// device. Attaches nothing yet.
    pub fn load(
        layout: &Layout,
        tunnel: Option<(&str, Vxlan)>,
        attach: AttachArg,
        opts: LoadOpts,
    ) -> Result<Self, DatapathError> {
        if layout.in_use() {
            return Err(DatapathError::AlreadyLoaded(layout.pin_dir.clone()));
        }
        // Before anything is created: a kernel that cannot run the programs,
        // or lacks a forced method, is one line and nothing touched.
        let features = KernelFeatures::probe()?;
        let method = features.choose(attach)?;
        info!(
            "kernel {}: TC programs attach through {} ({}), tcx {}",
            features.release,
            method.as_str(),
            match attach {
                AttachArg::Auto => "auto",
                AttachArg::Tc | AttachArg::Tcx => "forced",
            },
            if features.tcx { "present" } else { "absent" }
        );
        let fingerprint = crate::adopt::object_shapes(opts.max_endpoints)
            .map(|s| crate::adopt::fingerprint(&s))
            .map_err(|e| DatapathError::Layout(Box::new(e)))?;
        ensure_bpffs(&layout.pin_dir)?;
        // Deleted again if anything below fails (dropped with the error).
        let tunnel = tunnel
            .map(|(underlay, vxlan)| TunnelDevice::create(underlay, vxlan))
            .transpose()?;
        let mut guard = PinGuard {
            paths: Vec::new(),
            layout: layout.clone(),
        };
        for dir in [&layout.pin_dir, &layout.links_dir()] {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let dir = layout.layout_dir();
        layout
            .record_layout(&fingerprint)
            .map_err(|source| DatapathError::PinDir { path: dir, source })?;
        let dp = Self::open(layout, features, method, tunnel, opts, &mut guard, None)?;
        guard.paths.clear();
        Ok(dp)
    }

    /// Takes over the datapath pinned under `layout` (checked by
    /// [`crate::adopt::find`]): loads this build's programs on the pinned
    /// maps, whose contents stay, and replaces the program of every pinned
    /// link in place (BPF_LINK_UPDATE) and of every classic tc filter (the
    /// same priority and handle, replaced by netlink), so that no packet
    /// finds a hook empty. Attachments whose interface is gone are dropped.
    /// In VXLAN mode `tunnel` is the pinned datapath's vxlan device
    /// (checked by `adopt::find`): the programs are built for it again.
    /// Until [`Datapath::adopted`], dropping the result leaves everything
    /// pinned and forwarding.
    ///
    /// With a `migration` (pinned maps of another build's layout), the
    /// programs are loaded on new maps that it fills from the pinned ones
    /// and renames into place before the programs are swapped in, and
    /// settles after (in the order [`crate::migrate`] describes).
    pub fn adopt(
        layout: &Layout,
        method: TcMethod,
        opts: LoadOpts,
        migration: Option<&crate::migrate::Migration>,
        tunnel: Option<TunnelDevice>,
    ) -> Result<Self, DatapathError> {
        let features = KernelFeatures::probe()?;
        let method = features.choose(match method {
            TcMethod::Tcx => AttachArg::Tcx,
            TcMethod::Tc => AttachArg::Tc,
        })?;
        info!(
            "kernel {}: adopting the datapath pinned under {} (TC programs through {})",
            features.release,
            layout.pin_dir.display(),
            method.as_str()
        );
        let mut guard = PinGuard {
            paths: Vec::new(),
            layout: layout.clone(),
        };
        let same = |name: &str| layout.map(name);
        let (mut dp, carried) = match migration {
            None => (
                Self::open(
                    layout,
                    features,
                    method,
                    tunnel,
                    opts,
                    &mut guard,
                    Some(&same),
                )?,
                None,
            ),
            Some(m) => {
                m.prepare(layout)?;
                let staged = |name: &str| m.map_path(layout, name);
                let opened = Self::open(
                    layout,
                    features,
                    method,
                    tunnel,
                    opts,
                    &mut guard,
                    Some(&staged),
                );
                // Until renamed into place, the staged maps serve nothing.
                let carried = opened.and_then(|dp| Ok((dp, m.carry(layout)?)));
                let (dp, carried) =
                    carried.inspect_err(|_| crate::migrate::discard_staging(layout))?;
                (dp, Some(carried))
            }
        };
        dp.clsact_added = layout.clsact_marked();
        // The peers' PEER_STATS slots stay theirs (their counters go on).
        let held: Vec<(IpAddr, PeerHost)> = dp
            .peer_hosts
            .iter()
            .map(|r| r.map(|(h, v)| (IpAddr::from(h), v)))
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_PEER_HOSTS))?;
        let held6: Vec<(IpAddr, PeerHost)> = dp
            .peer_hosts6
            .iter()
            .map(|r| r.map(|(h, v)| (IpAddr::from(h), v)))
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_PEER_HOSTS6))?;
        for (host, v) in held.into_iter().chain(held6) {
            dp.peer_slots.insert(host, v.slot);
            dp.free_slots.retain(|&s| s != v.slot);
        }
        let links: Vec<_> = pinned_names(&layout.links_dir());
        for (iface, hook, path) in links {
            dp.update_link(&iface, hook, path)?;
        }
        let filters: Vec<_> = pinned_names(&layout.filters_dir());
        for (iface, hook, path) in filters {
            dp.replace_filter(&iface, hook, path)?;
        }
        // What the old programs cached is not this build's to trust.
        dp.routes.retire_cached()?;
        if let Some(c) = carried {
            c.settle(layout)?;
        }
        Ok(dp)
    }

    /// Ends an adoption: from now on, dropping the datapath detaches it
    /// (unless [`Datapath::keep_running`]).
    pub fn adopted(&mut self) {
        self.keep = false;
        if let Some(t) = self.tunnel.as_mut() {
            t.own();
        }
    }

    /// Whether this is an adoption not yet ended by [`Datapath::adopted`].
    pub fn is_adopted(&self) -> bool {
        self.keep
    }

    /// Loads the object on maps pinned under `layout` (`reuse`: where each
    /// map is pinned, kept as it is, or created and pinned there when
    /// absent) or new ones pinned there (their paths go to `guard` until
    /// the Datapath owns them), and the programs.
    fn open(
        layout: &Layout,
        features: KernelFeatures,
        method: TcMethod,
        tunnel: Option<TunnelDevice>,
        opts: LoadOpts,
        guard: &mut PinGuard,
        reuse: Option<&dyn Fn(&str) -> PathBuf>,
    ) -> Result<Self, DatapathError> {
        let (tunnel_ifindex, vni, port) = tunnel.as_ref().map_or((0, 0, 0), |t| {
            (t.ifindex, t.vxlan.vni, u32::from(t.vxlan.port))
        });
        // Only the log levels the agent prints are compiled in at load time,
        // so disabled aya-log statements cost one branch in the kernel.
        let level = log_level_mask();
        for f in &features.fallbacks {
            warn!("kernel {}: {f}", features.release);
        }
        let helpers = features.helper_bits();
        let LoadOpts {
            deny,
            max_endpoints,
        } = opts;
        let deny_mode = deny.constant();
        if deny == DenyArg::Reject {
            info!(
                "refused packets are answered (deny reject): TCP RST or ICMP administratively prohibited, at most {} a second per CPU",
                xhost_common::REJECT_RATE_PER_SEC
            );
        }
        let mut loader = EbpfLoader::new();
        loader
            .override_global(aya_log::LEVEL, &level, true)
            .override_global(GLOBAL_HELPERS, &helpers, true)
            .override_global(GLOBAL_TUNNEL_IFINDEX, &tunnel_ifindex, true)
            .override_global(GLOBAL_TUNNEL_VNI, &vni, true)
            .override_global(GLOBAL_TUNNEL_PORT, &port, true)
            .override_global(GLOBAL_DENY, &deny_mode, true);
        // Pinned maps keep their size (adoption checked it is this one).
        for name in crate::adopt::ENDPOINT_MAPS {
            loader.map_max_entries(name, max_endpoints);
        }
        if let Some(at) = reuse {
            // aya opens a map pinned at the given path instead of creating
            // it; the shapes were checked against this object before.
            for name in PINNED_MAPS {
                loader.map_pin_path(name, at(name));
            }
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| DatapathError::Object(Box::new(e)))?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("eBPF logs unavailable: {e}");
                None
            }
        };
        // Pin each map as it is taken; the guard unpins them all if a later
        // step fails before the Datapath (whose Drop takes over) exists.
        let mut maps = Vec::with_capacity(PINNED_MAPS.len());
        for name in PINNED_MAPS {
            let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
            let path = layout.map(name);
            if reuse.is_none() {
                map.pin(&path).map_err(|source| DatapathError::Pin {
                    path: path.clone(),
                    source,
                })?;
                guard.paths.push(path);
            }
            maps.push(map);
        }
        let [
            routes,
            local_nets,
            endpoints,
            peer_hosts,
            _stats,
            generation,
            underlay_addrs,
            endpoint_ports,
            peer_stats,
            // The IPv6 maps, written like the IPv4 ones.
            routes6,
            local_nets6,
            endpoints6,
            peer_hosts6,
        ] = <[aya::maps::Map; 13]>::try_from(maps).map_err(|_| DatapathError::Missing("maps"))?;
        let mut dp = Self {
            layout: layout.clone(),
            routes: RouteTable::new(routes, generation)?,
            local_nets: local_nets.try_into().map_err(map_error(MAP_LOCAL_NETS))?,
            endpoints: endpoints.try_into().map_err(map_error(MAP_ENDPOINTS))?,
            endpoint_ports: endpoint_ports
                .try_into()
                .map_err(map_error(MAP_ENDPOINT_PORTS))?,
            routes6: routes6.try_into().map_err(map_error(MAP_ROUTES6))?,
            local_nets6: local_nets6.try_into().map_err(map_error(MAP_LOCAL_NETS6))?,
            endpoints6: endpoints6.try_into().map_err(map_error(MAP_ENDPOINTS6))?,
            peer_hosts: peer_hosts.try_into().map_err(map_error(MAP_PEER_HOSTS))?,
            peer_hosts6: peer_hosts6.try_into().map_err(map_error(MAP_PEER_HOSTS6))?,
            peer_stats: peer_stats.try_into().map_err(map_error(MAP_PEER_STATS))?,
            peer_slots: BTreeMap::new(),
            // Handed out lowest first.
            free_slots: (0..MAX_PEER_HOSTS).rev().collect(),
            underlay_addrs: underlay_addrs
                .try_into()
                .map_err(map_error(MAP_UNDERLAY_ADDRS))?,
            ebpf,
            attachments: BTreeMap::new(),
            features,
            method,
            clsact_added: Vec::new(),
            pinned_maps: PINNED_MAPS.iter().map(|n| layout.map(n)).collect(),
            tunnel,
            // An adopted datapath stays as it is should the adoption fail.
            keep: reuse.is_some(),
            _logger: logger,
        };
        // From here on, Drop undoes whatever is done.
        guard.paths.clear();
        let tunnel_progs: &[&'static str] = if dp.tunnel.is_some() {
            &[PROG_VXLAN_OUT, PROG_VXLAN_IN]
        } else {
            &[]
        };
        for &name in [PROG_BRIDGE_IN, PROG_VETH_IN, PROG_NIC_IN]
            .iter()
            .chain(tunnel_progs)
        {
            let prog: &mut SchedClassifier = dp.program(name)?;
            prog.load().map_err(|source| DatapathError::Program {
                program: name,
                source: Box::new(source),
            })?;
        }
        let xdp: &mut Xdp = dp.program(PROG_NIC_XDP)?;
        xdp.load().map_err(|source| DatapathError::Program {
            program: PROG_NIC_XDP,
            source: Box::new(source),
        })?;
        Ok(dp)
    }

    /// Adoption: points the pinned tcx or XDP link `path` at this build's
    /// program (aya's `attach_to_link`, which is BPF_LINK_UPDATE: the old
    /// program runs until the new one is in). A link whose interface is
    /// gone is unpinned.
    fn update_link(&mut self, iface: &str, hook: Hook, path: PathBuf) -> Result<(), DatapathError> {
        if crate::net::ifindex(iface).is_err() {
            info!(
                "{iface} is gone: dropping its pinned link ({})",
                hook.as_str()
            );
            let _ = remove_file_if_exists(&path);
            return Ok(());
        }
        let program = hook.program();
        let link_err = |source| DatapathError::Link {
            iface: iface.into(),
            source,
        };
        let attach_err = |source| DatapathError::Attach {
            program,
            iface: iface.into(),
            hook: hook.as_str(),
            source: Box::new(source),
        };
        let fd = FdLink::from(PinnedLink::from_pin(&path).map_err(link_err)?);
        if hook == Hook::Xdp {
            let prog: &mut Xdp = self.program(PROG_NIC_XDP)?;
            let link = aya::programs::xdp::XdpLink::try_from(fd).map_err(link_err)?;
            let id = prog.attach_to_link(link).map_err(attach_err)?;
            // The pin holds the link; this fd may close.
            drop(prog.take_link(id).map_err(attach_err)?);
        } else {
            let prog: &mut SchedClassifier = self.program(program)?;
            let link = aya::programs::tc::SchedClassifierLink::try_from(fd).map_err(link_err)?;
            let id = prog.attach_to_link(link).map_err(attach_err)?;
            let taken = prog.take_link(id).map_err(attach_err)?;
            drop(FdLink::try_from(taken).map_err(link_err)?);
        }
        let link = PinnedLink::from_pin(&path).map_err(link_err)?;
        self.attachments.insert(
            (iface.to_owned(), hook),
            Attachment::Link {
                link: Some(link),
                path,
            },
        );
        info!("replaced {program} on {iface} ({}) in place", hook.as_str());
        Ok(())
    }

    /// Adoption, classic tc: replaces the program of xhost's filter at
    /// `hook` of `iface` in place (same parent, priority, protocol and
    /// handle; `NLM_F_REPLACE` without `NLM_F_CREATE`, so cls_bpf swaps the
    /// program atomically and a filter that is gone is not added again),
    /// then pins the new program where the old one was. A filter that is
    /// gone (interface deleted, or removed by hand) is forgotten.
    fn replace_filter(
        &mut self,
        iface: &str,
        hook: Hook,
        path: PathBuf,
    ) -> Result<(), DatapathError> {
        let program = hook.program();
        let replaced = match crate::net::ifindex(iface) {
            Err(_) => false,
            Ok(ifindex) => {
                let prog: &mut SchedClassifier = self.program(program)?;
                let fd = prog.fd().map_err(|source| DatapathError::Program {
                    program,
                    source: Box::new(source),
                })?;
                let filter = crate::netlink::BpfFilter {
                    ifindex,
                    parent: attach::tc_parent(attach::tc_attach_type(hook)),
                    priority: TC_PRIORITY,
                    handle: attach::tc_handle(hook),
                    name: program,
                };
                match crate::netlink::Rtnl::open()
                    .and_then(|mut rtnl| rtnl.replace_bpf_filter(&filter, fd.as_fd().as_raw_fd()))
                {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(
                            "{iface}: replacing xhost's tc filter ({}): {e}",
                            hook.as_str()
                        );
                        false
                    }
                }
            }
        };
        let _ = remove_file_if_exists(&path);
        if !replaced {
            return Ok(());
        }
        let prog: &mut SchedClassifier = self.program(program)?;
        prog.pin(&path).map_err(|source| DatapathError::Pin {
            path: path.clone(),
            source,
        })?;
        self.attachments.insert(
            (iface.to_owned(), hook),
            Attachment::Filter {
                iface: iface.to_owned(),
                hook,
                path,
            },
        );
        info!(
            "replaced {program} on {iface} ({}, tc filter pref {TC_PRIORITY}) in place",
            hook.as_str()
        );
        Ok(())
    }

    fn program<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, DatapathError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing(name))?;
        prog.try_into().map_err(|source| DatapathError::Program {
            program: name,
            source: Box::new(source),
        })
    }

    /// Attaches the underlay programs: XDP validation (per `mode`) and the
    /// TC ingress delivery program.
    pub fn attach_underlay(
        &mut self,
        iface: &str,
        mode: XdpModeArg,
    ) -> Result<XdpAttached, DatapathError> {
        refuse_if_attached(iface, Hook::UnderlayIngress)?;
        let attached = self.attach_xdp_as(iface, mode)?;
        self.attach_tc(iface, Hook::UnderlayIngress)?;
        Ok(attached)
    }

    /// Adoption: keeps the underlay's adopted attachments, attaching what
    /// is missing and moving XDP to `mode` when it asks for another one
    /// than `prior` (what the state file says was attached). XDP only
    /// drops early what the TC program drops too, so re-attaching it
    /// leaves no gap.
    pub fn adopt_underlay(
        &mut self,
        iface: &str,
        mode: XdpModeArg,
        prior: Option<XdpAttached>,
    ) -> Result<XdpAttached, DatapathError> {
        let has_xdp = self
            .attachments
            .contains_key(&(iface.to_owned(), Hook::Xdp));
        let keeps = match (mode, prior) {
            (XdpModeArg::Off, _) => false,
            (XdpModeArg::Native, Some(p)) => p == XdpAttached::Native,
            (XdpModeArg::Skb, Some(p)) => p == XdpAttached::Skb,
            (XdpModeArg::Auto, _) | (_, None) => true,
        };
        let attached = if has_xdp && keeps {
            prior.unwrap_or(XdpAttached::Native)
        } else {
            if has_xdp {
                self.detach(iface, Hook::Xdp);
            }
            self.attach_xdp_as(iface, mode)?
        };
        if !self
            .attachments
            .contains_key(&(iface.to_owned(), Hook::UnderlayIngress))
        {
            self.attach_tc(iface, Hook::UnderlayIngress)?;
        }
        Ok(attached)
    }

    fn attach_xdp_as(
        &mut self,
        iface: &str,
        mode: XdpModeArg,
    ) -> Result<XdpAttached, DatapathError> {
        Ok(match mode {
            XdpModeArg::Off => XdpAttached::Off,
            XdpModeArg::Skb => {
                self.attach_xdp(iface, XdpMode::Skb)?;
                XdpAttached::Skb
            }
            XdpModeArg::Native => {
                self.attach_xdp(iface, XdpMode::Driver)
                    .map_err(|e| match e {
                        DatapathError::Attach { source, .. } => DatapathError::XdpNative {
                            iface: iface.into(),
                            source,
                        },
                        e => e,
                    })?;
                XdpAttached::Native
            }
            // A veth with an XDP program strips TSO/GSO from its peer
            // (drivers/net/veth.c), so every TCP segment crosses the pair on
            // its own: measured 4.7 vs 12-14 Gbit/s on the demo topology. The
            // TC program enforces the same policy, so auto leaves XDP off there.
            XdpModeArg::Auto
                if crate::net::kind_of(iface).is_ok_and(|k| k.as_deref() == Some("veth")) =>
            {
                info!(
                    "XDP not attached to veth {iface}: it would disable TSO on its peer; TC validates alone (--xdp-mode native forces it)"
                );
                XdpAttached::Off
            }
            XdpModeArg::Auto => match self.attach_xdp(iface, XdpMode::Driver) {
                Ok(()) => XdpAttached::Native,
                Err(DatapathError::Attach { source, .. }) if !is_busy(&source) => {
                    warn!(
                        "XDP native mode unavailable on {iface} ({source}); using generic (SKB) mode"
                    );
                    self.attach_xdp(iface, XdpMode::Skb)?;
                    XdpAttached::Skb
                }
                Err(e) => return Err(e),
            },
        })
    }

    /// VXLAN mode: attaches the tunnel programs to the vxlan device.
    pub fn attach_tunnel(&mut self) -> Result<(), DatapathError> {
        if self.tunnel.is_some() {
            self.attach_tc(tunnel::DEVICE, Hook::TunnelIngress)?;
            self.attach_tc(tunnel::DEVICE, Hook::TunnelEgress)?;
        }
        Ok(())
    }

    /// Adoption in VXLAN mode: the tunnel programs were replaced in place
    /// on the device's pinned attachments; a hook without one (its pin
    /// removed by hand) is attached again.
    pub fn adopt_tunnel(&mut self) -> Result<(), DatapathError> {
        if self.tunnel.is_none() {
            return Ok(());
        }
        for hook in [Hook::TunnelIngress, Hook::TunnelEgress] {
            if !self
                .attachments
                .contains_key(&(tunnel::DEVICE.to_owned(), hook))
            {
                self.attach_tc(tunnel::DEVICE, hook)?;
            }
        }
        Ok(())
    }

    /// The vxlan device, in VXLAN mode.
    pub fn tunnel(&self) -> Option<&TunnelDevice> {
        self.tunnel.as_ref()
    }

    /// Where the kernel's routes of peer subnets lead: into the vxlan
    /// device in VXLAN mode, else via the peer host out of `underlay`.
    pub fn route_device(&self, underlay: u32) -> RouteDevice {
        match &self.tunnel {
            Some(t) => RouteDevice {
                oif: t.ifindex,
                via_peer: false,
                ipv6_outer_mtu: Some(t.mtu.saturating_sub(xhost_common::VXLAN6_EXTRA)),
            },
            None => RouteDevice {
                oif: underlay,
                via_peer: true,
                ipv6_outer_mtu: None,
            },
        }
    }

    fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            program: PROG_NIC_XDP,
            iface: iface.into(),
            hook: "xdp",
            source: Box::new(source),
        };
        let prog: &mut Xdp = self.program(PROG_NIC_XDP)?;
        let id = prog.attach(iface, mode).map_err(|e| {
            if is_busy(&e) {
                DatapathError::AlreadyAttached {
                    iface: iface.into(),
                    hook: "xdp",
                    program: "an XDP program".into(),
                }
            } else {
                attach_err(e)
            }
        })?;
        let link = prog.take_link(id).map_err(attach_err)?;
        // aya attaches through a link where the kernel has XDP links (5.9,
        // below what the TC programs need), else through netlink.
        let fd: FdLink = link.try_into().map_err(|source| DatapathError::Link {
            iface: iface.into(),
            source,
        })?;
        self.record(iface, Hook::Xdp, fd)
    }

    /// Attaches the bridge program to a Docker bridge's ingress.
    pub fn attach_bridge(&mut self, bridge: &str) -> Result<(), DatapathError> {
        if self
            .attachments
            .contains_key(&(bridge.to_owned(), Hook::BridgeIngress))
        {
            return Ok(());
        }
        refuse_if_attached(bridge, Hook::BridgeIngress)?;
        self.attach_tc(bridge, Hook::BridgeIngress)
    }

    fn attach_tc(&mut self, iface: &str, hook: Hook) -> Result<(), DatapathError> {
        match self.method {
            TcMethod::Tcx => self.attach_tcx(iface, hook),
            TcMethod::Tc => self.attach_filter(iface, hook),
        }
    }

    /// tcx (kernel >= 6.6): a bpf_link that can be pinned, needs no qdisc,
    /// and leaves nothing behind when closed. Appended after the device's
    /// other tcx programs; all classic filters run after it.
    fn attach_tcx(&mut self, iface: &str, hook: Hook) -> Result<(), DatapathError> {
        let program = hook.program();
        let attach_err = |source| DatapathError::Attach {
            program,
            iface: iface.into(),
            hook: hook.as_str(),
            source: Box::new(source),
        };
        let prog: &mut SchedClassifier = self.program(program)?;
        let id = prog
            .attach_with_options(
                iface,
                attach::tc_attach_type(hook),
                TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
            )
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd: FdLink = link.try_into().map_err(|source| DatapathError::Link {
            iface: iface.into(),
            source,
        })?;
        self.record(iface, hook, fd)
    }

    /// Classic tc: a cls_bpf filter in direct-action mode under the
    /// device's clsact qdisc (added if missing, and then removed again at
    /// the end), at xhost's priority and the hook's handle, named after
    /// the program. The program is pinned first, so a filter never exists
    /// without the record `unload` finds it by.
    fn attach_filter(&mut self, iface: &str, hook: Hook) -> Result<(), DatapathError> {
        let program = hook.program();
        let attach_err = |source| DatapathError::Attach {
            program,
            iface: iface.into(),
            hook: hook.as_str(),
            source: Box::new(source),
        };
        self.ensure_clsact(iface)?;
        let path = self.layout.filter(iface, hook);
        let dir = self.layout.filters_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|source| DatapathError::PinDir { path: dir, source })?;
        let _ = remove_file_if_exists(&path);
        let prog: &mut SchedClassifier = self.program(program)?;
        prog.pin(&path).map_err(|source| DatapathError::Pin {
            path: path.clone(),
            source,
        })?;
        let options = NlOptions {
            priority: TC_PRIORITY,
            handle: TcHandle::from(attach::tc_handle(hook)),
            classid: None,
        };
        let attached = prog
            .attach_with_options(
                iface,
                attach::tc_attach_type(hook),
                TcAttachOptions::Netlink(options),
            )
            .and_then(|id| prog.take_link(id));
        match attached {
            // The link is plain data (device, priority, handle) whose drop
            // would delete the filter: `detach` deletes it by the same key,
            // and a detached datapath must keep it.
            Ok(link) => std::mem::forget(link),
            Err(e) => {
                let _ = remove_file_if_exists(&path);
                return Err(attach_err(e));
            }
        }
        self.attachments.insert(
            (iface.to_owned(), hook),
            Attachment::Filter {
                iface: iface.to_owned(),
                hook,
                path,
            },
        );
        info!(
            "attached {program} to {iface} ({}, tc filter pref {TC_PRIORITY} handle {:#x})",
            hook.as_str(),
            attach::tc_handle(hook)
        );
        Ok(())
    }

    /// Adds a clsact qdisc to `iface` unless it has one, and records
    /// (on bpffs, before adding it) that xhost did.
    fn ensure_clsact(&mut self, iface: &str) -> Result<(), DatapathError> {
        let filters_err = |source| DatapathError::TcFilters {
            iface: iface.into(),
            source,
        };
        let ifindex =
            crate::net::ifindex(iface).map_err(|e| filters_err(std::io::Error::other(e)))?;
        let mut rtnl = crate::netlink::Rtnl::open().map_err(filters_err)?;
        if rtnl.has_clsact(ifindex).map_err(filters_err)? {
            return Ok(());
        }
        let marker = self.layout.clsact_marker(iface);
        std::fs::create_dir_all(&marker).map_err(|source| DatapathError::PinDir {
            path: marker.clone(),
            source,
        })?;
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
            let _ = std::fs::remove_dir(&marker);
            let _ = std::fs::remove_dir(self.layout.clsact_dir());
            return Err(DatapathError::Clsact {
                iface: iface.into(),
                source: Box::new(e),
            });
        }
        info!("added a clsact qdisc to {iface}");
        self.clsact_added.push(iface.to_owned());
        Ok(())
    }

    /// The kernel's features, probed at load.
    pub fn features(&self) -> &KernelFeatures {
        &self.features
    }

    /// The TC attach method in use.
    pub fn method(&self) -> TcMethod {
        self.method
    }

    fn record(&mut self, iface: &str, hook: Hook, fd: FdLink) -> Result<(), DatapathError> {
        let path = self.layout.link(iface, hook);
        let dir = self.layout.links_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|source| DatapathError::PinDir { path: dir, source })?;
        // A stale pin (agent killed, interface gone) would make pin() fail.
        let _ = remove_file_if_exists(&path);
        let link = fd.pin(&path).map_err(|source| DatapathError::Pin {
            path: path.clone(),
            source,
        })?;
        self.attachments.insert(
            (iface.to_owned(), hook),
            Attachment::Link {
                link: Some(link),
                path,
            },
        );
        info!("attached {} to {iface} ({})", hook.program(), hook.as_str());
        Ok(())
    }

    /// Detaches the bridge program from `bridge` (network removed).
    pub fn detach_bridge(&mut self, bridge: &str) {
        self.detach(bridge, Hook::BridgeIngress);
    }

    /// Attaches the container-side program to a container's host veth.
    pub fn attach_port(&mut self, port: &str) -> Result<(), DatapathError> {
        if self
            .attachments
            .contains_key(&(port.to_owned(), Hook::ContainerIngress))
        {
            return Ok(());
        }
        self.attach_tc(port, Hook::ContainerIngress)
    }

    /// Detaches it (container gone; if its veth is gone too, the kernel
    /// already released the program and only the pin is left to remove).
    pub fn detach_port(&mut self, port: &str) {
        self.detach(port, Hook::ContainerIngress);
    }

    fn detach(&mut self, iface: &str, hook: Hook) {
        if let Some(a) = self.attachments.remove(&(iface.to_owned(), hook)) {
            detach(a);
            self.remove_clsact(iface);
            info!(
                "detached {} from {iface} ({})",
                hook.program(),
                hook.as_str()
            );
        }
    }

    /// The pins this instance made (maps, links, tc filters' programs)
    /// that are no longer on the bpffs: removed by hand. The programs stay
    /// attached and the maps in use (this process holds them), but
    /// `status`, `unload` and a later `load` cannot find them any more.
    pub fn missing_pins(&self) -> Vec<PathBuf> {
        let links = self.attachments.values().map(|a| match a {
            Attachment::Link { path, .. } | Attachment::Filter { path, .. } => path,
        });
        self.pinned_maps
            .iter()
            .chain(links)
            .filter(|p| !p.exists())
            .cloned()
            .collect()
    }

    /// (iface, hook) of everything attached.
    pub fn attachments(&self) -> impl Iterator<Item = (&str, Hook)> {
        self.attachments.keys().map(|(i, h)| (i.as_str(), *h))
    }

    /// Marks `host` as a peer host (its ICMP errors may reach containers),
    /// with a `PEER_STATS` slot of its own, zeroed before it is handed out.
    pub fn add_peer_host(&mut self, host: IpAddr) -> Result<(), DatapathError> {
        let slot = match self.peer_slots.get(&host) {
            Some(&slot) => slot,
            None => {
                let slot = self
                    .free_slots
                    .pop()
                    .ok_or(DatapathError::Missing("a free PEER_STATS slot"))?;
                let zero = nr_cpus()
                    .map_err(|(_, e)| e)
                    .and_then(|n| PerCpuValues::try_from(vec![PeerCounters::default(); n]))
                    .map_err(|e| DatapathError::Map {
                        map: MAP_PEER_STATS,
                        source: aya::maps::MapError::IoError(e),
                    });
                if let Err(e) = zero.and_then(|z| {
                    self.peer_stats
                        .set(slot, z, 0)
                        .map_err(entry_error(MAP_PEER_STATS, slot))
                }) {
                    self.free_slots.push(slot);
                    return Err(e);
                }
                slot
            }
        };
        let value = PeerHost { flags: 0, slot };
        let written = match host {
            IpAddr::V4(a) => self.peer_hosts.insert(a.octets(), value, 0),
            IpAddr::V6(a) => self.peer_hosts6.insert(a.octets(), value, 0),
        };
        if let Err(e) = written.map_err(entry_error(peer_hosts_map(host), host)) {
            if !self.peer_slots.contains_key(&host) {
                self.free_slots.push(slot);
            }
            return Err(e);
        }
        self.peer_slots.insert(host, slot);
        Ok(())
    }

    pub fn remove_peer_host(&mut self, host: IpAddr) -> Result<(), DatapathError> {
        match host {
            IpAddr::V4(a) => self.peer_hosts.remove(&a.octets()),
            IpAddr::V6(a) => self.peer_hosts6.remove(&a.octets()),
        }
        .map_err(entry_error(peer_hosts_map(host), host))?;
        if let Some(slot) = self.peer_slots.remove(&host) {
            self.free_slots.push(slot);
        }
        Ok(())
    }

    /// Makes `UNDERLAY_ADDRS` hold `addrs`, the addresses of the underlay
    /// `ifindex`, and nothing else: new ones are written before stale ones
    /// go, unless both would not fit the map together. Beyond the map's
    /// capacity the rest are left out (and said so): VXLAN packets to them
    /// are the kernel's device's to decapsulate.
    pub fn set_underlay_addrs(
        &mut self,
        ifindex: u32,
        addrs: &[Ipv4Addr],
    ) -> Result<(), DatapathError> {
        let max = MAX_UNDERLAY_ADDRS as usize;
        if addrs.len() > max {
            warn!(
                "the underlay has {} IPv4 addresses; {MAP_UNDERLAY_ADDRS} holds {max}: VXLAN packets to the others are decapsulated by the kernel",
                addrs.len()
            );
        }
        let want = &addrs[..addrs.len().min(max)];
        let held = self
            .underlay_addrs
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error(MAP_UNDERLAY_ADDRS))?;
        let new: Vec<Ipv4Addr> = want
            .iter()
            .filter(|a| !held.contains(&a.octets()))
            .copied()
            .collect();
        let stale: Vec<Ipv4Addr> = held
            .iter()
            .map(|k| Ipv4Addr::from(*k))
            .filter(|a| !want.contains(a))
            .collect();
        let stale_first = held.len() + new.len() > max;
        if stale_first {
            self.remove_underlay_addrs(&stale)?;
        }
        for a in &new {
            self.underlay_addrs
                .insert(a.octets(), ifindex, 0)
                .map_err(entry_error(MAP_UNDERLAY_ADDRS, a))?;
        }
        if !stale_first {
            self.remove_underlay_addrs(&stale)?;
        }
        Ok(())
    }

    fn remove_underlay_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<(), DatapathError> {
        for a in addrs {
            self.underlay_addrs
                .remove(&a.octets())
                .map_err(entry_error(MAP_UNDERLAY_ADDRS, a))?;
        }
        Ok(())
    }

    pub fn set_route(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), DatapathError> {
        self.routes.set(net, peer)
    }

    pub fn remove_route(&mut self, net: &Ipv4Net) -> Result<(), DatapathError> {
        self.routes.remove(net)
    }

    pub fn set_local(&mut self, net: &Ipv4Net, bridge_ifindex: u32) -> Result<(), DatapathError> {
        let value = LocalNet {
            bridge_ifindex,
            flags: 0,
        };
        self.local_nets
            .insert(&key(net), value, 0)
            .map_err(map_error(MAP_LOCAL_NETS))
    }

    pub fn remove_local(&mut self, net: &Ipv4Net) -> Result<(), DatapathError> {
        self.local_nets
            .remove(&key(net))
            .map_err(map_error(MAP_LOCAL_NETS))
    }

    /// Writes endpoint `ip`, then arms its veth (`ENDPOINT_PORTS`): the
    /// plan attaches the veth first, so a source the veth does not know is
    /// handed to the bridge's check until its endpoint is written, and
    /// dropped from then on.
    pub fn set_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), DatapathError> {
        self.endpoints
            .insert(ip.octets(), ep, 0)
            .map_err(map_error(MAP_ENDPOINTS))?;
        self.routes.retire_cached()?;
        self.arm_port(ep.ifindex)
    }

    /// Disarms the veth of endpoint `ip` (its other addresses, if any, take
    /// the bridge's check until one is written again), then removes it.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        if let Ok(ep) = self.endpoints.get(&ip.octets(), 0) {
            self.disarm_port(ep.ifindex)?;
        }
        self.endpoints
            .remove(&ip.octets())
            .map_err(map_error(MAP_ENDPOINTS))?;
        self.routes.retire_cached()
    }

    /// Routes the IPv6 prefix `net` to the peer host `peer` (its underlay
    /// address), then retires the cached answers.
    pub fn set_route6(&mut self, net: &Ipv6Net, peer: IpAddr) -> Result<(), DatapathError> {
        let value = Peer6 {
            host: peer6_host(peer),
            flags: 0,
        };
        self.routes6
            .insert(&key6(net), value, 0)
            .map_err(entry_error(MAP_ROUTES6, format_args!("{net} via {peer}")))?;
        self.routes.retire_cached()
    }

    pub fn remove_route6(&mut self, net: &Ipv6Net) -> Result<(), DatapathError> {
        self.routes6
            .remove(&key6(net))
            .map_err(entry_error(MAP_ROUTES6, net))?;
        self.routes.retire_cached()
    }

    pub fn set_local6(&mut self, net: &Ipv6Net, bridge_ifindex: u32) -> Result<(), DatapathError> {
        let value = LocalNet {
            bridge_ifindex,
            flags: 0,
        };
        self.local_nets6
            .insert(&key6(net), value, 0)
            .map_err(entry_error(MAP_LOCAL_NETS6, net))
    }

    pub fn remove_local6(&mut self, net: &Ipv6Net) -> Result<(), DatapathError> {
        self.local_nets6
            .remove(&key6(net))
            .map_err(entry_error(MAP_LOCAL_NETS6, net))
    }

    /// Writes the IPv6 endpoint `ip`. It does not arm the veth: the plan
    /// writes a container's IPv6 endpoints before its IPv4 one, whose
    /// write arms it.
    pub fn set_endpoint6(&mut self, ip: Ipv6Addr, ep: Endpoint) -> Result<(), DatapathError> {
        self.endpoints6
            .insert(ip.octets(), ep, 0)
            .map_err(entry_error(MAP_ENDPOINTS6, ip))?;
        self.routes.retire_cached()
    }

    /// Removes the IPv6 endpoint `ip` (the plan removes the container's
    /// IPv4 endpoint, which disarms the veth, first).
    pub fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<(), DatapathError> {
        self.endpoints6
            .remove(&ip.octets())
            .map_err(entry_error(MAP_ENDPOINTS6, ip))?;
        self.routes.retire_cached()
    }

    /// From now on `xhost_veth_in` on veth `ifindex` drops every source
    /// for a peer but its endpoints' (call once they are written).
    pub fn arm_port(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.endpoint_ports
            .insert(ifindex, ARMED, 0)
            .map_err(entry_error(MAP_ENDPOINT_PORTS, ifindex))
    }

    /// Undoes [`Datapath::arm_port`] (call before its endpoints go): what
    /// the veth does not know goes on to the bridge's check.
    pub fn disarm_port(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        match self.endpoint_ports.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(entry_error(MAP_ENDPOINT_PORTS, ifindex)(e)),
        }
    }

    /// What the maps and attachments hold, as the plan's applied state:
    /// after an adoption the plan then writes only the difference to what
    /// the sources want. A subnet's bridge is named after its attachment,
    /// else after its ifindex now.
    pub fn held(&self) -> Result<crate::plan::State, DatapathError> {
        use crate::plan::{Local, Peers, State};
        let net =
            |k: Key<[u8; 4]>| Ipv4Net::containing(Ipv4Addr::from(k.data()), k.prefix_len() as u8);
        let mut peers = Peers::default();
        for host in self.peer_hosts.keys() {
            peers
                .hosts
                .insert(IpAddr::from(host.map_err(map_error(MAP_PEER_HOSTS))?));
        }
        for host in self.peer_hosts6.keys() {
            peers
                .hosts
                .insert(IpAddr::from(host.map_err(map_error(MAP_PEER_HOSTS6))?));
        }
        for r in self.routes.trie.iter() {
            let (k, v) = r.map_err(map_error(MAP_ROUTES))?;
            peers.routes.insert(net(k), Ipv4Addr::from(v.host));
        }
        let net6 =
            |k: Key<[u8; 16]>| Ipv6Net::containing(Ipv6Addr::from(k.data()), k.prefix_len() as u8);
        for r in self.routes6.iter() {
            let (k, v) = r.map_err(map_error(MAP_ROUTES6))?;
            peers.routes6.insert(net6(k), peer6_addr(v.host));
        }
        let mut local = Local::default();
        let mut bridge_names = BTreeMap::new();
        for (iface, hook) in self.attachments.keys() {
            let Ok(ifindex) = crate::net::ifindex(iface) else {
                continue;
            };
            match hook {
                Hook::BridgeIngress => {
                    local.bridges.insert(iface.clone());
                    bridge_names.insert(ifindex, iface.clone());
                }
                Hook::ContainerIngress => {
                    local.ports.insert(ifindex, iface.clone());
                }
                _ => {}
            }
        }
        let bridge_name = |ifindex: u32| {
            bridge_names
                .get(&ifindex)
                .cloned()
                .or_else(|| {
                    nix::net::if_::if_indextoname(ifindex)
                        .ok()
                        .map(|n| n.to_string_lossy().into_owned())
                })
                .unwrap_or_default()
        };
        for r in self.local_nets.iter() {
            let (k, v) = r.map_err(map_error(MAP_LOCAL_NETS))?;
            let name = bridge_name(v.bridge_ifindex);
            local.locals.insert(net(k), (name, v.bridge_ifindex));
        }
        for r in self.local_nets6.iter() {
            let (k, v) = r.map_err(map_error(MAP_LOCAL_NETS6))?;
            let name = bridge_name(v.bridge_ifindex);
            local.locals6.insert(net6(k), (name, v.bridge_ifindex));
        }
        for r in self.endpoints.iter() {
            let (k, ep) = r.map_err(map_error(MAP_ENDPOINTS))?;
            local.endpoints.insert(Ipv4Addr::from(k), ep);
        }
        for r in self.endpoints6.iter() {
            let (k, ep) = r.map_err(map_error(MAP_ENDPOINTS6))?;
            local.endpoints6.insert(Ipv6Addr::from(k), ep);
        }
        Ok(State { peers, local })
    }

    /// Retires the datapath's cached answers after a change in the kernel
    /// (routes, rules, neighbours, addresses, links) that they may depend on.
    pub fn kernel_changed(&mut self) -> Result<(), DatapathError> {
        self.routes.retire_cached()
    }

    /// Leaves programs, links and maps pinned when this value is dropped
    /// (`load --detach`); `xhost-user unload` removes them.
    pub fn keep_running(mut self) {
        self.keep = true;
        if let Some(t) = self.tunnel.as_mut() {
            t.keep();
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

impl Datapath {
    /// Removes the clsact qdisc of `iface` if this instance added it and
    /// no filter of its own is left on the device; filters others added
    /// since keep it.
    fn remove_clsact(&mut self, iface: &str) {
        if !self.clsact_added.iter().any(|i| i == iface)
            || self.attachments.keys().any(|(i, _)| i == iface)
        {
            return;
        }
        self.clsact_added.retain(|i| i != iface);
        if let Err(e) = attach::remove_clsact_if_unused(iface) {
            warn!("removing the clsact qdisc of {iface}: {e}");
        }
        let _ = std::fs::remove_dir(self.layout.clsact_marker(iface));
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for (_, a) in std::mem::take(&mut self.attachments) {
            detach(a);
        }
        for iface in self.clsact_added.clone() {
            self.remove_clsact(&iface);
        }
        let _ = std::fs::remove_dir(self.layout.clsact_dir());
        for path in self.pinned_maps.drain(..) {
            if let Err(e) = remove_file_if_exists(&path) {
                warn!("removing {}: {e}", path.display());
            }
        }
        self.layout.remove_layout_record();
        remove_empty_dirs(&self.layout);
    }
}

/// Unpins and closes a link: the kernel detaches the program once the last
/// reference (the pin, then our fd) is gone. Deletes a filter, then
/// unpins its program.
fn detach(a: Attachment) {
    match a {
        Attachment::Link { link, path } => {
            if let Some(link) = link {
                match link.unpin() {
                    Ok(fd) => drop(fd),
                    Err(e) => warn!("unpinning {}: {e}", path.display()),
                }
            }
            let _ = remove_file_if_exists(&path);
        }
        Attachment::Filter { iface, hook, path } => {
            if let Err(e) = attach::delete_filter(&iface, hook) {
                warn!(
                    "deleting xhost's tc filter on {iface} ({}): {e}",
                    hook.as_str()
                );
            }
            let _ = remove_file_if_exists(&path);
        }
    }
}

/// `statfs(2)` magic of bpffs.
const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;

/// Makes sure `pin_dir` lives on a bpffs, mounting one at /sys/fs/bpf when
/// nothing is mounted there yet (minimal machines and fresh VMs).
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    const ROOT: &str = "/sys/fs/bpf";
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    // The nearest existing ancestor decides which filesystem the pins land on.
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if on_bpffs(existing) {
        return Ok(());
    }
    let not_bpffs = || DatapathError::NotBpffs(pin_dir.to_path_buf());
    if !pin_dir.starts_with(ROOT) || on_bpffs(Path::new(ROOT)) {
        return Err(not_bpffs());
    }
    std::fs::create_dir_all(ROOT).map_err(|source| DatapathError::PinDir {
        path: ROOT.into(),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        ROOT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| DatapathError::PinDir {
        path: ROOT.into(),
        source: e.into(),
    })?;
    info!("mounted bpffs at {ROOT}");
    Ok(())
}

/// Undoes map pins and created directories unless emptied into a Datapath.
struct PinGuard {
    paths: Vec<PathBuf>,
    layout: Layout,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = remove_file_if_exists(path);
        }
        // An adoption never fills `paths` and touches no record; a fresh
        // load that failed leaves none.
        if !self.paths.is_empty() || !self.layout.map(PINNED_MAPS[0]).exists() {
            self.layout.remove_layout_record();
        }
        // After a successful load the directories hold pins and stay.
        remove_empty_dirs(&self.layout);
    }
}

/// (iface, hook, path) of the pins in `dir` (`links/` or `filters/`).
fn pinned_names(dir: &Path) -> Vec<(String, Hook, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let (iface, hook) = Layout::parse_link_name(&e.file_name().to_string_lossy())?;
            Some((iface, hook, e.path()))
        })
        .collect()
}

fn remove_empty_dirs(layout: &Layout) {
    for dir in [
        layout.links_dir(),
        layout.filters_dir(),
        layout.clsact_dir(),
        layout.pin_dir.clone(),
    ] {
        // Only empty directories go; anything else is not ours to delete.
        let _ = std::fs::remove_dir(&dir);
    }
}

/// Fails if an xhost program of this hook's name is already attached to
/// `iface` through tcx or a classic filter of xhost's, whichever pin dir
/// it came from.
fn refuse_if_attached(iface: &str, hook: Hook) -> Result<(), DatapathError> {
    let program = hook.program();
    let taken = || DatapathError::AlreadyAttached {
        iface: iface.into(),
        hook: "tc ingress",
        program: program.into(),
    };
    // No tcx on this kernel, or no such interface: attach reports it.
    if let Ok((_, progs)) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
        && progs.iter().any(|p| p.name_as_str() == Some(program))
    {
        return Err(taken());
    }
    if let (Ok(ifindex), Ok(mut rtnl)) = (crate::net::ifindex(iface), crate::netlink::Rtnl::open())
    {
        let found = attach::find_filter(&mut rtnl, ifindex, hook, None).map_err(|source| {
            DatapathError::TcFilters {
                iface: iface.into(),
                source,
            }
        })?;
        if found.is_some_and(|f| f.bpf_name.as_deref() == Some(program)) {
            return Err(taken());
        }
    }
    Ok(())
}

fn is_busy(e: &ProgramError) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(io.raw_os_error(), Some(libc::EBUSY | libc::EEXIST));
        }
        src = s.source();
    }
    false
}

/// aya-log's level mask for the kernel side, from the agent's log filter.
fn log_level_mask() -> u8 {
    match log::max_level() {
        log::LevelFilter::Off => 0,
        l => l as u8,
    }
}

/// Opens a pinned map of an instance (for status/unload from another process).
pub fn open_pinned(layout: &Layout, name: &str) -> Result<aya::maps::Map, aya::maps::MapError> {
    let data = MapData::from_pin(layout.map(name))?;
    aya::maps::Map::from_map_data(data)
}
