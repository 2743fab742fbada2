//! The metrics registry: every counter, gauge and histogram the proxy keeps, the recording
//! functions the server (and the credentials reload) call, and the Prometheus text they render
//! to.
//!
//! The values are kept by `prometheus-client` and rendered in the Prometheus text format
//! (0.0.4). Recording is always on; what reads it lives beside it, one job a file:
//! - `kernel.rs`: the sockmap program's own counters, read from the kernel at every scrape;
//! - `admin.rs`: the HTTP endpoint `--metrics-listen` serves (`/metrics`, `/healthz`,
//!   `/readyz`), only when asked.

pub mod admin;
mod kernel;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub use kernel::{PROGRAM_COUNTERS, ProgramCounter, ProgramStats};

use crate::auth::SourceKind;
use crate::tunnel::{End, Mode};
use kernel::ProgramCollector;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    mode: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    mode: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    source: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Every `upstream::ConnectError::kind`.
const CONNECT_ERROR_KINDS: [&str; 4] = ["dns", "refused", "timeout", "denied"];

/// Handshake latency buckets, seconds: loopback connects to slow DNS.
const HANDSHAKE_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The proxy's metrics. One per process, shared through an `Arc`.
pub struct Metrics {
    registry: Registry,
    tunnels_active: Family<ModeLabels, Gauge>,
    tunnels: Family<TunnelLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    requests: Family<StatusLabels, Counter>,
    auth_failures: Counter,
    auth_delays: Counter,
    connect_errors: Family<KindLabels, Counter>,
    limit_rejections: Family<LimitLabels, Counter>,
    accept_errors: Family<KindLabels, Counter>,
    credential_reloads: Family<ReloadLabels, Counter>,
    credentials_loaded: Family<SourceLabels, Gauge<f64, AtomicU64>>,
    parent_connects: Family<ResultLabels, Counter>,
    handshake: Histogram,
    /// Registered with the program's counters (sockmap only).
    sockmap_relays: Counter,
    sockmap_detaches: Counter,
    sockmap_rearms: Counter,
    sockmap_spliced_bytes: Counter,
}

