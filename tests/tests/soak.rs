//! Soak (issue 6, "Soak"): `SPLICE_SOAK_TUNNELS` tunnels (default 100,000)
//! opened and closed, split evenly across the data paths in `modes()`, with
//! random sizes (0..64 KiB each way, log-uniform: mostly small, some large)
//! and random close orders, [`WORKERS`] at a time. Every byte is checked
//! against a positional pattern and every stream must end with EOF at its
//! exact length: zero integrity faults. Per mode, after a warm-up, the
//! proxy's descriptors, eBPF map entries and RSS are taken; at the end the
//! descriptors and map entries must equal them exactly and RSS may be at
//! most [`RSS_TOLERANCE_KIB`] higher.
//!
//! `cargo test --release -p splice-proxy-tests --test soak -- --nocapture`
//! prints the figures; `SPLICE_SOAK_TUNNELS=1000000` is the long mode.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use splice_proxy_tests::resources::{Usage, settle};
use splice_proxy_tests::torture::{Pattern, chunk_size, run_seed};
use splice_proxy_tests::{Proxy, modes, raise_fd_limit};

const DEFAULT_TUNNELS: u64 = 100_000;
/// Tunnels in flight at once (client threads); the upstream has more.
const WORKERS: usize = 64;
/// Tunnels per mode run before the baseline is taken (lazy allocations,
/// allocator arenas, the runtime's worker threads all settle).
const WARMUP: u64 = 2_000;
/// How much higher RSS may be at the end than after the warm-up.
const RSS_TOLERANCE_KIB: u64 = 8 * 1024;
/// Largest stream in one direction.
const MAX_LEN: usize = 64 << 10;
/// A read or write that blocks this long fails the tunnel (no hangs).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
const MAGIC: u32 = 0x736f_616b; // "soak"
const HEADER_LEN: usize = 32;

/// Who sends and who closes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// The client sends and closes without reading; nothing comes back.
    ClientFirst,
    /// The upstream sends and closes; the client sends nothing.
    UpstreamFirst,
    /// Both send at once, then shut down writing, then read to EOF.
    Both,
    /// The client sends and half-closes, then reads the upstream's reply.
    ClientHalfCloseThenRead,
    /// The upstream sends and half-closes, then reads the client's reply.
    UpstreamHalfCloseThenRead,
}

const ORDERS: [Order; 5] = [
    Order::ClientFirst,
    Order::UpstreamFirst,
    Order::Both,
    Order::ClientHalfCloseThenRead,
    Order::UpstreamHalfCloseThenRead,
];

/// One tunnel's script, sent by the client as the first [`HEADER_LEN`] bytes.
#[derive(Debug, Clone, Copy)]
struct Script {
    order: Order,
    c2u: usize,
    u2c: usize,
    /// Where in the shared pattern each direction's bytes start.
    c2u_at: u64,
    u2c_at: u64,
}

