//! The `natt-monitor` binary end to end (root only): argument errors, a real run against the
//! namespace lab with JSON logs, and clean detach on SIGTERM and SIGINT.
//!
//! The binary comes from `NATT_MONITOR_BIN` (set by `cargo xtask test`) or the target directory
//! next to this test executable.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use natt_monitor_tests::{
    net::{ADDR_A, Cgroup, Injector, Lab, StreamResult, stream},
    skip_unless_root,
};
use serde_json::Value;

fn monitor_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATT_MONITOR_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<this test> -> target/<profile>/natt-monitor
    let exe = std::env::current_exe().expect("current exe");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("natt-monitor");
    assert!(
        p.exists(),
        "{} not found: build it first (cargo build -p natt-monitor; `cargo xtask test` does) or set NATT_MONITOR_BIN",
        p.display()
    );
    p
}

/// Runs the binary to completion and returns (exit code, stderr).
fn run_to_end(args: &[&str]) -> (i32, String) {
    let out = Command::new(monitor_bin())
        .args(args)
        .output()
        .expect("spawn natt-monitor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_arguments_fail_before_anything_is_attached() {
    if skip_unless_root("bad_arguments_fail_before_anything_is_attached") {
        return;
    }
    let (code, err) = run_to_end(&["run", "--peer", "10.0.0.300/8"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "natt-monitor: error: --peer: `10.0.0.300/8` is not an IP address or CIDR prefix (expected e.g. 192.0.2.7, 198.51.100.0/24 or 2001:db8::/64)"
        ),
        "{err}"
    );
    let (code, err) = run_to_end(&["run", "--peer", "192.0.2.1", "--peer", "192.0.2.1/32"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("natt-monitor: error: --peer: peer 192.0.2.1/32 is configured twice"),
        "{err}"
    );
    let (code, err) = run_to_end(&["run", "--peer", "192.0.2.1", "--cgroup", "/nonexistent/cg"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("natt-monitor: error: --cgroup /nonexistent/cg: no such directory"),
        "{err}"
    );
    let (code, err) = run_to_end(&["run", "--peer", "192.0.2.1", "--cgroup", "/tmp"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/tmp is not a cgroup v2 directory (cgroup v2 is mounted at"),
        "{err}"
    );
    // clap's own usage errors exit 2 and name the flag.
    let (code, err) = run_to_end(&["run"]);
    assert_eq!(code, 2);
    assert!(err.contains("--peer <CIDR>"), "{err}");
    let (code, err) = run_to_end(&["run", "--peer", "192.0.2.1", "--mode", "block"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value 'block' for '--mode <MODE>'"),
        "{err}"
    );
    assert_no_verifier_loaded();
}

fn assert_no_verifier_loaded() {
    let names: Vec<String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .collect();
    assert!(
        !names.iter().any(|n| n == "natt_verify"),
        "natt_verify still loaded: {names:?}"
    );
}

struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(monitor_bin())
            .args(args)
            .args(["--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn natt-monitor");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let err = child.stderr.take().expect("stderr");
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(v);
            }
        });
        Self {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn messages(&self, message: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["message"] == message)
            .cloned()
            .collect()
    }

    fn wait_for(&mut self, message: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.messages(message).is_empty() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "natt-monitor exited ({status}) before logging {message:?}: {:?}",
                    self.lines.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} within 20 s: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self, signal: i32) -> (ExitStatus, Vec<Value>) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "natt-monitor did not exit within 10 s of signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.reader.take().unwrap().join().unwrap();
        (status, self.lines.lock().unwrap().clone())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field_u64(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("field {k} in {v}"))
}

#[test]
fn logs_every_mismatch_within_its_budget_and_detaches_on_sigterm() {
    if skip_unless_root("logs_every_mismatch_within_its_budget_and_detaches_on_sigterm") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let cgroup = cg.path.to_str().unwrap();
    let mut d = Daemon::start(&[
        "run", "--peer", ADDR_A, "--cgroup", cgroup, "--mode", "enforce",
    ]);
    d.wait_for("verifier attached at cgroup_skb ingress");
    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let s = stream(
        env!("CARGO_BIN_EXE_natt-peer"),
        &lab,
        &cg.path,
        4 << 20,
        false,
    );
    let injected = inj.stats().corrupted;
    assert!(injected > 0);
    assert_eq!(
        s,
        StreamResult {
            received: 4 << 20,
            differing: 0
        }
    );
    let (status, lines) = d.stop(libc::SIGTERM);
    assert!(status.success(), "exit status {status}: {lines:?}");

    let warn: Vec<&Value> = lines
        .iter()
        .filter(|v| v["message"] == "checksum mismatch")
        .collect();
    let suppressed_before: u64 = warn.iter().map(|v| field_u64(v, "suppressed_before")).sum();
    let suppressed_at_exit: u64 = lines
        .iter()
        .filter(|v| v["message"] == "mismatch log lines suppressed by the rate limit")
        .map(|v| field_u64(v, "suppressed"))
        .sum();
    eprintln!(
        "injected={injected} logged={} suppressed={}",
        warn.len(),
        suppressed_before + suppressed_at_exit
    );
    assert_eq!(
        warn.len() as u64 + suppressed_before + suppressed_at_exit,
        injected,
        "every mismatch logged or counted"
    );
    let first = warn[0];
    eprintln!("first mismatch line: {first}");
    assert_eq!(first["level"], "WARN");
    assert_eq!(first["peer"], "192.0.2.1/32");
    assert_eq!(first["proto"], "tcp");
    assert_eq!(first["action"], "dropped");
    assert!(
        first["flow"].as_str().unwrap().starts_with("192.0.2.1:"),
        "{first}"
    );
    assert!(
        first["flow"]
            .as_str()
            .unwrap()
            .ends_with(" -> 192.0.2.2:5001"),
        "{first}"
    );
    assert_ne!(first["found"], first["expected"]);
    assert_eq!(first["len"], 1480);
    let totals = lines
        .iter()
        .find(|v| v["message"] == "peer totals")
        .expect("peer totals line");
    assert_eq!(field_u64(totals, "mismatches"), injected);
    assert_eq!(field_u64(totals, "dropped"), injected);
    assert!(lines.iter().any(|v| v["message"] == "verifier detached"));
    drop(inj);
    assert_no_verifier_loaded();
}

#[test]
fn sigint_also_detaches_cleanly() {
    if skip_unless_root("sigint_also_detaches_cleanly") {
        return;
    }
    let cg = Cgroup::new();
    let mut d = Daemon::start(&[
        "run",
        "--peer",
        "2001:db8::/32",
        "--cgroup",
        cg.path.to_str().unwrap(),
    ]);
    d.wait_for("verifier attached at cgroup_skb ingress");
    let (status, lines) = d.stop(libc::SIGINT);
    assert!(status.success(), "exit status {status}: {lines:?}");
    assert!(lines.iter().any(|v| v["message"] == "verifier detached"));
    assert_no_verifier_loaded();
}
