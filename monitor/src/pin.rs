//! Pinning: the verifier's cgroup link and its stateful maps kept in bpffs, so that the program
//! outlives the daemon and a new daemon adopts it without a gap.
//!
//! Layout of the pin directory (default `/sys/fs/bpf/natt-monitor`):
//!
//! | file | what |
//! |---|---|
//! | `link` | the `bpf_link` that attaches the verifier at the cgroup's ingress |
//! | `PEERS_V4`, `PEERS_V6` | the peer tries (which segments are verified, in which mode) |
//! | `PEER_STATS`, `ICMP_STATS`, `SCTP_STATS`, `COUNTERS` | every count the metrics report |
//! | `SA_TRUST`, `MAPPINGS` | the residual of each SA, and which SA holds each NAT mapping's |
//! | `TRUST_COUNTERS` | residuals inherited and withdrawn |
//! | `EVENTS`, `LEARNING` | mismatch events and learning samples written while no daemon ran |
//!
//! A daemon that finds a link there replaces the program behind it with `BPF_LINK_UPDATE`, one
//! atomic pointer swap in the kernel: the cgroup never runs without a verifier. aya opens the
//! pinned maps instead of creating new ones, so the counts continue. The link calls here are
//! raw `bpf(2)` commands because aya 0.16 gives no access to a link's descriptor, its cgroup or
//! `BPF_LINK_UPDATE`.

use std::{
    ffi::CString,
    fmt::Write as _,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

/// The default pin directory.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/natt-monitor";

/// The maps that carry state across daemons, pinned by name in the pin directory.
pub const PINNED_MAPS: [&str; 13] = [
    "PEERS_V4",
    "PEERS_V6",
    "PEER_STATS",
    "ICMP_STATS",
    "SCTP_STATS",
    "COUNTERS",
    "SA_TRUST",
    "MAPPINGS",
    "TRUST_COUNTERS",
    "EVENTS",
    "LEARNING",
    "JUMP",
    "SCTP_JUMP",
];

/// Maps that earlier versions pinned and this one no longer has: removed when a daemon adopts
/// the directory, and by `detach`. (`SA_RESIDUALS` held one residual per NAT mapping; residuals
/// are per SA now, in `SA_TRUST`, and are learned again after such an upgrade.)
pub const OBSOLETE_MAPS: [&str; 1] = ["SA_RESIDUALS"];

/// Removes the pins of `OBSOLETE_MAPS` from `dir`; returns the names removed.
///
/// # Errors
/// `PinError::Io` naming the file that could not be removed.
pub fn remove_obsolete(dir: &Path) -> Result<Vec<&'static str>, PinError> {
    remove_pins(
        dir,
        &OBSOLETE_MAPS,
        "removing the pin of a map this version no longer has",
    )
}

/// Removes the pins `names` from `dir` (those that are there); returns the names removed.
fn remove_pins(
    dir: &Path,
    names: &[&'static str],
    what: &'static str,
) -> Result<Vec<&'static str>, PinError> {
    let mut out = Vec::new();
    for &name in names {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => out.push(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(PinError::Io { path, what, source }),
        }
    }
    Ok(out)
}

/// The link's file in the pin directory.
pub const LINK_FILE: &str = "link";

/// Where bpffs is conventionally mounted (systemd mounts it at boot).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

