//! The sockmap data path: the eBPF stream-verdict program redirects every
//! segment that arrives on one socket of a tunnel to the transmit side of
//! its peer, so tunnel bytes never reach userspace. Userspace only sets the
//! tunnel up, watches for FIN and RST, and tears it down.
//!
//! By default (`--sockmap-start splice`) each direction starts forwarded by splice(2) and
//! joins the kernel path at its first quiet period, the way a spliced direction returns to it
//! (`directions.rs`); the tunnel's first return makes each socket the other's redirect target
//! ([`Registration::join_maps`]). A tunnel that closes before its first byte never leaves
//! tokio's reactor (`tunnel/mod.rs`).
//!
//! With `--sockmap-start kernel` the handoff is, in this order (see `proxy-common` for the
//! maps):
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
//! `directions.rs` and `closes.rs`; nothing imports `watch.rs`):
//! - `mod.rs`: the loaded program and its maps ([`Sockmap`]), and a tunnel's place in them
//!   ([`Registration`], removed from every map on drop) with its byte counts by path;
//! - `maps.rs`: the per-tunnel map operations, as `bpf()` calls that need no lock;
//! - `closes.rs`: the one epoll set that hears FIN and errors of every fully armed tunnel;
//! - `handoff.rs`: steps 1 and 3 of the handoff (register, then arm), a spliced start, and
//!   joining the maps;
//! - `directions.rs`: each direction's held bytes, and a reader-bound direction leaving the
//!   kernel path for splice(2) and coming back to it;
//! - `watch.rs`: the one watch loop of a tunnel (FIN, errors, hold wake-ups, spliced
//!   directions, pumps, the idle clock, shutdown).

mod backoff;
mod closes;
mod directions;
mod handoff;
#[allow(unsafe_code)]
mod maps;
mod watch;

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{Array, HashMap, RingBuf, SockHash};
use tokio::sync::Notify;

use closes::SharedCloses;
use maps::RawMap;

use super::detach::{Detacher, Walker};
use super::holds::{Backlog, Counters, HoldWaiters, Overrun};
use super::pump::{self, Progress};
use crate::ebpf::{
    self, ARMED_MAP, BYTES_MAP, Counts, DEFAULT_LIMIT_MAP, DETACH_MAP, EbpfError, HOLDS_MAP,
    KernelStats, LIMITS_MAP, Limit, MOVED_MAP, PEERS_MAP, WALK_MAP,
};

/// The loaded program and its maps, shared by all tunnels.
pub struct Sockmap {
    // Keeps the program and its attachment alive.
    _ebpf: Ebpf,
    /// Socket cookie -> its peer (the value written is the peer's fd).
    peers: RawMap<u64, u32>,
    /// Socket cookie -> the socket itself: the verdict program runs on these.
    armed: RawMap<u64, u32>,
    bytes: RawMap<u64, Counts>,
    limits: RawMap<u64, Limit>,
    moved: RawMap<u64, u64>,
    /// The program's global counters; shared with the `/metrics` collector.
    stats: Arc<KernelStats>,
    waiters: Arc<HoldWaiters>,
    dispatcher: tokio::task::JoinHandle<()>,
    /// FIN and errors of every fully armed tunnel, and the task that hands them out.
    closes: Arc<SharedCloses>,
    closes_task: tokio::task::JoinHandle<()>,
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
        self.closes_task.abort();
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
        let c = self.bytes.lookup(&src_cookie).ok().flatten();
        c.map_or((0, 0), |c| (c.redirected, c.held))
    }

    fn set_moved(&self, src_cookie: u64, moved: u64) -> io::Result<()> {
        self.moved.update(&src_cookie, &moved)
    }

    fn set_limit(&self, src_cookie: u64, limit: Limit) -> io::Result<()> {
        self.limits.update(&src_cookie, &limit)
    }

    fn reset_seq(&self, src_cookie: u64) -> io::Result<()> {
        let Some(mut c) = self.bytes.lookup(&src_cookie)? else {
            // Not created yet: the program starts it with next_seq 0.
            return Ok(());
        };
        c.next_seq = 0;
        self.bytes.update(&src_cookie, &c)
    }
}

