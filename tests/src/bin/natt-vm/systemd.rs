//! `v-systemd`: natt-monitor installed from its .deb and operated under systemd as PID 1, the way
//! an operator runs it, from `apt install` to `apt purge`. Runs alone in the systemd guest
//! (`natt-vm --systemd`, started by `natt-vm.service`); B is the guest's own network namespace,
//! so the unit runs exactly as shipped (no drop-in) and the peer behind R's NAT is discovered
//! from the SAs.
//!
//! Every step asserts what it claims; a failed one ends the scenario with its reason.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use natt_monitor::peers::Mode;
use natt_monitor_tests::{
    http_get,
    net::{Cgroup, Netns},
};

use crate::{
    plan::{METRICS, STREAM, WARMUP},
    processes::{metric, packets_in, scrape},
    scenarios::{Cipher, Corruption, Scenario, Setup},
    topology::Topology,
    traffic::stream,
};

/// The scenario: CBC-AES ESP-in-UDP through R's masquerading NAT, one 32-bit word overwritten
/// in every Nth large ESP packet once the operator turned enforce mode on.
const SCENARIO: Scenario = Scenario {
    name: "v-systemd",
    setup: Setup::Manual,
    cipher: Cipher::CbcAes,
    mode: Mode::Enforce,
    encap: true,
    nat: true,
    corrupt: true,
    corruption: Corruption::Word,
    v6: false,
};

const UNIT: &str = "natt-monitor.service";
const CONFIG: &str = "/etc/natt-monitor/natt-monitor.toml";
/// Not the default: removal must detach the verifier wherever the configuration pinned it.
const PIN_PATH: &str = "/sys/fs/bpf/natt-systemd";
const STATE: &str = "/var/lib/natt-monitor";
const CAPTURE: &str = "/var/lib/natt-monitor/mismatches.pcapng";
/// Bytes of each of the back-to-back streams that flow through a restart.
const SHORT_STREAM: u64 = 1 << 20;

/// Runs a command; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must succeed; returns its stdout.
fn must(args: &[&str]) -> String {
    checked(args, false)
}

/// `must`, shown in the transcript with its stderr (where apt and systemctl report).
fn must_shown(args: &[&str]) -> String {
    checked(args, true)
}

/// Runs a command that must succeed (naming the unit's journal when it does not), shown in
/// the transcript with `shown`; returns its stdout.
fn checked(args: &[&str], shown: bool) -> String {
    let (ok, out, err) = run(args);
    if shown {
        show(args, &format!("{out}{err}"));
    }
    assert!(
        ok,
        "{args:?} failed: {out}{err}\nthe unit's journal:\n{}",
        tail(&journal(), 30)
    );
    out
}

/// Prints a command and its output as `NATT-VM SHOW` lines: the transcript of an operator's
/// session that docs/install.md quotes (in the guest's console log, `cargo xtask vm-test
/// v-systemd`).
fn show(args: &[&str], out: &str) {
    println!("NATT-VM SHOW # {}", args.join(" "));
    for line in out.lines() {
        println!("NATT-VM SHOW {line}");
    }
}

