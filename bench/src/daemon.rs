//! The release daemon as the storm and footprint suites run it.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
pub(crate) use natt_monitor_tests::daemon::Daemon;
use natt_monitor_tests::net::ADDR_A;

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

/// Starts the release daemon; returns it and the time until /healthz answered 200.
pub(crate) fn start_daemon(cgroup: &Path) -> Result<(Daemon, Duration)> {
    start_daemon_in(cgroup, "observe")
}

/// As `start_daemon`, in `mode` (`observe` or `enforce`): the tests' harness, on a free port.
pub(crate) fn start_daemon_in(cgroup: &Path, mode: &str) -> Result<(Daemon, Duration)> {
    let cgroup = cgroup.to_str().context("cgroup path is not UTF-8")?;
    let t0 = Instant::now();
    let mut d = Daemon::start(&[
        "run",
        "--peer",
        ADDR_A,
        "--mode",
        mode,
        "--scope",
        "address",
        // Not pinned: a benchmark must leave no verifier on the host.
        "--pin-path",
        "none",
        "--cgroup",
        cgroup,
    ]);
    d.wait_healthy();
    Ok((d, t0.elapsed()))
}
