//! Loading, attaching and reading the in-kernel verifier.
//!
//! All-or-nothing: a `Verifier` owns the loaded object and its cgroup link. The link is a
//! `bpf_link` (kernel 5.7+), so dropping the `Verifier`, or the process dying for any reason,
//! detaches the program; nothing is left half-attached. The exception is a pinned verifier
//! (`load_pinned`, `attach_pinned`): its link and maps live in bpffs and outlive the process on
//! purpose, so that the next daemon adopts them (`crate::pin`).

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, ProgramArray,
        RingBuf, lpm_trie::Key,
    },
    programs::{CgroupSkb, ProgramError},
};
use ipnet::IpNet;
use monitor_ebpf::{
    COUNTER_SLOTS, Counter, IcmpCounters, MappingOwner, PairKey, PeerCounters, PeerKeyV4,
    PeerKeyV6, PeerStats, PeerValue, SaKey, SaTrust, SctpCounters, TRUST_LEARNED, TrustCounter,
    TunnelValue,
};

use crate::{
    peers::PeerTable,
    pin::{self, Link},
    scope::Scope,
};

/// The verifier object, built by build.rs from `monitor-ebpf`.
pub static VERIFIER_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/natt-verifier"));

/// Test and benchmark programs (the NAT-T injector). Not used by the daemon.
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

pub use crate::features::Variant;

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

const PRIVILEGE_HINT: &str = " (natt-monitor needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, or root; see `natt-monitor check`)";

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

/// Global verifier counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by `Counter as usize`.
    pub slots: [u64; COUNTER_SLOTS as usize],
}

impl Counters {
    /// One counter.
    #[must_use]
    pub const fn get(&self, c: Counter) -> u64 {
        self.slots[c as usize]
    }
}

/// The loaded (and possibly attached) verifier: its programs, its cgroup link and the ring
/// buffers until their tasks take them. The maps it shares with userspace are split by who uses
/// them: `PeerMaps` (written by one owner) and `Stats` (read by scrapes).
pub struct Verifier {
    bpf: Ebpf,
    variant: Variant,
    attached_to: Option<PathBuf>,
    link: Option<Link>,
    pinned: bool,
    maps: Option<PeerMaps>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("variant", &self.variant)
            .field("attached_to", &self.attached_to)
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
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

/// How `attach_pinned` put the program in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// No link was pinned: a new one, now pinned.
    New,
    /// The pinned link now runs this program instead of `old_prog_id`, swapped atomically.
    Replaced {
        /// The program it ran before.
        old_prog_id: u32,
    },
    /// The pinned link was detached, or attached to another cgroup: a new link took its place
    /// (attached before the old one was detached).
    Relinked {
        /// Whether the old link was still attached (elsewhere).
        was_attached: bool,
    },
}

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

