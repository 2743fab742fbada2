//! Real peers for the end-to-end tests: stunnel (client and server), an rsync
//! daemon, `openssl s_server`, and the helpers around them (a self-signed
//! certificate, temp dirs, generated file trees, commands with timeouts).
//!
//! Everything listens on 127.0.0.1 only, lives in its own temp dir, and is
//! killed on drop (also when a test panics). Each daemon runs in its own
//! process group so that children it forks (rsyncd forks per connection) die
//! with it. Set `SPLICE_TEST_KEEP=1` to keep the temp dirs for inspection.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rand::{Rng, RngCore, SeedableRng, rngs::SmallRng};
use sha2::{Digest, Sha256};

use crate::free_port;

/// How long a peer may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Fails with an actionable message when one of the external tools is missing.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        .collect();
    ensure!(
        missing.is_empty(),
        "missing tools {missing:?}: install the Debian packages stunnel4 rsync curl openssl \
         (cargo xtask setup does it)"
    );
    Ok(())
}

/// A directory under `SPLICE_TEST_TMPDIR` (e.g. /dev/shm, to keep the disk
/// out of throughput figures) or the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let base = std::env::var_os("SPLICE_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let path = base.join(format!(
            "splice-peers-{tag}-{}-{}-{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("SPLICE_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A long-running peer process. Its stdout and stderr go to a log file;
/// the whole process group is SIGKILLed on drop.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    log_path: PathBuf,
    extra_logs: Vec<PathBuf>,
}

impl Daemon {
    /// Spawns `cmd` in its own process group, logging to `<dir>/<name>.log`,
    /// and waits until something listens on `addr`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path, addr: SocketAddr) -> Result<Daemon> {
        let log_path = dir.join(format!("{name}.log"));
        let log = fs::File::create(&log_path)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        let mut d = Daemon {
            name: name.to_string(),
            child: Some(child),
            addr,
            log_path,
            extra_logs: Vec::new(),
        };
        d.wait_listening(START_TIMEOUT)?;
        Ok(d)
    }

    /// Adds a file whose content [`Daemon::log`] includes (e.g. rsyncd's log file).
    pub fn add_log_file(&mut self, path: PathBuf) {
        self.extra_logs.push(path);
    }

    fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                std::thread::sleep(Duration::from_millis(50));
                bail!("{} exited early with {status}:\n{}", self.name, self.log());
            }
            // Look at the socket table instead of connecting: a probe
            // connection to a stunnel client would open a tunnel.
            if is_listening(self.addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {} within {timeout:?}:\n{}",
                    self.name,
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process logged so far (plus its extra log files).
    pub fn log(&self) -> String {
        let mut s = fs::read_to_string(&self.log_path).unwrap_or_default();
        for p in &self.extra_logs {
            let _ = write!(
                s,
                "--- {}\n{}",
                p.display(),
                fs::read_to_string(p).unwrap_or_default()
            );
        }
        s
    }

    /// The log, prefixed with the daemon's name, for failure messages.
    pub fn log_report(&self) -> String {
        format!("===== {} ({}) log:\n{}", self.name, self.addr, self.log())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the process group we created for our own child.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether a TCP socket in LISTEN state is bound to `addr` (or the wildcard of its family),
/// read from /proc/net/tcp or /proc/net/tcp6.
pub fn is_listening(addr: SocketAddr) -> bool {
    // The kernel prints an address as 32-bit words in host (little-endian) order.
    let words = |octets: &[u8]| -> String {
        octets
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
            .collect()
    };
    let (table, want_ip, any_ip) = match addr {
        SocketAddr::V4(v4) => ("/proc/net/tcp", words(&v4.ip().octets()), "0".repeat(8)),
        SocketAddr::V6(v6) => ("/proc/net/tcp6", words(&v6.ip().octets()), "0".repeat(32)),
    };
    let want = format!("{want_ip}:{:04X}", addr.port());
    let any = format!("{any_ip}:{:04X}", addr.port());
    let Ok(table) = fs::read_to_string(table) else {
        return false;
    };
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && (f[1] == want || f[1] == any) && f[3] == "0A"
    })
}

