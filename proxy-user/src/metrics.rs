//! Prometheus metrics: the registry, the recording functions the connection
//! path calls, and the small HTTP endpoint `--metrics-listen` serves
//! (`/metrics`, `/healthz`, `/readyz`).
//!
//! The values are kept by `prometheus-client` and rendered in the Prometheus
//! text format (0.0.4). Recording is always on; the endpoint only when asked.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::SourceKind;
use crate::ebpf::{KernelStats, Stats};
use crate::tunnel::{End, Mode};

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
        self.registry.register_collector(Box::new(ProgramCollector {
            stats,
            failing: AtomicBool::new(false),
        }));
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
            "Times a spliced direction of a sockmap tunnel returned to the kernel path once its \
             reader kept up, counted when the tunnel ends",
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

// ------------------------------------------------- eBPF program counters ----

/// Where the sockmap program's global counters are read from at scrape time.
pub trait ProgramStats: fmt::Debug + Send + Sync + 'static {
    /// The counters now, summed over all CPUs; `Err` is one line for the log.
    fn snapshot(&self) -> Result<Stats, String>;
}

impl ProgramStats for KernelStats {
    fn snapshot(&self) -> Result<Stats, String> {
        self.read().map_err(|e| e.to_string())
    }
}

/// One family rendered from the program's [`Stats`]: its name without `_total` (the encoder
/// appends it to counters), its help, and the field it shows.
pub struct ProgramCounter {
    pub name: &'static str,
    pub help: &'static str,
    pub value: fn(&Stats) -> u64,
}

/// The program's global counters as Prometheus counters. They count from the moment the program
/// was loaded, so the start-up self-check's tunnels are in them too.
pub const PROGRAM_COUNTERS: [ProgramCounter; 9] = [
    ProgramCounter {
        name: "splice_proxy_sockmap_redirected_bytes",
        help: "Bytes the sockmap eBPF program forwarded from a tunnel socket straight to its peer \
               inside the kernel, never copied through the proxy process",
        value: |s| s.redirected_bytes,
    },
    ProgramCounter {
        name: "splice_proxy_sockmap_redirected_segments",
        help: "Socket buffers (one or more TCP segments each) the sockmap program forwarded to the \
               peer socket; redirected bytes divided by this is the average batch",
        value: |s| s.redirected_segments,
    },
    ProgramCounter {
        name: "splice_proxy_sockmap_passed_bytes",
        help: "Bytes the sockmap program left on the receiving socket because it found no peer \
               socket to forward them to; expected to stay near 0 (both peers are registered \
               before either socket is armed)",
        value: |s| s.passed_bytes,
    },
    ProgramCounter {
        name: "splice_proxy_sockmap_passed_segments",
        help: "Socket buffers the sockmap program left on the receiving socket for want of a peer \
               (see passed_bytes)",
        value: |s| s.passed_segments,
    },
    ProgramCounter {
        name: "splice_proxy_sockmap_held_bytes",
        help: "Bytes held for userspace by backpressure: a reader fell --sockmap-backlog behind, so \
               the program left them on the sending side and the proxy process forwarded them once \
               the reader drained, or while it relayed the direction; a growing share of the redirected bytes means slow readers \
               and more proxy CPU",
        value: |s| s.held_bytes,
    },
    ProgramCounter {
        name: "splice_proxy_sockmap_hold_episodes",
        help: "Backpressure episodes: times one direction of a tunnel started holding because its \
               reader was --sockmap-backlog behind",
        value: |s| s.holds,
    },
    ProgramCounter {
        name: "splice_proxy_sockmap_trimmed_bytes",
        help: "Bytes cut from the front of retransmitted TCP segments that overlapped bytes \
               already forwarded, so the peer never receives them twice",
        value: |s| s.trimmed_bytes,
    },
    ProgramCounter {
        name: "splice_proxy_sockmap_trims",
        help: "Retransmitted TCP segments that overlapped bytes already forwarded and were cut \
               (see trimmed_bytes); a steady rise points at packet loss on the client or upstream \
               side",
        value: |s| s.trims,
    },
    ProgramCounter {
        name: "splice_proxy_sockmap_lost_wakeups",
        help: "Wake-ups for held bytes the sockmap program could not queue because the holds ring \
               buffer was full; each time, the proxy wakes every tunnel to look for held bytes. \
               Expected to stay 0",
        value: |s| s.lost_wakeups,
    },
];

/// Renders [`PROGRAM_COUNTERS`] from one read of the program's counters at each scrape. A read
/// that fails leaves these families out of that scrape (the rest of `/metrics` is unaffected)
/// and logs one warning until a read succeeds again.
#[derive(Debug)]
struct ProgramCollector {
    stats: Arc<dyn ProgramStats>,
    /// The last read failed (and the warning for it was logged).
    failing: AtomicBool,
}

