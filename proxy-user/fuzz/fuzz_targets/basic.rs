//! The Basic-credential decoder (`decode_basic`, proxy-user/src/auth.rs) and
//! the static-user check behind it, on hostile `Proxy-Authorization` values.
//!
//! Never a panic, and:
//! - a decoded pair has a non-empty user without ':' (the password is
//!   everything after the first ':') and re-encodes to a value that decodes
//!   to the same pair, whatever the scheme's case;
//! - the authenticator accepts the value exactly when it decodes to the
//!   configured user and password.

#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use splice_proxy::auth::{AuthError, Authenticator, decode_basic};
use std::sync::OnceLock;

const USER: &str = "mig";
const PASS: &str = "s3cr:et";

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        Authenticator::new(&[(USER.into(), PASS.into())], None, None, None, false)
            .expect("static users need no file")
    })
}

fuzz_target!(|data: &[u8]| {
    let decoded = decode_basic(data);
    if let Some((user, pass)) = &decoded {
        assert!(!user.is_empty(), "empty user name decoded");
        assert!(!user.contains(':'), "user {user:?} contains ':'");
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        for scheme in ["Basic", "basic", "BASIC"] {
            let again = decode_basic(format!("{scheme} {token}").as_bytes());
            assert_eq!(again, decoded, "re-encoded differently");
        }
    }
    let verdict = authenticator().authenticate(Some(data));
    let right = decoded
        .as_ref()
        .is_some_and(|(u, p)| u == USER && p == PASS);
    match (&verdict, right) {
        (Ok(Some(u)), true) => assert_eq!(u, USER),
        (Err(AuthError::Wrong(_)), false) => assert!(decoded.is_some()),
        (Err(AuthError::Malformed), false) => assert!(decoded.is_none()),
        _ => panic!("authenticate gave {verdict:?}; decoded {decoded:?}"),
    }
});
