//! `splice-proxy doctor` end to end: the real binary run against real proxies on loopback, each
//! verdict and exit status asserted. The TLS targets and the Kubernetes-like API server are the
//! test's own (certificates made with the openssl CLI); the intercepting proxy is squid with
//! `ssl_bump bump` and a CA of the test's (Debian's squid-openssl).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splice_proxy_tests::peers::{TempDir, require_tools};
use splice_proxy_tests::squid::{self, SslBump};
use splice_proxy_tests::tls::{self, Handler, Pem, TlsServer};
use splice_proxy_tests::{Proxy, TEST_POLICY, binary};

const USER: &str = "mig";
const PASS: &str = "s3cr:et@x";
/// PASS as it is written inside the URL.
const PASS_IN_URL: &str = "s3cr%3Aet%40x";

/// A target that accepts connections and closes them: the proxy only needs to reach it (the tls
/// check then cannot tell, at once).
fn target() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || for _ in l.incoming() {});
    addr
}

/// Runs doctor with `args`, and `--timeout 5s` unless they say otherwise.
fn doctor(args: &[&str]) -> Output {
    let timeout: &[&str] = if args.contains(&"--timeout") {
        &[]
    } else {
        &["--timeout", "5s"]
    };
    let out = Command::new(binary())
        .arg("doctor")
        .args(args)
        .args(timeout)
        .output()
        .expect("run splice-proxy doctor");
    eprintln!(
        "doctor {args:?} -> {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The line of one check, split into outcome and reason.
fn line<'a>(out: &'a str, check: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(check))
        .unwrap_or_else(|| panic!("no {check} line in:\n{out}"))
}

fn our_proxy() -> Proxy {
    let creds = format!("{USER}:{PASS}");
    let mut args = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--mode", "copy", "--credentials", &creds]);
    Proxy::start(&args).unwrap()
}