impl Collector for ProgramCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let stats = match self.stats.snapshot() {
            Ok(stats) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("/metrics: the sockmap program's counters are readable again");
                }
                stats
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "/metrics: reading the sockmap program's counters failed, leaving \
                         splice_proxy_sockmap_* out until they read again: {e}"
                    );
                }
                return Ok(());
            }
        };
        for family in &PROGRAM_COUNTERS {
            let counter = ConstCounter::new((family.value)(&stats));
            let metric =
                encoder.encode_descriptor(family.name, family.help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------ endpoint ----

/// Largest request head the endpoint reads.
const MAX_HEAD: usize = 8 * 1024;
/// Time one endpoint connection may take, request and response.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);
/// Endpoint connections served at once; more are closed at accept.
const MAX_CONNS: usize = 64;

/// Binds the endpoint's listener; an error names the flag.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)
        .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
    Ok(sock.listen(64)?)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the
/// process exits (it keeps answering during the shutdown drain).
///
/// Start it once the proxy listeners are bound and the data path is chosen:
/// `/readyz` is 200 from then on, and 503 as soon as `stopping` fires.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stopping: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            // EMFILE and friends: the proxy's accept loop logs them.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed
        };
        let (metrics, stopping) = (metrics.clone(), stopping.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONN_TIMEOUT, answer(conn, &metrics, &stopping)).await;
            drop(permit);
        });
    }
}

/// Reads one request, writes one response, closes.
async fn answer(mut conn: TcpStream, metrics: &Metrics, stopping: &CancellationToken) {
    let response = match read_head(&mut conn).await {
        Ok(Some((method, path))) => route(&method, &path, metrics, stopping),
        Ok(None) => return, // closed before a complete head
        Err(status) => Response::text(status, ""),
    };
    if conn.write_all(&response.to_bytes()).await.is_ok() {
        let _ = conn.shutdown().await;
    }
}

/// The method and path of a request head; `Err` is the status to answer.
async fn read_head(conn: &mut TcpStream) -> Result<Option<(String, String)>, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                return Ok(Some((method, path)));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(431),
            Err(httparse::Error::TooManyHeaders) => return Err(431),
            Err(_) => return Err(400),
        }
    }
}

