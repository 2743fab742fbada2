//! Check 3 (`--api URL`): does an exec-style upgrade request reach the API server with its
//! `Upgrade` header? The migration controller's remote exec (rsync pods, stunnel checks) is such
//! a request; the API server answers `400 Upgrade request required` when `Connection: Upgrade`
//! did not arrive, which is what a proxy that terminates TLS and re-sends requests without
//! hop-by-hop headers (Squid in `ssl_bump bump` mode) causes.

use std::io::{Read, Write};
use std::time::Duration;

use super::checks::{self, Head};
use super::report::{Finding, Outcome};
use super::tls::{self, Ca, CaVerdict, Seen};
use crate::proxy_url::ProxyUrl;

/// Name of this check in the report.
pub const UPGRADE: &str = "upgrade";

/// What an exec of `true` in a pod looks like to the API server; the pod need not exist: the
/// Upgrade header is looked at before the pod is.
pub const EXEC_PATH: &str = "/api/v1/namespaces/default/pods/x/exec?command=true&stdout=true";

/// Most of an error body read to find the API server's words.
const MAX_BODY: usize = 4096;

/// `Sec-WebSocket-Key`: 16 bytes in base64, as RFC 6455 wants; the server only echoes a hash.
const WEBSOCKET_KEY: &str = "c3BsaWNlLXByb3h5LWRvYw==";

/// `--api`: where the API server listens, as CONNECT asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    /// A name or an address; an IPv6 literal without brackets.
    pub host: String,
    pub port: u16,
}

/// Why `--api` cannot be used (a usage error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "--api {0:?}: expected https://HOST[:PORT] (the API server's URL as in the kubeconfig; the \
     port defaults to 443)"
)]
pub struct ApiError(String);

impl ApiUrl {
    pub fn parse(s: &str) -> Result<ApiUrl, ApiError> {
        let bad = || ApiError(s.to_string());
        let rest = s
            .get(..8)
            .filter(|p| p.eq_ignore_ascii_case("https://"))
            .map(|_| &s[8..])
            .ok_or_else(bad)?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Err(bad());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 443,
            Some(p) => p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad)?,
        };
        if host.is_empty() || host.contains(':') != authority.starts_with('[') {
            return Err(bad());
        }
        Ok(ApiUrl {
            host: host.to_string(),
            port,
        })
    }

    /// `host:port` as CONNECT and `Host` carry it (IPv6 literals in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The two ways clients ask for an exec stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// client-go's SPDY executor (what MTC's controller uses).
    Spdy,
    /// The websocket executor (kubectl 1.30 and later).
    WebSocket,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::Spdy, Variant::WebSocket];

    fn name(self) -> &'static str {
        match self {
            Variant::Spdy => "SPDY/3.1",
            Variant::WebSocket => "websocket",
        }
    }
}

/// The exec request, as client-go sends it for `variant`.
pub fn request(variant: Variant, authority: &str) -> String {
    let upgrade = match variant {
        Variant::Spdy => {
            "Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n".to_string()
        }
        Variant::WebSocket => format!(
            "Upgrade: websocket\r\nSec-WebSocket-Key: {WEBSOCKET_KEY}\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n"
        ),
    };
    format!(
        "GET {EXEC_PATH} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: splice-proxy-doctor\r\n\
         Connection: Upgrade\r\n{upgrade}\r\n"
    )
}

/// What one answer says about the `Upgrade` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// The API server saw it (101), or refused the caller itself (401/403).
    Arrived(String),
    /// `400 Upgrade request required`: it was removed on the way.
    Stripped(String),
    /// Some other answer: the words say which.
    Unclear(String),
}

/// Sorts the API server's answer to one exec request.
pub fn classify_answer(head: &Head, body: &str) -> Heard {
    let line = format!("{} {}", head.status, head.reason)
        .trim()
        .to_string();
    match head.status {
        101 => Heard::Arrived(line),
        401 | 403 => Heard::Arrived(format!("{line} (the API server's own refusal)")),
        400 if body
            .to_ascii_lowercase()
            .contains("upgrade request required") =>
        {
            Heard::Stripped(format!("{line} \"Upgrade request required\""))
        }
        _ => Heard::Unclear(format!("{line}{}", said_why(head, body))),
    }
}

/// What an answer other than the API server's own says about itself: a proxy's error header
/// (`Proxy-Status`, Squid's `X-Squid-Error`), else the start of a plain-text body (an HTML error
/// page says nothing in 120 characters).
fn said_why(head: &Head, body: &str) -> String {
    let named: Vec<String> = ["Proxy-Status", "X-Squid-Error"]
        .iter()
        .filter_map(|h| head.all(h).next().map(|v| format!("{h}: {v}")))
        .collect();
    if !named.is_empty() {
        return format!(" ({})", named.join("; "));
    }
    let body = body.trim();
    if body.is_empty() || body.starts_with('<') {
        return String::new();
    }
    let snippet: String = body.chars().take(120).collect();
    format!(" {snippet:?}")
}

