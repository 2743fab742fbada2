//! Every refusal the proxy answers with, and the one table that gives each
//! its status, its RFC 9209 `Proxy-Status` error type and the details that
//! tell the client what to change; then the bytes written on the wire.
//!
//! The access log renders the same value (`Display`), so what the client
//! reads and what the operator reads come from one place. Neither ever
//! holds a credential: the details of a `407` do not even name the user.

use std::fmt::Write as _;
use std::io;
use std::time::Duration;

use crate::auth::AuthError;
use crate::limits::Limit;
use crate::parent::{ParentError, ParentFailure};
use crate::policy::Denied;
use crate::request::{MAX_HEAD, RequestError};
use crate::tunnel::Mode;
use crate::upstream::ConnectError;

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
    /// The one success response, exactly.
    pub const ESTABLISHED: &'static [u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

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

    pub fn reason(self) -> &'static str {
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
}

/// The RFC 9209 (section 2.3) proxy error types this proxy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    DnsTimeout,
    DnsError,
    DestinationUnavailable,
    DestinationIpProhibited,
    DestinationIpUnroutable,
    ConnectionRefused,
    ConnectionTerminated,
    ConnectionTimeout,
    ConnectionLimitReached,
    HttpRequestError,
    HttpRequestDenied,
    HttpResponseIncomplete,
    HttpResponseTimeout,
    HttpProtocolError,
    ProxyInternalError,
    ProxyConfigurationError,
}

impl ProxyError {
    /// The registered token.
    pub fn token(self) -> &'static str {
        match self {
            ProxyError::DnsTimeout => "dns_timeout",
            ProxyError::DnsError => "dns_error",
            ProxyError::DestinationUnavailable => "destination_unavailable",
            ProxyError::DestinationIpProhibited => "destination_ip_prohibited",
            ProxyError::DestinationIpUnroutable => "destination_ip_unroutable",
            ProxyError::ConnectionRefused => "connection_refused",
            ProxyError::ConnectionTerminated => "connection_terminated",
            ProxyError::ConnectionTimeout => "connection_timeout",
            ProxyError::ConnectionLimitReached => "connection_limit_reached",
            ProxyError::HttpRequestError => "http_request_error",
            ProxyError::HttpRequestDenied => "http_request_denied",
            ProxyError::HttpResponseIncomplete => "http_response_incomplete",
            ProxyError::HttpResponseTimeout => "http_response_timeout",
            ProxyError::HttpProtocolError => "http_protocol_error",
            ProxyError::ProxyInternalError => "proxy_internal_error",
            ProxyError::ProxyConfigurationError => "proxy_configuration_error",
        }
    }
}

/// Why the proxy refused a connection; its `Display` is the access log's
/// `error`.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// At accept, before the head is read.
    #[error("{}", .0.reason())]
    Limit(Limit),
    #[error("header timeout")]
    HeaderTimeout(Duration),
    #[error(transparent)]
    Request(RequestError),
    #[error(transparent)]
    Auth(AuthError),
    #[error(transparent)]
    Denied(Denied),
    #[error("at --max-tunnels")]
    MaxTunnels,
    #[error(transparent)]
    Connect(ConnectError),
    /// The parent proxy (`--parent-proxy`) did not open the tunnel.
    #[error(transparent)]
    Parent(ParentFailure),
    #[error("writing early bytes upstream: {0}")]
    EarlyBytes(io::Error),
    /// The data path could not take the tunnel.
    #[error("handing the tunnel to {mode}: {error}")]
    Handoff { mode: Mode, error: io::Error },
}

