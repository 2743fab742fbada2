//! Check 5 (`--throughput-mib N`, optional): a throughput figure through a tunnel. N MiB of
//! pseudo-random bytes go to `--target` while what comes back is compared with them; the target
//! must echo what it receives (an echo service behind the proxy). Only bytes that come back
//! intact prove they went through, so a target that does not echo gets "cannot tell". The
//! figure is informational; bytes that come back changed are a failure.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use super::checks;
use super::idle::{Close, span};
use super::report::{Finding, Outcome};
use crate::proxy_url::ProxyUrl;

/// Name of this check in the report.
pub const THROUGHPUT: &str = "throughput";

const MIB: usize = 1 << 20;
/// Bytes a write; divides [`MIB`], so a write never crosses the end of the pattern.
const CHUNK: usize = 64 * 1024;

/// One MiB of xorshift bytes, sent over and over.
fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(MIB);
    while out.len() < MIB {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Where `data`, received at stream offset `at`, first differs from the repeated pattern.
pub fn first_difference(pattern: &[u8], at: u64, data: &[u8]) -> Option<usize> {
    let mut done = 0;
    while done < data.len() {
        let off = ((at + done as u64) % pattern.len() as u64) as usize;
        let n = (pattern.len() - off).min(data.len() - done);
        let (want, got) = (&pattern[off..off + n], &data[done..done + n]);
        if let Some(i) = want.iter().zip(got).position(|(a, b)| a != b) {
            return Some(done + i);
        }
        done += n;
    }
    None
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Echo {
    /// All of it, intact, `took` from the first byte sent to the last one back.
    Complete { bytes: u64, took: Duration },
    /// The first bytes back are not the ones sent: its first bytes.
    NotEcho(Vec<u8>),
    /// The first `at` bytes came back as sent, then others.
    Changed { at: u64 },
    /// Nothing within the timeout.
    Silent,
    /// The connection closed after `echoed` bytes came back.
    Closed { echoed: u64, how: Close },
    /// `echoed` bytes came back, then nothing within the timeout.
    Stalled { echoed: u64 },
}

/// Reads the echo of `total` bytes, comparing as it goes.
fn read_back(r: &mut TcpStream, pattern: &[u8], total: u64, start: Instant) -> Echo {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < total {
        let n = match r.read(&mut buf) {
            Ok(0) => {
                return Echo::Closed {
                    echoed: got,
                    how: Close::Fin,
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return match Close::of(&e) {
                    None if got == 0 => Echo::Silent,
                    None => Echo::Stalled { echoed: got },
                    Some(how) => Echo::Closed { echoed: got, how },
                };
            }
        };
        if let Some(i) = first_difference(pattern, got, &buf[..n]) {
            return if got == 0 && i == 0 {
                Echo::NotEcho(buf[..n.min(8)].to_vec())
            } else {
                Echo::Changed { at: got + i as u64 }
            };
        }
        got += n as u64;
    }
    Echo::Complete {
        bytes: total,
        took: start.elapsed(),
    }
}

/// Sends `mib` MiB through `tcp` from a thread of its own while reading the echo.
fn pump(tcp: TcpStream, mib: u32, timeout: Duration) -> Echo {
    let total = u64::from(mib) * MIB as u64;
    let pattern = pattern();
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let mut writer = match tcp.try_clone() {
        Ok(w) => w,
        Err(e) => {
            return Echo::Closed {
                echoed: 0,
                how: Close::Error(e.to_string()),
            };
        }
    };
    let mut reader = tcp;
    let start = Instant::now();
    std::thread::scope(|scope| {
        let pattern = &pattern;
        scope.spawn(move || {
            let mut sent = 0u64;
            while sent < total {
                let off = (sent % MIB as u64) as usize;
                if writer.write_all(&pattern[off..off + CHUNK]).is_err() {
                    break;
                }
                sent += CHUNK as u64;
            }
        });
        let echo = read_back(&mut reader, pattern, total, start);
        // Ends the writer's blocked write, if any.
        let _ = reader.shutdown(Shutdown::Both);
        echo
    })
}

/// What the first bytes of an answer that is not an echo look like.
fn looks_like(first: &[u8]) -> String {
    let hex: Vec<String> = first.iter().map(|b| format!("{b:02x}")).collect();
    let kind = match first {
        [0x15, 0x03, ..] => ": a TLS alert, the target speaks TLS",
        [0x16, 0x03, ..] => ": a TLS handshake record, the target speaks TLS",
        [b'H', b'T', b'T', b'P', ..] => ": an HTTP answer",
        [b'S', b'S', b'H', b'-', ..] => ": an SSH banner",
        [b'@', b'R', b'S', b'Y', b'N', b'C', b'D', ..] => ": an rsync daemon's greeting",
        _ => "",
    };
    format!("{}{kind}", hex.join(" "))
}

/// The throughput line.
pub fn verdict(mib: u32, echo: &Echo, timeout: Duration) -> Finding {
    let not_echo = "the target does not echo; point --target at an echo service behind the \
                    proxy to measure";
    let mib_of = |b: u64| format!("{:.1}", b as f64 / MIB as f64);
    let (outcome, why) = match echo {
        Echo::Complete { bytes, took } => {
            let secs = took.as_secs_f64().max(1e-6);
            (
                Outcome::Pass,
                format!(
                    "{mib} MiB ({bytes} bytes) sent and echoed back intact in {:.2} s: \
                     {:.1} MB/s ({:.2} Gbit/s) each way",
                    took.as_secs_f64(),
                    *bytes as f64 / secs / 1e6,
                    *bytes as f64 * 8.0 / secs / 1e9
                ),
            )
        }
        Echo::NotEcho(first) => (
            Outcome::CannotTell,
            format!(
                "the answer is not the bytes sent (it starts {}): {not_echo}",
                looks_like(first)
            ),
        ),
        Echo::Changed { at } => (
            Outcome::Fail,
            format!(
                "the first {at} bytes came back as sent, then different ones: something on the \
                 way changes the bytes of a tunnel, and a migration's data would be damaged \
                 (or the echo service is not a plain echo)"
            ),
        ),
        Echo::Silent => (
            Outcome::CannotTell,
            format!("nothing came back within {}: {not_echo}", span(timeout)),
        ),
        Echo::Closed { echoed: 0, how } => (
            Outcome::CannotTell,
            format!(
                "the tunnel closed with {} before any byte came back: {not_echo}",
                how.words()
            ),
        ),
        Echo::Closed { echoed, how } => (
            Outcome::CannotTell,
            format!(
                "{} of {mib} MiB came back, then the tunnel closed with {}: the proxy (a limit \
                 of bytes per tunnel?) or the echo service ended it",
                mib_of(*echoed),
                how.words()
            ),
        ),
        Echo::Stalled { echoed } => (
            Outcome::CannotTell,
            format!(
                "{} of {mib} MiB came back, then nothing for {}: a slow path or echo service; \
                 run with fewer MiB or a longer --timeout",
                mib_of(*echoed),
                span(timeout)
            ),
        ),
    };
    Finding::new(THROUGHPUT, outcome, why)
}

/// Runs check 5 on a tunnel of its own.
pub fn check(url: &ProxyUrl, target: &str, mib: u32, timeout: Duration) -> Finding {
    let (connect, tunnel) = checks::connect(url, target, timeout);
    match tunnel {
        Some(tcp) => verdict(mib, &pump(tcp, mib, timeout), timeout),
        None => Finding::new(
            THROUGHPUT,
            Outcome::CannotTell,
            format!("not run: no tunnel to the target ({})", connect.reason),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_found_across_the_patterns_end() {
        let p = pattern();
        assert_eq!(p.len(), MIB);
        assert_ne!(p[..8], p[8..16]);
        let at = MIB as u64 - 3;
        let mut data: Vec<u8> = p[MIB - 3..].iter().chain(&p[..5]).copied().collect();
        assert_eq!(first_difference(&p, at, &data), None);
        assert_eq!(first_difference(&p, 2 * MIB as u64 - 3, &data), None);
        data[6] ^= 1;
        assert_eq!(first_difference(&p, at, &data), Some(6));
        assert_eq!(first_difference(&p, 0, b""), None);
    }

    #[test]
    fn a_complete_echo_gives_the_figure_with_bytes_and_time() {
        let echo = Echo::Complete {
            bytes: 16 * MIB as u64,
            took: Duration::from_millis(500),
        };
        verdict(16, &echo, Duration::from_secs(10)).expect(
            Outcome::Pass,
            &[
                "16 MiB (16777216 bytes) sent and echoed back intact in 0.50 s",
                "33.6 MB/s (0.27 Gbit/s) each way",
            ],
        );
    }

    #[test]
    fn no_echo_cannot_tell_and_says_what_answered() {
        let t = Duration::from_secs(10);
        verdict(1, &Echo::NotEcho(vec![0x15, 0x03, 0x03, 0, 2]), t).expect(
            Outcome::CannotTell,
            &["15 03 03 00 02: a TLS alert", "does not echo"],
        );
        verdict(1, &Echo::NotEcho(b"HTTP/1.1".to_vec()), t)
            .expect(Outcome::CannotTell, &["an HTTP answer"]);
        verdict(1, &Echo::Silent, t).expect(Outcome::CannotTell, &["within 10.0 s"]);
        let closed = Echo::Closed {
            echoed: 0,
            how: Close::Rst,
        };
        verdict(1, &closed, t).expect(Outcome::CannotTell, &["an RST before any byte"]);
        let half = Echo::Closed {
            echoed: MIB as u64 / 2,
            how: Close::Fin,
        };
        verdict(1, &half, t).expect(Outcome::CannotTell, &["0.5 of 1 MiB came back"]);
        verdict(2, &Echo::Stalled { echoed: 0 }, t)
            .expect(Outcome::CannotTell, &["0.0 of 2 MiB", "fewer MiB"]);
    }

    #[test]
    fn changed_bytes_fail() {
        verdict(1, &Echo::Changed { at: 4096 }, Duration::from_secs(1))
            .expect(Outcome::Fail, &["first 4096 bytes came back as sent"]);
    }
}
