//! Loading: one builder takes every option of a load (scope, program variant, capture ring, map
//! sizes, object, pin directory), the way aya's `EbpfLoader` does, and gives a `Verifier` with
//! its programs loaded and its shared maps split by consumer. It never probes the kernel: the
//! caller passes the variant it probed (`crate::features::Features::variant`).

use std::{io, path::Path, sync::Arc};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapError, ProgramArray},
};
use monitor_ebpf::{IcmpCounters, MappingOwner, PeerCounters, SaKey, SaTrust, SctpCounters};

use super::{
    EbpfFailure, PROGRAM_HOLD, PROGRAM_PAIR, PROGRAM_SCTP, PeerMaps, Stats, VERIFIER_OBJ, Variant,
    Verifier, duplicate, program, take_map, typed,
};
use crate::{
    pin::{self, Adopted, PinnedMaps},
    scope::Scope,
};

/// How many entries the sized maps hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Peers (`--max-peers`): `PEERS_V4`, `PEERS_V6`, `PEER_STATS`.
    pub peers: u32,
    /// SA residuals (`SA_TRUST`, an LRU map); `MAPPINGS` and `HELD` are sized for the peers.
    pub sa_trust: u32,
}

impl MapSizes {
    /// The sizes for `max_peers` peers.
    #[must_use]
    pub const fn for_peers(max_peers: u32) -> Self {
        Self {
            peers: max_peers,
            sa_trust: monitor_ebpf::sa_residual_slots(max_peers),
        }
    }

    /// A lower bound of the memory the kernel allocates when it creates the maps on a host
    /// with `cpus` possible CPUs: `PEER_STATS`', `ICMP_STATS`' and `SCTP_STATS`' per-CPU values
    /// and the preallocated LRU maps' keys and values, without the kernel's per-element
    /// bookkeeping. The LPM tries grow as peers are inserted and are left out.
    #[must_use]
    pub fn memory_floor(self, cpus: u32) -> u64 {
        const fn slot<T>() -> u64 {
            (size_of::<T>() as u64).next_multiple_of(8)
        }
        let key = slot::<SaKey>();
        let per_cpu = u64::from(self.peers)
            * (slot::<PeerCounters>() + slot::<IcmpCounters>() + slot::<SctpCounters>())
            * u64::from(cpus);
        let lru = u64::from(self.sa_trust) * (key + slot::<SaTrust>())
            + u64::from(monitor_ebpf::sa_residual_slots(self.peers))
                * (2 * key + slot::<MappingOwner>() + slot::<monitor_ebpf::Held>());
        per_cpu + lru
    }
}

/// Every option of a verifier load. `load` gives an unpinned verifier, whose maps and link go
/// with it; `load_pinned` one whose stateful maps live in a pin directory (`crate::pin`).
///
/// ```no_run
/// # use natt_monitor::{ebpf::VerifierLoader, features::Features, scope::Scope};
/// let variant = Features::probe().variant();
/// let mut verifier = VerifierLoader::new(&Scope::Address, variant).capture(true).load()?;
/// verifier.attach(std::path::Path::new("/sys/fs/cgroup"))?;
/// # Ok::<(), natt_monitor::ebpf::EbpfFailure>(())
/// ```
#[derive(Clone, Debug)]
pub struct VerifierLoader<'a> {
    layout: monitor_ebpf::SecpathLayout,
    variant: Variant,
    capture: bool,
    sizes: MapSizes,
    object: &'a [u8],
}

impl<'a> VerifierLoader<'a> {
    /// A load of `variant` (the one the caller probed) scoped by `scope`: this build's object,
    /// the capture ring off, maps sized for `monitor_ebpf::MAX_PEERS` peers.
    #[must_use]
    pub fn new(scope: &Scope, variant: Variant) -> Self {
        Self {
            layout: scope.layout(),
            variant,
            capture: false,
            sizes: MapSizes::for_peers(monitor_ebpf::MAX_PEERS),
            object: VERIFIER_OBJ,
        }
    }

    /// With `on`, every mismatching packet, and the intact retransmission of each dropped TCP
    /// segment, is copied into the capture ring (`Verifier::take_capture`), as the daemon loads.
    pub const fn capture(&mut self, on: bool) -> &mut Self {
        self.capture = on;
        self
    }

    /// Maps of `sizes` (`--max-peers`).
    pub const fn map_sizes(&mut self, sizes: MapSizes) -> &mut Self {
        self.sizes = sizes;
        self
    }

