//! `cargo xtask setup`: make a fresh Debian machine able to build, run and test splice-proxy.
//!
//! Every step checks first and acts only when something is missing, so a second run costs a few
//! cheap probes (well under 2 s). Nothing asks questions: apt runs with DEBIAN_FRONTEND=
//! noninteractive and services installed with packages are kept from starting.

use std::{
    env, fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{output, run_step, step};

/// Debian packages the end-to-end tests and benchmarks use.
const PACKAGES: &[&str] = &[
    "stunnel4",
    "rsync",
    // Debian's `squid` is built with GnuTLS and cannot `ssl_bump bump`; tests/tests/doctor.rs
    // needs a squid that intercepts TLS. squid-openssl is the same squid 5 with OpenSSL: same
    // /usr/sbin/squid and helpers (the benchmarks run it unchanged); it replaces `squid`.
    "squid-openssl",
    "tinyproxy",
    "curl",
    "openssl",
    "iperf3",
    "socat",
    "bpftool",
    // tests/faults: a client that vanishes without a FIN is a loopback port whose segments
    // an nftables rule drops.
    "nftables",
    // deploy/: the image test builds and runs the FROM-scratch image; the unit test runs
    // systemd-analyze verify on deploy/splice-proxy.service.
    "podman",
    "runc",
    "systemd",
];

/// bpf-linker release known to link our programs; pinned so every machine builds the same one.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors that release has bindings for (`llvm-NN` features).
const BPF_LINKER_LLVM_FEATURES: &[u32] = &[21, 22, 23];

/// cargo-fuzz release that `cargo xtask fuzz` drives (with the nightly toolchain).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn run() -> Result<()> {
    let started = Instant::now();
    let mut done = Vec::new();

    lint_components(&mut done)?;
    let nightly = nightly(&mut done)?;
    let linker = bpf_linker(&nightly, &mut done)?;
    let fuzz = cargo_fuzz(&mut done)?;
    apt_packages(&mut done)?;
    bpffs(&mut done);

    let took = started.elapsed().as_secs_f64();
    if done.is_empty() {
        step(&format!(
            "setup: nothing to do ({}, {linker}, {fuzz}, {} Debian packages, bpffs) in {took:.1}s",
            nightly.version,
            PACKAGES.len()
        ));
    } else {
        step(&format!("setup: {} in {took:.0}s", done.join("; ")));
    }
    Ok(())
}

/// clippy and rustfmt for the toolchain that builds the workspace (`cargo xtask test` uses them).
fn lint_components(done: &mut Vec<String>) -> Result<()> {
    let missing: Vec<&str> = [("clippy", "clippy"), ("fmt", "rustfmt")]
        .into_iter()
        .filter(|(sub, _)| output("cargo", &[sub, "--version"]).is_none())
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run_step(
        "add toolchain components",
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )?;
    done.push(format!("added {}", missing.join(", ")));
    Ok(())
}

struct Nightly {
    sysroot: PathBuf,
    /// e.g. "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)".
    version: String,
    /// Major version of the LLVM inside it.
    llvm_major: Option<u32>,
}

/// The nightly toolchain with rust-src: aya-build compiles the eBPF crate with
/// `rustup run nightly cargo build -Z build-std=core`.
fn nightly(done: &mut Vec<String>) -> Result<Nightly> {
    let sysroot = || output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"]);
    let has_src = |root: &str| {
        Path::new(root.trim())
            .join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .is_file()
    };
    match sysroot() {
        Some(root) if has_src(&root) => {}
        Some(_) => {
            // Only the component: `toolchain install` would also update nightly, which breaks
            // a bpf-linker built against the old nightly's LLVM.
            run_step(
                "add rust-src to nightly",
                Command::new("rustup").args([
                    "component",
                    "add",
                    "rust-src",
                    "--toolchain",
                    "nightly",
                ]),
            )?;
            done.push("added rust-src to nightly".into());
        }
        None => {
            run_step(
                "install the nightly toolchain",
                Command::new("rustup").args([
                    "toolchain",
                    "install",
                    "nightly",
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ]),
            )?;
            done.push("installed nightly with rust-src".into());
        }
    }
    let root = sysroot().context("`rustup run nightly rustc` still fails")?;
    if !has_src(&root) {
        bail!(
            "nightly has no rust-src after installing it (sysroot {})",
            root.trim()
        );
    }
    let verbose = output("rustup", &["run", "nightly", "rustc", "-vV"]).unwrap_or_default();
    let field = |name: &str| {
        verbose
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let llvm_major = field("LLVM version:").and_then(|v| v.split('.').next()?.parse().ok());
    let version = output("rustup", &["run", "nightly", "rustc", "--version"])
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "nightly".into());
    Ok(Nightly {
        sysroot: PathBuf::from(root.trim()),
        version,
        llvm_major,
    })
}

