//! The previous release's binary, for the upgrade test: the source of `PREVIOUS_RELEASE` taken
//! from git history (`git archive`, no worktree registered) and built in a target directory of
//! its own, so that nothing of this build is overwritten. Cached: built once per revision.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The last revision that landed before this work: the build a host upgrading to this one
/// runs today. Moved forward when a release lands.
pub const PREVIOUS_RELEASE: &str = "2413bb61dd73fa8d43b0420db64f3ea60835fb26";

/// What the upgrade test gets in `NATT_PREVIOUS_BIN`: the binary, or why there is none
/// (`skip:` and the reason, which the test prints).
pub fn build(root: &Path) -> Result<String> {
    let has = Command::new("git")
        .args(["-C"])
        .arg(root)
        .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
        .stderr(Stdio::null())
        .status()
        .context("running git")?;
    if !has.success() {
        return Ok(format!(
            "skip:the previous release {PREVIOUS_RELEASE} is not in this clone's history (a shallow clone?)"
        ));
    }
    let dir = root.join("target/previous");
    let src = dir.join(format!("src-{}", &PREVIOUS_RELEASE[..12]));
    let bin = dir.join(format!("natt-monitor-{}", &PREVIOUS_RELEASE[..12]));
    if bin.exists() {
        return Ok(path_string(&bin));
    }
    if src.exists() {
        fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    fs::create_dir_all(&src)?;
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git -C '{}' archive --format=tar {PREVIOUS_RELEASE} | tar -x -C '{}'",
            root.display(),
            src.display()
        ))
        .status()
        .context("git archive | tar")?;
    if !archive.success() {
        bail!("extracting {PREVIOUS_RELEASE} with git archive failed");
    }
    eprintln!("xtask: building the previous release {PREVIOUS_RELEASE} for the upgrade test");
    let built = Command::new(env!("CARGO"))
        .args([
            "build",
            "--locked",
            "-p",
            "natt-monitor",
            "--bin",
            "natt-monitor",
        ])
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(dir.join("target"))
        .status()
        .context("cargo build of the previous release")?;
    if !built.success() {
        bail!("building the previous release {PREVIOUS_RELEASE} failed");
    }
    fs::copy(dir.join("target/debug/natt-monitor"), &bin)
        .with_context(|| format!("copying the previous release to {}", bin.display()))?;
    Ok(path_string(&bin))
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
