//! Listeners, the accept loop, and the life of one connection:
//! accept → admit (limits) → read request → authenticate → authorize →
//! connect → reply → hand off to the data path → log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept_backoff::{self, AcceptBackoff};
use crate::access_log::Record;
use crate::auth::{AuthError, Authenticator, Identity};
use crate::keepalive::Keepalive;
use crate::limits::{Admission, Limits};
use crate::metrics::Metrics;
use crate::parent::Parent;
use crate::policy::{Denied, Policy};
use crate::refusal::{Refusal, Status};
use crate::request::{self, RequestError};
use crate::tunnel::{self, DataPath, Handoff};
use crate::upstream::Connector;

/// Everything a connection needs, shared by all of them.
pub struct Proxy {
    pub auth: Arc<Authenticator>,
    pub policy: Policy,
    pub connector: Connector,
    pub datapath: DataPath,
    pub header_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Set on both sockets of every connection; `None`: off.
    pub keepalive: Option<Keepalive>,
    pub metrics: Arc<Metrics>,
    /// `--parent-proxy`: tunnels go through it, but those it bypasses.
    parent: Option<Parent>,
    limits: Limits,
    tunnels: Arc<Semaphore>,
    /// Cancelled when the shutdown grace has run out: open tunnels close.
    close_tunnels: CancellationToken,
}

/// A handshake that succeeded: the upstream socket and what it holds on to.
struct Established<'a> {
    upstream: TcpStream,
    handoff: Handoff<'a>,
    _permit: OwnedSemaphorePermit,
}

/// A handshake that did not reach its `200`.
enum Failed {
    /// Answered with this refusal, then closed.
    Refused(Refusal),
    /// Closed without an answer (the client went away or sent nothing);
    /// why, for the access log.
    Silent(String),
}

impl From<Refusal> for Failed {
    fn from(r: Refusal) -> Failed {
        Failed::Refused(r)
    }
}

/// What the server needs from the configuration, built by `config.rs` (configuration flows one
/// way: the server never reads CLI types).
pub struct Settings {
    /// `--allow-dst` and `--allow-port`.
    pub policy: Policy,
    /// `--allow-src`, `--max-handshakes`, `--max-conns-per-ip`, `--auth-fail-delay`.
    pub limits: Limits,
    pub header_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// `--tcp-keepalive`.
    pub keepalive: Option<Keepalive>,
    pub max_tunnels: usize,
    /// `--parent-proxy` and `--parent-proxy-bypass`.
    pub parent: Option<Parent>,
}

impl Proxy {
    pub fn new(
        settings: Settings,
        auth: Arc<Authenticator>,
        connector: Connector,
        datapath: DataPath,
        metrics: Arc<Metrics>,
    ) -> Proxy {
        Proxy {
            auth,
            policy: settings.policy,
            connector,
            datapath,
            header_timeout: settings.header_timeout,
            idle_timeout: settings.idle_timeout,
            keepalive: settings.keepalive,
            metrics,
            parent: settings.parent,
            limits: settings.limits,
            tunnels: Arc::new(Semaphore::new(settings.max_tunnels)),
            close_tunnels: CancellationToken::new(),
        }
    }

