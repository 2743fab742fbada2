//! `PROXY_URL` as MTC's `stunnel_tcp_proxy` holds it: `http://user:pass@host:port`, parsed the way
//! MTC parses it (Go's `url.Parse`: the user and password percent-decoded, the port required).
//! `doctor` reads its proxy this way, and `run --parent-proxy` its parent: one URL, written
//! alike in both places.

use std::fmt;

/// A proxy URL split into what stunnel's client section gets.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Host as it is connected to: a name, an IPv4 literal, or an IPv6 literal without brackets.
    pub host: String,
    pub port: u16,
    /// Decoded user name; `None` when the URL has no userinfo (stunnel then sends no
    /// `Proxy-Authorization`).
    pub user: Option<String>,
    /// Decoded password. Never printed: [`ProxyUrl`]'s `Display` leaves it out.
    pub password: Option<String>,
}

/// Why a URL cannot be used; each message says what to write instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("PROXY_URL must start with http:// (stunnel speaks plain HTTP CONNECT to the proxy)")]
    Scheme,
    #[error("PROXY_URL has no host")]
    NoHost,
    #[error(
        "PROXY_URL has no port: MTC writes `connect = {0}:` into stunnel's configuration and \
         stunnel fails to start; write the port, e.g. http://...@{0}:3128"
    )]
    NoPort(String),
    #[error("PROXY_URL port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
    #[error("PROXY_URL has an unclosed IPv6 bracket")]
    Bracket,
    #[error("PROXY_URL has a bad percent escape in the {0}: encode `%` as %25")]
    Escape(&'static str),
    #[error("PROXY_URL has a path or query after the port; MTC ignores it, remove it")]
    Path,
}

impl ProxyUrl {
    pub fn parse(s: &str) -> Result<ProxyUrl, UrlError> {
        let rest = strip_prefix_ignore_case(s, "http://").ok_or(UrlError::Scheme)?;
        // As Go: the authority ends at the first '/', '?' or '#'; userinfo ends at the last '@'.
        let (authority, tail) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if !(tail.is_empty() || tail == "/") {
            return Err(UrlError::Path);
        }
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(ui) => match ui.split_once(':') {
                Some((u, p)) => (
                    Some(decode(u).ok_or(UrlError::Escape("user"))?),
                    Some(decode(p).ok_or(UrlError::Escape("password"))?),
                ),
                None => (Some(decode(ui).ok_or(UrlError::Escape("user"))?), None),
            },
        };
        let (host, port) = split_host_port(hostport)?;
        if host.is_empty() {
            return Err(UrlError::NoHost);
        }
        let port = match port {
            None | Some("") => return Err(UrlError::NoPort(bracket(host))),
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(UrlError::BadPort(p.to_string())),
            },
        };
        Ok(ProxyUrl {
            host: host.to_string(),
            port,
            user,
            password,
        })
    }

    /// `host:port` with IPv6 literals bracketed, as a socket address string.
    pub fn authority(&self) -> String {
        format!("{}:{}", bracket(&self.host), self.port)
    }
}

impl fmt::Display for ProxyUrl {
    /// The URL with the password masked: safe for any output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.user, &self.password) {
            (Some(u), Some(_)) => write!(f, "http://{u}:***@{}", self.authority()),
            (Some(u), None) => write!(f, "http://{u}@{}", self.authority()),
            _ => write!(f, "http://{}", self.authority()),
        }
    }
}

impl fmt::Debug for ProxyUrl {
    /// Same as `Display`: a debug print must not leak the password either.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `host[:port]` or `[v6][:port]`; the port is `None` when there is no colon.
fn split_host_port(hp: &str) -> Result<(&str, Option<&str>), UrlError> {
    if let Some(inner) = hp.strip_prefix('[') {
        let end = inner.find(']').ok_or(UrlError::Bracket)?;
        let after = &inner[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(UrlError::Bracket),
        };
        return Ok((&inner[..end], port));
    }
    Ok(match hp.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hp, None),
    })
}

/// Percent-decoding as Go's `url.PathUnescape`-like userinfo decoding: `%XX` becomes the byte,
/// anything else is kept; an invalid escape is an error.
fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_of_user_and_password() {
        let u = ProxyUrl::parse("http://mig:s3cr%3Aet%40x%25@proxy.example:3128").unwrap();
        assert_eq!(u.user.as_deref(), Some("mig"));
        assert_eq!(u.password.as_deref(), Some("s3cr:et@x%"));
        assert_eq!(u.host, "proxy.example");
        assert_eq!(u.port, 3128);
    }

    #[test]
    fn userinfo_ends_at_the_last_at_sign() {
        let u = ProxyUrl::parse("http://a@b:p@w@10.0.0.1:8080").unwrap();
        assert_eq!(u.user.as_deref(), Some("a@b"));
        assert_eq!(u.password.as_deref(), Some("p@w"));
        assert_eq!(u.host, "10.0.0.1");
    }

    #[test]
    fn missing_port_is_reported_as_mtc_fails() {
        let e = ProxyUrl::parse("http://u:p@proxy.example").unwrap_err();
        assert_eq!(e, UrlError::NoPort("proxy.example".into()));
        assert!(e.to_string().contains("connect = proxy.example:"));
        assert!(matches!(
            ProxyUrl::parse("http://proxy.example:"),
            Err(UrlError::NoPort(_))
        ));
        assert!(matches!(
            ProxyUrl::parse("http://[::1]"),
            Err(UrlError::NoPort(h)) if h == "[::1]"
        ));
    }

    #[test]
    fn ipv6_literals() {
        let u = ProxyUrl::parse("http://u:p@[fd00::1]:3128/").unwrap();
        assert_eq!(u.host, "fd00::1");
        assert_eq!(u.authority(), "[fd00::1]:3128");
        assert_eq!(ProxyUrl::parse("http://[::1:3128"), Err(UrlError::Bracket));
    }

    #[test]
    fn no_userinfo_means_anonymous() {
        let u = ProxyUrl::parse("HTTP://127.0.0.1:3128").unwrap();
        assert_eq!((u.user, u.password), (None, None));
    }

    #[test]
    fn refusals() {
        assert_eq!(ProxyUrl::parse("https://h:1"), Err(UrlError::Scheme));
        assert_eq!(ProxyUrl::parse("h:1"), Err(UrlError::Scheme));
        assert_eq!(ProxyUrl::parse("http://u:p@:1"), Err(UrlError::NoHost));
        assert!(matches!(
            ProxyUrl::parse("http://h:0"),
            Err(UrlError::BadPort(_))
        ));
        assert!(matches!(
            ProxyUrl::parse("http://h:99999"),
            Err(UrlError::BadPort(_))
        ));
        assert_eq!(
            ProxyUrl::parse("http://u:p%zz@h:1"),
            Err(UrlError::Escape("password"))
        );
        assert_eq!(ProxyUrl::parse("http://h:1/x"), Err(UrlError::Path));
    }

    #[test]
    fn display_never_shows_the_password() {
        let u = ProxyUrl::parse("http://mig:hunter2@h:1").unwrap();
        assert_eq!(u.to_string(), "http://mig:***@h:1");
        assert!(!format!("{u}").contains("hunter2"));
    }
}
