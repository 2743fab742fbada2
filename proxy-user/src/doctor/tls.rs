//! Check 2: is TLS through the tunnel untouched? A handshake to the target over the tunnel that
//! check 1 opened records the certificate chain the far end presents (it is not refused when
//! untrusted: an intercepting proxy's chain is exactly what this check wants to see), then that
//! chain is judged against `--ca` and against the chain the target presents directly.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore,
    SignatureScheme, StreamOwned,
};

use super::report::{Finding, NO_TUNNEL, Outcome};

/// Name of this check in the report.
pub const TLS: &str = "tls";

/// The CAs of `--ca`, read once.
#[derive(Clone)]
pub struct Ca {
    roots: Arc<RootCertStore>,
}

/// Why `--ca FILE` cannot be used (a usage error).
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("--ca {0}: {1}")]
    Read(String, String),
    #[error("--ca {0}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")]
    Empty(String),
}

impl Ca {
    /// Reads every certificate of a PEM file; all must be usable as trust anchors.
    pub fn load(path: &Path) -> Result<Ca, CaError> {
        let shown = path.display().to_string();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| CaError::Read(shown.clone(), e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| CaError::Read(shown.clone(), e.to_string()))?;
        if certs.is_empty() {
            return Err(CaError::Empty(shown));
        }
        let mut roots = RootCertStore::empty();
        for c in certs {
            roots
                .add(c)
                .map_err(|e| CaError::Read(shown.clone(), format!("not a CA certificate: {e}")))?;
        }
        Ok(Ca {
            roots: Arc::new(roots),
        })
    }
}

/// What `--ca` says of a presented chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaVerdict {
    /// The chain leads to a certificate of `--ca`, valid now and for the target's name.
    Chains,
    /// The chain leads to `--ca`, with a problem that is the target's, not the proxy's (expired,
    /// issued for another name).
    ChainsBut(String),
    /// The chain does not lead to `--ca`: someone else issued it.
    Untrusted(String),
}

impl CaVerdict {
    /// Sorts webpki's answer: only a chain that does not reach `--ca` is someone else's.
    fn from_result(r: Result<(), rustls::Error>) -> CaVerdict {
        use CertificateError as E;
        match r {
            Ok(()) => CaVerdict::Chains,
            Err(rustls::Error::InvalidCertificate(e)) => match e {
                E::Expired | E::ExpiredContext { .. } => {
                    CaVerdict::ChainsBut("the certificate has expired".into())
                }
                E::NotValidYet | E::NotValidYetContext { .. } => {
                    CaVerdict::ChainsBut("the certificate is not valid yet".into())
                }
                E::NotValidForName | E::NotValidForNameContext { .. } => CaVerdict::ChainsBut(
                    "the certificate is not issued for the target's name or address".into(),
                ),
                E::UnknownIssuer => CaVerdict::Untrusted("it does not chain to --ca".into()),
                E::BadSignature => CaVerdict::Untrusted(
                    "its signature does not verify against the issuer in --ca".into(),
                ),
                other => {
                    CaVerdict::Untrusted(format!("it does not verify against --ca ({other:?})"))
                }
            },
            Err(other) => {
                CaVerdict::Untrusted(format!("it does not verify against --ca ({other})"))
            }
        }
    }
}

/// One certificate as this check talks about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub der: Vec<u8>,
    /// The issuer's distinguished name, e.g. `CN=Squid CA, O=Example`.
    pub issuer: String,
    pub subject: String,
}

impl Leaf {
    fn from_der(der: &[u8]) -> Leaf {
        let (issuer, subject) = match x509_parser::parse_x509_certificate(der) {
            Ok((_, c)) => (c.issuer().to_string(), c.subject().to_string()),
            Err(_) => ("(unparsable certificate)".into(), "(unparsable)".into()),
        };
        Leaf {
            der: der.to_vec(),
            issuer: name_or_empty(issuer),
            subject: name_or_empty(subject),
        }
    }

    fn self_signed(&self) -> bool {
        self.issuer == self.subject
    }
}

fn name_or_empty(n: String) -> String {
    if n.is_empty() {
        "(empty name)".into()
    } else {
        n
    }
}

/// What one handshake saw: the server's leaf and, with `--ca`, the verdict on its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub leaf: Leaf,
    pub ca: Option<CaVerdict>,
}

/// A TLS client session that completed its handshake, for requests after it.
pub type Session = StreamOwned<ClientConnection, TcpStream>;

