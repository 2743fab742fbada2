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
    /// Made on the source's first bytes (see [`Spliced::fill_pipe`]).
    pipe: Option<Pipe>,
    /// Bytes in the pipe, not yet written to `dst`.
    in_pipe: usize,
    /// Source readable (or only its FIN and errors, see [`Spliced::watch_src_data`]), peer
    /// writable, edge-triggered, in a private epoll set.
    ready: AsyncFd<OwnedFd>,
    /// Whether `ready` reports the source's data, or only its FIN and errors.
    src_data_watched: bool,
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
    /// The peer's queue when it was last looked at, once the direction is quiet, and how often
    /// it was looked at (see [`drain_wait`]).
    drain_seen: Option<(u64, Instant)>,
    drain_polls: u64,
}

/// The shortest and the longest wait between two looks at a quiet direction's peer queue.
const DRAIN_POLL_MIN: Duration = Duration::from_millis(2);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(64);

/// How long a quiet direction waits before it looks again at its peer's send queue, `outq` now
/// and `seen` at the last look, to return once the queue is down to `max_outq`.
///
/// A slow reader drains a large send buffer for a second or more: looked at every 2 ms, 8
/// tunnels made 3,600 wake-ups doing nothing in readerbound-100M-8. A fixed backoff instead
/// looked late at a queue that drained fast, and the direction returned up to 64 ms after it
/// could have, a kernel stretch lost each time. So the wait is half the time the rest would
/// take at the rate just seen: never late while the reader keeps its pace or speeds up to
/// double it, about one look per halving of the rest, and the longest wait while it stalls.
fn drain_wait(seen: Option<(u64, Instant)>, outq: u64, now: Instant, max_outq: u64) -> Duration {
    let Some((before, at)) = seen else {
        return DRAIN_POLL_MIN;
    };
    let drained = before.saturating_sub(outq);
    let elapsed = now.saturating_duration_since(at);
    if drained == 0 {
        return DRAIN_POLL_MAX;
    }
    let rest = outq.saturating_sub(max_outq);
    elapsed
        .mul_f64(rest as f64 / drained as f64 / 2.0)
        .clamp(DRAIN_POLL_MIN, DRAIN_POLL_MAX)
}

