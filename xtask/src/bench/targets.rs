//! The things a tunnel can go through: nothing (direct), splice-proxy in one of its modes, squid,
//! tinyproxy. Each proxy runs in the foreground as a child of the bench, on a random loopback
//! port (and the same port on the wan scenario's root-side veth address, when that scenario
//! runs), with Basic auth, its files in a temp dir; it is killed on drop, on panic, on Ctrl-C,
//! and (through PR_SET_PDEATHSIG) if the bench itself is killed.

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    load::{self, Endpoint},
    sys,
};

pub const USER: &str = "bench";
pub const PASS: &str = "bench-pass";

pub const ALL: &[&str] = &["direct", "copy", "splice", "sockmap", "squid", "tinyproxy"];

/// A human label for tables and the chart.
pub fn label(name: &str) -> &'static str {
    match name {
        "direct" => "direct (no proxy)",
        "copy" => "splice-proxy copy",
        "splice" => "splice-proxy splice",
        "sockmap" => "splice-proxy sockmap (auto)",
        "squid" => "squid",
        "tinyproxy" => "tinyproxy",
        _ => "?",
    }
}

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Result<TempDir> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "splice-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        // squid drops to its own user and writes its cache log here.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
        Ok(TempDir(dir))
    }
}

/// Removes temp dirs left by earlier bench runs that were interrupted (Ctrl-C exits without
/// unwinding): `splice-bench-<pid>-*` and the rsync scenario's `splice-peers-bench-rsync-<pid>-*`
/// whose process is gone.
pub fn sweep_stale() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("splice-bench-")
            .or_else(|| name.strip_prefix("splice-peers-bench-rsync-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (and reaped) on drop.
struct Guard {
    child: Child,
    /// Its own cgroup, for CPU time to the microsecond (dropped after the child is reaped).
    _cgroup: Option<super::cgroup::Cgroup>,
}

impl Guard {
    fn spawn(mut cmd: Command) -> Result<Guard> {
        sys::die_with_parent(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", crate::util::display(&cmd)))?;
        sys::register_child(child.id());
        let cgroup = super::cgroup::Cgroup::adopt(child.id());
        Ok(Guard {
            child,
            _cgroup: cgroup,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        sys::forget_child(self.child.id());
    }
}

/// A started target.
pub struct Running {
    pub name: &'static str,
    pub endpoint: Endpoint,
    /// The endpoint for clients in the wan scenario's client namespace, if it was set up.
    pub wan_endpoint: Option<Endpoint>,
    guard: Option<Guard>,
}

impl Running {
    /// The proxy process, if there is one.
    pub fn pid(&self) -> Option<u32> {
        self.guard.as_ref().map(|g| g.child.id())
    }

    /// Fails with the log if the proxy has exited.
    pub fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(g) = self.guard.as_mut()
            && let Some(status) = g.child.try_wait()?
        {
            bail!(
                "{} exited with {status}; its log:\n{}",
                self.name,
                tail(log)
            );
        }
        Ok(())
    }
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn basic(user: &str, pass: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{pass}");
    let mut out = String::from("Basic ");
    for c in raw.as_bytes().chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How every target is started, besides its name.
pub struct Setup<'a> {
    pub dir: &'a Path,
    /// The loopback sink; a CONNECT to it must work before the target counts as started.
    pub sink: SocketAddr,
    pub proxy_bin: &'a Path,
    pub patience: Duration,
    /// More destination ports CONNECT must be allowed to.
    pub extra_ports: Vec<u16>,
    pub proxy_args: &'a [String],
    /// A second address to listen on (same port), and a destination network to allow, for the
    /// wan scenario.
    pub wan: Option<(IpAddr, String)>,
}

/// Starts `name`, waits until a CONNECT through it to the sink gets a 200 (up to `patience`).
pub fn start(name: &'static str, setup: &Setup) -> Result<Running> {
    let Setup {
        dir,
        sink,
        proxy_bin,
        patience,
        ref extra_ports,
        proxy_args,
        ref wan,
    } = *setup;
    let ports: Vec<u16> = std::iter::once(sink.port())
        .chain(extra_ports.iter().copied())
        .collect();
    if name == "direct" {
        return Ok(Running {
            name,
            endpoint: Endpoint::Direct,
            wan_endpoint: wan.as_ref().map(|_| Endpoint::Direct),
            guard: None,
        });
    }
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let wan_addr = wan.as_ref().map(|(ip, _)| SocketAddr::new(*ip, port));
    let log = log_path(dir, name);
    let mut cmd = match name {
        "copy" | "splice" | "sockmap" => {
            let mut c = Command::new(proxy_bin);
            c.args(["run", "--listen", &addr.to_string(), "--mode", name]);
            if let (Some(a), Some((_, net))) = (wan_addr, wan) {
                c.args(["--listen", &a.to_string(), "--allow-dst", net]);
            }
            c.args(["--credentials", &format!("{USER}:{PASS}")])
                .args(["--allow-dst", "127.0.0.0/8", "--allow-port", "1-65535"])
                .args(["--max-tunnels", "100000"])
                // Every bench connection comes from 127.0.0.1: the per-address cap (4,096 by
                // default) would stop the idle scenario, and it is not what is measured.
                .args(["--max-conns-per-ip", "0"])
                .args(proxy_args)
                // No per-tunnel access log: squid and tinyproxy run with theirs off too.
                .env("RUST_LOG", "warn");
            c
        }
        "squid" => {
            let conf = squid_conf(dir, port, wan_addr, &ports)?;
            let mut c = Command::new("squid");
            c.args(["-N", "-f"]).arg(conf);
            c
        }
        "tinyproxy" => {
            let conf = dir.join("tinyproxy.conf");
            fs::write(
                &conf,
                format!(
                    "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\n{}Timeout 600\n\
                     MaxClients 20000\nLogLevel Critical\nBasicAuth {USER} {PASS}\n\
                     DisableViaHeader Yes\n{}",
                    wan_addr
                        .map(|a| format!("Listen {}\n", a.ip()))
                        .unwrap_or_default(),
                    ports
                        .iter()
                        .map(|p| format!("ConnectPort {p}\n"))
                        .collect::<String>()
                ),
            )?;
            let mut c = Command::new("tinyproxy");
            c.args(["-d", "-c"]).arg(conf);
            c
        }
        other => bail!("unknown target {other:?} (known: {})", ALL.join(", ")),
    };
    let out = fs::File::create(&log)?;
    cmd.stdout(out.try_clone()?).stderr(out);
    let guard = Guard::spawn(cmd)?;
    let mut running = Running {
        name,
        endpoint: Endpoint::Proxy {
            addr,
            auth: basic(USER, PASS),
        },
        wan_endpoint: wan_addr.map(|addr| Endpoint::Proxy {
            addr,
            auth: basic(USER, PASS),
        }),
        guard: Some(guard),
    };
    // Listening first, then one full tunnel (squid's auth helpers start after its port opens).
    let deadline = Instant::now() + patience;
    let mut last_err = None;
    loop {
        running.check_alive(&log)?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            match load::open(&running.endpoint, sink) {
                Ok(s) => {
                    drop(s);
                    return Ok(running);
                }
                Err(e) => last_err = Some(e),
            }
        }
        if Instant::now() > deadline {
            let why = last_err.map(|e| format!("{e:#}")).unwrap_or_else(|| {
                format!("nothing listens on {addr} after {}s", patience.as_secs())
            });
            bail!("{name} is not usable: {why}; its log:\n{}", tail(&log));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn squid_conf(
    dir: &Path,
    port: u16,
    wan: Option<SocketAddr>,
    connect_ports: &[u16],
) -> Result<PathBuf> {
    let connect_ports: Vec<String> = connect_ports.iter().map(u16::to_string).collect();
    let connect_ports = connect_ports.join(" ");
    let out = Command::new("openssl")
        .args(["passwd", "-apr1", PASS])
        .stderr(Stdio::inherit())
        .output()
        .context("run openssl passwd (is openssl installed? `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!("openssl passwd -apr1 failed");
    }
    let hash = String::from_utf8(out.stdout)?;
    let htpasswd = dir.join("htpasswd");
    fs::write(&htpasswd, format!("{USER}:{}\n", hash.trim()))?;
    let helper = [
        "/usr/lib/squid/basic_ncsa_auth",
        "/usr/lib/squid3/basic_ncsa_auth",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .context("squid's basic_ncsa_auth helper not found (`cargo xtask setup` installs squid)")?;
    let d = dir.display();
    let conf = dir.join("squid.conf");
    fs::write(
        &conf,
        format!(
            "http_port 127.0.0.1:{port}\n\
             {}\
             pid_filename none\n\
             cache_log {d}/squid-cache.log\n\
             access_log none\n\
             cache deny all\n\
             coredump_dir {d}\n\
             shutdown_lifetime 1 seconds\n\
             max_filedescriptors 65536\n\
             auth_param basic program {helper} {}\n\
             auth_param basic children 5 startup=1\n\
             auth_param basic realm bench\n\
             auth_param basic credentialsttl 2 hours\n\
             acl authed proxy_auth REQUIRED\n\
             acl sink_port port {connect_ports}\n\
             http_access deny !authed\n\
             http_access allow CONNECT sink_port\n\
             http_access deny all\n",
            wan.map(|a| format!("http_port {a}\n")).unwrap_or_default(),
            htpasswd.display()
        ),
    )?;
    Ok(conf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn basic_header() {
        assert_eq!(super::basic("a", "b"), "Basic YTpi");
        assert_eq!(super::basic("ab", "c"), "Basic YWI6Yw==");
        assert_eq!(super::basic("bench", "x"), "Basic YmVuY2g6eA==");
    }
}