/// An object loaded, with its maps pinned in `pins` when given.
fn load_maps(
    object: &[u8],
    layout: &monitor_ebpf::SecpathLayout,
    capture: u32,
    pins: Option<&Path>,
    sizes: MapSizes,
) -> Result<Ebpf, EbpfError> {
    let mut loader = EbpfLoader::new();
    let slots = monitor_ebpf::sa_residual_slots(sizes.peers);
    loader
        .override_global("SECPATH", layout, true)
        .override_global("CAPTURE_ON", &capture, true)
        .map_max_entries("PEERS_V4", sizes.peers)
        .map_max_entries("PEERS_V6", sizes.peers)
        .map_max_entries("PEER_STATS", sizes.peers)
        .map_max_entries("ICMP_STATS", sizes.peers)
        .map_max_entries("SCTP_STATS", sizes.peers)
        .map_max_entries("SA_TRUST", sizes.sa_trust)
        .map_max_entries("MAPPINGS", slots)
        .map_max_entries("HELD", slots);
    if let Some(dir) = pins {
        for name in pin::PINNED_MAPS {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    loader.load(object)
}

impl Verifier {
    /// Loads the object and the program into the kernel (not attached yet), scoped by `scope`.
    ///
    /// # Errors
    /// `EbpfFailure` naming the step that failed, with a privilege hint on EPERM.
    pub fn load(scope: &Scope) -> Result<Self, EbpfFailure> {
        Self::load_with(scope, false)
    }

    /// As `load`; with `capture`, every mismatching packet is also copied into the capture ring
    /// buffer (`take_capture`).
    ///
    /// # Errors
    /// As `load`.
    pub fn load_with(scope: &Scope, capture: bool) -> Result<Self, EbpfFailure> {
        Self::load_variant(scope, capture, None)
    }

    /// As `load_with`, with the program variant forced (`Some`, for tests that prove both give
    /// the same results) or probed (`None`).
    ///
    /// # Errors
    /// As `load`.
    pub fn load_variant(
        scope: &Scope,
        capture: bool,
        variant: Option<Variant>,
    ) -> Result<Self, EbpfFailure> {
        Self::load_sized(
            scope,
            capture,
            variant,
            MapSizes::for_peers(monitor_ebpf::MAX_PEERS),
        )
    }

    /// As `load_variant`, with maps of `sizes` (`--max-peers`).
    ///
    /// # Errors
    /// As `load`.
    pub fn load_sized(
        scope: &Scope,
        capture: bool,
        variant: Option<Variant>,
        sizes: MapSizes,
    ) -> Result<Self, EbpfFailure> {
        if VERIFIER_OBJ.is_empty() {
            return Err(EbpfFailure::NoObject);
        }
        raise_memlock_limit();
        let bpf = load_maps(
            VERIFIER_OBJ,
            &scope.layout(),
            u32::from(capture),
            None,
            sizes,
        )
        .map_err(|source| EbpfFailure::Object { source })?;
        Self::finish_load(bpf, variant)
    }

    /// As `load_sized`, with the stateful maps (`pin::PINNED_MAPS`) pinned in `dir`: opened
    /// when they are there (adopted), created and pinned when not, and replaced when they do not
    /// fit this build or this size. Attach with `attach_pinned`.
    ///
    /// # Errors
    /// As `load`, and `EbpfFailure::Pin` when an unfit pin cannot be removed.
    pub fn load_pinned(
        scope: &Scope,
        capture: bool,
        variant: Option<Variant>,
        dir: &Path,
        sizes: MapSizes,
    ) -> Result<(Self, PinnedMaps), EbpfFailure> {
        if VERIFIER_OBJ.is_empty() {
            return Err(EbpfFailure::NoObject);
        }
        raise_memlock_limit();
        let layout = scope.layout();
        let capture = u32::from(capture);
        let existing = pin::pinned_maps(dir);
        let (bpf, origin) = match load_maps(VERIFIER_OBJ, &layout, capture, Some(dir), sizes) {
            Ok(bpf) if existing.is_empty() => (bpf, PinnedMaps::Created),
            Ok(bpf) => (bpf, PinnedMaps::Adopted),
            Err(pinned) if !existing.is_empty() => {
                // Does the object load without the pins? Then the pins are what did not fit.
                drop(
                    load_maps(VERIFIER_OBJ, &layout, capture, None, sizes)
                        .map_err(|source| EbpfFailure::Object { source })?,
                );
                let why = pinned.to_string();
                for name in existing {
                    let path = dir.join(name);
                    std::fs::remove_file(&path).map_err(|source| EbpfFailure::Pin {
                        what: "removing a pinned map that does not fit this build",
                        path,
                        source,
                    })?;
                }
                let bpf = load_maps(VERIFIER_OBJ, &layout, capture, Some(dir), sizes)
                    .map_err(|source| EbpfFailure::Object { source })?;
                (bpf, PinnedMaps::Replaced(why))
            }
            Err(source) => return Err(EbpfFailure::Object { source }),
        };
        let mut verifier = Self::finish_load(bpf, variant)?;
        verifier.pinned = true;
        Ok((verifier, origin))
    }

    /// As `load_variant`, from another build's verifier object with the same map ABI (the
    /// benchmarks compare the current program against an earlier revision's side by side).
    ///
    /// # Errors
    /// As `load`.
    pub fn load_object(
        object: &[u8],
        scope: &Scope,
        capture: bool,
        variant: Option<Variant>,
    ) -> Result<Self, EbpfFailure> {
        raise_memlock_limit();
        let bpf = load_maps(
            object,
            &scope.layout(),
            u32::from(capture),
            None,
            MapSizes::for_peers(monitor_ebpf::MAX_PEERS),
        )
        .map_err(|source| EbpfFailure::Object { source })?;
        Self::finish_load(bpf, variant)
    }

    /// Loads the program of the object whose maps exist, and takes the shared maps.
    fn finish_load(mut bpf: Ebpf, variant: Option<Variant>) -> Result<Self, EbpfFailure> {
        let variant = variant.unwrap_or_else(|| crate::features::Features::probe().variant());
        let name = variant.program();
        program(&mut bpf, name)?.load().map_err(|cause| {
            tracing::debug!(error = %cause, "the kernel refused the verifier program");
            EbpfFailure::ProgramLoad {
                program: name,
                cause,
            }
        })?;
        load_tail_call(&mut bpf, PROGRAM_HOLD, "JUMP")?;
        if variant == Variant::BpfLoop {
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
        };
        Ok(Self {
            bpf,
            variant,
            attached_to: None,
            link: None,
            pinned: false,
            maps: Some(maps),
            stats,
        })
    }

    /// Which program variant is loaded.
    #[must_use]
    pub const fn variant(&self) -> Variant {
        self.variant
    }

    /// The `cgroup_skb` program, e.g. for `BPF_PROG_TEST_RUN`.
    ///
    /// # Errors
    /// `EbpfFailure::Missing` if the object lacks it.
    pub fn program_mut(&mut self) -> Result<&mut CgroupSkb, EbpfFailure> {
        program(&mut self.bpf, self.variant.program())
    }

    /// One of the object's loaded programs by name (`PROGRAM_HOLD`, `PROGRAM_SCTP`), for its
    /// info.
    ///
    /// # Errors
    /// `EbpfFailure::Missing` if the object has no such program.
    pub fn program_named(&mut self, name: &'static str) -> Result<&mut CgroupSkb, EbpfFailure> {
        program(&mut self.bpf, name)
    }

    /// Attaches to `cgroup` (a cgroup v2 directory) at ingress. The link goes with the
    /// `Verifier`.
    ///
    /// # Errors
    /// `OpenCgroup`, `NotCgroup2` or `Attach`.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), EbpfFailure> {
        let file = open_cgroup(cgroup)?;
        let link = self.new_link(&file, cgroup)?;
        self.link = Some(link);
        self.attached_to = Some(cgroup.to_owned());
        Ok(())
    }

    /// A new link of this program at `file`'s ingress. Through `bpf_link` the kernel attaches
    /// in multi-program mode, so the verifier coexists with other programs there.
    fn new_link(&mut self, file: &File, cgroup: &Path) -> Result<Link, EbpfFailure> {
        let name = self.variant.program();
        let fd = self.loaded_fd()?;
        Link::attach_ingress(fd.as_fd(), file.as_fd()).map_err(|source| EbpfFailure::Attach {
            program: name,
            path: cgroup.to_owned(),
            source,
        })
    }

    /// Attaches to `cgroup` at ingress through the link pinned in `dir`, and pins it there if
    /// none is. A pinned link attached to this cgroup is kept and made to run this program
    /// (`BPF_LINK_UPDATE`): no segment passes unverified between the old program and this one.
    ///
    /// # Errors
    /// As `attach`, and `Pin` when the pinned link cannot be read, updated or replaced.
    pub fn attach_pinned(&mut self, cgroup: &Path, dir: &Path) -> Result<Attached, EbpfFailure> {
        let file = open_cgroup(cgroup)?;
        let want = pin::cgroup_id(&file).map_err(|source| EbpfFailure::OpenCgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let path = dir.join(pin::LINK_FILE);
        let pin_err = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| EbpfFailure::Pin { what, path, source }
        };
        let (link, how) = match Link::open(&path) {
            Ok(old) => {
                let info = old
                    .info()
                    .map_err(pin_err("reading the pinned link", &path))?;
                if info.attached() && info.cgroup_id == want && info.cgroup_ingress {
                    old.update(self.loaded_fd()?.as_fd())
                        .map_err(pin_err("replacing the pinned link's program", &path))?;
                    (
                        old,
                        Attached::Replaced {
                            old_prog_id: info.prog_id,
                        },
                    )
                } else {
                    // The new link first, so the cgroup is never without a verifier.
                    let new = self.new_link(&file, cgroup)?;
                    if info.attached() {
                        old.detach()
                            .map_err(pin_err("detaching the pinned link", &path))?;
                    }
                    std::fs::remove_file(&path)
                        .map_err(pin_err("removing the old link's pin", &path))?;
                    new.pin(&path).map_err(pin_err("pinning the link", &path))?;
                    (
                        new,
                        Attached::Relinked {
                            was_attached: info.attached(),
                        },
                    )
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let new = self.new_link(&file, cgroup)?;
                new.pin(&path).map_err(pin_err("pinning the link", &path))?;
                (new, Attached::New)
            }
            Err(source) => {
                return Err(EbpfFailure::Pin {
                    what: "opening the pinned link",
                    path,
                    source,
                });
            }
        };
        self.link = Some(link);
        self.attached_to = Some(cgroup.to_owned());
        self.pinned = true;
        Ok(how)
    }

    /// The loaded program's descriptor.
    fn loaded_fd(&mut self) -> Result<&aya::programs::ProgramFd, EbpfFailure> {
        let name = self.variant.program();
        program(&mut self.bpf, name)?
            .fd()
            .map_err(|cause| EbpfFailure::ProgramLoad {
                program: name,
                cause,
            })
    }

    /// A descriptor of the loaded program, e.g. for its run statistics.
    ///
    /// # Errors
    /// `ProgramLoad` if it is not loaded, `Descriptor` if it cannot be duplicated.
    pub fn program_fd(&mut self) -> Result<aya::programs::ProgramFd, EbpfFailure> {
        self.loaded_fd()?
            .try_clone()
            .map_err(|source| EbpfFailure::Descriptor {
                what: "duplicating the program's descriptor",
                source,
            })
    }

    /// True when the link and maps are pinned and the link still attaches the program: they
    /// outlive this `Verifier` and the process.
    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.pinned
            && self
                .link
                .as_ref()
                .is_some_and(|l| l.info().is_ok_and(|i| i.attached()))
    }

    /// A second descriptor of the link, for a task that watches it stays attached.
    ///
    /// # Errors
    /// `Descriptor` when the descriptor cannot be duplicated; `Missing` when not attached.
    pub fn link_handle(&self) -> Result<Link, EbpfFailure> {
        let link = self.link.as_ref().ok_or(EbpfFailure::Missing {
            kind: "link",
            name: "cgroup ingress",
        })?;
        link.try_clone().map_err(|source| EbpfFailure::Descriptor {
            what: "duplicating the link's descriptor",
            source,
        })
    }

    /// Detaches the program (it stays loaded); returns whether it was attached. A pinned link
    /// is left in place (closing this descriptor does not detach it): `pin::detach` removes it.
    pub fn detach(&mut self) -> bool {
        let Some(link) = self.link.take() else {
            return false;
        };
        self.attached_to = None;
        if self.pinned {
            return false;
        }
        // Closing the only descriptor of an unpinned link detaches it.
        drop(link);
        true
    }

    /// Where the program is attached, if it is.
    #[must_use]
    pub fn attached_to(&self) -> Option<&Path> {
        self.attached_to.as_deref()
    }

    /// The maps that say what to verify, for callers that keep the verifier (tests, benches).
    ///
    /// # Errors
    /// `EbpfFailure::Missing` once `take_peer_maps` has taken them.
    pub fn peer_maps(&mut self) -> Result<&mut PeerMaps, EbpfFailure> {
        self.maps.as_mut().ok_or(EbpfFailure::Missing {
            kind: "map",
            name: "PEERS_V4",
        })
    }

    /// Takes the maps that say what to verify (once), for the one task that writes them.
    ///
    /// # Errors
    /// `EbpfFailure::Missing` if they were taken already.
    pub fn take_peer_maps(&mut self) -> Result<PeerMaps, EbpfFailure> {
        self.maps.take().ok_or(EbpfFailure::Missing {
            kind: "map",
            name: "PEERS_V4",
        })
    }

    /// The statistics maps, for readers (scrapes) that run alongside the writer.
    #[must_use]
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Takes the mismatch event ring buffer (once) for a drain task to own.
    ///
    /// # Errors
    /// `EbpfFailure::Missing` if it was taken already.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, EbpfFailure> {
        typed(take_map(&mut self.bpf, "EVENTS")?, "EVENTS")
    }

    /// Takes the learning-sample ring buffer (once) for a drain task to own.
    ///
    /// # Errors
    /// `EbpfFailure::Missing` if it was taken already.
    pub fn take_learning(&mut self) -> Result<RingBuf<MapData>, EbpfFailure> {
        typed(take_map(&mut self.bpf, "LEARNING")?, "LEARNING")
    }

    /// Takes the capture ring buffer (once) for the capture task to own.
    ///
    /// # Errors
    /// `EbpfFailure::Missing` if it was taken already.
    pub fn take_capture(&mut self) -> Result<RingBuf<MapData>, EbpfFailure> {
        typed(take_map(&mut self.bpf, "CAPTURE")?, "CAPTURE")
    }

    /// Takes the map of dropped TCP segments waiting for their retransmission (once), for the
    /// capture task to forget the stale ones.
    ///
    /// # Errors
    /// `EbpfFailure::Missing` if it was taken already.
    pub fn take_pairs(&mut self) -> Result<HashMap<MapData, PairKey, u64>, EbpfFailure> {
        typed(take_map(&mut self.bpf, "PAIRS")?, "PAIRS")
    }

    /// Takes the one-slot array holding the last drop's time plus the pairing window (0 before
    /// the first drop), once, for the capture task to sweep `PAIRS` only while it may hold
    /// entries.
    ///
    /// # Errors
    /// `EbpfFailure::Missing` if it was taken already.
    pub fn take_pair_deadline(&mut self) -> Result<Array<MapData, u64>, EbpfFailure> {
        typed(take_map(&mut self.bpf, "PAIR_DEADLINE")?, "PAIR_DEADLINE")
    }

    /// The loaded object, for bridging aya-log.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.bpf
    }
}

