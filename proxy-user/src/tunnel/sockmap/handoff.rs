//! Steps 1 and 3 of the handoff (see `mod.rs`): make each socket the other's redirect target,
//! then, after the `200`, bound both directions and arm the sockets.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::TcpStream;

use super::{Armed, DEFAULT_LIMIT_SLACK, Registration, Sockmap};
use crate::ebpf::Counts;
use crate::tunnel::holds::{Backlog, Start};
use crate::tunnel::pump::Progress;
use crate::tunnel::sys::{self, established, queued_total_if_established, set_rcvlowat};

impl Sockmap {
    /// Step 1 of the handoff: makes each socket the other's redirect target. With
    /// `Start::Splice` nothing enters the maps yet: each direction joins at its first return to
    /// the kernel path ([`Registration::join_maps`]). Nothing is redirected until
    /// [`Registration::arm`] or that return.
    pub async fn register<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
    ) -> io::Result<Registration<'a>> {
        self.register_starting(client, upstream, self.backlog.start())
            .await
    }

    /// [`Sockmap::register`] with the directions starting at `start`, whatever the proxy's
    /// setting (the start-up self-check exercises the kernel path from the start).
    pub(in crate::tunnel) async fn register_starting<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
        start: Start,
    ) -> io::Result<Registration<'a>> {
        let splice_first = start == Start::Splice;
        // Userspace read the request head from the client, possibly ending
        // inside an skb. The kernel hands whole skbs to the program
        // (tcp_read_skb ignores how much of one was already read), so a
        // partly read skb would be redirected again from its start: the
        // head and early bytes would reach upstream twice. So the client is
        // armed only if its queue has been seen empty, and that is checked
        // here, while it is still a plain socket: once in a sockmap, FIONREAD
        // counts only the psock's queue. A spliced start reads on from where the head ended
        // and its return is trimmed at `copied_seq` by the program, so it needs none of this.
        let (moved, client_clean) = if splice_first {
            (0, false)
        } else {
            empty_queue(client, upstream).await?
        };
        // A spliced start reads its cookies when it starts: a tunnel that closes before its
        // first byte never needs them.
        let (client_cookie, upstream_cookie) = match splice_first {
            true => (0, 0),
            false => (sys::cookie(client)?, sys::cookie(upstream)?),
        };
        let reg = Registration {
            sockmap: self,
            client: client_cookie,
            upstream: upstream_cookie,
            client_fd: client.as_raw_fd(),
            upstream_fd: upstream.as_raw_fd(),
            splice_first,
            joined: AtomicBool::new(false),
            join_failed: AtomicBool::new(false),
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
        if !splice_first {
            reg.join_maps()?;
        }
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

    /// Both directions start spliced (`Start::Splice`), after the `200` was written: each
    /// peer's base is what userspace wrote to it so far, and hold wake-ups are watched. The
    /// receive buffers get [`Backlog::start_rcvbuf`] until their socket is armed: at the kernel
    /// path's size a spliced source advertises a small window, and the sender's smaller bursts
    /// cost a read, an ACK and a wake-up each.
    pub fn start_spliced(&mut self, client: &TcpStream, upstream: &TcpStream) -> io::Result<()> {
        self.client = sys::cookie(client)?;
        self.upstream = sys::cookie(upstream)?;
        self.base_client = sys::queued_total(client.as_raw_fd())?;
        self.base_upstream = sys::queued_total(upstream.as_raw_fd())?;
        let rcvbuf = self.sockmap.backlog.start_rcvbuf();
        for s in [client, upstream] {
            sys::set_rcvbuf(s.as_raw_fd(), rcvbuf)?;
        }
        self.up_holds = Some(self.sockmap.waiters.watch(self.client));
        self.down_holds = Some(self.sockmap.waiters.watch(self.upstream));
        Ok(())
    }

    /// Gives both sockets their `BYTES` and `PEERS` entries, once: each becomes the other's
    /// redirect target. The `BYTES` entries are created here rather than by the program's first
    /// segment, so that a full map shows here instead of leaving a direction uncounted (the FIN
    /// waits on the counts).
    pub(super) fn join_maps(&self) -> io::Result<()> {
        if self.joined.swap(true, Ordering::Relaxed) {
            return match self.join_failed.load(Ordering::Relaxed) {
                false => Ok(()),
                true => Err(io::Error::other("the sockets could not join the maps")),
            };
        }
        let both = [self.client, self.upstream];
        let r = self
            .sockmap
            .bytes
            .update_all(&both, &[Counts::default(); 2])
            .and_then(|()| {
                let peers = &self.sockmap.peers;
                peers.update(&self.client, &(self.upstream_fd as u32))?;
                peers.update(&self.upstream, &(self.client_fd as u32))
            });
        if r.is_err() {
            self.join_failed.store(true, Ordering::Relaxed);
        }
        r
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
        // What the socket may hold once the program holds (see `Backlog::rcvbuf`): a spliced
        // start or a detach may have widened it.
        sys::set_rcvbuf(fd, self.sockmap.backlog.rcvbuf())?;
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
        let kernel_first = Backlog::default().with_start(Start::Kernel);
        let sm = Sockmap::start(kernel_first).unwrap_or_else(|e| panic!("{e}"));
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

    /// `Start::Splice`: registering and starting a tunnel puts nothing into the maps; its bytes
    /// are spliced, and nothing is left in the maps once it closed.
    #[tokio::test]
    async fn a_spliced_start_touches_no_map_and_leaves_none() {
        let splice_first = Backlog::default().with_start(Start::Splice);
        let sm = Sockmap::start(splice_first).unwrap_or_else(|e| panic!("{e}"));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let before = sm.map_entries();
        let (client, client_remote) = pair(&l).await;
        let (upstream, upstream_remote) = pair(&l).await;
        let mut reg = sm.register(&client, &upstream).await.unwrap();
        assert!(reg.splice_first());
        reg.start_spliced(&client, &upstream).unwrap();
        assert_eq!(sm.map_entries(), before, "nothing in the maps at the start");
        let data = pattern(32 * 1024);
        // The remotes block: they run on a thread beside the watch loop.
        let remotes = std::thread::spawn({
            let data = data.clone();
            move || {
                let (mut c, mut u) = (client_remote, upstream_remote);
                c.write_all(&data).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut got = Vec::new();
                u.read_to_end(&mut got).unwrap();
                u.shutdown(std::net::Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).unwrap();
                (got, rest)
            }
        });
        let cancel = tokio_util::sync::CancellationToken::new();
        let run = reg.run_detached(client, upstream, None, &cancel);
        let (end, sockets) = tokio::time::timeout(std::time::Duration::from_secs(10), run)
            .await
            .expect("the tunnel ends");
        let (got, rest) = remotes.join().unwrap();
        assert!(matches!(end, crate::tunnel::End::Closed), "{end}");
        assert!(got == data, "client → upstream");
        assert!(rest.is_empty(), "upstream → client: nothing but the FIN");
        let tally = reg.close(sockets);
        assert_eq!((tally.up, tally.down), (data.len() as u64, 0));
        assert_eq!(tally.relayed, 0);
        assert_eq!(sm.map_entries(), before, "entries left behind");
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
