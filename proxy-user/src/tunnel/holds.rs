//! Backpressure for the sockmap data path: the bound on what one direction of a tunnel may hold
//! in the kernel, the wake-ups when the program starts holding, and the mover that forwards held
//! bytes in userspace once the peer has drained.
//!
//! How it fits together (the kernel side is in `proxy-ebpf/src/main.rs`, the why in
//! docs/kernel-notes.md, "Backpressure"):
//! 1. While the bytes sent towards a peer and not yet acknowledged by its remote exceed
//!    [`Backlog::threshold`], the program answers `SK_PASS` for new skbs ("holds" them). A held
//!    skb stays on its own socket, charged to that socket's receive buffer, so TCP closes the
//!    sender's window: the direction is flow-controlled by the kernel, with nothing in userspace.
//! 2. The first held skb of an episode puts the socket's cookie on a ring buffer; [`HoldWaiters`]
//!    wakes that tunnel.
//! 3. The tunnel's [`Mover`] waits until the peer has drained to half the threshold, then reads
//!    the held bytes and writes them to the peer, counting them in the `MOVED` map. Until userspace
//!    has moved every held byte the program keeps holding, so nothing overtakes them; once it has
//!    caught up, the program redirects again.
//! 4. With [`Overrun::Relay`] the mover instead tells the program to hold everything from that
//!    direction and relays it, reading as soon as the peer has room, until the direction has not
//!    pressed against the bound for [`RELAY_QUIET`]. Each return to kernel forwarding after a
//!    catch-up costs a sender on the same host about 200 ms ([`PERSIST_STALL`];
//!    docs/kernel-notes.md, "Why no window update from userspace avoids the stall"); relaying has
//!    no such cost.
//! 5. With [`Overrun::Splice`] (the default) the program wakes the tunnel before the threshold,
//!    past [`Backlog::soft`], and the direction leaves the kernel path (`sockmap/directions.rs`,
//!    `spliced.rs`). If the threshold comes first, the mover catches up as in 3 when the reader
//!    is slow (the stall hides behind what is still queued for it) and relays as in 4 when it is
//!    fast, then the next soft crossing asks to leave again.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::sys;
use crate::ebpf::Limit;

/// What a direction does once it has overrun its bound (`--sockmap-overrun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Overrun {
    /// The direction leaves the kernel path and is forwarded by splice(2) until its reader
    /// keeps up again, then returns to the kernel.
    Splice,
    /// Userspace relays the direction (recv/send) until it stops pressing against the bound.
    Relay,
    /// The kernel forwards again as soon as userspace has moved the held bytes.
    Pause,
}

/// Where each direction of a sockmap tunnel starts (`--sockmap-start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Start {
    /// Forwarded by splice(2), joining the kernel path at its first quiet period
    /// ([`SPLICE_QUIET`]): a tunnel that closes sooner, or whose reader is the bottleneck from
    /// the start, never pays for the maps or a detach.
    Splice,
    /// On the kernel path from the `200` on.
    Kernel,
}

/// How long a relayed direction must go without pressing against its bound before the kernel
/// forwards it again.
pub const RELAY_QUIET: Duration = Duration::from_millis(20);

/// How long a spliced direction's peer must go without a full send buffer before the direction
/// returns to the kernel path. Longer than [`RELAY_QUIET`]: each round trip costs two walks of
/// the TCP iterator, and a reader that was the bottleneck usually stays it.
pub const SPLICE_QUIET: Duration = Duration::from_millis(50);

/// What the end of a catch-up costs a sender on the same host: it waits for its persist timer
/// (its RTO, 200 ms at least; docs/kernel-notes.md, "What a backpressure episode costs").
pub const PERSIST_STALL: Duration = Duration::from_millis(200);

/// How much one direction of a sockmap tunnel may hold in the kernel (`--sockmap-backlog`), and
/// what it does when it gets there (`--sockmap-overrun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    bound: u64,
    overrun: Overrun,
    start: Start,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

impl Backlog {
    /// The default bound: 16 MiB per tunnel per direction.
    pub const DEFAULT_BYTES: u64 = 16 * MIB;
    /// The smallest bound that leaves room for a receive buffer and a few segments.
    pub const MIN_BYTES: u64 = 512 * KIB;

    /// A bound of `bytes` per direction; `None` below [`Backlog::MIN_BYTES`].
    pub fn new(bytes: u64) -> Option<Backlog> {
        (bytes >= Self::MIN_BYTES).then_some(Backlog {
            bound: bytes,
            ..Backlog::default()
        })
    }

    pub fn with_overrun(self, overrun: Overrun) -> Backlog {
        Backlog { overrun, ..self }
    }

    pub fn with_start(self, start: Start) -> Backlog {
        Backlog { start, ..self }
    }

    pub fn bytes(self) -> u64 {
        self.bound
    }

    /// Where a tunnel's directions start.
    pub fn start(self) -> Start {
        self.start
    }

