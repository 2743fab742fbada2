//! Plain `user:pass` users — from `--credentials` and from a
//! `--credentials-file` — kept only as SHA-256 digests and checked in
//! constant time.

use std::collections::HashMap;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// A problem on one line of a credentials or htpasswd file. The message
/// never contains the line itself (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

impl LineError {
    pub fn new(line: usize, reason: impl Into<String>) -> LineError {
        LineError {
            line,
            reason: reason.into(),
        }
    }
}

/// One user: digests only, so every comparison takes the same time and no
/// password stays in memory.
struct Entry {
    name_digest: [u8; 32],
    pass_digest: [u8; 32],
}

/// A table of plain users.
#[derive(Default)]
pub struct Users {
    entries: Vec<Entry>,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Users {
    /// Users from `(name, password)` pairs (`--credentials`).
    pub fn from_pairs(pairs: &[(String, String)]) -> Users {
        Users {
            entries: pairs
                .iter()
                .map(|(u, p)| Entry {
                    name_digest: digest(u.as_bytes()),
                    pass_digest: digest(p.as_bytes()),
                })
                .collect(),
        }
    }

    /// Parses a credentials file: one `user:pass` a line, split at the first
    /// `:` (the password may contain more). Blank lines and lines starting
    /// with `#` are skipped; a trailing `\r` is dropped. Anything else that
    /// is not a user is an error naming the line: no `:`, an empty user or
    /// password, space around the user name, a user listed twice.
    pub fn parse_file(text: &str) -> Result<Users, LineError> {
        let entries = user_pass_lines(text)?
            .into_iter()
            .map(|(_, user, pass)| Entry {
                name_digest: digest(user.as_bytes()),
                pass_digest: digest(pass.as_bytes()),
            })
            .collect();
        Ok(Users { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `user` with `pass` is in the table. Every entry is compared,
    /// in constant time, whichever matches.
    pub fn verify(&self, user: &str, pass: &str) -> bool {
        let (u, p) = (digest(user.as_bytes()), digest(pass.as_bytes()));
        let mut ok = subtle::Choice::from(0);
        for entry in &self.entries {
            ok |= entry.name_digest.ct_eq(&u) & entry.pass_digest.ct_eq(&p);
        }
        bool::from(ok)
    }
}

/// The `user:pass` lines of a credentials file, with their line numbers: one a line, split at
/// the first `:` (the password may contain more). Blank lines and lines starting with `#` are
/// skipped; a trailing `\r` is dropped. Anything else that is not a user is an error naming the
/// line: no `:`, an empty user or password, space around the user name, a user listed twice.
fn user_pass_lines(text: &str) -> Result<Vec<(usize, &str, &str)>, LineError> {
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let n = i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (user, pass) = line
            .split_once(':')
            .ok_or_else(|| LineError::new(n, "expected user:password"))?;
        if user.is_empty() {
            return Err(LineError::new(n, "empty user name"));
        }
        if user.trim() != user {
            return Err(LineError::new(n, "space before or after the user name"));
        }
        if pass.is_empty() {
            return Err(LineError::new(
                n,
                format!("empty password for user {user:?}"),
            ));
        }
        if let Some(first) = first_seen.insert(user, n) {
            return Err(LineError::new(
                n,
                format!("user {user:?} again (first on line {first})"),
            ));
        }
        out.push((n, user, pass));
    }
    Ok(out)
}

/// The user and password this proxy sends to its parent (`--parent-proxy-credentials`): a file
/// of one `user:pass` line, in the `--credentials-file` syntax. Kept in the clear (it is sent),
/// never printed: `Debug` leaves the password out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ParentCredentials {
    /// `None` only for an empty file, which a load refuses.
    pub pair: Option<(String, String)>,
}

impl ParentCredentials {
    pub fn parse(text: &str) -> Result<ParentCredentials, LineError> {
        let lines = user_pass_lines(text)?;
        if let Some((n, _, _)) = lines.get(1) {
            return Err(LineError::new(
                *n,
                format!(
                    "a second user:password line (the first is on line {}); the parent proxy gets one",
                    lines[0].0
                ),
            ));
        }
        Ok(ParentCredentials {
            pair: lines
                .first()
                .map(|(_, u, p)| (u.to_string(), p.to_string())),
        })
    }
}

impl std::fmt::Debug for ParentCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pair {
            Some((user, _)) => write!(f, "{user}:***"),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_users_comments_crlf_and_colons() {
        let text = "# site users\r\n\r\nalice:s3cr:et\r\n  # indented comment\nbob:pw\n\n   \ncarol:#not-a-comment\n";
        let u = Users::parse_file(text).unwrap();
        assert_eq!(u.len(), 3);
        assert!(u.verify("alice", "s3cr:et"));
        assert!(!u.verify("alice", "s3cr"));
        assert!(!u.verify("alice", "s3cr:et\r"));
        assert!(u.verify("bob", "pw"));
        assert!(!u.verify("bob", "s3cr:et"));
        assert!(u.verify("carol", "#not-a-comment"));
        assert!(!u.verify("dave", "pw"));
        // No newline at the end (kubectl create secret --from-literal).
        assert!(Users::parse_file("x:y").unwrap().verify("x", "y"));
        // A password keeps its spaces.
        assert!(Users::parse_file("x: y \n").unwrap().verify("x", " y "));
        assert!(Users::parse_file("").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_line_and_never_the_password() {
        for (text, line, why) in [
            ("a:1\nnocolon-secret\n", 2, "expected user:password"),
            ("a:1\r\n\r\n:secret\r\n", 3, "empty user name"),
            ("# c\nb:\n", 2, "empty password"),
            (" b:secret\n", 1, "space"),
            ("b :secret\n", 1, "space"),
            ("a:1\nb:2\na:secret\n", 3, "\"a\" again (first on line 1)"),
        ] {
            let e = Users::parse_file(text).err().unwrap();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.reason.contains(why), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")));
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn pairs() {
        let u = Users::from_pairs(&[("u".into(), "p:q".into())]);
        assert!(u.verify("u", "p:q"));
        assert!(!u.verify("u", "p"));
        assert!(!u.verify("p", "u"));
    }

    #[test]
    fn parent_credentials_are_one_line_and_never_debug_printed() {
        let c = ParentCredentials::parse("# the parent\r\nup:s3cr:et\r\n").unwrap();
        assert_eq!(c.pair, Some(("up".into(), "s3cr:et".into())));
        assert_eq!(format!("{c:?}"), "up:***");
        assert_eq!(ParentCredentials::parse("").unwrap().pair, None);
        let e = ParentCredentials::parse("a:secret\n\nb:secret\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.reason.contains("first is on line 1"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = ParentCredentials::parse("nocolon-secret\n").unwrap_err();
        assert_eq!((e.line, e.reason.as_str()), (1, "expected user:password"));
    }
}
