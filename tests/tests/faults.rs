//! Fault matrix (issue 6, "Faults"): every fault in [`FAULTS`] against every
//! data path in `modes()`, each case on the real binary with real sockets on
//! loopback. Each case asserts that nothing acknowledged to a sender is lost
//! or changed (every byte a receiver got is the sender's pattern at its
//! offset), that the tunnel ends where it must, and that the proxy's
//! descriptors and eBPF map entries return to their baseline.
//!
//! Not repeated here: resets mid-stream and half-close (`torture.rs`), the
//! eBPF objects freed after SIGKILL (`sockmap.rs`), `/readyz` during the
//! drain (`metrics.rs`). `cargo test --release -p splice-proxy-tests --test
//! faults -- --nocapture` prints one line per fault and mode.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use splice_proxy_tests::blackhole::Blackhole;
use splice_proxy_tests::rawhttp::{connect, connect_head, read_head};
use splice_proxy_tests::resources::{Usage, cpu_secs, settle};
use splice_proxy_tests::torture::{
    Pattern, PeerOpts, TunnelRun, TunnelSpec, Upstream, finish_tunnel_opts, run_seed, run_tunnel,
    set_linger_zero,
};
use splice_proxy_tests::{Proxy, TEST_POLICY, free_port, modes, raise_fd_limit, serial};

/// A fault, and the function that inflicts it on one data path.
struct Fault {
    name: &'static str,
    run: fn(&str) -> Result<String>,
}

/// The matrix: each row runs against every mode in `modes()`.
const FAULTS: &[Fault] = &[
    Fault {
        name: "upstream_accepts_then_resets",
        run: upstream_accepts_then_resets,
    },
    Fault {
        name: "upstream_stalls_forever",
        run: upstream_stalls_forever,
    },
    Fault {
        name: "client_vanishes_without_fin",
        run: client_vanishes_without_fin,
    },
    Fault {
        name: "upstream_closes_while_client_sends",
        run: upstream_closes_while_client_sends,
    },
    Fault {
        name: "sigterm_mid_transfer",
        run: sigterm_mid_transfer,
    },
    Fault {
        name: "sigterm_grace_runs_out",
        run: sigterm_grace_runs_out,
    },
    Fault {
        name: "sigkill_mid_transfer",
        run: sigkill_mid_transfer,
    },
    Fault {
        name: "emfile",
        run: emfile,
    },
];

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// How long a tunnel may take to notice a fault and end (a deadline against
/// hangs, not a measurement: the figures are printed).
const PROMPT: Duration = Duration::from_secs(10);
/// `--idle-timeout` for the cases it ends.
const IDLE: &str = "1s";

