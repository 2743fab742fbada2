//! Check 4's second line, informational: does the proxy honour half-close? On a fresh tunnel the
//! client sends a ClientHello and at once shuts down its sending side (FIN); a proxy that honours
//! half-close still brings the target's answer back, one that closes both ways on the client's
//! FIN does not. The answer and the FIN race inside the proxy (the answer can beat the FIN to
//! it), so the ClientHello and the FIN leave in one segment (TCP_CORK), and the try is made up to
//! [`TRIES`] times: one close without an answer shows the proxy does not honour it.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use super::checks;
use super::idle::{Close, span};
use super::report::{Finding, Outcome};
use super::tls;
use crate::proxy_url::ProxyUrl;

/// Name of this check in the report.
pub const HALF_CLOSE: &str = "half-close";

/// Most tries before half-close is said to be honoured.
pub const TRIES: usize = 3;

/// What came back after a ClientHello and the client's FIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFin {
    /// A TLS record from the target: its ServerHello (or HelloRetryRequest), or an alert.
    Answer(&'static str),
    /// The tunnel closed, `after` the FIN, with nothing.
    Closed {
        after: Duration,
        how: Close,
    },
    Nothing,
    /// Bytes that do not start a TLS record: their first ones.
    NotTls(Vec<u8>),
}

/// What the first bytes of an answer to a ClientHello are: a TLS record header (type, then
/// version 3.x) is the target's answer; a proxy that did not pass it has nothing to send.
pub fn answer_to_hello(first: &[u8]) -> AfterFin {
    match first {
        [0x16, 0x03, ..] => AfterFin::Answer("the target's ServerHello"),
        [0x15, 0x03, ..] => AfterFin::Answer("the target's TLS alert"),
        _ => AfterFin::NotTls(first.to_vec()),
    }
}

/// One try on a fresh tunnel.
fn after_fin(url: &ProxyUrl, target: &str, timeout: Duration) -> Result<AfterFin, String> {
    let (connect, tunnel) = checks::connect(url, target, timeout);
    let mut tcp: TcpStream = tunnel.ok_or(connect.reason)?;
    let mut conn = tls::client(tls::server_name(target)?)?;
    // Held back until the shutdown, which sends it with the FIN.
    let _ = socket2::SockRef::from(&tcp).set_cork(true);
    while conn.wants_write() {
        conn.write_tls(&mut tcp)
            .map_err(|e| format!("sending a ClientHello: {e}"))?;
    }
    tcp.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutting down the sending side: {e}"))?;
    let start = Instant::now();
    let _ = tcp.set_read_timeout(Some(timeout));
    // A record header's type and version.
    let mut first = [0u8; 2];
    let mut got = 0;
    while got < first.len() {
        match tcp.read(&mut first[got..]) {
            Ok(0) if got == 0 => {
                let after = start.elapsed();
                return Ok(AfterFin::Closed {
                    after,
                    how: Close::Fin,
                });
            }
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => match Close::of(&e) {
                None if got == 0 => return Ok(AfterFin::Nothing),
                Some(how) if got == 0 => {
                    let after = start.elapsed();
                    return Ok(AfterFin::Closed { after, how });
                }
                _ => break,
            },
        }
    }
    Ok(answer_to_hello(&first[..got]))
}

