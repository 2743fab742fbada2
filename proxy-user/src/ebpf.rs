//! The embedded eBPF object (the sockmap data path) and loading it into the kernel.
//!
//! `build.rs` compiles `proxy-ebpf` and leaves the object in `OUT_DIR`; [`OBJECT`] embeds it.
//! [`load`] creates the maps and loads the stream-verdict program, but attaches nothing: the
//! sockmap data path attaches it to [`ARMED_MAP`] and fills the maps. Names and layouts come from
//! `proxy-common`, the crate the program is built with too, so both sides agree.

use std::borrow::Borrow;
use std::io;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapError, PerCpuArray},
    programs::{ProgramError, SkSkb},
};

pub use proxy_common::{
    ARMED_MAP, BYTES_MAP, Counts, DEFAULT_LIMIT_MAP, DEFAULT_MAX_SOCKETS, DETACH_BEHIND,
    DETACH_DONE, DETACH_MAP, DETACH_PENDING, DETACH_PROGRAM_NAME, HOLDS_MAP, LIMITS_MAP, Limit,
    MOVED_MAP, PEERS_MAP, PROGRAM_NAME, SKB_TCP_SEQ, STATS_INDEX, STATS_MAP, Stats,
    TCP_SOCK_BYTES_ACKED, TCP_SOCK_COPIED_SEQ, WALK_DONE_BYTES, WALK_MAP,
};

/// The eBPF object built from `proxy-ebpf`, 8-byte aligned as the ELF parser needs. Empty when
/// the crate was compiled with `AYA_BUILD_SKIP`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Why the eBPF data path could not be loaded. `Display` is one line meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("eBPF object not built (splice-proxy was compiled with AYA_BUILD_SKIP)")]
    NotBuilt,
    #[error("not permitted to load eBPF ({0}): {hint}", hint = permission_hint())]
    NotPermitted(String),
    #[error("this kernel cannot run the eBPF data path: {0}")]
    Unsupported(String),
    #[error("the kernel verifier rejected {program}: {reason}")]
    Rejected {
        program: &'static str,
        /// The line of the verifier log that says why.
        reason: String,
        /// The whole verifier log, for debugging.
        log: String,
    },
    #[error("the embedded eBPF object is unusable: {0}")]
    InvalidObject(String),
    #[error("the embedded eBPF object has no {kind} `{name}`")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("loading eBPF failed: {0}")]
    Other(String),
}

/// [`load_with_capacity`] with room for [`DEFAULT_MAX_SOCKETS`] sockets.
pub fn load() -> Result<Ebpf, EbpfError> {
    load_with_capacity(DEFAULT_MAX_SOCKETS)
}

/// Creates the maps, sized for `max_sockets` sockets (two per tunnel), and loads the
/// stream-verdict program into the kernel without attaching it.
pub fn load_with_capacity(max_sockets: u32) -> Result<Ebpf, EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    raise_memlock_rlimit();
    let offsets = crate::btf::KernelOffsets::read()
        .map_err(|e| EbpfError::Unsupported(format!("the program needs it: {e}")))?;

    let mut ebpf = EbpfLoader::new()
        .override_global(TCP_SOCK_BYTES_ACKED, &offsets.tcp_sock_bytes_acked, true)
        .override_global(TCP_SOCK_COPIED_SEQ, &offsets.tcp_sock_copied_seq, true)
        .override_global(SKB_TCP_SEQ, &offsets.skb_tcp_seq, true)
        .map_max_entries(PEERS_MAP, max_sockets.max(2))
        .map_max_entries(ARMED_MAP, max_sockets.max(2))
        .map_max_entries(BYTES_MAP, max_sockets.max(2))
        .map_max_entries(LIMITS_MAP, max_sockets.max(2))
        .map_max_entries(MOVED_MAP, max_sockets.max(2))
        .map_max_entries(DETACH_MAP, max_sockets.max(2))
        .load(OBJECT)
        .map_err(classify_object_error)?;

    for name in [
        PEERS_MAP,
        ARMED_MAP,
        BYTES_MAP,
        LIMITS_MAP,
        DEFAULT_LIMIT_MAP,
        MOVED_MAP,
        HOLDS_MAP,
        STATS_MAP,
        DETACH_MAP,
        WALK_MAP,
    ] {
        if ebpf.map(name).is_none() {
            return Err(EbpfError::Missing { kind: "map", name });
        }
    }
    verdict_program(&mut ebpf)?
        .load()
        .map_err(classify_program_error)?;
    Ok(ebpf)
}

