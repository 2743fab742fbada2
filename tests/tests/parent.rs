//! splice-proxy chained to a parent proxy (`--parent-proxy`), end to end on loopback:
//!
//! - a real squid parent that wants Basic credentials (`basic_ncsa_auth`, an htpasswd made
//!   here), in every data path: several MiB both ways through it, sha256 compared, the access
//!   log and `/metrics` naming the parent, squid's log naming the user; and stunnel →
//!   splice-proxy → squid → stunnel → rsyncd with every file's checksum compared;
//! - tinyproxy as the parent (no credentials);
//! - the parent's refusals on the wire: wrong credentials (407 → 502), a destination it denies
//!   (403 → 502), a parent that is down (→ 502), one that never answers (→ 504 at
//!   `--connect-timeout`), each with a `Proxy-Status` that names the parent and its status;
//! - bytes a parent sends in the same write as its `200` reach the client, in order, in every
//!   data path;
//! - a bypassed destination is connected directly: the parent sees nothing of it;
//! - `--parent-proxy-credentials` rewritten: the next tunnel uses the new password;
//! - the torture suite's byte checks (random chunks both ways at once, half-close in either
//!   order, a slow reader) through a parent of the test's that relays and honours half-close
//!   (squid and tinyproxy end a tunnel at the first FIN), in every data path.
//!
//! Needs squid (squid-openssl is fine), tinyproxy, stunnel4, rsync, openssl.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};
use splice_proxy_tests::peers::{self, Daemon, TempDir, TreeSpec, require_tools, run_ok};
use splice_proxy_tests::rawhttp::{self, Response};
use splice_proxy_tests::torture::{Pattern, Side, TunnelSpec, Upstream, run_tunnel};
use splice_proxy_tests::{Proxy, TEST_POLICY, access_field, modes, squid};

/// The parent's user and password: the password holds ':' and '@', percent-encoded in the URL.
const PARENT_USER: &str = "corp-user-5e1";
const PARENT_PASS: &str = "p@r:ent-Pw-8zQ";
const PARENT_PASS_URL: &str = "p%40r%3Aent-Pw-8zQ";
const WRONG_PASS: &str = "wr0ng-Pw-3kT";

/// What a server behind the parent says first; the fake parent sends it with its `200`.
const BANNER: &[u8] = b"SSH-2.0-OpenSSH_9.2p1 parent-test banner\r\n";

/// A squid parent proxy with Basic auth; it refuses CONNECTs to `deny_port` with 403.
struct SquidParent {
    dir: TempDir,
    squid: Daemon,
    deny_port: u16,
}

impl SquidParent {
    fn start() -> Result<SquidParent> {
        require_tools(&["openssl"])?;
        let dir = TempDir::new("parent-squid")?;
        let out = run_ok(
            Command::new("openssl").args(["passwd", "-apr1", PARENT_PASS]),
            None,
            Duration::from_secs(10),
        )?;
        let hash = String::from_utf8(out.stdout)?;
        let htpasswd = dir.join("htpasswd");
        fs::write(&htpasswd, format!("{PARENT_USER}:{}\n", hash.trim()))?;
        let deny_port = rawhttp::closed_port();
        let squid = squid::start_parent(dir.path(), &htpasswd, deny_port)?;
        Ok(SquidParent {
            dir,
            squid,
            deny_port,
        })
    }

    fn url(&self, pass: &str) -> String {
        format!("http://{PARENT_USER}:{pass}@{}", self.squid.addr)
    }
}

/// `splice-proxy run` with the test policy, anonymous clients, `mode`, the parent at `url`
/// and a 2 s connect timeout unless `extra` sets one; `/metrics` on a free port.
fn child(mode: &str, url: &str, extra: &[&str]) -> Result<(Proxy, SocketAddr)> {
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--mode", mode, "--allow-anonymous", "--parent-proxy", url]);
    if !extra.contains(&"--connect-timeout") {
        args.extend_from_slice(&["--connect-timeout", "2s"]);
    }
    args.extend_from_slice(extra);
    Proxy::start_with_metrics(&args)
}

