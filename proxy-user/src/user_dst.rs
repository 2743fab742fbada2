//! Per-user destinations (`--user-dst FILE`): a credential copied out of a ConfigMap should
//! reach only its own migration's routes. One line per user,
//!
//! ```text
//! # user: patterns, in the --allow-dst syntax (host, *.suffix, IP, CIDR)
//! mig-a: *.apps.cluster-b.example, 10.20.0.0/16
//! mig-b: fd00::5, rsync.cluster-c.example
//! ```
//!
//! A user with a line may tunnel only to destinations its patterns allow, with the same
//! meaning as `--allow-dst` (a name matches a name pattern or resolves into a listed network;
//! loopback and link-local only when listed); a user without a line is limited by the global
//! policy alone, which always applies on top. The file is reloaded with the users (SIGHUP, and
//! when it changes); a bad file keeps the previous table.

use std::collections::HashMap;

use crate::credentials::LineError;
use crate::policy::{DstPattern, Policy, PortSet};

/// The destinations of every user the file lists.
#[derive(Debug, Default)]
pub struct UserDestinations {
    by_user: HashMap<String, Policy>,
}

impl UserDestinations {
    /// Parses `user: pattern, pattern …` lines; blank lines and `#` comments are skipped.
    /// Patterns are separated by commas or white space. Errors name the line.
    pub fn parse(text: &str) -> Result<UserDestinations, LineError> {
        let mut by_user = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| LineError::new(i + 1, why);
            let (user, list) = line
                .split_once(':')
                .ok_or_else(|| bad("expected user: pattern, pattern".into()))?;
            let user = user.trim();
            if user.is_empty() {
                return Err(bad("empty user name".into()));
            }
            let patterns = list
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|p| !p.is_empty())
                .map(|p| DstPattern::parse(p).map_err(|e| bad(format!("{p:?}: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            if patterns.is_empty() {
                return Err(bad(format!(
                    "no destinations for {user:?}; remove the line to limit it by --allow-dst alone"
                )));
            }
            // Ports stay the global policy's (--allow-port).
            let policy = Policy::new(patterns, PortSet::parse("1-65535").expect("valid"));
            if by_user.insert(user.to_string(), policy).is_some() {
                return Err(bad(format!(
                    "{user:?} is listed twice; put all its destinations on one line"
                )));
            }
        }
        Ok(UserDestinations { by_user })
    }

    /// The destinations `user` is limited to; `None`: only the global policy.
    pub fn for_user(&self, user: &str) -> Option<&Policy> {
        self.by_user.get(user)
    }

    /// How many users the file limits.
    pub fn len(&self) -> usize {
        self.by_user.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_authority;

    const FILE: &str = "\
# migration routes
mig-a: *.apps.b.example, 10.20.0.0/16
mig-b:rsync.c.example   fd00::5
mig-c: *.c.example

";

    fn allowed(d: &UserDestinations, user: &str, target: &str) -> Option<bool> {
        let t = parse_authority(target).unwrap();
        d.for_user(user).map(|p| p.check_target(&t).is_ok())
    }

    #[test]
    fn each_user_reaches_only_its_own_destinations() {
        let d = UserDestinations::parse(FILE).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(allowed(&d, "mig-a", "route.apps.b.example:443"), Some(true));
        assert_eq!(allowed(&d, "mig-a", "10.20.3.4:31234"), Some(true));
        assert_eq!(allowed(&d, "mig-a", "10.21.3.4:443"), Some(false));
        // mig-c lists no address, so a name is decided by its name patterns alone (with an
        // address or network listed, any name passes this check and its addresses decide:
        // the next test).
        assert_eq!(
            allowed(&d, "mig-c", "route.apps.b.example:443"),
            Some(false)
        );
        assert_eq!(allowed(&d, "mig-c", "rsync.c.example:443"), Some(true));
        assert_eq!(allowed(&d, "mig-c", "10.20.3.4:443"), Some(false));
        assert_eq!(allowed(&d, "mig-b", "rsync.c.example:443"), Some(true));
        assert_eq!(allowed(&d, "mig-b", "fd00::5:31234"), Some(true));
        assert_eq!(allowed(&d, "mig-b", "[fd00::6]:31234"), Some(false));
        // Not listed: only the global policy applies.
        assert_eq!(allowed(&d, "someone-else", "anything.example:443"), None);
    }

    #[test]
    fn a_name_outside_the_names_may_still_resolve_into_a_listed_network() {
        let d = UserDestinations::parse(FILE).unwrap();
        let p = d.for_user("mig-a").unwrap();
        let t = parse_authority("db.internal:443").unwrap();
        assert!(p.check_target(&t).is_ok(), "decided by its addresses");
        let inside = vec!["10.20.0.9:443".parse().unwrap()];
        let outside = vec!["10.99.0.9:443".parse().unwrap()];
        assert!(p.filter_addrs(&t, inside).is_ok());
        assert!(p.filter_addrs(&t, outside).is_err());
    }

    #[test]
    fn errors_name_the_line_and_what_to_write() {
        for (text, line, needle) in [
            ("mig-a 10.0.0.0/8\n", 1, "expected user: pattern"),
            ("# c\n: 10.0.0.0/8\n", 2, "empty user name"),
            ("mig-a:\n", 1, "no destinations"),
            ("mig-a: 10.0.0.0/33\n", 1, "\"10.0.0.0/33\""),
            ("mig-a: a.example\nmig-a: b.example\n", 2, "listed twice"),
        ] {
            let e = UserDestinations::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e:?}");
            assert!(e.reason.contains(needle), "{text:?}: {}", e.reason);
        }
        assert!(UserDestinations::parse("").unwrap().is_empty());
    }
}
