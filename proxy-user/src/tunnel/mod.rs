//! The data paths behind one interface.
//!
//! Once the handshake is done, [`forward`] moves bytes between the client
//! and the upstream socket with the chosen [`Mode`] until both directions
//! have ended (half-close honoured: EOF one way becomes `shutdown(SHUT_WR)`
//! on the other), either side resets (the other is reset too), the tunnel
//! sits idle too long, or the proxy shuts down.

mod copy;
#[allow(unsafe_code)]
mod detach;
mod end;
#[allow(unsafe_code)]
pub mod holds;
mod pump;
mod self_check;
pub mod sockmap;
#[allow(unsafe_code)]
mod splice;
#[allow(unsafe_code)]
mod spliced;
#[allow(unsafe_code)]
mod sys;

pub use end::{End, Side, Stage};
pub(crate) use pump::{Dir, Progress, PumpError};

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The data path asked for on the command line (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// sockmap if it loads and is sound here, else splice, else copy.
    Auto,
    /// eBPF sk_skb redirect: bytes never reach userspace.
    Sockmap,
    /// splice(2) through a pipe per direction.
    Splice,
    /// tokio copy through userspace buffers.
    Copy,
}

/// A data path that forwards an established tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sockmap,
    Splice,
    Copy,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Sockmap => "sockmap",
            Mode::Splice => "splice",
            Mode::Copy => "copy",
        })
    }
}

/// The data path chosen at start-up, with whatever state it needs.
pub enum DataPath {
    Copy,
    Splice,
    Sockmap(Box<sockmap::Sockmap>),
}

impl DataPath {
    pub fn mode(&self) -> Mode {
        match self {
            DataPath::Copy => Mode::Copy,
            DataPath::Splice => Mode::Splice,
            DataPath::Sockmap(_) => Mode::Sockmap,
        }
    }

    /// The part of the handoff that must happen before the `200` is written.
    pub async fn register<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
    ) -> io::Result<Handoff<'a>> {
        match self {
            DataPath::Sockmap(sm) => match sm.register(client, upstream).await {
                Ok(reg) => Ok(Handoff(Some(Box::new(reg)))),
                // A socket whose remote already sent FIN cannot join a
                // sockmap: this tunnel is forwarded by userspace instead.
                Err(_)
                    if !sys::established(client.as_raw_fd())
                        || !sys::established(upstream.as_raw_fd()) =>
                {
                    Ok(Handoff(None))
                }
                Err(e) => Err(e),
            },
            DataPath::Copy | DataPath::Splice => Ok(Handoff(None)),
        }
    }
}

/// What [`DataPath::register`] set up for one tunnel; undone on drop.
///
/// Boxed: the connection's future holds it, and async functions keep a moved value's slot, so
/// inline it took 176 bytes in several places of every tunnel's future.
pub struct Handoff<'a>(Option<Box<sockmap::Registration<'a>>>);

/// The data path chosen at start-up, and the warning to log once when
/// `auto` had to fall back.
pub struct Selection {
    pub datapath: DataPath,
    pub fallback_warning: Option<String>,
}

/// Loads the eBPF program and runs the start-up self-check on loopback.
pub async fn start_sockmap(backlog: holds::Backlog) -> Result<sockmap::Sockmap, String> {
    let sm = sockmap::Sockmap::start(backlog).map_err(|e| e.to_string())?;
    self_check::run(&sm)
        .await
        .map_err(|e| format!("the sockmap self-check failed on this kernel: {e}"))?;
    Ok(sm)
}

/// Chooses the data path for `--mode`; an error is the reason an explicitly
/// requested mode cannot work here.
pub async fn select(requested: ModeArg, backlog: holds::Backlog) -> Result<Selection, String> {
    let plain = |datapath| Selection {
        datapath,
        fallback_warning: None,
    };
    match requested {
        ModeArg::Copy => Ok(plain(DataPath::Copy)),
        ModeArg::Splice => splice::probe()
            .map(|()| plain(DataPath::Splice))
            .map_err(|e| format!("splice(2) does not work here: {e}")),
        ModeArg::Sockmap => Ok(sockmap_selection(start_sockmap(backlog).await?)),
        ModeArg::Auto => {
            let why = match start_sockmap(backlog).await {
                Ok(sm) => return Ok(sockmap_selection(sm)),
                Err(e) => e,
            };
            Ok(match splice::probe() {
                Ok(()) => Selection {
                    datapath: DataPath::Splice,
                    fallback_warning: Some(format!("using splice: sockmap unavailable: {why}")),
                },
                Err(e) => Selection {
                    datapath: DataPath::Copy,
                    fallback_warning: Some(format!(
                        "using copy: sockmap unavailable: {why}; splice(2) failed its check: {e}"
                    )),
                },
            })
        }
    }
}

