//! The eBPF program is the binary (`main.rs`). This library target exists so `proxy-user` can
//! name this crate as a build dependency, which makes cargo rebuild the program's object when
//! anything it is built from changes; the names and types it shares with userspace are in
//! `proxy-common`.
#![no_std]