/// A verifier that accepts any chain but keeps it, and with `--ca` what webpki says of it. The
/// handshake's own signatures are still checked, against the presented leaf.
#[derive(Debug)]
struct Recorder {
    ca: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
    seen: Mutex<Option<Seen>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = self.ca.as_ref().map(|v| {
            let r =
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
            CaVerdict::from_result(r.map(|_| ()))
        });
        let seen = Seen {
            leaf: Leaf::from_der(end_entity),
            ca,
        };
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed), as the TLS server name:
/// SNI for a name, none for an address.
pub fn server_name(hostport: &str) -> Result<ServerName<'static>, String> {
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is neither a DNS name nor an IP address"))
}

/// A TLS client for `name` that never refuses the chain, for one who only needs its ClientHello
/// (the half-close check).
pub fn client(name: ServerName<'static>) -> Result<ClientConnection, String> {
    recording_client(name, None, &[]).map(|(conn, _)| conn)
}

/// A TLS client for `name` that never refuses the chain, and what records it.
fn recording_client(
    name: ServerName<'static>,
    ca: Option<&Ca>,
    alpn: &[&[u8]],
) -> Result<(ClientConnection, Arc<Recorder>), String> {
    let provider = provider();
    let ca_verifier = match ca {
        Some(ca) => Some(
            WebPkiServerVerifier::builder_with_provider(ca.roots.clone(), provider.clone())
                .build()
                .map_err(|e| format!("--ca cannot be used: {e}"))?,
        ),
        None => None,
    };
    let recorder = Arc::new(Recorder {
        ca: ca_verifier,
        algorithms: provider.signature_verification_algorithms,
        seen: Mutex::new(None),
    });
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let conn = ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    Ok((conn, recorder))
}

/// Runs a TLS handshake over `tcp` to `name`, never refusing the chain; returns the session and
/// what was seen. `alpn` is offered as is (`http/1.1` for the API server, nothing for stunnel).
pub fn handshake(
    tcp: TcpStream,
    name: ServerName<'static>,
    ca: Option<&Ca>,
    alpn: &[&[u8]],
) -> Result<(Session, Seen), String> {
    let (conn, recorder) = recording_client(name, ca, alpn)?;
    let mut session = StreamOwned::new(conn, tcp);
    while session.conn.is_handshaking() {
        if let Err(e) = session.conn.complete_io(&mut session.sock) {
            return Err(handshake_error(&e));
        }
    }
    let seen = recorder
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| "the server presented no certificate".to_string())?;
    Ok((session, seen))
}

/// A handshake failure in words: what the other end did.
fn handshake_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            "the connection closed during the TLS handshake".into()
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "no TLS answer within the timeout".into()
        }
        _ => format!("the TLS handshake failed ({e})"),
    }
}

/// The chain the target presents when reached without the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direct {
    /// Not reachable from here (the usual case behind a proxy).
    Unreachable(String),
    /// Reachable, but no TLS handshake completed.
    NoTls(String),
    Seen(Leaf),
}

/// Connects to `target` without the proxy and records its leaf.
pub fn direct(target: &str, timeout: Duration) -> Direct {
    let addrs: Vec<_> = match target.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Direct::Unreachable(format!("cannot resolve it here: {e}")),
    };
    let mut last = "no address".to_string();
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(timeout));
                let _ = s.set_write_timeout(Some(timeout));
                let name = match server_name(target) {
                    Ok(n) => n,
                    Err(e) => return Direct::NoTls(e),
                };
                return match handshake(s, name, None, &[]) {
                    Ok((_, seen)) => Direct::Seen(seen.leaf),
                    Err(e) => Direct::NoTls(e),
                };
            }
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Direct::Unreachable(last)
}

/// Runs check 2 over the tunnel of check 1 (`None` when check 1 failed).
pub fn check(
    tunnel: Option<TcpStream>,
    target: &str,
    ca: Option<&Ca>,
    timeout: Duration,
) -> Finding {
    let Some(tunnel) = tunnel else {
        return Finding::new(TLS, Outcome::CannotTell, NO_TUNNEL);
    };
    let through = server_name(target).and_then(|n| handshake(tunnel, n, ca, &[]).map(|(_, s)| s));
    let direct = direct(target, timeout);
    classify(target, &through, &direct)
}