/// The sockmap data path, with the warning to log when its reader-bound directions cannot
/// leave the kernel path for splice here and are relayed instead.
fn sockmap_selection(sm: sockmap::Sockmap) -> Selection {
    let fallback_warning = sm.splice_unavailable().map(|why| {
        format!(
            "sockmap: a direction whose reader is slower than its sender is relayed by \
             userspace (--sockmap-overrun relay), not spliced: the detach iterator is \
             unavailable: {why}"
        )
    });
    Selection {
        datapath: DataPath::Sockmap(Box::new(sm)),
        fallback_warning,
    }
}

/// `splice-proxy probe`: one line per data path: `<mode> ok`, or
/// `<mode> unavailable: …`.
pub async fn probe_report() -> Vec<String> {
    let mut lines = vec!["copy ok".to_string()];
    lines.push(match splice::probe() {
        Ok(()) => "splice ok".into(),
        Err(e) => format!("splice unavailable: {e}"),
    });
    lines.push(match start_sockmap(holds::Backlog::default()).await {
        Ok(sm) => match (sm.splice_unavailable(), sm.time_walk().await) {
            (None, Some(t)) => format!(
                "sockmap ok (reader-bound directions spliced; a detach walk took {:.3} ms \
                 over {} TCP sockets)",
                t.as_secs_f64() * 1e3,
                tcp_sockets().map_or("?".into(), |n| n.to_string())
            ),
            (why, _) => format!(
                "sockmap ok (reader-bound directions relayed: {})",
                why.unwrap_or("no detach iterator")
            ),
        },
        Err(e) => format!("sockmap unavailable: {e}"),
    });
    lines
}

/// TCP sockets in use in this network namespace (`/proc/net/sockstat`, "TCP: inuse N").
fn tcp_sockets() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "inuse")?;
    words.next()?.parse().ok()
}

/// What a finished tunnel reports.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes client → upstream (not counting the bytes sent with the head).
    pub bytes_up: u64,
    /// Bytes upstream → client.
    pub bytes_down: u64,
    pub end: End,
    /// Times a direction overran its sockmap backlog and userspace started relaying it.
    pub relays: u64,
    /// Sockmap: bytes (up + down) the program redirected in the kernel.
    pub kernel_bytes: u64,
    /// Sockmap: bytes (up + down) forwarded by splice(2) while a direction was off the kernel
    /// path.
    pub spliced_bytes: u64,
    /// Sockmap: bytes (up + down) userspace read and wrote itself (held bytes relayed).
    pub relayed_bytes: u64,
    /// Sockmap: times a direction left the kernel path for splice, and came back to it.
    pub detaches: u64,
    pub rearms: u64,
}

