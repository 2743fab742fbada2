//! Resolve and connect to the destination; every failure is a typed
//! [`ConnectError`] (`refusal.rs` says what the client gets for each).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::policy::{Denied, Policy};
use crate::request::{Host, Target};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Turns a host name into addresses. Injectable so tests need no outside DNS.
pub trait Resolver: Send + Sync {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (getaddrinfo on a blocking thread).
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((name, port)).await?.collect()) })
    }
}

/// Why connecting upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("DNS lookup of {0} failed: {1}")]
    Dns(String, io::Error),
    /// The lookup was still running at the connect deadline.
    #[error("DNS lookup of {0} timed out")]
    DnsTimeout(String),
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error("connecting to {0}: {1}")]
    Refused(SocketAddr, io::Error),
    #[error("connecting to {0} timed out")]
    Timeout(String),
}

impl ConnectError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Dns(..) => "dns",
            ConnectError::Denied(_) => "denied",
            ConnectError::Refused(..) => "refused",
            ConnectError::DnsTimeout(_) | ConnectError::Timeout(_) => "timeout",
        }
    }
}

pub struct Connector {
    pub resolver: Arc<dyn Resolver>,
    pub timeout: Duration,
}

impl Connector {
    /// Resolves `target`, keeps the addresses the policy (and `user`'s own destinations, when
    /// given) allow, and races connection attempts
    /// to them ([`race`], families interleaved) until one answers, all within the connect
    /// timeout.
    pub async fn connect(
        &self,
        target: &Target,
        policy: &Policy,
        user: Option<&Policy>,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let deadline = Instant::now() + self.timeout;
        let timeout = || ConnectError::Timeout(target.to_string());
        let addrs = self.addresses(target, deadline).await?;
        // Every address is checked before any SYN is sent: by the global policy, then by the
        // user's own destinations (--user-dst), if it has any.
        let mut addrs = policy.filter_addrs(target, addrs)?;
        if let Some(user) = user {
            addrs = user
                .filter_addrs(target, addrs)
                .map_err(|d| Denied::ForUser(Box::new(d)))?;
        }
        let addrs = interleave(addrs);
        tokio::time::timeout_at(deadline.into(), race(addrs, ATTEMPT_DELAY))
            .await
            .unwrap_or_else(|_| Err(timeout()))
    }

    /// Connects to the next hop the operator configured (`--parent-proxy`), by `deadline`:
    /// its name is resolved here, no destination policy applies, attempts race as for a
    /// destination.
    pub async fn connect_next_hop(
        &self,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let host = match host.parse() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host.to_ascii_lowercase()),
        };
        let target = Target { host, port };
        let addrs = interleave(self.addresses(&target, deadline).await?);
        tokio::time::timeout_at(deadline.into(), race(addrs, ATTEMPT_DELAY))
            .await
            .unwrap_or_else(|_| Err(ConnectError::Timeout(target.to_string())))
    }

    /// The addresses of `target`: its literal, or what the resolver answers by `deadline`.
    async fn addresses(
        &self,
        target: &Target,
        deadline: Instant,
    ) -> Result<Vec<SocketAddr>, ConnectError> {
        match &target.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, target.port)]),
            Host::Name(name) => {
                let lookup = self.resolver.resolve(name, target.port);
                match tokio::time::timeout_at(deadline.into(), lookup).await {
                    Err(_) => Err(ConnectError::DnsTimeout(name.clone())),
                    Ok(Err(e)) => Err(ConnectError::Dns(name.clone(), e)),
                    Ok(Ok(a)) if a.is_empty() => Err(ConnectError::Dns(
                        name.clone(),
                        io::Error::new(io::ErrorKind::NotFound, "no addresses"),
                    )),
                    Ok(Ok(a)) => Ok(a),
                }
            }
        }
    }
}

