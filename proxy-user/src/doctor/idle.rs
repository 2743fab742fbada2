//! Check 4 (`--idle DUR`): does a tunnel stay open through DUR of silence and still carry bytes
//! after it? A migration's rsync can be silent for minutes (scanning a large volume) with its
//! stunnel session open, and a proxy that cuts quiet tunnels breaks it. (With it, for
//! information, `half_close`.)
//!
//! The silence comes after a TLS handshake with the target, where a migration's silences are:
//! before the handshake a stunnel server waits only `TIMEOUTbusy` (300 s by default, then it
//! resets), so a long silence there would be cut by the target, not by the proxy. While silent,
//! doctor waits on the socket, so a cut (FIN or RST) is seen when it comes. After the silence it
//! sends TLS close_notify, which a TLS server answers with its own as it ends the session (a
//! stunnel server does once its backend, rsyncd, has closed): that answer, authenticated by the
//! session's keys, proves that bytes still pass both ways. When it does not come, a fresh
//! tunnel without the silence tells a tunnel dropped quietly from a target that never answers.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use rustls::ClientConnection;

use super::checks;
use super::report::{Finding, Outcome};
use super::tls::{self, Session};
use crate::proxy_url::ProxyUrl;

/// Name of this check in the report.
pub const IDLE: &str = "idle";

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// read() returned 0: an orderly close.
    Fin,
    /// ECONNRESET (or ECONNABORTED, EPIPE): a reset.
    Rst,
    /// Another socket error.
    Error(String),
}

impl Close {
    /// Sorts a socket error; `None` for a read timeout (nothing happened).
    pub fn of(e: &io::Error) -> Option<Close> {
        use io::ErrorKind as K;
        match e.kind() {
            K::WouldBlock | K::TimedOut | K::Interrupted => None,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Some(Close::Rst),
            _ => Some(Close::Error(e.to_string())),
        }
    }

    pub fn words(&self) -> String {
        match self {
            Close::Fin => "a FIN".into(),
            Close::Rst => "an RST".into(),
            Close::Error(e) => format!("a socket error ({e})"),
        }
    }
}

/// A duration as a person reads it: `2.0 s`, `4 min 30 s`, `2 h 5 min`.
pub fn span(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{:.1} s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, s % 3600 / 60)
    }
}

/// What happened while the tunnel was quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Silence {
    /// Nothing ended it.
    Kept,
    /// The connection closed after `after` of silence: the proxy's cut, or one behind it.
    Cut { after: Duration, how: Close },
    /// The target ended its TLS session itself (its close_notify arrived) after `after`.
    TargetClosed { after: Duration },
    /// Bytes that are not the target's TLS arrived after `after`.
    NotTls { after: Duration, what: String },
}

/// Application data the target sent on its own during the silence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chatter {
    pub bytes: u64,
    /// When the last of it came, from the start of the silence.
    pub last: Option<Duration>,
}

/// What came back after the silence, once doctor spoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The target answered; the words say with what.
    Answered(String),
    /// The connection closed with no answer.
    Closed(Close),
    /// Nothing within the timeout.
    Nothing,
    /// Bytes that are not the target's TLS.
    NotTls(String),
}

