//! The agent's settings: one definition of each (its flag, its TOML key,
//! its doc), two layers of it (flags over file), combined and validated
//! before anything touches the kernel.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
};

pub use crate::attach::AttachArg;
use crate::net::{self, CidrError, IfaceError, IpNet, Ipv4Net, Ipv6Net};

/// `load`'s settings as one layer gives them: the flags, or the config
/// file. Each field is both a flag (clap) and a TOML key (serde); `None`
/// or empty is "not given". The two layers combine in [`layer`] and are
/// checked, with the defaults, in [`resolve`]. The file says the same as
/// the flags:
/// ```toml
/// iface = "ens33"
/// bridges = ["docker0"]
/// docker = true
/// tunnel = "vxlan"    # optional: encapsulate (default "none": native routing)
/// vni = 1             # VXLAN network identifier (default 1)
/// vxlan_port = 8472   # UDP port (default 8472, as Linux, flannel and Cilium)
/// attach = "auto"     # TC attach method: auto (tcx if present, else tc), tc, tcx
/// deny = "drop"       # what is refused: dropped (default), or also answered ("reject")
/// datapath = "ebpf"   # ebpf, kernel (routes + iptables), auto (ebpf, else kernel)
/// metrics_addr = "127.0.0.1:9464"  # optional: serve Prometheus /metrics there
/// keep_datapath = true  # optional: SIGTERM/SIGINT leave the datapath forwarding
/// max_endpoints = 65536  # capacity of ENDPOINTS (local containers), fixed at load
/// [[peer]]
/// host = "172.16.91.132"
/// subnets = ["192.168.220.0/24"]
/// [etcd]              # optional: cluster mode (docs/cluster.md)
/// endpoints = ["https://10.0.0.5:2379"]
/// prefix = "/xhost/v1"
/// cafile = "/etc/xhost/ca.pem"
/// certfile = "/etc/xhost/client.pem"
/// keyfile = "/etc/xhost/client-key.pem"
/// lease_ttl = 10
/// ```
#[derive(
    Clone, Debug, Default, PartialEq, Eq, clap::Args, serde::Deserialize, serde::Serialize,
)]
#[serde(deny_unknown_fields)]
pub struct SettingsLayer {
    /// Underlay interface (towards the other hosts).
    #[arg(long)]
    pub iface: Option<String>,
    /// A Docker bridge to serve (repeatable); Docker's own are found too.
    #[arg(long = "bridge")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<String>,
    /// A peer host and its container subnets: HOST_IP=CIDR[,CIDR...] (repeatable).
    #[arg(long = "peer", value_name = "HOST_IP=CIDR[,CIDR...]")]
    #[serde(default, rename = "peer", skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
    /// Do not follow Docker; serve only --bridge (in the file: docker = false).
    #[arg(
        long = "no-docker",
        num_args = 0,
        default_missing_value = "false",
        hide_possible_values = true
    )]
    pub docker: Option<bool>,
    /// Docker Engine API endpoint (default: DOCKER_HOST or unix:///var/run/docker.sock).
    #[arg(long)]
    pub docker_host: Option<String>,
    /// How the XDP validator attaches to the underlay.
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpModeArg>,
    /// How container traffic crosses the underlay: natively routed
    /// (default), or in VXLAN for underlays that do not carry container IPs.
    #[arg(long, value_enum)]
    pub tunnel: Option<TunnelArg>,
    /// VXLAN network identifier, the same on every host (default 1).
    #[arg(long)]
    pub vni: Option<u32>,
    /// VXLAN UDP port, the same on every host (default 8472).
    #[arg(long)]
    pub vxlan_port: Option<u16>,
    /// How TC programs attach: tcx where the kernel has it (6.6+), else
    /// classic tc (clsact + cls_bpf direct-action); tc or tcx forces one.
    #[arg(long, value_enum)]
    pub attach: Option<AttachArg>,
    /// What is done with a packet the datapath refuses: dropped (default),
    /// or dropped and answered with a TCP RST or ICMP administratively
    /// prohibited, rate-limited (reject).
    #[arg(long, value_enum)]
    pub deny: Option<DenyArg>,
    /// What forwards: the eBPF programs (default), the kernel with xhost's
    /// routes and iptables rules, or auto (eBPF, else the kernel, with a
    /// warning saying why).
    #[arg(long, value_enum)]
    pub datapath: Option<DatapathArg>,
    /// Serve Prometheus metrics at http://IP:PORT/metrics (off unless given).
    #[arg(long, value_name = "IP:PORT", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// On SIGTERM/SIGINT leave the datapath pinned and forwarding (the next
    /// load adopts it) instead of detaching it.
    #[arg(
        long,
        num_args = 0,
        default_missing_value = "true",
        hide_possible_values = true
    )]
    pub keep_datapath: Option<bool>,
    /// How many local container endpoints the datapath holds (the
    /// ENDPOINTS map's capacity, 1..=1048576, default 65536). Fixed when
    /// the maps are created: an adopted datapath keeps its own.
    #[arg(long, value_name = "N")]
    pub max_endpoints: Option<u32>,
    #[command(flatten)]
    #[serde(default, skip_serializing_if = "EtcdLayer::is_empty")]
    pub etcd: EtcdLayer,
}

/// Cluster mode: hosts find each other's container subnets in etcd. The
/// `--etcd-*` flags and the keys of the file's `[etcd]` table.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, clap::Args, serde::Deserialize, serde::Serialize,
)]
#[serde(deny_unknown_fields)]
pub struct EtcdLayer {
    /// etcd endpoints, comma-separated: http(s)://HOST:PORT[,...]. Turns on cluster mode.
    #[arg(
        long = "etcd-endpoints",
        value_delimiter = ',',
        value_name = "URL[,URL...]"
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Key prefix in etcd (default /xhost/v1).
    #[arg(long = "etcd-prefix", value_name = "ETCD_PREFIX")]
    pub prefix: Option<String>,
    /// CA certificate (PEM) the etcd server's certificate must chain to.
    #[arg(long = "etcd-cafile", value_name = "ETCD_CAFILE")]
    pub cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long = "etcd-certfile", value_name = "ETCD_CERTFILE")]
    pub certfile: Option<PathBuf>,
    /// Key of --etcd-certfile (PEM).
    #[arg(long = "etcd-keyfile", value_name = "ETCD_KEYFILE")]
    pub keyfile: Option<PathBuf>,
    /// etcd user name (with --etcd-password).
    #[arg(long = "etcd-username", value_name = "ETCD_USERNAME")]
    pub username: Option<String>,
    /// etcd password; better given in the environment than on the command line.
    #[arg(
        long = "etcd-password",
        value_name = "ETCD_PASSWORD",
        env = "XHOST_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// Seconds this host's claims outlive its agent (default 10).
    #[arg(long)]
    pub lease_ttl: Option<i64>,
    /// This host's id in the cluster (default: its underlay address).
    #[arg(long)]
    pub host_id: Option<String>,
    /// Docker network created from the cluster pool (default xhost).
    #[arg(long)]
    pub pool_network: Option<String>,
}

impl EtcdLayer {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Default key prefix in etcd.
pub const DEFAULT_ETCD_PREFIX: &str = "/xhost/v1";
/// Default lease TTL in seconds: a dead host's routes leave the others
/// within about this long, and an agent restarted within it keeps its
/// claims. 10 s rides out three missed renewals (one every TTL/3) and a
/// short store election, yet fails a host over faster than Docker's own
/// health checks would notice.
pub const DEFAULT_LEASE_TTL: i64 = 10;
/// etcd refuses leases shorter than its election timeout allows.
pub const MIN_LEASE_TTL: i64 = 2;
pub const MAX_LEASE_TTL: i64 = 3600;

/// Cluster mode, merged and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    pub etcd: crate::store::etcd::EtcdOptions,
    pub prefix: String,
    pub lease_ttl: i64,
    /// `None`: this host's underlay address.
    pub host_id: Option<String>,
    /// Docker network made from the cluster pool, if one is set.
    pub pool_network: String,
}

/// How container traffic crosses the underlay.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum TunnelArg {
    /// Native routing: container IPs on the underlay (a shared L2 segment,
    /// or an underlay that routes the container subnets).
    #[default]
    None,
    /// VXLAN between the hosts' underlay addresses: for underlays that do
    /// not carry container IPs (clouds, routed L3 networks).
    Vxlan,
}

/// `--datapath`: what forwards container traffic between the hosts.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum DatapathArg {
    /// The eBPF programs (docs/datapath.md).
    #[default]
    Ebpf,
    /// The kernel's own forwarding: a route per peer subnet and iptables
    /// rules in xhost's chains (docs/kernel-datapath.md).
    Kernel,
    /// eBPF; where the kernel cannot load or attach it, the kernel
    /// datapath, with a warning saying why.
    Auto,
}

/// VXLAN settings, the same on every host of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Vxlan {
    pub vni: u32,
    pub port: u16,
}

