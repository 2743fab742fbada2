//! `splice-proxy doctor`: tells, from the outside, whether a proxy URL as written in MTC's
//! `stunnel_tcp_proxy` will carry a migration's tunnels, and if not, why.

pub mod checks;
pub mod report;
pub mod tls;
pub mod upgrade;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::proxy_url::{self, ProxyUrl};
use report::Report;

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
    let ca = ca.as_ref();
    report
        .findings
        .push(tls::check(tunnel, &args.target, ca, args.timeout));
    if let Some(api) = &api {
        report
            .findings
            .push(upgrade::check(&url, api, ca, args.timeout));
    }
    Ok(report)
}

fn check_target(t: &str) -> Result<(), UsageError> {
    let bad = || UsageError::Target(t.to_string());
    let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !host.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}
