//! The sockmap data path: the eBPF stream-verdict program redirects every
//! segment that arrives on one socket of a tunnel to the transmit side of
//! its peer, so tunnel bytes never reach userspace. Userspace only sets the
//! tunnel up, watches for FIN and RST, and tears it down.
//!
//! Handoff, in this order (see `proxy-ebpf/src/shared.rs` for the maps):
//! 1. `PEERS[cookie(client)] = upstream`, `PEERS[cookie(upstream)] = client`:
//!    redirect targets exist, nothing is armed yet ([`Sockmap::register`]);
//! 2. userspace writes the `200` to the client;
//! 3. each socket's "queued total" (bytes acked + bytes in its send queue) is
//!    recorded, both sockets go into `ARMED` (the program starts running on
//!    them) and `SO_RCVLOWAT` is set, which runs whatever arrived before
//!    arming through the program, in order ([`Registration::arm`]).
//!
//! Close: after a FIN from side A, the peer B is shut for writing only once
//! B's queued total has grown by every byte the program redirected from A,
//! so the FIN can never overtake data still in the kernel's redirect worker.
//!
//! The files of this folder (each child imports from `mod.rs`; `watch.rs` also from
//! `directions.rs`; nothing imports `watch.rs`):
//! - `mod.rs`: the loaded program and its maps ([`Sockmap`]), and a tunnel's place in them
//!   ([`Registration`], removed from every map on drop) with its byte counts by path;
//! - `handoff.rs`: steps 1 and 3 of the handoff (register, then arm);
//! - `directions.rs`: each direction's held bytes, and a reader-bound direction leaving the
//!   kernel path for splice(2) and coming back to it;
//! - `watch.rs`: the one watch loop of a tunnel (FIN, errors, hold wake-ups, spliced
//!   directions, pumps, the idle clock, shutdown).

mod backoff;
mod directions;
mod handoff;
mod watch;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, RingBuf, SockHash};
use tokio::sync::Notify;

use super::detach::{Detacher, Walker};
use super::holds::{Backlog, Counters, HoldWaiters, Overrun};
use super::pump::{self, Progress};
use crate::ebpf::{
    self, ARMED_MAP, BYTES_MAP, Counts, DETACH_MAP, EbpfError, HOLDS_MAP, KernelStats, LIMITS_MAP,
    Limit, MOVED_MAP, PEERS_MAP, WALK_MAP,
};

/// The loaded program and its maps, shared by all tunnels.
pub struct Sockmap {
    // Keeps the program and its attachment alive.
    _ebpf: Ebpf,
    peers: Mutex<SockHash<MapData, u64>>,
    armed: Mutex<SockHash<MapData, u64>>,
    bytes: Mutex<HashMap<MapData, u64, Counts>>,
    limits: Mutex<HashMap<MapData, u64, Limit>>,
    moved: Mutex<HashMap<MapData, u64, u64>>,
    /// The program's global counters; shared with the `/metrics` collector.
    stats: Arc<KernelStats>,
    waiters: Arc<HoldWaiters>,
    dispatcher: tokio::task::JoinHandle<()>,
    /// Forwards the program's aya-log records into the proxy's log.
    logs: Option<tokio::task::JoinHandle<()>>,
    backlog: Backlog,
    /// Takes sockets off the kernel path (`--sockmap-overrun splice`); `None` where the
    /// iterator could not be loaded, and then `splice_unavailable` says why.
    detacher: Option<Arc<Detacher>>,
    detach_task: Option<tokio::task::JoinHandle<()>>,
    splice_unavailable: Option<String>,
}

impl Drop for Sockmap {
    fn drop(&mut self) {
        self.dispatcher.abort();
        if let Some(t) = &self.detach_task {
            t.abort();
        }
        if let Some(logs) = &self.logs {
            logs.abort();
        }
    }
}