    /// Serves one accepted connection to its end.
    async fn serve_connection(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        let accepted = Instant::now();
        let mode = self.datapath.mode();
        let mut record = Record::new(peer, mode);
        // Admit: a source not in --allow-src (403) or a connection over a
        // limit (503) is answered and closed at once, without reading the head.
        let mut admission = match self.limits.admit(peer.ip()) {
            Ok(a) => a,
            Err(limit) => {
                self.metrics.limit_rejected(limit.label());
                let refusal = Refusal::Limit(limit);
                record.refused(&refusal);
                self.metrics.answered(refusal.status().code());
                refuse_at_once(client, &refusal);
                record.emit();
                return;
            }
        };
        // Boxed: the handshake's future is freed once it is done, while this one lives as long
        // as the tunnel; and matched in a `let`, so that its result is not kept beside `est`
        // for the tunnel's life (see `a_connection_future_is_small`).
        let est = match Box::pin(self.handshake(&mut client, &mut record, &mut admission)).await {
            Ok(est) => est,
            Err(Failed::Refused(refusal)) => {
                record.refused(&refusal);
                self.metrics.answered(refusal.status().code());
                refuse(client, &refusal, &mut admission).await;
                record.emit();
                return;
            }
            Err(Failed::Silent(why)) => {
                record.error = Some(why);
                record.emit();
                return;
            }
        };
        self.metrics.handshake_done(accepted.elapsed());
        self.metrics.answered(200);
        let active = self.metrics.tunnel_opened(mode);
        let outcome = tunnel::forward(
            mode,
            est.handoff,
            client,
            est.upstream,
            self.idle_timeout,
            self.close_tunnels.clone(),
        )
        .await;
        record.finish(outcome);
        // The tunnel is over: its gauge and its --max-tunnels permit go before its counts and
        // its log line.
        drop(active);
        drop(est._permit);
        self.count_ended(&record);
        record.emit();
    }

    /// Counts an ended tunnel: how it ended, its bytes (with those sent around the
    /// handshake, as the access log has them), and what its sockmap directions did.
    fn count_ended(&self, record: &Record) {
        let Some(o) = &record.outcome else { return };
        let (up, down) = record.bytes();
        self.metrics.tunnel_ended(record.mode, &o.end, up, down);
        self.metrics.relays_started(o.relays);
        self.metrics
            .left_kernel(o.detaches, o.rearms, o.spliced_bytes);
    }

    async fn handshake(
        &self,
        client: &mut TcpStream,
        record: &mut Record,
        admission: &mut Admission,
    ) -> Result<Established<'_>, Failed> {
        // Read the request head, within the header timeout.
        let read = tokio::time::timeout(self.header_timeout, request::read_request(client)).await;
        let (req, early_bytes) = match read {
            Err(_) => return Err(Refusal::HeaderTimeout(self.header_timeout).into()),
            Ok(Err(RequestError::Closed)) => {
                return Err(Failed::Silent("closed before a complete head".into()));
            }
            Ok(Err(e)) => return Err(Refusal::Request(e).into()),
            Ok(Ok(r)) => r,
        };
        record.target = Some(req.target.to_string());

        // Authenticate. Repeated failures from one address: its 407s wait.
        let ip = record.client.ip();
        let user = match self.authenticate(req.proxy_authorization).await {
            Ok(user) => {
                self.limits.auth_succeeded(ip);
                user
            }
            Err(e) => {
                if let AuthError::Wrong(u) = &e {
                    record.user = Some(u.clone());
                }
                self.metrics.auth_failed();
                let delay = self.limits.auth_failed(ip);
                if !delay.is_zero() {
                    self.metrics.auth_delayed();
                    tokio::time::sleep(delay).await;
                }
                return Err(Refusal::Auth(e).into());
            }
        };
        record.user = user;

        // Which way: through the parent proxy (which resolves the name), or directly.
        let parent = self.parent.as_ref().filter(|p| p.routes(&req.target));
        record.parent = parent.map(Parent::authority);

        // Authorize the destination name and port, then against the user's own destinations
        // (--user-dst), if it has any. A name for the parent is judged by name alone.
        let check = |p: &Policy| match parent {
            Some(_) => p.check_unresolved(&req.target),
            None => p.check_target(&req.target),
        };
        check(&self.policy).map_err(Refusal::Denied)?;
        let user_dst = self.auth.user_destinations();
        let user_policy = user_dst
            .as_deref()
            .zip(record.user.as_deref())
            .and_then(|(d, user)| d.for_user(user));
        if let Some(p) = user_policy {
            check(p).map_err(|d| Refusal::Denied(Denied::ForUser(Box::new(d))))?;
        }

