//! The processes a scenario runs: natt-monitor itself (and what it reports), killed on drop.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use natt_monitor::peers::Mode;
use natt_monitor_tests::{KillOnDrop, http_get, net::Netns};

use crate::plan::METRICS;

/// A child process killed on drop; its stderr goes to a file shown on failure.
pub(crate) struct Daemon {
    /// Killed on drop.
    pub(crate) process: KillOnDrop,
    pub(crate) log: PathBuf,
}

pub(crate) fn bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("current exe")
        .with_file_name(name)
}

/// natt-monitor in B's network namespace, at the default cgroup (the cgroup2 root: every socket
/// of the guest) with the default scope.
pub(crate) fn start_monitor(b: &Netns, mode: Mode, name: &str) -> Daemon {
    start_monitor_with(b, mode, name, &[])
}

/// As `start_monitor`, with `extra` arguments to `run`.
pub(crate) fn start_monitor_with(b: &Netns, mode: Mode, name: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--mode", mode.as_str()];
    args.extend_from_slice(extra);
    start_monitor_args(b, name, &args)
}

/// natt-monitor as `start_monitor`, with no `--mode` (the configuration file's, or the
/// default) and `extra` arguments to `run`.
pub(crate) fn start_monitor_args(b: &Netns, name: &str, extra: &[&str]) -> Daemon {
    start_binary(b, &bin("natt-monitor"), name, extra)
}

/// As `start_monitor_args`, with the natt-monitor binary at `binary` (the bench's baseline
/// build, or this one).
pub(crate) fn start_binary(b: &Netns, binary: &Path, name: &str, extra: &[&str]) -> Daemon {
    let log = PathBuf::from(format!("/tmp/monitor-{name}.log"));
    let child = Command::new("ip")
        .args(["netns", "exec", &b.name])
        .arg(binary)
        .arg("run")
        .args(["--listen", "127.0.0.1:9874"])
        .arg("--capture")
        .arg(capture_path(name))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("monitor log"))
        .spawn()
        .expect("spawn natt-monitor");
    let d = Daemon {
        process: KillOnDrop(child),
        log,
    };
    wait_until(b, &d, "/healthz answers 200", |_| {
        b.enter(|| http_get(&format!("{METRICS}/healthz")))
            .is_ok_and(|(code, _)| code == 200)
    });
    d
}

/// Where scenario `name`'s monitor writes the mismatching packets.
pub(crate) fn capture_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/capture-{name}.pcapng"))
}

/// Corrupted copies in scenario `name`'s capture file so far.
pub(crate) fn captured(name: &str) -> u64 {
    packets_in(&capture_path(name))
}

/// Corrupted copies in the pcapng file at `path`: the packets whose comment says a checksum
/// did not match (the intact retransmissions beside them are not counted).
pub(crate) fn packets_in(path: &Path) -> u64 {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut r = pcap_file::pcapng::PcapNgReader::new(file).expect("a pcapng file");
    let mut n = 0;
    while let Some(block) = r.next_block() {
        if let pcap_file::pcapng::Block::EnhancedPacket(p) = block.expect("a whole block")
            && p.options.iter().any(|o| {
                matches!(
                    o,
                    pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption::Comment(c)
                        if matches!(
                            natt_monitor::report::Note::parse(c),
                            Some(natt_monitor::report::Note::Corrupted { .. })
                        )
                )
            })
        {
            n += 1;
        }
    }
    n
}

pub(crate) fn scrape(b: &Netns) -> String {
    match b.enter(|| http_get(&format!("{METRICS}/metrics"))) {
        Ok((_, body)) => body,
        Err(e) => panic!(
            "scrape /metrics: {e:?}; the newest monitor log:\n{}",
            newest_monitor_log()
        ),
    }
}

/// The last lines of the monitor log written last: why a daemon no longer answers.
fn newest_monitor_log() -> String {
    let newest = fs::read_dir("/tmp")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("monitor-"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    let Some(entry) = newest else {
        return "(none)".to_owned();
    };
    let text = fs::read_to_string(entry.path()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "{}:\n{}",
        entry.path().display(),
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// The daemon log's `NAT residual learned` lines of SAs into B. The guest's namespaces share
/// one kernel, so the verifier at the cgroup2 root also verifies what A (and A2) receive
/// through their own inbound SAs, under SA scope's catch-all `peer="undiscovered"`: those are
/// left out, but for the hand-made SAs into B (SPIs 0x1xxx), which `q-undiscovered-netns` has
/// under that label too.
pub(crate) fn learned_into_b(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("NAT residual learned"))
        .filter(|l| !l.contains("peer=\"undiscovered\"") || l.contains("spi=0x00001"))
        .collect()
}

/// The residuals of `learned_into_b`'s lines, sorted as their text.
pub(crate) fn learned_residuals(log: &str) -> Vec<&str> {
    let mut residuals: Vec<&str> = learned_into_b(log)
        .into_iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("residual="))
        })
        .collect();
    residuals.sort_unstable();
    residuals
}

/// The value of the series `series` (name with labels, exactly as exposed), 0 if absent.
pub(crate) fn metric(text: &str, series: &str) -> u64 {
    natt_monitor_tests::metric(text, series).unwrap_or(0)
}

pub(crate) fn wait_until(b: &Netns, d: &Daemon, what: &str, ok: impl Fn(&Netns) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok(b) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; monitor log:\n{}",
            fs::read_to_string(&d.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
