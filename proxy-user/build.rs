//! Builds the eBPF data path (`proxy-ebpf`) for `bpfel-unknown-none` with aya-build and leaves the
//! object at `$OUT_DIR/proxy-ebpf`, where `src/ebpf.rs` embeds it.
//!
//! Needs the nightly toolchain with `rust-src` (for `-Z build-std=core`) and `bpf-linker` on PATH;
//! `cargo xtask setup` installs them. With `AYA_BUILD_SKIP=1` (or `true`) nothing is compiled: an
//! empty object is written instead and loading it at run time reports "eBPF object not built".

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};

/// The eBPF package, and the name of its binary (hence of the object in `OUT_DIR`).
const EBPF_PACKAGE: &str = "proxy-ebpf";
/// aya-build's own switch; we honour it the same way (values `1` or `true`).
const SKIP_VAR: &str = "AYA_BUILD_SKIP";
const SETUP_HINT: &str = "run `cargo xtask setup` (or build with AYA_BUILD_SKIP=1 to leave the \
                          eBPF data path out)";

fn main() {
    if let Err(err) = run() {
        eprintln!("error: building the eBPF program ({EBPF_PACKAGE}) failed: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={SKIP_VAR}");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join(EBPF_PACKAGE);

    if skip_requested() {
        println!(
            "cargo:warning={SKIP_VAR} is set: the eBPF object is not built (sockmap mode off)"
        );
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
        return Ok(());
    }

    check_prerequisites()?;

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let root_dir = manifest_dir.join("..").join(EBPF_PACKAGE);
    let root_dir = root_dir
        .canonicalize()
        .with_context(|| format!("{} not found", root_dir.display()))?;
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root_dir.display()))?;

    // aya-build forwards everything the inner cargo prints on stderr as a cargo warning, and
    // cargo replays those on every later build; keep only real diagnostics.
    // SAFETY: build scripts are single-threaded here; nothing reads the environment concurrently.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };

    let package = aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
        .context("compiler output is in the warnings above")?;

    let len = fs::metadata(&object)
        .with_context(|| format!("aya-build left no object at {}", object.display()))?
        .len();
    if len == 0 {
        bail!("aya-build left an empty object at {}", object.display());
    }
    Ok(())
}

fn skip_requested() -> bool {
    env::var_os(SKIP_VAR).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Fails with one line naming what is missing, instead of a page of cargo output from deep inside
/// aya-build.
fn check_prerequisites() -> anyhow::Result<()> {
    let sysroot = output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
        .map_err(|e| anyhow!("the nightly Rust toolchain is not usable ({e}); {SETUP_HINT}"))?;
    let core = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core.is_file() {
        bail!(
            "rust-src is not installed for nightly (no {}); {SETUP_HINT}",
            core.display()
        );
    }
    output("bpf-linker", &["--version"])
        .map_err(|e| anyhow!("bpf-linker is not usable ({e}); {SETUP_HINT}"))?;
    Ok(())
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("`{program} {}` failed: {last}", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
