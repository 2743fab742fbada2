//! How long a direction stays spliced at least, per direction and learnt from its round trips.
//!
//! A direction leaves the kernel path when the bytes queued towards its peer pass the soft
//! threshold, and returns once its reader has kept up for `SPLICE_QUIET` (50 ms). When it overruns
//! again soon after returning, the round trip bought little: each costs two walks of the iterator
//! and a drain of the redirect worker's queue. A sender on the same host that outruns the
//! kernel's redirect worker while the reader keeps up (docs/kernel-notes.md, "The redirect worker
//! is slower than one sender": one loopback stream, where the kernel path alone is slower than
//! splice) does it all the time: back and forth every 50 to 300 ms, at about 60 % of splice's
//! throughput. So a kernel stretch shorter than [`KERNEL_WORTH`] quadruples how long the next
//! episode stays spliced at least (its hold), up to [`HOLD_MAX`], and one that lasts halves it.
//! Quadrupling reaches the cap within three round trips: on a 2 GiB loopback stream, doubling
//! spent most of the transfer getting there.
//!
//! The hold delays a return; it does not change what a return waits for. A longer quiet period
//! instead would trap a reader whose slow moments come more often than that period: it would
//! never see one, and would stay spliced for good.
//!
//! Where the overrun sits says which of the two it is. A reader that falls behind leaves the
//! bytes queued in the peer socket (its send queue); a redirect worker that falls behind a sender
//! leaves them before it, redirected but not yet sent. The second is the kernel path being slower
//! than this sender, which the round trips above would only find out three times over, at 60 %
//! of splice's throughput meanwhile: such an episode is held for [`HOLD_MAX`] at once.

use std::time::{Duration, Instant};

#[cfg(test)]
use crate::tunnel::holds::SPLICE_QUIET;

/// The longest hold: a direction that keeps overrunning the kernel path tries it again at least
/// this often.
pub const HOLD_MAX: Duration = Duration::from_millis(1600);

/// The shortest hold once one is needed.
pub const HOLD_MIN: Duration = Duration::from_millis(100);

/// A kernel stretch at least this long pays for the round trip that began it.
pub const KERNEL_WORTH: Duration = Duration::from_millis(100);

/// Who was behind when a direction overran its soft threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overran {
    /// The reader: most of the overrun waits in the peer socket's send queue.
    Reader,
    /// The kernel's redirect worker: most of it was redirected but not yet sent to the peer.
    Worker,
}

impl Overran {
    /// From the bytes the program redirected that the worker has not sent to the peer yet,
    /// and the peer's send queue (`SIOCOUTQ`: sent but unacknowledged, or not sent yet).
    pub fn from_queues(in_worker: u64, peer_outq: u64) -> Overran {
        if in_worker > peer_outq {
            Overran::Worker
        } else {
            Overran::Reader
        }
    }
}

/// One direction's hold, learnt from its round trips.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    hold: Duration,
    /// When the direction last returned to the kernel path.
    returned: Option<Instant>,
}

impl Backoff {
    /// How long the episode now running stays spliced at least.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// The direction returned to the kernel path at `now`.
    pub fn returned(&mut self, now: Instant) {
        self.returned = Some(now);
    }

    /// The direction leaves the kernel path at `now`, `overran` by its reader or by the
    /// redirect worker: sets the new episode's hold.
    pub fn leaving(&mut self, now: Instant, overran: Overran) {
        let returned = self.returned.take();
        if overran == Overran::Worker {
            self.hold = HOLD_MAX;
            return;
        }
        let Some(at) = returned else {
            return;
        };
        self.hold = if now.saturating_duration_since(at) < KERNEL_WORTH {
            (self.hold * 4).clamp(HOLD_MIN, HOLD_MAX)
        } else if self.hold / 2 < HOLD_MIN {
            Duration::ZERO
        } else {
            self.hold / 2
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_episode_is_not_held() {
        let mut b = Backoff::default();
        b.leaving(Instant::now(), Overran::Reader);
        assert_eq!(b.hold(), Duration::ZERO);
    }

    #[test]
    fn a_direction_that_keeps_overrunning_backs_off_to_the_cap() {
        let mut b = Backoff::default();
        let mut t = Instant::now();
        b.leaving(t, Overran::Reader);
        let mut seen = vec![b.hold()];
        for _ in 0..7 {
            t += b.hold().max(SPLICE_QUIET);
            b.returned(t);
            t += ms(30);
            b.leaving(t, Overran::Reader);
            seen.push(b.hold());
        }
        assert_eq!(
            seen,
            [0, 100, 400, 1600, 1600, 1600, 1600, 1600].map(ms),
            "kernel stretches of 30 ms"
        );
    }

    #[test]
    fn a_kernel_stretch_that_lasts_halves_it_down_to_none() {
        let mut b = Backoff::default();
        let mut t = Instant::now();
        b.leaving(t, Overran::Reader);
        for _ in 0..3 {
            t += b.hold().max(SPLICE_QUIET);
            b.returned(t);
            t += KERNEL_WORTH - ms(1);
            b.leaving(t, Overran::Reader);
        }
        assert_eq!(b.hold(), HOLD_MAX);
        // The kernel path carried the direction for long enough to be worth the round trip.
        let mut seen = Vec::new();
        for _ in 0..5 {
            t += b.hold();
            b.returned(t);
            t += KERNEL_WORTH;
            b.leaving(t, Overran::Reader);
            seen.push(b.hold());
        }
        assert_eq!(seen, [800, 400, 200, 100, 0].map(ms));
    }

    #[test]
    fn an_overrun_of_the_redirect_worker_is_held_longest_at_once() {
        assert_eq!(Overran::from_queues(6 << 20, 100 << 10), Overran::Worker);
        assert_eq!(Overran::from_queues(100 << 10, 6 << 20), Overran::Reader);
        assert_eq!(Overran::from_queues(0, 0), Overran::Reader);
        let mut b = Backoff::default();
        let mut t = Instant::now();
        b.leaving(t, Overran::Worker);
        assert_eq!(b.hold(), HOLD_MAX, "the first episode");
        // A kernel stretch that lasts still halves the hold of a reader's next overrun.
        t += HOLD_MAX;
        b.returned(t);
        t += KERNEL_WORTH;
        b.leaving(t, Overran::Reader);
        assert_eq!(b.hold(), HOLD_MAX / 2);
        // And a worker's overrun is held longest however long the kernel stretch was.
        t += HOLD_MAX;
        b.returned(t);
        t += KERNEL_WORTH * 10;
        b.leaving(t, Overran::Worker);
        assert_eq!(b.hold(), HOLD_MAX);
    }
}