/// Defaults of the VXLAN settings.
/// The largest `--max-endpoints`: 16 times the default (about 180 MB of
/// preallocated kernel memory for `ENDPOINTS` and `ENDPOINT_PORTS`; the
/// bound keeps a typo from asking the kernel for gigabytes).
pub const MAX_ENDPOINTS_LIMIT: u32 = 16 * xhost_common::MAX_ENDPOINTS;
pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// One remote host and the container subnets behind it. The host is its
/// underlay address; its subnets are of either family, one list in the
/// file and on the flag (`subnets = ["10.1.0.0/16", "fd00:b::/64"]`). A
/// host on an IPv6 underlay has IPv6 subnets only, routed natively
/// ([`check_peers`], [`validate`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "PeerLayer", into = "PeerLayer")]
pub struct PeerConfig {
    pub host: IpAddr,
    pub subnets: Vec<Ipv4Net>,
    /// The IPv6 subnets (`ROUTES6`).
    pub subnets6: Vec<Ipv6Net>,
}

/// A `[[peer]]` as the file writes it.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct PeerLayer {
    host: String,
    subnets: Vec<IpNet>,
}

impl TryFrom<PeerLayer> for PeerConfig {
    type Error = ConfigError;

    fn try_from(p: PeerLayer) -> Result<Self, ConfigError> {
        let host = peer_host(&p.host).ok_or_else(|| ConfigError::PeerHostSyntax(p.host.clone()))?;
        let (subnets, subnets6) = net::split_families(p.subnets);
        Ok(Self {
            host,
            subnets,
            subnets6,
        })
    }
}

impl From<PeerConfig> for PeerLayer {
    fn from(p: PeerConfig) -> Self {
        Self {
            host: p.host.to_string(),
            subnets: p
                .subnets
                .into_iter()
                .map(IpNet::V4)
                .chain(p.subnets6.into_iter().map(IpNet::V6))
                .collect(),
        }
    }
}

/// A peer host's underlay address, IPv4 or IPv6 (in brackets or not); an
/// IPv4-mapped IPv6 address is the IPv4 address it maps.
fn peer_host(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let s = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    s.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

impl PeerConfig {
    /// A peer with IPv4 subnets only.
    pub fn v4(host: Ipv4Addr, subnets: Vec<Ipv4Net>) -> Self {
        Self {
            host: host.into(),
            subnets,
            subnets6: Vec::new(),
        }
    }

    /// The host's address if it is IPv4 (the one family of underlay that
    /// carries IPv4 subnets).
    pub fn host_v4(&self) -> Option<Ipv4Addr> {
        match self.host {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
}

/// What the datapath does with a packet it refuses (a spoofed source, a
/// source that may not reach a local container: docs/security.md).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum DenyArg {
    /// Drop it (counted).
    #[default]
    Drop,
    /// Drop it and answer from the datapath: a TCP RST, else ICMP
    /// destination unreachable, administratively prohibited (rate-limited).
    Reject,
}

impl DenyArg {
    /// The object's `DENY` constant (`xhost_common::GLOBAL_DENY`).
    pub fn constant(self) -> u32 {
        match self {
            Self::Drop => xhost_common::DENY_DROP,
            Self::Reject => xhost_common::DENY_REJECT,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Reject => "reject",
        }
    }
}

/// How the XDP validator is attached to the underlay.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum XdpModeArg {
    /// Native (driver) mode, falling back to generic (SKB) mode with a
    /// warning; none on veth, where XDP would strip TSO from the peer.
    #[default]
    Auto,
    /// Native (driver) mode or fail.
    Native,
    /// Generic (SKB) mode.
    Skb,
    /// No XDP program; the TC program validates alone.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--peer `{arg}`: expected HOST_IP=CIDR[,CIDR...]")]
    PeerSyntax { arg: String },
    #[error("--peer `{arg}`: `{host}` is not an IP address")]
    PeerHost { arg: String, host: String },
    #[error("peer host `{0}` is not an IP address")]
    PeerHostSyntax(String),
    #[error(
        "peer {host}: IPv4 subnet {subnet} needs the peer's IPv4 address (a peer reached over IPv6 carries IPv6 subnets only)"
    )]
    Ipv4OverIpv6 { host: Ipv6Addr, subnet: Ipv4Net },

    #[error("--peer `{arg}`")]
    PeerCidr {
        arg: String,
        #[source]
        source: CidrError,
    },
    #[error("cannot read config {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("--iface {flag} conflicts with iface = \"{file}\" in the config file")]
    IfaceConflict { flag: String, file: String },
    #[error("--no-docker conflicts with docker = true in the config file")]
    DockerConflict,
    #[error("--{what} {flag} conflicts with {what_file} = {file} in the config file")]
    Conflict {
        what: String,
        what_file: String,
        flag: String,
        file: String,
    },
    #[error("flags and config file do not combine: {0}")]
    Layer(String),
    #[error("--{0} ({1} in the config file) is a VXLAN setting: it needs --tunnel vxlan")]
    NotTunnelled(&'static str, &'static str),
    #[error("VNI {0} out of range (--vni, vni in the config file): a VXLAN network identifier is 1..={max}", max = xhost_common::MAX_VNI)]
    VniRange(u32),
    #[error(
        "VXLAN port 0 (--vxlan-port, vxlan_port in the config file): give the UDP port the peers listen on (default {DEFAULT_VXLAN_PORT})"
    )]
    VxlanPortZero,
    #[error("--datapath kernel {0}")]
    KernelDatapath(&'static str),
    #[error(
        "peer {host}: IPv6 subnet {subnet} needs the eBPF datapath (--datapath kernel forwards IPv4 only so far)"
    )]
    Ipv6NotInKernelDatapath { host: IpAddr, subnet: Ipv6Net },
    #[error("no underlay interface: give --iface or iface = \"...\" in the config file")]
    NoIface,
    #[error("peer {0} is given more than once")]
    DuplicatePeer(IpAddr),
    #[error("peer {0} has no subnets")]
    EmptyPeer(IpAddr),
    #[error("{count} peer subnets: the datapath's ROUTES map holds at most {max}")]
    TooManyRoutes { count: usize, max: u32 },
    #[error("{count} peers: the datapath's PEER_HOSTS map holds at most {max}")]
    TooManyPeers { count: usize, max: u32 },
    #[error("{count} IPv6 peer subnets: the datapath's ROUTES6 map holds at most {max}")]
    TooManyRoutes6 { count: usize, max: u32 },
    #[error("subnet {a} of peer {peer_a} overlaps subnet {b} of peer {peer_b}")]
    PeerOverlap6 {
        a: Ipv6Net,
        peer_a: IpAddr,
        b: Ipv6Net,
        peer_b: IpAddr,
    },
    #[error(
        "--max-endpoints {0} (max_endpoints in the config file) out of range: the ENDPOINTS map holds 1..={max} entries",
        max = MAX_ENDPOINTS_LIMIT
    )]
    MaxEndpoints(u32),
    #[error("peer address {0} is not a unicast host address")]
    PeerNotUnicast(IpAddr),
    #[error("subnet {a} of peer {peer_a} overlaps subnet {b} of peer {peer_b}")]
    PeerOverlap {
        a: Ipv4Net,
        peer_a: IpAddr,
        b: Ipv4Net,
        peer_b: IpAddr,
    },
    #[error("subnet {peer_net} of peer {peer} overlaps local subnet {local} on {bridge}")]
    LocalOverlap {
        peer_net: Ipv4Net,
        peer: IpAddr,
        local: Ipv4Net,
        bridge: String,
    },
    #[error("peer {peer} lies inside local subnet {local} on {bridge}")]
    PeerInLocal {
        peer: IpAddr,
        local: Ipv4Net,
        bridge: String,
    },
    #[error("bridge {0} has no IPv4 address, so it serves no container subnet")]
    BridgeNoAddress(String),
    #[error("{0} is the underlay; it cannot also be a bridge")]
    UnderlayIsBridge(String),
    #[error("nothing to serve: give --bridge, or let the agent follow Docker (drop --no-docker)")]
    NothingToServe,
    #[error("{what} cannot change while the agent runs ({old} -> {new}); restart it")]
    NeedsRestart {
        what: &'static str,
        old: String,
        new: String,
    },
    #[error("{0}")]
    Cluster(String),
    #[error("--metrics-addr `{0}`: expected IP:PORT, e.g. 127.0.0.1:9464")]
    MetricsAddr(String),
    #[error(transparent)]
    Iface(#[from] IfaceError),
}

/// `--metrics-addr IP:PORT`. Parsed here rather than by clap's default
/// parser so that a bad value is one line, like every other input error.
pub fn parse_metrics_addr(arg: &str) -> Result<SocketAddr, ConfigError> {
    arg.parse()
        .map_err(|_| ConfigError::MetricsAddr(arg.to_owned()))
}

impl FromStr for PeerConfig {
    type Err = ConfigError;

