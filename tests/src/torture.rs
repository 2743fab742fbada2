//! Building blocks for the torture suite (`tests/tests/torture.rs`): byte
//! streams whose every byte is a known function of its offset, a sender and a
//! verifying receiver that both hash what they move, a symmetric "peer" that
//! runs one end of a tunnel, and an upstream test server that runs the other.
//!
//! Every stream is checked twice: on the fly, byte by byte against the
//! pattern (so the first lost, duplicated or reordered byte is reported with
//! its offset and, where it can be found, how far the stream jumped), and at
//! the end by comparing SHA-256 and length of what was sent with what arrived.
//!
//! A tunnel is described by a [`TunnelSpec`]. The client sends it, encoded, as
//! the first [`HEADER_LEN`] bytes through the tunnel; the [`Upstream`] server
//! reads it and plays its side of the same script. Both ends then run
//! [`run_peer`], and the test compares the two [`PeerReport`]s.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::Proxy;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A 64-bit mixer (splitmix64's finaliser).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An endless byte stream in which byte `i` is a pure function of
/// `(seed, i)`: any receiver can check any offset without state, and a
/// shifted, replayed or foreign chunk never matches by accident.
///
/// 8-byte word `i` is `table[i % 8192] ^ key(i / 8192)`: a 64 KiB random
/// table per seed, re-keyed every 64 KiB, so filling is about as cheap as a
/// memcpy while every 64-byte window within +-16 MiB stays unique.
#[derive(Clone)]
pub struct Pattern {
    seed: u64,
    table: Arc<Vec<u64>>,
}

const TABLE_BITS: u32 = 13;
const TABLE_WORDS: usize = 1 << TABLE_BITS;

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pattern({:#x})", self.seed)
    }
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let table = (0..TABLE_WORDS as u64)
            .map(|i| mix(seed ^ mix(i.wrapping_mul(GOLDEN).wrapping_add(GOLDEN))))
            .collect();
        Pattern {
            seed,
            table: Arc::new(table),
        }
    }

    fn key(&self, block: u64) -> u64 {
        mix(mix(self.seed.wrapping_add(GOLDEN)) ^ mix(block.wrapping_add(1)))
    }

    fn word(&self, index: u64) -> u64 {
        self.table[(index as usize) & (TABLE_WORDS - 1)] ^ self.key(index >> TABLE_BITS)
    }

    /// Fills `buf` with the stream's bytes starting at offset `off`.
    pub fn fill(&self, off: u64, buf: &mut [u8]) {
        let mut pos = off;
        let mut i = 0;
        while i < buf.len() && !pos.is_multiple_of(8) {
            buf[i] = self.word(pos / 8).to_le_bytes()[(pos % 8) as usize];
            i += 1;
            pos += 1;
        }
        let mut w = pos / 8;
        let words = (buf.len() - i) / 8;
        let mut done = 0;
        while done < words {
            let j = (w as usize) & (TABLE_WORDS - 1);
            let run = (TABLE_WORDS - j).min(words - done);
            let key = self.key(w >> TABLE_BITS);
            let out = &mut buf[i + done * 8..i + (done + run) * 8];
            for (c, t) in out.chunks_exact_mut(8).zip(&self.table[j..j + run]) {
                c.copy_from_slice(&(t ^ key).to_le_bytes());
            }
            done += run;
            w += run as u64;
        }
        let rem = &mut buf[i + words * 8..];
        if !rem.is_empty() {
            let last = self.word(w).to_le_bytes();
            let n = rem.len();
            rem.copy_from_slice(&last[..n]);
        }
    }

    /// The stream's bytes `[off, off + len)`.
    pub fn bytes(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(off, &mut v);
        v
    }
}

/// Explains a mismatch: `got` was received at stream offset `off` where the
/// pattern says something else. Looks for `got` up to 16 MiB before and after
/// `off` in the same stream to tell lost bytes from duplicated ones.
pub fn diagnose(p: &Pattern, off: u64, got: &[u8]) -> String {
    let show = got.len().min(16);
    let expected = p.bytes(off, show);
    let mut msg = format!(
        "first wrong byte at stream offset {off}: got {:02x?}, expected {:02x?}",
        &got[..show],
        expected
    );
    let needle = &got[..got.len().min(64)];
    if needle.len() < 8 {
        msg.push_str(&format!(
            "; only {} bytes available after the mismatch, too few to locate them",
            needle.len()
        ));
        return msg;
    }
    const SPAN: u64 = 16 << 20;
    let start = off.saturating_sub(SPAN);
    let window = p.bytes(start, (off - start + SPAN) as usize);
    let found = window
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| start + i as u64);
    match found {
        Some(src) if src > off => msg.push_str(&format!(
            "; {} bytes LOST: the data that arrived at offset {off} is stream offset {src}",
            src - off
        )),
        Some(src) if src < off => msg.push_str(&format!(
            "; {} bytes DUPLICATED: after offset {off} the stream replays from offset {src}",
            off - src
        )),
        Some(_) => msg.push_str("; the bytes right after the mismatch are in place (corruption)"),
        None => msg.push_str(&format!(
            "; the received bytes are not from this stream within +-{} MiB (foreign data or \
             corruption)",
            SPAN >> 20
        )),
    }
    msg
}

