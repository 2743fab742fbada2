//! Each direction of a tunnel on its own: the held bytes userspace moves when the reader falls
//! behind, and a reader-bound direction leaving the kernel path for splice(2) (the detach
//! iterator answers) and coming back once its reader keeps up.

use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;

use super::backoff::{Backoff, Overran};
use super::{Dir, Registration};
use crate::tunnel::detach::Answer;
use crate::tunnel::end::{End, Stage};
use crate::tunnel::holds::{Backlog, Counters, MoveError, Mover, SPLICE_QUIET, Step};
use crate::tunnel::pump::Progress;
use crate::tunnel::splice::PIPE_SIZE;
use crate::tunnel::spliced::{Spliced, Stop};
use crate::tunnel::sys::{acked_and_queued, established, set_rcvbuf, set_sndbuf};

/// What a direction's moves and transitions need from the kernel side of its tunnel: the
/// program's counters and bound ([`Counters`]), the detach walk, the `ARMED` map, and where to
/// count what happened. [`Registration`] is the real one; the tests below drive [`Movers`]
/// through every transition with a fake.
pub(super) trait Kernel: Counters {
    /// The bound of both directions.
    fn backlog(&self) -> Backlog;
    /// The cookie of the socket `dir` reads from.
    fn source_cookie(&self, dir: Dir) -> u64;
    /// Takes the socket off the kernel path under its lock (one walk of the detach iterator).
    fn detach(&self, cookie: u64) -> impl Future<Output = Answer> + Send;
    /// Puts the socket back into `ARMED`: the program runs on it again.
    fn arm(&self, cookie: u64, fd: RawFd) -> io::Result<()>;
    /// Makes each socket of the tunnel the other's redirect target, if not done yet.
    fn join(&self) -> io::Result<()>;
    /// Userspace moved `n` held bytes of `dir`.
    fn count_moved(&self, dir: Dir, n: usize);
    /// A direction started relaying (`n` times), left the kernel path, or came back.
    fn count_relays(&self, n: u64);
    fn count_detach(&self);
    fn count_rearm(&self);
}

impl Kernel for Registration<'_> {
    fn backlog(&self) -> Backlog {
        self.sockmap.backlog
    }

    fn source_cookie(&self, dir: Dir) -> u64 {
        self.cookie(dir)
    }

    fn detach(&self, cookie: u64) -> impl Future<Output = Answer> + Send {
        let detacher = self.sockmap.detacher.clone();
        async move {
            match detacher {
                Some(d) => d.detach(cookie).await,
                None => Answer::Failed("no detach iterator".into()),
            }
        }
    }

    fn arm(&self, cookie: u64, fd: RawFd) -> io::Result<()> {
        self.arm_socket(cookie, fd)
    }

    fn join(&self) -> io::Result<()> {
        self.join_maps()
    }

    fn count_moved(&self, dir: Dir, n: usize) {
        self.userspace.add(dir.into(), n);
    }

    fn count_relays(&self, n: u64) {
        self.relays.fetch_add(n, Ordering::Relaxed);
    }

    fn count_detach(&self) {
        self.detaches.fetch_add(1, Ordering::Relaxed);
    }

    fn count_rearm(&self) {
        self.rearms.fetch_add(1, Ordering::Relaxed);
    }
}

/// A tunnel's two movers of held bytes and whether each still has bytes to move.
pub(super) struct Movers {
    pub(super) up: Mover,
    pub(super) down: Mover,
    pub(super) up_moving: bool,
    pub(super) down_moving: bool,
    /// A direction off the kernel path, forwarded by splice(2).
    pub(super) up_spliced: Option<Box<Spliced>>,
    pub(super) down_spliced: Option<Box<Spliced>>,
    /// How long each direction stays spliced at least.
    pub(super) up_backoff: Backoff,
    pub(super) down_backoff: Backoff,
    /// The program runs on the direction's source (armed), whether or not it is spliced now.
    pub(super) up_armed: bool,
    pub(super) down_armed: bool,
    pub(super) client: RawFd,
    pub(super) upstream: RawFd,
}

impl Movers {
    /// Nothing to move yet; `armed`: which directions the program forwards (up, down).
    fn new(up: Mover, down: Mover, armed: (bool, bool), client: RawFd, upstream: RawFd) -> Movers {
        Movers {
            up_armed: armed.0,
            down_armed: armed.1,
            up,
            down,
            up_moving: false,
            down_moving: false,
            up_spliced: None,
            down_spliced: None,
            up_backoff: Backoff::default(),
            down_backoff: Backoff::default(),
            client,
            upstream,
        }
    }

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

