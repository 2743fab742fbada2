//! Malformed and tricky request heads on the wire, table-driven: each head
//! with the status it must get (DESIGN.md "The wire", src/request.rs) or a
//! silent close, against the real binary. Then every accepted head again,
//! split into two writes at every byte boundary: the same 200, and a tunnel
//! that carries bytes.
//!
//! The contract these rows pin down (where DESIGN.md is silent, request.rs
//! and httparse decide, and this table is the record):
//! - bare LF line endings and blank lines before the request line are
//!   accepted (RFC 9112 allows both); a lone CR is 400;
//! - obs-fold continuation lines, NUL bytes, a space before a header's
//!   colon, doubled spaces in the request line: 400;
//! - HTTP/1.0 and 1.1 only: 2.0, 1.2 or garbage versions are 400;
//! - the request line decides where a tunnel goes: `Host` is never read, so
//!   a head without one, with one that lacks the port, or with one naming
//!   another host is a tunnel to the request line's target (1.0 and 1.1);
//! - methods are case-sensitive: `connect` is 405, like GET in absolute form;
//! - the target is `host:port` with a port of 1-65535 in plain digits, and
//!   the host an IPv4 literal, a bracketed IPv6 literal or a name of ASCII
//!   labels; or, with more than one `:` and no brackets (what MTC's stunnel
//!   template sends on IPv6 clusters), an IPv6 literal and a port split at
//!   the last `:` (`::1:443` is `[::1]:443`, and `1::2:3` always `[1::2]:3`),
//!   under the same policy as the bracketed form;
//! - percent-encoding, Unicode (send punycode), userinfo, a scheme, a zoned
//!   IPv6 literal, an unbracketed target that does not split into an IPv6
//!   literal and a port (`::1` alone, `::1:0`, `fd00:::5:443`), and names
//!   that end in a number (inet_aton's `127.1`, `2130706433`, `0x7f.1`) are
//!   400; a trailing dot after an IPv4 literal is the literal;
//! - two Proxy-Authorization headers are 400; a single one that is not
//!   `Basic base64(user:pass)` with a non-empty user is 407;
//! - more than 100 header lines, or more than 64 KiB before the end of the
//!   head (blank lines before the request line count), is 431;
//! - a client that closes before its head is complete gets no response.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use splice_proxy_tests::rawhttp::{
    connect, echo_upstream, echo_upstream_at, expect_failure, parse_head,
};
use splice_proxy_tests::torture::Upstream;
use splice_proxy_tests::{Proxy, TEST_POLICY, read_response_head};

const OK_200: &str = "HTTP/1.1 200 Connection established\r\n\r\n";
const USER: &str = "mig";
const PASS: &str = "s3cr:et";

/// Which proxy a row goes to.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// `--allow-anonymous`, loopback upstreams allowed (TEST_POLICY and ::1).
    Anon,
    /// `--credentials mig:s3cr:et`, loopback upstreams allowed (as Anon).
    Auth,
    /// `--credentials mig:s3cr:et` with the default destination policy.
    Default,
}

/// What a row must get.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Exactly the 200 reply, then a working tunnel.
    Tunnel,
    /// This failure status with `Connection: close`, then a close.
    Status(u16),
    /// The client sends the bytes and closes its side: no response, a close.
    SilentClose,
}

struct Row {
    what: &'static str,
    via: Via,
    head: Vec<u8>,
    want: Want,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The rows; `t` is the echo upstream's `127.0.0.1:port`, `t6` the IPv6
/// echo upstream's `[::1]:port`.
fn rows(t: &str, t6: &str) -> Vec<Row> {
    let auth = format!(
        "Proxy-Authorization: basic {}",
        b64(&format!("{USER}:{PASS}"))
    );
    let port = t.rsplit_once(':').unwrap().1;
    let port6 = t6.rsplit_once(':').unwrap().1;
    let mut rows = Vec::new();
    let mut row = |what: &'static str, via: Via, head: Vec<u8>, want: Want| {
        rows.push(Row {
            what,
            via,
            head,
            want,
        })
    };
    let s = |text: String| text.into_bytes();
    use Via::*;
    use Want::*;

