//! The in-kernel verifier from userspace, one file per consumer:
//!
//! | module | who uses it | what |
//! |---|---|---|
//! | `loader` | start-up, `check`, tests, benches | `VerifierLoader`: every option of a load |
//! | `lifecycle` | the daemon's start-up and shutdown | `Verifier`: attach, detach, hand out maps |
//! | `writer` | the state task (one writer) | `PeerMaps`: peers, residuals, tunnels |
//! | `reader` | the scrape (many readers, no lock) | `Stats`: every count |
//! | `error` | all | `EbpfFailure` |
//!
//! All-or-nothing: a `Verifier` owns the loaded object and its cgroup link. The link is a
//! `bpf_link` (kernel 5.7+), so dropping the `Verifier`, or the process dying for any reason,
//! detaches the program; nothing is left half-attached. The exception is a pinned verifier
//! (`VerifierLoader::load_pinned`, `Verifier::attach_pinned`): its link and maps live in bpffs
//! and outlive the process on purpose, so that the next daemon adopts them (`crate::pin`).

use std::{io, os::fd::AsFd as _};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError},
    programs::CgroupSkb,
};

mod error;
mod lifecycle;
mod loader;
mod reader;
mod writer;

pub use error::EbpfFailure;
pub use lifecycle::{Attached, Verifier};
pub use loader::{MapSizes, VerifierLoader};
pub use reader::{Counters, Stats};
pub use writer::{MapContents, PeerMaps};

pub use crate::{features::Variant, pin::PinnedMaps};

/// The verifier object, built by build.rs from `monitor-ebpf`.
pub static VERIFIER_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/natt-verifier"));

/// The test and benchmark programs (the NAT-T injector): only in builds with the `testbed`
/// feature (the tests and benches ask for it), never in the shipped binary.
#[cfg(feature = "testbed")]
pub static TESTBED_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/natt-testbed"));

/// Name of the `cgroup_skb` program in `VERIFIER_OBJ`.
pub const PROGRAM: &str = Variant::BpfLoop.program();

/// The same verifier without `bpf_loop`, for kernels before 5.17.
pub const PROGRAM_COMPAT: &str = Variant::BoundedLoop.program();

/// The held path of enforce mode, which either program tail-calls through `JUMP`.
pub const PROGRAM_HOLD: &str = "natt_hold";

/// SCTP's CRC32c, which the `bpf_loop` variant tail-calls through `SCTP_JUMP` (kernels without
/// `bpf_loop` cannot load it).
pub const PROGRAM_SCTP: &str = "natt_sctp";

/// The pairing program (`pair.rs` in the object): a verified TCP segment that retransmits a
/// dropped one is copied beside it for forensics; tail-called through `PAIR_JUMP` by either
/// variant.
pub const PROGRAM_PAIR: &str = "natt_pair";

/// Takes map `name` out of the object.
fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<Map, EbpfFailure> {
    bpf.take_map(name)
        .ok_or(EbpfFailure::Missing { kind: "map", name })
}

/// A map handle of the type `T` expects, or an error naming the map.
fn typed<T: TryFrom<Map, Error = MapError>>(
    map: Map,
    name: &'static str,
) -> Result<T, EbpfFailure> {
    T::try_from(map).map_err(|source| EbpfFailure::Map {
        what: format!("opening {name}"),
        source,
    })
}

/// A second handle on the same per-CPU array, through a duplicated descriptor.
fn duplicate(map: &Map, name: &'static str) -> Result<Map, EbpfFailure> {
    let Map::PerCpuArray(data) = map else {
        return Err(EbpfFailure::Missing { kind: "map", name });
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| MapData::from_fd(fd).map_err(io::Error::other))
        .map_err(|e| EbpfFailure::Map {
            what: format!("duplicating the descriptor of {name}"),
            source: MapError::IoError(e),
        })?;
    Ok(Map::PerCpuArray(fd))
}

fn program<'a>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSkb, EbpfFailure> {
    bpf.program_mut(name)
        .and_then(|p| <&mut CgroupSkb>::try_from(p).ok())
        .ok_or(EbpfFailure::Missing {
            kind: "program",
            name,
        })
}
