//! A minimal IPv4 prefix type (address + length) for subnets and interface addresses.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use crate::Error;

/// An IPv4 address with a prefix length, e.g. `192.168.110.1/24`.
///
/// The address part is kept as given, so the same type describes both a subnet
/// (`192.168.110.0/24`) and an interface address in it (`192.168.110.1/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// `addr/prefix`; fails when `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, Error> {
        if prefix > 32 {
            return Err(Error::Config(format!("prefix length {prefix} > 32")));
        }
        Ok(Self { addr, prefix })
    }

    /// `addr/prefix` for constants; a bad prefix fails the build when used in a `const`.
    pub const fn known(addr: Ipv4Addr, prefix: u8) -> Self {
        assert!(prefix <= 32, "IPv4 prefix length > 32");
        Self { addr, prefix }
    }

    /// The address as given (not masked).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask as a host-order integer.
    pub fn mask(&self) -> u32 {
        // checked_shl: a /0 would shift by 32, which overflows.
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The network this address belongs to, e.g. `192.168.110.1/24` -> `192.168.110.0/24`.
    pub fn network(&self) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix: self.prefix,
        }
    }

    /// True when `ip` lies inside this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// The `n`-th host address of the network (`n = 1` is `.1` in a /24), or `None` when it
    /// would be the network or broadcast address or fall outside the prefix.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        // /31 and /32 have no network/broadcast addresses to avoid (RFC 3021).
        let usable = if size <= 2 {
            u64::from(n) < size
        } else {
            n >= 1 && u64::from(n) < size - 1
        };
        usable.then(|| Ipv4Addr::from((u32::from(self.addr) & self.mask()) + n))
    }

    /// `ip` with this prefix's length, e.g. the address to put on an interface.
    pub fn with_addr(&self, ip: Ipv4Addr) -> Self {
        Self {
            addr: ip,
            prefix: self.prefix,
        }
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let parse_err = || Error::Parse {
            what: "IPv4 CIDR",
            input: s.to_owned(),
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(parse_err)?;
        let addr = addr.parse().map_err(|_| parse_err())?;
        let prefix = prefix.parse().map_err(|_| parse_err())?;
        Self::new(addr, prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("valid CIDR in test")
    }

    #[test]
    fn parse_and_display_round_trip() {
        assert_eq!(cidr("192.168.110.1/24").to_string(), "192.168.110.1/24");
        assert!("192.168.110.1".parse::<Ipv4Cidr>().is_err());
        assert!("192.168.110.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("300.1.1.1/24".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn network_and_contains() {
        let c = cidr("192.168.110.77/24");
        assert_eq!(c.network(), cidr("192.168.110.0/24"));
        assert!(c.contains(Ipv4Addr::new(192, 168, 110, 1)));
        assert!(!c.contains(Ipv4Addr::new(192, 168, 220, 1)));
        assert!(cidr("0.0.0.0/0").contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert_eq!(cidr("10.0.0.0/0").mask(), 0);
        assert_eq!(cidr("10.0.0.0/32").mask(), u32::MAX);
    }

    #[test]
    fn host_addresses_skip_network_and_broadcast() {
        let c = cidr("192.168.110.0/24");
        assert_eq!(c.host(1), Some(Ipv4Addr::new(192, 168, 110, 1)));
        assert_eq!(c.host(11), Some(Ipv4Addr::new(192, 168, 110, 11)));
        assert_eq!(c.host(254), Some(Ipv4Addr::new(192, 168, 110, 254)));
        assert_eq!(c.host(0), None);
        assert_eq!(c.host(255), None);
        assert_eq!(
            cidr("10.0.0.0/31").host(0),
            Some(Ipv4Addr::new(10, 0, 0, 0))
        );
        assert_eq!(cidr("10.0.0.0/30").host(3), None);
    }
}