/// Adds the per-variant answers up to the check's line. `Err` is an exec request that could not
/// be asked or got no answer (CONNECT refused, TLS failed, silence). `cert` is what the TLS
/// handshake to the API server showed, for the reader.
pub fn verdict(api: &str, tries: &[(Variant, Result<Heard, String>)], cert: &str) -> Finding {
    let words: Vec<String> = tries
        .iter()
        .map(|(v, r)| {
            let said = match r {
                Ok(Heard::Arrived(s) | Heard::Stripped(s) | Heard::Unclear(s)) => s.as_str(),
                Err(e) => e.as_str(),
            };
            format!("{}: {said}", v.name())
        })
        .collect();
    let seen = words.join("; ");
    let stripped = tries
        .iter()
        .any(|(_, r)| matches!(r, Ok(Heard::Stripped(_))));
    let unasked = tries.iter().any(|(_, r)| r.is_err());
    let all_arrived = tries
        .iter()
        .all(|(_, r)| matches!(r, Ok(Heard::Arrived(_))));
    let (outcome, why) = if stripped {
        (
            Outcome::Fail,
            format!(
                "{seen}: the Upgrade header did not reach the API server {api}; something on \
                 the way (the proxy, when it intercepts TLS) removes it, and the migration \
                 controller's remote exec will fail with \"Upgrade request required\"; ask for \
                 TLS to the API server not to be inspected, or for Upgrade to be passed (Squid: \
                 http_upgrade_request_protocols)"
            ),
        )
    } else if unasked {
        (
            Outcome::Fail,
            format!("{seen}: the migration controller cannot reach the API server {api} this way"),
        )
    } else if all_arrived {
        (
            Outcome::Pass,
            format!("{seen}: exec upgrade requests reach the API server {api} with their headers"),
        )
    } else {
        (
            Outcome::CannotTell,
            format!(
                "{seen}: neither a 101 nor the API server's 400 \"Upgrade request required\"; is \
                 {api} a Kubernetes API server?"
            ),
        )
    };
    Finding::new(UPGRADE, outcome, format!("{why} ({cert})"))
}

/// The certificate the API server presented through the proxy, as a clause for the reason.
pub fn cert_words(seen: &Seen) -> String {
    let issuer = &seen.leaf.issuer;
    match &seen.ca {
        None => format!(
            "its certificate through the proxy is issued by {issuer}; not verified: no --ca"
        ),
        Some(CaVerdict::Chains | CaVerdict::ChainsBut(_)) => {
            format!("its certificate through the proxy chains to --ca, issuer {issuer}")
        }
        Some(CaVerdict::Untrusted(why)) => format!(
            "its certificate through the proxy is issued by {issuer} and {why}: the proxy may \
             intercept TLS to the API server, or --ca is not the API server's CA"
        ),
    }
}

/// Sends one exec request through the proxy and reads the answer.
fn ask(
    proxy: &ProxyUrl,
    api: &ApiUrl,
    variant: Variant,
    ca: Option<&Ca>,
    timeout: Duration,
) -> (Result<Heard, String>, Option<Seen>) {
    let authority = api.authority();
    let (connect, tunnel) = checks::connect(proxy, &authority, timeout);
    let Some(tcp) = tunnel else {
        return (
            Err(format!("CONNECT {authority}: {}", connect.reason)),
            None,
        );
    };
    let name = match tls::server_name(&authority) {
        Ok(n) => n,
        Err(e) => return (Err(e), None),
    };
    let (mut session, seen) = match tls::handshake(tcp, name, ca, &[b"http/1.1"]) {
        Ok(s) => s,
        Err(e) => {
            return (
                Err(format!("TLS to the API server through the proxy: {e}")),
                None,
            );
        }
    };
    let answer = (|| {
        session
            .write_all(request(variant, &authority).as_bytes())
            .map_err(|e| format!("sending the exec request: {e}"))?;
        let head = checks::read_head(&mut session, "the API server", "the exec request")?;
        let body = if head.status == 101 {
            String::new()
        } else {
            read_body(&mut session, &head)
        };
        Ok(classify_answer(&head, &body))
    })();
    (answer, Some(seen))
}

/// Up to [`MAX_BODY`] bytes of the body: as long as Content-Length says, or what arrives within
/// a second when it does not say.
fn read_body(session: &mut tls::Session, head: &Head) -> String {
    let length = head
        .all("Content-Length")
        .next()
        .and_then(|v| v.parse::<usize>().ok());
    if length.is_none() {
        let _ = session.sock.set_read_timeout(Some(Duration::from_secs(1)));
    }
    let want = length.unwrap_or(MAX_BODY).min(MAX_BODY);
    let mut body = Vec::new();
    // On an error (timeout, close without close_notify) what arrived before it is kept.
    let _ = session.take(want as u64).read_to_end(&mut body);
    String::from_utf8_lossy(&body).into_owned()
}

