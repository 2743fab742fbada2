//! The splice-proxy data path: an `sk_skb` stream-verdict program that sends every segment
//! arriving on a tunnel socket straight to the transmit side of its peer socket.
//!
//! Built for `bpfel-unknown-none` by `proxy-user/build.rs` (aya-build). On any other target this
//! file compiles to a stub binary, so workspace-wide cargo commands (and host clippy) still work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_NOEXIST, sk_action},
    cty::c_void,
    helpers::{
        bpf_get_socket_cookie, bpf_map_delete_elem, bpf_map_lookup_elem, bpf_probe_read_kernel,
        bpf_seq_write, bpf_sk_release, bpf_skb_adjust_room, bpf_skc_to_tcp_sock,
    },
    macros::{map, stream_verdict},
    maps::{Array, HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use proxy_common::{
    Counts, DEFAULT_MAX_SOCKETS, DETACH_BEHIND, DETACH_DONE, DETACH_NOT_ARMED, DETACH_PENDING,
    HOLDS_RING_BYTES, Limit, STATS_INDEX, Stats, WALK_DONE_BYTES,
};

/// Source socket cookie -> socket to transmit on. See `proxy_common::PEERS_MAP`.
#[map]
static PEERS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Own socket cookie -> socket; the verdict program is attached here. See `proxy_common::ARMED_MAP`.
#[map]
static ARMED: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Source socket cookie -> per-direction counters. See `proxy_common::BYTES_MAP`.
#[map]
static BYTES: HashMap<u64, Counts> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Source socket cookie -> backlog bound. See `proxy_common::LIMITS_MAP`.
#[map]
static LIMITS: HashMap<u64, Limit> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// The bound of a direction without a `LIMITS` entry. See `proxy_common::DEFAULT_LIMIT_MAP`.
#[map]
static DEFAULT_LIMIT: Array<Limit> = Array::with_max_entries(1, 0);

/// Source socket cookie -> bytes userspace moved. See `proxy_common::MOVED_MAP`.
#[map]
static MOVED: HashMap<u64, u64> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Cookies of sockets that started holding. See `proxy_common::HOLDS_MAP`.
#[map]
static HOLDS: RingBuf = RingBuf::with_byte_size(HOLDS_RING_BYTES, 0);

/// Requests of the running walk not answered yet. See `proxy_common::WALK_MAP`.
#[map]
static WALK: Array<u32> = Array::with_max_entries(1, 0);

/// Offset of `bytes_acked` in the kernel's `struct tcp_sock`, read by userspace from the kernel's
/// BTF and set before loading (`proxy_common::TCP_SOCK_BYTES_ACKED`). 0: unknown, never hold.
#[unsafe(no_mangle)]
static TCP_SOCK_BYTES_ACKED: u32 = 0;

/// Offset of `copied_seq` in `struct tcp_sock` (`proxy_common::TCP_SOCK_COPIED_SEQ`). 0: unknown.
#[unsafe(no_mangle)]
static TCP_SOCK_COPIED_SEQ: u32 = 0;

/// Offset of `TCP_SKB_CB(skb)->seq` in `struct sk_buff` (`proxy_common::SKB_TCP_SEQ`). 0: unknown.
#[unsafe(no_mangle)]
static SKB_TCP_SEQ: u32 = 0;

/// Socket cookie -> a request to leave `ARMED`. See `proxy_common::DETACH_MAP`.
#[map]
static DETACH: HashMap<u64, u32> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Global counters, one slot per CPU. See `proxy_common::STATS_MAP`.
#[map]
static STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(1, 0);

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: bpf_get_socket_cookie is allowed for sk_skb programs and takes the program context.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let len = u64::from(ctx.len());

    // A FIN with no data still reaches the verdict (tcp_read_skb hands every skb over). Redirected,
    // the peer's redirect worker would try to send zero bytes, take that as a hard error, set
    // EPIPE on the peer and stop its transmit side. The FIN itself is already recorded in the TCP
    // state (RCV_SHUTDOWN), which userspace forwards with shutdown(SHUT_WR); the empty skb only
    // carries it, so drop it.
    if len == 0 {
        return sk_action::SK_DROP;
    }

    let counts = counts_of(cookie);

    // TCP may queue a retransmitted segment that starts before what it already received (seq <
    // rcv_nxt < end_seq); tcp_read_skb hands it over whole, so its first bytes would reach the
    // peer twice. Cut them off (see "Retransmitted overlaps" in docs/kernel-notes.md).
    let mut len = len;
    if let Some(counts) = counts {
        // SAFETY: as below: this socket's verdict is the only writer of its entry.
        let counts = unsafe { &mut *counts };
        match trim_overlap(&ctx, cookie, counts, len) {
            Trim::Keep(kept) => len = kept,
            Trim::Drop => return sk_action::SK_DROP,
        }
    }

    // Backpressure: hold the skb on this socket instead of redirecting it (see LIMITS_MAP).
    let mut press = false;
    if let Some(counts) = counts {
        // SAFETY: a live, aligned map value whose only writer is this socket's verdict, which the
        // kernel runs under the socket's lock (softirq receive or the SO_RCVLOWAT kick).
        let counts = unsafe { &mut *counts };
        match must_hold(cookie, counts, len) {
            Bound::Hold { starts } => {
                counts.held += len;
                // Wake userspace for every held skb, after counting it. Only at the start of an
                // episode is not enough: userspace may have just read `held` and decided it had
                // caught up while this skb was between its MOVED check and the count above.
                let lost = HOLDS.output::<u64>(&cookie, 0).is_err();
                with_stats(|s| {
                    s.held_bytes += len;
                    s.holds += u64::from(starts);
                    s.lost_wakeups += u64::from(lost);
                });
                return sk_action::SK_PASS;
            }
            Bound::Redirect { past_soft } => press = past_soft,
        }
    }

    // bpf_sk_redirect_hash only marks the skb; the kernel moves it after we return SK_PASS. It
    // answers SK_DROP when there is no usable peer, and then nothing has been marked.
    let redirected = PEERS.redirect_skb(&ctx, &mut cookie, 0) == i64::from(sk_action::SK_PASS);

    if redirected {
        if let Some(counts) = counts {
            // SAFETY: as above.
            unsafe { (*counts).redirected += len };
        }
    } else {
        debug!(
            &ctx,
            "splice_verdict: no peer for socket cookie {}, passing", cookie
        );
    }
    // Past the soft threshold: wake userspace (after counting) to take this direction off the
    // kernel path before it has to hold anything.
    let lost = press && redirected && HOLDS.output::<u64>(&cookie, 0).is_err();
    with_stats(|stats| {
        stats.lost_wakeups += u64::from(lost);
        if redirected {
            stats.redirected_bytes += len;
            stats.redirected_segments += 1;
        } else {
            stats.passed_bytes += len;
            stats.passed_segments += 1;
        }
    });
    // No peer: keep the data on the receiving socket (userspace can still read it).
    sk_action::SK_PASS
}

