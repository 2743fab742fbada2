//! `--allow-src` end to end (issue 14, "Source allow-list"): a client from
//! outside every listed network gets `403` before its head is read, counted
//! in `/metrics` and in one access-log event, and reaches no upstream; a
//! listed client is served; an IPv4 client of an IPv6 listener (an
//! IPv4-mapped peer address) is judged by its IPv4 address. All of it with
//! `--allow-anonymous`, anonymous by source network being the point.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use splice_proxy_tests::metrics::scrape;
use splice_proxy_tests::rawhttp::{
    connect_from, connect_head, echo_upstream, expect_failure, metric, proxy_error, proxy_status,
    read_head,
};
use splice_proxy_tests::{Proxy, TEST_POLICY, free_port};

const OK_200: &str = "HTTP/1.1 200 Connection established\r\n\r\n";
const REFUSED: &str = r#"splice_proxy_limit_rejections_total{limit="allow_src"}"#;
const ANSWERED_403: &str = r#"splice_proxy_requests_total{status="403"}"#;

/// An anonymous proxy for clients from 127.0.0.1 only, with `/metrics`.
fn proxy(extra: &[&str]) -> (Proxy, SocketAddr) {
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&[
        "--mode",
        "copy",
        "--allow-anonymous",
        "--allow-src",
        "127.0.0.1/32",
    ]);
    args.extend_from_slice(extra);
    Proxy::start_with_metrics(&args).expect("start proxy")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A connection from `from` to `to` must be answered `403` without sending
/// a byte, then closed; `head` is sent afterwards, if given, and changes
/// nothing.
fn expect_403_unasked(from: &str, to: SocketAddr, head: Option<&str>) {
    let mut s = connect_from(ip(from), to, Duration::from_secs(5)).unwrap();
    let r = read_head(&mut s).expect("a 403 before any byte is sent");
    if let Some(head) = head {
        let _ = s.write_all(head.as_bytes());
    }
    assert_eq!(r.header("Content-Type"), Some("text/plain"), "{:?}", r.raw);
    expect_failure(&mut s, &r, 403).unwrap();
    assert_eq!(proxy_error(&r), "http_request_denied", "{:?}", r.raw);
    let (_, details) = proxy_status(&r).unwrap();
    assert!(details.contains("--allow-src"), "{details:?}");
}

/// Access-log events of connections from `client_ip` answered with `status`,
/// once at least `n` are logged (within 5 s).
fn access_events(proxy: &Proxy, client_ip: &str, status: u16, n: usize) -> Vec<String> {
    let (client, status) = (format!("client={client_ip}:"), format!("status={status} "));
    proxy.access_events(&[&client, &status], n, Duration::from_secs(5))
}

#[test]
fn a_client_outside_allow_src_gets_403_before_its_head_and_a_listed_one_is_served() {
    let echo = echo_upstream().unwrap();
    let target = echo.target();
    let (proxy, maddr) = proxy(&[]);
    // The series exists before the first refusal.
    assert_eq!(scrape(maddr).get(REFUSED), Some(&0.0));

    // From 127.0.0.2: answered before it sends anything, and after it sends a head.
    expect_403_unasked("127.0.0.2", proxy.addr, None);
    expect_403_unasked("127.0.0.2", proxy.addr, Some(&connect_head(&target, &[])));
    assert_eq!(metric(maddr, REFUSED), 2.0);
    assert_eq!(metric(maddr, ANSWERED_403), 2.0);
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        0,
        "a refused client reached the upstream"
    );
    // One access-log event each, with the reason.
    let events = access_events(&proxy, "127.0.0.2", 403, 2);
    assert_eq!(events.len(), 2, "{events:#?}");
    for e in &events {
        assert!(e.contains("client address not in --allow-src"), "{e}");
        assert!(e.contains("end=refused"), "{e}");
    }

    // From 127.0.0.1: a tunnel.
    let mut s = connect_from(ip("127.0.0.1"), proxy.addr, Duration::from_secs(5)).unwrap();
    s.write_all(connect_head(&target, &[]).as_bytes()).unwrap();
    assert_eq!(read_head(&mut s).unwrap().raw, OK_200);
    s.write_all(b"listed").unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"listed");
    assert_eq!(metric(maddr, REFUSED), 2.0);
    assert_eq!(
        metric(
            maddr,
            r#"splice_proxy_limit_rejections_total{limit="per_ip"}"#
        ) + metric(
            maddr,
            r#"splice_proxy_limit_rejections_total{limit="handshakes"}"#
        ),
        0.0
    );
}

#[test]
fn an_ipv4_client_of_an_ipv6_listener_is_judged_by_its_ipv4_address() {
    // An AF_INET6 listener on the IPv4-mapped loopback address: IPv4 clients
    // arrive as ::ffff:127.0.0.x peers. (A non-loopback address to the
    // configuration: anonymous there, with --allow-src, starts as is.)
    let port = free_port();
    let mapped = format!("[::ffff:127.0.0.1]:{port}");
    let (proxy, maddr) = proxy(&["--listen", &mapped]);
    let via: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let echo = echo_upstream().unwrap();

    expect_403_unasked("127.0.0.2", via, None);
    let events = access_events(&proxy, "[::ffff:127.0.0.2]", 403, 1);
    assert_eq!(events.len(), 1, "{:#?}", proxy.log());
    assert_eq!(metric(maddr, REFUSED), 1.0);

    let mut s = TcpStream::connect(via).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(connect_head(&echo.target(), &[]).as_bytes())
        .unwrap();
    assert_eq!(read_head(&mut s).unwrap().raw, OK_200);
    assert!(
        !proxy.log().iter().any(|l| l.contains("open proxy")),
        "warned of an open proxy despite --allow-src: {:#?}",
        proxy.log()
    );
}
