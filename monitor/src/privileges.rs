//! Privileges: which capabilities the daemon needs (checked before start-up and by
//! `natt-monitor check`), what each phase needs, and dropping what the running daemon does not.
//!
//! | phase | needs | why |
//! |---|---|---|
//! | load | `CAP_BPF`, `CAP_PERFMON`, `CAP_NET_ADMIN` | maps and program; the verifier accepts the program's pointer spills and `bpf_probe_read_kernel` only with `CAP_PERFMON`; `cgroup_skb` is a networking program type |
//! | attach, pin, adopt | `CAP_BPF`, `CAP_NET_ADMIN` | `BPF_LINK_CREATE`/`UPDATE` at a cgroup; bpffs |
//! | running: scrapes, map updates, rings | `CAP_BPF` | with `kernel.unprivileged_bpf_disabled` set (every distribution's default) every `bpf(2)` call needs it, even on descriptors the daemon holds |
//! | running: XFRM discovery | `CAP_NET_ADMIN` | dumping SAs and policies and their notifications over netlink (links and `ETHTOOL_GGRO` need none) |
//!
//! So once attached, `CAP_PERFMON` is dropped from the effective, permitted and inheritable
//! sets (and with them the ambient set). `CAP_BPF` and `CAP_NET_ADMIN` stay: the kernel
//! refuses the running daemon's work without them.

use std::{fs, io, path::Path};

/// `CAP_PERFMON` (include/uapi/linux/capability.h).
pub const CAP_PERFMON: u32 = 38;

/// Capability bits from `include/uapi/linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Capabilities the daemon needs that this process lacks: the daemon refuses to start without
/// them, and `natt-monitor check` names them. Empty if it has them, or if `/proc/self/status`
/// cannot be read (the load then fails with its own EPERM hint).
#[must_use]
pub fn missing_capabilities(proc_root: &Path) -> Vec<&'static str> {
    let Some(caps) = effective_caps(proc_root) else {
        return Vec::new();
    };
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    // Without CAP_PERFMON the verifier forbids spilling pointers to the stack and overwriting
    // them ("attempt to corrupt spilled pointer on stack"), which the compiled program does.
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// This process's effective capability set, from `<proc_root>/self/status`.
pub(crate) fn effective_caps(proc_root: &Path) -> Option<u64> {
    let status = fs::read_to_string(proc_root.join("self/status")).ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Removes capability `cap` from this thread's effective, permitted and inheritable sets for
/// good. Returns whether it was held. Call it before other threads start, or from the thread
/// whose set matters: Linux keeps capabilities per thread.
///
/// # Errors
/// When `capget` or `capset` fails.
pub fn drop_capability(cap: u32) -> io::Result<bool> {
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and two data structs, as version 3 of the interface requires.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
    let held = data[word].permitted & bit != 0;
    data[word].effective &= !bit;
    data[word].permitted &= !bit;
    data[word].inheritable &= !bit;
    // SAFETY: as above; capset only lowers the sets here.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(held)
}
