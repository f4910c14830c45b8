//! What can go wrong on the verifier's kernel side, each failure naming what it was doing, with
//! a privilege hint when the kernel said EPERM.

use std::{io, path::PathBuf};

use aya::{EbpfError, maps::MapError, programs::ProgramError};

/// Failures of the verifier's kernel side, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum EbpfFailure {
    /// The embedded object is empty (built with `AYA_BUILD_SKIP`).
    #[error(
        "this natt-monitor binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild it with scripts/setup.sh in place"
    )]
    NoObject,
    /// Parsing or creating maps failed.
    #[error("loading the eBPF object: {source}{hint}", hint = privilege_hint_ebpf(source))]
    Object {
        /// Underlying error.
        #[source]
        source: EbpfError,
    },
    /// A program or map the object should contain is missing or of another type.
    #[error("the eBPF object has no {kind} `{name}` of the expected type")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// The kernel verifier rejected the program, or loading was not permitted. The message
    /// keeps the verifier log's last lines (its verdict); the whole log is logged at debug level.
    #[error("loading program `{program}` into the kernel: {}{hint}", log_tail(cause), hint = privilege_hint(cause))]
    ProgramLoad {
        /// The program.
        program: &'static str,
        /// Underlying error (its text includes the whole verifier log).
        cause: ProgramError,
    },
    /// The cgroup path could not be opened.
    #[error("opening cgroup {}: {source}", path.display())]
    OpenCgroup {
        /// The path given.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The path is not in a cgroup v2 hierarchy.
    #[error("{} is not a cgroup v2 directory (cgroup v2 is mounted at {})", path.display(), mount.as_deref().map_or_else(|| "no mount point".into(), |m| m.display().to_string()))]
    NotCgroup2 {
        /// The path given.
        path: PathBuf,
        /// Where cgroup2 is mounted, if anywhere.
        mount: Option<PathBuf>,
    },
    /// Attaching failed.
    #[error("attaching `{program}` to cgroup {} ingress: {source}{hint}", path.display(), hint = if source.raw_os_error() == Some(libc::EPERM) { PRIVILEGE_HINT } else { "" })]
    Attach {
        /// The program.
        program: &'static str,
        /// The cgroup.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A descriptor could not be duplicated.
    #[error("{what}: {source}")]
    Descriptor {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A step with the pinned link or maps failed.
    #[error("{what} ({}): {source}", path.display())]
    Pin {
        /// What was being done.
        what: &'static str,
        /// The pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Updating or reading a map failed.
    #[error("{what}: {source}")]
    Map {
        /// What was being done.
        what: String,
        /// Underlying error.
        #[source]
        source: MapError,
    },
}

fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

pub(super) const PRIVILEGE_HINT: &str = " (natt-monitor needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, or root; see `natt-monitor check`)";

/// The first line of a load error and the last lines of the verifier log it carries.
fn log_tail(e: &ProgramError) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 8 {
        return text;
    }
    let first = lines[0]
        .split(" Verifier output:")
        .next()
        .unwrap_or(lines[0]);
    format!(
        "{first} Verifier output (last lines): {}",
        lines[lines.len() - 6..].join(" | ")
    )
}

fn privilege_hint(e: &ProgramError) -> &'static str {
    if is_eperm(e) { PRIVILEGE_HINT } else { "" }
}

fn privilege_hint_ebpf(e: &EbpfError) -> &'static str {
    if is_eperm(e) { PRIVILEGE_HINT } else { "" }
}