/// Random chunk sizes, log-uniform in `min..=max` so that tiny and huge
/// chunks are both common.
pub fn chunk_size(rng: &mut SmallRng, min: usize, max: usize) -> usize {
    let max = max.max(1);
    let min = min.clamp(1, max);
    let lo_bit = usize::BITS - 1 - min.leading_zeros(); // 2^lo_bit <= min
    let hi_bit = usize::BITS - 1 - max.leading_zeros();
    let k = rng.random_range(lo_bit..=hi_bit);
    let lo = (1usize << k).max(min);
    let hi = ((1usize << k) - 1 + (1usize << k)).min(max);
    rng.random_range(lo..=hi)
}

/// How a stream ended at one end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Sender: everything sent (and shut down if asked). Receiver: read returned 0.
    Done,
    /// An I/O error (reset, broken pipe, ...).
    Error(ErrorKind),
    /// The sender stopped on purpose to reset the connection.
    Reset,
    /// The receiver was told to stop (its socket is about to be reset).
    Aborted,
}

/// What one end sent or received on one direction.
#[derive(Clone, Debug)]
pub struct Flow {
    pub bytes: u64,
    pub sha: [u8; 32],
    pub end: End,
    /// When the first byte moved (or the flow started, if none did).
    pub first: Instant,
    /// When the flow ended.
    pub last: Instant,
    /// Number of write or read calls that moved data.
    pub ops: u64,
}

impl Flow {
    pub fn mb_per_s(&self) -> f64 {
        let secs = self.last.duration_since(self.first).as_secs_f64().max(1e-6);
        self.bytes as f64 / secs / 1e6
    }
}

/// One direction of a tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirSpec {
    /// Content: [`Pattern`] seed; also seeds the chunk-size generators.
    pub seed: u64,
    /// Bytes the sender sends.
    pub len: u64,
    /// Smallest and largest write.
    pub min_chunk: u64,
    pub max_chunk: u64,
    /// Smallest and largest read.
    pub min_read: u64,
    pub max_read: u64,
    /// The reader waits this long before its first read (lets buffers fill).
    pub reader_stall_ms: u64,
    /// The reader sleeps this long after every read (a slow reader).
    pub reader_sleep_us: u64,
    /// Send this many bytes, then wait until this end has received EOF on
    /// the other direction before sending the rest (half-close ordering).
    pub hold_at: Option<u64>,
    /// shutdown(SHUT_WR) after the last byte.
    pub shutdown: bool,
}

impl DirSpec {
    pub fn new(seed: u64, len: u64) -> DirSpec {
        DirSpec {
            seed,
            len,
            min_chunk: 1,
            max_chunk: 256 << 10,
            min_read: 1,
            max_read: 256 << 10,
            reader_stall_ms: 0,
            reader_sleep_us: 0,
            hold_at: None,
            shutdown: true,
        }
    }

    pub fn pattern(&self) -> Pattern {
        Pattern::new(self.seed)
    }
}

/// Which end of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// The script both ends of one tunnel follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelSpec {
    pub id: u64,
    /// An end that sees no progress for this long fails (ms).
    pub stall_ms: u64,
    /// Client to upstream.
    pub c2u: DirSpec,
    /// Upstream to client.
    pub u2c: DirSpec,
    /// `Some((side, n))`: that side resets its socket (SO_LINGER 0 + close)
    /// after sending `n` bytes.
    pub reset: Option<(Side, u64)>,
}

/// Length of the encoded [`TunnelSpec`] the client sends first.
pub const HEADER_LEN: usize = 8 * 26;
const MAGIC: u64 = 0x7370_6c69_6365_7031; // "splicep1"
const NONE: u64 = u64::MAX;