/// The maps that say which segments to verify and against what: the peer tries, the learned
/// residuals, and the per-peer statistics (reset when an id changes hands). One writer owns
/// them; in the daemon that is the SA/peer state task.
pub struct PeerMaps {
    v4: LpmTrie<MapData, PeerKeyV4, PeerValue>,
    v6: LpmTrie<MapData, PeerKeyV6, PeerValue>,
    stats: PerCpuArray<MapData, PeerCounters>,
    icmp: PerCpuArray<MapData, IcmpCounters>,
    sctp: PerCpuArray<MapData, SctpCounters>,
    residuals: HashMap<MapData, SaKey, SaTrust>,
    mappings: HashMap<MapData, SaKey, MappingOwner>,
    tunnels: HashMap<MapData, u32, TunnelValue>,
    tunnel_count: Array<MapData, u32>,
}

impl std::fmt::Debug for PeerMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerMaps").finish_non_exhaustive()
    }
}

impl PeerMaps {
    /// Makes the peer maps hold `to` instead of `from` (what they held), in an order that keeps
    /// every count with its prefix: first the prefixes no longer configured leave the tries
    /// (their segments stop counting), then the statistics of ids that now belong to another
    /// prefix are reset, then every peer is inserted or updated. Peers that stay are never
    /// absent from the maps and keep their counts.
    ///
    /// # Errors
    /// `EbpfFailure::Map` naming the step.
    pub fn set_peers(&mut self, from: &PeerTable, to: &PeerTable) -> Result<(), EbpfFailure> {
        let mut want_v4 = Vec::new();
        let mut want_v6 = Vec::new();
        for (id, spec) in to.iter() {
            let value = to.value(id, spec);
            match spec.net {
                IpNet::V4(n) => want_v4.push((
                    Key::new(u32::from(n.prefix_len()), n.network().octets()),
                    value,
                )),
                IpNet::V6(n) => want_v6.push((
                    Key::new(u32::from(n.prefix_len()), n.network().octets()),
                    value,
                )),
            }
        }
        remove_stale(&mut self.v4, "PEERS_V4", &want_v4)?;
        remove_stale(&mut self.v6, "PEERS_V6", &want_v6)?;
        let reused: Vec<u32> = to
            .iter()
            .filter(|(id, spec)| from.get(*id).is_none_or(|old| old.net != spec.net))
            .map(|(id, _)| id)
            .collect();
        self.reset_stats(&reused)?;
        insert_all(&mut self.v4, "PEERS_V4", &want_v4)?;
        insert_all(&mut self.v6, "PEERS_V6", &want_v6)
    }

