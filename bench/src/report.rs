//! The markdown report.

use std::fmt::Write as _;

use crate::{
    Args,
    footprint::Footprint,
    micro::Micro,
    scale::Scale,
    stats::{Stat, machine},
    storm::Storm,
    throughput::{Setting, Throughput},
    tshark::Capture,
};

#[expect(clippy::too_many_lines, reason = "the report, in the order it is read")]
#[expect(clippy::too_many_arguments, reason = "one argument per suite")]
pub(crate) fn report(
    args: &Args,
    m: &Micro,
    t: &[Throughput],
    c: &Capture,
    s: &Storm,
    f: &Footprint,
    scale: &Scale,
    cmd: &str,
) -> String {
    let mut r = String::new();
    let per_byte_ratio = m.verifier_per_byte / m.kernel_per_byte;
    let marginal_ratio = m.verifier_marginal / m.kernel_marginal;
    let t1500 = &t[0];
    let ratio =
        |tp: &Throughput, s: Setting| median_of(&tp.gbps, s) / median_of(&tp.gbps, Setting::Off);
    let _ = writeln!(r, "# Benchmark results\n");
    if args.quick {
        let _ = writeln!(
            r,
            "**Quick run (`--quick`): short durations, for checking the harness only. Do not quote these numbers.**\n"
        );
    }
    let _ = writeln!(
        r,
        "Machine: {}. Produced by `{cmd}`; medians with (min–max) of alternated runs. What each suite measures, and how to read it: [benchmarks.md](benchmarks.md).\n",
        machine()
    );
    let _ = writeln!(r, "## Headline\n");
    let _ = writeln!(r, "| what | result | target |");
    let _ = writeln!(r, "|---|---|---|");
    let _ = writeln!(
        r,
        "| verifier cost per byte vs the kernel's checksum, marginal (1500 → 3600 B segments) | {:.3} vs {:.3} ns/B = **{marginal_ratio:.2}x** | ≤ 1.2x |",
        m.verifier_marginal, m.kernel_marginal
    );
    let _ = writeln!(
        r,
        "| the same, averaged over a {} B segment above the no-op hook (includes the verifier's fixed per-segment cost) | {:.3} vs {:.3} ns/B = **{per_byte_ratio:.2}x** | |",
        m.rows[m.rows.len() - 1].0,
        m.verifier_per_byte,
        m.kernel_per_byte
    );
    let live = |tp: &Throughput, s: Setting| median_of(&tp.ns_per_packet, s);
    let of_noop = |s: Setting| ratio(t1500, s) / ratio(t1500, Setting::Noop);
    let _ = writeln!(
        r,
        "| TCP throughput, MTU 1500, every segment verified / no-op hook: observe; enforce | **{:.2}**; **{:.2}** | ≥ 0.90 |",
        of_noop(Setting::Observe),
        of_noop(Setting::Enforce)
    );
    // The live target: the hook's own cost plus 1.5x the kernel's csum_partial over the same
    // bytes (its marginal per-byte cost from suite 1, times the live segments' mean length).
    let target = live(t1500, Setting::Noop) + 1.5 * m.kernel_marginal * t1500.segment_bytes;
    let _ = writeln!(
        r,
        "| live BPF time per verified {:.0}-byte segment (observe); floors: copied out and summed, nothing else; copied out only; the no-op hook | **{:.0}**; {:.0}; {:.0}; {:.0} ns | ≤ {target:.0} ns (no-op + 1.5x `csum_partial`) |",
        t1500.segment_bytes,
        live(t1500, Setting::Observe),
        live(t1500, Setting::CopySum),
        live(t1500, Setting::CopyOnly),
        live(t1500, Setting::Noop)
    );
    let _ = writeln!(
        r,
        "| TCP throughput, MTU 1500 / no-op hook: floor, copied out and summed, nothing else | {:.2} | |",
        of_noop(Setting::CopySum)
    );
    let _ = writeln!(
        r,
        "| traffic outside IPsec under SA scope: throughput / no-op hook; BPF time; floor: one kernel read; the no-op hook | **{:.2}**; **{:.0}**; {:.0}; {:.0} ns | ≥ 0.98; ≤ no-op + 15 ns |",
        of_noop(Setting::OutOfScope),
        live(t1500, Setting::OutOfScope),
        live(t1500, Setting::ProbeRead),
        live(t1500, Setting::Noop)
    );
    if let Some(base) = &t1500.cpu_per_gb_baseline {
        let _ = writeln!(
            r,
            "| CPU per verified GB, MTU 1500: this build vs the `--baseline-object` build, same rounds | {:.3} vs {:.3} CPU-s = **{:.2}x** | ≤ 0.5x |",
            t1500.cpu_per_gb.median,
            base.median,
            t1500.cpu_per_gb.median / base.median
        );
    }
    let _ = writeln!(
        r,
        "| CPU per verified GB: natt-monitor (BPF run time) vs tshark | {:.3} vs {:.1} CPU-s = **{:.0}x less** | ≥ 10x less |",
        t1500.cpu_per_gb.median,
        c.cpu_per_gb.median,
        c.cpu_per_gb.median / t1500.cpu_per_gb.median
    );
    let _ = writeln!(
        r,
        "| segments missed: natt-monitor vs tshark | {} of {} vs {:.1}% | 0 missed |",
        t1500.segments.0 - t1500.segments.1.min(t1500.segments.0),
        t1500.segments.0,
        c.missed.median * 100.0
    );
    let _ = writeln!(
        r,
        "| corruption storm: mismatches counted + skipped as partial checksums / injected | {} + {} / {} | equal |",
        s.mismatches, s.partial_skips, s.injected
    );
    let _ = writeln!(
        r,
        "| daemon RSS idle / peak under the storm | {:.1} MiB / {:.1} MiB | bounded |",
        f.rss_idle_kib.median / 1024.0,
        s.rss_peak_kib as f64 / 1024.0
    );
    let _ = writeln!(r);

    let _ = writeln!(r, "## 1. Per-segment cost (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        r,
        "| IP bytes | verifier ns | kernel csum ns | no-op cgroup_skb ns | no-op tc ns |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|");
    for (size, ver, ker, nskb, ntc) in &m.rows {
        let _ = writeln!(
            r,
            "| {size} | {} | {} | {} | {} |",
            ver.fmt(1),
            ker.fmt(1),
            nskb.fmt(1),
            ntc.fmt(1)
        );
    }
    let _ = writeln!(
        r,
        "\nPer byte above the hook cost ({} B): verifier {:.3} ns/B, kernel checksum {:.3} ns/B, ratio {per_byte_ratio:.2}. Marginal, from 1500 to 3600 B: verifier {:.3} ns/B, kernel checksum {:.3} ns/B, ratio {marginal_ratio:.2}.\n",
        m.rows[m.rows.len() - 1].0,
        m.verifier_per_byte,
        m.kernel_per_byte,
        m.verifier_marginal,
        m.kernel_marginal
    );

    if let Some(sctp) = m.sctp_marginal {
        let _ = writeln!(
            r,
            "SCTP packets of the same IP sizes through the same verifier, which hands them to `natt_sctp` for their CRC32c, measured alternately in the same rounds:\n"
        );
        let _ = writeln!(r, "| IP bytes | SCTP ns | TCP ns | SCTP / TCP |");
        let _ = writeln!(r, "|---|---|---|---|");
        for ((size, ver, ..), (_, sc)) in m.rows.iter().zip(&m.sctp) {
            let _ = writeln!(
                r,
                "| {size} | {} | {} | {:.2} |",
                sc.fmt(1),
                ver.fmt(1),
                sc.median / ver.median
            );
        }
        let _ = writeln!(
            r,
            "\nMarginal, from 1500 to 3600 B: CRC32c {sctp:.3} ns/B against the one's-complement sum's {:.3}, ratio {:.1}.\n",
            m.verifier_marginal,
            sctp / m.verifier_marginal
        );
    }

    if !m.baseline.is_empty() {
        let _ = writeln!(
            r,
            "Against the `--baseline-object` verifier, measured alternately in the same rounds:\n"
        );
        let _ = writeln!(
            r,
            "| IP bytes | baseline verifier ns | this build's verifier ns | this build / baseline |"
        );
        let _ = writeln!(r, "|---|---|---|---|");
        for ((size, ver, ..), (_, base)) in m.rows.iter().zip(&m.baseline) {
            let _ = writeln!(
                r,
                "| {size} | {} | {} | {:.2} |",
                base.fmt(1),
                ver.fmt(1),
                ver.median / base.median
            );
        }
        let _ = writeln!(r);
    }
    let [off, on, window] = &m.pairing;
    let _ = writeln!(
        r,
        "Forensics (docs/forensics.md), a verified 1500-byte TCP segment, measured alternately in the same rounds:\n"
    );
    let _ = writeln!(r, "| verifier | ns | ratio to capture and pairing off |");
    let _ = writeln!(r, "|---|---|---|");
    for (what, s) in [
        ("capture ring and pairing off", off),
        ("on, nothing dropped (every segment, always)", on),
        (
            "on, within 60 s of a drop (the lookup in `natt_pair`, a miss)",
            window,
        ),
    ] {
        let _ = writeln!(
            r,
            "| {what} | {} | {:.2} |",
            s.fmt(1),
            s.median / off.median
        );
    }
    let _ = writeln!(r);
    let _ = writeln!(r, "## 2. TCP throughput over veth (iperf3)\n");
    let _ = writeln!(r, "| MTU | setting | Gbit/s | ratio to no program |");
    let _ = writeln!(r, "|---|---|---|---|");
    for tp in t {
        for (setting, st) in &tp.gbps {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {:.2} |",
                tp.mtu,
                setting.name(),
                st.fmt(2),
                ratio(tp, *setting)
            );
        }
    }
    let _ = writeln!(
        r,
        "\nCPU per verified GB, from the kernel's BPF run-time statistics (observe mode):\n"
    );
    for tp in t {
        let _ = writeln!(
            r,
            "- MTU {}: {} CPU-seconds; {} of {} received segments verified.",
            tp.mtu,
            tp.cpu_per_gb.fmt(3),
            tp.segments.1,
            tp.segments.0
        );
    }

    let _ = writeln!(
        r,
        "\nLive BPF time per packet, from the kernel's run-time statistics in the same runs (run time / run count):\n"
    );
    let _ = writeln!(
        r,
        "| MTU | setting | ns per packet | above the no-op hook |"
    );
    let _ = writeln!(r, "|---|---|---|---|");
    for tp in t {
        let floor = live(tp, Setting::Noop);
        for (setting, st) in &tp.ns_per_packet {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {:.0} |",
                tp.mtu,
                setting.name(),
                st.fmt(0),
                st.median - floor
            );
        }
    }
    for tp in t {
        let _ = writeln!(
            r,
            "\n- MTU {}: verified segments averaged {:.0} L4 bytes; live cost above the no-op hook {:.3} ns/B (test-run, linear {} B frame: {:.3} ns/B above its no-op).",
            tp.mtu,
            tp.segment_bytes,
            (live(tp, Setting::Observe) - live(tp, Setting::Noop)) / tp.segment_bytes,
            m.rows[m.rows.len() - 1].0,
            m.verifier_per_byte
        );
    }
    let _ = writeln!(r);

    let _ = writeln!(r, "## 3. The capture alternative: tshark\n");
    let _ = writeln!(r, "| | natt-monitor (observe) | tshark |");
    let _ = writeln!(r, "|---|---|---|");
    let _ = writeln!(
        r,
        "| CPU-seconds per verified GB | {} | {} |",
        t1500.cpu_per_gb.fmt(3),
        c.cpu_per_gb.fmt(1)
    );
    let _ = writeln!(
        r,
        "| segments missed | {} of {} | {} % |",
        t1500.segments.0 - t1500.segments.1.min(t1500.segments.0),
        t1500.segments.0,
        Stat {
            median: c.missed.median * 100.0,
            min: c.missed.min * 100.0,
            max: c.missed.max * 100.0
        }
        .fmt(1)
    );
    let _ = writeln!(
        r,
        "| throughput while measuring (Gbit/s) | {} | {} |\n",
        t1500
            .gbps
            .iter()
            .find(|(x, _)| *x == Setting::Observe)
            .map_or_else(|| "?".to_owned(), |(_, st)| st.fmt(2)),
        c.gbps.fmt(2)
    );

    let _ = writeln!(r, "## 4. Corruption storm\n");
    let _ = writeln!(
        r,
        "{} s at {:.2} Gbit/s, {} mode, one segment in {} corrupted.\n",
        s.secs, s.gbps, s.mode, s.every
    );
    let _ = writeln!(r, "| | |");
    let _ = writeln!(r, "|---|---|");
    let _ = writeln!(r, "| corrupted segments injected | {} |", s.injected);
    let _ = writeln!(
        r,
        "| `natt_monitor_checksum_mismatches_total` | {} |",
        s.mismatches
    );
    let _ = writeln!(
        r,
        "| `natt_monitor_skipped_packets_total{{reason=\"partial_checksum\"}}` (address scope: a complete checksum equal to the pseudo-header sum) | {} |",
        s.partial_skips
    );
    let _ = writeln!(
        r,
        "| `natt_monitor_events_lost_total` (ring buffer full; counts stay exact) | {} |",
        s.events_lost
    );
    let _ = writeln!(
        r,
        "| `natt_monitor_log_lines_suppressed_total` | {} |",
        s.log_suppressed
    );
    let _ = writeln!(
        r,
        "| scrapes answered | {} of {} |",
        s.scrapes_ok, s.scrapes
    );
    let _ = writeln!(
        r,
        "| corrupted copies compared / unpaired / waiting (`natt_monitor_corruption_shapes_total`, `_copies_waiting`) | {} / {} / {} |",
        s.paired, s.unpaired, s.waiting
    );
    let _ = writeln!(
        r,
        "| `natt_monitor_corruption_pairing_full_total` | {} |",
        s.pairing_full
    );
    let _ = writeln!(r, "| scrape latency (ms) | {} |", s.scrape_ms.fmt(1));
    let _ = writeln!(r, "| daemon CPU | {:.1} % of one core |", s.cpu_percent);
    let _ = writeln!(
        r,
        "| daemon peak RSS | {:.1} MiB |\n",
        s.rss_peak_kib as f64 / 1024.0
    );

    let _ = writeln!(r, "## 5. Daemon footprint\n");
    let _ = writeln!(r, "| | |");
    let _ = writeln!(r, "|---|---|");
    let _ = writeln!(
        r,
        "| release binary (with the embedded eBPF object) | {:.1} MiB |",
        f.binary_kib as f64 / 1024.0
    );
    let _ = writeln!(
        r,
        "| start-up to attached and healthy | {} ms |",
        f.startup_ms.fmt(0)
    );
    let _ = writeln!(
        r,
        "| RSS idle | {} MiB |",
        Stat {
            median: f.rss_idle_kib.median / 1024.0,
            min: f.rss_idle_kib.min / 1024.0,
            max: f.rss_idle_kib.max / 1024.0
        }
        .fmt(1)
    );
    let _ = writeln!(
        r,
        "| RSS peak under the storm | {:.1} MiB |",
        s.rss_peak_kib as f64 / 1024.0
    );
    let h = &f.hostile;
    let _ = writeln!(
        r,
        "| endpoint against {} stalled and {} oversized (1 MiB) clients: scrapes answered | {} of {} |",
        crate::footprint::SLOW_CLIENTS,
        crate::footprint::OVERSIZED_CLIENTS,
        h.answered,
        crate::footprint::SCRAPES
    );
    let _ = writeln!(
        r,
        "| the same: scrape latency | {} ms |",
        h.scrape_ms.fmt(0)
    );
    let _ = writeln!(
        r,
        "| the same: RSS before, and peak after | {:.1} MiB, {:.1} MiB |",
        h.rss_before_kib as f64 / 1024.0,
        h.rss_peak_kib as f64 / 1024.0
    );
    let _ = writeln!(r, "\n## 6. Scale: 1, 100 and 10,000 peers\n");
    let _ = writeln!(
        r,
        "Maps sized for 16,384 peers (`--max-peers 16384`); the measured segment comes from the last peer installed.\n"
    );
    let _ = write!(r, "{}", crate::scale::table(scale));
    r
}

