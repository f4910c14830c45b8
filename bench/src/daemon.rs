//! The release daemon as the storm and footprint suites run it.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use natt_monitor_tests::{KillOnDrop, http_get, monitor_bin, net::ADDR_A};

pub(crate) fn vm_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) struct Daemon {
    pub(crate) child: KillOnDrop,
    pub(crate) port: u16,
}

/// Starts the release daemon; returns it and the time until /healthz answered 200.
pub(crate) fn start_daemon(cgroup: &Path) -> Result<(Daemon, Duration)> {
    start_daemon_in(cgroup, "observe")
}

/// As `start_daemon`, in `mode` (`observe` or `enforce`).
pub(crate) fn start_daemon_in(cgroup: &Path, mode: &str) -> Result<(Daemon, Duration)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let t0 = Instant::now();
    let child = Command::new(monitor_bin())
        // Not pinned: a benchmark must leave no verifier on the host.
        .args([
            "run",
            "--peer",
            ADDR_A,
            "--mode",
            mode,
            "--scope",
            "address",
            "--pin-path",
            "none",
        ])
        .arg("--cgroup")
        .arg(cgroup)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting natt-monitor")?;
    let d = Daemon {
        child: KillOnDrop(child),
        port,
    };
    loop {
        if let Ok((200, _)) = http_get(&format!("http://127.0.0.1:{port}/healthz")) {
            return Ok((d, t0.elapsed()));
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("natt-monitor did not become healthy within 20 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
