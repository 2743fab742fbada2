//! What a proxy process holds, read from `/proc` and `bpftool`: open
//! descriptors, resident memory, CPU time, and the entries of the sockmap
//! data path's eBPF maps. Fault and soak tests compare these before and
//! after.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::torture::fd_count_of;

/// The eBPF maps whose entries belong to open tunnels (`proxy_ebpf::PEERS_MAP`,
/// `ARMED_MAP`, `BYTES_MAP`); the per-CPU `STATS` array has fixed slots.
pub const TUNNEL_MAPS: [&str; 6] = ["PEERS", "ARMED", "BYTES", "LIMITS", "MOVED", "DETACH"];

/// User + system CPU seconds used so far by process `pid` (0 if it is gone).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Resident set size of process `pid` in KiB (`VmRSS`; 0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// BPF object ids (programs and maps) the process holds, from its fdinfo.
pub fn bpf_ids(pid: u32) -> Vec<(&'static str, u32)> {
    let mut ids = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in info.lines() {
            for (key, kind) in [("prog_id:", "prog"), ("map_id:", "map")] {
                if let Some(v) = line.strip_prefix(key).and_then(|v| v.trim().parse().ok()) {
                    ids.push((kind, v));
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn bpftool(args: &[&str]) -> Option<String> {
    let out = Command::new("bpftool")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("bpftool (installed by cargo xtask setup)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Entries of each of [`TUNNEL_MAPS`] the process holds, by map name
/// (empty when it holds none: the copy and splice data paths).
pub fn tunnel_map_entries(pid: u32) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (_, id) in bpf_ids(pid).into_iter().filter(|(k, _)| *k == "map") {
        let id = id.to_string();
        // "<id>: <type>  name <NAME>  flags ..."
        let Some(show) = bpftool(&["map", "show", "id", &id]) else {
            continue;
        };
        let name = show
            .split_whitespace()
            .skip_while(|w| *w != "name")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        if !TUNNEL_MAPS.contains(&name.as_str()) {
            continue;
        }
        // The dump ends with "Found N elements" (sockhash values cannot be
        // read back, but every key is still listed and counted).
        let dump = bpftool(&["map", "dump", "id", &id]).unwrap_or_default();
        let n = dump
            .lines()
            .rev()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Found ")
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0);
        out.push((name, n));
    }
    out.sort();
    out
}

/// One look at what a proxy holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub fds: usize,
    pub rss_kib: u64,
    /// Entries per tunnel map (sockmap data path only).
    pub maps: Vec<(String, usize)>,
}

impl Usage {
    pub fn of(pid: u32) -> Usage {
        Usage {
            fds: fd_count_of(pid),
            rss_kib: rss_kib(pid),
            maps: tunnel_map_entries(pid),
        }
    }

    /// Total entries over the tunnel maps.
    pub fn map_entries(&self) -> usize {
        self.maps.iter().map(|(_, n)| n).sum()
    }

    /// "fds 17, RSS 9.1 MiB, map entries PEERS=0 ARMED=0 BYTES=0".
    pub fn describe(&self) -> String {
        let maps = if self.maps.is_empty() {
            "none".to_string()
        } else {
            self.maps
                .iter()
                .map(|(name, n)| format!("{name}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "fds {}, RSS {:.1} MiB, map entries {maps}",
            self.fds,
            self.rss_kib as f64 / 1024.0
        )
    }
}

/// Polls until the process's descriptors and map entries are back to
/// `baseline` (or `within` passes); returns the last look.
pub fn settle(pid: u32, baseline: &Usage, within: Duration) -> Usage {
    let deadline = Instant::now() + within;
    loop {
        let now = Usage::of(pid);
        let back = now.fds <= baseline.fds && now.map_entries() <= baseline.map_entries();
        if back || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
