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
/// `PEERS[cookie(upstream)] = client`.
///
/// Inserting a socket as a *value* is what puts the verdict program on it, so each insert arms the
/// value socket, and that socket's own key must already be there or its data is passed to its own
/// receive queue (`SK_PASS`, no peer) until the other insert lands. Insert
/// `PEERS[cookie(upstream)] = client` first (arms the client, which normally sends nothing until it
/// has the 200), then `PEERS[cookie(client)] = upstream` (arms the upstream, whose key is already
/// present). Remove both keys before closing either socket.
pub const PEERS_MAP: &str = "PEERS";

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
