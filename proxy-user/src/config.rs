//! Command line (and environment) → one validated [`Config`].
//!
//! Every value is checked by a clap value parser, so an error names the flag
//! it came from. Checks that involve several flags live in [`RunArgs::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cidr::IpNet;
use crate::duration::{parse_duration, parse_duration_nonzero};
use crate::keepalive::Keepalive;
use crate::limits::Limits;
use crate::parent::Parent;
use crate::policy::{DstPattern, Policy, PortSet};
use crate::proxy_url::ProxyUrl;
use crate::server::Settings;
pub use crate::tunnel::ModeArg;
use crate::tunnel::holds::{Backlog, Overrun, Start};

#[derive(Debug, Parser)]
#[command(
    name = "splice-proxy",
    version,
    about = "HTTP CONNECT proxy whose tunnels are forwarded in the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Report which data paths work on this machine, one per line:
    /// `<mode> ok` or `<mode> unavailable: <reason>`.
    Probe,
    /// Check whether a proxy (ours or not) can carry a migration's tunnels.
    Doctor(Box<crate::doctor::DoctorArgs>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address to listen on (repeatable). Default 127.0.0.1:3128.
    #[arg(long = "listen", value_name = "ADDR:PORT", env = "SPLICE_PROXY_LISTEN", value_parser = parse_listen)]
    pub listen: Vec<SocketAddr>,

    /// A user allowed to tunnel (repeatable). PASS may contain ':'.
    #[arg(long = "credentials", value_name = "USER:PASS", env = "SPLICE_PROXY_CREDENTIALS",
          value_parser = parse_credentials, hide_env_values = true)]
    pub credentials: Vec<(String, String)>,

    /// File of `user:pass` lines (plain passwords, split at the first ':');
    /// reloaded on SIGHUP and when it changes.
    #[arg(long = "credentials-file", value_name = "FILE")]
    pub credentials_file: Option<PathBuf>,

    /// htpasswd file (bcrypt, SHA1, apr1); reloaded on SIGHUP and when it changes.
    #[arg(long = "htpasswd", value_name = "FILE")]
    pub htpasswd: Option<PathBuf>,

    /// File of `user: pattern, pattern` lines (the --allow-dst syntax): each listed user may
    /// tunnel only to its own destinations; --allow-dst still applies on top. Reloaded with
    /// the users.
    #[arg(long = "user-dst", value_name = "FILE")]
    pub user_dst: Option<PathBuf>,

    /// Accept tunnels without credentials. Required for a non-loopback
    /// listener without --credentials, --credentials-file or --htpasswd.
    #[arg(long = "allow-anonymous")]
    pub allow_anonymous: bool,

    /// Client network allowed to connect (repeatable): CIDR or address.
    /// Others get 403 before their head is read. Default: every address.
    #[arg(long = "allow-src", value_name = "CIDR", value_parser = parse_src)]
    pub allow_src: Vec<IpNet>,

    /// Allowed destination (repeatable): host, *.suffix, IP or CIDR.
    /// Default: any host, except loopback, link-local and unspecified
    /// addresses unless listed.
    #[arg(long = "allow-dst", value_name = "PATTERN", value_parser = parse_dst)]
    pub allow_dst: Vec<DstPattern>,

    /// Allowed destination ports: 443 | 443,6443 | 1-65535 (repeatable). Default 443.
    #[arg(long = "allow-port", value_name = "SPEC", value_parser = parse_ports)]
    pub allow_port: Vec<PortSet>,

    /// Data path for established tunnels.
    #[arg(long = "mode", value_enum, default_value = "auto")]
    pub mode: ModeArg,

    /// sockmap: most bytes one direction of a tunnel may hold in the kernel
    /// when its reader stops (then TCP holds the sender back). 512KiB..1GiB.
    #[arg(long = "sockmap-backlog", value_name = "SIZE", default_value = "16MiB", value_parser = parse_backlog)]
    pub sockmap_backlog: Backlog,

    /// sockmap: what a direction does once its reader has fallen
    /// behind. splice: it leaves the kernel path at half the bound and is
    /// forwarded by splice(2) until its reader keeps up, then returns to the
    /// kernel. relay: once --sockmap-backlog is reached, userspace forwards it until it stops
    /// pressing against the bound (costs proxy CPU, keeps throughput);
    /// pause: the kernel forwards again after each catch-up (no proxy CPU,
    /// but a peer on the same host waits ~200 ms each time).
    #[arg(long = "sockmap-overrun", value_enum, default_value = "splice")]
    pub sockmap_overrun: Overrun,

    /// sockmap: where each direction of a tunnel starts. splice: forwarded by splice(2) until
    /// its reader has kept up for 50 ms, then on the kernel path (a short tunnel, or one whose
    /// reader is slow from the start, never uses the maps); kernel: on the kernel path from the
    /// 200 on.
    #[arg(long = "sockmap-start", value_enum, default_value = "splice")]
    pub sockmap_start: Start,

    /// Most tunnels open at once; more get 503.
    #[arg(long = "max-tunnels", value_name = "N", default_value = "10000", value_parser = parse_positive)]
    pub max_tunnels: usize,

    /// Handshakes (accept to 200 or refusal) in progress at once; more get 503.
    #[arg(long = "max-handshakes", value_name = "N", default_value = "4096", value_parser = parse_positive)]
    pub max_handshakes: usize,

    /// Connections (handshakes and tunnels) one client address may hold at
    /// once; more get 503. 0 = no cap.
    #[arg(long = "max-conns-per-ip", value_name = "N", default_value = "4096", value_parser = parse_count)]
    pub max_conns_per_ip: usize,

    /// After 5 authentication failures from one address within a minute,
    /// each further 407 to it waits 250ms, doubling, at most this long.
    /// 0 = no delay.
    #[arg(long = "auth-fail-delay", value_name = "DURATION", default_value = "5s", value_parser = parse_auth_fail_delay)]
    pub auth_fail_delay: Duration,

    /// Time allowed for the whole request head (then 408).
    #[arg(long = "header-timeout", value_name = "DURATION", default_value = "10s", value_parser = parse_duration_nonzero)]
    pub header_timeout: Duration,

    /// Time allowed to connect upstream (then 504).
    #[arg(long = "connect-timeout", value_name = "DURATION", default_value = "10s", value_parser = parse_duration_nonzero)]
    pub connect_timeout: Duration,

    /// Close a tunnel that moved no byte for this long; 0 = never.
    #[arg(long = "idle-timeout", value_name = "DURATION", default_value = "0", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// TCP keepalive on both sockets of every tunnel: IDLE,INTERVAL,COUNT (whole seconds),
    /// IDLE alone, or off. A peer that vanished is found after IDLE + INTERVAL x COUNT of
    /// silence; a quiet tunnel whose peers are alive is never cut.
    // `std::option::Option`, spelled out: the parser itself says `off`, so clap must not treat
    // the flag as optional.
    #[arg(long = "tcp-keepalive", value_name = "IDLE,INTERVAL,COUNT", default_value = "60s,15s,4", value_parser = Keepalive::parse)]
    pub tcp_keepalive: std::option::Option<Keepalive>,

    /// On SIGTERM/SIGINT, how long open tunnels may finish before they are closed.
    #[arg(long = "shutdown-grace", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format on stderr.
    #[arg(long = "log-format", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Serve Prometheus /metrics, /healthz and /readyz here. Off unless given.
    #[arg(long = "metrics-listen", value_name = "ADDR:PORT", env = "SPLICE_PROXY_METRICS_LISTEN", value_parser = parse_listen)]
    pub metrics_listen: Option<SocketAddr>,

    /// Parent proxy that every tunnel goes through (but --parent-proxy-bypass destinations):
    /// http://[USER:PASS@]HOST:PORT, percent-encoded as in MTC's stunnel_tcp_proxy. Names
    /// sent to it are resolved by it, not here.
    #[arg(long = "parent-proxy", value_name = "URL", env = "SPLICE_PROXY_PARENT_PROXY",
          hide_env_values = true, value_parser = parse_raw_url)]
    pub parent_proxy: Option<RawUrl>,

    /// File of one `user:pass` line sent to the parent proxy (Basic); reloaded on SIGHUP and
    /// when it changes. Instead of credentials in the --parent-proxy URL.
    #[arg(long = "parent-proxy-credentials", value_name = "FILE")]
    pub parent_proxy_credentials: Option<PathBuf>,

    /// Destination connected directly rather than through the parent (repeatable): host,
    /// *.suffix, IP or CIDR, matched on the target as the client wrote it (a network matches
    /// address literals: names are not resolved to decide).
    #[arg(long = "parent-proxy-bypass", value_name = "PATTERN", value_parser = parse_dst)]
    pub parent_proxy_bypass: Vec<DstPattern>,
}