    // ---- accepted: real clients (captured on loopback; see proxy-user/fuzz/corpus/head) ----
    row(
        "stunnel: line per segment, lowercase basic",
        Auth,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n{auth}\r\n\r\n"
        )),
        Tunnel,
    );
    row(
        "curl",
        Auth,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nProxy-Authorization: Basic {}\r\nUser-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n",
            b64(&format!("{USER}:{PASS}"))
        )),
        Tunnel,
    );
    row(
        "socat: HTTP/1.0, Proxy-authorization",
        Auth,
        s(format!(
            "CONNECT {t} HTTP/1.0\r\nProxy-authorization: Basic {}\r\n\r\n",
            b64(&format!("{USER}:{PASS}"))
        )),
        Tunnel,
    );
    row(
        "openssl s_client",
        Auth,
        s(format!(
            "CONNECT {t} HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\nProxy-Authorization: Basic {}\r\n\r\n",
            b64(&format!("{USER}:{PASS}"))
        )),
        Tunnel,
    );
    row(
        "stunnel from MTC's IPv6 NodePort template: unbracketed target and Host",
        Auth,
        s(format!(
            "CONNECT ::1:{port6} HTTP/1.1\r\nHost: ::1:{port6}\r\n{auth}\r\n\r\n"
        )),
        Tunnel,
    );
    // ---- accepted: tolerated forms ----
    row(
        "bare LF line endings",
        Anon,
        s(format!("CONNECT {t} HTTP/1.1\nHost: {t}\n\n")),
        Tunnel,
    );
    row(
        "mixed CRLF and LF",
        Anon,
        s(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\n\r\n")),
        Tunnel,
    );
    row(
        "blank lines before the request line",
        Anon,
        s(format!("\r\n\nCONNECT {t} HTTP/1.1\r\n\r\n")),
        Tunnel,
    );
    row(
        "HTTP/1.0 without Host",
        Anon,
        s(format!("CONNECT {t} HTTP/1.0\r\n\r\n")),
        Tunnel,
    );
    row(
        "Host differs from the target (the target decides)",
        Anon,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n"
        )),
        Tunnel,
    );
    row(
        "Host without the port",
        Anon,
        s(format!("CONNECT {t} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")),
        Tunnel,
    );
    row(
        "HTTP/1.0, Host without the port",
        Anon,
        s(format!("CONNECT {t} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")),
        Tunnel,
    );
    row(
        "HTTP/1.0, Host differs from the target",
        Anon,
        s(format!(
            "CONNECT {t} HTTP/1.0\r\nHost: elsewhere.example:443\r\n\r\n"
        )),
        Tunnel,
    );
    row(
        "HTTP/1.0, Host without the port, with credentials",
        Auth,
        s(format!(
            "CONNECT {t} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n\r\n"
        )),
        Tunnel,
    );
    row(
        "HTTP/1.0, unbracketed IPv6, Host without the port",
        Anon,
        s(format!("CONNECT ::1:{port6} HTTP/1.0\r\nHost: ::1\r\n\r\n")),
        Tunnel,
    );
    row(
        "bracketed IPv6 literal",
        Anon,
        s(format!("CONNECT {t6} HTTP/1.1\r\nHost: {t6}\r\n\r\n")),
        Tunnel,
    );
    row(
        "unbracketed IPv6 literal, split at the last colon",
        Anon,
        s(format!("CONNECT ::1:{port6} HTTP/1.1\r\n\r\n")),
        Tunnel,
    );
    row(
        "unbracketed IPv6 literal without ::",
        Anon,
        s(format!("CONNECT 0:0:0:0:0:0:0:1:{port6} HTTP/1.1\r\n\r\n")),
        Tunnel,
    );
    row(
        "unbracketed IPv4-mapped IPv6 literal of a listed address",
        Anon,
        s(format!("CONNECT ::ffff:127.0.0.1:{port} HTTP/1.1\r\n\r\n")),
        Tunnel,
    );
    row(
        "trailing dot after an IPv4 literal",
        Anon,
        s(format!("CONNECT 127.0.0.1.:{port} HTTP/1.1\r\n\r\n")),
        Tunnel,
    );
    row(
        "IPv4-mapped IPv6 literal of a listed address",
        Anon,
        s(format!(
            "CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\n\r\n"
        )),
        Tunnel,
    );
    row(
        "tab between scheme and token, spaces after it",
        Auth,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\nProxy-Authorization: BASIC\t{}   \r\n\r\n",
            b64(&format!("{USER}:{PASS}"))
        )),
        Tunnel,
    );
    row(
        "Proxy-Authorization sent to an anonymous proxy",
        Anon,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\nProxy-Authorization: Basic !!!\r\n\r\n"
        )),
        Tunnel,
    );

    // ---- 400: line structure ----
    row(
        "obs-fold continuation line",
        Anon,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n folded\r\n\r\n"
        )),
        Status(400),
    );
    row(
        "obs-fold inside Proxy-Authorization",
        Auth,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\nProxy-Authorization: Basic\r\n {}\r\n\r\n",
            b64(&format!("{USER}:{PASS}"))
        )),
        Status(400),
    );
    row(
        "lone CR line endings",
        Anon,
        s(format!("CONNECT {t} HTTP/1.1\rHost: {t}\r\r")),
        Status(400),
    );
    row(
        "NUL in a header value",
        Anon,
        s(format!("CONNECT {t} HTTP/1.1\r\nX: a\0b\r\n\r\n")),
        Status(400),
    );
    row(
        "NUL in the target",
        Anon,
        s(format!("CONNECT 127.0.0.1\0:{port} HTTP/1.1\r\n\r\n")),
        Status(400),
    );
    row(
        "NUL before the method",
        Anon,
        s(format!("\0CONNECT {t} HTTP/1.1\r\n\r\n")),
        Status(400),
    );
    row(
        "space before a header's colon",
        Anon,
        s(format!("CONNECT {t} HTTP/1.1\r\nHost : {t}\r\n\r\n")),
        Status(400),
    );
    row(
        "two spaces in the request line",
        Anon,
        s(format!("CONNECT  {t} HTTP/1.1\r\n\r\n")),
        Status(400),
    );
    row(
        "no target",
        Anon,
        s("CONNECT HTTP/1.1\r\n\r\n".into()),
        Status(400),
    );
    row(
        "TLS ClientHello instead of a head",
        Anon,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\r\n\r\n".to_vec(),
        Status(400),
    );
    row(
        "duplicate Proxy-Authorization",
        Auth,
        s(format!("CONNECT {t} HTTP/1.1\r\n{auth}\r\n{auth}\r\n\r\n")),
        Status(400),
    );
    // ---- 400: versions ----
    row(
        "HTTP/2.0",
        Anon,
        s(format!("CONNECT {t} HTTP/2.0\r\n\r\n")),
        Status(400),
    );
    row(
        "HTTP/1.2",
        Anon,
        s(format!("CONNECT {t} HTTP/1.2\r\n\r\n")),
        Status(400),
    );
    row(
        "lowercase version",
        Anon,
        s(format!("CONNECT {t} http/1.1\r\n\r\n")),
        Status(400),
    );
    row(
        "garbage version",
        Anon,
        s(format!("CONNECT {t} XYZZY\r\n\r\n")),
        Status(400),
    );
    row(
        "HTTP/2 connection preface",
        Anon,
        s("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into()),
        Status(400),
    );
    // ---- 400: ports ----
    for (what, p) in [
        ("port 0", "0"),
        ("port 65536", "65536"),
        ("port -1", "-1"),
        ("port 99999999999", "99999999999"),
        ("port +443", "+443"),
        ("empty port", ""),
        ("hex port", "0x1bb"),
    ] {
        row(
            what,
            Anon,
            s(format!("CONNECT 127.0.0.1:{p} HTTP/1.1\r\n\r\n")),
            Status(400),
        );
    }
    row(
        "no port",
        Anon,
        s("CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n".into()),
        Status(400),
    );
    // ---- 400: hosts ----
    for (what, target) in [
        ("percent-encoded colon", format!("127.0.0.1%3A{port}")),
        ("percent-encoded host", format!("%31%32%37.0.0.1:{port}")),
        ("Unicode host", "bücher.example:443".to_string()),
        (
            "Unicode dot (U+3002)",
            "route\u{3002}example:443".to_string(),
        ),
        ("unbracketed IPv6 without a port", "::1".to_string()),
        (
            "unbracketed IPv6 without a port, fd00::5",
            "fd00::5".to_string(),
        ),
        (
            "unbracketed IPv6 of eight groups without a port",
            "2001:db8:0:0:0:0:0:1".to_string(),
        ),
        ("unbracketed IPv6, port 0", "::1:0".to_string()),
        ("unbracketed IPv6, port 65536", "::1:65536".to_string()),
        ("unbracketed IPv6, hex port", "fd00::5:1bb".to_string()),
        ("unbracketed IPv6, empty port", "::1:".to_string()),
        (
            "unbracketed, three colons in a row",
            format!("fd00:::5:{port6}"),
        ),
        (
            "unbracketed, nine groups",
            format!("1:2:3:4:5:6:7:8:9:{port6}"),
        ),
        (
            "unbracketed IPv6 with a zone",
            format!("fe80::1%25lo:{port6}"),
        ),
        ("IPv6 with a zone", "[fe80::1%25lo]:443".to_string()),
        ("IPv6 missing the closing bracket", "[::1:443".to_string()),
        ("userinfo", format!("{USER}:{PASS}@{t}")),
        ("user without password", format!("{USER}@{t}")),
        ("scheme in the authority", format!("https://{t}")),
        ("CONNECT to an absolute URI", format!("http://{t}/")),
        ("inet_aton short form 127.1", format!("127.1:{port}")),
        ("inet_aton decimal 2130706433", format!("2130706433:{port}")),
        ("inet_aton hex 0x7f.0.0.1", format!("0x7f.0.0.1:{port}")),
        ("leading zeros 127.0.0.01", format!("127.0.0.01:{port}")),
        (
            "label of 64 characters",
            format!("{}.example:443", "a".repeat(64)),
        ),
        (
            "name of 255 characters",
            format!("{}example:443", "a.".repeat(124)),
        ),
        ("empty label", "route..example:443".to_string()),
        (
            "label starting with a hyphen",
            "-route.example:443".to_string(),
        ),
    ] {
        row(
            what,
            Anon,
            s(format!("CONNECT {target} HTTP/1.1\r\n\r\n")),
            Status(400),
        );
    }

    // ---- 405 ----
    row(
        "absolute-form GET",
        Anon,
        s(format!("GET http://{t}/ HTTP/1.1\r\nHost: {t}\r\n\r\n")),
        Status(405),
    );
    row(
        "lowercase connect",
        Anon,
        s(format!("connect {t} HTTP/1.1\r\n\r\n")),
        Status(405),
    );
    row(
        "mixed-case Connect",
        Anon,
        s(format!("Connect {t} HTTP/1.1\r\n\r\n")),
        Status(405),
    );

    // ---- 407 ----
    for (what, value) in [
        ("bad base64", "Basic !!!!".to_string()),
        (
            "base64 without padding",
            format!(
                "Basic {}",
                b64(&format!("{USER}:{PASS}")).trim_end_matches('=')
            ),
        ),
        (
            "no colon in the credentials",
            format!("Basic {}", b64(USER)),
        ),
        ("empty user", format!("Basic {}", b64(&format!(":{PASS}")))),
        (
            "credentials not UTF-8",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(b"mig:\xff\xfe")
            ),
        ),
        ("scheme without token", "Basic".to_string()),
        ("empty value", String::new()),
        ("Bearer scheme", "Bearer abc.def.ghi".to_string()),
        (
            "Digest scheme",
            "Digest username=\"mig\", response=\"x\"".to_string(),
        ),
        (
            "token in the scheme's place",
            b64(&format!("{USER}:{PASS}")),
        ),
    ] {
        row(
            what,
            Auth,
            s(format!(
                "CONNECT {t} HTTP/1.1\r\nProxy-Authorization: {value}\r\n\r\n"
            )),
            Status(407),
        );
    }
    row(
        "right credentials in Authorization, not Proxy-Authorization",
        Auth,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\nAuthorization: Basic {}\r\n\r\n",
            b64(&format!("{USER}:{PASS}"))
        )),
        Status(407),
    );

    // ---- 403: the default policy, whatever the spelling ----
    // Only targets on this host: were the policy broken, a row connects to
    // loopback, never beyond it.
    for (what, target) in [
        ("loopback with a trailing dot", "127.0.0.1.:443"),
        ("IPv4-mapped loopback", "[::ffff:127.0.0.1]:443"),
        ("IPv4-mapped loopback, hex form", "[::ffff:7f00:1]:443"),
        ("IPv4-mapped unspecified", "[::ffff:0.0.0.0]:443"),
        ("unbracketed IPv6 loopback", "::1:443"),
        ("unbracketed IPv4-mapped loopback", "::ffff:127.0.0.1:443"),
        ("unbracketed unspecified", ":::443"),
        ("localhost with a trailing dot", "localhost.:443"),
        ("LOCALHOST upper case", "LOCALHOST:443"),
    ] {
        row(
            what,
            Default,
            s(format!("CONNECT {target} HTTP/1.1\r\n{auth}\r\n\r\n")),
            Status(403),
        );
    }

    // ---- 431 ----
    row(
        "request line over 64 KiB",
        Anon,
        s(format!(
            "CONNECT {}.example:443 HTTP/1.1\r\n\r\n",
            "a".repeat(70 << 10)
        )),
        Status(431),
    );
    row(
        "header line over 64 KiB",
        Anon,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "b".repeat(70 << 10)
        )),
        Status(431),
    );
    row(
        "101 header lines (small head)",
        Anon,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(101)
        )),
        Status(431),
    );
    row(
        "10,000 header lines",
        Anon,
        s(format!(
            "CONNECT {t} HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(10_000)
        )),
        Status(431),
    );
    row(
        "64 KiB of blank lines, then a head",
        Anon,
        s(format!(
            "{}CONNECT {t} HTTP/1.1\r\n\r\n",
            "\r\n".repeat(32 << 10)
        )),
        Status(431),
    );

    // ---- silent close ----
    row("nothing, then FIN", Anon, Vec::new(), SilentClose);
    row(
        "part of a head, then FIN",
        Anon,
        s(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n")),
        SilentClose,
    );
    row(
        "blank lines only, then FIN",
        Anon,
        s("\r\n\r\n\n".into()),
        SilentClose,
    );
    rows
}

