//! Scenario `wan`: a migration over a link slower than the hosts. The client runs in one
//! network namespace, the targets in the root namespace, the sink in a third namespace behind a
//! veth whose root-side egress is shaped by `tc ... htb` (1 or 4 Gbit/s; netem and fq are not
//! needed). Every target crosses the same two veths and the same shaper:
//!
//! ```text
//!  client netns          root netns                          sink netns
//!  v0 198.18.A.2 ── sbcPID 198.18.A.1 ─ target ─ sbsPID 198.18.A.5 ═htb═ v0 198.18.A.6 sink
//! ```
//!
//! `direct` connects from the client namespace to the sink, forwarded by the root namespace
//! (ip_forward is turned on for the run and restored after). Each namespace only has a route
//! to the other one's /30 (no default route), so nothing forwarded can leave the host.
//!
//! 198.18.0.0/15 is the range set aside for benchmarks (RFC 2544); the third octet is picked
//! free of any address or route already on the host. Everything is undone on drop (normal
//! end, error, panic), by the signal handler (Ctrl-C: ip_forward, namespaces), and by the
//! next run for a bench that was killed (`sweep_stale`).

use std::{
    cell::Cell,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    process::Command,
    thread,
};

use anyhow::{Context as _, Result, bail};

use super::{
    load::{self, Sink, StreamResult},
    sys, targets,
};

/// One sub-scenario.
pub struct Spec {
    pub name: &'static str,
    /// The shaped link's rate, bits per second.
    pub bits: u64,
    pub streams: usize,
}

const GBIT: u64 = 1_000_000_000;

pub const SPECS: &[Spec] = &[
    Spec {
        name: "wan-1G",
        bits: GBIT,
        streams: 1,
    },
    Spec {
        name: "wan-1G-8",
        bits: GBIT,
        streams: 8,
    },
    Spec {
        name: "wan-4G",
        bits: 4 * GBIT,
        streams: 1,
    },
    Spec {
        name: "wan-4G-8",
        bits: 4 * GBIT,
        streams: 8,
    },
];

pub fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// Bytes in total so that the link at `bits`/s takes `secs`, split evenly over `streams`.
pub fn total_bytes(bits: u64, streams: usize, secs: f64) -> u64 {
    let per = (bits as f64 / 8.0 * secs / streams as f64) as u64;
    per.max(1) * streams as u64
}

/// The htb class for `bits`/s: rate = ceil, a burst of 1 ms at that rate (at least two
/// 64 KiB GSO packets, which veth carries whole), a quantum that keeps tc from warning.
pub fn htb_class_args(bits: u64) -> Vec<String> {
    let burst = (bits / 8 / 1000).max(2 * 65536 + 1514);
    [
        "htb".to_string(),
        "rate".into(),
        format!("{bits}bit"),
        "ceil".into(),
        format!("{bits}bit"),
        "burst".into(),
        format!("{burst}b"),
        "cburst".into(),
        format!("{burst}b"),
        "quantum".into(),
        "65536".into(),
    ]
    .into()
}

const NS_PREFIX_CLIENT: &str = "splice-bench-c-";
const NS_PREFIX_SINK: &str = "splice-bench-s-";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn ip_forward_record(pid: u32) -> String {
    format!("/run/splice-bench-ip_forward-{pid}")
}

