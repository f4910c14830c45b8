//! Suite 4: a corruption storm against the real daemon.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use natt_monitor::forensics::Shape;
use natt_monitor_tests::{
    http_get, metric,
    net::{ADDR_A, ADDR_B, Cgroup, Injector, Lab, Proc},
};

use crate::{
    daemon::{start_daemon_in, vm_kib},
    stats::{Stat, stat},
    tshark::proc_cpu_seconds,
};

pub(crate) struct Storm {
    /// The daemon's mode: `observe`, or `enforce` (every dropped segment retransmitted and
    /// paired with its intact copy, when that one is not corrupted too).
    pub(crate) mode: &'static str,
    /// One segment in how many corrupted.
    pub(crate) every: u32,
    pub(crate) secs: u32,
    pub(crate) injected: u64,
    pub(crate) mismatches: u64,
    /// Segments skipped as `partial_checksum`: under address scope a complete checksum that
    /// happens to equal the pseudo-header sum (about 1 in 65,536) is taken for a partial one.
    pub(crate) partial_skips: u64,
    pub(crate) events_lost: u64,
    pub(crate) log_suppressed: u64,
    pub(crate) scrapes_ok: usize,
    pub(crate) scrapes: usize,
    pub(crate) scrape_ms: Stat,
    pub(crate) cpu_percent: f64,
    pub(crate) rss_peak_kib: u64,
    pub(crate) gbps: f64,
    /// Seconds from the end of the send to the receiver's end of stream.
    pub(crate) drain_secs: f64,
    /// `natt_monitor_corruption_shapes_total`: copies compared with a retransmission (every
    /// shape but `unpaired`), unpaired, and waiting (`natt_monitor_corruption_copies_waiting`).
    pub(crate) paired: u64,
    pub(crate) unpaired: u64,
    pub(crate) waiting: u64,
    /// `natt_monitor_corruption_pairing_full_total`.
    pub(crate) pairing_full: u64,
    /// `natt_monitor_capture_packets_total{result="ring_full"}`: copies (corrupted or intact)
    /// the capture ring had no room for. A corrupted copy lost there never reaches the
    /// daemon's pairing, so compared + unpaired + waiting falls short of the mismatches by
    /// at most this many.
    pub(crate) ring_full: u64,
}

/// Every segment corrupted for `secs` against the daemon in observe mode.
pub(crate) fn storm(secs: u32) -> Result<Storm> {
    storm_in(secs, "observe", 1)
}

/// One segment in `every` corrupted for `secs` against the daemon in `mode`.
#[expect(
    clippy::too_many_lines,
    reason = "one run, from set-up to readings, in the order it happens"
)]
pub(crate) fn storm_in(secs: u32, mode: &'static str, every: u32) -> Result<Storm> {
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let (d, _) = start_daemon_in(&cg.path, mode)?;
    let pid = d.pid_u32();
    let inj = Injector::attach(&lab.b, lab.dev_b, every);
    // natt-peer rather than iperf3: iperf3's control connection would be corrupted too.
    let peer = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("natt-peer");
    let cg_path = cg.path.to_str().context("cgroup path")?;
    let listen = format!("{ADDR_B}:5002");
    let mut recv = Proc::spawn(
        "natt-peer recv",
        Command::new(&peer).args([
            "recv",
            "--netns",
            &lab.b.name,
            "--cgroup",
            cg_path,
            "--listen",
            &listen,
            "--bytes",
            "0",
        ]),
    );
    recv.wait_for_line("READY");
    let cpu0 = proc_cpu_seconds(pid);
    let t0 = Instant::now();
    let send = Proc::spawn(
        "natt-peer send",
        Command::new(&peer).args([
            "send",
            "--netns",
            &lab.a.name,
            "--connect",
            &listen,
            "--seconds",
            &secs.to_string(),
        ]),
    );
    let mut scrapes = Vec::new();
    while t0.elapsed() < Duration::from_secs(u64::from(secs)) {
        let t = Instant::now();
        let ok = matches!(
            http_get(&format!("http://{}/metrics", d.addr())),
            Ok((200, _))
        );
        scrapes.push(ok.then(|| t.elapsed().as_secs_f64() * 1e3));
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    // What the sender still holds when its time is up crosses the same corrupting link: in
    // enforce mode every dropped segment waits for TCP's retransmission timer, so the tail
    // takes longer than the send itself. Measured, not hidden: `drain_secs`.
    let sent = Instant::now();
    let _ = send.finish(Duration::from_secs(300));
    let out = recv.finish(Duration::from_secs(30));
    let drain_secs = sent.elapsed().as_secs_f64();
    let received: u64 = out
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("received="))
        .and_then(|v| v.parse().ok())
        .context("natt-peer received count")?;
    let bps = received as f64 * 8.0 / t0.elapsed().as_secs_f64();
    let wall = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu_seconds(pid) - cpu0;
    // Let the daemon drain, then read its counters.
    std::thread::sleep(Duration::from_secs(2));
    let (_, body) =
        http_get(&format!("http://{}/metrics", d.addr())).map_err(anyhow::Error::msg)?;
    let series = format!("{{peer=\"{ADDR_A}/32\",proto=\"tcp\"}}");
    let ok: Vec<f64> = scrapes.iter().flatten().copied().collect();
    let shape = |s: Shape| {
        metric(
            &body,
            &format!(
                "natt_monitor_corruption_shapes_total{{shape=\"{}\"}}",
                s.as_str()
            ),
        )
        .unwrap_or(0)
    };
    Ok(Storm {
        mode,
        every,
        paired: Shape::ALL
            .into_iter()
            .filter(|s| *s != Shape::Unpaired)
            .map(shape)
            .sum(),
        unpaired: shape(Shape::Unpaired),
        waiting: metric(&body, "natt_monitor_corruption_copies_waiting").unwrap_or(0),
        pairing_full: metric(&body, "natt_monitor_corruption_pairing_full_total").unwrap_or(0),
        ring_full: metric(
            &body,
            "natt_monitor_capture_packets_total{result=\"ring_full\"}",
        )
        .context("capture ring_full")?,
        secs,
        injected: inj.stats().corrupted,
        mismatches: metric(
            &body,
            &format!("natt_monitor_checksum_mismatches_total{series}"),
        )
        .context("mismatches")?,
        partial_skips: metric(
            &body,
            "natt_monitor_skipped_packets_total{reason=\"partial_checksum\"}",
        )
        .context("partial_checksum skips")?,
        events_lost: metric(&body, "natt_monitor_events_lost_total").context("events lost")?,
        log_suppressed: metric(&body, "natt_monitor_log_lines_suppressed_total")
            .context("suppressed")?,
        scrapes_ok: ok.len(),
        scrapes: scrapes.len(),
        scrape_ms: stat(if ok.is_empty() { &[f64::NAN] } else { &ok }),
        cpu_percent: 100.0 * cpu / wall,
        rss_peak_kib: vm_kib(pid, "VmHWM:"),
        gbps: bps / 1e9,
        drain_secs,
    })
}