impl TunnelSpec {
    /// Both directions `len` bytes, random seeds derived from `seed`.
    pub fn symmetric(id: u64, seed: u64, c2u: u64, u2c: u64) -> TunnelSpec {
        TunnelSpec {
            id,
            stall_ms: 30_000,
            c2u: DirSpec::new(mix(seed ^ mix(id ^ 1)), c2u),
            u2c: DirSpec::new(mix(seed ^ mix(id ^ 2)), u2c),
            reset: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w: Vec<u64> = vec![MAGIC, self.id, self.stall_ms];
        for d in [&self.c2u, &self.u2c] {
            w.extend_from_slice(&[
                d.seed,
                d.len,
                d.min_chunk,
                d.max_chunk,
                d.min_read,
                d.max_read,
                d.reader_stall_ms,
                d.reader_sleep_us,
                d.hold_at.unwrap_or(NONE),
                d.shutdown as u64,
            ]);
        }
        match self.reset {
            None => w.extend_from_slice(&[0, 0]),
            Some((Side::Client, n)) => w.extend_from_slice(&[1, n]),
            Some((Side::Upstream, n)) => w.extend_from_slice(&[2, n]),
        }
        w.push(MAGIC);
        assert_eq!(w.len() * 8, HEADER_LEN);
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    pub fn decode(b: &[u8]) -> Result<TunnelSpec> {
        if b.len() != HEADER_LEN {
            bail!("header has {} bytes, want {HEADER_LEN}", b.len());
        }
        let w: Vec<u64> = b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if w[0] != MAGIC || w[25] != MAGIC {
            bail!("tunnel header corrupted in transit: {:02x?}", &b[..32]);
        }
        let dir = |o: usize| DirSpec {
            seed: w[o],
            len: w[o + 1],
            min_chunk: w[o + 2],
            max_chunk: w[o + 3],
            min_read: w[o + 4],
            max_read: w[o + 5],
            reader_stall_ms: w[o + 6],
            reader_sleep_us: w[o + 7],
            hold_at: (w[o + 8] != NONE).then_some(w[o + 8]),
            shutdown: w[o + 9] != 0,
        };
        let reset = match w[23] {
            0 => None,
            1 => Some((Side::Client, w[24])),
            2 => Some((Side::Upstream, w[24])),
            x => bail!("bad reset side {x}"),
        };
        Ok(TunnelSpec {
            id: w[1],
            stall_ms: w[2],
            c2u: dir(3),
            u2c: dir(13),
            reset,
        })
    }
}

/// A one-shot flag another thread can wait for.
#[derive(Default)]
pub struct Event {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Event {
    pub fn set(&self) {
        *self.set.lock().unwrap() = true;
        self.cv.notify_all();
    }

    /// True if set within `timeout`.
    pub fn wait(&self, timeout: Duration) -> bool {
        let g = self.set.lock().unwrap();
        let (g, _) = self.cv.wait_timeout_while(g, timeout, |s| !*s).unwrap();
        *g
    }
}

/// Signals between the two halves of a peer.
#[derive(Default)]
struct Signals {
    /// The receiver is done (EOF or error).
    eof: Event,
    /// The receiver must stop (the socket is about to be reset).
    abort: AtomicBool,
    /// The receiver failed; the sender should give up.
    failed: AtomicBool,
}

/// Socket timeout used to poll; stalls are measured separately.
const POLL: Duration = Duration::from_millis(200);

fn would_block(k: ErrorKind) -> bool {
    matches!(k, ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Sends `d.len` bytes of `d`'s pattern in random chunk sizes.
fn send_dir(
    s: &TcpStream,
    d: &DirSpec,
    stall: Duration,
    sig: &Signals,
    reset_at: Option<u64>,
    opts: &PeerOpts,
    what: &str,
) -> Result<Flow> {
    let mut s = s;
    let p = d.pattern();
    let mut rng = SmallRng::seed_from_u64(mix(d.seed ^ 0x5e4d));
    let mut buf = vec![0u8; d.max_chunk.max(1) as usize];
    let mut sha = Sha256::new();
    let start = Instant::now();
    let mut first = None;
    // Bytes the caller already sent (e.g. in the same write as the CONNECT head).
    let mut off = opts.already_sent.min(d.len);
    let mut pre = 0u64;
    while pre < off {
        let n = (buf.len() as u64).min(off - pre) as usize;
        p.fill(pre, &mut buf[..n]);
        sha.update(&buf[..n]);
        pre += n as u64;
    }
    let mut ops = 0u64;
    let mut end = End::Done;
    'outer: while off < d.len {
        if d.hold_at == Some(off) && !sig.eof.wait(stall) {
            bail!(
                "{what}: sent {off} bytes, then waited {stall:?} for EOF on the other direction; \
                 it never came"
            );
        }
        if sig.failed.load(Ordering::SeqCst) {
            bail!("{what}: stopped at offset {off}: this end's receiver failed");
        }
        if reset_at == Some(off) {
            end = End::Reset;
            break;
        }
        let mut n = (chunk_size(&mut rng, d.min_chunk as usize, buf.len()) as u64).min(d.len - off);
        for limit in [d.hold_at, reset_at].into_iter().flatten() {
            if limit > off {
                n = n.min(limit - off);
            }
        }
        let chunk = &mut buf[..n as usize];
        p.fill(off, chunk);
        let mut done = 0usize;
        let mut progress = Instant::now();
        while done < chunk.len() {
            match s.write(&chunk[done..]) {
                Ok(0) => bail!("{what}: write returned 0 at offset {}", off + done as u64),
                Ok(k) => {
                    sha.update(&chunk[done..done + k]);
                    done += k;
                    ops += 1;
                    if let Some(c) = &opts.progress {
                        c.store(off + done as u64, Ordering::Relaxed);
                    }
                    progress = Instant::now();
                    first.get_or_insert(progress);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if would_block(e.kind()) => {
                    if progress.elapsed() > stall {
                        bail!(
                            "{what}: send stalled for {stall:?} at offset {} of {} (peer not \
                             reading?)",
                            off + done as u64,
                            d.len
                        );
                    }
                }
                Err(e) => {
                    off += done as u64;
                    end = End::Error(e.kind());
                    break 'outer;
                }
            }
        }
        off += n;
    }
    if reset_at == Some(off) && end == End::Done {
        end = End::Reset;
    }
    if end == End::Done && d.shutdown {
        if let Err(e) = s.shutdown(Shutdown::Write) {
            end = End::Error(e.kind());
        }
    }
    Ok(Flow {
        bytes: off,
        sha: sha.finalize().into(),
        end,
        first: first.unwrap_or(start),
        last: Instant::now(),
        ops,
    })
}

/// Reads until EOF, an error, or `abort`, checking every byte against `d`'s
/// pattern. A wrong byte is an error with a diagnosis; so is a stall.
fn recv_dir(
    s: &TcpStream,
    d: &DirSpec,
    stall: Duration,
    abort: &AtomicBool,
    what: &str,
) -> Result<Flow> {
    let mut s = s;
    let p = d.pattern();
    let mut rng = SmallRng::seed_from_u64(mix(d.seed ^ 0x4ead));
    let cap = d.max_read.max(1) as usize;
    let mut buf = vec![0u8; cap];
    let mut want = vec![0u8; cap];
    let mut sha = Sha256::new();
    let start = Instant::now();
    if d.reader_stall_ms > 0 {
        std::thread::sleep(Duration::from_millis(d.reader_stall_ms));
    }
    let mut first = None;
    let mut off = 0u64;
    let mut ops = 0u64;
    let mut progress = Instant::now();
    let end = loop {
        if abort.load(Ordering::SeqCst) {
            break End::Aborted;
        }
        let n = chunk_size(&mut rng, d.min_read as usize, cap);
        match s.read(&mut buf[..n]) {
            Ok(0) => break End::Done,
            Ok(k) => {
                let got = &buf[..k];
                p.fill(off, &mut want[..k]);
                if got != &want[..k] {
                    let i = got
                        .iter()
                        .zip(&want[..k])
                        .position(|(a, b)| a != b)
                        .unwrap();
                    let mut tail = got[i..].to_vec();
                    // Read a little more so the diagnosis can locate the bytes.
                    let t0 = Instant::now();
                    while tail.len() < 64 && t0.elapsed() < Duration::from_secs(1) {
                        let mut more = [0u8; 64];
                        match s.read(&mut more[..64 - tail.len()]) {
                            Ok(0) => break,
                            Ok(m) => tail.extend_from_slice(&more[..m]),
                            Err(e) if would_block(e.kind()) => {}
                            Err(_) => break,
                        }
                    }
                    bail!(
                        "{what}: CORRUPT STREAM after {} good bytes ({} expected in all): {}",
                        off + i as u64,
                        d.len,
                        diagnose(&p, off + i as u64, &tail)
                    );
                }
                sha.update(got);
                off += k as u64;
                ops += 1;
                progress = Instant::now();
                first.get_or_insert(progress);
                if d.reader_sleep_us > 0 {
                    std::thread::sleep(Duration::from_micros(d.reader_sleep_us));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if would_block(e.kind()) => {
                if progress.elapsed() > stall {
                    if off >= d.len {
                        bail!(
                            "{what}: all {} bytes arrived ({off} received) but no EOF within \
                             {stall:?}",
                            d.len
                        );
                    }
                    bail!(
                        "{what}: receive stalled for {stall:?} at offset {off} of {}",
                        d.len
                    );
                }
            }
            Err(e) => break End::Error(e.kind()),
        }
    };
    Ok(Flow {
        bytes: off,
        sha: sha.finalize().into(),
        end,
        first: first.unwrap_or(start),
        last: Instant::now(),
        ops,
    })
}

/// What one end of a tunnel did.
#[derive(Clone, Debug)]
pub struct PeerReport {
    pub side: Side,
    pub sent: Flow,
    pub received: Flow,
    /// When this end reset its socket, if the script said so.
    pub reset_at: Option<Instant>,
    pub started: Instant,
}

/// Extras for [`run_peer_opts`].
#[derive(Clone, Default)]
pub struct PeerOpts {
    /// Updated with the number of bytes sent so far.
    pub progress: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The first bytes of this end's stream were already sent by the caller.
    pub already_sent: u64,
}

/// Runs one end of a tunnel on a connected socket (positioned after the
/// header): sends its direction and receives the other one concurrently,
/// then closes the socket (with RST if the script says this side resets).
pub fn run_peer(stream: TcpStream, spec: &TunnelSpec, side: Side) -> Result<PeerReport> {
    run_peer_opts(stream, spec, side, &PeerOpts::default())
}

/// [`run_peer`] with [`PeerOpts`].
pub fn run_peer_opts(
    stream: TcpStream,
    spec: &TunnelSpec,
    side: Side,
    opts: &PeerOpts,
) -> Result<PeerReport> {
    let (send, recv) = match side {
        Side::Client => (spec.c2u.clone(), spec.u2c.clone()),
        Side::Upstream => (spec.u2c.clone(), spec.c2u.clone()),
    };
    let tag = |d: &str| format!("tunnel {} {side:?} {d}", spec.id);
    let (stag, rtag) = match side {
        Side::Client => (tag("sending c2u"), tag("receiving u2c")),
        Side::Upstream => (tag("sending u2c"), tag("receiving c2u")),
    };
    let stall = Duration::from_millis(spec.stall_ms);
    let reset_at = spec.reset.filter(|(s, _)| *s == side).map(|(_, n)| n);
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(POLL))?;
    let started = Instant::now();
    let sig = Arc::new(Signals::default());
    let reader = stream.try_clone()?;
    let handle = {
        let sig = sig.clone();
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let r = recv_dir(&reader, &recv, stall, &sig.abort, &rtag);
                if r.is_err() {
                    sig.failed.store(true, Ordering::SeqCst);
                }
                sig.eof.set();
                drop(reader);
                r
            })?
    };
    let sent = send_dir(&stream, &send, stall, &sig, reset_at, opts, &stag);
    if matches!(&sent, Ok(f) if f.end == End::Reset) {
        set_linger_zero(&stream)?;
        sig.abort.store(true, Ordering::SeqCst);
        let received = handle.join().map_err(|_| anyhow!("receiver panicked"))?;
        drop(stream); // the last descriptor: RST goes out now
        return Ok(PeerReport {
            side,
            sent: sent?,
            received: received?,
            reset_at: Some(Instant::now()),
            started,
        });
    }
    if sent.is_err() {
        // Unblock the receiver; the sender's error is the story.
        sig.abort.store(true, Ordering::SeqCst);
    }
    let received = handle.join().map_err(|_| anyhow!("receiver panicked"))?;
    match (sent, received) {
        (Ok(sent), Ok(received)) => Ok(PeerReport {
            side,
            sent,
            received,
            reset_at: None,
            started,
        }),
        (_, Err(r)) => Err(r),
        (Err(s), Ok(_)) => Err(s),
    }
}

/// SO_LINGER {on, 0}: close() sends RST instead of FIN.
pub fn set_linger_zero(s: &TcpStream) -> Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd, pointer to a properly sized linger struct.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt SO_LINGER");
    }
    Ok(())
}

type Handler = Arc<dyn Fn(TcpStream) + Send + Sync>;

/// Where upstreams listen unless told otherwise: a free port on 127.0.0.1.
const LOOPBACK_V4: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A test server on loopback that runs a handler per connection on its own
/// thread. Stops accepting when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    reports: Arc<Reports>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Reports {
    map: Mutex<HashMap<u64, std::result::Result<PeerReport, String>>>,
    cv: Condvar,
    /// Connections that never delivered a complete header.
    orphans: Mutex<Vec<String>>,
}

impl Upstream {
    /// The torture peer: reads a [`TunnelSpec`] header, then plays the
    /// upstream side of it; results are collected by [`Upstream::report`].
    pub fn start() -> Result<Upstream> {
        let reports = Arc::new(Reports::default());
        let r = reports.clone();
        let handler: Handler = Arc::new(move |s: TcpStream| match serve_spec(s) {
            Ok((id, res)) => {
                let mut m = r.map.lock().unwrap();
                m.insert(id, res.map_err(|e| format!("{e:#}")));
                r.cv.notify_all();
            }
            Err(e) => r.orphans.lock().unwrap().push(e),
        });
        Self::start_inner(LOOPBACK_V4, handler, reports)
    }

