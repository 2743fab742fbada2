//! TCP keepalive on both sockets of every tunnel (`--tcp-keepalive`).
//!
//! A peer that vanished without a FIN or a reset (its node gone, NAT state lost) leaves a quiet
//! tunnel open for ever: nothing is sent, so nothing fails. With keepalive the kernel probes a
//! socket after `idle` of silence, every `interval`, and fails it with `ETIMEDOUT` after `count`
//! unanswered probes; the data path then sees the error and ends the tunnel. A quiet tunnel whose
//! peers are alive answers the probes and is never cut (`--idle-timeout` stays off by default).
//! The options live on the sockets themselves, so every data path keeps them, sockmap included.

use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::duration::parse_duration;

/// The kernel takes whole seconds for the idle time and the interval, at most this many
/// (`MAX_TCP_KEEPIDLE`, `MAX_TCP_KEEPINTVL`).
const MAX_SECS: u64 = 32_767;
/// The kernel's most probes (`MAX_TCP_KEEPCNT`).
const MAX_COUNT: u32 = 127;

/// When to probe a silent peer, and how many unanswered probes make it dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes after which the socket fails.
    pub count: u32,
}

impl Keepalive {
    /// The default: a vanished peer is found two minutes after the tunnel went quiet (60 s, then
    /// four probes 15 s apart), well inside what squid (15 min) or a NAT table keeps.
    pub const DEFAULT: Keepalive = Keepalive {
        idle: Duration::from_secs(60),
        interval: Duration::from_secs(15),
        count: 4,
    };

    /// `IDLE,INTERVAL,COUNT` (e.g. `60s,15s,4`), `IDLE` alone (the default interval and count),
    /// or `off`. Durations are whole seconds, 1 s to 32767 s; the count is 1 to 127.
    pub fn parse(s: &str) -> Result<Option<Keepalive>, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.len() != 1 && parts.len() != 3 {
            return Err(format!(
                "expected IDLE,INTERVAL,COUNT (e.g. 60s,15s,4), IDLE alone, or off: {s:?}"
            ));
        }
        let mut ka = Keepalive::DEFAULT;
        ka.idle = whole_seconds("IDLE", parts[0])?;
        if parts.len() == 3 {
            ka.interval = whole_seconds("INTERVAL", parts[1])?;
            ka.count = match parts[2].parse::<u32>() {
                Ok(n) if (1..=MAX_COUNT).contains(&n) => n,
                _ => {
                    return Err(format!(
                        "COUNT must be a number of probes from 1 to {MAX_COUNT}: {:?}",
                        parts[2]
                    ));
                }
            };
        }
        Ok(Some(ka))
    }

    /// How long a peer may stay silent before its socket fails: the idle time and every probe.
    pub fn dead_after(&self) -> Duration {
        self.idle + self.interval * self.count
    }

    /// Turns keepalive on for `sock` with these timings.
    pub fn apply(&self, sock: &impl AsFd) -> io::Result<()> {
        let params = TcpKeepalive::new()
            .with_time(self.idle)
            .with_interval(self.interval)
            .with_retries(self.count);
        SockRef::from(sock).set_tcp_keepalive(&params)
    }
}

impl fmt::Display for Keepalive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}s,{}s,{}",
            self.idle.as_secs(),
            self.interval.as_secs(),
            self.count
        )
    }
}

/// A duration the kernel can take: whole seconds from 1 to [`MAX_SECS`].
fn whole_seconds(what: &str, s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| format!("{what}: {e}"))?;
    if d.subsec_nanos() != 0 || !(1..=MAX_SECS).contains(&d.as_secs()) {
        return Err(format!(
            "{what} must be whole seconds from 1s to {MAX_SECS}s (the kernel counts in seconds): {s:?}"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn full_form_idle_alone_and_off() {
        assert_eq!(
            Keepalive::parse("30s,5s,3").unwrap(),
            Some(Keepalive {
                idle: secs(30),
                interval: secs(5),
                count: 3
            })
        );
        assert_eq!(
            Keepalive::parse("2m").unwrap(),
            Some(Keepalive {
                idle: secs(120),
                ..Keepalive::DEFAULT
            })
        );
        assert_eq!(Keepalive::parse(" 1, 1 ,1 ").unwrap().unwrap().count, 1);
        assert_eq!(Keepalive::parse("off").unwrap(), None);
        assert_eq!(Keepalive::parse("OFF").unwrap(), None);
    }

    #[test]
    fn the_default_round_trips_and_finds_a_dead_peer_in_two_minutes() {
        let text = Keepalive::DEFAULT.to_string();
        assert_eq!(text, "60s,15s,4");
        assert_eq!(Keepalive::parse(&text).unwrap(), Some(Keepalive::DEFAULT));
        assert_eq!(Keepalive::DEFAULT.dead_after(), secs(120));
    }

    #[test]
    fn what_the_kernel_cannot_take_is_refused_with_the_part_named() {
        for (input, needle) in [
            ("500ms,1s,1", "IDLE must be whole seconds"),
            ("1500ms", "IDLE must be whole seconds"),
            ("0s", "IDLE must be whole seconds"),
            ("10h", "IDLE must be whole seconds"),
            ("1s,0,3", "INTERVAL must be whole seconds"),
            ("1s,1s,0", "COUNT must be"),
            ("1s,1s,128", "COUNT must be"),
            ("1s,1s,many", "COUNT must be"),
            ("1s,1s", "expected IDLE,INTERVAL,COUNT"),
            ("1s,1s,1,1", "expected IDLE,INTERVAL,COUNT"),
            ("soon", "IDLE: expected a duration"),
            ("", "IDLE: expected a duration"),
        ] {
            let err = Keepalive::parse(input).unwrap_err();
            assert!(err.contains(needle), "{input:?}: {err}");
        }
    }

    #[test]
    fn applied_options_are_what_the_socket_reports() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let ka = Keepalive::parse("7s,3s,5").unwrap().unwrap();
        ka.apply(&s).unwrap();
        let sock = SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), secs(7));
        assert_eq!(sock.keepalive_interval().unwrap(), secs(3));
        assert_eq!(sock.keepalive_retries().unwrap(), 5);
    }
}
