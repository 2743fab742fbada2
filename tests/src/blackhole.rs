//! A peer that vanishes without a FIN or a reset: every TCP segment to or from one local port is
//! dropped, on loopback, while a [`Blackhole`] lives (an nftables table of its own, deleted on
//! drop). Used by the fault matrix and the keepalive tests.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

/// Drops every TCP segment to or from one local port while it lives.
pub struct Blackhole {
    table: String,
}

impl Blackhole {
    pub fn port(port: u16) -> Result<Blackhole> {
        let table = format!("splice_blackhole_{}_{port}", std::process::id());
        let script = format!(
            "table inet {table} {{\n  chain input {{\n    type filter hook input priority -300; \
             policy accept;\n    tcp sport {port} drop\n    tcp dport {port} drop\n  }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&script)).context("installing the blackhole (nft)")?;
        Ok(Blackhole { table })
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = nft(&["delete", "table", "inet", &self.table], None);
    }
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("nft (nftables) must be installed")?;
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
