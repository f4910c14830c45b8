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

/// A cgroup's memory limit, and what it already holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    /// The cgroup whose `memory.max` it is.
    pub cgroup: PathBuf,
    /// Its `memory.max`, in bytes.
    pub max: u64,
    /// What it holds that reclaim cannot free: `memory.current` less its page cache (the
    /// `file` line of `memory.stat`).
    pub used: u64,
}

impl MemoryLimit {
    /// What the cgroup can still be charged.
    #[must_use]
    pub const fn free(&self) -> u64 {
        self.max.saturating_sub(self.used)
    }
}

/// The tightest finite `memory.max` from this process's cgroup up to the cgroup v2 root (the
/// one that leaves least free); `None` when none of them limits memory, or when cgroup v2 has
/// no memory controller (hybrid hosts keep it in v1).
#[must_use]
pub fn memory_limit_in(proc_root: &Path) -> Option<MemoryLimit> {
    let mount = cgroup2_mount_in(proc_root)?;
    let own = std::fs::read_to_string(proc_root.join("self/cgroup")).ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut dir = mount.join(rel.trim_start_matches('/'));
    let read = |dir: &Path, name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let mut tightest: Option<MemoryLimit> = None;
    while dir.starts_with(&mount) {
        if let Some(max) = read(&dir, "memory.max").and_then(|m| m.trim().parse::<u64>().ok()) {
            let current = read(&dir, "memory.current").and_then(|c| c.trim().parse::<u64>().ok());
            let file = read(&dir, "memory.stat").and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("file ")?.trim().parse::<u64>().ok())
            });
            let limit = MemoryLimit {
                cgroup: dir.clone(),
                max,
                used: current.unwrap_or(0).saturating_sub(file.unwrap_or(0)),
            };
            if tightest.as_ref().is_none_or(|t| limit.free() < t.free()) {
                tightest = Some(limit);
            }
        }
        if !dir.pop() {
            break;
        }
    }
    tightest
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

    #[test]
    fn the_limit_that_leaves_least_free_on_the_way_to_the_root_counts() {
        let dir = std::env::temp_dir().join(format!("natt-cgmem-{}", std::process::id()));
        let root = dir.join("cg");
        std::fs::create_dir_all(dir.join("self")).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(
            dir.join("mounts"),
            format!("cgroup2 {} cgroup2 rw 0 0\n", root.display()),
        )
        .unwrap();
        std::fs::write(dir.join("self/cgroup"), "0::/a/b\n").unwrap();
        std::fs::write(root.join("a/b/memory.max"), "max\n").unwrap();
        assert_eq!(memory_limit_in(&dir), None);
        std::fs::write(root.join("a/memory.max"), "268435456\n").unwrap();
        let a = MemoryLimit {
            cgroup: root.join("a"),
            max: 268_435_456,
            used: 0,
        };
        assert_eq!(memory_limit_in(&dir), Some(a.clone()));
        // b's own limit is larger, but a sibling of b already holds most of a's.
        std::fs::write(root.join("a/b/memory.max"), "201326592\n").unwrap();
        std::fs::write(root.join("a/memory.current"), "167772160\n").unwrap();
        std::fs::write(
            root.join("a/memory.stat"),
            "anon 1\nfile 33554432\nkernel 2\n",
        )
        .unwrap();
        let a = MemoryLimit {
            used: 134_217_728,
            ..a
        };
        assert_eq!((memory_limit_in(&dir), a.free()), (Some(a), 134_217_728));
        std::fs::write(root.join("a/b/memory.max"), "67108864\n").unwrap();
        let b = MemoryLimit {
            cgroup: root.join("a/b"),
            max: 67_108_864,
            used: 0,
        };
        assert_eq!(memory_limit_in(&dir), Some(b));
        // A hybrid host's v1 line only: no cgroup v2 path, no limit read.
        std::fs::write(dir.join("self/cgroup"), "4:memory:/a/b\n").unwrap();
        assert_eq!(memory_limit_in(&dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
