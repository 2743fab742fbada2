//! `cargo xtask bench`: splice-proxy's data paths against no proxy, squid and tinyproxy,
//! measured side by side in one run (issue 4).
//!
//! Every target is started once; then each round runs every scenario on every target in turn
//! (interleaved, so drift in the machine's load spreads over all targets alike). Figures are
//! medians over rounds with min/max, and ratios to `direct` from the same run (readerbound and
//! wan, whose rate is set by a slow reader or a shaped link: CPU per GB against `direct` and
//! `splice`).

mod cgroup;
mod load;
mod plausible;
mod readerbound;
mod report;
mod rsync;
mod sys;
mod targets;
mod wan;

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

pub use report::Report;

pub const SCENARIOS: &[&str] = &[
    "stream1",
    "stream8",
    "stream64",
    "handshake",
    "pingpong",
    "pingpong16k",
    "rsync",
    "readerbound",
    "wan",
    "idle",
];

/// What a scenario runs as: itself, or its sub-scenarios (readerbound and wan, one per rate and
/// stream count), each measured and reported on its own.
pub fn sub_scenarios(scenario: &'static str) -> Vec<&'static str> {
    match scenario {
        "readerbound" => readerbound::SPECS.iter().map(|s| s.name).collect(),
        "wan" => wan::SPECS.iter().map(|s| s.name).collect(),
        s => vec![s],
    }
}

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// Short run: small transfers, short timings, one round (under two minutes).
    #[arg(long)]
    pub quick: bool,
    /// Write every figure here as JSON; the SVG chart goes next to it (same name, .svg).
    /// Default: target/bench/bench.json.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Targets, comma-separated: direct, copy, splice, sockmap, squid, tinyproxy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,copy,splice,sockmap,squid,tinyproxy"
    )]
    pub targets: Vec<String>,
    /// Scenarios, comma-separated: stream1, stream8, stream64, handshake, pingpong, pingpong16k,
    /// rsync, readerbound (sink reads at 100 MB/s, 300 MB/s, 1 GB/s; 1 and 8 streams), wan
    /// (client and sink in network namespaces, htb-shaped 1 and 4 Gbit/s link; 1 and 8 streams),
    /// idle; or one sub-scenario by name, e.g. readerbound-300M-8 or wan-4G.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "stream1,stream8,stream64,handshake,pingpong,pingpong16k,rsync,readerbound,\
                         wan,idle"
    )]
    pub scenarios: Vec<String>,
    /// Rounds (default 3, or 1 with --quick).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// MiB per transfer in stream1, stream8 and stream64 (default 2048, or 256 with --quick).
    #[arg(long)]
    pub mib: Option<u64>,
    /// Seconds per handshake and ping-pong measurement (default 3, or 1 with --quick).
    #[arg(long)]
    pub secs: Option<f64>,
    /// Seconds each readerbound and wan transfer takes at its nominal rate, which sets its size
    /// (default 4, or 1 with --quick).
    #[arg(long)]
    pub shaped_secs: Option<f64>,
    /// Idle tunnels to open at once (default 10000, or 200 with --quick); fewer where a proxy
    /// takes no more (its open-file limit: splice needs four fds per tunnel, the others two),
    /// with the count reached and the limit printed.
    #[arg(long)]
    pub idle_tunnels: Option<usize>,
    /// MiB of large files in the rsync tree (default 1024, or 64 with --quick), plus small files
    /// (2000, or 200 with --quick).
    #[arg(long)]
    pub rsync_mib: Option<u64>,
    /// Concurrent clients in the handshake scenario.
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// Extra flag for every splice-proxy target, repeatable, e.g. `--proxy-arg=--idle-timeout
    /// --proxy-arg=30s`.
    #[arg(long, allow_hyphen_values = true)]
    pub proxy_arg: Vec<String>,
    /// Seconds to wait for a proxy to start and pass one CONNECT.
    #[arg(long, default_value_t = 30)]
    pub start_timeout: u64,
}

impl Opts {
    pub fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 1 } else { 3 })
    }
    pub fn bytes(&self) -> u64 {
        self.mib.unwrap_or(if self.quick { 256 } else { 2048 }) << 20
    }
    pub fn dur(&self) -> Duration {
        Duration::from_secs_f64(self.secs.unwrap_or(if self.quick { 1.0 } else { 3.0 }))
    }
    pub fn shaped_secs(&self) -> f64 {
        self.shaped_secs
            .unwrap_or(if self.quick { 1.0 } else { 4.0 })
    }
    pub fn idle_tunnels(&self) -> usize {
        self.idle_tunnels
            .unwrap_or(if self.quick { 200 } else { 10_000 })
    }
    pub fn rsync_tree(&self) -> (u64, usize) {
        let mib = self.rsync_mib.unwrap_or(if self.quick { 64 } else { 1024 });
        (mib, if self.quick { 200 } else { 2000 })
    }
    pub fn json_path(&self) -> PathBuf {
        self.json.clone().unwrap_or_else(|| {
            crate::release_binary()
                .parent()
                .and_then(Path::parent)
                .map(|t| t.join("bench").join("bench.json"))
                .unwrap_or_else(|| PathBuf::from("bench.json"))
        })
    }
}

