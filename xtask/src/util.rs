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
