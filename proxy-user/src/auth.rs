//! Basic proxy authentication: static users from the command line and an
//! htpasswd file (bcrypt, `{SHA}`, `$apr1$`), reloadable without touching
//! open tunnels. Passwords are never logged and compared in constant time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine;
use md5::{Digest as _, Md5};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Who is tunnelling: `None` for an anonymous tunnel.
pub type Identity = Option<String>;

/// Why a request was not authenticated (always answered with 407).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no Proxy-Authorization")]
    Missing,
    #[error("Proxy-Authorization is not Basic user:password")]
    Malformed,
    #[error("wrong credentials for user {0:?}")]
    Wrong(String),
}

/// One user from `--credentials`: digests, so every comparison takes the same time.
struct StaticUser {
    name: String,
    name_digest: [u8; 32],
    pass_digest: [u8; 32],
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub struct Authenticator {
    users: Vec<StaticUser>,
    htpasswd: Option<(PathBuf, RwLock<Arc<Htpasswd>>)>,
    anonymous: bool,
}

impl Authenticator {
    /// Builds the authenticator; reads the htpasswd file once.
    pub fn new(
        credentials: &[(String, String)],
        htpasswd: Option<&Path>,
        anonymous: bool,
    ) -> Result<Authenticator, HtpasswdError> {
        let users = credentials
            .iter()
            .map(|(u, p)| StaticUser {
                name: u.clone(),
                name_digest: digest(u.as_bytes()),
                pass_digest: digest(p.as_bytes()),
            })
            .collect();
        let htpasswd = match htpasswd {
            Some(path) => Some((
                path.to_path_buf(),
                RwLock::new(Arc::new(Htpasswd::load(path)?)),
            )),
            None => None,
        };
        Ok(Authenticator {
            users,
            htpasswd,
            anonymous,
        })
    }

    fn has_users(&self) -> bool {
        !self.users.is_empty() || self.htpasswd.is_some()
    }

    /// Re-reads the htpasswd file. On error the previous contents stay in force.
    /// Returns the number of users now loaded, or `None` without a file.
    pub fn reload(&self) -> Result<Option<usize>, HtpasswdError> {
        let Some((path, current)) = &self.htpasswd else {
            return Ok(None);
        };
        let fresh = Htpasswd::load(path)?;
        let n = fresh.entries.len();
        *current.write().expect("htpasswd lock") = Arc::new(fresh);
        Ok(Some(n))
    }

    /// Checks a `Proxy-Authorization` value. bcrypt is slow by design, so
    /// callers on an async runtime should run this on a blocking thread when
    /// an htpasswd file is configured (see [`Authenticator::needs_blocking`]).
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Identity, AuthError> {
        let Some(header) = header else {
            if self.anonymous {
                return Ok(None);
            }
            return Err(AuthError::Missing);
        };
        if !self.has_users() {
            // An open proxy ignores whatever credentials a client sends.
            return Ok(None);
        }
        let (user, pass) = decode_basic(header).ok_or(AuthError::Malformed)?;
        if self.check_static(&user, &pass) || self.check_htpasswd(&user, &pass) {
            Ok(Some(user))
        } else {
            Err(AuthError::Wrong(user))
        }
    }

    /// Whether [`Authenticator::authenticate`] may take milliseconds (bcrypt).
    pub fn needs_blocking(&self) -> bool {
        self.htpasswd.is_some()
    }

    fn check_static(&self, user: &str, pass: &str) -> bool {
        let (u, p) = (digest(user.as_bytes()), digest(pass.as_bytes()));
        // Visit every entry so the time does not depend on which one matched.
        let mut ok = subtle::Choice::from(0);
        for entry in &self.users {
            ok |= entry.name_digest.ct_eq(&u) & entry.pass_digest.ct_eq(&p);
        }
        bool::from(ok)
    }

    fn check_htpasswd(&self, user: &str, pass: &str) -> bool {
        let Some((_, file)) = &self.htpasswd else {
            return false;
        };
        let file = file.read().expect("htpasswd lock").clone();
        file.verify(user, pass)
    }