    pub fn overrun(self) -> Overrun {
        self.overrun
    }

    /// Receive buffer of each tunnel socket (the kernel's `sk_rcvbuf`): what a socket can hold
    /// once the program holds, before TCP closes the sender's window. Userspace moves about this
    /// much per backpressure episode, so it is kept small against the threshold (the kernel
    /// forwards about half a threshold between episodes); it also caps the TCP window the proxy
    /// advertises (loopback and LAN need far less; a long fat path may want a larger bound).
    pub fn rcvbuf(self) -> u64 {
        (self.bound / 32).clamp(128 * KIB, MIB)
    }

    /// The program's `LIMITS` entry for a direction whose peer had `base` as its
    /// `queued_total` when armed; `relay`: userspace relays it (the program holds everything).
    pub fn limit(self, base: u64, relay: bool) -> Limit {
        Limit {
            threshold: self.threshold(),
            base,
            relay: u64::from(relay),
            soft: self.soft(),
        }
    }

    /// Unacknowledged bytes towards the peer above which the program holds.
    pub fn threshold(self) -> u64 {
        self.bound - self.rcvbuf()
    }

    /// Unacknowledged bytes towards the peer past which the program wakes userspace to take
    /// the direction off the kernel path (`Overrun::Splice`; 0 otherwise): half the threshold,
    /// so the walk that detaches it has the other half of the way to the threshold to finish
    /// before anything must be held. If it comes too late the held bytes are caught up (as
    /// `Overrun::Pause` does) and the detach asked for again. A lower soft threshold would win
    /// more of those races but takes a reader that keeps up off the kernel path whenever one
    /// large write sits in the redirect worker's queue (4 MiB writes paced at 400 MB/s cost
    /// 0.8 s of proxy CPU per 2 GiB at a quarter of the threshold, against 0.01 at half).
    pub fn soft(self) -> u64 {
        match self.overrun {
            Overrun::Splice => self.threshold() / 2,
            Overrun::Relay | Overrun::Pause => 0,
        }
    }

    /// Receive buffer of each tunnel socket while its direction starts spliced
    /// (`Start::Splice`): a quarter of the bound, so a sender's bursts are not cut to the small
    /// window [`Backlog::rcvbuf`] gives (a spliced source at 512 KiB cost 1.8× splice's proxy
    /// CPU), yet bounded: autotuning may grow it to `tcp_rmem`'s maximum (32 MiB here), past the
    /// bound. The socket gets [`Backlog::rcvbuf`] when it joins the kernel path.
    pub fn start_rcvbuf(self) -> u64 {
        (self.bound / 4).max(self.rcvbuf())
    }

    /// The peer's send buffer while a direction starts spliced: with the source's
    /// [`Backlog::start_rcvbuf`] and the pipe, within the bound.
    pub fn start_sndbuf(self, pipe: u64) -> u64 {
        self.bound
            .saturating_sub(self.start_rcvbuf() + pipe)
            .max(256 * KIB)
    }

    /// The source's receive buffer and the peer's send buffer (as the kernel counts them) for
    /// a direction taken off the kernel path with `unacked` bytes on their way to its peer.
    /// Where those leave room, the spliced start's: a window wide enough that the sender's
    /// bursts are not cut short (at the kernel path's [`Backlog::rcvbuf`], stream1's spliced
    /// bytes cost 0.51 s/GB of proxy CPU against 0.40 at this width), with the peer's send
    /// buffer cut to keep window, pipe and peer within the bound. Otherwise the kernel path's
    /// window, and a send buffer that keeps the peer's queue and the pipe within the threshold.
    pub fn detached_buffers(self, unacked: u64, pipe: u64) -> (u64, u64) {
        let wide = (self.start_rcvbuf(), self.start_sndbuf(pipe));
        if unacked <= wide.1 {
            wide
        } else {
            (self.rcvbuf(), self.spliced_sndbuf(pipe))
        }
    }

    /// The send buffer (`sk_sndbuf`, as the kernel counts it) of a peer while its direction is
    /// spliced: its queue plus the pipe stay within the threshold.
    pub fn spliced_sndbuf(self, pipe: u64) -> u64 {
        self.threshold().saturating_sub(pipe).max(256 * KIB)
    }

    /// Send buffer of each tunnel socket (`sk_sndbuf`): room for a whole threshold, so the
    /// kernel's redirect worker never finds the peer full. A worker that did would leave its skb
    /// on the peer's queue, and anything the peer's own program held would queue behind it
    /// uncharged (`sk_psock_verdict_apply`), out of TCP's flow control.
    pub fn sndbuf(self) -> u64 {
        self.threshold() + 2 * MIB
    }
}

impl Default for Backlog {
    fn default() -> Backlog {
        Backlog {
            bound: Self::DEFAULT_BYTES,
            overrun: Overrun::Splice,
            start: Start::Splice,
        }
    }
}

/// Tunnels waiting to hear that one of their sockets started holding, by socket cookie.
#[derive(Default)]
pub struct HoldWaiters {
    waiters: Mutex<HashMap<u64, Arc<Notify>>>,
}