impl Counters for Sockmap {
    fn counts(&self, src_cookie: u64) -> (u64, u64) {
        let c = self
            .bytes
            .lock()
            .expect("bytes map lock")
            .get(&src_cookie, 0)
            .unwrap_or_default();
        (c.redirected, c.held)
    }

    fn set_moved(&self, src_cookie: u64, moved: u64) -> io::Result<()> {
        self.moved
            .lock()
            .expect("moved map lock")
            .insert(src_cookie, moved, 0)
            .map_err(io::Error::other)
    }

    fn set_limit(&self, src_cookie: u64, limit: Limit) -> io::Result<()> {
        self.limits
            .lock()
            .expect("limits map lock")
            .insert(src_cookie, limit, 0)
            .map_err(io::Error::other)
    }

    fn reset_seq(&self, src_cookie: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().expect("bytes map lock");
        let mut c = bytes.get(&src_cookie, 0).map_err(io::Error::other)?;
        c.next_seq = 0;
        bytes.insert(src_cookie, c, 0).map_err(io::Error::other)
    }
}

fn map_err(what: &str, e: impl std::fmt::Display) -> EbpfError {
    EbpfError::Other(format!("{what}: {e}"))
}

impl Sockmap {
    /// Loads the program and attaches it to the `ARMED` map; each direction of a tunnel may
    /// then hold at most `backlog` in the kernel. Needs a tokio runtime (the hold dispatcher).
    pub fn start(mut backlog: Backlog) -> Result<Sockmap, EbpfError> {
        let mut ebpf = ebpf::load()?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(EbpfError::Missing { kind: "map", name })
        };
        let peers =
            SockHash::try_from(take(&mut ebpf, PEERS_MAP)?).map_err(|e| map_err(PEERS_MAP, e))?;
        let armed =
            SockHash::try_from(take(&mut ebpf, ARMED_MAP)?).map_err(|e| map_err(ARMED_MAP, e))?;
        let bytes =
            HashMap::try_from(take(&mut ebpf, BYTES_MAP)?).map_err(|e| map_err(BYTES_MAP, e))?;
        let limits =
            HashMap::try_from(take(&mut ebpf, LIMITS_MAP)?).map_err(|e| map_err(LIMITS_MAP, e))?;
        let moved =
            HashMap::try_from(take(&mut ebpf, MOVED_MAP)?).map_err(|e| map_err(MOVED_MAP, e))?;
        let ring =
            RingBuf::try_from(take(&mut ebpf, HOLDS_MAP)?).map_err(|e| map_err(HOLDS_MAP, e))?;
        let stats = Arc::new(KernelStats::take(&mut ebpf)?);
        ebpf::verdict_program(&mut ebpf)?
            .attach(armed.fd())
            .map_err(|e| map_err("attaching the stream verdict program", e))?;
        let logs = match ebpf::forward_logs(&mut ebpf) {
            Ok(task) => Some(task),
            Err(e) => {
                tracing::warn!("sockmap: {e}; the program's diagnostics are not logged");
                None
            }
        };
        let (mut detacher, mut detach_task, mut splice_unavailable) = (None, None, None);
        if backlog.overrun() == Overrun::Splice {
            match start_detacher(&mut ebpf) {
                Ok((d, task)) => (detacher, detach_task) = (Some(d), Some(task)),
                Err(e) => {
                    splice_unavailable = Some(e.to_string());
                    backlog = backlog.with_overrun(Overrun::Relay);
                }
            }
        }
        let waiters = Arc::new(HoldWaiters::default());
        let dispatcher = tokio::spawn({
            let (waiters, stats) = (waiters.clone(), stats.clone());
            let lost = move || stats.read().ok().map(|s| s.lost_wakeups);
            async move {
                if let Err(e) = waiters.dispatch(ring, lost).await {
                    tracing::error!("sockmap: reading the holds ring buffer failed: {e}");
                }
            }
        });
        Ok(Sockmap {
            _ebpf: ebpf,
            peers: Mutex::new(peers),
            armed: Mutex::new(armed),
            bytes: Mutex::new(bytes),
            limits: Mutex::new(limits),
            moved: Mutex::new(moved),
            stats,
            waiters,
            dispatcher,
            logs,
            backlog,
            detacher,
            detach_task,
            splice_unavailable,
        })
    }

    /// Why `--sockmap-overrun splice` fell back to `relay` on this kernel, if it did.
    pub fn splice_unavailable(&self) -> Option<&str> {
        self.splice_unavailable.as_deref()
    }

    /// Times one walk of the detach iterator over every TCP socket of the namespace (asking
    /// for a cookie no socket has); `None` where there is no iterator.
    pub async fn time_walk(&self) -> Option<Duration> {
        let d = self.detacher.as_ref()?;
        // The fastest of three: the first also starts the blocking thread it runs on.
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            d.detach(0).await;
            best = best.min(t.elapsed());
        }
        Some(best)
    }

    /// Walks of the TCP iterator so far, and the seconds they took.
    pub fn walk_stats(&self) -> Option<super::detach::WalkStats> {
        self.detacher.as_ref().map(|d| d.stats())
    }

    /// Bytes the program has redirected from the socket with this cookie.
    fn redirected(&self, cookie: u64) -> u64 {
        self.counts(cookie).0
    }

    /// The program's global counters (every tunnel, the start-up self-check included).
    pub fn kernel_stats(&self) -> Arc<KernelStats> {
        self.stats.clone()
    }

    /// The per-direction bound this data path enforces.
    pub fn backlog(&self) -> Backlog {
        self.backlog
    }

    /// Entries in the `PEERS` map (two per open tunnel).
    pub fn peer_entries(&self) -> usize {
        self.peers.lock().expect("peers map lock").keys().count()
    }
}

