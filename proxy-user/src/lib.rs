//! splice-proxy: an HTTP CONNECT proxy whose tunnels are forwarded in the kernel.
//!
//! A connection's life reads top to bottom in [`server`]: accept → read
//! request ([`request`]) → authenticate ([`auth`]) → authorize ([`policy`])
//! → connect ([`upstream`]) → reply, or refuse ([`refusal`]) → hand off to
//! a data path ([`tunnel`]) → log ([`access_log`]) and count ([`metrics`]).

pub mod accept_backoff;
pub mod access_log;
pub mod auth;
pub mod btf;
pub mod cidr;
pub mod config;
pub mod credentials;
pub mod doctor;
pub mod duration;
pub mod ebpf;
pub mod keepalive;
pub mod limits;
pub mod metrics;
pub mod parent;
pub mod policy;
pub mod proxy_url;
pub mod refusal;
pub mod reload;
pub mod request;
pub mod server;
pub mod tunnel;
pub mod upstream;
pub mod user_dst;
pub mod watch;
