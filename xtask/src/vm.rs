//! `cargo xtask vm-test`: natt-monitor on the real ESP-in-UDP path, which the development kernel
//! lacks. Fetches Debian kernels with `apt-get download` (never installed on the host), builds
//! an initramfs with busybox, the host's `ip` and `nft`, the needed modules and our binaries,
//! boots each kernel under QEMU (TCG) and runs `natt-vm`, which prints one result line per
//! scenario. Every claim is asserted inside the guest; this side checks that every scenario
//! ran and passed and prints the table.
//!
//! Downloads and builds are cached under `target/vm/`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// A kernel to boot: where its metapackage comes from.
struct KernelSource {
    /// Short name for logs.
    label: &'static str,
    /// apt suite holding the `linux-image-amd64` version to follow.
    suite: &'static str,
}

const KERNELS: [KernelSource; 2] = [
    KernelSource {
        label: "bookworm",
        suite: "bookworm-security",
    },
    KernelSource {
        label: "bookworm-backports",
        suite: "bookworm-backports",
    },
];

/// Modules the scenarios need; their dependencies are added from each module's `depends=`.
const MODULES: &[&str] = &[
    // libcrc32c (nf_tables, nf_conntrack) needs the crc32c algorithm registered first.
    "crc32c_generic",
    "veth",
    "xfrm_user",
    "esp4",
    "esp6",
    "authenc",
    "echainiv",
    "seqiv",
    "ecb",
    "cbc",
    "aes_generic",
    "crypto_null",
    "sha256_generic",
    "hmac",
    "drbg",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_numgen",
    "nf_conntrack",
    "nf_nat",
];

/// Staged but loaded only by the scenario that needs it (`g-gro`).
const ON_DEMAND_MODULES: &[&str] = &["esp4_offload"];

/// strongSwan packages unpacked into the guest (never installed on the host).
const STRONGSWAN: &[&str] = &[
    "strongswan-charon",
    "strongswan-libcharon",
    "strongswan-swanctl",
    "libstrongswan",
];

