//! The one watch loop of an armed tunnel: FIN and errors (from tokio's reactor, or from the
//! epoll set of `closes.rs` once both sockets are armed), hold wake-ups, spliced directions, the
//! pumps of sockets that could not be armed, the idle clock and shutdown.

use std::future::Future;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::closes::CloseWatch;
#[cfg(test)]
use super::closes::SharedCloses;
use super::directions::{HOLD_TICK, held, spliced_run, step};
use super::{Dir, Registration};
use crate::tunnel::end::{End, Side, Stage};
use crate::tunnel::holds::Mover;
use crate::tunnel::pump::{self, PumpError};
use crate::tunnel::sys::{self, queued_total};

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
    ) -> End {
        // A socket that could not be armed is read by userspace.
        let up_pump: Option<PumpFuture<'_>> = (!self.client_armed).then(|| {
            Box::pin(crate::tunnel::copy::pump(
                client,
                upstream,
                pump::Dir::Up,
                &self.userspace,
            )) as PumpFuture<'_>
        });
        let down_pump: Option<PumpFuture<'_>> = (!self.upstream_armed).then(|| {
            Box::pin(crate::tunnel::copy::pump(
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
    ) -> End {
        let [mut up_pump, mut down_pump] = pumps;
        let (mut up_done, mut down_done) = (false, false);
        // The counters are only read when there is an idle timeout to keep.
        let mut clock = IdleClock::new(idle, idle.map_or((0, 0), |_| self.bytes()));
        let (client_fd, upstream_fd) = (client.as_fd().as_raw_fd(), upstream.as_fd().as_raw_fd());
        let mut movers = self.movers(client_fd, upstream_fd);
        if self.splice_first {
            for dir in [Dir::Up, Dir::Down] {
                if let Err(end) = movers.start_spliced(self, dir) {
                    return end;
                }
            }
        }
        while !(up_done && down_done) {
            // A FIN matters on a socket the program forwards and userspace does not read: a
            // pumped or spliced direction sees its FIN in its own reads.
            let want = |done: bool, kernel: bool| match (done, kernel) {
                (true, _) => Want::Errors,
                (false, true) => Want::Fin,
                (false, false) => Want::Nothing,
            };
            let wants = [
                want(up_done, movers.on_kernel_path(Dir::Up)),
                want(down_done, movers.on_kernel_path(Dir::Down)),
            ];
            tokio::select! {
                events = closes.next(wants) => {
                    let events = match events {
                        Ok(ev) => ev,
                        Err(e) => return End::failed(Stage::Watch)(e),
                    };
                    for (side, close) in events {
                        match close {
                            Close::Reset(error) => return End::Reset { side, error },
                            Close::Fin if side == Side::Client && wants[0] == Want::Fin => {
                                if let Err(end) = Box::pin(self.drain(client, self.client, upstream, Dir::Up, &mut movers.up)).await {
                                    return end;
                                }
                                up_done = true;
                            }
                            Close::Fin if side == Side::Upstream && wants[1] == Want::Fin => {
                                if let Err(end) = Box::pin(self.drain(upstream, self.upstream, client, Dir::Down, &mut movers.down)).await {
                                    return end;
                                }
                                down_done = true;
                            }
                            Close::Fin => {}
                        }
                    }
                }
                () = held(&self.up_holds), if !up_done && movers.up_armed => {
                    if let Err(end) = movers.advance(self, Dir::Up).await {
                        return end;
                    }
                }
                r = spliced_run(&mut movers.up_spliced, movers.up_backoff.hold(), self.sockmap.backlog, &self.spliced, Dir::Up), if !up_done => {
                    match movers.spliced_stopped(self, Dir::Up, r) {
                        Ok(done) => up_done = done,
                        Err(end) => return end,
                    }
                }
                () = held(&self.down_holds), if !down_done && movers.down_armed => {
                    if let Err(end) = movers.advance(self, Dir::Down).await {
                        return end;
                    }
                }
                r = spliced_run(&mut movers.down_spliced, movers.down_backoff.hold(), self.sockmap.backlog, &self.spliced, Dir::Down), if !down_done => {
                    match movers.spliced_stopped(self, Dir::Down, r) {
                        Ok(done) => down_done = done,
                        Err(end) => return end,
                    }
                }
                () = sleep_boxed(HOLD_TICK), if movers.busy(up_done, down_done) => {
                    if let Err(end) = movers.tick(self, up_done, down_done) {
                        return end;
                    }
                }
                r = run_pump(&mut up_pump), if !up_done && !self.client_armed => match r {
                    Ok(()) => up_done = true,
                    Err(e) => return End::pump(pump::Dir::Up, e),
                },
                r = run_pump(&mut down_pump), if !down_done && !self.upstream_armed => match r {
                    Ok(()) => down_done = true,
                    Err(e) => return End::pump(pump::Dir::Down, e),
                },
                () = sleep_until_boxed(clock.next_check), if idle.is_some() => {
                    if clock.expired(self.bytes()) {
                        return End::Idle;
                    }
                }
                () = cancel.cancelled() => return End::Shutdown,
            }
        }
        End::Closed
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
    ) -> Result<(), End> {
        let dst_reset = |error| End::Reset {
            side: Side::destination(dir.into()),
            error,
        };
        let dst_fd = dst.as_fd().as_raw_fd();
        let dst = socket2::SockRef::from(dst);
        // TCP_INFO takes the socket lock, so the softirq that delivered the
        // FIN (and ran the program on the data before it) has finished.
        let _ = queued_total(src.as_fd().as_raw_fd());
        // Held bytes go before the FIN too: move all of them first.
        let mut wait = Duration::from_micros(200);
        while step(self, mover, src.as_fd().as_raw_fd(), dst_fd, dir)? {
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

    /// Watches a fully armed tunnel with the sockets taken out of tokio's
    /// reactor: with the program attached, the kernel still wakes a socket's
    /// epoll waiters after every batch it redirects, so a socket registered
    /// for readability costs the proxy a wake-up per batch (0.49 s of proxy
    /// CPU for 2 GiB, measured). The shared set of `closes.rs` asks only for
    /// EPOLLRDHUP (and the implied EPOLLERR/EPOLLHUP), so it is woken for FIN
    /// and errors alone. Returns the sockets, for the caller to close.
    pub async fn run_detached(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        idle: Option<Duration>,
        cancel: &CancellationToken,
    ) -> (End, Option<(StdTcpStream, StdTcpStream)>) {
        let (client, upstream) = match (client.into_std(), upstream.into_std()) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => return (End::failed(Stage::LeaveReactor)(e), None),
        };
        let end = match self.sockmap.closes.watch(&client, &upstream) {
            Ok(watch) => {
                let closes = Closes::Shared(watch);
                self.watch(&client, &upstream, &closes, [None, None], idle, cancel)
                    .await
            }
            Err(e) => End::failed(Stage::Watch)(e),
        };
        (end, Some((client, upstream)))
    }
}

/// A timer allocated only once polled: the select! in the watch loop builds every branch's
/// future on every turn, enabled or not, and its future lives as long as the tunnel, so an
/// inline `Sleep` would cost every idle tunnel its size twice over.
async fn sleep_boxed(d: Duration) {
    Box::pin(tokio::time::sleep(d)).await;
}

/// [`sleep_boxed`] to a deadline.
async fn sleep_until_boxed(t: tokio::time::Instant) {
    Box::pin(tokio::time::sleep_until(t)).await;
}

type PumpFuture<'f> = Pin<Box<dyn Future<Output = Result<(), PumpError>> + Send + 'f>>;

async fn run_pump(pump: &mut Option<PumpFuture<'_>>) -> Result<(), PumpError> {
    match pump {
        Some(p) => p.await,
        None => std::future::pending().await,
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
    /// A fully armed tunnel: the shared epoll set that only FIN and errors wake (see
    /// `closes.rs`).
    Shared(CloseWatch),
}

impl Closes<'_> {
    /// The next FIN (of a side that wants it) or error, with every other event seen at the same
    /// time; never resolves while no side wants anything.
    async fn next(&self, wants: [Want; 2]) -> io::Result<Vec<(Side, Close)>> {
        match self {
            // Boxed: the watch loop's future lives as long as the tunnel, and only tunnels with
            // a socket userspace pumps come here.
            Closes::Reactor { client, upstream } => {
                Box::pin(async {
                    tokio::select! {
                        c = watch_reactor(client, wants[0]) => Ok(vec![(Side::Client, c)]),
                        c = watch_reactor(upstream, wants[1]) => Ok(vec![(Side::Upstream, c)]),
                    }
                })
                .await
            }
            Closes::Shared(watch) => loop {
                let mut closes = Vec::new();
                for (side, mask) in watch.next().await {
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{Shutdown, TcpListener};

    use super::*;

    /// Two connected pairs: (the tunnel's client socket, its remote), (upstream, its remote).
    fn pairs() -> [(StdTcpStream, StdTcpStream); 2] {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let pair = || {
            let remote = StdTcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (local, _) = l.accept().unwrap();
            (local, remote)
        };
        [pair(), pair()]
    }

    const QUIET: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn the_shared_watch_wakes_for_fin_and_reset_and_never_for_data() {
        let shared = SharedCloses::new().unwrap();
        tokio::spawn(shared.clone().dispatch());
        let [(client, mut client_remote), (upstream, upstream_remote)] = pairs();
        let closes = Closes::Shared(shared.watch(&client, &upstream).unwrap());
        // Another tunnel in the same set: its events are its own.
        let [(other, other_remote), (other_up, _other_up_remote)] = pairs();
        let others = Closes::Shared(shared.watch(&other, &other_up).unwrap());
        let both = [Want::Fin, Want::Fin];

        other_remote.shutdown(Shutdown::Write).unwrap();
        let events = tokio::time::timeout(QUIET, others.next(both))
            .await
            .expect("the other tunnel's FIN wakes it")
            .unwrap();
        assert!(
            matches!(events[..], [(Side::Client, Close::Fin)]),
            "{events:?}"
        );

        client_remote.write_all(&[7u8; 4096]).unwrap();
        let woke = tokio::time::timeout(QUIET, closes.next(both)).await;
        assert!(woke.is_err(), "data woke the watch: {woke:?}");

        client_remote.shutdown(Shutdown::Write).unwrap();
        let events = tokio::time::timeout(QUIET, closes.next(both))
            .await
            .expect("a FIN wakes the watch")
            .unwrap();
        assert!(
            matches!(events[..], [(Side::Client, Close::Fin)]),
            "{events:?}"
        );

        socket2::SockRef::from(&upstream_remote)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(upstream_remote);
        let events = tokio::time::timeout(QUIET, closes.next([Want::Errors, Want::Fin]))
            .await
            .expect("a reset wakes the watch")
            .unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, (Side::Upstream, Close::Reset(err)) if err.kind() == io::ErrorKind::ConnectionReset)),
            "{events:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_clock_expires_only_after_the_counters_stood_still_for_the_timeout() {
        let second = Duration::from_secs(1);
        let mut clock = IdleClock::new(Some(second), (0, 0));
        assert_eq!(clock.tick(), second / 4, "looks four times per timeout");

        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(!clock.expired((0, 0)), "0.9 s quiet");
        // Bytes moved: the quiet starts again from now.
        assert!(!clock.expired((10, 0)));
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(!clock.expired((10, 0)), "0.9 s quiet since the last byte");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(clock.expired((10, 0)), "1.1 s quiet");
        assert!(
            clock.next_check > tokio::time::Instant::now(),
            "the next look is scheduled"
        );

        let mut never = IdleClock::new(None, (0, 0));
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert!(!never.expired((0, 0)), "no --idle-timeout: never idle");
    }
}
