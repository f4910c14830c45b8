//! The daemon: check privileges, bind the endpoint, load, fill peers, attach, then serve
//! metrics, drain events and reload on SIGHUP until shutdown.
//!
//! All or nothing, and fail fast: every failure before attaching returns an error with nothing
//! attached; every internal task is awaited, and if one ends while running — with an error or
//! not — `run` returns an error naming it, the verifier is dropped (which detaches it) and the
//! process exits non-zero. `/healthz` and `natt_monitor_up` are true only while the program is
//! attached and the drain loop has completed a pass within `HEALTH_MAX_AGE`. There is no
//! zombie mode.

use std::{
    future::Future,
    io,
    net::TcpListener,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use monitor_ebpf::{PROTO_TCP, PROTO_UDP, SKIP_REASONS};
use prometheus::IntCounter;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    capture::Capture,
    check,
    cli::{Discover, ScopeChoice},
    config::{ConfigError, Settings},
    ebpf::{EbpfFailure, Verifier},
    events::{Hex, Mismatch, RateLimiter, SUPPRESSED_FLUSH},
    http::{self, Exporter},
    learn::Outcome,
    metrics::{Metrics, PeerSnapshot, Snapshot},
    peers::{Mode, PeerError, PeerSpec, PeerTable, Source},
    residuals::Residuals,
    scope::{self, LayoutError, Scope},
    snmp,
    xfrm::{self, Watch, XfrmError},
};

/// Re-reads the peer list on SIGHUP (the configuration file and flags).
pub type Reloader = Box<dyn Fn() -> Result<Vec<PeerSpec>, ConfigError> + Send + Sync>;

/// Everything `run` needs.
pub struct RunConfig {
    /// Resolved settings.
    pub settings: Settings,
    /// Called on SIGHUP; `None` ignores SIGHUP with a log line.
    pub reload: Option<Reloader>,
    /// Test hook: the event-drain task fails after this long, to prove the daemon exits.
    #[doc(hidden)]
    pub drain_fault_after: Option<Duration>,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig")
            .field("settings", &self.settings)
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
    #[error("--listen {addr}: {source}")]
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
    /// `--scope sa` was asked for, but the kernel's BTF does not give the `sec_path` layout.
    #[error("--scope sa: {0}")]
    Scope(#[from] LayoutError),
    /// An internal task ended while the daemon was running.
    #[error(
        "internal task `{task}` stopped: {reason}; exiting so the failure is visible (the program is detached)"
    )]
    TaskDied {
        /// Which task.
        task: &'static str,
        /// What happened to it.
        reason: String,
    },
}

/// How recently the drain loop must have completed a pass for the daemon to count as up.
pub const HEALTH_MAX_AGE: Duration = Duration::from_secs(5);
/// How often the drain loop wakes even without events, proving it is alive.
pub const DRAIN_TICK: Duration = Duration::from_secs(1);

/// Liveness shared by the tasks, `/healthz` and `natt_monitor_up`.
#[derive(Debug)]
pub struct Health {
    attached: AtomicBool,
    start: Instant,
    /// Milliseconds since `start` at the last completed drain pass.
    last_drain_ms: AtomicU64,
}

