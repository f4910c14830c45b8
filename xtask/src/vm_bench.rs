//! `cargo xtask vm-bench`: the verifier's live cost on the real ESP-in-UDP path, this build
//! beside the baseline build (`previous::BENCH_BASELINE`), read from the kernel's BPF run-time
//! statistics in QEMU guests of the kernel matrix (`natt-vm --bench` does the measuring; this
//! side takes the medians and writes the report).

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    previous::{self, BENCH_BASELINE},
    vm::{self, KERNELS, KernelSource, Row},
};

/// The median and range of `v` (sorted in place).
fn median(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let mid = if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    };
    (mid, v[0], v[n - 1])
}

fn num(row: &Row, key: &str) -> Result<f64> {
    row.get(key)
        .with_context(|| format!("a BENCH line without {key}: {row:?}"))?
        .parse()
        .with_context(|| format!("a BENCH line's {key} is not a number: {row:?}"))
}

/// Longest a bench guest may run (it takes about 2 minutes under TCG).
const GUEST_TIMEOUT: Duration = Duration::from_mins(8);

/// The bench's QEMU: one TCG thread, with the guest's clock counting instructions (1 ns per
/// instruction executed), so that the kernel's BPF run time is the work the program did, not
/// the host's noise (under `thread=multi` the same build measured 1.9x apart from one stream to
/// the next).
const ACCEL: [&str; 4] = ["-accel", "tcg,thread=single", "-icount", "shift=0,sleep=on"];

/// One kernel's runs, summarized.
struct Summary {
    release: &'static str,
    rounds: usize,
    /// Per build (baseline, current): BPF ns per program run.
    ns_per_run: [(f64, f64, f64); 2],
    /// Per build (baseline, current): BPF ns (of every run) per verified segment.
    ns_per_verified: [(f64, f64, f64); 2],
    /// This build / baseline, per round, of the time per verified segment.
    ratio: (f64, f64, f64),
    /// Program runs per TCP segment received by B, under this build.
    runs_per_segment: f64,
    /// Per build (none, baseline, current): Mbit/s of the measured stream.
    mbps: [(f64, f64, f64); 3],
}

fn summarize(release: &'static str, rows: &[Row]) -> Result<Summary> {
    let of = |build: &str| -> Vec<&Row> {
        rows.iter()
            .filter(|r| r.get("build").is_some_and(|b| b == build))
            .collect()
    };
    let (none, base, cur) = (of("none"), of("baseline"), of("current"));
    ensure!(
        !cur.is_empty() && cur.len() == base.len() && cur.len() == none.len(),
        "{release}: uneven BENCH lines: {} none, {} baseline, {} current",
        none.len(),
        base.len(),
        cur.len()
    );
    let per_run = |r: &Row| -> Result<f64> { Ok(num(r, "run_ns")? / num(r, "runs")?.max(1.0)) };
    let mbps = |r: &Row| -> Result<f64> { Ok(num(r, "bytes")? * 8.0 / num(r, "secs")? / 1e6) };
    let collect = |v: &[&Row], f: &dyn Fn(&Row) -> Result<f64>| -> Result<Vec<f64>> {
        v.iter().map(|r| f(r)).collect()
    };
    let per_verified =
        |r: &Row| -> Result<f64> { Ok(num(r, "run_ns")? / num(r, "verified")?.max(1.0)) };
    let (b_ns, c_ns) = (collect(&base, &per_run)?, collect(&cur, &per_run)?);
    let (b_ver, c_ver) = (
        collect(&base, &per_verified)?,
        collect(&cur, &per_verified)?,
    );
    // Side by side: each round's runs of the two builds came one after the other.
    let mut ratios: Vec<f64> = c_ver.iter().zip(&b_ver).map(|(c, b)| c / b).collect();
    let mut runs_per_segment = cur
        .iter()
        .map(|r| Ok(num(r, "runs")? / num(r, "segments")?.max(1.0)))
        .collect::<Result<Vec<f64>>>()?;
    Ok(Summary {
        release,
        rounds: cur.len(),
        ns_per_run: [median(&mut b_ns.clone()), median(&mut c_ns.clone())],
        ns_per_verified: [median(&mut b_ver.clone()), median(&mut c_ver.clone())],
        ratio: median(&mut ratios),
        runs_per_segment: median(&mut runs_per_segment).0,
        mbps: [
            median(&mut collect(&none, &mbps)?),
            median(&mut collect(&base, &mbps)?),
            median(&mut collect(&cur, &mbps)?),
        ],
    })
}

fn fmt((m, lo, hi): (f64, f64, f64), decimals: usize) -> String {
    format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
}

