//! `--metrics-listen` end to end: the real binary, real tunnels moving known
//! byte counts, refusals of each kind, then exact deltas on `/metrics`;
//! `/healthz`, and `/readyz` turning 503 at SIGTERM while a tunnel drains.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use splice_proxy_tests::metrics::{
    SOCKMAP_FAMILIES, get, samples, scrape, scrape_text, value, wait_healthy,
};
use splice_proxy_tests::rawhttp::{basic, closed_port, connect_head, exchange, run_cli};
use splice_proxy_tests::torture::Upstream;
use splice_proxy_tests::{Proxy, TEST_POLICY, access_field, free_port};

const USER: &str = "mig";
const PASS: &str = "s3cr:et";
/// Bytes the client sends up, and the reply upstream sends down, per tunnel.
const UP: usize = 300_001;
const DOWN: usize = 200_003;
/// Bytes sent up before the client resets its tunnel.
const RESET_UP: usize = 1_000;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Sends `up` through the tunnel, shuts its write side, and returns everything that comes back
/// until the far end closes; then the tunnel is closed.
fn round_trip(t: TcpStream, up: Vec<u8>) -> Vec<u8> {
    t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = t.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&up).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    (&t).read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    got
}

/// Sends `down` bytes and reads everything the client sends; closes after
/// both (a clean two-way close).
fn reply_upstream(down: usize) -> Upstream {
    Upstream::start_with(move |s: TcpStream| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(mut w) = s.try_clone() else { return };
        let writer = std::thread::spawn(move || w.write_all(&pattern(down, 0x5a)));
        let mut r = &s;
        let _ = std::io::copy(&mut r, &mut std::io::sink());
        let _ = writer.join();
        let _ = s.shutdown(Shutdown::Write);
    })
    .unwrap()
}

/// Reads until EOF or error, counting bytes; sends nothing.
fn sink_upstream(received: Arc<AtomicU64>) -> Upstream {
    Upstream::start_with(move |mut s: TcpStream| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            received.fetch_add(n as u64, Ordering::SeqCst);
        }
        let _ = s.shutdown(Shutdown::Write);
    })
    .unwrap()
}

fn status_of(proxy: &Proxy, target: &str, auth: Option<(&str, &str)>) -> u16 {
    let extra: Vec<String> = auth
        .map(|(u, p)| format!("Proxy-Authorization: {}", basic("Basic", u, p)))
        .into_iter()
        .collect();
    exchange(proxy.addr, connect_head(target, &extra).as_bytes())
        .unwrap()
        .1
        .status
}

