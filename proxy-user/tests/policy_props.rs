//! Property tests of the destination policy (src/policy.rs) through the
//! library's public API: patterns against names, addresses and ports, with
//! IPv4-mapped IPv6, trailing dots, case, punycode and Unicode, CIDR edges,
//! and DNS rebinding (the address connected to is the address checked).

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use splice_proxy::policy::{Denied, DstPattern, Policy, PortSet};
use splice_proxy::refusal::Refusal;
use splice_proxy::request::{AuthorityError, Host, Target, parse_authority};
use splice_proxy::upstream::{ConnectError, Connector, Resolver};

fn policy(patterns: &[String], ports: &str) -> Policy {
    Policy::new(
        patterns
            .iter()
            .map(|p| DstPattern::parse(p).unwrap_or_else(|e| panic!("pattern {p:?}: {e}")))
            .collect(),
        PortSet::parse(ports).unwrap(),
    )
}

fn ip_target(ip: IpAddr, port: u16) -> Target {
    Target {
        host: Host::Ip(ip),
        port,
    }
}

fn mapped(v4: Ipv4Addr) -> IpAddr {
    IpAddr::V6(v4.to_ipv6_mapped())
}

/// A DNS label: letters, digits and inner hyphens.
fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
}

/// A host name; the last label starts with a letter (a numeric one is an address form).
fn name() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(label(), 0..3),
        "[a-z][a-z0-9-]{0,6}[a-z0-9]",
    )
        .prop_map(|(mut labels, last)| {
            labels.push(last);
            labels.join(".")
        })
}

/// `name` spelled as a client might: any case, maybe one trailing dot.
fn spelling(name: String) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(any::<bool>(), name.len()),
        any::<bool>(),
    )
        .prop_map(move |(upper, dot)| {
            let mut s: String = name
                .chars()
                .zip(upper)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect();
            if dot {
                s.push('.');
            }
            s
        })
}

/// Addresses the default policy refuses: loopback, link-local (the metadata
/// service among them), "this network", broadcast, multicast.
fn special_v4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        any::<[u8; 3]>().prop_map(|[a, b, c]| Ipv4Addr::new(127, a, b, c)),
        any::<[u8; 2]>().prop_map(|[a, b]| Ipv4Addr::new(169, 254, a, b)),
        any::<[u8; 3]>().prop_map(|[a, b, c]| Ipv4Addr::new(0, a, b, c)),
        (224u8..=239, any::<[u8; 3]>()).prop_map(|(a, [b, c, d])| Ipv4Addr::new(a, b, c, d)),
        Just(Ipv4Addr::BROADCAST),
    ]
}

/// An `--allow-dst` pattern of any kind.
fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        name(),
        name().prop_map(|n| format!("*.{n}")),
        (any::<u32>(), 0u8..=32).prop_map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(a))),
        any::<u32>().prop_map(|a| Ipv4Addr::from(a).to_string()),
        (any::<u128>(), 0u8..=128).prop_map(|(a, p)| format!("{}/{p}", Ipv6Addr::from(a))),
        special_v4().prop_map(|a| format!("{a}/24")),
    ]
}

