//! Steps 1 and 3 of the handoff (see `mod.rs`): make each socket the other's redirect target,
//! then, after the `200`, bound both directions and arm the sockets.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64};

use tokio::net::TcpStream;

use super::{Armed, DEFAULT_LIMIT_SLACK, Registration, Sockmap};
use crate::ebpf::Counts;
use crate::tunnel::holds::Backlog;
use crate::tunnel::pump::Progress;
use crate::tunnel::sys::{self, established, queued_total_if_established, set_rcvlowat};

impl Sockmap {
    /// Step 1 of the handoff: makes each socket the other's redirect target.
    /// Nothing is redirected until [`Registration::arm`].
    pub async fn register<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
    ) -> io::Result<Registration<'a>> {
        // Userspace read the request head from the client, possibly ending
        // inside an skb. The kernel hands whole skbs to the program
        // (tcp_read_skb ignores how much of one was already read), so a
        // partly read skb would be redirected again from its start: the
        // head and early bytes would reach upstream twice. So the client is
        // armed only if its queue has been seen empty, and that is checked
        // here, while it is still a plain socket: once in a sockmap, FIONREAD
        // counts only the psock's queue.
        let (moved, client_clean) = empty_queue(client, upstream).await?;
        let mut reg = Registration {
            sockmap: self,
            client: sys::cookie(client)?,
            upstream: sys::cookie(upstream)?,
            in_peers: false,
            armed: false,
            base_client: 0,
            base_upstream: 0,
            forwarded_early: moved,
            client_clean,
            client_armed: false,
            upstream_armed: false,
            userspace: Progress::new(),
            relays: AtomicU64::new(0),
            own_limits: AtomicBool::new(false),
            up_holds: None,
            down_holds: None,
            spliced: Progress::new(),
            detaches: AtomicU64::new(0),
            rearms: AtomicU64::new(0),
            sockets_closed: false,
            bytes_taken: false,
        };
        // Created here rather than by the program's first segment, so that a full map refuses
        // the tunnel instead of leaving a direction uncounted (the FIN waits on the counts).
        self.bytes
            .update_all(&[reg.client, reg.upstream], &[Counts::default(); 2])?;
        reg.in_peers = true;
        self.peers
            .update(&reg.client, &(upstream.as_raw_fd() as u32))?;
        self.peers
            .update(&reg.upstream, &(client.as_raw_fd() as u32))?;
        Ok(reg)
    }
}