        // Take a tunnel slot.
        let permit = self
            .tunnels
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::MaxTunnels)?;

        // Connect upstream (every resolved address is checked by the policy), or have the
        // parent open the tunnel; the bytes it sent after its 2xx go to the client first.
        let (mut upstream, resolved, from_parent) = match parent {
            None => {
                let (upstream, resolved) = self
                    .connector
                    .connect(&req.target, &self.policy, user_policy)
                    .await
                    .map_err(|e| {
                        self.metrics.connect_failed(e.kind());
                        Refusal::Connect(e)
                    })?;
                (upstream, resolved, Vec::new())
            }
            Some(parent) => {
                let opened = Box::pin(self.through_parent(parent, &req.target)).await?;
                (opened.stream, opened.addr, opened.early)
            }
        };
        record.resolved = Some(resolved);
        let _ = upstream.set_nodelay(true);
        self.set_keepalive(&upstream, "upstream");

        // Bytes the client sent right after its head go first, in order.
        if !early_bytes.is_empty() {
            upstream
                .write_all(&early_bytes)
                .await
                .map_err(Refusal::EarlyBytes)?;
            record.early_bytes = early_bytes.len() as u64;
        }

        // The data path's part of the handoff that precedes the reply.
        let handoff = self
            .datapath
            .register(client, &upstream)
            .await
            .map_err(|error| Refusal::Handoff {
                mode: self.datapath.mode(),
                error,
            })?;

        // Reply, with what the parent sent after its 2xx right behind, in the same write: before
        // the data path moves a byte.
        let reply = if from_parent.is_empty() {
            std::borrow::Cow::Borrowed(Status::ESTABLISHED)
        } else {
            record.early_down = from_parent.len() as u64;
            std::borrow::Cow::Owned([Status::ESTABLISHED, &from_parent].concat())
        };
        client
            .write_all(&reply)
            .await
            .map_err(|e| Failed::Silent(format!("writing the 200: {e}")))?;
        admission.handshake_over();
        record.status = Some(200);
        Ok(Established {
            upstream,
            handoff,
            _permit: permit,
        })
    }

    /// Asks the parent for a tunnel to `target`, with the credentials in force
    /// (`--parent-proxy-credentials`, reloaded, else the URL's); counts the result.
    async fn through_parent(
        &self,
        parent: &Parent,
        target: &crate::request::Target,
    ) -> Result<crate::parent::Opened, Refusal> {
        let file = self.auth.parent_credentials();
        let creds = match file.as_ref().and_then(|c| c.pair.as_ref()) {
            Some((user, pass)) => Some((user.as_str(), pass.as_str())),
            None => parent.url_credentials(),
        };
        match parent.open(&self.connector, target, creds).await {
            Ok(opened) => {
                self.metrics.parent_connected("ok");
                Ok(opened)
            }
            Err(f) => {
                self.metrics.parent_connected(f.kind());
                Err(Refusal::Parent(f))
            }
        }
    }

    /// Keepalive finds a peer that vanished from a quiet tunnel (client sockets inherit it from
    /// the listener, see [`bind`]). A socket that refuses the option still carries its tunnel:
    /// that is logged, not refused.
    fn set_keepalive(&self, sock: &TcpStream, side: &str) {
        if let Some(ka) = &self.keepalive {
            if let Err(error) = ka.apply(sock) {
                tracing::debug!(side, %error, "setting TCP keepalive");
            }
        }
    }

    async fn authenticate(&self, header: Option<Vec<u8>>) -> Result<Identity, AuthError> {
        if self.auth.needs_blocking() {
            let auth = self.auth.clone();
            tokio::task::spawn_blocking(move || auth.authenticate(header.as_deref()))
                .await
                .unwrap_or(Err(AuthError::Malformed))
        } else {
            self.auth.authenticate(header.as_deref())
        }
    }
}