/// Loads the `iter/tcp` program that takes sockets off the kernel path under their lock
/// ([`DETACH_PROGRAM_NAME`]) and returns its program fd. Separate from [`load_with_capacity`]:
/// a kernel that refuses it (before 6.5 the TCP iterator does not hold the socket lock; before
/// mid-2024 an iterator may not delete from a sockhash) can still run the verdict program.
pub fn load_detach(ebpf: &mut Ebpf) -> Result<std::os::fd::OwnedFd, EbpfError> {
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| EbpfError::Unsupported(format!("reading the kernel's BTF: {e}")))?;
    let program: &mut aya::programs::Iter = ebpf
        .program_mut(DETACH_PROGRAM_NAME)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name: DETACH_PROGRAM_NAME,
        })?
        .try_into()
        .map_err(|e: ProgramError| {
            EbpfError::InvalidObject(format!("{DETACH_PROGRAM_NAME}: {e}"))
        })?;
    program
        .load("tcp", &btf)
        .map_err(|e| match classify_program_error(e) {
            EbpfError::Rejected { reason, log, .. } => EbpfError::Rejected {
                program: DETACH_PROGRAM_NAME,
                reason,
                log,
            },
            other => other,
        })?;
    let fd = program
        .fd()
        .map_err(|e| EbpfError::Other(format!("{DETACH_PROGRAM_NAME}: {e}")))?;
    use std::os::fd::AsFd as _;
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| EbpfError::Other(format!("{DETACH_PROGRAM_NAME}: {e}")))
}

/// The stream-verdict program of a loaded object.
pub fn verdict_program(ebpf: &mut Ebpf) -> Result<&mut SkSkb, EbpfError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name: PROGRAM_NAME,
        })?
        .try_into()
        .map_err(|e: ProgramError| EbpfError::InvalidObject(format!("{PROGRAM_NAME}: {e}")))
}

/// Reads the program's `aya-log` records for as long as the returned task runs and hands them to
/// the `log` facade, which tracing-subscriber bridges into the proxy's own log (target
/// `splice_ebpf`-style module paths of the program). Must run inside a tokio runtime.
pub fn forward_logs(ebpf: &mut Ebpf) -> Result<tokio::task::JoinHandle<()>, EbpfError> {
    let logger = aya_log::EbpfLogger::init(ebpf)
        .map_err(|e| EbpfError::Other(format!("reading the program's log: {e}")))?;
    // SAFETY: the logger's ring-buffer fd stays open, and the same fd, while the AsyncFd owns it.
    let mut logger = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| EbpfError::Other(format!("watching the program's log: {}", e.into_parts().1)))?;
    Ok(tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// The program's global counters, summed over all CPUs, read through the object (while it still
/// holds [`STATS_MAP`]; once [`KernelStats::take`] took the map, read that instead).
#[cfg(test)]
pub fn read_stats(ebpf: &Ebpf) -> Result<Stats, EbpfError> {
    let map = ebpf.map(STATS_MAP).ok_or(EbpfError::Missing {
        kind: "map",
        name: STATS_MAP,
    })?;
    let array = PerCpuArray::<_, Stats>::try_from(map)
        .map_err(|e| EbpfError::InvalidObject(format!("{STATS_MAP}: {e}")))?;
    sum_stats(&array)
}

/// The program's global counters ([`STATS_MAP`]) taken out of the loaded object, so they can be
/// read while the program runs, from any thread (every `/metrics` scrape does).
pub struct KernelStats(PerCpuArray<MapData, Stats>);

impl KernelStats {
    /// Takes [`STATS_MAP`] out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<KernelStats, EbpfError> {
        let map = ebpf.take_map(STATS_MAP).ok_or(EbpfError::Missing {
            kind: "map",
            name: STATS_MAP,
        })?;
        PerCpuArray::try_from(map)
            .map(KernelStats)
            .map_err(|e| EbpfError::InvalidObject(format!("{STATS_MAP}: {e}")))
    }

    /// The counters now, summed over all CPUs.
    pub fn read(&self) -> Result<Stats, EbpfError> {
        sum_stats(&self.0)
    }
}

