//! The event drain: the verifier's mismatch ring buffer and its aya-log ring.
//!
//! Owns the mismatch ring, the learning-sample ring, the log rate limiter and the
//! suppressed-line counter. Each mismatch becomes one WARN line within the log budget; each
//! learning sample goes to the SA/peer state.
//! Every completed pass, with or without events, is what keeps the daemon healthy: if this
//! loop stops, `/healthz` and `natt_monitor_up` say so within `HEALTH_MAX_AGE`.

use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use prometheus::IntCounter;
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::warn;

use super::tasks::Shutdown;
use crate::{
    daemon::{
        health::Health,
        state::{StateHandle, View},
    },
    events::{Hex, Learning, Mismatch, RateLimiter, SUPPRESSED_FLUSH},
};

/// How often the drain loop wakes even without events, proving it is alive.
pub const DRAIN_TICK: Duration = Duration::from_secs(1);

/// The drain task's handles.
pub struct Drain {
    /// The mismatch ring buffer.
    pub events: AsyncFd<RingBuf<MapData>>,
    /// The learning-sample ring buffer.
    pub learning: AsyncFd<RingBuf<MapData>>,
    /// Where learning samples go.
    pub state: StateHandle,
    /// Peer labels for the log lines.
    pub view: watch::Receiver<Arc<View>>,
    /// The log budget.
    pub limiter: RateLimiter,
    /// `natt_monitor_log_lines_suppressed_total`.
    pub suppressed: IntCounter,
    /// Marked after every pass.
    pub health: Arc<Health>,
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain").finish_non_exhaustive()
    }
}

/// Decodes every learning sample in `rb`, so the ring's read position advances before the
/// samples are handed to the state task (which may make the drain wait).
fn take_samples(rb: &mut RingBuf<MapData>) -> Vec<Learning> {
    std::iter::from_fn(|| {
        rb.next().map(|r| {
            let l = Learning::decode(&r);
            if l.is_none() {
                warn!(len = r.len(), "bad record in the learning ring buffer");
            }
            l
        })
    })
    .flatten()
    .collect()
}

impl Drain {
    /// Drains both rings until `stop`; then drains what is left, reports suppressed lines and
    /// returns.
    ///
    /// # Errors
    /// A failure to wait on a ring, or the state task being gone.
    pub async fn run(self, mut stop: Shutdown) -> io::Result<()> {
        let Self {
            mut events,
            mut learning,
            state,
            view,
            limiter,
            suppressed,
            health,
        } = self;
        let mut log = Log {
            view,
            limiter,
            suppressed,
            last_event: Instant::now(),
        };
        loop {
            tokio::select! {
                r = events.readable_mut() => {
                    // Logged in place: nothing here waits, so no record is copied.
                    let mut guard = r?;
                    let rb = guard.get_inner_mut();
                    while let Some(item) = rb.next() {
                        log.mismatch(&item);
                    }
                    guard.clear_ready();
                }
                r = learning.readable_mut() => {
                    let mut guard = r?;
                    let samples = take_samples(guard.get_inner_mut());
                    guard.clear_ready();
                    for l in samples {
                        state.sample(l).await?;
                    }
                }
                () = tokio::time::sleep(DRAIN_TICK) => log.flush_suppressed(),
                () = stop.recv() => {
                    for l in take_samples(learning.get_mut()) {
                        state.sample(l).await?;
                    }
                    let rb = events.get_mut();
                    while let Some(item) = rb.next() {
                        log.mismatch(&item);
                    }
                    let pending = log.limiter.pending_suppressed();
                    if pending > 0 {
                        warn!(suppressed = pending, "mismatch log lines suppressed by the rate limit");
                    }
                    return Ok(());
                }
            }
            health.mark_drained();
        }
    }
}

/// The mismatch log and its budget.
struct Log {
    view: watch::Receiver<Arc<View>>,
    limiter: RateLimiter,
    suppressed: IntCounter,
    last_event: Instant,
}

impl Log {
    /// Logs one mismatch within the budget. (What a mismatch means for its SA's residual the
    /// verifier decides itself, in order with its verdicts.)
    fn mismatch(&mut self, bytes: &[u8]) {
        let now = Instant::now();
        self.last_event = now;
        let Some(m) = Mismatch::decode(bytes) else {
            warn!(len = bytes.len(), "bad record in the mismatch ring buffer");
            return;
        };
        let Some(suppressed_before) = self.limiter.admit(now) else {
            self.suppressed.inc();
            return;
        };
        let peer = self.view.borrow().label(m.peer_id);
        let (found, expected) = m.sums();
        warn!(
            peer,
            proto = m.proto,
            flow = %m.flow(),
            seq = m.seq,
            len = m.len,
            found,
            expected,
            action = if m.dropped { "dropped" } else { "passed" },
            spi = %format_args!("{:#010x}", m.spi),
            reqid = m.reqid,
            ifindex = m.ifindex,
            payload = %Hex(&m.payload),
            suppressed_before,
            "checksum mismatch"
        );
    }

    /// After a quiet spell, reports the lines the budget withheld on their own.
    fn flush_suppressed(&mut self) {
        let pending = self.limiter.pending_suppressed();
        if pending > 0 && self.last_event.elapsed() >= SUPPRESSED_FLUSH {
            warn!(
                suppressed = pending,
                "mismatch log lines suppressed by the rate limit"
            );
            self.limiter.clear_suppressed();
        }
    }
}

/// Forwards the verifier's aya-log records (its rare anomaly reports) into `tracing`, via the
/// `log` facade that `tracing-subscriber` captures.
///
/// # Errors
/// A failure to wait on the log ring.
pub async fn bridge_ebpf_log(
    mut fd: AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>,
) -> io::Result<()> {
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