/// Feeds what `read_tls` took to rustls: the application data it held (dropped) and whether the
/// target's close_notify was among it.
fn drain(conn: &mut ClientConnection) -> Result<(u64, bool), String> {
    conn.process_new_packets().map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4096];
    let mut bytes = 0;
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => return Ok((bytes, true)),
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((bytes, false)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// One read of TLS records from the socket, waiting at most `wait`.
enum Event {
    /// Records that rustls accepted: application bytes, and whether close_notify came.
    Records(u64, bool),
    Closed(Close),
    Quiet,
    NotTls(String),
}

fn next_event(s: &mut Session, wait: Duration) -> Event {
    let _ = s
        .sock
        .set_read_timeout(Some(wait.max(Duration::from_millis(1))));
    match s.conn.read_tls(&mut s.sock) {
        Ok(0) => Event::Closed(Close::Fin),
        Ok(_) => match drain(&mut s.conn) {
            Ok((bytes, closed)) => Event::Records(bytes, closed),
            Err(e) => Event::NotTls(e),
        },
        Err(e) => Close::of(&e).map_or(Event::Quiet, Event::Closed),
    }
}

/// Keeps the tunnel silent for `idle`, watching for its end the whole time.
pub fn wait_quietly(s: &mut Session, idle: Duration) -> (Silence, Chatter) {
    let start = Instant::now();
    let mut chatter = Chatter::default();
    loop {
        let left = idle.saturating_sub(start.elapsed());
        if left.is_zero() {
            return (Silence::Kept, chatter);
        }
        let event = next_event(s, left);
        let after = start.elapsed();
        let silence = match event {
            Event::Quiet => continue,
            Event::Records(bytes, closed) => {
                if bytes > 0 {
                    chatter.bytes += bytes;
                    chatter.last = Some(after);
                }
                if !closed {
                    continue;
                }
                Silence::TargetClosed { after }
            }
            Event::Closed(how) => Silence::Cut { after, how },
            Event::NotTls(what) => Silence::NotTls { after, what },
        };
        return (silence, chatter);
    }
}

/// Sends close_notify and waits up to `timeout` for the target's answer.
pub fn probe(s: &mut Session, timeout: Duration) -> Probe {
    s.conn.send_close_notify();
    while s.conn.wants_write() {
        if let Err(e) = s.conn.write_tls(&mut s.sock) {
            return Probe::Closed(Close::of(&e).unwrap_or(Close::Error(e.to_string())));
        }
    }
    let start = Instant::now();
    let mut data = 0u64;
    let answered = |data: u64, closed: bool| {
        let mut what = Vec::new();
        if data > 0 {
            what.push(format!("{data} bytes of the target's data"));
        }
        if closed {
            what.push("the target's close_notify".to_string());
        }
        Probe::Answered(what.join(" and "))
    };
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return if data > 0 {
                answered(data, false)
            } else {
                Probe::Nothing
            };
        }
        match next_event(s, left) {
            Event::Quiet => {}
            Event::Records(bytes, closed) => {
                data += bytes;
                if closed {
                    return answered(data, true);
                }
            }
            Event::Closed(_) if data > 0 => return answered(data, false),
            Event::Closed(how) => return Probe::Closed(how),
            Event::NotTls(what) => return Probe::NotTls(what),
        }
    }
}

/// A fresh TLS session to the target through the proxy.
fn session(url: &ProxyUrl, target: &str, timeout: Duration) -> Result<Session, String> {
    let (connect, tunnel) = checks::connect(url, target, timeout);
    let tcp = tunnel.ok_or_else(|| {
        format!(
            "no tunnel to the target ({}: {})",
            connect.check, connect.reason
        )
    })?;
    let name = tls::server_name(target)?;
    tls::handshake(tcp, name, None, &[])
        .map(|(s, _)| s)
        .map_err(|e| format!("no TLS handshake with {target} through the proxy: {e}"))
}

/// Runs check 4's idle line; and whether the target completed a TLS handshake through the
/// proxy (the half-close line needs a target that answers a ClientHello).
pub fn check(url: &ProxyUrl, target: &str, idle: Duration, timeout: Duration) -> (Finding, bool) {
    let mut s = match session(url, target, timeout) {
        Ok(s) => s,
        Err(why) => {
            let why = format!(
                "not run: {why}; this check needs --target to be the migration's TLS endpoint"
            );
            return (Finding::new(IDLE, Outcome::CannotTell, why), false);
        }
    };
    let (silence, chatter) = wait_quietly(&mut s, idle);
    let answer = (silence == Silence::Kept).then(|| probe(&mut s, timeout));
    drop(s);
    // Only when the answer did not come: does the target answer close_notify at all?
    let control = match &answer {
        Some(Probe::Answered(_)) | None => None,
        Some(_) => session(url, target, timeout)
            .ok()
            .map(|mut s| matches!(probe(&mut s, timeout), Probe::Answered(_))),
    };
    (
        verdict(idle, &silence, answer.as_ref(), control, chatter),
        true,
    )
}