impl Health {
    fn new() -> Self {
        Self {
            attached: AtomicBool::new(false),
            start: Instant::now(),
            last_drain_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn mark_drained(&self) {
        self.last_drain_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// `Ok` while attached and the drain loop completed a pass within `HEALTH_MAX_AGE`.
    ///
    /// # Errors
    /// Why the daemon is not healthy.
    pub fn check(&self) -> Result<(), String> {
        if !self.attached.load(Ordering::Relaxed) {
            return Err("verifier not attached".into());
        }
        let age = self
            .now_ms()
            .saturating_sub(self.last_drain_ms.load(Ordering::Relaxed));
        if u128::from(age) > HEALTH_MAX_AGE.as_millis() {
            return Err(format!("event loop has not completed a pass for {age} ms"));
        }
        Ok(())
    }
}

/// How often discovery re-reads the SAs even without a notification.
pub const XFRM_RESYNC: Duration = Duration::from_secs(30);

/// The peer set and where it came from. Lock order: `Shared::peers`, then `Shared::verifier`.
#[derive(Debug)]
struct PeerState {
    /// What the maps hold.
    table: PeerTable,
    /// From flags and the configuration file (replaced on SIGHUP).
    statics: Vec<PeerSpec>,
    /// From the kernel's SAs (replaced on every change).
    discovered: Vec<PeerSpec>,
    /// Learned residuals per NAT mapping and the learning rounds of the others.
    residuals: Residuals,
    /// How segments are scoped.
    scope: Scope,
}

impl PeerState {
    /// Under SA scope every peer without configured NAT addresses learns its residual per NAT
    /// mapping, and a rekey (a new discovery generation) is no reason to forget anything: the
    /// mapping, and with it the residual, stays. Under address scope a static peer without NAT
    /// addresses has residual 0 and a discovered one learns again when its SAs change.
    fn scoped(scope: Scope, mut specs: Vec<PeerSpec>) -> Vec<PeerSpec> {
        if matches!(scope, Scope::Sa(_)) {
            for p in &mut specs {
                p.learn = p.nat.is_none();
                p.generation = 0;
            }
        }
        specs
    }
}

/// State shared by the tasks and the HTTP endpoint.
struct Shared {
    verifier: Mutex<Verifier>,
    peers: Mutex<PeerState>,
    health: Health,
    metrics: Metrics,
    proc_path: PathBuf,
}

/// The peers to verify: every static peer, then each discovered peer whose address no static
/// prefix already covers (an operator's explicit entry wins over discovery).
fn merge(statics: &[PeerSpec], discovered: &[PeerSpec]) -> Vec<PeerSpec> {
    let mut out = statics.to_vec();
    out.extend(
        discovered
            .iter()
            .filter(|d| !statics.iter().any(|s| s.net.contains(&d.net.addr())))
            .cloned(),
    );
    out
}

/// Replaces the peer set: reconciles ids, updates the maps (restoring the old set if that
/// fails) and restarts learning for peers whose SAs changed. Returns (added, removed).
fn apply_peers(
    shared: &Shared,
    statics: Option<Vec<PeerSpec>>,
    discovered: Option<Vec<PeerSpec>>,
) -> Result<(usize, usize), String> {
    let mut state = lock(&shared.peers);
    let statics = statics.map_or_else(
        || state.statics.clone(),
        |s| PeerState::scoped(state.scope, s),
    );
    let discovered = discovered.map_or_else(
        || state.discovered.clone(),
        |d| PeerState::scoped(state.scope, d),
    );
    let old = state.table.clone();
    let new = old
        .reconcile(merge(&statics, &discovered))
        .map_err(|e| e.to_string())?;
    {
        let mut v = lock(&shared.verifier);
        if let Err(e) = v.set_peers(&new) {
            // The maps may now be partly updated; put the old table back so they match what
            // the metrics and logs believe.
            if let Err(e2) = v.set_peers(&old) {
                return Err(format!(
                    "{e}; restoring the previous peers failed too: {e2}"
                ));
            }
            return Err(format!("{e}; kept the previous peers"));
        }
    }
    // A peer whose prefix, mode or NAT addresses changed (or that went) starts over: its
    // residuals were learned for what it was.
    let changed: Vec<u32> = old
        .iter()
        .filter(|(id, p)| new.get(*id) != Some(*p))
        .map(|(id, _)| id)
        .collect();
    for id in changed {
        forget_peer(shared, &mut state, id);
    }
    let added = new
        .iter()
        .filter(|(_, p)| old.id_of(p.net).is_none())
        .count();
    let removed = old
        .iter()
        .filter(|(_, p)| new.id_of(p.net).is_none())
        .count();
    state.table = new;
    state.statics = statics;
    state.discovered = discovered;
    Ok((added, removed))
}

/// Removes every residual of peer `id` from the map and the daemon's view, and its rounds.
fn forget_peer(shared: &Shared, state: &mut PeerState, id: u32) {
    let keys = state.residuals.forget_peer(id);
    if keys.is_empty() {
        return;
    }
    if let Err(e) = lock(&shared.verifier).remove_sa_residuals(|k| keys.contains(k)) {
        warn!(peer_id = id, error = %e, "could not remove learned residuals; the LRU map ages them out");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Exporter for Shared {
    fn scrape(&self) -> String {
        let t0 = Instant::now();
        let (table, learning): (PeerTable, Vec<bool>) = {
            let st = lock(&self.peers);
            let learning = st
                .table
                .iter()
                .map(|(id, p)| st.residuals.peer_learning(id, p.learn))
                .collect();
            (st.table.clone(), learning)
        };
        let mut snap = Snapshot {
            peers_by_source: Source::ALL
                .iter()
                .map(|s| (*s, table.count_by_source(*s)))
                .collect(),
            kernel: snmp::read(&self.proc_path),
            up: self.health.check().is_ok(),
            ..Snapshot::default()
        };
        {
            let v = lock(&self.verifier);
            match v.counters() {
                Ok(c) => snap.counters = c,
                Err(e) => {
                    warn!(error = %e, "scrape could not read the verifier's counters");
                    snap.up = false;
                }
            }
            for ((id, spec), learning) in table.iter().zip(learning) {
                match v.peer_stats(id) {
                    Ok(stats) => snap.peers.push(PeerSnapshot {
                        label: spec.label(),
                        stats,
                        learning,
                    }),
                    Err(e) => {
                        warn!(peer = %spec.net, error = %e, "scrape could not read peer statistics");
                        snap.up = false;
                    }
                }
            }
        }
        snap.collect_seconds = t0.elapsed().as_secs_f64();
        self.metrics.render(&snap)
    }

    fn health(&self) -> Result<(), String> {
        self.health.check()
    }
}

/// Runs until `shutdown` resolves (clean exit) or an internal task fails (error).
///
/// # Errors
/// `DaemonError` naming the failed step or task.
#[expect(
    clippy::too_many_lines,
    reason = "the start-up order is the contract; it reads best in one place"
)]
pub async fn run(config: RunConfig, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let RunConfig {
        settings,
        reload,
        drain_fault_after,
    } = config;
    let missing = check::missing_capabilities(&settings.proc_path);
    if !missing.is_empty() {
        return Err(DaemonError::Privileges { missing });
    }
    let listener = TcpListener::bind(settings.listen).map_err(|source| DaemonError::Listen {
        addr: settings.listen,
        source,
    })?;
    let listen = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: settings.listen,
            source,
        })?;
    let scope = resolve_scope(&settings)?;
    // Discovery starts before anything is attached: the first SA dump is part of the initial
    // peer set, and an explicit --discover xfrm on a kernel without XFRM fails here.
    let (watch, discovered) = start_discovery(&settings)?;
    let statics = PeerState::scoped(scope, settings.peers.clone());
    let discovered = PeerState::scoped(scope, discovered);
    let table = PeerTable::new(merge(&statics, &discovered))?;
    let metrics = Metrics::new()?;
    let suppressed = metrics.log_suppressed();

    let mut verifier = Verifier::load_with(&scope, settings.capture.is_some())?;
    metrics.set_program(scope.as_str(), verifier.variant().as_str());
    let variant = verifier.variant().as_str();
    verifier.set_peers(&table)?;
    let capture = match &settings.capture {
        Some(path) => {
            let file =
                Capture::create(path, settings.capture_max_bytes, metrics.capture_results())?;
            let ring = verifier.take_capture()?;
            // SAFETY: as for the event ring below.
            let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| DaemonError::EventFd {
                what: "capture",
                source: e.into_parts().1,
            })?;
            info!(file = %path.display(), max_bytes = settings.capture_max_bytes, "writing mismatching packets to a pcapng file");
            Some((ring, file))
        }
        None => None,
    };
    let ring = verifier.take_events()?;
    // SAFETY: the ring buffer owns its map fd and keeps it open for as long as the AsyncFd
    // (which owns the ring buffer) exists, so the registration never outlives the fd.
    let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| DaemonError::EventFd {
        what: "mismatch event",
        source: e.into_parts().1,
    })?;
    let ebpf_log = aya_log::EbpfLogger::init(verifier.ebpf_mut())
        .map_err(|e| DaemonError::EbpfLog(e.to_string()))?;
    // SAFETY: as above, for the logger's ring buffer.
    let ebpf_log = unsafe { AsyncFd::register(ebpf_log) }.map_err(|e| DaemonError::EventFd {
        what: "aya-log",
        source: e.into_parts().1,
    })?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
    // Attach last: the peer map is complete before the first segment meets the program.
    verifier.attach(&settings.cgroup)?;

    let watch = match watch {
        // SAFETY: the Watch owns its socket and keeps it open for as long as the AsyncFd (which
        // owns the Watch) exists.
        Some(w) => Some(
            unsafe { AsyncFd::register(w) }.map_err(|e| DaemonError::EventFd {
                what: "XFRM notification",
                source: e.into_parts().1,
            })?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared {
        verifier: Mutex::new(verifier),
        peers: Mutex::new(PeerState {
            table: table.clone(),
            statics,
            discovered,
            residuals: Residuals::default(),
            scope,
        }),
        health: Health::new(),
        metrics,
        proc_path: settings.proc_path.clone(),
    });
    shared.health.attached.store(true, Ordering::Relaxed);
    shared.health.mark_drained();
    info!(
        cgroup = %settings.cgroup.display(),
        %listen,
        peers = table.len(),
        discover = if watch.is_some() { "xfrm" } else { "none" },
        %scope,
        variant,
        "verifier attached at cgroup_skb ingress"
    );
    log_peers(&table);

    let limiter = RateLimiter::new(settings.log_per_second, settings.log_burst);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let mut drain = tokio::spawn(drain_events(
        ring,
        Arc::clone(&shared),
        limiter,
        suppressed,
        stop_rx,
        drain_fault_after,
    ));
    let mut bridge = tokio::spawn(bridge_ebpf_log(ebpf_log));
    let mut capturing = tokio::spawn(drain_capture(capture));
    let mut server = tokio::spawn(http::serve(
        listener,
        Arc::clone(&shared) as Arc<dyn Exporter>,
    ));
    let mut discovery = tokio::spawn(follow_xfrm(
        watch,
        Arc::clone(&shared),
        settings.default_mode,
    ));
    let died = |task: &'static str, r: Result<io::Result<()>, tokio::task::JoinError>| {
        DaemonError::TaskDied {
            task,
            reason: match r {
                Ok(Ok(())) => "returned".into(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            },
        }
    };

    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            () = &mut shutdown => {
                info!("shutdown requested");
                // Let the drain task empty the ring and report what the log limit suppressed.
                let _ = stop_tx.send(());
                break match tokio::time::timeout(Duration::from_secs(5), &mut drain).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(r) => Err(died("event-drain", r)),
                    Err(_) => Err(DaemonError::TaskDied { task: "event-drain", reason: "did not finish its final drain within 5 s".into() }),
                };
            }
            _ = hup.recv() => reload_peers(&shared, reload.as_ref()),
            r = &mut drain => break Err(died("event-drain", r)),
            r = &mut bridge => break Err(died("ebpf-log", r)),
            r = &mut server => break Err(died("http", r)),
            r = &mut discovery => break Err(died("xfrm-discovery", r)),
            r = &mut capturing => break Err(died("capture", r)),
        }
    };
    shared.health.attached.store(false, Ordering::Relaxed);
    drain.abort();
    bridge.abort();
    server.abort();
    discovery.abort();
    capturing.abort();
    if let Err(e) = &result {
        error!("{e}");
    }
    log_totals(&shared);
    // The tasks hold clones of `shared`; the verifier (and with it the link) goes when the
    // last one is dropped. Detach explicitly now rather than whenever the runtime drops them.
    let attached = lock(&shared.verifier).detach();
    if attached {
        info!("verifier detached");
    }
    result
}