fn decision(p: &Policy, t: &Target) -> Result<(), Denied> {
    p.check_target(t)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `::ffff:a.b.c.d` is a.b.c.d for every decision: the literal, a
    /// resolved address, any pattern set.
    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_address(
        patterns in prop::collection::vec(pattern(), 0..4),
        addr in prop_oneof![any::<u32>().prop_map(Ipv4Addr::from), special_v4()],
        n in name(),
    ) {
        let p = policy(&patterns, "443");
        let v4 = IpAddr::V4(addr);
        prop_assert_eq!(
            decision(&p, &ip_target(v4, 443)).is_ok(),
            decision(&p, &ip_target(mapped(addr), 443)).is_ok()
        );
        let named = Host::Name(n);
        prop_assert_eq!(p.addr_allowed(&named, v4), p.addr_allowed(&named, mapped(addr)));
        let literal = ip_target(v4, 443).host;
        prop_assert_eq!(p.addr_allowed(&literal, v4), p.addr_allowed(&literal, mapped(addr)));
        // The bracketed literal on the wire parses to the same decision.
        let text = format!("[::ffff:{addr}]:443");
        let t = parse_authority(&text).unwrap();
        prop_assert_eq!(decision(&p, &t).is_ok(), decision(&p, &ip_target(v4, 443)).is_ok());
    }

    /// The default policy never lets a special address through, whatever
    /// form it comes in: literal, mapped literal, or what a name resolves to.
    #[test]
    fn default_policy_refuses_special_addresses_in_every_form(
        addr in special_v4(),
        n in name(),
        port in 1u16..,
    ) {
        let p = policy(&[], "1-65535");
        for ip in [IpAddr::V4(addr), mapped(addr)] {
            prop_assert!(decision(&p, &ip_target(ip, port)).is_err(), "{ip}");
            let t = Target { host: Host::Name(n.clone()), port };
            prop_assert!(decision(&p, &t).is_ok(), "names are checked after the lookup");
            prop_assert_eq!(
                p.filter_addrs(&t, vec![SocketAddr::new(ip, port)]),
                Err(Denied::Addresses(t.to_string()))
            );
        }
        let text = format!("[::ffff:{addr}]:{port}");
        prop_assert!(decision(&p, &parse_authority(&text).unwrap()).is_err(), "{text}");
    }

    /// Names compare without case and without one trailing dot, in the
    /// request and in the pattern; `*.suffix` holds names strictly below it.
    #[test]
    fn names_ignore_case_and_one_trailing_dot(
        n in name(),
        sub in label(),
        asked in name().prop_flat_map(spelling),
    ) {
        let target = |host: &str| parse_authority(&format!("{host}:443")).unwrap();
        for (variant, pattern_variant) in [
            (n.to_ascii_uppercase(), format!("{n}.")),
            (format!("{n}."), n.to_ascii_uppercase()),
            (n.clone(), n.clone()),
        ] {
            prop_assert_eq!(target(&variant).host, Host::Name(n.clone()));
            let exact = policy(std::slice::from_ref(&pattern_variant), "443");
            prop_assert!(exact.check_target(&target(&variant)).is_ok());
            let below = policy(&[format!("*.{pattern_variant}")], "443");
            let under = target(&format!("{sub}.{variant}"));
            prop_assert!(below.check_target(&under).is_ok(), "{:?}", under);
            prop_assert!(below.check_target(&target(&variant)).is_err(), "the suffix itself");
            // No label boundary, no match. Glued, the two may not be a name at all (`0` and
            // `X1C` make the number 0X1C), and then the request is refused before any policy.
            match parse_authority(&format!("{sub}{variant}:443")) {
                Ok(glued) => prop_assert!(below.check_target(&glued).is_err(), "{:?}", glued),
                Err(e) => prop_assert!(matches!(e, AuthorityError::BadHost(_)), "{e:?}"),
            }
        }
        // Any spelling of another name: allowed by `n` exactly when it is `n`.
        let exact = policy(std::slice::from_ref(&n), "443");
        let normal = asked.trim_end_matches('.').to_ascii_lowercase();
        prop_assert_eq!(exact.check_target(&target(&asked)).is_ok(), normal == n);
    }

    /// A Unicode host is refused on the wire (400) and as a pattern (exit 2);
    /// its punycode form is an ordinary name, matched exactly.
    #[test]
    fn unicode_hosts_are_refused_punycode_is_a_name(
        head in "[a-z]{0,5}",
        uni in "[\u{e0}-\u{ff}\u{400}-\u{4ff}\u{4e00}-\u{4e20}]{1,3}",
        tail in "[a-z]{0,5}",
        puny in "[a-z0-9]{1,10}",
        tld in "[a-z]{2,5}",
    ) {
        let host = format!("{head}{uni}{tail}.{tld}");
        prop_assert!(parse_authority(&format!("{host}:443")).is_err(), "{host}");
        prop_assert!(DstPattern::parse(&host).is_err(), "{host}");
        prop_assert!(DstPattern::parse(&format!("*.{host}")).is_err(), "{host}");
        let idn = format!("xn--{puny}.{tld}");
        let t = parse_authority(&format!("{idn}:443")).unwrap();
        prop_assert_eq!(&t.host, &Host::Name(idn.clone()));
        prop_assert!(policy(std::slice::from_ref(&idn), "443").check_target(&t).is_ok());
        let other = format!("xn--{puny}x.{tld}");
        prop_assert!(policy(&[other], "443").check_target(&t).is_err());
    }

    /// The first and last address of an allowed IPv4 network are in, the
    /// addresses just outside are not (as literals, mapped literals, and
    /// resolved addresses of a name).
    #[test]
    fn ipv4_cidr_edges(base in any::<u32>(), prefix in 0u32..=32, n in name()) {
        let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
        let first = base & mask;
        let last = first | !mask;
        let net = format!("{}/{prefix}", Ipv4Addr::from(first));
        let p = policy(std::slice::from_ref(&net), "443");
        let named = Target { host: Host::Name(n), port: 443 };
        let check = |a: u32, want: bool| -> Result<(), TestCaseError> {
            let v4 = Ipv4Addr::from(a);
            for ip in [IpAddr::V4(v4), mapped(v4)] {
                prop_assert_eq!(decision(&p, &ip_target(ip, 443)).is_ok(), want, "{} in {}", ip, net);
                prop_assert_eq!(
                    p.filter_addrs(&named, vec![SocketAddr::new(ip, 443)]).is_ok(),
                    want,
                    "{} resolved, {}", ip, net
                );
            }
            Ok(())
        };
        check(first, true)?;
        check(last, true)?;
        if let Some(before) = first.checked_sub(1) {
            check(before, false)?;
        }
        if let Some(after) = last.checked_add(1) {
            check(after, false)?;
        }
    }

    /// The same for IPv6 networks (outside `::ffff:0:0/96`, which is IPv4).
    #[test]
    fn ipv6_cidr_edges(base in any::<u128>(), prefix in 0u32..=128) {
        let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
        let first = base & mask;
        let last = first | !mask;
        let net = format!("{}/{prefix}", Ipv6Addr::from(first));
        let p = policy(std::slice::from_ref(&net), "443");
        let is_mapped = |a: u128| Ipv6Addr::from(a).to_ipv4_mapped().is_some();
        // A network that reaches into the mapped range holds IPv4 only
        // through an IPv4 (or ::ffff:) pattern; skip those edges here.
        prop_assume!(prefix >= 96 || (!is_mapped(first) && !is_mapped(last)));
        for (a, want) in [(first, true), (last, true)]
            .into_iter()
            .chain(first.checked_sub(1).map(|a| (a, false)))
            .chain(last.checked_add(1).map(|a| (a, false)))
        {
            let ip = IpAddr::V6(Ipv6Addr::from(a));
            prop_assert_eq!(decision(&p, &ip_target(ip, 443)).is_ok(), want, "{} in {}", ip, net);
        }
    }

    /// Ports: allowed exactly when in one of the ranges, checked before the host.
    #[test]
    fn ports_are_checked_first(
        ranges in prop::collection::vec((1u16.., 1u16..), 1..4),
        port in 1u16..,
        n in name(),
    ) {
        let spec: Vec<String> = ranges
            .iter()
            .map(|(a, b)| format!("{}-{}", a.min(b), a.max(b)))
            .collect();
        let p = policy(&["192.0.2.0/24".to_string()], &spec.join(","));
        let inside = ranges.iter().any(|(a, b)| (*a.min(b)..=*a.max(b)).contains(&port));
        for host in [Host::Name(n.clone()), Host::Ip("192.0.2.1".parse().unwrap()), Host::Ip("127.0.0.1".parse().unwrap())] {
            let got = decision(&p, &Target { host, port });
            if !inside {
                prop_assert_eq!(got, Err(Denied::Port(port)));
            } else {
                prop_assert_ne!(got, Err(Denied::Port(port)));
            }
        }
    }
}

