//! Torture suite: every case runs against every data path in `modes()` with
//! identical assertions. Each stream is verified byte by byte against a
//! positional pattern (the first lost, duplicated or reordered byte fails with
//! its offset) and by SHA-256 + length at both ends. After each case the
//! proxy's descriptor count must return to its baseline and a fresh tunnel
//! must still work.
//!
//! Cases run one at a time (they share the machine's two cores and print
//! throughput). Figures go to stderr: `cargo test --release -p
//! splice-proxy-tests --test torture -- --nocapture`. `SPLICE_TEST_SEED`
//! replays a run; `SPLICE_TEST_MODES=copy,splice` picks the data paths.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use splice_proxy_tests::resources::{cpu_secs, rss_kib};
use splice_proxy_tests::torture::{
    End, FdSampler, Pattern, PeerOpts, Side, TunnelSpec, Upstream, finish_tunnel,
    finish_tunnel_opts, run_seed, run_tunnel, settle_fds,
};
use splice_proxy_tests::{Proxy, modes, raise_fd_limit, read_response_head, serial};

const MIB: u64 = 1 << 20;

/// What a case gets to work with.
struct Ctx<'a> {
    mode: &'a str,
    proxy: &'a Proxy,
    up: &'a Upstream,
    seed: u64,
}

impl Ctx<'_> {
    fn tag(&self, case: &str) -> String {
        format!("mode={} case={case} seed={}", self.mode, self.seed)
    }
}

fn small_check(proxy: &Proxy, up: &Upstream, id: u64, seed: u64) -> Result<()> {
    let spec = TunnelSpec::symmetric(id, seed, MIB, MIB);
    run_tunnel(proxy, up, &spec)?.check()
}

/// Runs `body` once per mode on a fresh proxy + upstream, with fd accounting
/// and a post-case health check; fails at the end listing every mode that
/// failed.
fn torture(case: &str, body: impl Fn(&Ctx) -> Result<String>) {
    torture_in(case, modes(), body);
}

/// [`torture`] for cases where a reader falls the sockmap backlog behind: sockmap also runs with
/// `--sockmap-overrun pause` (mode `sockmap+pause`), besides the default (relay).
fn torture_overrun(case: &str, body: impl Fn(&Ctx) -> Result<String>) {
    let mut list = modes();
    if list.iter().any(|m| m == "sockmap") {
        list.push("sockmap+pause".into());
    }
    torture_in(case, list, body);
}