/// Runs one row on a fresh connection; `Err` says what went wrong.
fn run_row(proxy: &Proxy, row: &Row) -> Result<(), String> {
    let mut c = connect(proxy.addr, Duration::from_secs(5)).map_err(|e| format!("{e:#}"))?;
    // The proxy may answer and close before reading everything (431).
    let _ = c.write_all(&row.head);
    match row.want {
        Want::Tunnel => {
            let head = read_response_head(&mut c).map_err(|e| format!("{e:#}"))?;
            if head != OK_200 {
                return Err(format!("got {head:?}"));
            }
            echo(&mut c, row.what.as_bytes())
        }
        Want::Status(status) => {
            let raw = read_response_head(&mut c).map_err(|e| format!("{e:#}"))?;
            let r = parse_head(&raw).map_err(|e| format!("{e:#}"))?;
            expect_failure(&mut c, &r, status).map_err(|e| format!("{e:#}"))
        }
        Want::SilentClose => {
            c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let mut got = Vec::new();
            match c.read_to_end(&mut got) {
                Ok(_) if got.is_empty() => Ok(()),
                Ok(_) => Err(format!(
                    "answered {:?}",
                    String::from_utf8_lossy(&got[..got.len().min(80)])
                )),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
                Err(e) => Err(format!("no close: {e}")),
            }
        }
    }
}