/// Judges the chain seen through the proxy against `--ca` and the direct chain. A chain that
/// leads to `--ca` settles it (a proxy cannot forge one without the CA's key); without `--ca`,
/// the direct chain decides.
pub fn classify(target: &str, through: &Result<Seen, String>, direct: &Direct) -> Finding {
    let seen = match through {
        Ok(s) => s,
        Err(e) => return handshake_failed(target, e, direct),
    };
    let leaf = &seen.leaf;
    let issuer = &leaf.issuer;
    let cert = format!(
        "a certificate for {} issued by {issuer}{}",
        leaf.subject,
        if leaf.self_signed() {
            " (self-signed)"
        } else {
            ""
        }
    );
    // Who presents it: the proxy, once the evidence says it intercepts.
    let presented = format!("the proxy presents {cert}");
    let unsure = format!("through the proxy the server presents {cert}");
    let direct_leaf = match direct {
        Direct::Seen(d) => Some(d),
        _ => None,
    };
    let same_directly = direct_leaf.is_some_and(|d| d.der == leaf.der);
    let other_directly = direct_leaf.filter(|d| d.der != leaf.der);
    let (outcome, why) = match &seen.ca {
        Some(CaVerdict::Chains) | Some(CaVerdict::ChainsBut(_)) => {
            let mut why = format!(
                "untouched: the certificate through the proxy chains to --ca (issuer {issuer})"
            );
            if same_directly {
                why.push_str(" and is the one the target presents directly");
            } else if let Some(d) = other_directly {
                why.push_str(&format!(
                    "; directly the target presents another one (issuer {}): several servers \
                     behind {target}?",
                    d.issuer
                ));
            }
            if let Some(CaVerdict::ChainsBut(problem)) = &seen.ca {
                why.push_str(&format!(
                    "; but {problem}: fix it on the target if stunnel checks it"
                ));
            }
            (Outcome::Pass, why)
        }
        Some(CaVerdict::Untrusted(reason)) => {
            let also = match other_directly {
                Some(d) => format!(
                    ", and the target itself presents one issued by {}",
                    d.issuer
                ),
                None if same_directly => "; the same certificate comes back without the proxy, \
                                          so either --ca is not the CA that issued the target's \
                                          certificate or TLS is intercepted on the direct path \
                                          too"
                .into(),
                None => String::new(),
            };
            (
                Outcome::Fail,
                format!("{presented} and {reason}{also}: {INTERCEPTS}"),
            )
        }
        None if same_directly => (
            Outcome::Pass,
            format!(
                "untouched: through the proxy the target presents the same certificate as \
                 directly (issuer {issuer})"
            ),
        ),
        None => match other_directly {
            Some(d) if d.issuer != leaf.issuer => (
                Outcome::Fail,
                format!(
                    "{presented}, but the target itself presents one issued by {}: {INTERCEPTS}",
                    d.issuer
                ),
            ),
            Some(_) => (
                Outcome::CannotTell,
                format!(
                    "{unsure}; directly the target presents another certificate from the \
                     same issuer name: several servers behind {target}, or a proxy that copies \
                     the issuer's name; run with --ca to tell"
                ),
            ),
            None => (
                Outcome::CannotTell,
                format!(
                    "{unsure}; {}, so only --ca FILE (the CA that issued the target's \
                     certificate) can tell whether the proxy intercepts TLS",
                    direct_words(direct)
                ),
            ),
        },
    };
    Finding::new(TLS, outcome, why)
}

/// What an intercepting proxy means for the migration, and what to ask for.
const INTERCEPTS: &str = "it intercepts TLS (Squid ssl_bump bump, or a TLS-inspecting \
                          firewall): stunnel's session will fail; ask the proxy's owners to \
                          exempt this destination from TLS inspection (ssl_bump splice)";

/// Check 2 when no handshake completed through the tunnel.
fn handshake_failed(target: &str, e: &str, direct: &Direct) -> Finding {
    let (outcome, why) = match direct {
        Direct::Seen(d) => (
            Outcome::Fail,
            format!(
                "through the proxy {e}, while directly the target completes one (issuer {}): \
                 the proxy breaks TLS to {target}; stunnel's session will fail",
                d.issuer
            ),
        ),
        Direct::NoTls(d) => (
            Outcome::CannotTell,
            format!(
                "no TLS handshake with {target}, through the proxy ({e}) nor directly ({d}): \
                 is --target the TLS endpoint of the migration (the route's host:443)?"
            ),
        ),
        Direct::Unreachable(_) => (
            Outcome::Fail,
            format!(
                "through the proxy {e}: stunnel's session will fail the same way; check that \
                 --target is the TLS endpoint of the migration and that the proxy does not \
                 filter TLS"
            ),
        ),
    };
    Finding::new(TLS, outcome, why)
}

/// Why there is no direct chain to compare with, as a clause.
fn direct_words(d: &Direct) -> String {
    match d {
        Direct::Unreachable(why) => {
            format!("the target is not reachable directly from here ({why})")
        }
        Direct::NoTls(why) => format!("directly, no TLS handshake completed ({why})"),
        Direct::Seen(_) => "the target was reached directly".into(),
    }
}

