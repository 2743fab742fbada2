//! A cgroup v2 of its own for each process the bench starts, so that its CPU time is read in
//! microseconds, every thread and every child it forks included (`cpu.stat`), and not in the
//! 10 ms ticks of /proc/PID/stat: utime and stime are each truncated to a tick, so a
//! difference of two readings is off by up to 20 ms, 0.05 s/GB on a 400 MB transfer, a sixth
//! of what splice-proxy spends on it.

use std::fs;
use std::path::{Path, PathBuf};

/// Every cgroup this bench makes is named `splice-bench-<bench pid>-<process pid>`.
const PREFIX: &str = "splice-bench-";

/// Where the cgroup v2 hierarchy is mounted, if it is.
fn mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        let point = before.split_whitespace().nth(4)?;
        after.starts_with("cgroup2 ").then(|| PathBuf::from(point))
    })
}

/// A cgroup holding one started process; removed on drop (once the process is gone).
pub struct Cgroup(PathBuf);

impl Cgroup {
    /// Moves `pid` (all its threads) into a new cgroup; `None` where there is no writable
    /// cgroup v2 hierarchy, and the caller's CPU figures fall back to /proc/PID/stat.
    pub fn adopt(pid: u32) -> Option<Cgroup> {
        let dir = mount()?.join(format!("{PREFIX}{}-{pid}", std::process::id()));
        fs::create_dir(&dir).ok()?;
        let group = Cgroup(dir);
        fs::write(group.0.join("cgroup.procs"), pid.to_string()).ok()?;
        Some(group)
    }
}

/// Whether the bench can make cgroups here (said once at the start of a run).
pub fn usable() -> bool {
    let Some(dir) = mount().map(|m| m.join(format!("{PREFIX}{}-probe", std::process::id()))) else {
        return false;
    };
    let made = fs::create_dir(&dir).is_ok();
    let _ = fs::remove_dir(&dir);
    made
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// CPU seconds (user + system) a process and its children have used, if it lives in a cgroup
/// of its own made by [`Cgroup::adopt`].
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let name = Path::new(path).file_name()?.to_str()?;
    if !name.starts_with(PREFIX) {
        return None;
    }
    let stat =
        fs::read_to_string(mount()?.join(path.trim_start_matches('/')).join("cpu.stat")).ok()?;
    usage_usec(&stat).map(|us| us as f64 / 1e6)
}

fn usage_usec(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// Removes cgroups left by bench runs that were killed before they could.
pub fn sweep_stale() {
    let Some(root) = mount() else { return };
    let Ok(entries) = fs::read_dir(&root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(bench) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{bench}")).exists() {
            let _ = fs::remove_dir(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_cpu_stat() {
        let stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n";
        assert_eq!(usage_usec(stat), Some(1_234_567));
        assert_eq!(usage_usec("user_usec 5\n"), None);
    }

    /// Where the bench may make cgroups (as root, on this machine), a busy child's CPU time is
    /// read from its own, to the microsecond, and the cgroup goes with the child.
    #[test]
    fn a_busy_child_is_measured_in_its_own_cgroup() {
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 30",
            ])
            .spawn()
            .unwrap();
        let Some(group) = Cgroup::adopt(child.id()) else {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("no writable cgroup v2 here: the bench uses /proc/PID/stat");
            return;
        };
        let dir = group.0.clone();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let secs = cpu_secs(child.id()).expect("read from its cgroup");
        assert!(secs > 0.0 && secs < 1.0, "{secs} s");
        child.kill().unwrap();
        child.wait().unwrap();
        drop(group);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
