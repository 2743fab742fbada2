//! Raw HTTP on the wire for the contract tests (`tests/tests/wire.rs`): send
//! exact bytes to the proxy, read and parse the response head, check that a
//! failure response is followed by a close, run the CLI for config errors.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::torture::Upstream;

/// A parsed response head.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// The head exactly as received, CRLFCRLF included.
    pub raw: String,
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether header `name` lists `token` (comma-separated, case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// Parses `HTTP/1.x NNN reason\r\n(header\r\n)*\r\n`.
pub fn parse_head(raw: &str) -> Result<Response> {
    let mut lines = raw.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        bail!("bad status line {status_line:?} in {raw:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status code in {status_line:?}"))?;
    let mut headers = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (n, v) = l
            .split_once(':')
            .with_context(|| format!("bad header line {l:?} in {raw:?}"))?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    Ok(Response {
        status,
        raw: raw.to_string(),
        headers,
    })
}

/// Connects to `addr` with TCP_NODELAY and a read timeout of `timeout`.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Like [`connect`] from the local address `from` (on loopback any
/// 127.0.0.0/8 address works): the proxy sees another client.
pub fn connect_from(from: IpAddr, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::new(from, 0).into())
        .with_context(|| format!("bind {from}"))?;
    s.connect(&to.into())
        .with_context(|| format!("connect {to} from {from}"))?;
    let s = TcpStream::from(s);
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Reads a response head (byte by byte, so nothing after it is consumed)
/// and parses it; fails on timeout or close.
pub fn read_head(s: &mut TcpStream) -> Result<Response> {
    let raw = crate::read_response_head(s)?;
    parse_head(&raw)
}

/// Sends `bytes` in one write and reads the response head. Write errors are
/// ignored (the proxy may answer and close before it has read everything).
pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> Result<(TcpStream, Response)> {
    let mut s = connect(addr, Duration::from_secs(5))?;
    let _ = s.write_all(bytes);
    let r = read_head(&mut s).with_context(|| {
        format!(
            "no response to {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )
    })?;
    Ok((s, r))
}

/// After a failure response: reads its body (Content-Length, if any) and
/// then requires the connection to close (EOF or reset) within `within`
/// without any further byte.
pub fn expect_close(s: &mut TcpStream, r: &Response, within: Duration) -> Result<()> {
    let body_len: usize = match r.header("Content-Length") {
        Some(v) => v
            .parse()
            .with_context(|| format!("bad Content-Length in {:?}", r.raw))?,
        None => 0,
    };
    if body_len > 4096 {
        bail!(
            "{} body of {body_len} bytes is not a short response",
            r.status
        );
    }
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + within;
    let mut body = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                body.extend_from_slice(&buf[..n]);
                if body.len() > body_len {
                    bail!(
                        "{} response followed by unexpected bytes: {:?}",
                        r.status,
                        String::from_utf8_lossy(&body[body_len..])
                    );
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() > deadline {
                    bail!(
                        "connection still open {within:?} after the {} response",
                        r.status
                    );
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break, // reset: closed
        }
    }
    if body.len() < body_len {
        bail!(
            "{} response body cut short: {} of {body_len} bytes",
            r.status,
            body.len()
        );
    }
    Ok(())
}

/// Checks a failure response: status, `Connection: close`, a well-formed
/// `Proxy-Status`, then a close.
pub fn expect_failure(s: &mut TcpStream, r: &Response, status: u16) -> Result<()> {
    if r.status != status {
        bail!("expected {status}, got {:?}", r.raw);
    }
    if !r.has_token("Connection", "close") {
        bail!("{status} response without `Connection: close`: {:?}", r.raw);
    }
    proxy_status(r)?;
    expect_close(s, r, Duration::from_secs(3))
}

/// A refusal's `Proxy-Status` (RFC 9209) as `(error type, details)`: it must
/// be exactly `splice-proxy; error=<token>; details="<sf-string>"`, the
/// details printable ASCII with `"` and `\` escaped, and not empty; only a refusal of the
/// parent proxy adds parameters after it (`; next-hop="..."; received-status=407`, see
/// [`proxy_status_params`]).
pub fn proxy_status(r: &Response) -> Result<(String, String)> {
    let (error, details, _) = split_proxy_status(r)?;
    Ok((error, details))
}

/// The parameters after `details` in a refusal's `Proxy-Status`, as `(name, value)` with a
/// string value unquoted.
pub fn proxy_status_params(r: &Response) -> Result<Vec<(String, String)>> {
    Ok(split_proxy_status(r)?.2)
}

/// A `Proxy-Status` value taken apart: error type, details, then the parameters after them.
type ProxyStatusParts = (String, String, Vec<(String, String)>);

fn split_proxy_status(r: &Response) -> Result<ProxyStatusParts> {
    let v = r
        .header("Proxy-Status")
        .with_context(|| format!("{} without Proxy-Status: {:?}", r.status, r.raw))?;
    let bad = || anyhow::anyhow!("malformed Proxy-Status {v:?}");
    let rest = v.strip_prefix("splice-proxy; error=").ok_or_else(bad)?;
    let (error, quoted) = rest.split_once("; details=").ok_or_else(bad)?;
    if error.is_empty() || !error.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return Err(bad());
    }
    let (details, mut rest) = sf_string(quoted).ok_or_else(bad)?;
    if details.is_empty() {
        return Err(bad());
    }
    let mut params = Vec::new();
    while let Some(p) = rest.strip_prefix("; ") {
        let (name, value) = p.split_once('=').ok_or_else(bad)?;
        if !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
            return Err(bad());
        }
        let (value, after) = match sf_string(value) {
            Some(q) => q,
            None => {
                let end = value.find(';').unwrap_or(value.len());
                (value[..end].to_string(), &value[end..])
            }
        };
        params.push((name.to_string(), value));
        rest = after;
    }
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok((error.to_string(), details, params))
}