/// `BYTES[cookie]`, created with zeros on the first segment if userspace did not pre-create it.
///
/// No atomics are needed on the value (the BPF target has no atomic RMW in Rust without nightly
/// intrinsics): the verdict program for one socket runs under that socket's lock, so only one
/// writer ever touches a given cookie's entry, and userspace only reads or deletes it. An
/// aligned 8-byte store is never torn for a reader.
static ZERO_COUNTS: Counts = Counts {
    redirected: 0,
    held: 0,
    next_seq: 0,
};

#[inline(always)]
fn counts_of(cookie: u64) -> Option<*mut Counts> {
    if let Some(c) = BYTES.get_ptr_mut(&cookie) {
        return Some(c);
    }
    // A full map only costs the per-tunnel counts; STATS still has the bytes.
    // From a static: a zeroed local would become a memset, which BPF cannot call.
    let _ = BYTES.insert(&cookie, &ZERO_COUNTS, u64::from(BPF_NOEXIST));
    BYTES.get_ptr_mut(&cookie)
}

/// What [`trim_overlap`] decided.
enum Trim {
    /// Forward the skb, now this many bytes long.
    Keep(u64),
    /// Every byte of it was delivered before: drop it.
    Drop,
}

/// Most bytes `bpf_skb_adjust_room` removes in one call (`sk_skb_adjust_room`).
const ADJUST_MAX: u64 = 0xfff;

