//! IPv4 and IPv6 prefixes (canonical, over `ipnet`) and the few interface facts the agent needs from the kernel.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// A prefix in canonical form (no host bits set) over an `ipnet` prefix of
/// one family: the invariant the datapath's LPM keys rely on (a route's key
/// is its network address), and the agent's own parse errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net<F>(F);

/// An IPv4 prefix: the key of `ROUTES` and `LOCAL_NETS`.
pub type Ipv4Net = Net<ipnet::Ipv4Net>;
/// An IPv6 prefix: the key of `ROUTES6` and `LOCAL_NETS6`.
pub type Ipv6Net = Net<ipnet::Ipv6Net>;

/// Why a string is not a usable prefix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("`{0}` is not an IPv4 CIDR (expected a.b.c.d/len)")]
    Syntax(String),
    #[error("`{0}`: prefix length must be 0..=32")]
    Length(String),
    #[error("`{input}` has host bits set (did you mean {canonical}?)")]
    HostBits { input: String, canonical: Ipv4Net },
    #[error("`{0}` is not an IPv6 CIDR (expected x:x::x/len)")]
    Syntax6(String),
    #[error("`{0}`: prefix length must be 0..=128")]
    Length6(String),
    #[error("`{input}` has host bits set (did you mean {canonical}?)")]
    HostBits6 { input: String, canonical: Ipv6Net },
}

/// What [`Net`] needs of an `ipnet` prefix type: one per address family.
pub trait IpFamily: Copy + Eq + fmt::Display + Sized {
    type Addr: Copy + Ord + FromStr;
    const MAX_LEN: u8;
    fn new(addr: Self::Addr, len: u8) -> Option<Self>;
    fn trunc(&self) -> Self;
    fn network(&self) -> Self::Addr;
    fn broadcast(&self) -> Self::Addr;
    fn prefix_len(&self) -> u8;
    fn contains(&self, addr: &Self::Addr) -> bool;
    fn syntax_error(input: &str) -> CidrError;
    fn length_error(input: &str) -> CidrError;
    fn host_bits_error(input: String, canonical: Net<Self>) -> CidrError;
}

macro_rules! family {
    ($net:ty, $addr:ty, $max:expr, $syntax:ident, $length:ident, $host_bits:ident) => {
        impl IpFamily for $net {
            type Addr = $addr;
            const MAX_LEN: u8 = $max;
            fn new(addr: $addr, len: u8) -> Option<Self> {
                <$net>::new(addr, len).ok()
            }
            fn trunc(&self) -> Self {
                <$net>::trunc(self)
            }
            fn network(&self) -> $addr {
                <$net>::network(self)
            }
            fn broadcast(&self) -> $addr {
                <$net>::broadcast(self)
            }
            fn prefix_len(&self) -> u8 {
                <$net>::prefix_len(self)
            }
            fn contains(&self, addr: &$addr) -> bool {
                <$net>::contains(self, addr)
            }
            fn syntax_error(input: &str) -> CidrError {
                CidrError::$syntax(input.to_owned())
            }
            fn length_error(input: &str) -> CidrError {
                CidrError::$length(input.to_owned())
            }
            fn host_bits_error(input: String, canonical: Net<Self>) -> CidrError {
                CidrError::$host_bits { input, canonical }
            }
        }

        impl From<Net<$net>> for $net {
            fn from(n: Net<$net>) -> Self {
                n.0
            }
        }
    };
}

family!(ipnet::Ipv4Net, Ipv4Addr, 32, Syntax, Length, HostBits);
family!(ipnet::Ipv6Net, Ipv6Addr, 128, Syntax6, Length6, HostBits6);

impl<F: IpFamily> Net<F> {
    /// The prefix of `len` bits (at most the family's width) containing
    /// `addr`, host bits cleared.
    pub fn containing(addr: F::Addr, len: u8) -> Self {
        let net = F::new(addr, len.min(F::MAX_LEN)).expect("length clamped to the family's width");
        Self(net.trunc())
    }

    /// The network address.
    pub fn addr(&self) -> F::Addr {
        self.0.network()
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// The highest address in the prefix.
    pub fn last(&self) -> F::Addr {
        self.0.broadcast()
    }

    pub fn contains(&self, ip: F::Addr) -> bool {
        self.0.contains(&ip)
    }

    /// Two prefixes overlap iff one contains the other's network address.
    pub fn overlaps(&self, other: &Self) -> bool {
        self.contains(other.addr()) || other.contains(self.addr())
    }

    /// An `ipnet` prefix (the testbed's type) as the agent takes it: canonical.
    fn canonical(n: F, input: String) -> Result<Self, CidrError> {
        if n.trunc() != n {
            return Err(F::host_bits_error(input, Self(n.trunc())));
        }
        Ok(Self(n))
    }
}

impl TryFrom<ipnet::Ipv4Net> for Ipv4Net {
    type Error = CidrError;

