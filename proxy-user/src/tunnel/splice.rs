//! The splice(2) data path: socket → pipe → socket per direction, so bytes
//! move between kernel buffers without a copy through userspace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::pump::{Dir, Progress, PumpError, shutdown_write};

/// Pipe capacity asked for; the kernel may grant less (pipe-max-size).
pub(super) const PIPE_SIZE: usize = 1024 * 1024;

/// A nonblocking pipe used as the splice buffer of one direction.
pub(super) struct Pipe {
    pub(super) read: OwnedFd,
    pub(super) write: OwnedFd,
    pub(super) capacity: usize,
}

impl Pipe {
    pub(super) fn new() -> io::Result<Pipe> {
        #[cfg(test)]
        if PIPES_FAIL.with(|f| f.get()) {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        #[cfg(test)]
        PIPES_MADE.with(|n| n.set(n.get() + 1));
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two fds into the array we pass; we check the result.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe fd we own; failure only leaves the default size.
        let granted = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        let capacity = if granted > 0 {
            granted as usize
        } else {
            // SAFETY: as above, a query on our own fd.
            let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if size > 0 { size as usize } else { 64 * 1024 }
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

#[cfg(test)]
thread_local! {
    /// Pipes made on this thread, for the tests.
    pub(super) static PIPES_MADE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Set by a test: pipes fail on this thread as if out of descriptors.
    pub(super) static PIPES_FAIL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call; null offsets
    // are required for pipes and sockets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves bytes `src` → `dst` until EOF (then shuts `dst` for writing).
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Dir,
    progress: &Progress,
) -> Result<(), PumpError> {
    let mut pipe: Option<Pipe> = None;
    loop {
        let ready = src
            .ready(Interest::READABLE)
            .await
            .map_err(PumpError::Read)?;
        // Created on first data, so an idle tunnel holds no pipe, and one that closes unused
        // makes none (a FIN or reset with nothing queued: each handshake-only tunnel used to
        // cost a 1 MiB pipe, a failed splice and two closes). Out of
        // descriptors (EMFILE, ENFILE), the direction is copied through a
        // userspace buffer instead: the tunnel lives on without a pipe.
        if pipe.is_none() {
            if (ready.is_read_closed() || ready.is_error())
                && super::sys::inq(src.as_raw_fd()).map_err(PumpError::Read)? == 0
            {
                return match src.take_error().map_err(PumpError::Read)? {
                    Some(e) => Err(PumpError::Read(e)),
                    None => shutdown_write(dst),
                };
            }
            match Pipe::new() {
                Ok(p) => pipe = Some(p),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    return super::copy::pump(src, dst, dir, progress).await;
                }
                Err(e) => return Err(PumpError::Read(e)),
            }
        }
        let p = pipe.as_ref().expect("created above");
        // The pipe is always empty here, so only the socket can block.
        let n = match src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), p.write.as_raw_fd(), p.capacity)
        }) {
            Ok(0) => return shutdown_write(dst),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(PumpError::Read(e)),
        };
        let mut left = n;
        while left > 0 {
            dst.writable().await.map_err(PumpError::Write)?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(p.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        progress.add(dir, n);
    }
}

/// Checks that splice(2) moves bytes between TCP sockets and a pipe here.
pub(super) fn probe() -> Result<(), String> {
    use std::io::{Read, Write};
    let run = || -> io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut a = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (b, _) = listener.accept()?;
        let pipe = Pipe::new()?;
        a.write_all(b"probe")?;
        let n = splice(b.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity);
        // The byte may not have arrived yet: retry briefly on EAGAIN.
        let n = match n {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                splice(b.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity)?
            }
            other => other?,
        };
        let m = splice(pipe.read.as_raw_fd(), b.as_raw_fd(), n)?;
        let mut back = [0u8; 5];
        a.read_exact(&mut back)?;
        if n != 5 || m != 5 || &back != b"probe" {
            return Err(io::Error::other("bytes did not round-trip"));
        }
        Ok(())
    };
    run().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};

    use super::*;

    #[test]
    fn splice_works_here() {
        super::probe().unwrap();
    }

    /// (application, the proxy's socket) for each side of a direction.
    fn sides() -> (
        (std::net::TcpStream, TcpStream),
        (TcpStream, std::net::TcpStream),
    ) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let pair = || {
            let app = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (proxy, _) = l.accept().unwrap();
            proxy.set_nonblocking(true).unwrap();
            (app, TcpStream::from_std(proxy).unwrap())
        };
        let (client_app, src) = pair();
        let (server_app, dst) = pair();
        ((client_app, src), (dst, server_app))
    }

    /// A direction whose source closes before sending anything passes the FIN on, or reports
    /// the reset, without making a pipe; one with data makes its pipe and forwards every byte.
    #[tokio::test]
    async fn a_direction_that_closes_unused_makes_no_pipe() {
        let progress = Progress::new();
        let made = || PIPES_MADE.with(|n| n.get());
        let before = made();

        let ((client_app, src), (dst, mut server_app)) = sides();
        client_app.shutdown(Shutdown::Write).unwrap();
        pump(&src, &dst, Dir::Up, &progress).await.unwrap();
        let mut rest = Vec::new();
        server_app.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the FIN passed on, nothing else");
        assert_eq!(made(), before, "a pipe for a FIN");

        let ((client_app, src), (dst, _server_app)) = sides();
        socket2::SockRef::from(&client_app)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client_app);
        let r = pump(&src, &dst, Dir::Up, &progress).await;
        assert!(
            matches!(&r, Err(PumpError::Read(e)) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert_eq!(made(), before, "a pipe for a reset");

        let ((mut client_app, src), (dst, mut server_app)) = sides();
        client_app.write_all(b"data, then FIN").unwrap();
        client_app.shutdown(Shutdown::Write).unwrap();
        pump(&src, &dst, Dir::Up, &progress).await.unwrap();
        let mut got = Vec::new();
        server_app.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"data, then FIN");
        assert_eq!(made(), before + 1);
    }
}