impl HoldWaiters {
    /// Registers a socket; its tunnel awaits the returned `Notify`. Remove with [`Self::forget`].
    pub fn watch(&self, cookie: u64) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.waiters
            .lock()
            .expect("hold waiters lock")
            .insert(cookie, notify.clone());
        notify
    }

    pub fn forget(&self, cookie: u64) {
        self.waiters
            .lock()
            .expect("hold waiters lock")
            .remove(&cookie);
    }

    fn wake(&self, cookie: u64) {
        if let Some(n) = self.waiters.lock().expect("hold waiters lock").get(&cookie) {
            // A stored permit if the tunnel is busy elsewhere: the wake-up is never lost.
            n.notify_one();
        }
    }

    /// Wakes every tunnel: for wake-ups the program could not put on the ring.
    fn wake_all(&self) {
        for n in self.waiters.lock().expect("hold waiters lock").values() {
            n.notify_one();
        }
    }

    /// Reads the program's `HOLDS` ring buffer for ever, waking the tunnel of each cookie.
    /// After each batch, `lost()` (the program's count of wake-ups it found the ring full for;
    /// `None` if it could not be read) is checked: if it grew, every tunnel is woken, since
    /// whose wake-up was lost is unknown.
    pub async fn dispatch(
        self: Arc<Self>,
        ring: RingBuf<MapData>,
        lost: impl Fn() -> Option<u64>,
    ) -> io::Result<()> {
        // SAFETY: the ring buffer's fd stays open, and the same fd, while the AsyncFd owns it.
        let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
        let mut seen = lost().unwrap_or(0);
        loop {
            let mut guard = ring.readable_mut().await?;
            while let Some(item) = guard.get_inner_mut().next() {
                if let Some(bytes) = item.get(..8) {
                    let cookie = u64::from_ne_bytes(bytes.try_into().expect("8 bytes"));
                    self.wake(cookie);
                }
            }
            guard.clear_ready();
            if let Some(now) = lost() {
                self.wake_all_if_lost(now, &mut seen);
            }
        }
    }

    fn wake_all_if_lost(&self, lost: u64, seen: &mut u64) {
        if lost != *seen {
            tracing::warn!(
                "sockmap: the holds ring buffer was full, {} wake-up(s) lost; waking every tunnel",
                lost.wrapping_sub(*seen)
            );
            *seen = lost;
            self.wake_all();
        }
    }
}

/// What the program's counters and the peer socket say, as the mover needs them.
pub trait Counters {
    /// (bytes redirected, bytes held) from `src` so far.
    fn counts(&self, src_cookie: u64) -> (u64, u64);
    /// Records that userspace has moved `moved` bytes from `src` in total.
    fn set_moved(&self, src_cookie: u64, moved: u64) -> io::Result<()>;
    /// Replaces the program's bound for `src`.
    fn set_limit(&self, src_cookie: u64, limit: Limit) -> io::Result<()>;
    /// Forgets where the program's last skb from `src` ended, so the next one is trimmed
    /// against the socket's `copied_seq` (for a socket rejoining the kernel path after
    /// userspace read from it). Only while the program does not run on `src`.
    fn reset_seq(&self, src_cookie: u64) -> io::Result<()>;
}

/// What the mover is waiting for after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing held is left: the program redirects again.
    Idle,
    /// Held bytes remain: step again shortly.
    Wait,
}

/// Which socket failed while moving.
#[derive(Debug)]
pub enum MoveError {
    Src(io::Error),
    Dst(io::Error),
}

/// Moves the held bytes of one direction (`src` → `dst`) in userspace, without blocking.
///
/// Held bytes are **peeked**, written to the peer, recorded in `MOVED`, and only then consumed
/// from the source. While they sit unconsumed they keep the source's receive buffer full, so TCP
/// keeps the sender's window closed for the whole catch-up; the window reopens when the last
/// held bytes are consumed, and by then the program is redirecting again (held == moved). The
/// sender is paused without touching the window itself: an earlier version narrowed it with
/// `TCP_WINDOW_CLAMP`, which cut the source's `rcv_ssthresh` below one loopback segment and left
/// the sender waiting for its persist timer (200 ms or more) after every episode (see "The
/// catch-up" in docs/kernel-notes.md).
///
/// With [`Overrun::Relay`] an episode instead switches the direction to relaying (see
/// [`Mover::relay`]).
pub struct Mover {
    src_cookie: u64,
    /// `queued_total(dst)` when it was armed: bytes written to it before the program ran.
    dst_base: u64,
    /// The direction's bound: its threshold, and its receive buffer (the most the source can
    /// hold, so the largest read).
    backlog: Backlog,
    /// In an episode: the peer had drained to half the threshold.
    active: bool,
    moved: u64,
    /// Relaying: the program holds everything from `src` (`Limit::relay`) and this mover
    /// forwards it. `Some(t)`: it last found the peer's backlog at the bound at `t`.
    relaying: Option<Instant>,
    /// Relayed bytes read from `src` that the peer had no room for yet, from `unsent.1` on.
    unsent: (Vec<u8>, usize),
    /// Times this direction started relaying.
    relays: u64,
    /// `Overrun::Splice`: the peer's backlog is past [`Backlog::soft`], so the direction
    /// should leave the kernel path.
    pressed: bool,
    /// `Overrun::Splice`, catching up: when the peer's backlog was first seen draining, and
    /// how large it was then.
    draining: Option<(Instant, u64)>,
}

