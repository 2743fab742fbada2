//! Harness for the end-to-end tests: start the real `splice-proxy` binary on
//! loopback, talk to it, and clean up whatever happens.
//!
//! The binary is found through `SPLICE_PROXY_BIN`, or next to the test
//! executable's target directory (`cargo xtask test` builds it first).

pub mod blackhole;
pub mod metrics;
pub mod peers;
pub mod rawhttp;
pub mod resources;
pub mod squid;
pub mod tls;
pub mod torture;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Path of the `splice-proxy` binary under test.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SPLICE_PROXY_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe>: the binary lives in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("splice-proxy");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p proxy-user, same profile) or set SPLICE_PROXY_BIN",
        bin.display()
    );
    bin
}

/// Holds the test binary's one lock: tests that load both CPUs, or that measure CPU or time,
/// take it so that no other test of the same binary runs beside them (cargo runs a binary's
/// tests on parallel threads; a busy machine slows the kernel's redirect worker and changes
/// which data path a reader-bound direction takes).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A free TCP port on 127.0.0.1 (bound then released; good enough on a test box).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// How a test proxy's process is set up, beyond its arguments.
#[derive(Default)]
struct Launch {
    /// RLIMIT_NOFILE, soft and hard.
    nofile: Option<u64>,
    /// A file bind-mounted over `/etc/hosts` in a mount namespace of the proxy's own.
    hosts: Option<PathBuf>,
}

/// A running proxy. Killed (SIGKILL) on drop unless stopped first.
pub struct Proxy {
    child: Option<Child>,
    /// The address the proxy listens on.
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

/// Flags every test proxy gets unless it overrides them: loopback upstreams
/// on any port are allowed, since every peer in these tests is on loopback.
pub const TEST_POLICY: &[&str] = &["--allow-dst", "127.0.0.0/8", "--allow-port", "1-65535"];

impl Proxy {
    /// Starts `splice-proxy run --listen 127.0.0.1:<free port> <args>` and
    /// waits until it accepts connections.
    pub fn start(args: &[&str]) -> Result<Proxy> {
        Self::start_on_free_port(args, &Launch::default())
    }