/// Forwards `client` ⇄ `upstream` with `mode` until the tunnel ends.
pub async fn forward(
    mode: Mode,
    handoff: Handoff<'_>,
    client: TcpStream,
    upstream: TcpStream,
    idle: Option<Duration>,
    cancel: CancellationToken,
) -> Outcome {
    let progress = Progress::new();
    // The copy path: copy mode, and sockmap tunnels the kernel cannot take.
    let copy_both = || {
        Box::pin(both(
            copy::pump,
            &client,
            &upstream,
            &progress,
            idle,
            &cancel,
        ))
    };
    let splice_both = || {
        Box::pin(both(
            splice::pump,
            &client,
            &upstream,
            &progress,
            idle,
            &cancel,
        ))
    };
    let end = match (mode, handoff.0) {
        // Sockmap with a socket half-closed before the handoff: see DataPath::register.
        (Mode::Copy, _) | (Mode::Sockmap, None) => copy_both().await,
        (Mode::Splice, _) => splice_both().await,
        (Mode::Sockmap, Some(mut reg)) if reg.splice_first() => {
            match Box::pin(first_byte(&client, &upstream, idle, &cancel)).await {
                First::Ended(end) => end,
                // Closing before its first byte: splice mode's pumps end it (a FIN costs them
                // no pipe), and the pipes, epoll sets and maps of a spliced start are never
                // paid for.
                First::Closing => splice_both().await,
                First::Data => {
                    // Both directions start spliced, out of tokio's reactor like a fully armed
                    // tunnel.
                    let (end, sockets) = match reg.start_spliced(&client, &upstream) {
                        Ok(()) => Box::pin(reg.run_detached(client, upstream, idle, &cancel)).await,
                        Err(e) => (End::failed(Stage::Arm)(e), to_std(client, upstream)),
                    };
                    if let Some((c, u)) = &sockets {
                        reset_if(&end, c, u);
                    }
                    let tally = (*reg).close(sockets);
                    progress.up.fetch_add(tally.up, Ordering::Relaxed);
                    progress.down.fetch_add(tally.down, Ordering::Relaxed);
                    return sockmap_outcome(&progress, end, tally);
                }
            }
        }
        (Mode::Sockmap, Some(mut reg)) => {
            let (end, detached) = match reg.arm(&client, &upstream).await {
                Ok(sockmap::Armed::Kernel) if reg.fully_armed() => {
                    // Out of tokio's reactor for the rest of the tunnel: the
                    // kernel wakes epoll for every batch the program moves.
                    let (end, sockets) =
                        Box::pin(reg.run_detached(client, upstream, idle, &cancel)).await;
                    (end, Some(sockets))
                }
                Ok(sockmap::Armed::Kernel) => {
                    let r = Box::pin(reg.run(&client, &upstream, idle, &cancel)).await;
                    (r, Some(to_std(client, upstream)))
                }
                Ok(sockmap::Armed::Userspace) => {
                    let r = copy_both().await;
                    (r, Some(to_std(client, upstream)))
                }
                Err(e) => (End::failed(Stage::Arm)(e), Some(to_std(client, upstream))),
            };
            if let Some(Some((c, u))) = &detached {
                reset_if(&end, c, u);
            }
            let tally = (*reg).close(detached.flatten());
            progress.up.fetch_add(tally.up, Ordering::Relaxed);
            progress.down.fetch_add(tally.down, Ordering::Relaxed);
            return sockmap_outcome(&progress, end, tally);
        }
    };
    reset_if(&end, &client, &upstream);
    Outcome {
        bytes_up: progress.up.load(Ordering::Relaxed),
        bytes_down: progress.down.load(Ordering::Relaxed),
        end,
        relays: 0,
        kernel_bytes: 0,
        spliced_bytes: 0,
        relayed_bytes: 0,
        detaches: 0,
        rearms: 0,
    }
}

/// How a sockmap tunnel starting spliced (`Start::Splice`) began.
enum First {
    /// Bytes to read on either socket.
    Data,
    /// A FIN or an error came before any byte.
    Closing,
    /// Unused for the idle timeout, or the proxy is shutting down.
    Ended(End),
}

