//! The default data path moves a reader-bound direction off the kernel path to splice(2) and
//! back (`--sockmap-overrun splice`, docs/kernel-notes.md "Leaving the kernel path") without
//! losing, duplicating or reordering a byte: readers that alternate between slow and fast make
//! both directions of a tunnel go kernel → splice → kernel hundreds of times, every byte checked
//! with SHA-256 both ways, no backlog drop and at most a few segments dropped for receive
//! memory (retransmitted; host-wide counters, see the test); FIN and RST arrive in the
//! middle of transitions; a thousand tunnels transition at once; everything is released after.
//!
//! The tests in this file share the machine's TCP drop counters, so they run one at a time.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use splice_proxy_tests::resources::{Usage, settle};
use splice_proxy_tests::torture::set_linger_zero;
use splice_proxy_tests::{Proxy, TEST_POLICY, access_field, raise_fd_limit, serial};

fn sockmap_proxy(extra: &[&str]) -> Proxy {
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--mode", "sockmap", "--allow-anonymous"]);
    args.extend_from_slice(extra);
    Proxy::start(&args).unwrap_or_else(|e| panic!("sockmap must load here: {e:#}"))
}

/// A deterministic stream: byte `i` of stream `seed`.
fn fill(buf: &mut [u8], offset: u64, seed: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        let i = offset + k as u64;
        *b = ((i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8;
    }
}

/// Writes `len` bytes of stream `seed`, then FIN; returns their SHA-256.
fn send_stream(mut s: &TcpStream, len: u64, seed: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill(&mut buf[..n], off, seed);
        s.write_all(&buf[..n]).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
    h.finalize().into()
}

/// Writes stream `seed` at about `rate` bytes/s for `secs`, then FIN; returns (bytes, SHA-256).
fn send_for(mut s: &TcpStream, secs: Duration, rate: f64, seed: u64) -> (u64, [u8; 32]) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let started = Instant::now();
    let mut off = 0;
    while started.elapsed() < secs {
        fill(&mut buf, off, seed);
        s.write_all(&buf).unwrap();
        h.update(&buf);
        off += buf.len() as u64;
        let due = Duration::from_secs_f64(off as f64 / rate);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
    s.shutdown(Shutdown::Write).unwrap();
    (off, h.finalize().into())
}

/// Reads to EOF, alternately slowly (`slow` long, at about 25 MB/s) and as fast as it can
/// (`fast` long); returns (bytes, SHA-256).
fn read_alternating(mut s: &TcpStream, slow: Duration, fast: Duration) -> (u64, [u8; 32]) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let started = Instant::now();
    let cycle = slow + fast;
    let mut n = 0u64;
    loop {
        let got = s.read(&mut buf).unwrap();
        if got == 0 {
            return (n, h.finalize().into());
        }
        h.update(&buf[..got]);
        n += got as u64;
        let phase = Duration::from_nanos((started.elapsed().as_nanos() % cycle.as_nanos()) as u64);
        if phase < slow {
            std::thread::sleep(Duration::from_secs_f64(got as f64 / 25e6));
        }
    }
}

/// TCP counters that go up when a receiving socket drops data (nstat, whole machine).
fn drop_counters() -> Vec<(String, u64)> {
    let out = std::process::Command::new("nstat")
        .args(["-a", "-s", "-z"])
        .output()
        .expect("nstat (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let wanted = [
        "TcpExtRcvPruned",
        "TcpExtTCPBacklogDrop",
        "TcpExtTCPRcvQDrop",
        "TcpExtTCPDSACKOldSent",
        "TcpExtTCPDSACKOfoSent",
        "TcpExtTCPZeroWindowDrop",
        "TcpExtTCPOFODrop",
        "TcpExtPAWSEstab",
    ];
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?;
            let v = w.next()?.parse().ok()?;
            wanted.contains(&name).then(|| (name.to_string(), v))
        })
        .collect()
}

/// The summed drop counts (`ss -m`, `skmem:(…,d<N>)`) of the proxy's sockets: those on its
/// listening port and those to the upstream's.
fn socket_drops(proxy_port: u16, upstream_port: u16) -> u64 {
    let filter = format!("( sport = :{proxy_port} or dport = :{upstream_port} )");
    let out = std::process::Command::new("ss")
        .args(["-tnm", "state", "established", &filter])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .split("skmem:(")
        .skip(1)
        .filter_map(|m| {
            let inner = m.split(')').next()?;
            inner
                .split(',')
                .find_map(|f| f.strip_prefix('d').and_then(|v| v.parse::<u64>().ok()))
        })
        .sum()
}

