//! The VM suite's systemd guest (`v-systemd`): natt-monitor installed and operated as the .deb
//! ships it, under a real systemd, on the oldest and the newest kernel of the matrix.
//!
//! The guest's root file system is Debian's own: mmdebstrap makes it once (cached under
//! `target/vm/systemd-rootfs`), this adds `natt-vm`, `natt-peer` and two builds of the .deb (an
//! older version and this one, for the upgrade), and `mke2fs -d` writes it to an ext4 image that
//! QEMU attaches with writes kept in memory. A small initramfs loads the virtio, ext4 and
//! scenario modules and hands over to `/lib/systemd/systemd` on it. systemd starts
//! `natt-vm.service`, which drives the scenario with `apt`, `systemctl` and `journalctl`, prints
//! its `NATT-VM` lines on the serial console, and powers the guest off.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use crate::vm::{self, Guest, Kernel, Machine, run_quiet};

/// The kernels it boots: the matrix's oldest and newest (their `uname -r`).
pub(crate) const KERNELS: [&str; 2] = ["5.10.0-46-amd64", "7.3.4+deb13-amd64"];

/// What mmdebstrap makes: the suite, its variant and the packages besides; a change here makes
/// it again. (`systemd-sysv` makes systemd `/sbin/init`; iproute2 and nftables are the
/// scenario's tools, with netbase's /etc/protocols for `proto tcp`; apt installs the .deb.)
const ROOTFS: [&str; 3] = [
    "bookworm",
    "apt",
    "systemd,systemd-sysv,iproute2,nftables,kmod,netbase",
];

/// Modules the initramfs loads to mount the root file system (ext4 checks its metadata with
/// crc32c, which must be registered first), before the scenario's own
/// (`vm::MODULES`); a module built into the kernel is skipped.
const BOOT_MODULES: &[&str] = &["crc32c_generic", "virtio_pci", "virtio_blk", "ext4"];

/// The longest the guest may run: boot, two installs, a watchdog timeout and five restarts.
const TIMEOUT: Duration = Duration::from_mins(15);

/// The initramfs's `/init`: load the modules, mount `/dev/vda`, and hand over to systemd.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m 2>/tmp/insmod.err || { grep -q "File exists" /tmp/insmod.err || echo "NATT-VM NOTE insmod $m: $(cat /tmp/insmod.err)"; }
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /newroot
if ! mount -t ext4 /dev/vda /newroot; then
  echo "NATT-VM FAIL scenario=v-systemd reason=the root file system /dev/vda does not mount"
  echo "NATT-VM END passed=0 failed=1"
  echo o > /proc/sysrq-trigger
  sleep 5
fi
umount /proc /sys /dev
exec switch_root /newroot /lib/systemd/systemd
"#;

/// The unit that runs the scenario once the system is up, on the serial console, and powers
/// the guest off when it ends, however it ends.
const UNIT: &str = "[Unit]
Description=natt-monitor VM suite: the systemd guest
After=multi-user.target

[Service]
Type=simple
ExecStart=/natt/natt-vm --systemd
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no

[Install]
WantedBy=multi-user.target
";

/// Makes the Debian root file system once; returns its directory.
fn rootfs(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("systemd-rootfs");
    let stamp = cache.join("systemd-rootfs.stamp");
    let want = ROOTFS.join(" ");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) && dir.is_dir() {
        return Ok(dir);
    }
    ensure!(
        vm::which("mmdebstrap").is_some() && vm::which("mke2fs").is_some(),
        "vm-test's systemd guest needs mmdebstrap and mke2fs (Debian packages mmdebstrap and e2fsprogs); run scripts/setup.sh --test"
    );
    let _ = fs::remove_file(&stamp);
    let _ = fs::remove_dir_all(&dir);
    let [suite, variant, include] = ROOTFS;
    eprintln!("xtask: vm-test: making the systemd guest's root file system ({want})");
    run_quiet(
        Command::new("mmdebstrap")
            .args(["--quiet", "--variant", variant, "--include", include])
            .arg(suite)
            .arg(&dir),
    )?;
    fs::write(&stamp, want)?;
    Ok(dir)
}