/// Closes `s` with RST (SO_LINGER 0).
fn reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a valid pointer and size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counts_exactly(mode: &str) {
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let maddr_s = maddr.to_string();
    let creds = format!("{USER}:{PASS}");
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&[
        "--mode",
        mode,
        "--credentials",
        &creds,
        "--metrics-listen",
        &maddr_s,
        "--shutdown-grace",
        "30s",
    ]);
    let mut proxy = Proxy::start(&args).unwrap();
    wait_healthy(maddr);
    assert_eq!(get(maddr, "/readyz").unwrap().0, 200);
    let before_text = scrape_text(maddr);
    let before = samples(&before_text);
    // The eBPF program's families exist for the sockmap data path only.
    if mode != "sockmap" {
        assert!(
            !before_text.contains("splice_proxy_sockmap_"),
            "mode={mode}: sockmap program counters present:\n{before_text}"
        );
    }
    let series = |name: &str, labels: &str| format!("{name}{{{labels}}}");
    let tunnels = |outcome: &str| {
        series(
            "splice_proxy_tunnels_total",
            &format!(r#"mode="{mode}",outcome="{outcome}""#),
        )
    };
    let bytes = |dir: &str| {
        series(
            "splice_proxy_bytes_total",
            &format!(r#"mode="{mode}",direction="{dir}""#),
        )
    };
    let requests = |status: u16| {
        series(
            "splice_proxy_requests_total",
            &format!(r#"status="{status}""#),
        )
    };
    let connect_errors = |kind: &str| {
        series(
            "splice_proxy_upstream_connect_errors_total",
            &format!(r#"kind="{kind}""#),
        )
    };
    let active = series("splice_proxy_tunnels_active", &format!(r#"mode="{mode}""#));
    assert_eq!(
        value(
            &before,
            &series("splice_proxy_info", &format!(r#"mode="{mode}""#))
        ),
        1.0
    );

    // A tunnel that moves UP bytes up and DOWN bytes down, then closes cleanly.
    let reply = reply_upstream(DOWN);
    let t = proxy
        .connect_tunnel(&reply.target(), Some((USER, PASS)))
        .unwrap();
    let got = round_trip(t, pattern(UP, 0xa5));
    assert_eq!(got.len(), DOWN);
    assert!(got == pattern(DOWN, 0x5a), "bytes down differ");

    // A tunnel the client resets after RESET_UP bytes reached upstream.
    let received = Arc::new(AtomicU64::new(0));
    let sink = sink_upstream(received.clone());
    let mut t = proxy
        .connect_tunnel(&sink.target(), Some((USER, PASS)))
        .unwrap();
    t.write_all(&pattern(RESET_UP, 1)).unwrap();
    wait_for("the bytes before the reset", || {
        received.load(Ordering::SeqCst) == RESET_UP as u64
    });
    reset(t);

    // Refusals: 407, 403 (destination not allowed), 502 (nothing listening).
    assert_eq!(status_of(&proxy, &reply.target(), None), 407);
    assert_eq!(status_of(&proxy, "192.0.2.1:443", Some((USER, PASS))), 403);
    let closed = format!("127.0.0.1:{}", closed_port());
    assert_eq!(status_of(&proxy, &closed, Some((USER, PASS))), 502);

    // Tunnels are counted when they end: wait for both.
    let mut after = scrape(maddr);
    wait_for("both tunnels to be counted", || {
        after = scrape(maddr);
        let d = |s: &str| value(&after, s) - value(&before, s);
        d(&tunnels("closed")) + d(&tunnels("client_reset")) >= 2.0
    });
    let d = |s: &str| value(&after, s) - value(&before, s);
    let mut wrong = Vec::new();
    let mut expect = |s: String, want: f64| {
        if d(&s) != want {
            wrong.push(format!("{s}: delta {} want {want}", d(&s)));
        }
    };
    expect(tunnels("closed"), 1.0);
    expect(tunnels("client_reset"), 1.0);
    for outcome in ["upstream_reset", "idle_timeout", "shutdown", "failed"] {
        expect(tunnels(outcome), 0.0);
    }
    expect(bytes("up"), (UP + RESET_UP) as f64);
    expect(bytes("down"), DOWN as f64);
    expect(requests(200), 2.0);
    expect(requests(407), 1.0);
    expect(requests(403), 1.0);
    expect(requests(502), 1.0);
    expect("splice_proxy_auth_failures_total".into(), 1.0);
    expect(connect_errors("refused"), 1.0);
    for kind in ["dns", "timeout", "denied"] {
        expect(connect_errors(kind), 0.0);
    }
    expect("splice_proxy_handshake_seconds_count".into(), 2.0);
    if mode == "sockmap" {
        // Far below the default backlog bound: every byte was spliced (each direction starts
        // spliced) or redirected by the program, none held.
        let moved = d("splice_proxy_sockmap_redirected_bytes_total")
            + d("splice_proxy_sockmap_spliced_bytes_total");
        assert_eq!(
            moved,
            (UP + DOWN + RESET_UP) as f64,
            "redirected + spliced bytes"
        );
        expect("splice_proxy_sockmap_held_bytes_total".into(), 0.0);
        expect("splice_proxy_sockmap_passed_bytes_total".into(), 0.0);
    } else {
        let present: Vec<&String> = after
            .keys()
            .filter(|k| k.starts_with("splice_proxy_sockmap_"))
            .collect();
        assert!(present.is_empty(), "mode={mode}: {present:?}");
    }
    assert!(wrong.is_empty(), "mode={mode}:\n{}", wrong.join("\n"));
    assert_eq!(value(&after, &active), 0.0);

    // Readiness: a tunnel stays open across SIGTERM; /readyz turns 503 at
    // once while the tunnel drains and /healthz stays 200.
    let received = Arc::new(AtomicU64::new(0));
    let sink = sink_upstream(received.clone());
    let mut open = proxy
        .connect_tunnel(&sink.target(), Some((USER, PASS)))
        .unwrap();
    wait_for("the open tunnel to be active", || {
        value(&scrape(maddr), &active) == 1.0
    });
    assert_eq!(get(maddr, "/readyz").unwrap().0, 200);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    let signalled = Instant::now();
    wait_for("/readyz 503 after SIGTERM", || {
        get(maddr, "/readyz").unwrap().0 == 503
    });
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "/readyz took {:?} to turn 503",
        signalled.elapsed()
    );
    assert!(
        proxy.try_status().unwrap().is_none(),
        "the proxy must still be draining"
    );
    assert_eq!(get(maddr, "/healthz").unwrap(), (200, "ok\n".into()));
    // The open tunnel still works during the drain.
    open.write_all(b"still here").unwrap();
    wait_for("bytes through the draining tunnel", || {
        received.load(Ordering::SeqCst) == 10
    });
    open.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).unwrap();
    drop(open);
    assert_eq!(
        proxy.signal_and_wait(0, Duration::from_secs(10)).unwrap(),
        Some(0),
        "mode={mode}: exit after the drain"
    );
}

#[test]
fn copy_mode_counts_exactly() {
    counts_exactly("copy");
}

#[test]
fn splice_mode_counts_exactly() {
    counts_exactly("splice");
}

/// Sockmap byte counts come from the eBPF program's counters: the same exact
/// deltas, where `splice-proxy probe` says sockmap loads here.
#[test]
fn sockmap_mode_counts_exactly_where_it_loads() {
    let (_, _, probe) = run_cli(&["probe"], Duration::from_secs(30)).unwrap();
    if !probe.lines().any(|l| l.starts_with("sockmap ok")) {
        eprintln!("skipped: sockmap does not load here: {probe}");
        return;
    }
    counts_exactly("sockmap");
}

/// Bytes up and down through the one tunnel of `sockmap_program_counters_on_metrics`: several
/// MiB each way, yet below the default backlog bound's hold threshold (15.5 MiB), so the program
/// redirects every byte and holds none.
const PROGRAM_UP: usize = 6 * 1024 * 1024 + 13;
const PROGRAM_DOWN: usize = 3 * 1024 * 1024 + 29;

/// The eBPF program's global counters on `/metrics`: one tunnel moves known bytes each way, and
/// `splice_proxy_sockmap_redirected_bytes_total` grows by exactly those bytes, which are also
/// exactly what the access log reports for the tunnel; nothing held, nothing passed.
#[test]
fn sockmap_program_counters_on_metrics() {
    let (_, _, probe) = run_cli(&["probe"], Duration::from_secs(30)).unwrap();
    if !probe.lines().any(|l| l.starts_with("sockmap ok")) {
        eprintln!("skipped: sockmap does not load here: {probe}");
        return;
    }
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    // On the kernel path from the first byte, so the program's counters see every one.
    args.extend_from_slice(&[
        "--mode",
        "sockmap",
        "--allow-anonymous",
        "--sockmap-start",
        "kernel",
    ]);
    let (proxy, maddr) = Proxy::start_with_metrics(&args).unwrap();
    wait_healthy(maddr);
    let text = scrape_text(maddr);
    for family in SOCKMAP_FAMILIES {
        assert!(
            text.contains(&format!("\n# TYPE {family} counter\n")),
            "{family} is not a counter:\n{text}"
        );
    }
    let before = samples(&text);
    // The start-up self-check's tunnels went through the program already.
    assert!(value(&before, SOCKMAP_FAMILIES[0]) > 0.0, "{text}");

    let reply = reply_upstream(PROGRAM_DOWN);
    let target = reply.target();
    let t = proxy.connect_tunnel(&target, None).unwrap();
    let got = round_trip(t, pattern(PROGRAM_UP, 0x3c));
    assert!(got == pattern(PROGRAM_DOWN, 0x5a), "bytes down differ");

    let line = proxy
        .wait_for_log(&format!("target=\"{target}\""), Duration::from_secs(10))
        .unwrap();
    assert!(
        line.contains("mode=sockmap") && line.contains(" end=closed"),
        "{line}"
    );
    let logged =
        access_field(&line, "bytes_up").unwrap() + access_field(&line, "bytes_down").unwrap();
    assert_eq!(logged, (PROGRAM_UP + PROGRAM_DOWN) as u64, "{line}");

    let after = scrape(maddr);
    let delta = |family: &str| value(&after, family) - value(&before, family);
    let redirected = delta("splice_proxy_sockmap_redirected_bytes_total");
    assert_eq!(
        redirected, logged as f64,
        "the program's redirected bytes grew by {redirected}, the tunnel moved {logged}"
    );
    let segments = delta("splice_proxy_sockmap_redirected_segments_total");
    assert!(
        segments >= 2.0 && segments <= redirected,
        "{segments} segments for {redirected} bytes"
    );
    for family in [
        "splice_proxy_sockmap_held_bytes_total",
        "splice_proxy_sockmap_hold_episodes_total",
        "splice_proxy_sockmap_passed_bytes_total",
        "splice_proxy_sockmap_passed_segments_total",
    ] {
        assert_eq!(delta(family), 0.0, "{family}");
    }
}

#[test]
fn metrics_listen_errors_exit_2_naming_the_flag() {
    let listen = format!("127.0.0.1:{}", free_port());
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    for bad in ["nowhere", "9090", busy.as_str(), listen.as_str()] {
        let args = ["run", "--listen", &listen, "--metrics-listen", bad];
        let (code, stderr, _) = run_cli(&args, Duration::from_secs(10)).unwrap();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(
            lines.len() == 1 && lines[0].contains("--metrics-listen"),
            "{bad}: {stderr:?}"
        );
    }
}

#[test]
fn no_metrics_listener_unless_asked() {
    let proxy = Proxy::start_mode("copy", &[]).unwrap();
    let ready = || {
        proxy
            .log()
            .into_iter()
            .find(|l| l.contains("splice-proxy ready"))
    };
    wait_for("the ready line", || ready().is_some());
    let line = ready().unwrap();
    assert!(line.contains("metrics=None"), "{line}");
}