/// Writes `len` pattern bytes into the tunnel while reading them back from the echo upstream
/// behind it; the sha256 of what came back must be that of what went.
fn echo_check(s: &TcpStream, len: usize, seed: u64) -> Result<()> {
    let data = Pattern::new(seed).bytes(0, len);
    let want = Sha256::digest(&data);
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || w.write_all(&data));
    let mut r = s.try_clone()?;
    r.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut got = vec![0u8; len];
    r.read_exact(&mut got).context("reading the echo back")?;
    writer.join().unwrap().context("writing into the tunnel")?;
    ensure!(
        Sha256::digest(&got) == want,
        "{len} bytes came back different"
    );
    Ok(())
}

/// The one access-log event for a tunnel to `target_port`, once logged.
fn access_event(proxy: &Proxy, target_port: u16) -> Result<String> {
    let target = format!(":{target_port}\"");
    let events = proxy.access_events(&[&target], 1, Duration::from_secs(10));
    match events.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!(
            "{} access events for port {target_port}: {other:?}",
            other.len()
        ),
    }
}

fn assert_not_in_log(proxy: &Proxy, secrets: &[&str]) -> Result<()> {
    let log = proxy.log().join("\n");
    for s in secrets {
        ensure!(!log.contains(s), "{s:?} in the proxy log:\n{log}");
    }
    Ok(())
}

#[test]
fn through_a_squid_parent_with_basic_auth_in_every_mode() -> Result<()> {
    let parent = SquidParent::start()?;
    let echo = rawhttp::echo_upstream()?;
    let len = 8 << 20;
    for mode in modes() {
        let (proxy, maddr) = child(&mode, &parent.url(PARENT_PASS_URL), &[])?;
        let s = proxy.connect_tunnel(&echo.addr.to_string(), None)?;
        echo_check(&s, len, 0x5eed ^ len as u64)
            .with_context(|| format!("mode {mode}:\n{}", parent.squid.log_report()))?;
        drop(s);
        let event = access_event(&proxy, echo.addr.port())?;
        ensure!(
            event.contains(&format!("parent=\"{}\"", parent.squid.addr))
                && event.contains(" status=200 ")
                && event.contains(&format!("resolved={}", parent.squid.addr)),
            "mode {mode}: {event}"
        );
        ensure!(
            access_field(&event, "bytes_up") == Some(len as u64)
                && access_field(&event, "bytes_down") == Some(len as u64),
            "mode {mode}: {event}"
        );
        let ok = rawhttp::metric(maddr, "splice_proxy_parent_connects_total{result=\"ok\"}");
        ensure!(ok == 1.0, "mode {mode}: parent_connects ok = {ok}");
        assert_not_in_log(&proxy, &[PARENT_PASS, PARENT_PASS_URL])?;
    }
    // squid saw our user, and every tunnel came through it (logged as each one ends).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let squid_log = parent.squid.log();
        let tunnels = squid_log
            .lines()
            .filter(|l| l.contains(PARENT_USER) && l.contains("CONNECT"))
            .count();
        if tunnels == modes().len() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{tunnels} authenticated CONNECTs in squid's log:\n{squid_log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rsync_through_stunnel_and_a_squid_parent() -> Result<()> {
    require_tools(&["stunnel", "rsync", "openssl"])?;
    let parent = SquidParent::start()?;
    let dir = TempDir::new("parent-rsync")?;
    let cert = peers::self_signed_cert(dir.path())?;
    let src = dir.join("src");
    let expected = peers::generate_tree(&src, &TreeSpec::new(24, 200))?;
    let module = dir.join("module");
    fs::create_dir_all(&module)?;
    let rsyncd = peers::rsyncd(dir.path(), "mod", &module)?;
    let server = peers::stunnel_server(dir.path(), &cert, rsyncd.addr)?;
    for mode in modes() {
        let (proxy, _) = child(&mode, &parent.url(PARENT_PASS_URL), &[])?;
        let client = peers::stunnel_client(
            dir.path(),
            &format!("stunnel-client-{mode}"),
            Some(proxy.addr),
            server.addr,
            None,
            &cert.cert,
        )?;
        let logs = || {
            let mut s = proxy.log().join("\n");
            for d in [&client, &parent.squid, &server, &rsyncd] {
                s.push('\n');
                s.push_str(&d.log_report());
            }
            s
        };
        let url = format!("rsync://{}/mod/{mode}/", client.addr);
        run_ok(
            Command::new("rsync")
                .arg("-a")
                .arg(format!("{}/", src.display()))
                .arg(&url),
            None,
            Duration::from_secs(300),
        )
        .with_context(logs)?;
        peers::compare_manifests(&expected, &peers::hash_tree(&module.join(&mode))?)
            .with_context(|| format!("push, mode {mode}:\n{}", logs()))?;
        let pulled = dir.join(format!("pulled-{mode}"));
        run_ok(
            Command::new("rsync")
                .arg("-a")
                .arg(&url)
                .arg(format!("{}/", pulled.display())),
            None,
            Duration::from_secs(300),
        )
        .with_context(logs)?;
        peers::compare_manifests(&expected, &peers::hash_tree(&pulled)?)
            .with_context(|| format!("pull, mode {mode}:\n{}", logs()))?;
        let events = proxy.access_events(
            &[&format!("parent=\"{}\"", parent.squid.addr), " status=200 "],
            2,
            Duration::from_secs(10),
        );
        ensure!(events.len() >= 2, "mode {mode}: {events:?}\n{}", logs());
        assert_not_in_log(&proxy, &[PARENT_PASS, PARENT_PASS_URL])?;
    }
    Ok(())
}