impl Registration<'_> {
    /// Step 3 of the handoff, after the 200 was written. A socket that is
    /// no longer ESTABLISHED (its remote already sent FIN) cannot join a
    /// sockmap: then the tunnel is left to userspace ([`Armed::Userspace`]).
    pub async fn arm(&mut self, client: &TcpStream, upstream: &TcpStream) -> io::Result<Armed> {
        // Nothing is armed yet, so these totals only hold what userspace wrote.
        let (Some(base_client), Some(base_upstream)) = (
            queued_total_if_established(client.as_raw_fd())?,
            queued_total_if_established(upstream.as_raw_fd())?,
        ) else {
            return Ok(Armed::Userspace);
        };
        (self.base_client, self.base_upstream) = (base_client, base_upstream);
        self.bound(client, upstream)?;
        self.armed = true;
        // Each socket is armed unless its remote sent FIN since the check;
        // then userspace forwards that socket's direction. Nothing already
        // armed is taken out again: that could drop a segment in flight
        // (docs/kernel-notes.md).
        self.client_armed = self.client_clean && self.arm_if_established(self.client, client)?;
        self.upstream_armed = self.arm_if_established(self.upstream, upstream)?;
        Ok(if self.client_armed || self.upstream_armed {
            Armed::Kernel
        } else {
            Armed::Userspace
        })
    }

    /// Sets the backlog bound of both directions before either socket is armed: socket
    /// buffers, the program's LIMITS entries where the default one will not do, and the hold
    /// wake-ups. (A missing MOVED entry counts as 0.)
    fn bound(&mut self, client: &TcpStream, upstream: &TcpStream) -> io::Result<()> {
        let backlog = self.sockmap.backlog;
        for s in [client, upstream] {
            set_buffers(s.as_raw_fd(), backlog)?;
        }
        if self.base_upstream > DEFAULT_LIMIT_SLACK || self.base_client > DEFAULT_LIMIT_SLACK {
            *self.own_limits.get_mut() = true;
            self.sockmap.limits.update_all(
                &[self.client, self.upstream],
                &[
                    backlog.limit(self.base_upstream, false),
                    backlog.limit(self.base_client, false),
                ],
            )?;
        }
        self.up_holds = Some(self.sockmap.waiters.watch(self.client));
        self.down_holds = Some(self.sockmap.waiters.watch(self.upstream));
        Ok(())
    }

    fn arm_if_established(&self, cookie: u64, sock: &TcpStream) -> io::Result<bool> {
        match self.arm_socket(cookie, sock.as_raw_fd()) {
            Ok(()) => Ok(true),
            Err(_) if !established(sock.as_raw_fd()) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Starts the verdict program on one socket and runs what it queued so
    /// far through it (SO_RCVLOWAT makes TCP call data_ready).
    pub(super) fn arm_socket(&self, cookie: u64, fd: RawFd) -> io::Result<()> {
        self.sockmap.armed.update(&cookie, &(fd as u32))?;
        set_rcvlowat(fd, 1)
    }
}

/// Most bytes userspace forwards while waiting for the client's receive
/// queue to run empty before arming it; past that the client's direction
/// stays in userspace.
const EMPTY_QUEUE_BUDGET: u64 = 4 * 1024 * 1024;

/// Forwards what is queued on `src` to `dst` until the queue is seen empty,
/// which is the only moment no partly read skb can be left on it (a fully
/// read skb is freed; whatever arrives later starts a new skb). Returns the
/// bytes moved and whether the queue was seen empty within the budget.
async fn empty_queue(src: &TcpStream, dst: &TcpStream) -> io::Result<(u64, bool)> {
    let mut buf = Vec::new();
    let mut moved = 0u64;
    loop {
        let queued = sys::inq(src.as_raw_fd())? as usize;
        if queued == 0 {
            return Ok((moved, true));
        }
        if moved >= EMPTY_QUEUE_BUDGET {
            return Ok((moved, false));
        }
        // Read at most what is queued: reading "until EAGAIN" would never end
        // against a client that keeps sending.
        buf.resize(queued.min(256 * 1024), 0);
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok((moved, true)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            dst.writable().await?;
            match dst.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        moved += n as u64;
    }
}

/// Sizes a tunnel socket's buffers for the backlog bound (see [`Backlog`]). The send buffer needs
/// `SO_SNDBUFFORCE` (CAP_NET_ADMIN, which the sockmap path has) to exceed `wmem_max`.
fn set_buffers(fd: RawFd, backlog: Backlog) -> io::Result<()> {
    sys::set_rcvbuf(fd, backlog.rcvbuf())?;
    sys::set_sndbuf(fd, backlog.sndbuf())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A connected pair: (the proxy's socket, as tokio sees it; its remote).
    async fn pair(l: &tokio::net::TcpListener) -> (TcpStream, std::net::TcpStream) {
        let remote = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (local, _) = l.accept().await.unwrap();
        (local, remote)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect()
    }

    async fn queued_at_least(s: &TcpStream, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let queued = sys::inq(s.as_raw_fd()).unwrap() as usize;
            if queued >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {queued} of {n} bytes queued"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn every_queued_byte_is_forwarded_in_order_before_arming() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (src, mut src_remote) = pair(&l).await;
        let (dst, mut dst_remote) = pair(&l).await;
        let sent = pattern(48 * 1024);
        src_remote.write_all(&sent).unwrap();
        queued_at_least(&src, sent.len()).await;

        // Read beside the forwarding, as a peer would.
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 48 * 1024];
            dst_remote.read_exact(&mut got).unwrap();
            got
        });
        let (moved, clean) = empty_queue(&src, &dst).await.unwrap();
        assert_eq!(moved, sent.len() as u64);
        assert!(clean, "the queue was seen empty");
        assert!(reader.join().unwrap() == sent, "forwarded bytes differ");

        // An empty queue moves nothing and is clean at once.
        assert_eq!(empty_queue(&src, &dst).await.unwrap(), (0, true));
    }

    #[tokio::test]
    async fn a_client_that_keeps_sending_stays_in_userspace_after_the_budget() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (src, src_remote) = pair(&l).await;
        let (dst, dst_remote) = pair(&l).await;
        sys::set_rcvbuf(src.as_raw_fd(), 4 * EMPTY_QUEUE_BUDGET).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = std::thread::spawn({
            let (stop, mut s) = (stop.clone(), src_remote);
            move || {
                let chunk = pattern(64 * 1024);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
            }
        });
        let sink = std::thread::spawn(move || {
            let mut s = dst_remote;
            std::io::copy(&mut s, &mut std::io::sink()).unwrap()
        });
        // More than the budget beyond what is read before the budget is spent: the queue is
        // never seen empty, however fast userspace reads.
        queued_at_least(&src, (EMPTY_QUEUE_BUDGET + EMPTY_QUEUE_BUDGET / 4) as usize).await;
        let (moved, clean) = empty_queue(&src, &dst).await.unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(!clean, "a queue that never empties is not clean");
        assert!(moved >= EMPTY_QUEUE_BUDGET, "stopped after {moved} bytes");
        drop((src, dst));
        sender.join().unwrap();
        assert_eq!(sink.join().unwrap(), moved, "every byte read was written");
    }

    /// A tunnel whose peers got nothing but the `200` before arming is bounded by the
    /// program's default limit: no LIMITS or MOVED entries of its own. One whose upstream got
    /// more than the slack (bytes the client sent early) gets its own. Either way, closing it
    /// leaves every map as it was, and its counts are read as the entries go.
    #[tokio::test]
    async fn limits_of_their_own_only_past_the_slack_and_nothing_left_after_close() {
        let sm = Sockmap::start(Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let before = sm.map_entries();
        for early in [0usize, DEFAULT_LIMIT_SLACK as usize + 1] {
            let (client, mut client_remote) = pair(&l).await;
            let (upstream, mut upstream_remote) = pair(&l).await;
            let mut reg = sm.register(&client, &upstream).await.unwrap();
            if early > 0 {
                upstream.try_write(&pattern(early)).unwrap();
            }
            client
                .try_write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .unwrap();
            assert_eq!(reg.arm(&client, &upstream).await.unwrap(), Armed::Kernel);
            let [peers, armed, bytes, limits, moved] = sm.map_entries();
            assert_eq!(
                (peers, armed, bytes),
                (before[0] + 2, before[1] + 2, before[2] + 2),
                "early {early}"
            );
            let own = if early > 0 { 2 } else { 0 };
            assert_eq!(
                (limits, moved),
                (before[3] + own, before[4]),
                "early {early}"
            );

            // 64 KiB each way through the program.
            let data = pattern(64 * 1024);
            client_remote.write_all(&data).unwrap();
            let mut got = vec![0u8; early + data.len()];
            upstream_remote.read_exact(&mut got).unwrap();
            assert!(got[early..] == data[..], "client -> upstream");
            upstream_remote.write_all(&data).unwrap();
            let mut got = vec![0u8; 39 + data.len()];
            client_remote.read_exact(&mut got).unwrap();
            assert!(got[39..] == data[..], "upstream -> client");

            let tally = reg.close(Some((client, upstream)));
            assert_eq!(
                (tally.up, tally.down),
                (64 * 1024, 64 * 1024),
                "early {early}"
            );
            assert_eq!(tally.kernel, 128 * 1024, "early {early}");
            assert_eq!(sm.map_entries(), before, "early {early}: entries left");
        }
    }

    /// An idle tunnel's userspace memory is mostly its futures. The watch loop's is boxed for
    /// the tunnel's life: 3,248 bytes when the splice runs, the timers, the reactor watch of a
    /// pumped socket and the FIN drains were inline; 1,528 once they were boxed where used.
    #[tokio::test]
    async fn a_sockmap_tunnel_future_is_small() {
        let sm = Sockmap::start(Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, _client_remote) = pair(&l).await;
        let (upstream, _upstream_remote) = pair(&l).await;
        let reg = sm.register(&client, &upstream).await.unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let size = std::mem::size_of_val(&reg.run_detached(client, upstream, None, &cancel));
        assert!(size <= 2048, "the watch loop's future is {size} bytes");
    }
}