/// RFC 8305's connection attempt delay: the next address is tried this long after the previous
/// attempt started, or at once when an attempt fails, so one black-holed address does not cost
/// the whole connect timeout.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Orders addresses as RFC 8305 section 4 does: the two families alternate, starting with the
/// family of the resolver's first answer, each family in the resolver's order.
pub fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return addrs;
    };
    let first_v4 = first.is_ipv4();
    let (mut preferred, mut other): (Vec<_>, Vec<_>) =
        addrs.into_iter().partition(|a| a.is_ipv4() == first_v4);
    let mut out = Vec::with_capacity(preferred.len() + other.len());
    let (mut p, mut o) = (preferred.drain(..), other.drain(..));
    loop {
        match (p.next(), o.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Connects to the first of `addrs` that answers ("happy eyeballs"): attempts start `delay`
/// apart, or at once after a failure, and run side by side; the first connection wins and the
/// other attempts are dropped, closing their sockets. The caller bounds the whole race.
async fn race(
    addrs: Vec<SocketAddr>,
    delay: Duration,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let mut queue = addrs.into_iter();
    let first = queue.next().expect("the policy keeps at least one address");
    if queue.as_slice().is_empty() {
        // One address, the common case (an IP literal): no race, no task.
        return TcpStream::connect(first)
            .await
            .map(|s| (s, first))
            .map_err(|e| ConnectError::Refused(first, e));
    }
    let mut attempts = tokio::task::JoinSet::new();
    let start = |attempts: &mut tokio::task::JoinSet<_>, addr: SocketAddr| {
        attempts.spawn(async move { (addr, TcpStream::connect(addr).await) });
        tokio::time::Instant::now() + delay
    };
    let mut next_at = start(&mut attempts, first);
    let mut last = None;
    loop {
        tokio::select! {
            done = attempts.join_next() => match done {
                Some(Ok((addr, Ok(stream)))) => return Ok((stream, addr)),
                Some(Ok((addr, Err(e)))) => {
                    last = Some(ConnectError::Refused(addr, e));
                    if let Some(addr) = queue.next() {
                        next_at = start(&mut attempts, addr);
                    }
                }
                Some(Err(join)) => last = Some(ConnectError::Refused(first, io::Error::other(join))),
                None => return Err(last.expect("an attempt failed")),
            },
            () = tokio::time::sleep_until(next_at), if !queue.as_slice().is_empty() => {
                let addr = queue.next().expect("checked");
                next_at = start(&mut attempts, addr);
            }
        }
    }
}

#[cfg(test)]
pub mod testing {
    use super::*;
    use std::collections::HashMap;

    /// A resolver with a fixed table; unknown names fail like NXDOMAIN.
    pub struct StaticResolver(pub HashMap<String, Vec<std::net::IpAddr>>);

    impl Resolver for StaticResolver {
        fn resolve<'a>(
            &'a self,
            name: &'a str,
            port: u16,
        ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
            let r = match self.0.get(name) {
                Some(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
                None => Err(io::Error::new(io::ErrorKind::NotFound, "name not found")),
            };
            Box::pin(async move { r })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::StaticResolver;
    use super::*;
    use crate::policy::{DstPattern, PortSet};
    use crate::refusal::{Refusal, Status};
    use crate::request::parse_authority;

    fn connector(table: &[(&str, &str)]) -> Connector {
        let map = table
            .iter()
            .map(|(n, ip)| (n.to_string(), vec![ip.parse().unwrap()]))
            .collect();
        Connector {
            resolver: Arc::new(StaticResolver(map)),
            timeout: Duration::from_secs(2),
        }
    }

    /// A connector whose resolver answers `name` with `ips`, in that order.
    fn resolving(name: &str, ips: &[&str], timeout: Duration) -> Connector {
        let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        Connector {
            resolver: Arc::new(StaticResolver([(name.to_string(), ips)].into())),
            timeout,
        }
    }

    fn loopback_policy() -> Policy {
        Policy::new(
            vec![DstPattern::parse("127.0.0.0/8").unwrap()],
            PortSet::parse("1-65535").unwrap(),
        )
    }

    #[tokio::test]
    async fn dns_failure_is_502() {
        let c = connector(&[]);
        let e = c
            .connect(
                &parse_authority("no.such.host:443").unwrap(),
                &loopback_policy(),
                None,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "dns");
        assert_eq!(Refusal::Connect(e).status(), Status::BadGateway);
    }

    #[tokio::test]
    async fn refused_is_502_and_success_connects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let c = connector(&[("svc.test", "127.0.0.1")]);
        let t = parse_authority(&format!("svc.test:{port}")).unwrap();
        let (_, addr) = c.connect(&t, &loopback_policy(), None).await.unwrap();
        assert_eq!(addr.port(), port);
        drop(listener);
        let e = c.connect(&t, &loopback_policy(), None).await.unwrap_err();
        assert_eq!(e.kind(), "refused");
        assert_eq!(Refusal::Connect(e).status(), Status::BadGateway);
    }

    #[tokio::test]
    async fn name_resolving_to_loopback_is_403_by_default() {
        let c = connector(&[("rebind.test", "127.0.0.1")]);
        let policy = Policy::new(vec![], PortSet::single(443));
        let e = c
            .connect(&parse_authority("rebind.test:443").unwrap(), &policy, None)
            .await
            .unwrap_err();
        assert_eq!(Refusal::Connect(e).status(), Status::Forbidden);
    }

    /// A resolver that never answers.
    struct Silent;

    impl Resolver for Silent {
        fn resolve<'a>(&'a self, _: &'a str, _: u16) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn a_lookup_past_the_deadline_is_a_dns_timeout_not_a_connect_timeout() {
        let c = Connector {
            resolver: Arc::new(Silent),
            timeout: Duration::from_millis(50),
        };
        let e = c
            .connect(
                &parse_authority("slow.dns:443").unwrap(),
                &loopback_policy(),
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::DnsTimeout(_)), "{e}");
        assert_eq!(e.kind(), "timeout");
        let r = Refusal::Connect(e);
        assert_eq!(r.status(), Status::GatewayTimeout);
        assert_eq!(r.error_type().token(), "dns_timeout");
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_alternate_from_the_resolvers_first_answer() {
        let v6 = |n: u8| sa(&format!("[2001:db8::{n}]:443"));
        let v4 = |n: u8| sa(&format!("192.0.2.{n}:443"));
        assert_eq!(
            interleave(vec![v6(1), v6(2), v6(3), v4(1), v4(2)]),
            vec![v6(1), v4(1), v6(2), v4(2), v6(3)]
        );
        assert_eq!(
            interleave(vec![v4(1), v4(2), v6(1)]),
            vec![v4(1), v6(1), v4(2)]
        );
        assert_eq!(interleave(vec![v4(1), v4(2)]), vec![v4(1), v4(2)]);
        assert_eq!(interleave(vec![]), vec![]);
    }

    /// A listener on `ip:port` whose accept queue is full: the kernel drops further SYNs, so a
    /// connect to it hangs like one to a black-holed address.
    fn black_hole(ip: &str, port: u16) -> (socket2::Socket, Vec<std::net::TcpStream>) {
        let addr = sa(&format!("{ip}:{port}"));
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(&addr.into()).unwrap();
        l.listen(0).unwrap();
        let fillers = (0..2)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
            })
            .collect();
        (l, fillers)
    }

    #[tokio::test]
    async fn a_black_holed_first_address_costs_the_attempt_delay_not_the_timeout() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = live.local_addr().unwrap().port();
        let _hole = black_hole("127.0.0.2", port);
        let c = resolving(
            "he.test",
            &["127.0.0.2", "127.0.0.1"],
            Duration::from_secs(3),
        );
        let t = parse_authority(&format!("he.test:{port}")).unwrap();
        let started = Instant::now();
        let (_stream, addr) = c.connect(&t, &loopback_policy(), None).await.unwrap();
        let took = started.elapsed();
        assert_eq!(addr, sa(&format!("127.0.0.1:{port}")));
        assert!(
            took >= ATTEMPT_DELAY && took < Duration::from_secs(1),
            "connected after {took:?}: the second attempt starts {ATTEMPT_DELAY:?} after the first"
        );
    }

    #[tokio::test]
    async fn a_refused_address_starts_the_next_attempt_at_once_and_the_last_error_is_kept() {
        // Two ports nobody listens on, then a live one: the two refusals come back at once.
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = live.local_addr().unwrap().port();
        let started = Instant::now();
        let addrs = vec![
            sa(&format!("127.0.0.3:{port}")),
            sa(&format!("127.0.0.4:{port}")),
            sa(&format!("127.0.0.1:{port}")),
        ];
        let (_s, addr) = race(addrs, Duration::from_secs(5)).await.unwrap();
        assert_eq!(addr.ip().to_string(), "127.0.0.1");
        assert!(started.elapsed() < Duration::from_secs(1));

        let dead = vec![
            sa(&format!("127.0.0.3:{port}")),
            sa(&format!("127.0.0.4:{port}")),
        ];
        let e = race(dead, Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(&e, ConnectError::Refused(a, _) if a.ip().to_string() == "127.0.0.4"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn every_address_black_holed_is_a_connect_timeout() {
        let probe = std::net::TcpListener::bind("127.0.0.5:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let _a = black_hole("127.0.0.5", port);
        let _b = black_hole("127.0.0.6", port);
        let c = resolving(
            "dark.test",
            &["127.0.0.5", "127.0.0.6"],
            Duration::from_millis(600),
        );
        let t = parse_authority(&format!("dark.test:{port}")).unwrap();
        let e = c.connect(&t, &loopback_policy(), None).await.unwrap_err();
        assert!(matches!(e, ConnectError::Timeout(_)), "{e}");
        assert_eq!(Refusal::Connect(e).status(), Status::GatewayTimeout);
    }
}
