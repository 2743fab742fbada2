//! Basic proxy authentication: static users from the command line, a
//! credentials file of plain `user:pass` lines and an htpasswd file (bcrypt,
//! `{SHA}`, `$apr1$`); both files reloadable without touching open tunnels
//! or handshakes in flight. Passwords are never logged and compared in
//! constant time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine;
use md5::{Digest as _, Md5};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::credentials::{LineError, ParentCredentials, Users};
use crate::user_dst::UserDestinations;

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

/// A file of users that can be reloaded while the proxy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// `--credentials-file`: plain `user:pass` lines.
    CredentialsFile,
    /// `--htpasswd`: hashed passwords.
    Htpasswd,
    /// `--user-dst`: the destinations each listed user is limited to.
    UserDestinations,
    /// `--parent-proxy-credentials`: what this proxy sends to its parent.
    ParentCredentials,
}

impl SourceKind {
    pub const ALL: [SourceKind; 4] = [
        SourceKind::CredentialsFile,
        SourceKind::Htpasswd,
        SourceKind::UserDestinations,
        SourceKind::ParentCredentials,
    ];

    /// The flag that names the file.
    pub fn flag(self) -> &'static str {
        match self {
            SourceKind::CredentialsFile => "--credentials-file",
            SourceKind::Htpasswd => "--htpasswd",
            SourceKind::UserDestinations => "--user-dst",
            SourceKind::ParentCredentials => "--parent-proxy-credentials",
        }
    }

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::CredentialsFile => "credentials_file",
            SourceKind::Htpasswd => "htpasswd",
            SourceKind::UserDestinations => "user_dst",
            SourceKind::ParentCredentials => "parent_credentials",
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceKind::CredentialsFile => "credentials file",
            SourceKind::Htpasswd => "htpasswd",
            SourceKind::UserDestinations => "user destinations",
            SourceKind::ParentCredentials => "parent proxy credentials",
        })
    }
}

/// Why a file of users could not be (re)loaded. One line naming the flag,
/// the file and, for a bad entry, the line number; never a password.
#[derive(Debug, thiserror::Error)]
#[error("{} {}: {problem}", kind.flag(), path.display())]
pub struct LoadError {
    pub kind: SourceKind,
    pub path: PathBuf,
    pub problem: LoadProblem,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadProblem {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Line(LineError),
    /// Refused rather than locking everyone out: an empty file is usually
    /// one caught between a writer's truncate and its write.
    #[error("no users")]
    NoUsers,
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The file was read and is in force now, with this many users.
    Loaded(usize),
    /// Only when asked to skip unchanged files: same bytes as last time.
    Unchanged,
    /// The flag was not given.
    NotConfigured,
}

/// A file parsed into `T`; readers take a cheap `Arc` clone, a reload swaps
/// it, so handshakes in flight finish with the table they started with.
struct Source<T> {
    kind: SourceKind,
    path: PathBuf,
    current: RwLock<Arc<T>>,
    /// SHA-256 of the bytes last read successfully (loaded or rejected), so
    /// a burst of directory events for an unchanged file is not a reload.
    last_read: Mutex<[u8; 32]>,
}

/// The parsers [`Source`] knows.
trait UserFile: Sized {
    fn parse(text: &str) -> Result<Self, LineError>;
    fn len(&self) -> usize;
}

impl UserFile for Users {
    fn parse(text: &str) -> Result<Users, LineError> {
        Users::parse_file(text)
    }
    fn len(&self) -> usize {
        Users::len(self)
    }
}

impl UserFile for Htpasswd {
    fn parse(text: &str) -> Result<Htpasswd, LineError> {
        Htpasswd::parse(text)
    }
    fn len(&self) -> usize {
        self.entries.len()
    }
}

impl UserFile for UserDestinations {
    fn parse(text: &str) -> Result<UserDestinations, LineError> {
        UserDestinations::parse(text)
    }
    fn len(&self) -> usize {
        UserDestinations::len(self)
    }
}

impl UserFile for ParentCredentials {
    fn parse(text: &str) -> Result<ParentCredentials, LineError> {
        ParentCredentials::parse(text)
    }
    fn len(&self) -> usize {
        usize::from(self.pair.is_some())
    }
}

impl<T: UserFile> Source<T> {
    fn load(kind: SourceKind, path: &Path) -> Result<Source<T>, LoadError> {
        let source = Source {
            kind,
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(T::parse("").expect("empty file parses"))),
            last_read: Mutex::new([0; 32]),
        };
        source.reload(false)?;
        Ok(source)
    }