// bpf(2) commands and constants (include/uapi/linux/bpf.h).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `union bpf_attr`, as raw bytes with each command's fields written at their offsets. 128
/// bytes covers every field used here; the kernel accepts a shorter attr than its own.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    const fn new() -> Self {
        Self([0; 128])
    }

    fn u32_at(&mut self, offset: usize, v: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64_at(&mut self, offset: usize, v: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// One `bpf(2)` call; its non-negative result.
fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised buffer of the size passed; pointers written into it
    // point to memory that outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), size_of::<Attr>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A `bpf(2)` call that returns a new descriptor.
fn sys_bpf_fd(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A cgroup `bpf_link`, owned through its descriptor. Closing the last descriptor of a link
/// that is not pinned detaches it.
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
}

/// What the kernel says of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// The link's id.
    pub id: u32,
    /// The program it runs.
    pub prog_id: u32,
    /// The cgroup's id (its inode number in cgroup2); 0 once the link was detached or its
    /// cgroup removed.
    pub cgroup_id: u64,
    /// True for a cgroup link at ingress.
    pub cgroup_ingress: bool,
}

impl LinkInfo {
    /// True while the link attaches its program to a cgroup.
    #[must_use]
    pub const fn attached(&self) -> bool {
        self.cgroup_id != 0
    }
}

impl Link {
    /// Attaches `prog` at `cgroup`'s ingress (`BPF_LINK_CREATE`, multi-program mode).
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn attach_ingress(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>) -> io::Result<Self> {
        let mut attr = Attr::new();
        attr.u32_at(0, fd_u32(prog))
            .u32_at(4, fd_u32(cgroup))
            .u32_at(8, BPF_CGROUP_INET_INGRESS);
        sys_bpf_fd(BPF_LINK_CREATE, &mut attr).map(|fd| Self { fd })
    }

    /// A second descriptor of the same link.
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.fd.try_clone().map(|fd| Self { fd })
    }

    /// Opens the link pinned at `path` (`BPF_OBJ_GET`).
    ///
    /// # Errors
    /// `NotFound` when nothing is pinned there; the kernel's refusal otherwise.
    pub fn open(path: &Path) -> io::Result<Self> {
        let name = c_path(path)?;
        let mut attr = Attr::new();
        attr.u64_at(0, name.as_ptr() as u64);
        sys_bpf_fd(BPF_OBJ_GET, &mut attr).map(|fd| Self { fd })
    }

    /// Pins the link at `path` (`BPF_OBJ_PIN`), which must not exist yet.
    ///
    /// # Errors
    /// The kernel's refusal, e.g. `EEXIST`.
    pub fn pin(&self, path: &Path) -> io::Result<()> {
        let name = c_path(path)?;
        let mut attr = Attr::new();
        attr.u64_at(0, name.as_ptr() as u64)
            .u32_at(8, fd_u32(self.fd.as_fd()));
        sys_bpf(BPF_OBJ_PIN, &mut attr).map(drop)
    }

    /// The kernel's description of the link. A descriptor that is not a cgroup link is an
    /// error (`InvalidData`), so a stranger's file at the pin path is never updated.
    ///
    /// # Errors
    /// The kernel's refusal, or `InvalidData`.
    pub fn info(&self) -> io::Result<LinkInfo> {
        // struct bpf_link_info: type, id, prog_id, then the union (8-aligned) whose cgroup
        // member is { u64 cgroup_id; u32 attach_type; }.
        let mut info = [0u8; 64];
        let mut attr = Attr::new();
        attr.u32_at(0, fd_u32(self.fd.as_fd()))
            .u32_at(4, 64)
            .u64_at(8, info.as_mut_ptr() as u64);
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap_or_default());
        if u32_at(0) != BPF_LINK_TYPE_CGROUP {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a bpf_link of type {}, not a cgroup link", u32_at(0)),
            ));
        }
        Ok(LinkInfo {
            id: u32_at(4),
            prog_id: u32_at(8),
            cgroup_id: u64::from_ne_bytes(info[16..24].try_into().unwrap_or_default()),
            cgroup_ingress: u32_at(24) == BPF_CGROUP_INET_INGRESS,
        })
    }

    /// Makes the link run `prog` instead of its program, atomically (`BPF_LINK_UPDATE`): every
    /// segment meets either the old program or the new one.
    ///
    /// # Errors
    /// The kernel's refusal; `ENOLINK` when the link is no longer attached.
    pub fn update(&self, prog: BorrowedFd<'_>) -> io::Result<()> {
        let mut attr = Attr::new();
        attr.u32_at(0, fd_u32(self.fd.as_fd()))
            .u32_at(4, fd_u32(prog));
        sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
    }

    /// Detaches the link's program now (`BPF_LINK_DETACH`, Linux 5.9+), even while other
    /// descriptors or a pin hold the link.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn detach(&self) -> io::Result<()> {
        let mut attr = Attr::new();
        attr.u32_at(0, fd_u32(self.fd.as_fd()));
        sys_bpf(BPF_LINK_DETACH, &mut attr).map(drop)
    }
}

/// How often the kernel ran a program and for how long in all (`bpf_prog_info.run_cnt` and
/// `run_time_ns`, Linux 5.1+), as `ebpf_exporter` reports them. Both stay 0 unless BPF statistics
/// are on (`sysctl kernel.bpf_stats_enabled=1`), which costs two clock reads per run.
///
/// # Errors
/// The kernel's refusal.
pub fn program_runs(prog: BorrowedFd<'_>) -> io::Result<ProgramRuns> {
    // struct bpf_prog_info up to run_cnt: run_time_ns at byte 192, run_cnt at 200 (offsets
    // checked with offsetof against linux/bpf.h).
    let mut info = [0u8; 208];
    let mut attr = Attr::new();
    attr.u32_at(0, fd_u32(prog))
        .u32_at(4, 208)
        .u64_at(8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().unwrap_or_default());
    Ok(ProgramRuns {
        run_time_ns: u64_at(192),
        runs: u64_at(200),
    })
}