/// Scenarios `natt-vm` runs (it prints one RESULT line for each).
const SCENARIOS: usize = 10;
/// Longest a guest may run.
const GUEST_TIMEOUT: Duration = Duration::from_mins(20);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn need_tools() -> Result<()> {
    for (tool, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("nft", "nftables"),
        ("ethtool", "ethtool"),
        ("ip", "iproute2"),
        ("xz", "xz-utils"),
        ("apt-get", "apt"),
        ("dpkg", "dpkg"),
    ] {
        if which(tool).is_none() {
            bail!("vm-test needs `{tool}` (Debian package {pkg}); run scripts/setup.sh --test");
        }
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// apt with a private source list and state under `dir`, so /etc/apt is never touched.
fn apt(dir: &Path, tool: &str) -> Command {
    let mut c = Command::new(tool);
    for (k, v) in [
        ("Dir::Etc::SourceList", dir.join("sources.list")),
        ("Dir::Etc::SourceParts", dir.join("sources.list.d")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.join("cache")),
    ] {
        c.arg("-o").arg(format!("{k}={}", v.display()));
    }
    c.args(["-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]);
    c
}

/// Downloads and unpacks the newest kernel image of each suite; returns (release, directory).
fn fetch_kernels(cache: &Path) -> Result<Vec<(String, PathBuf)>> {
    let apt_dir = cache.join("apt");
    for d in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        fs::create_dir_all(apt_dir.join(d))?;
    }
    let keyring = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
    fs::write(
        apt_dir.join("sources.list"),
        format!(
            "deb [{keyring}] http://deb.debian.org/debian bookworm main\n\
             deb [{keyring}] http://deb.debian.org/debian-security bookworm-security main\n\
             deb [{keyring}] http://deb.debian.org/debian bookworm-backports main\n"
        ),
    )?;
    let updated = run_quiet(apt(&apt_dir, "apt-get").args(["update", "-qq"]));
    let mut out = Vec::new();
    for k in KERNELS {
        let pinned = cache.join(format!("{}.package", k.label));
        let package = match &updated {
            Ok(_) => {
                let show = run_quiet(
                    apt(&apt_dir, "apt-cache")
                        .args(["show", &format!("linux-image-amd64/{}", k.suite)]),
                )?;
                let dep = show
                    .lines()
                    .find_map(|l| l.strip_prefix("Depends: "))
                    .and_then(|d| d.split([' ', ',']).next())
                    .with_context(|| format!("no Depends in linux-image-amd64/{}", k.suite))?
                    .to_owned();
                fs::write(&pinned, &dep)?;
                dep
            }
            // Offline: use what an earlier run resolved and cached.
            Err(e) => fs::read_to_string(&pinned)
                .map_err(|_| anyhow::anyhow!("apt-get update failed and nothing is cached: {e}"))?,
        };
        let release = package
            .strip_prefix("linux-image-")
            .context("unexpected kernel package name")?
            .to_owned();
        let dir = cache.join("kernels").join(&release);
        let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
        if !vmlinuz.exists() {
            eprintln!("xtask: vm-test: downloading {package} ({})", k.label);
            let dl = cache.join("debs");
            fs::create_dir_all(&dl)?;
            run_quiet(
                apt(&apt_dir, "apt-get")
                    .current_dir(&dl)
                    .args(["download", &package]),
            )?;
            let deb = find_deb(&dl, &package)
                .with_context(|| format!("{package}: no .deb after apt-get download"))?;
            let tmp = cache.join("kernels").join(format!("{release}.partial"));
            fs::create_dir_all(cache.join("kernels"))?;
            let _ = fs::remove_dir_all(&tmp);
            run_quiet(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
            fs::rename(&tmp, &dir)?;
            fs::remove_file(&deb)?;
        }
        out.push((release, dir));
    }
    Ok(out)
}

/// The `<package>_<version>_<arch>.deb` that `apt-get download` left in `dir`, if any.
fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
}

/// Downloads strongSwan's packages (cached) and returns the .deb files.
fn fetch_strongswan(cache: &Path) -> Result<Vec<PathBuf>> {
    let dir = cache.join("debs/strongswan");
    fs::create_dir_all(&dir)?;
    let have = |pkg: &str| find_deb(&dir, pkg);
    let missing: Vec<&str> = STRONGSWAN
        .iter()
        .copied()
        .filter(|p| have(p).is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: vm-test: downloading {}", missing.join(" "));
        run_quiet(
            apt(&cache.join("apt"), "apt-get")
                .current_dir(&dir)
                .arg("download")
                .args(&missing),
        )?;
    }
    STRONGSWAN
        .iter()
        .map(|p| have(p).with_context(|| format!("{p}: no .deb after apt-get download")))
        .collect()
}

/// `depends=` of a module file (decompressed bytes).
fn module_depends(bytes: &[u8]) -> Vec<String> {
    let needle = b"\0depends=";
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| {
            let rest = &bytes[at + needle.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("xz -dc {}", path.display()))?;
        ensure!(out.status.success(), "xz -dc {} failed", path.display());
        Ok(out.stdout)
    } else {
        Ok(fs::read(path)?)
    }
}

/// Depth-first: a module's dependencies are staged (and ordered) before it.
fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    dest: &Path,
    done: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if !done.insert(name.clone()) {
        return Ok(());
    }
    // Not a module file: built into this kernel.
    let Some(path) = index.get(&name) else {
        return Ok(());
    };
    let bytes = module_bytes(path)?;
    for dep in module_depends(&bytes) {
        visit(&dep, index, dest, done, order)?;
    }
    let file = format!("{name}.ko");
    fs::write(dest.join(&file), &bytes)?;
    order.push(file);
    Ok(())
}

/// Copies the needed modules (decompressed) into `dest` and returns them in load order.
fn stage_modules(kdir: &Path, release: &str, dest: &Path) -> Result<Vec<String>> {
    let base = kdir.join("lib/modules").join(release);
    let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut stack = vec![base.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str())
                && let Some(stem) = name
                    .strip_suffix(".ko.xz")
                    .or_else(|| name.strip_suffix(".ko"))
            {
                index.insert(stem.replace('-', "_"), p.clone());
            }
        }
    }
    fs::create_dir_all(dest)?;
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for m in MODULES {
        visit(m, &index, dest, &mut done, &mut order)?;
    }
    // On-demand modules go to extra/ with their dependencies in the boot order.
    fs::create_dir_all(dest.join("extra"))?;
    for m in ON_DEMAND_MODULES {
        let path = index
            .get(*m)
            .with_context(|| format!("module {m} not in this kernel"))?;
        let bytes = module_bytes(path)?;
        for dep in module_depends(&bytes) {
            visit(&dep, &index, dest, &mut done, &mut order)?;
        }
        fs::write(dest.join(format!("extra/{m}.ko")), &bytes)?;
    }
    Ok(order)
}