/// One measurement: metric name → value.
pub type Sample = BTreeMap<&'static str, f64>;

/// The median of a non-empty set of figures (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// What `run` measured, by (scenario, target).
pub struct Outcome {
    pub samples: BTreeMap<(String, String), Vec<Sample>>,
    pub errors: BTreeMap<(String, String), String>,
}

/// One-line progress on a terminal, plain lines otherwise.
struct Progress {
    tty: bool,
    total: usize,
    done: usize,
    started: Instant,
}

impl Progress {
    fn show(&mut self, what: &str) {
        self.done += 1;
        let line = format!(
            "bench [{}/{}] {:>4.0}s  {what}",
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        if self.tty {
            eprint!("\r\x1b[K{line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }
    fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

/// Runs the bench and writes the JSON and SVG; returns the report (also printed by `main`).
pub fn run(opts: &Opts, proxy_bin: &Path) -> Result<Report> {
    for t in &opts.targets {
        if !targets::ALL.contains(&t.as_str()) {
            bail!("unknown target {t:?} (known: {})", targets::ALL.join(", "));
        }
    }
    for s in &opts.scenarios {
        let known = SCENARIOS
            .iter()
            .copied()
            .flat_map(|k| std::iter::once(k).chain(sub_scenarios(k)))
            .any(|k| k == s);
        if !known {
            bail!(
                "unknown scenario {s:?} (known: {}, or one of readerbound's and wan's own, e.g. \
                 readerbound-300M-8)",
                SCENARIOS.join(", ")
            );
        }
    }
    let needs_proxy = opts.targets.iter().any(|t| t != "direct");
    if needs_proxy
        && opts
            .targets
            .iter()
            .any(|t| matches!(t.as_str(), "copy" | "splice" | "sockmap"))
        && !proxy_bin.exists()
    {
        bail!(
            "{} not found: build it first (cargo xtask build) or set SPLICE_PROXY_BIN",
            proxy_bin.display()
        );
    }
    sys::install_signal_handlers();
    sys::raise_nofile();
    targets::sweep_stale();
    cgroup::sweep_stale();
    if cgroup::usable() {
        eprintln!("bench: proxy CPU from each proxy's own cgroup (cpu.stat, microseconds)");
    } else {
        eprintln!(
            "bench: no writable cgroup v2: proxy CPU from /proc/PID/stat, in 10 ms ticks \
             (±0.05 s/GB on 400 MB)"
        );
    }
    wan::sweep_stale();
    eprintln!(
        "bench: load average at start {} (other work on this machine skews every figure)",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let bound = plausible::Bound::measure();
    eprintln!(
        "bench: no transfer here can exceed {:.0} Gbit/s (memory copy, every core, two copies \
         per byte)",
        bound.copy_gbit
    );
    let dir = targets::TempDir::new()?;
    let sink = load::Sink::start()?;
    // Canonical order, whatever order they were asked in.
    let names: Vec<&'static str> = targets::ALL
        .iter()
        .copied()
        .filter(|t| opts.targets.iter().any(|x| x == t))
        .collect();
    // A whole scenario runs all of its sub-scenarios; one may also be asked for by its name.
    let scenarios: Vec<&'static str> = SCENARIOS
        .iter()
        .copied()
        .flat_map(|s| {
            let whole = opts.scenarios.iter().any(|x| x == s);
            sub_scenarios(s)
                .into_iter()
                .filter(move |sub| whole || opts.scenarios.iter().any(|x| x == sub))
        })
        .collect();

    // Before the targets, which listen on its address too; dropped after them.
    let wan = if scenarios.iter().any(|s| wan::spec(s).is_some()) {
        eprintln!("bench: wan namespaces, veths, htb shaper");
        let rig = wan::Rig::start().context("wan scenario set-up")?;
        eprintln!("bench: wan: {}", rig.describe());
        Some(rig)
    } else {
        None
    };

    let mut rig = if scenarios.contains(&"rsync") {
        let (mib, files) = opts.rsync_tree();
        eprintln!("bench: rsync tree ({mib} MiB + {files} small files), stunnel server, rsyncd");
        let rig = rsync::Rig::start(mib, files).context("rsync scenario set-up")?;
        eprintln!(
            "bench: rsync tree is {} files, {:.1} MB",
            rig.files,
            rig.bytes as f64 / 1e6
        );
        Some(rig)
    } else {
        None
    };
    let setup = targets::Setup {
        dir: &dir.0,
        sink: sink.addr,
        proxy_bin,
        patience: Duration::from_secs(opts.start_timeout),
        extra_ports: rig
            .iter()
            .map(|r| r.server_port())
            .chain(wan.iter().map(|w| w.sink.addr.port()))
            .collect(),
        proxy_args: &opts.proxy_arg,
        wan: wan.as_ref().map(|w| (w.proxy_ip(), w.sink_net())),
    };
    let mut running = Vec::new();
    for &name in &names {
        eprintln!("bench: starting {}", targets::label(name));
        running.push(targets::start(name, &setup)?);
    }

    let rounds = opts.rounds();
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        total: rounds * scenarios.len() * names.len(),
        done: 0,
        started: Instant::now(),
    };
    let mut outcome = Outcome {
        samples: BTreeMap::new(),
        errors: BTreeMap::new(),
    };
    for round in 1..=rounds {
        for &scenario in &scenarios {
            for t in running.iter_mut() {
                progress.show(&format!(
                    "round {round}/{rounds}  {scenario:<18}  {}",
                    targets::label(t.name)
                ));
                let key = (scenario.to_string(), t.name.to_string());
                if outcome.errors.contains_key(&key) {
                    continue;
                }
                let measured = if scenario == "rsync" {
                    let rig = rig.as_mut().expect("rsync rig started");
                    rig.push(t).map(|p| {
                        let gb = rig.bytes as f64 / 1e9;
                        let mut s = Sample::new();
                        s.insert("gbit_s", rig.bytes as f64 * 8.0 / p.secs / 1e9);
                        s.insert("total_cpu_s_per_gb", p.total_cpu / gb);
                        if let Some(c) = p.proxy_cpu {
                            s.insert("proxy_cpu_s_per_gb", c / gb);
                        }
                        Some(s)
                    })
                } else if let Some(spec) = wan::spec(scenario) {
                    let rig = wan.as_ref().expect("wan rig started");
                    rig.measure(spec, t, opts.shaped_secs())
                        .map(|r| Some(stream_sample(&r)))
                } else {
                    measure(scenario, t, &sink, opts)
                };
                let measured = measured.and_then(|s| {
                    t.check_alive(&targets::log_path(&dir.0, t.name))?;
                    Ok(s)
                });
                match measured {
                    Ok(Some(sample)) => outcome.samples.entry(key).or_default().push(sample),
                    Ok(None) => {}
                    Err(e) => {
                        progress.finish();
                        eprintln!("bench: {scenario} on {} failed: {e:#}", t.name);
                        outcome.errors.insert(key, format!("{e:#}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    progress.finish();
    drop(running);
    drop(rig);
    drop(wan);

    let report = Report::new(opts, &names, &scenarios, outcome, proxy_bin, bound);
    let json = opts.json_path();
    if let Some(parent) = json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&json, serde_json::to_string_pretty(&report.json())?)
        .with_context(|| format!("write {}", json.display()))?;
    let svg = json.with_extension("svg");
    std::fs::write(&svg, report.svg()).with_context(|| format!("write {}", svg.display()))?;
    eprintln!("bench: wrote {} and {}", json.display(), svg.display());
    Ok(report)
}

/// Gbit/s and CPU per GB of one transfer.
fn stream_sample(r: &load::StreamResult) -> Sample {
    let mut s = Sample::new();
    let gb = r.bytes as f64 / 1e9;
    s.insert("gbit_s", r.bytes as f64 * 8.0 / r.secs / 1e9);
    s.insert("total_cpu_s_per_gb", r.total_cpu / gb);
    if let Some(p) = r.proxy_cpu {
        s.insert("proxy_cpu_s_per_gb", p / gb);
    }
    s
}

fn measure(
    scenario: &str,
    t: &targets::Running,
    sink: &load::Sink,
    opts: &Opts,
) -> Result<Option<Sample>> {
    let mut s = Sample::new();
    match scenario {
        "stream1" | "stream8" | "stream64" => {
            let n = scenario["stream".len()..].parse().expect("streamN");
            let r = load::stream(&t.endpoint, sink.addr, opts.bytes(), n, t.pid())?;
            s = stream_sample(&r);
        }
        name if readerbound::spec(name).is_some() => {
            let spec = readerbound::spec(name).expect("readerbound spec");
            let per = readerbound::bytes_per_stream(spec.rate, spec.streams, opts.shaped_secs());
            let rate = spec.rate / spec.streams as u64;
            let r = load::paced_stream(&t.endpoint, sink.addr, per, spec.streams, rate, t.pid())?;
            s = stream_sample(&r);
        }
        "handshake" => {
            let r = load::handshakes(&t.endpoint, sink.addr, opts.clients, opts.dur())?;
            s.insert("per_s", r.rate());
            s.insert("p50_ms", r.pct(0.50) / 1000.0);
            s.insert("p99_ms", r.pct(0.99) / 1000.0);
            s.insert("errors", r.errors as f64);
        }
        "pingpong" | "pingpong16k" => {
            let size = if scenario == "pingpong" { 1 } else { 16 * 1024 };
            let r = load::ping_pong(&t.endpoint, sink.addr, size, opts.dur())?;
            s.insert("per_s", r.rate());
            s.insert("p50_us", r.pct(0.50));
            s.insert("p99_us", r.pct(0.99));
        }
        "idle" => {
            // No proxy process to weigh for direct.
            let Some(pid) = t.pid() else { return Ok(None) };
            let r = load::idle(&t.endpoint, sink, opts.idle_tunnels(), pid)?;
            let limit = r.fd_limit.map_or("unknown".into(), |l| l.to_string());
            match &r.stopped {
                Some(why) => eprintln!(
                    "bench: idle on {}: {} tunnels, then the proxy took no more (its open-file \
                     limit: {limit}): {why}",
                    t.name, r.tunnels
                ),
                None => eprintln!(
                    "bench: idle on {}: {} tunnels (the proxy's open-file limit: {limit})",
                    t.name, r.tunnels
                ),
            }
            s.insert("tunnels", r.tunnels as f64);
            if let Some(l) = r.fd_limit {
                s.insert("fd_limit", l as f64);
            }
            s.insert("rss_kib_per_tunnel", r.rss_kib_per_tunnel);
            s.insert("tcp_mem_kib_per_tunnel", r.tcp_mem_kib_per_tunnel);
            s.insert("slab_kib_per_tunnel", r.slab_kib_per_tunnel);
        }
        other => bail!("unknown scenario {other}"),
    }
    Ok(Some(s))
}

#[cfg(test)]
mod smoke {
    //! The harness works end to end on the smallest sizes. Nothing timed is asserted.

    use super::*;

    #[test]
    fn bench_smoke() {
        let targets: Vec<String> = std::env::var("SPLICE_BENCH_SMOKE_TARGETS")
            .unwrap_or_else(|_| "direct,copy,splice,squid,tinyproxy".into())
            .split(',')
            .map(str::to_string)
            .collect();
        let dir = targets::TempDir::new().unwrap();
        let json = dir.0.join("smoke.json");
        let opts = Opts {
            quick: true,
            json: Some(json.clone()),
            targets: targets.clone(),
            scenarios: SCENARIOS.iter().map(|s| s.to_string()).collect(),
            rounds: Some(1),
            mib: Some(8),
            rsync_mib: Some(4),
            secs: Some(0.2),
            shaped_secs: Some(0.1),
            idle_tunnels: Some(20),
            clients: 8,
            proxy_arg: Vec::new(),
            // Slow starts are tolerated; a proxy that never works fails the test.
            start_timeout: 45,
        };
        let bin = std::env::var_os("SPLICE_PROXY_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(crate::release_binary);
        let report = run(&opts, &bin).expect("bench ran");
        assert!(report.text().contains("stream1"));

        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(json.with_extension("svg").exists());
        let results = v["results"].as_array().expect("results array");
        for t in &targets {
            for s in SCENARIOS.iter().flat_map(|&s| sub_scenarios(s)) {
                if s == "idle" && t == "direct" {
                    continue;
                }
                let r = results
                    .iter()
                    .find(|r| r["target"] == t.as_str() && r["scenario"] == s)
                    .unwrap_or_else(|| panic!("no result for {t} × {s}"));
                assert!(r["error"].is_null(), "{t} × {s}: {}", r["error"]);
                let m = r["metrics"].as_object().expect("metrics");
                let main = match s {
                    "stream1" | "stream8" | "stream64" | "rsync" => "gbit_s",
                    s if s.starts_with("readerbound-") || s.starts_with("wan-") => "gbit_s",
                    "handshake" | "pingpong" | "pingpong16k" => "per_s",
                    _ => "tunnels",
                };
                let median = m[main]["median"].as_f64().unwrap_or(0.0);
                assert!(median > 0.0, "{t} × {s}: {main} = {median}");
            }
        }
    }
}