    /// Makes `TUNNELS` hold exactly `want` (ifindex, its namespace and the peer its inner
    /// segments count under): stale devices leave first, then every wanted one is inserted or updated, then
    /// `TUNNEL_COUNT` says how many there are (the verifier looks `TUNNELS` up only while it is
    /// not 0).
    ///
    /// # Errors
    /// `EbpfFailure::Map` naming the step.
    pub fn set_tunnels(&mut self, want: &[(u32, TunnelValue)]) -> Result<(), EbpfFailure> {
        let map = |what: String| move |source| EbpfFailure::Map { what, source };
        let stale: Vec<u32> = self
            .tunnels
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.iter().any(|(w, _)| w == k))
            .collect();
        for ifindex in stale {
            self.tunnels.remove(&ifindex).map_err(map(format!(
                "removing tunnel device {ifindex} from TUNNELS"
            )))?;
        }
        for (ifindex, value) in want {
            self.tunnels
                .insert(ifindex, value, 0)
                .map_err(map(format!("adding tunnel device {ifindex} to TUNNELS")))?;
        }
        let n = u32::try_from(want.len()).unwrap_or(u32::MAX);
        self.tunnel_count
            .set(0, &n, 0)
            .map_err(map("setting TUNNEL_COUNT".to_owned()))
    }

    fn reset_stats(&mut self, ids: &[u32]) -> Result<(), EbpfFailure> {
        if ids.is_empty() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| EbpfFailure::Map {
            what: "counting possible CPUs".into(),
            source: MapError::IoError(e),
        })?;
        let cpus = cpus.get() as usize;
        for &id in ids {
            let zeroed = |what: &str, e| EbpfFailure::Map {
                what: format!("zeroing {what}[{id}]"),
                source: MapError::IoError(e),
            };
            let reset = |what: &str, source| EbpfFailure::Map {
                what: format!("resetting {what}[{id}]"),
                source,
            };
            let zeros = PerCpuValues::try_from(vec![PeerCounters::default(); cpus])
                .map_err(|e| zeroed("PEER_STATS", e))?;
            self.stats
                .set(id, zeros, 0)
                .map_err(|e| reset("PEER_STATS", e))?;
            let zeros = PerCpuValues::try_from(vec![IcmpCounters::default(); cpus])
                .map_err(|e| zeroed("ICMP_STATS", e))?;
            self.icmp
                .set(id, zeros, 0)
                .map_err(|e| reset("ICMP_STATS", e))?;
            let zeros = PerCpuValues::try_from(vec![SctpCounters::default(); cpus])
                .map_err(|e| zeroed("SCTP_STATS", e))?;
            self.sctp
                .set(id, zeros, 0)
                .map_err(|e| reset("SCTP_STATS", e))?;
        }
        Ok(())
    }

    /// What the maps hold, for a daemon that adopts pinned ones: every peer prefix with its map
    /// value, and every installed residual.
    ///
    /// # Errors
    /// `EbpfFailure::Map` when a map cannot be read.
    pub fn contents(&self) -> Result<MapContents, EbpfFailure> {
        let mut peers = Vec::new();
        trie_contents(&self.v4, "PEERS_V4", &mut peers, |a, len| {
            ipnet::Ipv4Net::new(a.into(), len).ok().map(IpNet::V4)
        })?;
        trie_contents(&self.v6, "PEERS_V6", &mut peers, |a, len| {
            ipnet::Ipv6Net::new(a.into(), len).ok().map(IpNet::V6)
        })?;
        let mut residuals = Vec::new();
        for entry in &self.residuals {
            let (k, v) = entry.map_err(|source| EbpfFailure::Map {
                what: "reading the pinned SA_TRUST".into(),
                source,
            })?;
            residuals.push((k, v.state, v.expected_residual));
        }
        Ok(MapContents { peers, residuals })
    }

    /// Installs the residual that intact segments of SA `key` (whose `xfrm_state` is at `state`,
    /// 0 under address scope) leave: from its next segment on, they are verified against it. The
    /// SA also becomes its NAT mapping's owner, whose residual a rekey takes over while the SA
    /// lives.
    ///
    /// # Errors
    /// `EbpfFailure::Map`, e.g. when the map is full.
    pub fn set_sa_residual(
        &mut self,
        key: SaKey,
        state: u64,
        residual: u16,
    ) -> Result<(), EbpfFailure> {
        let what = |map: &str| {
            format!(
                "installing a residual for peer #{} (SPI {:#010x}, encapsulation ports {}/{}) in {map}",
                key.peer_id,
                u32::from_be(key.spi),
                u16::from_be(key.encap_sport),
                u16::from_be(key.encap_dport)
            )
        };
        let value = SaTrust {
            state,
            expected_residual: residual,
            origin: TRUST_LEARNED,
            ..SaTrust::default()
        };
        self.residuals
            .insert(&key.trust_key(), &value, 0)
            .map_err(|source| EbpfFailure::Map {
                what: what("SA_TRUST"),
                source,
            })?;
        if state == 0 {
            return Ok(());
        }
        let owner = MappingOwner {
            state,
            spi: key.spi,
            expected_residual: residual,
            pad: 0,
        };
        self.mappings
            .insert(&key.mapping(), &owner, 0)
            .map_err(|source| EbpfFailure::Map {
                what: what("MAPPINGS"),
                source,
            })
    }

    /// The entry SA `key` has in the map now, as (address of its `xfrm_state`, residual): the
    /// verifier may have inherited, withdrawn or, LRU, forgotten one since the daemon last heard.
    /// One the LRU forgot while the SA's NAT mapping still names it counts as there: the
    /// verifier restores it from `MAPPINGS` at the SA's next segment.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if a map cannot be read.
    pub fn sa_residual(&self, key: &SaKey) -> Result<Option<(u64, u16)>, EbpfFailure> {
        match self.residuals.get(&key.trust_key(), 0) {
            Ok(v) => return Ok(Some((v.state, v.expected_residual))),
            Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(EbpfFailure::Map {
                    what: "reading SA_TRUST".into(),
                    source,
                });
            }
        }
        match self.mappings.get(&key.mapping(), 0) {
            Ok(o) if o.spi == key.spi && o.state != 0 => Ok(Some((o.state, o.expected_residual))),
            Ok(_) | Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(EbpfFailure::Map {
                what: "reading MAPPINGS".into(),
                source,
            }),
        }
    }

    /// Removes the residuals of every key `stale` selects, among `SA_TRUST`'s keys (without
    /// encapsulation ports, `SaKey::trust_key`) and `MAPPINGS`' (without SPI,
    /// `SaKey::mapping`); returns how many residuals went.
    ///
    /// # Errors
    /// `EbpfFailure::Map`.
    pub fn remove_sa_residuals(
        &mut self,
        stale: impl Fn(&SaKey) -> bool,
    ) -> Result<usize, EbpfFailure> {
        let removed = remove_keys(
            &mut self.residuals,
            &stale,
            "removing a residual from SA_TRUST",
        )?;
        remove_keys(
            &mut self.mappings,
            &stale,
            "removing a NAT mapping from MAPPINGS",
        )?;
        Ok(removed)
    }
}

