//! Why the daemon stopped abnormally: one variant per start-up step or task, each naming
//! the flag, file or kernel feature at fault.

use std::io;

use super::state::StateError;
use crate::{ebpf::EbpfFailure, peers::PeerError, scope::LayoutError, xfrm::XfrmError};

/// Why the daemon stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Missing privileges.
    #[error("natt-monitor needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or CAP_SYS_ADMIN), or root; this process lacks {}", missing.join(", "))]
    Privileges {
        /// The missing capability names.
        missing: Vec<&'static str>,
    },
    /// The listen address could not be bound.
    #[error("--web.listen-address {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The peer set is invalid.
    #[error(transparent)]
    Peers(#[from] PeerError),
    /// Loading, attaching or map access failed.
    #[error(transparent)]
    Ebpf(#[from] EbpfFailure),
    /// The capture file could not be created.
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    /// Metrics could not be registered.
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A ring buffer could not be registered with the runtime.
    #[error("watching the {what} ring buffer: {source}")]
    EventFd {
        /// Which one.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The eBPF log bridge could not be set up.
    #[error("bridging the eBPF program's log (aya-log): {0}")]
    EbpfLog(String),
    /// A signal handler could not be installed.
    #[error("installing the SIGHUP handler: {0}")]
    Signal(#[source] io::Error),
    /// XFRM discovery could not start.
    #[error("--discover xfrm: {0}")]
    Discovery(#[from] XfrmError),
    /// The first list of tunnel devices could not be written to the verifier's map.
    #[error("installing the tunnel devices: {0}")]
    Tunnels(#[source] StateError),
    /// `--scope sa` was asked for, but the kernel's BTF does not give the `sec_path` layout.
    #[error("--scope sa: {0}")]
    Scope(#[from] LayoutError),
    /// `--scope sa` was asked for, but the program cannot read kernel memory on this kernel.
    #[error(
        "--scope sa: this kernel does not offer bpf_probe_read_kernel to cgroup_skb programs (Linux 5.5+), so a segment's IPsec state cannot be read; use --scope address"
    )]
    NoProbeRead,
    /// The kernel lacks something the verifier cannot run without.
    #[error("this kernel lacks {feature}, which natt-monitor needs; see `natt-monitor check`")]
    Kernel {
        /// What is missing.
        feature: &'static str,
    },
    /// `NOTIFY_SOCKET` names a socket that cannot be used.
    #[error("NOTIFY_SOCKET: {0}")]
    Notify(#[source] io::Error),
    /// The maps `--max-peers` asks for cannot fit under the cgroup's memory limit, which the
    /// kernel charges map memory to (Linux 5.11+): every start would fail the same way, or be
    /// killed by the cgroup's OOM killer.
    #[error(
        "--max-peers {max_peers}: the verifier's maps need at least {need} MiB (possible CPUs: {cpus}; the per-peer counters take one copy per CPU), more than the {free} MiB that memory.max of {cgroup} ({max} MiB) leaves free; lower --max-peers (the max_peers key) or raise the limit (the unit's MemoryMax=)",
        need = need.div_ceil(1 << 20),
        free = limit.free() >> 20,
        max = limit.max >> 20,
        cgroup = limit.cgroup.display()
    )]
    MapMemory {
        /// The peers asked for.
        max_peers: u32,
        /// The lower bound of the maps' memory, in bytes.
        need: u64,
        /// Possible CPUs.
        cpus: u32,
        /// The limit.
        limit: crate::cgroup::MemoryLimit,
    },
    /// The pin directory cannot be used.
    #[error(transparent)]
    Pin(#[from] crate::pin::PinError),
    /// An internal task ended while the daemon was running.
    #[error("internal task `{task}` stopped: {reason}; exiting so the failure is visible")]
    TaskDied {
        /// Which task.
        task: &'static str,
        /// What happened to it.
        reason: String,
    },
}

/// The first peer set's failures, as the start-up reports them: a refused set names the peers
/// at fault (`Peers`), a map that refused it the map (`Ebpf`).
impl From<StateError> for DaemonError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Refused(p) => Self::Peers(p),
            StateError::Map(e) => Self::Ebpf(e),
            StateError::Restore { failed, .. } => Self::Ebpf(*failed),
            e @ (StateError::Tunnels(_) | StateError::Gone) => Self::Tunnels(e),
        }
    }
}
