//! Credentials files end to end (issue 5, "Operations"): `--credentials-file`
//! users; reloads when a Kubernetes Secret volume is updated (exactly as
//! kubelet does it, no SIGHUP), when a file is rewritten or renamed over,
//! and on SIGHUP; a bad file keeping the previous users with the reason in
//! the log; open tunnels carrying data through every reload.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use splice_proxy_tests::peers::TempDir;
use splice_proxy_tests::rawhttp::{basic, connect_head, echo_upstream, exchange, metric, run_cli};
use splice_proxy_tests::torture::Pattern;
use splice_proxy_tests::{Proxy, TEST_POLICY, modes};

/// How long a change on disk may take to be in force (it takes about the
/// debounce, 150 ms).
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);

const RELOADS_OK: &str =
    r#"splice_proxy_credential_reloads_total{source="credentials_file",result="ok"}"#;
const RELOADS_ERROR: &str =
    r#"splice_proxy_credential_reloads_total{source="credentials_file",result="error"}"#;
const LOADED_AT: &str =
    r#"splice_proxy_credentials_loaded_timestamp_seconds{source="credentials_file"}"#;

/// A Secret volume as kubelet lays it out: the data in a timestamped
/// directory, `..data` a symlink to it, and each key a symlink through
/// `..data`.
struct SecretVolume {
    dir: TempDir,
    version: u32,
}

impl SecretVolume {
    fn new(key: &str, contents: &str) -> SecretVolume {
        let mut v = SecretVolume {
            dir: TempDir::new("secret-volume").unwrap(),
            version: 0,
        };
        v.update(key, contents);
        std::os::unix::fs::symlink(format!("..data/{key}"), v.dir.join(key)).unwrap();
        v
    }