impl Refusal {
    /// The one table: status, error type, and what the client should change.
    fn entry(&self) -> (Status, ProxyError, String) {
        use ProxyError as E;
        use Status as S;
        match self {
            Refusal::Limit(Limit::Source) => (
                S::Forbidden,
                E::HttpRequestDenied,
                "client address not in --allow-src; connect from an allowed network".into(),
            ),
            // Limits on clients, not on connections to next hops (which
            // connection_limit_reached is about): refused by configuration.
            Refusal::Limit(limit) => (
                S::Unavailable,
                E::HttpRequestDenied,
                format!("proxy at {}; retry later", limit.flag()),
            ),
            Refusal::HeaderTimeout(d) => (
                S::RequestTimeout,
                E::HttpRequestError,
                format!("send the whole request head within {}s", d.as_secs_f64()),
            ),
            Refusal::Request(e) => request_entry(e),
            // No registered type is about authentication: the request is
            // refused by the proxy's configuration (its users), which is
            // what http_request_denied says; Proxy-Authenticate says how.
            Refusal::Auth(e) => (
                S::ProxyAuthRequired,
                E::HttpRequestDenied,
                match e {
                    AuthError::Missing => {
                        "send Proxy-Authorization: Basic with a user and password of this proxy"
                    }
                    AuthError::Malformed => {
                        "Proxy-Authorization must be Basic base64(user:password)"
                    }
                    // Never the user name: that half of a credential is
                    // not for a response either.
                    AuthError::Wrong(_) => "user or password not accepted; check the credentials",
                }
                .into(),
            ),
            Refusal::Denied(d) => denied_entry(d),
            // Every tunnel holds one connection to a next hop.
            Refusal::MaxTunnels => (
                S::Unavailable,
                E::ConnectionLimitReached,
                "proxy at --max-tunnels; retry later".into(),
            ),
            Refusal::Connect(e) => connect_entry(e),
            Refusal::Parent(f) => parent_entry(f),
            Refusal::EarlyBytes(_) => (
                S::BadGateway,
                E::ConnectionTerminated,
                "destination closed before the first bytes could be forwarded".into(),
            ),
            Refusal::Handoff { .. } => (
                S::Unavailable,
                E::ProxyInternalError,
                "the proxy could not start the tunnel; retry later (the proxy log says why)".into(),
            ),
        }
    }

    pub fn status(&self) -> Status {
        self.entry().0
    }

    pub fn error_type(&self) -> ProxyError {
        self.entry().1
    }

    /// The `Proxy-Status` field value (RFC 9209), `details` a quoted
    /// sf-string; a refusal of the parent proxy adds `next-hop` and its `received-status`.
    pub fn proxy_status(&self) -> String {
        let (_, error, details) = self.entry();
        let mut value = format!(
            "splice-proxy; error={}; details={}",
            error.token(),
            quoted(&details)
        );
        if let Refusal::Parent(f) = self {
            let _ = write!(value, "; next-hop={}", quoted(&f.parent));
            if let ParentError::Status { code, .. } = f.error {
                let _ = write!(value, "; received-status={code}");
            }
        }
        value
    }

    /// The bytes written on the wire: status line, headers, a short body.
    pub fn response(&self) -> Vec<u8> {
        let (status, _, details) = self.entry();
        let details = printable(&details);
        let body = format!("{} {}\n{details}\n", status.code(), status.reason());
        let mut head = format!("HTTP/1.1 {} {}\r\n", status.code(), status.reason());
        match status {
            Status::MethodNotAllowed => head.push_str("Allow: CONNECT\r\n"),
            Status::ProxyAuthRequired => {
                head.push_str("Proxy-Authenticate: Basic realm=\"splice-proxy\"\r\n")
            }
            _ => {}
        }
        let _ = write!(
            head,
            "Proxy-Status: {}\r\n\
             Connection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            self.proxy_status(),
            body.len()
        );
        head.into_bytes()
    }
}

fn request_entry(e: &RequestError) -> (Status, ProxyError, String) {
    let (status, details) = match e {
        // Some reasons already say what to send instead.
        RequestError::Malformed(why) if why.contains("send ") => (Status::BadRequest, why.clone()),
        RequestError::Malformed(why) => (
            Status::BadRequest,
            format!("{why}; send CONNECT host:port HTTP/1.1"),
        ),
        RequestError::Method(m) => (
            Status::MethodNotAllowed,
            format!("method {m} not supported; send CONNECT host:port"),
        ),
        RequestError::TooLarge => (
            Status::HeadTooLarge,
            format!("send a request head under {MAX_HEAD} bytes and 100 header lines"),
        ),
        RequestError::Closed | RequestError::Io(_) => (
            Status::BadRequest,
            "the request head could not be read; send it again".into(),
        ),
    };
    (status, ProxyError::HttpRequestError, details)
}

