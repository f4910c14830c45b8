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
//! | `link-watch` | `link_watch` | a descriptor of the link, to notice a detach from outside |
//! | `systemd-notify` | `notify` | `READY=1`, then `WATCHDOG=1` while healthy (under systemd) |
//!
//! The start-up steps that load and attach the program are in `load`, the supervised task set
//! in `tasks`, and the link watch in `link_watch`.
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
mod error;
pub mod exporter;
pub mod forensics;
pub mod health;
mod link_watch;
mod load;
pub mod notify;
pub mod reload;
pub mod state;
mod tasks;

use std::{future::Future, io, net::TcpListener, sync::Arc, time::Duration};

pub use error::DaemonError;
pub use health::HEALTH_MAX_AGE;
use monitor_ebpf::{Proto, SKIP_REASONS};
pub use reload::Reloader;
pub use tasks::Shutdown;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};

use self::{
    drain::Drain,
    exporter::Endpoint,
    forensics::CaptureTask,
    health::Health,
    link_watch::{hold_pins, watch_link},
    load::{Loaded, attach, check_map_memory},
    state::{SaState, View},
    tasks::{Tasks, watch_discovery},
};
use crate::{
    config::{ScopeChoice, Settings},
    ebpf::{Stats, Verifier},
    events::RateLimiter,
    features::{Features, Probe},
    http,
    peers::{LOGGED_PEERS, log_peers},
    scope::{self, Scope},
};

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
            // Every task hears it; the drains empty their rings first (and report what the log
            // limit suppressed), the state task ends when the last handle goes with them.
            tasks.stop(Duration::from_secs(5)).await
        }
        e = tasks.first_death() => Err(e),
    };
    health.set_attached(false);
    if let Some(n) = &notifier {
        let _ = n.send("STOPPING=1");
    }
    // What a failure left running is aborted; the state task ends once the last handle is
    // dropped with the others.
    tasks.abort().await;
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
    let drain = Drain {
        events: k.events,
        learning: k.learning,
        state: handle.clone(),
        view: k.view.clone(),
        limiter: RateLimiter::new(settings.log_per_second, settings.log_burst),
        suppressed: k.metrics.log_suppressed(),
        health: Arc::clone(&k.health),
    };
    tasks.spawn_draining("event-drain", |stop| drain.run(stop));
    tasks.spawn("ebpf-log", drain::bridge_ebpf_log(k.ebpf_log));
    let capture = CaptureTask::new(k.capture, k.view.clone(), &k.metrics);
    tasks.spawn_blocking_draining("capture", move |stop| capture.run(stop));
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
        health: k.health,
        stats: k.stats,
        view: k.view,
    })
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
