//! Check 1: reach the proxy and ask for a tunnel exactly as stunnel's `protocol = connect` client
//! does, then say what the answer means for a migration.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use base64::Engine as _;

use super::report::{Finding, Outcome};
use crate::proxy_url::ProxyUrl;

/// Name of this check in the report.
pub const CONNECT: &str = "connect";

/// Largest response head read from the proxy.
const MAX_HEAD: usize = 16 * 1024;

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of header `name`, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The request lines stunnel writes, one write each (stunnel's `fd_printf` per line), scheme
/// `basic` in lower case as stunnel sends it.
pub fn connect_lines(target: &str, url: &ProxyUrl) -> Vec<String> {
    let mut lines = vec![
        format!("CONNECT {target} HTTP/1.1\r\n"),
        format!("Host: {target}\r\n"),
    ];
    if let Some(user) = &url.user {
        let pass = url.password.as_deref().unwrap_or("");
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        lines.push(format!("Proxy-Authorization: basic {token}\r\n"));
    }
    lines.push("\r\n".into());
    lines
}

/// Opens a tunnel to `target` through the proxy. On a 2xx the stream is returned, ready for the
/// next checks; either way the finding says what happened.
pub fn connect(url: &ProxyUrl, target: &str, timeout: Duration) -> (Finding, Option<TcpStream>) {
    let proxy = url.authority();
    let fail = |outcome, why: String| (Finding::new(CONNECT, outcome, why), None);
    let addrs: Vec<_> = match proxy.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return fail(Outcome::Fail, format!("cannot resolve proxy {proxy}: {e}")),
    };
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(format!("{a}: {e}")),
        }
    }
    let Some(mut s) = stream else {
        return fail(
            Outcome::Fail,
            format!(
                "proxy {proxy} not reachable ({}): check the address, the port and any firewall \
                 between the cluster and the proxy",
                last.unwrap_or_else(|| "no address".into())
            ),
        );
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let _ = s.set_nodelay(true);
    for line in connect_lines(target, url) {
        if let Err(e) = s.write_all(line.as_bytes()) {
            return fail(
                Outcome::Fail,
                format!("proxy closed while sending CONNECT: {e}"),
            );
        }
    }
    let head = match read_head(&mut s, "the proxy", "CONNECT") {
        Ok(h) => h,
        Err(why) => return fail(Outcome::Fail, why),
    };
    let finding = classify(&head, target, url.user.is_some());
    let open = (finding.outcome == Outcome::Pass).then_some(s);
    (finding, open)
}

/// Reads up to the blank line, byte by byte so nothing after the head is consumed. `peer` and
/// `request` name who answers what, for the reasons (`the proxy`, `CONNECT`).
pub fn read_head(s: &mut impl Read, peer: &str, request: &str) -> Result<Head, String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") && !buf.ends_with(b"\n\n") {
        match s.read(&mut byte) {
            Ok(0) if buf.is_empty() => {
                return Err(format!(
                    "{peer} closed the connection without answering {request}"
                ));
            }
            Ok(0) => {
                return Err(format!(
                    "{peer} closed the connection in the middle of its answer"
                ));
            }
            Ok(_) => buf.push(byte[0]),
            Err(e) => return Err(format!("no answer to {request} from {peer}: {e}")),
        }
        if buf.len() > MAX_HEAD {
            return Err(format!("{peer}'s answer head is larger than 16 KiB"));
        }
    }
    parse_head(&buf).map_err(|e| format!("{peer}'s {e}"))
}

/// Parses a response head (status line and headers).
pub fn parse_head(raw: &[u8]) -> Result<Head, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(raw) {
        Ok(httparse::Status::Complete(_)) => Ok(Head {
            status: resp.code.unwrap_or(0),
            reason: resp.reason.unwrap_or("").to_string(),
            headers: resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).trim().to_string(),
                    )
                })
                .collect(),
        }),
        Ok(httparse::Status::Partial) => Err("answer head is incomplete".into()),
        Err(e) => Err(format!("answer is not HTTP ({e})")),
    }
}

/// What the proxy's answer to CONNECT means for stunnel.
pub fn classify(head: &Head, target: &str, sent_credentials: bool) -> Finding {
    let status = head.status;
    let line = format!("{status} {}", head.reason).trim().to_string();
    let proxy_status = head
        .all("Proxy-Status")
        .next()
        .map(|v| format!(" (Proxy-Status: {v})"))
        .unwrap_or_default();
    let (outcome, why) = match status {
        200..=299 => (
            Outcome::Pass,
            format!(
                "CONNECT {target} {} answered {line}",
                if sent_credentials {
                    "with basic credentials"
                } else {
                    "without credentials"
                }
            ),
        ),
        407 => (Outcome::Fail, auth_reason(head, sent_credentials)),
        403 => (
            Outcome::Fail,
            format!(
                "{line}{proxy_status}: the proxy does not allow tunnels to {target}; ask its \
                 owners to allow CONNECT to this host and port"
            ),
        ),
        500..=599 => (
            Outcome::Fail,
            format!(
                "{line}{proxy_status}: the proxy could not reach {target} (502 refused or \
                 unreachable, 503 overloaded or refused, 504 timed out); check the target from \
                 the proxy's side"
            ),
        ),
        _ => (
            Outcome::Fail,
            format!(
                "{line}{proxy_status}: stunnel needs a 2xx answer to CONNECT and gets this one \
                 instead"
            ),
        ),
    };
    Finding::new(CONNECT, outcome, why)
}