/// Loads the detach iterator and starts the task that batches its walks.
fn start_detacher(
    ebpf: &mut Ebpf,
) -> Result<(Arc<Detacher>, tokio::task::JoinHandle<()>), EbpfError> {
    let prog = ebpf::load_detach(ebpf)?;
    let map = ebpf.take_map(DETACH_MAP).ok_or(EbpfError::Missing {
        kind: "map",
        name: DETACH_MAP,
    })?;
    let requests = HashMap::try_from(map).map_err(|e| map_err(DETACH_MAP, e))?;
    let map = ebpf.take_map(WALK_MAP).ok_or(EbpfError::Missing {
        kind: "map",
        name: WALK_MAP,
    })?;
    let left = Array::try_from(map).map_err(|e| map_err(WALK_MAP, e))?;
    let walker = Walker::new(requests, left, &prog)
        .map_err(|e| EbpfError::Unsupported(format!("attaching the TCP iterator: {e}")))?;
    // A walk with nothing asked proves the kernel runs the iterator here.
    walker
        .walk_empty()
        .map_err(|e| EbpfError::Unsupported(format!("walking the TCP iterator: {e}")))?;
    Ok(Detacher::start(walker))
}

/// Who forwards an armed tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Armed {
    /// The program, for at least one socket: watch it with [`Registration::run`].
    Kernel,
    /// Userspace: neither socket could join the sockmap (both half-closed).
    Userspace,
}

/// A tunnel's place in the maps; removed from all of them on drop, so no
/// entry outlives its tunnel.
pub struct Registration<'a> {
    sockmap: &'a Sockmap,
    client: u64,
    upstream: u64,
    in_peers: bool,
    armed: bool,
    base_client: u64,
    base_upstream: u64,
    /// Bytes userspace moved client → upstream while emptying the queue.
    forwarded_early: u64,
    /// The client's receive queue was seen empty before it joined the maps.
    client_clean: bool,
    client_armed: bool,
    upstream_armed: bool,
    /// Bytes userspace forwarded: for a socket that could not be armed, and held bytes moved.
    userspace: Progress,
    /// Times a direction started relaying (`--sockmap-overrun relay`).
    relays: AtomicU64,
    /// LIMITS and MOVED hold entries for both sockets.
    bounded: bool,
    /// Wake-ups for the client's (up) and the upstream's (down) holds.
    up_holds: Option<Arc<Notify>>,
    down_holds: Option<Arc<Notify>>,
    /// Bytes spliced client → upstream and upstream → client while off the kernel path.
    spliced: Progress,
    /// Times a direction left the kernel path for splice, and came back to it.
    detaches: AtomicU64,
    rearms: AtomicU64,
}