    /// Another build's verifier object with the same map ABI (the benchmarks measure an
    /// earlier revision beside this one).
    pub const fn object(&mut self, object: &'a [u8]) -> &mut Self {
        self.object = object;
        self
    }

    /// Loads the object and its programs into the kernel (not attached: `Verifier::attach`).
    ///
    /// # Errors
    /// `EbpfFailure` naming the step that failed, with a privilege hint on EPERM.
    pub fn load(&self) -> Result<Verifier, EbpfFailure> {
        self.check_object()?;
        let bpf = self
            .load_maps(None)
            .map_err(|source| EbpfFailure::Object { source })?;
        self.finish(bpf, false)
    }

    /// As `load`, with the stateful maps (`pin::PINNED_MAPS`) pinned in `dir`: adopted when
    /// they are there and fit, created when not, replaced when they do not fit this build or
    /// these sizes (`pin::adopt`). Attach with `Verifier::attach_pinned`.
    ///
    /// # Errors
    /// As `load`, and `EbpfFailure::Pin` when an unfit pin cannot be removed.
    pub fn load_pinned(&self, dir: &Path) -> Result<(Verifier, PinnedMaps), EbpfFailure> {
        self.check_object()?;
        let (bpf, origin) = pin::adopt(dir, |pins| self.load_maps(pins)).map_err(|e| match e {
            Adopted::Load(source) => EbpfFailure::Object { source },
            Adopted::Remove { path, source } => EbpfFailure::Pin {
                what: "removing a pinned map that does not fit this build",
                path,
                source,
            },
        })?;
        Ok((self.finish(bpf, true)?, origin))
    }

    fn check_object(&self) -> Result<(), EbpfFailure> {
        if self.object.is_empty() {
            return Err(EbpfFailure::NoObject);
        }
        raise_memlock_limit();
        Ok(())
    }

