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

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// How much one direction of a sockmap tunnel may hold in the kernel (`--sockmap-backlog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    bound: u64,
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
        (bytes >= Self::MIN_BYTES).then_some(Backlog { bound: bytes })
    }

    pub fn bytes(self) -> u64 {
        self.bound
    }

    /// Receive buffer of each tunnel socket (the kernel's `sk_rcvbuf`): what a socket can hold
    /// once the program holds, before TCP closes the sender's window. Userspace moves about this
    /// much per backpressure episode, so it is kept small against the threshold (the kernel
    /// forwards about half a threshold between episodes); it also caps the TCP window the proxy
    /// advertises (loopback and LAN need far less; a long fat path may want a larger bound).
    pub fn rcvbuf(self) -> u64 {
        (self.bound / 32).clamp(128 * KIB, MIB)
    }

    /// Unacknowledged bytes towards the peer above which the program holds.
    pub fn threshold(self) -> u64 {
        self.bound - self.rcvbuf()
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

    /// Reads the program's `HOLDS` ring buffer for ever, waking the tunnel of each cookie.
    pub async fn dispatch(self: Arc<Self>, ring: RingBuf<MapData>) -> io::Result<()> {
        // SAFETY: the ring buffer's fd stays open, and the same fd, while the AsyncFd owns it.
        let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
        loop {
            let mut guard = ring.readable_mut().await?;
            while let Some(item) = guard.get_inner_mut().next() {
                if let Some(bytes) = item.get(..8) {
                    let cookie = u64::from_ne_bytes(bytes.try_into().expect("8 bytes"));
                    self.wake(cookie);
                }
            }
            guard.clear_ready();
        }
    }
}

/// What the program's counters and the peer socket say, as the mover needs them.
pub trait Counters {
    /// (bytes redirected, bytes held) from `src` so far.
    fn counts(&self, src_cookie: u64) -> (u64, u64);
    /// Records that userspace has moved `moved` bytes from `src` in total.
    fn set_moved(&self, src_cookie: u64, moved: u64) -> io::Result<()>;
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
        }
    }

    /// Bytes moved so far.
    pub fn moved(&self) -> u64 {
        self.moved
    }

    /// Moves what it can now. A `recv` of 0 (FIN) or EAGAIN does not end an episode: held skbs
    /// can still be in the kernel's queue for `src`; the held count says when all have arrived.
    pub fn step(
        &mut self,
        counters: &impl Counters,
        src: RawFd,
        dst: RawFd,
    ) -> Result<Step, MoveError> {
        SCRATCH.with_borrow_mut(|buf| {
            let chunk = self.backlog.rcvbuf() as usize;
            if buf.len() < chunk {
                buf.resize(chunk, 0);
            }
            self.step_with(counters, src, dst, &mut buf[..chunk])
        })
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
            if !self.active {
                // Let the peer drain to half the threshold first, so the kernel forwards the
                // next stretch rather than userspace chasing a slow reader byte by byte.
                let acked = super::sockmap::bytes_acked(dst).map_err(MoveError::Dst)?;
                let unacked =
                    (redirected + self.moved).saturating_sub(acked.saturating_sub(self.dst_base));
                if unacked > self.backlog.threshold() / 2 {
                    return Ok(Step::Wait);
                }
                self.active = true;
            }
            // Bytes the program redirected before holding may still be in the kernel's worker
            // queue for dst; ours must not overtake them.
            let queued = super::sockmap::queued_total(dst).map_err(MoveError::Dst)?;
            if queued.wrapping_sub(self.dst_base) < redirected + self.moved {
                return Ok(Step::Wait);
            }
            let peeked = match recv(src, buf, libc::MSG_PEEK) {
                Ok(n) if n > 0 => n,
                // 0 (FIN) or nothing yet: held bytes still in the kernel's queue for src arrive
                // later; the held count above says when all have been moved.
                Ok(_) => return Ok(Step::Wait),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Wait),
                Err(e) => return Err(MoveError::Src(e)),
            };
            let sent = match send(dst, &buf[..peeked]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Wait),
                Err(e) => return Err(MoveError::Dst(e)),
            };
            self.moved += sent as u64;
            counters
                .set_moved(self.src_cookie, self.moved)
                .map_err(MoveError::Dst)?;
            // Only now may the window reopen: what arrives next is redirected, behind these.
            consume(src, &mut buf[..sent]).map_err(MoveError::Src)?;
        }
    }
}

/// Takes exactly `buf.len()` bytes, already peeked, off the source's queue.
fn consume(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match recv(fd, &mut buf[done..], 0)? {
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

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: fd is an open socket; buf is valid for buf.len() bytes.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: fd is an open socket; buf is valid for writes of buf.len() bytes.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