/// Copies an ELF binary and the shared libraries `ldd` resolves for it into `rootfs`.
fn stage_binary(src: &Path, dest_in_root: &str, rootfs: &Path) -> Result<()> {
    let dest = rootfs.join(dest_in_root.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().context("parent")?)?;
    fs::copy(src, &dest).with_context(|| format!("copying {}", src.display()))?;
    stage_libraries(src, rootfs, None)
}

/// Copies the host libraries `ldd` resolves for `elf` into `rootfs` (with `extra_path` searched
/// first, for libraries already unpacked there).
fn stage_libraries(elf: &Path, rootfs: &Path, extra_path: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new("ldd");
    cmd.arg(elf);
    if let Some(p) = extra_path {
        cmd.env("LD_LIBRARY_PATH", p);
    }
    let ldd = cmd.output()?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(lib) = path {
            if extra_path.is_some_and(|p| lib.starts_with(p)) {
                continue;
            }
            let to = rootfs.join(lib.strip_prefix("/")?);
            if !to.exists() {
                fs::create_dir_all(to.parent().context("parent")?)?;
                fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
            }
        }
    }
    Ok(())
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/netns /cgroup2
mount -t cgroup2 cgroup2 /cgroup2
mount -t bpf bpf /sys/fs/bpf
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m 2>/tmp/insmod.err || { grep -q "File exists" /tmp/insmod.err || echo "NATT-VM NOTE insmod $m: $(cat /tmp/insmod.err)"; }
done
echo "NATT-VM BOOTED $(cat /proc/sys/kernel/osrelease)"
/natt/natt-vm $(sed -n 's/.*natt_vm=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
echo o > /proc/sysrq-trigger
sleep 5
"#;

fn build_initramfs(
    cache: &Path,
    release: &str,
    kdir: &Path,
    bins: &[(&Path, &str)],
    strongswan: &[PathBuf],
) -> Result<PathBuf> {
    let rootfs = cache.join(format!("rootfs-{release}"));
    let _ = fs::remove_dir_all(&rootfs);
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "var",
    ] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    std::os::unix::fs::symlink("/run", rootfs.join("var/run"))?;
    fs::copy(
        which("busybox").context("busybox")?,
        rootfs.join("bin/busybox"),
    )?;
    for tool in ["ip", "nft", "ethtool"] {
        let src = which(tool).with_context(|| format!("{tool} not found"))?;
        stage_binary(&fs::canonicalize(&src)?, &format!("/sbin/{tool}"), &rootfs)?;
    }
    for (src, dest) in bins {
        stage_binary(src, dest, &rootfs)?;
    }
    fs::copy("/etc/protocols", rootfs.join("etc/protocols"))?;
    for deb in strongswan {
        run_quiet(Command::new("dpkg").arg("-x").arg(deb).arg(&rootfs))?;
    }
    let ipsec = rootfs.join("usr/lib/ipsec");
    let mut elves = vec![ipsec.join("charon"), rootfs.join("usr/sbin/swanctl")];
    for e in fs::read_dir(ipsec.join("plugins"))? {
        elves.push(e?.path());
    }
    for elf in &elves {
        stage_libraries(elf, &rootfs, Some(&ipsec))?;
    }
    let order = stage_modules(kdir, release, &rootfs.join("lib/modules"))?;
    fs::write(rootfs.join("lib/modules/order"), order.join("\n") + "\n")?;
    let init = rootfs.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let cpio = cache.join(format!("initramfs-{release}.cpio"));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | busybox cpio -o -H newc > '{}' 2>/dev/null",
            rootfs.display(),
            cpio.display()
        ))
        .status()?;
    ensure!(status.success(), "building {}", cpio.display());
    Ok(cpio)
}

/// One parsed `NATT-VM RESULT` line.
type Row = BTreeMap<String, String>;