    /// A server that runs `handler` for every connection.
    pub fn start_with(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Result<Upstream> {
        Self::start_with_at(LOOPBACK_V4, handler)
    }

    /// Like [`Upstream::start_with`], listening on `addr` (`[::1]:0` for an
    /// IPv6 upstream).
    pub fn start_with_at(
        addr: SocketAddr,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Result<Upstream> {
        Self::start_inner(addr, Arc::new(handler), Arc::new(Reports::default()))
    }

    fn start_inner(addr: SocketAddr, handler: Handler, reports: Arc<Reports>) -> Result<Upstream> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop2, accepted2) = (stop.clone(), accepted.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                accepted2.fetch_add(1, Ordering::SeqCst);
                let h = handler.clone();
                let spawned = std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn(move || h(conn));
                if let Err(e) = spawned {
                    eprintln!("upstream: cannot spawn a connection thread: {e}");
                }
            }
        });
        Ok(Upstream {
            addr,
            stop,
            accept: Some(accept),
            reports,
            accepted,
        })
    }

    /// "127.0.0.1:port" (or "[::1]:port"), the CONNECT target.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Waits up to `timeout` for the upstream side of tunnel `id`.
    pub fn report(&self, id: u64, timeout: Duration) -> Result<PeerReport> {
        let m = self.reports.map.lock().unwrap();
        let (mut m, _) = self
            .reports
            .cv
            .wait_timeout_while(m, timeout, |m| !m.contains_key(&id))
            .unwrap();
        match m.remove(&id) {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(anyhow!("upstream side: {e}")),
            None => {
                let orphans = self.reports.orphans.lock().unwrap();
                if orphans.is_empty() {
                    bail!("upstream side of tunnel {id} did not finish within {timeout:?}");
                }
                bail!(
                    "upstream side of tunnel {id} did not finish within {timeout:?}; meanwhile {} \
                     upstream connection(s) never delivered the tunnel header: {}",
                    orphans.len(),
                    orphans.join("; ")
                )
            }
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn serve_spec(mut s: TcpStream) -> std::result::Result<(u64, Result<PeerReport>), String> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    let t0 = Instant::now();
    if let Err(e) = s.set_read_timeout(Some(Duration::from_secs(30))) {
        return Err(format!("set timeout: {e}"));
    }
    while got < HEADER_LEN {
        match s.read(&mut head[got..]) {
            Ok(0) => {
                return Err(format!(
                    "an upstream connection got EOF after {got} of the {HEADER_LEN} header bytes \
                     ({:?} after accept)",
                    t0.elapsed()
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "an upstream connection failed after {got} of the {HEADER_LEN} header bytes \
                     ({:?} after accept): {e}",
                    t0.elapsed()
                ));
            }
        }
    }
    match TunnelSpec::decode(&head) {
        Ok(spec) => Ok((spec.id, run_peer(s, &spec, Side::Upstream))),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Both ends of one tunnel.
pub struct TunnelRun {
    pub spec: TunnelSpec,
    pub client: PeerReport,
    pub upstream: PeerReport,
}

/// Opens a tunnel through `proxy` to `up`, sends the header, runs the
/// client side and collects the upstream side.
pub fn run_tunnel(proxy: &Proxy, up: &Upstream, spec: &TunnelSpec) -> Result<TunnelRun> {
    let mut s = proxy
        .connect_tunnel(&up.target(), None)
        .with_context(|| format!("tunnel {}: CONNECT", spec.id))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&spec.encode())
        .with_context(|| format!("tunnel {}: send header", spec.id))?;
    finish_tunnel(s, up, spec)
}

/// Runs the client side on an open tunnel whose header is already sent.
pub fn finish_tunnel(s: TcpStream, up: &Upstream, spec: &TunnelSpec) -> Result<TunnelRun> {
    finish_tunnel_opts(s, up, spec, &PeerOpts::default())
}

/// [`finish_tunnel`] with [`PeerOpts`] for the client side.
pub fn finish_tunnel_opts(
    s: TcpStream,
    up: &Upstream,
    spec: &TunnelSpec,
    opts: &PeerOpts,
) -> Result<TunnelRun> {
    let client = run_peer_opts(s, spec, Side::Client, opts);
    let wait = Duration::from_millis(spec.stall_ms) + Duration::from_secs(5);
    let upstream = up.report(spec.id, wait);
    match (client, upstream) {
        (Ok(client), Ok(upstream)) => Ok(TunnelRun {
            spec: spec.clone(),
            client,
            upstream,
        }),
        (Err(c), Err(u)) => Err(anyhow!("client side: {c:#}\n    upstream side: {u:#}")),
        (Err(c), Ok(_)) => Err(c.context("client side")),
        (Ok(c), Err(u)) => Err(u.context(format!(
            "client side finished: sent {} bytes ({:?}), received {} bytes ({:?})",
            c.sent.bytes, c.sent.end, c.received.bytes, c.received.end
        ))),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

/// Checks one direction: the sender sent `len` bytes and finished, the
/// receiver got the same length and hash and then EOF.
pub fn check_flow(what: &str, len: u64, sent: &Flow, received: &Flow) -> Result<()> {
    if sent.end != End::Done || sent.bytes != len {
        bail!(
            "{what}: sender stopped after {} of {len} bytes ({:?})",
            sent.bytes,
            sent.end
        );
    }
    if received.bytes != sent.bytes {
        bail!(
            "{what}: LENGTH MISMATCH: sent {} bytes, received {} ({})",
            sent.bytes,
            received.bytes,
            if received.bytes < sent.bytes {
                format!("{} lost at the end", sent.bytes - received.bytes)
            } else {
                format!("{} extra", received.bytes - sent.bytes)
            }
        );
    }
    if received.sha != sent.sha {
        bail!(
            "{what}: SHA-256 MISMATCH over {} bytes: sent {}.., received {}..",
            sent.bytes,
            hex(&sent.sha),
            hex(&received.sha)
        );
    }
    if received.end != End::Done {
        bail!(
            "{what}: all {} bytes arrived but the stream then ended with {:?}, not EOF",
            received.bytes,
            received.end
        );
    }
    Ok(())
}

impl TunnelRun {
    /// Both directions complete and identical at both ends, both closed by EOF.
    pub fn check(&self) -> Result<()> {
        let id = self.spec.id;
        check_flow(
            &format!("tunnel {id} client->upstream"),
            self.spec.c2u.len,
            &self.client.sent,
            &self.upstream.received,
        )?;
        check_flow(
            &format!("tunnel {id} upstream->client"),
            self.spec.u2c.len,
            &self.upstream.sent,
            &self.client.received,
        )
    }

    /// Wall time from the first byte at either end to the last end.
    pub fn wall(&self) -> Duration {
        let first = [
            self.client.sent.first,
            self.upstream.sent.first,
            self.client.received.first,
            self.upstream.received.first,
        ]
        .into_iter()
        .min()
        .unwrap();
        let last = [self.client.received.last, self.upstream.received.last]
            .into_iter()
            .max()
            .unwrap();
        last.saturating_duration_since(first)
    }

    /// "c2u X MB/s, u2c Y MB/s" measured at the receivers.
    pub fn rates(&self) -> String {
        format!(
            "c2u {:.0} MB/s, u2c {:.0} MB/s",
            self.upstream.received.mb_per_s(),
            self.client.received.mb_per_s()
        )
    }
}

/// Samples a proxy's fd count in the background; [`FdSampler::stop`]
/// returns the largest value seen.
pub struct FdSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<usize>,
}

impl FdSampler {
    pub fn start(pid: u32) -> FdSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::SeqCst) {
                peak = peak.max(fd_count_of(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        FdSampler { stop, handle }
    }

    pub fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or(0)
    }
}

/// Open descriptors of process `pid` (0 if it is gone).
pub fn fd_count_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Polls the proxy's fd count until it is at most `baseline` or `within`
/// passes; returns the last count.
pub fn settle_fds(proxy: &Proxy, baseline: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = proxy.fd_count();
        if n <= baseline || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The seed for this run: `SPLICE_TEST_SEED` or random (printed by callers
/// so a failure can be replayed).
pub fn run_seed() -> u64 {
    std::env::var("SPLICE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_positional() {
        let p = Pattern::new(42);
        let all = p.bytes(0, 300_000);
        for off in [0usize, 1, 7, 8, 9, 13, 500, 65535, 65536, 65537, 131_000] {
            for len in [0usize, 1, 3, 8, 17, 100, 70_000, 150_000] {
                assert_eq!(p.bytes(off as u64, len), all[off..off + len]);
            }
        }
        // Whole-table shifts differ too.
        assert_ne!(p.bytes(0, 64), p.bytes(65536, 64));
        assert_ne!(Pattern::new(43).bytes(0, 64), p.bytes(0, 64));
    }

    #[test]
    fn diagnose_finds_shifts() {
        let p = Pattern::new(7);
        let d = diagnose(&p, 1000, &p.bytes(1300, 64));
        assert!(d.contains("300 bytes LOST"), "{d}");
        let d = diagnose(&p, 1000 + 65483, &p.bytes(1000, 64));
        assert!(d.contains("65483 bytes DUPLICATED"), "{d}");
        let d = diagnose(&p, 5 << 20, &p.bytes((5 << 20) - 65536, 64));
        assert!(d.contains("65536 bytes DUPLICATED"), "{d}");
        let d = diagnose(&p, 1000, &Pattern::new(8).bytes(0, 64));
        assert!(d.contains("not from this stream"), "{d}");
    }

    #[test]
    fn chunk_sizes_cover_range() {
        let mut rng = SmallRng::seed_from_u64(1);
        let v: Vec<usize> = (0..10_000)
            .map(|_| chunk_size(&mut rng, 1, 256 << 10))
            .collect();
        assert!(v.iter().all(|&n| (1..=256 << 10).contains(&n)));
        assert!(v.contains(&1));
        assert!(v.iter().any(|&n| n > 200 << 10));
        assert_eq!(chunk_size(&mut rng, 1, 1), 1);
        for _ in 0..1000 {
            let n = chunk_size(&mut rng, 3000, 70_000);
            assert!((3000..=70_000).contains(&n), "{n}");
        }
    }

    #[test]
    fn header_roundtrip() {
        let mut s = TunnelSpec::symmetric(9, 1234, 10, 20);
        s.u2c.hold_at = Some(5);
        s.reset = Some((Side::Upstream, 77));
        assert_eq!(TunnelSpec::decode(&s.encode()).unwrap(), s);
    }

    /// The peers against each other directly, no proxy: every scripted
    /// behaviour works and checks out.
    fn direct(spec: &TunnelSpec) -> TunnelRun {
        let up = Upstream::start().unwrap();
        let mut s = TcpStream::connect(up.addr).unwrap();
        s.write_all(&spec.encode()).unwrap();
        finish_tunnel(s, &up, spec).unwrap()
    }

    #[test]
    fn direct_bidi() {
        let spec = TunnelSpec::symmetric(1, 5, 8 << 20, 8 << 20);
        let run = direct(&spec);
        run.check().unwrap();
        eprintln!("direct bidi: {}", run.rates());
    }

    #[test]
    fn direct_half_close_both_orders() {
        for client_first in [true, false] {
            let mut spec = TunnelSpec::symmetric(2, 6, 4 << 20, 4 << 20);
            if client_first {
                spec.u2c.hold_at = Some(1 << 20);
            } else {
                spec.c2u.hold_at = Some(1 << 20);
            }
            direct(&spec).check().unwrap();
        }
    }

    #[test]
    fn direct_reset() {
        let mut spec = TunnelSpec::symmetric(3, 7, 1 << 30, 1 << 30);
        spec.reset = Some((Side::Upstream, 1 << 20));
        let run = direct(&spec);
        assert_eq!(run.upstream.sent.end, End::Reset);
        assert!(matches!(run.client.received.end, End::Error(_) | End::Done));
        assert!(
            matches!(run.client.sent.end, End::Error(_)),
            "{:?}",
            run.client
        );
    }

    #[test]
    fn corruption_is_reported() {
        // A "proxy" that drops 100 bytes in the middle.
        let up = Upstream::start().unwrap();
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let faddr = front.local_addr().unwrap();
        let upaddr = up.addr;
        std::thread::spawn(move || {
            let (mut c, _) = front.accept().unwrap();
            let mut u = TcpStream::connect(upaddr).unwrap();
            let mut u2 = u.try_clone().unwrap();
            let mut c2 = c.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(Shutdown::Write);
            });
            let mut buf = vec![0u8; HEADER_LEN + 5000];
            c.read_exact(&mut buf).unwrap();
            u.write_all(&buf[..HEADER_LEN + 4000]).unwrap();
            u.write_all(&buf[HEADER_LEN + 4100..]).unwrap();
            let _ = std::io::copy(&mut c, &mut u);
            let _ = u.shutdown(Shutdown::Write);
        });
        let mut spec = TunnelSpec::symmetric(4, 8, 1 << 20, 1000);
        spec.stall_ms = 5000;
        let mut s = TcpStream::connect(faddr).unwrap();
        s.write_all(&spec.encode()).unwrap();
        let err = format!("{:#}", finish_tunnel(s, &up, &spec).err().unwrap());
        assert!(err.contains("100 bytes LOST"), "{err}");
        assert!(err.contains("offset 4000"), "{err}");
    }
}