fn torture_in(case: &str, modes: Vec<String>, body: impl Fn(&Ctx) -> Result<String>) {
    let _g = serial();
    raise_fd_limit();
    let seed = run_seed();
    let mut failures = Vec::new();
    for mode in modes {
        let started = Instant::now();
        let tag = format!("mode={mode} case={case} seed={seed}");
        let proxy = match mode.split_once('+') {
            Some((m, overrun)) => Proxy::start_mode(m, &["--sockmap-overrun", overrun]),
            None => Proxy::start_mode(&mode, &[]),
        };
        let mut proxy = match proxy {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{tag}: proxy did not start: {e:#}"));
                continue;
            }
        };
        let up = Upstream::start().expect("upstream");
        // Warm up (lazy allocations), then take the baseline.
        let pre = proxy.fd_count();
        if let Err(e) = small_check(&proxy, &up, 1_000_000, seed) {
            failures.push(format!("{tag}: warm-up tunnel failed: {e:#}"));
            dump_log(&proxy);
            continue;
        }
        let baseline = settle_fds(&proxy, pre, Duration::from_secs(2));
        let sampler = FdSampler::start(proxy.pid());
        let ctx = Ctx {
            mode: &mode,
            proxy: &proxy,
            up: &up,
            seed,
        };
        let cpu0 = cpu_secs(proxy.pid());
        let t0 = Instant::now();
        let res = body(&ctx);
        let took = t0.elapsed();
        let cpu = cpu_secs(proxy.pid()) - cpu0;
        let peak = sampler.stop();
        let after = settle_fds(&proxy, baseline, Duration::from_secs(5));
        let mut problems = Vec::new();
        let figures = match res {
            Ok(f) => f,
            Err(e) => {
                problems.push(format!("{e:#}"));
                "-".into()
            }
        };
        if after > baseline {
            problems.push(format!(
                "proxy fds did not return to baseline within 5 s: baseline {baseline}, now {after} \
                 (leak)"
            ));
        }
        match proxy.try_status() {
            Ok(None) => {
                if let Err(e) = small_check(&proxy, &up, 1_000_001, seed ^ 1) {
                    problems.push(format!("a new tunnel after the case failed: {e:#}"));
                }
            }
            Ok(Some(st)) => problems.push(format!("proxy exited during the case: {st}")),
            Err(e) => problems.push(format!("proxy state: {e:#}")),
        }
        eprintln!(
            "[torture] {tag} {} | {figures} | fds baseline {baseline} (before warm-up {pre}), peak \
             {peak}, after {after} | proxy CPU {cpu:.2}s | case {:.2}s, total {:.2}s",
            if problems.is_empty() { "ok" } else { "FAIL" },
            took.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        if !problems.is_empty() {
            dump_log(&proxy);
            for p in problems {
                failures.push(format!("{tag}: {p}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "torture case {case} failed:\n  {}",
        failures.join("\n  ")
    );
}

fn dump_log(proxy: &Proxy) {
    let log = proxy.log();
    let tail = &log[log.len().saturating_sub(30)..];
    eprintln!("--- last {} proxy log lines ---", tail.len());
    for l in tail {
        eprintln!("  {l}");
    }
}

fn mbs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-6) / 1e6
}

/// Case 1: Both directions at once, random chunk sizes 1 B..256 KiB for every
/// write and read, random content, 64 MiB each way.
#[test]
fn both_directions_random_chunks() {
    torture("both_directions_random_chunks", |c| {
        let spec = TunnelSpec::symmetric(1, c.seed, 64 * MIB, 64 * MIB);
        let run = run_tunnel(c.proxy, c.up, &spec).context(c.tag("bidi"))?;
        run.check().context(c.tag("bidi"))?;
        Ok(format!(
            "64 MiB each way: {} ({} writes, {} reads at the client), wall {:.2}s",
            run.rates(),
            run.client.sent.ops,
            run.client.received.ops,
            run.wall().as_secs_f64()
        ))
    });
}

/// Case 2: One side reads slowly (small reads with sleeps, after a 1 s stall so
/// every buffer on the way fills) while the other writes fast; then the
/// mirror image. All data arrives, in order.
#[test]
fn slow_reader() {
    torture_overrun("slow_reader", |c| {
        let mut figs = Vec::new();
        for (i, slow) in [Side::Client, Side::Upstream].into_iter().enumerate() {
            let mut spec = TunnelSpec::symmetric(10 + i as u64, c.seed, MIB, MIB);
            spec.stall_ms = 15_000;
            let d = match slow {
                Side::Client => &mut spec.u2c,
                Side::Upstream => &mut spec.c2u,
            };
            d.len = 16 * MIB;
            d.reader_stall_ms = 1000;
            d.min_read = 1024;
            d.max_read = 16 << 10;
            d.reader_sleep_us = 1000;
            let run = run_tunnel(c.proxy, c.up, &spec).context(c.tag("slow reader"))?;
            run.check()
                .with_context(|| c.tag(&format!("slow reader at {slow:?}")))?;
            let flow = match slow {
                Side::Client => &run.client.received,
                Side::Upstream => &run.upstream.received,
            };
            figs.push(format!(
                "slow {slow:?} reader: 16 MiB at {:.1} MB/s in {} reads",
                flow.mb_per_s(),
                flow.ops
            ));
        }
        Ok(figs.join("; "))
    });
}

/// Case 3a: The client sends everything and FINs first while the upstream is
/// still sending: the upstream sends half, waits until it has seen the
/// client's EOF, sends the rest and FINs. Both ends receive everything, then
/// read returns 0 on both. Also with a client that sends nothing at all.
#[test]
fn half_close_client_first() {
    torture("half_close_client_first", |c| half_close(c, Side::Client));
}

/// Case 3b: The mirror image: the upstream FINs first while the client is still
/// sending.
#[test]
fn half_close_upstream_first() {
    torture("half_close_upstream_first", |c| {
        half_close(c, Side::Upstream)
    });
}

fn half_close(c: &Ctx, first: Side) -> Result<String> {
    let mut figs = Vec::new();
    for (i, first_len) in [16 * MIB, 0].into_iter().enumerate() {
        let mut spec = TunnelSpec::symmetric(20 + i as u64, c.seed, 0, 0);
        spec.stall_ms = 10_000;
        let (fin_first, later) = match first {
            Side::Client => (&mut spec.c2u, &mut spec.u2c),
            Side::Upstream => (&mut spec.u2c, &mut spec.c2u),
        };
        fin_first.len = first_len;
        later.len = 32 * MIB;
        later.hold_at = Some(8 * MIB);
        let what = format!("{first:?} FIN first after {first_len} bytes");
        let run = run_tunnel(c.proxy, c.up, &spec).with_context(|| c.tag(&what))?;
        run.check().with_context(|| c.tag(&what))?;
        figs.push(format!("{what}: ok, wall {:.2}s", run.wall().as_secs_f64()));
    }
    Ok(figs.join("; "))
}

/// Case 4a: The upstream resets (SO_LINGER 0 + close) after 4 MiB while both
/// directions are busy: the client sees a reset or EOF within 3 s on its
/// reads and an error on its writes; the proxy keeps serving new tunnels
/// (checked after every case).
#[test]
fn reset_upstream_mid_stream() {
    torture("reset_upstream_mid_stream", |c| reset(c, Side::Upstream));
}

/// Case 4b: The client resets mid-stream; the upstream must notice within 3 s.
#[test]
fn reset_client_mid_stream() {
    torture("reset_client_mid_stream", |c| reset(c, Side::Client));
}

fn reset(c: &Ctx, who: Side) -> Result<String> {
    let mut spec = TunnelSpec::symmetric(30, c.seed, 1 << 30, 1 << 30);
    spec.stall_ms = 10_000;
    spec.reset = Some((who, 4 * MIB));
    let run = run_tunnel(c.proxy, c.up, &spec).with_context(|| c.tag("reset"))?;
    let (resetter, other) = match who {
        Side::Client => (&run.client, &run.upstream),
        Side::Upstream => (&run.upstream, &run.client),
    };
    let at = resetter.reset_at.context("resetting side did not reset")?;
    ensure!(
        resetter.sent.end == End::Reset && resetter.sent.bytes == 4 * MIB,
        "{}: resetting side stopped early: {:?} after {} bytes",
        c.tag("reset"),
        resetter.sent.end,
        resetter.sent.bytes
    );
    let read_end = other.received.last.saturating_duration_since(at);
    let write_end = other.sent.last.saturating_duration_since(at);
    ensure!(
        matches!(other.received.end, End::Done | End::Error(_)),
        "{}: the other side's reads ended with {:?}",
        c.tag("reset"),
        other.received.end
    );
    ensure!(
        other.received.bytes <= 4 * MIB,
        "{}: the other side received {} bytes, more than the 4 MiB sent before the reset",
        c.tag("reset"),
        other.received.bytes
    );
    ensure!(
        read_end < Duration::from_secs(3),
        "{}: {who:?} reset, but the other side's reads only ended {read_end:?} later ({:?})",
        c.tag("reset"),
        other.received.end
    );
    ensure!(
        matches!(other.sent.end, End::Error(_)),
        "{}: the other side's writes ended with {:?} after {} bytes, expected an error",
        c.tag("reset"),
        other.sent.end,
        other.sent.bytes
    );
    ensure!(
        write_end < Duration::from_secs(3),
        "{}: {who:?} reset, but the other side's writes only failed {write_end:?} later",
        c.tag("reset"),
    );
    Ok(format!(
        "{who:?} reset after 4 MiB: other side's reads ended {:?} after {:.0} ms ({} bytes, all \
         correct), writes failed {:?} after {:.0} ms",
        other.received.end,
        read_end.as_secs_f64() * 1e3,
        other.received.bytes,
        other.sent.end,
        write_end.as_secs_f64() * 1e3
    ))
}

/// Case 5: 1 GiB each way at once (chunks 64 KiB..256 KiB). Throughput is printed,
/// not asserted. The harness itself (no proxy) is measured once for scale:
/// both ends generate, compare and SHA-256 every byte on the same 2 cores.
#[test]
fn gib_each_way() {
    let spec = |seed| {
        let mut s = TunnelSpec::symmetric(40, seed, 1 << 30, 1 << 30);
        for d in [&mut s.c2u, &mut s.u2c] {
            d.min_chunk = 64 << 10;
            d.max_chunk = 256 << 10;
            d.min_read = 64 << 10;
            d.max_read = 256 << 10;
        }
        s
    };
    {
        let _g = serial();
        let up = Upstream::start().expect("upstream");
        let s = spec(run_seed());
        let mut sock = TcpStream::connect(up.addr).unwrap();
        sock.write_all(&s.encode()).unwrap();
        let run = finish_tunnel(sock, &up, &s).expect("direct run");
        run.check().expect("direct run");
        eprintln!(
            "[torture] direct (no proxy) case=gib_each_way | 1 GiB each way: {}, wall {:.2}s",
            run.rates(),
            run.wall().as_secs_f64()
        );
    }
    // SPLICE_TORTURE_GIB_RUNS=N repeats the transfer (rare defects, e.g. the
    // sockmap duplicate chunk seen in 3 of 17 runs).
    let runs: u64 = std::env::var("SPLICE_TORTURE_GIB_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    torture("gib_each_way", |c| {
        let mut figs = Vec::new();
        for r in 0..runs {
            let cpu0 = cpu_secs(c.proxy.pid());
            let spec = spec(c.seed.wrapping_add(r));
            let what = format!("1 GiB, run {} of {runs}", r + 1);
            let run = run_tunnel(c.proxy, c.up, &spec).with_context(|| c.tag(&what))?;
            let cpu = cpu_secs(c.proxy.pid()) - cpu0;
            run.check().with_context(|| c.tag(&what))?;
            figs.push(format!(
                "1 GiB each way: {}, aggregate {:.0} MB/s, wall {:.2}s, proxy CPU {:.3} s/GB",
                run.rates(),
                mbs(2 << 30, run.wall()),
                run.wall().as_secs_f64(),
                cpu / (2u64 << 30) as f64 * 1e9
            ));
        }
        Ok(figs.join("; "))
    });
}

/// Case 6: 1,000 tunnels open at once (all established before any data flows),
/// each moving 0..256 KiB of random data both ways; all verified.
#[test]
fn many_tunnels() {
    const N: u64 = 1000;
    torture("many_tunnels_1000", |c| {
        let mut rng_state = c.seed;
        let mut next = || {
            rng_state = rng_state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng_state >> 33
        };
        let specs: Vec<TunnelSpec> = (0..N)
            .map(|i| {
                let mut s = TunnelSpec::symmetric(100 + i, c.seed, 0, 0);
                s.stall_ms = 30_000;
                for d in [&mut s.c2u, &mut s.u2c] {
                    // Log-uniform 0..256 KiB, some empty.
                    let bits = next() % 19;
                    d.len = if bits == 0 { 0 } else { next() % (1 << bits) };
                    d.max_chunk = 16 << 10;
                    d.max_read = 16 << 10;
                }
                s
            })
            .collect();
        let t0 = Instant::now();
        let mut socks = Vec::new();
        for _ in &specs {
            let t = c
                .proxy
                .connect_tunnel(&c.up.target(), None)
                .with_context(|| c.tag(&format!("open tunnel {} of {N}", socks.len() + 1)))?;
            socks.push(t);
        }
        let setup = t0.elapsed();
        let fds_open = c.proxy.fd_count();
        let t1 = Instant::now();
        let mut errors = Vec::new();
        let mut bytes = 0;
        std::thread::scope(|scope| {
            let handles: Vec<_> = socks
                .into_iter()
                .zip(&specs)
                .map(|(mut sock, spec)| {
                    std::thread::Builder::new()
                        .stack_size(256 << 10)
                        .spawn_scoped(scope, move || -> Result<u64> {
                            sock.set_write_timeout(Some(Duration::from_secs(30)))?;
                            sock.write_all(&spec.encode())?;
                            finish_tunnel(sock, c.up, spec)?.check()?;
                            Ok(spec.c2u.len + spec.u2c.len)
                        })
                        .expect("spawn")
                })
                .collect();
            for h in handles {
                match h.join() {
                    Ok(Ok(n)) => bytes += n,
                    Ok(Err(e)) => errors.push(format!("{e:#}")),
                    Err(_) => errors.push("tunnel thread panicked".into()),
                }
            }
        });
        let xfer = t1.elapsed();
        if !errors.is_empty() {
            bail!(
                "{}: {} of {N} tunnels failed; first ones:\n    {}",
                c.tag("1,000 tunnels"),
                errors.len(),
                errors[..errors.len().min(5)].join("\n    ")
            );
        }
        Ok(format!(
            "{N} tunnels opened in {:.0} ms ({:.0}/s), proxy fds with all open {fds_open}; {:.1} MiB \
             moved in {:.2}s ({:.0} MB/s aggregate)",
            setup.as_secs_f64() * 1e3,
            N as f64 / setup.as_secs_f64(),
            bytes as f64 / MIB as f64,
            xfer.as_secs_f64(),
            mbs(bytes, xfer)
        ))
    });
}

/// Design requirement: a tunnel whose reader stops reading must not let the
/// writer queue without bound. Both readers stall for 2 s while both
/// writers try to push 256 MiB; 1.5 s in, each writer must be less than
/// 64 MiB ahead (copy/splice stop it after a few MB). Then everything drains
/// and is verified.
#[test]
fn backpressure_bounded() {
    torture_overrun("backpressure_bounded", |c| {
        let mut spec = TunnelSpec::symmetric(50, c.seed, 256 * MIB, 256 * MIB);
        spec.stall_ms = 20_000;
        spec.c2u.reader_stall_ms = 2000;
        spec.u2c.reader_stall_ms = 2000;
        let client_sent = Arc::new(AtomicU64::new(0));
        let sock = c
            .proxy
            .connect_tunnel(&c.up.target(), None)
            .context(c.tag("backpressure"))?;
        let (proxy_pid, t0) = (c.proxy.pid(), Instant::now());
        let mut sock = sock;
        sock.write_all(&spec.encode())?;
        let opts = PeerOpts {
            progress: Some(client_sent.clone()),
            already_sent: 0,
        };
        let (joined, ahead, rss) = std::thread::scope(|s| {
            let h = s.spawn(|| finish_tunnel_opts(sock, c.up, &spec, &opts));
            std::thread::sleep(Duration::from_millis(1500).saturating_sub(t0.elapsed()));
            let ahead = client_sent.load(Ordering::Relaxed);
            let rss = rss_kib(proxy_pid);
            (h.join(), ahead, rss)
        });
        let run = joined.map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        run.check().context(c.tag("backpressure"))?;
        ensure!(
            ahead < 64 * MIB,
            "{}: with the upstream not reading, the client could write {:.1} MiB in 1.5 s: the \
             tunnel queues without bound (proxy RSS {} KiB)",
            c.tag("backpressure"),
            ahead as f64 / MIB as f64,
            rss
        );
        Ok(format!(
            "client got {:.1} MiB ahead of a stalled upstream reader (limit 64 MiB), proxy RSS {} \
             KiB; then drained at {}",
            ahead as f64 / MIB as f64,
            rss,
            run.rates()
        ))
    });
}

/// Bytes sent in the same write as the CONNECT head (1 B to 1 MiB, with the
/// tunnel header in front) reach the upstream first and in order, then the
/// rest of the stream follows.
#[test]
fn early_data_with_head() {
    torture("early_data_with_head", |c| {
        for (i, early) in [1u64, 1000, 64 << 10, MIB].into_iter().enumerate() {
            let spec = TunnelSpec::symmetric(60 + i as u64, c.seed, 4 * MIB, 4 * MIB);
            let what = format!("{early} bytes with the head");
            let mut msg = format!(
                "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n",
                t = c.up.target()
            )
            .into_bytes();
            msg.extend_from_slice(&spec.encode());
            msg.extend_from_slice(&spec.c2u.pattern().bytes(0, early as usize));
            let mut s = TcpStream::connect(c.proxy.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&msg).with_context(|| c.tag(&what))?;
            let head = read_response_head(&mut s).with_context(|| c.tag(&what))?;
            ensure!(
                head == "HTTP/1.1 200 Connection established\r\n\r\n",
                "{}: reply {head:?}",
                c.tag(&what)
            );
            let opts = PeerOpts {
                progress: None,
                already_sent: early,
            };
            let run = finish_tunnel_opts(s, c.up, &spec, &opts).with_context(|| c.tag(&what))?;
            run.check().with_context(|| c.tag(&what))?;
        }
        Ok("1 B, 1000 B, 64 KiB, 1 MiB with the head: ok".into())
    });
}

/// FINs that arrive before the data path is set up: (a) the client sends
/// its header, a little data and its FIN right after the 200; (b) the
/// upstream sends a short stream and its FIN the moment the proxy connects,
/// before the client even has its 200, then reads what the half-closed
/// client still sends. 40 tunnels each, because the window is narrow.
#[test]
fn immediate_fin() {
    const N: u64 = 40;
    let seed = run_seed();
    let banner = Pattern::new(seed ^ 0xf1);
    let answer = Pattern::new(seed ^ 0xf2);
    let (tx, rx) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
    let tx = Mutex::new(tx);
    let b2 = banner.clone();
    let a2 = answer.clone();
    let fin_first = Upstream::start_with(move |mut s: TcpStream| {
        let mut f = || -> Result<()> {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&b2.bytes(0, 3000))?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut s, &mut got)?;
            ensure!(
                got == a2.bytes(0, 1000),
                "upstream: after its FIN it received {} bytes, want the client's 1000",
                got.len()
            );
            Ok(())
        };
        let r = f().map_err(|e| format!("{e:#}"));
        let _ = tx.lock().unwrap().send(r);
    })
    .expect("upstream");
    torture("immediate_fin", |c| {
        // (a) client FIN right behind the header and a few bytes.
        let a = (|| -> Result<()> {
            for i in 0..N {
                let mut spec = TunnelSpec::symmetric(70 + i, c.seed, i * 100, 64 << 10);
                spec.stall_ms = 10_000;
                spec.c2u.shutdown = false; // done by hand below
                let what = format!("client FIN right after the 200, tunnel {i} of {N}");
                let mut s = c
                    .proxy
                    .connect_tunnel(&c.up.target(), None)
                    .with_context(|| c.tag(&what))?;
                let mut msg = spec.encode();
                msg.extend_from_slice(&spec.c2u.pattern().bytes(0, spec.c2u.len as usize));
                s.write_all(&msg)?;
                s.shutdown(std::net::Shutdown::Write)?;
                let opts = PeerOpts {
                    progress: None,
                    already_sent: spec.c2u.len,
                };
                let run =
                    finish_tunnel_opts(s, c.up, &spec, &opts).with_context(|| c.tag(&what))?;
                run.check().with_context(|| c.tag(&what))?;
            }
            Ok(())
        })();
        // (b) upstream FIN before the client has its 200.
        while rx.try_recv().is_ok() {}
        let b = (|| -> Result<()> {
            for i in 0..N {
                let what = format!("upstream FIN at accept, tunnel {i} of {N}");
                let f = || -> Result<()> {
                    let mut s = c.proxy.connect_tunnel(&fin_first.target(), None)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let mut got = Vec::new();
                    std::io::Read::read_to_end(&mut s, &mut got)
                        .context("client reading the upstream's stream")?;
                    ensure!(
                        got == banner.bytes(0, 3000),
                        "client got {} bytes, want the upstream's 3000{}",
                        got.len(),
                        got.iter()
                            .zip(banner.bytes(0, 3000))
                            .position(|(a, b)| *a != b)
                            .map(|o| format!(" (wrong byte at offset {o})"))
                            .unwrap_or_default()
                    );
                    s.write_all(&answer.bytes(0, 1000))
                        .context("client writing after the upstream's FIN")?;
                    s.shutdown(std::net::Shutdown::Write)?;
                    match rx.recv_timeout(Duration::from_secs(10)) {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => bail!("{e}"),
                        Err(_) => bail!("upstream never finished"),
                    }
                };
                f().with_context(|| c.tag(&what))?;
            }
            Ok(())
        })();
        match (a, b) {
            (Ok(()), Ok(())) => Ok(format!("{N} + {N} tunnels ok")),
            (Err(e), Ok(())) => Err(e.context("(b) upstream FIN at accept: ok")),
            (Ok(()), Err(e)) => Err(e.context("(a) client FIN after the 200: ok")),
            (Err(a), Err(b)) => bail!("{a:#}\n  and {b:#}"),
        }
    });
}

