//! The sockmap start-up check: tunnels on loopback through the real
//! program, exercising what the torture suite found fragile — bytes queued
//! before arming (a server that speaks first), both directions, half-close
//! in order, byte counters, map entries removed afterwards, and the backlog
//! bound against a server that does not read (then every byte in order).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::end::End;
use super::holds::{Overrun, Start};
use super::sockmap::Sockmap;

async fn pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = TcpStream::connect(l.local_addr()?).await?;
    let (b, _) = l.accept().await?;
    Ok((a, b))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub(super) async fn run(sm: &Sockmap) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        check(sm).await?;
        check_bound(sm).await?;
        if sm.backlog().start() == Start::Splice {
            check_spliced_start(sm).await?;
        }
        Ok(())
    })
    .await
    .map_err(|_| "timed out after 10 s".to_string())?
}

/// A server that stops reading: the client can get at most the backlog bound (plus the two
/// end sockets' own small buffers) ahead, and once the server reads, every byte arrives in order.
/// With `--sockmap-overrun splice` the stalled direction must also have left the kernel path
/// and come back to it, and the bytes after that go through the kernel again.
async fn check_bound(sm: &Sockmap) -> Result<(), String> {
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let (client, proxy_client) = pair().await.map_err(io("loopback pair"))?;
    let (proxy_upstream, mut server) = pair().await.map_err(io("loopback pair"))?;
    // Small buffers at the ends, so what the client gets ahead is what the proxy holds.
    socket2::SockRef::from(&server)
        .set_recv_buffer_size(64 * 1024)
        .map_err(io("server SO_RCVBUF"))?;
    socket2::SockRef::from(&client)
        .set_send_buffer_size(64 * 1024)
        .map_err(io("client SO_SNDBUF"))?;
    let reg = armed(sm, &proxy_client, &proxy_upstream, Duration::ZERO).await?;
    let bound = sm.backlog().bytes();
    let slack = 2 * 1024 * 1024;
    let cancel = CancellationToken::new();
    let watcher = reg.run(&proxy_client, &proxy_upstream, None, &cancel);
    let traffic = async {
        // Write until the client makes no progress for a while.
        let chunk = pattern(256 * 1024, 3);
        let mut written = 0usize;
        let mut quiet_since = tokio::time::Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(150) && written as u64 <= 4 * bound {
            match client.try_write(&chunk[written % chunk.len()..]) {
                Ok(n) => {
                    written += n;
                    quiet_since = tokio::time::Instant::now();
                    // Let the watcher run (one thread), at a pace that leaves the walk which
                    // takes the direction off the kernel path (after the soft threshold) time
                    // to finish before the threshold: 256 KiB a millisecond.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(format!("client write: {e}")),
            }
        }
        if written as u64 > bound + slack {
            return Err(format!(
                "with the server not reading, the client got {written} bytes ahead: more than \
                 the {bound}-byte backlog bound"
            ));
        }
        let expected: Vec<u8> = chunk.iter().copied().cycle().take(written).collect();
        // The server catches up while the client stays quiet: a spliced direction returns to
        // the kernel path (SPLICE_QUIET), then a last stretch goes through the kernel.
        let mut got = vec![0u8; written];
        server
            .read_exact(&mut got)
            .await
            .map_err(io("server read"))?;
        if got != expected {
            return Err(format!(
                "after the stall: {written} bytes came back different"
            ));
        }
        if sm.splice_unavailable().is_none() && sm.backlog().overrun() == Overrun::Splice {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while reg.transitions().1 == 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let (detaches, rearms) = reg.transitions();
            if detaches == 0 || rearms == 0 {
                return Err(format!(
                    "the stalled direction did not leave the kernel path and come back \
                     ({detaches} detaches, {rearms} returns)"
                ));
            }
        }
        let tail = pattern(256 * 1024, 5);
        let mut client = client;
        client.write_all(&tail).await.map_err(io("client write"))?;
        client.shutdown().await.map_err(io("client shutdown"))?;
        let mut rest = Vec::new();
        server
            .read_to_end(&mut rest)
            .await
            .map_err(io("server read"))?;
        if rest != tail {
            return Err(format!(
                "after returning to the kernel: sent {} bytes, got {} (or different content)",
                tail.len(),
                rest.len()
            ));
        }
        server.shutdown().await.map_err(io("server shutdown"))?;
        Ok::<_, String>(written + tail.len())
    };
    let traffic = cancel_on_error(traffic, &cancel);
    let (end, traffic) = tokio::join!(watcher, traffic);
    let written = traffic?;
    if !matches!(end, End::Closed) {
        return Err(format!(
            "held tunnel ended {end} ({:?}) instead of closing",
            end.error()
        ));
    }
    if reg.bytes().0 != written as u64 {
        return Err(format!(
            "counted {} bytes up, sent {written}",
            reg.bytes().0
        ));
    }
    Ok(())
}

/// A tunnel that starts spliced (`--sockmap-start splice`): its first bytes go by splice,
/// both directions join the kernel path once quiet, the bytes after that go through the
/// program, every byte arrives in order, and no map entry is left afterwards.
async fn check_spliced_start(sm: &Sockmap) -> Result<(), String> {
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let entries_before = sm.map_entries();
    let (mut client, proxy_client) = pair().await.map_err(io("loopback pair"))?;
    let (proxy_upstream, mut server) = pair().await.map_err(io("loopback pair"))?;
    let mut reg = sm
        .register_starting(&proxy_client, &proxy_upstream, Start::Splice)
        .await
        .map_err(|e| format!("register: {e}"))?;
    reg.start_spliced(&proxy_client, &proxy_upstream)
        .map_err(io("starting spliced"))?;
    let cancel = CancellationToken::new();
    let watcher = reg.run_detached(proxy_client, proxy_upstream, None, &cancel);
    let (first, up, down) = (
        pattern(64 * 1024, 11),
        pattern(256 * 1024, 13),
        pattern(256 * 1024, 15),
    );
    let traffic = async {
        client.write_all(&first).await.map_err(io("client write"))?;
        let mut got = vec![0u8; first.len()];
        server
            .read_exact(&mut got)
            .await
            .map_err(io("server read"))?;
        if got != first {
            return Err("spliced first bytes arrived corrupted".to_string());
        }
        // Both directions join the kernel path after their quiet period.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while reg.transitions().1 < 2 {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the spliced directions did not join the kernel path ({} returns)",
                    reg.transitions().1
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        exchange(&mut client, &mut server, &up, &down)
            .await
            .map_err(|e| format!("after joining the kernel path: {e}"))
    };
    let traffic = cancel_on_error(traffic, &cancel);
    let ((end, sockets), traffic) = tokio::join!(watcher, traffic);
    traffic?;
    if !matches!(end, End::Closed) {
        return Err(format!(
            "spliced tunnel ended {end} ({:?}) instead of closing",
            end.error()
        ));
    }
    let tally = reg.close(sockets);
    let want = ((first.len() + up.len()) as u64, down.len() as u64);
    if (tally.up, tally.down) != want || tally.kernel < (up.len() + down.len()) as u64 {
        return Err(format!(
            "spliced start: counted {tally:?}, sent {want:?}, the last {} bytes through the \
             program",
            up.len() + down.len()
        ));
    }
    let entries = sm.map_entries();
    if entries != entries_before {
        return Err(format!(
            "spliced start: map entries were left behind ({entries_before:?} before, \
             {entries:?} after)"
        ));
    }
    Ok(())
}

/// `up` client → server, then, after the client's half-close, `down` server → client: every
/// byte in order both ways, each FIN after the last byte.
async fn exchange(
    client: &mut TcpStream,
    server: &mut TcpStream,
    up: &[u8],
    down: &[u8],
) -> Result<(), String> {
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let (w, r) = tokio::join!(
        async {
            client.write_all(up).await?;
            client.shutdown().await
        },
        async {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.map(|_| got)
        }
    );
    w.map_err(io("client write"))?;
    let got = r.map_err(io("server read"))?;
    if got != up {
        return Err(format!(
            "client → server: sent {} bytes, got {} (or different content)",
            up.len(),
            got.len()
        ));
    }
    server.write_all(down).await.map_err(io("server write"))?;
    server.shutdown().await.map_err(io("server shutdown"))?;
    let mut got = Vec::new();
    client
        .read_to_end(&mut got)
        .await
        .map_err(io("client read"))?;
    if got != down {
        return Err(format!(
            "server → client after half-close: sent {} bytes, got {}",
            down.len(),
            got.len()
        ));
    }
    Ok(())
}

/// A failed check must not leave the watcher waiting for a FIN that never comes.
async fn cancel_on_error<T>(
    traffic: impl std::future::Future<Output = Result<T, String>>,
    cancel: &CancellationToken,
) -> Result<T, String> {
    let r = traffic.await;
    if r.is_err() {
        cancel.cancel();
    }
    r
}

/// Registers a pair and arms it after `pause`; both sockets must end up forwarded by the kernel.
async fn armed<'a>(
    sm: &'a Sockmap,
    proxy_client: &TcpStream,
    proxy_upstream: &TcpStream,
    pause: Duration,
) -> Result<super::sockmap::Registration<'a>, String> {
    // From the start on the kernel path: the program, the bound, the detach and the return
    // (which is how a spliced start joins the kernel path too).
    let mut reg = sm
        .register_starting(proxy_client, proxy_upstream, Start::Kernel)
        .await
        .map_err(|e| format!("register: {e}"))?;
    tokio::time::sleep(pause).await;
    match reg.arm(proxy_client, proxy_upstream).await {
        Ok(super::sockmap::Armed::Kernel) => Ok(reg),
        Ok(super::sockmap::Armed::Userspace) => Err("an established pair was not armed".into()),
        Err(e) => Err(format!("arm: {e}")),
    }
}