/// `--parent-proxy` as given, parsed in [`RunArgs::validate`]: a clap value parser's error
/// would echo the value, password included. `Debug` never shows it.
#[derive(Clone)]
pub struct RawUrl(String);

impl std::fmt::Debug for RawUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawUrl(..)")
    }
}

fn parse_raw_url(s: &str) -> Result<RawUrl, String> {
    Ok(RawUrl(s.to_string()))
}

/// The validated configuration of `splice-proxy run`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub credentials: Vec<(String, String)>,
    pub credentials_file: Option<PathBuf>,
    pub htpasswd: Option<PathBuf>,
    pub user_dst: Option<PathBuf>,
    /// Tunnels without credentials are accepted: `--allow-anonymous`, or no
    /// credentials configured at all (allowed on loopback listeners only).
    pub allow_anonymous: bool,
    /// Client networks admitted; empty: every address.
    pub allow_src: Vec<IpNet>,
    pub allow_dst: Vec<DstPattern>,
    pub allow_port: PortSet,
    pub mode: ModeArg,
    pub sockmap_backlog: Backlog,
    pub max_tunnels: usize,
    pub max_handshakes: usize,
    pub max_conns_per_ip: usize,
    /// Zero: off.
    pub auth_fail_delay: Duration,
    pub header_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// `None`: `--tcp-keepalive off`.
    pub tcp_keepalive: Option<Keepalive>,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub metrics_listen: Option<SocketAddr>,
    /// `--parent-proxy`; its `Debug` and `Display` mask the password.
    pub parent_proxy: Option<ProxyUrl>,
    pub parent_proxy_credentials: Option<PathBuf>,
    pub parent_proxy_bypass: Vec<DstPattern>,
}