    /// Like [`Proxy::start`] with `--metrics-listen` on a free loopback port
    /// added; waits until that listener accepts too and returns its address.
    pub fn start_with_metrics(args: &[&str]) -> Result<(Proxy, SocketAddr)> {
        let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let maddr_s = maddr.to_string();
        let mut all = args.to_vec();
        all.extend_from_slice(&["--metrics-listen", &maddr_s]);
        let proxy = Self::start(&all)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(maddr).is_err() {
            if Instant::now() > deadline {
                bail!("no metrics listener on {maddr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((proxy, maddr))
    }

    /// Like [`Proxy::start`] with [`TEST_POLICY`] and the given mode.
    pub fn start_mode(mode: &str, extra: &[&str]) -> Result<Proxy> {
        let mut args: Vec<&str> = TEST_POLICY.to_vec();
        args.extend_from_slice(&["--mode", mode, "--allow-anonymous"]);
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// Like [`Proxy::start`] with the process's open-file limit (soft and
    /// hard, so the proxy cannot raise it) set to `nofile`.
    pub fn start_with_nofile(args: &[&str], nofile: u64) -> Result<Proxy> {
        Self::start_on_free_port(
            args,
            &Launch {
                nofile: Some(nofile),
                ..Launch::default()
            },
        )
    }

    /// Like [`Proxy::start`] in a mount namespace of its own where `hosts` is bind-mounted over
    /// `/etc/hosts`: the proxy's resolver (getaddrinfo) answers names from that file, and the
    /// machine's own file is untouched.
    pub fn start_with_hosts(args: &[&str], hosts: &std::path::Path) -> Result<Proxy> {
        Self::start_on_free_port(
            args,
            &Launch {
                hosts: Some(hosts.to_path_buf()),
                ..Launch::default()
            },
        )
    }

    /// Starts the proxy listening on `addr` (e.g. the address of one that
    /// was just killed).
    pub fn start_at(addr: SocketAddr, args: &[&str]) -> Result<Proxy> {
        Self::launch(addr, args, &Launch::default())
    }

    fn start_on_free_port(args: &[&str], how: &Launch) -> Result<Proxy> {
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            match Self::launch(addr, args, how) {
                Ok(p) => return Ok(p),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap())
    }

    fn launch(addr: SocketAddr, args: &[&str], how: &Launch) -> Result<Proxy> {
        let mut command = Command::new(binary());
        if let Some(hosts) = &how.hosts {
            use std::os::unix::ffi::OsStrExt;
            use std::os::unix::process::CommandExt;
            let source = std::ffi::CString::new(hosts.as_os_str().as_bytes())?;
            // SAFETY: the closure runs in the forked child before exec and only makes raw
            // system calls (unshare, mount), which are async-signal-safe, with C strings
            // built before the fork.
            unsafe {
                command.pre_exec(move || {
                    let fail = || Err(std::io::Error::last_os_error());
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return fail();
                    }
                    // Keep the bind mount in this namespace: make every mount private first.
                    if libc::mount(
                        c"none".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    {
                        return fail();
                    }
                    if libc::mount(
                        source.as_ptr(),
                        c"/etc/hosts".as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return fail();
                    }
                    Ok(())
                });
            }
        }
        if let Some(n) = how.nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: the closure runs in the forked child before exec and
            // only calls setrlimit, which is async-signal-safe, with a
            // pointer to a struct it owns.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .arg("run")
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn splice-proxy")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("SPLICE_TEST_VERBOSE").is_some() {
                        eprintln!("[proxy] {line}");
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "splice-proxy exited early with {status}:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                // Something listens there, but it may be another test's socket that took the
                // port between free_port() and our bind: wait for our own "ready" (or, with a
                // quieter RUST_LOG, a moment without the proxy exiting).
                let settle = Instant::now() + Duration::from_secs(2);
                while Instant::now() < settle
                    && !log
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|l| l.contains("splice-proxy ready"))
                {
                    if let Some(status) = child.try_wait()? {
                        std::thread::sleep(Duration::from_millis(100));
                        bail!(
                            "splice-proxy exited early with {status}:\n{}",
                            log.lock().unwrap().join("\n")
                        );
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Ok(Proxy {
                    child: Some(child),
                    addr,
                    log,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("splice-proxy did not listen on {addr} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the proxy printed so far (stdout and stderr, by line).
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `within` for a log line containing `needle`; returns it.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            if Instant::now() > deadline {
                bail!(
                    "no log line with {needle:?} within {within:?}:\n{}",
                    self.log().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The access-log events (`tunnel` lines) that contain every one of
    /// `needles`, once at least `n` are logged or `within` has passed.
    pub fn access_events(&self, needles: &[&str], n: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let events: Vec<String> = self
                .log()
                .into_iter()
                .filter(|l| l.contains(" tunnel ") && needles.iter().all(|n| l.contains(n)))
                .collect();
            if events.len() >= n || Instant::now() > deadline {
                return events;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the proxy and leaves it running.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The exit status if the proxy has exited (reaps it), `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("already stopped"),
        }
    }

    /// Number of open file descriptors of the proxy process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Sends `sig` and waits up to `timeout` for exit; returns the exit code.
    pub fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> Result<Option<i32>> {
        let mut child = self.child.take().context("already stopped")?;
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("splice-proxy did not exit within {timeout:?} after signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens a tunnel to `target` ("host:port") with optional Basic
    /// credentials; returns the stream positioned after the 200 reply.
    pub fn connect_tunnel(&self, target: &str, creds: Option<(&str, &str)>) -> Result<TcpStream> {
        let mut s = TcpStream::connect(self.addr)?;
        s.set_nodelay(true)?;
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some((u, p)) = creds {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        let head = read_response_head(&mut s)?;
        if !head.starts_with("HTTP/1.1 200 ") {
            bail!("tunnel to {target} refused: {head:?}");
        }
        Ok(s)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads an HTTP response head byte by byte (so no tunnel byte is consumed)
/// and returns it, including the final CRLFCRLF.
pub fn read_response_head(s: &mut TcpStream) -> Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b)?;
        if n == 0 {
            bail!(
                "connection closed inside the response head: {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(b[0]);
        if head.len() > 64 * 1024 {
            bail!("response head too long");
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The number in field `name=` of an access-log line (`bytes_up`, `bytes_down`, `status`, ...).
pub fn access_field(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The data paths to run every mode-independent test against.
///
/// `SPLICE_TEST_MODES=copy,splice` overrides; otherwise every mode that
/// `splice-proxy probe` reports as `<mode> ok`.
pub fn modes() -> Vec<String> {
    if let Ok(list) = std::env::var("SPLICE_TEST_MODES") {
        return list
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect();
    }
    let out = Command::new(binary())
        .arg("probe")
        .stdin(Stdio::null())
        .output()
        .expect("run splice-proxy probe");
    assert!(out.status.success(), "splice-proxy probe failed: {out:?}");
    let modes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.strip_suffix(" ok")
                .or_else(|| l.split_once(" ok (").map(|(mode, _)| mode))
                .map(String::from)
        })
        .collect();
    assert!(
        modes.iter().any(|m| m == "copy") && modes.iter().any(|m| m == "splice"),
        "probe must report copy and splice available: {modes:?}"
    );
    modes
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (proxies
/// started afterwards inherit it). Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
    }
    r.rlim_cur
}