thread_local! {
    /// Scratch space for peeked held bytes. Nothing stays in it between steps (unsent bytes
    /// stay in the kernel, unconsumed), so one buffer per runtime thread serves every tunnel.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Mover {
    pub fn new(src_cookie: u64, dst_base: u64, backlog: Backlog) -> Mover {
        Mover {
            src_cookie,
            dst_base,
            backlog,
            active: false,
            moved: 0,
            relaying: None,
            unsent: (Vec::new(), 0),
            relays: 0,
            pressed: false,
            draining: None,
        }
    }

    /// Whether this direction should leave the kernel path now (`Overrun::Splice`): its peer's
    /// backlog is past the soft threshold and nothing is held.
    pub fn wants_detach(&self) -> bool {
        self.pressed && self.relaying.is_none()
    }

    /// While catching up held bytes under `Overrun::Splice`: whether the peer's `unacked` backlog
    /// has drained to half the threshold (where the catch-up starts) so fast that a
    /// [`PERSIST_STALL`] would starve its reader. Tracks the drain from the first look on; `false`
    /// until the peer got there.
    fn reader_outruns_a_stall(&mut self, unacked: u64, now: Instant) -> bool {
        let half = self.backlog.threshold() / 2;
        let Some((since, from)) = self.draining else {
            if unacked <= half {
                // Already drained before the first look (the walk's latency plus a tick).
                return true;
            }
            self.draining = Some((now, unacked));
            return false;
        };
        if unacked > half {
            return false;
        }
        self.draining = None;
        let drained = from.saturating_sub(unacked) as f64;
        let took = now.saturating_duration_since(since).as_secs_f64();
        drained * PERSIST_STALL.as_secs_f64() > half as f64 * took
    }

    /// The walk found held bytes not yet moved: move them first ([`Mover::step`] catches up), and
    /// ask again once the peer is past the soft threshold after that.
    pub fn behind(&mut self) {
        self.pressed = false;
    }

    /// Detaching is not possible now (the walk failed): relay this episode as `Overrun::Relay`
    /// does; the kernel gets it back after `RELAY_QUIET`.
    pub fn relay_instead(
        &mut self,
        counters: &impl Counters,
        now: Instant,
    ) -> Result<(), MoveError> {
        self.pressed = false;
        counters
            .set_limit(self.src_cookie, self.limit(true))
            .map_err(MoveError::Dst)?;
        self.relaying = Some(now);
        self.relays += 1;
        Ok(())
    }

    /// The socket left the kernel path.
    pub fn detached(&mut self) {
        self.pressed = false;
    }

    /// `queued_total(dst)` that every byte sent towards the peer so far adds up to, given
    /// what the program has `redirected`.
    pub fn dst_target(&self, redirected: u64) -> u64 {
        self.dst_base + redirected + self.moved
    }

    /// The peer's base: its `queued_total` at arming plus everything spliced to it since.
    pub fn dst_base(&self) -> u64 {
        self.dst_base
    }

    /// The direction returns to the kernel after `spliced` bytes went to the peer by splice:
    /// they count in the base, like bytes written before arming. Returns the program's new
    /// `LIMITS` entry.
    pub fn rearm(&mut self, spliced: u64) -> Limit {
        self.dst_base += spliced;
        self.limit(false)
    }

    /// Bytes moved so far.
    pub fn moved(&self) -> u64 {
        self.moved
    }

    /// Times this direction started relaying.
    pub fn relays(&self) -> u64 {
        self.relays
    }

    /// Whether userspace relays this direction now.
    pub fn relaying(&self) -> bool {
        self.relaying.is_some()
    }

    fn limit(&self, relay: bool) -> Limit {
        self.backlog.limit(self.dst_base, relay)
    }

    /// The threshold the mover keeps the peer under.
    fn threshold(&self) -> u64 {
        self.backlog.threshold()
    }

    /// Moves what it can now. A `recv` of 0 (FIN) or EAGAIN does not end an episode: held skbs
    /// can still be in the kernel's queue for `src`; the held count says when all have arrived.
    pub fn step(
        &mut self,
        counters: &impl Counters,
        src: RawFd,
        dst: RawFd,
    ) -> Result<Step, MoveError> {
        self.step_at(counters, src, dst, Instant::now())
    }

    fn step_at(
        &mut self,
        counters: &impl Counters,
        src: RawFd,
        dst: RawFd,
        now: Instant,
    ) -> Result<Step, MoveError> {
        SCRATCH.with_borrow_mut(|buf| {
            let chunk = self.backlog.rcvbuf() as usize;
            if buf.len() < chunk {
                buf.resize(chunk, 0);
            }
            let buf = &mut buf[..chunk];
            if self.relaying.is_none() && self.backlog.overrun() == Overrun::Splice {
                let (redirected, held) = counters.counts(self.src_cookie);
                if held == self.moved {
                    // Woken by a redirect past the soft threshold (or late): leave the kernel
                    // path if the peer is still that far behind.
                    let peer = self.peer(dst, redirected)?;
                    self.pressed = peer.unacked > self.backlog.soft();
                    return Ok(Step::Idle);
                }
                // The threshold was reached before the direction could leave the kernel path:
                // held bytes sit in the psock's queue, which only a read while the program is
                // attached accounts for (docs/kernel-notes.md). Catch up as `Overrun::Pause`
                // does (the sender's window stays closed until the last held byte is moved),
                // then the next redirect past the soft threshold asks for the detach again.
                // Relaying instead would copy the whole episode, which under a reader slower
                // than its sender never ends. Unless the reader is fast: the catch-up's end
                // leaves a sender on the same host waiting for its persist timer, and a reader
                // that drains half the threshold within that wait would starve in it.
                self.pressed = false;
                if !self.active {
                    let unacked = self.peer(dst, redirected)?.unacked;
                    if self.reader_outruns_a_stall(unacked, now) {
                        self.relay_instead(counters, now)?;
                    }
                }
            } else {
                self.draining = None;
            }
            if self.relaying.is_none() && self.backlog.overrun() == Overrun::Relay {
                let (_, held) = counters.counts(self.src_cookie);
                if held == self.moved {
                    return Ok(Step::Idle);
                }
                // An episode starts: from now on the program holds everything and we relay.
                counters
                    .set_limit(self.src_cookie, self.limit(true))
                    .map_err(MoveError::Dst)?;
                self.relaying = Some(now);
                self.relays += 1;
            }
            match self.relaying {
                Some(_) => self.relay(counters, src, dst, buf, now),
                None => self.step_with(counters, src, dst, buf),
            }
        })
    }

    /// One step of relaying: write what the peer had no room for, then read what it has room
    /// for now and write that. The peer's unacknowledged bytes stay within the threshold, as
    /// with kernel forwarding; the source's window reopens as soon as bytes are read, since no
    /// catch-up has to end. Once caught up and `RELAY_QUIET` past the last time the peer was at
    /// the bound, the direction goes back to kernel forwarding.
    fn relay(
        &mut self,
        counters: &impl Counters,
        src: RawFd,
        dst: RawFd,
        buf: &mut [u8],
        now: Instant,
    ) -> Result<Step, MoveError> {
        loop {
            if !self.flush_unsent(counters, dst)? {
                if self.relaying.is_some() {
                    self.relaying = Some(now);
                }
                return Ok(Step::Wait);
            }
            let (redirected, held) = counters.counts(self.src_cookie);
            if held == self.moved {
                let pressed = self.relaying.expect("relaying");
                if now.saturating_duration_since(pressed) >= RELAY_QUIET {
                    counters
                        .set_limit(self.src_cookie, self.limit(false))
                        .map_err(MoveError::Dst)?;
                    self.relaying = None;
                }
                return Ok(Step::Idle);
            }
            let peer = self.peer(dst, redirected)?;
            if peer.behind_worker {
                return Ok(Step::Wait);
            }
            let room = self.threshold().saturating_sub(peer.unacked);
            if room == 0 {
                if self.relaying.is_some() {
                    self.relaying = Some(now);
                }
                return Ok(Step::Wait);
            }
            let want = (room.min(held.saturating_sub(self.moved)) as usize).min(buf.len());
            let Some(got) = recv_held(src, &mut buf[..want], 0)? else {
                return Ok(Step::Wait);
            };
            let sent = send_some(dst, &buf[..got])?;
            self.count_moved(counters, sent)?;
            if sent < got {
                self.unsent.0.extend_from_slice(&buf[sent..got]);
            }
        }
    }

    /// Writes relayed bytes left over from an earlier step; whether none are left.
    fn flush_unsent(&mut self, counters: &impl Counters, dst: RawFd) -> Result<bool, MoveError> {
        let (bytes, from) = &mut self.unsent;
        if *from == bytes.len() {
            return Ok(true);
        }
        let sent = send_some(dst, &bytes[*from..])?;
        *from += sent;
        let done = *from == bytes.len();
        if done {
            // Keep the allocation for the next time the peer is short of room.
            bytes.clear();
            *from = 0;
        }
        self.count_moved(counters, sent)?;
        Ok(done)
    }

    /// Where `dst` stands, from one `TCP_INFO` read, given what the program has `redirected`
    /// to it.
    fn peer(&self, dst: RawFd, redirected: u64) -> Result<Peer, MoveError> {
        let (acked, queued) = super::sys::acked_and_queued(dst).map_err(MoveError::Dst)?;
        let sent = redirected + self.moved;
        Ok(Peer {
            behind_worker: queued.wrapping_sub(self.dst_base) < sent,
            unacked: (sent + self.dst_base).saturating_sub(acked),
        })
    }

    fn count_moved(&mut self, counters: &impl Counters, n: usize) -> Result<(), MoveError> {
        if n > 0 {
            self.moved += n as u64;
            counters
                .set_moved(self.src_cookie, self.moved)
                .map_err(MoveError::Dst)?;
        }
        Ok(())
    }

    fn step_with(
        &mut self,
        counters: &impl Counters,
        src: RawFd,
        dst: RawFd,
        buf: &mut [u8],
    ) -> Result<Step, MoveError> {
        loop {
            let (redirected, held) = counters.counts(self.src_cookie);
            if held == self.moved {
                // Caught up (or woken for an episode already over).
                self.active = false;
                return Ok(Step::Idle);
            }
            let peer = self.peer(dst, redirected)?;
            if !self.active {
                // Let the peer drain to half the threshold first, so the kernel forwards the
                // next stretch rather than userspace chasing a slow reader byte by byte.
                if peer.unacked > self.backlog.threshold() / 2 {
                    return Ok(Step::Wait);
                }
                self.active = true;
            }
            if peer.behind_worker {
                return Ok(Step::Wait);
            }
            let Some(peeked) = recv_held(src, buf, libc::MSG_PEEK)? else {
                return Ok(Step::Wait);
            };
            let sent = send_some(dst, &buf[..peeked])?;
            if sent == 0 {
                return Ok(Step::Wait);
            }
            self.moved += sent as u64;
            counters
                .set_moved(self.src_cookie, self.moved)
                .map_err(MoveError::Dst)?;
            // Only now may the window reopen: what arrives next is redirected, behind these.
            consume(src, &mut buf[..sent]).map_err(MoveError::Src)?;
        }
    }
}

