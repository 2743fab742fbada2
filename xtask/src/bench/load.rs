//! The load side of the bench: a sink that every tunnel ends at, and the clients that drive
//! each scenario through a target. Plain std threads and blocking sockets.
//!
//! Every connection to the sink starts with a one-byte tag that says what the sink does with it:
//! `S` + u64 length: read exactly that many bytes, answer one byte (so a transfer is complete
//! without relying on half-close, which squid and tinyproxy do not honour); `P` + u64 length +
//! u64 rate: the same, but read at no more than `rate` bytes/s from a socket with a moderate
//! receive buffer (readerbound scenario); `E`: echo until EOF;
//! `H`: hold the connection open (idle tunnels). A connection that sends nothing (handshake
//! scenario) is closed when the client goes away.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{readerbound, sys};

const CHUNK: usize = 256 * 1024;
/// Sink connections served at once (the handshake scenario keeps up to one per client open).
const ACCEPTORS: usize = 128;

/// Where a client connects: straight to the sink, or through a CONNECT proxy.
#[derive(Clone)]
pub enum Endpoint {
    Direct,
    Proxy {
        addr: SocketAddr,
        /// `Proxy-Authorization` header value (`Basic <base64>`).
        auth: String,
    },
}

/// The far end of every tunnel.
pub struct Sink {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    held_count: Arc<AtomicUsize>,
    acceptors: Vec<JoinHandle<()>>,
}

impl Sink {
    pub fn start() -> Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the sink")?;
        Sink::start_on(listener, ACCEPTORS)
    }

    /// A sink on `listener` (which may belong to another network namespace), served by
    /// `acceptors` threads.
    pub fn start_on(listener: TcpListener, acceptors: usize) -> Result<Sink> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let held_count = Arc::new(AtomicUsize::new(0));
        // A fixed set of threads that each accept and serve one connection at a time: spawning
        // a thread per connection could not keep up with the handshake scenario.
        let threads = acceptors;
        let mut acceptors = Vec::new();
        for i in 0..threads {
            let (l, s, h, c) = (
                listener.try_clone()?,
                stop.clone(),
                held.clone(),
                held_count.clone(),
            );
            acceptors.push(
                thread::Builder::new()
                    .name(format!("sink-{i}"))
                    .stack_size(256 * 1024)
                    .spawn(move || accept_loop(l, s, h, c))?,
            );
        }
        Ok(Sink {
            addr,
            stop,
            held,
            held_count,
            acceptors,
        })
    }

    /// Connections currently held open by `H`.
    pub fn held(&self) -> usize {
        self.held_count.load(Ordering::SeqCst)
    }

    pub fn release_held(&self) {
        let mut held = self.held.lock().unwrap();
        held.clear();
        self.held_count.store(0, Ordering::SeqCst);
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release_held();
        let wake: Vec<_> = (0..self.acceptors.len())
            .filter_map(|_| TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).ok())
            .collect();
        for t in self.acceptors.drain(..) {
            let _ = t.join();
        }
        drop(wake);
        self.release_held();
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    held_count: Arc<AtomicUsize>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else {
            // EMFILE and the like: back off instead of spinning.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = serve(conn, &held, &held_count);
    }
}

fn serve(
    mut conn: TcpStream,
    held: &Mutex<Vec<TcpStream>>,
    held_count: &AtomicUsize,
) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut tag = [0u8; 1];
    if conn.read(&mut tag)? == 0 {
        return Ok(());
    }
    match tag[0] {
        b'S' => {
            let mut len = [0u8; 8];
            conn.read_exact(&mut len)?;
            let mut left = u64::from_be_bytes(len);
            let mut buf = vec![0u8; CHUNK];
            while left > 0 {
                let want = buf.len().min(left as usize);
                let n = conn.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                left -= n as u64;
            }
            conn.write_all(b"k")?;
            // Wait for the client to close so the tunnel ends from its side.
            let _ = conn.read(&mut buf);
        }
        b'P' => {
            let mut head = [0u8; 16];
            conn.read_exact(&mut head)?;
            let len = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
            let rate = u64::from_be_bytes(head[8..].try_into().expect("8 bytes"));
            sys::set_rcvbuf(&conn, readerbound::RCVBUF)?;
            readerbound::paced_read(&mut conn, len, rate)?;
            conn.write_all(b"k")?;
            let _ = conn.read(&mut [0u8; 64]);
        }
        b'E' => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                conn.write_all(&buf[..n])?;
            }
        }
        b'H' => {
            held.lock().unwrap().push(conn);
            held_count.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }
    Ok(())
}

