//! Names, limits and `#[repr(C)]` types shared by the splice-proxy eBPF program
//! (`proxy-ebpf`) and userspace (`proxy-user`), so both sides agree on map names and layouts.
//!
//! One crate both depend on, as aya's project template does: `no_std`, no dependencies for the
//! eBPF side; with the `user` feature (userspace) the map value types are also `aya::Pod`.
#![no_std]

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

/// `HashMap<u64, Counts>`: socket cookie of the source socket -> what the program did with the
/// bytes arriving on it (one direction of a tunnel). Userspace pre-creates the entry with zeros
/// (the program creates a missing one), reads it, and deletes it when the tunnel ends.
pub const BYTES_MAP: &str = "BYTES";

/// `HashMap<u64, Limit>`: socket cookie of the source socket -> the backlog bound for its
/// direction. Written once by userspace when the socket is armed; no entry means unbounded.
///
/// The bound is how backpressure works (docs/kernel-notes.md, "Backpressure"): while the bytes
/// sent towards the peer and not yet acknowledged by the peer's remote exceed
/// [`Limit::threshold`], the program answers `SK_PASS` instead of redirecting ("holds"). A held
/// skb stays on the source socket, charged to its receive buffer, so TCP closes the sender's
/// window. Userspace moves the held bytes to the peer once the peer has drained, and the program
/// redirects again once it has caught up (see [`MOVED_MAP`]).
pub const LIMITS_MAP: &str = "LIMITS";

/// `Array<Limit>` of one entry: the bound of every direction without a [`LIMITS_MAP`] entry of
/// its own, written by userspace at start with `base` 0. Most tunnels need no entry of their
/// own (two map inserts and two deletes fewer per tunnel): userspace writes one only when a
/// direction's `base` is more than a few KiB (bytes the client sent before the `200` and
/// userspace forwarded) or when it changes the bound (a hold episode, a return to the kernel
/// path).
pub const DEFAULT_LIMIT_MAP: &str = "DEFAULT_LIMIT";

/// `HashMap<u64, u64>`: socket cookie of the source socket -> bytes userspace has moved from it
/// to the peer (held bytes it read and wrote). Written by userspace only. While
/// `Counts::held != MOVED`, held bytes are still on their way and the program holds every new
/// skb too, so nothing overtakes them.
pub const MOVED_MAP: &str = "MOVED";

/// `RingBuf` of `u64` socket cookies: the program writes the cookie of a socket for every skb
/// it holds, after counting it in `Counts::held`, so a mover that has just seen itself caught
/// up is always woken again; and for every skb it redirects past `Limit::soft`. Userspace wakes
/// up for these only, never for other redirected data.
pub const HOLDS_MAP: &str = "HOLDS";

/// Size of [`HOLDS_MAP`] in bytes (a power of two, a multiple of the page size). Each record
/// takes 16 bytes, so 2 MiB holds 131,072 wake-ups: relayed traffic makes about one per 64 KiB
/// skb, some 30,000 a second at 15 Gbit/s, so the dispatcher would have to stall for seconds
/// before one is lost (a lost wake-up at the start of an episode leaves that tunnel stalled).
pub const HOLDS_RING_BYTES: u32 = 2 * 1024 * 1024;

/// `HashMap<u64, u32>`: socket cookie -> a request to take that socket out of [`ARMED_MAP`],
/// answered by the [`DETACH_PROGRAM_NAME`] iterator. Userspace inserts [`DETACH_PENDING`] for
/// each socket of a batch, runs one walk of the TCP iterator, and reads the answers: the
/// iterator runs with the socket's lock held, so no verdict can be running on it when it
/// deletes the socket from `ARMED` (see "Leaving the kernel path" in docs/kernel-notes.md).
pub const DETACH_MAP: &str = "DETACH";

/// `Array<u32>` with one slot: how many [`DETACH_MAP`] requests of the running walk are not
/// answered yet. Userspace sets it before each walk; the iterator counts it down and, at zero,
/// writes [`WALK_DONE_BYTES`] bytes to the walk's output, which ends the reader's `read` early:
/// the rest of the established hash (every bucket, most of them empty: 2.5 ms on this machine)
/// need not be visited.
pub const WALK_MAP: &str = "WALK";

/// What the iterator writes once every request of a walk is answered; userspace reads with a
/// buffer of exactly this size, so the kernel returns from the read at the next socket.
pub const WALK_DONE_BYTES: usize = 8;

/// Name of the `iter/tcp` program that answers [`DETACH_MAP`] requests.
pub const DETACH_PROGRAM_NAME: &str = "splice_detach";

/// A [`DETACH_MAP`] request not answered yet (the walk did not meet the socket).
pub const DETACH_PENDING: u32 = 0;
/// The socket was deleted from `ARMED` under its lock: no verdict runs on it any more.
pub const DETACH_DONE: u32 = 1;
/// Refused: held bytes of this socket were not all moved yet (`Counts::held != MOVED`), so
/// leaving them in the socket's `ingress_msg` behind new bytes in its receive queue would
/// reorder them. Userspace moves them and asks again.
pub const DETACH_BEHIND: u32 = 2;
/// Refused: the socket was not in `ARMED`.
pub const DETACH_NOT_ARMED: u32 = 3;