/// Cuts from the front of the skb the bytes before `counts.next_seq`, which the program has
/// already forwarded (or, for the socket's first skb, userspace has already read), and records
/// where this skb ends.
#[inline(always)]
fn trim_overlap(ctx: &SkBuffContext, cookie: u64, counts: &mut Counts, len: u64) -> Trim {
    let Some(seq) = skb_seq(ctx) else {
        return Trim::Keep(len);
    };
    let expected = if counts.next_seq >> 32 == 1 {
        counts.next_seq as u32
    } else {
        // The first skb: nothing forwarded yet, so TCP's copied_seq is what userspace read.
        let copied_seq = global(&TCP_SOCK_COPIED_SEQ);
        match tcp_sock_field::<u32>((&raw const ARMED).cast(), cookie, copied_seq) {
            Some(copied) => copied,
            None => return Trim::Keep(len),
        }
    };
    let end = seq.wrapping_add(len as u32);
    // Sequence space wraps: compare as signed differences (RFC 1982 style, like before()).
    let overlap = expected.wrapping_sub(seq) as i32;
    if overlap <= 0 {
        counts.next_seq = (1 << 32) | u64::from(end);
        return Trim::Keep(len);
    }
    let overlap = overlap as u64;
    with_stats(|s| {
        s.trims += 1;
        s.trimmed_bytes += overlap.min(len);
    });
    if overlap >= len {
        return Trim::Drop;
    }
    let mut left = overlap;
    // Bounded for the verifier: 64 calls cover 256 KiB, more than any skb TCP builds.
    for _ in 0..64 {
        if left == 0 {
            break;
        }
        let step = left.min(ADJUST_MAX);
        // SAFETY: the program's own skb; a negative len_diff with mode 0 pulls bytes off the
        // front of an sk_skb skb.
        if unsafe { bpf_skb_adjust_room(ctx.skb.skb, -(step as i32), 0, 0) } != 0 {
            break;
        }
        left -= step;
    }
    counts.next_seq = (1 << 32) | u64::from(end);
    Trim::Keep(len - (overlap - left))
}

/// `TCP_SKB_CB(skb)->seq` of the program's skb, if its offset is known.
#[inline(always)]
fn skb_seq(ctx: &SkBuffContext) -> Option<u32> {
    let offset = global(&SKB_TCP_SEQ);
    if offset == 0 {
        return None;
    }
    // SAFETY: the context of an sk_skb program is the kernel's sk_buff; read 4 bytes of its
    // control block (the TCP sequence number) into a local.
    unsafe { bpf_probe_read_kernel(ctx.as_ptr().cast::<u8>().add(offset as usize).cast::<u32>()) }
        .ok()
}

