//! How a tunnel ended, as the access log and the metrics name it.

use std::fmt;

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with a FIN.
    Closed,
    ClientReset,
    UpstreamReset,
    Idle,
    Shutdown,
    /// The data path could not take the tunnel over.
    Failed,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            End::Closed => "closed",
            End::ClientReset => "client_reset",
            End::UpstreamReset => "upstream_reset",
            End::Idle => "idle_timeout",
            End::Shutdown => "shutdown",
            End::Failed => "failed",
        })
    }
}