    /// The object with its maps created (or opened from `pins`), programs not loaded yet.
    fn load_maps(&self, pins: Option<&Path>) -> Result<Ebpf, EbpfError> {
        let mut loader = EbpfLoader::new();
        let slots = monitor_ebpf::sa_residual_slots(self.sizes.peers);
        let capture = u32::from(self.capture);
        loader
            .override_global("SECPATH", &self.layout, true)
            .override_global("CAPTURE_ON", &capture, true)
            .map_max_entries("PEERS_V4", self.sizes.peers)
            .map_max_entries("PEERS_V6", self.sizes.peers)
            .map_max_entries("PEER_STATS", self.sizes.peers)
            .map_max_entries("ICMP_STATS", self.sizes.peers)
            .map_max_entries("SCTP_STATS", self.sizes.peers)
            .map_max_entries("SA_TRUST", self.sizes.sa_trust)
            .map_max_entries("MAPPINGS", slots)
            .map_max_entries("HELD", slots);
        if let Some(dir) = pins {
            for name in pin::PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        loader.load(self.object)
    }

    /// Loads the programs of the object whose maps exist, and splits the shared maps by
    /// consumer.
    fn finish(&self, mut bpf: Ebpf, pinned: bool) -> Result<Verifier, EbpfFailure> {
        let name = self.variant.program();
        program(&mut bpf, name)?.load().map_err(|cause| {
            tracing::debug!(error = %cause, "the kernel refused the verifier program");
            EbpfFailure::ProgramLoad {
                program: name,
                cause,
            }
        })?;
        load_tail_call(&mut bpf, PROGRAM_HOLD, "JUMP")?;
        if self.variant == Variant::BpfLoop {
            load_tail_call(&mut bpf, PROGRAM_SCTP, "SCTP_JUMP")?;
        }
        // Objects of earlier builds (benchmarked side by side) have no pairing.
        if bpf.program(PROGRAM_PAIR).is_some() {
            load_tail_call(&mut bpf, PROGRAM_PAIR, "PAIR_JUMP")?;
        }
        let peer_stats = take_map(&mut bpf, "PEER_STATS")?;
        let icmp_stats = take_map(&mut bpf, "ICMP_STATS")?;
        let sctp_stats = take_map(&mut bpf, "SCTP_STATS")?;
        let stats = Arc::new(Stats {
            counters: typed(take_map(&mut bpf, "COUNTERS")?, "COUNTERS")?,
            peers: typed(duplicate(&peer_stats, "PEER_STATS")?, "PEER_STATS")?,
            icmp: typed(duplicate(&icmp_stats, "ICMP_STATS")?, "ICMP_STATS")?,
            sctp: typed(duplicate(&sctp_stats, "SCTP_STATS")?, "SCTP_STATS")?,
            trust: typed(take_map(&mut bpf, "TRUST_COUNTERS")?, "TRUST_COUNTERS")?,
            pairs: bpf
                .take_map("PAIR_STATS")
                .map(|m| typed(m, "PAIR_STATS"))
                .transpose()?,
        });
        let maps = PeerMaps {
            v4: typed(take_map(&mut bpf, "PEERS_V4")?, "PEERS_V4")?,
            v6: typed(take_map(&mut bpf, "PEERS_V6")?, "PEERS_V6")?,
            stats: typed(peer_stats, "PEER_STATS")?,
            icmp: typed(icmp_stats, "ICMP_STATS")?,
            sctp: typed(sctp_stats, "SCTP_STATS")?,
            residuals: typed(take_map(&mut bpf, "SA_TRUST")?, "SA_TRUST")?,
            mappings: typed(take_map(&mut bpf, "MAPPINGS")?, "MAPPINGS")?,
            tunnels: typed(take_map(&mut bpf, "TUNNELS")?, "TUNNELS")?,
            tunnel_count: typed(take_map(&mut bpf, "TUNNEL_COUNT")?, "TUNNEL_COUNT")?,
            capacity: self.sizes.peers,
        };
        Ok(Verifier {
            bpf,
            variant: self.variant,
            sizes: self.sizes,
            attached_to: None,
            link: None,
            pinned,
            maps: Some(maps),
            stats,
        })
    }
}

/// Loads the program `name` and puts it in the one slot of the program array `jump` (`JUMP`,
/// `SCTP_JUMP`), where the verifier tail-calls it. The array stays in `bpf` (and, pinned, in
/// bpffs): the kernel empties a program array when its last descriptor and pin go.
fn load_tail_call(
    bpf: &mut Ebpf,
    name: &'static str,
    jump: &'static str,
) -> Result<(), EbpfFailure> {
    let hold = program(bpf, name)?;
    let refused = |cause| {
        tracing::debug!(error = %cause, program = name, "the kernel refused a tail-called program");
        EbpfFailure::ProgramLoad {
            program: name,
            cause,
        }
    };
    hold.load().map_err(refused)?;
    let fd = hold
        .fd()
        .map_err(refused)?
        .try_clone()
        .map_err(|e| EbpfFailure::Map {
            what: format!("duplicating the descriptor of {name}"),
            source: MapError::IoError(e),
        })?;
    let map = bpf.map_mut(jump).ok_or(EbpfFailure::Missing {
        kind: "map",
        name: jump,
    })?;
    let mut array = ProgramArray::try_from(map).map_err(|source| EbpfFailure::Map {
        what: format!("opening {jump}"),
        source,
    })?;
    array.set(0, &fd, 0).map_err(|source| EbpfFailure::Map {
        what: format!("putting {name} in {jump}"),
        source,
    })
}

/// Kernels before 5.11 (Debian 11's 5.10 among them) charge BPF maps to `RLIMIT_MEMLOCK`, whose
/// usual 64 KiB or 8 MiB would refuse the ring buffers; later ones charge the memory cgroup and
/// ignore it. Failure is not fatal here: the load that follows reports EPERM with a hint.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) };
    if ret != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

#[cfg(test)]
mod tests {
    use super::MapSizes;

    #[test]
    fn the_map_memory_floor_counts_per_cpu_counters_and_preallocated_lru_slots() {
        // PEER_STATS, ICMP_STATS and SCTP_STATS: 65536 x (80 + 40 + 32) B x 2 CPUs; SA_TRUST:
        // 131072 x (48 B key + 80 B); MAPPINGS and HELD: 131072 x (48 + 16) and 131072 x
        // (48 + 64).
        let sizes = MapSizes::for_peers(65536);
        assert_eq!(sizes.memory_floor(2), (19 + 38) << 20);
        assert_eq!(
            sizes.memory_floor(128) - sizes.memory_floor(2),
            65536 * 152 * 126
        );
        assert_eq!(
            MapSizes::for_peers(16384).memory_floor(1),
            16384 * 152 + 32768 * (128 + 64 + 112)
        );
    }
}
