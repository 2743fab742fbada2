//! splice-proxy: an HTTP CONNECT proxy whose tunnels are forwarded in the kernel.
//!
//! A connection's life reads top to bottom in [`server`]: accept → read
//! request ([`request`]) → authenticate ([`auth`]) → authorize ([`policy`])
//! → connect ([`upstream`]) → reply, or refuse ([`refusal`]) → hand off to
//! a data path ([`tunnel`]) → log ([`access_log`]) and count ([`metrics`]).
//!
//! The crate's surface is what the binary, the property tests and the fuzz targets use; the
//! rest is private. `unsafe` is denied here and allowed, module by module, only where the
//! kernel needs it (fds, splice, epoll, BPF, signals): the `#[allow(unsafe_code)]` lines below
//! and in `tunnel/` are that list, and `cargo xtask layout` checks the same names.
#![deny(unsafe_code)]

// Used by the binary, `proxy-user/tests` and the fuzz targets.
pub mod auth;
pub mod cidr;
pub mod config;
pub mod doctor;
pub mod metrics;
pub mod policy;
pub mod refusal;
pub mod reload;
pub mod request;
pub mod server;
pub mod tunnel;
pub mod upstream;

mod accept_backoff;
mod access_log;
mod btf;
mod credentials;
mod duration;
#[allow(unsafe_code)]
mod ebpf;
mod keepalive;
mod limits;
mod parent;
mod proxy_url;
mod user_dst;
#[allow(unsafe_code)]
mod watch;
