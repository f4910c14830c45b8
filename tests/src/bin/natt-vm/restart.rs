//! `j-sigkill-restart`: the daemon dies by SIGKILL mid-stream in enforce mode and starts again.
//!
//! The verifier is pinned on a bpffs mounted for the scenario. `ip netns exec` gives each daemon
//! a private mount namespace, so the pins must live on a mount made outside it: one under the
//! daemon's own `/sys/fs/bpf` would die with the daemon and take the link along.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use natt_monitor_tests::net::sh;

use crate::{
    plan::RESTART_BPFFS,
    processes::{Daemon, bin, learned_into_b, metric, scrape, start_monitor_with},
    scenarios::Scenario,
    topology::Topology,
    traffic::stream,
};

/// What the scenario saw of the restart itself.
#[derive(Debug, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each flag is one claim the verdict checks"
)]
pub(crate) struct Restart {
    /// Corrupted segments the rule rewrote while no daemon ran.
    pub(crate) gap_injected: u64,
    /// The second daemon adopted the pinned maps and the pinned link.
    pub(crate) adopted: bool,
    /// The stream still flowed when the second daemon had adopted the verifier.
    pub(crate) mid_stream: bool,
    /// At SIGTERM the second daemon's "peer totals" equal what its metrics said.
    pub(crate) totals_match: bool,
    /// The second daemon learned a residual again (it must not: the learned one is pinned).
    pub(crate) relearned: bool,
}

impl Restart {
    /// The RESULT line's summary.
    pub(crate) fn summary(&self) -> String {
        format!(
            "adopted={},mid_stream={},gap_injected={},totals={},relearned={}",
            yes(self.adopted),
            yes(self.mid_stream),
            self.gap_injected,
            if self.totals_match { "equal" } else { "differ" },
            yes(self.relearned)
        )
    }
}

const fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The scenario's bpffs: mounted on creation; on drop (pass or fail), whatever is pinned there
/// is detached and removed, and the mount goes, so no later scenario adopts it.
pub(crate) struct Pins;

impl Pins {
    pub(crate) fn mount() -> Self {
        fs::create_dir_all(RESTART_BPFFS).expect("bpffs mount point");
        sh(&["mount", "-t", "bpf", "bpf", RESTART_BPFFS]);
        Self
    }

    pub(crate) fn dir() -> String {
        format!("{RESTART_BPFFS}/natt-monitor")
    }

    /// The daemon's arguments for pinning here.
    pub(crate) fn args() -> [String; 2] {
        ["--pin-path".into(), Self::dir()]
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if Path::new(&Self::dir()).exists() {
            let out = Command::new(bin("natt-monitor"))
                .args(["detach", "--pin-path", &Self::dir()])
                .output()
                .expect("natt-monitor detach");
            assert!(
                out.status.success(),
                "detach: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = Command::new("umount").arg(RESTART_BPFFS).status();
    }
}

/// Streams through a SIGKILL of `first` and the start of a second daemon; returns (received,
/// differing), what the restart did, and the second daemon.
pub(crate) fn stream_through_restart(
    t: &Topology,
    s: &Scenario,
    cg: &Path,
    first: &mut Daemon,
    dropped_series: &str,
) -> (u64, u64, Restart, Daemon) {
    let pin_args = Pins::args();
    let pin_args: Vec<&str> = pin_args.iter().map(String::as_str).collect();
    std::thread::scope(|scope| {
        let streaming = scope.spawn(|| stream(t, cg, s.stream_bytes(), 5001));
        // Corruption is being dropped under the first daemon...
        let deadline = Instant::now() + Duration::from_secs(60);
        while metric(&scrape(t.mon()), dropped_series) < 20 {
            assert!(
                Instant::now() < deadline && !streaming.is_finished(),
                "no 20 drops under the first daemon; monitor log:\n{}",
                fs::read_to_string(&first.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // ...when it dies without a chance to clean up.
        first.process.kill().expect("SIGKILL the daemon");
        first.process.wait().expect("reap the daemon");
        let at_kill = t.injected();
        // No daemon runs for a while: the pinned program goes on verifying and dropping.
        std::thread::sleep(Duration::from_millis(500));
        let gap_injected = t.injected() - at_kill;
        let second =
            start_monitor_with(t.mon(), s.mode, &format!("{}-restarted", s.name), &pin_args);
        let mid_stream = !streaming.is_finished();
        let log = fs::read_to_string(&second.log).unwrap_or_default();
        let adopted =
            log.contains("adopting the pinned maps") && log.contains("adopted the pinned link");
        let (received, differing) = streaming
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        let mut second = second;
        if let Ok(Some(status)) = second.process.try_wait() {
            panic!(
                "the second daemon exited ({status}) during the stream; its log:\n{}",
                fs::read_to_string(&second.log).unwrap_or_default()
            );
        }
        let restart = Restart {
            gap_injected,
            adopted,
            mid_stream,
            ..Restart::default()
        };
        (received, differing, restart, second)
    })
}

/// Stops the second daemon with SIGTERM and compares the totals it logs with `text`, its last
/// scrape.
pub(crate) fn finish(
    mut second: Daemon,
    text: &str,
    series: impl Fn(&str, &str) -> String,
    r: &mut Restart,
) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(second.process.id().cast_signed(), libc::SIGTERM) };
    let status = second.process.wait().expect("reap the daemon");
    let log = fs::read_to_string(&second.log).unwrap_or_default();
    assert!(status.success(), "the restarted daemon failed: {log}");
    // B's peer: the catch-alls (`0.0.0.0/0`, `::/0`) count what A receives.
    let totals = log
        .lines()
        .find(|l| {
            l.contains("peer totals") && !l.contains("peer=0.0.0.0/0") && !l.contains("peer=::/0")
        })
        .unwrap_or_else(|| panic!("no peer totals in {log}"));
    let field = |k: &str| {
        totals
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let both = |name: &str| metric(text, &series(name, "tcp")) + metric(text, &series(name, "udp"));
    r.totals_match = field("mismatches=") == Some(both("checksum_mismatches_total"))
        && field("dropped=") == Some(both("dropped_packets_total"));
    r.relearned = !learned_into_b(&log).is_empty();
}