/// Opens a connection to the sink through `ep` and returns it positioned after the 200.
pub fn open(ep: &Endpoint, sink: SocketAddr) -> Result<TcpStream> {
    match ep {
        Endpoint::Direct => {
            let s = TcpStream::connect(sink).context("connect to the sink")?;
            s.set_nodelay(true)?;
            Ok(s)
        }
        Endpoint::Proxy { addr, auth } => {
            let mut s = TcpStream::connect(addr).context("connect to the proxy")?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let req = format!(
                "CONNECT {sink} HTTP/1.1\r\nHost: {sink}\r\nProxy-Authorization: {auth}\r\n\r\n"
            );
            s.write_all(req.as_bytes())?;
            // The sink never speaks first, so everything up to the blank line is the reply.
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).context("read the CONNECT reply")?;
                if n == 0 {
                    bail!(
                        "proxy closed before the reply ended: {:?}",
                        String::from_utf8_lossy(&head)
                    );
                }
                head.extend_from_slice(&buf[..n]);
                if head.len() > 16 * 1024 {
                    bail!("CONNECT reply head too long");
                }
            }
            let status = head.split(|&b| b == b' ').nth(1).unwrap_or(b"");
            if status != b"200" {
                let line = head.split(|&b| b == b'\r').next().unwrap_or(b"");
                bail!("CONNECT refused: {}", String::from_utf8_lossy(line));
            }
            s.set_read_timeout(None)?;
            Ok(s)
        }
    }
}

/// Closes with a reset: the handshake scenario would otherwise fill the port range with
/// TIME_WAIT sockets.
fn close_now(s: TcpStream) {
    let _ = sys::set_linger_zero(&s);
    drop(s);
}

/// CPU counters around a timed section.
pub struct CpuSnap {
    at: std::time::Instant,
    idle: u64,
    proxy: Option<f64>,
}

impl CpuSnap {
    pub fn take(pid: Option<u32>) -> CpuSnap {
        CpuSnap {
            at: std::time::Instant::now(),
            idle: sys::cpu_idle_ticks().0,
            proxy: pid.map(sys::process_cpu_secs),
        }
    }
    /// (total CPU seconds over all CPUs: the time they were not idle, proxy process CPU
    /// seconds) since `self`.
    pub fn since(&self, pid: Option<u32>) -> (f64, Option<f64>) {
        let now = CpuSnap::take(pid);
        let (_, cpus) = sys::cpu_idle_ticks();
        let idle = now.idle.saturating_sub(self.idle) as f64 / sys::clock_ticks() as f64;
        let total =
            (now.at.duration_since(self.at).as_secs_f64() * f64::from(cpus) - idle).max(0.0);
        let proxy = match (self.proxy, now.proxy) {
            (Some(a), Some(b)) => Some((b - a).max(0.0)),
            _ => None,
        };
        (total, proxy)
    }
}

pub struct StreamResult {
    pub secs: f64,
    pub bytes: u64,
    pub total_cpu: f64,
    pub proxy_cpu: Option<f64>,
}

/// `streams` tunnels at once, `bytes` in total split among them, client → sink.
pub fn stream(
    ep: &Endpoint,
    sink: SocketAddr,
    bytes: u64,
    streams: usize,
    pid: Option<u32>,
) -> Result<StreamResult> {
    transfer(ep, sink, bytes / streams as u64, streams, None, pid)
}

/// `streams` tunnels at once, `per` bytes each, client → a sink that reads each stream at no
/// more than `rate_per_stream` bytes/s. The clock stops when the sink has counted every byte.
pub fn paced_stream(
    ep: &Endpoint,
    sink: SocketAddr,
    per: u64,
    streams: usize,
    rate_per_stream: u64,
    pid: Option<u32>,
) -> Result<StreamResult> {
    transfer(ep, sink, per, streams, Some(rate_per_stream), pid)
}