/// The median `s` measured, or NaN where it was not measured.
fn median_of(v: &[(Setting, Stat)], s: Setting) -> f64 {
    v.iter()
        .find(|(x, _)| *x == s)
        .map_or(f64::NAN, |(_, st)| st.median)
}

/// The live paged-payload figures of one throughput run (`natt-bench --live-only`): throughput
/// and the kernel's BPF time per packet for each setting, against the no-op hook.
pub(crate) fn live_table(tp: &Throughput) -> String {
    let noop_gbps = median_of(&tp.gbps, Setting::Noop);
    let noop_ns = median_of(&tp.ns_per_packet, Setting::Noop);
    let mut r = String::new();
    let _ = writeln!(
        r,
        "Live path, MTU {}: verified segments averaged {:.0} L4 bytes (payload in page fragments)\n",
        tp.mtu, tp.segment_bytes
    );
    let _ = writeln!(
        r,
        "| setting | Gbit/s | / no-op hook | BPF ns per packet | above the no-op hook |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|");
    for (setting, st) in &tp.gbps {
        let ns = tp.ns_per_packet.iter().find(|(x, _)| x == setting);
        let _ = writeln!(
            r,
            "| {} | {} | {:.2} | {} | {} |",
            setting.name(),
            st.fmt(2),
            st.median / noop_gbps,
            ns.map_or_else(|| "–".to_owned(), |(_, s)| s.fmt(0)),
            ns.map_or_else(
                || "–".to_owned(),
                |(_, s)| format!("{:.0}", s.median - noop_ns)
            ),
        );
    }
    let _ = writeln!(
        r,
        "\nCPU per verified GB (observe): {} CPU-seconds; {} of {} received segments verified.",
        tp.cpu_per_gb.fmt(3),
        tp.segments.1,
        tp.segments.0
    );
    if let Some(base) = &tp.cpu_per_gb_baseline {
        let _ = writeln!(
            r,
            "CPU per verified GB of the baseline object: {} CPU-seconds (this build / baseline: {:.2}).",
            base.fmt(3),
            tp.cpu_per_gb.median / base.median
        );
    }
    r
}