impl Spliced {
    /// Starts splicing `src` → `dst`; `worker_target` as for [`Spliced::worker_target`].
    pub(super) fn new(src: RawFd, dst: RawFd, worker_target: u64) -> io::Result<Spliced> {
        // Source readable (and its FIN), peer writable.
        let ready = sys::epoll_set(&[
            (src, SRC_DATA, src as u64),
            (dst, libc::EPOLLOUT, dst as u64),
        ])?;
        Ok(Spliced {
            src,
            dst,
            pipe: None,
            in_pipe: 0,
            ready,
            src_data_watched: true,
            worker_target: Some(worker_target),
            written: 0,
            pressed: Instant::now(),
            src_empty: false,
            to_the_end: false,
            began: Instant::now(),
            refusals: 0,
            drain_seen: None,
            drain_polls: 0,
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
                while let Some(pipe) = self.pipe.as_ref().filter(|_| self.in_pipe > 0) {
                    match splice(pipe.read.as_raw_fd(), self.dst, self.in_pipe) {
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
                match self.fill_pipe() {
                    Err(e) if is_out_of_descriptors(&e) && !self.to_the_end => {
                        // Nothing was read: the kernel path can take the direction as it is.
                        tracing::warn!("sockmap: cannot splice ({e}); the kernel forwards");
                        return Ok(Stop::Quiet);
                    }
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        self.in_pipe = n;
                        self.src_empty = false;
                        self.drain_seen = None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.src_empty = true;
                        break;
                    }
                    Err(e) => return Err(MoveError::Src(e)),
                }
            }
            if self.in_pipe > 0 {
                self.watch_src_data(false).map_err(MoveError::Src)?;
            } else if self.src_empty {
                self.watch_src_data(true).map_err(MoveError::Src)?;
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
                let outq = sys::outq(self.dst).map_err(MoveError::Dst)?;
                if outq <= max_outq {
                    tracing::debug!(
                        "spliced: quiet after {:?}, {} bytes, {} refusals by the peer",
                        self.began.elapsed(),
                        self.written,
                        self.refusals,
                    );
                    return Ok(Stop::Quiet);
                }
                // Quiet, but the peer still has much queued: look again about when it may have
                // gone.
                let now = Instant::now();
                let wait = drain_wait(self.drain_seen, outq, now, max_outq);
                self.drain_seen = Some((outq, now));
                self.drain_polls += 1;
                tokio::select! {
                    r = self.wait() => r?,
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let deadline = (self.pressed + quiet).max(self.began + hold);
            tokio::select! {
                r = self.wait() => r?,
                () = tokio::time::sleep_until(deadline), if idle => {}
            }
        }
    }

    /// Reads what the source has into the empty pipe: `Ok(0)` at its FIN, `WouldBlock` when it
    /// has nothing. The pipe is made on the first bytes, so a direction that carries none, most
    /// often the reply direction of a tunnel that joins the kernel path after its first quiet
    /// period, never holds one: two descriptors and a 1 MiB pipe buffer less per tunnel.
    fn fill_pipe(&mut self) -> io::Result<usize> {
        if self.pipe.is_none() {
            // A peek tells the FIN (0) and an empty queue (`WouldBlock`) from data.
            if sys::recv(self.src, &mut [0u8; 1], libc::MSG_PEEK)? == 0 {
                return Ok(0);
            }
            self.pipe = Some(Pipe::new()?);
        }
        let pipe = self.pipe.as_ref().expect("made above");
        splice(self.src, pipe.write.as_raw_fd(), pipe.capacity)
    }

    /// Waits until the source is readable or the peer writable, or either has an error. An
    /// error on the source ends the direction here, even while the peer takes nothing.
    async fn wait(&self) -> Result<(), MoveError> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
        let n = sys::epoll_next(&self.ready, &mut events)
            .await
            .map_err(MoveError::Src)?;
        for ev in &events[..n] {
            let (mask, token) = (ev.events, ev.u64);
            if token == self.src as u64 && mask & libc::EPOLLERR as u32 != 0 {
                if let Some(e) = sys::take_error(self.src).map_err(MoveError::Src)? {
                    return Err(MoveError::Src(e));
                }
            }
        }
        Ok(())
    }

    /// Has the epoll set report the source's data (`true`), or only its FIN and errors. While
    /// the pipe waits for the peer, each segment the source receives would wake the direction
    /// for nothing: readerbound-100M-8 made 3,190 splice calls, 1,900 of them refused, against
    /// splice mode's 1,102 (proxy CPU 0.40 s/GB against 0.28).
    fn watch_src_data(&mut self, want: bool) -> io::Result<()> {
        if self.src_data_watched != want {
            let events = if want { SRC_DATA } else { libc::EPOLLRDHUP };
            sys::epoll_modify(self.ready.as_raw_fd(), self.src, events, self.src as u64)?;
            self.src_data_watched = want;
        }
        Ok(())
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// What the source is watched for while the pipe has room: its data and its FIN.
const SRC_DATA: libc::c_int = libc::EPOLLIN | libc::EPOLLRDHUP;

fn borrowed(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the tunnel keeps both sockets open for as long as its Spliced lives, and the
    // borrow is used only within one call.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};

    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// (client application, the proxy's source socket), (its peer, server application): the
    /// proxy's two non-blocking, as tokio leaves them.
    fn sockets() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let (client_app, src) = pair();
        let (dst, server_app) = pair();
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        ((client_app, src), (dst, server_app))
    }

    fn pattern(i: usize) -> u8 {
        (i % 251) as u8
    }

    /// A direction whose peer takes nothing waits for the peer alone: the segments its source
    /// keeps receiving meanwhile do not wake it. Then every byte arrives, in order, and the FIN
    /// after them.
    #[tokio::test]
    async fn a_direction_blocked_on_its_peer_is_not_woken_by_its_source() {
        let ((mut client_app, src), (dst, mut server_app)) = sockets();
        sys::set_sndbuf(dst.as_raw_fd(), 256 * 1024).unwrap();
        sys::set_rcvbuf(server_app.as_raw_fd(), 256 * 1024).unwrap();
        // Room for every segment below, so the source's window never closes.
        sys::set_rcvbuf(src.as_raw_fd(), 16 << 20).unwrap();
        let mut sp = Spliced::new(src.as_raw_fd(), dst.as_raw_fd(), 0).unwrap();

        // Enough to fill the peer and the pipe, then 300 segments, one at a time, while the
        // server reads nothing.
        const FILL: usize = 3 << 20;
        const SEGMENTS: usize = 300;
        const SEGMENT: usize = 1000;
        let total = FILL + SEGMENTS * SEGMENT;
        let writer = tokio::task::spawn_blocking(move || {
            let data: Vec<u8> = (0..total).map(pattern).collect();
            client_app.write_all(&data[..FILL]).unwrap();
            for chunk in data[FILL..].chunks(SEGMENT) {
                client_app.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            client_app
        });
        let hold = Duration::from_secs(3600);
        let mut written = 0u64;
        let client_app = tokio::select! {
            r = sp.run(hold, hold, 0, |n| written += n as u64) => {
                panic!("stopped while the peer takes nothing: {r:?}")
            }
            w = writer => w.unwrap(),
        };
        assert!(
            sp.refusals <= 5,
            "{} wake-ups found the peer still full while {SEGMENTS} segments arrived",
            sp.refusals
        );

        client_app.shutdown(Shutdown::Write).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            server_app.read_to_end(&mut got).unwrap();
            got
        });
        let stop = tokio::time::timeout(
            Duration::from_secs(30),
            sp.run(hold, hold, 0, |n| written += n as u64),
        )
        .await
        .expect("the FIN ends the direction")
        .unwrap();
        assert_eq!(stop, Stop::Eof);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), total);
        assert_eq!(written, total as u64);
        assert!(
            got.iter().enumerate().all(|(i, &b)| b == pattern(i)),
            "bytes reordered or changed"
        );
    }