/// Bytes through the tunnel to the echo upstream and back.
fn echo(c: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    c.write_all(msg).map_err(|e| format!("tunnel write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)
        .map_err(|e| format!("tunnel read: {e}"))?;
    if back != msg {
        return Err(format!(
            "tunnel returned {:?}",
            String::from_utf8_lossy(&back)
        ));
    }
    Ok(())
}

/// Runs `jobs` on `workers` threads; returns every failure.
fn run_concurrently<J: Sync>(
    jobs: &[J],
    workers: usize,
    run: impl Fn(&J) -> Result<(), String> + Sync,
) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { break };
                    if let Err(e) = run(job) {
                        failures.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

struct Proxies {
    anon: Proxy,
    auth: Proxy,
    default: Proxy,
}

impl Proxies {
    fn start() -> Proxies {
        let with = |extra: &[&str]| {
            let mut args: Vec<&str> = TEST_POLICY.to_vec();
            args.extend_from_slice(&["--allow-dst", "::1"]);
            args.extend_from_slice(extra);
            Proxy::start(&args).expect("start proxy")
        };
        let creds = format!("{USER}:{PASS}");
        // No back-off: the table sends many 407s from one address on purpose.
        Proxies {
            anon: with(&["--allow-anonymous"]),
            auth: with(&["--credentials", &creds, "--auth-fail-delay", "0"]),
            default: Proxy::start(&["--credentials", &creds, "--auth-fail-delay", "0"])
                .expect("start proxy"),
        }
    }

    fn via(&self, via: Via) -> &Proxy {
        match via {
            Via::Anon => &self.anon,
            Via::Auth => &self.auth,
            Via::Default => &self.default,
        }
    }
}

/// Echo upstreams on 127.0.0.1 and on ::1.
fn echo_upstreams() -> (Upstream, Upstream) {
    (
        echo_upstream().unwrap(),
        echo_upstream_at("[::1]:0".parse().unwrap()).unwrap(),
    )
}

#[test]
fn every_row_gets_its_status() {
    let (up, up6) = echo_upstreams();
    let proxies = Proxies::start();
    let rows = rows(&up.target(), &up6.target());
    assert!(rows.len() >= 40, "{} rows", rows.len());
    let t0 = Instant::now();
    let failures = run_concurrently(&rows, 8, |row| {
        run_row(proxies.via(row.via), row)
            .map_err(|e| format!("{} (want {:?}): {e}", row.what, row.want))
    });
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    eprintln!("{} rows in {:?}", rows.len(), t0.elapsed());
}

/// Every accepted head, sent as two writes split at every byte boundary
/// (TCP_NODELAY, a pause between them so they are two segments): the same
/// 200, and the tunnel carries bytes both ways.
#[test]
fn accepted_heads_split_at_every_byte_get_the_same_200() {
    let (up, up6) = echo_upstreams();
    let proxies = Proxies::start();
    let rows: Vec<Row> = rows(&up.target(), &up6.target())
        .into_iter()
        .filter(|r| r.want == Want::Tunnel)
        .collect();
    assert!(rows.iter().any(|r| r.what.starts_with("stunnel")));
    let jobs: Vec<(&Row, usize)> = rows
        .iter()
        .flat_map(|r| (1..r.head.len()).map(move |cut| (r, cut)))
        .collect();
    let t0 = Instant::now();
    let failures = run_concurrently(&jobs, 16, |(row, cut)| {
        let fail = |e: String| format!("{} split at {cut}/{}: {e}", row.what, row.head.len());
        let proxy = proxies.via(row.via);
        let mut c =
            connect(proxy.addr, Duration::from_secs(5)).map_err(|e| fail(format!("{e:#}")))?;
        let (a, b) = row.head.split_at(*cut);
        c.write_all(a).map_err(|e| fail(e.to_string()))?;
        std::thread::sleep(Duration::from_millis(5));
        c.write_all(b).map_err(|e| fail(e.to_string()))?;
        let head = read_response_head(&mut c).map_err(|e| fail(format!("{e:#}")))?;
        if head != OK_200 {
            return Err(fail(format!("got {head:?}")));
        }
        echo(&mut c, format!("{} @{cut}", row.what).as_bytes()).map_err(fail)
    });
    assert!(
        failures.is_empty(),
        "{} of {} split heads failed:\n{}",
        failures.len(),
        jobs.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} accepted heads, {} splits in {:?}",
        rows.len(),
        jobs.len(),
        t0.elapsed()
    );
}