/// A loopback address with a free port.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Runs `cmd` to completion with stdin from `input`, killing it (and its
/// process group) after `timeout`. Returns the output whatever the status.
pub fn run(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let pid = child.id() as i32;
    let writer = input.map(|data| {
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            timed_out = true;
            // SAFETY: kill(2) on the process group we created for our own child.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Grandchildren may hold the pipes open; make sure they are gone too.
    // SAFETY: as above.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let out = Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    };
    if timed_out {
        bail!(
            "{cmd:?} timed out after {timeout:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Like [`run`], failing unless the command exits 0.
pub fn run_ok(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let out = run(cmd, input, timeout)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}\n--- stdout:\n{}\n--- stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A self-signed certificate for 127.0.0.1 (SAN IP:127.0.0.1, DNS:localhost).
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Generates a P-256 key and a self-signed certificate with the openssl CLI.
pub fn self_signed_cert(dir: &Path) -> Result<Cert> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .args(["-days", "2", "-subj", "/CN=127.0.0.1"])
            .args([
                "-addext",
                "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost",
            ]),
        None,
        Duration::from_secs(30),
    )?;
    Ok(Cert { cert, key })
}

/// Starts `rsync --daemon --no-detach` on 127.0.0.1 with one writable module
/// `module` rooted at `path`.
pub fn rsyncd(dir: &Path, module: &str, path: &Path) -> Result<Daemon> {
    let addr = free_addr();
    let conf = dir.join("rsyncd.conf");
    let log = dir.join("rsyncd-transfers.log");
    let mut text = String::new();
    writeln!(text, "use chroot = no")?;
    writeln!(text, "log file = {}", log.display())?;
    // As root rsyncd would switch to `nobody`, who cannot write the module.
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    writeln!(text, "uid = {uid}\ngid = {gid}")?;
    writeln!(
        text,
        "[{module}]\npath = {}\nread only = no",
        path.display()
    )?;
    fs::write(&conf, text)?;
    let mut cmd = Command::new("rsync");
    cmd.args(["--daemon", "--no-detach"])
        .arg(format!("--config={}", conf.display()))
        .arg("--address=127.0.0.1")
        .arg(format!("--port={}", addr.port()));
    let mut d = Daemon::spawn("rsyncd", cmd, dir, addr)?;
    d.add_log_file(log);
    Ok(d)
}

/// Starts tinyproxy in the foreground on 127.0.0.1: no credentials, CONNECT to any port (no
/// `ConnectPort` line), any loopback client.
pub fn tinyproxy(dir: &Path) -> Result<Daemon> {
    tinyproxy_with_timeout(dir, 600)
}

/// [`tinyproxy`] with `Timeout <secs>`: it closes a connection, a tunnel included, that moved
/// no byte for that long.
pub fn tinyproxy_with_timeout(dir: &Path, secs: u32) -> Result<Daemon> {
    let addr = free_addr();
    let conf = dir.join("tinyproxy.conf");
    fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort {}\nListen 127.0.0.1\nTimeout {secs}\n\
             MaxClients 100\nLogLevel Info\nDisableViaHeader Yes\n",
            addr.port()
        ),
    )?;
    let mut cmd = Command::new("tinyproxy");
    cmd.args(["-d", "-c"]).arg(&conf);
    Daemon::spawn("tinyproxy", cmd, dir, addr)
}

/// Global stunnel options: `foreground = yes` logs to stderr (captured by
/// [`Daemon`]); `pid =` (empty) writes no pid file.
const STUNNEL_GLOBAL: &str = "foreground = yes\npid =\nsyslog = no\ndebug = info\n";

/// Starts a stunnel server: TLS on 127.0.0.1:<free> -> plain `backend`.
pub fn stunnel_server(dir: &Path, cert: &Cert, backend: SocketAddr) -> Result<Daemon> {
    stunnel_server_at(dir, cert, backend, free_addr())
}

/// Starts a stunnel server: TLS on `addr` (e.g. `[::1]:<port>`) -> plain `backend`.
pub fn stunnel_server_at(
    dir: &Path,
    cert: &Cert,
    backend: SocketAddr,
    addr: SocketAddr,
) -> Result<Daemon> {
    let conf = dir.join(format!("stunnel-server-{}.conf", addr.port()));
    let mut text = STUNNEL_GLOBAL.to_string();
    writeln!(
        text,
        "[tls-in]\naccept = {}:{}\nconnect = {backend}\ncert = {}\nkey = {}",
        // stunnel splits host and port at the last ':' and wants no brackets.
        addr.ip(),
        addr.port(),
        cert.cert.display(),
        cert.key.display()
    )?;
    fs::write(&conf, text)?;
    let mut cmd = Command::new("stunnel");
    cmd.arg(&conf);
    Daemon::spawn("stunnel-server", cmd, dir, addr)
}

/// Starts a stunnel client that accepts plain TCP on 127.0.0.1:<free> and
/// reaches the TLS server `target` through the CONNECT proxy at `proxy`
/// (`protocol = connect`, Basic credentials if given), or directly when
/// `proxy` is `None`. It verifies the server's certificate against `ca` and
/// its IP.
pub fn stunnel_client(
    dir: &Path,
    name: &str,
    proxy: Option<SocketAddr>,
    target: SocketAddr,
    creds: Option<(&str, &str)>,
    ca: &Path,
) -> Result<Daemon> {
    let addr = free_addr();
    let mut text = STUNNEL_GLOBAL.to_string();
    writeln!(text, "[client]\nclient = yes\naccept = {addr}")?;
    match proxy {
        Some(proxy) => writeln!(
            text,
            "connect = {proxy}\nprotocol = connect\nprotocolHost = {target}"
        )?,
        None => writeln!(text, "connect = {target}")?,
    }
    if let Some((user, pass)) = creds {
        writeln!(
            text,
            "protocolAuthentication = basic\nprotocolUsername = {user}\nprotocolPassword = {pass}"
        )?;
    }
    spawn_client(dir, name, addr, text, ca, "127.0.0.1")
}

/// Ends a stunnel client's configuration `text` (the server verified against `ca` and
/// `check_ip`), writes it to `<name>.conf` and starts stunnel, accepting on `addr`.
fn spawn_client(
    dir: &Path,
    name: &str,
    addr: SocketAddr,
    mut text: String,
    ca: &Path,
    check_ip: &str,
) -> Result<Daemon> {
    writeln!(
        text,
        "CAfile = {}\nverifyPeer = yes\ncheckIP = {check_ip}",
        ca.display()
    )?;
    let conf = dir.join(format!("{name}.conf"));
    fs::write(&conf, text)?;
    let mut cmd = Command::new("stunnel");
    cmd.arg(&conf);
    Daemon::spawn(name, cmd, dir, addr)
}

/// Starts a stunnel client configured as MTC's direct volume migration writes it for a proxy
/// (crane-lib's stunnel client template): `protocol = connect`, `connect = <proxy>`,
/// `protocolHost = <target>` verbatim (an IPv6 NodePort target comes unbracketed:
/// `fd00::5:31234`), and `protocolUsername`/`protocolPassword` only when both are non-empty,
/// else no `Proxy-Authorization` at all. stunnel's default scheme is `basic`, in lower case.
/// Accepts plain TCP on 127.0.0.1:<free>; verifies the server against `ca` and `check_ip`.
pub fn stunnel_client_mtc(
    dir: &Path,
    name: &str,
    proxy: SocketAddr,
    protocol_host: &str,
    creds: (&str, &str),
    ca: &Path,
    check_ip: &str,
) -> Result<Daemon> {
    let addr = free_addr();
    let mut text = STUNNEL_GLOBAL.to_string();
    writeln!(
        text,
        "[rsync]\nclient = yes\naccept = {addr}\nconnect = {proxy}\nprotocol = connect\nprotocolHost = {protocol_host}"
    )?;
    let (user, pass) = creds;
    if !user.is_empty() && !pass.is_empty() {
        writeln!(text, "protocolUsername = {user}\nprotocolPassword = {pass}")?;
    }
    spawn_client(dir, name, addr, text, ca, check_ip)
}

/// Starts `openssl s_server -WWW` on 127.0.0.1:<free>, serving the files in
/// `docroot` (`GET /name HTTP/1.0` returns `HTTP/1.0 200 ok`, a
/// Content-type line and the file, then closes).
pub fn openssl_www(dir: &Path, cert: &Cert, docroot: &Path) -> Result<Daemon> {
    let addr = free_addr();
    let mut cmd = Command::new("openssl");
    cmd.arg("s_server")
        .arg("-accept")
        .arg(addr.to_string())
        .arg("-cert")
        .arg(&cert.cert)
        .arg("-key")
        .arg(&cert.key)
        .arg("-WWW")
        .current_dir(docroot);
    Daemon::spawn("s_server", cmd, dir, addr)
}

/// Relative path -> (size, sha256) of every regular file under a root.
pub type Manifest = BTreeMap<PathBuf, (u64, [u8; 32])>;

/// Total size of the files in a manifest.
pub fn manifest_bytes(m: &Manifest) -> u64 {
    m.values().map(|(n, _)| n).sum()
}

/// Shape of a generated tree.
#[derive(Clone, Debug)]
pub struct TreeSpec {
    /// Sizes of the large random files.
    pub large: Vec<u64>,
    /// Number of small files spread over nested directories.
    pub small_files: usize,
    /// Small files are 0..=small_max bytes.
    pub small_max: usize,
    pub seed: u64,
}

impl TreeSpec {
    /// Four large files totalling about `large_mib` MiB (odd sizes, ratios
    /// 4:3:2:1) plus `small_files` files of up to 32 KiB.
    pub fn new(large_mib: u64, small_files: usize) -> TreeSpec {
        let unit = (large_mib << 20) / 10;
        TreeSpec {
            large: vec![
                4 * unit + 17,
                3 * unit + 4093,
                2 * unit + 1,
                unit.saturating_sub(1),
            ],
            small_files,
            small_max: 32 * 1024,
            seed: 0x5EED_0F5B_11CE,
        }
    }
}

/// Writes a tree of random files under `root` and returns its manifest.
/// Names include spaces and non-ASCII; some small files are empty.
pub fn generate_tree(root: &Path, spec: &TreeSpec) -> Result<Manifest> {
    fs::create_dir_all(root)?;
    let manifest = Mutex::new(Manifest::new());
    let large = &spec.large;
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for (i, &size) in large.iter().enumerate() {
            let manifest = &manifest;
            let seed = spec.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            handles.push(s.spawn(move || -> Result<()> {
                let rel = PathBuf::from(format!("large/blob {i}.bin"));
                let path = root.join(&rel);
                fs::create_dir_all(path.parent().unwrap())?;
                let mut f = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(&path)?);
                let mut rng = SmallRng::seed_from_u64(seed);
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                let mut left = size;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    rng.fill_bytes(&mut buf[..n]);
                    h.update(&buf[..n]);
                    f.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                f.flush()?;
                manifest
                    .lock()
                    .unwrap()
                    .insert(rel, (size, h.finalize().into()));
                Ok(())
            }));
        }
        let mut rng = SmallRng::seed_from_u64(spec.seed);
        let mut m = Manifest::new();
        let mut buf = vec![0u8; spec.small_max + 1];
        for i in 0..spec.small_files {
            let mut rel = PathBuf::from(format!("small/d{}/e{}", i % 8, (i / 8) % 8));
            if i % 10 == 3 {
                rel.push(format!("deeper {}/ü{}", i % 3, i % 2));
            }
            rel.push(match i % 50 {
                7 => format!("name with spaces {i}.txt"),
                11 => format!("ünïcødé-{i}.dat"),
                13 => format!(".hidden-{i}"),
                _ => format!("f{i}.dat"),
            });
            let n = if i % 97 == 0 {
                0
            } else {
                rng.random_range(1..=spec.small_max)
            };
            rng.fill_bytes(&mut buf[..n]);
            let path = root.join(&rel);
            fs::create_dir_all(path.parent().unwrap())?;
            fs::write(&path, &buf[..n])?;
            m.insert(rel, (n as u64, Sha256::digest(&buf[..n]).into()));
        }
        for h in handles {
            h.join().expect("generator thread panicked")?;
        }
        manifest.lock().unwrap().extend(m);
        Ok(())
    })?;
    Ok(manifest.into_inner().unwrap())
}