impl std::fmt::Debug for KernelStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("KernelStats").field(&STATS_MAP).finish()
    }
}

/// Reads the one slot of a [`STATS_MAP`] array and folds its per-CPU copies into one `Stats`.
fn sum_stats<T: Borrow<MapData>>(array: &PerCpuArray<T, Stats>) -> Result<Stats, EbpfError> {
    let values = array
        .get(&STATS_INDEX, 0)
        .map_err(|e| EbpfError::Other(format!("reading {STATS_MAP}: {}", one_line(&e))))?;
    Ok(values
        .iter()
        .fold(Stats::default(), |sum, cpu| sum.add(*cpu)))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK (64 KiB by default); later ones use
/// the memory cgroup, and raising the limit changes nothing. Failure is left to the load to
/// report, since the process then also lacks the privilege to load.
fn raise_memlock_rlimit() {
    if kernel_at_least(5, 11) {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: uname fills the zeroed struct; release is NUL-terminated.
    let release = unsafe {
        let mut uts: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut uts) != 0 {
            return false;
        }
        std::ffi::CStr::from_ptr(uts.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

fn permission_hint() -> &'static str {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        "running as root but without CAP_BPF/CAP_NET_ADMIN/CAP_PERFMON (a restricted container?)"
    } else {
        "not running as root; run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
    }
}

/// Errors from parsing the object and creating its maps.
fn classify_object_error(err: aya::EbpfError) -> EbpfError {
    use aya::EbpfError as E;
    match &err {
        E::MapError(MapError::CreateError { name, io_error }) => {
            classify_errno(io_error, &format!("creating map {name}"))
                .unwrap_or_else(|| EbpfError::Other(one_line(&err)))
        }
        E::ParseError(_) | E::BtfRelocationError(_) | E::RelocationError(_) | E::NoBTF => {
            EbpfError::InvalidObject(one_line(&err))
        }
        _ => first_io_error(&err)
            .and_then(|io| classify_errno(io, "bpf()"))
            .unwrap_or_else(|| EbpfError::Other(one_line(&err))),
    }
}

fn classify_program_error(err: ProgramError) -> EbpfError {
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &err
    {
        let log = verifier_log.to_string();
        if let Some(reason) = verifier_reason(&log) {
            return EbpfError::Rejected {
                program: PROGRAM_NAME,
                reason,
                log,
            };
        }
        return classify_errno(io_error, "BPF_PROG_LOAD").unwrap_or_else(|| EbpfError::Rejected {
            program: PROGRAM_NAME,
            reason: io_error.to_string(),
            log,
        });
    }
    first_io_error(&err)
        .and_then(|io| classify_errno(io, "loading the program"))
        .unwrap_or_else(|| EbpfError::Other(one_line(&err)))
}

fn classify_errno(io: &io::Error, what: &str) -> Option<EbpfError> {
    match io.raw_os_error()? {
        libc::EPERM | libc::EACCES => Some(EbpfError::NotPermitted(format!("{what}: {io}"))),
        libc::ENOSYS => Some(EbpfError::Unsupported(
            "the bpf() system call is not available (kernel built without CONFIG_BPF_SYSCALL)"
                .into(),
        )),
        // EINVAL / EOPNOTSUPP / ENOTSUPP (524, kernel-internal): unknown map or program type.
        libc::EINVAL | libc::EOPNOTSUPP | 524 => Some(EbpfError::Unsupported(format!(
            "{what}: {io} (needs sockhash and sk_skb support, Linux 5.x with CONFIG_BPF_STREAM_PARSER)"
        ))),
        _ => None,
    }
}

/// The verifier's explanation: the last log line that is not a statistics trailer.
fn verifier_reason(log: &str) -> Option<String> {
    const TRAILERS: [&str; 4] = [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
    ];
    log.lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && !TRAILERS.iter().any(|t| l.starts_with(t)))
        .map(str::to_owned)
}

fn first_io_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = e.source();
    }
    None
}

