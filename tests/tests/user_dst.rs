//! Per-user destinations on the wire (`--user-dst FILE`): a listed user reaches its own
//! destinations and gets `403` with a `Proxy-Status` naming `--user-dst` for others, an unlisted
//! user is limited by `--allow-dst` alone, a SIGHUP puts a rewritten file in force, and a bad
//! file keeps the previous table.

use std::net::TcpListener;
use std::time::Duration;

use splice_proxy_tests::peers::TempDir;
use splice_proxy_tests::{Proxy, TEST_POLICY};

const PASS: &str = "pw-7c1e";

/// The first response line, or the refusal's head, of a CONNECT to `target` as `user`.
fn connect(proxy: &Proxy, user: &str, target: &str) -> String {
    match proxy.connect_tunnel(target, Some((user, PASS))) {
        Ok(_) => "200".into(),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_refused_by_user_dst(head: &str, what: &str) {
    assert!(head.contains("403"), "{what}: {head}");
    assert!(
        head.contains("Proxy-Status: splice-proxy"),
        "{what}: {head}"
    );
    assert!(head.contains("--user-dst"), "{what}: {head}");
}

#[test]
fn each_user_reaches_only_its_destinations_and_a_reload_changes_them() {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.2:0").unwrap();
    let (ta, tb) = (
        a.local_addr().unwrap().to_string(),
        b.local_addr().unwrap().to_string(),
    );
    let dir = TempDir::new("user-dst").unwrap();
    let file = dir.join("user-dst");
    std::fs::write(&file, "# routes\nalice: 127.0.0.1\n").unwrap();
    let (alice, bob) = (format!("alice:{PASS}"), format!("bob:{PASS}"));
    let file_arg = file.to_str().unwrap();
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&[
        "--credentials",
        &alice,
        "--credentials",
        &bob,
        "--user-dst",
        file_arg,
    ]);
    let proxy = Proxy::start(&args).unwrap();

    assert_eq!(connect(&proxy, "alice", &ta), "200");
    assert_refused_by_user_dst(&connect(&proxy, "alice", &tb), "alice to b");
    // bob has no line: --allow-dst alone.
    assert_eq!(connect(&proxy, "bob", &tb), "200");
    let refused = proxy
        .wait_for_log("status=403", Duration::from_secs(5))
        .unwrap();
    assert!(refused.contains("user=\"alice\""), "{refused}");
    assert!(refused.contains(&format!("target=\"{tb}\"")), "{refused}");

    // Rewritten and SIGHUP: in force.
    std::fs::write(&file, "alice: 127.0.0.2\nbob: 127.0.0.2\n").unwrap();
    proxy.signal(libc::SIGHUP);
    proxy
        .wait_for_log("user destinations reloaded", Duration::from_secs(5))
        .unwrap();
    assert_eq!(connect(&proxy, "alice", &tb), "200");
    assert_refused_by_user_dst(&connect(&proxy, "alice", &ta), "alice to a after reload");
    assert_refused_by_user_dst(&connect(&proxy, "bob", &ta), "bob to a after reload");

    // A bad file keeps the previous table.
    std::fs::write(&file, "alice: 10.0.0.0/33\n").unwrap();
    proxy.signal(libc::SIGHUP);
    proxy
        .wait_for_log("user destinations not reloaded", Duration::from_secs(5))
        .unwrap();
    assert_eq!(connect(&proxy, "alice", &tb), "200");
    assert_refused_by_user_dst(&connect(&proxy, "alice", &ta), "alice to a, bad file");
}

#[test]
fn a_bad_file_at_start_up_is_one_line_naming_the_flag_and_the_line() {
    let dir = TempDir::new("user-dst-bad").unwrap();
    let file = dir.join("user-dst");
    std::fs::write(&file, "alice: a.example\nalice: b.example\n").unwrap();
    let out = std::process::Command::new(splice_proxy_tests::binary())
        .args(["run", "--credentials", "alice:pw", "--user-dst"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--user-dst"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("listed twice"), "{err}");
}
