//! Running commands, one announcing line each.

use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// Prints what xtask is doing, one line.
pub fn step(what: &str) {
    eprintln!("xtask: {what}");
}

/// `cargo` from PATH (the rustup proxy, so `cargo clippy`/`cargo fmt` resolve as for a user),
/// in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(crate::workspace_root());
    cmd
}

/// Announces `what` with the command line, runs it with inherited output, fails on non-zero.
pub fn run_step(what: &str, cmd: &mut Command) -> Result<()> {
    step(&format!("{what}: {}", display(cmd)));
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start {}", display(cmd)))?;
    if !status.success() {
        bail!(
            "`{}` {status} after {:.0}s",
            display(cmd),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Runs quietly and returns stdout; `None` if it cannot start or exits non-zero.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line, for messages (environment overrides first).
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Like [`run_step`] for `cargo test`: passes its output through and returns, when it fails,
/// the harness's report of each failed test (the `failures:` sections, at most `MAX_LINES`), so
/// the end of a long log still says which test failed and why.
pub fn run_tests(what: &str, cmd: &mut Command) -> Result<(), (anyhow::Error, String)> {
    use std::io::{BufRead as _, BufReader, Write as _};
    const MAX_LINES: usize = 120;
    step(&format!("{what}: {}", display(cmd)));
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            (
                anyhow::anyhow!("cannot start {}: {e}", display(cmd)),
                String::new(),
            )
        })?;
    let mut report = Vec::new();
    let mut in_failures = false;
    // Backtrace frames say where in the harness, not what failed; the panic line says what.
    let mut in_backtrace = false;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(out, "{line}");
        if line == "failures:" {
            in_failures = true;
        } else if line.starts_with("test result:") {
            in_failures = false;
        }
        if line == "stack backtrace:" {
            in_backtrace = true;
        } else if in_backtrace && (line.starts_with("note: ") || line.starts_with("----")) {
            in_backtrace = false;
        }
        let keep = (in_failures && !in_backtrace) || line.ends_with("... FAILED");
        if keep && report.len() < MAX_LINES {
            report.push(line);
        }
    }
    drop(out);
    let status = child.wait().map_err(|e| {
        (
            anyhow::anyhow!("waiting for {}: {e}", display(cmd)),
            String::new(),
        )
    })?;
    if status.success() {
        return Ok(());
    }
    Err((
        anyhow::anyhow!(
            "`{}` {status} after {:.0}s",
            display(cmd),
            started.elapsed().as_secs_f64()
        ),
        report.join("\n"),
    ))
}
