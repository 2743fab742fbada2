//! Reading and parsing the request head.
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
    /// An address literal (`1.2.3.4`, `[::1]`, or `::1` without brackets).
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

/// Why a request head was not accepted (`refusal.rs` maps each to a status).
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
    let mut reader = HeadReader::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Never read more than the cap allows, so a flood is cut off at 64 KiB.
        // `room` is never 0 here: a push that fills the cap decides.
        let want = reader.room().min(chunk.len());
        let n = conn.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(reader.at_eof());
        }
        if let Some(done) = reader.push(&chunk[..n])? {
            return Ok(done);
        }
    }
}

/// The request head as it arrives, in pieces of any size: the same pieces
/// always give the same outcome as the whole head at once.
///
/// httparse parses from the start every time, so parsing after every piece
/// would cost O(n²) for a head dribbled a byte per segment (a 64 KiB head,
/// 64 Ki reads, gigabytes scanned). The reader parses only when that can
/// decide something: the first piece (a TLS hello or other garbage is
/// refused at once), a piece that may end the head (it completes a blank
/// line), every doubling of the buffer (a bad line in a head that never
/// ends is still found early), the cap, and EOF. Blank lines before the
/// request line (which httparse skips) are dropped as they arrive, so they
/// cannot make every piece look like a head's end.
#[derive(Debug, Default)]
pub struct HeadReader {
    /// Bytes kept, from the first byte of the request line on.
    buf: Vec<u8>,
    /// Bytes received in all, leading blank lines included (the cap's measure).
    taken: usize,
    /// `buf.len()` at the last parse (0: not parsed yet).
    parsed_len: usize,
    /// Parses so far (the cost; see the unit tests).
    parses: usize,
}

impl HeadReader {
    pub fn new() -> HeadReader {
        HeadReader::default()
    }

    /// How many more bytes the head may have (the rest of [`MAX_HEAD`]).
    pub fn room(&self) -> usize {
        MAX_HEAD.saturating_sub(self.taken)
    }

    /// How many times the buffered head was parsed.
    pub fn parses(&self) -> usize {
        self.parses
    }

    /// Adds the next bytes from the client. `Ok(Some)` once the head is
    /// complete: the request and the bytes after the head (from this push).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<(Request, Vec<u8>)>, RequestError> {
        let before = self.buf.len();
        self.taken += bytes.len();
        self.buf.extend_from_slice(bytes);
        self.drop_leading_blank_lines();
        if self.buf.is_empty() {
            return if self.taken >= MAX_HEAD {
                Err(RequestError::TooLarge)
            } else {
                Ok(None)
            };
        }
        let at_cap = self.taken >= MAX_HEAD;
        let may_end = ends_a_blank_line(&self.buf, before.min(self.buf.len()));
        if self.parsed_len == 0 || may_end || at_cap || self.buf.len() >= 2 * self.parsed_len {
            if let Some(done) = self.parse()? {
                return Ok(Some(done));
            }
        }
        if at_cap {
            return Err(RequestError::TooLarge);
        }
        Ok(None)
    }

    /// The client closed before the head was complete: what to report.
    /// A head that is already malformed is reported as such, whichever
    /// pieces it came in.
    pub fn at_eof(&mut self) -> RequestError {
        if self.buf.len() > self.parsed_len {
            if let Err(e) = self.parse() {
                return e;
            }
        }
        RequestError::Closed
    }

    fn parse(&mut self) -> Result<Option<(Request, Vec<u8>)>, RequestError> {
        self.parses += 1;
        self.parsed_len = self.buf.len();
        let Some((req, head_len)) = parse_head(&self.buf)? else {
            return Ok(None);
        };
        // The head itself, leading blank lines included, must fit the cap.
        let dropped = self.taken - self.buf.len();
        if dropped + head_len > MAX_HEAD {
            return Err(RequestError::TooLarge);
        }
        Ok(Some((req, self.buf.split_off(head_len))))
    }

    /// Drops the empty lines (`\r\n` or `\n`) before the request line; a
    /// no-op once the buffer starts with the request line.
    fn drop_leading_blank_lines(&mut self) {
        let mut i = 0;
        loop {
            match &self.buf[i..] {
                [b'\n', ..] => i += 1,
                [b'\r', b'\n', ..] => i += 2,
                _ => break,
            }
        }
        if i > 0 {
            self.buf.drain(..i);
            self.parsed_len = 0;
        }
    }
}