// ------------------------------------------------------- DNS rebinding ----

/// A resolver whose answer changes with every lookup (a rebinding DNS
/// server with TTL 0): lookup i gets `answers[i]`, later ones the last.
struct Rebinding {
    answers: Vec<Vec<IpAddr>>,
    calls: AtomicUsize,
}

impl Resolver for Rebinding {
    fn resolve<'a>(
        &'a self,
        _name: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        let i = self.calls.fetch_add(1, Ordering::SeqCst);
        let ips = &self.answers[i.min(self.answers.len() - 1)];
        let addrs = ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        Box::pin(async move { Ok(addrs) })
    }
}

/// Loopback listeners on one port: 127.0.0.1 (allowed), 127.0.0.2 (loopback,
/// not listed: forbidden); 127.0.0.3 is listed but nothing listens there.
struct Peers {
    port: u16,
    allowed: TcpListener,
    forbidden: TcpListener,
}

fn peers() -> Peers {
    for _ in 0..20 {
        let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = allowed.local_addr().unwrap().port();
        if let Ok(forbidden) = TcpListener::bind(("127.0.0.2", port)) {
            if TcpListener::bind(("127.0.0.3", port)).is_ok() {
                allowed.set_nonblocking(true).unwrap();
                forbidden.set_nonblocking(true).unwrap();
                return Peers {
                    port,
                    allowed,
                    forbidden,
                };
            }
        }
    }
    panic!("no port free on 127.0.0.1-3");
}