/// Removes every key of `map` that `stale` selects; returns how many went.
fn remove_keys<V: aya::Pod>(
    map: &mut HashMap<MapData, SaKey, V>,
    stale: &impl Fn(&SaKey) -> bool,
    what: &'static str,
) -> Result<usize, EbpfFailure> {
    let keys: Vec<SaKey> = map.keys().filter_map(Result::ok).filter(stale).collect();
    for k in &keys {
        map.remove(k).map_err(|source| EbpfFailure::Map {
            what: what.into(),
            source,
        })?;
    }
    Ok(keys.len())
}

/// What pinned maps held when a daemon adopted them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// Every peer prefix with its map value (id, mode, flags, residual).
    pub peers: Vec<(IpNet, PeerValue)>,
    /// Every installed residual (keyed as in `SA_TRUST`: `SaKey::trust_key`), with the address
    /// of its SA's `xfrm_state`.
    pub residuals: Vec<(SaKey, u64, u16)>,
}

/// Read handles on the verifier's statistics: the global counters and the per-peer arrays
/// (second descriptors of the maps `PeerMaps` resets). Reads are plain syscalls and take no lock,
/// so a scrape never waits for a map update.
pub struct Stats {
    counters: PerCpuArray<MapData, u64>,
    peers: PerCpuArray<MapData, PeerCounters>,
    icmp: PerCpuArray<MapData, IcmpCounters>,
    sctp: PerCpuArray<MapData, SctpCounters>,
    trust: PerCpuArray<MapData, u64>,
    /// `PAIR_STATS`; `None` in objects of earlier builds (benchmarked side by side).
    pairs: Option<PerCpuArray<MapData, u64>>,
}

