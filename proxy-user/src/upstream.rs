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
    /// Resolves `target`, keeps the addresses the policy allows, and connects
    /// to them in order until one answers, all within the connect timeout.
    pub async fn connect(
        &self,
        target: &Target,
        policy: &Policy,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let deadline = Instant::now() + self.timeout;
        let timeout = || ConnectError::Timeout(target.to_string());
        let addrs = match &target.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
            Host::Name(name) => {
                let lookup = self.resolver.resolve(name, target.port);
                match tokio::time::timeout_at(deadline.into(), lookup).await {
                    Err(_) => return Err(ConnectError::DnsTimeout(name.clone())),
                    Ok(Err(e)) => return Err(ConnectError::Dns(name.clone(), e)),
                    Ok(Ok(a)) if a.is_empty() => {
                        return Err(ConnectError::Dns(
                            name.clone(),
                            io::Error::new(io::ErrorKind::NotFound, "no addresses"),
                        ));
                    }
                    Ok(Ok(a)) => a,
                }
            }
        };
        let addrs = policy.filter_addrs(target, addrs)?;
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline.into(), TcpStream::connect(addr)).await {
                Err(_) => return Err(timeout()),
                Ok(Ok(stream)) => return Ok((stream, addr)),
                Ok(Err(e)) => last = Some(ConnectError::Refused(addr, e)),
            }
        }
        Err(last.expect("at least one address was tried"))
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
        let (_, addr) = c.connect(&t, &loopback_policy()).await.unwrap();
        assert_eq!(addr.port(), port);
        drop(listener);
        let e = c.connect(&t, &loopback_policy()).await.unwrap_err();
        assert_eq!(e.kind(), "refused");
        assert_eq!(Refusal::Connect(e).status(), Status::BadGateway);
    }

    #[tokio::test]
    async fn name_resolving_to_loopback_is_403_by_default() {
        let c = connector(&[("rebind.test", "127.0.0.1")]);
        let policy = Policy::new(vec![], PortSet::single(443));
        let e = c
            .connect(&parse_authority("rebind.test:443").unwrap(), &policy)
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
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::DnsTimeout(_)), "{e}");
        assert_eq!(e.kind(), "timeout");
        let r = Refusal::Connect(e);
        assert_eq!(r.status(), Status::GatewayTimeout);
        assert_eq!(r.error_type().token(), "dns_timeout");
    }
}
