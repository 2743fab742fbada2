//! Taking a socket off the kernel path without losing a byte: requests to leave the `ARMED`
//! map, answered in batches by one walk of the `iter/tcp` program (`splice_detach` in
//! `proxy-ebpf/src/main.rs`).
//!
//! Why an iterator: deleting a socket from `ARMED` with the bpf() syscall does not take the
//! socket's lock, so a softirq already inside `tcp_read_skb` for it runs on without a program and
//! drops every skb it unlinks after that. The kernel's TCP iterator runs the program with
//! `lock_sock` held on each socket it visits, so a delete made there cannot meet a verdict in
//! progress (docs/kernel-notes.md, "Leaving the kernel path"). The walk visits every TCP socket of
//! the network namespace, so requests are batched: each walk answers every request made before it
//! began, and ends as soon as all of them are answered (`WALK` counts them down), so a walk costs
//! on average half a pass over the established hash rather than all of it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, MapData};
use tokio::sync::{Notify, oneshot};

use crate::ebpf::{DETACH_BEHIND, DETACH_DONE, DETACH_PENDING, WALK_DONE_BYTES};

/// What a walk answered for one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Off `ARMED`: no verdict runs on the socket any more; new bytes stay in its receive queue.
    Detached,
    /// Held bytes were not all moved yet: move them and ask again.
    Behind,
    /// The socket was not in `ARMED`, or the walk did not meet it.
    NotArmed,
    /// The walk itself failed.
    Failed(String),
}

/// Walk counters, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct WalkStats {
    pub walks: u64,
    pub seconds: f64,
}

type Request = (u64, oneshot::Sender<Answer>);

/// The iterator and its request map, shared by every tunnel of a [`super::sockmap::Sockmap`].
pub struct Detacher {
    queue: Mutex<Vec<Request>>,
    wake: Notify,
    stats: Mutex<WalkStats>,
}

/// What one walk needs: the `DETACH` and `WALK` maps and the iterator's link.
pub struct Walker {
    requests: HashMap<MapData, u64, u32>,
    /// Slot 0: requests of the running walk the iterator has not answered yet.
    left: Array<MapData, u32>,
    link: OwnedFd,
}

impl Walker {
    /// Attaches the loaded `iter/tcp` program (`prog`) and keeps its link, from which each walk
    /// makes a fresh iterator.
    pub fn new(
        requests: HashMap<MapData, u64, u32>,
        left: Array<MapData, u32>,
        prog: &OwnedFd,
    ) -> io::Result<Walker> {
        let link = link_create_iter(prog.as_raw_fd())?;
        Ok(Walker {
            requests,
            left,
            link,
        })
    }

    /// Asks for every cookie, walks once, and returns the answers in the same order.
    fn answer(&mut self, cookies: &[u64]) -> Vec<Answer> {
        for &c in cookies {
            if let Err(e) = self.requests.insert(c, DETACH_PENDING, 0) {
                return fail_all(cookies, &format!("writing a detach request: {e}"));
            }
        }
        let mut distinct = cookies.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if let Err(e) = self.left.set(0, distinct.len() as u32, 0) {
            return fail_all(cookies, &format!("writing the walk's request count: {e}"));
        }
        let walked = walk(self.link.as_raw_fd());
        cookies
            .iter()
            .map(|c| {
                let a = self.requests.get(c, 0).unwrap_or(DETACH_PENDING);
                let _ = self.requests.remove(c);
                match (&walked, a) {
                    (_, DETACH_DONE) => Answer::Detached,
                    (_, DETACH_BEHIND) => Answer::Behind,
                    (Err(e), _) => Answer::Failed(format!("walking the TCP iterator: {e}")),
                    // DETACH_NOT_ARMED, or DETACH_PENDING: the walk did not meet the socket.
                    (Ok(()), _) => Answer::NotArmed,
                }
            })
            .collect()
    }

    /// One walk with nothing requested: what a walk costs here (the self-check and the bench).
    pub fn walk_empty(&self) -> io::Result<Duration> {
        let t = Instant::now();
        walk(self.link.as_raw_fd())?;
        Ok(t.elapsed())
    }
}

fn fail_all(cookies: &[u64], why: &str) -> Vec<Answer> {
    cookies.iter().map(|_| Answer::Failed(why.into())).collect()
}