/// The scenario's initramfs for `kernel`: busybox, the boot and scenario modules, `INIT`.
fn initramfs(cache: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let release = kernel.source.release;
    let root = cache.join(format!("systemd-initramfs-{release}"));
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy(
        vm::which("busybox").context("busybox")?,
        root.join("bin/busybox"),
    )?;
    let modules: Vec<&str> = BOOT_MODULES.iter().chain(vm::MODULES).copied().collect();
    let order = vm::stage_modules(&kernel.modules, &root.join("lib/modules"), &modules, &[])?;
    fs::write(root.join("lib/modules/order"), order.join("\n") + "\n")?;
    vm::write_init(&root, INIT)?;
    let cpio = cache.join(format!("systemd-initramfs-{release}.cpio"));
    vm::pack(&root, &cpio)?;
    Ok(cpio)
}

/// Writes the disk image: the root file system with the scenario's binaries, the two packages
/// and `natt-vm.service`.
fn disk(cache: &Path, base: &Path, bins: &[(PathBuf, &str)]) -> Result<PathBuf> {
    let stage = cache.join("systemd-disk");
    let _ = fs::remove_dir_all(&stage);
    run_quiet(Command::new("cp").arg("-a").arg(base).arg(&stage))?;
    for (src, dest) in bins {
        if dest.ends_with("/natt-monitor") {
            // The package brings the daemon.
            continue;
        }
        vm::stage_binary(src, dest, &stage)?;
    }
    let (older, current) = crate::dist::upgrade_pair(&cache.join("systemd-debs"))?;
    for (deb, dir) in [(older, "older"), (current, "current")] {
        let to = stage.join("natt/debs").join(dir);
        fs::create_dir_all(&to)?;
        fs::copy(&deb, to.join(deb.file_name().context("a .deb name")?))?;
    }
    let units = stage.join("etc/systemd/system");
    fs::write(units.join("natt-vm.service"), UNIT)?;
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/natt-vm.service",
        wants.join("natt-vm.service"),
    )?;
    // No login prompt on the console the scenario writes to.
    std::os::unix::fs::symlink("/dev/null", units.join("serial-getty@ttyS0.service"))?;
    // A set machine id: no first-boot set-up.
    fs::write(
        stage.join("etc/machine-id"),
        "4e4154544d4f4e49544f52564d544553\n",
    )?;
    fs::write(stage.join("etc/hostname"), "natt-systemd\n")?;
    let image = cache.join("systemd-disk.img");
    let _ = fs::remove_file(&image);
    run_quiet(
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-L", "natt-root", "-d"])
            .arg(&stage)
            .arg(&image)
            .arg("3G"),
    )?;
    fs::remove_dir_all(&stage)?;
    Ok(image)
}

/// The disk image both kernels boot, made once per suite run.
pub(crate) struct Disk {
    image: PathBuf,
}

impl Disk {
    /// Makes (or reuses) the root file system and writes the image with this build's binaries.
    pub(crate) fn new(cache: &Path, bins: &[(PathBuf, &str)]) -> Result<Self> {
        let base = rootfs(cache)?;
        Ok(Self {
            image: disk(cache, &base, bins)?,
        })
    }

    /// Boots `kernel` on the image and returns what the guest reported.
    pub(crate) fn boot(&self, cache: &Path, kernel: &Kernel, accel: &[&str]) -> Result<Guest> {
        let initrd = initramfs(cache, kernel)?;
        let machine = Machine {
            name: "systemd",
            initrd: &initrd,
            disk: Some(&self.image),
            append: "rdinit=/init systemd.firstboot=off systemd.show_status=error".to_owned(),
        };
        vm::boot_machine(cache, kernel, &machine, TIMEOUT, accel)
    }
}