/// A configuration error: a one-line message that names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub const DEFAULT_LISTEN: &str = "127.0.0.1:3128";

impl RunArgs {
    /// Checks that span several flags and produces the [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen = if self.listen.is_empty() {
            vec![DEFAULT_LISTEN.parse().expect("valid default")]
        } else {
            self.listen
        };
        let has_credentials = !self.credentials.is_empty()
            || self.credentials_file.is_some()
            || self.htpasswd.is_some();
        if !has_credentials && !self.allow_anonymous {
            if let Some(public) = listen.iter().find(|a| !a.ip().is_loopback()) {
                return Err(ConfigError(format!(
                    "--listen {public}: a non-loopback listener needs --credentials, --credentials-file or --htpasswd (or --allow-anonymous, with --allow-src for the client networks that may use it)"
                )));
            }
        }
        for (flag, path) in [
            ("--credentials-file", &self.credentials_file),
            ("--htpasswd", &self.htpasswd),
            ("--user-dst", &self.user_dst),
            ("--parent-proxy-credentials", &self.parent_proxy_credentials),
        ] {
            if let Some(path) = path {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(ConfigError(format!("{flag} {}: {e}", path.display())));
                }
            }
        }
        if let Some(m) = self.metrics_listen {
            if listen.contains(&m) {
                return Err(ConfigError(format!(
                    "--metrics-listen {m}: also a --listen address"
                )));
            }
        }
        let parent_proxy = self.parent_proxy.as_ref().map(check_parent).transpose()?;
        match &parent_proxy {
            None if !self.parent_proxy_bypass.is_empty() => {
                return Err(ConfigError(
                    "--parent-proxy-bypass: there is no --parent-proxy to bypass".into(),
                ));
            }
            None if self.parent_proxy_credentials.is_some() => {
                return Err(ConfigError(
                    "--parent-proxy-credentials: there is no --parent-proxy to send them to".into(),
                ));
            }
            Some(url) if url.user.is_some() && self.parent_proxy_credentials.is_some() => {
                return Err(ConfigError(format!(
                    "--parent-proxy-credentials: {url} holds credentials already; give them in one place"
                )));
            }
            _ => {}
        }
        let allow_port = if self.allow_port.is_empty() {
            PortSet::single(443)
        } else {
            PortSet::union(self.allow_port)
        };
        Ok(Config {
            listen,
            credentials: self.credentials,
            credentials_file: self.credentials_file,
            htpasswd: self.htpasswd,
            user_dst: self.user_dst,
            allow_anonymous: self.allow_anonymous || !has_credentials,
            allow_src: self.allow_src,
            allow_dst: self.allow_dst,
            allow_port,
            mode: self.mode,
            sockmap_backlog: self
                .sockmap_backlog
                .with_overrun(self.sockmap_overrun)
                .with_start(self.sockmap_start),
            max_tunnels: self.max_tunnels,
            max_handshakes: self.max_handshakes,
            max_conns_per_ip: self.max_conns_per_ip,
            auth_fail_delay: self.auth_fail_delay,
            header_timeout: self.header_timeout,
            connect_timeout: self.connect_timeout,
            idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            tcp_keepalive: self.tcp_keepalive,
            shutdown_grace: self.shutdown_grace,
            log_format: self.log_format,
            metrics_listen: self.metrics_listen,
            parent_proxy,
            parent_proxy_credentials: self.parent_proxy_credentials,
            parent_proxy_bypass: self.parent_proxy_bypass,
        })
    }
}

