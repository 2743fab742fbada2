//! Abuse limits end to end (issue 6, "Abuse"): `--max-handshakes`, each
//! checked on the wire and on `/metrics`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use splice_proxy_tests::rawhttp::{
    basic, connect, connect_from, connect_head, echo_upstream, expect_failure, metric, proxy_error,
    read_head, run_cli,
};
use splice_proxy_tests::{Proxy, TEST_POLICY, free_port};

const OK_200: &str = "HTTP/1.1 200 Connection established\r\n\r\n";

/// A proxy with a metrics listener; returns it and the metrics address.
fn proxy_with_metrics(extra: &[&str]) -> (Proxy, SocketAddr) {
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--mode", "copy"]);
    args.extend_from_slice(extra);
    let (proxy, maddr) = Proxy::start_with_metrics(&args).expect("start proxy");
    // Let the proxy see the end of the harness's readiness probe (a
    // connection from 127.0.0.1 that counts against per-address caps).
    std::thread::sleep(Duration::from_millis(200));
    (proxy, maddr)
}

/// Writes the first half of a CONNECT head: the handshake stays in progress.
fn half_head(proxy: &Proxy, target: &str) -> TcpStream {
    let mut s = connect(proxy.addr, Duration::from_secs(5)).unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\n").as_bytes())
        .unwrap();
    s
}

/// The head arrives; the answer must be 503 with `Connection: close`.
fn expect_503(proxy: &Proxy, target: &str) {
    let mut s = connect(proxy.addr, Duration::from_secs(5)).unwrap();
    let _ = s.write_all(connect_head(target, &[]).as_bytes());
    let r = read_head(&mut s).expect("a response");
    expect_failure(&mut s, &r, 503).unwrap();
    // A limit on clients, not on connections to next hops.
    assert_eq!(proxy_error(&r), "http_request_denied", "{:?}", r.raw);
}