/// A server that speaks first (SMTP, SSH): its banner is sent the moment the
/// proxy connects, before the client has its 200, and the client sends
/// nothing until it has the banner. The banner must arrive without help.
#[test]
fn upstream_speaks_first() {
    let _g = serial();
    raise_fd_limit();
    let seed = run_seed();
    let banner = Pattern::new(seed ^ 0xba);
    let request = Pattern::new(seed ^ 0x4e);
    let reply = Pattern::new(seed ^ 0x4e91);
    const BANNER: usize = 1000;
    const REQ: usize = 1000;
    const REPLY: usize = 4 << 20;
    let (b2, r2, p2) = (banner.clone(), request.clone(), reply.clone());
    let up = Upstream::start_with(move |mut s: TcpStream| {
        let mut f = || -> Result<()> {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&b2.bytes(0, BANNER))?;
            let mut got = vec![0u8; REQ];
            std::io::Read::read_exact(&mut s, &mut got)?;
            ensure!(got == r2.bytes(0, REQ), "upstream: request corrupted");
            s.write_all(&p2.bytes(0, REPLY))?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut rest = Vec::new();
            std::io::Read::read_to_end(&mut s, &mut rest)?;
            ensure!(rest.is_empty(), "upstream: {} unexpected bytes", rest.len());
            Ok(())
        };
        if let Err(e) = f() {
            eprintln!("speaks-first upstream: {e:#}");
        }
    })
    .expect("upstream");
    let mut failures = Vec::new();
    for mode in modes() {
        let tag = format!("mode={mode} case=upstream_speaks_first seed={seed}");
        let res = (|| -> Result<String> {
            let proxy = Proxy::start_mode(&mode, &[])?;
            let mut s = proxy.connect_tunnel(&up.target(), None)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let t0 = Instant::now();
            let mut got = vec![0u8; BANNER];
            std::io::Read::read_exact(&mut s, &mut got).context(
                "the banner the upstream sent before the 200 did not arrive within 5 s while the \
                 client stayed silent",
            )?;
            let banner_ms = t0.elapsed().as_secs_f64() * 1e3;
            ensure!(got == banner.bytes(0, BANNER), "banner corrupted");
            s.write_all(&request.bytes(0, REQ))?;
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut s, &mut all).context("reading the reply")?;
            ensure!(
                all.len() == REPLY,
                "reply: got {} bytes, want {REPLY}",
                all.len()
            );
            if all != reply.bytes(0, REPLY) {
                let i = all
                    .iter()
                    .zip(reply.bytes(0, REPLY))
                    .position(|(a, b)| *a != b);
                bail!(
                    "reply corrupted: {}",
                    splice_proxy_tests::torture::diagnose(
                        &reply,
                        i.unwrap_or(0) as u64,
                        &all[i.unwrap_or(0)..]
                    )
                );
            }
            Ok(format!("banner after {banner_ms:.1} ms, 4 MiB reply ok"))
        })();
        match res {
            Ok(f) => eprintln!("[torture] {tag} ok | {f}"),
            Err(e) => {
                eprintln!("[torture] {tag} FAIL | {e:#}");
                failures.push(format!("{tag}: {e:#}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