/// Runs a command quietly; fails with its stderr.
fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("start `{}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes what a killed earlier run left: its namespaces and veths (a namespace whose file is
/// gone can live on for a while, with its veth, while closed sockets in it finish), and
/// restores the ip_forward value it recorded.
pub fn sweep_stale() {
    let dead =
        |pid: &str| pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let (link, pid) = if let Some(pid) = name.strip_prefix(NS_PREFIX_CLIENT) {
                ("sbc", pid)
            } else if let Some(pid) = name.strip_prefix(NS_PREFIX_SINK) {
                ("sbs", pid)
            } else {
                continue;
            };
            if dead(pid) {
                eprintln!("bench: removing network namespace {name} left by an earlier run");
                let _ = sh(&["ip", "link", "del", &format!("{link}{pid}")]);
                let _ = sh(&["ip", "netns", "del", &name]);
            }
        }
    }
    let links = crate::util::output("ip", &["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        // "7: sbc1234@if2: <...>"
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("sbc")
            .or_else(|| name.strip_prefix("sbs"))
        else {
            continue;
        };
        if dead(pid) {
            eprintln!("bench: removing veth {name} left by an earlier run");
            let _ = sh(&["ip", "link", "del", name]);
        }
    }
    if let Ok(entries) = fs::read_dir("/run") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("splice-bench-ip_forward-") else {
                continue;
            };
            if dead(pid) {
                if let Ok(v) = fs::read_to_string(e.path()) {
                    eprintln!(
                        "bench: restoring net.ipv4.ip_forward = {} left by an earlier run",
                        v.trim()
                    );
                    let _ = fs::write(IP_FORWARD, v.trim());
                }
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// The namespaces, veths, shaper and ip_forward; all undone on drop.
struct Net {
    pid: u32,
    octet: u8,
    /// namespaces created so far
    namespaces: Vec<String>,
    /// ip_forward before, if this run changed it
    ip_forward_was: Option<String>,
}

impl Net {
    fn client_ns(&self) -> String {
        format!("{NS_PREFIX_CLIENT}{}", self.pid)
    }
    fn sink_ns(&self) -> String {
        format!("{NS_PREFIX_SINK}{}", self.pid)
    }
    fn client_link(&self) -> String {
        format!("sbc{}", self.pid)
    }
    fn sink_link(&self) -> String {
        format!("sbs{}", self.pid)
    }
    fn ip(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.octet, last)
    }

    fn create() -> Result<Net> {
        let pid = std::process::id();
        let octet = free_octet(pid)?;
        let mut net = Net {
            pid,
            octet,
            namespaces: Vec::new(),
            ip_forward_was: None,
        };
        // From here on, a failure drops `net`, which removes whatever was made.
        net.build()
            .context("set up the wan scenario's namespaces")?;
        Ok(net)
    }

    fn build(&mut self) -> Result<()> {
        let a = self.octet;
        let legs = [
            (self.client_ns(), self.client_link(), 1u8, 2u8, 4u8),
            (self.sink_ns(), self.sink_link(), 5, 6, 0),
        ];
        for (ns, link, root_ip, ns_ip, other_net) in &legs {
            sh(&["ip", "netns", "add", ns])?;
            sys::arm_netns_cleanup(&format!("/run/netns/{ns}"));
            self.namespaces.push(ns.clone());
            sh(&[
                "ip", "link", "add", link, "type", "veth", "peer", "name", "v0", "netns", ns,
            ])?;
            sh(&[
                "ip",
                "addr",
                "add",
                &format!("198.18.{a}.{root_ip}/30"),
                "dev",
                link,
            ])?;
            sh(&["ip", "link", "set", link, "up"])?;
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("198.18.{a}.{ns_ip}/30"),
                "dev",
                "v0",
            ])?;
            sh(&["ip", "-n", ns, "link", "set", "v0", "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            // Only the other leg's /30 is routed: nothing else is reachable from here.
            sh(&[
                "ip",
                "-n",
                ns,
                "route",
                "add",
                &format!("198.18.{a}.{other_net}/30"),
                "via",
                &format!("198.18.{a}.{root_ip}"),
            ])?;
        }
        let link = self.sink_link();
        sh(&[
            "tc", "qdisc", "add", "dev", &link, "root", "handle", "1:", "htb", "default", "1",
        ])
        .context("htb qdisc (sch_htb)")?;
        let class = htb_class_args(GBIT);
        let mut args = vec![
            "tc", "class", "add", "dev", &link, "parent", "1:", "classid", "1:1",
        ];
        args.extend(class.iter().map(String::as_str));
        sh(&args)?;

        let was = fs::read_to_string(IP_FORWARD)
            .context("read net.ipv4.ip_forward")?
            .trim()
            .to_string();
        if was != "1" {
            fs::write(ip_forward_record(self.pid), &was)?;
            sys::arm_netns_cleanup(&ip_forward_record(self.pid));
            sys::arm_ip_forward_restore(Some(was == "1"));
            self.ip_forward_was = Some(was);
            fs::write(IP_FORWARD, "1").context("enable net.ipv4.ip_forward")?;
        }
        Ok(())
    }

    fn set_rate(&self, bits: u64) -> Result<()> {
        let link = self.sink_link();
        let class = htb_class_args(bits);
        let mut args = vec![
            "tc", "class", "change", "dev", &link, "parent", "1:", "classid", "1:1",
        ];
        args.extend(class.iter().map(String::as_str));
        sh(&args)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(was) = self.ip_forward_was.take() {
            if let Err(e) = fs::write(IP_FORWARD, &was) {
                eprintln!("bench: could not restore net.ipv4.ip_forward = {was}: {e}");
            }
            sys::arm_ip_forward_restore(None);
            let _ = fs::remove_file(ip_forward_record(self.pid));
            sys::disarm_netns_cleanup(&ip_forward_record(self.pid));
        }
        // Deleting one end of a veth deletes both; then the (now empty) namespaces.
        for link in [self.client_link(), self.sink_link()] {
            let _ = sh(&["ip", "link", "del", &link]);
        }
        for ns in self.namespaces.drain(..) {
            if let Err(e) = sh(&["ip", "netns", "del", &ns]) {
                eprintln!("bench: {e:#}");
            }
            sys::disarm_netns_cleanup(&format!("/run/netns/{ns}"));
        }
    }
}

/// A third octet for 198.18.X.0/29 that no address or route on the host uses yet.
fn free_octet(pid: u32) -> Result<u8> {
    let taken = format!(
        "{}\n{}",
        crate::util::output("ip", &["-o", "-4", "addr", "show"]).unwrap_or_default(),
        crate::util::output("ip", &["-4", "route", "show", "table", "all"]).unwrap_or_default()
    );
    (0..256u32)
        .map(|i| ((pid + i) % 256) as u8)
        .find(|o| !taken.contains(&format!("198.18.{o}.")))
        .context("no free 198.18.X.0/29 for the wan scenario")
}

/// Runs `f` on a thread in network namespace `ns` (so are the threads it spawns and the
/// sockets they open).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file = fs::File::open(format!("/run/netns/{ns}")).with_context(|| format!("open {ns}"))?;
    thread::scope(|scope| {
        let worker = scope.spawn(move || {
            sys::setns_net(&file).with_context(|| format!("setns into {ns}"))?;
            f()
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The network and the sink behind the shaper.
pub struct Rig {
    /// Dropped before `net`: its shutdown connects to itself across the veth.
    pub sink: Sink,
    net: Net,
    rate: Cell<u64>,
}

impl Rig {
    pub fn start() -> Result<Rig> {
        let net = Net::create()?;
        let sink_ip = net.ip(6);
        let listener = in_netns(&net.sink_ns(), || {
            TcpListener::bind(SocketAddr::new(IpAddr::V4(sink_ip), 0)).context("bind the wan sink")
        })?;
        let sink = Sink::start_on(listener, 16)?;
        Ok(Rig {
            sink,
            net,
            rate: Cell::new(GBIT),
        })
    }

    /// Where the targets listen for the client namespace.
    pub fn proxy_ip(&self) -> IpAddr {
        IpAddr::V4(self.net.ip(1))
    }

    /// The sink's network, for the proxies' destination policy.
    pub fn sink_net(&self) -> String {
        format!("{}/30", self.net.ip(4))
    }

    pub fn describe(&self) -> String {
        format!(
            "client netns {} ({}) → {} → htb on {} → sink netns {} ({})",
            self.net.client_ns(),
            self.net.ip(2),
            self.net.ip(1),
            self.net.sink_link(),
            self.net.sink_ns(),
            self.sink.addr
        )
    }

    /// One measurement of `spec` through `t`, `secs` long at the link's rate.
    pub fn measure(&self, spec: &Spec, t: &targets::Running, secs: f64) -> Result<StreamResult> {
        if self.rate.get() != spec.bits {
            self.net.set_rate(spec.bits)?;
            self.rate.set(spec.bits);
        }
        let ep = t
            .wan_endpoint
            .clone()
            .context("target started without a wan listener")?;
        let bytes = total_bytes(spec.bits, spec.streams, secs);
        let (sink, streams, pid) = (self.sink.addr, spec.streams, t.pid());
        in_netns(&self.net.client_ns(), move || {
            load::stream(&ep, sink, bytes, streams, pid)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_shaper_arguments() {
        // 1 Gbit/s for 4 s: 500 MB, 62.5 MB per stream over 8.
        assert_eq!(total_bytes(GBIT, 1, 4.0), 500_000_000);
        assert_eq!(total_bytes(GBIT, 8, 4.0), 500_000_000);
        assert_eq!(total_bytes(4 * GBIT, 3, 1.0) % 3, 0);
        // 4 Gbit/s: a 1 ms burst is 500 kB; 1 Gbit/s: 125 kB is under two GSO packets.
        let a = htb_class_args(4 * GBIT);
        assert_eq!(
            a[..5],
            ["htb", "rate", "4000000000bit", "ceil", "4000000000bit"]
        );
        assert_eq!(a[6], "500000b");
        assert_eq!(htb_class_args(GBIT)[6], format!("{}b", 2 * 65536 + 1514));
        assert_eq!(
            spec("wan-4G-8").map(|s| (s.bits, s.streams)),
            Some((4 * GBIT, 8))
        );
        assert!(spec("wan-2G").is_none());
    }
}
