//! Abuse limits on the connection path: how many handshakes may be in
//! progress at once, and how many connections one client address may hold.
//! `server.rs` asks [`Limits::admit`] right after accept and holds the
//! [`Admission`] while the connection lives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Which limit refused a connection (the `limit` label of
/// `splice_proxy_limit_rejections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-handshakes`: too many handshakes in progress.
    Handshakes,
    /// `--max-conns-per-ip`: this client address holds too many connections.
    PerIp,
}

impl Limit {
    pub const ALL: [Limit; 2] = [Limit::Handshakes, Limit::PerIp];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Handshakes => "handshakes",
            Limit::PerIp => "per_ip",
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            Limit::Handshakes => "--max-handshakes",
            Limit::PerIp => "--max-conns-per-ip",
        }
    }
}

/// The limits, shared by every connection.
pub struct Limits {
    handshakes: Arc<Semaphore>,
    per_ip: Option<Arc<PerIp>>,
}

/// What an admitted connection holds.
pub struct Admission {
    handshake: Option<OwnedSemaphorePermit>,
    _per_ip: Option<IpSlot>,
}

/// Open connections by client address. An address has an entry only while
/// it holds a connection, so the table is bounded by the open connections.
struct PerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its address until dropped.
struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    /// The 200 or the refusal is written: the handshake slot is free again.
    pub fn handshake_over(&mut self) {
        self.handshake = None;
    }
}

impl Limits {
    /// `max_conns_per_ip` 0: no per-address cap.
    pub fn new(max_handshakes: usize, max_conns_per_ip: usize) -> Limits {
        Limits {
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
            per_ip: (max_conns_per_ip > 0).then(|| {
                Arc::new(PerIp {
                    max: max_conns_per_ip,
                    open: Mutex::new(HashMap::new()),
                })
            }),
        }
    }

    /// Admits a new connection from `ip`, or says which limit it is over.
    /// IPv4-mapped IPv6 addresses count as their IPv4 address.
    pub fn admit(&self, ip: IpAddr) -> Result<Admission, Limit> {
        let per_ip = match &self.per_ip {
            Some(t) => Some(t.take(ip.to_canonical()).ok_or(Limit::PerIp)?),
            None => None,
        };
        let handshake = self
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| Limit::Handshakes)?;
        Ok(Admission {
            handshake: Some(handshake),
            _per_ip: per_ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn handshake_slots_are_counted_and_released() {
        let limits = Limits::new(2, 0);
        let mut a = limits.admit(A).unwrap();
        let _b = limits.admit(A).unwrap();
        assert_eq!(limits.admit(B).err(), Some(Limit::Handshakes));
        a.handshake_over();
        let _c = limits.admit(A).unwrap();
        assert_eq!(limits.admit(A).err(), Some(Limit::Handshakes));
        drop(a);
        assert_eq!(limits.admit(A).err(), Some(Limit::Handshakes));
    }

    #[test]
    fn per_ip_counts_whole_connections_by_address() {
        let limits = Limits::new(100, 2);
        let mut a1 = limits.admit(A).unwrap();
        a1.handshake_over(); // an established tunnel still counts
        let a2 = limits.admit(A).unwrap();
        assert_eq!(limits.admit(A).err(), Some(Limit::PerIp));
        // The IPv4-mapped form is the same client.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(limits.admit(mapped).err(), Some(Limit::PerIp));
        let _b = limits.admit(B).unwrap();
        drop(a2);
        let _a3 = limits.admit(A).unwrap();
        drop(a1);
        drop(_a3);
        // Entries go away with their last connection.
        assert!(
            limits
                .per_ip
                .as_ref()
                .unwrap()
                .open
                .lock()
                .unwrap()
                .get(&A)
                .is_none()
        );
    }

    #[test]
    fn a_per_ip_refusal_takes_no_handshake_slot() {
        let limits = Limits::new(1, 1);
        let a = limits.admit(A).unwrap();
        assert_eq!(limits.admit(A).err(), Some(Limit::PerIp));
        drop(a);
        let _b = limits.admit(B).unwrap();
    }

    #[test]
    fn zero_means_no_per_ip_cap() {
        let limits = Limits::new(1000, 0);
        let held: Vec<_> = (0..500).map(|_| limits.admit(A).unwrap()).collect();
        assert_eq!(held.len(), 500);
    }
}