/// The `T` at `offset` in the kernel's `struct tcp_sock` of the socket `map[cookie]`; `None`
/// for offset 0 (unknown), a missing entry, or a failed read. With `PEERS` it reads the peer of
/// the socket with that cookie, with `ARMED` the socket itself.
#[inline(always)]
fn tcp_sock_field<T>(map: *const c_void, cookie: u64, offset: u32) -> Option<T> {
    if offset == 0 {
        return None;
    }
    let mut key = cookie;
    // SAFETY: a lookup in a sockhash from an sk_skb program returns a referenced socket or NULL;
    // the map pointer is the map definition itself (SockHash is repr(transparent)).
    let sk = unsafe { bpf_map_lookup_elem(map.cast_mut(), (&raw mut key).cast::<c_void>()) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: sk is a referenced socket from the lookup above; the helper checks it is TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let value = if tp.is_null() {
        None
    } else {
        // SAFETY: reads a field of the kernel's tcp_sock at its BTF offset into a local; the
        // socket is kept alive by the lookup's reference.
        unsafe { bpf_probe_read_kernel(tp.cast::<u8>().add(offset as usize).cast::<T>()) }.ok()
    };
    // SAFETY: releases the reference taken by the lookup, exactly once.
    unsafe { bpf_sk_release(sk) };
    value
}

/// Reads a `u32` global the loader may patch; volatile so the compiler does not fold its 0.
#[inline(always)]
fn global(g: &u32) -> u32 {
    // SAFETY: a plain read of a static.
    unsafe { core::ptr::read_volatile(g) }
}

/// What the bound says about one skb.
enum Bound {
    /// Hold it; `starts`: it begins a backpressure episode.
    Hold { starts: bool },
    /// Redirect it; `past_soft`: the peer's backlog is past `Limit::soft`.
    Redirect { past_soft: bool },
}

/// Whether this skb must be held rather than redirected.
#[inline(always)]
fn must_hold(cookie: u64, counts: &Counts, len: u64) -> Bound {
    let redirect = Bound::Redirect { past_soft: false };
    // SAFETY: plain map lookups; the values are POD written whole by userspace.
    let Some(limit) = (unsafe { LIMITS.get(&cookie) }).or_else(|| DEFAULT_LIMIT.get(0)) else {
        return redirect;
    };
    let moved = unsafe { MOVED.get(&cookie) }.copied().unwrap_or(0);
    if counts.held != moved {
        // Held bytes are still waiting for userspace: this one goes behind them.
        return Bound::Hold { starts: false };
    }
    if limit.relay != 0 {
        // Userspace relays this direction: hold everything. Not a new episode: that one began
        // when the bound was crossed (and userspace counts its relays).
        return Bound::Hold { starts: false };
    }
    if limit.threshold == 0 {
        return redirect;
    }
    // How far the peer has drained: its remote's acknowledged bytes.
    let bytes_acked = global(&TCP_SOCK_BYTES_ACKED);
    let Some(acked) = tcp_sock_field::<u64>((&raw const PEERS).cast(), cookie, bytes_acked) else {
        return redirect;
    };
    let sent = counts.redirected + moved;
    let unacked = (sent + limit.base).saturating_sub(acked) + len;
    if unacked > limit.threshold {
        return Bound::Hold { starts: true };
    }
    Bound::Redirect {
        past_soft: limit.soft != 0 && unacked > limit.soft,
    }
}

/// `struct bpf_iter_meta`: the walk's output file and its position.
#[repr(C)]
pub struct IterMeta {
    seq: *mut c_void,
    session_id: u64,
    seq_num: u64,
}

/// The context of an `iter/tcp` program (`struct bpf_iter__tcp` in the kernel).
#[repr(C)]
pub struct TcpIterCtx {
    meta: *mut IterMeta,
    /// The socket visited (`struct sock_common *`); NULL once at the end of the walk.
    sk_common: *mut c_void,
    uid: u32,
}

/// Answers `DETACH` requests: deletes each requested socket from `ARMED`. The kernel's TCP
/// iterator (`bpf_iter_tcp_seq_show`) runs this with `lock_sock` held on the visited socket, so
/// neither softirq receive nor a process-context caller can be inside that socket's verdict
/// (`tcp_read_skb`) while the program is stopped: nothing already unlinked from its receive
/// queue can meet a missing program and be dropped. A delete made from the bpf() syscall takes
/// no socket lock and has exactly that race.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn splice_detach(ctx: *mut TcpIterCtx) -> i32 {
    // SAFETY: the kernel passes a valid bpf_iter__tcp context.
    let sk = unsafe { (*ctx).sk_common };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: sk is the iterator's non-NULL, BTF-typed sock_common; tracing programs may take
    // the cookie of one.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    let Some(request) = DETACH.get_ptr_mut(&cookie) else {
        return 0;
    };
    // SAFETY: a live map value; only this walk writes requests while it runs.
    let request = unsafe { &mut *request };
    if *request != DETACH_PENDING {
        return 0;
    }
    // Under the socket lock no verdict runs on it, so `held` cannot move while we look.
    // SAFETY: plain map lookups of POD values.
    let held = unsafe { BYTES.get(&cookie) }.map_or(0, |c| c.held);
    let moved = unsafe { MOVED.get(&cookie) }.copied().unwrap_or(0);
    if held != moved {
        *request = DETACH_BEHIND;
        answered(ctx);
        return 0;
    }
    let mut key = cookie;
    // SAFETY: deleting a key from our own sockhash; the map pointer is the map definition.
    let rc = unsafe {
        bpf_map_delete_elem(
            (&raw const ARMED).cast_mut().cast(),
            (&raw mut key).cast::<c_void>(),
        )
    };
    *request = if rc == 0 {
        DETACH_DONE
    } else {
        DETACH_NOT_ARMED
    };
    answered(ctx);
    0
}

/// Counts one request of this walk as answered; after the last, ends the walk early.
#[inline(always)]
fn answered(ctx: *mut TcpIterCtx) {
    let Some(left) = WALK.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the map's only slot; walks are run one at a time (userspace serialises them).
    let left = unsafe { &mut *left };
    *left = left.saturating_sub(1);
    if *left != 0 {
        return;
    }
    let done = [0u8; WALK_DONE_BYTES];
    // SAFETY: meta and its seq_file are the kernel's, valid for this call; done is on the stack.
    unsafe {
        bpf_seq_write(
            (*(*ctx).meta).seq.cast(),
            done.as_ptr().cast(),
            WALK_DONE_BYTES as u32,
        );
    }
}

#[inline(always)]
fn with_stats(f: impl FnOnce(&mut Stats)) {
    if let Some(stats) = STATS.get_ptr_mut(STATS_INDEX) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs this program concurrently.
        f(unsafe { &mut *stats });
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no reachable panic; this only satisfies no_std.
    loop {}
}

/// The kernel refuses helpers that need a GPL-compatible license without this.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "proxy-ebpf is an eBPF object for bpfel-unknown-none, built by proxy-user/build.rs; \
         it does nothing on this target"
    );
    std::process::exit(2);
}