    /// `HOST_IP=CIDR[,CIDR...]`, as given to `--peer`.
    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        let (host, nets) = arg.split_once('=').ok_or_else(|| ConfigError::PeerSyntax {
            arg: arg.to_owned(),
        })?;
        let host = peer_host(host).ok_or_else(|| ConfigError::PeerHost {
            arg: arg.to_owned(),
            host: host.to_owned(),
        })?;
        let nets = nets
            .split(',')
            .map(|n| {
                n.parse::<IpNet>().map_err(|source| ConfigError::PeerCidr {
                    arg: arg.to_owned(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (subnets, subnets6) = net::split_families(nets);
        Ok(Self {
            host,
            subnets,
            subnets6,
        })
    }
}

/// Reads and parses a config file.
pub fn read_file(path: &Path) -> Result<SettingsLayer, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: shown,
        // toml's message spans lines (source excerpt); keep it on one.
        message: e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// Flags and file merged; not yet checked against the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub iface: String,
    pub bridges: Vec<String>,
    pub peers: Vec<PeerConfig>,
    pub docker: bool,
    pub docker_host: Option<String>,
    pub xdp_mode: XdpModeArg,
    /// VXLAN mode; `None`: native routing.
    pub tunnel: Option<Vxlan>,
    /// How TC programs are attached.
    pub attach: AttachArg,
    /// What is done with refused packets.
    pub deny: DenyArg,
    /// eBPF programs or the kernel's routing.
    pub datapath: DatapathArg,
    /// Cluster mode: the other hosts' subnets from etcd.
    pub cluster: Option<ClusterSettings>,
    /// Where Prometheus metrics are served; `None`: not at all.
    pub metrics_addr: Option<SocketAddr>,
    /// Stopping (SIGTERM/SIGINT) leaves the datapath pinned and forwarding,
    /// for the next load to adopt; otherwise it is detached.
    pub keep_datapath: bool,
    /// Capacity of `ENDPOINTS` (and of `ENDPOINT_PORTS`, one port per
    /// endpoint at most).
    pub max_endpoints: u32,
}

/// What happens to a key that both layers give.
enum Both {
    /// Lists: the file's entries, then the flags'.
    Concat,
    /// The flag overrides: `--docker-host` like `DOCKER_HOST`, and the
    /// password, which may come from the environment.
    FlagWins,
    /// Anything else must be the same in both, never a silent override.
    Agree,
}

fn both(key: &str) -> Both {
    match key {
        "bridges" | "peer" => Both::Concat,
        "docker_host" | "password" => Both::FlagWins,
        _ => Both::Agree,
    }
}

/// Combines the flags over the file, key by key through their TOML form:
/// lists add up, a value given by one layer is taken, one given
/// differently by both is an error naming both (see [`Both`]).
pub fn layer(flags: &SettingsLayer, file: SettingsLayer) -> Result<SettingsLayer, ConfigError> {
    let table =
        |l: &SettingsLayer| toml::Table::try_from(l).map_err(|e| ConfigError::Layer(e.to_string()));
    let mut merged = table(&file)?;
    layer_table(&mut merged, table(flags)?)?;
    merged
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Layer(e.to_string()))
}

fn layer_table(file: &mut toml::Table, flags: toml::Table) -> Result<(), ConfigError> {
    use toml::Value;
    for (key, flag) in flags {
        let Some(given) = file.get_mut(&key) else {
            file.insert(key, flag);
            continue;
        };
        match (given, flag, both(&key)) {
            (Value::Table(given), Value::Table(flag), _) => layer_table(given, flag)?,
            (Value::Array(given), Value::Array(flag), Both::Concat) => given.extend(flag),
            (given, flag, Both::FlagWins) => *given = flag,
            (given, flag, _) if *given == flag => {}
            (given, flag, _) => return Err(conflict(&key, &flag, given)),
        }
    }
    Ok(())
}

/// A value as the user wrote it: strings unquoted, lists comma-separated.
fn shown(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(a) => a.iter().map(shown).collect::<Vec<_>>().join(","),
        v => v.to_string(),
    }
}

/// The error for `key` given differently by the flags and the file.
fn conflict(key: &str, flag: &toml::Value, file: &toml::Value) -> ConfigError {
    let (flag_shown, file_shown) = (shown(flag), shown(file));
    match key {
        "iface" => ConfigError::IfaceConflict {
            flag: flag_shown,
            file: file_shown,
        },
        // The only flag is --no-docker: it conflicts with docker = true.
        "docker" => ConfigError::DockerConflict,
        "endpoints" => {
            let file: Vec<String> = file_shown.split(',').map(str::to_owned).collect();
            ConfigError::Cluster(format!(
                "--etcd-endpoints {flag_shown} conflicts with endpoints = {file:?} in the config file's [etcd]"
            ))
        }
        key => {
            let cmd = <SettingsLayer as clap::Args>::augment_args(clap::Command::new("load"));
            let what = cmd
                .get_arguments()
                .find(|a| a.get_id() == key)
                .and_then(clap::Arg::get_long)
                .unwrap_or(key)
                .to_owned();
            ConfigError::Conflict {
                what,
                what_file: key.to_owned(),
                flag: flag_shown,
                file: file_shown,
            }
        }
    }
}

/// Combines flags and file ([`layer`]) and checks the result ([`resolve`]).
pub fn merge(flags: SettingsLayer, file: Option<SettingsLayer>) -> Result<Settings, ConfigError> {
    let layered = match file {
        Some(file) => layer(&flags, file)?,
        None => flags,
    };
    resolve(layered)
}

/// The VXLAN settings, checked.
fn resolve_tunnel(l: &SettingsLayer) -> Result<Option<Vxlan>, ConfigError> {
    if l.tunnel.unwrap_or_default() == TunnelArg::None {
        return match (l.vni, l.vxlan_port) {
            (Some(_), _) => Err(ConfigError::NotTunnelled("vni", "vni")),
            (_, Some(_)) => Err(ConfigError::NotTunnelled("vxlan-port", "vxlan_port")),
            _ => Ok(None),
        };
    }
    let vni = l.vni.unwrap_or(DEFAULT_VNI);
    if vni == 0 || vni > xhost_common::MAX_VNI {
        return Err(ConfigError::VniRange(vni));
    }
    let port = l.vxlan_port.unwrap_or(DEFAULT_VXLAN_PORT);
    if port == 0 {
        return Err(ConfigError::VxlanPortZero);
    }
    Ok(Some(Vxlan { vni, port }))
}

/// The layered settings with their defaults, checked on their own (the
/// kernel's view comes in [`validate`]).
pub fn resolve(l: SettingsLayer) -> Result<Settings, ConfigError> {
    let tunnel = resolve_tunnel(&l)?;
    let iface = l.iface.ok_or(ConfigError::NoIface)?;
    let mut bridges: Vec<String> = Vec::new();
    for b in l.bridges {
        if !bridges.contains(&b) {
            bridges.push(b);
        }
    }
    let datapath = l.datapath.unwrap_or_default();
    if datapath == DatapathArg::Kernel {
        check_kernel_datapath(
            tunnel,
            l.xdp_mode.unwrap_or_default(),
            l.attach.unwrap_or_default(),
            l.metrics_addr,
        )?;
        if l.keep_datapath == Some(true) {
            return Err(ConfigError::KernelDatapath(
                "is not adopted by a next load, so it is removed when the agent stops: drop --keep-datapath",
            ));
        }
        if l.max_endpoints.is_some() {
            return Err(ConfigError::KernelDatapath(
                "has no ENDPOINTS map to size: drop --max-endpoints",
            ));
        }
    }
    let max_endpoints = l.max_endpoints.unwrap_or(xhost_common::MAX_ENDPOINTS);
    if !(1..=MAX_ENDPOINTS_LIMIT).contains(&max_endpoints) {
        return Err(ConfigError::MaxEndpoints(max_endpoints));
    }
    Ok(Settings {
        iface,
        bridges,
        peers: l.peers,
        docker: l.docker.unwrap_or(true),
        docker_host: l.docker_host,
        xdp_mode: l.xdp_mode.unwrap_or_default(),
        tunnel,
        attach: l.attach.unwrap_or_default(),
        deny: l.deny.unwrap_or_default(),
        datapath,
        cluster: resolve_cluster(l.etcd)?,
        metrics_addr: l.metrics_addr,
        keep_datapath: l.keep_datapath.unwrap_or(false),
        max_endpoints,
    })
}

/// What the kernel datapath cannot do, refused in one line rather than
/// given as a setting that does nothing.
fn check_kernel_datapath(
    tunnel: Option<Vxlan>,
    xdp_mode: XdpModeArg,
    attach: AttachArg,
    metrics_addr: Option<SocketAddr>,
) -> Result<(), ConfigError> {
    let refuse = |what| Err(ConfigError::KernelDatapath(what));
    if tunnel.is_some() {
        return refuse("routes natively: VXLAN mode (--tunnel vxlan) needs the eBPF datapath");
    }
    if xdp_mode != XdpModeArg::Auto {
        return refuse("attaches no XDP program: drop --xdp-mode");
    }
    if attach != AttachArg::Auto {
        return refuse("attaches no TC program: drop --attach");
    }
    if metrics_addr.is_some() {
        return refuse("has no datapath counters to serve: drop --metrics-addr");
    }
    Ok(())
}

/// Cluster mode's settings, checked: `None` without endpoints (and then no
/// other etcd setting may be given).
pub fn resolve_cluster(e: EtcdLayer) -> Result<Option<ClusterSettings>, ConfigError> {
    let bad = |m: String| Err(ConfigError::Cluster(m));
    let EtcdLayer {
        endpoints,
        prefix,
        cafile,
        certfile,
        keyfile,
        username,
        password,
        lease_ttl,
        host_id,
        pool_network,
    } = e;
    if endpoints.is_empty() {
        let given = [
            ("--etcd-prefix", prefix.is_some()),
            ("--etcd-cafile", cafile.is_some()),
            ("--etcd-certfile", certfile.is_some()),
            ("--etcd-keyfile", keyfile.is_some()),
            ("--etcd-username", username.is_some()),
            ("--etcd-password", password.is_some()),
            ("--lease-ttl", lease_ttl.is_some()),
            ("--host-id", host_id.is_some()),
            ("--pool-network", pool_network.is_some()),
        ];
        return match given.iter().find(|(_, g)| *g) {
            Some((flag, _)) => bad(format!(
                "{flag} is a cluster setting: it needs --etcd-endpoints (or endpoints in [etcd])"
            )),
            None => Ok(None),
        };
    }
    let tls = cafile.is_some() || certfile.is_some();
    for e in &endpoints {
        let Some(rest) = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
        else {
            return bad(format!(
                "etcd endpoint `{e}`: expected http://HOST:PORT or https://HOST:PORT"
            ));
        };
        if rest.is_empty() || rest.contains('/') {
            return bad(format!("etcd endpoint `{e}`: expected http(s)://HOST:PORT"));
        }
        if tls && e.starts_with("http://") {
            return bad(format!(
                "etcd endpoint `{e}` is http:// but TLS files are given: use https://"
            ));
        }
        if !tls && e.starts_with("https://") {
            return bad(format!(
                "etcd endpoint `{e}` is https://: give --etcd-cafile (and --etcd-certfile/--etcd-keyfile for a client certificate)"
            ));
        }
    }
    if certfile.is_some() != keyfile.is_some() {
        return bad("--etcd-certfile and --etcd-keyfile go together".into());
    }
    if username.is_some() != password.is_some() {
        return bad(
            "--etcd-username and --etcd-password (or XHOST_ETCD_PASSWORD) go together".into(),
        );
    }
    let prefix = prefix.unwrap_or_else(|| DEFAULT_ETCD_PREFIX.into());
    if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
        return bad(format!(
            "etcd prefix `{prefix}`: expected an absolute key path like {DEFAULT_ETCD_PREFIX}, no trailing /"
        ));
    }
    let lease_ttl = lease_ttl.unwrap_or(DEFAULT_LEASE_TTL);
    if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&lease_ttl) {
        return bad(format!(
            "lease TTL {lease_ttl} s out of range {MIN_LEASE_TTL}..={MAX_LEASE_TTL}"
        ));
    }
    if let Some(id) = &host_id
        && !crate::store::view::valid_host_id(id)
    {
        return bad(format!("host id `{id}`: 1 to 64 of A-Z a-z 0-9 . _ -"));
    }
    Ok(Some(ClusterSettings {
        etcd: crate::store::etcd::EtcdOptions {
            endpoints,
            cafile,
            certfile,
            keyfile,
            username,
            password,
        },
        prefix,
        lease_ttl,
        host_id,
        pool_network: pool_network
            .unwrap_or_else(|| crate::store::pool::DEFAULT_NETWORK.to_owned()),
    }))
}