/// Runs one row of [`FAULTS`] against every mode; fails listing each mode
/// that failed.
fn matrix(name: &str) {
    let _g = serial();
    raise_fd_limit();
    let fault = FAULTS
        .iter()
        .find(|f| f.name == name)
        .expect("a row of FAULTS");
    let mut failures = Vec::new();
    for mode in modes() {
        let t0 = Instant::now();
        let res = (fault.run)(&mode);
        let took = t0.elapsed().as_secs_f64();
        match res {
            Ok(figures) => {
                eprintln!("[faults] fault={name} mode={mode} ok ({took:.1}s) | {figures}")
            }
            Err(e) => {
                eprintln!("[faults] fault={name} mode={mode} FAIL ({took:.1}s) | {e:#}");
                failures.push(format!("mode={mode}: {e:#}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "fault {name} failed:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn upstream_accepts_then_resets_matrix() {
    matrix("upstream_accepts_then_resets");
}

#[test]
fn upstream_stalls_forever_matrix() {
    matrix("upstream_stalls_forever");
}

#[test]
fn client_vanishes_without_fin_matrix() {
    matrix("client_vanishes_without_fin");
}

#[test]
fn upstream_closes_while_client_sends_matrix() {
    matrix("upstream_closes_while_client_sends");
}

#[test]
fn sigterm_mid_transfer_matrix() {
    matrix("sigterm_mid_transfer");
}

#[test]
fn sigterm_grace_runs_out_matrix() {
    matrix("sigterm_grace_runs_out");
}

#[test]
fn sigkill_mid_transfer_matrix() {
    matrix("sigkill_mid_transfer");
}

#[test]
fn emfile_matrix() {
    matrix("emfile");
}

// ------------------------------------------------------------ helpers ----

/// Proxy arguments for `mode` plus `extra`.
fn args<'a>(mode: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a: Vec<&str> = TEST_POLICY.to_vec();
    a.extend_from_slice(&["--mode", mode, "--allow-anonymous"]);
    a.extend_from_slice(extra);
    a
}

/// An upstream that echoes what it reads until EOF.
fn echo_upstream() -> Result<Upstream> {
    Upstream::start_with(|mut s| {
        let mut buf = [0u8; 16 * KIB];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

/// One verified round trip of `len` pattern bytes through an echo tunnel.
fn echo_check(proxy: &Proxy, echo: &Upstream, len: usize) -> Result<()> {
    let mut s = proxy.connect_tunnel(&echo.target(), None)?;
    s.set_read_timeout(Some(PROMPT))?;
    let data = Pattern::new(len as u64).bytes(0, len);
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || {
        let r = w.write_all(&data);
        let _ = w.shutdown(Shutdown::Write);
        r.map(|()| data)
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    let data = writer
        .join()
        .map_err(|_| anyhow!("echo writer panicked"))??;
    ensure!(
        back == data,
        "echo: sent {} bytes, {} came back, or different",
        data.len(),
        back.len()
    );
    Ok(())
}

/// A proxy warmed up by one echo tunnel, and what it holds at rest.
struct Started {
    proxy: Proxy,
    baseline: Usage,
    echo: Upstream,
}

fn start(mode: &str, extra: &[&str]) -> Result<Started> {
    let proxy = Proxy::start(&args(mode, extra))?;
    warm_up(proxy)
}

fn warm_up(proxy: Proxy) -> Result<Started> {
    let echo = echo_upstream()?;
    let before = Usage::of(proxy.pid());
    echo_check(&proxy, &echo, 64 * KIB).context("warm-up tunnel")?;
    let baseline = settle(proxy.pid(), &before, Duration::from_secs(2));
    Ok(Started {
        proxy,
        baseline,
        echo,
    })
}

impl Started {
    /// Descriptors and map entries must come back to the baseline exactly,
    /// and a new tunnel must work.
    fn expect_baseline(&self) -> Result<Usage> {
        let now = settle(self.proxy.pid(), &self.baseline, PROMPT);
        ensure!(
            now.fds == self.baseline.fds && now.maps == self.baseline.maps,
            "not back to baseline within {PROMPT:?}: baseline {}, now {}",
            self.baseline.describe(),
            now.describe()
        );
        echo_check(&self.proxy, &self.echo, 256 * KIB).context("a new tunnel after the fault")?;
        Ok(now)
    }
}

/// Waits for a proxy log line containing every one of `needles`.
fn wait_log(proxy: &Proxy, needles: &[&str]) -> Result<String> {
    let deadline = Instant::now() + PROMPT;
    loop {
        if let Some(l) = proxy
            .log()
            .into_iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return Ok(l);
        }
        if Instant::now() > deadline {
            bail!("no proxy log line with {needles:?} within {PROMPT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of the proxy's log containing `needle`.
fn count_log(proxy: &Proxy, needle: &str) -> usize {
    proxy.log().iter().filter(|l| l.contains(needle)).count()
}

/// How a read on a tunnel socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Eof,
    Error(ErrorKind),
}

/// Reads (and discards) until EOF or an error; fails on a timeout, i.e. if
/// the tunnel is still open after `within`. Returns how and when it ended
/// and how many bytes came first.
fn read_until_end(s: &mut TcpStream, within: Duration) -> Result<(Ended, u64, Instant)> {
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 64 * KIB];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok((Ended::Eof, got, Instant::now())),
            Ok(n) => got += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() > deadline {
                    bail!("the tunnel is still open {within:?} later ({got} bytes read)");
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Ok((Ended::Error(e.kind()), got, Instant::now())),
        }
    }
}

/// Reads `s` to its end, checking every byte against `p` from offset 0;
/// returns the number of bytes, all correct. `within` bounds the wait.
fn read_prefix(s: &mut TcpStream, p: &Pattern, within: Duration) -> Result<u64> {
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 64 * KIB];
    let mut want = vec![0u8; 64 * KIB];
    let mut off = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(off),
            Ok(n) => {
                p.fill(off, &mut want[..n]);
                if buf[..n] != want[..n] {
                    let i = buf[..n].iter().zip(&want[..n]).position(|(a, b)| a != b);
                    bail!(
                        "CORRUPT: byte {} differs from what the sender sent there",
                        off + i.unwrap_or(0) as u64
                    );
                }
                off += n as u64;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() > deadline {
                    bail!("no EOF within {within:?} ({off} bytes read)");
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A reset after the bytes: what arrived is still checked.
            Err(_) => return Ok(off),
        }
    }
}

/// Writes `p`'s bytes from offset 0 until `limit` or an error; returns the
/// bytes written and the error, if any. Writes block at most `stall`.
fn send_pattern(
    s: &mut TcpStream,
    p: &Pattern,
    limit: usize,
    stall: Duration,
) -> (u64, Option<ErrorKind>) {
    let _ = s.set_write_timeout(Some(stall));
    let mut buf = vec![0u8; 64 * KIB];
    let mut off = 0usize;
    while off < limit {
        let n = buf.len().min(limit - off);
        p.fill(off as u64, &mut buf[..n]);
        match s.write(&buf[..n]) {
            Ok(k) => off += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (off as u64, Some(e.kind())),
        }
    }
    (off as u64, None)
}

/// Writes `p`'s bytes from offset 0 without blocking until the writes have
/// made no progress for 200 ms (every buffer on the way is full) or `limit`
/// bytes are out (how far a writer gets against a reader that does not read
/// is torture.rs's backpressure case). Returns the bytes written.
fn fill(s: &mut TcpStream, p: &Pattern, limit: usize) -> Result<u64> {
    s.set_nonblocking(true)?;
    let mut buf = vec![0u8; 64 * KIB];
    let (mut off, mut progress) = (0usize, Instant::now());
    while off < limit && progress.elapsed() < Duration::from_millis(200) {
        let n = buf.len().min(limit - off);
        p.fill(off as u64, &mut buf[..n]);
        match s.write(&buf[..n]) {
            Ok(k) => {
                off += k;
                progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => bail!("write failed after {off} bytes: {e}"),
        }
    }
    s.set_nonblocking(false)?;
    Ok(off as u64)
}

/// Runs `spec` through `proxy` to `up` and calls `fault` once 4 MiB are on
/// their way; returns how the tunnel went, where the client was when the
/// fault came, and what `fault` returned.
fn during_transfer<T>(
    proxy: &mut Proxy,
    up: &Upstream,
    spec: &TunnelSpec,
    fault: impl FnOnce(&mut Proxy) -> Result<T>,
) -> Result<(Result<TunnelRun>, u64, T)> {
    let progress = Arc::new(AtomicU64::new(0));
    let mut s = proxy.connect_tunnel(&up.target(), None)?;
    s.write_all(&spec.encode())?;
    let opts = PeerOpts {
        progress: Some(progress.clone()),
        already_sent: 0,
    };
    std::thread::scope(|scope| {
        let client = scope.spawn(|| finish_tunnel_opts(s, up, spec, &opts));
        let deadline = Instant::now() + PROMPT;
        while progress.load(Ordering::Relaxed) < 4 * MIB as u64 {
            ensure!(Instant::now() < deadline, "the transfer did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let at = progress.load(Ordering::Relaxed);
        let done = fault(proxy)?;
        let run = client
            .join()
            .map_err(|_| anyhow!("client thread panicked"))?;
        Ok((run, at, done))
    })
}

/// One sample from the proxy's `/metrics` (0 when absent).
fn metric(addr: SocketAddr, series: &str) -> Result<f64> {
    let mut s = connect(addr, PROMPT)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0))
}

// ------------------------------------------------------------- faults ----

/// The upstream accepts and at once resets. Each time the client gets its
/// 200 and then sees the tunnel end (EOF or RST), or a 5xx refusal; the
/// proxy frees both descriptors.
fn upstream_accepts_then_resets(mode: &str) -> Result<String> {
    let st = start(mode, &[])?;
    let resetter = Upstream::start_with(|s| {
        let _ = set_linger_zero(&s);
    })?;
    let (mut eof, mut rst, mut refused, mut slowest) = (0, 0, Vec::new(), Duration::ZERO);
    for i in 0..20 {
        let mut s = connect(st.proxy.addr, PROMPT)?;
        s.write_all(connect_head(&resetter.target(), &[]).as_bytes())?;
        let r = read_head(&mut s).with_context(|| format!("attempt {i}: no response"))?;
        if r.status != 200 {
            ensure!(
                matches!(r.status, 502 | 503),
                "attempt {i}: answered {}",
                r.status
            );
            refused.push(r.status);
            continue;
        }
        let t0 = Instant::now();
        if i % 2 == 1 {
            // Half the time the client sends right away; it may fail.
            let _ = s.write_all(&[7u8; 4096]);
        }
        let (how, got, at) = read_until_end(&mut s, PROMPT)
            .with_context(|| format!("attempt {i}: after the upstream reset"))?;
        ensure!(
            got == 0,
            "attempt {i}: {got} bytes from an upstream that sent none"
        );
        slowest = slowest.max(at - t0);
        match how {
            Ended::Eof => eof += 1,
            Ended::Error(_) => rst += 1,
        }
    }
    let now = st.expect_baseline()?;
    Ok(format!(
        "20 tunnels: 200 then EOF {eof}, 200 then RST {rst}, refused {refused:?}; slowest end \
         {:.0} ms; {} (baseline {})",
        slowest.as_secs_f64() * 1e3,
        now.describe(),
        st.baseline.describe()
    ))
}

/// The upstream accepts and never reads or writes. The client fills the
/// buffers on the way, then waits: `--idle-timeout` ends the tunnel. What
/// the upstream can still read afterwards is a correct prefix of what the
/// client sent.
fn upstream_stalls_forever(mode: &str) -> Result<String> {
    let st = start(mode, &["--idle-timeout", IDLE])?;
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let staller = Upstream::start_with(move |s| h.lock().unwrap().push(s))?;
    let mut s = st.proxy.connect_tunnel(&staller.target(), None)?;
    let p = Pattern::new(0x57a11);
    let sent = fill(&mut s, &p, 64 * MIB).context("filling the stalled tunnel")?;
    let stalled = Instant::now();
    let (how, _, at) = read_until_end(&mut s, PROMPT).context("stalled tunnel")?;
    let line = wait_log(&st.proxy, &["status=200", "end=idle_timeout"])?;
    let mut up = held
        .lock()
        .unwrap()
        .pop()
        .context("the upstream never saw the tunnel")?;
    let reached = read_prefix(&mut up, &p, PROMPT).context("upstream side")?;
    ensure!(
        reached <= sent,
        "upstream read {reached} bytes, client sent {sent}"
    );
    let now = st.expect_baseline()?;
    Ok(format!(
        "client wrote {:.1} MiB before blocking; tunnel ended ({how:?}) {:.2} s later; upstream \
         then read {:.1} MiB, a correct prefix; {} | {}",
        sent as f64 / MIB as f64,
        (at - stalled).as_secs_f64(),
        reached as f64 / MIB as f64,
        now.describe(),
        line.split("tunnel").last().unwrap_or_default().trim()
    ))
}

/// The client vanishes without a FIN: every segment to or from its port is
/// dropped, while the upstream sends 1 MiB toward it. Keepalive does not
/// probe a socket with unacknowledged data (the kernel retransmits instead;
/// tests/tests/keepalive.rs covers the quiet case); `--idle-timeout` ends
/// the tunnel, the upstream sees it
/// end, and the proxy's descriptors return although the kernel still
/// retransmits to the vanished client.
fn client_vanishes_without_fin(mode: &str) -> Result<String> {
    let st = start(mode, &["--idle-timeout", IDLE])?;
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let (done_tx, done_rx) = mpsc::channel::<Result<(Ended, Instant)>>();
    let done_tx = Mutex::new(done_tx);
    let up = Upstream::start_with(move |mut s| {
        let mut run = || -> Result<(Ended, Instant)> {
            let mut hello = [0u8; 1024];
            s.read_exact(&mut hello)?;
            s.write_all(&hello)?;
            go_rx.lock().unwrap().recv()?;
            let p = Pattern::new(0xdeaf);
            let (_, _) = send_pattern(&mut s, &p, MIB, Duration::from_secs(30));
            let (how, _, at) = read_until_end(&mut s, Duration::from_secs(30))?;
            Ok((how, at))
        };
        let _ = done_tx.lock().unwrap().send(run());
    })?;
    let mut c = st.proxy.connect_tunnel(&up.target(), None)?;
    c.set_read_timeout(Some(PROMPT))?;
    let hello = Pattern::new(1).bytes(0, 1024);
    c.write_all(&hello)?;
    let mut back = vec![0u8; 1024];
    c.read_exact(&mut back)?;
    ensure!(back == hello, "the tunnel did not echo before the fault");
    let port = c.local_addr()?.port();
    let hole = Blackhole::port(port)?;
    let vanished = Instant::now();
    go_tx.send(())?;
    let (how, at) = done_rx
        .recv_timeout(PROMPT + Duration::from_secs(30))
        .context("the upstream never saw the tunnel end")??;
    let line = wait_log(
        &st.proxy,
        &[&format!("client=127.0.0.1:{port}"), "end=idle_timeout"],
    )?;
    // Checked while the client's port is still a black hole.
    let now = st.expect_baseline()?;
    drop(hole);
    drop(c);
    Ok(format!(
        "upstream saw the tunnel end ({how:?}) {:.2} s after the client vanished; {} | {}",
        (at - vanished).as_secs_f64(),
        now.describe(),
        line.split("tunnel").last().unwrap_or_default().trim()
    ))
}

/// The upstream reads 256 KiB, checks them, and closes while the client is
/// still sending: every byte it read is the client's prefix, the client's
/// writes fail, its reads end.
fn upstream_closes_while_client_sends(mode: &str) -> Result<String> {
    const READ: usize = 256 * KIB;
    let st = start(mode, &[])?;
    let p = Pattern::new(0xc105e);
    let (tx, rx) = mpsc::channel::<Result<()>>();
    let tx = Mutex::new(tx);
    let up_pattern = p.clone();
    let closer = Upstream::start_with(move |mut s| {
        let mut got = vec![0u8; READ];
        let r = s
            .read_exact(&mut got)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                ensure!(
                    got == up_pattern.bytes(0, READ),
                    "CORRUPT: the upstream's {READ} bytes are not the client's prefix"
                );
                Ok(())
            });
        drop(s); // unread bytes behind: the close is a reset
        let _ = tx.lock().unwrap().send(r);
    })?;
    let mut c = st.proxy.connect_tunnel(&closer.target(), None)?;
    let t0 = Instant::now();
    let (sent, err) = send_pattern(&mut c, &p, 1 << 30, PROMPT);
    let write_end = t0.elapsed();
    rx.recv_timeout(PROMPT)
        .context("the upstream did not read its 256 KiB")??;
    ensure!(
        matches!(
            err,
            Some(ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted)
        ),
        "the client's writes should fail after the upstream closed: {sent} bytes, then {err:?}"
    );
    let (how, _, _) = read_until_end(&mut c, PROMPT)?;
    let now = st.expect_baseline()?;
    Ok(format!(
        "upstream read {} KiB (all the client's prefix); client's writes failed ({:?}) after \
         {:.1} MiB, {:.2} s; reads ended {how:?}; {}",
        READ / KIB,
        err.unwrap(),
        sent as f64 / MIB as f64,
        write_end.as_secs_f64(),
        now.describe()
    ))
}

/// A transfer of 32 MiB each way with slow readers; SIGTERM arrives when
/// 4 MiB are through. The listener closes, the transfer completes and
/// matches (length and SHA-256 both ways) within the grace, and the proxy
/// exits 0 without cutting anything.
fn sigterm_mid_transfer(mode: &str) -> Result<String> {
    let mut st = start(mode, &["--shutdown-grace", "60s"])?;
    let up = Upstream::start()?;
    let mut spec = TunnelSpec::symmetric(1, run_seed(), 32 * MIB as u64, 32 * MIB as u64);
    spec.stall_ms = 20_000;
    for d in [&mut spec.c2u, &mut spec.u2c] {
        d.max_read = 64 * KIB as u64;
        d.reader_sleep_us = 1000;
    }
    let (run, at_signal, refused_after) = during_transfer(&mut st.proxy, &up, &spec, |proxy| {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
        let signalled = Instant::now();
        // New clients are refused once the listener is closed.
        loop {
            match TcpStream::connect(proxy.addr) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                _ => ensure!(
                    signalled.elapsed() < PROMPT,
                    "still accepting after SIGTERM"
                ),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(signalled.elapsed())
    })?;
    let run = run?;
    run.check().context("the transfer across SIGTERM")?;
    ensure!(
        at_signal < spec.c2u.len,
        "the transfer was over before SIGTERM: not mid-transfer"
    );
    let code = st.proxy.signal_and_wait(0, PROMPT)?;
    ensure!(code == Some(0), "exit status {code:?} after the drain");
    ensure!(
        count_log(&st.proxy, "draining open connections") == 1
            && count_log(&st.proxy, "shutdown grace over") == 0,
        "the drain should wait for the tunnel:\n{}",
        st.proxy.log().join("\n")
    );
    Ok(format!(
        "SIGTERM at {:.1} of {} MiB; new connections refused {:.0} ms later; transfer completed \
         and matched both ways ({}); exit 0",
        at_signal as f64 / MIB as f64,
        spec.c2u.len / MIB as u64,
        refused_after.as_secs_f64() * 1e3,
        run.rates()
    ))
}

/// A tunnel that stays open (and idle) through SIGTERM with a 1 s grace:
/// the grace runs out, the proxy closes the tunnel (the client sees it end)
/// and exits 0.
fn sigterm_grace_runs_out(mode: &str) -> Result<String> {
    let mut st = start(mode, &["--shutdown-grace", "1s"])?;
    let mut c = st.proxy.connect_tunnel(&st.echo.target(), None)?;
    c.write_all(b"ping")?;
    let mut back = [0u8; 4];
    c.set_read_timeout(Some(PROMPT))?;
    c.read_exact(&mut back)?;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(st.proxy.pid() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let (how, _, at) = read_until_end(&mut c, PROMPT)?;
    let code = st.proxy.signal_and_wait(0, PROMPT)?;
    ensure!(code == Some(0), "exit status {code:?}");
    ensure!(
        count_log(&st.proxy, "shutdown grace over") == 1,
        "no grace-over warning:\n{}",
        st.proxy.log().join("\n")
    );
    wait_log(&st.proxy, &["status=200", "end=shutdown"])?;
    Ok(format!(
        "tunnel closed ({how:?}) {:.2} s after SIGTERM (grace 1 s); exit 0",
        (at - t0).as_secs_f64()
    ))
}

/// SIGKILL while 1 GiB flows each way: both ends see the tunnel end, no
/// byte they received is wrong, and a new proxy on the same address starts
/// at once, holds no map entry and forwards a verified tunnel.
fn sigkill_mid_transfer(mode: &str) -> Result<String> {
    let a = args(mode, &[]);
    let mut st = start(mode, &[])?;
    let addr = st.proxy.addr;
    let up = Upstream::start()?;
    let mut spec = TunnelSpec::symmetric(1, run_seed(), 1 << 30, 1 << 30);
    spec.stall_ms = 10_000;
    let (outcome, at_kill, ()) = during_transfer(&mut st.proxy, &up, &spec, |proxy| {
        let code = proxy.signal_and_wait(libc::SIGKILL, PROMPT)?;
        ensure!(code.is_none(), "killed, yet exit status {code:?}");
        Ok(())
    })?;
    // Either end may fail (that is the point) but never with wrong bytes.
    match &outcome {
        Ok(run) => ensure!(
            run.client.received.bytes < spec.u2c.len && run.upstream.received.bytes < spec.c2u.len,
            "1 GiB cannot have crossed a killed proxy"
        ),
        Err(e) => ensure!(
            !format!("{e:#}").contains("CORRUPT"),
            "corrupt bytes before the kill: {e:#}"
        ),
    }
    let restarted = Instant::now();
    let again = Proxy::start_at(addr, &a).context("a clean start on the same address")?;
    let up_in = restarted.elapsed();
    let st2 = warm_up(again)?;
    ensure!(
        st2.baseline.map_entries() == 0,
        "a fresh proxy holds map entries: {}",
        st2.baseline.describe()
    );
    run_tunnel(
        &st2.proxy,
        &up,
        &TunnelSpec::symmetric(2, run_seed(), MIB as u64, MIB as u64),
    )?
    .check()
    .context("a tunnel through the restarted proxy")?;
    let now = st2.expect_baseline()?;
    Ok(format!(
        "SIGKILL at {:.1} MiB; ends saw {}; restarted on {addr} in {:.0} ms; {}",
        at_kill as f64 / MIB as f64,
        match &outcome {
            Ok(run) => format!(
                "client reads {:?}, upstream reads {:?}",
                run.client.received.end, run.upstream.received.end
            ),
            Err(_) => "errors".into(),
        },
        up_in.as_secs_f64() * 1e3,
        now.describe()
    ))
}

/// Open-file limit of the proxy in the EMFILE case.
const NOFILE: u64 = 64;

/// The proxy runs with RLIMIT_NOFILE 64; idle clients take every
/// descriptor and more wait in the backlog. Saturated, the accept loop
/// backs off (little CPU), logs the condition once and counts it, and a
/// tunnel opened before carries its first bytes (splice: without a pipe);
/// once the idle clients leave, a client that queued meanwhile gets its
/// tunnel and one "accept recovered" line is logged.
fn emfile(mode: &str) -> Result<String> {
    let maddr = format!("127.0.0.1:{}", free_port());
    let a = args(
        mode,
        &["--header-timeout", "60s", "--metrics-listen", &maddr],
    );
    let proxy = Proxy::start_with_nofile(&a, NOFILE)?;
    let st = warm_up(proxy)?;
    let maddr: SocketAddr = maddr.parse()?;
    let warning = "accept failed";
    // A tunnel opened before, idle so far (splice: no pipe yet).
    let mut open = st.proxy.connect_tunnel(&st.echo.target(), None)?;
    open.set_read_timeout(Some(PROMPT))?;
    // More idle clients than the proxy has descriptors left.
    let mut idle = Vec::new();
    for _ in 0..NOFILE as usize + 16 {
        idle.push(TcpStream::connect(st.proxy.addr)?);
    }
    wait_log(&st.proxy, &[warning, "fd_limit"])?;
    let saturated_fds = st.proxy.fd_count();
    // A client that queues while the proxy is saturated.
    let mut late = TcpStream::connect(st.proxy.addr)?;
    late.write_all(connect_head(&st.echo.target(), &[]).as_bytes())?;
    // Its first bytes arrive while the proxy has no descriptor to spare.
    let data = Pattern::new(2).bytes(0, 64 * KIB);
    open.write_all(&data)?;
    let mut back = vec![0u8; data.len()];
    open.read_exact(&mut back)
        .context("a tunnel opened before the saturation, used during it")?;
    ensure!(back == data, "the open tunnel's echo differs");
    let cpu0 = cpu_secs(st.proxy.pid());
    let window = Duration::from_secs(2);
    std::thread::sleep(window);
    let cpu = cpu_secs(st.proxy.pid()) - cpu0;
    ensure!(
        cpu < 0.5,
        "the saturated proxy used {cpu:.2} s of CPU in {window:?}: accept is spinning"
    );
    ensure!(
        count_log(&st.proxy, warning) == 1,
        "the condition must be logged once:\n{}",
        st.proxy.log().join("\n")
    );
    drop(idle);
    late.set_read_timeout(Some(PROMPT))?;
    let r = read_head(&mut late).context("the queued client after the fds were freed")?;
    ensure!(r.status == 200, "the queued client got {}", r.status);
    let data = Pattern::new(3).bytes(0, 64 * KIB);
    late.write_all(&data)?;
    let mut back = vec![0u8; data.len()];
    late.read_exact(&mut back)?;
    ensure!(back == data, "the queued client's echo differs");
    drop(late);
    drop(open);
    wait_log(&st.proxy, &["accept recovered"])?;
    let errors = metric(maddr, "splice_proxy_accept_errors_total{kind=\"fd_limit\"}")?;
    ensure!(errors >= 1.0, "accept errors not counted: {errors}");
    ensure!(
        count_log(&st.proxy, warning) == 1 && count_log(&st.proxy, "accept recovered") == 1,
        "one warning and one recovery line per episode:\n{}",
        st.proxy.log().join("\n")
    );
    let now = st.expect_baseline()?;
    Ok(format!(
        "limit {NOFILE}: saturated at {saturated_fds} fds, proxy CPU {cpu:.3} s over {window:?} \
         saturated; open tunnel echoed 64 KiB while saturated; {errors} failed accepts counted, 1 \
         warning, 1 recovery; queued client served; \
         {}",
        now.describe()
    ))
}
