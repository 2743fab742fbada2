//! The socket and epoll system calls the data paths make, in one place: what each asks of the
//! kernel, with its `unsafe` and why that is sound. socket2 does it where it has the call; the
//! rest are thin wrappers over libc. Nothing here knows about tunnels, bounds or the program.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The socket cookie (`SO_COOKIE`): the key the eBPF program looks a socket up by.
pub(super) fn cookie(s: &impl AsFd) -> io::Result<u64> {
    socket2::SockRef::from(s).cookie()
}

/// `TCP_ESTABLISHED` from the kernel's `enum tcp_state` (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;

/// Whether the socket is ESTABLISHED: the only state in which the kernel lets it join a
/// sockmap (a socket whose remote sent FIN is in CLOSE_WAIT).
pub(super) fn established(fd: RawFd) -> bool {
    tcp_info(fd).is_ok_and(|i| i.tcpi_state == TCP_ESTABLISHED)
}

/// `TCP_INFO`. Takes the socket lock, so a softirq working on the socket has finished.
pub(super) fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; zero is a valid bit pattern.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: fd is an open TCP socket; info/len are valid out-pointers.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Bytes queued on a socket's receive queue (`SIOCINQ`). Once the socket is in a sockmap this
/// counts only the psock's queue.
pub(super) fn inq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// Bytes in a socket's send queue not yet acknowledged (`SIOCOUTQ`).
pub(super) fn outq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

fn ioctl_int(fd: RawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCINQ and SIOCOUTQ write one int through the pointer; fd is an open socket.
    if unsafe { libc::ioctl(fd, request, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// From one `TCP_INFO` read: the bytes the socket's remote has acknowledged, and every byte ever
/// put into its send queue ([`queued_total`]).
pub(super) fn acked_and_queued(fd: RawFd) -> io::Result<(u64, u64)> {
    let acked = tcp_info(fd)?.tcpi_bytes_acked;
    Ok((acked, acked + outq(fd)?))
}

/// Every byte ever put into the socket's send queue: acked + still queued.
pub(super) fn queued_total(fd: RawFd) -> io::Result<u64> {
    Ok(acked_and_queued(fd)?.1)
}

/// [`queued_total`] of an ESTABLISHED socket, from the same `TCP_INFO` read that saw the state;
/// `None` for any other state (or a socket `TCP_INFO` fails on).
pub(super) fn queued_total_if_established(fd: RawFd) -> io::Result<Option<u64>> {
    match tcp_info(fd) {
        Ok(i) if i.tcpi_state == TCP_ESTABLISHED => Ok(Some(i.tcpi_bytes_acked + outq(fd)?)),
        _ => Ok(None),
    }
}

/// The receive buffer as the kernel counts it (`sk_rcvbuf`, which doubles what is asked for:
/// room for its own overhead, hence the half). `SO_RCVBUFFORCE` (CAP_NET_ADMIN) may exceed
/// `rmem_max`; without it, `SO_RCVBUF` up to that.
pub(super) fn set_rcvbuf(fd: RawFd, bytes: u64) -> io::Result<()> {
    set_forced(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes)
}

/// The send buffer as the kernel counts it (`sk_sndbuf`); see [`set_rcvbuf`].
pub(super) fn set_sndbuf(fd: RawFd, bytes: u64) -> io::Result<()> {
    set_forced(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes)
}

fn set_forced(fd: RawFd, forced: libc::c_int, plain: libc::c_int, bytes: u64) -> io::Result<()> {
    let half = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX);
    setsockopt_int(fd, forced, half).or_else(|_| setsockopt_int(fd, plain, half))
}

/// The socket's pending error (`SO_ERROR`), which reading it clears.
pub(super) fn take_error(fd: RawFd) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd is an open socket; err/len are valid out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

/// `SO_RCVLOWAT`. On a socket in a sockmap, setting it runs whatever is queued through the
/// verdict program (`tcp_set_rcvlowat` → `tcp_data_ready`).
pub(super) fn set_rcvlowat(fd: RawFd, value: libc::c_int) -> io::Result<()> {
    setsockopt_int(fd, libc::SO_RCVLOWAT, value)
}

fn setsockopt_int(fd: RawFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: fd is an open socket; the option value is a local int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A nonblocking `send`, without SIGPIPE.
pub(super) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: fd is an open socket; buf is valid for buf.len() bytes.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A nonblocking `recv` with `flags` (`MSG_PEEK`, or 0).
pub(super) fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: fd is an open socket; buf is valid for writes of buf.len() bytes.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A private, edge-triggered epoll set, itself watched by tokio: `(fd, events, token)` for each
/// member. The data paths use one where tokio's own registration would wake them for events
/// they do not want (every batch the kernel redirects, for a socket in a sockmap).
pub(super) fn epoll_set(members: &[(RawFd, libc::c_int, u64)]) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: epoll_create1 returns a new fd or -1.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a new, open fd owned by nobody else.
    let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
    for &(fd, events, token) in members {
        epoll_add(epoll.as_raw_fd(), fd, events, token)?;
    }
    // SAFETY: the OwnedFd stays open, and the same fd, for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Adds `fd` to the epoll set `epoll`, edge-triggered, for `events`, reported with `token`.
pub(super) fn epoll_add(
    epoll: RawFd,
    fd: RawFd,
    events: libc::c_int,
    token: u64,
) -> io::Result<()> {
    epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, events, token)
}

/// Changes what `fd`, a member of `epoll`, is watched for (edge-triggered). An event already
/// pending for the new mask is reported at once, so nothing that happened before is missed.
pub(super) fn epoll_modify(
    epoll: RawFd,
    fd: RawFd,
    events: libc::c_int,
    token: u64,
) -> io::Result<()> {
    epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, events, token)
}

fn epoll_ctl(
    epoll: RawFd,
    op: libc::c_int,
    fd: RawFd,
    events: libc::c_int,
    token: u64,
) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (events | libc::EPOLLET) as u32,
        u64: token,
    };
    // SAFETY: both fds are open; ev is a valid epoll_event.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until the set has events and returns how many it put into `events` (at least one).
pub(super) async fn epoll_next(
    epoll: &AsyncFd<OwnedFd>,
    events: &mut [libc::epoll_event],
) -> io::Result<usize> {
    loop {
        let mut guard = epoll.readable().await?;
        let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the epoll fd is open; the buffer holds `max` events; timeout 0 never blocks.
        let n =
            unsafe { libc::epoll_wait(epoll.get_ref().as_raw_fd(), events.as_mut_ptr(), max, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n < events.len() {
            // The set is drained: wait for its next edge (one that came after this read is
            // kept by tokio's readiness tick).
            guard.clear_ready();
        }
        if n > 0 {
            return Ok(n);
        }
    }
}
