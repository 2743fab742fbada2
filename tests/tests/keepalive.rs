//! TCP keepalive (`--tcp-keepalive`, on by default): both sockets of every tunnel carry the
//! keepalive timer in every data path, and a peer that vanishes from a quiet tunnel (every
//! segment to and from it dropped: no FIN, no reset) is found by the probes and the tunnel ends,
//! with the other side told. `cargo test --release -p splice-proxy-tests --test keepalive --
//! --nocapture` prints how long each case took.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use splice_proxy_tests::blackhole::Blackhole;
use splice_proxy_tests::{Proxy, TEST_POLICY, modes, serial};

/// Short test timings: idle 1 s, then two probes 1 s apart, so a vanished peer is dead after 3 s.
const SHORT: &str = "1s,1s,2";
/// A deadline against hangs, not a measurement.
const WITHIN: Duration = Duration::from_secs(20);

fn start(mode: &str, keepalive: Option<&str>) -> Result<Proxy> {
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--mode", mode, "--allow-anonymous"]);
    if let Some(k) = keepalive {
        args.extend_from_slice(&["--tcp-keepalive", k]);
    }
    Proxy::start(&args)
}

/// A tunnel through `proxy` to a fresh upstream, with one round trip each way done, so both
/// sockets are established and handed to the data path.
fn tunnel(proxy: &Proxy) -> Result<(TcpStream, TcpStream)> {
    let upstream = TcpListener::bind("127.0.0.1:0")?;
    let target = upstream.local_addr()?.to_string();
    let mut client = proxy.connect_tunnel(&target, None)?;
    let (mut server, _) = upstream.accept()?;
    round_trip(&mut client, &mut server)?;
    round_trip(&mut server, &mut client)?;
    Ok((client, server))
}

fn round_trip(from: &mut TcpStream, to: &mut TcpStream) -> Result<()> {
    from.write_all(b"ping")?;
    let mut got = [0u8; 4];
    to.set_read_timeout(Some(Duration::from_secs(5)))?;
    to.read_exact(&mut got)?;
    ensure!(&got == b"ping", "the tunnel changed the bytes");
    Ok(())
}

/// `ss -o` lines of the proxy's two sockets of one tunnel: the one accepted on its listening
/// port, and the one it connected to the upstream's port.
fn proxy_sockets(proxy_port: u16, upstream_port: u16) -> Result<Vec<String>> {
    let filter = format!("( sport = :{proxy_port} or dport = :{upstream_port} )");
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established", &filter])
        .output()
        .context("ss (iproute2)")?;
    ensure!(out.status.success(), "ss: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect())
}

/// The proxy's two sockets of a tunnel once nothing they sent is unacknowledged (`Send-Q` 0: the
/// peers' delayed ACKs have come). Keepalive probes only such a socket; one with data in flight
/// is retransmitting instead, and `ss` shows that timer.
fn quiet_proxy_sockets(proxy_port: u16, upstream_port: u16) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = proxy_sockets(proxy_port, upstream_port)?;
        let send_q = |l: &String| l.split_whitespace().nth(1).map(str::to_string);
        if lines.len() == 2 && lines.iter().all(|l| send_q(l).as_deref() == Some("0")) {
            return Ok(lines);
        }
        ensure!(
            Instant::now() < deadline,
            "the proxy's sockets never went quiet: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn both_tunnel_sockets_carry_the_keepalive_timer_in_every_mode() {
    let _serial = serial();
    for mode in modes() {
        for (keepalive, armed) in [(None, true), (Some("off"), false)] {
            let proxy = start(&mode, keepalive).unwrap();
            let (client, server) = tunnel(&proxy).unwrap();
            let upstream_port = server.local_addr().unwrap().port();
            let lines = quiet_proxy_sockets(proxy.addr.port(), upstream_port).unwrap();
            eprintln!(
                "mode={mode} --tcp-keepalive {keepalive:?}:\n  {}",
                lines.join("\n  ")
            );
            assert_eq!(
                lines.len(),
                2,
                "mode={mode}: the proxy's two sockets: {lines:?}"
            );
            for line in &lines {
                assert_eq!(
                    line.contains("timer:(keepalive"),
                    armed,
                    "mode={mode} --tcp-keepalive {keepalive:?}: {line}"
                );
            }
            drop((client, server));
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

#[test]
fn a_peer_that_vanished_from_a_quiet_tunnel_is_found_by_keepalive() {
    let _serial = serial();
    let mut failures = Vec::new();
    for mode in modes() {
        for side in [Side::Client, Side::Upstream] {
            match vanished(&mode, side) {
                Ok(figures) => eprintln!("[keepalive] mode={mode} {side:?} vanished: {figures}"),
                Err(e) => failures.push(format!("mode={mode} {side:?} vanished: {e:#}")),
            }
        }
    }
    assert!(failures.is_empty(), "\n  {}", failures.join("\n  "));
}

/// One side of a quiet tunnel vanishes; the other must see the tunnel end, and the access log
/// must say that the vanished side timed out.
fn vanished(mode: &str, side: Side) -> Result<String> {
    let proxy = start(mode, Some(SHORT))?;
    let (mut client, mut server) = tunnel(&proxy)?;
    quiet_proxy_sockets(proxy.addr.port(), server.local_addr()?.port())?;
    let (port, survivor, end) = match side {
        Side::Client => (client.local_addr()?.port(), &mut server, "end=client_reset"),
        Side::Upstream => (
            server.local_addr()?.port(),
            &mut client,
            "end=upstream_reset",
        ),
    };
    let hole = Blackhole::port(port)?;
    let t0 = Instant::now();
    survivor.set_read_timeout(Some(WITHIN))?;
    let mut buf = [0u8; 64];
    let how = match survivor.read(&mut buf) {
        Ok(0) => "FIN",
        Ok(n) => bail!("{n} unexpected bytes"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => "reset",
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            bail!("the tunnel was still open {WITHIN:?} after its peer vanished")
        }
        Err(e) => bail!("reading the survivor: {e}"),
    };
    let took = t0.elapsed();
    let line = proxy.wait_for_log("status=200", Duration::from_secs(5))?;
    drop(hole);
    ensure!(line.contains(end), "want {end}: {line}");
    ensure!(
        line.contains("timed out"),
        "the probes, not something else, must have ended it: {line}"
    );
    Ok(format!(
        "the survivor saw a {how} {:.1} s after the peer vanished",
        took.as_secs_f64()
    ))
}