    fn try_from(n: ipnet::Ipv4Net) -> Result<Self, CidrError> {
        Self::canonical(n, n.to_string())
    }
}

impl TryFrom<ipnet::Ipv6Net> for Ipv6Net {
    type Error = CidrError;

    fn try_from(n: ipnet::Ipv6Net) -> Result<Self, CidrError> {
        Self::canonical(n, n.to_string())
    }
}

impl<F: IpFamily> FromStr for Net<F> {
    type Err = CidrError;

    /// `a.b.c.d/len` or `x:x::x/len` with no host bits set. ipnet's own
    /// parser takes host bits (an interface address) and says only
    /// "invalid syntax"; this one names what is wrong.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s.trim().split_once('/').ok_or_else(|| F::syntax_error(s))?;
        let addr: F::Addr = addr.parse().map_err(|_| F::syntax_error(s))?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(F::syntax_error(s));
        }
        let len: u8 = len.parse().map_err(|_| F::length_error(s))?;
        let net = F::new(addr, len).ok_or_else(|| F::length_error(s))?;
        Self::canonical(net, s.to_owned())
    }
}

impl<F: fmt::Display> fmt::Display for Net<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<F: fmt::Display> serde::Serialize for Net<F> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, F: IpFamily> serde::Deserialize<'de> for Net<F> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A prefix of either family, as a list of subnets gives them: an address
/// with a `:` is IPv6, anything else is read (and refused) as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpNet {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

impl FromStr for IpNet {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr = s.split_once('/').map_or(s, |(a, _)| a);
        if addr.contains(':') {
            s.parse().map(Self::V6)
        } else {
            s.parse().map(Self::V4)
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(n) => n.fmt(f),
            Self::V6(n) => n.fmt(f),
        }
    }
}

impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl From<Ipv4Net> for IpNet {
    fn from(n: Ipv4Net) -> Self {
        Self::V4(n)
    }
}

impl From<Ipv6Net> for IpNet {
    fn from(n: Ipv6Net) -> Self {
        Self::V6(n)
    }
}

impl IpNet {
    /// Its network address.
    pub fn addr(&self) -> IpAddr {
        match self {
            Self::V4(n) => n.addr().into(),
            Self::V6(n) => n.addr().into(),
        }
    }

    /// Its last address.
    pub fn last(&self) -> IpAddr {
        match self {
            Self::V4(n) => n.last().into(),
            Self::V6(n) => n.last().into(),
        }
    }

    pub fn prefix_len(&self) -> u8 {
        match self {
            Self::V4(n) => n.prefix_len(),
            Self::V6(n) => n.prefix_len(),
        }
    }

    /// Whether `ip` is in it (never, for an address of the other family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Self::V4(n), IpAddr::V4(a)) => n.contains(a),
            (Self::V6(n), IpAddr::V6(a)) => n.contains(a),
            _ => false,
        }
    }

    /// Whether the two share an address (never across families).
    pub fn overlaps(&self, other: &IpNet) -> bool {
        match (self, other) {
            (Self::V4(a), Self::V4(b)) => a.overlaps(b),
            (Self::V6(a), Self::V6(b)) => a.overlaps(b),
            _ => false,
        }
    }
}

/// The IPv4 and the IPv6 prefixes of a list, each in the list's order.
pub fn split_families(nets: impl IntoIterator<Item = IpNet>) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for n in nets {
        match n {
            IpNet::V4(n) => v4.push(n),
            IpNet::V6(n) => v6.push(n),
        }
    }
    (v4, v6)
}

/// What the overlap sweep needs of a prefix of either family.
pub trait Prefix: Copy {
    type Addr: Ord + Copy;
    fn first(&self) -> Self::Addr;
    fn last_addr(&self) -> Self::Addr;
    fn bits(&self) -> u8;
}

impl<F: IpFamily> Prefix for Net<F> {
    type Addr = F::Addr;
    fn first(&self) -> F::Addr {
        self.addr()
    }
    fn last_addr(&self) -> F::Addr {
        self.last()
    }
    fn bits(&self) -> u8 {
        self.prefix_len()
    }
}