#[test]
fn through_a_tinyproxy_parent() -> Result<()> {
    require_tools(&["tinyproxy"])?;
    let dir = TempDir::new("parent-tinyproxy")?;
    let tiny = peers::tinyproxy(dir.path())?;
    let echo = rawhttp::echo_upstream()?;
    let (proxy, _) = child("auto", &format!("http://{}", tiny.addr), &[])?;
    let s = proxy.connect_tunnel(&echo.addr.to_string(), None)?;
    echo_check(&s, 4 << 20, 7).with_context(|| tiny.log_report())?;
    drop(s);
    let event = access_event(&proxy, echo.addr.port())?;
    ensure!(
        event.contains(&format!("parent=\"{}\"", tiny.addr)),
        "{event}"
    );
    Ok(())
}

/// A CONNECT to `target` through `proxy`: the response, checked as a failure with `status`.
fn refused(proxy: &Proxy, target: &str, status: u16) -> Result<Response> {
    let (mut s, r) = rawhttp::exchange(proxy.addr, rawhttp::connect_head(target, &[]).as_bytes())?;
    rawhttp::expect_failure(&mut s, &r, status).with_context(|| proxy.log().join("\n"))?;
    Ok(r)
}

/// The refusal names the parent (`next-hop`), and its status when it answered one.
fn names_parent(r: &Response, parent: SocketAddr, status: Option<u16>) -> Result<()> {
    let params = rawhttp::proxy_status_params(r)?;
    let mut want = vec![("next-hop".to_string(), parent.to_string())];
    if let Some(code) = status {
        want.push(("received-status".into(), code.to_string()));
    }
    ensure!(params == want, "{params:?} in {:?}", r.raw);
    Ok(())
}

/// A refusal for a parent that answered `code`: its error type, details that name the parent
/// and the status, and the parameters.
fn parent_answered(r: &Response, error: &str, parent: SocketAddr, code: u16) -> Result<()> {
    let (e, details) = rawhttp::proxy_status(r)?;
    ensure!(e == error, "{:?}", r.raw);
    ensure!(
        details.starts_with(&format!("parent {parent} answered {code} ")),
        "{details}"
    );
    names_parent(r, parent, Some(code))
}