fn report(summaries: &[Summary], commit: &str) -> String {
    let mut r = String::from("# Live cost on the real ESP-in-UDP path (VM)\n\n");
    let _ = writeln!(
        r,
        "Produced by `cargo xtask vm-bench` at {commit} beside the baseline {} (the last revision before residuals were kept per SA), on {}. How it measures, and how to read it: [benchmarks.md](benchmarks.md#live-cost-on-the-real-esp-path-vm-bench).\n",
        &BENCH_BASELINE[..7],
        chrono_free_date()
    );
    r.push_str(
        "Each guest (QEMU TCG, one vCPU, `-icount shift=0`: the guest's clock counts instructions, 1 ns per instruction executed, so the times below are work done, free of the host's noise) streams 24 MiB at a time through one NAT-T transport SA from A behind a masquerading NAT to B, with natt-monitor as installed by default: SA scope at the cgroup2 root, the peer discovered from its SAs, enforce mode, offloads at their defaults. B's ACKs travel outside IPsec, so that the program verifies B's inbound stream alone, as on a host of its own. A round streams once with no daemon, once under the baseline build and once under this build (the order alternating by round), each daemon started afresh (its first segments learn in a warm-up stream). BPF time is the kernel's run-time statistics (`kernel.bpf_stats_enabled`) summed over natt-monitor's programs, over the measured stream only, divided by the segments the daemon verified in it (every run counted, A's dismissed ACKs included) and by the runs of the attached program. Throughput is on the guest's clock. Medians of the rounds, (min–max).\n\n",
    );
    r.push_str("| kernel | rounds | BPF ns per verified segment: baseline | this build | this build / baseline, per round | target | BPF ns per run: baseline; this build | runs per segment B received (this build) | Mbit/s (guest clock): no daemon; baseline; this build |\n|---|---|---|---|---|---|---|---|---|\n");
    for s in summaries {
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | **{}** | ≤ 1.10: {} | {}; {} | {:.2} | {}; {}; {} |",
            s.release,
            s.rounds,
            fmt(s.ns_per_verified[0], 0),
            fmt(s.ns_per_verified[1], 0),
            fmt(s.ratio, 3),
            if s.ratio.0 <= 1.10 { "met" } else { "NOT MET" },
            fmt(s.ns_per_run[0], 0),
            fmt(s.ns_per_run[1], 0),
            s.runs_per_segment,
            fmt(s.mbps[0], 0),
            fmt(s.mbps[1], 0),
            fmt(s.mbps[2], 0),
        );
    }
    r
}

/// Today's date (UTC) from `date`, which every host has.
fn chrono_free_date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// This checkout's commit, with `-dirty` when the work tree differs from it.
fn commit(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short=7", "HEAD"]);
    if git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        head
    } else {
        format!("{head}-dirty")
    }
}

/// The kernels named by `--kernel` (a prefix of their release), or the whole matrix.
pub(crate) fn selected(kernels: &[String]) -> Result<Vec<&'static KernelSource>> {
    if kernels.is_empty() {
        return Ok(KERNELS.iter().collect());
    }
    kernels
        .iter()
        .map(|k| {
            KERNELS
                .iter()
                .find(|s| s.release.starts_with(k.as_str()))
                .with_context(|| {
                    format!(
                        "--kernel {k}: no kernel of the matrix starts with it (the matrix: {})",
                        KERNELS.map(|s| s.release).join(", ")
                    )
                })
        })
        .collect()
}

pub fn vm_bench(out: &str, kernels: &[String]) -> Result<()> {
    let matrix = selected(kernels)?;
    vm::need_tools()?;
    let root = vm::root();
    let cache = root.join("target/vm");
    let baseline =
        match previous::build_revision(&root, BENCH_BASELINE, "the bench's baseline", true)? {
            Ok(bin) => bin,
            Err(why) => bail!("vm-bench needs its baseline build: {why}"),
        };
    let mut bins = vm::guest_binaries(&root, &cache)?;
    bins.push((baseline, "/natt/natt-monitor-baseline"));
    let bins: Vec<(&Path, &str)> = bins.iter().map(|(p, d)| (p.as_path(), *d)).collect();
    let kernels = vm::fetch_kernels(&cache, &matrix)?;
    let strongswan = vm::fetch_strongswan(&cache)?;
    let mut summaries = Vec::new();
    for k in &kernels {
        let initrd = vm::build_initramfs(&cache, k, &bins, &strongswan)?;
        let started = Instant::now();
        let guest = vm::boot(
            &cache,
            k,
            &initrd,
            &["--bench".to_owned()],
            0,
            GUEST_TIMEOUT,
            &ACCEL,
        )?;
        ensure!(
            guest.fails.is_empty(),
            "{}: the bench failed: {}",
            k.source.release,
            guest.fails.join("; ")
        );
        eprintln!(
            "xtask: vm-bench: {} in {:.0} s",
            k.source.release,
            started.elapsed().as_secs_f64()
        );
        summaries.push(summarize(k.source.release, &guest.bench)?);
    }
    let text = report(&summaries, &commit(&root));
    #[expect(clippy::print_stdout, reason = "the bench's report")]
    {
        println!("{text}");
    }
    fs::write(out, &text).with_context(|| format!("writing {out}"))
}
