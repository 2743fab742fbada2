//! Which destinations and ports a tunnel may reach.
//!
//! A destination is checked twice: its name (or IP literal) before any DNS
//! lookup, then every address it resolves to. Loopback, link-local
//! (including the 169.254.169.254 metadata service) and unspecified addresses
//! are refused unless an `--allow-dst` IP or CIDR pattern lists them, so a
//! name that resolves to 127.0.0.1 does not open a door to the host.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::cidr::{CidrError, IpNet, canonical};
use crate::request::{Host, Target, normalize_name};

/// One `--allow-dst` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DstPattern {
    /// An exact host name, lower case, without a trailing dot.
    Name(String),
    /// `*.example.com`: any name strictly below `example.com`.
    Suffix(String),
    /// An address or network.
    Net(IpNet),
}

impl DstPattern {
    pub fn parse(s: &str) -> Result<DstPattern, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty pattern".into());
        }
        // A network, or an address (bracketed or not) as a network of one.
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        match IpNet::parse(if s.contains('/') { s } else { bare }) {
            Ok(net) => return Ok(DstPattern::Net(net)),
            Err(CidrError::NotAnAddress(_)) if !s.contains('/') => {}
            Err(e) => return Err(e.to_string()),
        }
        let (suffix, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if !crate::request::is_valid_hostname(name) {
            return Err(format!(
                "{s:?}: expected a host name, *.suffix, IP address or CIDR"
            ));
        }
        let name = normalize_name(name);
        Ok(if suffix {
            DstPattern::Suffix(name)
        } else {
            DstPattern::Name(name)
        })
    }

    /// Whether `target`'s host, as the client wrote it, matches: a name by the name patterns,
    /// an address literal by the networks. Nothing is resolved.
    pub fn matches(&self, target: &Target) -> bool {
        match &target.host {
            Host::Name(name) => self.matches_name(name),
            Host::Ip(ip) => self.matches_addr(canonical(*ip)),
        }
    }

    fn matches_name(&self, name: &str) -> bool {
        match self {
            DstPattern::Name(n) => n == name,
            DstPattern::Suffix(sfx) => name
                .strip_suffix(sfx.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            DstPattern::Net(_) => false,
        }
    }

    fn matches_addr(&self, ip: IpAddr) -> bool {
        match self {
            DstPattern::Net(net) => net.contains(ip),
            _ => false,
        }
    }
}

impl fmt::Display for DstPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DstPattern::Name(n) => write!(f, "{n}"),
            DstPattern::Suffix(s) => write!(f, "*.{s}"),
            DstPattern::Net(n) => write!(f, "{n}"),
        }
    }
}

/// A set of allowed ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

impl PortSet {
    pub fn single(port: u16) -> PortSet {
        PortSet(vec![port..=port])
    }

    /// `443`, `443,6443`, `1-65535`, or any comma list of those.
    pub fn parse(s: &str) -> Result<PortSet, String> {
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim) {
            let port = |p: &str| -> Result<u16, String> {
                match p.trim().parse::<u16>() {
                    Ok(0) => Err("port 0 is not a valid port".into()),
                    Ok(n) => Ok(n),
                    Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
                }
            };
            let range = match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo)?, port(hi)?);
                    if lo > hi {
                        return Err(format!("{part:?}: range is backwards"));
                    }
                    lo..=hi
                }
                None => {
                    let p = port(part)?;
                    p..=p
                }
            };
            ranges.push(range);
        }
        Ok(PortSet(ranges))
    }

    pub fn union(sets: Vec<PortSet>) -> PortSet {
        PortSet(sets.into_iter().flat_map(|s| s.0).collect())
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }
}

/// Why a destination was refused (always answered with 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("port {0} is not allowed")]
    Port(u16),
    /// A name that matches no `--allow-dst` pattern.
    #[error("destination {0} is not allowed")]
    Name(String),
    /// An address literal that is not allowed.
    #[error("destination {0} is not allowed")]
    Address(String),
    #[error("{0} resolves only to addresses that are not allowed")]
    Addresses(String),
    /// A name that only an address pattern could allow, on its way to the parent proxy, which
    /// resolves it: this proxy has no address to check.
    #[error("destination {0} is allowed only by address, and the parent proxy resolves it")]
    Unresolved(String),
    /// Allowed by `--allow-dst`, but not one of the authenticated user's own destinations
    /// (`--user-dst`).
    #[error("{0}, for this user (--user-dst)")]
    ForUser(Box<Denied>),
}

/// The destination policy: `--allow-dst` patterns and `--allow-port`.
#[derive(Debug, Clone)]
pub struct Policy {
    patterns: Vec<DstPattern>,
    ports: PortSet,
}