fn log_peers(table: &PeerTable) {
    for (id, p) in table.iter() {
        match table.residual(id) {
            Some(residual) => {
                info!(peer = %p.net, id, mode = %p.mode, source = p.source.as_str(), residual, "verifying peer");
            }
            None => {
                info!(peer = %p.net, id, mode = %p.mode, source = p.source.as_str(), "verifying peer; each SA's NAT residual is learned from its first segments");
            }
        }
    }
}

/// SA scope where the kernel's BTF gives the `sec_path` layout; address scope where it does
/// not (with a warning), or when asked for.
fn resolve_scope(settings: &Settings) -> Result<Scope, DaemonError> {
    let btf = settings.sys_path.join(scope::VMLINUX_BTF);
    match settings.scope {
        ScopeChoice::Address => Ok(Scope::Address),
        ScopeChoice::Sa => Ok(Scope::Sa(scope::layout_from(&btf)?)),
        ScopeChoice::Auto => Ok(scope::layout_from(&btf).map_or_else(
            |e| {
                warn!(error = %e, "scoping by source address: this kernel does not say where a segment's IPsec state lies, so plaintext from peers is told apart only by IKE ports and partial checksums (docs/verifier.md)");
                Scope::Address
            },
            Scope::Sa,
        )),
    }
}

