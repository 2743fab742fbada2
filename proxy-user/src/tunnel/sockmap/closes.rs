//! FIN and errors of fully armed tunnels, from one epoll set shared by all of them.
//!
//! With the program attached, the kernel wakes a socket's epoll waiters after every batch it
//! redirects, so a socket left in tokio's reactor costs a wake-up per batch. A set that asks
//! only for EPOLLRDHUP (and the implied EPOLLERR/EPOLLHUP) is woken for FIN and errors alone.
//! One set for every tunnel, read by one task that passes each event to its tunnel, costs two
//! `epoll_ctl` calls per tunnel; a set of its own per tunnel cost six system calls more and an
//! epoll instance (with its file and tokio registration) for as long as the tunnel lived.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::tunnel::end::Side;
use crate::tunnel::sys;

/// Events one tunnel has not taken yet, per side, and its wake-up.
#[derive(Default)]
struct Mailbox {
    masks: [AtomicU32; 2],
    notify: Notify,
}

/// The shared set and the mailboxes of the tunnels in it.
pub(super) struct SharedCloses {
    epoll: AsyncFd<OwnedFd>,
    /// Tunnel id -> its mailbox. Ids are never reused, so an event that comes late for a tunnel
    /// that has ended finds nothing and is dropped.
    mailboxes: Mutex<HashMap<u64, Arc<Mailbox>>>,
    next_id: AtomicU64,
}

impl SharedCloses {
    /// An empty set. Events reach tunnels once [`Self::dispatch`] runs.
    pub(super) fn new() -> io::Result<Arc<SharedCloses>> {
        Ok(Arc::new(SharedCloses {
            epoll: sys::epoll_set(&[])?,
            mailboxes: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }))
    }

    /// Reads the set for ever, handing each event to its tunnel's mailbox.
    pub(super) async fn dispatch(self: Arc<Self>) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            let n = sys::epoll_next(&self.epoll, &mut events).await?;
            let mailboxes = self.mailboxes.lock().expect("close mailboxes lock");
            for ev in &events[..n] {
                let (token, mask) = ({ ev.u64 }, { ev.events });
                if let Some(mb) = mailboxes.get(&(token >> 1)) {
                    mb.masks[(token & 1) as usize].fetch_or(mask, Ordering::AcqRel);
                    // A stored permit if the tunnel is busy elsewhere: never lost.
                    mb.notify.notify_one();
                }
            }
        }
    }

    /// Adds a tunnel's two sockets to the set. They leave it when they close (the kernel drops
    /// a closed file from every epoll set), so there is no removal call.
    pub(super) fn watch(
        self: &Arc<Self>,
        client: &impl AsFd,
        upstream: &impl AsFd,
    ) -> io::Result<CloseWatch> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::default());
        self.mailboxes
            .lock()
            .expect("close mailboxes lock")
            .insert(id, mailbox.clone());
        let watch = CloseWatch {
            shared: self.clone(),
            id,
            mailbox,
            fds: [client.as_fd().as_raw_fd(), upstream.as_fd().as_raw_fd()],
        };
        for side in [Side::Client, Side::Upstream] {
            sys::epoll_add(
                self.epoll.get_ref().as_raw_fd(),
                watch.fds[side as usize],
                libc::EPOLLRDHUP,
                id << 1 | side as u64,
            )?;
        }
        Ok(watch)
    }
}

/// A tunnel's place in the shared set.
pub(super) struct CloseWatch {
    shared: Arc<SharedCloses>,
    id: u64,
    mailbox: Arc<Mailbox>,
    /// The two sockets, open for as long as the watch (the tunnel owns them).
    fds: [RawFd; 2],
}

impl CloseWatch {
    pub(super) fn fd(&self, side: Side) -> RawFd {
        self.fds[side as usize]
    }

    /// Waits for events and returns them: (which socket, epoll mask).
    pub(super) async fn next(&self) -> Vec<(Side, u32)> {
        loop {
            let events: Vec<_> = [Side::Client, Side::Upstream]
                .into_iter()
                .filter_map(|side| {
                    let mask = self.mailbox.masks[side as usize].swap(0, Ordering::AcqRel);
                    (mask != 0).then_some((side, mask))
                })
                .collect();
            if !events.is_empty() {
                return events;
            }
            self.mailbox.notify.notified().await;
        }
    }
}

impl Drop for CloseWatch {
    fn drop(&mut self) {
        self.shared
            .mailboxes
            .lock()
            .expect("close mailboxes lock")
            .remove(&self.id);
    }
}
