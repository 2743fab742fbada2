//! Admission and abuse limits on the connection path: which client
//! addresses may connect at all (`--allow-src`), how many handshakes may be
//! in progress at once, how many connections one client address may hold,
//! and how long a `407` waits after repeated authentication failures from
//! one address. `server.rs` asks [`Limits::admit`] right after accept and
//! holds the [`Admission`] while the connection lives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cidr::IpNet;

/// Which limit refused a connection at accept, before its head was read
/// (the `limit` label of `splice_proxy_limit_rejections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--allow-src`: the client address is in none of the networks.
    Source,
    /// `--max-handshakes`: too many handshakes in progress.
    Handshakes,
    /// `--max-conns-per-ip`: this client address holds too many connections.
    PerIp,
}

impl Limit {
    pub const ALL: [Limit; 3] = [Limit::Source, Limit::Handshakes, Limit::PerIp];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Source => "allow_src",
            Limit::Handshakes => "handshakes",
            Limit::PerIp => "per_ip",
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            Limit::Source => "--allow-src",
            Limit::Handshakes => "--max-handshakes",
            Limit::PerIp => "--max-conns-per-ip",
        }
    }

    /// Why, for the access log.
    pub fn reason(self) -> String {
        match self {
            Limit::Source => format!("client address not in {}", self.flag()),
            Limit::Handshakes | Limit::PerIp => format!("at {}", self.flag()),
        }
    }
}

/// The limits, shared by every connection.
pub struct Limits {
    /// `--allow-src`; empty: every address.
    allow_src: Vec<IpNet>,
    handshakes: Arc<Semaphore>,
    per_ip: Option<Arc<PerIp>>,
    auth_failures: Option<Mutex<AuthFailures>>,
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
    /// `max_conns_per_ip` 0: no per-address cap; `auth_fail_delay` zero: no
    /// delay after authentication failures.
    pub fn new(
        max_handshakes: usize,
        max_conns_per_ip: usize,
        auth_fail_delay: Duration,
    ) -> Limits {
        Limits {
            allow_src: Vec::new(),
            auth_failures: (!auth_fail_delay.is_zero())
                .then(|| Mutex::new(AuthFailures::new(auth_fail_delay))),
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
            per_ip: (max_conns_per_ip > 0).then(|| {
                Arc::new(PerIp {
                    max: max_conns_per_ip,
                    open: Mutex::new(HashMap::new()),
                })
            }),
        }
    }

    /// Admits connections only from addresses in one of `nets` (none: from
    /// every address).
    pub fn with_allow_src(self, nets: Vec<IpNet>) -> Limits {
        Limits {
            allow_src: nets,
            ..self
        }
    }