fn denied_entry(d: &Denied) -> (Status, ProxyError, String) {
    let (error, details) = match d {
        Denied::Port(p) => (
            ProxyError::HttpRequestDenied,
            format!("port {p} not in --allow-port; use an allowed port"),
        ),
        Denied::Name(n) => (
            ProxyError::HttpRequestDenied,
            format!("destination {n} not in --allow-dst; use an allowed destination"),
        ),
        Denied::Address(a) => (
            ProxyError::DestinationIpProhibited,
            format!("address {a} not allowed by --allow-dst; use an allowed destination"),
        ),
        Denied::Addresses(t) => (
            ProxyError::DestinationIpProhibited,
            format!("{t} resolves only to addresses --allow-dst does not allow"),
        ),
        Denied::Unresolved(n) => (
            ProxyError::HttpRequestDenied,
            format!(
                "destination {n} matches no --allow-dst name, and the parent proxy resolves it, so \
                 an address pattern cannot allow it; add the name (or *.suffix) to --allow-dst"
            ),
        ),
        Denied::ForUser(inner) => {
            let what = match inner.as_ref() {
                Denied::Name(n) => format!("destination {n} is"),
                Denied::Address(a) => format!("address {a} is"),
                Denied::Addresses(t) => format!("the addresses of {t} are"),
                Denied::Unresolved(n) => {
                    format!("destination {n} (resolved by the parent proxy, so by name only) is")
                }
                // Users are limited by destination only; ports stay --allow-port's.
                Denied::Port(p) => format!("port {p} is"),
                Denied::ForUser(_) => "this destination is".into(),
            };
            let error = match inner.as_ref() {
                Denied::Name(_) | Denied::Port(_) | Denied::Unresolved(_) | Denied::ForUser(_) => {
                    ProxyError::HttpRequestDenied
                }
                Denied::Address(_) | Denied::Addresses(_) => ProxyError::DestinationIpProhibited,
            };
            (
                error,
                format!(
                    "{what} not among this user's destinations in --user-dst; use the user meant for this route, or add it to the user's line"
                ),
            )
        }
    };
    (Status::Forbidden, error, details)
}

fn connect_entry(e: &ConnectError) -> (Status, ProxyError, String) {
    match e {
        ConnectError::Dns(name, why) => (
            Status::BadGateway,
            ProxyError::DnsError,
            format!("DNS lookup of {name} failed ({why}); check the host name"),
        ),
        ConnectError::DnsTimeout(name) => (
            Status::GatewayTimeout,
            ProxyError::DnsTimeout,
            format!("DNS lookup of {name} took longer than --connect-timeout"),
        ),
        ConnectError::Denied(d) => denied_entry(d),
        ConnectError::Refused(addr, why) => {
            use io::ErrorKind as K;
            let error = match why.kind() {
                K::ConnectionRefused => ProxyError::ConnectionRefused,
                K::HostUnreachable | K::NetworkUnreachable => ProxyError::DestinationIpUnroutable,
                K::ConnectionReset | K::ConnectionAborted => ProxyError::ConnectionTerminated,
                K::TimedOut => ProxyError::ConnectionTimeout,
                _ => ProxyError::DestinationUnavailable,
            };
            (
                Status::BadGateway,
                error,
                format!("connecting to {addr}: {why}; check that the destination listens there"),
            )
        }
        ConnectError::Timeout(target) => (
            Status::GatewayTimeout,
            ProxyError::ConnectionTimeout,
            format!("no answer from {target} within --connect-timeout"),
        ),
    }
}