/// Opens the notification socket first (so no change is missed between the dump and the
/// subscription), then dumps the SAs. With discovery on by default, a kernel without XFRM
/// netlink only turns discovery off; asked for explicitly, it is an error.
fn start_discovery(settings: &Settings) -> Result<(Option<Watch>, Vec<PeerSpec>), DaemonError> {
    if settings.discover == Discover::None {
        return Ok((None, Vec::new()));
    }
    let opened = Watch::open().and_then(|w| xfrm::dump().map(|sas| (w, sas)));
    match opened {
        Ok((w, sas)) => {
            let peers = xfrm::peers_from(&sas, settings.default_mode, xfrm::is_local);
            info!(
                sas = sas.len(),
                peers = peers.len(),
                "XFRM discovery: read the kernel's SAs"
            );
            Ok((Some(w), peers))
        }
        Err(e) if !settings.discover_required && matches!(e, XfrmError::Open(_)) => {
            if settings.peers.is_empty() {
                return Err(DaemonError::Discovery(e));
            }
            info!(error = %e, "XFRM discovery off: this kernel has no XFRM netlink; static peers only");
            Ok((None, Vec::new()))
        }
        Err(e) => Err(DaemonError::Discovery(e)),
    }
}

/// Keeps the discovered peers in step with the kernel's SAs: re-reads them on every SA
/// notification (and every `XFRM_RESYNC`) and applies the difference. Without discovery it
/// simply waits forever. Any netlink failure ends the task, which takes the daemon down.
async fn follow_xfrm(
    watch: Option<AsyncFd<Watch>>,
    shared: Arc<Shared>,
    mode: Mode,
) -> io::Result<()> {
    let Some(mut watch) = watch else {
        return std::future::pending().await;
    };
    let fail = |e: XfrmError| io::Error::other(e.to_string());
    loop {
        let woke = tokio::time::timeout(XFRM_RESYNC, watch.readable_mut()).await;
        if let Ok(guard) = woke {
            let mut guard = guard?;
            let n = guard.get_inner_mut().read_pending().map_err(fail)?;
            guard.clear_ready();
            if n.overrun {
                warn!("XFRM notifications overran the socket; re-reading every SA");
            }
            // Coalesce a burst (an IKE rekey adds and deletes several SAs at once).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = watch.get_mut().read_pending().map_err(fail)?;
        }
        let peers = xfrm::peers_from(&xfrm::dump().map_err(fail)?, mode, xfrm::is_local);
        {
            let st = lock(&shared.peers);
            if PeerState::scoped(st.scope, peers.clone()) == st.discovered {
                continue;
            }
        }
        match apply_peers(&shared, None, Some(peers)) {
            Ok((added, removed)) => {
                let table = lock(&shared.peers).table.clone();
                info!(
                    peers = table.len(),
                    xfrm = table.count_by_source(Source::Xfrm),
                    added,
                    removed,
                    "XFRM discovery: SAs changed"
                );
                log_peers(&table);
            }
            Err(e) => {
                error!(error = %e, "XFRM discovery could not update the peers; will retry on the next change");
            }
        }
    }
}