/// The unit's journal, messages only.
fn journal() -> String {
    run(&["journalctl", "-u", UNIT, "-o", "cat", "--no-pager"]).1
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn property(name: &str) -> String {
    must(&["systemctl", "show", "-p", name, "--value", UNIT])
        .trim()
        .to_owned()
}

fn main_pid() -> u32 {
    property("MainPID").parse().expect("MainPID")
}

fn active_state() -> String {
    run(&["systemctl", "is-active", UNIT]).1.trim().to_owned()
}

/// Waits up to `secs` for `ok`, panicking with `what` and the journal's tail.
fn wait_for(what: &str, secs: u64, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting until {what}; the unit's journal:\n{}",
            tail(&journal(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until a daemon other than `old` runs, active, and answers `/healthz`.
fn wait_restarted(b: &Netns, old: u32, secs: u64) -> u32 {
    wait_for("systemd runs a new daemon", secs, || {
        let pid = main_pid();
        pid != 0 && pid != old && active_state() == "active"
    });
    wait_healthy(b);
    main_pid()
}

fn healthy(b: &Netns) -> bool {
    b.enter(|| http_get(&format!("{METRICS}/healthz")))
        .is_ok_and(|(code, _)| code == 200)
}

fn wait_healthy(b: &Netns) {
    wait_for("/healthz answers 200", 30, || healthy(b));
}

/// The configuration file: the packaged one, with `extra` lines after it.
fn configure(extra: &str) {
    let packaged = fs::read_to_string(CONFIG).expect("the packaged configuration");
    let base = packaged
        .split("\n# Edited by the VM suite:\n")
        .next()
        .unwrap_or_default()
        .to_owned();
    fs::write(
        CONFIG,
        format!("{base}\n# Edited by the VM suite:\npin_path = \"{PIN_PATH}\"\n{extra}"),
    )
    .expect("write the configuration");
}

fn install(dir: &str) -> String {
    let deb = fs::read_dir(format!("/natt/debs/{dir}"))
        .expect("the packages")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    must_shown(&["apt-get", "install", "-y", "-q", &deb.to_string_lossy()]);
    installed_version()
}

fn installed_version() -> String {
    must(&["dpkg-query", "-W", "-f", "${Version}", "natt-monitor"])
}

/// Verifier programs loaded in the guest.
fn verifiers_loaded() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some("natt_verify"))
        .count()
}

/// What the scenario counted, for the result line.
#[derive(Default)]
struct Tally {
    injected: u64,
    detected: u64,
    dropped: u64,
    received: u64,
    differing: u64,
    captured: u64,
    restarts: Vec<&'static str>,
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Sends `signal` to `pid` (the guest has no `kill` binary, like many minimal hosts).
fn signal(pid: u32, signal: libc::c_int) {
    let pid = i32::try_from(pid).expect("pid");
    // SAFETY: kill(2) has no memory preconditions.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

/// Back-to-back streams from A (each on a port of its own) while `during` runs on this thread,
/// and one more after it; adds what they received and what differed to `tally`.
fn streams_during(
    t: &Topology,
    cg: &Path,
    port: &mut u16,
    tally: &mut Tally,
    during: impl FnOnce(),
) {
    let done = AtomicBool::new(false);
    let first = *port;
    let (streams, received, differing) = std::thread::scope(|scope| {
        let streaming = scope.spawn(|| {
            let (mut n, mut received, mut differing) = (0u16, 0, 0);
            loop {
                let last = done.load(Ordering::SeqCst);
                let (r, d) = stream(t, cg, SHORT_STREAM, first + n);
                n += 1;
                received += r;
                differing += d;
                if last {
                    return (n, received, differing);
                }
            }
        });
        {
            // Set however `during` ends, so that a failed step ends the streams too.
            let _stop = StopOnDrop(&done);
            during();
        }
        streaming
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    *port += streams;
    assert_eq!(
        (received, differing),
        (u64::from(streams) * SHORT_STREAM, 0),
        "the streams through the restart were not byte-exact"
    );
    tally.received += received;
    tally.differing += differing;
}

/// The counts of B's peer behind the NAT, and the corruption R injected, must agree.
fn counts_agree(t: &Topology, tally: &mut Tally, when: &str) {
    let series = |name: &str| {
        format!(
            "natt_monitor_{name}{{peer=\"{}/32\",proto=\"tcp\"}}",
            t.addrs.r_b
        )
    };
    let text = scrape(&t.b);
    tally.injected = t.injected();
    tally.detected = metric(&text, &series("checksum_mismatches_total"));
    tally.dropped = metric(&text, &series("dropped_packets_total"));
    assert!(tally.injected > 0, "{when}: nothing was corrupted");
    assert_eq!(
        (tally.detected, tally.dropped),
        (tally.injected, tally.injected),
        "{when}: (mismatches, dropped) against the {} segments injected",
        tally.injected
    );
}

/// One corrupted `STREAM` on `port`, which must arrive byte-exact, then the counts checked.
fn exact_stream(t: &Topology, cg: &Path, port: u16, tally: &mut Tally, when: &str) {
    let (received, differing) = stream(t, cg, STREAM, port);
    assert_eq!((received, differing), (STREAM, 0), "{when}: the stream");
    tally.received += received;
    tally.differing += differing;
    std::thread::sleep(Duration::from_millis(500));
    counts_agree(t, tally, when);
}

/// `--max-peers 65536` under `MemoryMax=64M` (a drop-in): the maps need at least 48 MiB on
/// this one-CPU guest, more than the cgroup leaves once the daemon holds its own. From 5.11 the
/// kernel charges map memory to the cgroup, so the daemon refuses to start (exit 78, naming
/// both) and systemd does not restart it; without the check the cgroup's OOM killer would end
/// every start. 5.10 charges `RLIMIT_MEMLOCK` instead, so there the daemon runs. Then the
/// drop-in goes and the daemon runs as before. Returns what happened.
fn oversized_max_peers(b: &Netns, mut pid: u32) -> &'static str {
    let dropin = Path::new("/run/systemd/system/natt-monitor.service.d/max-peers.conf");
    // Stopped first: a lower MemoryMax= applies to a running unit at daemon-reload.
    must(&["systemctl", "stop", UNIT]);
    fs::create_dir_all(dropin.parent().expect("drop-in directory")).expect("drop-in directory");
    fs::write(
        dropin,
        "[Service]\nMemoryMax=64M\nEnvironment=NATT_MONITOR_MAX_PEERS=65536\n",
    )
    .expect("write the drop-in");
    must(&["systemctl", "daemon-reload"]);
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let charged = !release.starts_with("5.10.");
    let start = ["systemctl", "start", UNIT];
    let (ok, out, err) = run(&start);
    let outcome = if charged {
        show(&start, &format!("{out}{err}"));
        assert!(
            !ok,
            "start with --max-peers 65536 under 64M succeeded: {out}{err}\n{}",
            tail(&journal(), 8)
        );
        let restarts = property("NRestarts");
        // RestartSec=5s: a restart loop would have begun by now.
        std::thread::sleep(Duration::from_secs(8));
        assert_eq!(
            (
                active_state(),
                property("ExecMainStatus"),
                property("NRestarts")
            ),
            ("failed".to_owned(), "78".to_owned(), restarts),
            "state, exit status and restarts after the refused start:\n{}",
            tail(&journal(), 8)
        );
        let log = journal();
        let refusal = log
            .rfind("natt-monitor: error:")
            .map_or("", |at| &log[at..]);
        show(
            &["journalctl", "-u", UNIT, "-o", "cat", "-n", "5"],
            refusal.trim_end(),
        );
        assert!(
            log.contains("natt-monitor: error: --max-peers 65536: the verifier's maps need at least 48 MiB (possible CPUs: 1;")
                && log.contains("memory.max of /sys/fs/cgroup/system.slice/natt-monitor.service (64 MiB) leaves free"),
            "the refusal does not name --max-peers and the limit:\n{}",
            tail(&log, 10)
        );
        "exit78"
    } else {
        assert!(
            ok,
            "start with --max-peers 65536 under 64M on 5.10: {out}{err}\n{}",
            tail(&journal(), 8)
        );
        pid = wait_restarted(b, pid, 30);
        "ran"
    };
    fs::remove_file(dropin).expect("remove the drop-in");
    must(&["systemctl", "daemon-reload"]);
    must(&["systemctl", "restart", UNIT]);
    wait_restarted(b, pid, 30);
    outcome
}

/// The scenario, step by step; returns the result line's fields.
#[expect(
    clippy::too_many_lines,
    reason = "an operator's day one to removal, read top to bottom in the order it happens"
)]
pub(crate) fn run_scenario() -> String {
    let s = &SCENARIO;
    let mut tally = Tally::default();
    // Installed, not started: the operator chooses when.
    assert!(
        !run(&["dpkg-query", "-W", "natt-monitor"]).0,
        "natt-monitor is installed before the scenario installs it"
    );
    let older = install("older");
    assert_eq!(
        run(&["systemctl", "is-enabled", UNIT]).1.trim(),
        "disabled",
        "the package enabled the unit"
    );
    assert_eq!(active_state(), "inactive", "the package started the unit");
    let t = Topology::with_b(s, Netns::initial("vmb"));
    let cg = Cgroup::new();
    // The operator's first edit: a pin path of their own, observe mode as packaged.
    configure("");
    must_shown(&["natt-monitor", "check", "--config", CONFIG]);
    // Type=notify: `enable --now` returns once the daemon said READY=1, which it says once
    // the verifier is attached and pinned.
    must_shown(&["systemctl", "enable", "--now", UNIT]);
    assert_eq!(active_state(), "active", "after enable --now");
    assert!(
        Path::new(PIN_PATH)
            .join(natt_monitor::pin::LINK_FILE)
            .exists(),
        "enable --now returned before the verifier was pinned at {PIN_PATH}"
    );
    wait_healthy(&t.b);
    let mut pid = main_pid();
    // The daemon holds its pins: a detach from a shell names it instead of pulling the
    // verifier from under it (its flock passed the unit's SystemCallFilter).
    let (ok, _, err) = run(&["natt-monitor", "detach", "--config", CONFIG]);
    assert!(
        !ok && err.contains(&pid.to_string()),
        "detach beside the running daemon: {err}"
    );
    // Discovery finds the peer behind the NAT; clean traffic teaches its residual.
    t.add_sas(s);
    let peer = format!("{}/32", t.addrs.r_b);
    wait_for("the SA's peer is discovered", 60, || {
        metric(&scrape(&t.b), "natt_monitor_peers{source=\"xfrm\"}") == 1
    });
    assert_eq!(stream(&t, &cg.path, WARMUP, 5000), (WARMUP, 0), "warm-up");
    wait_for("the NAT residual is learned", 60, || {
        metric(
            &scrape(&t.b),
            &format!("natt_monitor_peer_learning{{peer=\"{peer}\"}}"),
        ) == 0
    });
    must_shown(&["systemctl", "status", "--no-pager", "--lines", "6", UNIT]);
    // A bad file: the reload fails naming the key, the daemon keeps running.
    configure("mode = \"Enforce\"\n");
    let reload = ["systemctl", "reload", UNIT];
    let (ok, out, err) = run(&reload);
    show(&reload, &format!("{out}{err}"));
    assert!(!ok, "systemctl reload accepted mode = \"Enforce\"");
    let log = journal();
    show(
        &["journalctl", "-u", UNIT, "-o", "cat", "-n", "4"],
        &tail(&log, 4),
    );
    assert!(
        log.contains("mode = \"Enforce\"") && log.contains("unknown variant `Enforce`"),
        "the failed reload does not name the key: {}",
        tail(&log, 20)
    );
    assert_eq!(
        (active_state(), main_pid()),
        ("active".to_owned(), pid),
        "after the failed reload"
    );
    // A good file: enforce mode, applied on SIGHUP by the same process.
    let reloads = || journal().matches("reloaded peers on SIGHUP").count();
    let before = reloads();
    configure("mode = \"enforce\"\n");
    must(&["systemctl", "reload", UNIT]);
    wait_for("the daemon reloaded", 30, || reloads() > before);
    assert_eq!(main_pid(), pid, "the reload restarted the daemon");
    t.corrupt(s);
    exact_stream(
        &t,
        &cg.path,
        5001,
        &mut tally,
        "after the reload to enforce mode",
    );
    // Capture, as the packaged file suggests: under the state directory, 0600.
    configure(&format!("mode = \"enforce\"\ncapture = \"{CAPTURE}\"\n"));
    must(&["systemctl", "restart", UNIT]);
    pid = wait_restarted(&t.b, pid, 30);
    tally.restarts.push("restart");
    let before = tally.injected;
    exact_stream(&t, &cg.path, 5002, &mut tally, "with capture");
    tally.captured = packets_in(Path::new(CAPTURE));
    assert_eq!(
        tally.captured,
        tally.injected - before,
        "packets captured against segments corrupted"
    );
    for (path, mode) in [(STATE, 0o700), (CAPTURE, 0o600)] {
        let got = fs::metadata(path).expect(path).permissions().mode() & 0o7777;
        assert_eq!(got, mode, "{path}: mode {got:o}");
    }
    let mut port = 5100;
    // SIGKILL: systemd restarts it (RestartSec=5s), it adopts the pins; the pinned verifier
    // drops meanwhile, so the streams through the gap stay exact.
    let adopted = || journal().matches("adopting the pinned maps").count();
    let adoptions = adopted();
    streams_during(&t, &cg.path, &mut port, &mut tally, || {
        std::thread::sleep(Duration::from_millis(300));
        signal(pid, libc::SIGKILL);
        pid = wait_restarted(&t.b, pid, 60);
    });
    assert!(
        adopted() > adoptions,
        "the restarted daemon did not adopt the pins"
    );
    tally.restarts.push("sigkill");
    counts_agree(&t, &mut tally, "after SIGKILL");
    // A stalled daemon: no WATCHDOG=1 within WatchdogSec, so systemd aborts and restarts it.
    let restarts: u32 = property("NRestarts").parse().expect("NRestarts");
    streams_during(&t, &cg.path, &mut port, &mut tally, || {
        signal(pid, libc::SIGSTOP);
        pid = wait_restarted(&t.b, pid, 120);
    });
    assert!(
        journal().contains("Watchdog timeout"),
        "no watchdog timeout in the journal:\n{}",
        tail(&journal(), 30)
    );
    assert_eq!(
        property("NRestarts").parse::<u32>().expect("NRestarts"),
        restarts + 1,
        "NRestarts after the watchdog"
    );
    tally.restarts.push("watchdog");
    counts_agree(&t, &mut tally, "after the watchdog restart");
    // The upgrade, while traffic flows: the new package restarts the daemon, which adopts.
    let mut current = String::new();
    streams_during(&t, &cg.path, &mut port, &mut tally, || {
        std::thread::sleep(Duration::from_millis(300));
        current = install("current");
        pid = wait_restarted(&t.b, pid, 60);
    });
    assert_ne!(current, older, "the upgrade changed nothing");
    tally.restarts.push("upgrade");
    counts_agree(&t, &mut tally, "after the upgrade");
    let memory_limit = oversized_max_peers(&t.b, pid);
    // Removal detaches the verifier at the configured pin path; purge removes the rest.
    must_shown(&["apt-get", "remove", "-y", "-q", "natt-monitor"]);
    assert_eq!(active_state(), "inactive", "after apt remove");
    assert!(
        !Path::new(PIN_PATH).exists(),
        "{PIN_PATH} is left after apt remove"
    );
    wait_for("no natt_verify program is loaded", 10, || {
        verifiers_loaded() == 0
    });
    assert!(
        Path::new(CONFIG).exists(),
        "apt remove removed the conffile"
    );
    must_shown(&["apt-get", "purge", "-y", "-q", "natt-monitor"]);
    for gone in ["/etc/natt-monitor", STATE] {
        assert!(!Path::new(gone).exists(), "{gone} is left after apt purge");
    }
    format!(
        "mode=enforce cipher=CbcAes injected={} detected={} dropped={} received={} differing={} invisible={} captured={} upgrade={older}->{current} restarts={} xfrm_peers=1 max_peers_65536={memory_limit}",
        tally.injected,
        tally.detected,
        tally.dropped,
        tally.received,
        tally.differing,
        t.invisible(),
        tally.captured,
        tally.restarts.join(",")
    )
}

/// The guest's whole run: the scenario, then its RESULT (or FAIL) and END lines.
pub(crate) fn main(kernel: &str) {
    let started = Instant::now();
    let result = std::panic::catch_unwind(run_scenario);
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(fields) => {
            println!(
                "NATT-VM RESULT kernel={kernel} scenario={} {fields} seconds={secs:.1} result=ok",
                SCENARIO.name
            );
            println!("NATT-VM END kernel={kernel} passed=1 failed=0");
        }
        Err(e) => {
            println!(
                "NATT-VM FAIL kernel={kernel} scenario={} reason={}",
                SCENARIO.name,
                crate::panic_text(e.as_ref()).replace('\n', " | ")
            );
            println!("NATT-VM END kernel={kernel} passed=0 failed=1");
        }
    }
}
