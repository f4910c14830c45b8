//! The daemon's start-up order, its supervision and its error type.
//!
//! All or nothing, and fail fast. `run` checks privileges, binds the endpoint, resolves the
//! scope, reads the SAs, loads the program, installs the peers and attaches last, so every
//! failure before that returns an error with nothing attached. Then each concern runs as its
//! own task with narrow handles:
//!
//! | task | module | owns |
//! |---|---|---|
//! | `sa-state` | `state` | the peer table, learned residuals, the peer maps (only writer) |
//! | `event-drain` | `drain` | the mismatch ring, the log budget; feeds health |
//! | `ebpf-log` | `drain` | the aya-log ring |
//! | `capture` | `forensics` | the capture ring, pairing (`crate::forensics`), the pcapng file |
//! | `http` | `crate::http` + `exporter` | the listener; scrapes read the kernel |
//! | `xfrm-discovery` | `discovery` | the XFRM notification socket |
//! | `sighup` | `reload` | the SIGHUP stream |
//! | `link-watch` | `mod` | a descriptor of the link, to notice a detach from outside |
//! | `systemd-notify` | `notify` | `READY=1`, then `WATCHDOG=1` while healthy (under systemd) |
//!
//! Every task is supervised: if one ends while running, with an error or not, `run` returns
//! `DaemonError::TaskDied` naming it and the process exits non-zero. `/healthz` and
//! `natt_monitor_up` are true only while the program is attached and the drain has completed a
//! pass within `HEALTH_MAX_AGE`. There is no zombie mode.
//!
//! With pinning (the default, `--pin-path`) the program, its link and its stateful maps live
//! in bpffs and stay when the daemon exits, for any reason: the cgroup stays verified (and in
//! enforce mode protected), the counts keep accumulating, and the next daemon adopts them
//! without a gap. Nobody serves `natt_monitor_up` meanwhile, so its absence alert fires.
//! `natt-monitor detach` removes them. Without pinning the program goes with the process.

pub mod discovery;
pub mod drain;
pub mod exporter;
pub mod forensics;
pub mod health;
pub mod notify;
pub mod reload;
pub mod state;

use std::{collections::HashMap, future::Future, io, net::TcpListener, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
pub use health::HEALTH_MAX_AGE;
use monitor_ebpf::{Proto, SKIP_REASONS};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinSet,
};
use tracing::{error, info, warn};

use self::{
    drain::Drain,
    exporter::{Endpoint, KernelReadings, LabelCap},
    forensics::{CaptureParts, CaptureTask},
    health::Health,
    state::{SaState, View},
};
use crate::{
    capture::Capture,
    check,
    config::{ConfigError, ScopeChoice, Settings},
    ebpf::{Attached, EbpfFailure, MapContents, PinnedMaps, Stats, Variant, Verifier},
    events::RateLimiter,
    features::{Features, Probe},
    http,
    metrics::Metrics,
    peers::{PeerError, PeerSpec, PeerTable},
    scope::{self, LayoutError, Scope},
    xfrm::XfrmError,
};

/// Re-reads the peer list on SIGHUP (the configuration file and flags).
pub type Reloader = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// Everything `run` needs.
pub struct RunConfig {
    /// Resolved settings.
    pub settings: Settings,
    /// Called on SIGHUP; `None` ignores SIGHUP with a log line.
    pub reload: Option<Reloader>,
    /// A socket the caller bound already (a test, or a supervisor that passes sockets), served
    /// instead of binding `settings.listen`.
    pub listener: Option<TcpListener>,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig")
            .field("settings", &self.settings)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

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
    Tunnels(String),
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

/// The supervised tasks: any one ending is a failure of the daemon.
struct Tasks {
    set: JoinSet<(&'static str, io::Result<()>)>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn new() -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = io::Result<()>> + Send + 'static,
    ) {
        let h = self.set.spawn(async move { (name, task.await) });
        self.names.insert(h.id(), name);
    }

    fn spawn_blocking(
        &mut self,
        name: &'static str,
        task: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) {
        let h = self.set.spawn_blocking(move || (name, task()));
        self.names.insert(h.id(), name);
    }