impl Registration<'_> {
    /// Both sockets are armed: the kernel forwards both directions.
    pub fn fully_armed(&self) -> bool {
        self.client_armed && self.upstream_armed
    }

    fn cookie(&self, dir: Dir) -> u64 {
        match dir {
            Dir::Up => self.client,
            Dir::Down => self.upstream,
        }
    }

    /// Times a direction left the kernel path for splice, and came back.
    pub fn transitions(&self) -> (u64, u64) {
        (
            self.detaches.load(Ordering::Relaxed),
            self.rearms.load(Ordering::Relaxed),
        )
    }

    /// Bytes spliced client → upstream and upstream → client.
    pub fn spliced_bytes(&self) -> (u64, u64) {
        (
            self.spliced.up.load(Ordering::Relaxed),
            self.spliced.down.load(Ordering::Relaxed),
        )
    }

    /// Bytes userspace read and wrote itself (held bytes it moved or relayed, a socket that
    /// could not be armed, the early bytes), both directions together.
    pub fn relayed_bytes(&self) -> u64 {
        self.forwarded_early
            + self.userspace.up.load(Ordering::Relaxed)
            + self.userspace.down.load(Ordering::Relaxed)
    }

    /// Bytes the program redirected client → upstream and upstream → client.
    pub fn kernel_bytes(&self) -> (u64, u64) {
        (
            self.sockmap.redirected(self.client),
            self.sockmap.redirected(self.upstream),
        )
    }

    /// Times a direction of this tunnel started relaying.
    pub fn relays(&self) -> u64 {
        self.relays.load(Ordering::Relaxed)
    }

    /// Bytes forwarded client → upstream and upstream → client, however they went.
    pub fn bytes(&self) -> (u64, u64) {
        let (su, sd) = self.spliced_bytes();
        (
            self.forwarded_early
                + self.sockmap.redirected(self.client)
                + self.userspace.up.load(Ordering::Relaxed)
                + su,
            self.sockmap.redirected(self.upstream)
                + self.userspace.down.load(Ordering::Relaxed)
                + sd,
        )
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        // Leave ARMED first (no program runs any more), then the rest.
        if self.armed {
            let mut armed = self.sockmap.armed.lock().expect("armed map lock");
            let _ = armed.remove(&self.client);
            let _ = armed.remove(&self.upstream);
        }
        if self.in_peers {
            let mut peers = self.sockmap.peers.lock().expect("peers map lock");
            let _ = peers.remove(&self.client);
            let _ = peers.remove(&self.upstream);
        }
        if self.bounded {
            let mut limits = self.sockmap.limits.lock().expect("limits map lock");
            let mut moved = self.sockmap.moved.lock().expect("moved map lock");
            for c in [self.client, self.upstream] {
                let _ = limits.remove(&c);
                let _ = moved.remove(&c);
                self.sockmap.waiters.forget(c);
            }
        }
        let mut bytes = self.sockmap.bytes.lock().expect("bytes map lock");
        let _ = bytes.remove(&self.client);
        let _ = bytes.remove(&self.upstream);
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Up,
    Down,
}

impl From<Dir> for pump::Dir {
    fn from(d: Dir) -> pump::Dir {
        match d {
            Dir::Up => pump::Dir::Up,
            Dir::Down => pump::Dir::Down,
        }
    }
}
