//! The sockmap data path really keeps tunnel bytes out of userspace: 2 GiB
//! cross one tunnel while the proxy process itself uses almost no CPU, the
//! bytes arrive intact, and the eBPF program's counters (reported in the
//! access log) equal what was sent.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use splice_proxy_tests::Proxy;
use splice_proxy_tests::resources::{bpf_ids, cpu_secs};

const TOTAL: u64 = 2 << 30;

fn access_field(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn two_gib_bypass_userspace() {
    let proxy = match Proxy::start_mode("sockmap", &[]) {
        Ok(p) => p,
        Err(e) => panic!("sockmap must load on this kernel (root, BPF sockmap): {e:#}"),
    };
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = sink.local_addr().unwrap().to_string();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let got = s.read(&mut buf).unwrap();
            if got == 0 {
                break;
            }
            hash.update(&buf[..got]);
            n += got as u64;
        }
        (n, hash.finalize())
    });

    let mut tunnel = proxy.connect_tunnel(&target, None).unwrap();
    let cpu_before = cpu_secs(proxy.pid());
    let chunk: Vec<u8> = (0..4 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut sent_hash = Sha256::new();
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < TOTAL {
        tunnel.write_all(&chunk).unwrap();
        sent_hash.update(&chunk);
        sent += chunk.len() as u64;
    }
    tunnel.shutdown(Shutdown::Write).unwrap();
    let (received, got_hash) = reader.join().unwrap();
    let elapsed = started.elapsed();
    // The upstream closed after reading everything: the client sees EOF.
    let mut rest = Vec::new();
    tunnel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    tunnel.read_to_end(&mut rest).unwrap();
    let cpu = cpu_secs(proxy.pid()) - cpu_before;
    eprintln!(
        "sockmap: {} MiB in {:.2?} ({:.2} Gbit/s), proxy CPU {:.3} s",
        TOTAL >> 20,
        elapsed,
        TOTAL as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        cpu
    );
    assert_eq!(received, TOTAL, "bytes lost or duplicated");
    assert_eq!(got_hash, sent_hash.finalize(), "bytes corrupted");
    assert!(rest.is_empty());
    assert!(
        cpu < 0.05,
        "the proxy used {cpu:.3} s of CPU for 2 GiB: bytes went through userspace"
    );

    // The access log's byte counts come from the program's per-socket counters.
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        if let Some(l) = proxy
            .log()
            .into_iter()
            .find(|l| l.contains("status=200") && l.contains(&target))
        {
            break l;
        }
        assert!(Instant::now() < deadline, "no access log line");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains("mode=sockmap"), "{line}");
    assert_eq!(access_field(&line, "bytes_up"), Some(TOTAL), "{line}");
    assert_eq!(access_field(&line, "bytes_down"), Some(0), "{line}");
}

fn bpf_object_exists(kind: &str, id: u32) -> bool {
    std::process::Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("bpftool (installed by cargo xtask setup)")
        .success()
}

/// Nothing is pinned, so the kernel frees the program, its link and maps
/// with the process: after SIGKILL none of them is left, and the next start
/// loads afresh and passes its self-check.
#[test]
fn sigkill_leaves_no_program_or_map_behind() {
    let mut proxy = Proxy::start_mode("sockmap", &[]).unwrap();
    let ids = bpf_ids(proxy.pid());
    assert!(
        ids.iter().any(|(k, _)| *k == "prog") && ids.iter().any(|(k, _)| *k == "map"),
        "a sockmap proxy holds its program and maps: {ids:?}"
    );
    for (kind, id) in &ids {
        assert!(bpf_object_exists(kind, *id), "{kind} {id} should exist");
    }
    let _ = proxy.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = ids
            .iter()
            .filter(|(kind, id)| bpf_object_exists(kind, *id))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after SIGKILL: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = Proxy::start_mode("sockmap", &[]).expect("a clean start after SIGKILL");
    assert!(!bpf_ids(again.pid()).is_empty());
}