/// Where the settings come from: the flags as given, and the file, which
/// the agent reads again on SIGHUP.
#[derive(Clone, Debug)]
pub struct Source {
    pub flags: SettingsLayer,
    pub file: Option<PathBuf>,
}

impl Source {
    /// Reads the file (again) and merges it with the flags.
    pub fn read(&self) -> Result<Settings, ConfigError> {
        let file = self.file.as_deref().map(read_file).transpose()?;
        merge(self.flags.clone(), file)
    }
}

/// What a running agent can take from a reloaded config: peers and static
/// bridges. The underlay, its XDP mode and the Docker connection are set up
/// once, at load.
pub fn check_reloadable(running: &Settings, new: &Settings) -> Result<(), ConfigError> {
    let fixed: [(&'static str, String, String); 11] = [
        (
            "etcd",
            describe_cluster(running.cluster.as_ref()),
            describe_cluster(new.cluster.as_ref()),
        ),
        ("iface", running.iface.clone(), new.iface.clone()),
        (
            "xdp_mode",
            format!("{:?}", running.xdp_mode).to_lowercase(),
            format!("{:?}", new.xdp_mode).to_lowercase(),
        ),
        ("docker", running.docker.to_string(), new.docker.to_string()),
        (
            "docker_host",
            format!("{:?}", running.docker_host),
            format!("{:?}", new.docker_host),
        ),
        (
            "tunnel",
            describe_tunnel(running.tunnel),
            describe_tunnel(new.tunnel),
        ),
        (
            "attach",
            format!("{:?}", running.attach).to_lowercase(),
            format!("{:?}", new.attach).to_lowercase(),
        ),
        (
            "metrics_addr",
            format!("{:?}", running.metrics_addr),
            format!("{:?}", new.metrics_addr),
        ),
        // A load-time constant of the programs.
        (
            "deny",
            running.deny.as_str().into(),
            new.deny.as_str().into(),
        ),
        (
            "datapath",
            format!("{:?}", running.datapath).to_lowercase(),
            format!("{:?}", new.datapath).to_lowercase(),
        ),
        // The maps' size, set when they are created.
        (
            "max_endpoints",
            running.max_endpoints.to_string(),
            new.max_endpoints.to_string(),
        ),
    ];
    match fixed.into_iter().find(|(_, old, new)| old != new) {
        Some((what, old, new)) => Err(ConfigError::NeedsRestart { what, old, new }),
        None => Ok(()),
    }
}

/// Cluster mode as one line, without the password.
pub fn describe_cluster(c: Option<&ClusterSettings>) -> String {
    match c {
        None => "off".into(),
        Some(c) => format!(
            "{} prefix {} ttl {} host id {} tls {} user {}",
            c.etcd.endpoints.join(","),
            c.prefix,
            c.lease_ttl,
            c.host_id.as_deref().unwrap_or("(underlay address)"),
            c.etcd.cafile.is_some(),
            c.etcd.username.as_deref().unwrap_or("-")
        ),
    }
}

/// `none`, or `vxlan vni N port P`.
pub fn describe_tunnel(t: Option<Vxlan>) -> String {
    match t {
        None => "none".into(),
        Some(v) => format!("vxlan vni {} port {}", v.vni, v.port),
    }
}

/// A container subnet served by a bridge of this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSubnet {
    pub net: Ipv4Net,
    pub bridge: String,
}

/// Checks peers among themselves: unique, unicast, non-empty, disjoint.
pub fn check_peers(peers: &[PeerConfig]) -> Result<(), ConfigError> {
    let mut seen = BTreeSet::new();
    for p in peers {
        if !seen.insert(p.host) {
            return Err(ConfigError::DuplicatePeer(p.host));
        }
        let unicast = match p.host {
            IpAddr::V4(a) => {
                !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
            }
            // A link-local next hop would need its interface named.
            IpAddr::V6(a) => {
                !(a.is_unspecified()
                    || a.is_multicast()
                    || a.is_loopback()
                    || a.is_unicast_link_local())
            }
        };
        if !unicast {
            return Err(ConfigError::PeerNotUnicast(p.host));
        }
        if let (IpAddr::V6(host), Some(subnet)) = (p.host, p.subnets.first()) {
            return Err(ConfigError::Ipv4OverIpv6 {
                host,
                subnet: *subnet,
            });
        }
        if p.subnets.is_empty() && p.subnets6.is_empty() {
            return Err(ConfigError::EmptyPeer(p.host));
        }
    }
    if peers.len() > xhost_common::MAX_PEER_HOSTS as usize {
        return Err(ConfigError::TooManyPeers {
            count: peers.len(),
            max: xhost_common::MAX_PEER_HOSTS,
        });
    }
    let count: usize = peers.iter().map(|p| p.subnets.len()).sum();
    if count > xhost_common::MAX_ROUTES as usize {
        return Err(ConfigError::TooManyRoutes {
            count,
            max: xhost_common::MAX_ROUTES,
        });
    }
    let count6: usize = peers.iter().map(|p| p.subnets6.len()).sum();
    if count6 > xhost_common::MAX_ROUTES6 as usize {
        return Err(ConfigError::TooManyRoutes6 {
            count: count6,
            max: xhost_common::MAX_ROUTES6,
        });
    }
    let all = peers
        .iter()
        .flat_map(|p| p.subnets.iter().map(move |n| (*n, p.host)))
        .collect();
    if let Some(((a, peer_a), (b, peer_b))) = net::first_overlap(all) {
        return Err(ConfigError::PeerOverlap {
            a,
            peer_a,
            b,
            peer_b,
        });
    }
    let all6 = peers
        .iter()
        .flat_map(|p| p.subnets6.iter().map(move |n| (*n, p.host)))
        .collect();
    if let Some(((a, peer_a), (b, peer_b))) = net::first_overlap(all6) {
        return Err(ConfigError::PeerOverlap6 {
            a,
            peer_a,
            b,
            peer_b,
        });
    }
    Ok(())
}

