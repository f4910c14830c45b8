//! `cargo xtask dist`: what operators install, in target/dist.
//!
//! - `natt-monitor`: the release binary, statically linked (glibc with `crt-static`), so it runs
//!   on any x86-64 Linux and in an image with no base;
//! - `natt-monitor_<version>_amd64.deb`: that binary, the hardened systemd unit, the example
//!   configuration (a conffile), man pages, bash/zsh/fish completions and the licences;
//! - `container/`: the build context of deploy/container/Containerfile (FROM scratch), built into
//!   an image when a container engine answers, skipped with the reason when none does.
//!
//! The .deb is assembled with Debian's own `dpkg-deb` (no packaging tool to install).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo_with_env, run};

/// The host target the static binary is built for (`--target`, so that `crt-static` applies
/// to it and not to build scripts and proc macros).
const TARGET: &str = "x86_64-unknown-linux-gnu";

fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    here.canonicalize().unwrap_or(here)
}

/// The workspace version, from the monitor's manifest as cargo resolved it.
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Builds every artifact into target/dist; returns that directory.
///
/// # Errors
/// The first step that fails, named.
pub fn dist() -> Result<PathBuf> {
    let root = root();
    let out = root.join("target/dist");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    let (dist_bin, generated) = binary_and_pages(&root, &out)?;
    let deb = debian_package(&root, &out, &dist_bin, &generated, version())?;
    let context = container_context(&root, &out, &dist_bin)?;
    container_image(&context)?;
    eprintln!(
        "xtask: dist: {}, {} and {}",
        dist_bin.display(),
        deb.display(),
        context.display()
    );
    Ok(out)
}

/// The stripped static binary in `out` and what it generates (man pages, completions) in
/// `out/generated`.
fn binary_and_pages(root: &Path, out: &Path) -> Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(out)?;
    let bin = static_binary(root)?;
    let dist_bin = out.join("natt-monitor");
    fs::copy(&bin, &dist_bin).context("copying the static binary")?;
    // Debug information triples the size; the build tree keeps the unstripped binary.
    run(Command::new("strip").arg("--strip-debug").arg(&dist_bin))?;
    let generated = out.join("generated");
    run(Command::new(&dist_bin)
        .args(["generate", "--out"])
        .arg(&generated))?;
    Ok((dist_bin, generated))
}

/// The .deb twice, for the VM suite's upgrade: versions `<version>~older` and `<version>`, both of
/// this build, under `out` (cleared first). Returns (older, current).
///
/// # Errors
/// The first step that fails, named.
pub fn upgrade_pair(out: &Path) -> Result<(PathBuf, PathBuf)> {
    let root = root();
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    let (bin, generated) = binary_and_pages(&root, out)?;
    let older = format!("{}~older", version());
    Ok((
        debian_package(&root, &out.join("older"), &bin, &generated, &older)?,
        debian_package(&root, &out.join("current"), &bin, &generated, version())?,
    ))
}

/// `cargo build --release --target x86_64-unknown-linux-gnu` with `+crt-static`; checks that
/// the result asks for no dynamic loader.
fn static_binary(root: &Path) -> Result<PathBuf> {
    cargo_with_env(
        &[
            "build",
            "--release",
            "-p",
            "natt-monitor",
            "--bin",
            "natt-monitor",
            "--target",
            TARGET,
        ],
        &[(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )],
    )?;
    let bin = root.join(format!("target/{TARGET}/release/natt-monitor"));
    let elf = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    if has_interpreter(&elf) {
        bail!(
            "{} is dynamically linked (it has a PT_INTERP program header)",
            bin.display()
        );
    }
    Ok(bin)
}