/// Waits in tokio's reactor until either socket has something to read: bytes, a FIN or an
/// error.
async fn first_byte(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Option<Duration>,
    cancel: &CancellationToken,
) -> First {
    let mut idle = std::pin::pin!(async {
        match idle {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    });
    loop {
        let (woken, ready) = tokio::select! {
            r = client.ready(Interest::READABLE | Interest::ERROR) => (client, r),
            r = upstream.ready(Interest::READABLE | Interest::ERROR) => (upstream, r),
            () = cancel.cancelled() => return First::Ended(End::Shutdown),
            () = &mut idle => return First::Ended(End::Idle),
        };
        // Bytes first, even with a FIN behind them: the splice forwards both. (`SIOCINQ` is
        // cheaper than the `TCP_INFO` a state check would take, and most tunnels end here.)
        let queued = |s: &TcpStream| sys::inq(s.as_raw_fd()).map_or(true, |n| n > 0);
        if queued(client) || queued(upstream) {
            return First::Data;
        }
        match ready {
            Ok(r) if !r.is_read_closed() && !r.is_error() => {
                // Readiness left over from reading the request head: clear it and wait on.
                let _ = woken.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
            // A FIN or an error with nothing to forward before it.
            _ => return First::Closing,
        }
    }
}

/// A sockmap tunnel's outcome: its bytes (`progress` has the tally's added) and how they went.
fn sockmap_outcome(progress: &Progress, end: End, tally: sockmap::Tally) -> Outcome {
    Outcome {
        bytes_up: progress.up.load(Ordering::Relaxed),
        bytes_down: progress.down.load(Ordering::Relaxed),
        end,
        relays: tally.relays,
        kernel_bytes: tally.kernel,
        spliced_bytes: tally.spliced,
        relayed_bytes: tally.relayed,
        detaches: tally.detaches,
        rearms: tally.rearms,
    }
}

/// Tokio streams as std ones (out of the reactor), for the end of a tunnel.
fn to_std(
    client: TcpStream,
    upstream: TcpStream,
) -> Option<(std::net::TcpStream, std::net::TcpStream)> {
    Some((client.into_std().ok()?, upstream.into_std().ok()?))
}

/// On a reset, closing with SO_LINGER 0 sends RST: the reset reaches the other side.
fn reset_if(end: &End, a: &impl std::os::fd::AsFd, b: &impl std::os::fd::AsFd) {
    if end.resets() {
        for fd in [a.as_fd(), b.as_fd()] {
            let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
        }
    }
}

/// Both directions of a tunnel, each moved by `pump` (`splice::pump` or `copy::pump`). The
/// directions are pinned here rather than in `drive`: futures passed by value would be stored
/// twice in its state (as arguments and as pinned locals), 688 bytes more for every splice
/// tunnel.
async fn both<'a, F>(
    pump: impl Fn(&'a TcpStream, &'a TcpStream, Dir, &'a Progress) -> F,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    progress: &'a Progress,
    idle: Option<Duration>,
    cancel: &CancellationToken,
) -> End
where
    F: Future<Output = Result<(), PumpError>>,
{
    let up = std::pin::pin!(pump(client, upstream, Dir::Up, progress));
    let down = std::pin::pin!(pump(upstream, client, Dir::Down, progress));
    drive(up, down, progress, idle, cancel).await
}

/// Completes when `timer` does; never, without one.
async fn expires(timer: &mut Option<Pin<Box<impl Future<Output = ()>>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Runs both directions until both are done or something ends the tunnel.
async fn drive(
    mut up: Pin<&mut impl Future<Output = Result<(), PumpError>>>,
    mut down: Pin<&mut impl Future<Output = Result<(), PumpError>>>,
    progress: &Progress,
    idle: Option<Duration>,
    cancel: &CancellationToken,
) -> End {
    let (mut up_done, mut down_done) = (false, false);
    // Boxed, and only with --idle-timeout: off by default, it would otherwise take its place
    // in every tunnel's state.
    let mut idle_timer = idle.map(|d| Box::pin(progress.idle_for(d)));
    while !(up_done && down_done) {
        tokio::select! {
            r = up.as_mut(), if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return End::pump(Dir::Up, e),
            },
            r = down.as_mut(), if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return End::pump(Dir::Down, e),
            },
            () = expires(&mut idle_timer) => return End::Idle,
            () = cancel.cancelled() => return End::Shutdown,
        }
    }
    End::Closed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tunnel's data-path future lives as long as the tunnel, idle or not: 1,784 bytes for
    /// splice before the directions were pinned by the caller (passed by value, they were
    /// stored twice) and the idle timer boxed only when configured; 944 and 768 after.
    #[tokio::test]
    async fn a_tunnel_future_is_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let b = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (progress, cancel) = (Progress::new(), CancellationToken::new());
        let splice = std::mem::size_of_val(&both(splice::pump, &a, &b, &progress, None, &cancel));
        assert!(splice <= 1024, "splice: {splice} bytes");
        let copy = std::mem::size_of_val(&both(copy::pump, &a, &b, &progress, None, &cancel));
        assert!(copy <= 1024, "copy: {copy} bytes");
    }
}