impl Detacher {
    /// Starts the task that batches requests into walks.
    pub fn start(walker: Walker) -> (Arc<Detacher>, tokio::task::JoinHandle<()>) {
        let d = Arc::new(Detacher {
            queue: Mutex::new(Vec::new()),
            wake: Notify::new(),
            stats: Mutex::new(WalkStats::default()),
        });
        let task = tokio::spawn(d.clone().serve(walker));
        (d, task)
    }

    /// Asks for the socket with `cookie` to leave `ARMED`; resolves after the next walk.
    pub async fn detach(&self, cookie: u64) -> Answer {
        let (tx, rx) = oneshot::channel();
        self.queue.lock().expect("detach queue").push((cookie, tx));
        self.wake.notify_one();
        rx.await
            .unwrap_or_else(|_| Answer::Failed("the detach task stopped".into()))
    }

    pub fn stats(&self) -> WalkStats {
        *self.stats.lock().expect("walk stats")
    }

    async fn serve(self: Arc<Self>, walker: Walker) {
        let walker = Arc::new(Mutex::new(walker));
        loop {
            self.wake.notified().await;
            let batch: Vec<Request> = std::mem::take(&mut *self.queue.lock().expect("queue"));
            if batch.is_empty() {
                continue;
            }
            let cookies: Vec<u64> = batch.iter().map(|(c, _)| *c).collect();
            let w = walker.clone();
            let started = Instant::now();
            // The walk takes every TCP socket's lock in turn and may sleep on one that a
            // system call owns: off the runtime's threads.
            let answers = tokio::task::spawn_blocking(move || {
                let walking = Instant::now();
                let answers = w.lock().expect("walker").answer(&cookies);
                tracing::debug!(
                    "sockmap: a walk for {} request(s) took {:?}, {:?} after it was due",
                    cookies.len(),
                    walking.elapsed(),
                    walking - started
                );
                answers
            })
            .await
            .unwrap_or_default();
            {
                let mut s = self.stats.lock().expect("walk stats");
                s.walks += 1;
                s.seconds += started.elapsed().as_secs_f64();
            }
            let mut answers = answers.into_iter();
            for (_, tx) in batch {
                let a = answers
                    .next()
                    .unwrap_or_else(|| Answer::Failed("the walk panicked".into()));
                let _ = tx.send(a);
            }
            // Requests that came in during the walk wait for the next one.
            if !self.queue.lock().expect("queue").is_empty() {
                self.wake.notify_one();
            }
        }
    }
}

/// `bpf(BPF_LINK_CREATE)` for an iterator program with no target parameters (aya 0.14 keeps an
/// iterator link's fd private, and a walk needs it again and again).
fn link_create_iter(prog: RawFd) -> io::Result<OwnedFd> {
    /// `BPF_LINK_CREATE` and `BPF_TRACE_ITER` from include/uapi/linux/bpf.h.
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TRACE_ITER: u32 = 28;
    // link_create: prog_fd, target_fd, attach_type, flags, then unions left zero.
    let mut attr = [0u32; 16];
    attr[0] = prog as u32;
    attr[2] = BPF_TRACE_ITER;
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// One walk: a new iterator from the link, read until the program says every request is answered
/// (it writes `WALK_DONE_BYTES`, and a read of that size returns at the next socket) or the walk
/// ends (a read of 0). Closing the iterator early releases the sockets it had batched.
fn walk(link: RawFd) -> io::Result<()> {
    /// `BPF_ITER_CREATE` from include/uapi/linux/bpf.h.
    const BPF_ITER_CREATE: libc::c_long = 33;
    let mut attr = [0u32; 2];
    attr[0] = link as u32;
    let iter = bpf(BPF_ITER_CREATE, &mut attr)?;
    let mut buf = [0u8; WALK_DONE_BYTES];
    loop {
        // SAFETY: iter is an open fd we own; buf is valid for its length.
        let n = unsafe { libc::read(iter.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n >= 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

fn bpf<const N: usize>(cmd: libc::c_long, attr: &mut [u32; N]) -> io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr prefix of the size we pass; the kernel reads at most
    // that many bytes and checks the rest is zero.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<[u32; N]>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
