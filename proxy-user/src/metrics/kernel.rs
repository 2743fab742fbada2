//! The sockmap program's global counters on `/metrics`: read from the kernel (summed over
//! CPUs) at every scrape, never copied into the registry. For the sockmap data path only.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

use crate::ebpf::{KernelStats, Stats};

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
pub(super) struct ProgramCollector {
    stats: Arc<dyn ProgramStats>,
    /// The last read failed (and the warning for it was logged).
    failing: AtomicBool,
}

impl ProgramCollector {
    pub(super) fn new(stats: Arc<dyn ProgramStats>) -> ProgramCollector {
        ProgramCollector {
            stats,
            failing: AtomicBool::new(false),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::metrics::tests::sample;
    use crate::tunnel::Mode;

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
}