async fn check(sm: &Sockmap) -> Result<(), String> {
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let entries_before = sm.map_entries();
    let (mut client, proxy_client) = pair().await.map_err(io("loopback pair"))?;
    let (proxy_upstream, mut server) = pair().await.map_err(io("loopback pair"))?;

    // A server that speaks first: its banner waits in the receive queue.
    let banner = pattern(3000, 1);
    server.write_all(&banner).await.map_err(io("banner"))?;
    // The pause lets the banner settle in the upstream socket's queue before arming.
    let reg = armed(sm, &proxy_client, &proxy_upstream, Duration::from_millis(5)).await?;

    let cancel = CancellationToken::new();
    let watcher = reg.run(&proxy_client, &proxy_upstream, None, &cancel);
    let traffic = async {
        let mut got = vec![0u8; banner.len()];
        client
            .read_exact(&mut got)
            .await
            .map_err(io("reading the banner"))?;
        if got != banner {
            return Err("bytes queued before arming arrived corrupted".to_string());
        }
        let up = pattern(256 * 1024, 7);
        let down = pattern(256 * 1024, 9);
        exchange(&mut client, &mut server, &up, &down).await?;
        Ok::<_, String>((up.len() as u64, (banner.len() + down.len()) as u64))
    };
    let (end, traffic) = tokio::join!(watcher, traffic);
    let (up, down) = traffic?;
    if !matches!(end, End::Closed) {
        return Err(format!(
            "tunnel ended {end} ({:?}) instead of closing",
            end.error()
        ));
    }
    if reg.bytes() != (up, down) {
        return Err(format!(
            "program counted {:?}, expected {:?}",
            reg.bytes(),
            (up, down)
        ));
    }
    drop(reg);
    let entries = sm.map_entries();
    if entries != entries_before {
        return Err(format!(
            "map entries were left behind (PEERS, ARMED, BYTES, LIMITS, MOVED: {entries_before:?} \
             before, {entries:?} after)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn sockmap_self_check_passes_here() {
        let sm = super::Sockmap::start(Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let stats = sm.kernel_stats();
        assert_eq!(stats.read().unwrap(), Default::default(), "a fresh program");
        super::run(&sm).await.unwrap();
        // Both checks redirected bytes; the stalled direction left the kernel path before
        // anything had to be held (run() checks it came back).
        let after = stats.read().unwrap();
        assert!(after.redirected_bytes >= 2 * 256 * 1024, "{after:?}");
        assert!(after.redirected_segments >= 1, "{after:?}");
        assert_eq!(
            (after.passed_bytes, after.passed_segments),
            (0, 0),
            "{after:?}"
        );
    }

    #[tokio::test]
    async fn sockmap_self_check_passes_here_relaying() {
        let backlog = super::super::holds::Backlog::default()
            .with_overrun(super::super::holds::Overrun::Relay);
        let sm = super::Sockmap::start(backlog).unwrap_or_else(|e| panic!("{e}"));
        let stats = sm.kernel_stats();
        super::run(&sm).await.unwrap();
        // The stalled server made the program hold.
        let after = stats.read().unwrap();
        assert!(after.holds >= 1 && after.held_bytes > 0, "{after:?}");
    }
}