/// Checks a local subnet against every peer: no overlap, no peer inside.
pub fn check_local(local: &LocalSubnet, peers: &[PeerConfig]) -> Result<(), ConfigError> {
    for p in peers {
        if p.host_v4().is_some_and(|h| local.net.contains(h)) {
            return Err(ConfigError::PeerInLocal {
                peer: p.host,
                local: local.net,
                bridge: local.bridge.clone(),
            });
        }
        if let Some(n) = p.subnets.iter().find(|n| n.overlaps(&local.net)) {
            return Err(ConfigError::LocalOverlap {
                peer_net: *n,
                peer: p.host,
                local: local.net,
                bridge: local.bridge.clone(),
            });
        }
    }
    Ok(())
}

/// Validates settings against the kernel's view: interfaces exist, bridges
/// are bridges with addresses, subnets are consistent. Returns the local
/// subnets the given bridges serve.
pub fn validate(s: &Settings) -> Result<Vec<LocalSubnet>, ConfigError> {
    check_ipv6_mode(s)?;
    net::ifindex(&s.iface)?;
    check_peers(&s.peers)?;
    if s.bridges.is_empty() && !s.docker {
        return Err(ConfigError::NothingToServe);
    }
    let mut locals = Vec::new();
    for b in &s.bridges {
        if *b == s.iface {
            return Err(ConfigError::UnderlayIsBridge(b.clone()));
        }
        net::ensure_bridge(b)?;
        let subnets = net::ipv4_subnets(b)?;
        if subnets.is_empty() {
            return Err(ConfigError::BridgeNoAddress(b.clone()));
        }
        for (_, n) in subnets {
            let local = LocalSubnet {
                net: n,
                bridge: b.clone(),
            };
            check_local(&local, &s.peers)?;
            locals.push(local);
        }
    }
    Ok(locals)
}