impl Script {
    fn random(rng: &mut SmallRng) -> Script {
        let order = ORDERS[rng.random_range(0..ORDERS.len())];
        let len = |rng: &mut SmallRng| {
            if rng.random_bool(0.1) {
                0
            } else {
                chunk_size(rng, 1, MAX_LEN)
            }
        };
        let (mut c2u, mut u2c) = (len(rng), len(rng));
        match order {
            Order::ClientFirst => u2c = 0,
            Order::UpstreamFirst => c2u = 0,
            _ => {}
        }
        Script {
            order,
            c2u,
            u2c,
            c2u_at: rng.random_range(0..1 << 40),
            u2c_at: rng.random_range(0..1 << 40),
        }
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4] = ORDERS.iter().position(|o| *o == self.order).unwrap() as u8;
        h[8..12].copy_from_slice(&(self.c2u as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(self.u2c as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.c2u_at.to_le_bytes());
        h[24..32].copy_from_slice(&self.u2c_at.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Result<Script> {
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
        ensure!(
            u32_at(0) == MAGIC,
            "INTEGRITY: tunnel header corrupted: {h:02x?}"
        );
        let order = *ORDERS
            .get(h[4] as usize)
            .context("INTEGRITY: bad close order in the header")?;
        Ok(Script {
            order,
            c2u: u32_at(8) as usize,
            u2c: u32_at(12) as usize,
            c2u_at: u64_at(16),
            u2c_at: u64_at(24),
        })
    }
}

fn send(s: &mut TcpStream, p: &Pattern, at: u64, len: usize) -> Result<()> {
    let mut buf = vec![0u8; len];
    p.fill(at, &mut buf);
    s.write_all(&buf).context("send")
}

/// Reads to EOF; every byte must be the pattern's at its offset and the
/// length exact. An integrity fault's message starts with INTEGRITY.
fn receive(s: &mut TcpStream, p: &Pattern, at: u64, len: usize, what: &str) -> Result<()> {
    let mut want = vec![0u8; len];
    p.fill(at, &mut want);
    let mut got = Vec::with_capacity(len);
    let mut buf = [0u8; 16 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > len {
                    bail!("INTEGRITY: {what}: more than the {len} bytes sent");
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => bail!(
                "{what}: read failed after {} of {len} bytes: {e}",
                got.len()
            ),
        }
    }
    if got.len() != len {
        bail!("INTEGRITY: {what}: EOF after {} of {len} bytes", got.len());
    }
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        bail!("INTEGRITY: {what}: byte {i} of {len} differs");
    }
    Ok(())
}

/// The client's side of one tunnel.
fn client(proxy: SocketAddr, target: &str, p: &Pattern, sc: &Script, early: bool) -> Result<()> {
    let mut s = TcpStream::connect(proxy).context("connect to the proxy")?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
    if early {
        head.extend_from_slice(&sc.encode());
    }
    s.write_all(&head)?;
    let mut reply = [0u8; ESTABLISHED.len()];
    s.read_exact(&mut reply).context("reading the 200")?;
    ensure!(
        reply == ESTABLISHED,
        "not a 200: {:?}",
        String::from_utf8_lossy(&reply)
    );
    if !early {
        s.write_all(&sc.encode())?;
    }
    match sc.order {
        Order::ClientFirst => send(&mut s, p, sc.c2u_at, sc.c2u)?,
        Order::UpstreamFirst => receive(&mut s, p, sc.u2c_at, sc.u2c, "client reading")?,
        Order::Both | Order::ClientHalfCloseThenRead => {
            send(&mut s, p, sc.c2u_at, sc.c2u)?;
            s.shutdown(Shutdown::Write)?;
            receive(&mut s, p, sc.u2c_at, sc.u2c, "client reading")?;
        }
        Order::UpstreamHalfCloseThenRead => {
            receive(&mut s, p, sc.u2c_at, sc.u2c, "client reading")?;
            send(&mut s, p, sc.c2u_at, sc.c2u)?;
            s.shutdown(Shutdown::Write)?;
        }
    }
    Ok(())
}

/// The upstream's side of one tunnel.
fn upstream(mut s: TcpStream, p: &Pattern) -> Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).context("reading the tunnel header")?;
    let sc = Script::decode(&h)?;
    match sc.order {
        Order::ClientFirst => receive(&mut s, p, sc.c2u_at, sc.c2u, "upstream reading")?,
        Order::UpstreamFirst => send(&mut s, p, sc.u2c_at, sc.u2c)?,
        Order::Both | Order::UpstreamHalfCloseThenRead => {
            send(&mut s, p, sc.u2c_at, sc.u2c)?;
            s.shutdown(Shutdown::Write)?;
            receive(&mut s, p, sc.c2u_at, sc.c2u, "upstream reading")?;
        }
        Order::ClientHalfCloseThenRead => {
            receive(&mut s, p, sc.c2u_at, sc.c2u, "upstream reading")?;
            send(&mut s, p, sc.u2c_at, sc.u2c)?;
        }
    }
    Ok(())
}

/// Failures seen by either end (counted, the first few kept), and the
/// bytes the tunnels were scripted to move.
#[derive(Default)]
struct Failures {
    bytes: AtomicU64,
    count: AtomicU64,
    integrity: AtomicU64,
    first: Mutex<Vec<String>>,
}

