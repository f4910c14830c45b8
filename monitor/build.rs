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

/// The `channel` of a rust-toolchain.toml.
fn channel(path: &std::path::Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("channel = \"")?.strip_suffix('"'))
        .map(str::to_owned)
        .with_context(|| format!("{}: no `channel = \"...\"` line", path.display()))
}