/// Whether the bytes from `from` on (with the two before, which may start
/// the pattern) complete an empty line: `\n\n` or `\n\r\n`.
fn ends_a_blank_line(buf: &[u8], from: usize) -> bool {
    let window = &buf[from.saturating_sub(2)..];
    window.windows(2).any(|w| w == b"\n\n") || window.windows(3).any(|w| w == b"\n\r\n")
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
    /// More than one `:` and no brackets, and not an IPv6 address and a
    /// port when split at the last `:`.
    #[error("{0:?} is not <IPv6 address>:<port> split at its last ':'; send [addr]:port")]
    UnbracketedV6(String),
    #[error("invalid host {0:?}")]
    BadHost(String),
}

/// Parses an authority-form request target: `host:port`, `1.2.3.4:port`,
/// `[v6]:port`, or `v6:port` without brackets.
///
/// The unbracketed form is what MTC's stunnel template sends on IPv6
/// clusters (`CONNECT fd00::5:31234`). It is always split at the last `:`:
/// `1::2:3` is `[1::2]:3`, never the address `1::2:3` without a port (a
/// CONNECT target without a port is refused anyway). When the part before
/// that `:` is not an IPv6 address or the part after it not a port, the
/// error says to send `[addr]:port`.
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
            return parse_unbracketed_v6(host, port)
                .ok_or_else(|| AuthorityError::UnbracketedV6(s.chars().take(64).collect()));
        }
        // `1.2.3.4.` is the address 1.2.3.4, not a name (it would print
        // as one and resolve to it anyway).
        let literal = host.strip_suffix('.').unwrap_or(host);
        let host = if let Ok(ip) = literal.parse::<std::net::Ipv4Addr>() {
            Host::Ip(IpAddr::V4(ip))
        } else if is_valid_hostname(host) {
            Host::Name(normalize_name(host))
        } else {
            return Err(AuthorityError::BadHost(host.chars().take(64).collect()));
        };
        (host, port)
    };
    let port =
        parse_port(port).ok_or_else(|| AuthorityError::BadPort(port.chars().take(16).collect()))?;
    Ok(Target { host, port })
}

/// `v6` and `port`, the two sides of an unbracketed target's last `:`, as
/// a target; `None` unless they are an IPv6 address and a port.
fn parse_unbracketed_v6(v6: &str, port: &str) -> Option<Target> {
    let ip: std::net::Ipv6Addr = v6.parse().ok()?;
    Some(Target {
        host: Host::Ip(IpAddr::V6(ip)),
        port: parse_port(port)?,
    })
}

/// 1-65535 in at most five plain decimal digits.
fn parse_port(port: &str) -> Option<u16> {
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok().filter(|p| *p != 0)
}