/// IPv6 peer subnets are forwarded by the eBPF datapath (natively or in
/// VXLAN mode) only: the kernel datapath has no route to an IPv6 subnet
/// behind an IPv4 peer host (Linux refuses an IPv6 route via an IPv4 next
/// hop).
fn check_ipv6_mode(s: &Settings) -> Result<(), ConfigError> {
    if s.datapath != DatapathArg::Kernel {
        return Ok(());
    }
    match s
        .peers
        .iter()
        .find_map(|p| p.subnets6.first().map(|n| (p.host, *n)))
    {
        Some((host, subnet)) => Err(ConfigError::Ipv6NotInKernelDatapath { host, subnet }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> PeerConfig {
        s.parse().expect("valid peer")
    }

    #[test]
    fn peer_flag_syntax() {
        let p = peer("172.16.91.132=192.168.220.0/24,10.9.0.0/16");
        assert_eq!(p.host, Ipv4Addr::new(172, 16, 91, 132));
        assert_eq!(p.subnets.len(), 2);
        for (bad, want) in [
            ("172.16.91.132", "expected HOST_IP=CIDR"),
            ("nohost=10.0.0.0/8", "`nohost` is not an IP address"),
            ("1.2.3.4=10.0.0.1/8", "host bits set"),
            ("1.2.3.4=", "not an IPv4 CIDR"),
        ] {
            // As main prints it: the whole cause chain on one line.
            let e = format!(
                "{:#}",
                anyhow::Error::from(bad.parse::<PeerConfig>().expect_err(bad))
            );
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn merge_combines_and_rejects_conflicts() {
        let file: SettingsLayer = toml::from_str(
            "iface = \"ens33\"\nbridges = [\"docker0\"]\n[[peer]]\nhost = \"10.0.0.2\"\nsubnets = [\"192.168.220.0/24\"]\n",
        )
        .expect("valid toml");
        let flags = SettingsLayer {
            bridges: vec!["br1".into(), "docker0".into()],
            peers: vec![peer("10.0.0.3=192.168.230.0/24")],
            ..Default::default()
        };
        let s = merge(flags, Some(file)).expect("merges");
        assert_eq!(s.iface, "ens33");
        assert_eq!(s.bridges, ["docker0", "br1"]);
        assert_eq!(s.peers.len(), 2);
        assert!(s.docker);

        let file = SettingsLayer {
            iface: Some("eth0".into()),
            ..Default::default()
        };
        let flags = SettingsLayer {
            iface: Some("ens33".into()),
            ..Default::default()
        };
        let e = merge(flags, Some(file)).expect_err("conflict").to_string();
        assert_eq!(
            e,
            "--iface ens33 conflicts with iface = \"eth0\" in the config file"
        );

        let file = SettingsLayer {
            iface: Some("e".into()),
            docker: Some(true),
            ..Default::default()
        };
        let flags = SettingsLayer {
            docker: Some(false),
            ..Default::default()
        };
        assert!(matches!(
            merge(flags, Some(file)),
            Err(ConfigError::DockerConflict)
        ));
        assert!(matches!(
            merge(SettingsLayer::default(), None),
            Err(ConfigError::NoIface)
        ));
        let file = SettingsLayer {
            xdp_mode: Some(XdpModeArg::Skb),
            ..Default::default()
        };
        let flags = SettingsLayer {
            iface: Some("ens33".into()),
            xdp_mode: Some(XdpModeArg::Native),
            ..Default::default()
        };
        assert_eq!(
            merge(flags, Some(file)).expect_err("conflict").to_string(),
            "--xdp-mode native conflicts with xdp_mode = skb in the config file"
        );
    }

    /// The flags of `load` as clap parses them.
    fn flags(args: &[&str]) -> SettingsLayer {
        let cmd = <SettingsLayer as clap::Args>::augment_args(
            clap::Command::new("load").no_binary_name(true),
        );
        let m = cmd.try_get_matches_from(args).expect("flags parse");
        <SettingsLayer as clap::FromArgMatches>::from_arg_matches(&m).expect("flags")
    }

    #[test]
    fn a_flag_and_its_key_are_one_setting() {
        let by_flags = flags(&[
            "--iface=ens33",
            "--bridge=br0",
            "--bridge=br1",
            "--peer=10.0.0.2=10.1.0.0/16,10.2.0.0/16",
            "--no-docker",
            "--docker-host=unix:///run/d.sock",
            "--xdp-mode=skb",
            "--tunnel=vxlan",
            "--vni=42",
            "--vxlan-port=4789",
            "--attach=tc",
            "--metrics-addr=127.0.0.1:9464",
            "--etcd-endpoints=https://10.0.0.5:2379,https://10.0.0.6:2379",
            "--etcd-prefix=/x",
            "--etcd-cafile=/ca.pem",
            "--etcd-certfile=/c.pem",
            "--etcd-keyfile=/k.pem",
            "--etcd-username=u",
            "--etcd-password=p",
            "--lease-ttl=30",
            "--host-id=h1",
            "--pool-network=net",
        ]);
        let by_file: SettingsLayer = toml::from_str(
            r#"
            iface = "ens33"
            bridges = ["br0", "br1"]
            docker = false
            docker_host = "unix:///run/d.sock"
            xdp_mode = "skb"
            tunnel = "vxlan"
            vni = 42
            vxlan_port = 4789
            attach = "tc"
            metrics_addr = "127.0.0.1:9464"
            [[peer]]
            host = "10.0.0.2"
            subnets = ["10.1.0.0/16", "10.2.0.0/16"]
            [etcd]
            endpoints = ["https://10.0.0.5:2379", "https://10.0.0.6:2379"]
            prefix = "/x"
            cafile = "/ca.pem"
            certfile = "/c.pem"
            keyfile = "/k.pem"
            username = "u"
            password = "p"
            lease_ttl = 30
            host_id = "h1"
            pool_network = "net"
            "#,
        )
        .expect("toml");
        assert_eq!(by_flags, by_file);
        assert_eq!(flags(&[]), SettingsLayer::default(), "nothing given");
        // Both layers saying the same thing is no conflict; lists add up.
        let s = merge(by_flags, Some(by_file)).expect("agrees");
        assert_eq!(s.bridges, ["br0", "br1"]);
        assert_eq!(s.peers.len(), 2, "the file's peer, then the flag's");
    }

    #[test]
    fn flag_wins_only_for_docker_host_and_password() {
        let file: SettingsLayer = toml::from_str(
            "iface = \"ens33\"\ndocker_host = \"unix:///file.sock\"\n[etcd]\nendpoints = [\"http://10.0.0.5:2379\"]\nusername = \"u\"\npassword = \"file\"\nprefix = \"/a\"\n",
        )
        .expect("toml");
        let s = merge(
            flags(&["--docker-host=unix:///flag.sock", "--etcd-password=flag"]),
            Some(file.clone()),
        )
        .expect("merges");
        assert_eq!(s.docker_host.as_deref(), Some("unix:///flag.sock"));
        assert_eq!(
            s.cluster.expect("cluster").etcd.password.as_deref(),
            Some("flag")
        );
        let e = merge(flags(&["--etcd-prefix=/b"]), Some(file.clone())).expect_err("conflict");
        assert_eq!(
            e.to_string(),
            "--etcd-prefix /b conflicts with prefix = /a in the config file"
        );
        let e = merge(
            flags(&["--etcd-endpoints=http://10.0.0.6:2379,http://10.0.0.7:2379"]),
            Some(file),
        )
        .expect_err("conflict");
        assert_eq!(
            e.to_string(),
            "--etcd-endpoints http://10.0.0.6:2379,http://10.0.0.7:2379 conflicts with endpoints = [\"http://10.0.0.5:2379\"] in the config file's [etcd]"
        );
    }

    #[test]
    fn file_rejects_unknown_keys_and_bad_cidrs() {
        assert!(toml::from_str::<SettingsLayer>("ifase = \"x\"").is_err());
        let e = toml::from_str::<SettingsLayer>(
            "[[peer]]\nhost = \"10.0.0.2\"\nsubnets = [\"10.1.0.1/16\"]\n",
        )
        .expect_err("host bits");
        assert!(e.to_string().contains("has host bits set"), "{e}");
        let e = toml::from_str::<SettingsLayer>("[[peer]]\nhost = \"10.0.0.2\"\n")
            .expect_err("no subnets");
        assert!(e.to_string().contains("missing field `subnets`"), "{e}");
    }

    #[test]
    fn peer_checks() {
        let dup = [peer("10.0.0.2=10.1.0.0/16"), peer("10.0.0.2=10.2.0.0/16")];
        assert_eq!(
            check_peers(&dup).expect_err("dup").to_string(),
            "peer 10.0.0.2 is given more than once"
        );
        let overlap = [peer("10.0.0.2=10.1.0.0/16"), peer("10.0.0.3=10.1.128.0/17")];
        assert_eq!(
            check_peers(&overlap).expect_err("overlap").to_string(),
            "subnet 10.1.0.0/16 of peer 10.0.0.2 overlaps subnet 10.1.128.0/17 of peer 10.0.0.3"
        );
        let within = [peer("10.0.0.2=10.1.0.0/16,10.1.2.0/24")];
        assert!(matches!(
            check_peers(&within),
            Err(ConfigError::PeerOverlap { .. })
        ));
        assert!(matches!(
            check_peers(&[peer("0.0.0.0=10.1.0.0/16")]),
            Err(ConfigError::PeerNotUnicast(_))
        ));
        assert!(check_peers(&[peer("10.0.0.2=10.1.0.0/16"), peer("10.0.0.3=10.2.0.0/16")]).is_ok());
        // Overlap hidden behind disjoint neighbours in address order.
        let hidden = [
            peer("10.0.0.2=10.0.0.0/8"),
            peer("10.0.0.3=9.0.0.0/8,11.0.0.0/8,10.200.1.0/24"),
        ];
        let e = check_peers(&hidden).expect_err("overlap").to_string();
        assert_eq!(
            e,
            "subnet 10.0.0.0/8 of peer 10.0.0.2 overlaps subnet 10.200.1.0/24 of peer 10.0.0.3"
        );
    }

    #[test]
    fn peer_checks_scale_to_100k_routes() {
        let subnets: Vec<Ipv4Net> = (0..100_000u32)
            .map(|i| Ipv4Net::containing(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24))
            .collect();
        let start = std::time::Instant::now();
        check_peers(&[PeerConfig {
            host: Ipv4Addr::new(172, 16, 0, 2).into(),
            subnets,
            subnets6: Vec::new(),
        }])
        .expect("disjoint");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn peer_subnets_must_fit_the_routes_map() {
        let nets = |n: u32| -> Vec<Ipv4Net> {
            (0..n)
                .map(|i| Ipv4Net::containing(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24))
                .collect()
        };
        let host = Ipv4Addr::new(172, 16, 0, 2);
        let max = xhost_common::MAX_ROUTES;
        assert!(
            check_peers(&[PeerConfig {
                host: host.into(),
                subnets: nets(max),
                subnets6: Vec::new(),
            }])
            .is_ok()
        );
        let e = check_peers(&[PeerConfig {
            host: host.into(),
            subnets: nets(max + 1),
            subnets6: Vec::new(),
        }])
        .expect_err("one too many");
        assert_eq!(
            e.to_string(),
            format!(
                "{} peer subnets: the datapath's ROUTES map holds at most {max}",
                max + 1
            )
        );
    }

    #[test]
    fn peers_must_fit_the_peer_hosts_map() {
        let peers = |n: u32| -> Vec<PeerConfig> {
            (0..n)
                .map(|i| PeerConfig {
                    host: Ipv4Addr::from(0xac10_0000 + i + 1).into(),
                    subnets: vec![Ipv4Net::containing(
                        Ipv4Addr::from(0x0a00_0000 + (i << 8)),
                        24,
                    )],
                    subnets6: Vec::new(),
                })
                .collect()
        };
        let max = xhost_common::MAX_PEER_HOSTS;
        assert!(check_peers(&peers(max)).is_ok());
        let e = check_peers(&peers(max + 1)).expect_err("one too many");
        assert_eq!(
            e.to_string(),
            format!(
                "{} peers: the datapath's PEER_HOSTS map holds at most {max}",
                max + 1
            )
        );
    }

    fn settings() -> Settings {
        Settings {
            iface: "ens33".into(),
            bridges: vec!["docker0".into()],
            peers: vec![peer("10.0.0.2=10.1.0.0/16")],
            docker: true,
            docker_host: None,
            xdp_mode: XdpModeArg::Auto,
            tunnel: None,
            attach: AttachArg::Auto,
            deny: DenyArg::Drop,
            datapath: DatapathArg::Ebpf,
            cluster: None,
            metrics_addr: None,
            keep_datapath: false,
            max_endpoints: xhost_common::MAX_ENDPOINTS,
        }
    }

    #[test]
    fn ipv6_peer_subnets_only_in_the_ebpf_datapath() {
        let mut s = settings();
        s.peers = vec![peer("10.0.0.2=10.1.0.0/16,fd00:b::/64")];
        assert!(check_ipv6_mode(&s).is_ok(), "native routing");
        s.tunnel = Some(Vxlan { vni: 1, port: 8472 });
        assert!(check_ipv6_mode(&s).is_ok(), "VXLAN mode");
        s.tunnel = None;
        s.datapath = DatapathArg::Kernel;
        assert_eq!(
            check_ipv6_mode(&s).expect_err("kernel").to_string(),
            "peer 10.0.0.2: IPv6 subnet fd00:b::/64 needs the eBPF datapath (--datapath kernel forwards IPv4 only so far)"
        );
        s.peers = vec![peer("10.0.0.2=10.1.0.0/16")];
        assert!(check_ipv6_mode(&s).is_ok(), "IPv4 peers in any mode");
    }

    #[test]
    fn ipv6_underlay_peers_in_the_ebpf_datapath() {
        let mut s = settings();
        s.peers = vec![peer("10.0.0.2=10.1.0.0/16"), peer("fd00::2=fd00:b::/64")];
        assert!(check_ipv6_mode(&s).is_ok(), "native routing");
        s.tunnel = Some(Vxlan { vni: 1, port: 8472 });
        assert!(check_ipv6_mode(&s).is_ok(), "VXLAN mode");
        s.tunnel = None;
        s.datapath = DatapathArg::Kernel;
        assert!(check_ipv6_mode(&s).is_err(), "kernel datapath");
        // Bracketed, and an IPv4-mapped address is the IPv4 address.
        assert_eq!(peer("[fd00::2]=fd00:b::/64").host.to_string(), "fd00::2");
        assert_eq!(
            peer("::ffff:10.0.0.2=10.1.0.0/16").host,
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))
        );
    }

    #[test]
    fn max_endpoints_from_flag_or_file_checked_and_fixed() {
        let file = |text: &str| toml::from_str::<SettingsLayer>(text).expect("toml");
        let s = merge(SettingsLayer::default(), Some(file("iface = \"ens33\"\n"))).expect("merges");
        assert_eq!(s.max_endpoints, xhost_common::MAX_ENDPOINTS);
        let s = merge(
            SettingsLayer::default(),
            Some(file("iface = \"ens33\"\nmax_endpoints = 16\n")),
        )
        .expect("merges");
        assert_eq!(s.max_endpoints, 16);
        let flags = SettingsLayer {
            max_endpoints: Some(8),
            ..SettingsLayer::default()
        };
        let e = merge(flags, Some(file("iface = \"ens33\"\nmax_endpoints = 16\n")))
            .expect_err("both, differently")
            .to_string();
        assert!(
            e.contains("--max-endpoints 8") && e.contains("max_endpoints = 16"),
            "{e}"
        );
        for bad in [0, MAX_ENDPOINTS_LIMIT + 1] {
            let e = merge(
                SettingsLayer::default(),
                Some(file(&format!("iface = \"ens33\"\nmax_endpoints = {bad}\n"))),
            )
            .expect_err("out of range")
            .to_string();
            assert_eq!(
                e,
                format!(
                    "--max-endpoints {bad} (max_endpoints in the config file) out of range: the ENDPOINTS map holds 1..={MAX_ENDPOINTS_LIMIT} entries"
                )
            );
        }
        let e = merge(
            SettingsLayer::default(),
            Some(file(
                "iface = \"ens33\"\ndatapath = \"kernel\"\nmax_endpoints = 16\n",
            )),
        )
        .expect_err("kernel datapath")
        .to_string();
        assert!(e.contains("drop --max-endpoints"), "{e}");
        let mut new = settings();
        new.max_endpoints = 16;
        let e = check_reloadable(&settings(), &new)
            .expect_err("fixed at load")
            .to_string();
        assert_eq!(
            e,
            "max_endpoints cannot change while the agent runs (65536 -> 16); restart it"
        );
    }

    #[test]
    fn keep_datapath_from_flag_or_file_and_reloadable() {
        let file = |text: &str| toml::from_str::<SettingsLayer>(text).expect("toml");
        let s = merge(SettingsLayer::default(), Some(file("iface = \"ens33\"\n"))).expect("merges");
        assert!(!s.keep_datapath, "detach on stop unless asked");
        let s = merge(
            SettingsLayer::default(),
            Some(file("iface = \"ens33\"\nkeep_datapath = true\n")),
        )
        .expect("merges");
        assert!(s.keep_datapath);
        let flags = SettingsLayer {
            keep_datapath: Some(true),
            ..SettingsLayer::default()
        };
        let e = merge(
            flags,
            Some(file("iface = \"ens33\"\nkeep_datapath = false\n")),
        )
        .expect_err("conflict")
        .to_string();
        assert!(
            e.contains("--keep-datapath") && e.contains("keep_datapath = false"),
            "{e}"
        );
        let mut new = settings();
        new.keep_datapath = true;
        check_reloadable(&settings(), &new).expect("takes effect at the next stop");
    }

    #[test]
    fn attach_method_comes_from_flag_or_file_and_needs_a_restart() {
        let file: SettingsLayer =
            toml::from_str("iface = \"ens33\"\nattach = \"tc\"\n").expect("toml");
        let s = merge(SettingsLayer::default(), Some(file)).expect("merges");
        assert_eq!(s.attach, AttachArg::Tc);
        assert_eq!(
            merge(
                SettingsLayer {
                    iface: Some("ens33".into()),
                    ..SettingsLayer::default()
                },
                None
            )
            .expect("merges")
            .attach,
            AttachArg::Auto
        );
        let file: SettingsLayer = toml::from_str("attach = \"tc\"\n").expect("toml");
        let flags = SettingsLayer {
            iface: Some("ens33".into()),
            attach: Some(AttachArg::Tcx),
            ..SettingsLayer::default()
        };
        assert_eq!(
            merge(flags, Some(file)).expect_err("conflict").to_string(),
            "--attach tcx conflicts with attach = tc in the config file"
        );
        let e = toml::from_str::<SettingsLayer>("attach = \"netlink\"\n").expect_err("bad value");
        assert!(e.to_string().contains("unknown variant `netlink`"), "{e}");
        let new = Settings {
            attach: AttachArg::Tc,
            ..settings()
        };
        assert_eq!(
            check_reloadable(&settings(), &new)
                .expect_err("restart")
                .to_string(),
            "attach cannot change while the agent runs (auto -> tc); restart it"
        );
    }

    #[test]
    fn kernel_datapath_refuses_settings_it_cannot_honour() {
        let file: SettingsLayer =
            toml::from_str("iface = \"ens33\"\ndatapath = \"kernel\"\n").expect("toml");
        let s = merge(SettingsLayer::default(), Some(file)).expect("merges");
        assert_eq!(s.datapath, DatapathArg::Kernel);
        let kernel = |f: SettingsLayer| {
            merge(
                SettingsLayer {
                    iface: Some("ens33".into()),
                    datapath: Some(DatapathArg::Kernel),
                    ..f
                },
                None,
            )
            .map(drop)
            .map_err(|e| e.to_string())
        };
        assert_eq!(kernel(SettingsLayer::default()), Ok(()));
        for (f, want) in [
            (
                SettingsLayer {
                    tunnel: Some(TunnelArg::Vxlan),
                    ..SettingsLayer::default()
                },
                "--datapath kernel routes natively: VXLAN mode (--tunnel vxlan) needs the eBPF datapath",
            ),
            (
                SettingsLayer {
                    attach: Some(AttachArg::Tc),
                    ..SettingsLayer::default()
                },
                "--datapath kernel attaches no TC program: drop --attach",
            ),
        ] {
            assert_eq!(kernel(f), Err(want.to_owned()));
        }
        let new = Settings {
            datapath: DatapathArg::Kernel,
            ..settings()
        };
        assert_eq!(
            check_reloadable(&settings(), &new)
                .expect_err("restart")
                .to_string(),
            "datapath cannot change while the agent runs (ebpf -> kernel); restart it"
        );
    }

    #[test]
    fn tunnel_settings_merge_and_check() {
        let flags = |tunnel, vni, vxlan_port| SettingsLayer {
            iface: Some("ens33".into()),
            tunnel,
            vni,
            vxlan_port,
            ..SettingsLayer::default()
        };
        let tunnel = |f, file| merge(f, file).map(|s| s.tunnel);
        assert_eq!(tunnel(flags(None, None, None), None).expect("native"), None);
        assert_eq!(
            tunnel(flags(Some(TunnelArg::Vxlan), None, None), None).expect("defaults"),
            Some(Vxlan {
                vni: DEFAULT_VNI,
                port: DEFAULT_VXLAN_PORT
            })
        );
        let file: SettingsLayer =
            toml::from_str("tunnel = \"vxlan\"\nvni = 42\nvxlan_port = 4789\n").expect("toml");
        assert_eq!(
            tunnel(flags(None, Some(42), None), Some(file)).expect("file"),
            Some(Vxlan {
                vni: 42,
                port: 4789
            })
        );
        let cases = [
            (
                flags(Some(TunnelArg::Vxlan), Some(0), None),
                format!(
                    "VNI 0 out of range (--vni, vni in the config file): a VXLAN network identifier is 1..={}",
                    xhost_common::MAX_VNI
                ),
            ),
            (
                flags(Some(TunnelArg::Vxlan), Some(1 << 24), None),
                format!(
                    "VNI 16777216 out of range (--vni, vni in the config file): a VXLAN network identifier is 1..={}",
                    xhost_common::MAX_VNI
                ),
            ),
            (
                flags(Some(TunnelArg::Vxlan), None, Some(0)),
                "VXLAN port 0 (--vxlan-port, vxlan_port in the config file): give the UDP port the peers listen on (default 8472)".into(),
            ),
            (
                flags(None, Some(7), None),
                "--vni (vni in the config file) is a VXLAN setting: it needs --tunnel vxlan".into(),
            ),
            (
                flags(Some(TunnelArg::None), None, Some(4789)),
                "--vxlan-port (vxlan_port in the config file) is a VXLAN setting: it needs --tunnel vxlan".into(),
            ),
        ];
        for (f, want) in cases {
            assert_eq!(tunnel(f, None).expect_err(&want).to_string(), want);
        }
        let file: SettingsLayer = toml::from_str("tunnel = \"vxlan\"\nvni = 5\n").expect("toml");
        assert_eq!(
            tunnel(flags(None, Some(6), None), Some(file))
                .expect_err("conflict")
                .to_string(),
            "--vni 6 conflicts with vni = 5 in the config file"
        );
        let file: SettingsLayer = toml::from_str("tunnel = \"none\"\n").expect("toml");
        assert_eq!(
            tunnel(flags(Some(TunnelArg::Vxlan), None, None), Some(file))
                .expect_err("conflict")
                .to_string(),
            "--tunnel vxlan conflicts with tunnel = none in the config file"
        );
        assert!(toml::from_str::<SettingsLayer>("tunnel = \"gre\"\n").is_err());
    }

    #[test]
    fn metrics_addr_from_flag_or_file() {
        assert_eq!(
            parse_metrics_addr("127.0.0.1:9464").expect("valid"),
            SocketAddr::from(([127, 0, 0, 1], 9464))
        );
        for bad in ["127.0.0.1", "localhost:9464", ":9464", "127.0.0.1:99999"] {
            assert_eq!(
                parse_metrics_addr(bad).expect_err(bad).to_string(),
                format!("--metrics-addr `{bad}`: expected IP:PORT, e.g. 127.0.0.1:9464")
            );
        }
        let file: SettingsLayer =
            toml::from_str("iface = \"ens33\"\nmetrics_addr = \"[::1]:9464\"\n").expect("valid");
        let s = merge(SettingsLayer::default(), Some(file)).expect("merges");
        assert_eq!(s.metrics_addr, Some("[::1]:9464".parse().expect("addr")));
        let s = merge(
            SettingsLayer {
                iface: Some("ens33".into()),
                ..Default::default()
            },
            None,
        )
        .expect("merges");
        assert_eq!(s.metrics_addr, None, "off unless given");
        let file: SettingsLayer =
            toml::from_str("iface = \"ens33\"\nmetrics_addr = \"127.0.0.1:1\"\n").expect("valid");
        let flags = SettingsLayer {
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 2))),
            ..Default::default()
        };
        assert_eq!(
            merge(flags, Some(file)).expect_err("conflict").to_string(),
            "--metrics-addr 127.0.0.1:2 conflicts with metrics_addr = 127.0.0.1:1 in the config file"
        );
        let e = toml::from_str::<SettingsLayer>("metrics_addr = \"nope\"\n").expect_err("bad addr");
        assert!(e.to_string().contains("invalid socket address"), "{e}");
    }

    #[test]
    fn deny_comes_from_flag_or_file_and_needs_a_restart() {
        let base = || SettingsLayer {
            iface: Some("ens33".into()),
            ..SettingsLayer::default()
        };
        assert_eq!(merge(base(), None).expect("merges").deny, DenyArg::Drop);
        let file: SettingsLayer = toml::from_str("deny = \"reject\"\n").expect("toml");
        assert_eq!(
            merge(base(), Some(file)).expect("merges").deny,
            DenyArg::Reject
        );
        assert_eq!(flags(&["--deny", "reject"]).deny, Some(DenyArg::Reject));
        let file: SettingsLayer = toml::from_str("deny = \"reject\"\n").expect("toml");
        let flags = SettingsLayer {
            deny: Some(DenyArg::Drop),
            ..base()
        };
        assert_eq!(
            merge(flags, Some(file)).expect_err("conflict").to_string(),
            "--deny drop conflicts with deny = reject in the config file"
        );
        assert!(toml::from_str::<SettingsLayer>("deny = \"icmp\"\n").is_err());
    }

    #[test]
    fn reload_takes_peers_and_bridges_only() {
        let running = settings();
        let mut new = settings();
        new.peers = vec![peer("10.0.0.3=10.2.0.0/16")];
        new.bridges.push("br-x".into());
        assert!(check_reloadable(&running, &new).is_ok());
        type Change = fn(&mut Settings);
        let fixed: [(Change, &str); 7] = [
            (
                |s| s.iface = "eth1".into(),
                "iface cannot change while the agent runs (ens33 -> eth1); restart it",
            ),
            (
                |s| s.xdp_mode = XdpModeArg::Off,
                "xdp_mode cannot change while the agent runs (auto -> off); restart it",
            ),
            (
                |s| s.docker = false,
                "docker cannot change while the agent runs (true -> false); restart it",
            ),
            (
                |s| s.docker_host = Some("unix:///run/d.sock".into()),
                "docker_host cannot change while the agent runs (None -> Some(\"unix:///run/d.sock\")); restart it",
            ),
            (
                |s| s.tunnel = Some(Vxlan { vni: 1, port: 8472 }),
                "tunnel cannot change while the agent runs (none -> vxlan vni 1 port 8472); restart it",
            ),
            (
                |s| s.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
                "metrics_addr cannot change while the agent runs (None -> Some(127.0.0.1:9464)); restart it",
            ),
            (
                |s| s.deny = DenyArg::Reject,
                "deny cannot change while the agent runs (drop -> reject); restart it",
            ),
        ];
        for (change, want) in fixed {
            let mut new = settings();
            change(&mut new);
            assert_eq!(
                check_reloadable(&running, &new)
                    .expect_err(want)
                    .to_string(),
                want
            );
        }
    }

    #[test]
    fn source_reads_the_file_again() {
        let path = std::env::temp_dir().join(format!("xhost-source-{}.toml", std::process::id()));
        let source = Source {
            flags: SettingsLayer {
                iface: Some("ens33".into()),
                peers: vec![peer("10.0.0.2=10.1.0.0/16")],
                ..SettingsLayer::default()
            },
            file: Some(path.clone()),
        };
        std::fs::write(
            &path,
            "[[peer]]\nhost = \"10.0.0.3\"\nsubnets = [\"10.2.0.0/16\"]\n",
        )
        .expect("write");
        let hosts = |s: &Settings| {
            s.peers
                .iter()
                .map(|p| p.host.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            hosts(&source.read().expect("read")),
            ["10.0.0.3", "10.0.0.2"]
        );
        std::fs::write(
            &path,
            "[[peer]]\nhost = \"10.0.0.4\"\nsubnets = [\"10.3.0.0/16\"]\n",
        )
        .expect("write");
        assert_eq!(
            hosts(&source.read().expect("read")),
            ["10.0.0.4", "10.0.0.2"]
        );
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(source.read(), Err(ConfigError::Read { .. })));
    }

    #[test]
    fn cluster_settings_merge_and_check() {
        let flags = |endpoints: &[&str], f: fn(&mut EtcdLayer)| {
            let mut e = EtcdLayer {
                endpoints: endpoints.iter().map(|s| (*s).to_owned()).collect(),
                ..EtcdLayer::default()
            };
            f(&mut e);
            SettingsLayer {
                iface: Some("ens33".into()),
                etcd: e,
                ..SettingsLayer::default()
            }
        };
        let c = merge(flags(&["http://10.0.0.5:2379"], |_| {}), None)
            .expect("merges")
            .cluster
            .expect("cluster mode");
        assert_eq!(c.prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(c.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(c.pool_network, "xhost");
        assert!(
            merge(flags(&[], |_| {}), None)
                .expect("off")
                .cluster
                .is_none()
        );
        let file: SettingsLayer = toml::from_str(
            "[etcd]\nendpoints = [\"https://10.0.0.5:2379\"]\ncafile = \"/ca.pem\"\nlease_ttl = 30\n",
        )
        .expect("toml");
        let c = merge(flags(&[], |_| {}), Some(file))
            .expect("file")
            .cluster
            .expect("cluster");
        assert_eq!((c.lease_ttl, c.etcd.endpoints.len()), (30, 1));
        let cases: [(SettingsLayer, &str); 7] = [
            (
                flags(&[], |e| e.lease_ttl = Some(5)),
                "--lease-ttl is a cluster setting: it needs --etcd-endpoints (or endpoints in [etcd])",
            ),
            (
                flags(&["10.0.0.5:2379"], |_| {}),
                "etcd endpoint `10.0.0.5:2379`: expected http://HOST:PORT or https://HOST:PORT",
            ),
            (
                flags(&["https://10.0.0.5:2379"], |_| {}),
                "etcd endpoint `https://10.0.0.5:2379` is https://: give --etcd-cafile (and --etcd-certfile/--etcd-keyfile for a client certificate)",
            ),
            (
                flags(&["http://10.0.0.5:2379"], |e| e.cafile = Some("/ca".into())),
                "etcd endpoint `http://10.0.0.5:2379` is http:// but TLS files are given: use https://",
            ),
            (
                flags(&["http://10.0.0.5:2379"], |e| e.username = Some("u".into())),
                "--etcd-username and --etcd-password (or XHOST_ETCD_PASSWORD) go together",
            ),
            (
                flags(&["http://10.0.0.5:2379"], |e| e.lease_ttl = Some(1)),
                "lease TTL 1 s out of range 2..=3600",
            ),
            (
                flags(&["http://10.0.0.5:2379"], |e| {
                    e.host_id = Some("a/b".into())
                }),
                "host id `a/b`: 1 to 64 of A-Z a-z 0-9 . _ -",
            ),
        ];
        for (f, want) in cases {
            assert_eq!(merge(f, None).expect_err(want).to_string(), want);
        }
        // The password never shows in what a refused reload prints.
        let mut running = settings();
        running.cluster = merge(
            flags(&["http://10.0.0.5:2379"], |e| {
                e.username = Some("u".into());
                e.password = Some("secret".into());
            }),
            None,
        )
        .expect("merges")
        .cluster;
        let e = check_reloadable(&running, &settings()).expect_err("etcd changed");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn local_checks() {
        let local = LocalSubnet {
            net: "192.168.110.0/24".parse().expect("valid"),
            bridge: "docker0".into(),
        };
        let e = check_local(&local, &[peer("10.0.0.2=192.168.0.0/16")]).expect_err("overlap");
        assert_eq!(
            e.to_string(),
            "subnet 192.168.0.0/16 of peer 10.0.0.2 overlaps local subnet 192.168.110.0/24 on docker0"
        );
        assert!(matches!(
            check_local(&local, &[peer("192.168.110.7=10.0.0.0/8")]),
            Err(ConfigError::PeerInLocal { .. })
        ));
        assert!(check_local(&local, &[peer("10.0.0.2=192.168.220.0/24")]).is_ok());
    }
}