    fn get(&self) -> Arc<T> {
        self.current.read().expect("user file lock").clone()
    }

    /// Reads and parses the file (through any symlinks, afresh) and puts it
    /// in force; on error the previous contents stay.
    fn reload(&self, skip_unchanged: bool) -> Result<Reloaded, LoadError> {
        // Held to the end: two reloads at once (SIGHUP and a change on
        // disk) must not put an older read in force after a newer one.
        let mut last = self.last_read.lock().expect("user file lock");
        let error = |problem| LoadError {
            kind: self.kind,
            path: self.path.clone(),
            problem,
        };
        let bytes = std::fs::read(&self.path).map_err(|e| error(LoadProblem::Io(e)))?;
        let fingerprint: [u8; 32] = Sha256::digest(&bytes).into();
        if skip_unchanged && *last == fingerprint {
            return Ok(Reloaded::Unchanged);
        }
        *last = fingerprint;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            error(LoadProblem::Line(LineError::new(line, "not UTF-8")))
        })?;
        let fresh = T::parse(text).map_err(|e| error(LoadProblem::Line(e)))?;
        let n = fresh.len();
        if n == 0 {
            return Err(error(LoadProblem::NoUsers));
        }
        *self.current.write().expect("user file lock") = Arc::new(fresh);
        Ok(Reloaded::Loaded(n))
    }
}

/// Every source of users. A user is accepted if any source accepts the
/// password: a name in several sources has several valid passwords (so a
/// move from one file to another needs no flag day).
pub struct Authenticator {
    users: Users,
    credentials_file: Option<Source<Users>>,
    htpasswd: Option<Source<Htpasswd>>,
    /// `--user-dst`: not a source of users, but reloaded with them.
    user_dst: Option<Source<UserDestinations>>,
    /// `--parent-proxy-credentials`: not users of this proxy either; reloaded the same way.
    parent: Option<Source<ParentCredentials>>,
    anonymous: bool,
}

impl Authenticator {
    /// Builds the authenticator; reads each file once.
    pub fn new(
        credentials: &[(String, String)],
        credentials_file: Option<&Path>,
        htpasswd: Option<&Path>,
        user_dst: Option<&Path>,
        anonymous: bool,
    ) -> Result<Authenticator, LoadError> {
        let credentials_file = credentials_file
            .map(|p| Source::load(SourceKind::CredentialsFile, p))
            .transpose()?;
        let htpasswd = htpasswd
            .map(|p| Source::load(SourceKind::Htpasswd, p))
            .transpose()?;
        let user_dst = user_dst
            .map(|p| Source::load(SourceKind::UserDestinations, p))
            .transpose()?;
        Ok(Authenticator {
            users: Users::from_pairs(credentials),
            credentials_file,
            htpasswd,
            user_dst,
            parent: None,
            anonymous,
        })
    }

    /// Adds the file of the credentials sent to the parent proxy; reads it once.
    pub fn with_parent_credentials(mut self, path: Option<&Path>) -> Result<Self, LoadError> {
        self.parent = path
            .map(|p| Source::load(SourceKind::ParentCredentials, p))
            .transpose()?;
        Ok(self)
    }

    /// The parent proxy's credentials in force (`--parent-proxy-credentials`), a snapshot a
    /// reload does not change; `None` without the flag.
    pub fn parent_credentials(&self) -> Option<Arc<ParentCredentials>> {
        self.parent.as_ref().map(Source::get)
    }

    fn has_users(&self) -> bool {
        !self.users.is_empty() || self.credentials_file.is_some() || self.htpasswd.is_some()
    }