fn counter(c: &[(String, u64)], name: &str) -> u64 {
    c.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v)
}

fn access_line(proxy: &Proxy, within: Duration) -> String {
    proxy
        .wait_for_log("status=200", within)
        .expect("an access-log line")
}

/// The sum of an access-log field over every tunnel the proxy logged.
fn logged(proxy: &Proxy, name: &str) -> u64 {
    proxy
        .log()
        .iter()
        .filter_map(|l| access_field(l, name))
        .sum()
}

/// Descriptors (sockets, pipes, epoll sets) and map entries are back to what they were.
fn assert_released(proxy: &Proxy, baseline: &Usage, within: Duration) {
    let after = settle(proxy.pid(), baseline, within);
    assert!(
        after.fds <= baseline.fds && after.maps == baseline.maps,
        "not back to baseline: {} against {}",
        after.describe(),
        baseline.describe()
    );
}

#[test]
fn alternating_readers_transition_hundreds_of_times_both_ways_byte_exact() {
    let _serial = serial();
    let proxy = sockmap_proxy(&[]);
    let baseline = Usage::of(proxy.pid());
    let drops_before = drop_counters();
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_port = upstream.local_addr().unwrap().port();
    let target = upstream.local_addr().unwrap().to_string();
    // Senders at a rate the kernel path carries (both directions at once on two CPUs), readers
    // slower than that for a moment and then faster: a slow phase fills the direction's queue
    // past the soft threshold, a fast phase drains it, outlasts the quiet period and then keeps
    // the kernel path long enough for the direction not to back off (sockmap/backoff.rs). Each
    // 380 ms cycle is one round trip per direction: about 158 transitions each way in 30 s.
    const SECS: Duration = Duration::from_secs(30);
    const RATE: f64 = 150e6;
    let (slow, fast) = (Duration::from_millis(80), Duration::from_millis(300));

    let server = std::thread::spawn(move || {
        let (s, _) = upstream.accept().unwrap();
        socket2::SockRef::from(&s)
            .set_recv_buffer_size(256 << 10)
            .unwrap();
        let writer = std::thread::spawn({
            let s = s.try_clone().unwrap();
            move || send_for(&s, SECS, RATE, 2)
        });
        let got = read_alternating(&s, slow, fast);
        (got, writer.join().unwrap())
    });
    let tunnel = proxy.connect_tunnel(&target, None).unwrap();
    socket2::SockRef::from(&tunnel)
        .set_recv_buffer_size(256 << 10)
        .unwrap();
    let writer = std::thread::spawn({
        let t = tunnel.try_clone().unwrap();
        move || send_for(&t, SECS, RATE, 1)
    });
    let mut max_drops = 0;
    let reader = std::thread::spawn({
        let t = tunnel.try_clone().unwrap();
        move || read_alternating(&t, slow, fast)
    });
    while !reader.is_finished() {
        max_drops = max_drops.max(socket_drops(proxy.addr.port(), upstream_port));
        std::thread::sleep(Duration::from_millis(100));
    }
    let down = reader.join().unwrap();
    let up_sent = writer.join().unwrap();
    let (up, down_sent) = server.join().unwrap();
    assert_eq!(up.0, up_sent.0, "client → upstream: bytes");
    assert!(up.1 == up_sent.1, "client → upstream: content differs");
    assert_eq!(down.0, down_sent.0, "upstream → client: bytes");
    assert!(down.1 == down_sent.1, "upstream → client: content differs");
    let total = up.0 + down.0;

    let line = access_line(&proxy, Duration::from_secs(10));
    eprintln!("{line}");
    let field = |name| access_field(&line, name).unwrap_or_else(|| panic!("{name} in {line}"));
    let (detaches, rearms) = (field("detaches"), field("rearms"));
    assert!(
        detaches >= 100 && rearms >= 100,
        "want hundreds of transitions, got {detaches} detaches and {rearms} returns: {line}"
    );
    // An episode whose threshold is reached before the walk is relayed instead: rare.
    assert!(
        field("relays") * 10 <= detaches,
        "too many episodes fell back to relaying: {line}"
    );
    assert_eq!(
        field("kernel_bytes") + field("spliced_bytes") + field("relayed_bytes"),
        total,
        "every byte went through the kernel, by splice, or relayed: {line}"
    );
    assert!(
        field("relayed_bytes") * 20 <= total,
        "more than 5 % of the bytes went through userspace: {line}"
    );
    assert!(
        field("kernel_bytes") > 0 && field("spliced_bytes") > 0,
        "{line}"
    );
    // A socket's drop count also counts what TCP itself discards and the sender retransmits:
    // duplicates of what already arrived (tail loss probes on a busy loopback), data sent into
    // a closed window; and the program's own drop of each direction's zero-length FIN skb.
    let drops_after = drop_counters();
    let delta = |name| counter(&drops_after, name) - counter(&drops_before, name);
    let dups = delta("TcpExtTCPDSACKOldSent")
        + delta("TcpExtTCPDSACKOfoSent")
        + delta("TcpExtTCPZeroWindowDrop")
        + delta("TcpExtPAWSEstab");
    eprintln!(
        "proxy socket drops {max_drops}, segments TCP discarded {dups}: {drops_after:?} from \
         {drops_before:?}"
    );
    // Not asserted equal: a few more segments than those counters account for are dropped on
    // arrival and retransmitted by TCP (every byte still arrives, checked above). A verdict
    // running without its program would drop skbs TCP already acknowledged: the hashes would
    // differ, and the drops would be far more.
    assert!(
        max_drops <= 2 * dups + 16,
        "proxy sockets dropped {max_drops} segments, only {dups} of them accounted for by TCP"
    );
    // A segment dropped because the receive queue was over its buffer (RcvPruned, TCPRcvQDrop)
    // was never acknowledged: the sender retransmits it, and a retransmission overlapping what
    // arrived is trimmed (docs/kernel-notes.md, the duplicated chunks). These counters are
    // host-wide and also rise for the test's own 256 KiB peer sockets: about one run in ten
    // here (with or without TCP keepalive), and the torture suite, all modes, raises them too.
    // So a few are allowed; a data path that overran its socket buffers (67 in one run of the
    // old duplicate defect) would show far more. A backlog drop (a segment lost while the
    // socket was locked) is never expected.
    let pruned = delta("TcpExtRcvPruned") + delta("TcpExtTCPRcvQDrop");
    assert!(
        pruned <= 8,
        "{pruned} segments dropped for receive memory during the run"
    );
    assert_eq!(
        delta("TcpExtTCPBacklogDrop"),
        0,
        "TcpExtTCPBacklogDrop rose during the run"
    );
    assert_released(&proxy, &baseline, Duration::from_secs(10));
}

