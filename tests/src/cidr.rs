//! IPv4 prefixes in the testbed: `ipnet`'s `Ipv4Net`, the type under the
//! agent's canonical `net::Ipv4Net`. It keeps the address as given, so one
//! type describes a subnet (`192.168.110.0/24`) and an interface address in
//! it (`192.168.110.1/24`); [`Ipv4NetExt`] adds what the testbed needs of
//! it that ipnet lacks.

use std::net::Ipv4Addr;

pub use ipnet::Ipv4Net;

/// Host addresses of a prefix, numbered as the testbed hands them out.
pub trait Ipv4NetExt {
    /// The `n`-th host address of the network (`n = 1` is `.1` in a /24), or `None` when
    /// it would be the network or broadcast address or fall outside the prefix.
    fn host(&self, n: u32) -> Option<Ipv4Addr>;
    /// `ip` with this prefix's length, e.g. the address to put on an interface.
    fn with_addr(&self, ip: Ipv4Addr) -> Ipv4Net;
}

impl Ipv4NetExt for Ipv4Net {
    fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix_len()));
        // /31 and /32 have no network/broadcast addresses to avoid (RFC 3021).
        let usable = if size <= 2 {
            u64::from(n) < size
        } else {
            n >= 1 && u64::from(n) < size - 1
        };
        usable.then(|| Ipv4Addr::from(u32::from(self.network()) + n))
    }

    fn with_addr(&self, ip: Ipv4Addr) -> Ipv4Net {
        Ipv4Net::new_assert(ip, self.prefix_len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Net {
        s.parse().expect("valid CIDR in test")
    }

    #[test]
    fn parse_and_display_round_trip() {
        assert_eq!(cidr("192.168.110.1/24").to_string(), "192.168.110.1/24");
        assert!("192.168.110.1".parse::<Ipv4Net>().is_err());
        assert!("192.168.110.1/33".parse::<Ipv4Net>().is_err());
        assert!("300.1.1.1/24".parse::<Ipv4Net>().is_err());
    }

    #[test]
    fn network_and_contains() {
        let c = cidr("192.168.110.77/24");
        assert_eq!(c.trunc(), cidr("192.168.110.0/24"));
        assert_eq!(
            c.with_addr(Ipv4Addr::new(192, 168, 110, 1)),
            cidr("192.168.110.1/24")
        );
        assert!(c.contains(&Ipv4Addr::new(192, 168, 110, 1)));
        assert!(!c.contains(&Ipv4Addr::new(192, 168, 220, 1)));
        assert!(cidr("0.0.0.0/0").contains(&Ipv4Addr::new(8, 8, 8, 8)));
        assert_eq!(u32::from(cidr("10.0.0.0/0").netmask()), 0);
        assert_eq!(u32::from(cidr("10.0.0.0/32").netmask()), u32::MAX);
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
