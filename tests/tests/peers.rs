//! splice-proxy against the real clients it is built for, per data path:
//!
//! - rsync through stunnel (client, `protocol = connect`) -> splice-proxy ->
//!   stunnel (server) -> rsyncd, pushing and pulling a generated tree and
//!   comparing the sha256 of every file;
//! - curl `--proxytunnel` with Basic credentials to `openssl s_server`;
//! - `openssl s_client -proxy` with `-proxy_user`/`-proxy_pass`.
//!
//! Needs the Debian packages stunnel4, rsync, curl, openssl.
//! `SPLICE_PEERS_LARGE_MIB` sets the size of the large files in the rsync
//! tree (default 640 MiB, plus 3,000 small files).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use splice_proxy_tests::peers::{
    self, Cert, Daemon, Manifest, TempDir, TreeSpec, hash_tree, manifest_bytes, require_tools, run,
    run_ok,
};
use splice_proxy_tests::{Proxy, TEST_POLICY, modes};

/// Credentials used everywhere: the password contains ':' on purpose, and
/// both are distinctive so the logs can be searched for them.
const USER: &str = "peer-user-7f3a";
const PASS: &str = "s3:cr3t:Pw-9qX";
const WRONG_PASS: &str = "s3:cr3t:WRONG-4kZ";

fn start_proxy(mode: &str) -> Result<Proxy> {
    let creds = format!("{USER}:{PASS}");
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--mode", mode, "--credentials", &creds]);
    Proxy::start(&args)
}

/// Last `n` lines of a log, for failure messages.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn proxy_report(proxy: &Proxy) -> String {
    format!(
        "===== splice-proxy ({}) log:\n{}",
        proxy.addr,
        tail(&proxy.log().join("\n"), 60)
    )
}

fn reports(proxy: &Proxy, daemons: &[&Daemon]) -> String {
    let mut s = proxy_report(proxy);
    for d in daemons {
        s.push('\n');
        s.push_str(&tail(&d.log_report(), 60));
    }
    s
}

/// Secrets must never reach the proxy's log, in clear or as the Basic token.
fn assert_no_secrets(proxy: &Proxy, secrets: &[&str]) -> Result<()> {
    let log = proxy.log().join("\n");
    for secret in secrets {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{secret}"));
        ensure!(
            !log.contains(secret),
            "password {secret:?} appears in the proxy log"
        );
        ensure!(
            !log.contains(&token),
            "Basic token for {secret:?} appears in the proxy log"
        );
        // Also the part after the first ':' (a parser that splits on the last one).
        let tail = secret.split_once(':').map_or(*secret, |(_, t)| t);
        ensure!(
            !log.contains(tail),
            "part of password {secret:?} ({tail:?}) appears in the proxy log"
        );
    }
    Ok(())
}