/// Boots the kernel, streams the console, returns RESULT rows and FAIL lines.
fn boot(
    cache: &Path,
    release: &str,
    kdir: &Path,
    initrd: &Path,
    only: &[String],
) -> Result<(Vec<Row>, Vec<String>)> {
    let log_path = cache.join(format!("console-{release}.log"));
    let mut log = fs::File::create(&log_path)?;
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-M",
            "q35",
            "-smp",
            "1",
        ])
        .args(["-m", "1024", "-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio", "-display", "none", "-net", "none"])
        .arg("-kernel")
        .arg(kdir.join(format!("boot/vmlinuz-{release}")))
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet rdinit=/init natt_vm={}",
            only.join(",")
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < GUEST_TIMEOUT {
            std::thread::sleep(Duration::from_secs(1));
            // SAFETY: kill(pid, 0) only probes.
            if unsafe { libc::kill(pid.cast_signed(), 0) } != 0 {
                return false;
            }
        }
        // SAFETY: our own child.
        unsafe { libc::kill(pid.cast_signed(), libc::SIGKILL) };
        true
    });
    let mut rows = Vec::new();
    let mut fails = Vec::new();
    let mut ended = false;
    let out = child.stdout.take().context("qemu stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line.unwrap_or_default();
        let line = line.trim_end_matches('\r');
        writeln!(log, "{line}")?;
        if line.starts_with("NATT-VM") {
            eprintln!("xtask: vm-test [{release}] {line}");
        }
        if let Some(rest) = line.strip_prefix("NATT-VM RESULT ") {
            rows.push(
                rest.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            );
        } else if line.starts_with("NATT-VM FAIL ") {
            fails.push(line.to_owned());
        } else if line.starts_with("NATT-VM END ") {
            ended = true;
        }
    }
    let _ = child.wait();
    let timed_out = watchdog.join().unwrap_or(false);
    ensure!(
        !timed_out,
        "{release}: the guest ran longer than {GUEST_TIMEOUT:?}; console in {}",
        log_path.display()
    );
    ensure!(
        ended,
        "{release}: the guest never finished the suite; console in {}",
        log_path.display()
    );
    Ok((rows, fails))
}

const COLUMNS: [&str; 19] = [
    "kernel",
    "scenario",
    "mode",
    "cipher",
    "xfrm_peers",
    "injected",
    "detected",
    "dropped",
    "verified",
    "learning",
    "residual",
    "differing",
    "kernel_csum_errors",
    "aggregated",
    "aggregated_after_remedy",
    "removed_live",
    "plaintext",
    "rekey_learning",
    "captured",
];

fn table(rows: &[Row]) -> String {
    let mut t = format!("| {} | result |\n|", COLUMNS.join(" | "));
    t.push_str(&"---|".repeat(COLUMNS.len() + 1));
    t.push('\n');
    for r in rows {
        t.push('|');
        for c in COLUMNS.iter().chain(&["result"]) {
            let _ = write!(t, " {} |", r.get(*c).map_or("?", String::as_str));
        }
        t.push('\n');
    }
    t
}

/// Runs the suite (or only the scenarios named in `only`); with `out`, also writes the results
/// table there. Returns how many scenario runs passed.
pub fn vm_test(out: Option<&str>, only: &[String]) -> Result<usize> {
    need_tools()?;
    // The guest runs release builds: faster under TCG, and what users run.
    crate::cargo(&[
        "build",
        "--release",
        "-p",
        "natt-monitor",
        "--bin",
        "natt-monitor",
        "-p",
        "natt-monitor-tests",
        "--bin",
        "natt-vm",
        "--bin",
        "natt-peer",
    ])?;
    let root = root();
    let cache = root.join("target/vm");
    fs::create_dir_all(&cache)?;
    let release_dir = root.join("target/release");
    let bins = [
        (release_dir.join("natt-monitor"), "/natt/natt-monitor"),
        (release_dir.join("natt-vm"), "/natt/natt-vm"),
        (release_dir.join("natt-peer"), "/natt/natt-peer"),
    ];
    let bins: Vec<(&Path, &str)> = bins.iter().map(|(p, d)| (p.as_path(), *d)).collect();
    let mut rows = Vec::new();
    let mut fails = Vec::new();
    let kernels = fetch_kernels(&cache)?;
    let strongswan = fetch_strongswan(&cache)?;
    for (release, kdir) in kernels {
        let initrd = build_initramfs(&cache, &release, &kdir, &bins, &strongswan)?;
        let started = Instant::now();
        let (r, f) = boot(&cache, &release, &kdir, &initrd, only)?;
        eprintln!(
            "xtask: vm-test: {release}: {} scenarios in {:.0} s",
            r.len(),
            started.elapsed().as_secs_f64()
        );
        let want = if only.is_empty() {
            SCENARIOS
        } else {
            only.len()
        };
        ensure!(
            r.len() == want,
            "{release}: {} of {want} scenarios reported: {f:?}",
            r.len()
        );
        rows.extend(r);
        fails.extend(f);
    }
    let t = table(&rows);
    #[expect(clippy::print_stdout, reason = "the suite's result table")]
    {
        println!("{t}");
    }
    if let Some(out) = out {
        fs::write(out, &t).with_context(|| format!("writing {out}"))?;
    }
    ensure!(fails.is_empty(), "vm-test failures:\n{}", fails.join("\n"));
    std::io::stdout().flush()?;
    Ok(rows.len())
}
