//! Least privilege after start-up: what each phase needs, and dropping what the running daemon
//! does not.
//!
//! | phase | needs | why |
//! |---|---|---|
//! | load | `CAP_BPF`, `CAP_PERFMON`, `CAP_NET_ADMIN` | maps and program; the verifier accepts the program's pointer spills and `bpf_probe_read_kernel` only with `CAP_PERFMON`; `cgroup_skb` is a networking program type |
//! | attach, pin, adopt | `CAP_BPF`, `CAP_NET_ADMIN` | `BPF_LINK_CREATE`/`UPDATE` at a cgroup; bpffs |
//! | running: scrapes, map updates, rings | `CAP_BPF` | with `kernel.unprivileged_bpf_disabled` set (every distribution's default) every `bpf(2)` call needs it, even on descriptors the daemon holds |
//! | running: XFRM discovery | `CAP_NET_ADMIN` | dumping SAs and their notifications over netlink |
//!
//! So once attached, `CAP_PERFMON` is dropped from the effective, permitted and inheritable
//! sets (and with them the ambient set). `CAP_BPF` and `CAP_NET_ADMIN` stay: the kernel
//! refuses the running daemon's work without them.

use std::io;

/// `CAP_PERFMON` (include/uapi/linux/capability.h).
pub const CAP_PERFMON: u32 = 38;

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