/// An error and its sources on one line, without repeating a source its parent already printed.
fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let part = e.to_string();
        if !line.contains(&part) {
            line.push_str(": ");
            line.push_str(&part);
        }
        cur = e.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's cookie for a socket (`SO_COOKIE`), the key of every map.
    fn cookie(s: &impl std::os::fd::AsRawFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid fd and out-pointers of the right size.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    fn skip_reason() -> Option<&'static str> {
        if OBJECT.is_empty() {
            return Some("built with AYA_BUILD_SKIP");
        }
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some("needs root");
        }
        None
    }

    #[test]
    fn object_is_an_ebpf_elf() {
        if OBJECT.is_empty() {
            return;
        }
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        assert_eq!(OBJECT.as_ptr() as usize % 8, 0);
    }

    #[test]
    fn loads_program_and_maps() {
        if let Some(why) = skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
        let ebpf = load().unwrap_or_else(|e| panic!("{e}"));
        let program: &SkSkb = ebpf
            .program(PROGRAM_NAME)
            .expect("program present")
            .try_into()
            .expect("an sk_skb program");
        assert!(program.fd().is_ok(), "program loaded into the kernel");
        for name in [
            PEERS_MAP, ARMED_MAP, BYTES_MAP, LIMITS_MAP, MOVED_MAP, HOLDS_MAP, STATS_MAP,
        ] {
            assert!(ebpf.map(name).is_some(), "map {name} present");
        }
        aya::maps::SockHash::<_, u64>::try_from(ebpf.map(PEERS_MAP).unwrap()).expect("sockhash");
        aya::maps::HashMap::<_, u64, Counts>::try_from(ebpf.map(BYTES_MAP).unwrap()).expect("hash");
        assert_eq!(read_stats(&ebpf).expect("stats"), Stats::default());
    }

    #[test]
    fn capacity_is_applied() {
        if let Some(why) = skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
        let ebpf = load_with_capacity(128).unwrap_or_else(|e| panic!("{e}"));
        let peers = ebpf.map(PEERS_MAP).unwrap();
        let aya::maps::Map::SockHash(data) = peers else {
            panic!("PEERS is not a sockhash");
        };
        assert_eq!(data.info().unwrap().max_entries(), 128);
    }

    /// End to end in the kernel: two loopback TCP pairs joined through PEERS, bytes both ways,
    /// counted in BYTES and STATS.
    #[test]
    fn verdict_redirects_to_peer_and_counts() {
        use std::{
            io::{Read as _, Write as _},
            net::{TcpListener, TcpStream},
            os::fd::AsRawFd as _,
            time::Duration,
        };

        if let Some(why) = skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
        fn pair() -> (TcpStream, TcpStream) {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let connected = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            for s in [&connected, &accepted] {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            }
            (connected, accepted)
        }

        let mut ebpf = load().unwrap_or_else(|e| panic!("{e}"));
        // client <-> proxy_client (accepted), proxy_upstream <-> server (accepted).
        let (mut client, proxy_client) = pair();
        let (proxy_upstream, mut server) = pair();
        let (c_cookie, u_cookie) = (cookie(&proxy_client), cookie(&proxy_upstream));

        let mut peers =
            aya::maps::SockHash::<_, u64>::try_from(ebpf.take_map(PEERS_MAP).unwrap()).unwrap();
        let mut armed =
            aya::maps::SockHash::<_, u64>::try_from(ebpf.take_map(ARMED_MAP).unwrap()).unwrap();
        let program: &mut SkSkb = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        program
            .attach(armed.fd())
            .unwrap_or_else(|e| panic!("attach: {e}"));
        // Targets first, then arm: no segment can meet a missing peer.
        peers.insert(u_cookie, proxy_client.as_raw_fd(), 0).unwrap();
        peers
            .insert(c_cookie, proxy_upstream.as_raw_fd(), 0)
            .unwrap();
        armed.insert(c_cookie, proxy_client.as_raw_fd(), 0).unwrap();
        armed
            .insert(u_cookie, proxy_upstream.as_raw_fd(), 0)
            .unwrap();

        let up = b"client to server through the kernel";
        client.write_all(up).unwrap();
        let mut got = vec![0; up.len()];
        server.read_exact(&mut got).unwrap();
        assert_eq!(got, up);

        let down = b"and back";
        server.write_all(down).unwrap();
        let mut got = vec![0; down.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, down);

        let bytes =
            aya::maps::HashMap::<_, u64, Counts>::try_from(ebpf.map(BYTES_MAP).unwrap()).unwrap();
        assert_eq!(bytes.get(&c_cookie, 0).unwrap().redirected, up.len() as u64);
        assert_eq!(
            bytes.get(&u_cookie, 0).unwrap().redirected,
            down.len() as u64
        );
        let stats = read_stats(&ebpf).unwrap();
        assert_eq!(stats.redirected_bytes, (up.len() + down.len()) as u64);
        assert!(stats.redirected_segments >= 2);

        // Taken out of the object, the same counters read the same.
        let kernel = KernelStats::take(&mut ebpf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(kernel.read().unwrap(), stats);
        assert!(read_stats(&ebpf).is_err(), "STATS left the object");
    }

    /// The program's aya-log records reach userspace: a socket armed without a peer makes the
    /// program log "no peer" at debug level.
    #[test]
    fn program_log_records_reach_userspace() {
        use std::io::Write as _;
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::AsRawFd as _;
        use std::sync::{Arc, Mutex};

        struct Collect(Arc<Mutex<Vec<String>>>);
        impl log::Log for Collect {
            fn enabled(&self, _: &log::Metadata<'_>) -> bool {
                true
            }
            fn log(&self, record: &log::Record<'_>) {
                self.0.lock().unwrap().push(format!("{}", record.args()));
            }
            fn flush(&self) {}
        }

        if let Some(why) = skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
        let mut ebpf = load().unwrap_or_else(|e| panic!("{e}"));
        let records = Arc::new(Mutex::new(Vec::new()));
        let mut logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, Collect(records.clone()))
            .expect("the object has an aya-log ring buffer");
        let mut armed =
            aya::maps::SockHash::<_, u64>::try_from(ebpf.take_map(ARMED_MAP).unwrap()).unwrap();
        let program: &mut SkSkb = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        program.attach(armed.fd()).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let cookie = cookie(&accepted);
        // Armed, but no PEERS entry: the verdict passes the bytes and logs why.
        armed.insert(cookie, accepted.as_raw_fd(), 0).unwrap();
        client.write_all(b"nobody to send this to").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            logger.flush();
            if records
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.contains("no peer"))
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no record from the program: {:?}",
                records.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Without root (and without CAP_BPF) the reason must say so, not "map error".
    #[test]
    fn unprivileged_load_says_not_permitted() {
        // SAFETY: geteuid cannot fail.
        if OBJECT.is_empty() || unsafe { libc::geteuid() } == 0 {
            return;
        }
        match load() {
            Ok(_) => {} // granted CAP_BPF + CAP_NET_ADMIN: fine too
            Err(e @ EbpfError::NotPermitted(_)) => {
                eprintln!("load without root: {e}");
                assert!(e.to_string().contains("not running as root"), "{e}");
            }
            Err(e) => panic!("expected NotPermitted, got: {e}"),
        }
    }

    #[test]
    fn verifier_reason_skips_statistics() {
        let log = "0: (bf) r6 = r1\n; R1 invalid mem access 'scalar'\n\
                   processed 12 insns (limit 1000000) max_states_per_insn 0\n";
        assert_eq!(
            verifier_reason(log).as_deref(),
            Some("; R1 invalid mem access 'scalar'")
        );
        assert_eq!(verifier_reason("\n\n"), None);
    }

    #[test]
    fn errors_are_one_line() {
        let errors = [
            EbpfError::NotBuilt,
            EbpfError::NotPermitted("creating map PEERS: Operation not permitted".into()),
            EbpfError::Unsupported("x".into()),
            EbpfError::Rejected {
                program: PROGRAM_NAME,
                reason: "R1 invalid mem access".into(),
                log: "a\nb\n".into(),
            },
        ];
        for e in errors {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text:?}");
        }
        assert!(
            EbpfError::NotBuilt
                .to_string()
                .contains("eBPF object not built")
        );
    }
}