impl Failures {
    fn add(&self, who: &str, e: anyhow::Error) {
        let msg = format!("{who}: {e:#}");
        if msg.contains("INTEGRITY") {
            self.integrity.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap();
        if first.len() < 10 {
            first.push(msg);
        }
    }
}

/// A pool of upstream threads accepting on one listener.
struct UpstreamPool {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UpstreamPool {
    fn start(n: usize, p: &Pattern, failures: &Arc<Failures>) -> Result<UpstreamPool> {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0")?);
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let (listener, stop, p, failures) =
                    (listener.clone(), stop.clone(), p.clone(), failures.clone());
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn(move || {
                        while let Ok((s, _)) = listener.accept() {
                            if stop.load(Ordering::SeqCst) {
                                return;
                            }
                            if let Err(e) = upstream(s, &p) {
                                failures.add("upstream", e);
                            }
                        }
                    })
                    .expect("spawn an upstream thread")
            })
            .collect();
        Ok(UpstreamPool {
            addr,
            stop,
            threads,
        })
    }
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in &self.threads {
            let _ = TcpStream::connect(self.addr);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `n` tunnels through `proxy`, [`WORKERS`] at a time.
fn run_tunnels(
    proxy: SocketAddr,
    up: SocketAddr,
    p: &Pattern,
    n: u64,
    seed: u64,
    failures: &Failures,
) {
    let next = AtomicU64::new(0);
    let target = up.to_string();
    std::thread::scope(|scope| {
        for w in 0..WORKERS {
            let (next, target) = (&next, &target);
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn_scoped(scope, move || {
                    let mut rng = SmallRng::seed_from_u64(seed ^ (w as u64).wrapping_mul(0x9E37));
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let sc = Script::random(&mut rng);
                        let early = rng.random_bool(0.5);
                        failures
                            .bytes
                            .fetch_add((sc.c2u + sc.u2c) as u64, Ordering::Relaxed);
                        if let Err(e) = client(proxy, target, p, &sc, early) {
                            failures.add(&format!("client ({:?})", sc.order), e);
                        }
                    }
                })
                .expect("spawn a client thread");
        }
    });
}

/// What one mode's soak measured.
struct ModeRun {
    tunnels: u64,
    took: Duration,
    before: Usage,
    after: Usage,
    peak_rss_kib: u64,
}

fn soak_mode(
    mode: &str,
    tunnels: u64,
    seed: u64,
    p: &Pattern,
    failures: &Arc<Failures>,
) -> Result<ModeRun> {
    let up = UpstreamPool::start(WORKERS + 16, p, failures)?;
    let proxy = Proxy::start_mode(mode, &[])?;
    let warmup = WARMUP.min(tunnels / 10);
    run_tunnels(proxy.addr, up.addr, p, warmup, seed, failures);
    let first = Usage::of(proxy.pid());
    std::thread::sleep(Duration::from_millis(500));
    let before = settle(proxy.pid(), &first, Duration::from_secs(5));
    let pid = proxy.pid();
    let peak = Arc::new(AtomicU64::new(before.rss_kib));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(
                    splice_proxy_tests::resources::rss_kib(pid),
                    Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let t0 = Instant::now();
    run_tunnels(
        proxy.addr,
        up.addr,
        p,
        tunnels - warmup,
        seed ^ 0x50a4,
        failures,
    );
    let took = t0.elapsed();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let after = settle(pid, &before, Duration::from_secs(10));
    Ok(ModeRun {
        tunnels: tunnels - warmup,
        took,
        before,
        after,
        peak_rss_kib: peak.load(Ordering::Relaxed),
    })
}

#[test]
fn soak() {
    raise_fd_limit();
    let total: u64 = std::env::var("SPLICE_SOAK_TUNNELS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(DEFAULT_TUNNELS);
    let modes = modes();
    let per_mode = total / modes.len() as u64;
    let seed = run_seed();
    let p = Pattern::new(seed);
    eprintln!(
        "[soak] {total} tunnels over {modes:?} ({per_mode} each, {WORKERS} at a time), seed {seed}"
    );
    let mut problems = Vec::new();
    let started = Instant::now();
    for mode in &modes {
        let failures = Arc::new(Failures::default());
        let run = match soak_mode(mode, per_mode, seed, &p, &failures) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("mode={mode}: {e:#}"));
                continue;
            }
        };
        let (b, a) = (&run.before, &run.after);
        let failed = failures.count.load(Ordering::Relaxed);
        let mib = failures.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
        let integrity = failures.integrity.load(Ordering::Relaxed);
        let rss_growth = a.rss_kib as i64 - b.rss_kib as i64;
        eprintln!(
            "[soak] mode={mode}: {} tunnels (+{} warm-up, {mib:.0} MiB in all) in {:.1} s = {:.0} \
             tunnels/s; failed {failed}, \
             integrity faults {integrity}; fds {} -> {}; map entries {} -> {}; RSS {:.1} -> {:.1} MiB \
             ({:+} KiB, peak {:.1} MiB)",
            run.tunnels,
            per_mode - run.tunnels,
            run.took.as_secs_f64(),
            run.tunnels as f64 / run.took.as_secs_f64(),
            b.fds,
            a.fds,
            b.map_entries(),
            a.map_entries(),
            b.rss_kib as f64 / 1024.0,
            a.rss_kib as f64 / 1024.0,
            rss_growth,
            run.peak_rss_kib as f64 / 1024.0
        );
        if failed > 0 {
            problems.push(format!(
                "mode={mode}: {failed} tunnels failed ({integrity} integrity faults); first:\n    {}",
                failures.first.lock().unwrap().join("\n    ")
            ));
        }
        if a.fds != b.fds || a.maps != b.maps {
            problems.push(format!(
                "mode={mode}: not back to the baseline: before {}, after {}",
                b.describe(),
                a.describe()
            ));
        }
        if rss_growth > RSS_TOLERANCE_KIB as i64 {
            problems.push(format!(
                "mode={mode}: RSS grew by {rss_growth} KiB, more than {RSS_TOLERANCE_KIB} KiB"
            ));
        }
    }
    eprintln!("[soak] total {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        problems.is_empty(),
        "soak failed:\n  {}",
        problems.join("\n  ")
    );
}
