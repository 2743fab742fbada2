//! `cargo xtask setup | build | run | test | fuzz | bench | layout`: the project's own entry points, so a fresh machine
//! and CI do exactly what a developer does.

mod bench;
mod fuzz;
mod layout;
mod setup;
mod util;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use crate::util::{cargo, run_step, run_tests, step};

#[derive(Parser)]
#[command(about = "splice-proxy developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: nightly + rust-src, bpf-linker, cargo-fuzz, Debian
    /// packages, bpffs.
    /// Idempotent and non-interactive; a no-op when everything is present.
    Setup,
    /// Setup, then build the release binary (target/release/splice-proxy).
    Build,
    /// Build, then run `splice-proxy run` with the arguments after `--`.
    Run {
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Setup, build, then run every test (release), the fuzz targets (60 s each, or
    /// SPLICE_FUZZ_SECONDS), clippy and rustfmt. Arguments after `--` go to `cargo test` (e.g.
    /// test name filters).
    Test {
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build, then compare splice-proxy's data paths with no proxy, squid and tinyproxy:
    /// throughput, CPU per GB, handshakes, latency, idle memory (docs/benchmarks.md).
    Bench(bench::Opts),
    /// Setup, then run the cargo-fuzz targets (request head, Basic credentials) for a bounded
    /// time each from the committed corpus; fails on any crash, panic or hang.
    Fuzz(fuzz::Opts),
    /// Check proxy-user/src's house rules: no import cycles, config read only by main,
    /// files within 600 lines of code, `unsafe` only where allowed (xtask/src/layout.rs).
    Layout,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::run(),
        Task::Build => build(),
        Task::Run { args } => run(&args),
        Task::Test { args } => test(&args),
        Task::Bench(opts) => bench(&opts),
        Task::Fuzz(opts) => setup::run().and_then(|()| fuzz::run(&opts)),
        Task::Layout => layout::check(&workspace_root().join("proxy-user/src")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (this crate lives in `<root>/xtask`).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
}

fn release_binary() -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target_dir = if target_dir.is_relative() {
        workspace_root().join(target_dir)
    } else {
        target_dir
    };
    target_dir.join("release").join("splice-proxy")
}

fn build() -> Result<()> {
    setup::run()?;
    run_step(
        "build the release binary",
        cargo().args(["build", "--release", "-p", "proxy-user"]),
    )
}

fn run(args: &[OsString]) -> Result<()> {
    build()?;
    let bin = release_binary();
    let mut cmd = Command::new(&bin);
    cmd.arg("run").args(args);
    step(&format!("run {}", util::display(&cmd)));
    // Replace this process so signals (Ctrl-C, SIGTERM, SIGHUP) reach the proxy directly.
    let err = std::os::unix::process::CommandExt::exec(&mut cmd);
    Err(err).with_context(|| format!("exec {}", bin.display()))
}

fn bench(opts: &bench::Opts) -> Result<()> {
    // SPLICE_PROXY_BIN benchmarks that binary as it is; otherwise build the release one.
    let bin = match std::env::var_os("SPLICE_PROXY_BIN") {
        Some(bin) => {
            setup::run()?;
            PathBuf::from(bin)
        }
        None => {
            build()?;
            release_binary()
        }
    };
    let report = bench::run(opts, &bin)?;
    println!("{}", report.text());
    report.check()
}

fn test(args: &[OsString]) -> Result<()> {
    let started = Instant::now();
    build()?;

    let mut failed = Vec::new();
    let mut timings = vec![format!(
        "setup+build {:.0}s",
        started.elapsed().as_secs_f64()
    )];
    let mut tests = cargo();
    tests
        .args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "proxy-ebpf",
            // One failing test file must not hide the others' results.
            "--no-fail-fast",
        ])
        .args(args);
    // The end-to-end tests run the binary built above.
    if std::env::var_os("SPLICE_PROXY_BIN").is_none() {
        tests.env("SPLICE_PROXY_BIN", release_binary());
    }
    let t = Instant::now();
    let mut failures = String::new();
    if let Err((err, report)) = run_tests("run the tests (release)", &mut tests) {
        eprintln!("xtask: tests failed: {err:#}");
        failed.push("tests");
        failures = report;
    }
    timings.push(format!("tests {:.0}s", t.elapsed().as_secs_f64()));

    let mut check = |name: &'static str, what: &str, cmd: &mut Command| {
        let t = Instant::now();
        if let Err(err) = run_step(what, cmd) {
            eprintln!("xtask: {name} failed: {err:#}");
            failed.push(name);
        }
        timings.push(format!("{name} {:.0}s", t.elapsed().as_secs_f64()));
    };

    // The parsers on hostile input, for a bounded time each (SPLICE_FUZZ_SECONDS, default 60).
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    check(
        "fuzz",
        "fuzz the request head and Basic decoders",
        Command::new(xtask).arg("fuzz"),
    );

    check(
        "layout",
        "check the module layout rules",
        Command::new(std::env::current_exe().context("locating the xtask binary")?).arg("layout"),
    );

    // Lints do not need the eBPF object: skip its (separate, dev-profile) build.
    check(
        "clippy",
        "clippy, warnings denied",
        cargo()
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "proxy-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("AYA_BUILD_SKIP", "1"),
    );
    check(
        "fmt",
        "check formatting",
        cargo().args(["fmt", "--all", "--", "--check"]),
    );
    check(
        "fmt-fuzz",
        "check formatting of the fuzz targets",
        cargo().args([
            "fmt",
            "--manifest-path",
            "proxy-user/fuzz/Cargo.toml",
            "--",
            "--check",
        ]),
    );

    let total = started.elapsed().as_secs_f64();
    let timings = timings.join(", ");
    if failed.is_empty() {
        step(&format!("test: all green in {total:.0}s ({timings})"));
        Ok(())
    } else {
        if !failures.is_empty() {
            // Repeated here so that the end of a long CI log names the failed tests.
            eprintln!("xtask: the failed tests, as the harness reported them:\n{failures}");
        }
        anyhow::bail!(
            "test: {} failed after {total:.0}s ({timings})",
            failed.join(", ")
        )
    }
}
