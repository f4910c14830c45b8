//! Shared helpers for natt-monitor's privileged integration tests: skipping with a reason,
//! building packets, and guards that always clean up namespaces, cgroups and processes.

#![expect(
    clippy::missing_panics_doc,
    reason = "test helpers fail by panicking with a message; that is their contract"
)]

pub mod daemon;
pub mod net;
pub mod packets;
pub mod testrun;
pub mod vm_scenarios;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use natt_monitor::{ebpf::VerifierLoader, features::Features, scope::Scope};

/// A verifier load for `scope` of the variant the kernel probe chooses, as the daemon loads it
/// (but with the capture ring off unless asked for).
#[must_use]
pub fn loader(scope: &Scope) -> VerifierLoader<'static> {
    VerifierLoader::new(scope, Features::probe().variant())
}

/// Calls `f` every `every` until it returns `Some`, and returns its value; panics naming `what`
/// after `timeout`. The one polling loop of the tests and the bench.
pub fn eventually<T>(
    what: &str,
    every: Duration,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}

/// The `natt-monitor` binary: `NATT_MONITOR_BIN` (set by `cargo xtask test`), else the one
/// next to the running test executable (`target/<profile>/natt-monitor`).
#[must_use]
pub fn monitor_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATT_MONITOR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let p = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir")
        .join("natt-monitor");
    assert!(
        p.exists(),
        "{} not found: build it first (cargo build -p natt-monitor; `cargo xtask test` does) or set NATT_MONITOR_BIN",
        p.display()
    );
    p
}

/// GET `url` with a 10 s limit; any status is returned, not turned into an error.
///
/// # Errors
/// Connection or read failures, as text.
pub fn http_get(url: &str) -> Result<(u16, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut resp = agent.get(url).call().map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// Prints why a test is skipped and returns true when it cannot run here (not root).
/// Never a silent pass: the reason goes to stderr, which `cargo test` shows with
/// `--nocapture` and which CI logs.
#[must_use]
pub fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root (BPF program load, netns, cgroups)");
        return true;
    }
    false
}

/// A child process that is killed and reaped when dropped, so a failing test never leaves a
/// daemon, an IKE daemon or a server running.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The integer value of one exact series (`name{labels}`, as exposed) in a Prometheus text
/// exposition; `None` if it is absent or not an integer.
#[must_use]
pub fn metric(body: &str, series: &str) -> Option<u64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A pin directory of the test's own (`--pin-path`), below /sys/fs/bpf, so that a test never
/// adopts or removes a verifier that a daemon outside the suite pinned. Dropping it detaches
/// whatever is pinned there and removes the pins, even when the test failed.
#[derive(Debug)]
pub struct PinDir {
    /// The directory.
    pub path: PathBuf,
}

impl PinDir {
    /// A new, unused path (the daemon creates it, mounting bpffs if needed).
    #[must_use]
    pub fn new() -> Self {
        Self {
            path: PathBuf::from(format!(
                "{}/{}",
                natt_monitor::pin::BPFFS_ROOT,
                net::unique("natt-test-")
            )),
        }
    }

    /// The path as an argument.
    #[must_use]
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 pin path")
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = natt_monitor::pin::detach(&self.path) {
            eprintln!("cleaning up {}: {e}", self.path.display());
        }
    }
}

/// Ids of the loaded `natt_verify` programs other than a natt-monitor installed on this host
/// (the program behind the link pinned at the default pin path, which no test uses). Tests
/// assert on these alone, so the suite passes beside a running install and never touches it.
#[must_use]
pub fn test_verifiers_loaded() -> Vec<u32> {
    let link = std::path::Path::new(natt_monitor::pin::DEFAULT_PIN_PATH)
        .join(natt_monitor::pin::LINK_FILE);
    let installed = natt_monitor::pin::Link::open(&link)
        .and_then(|l| l.info())
        .map(|i| i.prog_id)
        .ok();
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some("natt_verify") && Some(p.id()) != installed)
        .map(|p| p.id())
        .collect()
}

/// `run` arguments the daemon tests share: the one static peer 192.0.2.1, no discovery,
/// attached to `cgroup`, then `extra`.
#[must_use]
pub fn one_peer_run<'a>(cgroup: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--peer",
        "192.0.2.1",
        "--discover",
        "none",
        "--cgroup",
        cgroup,
    ];
    args.extend_from_slice(extra);
    args
}
