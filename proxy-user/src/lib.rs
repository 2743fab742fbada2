//! splice-proxy: an HTTP CONNECT proxy whose tunnels are forwarded in the kernel.