/// Parses `--parent-proxy`; an error names the flag and never holds the password.
fn check_parent(raw: &RawUrl) -> Result<ProxyUrl, ConfigError> {
    ProxyUrl::parse(&raw.0).map_err(|e| ConfigError(format!("--parent-proxy: {e}")))
}

impl Config {
    /// What the server needs: the destination policy, the connection limits and the timeouts.
    pub fn server_settings(&self) -> Settings {
        Settings {
            policy: Policy::new(self.allow_dst.clone(), self.allow_port.clone()),
            limits: Limits::new(
                self.max_handshakes,
                self.max_conns_per_ip,
                self.auth_fail_delay,
            )
            .with_allow_src(self.allow_src.clone()),
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            keepalive: self.tcp_keepalive,
            max_tunnels: self.max_tunnels,
            parent: self
                .parent_proxy
                .clone()
                .map(|url| Parent::new(url, self.parent_proxy_bypass.clone())),
        }
    }

    /// A warning when `--allow-dst` has address patterns and a parent proxy resolves names:
    /// those patterns then allow address literals only, never a name sent to the parent (it is
    /// not resolved here). Not an error: literal targets (MTC's NodePorts) are checked exactly.
    pub fn parent_policy_warning(&self) -> Option<String> {
        self.parent_proxy.as_ref()?;
        let nets: Vec<String> = self
            .allow_dst
            .iter()
            .filter(|p| matches!(p, DstPattern::Net(_)))
            .map(|p| p.to_string())
            .collect();
        if nets.is_empty() {
            return None;
        }
        Some(format!(
            "--allow-dst {}: with --parent-proxy, names are resolved by the parent, so these \
             allow address literals only; a name through the parent needs a name pattern \
             (host or *.suffix) in --allow-dst",
            nets.join(", ")
        ))
    }