/// An sf-string at the start of `s`, unescaped, and what follows it; `None` if malformed.
fn sf_string(s: &str) -> Option<(String, &str)> {
    let inner = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = inner.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, e @ ('"' | '\\'))) => out.push(e),
                _ => return None,
            },
            '"' => return Some((out, &inner[i + 1..])),
            ' '..='~' => out.push(c),
            _ => return None,
        }
    }
    None
}

/// The error type of a refusal's `Proxy-Status`; panics if malformed.
pub fn proxy_error(r: &Response) -> String {
    proxy_status(r).unwrap_or_else(|e| panic!("{e:#}")).0
}

/// `Basic <base64(user:pass)>` with the given scheme spelling.
pub fn basic(scheme: &str, user: &str, pass: &str) -> String {
    use base64::Engine;
    let t = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("{scheme} {t}")
}

/// A CONNECT head for `target` with optional extra header lines.
pub fn connect_head(target: &str, extra: &[String]) -> String {
    let mut h = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    for e in extra {
        h.push_str(e);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h
}

/// An upstream on 127.0.0.1 that echoes every byte back and closes after EOF.
pub fn echo_upstream() -> Result<Upstream> {
    echo_upstream_at("127.0.0.1:0".parse().unwrap())
}

/// Like [`echo_upstream`], listening on `addr` (`[::1]:0` for IPv6).
pub fn echo_upstream_at(addr: SocketAddr) -> Result<Upstream> {
    Upstream::start_with_at(addr, |mut s: TcpStream| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        let mut r = match s.try_clone() {
            Ok(r) => r,
            Err(_) => return,
        };
        let _ = std::io::copy(&mut r, &mut s);
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

/// Runs `splice-proxy <args>` and waits up to `timeout` for it to exit.
/// Returns (exit code, stderr, stdout); a process still running at the
/// deadline is killed and reported as exit code `None`.
pub fn run_cli(args: &[&str], timeout: Duration) -> Result<(Option<i32>, String, String)> {
    let mut child = Command::new(crate::binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn splice-proxy")?;
    let mut err = child.stderr.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(st) = child.try_wait()? {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((
        code,
        e.join().unwrap_or_default(),
        o.join().unwrap_or_default(),
    ))
}

/// One sample of `/metrics` on `maddr` (0 when absent), e.g.
/// `splice_proxy_requests_total{status="200"}`.
pub fn metric(maddr: SocketAddr, series: &str) -> f64 {
    let mut s = TcpStream::connect(maddr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(k, _)| *k == series)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}