    /// Waits for the next task to end and says which and how.
    async fn next_end(&mut self) -> (&'static str, String, bool) {
        match self.set.join_next().await {
            Some(Ok((name, Ok(())))) => (name, "returned".into(), true),
            Some(Ok((name, Err(e)))) => (name, e.to_string(), false),
            Some(Err(e)) => (
                self.names.get(&e.id()).copied().unwrap_or("unknown"),
                e.to_string(),
                false,
            ),
            None => std::future::pending().await,
        }
    }

    /// The first task that ends, as an error.
    async fn first_death(&mut self) -> DaemonError {
        let (task, reason, _) = self.next_end().await;
        DaemonError::TaskDied { task, reason }
    }

    /// Waits up to `limit` for each of `tasks` to end by itself (its clean exit, after its final
    /// drain), in any order; another task ending first, or one of them failing, is an error.
    async fn finish(&mut self, tasks: &[&'static str], limit: Duration) -> Result<(), DaemonError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut left: Vec<&'static str> = tasks.to_vec();
        while let Some(&first) = left.first() {
            match tokio::time::timeout_at(deadline, self.next_end()).await {
                Ok((name, _, true)) if left.contains(&name) => left.retain(|t| *t != name),
                Ok((name, reason, _)) => return Err(DaemonError::TaskDied { task: name, reason }),
                Err(_) => {
                    return Err(DaemonError::TaskDied {
                        task: first,
                        reason: format!(
                            "did not finish its final drain within {} s",
                            limit.as_secs()
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Types that own their descriptor and keep it open, unchanged, for as long as they exist: the
/// only ones `watch_fd` registers.
trait OwnsFd: std::os::fd::AsRawFd {}
impl OwnsFd for RingBuf<MapData> {}
impl OwnsFd for aya_log::EbpfLogger<&'static dyn log::Log> {}
impl OwnsFd for crate::xfrm::Watch {}
impl OwnsFd for crate::tunnels::LinkWatch {}

/// Registers a ring buffer, the aya-log reader or the XFRM socket with the runtime.
/// Binds the metrics listener. `:PORT` (`[::]`) falls back to `0.0.0.0` on a host with IPv6
/// off, as Prometheus exporters written in Go do.
fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    match TcpListener::bind(addr) {
        Err(e)
            if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, addr.port()))
        }
        other => other,
    }
}

fn watch_fd<T: OwnsFd>(what: &'static str, inner: T) -> Result<AsyncFd<T>, DaemonError> {
    // SAFETY: `T: OwnsFd` owns its descriptor and keeps it open, unchanged, for as long as it
    // exists; the AsyncFd owns the `T`, so the registration never outlives the fd.
    unsafe { AsyncFd::register(inner) }.map_err(|e| DaemonError::EventFd {
        what,
        source: e.into_parts().1,
    })
}

/// Registers discovery's XFRM and link notification sockets with the runtime.
fn watch_discovery(
    (xfrm, links): discovery::Watches,
) -> Result<
    (
        AsyncFd<crate::xfrm::Watch>,
        AsyncFd<crate::tunnels::LinkWatch>,
    ),
    DaemonError,
> {
    Ok((
        watch_fd("XFRM notification", xfrm)?,
        watch_fd("link notification", links)?,
    ))
}

/// Runs until `shutdown` resolves (clean exit) or an internal task fails (error).
///
/// # Errors
/// `DaemonError` naming the failed step or task.
pub async fn run(config: RunConfig, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let notifier = notify::Notifier::from_env()
        .map_err(DaemonError::Notify)?
        .map(Arc::new);
    let Running {
        mut verifier,
        mut tasks,
        stop_drains,
        health,
        stats,
        view,
    } = start(config)?;
    if let Some(n) = &notifier {
        let (n, h) = (Arc::clone(n), Arc::clone(&health));
        tasks.spawn("systemd-notify", async move {
            n.send("READY=1")?;
            match notify::watchdog_interval() {
                Some(every) => notify::watchdog(n, h, every).await,
                None => std::future::pending().await,
            }
        });
    }
    let result = tokio::select! {
        () = shutdown => {
            info!("shutdown requested");
            // Let the drains empty their rings (and report what the log limit suppressed).
            for stop in stop_drains {
                let _ = stop.send(());
            }
            tasks.finish(&["event-drain", "capture"], Duration::from_secs(5)).await
        }
        e = tasks.first_death() => Err(e),
    };
    health.set_attached(false);
    if let Some(n) = &notifier {
        let _ = n.send("STOPPING=1");
    }
    // Aborts the tasks; the state task ends once the last handle is dropped with them.
    tasks.set.shutdown().await;
    if let Err(e) = &result {
        error!("{e}");
    }
    log_totals(&stats, &view.borrow());
    if verifier.is_pinned() {
        info!(
            cgroup = %verifier.attached_to().map_or_else(String::new, |p| p.display().to_string()),
            "the verifier stays attached, pinned with its maps: the next natt-monitor adopts it; `natt-monitor detach` removes it"
        );
    } else if verifier.detach() {
        info!("verifier detached");
    }
    result
}

/// The daemon once started: what `run` supervises and tears down.
struct Running {
    verifier: Verifier,
    tasks: Tasks,
    /// Tells `event-drain` and `capture` to empty their rings and end.
    stop_drains: [tokio::sync::oneshot::Sender<()>; 2],
    health: Arc<Health>,
    stats: Arc<Stats>,
    view: watch::Receiver<Arc<View>>,
}

/// The start-up order: privileges, endpoint, scope, first SA dump, load, peers, rings, attach,
/// tasks. Every error before `attach` leaves nothing attached; the `Verifier` going out of
/// scope unloads what was loaded.
fn start(config: RunConfig) -> Result<Running, DaemonError> {
    let RunConfig {
        settings,
        reload,
        listener,
    } = config;
    let missing = crate::privileges::missing_capabilities(&settings.proc_path);
    if !missing.is_empty() {
        return Err(DaemonError::Privileges { missing });
    }
    let listen_err = |source| DaemonError::Listen {
        addr: settings.listen,
        source,
    };
    let listener = match listener {
        Some(l) => l,
        None => bind(settings.listen).map_err(listen_err)?,
    };
    let listen = listener.local_addr().map_err(listen_err)?;
    // Probe what the kernel offers before anything is loaded: a missing feature is named, not
    // left to surface as a verifier error.
    let features = Features::probe();
    if features.ring_buffer == Probe::Absent {
        return Err(DaemonError::Kernel {
            feature: "BPF ring buffers (BPF_MAP_TYPE_RINGBUF, Linux 5.8+)",
        });
    }
    let scope = resolve_scope(&settings, &features)?;
    check_map_memory(&settings)?;
    // Discovery starts before anything is attached: the first SA dump is part of the initial
    // peer set, and an explicit --discover xfrm on a kernel without XFRM fails here.
    let (watch, discovered, tunnels) = discovery::start(&settings)?;
    if let Some(dir) = &settings.pin
        && crate::pin::prepare(dir)?
    {
        info!(
            at = crate::pin::BPFFS_ROOT,
            "mounted bpffs to pin the verifier in"
        );
    }
    let mut k = Loaded::load(&settings, scope, features.variant(), discovered)?;
    let (seen, tunnels_on) = k.install_tunnels(scope, tunnels)?;
    let watch = watch.map(watch_discovery).transpose()?;
    let hup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
    // Attach last: the peer map is complete before the first segment meets the program.
    let link = attach(&mut k.verifier, &settings)?;
    k.created.keep();
    k.health.set_attached(true);
    k.health.mark_drained();
    let table = k.view.borrow().table.clone();
    info!(
        cgroup = %settings.cgroup.display(),
        %listen,
        peers = table.len(),
        discover = if watch.is_some() { "xfrm" } else { "none" },
        %scope,
        variant = k.verifier.variant().as_str(),
        "verifier attached at cgroup_skb ingress"
    );
    log_peers(&table);

    let (handle, inbox) = SaState::channel();
    let mut tasks = Tasks::new();
    let sa_state = k.sa_state;
    tasks.spawn_blocking("sa-state", move || sa_state.run(inbox));
    let (stop_drain, stop_rx) = tokio::sync::oneshot::channel();
    let drain = Drain {
        events: k.events,
        learning: k.learning,
        state: handle.clone(),
        view: k.view.clone(),
        limiter: RateLimiter::new(settings.log_per_second, settings.log_burst),
        suppressed: k.metrics.log_suppressed(),
        health: Arc::clone(&k.health),
    };
    tasks.spawn("event-drain", drain.run(stop_rx));
    tasks.spawn("ebpf-log", drain::bridge_ebpf_log(k.ebpf_log));
    let (stop_capture, capture_rx) = tokio::sync::oneshot::channel();
    let capture = CaptureTask::new(k.capture, k.view.clone(), &k.metrics);
    tasks.spawn("capture", capture.run(capture_rx));
    let reloads = k.metrics.reload();
    reloads.succeeded();
    let discovery_errors = k.metrics.discovery_errors();
    let endpoint = Endpoint {
        metrics: k.metrics,
        health: Arc::clone(&k.health),
    };
    let site = Arc::new(http::Site::of(&settings));
    tasks.spawn("http", http::serve(listener, Arc::new(endpoint), site));
    tasks.spawn(
        "xfrm-discovery",
        discovery::follow(watch, handle.clone(), discovery_errors, seen, tunnels_on),
    );
    let hold = hold_pins(&settings);
    tasks.spawn(
        "sighup",
        reload::follow(hup, reload, settings, handle, reloads),
    );
    tasks.spawn("link-watch", watch_link(link, hold));
    Ok(Running {
        verifier: k.verifier,
        tasks,
        stop_drains: [stop_drain, stop_capture],
        health: k.health,
        stats: k.stats,
        view: k.view,
    })
}

/// Map pins this start created. If the start fails before the program is attached, they are
/// removed when this is dropped, so that a failed start leaves nothing pinned. Pins a start
/// adopted are never removed here: they belong to the verifier that still runs.
struct CreatedPins(Option<std::path::PathBuf>);

impl CreatedPins {
    /// The program is attached: the pins stay.
    fn keep(&mut self) {
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
struct Loaded {
    verifier: Verifier,
    created: CreatedPins,
    sa_state: SaState,
    view: watch::Receiver<Arc<View>>,
    health: Arc<Health>,
    stats: Arc<Stats>,
    metrics: Metrics,
    events: AsyncFd<RingBuf<MapData>>,
    learning: AsyncFd<RingBuf<MapData>>,
    capture: CaptureParts,
    ebpf_log: AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Loaded {
    /// Puts the tunnel devices discovery found in `TUNNELS`, before anything is attached.
    /// Tunnels need SA scope (a missing `sec_path` is what leads to them) and the `bpf_loop`
    /// variant; elsewhere they are only logged. Returns what was seen, for discovery to follow,
    /// and whether tunnels are verified.
    fn install_tunnels(
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

    fn load(
        settings: &Settings,
        scope: Scope,
        variant: Variant,
        discovered: Vec<PeerSpec>,
    ) -> Result<Self, DaemonError> {
        // The capture ring is always on: it carries what forensics compares. `--capture` only
        // adds the file.
        let capture = true;
        let mut created = CreatedPins(None);
        let (mut verifier, prior) = match &settings.pin {
            Some(dir) => {
                let (mut v, origin) = Verifier::load_pinned(
                    &scope,
                    capture,
                    Some(variant),
                    dir,
                    settings.map_sizes(),
                )?;
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
            None => (
                Verifier::load_sized(&scope, capture, Some(variant), settings.map_sizes())?,
                MapContents::default(),
            ),
        };
        let (sa_state, view) = SaState::start(
            verifier.take_peer_maps()?,
            scope,
            settings.peers.clone(),
            discovered,
            &prior,
            settings.max_peers,
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
            settings.max_peers,
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
            ring: watch_fd("capture", verifier.take_capture()?)?,
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
fn attach(verifier: &mut Verifier, settings: &Settings) -> Result<crate::pin::Link, DaemonError> {
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

/// The pin directory's shared lock, held while the daemon runs, so that `natt-monitor detach`
/// refuses instead of making it exit (and its supervisor attach it again).
fn hold_pins(settings: &Settings) -> Option<std::fs::File> {
    let dir = settings.pin.as_deref()?;
    crate::pin::hold(dir)
        .inspect_err(|e| warn!(error = %e, "could not lock the pin directory; `natt-monitor detach` will not see that this daemon runs"))
        .ok()
}

/// How often `link-watch` asks the kernel whether the link is still attached.
const LINK_WATCH_PERIOD: Duration = Duration::from_secs(1);

/// Ends with an error once the link no longer attaches the program (`natt-monitor detach`,
/// `bpftool link detach`, or the cgroup removed): the daemon must not report a verifier that
/// no longer runs.
async fn watch_link(link: crate::pin::Link, _hold: Option<std::fs::File>) -> io::Result<()> {
    let mut tick = tokio::time::interval(LINK_WATCH_PERIOD);
    loop {
        tick.tick().await;
        let info = link.info()?;
        if !info.attached() {
            return Err(io::Error::other(
                "the verifier's link was detached from outside this daemon (natt-monitor detach, bpftool, or its cgroup removed)",
            ));
        }
    }
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

/// One line per peer: what is verified and how.
pub fn log_peers(table: &PeerTable) {
    for (id, p) in table.iter().take(LOGGED_PEERS) {
        match table.residual(id) {
            Some(residual) => {
                info!(peer = %p.net, id, mode = %p.mode, source = p.source.as_str(), residual, "verifying peer");
            }
            None => {
                info!(peer = %p.net, id, mode = %p.mode, source = p.source.as_str(), "verifying peer; each SA's NAT residual is learned from its first segments");
            }
        }
    }
    if table.len() > LOGGED_PEERS {
        info!(
            more = table.len() - LOGGED_PEERS,
            peers = table.len(),
            "verifying further peers, not listed one by one (natt_monitor_peers counts them)"
        );
    }
}

/// Peers `log_peers` lists one line each; a concentrator's thousands are summed up in one.
const LOGGED_PEERS: usize = 64;

/// Refuses a start whose maps cannot fit in what the cgroup's `memory.max` leaves free, before
/// anything is loaded: the kernel would fail them, or the cgroup's OOM killer end the daemon,
/// on every restart. Kernels before 5.11 charge map memory to `RLIMIT_MEMLOCK`, which the
/// daemon raises, not to the cgroup.
fn check_map_memory(settings: &Settings) -> Result<(), DaemonError> {
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

/// SA scope where the kernel's BTF gives the `sec_path` layout; address scope where it does
/// not (with a warning), or when asked for.
fn resolve_scope(settings: &Settings, features: &Features) -> Result<Scope, DaemonError> {
    let btf = settings.sys_path.join(scope::VMLINUX_BTF);
    let readable = !matches!(features.probe_read_kernel, Probe::Absent);
    match (settings.scope, scope::sa_layout(&btf, readable)) {
        (ScopeChoice::Address, _) => Ok(Scope::Address),
        (_, Ok(l)) => Ok(Scope::Sa(l)),
        (ScopeChoice::Sa, Err(scope::NoSaScope::NoProbeRead)) => Err(DaemonError::NoProbeRead),
        (ScopeChoice::Sa, Err(scope::NoSaScope::Layout(e))) => Err(DaemonError::Scope(e)),
        (ScopeChoice::Auto, Err(e)) => {
            warn!(reason = %e, "scoping by source address: {} (docs/verifier.md)", scope::FALLBACK_COST);
            Ok(Scope::Address)
        }
    }
}

/// One line per peer that saw traffic (up to `LOGGED_PEERS`; a concentrator's idle thousands
/// say nothing).
fn log_totals(stats: &Stats, view: &View) {
    let (mut logged, mut unlisted, mut quiet) = (0, 0, 0);
    for (id, p) in view.table.iter() {
        match stats.peer_stats(id) {
            Ok(s) if s == monitor_ebpf::PeerStats::default() => quiet += 1,
            Ok(_) if logged == LOGGED_PEERS => unlisted += 1,
            Ok(s) => {
                logged += 1;
                info!(
                    peer = %p.net,
                    verified_tcp = s.verified_packets[Proto::Tcp as usize],
                    verified_udp = s.verified_packets[Proto::Udp as usize],
                    verified_icmp = s.verified_packets[Proto::Icmp as usize],
                    verified_sctp = s.verified_packets[Proto::Sctp as usize],
                    mismatches = s.mismatches.iter().sum::<u64>(),
                    learning = s.learning.iter().sum::<u64>(),
                    dropped = s.drops.iter().sum::<u64>(),
                    "peer totals"
                );
            }
            Err(e) => warn!(peer = %p.net, error = %e, "could not read peer totals"),
        }
    }
    if unlisted + quiet > 0 {
        info!(
            with_traffic = unlisted,
            without_traffic = quiet,
            "peer totals of further peers not listed one by one"
        );
    }
    if let Ok(c) = stats.counters() {
        for (counter, reason) in SKIP_REASONS {
            let n = c.get(counter);
            if n > 0 {
                info!(reason, packets = n, "skipped totals");
            }
        }
    }
}