    /// A warning when anonymous tunnels are open to every address that can
    /// reach a non-loopback listener; `None` when `--allow-src` says who may
    /// connect (anonymous by source network is a real mode: stunnel with
    /// empty credentials sends no Proxy-Authorization at all).
    pub fn open_proxy_warning(&self) -> Option<String> {
        if !self.allow_anonymous || !self.allow_src.is_empty() {
            return None;
        }
        let public = self.listen.iter().find(|a| !a.ip().is_loopback())?;
        Some(format!(
            "--listen {public}: anonymous tunnels from any client address (an open proxy); \
             --allow-src limits who may connect"
        ))
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:3128 or [::]:3128".to_string())
}

fn parse_credentials(s: &str) -> Result<(String, String), String> {
    let (user, pass) = s
        .split_once(':')
        .ok_or_else(|| "expected USER:PASS".to_string())?;
    if user.is_empty() {
        return Err("the user name is empty".into());
    }
    if pass.is_empty() {
        return Err("the password is empty".into());
    }
    Ok((user.to_string(), pass.to_string()))
}

fn parse_src(s: &str) -> Result<IpNet, String> {
    IpNet::parse(s.trim()).map_err(|e| e.to_string())
}

fn parse_dst(s: &str) -> Result<DstPattern, String> {
    DstPattern::parse(s)
}

fn parse_ports(s: &str) -> Result<PortSet, String> {
    PortSet::parse(s)
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number".into()),
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    s.parse::<usize>()
        .map_err(|_| "expected a whole number (0 = no limit)".into())
}

fn parse_auth_fail_delay(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > Duration::from_secs(60) {
        return Err("at most 60s (0 = off)".into());
    }
    Ok(d)
}

/// `16MiB`, `512KiB`, `1GiB` (or K/M/G, KB/MB/GB as binary units), or a bare byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a size like 16MiB or 512KiB: {s:?}"))?;
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("unknown unit {unit:?}: use KiB, MiB or GiB")),
    };
    n.checked_mul(scale).ok_or_else(|| "too large".to_string())
}

