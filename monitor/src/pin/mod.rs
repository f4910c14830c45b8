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
//! pinned maps instead of creating new ones, so the counts continue.
//!
//! This module is the directory's policy: prepare it, adopt or replace what it holds, hold it
//! while a daemon runs, detach. `sys` is the raw `bpf(2)` layer under it (links, program
//! statistics), raw because aya 0.16 gives no access to a link's descriptor, its cgroup or
//! `BPF_LINK_UPDATE`.

use std::{
    fmt::Write as _,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

mod sys;

use sys::c_path;
pub use sys::{Link, LinkInfo, ProgramRuns, cgroup_id, is_bpffs, program_runs};

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

/// Where a pinned verifier's maps came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinnedMaps {
    /// Nothing was pinned: new maps, now pinned.
    Created,
    /// The pinned maps were opened: their counts, peers and residuals continue.
    Adopted,
    /// The pinned maps did not fit this build's (an upgrade that changed their layout or size):
    /// they were replaced by new ones, and the counts start again. The text says why.
    Replaced(String),
}

/// Why `adopt` failed.
#[derive(Debug)]
pub enum Adopted<E> {
    /// The object would not load, with or without the pins.
    Load(E),
    /// A pinned map that does not fit could not be removed.
    Remove {
        /// The pin.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The adoption policy for the stateful maps in `dir`. `load(Some(dir))` loads an object with
/// them opened from `dir` (created and pinned where absent); `load(None)` with new, unpinned
/// maps. What is pinned is adopted when it fits; when the load with pins fails but one without
/// succeeds, the pins are what did not fit (an upgrade changed a layout, or `--max-peers` a
/// size): they are removed and created again, and the reason is returned. A load that fails
/// without pins too is the object's failure, and the pins stay.
///
/// # Errors
/// `Adopted::Load` with the loader's error, `Adopted::Remove` naming the pin that stayed.
pub fn adopt<T, E>(
    dir: &Path,
    load: impl Fn(Option<&Path>) -> Result<T, E>,
) -> Result<(T, PinnedMaps), Adopted<E>>
where
    E: std::fmt::Display,
{
    let existing = pinned_maps(dir);
    match load(Some(dir)) {
        Ok(loaded) if existing.is_empty() => Ok((loaded, PinnedMaps::Created)),
        Ok(loaded) => Ok((loaded, PinnedMaps::Adopted)),
        Err(pinned) if !existing.is_empty() => {
            drop(load(None).map_err(Adopted::Load)?);
            let why = pinned.to_string();
            for name in existing {
                let path = dir.join(name);
                std::fs::remove_file(&path).map_err(|source| Adopted::Remove { path, source })?;
            }
            let loaded = load(Some(dir)).map_err(Adopted::Load)?;
            Ok((loaded, PinnedMaps::Replaced(why)))
        }
        Err(e) => Err(Adopted::Load(e)),
    }
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
