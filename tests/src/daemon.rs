//! One harness for the `natt-monitor` binary, shared by the tests and the bench: spawned with
//! JSON logs on a free port and a pin directory of its own, its log lines collected, scraped,
//! signalled, and waited for.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;

use crate::{KillOnDrop, PinDir, eventually, http_get, metric, monitor_bin};

/// How often the harness looks: often enough that the bench's start-up time is exact to a few
/// milliseconds.
const POLL: Duration = Duration::from_millis(2);

/// `natt-monitor` with `args`, run to completion.
fn completed(args: &[&str]) -> std::process::Output {
    Command::new(monitor_bin())
        .args(args)
        .output()
        .expect("spawn natt-monitor")
}

/// Runs the binary to completion and returns (exit code, stderr).
#[must_use]
pub fn run_to_end(args: &[&str]) -> (i32, String) {
    let out = completed(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `natt-monitor` with `args`, to completion: (exit code, stdout).
#[must_use]
pub fn output_of(args: &[&str]) -> (i32, String) {
    let out = completed(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// No verifier of this test's is left loaded (one installed on the host is not this test's).
pub fn assert_no_verifier_loaded() {
    let left = crate::test_verifiers_loaded();
    assert!(left.is_empty(), "natt_verify still loaded: ids {left:?}");
}

/// Field `k` of a JSON log line, as a number.
#[must_use]
pub fn field_u64(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("field {k} in {v}"))
}

/// The TCP mismatch and drop counts of the one peer `192.0.2.1/32` in a scrape.
#[must_use]
pub fn tcp_counts(body: &str) -> (u64, u64, u64) {
    let peer = "peer=\"192.0.2.1/32\",proto=\"tcp\"";
    let get = |name: &str| {
        metric(body, &format!("natt_monitor_{name}{{{peer}}}"))
            .unwrap_or_else(|| panic!("{name} in {body}"))
    };
    (
        get("verified_packets_total"),
        get("checksum_mismatches_total"),
        get("dropped_packets_total"),
    )
}

/// The daemon's log line once its verifier is attached.
pub const ATTACHED: &str = "verifier attached at cgroup_skb ingress";

/// A running `natt-monitor`, killed on drop.
pub struct Daemon {
    child: KillOnDrop,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Dropped after the process is killed: detaches what it left pinned.
    _pins: Option<PinDir>,
}

impl Daemon {
    /// Runs `natt-monitor` with `args`, JSON logs, a free port unless `--listen` or `--config`
    /// is given, and a pin directory of its own (removed on drop) unless `--pin-path` is.
    pub fn start(args: &[&str]) -> Self {
        let pins = (!args.contains(&"--pin-path")).then(PinDir::new);
        Self::start_pinned(args, pins)
    }

    /// As `start`, and waits until the verifier is attached.
    #[must_use]
    pub fn attached(args: &[&str]) -> Self {
        let mut d = Self::start(args);
        d.wait_for(ATTACHED);
        d
    }

    /// As `start`, pinning in `pins` (which the caller may share with a later daemon).
    #[must_use]
    pub fn start_pinned(args: &[&str], pins: Option<PinDir>) -> Self {
        Self::spawn(&monitor_bin(), args, pins, &[])
    }

    /// As `start`, with environment variables set (`NOTIFY_SOCKET`, say).
    pub fn start_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let pins = (!args.contains(&"--pin-path")).then(PinDir::new);
        Self::spawn(&monitor_bin(), args, pins, env)
    }

    /// As `start`, with another build's binary (whose `run` takes the same flags).
    pub fn start_bin(bin: &std::path::Path, args: &[&str]) -> Self {
        let pins = (!args.contains(&"--pin-path")).then(PinDir::new);
        Self::spawn(bin, args, pins, &[])
    }

    fn spawn(
        bin: &std::path::Path,
        args: &[&str],
        pins: Option<PinDir>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .args(["--log-format", "json"])
            .envs(env.iter().copied());
        if !args.contains(&"--listen") && !args.iter().any(|a| a.starts_with("--config")) {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if let Some(p) = &pins {
            cmd.args(["--pin-path", p.arg()]);
        }
        let mut child = cmd
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
            child: KillOnDrop(child),
            lines,
            reader: Some(reader),
            _pins: pins,
        }
    }

    #[must_use]
    pub fn messages(&self, message: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["message"] == message)
            .cloned()
            .collect()
    }

    pub fn wait_for(&mut self, message: &str) {
        eventually(
            &format!("the log line {message:?}"),
            POLL,
            Duration::from_secs(20),
            || {
                if let Some(status) = self.child.try_wait().unwrap() {
                    panic!(
                        "natt-monitor exited ({status}) before logging {message:?}: {:?}",
                        self.lines()
                    );
                }
                (!self.messages(message).is_empty()).then_some(())
            },
        );
    }

    /// Waits until `/healthz` answers 200: the program is attached and the drain runs.
    pub fn wait_healthy(&mut self) {
        self.wait_for(ATTACHED);
        eventually(
            "/healthz to answer 200",
            POLL,
            Duration::from_secs(20),
            || {
                matches!(
                    http_get(&format!("http://{}/healthz", self.addr())),
                    Ok((200, _))
                )
                .then_some(())
            },
        );
    }

    /// Every log line so far (JSON, or the raw text of a line that is not).
    #[must_use]
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// The metrics address, from the "attached" log line.
    #[must_use]
    pub fn addr(&self) -> String {
        let attached = self.messages("verifier attached at cgroup_skb ingress");
        attached[0]["listen"]
            .as_str()
            .expect("listen field")
            .to_owned()
    }

    #[must_use]
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://{}{path}", self.addr()))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    #[must_use]
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// The process id, as /proc names it.
    #[must_use]
    pub fn pid_u32(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.pid();
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, signal) };
    }

    /// Waits for the process to exit on its own.
    #[must_use]
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, Vec<Value>) {
        let status = eventually("natt-monitor to exit", POLL, timeout, || {
            self.child.try_wait().unwrap()
        });
        self.reader.take().unwrap().join().unwrap();
        (status, self.lines())
    }

    #[must_use]
    pub fn stop(self, signal: i32) -> (ExitStatus, Vec<Value>) {
        self.signal(signal);
        self.wait_exit(Duration::from_secs(10))
    }
}
