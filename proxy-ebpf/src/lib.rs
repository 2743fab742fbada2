//! Names, limits and `#[repr(C)]` types shared by the splice-proxy eBPF program (`main.rs`) and
//! userspace (`proxy-user/src/ebpf.rs`, which includes `shared.rs` directly).
#![no_std]

include!("shared.rs");