    /// Whether the program forwards `dir` now: armed and not spliced.
    pub(super) fn on_kernel_path(&self, dir: Dir) -> bool {
        match dir {
            Dir::Up => self.up_armed && self.up_spliced.is_none(),
            Dir::Down => self.down_armed && self.down_spliced.is_none(),
        }
    }

    fn set_armed(&mut self, dir: Dir) {
        match dir {
            Dir::Up => self.up_armed = true,
            Dir::Down => self.down_armed = true,
        }
    }

    fn backoff(&mut self, dir: Dir) -> &mut Backoff {
        match dir {
            Dir::Up => &mut self.up_backoff,
            Dir::Down => &mut self.down_backoff,
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
            Dir::Up => self.up_spliced.as_deref(),
            Dir::Down => self.down_spliced.as_deref(),
        }
    }

    /// Boxed: only directions that left the kernel path need one, and the movers live in the
    /// watch loop's future for as long as the tunnel.
    fn set_spliced(&mut self, dir: Dir, sp: Spliced) {
        let sp = Some(Box::new(sp));
        match dir {
            Dir::Up => self.up_spliced = sp,
            Dir::Down => self.down_spliced = sp,
        }
    }

    fn take_spliced(&mut self, dir: Dir) -> Option<Spliced> {
        match dir {
            Dir::Up => self.up_spliced.take().map(|b| *b),
            Dir::Down => self.down_spliced.take().map(|b| *b),
        }
    }

    /// Moves what one direction can now (after a wake-up or a tick).
    fn step(&mut self, k: &impl Kernel, dir: Dir) -> Result<(), End> {
        let (src, dst) = self.fds(dir);
        let moving = step(k, self.mover(dir), src, dst, dir)?;
        self.set_moving(dir, moving);
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
    pub(super) fn busy(&self, up_done: bool, down_done: bool) -> bool {
        (self.needs_tick(Dir::Up) && !up_done) || (self.needs_tick(Dir::Down) && !down_done)
    }

    /// Steps every open direction that has held bytes left.
    pub(super) fn tick(
        &mut self,
        k: &impl Kernel,
        up_done: bool,
        down_done: bool,
    ) -> Result<(), End> {
        if self.needs_tick(Dir::Up) && !up_done {
            self.step(k, Dir::Up)?;
        }
        if self.needs_tick(Dir::Down) && !down_done {
            self.step(k, Dir::Down)?;
        }
        Ok(())
    }
}

impl Registration<'_> {
    /// The movers of held bytes for both directions of this tunnel.
    pub(super) fn movers(&self, client: RawFd, upstream: RawFd) -> Movers {
        let backlog = self.sockmap.backlog;
        Movers::new(
            Mover::new(self.client, self.base_upstream, backlog),
            Mover::new(self.upstream, self.base_client, backlog),
            (self.client_armed, self.upstream_armed),
            client,
            upstream,
        )
    }
}

/// Moves held bytes of one direction; `Ok(true)` while some remain.
pub(super) fn step(
    k: &impl Kernel,
    mover: &mut Mover,
    src: RawFd,
    dst: RawFd,
    dir: Dir,
) -> Result<bool, End> {
    let (before, relays) = (mover.moved(), mover.relays());
    let result = mover.step(k, src, dst);
    let moved = (mover.moved() - before) as usize;
    if moved > 0 {
        k.count_moved(dir, moved);
    }
    k.count_relays(mover.relays() - relays);
    match result {
        Ok(Step::Idle) => Ok(false),
        Ok(Step::Wait) => Ok(true),
        Err(e) => Err(End::moving(dir.into(), e)),
    }
}

