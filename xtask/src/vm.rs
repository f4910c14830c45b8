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

/// A kernel to boot, pinned to exact Debian packages so that a new upload to the archive
/// cannot silently change what the suite tests.
pub struct KernelSource {
    /// The suite it comes from, for logs and the result table.
    pub label: &'static str,
    /// `uname -r`.
    pub release: &'static str,
    /// The packages' Debian version.
    pub version: &'static str,
    /// The program variant natt-monitor must choose by probing this kernel (`bpf_loop` arrived
    /// in 5.17).
    pub variant: &'static str,
    /// Packages that together hold `vmlinuz` and the modules (from 7.x, `linux-image-<release>`
    /// is a meta-package: the kernel is in `linux-binary-*`, the modules in `linux-modules-*`).
    packages: &'static [&'static str],
}

/// The kernel matrix. To move a pin: `apt-cache show linux-image-amd64/<suite>` (with the
/// suite's lines in a private sources list, as `fetch_kernels` writes them) names the current
/// package and version.
pub const KERNELS: [KernelSource; 4] = [
    KernelSource {
        label: "bullseye-security",
        release: "5.10.0-46-amd64",
        version: "5.10.262-1",
        variant: "bounded_loop",
        packages: &["linux-image-5.10.0-46-amd64"],
    },
    KernelSource {
        label: "bookworm-security",
        release: "6.1.0-56-amd64",
        version: "6.1.192-2",
        variant: "bpf_loop",
        packages: &["linux-image-6.1.0-56-amd64"],
    },
    KernelSource {
        label: "bookworm-backports",
        release: "6.12.95+deb12-amd64",
        version: "6.12.95-1~bpo12+1",
        variant: "bpf_loop",
        packages: &["linux-image-6.12.95+deb12-amd64"],
    },
    KernelSource {
        label: "trixie-backports",
        release: "7.3.4+deb13-amd64",
        version: "7.3.4-1~bpo13+1",
        variant: "bpf_loop",
        packages: &[
            "linux-binary-7.3.4+deb13-amd64",
            "linux-modules-7.3.4+deb13-amd64",
        ],
    },
];

/// A kernel unpacked under `target/vm/kernels`.
pub struct Kernel {
    /// Its pin.
    pub source: &'static KernelSource,
    /// `vmlinuz`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` (or `usr/lib/modules/<release>`).
    pub modules: PathBuf,
}

