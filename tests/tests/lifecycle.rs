//! Lifecycle behaviour of the real binary: htpasswd reload on SIGHUP without
//! touching open tunnels, the JSON access log, and anonymous-on-loopback.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use splice_proxy_tests::{Proxy, TEST_POLICY, read_response_head};

/// An echo server on loopback; returns its port.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

fn status_of(proxy: &Proxy, target: &str, user_pass: Option<&str>) -> String {
    use base64::Engine;
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    let mut req = format!("CONNECT {target} HTTP/1.1\r\n");
    if let Some(up) = user_pass {
        let t = base64::engine::general_purpose::STANDARD.encode(up);
        req.push_str(&format!("Proxy-Authorization: Basic {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let head = read_response_head(&mut s).unwrap();
    head.lines().next().unwrap().to_string()
}

fn wait_for_log(proxy: &Proxy, needle: &str) -> String {
    proxy
        .wait_for_log(needle, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn sighup_reloads_htpasswd_and_keeps_open_tunnels() {
    let port = echo_server();
    let target = format!("127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("splice-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("htpasswd");
    // `openssl passwd -apr1 -salt xxxxxxxx password`
    std::fs::write(&file, "old:$apr1$xxxxxxxx$dxHfLAsjHkDRmG83UXe8K0\n").unwrap();
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    let file_s = file.to_str().unwrap();
    args.extend_from_slice(&["--htpasswd", file_s, "--mode", "copy"]);
    let mut proxy = Proxy::start(&args).unwrap();

    let mut open = proxy
        .connect_tunnel(&target, Some(("old", "password")))
        .unwrap();
    echo_roundtrip(&mut open, b"before reload");

    // {SHA} of "secret"
    std::fs::write(&file, "new:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n").unwrap();
    proxy.signal(libc::SIGHUP);
    wait_for_log(&proxy, "htpasswd reloaded");
    assert!(status_of(&proxy, &target, Some("old:password")).contains(" 407 "));
    assert!(status_of(&proxy, &target, Some("new:secret")).contains(" 200 "));
    // The tunnel opened under the old file is untouched.
    echo_roundtrip(&mut open, b"after reload");

    // A broken file keeps the previous one in force.
    std::fs::write(&file, "this is not htpasswd\n").unwrap();
    proxy.signal(libc::SIGHUP);
    wait_for_log(&proxy, "htpasswd not reloaded");
    assert!(status_of(&proxy, &target, Some("new:secret")).contains(" 200 "));

    drop(open);
    assert_eq!(
        proxy
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
            .unwrap(),
        Some(0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_access_log_has_every_field_and_no_password() {
    let port = echo_server();
    let target = format!("127.0.0.1:{port}");
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&[
        "--credentials",
        "mig:pa:ss-w0rd",
        "--log-format",
        "json",
        "--mode",
        "splice",
    ]);
    let proxy = Proxy::start(&args).unwrap();
    let mut t = proxy
        .connect_tunnel(&target, Some(("mig", "pa:ss-w0rd")))
        .unwrap();
    echo_roundtrip(&mut t, b"0123456789");
    drop(t);
    let line = wait_for_log(&proxy, "\"status\":200");
    for field in [
        "\"client\":\"127.0.0.1:",
        "\"user\":\"mig\"",
        &format!("\"target\":\"{target}\""),
        &format!("\"resolved\":\"{target}\""),
        "\"bytes_up\":10",
        "\"bytes_down\":10",
        "\"duration_ms\":",
        "\"mode\":\"splice\"",
        "\"end\":\"closed\"",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    // A wrong password is logged with the user name only.
    assert!(status_of(&proxy, &target, Some("mig:wrong-guess")).contains(" 407 "));
    wait_for_log(&proxy, "\"status\":407");
    let all = proxy.log().join("\n");
    assert!(
        !all.contains("pa:ss-w0rd") && !all.contains("wrong-guess"),
        "{all}"
    );
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode("mig:pa:ss-w0rd");
    assert!(!all.contains(&token), "credentials leaked into the log");
}

#[test]
fn loopback_without_credentials_is_anonymous_and_default_policy_refuses_loopback() {
    let proxy = Proxy::start(&[]).unwrap();
    // Default policy: port 443 only, and loopback destinations refused.
    assert!(status_of(&proxy, "127.0.0.1:443", None).contains(" 403 "));
    assert!(status_of(&proxy, "127.0.0.1:22", None).contains(" 403 "));
    assert!(status_of(&proxy, "[::1]:443", None).contains(" 403 "));
    assert!(status_of(&proxy, "169.254.169.254:443", None).contains(" 403 "));
}
