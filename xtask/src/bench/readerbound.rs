//! Scenario `readerbound`: a migration whose reader is slower than its sender. The client
//! pushes as fast as it can; the sink reads at a fixed rate (token bucket, 64 KiB reads,
//! sleeping to hold the rate) from a socket with a moderate receive buffer, so the target
//! really is held back by its downstream peer instead of by its own speed.
//!
//! The rate is the sink's total: with 8 streams each stream is read at an eighth of it.

use std::{
    io::{self, Read},
    time::{Duration, Instant},
};

/// One sub-scenario.
pub struct Spec {
    pub name: &'static str,
    /// Bytes per second the sink reads, all streams together.
    pub rate: u64,
    pub streams: usize,
}

const MB: u64 = 1_000_000;

pub const SPECS: &[Spec] = &[
    Spec {
        name: "readerbound-100M-1",
        rate: 100 * MB,
        streams: 1,
    },
    Spec {
        name: "readerbound-100M-8",
        rate: 100 * MB,
        streams: 8,
    },
    Spec {
        name: "readerbound-300M-1",
        rate: 300 * MB,
        streams: 1,
    },
    Spec {
        name: "readerbound-300M-8",
        rate: 300 * MB,
        streams: 8,
    },
    Spec {
        name: "readerbound-1G-1",
        rate: 1000 * MB,
        streams: 1,
    },
    Spec {
        name: "readerbound-1G-8",
        rate: 1000 * MB,
        streams: 8,
    },
];

pub fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// Size of each paced read.
pub const READ_SIZE: usize = 64 * 1024;
/// SO_RCVBUF of the sink's socket (the kernel doubles it for bookkeeping): small enough that
/// the bytes the reader has not taken yet push back on the target within milliseconds.
pub const RCVBUF: usize = 256 * 1024;
/// Most the bucket saves up: four reads, so a late wake-up is made good by reading back to
/// back, while a reader that had nothing to read for a while does not then read in a burst.
pub const BURST: u64 = 4 * READ_SIZE as u64;

/// Bytes per stream so that `streams` streams at `rate` bytes/s in total take `secs`.
pub fn bytes_per_stream(rate: u64, streams: usize, secs: f64) -> u64 {
    let per = (rate as f64 * secs / streams as f64) as u64;
    // Whole reads, at least one.
    (per / READ_SIZE as u64).max(1) * READ_SIZE as u64
}

/// A token bucket in bytes. Pure arithmetic: the caller says how much time passed.
#[derive(Debug)]
pub struct Bucket {
    /// Bytes per second.
    rate: f64,
    burst: f64,
    tokens: f64,
}

impl Bucket {
    /// Starts full. `burst` is raised to one read if smaller (else a read would never fit).
    pub fn new(rate: u64, burst: u64, read: usize) -> Bucket {
        let burst = burst.max(read as u64) as f64;
        Bucket {
            rate: rate.max(1) as f64,
            burst,
            tokens: burst,
        }
    }

    /// Credit for `elapsed` passing, up to the burst.
    pub fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + self.rate * elapsed.as_secs_f64()).min(self.burst);
    }

    /// How long until `want` bytes may be read (zero: now).
    pub fn wait(&self, want: usize) -> Duration {
        let short = want as f64 - self.tokens;
        if short <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(short / self.rate)
        }
    }

    /// `n` bytes were read.
    pub fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    #[cfg(test)]
    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

/// Reads exactly `len` bytes from `conn` at no more than `rate` bytes/s, in reads of at most
/// [`READ_SIZE`].
pub fn paced_read(conn: &mut impl Read, len: u64, rate: u64) -> io::Result<()> {
    let mut buf = vec![0u8; READ_SIZE];
    let mut bucket = Bucket::new(rate, BURST, READ_SIZE);
    let mut left = len;
    let mut last = Instant::now();
    while left > 0 {
        let now = Instant::now();
        bucket.refill(now - last);
        last = now;
        let want = READ_SIZE.min(left as usize);
        let wait = bucket.wait(want);
        if !wait.is_zero() {
            std::thread::sleep(wait);
            continue;
        }
        let n = conn.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        bucket.spend(n);
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_arithmetic() {
        // 1 MB/s, 4 KB burst, 1 KB reads.
        let mut b = Bucket::new(1_000_000, 4_000, 1_000);
        assert_eq!(b.tokens(), 4_000.0, "starts full");
        assert_eq!(b.wait(1_000), Duration::ZERO);
        for _ in 0..4 {
            b.spend(1_000);
        }
        // Empty: the next 1 KB is 1 ms away at 1 MB/s.
        assert_eq!(b.wait(1_000), Duration::from_millis(1));
        b.refill(Duration::from_micros(250));
        assert!((b.tokens() - 250.0).abs() < 1e-6);
        assert_eq!(b.wait(1_000), Duration::from_micros(750));
        // A long pause saves up no more than the burst.
        b.refill(Duration::from_secs(10));
        assert_eq!(b.tokens(), 4_000.0);
        // A short read spends only what it got.
        b.spend(300);
        assert!((b.tokens() - 3_700.0).abs() < 1e-6);
        // A burst below one read is raised to one read.
        let b = Bucket::new(10, 1, 64);
        assert_eq!(b.tokens(), 64.0);
    }

    #[test]
    fn bucket_holds_the_rate_over_simulated_time() {
        // 100 MB/s in 64 KiB reads for one simulated second, with every sleep overshooting by
        // 80 µs: the burst makes good the lateness, and never more than rate × time is read.
        let rate = 100 * MB;
        let mut b = Bucket::new(rate, BURST, READ_SIZE);
        let (mut t, mut read) = (Duration::ZERO, 0u64);
        while t < Duration::from_secs(1) {
            let w = b.wait(READ_SIZE);
            if w.is_zero() {
                b.spend(READ_SIZE);
                read += READ_SIZE as u64;
                t += Duration::from_micros(5); // the read itself
                b.refill(Duration::from_micros(5));
            } else {
                let slept = w + Duration::from_micros(80);
                t += slept;
                b.refill(slept);
            }
        }
        let max = rate as f64 * t.as_secs_f64() + BURST as f64;
        assert!(read as f64 <= max, "{read} > {max}");
        assert!(
            read as f64 >= 0.99 * rate as f64,
            "only {read} bytes in 1 s"
        );
    }

    #[test]
    fn transfer_sizes() {
        // 300 MB/s for 4 s over 8 streams: 150 MB each, in whole 64 KiB reads.
        let per = bytes_per_stream(300 * MB, 8, 4.0);
        assert_eq!(per % READ_SIZE as u64, 0);
        assert!(per <= 150 * MB && per > 150 * MB - READ_SIZE as u64);
        assert_eq!(bytes_per_stream(1, 8, 0.001), READ_SIZE as u64);
        assert!(SPECS.iter().all(|s| spec(s.name).is_some()));
        assert_eq!(spec("readerbound-300M-8").map(|s| s.streams), Some(8));
    }

    #[test]
    fn paced_read_reads_everything() {
        let data = vec![7u8; 3 * READ_SIZE + 5];
        let started = Instant::now();
        // 10 MB/s: the 4-read burst covers the first 256 KiB, then ~1.6 ms for the rest.
        paced_read(&mut &data[..], data.len() as u64, 10 * MB).unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        let err = paced_read(&mut &data[..], data.len() as u64 + 1, 10 * MB).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