fn parse_backlog(s: &str) -> Result<Backlog, String> {
    let bytes = parse_size(s)?;
    if bytes > 1 << 30 {
        return Err("at most 1GiB".into());
    }
    Backlog::new(bytes).ok_or_else(|| {
        format!(
            "at least {}KiB (room for a receive buffer and a few segments)",
            Backlog::MIN_BYTES >> 10
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["splice-proxy", "run"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(a) => a.validate().map_err(|e| e.0),
            Command::Probe | Command::Doctor(_) => unreachable!(),
        }
    }

    #[test]
    fn credentials_split_on_first_colon() {
        assert_eq!(
            parse_credentials("u:p:a:ss").unwrap(),
            ("u".into(), "p:a:ss".into())
        );
        assert!(parse_credentials("nocolon").is_err());
        assert!(parse_credentials(":pass").is_err());
        assert!(parse_credentials("user:").is_err());
    }

    #[test]
    fn defaults() {
        let c = run_args(&[]).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:3128".parse().unwrap()]);
        assert!(c.allow_port.contains(443) && !c.allow_port.contains(80));
        assert_eq!(c.mode, ModeArg::Auto);
        assert_eq!(c.header_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.max_handshakes, 4096);
        assert_eq!(c.max_conns_per_ip, 4096);
        assert_eq!(c.auth_fail_delay, Duration::from_secs(5));
        assert_eq!(c.sockmap_backlog, Backlog::default());
        assert_eq!(c.sockmap_backlog.overrun(), Overrun::Splice);
        let relay = run_args(&["--sockmap-overrun", "relay"]).unwrap();
        assert_eq!(relay.sockmap_backlog.overrun(), Overrun::Relay);
        let pause = run_args(&["--sockmap-overrun", "pause", "--sockmap-backlog", "1MiB"]).unwrap();
        assert_eq!(pause.sockmap_backlog.overrun(), Overrun::Pause);
        assert_eq!(pause.sockmap_backlog.bytes(), 1 << 20);
        assert_eq!(c.sockmap_backlog.start(), Start::Splice);
        let kernel = run_args(&["--sockmap-start", "kernel"]).unwrap();
        assert_eq!(kernel.sockmap_backlog.start(), Start::Kernel);
        assert_eq!(
            run_args(&["--max-conns-per-ip", "0"])
                .unwrap()
                .max_conns_per_ip,
            0
        );
        // Loopback without credentials: an open proxy for this host only.
        assert!(c.allow_anonymous);
        assert!(!run_args(&["--credentials", "u:p"]).unwrap().allow_anonymous);
    }

    #[test]
    fn public_listener_needs_credentials() {
        let e = run_args(&["--listen", "0.0.0.0:3128"]).unwrap_err();
        assert!(e.contains("--listen"), "{e}");
        assert!(run_args(&["--listen", "0.0.0.0:3128", "--allow-anonymous"]).is_ok());
        assert!(run_args(&["--listen", "0.0.0.0:3128", "--credentials", "a:b"]).is_ok());
        let file = std::env::temp_dir().join(format!("splice-config-{}", std::process::id()));
        std::fs::write(&file, "a:b\n").unwrap();
        let c = run_args(&[
            "--listen",
            "0.0.0.0:3128",
            "--credentials-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(c.credentials_file.as_deref(), Some(file.as_path()));
        assert!(!c.allow_anonymous);
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn allow_src_networks_and_anonymous_by_source() {
        let c = run_args(&["--allow-src", "10.0.0.0/8", "--allow-src", "fd00::/8"]).unwrap();
        assert_eq!(
            c.allow_src,
            [
                IpNet::parse("10.0.0.0/8").unwrap(),
                IpNet::parse("fd00::/8").unwrap()
            ]
        );
        assert!(run_args(&[]).unwrap().allow_src.is_empty());
        // Anonymous on a non-loopback listener: --allow-anonymous is all it
        // takes; without --allow-src it starts with a warning, with it none.
        let open = run_args(&["--listen", "0.0.0.0:3128", "--allow-anonymous"]).unwrap();
        let warning = open.open_proxy_warning().unwrap();
        assert!(
            warning.contains("--listen 0.0.0.0:3128") && warning.contains("--allow-src"),
            "{warning}"
        );
        let by_source = run_args(&[
            "--listen",
            "0.0.0.0:3128",
            "--allow-anonymous",
            "--allow-src",
            "10.0.0.0/8",
        ])
        .unwrap();
        assert!(by_source.allow_anonymous);
        assert_eq!(by_source.open_proxy_warning(), None);
        // --allow-src alone is not consent to anonymous tunnels.
        let e = run_args(&["--listen", "0.0.0.0:3128", "--allow-src", "10.0.0.0/8"]).unwrap_err();
        assert!(e.contains("--allow-anonymous"), "{e}");
        // No warning on loopback, nor with credentials only.
        assert_eq!(run_args(&[]).unwrap().open_proxy_warning(), None);
        let creds = run_args(&["--listen", "0.0.0.0:3128", "--credentials", "a:b"]).unwrap();
        assert_eq!(creds.open_proxy_warning(), None);
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (&["--allow-port", "0"][..], "--allow-port"),
            (&["--mode", "bogus"][..], "--mode"),
            (&["--sockmap-overrun", "drop"][..], "--sockmap-overrun"),
            (&["--sockmap-start", "later"][..], "--sockmap-start"),
            (&["--listen", "nowhere"][..], "--listen"),
            (&["--header-timeout", "0"][..], "--header-timeout"),
            (&["--max-tunnels", "0"][..], "--max-tunnels"),
            (&["--max-handshakes", "0"][..], "--max-handshakes"),
            (&["--max-handshakes", "many"][..], "--max-handshakes"),
            (&["--max-conns-per-ip=-1"][..], "--max-conns-per-ip"),
            (&["--max-conns-per-ip", "lots"][..], "--max-conns-per-ip"),
            (&["--auth-fail-delay", "soon"][..], "--auth-fail-delay"),
            (&["--auth-fail-delay", "2h"][..], "--auth-fail-delay"),
            (&["--allow-dst", "10.0.0.0/33"][..], "--allow-dst"),
            (&["--allow-src", "10.0.0.0/33"][..], "--allow-src"),
            (&["--allow-src", "example.com"][..], "--allow-src"),
            (&["--allow-src", "*.example.com"][..], "--allow-src"),
            (&["--htpasswd", "/nonexistent/htpasswd"][..], "--htpasswd"),
            (
                &["--credentials-file", "/nonexistent/creds"][..],
                "--credentials-file",
            ),
            (&["--metrics-listen", "9090"][..], "--metrics-listen"),
            (
                &["--metrics-listen", "127.0.0.1:3128"][..],
                "--metrics-listen",
            ),
        ] {
            let e = run_args(args).unwrap_err();
            assert!(e.lines().next().unwrap().contains(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn parent_proxy_flags() {
        let c = run_args(&[
            "--parent-proxy",
            "http://up:s3cr%3Aet@proxy.corp:3128",
            "--parent-proxy-bypass",
            "*.svc.cluster.local",
            "--parent-proxy-bypass",
            "10.0.0.0/8",
        ])
        .unwrap();
        let url = c.parent_proxy.clone().unwrap();
        assert_eq!(url.password.as_deref(), Some("s3cr:et"));
        assert_eq!(c.parent_proxy_bypass.len(), 2);
        assert!(!format!("{c:?}").contains("s3cr"), "{c:?}");
        assert!(c.server_settings().parent.is_some());
        assert!(run_args(&[]).unwrap().server_settings().parent.is_none());
        assert_eq!(c.parent_policy_warning(), None);
        let nets = run_args(&[
            "--parent-proxy",
            "http://proxy.corp:3128",
            "--allow-dst",
            "10.0.0.0/8",
            "--allow-dst",
            "*.apps.example",
        ])
        .unwrap();
        let w = nets.parent_policy_warning().unwrap();
        assert!(w.starts_with("--allow-dst 10.0.0.0/8: "), "{w}");
        assert_eq!(
            run_args(&["--allow-dst", "10.0.0.0/8"])
                .unwrap()
                .parent_policy_warning(),
            None
        );

        let file = std::env::temp_dir().join(format!("splice-parent-{}", std::process::id()));
        std::fs::write(&file, "up:pw\n").unwrap();
        let f = file.to_str().unwrap();
        let c = run_args(&[
            "--parent-proxy",
            "http://proxy.corp:3128",
            "--parent-proxy-credentials",
            f,
        ])
        .unwrap();
        assert_eq!(c.parent_proxy_credentials.as_deref(), Some(file.as_path()));
        for (args, needle) in [
            (
                &["--parent-proxy-bypass", "a.example"][..],
                "no --parent-proxy to bypass",
            ),
            (
                &["--parent-proxy-credentials", f][..],
                "no --parent-proxy to send them to",
            ),
            (
                &[
                    "--parent-proxy",
                    "http://u:hunter2@proxy.corp:3128",
                    "--parent-proxy-credentials",
                    f,
                ][..],
                "in one place",
            ),
            (
                &["--parent-proxy", "http://u:hunter2@proxy.corp"][..],
                "no port",
            ),
            (
                &["--parent-proxy", "https://u:hunter2@proxy.corp:1"][..],
                "http://",
            ),
            (
                &["--parent-proxy", "http://u:hunter2%zz@proxy.corp:1"][..],
                "percent",
            ),
            (
                &[
                    "--parent-proxy",
                    "http://proxy.corp:1",
                    "--parent-proxy-credentials",
                    "/nonexistent/c",
                ][..],
                "/nonexistent/c",
            ),
        ] {
            let e = run_args(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
            assert!(e.starts_with("--parent-proxy"), "{args:?}: {e}");
            assert!(!e.contains("hunter2"), "{args:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        std::fs::remove_file(&file).unwrap();
    }
}