fn parent_entry(f: &ParentFailure) -> (Status, ProxyError, String) {
    let parent = &f.parent;
    match &f.error {
        ParentError::Connect(e) => {
            let (status, error, _) = connect_entry(e);
            let details = match e {
                ConnectError::Timeout(_) => {
                    format!("no answer from parent {parent} within --connect-timeout")
                }
                _ => format!("parent {parent} not reachable: {e}; check --parent-proxy"),
            };
            (status, error, details)
        }
        ParentError::Status { code: 407, reason } => (
            Status::BadGateway,
            ProxyError::ProxyConfigurationError,
            format!(
                "parent {parent} answered 407 {reason}; check the credentials of --parent-proxy \
                 or --parent-proxy-credentials"
            ),
        ),
        ParentError::Status { code: 403, reason } => (
            Status::BadGateway,
            ProxyError::HttpRequestDenied,
            format!(
                "parent {parent} answered 403 {reason}: the parent refuses this destination; ask \
                 its owners, or connect it directly with --parent-proxy-bypass"
            ),
        ),
        ParentError::Status { code, reason } => (
            Status::BadGateway,
            ProxyError::DestinationUnavailable,
            format!("parent {parent} answered {code} {reason}"),
        ),
        ParentError::Garbage(why) => (
            Status::BadGateway,
            ProxyError::HttpProtocolError,
            format!(
                "parent {parent} answered with something that is not an HTTP response ({why}); \
                 check that --parent-proxy names an HTTP proxy"
            ),
        ),
        ParentError::Closed => (
            Status::BadGateway,
            ProxyError::HttpResponseIncomplete,
            format!("parent {parent} closed the connection before answering the CONNECT"),
        ),
        ParentError::Timeout => (
            Status::GatewayTimeout,
            ProxyError::HttpResponseTimeout,
            format!("no answer from parent {parent} within --connect-timeout"),
        ),
        ParentError::TooEarly => (
            Status::BadGateway,
            ProxyError::HttpProtocolError,
            format!("parent {parent}: {}", f.error),
        ),
    }
}

/// `s` with every byte outside printable ASCII as `?`: what an sf-string
/// (and a header line) may hold.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}