/// Runs check 3: each variant on a tunnel of its own (a 101 turns the connection into a stream).
pub fn check(proxy: &ProxyUrl, api: &ApiUrl, ca: Option<&Ca>, timeout: Duration) -> Finding {
    let mut tries = Vec::new();
    let mut cert = None;
    for variant in Variant::ALL {
        let (answer, seen) = ask(proxy, api, variant, ca, timeout);
        cert = cert.or(seen);
        tries.push((variant, answer));
    }
    let cert = cert.map_or_else(
        || "no TLS session with the API server".into(),
        |s| cert_words(&s),
    );
    verdict(&api.authority(), &tries, &cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head {
        checks::parse_head(raw.as_bytes()).unwrap()
    }

    #[test]
    fn api_urls() {
        let u = ApiUrl::parse("https://api.cluster.example:6443").unwrap();
        assert_eq!(u.authority(), "api.cluster.example:6443");
        let u = ApiUrl::parse("HTTPS://api.example/").unwrap();
        assert_eq!(u.authority(), "api.example:443");
        let u = ApiUrl::parse("https://[fd00::1]:6443/api").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority().as_str()),
            ("fd00::1", "[fd00::1]:6443")
        );
        for bad in [
            "http://api.example:6443",
            "api.example:6443",
            "https://",
            "https://api:0",
            "https://api:x",
            "https://fd00::1:6443",
            "https://u:p@api:6443",
        ] {
            assert!(ApiUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_carry_connection_and_upgrade() {
        let spdy = request(Variant::Spdy, "api:6443");
        assert!(spdy.starts_with(&format!("GET {EXEC_PATH} HTTP/1.1\r\nHost: api:6443\r\n")));
        assert!(spdy.contains("\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"));
        assert!(spdy.ends_with("\r\n\r\n"));
        let ws = request(Variant::WebSocket, "api:6443");
        assert!(ws.contains("\r\nUpgrade: websocket\r\n"));
        assert!(ws.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(ws.contains("\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n"));
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD
            .decode(WEBSOCKET_KEY)
            .unwrap();
        assert_eq!(key.len(), 16);
    }

    #[test]
    fn answers_are_sorted() {
        let h = head("HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n\r\n");
        assert_eq!(
            classify_answer(&h, ""),
            Heard::Arrived("101 Switching Protocols".into())
        );
        for s in ["401 Unauthorized", "403 Forbidden"] {
            let h = head(&format!("HTTP/1.1 {s}\r\n\r\n"));
            assert!(
                matches!(classify_answer(&h, "{}"), Heard::Arrived(_)),
                "{s}"
            );
        }
        let h = head("HTTP/1.1 400 Bad Request\r\nContent-Length: 25\r\n\r\n");
        assert!(matches!(
            classify_answer(&h, "Upgrade request required\n"),
            Heard::Stripped(_)
        ));
        assert_eq!(
            classify_answer(&h, "no such pod"),
            Heard::Unclear("400 Bad Request \"no such pod\"".into())
        );
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(classify_answer(&h, ""), Heard::Unclear("200 OK".into()));
        let h =
            head("HTTP/1.1 503 Service Unavailable\r\nX-Squid-Error: ERR_CONNECT_FAIL 111\r\n\r\n");
        assert_eq!(
            classify_answer(&h, "<!DOCTYPE html><html>..."),
            Heard::Unclear("503 Service Unavailable (X-Squid-Error: ERR_CONNECT_FAIL 111)".into())
        );
        let h = head("HTTP/1.1 502 Bad Gateway\r\n\r\n");
        assert_eq!(
            classify_answer(&h, "<html>"),
            Heard::Unclear("502 Bad Gateway".into())
        );
    }

    #[test]
    fn verdicts() {
        let arrived = || Ok(Heard::Arrived("101 Switching Protocols".into()));
        let stripped = || Ok(Heard::Stripped("400 Bad Request".into()));
        let unclear = || Ok(Heard::Unclear("404 Not Found".into()));
        let refused = || Err("CONNECT api:6443: 403 Forbidden".to_string());
        let judge = |spdy, websocket| {
            verdict(
                "api:6443",
                &[(Variant::Spdy, spdy), (Variant::WebSocket, websocket)],
                "c",
            )
        };
        let f = judge(arrived(), arrived());
        f.expect(
            Outcome::Pass,
            &["SPDY/3.1: 101 Switching Protocols; websocket: 101"],
        );
        assert!(f.reason.ends_with("(c)"), "{}", f.reason);
        judge(stripped(), arrived())
            .expect(Outcome::Fail, &["did not reach the API server api:6443"]);
        judge(unclear(), arrived()).expect(Outcome::CannotTell, &["SPDY/3.1: 404 Not Found"]);
        judge(refused(), unclear()).expect(Outcome::Fail, &["cannot reach the API server"]);
    }

    #[test]
    fn the_api_certificate_is_described() {
        let seen = |ca| Seen {
            leaf: tls::Leaf {
                der: vec![1],
                issuer: "CN=Squid CA".into(),
                subject: "CN=api".into(),
            },
            ca,
        };
        assert!(cert_words(&seen(None)).contains("issued by CN=Squid CA; not verified"));
        assert!(cert_words(&seen(Some(CaVerdict::Chains))).contains("chains to --ca"));
        let w = cert_words(&seen(Some(CaVerdict::Untrusted(
            "it does not chain to --ca".into(),
        ))));
        assert!(w.contains("may intercept TLS to the API server"), "{w}");
    }
}