    /// kubelet's atomic update: write a new timestamped directory, point a
    /// new `..data_tmp` symlink at it, rename that over `..data`, then
    /// remove the old directory.
    fn update(&mut self, key: &str, contents: &str) {
        let old = self.version_dir();
        self.version += 1;
        let new = self.version_dir();
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        std::fs::write(self.dir.join(&new).join(key), contents).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if self.version > 1 {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }

    fn version_dir(&self) -> String {
        format!(
            "..2026_11_27_20_00_{:02}.{:09}",
            self.version,
            1000 + self.version
        )
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }
}

/// A proxy with `--credentials-file file` (and `extra`) and a metrics
/// listener; returns it and the metrics address.
fn start(file: &Path, extra: &[&str]) -> (Proxy, SocketAddr) {
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--credentials-file", file.to_str().unwrap()]);
    if !extra.contains(&"--mode") {
        args.extend_from_slice(&["--mode", "copy"]);
    }
    args.extend_from_slice(extra);
    Proxy::start_with_metrics(&args).expect("start proxy")
}

/// The status the proxy answers a CONNECT with these credentials.
fn status(proxy: &Proxy, target: &str, user: &str, pass: &str) -> u16 {
    let auth = format!("Proxy-Authorization: {}", basic("Basic", user, pass));
    exchange(proxy.addr, connect_head(target, &[auth]).as_bytes())
        .unwrap()
        .1
        .status
}

/// Polls until `user:pass` gets `want` (the reload is asynchronous).
fn wait_status(proxy: &Proxy, target: &str, user: &str, pass: &str, want: u16) {
    let deadline = Instant::now() + RELOAD_DEADLINE;
    loop {
        let got = status(proxy, target, user, pass);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{user}: still {got}, not {want}, {RELOAD_DEADLINE:?} after the change:\n{}",
            proxy.log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until the metric `series` reaches `want` (it is counted just
/// after the new users are in force).
fn wait_metric(maddr: SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + RELOAD_DEADLINE;
    loop {
        let got = metric(maddr, series);
        if got == want {
            return;
        }
        assert!(got < want, "{series} is {got}, beyond {want}");
        assert!(
            Instant::now() < deadline,
            "{series} still {got}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_has_no_password(proxy: &Proxy, passwords: &[&str]) {
    let all = proxy.log().join("\n");
    for p in passwords {
        assert!(!all.contains(p), "password {p:?} in the log:\n{all}");
    }
}

#[test]
fn secret_update_is_in_force_without_sighup() {
    let up = echo_upstream().unwrap();
    let target = up.target();
    let mut vol = SecretVolume::new("creds", "# v1\nmig:old:pw-1\nother:x-1\n");
    let (proxy, maddr) = start(&vol.path("creds"), &[]);
    assert_eq!(status(&proxy, &target, "mig", "old:pw-1"), 200);
    assert_eq!(status(&proxy, &target, "other", "x-1"), 200);
    assert_eq!(status(&proxy, &target, "mig", "old"), 407);
    assert_eq!(status(&proxy, &target, "mig", "wrong-pw"), 407);
    assert!(metric(maddr, LOADED_AT) > 1.7e9, "start-up load time");
    assert_eq!(metric(maddr, RELOADS_OK), 0.0);

    vol.update("creds", "# v2\r\nmig:new:pw-2\r\n");
    wait_status(&proxy, &target, "mig", "new:pw-2", 200);
    assert_eq!(status(&proxy, &target, "mig", "old:pw-1"), 407);
    assert_eq!(status(&proxy, &target, "other", "x-1"), 407);
    let line = proxy
        .wait_for_log("file change: credentials file reloaded", RELOAD_DEADLINE)
        .unwrap();
    assert!(line.contains("users=1"), "{line}");
    // Five directory events, one reload.
    assert_eq!(metric(maddr, RELOADS_OK), 1.0);
    assert_eq!(metric(maddr, RELOADS_ERROR), 0.0);

    // And again: the watch follows the new ..data target.
    vol.update("creds", "mig:third:pw-3\n");
    wait_status(&proxy, &target, "mig", "third:pw-3", 200);
    assert_eq!(status(&proxy, &target, "mig", "new:pw-2"), 407);
    wait_metric(maddr, RELOADS_OK, 2.0);
    log_has_no_password(&proxy, &["pw-1", "pw-2", "pw-3", "wrong-pw"]);
}

#[test]
fn bad_secret_update_keeps_the_previous_users_and_says_why() {
    let up = echo_upstream().unwrap();
    let target = up.target();
    let mut vol = SecretVolume::new("creds", "mig:pw-1\n");
    let file = vol.path("creds");
    let (proxy, maddr) = start(&file, &[]);
    assert_eq!(status(&proxy, &target, "mig", "pw-1"), 200);

    // Line 3 repeats a user.
    vol.update("creds", "# v2\nmig:pw-2\nmig:pw-3\n");
    let line = proxy
        .wait_for_log("credentials file not reloaded", RELOAD_DEADLINE)
        .unwrap();
    for part in [
        "file change:",
        "keeping the previous one",
        &format!("--credentials-file {}", file.display()),
        r#"line 3: user "mig" again (first on line 2)"#,
    ] {
        assert!(line.contains(part), "{part:?} not in {line}");
    }
    assert_eq!(metric(maddr, RELOADS_ERROR), 1.0);
    assert_eq!(metric(maddr, RELOADS_OK), 0.0);
    assert_eq!(status(&proxy, &target, "mig", "pw-1"), 200);
    assert_eq!(status(&proxy, &target, "mig", "pw-2"), 407);

    // A line without ':', then a good file again.
    vol.update("creds", "mig:pw-4\nmig-pw-5\n");
    wait_metric(maddr, RELOADS_ERROR, 2.0);
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("line 2: expected user:password")),
        "{}",
        proxy.log().join("\n")
    );
    assert_eq!(status(&proxy, &target, "mig", "pw-1"), 200);
    // No users at all (a file caught mid-write looks like that).
    vol.update("creds", "# nobody\n");
    wait_metric(maddr, RELOADS_ERROR, 3.0);
    assert!(
        proxy.log().iter().any(|l| l.contains(": no users")),
        "{}",
        proxy.log().join("\n")
    );
    assert_eq!(status(&proxy, &target, "mig", "pw-1"), 200);
    vol.update("creds", "mig:pw-6\n");
    wait_status(&proxy, &target, "mig", "pw-6", 200);
    assert_eq!(status(&proxy, &target, "mig", "pw-1"), 407);
    wait_metric(maddr, RELOADS_OK, 1.0);
    log_has_no_password(&proxy, &["pw-1", "pw-2", "pw-3", "pw-4", "pw-5", "pw-6"]);
}

#[test]
fn rewrite_in_place_and_rename_over_are_picked_up() {
    let up = echo_upstream().unwrap();
    let target = up.target();
    let dir = TempDir::new("creds-plain").unwrap();
    let file = dir.join("users");
    std::fs::write(&file, "a:one\n").unwrap();
    let (proxy, _maddr) = start(&file, &[]);
    assert_eq!(status(&proxy, &target, "a", "one"), 200);
    // Truncate and write the same inode.
    std::fs::write(&file, "a:two\n").unwrap();
    wait_status(&proxy, &target, "a", "two", 200);
    assert_eq!(status(&proxy, &target, "a", "one"), 407);
    // An editor's save: a new file renamed over the old name.
    let tmp = dir.join(".users.swp");
    std::fs::write(&tmp, "a:three\n").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    wait_status(&proxy, &target, "a", "three", 200);
    assert_eq!(status(&proxy, &target, "a", "two"), 407);
}

#[test]
fn sighup_reloads_both_files() {
    let up = echo_upstream().unwrap();
    let target = up.target();
    let dir = TempDir::new("creds-sighup").unwrap();
    let watched = dir.join("watched");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&watched).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let file = watched.join("creds");
    std::fs::write(&file, "a:one\n").unwrap();
    // Written through a hard link in another directory, the file changes
    // without an event in the directory the proxy watches: only SIGHUP can
    // make it reread.
    let link = elsewhere.join("creds");
    std::fs::hard_link(&file, &link).unwrap();
    let htpasswd = dir.join("htpasswd");
    // `openssl passwd -apr1 -salt xxxxxxxx password`
    std::fs::write(&htpasswd, "h:$apr1$xxxxxxxx$dxHfLAsjHkDRmG83UXe8K0\n").unwrap();
    let (proxy, maddr) = start(&file, &["--htpasswd", htpasswd.to_str().unwrap()]);
    assert_eq!(status(&proxy, &target, "a", "one"), 200);
    assert_eq!(status(&proxy, &target, "h", "password"), 200);

    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&link)
        .unwrap()
        .write_all(b"a:two\nb:three\n")
        .unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a:two\nb:three\n");
    proxy.signal(libc::SIGHUP);
    let line = proxy
        .wait_for_log("SIGHUP: credentials file reloaded", RELOAD_DEADLINE)
        .unwrap();
    assert!(line.contains("users=2"), "{line}");
    proxy
        .wait_for_log("SIGHUP: htpasswd reloaded", RELOAD_DEADLINE)
        .unwrap();
    assert_eq!(status(&proxy, &target, "a", "two"), 200);
    assert_eq!(status(&proxy, &target, "b", "three"), 200);
    assert_eq!(status(&proxy, &target, "a", "one"), 407);
    assert_eq!(status(&proxy, &target, "h", "password"), 200);
    assert_eq!(metric(maddr, RELOADS_OK), 1.0);
    assert_eq!(
        metric(
            maddr,
            r#"splice_proxy_credential_reloads_total{source="htpasswd",result="ok"}"#
        ),
        1.0
    );
}

/// Bytes through an echo tunnel: a writer sends the pattern, a reader
/// checks every byte that comes back.
struct Flow {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<u64>,
    reader: std::thread::JoinHandle<Result<u64, String>>,
}

impl Flow {
    fn start(tunnel: TcpStream, seed: u64) -> Flow {
        let pattern = Pattern::new(seed);
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let mut w = tunnel.try_clone().unwrap();
        let (p, s) = (pattern.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            let mut off = 0u64;
            let mut buf = vec![0u8; 32 * 1024];
            while !s.load(Ordering::SeqCst) {
                p.fill(off, &mut buf);
                w.write_all(&buf).expect("write into the tunnel");
                off += buf.len() as u64;
                std::thread::sleep(Duration::from_millis(1));
            }
            w.shutdown(Shutdown::Write).unwrap();
            off
        });
        let (mut r, n) = (tunnel, received.clone());
        r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            loop {
                let got = r
                    .read(&mut buf)
                    .map_err(|e| format!("read at {off}: {e}"))?;
                if got == 0 {
                    return Ok(off);
                }
                if buf[..got] != pattern.bytes(off, got)[..] {
                    return Err(format!("bytes at offset {off} differ"));
                }
                off += got as u64;
                n.store(off, Ordering::SeqCst);
            }
        });
        Flow {
            stop,
            received,
            writer,
            reader,
        }
    }

    /// Waits until `more` bytes beyond what has come back so far arrive.
    fn wait_for_more(&self, more: u64) {
        let want = self.received.load(Ordering::SeqCst) + more;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.received.load(Ordering::SeqCst) < want {
            assert!(
                Instant::now() < deadline,
                "tunnel stalled at {} bytes",
                self.received.load(Ordering::SeqCst)
            );
            assert!(!self.reader.is_finished(), "the tunnel ended early");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops writing; every byte sent must have come back, in order.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self.writer.join().unwrap();
        let back = self.reader.join().unwrap().unwrap();
        assert_eq!(back, sent, "sent {sent}, got back {back}");
        back
    }
}