/// A program's run statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramRuns {
    /// Nanoseconds spent in the program.
    pub run_time_ns: u64,
    /// Runs.
    pub runs: u64,
}

/// The id the kernel gives a cgroup2 directory (its inode number), as `LinkInfo` reports it.
///
/// # Errors
/// When the directory cannot be read.
pub fn cgroup_id(dir: &File) -> io::Result<u64> {
    dir.metadata().map(|m| m.ino())
}

/// True when `dir` lies on a BPF filesystem.
#[must_use]
pub fn is_bpffs(dir: &Path) -> bool {
    let Ok(name) = c_path(dir) else {
        return false;
    };
    // SAFETY: statfs is plain data; the call fills it from a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and pointer.
    let ret = unsafe { libc::statfs(name.as_ptr(), &raw mut st) };
    ret == 0 && st.f_type == BPF_FS_MAGIC
}

/// Why the pin directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The directory is not on bpffs and cannot be put there.
    #[error(
        "--pin-path {}: not on a BPF filesystem (bpffs); mount one (`mount -t bpf bpf {BPFFS_ROOT}`), choose a directory on one, or pass --pin-path none to run without pinning", path.display()
    )]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },
    /// A running daemon holds the directory (`hold`): detaching would make it exit, and its
    /// supervisor would start it again, attaching anew.
    #[error(
        "--pin-path {}: a running natt-monitor{} uses this verifier; detached now, it would exit and systemd or Kubernetes would start it again, attaching anew. Stop it first (`systemctl stop natt-monitor`, `podman stop`, or delete the DaemonSet), then detach", path.display(), pid.map_or_else(String::new, |p| format!(" (pid {p})"))
    )]
    Held {
        /// The directory.
        path: PathBuf,
        /// The holder, from /proc/locks, when found.
        pid: Option<u32>,
    },
    /// A file-system step failed.
    #[error("--pin-path {}: {what}: {source}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Takes a shared lock (`flock(2)`) on the pin directory, for a daemon to hold while it runs:
/// `claim` (and so `natt-monitor detach`) is refused while any is held. The kernel releases it
/// with the descriptor, however the process ends, so a killed daemon never leaves it behind.
///
/// # Errors
/// When the directory cannot be opened or locked.
pub fn hold(dir: &Path) -> io::Result<File> {
    let f = File::open(dir)?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Takes the pin directory for removal: an exclusive lock, refused while a daemon `hold`s it.
/// `None` when there is no directory. Keep the returned descriptor until the removal is done.
///
/// # Errors
/// `PinError::Held` naming the daemon's pid when /proc/locks shows it; `PinError::Io` otherwise.
pub fn claim(dir: &Path) -> Result<Option<File>, PinError> {
    let io_err = |source| PinError::Io {
        path: dir.to_owned(),
        what: "locking the pin directory",
        source,
    };
    let f = match File::open(dir) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(io_err(e));
    }
    let inode = std::os::unix::fs::MetadataExt::ino(&f.metadata().map_err(io_err)?);
    Err(PinError::Held {
        path: dir.to_owned(),
        pid: lock_holder(
            &std::fs::read_to_string("/proc/locks").unwrap_or_default(),
            inode,
        ),
    })
}

/// The pid of a `FLOCK` on inode `inode` in /proc/locks' text (`1: FLOCK ADVISORY READ 4242
/// 00:1f:1234 0 EOF`).
fn lock_holder(locks: &str, inode: u64) -> Option<u32> {
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let at = f.iter().position(|w| *w == "FLOCK")?;
        let (pid, file) = (f.get(at + 3)?, f.get(at + 4)?);
        (file.rsplit(':').next()?.parse::<u64>().ok()? == inode).then(|| pid.parse().ok())?
    })
}

