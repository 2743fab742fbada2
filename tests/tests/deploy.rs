//! deploy/ end to end: the FROM-scratch image built with podman and a CONNECT tunnel through
//! the running container; the Kubernetes manifests rendered with kustomize, validated against
//! the Kubernetes schemas and linted for security settings; the systemd unit verified, and its
//! capability set shown to be exactly what `--mode sockmap` needs; the DaemonSet's flags start
//! the proxy with the policy they promise.
//!
//! Needs podman + runc and systemd-analyze (`cargo xtask setup` installs them) and python3 with
//! pip (kubernetes-validate is installed on first use). Only two things are optional: without
//! kustomize or kubectl the manifests are validated file by file instead of rendered, and the
//! sockmap capability check needs a kernel where sockmap loads as root.

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
        open.status.code() == Some(2)
            && text(&open).contains("needs --credentials, --credentials-file or --htpasswd"),
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

/// The kustomizations under deploy/kubernetes/.
const KUSTOMIZATIONS: &[&str] = &["base", "overlays/example", "overlays/sockmap"];

/// Where kubernetes-validate is installed when python3 lacks it (`pip install --target`: works
/// for an externally managed Debian python too), kept across runs like xtask's bpf-linker.
fn python_packages_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/splice-proxy/python")
}

/// A `python3` command that can import kubernetes_validate and yaml; installs them from PyPI
/// into [`python_packages_dir`] on first use.
fn python() -> Result<Command> {
    let dir = python_packages_dir();
    let command = || {
        let mut c = Command::new("python3");
        c.env("PYTHONPATH", &dir);
        c
    };
    let probe = || {
        run(
            command().args(["-c", "import kubernetes_validate, yaml"]),
            None,
            Duration::from_secs(60),
        )
    };
    if probe()
        .context("python3 is not installed")?
        .status
        .success()
    {
        return Ok(command());
    }
    let out = run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--target")
            .arg(&dir)
            .arg("kubernetes-validate"),
        None,
        Duration::from_secs(300),
    )?;
    ensure!(
        out.status.success() && probe()?.status.success(),
        "pip install --target {} kubernetes-validate failed:\n{}",
        dir.display(),
        text(&out)
    );
    Ok(command())
}

/// `kustomize build DIR` or `kubectl kustomize DIR`, whichever exists; None if neither does.
fn kustomize(dir: &Path) -> Option<Result<String>> {
    let candidates: [(&str, &[&str]); 2] = [("kustomize", &["build"]), ("kubectl", &["kustomize"])];
    for (tool, args) in candidates {
        let Ok(out) = run(
            Command::new(tool).args(args).arg(dir),
            None,
            Duration::from_secs(60),
        ) else {
            continue; // not installed
        };
        return Some(if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(anyhow::anyhow!(
                "{tool} {args:?} {}: {}",
                dir.display(),
                text(&out)
            ))
        });
    }
    None
}

/// The files a kustomization.yaml lists under `resources:`.
fn kustomization_resources(dir: &Path) -> Result<Vec<PathBuf>> {
    let yaml = fs::read_to_string(dir.join("kustomization.yaml"))?;
    Ok(yaml
        .lines()
        .skip_while(|l| l.trim_end() != "resources:")
        .skip(1)
        .map_while(|l| l.strip_prefix("  - "))
        .map(|f| dir.join(f.trim()))
        .collect())
}