#[test]
fn max_handshakes_refuses_beyond_the_cap_and_frees_slots_at_the_reply() {
    let echo = echo_upstream().unwrap();
    let target = echo.target();
    let (proxy, maddr) = proxy_with_metrics(&["--allow-anonymous", "--max-handshakes", "3"]);
    let rejected = r#"splice_proxy_limit_rejections_total{limit="handshakes"}"#;
    assert_eq!(metric(maddr, rejected), 0.0);

    // An established tunnel does not hold a handshake slot.
    let (mut tunnel, r) =
        splice_proxy_tests::rawhttp::exchange(proxy.addr, connect_head(&target, &[]).as_bytes())
            .unwrap();
    assert_eq!(r.raw, OK_200);

    // Three handshakes in progress fill the cap; the fourth is refused.
    let mut pending: Vec<TcpStream> = (0..3).map(|_| half_head(&proxy, &target)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    expect_503(&proxy, &target);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "503 took {:?}",
        started.elapsed()
    );
    assert_eq!(metric(maddr, rejected), 1.0);

    // The established tunnel still carries bytes while the cap is full.
    tunnel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    tunnel.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    tunnel.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still here");

    // One pending handshake completes: its slot is free as soon as the 200
    // is written, while its tunnel stays open.
    let mut done = pending.remove(0);
    done.write_all(format!("Host: {target}\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(read_head(&mut done).unwrap().raw, OK_200);
    std::thread::sleep(Duration::from_millis(100));
    let mut fresh = half_head(&proxy, &target);
    // (admission happens in the connection's task: let it run first)
    std::thread::sleep(Duration::from_millis(200));
    // The cap is full again: refused.
    expect_503(&proxy, &target);
    assert_eq!(metric(maddr, rejected), 2.0);

    // A refusal frees its slot too: a malformed head is answered 400...
    fresh.write_all(b"bogus\r\n\r\n").unwrap();
    assert_eq!(read_head(&mut fresh).unwrap().status, 400);
    std::thread::sleep(Duration::from_millis(100));
    // ...and the next handshake is admitted and served.
    let (_t, r) =
        splice_proxy_tests::rawhttp::exchange(proxy.addr, connect_head(&target, &[]).as_bytes())
            .unwrap();
    assert_eq!(r.raw, OK_200);
    assert_eq!(metric(maddr, rejected), 2.0);
    drop(pending);
}

#[test]
fn max_conns_per_ip_counts_tunnels_and_handshakes_of_one_address() {
    let echo = echo_upstream().unwrap();
    let target = echo.target();
    let (proxy, maddr) = proxy_with_metrics(&["--allow-anonymous", "--max-conns-per-ip", "2"]);
    let rejected = r#"splice_proxy_limit_rejections_total{limit="per_ip"}"#;
    assert_eq!(metric(maddr, rejected), 0.0);

    // From 127.0.0.1: one established tunnel and one handshake in progress.
    let (tunnel, r) =
        splice_proxy_tests::rawhttp::exchange(proxy.addr, connect_head(&target, &[]).as_bytes())
            .unwrap();
    assert_eq!(r.raw, OK_200);
    let pending = half_head(&proxy, &target);
    std::thread::sleep(Duration::from_millis(200));
    // A third connection from the same address is refused at once.
    let started = Instant::now();
    expect_503(&proxy, &target);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(metric(maddr, rejected), 1.0);

    // Another client address (127.0.0.2, also loopback) is served.
    let other = from_addr("127.0.0.2", proxy.addr);
    let mut other = other;
    other
        .write_all(connect_head(&target, &[]).as_bytes())
        .unwrap();
    assert_eq!(read_head(&mut other).unwrap().raw, OK_200);
    assert_eq!(
        metric(
            maddr,
            r#"splice_proxy_limit_rejections_total{limit="handshakes"}"#
        ),
        0.0
    );

    // Closing the tunnel frees a place for 127.0.0.1.
    drop(tunnel);
    drop(pending);
    std::thread::sleep(Duration::from_millis(300));
    let (_t, r) =
        splice_proxy_tests::rawhttp::exchange(proxy.addr, connect_head(&target, &[]).as_bytes())
            .unwrap();
    assert_eq!(r.raw, OK_200);
    assert_eq!(metric(maddr, rejected), 1.0);
}

/// A connection to `to` from the loopback address `from` (any 127/8 works).
fn from_addr(from: &str, to: SocketAddr) -> TcpStream {
    connect_from(from.parse().unwrap(), to, Duration::from_secs(5)).unwrap()
}

/// Sends a CONNECT with `user:pass` from `from`; returns the status and how
/// long the answer took.
fn timed_auth(proxy: &Proxy, from: &str, target: &str, pass: &str) -> (u16, Duration) {
    let mut s = from_addr(from, proxy.addr);
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let auth = format!("Proxy-Authorization: {}", basic("Basic", "mig", pass));
    let started = Instant::now();
    s.write_all(connect_head(target, &[auth]).as_bytes())
        .unwrap();
    let r = read_head(&mut s).unwrap();
    (r.status, started.elapsed())
}

#[test]
fn auth_fail_delay_slows_repeated_407s_from_one_address() {
    let echo = echo_upstream().unwrap();
    let target = echo.target();
    let (proxy, maddr) =
        proxy_with_metrics(&["--credentials", "mig:right", "--auth-fail-delay", "1s"]);
    let delays = "splice_proxy_auth_delays_total";
    assert_eq!(metric(maddr, delays), 0.0);
    let fast = Duration::from_millis(200);

    // Five free failures, answered at once.
    for i in 0..5 {
        let (status, took) = timed_auth(&proxy, "127.0.0.1", &target, "wrong");
        assert_eq!(status, 407);
        assert!(took < fast, "failure {i} took {took:?}");
    }
    assert_eq!(metric(maddr, delays), 0.0);
    // Then 250 ms, 500 ms, then the 1 s cap.
    for (want, i) in [(250, 6), (500, 7), (1000, 8), (1000, 9)] {
        let (status, took) = timed_auth(&proxy, "127.0.0.1", &target, "wrong");
        assert_eq!(status, 407);
        let want = Duration::from_millis(want);
        assert!(
            took >= want && took < want + fast,
            "failure {i} took {took:?}, want {want:?}"
        );
    }
    assert_eq!(metric(maddr, delays), 4.0);
    assert_eq!(metric(maddr, "splice_proxy_auth_failures_total"), 9.0);

    // Another address is not delayed.
    let (status, took) = timed_auth(&proxy, "127.0.0.2", &target, "wrong");
    assert_eq!(status, 407);
    assert!(took < fast, "{took:?}");

    // The right password is served at once, and forgives the address.
    let (status, took) = timed_auth(&proxy, "127.0.0.1", &target, "right");
    assert_eq!(status, 200);
    assert!(took < fast, "{took:?}");
    let (status, took) = timed_auth(&proxy, "127.0.0.1", &target, "wrong");
    assert_eq!(status, 407);
    assert!(took < fast, "{took:?}");
    assert_eq!(metric(maddr, delays), 4.0);
}

#[test]
fn auth_fail_delay_zero_is_off() {
    let echo = echo_upstream().unwrap();
    let target = echo.target();
    let (proxy, maddr) =
        proxy_with_metrics(&["--credentials", "mig:right", "--auth-fail-delay", "0"]);
    for i in 0..10 {
        let (status, took) = timed_auth(&proxy, "127.0.0.1", &target, "wrong");
        assert_eq!(status, 407);
        assert!(
            took < Duration::from_millis(200),
            "failure {i} took {took:?}"
        );
    }
    assert_eq!(metric(maddr, "splice_proxy_auth_delays_total"), 0.0);
}

/// Slowloris: 2,000 connections dribble their head one byte per second
/// each. With the default limits a legitimate client is still served at
/// once while they dribble, and every dribbler is cut at `--header-timeout`.
#[test]
fn slowloris_does_not_starve_legitimate_clients() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const DRIBBLERS: usize = 2000;
    const TIMEOUT: Duration = Duration::from_secs(3);
    let limit = splice_proxy_tests::raise_fd_limit();
    assert!(
        limit >= 2 * DRIBBLERS as u64 + 500,
        "RLIMIT_NOFILE {limit} is too low for {DRIBBLERS} connections"
    );
    let echo = echo_upstream().unwrap();
    let target = echo.target();
    // Default --max-handshakes and --max-conns-per-ip.
    let (proxy, maddr) = proxy_with_metrics(&["--allow-anonymous", "--header-timeout", "3s"]);

    struct Dribbler {
        s: TcpStream,
        opened: Instant,
        /// When the proxy cut it, and what it saw.
        cut: Option<(Instant, String)>,
    }
    let head = format!("CONNECT {target} HTTP/1.1\r\nX-Slow: ");
    let head = head.as_bytes();
    let mut dribblers: Vec<Dribbler> = Vec::with_capacity(DRIBBLERS);
    let opening = Instant::now();
    for _ in 0..DRIBBLERS {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        s.write_all(&head[..1]).unwrap();
        s.set_nonblocking(true).unwrap();
        dribblers.push(Dribbler {
            s,
            opened: Instant::now(),
            cut: None,
        });
    }
    let opened_in = opening.elapsed();
    let alive = Arc::new(AtomicUsize::new(DRIBBLERS));
    let done = Arc::new(AtomicBool::new(false));

    // Legitimate clients, from another thread, while the dribblers dribble.
    let legit = {
        let (alive, done, addr, target) = (alive.clone(), done.clone(), proxy.addr, target.clone());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..5 {
                let dribbling = alive.load(Ordering::SeqCst);
                let started = Instant::now();
                let mut s = connect(addr, Duration::from_secs(5)).unwrap();
                s.write_all(connect_head(&target, &[]).as_bytes()).unwrap();
                let r = read_head(&mut s).map(|r| r.raw);
                let took = started.elapsed();
                s.write_all(b"ping").unwrap();
                let mut back = [0u8; 4];
                s.read_exact(&mut back).unwrap();
                assert_eq!(&back, b"ping");
                results.push((dribbling, took, r.unwrap()));
                std::thread::sleep(Duration::from_millis(100));
            }
            done.store(true, Ordering::SeqCst);
            results
        })
    };

    // Dribble one byte a second each; watch for the proxy cutting them.
    let mut sent = 1usize;
    let mut next_byte = Instant::now() + Duration::from_secs(1);
    let deadline = Instant::now() + TIMEOUT + Duration::from_secs(4);
    let mut buf = [0u8; 512];
    while dribblers.iter().any(|d| d.cut.is_none()) && Instant::now() < deadline {
        let tick = Instant::now() >= next_byte;
        for d in dribblers.iter_mut().filter(|d| d.cut.is_none()) {
            let seen = match (&d.s).read(&mut buf) {
                Ok(0) => Some("eof".to_string()),
                Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) => Some(format!("error: {e}")),
            };
            if let Some(seen) = seen {
                d.cut = Some((Instant::now(), seen));
                alive.fetch_sub(1, Ordering::SeqCst);
            } else if tick {
                let _ = d.s.write(&head[sent % head.len()..][..1]);
            }
        }
        if tick {
            sent += 1;
            next_byte += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let results = legit.join().unwrap();
    assert!(done.load(Ordering::SeqCst));

    let mut worst = Duration::ZERO;
    for (dribbling, took, raw) in &results {
        assert_eq!(raw, OK_200);
        assert!(
            *dribbling >= DRIBBLERS * 9 / 10,
            "legit client ran with only {dribbling} dribblers left"
        );
        assert!(*took < Duration::from_secs(1), "legit 200 took {took:?}");
        worst = worst.max(*took);
    }
    let mut cut_after = Vec::new();
    for d in &dribblers {
        let (at, seen) = d.cut.as_ref().expect("a dribbler was never cut");
        assert!(
            seen.starts_with("HTTP/1.1 408 ") || seen == "eof",
            "dribbler saw {seen:?}"
        );
        cut_after.push(at.duration_since(d.opened));
    }
    cut_after.sort();
    let (first, last) = (cut_after[0], cut_after[cut_after.len() - 1]);
    assert!(
        first >= TIMEOUT - Duration::from_millis(100),
        "cut after {first:?}"
    );
    assert!(
        last < TIMEOUT + Duration::from_millis(1500),
        "cut after {last:?}"
    );
    assert_eq!(
        metric(
            maddr,
            r#"splice_proxy_limit_rejections_total{limit="handshakes"}"#
        ),
        0.0
    );
    assert_eq!(
        metric(maddr, r#"splice_proxy_requests_total{status="408"}"#),
        DRIBBLERS as f64
    );
    eprintln!(
        "slowloris: {DRIBBLERS} dribblers opened in {opened_in:?}; legit 200 in {:?} (worst {worst:?}) with {:?} dribbling; dribblers cut {first:?}..{last:?} after connect",
        results.iter().map(|r| r.1).collect::<Vec<_>>(),
        results.iter().map(|r| r.0).collect::<Vec<_>>(),
    );
}

/// A refusal at accept costs the proxy no descriptor beyond the answer:
/// 200 clients over the per-address cap, all keeping their sockets open,
/// each read a whole 503, and the proxy's fd count is back at once.
#[test]
fn limit_refusals_are_answered_and_closed_at_once() {
    let echo = echo_upstream().unwrap();
    let target = echo.target();
    let (proxy, maddr) = proxy_with_metrics(&["--allow-anonymous", "--max-conns-per-ip", "1"]);
    let (_holder, r) =
        splice_proxy_tests::rawhttp::exchange(proxy.addr, connect_head(&target, &[]).as_bytes())
            .unwrap();
    assert_eq!(r.raw, OK_200);
    std::thread::sleep(Duration::from_millis(100));
    let baseline = proxy.fd_count();
    let mut clients: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = connect(proxy.addr, Duration::from_secs(5)).unwrap();
            let _ = s.write_all(connect_head(&target, &[]).as_bytes());
            s
        })
        .collect();
    for s in &mut clients {
        let r = read_head(s).expect("a whole 503 before the close");
        assert_eq!(r.status, 503, "{:?}", r.raw);
        assert!(r.has_token("Connection", "close"), "{:?}", r.raw);
    }
    // The clients still hold their ends open; the proxy holds none of them.
    std::thread::sleep(Duration::from_millis(300));
    let now = proxy.fd_count();
    assert!(now <= baseline + 2, "proxy fds {baseline} -> {now}");
    assert_eq!(
        metric(
            maddr,
            r#"splice_proxy_limit_rejections_total{limit="per_ip"}"#
        ),
        200.0
    );
}

#[test]
fn bad_limit_values_exit_2_naming_the_flag() {
    let local = format!("127.0.0.1:{}", free_port());
    for (flag, value) in [
        ("--max-handshakes", "0"),
        ("--max-handshakes", "many"),
        ("--max-conns-per-ip", "-1"),
        ("--max-conns-per-ip", "lots"),
        ("--auth-fail-delay", "soon"),
        ("--auth-fail-delay", "2h"),
    ] {
        let arg = format!("{flag}={value}");
        let (code, stderr, _) =
            run_cli(&["run", "--listen", &local, &arg], Duration::from_secs(5)).unwrap();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(code, Some(2), "{arg}: {stderr}");
        assert!(
            lines.len() == 1 && lines[0].contains(flag),
            "{arg}: want one line naming {flag}: {stderr:?}"
        );
    }
}
