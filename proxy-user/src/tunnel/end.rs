//! How a tunnel ended, as the access log and the metrics name it: one value that says which
//! side reset and with what error, or which step of the data path failed, so that the log's
//! `end=`/`error=` fields and the metrics' `outcome` label are rendered here and nowhere else
//! (pingora's `ErrorSource` is the model).

use std::fmt;
use std::io;

use super::holds::MoveError;
use super::pump::{Dir, PumpError};

/// Which socket of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    // The values index a tunnel's pair of sockets (see `sockmap/closes.rs`).
    Client = 0,
    Upstream = 1,
}

impl Side {
    /// The socket a direction reads from.
    pub(crate) fn source(dir: Dir) -> Side {
        match dir {
            Dir::Up => Side::Client,
            Dir::Down => Side::Upstream,
        }
    }

    /// The socket a direction writes to.
    pub(crate) fn destination(dir: Dir) -> Side {
        match dir {
            Dir::Up => Side::Upstream,
            Dir::Down => Side::Client,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// The step of the sockmap data path that failed, as the log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Putting the tunnel's sockets into the sockmap.
    Arm,
    /// Taking the sockets out of tokio's reactor.
    LeaveReactor,
    /// Watching the sockets for FIN and errors.
    Watch,
    /// A direction leaving the kernel path for splice(2).
    Detach,
    /// A spliced direction returning to the kernel path.
    Rearm,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Arm => "arming the sockmap",
            Stage::LeaveReactor => "leaving the reactor",
            Stage::Watch => "watching for FIN",
            Stage::Detach => "leaving the kernel path",
            Stage::Rearm => "returning to the kernel path",
        })
    }
}

/// How a tunnel ended. Displayed as its label ([`End::label`]).
#[derive(Debug)]
pub enum End {
    /// Both directions finished with a FIN.
    Closed,
    /// A socket failed (reset, timed out, …): the tunnel ends, and the other side is reset too.
    Reset { side: Side, error: io::Error },
    /// Nothing moved for `--idle-timeout`.
    Idle,
    /// The proxy shut down.
    Shutdown,
    /// The data path could not take the tunnel over, or keep it.
    Failed { stage: Stage, error: io::Error },
}

impl End {
    /// Every label, so that each metrics series exists from the start.
    pub const LABELS: [&'static str; 6] = [
        "closed",
        "client_reset",
        "upstream_reset",
        "idle_timeout",
        "shutdown",
        "failed",
    ];

    /// The access log's `end=` and the metrics' `outcome` label.
    pub fn label(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Reset {
                side: Side::Client, ..
            } => "client_reset",
            End::Reset {
                side: Side::Upstream,
                ..
            } => "upstream_reset",
            End::Idle => "idle_timeout",
            End::Shutdown => "shutdown",
            End::Failed { .. } => "failed",
        }
    }

    /// The access log's `error=`: the error behind a reset or a failure, with the side or the
    /// step it came from (`client: Connection reset by peer (os error 104)`).
    pub fn error(&self) -> Option<String> {
        match self {
            End::Reset { side, error } => Some(format!("{side}: {error}")),
            End::Failed { stage, error } => Some(format!("{stage}: {error}")),
            End::Closed | End::Idle | End::Shutdown => None,
        }
    }

    /// Whether the tunnel's sockets are closed with RST, so that the other side hears of it.
    pub fn resets(&self) -> bool {
        matches!(self, End::Reset { .. } | End::Failed { .. })
    }

    /// A direction's pump failed: a read blames the direction's source, a write its
    /// destination.
    pub(crate) fn pump(dir: Dir, e: PumpError) -> End {
        match e {
            PumpError::Read(error) => End::Reset {
                side: Side::source(dir),
                error,
            },
            PumpError::Write(error) => End::Reset {
                side: Side::destination(dir),
                error,
            },
        }
    }

    /// Moving a direction's held or spliced bytes failed: blamed as a pump's read (its source)
    /// or write (its destination).
    pub(crate) fn moving(dir: Dir, e: MoveError) -> End {
        End::pump(
            dir,
            match e {
                MoveError::Src(e) => PumpError::Read(e),
                MoveError::Dst(e) => PumpError::Write(e),
            },
        )
    }

    /// The failure of `stage`, for `map_err`.
    pub(crate) fn failed(stage: Stage) -> impl Fn(io::Error) -> End + Copy {
        move |error| End::Failed { stage, error }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reset() -> io::Error {
        io::Error::from_raw_os_error(libc::ECONNRESET)
    }

    #[test]
    fn each_ending_renders_its_label_and_error_as_the_log_always_had_them() {
        let cases = [
            (End::Closed, "closed", None),
            (
                End::Reset {
                    side: Side::Client,
                    error: reset(),
                },
                "client_reset",
                Some("client: Connection reset by peer (os error 104)"),
            ),
            (
                End::Reset {
                    side: Side::Upstream,
                    error: io::Error::from_raw_os_error(libc::ETIMEDOUT),
                },
                "upstream_reset",
                Some("upstream: Connection timed out (os error 110)"),
            ),
            (End::Idle, "idle_timeout", None),
            (End::Shutdown, "shutdown", None),
            (
                End::Failed {
                    stage: Stage::Arm,
                    error: io::Error::other("no room"),
                },
                "failed",
                Some("arming the sockmap: no room"),
            ),
        ];
        for (end, label, error) in &cases {
            assert_eq!(end.label(), *label);
            assert_eq!(end.to_string(), *label, "Display is the label");
            assert_eq!(end.error().as_deref(), *error, "{end:?}");
        }
        let labels: Vec<_> = cases.iter().map(|(e, ..)| e.label()).collect();
        assert_eq!(labels, End::LABELS, "LABELS names every ending, once");
    }

    #[test]
    fn each_failed_stage_says_what_was_being_done() {
        let stages = [
            (Stage::Arm, "arming the sockmap"),
            (Stage::LeaveReactor, "leaving the reactor"),
            (Stage::Watch, "watching for FIN"),
            (Stage::Detach, "leaving the kernel path"),
            (Stage::Rearm, "returning to the kernel path"),
        ];
        for (stage, words) in stages {
            let end = End::failed(stage)(io::Error::other("x"));
            assert_eq!(end.error().unwrap(), format!("{words}: x"));
            assert!(end.resets());
        }
    }

    #[test]
    fn only_resets_and_failures_reset_the_other_side() {
        assert!(!End::Closed.resets());
        assert!(!End::Idle.resets());
        assert!(!End::Shutdown.resets());
        let r = End::Reset {
            side: Side::Upstream,
            error: reset(),
        };
        assert!(r.resets());
    }

    #[test]
    fn a_read_blames_the_source_and_a_write_the_destination() {
        let side = |end: End| match end {
            End::Reset { side, .. } => side,
            other => panic!("{other:?}"),
        };
        let read = |dir| side(End::pump(dir, PumpError::Read(reset())));
        let write = |dir| side(End::pump(dir, PumpError::Write(reset())));
        assert_eq!(read(Dir::Up), Side::Client);
        assert_eq!(write(Dir::Up), Side::Upstream);
        assert_eq!(read(Dir::Down), Side::Upstream);
        assert_eq!(write(Dir::Down), Side::Client);

        let src = |dir| side(End::moving(dir, MoveError::Src(reset())));
        let dst = |dir| side(End::moving(dir, MoveError::Dst(reset())));
        assert_eq!(src(Dir::Up), Side::Client);
        assert_eq!(dst(Dir::Up), Side::Upstream);
        assert_eq!(src(Dir::Down), Side::Upstream);
        assert_eq!(dst(Dir::Down), Side::Client);
    }
}