fn route(method: &str, path: &str, metrics: &Metrics, stopping: &CancellationToken) -> Response {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return Response::text(404, "not found\n");
    }
    if method != "GET" {
        return Response {
            allow_get: true,
            ..Response::text(405, "method not allowed\n")
        };
    }
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: prometheus_text::CONTENT_TYPE,
            body: metrics.render(),
            allow_get: false,
        },
        "/healthz" => Response::text(200, "ok\n"),
        _ if stopping.is_cancelled() => Response::text(503, "shutting down\n"),
        _ => Response::text(200, "ready\n"),
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    allow_get: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
            allow_get: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let allow = if self.allow_get { "Allow: GET\r\n" } else { "" };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::Side;

    fn sample(text: &str, series: &str) -> Option<f64> {
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

    /// Program counters that tests set: `None` makes the next reads fail.
    #[derive(Debug, Default)]
    struct FakeStats(std::sync::Mutex<Option<Stats>>);

    impl ProgramStats for FakeStats {
        fn snapshot(&self) -> Result<Stats, String> {
            self.0.lock().unwrap().ok_or_else(|| "map gone".to_string())
        }
    }

    /// Every field different, so a family showing the wrong field is caught.
    const DISTINCT: Stats = Stats {
        redirected_bytes: 1_000_000_007,
        redirected_segments: 11,
        passed_bytes: 13,
        passed_segments: 17,
        held_bytes: 19_000,
        holds: 23,
        trimmed_bytes: 29,
        trims: 31,
        lost_wakeups: 41,
    };

    /// Whether `text` shows any family read from the program.
    fn program_families(text: &str) -> bool {
        text.lines()
            .any(|l| PROGRAM_COUNTERS.iter().any(|f| l.starts_with(f.name)))
    }

    #[test]
    fn program_counters_render_each_field() {
        let fake = Arc::new(FakeStats(std::sync::Mutex::new(Some(DISTINCT))));
        let mut m = Metrics::new(Mode::Sockmap);
        assert!(
            !m.render().contains("splice_proxy_sockmap_"),
            "not registered yet"
        );
        m.register_program_stats(fake.clone());
        m.relays_started(2);
        m.relays_started(0);
        m.relays_started(35);
        m.left_kernel(3, 2, 1_000);
        m.left_kernel(4, 4, 24);
        let t = m.render();
        let want = [
            (
                "splice_proxy_sockmap_redirected_bytes_total",
                1_000_000_007.0,
            ),
            ("splice_proxy_sockmap_redirected_segments_total", 11.0),
            ("splice_proxy_sockmap_passed_bytes_total", 13.0),
            ("splice_proxy_sockmap_passed_segments_total", 17.0),
            ("splice_proxy_sockmap_held_bytes_total", 19_000.0),
            ("splice_proxy_sockmap_hold_episodes_total", 23.0),
            ("splice_proxy_sockmap_trimmed_bytes_total", 29.0),
            ("splice_proxy_sockmap_trims_total", 31.0),
            ("splice_proxy_sockmap_lost_wakeups_total", 41.0),
            // Kept by userspace, registered with the program's counters.
            ("splice_proxy_sockmap_relays_total", 37.0),
            ("splice_proxy_sockmap_detaches_total", 7.0),
            ("splice_proxy_sockmap_rearms_total", 6.0),
            ("splice_proxy_sockmap_spliced_bytes_total", 1_024.0),
        ];
        for (name, value) in want {
            assert_eq!(sample(&t, name), Some(value), "{name}\n{t}");
            assert!(
                t.contains(&format!("# TYPE {name} counter\n")),
                "{name}\n{t}"
            );
            assert!(t.contains(&format!("# HELP {name} ")), "{name}\n{t}");
        }
        assert_eq!(
            t.lines()
                .filter(|l| l.starts_with("splice_proxy_sockmap_"))
                .count(),
            want.len(),
            "{t}"
        );
        // Read at scrape time, not at registration.
        *fake.0.lock().unwrap() = Some(Stats {
            redirected_bytes: 5,
            ..DISTINCT
        });
        let t = m.render();
        assert_eq!(
            sample(&t, "splice_proxy_sockmap_redirected_bytes_total"),
            Some(5.0)
        );
    }

    /// A failed read leaves the families out of that scrape, keeps everything else, and warns once
    /// per run of failures.
    #[test]
    fn program_counters_read_failure_skips_them_and_warns_once() {
        use std::io::Write;

        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let log = log.clone();
                move || log.clone()
            })
            .with_ansi(false)
            .finish();
        let lines = |level: &str| {
            String::from_utf8(log.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .filter(|l| l.contains(level))
                .count()
        };

        let fake = Arc::new(FakeStats::default());
        let mut m = Metrics::new(Mode::Sockmap);
        m.register_program_stats(fake.clone());
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                let t = m.render();
                assert!(!program_families(&t), "{t}");
                assert_eq!(sample(&t, "splice_proxy_sockmap_relays_total"), Some(0.0));
                assert_eq!(
                    sample(&t, r#"splice_proxy_info{mode="sockmap"}"#),
                    Some(1.0)
                );
                assert_eq!(
                    sample(&t, r#"splice_proxy_tunnels_active{mode="sockmap"}"#),
                    Some(0.0)
                );
            }
            assert_eq!(lines("WARN"), 1, "one warning for three failed scrapes");

            *fake.0.lock().unwrap() = Some(DISTINCT);
            let t = m.render();
            assert_eq!(sample(&t, "splice_proxy_sockmap_trims_total"), Some(31.0));
            assert_eq!(lines("INFO"), 1, "recovery logged");

            *fake.0.lock().unwrap() = None;
            assert!(!program_families(&m.render()));
            assert!(!program_families(&m.render()));
            assert_eq!(lines("WARN"), 2, "a new run of failures warns again");
        });
    }

    async fn endpoint() -> (SocketAddr, CancellationToken) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stopping = CancellationToken::new();
        let metrics = Arc::new(Metrics::new(Mode::Copy));
        tokio::spawn(serve(listener, metrics, stopping.clone()));
        (addr, stopping)
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    fn status_line(response: &str) -> &str {
        response.lines().next().unwrap_or_default()
    }

    #[tokio::test]
    async fn endpoint_routes() {
        let (addr, stopping) = endpoint().await;
        let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = exchange(addr, get("/metrics").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("Connection: close\r\n"), "{r}");
        assert!(r.contains("\r\n\r\n# HELP "), "{r}");
        assert!(r.contains(r#"splice_proxy_info{mode="copy"} 1"#), "{r}");
        let r = exchange(addr, get("/healthz").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
        assert!(r.ends_with("\r\n\r\nok\n"), "{r}");
        let r = exchange(addr, get("/readyz").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
        let r = exchange(addr, get("/").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 404 Not Found");
        let r = exchange(addr, get("/metricsx").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 404 Not Found");
        let r = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 405 Method Not Allowed");
        assert!(r.contains("Allow: GET\r\n"), "{r}");
        let r = exchange(addr, b"\x16\x03\x01 not http\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 400 Bad Request");
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        let r = exchange(addr, huge.as_bytes()).await;
        assert_eq!(
            status_line(&r),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        // Split across writes.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /heal").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write_all(b"thz HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert_eq!(status_line(&out), "HTTP/1.1 200 OK");

        stopping.cancel();
        let r = exchange(addr, get("/readyz").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 503 Service Unavailable");
        let r = exchange(addr, get("/healthz").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn silent_or_slow_clients_do_not_hold_the_endpoint() {
        let (addr, _stopping) = endpoint().await;
        // Closing without a request gets no response.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.shutdown().await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty());
        // A silent client is closed at the connection timeout.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty());
        assert!(started.elapsed() >= CONN_TIMEOUT - Duration::from_millis(100));
    }
}