fn reload_peers(shared: &Shared, reload: Option<&Reloader>) {
    let Some(reload) = reload else {
        warn!("SIGHUP ignored: no configuration to re-read");
        return;
    };
    let specs = match reload() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "reload failed; keeping the current peers");
            return;
        }
    };
    match apply_peers(shared, Some(specs), None) {
        Ok((added, removed)) => {
            let table = lock(&shared.peers).table.clone();
            info!(
                peers = table.len(),
                added, removed, "reloaded peers on SIGHUP"
            );
            log_peers(&table);
        }
        Err(e) => error!(error = %e, "reload failed; keeping the current peers"),
    }
}

fn log_totals(shared: &Shared) {
    let table = lock(&shared.peers).table.clone();
    let v = lock(&shared.verifier);
    for (id, p) in table.iter() {
        match v.peer_stats(id) {
            Ok(s) => info!(
                peer = %p.net,
                verified_tcp = s.verified_packets[PROTO_TCP],
                verified_udp = s.verified_packets[PROTO_UDP],
                mismatches = s.mismatches[PROTO_TCP] + s.mismatches[PROTO_UDP],
                learning = s.learning[PROTO_TCP] + s.learning[PROTO_UDP],
                dropped = s.drops[PROTO_TCP] + s.drops[PROTO_UDP],
                "peer totals"
            ),
            Err(e) => warn!(peer = %p.net, error = %e, "could not read peer totals"),
        }
    }
    if let Ok(c) = v.counters() {
        for (counter, reason) in SKIP_REASONS {
            let n = c.get(counter);
            if n > 0 {
                info!(reason, packets = n, "skipped totals");
            }
        }
    }
}