    /// The file behind `kind`, if that flag was given.
    pub fn path(&self, kind: SourceKind) -> Option<&Path> {
        match kind {
            SourceKind::CredentialsFile => self.credentials_file.as_ref().map(|s| s.path.as_path()),
            SourceKind::Htpasswd => self.htpasswd.as_ref().map(|s| s.path.as_path()),
            SourceKind::UserDestinations => self.user_dst.as_ref().map(|s| s.path.as_path()),
            SourceKind::ParentCredentials => self.parent.as_ref().map(|s| s.path.as_path()),
        }
    }

    /// Re-reads one file. On error the previous contents stay in force.
    /// With `skip_unchanged`, a file whose bytes are those read last time
    /// is left alone ([`Reloaded::Unchanged`]).
    pub fn reload(&self, kind: SourceKind, skip_unchanged: bool) -> Result<Reloaded, LoadError> {
        match kind {
            SourceKind::CredentialsFile => self
                .credentials_file
                .as_ref()
                .map_or(Ok(Reloaded::NotConfigured), |s| s.reload(skip_unchanged)),
            SourceKind::Htpasswd => self
                .htpasswd
                .as_ref()
                .map_or(Ok(Reloaded::NotConfigured), |s| s.reload(skip_unchanged)),
            SourceKind::UserDestinations => self
                .user_dst
                .as_ref()
                .map_or(Ok(Reloaded::NotConfigured), |s| s.reload(skip_unchanged)),
            SourceKind::ParentCredentials => self
                .parent
                .as_ref()
                .map_or(Ok(Reloaded::NotConfigured), |s| s.reload(skip_unchanged)),
        }
    }

    /// The per-user destinations in force (`--user-dst`), a snapshot a reload does not change;
    /// `None` without the flag.
    pub fn user_destinations(&self) -> Option<Arc<UserDestinations>> {
        self.user_dst.as_ref().map(Source::get)
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
        let accepted = self.users.verify(&user, &pass)
            || (self.credentials_file.as_ref()).is_some_and(|s| s.get().verify(&user, &pass))
            || (self.htpasswd.as_ref()).is_some_and(|s| s.get().verify(&user, &pass));
        if accepted {
            Ok(Some(user))
        } else {
            Err(AuthError::Wrong(user))
        }
    }