/// A reader that stalls, so the tunnel leaves the kernel path, then a FIN or RST from either
/// side at a different moment each round: before, during and after the detach and the return.
/// The tunnels start on the kernel path (`--sockmap-start kernel`), so every round has a detach
/// to race.
#[test]
fn fin_and_rst_during_transitions_either_side() {
    let _serial = serial();
    // A small bound makes every round cross the soft threshold within a few MiB.
    let proxy = sockmap_proxy(&["--sockmap-backlog", "4MiB", "--sockmap-start", "kernel"]);
    fin_and_rst_rounds(&proxy);
    let (detaches, relays) = (logged(&proxy, "detaches"), logged(&proxy, "relays"));
    eprintln!("24 rounds: {detaches} detaches, {relays} relays");
    // A round whose walk comes after the threshold is relayed instead of spliced (the reader
    // here is fast, see holds.rs): how many depends on how busy the machine is (13 to 21 detaches
    // here, 4 in one CI run). Either way the direction left the kernel path during the round.
    assert!(
        detaches >= 2 && detaches + relays >= 12,
        "most rounds left the kernel path: {detaches} detaches, {relays} relays"
    );
}

/// The same rounds with the default start: each direction begins spliced, a stalled reader keeps
/// it there and a fast one lets it join the kernel path, and FIN or RST comes at a different
/// moment of that each round.
#[test]
fn fin_and_rst_during_a_spliced_start_either_side() {
    let _serial = serial();
    let proxy = sockmap_proxy(&["--sockmap-backlog", "4MiB"]);
    fin_and_rst_rounds(&proxy);
    let (spliced, rearms) = (logged(&proxy, "spliced_bytes"), logged(&proxy, "rearms"));
    eprintln!("24 rounds: {spliced} bytes spliced, {rearms} joins of the kernel path");
    assert!(spliced > 0, "the rounds started spliced");
}

