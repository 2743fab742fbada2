//! IP networks (`10.0.0.0/8`, `2001:db8::/32`, or a bare address as a network of one) and
//! whether an address lies in one. Both `--allow-dst` (policy.rs) and `--allow-src` (limits.rs)
//! are written in this form and compared the same way: an IPv4-mapped IPv6 address
//! (`::ffff:a.b.c.d`) is the IPv4 address it maps, on either side.

use std::fmt;
use std::net::IpAddr;

/// An IP network: an address and a prefix length. Host bits below the
/// prefix may be set (`10.1.2.3/8` is `10.0.0.0/8`); they are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a text is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// What stands before the `/` (or the whole text) is not an IP address.
    #[error("{0:?}: not an IP address or network (expected e.g. 10.0.0.0/8)")]
    NotAnAddress(String),
    /// The prefix length is not a number within the address family's bits.
    #[error("{text:?}: prefix length must be 0-{max}")]
    Prefix { text: String, max: u8 },
}

impl IpNet {
    /// `addr/prefix`, or a bare address (all its bits: /32 or /128).
    pub fn parse(s: &str) -> Result<IpNet, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::NotAnAddress(s.into()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                p.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| CidrError::Prefix {
                        text: s.into(),
                        max,
                    })?
            }
        };
        Ok(IpNet::new(addr, prefix))
    }

    /// A network inside `::ffff:0:0/96` is the IPv4 network it maps
    /// (`::ffff:10.0.0.0/104` is `10.0.0.0/8`), since addresses are compared
    /// in their IPv4 form. Any other IPv6 network, `::/0` included, holds no
    /// IPv4 address. `prefix` is at most the family's bits (32 or 128).
    fn new(addr: IpAddr, prefix: u8) -> IpNet {
        match (canonical(addr), addr) {
            (IpAddr::V4(v4), IpAddr::V6(_)) if prefix >= 96 => IpNet {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            },
            _ => IpNet { addr, prefix },
        }
    }

    /// Whether `ip` (IPv4-mapped read as IPv4) lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `::ffff:a.b.c.d` is the IPv4 address a.b.c.d for every decision here.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        IpNet::parse(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_edges() {
        let n = net("10.1.0.0/16");
        assert!(n.contains(ip("10.1.0.0")));
        assert!(n.contains(ip("10.1.255.255")));
        assert!(!n.contains(ip("10.0.255.255")));
        assert!(!n.contains(ip("10.2.0.0")));
        let n = net("2001:db8::/32");
        assert!(n.contains(ip("2001:db8:ffff:ffff::1")));
        assert!(!n.contains(ip("2001:db9::")));
        // Host bits below the prefix are ignored.
        assert_eq!(net("10.1.2.3/8").to_string(), "10.1.2.3/8");
        assert!(net("10.1.2.3/8").contains(ip("10.200.0.1")));
    }

    #[test]
    fn zero_and_full_prefixes() {
        assert!(net("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(net("::/0").contains(ip("2001:db8::1")));
        assert!(net("127.0.0.1/32").contains(ip("127.0.0.1")));
        assert!(!net("127.0.0.1/32").contains(ip("127.0.0.2")));
        assert!(net("::1/128").contains(ip("::1")));
        assert!(!net("::1/128").contains(ip("::2")));
        // A bare address is a network of one.
        assert_eq!(net("127.0.0.1"), net("127.0.0.1/32"));
        assert_eq!(net("::1"), net("::1/128"));
    }

    #[test]
    fn ipv4_mapped_is_ipv4_on_both_sides() {
        // A peer on a dual-stack listener: ::ffff:127.0.0.2 is 127.0.0.2.
        assert!(net("127.0.0.0/8").contains(ip("::ffff:127.0.0.2")));
        assert!(!net("127.0.0.1/32").contains(ip("::ffff:127.0.0.2")));
        // A mapped network is the IPv4 network.
        assert_eq!(net("::ffff:10.0.0.0/104"), net("10.0.0.0/8"));
        assert_eq!(net("::ffff:10.1.2.3"), net("10.1.2.3/32"));
        // Other IPv6 networks hold no IPv4 address, not even ::/0; and
        // IPv4 networks no IPv6 address.
        assert!(!net("::/0").contains(ip("192.0.2.1")));
        assert!(!net("::/0").contains(ip("::ffff:192.0.2.1")));
        assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")));
        // A network that only partly overlaps ::ffff:0:0/96 stays IPv6.
        assert!(!net("::ffff:0:0/95").contains(ip("192.0.2.1")));
        assert!(net("::ffff:0:0/95").contains(ip("::fffe:0:1")));
    }

    #[test]
    fn errors_say_which_part_is_wrong() {
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.0/-1",
        ] {
            assert!(
                matches!(IpNet::parse(bad), Err(CidrError::Prefix { .. })),
                "{bad}"
            );
        }
        for bad in [
            "",
            "/8",
            "example.com",
            "10.0.0/8",
            "[::1]/128",
            "10.0.0.0.0",
        ] {
            assert!(
                matches!(IpNet::parse(bad), Err(CidrError::NotAnAddress(_))),
                "{bad}"
            );
        }
        assert_eq!(
            IpNet::parse("10.0.0.0/33").unwrap_err().to_string(),
            "\"10.0.0.0/33\": prefix length must be 0-32"
        );
    }
}
