//! Chaining to a parent proxy (`--parent-proxy`): which destinations go through it
//! ([`Parent::routes`]), and the CONNECT this proxy sends it ([`Parent::open`]): one write with
//! `Host` and, when it has credentials, Basic `Proxy-Authorization`; the parent's answer read
//! with httparse; only a 2xx opens the tunnel, and the bytes the parent sent after its head are
//! handed back so they reach the client first. Names are not resolved here: the parent does it.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::policy::DstPattern;
use crate::proxy_url::ProxyUrl;
use crate::request::Target;
use crate::upstream::{ConnectError, Connector};

/// Largest reply head read from the parent.
pub const MAX_REPLY_HEAD: usize = 16 * 1024;

/// Most bytes the parent may send after its 2xx before the tunnel starts (a server that speaks
/// first sends a banner, not megabytes).
pub const EARLY_BUDGET: usize = 4 * 1024 * 1024;

/// The parent proxy and the destinations connected directly instead.
pub struct Parent {
    /// Host, port, and the credentials the URL holds, if any.
    url: ProxyUrl,
    /// `--parent-proxy-bypass`.
    bypass: Vec<DstPattern>,
}

/// A tunnel the parent opened.
#[derive(Debug)]
pub struct Opened {
    pub stream: TcpStream,
    /// The parent's address connected to.
    pub addr: SocketAddr,
    /// Bytes that came after the parent's 2xx head: the destination's, for the client, first.
    pub early: Vec<u8>,
}

/// Why the parent did not open the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    #[error("{0}")]
    Connect(ConnectError),
    #[error("answered {code} {reason}")]
    Status { code: u16, reason: String },
    #[error("answered with something that is not an HTTP response ({0})")]
    Garbage(String),
    #[error("closed the connection before answering")]
    Closed,
    #[error("no answer within --connect-timeout")]
    Timeout,
    #[error("sent more than {EARLY_BUDGET} bytes after its 2xx before the tunnel started")]
    TooEarly,
}

/// A failure and the parent it happened at (`host:port`, never credentials).
#[derive(Debug, thiserror::Error)]
#[error("parent {parent}: {error}")]
pub struct ParentFailure {
    pub parent: String,
    pub error: ParentError,
}

impl ParentFailure {
    /// The metrics label: `unreachable` (DNS, refused), `timeout` (connecting or waiting for the
    /// answer), `refused` (a non-2xx answer), `protocol` (no valid answer).
    pub fn kind(&self) -> &'static str {
        match &self.error {
            ParentError::Connect(e) if e.kind() == "timeout" => "timeout",
            ParentError::Connect(_) => "unreachable",
            ParentError::Timeout => "timeout",
            ParentError::Status { .. } => "refused",
            ParentError::Garbage(_) | ParentError::Closed | ParentError::TooEarly => "protocol",
        }
    }
}

/// Labels of `splice_proxy_parent_connects_total`'s `result`.
pub const RESULTS: [&str; 5] = ["ok", "refused", "unreachable", "timeout", "protocol"];

/// The status line of a complete reply head, and its length.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    code: u16,
    reason: String,
    head_len: usize,
}

