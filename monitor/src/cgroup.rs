//! Finding and recognising the cgroup v2 hierarchy.
//!
//! On hybrid systems cgroup v2 lives at `/sys/fs/cgroup/unified`, on unified ones at
//! `/sys/fs/cgroup`; the mount table is the only reliable source, so nothing is hard-coded.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

/// `CGROUP2_SUPER_MAGIC` from `include/uapi/linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where cgroup v2 is mounted according to `/proc/mounts`.
#[must_use]
pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup2_mount_in(Path::new("/proc"))
}

/// Like `cgroup2_mount`, reading `<proc_root>/mounts` (tests use fixtures).
#[must_use]
pub fn cgroup2_mount_in(proc_root: &Path) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string(proc_root.join("mounts")).ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// True if `dir` is a directory on a cgroup2 filesystem.
#[must_use]
pub fn is_cgroup2(dir: &File) -> bool {
    // SAFETY: statfs is plain data; fstatfs fills it from a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    let ret = unsafe { libc::fstatfs(dir.as_raw_fd(), &raw mut st) };
    ret == 0 && st.f_type == CGROUP2_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let dir = std::env::temp_dir().join(format!("natt-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("mounts"),
            "sysfs /sys sysfs rw 0 0\ntmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
             cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n",
        )
        .unwrap();
        assert_eq!(
            cgroup2_mount_in(&dir),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        std::fs::write(
            dir.join("mounts"),
            "cgroup2 /run/my\\040cg cgroup2 rw 0 0\n",
        )
        .unwrap();
        assert_eq!(cgroup2_mount_in(&dir), Some(PathBuf::from("/run/my cg")));
        std::fs::write(dir.join("mounts"), "proc /proc proc rw 0 0\n").unwrap();
        assert_eq!(cgroup2_mount_in(&dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