/// Addresses that reach this host or its link: refused unless listed.
fn is_special(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // fe80::/10
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

impl Policy {
    pub fn new(patterns: Vec<DstPattern>, ports: PortSet) -> Policy {
        Policy { patterns, ports }
    }

    fn listed(&self, ip: IpAddr) -> bool {
        self.patterns.iter().any(|p| p.matches_addr(ip))
    }

    fn name_allowed(&self, name: &str) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.matches_name(name))
    }

    fn has_nets(&self) -> bool {
        self.patterns
            .iter()
            .any(|p| matches!(p, DstPattern::Net(_)))
    }

    /// The check before any lookup: the port, and the name or IP literal.
    pub fn check_target(&self, target: &Target) -> Result<(), Denied> {
        if !self.ports.contains(target.port) {
            return Err(Denied::Port(target.port));
        }
        match &target.host {
            Host::Ip(ip) => {
                if self.addr_allowed(&target.host, *ip) {
                    Ok(())
                } else {
                    Err(Denied::Address(target.host.to_string()))
                }
            }
            // A name that matches no name pattern may still be allowed by
            // the addresses it resolves to, when IP patterns exist.
            Host::Name(name) if self.name_allowed(name) || self.has_nets() => Ok(()),
            Host::Name(name) => Err(Denied::Name(name.clone())),
        }
    }

    /// The check for a destination the parent proxy connects to (`--parent-proxy`): the port
    /// and an IP literal as [`Policy::check_target`] checks them; a name is not resolved here,
    /// so only a name pattern can allow it (or no pattern at all): address patterns and the
    /// loopback / link-local rule have no address to judge.
    pub fn check_unresolved(&self, target: &Target) -> Result<(), Denied> {
        match &target.host {
            Host::Name(name) if self.ports.contains(target.port) && !self.name_allowed(name) => {
                Err(Denied::Unresolved(name.clone()))
            }
            _ => self.check_target(target),
        }
    }

    /// Whether `ip`, one address `host` stands for, may be connected to.
    pub fn addr_allowed(&self, host: &Host, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.listed(ip) {
            return true;
        }
        if is_special(ip) {
            return false;
        }
        match host {
            Host::Name(name) => self.name_allowed(name),
            Host::Ip(_) => self.patterns.is_empty(),
        }
    }

    /// Keeps the resolved addresses that may be connected to; refuses when none may.
    pub fn filter_addrs(
        &self,
        target: &Target,
        addrs: Vec<std::net::SocketAddr>,
    ) -> Result<Vec<std::net::SocketAddr>, Denied> {
        let kept: Vec<_> = addrs
            .into_iter()
            .filter(|a| self.addr_allowed(&target.host, a.ip()))
            .collect();
        if kept.is_empty() {
            return Err(Denied::Addresses(target.to_string()));
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn target(s: &str) -> Target {
        crate::request::parse_authority(s).unwrap()
    }

    fn policy(pats: &[&str], ports: &str) -> Policy {
        Policy::new(
            pats.iter().map(|p| DstPattern::parse(p).unwrap()).collect(),
            PortSet::parse(ports).unwrap(),
        )
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ports() {
        let p = PortSet::parse("443,6443,8000-8010").unwrap();
        for (port, ok) in [
            (443, true),
            (6443, true),
            (8000, true),
            (8010, true),
            (8011, false),
            (80, false),
        ] {
            assert_eq!(p.contains(port), ok, "{port}");
        }
        assert!(PortSet::parse("0").is_err());
        assert!(PortSet::parse("65536").is_err());
        assert!(PortSet::parse("10-5").is_err());
        assert!(PortSet::parse("http").is_err());
        assert!(PortSet::parse("1-65535").unwrap().contains(65535));
    }

    #[test]
    fn default_policy_allows_names_but_not_loopback() {
        let p = policy(&[], "443");
        assert!(p.check_target(&target("example.com:443")).is_ok());
        assert_eq!(
            p.check_target(&target("example.com:80")),
            Err(Denied::Port(80))
        );
        assert!(p.check_target(&target("93.184.216.34:443")).is_ok());
        for bad in [
            "127.0.0.1:443",
            "[::1]:443",
            "0.0.0.0:443",
            "169.254.169.254:443",
            "[fe80::1]:443",
            "[::ffff:127.0.0.1]:443",
        ] {
            assert!(p.check_target(&target(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn name_resolving_to_loopback_is_refused() {
        let p = policy(&[], "443");
        let t = target("evil.example:443");
        assert!(p.check_target(&t).is_ok());
        assert_eq!(
            p.filter_addrs(&t, vec![sa("127.0.0.1:443")]),
            Err(Denied::Addresses("evil.example:443".into()))
        );
        // Mixed answers keep only the allowed addresses.
        assert_eq!(
            p.filter_addrs(&t, vec![sa("127.0.0.1:443"), sa("192.0.2.7:443")])
                .unwrap(),
            vec![sa("192.0.2.7:443")]
        );
        assert!(
            p.filter_addrs(&t, vec![sa("[::ffff:169.254.169.254]:443")])
                .is_err()
        );
    }

    #[test]
    fn listed_loopback_is_allowed() {
        let p = policy(&["127.0.0.0/8"], "1-65535");
        assert!(p.check_target(&target("127.0.0.1:8080")).is_ok());
        assert!(p.check_target(&target("127.9.9.9:22")).is_ok());
        assert!(p.check_target(&target("[::1]:22")).is_err());
        // A name is allowed through the addresses it resolves to.
        let t = target("localhost:80");
        assert!(p.check_target(&t).is_ok());
        assert!(p.filter_addrs(&t, vec![sa("127.0.0.1:80")]).is_ok());
        assert!(p.filter_addrs(&t, vec![sa("192.0.2.1:80")]).is_err());
    }

    #[test]
    fn name_patterns() {
        let p = policy(&["api.example.com", "*.cluster.local"], "443");
        assert!(p.check_target(&target("API.Example.COM.:443")).is_ok());
        assert!(p.check_target(&target("a.b.cluster.local:443")).is_ok());
        assert!(p.check_target(&target("cluster.local:443")).is_err());
        assert!(p.check_target(&target("evilcluster.local:443")).is_err());
        assert!(p.check_target(&target("example.com:443")).is_err());
        assert!(p.check_target(&target("192.0.2.1:443")).is_err());
        // Allowed name, but resolving to loopback: still refused.
        let t = target("api.example.com:443");
        assert!(p.filter_addrs(&t, vec![sa("127.0.0.1:443")]).is_err());
        assert!(p.filter_addrs(&t, vec![sa("192.0.2.1:443")]).is_ok());
    }

    #[test]
    fn cidr_edges() {
        let p = policy(&["10.1.0.0/16", "2001:db8::/32"], "443");
        assert!(p.check_target(&target("10.1.255.255:443")).is_ok());
        assert!(p.check_target(&target("10.2.0.0:443")).is_err());
        assert!(p.check_target(&target("[2001:db8:ffff::1]:443")).is_ok());
        assert!(p.check_target(&target("[2001:db9::1]:443")).is_err());
        assert!(p.check_target(&target("[::ffff:10.1.2.3]:443")).is_ok());
        assert!(DstPattern::parse("0.0.0.0/0").is_ok());
        // An IPv4-mapped network is the IPv4 network (it used to be refused:
        // "prefix length must be 0-32").
        assert_eq!(
            DstPattern::parse("::ffff:10.1.0.0/112"),
            DstPattern::parse("10.1.0.0/16")
        );
        assert_eq!(
            DstPattern::parse("[::ffff:10.1.2.3]"),
            DstPattern::parse("10.1.2.3")
        );
        // Other IPv6 networks hold no IPv4 address, not even ::/0.
        let v6_any = policy(&["::/0"], "443");
        assert!(v6_any.check_target(&target("[2001:db8::1]:443")).is_ok());
        assert!(
            v6_any
                .check_target(&target("[::ffff:192.0.2.1]:443"))
                .is_err()
        );
        assert!(v6_any.check_target(&target("192.0.2.1:443")).is_err());
        assert!(DstPattern::parse("10.0.0.0/33").is_err());
        assert!(DstPattern::parse("a b").is_err());
    }

    #[test]
    fn a_name_for_the_parent_is_allowed_by_name_patterns_only() {
        let t = |s: &str| crate::request::parse_authority(s).unwrap();
        let nets_only = Policy::new(
            vec![DstPattern::parse("10.0.0.0/8").unwrap()],
            PortSet::single(443),
        );
        // Locally a name waits for its addresses; for the parent it cannot.
        assert_eq!(nets_only.check_target(&t("db.example:443")), Ok(()));
        assert_eq!(
            nets_only.check_unresolved(&t("db.example:443")),
            Err(Denied::Unresolved("db.example".into()))
        );
        // Literals and ports are judged as ever.
        assert_eq!(nets_only.check_unresolved(&t("10.1.2.3:443")), Ok(()));
        assert_eq!(
            nets_only.check_unresolved(&t("192.0.2.1:443")),
            Err(Denied::Address("192.0.2.1".into()))
        );
        assert_eq!(
            nets_only.check_unresolved(&t("db.example:80")),
            Err(Denied::Port(80))
        );
        let names = Policy::new(
            vec![
                DstPattern::parse("*.example.com").unwrap(),
                DstPattern::parse("10.0.0.0/8").unwrap(),
            ],
            PortSet::single(443),
        );
        assert_eq!(names.check_unresolved(&t("a.example.com:443")), Ok(()));
        assert!(names.check_unresolved(&t("other.test:443")).is_err());
        // No pattern: any name (the parent resolves it, loopback rules included).
        let any = Policy::new(vec![], PortSet::single(443));
        assert_eq!(any.check_unresolved(&t("localhost:443")), Ok(()));
        assert!(any.check_unresolved(&t("127.0.0.1:443")).is_err());
    }
}