/// Lower case, without one trailing dot: the form names are compared in.
pub fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Letters, digits, '-', '_' in dot-separated labels of 1-63 bytes, 253 in all;
/// one trailing dot allowed. No percent-encoding, no Unicode (use punycode).
///
/// A name whose last label is a number (`127.1`, `2130706433`, `0x7f.1`,
/// `1.2.3.04`) is not a name: the resolver would read it as an IPv4 address
/// in one of inet_aton's forms. Only the dotted-decimal form is an address
/// here (the URL standard's rule), so those are refused rather than left to
/// the resolver's reading.
pub fn is_valid_hostname(host: &str) -> bool {
    let h = host.strip_suffix('.').unwrap_or(host);
    !h.is_empty()
        && h.len() <= 253
        && !h.rsplit('.').next().is_some_and(is_numeric_label)
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

/// Decimal digits, or `0x` and hex digits: what inet_aton reads as a number.
fn is_numeric_label(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
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
        // A trailing dot after an address: still the address (it used to be
        // a "name" that printed as the address and resolved to it).
        assert_eq!(
            parse_authority("127.0.0.1.:443").unwrap().host,
            Host::Ip("127.0.0.1".parse().unwrap())
        );
        // Numbers inet_aton would read as addresses are neither names nor addresses.
        for numeric in [
            "127.1:443",
            "2130706433:443",
            "0x7f.0.0.1:443",
            "0x7f000001:443",
            "127.0.0.01:443",
            "1.2.3.4.5:443",
            "host.123:443",
            "0x:443",
        ] {
            assert!(
                matches!(parse_authority(numeric), Err(AuthorityError::BadHost(_))),
                "{numeric}"
            );
        }
        for name in [
            "123.example:443",
            "a1.b2:443",
            "0xcafe.example:443",
            "x0:443",
        ] {
            assert!(parse_authority(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn unbracketed_ipv6_splits_at_the_last_colon() {
        let v6 = |s: &str| Host::Ip(s.parse().unwrap());
        for (text, host, port) in [
            // MTC's stunnel template on an IPv6 NodePort cluster.
            ("fd00::5:31234", "fd00::5", 31234),
            ("::1:443", "::1", 443),
            ("2001:db8::1:6443", "2001:db8::1", 6443),
            ("0:0:0:0:0:0:0:1:443", "::1", 443),
            ("::ffff:10.0.0.1:443", "::ffff:10.0.0.1", 443),
            ("FD00::A:443", "fd00::a", 443),
            // Ambiguous: the whole text is also an address (`1::2:3`), but
            // the last `:` always starts the port.
            ("1::2:3", "1::2", 3),
            ("fd00::5:3123", "fd00::5", 3123),
            // `::` is the unspecified address: parsed, and the policy refuses it.
            (":::443", "::", 443),
        ] {
            let t = parse_authority(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                t,
                Target {
                    host: v6(host),
                    port
                },
                "{text}"
            );
            // The same target as the bracketed form, and printed as it.
            assert_eq!(parse_authority(&format!("[{host}]:{port}")), Ok(t.clone()));
            assert_eq!(t.to_string(), format!("[{host}]:{port}"));
        }
    }

    #[test]
    fn malformed_unbracketed_ipv6_says_to_send_brackets() {
        for text in [
            // No port: split at the last colon, neither side works.
            "::1",
            "fd00::5",
            "2001:db8::1",
            "2001:db8:0:0:0:0:0:1",
            // An address, but no port after the last colon.
            "::1:",
            "::1:0",
            "::1:65536",
            "::1:000443",
            "::1:+443",
            "fd00::5:abcd",
            "fd00::5: 443",
            // Not an address before the last colon.
            "fd00:::5:443",
            "1:2:3:4:5:6:7:8:9:443",
            "fe80::1%lo:443",
            "fe80::1%25lo:443",
            "::g:443",
            "a:b:443",
            "::1]:443",
        ] {
            match parse_authority(text) {
                Err(e @ AuthorityError::UnbracketedV6(_)) => {
                    let msg = e.to_string();
                    assert!(msg.contains("send [addr]:port"), "{text}: {msg}");
                    assert!(msg.contains(text), "{text}: {msg}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // The text in the reason is cut short.
        let long = format!("{}:443", "1:".repeat(100));
        let Err(AuthorityError::UnbracketedV6(shown)) = parse_authority(&long) else {
            panic!("{long}")
        };
        assert_eq!(shown.chars().count(), 64);
    }

    #[test]
    fn http10_host_header_does_not_matter() {
        for head in [
            "CONNECT 10.0.0.1:6443 HTTP/1.0\r\n\r\n",
            "CONNECT 10.0.0.1:6443 HTTP/1.0\r\nHost: 10.0.0.1\r\n\r\n",
            "CONNECT 10.0.0.1:6443 HTTP/1.0\r\nHost: elsewhere.example:443\r\n\r\n",
            "CONNECT 10.0.0.1:6443 HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",
            "CONNECT 10.0.0.1:6443 HTTP/1.0\r\nHost: \r\n\r\n",
        ] {
            let (req, _) = parse(head).unwrap().unwrap();
            assert_eq!(req.target.to_string(), "10.0.0.1:6443", "{head:?}");
        }
        let (req, _) = parse("CONNECT fd00::5:31234 HTTP/1.0\r\nHost: fd00::5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.target.to_string(), "[fd00::5]:31234");
    }

    /// Feeds `pieces` to a [`HeadReader`]; at the end the client closes.
    fn feed(pieces: &[&[u8]]) -> (Result<(Request, Vec<u8>), String>, usize) {
        let mut r = HeadReader::new();
        for (i, p) in pieces.iter().enumerate() {
            match r.push(p) {
                Ok(Some((req, mut rest))) => {
                    // What follows the head goes through the tunnel.
                    pieces[i + 1..]
                        .iter()
                        .for_each(|p| rest.extend_from_slice(p));
                    return (Ok((req, rest)), r.parses());
                }
                Ok(None) => {}
                Err(e) => return (Err(e.to_string()), r.parses()),
            }
        }
        (Err(r.at_eof().to_string()), r.parses())
    }

    #[test]
    fn any_two_pieces_give_the_same_outcome_as_one() {
        let heads: &[&[u8]] = &[
            b"CONNECT route.example:443 HTTP/1.1\r\nHost: route.example:443\r\nProxy-Authorization: basic bWlnOnMzY3I6ZXQ=\r\n\r\nEARLY",
            b"\r\n\nCONNECT a:443 HTTP/1.0\n\n",
            b"CONNECT a:443 HTTP/1.1\r\nBad Header: x\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nX: \x00\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nX: y\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"\r",
            b"\r\r\n",
        ];
        for head in heads {
            let (whole, _) = feed(&[head]);
            for cut in 0..=head.len() {
                let (a, b) = head.split_at(cut);
                let (split, _) = feed(&[a, b]);
                assert_eq!(
                    split,
                    whole,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(head)
                );
            }
            let bytes: Vec<&[u8]> = head.chunks(1).collect();
            assert_eq!(
                feed(&bytes).0,
                whole,
                "{:?} byte by byte",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_head_dribbled_byte_by_byte_is_parsed_a_few_times_not_per_byte() {
        // Parsing after every read would parse ~60,000 times here (O(n²)).
        let mut head = b"CONNECT h:443 HTTP/1.1\r\n".to_vec();
        while head.len() < 60 * 1024 {
            head.extend_from_slice(b"X-Filler: 0123456789abcdef0123456789\r\n");
        }
        let mut headers_ok = head.clone();
        head.extend_from_slice(b"\r\n");
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        let (out, parses) = feed(&bytes);
        // Far more than 100 header lines: refused as too large, not parsed per byte.
        assert_eq!(out.unwrap_err(), RequestError::TooLarge.to_string());
        assert!(
            parses <= 20,
            "{parses} parses for a {} byte head",
            head.len()
        );
        // Under the header count limit, with one long header: accepted.
        headers_ok.truncate(24);
        headers_ok.extend_from_slice(b"X-Long: ");
        headers_ok.resize(60 * 1024, b'a');
        headers_ok.extend_from_slice(b"\r\n\r\n");
        let bytes: Vec<&[u8]> = headers_ok.chunks(1).collect();
        let (out, parses) = feed(&bytes);
        assert_eq!(out.unwrap().0.target.to_string(), "h:443");
        assert!(
            parses <= 20,
            "{parses} parses for a {} byte head",
            headers_ok.len()
        );
    }

    #[test]
    fn blank_lines_before_the_request_line_count_toward_the_cap_and_cost_no_parse() {
        let flood = b"\r\n".repeat(MAX_HEAD / 2);
        let bytes: Vec<&[u8]> = flood.chunks(2).collect();
        let (out, parses) = feed(&bytes);
        assert_eq!(out.unwrap_err(), RequestError::TooLarge.to_string());
        assert_eq!(parses, 0);
        // A few are skipped, as httparse does.
        let (out, _) = feed(&[b"\r\n\r\n", b"CONNECT h:443 HTTP/1.1\r\n\r\n"]);
        assert_eq!(out.unwrap().0.target.to_string(), "h:443");
    }

    #[test]
    fn a_bad_line_then_eof_is_malformed_not_closed() {
        // The second piece is not parsed when it arrives (no blank line,
        // no doubling); EOF still reports it for what it is.
        let (out, _) = feed(&[b"CONNECT h:443 HTTP/1.1\r\n", b"Bad Header: x\r\n"]);
        assert!(out.unwrap_err().starts_with("malformed request"));
        let (out, _) = feed(&[b"CONNECT h:443 HTTP/1.1\r\n", b"X: y\r\n"]);
        assert_eq!(out.unwrap_err(), RequestError::Closed.to_string());
    }

    #[test]
    fn a_head_over_the_cap_in_one_push_is_too_large() {
        let mut head = b"CONNECT h:443 HTTP/1.1\r\nX: ".to_vec();
        head.resize(MAX_HEAD + 10, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            feed(&[&head]).0.unwrap_err(),
            RequestError::TooLarge.to_string()
        );
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