/// Advice on a cut: who to ask, and what would not help.
const ASK_OWNERS: &str = "ask the proxy's owners to let CONNECT tunnels stay quiet longer than \
     a migration's longest silence (squid: read_timeout, 15 minutes by default; tinyproxy: \
     Timeout), or the route's owners if the cut is theirs (OpenShift router: the \
     haproxy.router.openshift.io/timeout-tunnel annotation). TCP keepalive in stunnel would not \
     help: its probes carry no data, and a proxy times out on data";

/// The idle line from what was seen. `control`: whether the target answers close_notify on a
/// fresh tunnel (asked only when it did not after the silence).
pub fn verdict(
    idle: Duration,
    silence: &Silence,
    probe: Option<&Probe>,
    control: Option<bool>,
    chatter: Chatter,
) -> Finding {
    let quiet = span(idle);
    let (outcome, mut why) = match (silence, probe) {
        (Silence::Cut { after, how }, _) => (
            Outcome::Fail,
            format!(
                "idle cut: the tunnel was closed after {} of silence (the client saw {}), \
                 sooner than the {quiet} of --idle; a migration's rsync can be silent for \
                 minutes and stunnel's session would be cut under it; {ASK_OWNERS}",
                span(*after),
                how.words()
            ),
        ),
        (Silence::TargetClosed { after }, _) => (
            Outcome::CannotTell,
            format!(
                "the target itself ended the TLS session after {} of silence (its close_notify \
                 came through the proxy): a timeout of the target's (stunnel's TIMEOUTidle, or \
                 its backend's), not the proxy's; run with a shorter --idle to test the proxy",
                span(*after)
            ),
        ),
        (Silence::NotTls { after, what }, _) => (
            Outcome::Fail,
            format!(
                "after {} of silence bytes that are not the target's TLS arrived ({what}): \
                 something on the way writes into quiet tunnels, and stunnel's session would \
                 fail",
                span(*after)
            ),
        ),
        (Silence::Kept, Some(Probe::Answered(what))) => (
            Outcome::Pass,
            format!(
                "the tunnel stayed open through {quiet} of silence after the TLS handshake and \
                 carried bytes afterwards: doctor's close_notify went through and {what} came \
                 back"
            ),
        ),
        (Silence::Kept, Some(Probe::NotTls(what))) => (
            Outcome::Fail,
            format!(
                "after {quiet} of silence the answer was not the target's TLS ({what}): \
                 something on the way broke the quiet tunnel, and stunnel's session would fail"
            ),
        ),
        (Silence::Kept, probe) => {
            let after = match probe {
                Some(Probe::Closed(how)) => format!("the tunnel closed with {}", how.words()),
                _ => "nothing came back".into(),
            };
            if control == Some(true) {
                (
                    Outcome::Fail,
                    format!(
                        "no close during {quiet} of silence, but afterwards the target did not \
                         answer close_notify ({after}), while on a fresh tunnel it answers at \
                         once: something on the way dropped the quiet tunnel without closing \
                         it (a firewall's or NAT's idle timeout); TCP keepalive more frequent \
                         than that timeout keeps such state where it is on the path (stunnel \
                         client, toward the proxy: socket = r:SO_KEEPALIVE=1 and \
                         socket = r:TCP_KEEPIDLE=SECONDS), or ask the proxy's owners"
                    ),
                )
            } else {
                (
                    Outcome::CannotTell,
                    format!(
                        "no close during {quiet} of silence, but afterwards the target did not \
                         answer close_notify ({after}), {}: doctor cannot prove the tunnel still \
                         carries bytes",
                        if control == Some(false) {
                            "nor does it on a fresh tunnel without silence"
                        } else {
                            "and no fresh tunnel could be opened to compare"
                        }
                    ),
                )
            }
        }
    };
    if let Some(last) = chatter.last.filter(|l| *l >= Duration::from_secs(1)) {
        why.push_str(&format!(
            " (the target itself sent {} bytes during the silence, the last after {}: a proxy \
             counts them as traffic)",
            chatter.bytes,
            span(last)
        ));
    }
    Finding::new(IDLE, outcome, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S4: Duration = Duration::from_secs(4);

    fn judge(silence: Silence, probe: Option<Probe>, control: Option<bool>) -> Finding {
        verdict(S4, &silence, probe.as_ref(), control, Chatter::default())
    }

    #[test]
    fn spans_read_like_people_write_them() {
        assert_eq!(span(Duration::from_millis(2040)), "2.0 s");
        assert_eq!(span(Duration::from_millis(250)), "0.2 s");
        assert_eq!(span(Duration::from_secs(270)), "4 min 30 s");
        assert_eq!(span(Duration::from_secs(7500)), "2 h 5 min");
    }

    #[test]
    fn socket_errors_are_sorted() {
        use io::ErrorKind as K;
        assert_eq!(Close::of(&K::WouldBlock.into()), None);
        assert_eq!(Close::of(&K::TimedOut.into()), None);
        assert_eq!(Close::of(&K::ConnectionReset.into()), Some(Close::Rst));
        assert_eq!(Close::of(&K::BrokenPipe.into()), Some(Close::Rst));
        assert!(matches!(
            Close::of(&K::PermissionDenied.into()),
            Some(Close::Error(_))
        ));
    }

    #[test]
    fn a_cut_before_the_silence_ends_fails_with_its_time_and_kind() {
        let cut = Silence::Cut {
            after: Duration::from_millis(2010),
            how: Close::Fin,
        };
        judge(cut, None, None).expect(
            Outcome::Fail,
            &[
                "closed after 2.0 s of silence (the client saw a FIN)",
                "sooner than the 4.0 s of --idle",
                "squid: read_timeout",
                "tinyproxy: Timeout",
                "keepalive in stunnel would not help",
            ],
        );
        let reset = Silence::Cut {
            after: Duration::from_secs(3),
            how: Close::Rst,
        };
        judge(reset, None, None).expect(Outcome::Fail, &["after 3.0 s", "an RST"]);
    }

    #[test]
    fn an_answer_after_the_silence_passes() {
        let f = judge(
            Silence::Kept,
            Some(Probe::Answered("the target's close_notify".into())),
            None,
        );
        f.expect(
            Outcome::Pass,
            &["open through 4.0 s of silence", "close_notify came back"],
        );
    }

    #[test]
    fn no_answer_is_a_silent_drop_only_when_a_fresh_tunnel_answers() {
        let closed = || Some(Probe::Closed(Close::Rst));
        judge(Silence::Kept, closed(), Some(true)).expect(
            Outcome::Fail,
            &["an RST", "dropped the quiet tunnel", "r:SO_KEEPALIVE=1"],
        );
        judge(Silence::Kept, closed(), Some(false))
            .expect(Outcome::CannotTell, &["nor does it on a fresh tunnel"]);
        judge(Silence::Kept, Some(Probe::Nothing), None).expect(
            Outcome::CannotTell,
            &["nothing came back", "no fresh tunnel"],
        );
    }

    #[test]
    fn the_target_closing_is_not_the_proxys_cut() {
        let closed = Silence::TargetClosed {
            after: Duration::from_secs(1),
        };
        judge(closed, None, None).expect(Outcome::CannotTell, &["the target itself ended"]);
        let junk = Silence::NotTls {
            after: Duration::from_secs(2),
            what: "received corrupt message".into(),
        };
        judge(junk, None, None).expect(Outcome::Fail, &["not the target's TLS"]);
    }

    #[test]
    fn the_targets_own_late_bytes_are_mentioned() {
        let probe = Probe::Answered("x".into());
        let early = Chatter {
            bytes: 14,
            last: Some(Duration::from_millis(20)),
        };
        let f = verdict(S4, &Silence::Kept, Some(&probe), None, early);
        assert!(!f.reason.contains("itself sent"), "{}", f.reason);
        let late = Chatter {
            bytes: 30,
            last: Some(Duration::from_secs(2)),
        };
        let f = verdict(S4, &Silence::Kept, Some(&probe), None, late);
        f.expect(
            Outcome::Pass,
            &["sent 30 bytes during the silence, the last after 2.0 s"],
        );
    }
}