/// Hashes every regular file under `root` (in parallel); fails on anything
/// that is neither a file nor a directory.
pub fn hash_tree(root: &Path) -> Result<Manifest> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).with_context(|| format!("read {}", rel.display()))? {
            let e = e?;
            let t = e.file_type()?;
            let r = rel.join(e.file_name());
            if t.is_dir() {
                stack.push(r);
            } else if t.is_file() {
                files.push(r);
            } else {
                bail!("unexpected file type at {}: {t:?}", r.display());
            }
        }
    }
    // Largest first so the big files spread over the workers.
    files.sort_by_key(|r| {
        std::cmp::Reverse(fs::metadata(root.join(r)).map(|m| m.len()).unwrap_or(0))
    });
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Manifest::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(rel) = files.get(i) else {
                            return Ok(());
                        };
                        let mut f = fs::File::open(root.join(rel))?;
                        let mut h = Sha256::new();
                        let mut size = 0u64;
                        loop {
                            let n = f.read(&mut buf)?;
                            if n == 0 {
                                break;
                            }
                            h.update(&buf[..n]);
                            size += n as u64;
                        }
                        out.lock()
                            .unwrap()
                            .insert(rel.clone(), (size, h.finalize().into()));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("hash thread panicked")?;
        }
        Ok(())
    })?;
    Ok(out.into_inner().unwrap())
}