/// `PerCpuArray<Stats>` with one slot (index [`STATS_INDEX`]); userspace sums the CPUs.
pub const STATS_MAP: &str = "STATS";

/// The only slot of [`STATS_MAP`].
pub const STATS_INDEX: u32 = 0;

/// Default capacity of [`PEERS_MAP`] and [`BYTES_MAP`], in sockets (two per tunnel). Userspace may
/// change it before loading (`EbpfLoader::set_max_entries`).
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// Per-direction counters kept by the verdict program in [`BYTES_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Bytes redirected to the peer socket by the kernel.
    pub redirected: u64,
    /// Bytes held on the source socket (`SK_PASS`) for userspace to move, because the peer's
    /// backlog was over the bound or earlier held bytes had not been moved yet.
    pub held: u64,
    /// TCP sequence number just past the last byte the program saw on this socket, with bit 32
    /// set once known (0: the next skb is the first). See "Retransmitted overlaps" in
    /// docs/kernel-notes.md.
    pub next_seq: u64,
}

/// The backlog bound of one direction, in [`LIMITS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Most bytes sent towards the peer (redirected + moved) and not yet acknowledged by the
    /// peer's remote before the program starts holding. 0: never hold.
    pub threshold: u64,
    /// Bytes put into the peer's send queue other than by this direction's program and its
    /// held-byte mover: its `queued_total` (acked + send queue) when it was armed, plus what
    /// userspace spliced to it while the direction was off the kernel path. The bytes towards
    /// the peer its remote has not acknowledged are `redirected + moved + base - bytes_acked`.
    pub base: u64,
    /// Non-zero: userspace relays this direction, so the program holds every skb, whatever the
    /// backlog. Set by userspace when a hold episode starts (`--sockmap-overrun relay`) and
    /// cleared once the direction stopped pressing against the bound; see "Relaying an
    /// overrunning direction" in docs/kernel-notes.md.
    pub relay: u64,
    /// Non-zero: past this many unacknowledged bytes (below `threshold`) the program wakes
    /// userspace for every skb it redirects, so that userspace takes the direction off the
    /// kernel path (`--sockmap-overrun splice`) before anything has to be held.
    pub soft: u64,
}

/// Name of the program's global holding the offset of `bytes_acked` in the running kernel's
/// `struct tcp_sock`, which userspace reads from `/sys/kernel/btf/vmlinux` and sets at load.
pub const TCP_SOCK_BYTES_ACKED: &str = "TCP_SOCK_BYTES_ACKED";

/// Name of the program's global holding the offset of `copied_seq` in `struct tcp_sock`.
pub const TCP_SOCK_COPIED_SEQ: &str = "TCP_SOCK_COPIED_SEQ";

/// Name of the program's global holding the offset of the TCP sequence number of an skb
/// (`TCP_SKB_CB(skb)->seq`: `sk_buff.cb` plus `tcp_skb_cb.seq`) in `struct sk_buff`.
pub const SKB_TCP_SEQ: &str = "SKB_TCP_SEQ";

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
    /// Bytes held for userspace because the peer's backlog was over the bound.
    pub held_bytes: u64,
    /// Times a direction started holding (backpressure episodes).
    pub holds: u64,
    /// Bytes cut from the front of skbs that TCP queued although they began with bytes already
    /// delivered (a retransmission overlapping what was received).
    pub trimmed_bytes: u64,
    /// Skbs that needed such a cut.
    pub trims: u64,
    /// Wake-ups the program could not put on [`HOLDS_MAP`] because it was full. Userspace then
    /// wakes every tunnel, so no held byte waits for a wake-up that never comes.
    pub lost_wakeups: u64,
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
            held_bytes: self.held_bytes.wrapping_add(other.held_bytes),
            holds: self.holds.wrapping_add(other.holds),
            trimmed_bytes: self.trimmed_bytes.wrapping_add(other.trimmed_bytes),
            trims: self.trims.wrapping_add(other.trims),
            lost_wakeups: self.lost_wakeups.wrapping_add(other.lost_wakeups),
        }
    }
}

// SAFETY (the three impls below): `aya::Pod` asks for plain data valid for any bit pattern.
// Each type is `#[repr(C)]` and made of `u64` fields only, so it has no padding and every bit
// pattern is a valid value.
#[cfg(feature = "user")]
// SAFETY: see above: `Stats` is `#[repr(C)]`, all `u64`.
unsafe impl aya::Pod for Stats {}
#[cfg(feature = "user")]
// SAFETY: see above: `Counts` is `#[repr(C)]`, all `u64`.
unsafe impl aya::Pod for Counts {}
#[cfg(feature = "user")]
// SAFETY: see above: `Limit` is `#[repr(C)]`, all `u64`.
unsafe impl aya::Pod for Limit {}
