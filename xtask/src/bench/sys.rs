//! What the bench reads from /proc, and the process hygiene that makes sure nothing it started
//! outlives it.

use std::{
    ffi::CString,
    net::TcpStream,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::Command,
    sync::atomic::{AtomicI32, AtomicPtr, Ordering},
};

/// Idle, iowait and steal time of all CPUs (time no task of this machine ran), in clock ticks, and how many CPUs are online (/proc/stat).
/// With a tickless kernel (NO_HZ) the idle time is measured when a CPU enters and leaves idle,
/// while the busy fields (user, system, softirq...) are samples taken at the tick: they miss the
/// short wake-ups a paced transfer is made of, or charge them a whole tick. Busy time is
/// therefore taken as what was not idle.
pub fn cpu_idle_ticks() -> (u64, u32) {
    parse_idle(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
}

fn parse_idle(stat: &str) -> (u64, u32) {
    let mut lines = stat.lines();
    let f: Vec<u64> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let cpus = lines
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    // user nice system idle iowait irq softirq steal ...
    let idle = [3usize, 4, 7]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum();
    (idle, cpus.max(1) as u32)
}

/// utime + stime of a process (all its threads), in clock ticks; 0 if it is gone.
pub fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may contain spaces: the fields start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime field 14, stime field 15 (1-based in proc(5)).
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

/// CPU seconds a process has used: from its own cgroup to the microsecond where the bench
/// gave it one (`cgroup.rs`), else utime + stime from /proc/PID/stat, in 10 ms ticks.
pub fn process_cpu_secs(pid: u32) -> f64 {
    super::cgroup::cpu_secs(pid).unwrap_or_else(|| process_ticks(pid) as f64 / clock_ticks() as f64)
}

pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as u64 } else { 100 }
}

/// VmRSS of a process in KiB; 0 if it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The kernel's TCP memory in pages (`TCP: ... mem N` in /proc/net/sockstat).
pub fn tcp_mem_pages() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let mut it = l.split_whitespace();
            while let Some(w) = it.next() {
                if w == "mem" {
                    return it.next()?.parse().ok();
                }
            }
            None
        })
        .unwrap_or(0)
}

/// The kernel's slab memory in KiB (`Slab:` in /proc/meminfo): sockets, pipes, epoll items,
/// psocks and the rest of what a tunnel costs the kernel, host-wide.
pub fn slab_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn page_kib() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let sz = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if sz > 0 { sz as f64 / 1024.0 } else { 4.0 }
}

/// SO_LINGER {on, 0}: close() sends a reset and leaves no TIME_WAIT behind.
pub fn set_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, option value of the right type and size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// SO_RCVBUF (the kernel doubles the value; setting it also turns off receive autotuning).
pub fn set_rcvbuf(s: &TcpStream, bytes: usize) -> std::io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: valid fd, option value of the right type and size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Moves the calling thread into the network namespace `ns` refers to (threads it spawns
/// afterwards start there too; sockets it creates stay there).
pub fn setns_net(ns: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: a valid fd; setns only changes this thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What the signal handler undoes of the wan scenario's network (Drop undoes it otherwise):
/// the value to write back to /proc/sys/net/ipv4/ip_forward (-1: none), and files to detach
/// and remove: the namespace files under /run/netns (the namespaces, their veths with them,
/// go away once this process has exited and the last of its sockets has finished closing) and
/// the ip_forward record (umount2 fails harmlessly on a plain file).
static IP_FORWARD_RESTORE: AtomicI32 = AtomicI32::new(-1);
static NETNS_PATHS: [AtomicPtr<libc::c_char>; 4] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; 4];

/// Arms the signal-time clean-up of a namespace file (`/run/netns/NAME`) or a plain file.
pub fn arm_netns_cleanup(path: &str) {
    let Ok(c) = CString::new(path) else { return };
    let raw = c.into_raw();
    for slot in &NETNS_PATHS {
        if slot
            .compare_exchange(
                std::ptr::null_mut(),
                raw,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            return;
        }
    }
    // SAFETY: `raw` came from into_raw above and was not stored.
    drop(unsafe { CString::from_raw(raw) });
}

/// Disarms it (the namespace was removed normally). The string is leaked, not freed: a
/// signal handler on another thread may be reading it.
pub fn disarm_netns_cleanup(path: &str) {
    for slot in &NETNS_PATHS {
        let p = slot.load(Ordering::SeqCst);
        // SAFETY: non-null slots hold pointers from CString::into_raw, never freed.
        if !p.is_null() && unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes() == path.as_bytes() {
            let _ =
                slot.compare_exchange(p, std::ptr::null_mut(), Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

/// Arms (Some) or disarms (None) the signal-time write-back of ip_forward.
pub fn arm_ip_forward_restore(value: Option<bool>) {
    IP_FORWARD_RESTORE.store(value.map_or(-1, i32::from), Ordering::SeqCst);
}

/// Only async-signal-safe calls: open/write/close, umount2, unlink.
fn undo_network() {
    let v = IP_FORWARD_RESTORE.load(Ordering::SeqCst);
    if v >= 0 {
        let text: &[u8; 2] = if v == 1 { b"1\n" } else { b"0\n" };
        // SAFETY: a NUL-terminated literal path and a 2-byte buffer.
        unsafe {
            let fd = libc::open(
                c"/proc/sys/net/ipv4/ip_forward".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, text.as_ptr().cast(), 2);
                libc::close(fd);
            }
        }
    }
    for slot in &NETNS_PATHS {
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: a NUL-terminated path that is never freed while armed.
            unsafe {
                libc::umount2(p, libc::MNT_DETACH);
                libc::unlink(p);
            }
        }
    }
}

/// A process's open-file soft limit, from /proc/PID/limits ("Max open files").
pub fn nofile_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Raises the open-file soft limit to the hard limit (idle tunnels need two fds each here).
pub fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

const SLOTS: usize = 32;
static CHILDREN: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];

/// Remembers a child so the signal handler can kill it.
pub fn register_child(pid: u32) {
    for slot in &CHILDREN {
        if slot
            .compare_exchange(0, pid as i32, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

/// Remembers a child that leads its own process group (killed as a group).
pub fn register_group(pid: u32) {
    register_child(pid);
    for slot in &CHILDREN {
        let _ = slot.compare_exchange(
            pid as i32,
            -(pid as i32),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

pub fn forget_child(pid: u32) {
    for slot in &CHILDREN {
        let _ = slot.compare_exchange(pid as i32, 0, Ordering::SeqCst, Ordering::SeqCst);
        let _ = slot.compare_exchange(-(pid as i32), 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    for slot in &CHILDREN {
        let pid = slot.load(Ordering::SeqCst);
        if pid != 0 {
            // SAFETY: kill(2) is async-signal-safe (a negative pid is a process group).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    undo_network();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) };
}

/// Ctrl-C / SIGTERM: kill every child the bench started, then exit. (Drop handles the normal
/// and the panic paths.)
pub fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// The child gets SIGKILL if the bench dies without cleaning up (even `kill -9`).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn idle_is_idle_iowait_and_steal_of_the_sum_line_and_cpus_are_counted() {
        let stat = "cpu  100 1 50 6000 20 0 30 7 0 0\n\
                    cpu0 50 1 25 3000 10 0 15 3 0 0\n\
                    cpu1 50 0 25 3000 10 0 15 4 0 0\n\
                    intr 1 2 3\nctxt 5\n";
        assert_eq!(super::parse_idle(stat), (6000 + 20 + 7, 2));
        assert_eq!(super::parse_idle(""), (0, 1));
    }
}
