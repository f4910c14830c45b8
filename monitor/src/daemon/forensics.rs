//! The capture task: the verifier's capture ring (every mismatching packet, and the intact
//! retransmission of each dropped TCP segment), paired and compared (`crate::forensics`),
//! counted by shape (`natt_monitor_corruption_shapes_total`), logged, and with `--capture`
//! written to the pcapng file with a comment on each packet.
//!
//! Bounded: the pairing table (`forensics::Pairing`), the log budget (suppressed lines are
//! counted in `natt_monitor_log_lines_suppressed_total`) and the file (`crate::capture`). The
//! verifier's `PAIRS` map is swept of entries older than the pairing window, so that segments
//! whose retransmission never came (a reset connection) do not fill it.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use monitor_ebpf::{Action, PairKey};
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::tasks::Shutdown;
use crate::{
    capture::{Capture, CaptureError, Record},
    daemon::state::View,
    events::RateLimiter,
    forensics::{Diff, Outcome, PAIR_WINDOW, Pairing, Shape},
    report::Note,
};

/// How often waiting copies are given up on and `PAIRS` is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long the thread waits on the ring before it looks at the clock and the shutdown signal.
const WAKE_EVERY: Duration = Duration::from_millis(100);
const NS_PER_SEC: u64 = 1_000_000_000;
/// Shape lines logged at once, and per second after that.
const LOG_BURST: u32 = 50;
const LOG_PER_SECOND: u32 = 10;

/// The capture task: the ring and what works on its records.
pub struct CaptureTask {
    ring: RingBuf<MapData>,
    w: Worker,
}

impl std::fmt::Debug for CaptureTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureTask")
            .field("file", &self.w.file)
            .finish_non_exhaustive()
    }
}

/// What `CaptureTask` takes over from the loaded verifier: the capture ring, the pairing map
/// and `--capture`'s file.
pub struct CaptureParts {
    /// The capture ring.
    pub ring: RingBuf<MapData>,
    /// The verifier's `PAIRS`.
    pub pairs: BpfHashMap<MapData, PairKey, u64>,
    /// The verifier's `PAIR_DEADLINE`: the last drop's time plus the window, 0 before any.
    pub deadline: Array<MapData, u64>,
    /// `--capture`'s file.
    pub file: Option<Capture>,
}

impl CaptureTask {
    /// The task over `parts`, with its counters from `metrics` and peer labels from `view`.
    #[must_use]
    pub fn new(
        parts: CaptureParts,
        view: watch::Receiver<Arc<View>>,
        metrics: &crate::metrics::Metrics,
    ) -> Self {
        Self {
            ring: parts.ring,
            w: Worker {
                pairing: Pairing::default(),
                pairs: parts.pairs,
                deadline: parts.deadline,
                swept_past: 0,
                file: parts.file,
                view,
                shapes: metrics.corruption_shapes(),
                suppressed: metrics.log_suppressed(),
                waiting: metrics.corruption_waiting(),
                limiter: RateLimiter::new(LOG_PER_SECOND, LOG_BURST),
            },
        }
    }
}

/// What a waiting corrupted copy keeps: its record (without the packet) and its number in the
/// capture file.
#[derive(Debug)]
struct Tag {
    peer_id: u32,
    spi: u32,
    number: Option<u64>,
}

struct Worker {
    pairing: Pairing<Tag>,
    pairs: BpfHashMap<MapData, PairKey, u64>,
    deadline: Array<MapData, u64>,
    /// A `PAIR_DEADLINE` value that was in the past at a sweep: every entry remembered up to
    /// it was older than the window then, and has been removed.
    swept_past: u64,
    file: Option<Capture>,
    view: watch::Receiver<Arc<View>>,
    shapes: IntCounterVec,
    suppressed: IntCounter,
    waiting: IntGauge,
    limiter: RateLimiter,
}

