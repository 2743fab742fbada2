//! Reloading the credentials files while the proxy runs: every file on
//! SIGHUP, and a file whose bytes changed when its directory sees events
//! ([`crate::watch`]). A bad file keeps the previous users. Each reload is
//! one log line (the user count, or the flag, file, line and reason) and
//! one `splice_proxy_credential_reloads_total` sample. Open tunnels and
//! handshakes in flight are not touched.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use crate::auth::{Authenticator, Reloaded, SourceKind};
use crate::metrics::Metrics;
use crate::watch::DirWatcher;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Every configured file is read and put in force again.
    Sighup,
    /// Only files whose bytes differ from the last read.
    FileChange,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Sighup => "SIGHUP",
            Trigger::FileChange => "file change",
        })
    }
}

/// Reloads the configured files for `trigger`, logging and counting each.
pub fn reload(auth: &Authenticator, metrics: &Metrics, trigger: Trigger) {
    for kind in SourceKind::ALL {
        let Some(path) = auth.path(kind) else {
            continue;
        };
        match auth.reload(kind, trigger == Trigger::FileChange) {
            Ok(Reloaded::Loaded(users)) => {
                metrics.credentials_reloaded(kind, true);
                tracing::info!(file = %path.display(), users, "{trigger}: {kind} reloaded");
            }
            Ok(Reloaded::Unchanged | Reloaded::NotConfigured) => {}
            Err(e) => {
                metrics.credentials_reloaded(kind, false);
                tracing::warn!(error = %e, "{trigger}: {kind} not reloaded, keeping the previous one");
            }
        }
    }
}

/// Reloads on a blocking thread: reading a file and checking bcrypt
/// entries must not stall the runtime's workers.
async fn reload_blocking(auth: &Arc<Authenticator>, metrics: &Arc<Metrics>, trigger: Trigger) {
    let (auth, metrics) = (auth.clone(), metrics.clone());
    if let Err(e) = tokio::task::spawn_blocking(move || reload(&auth, &metrics, trigger)).await {
        tracing::error!(error = %e, "{trigger}: credentials reload failed");
    }
}

/// Records the start-up load and starts reloading on SIGHUP and on changes
/// on disk. Not being able to watch is a warning (SIGHUP still reloads);
/// only failing to install the SIGHUP handler is an error.
pub fn spawn(auth: Arc<Authenticator>, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let files: Vec<PathBuf> = SourceKind::ALL
        .into_iter()
        .filter_map(|kind| auth.path(kind))
        .map(PathBuf::from)
        .collect();
    for kind in SourceKind::ALL {
        if auth.path(kind).is_some() {
            metrics.credentials_loaded(kind);
        }
    }
    let mut hup = signal(SignalKind::hangup())?;
    {
        let (auth, metrics, any) = (auth.clone(), metrics.clone(), !files.is_empty());
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if any {
                    reload_blocking(&auth, &metrics, Trigger::Sighup).await;
                } else {
                    tracing::info!("SIGHUP: no --credentials-file or --htpasswd to reload");
                }
            }
        });
    }
    if files.is_empty() {
        return Ok(());
    }
    let mut watcher = match DirWatcher::new(files) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "not watching the credentials files; SIGHUP reloads them");
            return Ok(());
        }
    };
    tokio::spawn(async move {
        // A change between the start-up read and the first watch.
        reload_blocking(&auth, &metrics, Trigger::FileChange).await;
        loop {
            if let Err(e) = watcher.next_change().await {
                tracing::warn!(error = %e, "stopped watching the credentials files; SIGHUP reloads them");
                return;
            }
            reload_blocking(&auth, &metrics, Trigger::FileChange).await;
        }
    });
    Ok(())
}