/// Runs deploy/kubernetes/lint.py on `files`: (passed, output).
fn lint(files: &[PathBuf], extra: &[&str]) -> Result<(bool, String)> {
    let k8s = deploy_dir().join("kubernetes");
    let out = run(
        python()?.arg(k8s.join("lint.py")).args(extra).args(files),
        None,
        Duration::from_secs(120),
    )?;
    Ok((out.status.success(), text(&out)))
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas_and_are_locked_down() -> Result<()> {
    let started = Instant::now();
    python()?;
    let k8s = deploy_dir().join("kubernetes");
    let tmp = TempDir::new("deploy-kubernetes")?;
    let mc = k8s.join("migrationcontroller.yaml");
    let mc = mc.to_str().unwrap();

    let mut rendered_any = false;
    for name in KUSTOMIZATIONS {
        let dir = k8s.join(name);
        match kustomize(&dir) {
            Some(rendered) => {
                let path = tmp.join(format!("{}.yaml", name.replace('/', "-")));
                fs::write(&path, rendered?)?;
                let (ok, out) = lint(&[path], &["--migrationcontroller", mc])?;
                ensure!(ok, "{name} (rendered by kustomize):\n{out}");
                eprintln!("deploy: {name}: {}", out.trim());
                rendered_any = true;
            }
            None => eprintln!(
                "deploy: {name}: neither kustomize nor kubectl is installed: not rendered \
                 (its base files are validated one by one below)"
            ),
        }
    }
    // The base's files as they are, without a renderer: the same rules hold.
    let base_files = kustomization_resources(&k8s.join("base"))?;
    ensure!(base_files.len() >= 5, "base resources: {base_files:?}");
    let (ok, out) = lint(&base_files, &["--migrationcontroller", mc])?;
    ensure!(ok, "base files:\n{out}");
    eprintln!("deploy: base files: {}", out.trim());

    // The lint is not a rubber stamp: each weakened setting is named.
    let mut weakened = String::new();
    for f in &base_files {
        weakened.push_str(&fs::read_to_string(f)?);
        weakened.push_str("\n---\n");
    }
    let mutations = [
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
            "readOnlyRootFilesystem must be true",
        ),
        (
            "allowPrivilegeEscalation: false",
            "allowPrivilegeEscalation: true",
            "allowPrivilegeEscalation must be false",
        ),
        (
            "privileged: false",
            "privileged: true",
            "privileged (use the capability set",
        ),
        (
            "                - ALL",
            "                - NET_RAW",
            "capabilities.drop must be [ALL]",
        ),
        (
            "runAsNonRoot: true",
            "runAsNonRoot: false",
            "must run as non-root",
        ),
        (
            "            - --htpasswd=/etc/splice-proxy/htpasswd",
            "            - --allow-anonymous",
            "--allow-anonymous makes an open proxy",
        ),
        (
            "              memory: 1Gi\n",
            "",
            "resources.limits.memory missing",
        ),
        (
            "              path: /readyz",
            "              path: /metrics",
            "readinessProbe must GET /readyz",
        ),
        (
            "      terminationGracePeriodSeconds: 40",
            "      terminationGracePeriod: 40",
            "schema",
        ),
        ("maxUnavailable: 1", "maxSurge2: 1", "schema"),
        (
            "              readOnly: true\n",
            "              readOnly: true\n              subPath: htpasswd\n",
            "mounted with subPath (never updated)",
        ),
    ];
    for (from, to, _) in &mutations {
        ensure!(
            weakened.contains(from),
            "mutation target {from:?} not in the base files"
        );
        weakened = weakened.replacen(from, to, 1);
    }
    let path = tmp.join("weakened.yaml");
    fs::write(&path, &weakened)?;
    let (ok, out) = lint(&[path], &[])?;
    ensure!(!ok, "the weakened manifests passed the lint:\n{out}");
    for (_, _, expect) in &mutations {
        ensure!(
            out.contains(expect),
            "the lint did not report {expect:?}:\n{out}"
        );
    }
    eprintln!(
        "deploy: manifests checked in {:.1}s ({})",
        started.elapsed().as_secs_f64(),
        if rendered_any {
            "kustomizations rendered"
        } else {
            "files only: no kustomize"
        }
    );
    Ok(())
}

/// A process killed (SIGKILL) on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The unit's `KEY=` value (continuation lines joined).
fn unit_value(unit: &str, key: &str) -> Option<String> {
    let mut lines = unit.lines();
    let first = lines.find_map(|l| l.strip_prefix(&format!("{key}=")))?;
    let mut value = first.to_string();
    while value.ends_with('\\') {
        value.pop();
        value.push(' ');
        value.push_str(lines.next()?.trim());
    }
    Some(value)
}

/// Starts the binary with the unit's ExecStart flags (listeners moved to free loopback ports,
/// the htpasswd file to `htpasswd`) as uid 65534 holding exactly `caps` as ambient capabilities,
/// no-new-privs set, as systemd would. Returns the process and its proxy and metrics addresses.
fn start_as_unit(
    unit: &str,
    htpasswd: &Path,
    caps: &[&str],
    extra: &[&str],
    log: &Path,
) -> Result<(Killed, SocketAddr, SocketAddr)> {
    let exec = unit_value(unit, "ExecStart").context("no ExecStart=")?;
    let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut args: Vec<String> = exec.split_whitespace().skip(1).map(String::from).collect();
    for a in &mut args {
        *a = match a.as_str() {
            "0.0.0.0:3128" => proxy.to_string(),
            "127.0.0.1:9128" => metrics.to_string(),
            "/etc/splice-proxy/htpasswd" => htpasswd.display().to_string(),
            _ => a.clone(),
        };
    }
    ensure!(
        args.contains(&proxy.to_string()) && args.contains(&metrics.to_string()),
        "ExecStart= no longer listens on 0.0.0.0:3128 with metrics on 127.0.0.1:9128: {exec}"
    );
    let set = caps
        .iter()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<String>();
    let child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--no-new-privs",
        ])
        .arg(format!("--inh-caps=-all{set}"))
        .arg(format!("--ambient-caps=-all{set}"))
        .arg(format!("--bounding-set=-all{set}"))
        .arg(binary())
        .args(&args)
        .args(extra)
        .args(["--allow-dst=127.0.0.0/8", "--allow-port=1-65535"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(log)?)
        .spawn()
        .context("spawn setpriv (util-linux)")?;
    Ok((Killed(child), proxy, metrics))
}