#[test]
fn open_tunnels_keep_flowing_through_reloads() {
    for mode in modes() {
        let up = echo_upstream().unwrap();
        let target = up.target();
        let mut vol = SecretVolume::new("creds", "mig:pw-1\n");
        let (proxy, _maddr) = start(&vol.path("creds"), &["--mode", &mode]);
        let tunnel = proxy
            .connect_tunnel(&target, Some(("mig", "pw-1")))
            .unwrap();
        let flow = Flow::start(tunnel, 0x5eed ^ mode.len() as u64);
        flow.wait_for_more(1 << 20);

        vol.update("creds", "mig:pw-2\n");
        wait_status(&proxy, &target, "mig", "pw-2", 200);
        flow.wait_for_more(1 << 20);
        proxy.signal(libc::SIGHUP);
        proxy
            .wait_for_log("SIGHUP: credentials file reloaded", RELOAD_DEADLINE)
            .unwrap();
        flow.wait_for_more(1 << 20);
        // The tunnel opened with pw-1 carries on; a new one needs pw-2.
        assert_eq!(status(&proxy, &target, "mig", "pw-1"), 407);
        let total = flow.finish();
        eprintln!("{mode}: {total} bytes echoed through two reloads");
    }
}

#[test]
fn bad_file_at_start_up_exits_2_with_one_line() {
    let dir = TempDir::new("creds-startup").unwrap();
    let bad = dir.join("bad");
    std::fs::write(&bad, "ok:pw-1\n\n:pw-2\n").unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, "# no one yet\n").unwrap();
    let empty_s = empty.to_str().unwrap();
    let missing = dir.join("missing");
    let bad_s = bad.to_str().unwrap();
    let missing_s = missing.to_str().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    for (file, expect) in [
        (
            bad_s,
            format!("--credentials-file {bad_s}: line 3: empty user name"),
        ),
        (empty_s, format!("--credentials-file {empty_s}: no users")),
        (missing_s, format!("--credentials-file {missing_s}: ")),
        // There, but not readable as a file.
        (dir_s, format!("--credentials-file {dir_s}: ")),
    ] {
        let (code, stderr, _) = run_cli(
            &["run", "--listen", "127.0.0.1:0", "--credentials-file", file],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(code, Some(2), "{file}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&expect), "{expect:?} not in {stderr}");
        assert!(!stderr.contains("pw-"), "{stderr}");
    }
}
