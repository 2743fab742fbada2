//! deploy/ end to end: the FROM-scratch image built with podman and a CONNECT tunnel through
//! the running container; the Kubernetes manifests rendered with kustomize, validated against
//! the Kubernetes schemas and linted for security settings; the systemd unit verified, and its
//! capability set shown to be exactly what `--mode sockmap` needs.
//!
//! Needs podman + runc (`cargo xtask setup` installs them) and python3 with pip (for
//! kubernetes-validate, installed on first use). Nothing here is skipped for a missing tool.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use splice_proxy_tests::peers::{TempDir, run, run_ok};
use splice_proxy_tests::rawhttp::{basic, connect_head, echo_upstream, exchange};
use splice_proxy_tests::{binary, free_port};

const USER: &str = "mig";
const PASS: &str = "s3cr:et";
/// The example user in deploy/kubernetes/base/secret.yaml.
const SECRET_USER: &str = "mig";
const SECRET_PASS: &str = "change-me";
/// What the image runs as (deploy/build-image.sh writes it to /etc/passwd).
const IMAGE_UID: u32 = 65532;
/// What `podman run` needs on this machine: runc, --privileged (to start containers at all) and
/// rlimits within the machine's own.
const RUN_FLAGS: &[&str] = &[
    "--runtime",
    "runc",
    "--privileged",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=4096:4096",
];
/// Bytes echoed through the container's tunnel.
const ECHO_BYTES: usize = 4 << 20;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .join("deploy")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `podman ARGS`, failing unless it exits 0; returns stdout.
fn podman(args: &[&str], timeout: Duration) -> Result<String> {
    let out = run_ok(Command::new("podman").args(args), None, timeout)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Removes the test's container and image whatever happens to the test.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let t = Duration::from_secs(30);
        let _ = run(
            Command::new("podman").args(["rm", "--force", "--time", "0", &self.container]),
            None,
            t,
        );
        let _ = run(
            Command::new("podman").args(["rmi", "--force", &self.image]),
            None,
            t,
        );
    }
}

/// `GET path` on the metrics listener: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {raw:?}"))?;
    Ok((status, raw))
}

/// The htpasswd entry of the example Secret (its `stringData.htpasswd` block).
fn example_secret_htpasswd() -> Result<String> {
    let path = deploy_dir().join("kubernetes/base/secret.yaml");
    let yaml = fs::read_to_string(&path)?;
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "htpasswd: |")
        .skip(1);
    let entry = lines
        .next()
        .map(|l| l.trim().to_string())
        .with_context(|| format!("{}: no htpasswd block", path.display()))?;
    ensure!(
        entry.starts_with(&format!("{SECRET_USER}:$2")),
        "{}: expected a bcrypt entry for {SECRET_USER}, found {entry:?}",
        path.display()
    );
    Ok(format!("{entry}\n"))
}

/// Opens a tunnel through `proxy` to `target` and echoes `n` pattern bytes through it.
fn echo_through(
    proxy: SocketAddr,
    target: SocketAddr,
    user: &str,
    pass: &str,
    n: usize,
) -> Result<()> {
    let head = connect_head(
        &target.to_string(),
        &[format!(
            "Proxy-Authorization: {}",
            basic("Basic", user, pass)
        )],
    );
    let (s, r) = exchange(proxy, head.as_bytes())?;
    ensure!(r.status == 200, "CONNECT as {user}: {}", r.raw);
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(167) ^ 0x3c).collect();
    let mut w = s.try_clone()?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&sent)?;
        w.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(n);
    (&s).read_to_end(&mut back)?;
    writer.join().expect("writer thread")?;
    ensure!(
        back.len() == data.len() && back == data,
        "echo through the container: sent {} bytes, got {} back{}",
        data.len(),
        back.len(),
        match back.iter().zip(&data).position(|(a, b)| a != b) {
            Some(i) => format!(", first difference at byte {i}"),
            None => String::new(),
        }
    );
    Ok(())
}