/// Waits until /readyz answers 200 (Ok(true)) or the process exits (Ok(false)).
fn ready_or_exited(p: &mut Killed, metrics: SocketAddr, within: Duration) -> Result<bool> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if p.0.try_wait()?.is_some() {
            return Ok(false);
        }
        if let Ok((200, _)) = http_get(metrics, "/readyz") {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("neither ready nor exited within {within:?}")
}

#[test]
fn systemd_unit_verifies_and_its_capabilities_are_exactly_what_sockmap_needs() -> Result<()> {
    let started = Instant::now();
    let unit = fs::read_to_string(deploy_dir().join("splice-proxy.service"))?;
    let tmp = TempDir::new("deploy-systemd")?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))?;

    // systemd's own checker, on a copy that names the binary under test.
    let bin = binary();
    let copy = tmp.join("splice-proxy.service");
    fs::write(
        &copy,
        unit.replace("/usr/local/bin/splice-proxy", bin.to_str().unwrap()),
    )?;
    let out = run(
        Command::new("systemd-analyze").arg("verify").arg(&copy),
        None,
        Duration::from_secs(60),
    )
    .context("systemd-analyze (package systemd) is not installed")?;
    let complaints: Vec<&str> = std::str::from_utf8(&out.stderr)?
        .lines()
        .filter(|l| l.contains("splice-proxy.service"))
        .collect();
    ensure!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    for key in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "Restart=on-failure",
        "User=splice-proxy",
    ] {
        ensure!(unit.lines().any(|l| l == key), "the unit lacks {key}");
    }

    // Its capabilities: exactly CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, also the bounding set.
    let caps: Vec<String> = unit_value(&unit, "AmbientCapabilities")
        .context("no AmbientCapabilities=")?
        .split_whitespace()
        .map(String::from)
        .collect();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    ensure!(
        caps == ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"],
        "AmbientCapabilities={caps:?}"
    );
    ensure!(
        unit_value(&unit, "CapabilityBoundingSet").as_deref() == Some(&caps.join(" ")),
        "CapabilityBoundingSet= must equal AmbientCapabilities="
    );

    let htpasswd = tmp.join("htpasswd");
    fs::write(&htpasswd, example_secret_htpasswd()?)?;
    fs::set_permissions(&htpasswd, fs::Permissions::from_mode(0o644))?;
    let upstream = echo_upstream()?;

    // With no capability at all the default data path runs as the unit's flags say.
    let log = tmp.join("none.log");
    let (mut p, proxy, metrics) = start_as_unit(&unit, &htpasswd, &[], &[], &log)?;
    ensure!(
        ready_or_exited(&mut p, metrics, Duration::from_secs(15))?,
        "the unit's flags without capabilities: {}",
        fs::read_to_string(&log)?
    );
    echo_through(proxy, upstream.addr, SECRET_USER, SECRET_PASS, 1 << 20)?;
    drop(p);

    // sockmap, where this kernel loads it at all (as root).
    let log = tmp.join("root.log");
    let root = Command::new(binary())
        .args(["run", "--mode=sockmap", "--listen=127.0.0.1:0"])
        .arg(format!("--metrics-listen=127.0.0.1:{}", free_port()))
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    let mut root = Killed(root);
    std::thread::sleep(Duration::from_secs(1));
    let root_loads = root.0.try_wait()?.is_none();
    drop(root);
    if !root_loads {
        eprintln!(
            "deploy: sockmap does not load on this kernel even as root: the capability set \
             was not exercised: {}",
            fs::read_to_string(&log)?
        );
        return Ok(());
    }
    let log = tmp.join("sockmap.log");
    let (mut p, proxy, metrics) =
        start_as_unit(&unit, &htpasswd, &caps, &["--mode=sockmap"], &log)?;
    ensure!(
        ready_or_exited(&mut p, metrics, Duration::from_secs(15))?,
        "--mode sockmap as uid 65534 with {caps:?}: {}",
        fs::read_to_string(&log)?
    );
    echo_through(proxy, upstream.addr, SECRET_USER, SECRET_PASS, 1 << 20)?;
    drop(p);
    // ... and each of the three is needed.
    for missing in &caps {
        let fewer: Vec<&str> = caps.iter().copied().filter(|c| c != missing).collect();
        let log = tmp.join(format!("without-{missing}.log"));
        let (mut p, _, metrics) =
            start_as_unit(&unit, &htpasswd, &fewer, &["--mode=sockmap"], &log)?;
        ensure!(
            !ready_or_exited(&mut p, metrics, Duration::from_secs(15))?,
            "--mode sockmap started without {missing}"
        );
        let status = p.0.wait()?;
        ensure!(status.code() == Some(2), "without {missing}: exit {status}");
    }
    eprintln!(
        "deploy: systemd unit checked in {:.1}s (sockmap runs as uid 65534 with exactly {caps:?})",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The proxy's flags in deploy/kubernetes/base/daemonset.yaml, plus those an overlay adds
/// (`value: --...` in its patches).
fn manifest_args(overlay: Option<&str>) -> Result<Vec<String>> {
    let k8s = deploy_dir().join("kubernetes");
    let base = fs::read_to_string(k8s.join("base/daemonset.yaml"))?;
    let mut args: Vec<String> = base
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|a| format!("--{a}"))
        .collect();
    if let Some(o) = overlay {
        let k = fs::read_to_string(k8s.join(o).join("kustomization.yaml"))?;
        args.extend(
            k.lines()
                .filter_map(|l| l.trim().strip_prefix("value: --"))
                .map(|a| format!("--{a}")),
        );
    }
    Ok(args)
}

