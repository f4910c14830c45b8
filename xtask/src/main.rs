//! `cargo xtask`: the one door to natt-monitor's privileged work.
//!
//! - `cargo xtask test`: unit tests, then the root-only kernel tests (BPF test runs, network
//!   namespaces) single-threaded, because they share kernel state, then the VM suite.
//! - `cargo xtask vm-test`: the real ESP-in-UDP path under QEMU with Debian's kernels.
//! - `cargo xtask lint`: rustfmt check and clippy (workspace, then the eBPF crate for the BPF
//!   target, since feature unification hides BPF-only code from the workspace pass).
//! - `cargo xtask dist`: the static binary, the .deb and the container build context in
//!   target/dist (the image too, where a container engine answers).
//! - `cargo xtask bench`: release builds, then the benchmark suite (root); writes
//!   docs/benchmarks-results.md (the prose is docs/benchmarks.md).
//! - `cargo xtask vm-bench`: the live per-segment cost on the real ESP path under QEMU, this
//!   build beside the baseline build; writes docs/benchmarks-vm-results.md.
//!
//! Install prerequisites first with `scripts/setup.sh --test` (or `--bench`); it is idempotent.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod beside;
mod dist;
mod previous;
mod vm;
mod vm_bench;
mod vm_systemd;

/// The eBPF toolchain, pinned in `monitor-ebpf/rust-toolchain.toml` (and only there).
fn ebpf_toolchain() -> Result<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../monitor-ebpf/rust-toolchain.toml"
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("channel = \"")?.strip_suffix('"'))
        .map(str::to_owned)
        .with_context(|| format!("{path}: no `channel = \"...\"` line"))
}

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "natt-monitor build, test and lint tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Lints, unit tests, privileged kernel tests and the VM suite (needs root for the kernel
    /// tests and the VM suite; they print SKIP with a reason otherwise).
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// rustfmt check and clippy with warnings denied.
    Lint,
    /// Builds what operators install into target/dist: the statically linked binary, the .deb
    /// (binary, systemd unit, example configuration, man pages, completions, licences) and the
    /// container build context (FROM scratch), plus the image where podman or docker answers.
    Dist,
    /// The real IPsec path (root; needs `scripts/setup.sh --test`): boots Debian's 5.10, 6.1,
    /// 6.12 and 7.3 kernels (pinned packages) under QEMU and runs the ESP-in-UDP scenarios with
    /// natt-monitor discovering its peers from the SAs. Downloads are cached in target/vm.
    VmTest {
        /// Also write the result table to this file.
        #[arg(long)]
        out: Option<String>,
        /// Only this kernel of the matrix (a prefix of its release, e.g. 6.12); repeat for
        /// more. Default: all four.
        #[arg(long = "kernel", value_name = "RELEASE")]
        kernels: Vec<String>,
        /// Run only these scenarios (e.g. a-clean d-nat-learned); default: all.
        only: Vec<String>,
    },
    /// The verifier's live cost on the real ESP-in-UDP path (root; needs `scripts/setup.sh
    /// --test`): boots the kernel matrix under QEMU and, in the default install shape (SA scope,
    /// discovery, NAT, enforce), streams with no daemon, the baseline build (the last revision
    /// before per-SA residuals, built from git history) and this build, alternately, reading the
    /// kernel's BPF run-time statistics. Writes docs/benchmarks-vm-results.md. About 3 minutes a
    /// kernel.
    VmBench {
        /// Where to write the report.
        #[arg(long, default_value = "docs/benchmarks-vm-results.md")]
        out: String,
        /// Only this kernel of the matrix (a prefix of its release, e.g. 6.1 or 7.3); repeat
        /// for more. Default: all four.
        #[arg(long = "kernel", value_name = "RELEASE")]
        kernels: Vec<String>,
    },
    /// Benchmarks (root; needs `scripts/setup.sh --bench`): BPF test runs against the kernel's
    /// checksum, iperf3 throughput, tshark, a corruption storm, the daemon's footprint. Writes
    /// docs/benchmarks-results.md. Takes about 10 minutes.
    Bench {
        /// Short runs to check the harness; the report says its numbers are not reportable.
        #[arg(long)]
        quick: bool,
        /// Where to write the report.
        #[arg(long, default_value = "docs/benchmarks-results.md")]
        out: String,
        /// An earlier build's verifier object (`target/release/build/natt-monitor-*/out/
        /// natt-verifier` of that checkout), measured beside this build's for a before/after.
        #[arg(long, value_name = "FILE")]
        baseline_object: Option<String>,
    },
}

fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