/// The head a transfer starts with: `S` + length, or `P` + length + rate.
fn transfer_head(per: u64, rate: Option<u64>) -> Vec<u8> {
    let mut head = Vec::with_capacity(17);
    match rate {
        None => head.push(b'S'),
        Some(_) => head.push(b'P'),
    }
    head.extend_from_slice(&per.to_be_bytes());
    if let Some(r) = rate {
        head.extend_from_slice(&r.to_be_bytes());
    }
    head
}

fn transfer(
    ep: &Endpoint,
    sink: SocketAddr,
    per: u64,
    streams: usize,
    rate: Option<u64>,
    pid: Option<u32>,
) -> Result<StreamResult> {
    let conns = (0..streams)
        .map(|_| open(ep, sink))
        .collect::<Result<Vec<_>>>()?;
    let barrier = Arc::new(Barrier::new(streams + 1));
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let barrier = barrier.clone();
            let head = transfer_head(per, rate);
            thread::spawn(move || -> io::Result<Instant> {
                let buf = vec![0x5au8; CHUNK];
                barrier.wait();
                c.write_all(&head)?;
                let mut left = per;
                while left > 0 {
                    let n = buf.len().min(left as usize);
                    c.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                // The sink answers once it has counted every byte.
                let mut ack = [0u8; 1];
                c.read_exact(&mut ack)?;
                let done = Instant::now();
                c.shutdown(Shutdown::Both).ok();
                Ok(done)
            })
        })
        .collect();
    // The clock starts before the writers are released: with many writers on few CPUs, this
    // thread may run again only after they have been writing for a while (stream64 once
    // reported 365 Gbit/s that way). It stops at the last sink's confirmation, as each writer
    // saw it, not when this thread gets round to noticing.
    let cpu = CpuSnap::take(pid);
    let started = Instant::now();
    barrier.wait();
    let mut first_err = None;
    let mut last = started;
    for w in workers {
        match w.join().expect("stream worker panicked") {
            Ok(done) => last = last.max(done),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let secs = last.duration_since(started).as_secs_f64();
    let (total_cpu, proxy_cpu) = cpu.since(pid);
    if let Some(e) = first_err {
        return Err(e).context("stream transfer");
    }
    Ok(StreamResult {
        secs,
        bytes: per * streams as u64,
        total_cpu,
        proxy_cpu,
    })
}

pub struct Latencies {
    pub count: usize,
    pub errors: usize,
    pub secs: f64,
    /// Sorted, microseconds.
    pub micros: Vec<u32>,
}

impl Latencies {
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }
    pub fn pct(&self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        let i = ((self.micros.len() - 1) as f64 * p).round() as usize;
        self.micros[i] as f64
    }
}

