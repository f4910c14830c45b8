//! `natt-bench`: the benchmark suite behind `cargo xtask bench` (root only).
//!
//! Everything is measured side by side in one run, alternating the variants, and reported as
//! medians with min–max, because these machines are noisy:
//! 1. per-segment cost in `BPF_PROG_TEST_RUN`: the verifier vs the kernel's own checksum
//!    (`bpf_csum_diff` in a tc program) vs no-op programs (fixed hook cost);
//! 2. TCP throughput over veth with iperf3: no program, observe, enforce; CPU per verified GB
//!    from the kernel's BPF run-time statistics;
//! 3. the capture alternative: tshark validating TCP checksums on the receiving interface;
//! 4. a corruption storm: every segment corrupted for 30 s against the real daemon;
//! 5. the daemon's footprint.
//!
//! Writes the results (`--out`, default docs/benchmarks-results.md) and prints them. The method
//! and the reading of the numbers are prose, in docs/benchmarks.md.
#![expect(clippy::print_stdout, reason = "the report is the program's output")]
#![expect(
    clippy::cast_precision_loss,
    reason = "counts far below 2^52 become f64 for ratios"
)]
#![allow(
    clippy::many_single_char_names,
    clippy::similar_names,
    reason = "measurement code names its samples after the report's sections (m, t, c, s, f)"
)]

mod daemon;
mod footprint;
mod micro;
mod report;
mod scale;
mod stats;
mod storm;
mod throughput;
mod tshark;

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{
    footprint::footprint, micro::micro, report::report, storm::storm, throughput::throughput,
    tshark::capture,
};

/// A suite run alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Only {
    Micro,
    Live,
    Scale,
    Storm,
}

pub(crate) struct Args {
    pub(crate) out: PathBuf,
    pub(crate) quick: bool,
    /// One suite alone (`--micro-only`, `--live-only`, `--scale-only`), printed.
    pub(crate) only: Option<Only>,
    /// `--baseline-object`: an earlier build's verifier object, measured beside this one.
    pub(crate) baseline: Option<PathBuf>,
}

pub(crate) fn parse_args() -> Result<Args> {
    let mut out = PathBuf::from("docs/benchmarks-results.md");
    let mut quick = false;
    let mut only = Vec::new();
    let mut baseline = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = it.next().context("--out needs a path")?.into(),
            "--quick" => quick = true,
            "--micro-only" => only.push(Only::Micro),
            "--scale-only" => only.push(Only::Scale),
            "--live-only" => only.push(Only::Live),
            "--storm-only" => only.push(Only::Storm),
            "--baseline-object" => {
                baseline = Some(PathBuf::from(
                    it.next().context("--baseline-object needs a path")?,
                ));
            }
            "-h" | "--help" => {
                println!(
                    "natt-bench [--out FILE] [--quick] [--micro-only | --live-only | --scale-only | --storm-only] [--baseline-object FILE]\n  --quick: short runs, to check the harness (numbers are not reportable)\n  --micro-only: only the BPF_PROG_TEST_RUN comparison, printed, no report written\n  --scale-only: only the per-segment cost with 1, 100 and 10,000 peers, printed, no report\n    written\n  --live-only: only the live paged-payload path (iperf3 at MTU 1500 with the kernel's BPF\n    statistics), printed, no report written\n  --storm-only: only the corruption storm, in observe mode (every segment corrupted) and in\n    enforce mode (every fourth one: each dropped segment paired with its retransmission),\n    printed, no report written\n  --baseline-object FILE: also measure this verifier object (an earlier build's\n    natt-verifier, same map ABI) beside the current one, in suites 1 and 2"
                );
                std::process::exit(0);
            }
            other => {
                bail!(
                    "unknown argument {other:?} (expected --out FILE, --quick, --micro-only, --live-only, --scale-only, --storm-only or --baseline-object FILE)"
                )
            }
        }
    }
    if only.len() > 1 {
        bail!("--micro-only, --live-only, --scale-only and --storm-only exclude each other");
    }
    Ok(Args {
        out,
        quick,
        only: only.pop(),
        baseline,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("natt-bench needs root (BPF, namespaces, cgroups)");
    }
    // The BPF test runs alone (`--micro-only`) and the storm (natt-peer) need none of the
    // traffic tools.
    let tools: &[&str] = if matches!(args.only, Some(Only::Micro | Only::Storm)) {
        &[]
    } else {
        &["iperf3", "tshark", "ss"]
    };
    for tool in tools {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            bail!("{tool} is not installed; run scripts/setup.sh --bench");
        }
    }
    let baseline = args
        .baseline
        .as_ref()
        .map(|p| fs::read(p).with_context(|| format!("--baseline-object {}", p.display())))
        .transpose()?;
    let baseline = baseline.as_deref();
    let (rounds, repeat, secs, storm_secs) = if args.quick {
        (3, 20_000, 2, 5)
    } else {
        (5, 200_000, 10, 30)
    };
    if args.only == Some(Only::Scale) {
        print!("{}", scale::table(&scale::scale(3 * rounds, repeat)?));
        return Ok(());
    }
    if args.only == Some(Only::Storm) {
        for s in [
            storm(storm_secs)?,
            storm::storm_in(storm_secs, "enforce", 4)?,
        ] {
            print_storm(&s);
        }
        return Ok(());
    }
    if args.only == Some(Only::Live) {
        let t = throughput(1500, rounds, secs, baseline)?;
        print!("{}", report::live_table(&t));
        return Ok(());
    }
    eprintln!("natt-bench: 1/6 BPF_PROG_TEST_RUN");
    let m = micro(rounds, repeat, baseline)?;
    if args.only == Some(Only::Micro) {
        print_micro(&m);
        return Ok(());
    }
    eprintln!("natt-bench: 2/6 iperf3 throughput");
    let t = vec![
        throughput(1500, rounds, secs, baseline)?,
        throughput(9000, rounds, secs, baseline)?,
    ];
    eprintln!("natt-bench: 3/6 tshark");
    let c = capture(
        if args.quick { 1 } else { 3 },
        if args.quick { 2 } else { 5 },
    )?;
    eprintln!("natt-bench: 4/6 corruption storm");
    let s = storm(storm_secs)?;
    eprintln!("natt-bench: 5/6 footprint");
    let f = footprint(rounds)?;
    eprintln!("natt-bench: 6/6 scale");
    let sc = scale::scale(3 * rounds, repeat)?;
    let cmd = if args.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let text = report(&args, &m, &t, &c, &s, &f, &sc, cmd);
    fs::write(&args.out, &text).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{text}");
    Ok(())
}