/// 24 rounds of 24 MiB (half of it before a reset) from alternating sides, with the reader
/// stalling 0 to 105 ms first: every byte arrives, a reset delivers nothing extra, and
/// descriptors and map entries return to the baseline.
fn fin_and_rst_rounds(proxy: &Proxy) {
    let baseline = Usage::of(proxy.pid());
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = upstream.local_addr().unwrap().to_string();
    const LEN: u64 = 24 << 20;
    for round in 0..24u64 {
        let stall = Duration::from_millis(round % 8 * 15);
        let client_side = round % 2 == 0;
        let reset = round % 4 >= 2;
        let tunnel = proxy.connect_tunnel(&target, None).unwrap();
        let (server, _) = upstream.accept().unwrap();
        let (src, dst) = if client_side {
            (tunnel, server)
        } else {
            (server, tunnel)
        };
        let reader = std::thread::spawn(move || {
            std::thread::sleep(stall);
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            let end = loop {
                match (&dst).read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(k) => {
                        h.update(&buf[..k]);
                        n += k as u64;
                    }
                    Err(e) => break Err(e),
                }
            };
            (n, <[u8; 32]>::from(h.finalize()), end)
        });
        if reset {
            let mut buf = vec![0u8; 256 << 10];
            let mut off = 0;
            while off < LEN / 2 {
                fill(&mut buf, off, round);
                (&src).write_all(&buf).unwrap();
                off += buf.len() as u64;
            }
            std::thread::sleep(stall / 2);
            set_linger_zero(&src).unwrap();
            drop(src);
            let (n, _, end) = reader.join().unwrap();
            assert!(
                end.is_err() || n <= LEN / 2,
                "round {round}: a reset must not deliver more than was sent"
            );
        } else {
            let sent = send_stream(&src, LEN, round);
            let (n, got, end) = reader.join().unwrap();
            end.unwrap_or_else(|e| panic!("round {round}: reader failed: {e}"));
            assert_eq!(n, LEN, "round {round} (client side: {client_side}): bytes");
            assert!(got == sent, "round {round}: content differs");
        }
    }
    assert_released(proxy, &baseline, Duration::from_secs(20));
}

/// A thousand tunnels whose reader stalls at once leave the kernel path together (their
/// detaches batched into shared walks of the iterator), then drain; every byte arrives, and
/// descriptors (pipes included) and map entries return to the baseline. They start on the
/// kernel path (`--sockmap-start kernel`): with the default start a stalled reader keeps a
/// direction spliced from its first byte, and there would be nothing to detach.
#[test]
fn a_thousand_tunnels_transition_at_once() {
    let _serial = serial();
    let limit = raise_fd_limit();
    const TUNNELS: usize = 1000;
    assert!(limit >= 8 * TUNNELS as u64, "fd limit {limit} too low");
    let proxy = sockmap_proxy(&["--sockmap-backlog", "4MiB", "--sockmap-start", "kernel"]);
    let baseline = Usage::of(proxy.pid());
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = upstream.local_addr().unwrap().to_string();
    const LEN: usize = 3 << 20;
    let mut pairs = Vec::new();
    for _ in 0..TUNNELS {
        let t = proxy.connect_tunnel(&target, None).unwrap();
        let (s, _) = upstream.accept().unwrap();
        socket2::SockRef::from(&s)
            .set_recv_buffer_size(32 << 10)
            .unwrap();
        t.set_nonblocking(true).unwrap();
        pairs.push((t, s));
    }
    // Every client pushes against a reader that does not read yet.
    let mut data = vec![0u8; LEN];
    fill(&mut data, 0, 7);
    let mut offs = vec![0usize; TUNNELS];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && offs.iter().any(|&o| o < LEN) {
        for (i, (t, _)) in pairs.iter().enumerate() {
            if offs[i] < LEN {
                if let Ok(n) = (&*t).write(&data[offs[i]..]) {
                    offs[i] += n;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Now everything is read, and what is still unsent is sent.
    let readers: Vec<_> = pairs
        .iter()
        .map(|(_, s)| {
            let s = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut got = Vec::with_capacity(LEN);
                (&s).read_to_end(&mut got).unwrap();
                got
            })
        })
        .collect();
    for (i, (t, _)) in pairs.iter().enumerate() {
        t.set_nonblocking(false).unwrap();
        (&*t).write_all(&data[offs[i]..]).unwrap();
        t.shutdown(Shutdown::Write).unwrap();
    }
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap();
        assert!(
            got == data,
            "tunnel {i}: {} bytes, or different content",
            got.len()
        );
    }
    drop(pairs);
    assert_released(&proxy, &baseline, Duration::from_secs(30));
    let (detaches, relays) = (logged(&proxy, "detaches"), logged(&proxy, "relays"));
    eprintln!("{TUNNELS} tunnels: {detaches} detaches, {relays} relays");
    assert!(
        detaches >= TUNNELS as u64 / 2,
        "most tunnels left the kernel path: {detaches} detaches, {relays} relays"
    );
}