/// The peer of a direction, as the mover sees it.
struct Peer {
    /// Bytes the program redirected may still be in the kernel's worker queue for the peer:
    /// bytes from userspace must not overtake them.
    behind_worker: bool,
    /// Bytes sent towards the peer (redirected and moved) that its remote has not acknowledged.
    unacked: u64,
}

/// Writes to the peer what its send buffer takes now: 0 when it is full.
fn send_some(dst: RawFd, buf: &[u8]) -> Result<usize, MoveError> {
    match sys::send(dst, buf) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(MoveError::Dst(e)),
    }
}

/// Reads held bytes from the source; `None` when there are none yet. A `recv` of 0 (FIN) or
/// EAGAIN does not mean they are all moved: held skbs can still be in the kernel's queue for
/// the source, and the held count says when all have arrived.
fn recv_held(src: RawFd, buf: &mut [u8], flags: libc::c_int) -> Result<Option<usize>, MoveError> {
    match sys::recv(src, buf, flags) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(MoveError::Src(e)),
    }
}

/// Takes exactly `buf.len()` bytes, already peeked, off the source's queue.
fn consume(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match sys::recv(fd, &mut buf[done..], 0)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peeked bytes vanished from the receive queue",
                ));
            }
            n => done += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// The program's side, played by the test: how much it "held", and what userspace told it.
    #[derive(Default)]
    struct FakeProgram {
        held: Cell<u64>,
        moved: Cell<u64>,
        relay: Cell<Option<bool>>,
    }

    impl Counters for FakeProgram {
        fn counts(&self, _: u64) -> (u64, u64) {
            (0, self.held.get())
        }
        fn set_moved(&self, _: u64, moved: u64) -> io::Result<()> {
            self.moved.set(moved);
            Ok(())
        }
        fn set_limit(&self, _: u64, limit: Limit) -> io::Result<()> {
            self.relay.set(Some(limit.relay != 0));
            Ok(())
        }
        fn reset_seq(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
    }

    /// A connected loopback pair: (the end the test uses, the end the mover uses).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    /// Steps until the mover is idle with everything held moved, for at most 5 s. Every step
    /// is taken as if at `at`, so how long this takes cannot count as quiet.
    fn step_until_idle(
        m: &mut Mover,
        p: &FakeProgram,
        src: &TcpStream,
        dst: &TcpStream,
        at: Instant,
    ) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let step = m.step_at(p, src.as_raw_fd(), dst.as_raw_fd(), at).unwrap();
            if step == Step::Idle && m.moved() == p.held.get() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mover stuck at {} bytes",
                m.moved()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn relay_forwards_in_order_and_hands_back_after_quiet() {
        let (mut client, src) = pair();
        let (dst, mut sink) = pair();
        let program = FakeProgram::default();
        let base = super::super::sys::queued_total(dst.as_raw_fd()).unwrap();
        let mut mover = Mover::new(1, base, Backlog::default().with_overrun(Overrun::Relay));
        let data = pattern(300 << 10);
        client.write_all(&data).unwrap();
        program.held.set(data.len() as u64);

        let now = Instant::now();
        step_until_idle(&mut mover, &program, &src, &dst, now);
        assert_eq!(
            program.relay.get(),
            Some(true),
            "an episode starts relaying"
        );
        assert_eq!(
            (mover.relays(), program.moved.get()),
            (1, data.len() as u64)
        );
        let mut got = vec![0; data.len()];
        sink.read_exact(&mut got).unwrap();
        assert!(got == data, "relayed bytes out of order");

        // Caught up, but the episode began just now: still relaying.
        let fds = (src.as_raw_fd(), dst.as_raw_fd());
        assert_eq!(
            mover.step_at(&program, fds.0, fds.1, now).unwrap(),
            Step::Idle
        );
        assert!(mover.relaying());
        // Quiet for RELAY_QUIET: back to the kernel.
        let later = now + RELAY_QUIET;
        assert_eq!(
            mover.step_at(&program, fds.0, fds.1, later).unwrap(),
            Step::Idle
        );
        assert!(!mover.relaying());
        assert_eq!(program.relay.get(), Some(false));
    }

    #[test]
    fn splice_overrun_catches_up_held_bytes_without_relaying() {
        // `Overrun::Splice`, and the threshold came before the detach: bytes are held.
        let (mut client, src) = pair();
        let (dst, mut sink) = pair();
        let program = FakeProgram::default();
        let base = super::super::sys::queued_total(dst.as_raw_fd()).unwrap();
        let mut mover = Mover::new(1, base, Backlog::default());
        assert_eq!(Backlog::default().overrun(), Overrun::Splice);
        let data = pattern(300 << 10);
        client.write_all(&data).unwrap();
        program.held.set(data.len() as u64);
        // A slow reader: the peer was first seen at the threshold a second ago and has drained
        // to half of it since (a fast one is relayed, see the next test).
        let first_look = Instant::now();
        mover.draining = Some((first_look, Backlog::default().threshold()));

        step_until_idle(
            &mut mover,
            &program,
            &src,
            &dst,
            first_look + Duration::from_secs(1),
        );
        assert_eq!(
            (program.relay.get(), mover.relays(), mover.relaying()),
            (None, 0, false),
            "the episode is caught up, not relayed: relaying would copy all of it"
        );
        assert_eq!(program.moved.get(), data.len() as u64);
        let mut got = vec![0; data.len()];
        sink.read_exact(&mut got).unwrap();
        assert!(got == data, "moved bytes out of order");
        // The reader kept up, so there is no reason to leave the kernel path.
        mover
            .step(&program, src.as_raw_fd(), dst.as_raw_fd())
            .unwrap();
        assert!(!mover.wants_detach());
    }

    #[test]
    fn a_catch_up_relays_only_a_reader_that_would_starve_in_the_stall() {
        let backlog = Backlog::default();
        let (threshold, half) = (backlog.threshold(), backlog.threshold() / 2);
        let t0 = Instant::now();
        // Drained from the threshold to half in 1 s: 7.75 MB/s would drain 1.55 MB in a stall,
        // far less than the half threshold still queued: catch up (pause).
        let mut m = Mover::new(1, 0, backlog);
        assert!(!m.reader_outruns_a_stall(threshold, t0));
        assert!(!m.reader_outruns_a_stall(threshold - half / 2, t0 + Duration::from_millis(500)));
        assert!(!m.reader_outruns_a_stall(half, t0 + Duration::from_secs(1)));
        // The same in 20 ms: the reader would empty the peer ten times over in 200 ms: relay.
        let mut m = Mover::new(1, 0, backlog);
        assert!(!m.reader_outruns_a_stall(threshold, t0));
        assert!(m.reader_outruns_a_stall(half, t0 + Duration::from_millis(20)));
        // Right at the rate where a stall just empties the half threshold: not starving yet.
        let mut m = Mover::new(1, 0, backlog);
        assert!(!m.reader_outruns_a_stall(threshold, t0));
        assert!(!m.reader_outruns_a_stall(half, t0 + PERSIST_STALL));
        // Drained before the first look: fast.
        let mut m = Mover::new(1, 0, backlog);
        assert!(m.reader_outruns_a_stall(half - 1, t0));
    }

    #[test]
    fn relay_keeps_the_peer_within_the_threshold() {
        let (client, src) = pair();
        let (dst, mut sink) = pair();
        let program = FakeProgram::default();
        let base = super::super::sys::queued_total(dst.as_raw_fd()).unwrap();
        let backlog = Backlog::new(Backlog::MIN_BYTES)
            .unwrap()
            .with_overrun(Overrun::Relay);
        let mut mover = Mover::new(1, base, backlog);
        let data = pattern(8 << 20);
        program.held.set(data.len() as u64);
        let writer = std::thread::spawn({
            let data = data.clone();
            move || (&client).write_all(&data).unwrap()
        });
        // The sink does not read: the mover must stop with at most a threshold unacknowledged.
        let fds = (src.as_raw_fd(), dst.as_raw_fd());
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            assert_eq!(mover.step(&program, fds.0, fds.1).unwrap(), Step::Wait);
            std::thread::sleep(Duration::from_millis(2));
        }
        let acked = super::super::sys::acked_and_queued(fds.1).unwrap().0 - base;
        let unacked = mover.moved() - acked;
        assert!(mover.moved() > 0 && mover.moved() < data.len() as u64);
        assert!(
            unacked <= backlog.threshold(),
            "{unacked} bytes unacknowledged past a {}-byte threshold",
            backlog.threshold()
        );
        // The sink reads: everything arrives, in order.
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; 8 << 20];
            sink.read_exact(&mut got).unwrap();
            got
        });
        step_until_idle(&mut mover, &program, &src, &dst, Instant::now());
        writer.join().unwrap();
        assert!(reader.join().unwrap() == data, "relayed bytes out of order");
    }

    #[tokio::test]
    async fn a_lost_wake_up_wakes_every_tunnel_once() {
        let waiters = HoldWaiters::default();
        let (a, b) = (waiters.watch(1), waiters.watch(2));
        let woken = |n: &Notify| {
            // A stored permit resolves at once; none leaves the future pending.
            futures_ready(n.notified())
        };
        let mut seen = 5;
        waiters.wake_all_if_lost(5, &mut seen);
        assert!(!woken(&a) && !woken(&b), "nothing lost, nobody woken");
        waiters.wake_all_if_lost(7, &mut seen);
        assert_eq!(seen, 7);
        assert!(woken(&a) && woken(&b), "every tunnel woken after a loss");
        waiters.wake_all_if_lost(7, &mut seen);
        assert!(
            !woken(&a) && !woken(&b),
            "the same count again wakes nobody"
        );
    }

    /// Whether a future is ready on its first poll.
    fn futures_ready(f: impl std::future::Future<Output = ()>) -> bool {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn backlog_splits_the_bound() {
        let b = Backlog::default();
        assert_eq!(b.bytes(), 16 * MIB);
        assert_eq!(b.rcvbuf(), 512 * KIB);
        assert_eq!(b.threshold() + b.rcvbuf(), b.bytes());
        assert!(b.sndbuf() > b.threshold());
        let small = Backlog::new(Backlog::MIN_BYTES).expect("minimum is valid");
        assert_eq!(small.rcvbuf(), 128 * KIB);
        assert_eq!(small.threshold(), 384 * KIB);
        assert!(Backlog::new(Backlog::MIN_BYTES - 1).is_none());
    }

    /// A spliced start holds at most the bound: the source's receive buffer, the pipe and the
    /// peer's send buffer together (the smallest bounds cannot fit the 1 MiB pipe; the peer then
    /// gets the 256 KiB floor).
    #[test]
    fn a_spliced_start_stays_within_the_bound() {
        let pipe = MIB;
        for mib in [4, 8, 16, 64, 1024] {
            let b = Backlog::new(mib * MIB).unwrap();
            assert!(b.start_rcvbuf() > b.rcvbuf(), "{mib} MiB: a larger window");
            let held = b.start_rcvbuf() + pipe + b.start_sndbuf(pipe);
            assert!(held <= b.bytes(), "{mib} MiB: {held} bytes");
        }
        let d = Backlog::default();
        assert_eq!(
            (d.start_rcvbuf(), d.start_sndbuf(pipe)),
            (4 * MIB, 11 * MIB)
        );
        let small = Backlog::new(Backlog::MIN_BYTES).unwrap();
        assert_eq!(small.start_sndbuf(pipe), 256 * KIB);
    }

    #[test]
    fn a_detached_direction_gets_the_wide_window_only_within_the_bound() {
        let pipe = MIB;
        for mib in [4, 16, 64, 256] {
            let b = Backlog::new(mib * MIB).unwrap();
            // At the soft threshold, as a walk on time finds it: the wide window fits.
            let (rcv, snd) = b.detached_buffers(b.soft(), pipe);
            assert_eq!(
                (rcv, snd),
                (b.start_rcvbuf(), b.start_sndbuf(pipe)),
                "{mib} MiB"
            );
            assert!(rcv > b.rcvbuf());
            assert!(b.soft().max(snd) + pipe + rcv <= b.bytes(), "{mib} MiB");
            // Everything the peer's send buffer may hold: still within.
            assert_eq!(b.detached_buffers(snd, pipe), (rcv, snd));
            // More on its way than that: the kernel path's window, the peer within the threshold.
            assert_eq!(
                b.detached_buffers(snd + 1, pipe),
                (b.rcvbuf(), b.spliced_sndbuf(pipe)),
                "{mib} MiB"
            );
            assert!(b.threshold() + b.rcvbuf() <= b.bytes());
        }
    }
}