/// `--storm-only`: suite 4, printed.
fn print_storm(s: &storm::Storm) {
    println!(
        "storm, {} mode, 1 in {} corrupted, {} s at {:.2} Gbit/s: injected {}, mismatches {} (+ {} partial-checksum skips), events lost {}, log lines suppressed {}, compared {}, unpaired {}, waiting {}, pairing full {}, capture ring full {}, scrapes {} of {} ({} ms), daemon CPU {:.1} %, peak RSS {:.1} MiB; the sender's tail drained in {:.1} s",
        s.mode,
        s.every,
        s.secs,
        s.gbps,
        s.injected,
        s.mismatches,
        s.partial_skips,
        s.events_lost,
        s.log_suppressed,
        s.paired,
        s.unpaired,
        s.waiting,
        s.pairing_full,
        s.ring_full,
        s.scrapes_ok,
        s.scrapes,
        s.scrape_ms.fmt(1),
        s.cpu_percent,
        s.rss_peak_kib as f64 / 1024.0,
        s.drain_secs
    );
}

/// `--micro-only`: suite 1, printed.
fn print_micro(m: &micro::Micro) {
    let [off, on, window] = &m.pairing;
    println!(
        "1500 B verified: capture and pairing off {} ns, on with nothing dropped {} ns, on within the pairing window {} ns",
        off.fmt(1),
        on.fmt(1),
        window.fmt(1)
    );
    for (size, ver, ker, nskb, ntc) in &m.rows {
        println!(
            "{size} B: verifier {} ns, kernel csum {} ns, noop skb {} ns, noop tc {} ns",
            ver.fmt(1),
            ker.fmt(1),
            nskb.fmt(1),
            ntc.fmt(1)
        );
    }
    for ((size, ver, ..), (_, base)) in m.rows.iter().zip(&m.baseline) {
        println!(
            "{size} B: baseline verifier {} ns, this build {} ns",
            base.fmt(1),
            ver.fmt(1)
        );
    }
    for (size, sctp) in &m.sctp {
        println!(
            "{size} B: SCTP (CRC32c) through the verifier {} ns",
            sctp.fmt(1)
        );
    }
    if let Some(sctp) = m.sctp_marginal {
        println!(
            "marginal per byte (1500 -> 3600 B): SCTP's CRC32c {sctp:.3} ns/B, the one's-complement sum {:.3} ns/B, ratio {:.1}",
            m.verifier_marginal,
            sctp / m.verifier_marginal
        );
    }
    println!(
        "per byte above hook cost: verifier {:.3} ns/B, kernel {:.3} ns/B, ratio {:.2}",
        m.verifier_per_byte,
        m.kernel_per_byte,
        m.verifier_per_byte / m.kernel_per_byte
    );
    println!(
        "marginal per byte (1500 -> 3600 B): verifier {:.3} ns/B, kernel {:.3} ns/B, ratio {:.2}",
        m.verifier_marginal,
        m.kernel_marginal,
        m.verifier_marginal / m.kernel_marginal
    );
}
