//! Abuse limits on the connection path: how many handshakes may be in
//! progress at once. `server.rs` asks [`Limits::admit`] right after accept
//! and holds the [`Admission`] while the connection lives.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Which limit refused a connection (the `limit` label of
/// `splice_proxy_limit_rejections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-handshakes`: too many handshakes in progress.
    Handshakes,
}

impl Limit {
    pub const ALL: [Limit; 1] = [Limit::Handshakes];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Handshakes => "handshakes",
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            Limit::Handshakes => "--max-handshakes",
        }
    }
}

/// The limits, shared by every connection.
pub struct Limits {
    handshakes: Arc<Semaphore>,
}

/// What an admitted connection holds.
pub struct Admission {
    handshake: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// The 200 or the refusal is written: the handshake slot is free again.
    pub fn handshake_over(&mut self) {
        self.handshake = None;
    }
}

impl Limits {
    pub fn new(max_handshakes: usize) -> Limits {
        Limits {
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
        }
    }

    /// Admits a new connection, or says which limit it is over.
    pub fn admit(&self) -> Result<Admission, Limit> {
        let handshake = self
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| Limit::Handshakes)?;
        Ok(Admission {
            handshake: Some(handshake),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_slots_are_counted_and_released() {
        let limits = Limits::new(2);
        let mut a = limits.admit().unwrap();
        let _b = limits.admit().unwrap();
        assert_eq!(limits.admit().err(), Some(Limit::Handshakes));
        a.handshake_over();
        let _c = limits.admit().unwrap();
        assert_eq!(limits.admit().err(), Some(Limit::Handshakes));
        drop(a);
        assert_eq!(limits.admit().err(), Some(Limit::Handshakes));
    }
}