impl Movers {
    /// After a wake-up for `dir`: moves held bytes, and takes the direction off the kernel
    /// path when its mover asks (`--sockmap-overrun splice`).
    pub(super) async fn advance(&mut self, k: &impl Kernel, dir: Dir) -> Result<(), End> {
        if self.spliced(dir).is_some() {
            // A wake-up from before the detach.
            return Ok(());
        }
        self.step(k, dir)?;
        let (src, dst) = self.fds(dir);
        let cookie = k.source_cookie(dir);
        let failed = End::failed(Stage::Detach);
        if !self.mover(dir).wants_detach() {
            return Ok(());
        }
        // Where the overrun sits, before the walk lets the worker send on (see `backoff.rs`).
        let (acked, queued) = acked_and_queued(dst).map_err(failed)?;
        let in_worker = self
            .mover(dir)
            .dst_target(k.counts(cookie).0)
            .saturating_sub(queued);
        let overran = Overran::from_queues(in_worker, queued - acked);
        let asked = std::time::Instant::now();
        let answer = k.detach(cookie).await;
        tracing::debug!(
            "sockmap: detach of {cookie} ({overran:?} behind): {answer:?} after {:?}",
            asked.elapsed()
        );
        match answer {
            Answer::Detached => {
                self.mover(dir).detached();
                k.count_detach();
                let target = self.mover(dir).dst_target(k.counts(cookie).0);
                // The peer's send buffer first: it may shrink what the wider window adds.
                let (acked, _) = acked_and_queued(dst).map_err(failed)?;
                let (rcvbuf, sndbuf) = k
                    .backlog()
                    .detached_buffers(target.saturating_sub(acked), PIPE_SIZE as u64);
                set_sndbuf(dst, sndbuf).map_err(failed)?;
                set_rcvbuf(src, rcvbuf).map_err(failed)?;
                match Spliced::new(src, dst, target) {
                    Ok(sp) => {
                        self.backoff(dir)
                            .leaving(std::time::Instant::now(), overran);
                        self.set_spliced(dir, sp);
                    }
                    Err(e) => {
                        // No pipe to be had (out of descriptors): straight back to the kernel.
                        tracing::warn!("sockmap: cannot splice ({e}); the kernel keeps forwarding");
                        self.rearm_socket(k, dir, 0).map_err(failed)?;
                    }
                }
                Ok(())
            }
            // Something was held before the walk reached the socket: catch up, then ask again.
            Answer::Behind => {
                self.mover(dir).behind();
                self.set_moving(dir, true);
                Ok(())
            }
            Answer::NotArmed | Answer::Failed(_) => {
                if let Answer::Failed(e) = &answer {
                    tracing::warn!("sockmap: {e}; relaying this direction instead");
                }
                let r = self.mover(dir).relay_instead(k, std::time::Instant::now());
                k.count_relays(1);
                self.set_moving(dir, true);
                r.map_err(|e| End::moving(dir.into(), e))
            }
        }
    }

    /// A direction that starts spliced (`Start::Splice`): it joins the kernel path at its first
    /// quiet period, or at once where no pipe can be had.
    /// Its peer's send buffer is large, so the peer wakes the splice rarely (left to autotuning,
    /// wan-1G cost 1.50× splice's proxy CPU, against 1.14×), and with the source's receive buffer
    /// and the pipe within the bound ([`Backlog::start_sndbuf`]).
    pub(super) fn start_spliced(&mut self, k: &impl Kernel, dir: Dir) -> Result<(), End> {
        let (src, dst) = self.fds(dir);
        let failed = End::failed(Stage::Arm);
        set_sndbuf(dst, k.backlog().start_sndbuf(PIPE_SIZE as u64)).map_err(failed)?;
        match Spliced::new(src, dst, 0) {
            Ok(sp) => self.set_spliced(dir, sp),
            Err(e) => {
                tracing::warn!("sockmap: cannot splice ({e}); the kernel forwards at once");
                k.join().map_err(failed)?;
                self.rearm_socket(k, dir, 0).map_err(failed)?;
            }
        }
        Ok(())
    }

    /// The spliced direction `dir` kept up: back to the kernel path, unless its sockets can no
    /// longer join the sockmap (then it is spliced to its end).
    fn rearm(&mut self, k: &impl Kernel, dir: Dir) -> io::Result<()> {
        let Some(sp) = self.take_spliced(dir) else {
            return Ok(());
        };
        let (src, dst) = self.fds(dir);
        if let Err(e) = k.join() {
            // A socket that is no longer ESTABLISHED cannot enter a sockmap; a full map is
            // worth a word.
            if established(src) && established(dst) {
                tracing::warn!("sockmap: {e}; this direction stays spliced");
            }
            return self.splice_to_the_end(k, dir, sp);
        }
        match self.rearm_socket(k, dir, sp.written()) {
            Ok(()) => {
                self.backoff(dir).returned(std::time::Instant::now());
                Ok(())
            }
            Err(_) if !established(src) => self.splice_to_the_end(k, dir, sp),
            Err(e) => Err(e),
        }
    }

    /// `dir` cannot return to the kernel path: it stays spliced until its FIN.
    fn splice_to_the_end(&mut self, k: &impl Kernel, dir: Dir, mut sp: Spliced) -> io::Result<()> {
        sp.splice_to_the_end();
        let (_, dst) = self.fds(dir);
        set_sndbuf(dst, k.backlog().spliced_sndbuf(PIPE_SIZE as u64))?;
        self.set_spliced(dir, sp);
        Ok(())
    }