    /// Whether [`Authenticator::authenticate`] may take milliseconds (bcrypt).
    pub fn needs_blocking(&self) -> bool {
        self.htpasswd.is_some()
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

impl Htpasswd {
    /// Parses `user:hash` lines; blank lines and `#` comments are skipped.
    /// An entry in a format we cannot verify is an error, not a silent lockout.
    pub fn parse(text: &str) -> Result<Htpasswd, LineError> {
        let mut entries = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| LineError::new(i + 1, why);
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
            None,
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
        let open = Authenticator::new(&[], None, None, None, true).unwrap();
        assert_eq!(open.authenticate(None), Ok(None));
        assert_eq!(open.authenticate(Some(&basic("x:y"))), Ok(None));
        // With users and --allow-anonymous, credentials that are sent must be right.
        let mixed =
            Authenticator::new(&[("u".into(), "p".into())], None, None, None, true).unwrap();
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

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("splice-auth-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reload_keeps_old_file_on_error() {
        let dir = Scratch::new("htpasswd");
        let path = dir.0.join("htpasswd");
        std::fs::write(&path, "u:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n").unwrap();
        let a = Authenticator::new(&[], None, Some(&path), None, false).unwrap();
        assert!(a.authenticate(Some(&basic("u:secret"))).is_ok());
        std::fs::write(&path, "garbage\n").unwrap();
        let e = a.reload(SourceKind::Htpasswd, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("--htpasswd {}: line 1: expected user:hash", path.display())
        );
        assert!(a.authenticate(Some(&basic("u:secret"))).is_ok());
        std::fs::write(&path, "v:$apr1$xxxxxxxx$dxHfLAsjHkDRmG83UXe8K0\n").unwrap();
        assert_eq!(
            a.reload(SourceKind::Htpasswd, false).unwrap(),
            Reloaded::Loaded(1)
        );
        assert!(a.authenticate(Some(&basic("u:secret"))).is_err());
        assert!(a.authenticate(Some(&basic("v:password"))).is_ok());
        assert_eq!(
            a.reload(SourceKind::CredentialsFile, false).unwrap(),
            Reloaded::NotConfigured
        );
    }

    #[test]
    fn credentials_file_with_other_sources() {
        let dir = Scratch::new("credfile");
        let creds = dir.0.join("creds");
        let htpasswd = dir.0.join("htpasswd");
        std::fs::write(&creds, "alice:a:1\nshared:from-file\n").unwrap();
        // {SHA} of "secret".
        std::fs::write(&htpasswd, "shared:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n").unwrap();
        let a = Authenticator::new(
            &[("shared".into(), "from-flag".into())],
            Some(&creds),
            Some(&htpasswd),
            None,
            false,
        )
        .unwrap();
        assert_eq!(a.path(SourceKind::CredentialsFile), Some(creds.as_path()));
        assert_eq!(
            a.authenticate(Some(&basic("alice:a:1"))),
            Ok(Some("alice".into()))
        );
        // A name in several sources: each source's password is accepted.
        for pass in ["from-flag", "from-file", "secret"] {
            let header = basic(&format!("shared:{pass}"));
            assert_eq!(
                a.authenticate(Some(&header)),
                Ok(Some("shared".into())),
                "{pass}"
            );
        }
        assert!(a.authenticate(Some(&basic("shared:other"))).is_err());

        // Unchanged bytes are skipped only when asked; a bad file changes nothing.
        assert_eq!(
            a.reload(SourceKind::CredentialsFile, true).unwrap(),
            Reloaded::Unchanged
        );
        assert_eq!(
            a.reload(SourceKind::CredentialsFile, false).unwrap(),
            Reloaded::Loaded(2)
        );
        std::fs::write(&creds, "alice:a:2\nalice:dup-secret\n").unwrap();
        let e = a
            .reload(SourceKind::CredentialsFile, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("--credentials-file {}: line 2: ", creds.display())),
            "{e}"
        );
        assert!(!e.contains("dup-secret"), "{e}");
        assert!(a.authenticate(Some(&basic("alice:a:1"))).is_ok());
        // The same bad bytes again: not retried until they change.
        assert_eq!(
            a.reload(SourceKind::CredentialsFile, true).unwrap(),
            Reloaded::Unchanged
        );
        std::fs::write(&creds, "alice:a:2\n").unwrap();
        assert_eq!(
            a.reload(SourceKind::CredentialsFile, true).unwrap(),
            Reloaded::Loaded(1)
        );
        assert!(a.authenticate(Some(&basic("alice:a:1"))).is_err());
        assert!(a.authenticate(Some(&basic("alice:a:2"))).is_ok());
        assert!(a.authenticate(Some(&basic("shared:from-file"))).is_err());
        assert!(a.authenticate(Some(&basic("shared:from-flag"))).is_ok());

        // A missing file: an error, the old users stay.
        std::fs::remove_file(&creds).unwrap();
        let e = a
            .reload(SourceKind::CredentialsFile, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("--credentials-file {}: ", creds.display())),
            "{e}"
        );
        assert!(a.authenticate(Some(&basic("alice:a:2"))).is_ok());
        // Empty, or comments only: what a reader may see mid-write.
        std::fs::write(&creds, "# nobody\n").unwrap();
        let e = a
            .reload(SourceKind::CredentialsFile, true)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(": no users"), "{e}");
        assert!(a.authenticate(Some(&basic("alice:a:2"))).is_ok());
        std::fs::write(&creds, [b'u', b':', 0xff, b'\n']).unwrap();
        let e = a
            .reload(SourceKind::CredentialsFile, true)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(": line 1: not UTF-8"), "{e}");
    }

    #[test]
    fn start_up_errors_name_flag_file_and_line() {
        let dir = Scratch::new("startup");
        let creds = dir.0.join("creds");
        std::fs::write(&creds, "# users\nok:1\nnocolon\n").unwrap();
        let e = Authenticator::new(&[], Some(&creds), None, None, false)
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "--credentials-file {}: line 3: expected user:password",
                creds.display()
            )
        );
        let missing = dir.0.join("missing");
        let e = Authenticator::new(&[], None, Some(&missing), None, false)
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with(&format!("--htpasswd {}: ", missing.display())),
            "{e}"
        );
    }
}