/// `s` as an RFC 8941 sf-string: printable ASCII, `"` and `\` escaped.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in printable(s).chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_head;

    fn text(r: &Refusal) -> String {
        String::from_utf8(r.response()).unwrap()
    }

    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        let head = response.split("\r\n\r\n").next().unwrap();
        head.lines()
            .skip(1)
            .filter_map(|l| l.split_once(": "))
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    fn io_err(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, "test")
    }

    fn parent(error: ParentError) -> Refusal {
        Refusal::Parent(ParentFailure {
            parent: "10.0.0.1:3128".into(),
            error,
        })
    }

    #[test]
    fn a_parent_refusal_names_the_parent_and_its_status_never_credentials() {
        let r = parent(ParentError::Status {
            code: 407,
            reason: "Proxy Authentication Required".into(),
        });
        assert_eq!(r.status(), Status::BadGateway);
        let t = text(&r);
        let ps = header(&t, "Proxy-Status").unwrap();
        assert!(
            ps.starts_with(
                "splice-proxy; error=proxy_configuration_error; details=\"parent 10.0.0.1:3128 answered 407 "
            ),
            "{ps}"
        );
        assert!(
            ps.ends_with("; next-hop=\"10.0.0.1:3128\"; received-status=407"),
            "{ps}"
        );
        let t = text(&parent(ParentError::Timeout));
        assert!(t.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"), "{t}");
        let ps = header(&t, "Proxy-Status").unwrap();
        assert!(ps.ends_with("; next-hop=\"10.0.0.1:3128\""), "{ps}");
        assert!(ps.contains("no answer from parent 10.0.0.1:3128"), "{ps}");
    }

    /// One of every refusal, with the status and error type it must get.
    fn table() -> Vec<(Refusal, u16, &'static str)> {
        let addr = "10.0.0.1:443".parse().unwrap();
        vec![
            (Refusal::Limit(Limit::Source), 403, "http_request_denied"),
            (
                Refusal::Limit(Limit::Handshakes),
                503,
                "http_request_denied",
            ),
            (Refusal::Limit(Limit::PerIp), 503, "http_request_denied"),
            (
                Refusal::HeaderTimeout(Duration::from_secs(10)),
                408,
                "http_request_error",
            ),
            (
                Refusal::Request(RequestError::Malformed("invalid token".into())),
                400,
                "http_request_error",
            ),
            (
                Refusal::Request(RequestError::Method("GET".into())),
                405,
                "http_request_error",
            ),
            (
                Refusal::Request(RequestError::TooLarge),
                431,
                "http_request_error",
            ),
            (
                Refusal::Auth(AuthError::Missing),
                407,
                "http_request_denied",
            ),
            (
                Refusal::Auth(AuthError::Malformed),
                407,
                "http_request_denied",
            ),
            (
                Refusal::Auth(AuthError::Wrong("mig".into())),
                407,
                "http_request_denied",
            ),
            (
                Refusal::Denied(Denied::Port(80)),
                403,
                "http_request_denied",
            ),
            (
                Refusal::Denied(Denied::Name("evil.example".into())),
                403,
                "http_request_denied",
            ),
            (
                Refusal::Denied(Denied::Address("127.0.0.1".into())),
                403,
                "destination_ip_prohibited",
            ),
            (
                Refusal::Connect(ConnectError::Denied(Denied::Addresses(
                    "rebind.test:443".into(),
                ))),
                403,
                "destination_ip_prohibited",
            ),
            (
                Refusal::Denied(Denied::ForUser(Box::new(Denied::Name("b.example".into())))),
                403,
                "http_request_denied",
            ),
            (
                Refusal::Connect(ConnectError::Denied(Denied::ForUser(Box::new(
                    Denied::Addresses("db.internal:443".into()),
                )))),
                403,
                "destination_ip_prohibited",
            ),
            (Refusal::MaxTunnels, 503, "connection_limit_reached"),
            (
                Refusal::Denied(Denied::Unresolved("db.example".into())),
                403,
                "http_request_denied",
            ),
            (
                parent(ParentError::Status {
                    code: 407,
                    reason: "Proxy Authentication Required".into(),
                }),
                502,
                "proxy_configuration_error",
            ),
            (
                parent(ParentError::Status {
                    code: 403,
                    reason: "Forbidden".into(),
                }),
                502,
                "http_request_denied",
            ),
            (
                parent(ParentError::Status {
                    code: 503,
                    reason: "Service Unavailable".into(),
                }),
                502,
                "destination_unavailable",
            ),
            (
                parent(ParentError::Garbage("invalid token".into())),
                502,
                "http_protocol_error",
            ),
            (parent(ParentError::Closed), 502, "http_response_incomplete"),
            (parent(ParentError::Timeout), 504, "http_response_timeout"),
            (parent(ParentError::TooEarly), 502, "http_protocol_error"),
            (
                parent(ParentError::Connect(ConnectError::Refused(
                    addr,
                    io_err(io::ErrorKind::ConnectionRefused),
                ))),
                502,
                "connection_refused",
            ),
            (
                parent(ParentError::Connect(ConnectError::Timeout(
                    "10.0.0.1:3128".into(),
                ))),
                504,
                "connection_timeout",
            ),
            (
                parent(ParentError::Connect(ConnectError::Dns(
                    "proxy.corp".into(),
                    io_err(io::ErrorKind::NotFound),
                ))),
                502,
                "dns_error",
            ),
            (
                Refusal::Connect(ConnectError::Dns(
                    "no.such".into(),
                    io_err(io::ErrorKind::NotFound),
                )),
                502,
                "dns_error",
            ),
            (
                Refusal::Connect(ConnectError::DnsTimeout("slow.dns".into())),
                504,
                "dns_timeout",
            ),
            (
                Refusal::Connect(ConnectError::Refused(
                    addr,
                    io_err(io::ErrorKind::ConnectionRefused),
                )),
                502,
                "connection_refused",
            ),
            (
                Refusal::Connect(ConnectError::Refused(
                    addr,
                    io_err(io::ErrorKind::NetworkUnreachable),
                )),
                502,
                "destination_ip_unroutable",
            ),
            (
                Refusal::Connect(ConnectError::Refused(
                    addr,
                    io_err(io::ErrorKind::HostUnreachable),
                )),
                502,
                "destination_ip_unroutable",
            ),
            (
                Refusal::Connect(ConnectError::Timeout("10.0.0.1:443".into())),
                504,
                "connection_timeout",
            ),
            (
                Refusal::EarlyBytes(io_err(io::ErrorKind::BrokenPipe)),
                502,
                "connection_terminated",
            ),
            (
                Refusal::Handoff {
                    mode: Mode::Sockmap,
                    error: io_err(io::ErrorKind::OutOfMemory),
                },
                503,
                "proxy_internal_error",
            ),
        ]
    }

    #[test]
    fn every_refusal_has_its_status_error_type_and_a_well_formed_response() {
        for (r, code, error) in table() {
            assert_eq!(r.status().code(), code, "{r}");
            assert_eq!(r.error_type().token(), error, "{r}");
            let t = text(&r);
            let reason = r.status().reason();
            assert!(
                t.starts_with(&format!("HTTP/1.1 {code} {reason}\r\n")),
                "{t}"
            );
            let ps = header(&t, "Proxy-Status").unwrap();
            assert_eq!(ps, r.proxy_status());
            assert!(
                ps.starts_with(&format!("splice-proxy; error={error}; details=\"")),
                "{ps}"
            );
            assert_eq!(header(&t, "Connection"), Some("close"), "{t}");
            assert_eq!(header(&t, "Content-Type"), Some("text/plain"), "{t}");
            let body = t.split_once("\r\n\r\n").unwrap().1;
            let len: usize = header(&t, "Content-Length").unwrap().parse().unwrap();
            assert_eq!(len, body.len(), "{t}");
            assert!(body.starts_with(&format!("{code} {reason}\n")), "{body:?}");
            assert!(
                body.lines().nth(1).is_some_and(|d| !d.is_empty()),
                "{body:?}"
            );
        }
    }

    #[test]
    fn statuses_keep_their_extra_headers() {
        let t = text(&Refusal::Auth(AuthError::Missing));
        assert_eq!(
            header(&t, "Proxy-Authenticate"),
            Some("Basic realm=\"splice-proxy\"")
        );
        let t = text(&Refusal::Request(RequestError::Method("GET".into())));
        assert_eq!(header(&t, "Allow"), Some("CONNECT"));
        assert_eq!(
            Status::ESTABLISHED,
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        );
    }

    #[test]
    fn details_are_a_quoted_string_of_printable_ascii() {
        assert_eq!(quoted(r#"a "b" \c"#), r#""a \"b\" \\c""#);
        assert_eq!(
            quoted("line\r\nInjected: yes\u{e9}"),
            "\"line??Injected: yes?\""
        );
        // A target the client wrote goes through the same quoting: a `"`
        // or a `\` in it cannot end the string, CR LF cannot end the line.
        let e = parse_head(b"CONNECT a\"b\\c:443 HTTP/1.1\r\n\r\n").unwrap_err();
        let t = text(&Refusal::Request(e));
        let ps = header(&t, "Proxy-Status").unwrap();
        let details = ps.split_once("details=").unwrap().1;
        assert!(details.starts_with('"') && details.ends_with('"'), "{ps}");
        // Read back as a parser would, it is the details, whole.
        let mut read = String::new();
        let mut chars = details[1..details.len() - 1].chars();
        while let Some(c) = chars.next() {
            assert!((' '..='~').contains(&c), "{ps}");
            assert_ne!(c, '"', "unescaped quote in {ps}");
            read.push(if c == '\\' { chars.next().unwrap() } else { c });
        }
        let e = parse_head(b"CONNECT a\"b\\c:443 HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(read, Refusal::Request(e).entry().2);
        assert!(read.contains(r#"invalid host "a\"b\\c""#), "{read}");
    }

    #[test]
    fn a_reason_that_says_what_to_send_is_not_given_a_second_hint() {
        let e = parse_head(b"CONNECT ::1 HTTP/1.1\r\n\r\n").unwrap_err();
        let details = Refusal::Request(e).entry().2;
        assert!(details.ends_with("send [addr]:port"), "{details}");
        assert_eq!(details.matches("send ").count(), 1, "{details}");
        let e = parse_head(b"garbage\r\n\r\n").unwrap_err();
        let details = Refusal::Request(e).entry().2;
        assert!(
            details.ends_with("; send CONNECT host:port HTTP/1.1"),
            "{details}"
        );
    }

    #[test]
    fn no_refusal_carries_a_credential() {
        // The user name and password a client sent, and the header itself.
        let user = "mig-user";
        let pass = "s3cr:et";
        let header_value = {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            format!("Basic {token}")
        };
        let refusals = [
            Refusal::Auth(AuthError::Wrong(user.into())),
            Refusal::Auth(AuthError::Malformed),
            Refusal::Auth(AuthError::Missing),
        ];
        for r in refusals {
            let t = text(&r);
            for secret in [user, pass, header_value.as_str()] {
                assert!(!t.contains(secret), "{secret:?} in {t}");
            }
        }
        // A duplicated header is refused by name, never by value.
        let head = format!(
            "CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: {header_value}\r\n\
             Proxy-Authorization: {header_value}\r\n\r\n"
        );
        let e = parse_head(head.as_bytes()).unwrap_err();
        let t = text(&Refusal::Request(e));
        assert!(t.starts_with("HTTP/1.1 400 "), "{t}");
        assert!(!t.contains(&header_value) && !t.contains(pass), "{t}");
    }
}
