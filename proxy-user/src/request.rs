//! Reading and parsing the request head, and the responses we write.
//!
//! The head is read with a size cap and parsed with httparse. Bytes that
//! arrived after the head in the same read are returned so the tunnel can
//! forward them first.

use std::fmt;
use std::net::IpAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request head we accept (then 431).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines we parse (then 431).
const MAX_HEADERS: usize = 100;

/// Where a CONNECT wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An address literal (`1.2.3.4`, `[::1]`).
    Ip(IpAddr),
    /// A host name, lower case, without a trailing dot.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => write!(f, "{n}"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A parsed CONNECT request: what the rest of the proxy needs from the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub target: Target,
    /// The raw `Proxy-Authorization` value, if present once.
    pub proxy_authorization: Option<Vec<u8>>,
}

/// Why a request head was not accepted, each mapped to a status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("method {0} not supported")]
    Method(String),
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("client closed the connection before the head was complete")]
    Closed,
    #[error("reading the request head: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads until a complete head is buffered; returns the request and the bytes
/// that followed the head.
pub async fn read_request<R: AsyncRead + Unpin>(
    conn: &mut R,
) -> Result<(Request, Vec<u8>), RequestError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD {
            return Err(RequestError::TooLarge);
        }
        // Never read more than the cap allows, so a flood is cut off at 64 KiB.
        let want = (MAX_HEAD - buf.len()).min(16 * 1024);
        let start = buf.len();
        buf.resize(start + want, 0);
        let n = conn.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(RequestError::Closed);
        }
        if let Some((req, head_len)) = parse_head(&buf)? {
            let rest = buf.split_off(head_len);
            return Ok((req, rest));
        }
    }
}

/// Parses a buffered head; `Ok(None)` when more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooLarge),
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    let method = req.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(RequestError::Method(method.chars().take(32).collect()));
    }
    let target = parse_authority(req.path.unwrap_or_default())
        .map_err(|e| RequestError::Malformed(e.to_string()))?;
    let mut auth = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("proxy-authorization"));
    let proxy_authorization = auth.next().map(|h| h.value.to_vec());
    if auth.next().is_some() {
        return Err(RequestError::Malformed(
            "more than one Proxy-Authorization header".into(),
        ));
    }
    Ok(Some((
        Request {
            target,
            proxy_authorization,
        },
        head_len,
    )))
}

/// Why an authority-form target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("target must be host:port")]
    MissingPort,
    #[error("invalid port {0:?}")]
    BadPort(String),
    #[error("IPv6 targets must be bracketed: [addr]:port")]
    UnbracketedV6,
    #[error("invalid host {0:?}")]
    BadHost(String),
}

/// Parses an authority-form request target: `host:port`, `1.2.3.4:port`, `[v6]:port`.
pub fn parse_authority(s: &str) -> Result<Target, AuthorityError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| AuthorityError::BadHost(s.into()))?;
        let port = after.strip_prefix(':').ok_or(AuthorityError::MissingPort)?;
        let ip: std::net::Ipv6Addr = v6.parse().map_err(|_| AuthorityError::BadHost(v6.into()))?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or(AuthorityError::MissingPort)?;
        if host.contains(':') {
            return Err(AuthorityError::UnbracketedV6);
        }
        let host = if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
            Host::Ip(IpAddr::V4(ip))
        } else if is_valid_hostname(host) {
            Host::Name(crate::policy::normalize_name(host))
        } else {
            return Err(AuthorityError::BadHost(host.chars().take(64).collect()));
        };
        (host, port)
    };
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthorityError::BadPort(port.chars().take(16).collect()));
    }
    let port: u16 = match port.parse() {
        Ok(0) | Err(_) => return Err(AuthorityError::BadPort(port.into())),
        Ok(p) => p,
    };
    Ok(Target { host, port })
}

/// Letters, digits, '-', '_' in dot-separated labels of 1-63 bytes, 253 in all;
/// one trailing dot allowed. No percent-encoding, no Unicode (use punycode).
pub fn is_valid_hostname(host: &str) -> bool {
    let h = host.strip_suffix('.').unwrap_or(host);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Statuses the proxy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Established,
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    ProxyAuthRequired,
    RequestTimeout,
    HeadTooLarge,
    BadGateway,
    Unavailable,
    GatewayTimeout,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Established => 200,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::MethodNotAllowed => 405,
            Status::ProxyAuthRequired => 407,
            Status::RequestTimeout => 408,
            Status::HeadTooLarge => 431,
            Status::BadGateway => 502,
            Status::Unavailable => 503,
            Status::GatewayTimeout => 504,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Established => "Connection established",
            Status::BadRequest => "Bad Request",
            Status::Forbidden => "Forbidden",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::ProxyAuthRequired => "Proxy Authentication Required",
            Status::RequestTimeout => "Request Timeout",
            Status::HeadTooLarge => "Request Header Fields Too Large",
            Status::BadGateway => "Bad Gateway",
            Status::Unavailable => "Service Unavailable",
            Status::GatewayTimeout => "Gateway Timeout",
        }
    }

    /// The bytes written on the wire for this status.
    pub fn response(self) -> Vec<u8> {
        if self == Status::Established {
            return b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
        }
        let body = format!("{} {}\n", self.code(), self.reason());
        let extra = match self {
            Status::MethodNotAllowed => "Allow: CONNECT\r\n",
            Status::ProxyAuthRequired => "Proxy-Authenticate: Basic realm=\"splice-proxy\"\r\n",
            _ => "",
        };
        format!(
            "HTTP/1.1 {} {}\r\n{extra}Connection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            self.code(),
            self.reason(),
            body.len()
        )
        .into_bytes()
    }
}

