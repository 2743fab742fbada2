//! What the accept loop does when `accept(2)` fails: the listening socket
//! stays readable while connections wait in its backlog, so retrying at once
//! would spin. Out of descriptors (EMFILE, ENFILE) or memory (ENOBUFS,
//! ENOMEM), the loop sleeps 10 ms, doubling up to 100 ms, before it accepts
//! again. An episode of failures logs one warning when it starts and one
//! `accept recovered` line once no accept has failed for [`QUIET`], so a
//! limit that frees one descriptor at a time does not log per accept. Every
//! failure is counted by the server in `splice_proxy_accept_errors_total{kind}`.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// First wait after a failed accept.
pub const FIRST_WAIT: Duration = Duration::from_millis(10);
/// Longest wait between retries.
pub const MAX_WAIT: Duration = Duration::from_millis(100);
/// An episode is over once no accept has failed for this long.
pub const QUIET: Duration = Duration::from_secs(1);

/// Every `kind` label of `splice_proxy_accept_errors_total`.
pub const KINDS: [&str; 3] = ["fd_limit", "memory", "other"];

/// The `kind` label for an accept error.
pub fn kind(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => "fd_limit",
        Some(libc::ENOBUFS | libc::ENOMEM) => "memory",
        _ => "other",
    }
}

/// One accept loop's failure episode, if one is under way.
#[derive(Debug)]
pub struct AcceptBackoff {
    quiet: Duration,
    episode: Option<Episode>,
}

#[derive(Debug)]
struct Episode {
    started: Instant,
    last_failure: Instant,
    failures: u64,
    wait: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff::with_quiet(QUIET)
    }
}

impl AcceptBackoff {
    /// Episodes end after `quiet` without a failure.
    pub fn with_quiet(quiet: Duration) -> AcceptBackoff {
        AcceptBackoff {
            quiet,
            episode: None,
        }
    }

    /// An accept failed with `e`: logs it if it starts an episode, and
    /// returns how long to wait before accepting again. The caller counts it
    /// (under [`kind`]).
    pub fn failed(&mut self, e: &io::Error) -> Duration {
        let kind = kind(e);
        let now = Instant::now();
        match &mut self.episode {
            None => {
                tracing::warn!(
                    error = %e,
                    kind,
                    "accept failed; retrying every 10-100 ms, logged once until accepts \
                     work again"
                );
                self.episode = Some(Episode {
                    started: now,
                    last_failure: now,
                    failures: 1,
                    wait: FIRST_WAIT,
                });
                FIRST_WAIT
            }
            Some(ep) => {
                ep.failures += 1;
                ep.last_failure = now;
                ep.wait = (ep.wait * 2).min(MAX_WAIT);
                ep.wait
            }
        }
    }

    /// Resolves when the episode under way has gone quiet (never if there
    /// is none); then call [`AcceptBackoff::recovered`].
    pub async fn quiet(&self) {
        match &self.episode {
            Some(ep) => tokio::time::sleep_until(ep.last_failure + self.quiet).await,
            None => std::future::pending().await,
        }
    }

    /// Ends the episode with one info line.
    pub fn recovered(&mut self) {
        if let Some(ep) = self.episode.take() {
            tracing::info!(
                failures = ep.failures,
                duration_ms = ep.last_failure.duration_since(ep.started).as_millis() as u64,
                "accept recovered"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[test]
    fn waits_grow_to_the_cap_and_start_over_after_recovery() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<u64> = (0..6)
            .map(|_| b.failed(&emfile()).as_millis() as u64)
            .collect();
        assert_eq!(waits, [10, 20, 40, 80, 100, 100]);
        b.recovered();
        // A new episode starts from the first wait again.
        assert_eq!(b.failed(&emfile()), FIRST_WAIT);
    }

    #[tokio::test]
    async fn an_episode_goes_quiet_only_after_the_last_failure() {
        let quiet = Duration::from_millis(200);
        let mut b = AcceptBackoff::with_quiet(quiet);
        let none = tokio::time::timeout(quiet * 2, b.quiet()).await;
        assert!(none.is_err(), "no episode: never quiet");
        b.failed(&emfile());
        tokio::time::sleep(quiet / 2).await;
        b.failed(&emfile());
        let t0 = Instant::now();
        b.quiet().await;
        assert!(
            t0.elapsed() >= quiet / 2,
            "quiet counts from the last failure"
        );
        b.recovered();
        let none = tokio::time::timeout(quiet * 2, b.quiet()).await;
        assert!(none.is_err(), "recovered: no episode");
    }

    #[test]
    fn kinds() {
        assert_eq!(kind(&emfile()), "fd_limit");
        assert_eq!(
            kind(&io::Error::from_raw_os_error(libc::ENFILE)),
            "fd_limit"
        );
        assert_eq!(kind(&io::Error::from_raw_os_error(libc::ENOMEM)), "memory");
        assert_eq!(kind(&io::Error::other("x")), "other");
    }
}
