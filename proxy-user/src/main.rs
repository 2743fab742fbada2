//! The `splice-proxy` command line: parse, validate, run. Nothing else.
//!
//! `unsafe` is denied here except in [`raise_fd_limit`], which calls libc.
#![deny(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use splice_proxy::auth::Authenticator;
use splice_proxy::config::{Cli, Command, Config, LogFormat};
use splice_proxy::metrics::{self, Metrics};
use splice_proxy::reload;
use splice_proxy::server::{self, Proxy};
use splice_proxy::tunnel;
use splice_proxy::upstream::{Connector, SystemResolver};

/// Exit status for any configuration error.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line that names the flag; clap's extra lines are usage hints.
            let text = e.render().to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::Probe => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let Ok(runtime) = runtime else {
                eprintln!("error: starting the runtime");
                return ExitCode::FAILURE;
            };
            for line in runtime.block_on(tunnel::probe_report()) {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Command::Doctor(args) => match splice_proxy::doctor::run(&args) {
            Err(e) => config_error(e),
            Ok(report) => {
                let out = if args.json {
                    report.json()
                } else {
                    report.text()
                };
                print!("{}{}", out, if args.json { "\n" } else { "" });
                ExitCode::from(report.exit_code())
            }
        },
        Command::Run(args) => match args.validate() {
            Err(e) => config_error(e),
            Ok(cfg) => run(cfg),
        },
    }
}

fn config_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(EXIT_CONFIG)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Raises the open-file limit to its hard maximum: every tunnel holds two
/// sockets (and, in splice mode, two pipes).
#[allow(unsafe_code)]
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn run(cfg: Config) -> ExitCode {
    // Everything that can be wrong with the configuration is checked before
    // the runtime starts, so it exits 2 with one line.
    let auth = match Authenticator::new(
        &cfg.credentials,
        cfg.credentials_file.as_deref(),
        cfg.htpasswd.as_deref(),
        cfg.user_dst.as_deref(),
        cfg.allow_anonymous,
    )
    .and_then(|a| a.with_parent_credentials(cfg.parent_proxy_credentials.as_deref()))
    {
        Ok(a) => Arc::new(a),
        // Names the flag, the file and the line.
        Err(e) => return config_error(e),
    };
    init_logging(cfg.log_format);
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let selection = match runtime.block_on(tunnel::select(cfg.mode, cfg.sockmap_backlog)) {
        Ok(s) => s,
        Err(reason) => {
            let mode = clap::ValueEnum::to_possible_value(&cfg.mode).expect("not skipped");
            return config_error(format_args!("--mode {}: {reason}", mode.get_name()));
        }
    };
    match runtime.block_on(serve(cfg, auth, selection)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Binding a listener is the usual failure: the message names --listen.
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn serve(
    cfg: Config,
    auth: Arc<Authenticator>,
    selection: tunnel::Selection,
) -> anyhow::Result<()> {
    let listeners = server::bind(&cfg.listen, cfg.tcp_keepalive).await?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(metrics::admin::bind(addr).await?),
        None => None,
    };
    if let Some(why) = &selection.fallback_warning {
        tracing::warn!("{why}");
    }
    if let Some(open) = cfg.open_proxy_warning() {
        tracing::warn!("{open}");
    }
    if let Some(names) = cfg.parent_policy_warning() {
        tracing::warn!("{names}");
    }
    let connector = Connector {
        resolver: Arc::new(SystemResolver),
        timeout: cfg.connect_timeout,
    };
    let mode = selection.datapath.mode();
    let mut metrics = Metrics::new(mode);
    if let tunnel::DataPath::Sockmap(sockmap) = &selection.datapath {
        metrics.register_program_stats(sockmap.kernel_stats());
    }
    if cfg.parent_proxy.is_some() {
        metrics.expect_parent();
    }
    let metrics = Arc::new(metrics);
    let proxy = Arc::new(Proxy::new(
        cfg.server_settings(),
        auth.clone(),
        connector,
        selection.datapath,
        metrics.clone(),
    ));
    let stop = CancellationToken::new();
    spawn_signal_handlers(stop.clone()).context("installing signal handlers")?;
    reload::spawn(auth, metrics.clone()).context("installing the SIGHUP handler")?;
    // Listeners bound, data path chosen (and attached): ready until `stop`.
    if let Some(listener) = metrics_listener {
        tokio::spawn(metrics::admin::serve(listener, metrics, stop.clone()));
    }
    tracing::info!(
        listen = ?cfg.listen,
        metrics = ?cfg.metrics_listen,
        mode = %mode,
        users = auth_summary(&cfg),
        allow_src = src_summary(&cfg),
        parent_proxy = cfg.parent_proxy.as_ref().map_or("-".to_string(), |u| u.to_string()),
        tcp_keepalive = cfg.tcp_keepalive.map_or("off".to_string(), |k| k.to_string()),
        "splice-proxy ready"
    );
    server::serve(proxy, listeners, stop, cfg.shutdown_grace).await;
    tracing::info!("splice-proxy stopped");
    Ok(())
}

fn auth_summary(cfg: &Config) -> String {
    let mut parts = Vec::new();
    if !cfg.credentials.is_empty() {
        parts.push(format!("{} static", cfg.credentials.len()));
    }
    if let Some(p) = &cfg.credentials_file {
        parts.push(format!("credentials file {}", p.display()));
    }
    if let Some(p) = &cfg.htpasswd {
        parts.push(format!("htpasswd {}", p.display()));
    }
    if cfg.allow_anonymous {
        parts.push("anonymous allowed".into());
    }
    parts.join(", ")
}

/// The client networks admitted, for the ready line.
fn src_summary(cfg: &Config) -> String {
    if cfg.allow_src.is_empty() {
        return "any".into();
    }
    let nets: Vec<String> = cfg.allow_src.iter().map(ToString::to_string).collect();
    nets.join(", ")
}

/// SIGTERM/SIGINT start the drain (SIGHUP is [`reload`]'s).
fn spawn_signal_handlers(stop: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: no longer accepting, draining"),
            _ = int.recv() => tracing::info!("SIGINT: no longer accepting, draining"),
        }
        stop.cancel();
    });
    Ok(())
}
