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

use std::future::Future;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, RingBuf, SockHash};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::detach::{Answer, Detacher, Walker};
use super::end::End;
use super::holds::{Backlog, Counters, HoldWaiters, MoveError, Mover, Overrun, SPLICE_QUIET, Step};
use super::pump::{self, Progress, PumpError};
use super::spliced::{Spliced, Stop};
use super::sys::{self, established, queued_total, set_rcvlowat, set_sndbuf};
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

    /// Step 1 of the handoff: makes each socket the other's redirect target.
    /// Nothing is redirected until [`Registration::arm`].
    pub async fn register<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
    ) -> io::Result<Registration<'a>> {
        // Userspace read the request head from the client, possibly ending
        // inside an skb. The kernel hands whole skbs to the program
        // (tcp_read_skb ignores how much of one was already read), so a
        // partly read skb would be redirected again from its start: the
        // head and early bytes would reach upstream twice. So the client is
        // armed only if its queue has been seen empty, and that is checked
        // here, while it is still a plain socket: once in a sockmap, FIONREAD
        // counts only the psock's queue.
        let (moved, client_clean) = empty_queue(client, upstream).await?;
        let mut reg = Registration {
            sockmap: self,
            client: sys::cookie(client)?,
            upstream: sys::cookie(upstream)?,
            in_peers: false,
            armed: false,
            base_client: 0,
            base_upstream: 0,
            forwarded_early: moved,
            client_clean,
            client_armed: false,
            upstream_armed: false,
            userspace: Progress::new(),
            relays: AtomicU64::new(0),
            bounded: false,
            up_holds: None,
            down_holds: None,
            spliced: Progress::new(),
            detaches: AtomicU64::new(0),
            rearms: AtomicU64::new(0),
        };
        {
            let mut bytes = self.bytes.lock().expect("bytes map lock");
            for c in [reg.client, reg.upstream] {
                bytes
                    .insert(c, Counts::default(), 0)
                    .map_err(io::Error::other)?;
            }
        }
        let mut peers = self.peers.lock().expect("peers map lock");
        peers
            .insert(reg.client, upstream.as_raw_fd(), 0)
            .map_err(io::Error::other)?;
        reg.in_peers = true;
        peers
            .insert(reg.upstream, client.as_raw_fd(), 0)
            .map_err(io::Error::other)?;
        Ok(reg)
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

type PumpFuture<'f> = Pin<Box<dyn Future<Output = Result<(), PumpError>> + Send + 'f>>;