/// `clients` threads, each opening and closing tunnels back to back for `dur`.
pub fn handshakes(
    ep: &Endpoint,
    sink: SocketAddr,
    clients: usize,
    dur: Duration,
) -> Result<Latencies> {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (ep, barrier, stop) = (ep.clone(), barrier.clone(), stop.clone());
            thread::spawn(move || {
                let mut lat = Vec::with_capacity(4096);
                let mut errors = 0usize;
                let mut last_err = None;
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match open(&ep, sink) {
                        Ok(s) => {
                            lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            close_now(s);
                        }
                        Err(e) => {
                            errors += 1;
                            last_err = Some(e);
                            thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                (lat, errors, last_err)
            })
        })
        .collect();
    // Started before the clients are released, for the same reason as in `transfer`.
    let started = Instant::now();
    barrier.wait();
    thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let mut micros = Vec::new();
    let mut errors = 0;
    let mut last_err = None;
    for w in workers {
        let (l, e, le) = w.join().expect("handshake worker panicked");
        micros.extend(l);
        errors += e;
        if le.is_some() {
            last_err = le;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    micros.sort_unstable();
    if micros.is_empty() {
        let e = last_err.unwrap_or_else(|| anyhow::anyhow!("no handshake completed"));
        return Err(e).context("handshake scenario");
    }
    Ok(Latencies {
        count: micros.len(),
        errors,
        secs,
        micros,
    })
}

/// One tunnel, `size`-byte messages echoed by the sink, back to back for `dur`.
pub fn ping_pong(ep: &Endpoint, sink: SocketAddr, size: usize, dur: Duration) -> Result<Latencies> {
    let mut c = open(ep, sink)?;
    c.write_all(b"E")?;
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    // Warm up the path (and, for sockmap, the redirect) before timing.
    for _ in 0..10 {
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
    }
    let mut micros = Vec::with_capacity(100_000);
    let started = Instant::now();
    while started.elapsed() < dur {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut back).context("ping-pong echo")?;
        micros.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    let secs = started.elapsed().as_secs_f64();
    close_now(c);
    micros.sort_unstable();
    Ok(Latencies {
        count: micros.len(),
        errors: 0,
        secs,
        micros,
    })
}

pub struct IdleResult {
    /// Tunnels held open: as many as asked for, or fewer where the proxy could take no more.
    pub tunnels: usize,
    /// The proxy's open-file limit (soft), from /proc/PID/limits.
    pub fd_limit: Option<u64>,
    /// Why fewer tunnels than asked for were opened (the first failure).
    pub stopped: Option<String>,
    /// Userspace RSS growth of the proxy process, KiB per tunnel.
    pub rss_kib_per_tunnel: f64,
    /// Growth of the kernel's TCP memory (all sockets on the host, both ends), KiB per tunnel.
    pub tcp_mem_kib_per_tunnel: f64,
    /// Growth of the kernel's slab memory (host-wide: the proxy's two sockets, pipes and epoll
    /// items, and the client's and sink's sockets), KiB per tunnel.
    pub slab_kib_per_tunnel: f64,
}

/// Fewest idle tunnels a measurement is made with: a proxy that takes fewer fails the run.
const MIN_IDLE: usize = 200;

/// Opens up to `n` tunnels that stay idle (fewer when the proxy stops taking them, typically at
/// its open-file limit, but at least [`MIN_IDLE`]), measures, closes them.
pub fn idle(ep: &Endpoint, sink: &Sink, n: usize, pid: u32) -> Result<IdleResult> {
    sink.release_held();
    thread::sleep(Duration::from_millis(200));
    let fd_limit = sys::nofile_limit(pid);
    // This process holds both ends of every tunnel (client and sink): it must not be the one
    // that runs out of files.
    let own = sys::nofile_limit(std::process::id()).unwrap_or(1024) as usize;
    let n = n.min(own.saturating_sub(512) / 2);
    let rss0 = sys::rss_kib(pid);
    let mem0 = sys::tcp_mem_pages();
    let slab0 = sys::slab_kib();
    let mut conns = Vec::with_capacity(n);
    let mut stopped = None;
    for i in 0..n {
        let opened = open(ep, sink.addr).and_then(|mut c| {
            c.write_all(b"H")?;
            Ok(c)
        });
        match opened {
            Ok(c) => conns.push(c),
            Err(e) if i >= MIN_IDLE => {
                stopped = Some(format!("tunnel {} failed: {e:#}", i + 1));
                break;
            }
            Err(e) => return Err(e).with_context(|| format!("idle tunnel {i}")),
        }
    }
    let n = conns.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.held() < n {
        if Instant::now() > deadline {
            bail!("only {} of {n} idle tunnels reached the sink", sink.held());
        }
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(300));
    let rss1 = sys::rss_kib(pid);
    let mem1 = sys::tcp_mem_pages();
    let slab1 = sys::slab_kib();
    for c in conns {
        close_now(c);
    }
    sink.release_held();
    Ok(IdleResult {
        tunnels: n,
        fd_limit,
        stopped,
        rss_kib_per_tunnel: (rss1 as f64 - rss0 as f64) / n as f64,
        tcp_mem_kib_per_tunnel: (mem1 as f64 - mem0 as f64) * sys::page_kib() / n as f64,
        slab_kib_per_tunnel: (slab1 as f64 - slab0 as f64) / n as f64,
    })
}