impl CaptureTask {
    /// Runs on a thread of its own until `stop`, so that pairing and file writes never hold
    /// up the runtime (a slow disk would otherwise stall the event drain, and health with it);
    /// then takes what the ring still holds, reports every copy still waiting as unpaired,
    /// flushes the file and returns (a shutdown loses no captured packet).
    ///
    /// # Errors
    /// A failure to wait on the ring or to write the file.
    pub fn run(self, stop: &Shutdown) -> io::Result<()> {
        let Self { mut ring, mut w } = self;
        let fail = |e: CaptureError| io::Error::other(e.to_string());
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        while !stop.requested() {
            if readable(&ring, WAKE_EVERY)? {
                while let Some(item) = ring.next() {
                    w.record(&item).map_err(fail)?;
                }
                w.flush().map_err(fail)?;
                w.waiting
                    .set(i64::try_from(w.pairing.len()).unwrap_or(i64::MAX));
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + SWEEP_EVERY;
                for o in w.pairing.expire(now) {
                    w.report(o);
                }
                w.waiting
                    .set(i64::try_from(w.pairing.len()).unwrap_or(i64::MAX));
                w.sweep();
            }
        }
        while let Some(item) = ring.next() {
            w.record(&item).map_err(fail)?;
        }
        let left = w.pairing.drain();
        if !left.is_empty() {
            info!(
                unpaired = left.len(),
                "corrupted copies still waiting for their retransmission at shutdown, counted unpaired"
            );
        }
        for o in left {
            w.report(o);
        }
        w.flush().map_err(fail)
    }
}