/// Waits (the access log is written when the tunnel ends) until a proxy log
/// line names `USER` together with `target_port` and a 200 status.
fn wait_access_log(proxy: &Proxy, target_port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let port = target_port.to_string();
    let user = format!("user=\"{USER}\"");
    // Whole fields: a bare "407" would also match a port such as 44407.
    let target = format!(":{port}\"");
    loop {
        if proxy
            .log()
            .iter()
            .any(|l| l.contains(&user) && l.contains(&target) && l.contains(" status=200 "))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no proxy log line names user {USER:?}, target port {port} and status 200");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn rsync(args: &[&str], src: &str, dst: &str) -> Result<Duration> {
    let t = Instant::now();
    run_ok(
        Command::new("rsync").args(args).arg(src).arg(dst),
        None,
        Duration::from_secs(600),
    )?;
    Ok(t.elapsed())
}

struct RsyncFixture {
    dir: TempDir,
    cert: Cert,
    src: std::path::PathBuf,
    module: std::path::PathBuf,
    expected: Manifest,
    rsyncd: Daemon,
    server: Daemon,
}

impl RsyncFixture {
    /// A generated tree, rsyncd with a writable module `mod`, and a stunnel server on
    /// `server_addr` in front of it.
    fn new(tag: &str, spec: &TreeSpec, server_addr: std::net::SocketAddr) -> Result<RsyncFixture> {
        let dir = TempDir::new(tag)?;
        let cert = peers::self_signed_cert(dir.path())?;
        let src = dir.join("src");
        let t = Instant::now();
        let expected = peers::generate_tree(&src, spec)?;
        eprintln!(
            "generated {} files, {:.1} MB in {:.1} s",
            expected.len(),
            manifest_bytes(&expected) as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        let module = dir.join("module");
        fs::create_dir_all(&module)?;
        let rsyncd = peers::rsyncd(dir.path(), "mod", &module)?;
        let server = peers::stunnel_server_at(dir.path(), &cert, rsyncd.addr, server_addr)?;
        Ok(RsyncFixture {
            dir,
            cert,
            src,
            module,
            expected,
            rsyncd,
            server,
        })
    }
}

/// Pushes the tree through the stunnel client `client` to the module dir
/// `label`, pulls it back, compares both copies with the source, prints the
/// throughput. `context` renders the logs for a failure message.
fn rsync_round(
    fx: &RsyncFixture,
    label: &str,
    client: &Daemon,
    context: &dyn Fn() -> String,
) -> Result<()> {
    let logs = |e: anyhow::Error| anyhow::anyhow!("{e:#}\n{}", context());
    let bytes = manifest_bytes(&fx.expected);
    let sub: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let url = format!("rsync://{}/mod/{sub}/", client.addr);

    let push = rsync(&["-a"], &format!("{}/", fx.src.display()), &url).map_err(logs)?;
    let pushed = fx.module.join(&sub);
    let got = hash_tree(&pushed)?;
    peers::compare_manifests(&fx.expected, &got)
        .context("push: daemon side differs from the source")
        .map_err(logs)?;

    let pulled = fx.dir.join(format!("pulled-{sub}"));
    let pull = rsync(&["-a"], &url, &format!("{}/", pulled.display())).map_err(logs)?;
    let got = hash_tree(&pulled)?;
    peers::compare_manifests(&fx.expected, &got)
        .context("pull: client side differs from the source")
        .map_err(logs)?;
    fs::remove_dir_all(&pushed)?;
    fs::remove_dir_all(&pulled)?;

    eprintln!(
        "rsync over stunnel, {label}: {} files, {:.1} MB; \
         push {:.2} s = {:.0} MB/s, pull {:.2} s = {:.0} MB/s",
        fx.expected.len(),
        bytes as f64 / 1e6,
        push.as_secs_f64(),
        mb_per_s(bytes, push),
        pull.as_secs_f64(),
        mb_per_s(bytes, pull)
    );
    Ok(())
}

/// Baseline without the proxy: stunnel client -> stunnel server -> rsyncd.
/// Checks the peers themselves and gives the reference throughput.
fn rsync_direct(fx: &RsyncFixture) -> Result<()> {
    let client = peers::stunnel_client(
        fx.dir.path(),
        "stunnel-client-direct",
        None,
        fx.server.addr,
        None,
        &fx.cert.cert,
    )?;
    let context = || {
        [&client, &fx.server, &fx.rsyncd]
            .iter()
            .map(|d| tail(&d.log_report(), 60))
            .collect::<Vec<_>>()
            .join("\n")
    };
    rsync_round(fx, "direct (no proxy)", &client, &context)
}

/// One data path: stunnel client -> splice-proxy (Basic auth) -> stunnel
/// server -> rsyncd, then the access-log and secret checks.
fn rsync_mode(fx: &RsyncFixture, mode: &str) -> Result<()> {
    let proxy = start_proxy(mode)?;
    let client = peers::stunnel_client(
        fx.dir.path(),
        &format!("stunnel-client-{mode}"),
        Some(proxy.addr),
        fx.server.addr,
        Some((USER, PASS)),
        &fx.cert.cert,
    )?;
    let context = || reports(&proxy, &[&client, &fx.server, &fx.rsyncd]);
    rsync_round(fx, &format!("mode {mode}"), &client, &context)?;
    let logs = |e: anyhow::Error| anyhow::anyhow!("{e:#}\n{}", context());
    wait_access_log(&proxy, fx.server.addr.port()).map_err(logs)?;
    assert_no_secrets(&proxy, &[PASS]).map_err(logs)?;
    Ok(())
}

#[test]
fn rsync_through_stunnel_and_proxy() -> Result<()> {
    require_tools(&["stunnel", "rsync", "openssl"])?;
    let modes = modes();
    let large_mib = std::env::var("SPLICE_PEERS_LARGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(640);
    let fx = RsyncFixture::new("rsync", &TreeSpec::new(large_mib, 3000), peers::free_addr())?;
    // The peers alone first: if this fails, the proxy is not to blame.
    rsync_direct(&fx).context("baseline without the proxy")?;

    let mut failures = Vec::new();
    for mode in &modes {
        if let Err(e) = rsync_mode(&fx, mode) {
            failures.push(format!("mode {mode}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

/// MTC's own stunnel client configuration (see `peers::stunnel_client_mtc`) on an IPv6
/// NodePort-style route, `protocolHost = ::1:<port>` unbracketed as the template writes it,
/// carrying rsync to rsyncd in every data path: once with credentials (lower-case `basic`),
/// once with empty credentials (no `Proxy-Authorization` at all) against an anonymous proxy
/// that only `--allow-src 127.0.0.1/32` restricts.
#[test]
fn rsync_through_stunnel_configured_as_mtc_writes_it() -> Result<()> {
    require_tools(&["stunnel", "rsync", "openssl"])?;
    let v6: std::net::SocketAddr = format!("[::1]:{}", splice_proxy_tests::free_port()).parse()?;
    let fx = RsyncFixture::new("mtc", &TreeSpec::new(24, 200), v6)?;
    let protocol_host = format!("::1:{}", v6.port());
    let mut failures = Vec::new();
    for mode in modes() {
        for anonymous in [false, true] {
            let creds = format!("{USER}:{PASS}");
            let mut args = vec![
                "--allow-dst",
                "::1",
                "--allow-port",
                "1-65535",
                "--mode",
                &mode,
            ];
            if anonymous {
                args.extend_from_slice(&["--allow-anonymous", "--allow-src", "127.0.0.1/32"]);
            } else {
                args.extend_from_slice(&["--credentials", &creds]);
            }
            let label = format!(
                "mode {mode}, MTC template, {}",
                if anonymous { "no credentials" } else { "basic" }
            );
            let run = || -> Result<()> {
                let proxy = Proxy::start(&args)?;
                let client = peers::stunnel_client_mtc(
                    fx.dir.path(),
                    &format!("stunnel-mtc-{mode}-{anonymous}"),
                    proxy.addr,
                    &protocol_host,
                    if anonymous { ("", "") } else { (USER, PASS) },
                    &fx.cert.cert,
                    "::1",
                )?;
                let context = || reports(&proxy, &[&client, &fx.server, &fx.rsyncd]);
                rsync_round(&fx, &label, &client, &context)?;
                let line = proxy
                    .wait_for_log(" status=200 ", Duration::from_secs(10))
                    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", context()))?;
                let target = format!("target=\"[::1]:{}\"", v6.port());
                ensure!(line.contains(&target), "want {target}: {line}");
                let user = if anonymous {
                    "user=\"-\"".to_string()
                } else {
                    format!("user=\"{USER}\"")
                };
                ensure!(line.contains(&user), "want {user}: {line}");
                assert_no_secrets(&proxy, &[PASS])?;
                Ok(())
            };
            if let Err(e) = run() {
                failures.push(format!("{label}: {e:#}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

#[test]
fn stunnel_with_wrong_password_gets_nothing_through() -> Result<()> {
    require_tools(&["stunnel", "rsync", "openssl"])?;
    let dir = TempDir::new("stunnel-407")?;
    let cert = peers::self_signed_cert(dir.path())?;
    let module = dir.join("module");
    fs::create_dir_all(&module)?;
    let rsyncd = peers::rsyncd(dir.path(), "mod", &module)?;
    let server = peers::stunnel_server(dir.path(), &cert, rsyncd.addr)?;
    for mode in modes() {
        let proxy = start_proxy(&mode)?;
        let client = peers::stunnel_client(
            dir.path(),
            &format!("stunnel-client-{mode}"),
            Some(proxy.addr),
            server.addr,
            Some((USER, WRONG_PASS)),
            &cert.cert,
        )?;
        let out = run(
            Command::new("rsync").arg(format!("rsync://{}/", client.addr)),
            None,
            Duration::from_secs(60),
        )?;
        let ctx = || reports(&proxy, &[&client, &server]);
        assert!(
            !out.status.success(),
            "mode {mode}: rsync listed modules through a proxy that should have refused: {out:?}\n{}",
            ctx()
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("mod"),
            "mode {mode}: module list leaked through: {out:?}"
        );
        // stunnel logs the proxy's status line when CONNECT fails.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !client.log().contains("407") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            client.log().contains("407"),
            "mode {mode}: stunnel did not see a 407\n{}",
            ctx()
        );
        assert_no_secrets(&proxy, &[WRONG_PASS]).unwrap_or_else(|e| panic!("{e:#}\n{}", ctx()));
    }
    Ok(())
}

/// s_server serving a docroot with a known file; returns its content too.
fn www_fixture(tag: &str) -> Result<(TempDir, Cert, Daemon, Vec<u8>)> {
    let dir = TempDir::new(tag)?;
    let cert = peers::self_signed_cert(dir.path())?;
    let docroot = dir.join("www");
    fs::create_dir_all(&docroot)?;
    let body = peers::write_text_file(&docroot.join("page.txt"), 3 * 1024 * 1024 + 7, 42)?;
    let server = peers::openssl_www(dir.path(), &cert, &docroot)?;
    Ok((dir, cert, server, body))
}

/// What `openssl s_server -WWW` sends for a text file.
fn www_response(body: &[u8]) -> Vec<u8> {
    let mut v = b"HTTP/1.0 200 ok\r\nContent-type: text/plain\r\n\r\n".to_vec();
    v.extend_from_slice(body);
    v
}

fn curl(
    proxy: &Proxy,
    proxy_user: Option<&str>,
    cacert: &Path,
    url: &str,
) -> Result<std::process::Output> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--proxytunnel", "--proxy-basic"])
        .arg("-x")
        .arg(format!("http://{}", proxy.addr))
        .arg("--cacert")
        .arg(cacert)
        .args(["--max-time", "60"])
        .arg(url);
    if let Some(u) = proxy_user {
        cmd.arg("--proxy-user").arg(u);
    }
    run(&mut cmd, None, Duration::from_secs(90))
}

#[test]
fn curl_proxytunnel_with_basic_auth() -> Result<()> {
    require_tools(&["curl", "openssl"])?;
    let (_dir, cert, server, body) = www_fixture("curl")?;
    let url = format!("https://{}/page.txt", server.addr);
    for mode in modes() {
        let proxy = start_proxy(&mode)?;
        let ctx = || reports(&proxy, &[&server]);

        let out = curl(&proxy, Some(&format!("{USER}:{PASS}")), &cert.cert, &url)?;
        assert!(
            out.status.success(),
            "mode {mode}: curl failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            ctx()
        );
        assert!(
            out.stdout == body,
            "mode {mode}: body differs: got {} bytes, expected {}\n{}",
            out.stdout.len(),
            body.len(),
            ctx()
        );

        for (what, user) in [
            ("wrong password", Some(format!("{USER}:{WRONG_PASS}"))),
            ("no credentials", None),
        ] {
            let out = curl(&proxy, user.as_deref(), &cert.cert, &url)?;
            let err = String::from_utf8_lossy(&out.stderr);
            // 56: "CONNECT tunnel failed, response 407".
            assert!(
                out.status.code() == Some(56) && err.contains("407") && out.stdout.is_empty(),
                "mode {mode}, {what}: expected curl exit 56 with a 407, got {:?}: {err}\n{}",
                out.status.code(),
                ctx()
            );
        }
        wait_access_log(&proxy, server.addr.port()).unwrap_or_else(|e| panic!("{e:#}\n{}", ctx()));
        assert_no_secrets(&proxy, &[PASS, WRONG_PASS])
            .unwrap_or_else(|e| panic!("{e:#}\n{}", ctx()));
    }
    Ok(())
}

fn s_client(
    proxy: &Proxy,
    server: &Daemon,
    cacert: &Path,
    pass: &str,
    path: &str,
) -> Result<std::process::Output> {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-proxy")
        .arg(proxy.addr.to_string())
        .args([
            "-proxy_user",
            USER,
            "-proxy_pass",
            "env:SPLICE_PEERS_PROXY_PASS",
        ])
        .env("SPLICE_PEERS_PROXY_PASS", pass)
        .arg("-connect")
        .arg(server.addr.to_string())
        .arg("-CAfile")
        .arg(cacert)
        .args(["-verify_return_error", "-verify_ip", "127.0.0.1", "-quiet"]);
    let request = format!("GET /{path} HTTP/1.0\r\n\r\n");
    run(&mut cmd, Some(request.as_bytes()), Duration::from_secs(60))
}

#[test]
fn openssl_s_client_through_proxy() -> Result<()> {
    require_tools(&["openssl"])?;
    let (_dir, cert, server, body) = www_fixture("s_client")?;
    let expected = www_response(&body);
    for mode in modes() {
        let proxy = start_proxy(&mode)?;
        let ctx = || reports(&proxy, &[&server]);

        let out = s_client(&proxy, &server, &cert.cert, PASS, "page.txt")?;
        assert!(
            out.status.success() && out.stdout == expected,
            "mode {mode}: s_client exit {:?}, {} bytes out (expected {}): {}\n{}",
            out.status.code(),
            out.stdout.len(),
            expected.len(),
            String::from_utf8_lossy(&out.stderr),
            ctx()
        );

        let out = s_client(&proxy, &server, &cert.cert, WRONG_PASS, "page.txt")?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && out.stdout.is_empty() && err.contains("407"),
            "mode {mode}: wrong password: s_client exit {:?}, {} bytes out: {err}\n{}",
            out.status.code(),
            out.stdout.len(),
            ctx()
        );
        wait_access_log(&proxy, server.addr.port()).unwrap_or_else(|e| panic!("{e:#}\n{}", ctx()));
        assert_no_secrets(&proxy, &[PASS, WRONG_PASS])
            .unwrap_or_else(|e| panic!("{e:#}\n{}", ctx()));
    }
    Ok(())
}
