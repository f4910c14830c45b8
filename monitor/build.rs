//! Builds the eBPF objects (`natt-verifier`, `natt-testbed`) from `monitor-ebpf` for the BPF
//! target with the nightly pinned in `monitor-ebpf/rust-toolchain.toml`, whose LLVM matches
//! bpf-linker's.
//! `AYA_BUILD_SKIP=1` writes empty stand-ins instead, so `cargo check`/`clippy` work without
//! bpf-linker; loading such a build fails with a clear error at run time.

use std::{env, fs, path::PathBuf};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

const OBJECTS: [&str; 2] = ["natt-verifier", "natt-testbed"];

fn main() -> anyhow::Result<()> {
    revision();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        for name in OBJECTS {
            let path = out_dir.join(name);
            if !path.exists() {
                fs::write(&path, b"")
                    .with_context(|| format!("writing stub {}", path.display()))?;
            }
        }
    }
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?)
        .join("../monitor-ebpf");
    let pin = root.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", pin.display());
    let toolchain = channel(&pin)?;
    let root = root.to_str().context("monitor-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package { name: "monitor-ebpf", root_dir: root, ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
    .context("building the eBPF programs (run scripts/setup.sh if bpf-linker or the pinned nightly is missing)")
}

/// Sets `NATT_MONITOR_REVISION` for `natt_monitor_build_info`: the environment's value when
/// set (a build from a source tarball), else the git commit the source is at, else `unknown`.
fn revision() {
    println!("cargo:rerun-if-env-changed=NATT_MONITOR_REVISION");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let rev = env::var("NATT_MONITOR_REVISION")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // Rebuilt when HEAD moves: a commit moves the branch ref, a checkout moves HEAD.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = PathBuf::from(dir);
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("packed-refs").display()
        );
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", dir.join(head).display());
        }
    }
    println!("cargo:rustc-env=NATT_MONITOR_REVISION={rev}");
}

/// The `channel` of a rust-toolchain.toml.
fn channel(path: &std::path::Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("channel = \"")?.strip_suffix('"'))
        .map(str::to_owned)
        .with_context(|| format!("{}: no `channel = \"...\"` line", path.display()))
}
