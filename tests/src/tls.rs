//! TLS peers for the end-to-end tests: a CA and the certificates it issues, made with the
//! openssl CLI in a temp dir, and a small TLS server (rustls, a thread per connection) whose
//! handler the test chooses.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::peers::run_ok;

/// How long one openssl command may take.
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);

/// A PEM certificate and its key.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pem {
    /// `<stem>.pem` and `<stem>.key` in `dir`.
    fn named(dir: &Path, stem: &str) -> Pem {
        Pem {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// `openssl req` with a new P-256 key written to `key` and subject `CN=<cn>`: a self-signed
/// certificate (openssl's default v3_ca extensions: basicConstraints CA:TRUE) with `-x509`, a
/// signing request with `-new`; written to `out`.
fn new_key_and(kind: &str, key: &Path, out: &Path, cn: &str) -> Result<()> {
    run_ok(
        Command::new("openssl")
            .args(["req", kind, "-days", "2", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .arg("-keyout")
            .arg(key)
            .arg("-out")
            .arg(out)
            .args(["-subj", &format!("/CN={cn}")]),
        None,
        OPENSSL_TIMEOUT,
    )?;
    Ok(())
}

/// Makes a self-signed P-256 CA named `CN=<cn>`, files `<stem>.pem` and `<stem>.key` in `dir`.
pub fn make_ca(dir: &Path, stem: &str, cn: &str) -> Result<Pem> {
    let pem = Pem::named(dir, stem);
    new_key_and("-x509", &pem.key, &pem.cert, cn)?;
    Ok(pem)
}

/// Makes a server certificate issued by `ca` for `CN=<cn>` with the given subjectAltNames
/// (`IP:127.0.0.1,DNS:x`), files `<stem>.pem` and `<stem>.key` in `dir`.
pub fn issue(dir: &Path, ca: &Pem, stem: &str, cn: &str, san: &str) -> Result<Pem> {
    let pem = Pem::named(dir, stem);
    let csr = dir.join(format!("{stem}.csr"));
    let ext = dir.join(format!("{stem}.ext"));
    std::fs::write(
        &ext,
        format!(
            "subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth\n"
        ),
    )?;
    new_key_and("-new", &pem.key, &csr, cn)?;
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&ca.cert)
            .arg("-CAkey")
            .arg(&ca.key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&pem.cert),
        None,
        OPENSSL_TIMEOUT,
    )?;
    Ok(pem)
}

/// What a [`TlsServer`] does with each connection once its handshake is done.
pub type Handler = Arc<dyn Fn(&mut StreamOwned<ServerConnection, TcpStream>) + Send + Sync>;

/// A TLS server on 127.0.0.1:<free port>; stops accepting on drop.
pub struct TlsServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl TlsServer {
    /// Serves `pem` (its certificate file may hold the chain) and runs `handler` on each
    /// connection, a thread each.
    pub fn start(pem: &Pem, handler: Handler) -> Result<TlsServer> {
        Self::spawn(pem, handler, usize::MAX)
    }

    /// Like [`TlsServer::start`], closing its listening socket after the first connection: a
    /// target that only the first comer (the proxy) reaches.
    pub fn start_single(pem: &Pem, handler: Handler) -> Result<TlsServer> {
        Self::spawn(pem, handler, 1)
    }

    fn spawn(pem: &Pem, handler: Handler, accepts: usize) -> Result<TlsServer> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pem.cert)
            .context("read certificate")?
            .collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&pem.key).context("read key")?;
        let provider = provider();
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut left = accepts;
            while left > 0 && !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        left -= 1;
                        let config = config.clone();
                        let handler = handler.clone();
                        std::thread::spawn(move || serve(tcp, config, handler));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(TlsServer { addr, stop })
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(tcp: TcpStream, config: Arc<ServerConfig>, handler: Handler) {
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = ServerConnection::new(config) else {
        return;
    };
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return;
        }
    }
    handler(&mut tls);
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// A handler that reads until the client closes (a target that only needs the handshake).
pub fn hold() -> Handler {
    Arc::new(|s| {
        let mut buf = [0u8; 1024];
        while s.read(&mut buf).is_ok_and(|n| n > 0) {}
    })
}

/// Reads a request head (up to the blank line) from `s`.
pub fn read_request_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).is_ok_and(|n| n == 1) {
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// rustls with *ring*, which builds with the C compiler alone. rustls 0.23.48 deprecates ring's
/// provider because it has no post-quantum key exchange; every TLS server also speaks X25519 or
/// P-256, and a handshake made to look at certificates needs nothing more.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
