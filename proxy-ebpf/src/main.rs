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
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use proxy_ebpf::{DEFAULT_MAX_SOCKETS, STATS_INDEX, Stats};

/// Source socket cookie -> socket to transmit on. See `proxy_ebpf::PEERS_MAP`.
#[map]
static PEERS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Own socket cookie -> socket; the verdict program is attached here. See `proxy_ebpf::ARMED_MAP`.
#[map]
static ARMED: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Source socket cookie -> bytes redirected to its peer. See `proxy_ebpf::BYTES_MAP`.
#[map]
static BYTES: HashMap<u64, u64> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Global counters, one slot per CPU. See `proxy_ebpf::STATS_MAP`.
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

    // bpf_sk_redirect_hash only marks the skb; the kernel moves it after we return SK_PASS. It
    // answers SK_DROP when there is no usable peer, and then nothing has been marked.
    let redirected = PEERS.redirect_skb(&ctx, &mut cookie, 0) == i64::from(sk_action::SK_PASS);

    if redirected {
        count_tunnel_bytes(cookie, len);
    } else {
        debug!(
            &ctx,
            "splice_verdict: no peer for socket cookie {}, passing", cookie
        );
    }
    if let Some(stats) = STATS.get_ptr_mut(STATS_INDEX) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs this program concurrently.
        let stats = unsafe { &mut *stats };
        if redirected {
            stats.redirected_bytes += len;
            stats.redirected_segments += 1;
        } else {
            stats.passed_bytes += len;
            stats.passed_segments += 1;
        }
    }
    // No peer: keep the data on the receiving socket (userspace can still read it).
    sk_action::SK_PASS
}

/// Adds `len` to `BYTES[cookie]`, creating the entry on the first segment.
///
/// No atomics (the BPF target has no atomic RMW in Rust without nightly intrinsics), and none are
/// needed: the verdict program for one socket runs under that socket's lock (softirq receive or
/// the SO_RCVLOWAT kick), so only one writer ever touches a given cookie's entry, and userspace
/// only reads or deletes it. An aligned 8-byte store is never torn for a reader.
#[inline(always)]
fn count_tunnel_bytes(cookie: u64, len: u64) {
    if let Some(bytes) = BYTES.get_ptr_mut(cookie) {
        // SAFETY: a live, aligned map value; the only writer is this socket's verdict (see above).
        unsafe { *bytes += len };
    } else {
        // A full map only costs the per-tunnel count; STATS still has the bytes.
        let _ = BYTES.insert(cookie, len, u64::from(BPF_NOEXIST));
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