/// The first two prefixes of `all` that overlap (the wider first), each
/// with what it carries. Sorted by network address, a prefix can only
/// overlap ones that start inside it, so one pass tracking the widest range
/// seen so far finds any overlap: O(n log n), which matters with 100 000
/// routes.
pub fn first_overlap<N: Prefix, T: Copy>(mut all: Vec<(N, T)>) -> Option<((N, T), (N, T))> {
    all.sort_by_key(|(n, _)| (n.first(), n.bits()));
    let mut widest: Option<(N, T)> = None;
    for (n, t) in all {
        if let Some((w, wt)) = widest {
            if w.first() <= n.first() && n.first() <= w.last_addr() {
                return Some(((w, wt), (n, t)));
            }
            if n.last_addr() <= w.last_addr() {
                continue;
            }
        }
        widest = Some((n, t));
    }
    None
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Kernel facts about one interface of the current network namespace.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("interface `{0}` does not exist")]
    Missing(String),
    #[error("interface `{0}` is not a Linux bridge")]
    NotBridge(String),
    #[error("interface `{name}`: cannot read {what}")]
    Read {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

// Interface facts come from sockets and ioctls, not /sys/class/net: sysfs
// shows the netns it was mounted in, which is not ours under
// `nsenter --net` (how the agent runs inside a simulated host).

/// ifindex of `name`, via if_nametoindex(3).
pub fn ifindex(name: &str) -> Result<u32, IfaceError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| IfaceError::Missing(name.to_owned()))
}

/// The interface's MAC address (its AF_PACKET address from getifaddrs).
pub fn mac_of(name: &str) -> Result<[u8; 6], IfaceError> {
    ifindex(name)?;
    let read_err = |source: std::io::Error| IfaceError::Read {
        name: name.to_owned(),
        what: "its MAC address",
        source,
    };
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| read_err(e.into()))?;
    addrs
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .ok_or_else(|| read_err(std::io::Error::other("no link-layer address")))
}

/// The rtnetlink kind of `name` (`IFLA_INFO_KIND`): "bridge", "veth",
/// ...; none for devices without one (`lo`, physical NICs).
pub fn kind_of(name: &str) -> Result<Option<String>, IfaceError> {
    let read_err = |source: std::io::Error| IfaceError::Read {
        name: name.to_owned(),
        what: "its kind",
        source,
    };
    let mut rtnl = crate::netlink::Rtnl::open().map_err(read_err)?;
    match rtnl.link_by_name(name).map_err(read_err)? {
        Some(link) => Ok(link.kind),
        None => Err(IfaceError::Missing(name.to_owned())),
    }
}

/// Fails unless `name` exists and is a Linux bridge.
pub fn ensure_bridge(name: &str) -> Result<u32, IfaceError> {
    let index = ifindex(name)?;
    match kind_of(name)? {
        Some(kind) if kind == "bridge" => Ok(index),
        _ => Err(IfaceError::NotBridge(name.to_owned())),
    }
}

/// IPv4 prefixes configured on `name` (the subnets it serves).
pub fn ipv4_subnets(name: &str) -> Result<Vec<(Ipv4Addr, Ipv4Net)>, IfaceError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| IfaceError::Read {
        name: name.to_owned(),
        what: "its addresses",
        source: e.into(),
    })?;
    let mut out = Vec::new();
    for ifa in addrs.filter(|a| a.interface_name == name) {
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        let (Some(addr), Some(mask)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) else {
            continue;
        };
        let len = u32::from(mask.ip()).leading_ones() as u8;
        out.push((addr.ip(), Ipv4Net::containing(addr.ip(), len)));
    }
    Ok(out)
}