    /// Puts a detached source back into `ARMED` after `spliced` bytes went to its peer by
    /// splice: the program's bound counts them, its next skb is trimmed against the socket's
    /// `copied_seq`, the peer's send buffer is back to its armed size, and what queued
    /// meanwhile is run through the program in order.
    fn rearm_socket(&mut self, k: &impl Kernel, dir: Dir, spliced: u64) -> io::Result<()> {
        let (src, dst) = self.fds(dir);
        let cookie = k.source_cookie(dir);
        let limit = self.mover(dir).rearm(spliced);
        k.reset_seq(cookie)?;
        k.set_limit(cookie, limit)?;
        set_sndbuf(dst, k.backlog().sndbuf())?;
        k.arm(cookie, src)?;
        self.set_armed(dir);
        k.count_rearm();
        Ok(())
    }

    /// What a spliced direction's run ended with, applied: back to the kernel, or done.
    /// `Ok(true)`: the direction is finished (FIN forwarded).
    pub(super) fn spliced_stopped(
        &mut self,
        k: &impl Kernel,
        dir: Dir,
        r: Result<Stop, MoveError>,
    ) -> Result<bool, End> {
        match r {
            Ok(Stop::Quiet) => {
                self.rearm(k, dir).map_err(End::failed(Stage::Rearm))?;
                Ok(false)
            }
            Ok(Stop::Eof) => {
                self.take_spliced(dir);
                Ok(true)
            }
            Err(e) => Err(End::moving(dir.into(), e)),
        }
    }
}

/// Runs a spliced direction until it stops (`hold`: see `backoff.rs`); never, for one on the
/// kernel path.
pub(super) async fn spliced_run(
    sp: &mut Option<Box<Spliced>>,
    hold: Duration,
    backlog: Backlog,
    spliced: &Progress,
    dir: Dir,
) -> Result<Stop, MoveError> {
    match sp {
        Some(sp) => {
            // Returning with the peer's queue near the soft threshold would cross it again at
            // once: the reader has caught up only once a quarter of it is left.
            // Boxed: the watch loop's future lives as long as the tunnel, and most tunnels
            // never splice (see `a_sockmap_tunnel_future_is_small`).
            Box::pin(
                sp.run(hold, SPLICE_QUIET, (backlog.soft() / 4).max(1), |n| {
                    spliced.add(dir.into(), n)
                }),
            )
            .await
        }
        None => std::future::pending().await,
    }
}