impl From<&RequestError> for Status {
    fn from(e: &RequestError) -> Status {
        match e {
            RequestError::Malformed(_) => Status::BadRequest,
            RequestError::Method(_) => Status::MethodNotAllowed,
            RequestError::TooLarge => Status::HeadTooLarge,
            RequestError::Closed | RequestError::Io(_) => Status::BadRequest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<(Request, usize)>, RequestError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn stunnel_request() {
        let head = "CONNECT route.example:443 HTTP/1.1\r\nHost: route.example:443\r\nProxy-Authorization: basic dTpwOnc=\r\n\r\n";
        let (req, n) = parse(head).unwrap().unwrap();
        assert_eq!(n, head.len());
        assert_eq!(req.target.to_string(), "route.example:443");
        assert_eq!(
            req.proxy_authorization.as_deref(),
            Some(&b"basic dTpwOnc="[..])
        );
    }

    #[test]
    fn partial_heads_need_more() {
        let head = "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        for cut in 0..head.len() {
            assert!(parse(&head[..cut]).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn http10_without_host() {
        let (req, _) = parse("CONNECT 10.0.0.1:6443 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.target.port, 6443);
        assert!(req.proxy_authorization.is_none());
    }

    #[test]
    fn other_methods_are_405() {
        assert!(matches!(
            parse("GET http://x/ HTTP/1.1\r\n\r\n"),
            Err(RequestError::Method(m)) if m == "GET"
        ));
    }

    #[test]
    fn garbage_is_400() {
        assert!(matches!(
            parse("\x16\x03\x01garbage\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
        assert!(matches!(
            parse(
                "CONNECT a:443 HTTP/1.1\r\nProxy-Authorization: a\r\nProxy-Authorization: b\r\n\r\n"
            ),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn authorities() {
        assert_eq!(
            parse_authority("[::1]:443").unwrap(),
            Target {
                host: Host::Ip("::1".parse().unwrap()),
                port: 443
            }
        );
        assert_eq!(
            parse_authority("Example.COM.:8443").unwrap().to_string(),
            "example.com:8443"
        );
        assert_eq!(
            parse_authority("example.com"),
            Err(AuthorityError::MissingPort)
        );
        assert_eq!(parse_authority("[::1]"), Err(AuthorityError::MissingPort));
        assert_eq!(
            parse_authority("::1:443"),
            Err(AuthorityError::UnbracketedV6)
        );
        for bad_port in [
            "a:0", "a:65536", "a:+443", "a:", "a:44 3", "a:0x1bb", "a:000443",
        ] {
            assert!(
                matches!(parse_authority(bad_port), Err(AuthorityError::BadPort(_))),
                "{bad_port}"
            );
        }
        for bad_host in [
            ":443",
            "a b:443",
            "ex%41mple.com:443",
            "bücher.de:443",
            "-a.com:443",
            "a..b:443",
            "[zz]:443",
        ] {
            assert!(parse_authority(bad_host).is_err(), "{bad_host}");
        }
        assert!(parse_authority("xn--bcher-kva.de:443").is_ok());
    }

    #[test]
    fn responses() {
        assert_eq!(
            Status::Established.response(),
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        );
        let r = String::from_utf8(Status::ProxyAuthRequired.response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 407 "));
        assert!(r.contains("\r\nProxy-Authenticate: Basic realm=\"splice-proxy\"\r\n"));
        assert!(r.contains("\r\nConnection: close\r\n"));
        let r = String::from_utf8(Status::MethodNotAllowed.response()).unwrap();
        assert!(r.contains("\r\nAllow: CONNECT\r\n"));
    }

    #[tokio::test]
    async fn reads_head_split_into_lines_and_keeps_the_rest() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in ["CONNECT h:443 HTTP/1.1\r\n", "Host: h:443\r\n", "\r\nHELLO"] {
                a.write_all(part.as_bytes()).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        let (req, rest) = read_request(&mut b).await.unwrap();
        writer.await.unwrap();
        assert_eq!(req.target.to_string(), "h:443");
        // The payload may arrive in the same read as the last line or later;
        // whatever was read past the head is returned, never dropped.
        assert!(b"HELLO".starts_with(&rest));
    }

    #[tokio::test]
    async fn oversize_head_is_431() {
        let (mut a, mut b) = tokio::io::duplex(256 * 1024);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut head = b"CONNECT h:443 HTTP/1.1\r\nX: ".to_vec();
            head.resize(MAX_HEAD + 10, b'a');
            let _ = a.write_all(&head).await;
            std::future::pending::<()>().await;
        });
        assert!(matches!(
            read_request(&mut b).await,
            Err(RequestError::TooLarge)
        ));
    }
}
