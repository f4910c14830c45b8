//! The event drain: the verifier's mismatch ring buffer and its aya-log ring.
//!
//! Owns the mismatch ring, the log rate limiter and the suppressed-line counter. Each mismatch
//! becomes one WARN line within the log budget; each learning sample goes to the SA/peer state.
//! Every completed pass, with or without events, is what keeps the daemon healthy: if this
//! loop stops, `/healthz` and `natt_monitor_up` say so within `HEALTH_MAX_AGE`.

use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use prometheus::IntCounter;
use tokio::{
    io::unix::AsyncFd,
    sync::{oneshot, watch},
};
use tracing::warn;

use crate::{
    daemon::{
        health::Health,
        state::{StateHandle, View},
    },
    events::{Hex, Mismatch, RateLimiter, SUPPRESSED_FLUSH},
};

/// How often the drain loop wakes even without events, proving it is alive.
pub const DRAIN_TICK: Duration = Duration::from_secs(1);

/// The drain task's handles.
pub struct Drain {
    /// The mismatch ring buffer.
    pub ring: AsyncFd<RingBuf<MapData>>,
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

impl Drain {
    /// Drains until `stop`; then drains what is left, reports suppressed lines and returns.
    ///
    /// # Errors
    /// A failure to wait on the ring, or the state task being gone.
    pub async fn run(mut self, mut stop: oneshot::Receiver<()>) -> io::Result<()> {
        let mut last_event = Instant::now();
        loop {
            let ready = tokio::select! {
                r = tokio::time::timeout(DRAIN_TICK, self.ring.readable_mut()) => r,
                _ = &mut stop => {
                    let records: Vec<Vec<u8>> = {
                        let rb = self.ring.get_mut();
                        std::iter::from_fn(|| rb.next().map(|r| r.to_vec())).collect()
                    };
                    for r in records {
                        self.record(&r).await?;
                    }
                    let pending = self.limiter.pending_suppressed();
                    if pending > 0 {
                        warn!(suppressed = pending, "mismatch log lines suppressed by the rate limit");
                    }
                    return Ok(());
                }
            };
            match ready {
                Ok(guard) => {
                    let mut guard = guard?;
                    // Copy the records out so the ring's read position advances before the
                    // (possibly waiting) hand-over of learning samples.
                    let records: Vec<Vec<u8>> = {
                        let rb = guard.get_inner_mut();
                        std::iter::from_fn(|| rb.next().map(|r| r.to_vec())).collect()
                    };
                    guard.clear_ready();
                    if !records.is_empty() {
                        last_event = Instant::now();
                    }
                    for r in records {
                        self.record(&r).await?;
                    }
                }
                Err(_elapsed) => {
                    let pending = self.limiter.pending_suppressed();
                    if pending > 0 && last_event.elapsed() >= SUPPRESSED_FLUSH {
                        warn!(
                            suppressed = pending,
                            "mismatch log lines suppressed by the rate limit"
                        );
                        self.limiter.clear_suppressed();
                    }
                }
            }
            self.health.mark_drained();
        }
    }

    async fn record(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(m) = Mismatch::decode(bytes) else {
            warn!(
                len = bytes.len(),
                "short record in the mismatch ring buffer"
            );
            return Ok(());
        };
        if m.learning {
            return self.state.sample(m).await;
        }
        let Some(suppressed_before) = self.limiter.admit(Instant::now()) else {
            self.suppressed.inc();
            return Ok(());
        };
        let peer = self.view.borrow().label(m.peer_id);
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
        Ok(())
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