/// Whether IPv4 forwarding is on for `name` (the FIB helper refuses to
/// forward otherwise, and the kernel would too).
pub fn forwarding_enabled(name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/forwarding"))
        .is_ok_and(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_canonical_prefixes() {
        let n: Ipv4Net = "192.168.220.0/24".parse().expect("valid");
        assert_eq!(n.to_string(), "192.168.220.0/24");
        assert!(n.contains(Ipv4Addr::new(192, 168, 220, 11)));
        assert!(!n.contains(Ipv4Addr::new(192, 168, 221, 1)));
        assert_eq!(
            "0.0.0.0/0".parse::<Ipv4Net>().expect("valid").prefix_len(),
            0
        );
        assert_eq!(
            "10.0.0.1/32"
                .parse::<Ipv4Net>()
                .expect("valid")
                .prefix_len(),
            32
        );
    }

    #[test]
    fn rejects_bad_prefixes() {
        for bad in [
            "192.168.1.0",
            "192.168.1.0/",
            "192.168.1.0/x",
            "300.1.1.0/24",
            "1.2.3.0/-1",
            "fe80::/64",
        ] {
            assert!(
                matches!(bad.parse::<Ipv4Net>(), Err(CidrError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "10.0.0.0/33".parse::<Ipv4Net>(),
            Err(CidrError::Length(_))
        ));
        let err = "192.168.220.1/24"
            .parse::<Ipv4Net>()
            .expect_err("host bits");
        assert_eq!(
            err.to_string(),
            "`192.168.220.1/24` has host bits set (did you mean 192.168.220.0/24?)"
        );
    }

    #[test]
    fn containing_clears_host_bits() {
        let n = Ipv4Net::containing(Ipv4Addr::new(192, 168, 110, 77), 24);
        assert_eq!(n.to_string(), "192.168.110.0/24");
        assert_eq!(n.addr(), Ipv4Addr::new(192, 168, 110, 0));
        assert_eq!(n.last(), Ipv4Addr::new(192, 168, 110, 255));
        let all = Ipv4Net::containing(Ipv4Addr::new(8, 8, 8, 8), 0);
        assert_eq!(
            (all.to_string(), all.last()),
            ("0.0.0.0/0".into(), Ipv4Addr::BROADCAST)
        );
        assert_eq!(
            Ipv4Net::containing(Ipv4Addr::new(10, 0, 0, 1), 40).prefix_len(),
            32
        );
        assert_eq!(
            ipnet::Ipv4Net::from(n),
            "192.168.110.0/24".parse::<ipnet::Ipv4Net>().expect("valid")
        );
        let host: ipnet::Ipv4Net = "192.168.110.1/24".parse().expect("valid");
        assert_eq!(
            Ipv4Net::try_from(host).expect_err("host bits").to_string(),
            "`192.168.110.1/24` has host bits set (did you mean 192.168.110.0/24?)"
        );
        assert_eq!(Ipv4Net::try_from(host.trunc()).expect("canonical"), n);
        // Sorted as before: by network address, then prefix length.
        let mut v: Vec<Ipv4Net> = ["10.1.0.0/16", "10.0.0.0/8", "9.0.0.0/8", "10.0.0.0/16"]
            .iter()
            .map(|s| s.parse().expect("valid"))
            .collect();
        v.sort();
        let v: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(v, ["9.0.0.0/8", "10.0.0.0/8", "10.0.0.0/16", "10.1.0.0/16"]);
    }

    #[test]
    fn overlap_is_symmetric() {
        let a: Ipv4Net = "10.0.0.0/8".parse().expect("valid");
        let b: Ipv4Net = "10.1.0.0/16".parse().expect("valid");
        let c: Ipv4Net = "11.0.0.0/8".parse().expect("valid");
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
    }

    #[test]
    fn parses_ipv6_prefixes_of_either_family() {
        let n: Ipv6Net = "fd00:b::/64".parse().expect("valid");
        assert_eq!(n.to_string(), "fd00:b::/64");
        assert!(n.contains("fd00:b::5".parse().expect("addr")));
        assert!(!n.contains("fd00:c::5".parse().expect("addr")));
        assert_eq!(
            "fd00:b::1/64"
                .parse::<Ipv6Net>()
                .expect_err("host bits")
                .to_string(),
            "`fd00:b::1/64` has host bits set (did you mean fd00:b::/64?)"
        );
        assert!(matches!(
            "fd00::/129".parse::<Ipv6Net>(),
            Err(CidrError::Length6(_))
        ));
        assert!(matches!(
            "fd00::".parse::<Ipv6Net>(),
            Err(CidrError::Syntax6(_))
        ));
        let wide: Ipv6Net = "fd00::/16".parse().expect("valid");
        assert!(wide.overlaps(&n) && n.overlaps(&wide));
        assert_eq!(
            Ipv6Net::containing("fd00:b::77".parse().expect("addr"), 64),
            n
        );
        let list: Vec<IpNet> = ["10.1.0.0/16", "fd00:b::/64"]
            .iter()
            .map(|s| s.parse().expect("valid"))
            .collect();
        let (v4, v6) = split_families(list);
        assert_eq!(
            (v4.len(), v6, v4[0].to_string()),
            (1, vec![n], "10.1.0.0/16".into())
        );
        assert!(matches!(
            "10.1.0.1/16".parse::<IpNet>(),
            Err(CidrError::HostBits { .. })
        ));
        assert!(matches!(
            "fe80::x/64".parse::<IpNet>(),
            Err(CidrError::Syntax6(_))
        ));
    }

    #[test]
    fn macs_round_trip() {
        let m = parse_mac("02:42:c0:a8:6e:0b\n").expect("valid");
        assert_eq!(fmt_mac(&m), "02:42:c0:a8:6e:0b");
        assert!(parse_mac("02:42:c0:a8:6e").is_none());
        assert!(parse_mac("02:42:c0:a8:6e:0b:00").is_none());
    }
}