#[test]
fn parent_refusals_on_the_wire() -> Result<()> {
    let parent = SquidParent::start()?;
    let echo = rawhttp::echo_upstream()?;
    let target = echo.addr.to_string();
    let squid = parent.squid.addr;

    // Wrong credentials: squid's 407 becomes our 502.
    let (proxy, maddr) = child("copy", &parent.url(WRONG_PASS), &[])?;
    let r = refused(&proxy, &target, 502)?;
    parent_answered(&r, "proxy_configuration_error", squid, 407)?;
    ensure!(!r.raw.contains(WRONG_PASS), "{:?}", r.raw);
    let refusals = rawhttp::metric(
        maddr,
        "splice_proxy_parent_connects_total{result=\"refused\"}",
    );
    ensure!(refusals == 1.0, "parent_connects refused = {refusals}");
    assert_not_in_log(&proxy, &[WRONG_PASS])?;
    drop(proxy);

    // A destination the parent denies: its 403 becomes our 502.
    let (proxy, _) = child("copy", &parent.url(PARENT_PASS_URL), &[])?;
    let r = refused(&proxy, &format!("127.0.0.1:{}", parent.deny_port), 502)?;
    parent_answered(&r, "http_request_denied", squid, 403)?;
    drop(proxy);

    // A parent that is down.
    let down: SocketAddr = format!("127.0.0.1:{}", rawhttp::closed_port()).parse()?;
    let (proxy, maddr) = child("copy", &format!("http://{down}"), &[])?;
    let r = refused(&proxy, &target, 502)?;
    let (error, details) = rawhttp::proxy_status(&r)?;
    ensure!(error == "connection_refused", "{:?}", r.raw);
    ensure!(details.contains(&format!("parent {down}")), "{details}");
    names_parent(&r, down, None)?;
    let n = rawhttp::metric(
        maddr,
        "splice_proxy_parent_connects_total{result=\"unreachable\"}",
    );
    ensure!(n == 1.0, "parent_connects unreachable = {n}");
    drop(proxy);

    // A parent that accepts and never answers: 504 at --connect-timeout.
    let silent = TcpListener::bind("127.0.0.1:0")?;
    let silent_addr = silent.local_addr()?;
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for s in silent.incoming().flatten() {
                held.lock().unwrap().push(s);
            }
        });
    }
    let (proxy, _) = child(
        "copy",
        &format!("http://{silent_addr}"),
        &["--connect-timeout", "1s"],
    )?;
    let started = Instant::now();
    let r = refused(&proxy, &target, 504)?;
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "504 after {took:?}"
    );
    let (error, details) = rawhttp::proxy_status(&r)?;
    ensure!(error == "http_response_timeout", "{:?}", r.raw);
    ensure!(
        details == format!("no answer from parent {silent_addr} within --connect-timeout"),
        "{details}"
    );
    names_parent(&r, silent_addr, None)?;
    ensure!(
        held.lock().unwrap().len() == 1,
        "the silent parent was not asked"
    );
    Ok(())
}

/// A fake parent: reads one CONNECT head per connection, answers `200` with its banner in the
/// same write, then echoes. Counts the connections.
struct BannerParent {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl BannerParent {
    fn start() -> Result<BannerParent> {
        Self::with_banner(BANNER.to_vec())
    }

