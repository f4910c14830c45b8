//! The daemon: load, fill peers, attach, drain events, detach on shutdown.
//!
//! Fail fast: every internal task is awaited by `run`; if one ends — with an error or not —
//! `run` returns an error naming it, the verifier is dropped (which detaches it) and the process
//! exits non-zero. A live process therefore always means an attached program and a loop that
//! drains events; there is no "zombie" mode.

use std::{
    future::Future,
    io,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use monitor_ebpf::{PROTO_TCP, PROTO_UDP, SKIP_REASONS};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    ebpf::{EbpfFailure, Verifier},
    events::{Hex, LOG_BURST, LOG_PER_SECOND, Mismatch, RateLimiter, SUPPRESSED_FLUSH},
    peers::PeerTable,
};

/// Everything `run` needs, already validated.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// cgroup v2 directory to attach to.
    pub cgroup: PathBuf,
    /// Peers to verify.
    pub peers: PeerTable,
}

/// Why the daemon stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Loading, attaching or map access failed.
    #[error(transparent)]
    Ebpf(#[from] EbpfFailure),
    /// The event ring buffer could not be registered with the runtime.
    #[error("watching the mismatch event ring buffer: {0}")]
    EventFd(#[source] io::Error),
    /// The eBPF log bridge could not be set up.
    #[error("bridging the eBPF program's log (aya-log): {0}")]
    EbpfLog(String),
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

/// Liveness shared between the tasks and (later) the health endpoint.
#[derive(Debug, Default)]
pub struct Health {
    attached: AtomicBool,
    /// Milliseconds since `start` at the last completed drain pass.
    last_drain_ms: AtomicU64,
    start: std::sync::OnceLock<Instant>,
}

impl Health {
    fn start(&self) -> Instant {
        *self.start.get_or_init(Instant::now)
    }

    fn mark_drained(&self) {
        let ms = u64::try_from(self.start().elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_drain_ms.store(ms, Ordering::Relaxed);
    }

    /// True while attached and the drain loop completed a pass within `max_age`.
    #[must_use]
    pub fn is_up(&self, max_age: Duration) -> bool {
        let now = u64::try_from(self.start().elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_drain_ms.load(Ordering::Relaxed);
        self.attached.load(Ordering::Relaxed)
            && now.saturating_sub(last) <= u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX)
    }
}

/// How often the drain loop wakes even without events, proving it is alive.
pub const DRAIN_TICK: Duration = Duration::from_secs(1);

/// Runs until `shutdown` resolves (clean exit) or an internal task fails (error).
///
/// # Errors
/// `DaemonError` naming the failed step or task.
pub async fn run(config: RunConfig, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let health = Arc::new(Health::default());
    health.start();
    let mut verifier = Verifier::load()?;
    verifier.set_peers(&config.peers)?;
    let ring = verifier.take_events()?;
    // SAFETY: the ring buffer owns its map fd and keeps it open for as long as the AsyncFd
    // (which owns the ring buffer) exists, so the registration never outlives the fd.
    let ring =
        unsafe { AsyncFd::register(ring) }.map_err(|e| DaemonError::EventFd(e.into_parts().1))?;
    let ebpf_log = aya_log::EbpfLogger::init(verifier.ebpf_mut())
        .map_err(|e| DaemonError::EbpfLog(e.to_string()))?;
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let ebpf_log = unsafe { AsyncFd::register(ebpf_log) }
        .map_err(|e| DaemonError::EbpfLog(e.into_parts().1.to_string()))?;
    // Attach last: the peer map is complete before the first segment meets the program.
    verifier.attach(&config.cgroup)?;
    health.attached.store(true, Ordering::Relaxed);
    health.mark_drained();
    let peers = Arc::new(config.peers.clone());
    info!(
        cgroup = %config.cgroup.display(),
        peers = config.peers.len(),
        "verifier attached at cgroup_skb ingress"
    );
    for (id, p) in config.peers.iter() {
        info!(peer = %p.net, id, mode = %p.mode, "verifying peer");
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let mut drain = tokio::spawn(drain_events(
        ring,
        Arc::clone(&peers),
        Arc::clone(&health),
        stop_rx,
    ));
    let mut bridge = tokio::spawn(bridge_ebpf_log(ebpf_log));
    let died_as = |task: &'static str, r: Result<io::Result<()>, tokio::task::JoinError>| {
        DaemonError::TaskDied {
            task,
            reason: match r {
                Ok(Ok(())) => "returned".into(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            },
        }
    };
    let result = tokio::select! {
        () = shutdown => {
            info!("shutdown requested");
            // Let the drain task empty the ring and report what the log limit suppressed.
            let _ = stop_tx.send(());
            match tokio::time::timeout(Duration::from_secs(5), &mut drain).await {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(r) => Err(died_as("event-drain", r)),
                Err(_) => Err(DaemonError::TaskDied { task: "event-drain", reason: "did not finish its final drain within 5 s".into() }),
            }
        }
        r = &mut drain => Err(died_as("event-drain", r)),
        r = &mut bridge => Err(died_as("ebpf-log", r)),
    };
    drain.abort();
    bridge.abort();
    health.attached.store(false, Ordering::Relaxed);
    log_totals(&verifier, &peers);
    drop(verifier);
    info!("verifier detached");
    result
}

fn log_totals(verifier: &Verifier, peers: &PeerTable) {
    for (id, p) in peers.iter() {
        match verifier.peer_stats(id) {
            Ok(s) => info!(
                peer = %p.net,
                verified_tcp = s.verified_packets[PROTO_TCP],
                verified_udp = s.verified_packets[PROTO_UDP],
                mismatches = s.mismatches[PROTO_TCP] + s.mismatches[PROTO_UDP],
                dropped = s.drops[PROTO_TCP] + s.drops[PROTO_UDP],
                "peer totals"
            ),
            Err(e) => warn!(peer = %p.net, error = %e, "could not read peer totals"),
        }
    }
    if let Ok(c) = verifier.counters() {
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
) -> Result<(), io::Error> {
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Drains the ring buffer: one WARN line per mismatch within the log budget. On `stop` it
/// drains what is left, reports suppressed lines and returns.
async fn drain_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    peers: Arc<PeerTable>,
    health: Arc<Health>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), io::Error> {
    let mut limiter = RateLimiter::new(LOG_PER_SECOND, LOG_BURST);
    let mut last_event = Instant::now();
    loop {
        let ready = tokio::select! {
            r = tokio::time::timeout(DRAIN_TICK, ring.readable_mut()) => r,
            _ = &mut stop => {
                let rb = ring.get_mut();
                while let Some(item) = rb.next() {
                    log_event(&item, &peers, &mut limiter);
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
                    log_event(&item, &peers, &mut limiter);
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
                    limiter = RateLimiter::new(LOG_PER_SECOND, LOG_BURST);
                }
            }
        }
        health.mark_drained();
    }
}

fn log_event(bytes: &[u8], peers: &PeerTable, limiter: &mut RateLimiter) {
    let Some(m) = Mismatch::decode(bytes) else {
        warn!(
            len = bytes.len(),
            "short record in the mismatch ring buffer"
        );
        return;
    };
    let Some(suppressed) = limiter.admit(Instant::now()) else {
        return;
    };
    let peer = peers
        .get(m.peer_id)
        .map_or_else(|| format!("#{}", m.peer_id), super::peers::PeerSpec::label);
    warn!(
        peer,
        proto = m.proto,
        flow = %m.flow(),
        seq = m.seq,
        len = m.len,
        found = %format_args!("{:#06x}", m.found),
        expected = %format_args!("{:#06x}", m.expected),
        action = if m.dropped { "dropped" } else { "passed" },
        payload = %Hex(&m.payload),
        suppressed_before = suppressed,
        "checksum mismatch"
    );
}