impl Metrics {
    /// Metrics for a proxy whose tunnels use `mode`.
    pub fn new(mode: Mode) -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            tunnels_active: Family::default(),
            tunnels: Family::default(),
            bytes: Family::default(),
            requests: Family::default(),
            auth_failures: Counter::default(),
            auth_delays: Counter::default(),
            connect_errors: Family::default(),
            limit_rejections: Family::default(),
            accept_errors: Family::default(),
            credential_reloads: Family::default(),
            credentials_loaded: Family::default(),
            parent_connects: Family::default(),
            handshake: Histogram::new(HANDSHAKE_BUCKETS),
            sockmap_relays: Counter::default(),
            sockmap_detaches: Counter::default(),
            sockmap_rearms: Counter::default(),
            sockmap_spliced_bytes: Counter::default(),
        };
        let mode_s = mode.to_string();
        // Series for the chosen data path exist (at 0) before the first tunnel.
        let _ = m.tunnels_active.get_or_create(&ModeLabels {
            mode: mode_s.clone(),
        });
        for outcome in End::LABELS {
            let _ = m.tunnels.get_or_create(&TunnelLabels {
                mode: mode_s.clone(),
                outcome: outcome.to_string(),
            });
        }
        for direction in ["up", "down"] {
            let _ = m.bytes.get_or_create(&BytesLabels {
                mode: mode_s.clone(),
                direction,
            });
        }
        for kind in CONNECT_ERROR_KINDS {
            let _ = m.connect_errors.get_or_create(&KindLabels { kind });
        }
        for limit in crate::limits::Limit::ALL {
            let _ = m.limit_rejections.get_or_create(&LimitLabels {
                limit: limit.label(),
            });
        }
        for kind in crate::accept_backoff::KINDS {
            let _ = m.accept_errors.get_or_create(&KindLabels { kind });
        }
        for kind in SourceKind::ALL {
            for result in ["ok", "error"] {
                let _ = m.credential_reloads.get_or_create(&ReloadLabels {
                    source: kind.label(),
                    result,
                });
            }
        }
        let mut registry = m.registry;
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "splice_proxy_tunnels_active",
            "Tunnels open now, by data path",
            m.tunnels_active.clone(),
        );
        registry.register(
            "splice_proxy_tunnels",
            "Tunnels that ended, by data path and how they ended",
            m.tunnels.clone(),
        );
        registry.register(
            "splice_proxy_bytes",
            "Bytes forwarded by ended tunnels (up = client to upstream, down = upstream to client)",
            m.bytes.clone(),
        );
        registry.register(
            "splice_proxy_requests",
            "Requests answered, by HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "splice_proxy_auth_failures",
            "Requests refused with 407 (missing, malformed or wrong credentials)",
            m.auth_failures.clone(),
        );
        registry.register(
            "splice_proxy_auth_delays",
            "407s delayed after repeated authentication failures from one address (--auth-fail-delay)",
            m.auth_delays.clone(),
        );
        registry.register(
            "splice_proxy_upstream_connect_errors",
            "Failed upstream connects, by kind (dns, refused, timeout, denied)",
            m.connect_errors.clone(),
        );
        registry.register(
            "splice_proxy_limit_rejections",
            "Connections refused at accept, before their head was read, by limit: 503 at \
             handshakes (--max-handshakes) or per_ip (--max-conns-per-ip), 403 at allow_src \
             (the client address is not in --allow-src)",
            m.limit_rejections.clone(),
        );
        registry.register(
            "splice_proxy_accept_errors",
            "Failed accepts on the proxy listeners, by kind (fd_limit, memory, other)",
            m.accept_errors.clone(),
        );
        registry.register(
            "splice_proxy_credential_reloads",
            "Reloads of a credentials file (SIGHUP or a change on disk), by source (credentials_file, htpasswd, user_dst, parent_credentials) and result (ok, error: the previous users stay)",
            m.credential_reloads.clone(),
        );
        registry.register(
            "splice_proxy_credentials_loaded_timestamp_seconds",
            "Unix time a credentials file was last loaded successfully (at start-up or a reload), by source",
            m.credentials_loaded.clone(),
        );
        registry.register(
            "splice_proxy_parent_connects",
            "Tunnels asked of the parent proxy (--parent-proxy), by result: ok (2xx), refused \
             (another status), unreachable, timeout, protocol (no valid answer)",
            m.parent_connects.clone(),
        );
        registry.register(
            "splice_proxy_handshake_seconds",
            "Time from accept to the 200 written",
            m.handshake.clone(),
        );
        // An info metric is rendered `<name>_info{...} 1`.
        registry.register(
            "splice_proxy",
            "The data path tunnels use",
            Info::new([("mode", mode_s)]),
        );
        Metrics { registry, ..m }
    }

    /// A tunnel starts forwarding; it counts as active until the guard drops.
    pub fn tunnel_opened(&self, mode: Mode) -> ActiveTunnel {
        let gauge = self.tunnels_active.get_or_create_owned(&ModeLabels {
            mode: mode.to_string(),
        });
        gauge.inc();
        ActiveTunnel(gauge)
    }

    /// The 200 has been written, `elapsed` after the accept.
    pub fn handshake_done(&self, elapsed: Duration) {
        self.handshake.observe(elapsed.as_secs_f64());
    }

    /// A request was refused with 407.
    pub fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    /// A 407 was delayed after repeated failures from its address.
    pub fn auth_delayed(&self) {
        self.auth_delays.inc();
    }

    /// Connecting upstream failed; `kind` is `ConnectError::kind`.
    pub fn connect_failed(&self, kind: &'static str) {
        self.connect_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// A connection was refused at accept by `limit` (`Limit::label`).
    pub fn limit_rejected(&self, limit: &'static str) {
        self.limit_rejections
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// An accept on a proxy listener failed; `kind` is `accept_backoff::kind`.
    pub fn accept_failed(&self, kind: &'static str) {
        self.accept_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// A credentials file was loaded successfully, at start-up or a reload.
    pub fn credentials_loaded(&self, source: SourceKind) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.credentials_loaded
            .get_or_create(&SourceLabels {
                source: source.label(),
            })
            .set(now.as_secs_f64());
    }

    /// A reload of a credentials file succeeded (`ok`) or kept the previous
    /// users (`!ok`).
    pub fn credentials_reloaded(&self, source: SourceKind, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.credential_reloads
            .get_or_create(&ReloadLabels {
                source: source.label(),
                result,
            })
            .inc();
        if ok {
            self.credentials_loaded(source);
        }
    }

    /// Every series of `splice_proxy_parent_connects_total`, at 0: a parent is configured.
    pub fn expect_parent(&self) {
        for result in crate::parent::RESULTS {
            let _ = self.parent_connects.get_or_create(&ResultLabels { result });
        }
    }

    /// The parent proxy was asked for a tunnel; `result` is one of [`crate::parent::RESULTS`].
    pub fn parent_connected(&self, result: &'static str) {
        self.parent_connects
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// A request was answered with `status` (200 included).
    pub fn answered(&self, status: u16) {
        self.requests.get_or_create(&StatusLabels { status }).inc();
    }

    /// A tunnel ended with `end` after moving these bytes.
    pub fn tunnel_ended(&self, mode: Mode, end: &End, bytes_up: u64, bytes_down: u64) {
        let mode = mode.to_string();
        self.tunnels
            .get_or_create(&TunnelLabels {
                mode: mode.clone(),
                outcome: end.label().to_string(),
            })
            .inc();
        for (direction, n) in [("up", bytes_up), ("down", bytes_down)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    mode: mode.clone(),
                    direction,
                })
                .inc_by(n);
        }
    }

    /// Adds the sockmap program's global counters (`splice_proxy_sockmap_*_total`, see
    /// [`PROGRAM_COUNTERS`]), read from `stats` at every scrape. For the sockmap data path only:
    /// without this call the families are absent.
    pub fn register_program_stats(&mut self, stats: Arc<dyn ProgramStats>) {
        self.registry
            .register_collector(Box::new(ProgramCollector::new(stats)));
        self.registry.register(
            "splice_proxy_sockmap_relays",
            "Times one direction of a sockmap tunnel overran --sockmap-backlog and the proxy \
             process took over forwarding it (--sockmap-overrun relay), counted when the tunnel \
             ends; its bytes are in splice_proxy_sockmap_held_bytes",
            self.sockmap_relays.clone(),
        );
        self.registry.register(
            "splice_proxy_sockmap_detaches",
            "Times one direction of a sockmap tunnel left the kernel path because its reader fell \
             behind, to be forwarded by splice(2) (--sockmap-overrun splice), counted when the \
             tunnel ends",
            self.sockmap_detaches.clone(),
        );
        self.registry.register(
            "splice_proxy_sockmap_rearms",
            "Times a spliced direction of a sockmap tunnel joined or returned to the kernel path \
             once its reader kept up, counted when the tunnel ends",
            self.sockmap_rearms.clone(),
        );
        self.registry.register(
            "splice_proxy_sockmap_spliced_bytes",
            "Bytes of sockmap tunnels forwarded by splice(2) while a direction was off the kernel \
             path, counted when the tunnel ends (the rest of splice_proxy_bytes_total went through \
             the kernel, or was relayed: splice_proxy_sockmap_held_bytes_total)",
            self.sockmap_spliced_bytes.clone(),
        );
    }

    /// An ended sockmap tunnel's directions left the kernel path `detaches` times, came back
    /// `rearms` times, and spliced `bytes` meanwhile.
    pub fn left_kernel(&self, detaches: u64, rearms: u64, bytes: u64) {
        self.sockmap_detaches.inc_by(detaches);
        self.sockmap_rearms.inc_by(rearms);
        self.sockmap_spliced_bytes.inc_by(bytes);
    }

    /// Directions of an ended sockmap tunnel that were relayed by userspace, `n` times in all.
    pub fn relays_started(&self, n: u64) {
        self.sockmap_relays.inc_by(n);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Counts one tunnel in `splice_proxy_tunnels_active` while it lives.
pub struct ActiveTunnel(Gauge);

impl Drop for ActiveTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::Side;

    pub(super) fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.rsplit_once(' ').filter(|(s, _)| *s == series))
            .map(|(_, v)| v.parse().unwrap())
    }
    #[test]
    fn every_accept_failure_is_counted_by_kind() {
        use std::io;
        let m = Metrics::new(Mode::Copy);
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        for _ in 0..3 {
            m.accept_failed(crate::accept_backoff::kind(&emfile));
        }
        m.accept_failed(crate::accept_backoff::kind(&io::Error::from_raw_os_error(
            libc::ENOBUFS,
        )));
        let text = m.render();
        for (kind, n) in [("fd_limit", 3), ("memory", 1), ("other", 0)] {
            let line = format!("splice_proxy_accept_errors_total{{kind=\"{kind}\"}} {n}\n");
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn names_labels_and_values() {
        let m = Metrics::new(Mode::Splice);
        let t = m.render();
        // Present at zero before anything happened.
        assert_eq!(
            sample(&t, r#"splice_proxy_tunnels_active{mode="splice"}"#),
            Some(0.0)
        );
        for end in End::LABELS {
            let s = format!(r#"splice_proxy_tunnels_total{{mode="splice",outcome="{end}"}}"#);
            assert_eq!(sample(&t, &s), Some(0.0), "{s}\n{t}");
        }
        assert_eq!(sample(&t, r#"splice_proxy_info{mode="splice"}"#), Some(1.0));
        assert_eq!(sample(&t, "splice_proxy_auth_failures_total"), Some(0.0));
        for kind in CONNECT_ERROR_KINDS {
            let s = format!(r#"splice_proxy_upstream_connect_errors_total{{kind="{kind}"}}"#);
            assert_eq!(sample(&t, &s), Some(0.0), "{s}\n{t}");
        }
        assert!(
            t.contains("# TYPE splice_proxy_tunnels_total counter\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE splice_proxy_tunnels_active gauge\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE splice_proxy_handshake_seconds histogram\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE splice_proxy_info gauge\n"), "{t}");

        let active = m.tunnel_opened(Mode::Splice);
        m.handshake_done(Duration::from_millis(3));
        m.answered(200);
        m.answered(407);
        m.answered(407);
        m.auth_failed();
        m.connect_failed("refused");
        let t = m.render();
        assert_eq!(
            sample(&t, r#"splice_proxy_tunnels_active{mode="splice"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, r#"splice_proxy_requests_total{status="200"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, r#"splice_proxy_requests_total{status="407"}"#),
            Some(2.0)
        );
        assert_eq!(sample(&t, "splice_proxy_auth_failures_total"), Some(1.0));
        assert_eq!(
            sample(
                &t,
                r#"splice_proxy_upstream_connect_errors_total{kind="refused"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "splice_proxy_handshake_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, r#"splice_proxy_handshake_seconds_bucket{le="0.0025"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&t, r#"splice_proxy_handshake_seconds_bucket{le="0.005"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, r#"splice_proxy_handshake_seconds_bucket{le="+Inf"}"#),
            Some(1.0)
        );

        for source in ["credentials_file", "htpasswd"] {
            for result in ["ok", "error"] {
                let s = format!(
                    r#"splice_proxy_credential_reloads_total{{source="{source}",result="{result}"}}"#
                );
                assert_eq!(sample(&t, &s), Some(0.0), "{s}\n{t}");
            }
        }
        let loaded = r#"splice_proxy_credentials_loaded_timestamp_seconds{source="htpasswd"}"#;
        assert_eq!(sample(&t, loaded), None, "{t}");
        m.credentials_reloaded(SourceKind::Htpasswd, false);
        let t = m.render();
        assert_eq!(sample(&t, loaded), None, "{t}");
        m.credentials_reloaded(SourceKind::Htpasswd, true);
        m.credentials_reloaded(SourceKind::Htpasswd, true);
        let t = m.render();
        let ok = r#"splice_proxy_credential_reloads_total{source="htpasswd",result="ok"}"#;
        let err = r#"splice_proxy_credential_reloads_total{source="htpasswd",result="error"}"#;
        assert_eq!(sample(&t, ok), Some(2.0), "{t}");
        assert_eq!(sample(&t, err), Some(1.0), "{t}");
        let when = sample(&t, loaded).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(when > now - 60.0 && when <= now, "{when} vs {now}");
        assert!(
            t.contains("# TYPE splice_proxy_credentials_loaded_timestamp_seconds gauge\n"),
            "{t}"
        );

        drop(active);
        let reset = End::Reset {
            side: Side::Upstream,
            error: std::io::ErrorKind::ConnectionReset.into(),
        };
        m.tunnel_ended(Mode::Splice, &reset, 10, 20);
        m.tunnel_ended(Mode::Splice, &End::Closed, 1, 2);
        let t = m.render();
        assert_eq!(
            sample(&t, r#"splice_proxy_tunnels_active{mode="splice"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &t,
                r#"splice_proxy_tunnels_total{mode="splice",outcome="upstream_reset"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                r#"splice_proxy_tunnels_total{mode="splice",outcome="closed"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                r#"splice_proxy_bytes_total{mode="splice",direction="up"}"#
            ),
            Some(11.0)
        );
        assert_eq!(
            sample(
                &t,
                r#"splice_proxy_bytes_total{mode="splice",direction="down"}"#
            ),
            Some(22.0)
        );
    }
}