/// rustls with *ring*, which builds with the C compiler alone. rustls 0.23.48 deprecates ring's
/// provider because it has no post-quantum key exchange; every TLS server also speaks X25519 or
/// P-256, and a handshake made to look at certificates needs nothing more.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(der: u8, issuer: &str) -> Leaf {
        Leaf {
            der: vec![der],
            issuer: issuer.into(),
            subject: "CN=stunnel.example".into(),
        }
    }

    /// Classifies a leaf (`der`, `issuer`) seen through the proxy with `ca`'s verdict.
    fn judge(der: u8, issuer: &str, ca: Option<CaVerdict>, direct: Direct) -> Finding {
        let seen = Ok(Seen {
            leaf: leaf(der, issuer),
            ca,
        });
        classify("t:443", &seen, &direct)
    }

    fn unreachable() -> Direct {
        Direct::Unreachable("10.0.0.1:443: timed out".into())
    }

    fn route() -> Direct {
        Direct::Seen(leaf(1, "CN=Route CA"))
    }

    fn untrusted() -> Option<CaVerdict> {
        Some(CaVerdict::Untrusted("it does not chain to --ca".into()))
    }

    #[test]
    fn same_leaf_directly_is_untouched() {
        judge(1, "CN=Route CA", None, route())
            .expect(Outcome::Pass, &["same certificate as directly"]);
    }

    #[test]
    fn another_issuer_than_directly_is_interception_naming_it() {
        judge(2, "CN=Squid CA, O=Corp", None, route()).expect(
            Outcome::Fail,
            &[
                "issued by CN=Squid CA, O=Corp",
                "issued by CN=Route CA",
                "intercepts TLS",
            ],
        );
    }

    #[test]
    fn another_leaf_from_the_same_issuer_name_cannot_tell_without_ca() {
        judge(2, "CN=Route CA", None, route()).expect(Outcome::CannotTell, &["--ca"]);
        // With --ca saying it chains, the proxy cannot have forged it.
        judge(2, "CN=Route CA", Some(CaVerdict::Chains), route())
            .expect(Outcome::Pass, &["several servers"]);
    }

    #[test]
    fn not_chaining_to_ca_is_interception() {
        judge(2, "CN=Squid CA", untrusted(), unreachable()).expect(
            Outcome::Fail,
            &[
                "issued by CN=Squid CA and it does not chain to --ca",
                "stunnel's session will fail",
            ],
        );
        // The same leaf directly: still a failure, with the two explanations.
        let same = Direct::Seen(leaf(2, "CN=Squid CA"));
        judge(2, "CN=Squid CA", untrusted(), same)
            .expect(Outcome::Fail, &["either --ca is not the CA"]);
    }

    #[test]
    fn chaining_to_ca_passes_and_target_problems_are_noted() {
        judge(1, "CN=Route CA", Some(CaVerdict::Chains), unreachable())
            .expect(Outcome::Pass, &["chains to --ca (issuer CN=Route CA)"]);
        let expired = Some(CaVerdict::ChainsBut("the certificate has expired".into()));
        judge(1, "CN=Route CA", expired, route()).expect(
            Outcome::Pass,
            &["presents directly; but the certificate has expired"],
        );
    }

    #[test]
    fn nothing_to_compare_with_cannot_tell_and_names_the_issuer() {
        judge(1, "CN=Who Knows", None, unreachable()).expect(
            Outcome::CannotTell,
            &[
                "issued by CN=Who Knows",
                "not reachable directly from here (10.0.0.1:443: timed out)",
            ],
        );
        judge(1, "CN=Who Knows", None, Direct::NoTls("reset".into()))
            .expect(Outcome::CannotTell, &["no TLS handshake completed (reset)"]);
    }

    #[test]
    fn a_handshake_that_fails_only_through_the_proxy_is_a_failure() {
        let e: Result<Seen, String> = Err("the connection closed during the TLS handshake".into());
        classify("t:443", &e, &route()).expect(Outcome::Fail, &["the proxy breaks TLS"]);
        classify("t:443", &e, &Direct::NoTls("not TLS".into()))
            .expect(Outcome::CannotTell, &["nor directly (not TLS)"]);
        classify("t:443", &e, &unreachable()).expect(Outcome::Fail, &["fail the same way"]);
    }

    #[test]
    fn webpki_answers_are_sorted() {
        use rustls::Error::InvalidCertificate as Bad;
        let sort = |e| CaVerdict::from_result(Err(Bad(e)));
        assert_eq!(CaVerdict::from_result(Ok(())), CaVerdict::Chains);
        for e in [
            CertificateError::UnknownIssuer,
            CertificateError::BadSignature,
        ] {
            assert!(matches!(sort(e), CaVerdict::Untrusted(_)));
        }
        for e in [CertificateError::NotValidForName, CertificateError::Expired] {
            assert!(matches!(sort(e), CaVerdict::ChainsBut(_)));
        }
    }

    #[test]
    fn server_names_from_targets() {
        assert!(matches!(
            server_name("route.example:443"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("10.0.0.1:443"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]:443"),
            Ok(ServerName::IpAddress(_))
        ));
    }
}