#[test]
fn daemonset_flags_start_the_proxy_with_its_policy() -> Result<()> {
    let tmp = TempDir::new("deploy-flags")?;
    let htpasswd = tmp.join("htpasswd");
    fs::write(&htpasswd, example_secret_htpasswd()?)?;
    let upstream = echo_upstream()?;
    for overlay in [None, Some("overlays/example")] {
        let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let args: Vec<String> = manifest_args(overlay)?
            .into_iter()
            .map(|a| {
                a.replace("0.0.0.0:3128", &proxy.to_string())
                    .replace("0.0.0.0:9128", &metrics.to_string())
                    .replace("/etc/splice-proxy/htpasswd", htpasswd.to_str().unwrap())
            })
            .collect();
        ensure!(
            args.iter().any(|a| a.contains(&proxy.to_string()))
                && args.iter().any(|a| a.contains(&metrics.to_string())),
            "the DaemonSet's flags no longer listen on 0.0.0.0:3128 / 0.0.0.0:9128: {args:?}"
        );
        let log = tmp.join("proxy.log");
        let child = Command::new(binary())
            .arg("run")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let mut p = Killed(child);
        ensure!(
            ready_or_exited(&mut p, metrics, Duration::from_secs(15))?,
            "the DaemonSet's flags ({overlay:?}) do not start the proxy: {}",
            fs::read_to_string(&log)?
        );
        // Credentials required; loopback destinations refused by the default policy.
        let target = upstream.addr.to_string();
        let (_s, r) = exchange(proxy, connect_head(&target, &[]).as_bytes())?;
        ensure!(
            r.status == 407,
            "{overlay:?}: CONNECT without credentials: {}",
            r.raw
        );
        let auth = format!(
            "Proxy-Authorization: {}",
            basic("Basic", SECRET_USER, SECRET_PASS)
        );
        let (_s, r) = exchange(proxy, connect_head(&target, &[auth]).as_bytes())?;
        ensure!(
            r.status == 403,
            "{overlay:?}: CONNECT to loopback: {}",
            r.raw
        );
        // SIGTERM: /readyz 503 and a clean exit.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = p.0.try_wait()? {
                break s;
            }
            ensure!(
                Instant::now() < deadline,
                "{overlay:?}: no exit 10 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(status.success(), "{overlay:?}: exit {status} after SIGTERM");
        let text = fs::read_to_string(&log)?;
        ensure!(
            text.lines().all(|l| l.trim_start().starts_with('{')),
            "{overlay:?}: --log-format=json, yet a log line is not JSON:\n{text}"
        );
    }
    Ok(())
}