async fn run_pump(pump: &mut Option<PumpFuture<'_>>) -> Result<(), PumpError> {
    match pump {
        Some(p) => p.await,
        None => std::future::pending().await,
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
    /// Step 3 of the handoff, after the 200 was written. A socket that is
    /// no longer ESTABLISHED (its remote already sent FIN) cannot join a
    /// sockmap: then the tunnel is left to userspace ([`Armed::Userspace`]).
    pub async fn arm(&mut self, client: &TcpStream, upstream: &TcpStream) -> io::Result<Armed> {
        if !established(client.as_raw_fd()) || !established(upstream.as_raw_fd()) {
            return Ok(Armed::Userspace);
        }
        // Nothing is armed yet, so these totals only hold what userspace wrote.
        self.base_client = queued_total(client.as_raw_fd())?;
        self.base_upstream = queued_total(upstream.as_raw_fd())?;
        self.bound(client, upstream)?;
        self.armed = true;
        // Each socket is armed unless its remote sent FIN since the check;
        // then userspace forwards that socket's direction. Nothing already
        // armed is taken out again: that could drop a segment in flight
        // (docs/kernel-notes.md).
        self.client_armed = self.client_clean && self.arm_if_established(self.client, client)?;
        self.upstream_armed = self.arm_if_established(self.upstream, upstream)?;
        Ok(if self.client_armed || self.upstream_armed {
            Armed::Kernel
        } else {
            Armed::Userspace
        })
    }

    /// Sets the backlog bound of both directions before either socket is armed: socket
    /// buffers, the program's LIMITS and MOVED entries, and the hold wake-ups.
    fn bound(&mut self, client: &TcpStream, upstream: &TcpStream) -> io::Result<()> {
        let backlog = self.sockmap.backlog;
        for s in [client, upstream] {
            set_buffers(s.as_raw_fd(), backlog)?;
        }
        {
            let mut limits = self.sockmap.limits.lock().expect("limits map lock");
            let mut moved = self.sockmap.moved.lock().expect("moved map lock");
            self.bounded = true;
            for (src, dst_base) in [
                (self.client, self.base_upstream),
                (self.upstream, self.base_client),
            ] {
                moved.insert(src, 0, 0).map_err(io::Error::other)?;
                limits
                    .insert(src, backlog.limit(dst_base, false), 0)
                    .map_err(io::Error::other)?;
            }
        }
        self.up_holds = Some(self.sockmap.waiters.watch(self.client));
        self.down_holds = Some(self.sockmap.waiters.watch(self.upstream));
        Ok(())
    }

    /// The movers of held bytes for both directions of this tunnel.
    fn movers(&self, client: RawFd, upstream: RawFd) -> Movers {
        let backlog = self.sockmap.backlog;
        Movers {
            up: Mover::new(self.client, self.base_upstream, backlog),
            down: Mover::new(self.upstream, self.base_client, backlog),
            up_moving: false,
            down_moving: false,
            up_spliced: None,
            down_spliced: None,
            client,
            upstream,
        }
    }

    /// Moves held bytes of one direction; `Ok(true)` while some remain.
    fn step(
        &self,
        mover: &mut Mover,
        src: RawFd,
        dst: RawFd,
        dir: Dir,
    ) -> Result<bool, (End, Option<String>)> {
        let (before, relays) = (mover.moved(), mover.relays());
        let result = mover.step(self.sockmap, src, dst);
        let moved = (mover.moved() - before) as usize;
        if moved > 0 {
            self.userspace.add(dir.into(), moved);
        }
        self.relays
            .fetch_add(mover.relays() - relays, Ordering::Relaxed);
        match result {
            Ok(Step::Idle) => Ok(false),
            Ok(Step::Wait) => Ok(true),
            Err(e) => Err(self.move_error(e, dir)),
        }
    }

    fn arm_if_established(&self, cookie: u64, sock: &TcpStream) -> io::Result<bool> {
        match self.arm_socket(cookie, sock.as_raw_fd()) {
            Ok(()) => Ok(true),
            Err(_) if !established(sock.as_raw_fd()) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Starts the verdict program on one socket and runs what it queued so
    /// far through it (SO_RCVLOWAT makes TCP call data_ready).
    fn arm_socket(&self, cookie: u64, fd: RawFd) -> io::Result<()> {
        self.sockmap
            .armed
            .lock()
            .expect("armed map lock")
            .insert(cookie, fd, 0)
            .map_err(io::Error::other)?;
        set_rcvlowat(fd, 1)
    }

    /// After a wake-up for `dir`: moves held bytes, and takes the direction off the kernel
    /// path when its mover asks (`--sockmap-overrun splice`).
    async fn advance(&self, movers: &mut Movers, dir: Dir) -> Result<(), (End, Option<String>)> {
        if movers.spliced(dir).is_some() {
            // A wake-up from before the detach.
            return Ok(());
        }
        movers.step(self, dir)?;
        let (src, dst) = movers.fds(dir);
        let cookie = self.cookie(dir);
        let failed = |e: io::Error| (End::Failed, Some(format!("leaving the kernel path: {e}")));
        if !movers.mover(dir).wants_detach() {
            return Ok(());
        }
        let asked = std::time::Instant::now();
        let answer = match &self.sockmap.detacher {
            Some(d) => d.detach(cookie).await,
            None => Answer::Failed("no detach iterator".into()),
        };
        tracing::debug!(
            "sockmap: detach of {cookie}: {answer:?} after {:?}",
            asked.elapsed()
        );
        let relay_instead = |movers: &mut Movers| {
            let r = movers
                .mover(dir)
                .relay_instead(self.sockmap, std::time::Instant::now());
            self.relays.fetch_add(1, Ordering::Relaxed);
            movers.set_moving(dir, true);
            r.map_err(|e| self.move_error(e, dir))
        };
        match answer {
            Answer::Detached => {
                movers.mover(dir).detached();
                self.detaches.fetch_add(1, Ordering::Relaxed);
                let target = movers
                    .mover(dir)
                    .dst_target(self.sockmap.redirected(cookie));
                let backlog = self.sockmap.backlog;
                set_sndbuf(dst, backlog.spliced_sndbuf(super::splice::PIPE_SIZE as u64))
                    .map_err(failed)?;
                match Spliced::new(src, dst, target) {
                    Ok(sp) => movers.set_spliced(dir, Some(sp)),
                    Err(e) => {
                        // No pipe to be had (out of descriptors): straight back to the kernel.
                        tracing::warn!("sockmap: cannot splice ({e}); the kernel keeps forwarding");
                        self.rearm_socket(movers, dir, 0).map_err(failed)?;
                    }
                }
                Ok(())
            }
            // Something was held before the walk reached the socket: catch up, then ask again.
            Answer::Behind => {
                movers.mover(dir).behind();
                movers.set_moving(dir, true);
                Ok(())
            }
            Answer::NotArmed | Answer::Failed(_) => {
                if let Answer::Failed(e) = &answer {
                    tracing::warn!("sockmap: {e}; relaying this direction instead");
                }
                relay_instead(movers)
            }
        }
    }

    /// The spliced direction `dir` kept up: back to the kernel path, unless its source can no
    /// longer join the sockmap (then it is spliced to its end).
    fn rearm(&self, movers: &mut Movers, dir: Dir) -> io::Result<()> {
        let Some(sp) = movers.take_spliced(dir) else {
            return Ok(());
        };
        let (src, dst) = movers.fds(dir);
        match self.rearm_socket(movers, dir, sp.written()) {
            Ok(()) => Ok(()),
            Err(_) if !established(src) => {
                let mut sp = sp;
                sp.splice_to_the_end();
                set_sndbuf(
                    dst,
                    self.sockmap
                        .backlog
                        .spliced_sndbuf(super::splice::PIPE_SIZE as u64),
                )?;
                movers.set_spliced(dir, Some(sp));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Puts a detached source back into `ARMED` after `spliced` bytes went to its peer by
    /// splice: the program's bound counts them, its next skb is trimmed against the socket's
    /// `copied_seq`, the peer's send buffer is back to its armed size, and what queued
    /// meanwhile is run through the program in order.
    fn rearm_socket(&self, movers: &mut Movers, dir: Dir, spliced: u64) -> io::Result<()> {
        let (src, dst) = movers.fds(dir);
        let cookie = self.cookie(dir);
        let limit = movers.mover(dir).rearm(spliced);
        self.sockmap.reset_seq(cookie)?;
        self.sockmap.set_limit(cookie, limit)?;
        set_sndbuf(dst, self.sockmap.backlog.sndbuf())?;
        self.arm_socket(cookie, src)?;
        self.rearms.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn cookie(&self, dir: Dir) -> u64 {
        match dir {
            Dir::Up => self.client,
            Dir::Down => self.upstream,
        }
    }

    fn move_error(&self, e: MoveError, dir: Dir) -> (End, Option<String>) {
        let (src, dst) = match dir {
            Dir::Up => (
                (End::ClientReset, "client"),
                (End::UpstreamReset, "upstream"),
            ),
            Dir::Down => (
                (End::UpstreamReset, "upstream"),
                (End::ClientReset, "client"),
            ),
        };
        match e {
            MoveError::Src(e) => (src.0, Some(format!("{}: {e}", src.1))),
            MoveError::Dst(e) => (dst.0, Some(format!("{}: {e}", dst.1))),
        }
    }

    /// What a spliced direction's run ended with, applied: back to the kernel, or done.
    /// `Ok(true)`: the direction is finished (FIN forwarded).
    fn spliced_stopped(
        &self,
        movers: &mut Movers,
        dir: Dir,
        r: Result<Stop, MoveError>,
    ) -> Result<bool, (End, Option<String>)> {
        match r {
            Ok(Stop::Quiet) => {
                self.rearm(movers, dir).map_err(|e| {
                    (
                        End::Failed,
                        Some(format!("returning to the kernel path: {e}")),
                    )
                })?;
                Ok(false)
            }
            Ok(Stop::Eof) => {
                movers.take_spliced(dir);
                Ok(true)
            }
            Err(e) => Err(self.move_error(e, dir)),
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

/// A tunnel's two movers of held bytes and whether each still has bytes to move.
struct Movers {
    up: Mover,
    down: Mover,
    up_moving: bool,
    down_moving: bool,
    /// A direction off the kernel path, forwarded by splice(2).
    up_spliced: Option<Spliced>,
    down_spliced: Option<Spliced>,
    client: RawFd,
    upstream: RawFd,
}

impl Movers {
    fn mover(&mut self, dir: Dir) -> &mut Mover {
        match dir {
            Dir::Up => &mut self.up,
            Dir::Down => &mut self.down,
        }
    }

    /// (source, destination) of a direction.
    fn fds(&self, dir: Dir) -> (RawFd, RawFd) {
        match dir {
            Dir::Up => (self.client, self.upstream),
            Dir::Down => (self.upstream, self.client),
        }
    }

    fn set_moving(&mut self, dir: Dir, moving: bool) {
        match dir {
            Dir::Up => self.up_moving = moving,
            Dir::Down => self.down_moving = moving,
        }
    }

    fn spliced(&self, dir: Dir) -> Option<&Spliced> {
        match dir {
            Dir::Up => self.up_spliced.as_ref(),
            Dir::Down => self.down_spliced.as_ref(),
        }
    }

    fn set_spliced(&mut self, dir: Dir, sp: Option<Spliced>) {
        match dir {
            Dir::Up => self.up_spliced = sp,
            Dir::Down => self.down_spliced = sp,
        }
    }

    fn take_spliced(&mut self, dir: Dir) -> Option<Spliced> {
        match dir {
            Dir::Up => self.up_spliced.take(),
            Dir::Down => self.down_spliced.take(),
        }
    }

    /// Moves what one direction can now (after a wake-up or a tick).
    fn step(&mut self, reg: &Registration<'_>, dir: Dir) -> Result<(), (End, Option<String>)> {
        let (c, u) = (self.client, self.upstream);
        match dir {
            Dir::Up => self.up_moving = reg.step(&mut self.up, c, u, dir)?,
            Dir::Down => self.down_moving = reg.step(&mut self.down, u, c, dir)?,
        }
        Ok(())
    }

    /// Whether a direction has held bytes left to move, or is relayed (then the tick also hands
    /// it back to the kernel once it has been quiet, see `RELAY_QUIET`).
    fn needs_tick(&self, dir: Dir) -> bool {
        match dir {
            Dir::Up => self.up_moving || self.up.relaying(),
            Dir::Down => self.down_moving || self.down.relaying(),
        }
    }

    /// Whether a direction that is still open needs the tick.
    fn busy(&self, up_done: bool, down_done: bool) -> bool {
        (self.needs_tick(Dir::Up) && !up_done) || (self.needs_tick(Dir::Down) && !down_done)
    }

    /// Steps every open direction that has held bytes left.
    fn tick(
        &mut self,
        reg: &Registration<'_>,
        up_done: bool,
        down_done: bool,
    ) -> Result<(), (End, Option<String>)> {
        if self.needs_tick(Dir::Up) && !up_done {
            self.step(reg, Dir::Up)?;
        }
        if self.needs_tick(Dir::Down) && !down_done {
            self.step(reg, Dir::Down)?;
        }
        Ok(())
    }
}

/// Runs a spliced direction until it stops; never, for one on the kernel path.
async fn spliced_run(
    sp: &mut Option<Spliced>,
    backlog: Backlog,
    spliced: &Progress,
    dir: Dir,
) -> Result<Stop, MoveError> {
    match sp {
        Some(sp) => {
            sp.run(SPLICE_QUIET, backlog.soft().max(1), |n| {
                spliced.add(dir.into(), n)
            })
            .await
        }
        None => std::future::pending().await,
    }
}

/// Waits for a hold wake-up; never, without one.
async fn held(notify: &Option<Arc<Notify>>) {
    match notify {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// How often a direction with held bytes left is stepped again.
const HOLD_TICK: Duration = Duration::from_millis(2);

/// Most bytes userspace forwards while waiting for the client's receive
/// queue to run empty before arming it; past that the client's direction
/// stays in userspace.
const EMPTY_QUEUE_BUDGET: u64 = 4 * 1024 * 1024;

/// Forwards what is queued on `src` to `dst` until the queue is seen empty,
/// which is the only moment no partly read skb can be left on it (a fully
/// read skb is freed; whatever arrives later starts a new skb). Returns the
/// bytes moved and whether the queue was seen empty within the budget.
async fn empty_queue(src: &TcpStream, dst: &TcpStream) -> io::Result<(u64, bool)> {
    let mut buf = Vec::new();
    let mut moved = 0u64;
    loop {
        let queued = sys::inq(src.as_raw_fd())? as usize;
        if queued == 0 {
            return Ok((moved, true));
        }
        if moved >= EMPTY_QUEUE_BUDGET {
            return Ok((moved, false));
        }
        // Read at most what is queued: reading "until EAGAIN" would never end
        // against a client that keeps sending.
        buf.resize(queued.min(256 * 1024), 0);
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok((moved, true)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            dst.writable().await?;
            match dst.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        moved += n as u64;
    }
}

/// What a watch of a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Its FIN (the program forwards the socket and userspace never reads it) and errors.
    Fin,
    /// Errors only: its FIN was seen already.
    Errors,
    /// Nothing: userspace reads the socket (pumped or spliced) and sees both itself.
    Nothing,
}

/// What happened on a watched socket.
#[derive(Debug)]
enum Close {
    Fin,
    Reset(io::Error),
}

/// Where the watch loop hears of FIN and errors.
enum Closes<'s> {
    /// A tunnel with a socket userspace pumps: both sockets stay in tokio's reactor.
    Reactor {
        client: &'s TcpStream,
        upstream: &'s TcpStream,
    },
    /// A fully armed tunnel: a private epoll set that only FIN and errors wake (see
    /// [`Registration::run_detached`]).
    Private(CloseWatch),
}

impl Closes<'_> {
    /// The next FIN (of a side that wants it) or error, with every other event seen at the same
    /// time; never resolves while no side wants anything.
    async fn next(&self, wants: [Want; 2]) -> io::Result<Vec<(Side, Close)>> {
        match self {
            Closes::Reactor { client, upstream } => {
                tokio::select! {
                    c = watch_reactor(client, wants[0]) => Ok(vec![(Side::Client, c)]),
                    c = watch_reactor(upstream, wants[1]) => Ok(vec![(Side::Upstream, c)]),
                }
            }
            Closes::Private(watch) => loop {
                let mut closes = Vec::new();
                for (side, mask) in watch.next().await? {
                    if let Ok(Some(e)) = sys::take_error(watch.fd(side)) {
                        closes.push((side, Close::Reset(e)));
                    } else if mask & libc::EPOLLERR as u32 != 0 {
                        closes.push((side, Close::Reset(io::Error::other("socket error"))));
                    } else if mask & libc::EPOLLRDHUP as u32 != 0 {
                        closes.push((side, Close::Fin));
                    }
                }
                if !closes.is_empty() {
                    return Ok(closes);
                }
            },
        }
    }
}

/// One socket in tokio's reactor, watched for what `want` says; never resolves for `Nothing`.
async fn watch_reactor(s: &TcpStream, want: Want) -> Close {
    match want {
        Want::Fin => next_event(s).await,
        Want::Errors => Close::Reset(next_error(s).await),
        Want::Nothing => std::future::pending().await,
    }
}

/// Waits for the socket's remote to send FIN or RST. Data never wakes us:
/// the program consumes it before it reaches the socket's queue.
async fn next_event(s: &TcpStream) -> Close {
    loop {
        match s.ready(Interest::READABLE | Interest::ERROR).await {
            Err(e) => return Close::Reset(e),
            Ok(ready) => {
                if let Ok(Some(e)) = s.take_error() {
                    return Close::Reset(e);
                }
                if ready.is_read_closed() {
                    return Close::Fin;
                }
                // Spurious readiness: clear it and wait for the next edge.
                let _ = s.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }
}

/// After a FIN on a closed-for-reading socket, waits for an error only.
async fn next_error(s: &TcpStream) -> io::Error {
    loop {
        match s.ready(Interest::ERROR).await {
            Err(e) => return e,
            Ok(_) => {
                if let Ok(Some(e)) = s.take_error() {
                    return e;
                }
                let _ = s.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Registration<'_> {
    /// Watches a tunnel that has a socket the program does not forward (it could not be armed)
    /// until it ends: userspace pumps that socket's direction, and both sockets stay in tokio's
    /// reactor.
    pub async fn run(
        &self,
        client: &TcpStream,
        upstream: &TcpStream,
        idle: Option<Duration>,
        cancel: &CancellationToken,
    ) -> (End, Option<String>) {
        // A socket that could not be armed is read by userspace.
        let up_pump: Option<PumpFuture<'_>> = (!self.client_armed).then(|| {
            Box::pin(super::copy::pump(
                client,
                upstream,
                pump::Dir::Up,
                &self.userspace,
            )) as PumpFuture<'_>
        });
        let down_pump: Option<PumpFuture<'_>> = (!self.upstream_armed).then(|| {
            Box::pin(super::copy::pump(
                upstream,
                client,
                pump::Dir::Down,
                &self.userspace,
            )) as PumpFuture<'_>
        });
        let watch = Closes::Reactor { client, upstream };
        self.watch(client, upstream, &watch, [up_pump, down_pump], idle, cancel)
            .await
    }

    /// The one watch loop of an armed tunnel: FIN and errors from `closes`, hold wake-ups (held
    /// bytes to move, or a direction to take off the kernel path), spliced directions, the
    /// pumps of sockets that could not be armed, the idle clock and shutdown.
    async fn watch<S: AsFd>(
        &self,
        client: &S,
        upstream: &S,
        closes: &Closes<'_>,
        pumps: [Option<PumpFuture<'_>>; 2],
        idle: Option<Duration>,
        cancel: &CancellationToken,
    ) -> (End, Option<String>) {
        let [mut up_pump, mut down_pump] = pumps;
        let pump_end = |e: PumpError, dir: Dir| match (e, dir) {
            (PumpError::Read(e), Dir::Up) | (PumpError::Write(e), Dir::Down) => {
                (End::ClientReset, Some(format!("client: {e}")))
            }
            (PumpError::Read(e), Dir::Down) | (PumpError::Write(e), Dir::Up) => {
                (End::UpstreamReset, Some(format!("upstream: {e}")))
            }
        };
        let (mut up_done, mut down_done) = (false, false);
        let mut clock = IdleClock::new(idle, self.bytes());
        let (client_fd, upstream_fd) = (client.as_fd().as_raw_fd(), upstream.as_fd().as_raw_fd());
        let mut movers = self.movers(client_fd, upstream_fd);
        while !(up_done && down_done) {
            // A FIN matters on a socket the program forwards and userspace does not read: a
            // pumped or spliced direction sees its FIN in its own reads.
            let want = |done: bool, armed: bool, spliced: bool| match (done, armed && !spliced) {
                (true, _) => Want::Errors,
                (false, true) => Want::Fin,
                (false, false) => Want::Nothing,
            };
            let wants = [
                want(up_done, self.client_armed, movers.up_spliced.is_some()),
                want(
                    down_done,
                    self.upstream_armed,
                    movers.down_spliced.is_some(),
                ),
            ];
            tokio::select! {
                events = closes.next(wants) => {
                    let events = match events {
                        Ok(ev) => ev,
                        Err(e) => return (End::Failed, Some(format!("watching for FIN: {e}"))),
                    };
                    for (side, close) in events {
                        let (end, name) = match side {
                            Side::Client => (End::ClientReset, "client"),
                            Side::Upstream => (End::UpstreamReset, "upstream"),
                        };
                        match close {
                            Close::Reset(e) => return (end, Some(format!("{name}: {e}"))),
                            Close::Fin if side == Side::Client && wants[0] == Want::Fin => {
                                if let Err(end) = self.drain(client, self.client, upstream, Dir::Up, &mut movers.up).await {
                                    return end;
                                }
                                up_done = true;
                            }
                            Close::Fin if side == Side::Upstream && wants[1] == Want::Fin => {
                                if let Err(end) = self.drain(upstream, self.upstream, client, Dir::Down, &mut movers.down).await {
                                    return end;
                                }
                                down_done = true;
                            }
                            Close::Fin => {}
                        }
                    }
                }
                () = held(&self.up_holds), if !up_done && self.client_armed => {
                    if let Err(end) = self.advance(&mut movers, Dir::Up).await {
                        return end;
                    }
                }
                r = spliced_run(&mut movers.up_spliced, self.sockmap.backlog, &self.spliced, Dir::Up), if !up_done => {
                    match self.spliced_stopped(&mut movers, Dir::Up, r) {
                        Ok(done) => up_done = done,
                        Err(end) => return end,
                    }
                }
                () = held(&self.down_holds), if !down_done && self.upstream_armed => {
                    if let Err(end) = self.advance(&mut movers, Dir::Down).await {
                        return end;
                    }
                }
                r = spliced_run(&mut movers.down_spliced, self.sockmap.backlog, &self.spliced, Dir::Down), if !down_done => {
                    match self.spliced_stopped(&mut movers, Dir::Down, r) {
                        Ok(done) => down_done = done,
                        Err(end) => return end,
                    }
                }
                () = tokio::time::sleep(HOLD_TICK), if movers.busy(up_done, down_done) => {
                    if let Err(end) = movers.tick(self, up_done, down_done) {
                        return end;
                    }
                }
                r = run_pump(&mut up_pump), if !up_done && !self.client_armed => match r {
                    Ok(()) => up_done = true,
                    Err(e) => return pump_end(e, Dir::Up),
                },
                r = run_pump(&mut down_pump), if !down_done && !self.upstream_armed => match r {
                    Ok(()) => down_done = true,
                    Err(e) => return pump_end(e, Dir::Down),
                },
                () = tokio::time::sleep_until(clock.next_check), if idle.is_some() => {
                    if clock.expired(self.bytes()) {
                        return (End::Idle, None);
                    }
                }
                () = cancel.cancelled() => return (End::Shutdown, None),
            }
        }
        (End::Closed, None)
    }

    /// `src` sent FIN: once `dst` has queued every byte redirected from
    /// `src`, shut `dst` for writing.
    async fn drain(
        &self,
        src: &impl AsFd,
        src_cookie: u64,
        dst: &impl AsFd,
        dir: Dir,
        mover: &mut Mover,
    ) -> Result<(), (End, Option<String>)> {
        let dst_reset = |e: io::Error| match dir {
            Dir::Up => (End::UpstreamReset, Some(format!("upstream: {e}"))),
            Dir::Down => (End::ClientReset, Some(format!("client: {e}"))),
        };
        let dst_fd = dst.as_fd().as_raw_fd();
        let dst = socket2::SockRef::from(dst);
        // TCP_INFO takes the socket lock, so the softirq that delivered the
        // FIN (and ran the program on the data before it) has finished.
        let _ = queued_total(src.as_fd().as_raw_fd());
        // Held bytes go before the FIN too: move all of them first.
        let mut wait = Duration::from_micros(200);
        while self.step(mover, src.as_fd().as_raw_fd(), dst_fd, dir)? {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(20));
        }
        let target = self.sockmap.redirected(src_cookie) + mover.moved();
        let dst_base = mover.dst_base();
        let mut wait = Duration::from_micros(200);
        loop {
            if let Ok(Some(e)) = dst.take_error() {
                return Err(dst_reset(e));
            }
            let queued = queued_total(dst_fd).map_err(dst_reset)?;
            if queued.wrapping_sub(dst_base) >= target {
                return dst.shutdown(std::net::Shutdown::Write).map_err(dst_reset);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(20));
        }
    }

    /// Both sockets are armed: the kernel forwards both directions.
    pub fn fully_armed(&self) -> bool {
        self.client_armed && self.upstream_armed
    }

    /// Watches a fully armed tunnel with the sockets taken out of tokio's
    /// reactor: with the program attached, the kernel still wakes a socket's
    /// epoll waiters after every batch it redirects, so a socket registered
    /// for readability costs the proxy a wake-up per batch (0.49 s of proxy
    /// CPU for 2 GiB, measured). A private epoll set that asks only for
    /// EPOLLRDHUP (and the implied EPOLLERR/EPOLLHUP) is woken for FIN and
    /// errors alone. Returns the sockets so they close after the maps are left.
    pub async fn run_detached(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        idle: Option<Duration>,
        cancel: &CancellationToken,
    ) -> ((End, Option<String>), Option<(StdTcpStream, StdTcpStream)>) {
        let (client, upstream) = match (client.into_std(), upstream.into_std()) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                return (
                    (End::Failed, Some(format!("leaving the reactor: {e}"))),
                    None,
                );
            }
        };
        let result = match CloseWatch::new(&client, &upstream) {
            Ok(watch) => {
                let closes = Closes::Private(watch);
                self.watch(&client, &upstream, &closes, [None, None], idle, cancel)
                    .await
            }
            Err(e) => (End::Failed, Some(format!("watching for FIN: {e}"))),
        };
        (result, Some((client, upstream)))
    }
}

/// When a kernel-forwarded tunnel's byte counts last moved, for `--idle-timeout`.
struct IdleClock {
    idle: Option<Duration>,
    last: (u64, u64),
    since: tokio::time::Instant,
    /// When to look at the counters next: a deadline, not a fresh sleep per loop turn, so other
    /// branches waking the watch loop often (the hold tick) cannot postpone it for ever.
    next_check: tokio::time::Instant,
}

impl IdleClock {
    fn new(idle: Option<Duration>, bytes: (u64, u64)) -> IdleClock {
        let now = tokio::time::Instant::now();
        let mut clock = IdleClock {
            idle,
            last: bytes,
            since: now,
            next_check: now,
        };
        clock.next_check = now + clock.tick();
        clock
    }

    /// How often to look at the counters.
    fn tick(&self) -> Duration {
        self.idle.map_or(Duration::from_secs(3600), |d| {
            (d / 4).max(Duration::from_millis(10))
        })
    }

    /// True once the counters have not moved for the idle timeout; schedules the next look.
    fn expired(&mut self, bytes: (u64, u64)) -> bool {
        self.next_check = tokio::time::Instant::now() + self.tick();
        if bytes != self.last {
            self.last = bytes;
            self.since = tokio::time::Instant::now();
            return false;
        }
        self.idle.is_some_and(|d| self.since.elapsed() >= d)
    }
}

/// Which socket of a tunnel an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// A private epoll set holding a tunnel's two sockets with EPOLLRDHUP only,
/// itself watched by tokio.
struct CloseWatch {
    epoll: AsyncFd<OwnedFd>,
    /// The two sockets, open for as long as the watch (the tunnel owns them).
    fds: [RawFd; 2],
}

impl CloseWatch {
    fn new(client: &impl AsFd, upstream: &impl AsFd) -> io::Result<CloseWatch> {
        let epoll = sys::epoll_set(&[
            (
                client.as_fd().as_raw_fd(),
                libc::EPOLLRDHUP,
                Side::Client as u64,
            ),
            (
                upstream.as_fd().as_raw_fd(),
                libc::EPOLLRDHUP,
                Side::Upstream as u64,
            ),
        ])?;
        Ok(CloseWatch {
            epoll,
            fds: [client.as_fd().as_raw_fd(), upstream.as_fd().as_raw_fd()],
        })
    }

    fn fd(&self, side: Side) -> RawFd {
        self.fds[side as usize]
    }

    /// Waits for events and returns them: (which socket, epoll mask).
    async fn next(&self) -> io::Result<Vec<(Side, u32)>> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        let n = sys::epoll_next(&self.epoll, &mut events).await?;
        Ok(events[..n]
            .iter()
            .map(|ev| {
                let side = if { ev.u64 } == Side::Client as u64 {
                    Side::Client
                } else {
                    Side::Upstream
                };
                (side, ev.events)
            })
            .collect())
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

/// Sizes a tunnel socket's buffers for the backlog bound (see [`Backlog`]). The send buffer needs
/// `SO_SNDBUFFORCE` (CAP_NET_ADMIN, which the sockmap path has) to exceed `wmem_max`.
fn set_buffers(fd: RawFd, backlog: Backlog) -> io::Result<()> {
    sys::set_rcvbuf(fd, backlog.rcvbuf())?;
    sys::set_sndbuf(fd, backlog.sndbuf())
}
