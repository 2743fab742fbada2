//! One structured access-log event per connection, emitted when it ends.
//! Credentials never reach it: only the user name. It only logs: the server counts the
//! connection in the metrics.

use std::net::SocketAddr;
use std::time::Instant;

use crate::refusal::Refusal;
use crate::tunnel::{Mode, Outcome};

/// What is known about a connection so far.
#[derive(Debug)]
pub struct Record {
    start: Instant,
    pub client: SocketAddr,
    pub mode: Mode,
    pub user: Option<String>,
    pub target: Option<String>,
    pub resolved: Option<SocketAddr>,
    /// The parent proxy the tunnel goes through (`host:port`); `None`: connected directly.
    pub parent: Option<String>,
    /// The status written on the wire; `None` when the connection closed silently.
    pub status: Option<u16>,
    /// Bytes that came with the request head and were forwarded before the tunnel.
    pub early_bytes: u64,
    /// Bytes the parent proxy sent after its 2xx, written to the client behind the `200`.
    pub early_down: u64,
    pub outcome: Option<Outcome>,
    /// Why the connection was refused or closed silently; a tunnel's own error is in its
    /// ending (`outcome.end`).
    pub error: Option<String>,
}

impl Record {
    pub fn new(client: SocketAddr, mode: Mode) -> Record {
        Record {
            start: Instant::now(),
            client,
            mode,
            user: None,
            target: None,
            resolved: None,
            parent: None,
            status: None,
            early_bytes: 0,
            early_down: 0,
            outcome: None,
            error: None,
        }
    }

    /// A connection answered with a refusal: its status, and why.
    pub fn refused(&mut self, refusal: &Refusal) {
        self.status = Some(refusal.status().code());
        self.error = Some(refusal.to_string());
    }

    pub fn finish(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }

    /// Bytes client → upstream and upstream → client.
    pub fn bytes(&self) -> (u64, u64) {
        let (up, down) = self
            .outcome
            .as_ref()
            .map(|o| (o.bytes_up, o.bytes_down))
            .unwrap_or_default();
        (up + self.early_bytes, down + self.early_down)
    }

    /// Logs the event.
    pub fn emit(&self) {
        let (bytes_up, bytes_down) = self.bytes();
        let o = self.outcome.as_ref();
        let field = |f: fn(&Outcome) -> u64| o.map_or(0, f);
        let end = match (o, self.status) {
            (Some(o), _) => o.end.label(),
            (None, Some(_)) => "refused",
            (None, None) => "dropped",
        };
        let error = o.and_then(|o| o.end.error()).or_else(|| self.error.clone());
        tracing::info!(
            target: "access",
            client = %self.client,
            user = self.user.as_deref().unwrap_or("-"),
            target = self.target.as_deref().unwrap_or("-"),
            resolved = %self.resolved.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            parent = self.parent.as_deref().unwrap_or("-"),
            status = self.status.unwrap_or(0),
            bytes_up,
            bytes_down,
            duration_ms = self.start.elapsed().as_millis() as u64,
            mode = %self.mode,
            kernel_bytes = field(|o| o.kernel_bytes),
            spliced_bytes = field(|o| o.spliced_bytes),
            relayed_bytes = field(|o| o.relayed_bytes),
            relays = field(|o| o.relays),
            detaches = field(|o| o.detaches),
            rearms = field(|o| o.rearms),
            end = %end,
            error = error.as_deref().unwrap_or("-"),
            "tunnel"
        );
    }
}
