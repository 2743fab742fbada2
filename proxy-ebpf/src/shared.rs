// Definitions shared by the eBPF program and userspace.
//
// This file is compiled twice: into `proxy-ebpf` (through `lib.rs`, for the BPF target) and into
// `proxy-user` (through a `#[path]` module in `src/ebpf.rs`), so userspace gets the same names and
// layouts without compiling `aya-ebpf` for the host. Keep it plain Rust: no crate-level attributes,
// no dependencies, nothing but `core`.

/// Name of the `sk_skb/stream_verdict` program (the function name in `main.rs`).
pub const PROGRAM_NAME: &str = "splice_verdict";

/// `SockHash<u64>`: key = socket cookie of the socket the data arrives on, value = the socket to
/// transmit it on. A tunnel is two entries: `PEERS[cookie(client)] = upstream` and
/// `PEERS[cookie(upstream)] = client`. No program is attached to this map: being in it makes a
/// socket a valid redirect target and nothing more.
///
/// The verdict program runs on the sockets of [`ARMED_MAP`]. Keeping the two apart makes the
/// handoff free of races: userspace fills `PEERS` for both sockets first, so by the time either
/// socket is armed its redirect target already exists and no segment can fall through to
/// `SK_PASS` (which would strand it in the socket's own queue).
pub const PEERS_MAP: &str = "PEERS";

/// `SockHash<u64>`: key = the socket's own cookie, value = the socket. The stream-verdict program
/// is attached to this map, so inserting a socket here starts verdict processing on it. Insert
/// only after both of the tunnel's [`PEERS_MAP`] entries exist; remove before removing those.
pub const ARMED_MAP: &str = "ARMED";

/// `HashMap<u64, u64>`: socket cookie of the source socket -> bytes redirected from it to its
/// peer (one direction of a tunnel). The program creates a missing entry; userspace reads the
/// final value and deletes the entry when the tunnel ends (or pre-creates it with 0).
pub const BYTES_MAP: &str = "BYTES";

/// `PerCpuArray<Stats>` with one slot (index [`STATS_INDEX`]); userspace sums the CPUs.
pub const STATS_MAP: &str = "STATS";

/// The only slot of [`STATS_MAP`].
pub const STATS_INDEX: u32 = 0;

/// Default capacity of [`PEERS_MAP`] and [`BYTES_MAP`], in sockets (two per tunnel). Userspace may
/// change it before loading (`EbpfLoader::set_max_entries`).
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// Global counters kept by the verdict program, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes redirected to a peer socket.
    pub redirected_bytes: u64,
    /// Segments (skbs) redirected to a peer socket.
    pub redirected_segments: u64,
    /// Bytes passed to the receiving socket's own queue because it had no peer.
    pub passed_bytes: u64,
    /// Segments passed to the receiving socket's own queue because it had no peer.
    pub passed_segments: u64,
}

impl Stats {
    /// Field-wise sum, for folding the per-CPU values.
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            redirected_bytes: self.redirected_bytes.wrapping_add(other.redirected_bytes),
            redirected_segments: self
                .redirected_segments
                .wrapping_add(other.redirected_segments),
            passed_bytes: self.passed_bytes.wrapping_add(other.passed_bytes),
            passed_segments: self.passed_segments.wrapping_add(other.passed_segments),
        }
    }
}
