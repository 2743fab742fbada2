//! Notices that files may have changed on disk by watching the directories
//! that hold them, not the files' inodes: a Kubernetes Secret volume
//! replaces its files by renaming a new `..data` symlink over the old one
//! (`creds -> ..data/creds` itself never changes), and editors rename a new
//! file over the old one; a watch on the old inode would see neither.
//!
//! Each file's directory is watched as given and, when the path is a
//! symlink, the directory it resolves to, re-resolved after every burst.
//! A burst of events is reported once it has been quiet for [`DEBOUNCE`].
//! The caller decides what changed (by reading the files).

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, timeout};

/// Quiet time that ends a burst of events (kubelet's swap is five or so
/// events within a millisecond; an editor's save a few more).
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// A directory that keeps changing is still reported this often.
const MAX_BURST: Duration = Duration::from_secs(1);
/// How often a directory that could not be watched is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// Events that can mean a file in the directory has new contents.
fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

pub struct DirWatcher {
    inotify: AsyncFd<Inotify>,
    files: Vec<PathBuf>,
    watched: HashMap<PathBuf, WatchDescriptor>,
    /// Directories whose watch failed (warned about once).
    failing: HashSet<PathBuf>,
    buf: Vec<u8>,
}

impl DirWatcher {
    /// Starts watching the directories of `files`. A directory that cannot
    /// be watched now is logged and tried again later; only failing to set
    /// up inotify at all is an error.
    pub fn new(files: Vec<PathBuf>) -> io::Result<DirWatcher> {
        let inotify = Inotify::init()?;
        // SAFETY: the `Inotify` owns its descriptor and, moved into the
        // `AsyncFd`, keeps it open and unchanged until the `AsyncFd` drops
        // (it is closed only when the `Inotify` is dropped or consumed).
        let inotify = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }?;
        let mut w = DirWatcher {
            inotify,
            files,
            watched: HashMap::new(),
            failing: HashSet::new(),
            buf: vec![0; 16 * 1024],
        };
        w.rewatch();
        Ok(w)
    }

    /// The directories watched now (what the tests check).
    #[cfg(test)]
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.watched.keys().map(PathBuf::as_path)
    }

    /// Waits until something may have changed: a burst of events in a
    /// watched directory has gone quiet, or a directory that could not be
    /// watched before can be now.
    pub async fn next_change(&mut self) -> io::Result<()> {
        loop {
            let event = if self.all_watched() {
                self.read_some().await.map(|()| true)
            } else {
                match timeout(RETRY, self.read_some()).await {
                    Ok(r) => r.map(|()| true),
                    Err(_) => Ok(false),
                }
            }?;
            if event {
                let end = Instant::now() + MAX_BURST;
                while Instant::now() < end {
                    match timeout(DEBOUNCE, self.read_some()).await {
                        Ok(r) => r?,
                        Err(_) => break,
                    }
                }
            }
            if self.rewatch() || event {
                return Ok(());
            }
        }
    }

    fn all_watched(&self) -> bool {
        self.wanted().iter().all(|d| self.watched.contains_key(d))
    }

    /// Reads at least one event. Watches the kernel dropped (their
    /// directory is gone) are forgotten.
    async fn read_some(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.inotify.readable_mut().await?;
            match guard.get_inner_mut().read_events(&mut self.buf) {
                Ok(events) => {
                    let mut any = false;
                    for e in events {
                        any = true;
                        if e.mask.contains(EventMask::IGNORED) {
                            self.watched.retain(|_, wd| *wd != e.wd);
                        }
                    }
                    if any {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }

    /// Each file's directory as given and as resolved through symlinks.
    fn wanted(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for f in &self.files {
            let resolved = std::fs::canonicalize(f).ok();
            for dir in std::iter::once(parent(f)).chain(resolved.as_deref().map(parent)) {
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
        dirs
    }

    /// Brings the watches in line with [`DirWatcher::wanted`]. Returns
    /// whether a directory is watched now that was not before.
    fn rewatch(&mut self) -> bool {
        let wanted = self.wanted();
        let mut watches = self.inotify.get_ref().watches();
        let stale: Vec<PathBuf> = (self.watched.keys())
            .filter(|d| !wanted.contains(d))
            .cloned()
            .collect();
        for dir in stale {
            if let Some(wd) = self.watched.remove(&dir) {
                // Two paths of one directory share a descriptor.
                if !self.watched.values().any(|w| *w == wd) {
                    let _ = watches.remove(wd);
                }
            }
        }
        let mut added = false;
        for dir in wanted {
            if self.watched.contains_key(&dir) {
                continue;
            }
            match watches.add(&dir, mask()) {
                Ok(wd) => {
                    self.failing.remove(&dir);
                    self.watched.insert(dir, wd);
                    added = true;
                }
                // Once per directory, not at every retry.
                Err(e) if !self.failing.contains(&dir) => {
                    tracing::warn!(
                        dir = %dir.display(),
                        error = %e,
                        "cannot watch for credentials changes; trying again every {RETRY:?} (SIGHUP reloads meanwhile)"
                    );
                    self.failing.insert(dir);
                }
                Err(_) => {}
            }
        }
        added
    }
}

/// The directory holding `file` (`.` for a bare file name).
fn parent(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("splice-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    async fn expect_change(w: &mut DirWatcher, what: &str) {
        timeout(Duration::from_secs(10), w.next_change())
            .await
            .unwrap_or_else(|_| panic!("no change reported for {what}"))
            .unwrap();
    }

    #[test]
    fn parent_of_bare_name() {
        assert_eq!(parent(Path::new("creds")), PathBuf::from("."));
        assert_eq!(parent(Path::new("/a/b")), PathBuf::from("/a"));
    }

    #[tokio::test]
    async fn sees_rewrites_renames_and_symlink_swaps() {
        let dir = scratch("events");
        let d = &dir.0;
        // A Secret volume's layout: creds -> ..data/creds, ..data -> ..v1.
        std::fs::create_dir(d.join("..v1")).unwrap();
        std::fs::write(d.join("..v1/creds"), "a:1\n").unwrap();
        std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/creds", d.join("creds")).unwrap();
        let plain = d.join("plain");
        std::fs::write(&plain, "b:1\n").unwrap();
        let mut w = DirWatcher::new(vec![d.join("creds"), plain.clone()]).unwrap();
        let mut dirs: Vec<_> = w.dirs().map(Path::to_path_buf).collect();
        dirs.sort();
        let real = std::fs::canonicalize(d).unwrap();
        assert_eq!(dirs, vec![d.clone(), real.join("..v1")]);

        // Kubelet's update: new directory, new ..data_tmp, renamed over ..data.
        std::fs::create_dir(d.join("..v2")).unwrap();
        std::fs::write(d.join("..v2/creds"), "a:2\n").unwrap();
        std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join("..v1")).unwrap();
        expect_change(&mut w, "the ..data swap").await;
        let mut dirs: Vec<_> = w.dirs().map(Path::to_path_buf).collect();
        dirs.sort();
        assert_eq!(dirs, vec![d.clone(), real.join("..v2")]);

        // In-place rewrite.
        std::fs::write(&plain, "b:2\n").unwrap();
        expect_change(&mut w, "an in-place rewrite").await;
        // An editor's save: write a temporary file, rename it over.
        std::fs::write(d.join(".plain.swp"), "b:3\n").unwrap();
        std::fs::rename(d.join(".plain.swp"), &plain).unwrap();
        expect_change(&mut w, "a rename over the file").await;
    }
}
