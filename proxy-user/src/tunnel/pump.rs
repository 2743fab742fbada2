//! What every data path's pumps share: a tunnel's two directions, the byte counts and the time
//! of the last byte, where a direction failed, and the half-close that ends one.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Byte counts and the time of the last byte, shared by both directions.
pub(crate) struct Progress {
    start: Instant,
    last_ms: AtomicU64,
    pub(super) up: AtomicU64,
    pub(super) down: AtomicU64,
}

impl Progress {
    pub(super) fn new() -> Progress {
        Progress {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    pub(super) fn add(&self, dir: Dir, n: usize) {
        let counter = match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    pub(super) async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = self.start.elapsed().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// A direction of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// client → upstream
    Up,
    /// upstream → client
    Down,
}

/// Where a direction failed: reading its source or writing its destination.
#[derive(Debug)]
pub(crate) enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// Shuts the write side of `dst` after its source sent EOF.
pub(crate) fn shutdown_write(dst: &TcpStream) -> Result<(), PumpError> {
    socket2::SockRef::from(dst)
        .shutdown(Shutdown::Write)
        .map_err(PumpError::Write)
}
