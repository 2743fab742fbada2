//! The request-head reader and parser (proxy-user/src/request.rs) on hostile bytes.
//!
//! Every input gets a defined outcome (a request, an error, or "needs more"
//! then a defined error at EOF), never a panic, and:
//! - the outcome does not depend on how the bytes are cut into reads: the
//!   whole input, two pieces (at a point picked from the input and after the
//!   first line), and for short inputs one byte per read, all agree;
//! - a parsed target round-trips: its text form parses back to the same
//!   target, names are lower case without a trailing dot and valid, the
//!   port is never 0;
//! - the head and the bytes after it add up to what was read.

#![no_main]

use libfuzzer_sys::fuzz_target;
use splice_proxy::request::{
    HeadReader, Host, MAX_HEAD, Request, RequestError, is_valid_hostname, parse_authority,
};

/// What the reader made of the input, comparable across ways of feeding it.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The request and the bytes that followed the head.
    Done(Request, Vec<u8>),
    /// Refused: the error's text (it names the kind and the detail).
    Refused(String),
}

/// Feeds `pieces` in order the way `read_request` does: never more than
/// the reader's room at once; bytes past the cap are never read. At the end
/// of the input the client closes (EOF).
fn feed(pieces: &[&[u8]]) -> Outcome {
    let mut reader = HeadReader::new();
    for (i, piece) in pieces.iter().enumerate() {
        let mut piece = *piece;
        while !piece.is_empty() {
            let n = reader.room().min(piece.len());
            assert!(n > 0, "the reader asked for no bytes without deciding");
            let (now, later) = piece.split_at(n);
            piece = later;
            match reader.push(now) {
                Ok(Some((req, mut rest))) => {
                    // The tunnel forwards whatever follows, in this piece and later ones.
                    rest.extend_from_slice(piece);
                    pieces[i + 1..]
                        .iter()
                        .for_each(|p| rest.extend_from_slice(p));
                    return Outcome::Done(req, rest);
                }
                Ok(None) => {}
                Err(e) => return refused(e),
            }
        }
    }
    refused(reader.at_eof())
}

fn refused(e: RequestError) -> Outcome {
    if let RequestError::Io(_) = e {
        panic!("no I/O happens here: {e}");
    }
    Outcome::Refused(e.to_string())
}

/// Checks a parsed request against the input it came from: `rest` is what
/// the reader returned after the head, plus the input it never read.
fn check_request(data: &[u8], req: &Request, rest: &[u8]) {
    let target = &req.target;
    assert_ne!(target.port, 0, "port 0 accepted");
    if let Host::Name(name) = &target.host {
        assert!(is_valid_hostname(name), "invalid name accepted: {name:?}");
        assert!(!name.ends_with('.'), "trailing dot kept: {name:?}");
        assert_eq!(*name, name.to_ascii_lowercase(), "name not lower case");
    }
    let text = target.to_string();
    assert_eq!(
        parse_authority(&text).as_ref(),
        Ok(target),
        "{text:?} does not parse back to {target:?}"
    );
    // The head is a prefix of the input and the rest is what followed it.
    assert!(data.ends_with(rest), "rest is not the input's tail");
    let head_len = data.len() - rest.len();
    assert!(head_len <= MAX_HEAD, "a head of {head_len} bytes accepted");
    assert!(
        data[..head_len].ends_with(b"\n"),
        "the head does not end with a line end"
    );
    if let Some(auth) = &req.proxy_authorization {
        assert!(
            !auth.contains(&b'\n') && !auth.contains(&b'\r'),
            "a line end inside the Proxy-Authorization value"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = feed(&[data]);
    if let Outcome::Done(req, rest) = &whole {
        check_request(data, req, rest);
    }
    // Two reads: at a point picked from the input, and after the first line.
    let mut cuts = Vec::new();
    if !data.is_empty() {
        let pick = data
            .iter()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(*b as usize));
        cuts.push(pick % (data.len() + 1));
    }
    if let Some(nl) = data.iter().position(|b| *b == b'\n') {
        cuts.push(nl + 1);
    }
    for cut in cuts {
        let (a, b) = data.split_at(cut);
        assert_eq!(feed(&[a, b]), whole, "split at {cut} of {}", data.len());
    }
    // One byte per read (stunnel with TCP_NODELAY, or a slowloris), for short inputs.
    if data.len() <= 512 {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(feed(&bytes), whole, "one byte per read");
    }
});