fn cargo_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    run(Command::new(env!("CARGO"))
        .args(args)
        .envs(env.iter().copied()))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn lint() -> Result<()> {
    let nightly = ebpf_toolchain()?;
    run(Command::new("rustup").args(["run", &nightly, "cargo", "fmt", "--all", "--check"]))?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    run(Command::new("rustup")
        .args([
            "run",
            &nightly,
            "cargo",
            "clippy",
            "-p",
            "monitor-ebpf",
            "--bins",
            "--release",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/clippy-bpf",
        ])
        .args(["--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        ))
}

/// Passed, skipped and failed test counts over several `cargo test` runs.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    /// The `SKIP <test>: <reason>` lines skipped tests printed: libtest counts them as
    /// passed, this tally does not.
    skipped: Vec<String>,
}

impl Tally {
    /// The closing summary line.
    fn summary(&self) -> String {
        let skipped = self.skipped.len() as u64;
        format!(
            "xtask: {} passed, {skipped} skipped, {} failed",
            self.passed.saturating_sub(skipped),
            self.failed
        )
    }
}

/// Runs `cargo test` with `args` (and `env`), echoing its output and adding up its
/// `test result:` lines, and the `SKIP` lines tests print on stderr.
fn cargo_test(args: &[&str], env: &[(&str, &str)], tally: &mut Tally) -> Result<()> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.arg("test")
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let err = child.stderr.take().context("cargo test stderr")?;
    let skips = std::thread::spawn(move || {
        let mut skips = Vec::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.starts_with("SKIP ") {
                skips.push(line);
            }
        }
        skips
    });
    let out = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line.context("reading cargo test output")?;
        #[expect(clippy::print_stdout, reason = "relaying the test runner's output")]
        {
            println!("{line}");
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |label: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(label)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            tally.passed += count(" passed");
            tally.failed += count(" failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    tally.skipped.extend(
        skips
            .join()
            .map_err(|_| anyhow::anyhow!("the stderr relay panicked"))?,
    );
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn test(no_lint: bool) -> Result<()> {
    if !no_lint {
        lint()?;
    }
    let mut tally = Tally::default();
    let result = (|| {
        // Kernel-free unit and property tests.
        cargo_test(&["-p", "monitor-ebpf", "--lib"], &[], &mut tally)?;
        // This tool's own: the VM suite's console reading and its guest scheduling.
        cargo_test(&["-p", "xtask"], &[], &mut tally)?;
        cargo_test(
            &["-p", "natt-monitor", "--lib", "--bins", "--tests"],
            &[],
            &mut tally,
        )?;
        // The daemon tests run the real binary; the package test installs the .deb.
        cargo(&["build", "-p", "natt-monitor", "--bin", "natt-monitor"])?;
        let dist = dist::dist()?;
        let dist = dist.to_str().context("a UTF-8 target path")?;
        // The previous release's binary, for the upgrade test.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let previous = previous::build(&root)?;
        // The README's first command leaves natt-monitor running and pinned at the default
        // path; the root tests run beside such an install and must leave it alone.
        // SAFETY: geteuid has no preconditions.
        let beside = if unsafe { libc::geteuid() } == 0 {
            Some(beside::Install::start(
                &std::path::Path::new(dist).join("natt-monitor"),
            )?)
        } else {
            None
        };
        // Root-only tests: shared kernel state, so one at a time. --nocapture keeps the
        // measured counts and any SKIP reasons in the log.
        cargo_test(
            &[
                "-p",
                "natt-monitor-tests",
                "--lib",
                "--bins",
                "--tests",
                "--",
                "--test-threads=1",
                "--nocapture",
            ],
            &[("NATT_DIST_DIR", dist), ("NATT_PREVIOUS_BIN", &previous)],
            &mut tally,
        )?;
        if let Some(install) = beside {
            install.finish()?;
            tally.passed += 1;
        }
        // The real ESP-in-UDP path, in QEMU with Debian's kernels.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            tally.passed += vm::vm_test(None, &[], &[])? as u64;
        } else {
            let skip = "SKIP vm-test: needs root, like the other kernel tests (it runs apt-get and boots QEMU)";
            eprintln!("{skip}");
            tally.passed += 1;
            tally.skipped.push(skip.to_owned());
        }
        Ok(())
    })();
    #[expect(clippy::print_stdout, reason = "the closing summary lines CI reads")]
    {
        for skip in &tally.skipped {
            println!("xtask: {skip}");
        }
        println!("{}", tally.summary());
    }
    result
}

fn bench(quick: bool, out: &str, baseline_object: Option<&str>) -> Result<()> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "natt-monitor",
        "--bin",
        "natt-monitor",
    ])?;
    cargo(&[
        "build",
        "--release",
        "-p",
        "natt-bench",
        "-p",
        "natt-monitor-tests",
        "--bin",
        "natt-bench",
        "--bin",
        "natt-peer",
    ])?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(root.join("target/release/natt-bench"));
    cmd.args(["--out", out])
        .env("NATT_MONITOR_BIN", root.join("target/release/natt-monitor"));
    if quick {
        cmd.arg("--quick");
    }
    if let Some(obj) = baseline_object {
        cmd.args(["--baseline-object", obj]);
    }
    run(&mut cmd)
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Test { no_lint } => test(no_lint),
        Task::Lint => lint(),
        Task::Dist => dist::dist().map(drop),
        Task::VmTest { out, kernels, only } => {
            vm::vm_test(out.as_deref(), &kernels, &only).map(|_| ())
        }
        Task::VmBench { out, kernels } => vm_bench::vm_bench(&out, &kernels),
        Task::Bench {
            quick,
            out,
            baseline_object,
        } => bench(quick, &out, baseline_object.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn a_skipped_test_is_counted_as_skipped_not_passed() {
        // libtest reported 5 passed, one of which printed a SKIP line.
        let t = Tally {
            passed: 5,
            failed: 1,
            skipped: vec!["SKIP systemd_unit_verifies: systemd-analyze is not installed".into()],
        };
        assert_eq!(t.summary(), "xtask: 4 passed, 1 skipped, 1 failed");
    }
}
