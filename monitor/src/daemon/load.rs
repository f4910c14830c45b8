//! Loading and attaching: the program loaded with its peers installed and its rings open (or
//! nothing, on failure), then attached last; and the map memory check that comes before.

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{info, warn};

use super::{
    discovery,
    error::DaemonError,
    exporter::{KernelReadings, LabelCap},
    forensics::CaptureParts,
    health::Health,
    state::{SaState, View},
    tasks::watch_fd,
};
use crate::{
    capture::Capture,
    check,
    config::Settings,
    ebpf::{Attached, MapContents, PinnedMaps, Stats, Variant, Verifier, VerifierLoader},
    metrics::Metrics,
    peers::PeerSpec,
    scope::Scope,
};

/// Map pins this start created. If the start fails before the program is attached, they are
/// removed when this is dropped, so that a failed start leaves nothing pinned. Pins a start
/// adopted are never removed here: they belong to the verifier that still runs.
pub(super) struct CreatedPins(Option<std::path::PathBuf>);

impl CreatedPins {
    /// The program is attached: the pins stay.
    pub(super) fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for CreatedPins {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take()
            && let Err(e) = crate::pin::detach(&dir)
        {
            warn!(error = %e, "could not remove the maps this failed start pinned");
        }
    }
}

/// The program loaded with its peers installed and its rings open, not attached yet.
pub(super) struct Loaded {
    pub(super) verifier: Verifier,
    pub(super) created: CreatedPins,
    pub(super) sa_state: SaState,
    pub(super) view: watch::Receiver<Arc<View>>,
    pub(super) health: Arc<Health>,
    pub(super) stats: Arc<Stats>,
    pub(super) metrics: Metrics,
    pub(super) events: AsyncFd<RingBuf<MapData>>,
    pub(super) learning: AsyncFd<RingBuf<MapData>>,
    pub(super) capture: CaptureParts,
    pub(super) ebpf_log: AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Loaded {
    /// Puts the tunnel devices discovery found in `TUNNELS`, before anything is attached.
    /// Tunnels need SA scope (a missing `sec_path` is what leads to them) and the `bpf_loop`
    /// variant; elsewhere they are only logged. Returns what was seen, for discovery to follow,
    /// and whether tunnels are verified.
    pub(super) fn install_tunnels(
        &mut self,
        scope: Scope,
        tunnels: crate::tunnels::Tunnels,
    ) -> Result<(discovery::SeenTunnels, bool), DaemonError> {
        let on = matches!(scope, Scope::Sa(_)) && self.verifier.variant() == Variant::BpfLoop;
        let mut seen = discovery::SeenTunnels::new();
        let verified = discovery::tunnels_changed(&mut seen, tunnels, on);
        self.sa_state
            .set_tunnels(verified)
            .map_err(DaemonError::Tunnels)?;
        Ok((seen, on))
    }

    pub(super) fn load(
        settings: &Settings,
        scope: Scope,
        variant: Variant,
        discovered: Vec<PeerSpec>,
    ) -> Result<Self, DaemonError> {
        // The capture ring is always on: it carries what forensics compares. `--capture` only
        // adds the file.
        let mut loader = VerifierLoader::new(&scope, variant);
        loader.capture(true).map_sizes(settings.map_sizes());
        let mut created = CreatedPins(None);
        let (mut verifier, prior) = match &settings.pin {
            Some(dir) => {
                let (mut v, origin) = loader.load_pinned(dir)?;
                let prior = match origin {
                    PinnedMaps::Created => {
                        created = CreatedPins(Some(dir.clone()));
                        MapContents::default()
                    }
                    PinnedMaps::Adopted => {
                        let prior = v.peer_maps()?.contents()?;
                        info!(
                            pin_path = %dir.display(),
                            peers = prior.peers.len(),
                            residuals = prior.residuals.len(),
                            "adopting the pinned maps: counts, peers and learned residuals continue"
                        );
                        prior
                    }
                    PinnedMaps::Replaced(why) => {
                        warn!(pin_path = %dir.display(), reason = %why, "the pinned maps do not fit this build or this --max-peers; replaced them, so the counts start again");
                        MapContents::default()
                    }
                };
                (v, prior)
            }
            None => (loader.load()?, MapContents::default()),
        };
        let (sa_state, view) = SaState::start(
            verifier.take_peer_maps()?,
            scope,
            settings.peers.clone(),
            discovered,
            &prior,
            settings.default_mode,
        )?;
        let health = Arc::new(Health::default());
        let stats = verifier.stats();
        let program = verifier.program_fd()?;
        let metrics = Metrics::new(
            Box::new(KernelReadings {
                stats: Arc::clone(&stats),
                view: view.clone(),
                health: Arc::clone(&health),
                proc_path: settings.proc_path.clone(),
                program,
                labels: std::sync::Mutex::new(LabelCap::new(settings.max_peer_labels)),
            }),
            scope.as_str(),
            verifier.variant().as_str(),
            verifier.map_sizes().peers,
        )?
        .with_process_metrics(!settings.disable_exporter_metrics)?;
        let file = match &settings.capture {
            Some(path) => {
                let file =
                    Capture::create(path, settings.capture_max_bytes, metrics.capture_results())?;
                info!(file = %path.display(), max_bytes = settings.capture_max_bytes, "writing mismatching packets to a pcapng file");
                Some(file)
            }
            None => None,
        };
        let capture = CaptureParts {
            ring: verifier.take_capture()?,
            pairs: verifier.take_pairs()?,
            deadline: verifier.take_pair_deadline()?,
            file,
        };
        let events = watch_fd("mismatch event", verifier.take_events()?)?;
        let learning = watch_fd("learning sample", verifier.take_learning()?)?;
        let ebpf_log = aya_log::EbpfLogger::init(verifier.ebpf_mut())
            .map_err(|e| DaemonError::EbpfLog(e.to_string()))?;
        let ebpf_log = watch_fd("aya-log", ebpf_log)?;
        Ok(Self {
            verifier,
            created,
            sa_state,
            view,
            health,
            stats,
            metrics,
            events,
            learning,
            capture,
            ebpf_log,
        })
    }
}

/// Attaches at the configured cgroup, through the pinned link when pinning (swapping the
/// program behind it if one is there), then drops `CAP_PERFMON`, which only loading needed
/// (`crate::privileges`); returns a descriptor of the link for `link-watch`.
pub(super) fn attach(
    verifier: &mut Verifier,
    settings: &Settings,
) -> Result<crate::pin::Link, DaemonError> {
    match &settings.pin {
        Some(dir) => {
            let how = verifier.attach_pinned(&settings.cgroup, dir)?;
            log_pinned(dir, how);
        }
        None => verifier.attach(&settings.cgroup)?,
    }
    match crate::privileges::drop_capability(crate::privileges::CAP_PERFMON) {
        Ok(true) => info!("dropped CAP_PERFMON: only loading the program needed it"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "could not drop CAP_PERFMON"),
    }
    Ok(verifier.link_handle()?)
}

fn log_pinned(dir: &std::path::Path, how: Attached) {
    let pin_path = dir.display();
    match how {
        Attached::New => {
            info!(%pin_path, "pinned the verifier's link and maps: they outlive this process");
        }
        Attached::Replaced { old_prog_id } => info!(
            %pin_path,
            old_prog_id,
            "adopted the pinned link: its program was replaced by this one in one atomic update, with no segment unverified"
        ),
        Attached::Relinked { was_attached } => warn!(
            %pin_path,
            was_attached,
            "the pinned link did not attach this cgroup; attached a new one in its place"
        ),
    }
}

/// Refuses a start whose maps cannot fit in what the cgroup's `memory.max` leaves free, before
/// anything is loaded: the kernel would fail them, or the cgroup's OOM killer end the daemon,
/// on every restart. Kernels before 5.11 charge map memory to `RLIMIT_MEMLOCK`, which the
/// daemon raises, not to the cgroup.
pub(super) fn check_map_memory(settings: &Settings) -> Result<(), DaemonError> {
    let release = check::kernel_release(&settings.proc_path).unwrap_or_default();
    let mut version = release.split(['.', '-']).map(str::parse::<u32>);
    let (Some(Ok(major)), Some(Ok(minor))) = (version.next(), version.next()) else {
        return Ok(());
    };
    if (major, minor) < (5, 11) {
        return Ok(());
    }
    let Some(limit) = crate::cgroup::memory_limit_in(&settings.proc_path) else {
        return Ok(());
    };
    let Ok(cpus) = aya::util::nr_cpus() else {
        return Ok(());
    };
    let cpus = cpus.get();
    let need = settings.map_sizes().memory_floor(cpus);
    if need > limit.free() {
        return Err(DaemonError::MapMemory {
            max_peers: settings.max_peers,
            need,
            cpus,
            limit,
        });
    }
    Ok(())
}