/// bpf-linker, built against the nightly toolchain's own libLLVM so no system LLVM is needed.
///
/// bpf-linker's build script links `libLLVM` from `$LLVM_PREFIX/lib` and records that directory
/// as its RUNPATH; the prefix is a directory of symlinks into the nightly toolchain (plus the
/// empty `bin/llvm-config` the LLVM bindings look for), kept outside `target/` so `cargo clean`
/// cannot break the installed linker. A nightly update removes the old libLLVM, `bpf-linker
/// --version` then fails, and the next setup rebuilds it against the new one.
fn bpf_linker(nightly: &Nightly, done: &mut Vec<String>) -> Result<String> {
    let version = || output("bpf-linker", &["--version"]).map(|v| v.trim().to_owned());
    if let Some(v) = version() {
        return Ok(v);
    }

    let libllvm = find_libllvm(&nightly.sysroot.join("lib"))?;
    let prefix = data_dir()?.join("llvm-prefix");
    make_llvm_prefix(&prefix, &libllvm)?;

    let mut install = Command::new("cargo");
    install
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--force"])
        .env("LLVM_PREFIX", &prefix);
    match nightly.llvm_major {
        Some(major) if BPF_LINKER_LLVM_FEATURES.contains(&major) => {
            install.args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ]);
        }
        other => step(&format!(
            "setup: warning: nightly's LLVM major {other:?} has no bpf-linker {BPF_LINKER_VERSION} \
             feature; using its default bindings"
        )),
    }
    let started = Instant::now();
    run_step("build bpf-linker against nightly's LLVM", &mut install)?;

    let Some(v) = version() else {
        let cargo_home = env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| home().map(|h| h.join(".cargo")));
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails: is {} on PATH?",
            cargo_home.map_or("$CARGO_HOME/bin".into(), |h| h
                .join("bin")
                .display()
                .to_string())
        );
    };
    done.push(format!(
        "built {v} ({:.0}s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(v)
}

/// cargo-fuzz (`cargo fuzz`), for `cargo xtask fuzz`; it needs no LLVM of its own (the nightly
/// toolchain brings libFuzzer's instrumentation).
fn cargo_fuzz(done: &mut Vec<String>) -> Result<String> {
    let version = || output("cargo", &["fuzz", "--version"]).map(|v| v.trim().to_owned());
    if let Some(v) = version().filter(|v| v.ends_with(CARGO_FUZZ_VERSION)) {
        return Ok(v);
    }
    let started = Instant::now();
    run_step(
        "install cargo-fuzz",
        Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
            "--force",
        ]),
    )?;
    let v = version().context("cargo-fuzz was installed but `cargo fuzz --version` fails")?;
    done.push(format!(
        "installed {v} ({:.0}s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(v)
}

/// The toolchain's real shared libLLVM (`libLLVM.so.22.1-rust-1.97.0-nightly`, say); the
/// `libLLVM-22-….so` next to it is a small linker script.
fn find_libllvm(lib: &Path) -> Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("libLLVM") || !name.contains(".so") {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_file() && best.as_ref().is_none_or(|(size, _)| meta.len() > *size) {
            best = Some((meta.len(), entry.path()));
        }
    }
    match best {
        Some((size, path)) if size > 1 << 20 => Ok(path),
        _ => bail!(
            "no shared libLLVM in {} (is this a rustup toolchain?)",
            lib.display()
        ),
    }
}