    /// The static user names, for start-up logging.
    pub fn static_users(&self) -> impl Iterator<Item = &str> {
        self.users.iter().map(|u| u.name.as_str())
    }
}

/// Decodes `Basic <base64(user:pass)>`; the scheme is case-insensitive and
/// the password is everything after the first ':'.
pub fn decode_basic(header: &[u8]) -> Option<(String, String)> {
    let header = std::str::from_utf8(header).ok()?.trim();
    let (scheme, token) = header.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    if user.is_empty() {
        return None;
    }
    Some((user.to_string(), pass.to_string()))
}

/// A parsed htpasswd file.
#[derive(Debug, Default)]
pub struct Htpasswd {
    entries: HashMap<String, PasswordHash>,
}

#[derive(Debug)]
enum PasswordHash {
    Bcrypt(String),
    Sha1([u8; 20]),
    Apr1 { salt: String, hash: String },
}

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("line {0}: {1}")]
    Line(usize, String),
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Htpasswd, HtpasswdError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| HtpasswdError::Io(path.to_path_buf(), e))?;
        Htpasswd::parse(&text)
    }

    /// Parses `user:hash` lines; blank lines and `#` comments are skipped.
    /// An entry in a format we cannot verify is an error, not a silent lockout.
    pub fn parse(text: &str) -> Result<Htpasswd, HtpasswdError> {
        let mut entries = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| HtpasswdError::Line(i + 1, why.to_string());
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("expected user:hash"))?;
            if user.is_empty() {
                return Err(bad("empty user name"));
            }
            let parsed = if hash.starts_with("$2a$")
                || hash.starts_with("$2b$")
                || hash.starts_with("$2y$")
                || hash.starts_with("$2x$")
            {
                // Check the format now rather than at the first login.
                bcrypt::verify("", hash).map_err(|_| bad("malformed bcrypt hash"))?;
                PasswordHash::Bcrypt(hash.to_string())
            } else if let Some(b64) = hash.strip_prefix("{SHA}") {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .ok()
                    .and_then(|v| <[u8; 20]>::try_from(v).ok())
                    .ok_or_else(|| bad("malformed {SHA} hash"))?;
                PasswordHash::Sha1(raw)
            } else if let Some(rest) = hash.strip_prefix("$apr1$") {
                let (salt, hash) = rest
                    .split_once('$')
                    .filter(|(s, h)| s.len() <= 8 && h.len() == 22)
                    .ok_or_else(|| bad("malformed $apr1$ hash"))?;
                PasswordHash::Apr1 {
                    salt: salt.to_string(),
                    hash: hash.to_string(),
                }
            } else {
                return Err(bad(
                    "unsupported hash (use bcrypt, {SHA} or $apr1$: htpasswd -B)",
                ));
            };
            entries.insert(user.to_string(), parsed);
        }
        Ok(Htpasswd { entries })
    }

    pub fn verify(&self, user: &str, pass: &str) -> bool {
        match self.entries.get(user) {
            Some(PasswordHash::Bcrypt(h)) => bcrypt::verify(pass, h).unwrap_or(false),
            Some(PasswordHash::Sha1(h)) => {
                let got: [u8; 20] = sha1::Sha1::digest(pass.as_bytes()).into();
                bool::from(got.ct_eq(h))
            }
            Some(PasswordHash::Apr1 { salt, hash }) => {
                let got = apr1(pass.as_bytes(), salt.as_bytes());
                bool::from(got.as_bytes().ct_eq(hash.as_bytes()))
            }
            None => false,
        }
    }
}