#[test]
fn our_proxy_passes_with_percent_encoded_password() {
    let proxy = our_proxy();
    let t = target().to_string();
    let url = format!("http://{USER}:{PASS_IN_URL}@{}", proxy.addr);
    let o = doctor(&[&url, "--target", &t]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(line(&out, "connect").contains(" pass "), "{out}");
    assert!(out.contains("200"), "{out}");
    // Without --idle the idle line says how to run it, and is no failure.
    let l = line(&out, "idle");
    assert!(
        l.contains(" skipped ") && l.contains("add --idle DUR"),
        "{out}"
    );
    assert!(
        out.lines()
            .all(|l| !l.starts_with("half-close") && !l.starts_with("throughput")),
        "{out}"
    );
    assert!(
        !out.contains(PASS) && !out.contains(PASS_IN_URL),
        "password printed:\n{out}"
    );
}

#[test]
fn wrong_credentials_are_a_407_with_basic_offered() {
    let proxy = our_proxy();
    let t = target().to_string();
    let url = format!("http://{USER}:wrong@{}", proxy.addr);
    let o = doctor(&[&url, "--target", &t]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let l = line(&out, "connect");
    assert!(l.contains(" fail "), "{out}");
    assert!(
        l.contains("407") && l.contains("schemes offered: Basic"),
        "{out}"
    );
    assert!(l.contains("refused these credentials"), "{out}");
    assert!(!out.contains("wrong"), "password printed:\n{out}");
}

#[test]
fn refused_destination_shows_proxy_status() {
    let proxy = our_proxy();
    // Not in TEST_POLICY's loopback range, and never contacted: the policy refuses it first.
    let o = doctor(&[
        &format!("http://{USER}:{PASS_IN_URL}@{}", proxy.addr),
        "--target",
        "127.0.0.1:0x",
    ]);
    assert_eq!(o.status.code(), Some(2), "a bad --target is a usage error");
    let o = doctor(&[
        &format!("http://{USER}:{PASS_IN_URL}@{}", proxy.addr),
        "--target",
        "[::1]:443",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let l = line(&out, "connect");
    assert!(
        l.contains("403") && l.contains("Proxy-Status: splice-proxy"),
        "{out}"
    );
}

/// A proxy that answers every CONNECT with a 407 offering only NTLM and Negotiate, after reading
/// the head stunnel sent; it records that head.
fn ntlm_only_proxy() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).is_ok_and(|n| n == 1) {
                head.push(b[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            let _ = s.write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\n\
                  Proxy-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n",
            );
        }
    });
    (addr, rx)
}

#[test]
fn ntlm_only_proxy_is_reported() {
    let (addr, heads) = ntlm_only_proxy();
    let url = format!("http://{USER}:{PASS_IN_URL}@{addr}");
    let o = doctor(&[&url, "--target", "127.0.0.1:443", "--json"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains(r#""check":"connect""#), "{out}");
    assert!(out.contains(r#""outcome":"fail""#), "{out}");
    assert!(out.contains("schemes offered: NTLM, Negotiate"), "{out}");
    assert!(out.contains("cannot serve a migration"), "{out}");
    assert!(out.contains(r#""ok":false"#), "{out}");
    // What arrived is what stunnel sends: lower-case scheme, decoded password.
    let head = heads.recv_timeout(Duration::from_secs(5)).unwrap();
    let token = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"))
    };
    assert_eq!(
        head,
        format!(
            "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\
             Proxy-Authorization: basic {token}\r\n\r\n"
        )
    );
}

#[test]
fn unreachable_proxy_fails() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let o = doctor(&[
        &format!("http://127.0.0.1:{port}"),
        "--target",
        "127.0.0.1:443",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(line(&out, "connect").contains("not reachable"), "{out}");
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let o = doctor(&["http://u:hunter2@127.0.0.1", "--target", "127.0.0.1:443"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no port") && err.contains("connect = 127.0.0.1:"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    let o = doctor(&["http://127.0.0.1:3128"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
    for (flag, value, says) in [
        ("--idle", "0s", "must be greater than zero"),
        ("--idle", "5parsecs", "unknown unit"),
        ("--throughput-mib", "0", "not in 1..=4096"),
        ("--throughput-mib", "lots", "invalid value"),
    ] {
        let o = doctor(&["http://127.0.0.1:3128", "--target", "h:1", flag, value]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(flag) && err.contains(says), "{err}");
    }
}

/// The CN of the CA that issues the target's and the API server's certificates.
const ROUTE_CA: &str = "Doctor Test Route CA";
/// The CN of the CA that the intercepting squid signs its certificates with.
const SQUID_CA: &str = "Doctor Test Squid CA";

/// A temp dir with the route's CA and a certificate it issued for 127.0.0.1; `None` (and a line
/// saying why) when the openssl CLI is missing.
struct Pki {
    dir: TempDir,
    ca: Pem,
    server: Pem,
}

fn pki(tag: &str) -> Option<Pki> {
    if let Err(e) = require_tools(&["openssl"]) {
        eprintln!("skipped: {e}");
        return None;
    }
    let dir = TempDir::new(tag).unwrap();
    let ca = tls::make_ca(dir.path(), "route-ca", ROUTE_CA).unwrap();
    // CN 127.0.0.1 too: squid 5 matches a server's address against the CN and DNS names only.
    let server = tls::issue(
        dir.path(),
        &ca,
        "route",
        "127.0.0.1",
        "IP:127.0.0.1,DNS:route.doctor.test",
    )
    .unwrap();
    Some(Pki { dir, ca, server })
}

/// `--ca FILE` for the route's CA.
fn ca_arg(p: &Pki) -> String {
    p.ca.cert.display().to_string()
}

/// What the test's API server received: one request head a connection.
type Heads = Arc<Mutex<Vec<String>>>;

/// A Kubernetes-like API server: `101` when `Connection: Upgrade` and `Upgrade` arrive, else
/// `400` with the API server's body `Upgrade request required`.
fn api_server(p: &Pki) -> (TlsServer, Heads) {
    let heads: Heads = Arc::default();
    let seen = heads.clone();
    let handler: Handler = Arc::new(move |s| {
        let head = tls::read_request_head(s);
        let lower = head.to_ascii_lowercase();
        let header = |name: &str| {
            lower
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let connection = header("connection:").unwrap_or_default();
        let answer = match header("upgrade:") {
            Some(proto) if connection.split(',').any(|t| t.trim() == "upgrade") => format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\r\n"
            ),
            _ => "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
                  Content-Length: 25\r\n\r\nUpgrade request required\n"
                .to_string(),
        };
        seen.lock().unwrap().push(head);
        let _ = s.write_all(answer.as_bytes());
        let _ = s.flush();
    });
    (TlsServer::start(&p.server, handler).unwrap(), heads)
}

fn our_url(proxy: &Proxy) -> String {
    format!("http://{USER}:{PASS_IN_URL}@{}", proxy.addr)
}

#[test]
fn tls_through_our_proxy_is_untouched_by_ca_and_directly() {
    let Some(p) = pki("doctor-tls-ours") else {
        return;
    };
    let target = TlsServer::start(&p.server, tls::hold()).unwrap();
    let t = target.addr.to_string();
    let proxy = our_proxy();
    let o = doctor(&[&our_url(&proxy), "--target", &t, "--ca", &ca_arg(&p)]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let l = line(&out, "tls");
    assert!(l.contains(" pass "), "{out}");
    assert!(
        l.contains(&format!("chains to --ca (issuer CN={ROUTE_CA})"))
            && l.contains("the one the target presents directly"),
        "{out}"
    );
    assert!(!out.contains(PASS) && !out.contains(PASS_IN_URL), "{out}");
    // Without --ca the direct chain alone decides.
    let o = doctor(&[&our_url(&proxy), "--target", &t, "--json"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{out}");
    let c = json_check(&out, "tls");
    assert!(c.contains(r#""outcome":"pass""#), "{out}");
    assert!(c.contains("same certificate as directly"), "{out}");
}

/// One check's object in `--json` output (keys in order: check, outcome, reason).
fn json_check<'a>(out: &'a str, check: &str) -> &'a str {
    let start = out
        .find(&format!(r#"{{"check":"{check}""#))
        .unwrap_or_else(|| panic!("no {check} check in {out}"));
    let len = out[start..].find("\"}").expect("object end") + 2;
    &out[start..start + len]
}

#[test]
fn tls_seen_only_through_the_proxy_names_the_issuer_and_needs_ca() {
    let Some(p) = pki("doctor-tls-single") else {
        return;
    };
    let proxy = our_proxy();
    // The target accepts once: the proxy's connection. doctor's direct try is refused.
    let target = TlsServer::start_single(&p.server, tls::hold()).unwrap();
    let t = target.addr.to_string();
    let o = doctor(&[&our_url(&proxy), "--target", &t]);
    let out = text(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "cannot tell is not a failure: {out}"
    );
    let l = line(&out, "tls");
    assert!(l.contains(" cannot tell "), "{out}");
    assert!(l.contains(&format!("issued by CN={ROUTE_CA}")), "{out}");
    assert!(l.contains("not reachable directly from here"), "{out}");
    assert!(l.contains("only --ca FILE"), "{out}");

    let target = TlsServer::start_single(&p.server, tls::hold()).unwrap();
    let t = target.addr.to_string();
    let o = doctor(&[&our_url(&proxy), "--target", &t, "--ca", &ca_arg(&p)]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(line(&out, "tls").contains(" pass "), "{out}");
}

#[test]
fn a_bad_ca_file_is_a_usage_error() {
    let Some(p) = pki("doctor-bad-ca") else {
        return;
    };
    let junk = p.dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    for ca in [
        junk.display().to_string(),
        p.dir.join("absent.pem").display().to_string(),
    ] {
        let o = doctor(&[
            "http://127.0.0.1:3128",
            "--target",
            "127.0.0.1:443",
            "--ca",
            &ca,
        ]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("--ca"), "{err}");
    }
    let o = doctor(&[
        "http://127.0.0.1:3128",
        "--target",
        "127.0.0.1:443",
        "--api",
        "http://api:6443",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected https://"));
}

#[test]
fn upgrade_through_our_proxy_reaches_the_api_server() {
    let Some(p) = pki("doctor-api-ours") else {
        return;
    };
    let proxy = our_proxy();
    let target = TlsServer::start(&p.server, tls::hold()).unwrap();
    let (api, heads) = api_server(&p);
    let api_url = format!("https://{}", api.addr);
    let o = doctor(&[
        &our_url(&proxy),
        "--target",
        &target.addr.to_string(),
        "--api",
        &api_url,
        "--ca",
        &ca_arg(&p),
        "--json",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{out}");
    let c = json_check(&out, "upgrade");
    assert!(c.contains(r#""outcome":"pass""#), "{out}");
    assert!(
        c.contains("SPDY/3.1: 101 Switching Protocols; websocket: 101 Switching Protocols"),
        "{out}"
    );
    assert!(c.contains("chains to --ca"), "{out}");
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[0].contains("\r\nUpgrade: SPDY/3.1\r\n"), "{heads:?}");
    assert!(heads[1].contains("\r\nUpgrade: websocket\r\n"), "{heads:?}");
    assert!(
        heads[0].starts_with(
            "GET /api/v1/namespaces/default/pods/x/exec?command=true&stdout=true HTTP/1.1\r\n"
        ),
        "{heads:?}"
    );
}

/// One squid at a time: each starts helpers and a certificate database of its own.
static SQUID: Mutex<()> = Mutex::new(());

/// squid with its own CA, and behind it a TLS target and the API server, from the route's CA.
struct SquidScene {
    squid: splice_proxy_tests::peers::Daemon,
    _servers: [TlsServer; 2],
    p: Pki,
    /// `--target`.
    target: String,
    /// `--api`.
    api: String,
    heads: Heads,
    /// Last: released once squid is gone.
    _one: std::sync::MutexGuard<'static, ()>,
}

impl SquidScene {
    /// `None` with a line saying why when openssl is missing or this squid cannot bump.
    fn start(tag: &str, mode: SslBump) -> Option<SquidScene> {
        let one = SQUID.lock().unwrap_or_else(|e| e.into_inner());
        let p = pki(tag)?;
        if let Some(why) = squid::cannot_bump() {
            eprintln!("skipped: {why}");
            return None;
        }
        let ca = tls::make_ca(p.dir.path(), "squid-ca", SQUID_CA).unwrap();
        let squid = squid::start(p.dir.path(), mode, &ca, &p.ca.cert).unwrap();
        let target = TlsServer::start(&p.server, tls::hold()).unwrap();
        let (api, heads) = api_server(&p);
        Some(SquidScene {
            target: target.addr.to_string(),
            api: format!("https://{}", api.addr),
            heads,
            squid,
            p,
            _servers: [target, api],
            _one: one,
        })
    }

    /// doctor through this squid (an open proxy: no credentials) to the target.
    fn doctor(&self, extra: &[&str]) -> (Option<i32>, String) {
        let url = format!("http://{}", self.squid.addr);
        let mut args = vec![url.as_str(), "--target", &self.target];
        args.extend_from_slice(extra);
        let o = doctor(&args);
        (o.status.code(), text(&o))
    }
}

#[test]
fn squid_bump_is_interception_named_and_strips_upgrade() {
    let Some(s) = SquidScene::start("doctor-squid-bump", SslBump::Bump) else {
        return;
    };
    let (code, out) = s.doctor(&["--ca", &ca_arg(&s.p), "--api", &s.api]);
    assert_eq!(code, Some(1), "{out}\n{}", s.squid.log_report());
    let l = line(&out, "tls");
    assert!(l.contains(" fail "), "{out}");
    assert!(l.contains(&format!("issued by CN={SQUID_CA}")), "{out}");
    assert!(
        l.contains("does not chain to --ca") && l.contains("intercepts TLS"),
        "{out}"
    );
    let l = line(&out, "upgrade");
    assert!(l.contains(" fail "), "{out}\n{}", s.squid.log_report());
    assert!(l.contains("Upgrade request required"), "{out}");
    assert!(l.contains("did not reach the API server"), "{out}");
    // squid re-sent the exec requests itself, without the Upgrade header.
    let heads = s.heads.lock().unwrap().clone();
    assert!(!heads.is_empty(), "{}", s.squid.log_report());
    assert!(
        heads
            .iter()
            .all(|h| !h.to_ascii_lowercase().contains("\nupgrade:")),
        "{heads:?}"
    );

    // Without --ca, the chain the target presents directly shows the same.
    let (code, out) = s.doctor(&[]);
    assert_eq!(code, Some(1), "{out}");
    let l = line(&out, "tls");
    assert!(l.contains(" fail "), "{out}");
    assert!(
        l.contains(&format!("issued by CN={SQUID_CA}"))
            && l.contains(&format!(
                "the target itself presents one issued by CN={ROUTE_CA}"
            )),
        "{out}"
    );
}

#[test]
fn squid_splice_leaves_tls_and_upgrade_alone() {
    let Some(s) = SquidScene::start("doctor-squid-splice", SslBump::Splice) else {
        return;
    };
    let (code, out) = s.doctor(&["--ca", &ca_arg(&s.p), "--api", &s.api, "--idle", "1s"]);
    assert_eq!(code, Some(0), "{out}\n{}", s.squid.log_report());
    assert!(line(&out, "tls").contains(" pass "), "{out}");
    assert!(line(&out, "upgrade").contains(" pass "), "{out}");
    // squid's read_timeout is 15 minutes by default; it closes a tunnel both ways on the
    // client's FIN (measured: squid 5.7, with and without ssl_bump splice).
    assert!(line(&out, "idle").contains(" pass "), "{out}");
    let l = line(&out, "half-close");
    assert!(l.contains(" info ") && l.contains("not honoured"), "{out}");
}

/// How long the idle line says the tunnel stayed open before its cut, in seconds.
fn cut_after(idle: &str) -> f64 {
    let rest = idle
        .split("closed after ")
        .nth(1)
        .unwrap_or_else(|| panic!("no cut time in {idle}"));
    rest.split(" s of silence").next().unwrap().parse().unwrap()
}

/// The migration's real target: a stunnel server (self-signed) in front of an rsync daemon,
/// in `dir`. `None`, with a line saying why, when stunnel or rsync is missing.
fn stunnel_rsyncd(dir: &TempDir) -> Option<[splice_proxy_tests::peers::Daemon; 2]> {
    use splice_proxy_tests::peers;
    if let Err(e) = require_tools(&["stunnel", "rsync", "openssl"]) {
        eprintln!("skipped: {e}");
        return None;
    }
    let module = dir.join("module");
    std::fs::create_dir_all(&module).unwrap();
    let rsyncd = peers::rsyncd(dir.path(), "m", &module).unwrap();
    let cert = peers::self_signed_cert(dir.path()).unwrap();
    let stunnel = peers::stunnel_server(dir.path(), &cert, rsyncd.addr).unwrap();
    Some([stunnel, rsyncd])
}

#[test]
fn our_proxy_keeps_a_quiet_tunnel_to_stunnel_and_honours_half_close() {
    let dir = TempDir::new("doctor-idle-ours").unwrap();
    let Some([stunnel, _rsyncd]) = stunnel_rsyncd(&dir) else {
        return;
    };
    let proxy = our_proxy();
    let t = stunnel.addr.to_string();
    let o = doctor(&[&our_url(&proxy), "--target", &t, "--idle", "3s"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stunnel.log_report());
    let l = line(&out, "idle");
    assert!(l.contains(" pass "), "{out}");
    assert!(
        l.contains("open through 3.0 s of silence")
            && l.contains("the target's close_notify came back"),
        "{out}"
    );
    let l = line(&out, "half-close");
    assert!(
        l.contains(" pass ") && l.contains("honoured: 3 times"),
        "{out}"
    );
    assert!(l.contains("ServerHello still came back"), "{out}");
    assert!(!out.contains(PASS) && !out.contains(PASS_IN_URL), "{out}");
}

#[test]
fn our_proxys_idle_timeout_is_an_idle_cut() {
    let Some(p) = pki("doctor-idle-timeout") else {
        return;
    };
    let target = TlsServer::start(&p.server, tls::hold()).unwrap();
    let creds = format!("{USER}:{PASS}");
    let mut args = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--credentials", &creds, "--idle-timeout", "2s"]);
    let proxy = Proxy::start(&args).unwrap();
    let o = doctor(&[
        &our_url(&proxy),
        "--target",
        &target.addr.to_string(),
        "--idle",
        "4s",
        "--json",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains(r#""ok":false"#), "{out}");
    let c = json_check(&out, "idle");
    assert!(c.contains(r#""outcome":"fail""#), "{out}");
    assert!(c.contains("(the client saw a FIN)"), "{out}");
    let after = cut_after(c);
    assert!((1.8..3.5).contains(&after), "cut after {after} s: {out}");
    assert!(
        json_check(&out, "half-close").contains(r#""outcome":"pass""#),
        "{out}"
    );
}

#[test]
fn tinyproxy_timeout_is_an_idle_cut_and_it_does_not_honour_half_close() {
    let Some(p) = pki("doctor-idle-tinyproxy") else {
        return;
    };
    if let Err(e) = require_tools(&["tinyproxy"]) {
        eprintln!("skipped: {e}");
        return;
    }
    let tiny = splice_proxy_tests::peers::tinyproxy_with_timeout(p.dir.path(), 2).unwrap();
    let target = TlsServer::start(&p.server, tls::hold()).unwrap();
    let t = target.addr.to_string();
    let o = doctor(&[
        &format!("http://{}", tiny.addr),
        "--target",
        &t,
        "--idle",
        "4s",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", tiny.log_report());
    assert!(line(&out, "connect").contains(" pass "), "{out}");
    let l = line(&out, "idle");
    assert!(l.contains(" fail ") && l.contains("idle cut"), "{out}");
    assert!(l.contains("(the client saw a FIN)"), "{out}");
    assert!(l.contains("sooner than the 4.0 s of --idle"), "{out}");
    assert!(l.contains("tinyproxy: Timeout"), "{out}");
    let after = cut_after(l);
    assert!((1.8..3.5).contains(&after), "cut after {after} s: {out}");
    let l = line(&out, "half-close");
    assert!(l.contains(" info ") && l.contains("not honoured"), "{out}");
    assert!(out.ends_with("verdict: this proxy cannot carry a migration as it is\n"));
}

/// A listener on loopback that runs `each` on every connection, a thread each.
fn serve_each(each: impl Fn(TcpStream) + Copy + Send + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || each(s));
        }
    });
    addr
}

/// A CONNECT proxy that forgets a tunnel quiet for `quiet`, as a firewall or NAT does: from
/// then on it passes nothing, either way, and closes nothing.
fn forgetful_proxy(quiet: Duration) -> SocketAddr {
    serve_each(move |client| forget_after(client, quiet))
}

fn forget_after(mut client: TcpStream, quiet: Duration) {
    let head = tls::read_request_head(&mut client);
    let Some(Ok(upstream)) = head.split_whitespace().nth(1).map(TcpStream::connect) else {
        return;
    };
    let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
    let last = Arc::new(Mutex::new(Instant::now()));
    let relay = move |mut from: TcpStream, mut to: TcpStream, last: Arc<Mutex<Instant>>| {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            let mut seen = last.lock().unwrap();
            if seen.elapsed() > quiet {
                continue;
            }
            *seen = Instant::now();
            drop(seen);
            if n == 0 {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            if to.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    };
    let (c, u, l) = (
        client.try_clone().unwrap(),
        upstream.try_clone().unwrap(),
        last.clone(),
    );
    std::thread::spawn(move || relay(c, u, l));
    relay(upstream, client, last);
}

#[test]
fn a_tunnel_dropped_silently_is_found_by_comparing_with_a_fresh_one() {
    let Some(p) = pki("doctor-idle-forgetful") else {
        return;
    };
    let target = TlsServer::start(&p.server, tls::hold()).unwrap();
    let proxy = forgetful_proxy(Duration::from_millis(500));
    let o = doctor(&[
        &format!("http://{proxy}"),
        "--target",
        &target.addr.to_string(),
        "--idle",
        "1s",
        "--timeout",
        "2s",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let l = line(&out, "idle");
    assert!(l.contains(" fail "), "{out}");
    assert!(
        l.contains("no close during 1.0 s of silence")
            && l.contains("nothing came back")
            && l.contains("on a fresh tunnel it answers at once")
            && l.contains("dropped the quiet tunnel"),
        "{out}"
    );
}

/// A plain TCP echo service.
fn echo_target() -> SocketAddr {
    serve_each(|s| {
        let mut back = s.try_clone().unwrap();
        let _ = std::io::copy(&mut &s, &mut back);
    })
}

#[test]
fn throughput_through_our_proxy_needs_an_echo() {
    let proxy = our_proxy();
    let echo = echo_target().to_string();
    let o = doctor(&[
        &our_url(&proxy),
        "--target",
        &echo,
        "--throughput-mib",
        "32",
        "--idle",
        "1s",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    // An echo is no TLS endpoint: no silence to measure, and no ClientHello answered.
    let l = line(&out, "idle");
    assert!(
        l.contains(" cannot tell ") && l.contains("no TLS handshake"),
        "{out}"
    );
    let l = line(&out, "half-close");
    assert!(
        l.contains(" cannot tell ") && l.contains("not run"),
        "{out}"
    );
    let l = line(&out, "throughput");
    assert!(l.contains(" pass "), "{out}");
    assert!(
        l.contains("32 MiB (33554432 bytes) sent and echoed back intact in "),
        "{out}"
    );
    let mb_s: f64 = l
        .split(" s: ")
        .nth(1)
        .and_then(|r| r.split(" MB/s").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MB/s in {l}"));
    assert!(mb_s > 0.0, "{out}");
    assert!(l.contains(" Gbit/s) each way"), "{out}");

    // A TLS target answers the bytes with an alert: no echo, no figure.
    let Some(p) = pki("doctor-throughput-tls") else {
        return;
    };
    let tls_target = TlsServer::start(&p.server, tls::hold()).unwrap();
    let t = tls_target.addr.to_string();
    let o = doctor(&[
        &our_url(&proxy),
        "--target",
        &t,
        "--throughput-mib",
        "1",
        "--json",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "cannot tell is no failure: {out}");
    let c = json_check(&out, "throughput");
    assert!(c.contains(r#""outcome":"cannot tell""#), "{out}");
    assert!(c.contains("the target does not echo"), "{out}");
}