/// Makes `dir` usable as a pin directory: mounts bpffs at `/sys/fs/bpf` when `dir` lies below
/// it and nothing is mounted there (as systemd does at boot), then creates `dir` (mode 0700) and
/// removes the pins of maps this version no longer has (`OBSOLETE_MAPS`), so that an upgrade
/// adopts the rest. Returns whether bpffs was mounted here.
///
/// # Errors
/// `PinError::NotBpffs` when `dir`'s parent is not on bpffs; `PinError::Io` when it cannot be
/// mounted or created.
pub fn prepare(dir: &Path) -> Result<bool, PinError> {
    let parent = dir.parent().unwrap_or(dir);
    let mut mounted = false;
    if !is_bpffs(parent) && parent.starts_with(BPFFS_ROOT) && !is_bpffs(Path::new(BPFFS_ROOT)) {
        mount_bpffs(Path::new(BPFFS_ROOT)).map_err(|source| PinError::Io {
            path: PathBuf::from(BPFFS_ROOT),
            what: "mounting bpffs",
            source,
        })?;
        mounted = true;
    }
    if !is_bpffs(parent) {
        return Err(PinError::NotBpffs {
            path: dir.to_owned(),
        });
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(PinError::Io {
                path: dir.to_owned(),
                what: "creating the directory",
                source,
            });
        }
    }
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(
        |source| PinError::Io {
            path: dir.to_owned(),
            what: "setting mode 0700",
            source,
        },
    )?;
    for map in remove_obsolete(dir)? {
        tracing::info!(map, "removed the pin of a map this version no longer has");
    }
    Ok(mounted)
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = c_path(at)?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What `detach` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// The link's state before: `Some` if a link was pinned.
    pub link: Option<LinkInfo>,
    /// The map files removed.
    pub maps: Vec<&'static str>,
    /// Whether the directory itself went (it stays if it holds files natt-monitor did not put
    /// there).
    pub dir: bool,
}

impl Removed {
    /// What `natt-monitor detach` prints.
    #[must_use]
    pub fn render(&self, dir: &Path) -> String {
        if self.link.is_none() && self.maps.is_empty() {
            return format!("nothing pinned at {}\n", dir.display());
        }
        let mut out = String::new();
        match self.link {
            Some(l) if l.attached() => {
                let _ = writeln!(
                    out,
                    "detached link {} (program id {}) from cgroup id {}",
                    l.id, l.prog_id, l.cgroup_id
                );
            }
            Some(l) => {
                let _ = writeln!(out, "removed link {}, which was detached already", l.id);
            }
            None => {}
        }
        if !self.maps.is_empty() {
            let _ = writeln!(out, "removed maps: {}", self.maps.join(", "));
        }
        if self.dir {
            let _ = writeln!(out, "removed {}", dir.display());
        }
        out
    }
}

/// Detaches the pinned verifier and removes every pin natt-monitor made in `dir`, then `dir`.
/// A daemon still running keeps its descriptors, but its program no longer runs: it notices
/// within a second and exits.
///
/// # Errors
/// `PinError::Io` naming the file that could not be removed.
pub fn detach(dir: &Path) -> Result<Removed, PinError> {
    let io_err = |path: PathBuf, what| move |source| PinError::Io { path, what, source };
    let mut out = Removed::default();
    let link_path = dir.join(LINK_FILE);
    match Link::open(&link_path) {
        Ok(link) => {
            let info = link
                .info()
                .map_err(io_err(link_path.clone(), "reading the pinned link"))?;
            if info.attached() {
                link.detach()
                    .map_err(io_err(link_path.clone(), "detaching the pinned link"))?;
            }
            std::fs::remove_file(&link_path)
                .map_err(io_err(link_path.clone(), "removing the pin"))?;
            out.link = Some(info);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PinError::Io {
                path: link_path,
                what: "opening the pinned link",
                source,
            });
        }
    }
    out.maps = remove_obsolete(dir)?;
    out.maps
        .extend(remove_pins(dir, &PINNED_MAPS, "removing the pin")?);
    out.dir = std::fs::remove_dir(dir).is_ok();
    Ok(out)
}

/// Which of `PINNED_MAPS` are pinned in `dir`.
#[must_use]
pub fn pinned_maps(dir: &Path) -> Vec<&'static str> {
    PINNED_MAPS
        .into_iter()
        .filter(|m| dir.join(m).exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_holder_is_found_by_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 900 00:1a:77 0 EOF\n\
                     2: FLOCK  ADVISORY  READ 4242 00:1f:1234 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 17 00:1f:99 0 EOF\n";
        assert_eq!(lock_holder(locks, 1234), Some(4242));
        assert_eq!(lock_holder(locks, 99), Some(17));
        assert_eq!(
            lock_holder(locks, 77),
            None,
            "a POSIX lock is not a daemon's hold"
        );
        assert_eq!(lock_holder("", 1234), None);
    }

    #[test]
    fn claim_is_refused_while_a_hold_exists_and_granted_after() {
        let dir = std::env::temp_dir().join(format!("natt-pin-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let held = hold(&dir).unwrap();
        // A second daemon (a handover) may hold it too.
        let also = hold(&dir).unwrap();
        match claim(&dir) {
            Err(PinError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop((held, also));
        assert!(claim(&dir).unwrap().is_some());
        std::fs::remove_dir(&dir).unwrap();
        assert!(
            claim(&dir).unwrap().is_none(),
            "no directory, nothing to claim"
        );
    }
}