#[test]
fn image_builds_from_scratch_and_tunnels_as_non_root() -> Result<()> {
    let started = Instant::now();
    let version = run(
        Command::new("podman").arg("--version"),
        None,
        Duration::from_secs(30),
    )
    .context("podman is not installed: run `cargo xtask setup` (installs podman and runc)")?;
    ensure!(
        version.status.success(),
        "podman --version: {}",
        text(&version)
    );

    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let cleanup = Cleanup {
        container: format!("splice-proxy-test-{unique}"),
        image: format!("localhost/splice-proxy-test:{unique}"),
    };

    // Build: the context holds the binary under test and what ldd says it needs.
    let tmp = TempDir::new("deploy-image")?;
    let context = tmp.join("context");
    let built = run(
        Command::new(deploy_dir().join("build-image.sh"))
            .arg("--binary")
            .arg(binary())
            .args(["--tag", &cleanup.image])
            .arg("--context")
            .arg(&context),
        None,
        Duration::from_secs(120),
    )?;
    ensure!(
        built.status.success(),
        "build-image.sh failed:\n{}",
        text(&built)
    );
    let build_time = started.elapsed();

    // The image: nothing but the binary, its libraries and three files in /etc.
    let mut files = Vec::new();
    collect_files(&context.join("rootfs"), &mut files)?;
    let rel: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(context.join("rootfs"))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    for f in &rel {
        let allowed = f == "usr/local/bin/splice-proxy"
            || ["etc/passwd", "etc/group", "etc/nsswitch.conf"].contains(&f.as_str())
            || f.contains(".so");
        ensure!(allowed, "unexpected file in the image: {f} (all: {rel:?})");
    }
    let config = podman(
        &[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}|{{json .Config.Entrypoint}}|{{.Size}}",
            &cleanup.image,
        ],
        Duration::from_secs(30),
    )?;
    let parts: Vec<&str> = config.split('|').collect();
    ensure!(parts.len() == 3, "podman image inspect: {config}");
    ensure!(
        parts[0] == format!("{IMAGE_UID}:{IMAGE_UID}"),
        "image user: {}",
        parts[0]
    );
    ensure!(
        parts[1] == r#"["/usr/local/bin/splice-proxy","run"]"#,
        "entrypoint: {}",
        parts[1]
    );
    let size: u64 = parts[2].parse()?;
    ensure!(size < 64 << 20, "image is {size} bytes: not minimal");

    // Without credentials the image's default listener (0.0.0.0:3128) must refuse to start.
    let open = run(
        Command::new("podman")
            .args(["run", "--rm", "--network", "none"])
            .args(RUN_FLAGS)
            .arg(&cleanup.image),
        None,
        Duration::from_secs(60),
    )?;
    ensure!(
        open.status.code() == Some(2) && text(&open).contains("needs --credentials or --htpasswd"),
        "the image without credentials: {} {}",
        open.status,
        text(&open)
    );

    // Run: host network, loopback ports, read-only root, static credentials and the example
    // Secret's htpasswd mounted where the DaemonSet mounts it.
    let secrets = tmp.join("secret");
    fs::create_dir(&secrets)?;
    fs::write(secrets.join("htpasswd"), example_secret_htpasswd()?)?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(&secrets, fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(secrets.join("htpasswd"), fs::Permissions::from_mode(0o644))?;
    let upstream = echo_upstream()?;
    let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mount = format!("{}:/etc/splice-proxy:ro", secrets.display());
    let listen = format!("--listen={proxy}");
    let metrics_listen = format!("--metrics-listen={metrics}");
    let credentials = format!("--credentials={USER}:{PASS}");
    let name = cleanup.container.as_str();
    let run_args = [
        &["run", "--detach", "--name", name, "--network", "host"],
        RUN_FLAGS,
    ]
    .concat();
    podman(
        &[
            &run_args[..],
            &[
                "--read-only",
                "--volume",
                &mount,
                &cleanup.image,
                &listen,
                &metrics_listen,
                &credentials,
                "--htpasswd=/etc/splice-proxy/htpasswd",
                "--allow-dst=127.0.0.0/8",
                "--allow-port=1-65535",
            ],
        ]
        .concat(),
        Duration::from_secs(60),
    )?;
    let logs = || {
        run(
            Command::new("podman").args(["logs", &cleanup.container]),
            None,
            Duration::from_secs(30),
        )
        .map(|out| text(&out))
        .unwrap_or_else(|e| format!("(no logs: {e:#})"))
    };

    // Ready: the readiness and liveness probes' endpoints answer 200.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_get(metrics, "/readyz") {
            Ok((200, _)) => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => bail!("/readyz never 200 ({other:?}); container log:\n{}", logs()),
        }
    }
    let (health, _) = http_get(metrics, "/healthz")?;
    ensure!(health == 200, "/healthz: {health}");

    // Non-root, with no effective capability (the container is --privileged only because this
    // machine needs it to start containers at all).
    let pid = podman(
        &["inspect", "--format", "{{.State.Pid}}", &cleanup.container],
        Duration::from_secs(30),
    )?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("container process {pid}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    ensure!(
        field("Uid").iter().all(|u| *u == IMAGE_UID.to_string()),
        "container process runs as uid {:?}, not {IMAGE_UID}",
        field("Uid")
    );
    ensure!(
        field("CapEff") == ["0000000000000000"],
        "container process has capabilities {:?}",
        field("CapEff")
    );

    // Refused without credentials; the bytes come back exact with either kind of user.
    let (_s, r) = exchange(
        proxy,
        connect_head(&upstream.addr.to_string(), &[]).as_bytes(),
    )?;
    ensure!(r.status == 407, "CONNECT without credentials: {}", r.raw);
    echo_through(proxy, upstream.addr, USER, PASS, ECHO_BYTES)?;
    echo_through(proxy, upstream.addr, SECRET_USER, SECRET_PASS, 64 << 10)?;
    let (_m, body) = http_get(metrics, "/metrics")?;
    ensure!(
        body.contains("splice_proxy_tunnels_total"),
        "/metrics without tunnel counters:\n{body}"
    );

    // SIGTERM: drains, exits 0.
    podman(
        &["stop", "--time", "20", &cleanup.container],
        Duration::from_secs(60),
    )?;
    let code = podman(
        &[
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            &cleanup.container,
        ],
        Duration::from_secs(30),
    )?;
    let log = logs();
    ensure!(code == "0", "container exited {code}; log:\n{log}");
    ensure!(
        log.contains(&upstream.addr.to_string())
            && !log.contains(PASS)
            && !log.contains(SECRET_PASS),
        "access log must name the target and no password:\n{log}"
    );
    eprintln!(
        "deploy: image built in {:.1}s ({} files, {size} bytes), container test done in {:.1}s",
        build_time.as_secs_f64(),
        rel.len(),
        started.elapsed().as_secs_f64()
    );
    drop(cleanup);
    Ok(())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            collect_files(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}