/// Compares two manifests: same set of files, same sizes and hashes.
/// The error lists the first differences.
pub fn compare_manifests(expected: &Manifest, actual: &Manifest) -> Result<()> {
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    let extra: Vec<_> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    let differ: Vec<_> = expected
        .iter()
        .filter_map(|(k, (n, h))| match actual.get(k) {
            Some((m, g)) if (m, g) != (n, h) => Some(format!(
                "{}: expected {n} bytes sha256 {}, got {m} bytes sha256 {}",
                k.display(),
                hex(h),
                hex(g)
            )),
            _ => None,
        })
        .collect();
    if missing.is_empty() && extra.is_empty() && differ.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "trees differ: {} expected files, {} actual; {} missing, {} extra, {} differ",
        expected.len(),
        actual.len(),
        missing.len(),
        extra.len(),
        differ.len()
    );
    for m in missing.iter().take(10) {
        let _ = write!(msg, "\n  missing {}", m.display());
    }
    for e in extra.iter().take(10) {
        let _ = write!(msg, "\n  extra {}", e.display());
    }
    for d in differ.iter().take(10) {
        let _ = write!(msg, "\n  {d}");
    }
    bail!(msg)
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Writes `len` pseudo-random printable bytes (lines of 64) to `path` and
/// returns them.
pub fn write_text_file(path: &Path, len: usize, seed: u64) -> Result<Vec<u8>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let data: Vec<u8> = (0..len)
        .map(|i| {
            if i % 65 == 64 {
                b'\n'
            } else {
                alphabet[rng.random_range(0..alphabet.len())]
            }
        })
        .collect();
    fs::write(path, &data)?;
    Ok(data)
}
