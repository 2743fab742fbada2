//! Reading the proxy's `--metrics-listen` endpoint: one request per connection, the Prometheus
//! text parsed into samples.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The families rendered from the sockmap program's global counters (`splice_proxy_sockmap_*`).
pub const SOCKMAP_FAMILIES: [&str; 8] = [
    "splice_proxy_sockmap_redirected_bytes_total",
    "splice_proxy_sockmap_redirected_segments_total",
    "splice_proxy_sockmap_passed_bytes_total",
    "splice_proxy_sockmap_passed_segments_total",
    "splice_proxy_sockmap_held_bytes_total",
    "splice_proxy_sockmap_hold_episodes_total",
    "splice_proxy_sockmap_trimmed_bytes_total",
    "splice_proxy_sockmap_trims_total",
];

/// `GET path` on the metrics listener: (status, body). Every response must say
/// `Connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: metrics\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert!(head.contains("\r\nConnection: close"), "{head}");
    Ok((status, body.to_string()))
}

/// The body of a `/metrics` scrape, which must answer 200.
pub fn scrape_text(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// Every sample of a scrape, by series (`name{labels}`).
pub fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    samples(&scrape_text(addr))
}

/// The samples of an exposition text, by series (`name{labels}`).
pub fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// A series' value, 0 when absent.
pub fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Waits until the metrics endpoint answers /healthz.
pub fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, body)) = get(addr, "/healthz") {
            assert_eq!(body, "ok\n");
            return;
        }
        assert!(Instant::now() < deadline, "no /healthz on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