/// The line from the tries made: all answered, or the last one did not.
pub fn verdict(tries: &[Result<AfterFin, String>], timeout: Duration) -> Finding {
    let sent = "the client sent a ClientHello and at once shut down its sending side (FIN)";
    let n = tries.len();
    let answers: Vec<&str> = tries
        .iter()
        .filter_map(|t| match t {
            Ok(AfterFin::Answer(what)) => Some(*what),
            _ => None,
        })
        .collect();
    let (outcome, why) = match tries.last() {
        _ if answers.len() == n && n > 0 => (
            Outcome::Pass,
            format!(
                "honoured: {n} times {sent}, and each time {} still came back",
                answers[0]
            ),
        ),
        Some(Ok(AfterFin::Closed { after, how })) => (
            Outcome::Info,
            format!(
                "not honoured: {sent}, and {} ms later the tunnel closed with {} instead of \
                 bringing the target's ServerHello{}: the proxy closes both ways on a client's \
                 FIN (informational: it matters only to a client that half-closes and waits \
                 for an answer)",
                after.as_millis(),
                how.words(),
                if n > 1 {
                    format!(" (try {n}: in the ones before, the answer beat the FIN)")
                } else {
                    String::new()
                }
            ),
        ),
        Some(Ok(AfterFin::Nothing)) => (
            Outcome::CannotTell,
            format!(
                "{sent}, and within {} neither an answer nor a close came",
                span(timeout)
            ),
        ),
        Some(Ok(AfterFin::NotTls(first))) => (
            Outcome::CannotTell,
            format!(
                "{sent}, and what came back is not a TLS record (it starts {first:02x?}): is \
                 --target the migration's TLS endpoint?"
            ),
        ),
        Some(Err(e)) => (Outcome::CannotTell, format!("not run: {e}")),
        // Tries stop at the first one without an answer, so none is left here.
        Some(Ok(AfterFin::Answer(_))) | None => (Outcome::CannotTell, "not run".into()),
    };
    Finding::new(HALF_CLOSE, outcome, why)
}

/// Runs the half-close line: up to [`TRIES`] tries, stopping at the first without an answer.
pub fn check(url: &ProxyUrl, target: &str, timeout: Duration) -> Finding {
    let mut tries = Vec::new();
    while tries.len() < TRIES {
        let t = after_fin(url, target, timeout);
        let answered = matches!(t, Ok(AfterFin::Answer(_)));
        tries.push(t);
        if !answered {
            break;
        }
    }
    verdict(&tries, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn only_a_tls_record_answers_a_client_hello() {
        assert_eq!(
            answer_to_hello(&[0x16, 0x03]),
            AfterFin::Answer("the target's ServerHello")
        );
        assert_eq!(
            answer_to_hello(&[0x15, 0x03]),
            AfterFin::Answer("the target's TLS alert")
        );
        assert_eq!(answer_to_hello(b"HT"), AfterFin::NotTls(b"HT".to_vec()));
        assert_eq!(answer_to_hello(&[0x16]), AfterFin::NotTls(vec![0x16]));
    }

    fn answer() -> Result<AfterFin, String> {
        Ok(AfterFin::Answer("the target's ServerHello"))
    }

    fn closed() -> Result<AfterFin, String> {
        Ok(AfterFin::Closed {
            after: Duration::from_millis(3),
            how: Close::Fin,
        })
    }

    #[test]
    fn every_try_answered_is_honoured() {
        verdict(&[answer(), answer(), answer()], T).expect(
            Outcome::Pass,
            &[
                "honoured: 3 times",
                "each time the target's ServerHello still came back",
            ],
        );
    }

    #[test]
    fn one_close_without_an_answer_is_not_honoured_and_no_failure() {
        verdict(&[closed()], T).expect(
            Outcome::Info,
            &[
                "not honoured",
                "3 ms later the tunnel closed with a FIN",
                "informational",
            ],
        );
        let f = verdict(&[answer(), answer(), closed()], T);
        f.expect(
            Outcome::Info,
            &["(try 3: in the ones before, the answer beat the FIN)"],
        );
        assert!(!verdict(&[closed()], T).reason.contains("try 1"));
    }

    #[test]
    fn anything_else_cannot_tell() {
        verdict(&[Ok(AfterFin::Nothing)], T).expect(
            Outcome::CannotTell,
            &["within 5.0 s neither an answer nor a close"],
        );
        verdict(&[answer(), Ok(AfterFin::NotTls(b"HT".to_vec()))], T).expect(
            Outcome::CannotTell,
            &["not a TLS record (it starts [48, 54]"],
        );
        verdict(&[Err("403 Forbidden".into())], T)
            .expect(Outcome::CannotTell, &["not run: 403 Forbidden"]);
    }
}
