//! Scenario `rsync`: the path the proxy is built for (MTC's direct volume migration):
//! rsync → stunnel client (`protocol = connect`) → target → stunnel server → rsyncd, pushing a
//! generated tree (a few large files and many small ones). The peers come from the end-to-end
//! test harness (`splice-proxy-tests`), so the bench and the tests drive the same setup.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use splice_proxy_tests::peers::{self, Cert, Daemon, Manifest, TempDir, TreeSpec};

use super::{
    load::{CpuSnap, Endpoint},
    sys, targets,
};

pub struct Rig {
    dir: TempDir,
    cert: Cert,
    src: PathBuf,
    module: PathBuf,
    expected: Manifest,
    pub bytes: u64,
    pub files: usize,
    rsyncd: Daemon,
    server: Daemon,
    clients: BTreeMap<&'static str, Daemon>,
}

pub struct Push {
    pub secs: f64,
    pub total_cpu: f64,
    pub proxy_cpu: Option<f64>,
}

impl Rig {
    /// Generates the tree and starts rsyncd and the stunnel server.
    pub fn start(large_mib: u64, small_files: usize) -> Result<Rig> {
        peers::require_tools(&["stunnel", "rsync", "openssl"])?;
        let dir = TempDir::new("bench-rsync")?;
        let cert = peers::self_signed_cert(dir.path())?;
        let src = dir.join("src");
        let module = dir.join("module");
        std::fs::create_dir_all(&module)?;
        let expected = peers::generate_tree(&src, &TreeSpec::new(large_mib, small_files))?;
        let bytes = peers::manifest_bytes(&expected);
        let rsyncd = peers::rsyncd(dir.path(), "mod", &module)?;
        sys::register_group(rsyncd.pid());
        let server = peers::stunnel_server(dir.path(), &cert, rsyncd.addr)?;
        sys::register_group(server.pid());
        Ok(Rig {
            files: expected.len(),
            dir,
            cert,
            src,
            module,
            expected,
            bytes,
            rsyncd,
            server,
            clients: BTreeMap::new(),
        })
    }

    /// The port the proxies must allow CONNECT to.
    pub fn server_port(&self) -> u16 {
        self.server.addr.port()
    }

    /// One push of the whole tree into a fresh module directory, checked afterwards (untimed).
    pub fn push(&mut self, t: &targets::Running) -> Result<Push> {
        static RUN: AtomicUsize = AtomicUsize::new(0);
        if !self.clients.contains_key(t.name) {
            let proxy = match &t.endpoint {
                Endpoint::Direct => None,
                Endpoint::Proxy { addr, .. } => Some(*addr),
            };
            let client = peers::stunnel_client(
                self.dir.path(),
                &format!("stunnel-{}", t.name),
                proxy,
                self.server.addr,
                proxy.map(|_| (targets::USER, targets::PASS)),
                &self.cert.cert,
            )?;
            sys::register_group(client.pid());
            self.clients.insert(t.name, client);
        }
        let client = &self.clients[t.name];
        let sub = format!("{}-{}", t.name, RUN.fetch_add(1, Ordering::SeqCst));
        let url = format!("rsync://{}/mod/{sub}/", client.addr);
        let src = format!("{}/", self.src.display());
        let cpu = CpuSnap::take(t.pid());
        let started = Instant::now();
        let pushed = peers::run_ok(
            Command::new("rsync").args(["-a"]).arg(&src).arg(&url),
            None,
            Duration::from_secs(600),
        );
        let secs = started.elapsed().as_secs_f64();
        let (total_cpu, proxy_cpu) = cpu.since(t.pid());
        pushed.with_context(|| {
            format!(
                "rsync push through {}\n{}\n{}\n{}",
                t.name,
                client.log_report(),
                self.server.log_report(),
                self.rsyncd.log_report()
            )
        })?;
        let dst = self.module.join(&sub);
        let got = peers::hash_tree(&dst)?;
        peers::compare_manifests(&self.expected, &got)
            .with_context(|| format!("rsync through {}: the pushed tree differs", t.name))?;
        std::fs::remove_dir_all(&dst)?;
        Ok(Push {
            secs,
            total_cpu,
            proxy_cpu,
        })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for d in self.clients.values().chain([&self.server, &self.rsyncd]) {
            sys::forget_child(d.pid());
        }
    }
}