    fn with_banner(banner: Vec<u8>) -> Result<BannerParent> {
        let answer: Arc<[u8]> = [&b"HTTP/1.1 200 OK\r\n\r\n"[..], &banner].concat().into();
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (a, h) = (accepted.clone(), heads.clone());
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                a.fetch_add(1, Ordering::SeqCst);
                let (h, answer) = (h.clone(), answer.clone());
                std::thread::spawn(move || {
                    let Ok(head) = splice_proxy_tests::read_response_head(&mut s) else {
                        return;
                    };
                    h.lock().unwrap().push(head);
                    if s.write_all(&answer).is_err() {
                        return;
                    }
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Ok(BannerParent {
            addr,
            accepted,
            heads,
        })
    }
}

#[test]
fn bytes_right_after_the_parents_200_reach_the_client_first_in_every_mode() -> Result<()> {
    // A banner, and 256 KiB in the same write: more than the first read of the answer takes,
    // so the rest is read off the parent's socket before the data path gets it (a partly read
    // segment left there would reach the client twice in sockmap mode).
    for banner in [BANNER.to_vec(), Pattern::new(13).bytes(0, 256 << 10)] {
        banner_reaches_the_client(&banner)?;
    }
    Ok(())
}

fn banner_reaches_the_client(banner: &[u8]) -> Result<()> {
    let parent = BannerParent::with_banner(banner.to_vec())?;
    let len = 2 << 20;
    for mode in modes() {
        let (proxy, _) = child(&mode, &format!("http://{}", parent.addr), &[])?;
        let mut s = proxy.connect_tunnel("127.0.0.1:4443", None)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = vec![0u8; banner.len()];
        s.read_exact(&mut got)
            .with_context(|| format!("mode {mode}: reading the {} banner bytes", banner.len()))?;
        ensure!(
            got == banner,
            "mode {mode}: the {} banner bytes differ",
            banner.len()
        );
        // Then the tunnel carries bytes both ways, after the banner and nothing else.
        echo_check(&s, len, 11).with_context(|| format!("mode {mode}"))?;
        drop(s);
        let event = access_event(&proxy, 4443)?;
        ensure!(
            access_field(&event, "bytes_down") == Some((banner.len() + len) as u64),
            "mode {mode}: {event}"
        );
    }
    let heads = parent.heads.lock().unwrap().clone();
    ensure!(
        heads
            .iter()
            .all(|h| h == "CONNECT 127.0.0.1:4443 HTTP/1.1\r\nHost: 127.0.0.1:4443\r\n\r\n"),
        "{heads:?}"
    );
    Ok(())
}

#[test]
fn a_bypassed_destination_is_connected_directly() -> Result<()> {
    let parent = BannerParent::start()?;
    let echo = rawhttp::echo_upstream()?;
    let echo2 = rawhttp::echo_upstream_at("127.0.0.2:0".parse()?)?;
    let (proxy, _) = child(
        "auto",
        &format!("http://{}", parent.addr),
        &[
            "--parent-proxy-bypass",
            "localhost",
            "--parent-proxy-bypass",
            "127.0.0.2/32",
        ],
    )?;
    // By name (resolved here, to 127.0.0.1) and by network: straight to the echo servers.
    for target in [
        format!("localhost:{}", echo.addr.port()),
        echo2.addr.to_string(),
    ] {
        let s = proxy.connect_tunnel(&target, None)?;
        echo_check(&s, 1 << 20, 3).with_context(|| target.clone())?;
        drop(s);
    }
    ensure!(
        parent.accepted.load(Ordering::SeqCst) == 0,
        "the parent saw a bypassed destination"
    );
    let direct = proxy.access_events(
        &["parent=\"-\"", " status=200 "],
        2,
        Duration::from_secs(10),
    );
    ensure!(direct.len() == 2, "{direct:?}");
    // Anything else goes through the parent.
    let s = proxy.connect_tunnel("127.0.0.1:4443", None)?;
    drop(s);
    ensure!(parent.accepted.load(Ordering::SeqCst) == 1);
    Ok(())
}

#[test]
fn a_rewritten_credentials_file_is_used_by_the_next_tunnel() -> Result<()> {
    let parent = SquidParent::start()?;
    let echo = rawhttp::echo_upstream()?;
    let creds = parent.dir.join("parent-creds");
    fs::write(&creds, format!("{PARENT_USER}:{WRONG_PASS}\n"))?;
    let creds_s = creds.to_str().unwrap();
    let (proxy, _) = child(
        "auto",
        &format!("http://{}", parent.squid.addr),
        &["--parent-proxy-credentials", creds_s],
    )?;
    let r = refused(&proxy, &echo.addr.to_string(), 502)?;
    parent_answered(&r, "proxy_configuration_error", parent.squid.addr, 407)?;

    // As an editor (or kubelet) does it: a new file renamed over the old one.
    let tmp = parent.dir.join("parent-creds.new");
    fs::write(&tmp, format!("{PARENT_USER}:{PARENT_PASS}\n"))?;
    fs::rename(&tmp, &creds)?;
    proxy.wait_for_log(
        "file change: parent proxy credentials reloaded",
        Duration::from_secs(5),
    )?;
    let s = proxy.connect_tunnel(&echo.addr.to_string(), None)?;
    echo_check(&s, 1 << 20, 5)?;
    assert_not_in_log(&proxy, &[PARENT_PASS, WRONG_PASS])?;
    Ok(())
}

#[test]
fn a_bad_parent_url_exits_2_with_one_line_and_no_password() -> Result<()> {
    for (url, needle) in [
        ("http://u:hunter2@proxy.corp", "no port"),
        ("socks5://u:hunter2@proxy.corp:1080", "http://"),
    ] {
        let (code, stderr, _) =
            rawhttp::run_cli(&["run", "--parent-proxy", url], Duration::from_secs(10))?;
        ensure!(code == Some(2), "{url}: exit {code:?}: {stderr}");
        ensure!(
            stderr.trim().lines().count() == 1
                && stderr.contains("--parent-proxy")
                && stderr.contains(needle),
            "{url}: {stderr}"
        );
        ensure!(!stderr.contains("hunter2"), "{stderr}");
    }
    Ok(())
}

/// A parent of the test's that opens what it is asked for: reads the CONNECT head, connects to
/// its target, answers `200`, then relays both ways, each EOF passed on as a shutdown.
fn relaying_parent() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for mut client in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(head) = splice_proxy_tests::read_response_head(&mut client) else {
                    return;
                };
                let target = head.split(' ').nth(1).unwrap_or_default().to_string();
                let Ok(upstream) = TcpStream::connect(&target) else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                    return;
                };
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .is_err()
                {
                    return;
                }
                let relay = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    })
                };
                let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let up = relay(client, upstream);
                let down = relay(u2, c2);
                let _ = (up.join(), down.join());
            });
        }
    });
    Ok(addr)
}

