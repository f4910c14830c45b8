//! `cargo xtask`: the one door to natt-monitor's privileged work.
//!
//! - `cargo xtask test`: unit tests, then the root-only kernel tests (BPF test runs, network
//!   namespaces) single-threaded, because they share kernel state.
//! - `cargo xtask lint`: rustfmt check and clippy (workspace, then the eBPF crate for the BPF
//!   target, since feature unification hides BPF-only code from the workspace pass).
//!
//! Install prerequisites first with `scripts/setup.sh --test` (idempotent).

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// Pinned in scripts/setup.sh and monitor/build.rs.
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-24";

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
    /// Lints, unit tests and privileged kernel tests (needs root for the kernel tests; they
    /// print SKIP with a reason otherwise).
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// rustfmt check and clippy with warnings denied.
    Lint,
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(env!("CARGO")).args(args))
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
    run(Command::new("rustup").args(["run", EBPF_TOOLCHAIN, "cargo", "fmt", "--all", "--check"]))?;
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
            EBPF_TOOLCHAIN,
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

fn test(no_lint: bool) -> Result<()> {
    if !no_lint {
        lint()?;
    }
    // Kernel-free unit and property tests.
    cargo(&["test", "-p", "monitor-ebpf", "--lib"])?;
    cargo(&["test", "-p", "natt-monitor"])?;
    // Root-only tests: shared kernel state, so one at a time.
    cargo(&["test", "-p", "natt-monitor-tests", "--", "--test-threads=1"])?;
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Test { no_lint } => test(no_lint),
        Task::Lint => lint(),
    }
}
