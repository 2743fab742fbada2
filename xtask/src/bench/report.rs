//! Medians, ratios to direct, and the three outputs: terminal/markdown table, JSON, SVG.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::plausible::{self, Bound};
use super::{Opts, Outcome, Sample, median, readerbound, targets, wan};

/// median, min, max
#[derive(Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

fn stat(values: &[f64]) -> Stat {
    Stat {
        median: median(values),
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// Metrics shown per scenario, in order: (key, column title, decimals).
fn columns(scenario: &str) -> &'static [(&'static str, &'static str, usize)] {
    match scenario {
        "stream1" | "stream8" | "stream64" | "rsync" => &[
            ("gbit_s", "Gbit/s", 1),
            ("total_cpu_s_per_gb", "total CPU s/GB", 2),
            ("proxy_cpu_s_per_gb", "proxy CPU s/GB", 2),
        ],
        "handshake" => &[
            ("per_s", "handshakes/s", 0),
            ("p50_ms", "p50 ms", 2),
            ("p99_ms", "p99 ms", 2),
            ("errors", "errors", 0),
        ],
        "pingpong" | "pingpong16k" => &[
            ("per_s", "transactions/s", 0),
            ("p50_us", "p50 µs", 0),
            ("p99_us", "p99 µs", 0),
        ],
        "idle" => &[
            ("tunnels", "tunnels", 0),
            ("rss_kib_per_tunnel", "proxy RSS KiB/tunnel", 2),
            ("tcp_mem_kib_per_tunnel", "kernel TCP mem KiB/tunnel", 2),
            ("slab_kib_per_tunnel", "kernel slab KiB/tunnel (host)", 2),
        ],
        s if is_shaped(s) => &[
            ("gbit_s", "Gbit/s", 2),
            ("proxy_cpu_s_per_gb", "proxy CPU s/GB", 2),
            ("total_cpu_s_per_gb", "total CPU s/GB", 2),
        ],
        _ => &[],
    }
}

/// readerbound and wan sub-scenarios: their CPU figures are compared with both direct and
/// splice.
fn is_shaped(scenario: &str) -> bool {
    readerbound::spec(scenario).is_some() || wan::spec(scenario).is_some()
}

/// `t / reference`, if both were measured and the reference is not zero.
pub fn ratio(t: Option<f64>, reference: Option<f64>) -> Option<f64> {
    let (t, r) = (t?, reference?);
    (r != 0.0 && r.is_finite() && t.is_finite()).then(|| t / r)
}

fn streams(n: usize) -> String {
    if n == 1 {
        "1 stream".into()
    } else {
        format!("{n} parallel streams")
    }
}

fn title(scenario: &str, opts: &Opts) -> String {
    let mib = opts.bytes() >> 20;
    if let Some(sp) = readerbound::spec(scenario) {
        let per = readerbound::bytes_per_stream(sp.rate, sp.streams, opts.shaped_secs());
        let each = if sp.streams > 1 {
            format!(
                " ({:.1} MB/s each)",
                sp.rate as f64 / sp.streams as f64 / 1e6
            )
        } else {
            String::new()
        };
        return format!(
            "{}, client pushes as fast as it can, sink reads {} MB/s in total{each} in {} KiB \
             reads, SO_RCVBUF {} KiB; {:.0} MB in total",
            streams(sp.streams),
            sp.rate / 1_000_000,
            readerbound::READ_SIZE / 1024,
            readerbound::RCVBUF / 1024,
            (per * sp.streams as u64) as f64 / 1e6
        );
    }
    if let Some(sp) = wan::spec(scenario) {
        return format!(
            "{}, client netns → target (root netns) → veth shaped by htb to {} Gbit/s → sink \
             netns; {:.0} MB in total (direct: forwarded by the root netns)",
            streams(sp.streams),
            sp.bits / 1_000_000_000,
            wan::total_bytes(sp.bits, sp.streams, opts.shaped_secs()) as f64 / 1e6
        );
    }
    match scenario {
        "stream1" => format!("1 stream, {mib} MiB client → sink"),
        "stream8" => format!("8 parallel streams, {mib} MiB in total"),
        "stream64" => format!("64 parallel streams, {mib} MiB in total"),
        "rsync" => {
            let (m, f) = opts.rsync_tree();
            format!(
                "rsync push, {m} MiB large files + {f} small files, through stunnel client → \
                 target → stunnel server → rsyncd"
            )
        }
        "handshake" => format!(
            "CONNECT handshakes, {} concurrent clients, {:.1} s (direct: TCP connect only)",
            opts.clients,
            opts.dur().as_secs_f64()
        ),
        "pingpong" => format!(
            "1-byte ping-pong on one tunnel, {:.1} s",
            opts.dur().as_secs_f64()
        ),
        "pingpong16k" => format!(
            "16 KiB ping-pong on one tunnel, {:.1} s",
            opts.dur().as_secs_f64()
        ),
        "idle" => format!(
            "up to {} idle tunnels, fewer where a proxy's open-file limit stops it (RSS growth \
             of the proxy process; kernel TCP memory is host-wide)",
            opts.idle_tunnels()
        ),
        _ => scenario.to_string(),
    }
}

pub struct Report {
    targets: Vec<&'static str>,
    scenarios: Vec<&'static str>,
    outcome: Outcome,
    titles: Vec<String>,
    options: Value,
    proxy_binary: String,
    /// Figures that cannot be true (`plausible.rs`); the run fails when there are any.
    implausible: Vec<String>,
    bound: Bound,
}

impl Report {
    pub fn new(
        opts: &Opts,
        targets: &[&'static str],
        scenarios: &[&'static str],
        outcome: Outcome,
        proxy_binary: &std::path::Path,
        bound: Bound,
    ) -> Report {
        Report {
            implausible: plausible::implausible(&outcome.samples, bound),
            bound,
            proxy_binary: proxy_binary.display().to_string(),
            targets: targets.to_vec(),
            scenarios: scenarios.to_vec(),
            titles: scenarios.iter().map(|s| title(s, opts)).collect(),
            outcome,
            options: json!({
                "quick": opts.quick,
                "rounds": opts.rounds(),
                "bytes_per_transfer": opts.bytes(),
                "seconds_per_timed_scenario": opts.dur().as_secs_f64(),
                "idle_tunnels": opts.idle_tunnels(),
                "handshake_clients": opts.clients,
                "shaped_seconds": opts.shaped_secs(),
                "readerbound": {
                    "read_size": readerbound::READ_SIZE,
                    "so_rcvbuf": readerbound::RCVBUF,
                    "burst": readerbound::BURST,
                    "rate_is": "sink's total bytes/s (1e6 = MB), split evenly over the streams",
                },
                "wan": "client netns -> target in root netns -> veth with htb root qdisc \
                        (rate = ceil) -> sink netns; direct is forwarded by the root netns",
            }),
        }
    }

    fn samples(&self, scenario: &str, target: &str) -> &[Sample] {
        self.outcome
            .samples
            .get(&(scenario.to_string(), target.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn stat(&self, scenario: &str, target: &str, metric: &str) -> Option<Stat> {
        let v: Vec<f64> = self
            .samples(scenario, target)
            .iter()
            .filter_map(|s| s.get(metric).copied())
            .collect();
        (!v.is_empty()).then(|| stat(&v))
    }

    /// What a scenario's ratio column compares against: direct, except for handshakes, whose
    /// goal is stated against squid (direct there is a bare TCP connect).
    fn reference(&self, scenario: &str) -> &'static str {
        if scenario == "handshake" && self.targets.contains(&"squid") {
            "squid"
        } else {
            "direct"
        }
    }

    /// The ratio columns after a metric's column. readerbound and wan: CPU figures against
    /// direct and splice (those of them in the run), none for Gbit/s (the rate is set by the
    /// sink or the link). Other scenarios: every metric against `reference`.
    fn ratio_refs(&self, scenario: &str, metric: &str) -> Vec<&'static str> {
        if is_shaped(scenario) {
            if metric == "gbit_s" {
                return Vec::new();
            }
            return ["direct", "splice"]
                .into_iter()
                .filter(|r| self.targets.contains(r))
                .collect();
        }
        vec![self.reference(scenario)]
    }

    fn vs(&self, reference: &str, scenario: &str, target: &str, metric: &str) -> Option<f64> {
        ratio(
            self.stat(scenario, target, metric).map(|s| s.median),
            self.stat(scenario, reference, metric).map(|s| s.median),
        )
    }

    fn error(&self, scenario: &str, target: &str) -> Option<&String> {
        self.outcome
            .errors
            .get(&(scenario.to_string(), target.to_string()))
    }

    pub fn json(&self) -> Value {
        let mut results = Vec::new();
        for &s in &self.scenarios {
            for &t in &self.targets {
                let mut metrics = serde_json::Map::new();
                for &(m, _, _) in columns(s) {
                    if let Some(st) = self.stat(s, t, m) {
                        metrics.insert(
                            m.to_string(),
                            json!({
                                "median": st.median, "min": st.min, "max": st.max,
                                "vs_direct": self.vs("direct", s, t, m),
                                "vs_squid": self.vs("squid", s, t, m),
                                "vs_splice": self.vs("splice", s, t, m),
                            }),
                        );
                    }
                }
                if let Some(st) = self.stat(s, t, "tunnels") {
                    metrics.insert("tunnels".into(), json!({"median": st.median}));
                }
                let samples = self.samples(s, t);
                if samples.is_empty() && self.error(s, t).is_none() {
                    continue; // not applicable (idle on direct)
                }
                results.push(json!({
                    "scenario": s,
                    "target": t,
                    "label": targets::label(t),
                    "metrics": metrics,
                    "samples": samples,
                    "error": self.error(s, t),
                }));
            }
        }
        json!({
            "machine": machine(),
            "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "proxy_binary": self.proxy_binary,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "options": self.options,
            "memory_copy_bound_gbit_s": self.bound.copy_gbit,
            "implausible": self.implausible,
            "cpu_note": "total CPU = the time all CPUs were not idle: wall time x CPUs - idle - \
                         iowait - steal from /proc/stat, whose idle time is measured at idle entry \
                         and exit while its busy fields are tick samples that miss short wake-ups \
                         (client, sink and proxy included); proxy CPU = user+system time of the \
                         proxy process and its children, from its own cgroup v2 (cpu.stat, µs) where \
                         the bench can make one, else utime+stime from /proc/PID/stat (10 ms \
                         ticks); GB = 1e9 bytes",
            "results": results,
        })
    }

    /// The project's goals, checked against this run's medians for the default data path
    /// (auto = sockmap where the eBPF program loads, as on the machines this bench runs on).
    pub fn goals(&self) -> String {
        let mut out = String::from(
            "\n### goals (default data path = sockmap; medians of this run)\n\n\
             | goal | measured | met |\n|---|---:|---|\n",
        );
        let mut line = |goal: &str, v: Option<f64>, unit: &str, ok: fn(f64) -> bool| {
            let (m, met) = match v {
                Some(v) => (format!("{v:.2}{unit}"), if ok(v) { "yes" } else { "no" }),
                None => ("not measured".to_string(), "–"),
            };
            let _ = writeln!(out, "| {goal} | {m} | {met} |");
        };
        line(
            "1-stream throughput ≥ 0.8× direct",
            self.vs("direct", "stream1", "sockmap", "gbit_s"),
            "×",
            |v| v >= 0.8,
        );
        line(
            "1-stream total CPU/GB ≤ 1.15× direct",
            self.vs("direct", "stream1", "sockmap", "total_cpu_s_per_gb"),
            "×",
            |v| v <= 1.15,
        );
        line(
            "handshakes/s ≥ 3× squid",
            self.vs("squid", "handshake", "sockmap", "per_s"),
            "×",
            |v| v >= 3.0,
        );
        line(
            "userspace memory ≤ 4 KB per idle tunnel",
            self.stat("idle", "sockmap", "rss_kib_per_tunnel")
                .map(|s| s.median * 1.024),
            " KB",
            |v| v <= 4.0,
        );
        line(
            "rsync path ≥ 1.3× squid",
            self.vs("squid", "rsync", "sockmap", "gbit_s"),
            "×",
            |v| v >= 1.3,
        );
        out
    }

    /// Markdown tables (readable on a terminal too).
    pub fn text(&self) -> String {
        let mut out = String::new();
        if !self.implausible.is_empty() {
            let _ = writeln!(
                out,
                "\n**NOT RESULTS: this run measured figures that cannot be true; do not publish \
                 them.**\n"
            );
            for f in &self.implausible {
                let _ = writeln!(out, "- {f}");
            }
        }
        for (i, &s) in self.scenarios.iter().enumerate() {
            let _ = writeln!(out, "\n### {s}: {}\n", self.titles[i]);
            let cols = columns(s);
            let mut head = String::from("| target |");
            let mut rule = String::from("|---|");
            for &(m, name, _) in cols {
                let _ = write!(head, " {name} |");
                rule.push_str("---:|");
                for r in self.ratio_refs(s, m) {
                    let _ = write!(head, " ×{r} |");
                    rule.push_str("---:|");
                }
            }
            let _ = writeln!(out, "{head}\n{rule}");
            for &t in &self.targets {
                if let Some(e) = self.error(s, t) {
                    let first = e.lines().next().unwrap_or("");
                    let _ = writeln!(out, "| {} | failed: {first} |", targets::label(t));
                    continue;
                }
                if self.samples(s, t).is_empty() {
                    continue;
                }
                let mut row = format!("| {} |", targets::label(t));
                for &(m, _, dec) in cols {
                    match self.stat(s, t, m) {
                        Some(st) if st.min != st.max => {
                            let _ = write!(
                                row,
                                " {:.dec$} ({:.dec$}–{:.dec$}) |",
                                st.median, st.min, st.max
                            );
                        }
                        Some(st) => {
                            let _ = write!(row, " {:.dec$} |", st.median);
                        }
                        None => row.push_str(" – |"),
                    }
                    for reference in self.ratio_refs(s, m) {
                        match self.vs(reference, s, t, m) {
                            Some(r) if t != reference && m != "errors" && s != "idle" => {
                                let _ = write!(row, " {r:.2}× |");
                            }
                            // No proxy process in direct: nothing to compare proxy CPU with.
                            None if is_shaped(s) && t != reference => row.push_str(" – |"),
                            _ => row.push_str(" |"),
                        }
                    }
                }
                let _ = writeln!(out, "{row}");
            }
            if is_shaped(s) {
                out.push_str(
                    "\nproxy CPU = the proxy process's user+system time; total CPU = the time \
                     all CPUs were not idle (client, sink, proxy, softirq); per GB = 1e9 bytes \
                     moved. direct has no proxy process, so its proxy CPU and the proxy CPU \
                     ×direct ratio are –.\n",
                );
            }
        }
        out.push_str(&self.goals());
        out
    }

    /// Bar panels (median, min–max whisker): single-stream Gbit/s and total CPU s/GB,
    /// handshakes/s, rsync Gbit/s.
    pub fn svg(&self) -> String {
        let panels: [(&str, &str, &str); 4] = [
            ("stream1", "gbit_s", "1 stream: Gbit/s (higher is better)"),
            (
                "stream1",
                "total_cpu_s_per_gb",
                "1 stream: total CPU s/GB (lower is better)",
            ),
            (
                "handshake",
                "per_s",
                "CONNECT handshakes/s (higher is better)",
            ),
            (
                "rsync",
                "gbit_s",
                "rsync over stunnel: Gbit/s (higher is better)",
            ),
        ];
        let colors = [
            "#7f7f7f", "#9ecae1", "#3182bd", "#e6550d", "#31a354", "#756bb1",
        ];
        let (row_h, label_w, bar_w, pad) = (22.0, 250.0, 330.0, 10.0);
        let panel_h = 30.0 + row_h * self.targets.len() as f64 + pad;
        let width = label_w + bar_w + 120.0;
        let height = panel_h * panels.len() as f64 + 20.0;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        );
        for (p, &(s, m, heading)) in panels.iter().enumerate() {
            let y0 = 10.0 + panel_h * p as f64;
            let _ = writeln!(
                svg,
                "<text x=\"10\" y=\"{}\" font-weight=\"bold\">{heading}</text>",
                y0 + 14.0
            );
            let max = self
                .targets
                .iter()
                .filter_map(|t| self.stat(s, t, m).map(|st| st.max))
                .fold(0.0f64, f64::max);
            for (i, &t) in self.targets.iter().enumerate() {
                let y = y0 + 24.0 + row_h * i as f64;
                let _ = writeln!(
                    svg,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                    label_w - 8.0,
                    y + 14.0,
                    targets::label(t)
                );
                let Some(st) = self.stat(s, t, m) else {
                    let _ = writeln!(
                        svg,
                        "<text x=\"{label_w}\" y=\"{}\" fill=\"#999\">n/a</text>",
                        y + 14.0
                    );
                    continue;
                };
                let scale = if max > 0.0 { bar_w / max } else { 0.0 };
                let _ = writeln!(
                    svg,
                    "<rect x=\"{label_w}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\"/>",
                    y + 3.0,
                    st.median * scale,
                    row_h - 6.0,
                    colors[targets::ALL.iter().position(|x| *x == t).unwrap_or(0) % colors.len()]
                );
                // min–max whisker
                let _ = writeln!(
                    svg,
                    "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>",
                    label_w + st.min * scale,
                    label_w + st.max * scale,
                    y + row_h / 2.0,
                    y + row_h / 2.0
                );
                let dec = if m == "per_s" { 0 } else { 2 };
                let _ = writeln!(
                    svg,
                    "<text x=\"{:.1}\" y=\"{}\">{:.dec$}</text>",
                    label_w + st.max * scale + 6.0,
                    y + 14.0,
                    st.median
                );
            }
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string());
    let mem_kib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "mem_gib": mem_kib.map(|k| (k as f64 / 1048576.0 * 10.0).round() / 10.0),
    })
}

impl Report {
    /// Fails if any figure cannot be true or any measurement failed (after everything was
    /// written and printed).
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.implausible.is_empty() {
            anyhow::bail!(
                "{} figure(s) cannot be true, the bench has a defect: {}",
                self.implausible.len(),
                self.implausible.join("; ")
            );
        }
        if self.outcome.errors.is_empty() {
            return Ok(());
        }
        let failed: Vec<String> = self
            .outcome
            .errors
            .keys()
            .map(|(s, t)| format!("{s} on {t}"))
            .collect();
        anyhow::bail!(
            "{} measurement(s) failed: {}",
            failed.len(),
            failed.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn opts() -> Opts {
        Opts {
            quick: true,
            json: None,
            targets: Vec::new(),
            scenarios: Vec::new(),
            rounds: Some(1),
            mib: None,
            secs: None,
            shaped_secs: Some(4.0),
            idle_tunnels: None,
            rsync_mib: None,
            clients: 1,
            proxy_arg: Vec::new(),
            start_timeout: 1,
        }
    }

    fn sample(gbit: f64, proxy: Option<f64>, total: f64) -> Sample {
        let mut s = Sample::new();
        s.insert("gbit_s", gbit);
        s.insert("total_cpu_s_per_gb", total);
        if let Some(p) = proxy {
            s.insert("proxy_cpu_s_per_gb", p);
        }
        s
    }

    #[test]
    fn ratio_arithmetic() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
        assert_eq!(ratio(Some(1.0), Some(f64::NAN)), None);
    }

    #[test]
    fn shaped_table_compares_cpu_with_direct_and_splice() {
        let s = "readerbound-300M-8".to_string();
        let mut samples = BTreeMap::new();
        // Made-up figures: three rounds each, medians 2.4 / 2.0 / 3.0 total CPU s/GB.
        samples.insert(
            (s.clone(), "direct".to_string()),
            vec![
                sample(2.4, None, 2.0),
                sample(2.4, None, 2.2),
                sample(2.4, None, 1.8),
            ],
        );
        samples.insert(
            (s.clone(), "splice".to_string()),
            vec![sample(2.4, Some(0.5), 2.5), sample(2.4, Some(0.5), 2.5)],
        );
        samples.insert(
            (s.clone(), "squid".to_string()),
            vec![sample(2.3, Some(1.5), 3.0)],
        );
        let outcome = Outcome {
            samples,
            errors: BTreeMap::new(),
        };
        let r = Report::new(
            &opts(),
            &["direct", "splice", "squid"],
            &["readerbound-300M-8"],
            outcome,
            std::path::Path::new("/nonexistent"),
            Bound { copy_gbit: 200.0 },
        );
        assert_eq!(r.vs("direct", &s, "squid", "total_cpu_s_per_gb"), Some(1.5));
        assert_eq!(r.vs("splice", &s, "squid", "total_cpu_s_per_gb"), Some(1.2));
        assert_eq!(r.vs("splice", &s, "squid", "proxy_cpu_s_per_gb"), Some(3.0));
        assert_eq!(r.vs("direct", &s, "squid", "proxy_cpu_s_per_gb"), None);
        assert!(r.ratio_refs(&s, "gbit_s").is_empty());
        assert_eq!(r.ratio_refs(&s, "total_cpu_s_per_gb"), ["direct", "splice"]);
        assert_eq!(r.ratio_refs("stream1", "gbit_s"), ["direct"]);

        let text = r.text();
        assert!(
            text.contains(
                "| target | Gbit/s | proxy CPU s/GB | ×direct | ×splice | total CPU s/GB | \
                 ×direct | ×splice |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| squid | 2.30 | 1.50 | – | 3.00× | 3.00 | 1.50× | 1.20× |"),
            "{text}"
        );
        assert!(
            text.contains("| direct (no proxy) | 2.40 | – | | – | 2.00 (1.80–2.20) | | 0.80× |"),
            "{text}"
        );
        let json = r.json();
        let squid = &json["results"][2]["metrics"]["total_cpu_s_per_gb"];
        assert_eq!(squid["vs_direct"], 1.5);
        assert_eq!(squid["vs_splice"], 1.2);
    }
}