/// Forwards the verifier's aya-log records (its rare anomaly reports) into `tracing`, via the
/// `log` facade that `tracing-subscriber` captures.
async fn bridge_ebpf_log(
    mut fd: AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>,
) -> io::Result<()> {
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Writes the capture ring's packets to the pcapng file; without `--capture`, waits forever.
/// A write error ends the task, which takes the daemon down.
async fn drain_capture(capture: Option<(AsyncFd<RingBuf<MapData>>, Capture)>) -> io::Result<()> {
    let Some((mut ring, mut file)) = capture else {
        return std::future::pending().await;
    };
    let fail = |e: crate::capture::CaptureError| io::Error::other(e.to_string());
    loop {
        let mut guard = ring.readable_mut().await?;
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            file.record(&item).map_err(fail)?;
        }
        file.flush().map_err(fail)?;
        guard.clear_ready();
    }
}

/// Drains the ring buffer: one WARN line per mismatch within the log budget. On `stop` it
/// drains what is left, reports suppressed lines and returns.
async fn drain_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    shared: Arc<Shared>,
    mut limiter: RateLimiter,
    suppressed: IntCounter,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    fault_after: Option<Duration>,
) -> io::Result<()> {
    let fault_at = fault_after.map(|d| Instant::now() + d);
    let mut last_event = Instant::now();
    loop {
        if fault_at.is_some_and(|t| Instant::now() >= t) {
            return Err(io::Error::other("injected fault (test hook)"));
        }
        let ready = tokio::select! {
            r = tokio::time::timeout(DRAIN_TICK, ring.readable_mut()) => r,
            _ = &mut stop => {
                let rb = ring.get_mut();
                while let Some(item) = rb.next() {
                    log_event(&item, &shared, &mut limiter, &suppressed);
                }
                let pending = limiter.pending_suppressed();
                if pending > 0 {
                    warn!(suppressed = pending, "mismatch log lines suppressed by the rate limit");
                }
                return Ok(());
            }
        };
        match ready {
            Ok(guard) => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    last_event = Instant::now();
                    log_event(&item, &shared, &mut limiter, &suppressed);
                }
                guard.clear_ready();
            }
            Err(_elapsed) => {
                let pending = limiter.pending_suppressed();
                if pending > 0 && last_event.elapsed() >= SUPPRESSED_FLUSH {
                    warn!(
                        suppressed = pending,
                        "mismatch log lines suppressed by the rate limit"
                    );
                    limiter.clear_suppressed();
                }
            }
        }
        shared.health.mark_drained();
    }
}

