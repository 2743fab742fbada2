//! Happy eyeballs end to end (RFC 8305): a name whose first address is black-holed and whose
//! second one answers is connected after the attempt delay (250 ms), not after
//! `--connect-timeout`. The proxy runs in a mount namespace of its own with a hosts file of the
//! test's (`Proxy::start_with_hosts`), so the system resolver answers the name; no DNS is
//! asked and the machine's `/etc/hosts` is untouched.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use splice_proxy_tests::{Proxy, TEST_POLICY, access_field};

/// A listener on `addr` whose accept queue is full: the kernel drops further SYNs, so a connect
/// to it hangs like one to an address that went dark.
fn black_hole(addr: SocketAddr) -> (socket2::Socket, Vec<TcpStream>) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.set_reuse_address(true).unwrap();
    l.bind(&addr.into()).unwrap();
    l.listen(0).unwrap();
    let fillers = (0..2)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    (l, fillers)
}

#[test]
fn a_black_holed_first_address_is_passed_over_after_the_attempt_delay() {
    let live = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = live.local_addr().unwrap().port();
    let dark: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _hole = black_hole(dark);
    assert!(
        TcpStream::connect_timeout(&dark, Duration::from_millis(300)).is_err(),
        "the black hole must not answer"
    );

    // 127.0.0.1 first: the resolver's own order, and also first by RFC 6724's longest
    // matching prefix with the source address 127.0.0.1, so the race must pass over it.
    let hosts = std::env::temp_dir().join(format!("splice-eyeballs-{}.hosts", std::process::id()));
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 eyeballs.test\n127.0.0.2 eyeballs.test\n",
    )
    .unwrap();
    let mut args: Vec<&str> = TEST_POLICY.to_vec();
    args.extend_from_slice(&["--allow-anonymous", "--connect-timeout", "5s"]);
    let proxy = Proxy::start_with_hosts(&args, &hosts).unwrap();

    let started = Instant::now();
    let mut tunnel = proxy
        .connect_tunnel(&format!("eyeballs.test:{port}"), None)
        .unwrap();
    let took = started.elapsed();
    let (mut server, _) = live.accept().unwrap();
    tunnel.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    drop((tunnel, server));
    let line = proxy
        .wait_for_log("status=200", Duration::from_secs(5))
        .unwrap();
    std::fs::remove_file(&hosts).unwrap();
    eprintln!("connected in {took:?}: {line}");

    assert!(
        line.contains(&format!("resolved=127.0.0.2:{port}")),
        "the live address won: {line}"
    );
    assert!(
        took >= Duration::from_millis(250),
        "connected in {took:?}: the black-holed address was not tried first"
    );
    assert!(
        took < Duration::from_millis(2500),
        "connected in {took:?}, near the 5 s connect timeout: the attempts were not raced"
    );
    assert_eq!(access_field(&line, "bytes_up"), Some(4), "{line}");
}