/// Modules the scenarios need; their dependencies are added from each module's `depends=`.
pub(crate) const MODULES: &[&str] = &[
    // libcrc32c (nf_tables, nf_conntrack) needs the crc32c algorithm registered first.
    "crc32c_generic",
    "veth",
    "xfrm_user",
    "esp4",
    "esp6",
    // SCTP through the SA (`sctp.rs` in natt-vm): the guest has no modprobe to load it on the
    // first SCTP socket.
    "sctp",
    // Tunnels inside the SA (`tunnel.rs` in natt-vm): GRE, IPIP, VXLAN, ip6gre and ip6tnl
    // devices.
    "ip_gre",
    "ipip",
    "vxlan",
    "ip6_gre",
    "ip6_tunnel",
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
    "nft_quota",
    // A module on 5.10, built in later.
    "nft_counter",
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

/// The scenario names, shared with `natt-vm` (which prints one RESULT line for each).
#[path = "../../tests/src/vm_scenarios.rs"]
pub(crate) mod scenarios;
/// The suite's QEMU accelerator: TCG on every host thread it can use (KVM here is the PVM kind,
/// which hangs stock kernels).
const SUITE_ACCEL: [&str; 2] = ["-accel", "tcg,thread=multi"];
/// Longest a guest of the suite may run (the slowest kernel, 6.1, took 15 to 19 minutes on the
/// fresh-clone runs, alone or beside a second guest).
const GUEST_TIMEOUT: Duration = Duration::from_mins(30);

/// Console lines a hung or dead guest's error quotes.
const TAIL_LINES: usize = 20;

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub(crate) fn run_quiet(cmd: &mut Command) -> Result<String> {
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

pub(crate) fn need_tools() -> Result<()> {
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

pub(crate) fn which(tool: &str) -> Option<PathBuf> {
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

/// Downloads (once) and unpacks the pinned packages of each kernel in `kernels`.
pub(crate) fn fetch_kernels(
    cache: &Path,
    kernels: &[&'static KernelSource],
) -> Result<Vec<Kernel>> {
    let apt_dir = cache.join("apt");
    for d in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        fs::create_dir_all(apt_dir.join(d))?;
    }
    let keyring = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
    let mut sources = String::new();
    for (repo, suite) in [
        ("debian-security", "bullseye-security"),
        ("debian", "bookworm"),
        ("debian-security", "bookworm-security"),
        ("debian", "bookworm-backports"),
        ("debian", "trixie-backports"),
    ] {
        let _ = writeln!(
            sources,
            "deb [{keyring}] http://deb.debian.org/{repo} {suite} main"
        );
    }
    fs::write(apt_dir.join("sources.list"), sources)?;
    let mut updated = false;
    let mut out = Vec::new();
    for k in kernels {
        let dir = cache.join("kernels").join(k.release);
        let stamp = dir.join(".natt-version");
        if fs::read_to_string(&stamp).ok().as_deref() != Some(k.version) {
            if !updated {
                run_quiet(apt(&apt_dir, "apt-get").args(["update", "-qq"]))?;
                updated = true;
            }
            let dl = cache.join("debs");
            fs::create_dir_all(&dl)?;
            let tmp = cache.join("kernels").join(format!("{}.partial", k.release));
            let _ = fs::remove_dir_all(&tmp);
            // dpkg -x creates the target directory but not its parents.
            fs::create_dir_all(&tmp)?;
            for package in k.packages {
                eprintln!(
                    "xtask: vm-test: downloading {package} {} ({})",
                    k.version, k.label
                );
                run_quiet(
                    apt(&apt_dir, "apt-get")
                        .current_dir(&dl)
                        .args(["download", &format!("{package}={}", k.version)]),
                )
                .with_context(|| {
                    format!(
                        "{package}={} is no longer in {}: move the pin in xtask/src/vm.rs (KERNELS)",
                        k.version, k.label
                    )
                })?;
                let deb = find_deb(&dl, package)
                    .with_context(|| format!("{package}: no .deb after apt-get download"))?;
                run_quiet(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
                fs::remove_file(&deb)?;
            }
            fs::write(tmp.join(".natt-version"), k.version)?;
            let _ = fs::remove_dir_all(&dir);
            fs::rename(&tmp, &dir)?;
        }
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|m| dir.join(m).join(k.release))
            .find(|p| p.join("kernel").is_dir())
            .with_context(|| format!("{}: no modules directory", k.release))?;
        let vmlinuz = [
            dir.join(format!("boot/vmlinuz-{}", k.release)),
            modules.join("vmlinuz"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("{}: no vmlinuz", k.release))?;
        out.push(Kernel {
            source: k,
            vmlinuz,
            modules,
        });
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
pub(crate) fn fetch_strongswan(cache: &Path) -> Result<Vec<PathBuf>> {
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

/// Copies `modules` and their dependencies (decompressed) into `dest` and returns them in load
/// order; `on_demand` modules go to `dest/extra`, their dependencies into the order.
pub(crate) fn stage_modules(
    base: &Path,
    dest: &Path,
    modules: &[&str],
    on_demand: &[&str],
) -> Result<Vec<String>> {
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
    for m in modules {
        visit(m, &index, dest, &mut done, &mut order)?;
    }
    // On-demand modules go to extra/ with their dependencies in the boot order.
    fs::create_dir_all(dest.join("extra"))?;
    for m in on_demand {
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
pub(crate) fn stage_binary(src: &Path, dest_in_root: &str, rootfs: &Path) -> Result<()> {
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

pub(crate) fn build_initramfs(
    cache: &Path,
    kernel: &Kernel,
    bins: &[(&Path, &str)],
    strongswan: &[PathBuf],
) -> Result<PathBuf> {
    let release = kernel.source.release;
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
    let order = stage_modules(
        &kernel.modules,
        &rootfs.join("lib/modules"),
        MODULES,
        ON_DEMAND_MODULES,
    )?;
    fs::write(rootfs.join("lib/modules/order"), order.join("\n") + "\n")?;
    write_init(&rootfs, INIT)?;
    let cpio = cache.join(format!("initramfs-{release}.cpio"));
    pack(&rootfs, &cpio)?;
    Ok(cpio)
}

/// Writes `script` as the initramfs's `/init`.
pub(crate) fn write_init(rootfs: &Path, script: &str) -> Result<()> {
    let init = rootfs.join("init");
    fs::write(&init, script)?;
    fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(())
}

/// Packs `rootfs` into the newc archive `cpio`.
pub(crate) fn pack(rootfs: &Path, cpio: &Path) -> Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | busybox cpio -o -H newc > '{}' 2>/dev/null",
            rootfs.display(),
            cpio.display()
        ))
        .status()?;
    ensure!(status.success(), "building {}", cpio.display());
    Ok(())
}

/// One parsed `NATT-VM RESULT` line.
pub(crate) type Row = BTreeMap<String, String>;

/// What one guest reported.
#[derive(Default)]
pub(crate) struct Guest {
    rows: Vec<Row>,
    pub(crate) fails: Vec<String>,
    /// `NATT-VM REFUSED`: natt-monitor check refused the kernel, with its FAIL line.
    refused: Option<String>,
    /// The verifier's cost from `natt-monitor check`'s load line, if it loaded.
    verifier_cost: Option<String>,
    /// The program variant that line names.
    variant: Option<String>,
    /// `NATT-VM BENCH` lines (`natt-vm --bench`).
    pub(crate) bench: Vec<Row>,
    /// The console's last lines, which a `NATT-VM FAIL` line carries into the failure report
    /// (CI shows the end of the output, and a failing scenario's context is further up).
    recent: std::collections::VecDeque<String>,
}

/// Console lines a failure report quotes from before its `NATT-VM FAIL` line.
const FAIL_CONTEXT: usize = 12;

/// The `key=value` fields of a `NATT-VM` line.
fn fields(line: &str) -> Row {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Boots the kernel with the initramfs guest, streams the console, returns what the guest
/// reported.
pub(crate) fn boot(
    cache: &Path,
    kernel: &Kernel,
    initrd: &Path,
    only: &[String],
    soak_seed: u64,
    timeout: Duration,
    accel: &[&str],
) -> Result<Guest> {
    let machine = Machine {
        name: "initramfs",
        initrd,
        disk: None,
        append: format!(
            "rdinit=/init natt_vm={} natt_soak_seed={soak_seed}",
            only.join(",")
        ),
    };
    boot_machine(cache, kernel, &machine, timeout, accel)
}

/// What one guest boots besides the kernel.
pub(crate) struct Machine<'a> {
    /// Names the console log (`console-<name>-<release>.log`, or `console-<release>.log` for
    /// the initramfs guest).
    pub(crate) name: &'a str,
    pub(crate) initrd: &'a Path,
    /// A raw disk image, attached as virtio `/dev/vda` with writes kept in memory (`snapshot`).
    pub(crate) disk: Option<&'a Path>,
    /// Kernel arguments after the console's.
    pub(crate) append: String,
}

/// Boots `machine` under `kernel`, streams the console, returns what the guest reported.
pub(crate) fn boot_machine(
    cache: &Path,
    kernel: &Kernel,
    machine: &Machine<'_>,
    timeout: Duration,
    accel: &[&str],
) -> Result<Guest> {
    let release = kernel.source.release;
    let version = kernel.source.version;
    let log_path = if machine.name == "initramfs" {
        cache.join(format!("console-{release}.log"))
    } else {
        cache.join(format!("console-{}-{release}.log", machine.name))
    };
    let mut log = fs::File::create(&log_path)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(accel)
        .args(["-cpu", "max", "-M", "q35", "-smp", "1"])
        .args(["-m", "1024", "-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio", "-display", "none", "-net", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(machine.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {}", machine.append));
    if let Some(disk) = machine.disk {
        qemu.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            disk.display()
        ));
    }
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < timeout {
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
    let mut guest = Guest::default();
    let mut ended = false;
    let out = child.stdout.take().context("qemu stdout")?;
    // The console's last lines, for the error when the guest hangs or dies.
    let mut tail = std::collections::VecDeque::with_capacity(TAIL_LINES);
    for line in BufReader::new(out).lines() {
        let line = line.unwrap_or_default();
        let line = line.trim_end_matches('\r');
        writeln!(log, "{line}")?;
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
        // The systemd guest's operator transcript and the scenarios' progress stay in the
        // console log (a hung guest's error quotes its last lines).
        if line.starts_with("NATT-VM")
            && !line.starts_with("NATT-VM SHOW")
            && !line.starts_with("NATT-VM STEP")
        {
            eprintln!("xtask: vm-test [{release} {version}] {line}");
        }
        ended |= guest.record(line, version);
    }
    let _ = child.wait();
    let timed_out = watchdog.join().unwrap_or(false);
    let tail: Vec<String> = tail.into_iter().collect();
    ensure!(
        !timed_out,
        "{release}: the guest ran longer than {timeout:?}; console in {}, ending:\n{}",
        log_path.display(),
        tail.join("\n")
    );
    ensure!(
        ended,
        "{release}: the guest never finished the suite; console in {}, ending:\n{}",
        log_path.display(),
        tail.join("\n")
    );
    Ok(guest)
}

impl Guest {
    /// Takes in one console line; true for the suite's `NATT-VM END` line.
    fn record(&mut self, line: &str, version: &str) -> bool {
        let end = self.read(line, version);
        if self.recent.len() == FAIL_CONTEXT {
            self.recent.pop_front();
        }
        self.recent.push_back(line.to_owned());
        end
    }

    /// What `line` reports, if anything; true for `NATT-VM END`.
    fn read(&mut self, line: &str, version: &str) -> bool {
        if let Some(rest) = line.strip_prefix("NATT-VM RESULT ") {
            let mut row = fields(rest);
            row.insert("version".into(), version.into());
            self.rows.push(row);
        } else if let Some(rest) = line.strip_prefix("NATT-VM BENCH ") {
            self.bench.push(fields(rest));
        } else if line.starts_with("NATT-VM FAIL ") {
            let before: Vec<&str> = self.recent.iter().map(String::as_str).collect();
            self.fails.push(format!(
                "{line} version={version}\n  console before it:\n    {}",
                before.join("\n    ")
            ));
        } else if let Some(rest) = line.strip_prefix("NATT-VM REFUSED ") {
            self.refused = Some(rest.to_owned());
        } else if let Some(rest) = line.strip_prefix("NATT-VM CHECK ok    bpf program load")
            && self.verifier_cost.is_none()
        {
            self.verifier_cost = rest
                .split("; ")
                .nth(1)
                .map(|c| c.trim_end_matches(')').to_owned());
            self.variant = rest
                .split(" variant")
                .next()
                .and_then(|h| h.rsplit(", ").next())
                .map(str::to_owned);
        } else if line.starts_with("NATT-VM END ") {
            return true;
        }
        false
    }
}

const COLUMNS: [&str; 20] = [
    "kernel",
    "version",
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

/// Checks one kernel's guest: adds its rows, failures and summary line (a kernel that
/// `natt-monitor check` refuses is a failure).
fn judge(
    k: &Kernel,
    guest: Guest,
    secs: f64,
    only: &[String],
    rows: &mut Vec<Row>,
    fails: &mut Vec<String>,
    summary: &mut String,
) {
    let (release, version) = (k.source.release, k.source.version);
    let cost = guest.verifier_cost.as_deref().unwrap_or("-");
    if let Some(reason) = &guest.refused {
        // Every kernel of the matrix must run every scenario.
        fails.push(format!(
            "{release} ({version}): natt-monitor check refused the kernel: {reason}"
        ));
        let _ = writeln!(
            summary,
            "| {} | {release} | {version} | REFUSED: {reason} | - | - |",
            k.source.label
        );
        return;
    }
    let variant = guest.variant.as_deref().unwrap_or("-");
    eprintln!(
        "xtask: vm-test: {release} ({version}): {} scenarios in {secs:.0} s; {variant} variant; verifier: {cost}",
        guest.rows.len()
    );
    if variant != k.source.variant {
        fails.push(format!(
            "{release} ({version}): natt-monitor chose the {variant} variant; probing this kernel must choose {}",
            k.source.variant
        ));
    }
    let want = if only.is_empty() {
        scenarios::NAMES.len()
    } else {
        only.len()
    };
    if guest.rows.len() != want {
        // A scenario that ended without a result line; the other kernels still run.
        fails.push(format!(
            "{release} ({version}): {} of {want} scenarios reported: {:?}",
            guest.rows.len(),
            guest.fails
        ));
    }
    let ok = guest
        .rows
        .iter()
        .filter(|r| r.get("result").is_some_and(|v| v == "ok"))
        .count();
    let _ = writeln!(
        summary,
        "| {} | {release} | {version} | {ok} of {want} scenarios pass | {variant} | {cost} |",
        k.source.label,
    );
    rows.extend(guest.rows);
    fails.extend(guest.fails);
}

/// A guest that hung or died (`e` says which, with its console's last lines): a failure and a
/// summary row, so that the other kernels still run and the table shows the whole matrix.
fn lost_guest(
    k: &Kernel,
    guest: &str,
    e: &anyhow::Error,
    fails: &mut Vec<String>,
    summary: &mut String,
) {
    let _ = writeln!(
        summary,
        "| {}{guest} | {} | {} | FAILED: the guest hung or died | - | - |",
        k.source.label, k.source.release, k.source.version
    );
    fails.push(format!("{e:#}"));
}

/// Checks the systemd guest: its one result line, which must say ok.
fn judge_systemd(
    k: &Kernel,
    guest: Guest,
    secs: f64,
    rows: &mut Vec<Row>,
    fails: &mut Vec<String>,
    summary: &mut String,
) {
    let (release, version) = (k.source.release, k.source.version);
    let ok = guest.rows.len() == 1
        && guest.rows[0].get("result").is_some_and(|v| v == "ok")
        && guest.fails.is_empty();
    eprintln!(
        "xtask: vm-test: {release} ({version}): the systemd guest {} in {secs:.0} s",
        if ok { "passed" } else { "FAILED" }
    );
    if guest.rows.is_empty() && guest.fails.is_empty() {
        fails.push(format!(
            "{release} ({version}): the systemd guest reported no result; console in target/vm/console-systemd-{release}.log"
        ));
    }
    let _ = writeln!(
        summary,
        "| {} (systemd guest) | {release} | {version} | {} {} | - | - |",
        k.source.label,
        scenarios::SYSTEMD,
        if ok { "passes" } else { "FAILED" }
    );
    rows.extend(guest.rows);
    fails.extend(guest.fails);
}

/// The seed of the soak scenario, the same on every kernel: `NATT_SOAK_SEED`, or a fresh one.
/// Printed, so that a failure can be replayed.
fn soak_seed() -> Result<u64> {
    let seed = match std::env::var("NATT_SOAK_SEED") {
        Ok(v) => v.trim().parse().with_context(|| {
            format!("NATT_SOAK_SEED: `{v}` is not a number (the seed a soak run printed)")
        })?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() ^ u64::from(d.subsec_nanos())),
    };
    eprintln!(
        "xtask: vm-test soak seed {seed} (replay: NATT_SOAK_SEED={seed} cargo xtask vm-test u-soak-enforce)"
    );
    Ok(seed)
}

/// One guest of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    /// A kernel's initramfs guest, which runs the scenarios.
    Scenarios,
    /// A kernel's systemd guest (the .deb under a real systemd).
    Systemd,
}

/// The guests to boot: every kernel's scenario guest, then the systemd guests (the longest
/// first, so that the guests running side by side end close together).
fn plan(kernels: &[Kernel], scenarios: bool, systemd: bool) -> Vec<(&Kernel, Job)> {
    let mut plan: Vec<(&Kernel, Job)> = Vec::new();
    if scenarios {
        plan.extend(kernels.iter().map(|k| (k, Job::Scenarios)));
    }
    if systemd {
        plan.extend(
            kernels
                .iter()
                .filter(|k| crate::vm_systemd::KERNELS.contains(&k.source.release))
                .map(|k| (k, Job::Systemd)),
        );
    }
    plan
}

/// How many guests run at once: `NATT_VM_JOBS`, else one per host CPU, at most two. A TCG
/// guest has one virtual CPU and keeps one host CPU busy, so on this two-CPU kind of machine
/// two side by side take the time of one each (the suite's wall time about halves).
fn guest_jobs() -> Result<usize> {
    match std::env::var("NATT_VM_JOBS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("NATT_VM_JOBS: `{v}` is not a number of guests (1 or more)"),
        },
        Err(_) => Ok(std::thread::available_parallelism().map_or(1, |n| n.get().min(2))),
    }
}

/// Runs `work` on every item of `items`, `jobs` at a time, in the items' order; returns each
/// result at its item's index.
fn side_by_side<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<Option<R>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = work(item);
                    *out[i]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
                }
            });
        }
    });
    out.into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
        .collect()
}

/// Runs the suite on the kernels named in `kernels` (release prefixes; all when empty), only
/// the scenarios named in `only` (all when empty); with `out`, also writes the results table
/// there. Returns how many scenario runs passed.
pub fn vm_test(out: Option<&str>, kernels: &[String], only: &[String]) -> Result<usize> {
    scenarios::check_selection(only).map_err(|e| anyhow::anyhow!("vm-test: {e}"))?;
    need_tools()?;
    let root = root();
    let cache = root.join("target/vm");
    let bins = guest_binaries(&root, &cache)?;
    let mut rows = Vec::new();
    let mut fails = Vec::new();
    let mut summary = String::new();
    let matrix = crate::vm_bench::selected(kernels)?;
    let kernels = fetch_kernels(&cache, &matrix)?;
    // The systemd guest runs when it is selected (or nothing is); the initramfs guests run the
    // other selected scenarios (or all of them).
    let systemd = only.is_empty() || only.iter().any(|o| o == scenarios::SYSTEMD);
    let initramfs_only: Vec<String> = only
        .iter()
        .filter(|o| *o != scenarios::SYSTEMD)
        .cloned()
        .collect();
    let initramfs = only.is_empty() || !initramfs_only.is_empty();
    let strongswan = if initramfs {
        fetch_strongswan(&cache)?
    } else {
        Vec::new()
    };
    let seed = soak_seed()?;
    let disk = if systemd {
        Some(crate::vm_systemd::Disk::new(&cache, &bins)?)
    } else {
        None
    };
    let bins: Vec<(&Path, &str)> = bins.iter().map(|(p, d)| (p.as_path(), *d)).collect();
    let plan = plan(&kernels, initramfs, disk.is_some());
    let run = |k: &Kernel, job: Job| -> Result<(f64, Result<Guest>)> {
        let booted = match job {
            Job::Scenarios => {
                let initrd = build_initramfs(&cache, k, &bins, &strongswan)?;
                let started = Instant::now();
                let booted = boot(
                    &cache,
                    k,
                    &initrd,
                    &initramfs_only,
                    seed,
                    GUEST_TIMEOUT,
                    &SUITE_ACCEL,
                );
                (started.elapsed().as_secs_f64(), booted)
            }
            Job::Systemd => {
                let started = Instant::now();
                let booted = disk
                    .as_ref()
                    .context("a systemd job without its disk")?
                    .boot(&cache, k, &SUITE_ACCEL);
                (started.elapsed().as_secs_f64(), booted)
            }
        };
        Ok(booted)
    };
    let mut ran = side_by_side(&plan, guest_jobs()?, |(k, job)| run(k, *job));
    // Judged in the matrix's order (each kernel's scenarios, then its systemd guest), however
    // the guests interleaved.
    for k in &kernels {
        for job in [Job::Scenarios, Job::Systemd] {
            let Some(i) = plan
                .iter()
                .position(|(pk, pj)| std::ptr::eq(*pk, k) && *pj == job)
            else {
                continue;
            };
            let (secs, booted) = ran[i].take().context("a guest that never ran")??;
            match (job, booted) {
                (Job::Scenarios, Ok(guest)) => {
                    let only = &initramfs_only;
                    judge(k, guest, secs, only, &mut rows, &mut fails, &mut summary);
                }
                (Job::Scenarios, Err(e)) => lost_guest(k, "", &e, &mut fails, &mut summary),
                (Job::Systemd, Ok(guest)) => {
                    judge_systemd(k, guest, secs, &mut rows, &mut fails, &mut summary);
                }
                (Job::Systemd, Err(e)) => {
                    lost_guest(k, " (systemd guest)", &e, &mut fails, &mut summary);
                }
            }
        }
    }
    let t = format!(
        "| suite | kernel | package version | natt-monitor | program variant | verifier |\n|---|---|---|---|---|---|\n{summary}\n{}",
        table(&rows)
    );
    #[expect(clippy::print_stdout, reason = "the suite's result table")]
    {
        println!("{t}");
    }
    // Every run leaves its table where docs/vm-results.md is copied from.
    fs::write(cache.join("results.md"), &t).context("writing target/vm/results.md")?;
    if let Some(out) = out {
        fs::write(out, &t).with_context(|| format!("writing {out}"))?;
    }
    ensure!(fails.is_empty(), "vm-test failures:\n{}", fails.join("\n"));
    std::io::stdout().flush()?;
    Ok(rows.len())
}

/// Builds the guest's binaries; returns each with its path in the guest.
pub(crate) fn guest_binaries(root: &Path, cache: &Path) -> Result<Vec<(PathBuf, &'static str)>> {
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
    fs::create_dir_all(cache)?;
    let release_dir = root.join("target/release");
    Ok(vec![
        (release_dir.join("natt-monitor"), "/natt/natt-monitor"),
        (release_dir.join("natt-vm"), "/natt/natt-vm"),
        (release_dir.join("natt-peer"), "/natt/natt-peer"),
    ])
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{FAIL_CONTEXT, Guest, side_by_side};

    /// Each result lands at its item's index, and no more than `jobs` items are worked on at
    /// once (each item sleeps a moment, so that items overlap wherever the bound lets them).
    #[test]
    fn guests_side_by_side_keep_their_order_and_their_bound() {
        for jobs in [1, 2, 3] {
            let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let items: Vec<u32> = (0..9).collect();
            let out = side_by_side(&items, jobs, |i| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
                i * 10
            });
            let want: Vec<Option<u32>> = (0..9).map(|i| Some(i * 10)).collect();
            assert_eq!(out, want);
            assert!(most.load(Ordering::SeqCst) <= jobs, "jobs={jobs}");
        }
        // Nothing to run: no result, no thread left waiting.
        assert_eq!(
            side_by_side(&[] as &[u32], 2, |i| *i),
            Vec::<Option<u32>>::new()
        );
    }

    #[test]
    fn a_failure_carries_the_console_lines_before_it() {
        let mut g = Guest::default();
        for i in 0..20 {
            assert!(!g.record(&format!("NATT-VM STEP soak round {i}"), "v1"));
        }
        assert!(!g.record("NATT-VM FAIL kernel=k scenario=s reason=boom", "v1"));
        assert!(g.record("NATT-VM END kernel=k passed=0 failed=1", "v1"));
        let steps: Vec<String> = (20 - FAIL_CONTEXT..20)
            .map(|i| format!("NATT-VM STEP soak round {i}"))
            .collect();
        assert_eq!(
            g.fails,
            [format!(
                "NATT-VM FAIL kernel=k scenario=s reason=boom version=v1\n  console before it:\n    {}",
                steps.join("\n    ")
            )]
        );
    }
}
