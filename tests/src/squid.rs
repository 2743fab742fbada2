//! squid started by a test, on 127.0.0.1 with a configuration of the test's: an open CONNECT
//! proxy whose `ssl_bump` either splices TLS (tunnels it untouched) or bumps it (terminates it
//! with certificates from a CA of the test's, as a TLS-inspecting corporate proxy does).
//!
//! Bumping needs squid built with OpenSSL: Debian's `squid-openssl` (`cargo xtask setup`
//! installs it); Debian's `squid` is built with GnuTLS and cannot bump. On a machine whose
//! installed squid must stay the GnuTLS one, `SPLICE_TEST_SQUID_ROOT` names a squid-openssl
//! package unpacked with `dpkg -x` (its `usr/sbin/squid` and `usr/lib/squid/` are used).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::peers::{Daemon, free_addr, run_ok};
use crate::tls::Pem;

/// `path` under `SPLICE_TEST_SQUID_ROOT`, or as installed.
fn installed(path: &str) -> PathBuf {
    match std::env::var_os("SPLICE_TEST_SQUID_ROOT") {
        Some(root) => PathBuf::from(root).join(path.trim_start_matches('/')),
        None => PathBuf::from(path),
    }
}

/// The squid binary.
fn squid() -> PathBuf {
    installed("/usr/sbin/squid")
}

/// The certificate generator squid runs as its helper, and initialises its database with.
fn certgen() -> PathBuf {
    installed("/usr/lib/squid/security_file_certgen")
}

/// What squid does with the TLS inside a CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslBump {
    /// `ssl_bump splice all`: the bytes pass untouched.
    Splice,
    /// `ssl_bump bump all`: squid terminates TLS and re-sends each request itself.
    Bump,
}

/// Why squid cannot bump here, when it cannot (no squid, or squid built without OpenSSL).
pub fn cannot_bump() -> Option<String> {
    let out = match Command::new(squid()).arg("-v").output() {
        Ok(o) => o,
        Err(e) => return Some(format!("squid not runnable ({e}): install squid-openssl")),
    };
    let v = String::from_utf8_lossy(&out.stdout);
    if !v.contains("--with-openssl") {
        return Some(
            "this squid is built without OpenSSL and cannot ssl_bump: install squid-openssl \
             (cargo xtask setup does it)"
                .into(),
        );
    }
    if !certgen().exists() {
        return Some(format!(
            "{} missing: install squid-openssl",
            certgen().display()
        ));
    }
    None
}

/// Starts squid in `dir` (which squid's own user must be able to write: it is made world
/// writable) with `ssl_bump` set to `mode`, certificates generated from `squid_ca`, and the
/// servers behind it trusted when they chain to `upstream_ca`.
pub fn start(dir: &Path, mode: SslBump, squid_ca: &Pem, upstream_ca: &Path) -> Result<Daemon> {
    let addr = free_addr();
    let db = dir.join("ssl_db");
    run_ok(
        Command::new(certgen())
            .arg("-c")
            .arg("-s")
            .arg(&db)
            .args(["-M", "4MB"]),
        None,
        Duration::from_secs(30),
    )?;
    // squid drops from root to its own user (`proxy`): it must read the keys and write the db.
    run_ok(
        Command::new("chmod").arg("-R").arg("a+rwX").arg(dir),
        None,
        Duration::from_secs(10),
    )?;
    let action = match mode {
        SslBump::Splice => "splice",
        SslBump::Bump => "bump",
    };
    let mut conf = String::new();
    writeln!(
        conf,
        "http_port {addr} ssl-bump tls-cert={} tls-key={} generate-host-certificates=on \
         dynamic_cert_mem_cache_size=4MB",
        squid_ca.cert.display(),
        squid_ca.key.display()
    )?;
    writeln!(
        conf,
        "sslcrtd_program {} -s {} -M 4MB\nsslcrtd_children 2 startup=1 idle=1",
        certgen().display(),
        db.display()
    )?;
    writeln!(conf, "ssl_bump {action} all")?;
    writeln!(
        conf,
        "tls_outgoing_options cafile={}",
        upstream_ca.display()
    )?;
    conf.push_str("http_access allow localhost\nhttp_access deny all\n");
    spawn(dir, &format!("squid-{action}"), addr, conf)
}

/// Starts squid as a corporate parent proxy for `--parent-proxy`: a plain CONNECT proxy on
/// 127.0.0.1 that wants Basic credentials, checked by `basic_ncsa_auth` against `htpasswd`
/// (407 otherwise), and refuses CONNECTs to `deny_port` (403).
pub fn start_parent(dir: &Path, htpasswd: &Path, deny_port: u16) -> Result<Daemon> {
    let addr = free_addr();
    // squid drops from root to its own user (`proxy`): it must read the htpasswd and write
    // its logs.
    run_ok(
        Command::new("chmod").arg("-R").arg("a+rwX").arg(dir),
        None,
        Duration::from_secs(10),
    )?;
    let mut conf = String::new();
    writeln!(conf, "http_port {addr}")?;
    writeln!(
        conf,
        "auth_param basic program {} {}\nauth_param basic realm parent-test\n\
         acl authed proxy_auth REQUIRED\nacl denied_port port {deny_port}",
        installed("/usr/lib/squid/basic_ncsa_auth").display(),
        htpasswd.display()
    )?;
    conf.push_str(
        "http_access deny denied_port\nhttp_access allow localhost authed\nhttp_access deny all\n",
    );
    spawn(dir, "squid-parent", addr, conf)
}

/// Ends `conf` with the settings every test squid shares (no cache, logs in `dir`, a quick
/// shutdown), writes it and starts squid in the foreground.
fn spawn(dir: &Path, name: &str, addr: std::net::SocketAddr, mut conf: String) -> Result<Daemon> {
    let d = dir.display();
    write!(
        conf,
        "pid_filename none\ncache_log {d}/squid-cache.log\naccess_log {d}/squid-access.log\n\
         cache deny all\ncoredump_dir {d}\nshutdown_lifetime 1 seconds\ndebug_options ALL,1 83,2\n"
    )?;
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(squid());
    cmd.args(["-N", "-f"]).arg(&path);
    let mut daemon = Daemon::spawn(name, cmd, dir, addr).context("start squid")?;
    daemon.add_log_file(dir.join("squid-cache.log"));
    daemon.add_log_file(dir.join("squid-access.log"));
    Ok(daemon)
}