#[test]
fn torture_byte_checks_through_a_parent_in_every_mode() -> Result<()> {
    const MIB: u64 = 1 << 20;
    let parent = relaying_parent()?;
    let up = Upstream::start()?;
    let seed = 0x7061_7265_6e74;
    for mode in modes() {
        let (proxy, _) = child(&mode, &format!("http://{parent}"), &[])?;
        // Both directions at once, random chunks.
        let both = TunnelSpec::symmetric(1, seed, 16 * MIB, 16 * MIB);
        // Half-close, each side first: the other sends half, waits for the EOF, sends the rest.
        let mut specs = vec![both];
        for (id, first) in [(2, Side::Client), (3, Side::Upstream)] {
            let mut spec = TunnelSpec::symmetric(id, seed, 0, 0);
            let (fin_first, later) = match first {
                Side::Client => (&mut spec.c2u, &mut spec.u2c),
                Side::Upstream => (&mut spec.u2c, &mut spec.c2u),
            };
            fin_first.len = 4 * MIB;
            later.len = 8 * MIB;
            later.hold_at = Some(2 * MIB);
            specs.push(spec);
        }
        // A slow reader at the client.
        let mut slow = TunnelSpec::symmetric(4, seed, MIB, 0);
        slow.u2c.len = 4 * MIB;
        slow.u2c.reader_stall_ms = 300;
        slow.u2c.max_read = 16 << 10;
        slow.u2c.reader_sleep_us = 200;
        specs.push(slow);
        for spec in specs {
            run_tunnel(&proxy, &up, &spec)
                .and_then(|run| run.check())
                .with_context(|| format!("mode {mode}, tunnel {}", spec.id))?;
        }
        let through = proxy.access_events(
            &[&format!("parent=\"{parent}\""), " status=200 "],
            4,
            Duration::from_secs(10),
        );
        ensure!(through.len() == 4, "mode {mode}: {through:?}");
    }
    Ok(())
}

#[test]
fn names_for_the_parent_are_not_resolved_here_and_need_a_name_pattern() -> Result<()> {
    let parent = BannerParent::start()?;
    let url = format!("http://{}", parent.addr);
    // The test policy lists only 127.0.0.0/8: it cannot allow a name the parent resolves.
    let (proxy, _) = child("copy", &url, &[])?;
    proxy.wait_for_log(
        "--allow-dst 127.0.0.0/8: with --parent-proxy, names are resolved by the parent",
        Duration::from_secs(5),
    )?;
    let r = refused(&proxy, "db.internal.test:4443", 403)?;
    let (error, details) = rawhttp::proxy_status(&r)?;
    ensure!(error == "http_request_denied", "{:?}", r.raw);
    ensure!(
        details.starts_with("destination db.internal.test matches no --allow-dst name"),
        "{details}"
    );
    ensure!(parent.accepted.load(Ordering::SeqCst) == 0);
    drop(proxy);

    // Listed by name, it goes to the parent without a lookup here (the name resolves nowhere:
    // a local lookup would have been a 502 dns_error).
    let (proxy, _) = child("copy", &url, &["--allow-dst", "*.internal.test"])?;
    let mut s = proxy.connect_tunnel("db.internal.test:4443", None)?;
    let mut got = vec![0u8; BANNER.len()];
    s.read_exact(&mut got)?;
    ensure!(got == BANNER);
    let heads = parent.heads.lock().unwrap().clone();
    ensure!(
        heads == ["CONNECT db.internal.test:4443 HTTP/1.1\r\nHost: db.internal.test:4443\r\n\r\n"],
        "{heads:?}"
    );
    Ok(())
}
