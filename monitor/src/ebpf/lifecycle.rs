//! The loaded verifier's lifecycle: attaching (plain, or through a pinned link), detaching, and
//! handing its maps and ring buffers to the tasks that own them.

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::CgroupSkb,
};
use monitor_ebpf::PairKey;

use super::{EbpfFailure, MapSizes, PeerMaps, Stats, Variant, program, take_map, typed};
use crate::pin::{self, Link};

/// The loaded (and possibly attached) verifier: its programs, its cgroup link and the ring
/// buffers until their tasks take them. The maps it shares with userspace are split by who uses
/// them: `PeerMaps` (written by one owner) and `Stats` (read by scrapes).
pub struct Verifier {
    pub(super) bpf: Ebpf,
    pub(super) variant: Variant,
    pub(super) sizes: MapSizes,
    pub(super) attached_to: Option<PathBuf>,
    pub(super) link: Option<Link>,
    pub(super) pinned: bool,
    pub(super) maps: Option<PeerMaps>,
    pub(super) stats: Arc<Stats>,
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

impl Verifier {
    /// How many entries the sized maps were made with.
    #[must_use]
    pub const fn map_sizes(&self) -> MapSizes {
        self.sizes
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