/// Answers a refused request and closes. The client may still be sending
/// (an oversize head, say): read and drop a little of it so the close does
/// not turn into a reset that destroys the response before it is read.
/// The handshake slot is released once the response is written.
async fn refuse(mut client: TcpStream, refusal: &Refusal, admission: &mut Admission) {
    let written = client.write_all(&refusal.response()).await;
    admission.handshake_over();
    if written.is_err() {
        return;
    }
    let _ = client.shutdown().await;
    let drain = async {
        // On the heap, allocated only here: an array would sit in every connection's future
        // (the state of this await point), 16 KiB for each idle tunnel.
        let mut sink = vec![0u8; 16 * 1024];
        let mut total = 0usize;
        while let Ok(n) = client.read(&mut sink).await {
            total += n;
            if n == 0 || total > 1024 * 1024 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Answers a connection refused at accept by a limit and closes it without
/// waiting: a flood beyond the limits holds no descriptor past this call.
/// Whatever the client sent already is read first, so the close is a FIN
/// rather than a reset that could destroy the response.
fn refuse_at_once(client: TcpStream, refusal: &Refusal) {
    use std::io::{Read, Write};
    // Non-blocking: the response fits an empty socket buffer, and reading
    // takes only what has arrived.
    let Ok(mut client) = client.into_std() else {
        return;
    };
    let _ = client.write(&refusal.response());
    let mut sink = [0u8; 16 * 1024];
    let _ = client.read(&mut sink);
    let _ = client.shutdown(std::net::Shutdown::Write);
}

/// Binds every listen address; an error names the address.
///
/// `TCP_NODELAY` and the keepalive options are set on the listening sockets: Linux copies them
/// into every socket it accepts (and starts the keepalive timer there), so a client socket costs
/// no system call for them.
pub async fn bind(
    addrs: &[SocketAddr],
    keepalive: Option<Keepalive>,
) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for addr in addrs {
        let sock = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        sock.set_reuseaddr(true)?;
        sock.set_nodelay(true)?;
        if let Some(ka) = keepalive {
            ka.apply(&sock)
                .map_err(|e| anyhow::anyhow!("--listen {addr}: setting TCP keepalive: {e}"))?;
        }
        sock.bind(*addr)
            .map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
        out.push(sock.listen(1024)?);
    }
    Ok(out)
}

/// Accepts on every listener until `stop` fires, then lets open tunnels
/// finish for up to `grace` before closing them.
pub async fn serve(
    proxy: Arc<Proxy>,
    listeners: Vec<TcpListener>,
    stop: CancellationToken,
    grace: Duration,
) {
    let tracker = TaskTracker::new();
    let accept_loops = TaskTracker::new();
    for listener in listeners {
        let (proxy, tracker, stop) = (proxy.clone(), tracker.clone(), stop.clone());
        accept_loops.spawn(async move {
            accept_loop(listener, proxy, tracker, stop).await;
        });
    }
    accept_loops.close();
    accept_loops.wait().await;
    // Listeners are closed now: new clients are refused by the kernel.
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(
            open,
            grace_s = grace.as_secs_f64(),
            "draining open connections"
        );
    }
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            open = tracker.len(),
            "shutdown grace over: closing the remaining tunnels"
        );
        proxy.close_tunnels.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = backoff.quiet() => {
                backoff.recovered();
                continue;
            }
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((conn, peer)) => {
                tracker.spawn(proxy.clone().serve_connection(conn, peer));
            }
            Err(e) => {
                // EMFILE and friends: the backlog keeps the listener
                // readable, so wait rather than spin.
                proxy.metrics.accept_failed(accept_backoff::kind(&e));
                let wait = backoff.failed(&e);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::testing::StaticResolver;
    use std::collections::HashMap;

    fn test_proxy(resolver: StaticResolver) -> Arc<Proxy> {
        let cli = <crate::config::Cli as clap::Parser>::parse_from([
            "splice-proxy",
            "run",
            "--allow-anonymous",
            "--allow-port",
            "1-65535",
        ]);
        let crate::config::Command::Run(args) = cli.command else {
            unreachable!()
        };
        let cfg = args.validate().unwrap();
        let auth = Arc::new(Authenticator::new(&[], None, None, None, true).unwrap());
        let connector = Connector {
            resolver: Arc::new(resolver),
            timeout: Duration::from_secs(2),
        };
        let metrics = Arc::new(Metrics::new(crate::tunnel::Mode::Copy));
        Arc::new(Proxy::new(
            cfg.server_settings(),
            auth,
            connector,
            DataPath::Copy,
            metrics,
        ))
    }

    async fn start(resolver: StaticResolver) -> (SocketAddr, CancellationToken) {
        let proxy = test_proxy(resolver);
        let listeners = bind(&["127.0.0.1:0".parse().unwrap()], Some(Keepalive::DEFAULT))
            .await
            .unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            proxy,
            listeners,
            stop.clone(),
            Duration::from_secs(1),
        ));
        (addr, stop)
    }

    /// The whole response to a CONNECT to `target`.
    async fn response_for(addr: SocketAddr, target: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn status_for(addr: SocketAddr, target: &str) -> String {
        let out = response_for(addr, target).await;
        out.lines().next().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn dns_failure_on_the_wire_is_502_dns_error() {
        let (addr, stop) = start(StaticResolver(HashMap::new())).await;
        let out = response_for(addr, "unknown.test:443").await;
        assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
        assert!(
            out.contains("\r\nProxy-Status: splice-proxy; error=dns_error; details=\"DNS lookup of unknown.test failed"),
            "{out}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn name_resolving_to_loopback_is_403_on_the_wire() {
        let table = HashMap::from([(
            "rebind.test".to_string(),
            vec!["127.0.0.1".parse().unwrap()],
        )]);
        let (addr, stop) = start(StaticResolver(table)).await;
        let line = status_for(addr, "rebind.test:443").await;
        assert!(line.starts_with("HTTP/1.1 403 "), "{line}");
        stop.cancel();
    }

    /// Every connection's future lives as long as its tunnel, so an idle tunnel's userspace
    /// memory is mostly this future, sized by its largest await point. A 16 KiB drain buffer
    /// held across an await in `refuse` once made it 21 KiB for every tunnel (18 KiB of RSS per
    /// idle tunnel); the data paths' own futures are boxed, so only the one a tunnel uses is
    /// allocated. 1,920 bytes then; 952 once the sockmap registration was boxed (async
    /// functions keep a moved value's slot: it was stored four times in `forward` and twice
    /// here) and the handshake's result no longer outlived it.
    #[tokio::test]
    async fn a_connection_future_is_small() {
        let proxy = test_proxy(StaticResolver(HashMap::new()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let peer = c.local_addr().unwrap();
        let fut = proxy.serve_connection(c, peer);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1280, "a connection's future is {size} bytes");
    }

    /// Client sockets get TCP_NODELAY and keepalive from the listener, with no system call of
    /// their own (the handshake path used to make five per connection for them).
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive_from_the_listener() {
        let ka = Keepalive::parse("7s,3s,5").unwrap();
        let listeners = bind(&["127.0.0.1:0".parse().unwrap()], ka).await.unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listeners[0].accept().await.unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.nodelay().unwrap(), "TCP_NODELAY");
        assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE");
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(sock.keepalive_retries().unwrap(), 5);

        // --tcp-keepalive off: nothing is turned on.
        let listeners = bind(&["127.0.0.1:0".parse().unwrap()], None).await.unwrap();
        let _c = TcpStream::connect(listeners[0].local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listeners[0].accept().await.unwrap();
        assert!(!socket2::SockRef::from(&accepted).keepalive().unwrap());
    }
}
