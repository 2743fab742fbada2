//! `splice-proxy doctor`: tells, from the outside, whether a proxy URL as written in MTC's
//! `stunnel_tcp_proxy` will carry a migration's tunnels, and if not, why.

pub mod checks;
pub mod half_close;
pub mod idle;
pub mod report;
pub mod throughput;
pub mod tls;
pub mod upgrade;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::proxy_url::{self, ProxyUrl};
use report::{Finding, Outcome, Report};

/// `doctor` flags.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The proxy exactly as in stunnel_tcp_proxy: http://user:pass@host:port.
    #[arg(value_name = "PROXY_URL")]
    pub proxy: String,
    /// Where the migration's tunnel goes (the target cluster's route), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub target: String,
    /// The API server's URL (https://HOST[:PORT]): also check that exec upgrade requests reach it
    /// through the proxy with their Upgrade header.
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// PEM file with the CA that issued the target's (and the API server's) certificate: the
    /// chain seen through the proxy must lead to it.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Also check that a tunnel stays open through this much silence after its TLS handshake
    /// and still carries bytes afterwards, and whether the proxy honours half-close. Give more
    /// than the longest silence of a migration (rsync scanning a large volume: minutes).
    #[arg(long, value_name = "DUR", value_parser = crate::duration::parse_duration_nonzero)]
    pub idle: Option<Duration>,
    /// Also measure throughput: send N MiB (1 to 4096) through a tunnel to --target and time
    /// their echo. The target must echo what it receives; otherwise the line cannot tell.
    #[arg(long = "throughput-mib", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub throughput_mib: Option<u32>,
    /// Print one JSON document instead of lines.
    #[arg(long)]
    pub json: bool,
    /// How long each step may take.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = crate::duration::parse_duration)]
    pub timeout: Duration,
}

/// A usage error: the exit-2 kind.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Url(#[from] proxy_url::UrlError),
    #[error("--target {0:?}: expected HOST:PORT with a port from 1 to 65535")]
    Target(String),
    #[error(transparent)]
    Ca(#[from] tls::CaError),
    #[error(transparent)]
    Api(#[from] upgrade::ApiError),
}

/// Checks the arguments, then runs every check; the report and its exit status.
pub fn run(args: &DoctorArgs) -> Result<Report, UsageError> {
    let url = ProxyUrl::parse(&args.proxy)?;
    check_target(&args.target)?;
    let ca = args.ca.as_deref().map(tls::Ca::load).transpose()?;
    let api = args
        .api
        .as_deref()
        .map(upgrade::ApiUrl::parse)
        .transpose()?;
    let mut report = Report {
        proxy: url.to_string(),
        target: args.target.clone(),
        findings: Vec::new(),
    };
    let (finding, tunnel) = checks::connect(&url, &args.target, args.timeout);
    report.findings.push(finding);
    let tunnels = tunnel.is_some();
    let ca = ca.as_ref();
    report
        .findings
        .push(tls::check(tunnel, &args.target, ca, args.timeout));
    if let Some(api) = &api {
        report
            .findings
            .push(upgrade::check(&url, api, ca, args.timeout));
    }
    report.findings.extend(quiet_and_bulk(&url, args, tunnels));
    Ok(report)
}

/// Checks 4 (`--idle`) and 5 (`--throughput-mib`), on tunnels of their own; not run when check
/// 1 got no tunnel. Without `--idle`, a line says how to run it: a migration needs it.
fn quiet_and_bulk(url: &ProxyUrl, args: &DoctorArgs, tunnels: bool) -> Vec<Finding> {
    let not_run = |check| Finding::new(check, Outcome::CannotTell, report::NO_TUNNEL);
    let mut out = Vec::new();
    match args.idle {
        None => out.push(Finding::new(
            idle::IDLE,
            Outcome::Skipped,
            "not run: add --idle DUR, longer than the longest silence a migration's tunnel will \
             see (rsync scanning a large volume is silent for minutes: e.g. --idle 10m), to check \
             that the proxy keeps quiet tunnels open; it also tells whether it honours half-close",
        )),
        Some(_) if !tunnels => out.extend([not_run(idle::IDLE), not_run(half_close::HALF_CLOSE)]),
        Some(idle) => {
            let (line, tls) = idle::check(url, &args.target, idle, args.timeout);
            out.push(line);
            out.push(if tls {
                half_close::check(url, &args.target, args.timeout)
            } else {
                Finding::new(
                    half_close::HALF_CLOSE,
                    Outcome::CannotTell,
                    "not run: it needs a target that answers a ClientHello through the proxy \
                     (see the idle line)",
                )
            });
        }
    }
    match args.throughput_mib {
        None => {}
        Some(_) if !tunnels => out.push(not_run(throughput::THROUGHPUT)),
        Some(mib) => out.push(throughput::check(url, &args.target, mib, args.timeout)),
    }
    out
}

fn check_target(t: &str) -> Result<(), UsageError> {
    let bad = || UsageError::Target(t.to_string());
    let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !host.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        doctor: DoctorArgs,
    }

    fn parse(extra: &[&str]) -> Result<DoctorArgs, clap::Error> {
        let mut argv = vec!["doctor", "http://proxy:3128", "--target", "route:443"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.doctor)
    }

    #[test]
    fn idle_and_throughput_flags() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.idle, a.throughput_mib), (None, None));
        let a = parse(&["--idle", "10m", "--throughput-mib", "64"]).unwrap();
        assert_eq!(a.idle, Some(Duration::from_secs(600)));
        assert_eq!(a.throughput_mib, Some(64));
        let a = parse(&["--idle", "90", "--throughput-mib", "4096"]).unwrap();
        assert_eq!(a.idle, Some(Duration::from_secs(90)));
        for bad in [
            ["--idle", "0"],
            ["--idle", "0ms"],
            ["--idle", "1 fortnight"],
            ["--throughput-mib", "0"],
            ["--throughput-mib", "4097"],
            ["--throughput-mib", "-1"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn idle_is_skipped_without_the_flag_and_not_run_without_a_tunnel() {
        let url = ProxyUrl::parse("http://proxy:3128").unwrap();
        let lines = |extra: &[&str], tunnels| {
            let found = quiet_and_bulk(&url, &parse(extra).unwrap(), tunnels);
            found
                .iter()
                .map(|f| (f.check, f.outcome))
                .collect::<Vec<_>>()
        };
        assert_eq!(lines(&[], true), [("idle", Outcome::Skipped)]);
        assert_eq!(lines(&[], false), [("idle", Outcome::Skipped)]);
        assert_eq!(
            lines(&["--idle", "1s", "--throughput-mib", "1"], false),
            [
                ("idle", Outcome::CannotTell),
                ("half-close", Outcome::CannotTell),
                ("throughput", Outcome::CannotTell),
            ]
        );
        let skipped = &quiet_and_bulk(&url, &parse(&[]).unwrap(), true)[0];
        assert!(
            skipped.reason.contains("add --idle DUR"),
            "{}",
            skipped.reason
        );
    }
}