/// Waits up to `timeout` for the ring to hold a record (`poll(2)` on its descriptor, which
/// the kernel wakes at each submit); true when it does.
fn readable(ring: &RingBuf<MapData>, timeout: Duration) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, for the duration of the call.
    match unsafe { libc::poll(&raw mut fd, 1, ms) } {
        -1 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

impl Worker {
    fn record(&mut self, bytes: &[u8]) -> Result<(), CaptureError> {
        let Some(rec) = Record::decode(bytes) else {
            warn!(len = bytes.len(), "bad record in the capture ring buffer");
            return Ok(());
        };
        let now = Instant::now();
        if rec.action == Action::Intact {
            return self.intact(&rec);
        }
        let comment = Note::Corrupted {
            dropped: rec.action == Action::Dropped,
            spi: rec.spi,
            encap: rec.encap,
            found: rec.found,
            expected: rec.expected,
            peer: self.view.borrow().label(rec.peer_id),
        }
        .text(None);
        let number = self.write(&rec, &comment)?;
        let tag = Tag {
            peer_id: rec.peer_id,
            spi: rec.spi,
            number,
        };
        let outcomes = if rec.action == Action::Dropped {
            self.pairing.corrupted(rec.packet, now, tag)
        } else {
            vec![Outcome::Unpaired {
                bad: crate::forensics::Waiting::unparsed(rec.packet, now, tag),
                why: "observe mode: delivered, so TCP does not retransmit it",
            }]
        };
        for o in outcomes {
            self.report(o);
        }
        Ok(())
    }

    /// An intact retransmission: compared with the copies it pairs with, written after them
    /// with a comment naming the first one's number and what changed.
    fn intact(&mut self, rec: &Record) -> Result<(), CaptureError> {
        let outcomes = self.pairing.intact(&rec.packet);
        let Some(Outcome::Paired { bad, diff }) = outcomes.first() else {
            debug!("an intact retransmission whose corrupted copy is no longer waiting");
            return Ok(());
        };
        let comment = Note::Intact { of: bad.tag.number }.text(Some(diff));
        match (&mut self.file, bad.tag.number) {
            (Some(f), Some(_)) => f.write_pair(rec, &comment)?,
            _ => self.write(rec, &comment)?,
        };
        for o in outcomes {
            self.report(o);
        }
        Ok(())
    }

    fn write(&mut self, rec: &Record, comment: &str) -> Result<Option<u64>, CaptureError> {
        match &mut self.file {
            Some(f) => f.write(rec, comment),
            None => Ok(None),
        }
    }

    fn flush(&mut self) -> Result<(), CaptureError> {
        self.file.as_mut().map_or(Ok(()), Capture::flush)
    }

    /// Counts an outcome by shape and logs a compared one within the budget.
    fn report(&mut self, o: Outcome<Tag>) {
        let (bad, diff) = match o {
            Outcome::Paired { bad, diff } => (bad, diff),
            Outcome::Unpaired { bad, why } => {
                self.shapes
                    .with_label_values(&[Shape::Unpaired.as_str()])
                    .inc();
                debug!(
                    peer_id = bad.tag.peer_id,
                    why, "a corrupted copy stays unpaired"
                );
                return;
            }
        };
        self.shapes.with_label_values(&[diff.shape.as_str()]).inc();
        let Some(suppressed_before) = self.limiter.admit(Instant::now()) else {
            self.suppressed.inc();
            return;
        };
        let peer = self.view.borrow().label(bad.tag.peer_id);
        let flow = bad.segment().map(|s| flow(&s.key, bad.packet[0] >> 4 == 6));
        warn!(
            peer,
            spi = %format_args!("{:#010x}", bad.tag.spi),
            flow = flow.as_ref().map_or("?", |(f, _)| f.as_str()),
            seq = flow.as_ref().map_or(0, |(_, seq)| *seq),
            shape = diff.shape.as_str(),
            changed = diff.changed(),
            bits = diff.bits(),
            runs = %diff.runs_text(),
            cipher_blocks = %blocks(&diff),
            compared = diff.compared,
            points_at = diff.shape.points_at(),
            suppressed_before,
            "corruption shape, from the intact retransmission"
        );
    }

    /// Removes `PAIRS` entries older than the pairing window (a retransmission that never
    /// came); the verifier would otherwise find the map full. Reads one array slot and stops
    /// there while nothing was dropped since the last sweep that found the window over (the
    /// map is empty then), so a host without corruption makes no other map calls.
    fn sweep(&mut self) {
        let Some(now) = monotonic_ns() else {
            return;
        };
        // A failed read sweeps anyway.
        let deadline = self.deadline.get(&0, 0).unwrap_or(u64::MAX);
        if deadline == 0 || deadline == self.swept_past {
            return;
        }
        let window = u64::try_from(PAIR_WINDOW.as_nanos()).unwrap_or(u64::MAX);
        let stale: Vec<PairKey> = self
            .pairs
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, at)| now.saturating_sub(*at) > window)
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            // Gone already: paired meanwhile.
            let _ = self.pairs.remove(&k);
        }
        // Every entry was remembered at or before `deadline - window` (give or take the moment
        // by which CPUs racing to set the deadline may differ), so a second after the deadline
        // all were older than the window and are gone. A drop since the read set a later
        // deadline, and the next sweep looks again.
        if deadline != u64::MAX && now > deadline.saturating_add(NS_PER_SEC) {
            self.swept_past = deadline;
        }
    }
}

/// `src:sport -> dst:dport` and the sequence number.
fn flow(k: &PairKey, v6: bool) -> (String, u32) {
    let addr = |a: [u8; 16]| {
        if v6 {
            format!("[{}]", Ipv6Addr::from(a))
        } else {
            Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()
        }
    };
    (
        format!("{}:{} -> {}:{}", addr(k.src), k.sport, addr(k.dst), k.dport),
        k.seq,
    )
}

/// The cipher blocks a diff touched, `20..21`.
fn blocks(d: &Diff) -> String {
    d.blocks()
        .map_or_else(String::new, |(a, b)| format!("{a}..{b}"))
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) } != 0 {
        return None;
    }
    Some(u64::try_from(ts.tv_sec).ok()? * NS_PER_SEC + u64::try_from(ts.tv_nsec).ok()?)
}