/// Parses what the parent sent so far: `None` while the head is incomplete.
fn parse_reply(buf: &[u8]) -> Result<Option<Reply>, ParentError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let code = resp.code.expect("complete");
            // The reason is the parent's text: printable, and short.
            let reason: String = resp
                .reason
                .unwrap_or("")
                .chars()
                .filter(|c| (' '..='~').contains(c))
                .take(80)
                .collect();
            Ok(Some(Reply {
                code,
                reason,
                head_len,
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REPLY_HEAD => Err(ParentError::Garbage(
            format!("no complete head in {MAX_REPLY_HEAD} bytes"),
        )),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(ParentError::Garbage(e.to_string())),
    }
}

/// The CONNECT head for `target`, written in one piece.
fn connect_head(target: &Target, creds: Option<(&str, &str)>) -> Vec<u8> {
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, pass)) = creds {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        head.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

impl Parent {
    pub fn new(url: ProxyUrl, bypass: Vec<DstPattern>) -> Parent {
        Parent { url, bypass }
    }

    /// `host:port`: what logs, metrics and refusals name; never a credential.
    pub fn authority(&self) -> String {
        self.url.authority()
    }

    /// The user and password the URL holds (`--parent-proxy http://user:pass@...`).
    pub fn url_credentials(&self) -> Option<(&str, &str)> {
        let user = self.url.user.as_deref()?;
        Some((user, self.url.password.as_deref().unwrap_or("")))
    }

    /// Whether `target` goes through the parent: every destination but those a
    /// `--parent-proxy-bypass` pattern matches, judged on the name as the client wrote it (an
    /// address pattern matches address literals only: names are not resolved to decide).
    pub fn routes(&self, target: &Target) -> bool {
        !self.bypass.iter().any(|p| p.matches(target))
    }

    /// Connects to the parent and asks it for a tunnel to `target`, all within the connector's
    /// timeout. On a 2xx the stream is returned with every byte the parent sent after its head,
    /// read until its receive queue was seen empty, so no partly read skb is left for the
    /// sockmap path, whose `tcp_read_skb` hands over whole skbs (docs/kernel-notes.md, defect
    /// 1, found on the client's side). On 6.18 a partly read skb on this side was measured
    /// forwarded from where the read stopped; reading to empty costs nothing and does not
    /// depend on that.
    pub async fn open(
        &self,
        connector: &Connector,
        target: &Target,
        creds: Option<(&str, &str)>,
    ) -> Result<Opened, ParentFailure> {
        let fail = |error| ParentFailure {
            parent: self.authority(),
            error,
        };
        let deadline = Instant::now() + connector.timeout;
        let (mut stream, addr) = connector
            .connect_next_hop(&self.url.host, self.url.port, deadline)
            .await
            .map_err(|e| fail(ParentError::Connect(e)))?;
        let _ = stream.set_nodelay(true);
        let exchange = async {
            stream
                .write_all(&connect_head(target, creds))
                .await
                .map_err(|_| ParentError::Closed)?;
            let mut buf = Vec::with_capacity(4096);
            let reply = loop {
                if buf.len() == buf.capacity() {
                    buf.reserve(4096);
                }
                if stream.read_buf(&mut buf).await.map_err(io_error)? == 0 {
                    return Err(ParentError::Closed);
                }
                if let Some(reply) = parse_reply(&buf)? {
                    break reply;
                }
            };
            if !(200..300).contains(&reply.code) {
                return Err(ParentError::Status {
                    code: reply.code,
                    reason: reply.reason,
                });
            }
            buf.drain(..reply.head_len);
            drain_queue(&stream, &mut buf)?;
            Ok(buf)
        };
        match tokio::time::timeout_at(deadline.into(), exchange).await {
            Err(_) => Err(fail(ParentError::Timeout)),
            Ok(Err(e)) => Err(fail(e)),
            Ok(Ok(early)) => Ok(Opened {
                stream,
                addr,
                early,
            }),
        }
    }
}

/// A reset or other read error while waiting for the answer: no answer.
fn io_error(_: io::Error) -> ParentError {
    ParentError::Closed
}

/// Reads what is queued on `stream` into `buf` until a read finds the queue empty.
fn drain_queue(stream: &TcpStream, buf: &mut Vec<u8>) -> Result<(), ParentError> {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match stream.try_read(&mut chunk) {
            // The parent's FIN: the data path sees it too.
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(io_error(e)),
        }
        if buf.len() > EARLY_BUDGET {
            return Err(ParentError::TooEarly);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_authority;
    use crate::upstream::SystemResolver;
    use std::sync::Arc;
    use std::time::Duration;

    fn target(s: &str) -> Target {
        parse_authority(s).unwrap()
    }

    fn parent(url: &str, bypass: &[&str]) -> Parent {
        Parent::new(
            ProxyUrl::parse(url).unwrap(),
            bypass
                .iter()
                .map(|p| DstPattern::parse(p).unwrap())
                .collect(),
        )
    }

    #[test]
    fn the_head_is_connect_host_and_basic_in_one_piece() {
        let head = connect_head(&target("route.example:443"), Some(("mig", "s3cr:et")));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "CONNECT route.example:443 HTTP/1.1\r\nHost: route.example:443\r\n\
             Proxy-Authorization: Basic bWlnOnMzY3I6ZXQ=\r\n\r\n"
        );
        let head = connect_head(&target("[fd00::5]:31234"), None);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "CONNECT [fd00::5]:31234 HTTP/1.1\r\nHost: [fd00::5]:31234\r\n\r\n"
        );
    }

    #[test]
    fn replies_parse_to_a_status_and_the_bytes_after_the_head() {
        let r = parse_reply(b"HTTP/1.1 200 Connection established\r\n\r\nSSH-2.0-x\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.code, r.reason.as_str(), r.head_len),
            (200, "Connection established", 39)
        );
        let r = parse_reply(
            b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.code, 407);
        // Incomplete: wait for more.
        assert_eq!(parse_reply(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert_eq!(parse_reply(b"").unwrap(), None);
        // Not HTTP.
        assert!(matches!(
            parse_reply(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(ParentError::Garbage(_))
        ));
        // A head that never ends.
        let endless = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_REPLY_HEAD));
        assert!(matches!(
            parse_reply(endless.as_bytes()),
            Err(ParentError::Garbage(_))
        ));
        // A control byte in the reason: not HTTP either; a tab is kept out of the reason.
        assert!(matches!(
            parse_reply(b"HTTP/1.1 403 No\x7f way\r\n\r\n"),
            Err(ParentError::Garbage(_))
        ));
        let r = parse_reply(b"HTTP/1.1 403 No\tway\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.reason, "Noway");
    }

    #[test]
    fn bypass_patterns_match_the_name_as_written() {
        let p = parent(
            "http://u:p@proxy.corp:3128",
            &["*.svc.cluster.local", "registry.local", "10.0.0.0/8"],
        );
        assert!(!p.routes(&target("api.ns.svc.cluster.local:443")));
        assert!(!p.routes(&target("REGISTRY.local:5000")));
        assert!(!p.routes(&target("10.1.2.3:443")));
        assert!(p.routes(&target("svc.cluster.local:443")));
        assert!(p.routes(&target("route.example.com:443")));
        assert!(p.routes(&target("192.0.2.1:443")));
        // No bypass: everything goes through the parent.
        let all = parent("http://proxy.corp:3128", &[]);
        assert!(all.routes(&target("10.1.2.3:443")));
        assert_eq!(all.url_credentials(), None);
        assert_eq!(p.url_credentials(), Some(("u", "p")));
        assert_eq!(p.authority(), "proxy.corp:3128");
    }

    /// A parent on loopback that reads one head, hands it to the test, and answers `answer`.
    async fn fake_parent(
        answer: &'static [u8],
    ) -> (String, tokio::task::JoinHandle<(String, TcpStream)>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://mig:s3cr%3Aet@{}", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap() == 0 {
                    break;
                }
                head.push(b[0]);
            }
            if !answer.is_empty() {
                s.write_all(answer).await.unwrap();
            }
            (String::from_utf8(head).unwrap(), s)
        });
        (url, task)
    }

    /// What asking the parent at `url` for `a.example:443` fails with, within `timeout`.
    async fn refusal(url: &str, timeout: Duration) -> ParentFailure {
        parent(url, &[])
            .open(&connector(timeout), &target("a.example:443"), None)
            .await
            .unwrap_err()
    }

    fn connector(timeout: Duration) -> Connector {
        Connector {
            resolver: Arc::new(SystemResolver),
            timeout,
        }
    }

    #[tokio::test]
    async fn a_2xx_opens_the_tunnel_and_keeps_the_bytes_after_it() {
        let (url, task) = fake_parent(b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0-banner\r\n").await;
        let p = parent(&url, &[]);
        let creds = p.url_credentials();
        let opened = p
            .open(
                &connector(Duration::from_secs(5)),
                &target("db.example:22"),
                creds,
            )
            .await
            .unwrap();
        let (head, _s) = task.await.unwrap();
        assert_eq!(
            head,
            "CONNECT db.example:22 HTTP/1.1\r\nHost: db.example:22\r\n\
             Proxy-Authorization: Basic bWlnOnMzY3I6ZXQ=\r\n\r\n"
        );
        assert_eq!(opened.early, b"SSH-2.0-banner\r\n");
    }

    #[tokio::test]
    async fn refusals_name_the_parent_and_its_status() {
        for (answer, kind, text) in [
            (
                &b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"[..],
                "refused",
                "answered 407 Proxy Authentication Required",
            ),
            (
                &b"HTTP/1.1 403 Forbidden\r\n\r\n"[..],
                "refused",
                "answered 403 Forbidden",
            ),
            (&b"garbage\r\n\r\n"[..], "protocol", "not an HTTP response"),
        ] {
            let (url, task) = fake_parent(answer).await;
            let e = refusal(&url, Duration::from_secs(5)).await;
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(text), "{e}");
            assert_eq!(e.parent, parent(&url, &[]).authority());
            assert!(!e.to_string().contains("s3cr"), "{e}");
            drop(task.await);
        }
    }

    #[tokio::test]
    async fn a_parent_that_closes_or_stays_silent() {
        // Closes after the head, without a word.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let closer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).await;
        });
        let e = refusal(&url, Duration::from_secs(5)).await;
        assert!(matches!(e.error, ParentError::Closed), "{e}");
        closer.await.unwrap();

        // Accepts and never answers: the connect timeout.
        let (url, _task) = fake_parent(b"").await;
        let started = Instant::now();
        let e = refusal(&url, Duration::from_millis(300)).await;
        assert!(matches!(e.error, ParentError::Timeout), "{e}");
        assert_eq!(e.kind(), "timeout");
        assert!(started.elapsed() < Duration::from_secs(2));

        // Nobody listens.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let e = refusal(&url, Duration::from_secs(5)).await;
        assert_eq!(e.kind(), "unreachable", "{e}");
    }
}