/// True when a 64-bit little-endian ELF file has a `PT_INTERP` program header (a dynamic
/// loader).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let (Ok(phoff), phentsize, phnum) = (
        usize::try_from(u64_at(0x20)),
        usize::from(u16_at(0x36)),
        usize::from(u16_at(0x38)),
    ) else {
        return true;
    };
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4) == Some(&3u32.to_le_bytes()[..])
    })
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Stages the package tree and builds it with `dpkg-deb`.
fn debian_package(
    root: &Path,
    out: &Path,
    bin: &Path,
    generated: &Path,
    version: &str,
) -> Result<PathBuf> {
    let stage = out.join("deb");
    copy(bin, &stage.join("usr/bin/natt-monitor"), 0o755)?;
    let unit = fs::read_to_string(root.join("deploy/systemd/natt-monitor.service"))?
        .replace("/usr/local/bin/natt-monitor", "/usr/bin/natt-monitor");
    write(
        &stage.join("lib/systemd/system/natt-monitor.service"),
        &unit,
        0o644,
    )?;
    copy(
        &root.join("deploy/natt-monitor.toml"),
        &stage.join("etc/natt-monitor/natt-monitor.toml"),
        0o644,
    )?;
    copy(
        &root.join("docs/natt-monitor.example.toml"),
        &stage.join("usr/share/doc/natt-monitor/examples/natt-monitor.example.toml"),
        0o644,
    )?;
    for page in fs::read_dir(generated.join("man"))? {
        let page = page?.path();
        let name = page
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let dest = stage.join("usr/share/man/man1").join(format!("{name}.gz"));
        fs::create_dir_all(dest.parent().unwrap_or(&stage))?;
        run(Command::new("sh").arg("-c").arg(format!(
            "gzip -9n < '{}' > '{}'",
            page.display(),
            dest.display()
        )))?;
    }
    let completions = generated.join("completions");
    for (file, dest) in [
        (
            "natt-monitor.bash",
            "usr/share/bash-completion/completions/natt-monitor",
        ),
        (
            "_natt-monitor",
            "usr/share/zsh/vendor-completions/_natt-monitor",
        ),
        (
            "natt-monitor.fish",
            "usr/share/fish/vendor_completions.d/natt-monitor.fish",
        ),
    ] {
        copy(&completions.join(file), &stage.join(dest), 0o644)?;
    }
    let doc = stage.join("usr/share/doc/natt-monitor");
    for f in ["LICENSE-MIT", "LICENSE-APACHE", "README.md"] {
        copy(&root.join(f), &doc.join(f), 0o644)?;
    }
    write(
        &doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: natt-monitor\n\n\
         Files: *\n\
         Copyright: The natt-monitor developers\n\
         License: MIT or Apache-2.0\n \
         The full texts are in /usr/share/doc/natt-monitor/LICENSE-MIT and LICENSE-APACHE.\n",
        0o644,
    )?;
    debian_control(&stage.join("DEBIAN"), version)?;
    let deb = out.join(format!("natt-monitor_{version}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    Ok(deb)
}

/// The package's control files: its description, the conffile, and the maintainer scripts.
fn debian_control(debian: &Path, version: &str) -> Result<()> {
    write(
        &debian.join("control"),
        &format!(
            "Package: natt-monitor\n\
             Version: {version}\n\
             Architecture: amd64\n\
             Maintainer: natt-monitor developers <natt-monitor@example.org>\n\
             Section: net\n\
             Priority: optional\n\
             Homepage: https://github.com/natt-monitor/natt-monitor\n\
             Description: re-checks TCP/UDP checksums after IPsec NAT-T decapsulation\n \
             Linux marks segments decapsulated from ESP-in-UDP (NAT traversal) as checksum-\n \
             verified without verifying them. natt-monitor puts the check back with an eBPF\n \
             program, exports Prometheus metrics, and in enforce mode drops corrupted\n \
             segments so that TCP retransmits them. The binary is statically linked.\n"
        ),
        0o644,
    )?;
    write(
        &debian.join("conffiles"),
        "/etc/natt-monitor/natt-monitor.toml\n",
        0o644,
    )?;
    // On removal (not on upgrade), stop the daemon and remove the verifier it left pinned,
    // wherever the configuration pins it. After an upgrade, restart a running daemon so that the
    // new binary runs (it adopts the pins: no gap). On purge, remove the state directory
    // (captures). The service is not enabled on install: the packaged configuration verifies
    // the host's NAT-T SAs in observe mode, and the operator chooses when. No script touches
    // the running system when dpkg installs into another root (DPKG_ROOT).
    write(
        &debian.join("prerm"),
        "#!/bin/sh\nset -e\n\
         if [ \"$1\" = remove ] && [ -z \"${DPKG_ROOT:-}\" ]; then\n\
         \tif [ -d /run/systemd/system ]; then systemctl stop natt-monitor.service || true; fi\n\
         \t/usr/bin/natt-monitor detach --config /etc/natt-monitor/natt-monitor.toml \\\n\
         \t\t|| /usr/bin/natt-monitor detach || true\n\
         fi\n",
        0o755,
    )?;
    write(
        &debian.join("postinst"),
        "#!/bin/sh\nset -e\n\
         if [ \"$1\" = configure ] && [ -z \"${DPKG_ROOT:-}\" ] && [ -d /run/systemd/system ]; then\n\
         \tsystemctl daemon-reload || true\n\
         \tif [ -n \"$2\" ]; then systemctl try-restart natt-monitor.service || true; fi\n\
         fi\n",
        0o755,
    )?;
    write(
        &debian.join("postrm"),
        "#!/bin/sh\nset -e\n\
         if [ \"$1\" = purge ] && [ -z \"${DPKG_ROOT:-}\" ]; then\n\
         \trm -rf /var/lib/natt-monitor\n\
         \tif [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n\
         fi\n",
        0o755,
    )?;
    Ok(())
}

/// The container build context: the Containerfile and what it copies.
fn container_context(root: &Path, out: &Path, bin: &Path) -> Result<PathBuf> {
    let ctx = out.join("container");
    copy(
        &root.join("deploy/container/Containerfile"),
        &ctx.join("Containerfile"),
        0o644,
    )?;
    copy(bin, &ctx.join("natt-monitor"), 0o755)?;
    copy(
        &root.join("deploy/natt-monitor.toml"),
        &ctx.join("natt-monitor.toml"),
        0o644,
    )?;
    for f in ["LICENSE-MIT", "LICENSE-APACHE"] {
        copy(&root.join(f), &ctx.join(f), 0o644)?;
    }
    Ok(ctx)
}

/// Builds the image with podman or docker, whichever answers (podman first: Debian's archive
/// has it, and `scripts/setup.sh --test` installs it); otherwise says why not.
fn container_image(ctx: &Path) -> Result<()> {
    let answers = |engine: &str| {
        Command::new(engine)
            .arg("info")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let Some(engine) = ["podman", "docker"].into_iter().find(|e| answers(e)) else {
        eprintln!(
            "xtask: dist: SKIP the container image: neither `podman info` nor `docker info` answers; build it elsewhere with `podman build -t natt-monitor:{} {}`",
            version(),
            ctx.display()
        );
        return Ok(());
    };
    let tag = format!("natt-monitor:{}", version());
    run(Command::new(engine).args(["build", "--tag", &tag]).arg(ctx))
}