/// Slot `index` of the per-CPU counter array `map` (named `name` in errors), summed over CPUs.
fn slot_sum(map: &PerCpuArray<MapData, u64>, index: u32, name: &str) -> Result<u64, EbpfFailure> {
    let values = map.get(&index, 0).map_err(|source| EbpfFailure::Map {
        what: format!("reading {name}[{index}]"),
        source,
    })?;
    Ok(values.iter().sum())
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

impl Stats {
    /// Global counters summed over CPUs.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if the map cannot be read.
    pub fn counters(&self) -> Result<Counters, EbpfFailure> {
        let mut out = Counters::default();
        for (i, slot) in out.slots.iter_mut().enumerate() {
            let values = self
                .counters
                .get(&(i as u32), 0)
                .map_err(|source| EbpfFailure::Map {
                    what: format!("reading COUNTERS[{i}]"),
                    source,
                })?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// What happened to residuals (`TrustCounter`), summed over CPUs.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if the map cannot be read.
    pub fn trust(&self, c: TrustCounter) -> Result<u64, EbpfFailure> {
        slot_sum(&self.trust, c as u32, "TRUST_COUNTERS")
    }

    /// A pairing counter (`PairSlot`), summed over CPUs; 0 for an object without pairing.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if the map cannot be read.
    pub fn pairing(&self, slot: monitor_ebpf::PairSlot) -> Result<u64, EbpfFailure> {
        self.pairs
            .as_ref()
            .map_or(Ok(0), |pairs| slot_sum(pairs, slot as u32, "PAIR_STATS"))
    }

    /// Statistics of peer `id` for every protocol, summed over CPUs.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if a map cannot be read.
    pub fn peer_stats(&self, id: u32) -> Result<PeerStats, EbpfFailure> {
        let read = |what: &str, source| EbpfFailure::Map {
            what: format!("reading {what}[{id}]"),
            source,
        };
        let l4 = self.peers.get(&id, 0).map_err(|e| read("PEER_STATS", e))?;
        let icmp = self.icmp.get(&id, 0).map_err(|e| read("ICMP_STATS", e))?;
        let sctp = self.sctp.get(&id, 0).map_err(|e| read("SCTP_STATS", e))?;
        let stats = l4.iter().fold(PeerStats::default(), PeerStats::with_l4);
        let stats = icmp.iter().fold(stats, PeerStats::with_icmp);
        Ok(sctp.iter().fold(stats, PeerStats::with_sctp))
    }
}

/// Opens a cgroup v2 directory.
fn open_cgroup(cgroup: &Path) -> Result<File, EbpfFailure> {
    let file = File::open(cgroup).map_err(|source| EbpfFailure::OpenCgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    if !crate::cgroup::is_cgroup2(&file) {
        return Err(EbpfFailure::NotCgroup2 {
            path: cgroup.to_owned(),
            mount: crate::cgroup::cgroup2_mount(),
        });
    }
    Ok(file)
}

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

fn program<'a>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSkb, EbpfFailure> {
    bpf.program_mut(name)
        .and_then(|p| <&mut CgroupSkb>::try_from(p).ok())
        .ok_or(EbpfFailure::Missing {
            kind: "program",
            name,
        })
}

/// Appends every prefix of `trie` with its value to `out`; `net` makes an `IpNet` of a key's
/// address and prefix length (`None` for a length out of range).
fn trie_contents<K: aya::Pod>(
    trie: &LpmTrie<MapData, K, PeerValue>,
    name: &'static str,
    out: &mut Vec<(IpNet, PeerValue)>,
    net: impl Fn(K, u8) -> Option<IpNet>,
) -> Result<(), EbpfFailure> {
    for entry in trie {
        let (key, value) = entry.map_err(|source| EbpfFailure::Map {
            what: format!("reading the pinned {name}"),
            source,
        })?;
        let len = key.prefix_len();
        let prefix = u8::try_from(len)
            .ok()
            .and_then(|l| net(key.data(), l))
            .ok_or_else(|| EbpfFailure::Map {
                what: format!("reading the pinned {name}"),
                source: MapError::IoError(io::Error::other(format!(
                    "prefix length {len} out of range"
                ))),
            })?;
        out.push((prefix, value));
    }
    Ok(())
}

/// Removes the prefixes of `trie` that are not in `want`.
fn remove_stale<K: aya::Pod + Eq + std::hash::Hash>(
    trie: &mut LpmTrie<MapData, K, PeerValue>,
    name: &'static str,
    want: &[(Key<K>, PeerValue)],
) -> Result<(), EbpfFailure> {
    let wanted: std::collections::HashSet<(u32, K)> = want
        .iter()
        .map(|(w, _)| (w.prefix_len(), w.data()))
        .collect();
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
        .collect();
    for key in &stale {
        trie.remove(key).map_err(|source| EbpfFailure::Map {
            what: format!("removing a peer from {name}"),
            source,
        })?;
    }
    Ok(())
}

/// Inserts or updates every prefix of `want` in `trie`.
fn insert_all<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, PeerValue>,
    name: &'static str,
    want: &[(Key<K>, PeerValue)],
) -> Result<(), EbpfFailure> {
    for (key, value) in want {
        trie.insert(key, value, 0)
            .map_err(|source| EbpfFailure::Map {
                what: format!("adding a peer to {name}"),
                source,
            })?;
    }
    Ok(())
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