fn log_event(bytes: &[u8], shared: &Shared, limiter: &mut RateLimiter, suppressed: &IntCounter) {
    let Some(m) = Mismatch::decode(bytes) else {
        warn!(
            len = bytes.len(),
            "short record in the mismatch ring buffer"
        );
        return;
    };
    if m.learning {
        learn_sample(shared, &m);
        return;
    }
    let Some(suppressed_before) = limiter.admit(Instant::now()) else {
        suppressed.inc();
        return;
    };
    let peer = lock(&shared.peers)
        .table
        .get(m.peer_id)
        .map_or_else(|| format!("#{}", m.peer_id), PeerSpec::label);
    warn!(
        peer,
        proto = m.proto,
        flow = %m.flow(),
        seq = m.seq,
        len = m.len,
        found = %format_args!("{:#06x}", m.found),
        expected = %format_args!("{:#06x}", m.expected),
        action = if m.dropped { "dropped" } else { "passed" },
        spi = %format_args!("{:#010x}", m.spi),
        reqid = m.reqid,
        ifindex = m.ifindex,
        payload = %Hex(&m.payload),
        suppressed_before,
        "checksum mismatch"
    );
}

/// Feeds one learning segment's residual to the learner; when it settles, installs the residual
/// so the SA's next segment is verified.
fn learn_sample(shared: &Shared, m: &Mismatch) {
    let mut state = lock(&shared.peers);
    // Samples of a peer that no longer learns (reloaded, removed) are stale.
    if !state.table.learns(m.peer_id) {
        return;
    }
    let key = m.sa_key();
    let Some(outcome) = state.residuals.sample(key, m.residual) else {
        return;
    };
    let label = state
        .table
        .get(m.peer_id)
        .map_or_else(String::new, PeerSpec::label);
    match outcome {
        Outcome::Pending => {}
        Outcome::Restarted { top } => warn!(
            peer = label,
            spi = %format_args!("{:#010x}", m.spi),
            most_common = %format_args!("{:#06x}", top.0),
            count = top.1,
            window = crate::learn::WINDOW,
            "NAT residual did not settle: no value carried three quarters of the segments; learning again"
        ),
        Outcome::Learned { residual, samples } => {
            match lock(&shared.verifier).set_sa_residual(key, residual) {
                Ok(()) => {
                    state.residuals.installed(key, residual);
                    info!(
                        peer = label,
                        spi = %format_args!("{:#010x}", m.spi),
                        reqid = m.reqid,
                        encap_ports = %format_args!("{}/{}", m.encap_ports.0, m.encap_ports.1),
                        residual = %format_args!("{residual:#06x}"),
                        samples,
                        "NAT residual learned; verifying this SA from now on"
                    );
                }
                Err(e) => {
                    error!(peer = label, error = %e, "could not install the learned residual; still learning");
                }
            }
        }
    }
}