/// Everything accepted so far on `l`: the local addresses connected to.
fn accepted(l: &TcpListener) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    while let Ok((s, _)) = l.accept() {
        out.push(s.local_addr().unwrap());
    }
    out
}

const ALLOWED: &str = "127.0.0.1";
const FORBIDDEN: &str = "127.0.0.2";
const CLOSED: &str = "127.0.0.3";

fn rebinding_answer() -> impl Strategy<Value = Vec<IpAddr>> {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let pool = vec![
        ip(ALLOWED),
        ip(FORBIDDEN),
        ip(CLOSED),
        mapped(FORBIDDEN.parse().unwrap()),
        mapped(ALLOWED.parse().unwrap()),
    ];
    prop::collection::vec(prop::sample::select(pool), 1..5)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The name is looked up once; the addresses the policy refuses are
    /// never connected to; the address connected to is the first allowed
    /// one that answers in RFC 8305's order, and it is the one reported
    /// (and logged).
    #[test]
    fn the_address_connected_to_is_the_address_checked(
        first in rebinding_answer(),
        later in rebinding_answer(),
    ) {
        let peers = peers();
        let resolver = Arc::new(Rebinding { answers: vec![first.clone(), later], calls: AtomicUsize::new(0) });
        let connector = Connector { resolver: resolver.clone(), timeout: Duration::from_secs(5) };
        let p = policy(&[format!("{ALLOWED}/32"), format!("{CLOSED}/32")], "1-65535");
        let target = Target { host: Host::Name("rebind.test".into()), port: peers.port };
        prop_assert!(p.check_target(&target).is_ok());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let result = rt.block_on(connector.connect(&target, &p, None));
        prop_assert_eq!(resolver.calls.load(Ordering::SeqCst), 1, "looked up more than once");
        let forbidden_hits = accepted(&peers.forbidden);
        prop_assert!(forbidden_hits.is_empty(), "connected to a forbidden address: {:?}", forbidden_hits);
        let allowed_ip: Ipv4Addr = ALLOWED.parse().unwrap();
        let checked: Vec<IpAddr> = first
            .iter()
            .copied()
            .filter(|ip| splice_proxy::cidr::canonical(*ip) != IpAddr::V4(FORBIDDEN.parse().unwrap()))
            .collect();
        // Attempts follow RFC 8305's order (families alternate), so the address that answers
        // first is the first allowed one in that order, not in the resolver's.
        let attempt_order = splice_proxy::upstream::interleave(
            checked.iter().map(|ip| SocketAddr::new(*ip, peers.port)).collect(),
        );
        let reachable = attempt_order
            .iter()
            .map(|a| a.ip())
            .find(|ip| splice_proxy::cidr::canonical(*ip) == IpAddr::V4(allowed_ip));
        match (result, reachable) {
            (Ok((stream, addr)), Some(want)) => {
                prop_assert_eq!(addr, SocketAddr::new(want, peers.port));
                prop_assert_eq!(stream.peer_addr().unwrap(), addr);
                // The listener saw exactly that connection.
                let seen = {
                    let deadline = std::time::Instant::now() + Duration::from_secs(2);
                    loop {
                        let s = accepted(&peers.allowed);
                        if !s.is_empty() || std::time::Instant::now() > deadline {
                            break s;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                };
                prop_assert_eq!(seen.len(), 1);
                prop_assert_eq!(splice_proxy::cidr::canonical(seen[0].ip()), IpAddr::V4(allowed_ip));
            }
            (Err(ConnectError::Denied(_)), None) if checked.is_empty() => {}
            (Err(ConnectError::Refused(addr, _)), None) => {
                prop_assert!(!checked.is_empty());
                prop_assert_eq!(splice_proxy::cidr::canonical(addr.ip()), IpAddr::V4(CLOSED.parse().unwrap()));
            }
            (other, want) => prop_assert!(false, "answer {:?}: got {:?}, want a connection to {:?}", first, other.map(|(_, a)| a), want),
        }
    }
}

/// Answers that are all forbidden, in every form, are refused as 403
/// without a connection attempt; a literal is never looked up.
#[test]
fn forbidden_answers_are_403_and_literals_are_not_resolved() {
    let peers = peers();
    let forbidden: Ipv4Addr = FORBIDDEN.parse().unwrap();
    let resolver = Arc::new(Rebinding {
        answers: vec![vec![IpAddr::V4(forbidden), mapped(forbidden)]],
        calls: AtomicUsize::new(0),
    });
    let connector = Connector {
        resolver: resolver.clone(),
        timeout: Duration::from_secs(5),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let p = policy(&[format!("{ALLOWED}/32")], "1-65535");
    let t = parse_authority(&format!("rebind.test:{}", peers.port)).unwrap();
    let e = rt.block_on(connector.connect(&t, &p, None)).unwrap_err();
    assert!(matches!(e, ConnectError::Denied(_)), "{e}");
    assert_eq!(Refusal::Connect(e).status().code(), 403);
    // The same with the default policy, for the real loopback address.
    let default = policy(&[], "1-65535");
    let e = rt
        .block_on(connector.connect(&t, &default, None))
        .unwrap_err();
    let r = Refusal::Connect(e);
    assert_eq!(r.status().code(), 403, "{r}");
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 2);
    // Literals: no lookup, and the same decision.
    for lit in [
        format!("{FORBIDDEN}:{}", peers.port),
        format!("[::ffff:{FORBIDDEN}]:{}", peers.port),
    ] {
        let t = parse_authority(&lit).unwrap();
        let e = rt.block_on(connector.connect(&t, &p, None)).unwrap_err();
        let r = Refusal::Connect(e);
        assert_eq!(r.status().code(), 403, "{lit}: {r}");
    }
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 2);
    assert!(accepted(&peers.forbidden).is_empty());
}