    /// A quiet direction whose peer still has much queued looks at the queue less and less
    /// often while it drains, and returns once it has.
    #[tokio::test]
    async fn a_quiet_direction_waits_for_its_peer_to_drain_without_polling_it_hard() {
        let ((mut client_app, src), (dst, mut server_app)) = sockets();
        sys::set_sndbuf(dst.as_raw_fd(), 8 << 20).unwrap();
        sys::set_rcvbuf(server_app.as_raw_fd(), 64 * 1024).unwrap();
        let mut sp = Spliced::new(src.as_raw_fd(), dst.as_raw_fd(), 0).unwrap();
        const SENT: usize = 2 << 20;
        let data: Vec<u8> = (0..SENT).map(pattern).collect();
        client_app.write_all(&data).unwrap();

        let (quiet, max_outq) = (Duration::from_millis(10), 64 * 1024);
        let mut written = 0u64;
        let r = tokio::time::timeout(
            Duration::from_millis(600),
            sp.run(Duration::ZERO, quiet, max_outq, |n| written += n as u64),
        )
        .await;
        assert!(r.is_err(), "returned with the peer's queue full: {r:?}");
        assert_eq!(written, SENT as u64, "everything went to the peer");
        assert!(
            (3..=20).contains(&sp.drain_polls),
            "{} looks at the peer's queue in 600 ms",
            sp.drain_polls
        );

        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; SENT];
            server_app.read_exact(&mut got).unwrap();
            got
        });
        let stop = tokio::time::timeout(
            Duration::from_secs(10),
            sp.run(Duration::ZERO, quiet, max_outq, |n| written += n as u64),
        )
        .await
        .expect("returns once the peer has drained")
        .unwrap();
        assert_eq!(stop, Stop::Quiet);
        assert!(reader.join().unwrap() == data, "bytes reordered or changed");
    }

    /// The wait between two looks at a draining peer: half the time the rest takes at the rate
    /// seen, the longest while nothing drains, within bounds.
    #[test]
    fn a_draining_peer_is_looked_at_again_when_half_its_rest_may_have_gone() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let max = 64 << 10;
        // The first look has no rate yet.
        assert_eq!(drain_wait(None, 10 << 20, t0, max), DRAIN_POLL_MIN);
        // 1 MiB went in 10 ms and 4 MiB are left: 40 ms to go, looked at again in 20.
        let at = t0 + ms(10);
        let w = drain_wait(Some(((5 << 20) + max, t0)), (4 << 20) + max, at, max);
        assert_eq!(w, ms(20));
        // A slow reader with much left: the longest wait.
        let w = drain_wait(
            Some(((9 << 20) + max, t0)),
            (8 << 20) + max,
            t0 + ms(100),
            max,
        );
        assert_eq!(w, DRAIN_POLL_MAX);
        // Nearly drained: the shortest.
        let w = drain_wait(Some(((1 << 20) + max, t0)), max + 100, t0 + ms(10), max);
        assert_eq!(w, DRAIN_POLL_MIN);
        // Nothing drained, or the queue grew: the longest.
        assert_eq!(
            drain_wait(Some((1 << 20, t0)), 1 << 20, t0 + ms(10), max),
            DRAIN_POLL_MAX
        );
        assert_eq!(
            drain_wait(Some((1 << 20, t0)), 2 << 20, t0 + ms(10), max),
            DRAIN_POLL_MAX
        );
        // At a constant rate the looks halve the rest each time and never pass the moment it
        // is drained by more than the shortest wait.
        let rate = 100e6; // bytes per second
        let (mut now, mut seen) = (t0, None);
        let drained_at = t0 + Duration::from_secs_f64((8 << 20) as f64 / rate);
        let mut looks = 0;
        loop {
            let outq = max + (8u64 << 20).saturating_sub(((now - t0).as_secs_f64() * rate) as u64);
            if outq <= max {
                break;
            }
            let w = drain_wait(seen, outq, now, max);
            seen = Some((outq, now));
            now += w;
            looks += 1;
        }
        assert!(
            now <= drained_at + DRAIN_POLL_MIN,
            "{:?} late",
            now - drained_at
        );
        assert!(looks <= 12, "{looks} looks for an 84 ms drain");
    }

    /// A direction makes its pipe on its source's first bytes, not before; out of descriptors
    /// it reads nothing and hands the direction to the kernel path.
    #[tokio::test]
    async fn the_pipe_is_made_on_the_first_bytes_and_its_absence_hands_back() {
        use crate::tunnel::splice::{PIPES_FAIL, PIPES_MADE};
        let made = || PIPES_MADE.with(|n| n.get());
        let ((mut client_app, src), (dst, mut server_app)) = sockets();
        let mut sp = Spliced::new(src.as_raw_fd(), dst.as_raw_fd(), 0).unwrap();
        let before = made();
        let hold = Duration::from_secs(3600);
        let mut written = 0u64;
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            sp.run(hold, hold, 0, |n| written += n as u64),
        )
        .await;
        assert!(r.is_err(), "stopped: {r:?}");
        assert_eq!(made(), before, "a pipe before any byte");

        client_app.write_all(b"first").unwrap();
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            sp.run(hold, hold, 0, |n| written += n as u64),
        )
        .await;
        assert!(r.is_err(), "stopped: {r:?}");
        assert_eq!(made(), before + 1);
        let mut got = [0u8; 5];
        server_app.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"first");

        // Out of descriptors: nothing is read, and the direction stops as quiet.
        let ((mut client_app, src), (dst, _server_app)) = sockets();
        let mut sp = Spliced::new(src.as_raw_fd(), dst.as_raw_fd(), 0).unwrap();
        client_app.write_all(b"for the kernel").unwrap();
        PIPES_FAIL.with(|f| f.set(true));
        let stop = tokio::time::timeout(
            Duration::from_secs(5),
            sp.run(hold, hold, 0, |n| written += n as u64),
        )
        .await;
        PIPES_FAIL.with(|f| f.set(false));
        assert_eq!(stop.expect("hands back at once").unwrap(), Stop::Quiet);
        assert_eq!(
            sys::inq(src.as_raw_fd()).unwrap(),
            14,
            "everything left queued"
        );
    }
}