/// Apache's `$apr1$` variant of MD5-crypt: the 22-character hash part.
fn apr1(pass: &[u8], salt: &[u8]) -> String {
    const MAGIC: &[u8] = b"$apr1$";
    let mut ctx = Md5::new();
    ctx.update(pass);
    ctx.update(MAGIC);
    ctx.update(salt);
    let alt = Md5::new()
        .chain_update(pass)
        .chain_update(salt)
        .chain_update(pass)
        .finalize();
    let mut left = pass.len();
    while left > 0 {
        let n = left.min(16);
        ctx.update(&alt[..n]);
        left -= n;
    }
    let mut bits = pass.len();
    while bits > 0 {
        if bits & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(&pass[..1]);
        }
        bits >>= 1;
    }
    let mut fin = ctx.finalize();
    for round in 0..1000 {
        let mut c = Md5::new();
        if round & 1 == 1 {
            c.update(pass);
        } else {
            c.update(fin);
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(pass);
        }
        if round & 1 == 1 {
            c.update(fin);
        } else {
            c.update(pass);
        }
        fin = c.finalize();
    }
    const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(22);
    let mut put = |mut v: u32, n: usize| {
        for _ in 0..n {
            out.push(ITOA64[(v & 0x3f) as usize] as char);
            v >>= 6;
        }
    };
    let b = |i: usize| fin[i] as u32;
    for (x, y, z) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        put((b(x) << 16) | (b(y) << 8) | b(z), 4);
    }
    put(b(11), 2);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(creds: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds)
        )
        .into_bytes()
    }

    #[test]
    fn decode_basic_header() {
        assert_eq!(
            decode_basic(&basic("u:p:a:ss")),
            Some(("u".into(), "p:a:ss".into()))
        );
        let lower = format!(
            "basic {}",
            base64::engine::general_purpose::STANDARD.encode("u:p")
        );
        assert_eq!(
            decode_basic(lower.as_bytes()),
            Some(("u".into(), "p".into()))
        );
        assert_eq!(decode_basic(b"Bearer abc"), None);
        assert_eq!(decode_basic(b"Basic !!!"), None);
        assert_eq!(decode_basic(&basic("nocolon")), None);
        assert_eq!(decode_basic(&basic(":p")), None);
        assert_eq!(decode_basic(b"Basic"), None);
    }

    #[test]
    fn static_users() {
        let a = Authenticator::new(
            &[
                ("alice".into(), "s:e:c".into()),
                ("bob".into(), "pw".into()),
            ],
            None,
            false,
        )
        .unwrap();
        assert_eq!(
            a.authenticate(Some(&basic("alice:s:e:c"))),
            Ok(Some("alice".into()))
        );
        assert_eq!(
            a.authenticate(Some(&basic("bob:pw"))),
            Ok(Some("bob".into()))
        );
        assert_eq!(
            a.authenticate(Some(&basic("bob:s:e:c"))),
            Err(AuthError::Wrong("bob".into()))
        );
        assert_eq!(
            a.authenticate(Some(&basic("alice:s:e"))),
            Err(AuthError::Wrong("alice".into()))
        );
        assert_eq!(a.authenticate(None), Err(AuthError::Missing));
        assert_eq!(a.authenticate(Some(b"Digest x")), Err(AuthError::Malformed));
    }

    #[test]
    fn anonymous() {
        let open = Authenticator::new(&[], None, true).unwrap();
        assert_eq!(open.authenticate(None), Ok(None));
        assert_eq!(open.authenticate(Some(&basic("x:y"))), Ok(None));
        // With users and --allow-anonymous, credentials that are sent must be right.
        let mixed = Authenticator::new(&[("u".into(), "p".into())], None, true).unwrap();
        assert_eq!(mixed.authenticate(None), Ok(None));
        assert!(mixed.authenticate(Some(&basic("u:bad"))).is_err());
    }

    #[test]
    fn apr1_matches_openssl() {
        // From `openssl passwd -apr1 -salt …`.
        assert_eq!(apr1(b"password", b"xxxxxxxx"), "dxHfLAsjHkDRmG83UXe8K0");
        assert_eq!(
            apr1("p:a:ss wörd".as_bytes(), b"Ab/9.z"),
            "hg/k3A26HB1ldev6zcFoc/"
        );
        assert_eq!(apr1(b"", b"abcdefgh"), "L.PT565ESX4Tp2bqNs7Ie.");
    }

    #[test]
    fn htpasswd_formats() {
        let bcrypt_b = bcrypt::hash("bpass", 4).unwrap();
        let bcrypt_y = bcrypt_b.replacen("$2b$", "$2y$", 1);
        let text = format!(
            "# users\n\nsha:{{SHA}}5en6G6MezRroT3XKqkdPOmY/BfQ=\napr:$apr1$xxxxxxxx$dxHfLAsjHkDRmG83UXe8K0\nbc:{bcrypt_b}\nby:{bcrypt_y}\n"
        );
        let h = Htpasswd::parse(&text).unwrap();
        assert!(h.verify("sha", "secret"));
        assert!(!h.verify("sha", "Secret"));
        assert!(h.verify("apr", "password"));
        assert!(!h.verify("apr", "passwore"));
        assert!(h.verify("bc", "bpass"));
        assert!(h.verify("by", "bpass"));
        assert!(!h.verify("by", "bpasS"));
        assert!(!h.verify("nobody", "secret"));
    }

    #[test]
    fn htpasswd_errors_name_the_line() {
        for bad in [
            "nocolon",
            "u:plaintext",
            "u:$apr1$short",
            "u:{SHA}!!",
            "u:$2y$05$bad",
            ":x",
        ] {
            let e = Htpasswd::parse(&format!("ok:{{SHA}}5en6G6MezRroT3XKqkdPOmY/BfQ=\n{bad}\n"))
                .unwrap_err();
            assert!(e.to_string().starts_with("line 2:"), "{bad}: {e}");
        }
    }

    #[test]
    fn reload_keeps_old_file_on_error() {
        let dir = std::env::temp_dir().join(format!("splice-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("htpasswd");
        std::fs::write(&path, "u:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n").unwrap();
        let a = Authenticator::new(&[], Some(&path), false).unwrap();
        assert!(a.authenticate(Some(&basic("u:secret"))).is_ok());
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(a.reload().is_err());
        assert!(a.authenticate(Some(&basic("u:secret"))).is_ok());
        std::fs::write(&path, "v:$apr1$xxxxxxxx$dxHfLAsjHkDRmG83UXe8K0\n").unwrap();
        assert_eq!(a.reload().unwrap(), Some(1));
        assert!(a.authenticate(Some(&basic("u:secret"))).is_err());
        assert!(a.authenticate(Some(&basic("v:password"))).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
