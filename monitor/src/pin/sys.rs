//! The raw `bpf(2)` layer under the pin directory's policy: cgroup links (create, pin, open,
//! read, update, detach), a program's run statistics, and the bpffs check. Raw because aya
//! 0.16 gives no access to a link's descriptor, its cgroup or `BPF_LINK_UPDATE`.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::Path,
};

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

pub(super) fn c_path(path: &Path) -> io::Result<CString> {
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
