//! The admin endpoint `--metrics-listen` serves: `/metrics` (the registry's text),
//! `/healthz` and `/readyz`, one request per connection, a few connections at a time, so that
//! a scraper or a probe can never hold the proxy up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Metrics;

/// Largest request head the endpoint reads.
const MAX_HEAD: usize = 8 * 1024;
/// Time one endpoint connection may take, request and response.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);
/// Endpoint connections served at once; more are closed at accept.
const MAX_CONNS: usize = 64;

/// Binds the endpoint's listener; an error names the flag.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)
        .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
    Ok(sock.listen(64)?)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the
/// process exits (it keeps answering during the shutdown drain).
///
/// Start it once the proxy listeners are bound and the data path is chosen:
/// `/readyz` is 200 from then on, and 503 as soon as `stopping` fires.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stopping: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            // EMFILE and friends: the proxy's accept loop logs them.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed
        };
        let (metrics, stopping) = (metrics.clone(), stopping.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONN_TIMEOUT, answer(conn, &metrics, &stopping)).await;
            drop(permit);
        });
    }
}

/// Reads one request, writes one response, closes.
async fn answer(mut conn: TcpStream, metrics: &Metrics, stopping: &CancellationToken) {
    let response = match read_head(&mut conn).await {
        Ok(Some((method, path))) => route(&method, &path, metrics, stopping),
        Ok(None) => return, // closed before a complete head
        Err(status) => Response::text(status, ""),
    };
    if conn.write_all(&response.to_bytes()).await.is_ok() {
        let _ = conn.shutdown().await;
    }
}

/// The method and path of a request head; `Err` is the status to answer.
async fn read_head(conn: &mut TcpStream) -> Result<Option<(String, String)>, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                return Ok(Some((method, path)));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(431),
            Err(httparse::Error::TooManyHeaders) => return Err(431),
            Err(_) => return Err(400),
        }
    }
}

fn route(method: &str, path: &str, metrics: &Metrics, stopping: &CancellationToken) -> Response {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return Response::text(404, "not found\n");
    }
    if method != "GET" {
        return Response {
            allow_get: true,
            ..Response::text(405, "method not allowed\n")
        };
    }
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: prometheus_text::CONTENT_TYPE,
            body: metrics.render(),
            allow_get: false,
        },
        "/healthz" => Response::text(200, "ok\n"),
        _ if stopping.is_cancelled() => Response::text(503, "shutting down\n"),
        _ => Response::text(200, "ready\n"),
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    allow_get: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
            allow_get: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let allow = if self.allow_get { "Allow: GET\r\n" } else { "" };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::Mode;

    async fn endpoint() -> (SocketAddr, CancellationToken) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stopping = CancellationToken::new();
        let metrics = Arc::new(Metrics::new(Mode::Copy));
        tokio::spawn(serve(listener, metrics, stopping.clone()));
        (addr, stopping)
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    fn status_line(response: &str) -> &str {
        response.lines().next().unwrap_or_default()
    }

    #[tokio::test]
    async fn endpoint_routes() {
        let (addr, stopping) = endpoint().await;
        let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = exchange(addr, get("/metrics").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("Connection: close\r\n"), "{r}");
        assert!(r.contains("\r\n\r\n# HELP "), "{r}");
        assert!(r.contains(r#"splice_proxy_info{mode="copy"} 1"#), "{r}");
        let r = exchange(addr, get("/healthz").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
        assert!(r.ends_with("\r\n\r\nok\n"), "{r}");
        let r = exchange(addr, get("/readyz").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
        let r = exchange(addr, get("/").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 404 Not Found");
        let r = exchange(addr, get("/metricsx").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 404 Not Found");
        let r = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 405 Method Not Allowed");
        assert!(r.contains("Allow: GET\r\n"), "{r}");
        let r = exchange(addr, b"\x16\x03\x01 not http\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 400 Bad Request");
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        let r = exchange(addr, huge.as_bytes()).await;
        assert_eq!(
            status_line(&r),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        // Split across writes.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /heal").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write_all(b"thz HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert_eq!(status_line(&out), "HTTP/1.1 200 OK");

        stopping.cancel();
        let r = exchange(addr, get("/readyz").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 503 Service Unavailable");
        let r = exchange(addr, get("/healthz").as_bytes()).await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn silent_or_slow_clients_do_not_hold_the_endpoint() {
        let (addr, _stopping) = endpoint().await;
        // Closing without a request gets no response.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.shutdown().await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty());
        // A silent client is closed at the connection timeout.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty());
        assert!(started.elapsed() >= CONN_TIMEOUT - Duration::from_millis(100));
    }
}