/// Waits for a hold wake-up; never, without one.
pub(super) async fn held(notify: &Option<Arc<Notify>>) {
    match notify {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// How often a direction with held bytes left is stepped again.
pub(super) const HOLD_TICK: Duration = Duration::from_millis(2);

#[cfg(test)]
mod tests {
    //! The transitions of one direction, driven through [`Movers`] with a fake kernel side and
    //! real loopback sockets: the walk's answers (detached, behind, failed), a spliced stretch
    //! that must not overtake what the kernel had redirected, the return to the kernel path,
    //! and a FIN or a refused return while spliced.

    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::thread::JoinHandle;

    use super::*;
    use crate::ebpf::Limit;
    use crate::tunnel::end::Side;
    use crate::tunnel::sockmap::backoff::HOLD_MAX;
    use crate::tunnel::sys;

    const UP: u64 = 11;
    const DOWN: u64 = 22;
    const KIB: usize = 1024;

    /// The kernel side, scripted: what the program reports, what the walk answers, and a log of
    /// every call a direction makes.
    struct FakeKernel {
        backlog: Backlog,
        redirected: Cell<u64>,
        answers: RefCell<VecDeque<Answer>>,
        calls: RefCell<Vec<Call>>,
        arm_fails: Cell<bool>,
        join_fails: Cell<bool>,
        relays: Cell<u64>,
        detaches: Cell<u64>,
        rearms: Cell<u64>,
    }

    #[derive(Debug, PartialEq)]
    enum Call {
        Detach(u64),
        SetLimit(u64, Limit),
        ResetSeq(u64),
        Arm(u64, RawFd),
        Join,
    }

    impl FakeKernel {
        fn new(answers: impl IntoIterator<Item = Answer>) -> FakeKernel {
            FakeKernel {
                // The smallest bound: threshold 384 KiB, soft threshold 192 KiB.
                backlog: Backlog::new(Backlog::MIN_BYTES).unwrap(),
                redirected: Cell::new(0),
                answers: RefCell::new(answers.into_iter().collect()),
                calls: RefCell::new(Vec::new()),
                arm_fails: Cell::new(false),
                join_fails: Cell::new(false),
                relays: Cell::new(0),
                detaches: Cell::new(0),
                rearms: Cell::new(0),
            }
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.take()
        }
    }

    impl Counters for FakeKernel {
        fn counts(&self, _: u64) -> (u64, u64) {
            // Nothing held: the direction is pressed, never over its bound.
            (self.redirected.get(), 0)
        }
        fn set_moved(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn set_limit(&self, cookie: u64, limit: Limit) -> io::Result<()> {
            self.calls.borrow_mut().push(Call::SetLimit(cookie, limit));
            Ok(())
        }
        fn reset_seq(&self, cookie: u64) -> io::Result<()> {
            self.calls.borrow_mut().push(Call::ResetSeq(cookie));
            Ok(())
        }
    }

    impl Kernel for FakeKernel {
        fn backlog(&self) -> Backlog {
            self.backlog
        }
        fn source_cookie(&self, dir: Dir) -> u64 {
            match dir {
                Dir::Up => UP,
                Dir::Down => DOWN,
            }
        }
        fn detach(&self, cookie: u64) -> impl Future<Output = Answer> + Send {
            self.calls.borrow_mut().push(Call::Detach(cookie));
            let answer = self
                .answers
                .borrow_mut()
                .pop_front()
                .expect("a scripted answer");
            std::future::ready(answer)
        }
        fn arm(&self, cookie: u64, fd: RawFd) -> io::Result<()> {
            self.calls.borrow_mut().push(Call::Arm(cookie, fd));
            if self.arm_fails.get() {
                return Err(io::Error::other("ARMED refused the socket"));
            }
            Ok(())
        }
        fn join(&self) -> io::Result<()> {
            self.calls.borrow_mut().push(Call::Join);
            if self.join_fails.get() {
                return Err(io::Error::other("PEERS is full"));
            }
            Ok(())
        }
        fn count_moved(&self, _: Dir, _: usize) {}
        fn count_relays(&self, n: u64) {
            self.relays.set(self.relays.get() + n);
        }
        fn count_detach(&self) {
            self.detaches.set(self.detaches.get() + 1);
        }
        fn count_rearm(&self) {
            self.rearms.set(self.rearms.get() + 1);
        }
    }

    /// One tunnel's sockets: the proxy's two (non-blocking, as tokio leaves them) and the
    /// applications at either end.
    struct Tunnel {
        client_app: TcpStream,
        src: TcpStream,
        dst: TcpStream,
        server_app: TcpStream,
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn tunnel() -> Tunnel {
        let (client_app, src) = pair();
        let (dst, server_app) = pair();
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        Tunnel {
            client_app,
            src,
            dst,
            server_app,
        }
    }

    fn movers(backlog: Backlog, t: &Tunnel) -> Movers {
        Movers::new(
            Mover::new(UP, 0, backlog),
            Mover::new(DOWN, 0, backlog),
            (true, true),
            t.src.as_raw_fd(),
            t.dst.as_raw_fd(),
        )
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect()
    }

    /// Writes all of `data` to a non-blocking socket (as the kernel's redirect worker would
    /// queue it on the peer).
    fn write_all_nonblocking(s: &TcpStream, data: &[u8]) {
        let mut s = s.try_clone().unwrap();
        let mut at = 0;
        while at < data.len() {
            match s.write(&data[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("writing: {e}"),
            }
        }
    }

    /// Everything the server application reads until EOF or `len` bytes.
    fn read_up_to(s: &TcpStream, len: usize) -> JoinHandle<Vec<u8>> {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0; 64 * KIB];
            while got.len() < len {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("reading: {e}"),
                }
            }
            got
        })
    }

    /// Runs the spliced up direction until it stops, within a deadline.
    async fn run_spliced(m: &mut Movers, k: &FakeKernel, progress: &Progress) -> Stop {
        let run = spliced_run(
            &mut m.up_spliced,
            m.up_backoff.hold(),
            k.backlog,
            progress,
            Dir::Up,
        );
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the spliced direction stopped")
            .expect("no socket failed")
    }

    /// The kernel reports `redirected` bytes towards a peer that has acknowledged none of them
    /// (the redirect worker has not queued them yet; callers write them to the peer only
    /// after this): past the soft threshold, so a wake-up asks the walk to detach the source.
    async fn press_and_ask(m: &mut Movers, k: &FakeKernel, redirected: usize) {
        k.redirected.set(redirected as u64);
        m.advance(k, Dir::Up).await.expect("advance");
    }

    /// `t`'s up direction taken off the kernel path by a walk, with `redirected` bytes reported
    /// on their way to the peer: spliced from here on.
    async fn detached(t: &Tunnel, redirected: usize) -> (FakeKernel, Movers) {
        let k = FakeKernel::new([Answer::Detached]);
        let mut m = movers(k.backlog, t);
        press_and_ask(&mut m, &k, redirected).await;
        assert!(m.up_spliced.is_some(), "the detached direction is spliced");
        (k, m)
    }

    #[tokio::test]
    async fn a_detached_direction_is_spliced_behind_the_kernel_bytes_then_returns() {
        let t = tunnel();
        let k = FakeKernel::new([Answer::Detached]);
        let mut m = movers(k.backlog, &t);
        let (kernel_bytes, spliced_bytes) = (pattern(512 * KIB, 0x5a), pattern(300 * KIB, 0xa5));
        let reader = read_up_to(&t.server_app, kernel_bytes.len() + spliced_bytes.len());

        press_and_ask(&mut m, &k, kernel_bytes.len()).await;
        assert!(m.up_spliced.is_some(), "the detached direction is spliced");
        assert_eq!(k.calls(), [Call::Detach(UP)]);
        assert_eq!(k.detaches.get(), 1);

        // New bytes arrive on the source while the kernel's 512 KiB are still on their way to
        // the peer: splicing must wait for them, or the new bytes would overtake them.
        (&t.client_app).write_all(&spliced_bytes).unwrap();
        let worker = {
            let (dst, bytes) = (t.dst.try_clone().unwrap(), kernel_bytes.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                write_all_nonblocking(&dst, &bytes);
            })
        };

        let progress = Progress::new();
        let stop = run_spliced(&mut m, &k, &progress).await;
        worker.join().unwrap();
        assert!(matches!(stop, Stop::Quiet), "the reader kept up");
        let got = reader.join().unwrap();
        assert_eq!(got.len(), kernel_bytes.len() + spliced_bytes.len());
        assert!(
            got[..kernel_bytes.len()] == kernel_bytes[..],
            "kernel bytes first"
        );
        assert!(
            got[kernel_bytes.len()..] == spliced_bytes[..],
            "then the spliced ones"
        );
        assert_eq!(
            progress.up.load(Ordering::Relaxed),
            spliced_bytes.len() as u64
        );

        // Back to the kernel: the program's bound counts the spliced bytes in the peer's base,
        // its sequence tracking restarts, and the source is armed again, in that order.
        let done = m.spliced_stopped(&k, Dir::Up, Ok(stop)).expect("rearmed");
        assert!(!done);
        assert!(m.up_spliced.is_none());
        assert_eq!(
            k.calls(),
            [
                Call::Join,
                Call::ResetSeq(UP),
                Call::SetLimit(UP, k.backlog.limit(spliced_bytes.len() as u64, false)),
                Call::Arm(UP, t.src.as_raw_fd()),
            ]
        );
        assert_eq!(
            (k.detaches.get(), k.rearms.get(), k.relays.get()),
            (1, 1, 0)
        );
    }

    /// `Start::Splice`: both directions begin spliced with nothing in the maps; the first quiet
    /// period joins the maps, then arms the source, with the spliced bytes in the peer's base.
    #[tokio::test]
    async fn a_direction_that_starts_spliced_joins_the_maps_at_its_first_quiet_period() {
        let t = tunnel();
        let k = FakeKernel::new([]);
        let mut m = movers(k.backlog, &t);
        (m.up_armed, m.down_armed) = (false, false);
        m.start_spliced(&k, Dir::Up).unwrap();
        m.start_spliced(&k, Dir::Down).unwrap();
        assert!(m.up_spliced.is_some() && m.down_spliced.is_some());
        assert!(!m.on_kernel_path(Dir::Up) && !m.on_kernel_path(Dir::Down));
        assert_eq!(k.calls(), [], "nothing enters the maps at the start");

        let data = pattern(700 * KIB, 0x3c);
        let reader = read_up_to(&t.server_app, data.len());
        (&t.client_app).write_all(&data).unwrap();
        let progress = Progress::new();
        let stop = run_spliced(&mut m, &k, &progress).await;
        assert!(matches!(stop, Stop::Quiet), "the reader kept up");
        assert!(reader.join().unwrap() == data, "every byte, in order");
        assert_eq!(progress.up.load(Ordering::Relaxed), data.len() as u64);

        assert!(!m.spliced_stopped(&k, Dir::Up, Ok(stop)).unwrap());
        assert!(m.on_kernel_path(Dir::Up), "up joined the kernel path");
        assert!(!m.on_kernel_path(Dir::Down), "down is still spliced");
        assert_eq!(
            k.calls(),
            [
                Call::Join,
                Call::ResetSeq(UP),
                Call::SetLimit(UP, k.backlog.limit(data.len() as u64, false)),
                Call::Arm(UP, t.src.as_raw_fd()),
            ]
        );
        assert_eq!((k.detaches.get(), k.rearms.get()), (0, 1));
    }

    /// Joining the maps fails (a full map): the direction is not armed, and splice carries it
    /// to its FIN, every byte included.
    #[tokio::test]
    async fn a_direction_that_cannot_join_the_maps_is_spliced_to_its_end() {
        let t = tunnel();
        let k = FakeKernel::new([]);
        let mut m = movers(k.backlog, &t);
        m.up_armed = false;
        m.start_spliced(&k, Dir::Up).unwrap();
        k.join_fails.set(true);
        let (first, last) = (pattern(64 * KIB, 5), pattern(200 * KIB, 6));
        let reader = read_up_to(&t.server_app, usize::MAX);
        (&t.client_app).write_all(&first).unwrap();
        let stop = run_spliced(&mut m, &k, &Progress::new()).await;
        assert!(!m.spliced_stopped(&k, Dir::Up, Ok(stop)).unwrap());
        assert_eq!(k.calls(), [Call::Join], "never armed");
        assert!(m.up_spliced.is_some(), "still spliced");
        (&t.client_app).write_all(&last).unwrap();
        t.client_app.shutdown(Shutdown::Write).unwrap();
        let stop = run_spliced(&mut m, &k, &Progress::new()).await;
        assert!(matches!(stop, Stop::Eof), "spliced to the end");
        assert!(m.spliced_stopped(&k, Dir::Up, Ok(stop)).unwrap(), "done");
        assert!(reader.join().unwrap() == [first, last].concat(), "then EOF");
        assert_eq!(k.rearms.get(), 0);
    }

    /// Where the overrun sits at the wake-up decides the hold: redirected but not yet at the
    /// peer (the redirect worker is behind), the longest at once; in the peer's send queue (the
    /// reader is behind), none for a first episode.
    #[tokio::test]
    async fn a_detach_holds_longest_when_the_redirect_worker_is_behind() {
        let (_, m) = detached(&tunnel(), 300 * KIB).await;
        assert_eq!(
            m.up_backoff.hold(),
            HOLD_MAX,
            "nothing reached the peer yet"
        );

        let t = tunnel();
        sys::set_rcvbuf(t.server_app.as_raw_fd(), 4 * KIB as u64).unwrap();
        sys::set_sndbuf(t.dst.as_raw_fd(), 4 << 20).unwrap();
        write_all_nonblocking(&t.dst, &pattern(300 * KIB, 1));
        let (_, m) = detached(&t, 300 * KIB).await;
        assert_eq!(
            m.up_backoff.hold(),
            Duration::ZERO,
            "all of it waits in the peer's send queue"
        );
    }

    #[tokio::test]
    async fn a_direction_under_the_soft_threshold_stays_in_the_kernel() {
        let t = tunnel();
        let k = FakeKernel::new([]);
        let mut m = movers(k.backlog, &t);
        press_and_ask(&mut m, &k, (k.backlog.soft() / 2) as usize).await;
        assert!(m.up_spliced.is_none());
        assert_eq!(k.calls(), [], "no walk asked for");
    }

    #[tokio::test]
    async fn behind_means_catch_up_first_then_ask_again() {
        let t = tunnel();
        let k = FakeKernel::new([Answer::Behind, Answer::Detached]);
        let mut m = movers(k.backlog, &t);
        press_and_ask(&mut m, &k, 512 * KIB).await;
        assert!(m.up_spliced.is_none(), "not detached yet");
        assert!(m.up_moving, "held bytes are moved on the next ticks");
        assert_eq!((k.detaches.get(), k.relays.get()), (0, 0));
        // Caught up (nothing held) and still pressed: the next wake-up asks again.
        m.advance(&k, Dir::Up).await.unwrap();
        assert!(m.up_spliced.is_some());
        assert_eq!(k.calls(), [Call::Detach(UP), Call::Detach(UP)]);
        assert_eq!(k.detaches.get(), 1);
    }

    #[tokio::test]
    async fn a_failed_walk_relays_the_episode_instead() {
        for answer in [Answer::Failed("walk failed".into()), Answer::NotArmed] {
            let t = tunnel();
            let k = FakeKernel::new([answer.clone()]);
            let mut m = movers(k.backlog, &t);
            press_and_ask(&mut m, &k, 512 * KIB).await;
            assert!(m.up_spliced.is_none(), "{answer:?}");
            assert!(m.busy(false, false), "{answer:?}: the relay is ticked");
            assert_eq!(
                k.calls(),
                [
                    Call::Detach(UP),
                    Call::SetLimit(UP, k.backlog.limit(0, true))
                ],
                "{answer:?}: the program holds everything for userspace to relay"
            );
            assert_eq!((k.detaches.get(), k.relays.get()), (0, 1), "{answer:?}");
        }
    }

    /// A direction detached with `kernel` bytes on their way to the peer, then `last` bytes and
    /// the client's FIN on its source; the server application reads to EOF.
    async fn detached_then_fin(
        kernel: &[u8],
        last: &[u8],
    ) -> (Tunnel, FakeKernel, Movers, JoinHandle<Vec<u8>>) {
        let t = tunnel();
        let (k, m) = detached(&t, kernel.len()).await;
        let reader = read_up_to(&t.server_app, usize::MAX);
        write_all_nonblocking(&t.dst, kernel);
        (&t.client_app).write_all(last).unwrap();
        t.client_app.shutdown(Shutdown::Write).unwrap();
        (t, k, m, reader)
    }

    #[tokio::test]
    async fn a_fin_while_spliced_is_passed_on_after_every_byte() {
        let (kernel_bytes, spliced_bytes) = (pattern(256 * KIB, 1), pattern(100 * KIB, 2));
        let (_t, k, mut m, reader) = detached_then_fin(&kernel_bytes, &spliced_bytes).await;
        let stop = run_spliced(&mut m, &k, &Progress::new()).await;
        assert!(matches!(stop, Stop::Eof));
        assert!(m.spliced_stopped(&k, Dir::Up, Ok(stop)).unwrap(), "done");
        let got = reader.join().unwrap();
        assert_eq!(got, [kernel_bytes, spliced_bytes].concat(), "then EOF");
        assert_eq!(k.rearms.get(), 0);
    }

    #[tokio::test]
    async fn a_return_the_kernel_refuses_ends_the_tunnel_unless_the_source_is_closing() {
        // The source is still established: a refused return is a failure of the data path.
        let t = tunnel();
        let (k, mut m) = detached(&t, 256 * KIB).await;
        k.arm_fails.set(true);
        match m.spliced_stopped(&k, Dir::Up, Ok(Stop::Quiet)) {
            Err(End::Failed {
                stage: Stage::Rearm,
                ..
            }) => {}
            other => panic!("want a failed return, got {other:?}"),
        }

        // The source's remote sent FIN (CLOSE_WAIT): it cannot rejoin the sockmap, so the
        // direction is spliced to its end instead, FIN included.
        let (kernel_bytes, last) = (pattern(256 * KIB, 3), pattern(10 * KIB, 4));
        let (t, k, mut m, reader) = detached_then_fin(&kernel_bytes, &last).await;
        while established(t.src.as_raw_fd()) {
            std::thread::sleep(Duration::from_millis(1));
        }
        k.arm_fails.set(true);
        assert!(!m.spliced_stopped(&k, Dir::Up, Ok(Stop::Quiet)).unwrap());
        assert!(m.up_spliced.is_some(), "still spliced");
        let stop = run_spliced(&mut m, &k, &Progress::new()).await;
        assert!(matches!(stop, Stop::Eof), "spliced to the end");
        assert_eq!(reader.join().unwrap(), [kernel_bytes, last].concat());
    }

    #[tokio::test]
    async fn a_socket_error_while_spliced_blames_the_side_it_came_from() {
        let t = tunnel();
        let k = FakeKernel::new([]);
        let mut m = movers(k.backlog, &t);
        let err = || io::Error::from(io::ErrorKind::ConnectionReset);
        for (e, side) in [
            (MoveError::Src(err()), Side::Client),
            (MoveError::Dst(err()), Side::Upstream),
        ] {
            match m.spliced_stopped(&k, Dir::Up, Err(e)) {
                Err(End::Reset { side: s, .. }) => assert_eq!(s, side),
                other => panic!("want a reset of {side}, got {other:?}"),
            }
        }
    }
}