fn make_llvm_prefix(prefix: &Path, libllvm: &Path) -> Result<()> {
    let bin = prefix.join("bin");
    let lib = prefix.join("lib");
    for dir in [&bin, &lib] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let llvm_config = bin.join("llvm-config");
    fs::write(&llvm_config, "").with_context(|| format!("writing {}", llvm_config.display()))?;
    fs::set_permissions(&llvm_config, fs::Permissions::from_mode(0o755))?;

    // Drop links into an older toolchain, then point both the plain name (for the link step)
    // and the versioned file name (the SONAME, found through the RUNPATH) at the library.
    for entry in fs::read_dir(&lib)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("libLLVM") {
            fs::remove_file(entry.path())?;
        }
    }
    let versioned = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(versioned)] {
        symlink(libllvm, lib.join(name)).with_context(|| {
            format!(
                "linking {} -> {}",
                lib.join(name).display(),
                libllvm.display()
            )
        })?;
    }
    step(&format!(
        "setup: LLVM prefix {} -> {}",
        prefix.display(),
        libllvm.display()
    ));
    Ok(())
}

/// `$XDG_DATA_HOME/splice-proxy`, else `~/.local/share/splice-proxy`.
fn data_dir() -> Result<PathBuf> {
    let base = match env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => home()
            .context("neither XDG_DATA_HOME nor HOME is set")?
            .join(".local/share"),
    };
    Ok(base.join("splice-proxy"))
}

fn home() -> Option<PathBuf> {
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

fn apt_packages(done: &mut Vec<String>) -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    // Packages like squid start their daemon on install (on port 3128, ours); keep them down.
    // policy-rc.d is Debian's switch for that; only remove it if we created it.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let created_policy = !policy.exists()
        && fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok()
        && fs::set_permissions(policy, fs::Permissions::from_mode(0o755)).is_ok();

    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-q", "-y", "-o", "Dpkg::Options::=--force-confdef"])
            .args(["-o", "Dpkg::Options::=--force-confold"])
            .args(args);
        cmd
    };
    let result = run_step("refresh the package lists", &mut apt(&["update"])).and_then(|()| {
        let mut install = apt(&["install", "--no-install-recommends"]);
        install.args(&missing);
        run_step("install Debian packages", &mut install)
    });
    if created_policy {
        let _ = fs::remove_file(policy);
    }
    result?;

    let still = missing_packages();
    if !still.is_empty() {
        bail!("apt-get did not install {}", still.join(" "));
    }
    done.push(format!("installed {}", missing.join(" ")));
    Ok(())
}

/// Packages from [`PACKAGES`] that dpkg does not list as installed.
fn missing_packages() -> Vec<&'static str> {
    // dpkg-query exits 1 when any name is unknown but still reports the others.
    let listed = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
        .args(PACKAGES)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            !listed.lines().any(|line| {
                let mut fields = line.split_whitespace();
                fields.next() == Some(*pkg) && fields.next() == Some("ii")
            })
        })
        .collect()
}

/// bpffs at /sys/fs/bpf, where pinned maps and links live. Not needed by the tests today, so a
/// failure (an unprivileged container) is a warning.
fn bpffs(done: &mut Vec<String>) {
    const DIR: &str = "/sys/fs/bpf";
    let mounted = fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut f = line.split_whitespace().skip(1);
            f.next() == Some(DIR) && f.next() == Some("bpf")
        })
    });
    if mounted {
        return;
    }
    let result = if is_root() {
        fs::create_dir_all(DIR)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                run_step(
                    "mount bpffs",
                    Command::new("mount").args(["-t", "bpf", "bpf", DIR]),
                )
            })
    } else {
        Err(anyhow::anyhow!("not root"))
    };
    match result {
        Ok(()) => done.push(format!("mounted bpffs at {DIR}")),
        Err(err) => step(&format!(
            "setup: warning: bpffs not mounted at {DIR}: {err:#}"
        )),
    }
}

fn is_root() -> bool {
    // The effective uid is the second field of the Uid: line.
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}
