//! The portable data path: read into a userspace buffer, write it out.

use std::io;

use tokio::net::TcpStream;

use super::pump::{Dir, Progress, PumpError, shutdown_write};

/// Per-direction buffer; allocated when the first byte arrives so idle
/// tunnels cost no buffer memory.
const BUF_SIZE: usize = 128 * 1024;

/// Moves bytes `src` → `dst` until EOF (then shuts `dst` for writing).
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Dir,
    progress: &Progress,
) -> Result<(), PumpError> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        src.readable().await.map_err(PumpError::Read)?;
        if buf.is_empty() {
            buf = vec![0u8; BUF_SIZE];
        }
        let n = match src.try_read(&mut buf) {
            Ok(0) => return shutdown_write(dst),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(PumpError::Read(e)),
        };
        let mut off = 0;
        while off < n {
            dst.writable().await.map_err(PumpError::Write)?;
            match dst.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        progress.add(dir, n);
    }
}
