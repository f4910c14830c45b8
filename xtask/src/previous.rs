//! Earlier builds from git history: the previous release's binary for the upgrade test, and the
//! bench's baseline. The source of a revision is taken with `git archive` (no worktree
//! registered) and built in a target directory of its own, so that nothing of this build is
//! overwritten. Cached: built once per revision and profile.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The last revision that landed before this work: the build a host upgrading to this one
/// runs today. Moved forward when a release lands.
pub const PREVIOUS_RELEASE: &str = "2413bb61dd73fa8d43b0420db64f3ea60835fb26";

/// What `cargo xtask vm-bench` measures this build against: the last revision before residuals
/// were kept per SA (issue 20), whose live per-segment cost this build must stay within 10% of.
pub const BENCH_BASELINE: &str = "5beb10a610bef9a113e5522b8cffd2b922b5f76b";

/// What the upgrade test gets in `NATT_PREVIOUS_BIN`: the binary, or why there is none
/// (`skip:` and the reason, which the test prints).
pub fn build(root: &Path) -> Result<String> {
    Ok(
        match build_revision(root, PREVIOUS_RELEASE, "the upgrade test", false)? {
            Ok(bin) => path_string(&bin),
            Err(why) => format!("skip:{why}"),
        },
    )
}

/// Builds natt-monitor at `rev` (`release`: the release profile, else debug) for `purpose`;
/// returns the binary, or why there is none (`rev` is not in this clone's history).
pub fn build_revision(
    root: &Path,
    rev: &str,
    purpose: &str,
    release: bool,
) -> Result<Result<PathBuf, String>> {
    let has = Command::new("git")
        .args(["-C"])
        .arg(root)
        .args(["cat-file", "-e", &format!("{rev}^{{commit}}")])
        .stderr(Stdio::null())
        .status()
        .context("running git")?;
    if !has.success() {
        return Ok(Err(format!(
            "{rev} ({purpose}) is not in this clone's history (a shallow clone?)"
        )));
    }
    let profile = if release { "release" } else { "debug" };
    let dir = root.join("target/previous");
    let src = dir.join(format!("src-{}", &rev[..12]));
    let bin = if release {
        dir.join(format!("natt-monitor-{}-release", &rev[..12]))
    } else {
        dir.join(format!("natt-monitor-{}", &rev[..12]))
    };
    if bin.exists() {
        return Ok(Ok(bin));
    }
    if src.exists() {
        fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    fs::create_dir_all(&src)?;
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git -C '{}' archive --format=tar {rev} | tar -x -C '{}'",
            root.display(),
            src.display()
        ))
        .status()
        .context("git archive | tar")?;
    if !archive.success() {
        bail!("extracting {rev} with git archive failed");
    }
    eprintln!("xtask: building {rev} ({profile}) for {purpose}");
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args([
        "build",
        "--locked",
        "-p",
        "natt-monitor",
        "--bin",
        "natt-monitor",
    ]);
    if release {
        cargo.arg("--release");
    }
    let built = cargo
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(dir.join("target"))
        .status()
        .context("cargo build of an earlier revision")?;
    if !built.success() {
        bail!("building {rev} for {purpose} failed");
    }
    fs::copy(dir.join("target").join(profile).join("natt-monitor"), &bin)
        .with_context(|| format!("copying the build of {rev} to {}", bin.display()))?;
    Ok(Ok(bin))
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
