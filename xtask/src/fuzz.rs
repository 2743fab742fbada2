//! `cargo xtask fuzz [--seconds N] [TARGET...]`: the cargo-fuzz targets in `proxy-user/fuzz/`
//! (request-head reader, Basic decoder), each for a bounded time.
//!
//! The committed corpus (`proxy-user/fuzz/corpus/<target>/`, heads captured from stunnel, curl,
//! socat and openssl s_client) seeds every run; what a run finds goes to a scratch corpus under
//! `proxy-user/fuzz/target/`, kept between runs on one machine, so the work tree stays clean.
//! A crash, panic or hang fails the task and leaves the input in `proxy-user/fuzz/artifacts/`.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::util::{display, run_step, step};

/// The fuzz targets (`proxy-user/fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &["head", "basic"];

/// Seconds per target when neither `--seconds` nor `SPLICE_FUZZ_SECONDS` says otherwise.
const DEFAULT_SECONDS: u64 = 60;

#[derive(Args)]
pub struct Opts {
    /// How long each target runs (a longer local run: `--seconds 3600`).
    #[arg(long, env = "SPLICE_FUZZ_SECONDS", default_value_t = DEFAULT_SECONDS)]
    pub seconds: u64,
    /// Targets to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

/// What one target's run reported (libFuzzer's `-print_final_stats`).
struct Stats {
    execs: u64,
    per_sec: u64,
    features: Option<u64>,
    /// Inputs in the corpus at the end (libFuzzer's `corp:`), seeds included.
    corpus: Option<u64>,
}

fn fuzz_dir() -> PathBuf {
    crate::workspace_root().join("proxy-user").join("fuzz")
}

/// `cargo +nightly fuzz <sub> --fuzz-dir proxy-user/fuzz`, without the eBPF build (the parsers
/// do not need it, and it would be built again with the fuzzing flags).
fn cargo_fuzz(sub: &str) -> Command {
    let mut cmd = crate::util::cargo();
    cmd.args(["+nightly", "fuzz", sub, "--fuzz-dir"])
        .arg(fuzz_dir())
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

pub fn run(opts: &Opts) -> Result<()> {
    if opts.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let targets: Vec<&str> = if opts.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        opts.targets.iter().map(String::as_str).collect()
    };
    run_step(
        "build the fuzz targets (nightly, AddressSanitizer)",
        &mut cargo_fuzz("build"),
    )?;
    let mut lines = Vec::new();
    for target in targets {
        let stats = run_target(target, opts.seconds)?;
        lines.push(format!(
            "{target}: {} execs in {} s ({}/s), {} coverage features, corpus {} inputs",
            stats.execs,
            opts.seconds,
            stats.per_sec,
            or_unknown(stats.features),
            or_unknown(stats.corpus),
        ));
    }
    step(&format!(
        "fuzz: no crash, panic or hang; {}",
        lines.join("; ")
    ));
    Ok(())
}

fn run_target(target: &str, seconds: u64) -> Result<Stats> {
    let dir = fuzz_dir();
    let seeds = dir.join("corpus").join(target);
    let scratch = dir.join("target").join("corpus").join(target);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let mut cmd = cargo_fuzz("run");
    // New inputs go to the first corpus directory: the scratch one.
    cmd.arg(target).arg(&scratch).arg(&seeds).arg("--").args([
        format!("-max_total_time={seconds}"),
        // An input that takes a second is a hang here (the parsers answer in microseconds).
        "-timeout=5".to_string(),
        "-print_final_stats=1".to_string(),
    ]);
    let dict = dir.join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    step(&format!("fuzz {target} for {seconds}s: {}", display(&cmd)));
    let started = Instant::now();
    // libFuzzer reports on stderr: pass it through and keep the final stats.
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", display(&cmd)))?;
    let mut stats = Stats {
        execs: 0,
        per_sec: 0,
        features: None,
        corpus: None,
    };
    let stderr = child.stderr.take().context("no stderr pipe")?;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        eprintln!("{line}");
        let value = |key: &str| {
            line.strip_prefix(key)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(v) = value("stat::number_of_executed_units:") {
            stats.execs = v;
        } else if let Some(v) = value("stat::average_exec_per_sec:") {
            stats.per_sec = v;
        } else {
            stats.features = status_field(&line, "ft:").or(stats.features);
            stats.corpus = status_field(&line, "corp:").or(stats.corpus);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}) after {:.0}s: the input is in {}",
            started.elapsed().as_secs_f64(),
            dir.join("artifacts").join(target).display()
        );
    }
    Ok(stats)
}

/// A number from libFuzzer's status lines (`#N pulse cov: 1 ft: 2 corp: 3/4Kb ...`): `ft:` is
/// coverage features, `corp:` inputs in the corpus; the last line's value counts.
fn status_field(line: &str, key: &str) -> Option<u64> {
    if !line.starts_with('#') {
        return None;
    }
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    let value = words.next()?;
    value.split('/').next()?.parse().ok()
}

fn or_unknown(v: Option<u64>) -> String {
    v.map_or_else(|| "?".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_features_and_corpus_from_status_lines() {
        let line = "#1048576 pulse  cov: 1213 ft: 4711 corp: 301/12Kb exec/s: 34952 rss: 60Mb";
        assert_eq!(status_field(line, "ft:"), Some(4711));
        assert_eq!(status_field(line, "corp:"), Some(301));
        assert_eq!(status_field("INFO: Seed: 1234 ft: 3", "ft:"), None);
    }
}