    /// Admits a new connection from `ip`, or says which limit it is over.
    /// IPv4-mapped IPv6 addresses count as their IPv4 address. A source
    /// that is not allowed takes no slot of the other limits.
    pub fn admit(&self, ip: IpAddr) -> Result<Admission, Limit> {
        if !self.allow_src.is_empty() && !self.allow_src.iter().any(|net| net.contains(ip)) {
            return Err(Limit::Source);
        }
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

impl Limits {
    /// Authentication from `ip` failed: how long its `407` waits (zero for
    /// the first [`FREE_FAILURES`]).
    pub fn auth_failed(&self, ip: IpAddr) -> Duration {
        match &self.auth_failures {
            Some(t) => t
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .failed(ip.to_canonical(), Instant::now()),
            None => Duration::ZERO,
        }
    }

    /// Authentication from `ip` succeeded: its failures are forgotten.
    pub fn auth_succeeded(&self, ip: IpAddr) {
        if let Some(t) = &self.auth_failures {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .entries
                .remove(&ip.to_canonical());
        }
    }
}

/// Failures an address may have before its `407`s are delayed.
pub const FREE_FAILURES: u32 = 5;
/// An address's failures are forgotten this long after its last one.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// The delay of the first delayed `407`; it doubles with each further failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(250);
/// Addresses remembered at most; beyond it the expired, then the stalest go.
pub const MAX_TRACKED: usize = 16 * 1024;

/// Recent authentication failures by client address.
struct AuthFailures {
    max_delay: Duration,
    entries: HashMap<IpAddr, Failures>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl AuthFailures {
    fn new(max_delay: Duration) -> AuthFailures {
        AuthFailures {
            max_delay,
            entries: HashMap::new(),
        }
    }

    /// Records a failure from `ip` at `now`; returns the delay for its 407.
    fn failed(&mut self, ip: IpAddr, now: Instant) -> Duration {
        if self.entries.len() >= MAX_TRACKED && !self.entries.contains_key(&ip) {
            self.make_room(now);
        }
        let f = self.entries.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
        });
        if now.saturating_duration_since(f.last) > FAILURE_WINDOW {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        delay_for(f.count, self.max_delay)
    }

    /// Drops expired entries; if none had expired, the stalest one.
    fn make_room(&mut self, now: Instant) {
        self.entries
            .retain(|_, f| now.saturating_duration_since(f.last) <= FAILURE_WINDOW);
        if self.entries.len() >= MAX_TRACKED {
            if let Some(ip) = self
                .entries
                .iter()
                .min_by_key(|(_, f)| f.last)
                .map(|(ip, _)| *ip)
            {
                self.entries.remove(&ip);
            }
        }
    }
}

/// The delay for the `count`th failure in a row: none up to
/// [`FREE_FAILURES`], then [`FIRST_DELAY`] doubling, at most `max`.
fn delay_for(count: u32, max: Duration) -> Duration {
    if count <= FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (count - FREE_FAILURES - 1).min(20);
    FIRST_DELAY.saturating_mul(1 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn handshake_slots_are_counted_and_released() {
        let limits = Limits::new(2, 0, Duration::ZERO);
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
        let limits = Limits::new(100, 2, Duration::ZERO);
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
        let limits = Limits::new(1, 1, Duration::ZERO);
        let a = limits.admit(A).unwrap();
        assert_eq!(limits.admit(A).err(), Some(Limit::PerIp));
        drop(a);
        let _b = limits.admit(B).unwrap();
    }

    #[test]
    fn allow_src_admits_listed_networks_only_and_takes_no_slot() {
        let nets = ["192.0.2.1/32", "2001:db8::/32"]
            .map(|n| IpNet::parse(n).unwrap())
            .to_vec();
        let limits = Limits::new(1, 1, Duration::ZERO).with_allow_src(nets);
        // The one handshake slot is taken: an outsider still gets its 403
        // (the source is checked first), not a 503.
        let held = limits.admit(A).unwrap();
        for outsider in ["192.0.2.2", "::ffff:192.0.2.2", "2001:db9::1", "::1"] {
            let ip: IpAddr = outsider.parse().unwrap();
            assert_eq!(limits.admit(ip).err(), Some(Limit::Source), "{outsider}");
        }
        assert_eq!(limits.admit(A).err(), Some(Limit::PerIp));
        drop(held);
        // The IPv4-mapped form of a listed address is that address.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let a = limits.admit(mapped).unwrap();
        drop(a);
        let _v6 = limits.admit("2001:db8::7".parse().unwrap()).unwrap();
        // Without --allow-src every address is admitted.
        let open = Limits::new(10, 0, Duration::ZERO);
        let _b = open.admit(B).unwrap();
        assert_eq!(Limit::Source.reason(), "client address not in --allow-src");
        assert_eq!(Limit::Handshakes.reason(), "at --max-handshakes");
    }

    #[test]
    fn zero_means_no_per_ip_cap() {
        let limits = Limits::new(1000, 0, Duration::ZERO);
        let held: Vec<_> = (0..500).map(|_| limits.admit(A).unwrap()).collect();
        assert_eq!(held.len(), 500);
    }

    #[test]
    fn delays_grow_after_the_free_failures_and_are_capped() {
        let max = Duration::from_secs(5);
        let ms = |n| Duration::from_millis(n);
        let delays: Vec<Duration> = (1..=12).map(|n| delay_for(n, max)).collect();
        assert_eq!(
            delays,
            [0, 0, 0, 0, 0, 250, 500, 1000, 2000, 4000, 5000, 5000].map(ms)
        );
        assert_eq!(delay_for(u32::MAX, max), max);
        assert_eq!(delay_for(7, ms(300)), ms(300));
    }

    #[test]
    fn failures_count_per_address_and_expire() {
        let mut t = AuthFailures::new(Duration::from_secs(5));
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.failed(A, t0), Duration::ZERO);
        }
        assert_eq!(t.failed(A, t0), FIRST_DELAY);
        assert_eq!(t.failed(B, t0), Duration::ZERO);
        // Within the window of the last failure: still counted.
        let t1 = t0 + FAILURE_WINDOW;
        assert_eq!(t.failed(A, t1), FIRST_DELAY * 2);
        // A window after the last failure: forgotten.
        let t2 = t1 + FAILURE_WINDOW + Duration::from_secs(1);
        assert_eq!(t.failed(A, t2), Duration::ZERO);
    }

    #[test]
    fn success_forgets_and_zero_is_off() {
        let limits = Limits::new(10, 0, Duration::from_secs(5));
        for _ in 0..FREE_FAILURES {
            assert_eq!(limits.auth_failed(A), Duration::ZERO);
        }
        assert_eq!(limits.auth_failed(A), FIRST_DELAY);
        limits.auth_succeeded(A);
        assert_eq!(limits.auth_failed(A), Duration::ZERO);
        let off = Limits::new(10, 0, Duration::ZERO);
        for _ in 0..100 {
            assert_eq!(off.auth_failed(A), Duration::ZERO);
        }
    }

    #[test]
    fn memory_is_bounded() {
        let mut t = AuthFailures::new(Duration::from_secs(5));
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 1000) {
            let ip = IpAddr::V6(std::net::Ipv6Addr::from(u128::from(i) + 1));
            t.failed(ip, now + Duration::from_millis(u64::from(i)));
        }
        assert!(t.entries.len() <= MAX_TRACKED);
        // The newest are kept, the stalest went first.
        let newest = IpAddr::V6(std::net::Ipv6Addr::from(u128::from(
            MAX_TRACKED as u32 + 1000,
        )));
        assert!(t.entries.contains_key(&newest));
        assert!(
            !t.entries
                .contains_key(&IpAddr::V6(std::net::Ipv6Addr::from(1u128)))
        );
    }
}
