//! Each direction of a tunnel on its own: the held bytes userspace moves when the reader falls
//! behind, and a reader-bound direction leaving the kernel path for splice(2) (the detach
//! iterator answers) and coming back once its reader keeps up.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;

use super::backoff::Backoff;
use super::{Dir, Registration};
use crate::tunnel::detach::Answer;
use crate::tunnel::end::{End, Stage};
use crate::tunnel::holds::{Backlog, Counters, MoveError, Mover, SPLICE_QUIET, Step};
use crate::tunnel::pump::Progress;
use crate::tunnel::splice::PIPE_SIZE;
use crate::tunnel::spliced::{Spliced, Stop};
use crate::tunnel::sys::{established, set_sndbuf};

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
    pub(super) client: RawFd,
    pub(super) upstream: RawFd,
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
    fn step(&mut self, reg: &Registration<'_>, dir: Dir) -> Result<(), End> {
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
    pub(super) fn busy(&self, up_done: bool, down_done: bool) -> bool {
        (self.needs_tick(Dir::Up) && !up_done) || (self.needs_tick(Dir::Down) && !down_done)
    }

    /// Steps every open direction that has held bytes left.
    pub(super) fn tick(
        &mut self,
        reg: &Registration<'_>,
        up_done: bool,
        down_done: bool,
    ) -> Result<(), End> {
        if self.needs_tick(Dir::Up) && !up_done {
            self.step(reg, Dir::Up)?;
        }
        if self.needs_tick(Dir::Down) && !down_done {
            self.step(reg, Dir::Down)?;
        }
        Ok(())
    }
}

impl Registration<'_> {
    /// The movers of held bytes for both directions of this tunnel.
    pub(super) fn movers(&self, client: RawFd, upstream: RawFd) -> Movers {
        let backlog = self.sockmap.backlog;
        Movers {
            up: Mover::new(self.client, self.base_upstream, backlog),
            down: Mover::new(self.upstream, self.base_client, backlog),
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

    /// Moves held bytes of one direction; `Ok(true)` while some remain.
    pub(super) fn step(
        &self,
        mover: &mut Mover,
        src: RawFd,
        dst: RawFd,
        dir: Dir,
    ) -> Result<bool, End> {
        let (before, relays) = (mover.moved(), mover.relays());
        let result = mover.step(self, src, dst);
        let moved = (mover.moved() - before) as usize;
        if moved > 0 {
            self.userspace.add(dir.into(), moved);
        }
        self.relays
            .fetch_add(mover.relays() - relays, Ordering::Relaxed);
        match result {
            Ok(Step::Idle) => Ok(false),
            Ok(Step::Wait) => Ok(true),
            Err(e) => Err(End::moving(dir.into(), e)),
        }
    }

    /// After a wake-up for `dir`: moves held bytes, and takes the direction off the kernel
    /// path when its mover asks (`--sockmap-overrun splice`).
    pub(super) async fn advance(&self, movers: &mut Movers, dir: Dir) -> Result<(), End> {
        if movers.spliced(dir).is_some() {
            // A wake-up from before the detach.
            return Ok(());
        }
        movers.step(self, dir)?;
        let (src, dst) = movers.fds(dir);
        let cookie = self.cookie(dir);
        let failed = End::failed(Stage::Detach);
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
                .relay_instead(self, std::time::Instant::now());
            self.relays.fetch_add(1, Ordering::Relaxed);
            movers.set_moving(dir, true);
            r.map_err(|e| End::moving(dir.into(), e))
        };
        match answer {
            Answer::Detached => {
                movers.mover(dir).detached();
                self.detaches.fetch_add(1, Ordering::Relaxed);
                let target = movers
                    .mover(dir)
                    .dst_target(self.sockmap.redirected(cookie));
                let backlog = self.sockmap.backlog;
                set_sndbuf(dst, backlog.spliced_sndbuf(PIPE_SIZE as u64)).map_err(failed)?;
                match Spliced::new(src, dst, target) {
                    Ok(sp) => {
                        movers.backoff(dir).leaving(std::time::Instant::now());
                        movers.set_spliced(dir, sp);
                    }
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
            Ok(()) => {
                movers.backoff(dir).returned(std::time::Instant::now());
                Ok(())
            }
            Err(_) if !established(src) => {
                let mut sp = sp;
                sp.splice_to_the_end();
                set_sndbuf(dst, self.sockmap.backlog.spliced_sndbuf(PIPE_SIZE as u64))?;
                movers.set_spliced(dir, sp);
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
        self.reset_seq(cookie)?;
        self.set_limit(cookie, limit)?;
        set_sndbuf(dst, self.sockmap.backlog.sndbuf())?;
        self.arm_socket(cookie, src)?;
        self.rearms.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// What a spliced direction's run ended with, applied: back to the kernel, or done.
    /// `Ok(true)`: the direction is finished (FIN forwarded).
    pub(super) fn spliced_stopped(
        &self,
        movers: &mut Movers,
        dir: Dir,
        r: Result<Stop, MoveError>,
    ) -> Result<bool, End> {
        match r {
            Ok(Stop::Quiet) => {
                self.rearm(movers, dir).map_err(End::failed(Stage::Rearm))?;
                Ok(false)
            }
            Ok(Stop::Eof) => {
                movers.take_spliced(dir);
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
