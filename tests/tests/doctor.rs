//! `splice-proxy doctor` end to end: the real binary run against real proxies on loopback, each
//! verdict and exit status asserted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::time::Duration;

use splice_proxy_tests::{Proxy, TEST_POLICY, binary};

const USER: &str = "mig";
const PASS: &str = "s3cr:et@x";
/// PASS as it is written inside the URL.
const PASS_IN_URL: &str = "s3cr%3Aet%40x";

/// A target that accepts and holds connections (the proxy only needs to reach it).
fn target() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().map_while(Result::ok) {
            held.push(s);
        }
    });
    addr
}

fn doctor(args: &[&str]) -> Output {
    let out = Command::new(binary())
        .arg("doctor")
        .args(args)
        .args(["--timeout", "5s"])
        .output()
        .expect("run splice-proxy doctor");
    eprintln!(
        "doctor {args:?} -> {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The line of one check, split into outcome and reason.
fn line<'a>(out: &'a str, check: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(check))
        .unwrap_or_else(|| panic!("no {check} line in:\n{out}"))
}

fn our_proxy() -> Proxy {
    let creds = format!("{USER}:{PASS}");
    let mut args = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--mode", "copy", "--credentials", &creds]);
    Proxy::start(&args).unwrap()
}

#[test]
fn our_proxy_passes_with_percent_encoded_password() {
    let proxy = our_proxy();
    let t = target().to_string();
    let url = format!("http://{USER}:{PASS_IN_URL}@{}", proxy.addr);
    let o = doctor(&[&url, "--target", &t]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(line(&out, "connect").contains(" pass "), "{out}");
    assert!(out.contains("200"), "{out}");
    assert!(
        !out.contains(PASS) && !out.contains(PASS_IN_URL),
        "password printed:\n{out}"
    );
}

#[test]
fn wrong_credentials_are_a_407_with_basic_offered() {
    let proxy = our_proxy();
    let t = target().to_string();
    let url = format!("http://{USER}:wrong@{}", proxy.addr);
    let o = doctor(&[&url, "--target", &t]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let l = line(&out, "connect");
    assert!(l.contains(" fail "), "{out}");
    assert!(
        l.contains("407") && l.contains("schemes offered: Basic"),
        "{out}"
    );
    assert!(l.contains("refused these credentials"), "{out}");
    assert!(!out.contains("wrong"), "password printed:\n{out}");
}

#[test]
fn refused_destination_shows_proxy_status() {
    let proxy = our_proxy();
    // Not in TEST_POLICY's loopback range, and never contacted: the policy refuses it first.
    let o = doctor(&[
        &format!("http://{USER}:{PASS_IN_URL}@{}", proxy.addr),
        "--target",
        "127.0.0.1:0x",
    ]);
    assert_eq!(o.status.code(), Some(2), "a bad --target is a usage error");
    let o = doctor(&[
        &format!("http://{USER}:{PASS_IN_URL}@{}", proxy.addr),
        "--target",
        "[::1]:443",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let l = line(&out, "connect");
    assert!(
        l.contains("403") && l.contains("Proxy-Status: splice-proxy"),
        "{out}"
    );
}

/// A proxy that answers every CONNECT with a 407 offering only NTLM and Negotiate, after reading
/// the head stunnel sent; it records that head.
fn ntlm_only_proxy() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).is_ok_and(|n| n == 1) {
                head.push(b[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            let _ = s.write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\n\
                  Proxy-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n",
            );
        }
    });
    (addr, rx)
}

#[test]
fn ntlm_only_proxy_is_reported() {
    let (addr, heads) = ntlm_only_proxy();
    let url = format!("http://{USER}:{PASS_IN_URL}@{addr}");
    let o = doctor(&[&url, "--target", "127.0.0.1:443", "--json"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains(r#""check":"connect""#), "{out}");
    assert!(out.contains(r#""outcome":"fail""#), "{out}");
    assert!(out.contains("schemes offered: NTLM, Negotiate"), "{out}");
    assert!(out.contains("cannot serve a migration"), "{out}");
    assert!(out.contains(r#""ok":false"#), "{out}");
    // What arrived is what stunnel sends: lower-case scheme, decoded password.
    let head = heads.recv_timeout(Duration::from_secs(5)).unwrap();
    let token = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"))
    };
    assert_eq!(
        head,
        format!(
            "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\
             Proxy-Authorization: basic {token}\r\n\r\n"
        )
    );
}

#[test]
fn unreachable_proxy_fails() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let o = doctor(&[
        &format!("http://127.0.0.1:{port}"),
        "--target",
        "127.0.0.1:443",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(line(&out, "connect").contains("not reachable"), "{out}");
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let o = doctor(&["http://u:hunter2@127.0.0.1", "--target", "127.0.0.1:443"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no port") && err.contains("connect = 127.0.0.1:"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    let o = doctor(&["http://127.0.0.1:3128"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
}