/// A 407: which schemes the proxy offers and whether stunnel can answer any of them.
fn auth_reason(head: &Head, sent_credentials: bool) -> String {
    let schemes: Vec<String> = head
        .all("Proxy-Authenticate")
        .filter_map(|v| v.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let basic = schemes.iter().any(|s| s.eq_ignore_ascii_case("basic"));
    let offered = if schemes.is_empty() {
        "no Proxy-Authenticate scheme".to_string()
    } else {
        format!("schemes offered: {}", schemes.join(", "))
    };
    if !basic {
        return format!(
            "407 ({offered}): stunnel only speaks Basic to a proxy, so an NTLM/Negotiate-only \
             proxy cannot serve a migration; ask for Basic auth or an allow rule for the \
             migration's source addresses"
        );
    }
    if sent_credentials {
        format!(
            "407 ({offered}): the proxy refused these credentials; check the user and password in \
             stunnel_tcp_proxy (percent-encode ':' '@' '%' in them)"
        )
    } else {
        format!("407 ({offered}): the proxy wants credentials; put user:pass@ in the URL")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head {
        parse_head(raw.as_bytes()).unwrap()
    }

    #[test]
    fn stunnel_lines_one_per_write_with_lower_case_basic() {
        let url = ProxyUrl::parse("http://mig:s3cr%3Aet@127.0.0.1:3128").unwrap();
        let lines = connect_lines("10.0.0.1:443", &url);
        assert_eq!(
            lines,
            [
                "CONNECT 10.0.0.1:443 HTTP/1.1\r\n",
                "Host: 10.0.0.1:443\r\n",
                "Proxy-Authorization: basic bWlnOnMzY3I6ZXQ=\r\n",
                "\r\n",
            ]
        );
        let anon = ProxyUrl::parse("http://127.0.0.1:3128").unwrap();
        assert_eq!(connect_lines("h:1", &anon).len(), 3);
    }

    #[test]
    fn any_2xx_passes_and_nothing_else() {
        let ok = classify(
            &head("HTTP/1.1 200 Connection established\r\n\r\n"),
            "t:1",
            true,
        );
        assert_eq!(ok.outcome, Outcome::Pass);
        assert!(
            ok.reason.contains("with basic credentials"),
            "{}",
            ok.reason
        );
        let other = classify(&head("HTTP/1.0 204 OK\r\n\r\n"), "t:1", false);
        assert_eq!(other.outcome, Outcome::Pass);
        assert!(
            other
                .reason
                .contains("t:1 without credentials answered 204"),
            "{}",
            other.reason
        );
        let redirect = classify(&head("HTTP/1.1 302 Found\r\n\r\n"), "t:1", true);
        assert_eq!(redirect.outcome, Outcome::Fail);
    }

    #[test]
    fn ntlm_only_proxy_is_named() {
        let h = head(
            "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\n\
             Proxy-Authenticate: Negotiate\r\n\r\n",
        );
        let f = classify(&h, "t:1", true);
        assert_eq!(f.outcome, Outcome::Fail);
        assert!(
            f.reason.contains("schemes offered: NTLM, Negotiate"),
            "{}",
            f.reason
        );
        assert!(f.reason.contains("cannot serve"));
    }

    #[test]
    fn wrong_credentials_against_basic() {
        let h = head("HTTP/1.1 407 X\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n");
        let f = classify(&h, "t:1", true);
        assert!(
            f.reason.contains("refused these credentials"),
            "{}",
            f.reason
        );
        let f = classify(&h, "t:1", false);
        assert!(f.reason.contains("wants credentials"), "{}", f.reason);
    }

    #[test]
    fn refusals_show_proxy_status() {
        let h = head(
            "HTTP/1.1 502 Bad Gateway\r\nProxy-Status: splice-proxy; error=connection_refused\r\n\r\n",
        );
        let f = classify(&h, "t:1", true);
        assert_eq!(f.outcome, Outcome::Fail);
        assert!(
            f.reason.starts_with(
                "502 Bad Gateway (Proxy-Status: splice-proxy; error=connection_refused)"
            )
        );
        let f = classify(&head("HTTP/1.1 403 Forbidden\r\n\r\n"), "t:1", true);
        assert!(f.reason.contains("does not allow tunnels to t:1"));
    }

    #[test]
    fn garbage_is_not_http() {
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