/// Largest `base` (bytes userspace wrote to the peer before arming) a direction may have and
/// still be bounded by the program's default limit, which has base 0: its bound is then loose
/// by at most this much. The client's base is the 39-byte `200`; the upstream's is 0 unless the
/// client sent bytes before its `200` arrived.
const DEFAULT_LIMIT_SLACK: u64 = 4096;

/// The program's counters as a tunnel's movers use them: as [`Sockmap`]'s, noting when the
/// tunnel's sockets get `LIMITS` or `MOVED` entries of their own, to remove them at its end.
impl Counters for Registration<'_> {
    fn counts(&self, src_cookie: u64) -> (u64, u64) {
        self.sockmap.counts(src_cookie)
    }

    fn set_moved(&self, src_cookie: u64, moved: u64) -> io::Result<()> {
        self.own_limits.store(true, Ordering::Relaxed);
        self.sockmap.set_moved(src_cookie, moved)
    }

    fn set_limit(&self, src_cookie: u64, limit: Limit) -> io::Result<()> {
        self.own_limits.store(true, Ordering::Relaxed);
        self.sockmap.set_limit(src_cookie, limit)
    }

    fn reset_seq(&self, src_cookie: u64) -> io::Result<()> {
        self.sockmap.reset_seq(src_cookie)
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
        fn raw<K: aya::Pod, V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<RawMap<K, V>, EbpfError> {
            let map = ebpf
                .take_map(name)
                .ok_or(EbpfError::Missing { kind: "map", name })?;
            RawMap::new(map).map_err(|e| map_err(name, e))
        }
        let peers = raw(&mut ebpf, PEERS_MAP)?;
        let armed_map = take(&mut ebpf, ARMED_MAP)?;
        let bytes = raw(&mut ebpf, BYTES_MAP)?;
        let limits = raw(&mut ebpf, LIMITS_MAP)?;
        let moved = raw(&mut ebpf, MOVED_MAP)?;
        let ring =
            RingBuf::try_from(take(&mut ebpf, HOLDS_MAP)?).map_err(|e| map_err(HOLDS_MAP, e))?;
        let stats = Arc::new(KernelStats::take(&mut ebpf)?);
        {
            let armed =
                SockHash::<_, u64>::try_from(&armed_map).map_err(|e| map_err(ARMED_MAP, e))?;
            ebpf::verdict_program(&mut ebpf)?
                .attach(armed.fd())
                .map_err(|e| map_err("attaching the stream verdict program", e))?;
        }
        let armed = RawMap::new(armed_map).map_err(|e| map_err(ARMED_MAP, e))?;
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
        // The bound of every direction without a LIMITS entry of its own (most of them).
        let mut default_limit = Array::<_, Limit>::try_from(take(&mut ebpf, DEFAULT_LIMIT_MAP)?)
            .map_err(|e| map_err(DEFAULT_LIMIT_MAP, e))?;
        default_limit
            .set(0, backlog.limit(0, false), 0)
            .map_err(|e| map_err(DEFAULT_LIMIT_MAP, e))?;
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
        let closes = SharedCloses::new()
            .map_err(|e| EbpfError::Other(format!("creating the epoll set for FIN: {e}")))?;
        let closes_task = tokio::spawn({
            let closes = closes.clone();
            async move {
                if let Err(e) = closes.dispatch().await {
                    tracing::error!("sockmap: reading the epoll set for FIN failed: {e}");
                }
            }
        });
        Ok(Sockmap {
            _ebpf: ebpf,
            closes,
            closes_task,
            peers,
            armed,
            bytes,
            limits,
            moved,
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

    /// Entries in each per-tunnel map: `PEERS`, `ARMED`, `BYTES`, `LIMITS`, `MOVED`.
    pub fn map_entries(&self) -> [usize; 5] {
        [
            self.peers.len(),
            self.armed.len(),
            self.bytes.len(),
            self.limits.len(),
            self.moved.len(),
        ]
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
    /// The sockets' cookies (0 until a spliced start reads them, see `start_spliced`).
    client: u64,
    upstream: u64,
    /// The sockets' descriptors, for their `PEERS` entries.
    client_fd: RawFd,
    upstream_fd: RawFd,
    /// Each direction starts spliced and joins the maps at its first return (`Start::Splice`).
    splice_first: bool,
    /// The sockets have `BYTES` and `PEERS` entries (and may have `ARMED` ones): set before the
    /// first is written, so a partial join is undone too.
    joined: AtomicBool,
    /// Joining failed (a full map): each direction stays spliced.
    join_failed: AtomicBool,
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
    /// LIMITS and MOVED may hold entries for this tunnel's sockets: written when it was armed
    /// (a base too large for the default limit) or since (a hold episode, a return to the
    /// kernel path; see the `Counters` impl).
    own_limits: AtomicBool,
    /// Wake-ups for the client's (up) and the upstream's (down) holds.
    up_holds: Option<Arc<Notify>>,
    down_holds: Option<Arc<Notify>>,
    /// Bytes spliced client → upstream and upstream → client while off the kernel path.
    spliced: Progress,
    /// Times a direction left the kernel path for splice, and came back to it.
    detaches: AtomicU64,
    rearms: AtomicU64,
    /// The tunnel's sockets are closed ([`Registration::close`]): the kernel took them out of
    /// `PEERS` and `ARMED` as they closed.
    sockets_closed: bool,
    /// Their `BYTES` entries were taken out by [`Registration::close`].
    bytes_taken: bool,
}

impl Registration<'_> {
    /// Both directions start spliced and join the kernel path later (`Start::Splice`).
    pub fn splice_first(&self) -> bool {
        self.splice_first
    }

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

impl Registration<'_> {
    /// The tunnel's counts by path, with the program's counts of the two directions.
    fn tally_with(&self, (ku, kd): (u64, u64)) -> Tally {
        let (su, sd) = self.spliced_bytes();
        let (detaches, rearms) = self.transitions();
        Tally {
            up: self.forwarded_early + ku + self.userspace.up.load(Ordering::Relaxed) + su,
            down: kd + self.userspace.down.load(Ordering::Relaxed) + sd,
            kernel: ku + kd,
            spliced: su + sd,
            relayed: self.relayed_bytes(),
            relays: self.relays(),
            detaches,
            rearms,
        }
    }

    /// Ends the tunnel: closes its sockets, then takes its counts out of the maps, final
    /// since no program can run for a closed socket. Closing a socket takes it out of `PEERS`
    /// and `ARMED` in the kernel (`sock_map_close`), so those need no call of their own.
    pub fn close<S>(mut self, sockets: Option<(S, S)>) -> Tally {
        let Some(sockets) = sockets else {
            return self.tally_with(self.kernel_bytes());
        };
        drop(sockets);
        self.sockets_closed = true;
        if !*self.joined.get_mut() {
            // Never in the maps: everything went by splice (or userspace).
            return self.tally_with((0, 0));
        }
        let take = |cookie| {
            let counts = self.sockmap.bytes.take(&cookie).ok().flatten();
            counts.map_or(0, |c| c.redirected)
        };
        let kernel = (take(self.client), take(self.upstream));
        self.bytes_taken = true;
        self.tally_with(kernel)
    }
}

/// A tunnel's bytes by path, for its access-log line and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Bytes forwarded client → upstream and upstream → client, however they went.
    pub up: u64,
    pub down: u64,
    /// Of those, bytes the program redirected, spliced, and copied by userspace.
    pub kernel: u64,
    pub spliced: u64,
    pub relayed: u64,
    /// Times a direction started relaying, left the kernel path for splice, and came back.
    pub relays: u64,
    pub detaches: u64,
    pub rearms: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let both = [self.client, self.upstream];
        if !self.sockets_closed && *self.joined.get_mut() {
            // Leave ARMED first (no program runs any more), then PEERS.
            let _ = self.sockmap.armed.delete_all(&both);
            let _ = self.sockmap.peers.delete_all(&both);
        }
        if *self.own_limits.get_mut() {
            let _ = self.sockmap.limits.delete_all(&both);
            let _ = self.sockmap.moved.delete_all(&both);
        }
        if self.up_holds.is_some() {
            for c in both {
                self.sockmap.waiters.forget(c);
            }
        }
        if !self.bytes_taken && *self.joined.get_mut() {
            let _ = self.sockmap.bytes.delete_all(&both);
        }
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
