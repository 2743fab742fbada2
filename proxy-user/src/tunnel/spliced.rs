//! One direction of a sockmap tunnel forwarded by splice(2) while its reader is the bottleneck.
//!
//! The source socket has left `ARMED` (see `detach.rs`), or not joined it yet (a tunnel starts
//! spliced, `--sockmap-start splice`), so the program does not run on it and
//! new bytes wait in its ordinary receive queue, under TCP's own flow control; the reverse
//! direction stays in the kernel. This moves them source → pipe → peer until the peer has not
//! been full for a quiet period, then hands back with the pipe empty and the source's queue seen
//! empty, so the program resumes exactly at the next unread byte.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

use super::holds::MoveError;
use super::splice::{Pipe, splice};
use super::sys;

/// How a spliced direction stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The peer kept up for the quiet period; pipe empty, source queue seen empty.
    Quiet,
    /// The source sent FIN; every byte before it was written and the peer was shut for writing.
    Eof,
}

/// The splice(2) state of one direction.
pub(super) struct Spliced {
    src: RawFd,
    dst: RawFd,
    pipe: Pipe,
    /// Bytes in the pipe, not yet written to `dst`.
    in_pipe: usize,
    /// Source readable, peer writable, edge-triggered, in a private epoll set.
    ready: AsyncFd<OwnedFd>,
    /// `queued_total(dst)` to wait for before the first write: every byte the program
    /// redirected, and userspace moved, before the detach. `None` once reached.
    worker_target: Option<u64>,
    /// Bytes written to `dst` so far.
    written: u64,
    /// When `dst` last refused bytes (its send buffer, sized to the threshold, was full).
    pressed: Instant,
    /// The last read from `src` found its queue empty.
    src_empty: bool,
    /// Handing back was refused (the source is no longer ESTABLISHED): splice to the end.
    to_the_end: bool,
    /// When the run began (it lasts at least its hold), and how often the peer refused bytes
    /// since (for the debug log).
    began: Instant,
    refusals: u64,
}

impl Spliced {
    /// Starts splicing `src` → `dst`; `worker_target` as for [`Spliced::worker_target`].
    pub(super) fn new(src: RawFd, dst: RawFd, worker_target: u64) -> io::Result<Spliced> {
        let pipe = Pipe::new()?;
        // Source readable (and its FIN), peer writable.
        let ready = sys::epoll_set(&[
            (src, libc::EPOLLIN | libc::EPOLLRDHUP, src as u64),
            (dst, libc::EPOLLOUT, dst as u64),
        ])?;
        Ok(Spliced {
            src,
            dst,
            pipe,
            in_pipe: 0,
            ready,
            worker_target: Some(worker_target),
            written: 0,
            pressed: Instant::now(),
            src_empty: false,
            to_the_end: false,
            began: Instant::now(),
            refusals: 0,
        })
    }

    /// Bytes written to the peer so far.
    pub(super) fn written(&self) -> u64 {
        self.written
    }

    /// Never hand back: the source cannot rejoin the sockmap.
    pub(super) fn splice_to_the_end(&mut self) {
        self.to_the_end = true;
    }

    /// Forwards for at least `hold`, then until the peer has kept up for `quiet` with at most
    /// `max_outq` bytes in its send queue, or the source's FIN has been passed on. `progress(n)`
    /// counts bytes written.
    /// Cancel-safe: all state is in `self`, and nothing is read that is not kept.
    pub(super) async fn run(
        &mut self,
        hold: Duration,
        quiet: Duration,
        max_outq: u64,
        mut progress: impl FnMut(usize),
    ) -> Result<Stop, MoveError> {
        loop {
            if let Some(target) = self.worker_target {
                let queued = sys::queued_total(self.dst).map_err(MoveError::Dst)?;
                if queued < target {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                    continue;
                }
                self.worker_target = None;
            }
            let mut eof = false;
            loop {
                while self.in_pipe > 0 {
                    match splice(self.pipe.read.as_raw_fd(), self.dst, self.in_pipe) {
                        Ok(n) => {
                            self.in_pipe -= n;
                            self.written += n as u64;
                            progress(n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.pressed = Instant::now();
                            self.refusals += 1;
                            break;
                        }
                        Err(e) => return Err(MoveError::Dst(e)),
                    }
                }
                if self.in_pipe > 0 {
                    break;
                }
                match splice(self.src, self.pipe.write.as_raw_fd(), self.pipe.capacity) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        self.in_pipe = n;
                        self.src_empty = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.src_empty = true;
                        break;
                    }
                    Err(e) => return Err(MoveError::Src(e)),
                }
            }
            if eof {
                socket2::SockRef::from(&borrowed(self.dst))
                    .shutdown(std::net::Shutdown::Write)
                    .map_err(MoveError::Dst)?;
                return Ok(Stop::Eof);
            }
            let idle = self.in_pipe == 0 && self.src_empty && !self.to_the_end;
            let held = self.began.elapsed() >= hold;
            if idle && held && self.pressed.elapsed() >= quiet {
                if sys::outq(self.dst).map_err(MoveError::Dst)? <= max_outq {
                    tracing::debug!(
                        "spliced: quiet after {:?}, {} bytes, {} refusals by the peer",
                        self.began.elapsed(),
                        self.written,
                        self.refusals,
                    );
                    return Ok(Stop::Quiet);
                }
                // Quiet, but the peer still has much queued: look again shortly.
                tokio::select! {
                    r = self.wait() => r.map_err(MoveError::Src)?,
                    () = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
                continue;
            }
            let deadline = (self.pressed + quiet).max(self.began + hold);
            tokio::select! {
                r = self.wait() => r.map_err(MoveError::Src)?,
                () = tokio::time::sleep_until(deadline), if idle => {}
            }
        }
    }

    /// Waits until the source is readable or the peer writable (or either has an error).
    async fn wait(&self) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
        sys::epoll_next(&self.ready, &mut events).await.map(|_| ())
    }
}

fn borrowed(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the tunnel keeps both sockets open for as long as its Spliced lives, and the
    // borrow is used only within one call.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
